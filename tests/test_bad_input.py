"""Malformed requests: every one gets a 4xx with the OpenAI error body, never a 5xx, and the server
keeps serving afterwards (one at a time, and all of them at once).

The table is `(method, path, body, headers, expected_status, expected_param)`:

- body: a dict/list/str/None is sent as JSON text (``json.dumps``, so JSON ``null`` for None);
  ``bytes`` are sent as they are; ``Chunked`` is streamed with ``Transfer-Encoding: chunked`` (no
  Content-Length); ``NO_BODY`` sends no body at all.
- headers: extra request headers; ``Content-Type: application/json`` is added unless given.
- expected_status: the exact status, or None for "any 4xx".
- expected_param: the exact ``error.param``; None leaves it unchecked; ``NULL`` requires null.

A server bug found here is marked ``bug("...")`` (a strict xfail) until it is fixed, so the suite
always says what is wrong today.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import httpx
import pytest

VOCAB = 49152  # SmolLM2-135M-Instruct
MAX_TOKENS = 256  # TEST_SETTINGS["max_tokens"]
MAX_MODEL_LEN = 512  # TEST_SETTINGS["max_model_len"]
MAX_LOGPROBS = 20  # ServerSettings.max_logprobs default
MAX_N = 16  # ServerSettings.max_n default
TEN_MB = 10 * 1024 * 1024

VALID = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}


class _Null:
    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()  # expected_param: error.param must be JSON null
NO_BODY = object()  # body: send nothing


@dataclass(frozen=True)
class Chunked:
    """A body streamed in `count` pieces of `piece` between `head` and `tail`, with no Content-Length."""

    head: bytes
    piece: bytes
    count: int
    tail: bytes

    def __iter__(self) -> Iterator[bytes]:
        pieces = [self.head, *([self.piece] * self.count), self.tail]
        yield from (p for p in pieces if p)  # an empty chunk would end a chunked body


def cmpl(**fields: Any) -> dict:
    """A /v1/completions body that is valid except for `fields`."""
    return {"prompt": "Hi", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict:
    """A /v1/chat/completions body that is valid except for `fields`."""
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


def bug(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"server bug: {reason}")


C, CH, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
JSON = {"content-type": "application/json"}
TEN_MB_JSON = b'{"prompt": "' + b"a" * TEN_MB + b'", "max_tokens": 2}'

# fmt: off
CASES = [
    # ---- /v1/completions: unknown fields and wrong types ----------------------------------------
    pytest.param("POST", C, cmpl(foo_bar=1), {}, 400, "foo_bar", id="cmpl-unknown-field"),
    pytest.param("POST", C, cmpl(stream_mode=True), {}, 400, "stream_mode", id="cmpl-unknown-field-starting-with-str"),
    pytest.param("POST", C, cmpl(max_tokens="ten"), {}, 400, "max_tokens", id="cmpl-max_tokens-string"),
    pytest.param("POST", C, cmpl(max_tokens=2.5), {}, 400, "max_tokens", id="cmpl-max_tokens-fraction"),
    pytest.param("POST", C, cmpl(temperature="hot"), {}, 400, "temperature", id="cmpl-temperature-string"),
    pytest.param("POST", C, cmpl(n=[1]), {}, 400, "n", id="cmpl-n-list"),
    pytest.param("POST", C, {"prompt": True, "max_tokens": 2}, {}, 400, "prompt", id="cmpl-prompt-bool"),
    pytest.param("POST", C, cmpl(prompt=[1, "a"]), {}, 400, "prompt", id="cmpl-prompt-mixed-list"),
    pytest.param("POST", C, cmpl(stop={"a": 1}), {}, 400, "stop", id="cmpl-stop-dict"),
    pytest.param("POST", C, cmpl(echo="yes"), {}, 400, "echo", id="cmpl-echo-string"),
    pytest.param("POST", C, cmpl(model=5), {}, 400, "model", id="cmpl-model-int"),
    pytest.param("POST", C, cmpl(stream="yes"), {}, 400, "stream", id="cmpl-stream-string"),
    pytest.param("POST", C, without(cmpl(), "prompt"), {}, 400, "prompt", id="cmpl-prompt-missing"),
    # ---- /v1/completions: max_tokens and lengths ---------------------------------------------------
    pytest.param("POST", C, cmpl(max_tokens=-1), {}, 400, "max_tokens", id="cmpl-max_tokens-negative"),
    pytest.param("POST", C, cmpl(max_tokens=10**12), {}, 400, "max_tokens", id="cmpl-max_tokens-huge"),
    pytest.param("POST", C, cmpl(max_tokens=0), {}, 400, "max_tokens", id="cmpl-max_tokens-0-without-echo"),
    pytest.param("POST", C, cmpl(max_tokens=MAX_TOKENS + 1), {}, 400, "max_tokens", id="cmpl-max_tokens-over-server-limit"),
    pytest.param("POST", C, cmpl(prompt=[0] * 300, max_tokens=MAX_TOKENS), {}, 400, "max_tokens",
                 id="cmpl-prompt-plus-max_tokens-over-max_model_len"),
    pytest.param("POST", C, cmpl(prompt=[0] * 600), {}, 400, "prompt", id="cmpl-prompt-ids-over-max_model_len"),
    pytest.param("POST", C, cmpl(prompt=[0] * MAX_MODEL_LEN), {}, 400, "prompt", id="cmpl-prompt-ids-exactly-max_model_len"),
    pytest.param("POST", C, cmpl(prompt="hello " * 1000), {}, 400, "prompt", id="cmpl-prompt-text-over-max_model_len"),
    pytest.param("POST", C, cmpl(prompt=""), {}, 400, "prompt", id="cmpl-prompt-empty-string"),
    pytest.param("POST", C, cmpl(prompt=[]), {}, 400, "prompt", id="cmpl-prompt-empty-list"),
    pytest.param("POST", C, cmpl(prompt=[[]]), {}, 400, "prompt", id="cmpl-prompt-empty-inner-list"),
    pytest.param("POST", C, cmpl(prompt=[1, VOCAB]), {}, 400, "prompt", id="cmpl-prompt-id-out-of-vocab"),
    pytest.param("POST", C, cmpl(prompt=[-1, 5]), {}, 400, "prompt", id="cmpl-prompt-id-negative"),
    pytest.param("POST", C, cmpl(prompt=[[5], [VOCAB]]), {}, 400, "prompt.1", id="cmpl-prompt-batch-id-out-of-vocab"),
    pytest.param("POST", C, cmpl(prompt=["Hi", "hello " * 1000]), {}, 400, "prompt.1", id="cmpl-prompt-batch-second-over-max_model_len"),
    pytest.param("POST", C, cmpl(prompt=[[5], [5] * MAX_MODEL_LEN]), {}, 400, "prompt.1", id="cmpl-prompt-batch-ids-second-over-max_model_len"),
    pytest.param("POST", C, cmpl(prompt=[1.5]), {}, 400, None, id="cmpl-prompt-float-ids"),
    # ---- /v1/completions: sampling ranges ------------------------------------------------------------
    pytest.param("POST", C, cmpl(temperature=-0.5), {}, 400, "temperature", id="cmpl-temperature-negative"),
    pytest.param("POST", C, cmpl(temperature=2.5), {}, 400, "temperature", id="cmpl-temperature-over-2"),
    pytest.param("POST", C, b'{"prompt": "Hi", "max_tokens": 2, "temperature": NaN}', JSON, 400, "temperature",
                 id="cmpl-temperature-nan"),
    pytest.param("POST", C, cmpl(top_p=0), {}, 400, "top_p", id="cmpl-top_p-0"),
    pytest.param("POST", C, cmpl(top_p=1.5), {}, 400, "top_p", id="cmpl-top_p-1.5"),
    pytest.param("POST", C, cmpl(top_k=-2), {}, 400, "top_k", id="cmpl-top_k-minus-2"),
    pytest.param("POST", C, cmpl(top_k=10**20, temperature=1), {}, 400, "top_k", id="cmpl-top_k-over-int64"),
    pytest.param("POST", C, cmpl(min_p=2), {}, 400, "min_p", id="cmpl-min_p-2"),
    pytest.param("POST", C, cmpl(presence_penalty=3), {}, 400, "presence_penalty", id="cmpl-presence_penalty-3"),
    pytest.param("POST", C, cmpl(frequency_penalty=-3), {}, 400, "frequency_penalty", id="cmpl-frequency_penalty-minus-3"),
    pytest.param("POST", C, cmpl(repetition_penalty=0), {}, 400, "repetition_penalty", id="cmpl-repetition_penalty-0"),
    pytest.param("POST", C, cmpl(min_tokens=-1), {}, 400, "min_tokens", id="cmpl-min_tokens-negative"),
    pytest.param("POST", C, cmpl(min_tokens=5), {}, 400, "min_tokens", id="cmpl-min_tokens-over-max_tokens"),
    pytest.param("POST", C, cmpl(n=0), {}, 400, "n", id="cmpl-n-0"),
    pytest.param("POST", C, cmpl(n=MAX_N + 1), {}, 400, "n", id="cmpl-n-over-max_n"),
    pytest.param("POST", C, cmpl(best_of=2), {}, 400, "best_of", id="cmpl-best_of-not-n"),
    pytest.param("POST", C, cmpl(seed=2**64), {}, 400, "seed", id="cmpl-seed-over-uint64"),
    pytest.param("POST", C, cmpl(logprobs=MAX_LOGPROBS + 1), {}, 400, "logprobs", id="cmpl-logprobs-over-max"),
    pytest.param("POST", C, cmpl(logprobs=-1), {}, 400, "logprobs", id="cmpl-logprobs-negative"),
    pytest.param("POST", C, cmpl(prompt=["a"] * 5, n=MAX_N, max_tokens=1), {}, 400, None,
                 id="cmpl-more-sequences-than-the-queue-holds"),
    # ---- /v1/completions: logit_bias, stop, stop_token_ids ---------------------------------------
    pytest.param("POST", C, cmpl(logit_bias={"abc": 1}), {}, 400, "logit_bias", id="cmpl-logit_bias-non-integer-key"),
    pytest.param("POST", C, cmpl(logit_bias={"1.5": 1}), {}, 400, "logit_bias", id="cmpl-logit_bias-fractional-key"),
    pytest.param("POST", C, cmpl(logit_bias={"-1": 1}), {}, 400, "logit_bias", id="cmpl-logit_bias-negative-id"),
    pytest.param("POST", C, cmpl(logit_bias={str(VOCAB): 1}), {}, 400, "logit_bias", id="cmpl-logit_bias-id-out-of-vocab"),
    pytest.param("POST", C, cmpl(logit_bias={"5": 500}), {}, 400, "logit_bias", id="cmpl-logit_bias-value-500"),
    pytest.param("POST", C, cmpl(logit_bias=[1]), {}, 400, "logit_bias", id="cmpl-logit_bias-list"),
    pytest.param("POST", C, cmpl(stop=""), {}, 400, "stop", id="cmpl-stop-empty-string"),
    pytest.param("POST", C, cmpl(stop=["x", ""]), {}, 400, "stop", id="cmpl-stop-list-with-empty-string"),
    pytest.param("POST", C, cmpl(stop=["a"] * 17), {}, 400, "stop", id="cmpl-stop-17-strings"),
    pytest.param("POST", C, cmpl(stop_token_ids=[VOCAB]), {}, 400, "stop_token_ids", id="cmpl-stop_token_ids-out-of-vocab"),
    pytest.param("POST", C, cmpl(stop_token_ids=[-1]), {}, 400, None, id="cmpl-stop_token_ids-negative"),
    # ---- /v1/completions: unsupported features, model ------------------------------------------------
    pytest.param("POST", C, cmpl(suffix="x"), {}, 400, "suffix", id="cmpl-suffix-non-null"),
    pytest.param("POST", C, cmpl(stream_options={"include_usage": True}), {}, 400, "stream_options", id="cmpl-stream_options-without-stream"),
    pytest.param("POST", C, cmpl(model="no-such-model"), {}, 404, "model", id="cmpl-unknown-model"),
    pytest.param("POST", C, b'{"prompt": "\\ud800", "max_tokens": 2}', JSON, 400, None, id="cmpl-prompt-lone-surrogate"),
    # ---- /v1/chat/completions ---------------------------------------------------------------------------
    pytest.param("POST", CH, chat(messages=[]), {}, 400, "messages", id="chat-messages-empty"),
    pytest.param("POST", CH, chat(messages=[{"role": "user", "content": "hello " * 1000}]), {}, 400, "messages",
                 id="chat-messages-over-max_model_len"),
    pytest.param("POST", CH, without(chat(), "messages"), {}, 400, "messages", id="chat-messages-missing"),
    pytest.param("POST", CH, chat(messages="Hi"), {}, 400, "messages", id="chat-messages-string"),
    pytest.param("POST", CH, chat(messages=[{"role": "robot", "content": "Hi"}]), {}, 400, "messages.0.role", id="chat-role-robot"),
    pytest.param("POST", CH, chat(messages=[{"content": "Hi"}]), {}, 400, "messages.0.role", id="chat-role-missing"),
    pytest.param("POST", CH, chat(messages=[{"role": "user", "content": 5}]), {}, 400, "messages.0.content", id="chat-content-int"),
    pytest.param("POST", CH, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
                 {}, 400, "messages.0.content", id="chat-content-image_url-part"),
    pytest.param("POST", CH, chat(messages=["Hi"]), {}, 400, None, id="chat-message-not-an-object"),
    pytest.param("POST", CH, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), {}, 400, "tools",
                 id="chat-tools-non-empty"),
    pytest.param("POST", CH, chat(tool_choice="auto"), {}, 400, "tool_choice", id="chat-tool_choice-auto"),
    pytest.param("POST", CH, chat(functions=[]), {}, 400, "functions", id="chat-unknown-field"),
    pytest.param("POST", CH, chat(top_logprobs=2), {}, 400, "top_logprobs", id="chat-top_logprobs-without-logprobs"),
    pytest.param("POST", CH, chat(logprobs=True, top_logprobs=MAX_LOGPROBS + 1), {}, 400, "top_logprobs",
                 id="chat-top_logprobs-over-max"),
    pytest.param("POST", CH, chat(logprobs=5), {}, 400, "logprobs", id="chat-logprobs-int"),
    pytest.param("POST", CH, chat(max_completion_tokens=2), {}, 400, "max_completion_tokens", id="chat-max_tokens-and-max_completion_tokens"),
    pytest.param("POST", CH, without(chat(max_completion_tokens=0), "max_tokens"), {}, 400, "max_completion_tokens",
                 id="chat-max_completion_tokens-0"),
    pytest.param("POST", CH, chat(max_tokens=0), {}, 400, "max_tokens", id="chat-max_tokens-0"),
    pytest.param("POST", CH, chat(max_tokens=MAX_TOKENS + 1), {}, 400, "max_tokens", id="chat-max_tokens-over-server-limit"),
    pytest.param("POST", CH, chat(max_tokens="two"), {}, 400, "max_tokens", id="chat-max_tokens-string"),
    pytest.param("POST", CH, chat(response_format={"type": "json_object"}), {}, 400, "response_format.type",
                 id="chat-response_format-json_object"),
    pytest.param("POST", CH, chat(continue_final_message=True), {}, 400, "continue_final_message", id="chat-continue_final_message-with-generation-prompt"),
    pytest.param("POST", CH, chat(temperature=-1), {}, 400, "temperature", id="chat-temperature-negative"),
    pytest.param("POST", CH, chat(n=0), {}, 400, "n", id="chat-n-0"),
    pytest.param("POST", CH, chat(logit_bias={str(VOCAB + 1000): 5}), {}, 400, "logit_bias", id="chat-logit_bias-id-out-of-vocab"),
    pytest.param("POST", CH, chat(stream_options={"include_usage": True}), {}, 400, "stream_options", id="chat-stream_options-without-stream"),
    pytest.param("POST", CH, chat(model="no-such-model"), {}, 404, "model", id="chat-unknown-model"),
    pytest.param("POST", CH, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', JSON, 400, None,
                 id="chat-content-lone-surrogate"),
    # ---- /tokenize, /detokenize ---------------------------------------------------------------------------
    pytest.param("POST", TOK, {}, {}, 400, "prompt", id="tokenize-neither-prompt-nor-messages"),
    pytest.param("POST", TOK, {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, {}, 400, "messages",
                 id="tokenize-both-prompt-and-messages"),
    pytest.param("POST", TOK, {"prompt": 5}, {}, 400, "prompt", id="tokenize-prompt-int"),
    pytest.param("POST", TOK, {"text": "Hi"}, {}, 400, "text", id="tokenize-unknown-field"),
    pytest.param("POST", TOK, {"messages": [{"role": "user", "content": "hello " * 100000}]}, {}, 400, "messages",
                 id="tokenize-messages-too-long"),
    pytest.param("POST", TOK, {"messages": [{"role": "robot", "content": "Hi"}]}, {}, 400, "messages.0.role", id="tokenize-role-robot"),
    pytest.param("POST", TOK, {"prompt": "Hi", "model": "no-such-model"}, {}, 404, "model", id="tokenize-unknown-model"),
    pytest.param("POST", TOK, b'{"prompt": "\\ud800"}', JSON, 400, None, id="tokenize-lone-surrogate"),
    pytest.param("POST", DETOK, {"tokens": [1, VOCAB]}, {}, 400, "tokens", id="detokenize-id-out-of-vocab"),
    pytest.param("POST", DETOK, {"tokens": [-1]}, {}, 400, "tokens", id="detokenize-id-negative"),
    pytest.param("POST", DETOK, {"tokens": [10**30]}, {}, 400, "tokens", id="detokenize-id-huge"),
    pytest.param("POST", DETOK, {"tokens": "abc"}, {}, 400, "tokens", id="detokenize-tokens-string"),
    pytest.param("POST", DETOK, {"tokens": [1.5]}, {}, 400, None, id="detokenize-tokens-float"),
    pytest.param("POST", DETOK, {}, {}, 400, "tokens", id="detokenize-tokens-missing"),
    pytest.param("POST", DETOK, {"tokens": [1], "model": "no-such-model"}, {}, 404, "model", id="detokenize-unknown-model"),
    # ---- bodies that are not a JSON object ---------------------------------------------------------------
    pytest.param("POST", C, [1, 2], {}, 400, NULL, id="body-json-array"),
    pytest.param("POST", C, "Hi", {}, 400, NULL, id="body-json-string"),
    pytest.param("POST", C, None, {}, 400, NULL, id="body-json-null"),
    pytest.param("POST", C, b"", JSON, 400, NULL, id="body-empty"),
    pytest.param("POST", C, b'{"prompt": "Hi", "max_tokens": 2', JSON, 400, None, id="body-invalid-json-truncated"),
    pytest.param("POST", C, b'{"prompt": "Hi", "max_tokens": 2', JSON, 400, NULL, id="body-invalid-json-param"),
    pytest.param("POST", CH, b"{'messages': []}", JSON, 400, None, id="chat-body-invalid-json-single-quotes"),
    pytest.param("POST", C, b'\xff\xfe{"prompt": 1}', JSON, 400, NULL, id="body-non-utf8"),
    pytest.param("POST", C, b'{"prompt": "\xff\xfe", "max_tokens": 2}', JSON, 400, NULL, id="body-non-utf8-inside-string"),
    pytest.param("POST", C, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON, 400, NULL, id="body-nested-5000-deep"),
    pytest.param("POST", C, b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 5000 + b"}", JSON, 400, None,
                 id="body-integer-with-5000-digits"),
    pytest.param("POST", C, TEN_MB_JSON, JSON, 413, NULL, id="body-10MB"),
    pytest.param("POST", C, Chunked(b"", b"x" * (1024 * 1024), 10, b""), JSON, 413, NULL, id="body-10MB-chunked"),
    pytest.param("POST", C, json.dumps(VALID).encode(), {"content-type": "text/plain"}, 415, NULL,
                 id="content-type-text-plain"),
    pytest.param("POST", C, json.dumps(VALID).encode(), {"content-type": "application/x-www-form-urlencoded"}, 415, NULL,
                 id="content-type-form"),
    # ---- methods and routes ---------------------------------------------------------------------------------
    pytest.param("GET", C, NO_BODY, {}, 405, None, id="get-completions"),
    pytest.param("GET", CH, NO_BODY, {}, 405, None, id="get-chat-completions"),
    pytest.param("GET", TOK, NO_BODY, {}, 405, None, id="get-tokenize"),
    pytest.param("PUT", C, VALID, {}, 405, None, id="put-completions"),
    pytest.param("POST", "/v1/models", {}, {}, 405, None, id="post-models"),
    pytest.param("POST", "/v1/no-such-route", VALID, {}, 404, None, id="unknown-path-post"),
    pytest.param("GET", "/v1/engines", NO_BODY, {}, 404, None, id="unknown-path-get"),
]
# fmt: on


def send(client: httpx.Client, method: str, path: str, body: Any, headers: dict) -> httpx.Response:
    hdrs = {"content-type": "application/json", **headers} if body is not NO_BODY else dict(headers)
    if body is NO_BODY:
        content = None
    elif isinstance(body, (bytes, Chunked)):
        content = iter(body) if isinstance(body, Chunked) else body
    else:
        content = json.dumps(body).encode()
    return client.request(method, path, content=content, headers=hdrs)


def check_error(resp: httpx.Response, expected_status: int | None, expected_param: Any) -> None:
    assert 400 <= resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if expected_status is not None:
        assert resp.status_code == expected_status, resp.text[:500]
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    if expected_param is NULL:
        assert error["param"] is None, error
    elif expected_param is not None:
        assert error["param"] == expected_param, error


def check_serving(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json=VALID)
    assert resp.status_code == 200, resp.text[:500]
    choices = resp.json()["choices"]
    assert len(choices) == 1 and choices[0]["finish_reason"] in ("length", "stop")


def test_table_is_big_enough():
    assert len(CASES) >= 40
    assert len({p.id for p in CASES}) == len(CASES)


@pytest.mark.parametrize("method,path,body,headers,expected_status,expected_param", CASES)
def test_malformed_request(client, method, path, body, headers, expected_status, expected_param):
    resp = send(client, method, path, body, headers)
    check_error(resp, expected_status, expected_param)
    check_serving(client)


def _is_known_bug(case) -> bool:
    return any(mark.name == "xfail" for mark in case.marks)


def test_malformed_requests_concurrently(server, client):
    """All the cases at once from 8 threads; the known-bug cases are sent too but not judged."""

    def one(case):
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            try:
                return case, send(c, *case.values[:4]), None
            except httpx.TransportError as exc:
                return case, None, exc

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, CASES))

    failures = []
    for case, resp, exc in results:
        if _is_known_bug(case):
            continue
        try:
            assert exc is None, f"transport error: {exc!r}"
            check_error(resp, *case.values[4:])
        except AssertionError as err:
            failures.append(f"{case.id}: {err}")
    assert not failures, "\n".join(failures)

    assert client.get("/health").status_code == 200
    check_serving(client)
