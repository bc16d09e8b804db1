"""CUDA FlashAttention (fastattn.cuda.attention, kernels/attention/) against the float64
reference.

Two ways to run the same kernel code:

- On a GPU (``requires_cuda``): the real extension through the backend primitives, the public
  API and ``torch.library.opcheck``.
- Anywhere with g++ and the CUDA headers: the unmodified kernel templates compiled for the CPU
  with kernels/attention/emulation/flash_emu_ptx.h standing in for the PTX primitives (every
  CUDA thread a fiber; ldmatrix / mma / shfl emulated per the PTX ISA fragment layouts; a
  divergent warp collective is an error; cp.async copies at issue or only at wait_group;
  warps in lockstep or one running ahead; shared memory starts as NaN). This checks the
  indexing, masking, softmax, pipelining and synchronisation of the kernels, not the
  hardware. The params are packed here the way csrc/attention.cpp fills them. The sm_90a
  wgmma forward runs the same way on emulation/flash_emu_ptx_sm90.h (wgmma executed at
  wait_group, operands read through descriptors and the swizzle), and
  emulation/sm90_layout_check.cpp cross-checks its layouts and descriptors against CuTe.

Tolerance: tests/helpers.py (kernel error vs the float64 reference <= 2 x the error of plain
PyTorch attention in the same dtype, + atol). Dropout: the reference is given the kernels' keep
mask (fastattn.cuda.attention.dropout_mask, the Python mirror of kernels/common/philox.cuh), so
a wrong mask fails. Every case also checks that rows which see no key give output 0, lse -inf
and zero dQ, and that nothing is NaN. Compile checks (sm_80 / sm_90, spills, HMMA) live in
tests/test_cuda_build.py and ``fastattn build --check-cuda``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

import fastattn
from fastattn import _build
from fastattn.cuda import attention as cattn
from fastattn.options import AttentionInputs, AttentionOptions, RngState
from fastattn.reference import attention as reference
from helpers import assert_close_to_reference
from attention_cases import AttentionCase, baseline as _shared_baseline, make_inputs as _make_inputs, to64 as _to64
from conftest import requires_cuda

ATTENTION_DIR = _build.KERNELS_DIR / "attention"
EMU_SOURCE = ATTENTION_DIR / "emulation" / "flash_emu.cpp"
SM80_MAX_SMEM = 166912  # opt-in dynamic shared memory per block on sm_80
SM90_MAX_SMEM = 232448  # same on sm_90 (the wgmma forward kernel runs only there)


# --------------------------------------------------------------------------------------------
# Cases, inputs, plain-PyTorch baseline, the shared check
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case(AttentionCase):
    heads_kv: int = 1
    seqlen_q: int = 70
    seqlen_k: int = 133
    packed: bool = False  # q, k, v are strided views of one packed (B, L, 3, H, D) tensor
    window: tuple = (-1, -1)  # flash-attn's window_size (left, right), -1 = unbounded
    softcap: float = 0.0
    alibi: Optional[str] = None  # slopes "h" (H,) or "bh" (B, H)

    def _flags(self) -> tuple:
        return super()._flags() + (
            ("packed", self.packed), (f"win{self.window[0]}_{self.window[1]}", self.window != (-1, -1)),
            (f"cap{self.softcap}", self.softcap > 0), (f"alibi-{self.alibi}", self.alibi is not None))


def make_inputs(case: Case, device: str):
    """The shared builder with forced dead rows: kpm batch 0, one all-False bool-mask row, one
    fully -inf float-mask row; plus the case's window (causal sets right to 0, as the public
    function does), softcap and ALiBi slopes."""
    inputs, options, rng = _make_inputs(case, device, dead_rows=True)
    slopes = None
    if case.alibi is not None:
        shape = (case.heads,) if case.alibi == "h" else (case.batch, case.heads)
        slopes = torch.rand(shape, device=device) * 0.5 + 0.05
    inputs = dataclasses.replace(inputs, alibi_slopes=slopes)
    options = dataclasses.replace(options, window_left=case.window[0],
                                  window_right=0 if case.causal else case.window[1], softcap=case.softcap)
    return inputs, options, rng


def _baseline(inputs: AttentionInputs, options: AttentionOptions, keep: Optional[torch.Tensor], dout: torch.Tensor):
    """Plain PyTorch attention in the inputs' dtype: out and (dq, dk, dv)."""
    out, _lse, grads = _shared_baseline(inputs, options, keep, dout)
    return out, grads


# runner(inputs, options, rng, dout) -> (out, lse, (dq, dk, dv))
Runner = Callable[..., tuple]


def check_case(runner: Runner, inputs: AttentionInputs, options: AttentionOptions, rng, expect_dead_rows=False):
    dout = torch.randn(inputs.q.shape, device=inputs.device, dtype=inputs.dtype)
    out, lse, (dq, dk, dv) = runner(inputs, options, rng, dout)
    keep = cattn.dropout_mask(inputs, options, rng)
    inputs64 = _to64(inputs)
    out64, lse64 = reference.forward(inputs64, options, rng, dropout_mask=keep)
    grads64 = reference.backward(dout.double(), out64, lse64, inputs64, options, rng, dropout_mask=keep)
    base_out, base_grads = _baseline(inputs, options, keep, dout)

    assert out.dtype == inputs.dtype and out.shape == inputs.q.shape
    assert lse.dtype == torch.float32 and lse.shape == (inputs.batch, inputs.nheads, inputs.seqlen_q)
    assert_close_to_reference(out, out64, base_out, "out")
    dead = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), dead), "lse is -inf exactly on the rows that see no key"
    assert not torch.isnan(lse).any()
    live = ~dead
    if live.any():
        assert (lse[live].double() - lse64[live]).abs().max().item() < 2e-3, "lse"
    if expect_dead_rows:
        assert dead.any(), "the case was meant to have rows that see no key"
    for name, grad, grad64, base in zip(("dq", "dk", "dv"), (dq, dk, dv), grads64, base_grads):
        assert grad.dtype == inputs.dtype
        assert_close_to_reference(grad, grad64, base, name)
    dead_rows = dead.transpose(1, 2)  # (B, Lq, H)
    assert (out[dead_rows] == 0).all() and (dq[dead_rows] == 0).all(), "dead rows: out and dq must be 0"


