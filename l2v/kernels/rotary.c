/* Rotary position embedding (the rotate-half convention of Llama, Mistral, Qwen, Gemma, ...) in one pass.

   Why: transformers computes q * cos + rotate_half(q) * sin as five full-size tensor ops (two products, a
   negation, a concatenation, a sum); in an fp32 CPU encode that was ~6% of the time. This does the same
   arithmetic, in the same order and with the same roundings (products rounded, then summed: no fused
   multiply-add, see the build flags), so the results are bit-identical, in one read and one write.

   x: rows of D values (row r of head h at time t: x + b * xsb + h * xsh + t * xst), cos/sin: [B or 1][T][D]
   contiguous rows; out: contiguous [B][H][T][D]. */
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

void l2v_rotary(const float* x, int64_t B, int64_t H, int64_t T, int64_t D, int64_t xsb, int64_t xsh, int64_t xst,
                const float* cos, const float* sin, int64_t csb, float* out, int nthreads) {
  int64_t half = D / 2, rows = B * T;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
  for (int64_t bt = 0; bt < rows; ++bt) {
    int64_t b = bt / T, t = bt % T;
    const float* c = cos + b * csb + t * D;
    const float* s = sin + b * csb + t * D;
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = x + b * xsb + h * xsh + t * xst;
      float* o = out + ((b * H + h) * T + t) * D;
      for (int64_t i = 0; i < half; i += 16) {
        __mmask16 m = half - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - i)) - 1);
        __m512 x1 = _mm512_maskz_loadu_ps(m, xr + i), x2 = _mm512_maskz_loadu_ps(m, xr + half + i);
        __m512 c1 = _mm512_maskz_loadu_ps(m, c + i), c2 = _mm512_maskz_loadu_ps(m, c + half + i);
        __m512 s1 = _mm512_maskz_loadu_ps(m, s + i), s2 = _mm512_maskz_loadu_ps(m, s + half + i);
        /* first half: x1 cos1 + (-x2) sin1; second half: x2 cos2 + x1 sin2 */
        _mm512_mask_storeu_ps(o + i, m, _mm512_sub_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s1)));
        _mm512_mask_storeu_ps(o + half + i, m, _mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2)));
      }
    }
  }
}
