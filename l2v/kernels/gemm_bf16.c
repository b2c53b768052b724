/* l2v's CPU linear kernels: fp32 activations x bf16 weights -> fp32 outputs, with AVX512-BF16 (vdpbf16ps);
   its fp32-weight twin (l2v_linear_f32w, plain AVX-512 FMA) for layers kept in fp32; and int16 fixed point
   (l2v_linear_i16, AVX512-VNNI vpdpwssd) for 16-bit weights with more precision than bf16 at the same speed.

   Why: torch on CPU offers bf16 matmuls only with bf16 outputs, and rounding every activation of a
   bidirectional LLM to bf16 moves some embeddings below cosine 0.99 of fp32 (see benchmarks/RESULTS.md).
   Here only the matmul *inputs* are rounded to bf16; products are exact in fp32, sums are fp32, outputs fp32.
   Each output element is one sequential fp32 sum over k, so a row's result does not depend on the batch.

   Weights are packed by l2v/kernels/linear.py as [N/64][K/2][64][2] bf16 (VNNI pairs), zero padded. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "simd_exp.h"

#define NR 64
#define MR 6

static inline void cvt_row(const float* src, uint16_t* dst, int64_t K, int64_t K2) {
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 lo = _mm512_loadu_ps(src + k), hi = _mm512_loadu_ps(src + k + 16);
    __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512((void*)(dst + k), (__m512i)v);
  }
  for (; k < K; ++k) {
    __m512 v = _mm512_set1_ps(src[k]);
    __m256bh b = _mm512_cvtneps_pbh(v);
    dst[k] = (uint16_t)_mm256_extract_epi16((__m256i)b, 0);
  }
  if (K2 * 2 > K) dst[K] = 0;
}

static inline __m512 silu512(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), l2v_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

/* Shared by both weight formats: per-16-column store masks for a panel of ncols outputs, accumulators started
   at the bias (or zero), and the epilogue (plain, masked, or gated: silu(gate) * up). */
static inline __attribute__((always_inline)) void tile_init(const int mr, int ncols, const float* bias,
                                                            __m512 acc[MR][4], __mmask16 m[4]) {
  for (int j = 0; j < 4; ++j) {
    int left = ncols - 16 * j;
    m[j] = left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1));
  }
  for (int j = 0; j < 4; ++j) {
    __m512 init = bias ? _mm512_maskz_loadu_ps(m[j], bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < mr; ++r) acc[r][j] = init;
  }
}

static inline __attribute__((always_inline)) void tile_store(const int mr, const int gated, int ncols,
                                                             __m512 acc[MR][4], const __mmask16 m[4], float* c,
                                                             int64_t ldc) {
  if (gated == 2) { /* as below, rounded to bf16 (RNE, as cvt_row) for the next matmul: c holds uint16_t */
    uint16_t* h = (uint16_t*)c;
    __mmask32 m2 = (__mmask32)m[0] | ((__mmask32)m[1] << 16);
    for (int r = 0; r < mr; ++r) {
      __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(silu512(acc[r][1]), acc[r][3]),
                                       _mm512_mul_ps(silu512(acc[r][0]), acc[r][2]));
      _mm512_mask_storeu_epi16((void*)(h + r * ldc), m2, (__m512i)v);
    }
  } else if (gated) { /* panel = 32 gate columns then the same 32 up columns: store silu(gate) * up */
    for (int r = 0; r < mr; ++r)
      for (int j = 0; j < 2; ++j)
        _mm512_mask_storeu_ps(c + r * ldc + 16 * j, m[j], _mm512_mul_ps(silu512(acc[r][j]), acc[r][j + 2]));
  } else if (ncols >= NR) {
    for (int r = 0; r < mr; ++r)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
  } else {
    for (int r = 0; r < mr; ++r)
      for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(c + r * ldc + 16 * j, m[j], acc[r][j]);
  }
}