# The case grid: one axis at a time around a small base case, then a few combinations.
EMU_CASES = [
    Case(),
    Case(dtype=torch.bfloat16),
    Case(head_dim=32, dtype=torch.bfloat16),
    Case(head_dim=36),  # not a multiple of 8: zero-padded to 40, served by the 64 kernel
    Case(head_dim=96, seqlen_q=45, seqlen_k=80),
    Case(head_dim=128, seqlen_q=45, seqlen_k=80, dtype=torch.bfloat16),
    Case(head_dim=192, seqlen_q=33, seqlen_k=70),
    Case(head_dim=256, seqlen_q=33, seqlen_k=70, dtype=torch.bfloat16),
    Case(seqlen_q=133, seqlen_k=70, causal=True),  # bottom-right, Lq > Lk: dead rows
    Case(causal=True, alignment="top_left", dtype=torch.bfloat16),
    Case(batch=2, kpm=True),
    Case(mask="bool", seqlen_q=40, seqlen_k=150),
    Case(mask="float", seqlen_q=40, seqlen_k=150),
    Case(mask="float32", seqlen_q=40, seqlen_k=150, dtype=torch.bfloat16, heads=4, heads_kv=2),
    Case(dropout_p=0.25, seqlen_q=80, seqlen_k=90),
    Case(dropout_p=0.125, causal=True, head_dim=128, seqlen_q=45, seqlen_k=80, dtype=torch.bfloat16),
    Case(deterministic=True, heads=4, heads_kv=2, causal=True),
    Case(deterministic=True, dropout_p=0.25, kpm=True, batch=2, head_dim=256, seqlen_q=33, seqlen_k=70),
    Case(heads=4, heads_kv=1, seqlen_q=1, seqlen_k=1),
    Case(packed=True, heads=2, heads_kv=2, seqlen_q=65, seqlen_k=65, causal=True),
]


def _has_dead_rows(case: Case) -> bool:
    return (case.causal and case.alignment == "bottom_right" and case.seqlen_q > case.seqlen_k) or case.kpm or (
        case.mask is not None)


# --------------------------------------------------------------------------------------------
# CPU emulation of the kernels
# --------------------------------------------------------------------------------------------
def _cuda_include_dir() -> Optional[str]:
    candidates = list(_build.cuda_toolkit_dirs()[0])
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is not None:
        candidates.append(str(Path(cpp_extension.CUDA_HOME) / "include"))
    for directory in candidates:
        if (Path(directory) / "cuda_fp16.h").exists():
            return directory
    return None


EMU_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",
             '-DFASTATTN_FLASH_PTX_HEADER="emulation/flash_emu_ptx.h"',
             '-DFASTATTN_FLASH_PTX_SM90_HEADER="emulation/flash_emu_ptx_sm90.h"')


def _dropout_threshold(p: float) -> int:
    scaled = float(torch.tensor(p, dtype=torch.float32)) * 4294967296.0  # the host rounds p to float
    return 0 if scaled <= 0 else 0xFFFFFFFF if scaled >= 4294967295.0 else int(scaled + 0.5)


