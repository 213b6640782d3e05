"""Result types and the error type returned/raised by the neuronserve client.

Every result keeps the decoded JSON it came from in ``raw`` (left out of ``repr``), so
fields this client does not model yet are still reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


class NeuronServeError(Exception):
    """An error reported by the server (non-2xx, or an error event inside a stream).

    ``status`` is the HTTP status (``None`` when no response arrived, see
    :class:`NeuronServeConnectionError`); ``message``, ``type``, ``param`` and ``code`` come
    from the ``{"error": {...}}`` body. ``retry_after`` is the parsed ``Retry-After`` header
    in seconds (sent with 429 and 503), ``body`` the decoded body (dict, or text when the
    body was not JSON).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,  # noqa: A002 - mirrors the wire field name
        param: str | None = None,
        code: str | int | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.body = body

    def __str__(self) -> str:
        head = f"HTTP {self.status}: " if self.status is not None else ""
        extra = ", ".join(
            f"{k}={v!r}" for k, v in (("type", self.type), ("param", self.param), ("code", self.code)) if v is not None
        )
        return f"{head}{self.message}" + (f" ({extra})" if extra else "")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )


class NeuronServeConnectionError(NeuronServeError):
    """The server could not be reached, or the connection failed mid-request (``status`` is None)."""


class NeuronServeTimeoutError(NeuronServeConnectionError):
    """The request timed out."""


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> Usage | None:
        if not isinstance(data, Mapping):
            return None
        return cls(
            prompt_tokens=_int(data.get("prompt_tokens")),
            completion_tokens=_int(data.get("completion_tokens")),
            total_tokens=_int(data.get("total_tokens")),
        )


@dataclass(frozen=True, slots=True)
class SparsityInfo:
    """The server's report of WINA sparsity: what was asked for and what it achieved."""

    target: float | None = None
    achieved: float | None = None

    @classmethod
    def from_dict(cls, data: Any) -> SparsityInfo | None:
        if not isinstance(data, Mapping):
            return None
        return cls(target=data.get("target"), achieved=data.get("achieved"))


def _interventions(data: Any) -> list[dict[str, Any]] | None:
    return [dict(x) for x in data if isinstance(x, Mapping)] if isinstance(data, list) else None


@dataclass(frozen=True, slots=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: Any = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompletionChoice:
        return cls(
            index=_int(data.get("index")),
            text=data.get("text") or "",
            finish_reason=data.get("finish_reason"),
            logprobs=data.get("logprobs"),
        )


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: Any = None

    @property
    def text(self) -> str:
        return self.message.content or ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatChoice:
        msg = data.get("message") if isinstance(data.get("message"), Mapping) else {}
        return cls(
            index=_int(data.get("index")),
            message=ChatMessage(role=msg.get("role") or "assistant", content=msg.get("content")),
            finish_reason=data.get("finish_reason"),
            logprobs=data.get("logprobs"),
        )


def _choice0(choices: list[Any]) -> Any:
    for c in choices:
        if c.index == 0:
            return c
    return choices[0] if choices else None


@dataclass(frozen=True, slots=True)
class _ResultBase:
    id: str
    object: str
    created: int
    model: str
    usage: Usage | None
    sparsity: SparsityInfo | None
    """Present when the server reports sparsity (``{"target", "achieved"}``)."""
    interventions: list[dict[str, Any]] | None
    """The interventions the server says it applied, when it reports them."""
    raw: dict[str, Any] = field(repr=False, compare=False)

    @staticmethod
    def _common(data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": str(data.get("id") or ""),
            "object": str(data.get("object") or ""),
            "created": _int(data.get("created")),
            "model": str(data.get("model") or ""),
            "usage": Usage.from_dict(data.get("usage")),
            "sparsity": SparsityInfo.from_dict(data.get("sparsity")),
            "interventions": _interventions(data.get("interventions")),
            "raw": dict(data),
        }


def _choices(data: Mapping[str, Any], parse: Any) -> list[Any]:
    items = data.get("choices")
    return [parse(c) for c in items if isinstance(c, Mapping)] if isinstance(items, list) else []


@dataclass(frozen=True, slots=True)
class Completion(_ResultBase):
    """A ``/v1/completions`` response. ``text`` is choice 0's text."""

    choices: list[CompletionChoice] = field(default_factory=list)

    @property
    def text(self) -> str:
        c = _choice0(self.choices)
        return c.text if c else ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Completion:
        return cls(choices=_choices(data, CompletionChoice.from_dict), **cls._common(data))


@dataclass(frozen=True, slots=True)
class ChatCompletion(_ResultBase):
    """A ``/v1/chat/completions`` response. ``text`` is choice 0's message content."""

    choices: list[ChatChoice] = field(default_factory=list)

    @property
    def text(self) -> str:
        c = _choice0(self.choices)
        return c.text if c else ""

    @property
    def message(self) -> ChatMessage | None:
        c = _choice0(self.choices)
        return c.message if c else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatCompletion:
        return cls(choices=_choices(data, ChatChoice.from_dict), **cls._common(data))


@dataclass(frozen=True, slots=True)
class StreamChoice:
    """One choice's delta in a stream chunk: ``text`` is the completion text or chat ``delta.content``."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: Any = None
    role: str | None = None
    """Chat streams only: the ``delta.role`` (usually on the first chunk)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StreamChoice:
        delta = data.get("delta")
        if isinstance(delta, Mapping):  # chat chunk
            text, role = delta.get("content") or "", delta.get("role")
        else:
            text, role = data.get("text") or "", None
        return cls(
            index=_int(data.get("index")),
            text=text,
            finish_reason=data.get("finish_reason"),
            logprobs=data.get("logprobs"),
            role=role,
        )


@dataclass(frozen=True, slots=True)
class StreamChunk(_ResultBase):
    """One Server-Sent Event of a completion or chat stream.

    ``text`` is the delta of choice 0 ("" when this chunk has none, e.g. the final usage
    chunk whose ``choices`` is empty and whose ``usage`` is set).
    """

    choices: list[StreamChoice] = field(default_factory=list)

    @property
    def text(self) -> str:
        c = _choice0(self.choices)
        return c.text if c else ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StreamChunk:
        return cls(choices=_choices(data, StreamChoice.from_dict), **cls._common(data))


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        return cls(
            id=str(data.get("id") or ""),
            object=str(data.get("object") or "model"),
            created=_int(data.get("created")),
            owned_by=data.get("owned_by"),
            raw=dict(data),
        )


@dataclass(frozen=True, slots=True)
class Health:
    """``GET /health``: ``ready`` is True on 200; False on 503 (model still loading)."""

    ready: bool
    status: int
    detail: Any = None
    """The decoded body (dict or text), if any."""

    def describe(self) -> str:
        """``HTTP 503: <the server's reason>`` (the body's ``status``), or just the status code."""
        reason = self.detail.get("status") if isinstance(self.detail, dict) else self.detail
        return f"HTTP {self.status}: {reason}" if reason else f"HTTP {self.status}"


@dataclass(frozen=True, slots=True)
class Tokenized:
    tokens: list[int]
    count: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
