"""A prompt chunk and the running rows' decode step in one forward pass (Engine._prefill_and_decode,
LlamaDecoder.forward_rows): the same tokens as separate passes, fewer passes, and only for the
rows it is meant for."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels.dense_cpu import CpuDenseKernel
from server.engine.engine import Engine, EngineLimits
from server.engine.request import GenerationRequest, SamplingParams, StepOutput
from server.metrics import ServerMetrics
from server.runtime import load_model
from server.settings import ServerSettings

pytestmark = pytest.mark.skipif(CpuDenseKernel.load() is None, reason="needs the CPU kernel (AVX2/FMA/F16C and gcc)")

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def add(a, b):",
           "List three colours:", "The quick brown fox"]


class _CountingModel:
    """The real model, counting its passes; `merge` False makes the engine keep separate passes."""

    def __init__(self, model, merge: bool = True) -> None:
        self._model, self._merge = model, merge
        self.passes = self.merged_passes = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        self.passes += 1
        return self._model(*args, **kwargs)

    def can_forward_rows(self, prompt_rows: int, decode_rows: int, sparse: bool = False) -> bool:
        return self._merge and self._model.can_forward_rows(prompt_rows, decode_rows, sparse)

    def forward_rows(self, *args, **kwargs):
        self.passes += 1
        self.merged_passes += 1
        return self._model.forward_rows(*args, **kwargs)


@pytest.fixture(scope="module")
def loaded():
    return load_model(ServerSettings(max_model_len=128, log_level="warning", load_interventions=False))


def _run_engine(loaded, model, requests: list[GenerationRequest],
                loop: asyncio.AbstractEventLoop | None = None) -> tuple[Engine, list[list[StepOutput]]]:
    """Step an engine over `requests` until they finish (on `loop`, else a new one) -> the engine
    and each request's outputs in order."""
    limits = EngineLimits(max_batch_size=8, max_model_len=128, max_queued_requests=16, prefill_chunk_tokens=64)
    engine = Engine(model, loaded.tokenizer, limits, ServerMetrics("test"))

    async def go():
        streams = engine.submit(requests)
        engine.drain_incoming()
        while engine.has_work:
            engine.step()
            await asyncio.sleep(0)
        outputs = []
        for stream in streams:
            outputs.append([out async for out in stream])
        for outs in outputs:
            assert all(out.error is None for out in outs), [out.error for out in outs]
        return outputs

    loop = loop or asyncio.new_event_loop()
    try:
        return engine, loop.run_until_complete(go())
    finally:
        loop.close()


def _generate(loaded, model, requests: list[GenerationRequest]) -> list[list[int]]:
    return [[t for out in outs for t in out.token_ids] for outs in _run_engine(loaded, model, requests)[1]]


def _requests(loaded, sparsity: float = 0.0, prompt_logprobs: int | None = None) -> list[GenerationRequest]:
    out = []
    for i, text in enumerate(PROMPTS):
        params = SAMPLED if i == 2 else GREEDY
        if prompt_logprobs is not None and i == 3:
            params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=prompt_logprobs)
        out.append(GenerationRequest(f"r{i}", tuple(loaded.tokenizer.encode(text)), params,
                                     sparsity=sparsity if i == 1 else 0.0))
    return out


def test_prompt_chunks_share_the_decode_pass_with_the_same_tokens(loaded):
    merged, separate = _CountingModel(loaded.model), _CountingModel(loaded.model, merge=False)
    together = _generate(loaded, merged, _requests(loaded))
    apart = _generate(loaded, separate, _requests(loaded))
    assert together == apart and all(len(t) == 10 for t in together)
    # the first prompt prefills alone; each later one beside the running rows' decode step (and
    # joins them from the next step, where a separate prefill's sequence joins the same step's)
    assert merged.merged_passes == len(PROMPTS) - 1 and separate.merged_passes == 0
    assert merged.passes < separate.passes


def test_rows_that_need_their_own_pass_keep_it(loaded):
    requests = _requests(loaded, prompt_logprobs=2)
    merged, separate = _CountingModel(loaded.model), _CountingModel(loaded.model, merge=False)
    assert _generate(loaded, merged, requests) == _generate(loaded, separate, requests)
    # a prompt that wants its logprobs (the fourth) prefills in its own pass
    assert merged.merged_passes == len(PROMPTS) - 2


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparse_rows_share_the_pass_with_their_own_tokens_and_sparsity(loaded, sparsity):
    """Sparse prompts and sparse decode rows merge too (where the fused layers run sparse rows):
    every request gets the tokens and the achieved sparsity of separate passes. Here every request
    is sparse but the third (dense, sampled) and the fourth (half the target)."""
    if loaded.model.sparse_chunk_tokens is None:
        pytest.skip("no fused sparse layers here (no WINA profile or no CPU kernel)")
    requests = [GenerationRequest(r.request_id, r.prompt_token_ids, r.params, sparsity={2: 0.0, 3: sparsity / 2}.get(i, sparsity))
                for i, r in enumerate(_requests(loaded))]
    merged, separate = _CountingModel(loaded.model), _CountingModel(loaded.model, merge=False)
    together = _achieved(loaded, merged, requests)
    apart = _achieved(loaded, separate, requests)
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in apart]
    for (_, a), (_, b), request in zip(together, apart, requests):
        assert abs(a - b) < 1e-6 and (a > 0.1) == (request.sparsity > 0), (a, b)
    assert merged.merged_passes == len(PROMPTS) - 1 and separate.merged_passes == 0


