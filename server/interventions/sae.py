"""Sparse autoencoders in the SAELens v6 layout (`cfg.json` + `sae_weights.safetensors`).

Only the pieces serving needs live here: read and write the layout (pre-6.0 configs load too),
encode and decode. Training is in `server/calibration/sae.py`. The SAE reads the residual stream
after decoder layer `layer` (hook name `blocks.{layer}.hook_resid_post`, TransformerLens naming).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ARCHITECTURES = ("standard", "topk", "jumprelu")
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
CONFIG_FILE = "cfg.json"
SAE_LENS_FORMAT_VERSION = "6.0.0"
WEIGHTS_FILE = "sae_weights.safetensors"


class SaeFormatError(ValueError):
    """An SAE directory that cannot be used by this server."""


@dataclass(frozen=True)
class SaeConfig:
    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    model_name: str
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    dtype: str = "float32"
    context_size: int | None = None
    # neuronserve's own metadata (fingerprint of the model it was trained on, training figures);
    # SAELens keeps unknown metadata keys, so it travels with the file.
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        match = _HOOK.match(self.hook_name)
        if match is None:
            raise SaeFormatError(f"hook {self.hook_name!r} is not a residual-stream hook "
                                 "(blocks.<layer>.hook_resid_post); this server steers the residual stream only")
        return int(match.group(1))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> SaeConfig:
        """Read a v6 config, or a pre-6.0 one (hook_point / activation_fn_kwargs.k)."""
        metadata = dict(cfg.get("metadata") or {})
        architecture = cfg.get("architecture", "standard")
        k = cfg.get("k")
        activation = cfg.get("activation_fn_str") or cfg.get("activation_fn")
        if activation == "topk" or (k is None and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None):
            architecture = "topk"
            k = k if k is not None else cfg["activation_fn_kwargs"]["k"]
        if architecture not in ARCHITECTURES:
            raise SaeFormatError(f"SAE architecture {architecture!r} is not supported (one of {ARCHITECTURES})")
        hook = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        if not hook:
            raise SaeFormatError("SAE config names no hook (metadata.hook_name, hook_name or hook_point)")
        normalize = cfg.get("normalize_activations") or "none"
        if normalize != "none":
            raise SaeFormatError(f"normalize_activations={normalize!r} is not supported; only 'none'")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise SaeFormatError("rescale_acts_by_decoder_norm=true is not supported")
        known = {"model_name", "hook_name", "context_size", "sae_lens_version"}
        return cls(
            architecture=architecture,
            d_in=int(cfg["d_in"]),
            d_sae=int(cfg["d_sae"]),
            hook_name=hook,
            model_name=metadata.get("model_name") or cfg.get("model_name") or "",
            k=None if k is None else int(k),
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
            normalize_activations=normalize,
            dtype=str(cfg.get("dtype", "float32")).removeprefix("torch."),
            context_size=metadata.get("context_size") or cfg.get("context_size"),
            extra_metadata={k_: v for k_, v in metadata.items() if k_ not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The v6 layout."""
        cfg = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": "none",
            # sae_lens_version marks the v6 layout: SAELens reads a config without it as pre-6.0 and
            # then ignores the metadata block.
            "metadata": {"sae_lens_version": SAE_LENS_FORMAT_VERSION, "model_name": self.model_name,
                         "hook_name": self.hook_name, "context_size": self.context_size, **self.extra_metadata},
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = False  # latents are plain TopK values (SAELens default)
        return cfg


FINGERPRINT_KEY = "neuronserve_model_fingerprint"


