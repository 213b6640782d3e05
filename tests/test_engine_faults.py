"""A request that fails inside the engine fails alone: its slot comes back, the other rows of the
batch go on with the tokens they would have had alone."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.engine import NON_FINITE_LOGITS_ERROR, Engine, EngineLimits
from server.engine.request import GenerationRequest, SamplingParams
from server.metrics import ServerMetrics
from server.runtime import load_model
from server.settings import ServerSettings

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class _NanLogitsForSlots:
    """The real model, except that the rows in `poisoned` slots get NaN logits, as a row whose
    intervention overflowed the residual stream does."""

    def __init__(self, model) -> None:
        self._model = model
        self.poisoned: set[int] = set()
        self.bad_value = float("nan")
        self.bad_token: int | None = None  # None: the whole row; else that one logit

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, tokens, slots, starts, cache, **kwargs):
        logits = self._model(tokens, slots, starts, cache, **kwargs).clone()
        for row, slot in enumerate(slots.tolist()):
            if slot in self.poisoned:
                self._spoil(logits, row)
        return logits

    def _spoil(self, logits, row: int) -> None:
        if self.bad_token is None:
            logits[row] = self.bad_value
        else:
            logits[row, self.bad_token] = self.bad_value

    def forward_rows(self, tokens, slots, positions, cache, logit_rows, **kwargs):  # a chunk beside decode rows
        logits = self._model.forward_rows(tokens, slots, positions, cache, logit_rows, **kwargs).clone()
        for row, slot in enumerate(slots[logit_rows].tolist()):
            if slot in self.poisoned:
                self._spoil(logits, row)
        return logits


@pytest.fixture(scope="module")
def loaded():
    return load_model(ServerSettings(max_model_len=128, wina_profile="none", dtype="float32",
                                     load_interventions=False, log_level="warning"))


def _engine(model, tokenizer) -> Engine:
    limits = EngineLimits(max_batch_size=4, max_model_len=128, max_queued_requests=16, prefill_chunk_tokens=64)
    return Engine(model, tokenizer, limits, ServerMetrics("test"))


def _run(engine: Engine, requests: list[GenerationRequest], before_step=None) -> list[dict]:
    """Step the engine in-process until idle; per request: its tokens, finish reason, error."""

    async def go():
        streams = engine.submit(requests)
        engine.drain_incoming()
        first_step = engine.steps
        while engine.has_work:
            if before_step is not None:
                before_step(engine.steps - first_step)
            engine.step()
            await asyncio.sleep(0)
        results = []
        for stream in streams:
            got = {"tokens": [], "reason": None, "error": None, "status": None}
            async for out in stream:
                got["tokens"] += out.token_ids
                got["reason"], got["error"], got["status"] = out.finish_reason, out.error, out.error_status
            results.append(got)
        return results

    return asyncio.run(go())


def _request(loaded, rid: str, text: str, params: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest(rid, tuple(loaded.tokenizer.encode(text)), params)


def _all_slots_free(engine: Engine) -> bool:
    return engine.num_unfinished == 0 and sorted(engine._free_slots) == list(range(engine.limits.max_batch_size))


@pytest.mark.parametrize("poison_from_step", [0, 4])  # 0: at its first token (after prefill); 4: mid-decode
def test_non_finite_logits_fail_only_their_row(loaded, poison_from_step):
    model = _NanLogitsForSlots(loaded.model)
    engine = _engine(model, loaded.tokenizer)
    alone = _run(engine, [_request(loaded, "a", "The capital of France is")])[0]
    assert alone["error"] is None and len(alone["tokens"]) == 8

    def poison(step):  # the second request takes slot 1
        if step >= poison_from_step:
            model.poisoned = {1}

    got = _run(engine, [_request(loaded, "a", "The capital of France is"),
                        _request(loaded, "b", "Once upon a time")], before_step=poison)
    assert got[0] == alone
    assert got[1]["reason"] == "abort" and got[1]["error"] == NON_FINITE_LOGITS_ERROR and got[1]["status"] == 400
    assert len(got[1]["tokens"]) < 8
    assert _all_slots_free(engine)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_logit_fails_its_row(loaded, bad_value):
    """A single bad logit among finite ones is enough (the check reduces each row to its largest and
    smallest logit)."""
    model = _NanLogitsForSlots(loaded.model)
    model.bad_value, model.bad_token = bad_value, 1234
    engine = _engine(model, loaded.tokenizer)

    def poison(step):
        if step >= 2:
            model.poisoned = {1}

    got = _run(engine, [_request(loaded, "a", "The capital of France is"),
                        _request(loaded, "b", "Once upon a time")], before_step=poison)
    assert got[0]["error"] is None and len(got[0]["tokens"]) == 8
    assert got[1]["reason"] == "abort" and got[1]["error"] == NON_FINITE_LOGITS_ERROR
    assert _all_slots_free(engine)


def test_a_request_failing_in_sampling_frees_its_slot_and_spares_the_batch(loaded):
    """A sampling parameter the controls cannot hold (an int64 overflow) used to leave its sequence
    neither prefilling nor running: no answer, a slot lost for good."""
    engine = _engine(loaded.model, loaded.tokenizer)
    overflowing = SamplingParams(max_tokens=8, temperature=1.0, top_k=2**70, seed=0)
    got = _run(engine, [_request(loaded, "a", "The capital of France is"),
                        _request(loaded, "b", "Once upon a time", overflowing)])
    assert got[0]["error"] is None and len(got[0]["tokens"]) == 8
    assert got[1]["reason"] == "abort" and "internal error" in got[1]["error"] and got[1]["status"] == 500
    assert _all_slots_free(engine)
    again = _run(engine, [_request(loaded, "c", "Hello")])[0]
    assert again["error"] is None and len(again["tokens"]) == 8
