"""Batch generation in-process, through the real engine (continuous batching, per-row sampling and
interventions), for calibration commands and benchmarks: what they measure is what the server does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from server.engine.engine import Engine, EngineLimits
from server.engine.request import GenerationRequest, SamplingParams
from server.interventions.registry import InterventionRegistry
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.runtime import LoadedModel


@dataclass(frozen=True)
class Generated:
    token_ids: list[int]
    text: str
    finish_reason: str | None


class OfflineGenerator:
    def __init__(self, loaded: LoadedModel, registry: InterventionRegistry | None = None,
                 max_batch_size: int = 8, prefill_chunk_tokens: int = 256, merge_prompt_chunks: bool = True) -> None:
        """merge_prompt_chunks: as Engine's (off only to measure what merging saves)."""
        self.loaded = loaded
        self.registry = registry or loaded.interventions or InterventionRegistry(
            loaded.model, loaded.fingerprint, loaded.name)
        limits = EngineLimits(max_batch_size=max_batch_size, max_model_len=loaded.model.max_model_len,
                              max_queued_requests=1 << 30, prefill_chunk_tokens=prefill_chunk_tokens)
        self.engine = Engine(loaded.model, loaded.tokenizer, limits, ServerMetrics(loaded.name), merge_prompt_chunks)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 interventions: list[list[dict] | None] | None = None, sparsity: float = 0.0,
                 progress: str | None = None) -> list[Generated]:
        """One Generated per prompt, in order. `interventions[i]`: request entries for prompt i."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        interventions = interventions or [None] * len(prompts)
        if not len(prompts) == len(params) == len(interventions):
            raise ValueError("prompts, params and interventions differ in length")
        requests = [GenerationRequest(f"offline-{i}", tuple(ids), p, sparsity, self.registry.resolve(iv))
                    for i, (ids, p, iv) in enumerate(zip(prompts, params, interventions))]
        return asyncio.run(self._run(requests, progress))

    async def _run(self, requests: list[GenerationRequest], progress: str | None) -> list[Generated]:
        engine = self.engine
        streams = engine.submit(requests)
        bar = tqdm(total=len(requests), desc=progress, disable=progress is None)
        engine.drain_incoming()
        while engine.has_work:
            engine.step()
            await asyncio.sleep(0)  # let the streams' queues take what the step delivered
            bar.update(len(requests) - engine.num_unfinished - bar.n)
        bar.close()
        results = []
        for stream in streams:
            ids, text, reason = [], [], None
            async for out in stream:
                if out.error:
                    raise RuntimeError(f"generation failed: {out.error}")
                ids.extend(out.token_ids)
                text.append(out.text)
                reason = out.finish_reason
            results.append(Generated(ids, "".join(text), reason))
        return results
