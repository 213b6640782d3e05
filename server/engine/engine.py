"""The continuous-batching engine.

One worker thread owns the model and the KV cache. Each step it (1) takes in new requests and
aborts, (2) gives free slots to waiting sequences, (3) prefills one chunk of at most
`prefill_chunk_tokens` of one prompt (a sparse prompt: at most `model.sparse_chunk_tokens`, the
longest chunk the CPU kernel runs fused), and (4) advances every running sequence by one token in one
batched forward pass; where the CPU kernel takes them together (a short chunk, rows without
interventions), (3) and (4) are one pass that reads the weights once. The asyncio
side only enqueues requests and reads per-request queues, so the API stays responsive while the
model computes.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.controls import BatchControls
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import GenerationRequest, StepOutput, TokenLogprob
from server.engine.sampling import finite_rows, sample
from server.interventions.plan import InterventionPlan
from server.metrics import ServerMetrics
from server.model.llama import LlamaDecoder
from server.model.sparsity import SparsityPlan

logger = logging.getLogger(__name__)

NON_FINITE_LOGITS_ERROR = ("the model's logits for this request became infinite or NaN; an intervention's "
                           "strength or clamp value is most likely too large for the residual stream")


class RequestStream:
    """The outputs of one sequence, in order. Closing it before the end aborts the sequence."""

    def __init__(self, engine: "Engine", request_id: str, queue: "asyncio.Queue[StepOutput]") -> None:
        self._engine = engine
        self.request_id = request_id
        self._queue = queue
        self._finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StepOutput:
        if self._finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self._finished = out.finished
        return out

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine.abort(self.request_id)


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit: the API answers 429."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests: the API answers 503."""


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_model_len: int
    max_queued_requests: int
    prefill_chunk_tokens: int


