#include "sm90a_image.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace fastattn {
namespace {

// Static shared memory exists only in this kernel's sm_90a image, so its attributes tell which
// image the driver picked for the current device (every translation unit of the library is
// built for the same architectures).
__global__ void sm90a_image_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int mark[32];
  mark[threadIdx.x % 32] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = mark[(threadIdx.x + 1) % 32];
#endif
}

constexpr int kMaxDevices = 64;

}  // namespace

bool device_runs_sm90a() {
  static std::atomic<int8_t> known[kMaxDevices];  // 0 unknown, 1 yes, -1 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  int8_t state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    cudaFuncAttributes attr{};
    const bool yes = cudaFuncGetAttributes(&attr, sm90a_image_probe_kernel) == cudaSuccess && attr.sharedSizeBytes > 0;
    cudaGetLastError();  // a device without a loadable image is an answer, not an error
    state = yes ? 1 : -1;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state > 0;
}

}  // namespace fastattn