def test_forward_rows_gives_each_row_its_own_pass_numbers(loaded):
    model = loaded.model
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    history, prompt = torch.randint(0, V, (3, 12), generator=g), torch.randint(0, V, (1, 9), generator=g)
    next_tokens = torch.randint(0, V, (3, 1), generator=g)
    caches = [model.new_cache(4), model.new_cache(4)]
    for cache in caches:
        for b in range(3):
            model(history[b:b + 1], torch.tensor([b]), torch.tensor([0]), cache)
    prompt_logits = model(prompt, torch.tensor([3]), torch.tensor([0]), caches[0])  # [1, V]
    decode_logits = model(next_tokens, torch.arange(3), torch.full((3,), 12), caches[0])  # [3, V]
    rows = model.forward_rows(torch.cat([prompt[0], next_tokens[:, 0]]), torch.tensor([3] * 9 + [0, 1, 2]),
                              torch.cat([torch.arange(9), torch.full((3,), 12)]), caches[1], torch.arange(8, 12))
    assert torch.equal(rows[0], prompt_logits[0]) and torch.equal(rows[1:], decode_logits)
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)
    too_many = 2 * CpuDenseKernel.MAX_ROWS + 1
    with pytest.raises(ValueError, match="forward_rows takes 1 to"):
        model.forward_rows(torch.zeros(too_many, dtype=torch.long), torch.zeros(too_many, dtype=torch.long),
                           torch.arange(too_many), caches[1], torch.tensor([0]))
    assert model.can_forward_rows(CpuDenseKernel.MAX_ROWS, 8) and not model.can_forward_rows(CpuDenseKernel.MAX_ROWS + 1, 1)


def test_forward_rows_gives_sparse_rows_their_own_pass_numbers(loaded):
    """A sparse prompt chunk beside decode rows at 0.9, dense and 0.5: logits and kept counts, bit
    for bit, those of the chunk's pass and of the decode step's pass."""
    model = loaded.model
    if model.sparse_chunk_tokens is None:
        pytest.skip("no fused sparse layers here (no WINA profile or no CPU kernel)")
    ids = loaded.tokenizer.encode(" ".join(PROMPTS))
    history, prompt, next_tokens = (torch.tensor([ids[3 * b:3 * b + 12] for b in range(3)]),
                                    torch.tensor([ids[:9]]), torch.tensor([[ids[20]], [ids[21]], [ids[22]]]))
    targets = [0.9, 0.0, 0.5]
    caches = [model.new_cache(4), model.new_cache(4)]
    for cache in caches:
        for b in range(3):
            model(history[b:b + 1], torch.tensor([b]), torch.tensor([0]), cache)
    chunk_plan, step_plan = model.sparsity_plan([0.5], 9), model.sparsity_plan(targets, 1)
    prompt_logits = model(prompt, torch.tensor([3]), torch.tensor([0]), caches[0], sparsity=chunk_plan)  # [1, V]
    decode_logits = model(next_tokens, torch.arange(3), torch.full((3,), 12), caches[0], sparsity=step_plan)  # [3, V]
    rows_plan = model.sparsity_plan([0.5] * 9 + targets, 1)
    rows = model.forward_rows(torch.cat([prompt[0], next_tokens[:, 0]]), torch.tensor([3] * 9 + [0, 1, 2]),
                              torch.cat([torch.arange(9), torch.full((3,), 12)]), caches[1], torch.arange(8, 12),
                              sparsity=rows_plan)
    assert torch.equal(rows[0], prompt_logits[0]) and torch.equal(rows[1:], decode_logits)
    assert torch.equal(rows_plan.kept, torch.cat([chunk_plan.kept, step_plan.kept], dim=1))
    assert int(rows_plan.kept.sum()) > 0
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)
    with pytest.raises(ValueError, match="one token per row"):
        model.forward_rows(prompt[0], torch.tensor([3] * 9), torch.arange(9), caches[1], torch.tensor([8]),
                           sparsity=chunk_plan)


