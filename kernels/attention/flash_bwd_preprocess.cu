// Instantiations of the backward preprocess kernel (delta = rowsum(dO * O)), one per dtype.
// Kept out of instantiations/: it holds no tensor-core code and does not depend on the head
// dim or dropout.
#include "flash_bwd_launch_template.h"

namespace fastattn {
namespace flash {

template cudaError_t run_flash_bwd_preprocess_<__half>(const FlashBwdParams&, cudaStream_t);
template cudaError_t run_flash_bwd_preprocess_<__nv_bfloat16>(const FlashBwdParams&, cudaStream_t);

}  // namespace flash
}  // namespace fastattn