/* mr (1-6) as a compile-time constant for KERN, so each row count gets its own fully unrolled tile. */
#define L2V_MR_CASES(KERN, G, KLEN)                                    \
  switch (mr) {                                                        \
    case 6: KERN(6, G, a, lda, b, KLEN, c, ldc, bias, ncols); break;   \
    case 5: KERN(5, G, a, lda, b, KLEN, c, ldc, bias, ncols); break;   \
    case 4: KERN(4, G, a, lda, b, KLEN, c, ldc, bias, ncols); break;   \
    case 3: KERN(3, G, a, lda, b, KLEN, c, ldc, bias, ncols); break;   \
    case 2: KERN(2, G, a, lda, b, KLEN, c, ldc, bias, ncols); break;   \
    default: KERN(1, G, a, lda, b, KLEN, c, ldc, bias, ncols); break;  \
  }

static inline __attribute__((always_inline)) void kern(const int mr, const int gated, const uint16_t* a, int64_t lda,
                                                         const uint16_t* b, int64_t K2, float* c, int64_t ldc,
                                                         const float* bias, int ncols) {
  __m512 acc[MR][4];
  __mmask16 m[4];
  tile_init(mr, ncols, bias, acc, m);
  for (int64_t kk = 0; kk < K2; ++kk) {
    const uint16_t* bp = b + kk * NR * 2;
    __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void*)(bp));
    __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void*)(bp + 32));
    __m512bh b2 = (__m512bh)_mm512_loadu_si512((const void*)(bp + 64));
    __m512bh b3 = (__m512bh)_mm512_loadu_si512((const void*)(bp + 96));
    for (int r = 0; r < mr; ++r) {
      __m512bh av = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(a + r * lda + 2 * kk));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], av, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], av, b3);
    }
  }
  tile_store(mr, gated, ncols, acc, m, c, ldc);
}

static void kern_any(int mr, int gated, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t K2, float* c,
                     int64_t ldc, const float* bias, int ncols) {
  if (gated == 2) {
    L2V_MR_CASES(kern, 2, K2)
  } else if (gated) {
    L2V_MR_CASES(kern, 1, K2)
  } else {
    L2V_MR_CASES(kern, 0, K2)
  }
}

/* ---------------------------------------------------------------- fp32 weights (layers kept in fp32)
   Same tiling and epilogues; weights packed as [N/64][K][64] fp32; A is read in place (no conversion).
   Why not torch: at the model's shapes torch's fp32 matmul reached 118-188 GFLOP/s here, this 205-227. */
static inline __attribute__((always_inline)) void kern32(const int mr, const int gated, const float* a, int64_t lda,
                                                         const float* b, int64_t K, float* c, int64_t ldc,
                                                         const float* bias, int ncols) {
  __m512 acc[MR][4];
  __mmask16 m[4];
  tile_init(mr, ncols, bias, acc, m);
  for (int64_t k = 0; k < K; ++k) {
    const float* bp = b + k * NR;
    __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
    __m512 b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);
    for (int r = 0; r < mr; ++r) {
      __m512 av = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
    }
  }
  tile_store(mr, gated, ncols, acc, m, c, ldc);
}

static void kern32_any(int mr, int gated, const float* a, int64_t lda, const float* b, int64_t K, float* c,
                       int64_t ldc, const float* bias, int ncols) {
  if (gated) {
    L2V_MR_CASES(kern32, 1, K)
  } else {
    L2V_MR_CASES(kern32, 0, K)
  }
}

/* C[M, N] = A[M, K] @ W^T + bias in fp32 (one sequential fp32 FMA chain per output), W packed [N/64][K][64].
   gated: as l2v_linear_f32. Returns 0. */
