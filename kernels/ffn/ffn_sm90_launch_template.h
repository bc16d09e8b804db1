// Hopper (sm_90a) path of the FFN GEMMs: CUTLASS 3.x TMA + wgmma warp-specialized kernels with
// the epilogue written as an epilogue visitor tree (EVT) that reuses the fp32 activation
// formulas of ffn_epilogue.cuh, so both engines compute the same functions:
//
//   plain (kBiasNT/NN/TN)  D = acc + bias[col]                      (bias optional)
//   kFwdAct                Z = acc + bias[col] (aux store, optional), D = a = act(Z fp32)
//   kBwdAct                Z aux load; aux store a_d = act(Z); D = dz = acc * act'(Z)
//
// Dropout (Philox mask per element in the epilogue) and swiglu (two accumulators per tile)
// have no EVT node here and stay on the hand-written kernel; ffn_sm90_serves() decides.
// Included only by the generated instantiations/ffn_sm90_*.cu files, and only with
// FASTATTN_HAVE_CUTLASS. Device code exists only in the sm_90a image: CUTLASS compiles the
// kernel body to an error stub for other targets (the dispatcher checks the image it runs).
#pragma once

#ifdef FASTATTN_HAVE_CUTLASS

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_types.h"

#include "../common/cuda_check.h"
#include "ffn_epilogue.cuh"
#include "ffn_params.h"
#include "ffn_sm90.h"

namespace fastattn {
namespace ffn {
namespace sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <typename T>
struct CutlassType;
template <>
struct CutlassType<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

// EVT compute functors on fp32 fragments: the same Act<kAct> formulas as the hand-written
// epilogue (fp32, expf-based tanh), element by element.
template <Activation kAct>
struct ActFns {
  template <class Frag>
  struct F {  // a = f(z)
    CUTLASS_DEVICE Frag operator()(Frag const& z) const {
      Frag out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < Frag::kElements; ++i) out[i] = Act<kAct>::f(z[i]);
      return out;
    }
  };
  template <class Frag>
  struct Dz {  // dz = da * f'(z)
    CUTLASS_DEVICE Frag operator()(Frag const& da, Frag const& z) const {
      Frag out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < Frag::kElements; ++i) out[i] = da[i] * Act<kAct>::df(z[i]);
      return out;
    }
  };
};

// Operand layouts per GemmKind (CUTLASS tags: A is (M, K), B is (K, N)).
template <GemmKind kKind>
struct Layouts {
  static constexpr bool kAKMajor = kKind != GemmKind::kBiasTN;
  static constexpr bool kBKMajor = kKind == GemmKind::kBiasNT || kKind == GemmKind::kFwdAct;
  using A = std::conditional_t<kAKMajor, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  using B = std::conditional_t<kBKMajor, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
};

// One tile configuration for every kind: 128 x 256 x 64 CTA tile, two consumer warpgroups
// (cooperative, 64 x 256 each), 2 x 1 cluster (multicast of B), persistent tile scheduler;
// the shape cuBLAS favours for large bf16 GEMMs on H100/H200.
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
constexpr int kAlign = 8;  // elements: 16-byte TMA rows
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;  // as __float2bfloat16_rn
using RowMajor = cutlass::layout::RowMajor;
using StrideRow = cutlass::detail::TagToStrideC_t<RowMajor>;  // (ld, 1, batch)

namespace detail = cutlass::epilogue::collective::detail;

template <typename E>
using EpiDescriptor = detail::EpilogueDescriptor<TileShape, cutlass::epilogue::collective::EpilogueTileAuto, void, E,
                                                 EpilogueSchedule>;
template <typename E>
using AuxStoreDesc = detail::AuxStoreDescriptor<EpiDescriptor<E>, RowMajor, E>;
template <typename E>
using AuxLoadDesc = detail::AuxLoadDescriptor<EpiDescriptor<E>, RowMajor, E>;

template <typename E>
using AuxStore = fusion::Sm90AuxStore<AuxStoreDesc<E>::Stages, typename AuxStoreDesc<E>::EpilogueTile, E,
                                      kRound, StrideRow,
                                      typename AuxStoreDesc<E>::SmemLayoutAtom, typename AuxStoreDesc<E>::CopyOpR2S, kAlign>;
template <typename E>
using AuxLoad = fusion::Sm90AuxLoad<AuxLoadDesc<E>::Stages, typename AuxLoadDesc<E>::EpilogueTile, E, StrideRow,
                                    typename AuxLoadDesc<E>::SmemLayoutAtom, typename AuxLoadDesc<E>::CopyOpS2R, kAlign>;

// acc + bias[col] in fp32, rounded to Out (a null bias broadcasts 0).
template <typename E, typename Out>
using AccPlusBias = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Out, float, kRound>, fusion::Sm90AccFetch,
                                    fusion::Sm90RowBroadcast<0, TileShape, E, float, Stride<_0, _1, int64_t>, kAlign>>;

// Leading dimension of a (rows, cols, batch) stride whose non-unit mode is the first or second.
template <class Stride>
Stride stride_ld(int64_t ld) {
  Stride s{};
  if constexpr (std::is_same_v<std::decay_t<decltype(get<0>(s))>, int64_t>) {
    get<0>(s) = ld;
  } else {
    get<1>(s) = ld;
  }
  return s;
}

