"""Profiles: what a calibration command writes and the server loads (DESIGN.md).

A profile is one safetensors file: its tensors, and a JSON header stored in the file's own
`__metadata__` under the key "neuronserve" (so any safetensors reader sees both, and the header
cannot drift from the tensors it describes). The header records the method, the profile's name,
the model fingerprint it was made for, the parameters, the data used and the quality figures
measured at calibration time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
HEADER_KEY = "neuronserve"


class ProfileError(ValueError):
    """A profile that cannot be used: unreadable, wrong method, or made for another model."""


class OtherModelProfileError(ProfileError):
    """A readable profile made for another model than the served one."""

    def __init__(self, message: str, made_for_name: str | None) -> None:
        super().__init__(message)
        self.made_for_name = made_for_name

    def in_own_model_directory(self, path: Path) -> bool:
        """The file sits in `profiles/<slug of the model it was made for>/`, the layout the
        calibration commands write: finding it while serving another model is expected."""
        return self.made_for_name is not None and path.parent.name == model_slug(self.made_for_name)


@dataclass(frozen=True)
class Profile:
    path: Path
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.header["name"]

    @property
    def method(self) -> str:
        return self.header["method"]

    def check_model(self, fingerprint: str, model_name: str) -> None:
        made_for = self.header.get("model_fingerprint")
        if made_for != fingerprint:
            raise OtherModelProfileError(
                f"profile {self.path} ({self.method} {self.name!r}) was made for model "
                f"{self.header.get('model_name')!r} (fingerprint {made_for}), not the served model "
                f"{model_name!r} (fingerprint {fingerprint}); recalibrate it for this model",
                self.header.get("model_name"),
            )


def model_slug(name: str) -> str:
    """The directory name for a model's profiles: `<cache>/profiles/<model slug>/`."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name.lower()).strip("-") or "model"


def save_profile(path: Path, *, method: str, name: str, model_fingerprint: str, model_name: str,
                 tensors: dict[str, torch.Tensor], parameters: dict[str, Any], data: dict[str, Any],
                 quality: dict[str, Any]) -> Path:
    header = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "name": name,
        "model_fingerprint": model_fingerprint,
        "model_name": model_name,
        "parameters": parameters,
        "data": data,
        "quality": quality,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    return path


def load_profile(path: Path) -> Profile:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises several types for a bad file
        raise ProfileError(f"cannot read profile {path}: {error}") from error
    if HEADER_KEY not in metadata:
        raise ProfileError(f"{path} is a safetensors file without a neuronserve profile header")
    header = json.loads(metadata[HEADER_KEY])
    if header.get("format_version") != FORMAT_VERSION:
        raise ProfileError(f"{path}: profile format {header.get('format_version')}, this server reads {FORMAT_VERSION}")
    return Profile(path, header, tensors)


def find_profiles(directories: list[Path], method: str) -> list[Path]:
    """Every `<method>-*.safetensors` file in the given directories and their subdirectories (one
    per model, by convention), directory by directory, sorted by path."""
    found: list[Path] = []
    for directory in directories:
        if directory.is_dir():
            found.extend(sorted(directory.glob(f"**/{method}-*.safetensors")))
    return found
