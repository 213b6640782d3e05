"""benchmarks/serve_load.py's load generator against a real server: the numbers it reports come
from what the streams carried, and a failing request is counted, never fatal."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tests.conftest import PROJECT_ROOT

pytest.importorskip("aiohttp")
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import serve_load  # a script beside its own helpers, not a package


def _level(server, model: str, num_requests: int = 3) -> dict:
    return asyncio.run(serve_load.run_level(
        base_url=server.base_url, model=model, prompts=["Say hello.", "Count to three."], concurrency=2,
        num_requests=num_requests, max_tokens=4, temperature=0.0, ignore_eos=True, api_key=None, timeout_s=120.0))


def test_streams_are_counted_from_their_usage(server):
    model = serve_load.resolve_model(server.base_url, None, 30.0)
    level = _level(server, model)
    assert level["completed"] == 3 and level["failed"] == 0
    assert level["total_output_tokens"] == 3 * 4  # ignore_eos: every request runs to max_tokens
    assert level["output_tokens_source"] == ["usage"]
    assert level["ttft_ms"]["count"] == 3 and level["ttft_ms"]["median"] > 0 and level["output_throughput_tok_s"] > 0
    assert level["itl_ms"]["count"] == 3 * 3  # three gaps between four chunks per request
    assert level["cpu"]["client_ms_per_token"] > 0


def test_a_failing_request_is_counted_not_raised(server):
    level = _level(server, "no-such-model", num_requests=2)
    assert level["completed"] == 0 and level["failed"] == 2
    (error, count), = level["errors"].items()
    assert count == 2 and error.startswith("HTTP 404")
