"""Transport-free core shared by the sync and async clients.

Each API operation is written once, as a generator ("op") that yields what it needs done
(:class:`Request` to send, or :class:`Sleep`) and receives the ``httpx.Response`` back; it
returns the parsed result. The sync and async clients only differ in the small driver that
performs those steps (``_run`` / ``_arun``) and in how they read a streaming body; the
parsing of that body is shared too (:class:`StreamParser`).
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Mapping, Sequence, TypedDict, TypeVar, Union

import httpx

from .types import (
    ChatCompletion,
    ChatMessage,
    Completion,
    Health,
    ModelInfo,
    NeuronServeConnectionError,
    NeuronServeError,
    NeuronServeTimeoutError,
    StreamChunk,
    Tokenized,
)

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "NEURONSERVE_BASE_URL"
API_KEY_ENV = "NEURONSERVE_API_KEY"
# Generations can take minutes; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

Prompt = Union[str, Sequence[int], Sequence[str], Sequence[Sequence[int]]]
"""A text prompt, a list of token ids, or a batch of either (one choice per prompt and ``n``)."""
Messages = Union[str, Sequence[Union[Mapping[str, Any], ChatMessage]]]
"""Chat messages: dicts / :class:`ChatMessage` with ``role`` and ``content``; a bare string
is shorthand for one user message."""


class GenerationParams(TypedDict, total=False):
    """Keyword parameters accepted by ``complete`` / ``chat``. ``None`` (or absent) means
    "not sent": the server rejects unknown fields, so only what the caller set goes out."""

    model: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    n: int | None
    logit_bias: Mapping[str, float] | Mapping[int, float] | None
    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    logprobs: int | bool | None
    """Completions: the number of alternatives per token; chat: ``True`` (with ``top_logprobs``)."""
    top_logprobs: int | None
    max_completion_tokens: int | None
    ignore_eos: bool | None
    min_tokens: int | None
    echo: bool | None
    include_stop_str_in_output: bool | None
    skip_special_tokens: bool | None
    user: str | None
    response_format: Mapping[str, Any] | None
    add_generation_prompt: bool | None
    continue_final_message: bool | None
    # neuronserve's own fields, sent at the top level of the body
    sparsity: float | None
    """WINA sparsity target (the server accepts 0 .. 0.9)."""
    interventions: Sequence[Mapping[str, Any]] | None
    """Intervention objects, each with a ``type`` key, e.g.
    ``{"type": "steer", "sae": "l9-resid-8k", "feature": 1234, "strength": 6.0}``."""
    extra_body: Mapping[str, Any] | None
    """Escape hatch: merged into the body as is (for fields newer than this client)."""


class StreamParams(GenerationParams, total=False):
    """``GenerationParams`` plus ``stream_options`` (e.g. ``{"include_usage": True}``), which
    the server only accepts on streaming requests."""

    stream_options: Mapping[str, Any] | None


_GENERATION_KEYS = frozenset(GenerationParams.__required_keys__ | GenerationParams.__optional_keys__)
_STREAM_KEYS = frozenset(StreamParams.__required_keys__ | StreamParams.__optional_keys__)


# --------------------------------------------------------------------------- request building


def resolve_base_url(base_url: str | None) -> str:
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip().rstrip("/")
    # Accept an OpenAI-style base URL ending in /v1: our paths carry their own prefix.
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def default_headers(api_key: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": f"neuronserve-client/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def _check_interventions(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError("interventions must be a list of objects, each with a 'type' key")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str):
            raise ValueError(f"interventions[{i}] must be an object with a string 'type' key, got {item!r}")
        out.append(dict(item))
    return out


def build_params(params: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
    """Validate keyword params and return the body fields that were set (None dropped)."""
    allowed = _STREAM_KEYS if stream else _GENERATION_KEYS
    unknown = set(params) - allowed
    if unknown:
        hint = " (stream_options is only valid for streaming calls)" if "stream_options" in unknown else ""
        if "stream" in unknown:
            hint = " (use stream_complete / stream_chat to stream)"
        raise TypeError(f"unexpected parameter(s): {', '.join(sorted(unknown))}{hint}")
    body: dict[str, Any] = {}
    for key, value in params.items():
        if value is None or key == "extra_body":
            continue
        if key == "stop" and isinstance(value, str):
            value = [value]
        elif key in ("stop", "stop_token_ids"):
            value = list(value)
        elif key == "interventions":
            value = _check_interventions(value)
        elif key == "logit_bias":
            value = {str(k): v for k, v in value.items()}
        elif key == "sparsity" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"sparsity must be a number, got {value!r}")
        elif isinstance(value, Mapping):
            value = dict(value)
        body[key] = value
    body.update(params.get("extra_body") or {})
    if stream:
        body["stream"] = True
    return body


def _token_ids(values: Any) -> list[int] | None:
    ids = list(values)
    return ids if all(isinstance(t, int) and not isinstance(t, bool) for t in ids) else None


def _prompt(prompt: Prompt) -> str | list[int] | list[str] | list[list[int]]:
    if isinstance(prompt, str):
        return prompt
    items = list(prompt)
    ids = _token_ids(items)
    if ids is not None:
        return ids
    if all(isinstance(p, str) for p in items):
        return items
    batch = [_token_ids(p) if isinstance(p, Sequence) and not isinstance(p, str) else None for p in items]
    if all(b is not None for b in batch):
        return batch
    raise TypeError("prompt must be a string, a list of token ids, or a list of either")


def _messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for i, m in enumerate(messages):
        d = m.to_dict() if isinstance(m, ChatMessage) else dict(m) if isinstance(m, Mapping) else None
        if d is None or not isinstance(d.get("role"), str):
            raise TypeError(f"messages[{i}] must be a mapping or ChatMessage with a 'role', got {m!r}")
        out.append(d)
    return out


def completion_body(prompt: Prompt, params: Mapping[str, Any], *, stream: bool = False) -> dict[str, Any]:
    return {"prompt": _prompt(prompt), **build_params(params, stream=stream)}


def chat_body(messages: Messages, params: Mapping[str, Any], *, stream: bool = False) -> dict[str, Any]:
    return {"messages": _messages(messages), **build_params(params, stream=stream)}


# --------------------------------------------------------------------------- response parsing


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _decode(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return content.decode("utf-8", "replace")


def _error_from_body(body: Any, status: int | None, retry_after: float | None, fallback: str) -> NeuronServeError:
    err = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(err, Mapping):
        return NeuronServeError(
            str(err.get("message") or fallback),
            status=status,
            type=err.get("type"),
            param=err.get("param"),
            code=err.get("code"),
            retry_after=retry_after,
            body=body,
        )
    if isinstance(err, str):  # {"error": "text"}
        return NeuronServeError(err, status=status, retry_after=retry_after, body=body)
    if isinstance(body, Mapping) and isinstance(body.get("detail"), str):  # FastAPI default
        return NeuronServeError(body["detail"], status=status, retry_after=retry_after, body=body)
    text = body.strip() if isinstance(body, str) else ""
    return NeuronServeError(text[:500] or fallback, status=status, retry_after=retry_after, body=body)


def error_from_response(response: httpx.Response) -> NeuronServeError:
    """Build the :class:`NeuronServeError` for a (read) non-2xx response."""
    return _error_from_body(
        _decode(response.content),
        response.status_code,
        _retry_after(response.headers.get("retry-after")),
        response.reason_phrase or f"HTTP {response.status_code}",
    )


def error_from_transport(exc: httpx.TransportError, base_url: str) -> NeuronServeConnectionError:
    cls = NeuronServeTimeoutError if isinstance(exc, httpx.TimeoutException) else NeuronServeConnectionError
    what = "timed out" if cls is NeuronServeTimeoutError else "failed"
    return cls(f"request to {base_url} {what}: {exc or type(exc).__name__}")


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise NeuronServeError(
            f"server sent a response that is not JSON: {response.text[:200]!r}",
            status=response.status_code,
            body=response.text,
        ) from exc


def _json_object(response: httpx.Response) -> dict[str, Any]:
    data = json_body(response)
    if not isinstance(data, dict):
        raise NeuronServeError("expected a JSON object from the server", status=response.status_code, body=data)
    return data


def _list_payload(data: Any, *keys: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        for key in ("data", *keys):
            if isinstance(data.get(key), list):
                return data[key]
    return []


class StreamParser:
    """Incremental Server-Sent Events parser for completion and chat streams.

    Feed it the body's lines (without line terminators); it returns the parsed chunks each
    line completes. ``data: [DONE]`` sets ``done``. An ``{"error": ...}`` event raises
    :class:`NeuronServeError`.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.done = False
        self._data: list[str] = []

    def feed(self, line: str) -> list[StreamChunk]:
        line = line.rstrip("\r")
        if line == "":
            return self._dispatch()
        if line.startswith(":") or self.done:  # comment / keep-alive
            return []
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return []  # event:, id:, retry: carry nothing we use

    def close(self) -> list[StreamChunk]:
        """Flush a final event not followed by a blank line."""
        return self._dispatch()

    def _dispatch(self) -> list[StreamChunk]:
        if not self._data or self.done:
            self._data.clear()
            return []
        data, self._data = "\n".join(self._data), []
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise NeuronServeError(f"malformed stream event: {data[:200]!r}", status=self.status, body=data) from exc
        if not isinstance(obj, dict):
            raise NeuronServeError(f"unexpected stream event: {data[:200]!r}", status=self.status, body=obj)
        if "error" in obj:
            err = obj["error"]
            code = err.get("code") if isinstance(err, Mapping) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else self.status
            raise _error_from_body(obj, status, None, "error in stream")
        return [StreamChunk.from_dict(obj)]


