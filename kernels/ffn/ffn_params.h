// Parameters of the fused feed-forward kernels and the plain C++ launch functions csrc/ffn.cpp
// calls. No torch here: nvcc compiles kernels/ alone.
//
// One tensor-core GEMM template serves the five GEMMs of the FFN, picked by GemmKind:
//
//   forward   z = x @ w1^T + b1, a = dropout(act(z))   kFwdAct  (A (M,K) x, B (N,K) w1)
//             y = a @ w2^T + b2                         kBiasNT  (A (M,F) a, B (d_out,F) w2)
//   backward  z = x @ w1^T + b1 (recompute only)        kBiasNT
//             dz = (dy @ w2) * keep/(1-p) * act'(z),
//             a_d = dropout(act(z))                     kBwdAct  (A (M,d_out) dy, B (d_out,F) w2)
//             dx = dz @ w1                              kBiasNN  (A (M,dh) dz, B (dh,d_model) w1)
//             dw2 = dy^T @ a_d, dw1 = dz^T @ x          kBiasTN  (A stored (K,M), B (K,N))
//             db1, db2 = column sums of dz, dy          run_ffn_colsum (deterministic)
//
// For swiglu (w1 rows [gate; up], F = d_ff) kFwdAct computes the gate and up tiles of the same
// columns in one CTA (two accumulators) and writes a = silu(gate) * up; kBwdAct writes both
// halves of dz. N is then F and the up half sits F rows (w1, b1) or F columns (z, dz) further.
//
// On an sm_90 device, with CUTLASS compiled in (FASTATTN_HAVE_CUTLASS), run_ffn_gemm sends the
// GEMMs ffn_sm90_serves() accepts, with TMA-compatible operands, to the CUTLASS TMA + wgmma
// kernels of ffn_sm90_launch_template.h; everything else runs the hand-written kernel.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/static_switch.h"

namespace fastattn {
namespace ffn {

enum class Activation : int { kNone = 0, kRelu, kGelu, kGeluTanh, kSilu, kSwiglu };

enum class GemmKind : int {
  kBiasNT = 0,  // C = A @ B^T (+ bias): A (M, K) and B (N, K) both K-contiguous
  kBiasNN,      // C = A @ B (+ bias):   A (M, K) K-contiguous, B (K, N) N-contiguous
  kBiasTN,      // C = A^T @ B (+ bias): A stored (K, M) M-contiguous, B (K, N) N-contiguous
  kFwdAct,      // NT layout, epilogue: + b1, store z (optional), a = dropout(act(z))
  kBwdAct,      // NN layout, epilogue: dz = dA * keep/(1-p) * act'(z), a_d = dropout(act(z))
};

// Sizes are ints; tile origins (< size + tile) must stay below INT_MAX too.
constexpr int kMaxDim = 0x7FFFFFFF - 256;

struct FfnGemmParams {
  DType dtype;          // kFloat16 or kBFloat16: every tensor below has this dtype
  GemmKind kind;
  Activation act;       // kNone for the kBias* kinds
  int M, N, K;          // C is (M, N); swiglu: N = F. Each <= kMaxDim.
  const void* A;        // kBiasTN: (K, M), else (M, K); element row stride lda
  int64_t lda;
  const void* B;        // kBiasNT/kFwdAct: (N, K) (swiglu: (2F, K)), else (K, N); row stride ldb
  int64_t ldb;
  const void* bias;     // (N,) (swiglu kFwdAct: (2F,)), contiguous; nullptr = no bias
  void* C;              // (M, N) output; kBwdAct: dz (M, d_hidden); kFwdAct: unused
  int64_t ldc;
  void* Z;              // kFwdAct: z output (M, d_hidden) or nullptr; kBwdAct: z input
  int64_t ldz;
  void* act_out;        // kFwdAct: a, kBwdAct: a_d, both (M, F)
  int64_t ld_act;
  // Dropout on a (M, F) (kFwdAct, kBwdAct): element (row, col) is kept iff
  // fastattn::dropout_keep(seed, offset, row * F + col, dropout_threshold) (common/philox.cuh).
  float dropout_p;             // set by the caller; 0 = no dropout
  uint64_t seed;
  uint64_t offset;
  bool has_dropout;            // the three fields below are derived from dropout_p by
  uint32_t dropout_threshold;  // run_ffn_gemm (so host code needs no device headers)
  float dropout_scale;         // 1 / (1 - p)
  // Every operand base is 16-byte aligned and every leading dimension a multiple of 8
  // elements: tiles are fetched with 16-byte cp.async; otherwise with predicated 2-byte loads.
  bool vec_loads;
  // The caller allows the sm_90a CUTLASS kernel (csrc: unless FASTATTN_FFN_CUTLASS=0, and for
  // the z recompute only when the forward GEMM would have used it too, so z is bitwise equal).
  bool allow_sm90;
};

// Epilogues the CUTLASS path computes: every plain GEMM, and act / act' of relu, gelu,
// gelu_tanh and silu without dropout. Dropout (a Philox draw per element) and swiglu (gate and
// up accumulators in one tile) have no epilogue visitor there and stay on the hand-written kernel.
inline bool ffn_sm90_serves(GemmKind kind, Activation act, bool has_dropout) {
  if (kind != GemmKind::kFwdAct && kind != GemmKind::kBwdAct) return true;
  return !has_dropout && act != Activation::kSwiglu;
}

// The device half of run_ffn_gemm's choice: built with FASTATTN_HAVE_CUTLASS and the current
// device runs this library's sm_90a image (ffn_dispatch.cu). For csrc's ffn_cutlass_serves query.
bool ffn_sm90_device_ready();

// Column sums out[n] = sum_m X[m, n] (dbias), deterministic: fp32 partial sums over fixed row
// chunks into `partial`, then one thread per column adds the chunks in order (no atomics).
struct FfnColSumParams {
  DType dtype;          // of X and out
  int M, N;
  const void* X;        // (M, N), row stride ldx
  int64_t ldx;
  float* partial;       // (ffn_colsum_chunks(M), N) fp32 workspace
  void* out;            // (N,)
};

// Rows summed by one partial-sum block: at least 256, and at most 128 chunks so the fp32
// workspace stays <= 128 * N floats. Depends on M only, so the summation order (and the
// result) does not depend on the GPU or on scheduling.
constexpr int kColSumMinRowsPerChunk = 256;
constexpr int kColSumMaxChunks = 128;

inline int ffn_colsum_rows_per_chunk(int M) {
  const int spread = (M + kColSumMaxChunks - 1) / kColSumMaxChunks;
  return spread > kColSumMinRowsPerChunk ? spread : kColSumMinRowsPerChunk;
}

inline int ffn_colsum_chunks(int M) { return M > 0 ? (M - 1) / ffn_colsum_rows_per_chunk(M) + 1 : 0; }

// One instantiation per (dtype, kind, activation); generated files under instantiations/.
template <typename T, GemmKind kKind, Activation kAct>
cudaError_t run_ffn_gemm_(const FfnGemmParams& params, cudaStream_t stream);

// Runtime dispatch to the instantiation matching params.dtype/kind/act (ffn_dispatch.cu).
// M == 0 or N == 0: nothing to write, returns cudaSuccess without a launch. Returns
// cudaErrorInvalidValue for a dtype/kind/activation combination that is not instantiated.
cudaError_t run_ffn_gemm(const FfnGemmParams& params, cudaStream_t stream);

cudaError_t run_ffn_colsum(const FfnColSumParams& params, cudaStream_t stream);

}  // namespace ffn
}  // namespace fastattn
