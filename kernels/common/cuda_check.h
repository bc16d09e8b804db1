// Error handling for plain C++ launchers in kernels/ (no torch here).
//
// Launchers return cudaError_t; the csrc/ glue turns a non-success code into a torch error
// with the message from cudaGetErrorString. FASTATTN_CUDA_TRY propagates an error early.
#pragma once

#include <cuda_runtime_api.h>

#define FASTATTN_CUDA_TRY(expr)            \
  do {                                     \
    cudaError_t fastattn_err_ = (expr);    \
    if (fastattn_err_ != cudaSuccess) {    \
      return fastattn_err_;                \
    }                                      \
  } while (0)

// After a <<<...>>> launch: configuration errors (too much shared memory, bad grid) surface
// here, asynchronous execution errors surface at the next synchronizing call.
#define FASTATTN_LAUNCH_CHECK() FASTATTN_CUDA_TRY(cudaGetLastError())
