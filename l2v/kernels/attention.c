/* l2v's CPU attention for packed ("varlen") rows: many short texts back to back, each attending only to itself.

   Why: torch's CPU SDPA is built for few long sequences; on hundreds of 20-40-token texts per batch it spends
   most of its time in per-(text, head) set-up and reached ~23 GFLOP/s inside a real encode (9% of the time).
   Here one task is one (text, kv head): K is transposed once into a scratch panel, then blocks of RB query rows
   (GQA: every query head that shares the kv head) compute scores, an exact fp32 softmax and P @ V with AVX-512
   FMAs. All arithmetic is fp32; each output depends only on its own text. Needs AVX-512F only.

   Layout (element strides; the last dim, head_dim D, must be contiguous and a multiple of 16):
     q[t, h, :] at q + t * qst + h * qsh, k/v likewise with kv heads; out is contiguous [T, H, D]. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "simd_exp.h"

#define RB 4 /* query rows per block */

/* S[r, j0 .. j0 + 16 NV) = scale * q_r . K[j] for the RB rows, from the transposed panel kt[D][ldk]. */
static inline __attribute__((always_inline)) void scores_nv(const int NV, const float* const* qr, const float* kt,
                                                            int64_t ldk, int64_t D, int64_t j0, float scale, float* S,
                                                            int64_t lds) {
  __m512 acc[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; ++c) {
    __m512 kv[4];
    for (int u = 0; u < NV; ++u) kv[u] = _mm512_loadu_ps(kt + c * ldk + j0 + 16 * u);
    for (int r = 0; r < RB; ++r) { /* all RB rows (the missing ones repeat the last): a fixed, unrolled tile */
      __m512 qv = _mm512_set1_ps(qr[r][c]);
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_fmadd_ps(qv, kv[u], acc[r][u]);
    }
  }
  __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(S + r * lds + j0 + 16 * u, _mm512_mul_ps(acc[r][u], sc));
}

/* out_r[d0 .. d0 + 16 NV) = sum_j P[r, j] V[j, d0 ..] over j < nk. */
static inline __attribute__((always_inline)) void pv_nv(const int NV, int nr, const float* P, int64_t lds,
                                                        const float* v, int64_t vst, int64_t nk, int64_t d0,
                                                        const float* inv, float* const* orow) {
  __m512 acc[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    __m512 vv[4];
    for (int u = 0; u < NV; ++u) vv[u] = _mm512_loadu_ps(v + j * vst + d0 + 16 * u);
    for (int r = 0; r < RB; ++r) {
      __m512 pv = _mm512_set1_ps(P[r * lds + j]);
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_fmadd_ps(pv, vv[u], acc[r][u]);
    }
  }
  for (int r = 0; r < nr; ++r) {
    __m512 s = _mm512_set1_ps(inv[r]);
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(orow[r] + d0 + 16 * u, _mm512_mul_ps(acc[r][u], s));
  }
}