@dataclass(frozen=True)
class _Sink:
    """Where a sequence's outputs go: a queue that belongs to one event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepOutput]


def _put_all(items: list[tuple[asyncio.Queue[StepOutput], StepOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


@dataclass
class _Sequence:
    request: GenerationRequest
    sink: _Sink
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    arrival: float
    slot: int | None = None
    num_cached: int = 0  # tokens whose keys/values are in the slot
    output_ids: list[int] = field(default_factory=list)
    num_emitted_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    scheduled_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False
    skipped_weight_tokens: float = 0.0  # sum over processed tokens of the share of weights skipped
    sparse_tokens: int = 0

    def sparsity_achieved(self) -> float:
        return self.skipped_weight_tokens / self.sparse_tokens if self.sparse_tokens else 0.0

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids


def _top(ids: torch.Tensor | None, lps: torch.Tensor | None, row: int, n: int) -> tuple:
    if n <= 0 or ids is None:
        return ()
    return tuple(zip(ids[row, :n].tolist(), lps[row, :n].tolist()))


class Engine:
    def __init__(self, model: LlamaDecoder, tokenizer: Any, limits: EngineLimits,
                 metrics: ServerMetrics, merge_prompt_chunks: bool = True) -> None:
        """merge_prompt_chunks: run a prompt chunk and the decode step in one pass where the model
        can (see _merges_with_decode); off only to measure what that saves
        (benchmarks/engine_throughput.py)."""
        self.model = model
        self.merge_prompt_chunks = merge_prompt_chunks
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.cache = model.new_cache(limits.max_batch_size)
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: collections.deque[_Sequence] = collections.deque()
        self._aborts: set[str] = set()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._prefilling: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        # a min-heap: new sequences take the lowest free slot, so the running batch's slots stay one
        # contiguous range and the model reads their KV cache as a view instead of gathering it
        self._free_slots = list(range(limits.max_batch_size))
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self._decode_edits_key: tuple | None = None
        self._decode_edits_plan: InterventionPlan | None = None
        self._decode_sparsity_key: tuple | None = None
        self._decode_sparsity_plan: SparsityPlan | None = None
        # a step's outputs, handed to the event loop together when the step ends: one wake-up of
        # the loop per step instead of one per stream (benchmarks/RESULTS.md, "Concurrent streams")
        self._outbox: list[tuple[_Sink, StepOutput]] = []

    # ---- asyncio side -------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop; returns after `shutdown`. `runtime.launch_engine` calls it from the
        thread that loaded the model: torch's OpenMP pool is per calling thread, and a second thread doing the same small
        ops runs them about half as fast on a 2-core CPU (17 vs 31-35 tok/s, benchmarks/RESULTS.md)."""
        self._thread = threading.current_thread()
        self._loop()

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self._waiting) + len(self._prefilling) + len(self._running)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self) -> None:
        """Abort everything still in flight and stop the worker thread."""
        with self._wake:
            self._accepting = False
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify()

    def submit(self, requests: list[GenerationRequest]) -> list["RequestStream"]:
        """Enqueue sequences (all or none) and return one async stream of outputs for each.

        Raises QueueFullError or EngineStoppedError at once, before anything is enqueued. Must be
        called from the event loop that will read the streams.
        """
        loop = asyncio.get_running_loop()
        streams, seqs = [], []
        for request in requests:
            queue: asyncio.Queue[StepOutput] = asyncio.Queue()
            p = request.params
            generator = None
            if not p.greedy:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            seqs.append(_Sequence(
                request=request,
                sink=_Sink(loop, queue),
                detok=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                             p.skip_special_tokens, p.stop, p.include_stop_str_in_output),
                generator=generator,
                arrival=time.monotonic(),
            ))
            streams.append(RequestStream(self, request.request_id, queue))
        with self._wake:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            queued = len(self._incoming) + len(self._waiting)
            if queued + len(seqs) > self.limits.max_queued_requests:
                raise QueueFullError(
                    f"{queued} sequences are already waiting and the limit is "
                    f"{self.limits.max_queued_requests} (max_queued_requests)"
                )
            self._incoming.extend(seqs)
            self.metrics.num_requests_waiting.set(queued + len(seqs))
            self._wake.notify()
        return streams

    def drain_incoming(self) -> None:
        """For in-process batch use (engine/offline.py), which steps the engine itself instead of
        running the worker loop: take in what was submitted."""
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    # ---- worker thread ------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stop and not (self._incoming or self._aborts or self._waiting
                                              or self._prefilling or self._running):
                    self._wake.wait()
                if self._stop:
                    break
                incoming = list(self._incoming)
                self._incoming.clear()
                aborts = set(self._aborts)
                self._aborts.clear()
            self._waiting.extend(incoming)
            self._apply_aborts(aborts)
            try:
                self.step()
            except Exception as exc:  # last resort; step() already fails only the rows involved
                logger.exception("engine step failed")
                for seq in list(self._prefilling) + self._running:
                    self._finish(seq, "abort", error=f"internal error: {exc}")
            self._flush_outbox()
        for seq in list(self._waiting) + list(self._incoming) + list(self._prefilling) + self._running:
            self._finish(seq, "abort", error="server shut down")
        self._flush_outbox()

    def _apply_aborts(self, ids: set[str]) -> None:
        if not ids:
            return
        for pool in (self._waiting, self._prefilling, self._running):
            for seq in [s for s in pool if s.request.request_id in ids]:
                self._finish(seq, "abort")

    def step(self) -> None:
        """One forward pass (or two: a prompt chunk and the decode step, where they do not merge);
        what it produced reaches the streams when it returns."""
        try:
            self._step()
        finally:
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sink, out in self._outbox:
            by_loop.setdefault(sink.loop, []).append((sink.queue, out))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed: nobody is left to read these streams
                logger.debug("dropped %d outputs for a closed event loop", len(items))

    def _step(self) -> None:
        self.steps += 1
        self._admit()
        if self._prefilling and self._running and self._merges_with_decode(self._prefilling[0]):
            self._prefill_and_decode(self._prefilling[0])
            self._update_gauges()
            return
        if self._prefilling:
            seq = self._prefilling[0]
            try:
                self._prefill_chunk(seq)
            except Exception as exc:  # one request's prefill failing must not touch the running rows
                logger.exception("prefill of %s failed", seq.request.request_id)
                self._fail([seq], exc)
            self._flush_outbox()  # a finished prompt's first token need not wait for the decode pass
        if self._running:
            rows = list(self._running)
            try:
                self._decode()
            except Exception as exc:
                logger.exception("decode step failed")
                self._fail(rows, exc)
        self._update_gauges()

    def _fail(self, seqs: list[_Sequence], exc: Exception) -> None:
        for seq in seqs:
            self._finish(seq, "abort", error=f"internal error: {exc}")

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = heapq.heappop(self._free_slots)
            seq.scheduled_at = now
            self.metrics.queue_time.observe(now - seq.arrival)
            self._prefilling.append(seq)

    @staticmethod
    def _unedited(seq: _Sequence) -> bool:
        return seq.request.interventions is None or seq.request.interventions.empty

    def _merges_with_decode(self, seq: _Sequence) -> bool:
        """Whether the next prompt chunk of `seq` and the running rows' decode step go through the
        model in one pass (LlamaDecoder.forward_rows): each row then gets the numbers it gets in
        its own pass, so only the time changes. The chunk is the one `seq` would get alone (chunk
        boundaries never depend on the batch) and must run fused on its own, as must the decode
        step; rows with sparsity merge where the model runs sparse rows fused; rows with
        interventions, and prompts that want their logprobs, keep separate passes."""
        start, end = self._next_chunk(seq)
        rows = [seq, *self._running]
        sparse = any(r.request.sparsity > 0 for r in rows)
        return (self.merge_prompt_chunks and self.model.can_forward_rows(end - start, len(self._running), sparse)
                and seq.request.params.prompt_logprobs is None and all(map(self._unedited, rows)))

    def _prefill_and_decode(self, seq: _Sequence) -> None:
        """One prompt chunk of `seq` and one decode step of the running rows in one forward
        pass: the weights are read once for both (a prefill of ~30 tokens beside 7 decode rows:
        51 instead of 59 ms on the 2-core CPU, benchmarks/RESULTS.md). A sequence whose prompt
        this completes joins the running rows from the next step."""
        rows = list(self._running)
        prompt = seq.prompt
        start, end = self._next_chunk(seq)
        device = self.model.device
        n = end - start
        tokens = torch.tensor([*prompt[start:end], *(s.output_ids[-1] for s in rows)], device=device)  # [n + B]
        slots = torch.tensor([seq.slot] * n + [s.slot for s in rows], device=device)
        positions = torch.tensor([*range(start, end), *(s.num_cached for s in rows)], device=device)
        completes = end == len(prompt)
        logit_rows = torch.arange(n - 1 if completes else n, n + len(rows), device=device)
        plan = self.model.sparsity_plan([seq.request.sparsity] * n + [s.request.sparsity for s in rows], 1)
        try:
            logits = self.model.forward_rows(tokens, slots, positions, self.cache, logit_rows,
                                             sparsity=plan)  # [(1 +) B, V]
        except Exception as exc:
            logger.exception("prefill of %s with a decode step failed", seq.request.request_id)
            self._fail([seq, *rows], exc)
            return
        if plan is not None:  # each sparse row's share, in row order: the chunk's tokens, then the decode rows
            skipped = plan.skipped_fraction().tolist()
            if seq.request.sparsity > 0:
                seq.skipped_weight_tokens += sum(skipped[:n])
                seq.sparse_tokens += n
                skipped = skipped[n:]
            self._count_decode_sparsity(rows, skipped)
        seq.num_cached = end
        self.metrics.prompt_tokens.inc(n)
        # each part's faults kept to its own sequences, as step() keeps them for separate passes
        try:
            self._advance_running(rows, logits[1:] if completes else logits)
        except Exception as exc:
            logger.exception("decode step failed")
            self._fail(rows, exc)
        if completes:
            try:
                self._complete_prompt(seq, logits[:1])
            except Exception as exc:
                logger.exception("prefill of %s failed", seq.request.request_id)
                self._fail([seq], exc)

    def _next_chunk(self, seq: _Sequence) -> tuple[int, int]:
        """[start, end) of seq's next prompt chunk: the same whether it runs alone or beside the
        decode step. A sparse prompt goes in chunks the model runs fused, where it has such a path."""
        limit = self.limits.prefill_chunk_tokens
        fused_limit = self.model.sparse_chunk_tokens if seq.request.sparsity > 0 else None
        if fused_limit is not None:
            limit = min(limit, fused_limit)
        return seq.num_cached, min(len(seq.prompt), seq.num_cached + limit)

    def _prefill_chunk(self, seq: _Sequence) -> None:
        prompt = seq.prompt
        start, end = self._next_chunk(seq)
        want_prompt_lp = seq.request.params.prompt_logprobs is not None
        tokens = torch.tensor([prompt[start:end]], device=self.model.device)
        plan = self.model.sparsity_plan([seq.request.sparsity], end - start)
        edits = InterventionPlan.build([seq.request.interventions], prompt_step=True, device=self.model.device)
        logits = self.model(tokens, torch.tensor([seq.slot], device=self.model.device),
                            torch.tensor([start], device=self.model.device), self.cache,
                            all_logits=want_prompt_lp, sparsity=plan, edits=edits)  # [1, V] or [1, T, V]
        if plan is not None:
            seq.skipped_weight_tokens += float(plan.skipped_fraction()[0]) * (end - start)
            seq.sparse_tokens += end - start
        seq.num_cached = end
        self.metrics.prompt_tokens.inc(end - start)
        if want_prompt_lp:
            self._record_prompt_logprobs(seq, logits[0], start, end)
            logits = logits[:, -1]
        if end == len(prompt):
            self._complete_prompt(seq, logits)

    def _complete_prompt(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """seq's prompt is all in the cache; logits [1, V] of its last token: its first token, and
        a place among the running rows."""
        self._prefilling.popleft()
        self.metrics.prompt_len.observe(len(seq.prompt))
        if seq.request.params.max_tokens == 0:  # echo-only scoring request
            self._finish(seq, "length")
            return
        self._sample_and_emit([seq], logits)
        if not seq.finished:
            self._running.append(seq)
            self._running.sort(key=lambda s: s.slot)  # batch rows in slot order (see _free_slots)

    def _record_prompt_logprobs(self, seq: _Sequence, logits: torch.Tensor, start: int, end: int) -> None:
        # logits: [T, V]; position i predicts prompt token i + 1
        n = seq.request.params.prompt_logprobs
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        logprobs = logits.log_softmax(dim=-1)
        targets = seq.prompt[start + 1 : end + 1]
        if not targets:
            return
        target_ids = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
        chosen = logprobs[: len(targets)].gather(1, target_ids).squeeze(1).tolist()
        top_lp, top_ids = (logprobs[: len(targets)].topk(n, dim=-1) if n > 0 else (None, None))
        for i, token in enumerate(targets):
            seq.prompt_logprobs.append(TokenLogprob(token, chosen[i], _top(top_ids, top_lp, i, n)))

    def _decode(self) -> None:
        rows = self._running
        device = self.model.device
        tokens = torch.tensor([[s.output_ids[-1]] for s in rows], device=device)  # [B, 1]
        slots = torch.tensor([s.slot for s in rows], device=device)
        starts = torch.tensor([s.num_cached for s in rows], device=device)
        plan = self._decode_sparsity([s.request.sparsity for s in rows])
        edits = self._decode_edits([s.request.interventions for s in rows])
        logits = self.model(tokens, slots, starts, self.cache, sparsity=plan, edits=edits)  # [B, V]
        if plan is not None:
            self._count_decode_sparsity(rows, plan.skipped_fraction().tolist())
        self._advance_running(rows, logits)

    @staticmethod
    def _count_decode_sparsity(rows: list[_Sequence], skipped: list[float]) -> None:
        """skipped: the weight share each sparse row of a decode step skipped, in batch order."""
        shares = iter(skipped)
        for s in rows:
            if s.request.sparsity > 0:
                s.skipped_weight_tokens += next(shares)
                s.sparse_tokens += 1

    def _advance_running(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        """The running rows' new tokens are in the cache; logits [B, V]: their next tokens."""
        for s in rows:
            s.num_cached += 1
        self._sample_and_emit(list(rows), logits)
        self._running = [s for s in rows if not s.finished]

    def _decode_sparsity(self, targets: list[float]) -> SparsityPlan | None:
        """The decode plan of the rows' sparsity targets; rebuilt only when they change (a build
        takes ~60 us, a reuse under 1 us: half a percent of a sparse batch-1 step on the CPU)."""
        key = tuple(targets)
        if key != self._decode_sparsity_key:
            self._decode_sparsity_key = key
            self._decode_sparsity_plan = self.model.sparsity_plan(targets, 1)
        elif self._decode_sparsity_plan is not None:
            self._decode_sparsity_plan.reuse()
        return self._decode_sparsity_plan

    def _decode_edits(self, rows: list) -> InterventionPlan | None:
        """The decode plan of these rows' interventions; rebuilt only when the batch changes (the
        same RowInterventions objects in the same order give the same plan)."""
        key = self._decode_edits_key
        if key is None or len(key) != len(rows) or any(a is not b for a, b in zip(key, rows)):
            self._decode_edits_key = tuple(rows)
            self._decode_edits_plan = InterventionPlan.build(rows, prompt_step=False, device=self.model.device)
        return self._decode_edits_plan

    def _banned_tokens(self, seq: _Sequence) -> list[int]:
        p = seq.request.params
        if len(seq.output_ids) >= p.min_tokens:
            return []
        return sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids))

    def _penalty_state(self, rows: list[_Sequence], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.device
        counts = torch.zeros(len(rows), vocab, device=device)
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        for i, s in enumerate(rows):
            if s.output_ids:
                ids = torch.tensor(s.output_ids, device=device)
                counts[i].index_add_(0, ids, torch.ones(len(ids), device=device))
                seen[i, ids] = True
            seen[i, torch.tensor(s.prompt, device=device)] = True
        return counts, seen

    def _sample_and_emit(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        finite = finite_rows(logits)  # [B]
        if not bool(finite.all()):
            # A row's own interventions (e.g. a huge steering strength) overflowed its logits:
            # fail that request alone, the batch's other rows sample as usual.
            keep = finite.tolist()
            for seq, ok in zip(rows, keep):
                if not ok:
                    self._finish(seq, "abort", error=NON_FINITE_LOGITS_ERROR, error_status=400)
            rows = [seq for seq, ok in zip(rows, keep) if ok]
            if not rows:
                return
            logits = logits[finite]
        params = [s.request.params for s in rows]
        controls = BatchControls.build(params, [s.generator for s in rows],
                                       [self._banned_tokens(s) for s in rows], logits.device)
        penalty_state = None
        if controls.presence is not None:
            penalty_state = self._penalty_state(rows, logits.shape[-1])
        result = sample(logits, controls, penalty_state)
        now = time.monotonic()
        self.metrics.generation_tokens.inc(len(rows))
        for i, seq in enumerate(rows):
            token = result.token_ids[i]
            if seq.last_token_at is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            seq.output_ids.append(token)
            if result.chosen_logprobs is not None and seq.request.params.logprobs is not None:
                n = seq.request.params.logprobs
                seq.pending_logprobs.append(
                    TokenLogprob(token, result.chosen_logprobs[i], _top(result.top_ids, result.top_logprobs, i, n))
                )
            self._advance(seq, token)

    def _advance(self, seq: _Sequence, token: int) -> None:
        p = seq.request.params
        n_out = len(seq.output_ids)
        reason: str | None = None
        stop_reason: str | int | None = None
        if token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        else:
            delta = seq.detok.add(token)
            if delta and n_out >= p.min_tokens:
                hit = seq.detok.find_stop(len(delta))
                if hit is not None:
                    reason, stop_reason = "stop", hit
        if reason is None and (n_out >= p.max_tokens or seq.num_cached + 1 >= self.limits.max_model_len):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, stop_reason=stop_reason)
            return
        self._emit(seq, finished=False)

    def _emit(self, seq: _Sequence, finished: bool, reason: str | None = None,
              stop_reason: str | int | None = None, error: str | None = None,
              error_status: int = 500) -> None:
        out = StepOutput(
            request_id=seq.request.request_id,
            text=seq.detok.release(finished),
            token_ids=seq.output_ids[seq.num_emitted_tokens:],
            logprobs=list(seq.pending_logprobs) if seq.request.params.logprobs is not None else None,
            finished=finished,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_prompt_tokens=len(seq.prompt),
            num_generated_tokens=len(seq.output_ids),
            prompt_logprobs=seq.prompt_logprobs,
            error=error,
            error_status=error_status,
            sparsity_achieved=seq.sparsity_achieved() if finished else None,
        )
        seq.prompt_logprobs = None  # sent once
        seq.pending_logprobs.clear()
        seq.num_emitted_tokens = len(seq.output_ids)
        self._outbox.append((seq.sink, out))

    def _finish(self, seq: _Sequence, reason: str, stop_reason: str | int | None = None,
                error: str | None = None, error_status: int = 500) -> None:
        if seq.finished:
            return
        seq.finished = True
        for pool in (self._waiting, self._prefilling):
            if seq in pool:
                pool.remove(seq)
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = None
        self.metrics.request_finished(reason)
        self.metrics.e2e.observe(time.monotonic() - seq.arrival)
        self.metrics.generation_len.observe(len(seq.output_ids))
        self.metrics.request_sparsity.observe(seq.sparsity_achieved())
        self._emit(seq, finished=True, reason=reason, stop_reason=stop_reason, error=error,
                   error_status=error_status)

    def _update_gauges(self) -> None:
        used = sum(s.num_cached for s in self._running) + sum(s.num_cached for s in self._prefilling)
        self.metrics.kv_cache_usage.set(used / (self.limits.max_batch_size * self.limits.max_model_len))
        self.metrics.num_requests_running.set(len(self._running) + len(self._prefilling))
        with self._lock:
            self.metrics.num_requests_waiting.set(len(self._waiting) + len(self._incoming))
