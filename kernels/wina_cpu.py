"""The CPU WINA sparse linear layer: a small C kernel (kernels/csrc/wina_cpu.c, whose code is in
wina_core.h), compiled on first use and called through ctypes (kernels/cpu_build.py). Stock torch
sparse paths all lose to the dense half GEMV on this kind of CPU (measured in issue 3), which is
why a kernel of our own reads the kept rows of W^T directly.

`CpuWinaKernel.load()` returns None where the kernel cannot run (no AVX2/FMA/F16C, no compiler);
callers then use the masked dense path, which gives the same numbers without the speed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import torch

from kernels.cpu_build import CSRC, DTYPE_CODES, InstructionSet, load_library

SOURCE = CSRC / "wina_cpu.c"
MAX_SEGMENTS = 4


class CpuWinaKernel:
    """A loaded kernel library. One instance per model; stateless between calls."""

    def __init__(self, lib: ctypes.CDLL, instruction_set: InstructionSet) -> None:
        self.instruction_set = instruction_set.name
        fn = lib.wina_linear
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fn.argtypes = [p, i64, i64, p, i64, i32, p, p, i64, p, i64, p, p, i32, p, i64, i32]
        fn.restype = ctypes.c_int
        self._fn = fn
        self._library = lib

    @classmethod
    def load(cls, cache_dir: Path | None = None, instruction_set: str = "auto") -> "CpuWinaKernel | None":
        """instruction_set: as kernels.cpu_build.pick_instruction_set takes it (every build gives the
        same bits; AVX-512 streams kept rows in 16-lane vectors, half the instructions of AVX2's)."""
        loaded = load_library(SOURCE, cache_dir, "WINA sparsity runs the masked dense path (same numbers, no speed-up)",
                              instruction_set)
        return None if loaded is None else cls(*loaded)

    def prepare(self, weight_t: torch.Tensor, col_norms: torch.Tensor, segments: Sequence[int],
                bias: torch.Tensor | None = None, gate_up: bool = False,
                out_dtype: torch.dtype | None = None) -> "PreparedWinaLinear":
        """out_dtype (default: the weight's) only changes the storage: values are always rounded
        to the weight dtype, so float32 output saves the model a conversion and nothing else."""
        return PreparedWinaLinear(self._fn, weight_t, col_norms, segments, bias, gate_up,
                                  out_dtype or weight_t.dtype)

    def linear(
        self,
        x: torch.Tensor,
        weight_t: torch.Tensor,
        col_norms: torch.Tensor,
        thresholds: torch.Tensor,
        segments: Sequence[int],
        bias: torch.Tensor | None = None,
        gate_up: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked entry point with the reference's signature (wina_linear_reference, or
        wina_gate_up_reference with gate_up): x: [B, K]; weight_t: [K, N]; col_norms: [G, K]
        float32; thresholds: [B, G] float32 -> (y [B, N] or [B, N / 2], kept [B, G] int32)."""
        B, K = x.shape
        G = len(segments)
        if thresholds.shape != (B, G) or x.shape[1] != weight_t.shape[0]:
            raise ValueError(f"wina_linear: x {tuple(x.shape)}, weight_t {tuple(weight_t.shape)}, "
                             f"thresholds {tuple(thresholds.shape)} do not fit {G} segments")
        prepared = self.prepare(weight_t, col_norms, segments, bias, gate_up)
        kept = torch.empty(B, G, dtype=torch.int32)
        thresholds = thresholds.float().contiguous()
        y = prepared(x.float().contiguous(), thresholds.data_ptr(), G, kept.data_ptr(), G)
        return y, kept


class PreparedWinaLinear:
    """One layer's weight, norms and segments, checked once, so each call passes only pointers:
    at batch 1 the Python side of a call must stay a few microseconds."""

    def __init__(self, fn, weight_t: torch.Tensor, col_norms: torch.Tensor, segments: Sequence[int],
                 bias: torch.Tensor | None, gate_up: bool, out_dtype: torch.dtype) -> None:
        K, N = weight_t.shape
        G = len(segments)
        problems = []
        if weight_t.device.type != "cpu" or not weight_t.is_contiguous() or weight_t.dtype not in DTYPE_CODES:
            problems.append(f"weight_t must be a contiguous CPU float32/16/bf16 tensor, got {weight_t.dtype}")
        if not 1 <= G <= MAX_SEGMENTS or sum(segments) != N:
            problems.append(f"segments {tuple(segments)} must be 1..{MAX_SEGMENTS} widths summing to {N}")
        if gate_up and (G != 2 or segments[0] != segments[1]):
            problems.append("gate_up needs two equal segments")
        if col_norms.shape != (G, K) or col_norms.dtype != torch.float32:
            problems.append(f"col_norms must be float32 [{G}, {K}], got {tuple(col_norms.shape)}")
        if bias is not None and (bias.shape != (N,)):
            problems.append(f"bias must be [{N}], got {tuple(bias.shape)}")
        if out_dtype not in DTYPE_CODES:
            problems.append(f"out_dtype must be float32/16/bf16, got {out_dtype}")
        if problems:
            raise ValueError("wina_linear: " + "; ".join(problems))
        self.weight_t = weight_t
        self.col_norms = col_norms.contiguous()
        self.segment_sizes = torch.tensor(list(segments), dtype=torch.int64)
        self.bias = bias.float().contiguous() if bias is not None else None
        self.in_features = K
        self.out_features = N // 2 if gate_up else N
        self.out_dtype = out_dtype
        self._out_code = DTYPE_CODES[out_dtype]
        self._fn = fn
        self._dtype_code = DTYPE_CODES[weight_t.dtype]
        self._fixed = (weight_t.data_ptr(), N, self._dtype_code, self.col_norms.data_ptr())
        self._segments = (self.segment_sizes.data_ptr(), G,
                          self.bias.data_ptr() if self.bias is not None else None)
        self._gate_up = int(gate_up)

    def __call__(self, x: torch.Tensor, thresholds_ptr: int, threshold_stride: int, kept_ptr: int,
                 kept_stride: int) -> torch.Tensor:
        """x: [B, K] float32 contiguous; thresholds_ptr / kept_ptr: addresses of [B, G] float32 /
        int32 tables with the given row strides (elements) -> [B, out_features] in weight dtype."""
        B, K = x.shape
        if K != self.in_features or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"wina_linear: x must be contiguous float32 [B, {self.in_features}], "
                             f"got {tuple(x.shape)} {x.dtype}")
        out = torch.empty(B, self.out_features, dtype=self.out_dtype)
        status = self._fn(x.data_ptr(), B, K, *self._fixed, thresholds_ptr, threshold_stride, *self._segments,
                          out.data_ptr(), self._out_code, kept_ptr, kept_stride, self._gate_up)
        if status != 0:
            raise RuntimeError("wina_linear kernel rejected its arguments or ran out of memory")
        return out
