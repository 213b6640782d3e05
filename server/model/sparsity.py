"""WINA sparsity inside the forward pass (issue 3): per row of the batch, a target sparsity turned
into per-layer, per-projection thresholds on the score |x_i| * ||W[:, i]||_2.

- `WinaTable`: a calibrated profile's thresholds for a grid of target sparsities.
- `SparseProjection`: what one fused projection (qkv, o, gate_up or down) needs to run sparse:
  its column norms per segment and, on CPU, the prepared C kernel over its transposed weight.
- `SparsityPlan`: built from the rows' targets (the engine's decode steps reuse it while those stay
  the same); `plan.layer(i)` is handed to
  each decoder layer, whose blocks call `layer_sparsity.apply(...)` instead of the dense
  projection. Rows whose target is 0 take the dense path untouched, so they get exactly the
  numbers they would get in a batch with no sparsity at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F

from kernels.wina_cpu import CpuWinaKernel, PreparedWinaLinear
from kernels.wina_reference import column_norms, wina_mask

if TYPE_CHECKING:
    from server.model.layers import Linear

# Column of each projection in the [*, 7] threshold and kept-count tables.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
QKV_COLUMNS, O_COLUMNS, GATE_UP_COLUMNS, DOWN_COLUMNS = (0, 3), (3, 4), (4, 6), (6, 7)
Criterion = Literal["wina", "teal", "wina_official"]
# The Triton path that serves sparse rows on CUDA (kernels/wina_triton.py: the tile kernels, or
# the gather path, faster at batch 1 and 2 and slower from batch 4; benchmarks/RESULTS.md).
GpuKernel = Literal["tile", "gather"]
# The projections whose score uses the real column norm ||W[:, i]||; the others use 1 (|x_i|
# alone). "wina" is the paper's criterion on all seven; "wina_official" is what the reference
# code (microsoft/wina) does, norms on k_proj and gate_proj only; "teal" uses none.
NORMED_PROJECTIONS: dict[str, frozenset[str]] = {
    "wina": frozenset(PROJECTIONS), "teal": frozenset(), "wina_official": frozenset({"k", "gate"}),
}


def criterion_factors(weight: torch.Tensor, segments: tuple[int, ...], columns: tuple[int, int],
                      criterion: Criterion) -> torch.Tensor:
    """The score's per-channel factor of one fused projection: weight [N, K] split into `segments`
    (the projections PROJECTIONS[columns[0]:columns[1]]) -> float32 [G, K], each segment's column
    norms or ones, as `criterion` says."""
    if criterion not in NORMED_PROJECTIONS:
        raise ValueError(f"unknown WINA criterion {criterion!r}; expected one of {sorted(NORMED_PROJECTIONS)}")
    normed = NORMED_PROJECTIONS[criterion]
    names = PROJECTIONS[columns[0]:columns[1]]
    norms = column_norms(weight, segments) if normed else None
    return torch.stack([norms[g] if name in normed else torch.ones(weight.shape[1], device=weight.device)
                        for g, name in enumerate(names)])

# Above this many token rows the CPU kernel's union of kept channels covers most of the weight
# and its per-row accumulators cost more than a float32 GEMM: the masked dense path takes over.
CPU_KERNEL_MAX_ROWS = 8


@dataclass(frozen=True)
class WinaTable:
    """levels: [S] ascending target sparsities, levels[0] == 0; thresholds: [S, L, 7] float32
    score thresholds (row 0 all zero: keep every non-zero input)."""

    criterion: Criterion
    levels: torch.Tensor
    thresholds: torch.Tensor

    def __post_init__(self) -> None:
        S = self.levels.shape[0]
        if self.thresholds.dim() != 3 or self.thresholds.shape[0] != S or self.thresholds.shape[2] != 7:
            raise ValueError(f"WINA thresholds must be [levels, layers, 7], got {tuple(self.thresholds.shape)}")
        if S < 2 or float(self.levels[0]) != 0.0 or not bool((self.levels[1:] > self.levels[:-1]).all()):
            raise ValueError("WINA levels must start at 0 and increase")

    @property
    def max_sparsity(self) -> float:
        return round(float(self.levels[-1]), 6)  # levels are float32: 0.9 reads back as 0.89999998

    def thresholds_for(self, targets: torch.Tensor) -> torch.Tensor:
        """targets: [R] in [0, max_sparsity] -> [L, R, 7], piecewise linear between levels."""
        levels = self.levels
        upper = torch.searchsorted(levels, targets.clamp(max=self.max_sparsity), right=False)
        upper = upper.clamp(1, levels.shape[0] - 1)  # [R]
        lo, hi = levels[upper - 1], levels[upper]
        weight = ((targets - lo) / (hi - lo)).clamp(0, 1).view(-1, 1, 1)  # [R, 1, 1]
        mixed = torch.lerp(self.thresholds[upper - 1], self.thresholds[upper], weight)  # [R, L, 7]
        return mixed.transpose(0, 1).contiguous()


class SparseProjection:
    """One projection's sparse state. `linear` is the dense projection (weight [N, K]); its outputs
    split into `segments` blocks (q/k/v or gate/up), each with its own WINA mask."""

    def __init__(self, linear: "Linear", segments: tuple[int, ...], columns: tuple[int, int],
                 criterion: Criterion, cpu_kernel: CpuWinaKernel | None, gate_up: bool = False,
                 gpu_kernel: GpuKernel = "tile") -> None:
        weight = linear.weight
        self.gpu_kernel = gpu_kernel  # which Triton path runs it on CUDA (kernels/wina_triton.py)
        self.linear = linear
        self.segments = segments
        self.columns = columns
        self.gate_up = gate_up
        self.col_norms = criterion_factors(weight, segments, columns, criterion)  # [G, K]
        self.prepared: PreparedWinaLinear | None = None
        self.weight_t: torch.Tensor | None = None
        if weight.device.type == "cuda":
            self.weight_t = weight.t().contiguous()  # [K, N] for the Triton kernel
        elif cpu_kernel is not None:
            # W^T [K, N]: one contiguous row per input channel, so a skipped channel is a skipped row
            self.prepared = cpu_kernel.prepare(weight.t().contiguous(), self.col_norms, segments,
                                               linear.bias, gate_up=gate_up, out_dtype=torch.float32)


@dataclass
class SparsityPlan:
    """One forward pass's sparsity. thresholds, kept: [L, R*T, 7] for the R sparse rows' T tokens
    each; sparse_rows / dense_rows: batch indices, None when every row is sparse."""

    thresholds: torch.Tensor
    kept: torch.Tensor
    sparse_rows: torch.Tensor | None
    dense_rows: torch.Tensor | None
    tokens_per_row: int
    weight_sizes: torch.Tensor  # [7] float32: output width N_p of each projection
    layer_weight_total: float  # sum over the 7 projections of K_p * N_p
    kept_share: float  # sum over the sparse rows of 1 - their target: how much of the weight they ask for

    @classmethod
    def build(cls, table: WinaTable, targets: list[float], tokens_per_row: int,
              weight_sizes: torch.Tensor, layer_weight_total: float) -> "SparsityPlan | None":
        sparse = [i for i, t in enumerate(targets) if t > 0]
        if not sparse:
            return None
        dense = [i for i, t in enumerate(targets) if t <= 0]
        device = table.thresholds.device
        row_thresholds = table.thresholds_for(torch.tensor([targets[i] for i in sparse], device=device))
        thresholds = row_thresholds.float().repeat_interleave(tokens_per_row, dim=1).contiguous()  # [L, R*T, 7]
        return cls(
            thresholds=thresholds,
            kept=torch.zeros(thresholds.shape, dtype=torch.int32, device=device),
            sparse_rows=torch.tensor(sparse, device=device) if dense else None,
            dense_rows=torch.tensor(dense, device=device) if dense else None,
            tokens_per_row=tokens_per_row,
            weight_sizes=weight_sizes,
            layer_weight_total=layer_weight_total,
            kept_share=sum(1.0 - targets[i] for i in sparse),
        )

    def reuse(self) -> SparsityPlan:
        """This plan for another pass of the same rows at the same targets (the thresholds depend on
        nothing else): its kept counts start again from zero."""
        self.kept.zero_()
        return self

    def layer(self, index: int) -> "LayerSparsity":
        return LayerSparsity(self, index)

    def skipped_fraction(self) -> torch.Tensor:
        """-> [R] float32: per sparse row, the share of the projections' weights its tokens did not
        need (kept channels weighted by each projection's output width), averaged over its tokens."""
        L, RT, _ = self.kept.shape
        read = (self.kept.float() * self.weight_sizes).sum(dim=(0, 2))  # [R*T]
        per_token = 1.0 - read / (L * self.layer_weight_total)
        return per_token.view(-1, self.tokens_per_row).mean(dim=1)


class LayerSparsity:
    """One layer's view of the plan. Decode at batch 1 calls `apply` 4 times a layer, 120 times a
    token, so the kernel path works on raw addresses into the plan's tables instead of views
    (`thresholds_ptr`, `kept_ptr`: this layer's [R*T, 7] float32 / int32 rows, which the fused
    decode layer also takes)."""

    def __init__(self, plan: SparsityPlan, index: int) -> None:
        self.plan = plan
        self.index = index
        offset = index * plan.kept.shape[1] * 7 * 4  # both tables are [L, R*T, 7] of 4-byte elements
        self.thresholds_ptr = plan.thresholds.data_ptr() + offset
        self.kept_ptr = plan.kept.data_ptr() + offset

    @property
    def thresholds(self) -> torch.Tensor:
        return self.plan.thresholds[self.index]  # [R*T, 7]

    @property
    def kept(self) -> torch.Tensor:
        return self.plan.kept[self.index]  # [R*T, 7]

    def apply(self, projection: SparseProjection, x: torch.Tensor,
              dense: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x: [B, T, K] -> [B, T, N] (or [B, T, N/2] = silu(gate) * up for the gate_up projection).
        `dense` computes the same output without sparsity; rows whose target is 0 go through it."""
        plan = self.plan
        B, T, K = x.shape
        sparse_x = x if plan.sparse_rows is None else x.index_select(0, plan.sparse_rows)
        rows = sparse_x.reshape(-1, K)  # [R*T, K]
        start, end = projection.columns
        if projection.prepared is not None and rows.shape[0] <= CPU_KERNEL_MAX_ROWS:
            if rows.dtype != torch.float32 or not rows.is_contiguous():
                rows = rows.float().contiguous()
            y = projection.prepared(rows, self.thresholds_ptr + 4 * start, 7, self.kept_ptr + 4 * start, 7)
        elif projection.weight_t is not None:
            from kernels.wina_triton import wina_gate_up_triton, wina_linear_triton

            thresholds = self.thresholds[:, start:end].contiguous()
            bias = projection.linear.bias
            if projection.gate_up:
                y, kept = wina_gate_up_triton(rows, projection.weight_t, projection.col_norms, thresholds, bias,
                                              path=projection.gpu_kernel)
            else:
                y, kept = wina_linear_triton(rows, projection.weight_t, projection.col_norms, thresholds,
                                             projection.segments, bias, path=projection.gpu_kernel)
            self.kept[:, start:end] = kept
        else:
            y = self._masked_dense(projection, rows)
        y = y.view(-1, T, y.shape[-1])
        if plan.dense_rows is None:
            return y
        dense_y = dense(x.index_select(0, plan.dense_rows))
        out = torch.empty(B, T, y.shape[-1], dtype=y.dtype, device=y.device)
        out.index_copy_(0, plan.sparse_rows, y)
        out.index_copy_(0, plan.dense_rows, dense_y.to(y.dtype))
        return out

    def _masked_dense(self, projection: SparseProjection, rows: torch.Tensor) -> torch.Tensor:
        """The same numbers through dense matmuls: each segment's inputs masked, then the dense
        projection restricted to that segment's outputs. For many token rows (prefill) and where
        no kernel runs. rows: [RT, K] -> [RT, N] (or [RT, N/2] for gate_up)."""
        start, end = projection.columns
        mask = wina_mask(rows, projection.col_norms, self.thresholds[:, start:end])  # [RT, G, K]
        self.kept[:, start:end] = mask.sum(dim=-1, dtype=torch.int32)
        outputs = []
        offset = 0
        for g, width in enumerate(projection.segments):
            masked = rows * mask[:, g].to(rows.dtype)
            outputs.append(projection.linear.forward_columns(masked, offset, offset + width))
            offset += width
        if projection.gate_up:
            gate, up = outputs
            return (F.silu(gate.float()) * up.float()).to(gate.dtype).float()
        return torch.cat(outputs, dim=-1).float()
