// Instantiations of the backward preprocess kernel (delta = rowsum(dO * O)) and of the split
// dK/dV reduction, one per dtype. Kept out of instantiations/: they hold no tensor-core code
// and do not depend on the head dim or dropout.
#include "flash_bwd_launch_template.h"

namespace fastattn {
namespace flash {

template cudaError_t run_flash_bwd_preprocess_<__half>(const FlashBwdParams&, cudaStream_t);
template cudaError_t run_flash_bwd_preprocess_<__nv_bfloat16>(const FlashBwdParams&, cudaStream_t);
template cudaError_t run_flash_bwd_reduce_dkdv_<__half>(const FlashBwdParams&, cudaStream_t);
template cudaError_t run_flash_bwd_reduce_dkdv_<__nv_bfloat16>(const FlashBwdParams&, cudaStream_t);

}  // namespace flash
}  // namespace fastattn