def check_model(sae: SparseAutoencoder, hidden_size: int, fingerprint: str | None, num_layers: int | None = None) -> None:
    """Refuse an SAE made for another model: its d_in must be the served model's hidden size, its layer
    must exist, and when the file records the fingerprint of the model it was trained on
    (metadata.neuronserve_model_fingerprint) it must be the served model's."""
    where = f"SAE {sae.name!r}" if sae.name else "SAE"
    if sae.cfg.d_in != hidden_size:
        raise SaeFormatError(f"{where} has d_in={sae.cfg.d_in} but the served model's hidden size is {hidden_size} "
                             f"(made for {sae.cfg.model_name or 'another model'})")
    if num_layers is not None and not 0 <= sae.layer < num_layers:
        raise SaeFormatError(f"{where} reads layer {sae.layer} but the served model has layers 0..{num_layers - 1}")
    recorded = sae.cfg.extra_metadata.get(FINGERPRINT_KEY)
    if recorded and fingerprint and recorded != fingerprint:
        raise SaeFormatError(f"{where} was trained on model {sae.cfg.model_name or '?'} with fingerprint {recorded}, "
                             f"but the served model's fingerprint is {fingerprint}; train one for this model with "
                             "`neuronserve calibrate sae`")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SparseAutoencoder:
    """Weights in float32 on one device. W_enc: [d_in, d_sae], W_dec: [d_sae, d_in]."""

    def __init__(self, cfg: SaeConfig, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor, threshold: torch.Tensor | None = None, name: str = "") -> None:
        expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
                    "b_dec": (cfg.d_in,)}
        for key, tensor in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            if tuple(tensor.shape) != expected[key]:
                raise SaeFormatError(f"{key} has shape {tuple(tensor.shape)}, cfg.json says {expected[key]}")
        if cfg.architecture == "jumprelu" and (threshold is None or tuple(threshold.shape) != (cfg.d_sae,)):
            raise SaeFormatError("a jumprelu SAE needs a threshold of shape [d_sae]")
        if cfg.architecture == "topk" and not cfg.k:
            raise SaeFormatError("a topk SAE needs k")
        self.cfg = cfg
        self.name = name
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = (t.float() for t in (W_enc, b_enc, W_dec, b_dec))
        self.threshold = None if threshold is None else threshold.float()
        self._encoder_product: Callable[[torch.Tensor], torch.Tensor] | None = None

    def use_encoder_product(self, product: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Compute x @ W_enc with `product` (float32 [..., d_in] -> float32 [..., d_sae]) instead of
        torch's matmul: the server passes its CPU kernel on a copy of W_enc, faster than torch's
        float32 matmul for a few decode rows, the same sums up to their order. Moving the SAE to
        another device drops it."""
        self._encoder_product = product

    @property
    def layer(self) -> int:
        return self.cfg.layer

    def to(self, device: torch.device | str) -> SparseAutoencoder:
        self._encoder_product = None
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = (
            t.to(device) for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec))
        if self.threshold is not None:
            self.threshold = self.threshold.to(device)
        return self

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> [..., d_sae]"""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        x = x.float()
        return (x @ self.W_enc if self._encoder_product is None else self._encoder_product(x)) + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "topk":
            values, indices = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        if self.cfg.architecture == "jumprelu":
            return pre * (pre > self.threshold) * (pre > 0)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> latents [..., d_sae]"""
        return self.activation(self.pre_activation(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., d_sae] -> [..., d_in]"""
        return z @ self.W_dec + self.b_dec

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> SparseAutoencoder:
        directory = Path(directory)
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text())
            weights = load_file(str(directory / WEIGHTS_FILE))
        except FileNotFoundError as error:
            raise SaeFormatError(f"{directory} is not an SAE directory ({CONFIG_FILE} + {WEIGHTS_FILE}): {error}") from error
        except Exception as error:
            raise SaeFormatError(f"cannot read SAE {directory}: {error}") from error
        cfg = SaeConfig.from_dict(raw)
        missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in weights]
        if missing:
            raise SaeFormatError(f"SAE {directory} lacks tensors {missing}")
        return cls(cfg, weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"],
                   weights.get("threshold"), name=directory.name).to(device)

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = _DTYPES.get(self.cfg.dtype, torch.float32)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()},
                  str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return directory

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "layer": self.layer, "architecture": self.cfg.architecture,
                "d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae, "k": self.cfg.k,
                "hook_name": self.cfg.hook_name, "model_name": self.cfg.model_name,
                "metadata": self.cfg.extra_metadata}

