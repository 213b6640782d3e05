"""Sync and async clients for the neuronserve HTTP API.

Both clients share everything except I/O: request building, model resolution, response and
error parsing, and Server-Sent-Events parsing live in :mod:`clients._core`.

    with NeuronServeClient() as client:                    # NEURONSERVE_BASE_URL / _API_KEY
        out = client.complete("Hello", max_tokens=16, sparsity=0.5,
                              interventions=[{"type": "eigenshift", "profile": "toxicity", "alpha": 0.3}])
        print(out.text, out.usage, out.sparsity)
        for chunk in client.stream_chat("Hi!", max_tokens=32):
            print(chunk.text, end="", flush=True)

Streaming methods yield :class:`~clients.types.StreamChunk` objects: ``chunk.text`` is the
delta of choice 0, ``chunk.choices`` has every choice's delta and ``finish_reason``, and the
final chunk carries ``usage`` when ``stream_options={"include_usage": True}`` was passed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Mapping, Sequence, TypeVar

import httpx

from ._core import (
    DEFAULT_TIMEOUT,
    ClientCore,
    Messages,
    Op,
    Prompt,
    Request,
    Sleep,
    StreamParser,
    chat_body,
    check_response,
    completion_body,
    default_headers,
    error_from_transport,
)
from .types import (
    ChatCompletion,
    Completion,
    Health,
    ModelInfo,
    NeuronServeError,
    StreamChunk,
    Tokenized,
)

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

    from ._core import GenerationParams, StreamParams

__all__ = ["NeuronServeClient", "AsyncNeuronServeClient"]

T = TypeVar("T")

_COMPLETIONS = "/v1/completions"
_CHAT = "/v1/chat/completions"


class NeuronServeClient(ClientCore):
    """Synchronous client.

    Args:
        base_url: server root (default ``$NEURONSERVE_BASE_URL`` or ``http://127.0.0.1:8000``;
            a trailing ``/v1`` is accepted).
        api_key: sent as ``Authorization: Bearer`` (default ``$NEURONSERVE_API_KEY``).
        model: default model for every call; None means the first one ``/v1/models`` lists.
        timeout: seconds, or an ``httpx.Timeout`` (default 600 s, 10 s to connect).
        headers: extra headers for every request.
        transport: an ``httpx.BaseTransport`` (e.g. ``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, model)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=default_headers(self.api_key, headers),
            timeout=timeout,
            transport=transport,
        )

    # --- generation

    def complete(self, prompt: Prompt, **params: Unpack[GenerationParams]) -> Completion:
        """``POST /v1/completions``; ``prompt`` is text or a list of token ids."""
        return self._run(self._op_complete(prompt, params))

    def chat(self, messages: Messages, **params: Unpack[GenerationParams]) -> ChatCompletion:
        """``POST /v1/chat/completions``; a bare string is one user message."""
        return self._run(self._op_chat(messages, params))

    def stream_complete(self, prompt: Prompt, **params: Unpack[StreamParams]) -> Iterator[StreamChunk]:
        """Stream ``/v1/completions``: an iterator of :class:`StreamChunk` (``.text`` is the delta)."""
        return self._stream(self._op_stream_request(_COMPLETIONS, completion_body(prompt, params, stream=True)))

    def stream_chat(self, messages: Messages, **params: Unpack[StreamParams]) -> Iterator[StreamChunk]:
        """Stream ``/v1/chat/completions``: an iterator of :class:`StreamChunk` (``.text`` is ``delta.content``)."""
        return self._stream(self._op_stream_request(_CHAT, chat_body(messages, params, stream=True)))

    # --- everything else

    def models(self) -> list[ModelInfo]:
        return self._run(self._op_models())

    def health(self) -> Health:
        """``GET /health``; ``ready`` is False while the server is loading (503). Does not raise for 503."""
        return self._run(self._op_health())

    def wait_until_healthy(self, timeout: float = 60.0, interval: float = 0.5) -> Health:
        """Poll ``/health`` until it answers 200, riding out refused connections and 503.
        Raises ``TimeoutError`` after ``timeout`` seconds."""
        return self._run(self._op_wait_until_healthy(timeout, interval))

    def version(self) -> dict[str, Any]:
        return self._run(self._op_version())

    def tokenize(self, text: str, *, model: str | None = None) -> Tokenized:
        return self._run(self._op_tokenize(text, model))

    def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return self._run(self._op_detokenize(tokens, model))

    def interventions(self) -> list[dict[str, Any]] | None:
        """The intervention profiles the server has loaded; None if the server predates the endpoint (404)."""
        return self._run(self._op_interventions())

    def compare(self, prompt: Prompt, **params: Unpack[GenerationParams]) -> dict[str, Any]:
        """``POST /v1/steer/compare``: the completion without and with ``interventions`` (same seed,
        same batch), as ``{"default": {"text", ...}, "steered": {...}, "interventions": [...]}``."""
        return self._run(self._op_compare(prompt, params))

    # --- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NeuronServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- driver

    def _send(self, request: Request) -> httpx.Response:
        try:
            response = self._http.request(
                request.method, request.path, json=request.json, headers=request.headers or None
            )
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.base_url) from exc
        check_response(request, response)
        return response

    def _run(self, op: Op[T]) -> T:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = op.send(None)
                    continue
                try:
                    response = self._send(step)
                except NeuronServeError as exc:
                    step = op.throw(exc)
                else:
                    step = op.send(response)
        except StopIteration as stop:
            return stop.value

    def _stream(self, op: Op[Request]) -> Iterator[StreamChunk]:
        request = self._run(op)
        try:
            with self._http.stream(request.method, request.path, json=request.json, headers=request.headers) as resp:
                if not resp.is_success:
                    resp.read()
                    check_response(request, resp)
                parser = StreamParser(resp.status_code)
                for line in resp.iter_lines():
                    yield from parser.feed(line)
                    if parser.done:
                        return
                yield from parser.close()
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.base_url) from exc


