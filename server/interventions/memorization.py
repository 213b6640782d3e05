"""Memorization-pruning profiles: what to switch off in each layer's `down_proj` for a request.

Three granularities (issue 6):
- "neuron": whole intermediate neurons (columns of `down_proj`); the row's SwiGLU activations are
  multiplied by a keep mask before `down_proj`. Tensor `pruned [layers, intermediate]` (bool).
- "weight": single weights of `down_proj` (the paper's per-output-row masks); the row's output
  loses `(W * M) x`, computed as a sparse correction. Tensors `weight_layer`, `weight_row`,
  `weight_col` (int32, one entry per pruned weight). The values come from the served model,
  which the profile's fingerprint pins.
- "subspace": a few directions of each layer's `down_proj` input; the row's activations x become
  x - (x U - m U) U^T (the subspace set to its mean on ordinary text), applied as a rank-r
  correction of the output. Tensors `basis [layers, intermediate, rank]` (orthonormal columns;
  zero columns remove nothing) and `reference_mean [layers, intermediate]` (m).
The shared weights are never edited.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.profiles import Profile, ProfileError, save_profile

METHOD = "memorization"
GRANULARITIES = ("neuron", "weight", "subspace")


@dataclass(frozen=True)
class MemorizationProfile:
    name: str
    granularity: str
    num_layers: int
    intermediate_size: int
    pruned_neurons: torch.Tensor | None = None  # [layers, intermediate] bool
    weight_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # layer, row, col [N]
    basis: torch.Tensor | None = None  # [layers, intermediate, rank] float32
    reference_mean: torch.Tensor | None = None  # [layers, intermediate] float32
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ProfileError(f"memorization profile {self.name!r}: granularity {self.granularity!r} "
                               f"is not one of {GRANULARITIES}")
        if self.granularity == "neuron" and (
                self.pruned_neurons is None
                or tuple(self.pruned_neurons.shape) != (self.num_layers, self.intermediate_size)):
            raise ProfileError(f"memorization profile {self.name!r}: neuron granularity needs pruned "
                               f"[{self.num_layers}, {self.intermediate_size}]")
        if self.granularity == "weight" and self.weight_index is None:
            raise ProfileError(f"memorization profile {self.name!r}: weight granularity needs weight indices")
        if self.granularity == "subspace" and (
                self.basis is None or self.reference_mean is None or self.basis.dim() != 3
                or tuple(self.basis.shape[:2]) != (self.num_layers, self.intermediate_size)
                or tuple(self.reference_mean.shape) != (self.num_layers, self.intermediate_size)):
            raise ProfileError(f"memorization profile {self.name!r}: subspace granularity needs basis "
                               f"[{self.num_layers}, {self.intermediate_size}, rank] and reference_mean "
                               f"[{self.num_layers}, {self.intermediate_size}]")

    def keep_mask(self, layer: int) -> torch.Tensor | None:
        """[intermediate] float32 of 0/1, or None when nothing in this layer is pruned."""
        if self.pruned_neurons is None or not bool(self.pruned_neurons[layer].any()):
            return None
        return (~self.pruned_neurons[layer]).float()

    def projection(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U [intermediate, rank], m U [rank]) float32 of `layer`, or None when it removes nothing."""
        if self.basis is None or not bool(self.basis[layer].any()):
            return None
        basis = self.basis[layer].float()
        return basis, self.reference_mean[layer].float() @ basis

    def offline_down(self, layer: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The `down_proj` weight [hidden, intermediate] (and an added bias [hidden], or None) of a
        copy of the model with this profile built in: W (I - U U^T), and W U (m U) for the subspace;
        the pruned weights zeroed for masks (for tests and benchmarks)."""
        projection = self.projection(layer) if self.granularity == "subspace" else None
        if projection is None:
            w = weight.clone()
            w[self.pruned_weight_mask(layer, tuple(weight.shape)).to(w.device)] = 0
            return w, None
        basis, offset = (t.to(weight.device) for t in projection)
        w = weight.float()
        return (w - (w @ basis) @ basis.T).to(weight.dtype), (w @ basis) @ offset

    def pruned_weights(self, layer: int, down_weight: torch.Tensor) -> torch.Tensor | None:
        """The sparse [hidden, intermediate] matrix W * M of `layer` (float32, COO), or None."""
        if self.weight_index is None:
            return None
        layers, rows, cols = self.weight_index
        pick = layers == layer
        if not bool(pick.any()):
            return None
        r, c = rows[pick].long(), cols[pick].long()
        values = down_weight[r.to(down_weight.device), c.to(down_weight.device)].float()
        coo = torch.sparse_coo_tensor(torch.stack([r, c]).to(down_weight.device), values,
                                      tuple(down_weight.shape), check_invariants=True)
        return coo.coalesce()

    def pruned_weight_mask(self, layer: int, shape: tuple[int, int]) -> torch.Tensor:
        """Dense [hidden, intermediate] bool mask of `layer` (for offline pruning in tests and benchmarks)."""
        mask = torch.zeros(shape, dtype=torch.bool)
        if self.weight_index is not None:
            layers, rows, cols = self.weight_index
            pick = layers == layer
            mask[rows[pick].long(), cols[pick].long()] = True
        if self.pruned_neurons is not None:
            mask[:, self.pruned_neurons[layer].cpu()] = True
        return mask

    @property
    def pruned_count(self) -> int:
        """Neurons, weights, or (subspace) directions removed, over all layers."""
        if self.granularity == "neuron":
            return int(self.pruned_neurons.sum())
        if self.granularity == "subspace":
            return int((self.basis.abs().sum(1) > 0).sum())
        return int(self.weight_index[0].numel())

    @classmethod
    def from_profile(cls, profile: Profile) -> "MemorizationProfile":
        if profile.method != METHOD:
            raise ProfileError(f"{profile.path} is a {profile.method} profile, not a memorization one")
        t, params = profile.tensors, profile.header.get("parameters", {})
        granularity = params.get("granularity", "neuron")
        index = None
        if "weight_layer" in t:
            index = (t["weight_layer"].int(), t["weight_row"].int(), t["weight_col"].int())
        return cls(profile.name, granularity, int(params["num_layers"]), int(params["intermediate_size"]),
                   t["pruned"].bool() if "pruned" in t else None, index,
                   t["basis"].float() if "basis" in t else None,
                   t["reference_mean"].float() if "reference_mean" in t else None, str(profile.path),
                   {"parameters": params, "data": profile.header.get("data", {}),
                    "quality": profile.header.get("quality", {})})

    def check_model(self, num_layers: int, intermediate_size: int) -> None:
        if (self.num_layers, self.intermediate_size) != (num_layers, intermediate_size):
            raise ProfileError(f"memorization profile {self.name!r} ({self.source}) is for {self.num_layers} layers "
                               f"x {self.intermediate_size} neurons, the model has {num_layers} x {intermediate_size}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "granularity": self.granularity, "pruned": self.pruned_count,
                "source": self.source, **self.metadata}


def save_memorization_profile(path: Path, profile: MemorizationProfile, *, model_fingerprint: str, model_name: str,
                              parameters: dict[str, Any], data: dict[str, Any], quality: dict[str, Any]) -> Path:
    """parameters must not carry granularity, num_layers or intermediate_size: taken from the profile."""
    tensors: dict[str, torch.Tensor] = {}
    if profile.pruned_neurons is not None:
        tensors["pruned"] = profile.pruned_neurons.to(torch.uint8)
    if profile.weight_index is not None:
        layer, row, col = profile.weight_index
        tensors.update(weight_layer=layer.int(), weight_row=row.int(), weight_col=col.int())
    if profile.basis is not None:
        tensors.update(basis=profile.basis.float().contiguous(), reference_mean=profile.reference_mean.float().contiguous())
    params = {**parameters, "granularity": profile.granularity, "num_layers": profile.num_layers,
              "intermediate_size": profile.intermediate_size}
    return save_profile(path, method=METHOD, name=profile.name, model_fingerprint=model_fingerprint,
                        model_name=model_name, tensors=tensors, parameters=params, data=data, quality=quality)
