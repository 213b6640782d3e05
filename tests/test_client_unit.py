"""Unit tests for clients/ (sync + async client, SSE parsing, errors, CLI) against httpx.MockTransport."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any, Callable

import httpx
import pytest

from clients import (
    AsyncNeuronServeClient,
    Completion,
    NeuronServeClient,
    NeuronServeConnectionError,
    NeuronServeError,
    StreamParser,
)
from clients.cli import main

MODEL = "tiny-llama"


def _completion(text: str = "Hello world", **extra: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        **extra,
    }


def _sse(*events: Any, done: bool = True) -> bytes:
    parts = [f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def _chunk(text: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL, "choices": choices, **extra}


class FakeServer:
    """Routes requests to canned responses and records every request it sees."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = {
            ("GET", "/v1/models"): lambda r: httpx.Response(
                200, json={"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "neuronserve"}]}
            ),
            ("POST", "/v1/completions"): lambda r: httpx.Response(200, json=_completion()),
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error": {"message": "Not Found", "type": "not_found", "param": None, "code": 404}})
        return route(request)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    def sync_client(self, **kw: Any) -> NeuronServeClient:
        kw.setdefault("base_url", "http://test")
        return NeuronServeClient(transport=httpx.MockTransport(self), **kw)

    def async_client(self, **kw: Any) -> AsyncNeuronServeClient:
        kw.setdefault("base_url", "http://test")
        return AsyncNeuronServeClient(transport=httpx.MockTransport(self), **kw)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEURONSERVE_API_KEY", raising=False)
    monkeypatch.delenv("NEURONSERVE_BASE_URL", raising=False)


# --------------------------------------------------------------------------- request bodies


def test_body_contains_only_set_fields(server: FakeServer) -> None:
    with server.sync_client(model=MODEL) as client:
        out = client.complete("Hi", max_tokens=8, temperature=None, top_p=0.9, stop="\n")
    assert server.bodies("/v1/completions") == [
        {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "top_p": 0.9, "stop": ["\n"]}
    ]
    assert isinstance(out, Completion)
    assert out.text == "Hello world"
    assert out.usage is not None and out.usage.total_tokens == 5
    assert out.sparsity is None and out.interventions is None


def test_minimal_body_and_token_id_prompt(server: FakeServer) -> None:
    with server.sync_client(model=MODEL) as client:
        client.complete([1, 2, 3])
    assert server.bodies("/v1/completions") == [{"model": MODEL, "prompt": [1, 2, 3]}]


def test_sparsity_and_interventions_top_level_and_echoed(server: FakeServer) -> None:
    applied = [
        {"type": "steer", "sae": "l9-resid-8k", "feature": 1234, "strength": 6.0},
        {"type": "eigenshift", "profile": "toxicity", "alpha": 0.3},
        {"type": "unmemorize", "profile": "canaries"},
    ]
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(
        200, json=_completion(sparsity={"target": 0.5, "achieved": 0.48}, interventions=applied)
    )
    with server.sync_client(model=MODEL) as client:
        out = client.complete("Hi", sparsity=0.5, interventions=applied)
    (body,) = server.bodies("/v1/completions")
    assert body["sparsity"] == 0.5
    assert body["interventions"] == applied
    assert "extra_body" not in body and "params" not in body
    assert out.sparsity is not None and (out.sparsity.target, out.sparsity.achieved) == (0.5, 0.48)
    assert out.interventions == applied


def test_bad_params_rejected_client_side(server: FakeServer) -> None:
    with server.sync_client(model=MODEL) as client:
        with pytest.raises(TypeError, match="unexpected parameter"):
            client.complete("Hi", max_token=3)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="stream_complete"):
            client.complete("Hi", stream=True)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="type"):
            client.complete("Hi", interventions=[{"profile": "toxicity"}])
    assert server.requests == []


