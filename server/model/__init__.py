"""Our own Llama-family decoder, its weight loader and its KV cache."""

from server.model.config import ModelConfig
from server.model.llama import LlamaDecoder

__all__ = ["ModelConfig", "LlamaDecoder"]
