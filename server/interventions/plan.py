"""Per-row interventions inside one batched forward pass (DESIGN.md, "Per-request control").

`RowInterventions` is what one request resolved to (registry.py). Each engine step,
`InterventionPlan.build` turns the rows' interventions into per-layer index tensors, and the model
calls the plan at three places (server/model/edits.py): the MLP's intermediate activations (neuron
masks, weight-mask and subspace corrections), the residual stream after each layer (steering adds and SAE
clamps) and the logits (EigenShift). Every edit leaves the rows that did not ask for it bit-exact:
they are either not touched or only meet the identities x + 0 and x * 1, so they get exactly what
they would get alone.
A step in which no row asks for anything gets no plan at all (`build` returns None).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels.dense_cpu import DecodeSubspace
from server.interventions.eigenshift import EigenShiftProfile
from server.interventions.sae import SparseAutoencoder
from server.model.edits import KernelNeuronEdit


@dataclass(frozen=True, eq=False)
class ResidualAdd:
    layer: int
    vector: torch.Tensor  # [hidden] float32, strength already applied
    generated_only: bool


@dataclass(frozen=True, eq=False)
class LatentClamp:
    sae: SparseAutoencoder
    feature: int
    value: float
    generated_only: bool


@dataclass(frozen=True, eq=False)
class PreparedSubspace:
    """One layer's subspace of a memorization profile, laid out once when the profile loads."""

    basis: torch.Tensor  # U [intermediate, r] float32 contiguous
    basis_t: torch.Tensor  # U^T [r, intermediate] contiguous (the CPU decode kernel reads both)
    offset: torch.Tensor  # m U [r]
    down_basis: torch.Tensor  # W_down U [hidden, r]


@dataclass(frozen=True, eq=False)
class PreparedMemorization:
    """A memorization profile laid out for the model: per layer a keep mask, a sparse W*M, or a
    subspace to remove."""

    name: str
    keep: list[torch.Tensor | None]  # per layer: [intermediate] in the activations' dtype, or None
    pruned: list[torch.Tensor | None]  # per layer: sparse COO [hidden, intermediate] float32, or None
    projections: list[PreparedSubspace | None] = field(default_factory=list)  # per layer


@dataclass(frozen=True, eq=False)
class RowInterventions:
    """What one request asked for, resolved against the loaded profiles."""

    adds: tuple[ResidualAdd, ...] = ()
    clamps: tuple[LatentClamp, ...] = ()
    eigenshift: tuple[tuple[EigenShiftProfile, float], ...] = ()  # (profile, alpha)
    unmemorize: tuple[PreparedMemorization, ...] = ()
    applied: tuple[dict[str, Any], ...] = ()  # echoed in the response, defaults filled in

    @property
    def empty(self) -> bool:
        return not (self.adds or self.clamps or self.eigenshift or self.unmemorize)


@dataclass
class _ClampGroup:
    sae: SparseAutoencoder
    rows: torch.Tensor  # [R] batch rows that clamp a latent of this SAE at this layer
    entry_rows: torch.Tensor  # [E] index into `rows`, one per clamp
    features: torch.Tensor  # [E]
    values: torch.Tensor  # [E] float32


