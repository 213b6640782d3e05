"""Python client and CLI for the neuronserve HTTP API (sync and async, streaming or not).

    from clients import NeuronServeClient
    with NeuronServeClient() as c:
        print(c.complete("Once upon a time", max_tokens=32, sparsity=0.5).text)
"""

from ._core import DEFAULT_BASE_URL, GenerationParams, StreamParams, StreamParser, __version__
from .client import AsyncNeuronServeClient, NeuronServeClient
from .types import (
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    Completion,
    CompletionChoice,
    Health,
    ModelInfo,
    NeuronServeConnectionError,
    NeuronServeError,
    NeuronServeTimeoutError,
    SparsityInfo,
    StreamChoice,
    StreamChunk,
    Tokenized,
    Usage,
)

__all__ = [
    "AsyncNeuronServeClient",
    "ChatChoice",
    "ChatCompletion",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "DEFAULT_BASE_URL",
    "GenerationParams",
    "Health",
    "ModelInfo",
    "NeuronServeClient",
    "NeuronServeConnectionError",
    "NeuronServeError",
    "NeuronServeTimeoutError",
    "SparsityInfo",
    "StreamChoice",
    "StreamChunk",
    "StreamParams",
    "StreamParser",
    "Tokenized",
    "Usage",
    "__version__",
]
