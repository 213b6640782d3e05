"""The CPU decode kernel, kernels/csrc/dense_cpu.c: a dense linear layer for few rows and whole
decoder layers of decode steps, compiled on first use and called through ctypes
(kernels/cpu_build.py), with the projection's torch reference (the decoder layer's reference is
the model's own DecoderLayer.forward, which tests/test_model.py compares it with).

Why a kernel of our own: on the AVX2 CPU it was written on, torch's half GEMM costs 8x one row for
8 rows, and the float32 GEMM used for batched rows instead reads twice the bytes; and a decode step
in torch is ~25 ops per layer whose dispatch costs more than their arithmetic. This kernel reads the
half weight once per call for all rows, from a copy laid out in panels of output columns
(`pack_panels`: register-blocked FMAs, see the C file; 24 columns in the AVX2 build, 32 in the
AVX-512 one), and runs a whole decoder layer of a decode step in one call (benchmarks/cpu_gemm.py
measures it beside torch's paths).

`CpuDenseKernel.load()` builds for the widest instruction set the CPU has (kernels/cpu_build.py;
both builds give the same bits) and returns None where the kernel cannot run (no AVX2/FMA/F16C, no compiler);
`server.model.layers.Linear` then uses torch's paths, which give the same numbers up to float32
summation order.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.cpu_build import (
    CSRC,
    DTYPE_CODES,
    INSTRUCTION_SETS,
    build_library,
    load_library,
)

SOURCE = CSRC / "dense_cpu.c"
# What a build with -DNEURONSERVE_STAGE_TIMERS times, in dense_cpu.c's STAGE_* order (at decode,
# dense_linear is the LM head)
STAGES = ("qkv", "attention", "o", "gate_up", "down", "layer", "dense_linear")


def pack_panels(weight: torch.Tensor, panel: int, parts: int = 1) -> torch.Tensor:
    """The kernel's weight layout: weight [N, K] -> [parts * ceil(N / parts / panel), K, panel], the
    rows of each of `parts` equal parts padded with zeros to whole panels (gate_up: 2 parts, so that
    gate panel i and up panel i hold the same neurons), each panel's [K, panel] contiguous; panel:
    the build's columns per panel (CpuDenseKernel.panel_width)."""
    N, K = weight.shape
    if parts < 1 or N % parts:
        raise ValueError(f"cannot split {N} output rows into {parts} equal parts")
    width = N // parts
    count = -(-width // panel)
    padded = weight.new_zeros(parts, count * panel, K)
    padded[:, :width] = weight.view(parts, width, K)
    return padded.view(parts * count, panel, K).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class PanelWeight:
    """A weight [out_features, in_features] re-laid by pack_panels for the kernel."""

    panels: torch.Tensor  # [parts * ceil(out_features / parts / panel), in_features, panel]
    out_features: int
    in_features: int
    parts: int

    @property
    def dtype(self) -> torch.dtype:
        return self.panels.dtype


def dense_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           gate_up: bool = False) -> torch.Tensor:
    """x: [B, K] float; weight: [N, K]; bias: [N] or None -> [B, N] in weight dtype, or with
    gate_up (weight = [gate; up]) silu(gate) * up: [B, N / 2]. Float32 products and sums, each
    output rounded to the weight dtype (gate and up before the SiLU product too)."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(weight.dtype)
    if not gate_up:
        return y
    gate, up = y.float().chunk(2, dim=-1)
    return (F.silu(gate.to(weight.dtype).float()) * up).to(weight.dtype)


@dataclass(frozen=True, eq=False)
class DecodeSubspace:
    """A subspace for the decode layer to remove from the rows that ask (see PreparedDecodeLayer):
    checked once per plan, so that a call passes addresses only."""
    basis: torch.Tensor  # [intermediate, rank] float32 contiguous, orthonormal columns
    basis_t: torch.Tensor  # [rank, intermediate], its transpose, contiguous
    offset: torch.Tensor  # [rank] float32
    rows: torch.Tensor | None  # [B] uint8, 1 where the row asks; None: every row

    def __post_init__(self) -> None:
        rank = self.basis.shape[-1]
        if (self.basis.dim() != 2 or self.basis_t.shape != (rank, self.basis.shape[0])
                or self.offset.shape != (rank,)
                or any(t.dtype != torch.float32 or not t.is_contiguous() for t in (self.basis, self.basis_t, self.offset))
                or (self.rows is not None and (self.rows.dim() != 1 or self.rows.dtype != torch.uint8
                                               or not self.rows.is_contiguous()))):
            raise ValueError(f"decode subspace: basis {tuple(self.basis.shape)}, basis_t {tuple(self.basis_t.shape)}, "
                             f"offset {tuple(self.offset.shape)} must be contiguous float32 [I, r], [r, I], [r]; "
                             f"rows contiguous uint8 [B] or None")

    def for_token_rows(self, tokens_per_row: int) -> DecodeSubspace:
        """The same subspace for a call whose rows are each batch row's tokens, in order."""
        if self.rows is None or tokens_per_row == 1:
            return self
        return DecodeSubspace(self.basis, self.basis_t, self.offset, self.rows.repeat_interleave(tokens_per_row))