class _NeuronEdit:
    def __init__(self, batch: int, keep: torch.Tensor | None, corrections: list[tuple[torch.Tensor, torch.Tensor]],
                 projections: list[tuple[torch.Tensor, PreparedSubspace]] = ()) -> None:
        # keep: [B, intermediate] 0/1, all ones on rows that prune nothing here: x * 1 == x exactly,
        # and one multiply of the whole batch costs less than gathering and scattering rows.
        self.keep = keep
        self.corrections = corrections  # (rows [R], sparse W*M [hidden, intermediate])
        self.projections = list(projections)  # (rows [R] that remove it, subspace)
        self.batch = batch
        self._kernel_edit: KernelNeuronEdit | None = None

    def for_kernel(self) -> KernelNeuronEdit | None:
        if self.corrections or len(self.projections) > 1:
            return None
        if self._kernel_edit is None:  # once per plan; the plan lives while the batch is unchanged
            keep = None if self.keep is None else self.keep.float().contiguous()
            subspace = None
            if self.projections:
                rows, prepared = self.projections[0]
                asking = None if rows.numel() == self.batch else torch.zeros(
                    self.batch, dtype=torch.uint8, device=rows.device).index_fill_(0, rows, 1)
                subspace = DecodeSubspace(prepared.basis, prepared.basis_t, prepared.offset, asking)
            self._kernel_edit = KernelNeuronEdit(keep, subspace)
        return self._kernel_edit

    def hidden(self, act: torch.Tensor) -> torch.Tensor:
        # act: [B, T, intermediate]
        if self.keep is None:
            return act
        return act * self.keep.to(act.dtype).unsqueeze(1)

    def output(self, act: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # out: [B, T, hidden]; subtract each asking row's (W*M) x, or W U (x U - m U), in float32
        if not (self.corrections or self.projections):
            return out
        out = out.float()
        for rows, pruned in self.corrections:
            x = act[rows].float()  # [R, T, I]
            R, T, I = x.shape
            removed = torch.sparse.mm(pruned, x.reshape(R * T, I).T).T.reshape(R, T, -1)  # [R, T, hidden]
            out = out.index_put((rows,), out[rows] - removed)
        for rows, sub in self.projections:
            if rows.numel() == act.shape[0]:  # every row asks (rows are distinct): no gather, no scatter
                out = out - (act.float() @ sub.basis - sub.offset) @ sub.down_basis.T
                continue
            coords = act[rows].float() @ sub.basis - sub.offset  # [R, T, r]
            out = out.index_put((rows,), out[rows] - coords @ sub.down_basis.T)
        return out


@dataclass
class InterventionPlan:
    prompt_step: bool
    # layer -> [B, hidden] summed vectors, zeros on rows that add nothing there (h + 0 == h exactly)
    adds: dict[int, torch.Tensor] = field(default_factory=dict)
    clamps: dict[int, list[_ClampGroup]] = field(default_factory=dict)
    neuron_edits: dict[int, _NeuronEdit] = field(default_factory=dict)
    logit_groups: list[tuple[EigenShiftProfile, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def build(cls, rows: list[RowInterventions | None], prompt_step: bool,
              device: torch.device) -> InterventionPlan | None:
        """rows: one entry per batch row (None: asks for nothing). prompt_step: the step's tokens
        are prompt tokens (a prefill chunk), so `positions: "generated"` entries sit it out."""
        if all(r is None or r.empty for r in rows):
            return None
        plan = cls(prompt_step)

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        add_sums: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        clamp_entries: dict[tuple[int, int], list[tuple[int, LatentClamp]]] = defaultdict(list)
        keep_rows: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        pruned_rows: dict[tuple[int, int], list[int]] = defaultdict(list)
        pruned_matrix: dict[tuple[int, int], torch.Tensor] = {}
        projection_rows: dict[tuple[int, int], list[int]] = defaultdict(list)
        projection_of: dict[tuple[int, int], PreparedSubspace] = {}
        logit_rows: dict[int, tuple[EigenShiftProfile, list[int], list[float]]] = {}
        for row, r in enumerate(rows):
            if r is None:
                continue
            for add in r.adds:
                if add.generated_only and prompt_step:
                    continue
                sums = add_sums[add.layer]
                sums[row] = sums[row] + add.vector if row in sums else add.vector
            for clamp in r.clamps:
                if not (clamp.generated_only and prompt_step):
                    clamp_entries[(clamp.sae.layer, id(clamp.sae))].append((row, clamp))
            for memo in r.unmemorize:
                for layer, keep in enumerate(memo.keep):
                    if keep is not None:
                        keep_rows[layer].append((row, keep))
                for layer, pruned in enumerate(memo.pruned):
                    if pruned is not None:
                        pruned_rows[(layer, id(pruned))].append(row)
                        pruned_matrix[(layer, id(pruned))] = pruned
                for layer, projection in enumerate(memo.projections):
                    if projection is not None:
                        projection_rows[(layer, id(projection))].append(row)
                        projection_of[(layer, id(projection))] = projection
            for profile, alpha in r.eigenshift:
                group = logit_rows.setdefault(id(profile), (profile, [], []))
                group[1].append(row)
                group[2].append(alpha)

        batch = len(rows)
        for layer, sums in add_sums.items():
            dense = torch.zeros(batch, next(iter(sums.values())).shape[0], device=device)
            for row, vector in sums.items():
                dense[row] = vector
            plan.adds[layer] = dense
        for (layer, _), entries in clamp_entries.items():
            batch_rows = sorted({row for row, _ in entries})
            local = {row: i for i, row in enumerate(batch_rows)}
            plan.clamps.setdefault(layer, []).append(_ClampGroup(
                entries[0][1].sae, index(batch_rows), index([local[row] for row, _ in entries]),
                index([c.feature for _, c in entries]),
                torch.tensor([c.value for _, c in entries], dtype=torch.float32, device=device)))
        layers = set(keep_rows) | {layer for layer, _ in pruned_rows} | {layer for layer, _ in projection_rows}
        for layer in layers:
            keep = None
            for row, row_keep in keep_rows.get(layer, []):
                if keep is None:
                    keep = torch.ones(batch, row_keep.shape[0], dtype=row_keep.dtype, device=device)
                keep[row] *= row_keep
            corrections = [(index(rws), pruned_matrix[key]) for key, rws in pruned_rows.items() if key[0] == layer]
            projections = [(index(rws), projection_of[key]) for key, rws in projection_rows.items() if key[0] == layer]
            plan.neuron_edits[layer] = _NeuronEdit(batch, keep, corrections, projections)
        for profile, rws, alphas in logit_rows.values():
            plan.logit_groups.append((profile, index(rws), torch.tensor(alphas, dtype=torch.float32, device=device)))
        return plan

    # ---- ForwardEdits (server/model/edits.py) -------------------------------------------

    def neurons(self, layer: int) -> _NeuronEdit | None:
        return self.neuron_edits.get(layer)

    def residual(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # h: [B, T, hidden] float32; positions: [B, T]
        add = self.adds.get(layer)
        if add is not None:
            h = h + add.unsqueeze(1)
        for group in self.clamps.get(layer, ()):
            h = _clamp(h, positions, group)
        return h

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # hidden: [B, (T,) hidden]; logits: [B, (T,) vocab] float32
        for profile, rows, alphas in self.logit_groups:
            # index_add with alpha -1 is logits[rows] - correction exactly, at a quarter of index_put's cost
            logits = logits.index_add(0, rows, profile.correction(hidden[rows], alphas), alpha=-1)
        return logits


def _clamp(h: torch.Tensor, positions: torch.Tensor, group: _ClampGroup) -> torch.Tensor:
    """Set each clamped latent to its value and keep the SAE's reconstruction error: since decoding
    is linear, that is h + (value - z_f) * W_dec[f], one latent changing and nothing else."""
    x = h[group.rows]  # [R, T, hidden]
    latents = group.sae.encode(x)  # [R, T, d_sae]
    current = latents[group.entry_rows, :, group.features]  # [E, T]
    delta = group.values.unsqueeze(1) - current
    # Position 0 (BOS, the attention sink) is out of the SAE's training distribution: left alone.
    delta = delta * (positions[group.rows[group.entry_rows]] > 0)
    change = delta.unsqueeze(-1) * group.sae.W_dec[group.features].unsqueeze(1)  # [E, T, hidden]
    return h.index_add(0, group.rows[group.entry_rows], change)
