// Host entry points of the attention kernels: runtime (device, dtype, head dim, dropout) -> the
// explicitly instantiated launcher (instantiations/*.cu). No torch here; csrc/attention.cpp
// fills the params and calls these.
#include <cstdlib>
#include <cstring>

#include "../common/cuda_check.h"
#include "flash_params.h"

namespace fastattn {
namespace flash {

namespace {

// An attribute of the current device (cached per device); 0 when it cannot be read.
template <cudaDeviceAttr kAttr>
int device_attribute() {
  static int values[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  if (values[device] == 0) {
    int value = 0;
    if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess) return 0;
    values[device] = value;
  }
  return values[device];
}

int device_major() { return device_attribute<cudaDevAttrComputeCapabilityMajor>(); }

}  // namespace

int device_sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// The forward kernel rule: the sm_90a wgmma kernel serves a 9.x device without dropout, sliding
// window, softcap or ALiBi (head-dim buckets 64 / 128 / 256), unless FASTATTN_DISABLE_SM90_FWD=1
// (A/B measurements); everything else, and a build without sm_90a code, runs the mma.sync kernel.
bool fwd_uses_sm90(const FlashFwdParams& params) {
  if (params.is_dropout || params.has_window() || params.has_softcap() || params.alibi_slopes != nullptr) return false;
  if (device_major() != 9) return false;
  const char* disable = std::getenv("FASTATTN_DISABLE_SM90_FWD");  // read per call: tests toggle it
  return disable == nullptr || std::strcmp(disable, "") == 0 || std::strcmp(disable, "0") == 0;
}

cudaError_t run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  if (params.head_dim <= 0 || params.head_dim > 256 || params.head_dim % 8 != 0) return cudaErrorInvalidValue;
  if (params.dtype != DType::kFloat16 && params.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (fwd_uses_sm90(params)) {
    const cudaError_t err = HALF_SWITCH(params.dtype == DType::kBFloat16, T, [&] {
      return params.head_dim <= 64    ? run_flash_fwd_sm90_<T, 64>(params, stream)
             : params.head_dim <= 128 ? run_flash_fwd_sm90_<T, 128>(params, stream)
                                      : run_flash_fwd_sm90_<T, 256>(params, stream);
    });
    if (err != cudaErrorNoKernelImageForDevice) return err;
  }
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
  const bool split = params.num_splits > 1;
  if (params.num_splits < 1 || params.num_splits > params.nheads / params.nheads_kv ||
      (split && (params.dk_accum == nullptr || params.dv_accum == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return HALF_SWITCH(params.dtype == DType::kBFloat16, T, [&] {
    FASTATTN_CUDA_TRY(run_flash_bwd_preprocess_<T>(params, stream));
    FASTATTN_CUDA_TRY((HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
      return BOOL_SWITCH(params.is_dropout, kIsDropout, [&] {
        return run_flash_bwd_<T, kHeadDim, kIsDropout>(params, stream);
      });
    })));
    return split ? run_flash_bwd_reduce_dkdv_<T>(params, stream) : cudaSuccess;
  });
}

}  // namespace flash
}  // namespace fastattn
