"""The FastAPI app: routes stay thin; logic lives in serving.py, state in app.state."""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.errors import APIError, error_response, install_error_handlers
from server.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.api.serving import (
    ChatServing, CompletionServing, ServingContext, compare_steering, describe_profiles, detokenize,
    parse_default_interventions, tokenize,
)
from server.metrics import ServerMetrics
from server.runtime import launch_engine
from server.settings import ServerSettings

logger = logging.getLogger(__name__)


class ServerState:
    """What the routes read; set up by the lifespan, never a module global."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.serving: ServingContext | None = None
        self.metrics: ServerMetrics | None = None
        self.load_error: str | None = None
        self.draining = False
        self.started_at = time.monotonic()
        self.healthy_after_s: float | None = None
        self.load_task: asyncio.Task | None = None
        # `neuronserve serve` stops the process on a failed load (a server that can never become
        # ready helps nobody); an embedding app keeps answering 503 with the reason
        self.on_load_failure: Callable[[], None] | None = None

    def ready(self) -> ServingContext:
        if self.serving is None:
            reason = self.load_error or "the model is still loading"
            raise APIError(503, f"not ready: {reason}", code="not_ready")
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        return self.serving


def _load_blocking(state: ServerState) -> None:
    settings = state.settings
    engine, loaded = launch_engine(settings)
    state.metrics = engine.metrics
    defaults = parse_default_interventions(settings, loaded.interventions)
    state.serving = ServingContext(engine, loaded.tokenizer, settings, loaded.name,
                                   loaded.model.config.vocab_size,
                                   [loaded.wina_profile] if loaded.wina_profile is not None else [],
                                   loaded.interventions, engine.metrics, defaults)
    state.healthy_after_s = time.monotonic() - state.started_at
    logger.info("ready after %.1f s", state.healthy_after_s)


async def _load(state: ServerState) -> None:
    try:
        await asyncio.to_thread(_load_blocking, state)
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        logger.error("model load failed: %s", state.load_error)
        if state.on_load_failure is not None:
            state.on_load_failure()


async def _drain(state: ServerState) -> None:
    """Stop admitting, let in-flight sequences finish for up to shutdown_timeout, then abort."""
    state.draining = True
    serving = state.serving
    if serving is None:
        return
    serving.engine.stop_accepting()
    deadline = time.monotonic() + state.settings.shutdown_timeout
    while serving.engine.num_unfinished and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(serving.engine.shutdown)


class BodySizeLimit:
    """Refuse request bodies over a limit, whether Content-Length announces them or they are
    streamed in chunks, before the app reads them."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is larger than {self.limit} bytes (max_request_body_bytes)"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            status = 413 if length.isdigit() else 400
            response = error_response(status, message if status == 413 else "bad Content-Length header")
            return await response(scope, receive, send)
        # Read the whole body first (it is JSON of at most `limit` bytes), so that a chunked body
        # over the limit is refused before the app spends any work on it.
        chunks, received = [], 0
        while True:
            event = await receive()
            if event["type"] != "http.request":
                return  # the client went away
            chunks.append(event.get("body", b""))
            received += len(chunks[-1])
            if received > self.limit:
                return await error_response(413, message)(scope, receive, send)
            if not event.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class ApiKeyGuard:
    """401 on /v1/* without `Authorization: Bearer <key>`. A plain ASGI middleware, not
    `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides the client's disconnect from
    `Request.is_disconnected()`, so a dropped non-streaming request would run to the end."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"].startswith("/v1/")
                and dict(scope.get("headers") or []).get(b"authorization", b"") != self.expected):
            response = error_response(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                      code="invalid_api_key")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(settings: ServerSettings) -> FastAPI:
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.load_task = asyncio.create_task(_load(state))
        yield
        await state.load_task
        await _drain(state)

    app = FastAPI(title="neuronserve", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_body_bytes)

    if settings.api_key is not None:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)

    @app.get("/health")
    async def health():
        if state.serving is None or state.draining:
            reason = state.load_error or ("shutting down" if state.draining else "loading")
            return JSONResponse({"status": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__, "torch": torch.__version__, "python": platform.python_version()}

    @app.get("/v1/models")
    async def models():
        ctx = state.ready()
        return {"object": "list", "data": [{
            "id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "neuronserve",
            "root": str(ctx.settings.model), "max_model_len": ctx.settings.max_model_len}]}

    @app.get("/v1/interventions")
    async def interventions():
        return describe_profiles(state.ready())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await CompletionServing(state.ready()).create(body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await ChatServing(state.ready()).create(body, raw)

    @app.post("/v1/steer/compare")
    async def steer_compare(body: CompletionRequest, raw: Request):
        return await compare_steering(state.ready(), body, raw)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest):
        return tokenize(state.ready(), body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest):
        return detokenize(state.ready(), body)

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
