"""Build a ready-to-serve engine from settings: load, re-lay, allocate the cache, warm up."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.cpu_build import pick_instruction_set, supported_instruction_sets
from kernels.dense_cpu import CpuDenseKernel
from server.engine.engine import Engine, EngineLimits
from server.interventions.registry import InterventionRegistry
from server.metrics import ServerMetrics
from server.model.config import ModelConfig
from server.model.llama import LlamaDecoder
from server.model.loader import load_checkpoint
from server.model.sparsity import WinaTable
from server.profiles import Profile, ProfileError, find_profiles, load_profile
from server.settings import ServerSettings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device "
                           f"(torch {torch.__version__}; see the README for a CUDA build)")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # On CPU, fp16 decodes as fast as bf16 or faster (39.4 vs 31.2 tok/s in the last run) and,
        # unlike bf16, keeps greedy output equal to fp32 on the test prompts (benchmarks/decode.py
        # checks both each run; benchmarks/RESULTS.md has the numbers).
        return torch.float16 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[setting]


@dataclass
class LoadedModel:
    model: LlamaDecoder
    tokenizer: object
    name: str
    fingerprint: str
    load_seconds: float
    from_cache: bool
    wina_profile: Profile | None = None
    interventions: InterventionRegistry | None = None


def load_model(settings: ServerSettings) -> LoadedModel:
    started = time.monotonic()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    ckpt = load_checkpoint(settings.model, settings.cache_dir)
    config = ModelConfig.from_hf(ckpt.hf_config)
    dense_kernel = None
    if device.type == "cpu" and settings.cpu_dense_kernel:
        if pick_instruction_set(settings.cpu_instruction_set) is None and settings.cpu_instruction_set != "auto":
            raise ValueError(f"cpu_instruction_set={settings.cpu_instruction_set}: this CPU lacks its instructions "
                             f"(it runs: {[isa.name for isa in supported_instruction_sets()] or 'none'})")
        dense_kernel = CpuDenseKernel.load(settings.cache_dir / "kernels", settings.cpu_instruction_set,
                                           settings.wina_cpu_sparse_kernel_max_kept)
    model = LlamaDecoder(config, ckpt.state_dict, dtype, device, settings.max_model_len, dense_kernel)
    del ckpt.state_dict
    name = settings.served_model_name or ckpt.name
    wina = find_wina_profile(settings, ckpt.fingerprint, name)
    if wina is not None:
        attach_wina(model, wina, settings)
    registry = InterventionRegistry(model, ckpt.fingerprint, name)
    if settings.load_interventions:
        registry.load(settings.profiles)
    elapsed = time.monotonic() - started
    logger.info("loaded %s (%s, %s, %s%s) in %.1f s%s", name, ckpt.source, dtype, device,
                "" if dense_kernel is None else f", CPU kernel {dense_kernel.instruction_set}", elapsed,
                " from cache" if ckpt.from_cache else "")
    return LoadedModel(model, ckpt.tokenizer, name, ckpt.fingerprint, elapsed, ckpt.from_cache, wina, registry)


def find_wina_profile(settings: ServerSettings, fingerprint: str, model_name: str) -> Profile | None:
    """The WINA profile the settings name, made for this model. A path given explicitly must fit
    the model (else start-up fails); profiles found by name in the directories that were made for
    other models are passed over."""
    wanted = settings.wina_profile
    if wanted == "none":
        return None
    if wanted.endswith(".safetensors") or Path(wanted).is_file():
        profile = load_profile(Path(wanted))
        if profile.method != "wina":
            raise ProfileError(f"{wanted} is a {profile.method!r} profile, not a WINA one")
        profile.check_model(fingerprint, model_name)
        return profile
    seen = []
    for path in find_profiles(settings.profiles, "wina"):
        try:
            profile = load_profile(path)
        except ProfileError as error:
            logger.warning("skipping %s", error)
            continue
        if profile.header.get("model_fingerprint") != fingerprint:
            continue
        seen.append(profile.name)
        if profile.name == wanted:
            logger.info("WINA sparsity profile %r from %s", wanted, path)
            return profile
    where = ", ".join(map(str, settings.profiles))
    if "wina_profile" in settings.model_fields_set:  # a name the user gave: a typo must not pass quietly
        raise ProfileError(f"no WINA profile {wanted!r} for this model in {where} (found: {', '.join(seen) or 'none'})")
    logger.warning("no WINA profile %r for this model in %s (found: %s); requests asking for sparsity "
                   "get 400. Make one with `neuronserve calibrate wina`.", wanted, where, ", ".join(seen) or "none")
    return None


def attach_wina(model: LlamaDecoder, profile: Profile, settings: ServerSettings) -> None:
    from kernels.wina_cpu import CpuWinaKernel

    table = WinaTable(profile.header["parameters"]["criterion"], profile.tensors["levels"].float(),
                      profile.tensors["thresholds"].float())
    kernel = (CpuWinaKernel.load(settings.cache_dir / "kernels", settings.cpu_instruction_set)
              if model.device.type == "cpu" else None)
    model.attach_sparsity(table, kernel, settings.wina_gpu_kernel)


def launch_engine(settings: ServerSettings) -> tuple[Engine, LoadedModel]:
    """Load the model, warm it up and run the engine loop, all in one dedicated thread (every
    torch op of the model then runs on that thread: see Engine.run). Returns once it serves."""
    ready = threading.Event()
    result: dict = {}

    def body() -> None:
        try:
            loaded = load_model(settings)
            engine = build_engine(loaded, settings, ServerMetrics(loaded.name))
            if settings.warmup:
                warm_up(engine)
            result.update(engine=engine, loaded=loaded)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc
            return
        finally:
            ready.set()
        engine.run()

    threading.Thread(target=body, name="neuronserve-model", daemon=True).start()
    ready.wait()
    if "error" in result:
        raise result["error"]
    return result["engine"], result["loaded"]


def build_engine(loaded: LoadedModel, settings: ServerSettings, metrics: ServerMetrics) -> Engine:
    limits = EngineLimits(
        max_batch_size=settings.max_batch_size,
        max_model_len=settings.max_model_len,
        max_queued_requests=settings.max_queued_requests,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
    )
    return Engine(loaded.model, loaded.tokenizer, limits, metrics)


def warm_up(engine: Engine) -> None:
    """One chunked prefill and a few batched decode steps, outside any request, so that the first
    real request does not pay for lazy allocations."""
    model = engine.model
    device = model.device
    slots = min(engine.limits.max_batch_size, 2)
    tokens = torch.zeros(1, 8, dtype=torch.long, device=device)
    for slot in range(slots):
        model(tokens, torch.tensor([slot], device=device), torch.tensor([0], device=device), engine.cache)
    for step in range(2):
        # the second step runs the sparse path when a WINA profile is loaded, so that its first
        # use in a request pays no one-time cost either
        plan = model.sparsity_plan([0.5] * slots, 1) if step == 1 else None
        model(torch.zeros(slots, 1, dtype=torch.long, device=device), torch.arange(slots, device=device),
              torch.full((slots,), 8 + step, device=device), engine.cache, sparsity=plan)
