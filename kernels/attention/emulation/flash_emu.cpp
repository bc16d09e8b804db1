// CPU emulator entry points for the attention kernels (see flash_emu_ptx.h). Built by
// tests/test_cuda_attention.py with
//   g++ -std=c++17 -O2 -shared -fPIC -D_FORTIFY_SOURCE=0
//       -DFASTATTN_FLASH_PTX_HEADER='"emulation/flash_emu_ptx.h"'
//       -DFASTATTN_FLASH_PTX_SM90_HEADER='"emulation/flash_emu_ptx_sm90.h"' -I<cuda include> flash_emu.cpp
// and called through ctypes with a params struct packed from emu_param_layout().
#include <cstdio>
#include <sstream>
#include <string>

#include "../flash_bwd_kernel.cuh"
#include "../flash_fwd_kernel.cuh"
#include "../flash_fwd_sm90_kernel.cuh"
#include "../flash_params.h"

// -DFASTATTN_EMU_HEADDIM=<bucket> compiles a single head-dim bucket (a quicker build for
// experiments on the kernels); by default every bucket of HEADDIM_SWITCH is available.
#ifdef FASTATTN_EMU_HEADDIM
#define EMU_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...)                                            \
  [&] {                                                                                         \
    if (HEADDIM > FASTATTN_EMU_HEADDIM) throw std::runtime_error("head dim not built in this emulator"); \
    constexpr static int CONST_NAME = FASTATTN_EMU_HEADDIM;                                     \
    return __VA_ARGS__();                                                                       \
  }()
#else
#define EMU_HEADDIM_SWITCH HEADDIM_SWITCH
#endif

