"""Typed model configuration, read from a transformers `LlamaConfig`-like object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope_type: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # The transformers config, kept only to compute RoPE frequencies for scaled variants.
    hf_config: Any = field(default=None, compare=False, repr=False)

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a Llama-family decoder this server runs "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not SwiGLU's silu")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # qwen2 has q/k/v biases without declaring attention_bias.
            attention_bias=bool(getattr(hf_config, "attention_bias", model_type == "qwen2")),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            rope_type=rope_type,
            bos_token_id=hf_config.bos_token_id,
            eos_token_ids=eos_ids,
            hf_config=hf_config,
        )

    def rope_inv_freq(self, max_model_len: int) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim // 2] and the cos/sin scale of this model's RoPE variant.

        Scaled variants (linear, llama3, yarn, longrope, dynamic) use transformers' own formulas.
        Dynamic NTK is evaluated once at `max_model_len`, not re-scaled per sequence length.
        """
        if self.rope_type == "default":
            params = getattr(self.hf_config, "rope_parameters", None) or {}
            theta = params.get("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0))
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            return 1.0 / (theta**exponents), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"RoPE type {self.rope_type!r} is not supported")
        kwargs = {"seq_len": max_model_len} if self.rope_type == "dynamic" else {}
        inv_freq, scale = ROPE_INIT_FUNCTIONS[self.rope_type](self.hf_config, torch.device("cpu"), **kwargs)
        return inv_freq.float(), float(scale)
