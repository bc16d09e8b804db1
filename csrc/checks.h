// Boundary checks shared by the csrc/ op implementations, and the mapping of torch dtypes onto
// the kernels' DType. User-facing validation happens in Python (fastattn/ops/); these guard
// the C++ boundary against direct torch.ops.fastattn calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "common/static_switch.h"

#define CHECK_DEVICE(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define CHECK_SAME_DEVICE(x, y) TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device")
#define CHECK_SHAPE(x, ...)                                                        \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_LAST_DIM_CONTIGUOUS(x) \
  TORCH_CHECK((x).dim() == 0 || (x).stride(-1) == 1, #x " must have a contiguous last dimension")

namespace fastattn {

inline DType kernel_dtype(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    default:
      TORCH_CHECK(false, name, " must be float16, bfloat16 or float32, got ", dtype);
  }
}

// Turns a launcher's cudaError_t into a torch error naming the op.
inline void check_cuda_status(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(status));
}

}  // namespace fastattn