namespace fastattn {
namespace flash {
namespace {

// mode: bit 0 = cp.async copies deferred to wait_group (else performed at issue); bits 1-2 =
// emu::Schedule (lockstep warps, lowest warp first, highest warp first).
template <typename Body>
void emu_launch(unsigned gx, unsigned gy, unsigned gz, int threads, int smem_bytes, int mode, Body body) {
  static emu::Cta cta;
  cta.n_threads = threads;
  cta.smem.assign(static_cast<size_t>(smem_bytes), 0);
  cta.deferred_copies = (mode & 1) != 0;
  cta.schedule = static_cast<emu::Schedule>((mode >> 1) & 3);
  cta.body = [](void* arg) { (*static_cast<Body*>(arg))(); };
  cta.body_arg = &body;
  for (unsigned z = 0; z < gz; ++z) {
    for (unsigned y = 0; y < gy; ++y) {
      for (unsigned x = 0; x < gx; ++x) {
        cta.block_idx = emu::Dim3{x, y, z};
        emu::run_block(cta);
      }
    }
  }
}

template <typename Tr>
void emu_fwd(const FlashFwdParams& params, int mode) {
  emu_launch((params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, params.nheads, params.batch, Tr::kNThreads,
             Tr::kSmemBytes, mode, [&] { flash_fwd_kernel<Tr>(params); });
}

template <typename Tr>
void emu_fwd_sm90(const FlashFwdParams& params, int mode) {
  emu_launch((params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, params.nheads, params.batch, Tr::kNThreads,
             Tr::kSmemBytes, mode, [&] { flash_fwd_sm90_kernel<Tr>(params); });
}

template <typename T, int kHeadDim, bool kIsDropout>
void emu_bwd(const FlashBwdParams& params, int mode) {
  const int64_t rows = static_cast<int64_t>(params.batch) * params.seqlen_q * params.nheads;
  emu_launch(static_cast<unsigned>((rows + kPreprocessWarps - 1) / kPreprocessWarps), 1, 1, kPreprocessWarps * 32, 0,
             mode, [&] { flash_bwd_preprocess_kernel<T>(params); });
  auto dkdv = [&](auto traits) {
    using Tr = decltype(traits);
    static_assert(Tr::kBlockN == bwd_dkdv_block_n(Tr::kHeadDim), "bwd_num_splits assumes this key block");
    emu_launch((params.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, params.nheads_kv * params.num_splits, params.batch,
               Tr::kNThreads, Tr::kSmemBytes, mode, [&] { flash_bwd_dkdv_kernel<Tr>(params); });
  };
  if (params.deterministic) {
    dkdv(BwdDkdvTraitsFor<T, kHeadDim, kIsDropout, false>{});
    using Tr = BwdDqTraitsFor<T, kHeadDim, kIsDropout>;
    emu_launch((params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, params.nheads, params.batch, Tr::kNThreads,
               Tr::kSmemBytes, mode, [&] { flash_bwd_dq_kernel<Tr>(params); });
  } else {
    dkdv(BwdDkdvTraitsFor<T, kHeadDim, kIsDropout, true>{});
  }
  if (params.num_splits > 1) {
    emu_launch(reduce_dkdv_blocks(params), 1, 1, kReduceThreads, 0, mode,
               [&] { flash_bwd_reduce_dkdv_kernel<T>(params); });
  }
}

int report(const std::exception& err, char* msg, int msg_len) {
  std::snprintf(msg, static_cast<size_t>(msg_len), "%s", err.what());
  return 1;
}

template <typename S, typename F>
void field(std::ostringstream& out, const S& s, const F& f, const char* name, const char* fmt) {
  out << name << ':' << (reinterpret_cast<const char*>(&f) - reinterpret_cast<const char*>(&s)) << ':' << fmt << ',';
}

template <typename S>
void common_fields(std::ostringstream& o, const S& s) {
  field(o, s, s.q, "q", "P");
  field(o, s, s.k, "k", "P");
  field(o, s, s.v, "v", "P");
  field(o, s, s.q_batch_stride, "q_batch_stride", "q");
  field(o, s, s.q_row_stride, "q_row_stride", "q");
  field(o, s, s.q_head_stride, "q_head_stride", "q");
  field(o, s, s.k_batch_stride, "k_batch_stride", "q");
  field(o, s, s.k_row_stride, "k_row_stride", "q");
  field(o, s, s.k_head_stride, "k_head_stride", "q");
  field(o, s, s.v_batch_stride, "v_batch_stride", "q");
  field(o, s, s.v_row_stride, "v_row_stride", "q");
  field(o, s, s.v_head_stride, "v_head_stride", "q");
  field(o, s, s.key_padding_mask, "key_padding_mask", "P");
  field(o, s, s.kpm_batch_stride, "kpm_batch_stride", "q");
  field(o, s, s.kpm_col_stride, "kpm_col_stride", "q");
  field(o, s, s.attn_mask, "attn_mask", "P");
  field(o, s, s.attn_mask_kind, "attn_mask_kind", "i");
  field(o, s, s.mask_batch_stride, "mask_batch_stride", "q");
  field(o, s, s.mask_head_stride, "mask_head_stride", "q");
  field(o, s, s.mask_row_stride, "mask_row_stride", "q");
  field(o, s, s.mask_col_stride, "mask_col_stride", "q");
  field(o, s, s.batch, "batch", "i");
  field(o, s, s.nheads, "nheads", "i");
  field(o, s, s.nheads_kv, "nheads_kv", "i");
  field(o, s, s.seqlen_q, "seqlen_q", "i");
  field(o, s, s.seqlen_k, "seqlen_k", "i");
  field(o, s, s.head_dim, "head_dim", "i");
  field(o, s, s.softmax_scale, "softmax_scale", "f");
  field(o, s, s.scale_log2, "scale_log2", "f");
  field(o, s, s.is_causal, "is_causal", "?");
  field(o, s, s.causal_shift, "causal_shift", "i");
  field(o, s, s.window_left, "window_left", "i");
  field(o, s, s.window_right, "window_right", "i");
  field(o, s, s.softcap_raw, "softcap_raw", "f");
  field(o, s, s.softcap_scale, "softcap_scale", "f");
  field(o, s, s.alibi_slopes, "alibi_slopes", "P");
  field(o, s, s.alibi_batch_stride, "alibi_batch_stride", "q");
  field(o, s, s.is_dropout, "is_dropout", "?");
  field(o, s, s.dropout_threshold, "dropout_threshold", "I");
  field(o, s, s.rp_dropout, "rp_dropout", "f");
  field(o, s, s.seed, "seed", "Q");
  field(o, s, s.offset, "offset", "Q");
  field(o, s, s.dtype, "dtype", "i");
}

}  // namespace
}  // namespace flash
}  // namespace fastattn

using fastattn::flash::FlashBwdParams;
using fastattn::flash::FlashFwdParams;

extern "C" {

// "fwd=<size>;name:offset:struct-format,...|bwd=<size>;..." for packing the params from Python.
const char* emu_param_layout() {
  static std::string text;
  if (text.empty()) {
    std::ostringstream o;
    FlashFwdParams f{};
    o << "fwd=" << sizeof(FlashFwdParams) << ';';
    fastattn::flash::common_fields(o, f);
    fastattn::flash::field(o, f, f.out, "out", "P");
    fastattn::flash::field(o, f, f.o_batch_stride, "o_batch_stride", "q");
    fastattn::flash::field(o, f, f.o_row_stride, "o_row_stride", "q");
    fastattn::flash::field(o, f, f.o_head_stride, "o_head_stride", "q");
    fastattn::flash::field(o, f, f.lse, "lse", "P");
    FlashBwdParams b{};
    o << "|bwd=" << sizeof(FlashBwdParams) << ';';
    fastattn::flash::common_fields(o, b);
    const char* ptrs[] = {"out", "dout", "lse", "delta", "dq_accum", "dq", "dk", "dv", "dk_accum", "dv_accum"};
    const void* addrs[] = {&b.out, &b.dout, &b.lse, &b.delta, &b.dq_accum,
                           &b.dq, &b.dk, &b.dv, &b.dk_accum, &b.dv_accum};
    for (int i = 0; i < 10; ++i) {
      o << ptrs[i] << ':' << (static_cast<const char*>(addrs[i]) - reinterpret_cast<const char*>(&b)) << ":P,";
    }
    const char* strides[] = {"o", "do", "dq", "dk", "dv"};
    const int64_t* bases[] = {&b.o_batch_stride, &b.do_batch_stride, &b.dq_batch_stride, &b.dk_batch_stride,
                              &b.dv_batch_stride};
    for (int i = 0; i < 5; ++i) {
      const char* names[] = {"_batch_stride", "_row_stride", "_head_stride"};
      for (int j = 0; j < 3; ++j) {
        o << strides[i] << names[j] << ':'
          << (reinterpret_cast<const char*>(bases[i] + j) - reinterpret_cast<const char*>(&b)) << ":q,";
      }
    }
    fastattn::flash::field(o, b, b.deterministic, "deterministic", "?");
    fastattn::flash::field(o, b, b.num_sms, "num_sms", "i");
    fastattn::flash::field(o, b, b.num_splits, "num_splits", "i");
    text = o.str();
  }
  return text.c_str();
}

// "kernel=<threads>:<dynamic smem bytes>;..." for every kernel configuration the launchers can
// pick (shared-memory budget checks without compiling CUDA).
const char* emu_kernel_configs() {
  static std::string text;
  if (text.empty()) {
    std::ostringstream o;
    auto add = [&](const char* kind, int head_dim, bool bf16, bool dropout, int threads, int smem) {
      o << kind << "_d" << head_dim << (bf16 ? "_bf16" : "_fp16") << (dropout ? "_dropout" : "") << '=' << threads
        << ':' << smem << ';';
    };
    for (int dtype = 0; dtype < 2; ++dtype) {
#ifdef FASTATTN_EMU_HEADDIM
      for (int head_dim : {FASTATTN_EMU_HEADDIM}) {
#else
      for (int head_dim : {32, 64, 96, 128, 192, 256}) {
#endif
        for (int dropout = 0; dropout < 2; ++dropout) {
          HALF_SWITCH(dtype == 1, T, [&] {
            EMU_HEADDIM_SWITCH(head_dim, kD, [&] {
              BOOL_SWITCH(dropout == 1, kDrop, [&] {
                using namespace fastattn::flash;
                using Fwd = FwdTraitsFor<T, kD, kDrop>;
                using DkdvAtomic = BwdDkdvTraitsFor<T, kD, kDrop, true>;
                using Dkdv = BwdDkdvTraitsFor<T, kD, kDrop, false>;
                using Dq = BwdDqTraitsFor<T, kD, kDrop>;
                add("fwd", kD, dtype == 1, kDrop, Fwd::kNThreads, Fwd::kSmemBytes);
                add("bwd_dkdv_dq_atomic", kD, dtype == 1, kDrop, DkdvAtomic::kNThreads, DkdvAtomic::kSmemBytes);
                add("bwd_dkdv", kD, dtype == 1, kDrop, Dkdv::kNThreads, Dkdv::kSmemBytes);
                add("bwd_dq", kD, dtype == 1, kDrop, Dq::kNThreads, Dq::kSmemBytes);
              });
            });
          });
        }
      }
    }
    for (int dtype = 0; dtype < 2; ++dtype) {
      HALF_SWITCH(dtype == 1, T, [&] {
        using namespace fastattn::flash;
        using Tr64 = FwdSm90TraitsFor<T, 64>;
        using Tr128 = FwdSm90TraitsFor<T, 128>;
        using Tr256 = FwdSm90TraitsFor<T, 256>;
        add("fwd_sm90", 64, dtype == 1, false, Tr64::kNThreads, Tr64::kSmemBytes);
        add("fwd_sm90", 128, dtype == 1, false, Tr128::kNThreads, Tr128::kSmemBytes);
        add("fwd_sm90", 256, dtype == 1, false, Tr256::kNThreads, Tr256::kSmemBytes);
      });
    }
    text = o.str();
  }
  return text.c_str();
}

// mode: see emu_launch. 0 on success, else 1 with the failure in msg.
int emu_flash_fwd(const void* params_ptr, int mode, char* msg, int msg_len) {
  const FlashFwdParams& params = *static_cast<const FlashFwdParams*>(params_ptr);
  try {
    HALF_SWITCH(params.dtype == fastattn::DType::kBFloat16, T, [&] {
      EMU_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
        BOOL_SWITCH(params.is_dropout, kIsDropout, [&] {
          fastattn::flash::emu_fwd<fastattn::flash::FwdTraitsFor<T, kHeadDim, kIsDropout>>(params, mode);
        });
      });
    });
  } catch (const std::exception& err) {
    return fastattn::flash::report(err, msg, msg_len);
  }
  return 0;
}

// The sm_90a wgmma forward (no dropout, window, softcap or ALiBi: the dispatcher's rule).
int emu_flash_fwd_sm90(const void* params_ptr, int mode, char* msg, int msg_len) {
  const FlashFwdParams& params = *static_cast<const FlashFwdParams*>(params_ptr);
  try {
    if (params.is_dropout) throw std::runtime_error("dropout is not served by the sm90 kernel");
    if (params.has_window() || params.has_softcap() || params.alibi_slopes != nullptr) {
      throw std::runtime_error("window, softcap and ALiBi are not served by the sm90 kernel");
    }
    HALF_SWITCH(params.dtype == fastattn::DType::kBFloat16, T, [&] {
      using namespace fastattn::flash;
      if (params.head_dim <= 64) {
        emu_fwd_sm90<FwdSm90TraitsFor<T, 64>>(params, mode);
      } else if (params.head_dim <= 128) {
        emu_fwd_sm90<FwdSm90TraitsFor<T, 128>>(params, mode);
      } else {
        emu_fwd_sm90<FwdSm90TraitsFor<T, 256>>(params, mode);
      }
    });
  } catch (const std::exception& err) {
    return fastattn::flash::report(err, msg, msg_len);
  }
  return 0;
}

// The dK/dV split count the host would pick for these params (csrc/attention.cpp sizes the
// dk_accum / dv_accum workspace with it).
int emu_bwd_num_splits(const void* params_ptr) {
  return fastattn::flash::bwd_num_splits(*static_cast<const FlashBwdParams*>(params_ptr));
}

int emu_flash_bwd(const void* params_ptr, int mode, char* msg, int msg_len) {
  const FlashBwdParams& params = *static_cast<const FlashBwdParams*>(params_ptr);
  try {
    HALF_SWITCH(params.dtype == fastattn::DType::kBFloat16, T, [&] {
      EMU_HEADDIM_SWITCH(params.head_dim, kHeadDim, [&] {
        BOOL_SWITCH(params.is_dropout, kIsDropout, [&] {
          fastattn::flash::emu_bwd<T, kHeadDim, kIsDropout>(params, mode);
        });
      });
    });
  } catch (const std::exception& err) {
    return fastattn::flash::report(err, msg, msg_len);
  }
  return 0;
}

}  // extern "C"
