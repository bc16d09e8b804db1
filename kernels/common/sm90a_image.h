// Whether the current CUDA device runs this library's sm_90a images. wgmma / CUTLASS sm90
// kernels have real bodies only there; any other image the driver may pick (sm_80 code, a 9.0
// target without the "a", PTX JIT-compiled) holds stubs that must never be launched.
#pragma once

namespace fastattn {

// Cached per device; a function-attribute query, no launch (allowed during graph capture).
bool device_runs_sm90a();

}  // namespace fastattn