class Emulator:
    """ctypes front of flash_emu.cpp; packs the params the way csrc/attention.cpp fills them."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.emu_param_layout.restype = ctypes.c_char_p
        self.lib.emu_kernel_configs.restype = ctypes.c_char_p
        for fn in (self.lib.emu_flash_fwd, self.lib.emu_flash_fwd_sm90, self.lib.emu_flash_bwd):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            fn.restype = ctypes.c_int
        self.lib.emu_bwd_num_splits.argtypes = [ctypes.c_void_p]
        self.lib.emu_bwd_num_splits.restype = ctypes.c_int
        self.layout = {}
        for section in self.lib.emu_param_layout().decode().split("|"):
            head, body = section.split(";", 1)
            name, size = head.split("=")
            fields = {}
            for item in body.strip(",").split(","):
                field, offset, fmt = item.split(":")
                fields[field] = (int(offset), fmt)
            self.layout[name] = (int(size), fields)
        self.mode = 0
        # The device's SM count as the host passes it (FlashBwdParams::num_sms): 1 keeps the
        # dK/dV kernel unsplit, a GPU-like count lets bwd_num_splits split MQA / GQA groups.
        self.num_sms = 1
        self.last_num_splits = None

    def kernel_configs(self) -> dict[str, tuple[int, int]]:
        configs = {}
        for item in self.lib.emu_kernel_configs().decode().strip(";").split(";"):
            name, value = item.split("=")
            threads, smem = value.split(":")
            configs[name] = (int(threads), int(smem))
        return configs

    def _pack(self, kind: str, values: dict):
        size, fields = self.layout[kind]
        assert set(fields) == set(values), set(fields) ^ set(values)
        buf = bytearray(size)
        for name, value in values.items():
            offset, fmt = fields[name]
            struct.pack_into("<" + ("Q" if fmt == "P" else fmt), buf, offset, value)
        return ctypes.create_string_buffer(bytes(buf), size)

    def _call(self, fn, kind: str, values: dict) -> None:
        params = self._pack(kind, values)
        msg = ctypes.create_string_buffer(4096)
        if fn(ctypes.cast(params, ctypes.c_void_p), self.mode, msg, 4096) != 0:
            raise AssertionError(f"emulated kernel failed: {msg.value.decode()}")

    @staticmethod
    def _operand(t: torch.Tensor, padded: int) -> torch.Tensor:
        # csrc/attention.cpp kernel_operand: pad the head dim to a multiple of 8, 16-byte access.
        if t.shape[3] != padded:
            t = torch.nn.functional.pad(t, (0, padded - t.shape[3]))
        aligned = t.stride(3) == 1 and t.data_ptr() % 16 == 0
        aligned = aligned and all(t.stride(i) % 8 == 0 or t.shape[i] == 1 for i in range(3))
        return t if aligned else t.contiguous()

    @staticmethod
    def _extras(q, k, inputs: AttentionInputs, options: AttentionOptions) -> dict:
        # csrc/attention.cpp set_extras: causal is the right edge 0, a side as long as both
        # sequences is unbounded, softcap in raw-score units, (H,) slopes with batch stride 0.
        longest = max(q.shape[1], k.shape[1])
        slopes, cap, scale = inputs.alibi_slopes, options.softcap, options.softmax_scale
        return dict(
            window_left=-1 if options.window_left >= longest else options.window_left,
            window_right=0 if options.causal else -1 if options.window_right >= longest else options.window_right,
            softcap_raw=cap / scale if cap > 0 else 0.0, softcap_scale=scale / cap if cap > 0 else 0.0,
            alibi_slopes=0 if slopes is None else slopes.data_ptr(),
            alibi_batch_stride=0 if slopes is None or slopes.dim() == 1 else slopes.stride(0),
        )

    @classmethod
    def _common(cls, q, k, v, inputs: AttentionInputs, options: AttentionOptions, rng) -> dict:
        kpm, mask = inputs.key_padding_mask, inputs.attn_mask
        mask_kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2 if mask.dtype == q.dtype else 3
        p = options.dropout_p
        return dict(
            **cls._extras(q, k, inputs, options),
            q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
            q_batch_stride=q.stride(0), q_row_stride=q.stride(1), q_head_stride=q.stride(2),
            k_batch_stride=k.stride(0), k_row_stride=k.stride(1), k_head_stride=k.stride(2),
            v_batch_stride=v.stride(0), v_row_stride=v.stride(1), v_head_stride=v.stride(2),
            key_padding_mask=0 if kpm is None else kpm.data_ptr(),
            kpm_batch_stride=0 if kpm is None else kpm.stride(0),
            kpm_col_stride=0 if kpm is None else kpm.stride(1),
            attn_mask=0 if mask is None else mask.data_ptr(), attn_mask_kind=mask_kind,
            mask_batch_stride=0 if mask is None else mask.stride(0),
            mask_head_stride=0 if mask is None else mask.stride(1),
            mask_row_stride=0 if mask is None else mask.stride(2),
            mask_col_stride=0 if mask is None else mask.stride(3),
            batch=q.shape[0], nheads=q.shape[2], nheads_kv=k.shape[2], seqlen_q=q.shape[1], seqlen_k=k.shape[1],
            head_dim=q.shape[3], softmax_scale=options.softmax_scale,
            scale_log2=options.softmax_scale * math.log2(math.e), is_causal=options.causal,
            causal_shift=0 if options.causal_alignment == "top_left" else k.shape[1] - q.shape[1],
            is_dropout=p > 0, dropout_threshold=_dropout_threshold(p), rp_dropout=1.0 / (1.0 - p),
            seed=rng.seed if rng else 0, offset=rng.offset if rng else 0,
            dtype=0 if q.dtype == torch.float16 else 1,
        )

    def forward(self, inputs: AttentionInputs, options: AttentionOptions, rng, sm90: bool = False):
        """Padded q, k, v, out and lse of the mma.sync forward kernel, or of the sm_90a wgmma one."""
        padded = (inputs.head_dim + 7) // 8 * 8
        q, k, v = (self._operand(t, padded) for t in (inputs.q, inputs.k, inputs.v))
        b, lq, h, _ = q.shape
        out = torch.full((b, lq, h, padded), float("nan"), dtype=q.dtype)
        lse = torch.full((b, h, lq), float("nan"))
        values = self._common(q, k, v, inputs, options, rng)
        values.update(out=out.data_ptr(), o_batch_stride=out.stride(0), o_row_stride=out.stride(1),
                      o_head_stride=out.stride(2), lse=lse.data_ptr())
        self._call(self.lib.emu_flash_fwd_sm90 if sm90 else self.lib.emu_flash_fwd, "fwd", values)
        return q, k, v, out, lse

    def run(self, inputs: AttentionInputs, options: AttentionOptions, rng, dout: torch.Tensor, sm90: bool = False):
        d = inputs.head_dim
        padded = (d + 7) // 8 * 8
        q, k, v, out, lse = self.forward(inputs, options, rng, sm90)
        b, lq, h, _ = q.shape

        dout_k = self._operand(dout, padded)
        delta = torch.full((b, h, lq), float("nan"))
        dq_accum = torch.zeros((b, lq, h, padded))
        dq = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
        dk = torch.full(k.shape, float("nan"), dtype=k.dtype)
        dv = torch.full(v.shape, float("nan"), dtype=v.dtype)
        values = self._common(q, k, v, inputs, options, rng)
        values.update(
            out=out.data_ptr(), dout=dout_k.data_ptr(), lse=lse.data_ptr(), delta=delta.data_ptr(),
            dq_accum=dq_accum.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(),
            deterministic=options.deterministic, num_sms=self.num_sms, num_splits=1, dk_accum=0, dv_accum=0,
        )
        for name, t in (("o", out), ("do", dout_k), ("dq", dq), ("dk", dk), ("dv", dv)):
            values.update({f"{name}_batch_stride": t.stride(0), f"{name}_row_stride": t.stride(1),
                           f"{name}_head_stride": t.stride(2)})
        # As csrc/attention.cpp: the split count from bwd_num_splits, the partials' workspace
        # only when splitting (NaN here: an element no split CTA writes would show).
        splits = self.lib.emu_bwd_num_splits(ctypes.cast(self._pack("bwd", values), ctypes.c_void_p))
        self.last_num_splits = splits
        if splits > 1:
            dkv_accum = torch.full((2, splits, *k.shape), float("nan"))
            values.update(num_splits=splits, dk_accum=dkv_accum[0].data_ptr(), dv_accum=dkv_accum[1].data_ptr())
        self._call(self.lib.emu_flash_bwd, "bwd", values)
        if not options.deterministic:
            dq = (dq_accum * options.softmax_scale).to(q.dtype)
        unpad = (lambda t: t[..., :d]) if padded != d else (lambda t: t)
        return unpad(out), lse, (unpad(dq), unpad(dk), unpad(dv))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> Emulator:
    gxx = shutil.which("g++")
    include = _cuda_include_dir()
    if gxx is None or include is None:
        pytest.skip("the kernel emulation needs g++ and the CUDA headers (cuda_fp16.h)")
    if sys.platform != "linux":
        pytest.skip("the kernel emulation uses glibc ucontext fibers")
    library = tmp_path_factory.mktemp("flash_emu") / "libflash_emu.so"
    cmd = [gxx, *EMU_FLAGS, f"-I{include}", str(EMU_SOURCE), "-o", str(library)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Emulator(library)


def _emulated(emulator: Emulator, mode: int, sm90: bool = False) -> Runner:
    def run(inputs, options, rng, dout):
        emulator.mode = mode
        return emulator.run(inputs, options, rng, dout, sm90=sm90)

    return run


@pytest.mark.parametrize("index", range(len(EMU_CASES)), ids=[str(c) for c in EMU_CASES])
def test_emulated_kernels_match_reference(emulator, index):
    case = EMU_CASES[index]
    inputs, options, rng = make_inputs(case, "cpu")
    # Each case under one of the six emulation modes (cp.async at issue / at wait x lockstep /
    # lowest warp first / highest warp first), so all modes run over the grid.
    check_case(_emulated(emulator, index % 6), inputs, options, rng, expect_dead_rows=_has_dead_rows(case))


# flash-attn 2 extras (issue 12) on the mma.sync kernels: each flag alone, then combined with
# causal, GQA / MQA, masks, dropout, both dQ paths, large head dims and odd lengths. The windows
# are narrow next to the lengths so key / query blocks are skipped on both sides.
EXTRA_CASES = [
    Case(window=(20, 10), seqlen_q=300, seqlen_k=300),
    Case(window=(0, -1), seqlen_q=113, seqlen_k=203),
    Case(window=(-1, 0), alignment="top_left", dtype=torch.bfloat16),  # causal spelled as a window
    Case(window=(40, -1), causal=True, heads=4, heads_kv=2, seqlen_q=203, seqlen_k=300, deterministic=True),
    Case(window=(3, 2), alignment="top_left", seqlen_q=131, seqlen_k=77),  # rows past Lk + 3: dead
    Case(window=(16, 0), seqlen_q=1, seqlen_k=203, alibi="h"),  # one decoding query
    Case(softcap=5.0),
    Case(softcap=2.0, causal=True, head_dim=128, seqlen_q=45, seqlen_k=80, dtype=torch.bfloat16),
    Case(alibi="h", heads=4, heads_kv=1),
    Case(alibi="bh", batch=2, causal=True, alignment="top_left", dtype=torch.bfloat16, deterministic=True),
    Case(alibi="h", softcap=10.0, window=(30, 10), kpm=True, mask="float32", dropout_p=0.125, batch=2,
         seqlen_q=113, seqlen_k=203),
    Case(head_dim=40, softcap=3.0, alibi="bh", window=(7, 7), heads=4, heads_kv=2, seqlen_q=7, seqlen_k=7),
    Case(head_dim=192, softcap=8.0, window=(20, 0), alibi="bh", batch=2, seqlen_q=33, seqlen_k=70,
         deterministic=True, dtype=torch.bfloat16),
    Case(head_dim=96, softcap=6.0, window=(33, 20), seqlen_q=150, seqlen_k=203, dtype=torch.bfloat16),  # 48-key blocks
]


def _extra_has_dead_rows(case: Case) -> bool:
    return _has_dead_rows(case) or (case.window == (3, 2) and case.alignment == "top_left")


@pytest.mark.parametrize("index", range(len(EXTRA_CASES)), ids=[str(c) for c in EXTRA_CASES])
def test_emulated_window_softcap_alibi_match_reference(emulator, index):
    case = EXTRA_CASES[index]
    inputs, options, rng = make_inputs(case, "cpu")
    check_case(_emulated(emulator, (index + 1) % 6), inputs, options, rng, expect_dead_rows=_extra_has_dead_rows(case))


def test_emulated_sm90_refuses_window_softcap_alibi(emulator):
    """The wgmma forward has none of the extras; fwd_uses_sm90 routes them to mma.sync, and the
    emulated entry point refuses them like the dispatcher does."""
    for case in (Case(window=(8, 8)), Case(softcap=4.0), Case(alibi="h")):
        inputs, options, rng = make_inputs(case, "cpu")
        with pytest.raises(AssertionError, match="not served by the sm90 kernel"):
            emulator.forward(inputs, options, rng, sm90=True)


def test_emulated_deterministic_matches_atomic_dq(emulator):
    case = Case(batch=2, heads=4, heads_kv=2, kpm=True, causal=True, seqlen_q=70, seqlen_k=90)
    inputs, options, rng = make_inputs(case, "cpu")
    dout = torch.randn(inputs.q.shape, dtype=inputs.dtype)
    det = dataclasses.replace(options, deterministic=True)
    _, _, grads = _emulated(emulator, 0)(inputs, options, rng, dout)
    _, _, grads_det = _emulated(emulator, 3)(inputs, det, rng, dout)
    assert torch.equal(grads[1], grads_det[1]) and torch.equal(grads[2], grads_det[2]), "dK/dV share one kernel"
    err = (grads[0].float() - grads_det[0].float()).abs().max().item()
    assert err <= 2e-3 * max(1.0, grads_det[0].float().abs().max().item()), f"dq paths differ by {err}"


# dK/dV with the query heads of a GQA group split over CTAs (fp32 partials + reduction): the
# emulated SM count makes bwd_num_splits pick the expected split count. Uneven splits (5 heads
# in 3, 7 in 4), dead rows, dropout, masks, both dQ paths.
SPLIT_CASES = [
    (Case(heads=8, heads_kv=1, seqlen_q=77, seqlen_k=141), 132, 8),
    (Case(heads=5, heads_kv=1, seqlen_q=45, seqlen_k=99, causal=True, dropout_p=0.25, deterministic=True,
          dtype=torch.bfloat16), 3, 3),
    (Case(batch=2, heads=4, heads_kv=2, seqlen_q=33, seqlen_k=70, head_dim=192, kpm=True, dropout_p=0.125), 132, 2),
    (Case(heads=7, heads_kv=1, seqlen_q=90, seqlen_k=61, causal=True, mask="float", head_dim=128,
          dtype=torch.bfloat16, deterministic=True), 4, 4),
]


@pytest.mark.parametrize("index", range(len(SPLIT_CASES)), ids=[str(c) for c, _, _ in SPLIT_CASES])
def test_emulated_split_dkdv_matches_reference(emulator, index):
    case, num_sms, splits = SPLIT_CASES[index]
    inputs, options, rng = make_inputs(case, "cpu")
    emulator.num_sms = num_sms
    try:
        check_case(_emulated(emulator, (index + 3) % 6), inputs, options, rng, expect_dead_rows=_has_dead_rows(case))
        assert emulator.last_num_splits == splits
    finally:
        emulator.num_sms = 1


def test_emulated_split_agrees_with_unsplit_and_is_reproducible(emulator):
    case = Case(heads=8, heads_kv=2, seqlen_q=70, seqlen_k=90, dropout_p=0.25, deterministic=True)
    inputs, options, rng = make_inputs(case, "cpu")
    dout = torch.randn(inputs.q.shape, dtype=inputs.dtype)
    results = {}
    try:
        for num_sms, mode in ((1, 0), (132, 0), (132, 5)):
            emulator.num_sms = num_sms
            results[num_sms, mode] = _emulated(emulator, mode)(inputs, options, rng, dout)
            assert emulator.last_num_splits == (1 if num_sms == 1 else 4)
    finally:
        emulator.num_sms = 1
    (out, _, unsplit), (_, _, split), (_, _, split_again) = results.values()
    assert all(torch.equal(a, b) for a, b in zip(split, split_again)), "fixed split count and summation order"
    assert torch.equal(unsplit[0], split[0]), "the deterministic dQ kernel does not depend on the split"
    for name, a, b in zip(("dk", "dv"), unsplit[1:], split[1:]):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2e-3 * max(1.0, a.float().abs().max().item()), f"{name}: split and unsplit differ by {err}"


def test_bwd_num_splits_policy(emulator):
    """bwd_num_splits (flash_params.h), the rule csrc/attention.cpp applies: fewest waves x heads
    per CTA, 1 when the base grid fills the device or there is nothing to split."""
    _, fields = emulator.layout["bwd"]

    def splits(batch, heads, heads_kv, seqlen_k, head_dim, num_sms=132):
        values = dict.fromkeys(fields, 0)
        values.update(batch=batch, nheads=heads, nheads_kv=heads_kv, seqlen_q=seqlen_k, seqlen_k=seqlen_k,
                      head_dim=head_dim, num_sms=num_sms, num_splits=1)
        return emulator.lib.emu_bwd_num_splits(ctypes.cast(emulator._pack("bwd", values), ctypes.c_void_p))

    assert splits(1, 8, 1, 4096, 128) == 4  # 32 CTAs -> 128, 2 query heads each
    assert splits(1, 32, 4, 1024, 64) == 4
    assert splits(1, 8, 1, 4096, 256) == 2  # 64-key blocks: 64 CTAs -> 128
    assert splits(1, 8, 1, 100, 64, num_sms=1000) == 8  # one head per CTA
    assert splits(8, 32, 8, 4096, 128) == 1  # 2048 CTAs fill the device
    assert splits(1, 4, 4, 128, 64) == 1  # MHA: group of 1
    assert splits(1, 8, 1, 4096, 128, num_sms=0) == 1  # SM count unknown


def test_emulator_rejects_a_missing_barrier(emulator, tmp_path):
    """The emulation can fail: the forward kernel without the barrier that protects K before
    it is refilled gives wrong output once one warp runs ahead."""
    source = (ATTENTION_DIR / "flash_fwd_kernel.cuh").read_text()
    guarded = "    cp_async_wait<0>();\n    block_sync();  // V[n] landed; every warp is done reading K[n]\n"
    assert guarded in source
    mutant_dir = tmp_path / "kernels"
    shutil.copytree(_build.KERNELS_DIR, mutant_dir)
    (mutant_dir / "attention" / "flash_fwd_kernel.cuh").write_text(source.replace(guarded, "    cp_async_wait<0>();\n"))
    library = tmp_path / "libmutant.so"
    # The emulator built against the mutant tree, head-dim bucket 64 only (a quicker build).
    cmd = [shutil.which("g++"), *EMU_FLAGS, "-DFASTATTN_EMU_HEADDIM=64", f"-I{_cuda_include_dir()}",
           str(mutant_dir / "attention" / "emulation" / "flash_emu.cpp"), "-o", str(library)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mutant = Emulator(library)
    inputs, options, rng = make_inputs(Case(seqlen_q=64, seqlen_k=200, heads=1), "cpu")
    dout = torch.randn(inputs.q.shape, dtype=inputs.dtype)
    out_ok, _, _ = _emulated(emulator, 2)(inputs, options, rng, dout)
    out_bad, _, _ = _emulated(mutant, 2)(inputs, options, rng, dout)
    out64, _ = reference.forward(_to64(inputs), options, rng)
    assert (out_ok.double() - out64).abs().max().item() < 1e-2
    assert not ((out_bad.double() - out64).abs().max().item() < 1e-2), "the missing barrier went unnoticed"


def test_kernel_configurations_fit_shared_memory(emulator):
    configs = emulator.kernel_configs()
    sm90 = {name for name in configs if name.startswith("fwd_sm90_")}
    assert len(configs) - len(sm90) == 2 * 6 * 2 * 4 and len(sm90) == 2 * 3
    for name, (threads, smem) in configs.items():
        assert threads % 32 == 0 and threads <= 1024, name
        limit = SM90_MAX_SMEM if name in sm90 else SM80_MAX_SMEM
        assert 0 < smem <= limit, f"{name}: {smem} B of shared memory is above the limit {limit}"


def test_instantiations_are_generated_and_current():
    proc = subprocess.run([sys.executable, str(ATTENTION_DIR / "generate_instantiations.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.name for p in (ATTENTION_DIR / "instantiations").glob("*.cu")}
    for dtype in ("fp16", "bf16"):
        for head_dim in (32, 64, 96, 128, 192, 256):  # common/static_switch.h HEADDIM_SWITCH
            for direction in ("fwd", "bwd"):
                for suffix in ("", "_dropout"):
                    assert f"flash_{direction}_hdim{head_dim}_{dtype}{suffix}_sm80.cu" in names
        for head_dim in (64, 128, 256):  # the wgmma forward
            assert f"flash_fwd_hdim{head_dim}_{dtype}_sm90.cu" in names


# --------------------------------------------------------------------------------------------
# The sm_90a wgmma forward (flash_fwd_sm90_kernel.cuh) in emulation
# --------------------------------------------------------------------------------------------
# emulation/flash_emu_ptx_sm90.h: wgmma as warpgroup collectives executed only when a
# wait_group retires them, operands read through the descriptors and the swizzle, accumulators
# checked untouched while in flight, cp.async data fenced for the async proxy. The backward of
# each case runs on the mma.sync kernels from this forward's out and lse.
SM90_CASES = [
    Case(head_dim=64, seqlen_q=113, seqlen_k=203),
    Case(head_dim=128, seqlen_q=113, seqlen_k=203, dtype=torch.bfloat16),
    Case(head_dim=128, heads=4, heads_kv=1, seqlen_q=1, seqlen_k=1),  # MQA
    Case(head_dim=64, seqlen_q=300, seqlen_k=170, causal=True, dtype=torch.bfloat16),  # dead rows and tiles
    Case(head_dim=128, seqlen_q=200, seqlen_k=300, causal=True, alignment="top_left"),
    Case(head_dim=128, batch=2, heads=4, heads_kv=2, kpm=True, seqlen_q=70, seqlen_k=290, dtype=torch.bfloat16),
    Case(head_dim=40, mask="bool", seqlen_q=40, seqlen_k=150, dtype=torch.bfloat16),  # bucket 64
    Case(head_dim=96, mask="float", seqlen_q=40, seqlen_k=150),  # bucket 128
    Case(head_dim=128, mask="float32", heads=4, heads_kv=2, seqlen_q=40, seqlen_k=150, causal=True),
    Case(head_dim=64, packed=True, heads=2, heads_kv=2, seqlen_q=65, seqlen_k=65, causal=True),
    Case(head_dim=256, seqlen_q=150, seqlen_k=203, dtype=torch.bfloat16),  # 80-key blocks
    Case(head_dim=192, batch=2, heads=2, heads_kv=1, kpm=True, causal=True, seqlen_q=170, seqlen_k=90),
]


@pytest.mark.parametrize("index", range(len(SM90_CASES)), ids=[str(c) for c in SM90_CASES])
def test_emulated_sm90_forward_matches_reference(emulator, index):
    case = SM90_CASES[index]
    inputs, options, rng = make_inputs(case, "cpu")
    check_case(_emulated(emulator, index % 6, sm90=True), inputs, options, rng, expect_dead_rows=_has_dead_rows(case))


SM90_MUTANTS = {
    # S(n) read before its wgmma retired: the softmax would see stale accumulators.
    "missing_wgmma_wait": ("      wgmma_wait<1>();  // S(n) done, P V(n-1) still runs under the softmax\n", ""),
    # cp.async data read by wgmma without the generic -> async proxy fence.
    "missing_proxy_fence": ("    cp_async_wait<0>();\n    fence_proxy_async_smem();\n", "    cp_async_wait<0>();\n"),
}


@pytest.mark.parametrize("mutant", sorted(SM90_MUTANTS))
def test_sm90_emulator_rejects_broken_synchronisation(emulator, tmp_path, mutant):
    """The sm90 emulation can fail: the kernel without one of its wgmma / proxy waits."""
    old, new = SM90_MUTANTS[mutant]
    source = (ATTENTION_DIR / "flash_fwd_sm90_kernel.cuh").read_text()
    assert source.count(old) == 1
    mutant_dir = tmp_path / "kernels"
    shutil.copytree(_build.KERNELS_DIR, mutant_dir)
    (mutant_dir / "attention" / "flash_fwd_sm90_kernel.cuh").write_text(source.replace(old, new))
    library = tmp_path / "libmutant.so"
    cmd = [shutil.which("g++"), *EMU_FLAGS, "-DFASTATTN_EMU_HEADDIM=64", f"-I{_cuda_include_dir()}",
           str(mutant_dir / "attention" / "emulation" / "flash_emu.cpp"), "-o", str(library)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    inputs, options, rng = make_inputs(Case(head_dim=64, seqlen_q=64, seqlen_k=300, heads=1), "cpu")
    emulator.mode = 0
    emulator.forward(inputs, options, rng, sm90=True)  # the real kernel passes
    broken = Emulator(library)
    with pytest.raises(AssertionError, match="in flight|fence.proxy.async"):
        broken.forward(inputs, options, rng, sm90=True)


def test_sm90_layouts_and_descriptors_agree_with_cute():
    """emulation/sm90_layout_check.cpp: the kernel's swizzled tile writer, its wgmma
    descriptors and the emulator's descriptor decoder against CuTe's GMMA layouts and
    make_gmma_desc (the emulation and the kernel must not share a misunderstanding)."""
    cutlass = _build.cutlass_include_dir()
    include = _cuda_include_dir()
    if cutlass is None or include is None or shutil.which("g++") is None:
        pytest.skip("needs g++, the CUDA headers and the nvidia-cutlass wheel's CuTe headers")
    includes = [f"-I{cutlass}", f"-I{include}"]
    if (Path(include) / "cccl").is_dir():  # CUDA 13 keeps libcu++ (cuda/std) there
        includes.append(f"-I{Path(include) / 'cccl'}")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "sm90_layout_check"
        cmd = [shutil.which("g++"), "-std=c++17", "-O1", "-w", *includes,
               str(ATTENTION_DIR / "emulation" / "sm90_layout_check.cpp"), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "OK: 0 mismatches" in run.stdout, run.stdout[-4000:]


# --------------------------------------------------------------------------------------------
# Backend module (no GPU needed)
# --------------------------------------------------------------------------------------------
def test_capabilities_send_fp32_and_large_heads_elsewhere():
    q = torch.randn(1, 4, 2, 64)
    opts = AttentionOptions(softmax_scale=0.125)
    reasons = cattn.CAPABILITIES.not_supported_reasons(AttentionInputs(q, q, q), opts)
    assert any("float32" in r for r in reasons)
    half = torch.randn(1, 4, 2, 320, dtype=torch.float16)
    reasons = cattn.CAPABILITIES.not_supported_reasons(AttentionInputs(half, half, half), opts)
    assert any("head_dim 320" in r for r in reasons)
    ok = torch.randn(1, 4, 2, 40, dtype=torch.bfloat16)
    assert cattn.CAPABILITIES.not_supported_reasons(AttentionInputs(ok, ok, ok), opts) == []
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    reasons = cattn.not_supported_reasons(AttentionInputs(ok, ok, ok, None, mask), opts)
    assert any("attn_mask dtype" in r for r in reasons)


def test_forward_kernel_rule(monkeypatch):
    monkeypatch.delenv("FASTATTN_DISABLE_SM90_FWD", raising=False)
    assert cattn.forward_kernel(0.0, (9, 0)) == cattn.SM90_WGMMA
    assert cattn.forward_kernel(0.1, (9, 0)) == cattn.MMA_SYNC  # dropout
    assert cattn.forward_kernel(0.0, (8, 0)) == cattn.MMA_SYNC
    assert cattn.forward_kernel(0.0, (10, 0)) == cattn.MMA_SYNC
    monkeypatch.setenv("FASTATTN_DISABLE_SM90_FWD", "0")
    assert cattn.forward_kernel(0.0, (9, 0)) == cattn.SM90_WGMMA
    monkeypatch.setenv("FASTATTN_DISABLE_SM90_FWD", "1")
    assert cattn.forward_kernel(0.0, (9, 0)) == cattn.MMA_SYNC
    monkeypatch.delenv("FASTATTN_DISABLE_SM90_FWD")
    assert cattn.forward_kernel(0.0, (9, 0), extras=True) == cattn.MMA_SYNC  # window / softcap / ALiBi


def test_uses_extras_mirrors_the_host_rule():
    """csrc/attention.cpp: causal alone is no window, a side as long as both sequences is
    unbounded (such calls may use the wgmma forward)."""
    q = torch.randn(1, 50, 2, 64, dtype=torch.float16)
    k = torch.randn(1, 80, 2, 64, dtype=torch.float16)
    inputs = AttentionInputs(q, k, k)
    base = AttentionOptions(softmax_scale=0.125)
    assert not cattn.uses_extras(inputs, base)
    assert not cattn.uses_extras(inputs, dataclasses.replace(base, causal=True, window_right=0))
    assert not cattn.uses_extras(inputs, dataclasses.replace(base, window_left=80, window_right=1000))
    assert cattn.uses_extras(inputs, dataclasses.replace(base, window_left=79))
    assert cattn.uses_extras(inputs, dataclasses.replace(base, window_right=0))
    assert cattn.uses_extras(inputs, dataclasses.replace(base, softcap=30.0))
    assert cattn.uses_extras(dataclasses.replace(inputs, alibi_slopes=torch.ones(2)), base)
    assert cattn.not_supported_reasons(inputs, dataclasses.replace(base, window_left=3, softcap=1.0)) == []
    assert cattn.CAPABILITIES.not_supported_reasons(
        dataclasses.replace(inputs, alibi_slopes=torch.ones(2)), dataclasses.replace(base, window_left=3, softcap=1.0)
    ) == []


def test_dropout_mask_is_the_philox_mirror():
    inputs, options, rng = make_inputs(Case(dropout_p=0.25, seqlen_q=9, seqlen_k=13), "cpu")
    keep = cattn.dropout_mask(inputs, options, rng)
    assert keep.shape == (1, 2, 9, 13) and keep.dtype == torch.bool
    assert torch.equal(keep, cattn.dropout_mask(inputs, options, rng))
    assert 0.6 < keep.float().mean().item() < 0.9
    assert cattn.dropout_mask(inputs, dataclasses.replace(options, dropout_p=0.0), None) is None


# --------------------------------------------------------------------------------------------
# GPU: the real extension
# --------------------------------------------------------------------------------------------
def _gpu_runner(inputs, options, rng, dout):
    out, lse = cattn.forward(inputs, options, rng)
    return out, lse, cattn.backward(dout, out, lse, inputs, options, rng)


GPU_CASES = EMU_CASES + [
    Case(batch=2, heads=4, heads_kv=4, seqlen_q=113, seqlen_k=203, head_dim=d, dtype=dt, causal=causal)
    for d in (32, 40, 64, 80, 96, 128, 160, 192, 256)
    for dt, causal in ((torch.float16, False), (torch.bfloat16, True))
] + [
    Case(batch=2, heads=8, heads_kv=2, seqlen_q=1024, seqlen_k=1024, head_dim=128, dtype=torch.bfloat16, causal=True),
    Case(batch=1, heads=4, heads_kv=1, seqlen_q=509, seqlen_k=1031, head_dim=64, causal=True, alignment="top_left"),
    Case(batch=2, heads=2, heads_kv=2, seqlen_q=1031, seqlen_k=257, head_dim=128, causal=True),
    Case(batch=3, heads=4, heads_kv=2, seqlen_q=300, seqlen_k=300, head_dim=64, kpm=True, mask="bool",
         dtype=torch.bfloat16),
    Case(batch=2, heads=4, heads_kv=4, seqlen_q=257, seqlen_k=511, head_dim=96, mask="float32", causal=True),
    Case(batch=2, heads=4, heads_kv=2, seqlen_q=300, seqlen_k=300, head_dim=128, dropout_p=0.125,
         deterministic=True, dtype=torch.bfloat16),
    Case(batch=2, heads=4, heads_kv=4, seqlen_q=513, seqlen_k=513, head_dim=64, packed=True, dropout_p=0.25),
    Case(batch=1, heads=2, heads_kv=2, seqlen_q=4097, seqlen_k=4097, head_dim=64, causal=True,
         dtype=torch.bfloat16),
] + EXTRA_CASES + [
    Case(batch=2, heads=8, heads_kv=2, seqlen_q=1031, seqlen_k=1031, head_dim=128, window=(256, 0), softcap=30.0,
         alibi="bh", dtype=torch.bfloat16),
    Case(batch=2, heads=4, heads_kv=4, seqlen_q=509, seqlen_k=1024, head_dim=64, window=(100, 50), causal=True,
         dropout_p=0.125),
    Case(batch=1, heads=8, heads_kv=1, seqlen_q=777, seqlen_k=777, head_dim=256, softcap=50.0, alibi="h",
         deterministic=True),
]


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_kernels_match_reference(case):
    inputs, options, rng = make_inputs(case, "cuda")
    check_case(_gpu_runner, inputs, options, rng, expect_dead_rows=_has_dead_rows(case))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_deterministic_backward_is_bitwise_reproducible(dtype):
    case = Case(batch=2, heads=8, heads_kv=2, seqlen_q=777, seqlen_k=777, head_dim=128, dtype=dtype, causal=True,
                deterministic=True, dropout_p=0.125)
    inputs, options, rng = make_inputs(case, "cuda")
    out, lse = cattn.forward(inputs, options, rng)
    dout = torch.randn_like(out)
    first = cattn.backward(dout, out, lse, inputs, options, rng)
    for _ in range(3):
        again = cattn.backward(dout, out, lse, inputs, options, rng)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    atomic = cattn.backward(dout, out, lse, inputs, dataclasses.replace(options, deterministic=False), rng)
    for a, b in zip(atomic, first):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@requires_cuda
@pytest.mark.parametrize("case", [
    Case(batch=2, heads=4, heads_kv=2, seqlen_q=1000, seqlen_k=1100, head_dim=128, dtype=torch.bfloat16),
    Case(batch=2, heads=4, heads_kv=4, seqlen_q=777, seqlen_k=513, head_dim=64, causal=True),
    Case(batch=2, heads=4, heads_kv=1, seqlen_q=300, seqlen_k=300, head_dim=96, kpm=True, mask="bool",
         causal=True, alignment="top_left", dtype=torch.bfloat16),
    Case(batch=2, heads=4, heads_kv=2, seqlen_q=513, seqlen_k=700, head_dim=256, causal=True),
], ids=str)
def test_gpu_sm90_forward_matches_reference_and_mma_sync(case, monkeypatch):
    """On a 9.x GPU: the wgmma forward (default there) against the float64 reference and the
    mma.sync forward (FASTATTN_DISABLE_SM90_FWD=1)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma forward runs on compute capability 9.x only")
    inputs, options, rng = make_inputs(case, "cuda")
    monkeypatch.delenv("FASTATTN_DISABLE_SM90_FWD", raising=False)
    out, lse = cattn.forward(inputs, options, rng)
    monkeypatch.setenv("FASTATTN_DISABLE_SM90_FWD", "1")
    out_mma, lse_mma = cattn.forward(inputs, options, rng)
    assert not torch.equal(out, out_mma), "expected the two kernels to differ in rounding: was the wgmma one run?"
    out64, lse64 = reference.forward(_to64(inputs), options, rng)
    base_out, _lse, _ = _shared_baseline(inputs, options, None, torch.zeros_like(inputs.q))
    assert_close_to_reference(out, out64, base_out, "out (wgmma)")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_mma))
    live = ~torch.isneginf(lse64)
    assert (lse[live].double() - lse64[live]).abs().max().item() < 2e-3