class AsyncNeuronServeClient(ClientCore):
    """Asynchronous client; same constructor arguments as :class:`NeuronServeClient`
    (``transport`` is an ``httpx.AsyncBaseTransport``). Streaming methods return async
    iterators: ``async for chunk in client.stream_complete(...)``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, model)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=default_headers(self.api_key, headers),
            timeout=timeout,
            transport=transport,
        )

    # --- generation

    async def complete(self, prompt: Prompt, **params: Unpack[GenerationParams]) -> Completion:
        return await self._run(self._op_complete(prompt, params))

    async def chat(self, messages: Messages, **params: Unpack[GenerationParams]) -> ChatCompletion:
        return await self._run(self._op_chat(messages, params))

    def stream_complete(self, prompt: Prompt, **params: Unpack[StreamParams]) -> AsyncIterator[StreamChunk]:
        return self._stream(self._op_stream_request(_COMPLETIONS, completion_body(prompt, params, stream=True)))

    def stream_chat(self, messages: Messages, **params: Unpack[StreamParams]) -> AsyncIterator[StreamChunk]:
        return self._stream(self._op_stream_request(_CHAT, chat_body(messages, params, stream=True)))

    # --- everything else

    async def models(self) -> list[ModelInfo]:
        return await self._run(self._op_models())

    async def health(self) -> Health:
        return await self._run(self._op_health())

    async def wait_until_healthy(self, timeout: float = 60.0, interval: float = 0.5) -> Health:
        return await self._run(self._op_wait_until_healthy(timeout, interval))

    async def version(self) -> dict[str, Any]:
        return await self._run(self._op_version())

    async def tokenize(self, text: str, *, model: str | None = None) -> Tokenized:
        return await self._run(self._op_tokenize(text, model))

    async def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return await self._run(self._op_detokenize(tokens, model))

    async def interventions(self) -> list[dict[str, Any]] | None:
        return await self._run(self._op_interventions())

    async def compare(self, prompt: Prompt, **params: Unpack[GenerationParams]) -> dict[str, Any]:
        return await self._run(self._op_compare(prompt, params))

    # --- lifecycle

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncNeuronServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- driver

    async def _send(self, request: Request) -> httpx.Response:
        try:
            response = await self._http.request(
                request.method, request.path, json=request.json, headers=request.headers or None
            )
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.base_url) from exc
        check_response(request, response)
        return response

    async def _run(self, op: Op[T]) -> T:
        try:
            step = next(op)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = op.send(None)
                    continue
                try:
                    response = await self._send(step)
                except NeuronServeError as exc:
                    step = op.throw(exc)
                else:
                    step = op.send(response)
        except StopIteration as stop:
            return stop.value

    async def _stream(self, op: Op[Request]) -> AsyncIterator[StreamChunk]:
        request = await self._run(op)
        try:
            async with self._http.stream(
                request.method, request.path, json=request.json, headers=request.headers
            ) as resp:
                if not resp.is_success:
                    await resp.aread()
                    check_response(request, resp)
                parser = StreamParser(resp.status_code)
                async for line in resp.aiter_lines():
                    for chunk in parser.feed(line):
                        yield chunk
                    if parser.done:
                        return
                for chunk in parser.close():
                    yield chunk
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.base_url) from exc
