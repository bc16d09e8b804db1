// Parameters of the residual + LayerNorm/RMSNorm kernels, filled by csrc/norm.cpp.
//
//   h = dropout(x) + residual;  y = (h - mean) * rstd * weight + bias   (LayerNorm)
//                               y = h * rstd * weight                   (RMSNorm)
// Every (M, N) tensor has a contiguous last dimension; row strides are in elements. The main
// dtype `dtype` (x, y, dy, dx) is a template parameter of the kernels; the other tensors carry
// their own DType, read at run time.
#pragma once

#include <cstdint>

#include "../common/static_switch.h"

namespace fastattn {

struct NormFwdParams {
  int64_t rows = 0;  // M
  int64_t cols = 0;  // N, the normalised (hidden) size
  DType dtype = DType::kFloat32;

  const void* x = nullptr;  // (M, N) dtype
  int64_t x_row_stride = 0;
  const void* residual = nullptr;  // (M, N) residual_dtype, or nullptr
  int64_t residual_row_stride = 0;
  DType residual_dtype = DType::kFloat32;
  const void* weight = nullptr;  // (N,) weight_dtype, or nullptr (scale 1)
  DType weight_dtype = DType::kFloat32;
  const void* bias = nullptr;  // (N,) bias_dtype, or nullptr (shift 0)
  DType bias_dtype = DType::kFloat32;

  void* y = nullptr;  // (M, N) dtype, contiguous
  void* h = nullptr;  // (M, N) h_dtype, contiguous; nullptr only when h is x itself: no
                    // residual, no dropout, h_dtype == dtype (then h is not stored)
  DType h_dtype = DType::kFloat32;
  float* mean = nullptr;  // (M,) fp32; nullptr for RMSNorm
  float* rstd = nullptr;  // (M,) fp32

  float eps = 1e-5f;
  bool is_rms = false;

  // Dropout on x (see kernels/common/philox.cuh): element (r, c) has index r * N + c.
  bool dropout = false;
  uint32_t dropout_threshold = 0;  // dropout_threshold(p)
  float dropout_scale = 1.f;       // 1 / (1 - p)
  uint64_t seed = 0;
  uint64_t offset = 0;
};

struct NormBwdParams {
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kFloat32;  // dy and dx

  const void* dy = nullptr;  // (M, N) dtype
  int64_t dy_row_stride = 0;
  const void* dh = nullptr;  // (M, N) dh_dtype: gradient of the returned h (prenorm), or nullptr
  int64_t dh_row_stride = 0;
  DType dh_dtype = DType::kFloat32;
  const void* h = nullptr;  // (M, N) h_dtype, saved by the forward
  int64_t h_row_stride = 0;
  DType h_dtype = DType::kFloat32;
  const float* mean = nullptr;  // (M,) fp32; nullptr for RMSNorm
  const float* rstd = nullptr;  // (M,) fp32
  const void* weight = nullptr;  // (N,) weight_dtype, or nullptr
  DType weight_dtype = DType::kFloat32;

  void* dx = nullptr;  // (M, N) dtype, contiguous
  void* dresidual = nullptr;  // (M, N) dresidual_dtype, contiguous, or nullptr (no residual)
  DType dresidual_dtype = DType::kFloat32;
  void* dweight = nullptr;  // (N,) dweight_dtype, or nullptr (no weight)
  DType dweight_dtype = DType::kFloat32;
  void* dbias = nullptr;  // (N,) dbias_dtype, or nullptr (no bias)
  DType dbias_dtype = DType::kFloat32;

  // Workspace for the deterministic weight/bias gradients: one fp32 row of partial sums per
  // row slot of the grid, reduced by a second kernel. Sized by norm_bwd_partial_rows();
  // nullptr when there is neither weight nor bias.
  float* partial_dweight = nullptr;  // (partial_rows, N) fp32
  float* partial_dbias = nullptr;    // (partial_rows, N) fp32
  int partial_rows = 0;

  bool is_rms = false;

  bool dropout = false;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.f;
  uint64_t seed = 0;
  uint64_t offset = 0;
};

}  // namespace fastattn
