// Host entry points of the attention kernels: runtime (dtype, head dim, dropout) -> the
// explicitly instantiated launcher (instantiations/*.cu). No torch here; csrc/attention.cpp
// fills the params and calls these.
#include "../common/cuda_check.h"
#include "flash_params.h"

namespace fastattn {
namespace flash {

cudaError_t run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  if (params.head_dim <= 0 || params.head_dim > 256 || params.head_dim % 8 != 0) return cudaErrorInvalidValue;
  if (params.dtype != DType::kFloat16 && params.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  return HALF_SWITCH(params.dtype == DType::kBFloat16, T, [&] {
    return HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_dropout, kIsDropout, [&] {
        return run_flash_fwd_<T, kHeadDim, kIsDropout>(params, stream);
      });
    });
  });
}

cudaError_t run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream) {
  if (params.head_dim <= 0 || params.head_dim > 256 || params.head_dim % 8 != 0) return cudaErrorInvalidValue;
  if (params.dtype != DType::kFloat16 && params.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  return HALF_SWITCH(params.dtype == DType::kBFloat16, T, [&] {
    FASTATTN_CUDA_TRY(run_flash_bwd_preprocess_<T>(params, stream));
    return HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_dropout, kIsDropout, [&] {
        return run_flash_bwd_<T, kHeadDim, kIsDropout>(params, stream);
      });
    });
  });
}

}  // namespace flash
}  // namespace fastattn
