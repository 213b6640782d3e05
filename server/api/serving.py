"""The logic behind each endpoint: validate against the loaded model, tokenize, submit to the
engine, and shape the engine's outputs as OpenAI responses (whole or streamed as SSE)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.errors import APIError, error_body
from server.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                 SamplingFields, TokenizeRequest, UsageInfo)
from server.engine.engine import Engine, EngineStoppedError, QueueFullError, RequestStream
from server.engine.request import GenerationRequest, SamplingParams, StepOutput, TokenLogprob
from server.interventions.plan import RowInterventions
from server.interventions.registry import InterventionError, InterventionRegistry
from server.metrics import ServerMetrics
from server.profiles import Profile
from server.settings import ServerSettings

_DISCONNECT_POLL_S = 0.25
OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI and vLLM


@dataclass
class ServingContext:
    """Everything the endpoints need once the model is loaded."""

    engine: Engine
    tokenizer: Any
    settings: ServerSettings
    model_name: str
    vocab_size: int
    profiles: list[Profile] = field(default_factory=list)  # loaded calibration profiles
    registry: InterventionRegistry | None = None  # loaded intervention profiles
    metrics: ServerMetrics | None = None
    default_interventions: list = field(default_factory=list)  # parsed settings.default_interventions
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: dict[int, str] = field(default_factory=dict)
    max_token_chars: int = field(init=False)

    def __post_init__(self) -> None:
        # An upper bound on the characters one token decodes to (twice the longest token's
        # spelling), so that encode() can refuse hopeless texts without tokenizing them.
        spellings = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self.max_token_chars = 2 * max(1, max(len(t) for t in spellings))

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    # ---- validation shared by every endpoint -----------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                           param)

    def sampling_params(self, req: SamplingFields, prompt_len: int, max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None, allow_zero: bool,
                        logprobs_param: str = "logprobs", prompt_param: str = "prompt") -> SamplingParams:
        s = self.settings
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", prompt_param)
        if prompt_len >= s.max_model_len:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server's max_model_len is "
                           f"{s.max_model_len}, which leaves no room to generate", prompt_param,
                           "context_length_exceeded")
        room = s.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(s.max_tokens, room)
        elif max_tokens > s.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {s.max_tokens} "
                           "(max_tokens setting)", "max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                           f"longer than max_model_len ({s.max_model_len})", "max_tokens",
                           "context_length_exceeded")
        if max_tokens == 0 and not allow_zero:
            raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens})",
                           "min_tokens")
        if req.n > s.max_n:
            raise APIError(400, f"n is {req.n}; this server allows at most {s.max_n} (max_n setting)", "n")
        for value in (logprobs, prompt_logprobs):
            if value is not None and value > s.max_logprobs:
                raise APIError(400, f"{logprobs_param} is {value}; this server returns at most "
                               f"{s.max_logprobs} alternatives (max_logprobs setting)", logprobs_param)
        bias = tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items())
        self.check_token_ids([t for t, _ in bias], "logit_bias")
        self.check_token_ids(list(req.stop_token_ids or []), "stop_token_ids")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            seed=None if req.seed is None else req.seed % (2**63),
            stop=tuple(req.stop or ()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logit_bias=bias,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )

    def sparsity_target(self, req: SamplingFields) -> float:
        target = self.settings.default_sparsity if req.sparsity is None else req.sparsity
        if target <= 0:
            return 0.0
        table = self.engine.model.wina
        if table is None:
            raise APIError(400, f"sparsity {target} asked for, but no WINA profile is loaded for this model "
                           f"(--wina-profile {self.settings.wina_profile!r}); make one with "
                           "`neuronserve calibrate wina`", "sparsity")
        if target > table.max_sparsity:
            raise APIError(400, f"sparsity {target} is above the loaded WINA profile's largest calibrated "
                           f"level, {table.max_sparsity}", "sparsity")
        return target

    def resolve_interventions(self, req: SamplingFields) -> RowInterventions | None:
        """The request's interventions (or the server's defaults when it names none) resolved
        against the loaded profiles; an unknown name or bad entry is a 400 naming it."""
        entries = self.default_interventions if req.interventions is None else req.interventions
        if not entries:
            return None
        if self.registry is None:
            raise APIError(400, "this server loads no interventions (--no-load-interventions)", "interventions")
        try:
            resolved = self.registry.resolve(entries)
        except InterventionError as error:
            raise APIError(400, str(error), error.param) from None
        if self.metrics is not None:
            for entry in resolved.applied:
                self.metrics.intervention_requested(entry)
        return resolved

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"{param} is not valid Unicode text: {exc.reason} at character {exc.start}",
                           param) from None
        # Every token covers at most max_token_chars characters, so a longer text cannot fit and
        # is refused without spending seconds of the event loop on tokenizing it.
        if len(text) > self.settings.max_model_len * self.max_token_chars:
            raise APIError(400, f"{param} has {len(text)} characters, more than max_model_len "
                           f"({self.settings.max_model_len}) tokens can hold", param,
                           "context_length_exceeded")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def chat_prompt(self, messages, add_generation_prompt: bool, continue_final_message: bool) -> str:
        if self.tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text()} for m in messages], tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            )
        except Exception as exc:
            raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from exc

    def submit(self, requests: list[GenerationRequest]) -> list[RequestStream]:
        limit = self.settings.max_queued_requests
        if len(requests) > limit:
            raise APIError(400, f"this request needs {len(requests)} sequences (prompts x n); the queue "
                           f"holds at most {limit} (max_queued_requests)", "n")
        try:
            return self.engine.submit(requests)
        except QueueFullError as exc:
            retry = str(self.settings.retry_after_seconds)
            raise APIError(429, f"server busy: {exc}", None, "queue_full", {"Retry-After": retry}) from exc
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), None, "shutting_down") from exc


def describe_profiles(ctx: ServingContext) -> dict:
    """GET /v1/interventions: every loaded profile with its metadata."""
    data = []
    for profile in ctx.profiles:
        header = profile.header
        entry = {"type": header["method"], "name": header["name"], "path": str(profile.path),
                 "model_name": header.get("model_name"), "model_fingerprint": header.get("model_fingerprint"),
                 "created": header.get("created"), "parameters": header.get("parameters"),
                 "data": header.get("data"), "quality": header.get("quality")}
        if header["method"] == "wina":
            entry["request_field"] = "sparsity"
            entry["max_sparsity"] = round(float(profile.tensors["levels"].max()), 6)
        data.append(entry)
    refused = []
    if ctx.registry is not None:
        described = ctx.registry.describe()
        refused = described.pop("refused")
        for kind, entries in described.items():
            for entry in entries:
                data.append({"type": kind, "request_field": "interventions", **entry})
    return {"object": "list", "data": data, "refused": refused,
            "defaults": {"sparsity": ctx.settings.default_sparsity,
                         "interventions": [e if isinstance(e, dict) else e.model_dump(exclude_none=True)
                                           for e in ctx.default_interventions]}}


def _with_seed_offset(params: SamplingParams, offset: int) -> SamplingParams:
    if params.seed is None or offset == 0:
        return params
    return replace(params, seed=(params.seed + offset) % (2**63))


@dataclass(frozen=True)
class RequestControls:
    """Our fields of one request, resolved: WINA target and interventions."""

    sparsity: float
    interventions: RowInterventions | None

    def report(self, achieved: list[float | None]) -> dict:
        """The response's `sparsity` (the target, and the share of projection weights the request's
        tokens actually skipped, mean over its choices) and `interventions` (what was applied,
        defaults filled in) fields."""
        values = [a for a in achieved if a is not None]
        return {"sparsity": {"target": self.sparsity,
                             "achieved": round(sum(values) / len(values), 4) if values else 0.0},
                "interventions": list(self.interventions.applied) if self.interventions else []}


def request_controls(ctx: ServingContext, req: SamplingFields) -> RequestControls:
    return RequestControls(ctx.sparsity_target(req), ctx.resolve_interventions(req))


def expand_requests(prefix: str, prompts: list[list[int]], params: list[SamplingParams], n: int,
                    controls: RequestControls) -> list[GenerationRequest]:
    """One engine sequence per (prompt, choice); choice i of prompt p has index p * n + i."""
    return [
        GenerationRequest(f"{prefix}-{p}-{i}", tuple(ids), _with_seed_offset(params[p], i), controls.sparsity,
                          controls.interventions)
        for p, ids in enumerate(prompts) for i in range(n)
    ]


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """Interleave several sequences' outputs as (index, output); closing it aborts them all."""
    if len(streams) == 1:  # the common case (n = 1, one prompt), without a task and a queue hop per token
        async with aclosing(streams[0]) as stream:
            async for out in stream:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        async with aclosing(stream):
            async for out in stream:
                queue.put_nowait((index, out))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, out = await queue.get()
            if out is None:
                remaining -= 1
            else:
                yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_unless_disconnected(raw: Request, coro):
    """Await coro; cancel it (aborting its sequences) if the client goes away first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens).model_dump()


class _ChunkWriter:
    """The id/object/created/model envelope of every streamed chunk of one response, with the
    usage that stream_options asks for: a final usage chunk (include_usage) and, with
    continuous_usage_stats (which guidellm sends), the running usage on every chunk as well."""

    def __init__(self, request_id: str, obj: str, model: str, stream_options, prompt_tokens: int) -> None:
        self.head = {"id": request_id, "object": obj, "created": int(time.time()), "model": model}
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous = bool(self.include_usage and stream_options.continuous_usage_stats)
        self.prompt_tokens = prompt_tokens

    def choice(self, choice: dict, completion_tokens: int, report: dict | None = None) -> str:
        body = {**self.head, "choices": [choice]}
        if self.include_usage:
            body["usage"] = _usage(self.prompt_tokens, completion_tokens) if self.continuous else None
        if report is not None:  # on each choice's finishing chunk: RequestControls.report
            body.update(report)
        return _sse(body)

    def usage(self, completion_tokens: int) -> str:
        return _sse({**self.head, "choices": [], "usage": _usage(self.prompt_tokens, completion_tokens)})


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _abort_error(out: StepOutput) -> APIError:
    if out.error is None or "shut" in out.error:
        return APIError(503, out.error or "request aborted by the server")
    # the engine's only request-caused failure: logits overflowed by the row's interventions
    return APIError(out.error_status, out.error, "interventions" if out.error_status == 400 else None)


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generated: int = 0
    prompt_tokens: int = 0
    sparsity_achieved: float | None = None


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.ctx.encode(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [self.ctx.encode(p, param=f"prompt.{i}") for i, p in enumerate(prompt)]
        if all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        for i, ids in enumerate(prompts):
            self.ctx.check_token_ids(ids, "prompt" if len(prompts) == 1 else f"prompt.{i}")
        return prompts

    async def create(self, req: CompletionRequest, raw: Request):
        ctx = self.ctx
        ctx.check_model(req.model)
        prompts = self._prompts(req.prompt)
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        max_tokens = req.max_tokens if req.max_tokens is not None else OPENAI_DEFAULT_MAX_TOKENS
        params = [ctx.sampling_params(req, len(ids), max_tokens, req.logprobs, prompt_logprobs, allow_zero=req.echo,
                                      prompt_param="prompt" if len(prompts) == 1 else f"prompt.{i}")
                  for i, ids in enumerate(prompts)]
        controls = request_controls(ctx, req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = ctx.submit(expand_requests(request_id, prompts, params, req.n, controls))
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, prompts, streams, controls),
                                     media_type="text/event-stream")
        choices = await run_unless_disconnected(raw, self._collect(streams, len(prompts) * req.n))
        body = self._response(req, request_id, prompts, choices)
        body.update(controls.report([c.sparsity_achieved for c in choices]))
        return JSONResponse(body)

    async def _collect(self, streams: list[RequestStream], count: int) -> list[_Choice]:
        choices = [_Choice() for _ in range(count)]
        async with aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                c = choices[index]
                if out.finished and out.finish_reason == "abort":
                    raise _abort_error(out)
                c.text += out.text
                c.prompt_tokens = out.num_prompt_tokens
                if out.prompt_logprobs is not None:
                    c.logprobs = list(out.prompt_logprobs) + c.logprobs
                if out.logprobs:
                    c.logprobs.extend(out.logprobs)
                c.token_ids.extend(out.token_ids)
                c.generated = out.num_generated_tokens
                if out.finished:
                    c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                    c.sparsity_achieved = out.sparsity_achieved
        return choices

    def _logprobs_block(self, entries: list[TokenLogprob | None], offset: int) -> dict:
        ctx = self.ctx
        tokens, token_lps, tops, offsets = [], [], [], []
        for entry in entries:
            if entry is None:  # the first prompt token has no logprob
                continue
            text = ctx.token_text(entry.token_id)
            tokens.append(text)
            token_lps.append(entry.logprob)
            # OpenAI: "the logprob of the sampled token is always returned, so there may be up to
            # logprobs+1 elements" (vLLM does the same); lm-eval reads its own token from here
            top = {ctx.token_text(t): lp for t, lp in entry.top}
            top.setdefault(text, entry.logprob)
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _prompt_logprob_entries(self, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        block = self._logprobs_block(entries, 0)
        first = self.ctx.token_text(ids[0])
        # The first prompt token is reported with a null logprob, as OpenAI and vLLM do.
        block["tokens"].insert(0, first)
        block["token_logprobs"].insert(0, None)
        block["top_logprobs"].insert(0, None)
        block["text_offset"] = [0] + [o + len(first) for o in block["text_offset"]]
        return block

    def _response(self, req: CompletionRequest, request_id: str, prompts: list[list[int]],
                  choices: list[_Choice]) -> dict:
        ctx = self.ctx
        out = []
        for index, c in enumerate(choices):
            ids = prompts[index // req.n]
            prefix = ctx.tokenizer.decode(ids) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                if req.echo:
                    logprobs = self._prompt_logprob_entries(ids, c.logprobs)
                else:
                    logprobs = self._logprobs_block(c.logprobs, 0)
            out.append({"index": index, "text": prefix + c.text, "logprobs": logprobs,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(c.generated for c in choices)
        return {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": ctx.model_name, "choices": out,
                "usage": _usage(prompt_tokens, completion_tokens)}

    async def _stream(self, req: CompletionRequest, request_id: str, prompts: list[list[int]],
                      streams: list[RequestStream], controls: RequestControls) -> AsyncIterator[str]:
        ctx = self.ctx
        writer = _ChunkWriter(request_id, "text_completion", ctx.model_name, req.stream_options,
                              sum(len(p) for p in prompts))
        generated = [0] * len(streams)
        offsets = [0] * len(streams)
        started = [False] * len(streams)

        async with aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                if out.finished and out.finish_reason == "abort":
                    err = _abort_error(out)
                    yield _sse(error_body(err.status, err.message))
                    break
                text = out.text
                logprobs = None
                if req.echo and not started[index]:
                    ids = prompts[index // req.n]
                    prompt_text = ctx.tokenizer.decode(ids)
                    text = prompt_text + text
                    if req.logprobs is not None and out.prompt_logprobs is not None:
                        logprobs = self._prompt_logprob_entries(ids, out.prompt_logprobs)
                    offsets[index] = len(prompt_text)
                started[index] = True
                if req.logprobs is not None and out.logprobs:
                    block = self._logprobs_block(out.logprobs, offsets[index])
                    offsets[index] = (block["text_offset"][-1] + len(block["tokens"][-1])
                                      if block["tokens"] else offsets[index])
                    if logprobs is None:
                        logprobs = block
                    else:
                        for key in logprobs:
                            logprobs[key].extend(block[key])
                generated[index] = out.num_generated_tokens
                if not out.finished and not text and logprobs is None:
                    continue
                yield writer.choice({"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": out.finish_reason if out.finished else None,
                                     "stop_reason": out.stop_reason if out.finished else None},
                                    sum(generated),
                                    controls.report([out.sparsity_achieved]) if out.finished else None)
            else:
                if writer.include_usage:
                    yield writer.usage(sum(generated))
        yield _sse("[DONE]")


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw: Request):
        ctx = self.ctx
        ctx.check_model(req.model)
        prompt = ctx.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message)
        ids = ctx.encode(prompt, add_special_tokens=False, param="messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = ctx.sampling_params(req, len(ids), max_tokens, logprobs, None, allow_zero=False,
                                     logprobs_param="top_logprobs", prompt_param="messages")
        controls = request_controls(ctx, req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = ctx.submit(expand_requests(request_id, [ids], [params], req.n, controls))
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, len(ids), streams, controls),
                                     media_type="text/event-stream")
        choices = await run_unless_disconnected(raw, CompletionServing(ctx)._collect(streams, req.n))
        completion_tokens = sum(c.generated for c in choices)
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": ctx.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": self._logprobs(c.logprobs) if req.logprobs else None,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        for i, c in enumerate(choices)],
            "usage": _usage(len(ids), completion_tokens),
            **controls.report([c.sparsity_achieved for c in choices]),
        })

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.ctx.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, entries: list[TokenLogprob | None]) -> dict:
        return {"content": [dict(self._entry(e.token_id, e.logprob),
                                 top_logprobs=[self._entry(t, lp) for t, lp in e.top])
                            for e in entries if e is not None]}

    async def _stream(self, req: ChatCompletionRequest, request_id: str, prompt_tokens: int,
                      streams: list[RequestStream], controls: RequestControls) -> AsyncIterator[str]:
        writer = _ChunkWriter(request_id, "chat.completion.chunk", self.ctx.model_name, req.stream_options,
                              prompt_tokens)
        generated = [0] * len(streams)

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None,
                  report: dict | None = None) -> str:
            return writer.choice({"index": index, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": finish_reason, "stop_reason": stop_reason}, sum(generated),
                                 report)

        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async with aclosing(merge_streams(streams)) as merged:
            async for index, out in merged:
                if out.finished and out.finish_reason == "abort":
                    err = _abort_error(out)
                    yield _sse(error_body(err.status, err.message))
                    break
                generated[index] = out.num_generated_tokens
                logprobs = self._logprobs(out.logprobs) if req.logprobs and out.logprobs else None
                if out.text or logprobs is not None:
                    yield chunk(index, {"content": out.text}, logprobs)
                if out.finished:
                    yield chunk(index, {}, None, out.finish_reason, out.stop_reason,
                                controls.report([out.sparsity_achieved]))
            else:
                if writer.include_usage:
                    yield writer.usage(sum(generated))
        yield _sse("[DONE]")


def parse_default_interventions(settings: ServerSettings, registry: InterventionRegistry | None) -> list:
    """settings.default_interventions (JSON) -> entries, checked against what is loaded: a bad
    default stops the server at start, not at the first request."""
    if not settings.default_interventions.strip():
        return []
    try:
        entries = json.loads(settings.default_interventions)
    except json.JSONDecodeError as error:
        raise ValueError(f"default_interventions is not JSON: {error}") from None
    if not isinstance(entries, list):
        raise ValueError("default_interventions must be a JSON list of intervention entries")
    if registry is None:
        raise ValueError("default_interventions given, but interventions are not loaded")
    try:
        registry.resolve(entries, param="default_interventions")
    except InterventionError as error:
        raise ValueError(str(error)) from None
    return entries


async def compare_steering(ctx: ServingContext, req: CompletionRequest, raw: Request) -> JSONResponse:
    """POST /v1/steer/compare: the same prompt, seed and sampling without and with the request's
    interventions, as two rows submitted together (so they decode in the same batch)."""
    ctx.check_model(req.model)
    if not req.interventions:
        raise APIError(400, "compare needs `interventions` (what to compare against no intervention)",
                       "interventions")
    for param, unsupported in (("stream", req.stream), ("n", req.n != 1), ("echo", req.echo)):
        if unsupported:
            raise APIError(400, f"{param}: compare takes one prompt with n=1, no stream and no echo", param)
    serving = CompletionServing(ctx)
    prompts = serving._prompts(req.prompt)
    if len(prompts) != 1:
        raise APIError(400, "compare takes one prompt", "prompt")
    max_tokens = req.max_tokens if req.max_tokens is not None else OPENAI_DEFAULT_MAX_TOKENS
    params = ctx.sampling_params(req, len(prompts[0]), max_tokens, req.logprobs, None, allow_zero=False)
    steered = request_controls(ctx, req)
    plain = RequestControls(steered.sparsity, None)
    request_id = f"cmp-{uuid.uuid4().hex}"
    rows = (expand_requests(request_id + "-default", prompts, [params], 1, plain)
            + expand_requests(request_id + "-steered", prompts, [params], 1, steered))
    choices = await run_unless_disconnected(raw, serving._collect(ctx.submit(rows), 2))

    def side(c: _Choice) -> dict:
        logprobs = serving._logprobs_block(c.logprobs, 0) if req.logprobs is not None else None
        return {"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.generated,
                "logprobs": logprobs}

    return JSONResponse({
        "id": request_id, "object": "steer.compare", "created": int(time.time()), "model": ctx.model_name,
        "prompt": ctx.tokenizer.decode(prompts[0]), "seed": req.seed,
        "default": side(choices[0]), "steered": side(choices[1]),
        "usage": _usage(2 * len(prompts[0]), choices[0].generated + choices[1].generated),
        **steered.report([c.sparsity_achieved for c in choices]),
    })


def tokenize(ctx: ServingContext, req: TokenizeRequest) -> dict:
    ctx.check_model(req.model)
    if req.messages is not None:
        ids = ctx.encode(ctx.chat_prompt(req.messages, req.add_generation_prompt, False), add_special_tokens=False,
                         param="messages")
    else:
        ids = ctx.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.settings.max_model_len}


def detokenize(ctx: ServingContext, req: DetokenizeRequest) -> dict:
    ctx.check_model(req.model)
    ctx.check_token_ids(req.tokens, "tokens")
    return {"prompt": ctx.tokenizer.decode(req.tokens)}