class DecodeLayerArgs(ctypes.Structure):
    """The DecodeLayer struct of kernels/csrc/dense_cpu.c: one layer's shapes and weight addresses."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "max_len", "dtype")] + [
        ("eps", ctypes.c_double)] + [(name, ctypes.c_void_p) for name in
                                      ("attn_norm", "mlp_norm", "qkv_w", "o_w", "gate_up_w", "down_w",
                                       "qkv_b", "o_b", "gate_up_b", "down_b", "cos", "signed_sin",
                                       "qkv_wt", "o_wt", "gate_up_wt", "down_wt",
                                       "qkv_factors", "o_factors", "gate_up_factors", "down_factors")] + [
        ("qkv_segments", ctypes.c_int64 * 3), ("kv_dtype", ctypes.c_int64)]


# A decode step's sparse rows go through the sparse kernel while their kept fractions (1 - sparsity)
# add up to at most this: one row at 0.3 or more, two at 0.65, seven at 0.9. Measured on the 2-core
# Xeon VM (RESULTS.md, "WINA sparsity: speed", twenty-fourth session, two runs each against masked
# dense rows): one row at 0.3 ran 1.17x / 1.19x dense through the sparse kernel against 1.09x /
# 0.94x, two rows at 0.65 1.30x / 1.33x against 1.03x / 0.81x; one row at 0.25 and two at 0.5 are
# even, and four rows at 0.5 lose (0.63x against 0.93-1.06x): there the rows' kept channels cover
# most of the weight, where the masked dense projections win. 0.5 until the twenty-third session,
# 0.6 until the twenty-fourth.
DEFAULT_SPARSE_KERNEL_MAX_KEPT = 0.7


class CpuDenseKernel:
    """A loaded kernel library. One instance per model; stateless between calls."""

    # Up to this many rows a decode step or prompt chunk runs as one fused call per layer
    # (LlamaDecoder.forward); longer chunks run the torch layer around this kernel's projections,
    # which measured as fast from 128 tokens on, where the projections dominate both
    # (benchmarks/prefill_cpu.py; RESULTS.md).
    MAX_ROWS = 64

    def __init__(self, lib: ctypes.CDLL, instruction_set: str,
                 sparse_kernel_max_kept: float = DEFAULT_SPARSE_KERNEL_MAX_KEPT) -> None:
        """lib: dense_cpu.c built for `instruction_set` (the build's name, for logs and benchmarks);
        sparse_kernel_max_kept: a decode step runs its sparse rows through the sparse kernel while
        their kept fractions (1 - sparsity) add up to at most this, and as dense projections over
        each row's kept inputs above it (the same numbers; see masked_dense_rows in the C file)."""
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        if sparse_kernel_max_kept < 0:
            raise ValueError(f"sparse_kernel_max_kept must be >= 0, got {sparse_kernel_max_kept}")
        self.instruction_set = instruction_set
        self.sparse_kernel_max_kept = sparse_kernel_max_kept
        self.panel_width = int(lib.dense_panel_width())  # output columns per panel of this build
        fn = lib.dense_linear
        fn.argtypes = [p, i64, i64, p, i64, i64, i32, p, p, i32, i32]
        fn.restype = ctypes.c_int
        lib.decode_layer.argtypes = [ctypes.POINTER(DecodeLayerArgs), p, p, i64, p, p, i64, p, p, p,
                                     p, p, p, i64, p, p, p, p, i64, i32]
        lib.decode_layer.restype = ctypes.c_int
        lib.decode_stack.argtypes = [p, i64, p, p, i64, p, p, i64, p, p, p, p, p, i64, i32]
        lib.decode_stack.restype = ctypes.c_int
        lib.decode_attention.argtypes = [ctypes.POINTER(DecodeLayerArgs), p, p, i64, p, p, i64, p, p]
        lib.decode_attention.restype = ctypes.c_int
        lib.decode_norm.argtypes = [ctypes.POINTER(DecodeLayerArgs), i32, p, i64, p]
        lib.decode_norm.restype = ctypes.c_int
        self._fn = fn
        self._library = lib

    @classmethod
    def load(cls, cache_dir: Path | None = None, instruction_set: str = "auto",
             sparse_kernel_max_kept: float = DEFAULT_SPARSE_KERNEL_MAX_KEPT) -> CpuDenseKernel | None:
        """instruction_set: "auto" (the widest build this CPU runs), "avx2" or "avx512"; None where
        that build cannot run here. sparse_kernel_max_kept: as __init__'s."""
        loaded = load_library(SOURCE, cache_dir, "decode steps and projections run through torch", instruction_set)
        return None if loaded is None else cls(loaded[0], loaded[1].name, sparse_kernel_max_kept)

    @classmethod
    def load_stage_timed(cls, cache_dir: Path, instruction_set: str) -> tuple[CpuDenseKernel, Callable[[], dict]]:
        """For benchmarks (benchmarks/decode_breakdown.py): a build of dense_cpu.c for
        `instruction_set` ("avx2" or "avx512") with -DNEURONSERVE_STAGE_TIMERS, which adds up the
        seconds spent in each of STAGES (the served build has no timers), and a function that
        reads them: {stage: seconds since the library was loaded}."""
        isa = INSTRUCTION_SETS[instruction_set]
        library = ctypes.CDLL(str(build_library(SOURCE, cache_dir, isa, ("NEURONSERVE_STAGE_TIMERS",))))
        library.stage_timers.restype = ctypes.POINTER(ctypes.c_double)
        timers = library.stage_timers()
        return cls(library, isa.name), lambda: {name: timers[i] for i, name in enumerate(STAGES)}

    def pack(self, weight: torch.Tensor, parts: int = 1) -> PanelWeight:
        """weight [N, K] contiguous CPU float32/16/bf16 in this build's layout (one more copy of
        it); parts: 2 for a fused [gate; up] weight, whose gate_up call pairs the halves."""
        if not self.supports(weight, None):
            raise ValueError(f"dense_linear: weight {tuple(weight.shape)} {weight.dtype} is not a contiguous CPU "
                             "float32/16/bf16 matrix")
        return PanelWeight(pack_panels(weight, self.panel_width, parts), weight.shape[0], weight.shape[1], parts)

    def linear(self, x: torch.Tensor, weight: PanelWeight, bias_f32: torch.Tensor | None = None,
               gate_up: bool = False) -> torch.Tensor:
        """x: [..., K] (any float dtype); weight: `pack`'s (parts 2 with gate_up); bias_f32: [N]
        float32 contiguous or None -> [..., N] (or [..., N / 2] with gate_up) in weight dtype, as
        dense_linear_reference computes it. The model checks weight and bias once, at load."""
        N, K = weight.out_features, weight.in_features
        if x.shape[-1] != K:
            raise ValueError(f"dense_linear: x {tuple(x.shape)} does not fit weight {(N, K)}")
        if gate_up and weight.parts != 2:
            raise ValueError("dense_linear: gate_up needs a weight packed in 2 parts")
        if weight.panels.shape[-1] != self.panel_width:
            raise ValueError(f"dense_linear: weight packed in panels of {weight.panels.shape[-1]} columns, this "
                             f"{self.instruction_set} build reads {self.panel_width}")
        rows = x.reshape(-1, K).float().contiguous()  # [B, K]
        width = N // 2 if gate_up else N
        out = torch.empty(rows.shape[0], width, dtype=weight.dtype)
        if rows.shape[0] == 0:  # e.g. no row of a batch takes this path
            return out.view(*x.shape[:-1], width)
        code = DTYPE_CODES[weight.dtype]  # weight and output share the dtype
        status = self._fn(rows.data_ptr(), rows.shape[0], K, weight.panels.data_ptr(), N, weight.parts, code,
                          None if bias_f32 is None else bias_f32.data_ptr(), out.data_ptr(), code, int(gate_up))
        if status != 0:
            raise RuntimeError(f"dense_linear rejected x {tuple(x.shape)}, weight {(N, K)}")
        return out.view(*x.shape[:-1], width)

    @staticmethod
    def supports(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether `pack` can take this weight (and `linear` this bias) as they are."""
        return (weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
                and weight.dtype in DTYPE_CODES and (bias is None or bias.shape == weight.shape[:1]))

    def prepare_decode_layer(self, *, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, eps: float,
                             qkv: tuple[PanelWeight, torch.Tensor | None], o: tuple[PanelWeight, torch.Tensor | None],
                             gate_up: tuple[PanelWeight, torch.Tensor | None],
                             down: tuple[PanelWeight, torch.Tensor | None], heads: int, kv_heads: int,
                             head_dim: int, cos: torch.Tensor, signed_sin: torch.Tensor,
                             kv_dtype: torch.dtype) -> PreparedDecodeLayer:
        """One decoder layer for fused decode steps: norms [hidden] float32; each projection as
        (`pack`ed weight [out, in], gate_up in 2 parts, float32 bias [out] or None) in one dtype;
        cos / signed_sin: the RoPE tables [max_len, head_dim] float32; kv_dtype: the KV cache's
        dtype (float32, float16 or bfloat16). The tensors must outlive the result and not move."""
        hidden = attn_norm.shape[0]
        intermediate = 0 if gate_up[0] is None else gate_up[0].out_features // 2
        expected = {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden, 1), "o": (hidden, heads * head_dim, 1),
                    "gate_up": (2 * intermediate, hidden, 2), "down": (hidden, intermediate, 1)}
        problems = []
        for name, (weight, bias) in {"qkv": qkv, "o": o, "gate_up": gate_up, "down": down}.items():
            if weight is None:
                problems.append(f"{name} weight is not in the kernel's layout (its Linear does not use the kernel)")
                continue
            if (weight.out_features, weight.in_features, weight.parts) != expected[name]:
                problems.append(f"{name} weight {(weight.out_features, weight.in_features)} in {weight.parts} parts "
                                f"(want {expected[name][:2]} in {expected[name][2]})")
            if weight.panels.shape[-1] != self.panel_width:
                problems.append(f"{name} weight packed in panels of {weight.panels.shape[-1]} columns, this "
                                f"{self.instruction_set} build reads {self.panel_width}")
            if bias is not None and (bias.shape != (weight.out_features,) or bias.dtype != torch.float32
                                     or not bias.is_contiguous()):
                problems.append(f"{name} bias must be contiguous float32 [{weight.out_features}]")
        dtypes = {w.dtype for w, _ in (qkv, o, gate_up, down) if w is not None}
        if len(dtypes) > 1:
            problems.append(f"the projections' weights differ in dtype: {sorted(map(str, dtypes))}")
        for name, table in (("attn_norm", attn_norm), ("mlp_norm", mlp_norm)):
            if table.shape != (hidden,) or table.dtype != torch.float32 or not table.is_contiguous():
                problems.append(f"{name} must be contiguous float32 [{hidden}]")
        for name, table in (("cos", cos), ("signed_sin", signed_sin)):
            if table.dim() != 2 or table.shape[1] != head_dim or table.dtype != torch.float32 or not table.is_contiguous():
                problems.append(f"{name} must be contiguous float32 [max_len, {head_dim}]")
        if kv_dtype not in DTYPE_CODES:
            problems.append(f"KV cache dtype {kv_dtype} unsupported")
        if heads % kv_heads or head_dim % 2 or head_dim > 512:
            problems.append(f"heads {heads} / kv_heads {kv_heads} / head_dim {head_dim} unsupported")
        if problems:
            raise ValueError("decode_layer: " + "; ".join(problems))

        def address(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        args = DecodeLayerArgs(
            hidden, heads, kv_heads, head_dim, intermediate, cos.shape[0], DTYPE_CODES[qkv[0].dtype], eps,
            attn_norm.data_ptr(), mlp_norm.data_ptr(), *(w.panels.data_ptr() for w, _ in (qkv, o, gate_up, down)),
            address(qkv[1]), address(o[1]), address(gate_up[1]), address(down[1]),
            cos.data_ptr(), signed_sin.data_ptr())
        args.kv_dtype = DTYPE_CODES[kv_dtype]
        return PreparedDecodeLayer(self._library, args, (attn_norm, mlp_norm, *(t for pair in (qkv, o, gate_up, down)
                                                                               for t in pair), cos, signed_sin))

    def prepare_decode_stack(self, layers: list[PreparedDecodeLayer]) -> PreparedDecodeStack:
        """A model's decode layers (from prepare_decode_layer, in order) as one kernel call per step."""
        return PreparedDecodeStack(self._library, layers)


def _check_sparse_rows(call: str, sparse: bool, thresholds_ptr: int | None, kept_ptr: int | None,
                       sparse_rows: torch.Tensor | None) -> None:
    """The sparse-row arguments a decode_layer or decode_stack call takes: thresholds and kept
    tables together, only where sparsity is attached (to every layer, for the stack), and
    sparse_rows as contiguous int64."""
    if (thresholds_ptr is None) != (kept_ptr is None) or (thresholds_ptr is not None and not sparse):
        raise ValueError(f"{call}: thresholds and kept go together, with sparsity attached (to every layer)")
    if sparse_rows is not None and (sparse_rows.dtype != torch.int64 or not sparse_rows.is_contiguous()):
        raise ValueError(f"{call}: sparse_rows must be contiguous int64")


class PreparedDecodeLayer:
    """One decoder layer for decode steps (one new token per row) in one kernel call: the model's
    DecoderLayer.forward without neuron edits beyond keep masks (and, after attach_sparsity, with
    WINA sparsity: up to 8 sparse rows through the sparse kernel, any number as masked dense
    projections), on a KV cache in float32, float16 or bfloat16 (the
    model's dtype by default). `norm` and `attend` are its parts between the projections, for the
    other steps: the model then runs the projections through Linear (the dense kernel for the
    dense rows), so every such row gets the same numbers as the whole-layer call gives it."""

    ATTENTION_NORM, MLP_NORM = 0, 1

    def __init__(self, library, args: DecodeLayerArgs, tensors: tuple) -> None:
        self._layer_fn = library.decode_layer
        self._attention_fn = library.decode_attention
        self._norm_fn = library.decode_norm
        self._args = args
        self._args_ref = ctypes.byref(args)
        self._tensors = tensors  # kept alive: args holds their addresses
        self._sparse_tensors: tuple = ()
        self.attention_width = args.heads * args.head_dim
        self.qkv_width = (args.heads + 2 * args.kv_heads) * args.head_dim
        self.intermediate = args.intermediate
        self.sparse = False  # whether attach_sparsity ran: steps with sparse rows fuse too

    def attach_sparsity(self, qkv: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]],
                        o: tuple[torch.Tensor, torch.Tensor], gate_up: tuple[torch.Tensor, torch.Tensor],
                        down: tuple[torch.Tensor, torch.Tensor]) -> None:
        """WINA sparsity for steps with sparse rows: each projection as (W^T [in, out]
        contiguous in the layer's weight dtype, score factors [segments, in] contiguous float32),
        qkv with its (q, k, v) widths. The layer then computes each projection as the separate
        sparse kernel (kernels/wina_cpu.py) does, with the same numbers. The tensors must outlive
        this object and not move."""
        a = self._args
        shapes = {"qkv": (a.hidden, self.qkv_width, 3), "o": (self.attention_width, a.hidden, 1),
                  "gate_up": (a.hidden, 2 * a.intermediate, 2), "down": (a.intermediate, a.hidden, 1)}
        problems = []
        for name, (weight_t, factors) in {"qkv": qkv[:2], "o": o, "gate_up": gate_up, "down": down}.items():
            k, n, g = shapes[name]
            if (tuple(weight_t.shape) != (k, n) or not weight_t.is_contiguous()
                    or DTYPE_CODES.get(weight_t.dtype) != a.dtype):
                problems.append(f"{name} W^T must be contiguous [{k}, {n}] in the layer's dtype")
            if tuple(factors.shape) != (g, k) or factors.dtype != torch.float32 or not factors.is_contiguous():
                problems.append(f"{name} factors must be contiguous float32 [{g}, {k}]")
        if len(qkv[2]) != 3 or sum(qkv[2]) != self.qkv_width:
            problems.append(f"qkv widths {qkv[2]} must be 3 summing to {self.qkv_width}")
        if problems:
            raise ValueError("decode_layer sparsity: " + "; ".join(problems))
        a.qkv_wt, a.o_wt, a.gate_up_wt, a.down_wt = (t[0].data_ptr() for t in (qkv, o, gate_up, down))
        a.qkv_factors, a.o_factors, a.gate_up_factors, a.down_factors = (t[1].data_ptr() for t in (qkv, o, gate_up, down))
        a.qkv_segments[:] = list(qkv[2])
        self._sparse_tensors = (*qkv[:2], *o, *gate_up, *down)
        self.sparse = True

    def clear_sparsity(self) -> None:
        """Forget attach_sparsity's tensors (another profile, or none, is being attached)."""
        a = self._args
        a.qkv_wt = a.o_wt = a.gate_up_wt = a.down_wt = None
        a.qkv_factors = a.o_factors = a.gate_up_factors = a.down_factors = None
        self._sparse_tensors = ()
        self.sparse = False

    def __call__(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor, keep: torch.Tensor | None = None, thresholds_ptr: int | None = None,
                 kept_ptr: int | None = None, sparse_rows: torch.Tensor | None = None,
                 subspace: DecodeSubspace | None = None, masked_dense: bool = False) -> torch.Tensor:
        """h: [B, 1, hidden] float32 contiguous; keys, values: [num_slots, KVH, max_len, D] in the KV dtype
        contiguous (written at each row's slot and position); slots, positions: [B] int64
        contiguous; keep: [B, intermediate] float32 0/1 contiguous, the MLP neurons each row keeps
        (None: all); thresholds_ptr / kept_ptr: with attach_sparsity, the addresses of the sparse
        rows' [R, 7] float32 WINA thresholds and int32 kept counts (q, k, v, o, gate, up, down; the
        counts are written), or None for a dense step; sparse_rows: [R] int64 ascending batch indices
        of those rows (None: every row is sparse); masked_dense: their projections as dense ones over
        the inputs each keeps instead of the sparse kernel (the same numbers; faster where the rows'
        kept channels together cover most of the weight); subspace: after the keep mask, the asking rows'
        MLP activations a become a - basis (basis^T a - offset) -> the residual
        stream after the layer, [B, 1, hidden]. Callers check shapes once per step
        (LlamaDecoder.forward); the kernel re-checks slots, positions and sparse_rows."""
        if keep is not None and (keep.shape != (h.shape[0], self.intermediate) or keep.dtype != torch.float32
                                 or not keep.is_contiguous()):
            raise ValueError(f"decode_layer: keep must be contiguous float32 [{h.shape[0]}, {self.intermediate}]")
        _check_sparse_rows("decode_layer", self.sparse, thresholds_ptr, kept_ptr, sparse_rows)
        if subspace is not None and (subspace.basis.shape[0] != self.intermediate or (
                subspace.rows is not None and subspace.rows.shape[0] != h.shape[0])):
            raise ValueError(f"decode_layer: subspace basis {tuple(subspace.basis.shape)} / rows for "
                             f"[{self.intermediate}, rank] and {h.shape[0]} rows")
        out = torch.empty_like(h)
        self._check(self._layer_fn(self._args_ref, keys.data_ptr(), values.data_ptr(), keys.shape[0], h.data_ptr(),
                                   out.data_ptr(), h.shape[0], slots.data_ptr(), positions.data_ptr(),
                                   None if keep is None else keep.data_ptr(),
                                   *self._subspace_args(subspace), thresholds_ptr, kept_ptr,
                                   None if sparse_rows is None else sparse_rows.data_ptr(),
                                   h.shape[0] if sparse_rows is None else sparse_rows.numel(), int(masked_dense)),
                    slots, positions)
        return out

    @staticmethod
    def _subspace_args(subspace: DecodeSubspace | None) -> tuple:
        """-> decode_layer's (basis, basis_t, offset, rank, basis_rows)."""
        if subspace is None:
            return None, None, None, 0, None
        return (subspace.basis.data_ptr(), subspace.basis_t.data_ptr(), subspace.offset.data_ptr(),
                subspace.basis.shape[1], None if subspace.rows is None else subspace.rows.data_ptr())

    def norm(self, h: torch.Tensor, which: int) -> torch.Tensor:
        """h: [B, 1, hidden] float32 contiguous -> its ATTENTION_NORM or MLP_NORM, as __call__
        computes it."""
        out = torch.empty_like(h)
        if self._norm_fn(self._args_ref, which, h.data_ptr(), h.shape[0], out.data_ptr()) != 0:
            raise RuntimeError("decode_norm rejected its arguments")
        return out

    def attend(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """qkv: [B, 1, (H + 2 KVH) D] projected rows (any float dtype) -> attention output
        [B, 1, H D] float32, after RoPE and writing each row's key and value into the cache."""
        if qkv.shape[-1] != self.qkv_width:
            raise ValueError(f"decode_attention: qkv {tuple(qkv.shape)} is not [B, 1, {self.qkv_width}]")
        qkv = qkv.float().contiguous()
        out = torch.empty(qkv.shape[0], 1, self.attention_width)
        self._check(self._attention_fn(self._args_ref, keys.data_ptr(), values.data_ptr(), keys.shape[0],
                                       qkv.data_ptr(), out.data_ptr(), qkv.shape[0], slots.data_ptr(),
                                       positions.data_ptr()), slots, positions)
        return out

    @staticmethod
    def _check(status: int, slots: torch.Tensor, positions: torch.Tensor) -> None:
        if status != 0:
            raise RuntimeError(f"decode_layer rejected slots {slots.tolist()} / positions {positions.tolist()} "
                               f"or ran out of memory")


class PreparedDecodeStack:
    """A model's PreparedDecodeLayers in one kernel call: for a step without neuron edits, what
    calling each layer in turn gives (the same numbers), without Python between the layers (which
    cost 15-20% of a batch-1 decode step on the 2-core CPU; benchmarks/RESULTS.md)."""

    def __init__(self, library, layers: list[PreparedDecodeLayer]) -> None:
        if not layers:
            raise ValueError("decode_stack: no layers")
        self._stack_fn = library.decode_stack
        self._layers = layers  # kept alive: the array holds their arguments' addresses
        self._array = (ctypes.POINTER(DecodeLayerArgs) * len(layers))(*(ctypes.pointer(layer._args) for layer in layers))
        first = layers[0]._args
        self._layer_cache_shape = (first.kv_heads, first.max_len, first.head_dim)  # the cache's per slot
        self._kv_dtype_code = first.kv_dtype

    @property
    def sparse(self) -> bool:
        """Whether every layer has WINA sparsity attached (steps with sparse rows fuse too)."""
        return all(layer.sparse for layer in self._layers)

    def __call__(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor, thresholds_ptr: int | None = None, kept_ptr: int | None = None,
                 sparse_rows: torch.Tensor | None = None, masked_dense: bool = False) -> torch.Tensor:
        """h: [B, 1, hidden] float32 contiguous; keys, values: the whole cache, [L, num_slots, KVH,
        max_len, D] contiguous; thresholds_ptr / kept_ptr: the addresses of the sparse rows' [L, R, 7]
        threshold and kept-count tables (SparsityPlan's), or None for a dense step; the rest as
        PreparedDecodeLayer.__call__'s -> the residual stream after the last layer, [B, 1, hidden]."""
        L = len(self._layers)
        if (keys.shape[0] != L or tuple(keys.shape[2:]) != self._layer_cache_shape or values.shape != keys.shape
                or DTYPE_CODES.get(keys.dtype) != self._kv_dtype_code or values.dtype != keys.dtype
                or not (keys.is_contiguous() and values.is_contiguous())):
            raise ValueError(f"decode_stack: keys and values must be the contiguous cache of {L} layers, "
                             f"[{L}, slots, *{self._layer_cache_shape}] in the layers' KV dtype")
        _check_sparse_rows("decode_stack", self.sparse, thresholds_ptr, kept_ptr, sparse_rows)
        out = torch.empty_like(h)
        B = h.shape[0]
        status = self._stack_fn(self._array, L, keys.data_ptr(), values.data_ptr(), keys.shape[1], h.data_ptr(),
                                out.data_ptr(), B, slots.data_ptr(), positions.data_ptr(), thresholds_ptr, kept_ptr,
                                None if sparse_rows is None else sparse_rows.data_ptr(),
                                B if sparse_rows is None else sparse_rows.numel(), int(masked_dense))
        PreparedDecodeLayer._check(status, slots, positions)
        return out