# --------------------------------------------------------------------------- ops


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    json: dict[str, Any] | None = None
    accept: frozenset[int] = frozenset()
    """Non-2xx statuses handed to the op instead of raised."""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


T = TypeVar("T")
Op = Generator[Union[Request, Sleep], Any, T]
"""An operation: yields Request (gets an httpx.Response back) or Sleep (gets None)."""

SSE_HEADERS = {"Accept": "text/event-stream"}


def check_response(request: Request, response: httpx.Response) -> None:
    """Raise for a non-2xx status, unless the request accepts it. The body must be read."""
    if response.is_success or response.status_code in request.accept:
        return
    raise error_from_response(response)


class ClientCore:
    """Configuration and operations shared by :class:`NeuronServeClient` and
    :class:`AsyncNeuronServeClient`."""

    def __init__(self, base_url: str | None, api_key: str | None, model: str | None) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.model = model
        """The default model; resolved from ``/v1/models`` (first entry) on first use when None."""

    # The drivers in client.py call these and send what they yield.

    def _op_models(self) -> Op[list[ModelInfo]]:
        response = yield Request("GET", "/v1/models")
        return [ModelInfo.from_dict(m) for m in _list_payload(json_body(response)) if isinstance(m, Mapping)]

    def _op_model(self, body: dict[str, Any]) -> Op[dict[str, Any]]:
        """Fill in the body's model: explicit > client default > first of /v1/models."""
        if body.get("model"):
            return body
        if not self.model:
            models = yield from self._op_models()
            if not models or not models[0].id:
                raise NeuronServeError("the server lists no models; pass model=...")
            self.model = models[0].id
        return {"model": self.model, **{k: v for k, v in body.items() if k != "model"}}

    def _op_generate(self, path: str, body: dict[str, Any], parse: Callable[[dict[str, Any]], T]) -> Op[T]:
        body = yield from self._op_model(body)
        response = yield Request("POST", path, body)
        return parse(_json_object(response))

    def _op_complete(self, prompt: Prompt, params: Mapping[str, Any]) -> Op[Completion]:
        return self._op_generate("/v1/completions", completion_body(prompt, params), Completion.from_dict)

    def _op_compare(self, prompt: Prompt, params: Mapping[str, Any]) -> Op[dict[str, Any]]:
        return self._op_generate("/v1/steer/compare", completion_body(prompt, params), dict)

    def _op_chat(self, messages: Messages, params: Mapping[str, Any]) -> Op[ChatCompletion]:
        return self._op_generate("/v1/chat/completions", chat_body(messages, params), ChatCompletion.from_dict)

    def _op_stream_request(self, path: str, body: dict[str, Any]) -> Op[Request]:
        """Resolve the model; return the request to open as a stream."""
        body = yield from self._op_model(body)
        return Request("POST", path, body, headers=SSE_HEADERS)

    def _op_health(self) -> Op[Health]:
        response = yield Request("GET", "/health", accept=frozenset({503}))
        detail = _decode(response.content) if response.content else None
        return Health(ready=response.status_code == 200, status=response.status_code, detail=detail)

    def _op_wait_until_healthy(self, timeout: float, interval: float) -> Op[Health]:
        deadline = time.monotonic() + timeout
        last: str = "no answer"
        while True:
            try:
                health = yield from self._op_health()
                if health.ready:
                    return health
                last = health.describe()
            except NeuronServeConnectionError as exc:
                last = exc.message
            except NeuronServeError as exc:
                if exc.status not in (502, 504):  # a proxy in front of a starting server
                    raise
                last = f"HTTP {exc.status}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.base_url} not healthy after {timeout:g}s (last: {last})")
            yield Sleep(min(interval, remaining))

    def _op_version(self) -> Op[dict[str, Any]]:
        response = yield Request("GET", "/version")
        return _json_object(response)

    def _op_tokenize(self, text: str, model: str | None) -> Op[Tokenized]:
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes a string, got {type(text).__name__}")
        body = yield from self._op_model({"model": model, "prompt": text})
        data = _json_object((yield Request("POST", "/tokenize", body)))
        tokens = [int(t) for t in data.get("tokens") or []]
        count = data.get("count")
        return Tokenized(tokens=tokens, count=count if isinstance(count, int) else len(tokens), raw=data)

    def _op_detokenize(self, tokens: Sequence[int], model: str | None) -> Op[str]:
        ids = _token_ids(tokens)
        if ids is None:
            raise TypeError("detokenize takes a list of token ids (ints)")
        body = yield from self._op_model({"model": model, "tokens": ids})
        data = _json_object((yield Request("POST", "/detokenize", body)))
        return str(data.get("prompt") or "")

    def _op_interventions(self) -> Op[list[dict[str, Any]] | None]:
        response = yield Request("GET", "/v1/interventions", accept=frozenset({404, 405}))
        if response.status_code in (404, 405):
            return None  # an older server without intervention listing
        data = json_body(response)
        return [dict(x) for x in _list_payload(data, "interventions", "profiles") if isinstance(x, Mapping)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"
