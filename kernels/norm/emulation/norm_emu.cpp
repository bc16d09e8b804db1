// Host build of the norm kernels through kernels/common/host_emulation.h, for the CPU tests
// (tests/test_cuda_norm.py): the same kernel source, shape selection and dtype dispatch as the
// CUDA build, run by CPU fibers. C ABI for ctypes; tensors are passed as raw pointers.
//
// Build: g++ -std=c++17 -O1 -shared -fPIC -I<cuda include> norm_emu.cpp -o libnorm_emu.so
#include "../../common/host_emulation.h"
// (the emulation header must come first)
#include "../../common/philox.cuh"
#include "../norm_shapes.h"

namespace fastattn {
namespace {

template <typename T>
int emulate_fwd(const NormFwdParams& p) {
  return with_fwd_shape<T>(p, [&](auto shape) {
    using Shape = decltype(shape);
    using K = NormKernels<T, Shape>;
    const unsigned blocks = static_cast<unsigned>((p.rows + K::kRowsPerCta - 1) / K::kRowsPerCta);
    auto kernel = K::fwd();
    fastattn_emu::emulate_launch(dim3(blocks), dim3(Shape::kThreads), [&] { kernel(p); });
    return (Shape::kThreads << 8) | K::kRowsPerCta;
  });
}

// The persistent grid has at most max_blocks blocks (the GPU derives it from occupancy).
template <typename T>
int emulate_bwd(NormBwdParams p, int max_blocks, float* workspace) {
  return with_bwd_shape<T>(p, [&](auto shape) {
    using Shape = decltype(shape);
    using K = NormKernels<T, Shape>;
    const int64_t groups = (p.rows + K::kRowsPerCta - 1) / K::kRowsPerCta;
    const int blocks = static_cast<int>(groups < max_blocks ? groups : max_blocks);
    if (p.dweight != nullptr || p.dbias != nullptr) {
      p.partial_rows = blocks * K::kRowsPerCta;
      float* next = workspace;
      if (p.dweight != nullptr) {
        p.partial_dweight = next;
        next += static_cast<int64_t>(p.partial_rows) * p.cols;
      }
      if (p.dbias != nullptr) p.partial_dbias = next;
    }
    auto kernel = K::bwd();
    fastattn_emu::emulate_launch(dim3(blocks), dim3(Shape::kThreads), [&] { kernel(p); });
    if (p.partial_dweight != nullptr || p.partial_dbias != nullptr) {
      const dim3 grid(static_cast<unsigned>((p.cols + 31) / 32), 2);
      fastattn_emu::emulate_launch(grid, dim3(32, 8), [&] { _norm_bwd_reduce_kernel<8>(p); });
    }
    return (Shape::kThreads << 8) | K::kRowsPerCta;
  });
}

DType as_dtype(int code) { return static_cast<DType>(code); }

}  // namespace
}  // namespace fastattn

using fastattn::as_dtype;

// dtype codes: 0 fp16, 1 bf16, 2 fp32 (fastattn::DType). Returns (threads << 8 | rows per
// block) of the kernel shape that ran, so tests can check which path they exercised.
extern "C" int norm_emu_fwd(int64_t rows, int64_t cols, int dtype, const void* x, int64_t x_stride,
                            const void* residual, int64_t residual_stride, int residual_dtype, const void* weight,
                            int weight_dtype, const void* bias, int bias_dtype, void* y, void* h, int h_dtype,
                            float* mean, float* rstd, float eps, int is_rms, double dropout_p, uint64_t seed,
                            uint64_t offset) {
  fastattn::NormFwdParams p;
  p.rows = rows;
  p.cols = cols;
  p.dtype = as_dtype(dtype);
  p.x = x;
  p.x_row_stride = x_stride;
  p.residual = residual;
  p.residual_row_stride = residual_stride;
  p.residual_dtype = as_dtype(residual_dtype);
  p.weight = weight;
  p.weight_dtype = as_dtype(weight_dtype);
  p.bias = bias;
  p.bias_dtype = as_dtype(bias_dtype);
  p.y = y;
  p.h = h;
  p.h_dtype = as_dtype(h_dtype);
  p.mean = mean;
  p.rstd = rstd;
  p.eps = eps;
  p.is_rms = is_rms != 0;
  p.dropout = dropout_p > 0.0;
  p.dropout_threshold = fastattn::dropout_threshold(dropout_p);
  p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.seed = seed;
  p.offset = offset;
  if (rows == 0) return 0;
  return DTYPE_SWITCH(p.dtype, T, [&] { return fastattn::emulate_fwd<T>(p); });
}

extern "C" int norm_emu_bwd(int64_t rows, int64_t cols, int dtype, const void* dy, int64_t dy_stride, const void* dh,
                            int64_t dh_stride, int dh_dtype, const void* h, int64_t h_stride, int h_dtype,
                            const float* mean, const float* rstd, const void* weight, int weight_dtype, void* dx,
                            void* dresidual, int dresidual_dtype, void* dweight, void* dbias, int dbias_dtype,
                            int is_rms, double dropout_p, uint64_t seed, uint64_t offset, int max_blocks,
                            float* workspace) {
  fastattn::NormBwdParams p;
  p.rows = rows;
  p.cols = cols;
  p.dtype = as_dtype(dtype);
  p.dy = dy;
  p.dy_row_stride = dy_stride;
  p.dh = dh;
  p.dh_row_stride = dh_stride;
  p.dh_dtype = as_dtype(dh_dtype);
  p.h = h;
  p.h_row_stride = h_stride;
  p.h_dtype = as_dtype(h_dtype);
  p.mean = mean;
  p.rstd = rstd;
  p.weight = weight;
  p.weight_dtype = as_dtype(weight_dtype);
  p.dx = dx;
  p.dresidual = dresidual;
  p.dresidual_dtype = as_dtype(dresidual_dtype);
  p.dweight = dweight;
  p.dweight_dtype = as_dtype(weight_dtype);
  p.dbias = dbias;
  p.dbias_dtype = as_dtype(dbias_dtype);
  p.is_rms = is_rms != 0;
  p.dropout = dropout_p > 0.0;
  p.dropout_threshold = fastattn::dropout_threshold(dropout_p);
  p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.seed = seed;
  p.offset = offset;
  if (rows == 0) return 0;
  return DTYPE_SWITCH(p.dtype, T, [&] { return fastattn::emulate_bwd<T>(p, max_blocks, workspace); });
}