int l2v_linear_f32w(const float* A, int64_t lda, int64_t M, int64_t K, const float* Bp, int64_t N, const float* bias,
                    float* C, int64_t ldc, int64_t MB, int nthreads, int gated) {
  int64_t NB = (N + NR - 1) / NR, WN = gated ? NR / 2 : NR;
  if (MB <= 0) MB = 96;
  int64_t MBLK = (M + MB - 1) / MB;
  int64_t ntask = MBLK * NB;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
  {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t lo = ntask * t / nt, hi = ntask * (t + 1) / nt;
    for (int64_t i = lo; i < hi; ++i) {
      int64_t mb = i / NB, nb = i % NB;
      int64_t m0 = mb * MB, mlen = M - m0 < MB ? M - m0 : MB;
      int64_t outs = gated ? N / 2 : N;
      int ncols = (int)(outs - nb * WN < WN ? outs - nb * WN : WN);
      const float* b = Bp + nb * K * NR;
      const float* bb = bias && !gated ? bias + nb * NR : NULL;
      for (int64_t r = 0; r < mlen; r += MR) {
        int mr = (int)(mlen - r < MR ? mlen - r : MR);
        kern32_any(mr, gated, A + (m0 + r) * lda, lda, b, K, C + (m0 + r) * ldc + nb * WN, ldc, bb, ncols);
      }
    }
  }
  return 0;
}

/* ---------------------------------------------------------------- int16 fixed point (the 16-bit default)
   Why: on AVX512-VNNI, vpdpwssd (int16 x int16 pairs summed into int32) runs at the same instruction rate as
   vdpbf16ps, but int16 keeps ~15 significant bits where bf16 keeps 8. Each weight row and each activation row
   gets one fp32 scale; the products are exact and the int32 sum is exact, so the only errors are the two
   roundings to int16, 5-9x smaller than bf16's (benchmarks/RESULTS.md, "int16 fixed point").
   Overflow-free by construction: every row is scaled so that its int16 vector has L2 norm <= L2V_I16_NORM(K);
   by Cauchy-Schwarz no partial sum of x.w can then leave int32 (46340^2 < 2^31), and wrap-around int32
   adds make the order irrelevant anyway. The cap on |v| (32767) wins for rows with outliers.
   Weights: packed [N/64][K/2][64][2] int16 like bf16, scales [N/64 * 64] fp32 (l2v/kernels/linear.py). */
#define L2V_I16_MAX 32767.0f

static inline float i16_norm_target(int64_t K) { /* rounding adds up to 0.5 per element: sqrt(K)/2 to the norm */
  return 46340.0f - 0.5f * sqrtf((float)K) - 8.0f;
}

/* dst[0:K2*2] = round(src / s) as int16 (RNE, zero pad), returns s; a row with a NaN or inf returns NaN, so
   every output of the row is NaN (as fp32 math would give). */
static inline float quant_row(const float* src, int16_t* dst, int64_t K, int64_t K2, float target) {
  __m512 ss = _mm512_setzero_ps(), mx = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_loadu_ps(src + k);
    ss = _mm512_fmadd_ps(v, v, ss);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  if (k < K) {
    __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, src + k);
    ss = _mm512_fmadd_ps(v, v, ss);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  float sum = _mm512_reduce_add_ps(ss), big = _mm512_reduce_max_ps(mx);
  if (!isfinite(sum) || !isfinite(big)) {
    memset(dst, 0, (size_t)K2 * 2 * sizeof(int16_t));
    return NAN;
  }
  float s = sqrtf(sum) / target, s2 = big / L2V_I16_MAX;
  if (s2 > s) s = s2;
  if (s == 0.0f) s = 1.0f; /* an all-zero row */
  __m512 inv = _mm512_set1_ps(1.0f / s);
  for (k = 0; k + 16 <= K; k += 16) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + k), inv)); /* RNE */
    _mm256_storeu_si256((__m256i*)(dst + k), _mm512_cvtsepi32_epi16(q));
  }
  if (k < K) {
    __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + k), inv));
    _mm256_mask_storeu_epi16((void*)(dst + k), m, _mm512_cvtsepi32_epi16(q));
  }
  if (K2 * 2 > K) dst[K] = 0;
  return s;
}