@requires_cuda
@pytest.mark.parametrize("case", [
    Case(batch=2, heads=4, heads_kv=2, seqlen_q=700, seqlen_k=900, head_dim=128, window=(128, 64)),
    Case(batch=2, heads=4, heads_kv=4, seqlen_q=513, seqlen_k=513, head_dim=64, softcap=20.0, causal=True),
    Case(batch=2, heads=4, heads_kv=1, seqlen_q=300, seqlen_k=300, head_dim=256, alibi="h", dtype=torch.bfloat16),
], ids=str)
def test_gpu_extras_run_on_mma_sync(case, monkeypatch):
    """Window / softcap / ALiBi never take the wgmma forward (fwd_uses_sm90): the result is the
    mma.sync kernel's, bit for bit, on any device."""
    inputs, options, rng = make_inputs(case, "cuda")
    assert cattn.forward_kernel(0.0, torch.cuda.get_device_capability(), cattn.uses_extras(inputs, options)) == (
        cattn.MMA_SYNC)
    monkeypatch.delenv("FASTATTN_DISABLE_SM90_FWD", raising=False)
    out, lse = cattn.forward(inputs, options, rng)
    monkeypatch.setenv("FASTATTN_DISABLE_SM90_FWD", "1")
    out_mma, lse_mma = cattn.forward(inputs, options, rng)
    assert torch.equal(out, out_mma) and torch.equal(lse, lse_mma)


