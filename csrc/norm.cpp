// CUDA implementation of fastattn::norm_fwd / norm_bwd: boundary checks, output and workspace
// allocation, params filling, launch on the current stream (kernels/norm/).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "common/philox.cuh"
#include "norm/norm_api.h"

namespace fastattn {
namespace {

// A (M, N) operand: on x's device, shape (M, N), contiguous last dimension.
void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on the device of x");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), name, " must have shape ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must have a contiguous last dimension");
}

// A (N,) parameter: on x's device, contiguous.
void check_param(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on the device of x");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, " must have shape (", x.size(1), ",), got ", t.sizes());
  TORCH_CHECK(t.stride(0) == 1, name, " must be contiguous");
}

void set_dropout(double dropout_p, int64_t seed, int64_t offset, bool& dropout, uint32_t& threshold, float& scale,
                 uint64_t& seed_out, uint64_t& offset_out) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  dropout = dropout_p > 0.0;
  threshold = dropout_threshold(dropout_p);
  scale = dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  seed_out = static_cast<uint64_t>(seed);
  offset_out = static_cast<uint64_t>(offset);
}

at::Tensor empty_marker(const at::Tensor& like, at::ScalarType dtype) { return at::empty({0}, like.options().dtype(dtype)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, double dropout_p, int64_t seed, int64_t offset,
    bool is_rms, bool store_h, at::ScalarType h_dtype) {
  CHECK_DEVICE(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, hidden), got ", x.sizes());
  CHECK_LAST_DIM_CONTIGUOUS(x);
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(cols > 0, "hidden size must be positive");
  if (residual.has_value()) check_rows(*residual, x, "residual");
  if (weight.has_value()) check_param(*weight, x, "weight");
  if (bias.has_value()) check_param(*bias, x, "bias");
  TORCH_CHECK(store_h || (!residual.has_value() && dropout_p == 0.0 && h_dtype == x.scalar_type()),
              "h can only be x itself (store_h=False) without residual, dropout or a dtype change");

  NormFwdParams p;
  p.rows = rows;
  p.cols = cols;
  p.dtype = kernel_dtype(x.scalar_type(), "x");
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  if (residual.has_value()) {
    p.residual = residual->data_ptr();
    p.residual_row_stride = residual->stride(0);
    p.residual_dtype = kernel_dtype(residual->scalar_type(), "residual");
  }
  if (weight.has_value()) {
    p.weight = weight->data_ptr();
    p.weight_dtype = kernel_dtype(weight->scalar_type(), "weight");
  }
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.bias_dtype = kernel_dtype(bias->scalar_type(), "bias");
  }
  p.h_dtype = kernel_dtype(h_dtype, "h_dtype");
  p.eps = static_cast<float>(eps);
  p.is_rms = is_rms;
  set_dropout(dropout_p, seed, offset, p.dropout, p.dropout_threshold, p.dropout_scale, p.seed, p.offset);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({rows, cols}, x.options());
  at::Tensor h = store_h ? at::empty({rows, cols}, x.options().dtype(h_dtype)) : empty_marker(x, h_dtype);
  at::Tensor mean = at::empty({is_rms ? 0 : rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  p.y = y.data_ptr();
  p.h = store_h ? h.data_ptr() : nullptr;
  p.mean = is_rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  check_cuda_status(run_norm_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), "norm_fwd");
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& dh_in, const at::Tensor& h,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double dropout_p, int64_t seed, int64_t offset, bool is_rms,
    std::optional<at::ScalarType> residual_dtype) {
  CHECK_DEVICE(h);
  TORCH_CHECK(h.dim() == 2, "h must be 2-D (rows, hidden), got ", h.sizes());
  CHECK_LAST_DIM_CONTIGUOUS(h);
  const int64_t rows = h.size(0), cols = h.size(1);
  TORCH_CHECK(cols > 0, "hidden size must be positive");
  // Gradients arrive with arbitrary strides (e.g. expanded from a sum); the kernels need a
  // contiguous last dimension.
  const at::Tensor dy = dy_in.stride(-1) == 1 ? dy_in : dy_in.contiguous();
  check_rows(dy, h, "dy");
  std::optional<at::Tensor> dh;
  if (dh_in.has_value()) {
    dh = dh_in->stride(-1) == 1 ? *dh_in : dh_in->contiguous();
    check_rows(*dh, h, "dh");
  }
  TORCH_CHECK(mean.has_value() != is_rms, is_rms ? "RMSNorm takes no mean" : "LayerNorm needs mean");
  if (mean.has_value()) {
    CHECK_SAME_DEVICE(*mean, h);
    CHECK_SHAPE(*mean, rows);
    TORCH_CHECK(mean->scalar_type() == at::kFloat && mean->is_contiguous(), "mean must be contiguous float32");
  }
  CHECK_SAME_DEVICE(rstd, h);
  CHECK_SHAPE(rstd, rows);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous(), "rstd must be contiguous float32");
  if (weight.has_value()) check_param(*weight, h, "weight");
  if (bias.has_value()) check_param(*bias, h, "bias");

  NormBwdParams p;
  p.rows = rows;
  p.cols = cols;
  p.dtype = kernel_dtype(dy.scalar_type(), "dy");
  p.dy = dy.data_ptr();
  p.dy_row_stride = dy.stride(0);
  if (dh.has_value()) {
    p.dh = dh->data_ptr();
    p.dh_row_stride = dh->stride(0);
    p.dh_dtype = kernel_dtype(dh->scalar_type(), "dh");
  }
  p.h = h.data_ptr();
  p.h_row_stride = h.stride(0);
  p.h_dtype = kernel_dtype(h.scalar_type(), "h");
  p.mean = mean.has_value() ? mean->data_ptr<float>() : nullptr;
  p.rstd = rstd.data_ptr<float>();
  if (weight.has_value()) {
    p.weight = weight->data_ptr();
    p.weight_dtype = kernel_dtype(weight->scalar_type(), "weight");
  }
  p.is_rms = is_rms;
  set_dropout(dropout_p, seed, offset, p.dropout, p.dropout_threshold, p.dropout_scale, p.seed, p.offset);

  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor dx = at::empty({rows, cols}, dy.options());
  at::Tensor dresidual = residual_dtype.has_value() ? at::empty({rows, cols}, dy.options().dtype(*residual_dtype))
                                                    : empty_marker(dy, dy.scalar_type());
  at::Tensor dweight = weight.has_value() ? at::empty({cols}, weight->options()) : empty_marker(dy, dy.scalar_type());
  at::Tensor dbias = bias.has_value() ? at::empty({cols}, bias->options()) : empty_marker(dy, dy.scalar_type());
  p.dx = dx.data_ptr();
  if (residual_dtype.has_value()) {
    p.dresidual = dresidual.data_ptr();
    p.dresidual_dtype = kernel_dtype(*residual_dtype, "residual_dtype");
  }
  if (weight.has_value()) {
    p.dweight = dweight.data_ptr();
    p.dweight_dtype = p.weight_dtype;
  }
  if (bias.has_value()) {
    p.dbias = dbias.data_ptr();
    p.dbias_dtype = kernel_dtype(bias->scalar_type(), "bias");
  }

  int partial_rows = 0;
  check_cuda_status(norm_bwd_partial_rows(p, &partial_rows), "norm_bwd");
  at::Tensor workspace;
  if (partial_rows > 0) {
    const int64_t buffers = (weight.has_value() ? 1 : 0) + (bias.has_value() ? 1 : 0);
    workspace = at::empty({buffers, partial_rows, cols}, dy.options().dtype(at::kFloat));
    float* next = workspace.data_ptr<float>();
    if (weight.has_value()) {
      p.partial_dweight = next;
      next += static_cast<int64_t>(partial_rows) * cols;
    }
    if (bias.has_value()) p.partial_dbias = next;
    p.partial_rows = partial_rows;
  }
  check_cuda_status(run_norm_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), "norm_bwd");
  return {dx, dresidual, dweight, dbias};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("norm_fwd", &fastattn::norm_fwd);
  m.impl("norm_bwd", &fastattn::norm_bwd);
}