// The epilogue visitor tree per (kind, activation), how FfnGemmParams fill its arguments, and
// which tensor is the main output D.
template <typename E, GemmKind kKind, Activation kAct>
struct Epilogue {  // plain: D = acc + bias
  using Callbacks = AccPlusBias<E, E>;
  static typename Callbacks::Arguments args(const FfnGemmParams& p) {
    return {{}, {static_cast<const E*>(p.bias), E(0), {}}, {}};
  }
  static void* d(const FfnGemmParams& p) { return p.C; }
  static int64_t ldd(const FfnGemmParams& p) { return p.ldc; }
};

template <typename E, Activation kAct>
struct Epilogue<E, GemmKind::kFwdAct, kAct> {  // D = a = act(z fp32); z = acc + bias stored when p.Z
  using Callbacks = fusion::Sm90EVT<fusion::Sm90Compute<ActFns<kAct>::template F, E, float, kRound>,
                                    fusion::Sm90EVT<AuxStore<E>, AccPlusBias<E, float>>>;
  static typename Callbacks::Arguments args(const FfnGemmParams& p) {
    return {{{{}, {static_cast<const E*>(p.bias), E(0), {}}, {}}, {static_cast<E*>(p.Z), stride_ld<StrideRow>(p.ldz)}},
            {}};
  }
  static void* d(const FfnGemmParams& p) { return p.act_out; }
  static int64_t ldd(const FfnGemmParams& p) { return p.ld_act; }
};

// z feeds both act and act', so a DAG; nodes in topological order:
//   0 acc, 1 z (aux load), 2 act(z) <- 1, 3 store a_d <- 2, 4 D = dz = acc * act'(z) <- (0, 1).
template <typename E, Activation kAct>
struct Epilogue<E, GemmKind::kBwdAct, kAct> {
  using Callbacks = fusion::Sm90TopologicalVisitor<
      float, cute::tuple<seq<>, seq<>, seq<1>, seq<2>, seq<0, 1>>, fusion::Sm90AccFetch, AuxLoad<E>,
      fusion::Sm90Compute<ActFns<kAct>::template F, float, float, kRound>, AuxStore<E>,
      fusion::Sm90Compute<ActFns<kAct>::template Dz, E, float, kRound>>;
  static typename Callbacks::Arguments args(const FfnGemmParams& p) {
    return {{},
            {static_cast<const E*>(p.Z), E(0), stride_ld<StrideRow>(p.ldz)},
            {},
            {static_cast<E*>(p.act_out), stride_ld<StrideRow>(p.ld_act)},
            {}};
  }
  static void* d(const FfnGemmParams& p) { return p.C; }
  static int64_t ldd(const FfnGemmParams& p) { return p.ldc; }
};

template <typename T, GemmKind kKind, Activation kAct>
struct GemmFor {
  using E = typename CutlassType<T>::type;
  using Epi = Epilogue<E, kKind, kAct>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, RowMajor, kAlign, E, RowMajor, kAlign,
      EpilogueSchedule, typename Epi::Callbacks>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, typename Layouts<kKind>::A, kAlign, E,
      typename Layouts<kKind>::B, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <typename T, GemmKind kKind, Activation kAct>
typename GemmFor<T, kKind, kAct>::Gemm::Arguments gemm_arguments(const FfnGemmParams& p,
                                                                 const cutlass::KernelHardwareInfo& hw) {
  using G = GemmFor<T, kKind, kAct>;
  using E = typename G::E;
  using Kernel = typename G::Kernel;
  return {cutlass::gemm::GemmUniversalMode::kGemm,
          {p.M, p.N, p.K, 1},
          {static_cast<const E*>(p.A), stride_ld<typename Kernel::StrideA>(p.lda), static_cast<const E*>(p.B),
           stride_ld<typename Kernel::StrideB>(p.ldb)},
          {G::Epi::args(p), nullptr, typename Kernel::StrideD{}, static_cast<E*>(G::Epi::d(p)),
           stride_ld<typename Kernel::StrideD>(G::Epi::ldd(p))},
          hw};
}

template <typename T, GemmKind kKind, Activation kAct>
cudaError_t run_ffn_gemm_sm90_(const FfnGemmParams& p, cudaStream_t stream, bool& launched) {
  using Gemm = typename GemmFor<T, kKind, kAct>::Gemm;
  launched = false;
  cutlass::KernelHardwareInfo hw;
  FASTATTN_CUDA_TRY(cudaGetDevice(&hw.device_id));
  FASTATTN_CUDA_TRY(cudaDeviceGetAttribute(&hw.sm_count, cudaDevAttrMultiProcessorCount, hw.device_id));
  const auto args = gemm_arguments<T, kKind, kAct>(p, hw);
  // Shapes TMA cannot describe (contiguous extents or strides off 8 elements) and anything
  // that would need a workspace go back to the hand-written kernel.
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess || Gemm::get_workspace_size(args) != 0) {
    return cudaSuccess;
  }
  Gemm gemm;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    cudaGetLastError();  // the hand-written kernel's launch check must not see it
    return cudaSuccess;
  }
  launched = true;
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace sm90
}  // namespace ffn
}  // namespace fastattn

#endif  // FASTATTN_HAVE_CUTLASS