@requires_cuda
def test_gpu_dropout_is_self_consistent_and_unbiased():
    case = Case(batch=2, heads=4, heads_kv=4, seqlen_q=256, seqlen_k=256, head_dim=64, dropout_p=0.25)
    inputs, options, rng = make_inputs(case, "cuda")
    out1, _ = cattn.forward(inputs, options, rng)
    out2, _ = cattn.forward(inputs, options, rng)
    assert torch.equal(out1, out2), "same RngState, same mask"
    out3, _ = cattn.forward(inputs, options, RngState(seed=rng.seed + 1, offset=rng.offset))
    assert not torch.equal(out1, out3)
    # v = identity rows: out[i, j] = P[i, j] * keep / (1 - p) exposes the kernel's mask.
    lk = 64
    q = torch.randn(1, 64, 1, 64, device="cuda", dtype=torch.float16) * 0.1
    k = torch.randn(1, lk, 1, 64, device="cuda", dtype=torch.float16) * 0.1
    v = torch.eye(lk, 64, device="cuda", dtype=torch.float16)[None, :, None, :]
    probe = AttentionInputs(q, k, v)
    out, _ = cattn.forward(probe, options, rng)
    kept = out[0, :, 0, :lk] != 0
    expected = cattn.dropout_mask(probe, options, rng)[0, 0]
    assert torch.equal(kept, expected)
    assert abs(kept.float().mean().item() - 0.75) < 0.05