def test_default_model_from_models_endpoint_auth_and_chat(server: FakeServer) -> None:
    seen: list[dict[str, Any]] = []

    def chat(r: httpx.Request) -> httpx.Response:
        seen.append(json.loads(r.content))
        return httpx.Response(
            200,
            json={
                "id": "chat-1",
                "object": "chat.completion",
                "created": 1,
                "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hey!"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
            },
        )

    server.routes[("POST", "/v1/chat/completions")] = chat
    with server.sync_client(api_key="sk-test") as client:
        a = client.chat("Hello", max_tokens=4)
        b = client.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert (a.text, b.message and b.message.role) == ("Hey!", "assistant")
    assert seen[0] == {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    assert seen[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    # /v1/models is asked once, then the model is remembered
    assert [r.url.path for r in server.requests].count("/v1/models") == 1
    assert all(r.headers["authorization"] == "Bearer sk-test" for r in server.requests)


def test_env_base_url_and_api_key(monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> None:
    monkeypatch.setenv("NEURONSERVE_BASE_URL", "http://env-host:9000/v1/")
    monkeypatch.setenv("NEURONSERVE_API_KEY", "env-key")
    client = NeuronServeClient(transport=httpx.MockTransport(server), model=MODEL)
    assert client.base_url == "http://env-host:9000"
    client.complete("x")
    assert str(server.requests[0].url) == "http://env-host:9000/v1/completions"
    assert server.requests[0].headers["authorization"] == "Bearer env-key"
    client.close()
    monkeypatch.delenv("NEURONSERVE_API_KEY")
    with NeuronServeClient(base_url="http://h", transport=httpx.MockTransport(server), model=MODEL) as keyless:
        keyless.complete("x")
    assert "authorization" not in server.requests[-1].headers


# --------------------------------------------------------------------------- streaming


def test_stream_complete_parses_sse_usage_and_done(server: FakeServer) -> None:
    body = _sse(
        _chunk("Hel"),
        _chunk("lo", sparsity={"target": 0.5, "achieved": 0.5}),
        _chunk("", finish="stop"),
        _chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
    ) + b'data: {"never": "parsed"}\n\n'  # anything after [DONE] is ignored
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(
        200, content=body, headers={"content-type": "text/event-stream"}
    )
    with server.sync_client(model=MODEL) as client:
        chunks = list(client.stream_complete("Hi", max_tokens=2, stream_options={"include_usage": True}))
    (sent,) = server.bodies("/v1/completions")
    assert sent == {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert server.requests[0].headers["accept"] == "text/event-stream"
    assert "".join(c.text for c in chunks) == "Hello"
    assert len(chunks) == 4
    assert chunks[1].sparsity is not None and chunks[1].sparsity.achieved == 0.5
    assert chunks[2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].text == ""
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_stream_parser_edge_cases() -> None:
    p = StreamParser()
    out = []
    # CRLF line ends, a comment, a multi-line data field, a chat delta
    lines = [
        ": keep-alive",
        "",
        'data: {"choices": [{"index": 0,',
        'data:  "delta": {"role": "assistant", "content": "Hi"}}]}\r',
        "\r",
        "event: message",
        'data: {"choices": [{"index": 0, "delta": {"content": " there"}}]}',
    ]
    for line in lines:
        out += p.feed(line)
    out += p.close()  # final event without a trailing blank line
    assert [c.text for c in out] == ["Hi", " there"]
    assert out[0].choices[0].role == "assistant"
    assert not p.done
    assert p.feed("data: [DONE]") == [] and p.feed("") == [] and p.done


def test_stream_error_status_and_error_event(server: FakeServer) -> None:
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(
        400, json={"error": {"message": "sparsity must be <= 0.9", "type": "invalid_request_error", "param": "sparsity", "code": None}}
    )
    with server.sync_client(model=MODEL) as client:
        with pytest.raises(NeuronServeError) as info:
            list(client.stream_complete("Hi", sparsity=1.5))
        assert (info.value.status, info.value.param) == (400, "sparsity")

        err_event = {"error": {"message": "engine died", "type": "internal_error", "param": None, "code": 500}}
        server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(200, content=_sse(_chunk("a"), err_event))
        got: list[str] = []
        with pytest.raises(NeuronServeError, match="engine died") as info:
            for c in client.stream_complete("Hi"):
                got.append(c.text)
        assert got == ["a"] and info.value.status == 500


# --------------------------------------------------------------------------- errors


def test_error_body_raises_with_fields(server: FakeServer) -> None:
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(
        429,
        json={"error": {"message": "Too many requests", "type": "rate_limit_error", "param": None, "code": "rate_limited"}},
        headers={"Retry-After": "7"},
    )
    with server.sync_client(model=MODEL) as client:
        with pytest.raises(NeuronServeError) as info:
            client.complete("Hi")
    e = info.value
    assert (e.status, e.message, e.type, e.param, e.code, e.retry_after) == (
        429, "Too many requests", "rate_limit_error", None, "rate_limited", 7.0,
    )  # fmt: skip
    assert "Too many requests" in str(e)


def test_non_json_error_and_connection_error() -> None:
    client = NeuronServeClient(
        base_url="http://test", model=MODEL, transport=httpx.MockTransport(lambda r: httpx.Response(502, text="Bad Gateway"))
    )
    with pytest.raises(NeuronServeError, match="Bad Gateway") as info:
        client.complete("x")
    assert info.value.status == 502 and info.value.type is None

    def refuse(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=r)

    client = NeuronServeClient(base_url="http://test", model=MODEL, transport=httpx.MockTransport(refuse))
    with pytest.raises(NeuronServeConnectionError) as cinfo:
        client.complete("x")
    assert cinfo.value.status is None


# --------------------------------------------------------------------------- other endpoints


def test_health_tokenize_detokenize_interventions(server: FakeServer) -> None:
    states = iter([503, 503, 200])
    server.routes[("GET", "/health")] = lambda r: httpx.Response(next(states))
    server.routes[("POST", "/tokenize")] = lambda r: httpx.Response(200, json={"tokens": [5, 6], "count": 2})
    server.routes[("POST", "/detokenize")] = lambda r: httpx.Response(200, json={"prompt": "hi there"})
    server.routes[("GET", "/version")] = lambda r: httpx.Response(200, json={"version": "0.1.0"})
    with server.sync_client() as client:
        assert client.health().ready is False
        assert client.wait_until_healthy(timeout=5, interval=0.001).status == 200
        tok = client.tokenize("hi there")
        assert (tok.tokens, tok.count) == ([5, 6], 2)
        assert client.detokenize([5, 6]) == "hi there"
        assert client.version() == {"version": "0.1.0"}
        assert client.interventions() is None  # older server: 404
        server.routes[("GET", "/v1/interventions")] = lambda r: httpx.Response(
            200, json={"object": "list", "data": [{"type": "eigenshift", "profile": "toxicity"}]}
        )
        assert client.interventions() == [{"type": "eigenshift", "profile": "toxicity"}]
        assert [m.id for m in client.models()] == [MODEL]
    assert server.bodies("/tokenize") == [{"model": MODEL, "prompt": "hi there"}]
    assert server.bodies("/detokenize") == [{"model": MODEL, "tokens": [5, 6]}]


def test_batch_prompts_and_chat_fields(server: FakeServer) -> None:
    server.routes[("POST", "/v1/chat/completions")] = lambda r: httpx.Response(
        200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yo"}, "finish_reason": "stop"}]}
    )
    with server.sync_client(model=MODEL) as client:
        client.complete(["a", "b"], max_tokens=2)
        client.complete([[1, 2], [3]])
        client.chat("Hi", logprobs=True, top_logprobs=2, max_completion_tokens=3)
        with pytest.raises(TypeError, match="prompt must be"):
            client.complete(["a", 1])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="tokenize takes a string"):
            client.tokenize([1, 2])  # type: ignore[arg-type]
    assert [b["prompt"] for b in server.bodies("/v1/completions")] == [["a", "b"], [[1, 2], [3]]]
    (chat,) = server.bodies("/v1/chat/completions")
    assert (chat["logprobs"], chat["top_logprobs"], chat["max_completion_tokens"]) == (True, 2, 3)


def test_wait_until_healthy_says_why_the_server_is_not_ready(server: FakeServer) -> None:
    reason = "ModelLoadError: could not read /ckpt"
    server.routes[("GET", "/health")] = lambda r: httpx.Response(503, json={"status": reason})
    with server.sync_client() as client, pytest.raises(TimeoutError, match=reason):
        client.wait_until_healthy(timeout=0.05, interval=0.01)


def test_wait_until_healthy_times_out() -> None:
    def refuse(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=r)

    with NeuronServeClient(base_url="http://test", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(TimeoutError, match="connection refused"):
            client.wait_until_healthy(timeout=0.05, interval=0.01)


# --------------------------------------------------------------------------- async


def test_async_client(server: FakeServer) -> None:
    server.routes[("POST", "/v1/chat/completions")] = lambda r: httpx.Response(
        200,
        content=_sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
            {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
            {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
        ),
    )
    server.routes[("GET", "/health")] = lambda r: httpx.Response(200, json={"status": "ok"})
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(
        400, json={"error": {"message": "bad prompt", "type": "invalid_request_error", "param": "prompt", "code": None}}
    )

    async def go() -> tuple[Any, ...]:
        async with server.async_client() as client:
            health = await client.health()
            chunks = [c async for c in client.stream_chat("Hello", sparsity=0.3)]
            with pytest.raises(NeuronServeError) as info:
                await client.complete("x", interventions=[{"type": "unmemorize", "profile": "canaries"}])
            return health, chunks, info.value

    health, chunks, err = asyncio.run(go())
    assert health.ready and health.detail == {"status": "ok"}
    assert "".join(c.text for c in chunks) == "Hi!"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 3
    assert (err.status, err.message, err.param) == (400, "bad prompt", "prompt")
    assert server.bodies("/v1/chat/completions") == [
        {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "sparsity": 0.3, "stream": True}
    ]
    assert server.bodies("/v1/completions")[0]["interventions"] == [{"type": "unmemorize", "profile": "canaries"}]


# --------------------------------------------------------------------------- CLI


def _factory(server: FakeServer) -> Callable[..., NeuronServeClient]:
    def make(**kw: Any) -> NeuronServeClient:
        kw["base_url"] = kw.get("base_url") or "http://test"
        return NeuronServeClient(transport=httpx.MockTransport(server), **kw)

    return make


def test_cli_complete_prints_text(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "complete", "Hi", "--max-tokens", "5", "--temperature", "0", "--sparsity", "0.5",
            "--intervention", '{"type": "eigenshift", "profile": "toxicity", "alpha": 0.3}',
            "--intervention", '{"type": "unmemorize", "profile": "canaries"}',
        ],
        client_factory=_factory(server),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out == "Hello world\n"
    assert server.bodies("/v1/completions") == [
        {
            "model": MODEL,
            "prompt": "Hi",
            "max_tokens": 5,
            "temperature": 0.0,
            "sparsity": 0.5,
            "interventions": [
                {"type": "eigenshift", "profile": "toxicity", "alpha": 0.3},
                {"type": "unmemorize", "profile": "canaries"},
            ],
        }
    ]


def test_cli_stream_json_and_chat(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(200, content=_sse(_chunk("Hel"), _chunk("lo")))
    assert main(["--model", MODEL, "complete", "Hi", "--stream"], client_factory=_factory(server)) == 0
    assert capsys.readouterr().out == "Hello\n"
    assert server.bodies("/v1/completions")[-1] == {"model": MODEL, "prompt": "Hi", "stream": True}

    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(200, json=_completion("raw"))
    assert main(["complete", "Hi", "--json", "--model", MODEL], client_factory=_factory(server)) == 0
    assert json.loads(capsys.readouterr().out)["choices"][0]["text"] == "raw"

    server.routes[("POST", "/v1/chat/completions")] = lambda r: httpx.Response(
        200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yo"}, "finish_reason": "stop"}]}
    )
    assert main(["chat", "Hi", "--system", "Be brief.", "--model", MODEL], client_factory=_factory(server)) == 0
    assert capsys.readouterr().out == "Yo\n"
    assert server.bodies("/v1/chat/completions")[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_cli_stream_verbose_reports_what_the_finishing_chunk_carries(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    applied = [{"type": "steer", "vector": "ocean", "strength": 1.0, "positions": "all", "layers": [15]}]
    finishing = _chunk("lo", "length", sparsity={"target": 0.3, "achieved": 0.31}, interventions=applied)
    usage_only = _chunk(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(
        200, content=_sse(_chunk("Hel"), finishing, usage_only))
    assert main(["--model", MODEL, "complete", "Hi", "--stream", "-v"], client_factory=_factory(server)) == 0
    err = capsys.readouterr().err
    assert "sparsity: target=0.3 achieved=0.31" in err and '"vector": "ocean"' in err


def test_cli_chat_logprobs_ask_for_top_logprobs(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes[("POST", "/v1/chat/completions")] = lambda r: httpx.Response(
        200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yo"}, "finish_reason": "stop"}]}
    )
    assert main(["--model", MODEL, "chat", "Hi", "--logprobs", "2"], client_factory=_factory(server)) == 0
    (body,) = server.bodies("/v1/chat/completions")
    assert (body["logprobs"], body["top_logprobs"]) == (True, 2)


def test_cli_error_exit_and_other_commands(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes[("POST", "/v1/completions")] = lambda r: httpx.Response(
        400, json={"error": {"message": "unknown SAE 'nope'", "type": "invalid_request_error", "param": "interventions", "code": None}}
    )
    rc = main(["complete", "Hi", "--model", MODEL], client_factory=_factory(server))
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == "" and "unknown SAE 'nope'" in captured.err

    server.routes[("GET", "/health")] = lambda r: httpx.Response(503)
    assert main(["health"], client_factory=_factory(server)) == 1
    assert capsys.readouterr().out == "not ready (HTTP 503)\n"
    server.routes[("GET", "/health")] = lambda r: httpx.Response(503, json={"status": "loading"})
    assert main(["health"], client_factory=_factory(server)) == 1
    assert capsys.readouterr().out == "not ready (HTTP 503: loading)\n"

    assert main(["models"], client_factory=_factory(server)) == 0
    assert capsys.readouterr().out == f"{MODEL}\n"

    server.routes[("POST", "/tokenize")] = lambda r: httpx.Response(200, json={"tokens": [1, 2], "count": 2})
    out = io.StringIO()
    assert main(["tokenize", "ab"], client_factory=_factory(server), stdout=out, stderr=io.StringIO()) == 0
    assert out.getvalue() == "1 2\n"

    with pytest.raises(SystemExit) as exit_info:
        main(["complete", "Hi", "--intervention", "[1]"], client_factory=_factory(server))
    assert exit_info.value.code == 2
