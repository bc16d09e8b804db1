// Declarations of the Hopper (sm_90a) CUTLASS path of the FFN GEMMs (ffn_sm90_launch_template.h,
// generated instantiations/ffn_sm90_*.cu). Without CUTLASS nothing is declared, so a build
// without the headers links the hand-written kernels alone.
#pragma once

#include <cuda_runtime_api.h>

#include "ffn_params.h"

#ifdef FASTATTN_HAVE_CUTLASS
namespace fastattn {
namespace ffn {
namespace sm90 {

// Launches the CUTLASS kernel when it can serve these operands (launched = true) and returns
// the launch status; launched = false (and cudaSuccess) when the layout is one TMA cannot
// describe, so the caller falls back to the hand-written kernel.
template <typename T, GemmKind kKind, Activation kAct>
cudaError_t run_ffn_gemm_sm90_(const FfnGemmParams& params, cudaStream_t stream, bool& launched);

}  // namespace sm90
}  // namespace ffn
}  // namespace fastattn
#endif