@requires_cuda
@pytest.mark.parametrize("case", [
    Case(batch=2, heads=8, heads_kv=2, seqlen_q=300, seqlen_k=400, head_dim=64, dtype=torch.bfloat16, causal=True,
         kpm=True),
    Case(batch=2, heads=4, heads_kv=2, seqlen_q=300, seqlen_k=300, head_dim=64, causal=True, window=(50, 7),
         softcap=15.0, alibi="bh"),
], ids=str)
def test_gpu_public_api_runs_the_primitives(case):
    """fastattn.flash_attention(backend="cuda") and its autograd give exactly what the
    primitives give (accuracy itself is checked above): the options (window_size, softcap,
    alibi_slopes included) reach the kernels."""
    inputs, options, rng = make_inputs(case, "cuda")
    q, k, v = (t.detach().clone().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    out = fastattn.flash_attention(q, k, v, causal=case.causal, key_padding_mask=inputs.key_padding_mask,
                                   window_size=case.window, softcap=case.softcap, alibi_slopes=inputs.alibi_slopes,
                                   backend="cuda")
    dout = torch.randn_like(out)
    out.backward(dout)
    want_out, want_lse = cattn.forward(inputs, options, rng)
    want_dq, want_dk, want_dv = cattn.backward(dout, want_out, want_lse, inputs, options, rng)
    assert torch.equal(out.detach(), want_out)
    assert torch.equal(k.grad, want_dk) and torch.equal(v.grad, want_dv)
    torch.testing.assert_close(q.grad, want_dq, atol=2e-2, rtol=2e-2)  # fp32 atomics: order varies


@requires_cuda
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float16, torch.float32])
def test_gpu_sdpa_drop_in_with_broadcast_mask(mask_dtype):
    query = torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.float16)
    key = torch.randn(2, 4, 120, 64, device="cuda", dtype=torch.float16)
    value = torch.randn(2, 4, 120, 64, device="cuda", dtype=torch.float16)
    if mask_dtype == torch.bool:
        mask = torch.rand(4, 100, 120, device="cuda") > 0.3  # broadcast over the batch
    else:
        mask = torch.randn(4, 100, 120, device="cuda", dtype=mask_dtype)
    got = fastattn.scaled_dot_product_attention(query, key, value, attn_mask=mask, backend="cuda")
    want = fastattn.scaled_dot_product_attention(query.double(), key.double(), value.double(),
                                                 attn_mask=mask if mask_dtype == torch.bool else mask.double(),
                                                 backend="reference")
    base = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(
        torch.float16) if mask_dtype != torch.bool else mask)
    assert_close_to_reference(got, want, base, "sdpa out")


