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


def _level(server, model: str, num_requests: int = 3, extra_body: dict | None = None) -> dict:
    return asyncio.run(serve_load.run_level(
        base_url=server.base_url, model=model, prompts=["Say hello.", "Count to three."], concurrency=2,
        num_requests=num_requests, max_tokens=4, temperature=0.0, ignore_eos=True, api_key=None, timeout_s=120.0,
        extra_body=extra_body))


def test_streams_are_counted_from_their_usage(server):
    model = serve_load.resolve_model(server.base_url, None, 30.0)
    level = _level(server, model)
    assert level["completed"] == 3 and level["failed"] == 0
    assert level["total_output_tokens"] == 3 * 4  # ignore_eos: every request runs to max_tokens
    assert level["output_tokens_source"] == ["usage"]
    assert level["ttft_ms"]["count"] == 3 and level["ttft_ms"]["median"] > 0 and level["output_throughput_tok_s"] > 0
    assert level["itl_ms"]["count"] == 3 * 3  # three gaps between four chunks per request
    assert level["cpu"]["client_ms_per_token"] > 0
    assert level["sparsity_achieved_mean"] == 0.0  # dense: the server reports what it skipped, nothing
    assert level["machine_cpu"]["busy_cores"] > 0 and level["machine_cpu"]["stolen_cores"] >= 0


def test_machine_report_counts_busy_and_stolen_cores():
    before = {"user": 10.0, "nice": 0.0, "system": 2.0, "idle": 50.0, "iowait": 1.0, "irq": 0.0, "softirq": 0.5,
              "steal": 3.0}
    after = dict(before, user=13.0, system=2.5, idle=50.5, iowait=1.5, softirq=1.0, steal=3.5)
    report = serve_load.machine_report(before, after, duration_s=2.0)
    assert report["busy_cores"] == (3.0 + 0.5 + 0.5) / 2.0  # user, system, softirq; not idle, iowait, steal
    assert report["stolen_cores"] == 0.25
    assert serve_load.machine_report(None, after, 2.0) is None


def test_a_failing_request_is_counted_not_raised(server):
    level = _level(server, "no-such-model", num_requests=2)
    assert level["completed"] == 0 and level["failed"] == 2
    (error, count), = level["errors"].items()
    assert count == 2 and error.startswith("HTTP 404")


def test_extra_body_reaches_the_server_and_cannot_override_the_scripts_own_fields(server):
    model = serve_load.resolve_model(server.base_url, None, 30.0)
    sparse = _level(server, model, extra_body={"sparsity": 0.5})
    assert sparse["completed"] == 3 and sparse["sparsity_achieved_mean"] > 0.3  # the served profile's 0.5
    assert [r["sparsity_achieved"] > 0.3 for r in sparse["requests"]] == [True] * 3
    # an unknown field is a 400 from this server, so a field that arrives is seen failing
    level = _level(server, model, extra_body={"no_such_field": 1})
    assert level["completed"] == 0 and level["failed"] == 3
    (error, _), = level["errors"].items()
    assert error.startswith("HTTP 400") and "no_such_field" in error
    parser = serve_load.build_parser()
    assert parser.parse_args(["--extra-body", '{"sparsity": 0.5}']).extra_body == {"sparsity": 0.5}
    for bad in ('{"max_tokens": 3}', "[1]", "{not json"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--extra-body", bad])
