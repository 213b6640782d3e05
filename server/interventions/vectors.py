"""Steering vectors: one direction per residual-stream layer it applies to.

A vector profile (`vector-<name>.safetensors`, method "vector") holds `directions [n, hidden]`
and `layers [n]`: a difference-in-means vector has one layer, a llama.cpp control vector one per
layer. A request's `strength` multiplies every direction; each is added to the residual stream
after its layer.

llama.cpp control vectors (`load_control_vector_gguf`) load as they are: a GGUF file whose
tensors `direction.N` (float32, one per layer, N >= 1) llama.cpp adds to the output of its graph
layer `il = N`, 0-based (`common_control_vector_load_one` stores direction.N at buffer offset
`n_embd * (N - 1)`, and `llama_adapter_cvec::apply` fills layer `il` from offset `n_embd * (il - 1)`,
so the two offsets cancel). Our layer numbering is 0-based too, so `direction.N` is added to the
residual stream after our decoder layer N: the same place. Layer 0 cannot be expressed in the
format (llama.cpp refuses `direction.0`). Note that llama.cpp's own `cvector-generator` (and
repeng) *read* the activations for `direction.N` one layer earlier, at the output of layer N - 1
(`l_out-(N-1)`, HF `hidden_states[N]`), and apply them after layer N: we reproduce where llama.cpp
applies a file, which is what a user who brings one expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.profiles import Profile, ProfileError, save_profile

METHOD = "vector"
GGUF_ARCH = "controlvector"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


@dataclass(frozen=True)
class SteeringVector:
    name: str
    layers: tuple[int, ...]
    directions: torch.Tensor  # [len(layers), hidden] float32
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.directions.dim() != 2 or self.directions.shape[0] != len(self.layers):
            raise ProfileError(f"steering vector {self.name!r}: directions {tuple(self.directions.shape)} "
                               f"do not match {len(self.layers)} layers")

    @property
    def hidden_size(self) -> int:
        return self.directions.shape[1]

    @classmethod
    def from_profile(cls, profile: Profile) -> "SteeringVector":
        if profile.method != METHOD:
            raise ProfileError(f"{profile.path} is a {profile.method} profile, not a steering vector")
        layers = tuple(int(i) for i in profile.tensors["layers"].tolist())
        return cls(profile.name, layers, profile.tensors["directions"].float(), str(profile.path),
                   {"parameters": profile.header.get("parameters", {}), "data": profile.header.get("data", {}),
                    "quality": profile.header.get("quality", {})})

    def check_model(self, hidden_size: int, num_layers: int) -> None:
        if self.hidden_size != hidden_size:
            raise ProfileError(f"steering vector {self.name!r} ({self.source}) has width {self.hidden_size}, "
                               f"the model's residual stream {hidden_size}")
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ProfileError(f"steering vector {self.name!r} ({self.source}) names layers {bad}; "
                               f"the model has {num_layers}")

    def to(self, device: torch.device) -> "SteeringVector":
        return SteeringVector(self.name, self.layers, self.directions.to(device), self.source, self.metadata)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers),
                "norms": [round(float(n), 4) for n in self.directions.norm(dim=-1)],
                "source": self.source, **self.metadata}


def save_vector_profile(path: Path, vector: SteeringVector, *, model_fingerprint: str, model_name: str,
                        parameters: dict[str, Any], data: dict[str, Any], quality: dict[str, Any]) -> Path:
    return save_profile(path, method=METHOD, name=vector.name, model_fingerprint=model_fingerprint,
                        model_name=model_name,
                        tensors={"directions": vector.directions.float().cpu(),
                                 "layers": torch.tensor(vector.layers, dtype=torch.int64)},
                        parameters=parameters, data=data, quality=quality)


def load_control_vector_gguf(path: Path | str, name: str | None = None) -> SteeringVector:
    """A llama.cpp control vector (GGUF, tensors `direction.N`) -> SteeringVector whose layer N
    carries direction.N (see the module docstring for why the indices agree). Strength 1 is the
    file as llama.cpp applies it with `--control-vector FILE`; `--control-vector-scaled FILE S` is
    strength S. Directions that are all zero (generators write one per layer) are left out: adding
    them changes nothing."""
    from gguf import GGUFReader, GGMLQuantizationType  # imported here: only this reader needs it

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # the reader raises several types for a file that is not GGUF
        raise ProfileError(f"cannot read control vector {path}: {error}") from error

    def kv(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = kv("general.architecture")

    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _DIRECTION.match(tensor.name)
        if match is None:
            continue
        layer = int(match.group(1))
        if layer == 0:
            raise ProfileError(f"{path}: direction.0 is not a valid control-vector layer (llama.cpp "
                               "numbers them from 1: direction.N is added after layer N)")
        if tensor.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise ProfileError(f"{path}: {tensor.name} has type {tensor.tensor_type.name}; "
                               "control vectors are F32 (F16 is accepted too)")
        values = np.asarray(tensor.data, dtype=np.float32)
        if values.ndim != 1:
            raise ProfileError(f"{path}: {tensor.name} has shape {values.shape}, expected one dimension")
        directions[layer] = torch.from_numpy(values.copy())  # [hidden]
    if not directions:
        raise ProfileError(f"{path}: no direction.N tensors; not a llama.cpp control vector "
                           f"(general.architecture {arch!r}, control vectors say {GGUF_ARCH!r})")
    widths = {v.numel() for v in directions.values()}
    if len(widths) != 1:
        raise ProfileError(f"{path}: direction tensors of different widths {sorted(widths)}")
    layers = sorted(i for i, v in directions.items() if bool(v.any()))
    if not layers:
        raise ProfileError(f"{path}: every direction tensor is zero")
    metadata = {
        "format": "llama.cpp control vector (GGUF)",
        "architecture": arch,
        "model_hint": kv(f"{arch}.model_hint") if arch else None,
        "layer_count": kv(f"{arch}.layer_count") if arch else None,
        "zero_layers_dropped": sorted(set(directions) - set(layers)),
        "layer_convention": "direction.N is added to the residual stream after decoder layer N (0-based), "
                            "as llama.cpp applies it",
    }
    stacked = torch.stack([directions[i] for i in layers])  # [n, hidden]
    return SteeringVector(name or path.stem, tuple(layers), stacked, str(path), metadata)