@requires_cuda
def test_gpu_opcheck():
    from fastattn.cuda import ensure_loaded

    ensure_loaded()
    # head_dim 36: the host pads to 40 and returns unpadded contiguous outputs, as the fakes do.
    q = torch.randn(2, 70, 4, 36, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(2, 90, 2, 36, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(2, 90, 2, 36, device="cuda", dtype=torch.float16, requires_grad=True)
    kpm = torch.rand(2, 90, device="cuda") > 0.2
    args = (q, k, v, kpm, None, 36 ** -0.5, True, False, 0.0, 0, 0)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, args)
    out, lse = torch.ops.fastattn.attention_fwd(*args)
    dout = torch.randn_like(out)
    for deterministic in (True, False):
        bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, kpm, None, 36 ** -0.5, True, False,
                    0.0, 0, 0, deterministic)
        # The atomic dQ path may differ in the last bit from run to run: only its schema and
        # fake tensor are compared, the deterministic path gets every check.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, bwd_args,
                              test_utils=utils if deterministic else ("test_schema", "test_faketensor"))
    # The extras (window, softcap, ALiBi (B, H)) through the schema, the fakes and the autograd.
    extras = (10, 3, 5.0, torch.rand(2, 4, device="cuda"))
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, args + extras)
    out, lse = torch.ops.fastattn.attention_fwd(*args, *extras)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, kpm, None, 36 ** -0.5, True, False, 0.0,
                0, 0, True, *extras)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, bwd_args)