/* One (text, kv head): rows are (query head, position) pairs, RB positions of one head at a time. */
static void attend_one(const float* q, int64_t qst, int64_t qsh, const float* k, int64_t kst, int64_t ksh,
                       const float* v, int64_t vst, int64_t vsh, float* out, int64_t H, int64_t D, int64_t t0, int64_t L, int64_t kvh,
                       int64_t groups, float scale, int causal, float* kt, float* S) {
  const float* kbase = k + t0 * kst + kvh * ksh;
  const int64_t ldk = (L + 15) / 16 * 16; /* this text's panel width: keys padded with zeros to whole vectors */
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < D; ++c) kt[c * ldk + j] = kbase[j * kst + c];
  for (int64_t c = 0; c < D; ++c)
    for (int64_t j = L; j < ldk; ++j) kt[c * ldk + j] = 0.0f;
  const float* vbase = v + t0 * vst + kvh * vsh;
  for (int64_t g = 0; g < groups; ++g) {
    int64_t h = kvh * groups + g;
    for (int64_t i0 = 0; i0 < L; i0 += RB) {
      int nr = (int)(L - i0 < RB ? L - i0 : RB);
      const float* qr[RB];
      float* orow[RB];
      for (int r = 0; r < RB; ++r) {
        int64_t i = i0 + (r < nr ? r : nr - 1);
        qr[r] = q + (t0 + i) * qst + h * qsh;
        orow[r] = out + ((t0 + i) * H + h) * D;
      }
      int64_t nk = causal ? (i0 + nr < L ? i0 + nr : L) : L; /* keys this block can see */
      int64_t nk16 = (nk + 15) / 16 * 16;
      for (int64_t j0 = 0; j0 < nk16; j0 += 64) {
        int64_t left = (nk16 - j0) / 16;
        switch (left >= 4 ? 4 : left) {
          case 4: scores_nv(4, qr, kt, ldk, D, j0, scale, S, ldk); break;
          case 3: scores_nv(3, qr, kt, ldk, D, j0, scale, S, ldk); break;
          case 2: scores_nv(2, qr, kt, ldk, D, j0, scale, S, ldk); break;
          default: scores_nv(1, qr, kt, ldk, D, j0, scale, S, ldk); break;
        }
      }
      float inv[RB];
      for (int r = 0; r < RB; ++r) {
        float* s = S + r * ldk;
        int64_t valid = causal ? i0 + (r < nr ? r : nr - 1) + 1 : L;
        __m512 vmx = _mm512_set1_ps(-INFINITY), vsum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= valid; j += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(s + j));
        if (j < valid) vmx = _mm512_mask_max_ps(vmx, (__mmask16)((1u << (valid - j)) - 1), vmx, _mm512_loadu_ps(s + j));
        vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
        j = 0;
        for (; j + 16 <= valid; j += 16) {
          __m512 e = l2v_exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx));
          _mm512_storeu_ps(s + j, e);
          vsum = _mm512_add_ps(vsum, e);
        }
        if (j < valid) {
          __mmask16 m = (__mmask16)((1u << (valid - j)) - 1);
          __m512 e = l2v_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmx));
          e = _mm512_maskz_mov_ps(m, e);
          _mm512_mask_storeu_ps(s + j, m, e);
          vsum = _mm512_add_ps(vsum, e);
        }
        for (j = valid; j < nk; ++j) s[j] = 0.0f; /* causal: keys after this row's position */
        inv[r] = 1.0f / _mm512_reduce_add_ps(vsum);
      }
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        int64_t left = (D - d0) / 16;
        switch (left >= 4 ? 4 : left) {
          case 4: pv_nv(4, nr, S, ldk, vbase, vst, nk, d0, inv, orow); break;
          case 3: pv_nv(3, nr, S, ldk, vbase, vst, nk, d0, inv, orow); break;
          case 2: pv_nv(2, nr, S, ldk, vbase, vst, nk, d0, inv, orow); break;
          default: pv_nv(1, nr, S, ldk, vbase, vst, nk, d0, inv, orow); break;
        }
      }
    }
  }
}

/* Texts: starts[i], lens[i] (tokens), n_texts of them. H query heads share KV kv heads (H % KV == 0).
   Returns 0, 1 when a scratch buffer could not be allocated, 2 for an unsupported shape. */
int l2v_varlen_attention(const float* q, int64_t qst, int64_t qsh, const float* k, int64_t kst, int64_t ksh,
                         const float* v, int64_t vst, int64_t vsh, float* out, int64_t H, int64_t KV, int64_t D,
                         const int64_t* starts, const int64_t* lens, int64_t n_texts, float scale, int causal,
                         int nthreads) {
  if (D % 16 || D <= 0 || KV <= 0 || H % KV) return 2;
  int64_t maxlen = 0;
  for (int64_t i = 0; i < n_texts; ++i) maxlen = lens[i] > maxlen ? lens[i] : maxlen;
  int64_t cap = (maxlen + 63) / 64 * 64 + 16; /* scratch per panel row, >= any text's padded length */
  int64_t ntask = n_texts * KV, groups = H / KV;
  int err = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
  {
    float* kt = (float*)aligned_alloc(64, (size_t)(D * cap) * sizeof(float));
    float* S = (float*)aligned_alloc(64, (size_t)(RB * cap) * sizeof(float));
    if (!kt || !S) {
#pragma omp atomic write
      err = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) {
      if (!kt || !S) continue;
      int64_t i = t / KV, kvh = t % KV;
      if (lens[i] > 0)
        attend_one(q, qst, qsh, k, kst, ksh, v, vst, vsh, out, H, D, starts[i], lens[i], kvh, groups, scale, causal,
                   kt, S);
    }
    free(kt);
    free(S);
  }
  return err;
}
