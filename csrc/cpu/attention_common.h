// Helpers shared by the cpu backend's attention kernels (attention_kvcache.cpp, attention.cpp):
// fp32 row conversion, vectorized softmax pieces (exp_fast), the ALiBi slopes at the op boundary.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <optional>

namespace fastattn_cpu_common {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kUnbounded = -1;  // an unbounded window side

// exp(x) to a relative 2.2e-7 (Vectorized::exp_u20: 1.2e-6) in about half its instructions: x =
// n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e^r by a degree-5 fit, times 2^n by vscalefps.
// Below -87 the result is 0 (as exp_u20's below ln(FLT_MIN)): a subnormal result would cost a
// microcode assist per lane (masked scores are -inf), and -inf must not make r NaN. NaN stays NaN.
inline Vec exp_fast(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 low = _mm512_set1_ps(-87.f);
  const __mmask16 normal = _mm512_cmp_ps_mask(x, low, _CMP_NLT_UQ);
  const __m512 vx = _mm512_max_ps(low, x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(vx, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.6931471824645996f), vx);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-1.9046542121259336e-09f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.008291716687381268f), r, _mm512_set1_ps(0.04191502928733826f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.1666766256093979f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49998900294303894f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999996423721313f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(normal, p, n);
#else
  return x.exp_u20();
#endif
}

inline void vec_scale(float* x, int64_t n, float factor) {
  const Vec f(factor);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(x + c) * f).store(x + c);
  for (; c < n; ++c) x[c] *= factor;
}

// x[c] = exp(x[c] - sub); returns the sum (exp(-inf) = 0).
inline float vec_exp_sum(float* x, int64_t n, float sub) {
  const Vec vs(sub);
  Vec acc(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec e = (Vec::loadu(x + c) - vs).exp_u20();
    e.store(x + c);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] - sub);
    sum += x[c];
  }
  return sum;
}

// One row of dim values as fp32 into dst; fp16 / bf16 through at::vec's vector conversion.
template <typename scalar_t>
inline void row_to_fp32(const scalar_t* src, float* dst, int64_t dim) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(src, src + dim, dst);
  } else {
    using VecS = at::vec::Vectorized<scalar_t>;
    int64_t d = 0;
    for (; d + VecS::size() <= dim; d += VecS::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + d));
      lo.store(dst + d);
      hi.store(dst + d + Vec::size());
    }
    for (; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
  }
}

// rows x dim rows from src (row stride ld) as fp32: in place for fp32, else converted into
// buf (row stride dim). Returns the pointer; ld_out its row stride.
template <typename scalar_t>
inline const float* rows_fp32(const scalar_t* src, int64_t rows, int64_t ld, int64_t dim, float* buf,
                              int64_t& ld_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) row_to_fp32(src + r * ld, buf + r * dim, dim);
    ld_out = dim;
    return buf;
  }
}

// ALiBi slopes (H,) or (B, H) fp32, checked: the slope of (b, h) is ptr[b * sb + h * sh].
struct AlibiSlopes {
  const float* ptr = nullptr;
  int64_t sb = 0, sh = 0;
};

inline AlibiSlopes alibi_slopes_of(const std::optional<at::Tensor>& slopes, int64_t batch, int64_t heads,
                                   const char* op) {
  AlibiSlopes out;
  if (!slopes.has_value()) return out;
  const at::Tensor& t = *slopes;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32 on the CPU");
  if (t.dim() == 1) {
    TORCH_CHECK(t.size(0) == heads, op, ": alibi_slopes must be (H,) or (B, H)");
    out.sh = t.stride(0);
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == heads, op, ": alibi_slopes must be (H,) or (B, H)");
    out.sb = t.stride(0);
    out.sh = t.stride(1);
  }
  out.ptr = t.const_data_ptr<float>();
  return out;
}

}  // namespace fastattn_cpu_common