class _CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the callbacks handed to it from outside (the engine's)."""

    def __init__(self) -> None:
        super().__init__()
        self.handoffs = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.handoffs += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_each_step_hands_its_outputs_to_the_event_loop_at_once(loaded):
    """Five streams decoding together: one wake-up of the event loop per step (and one more where a
    prompt's first token comes from a pass of its own), not one per stream; every token still
    arrives, in order, once."""
    requests = [GenerationRequest(f"r{i}", tuple(loaded.tokenizer.encode(text)), GREEDY)
                for i, text in enumerate(PROMPTS)]
    loop = _CountingLoop()
    engine, outputs = _run_engine(loaded, loaded.model, requests, loop)
    assert [sum(len(o.token_ids) for o in outs) for outs in outputs] == [GREEDY.max_tokens] * len(PROMPTS)
    assert all(outs[-1].finished and not any(o.finished for o in outs[:-1]) for outs in outputs)
    assert loop.handoffs <= engine.steps + len(PROMPTS) < sum(len(outs) for outs in outputs)


class _PlanCountingModel(_CountingModel):
    """The real model, counting the sparsity plans it builds."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.plans_built = 0

    def sparsity_plan(self, targets, tokens_per_row):
        self.plans_built += 1
        return self._model.sparsity_plan(targets, tokens_per_row)


def _achieved(loaded, model, requests: list[GenerationRequest]) -> list[tuple[list[int], float]]:
    """Each request's tokens and the sparsity it reports achieving."""
    return [([t for out in outs for t in out.token_ids], outs[-1].sparsity_achieved)
            for outs in _run_engine(loaded, model, requests)[1]]


def test_decode_steps_reuse_the_sparsity_plan_while_the_targets_stay(loaded):
    """The plan is rebuilt when the batch's targets change (here when the 0.9 row finishes), not every
    step, and the 0.5 row gets the tokens and the achieved sparsity it gets alone."""
    if loaded.model.wina is None:
        pytest.skip("no WINA profile loaded")
    ids = tuple(loaded.tokenizer.encode(PROMPTS[1]))
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    alone = _achieved(loaded, _PlanCountingModel(loaded.model), [GenerationRequest("a", ids, long, sparsity=0.5)])
    model = _PlanCountingModel(loaded.model)
    together = _achieved(loaded, model, [GenerationRequest("a", ids, long, sparsity=0.5),
                                         GenerationRequest("b", tuple(loaded.tokenizer.encode(PROMPTS[0])), short,
                                                           sparsity=0.9)])
    assert together[0] == alone[0]
    assert 0.3 < alone[0][1] < 0.8 and together[1][1] > alone[0][1]
    # prompt chunks build their own plans (one per prefill step); decode steps one per change of targets
    decode_steps = long.max_tokens - 1
    assert model.plans_built < decode_steps, model.plans_built


class _ChunkRecordingModel(_CountingModel):
    """The real model, recording the token count of each prompt pass it runs on its own."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.prompt_chunks: list[int] = []

    def __call__(self, tokens, *args, **kwargs):
        if tokens.shape[1] > 1:
            self.prompt_chunks.append(tokens.shape[1])
        return super().__call__(tokens, *args, **kwargs)


def test_sparse_prompts_prefill_in_chunks_the_fused_layers_take(loaded):
    """With prefill_chunk_tokens 128, a dense 100-token prompt prefills in one pass, a sparse one in
    chunks of at most CpuDenseKernel.MAX_ROWS (64) tokens, the longest the fused layers take (that
    such a chunk runs fused, with its tokens' decode numbers: tests/test_wina_model.py)."""
    if loaded.model.sparse_chunk_tokens is None:
        pytest.skip("no fused sparse layers here (no WINA profile or no CPU kernel)")
    prompt = tuple((loaded.tokenizer.encode(" ".join(PROMPTS)) * 8)[:100])
    limits = EngineLimits(max_batch_size=8, max_model_len=128, max_queued_requests=16, prefill_chunk_tokens=128)
    chunks = {}
    for sparsity in (0.0, 0.5):
        model = _ChunkRecordingModel(loaded.model)
        engine = Engine(model, loaded.tokenizer, limits, ServerMetrics("test"))
        request = GenerationRequest("r", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                    sparsity=sparsity)

        async def go(engine=engine, request=request):
            [stream] = engine.submit([request])
            engine.drain_incoming()
            while engine.has_work:
                engine.step()
                await asyncio.sleep(0)
            return [out async for out in stream]

        loop = asyncio.new_event_loop()
        try:
            outputs = loop.run_until_complete(go())
        finally:
            loop.close()
        assert outputs[-1].finished and outputs[-1].error is None
        chunks[sparsity] = model.prompt_chunks
    assert chunks[0.0] == [100] and chunks[0.5] == [64, 36]