/* acc += a . b (int16 pairs -> int32) as inline asm: gcc 12's pattern for the intrinsic copies the accumulator
   (and spills it to the stack) on every update, which halves the kernel's speed. */
#define L2V_DPWSSD(acc, x, y) __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(y))
/* One row of int32 sums: four named registers per row (c<r>0..c<r>3). */
#define L2V_I16_ROW(r)                                                                   \
  if (mr > r) {                                                                          \
    __m512i av = _mm512_set1_epi32(*(const int32_t*)(a + r * lda + 2 * kk));             \
    L2V_DPWSSD(c##r##0, av, b0);                                                      \
    L2V_DPWSSD(c##r##1, av, b1);                                                      \
    L2V_DPWSSD(c##r##2, av, b2);                                                      \
    L2V_DPWSSD(c##r##3, av, b3);                                                      \
  }
#define L2V_I16_OUT(r)                                                                   \
  if (mr > r) {                                                                          \
    __m512 sr = _mm512_set1_ps(xs[r]);                                                   \
    acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##0), _mm512_mul_ps(sr, w0), bb0); \
    acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##1), _mm512_mul_ps(sr, w1), bb1); \
    acc[r][2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##2), _mm512_mul_ps(sr, w2), bb2); \
    acc[r][3] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c##r##3), _mm512_mul_ps(sr, w3), bb3); \
  }

static inline __attribute__((always_inline)) void kern16(const int mr, const int gated, const int16_t* a,
                                                           int64_t lda, const int16_t* b, int64_t K2, float* c,
                                                           int64_t ldc, const float* bias, int ncols,
                                                           const float* xs, const float* ws) {
  /* The int32 sums are named variables, not an array as in kern, so they stay in registers. */
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z, c20 = z, c21 = z, c22 = z,
          c23 = z, c30 = z, c31 = z, c32 = z, c33 = z, c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z,
          c52 = z, c53 = z;
  for (int64_t kk = 0; kk < K2; ++kk) {
    const int16_t* bp = b + kk * NR * 2;
    __m512i b0 = _mm512_loadu_si512((const void*)(bp));
    __m512i b1 = _mm512_loadu_si512((const void*)(bp + 32));
    __m512i b2 = _mm512_loadu_si512((const void*)(bp + 64));
    __m512i b3 = _mm512_loadu_si512((const void*)(bp + 96));
    L2V_I16_ROW(0) L2V_I16_ROW(1) L2V_I16_ROW(2) L2V_I16_ROW(3) L2V_I16_ROW(4) L2V_I16_ROW(5)
  }
  __m512 acc[MR][4];
  __mmask16 m[4];
  tile_init(mr, ncols, NULL, acc, m);
  /* scales are padded to whole panels; bias (never gated) is not */
  __m512 w0 = _mm512_loadu_ps(ws), w1 = _mm512_loadu_ps(ws + 16), w2 = _mm512_loadu_ps(ws + 32),
         w3 = _mm512_loadu_ps(ws + 48);
  __m512 bb0 = bias ? _mm512_maskz_loadu_ps(m[0], bias) : _mm512_setzero_ps();
  __m512 bb1 = bias ? _mm512_maskz_loadu_ps(m[1], bias + 16) : _mm512_setzero_ps();
  __m512 bb2 = bias ? _mm512_maskz_loadu_ps(m[2], bias + 32) : _mm512_setzero_ps();
  __m512 bb3 = bias ? _mm512_maskz_loadu_ps(m[3], bias + 48) : _mm512_setzero_ps();
  L2V_I16_OUT(0) L2V_I16_OUT(1) L2V_I16_OUT(2) L2V_I16_OUT(3) L2V_I16_OUT(4) L2V_I16_OUT(5)
  tile_store(mr, gated, ncols, acc, m, c, ldc);
}

#define L2V_MR_CASES16(G)                                                          \
  switch (mr) {                                                                    \
    case 6: kern16(6, G, a, lda, b, K2, c, ldc, bias, ncols, xs, ws); break;       \
    case 5: kern16(5, G, a, lda, b, K2, c, ldc, bias, ncols, xs, ws); break;       \
    case 4: kern16(4, G, a, lda, b, K2, c, ldc, bias, ncols, xs, ws); break;       \
    case 3: kern16(3, G, a, lda, b, K2, c, ldc, bias, ncols, xs, ws); break;       \
    case 2: kern16(2, G, a, lda, b, K2, c, ldc, bias, ncols, xs, ws); break;       \
    default: kern16(1, G, a, lda, b, K2, c, ldc, bias, ncols, xs, ws); break;      \
  }

static void kern16_any(int mr, int gated, const int16_t* a, int64_t lda, const int16_t* b, int64_t K2, float* c,
                       int64_t ldc, const float* bias, int ncols, const float* xs, const float* ws) {
  if (gated) {
    L2V_MR_CASES16(1)
  } else {
    L2V_MR_CASES16(0)
  }
}

/* ---------------------------------------------------------------- 16-bit weights: one driver for both formats
   Tasks are (row block, panel) pairs split evenly over the threads; each thread converts a block of MB rows of A
   (to bf16, or to int16 with row scales when Ws is given) once and runs every panel it owns over it.
   gated: W packs gate and up rows in alternating 32-row halves (N = 2 x outputs, no bias); C gets
   silu(x @ gate^T) * (x @ up^T), N / 2 columns. Returns 0, or 1 when a scratch buffer could not be allocated. */
static int linear16(const float* A, int64_t lda, int64_t M, int64_t K, const void* Bp, const float* Ws, int64_t N,
                    const float* bias, float* C, int64_t ldc, int64_t MB, int nthreads, int gated) {
  int64_t K2 = (K + 1) / 2, Kp = 2 * K2, NB = (N + NR - 1) / NR, WN = gated ? NR / 2 : NR;
  if (MB <= 0) MB = 96;
  int64_t MBLK = (M + MB - 1) / MB;
  int64_t ntask = MBLK * NB;
  const int i16 = Ws != NULL;
  float target = i16_norm_target(K);
  int err = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
  {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t lo = ntask * t / nt, hi = ntask * (t + 1) / nt;
    uint16_t* abuf = NULL;
    float* xs = NULL; /* int16: the block's row scales, after its rows */
    if (hi > lo) {
      abuf = (uint16_t*)aligned_alloc(64, ((MB * Kp * 2 + (i16 ? MB * 4 : 0) + 63) / 64) * 64);
      if (!abuf) {
#pragma omp atomic write
        err = 1;
      } else if (i16) {
        xs = (float*)(abuf + MB * Kp);
      }
    }
    int64_t cur = -1;
    for (int64_t i = lo; abuf && i < hi; ++i) {
      int64_t mb = i / NB, nb = i % NB;
      int64_t m0 = mb * MB, mlen = M - m0 < MB ? M - m0 : MB;
      if (mb != cur) {
        for (int64_t r = 0; r < mlen; ++r) {
          if (i16)
            xs[r] = quant_row(A + (m0 + r) * lda, (int16_t*)abuf + r * Kp, K, K2, target);
          else
            cvt_row(A + (m0 + r) * lda, abuf + r * Kp, K, K2);
        }
        cur = mb;
      }
      int64_t outs = gated ? N / 2 : N;
      int ncols = (int)(outs - nb * WN < WN ? outs - nb * WN : WN);
      const uint16_t* b = (const uint16_t*)Bp + nb * K2 * NR * 2;
      const float* bb = bias && !gated ? bias + nb * NR : NULL;
      for (int64_t r = 0; r < mlen; r += MR) {
        int mr = (int)(mlen - r < MR ? mlen - r : MR);
        float* c = C + (m0 + r) * ldc + nb * WN;
        if (i16)
          kern16_any(mr, gated, (const int16_t*)abuf + r * Kp, Kp, (const int16_t*)b, K2, c, ldc, bb, ncols, xs + r,
                     Ws + nb * NR);
        else
          kern_any(mr, gated, abuf + r * Kp, Kp, b, K2, c, ldc, bb, ncols);
      }
    }
    free(abuf);
  }
  return err;
}

/* C[M, N] (fp32, row stride ldc) = A[M, K] (fp32, row stride lda) @ W^T + bias, W packed by linear.py's pack_weight.
   A is rounded to bf16 (RNE), products are exact and accumulated in fp32. MB: rows converted per task. */
int l2v_linear_f32(const float* A, int64_t lda, int64_t M, int64_t K, const uint16_t* Bp, int64_t N, const float* bias,
                   float* C, int64_t ldc, int64_t MB, int nthreads, int gated) {
  return linear16(A, lda, M, K, Bp, NULL, N, bias, C, ldc, MB, nthreads, gated);
}

/* The same with A and W in int16 fixed point (W packed by pack_i16, scales Ws); sums exact in int32. */
int l2v_linear_i16(const float* A, int64_t lda, int64_t M, int64_t K, const int16_t* Bp, const float* Ws,
                   int64_t N, const float* bias, float* C, int64_t ldc, int64_t MB, int nthreads, int gated) {
  return linear16(A, lda, M, K, Bp, Ws, N, bias, C, ldc, MB, nthreads, gated);
}

/* ---------------------------------------------------------------- the whole gated MLP in one call
   C[M, N] = (silu(A Wg^T) * (A Wu^T)) Wd^T + bias, block of MB rows by block of MB rows: the intermediate
   (MB x I) lives in a scratch buffer that stays in L2 instead of an M x I fp32 tensor (25 MB for 4096 rows of
   the default model) written to fresh pages and read back. Results are bit-identical to the two-call path
   (gated, then the down projection on the intermediate): the same tiles, the same rounding of the intermediate
   (bf16 RNE for bf16; per-row int16 for int16), the same sequential sum per output.
   All threads work on each row block: conversion split by rows, gate/up by panels (or panel x row-group
   units on many cores), down by (panel, 6-row tile) units, with a barrier between the phases.
   mode: 0 bf16 weights, 1 fp32 weights (layers kept in fp32), 2 int16 fixed point (scales Sgu, Sd).
   Bgu: gated packing (N = 2 I), Bd: packed [Nout/64][I(/2)]..., I: intermediate size. Returns 0, or 1 when a
   scratch buffer could not be allocated. */
int l2v_mlp(const float* A, int64_t lda, int64_t M, int64_t K, const void* Bgu, int64_t I, const void* Bd,
            int64_t N, const float* bias, float* C, int64_t ldc, int64_t MB, int nthreads, int mode,
            const float* Sgu, const float* Sd) {
  if (MB <= 0) MB = 96;
  if (M <= 0) return 0;
  if (MB > M) MB = M;
  const int fp32 = mode == 1, i16 = mode == 2;
  int64_t K2 = (K + 1) / 2, Kp = 2 * K2, I2 = (I + 1) / 2, Ip = 2 * I2;
  int64_t NBg = (2 * I + NR - 1) / NR, NBd = (N + NR - 1) / NR, WN = NR / 2;
  /* bf16: A rows as bf16 (MB x Kp) and the intermediate as bf16 (MB x Ip); fp32: the intermediate (MB x I);
     int16: A rows as int16 (MB x Kp), the fp32 intermediate (MB x I), then as int16 (MB x Ip), row scales */
  size_t abytes = fp32 ? 0 : (size_t)(MB * Kp * 2 + 63) / 64 * 64;
  size_t hbytes = (fp32 || i16) ? (size_t)(MB * I * 4 + 63) / 64 * 64 : (size_t)(MB * Ip * 2 + 63) / 64 * 64;
  size_t qbytes = i16 ? (size_t)(MB * Ip * 2 + 2 * MB * 4 + 63) / 64 * 64 : 0;
  char* scratch = (char*)aligned_alloc(64, abytes + hbytes + qbytes);
  if (!scratch) return 1;
  uint16_t* abuf = (uint16_t*)scratch;
  void* hbuf = scratch + abytes;
  int16_t* hq = (int16_t*)(scratch + abytes + hbytes);
  float* xs = i16 ? (float*)(hq + MB * Ip) : NULL; /* row scales of A's block, then of the intermediate */
  float* hs = i16 ? xs + MB : NULL;
  if (mode == 0 && Ip > I) memset(hbuf, 0, hbytes); /* the odd-I pad column is read (times a zero weight) */
  float ktarget = i16_norm_target(K), itarget = i16_norm_target(I);
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
  {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      int64_t mlen = M - m0 < MB ? M - m0 : MB, tiles = (mlen + MR - 1) / MR;
      if (i16) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < mlen; ++r)
          xs[r] = quant_row(A + (m0 + r) * lda, (int16_t*)abuf + r * Kp, K, K2, ktarget);
      } else if (!fp32) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < mlen; ++r) cvt_row(A + (m0 + r) * lda, abuf + r * Kp, K, K2);
      }
      /* gate/up units: whole panels (best reuse of each panel), or panel x row-group where there are fewer
         than 4 panels per thread (many-core CPUs) */
      int64_t G = (4 * omp_get_num_threads() + NBg - 1) / NBg;
      if (G > tiles) G = tiles;
#pragma omp for schedule(static)
      for (int64_t u = 0; u < NBg * G; ++u) {
        int64_t nb = u / G, g = u % G, r0 = tiles * g / G * MR, r1 = tiles * (g + 1) / G * MR;
        int ncols = (int)(I - nb * WN < WN ? I - nb * WN : WN);
        for (int64_t r = r0; r < r1 && r < mlen; r += MR) {
          int mr = (int)(mlen - r < MR ? mlen - r : MR);
          if (fp32)
            kern32_any(mr, 1, A + (m0 + r) * lda, lda, (const float*)Bgu + nb * K * NR, K,
                       (float*)hbuf + r * I + nb * WN, I, NULL, ncols);
          else if (i16)
            kern16_any(mr, 1, (const int16_t*)abuf + r * Kp, Kp, (const int16_t*)Bgu + nb * K2 * NR * 2, K2,
                       (float*)hbuf + r * I + nb * WN, I, NULL, ncols, xs + r, Sgu + nb * NR);
          else
            kern_any(mr, 2, abuf + r * Kp, Kp, (const uint16_t*)Bgu + nb * K2 * NR * 2, K2,
                     (float*)((uint16_t*)hbuf + r * Ip + nb * WN), Ip, NULL, ncols);
        }
      }
      if (i16) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < mlen; ++r) hs[r] = quant_row((const float*)hbuf + r * I, hq + r * Ip, I, I2, itarget);
      }
#pragma omp for schedule(static)
      for (int64_t u = 0; u < NBd * tiles; ++u) {
        int64_t nb = u / tiles, r = (u % tiles) * MR;
        int mr = (int)(mlen - r < MR ? mlen - r : MR);
        int ncols = (int)(N - nb * NR < NR ? N - nb * NR : NR);
        const float* bb = bias ? bias + nb * NR : NULL;
        float* c = C + (m0 + r) * ldc + nb * NR;
        if (fp32)
          kern32_any(mr, 0, (const float*)hbuf + r * I, I, (const float*)Bd + nb * I * NR, I, c, ldc, bb, ncols);
        else if (i16)
          kern16_any(mr, 0, hq + r * Ip, Ip, (const int16_t*)Bd + nb * I2 * NR * 2, I2, c, ldc, bb, ncols, hs + r,
                     Sd + nb * NR);
        else
          kern_any(mr, 0, (const uint16_t*)hbuf + r * Ip, Ip, (const uint16_t*)Bd + nb * I2 * NR * 2, I2, c, ldc,
                   bb, ncols);
      }
    }
  }
  free(scratch);
  return 0;
}
