#!/usr/bin/env python3
"""Load generator for a running neuronserve (or any OpenAI-compatible) server.

For each concurrency level (default 1,4,8,16) it keeps exactly ``concurrency``
streaming ``POST /v1/completions`` requests in flight until
``--requests-per-level`` requests have finished, then reports latency and
throughput.  Metric definitions follow vLLM's ``benchmarks/benchmark_serving.py``:

* TTFT  - time to first token: from sending the request to the first content
          chunk (a chunk whose ``choices[0].text`` is non-empty).
* TPOT  - time per output token, per request: ``(e2e - ttft) / (output_tokens - 1)``,
          only for requests with more than one output token.
* ITL   - inter-token latency: every gap between consecutive content chunks,
          pooled over all requests of the level.
* E2E   - end-to-end latency: from sending the request to the end of the stream.

Output tokens come from the server's ``usage.completion_tokens`` (requested with
``"stream_options": {"include_usage": true}``); if the server sends no usage the
number of content chunks is used instead.  Throughputs are aggregates over the
wall-clock duration of the level (first send to last completion):
request throughput = successful requests / duration, output throughput =
sum of output tokens / duration.  ``output_throughput_ratio_vs_c1`` divides each
level's output throughput by that of concurrency 1 (or of the lowest level run
if 1 is not in the list; see ``scaling_baseline_concurrency`` in the JSON).

Percentiles use linear interpolation between closest ranks (NumPy's default).
All latencies are in milliseconds.  Failed requests (HTTP 4xx/5xx, an ``error``
object in the stream, a broken connection, a timeout, or an empty stream) are
counted and reported, never fatal.

Needs ``aiohttp`` for the streams (``pip install -e ".[bench]"``) and ``httpx`` for the
start-up probes.  Why aiohttp: its C HTTP parser costs the load generator 0.10-0.11 ms of CPU per
streamed token at 8 streams against httpx's 0.24-0.33 (benchmarks/RESULTS.md), and on a small machine the load
generator shares the server's cores, whose model threads lose more than that when it preempts
them.  Nothing runs on import.

Examples::

    # against a server that is already running
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000

    # start the server, benchmark it, stop it
    python benchmarks/serve_load.py --launch --server-arg="--model /path/to/model" \\
        --concurrency 1,4 --max-tokens 32

    # every request at WINA sparsity 0.5 (neuronserve's own field)
    python benchmarks/serve_load.py --launch --concurrency 1,8 --extra-body '{"sparsity": 0.5}'
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench_common import describe_machine, fmt as _fmt, format_table as _table, machine_cpu_seconds, write_report

try:  # imported lazily-safe: the module still imports (and --help works) without them
    import httpx
except ImportError:  # pragma: no cover - reported at run time
    httpx = None  # type: ignore[assignment]
try:
    import aiohttp
except ImportError:  # pragma: no cover - reported at run time
    aiohttp = None  # type: ignore[assignment]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = PROJECT_ROOT.parent / "shared" / "data" / "alpaca" / "seed_tasks.jsonl"
DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "serve_load.json"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_CONCURRENCY = "1,4,8,16"
HEALTH_TIMEOUT_S = 300.0

# Used only when the default prompt file is missing and --prompts is not given.
_FALLBACK_PROMPTS = [
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List five tips for staying focused while working from home.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarize the plot of a heist movie in three sentences.",
    "Give a recipe for a quick vegetarian dinner.",
    "Why is the sky blue? Answer briefly.",
]

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
METRIC_LABELS = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2e_ms": "E2E"}


# --------------------------------------------------------------------------- data


@dataclass
class RequestResult:
    """Outcome of one streaming request. Times are seconds (converted to ms in reports)."""

    success: bool = False
    error: str | None = None
    status_code: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_source: str | None = None  # "usage" or "chunks"
    prompt_tokens: int | None = None
    content_chunks: int = 0
    output_chars: int = 0
    # neuronserve's `sparsity.achieved` from the last chunk: the share of projection weights the
    # request's tokens skipped (None from servers without WINA)
    sparsity_achieved: float | None = None

    @property
    def tpot_s(self) -> float | None:
        if (
            self.success
            and self.output_tokens > 1
            and self.ttft_s is not None
            and self.e2e_s is not None
        ):
            return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)
        return None


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Percentile ``q`` in [0, 100] with linear interpolation (NumPy 'linear' method)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * (q / 100.0)
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(xs[lo])
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize_ms(values_s: Iterable[float]) -> dict[str, float | int | None]:
    """mean / median / p90 / p99 / std / min / max in milliseconds, plus the sample count."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {
            "count": 0, "mean": None, "median": None, "p90": None,
            "p99": None, "std": None, "min": None, "max": None,
        }
    return {
        "count": len(ms),
        "mean": statistics.fmean(ms),
        "median": statistics.median(ms),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "std": statistics.pstdev(ms) if len(ms) > 1 else 0.0,
        "min": min(ms),
        "max": max(ms),
    }


# --------------------------------------------------------------------------- prompts


def _prompt_from_record(rec: dict[str, Any]) -> list[str]:
    """Turn one JSONL record into prompts. Alpaca seed tasks may give several instances."""
    if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
        return [rec["prompt"]]
    instruction = rec.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return []
    instruction = instruction.strip()
    inputs: list[str] = []
    if isinstance(rec.get("input"), str) and rec["input"].strip():
        inputs.append(rec["input"].strip())
    for inst in rec.get("instances") or []:
        if isinstance(inst, dict) and isinstance(inst.get("input"), str) and inst["input"].strip():
            inputs.append(inst["input"].strip())
    if not inputs:
        return [instruction]
    return [f"{instruction}\n\n{inp}" for inp in inputs]


def load_prompts(path: Path | None) -> tuple[list[str], str]:
    """Load prompts from a JSONL file; returns (prompts, description of the source)."""
    explicit = path is not None
    path = path if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        if explicit:
            raise SystemExit(f"error: prompt file not found: {path}")
        print(
            f"warning: default prompt file {path} not found; using {len(_FALLBACK_PROMPTS)} built-in prompts",
            file=sys.stderr,
        )
        return list(_FALLBACK_PROMPTS), "built-in"
    prompts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{lineno}: not JSON, skipped", file=sys.stderr)
                continue
            if isinstance(rec, dict):
                prompts.extend(_prompt_from_record(rec))
    if not prompts:
        raise SystemExit(f"error: no usable prompts (need 'prompt' or 'instruction') in {path}")
    return prompts, str(path)


def prompt_order(prompts: list[str], seed: int) -> list[str]:
    """Deterministic shuffled order; every level walks the same order for comparability."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order


# --------------------------------------------------------------------------- HTTP


def _headers(api_key: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def _error_text(status: int | None, body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict):
            msg = err.get("message") or json.dumps(err)
            typ = err.get("type")
            text = f"{typ}: {msg}" if typ else str(msg)
        elif isinstance(err, str):
            text = err
        elif isinstance(obj, dict) and "detail" in obj:
            text = str(obj["detail"])
    except (json.JSONDecodeError, AttributeError):
        pass
    text = " ".join(text.split())[:300]
    return f"HTTP {status}: {text}" if status is not None else text


async def _stream_completion(
    client: "aiohttp.ClientSession", url: str, payload: dict[str, Any], headers: dict[str, str]
) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last_chunk_t: float | None = None
    usage_tokens: int | None = None
    got_done = False
    async with client.post(url, json=payload, headers=headers) as resp:
        res.status_code = resp.status
        if resp.status >= 400:
            body = await resp.read()
            res.error = _error_text(resp.status, body)
            return res
        async for raw in resp.content:  # one line at a time
            now = time.perf_counter()
            line = raw.decode("utf-8", "replace").strip()
            if not line or line.startswith(":"):
                continue  # blank separator or SSE comment / keep-alive
            if not line.startswith("data:"):
                continue  # event:, id:, retry: fields are not used by this API
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                got_done = True
                break
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                res.error = f"bad SSE payload: {data[:200]}"
                return res
            if not isinstance(obj, dict):
                continue
            if obj.get("error") is not None:
                res.error = "stream error: " + _error_text(None, json.dumps(obj))
                return res
            choices = obj.get("choices") or []
            if choices and isinstance(choices[0], dict):
                text = choices[0].get("text") or ""
                if text:
                    if last_chunk_t is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last_chunk_t)
                    last_chunk_t = now
                    res.content_chunks += 1
                    res.output_chars += len(text)
            sparsity = obj.get("sparsity")
            if isinstance(sparsity, dict) and isinstance(sparsity.get("achieved"), (int, float)):
                res.sparsity_achieved = float(sparsity["achieved"])
            usage = obj.get("usage")
            if isinstance(usage, dict):
                if isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
                if isinstance(usage.get("prompt_tokens"), int):
                    res.prompt_tokens = usage["prompt_tokens"]
    res.e2e_s = time.perf_counter() - start
    if usage_tokens is not None:
        res.output_tokens, res.output_tokens_source = usage_tokens, "usage"
    else:
        res.output_tokens, res.output_tokens_source = res.content_chunks, "chunks"
    if res.content_chunks == 0:
        res.error = "stream ended without any content" + ("" if got_done else " (no [DONE])")
        return res
    res.success = True
    return res


async def run_request(
    client: "aiohttp.ClientSession",
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    timeout_s: float,
) -> RequestResult:
    """One request; every failure is turned into a RequestResult with ``error`` set."""
    try:
        return await asyncio.wait_for(_stream_completion(client, url, payload, headers), timeout_s)
    except asyncio.TimeoutError:
        return RequestResult(error=f"timeout after {timeout_s:g} s")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a load generator must never crash on one request
        return RequestResult(error=f"{type(exc).__name__}: {exc}"[:300])


def resolve_model(base_url: str, api_key: str | None, timeout_s: float) -> str:
    url = f"{base_url}/v1/models"
    try:
        resp = httpx.get(url, headers=_headers(api_key), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: cannot reach {url} to find the model name: {exc}") from None
    if resp.status_code >= 400:
        raise SystemExit(f"error: GET {url}: {_error_text(resp.status_code, resp.content)}")
    try:
        return str(resp.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise SystemExit(f"error: GET {url} returned no model list; pass --model") from None


# --------------------------------------------------------------------------- one level


async def run_level(
    *,
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    num_requests: int,
    max_tokens: int,
    temperature: float,
    ignore_eos: bool,
    api_key: str | None,
    timeout_s: float,
    server_pid: int | None = None,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    url = f"{base_url}/v1/completions"
    headers = _headers(api_key)

    def payload(i: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if ignore_eos:
            body["ignore_eos"] = True
        body.update(extra_body or {})  # callers pass no key set above (the --extra-body parser refuses them)
        return body

    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    # these bound each socket operation; run_request bounds the whole request.
    http_timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout_s, 30.0), sock_read=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=http_timeout) as client:
        # One untimed warm-up request (uses the last prompt of the order, not a measured one).
        warm = await run_request(client, url, payload(len(prompts) - 1), headers, timeout_s)
        if not warm.success:
            print(f"  warning: warm-up request failed: {warm.error}", file=sys.stderr)

        results: list[RequestResult | None] = [None] * num_requests
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(num_requests):
            queue.put_nowait(i)

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[i] = await run_request(client, url, payload(i), headers, timeout_s)

        server_cpu_before = thread_cpu_seconds(server_pid)
        machine_before = machine_cpu_seconds()
        client_cpu_before = time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        duration = time.perf_counter() - t0
        client_cpu = time.process_time() - client_cpu_before
        machine_after = machine_cpu_seconds()
        server_cpu_after = thread_cpu_seconds(server_pid)

    done = [r for r in results if r is not None]
    ok = [r for r in done if r.success]
    failed = [r for r in done if not r.success]
    total_out = sum(r.output_tokens for r in ok)
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    errors: dict[str, int] = {}
    for r in failed:
        key = r.error or "unknown error"
        errors[key] = errors.get(key, 0) + 1

    level: dict[str, Any] = {
        "concurrency": concurrency,
        "num_requests": num_requests,
        "completed": len(ok),
        "failed": len(failed),
        "errors": errors,
        "warmup_ok": warm.success,
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "output_tokens_source": sorted({r.output_tokens_source for r in ok if r.output_tokens_source}),
        "request_throughput_rps": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput_tok_s": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput_tok_s": (total_in + total_out) / duration if duration > 0 else 0.0,
        "mean_output_tokens_per_request": (total_out / len(ok)) if ok else None,
        "sparsity_achieved_mean": _mean([r.sparsity_achieved for r in ok if r.sparsity_achieved is not None]),
        "ttft_ms": summarize_ms(r.ttft_s for r in ok if r.ttft_s is not None),
        "tpot_ms": summarize_ms(t for t in (r.tpot_s for r in ok) if t is not None),
        "itl_ms": summarize_ms(g for r in ok for g in r.itl_s),
        "e2e_ms": summarize_ms(r.e2e_s for r in ok if r.e2e_s is not None),
        "cpu": cpu_report(server_cpu_before, server_cpu_after, server_pid, client_cpu, total_out),
        "machine_cpu": machine_report(machine_before, machine_after, duration),
        "requests": [
            {
                "success": r.success,
                "error": r.error,
                "status_code": r.status_code,
                "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1000.0,
                "tpot_ms": None if r.tpot_s is None else r.tpot_s * 1000.0,
                "e2e_ms": None if r.e2e_s is None else r.e2e_s * 1000.0,
                "output_tokens": r.output_tokens,
                "output_tokens_source": r.output_tokens_source,
                "prompt_tokens": r.prompt_tokens,
                "content_chunks": r.content_chunks,
                "sparsity_achieved": r.sparsity_achieved,
            }
            for r in done
        ],
    }
    return level


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def thread_cpu_seconds(pid: int | None) -> dict[int, float] | None:
    """CPU seconds (user + system) each thread of process `pid` has used, by thread id; None
    without a pid or without Linux's /proc."""
    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended between the listing and the read
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime: fields 14 and 15 of stat
    return out


def cpu_report(before: dict[int, float] | None, after: dict[int, float] | None, server_pid: int | None,
               client_cpu_s: float, output_tokens: int) -> dict[str, Any]:
    """Where the cores went during a level: the server's event-loop thread (uvicorn runs it on the
    main thread, whose id is the pid), the whole server, and this load generator. Per output
    token, these vary much less than throughput on a shared machine, so they compare HTTP paths."""
    per_token = (lambda s: s * 1000.0 / output_tokens) if output_tokens else (lambda s: None)
    report: dict[str, Any] = {"client_s": client_cpu_s, "client_ms_per_token": per_token(client_cpu_s)}
    if before is not None and after is not None and server_pid is not None:
        loop_s = after.get(server_pid, 0.0) - before.get(server_pid, 0.0)
        all_s = sum(after.values()) - sum(before.get(tid, 0.0) for tid in after)
        report.update(server_event_loop_s=loop_s, server_all_threads_s=all_s,
                      server_event_loop_ms_per_token=per_token(loop_s),
                      server_all_threads_ms_per_token=per_token(all_s))
    return report


def machine_report(before: dict[str, float] | None, after: dict[str, float] | None,
                   duration_s: float) -> dict[str, float] | None:
    """The whole machine during a level, in cores (CPU seconds per second of the level): busy
    (everything but idle and iowait) and stolen by the hypervisor for other VMs. On a shared VM
    the level's throughput moves with what others take; this records it beside the numbers.
    /proc/stat is the kernel's view: in a container it counts the host's cores, not the container's."""
    if before is None or after is None or duration_s <= 0:
        return None
    delta = {kind: after[kind] - before[kind] for kind in after}
    busy = sum(v for kind, v in delta.items() if kind not in ("idle", "iowait", "steal"))
    return {"busy_cores": busy / duration_s, "stolen_cores": delta["steal"] / duration_s,
            "cores": os.cpu_count() or 0}


# --------------------------------------------------------------------------- server launch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_server(port: int, server_args: list[str], log_path: Path) -> tuple[subprocess.Popen, Any]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--host", "127.0.0.1"]
    cmd += server_args
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w", encoding="utf-8")
    print(f"launching: {shlex.join(cmd)}  (log: {log_path})", file=sys.stderr)
    proc = subprocess.Popen(cmd, cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: Path) -> float:
    """Poll GET /health until 200. Returns seconds waited; exits if the server dies or times out."""
    t0 = time.perf_counter()
    url = f"{base_url}/health"
    while True:
        elapsed = time.perf_counter() - t0
        if proc.poll() is not None:
            raise SystemExit(f"error: server exited with code {proc.returncode} before becoming healthy; see {log_path}")
        if elapsed > timeout_s:
            raise SystemExit(f"error: server not healthy after {timeout_s:g} s; see {log_path}")
        try:
            if httpx.get(url, timeout=5.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, log: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    try:
        log.close()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    return describe_machine(("torch", "httpx", "aiohttp"))


def format_report(report: dict[str, Any]) -> str:
    levels = report["levels"]
    cfg = report["config"]
    out = [
        "",
        f"serve_load: {report['base_url']}  model={report['model']}  max_tokens={cfg['max_tokens']}  "
        f"temperature={cfg['temperature']}  ignore_eos={cfg['ignore_eos']}",
    ]
    if report.get("server", {}).get("launch_to_healthy_s") is not None:
        out.append(f"server launched by this script; healthy after {report['server']['launch_to_healthy_s']:.1f} s")
    base_c = report.get("scaling_baseline_concurrency")
    ratio_hdr = "ratio" if base_c == 1 else f"ratio(c={base_c})"
    rows = []
    for lv in levels:
        rows.append([
            str(lv["concurrency"]),
            str(lv["num_requests"]),
            str(lv["completed"]),
            str(lv["failed"]),
            _fmt(lv["duration_s"], 2),
            _fmt(lv["request_throughput_rps"], 2),
            _fmt(lv["output_throughput_tok_s"], 1),
            _fmt(lv.get("output_throughput_ratio_vs_c1"), 2),
            _fmt(lv["ttft_ms"]["median"]),
            _fmt(lv["tpot_ms"]["median"]),
            _fmt(lv["itl_ms"]["median"]),
            _fmt(lv["e2e_ms"]["median"]),
        ])
    out.append("")
    out.append(_table(
        ["conc", "reqs", "ok", "fail", "dur_s", "req/s", "out_tok/s", ratio_hdr,
         "TTFT_p50_ms", "TPOT_p50_ms", "ITL_p50_ms", "E2E_p50_ms"],
        rows,
    ))
    rows = []
    for lv in levels:
        for m in METRICS:
            s = lv[m]
            rows.append([
                str(lv["concurrency"]), METRIC_LABELS[m], str(s["count"]),
                _fmt(s["mean"], 2), _fmt(s["median"], 2), _fmt(s["p90"], 2), _fmt(s["p99"], 2),
            ])
    out.append("")
    out.append(_table(["conc", "metric", "n", "mean_ms", "median_ms", "p90_ms", "p99_ms"], rows))
    cpu_rows = [[str(lv["concurrency"]), _fmt(lv["cpu"].get("server_event_loop_ms_per_token"), 3),
                 _fmt(lv["cpu"].get("server_all_threads_ms_per_token"), 2), _fmt(lv["cpu"]["client_ms_per_token"], 3),
                 _fmt((lv.get("machine_cpu") or {}).get("busy_cores"), 2),
                 _fmt((lv.get("machine_cpu") or {}).get("stolen_cores"), 3)]
                for lv in levels if "cpu" in lv]
    if cpu_rows:
        out.append("")
        out.append("CPU per output token (ms; the server's columns only when this script launched it), and the "
                   "whole machine's cores busy and stolen by the hypervisor during the level:")
        out.append(_table(["conc", "server event loop", "server all threads", "load generator", "machine busy",
                           "stolen"], cpu_rows))
    achieved = [(lv["concurrency"], lv.get("sparsity_achieved_mean")) for lv in levels]
    if any(a is not None for _, a in achieved):
        out.append("")
        out.append("WINA sparsity achieved (share of projection weights skipped, mean over requests): "
                   + ", ".join(f"c={c} {_fmt(a, 3)}" for c, a in achieved))
    errs = [(lv["concurrency"], e, n) for lv in levels for e, n in lv["errors"].items()]
    if errs:
        out.append("")
        out.append("failed requests:")
        for c, e, n in errs:
            out.append(f"  c={c}: {n} x {e}")
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


# the body fields run_level sets itself, each from its own option
OWN_BODY_FIELDS = frozenset({"model", "prompt", "max_tokens", "temperature", "stream", "stream_options", "ignore_eos"})


def _extra_body(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(body).__name__}")
    clash = sorted(OWN_BODY_FIELDS & body.keys())
    if clash:
        raise argparse.ArgumentTypeError(f"sets {', '.join(clash)}, which have their own options")
    return body


def _concurrency_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve_load.py",
        description=(
            "Streaming load generator for an OpenAI-compatible /v1/completions endpoint.\n"
            "For each concurrency level it keeps that many requests in flight (after one\n"
            "untimed warm-up request) and reports TTFT, TPOT, ITL and end-to-end latency\n"
            "(mean/median/p90/p99, ms), request throughput, output-token throughput and\n"
            "its ratio to concurrency 1, using vLLM benchmark_serving definitions:\n"
            "  TTFT = send -> first content chunk;  TPOT = (e2e - ttft) / (output_tokens - 1);\n"
            "  ITL  = gaps between consecutive content chunks;  output tokens from\n"
            "  usage.completion_tokens (stream_options.include_usage), else chunk count."
        ),
        epilog=(
            "Examples:\n"
            "  python benchmarks/serve_load.py --base-url http://127.0.0.1:8000\n"
            "  python benchmarks/serve_load.py --concurrency 1,4 --max-tokens 32 --requests-per-level 8\n"
            "  python benchmarks/serve_load.py --launch --server-arg='--model /models/tiny'\n"
            "\n"
            "Output: a table on stdout and a JSON file (--out) with every metric per level,\n"
            "per-request records, the command line, the time and a machine description."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", default=None,
                   help=f"server URL without /v1 (default {DEFAULT_BASE_URL}; with --launch, "
                        "http://127.0.0.1:PORT)")
    p.add_argument("--model", default=None,
                   help="model name for the request body (default: data[0].id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("NEURONSERVE_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $NEURONSERVE_API_KEY if set)")
    p.add_argument("--concurrency", type=_concurrency_list, default=_concurrency_list(DEFAULT_CONCURRENCY),
                   metavar="N[,N...]", help=f"comma-separated concurrency levels (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--requests-per-level", type=_positive_int, default=None, metavar="N",
                   help="timed requests per level (default max(8, 4 x concurrency))")
    p.add_argument("--max-tokens", type=_positive_int, default=64, metavar="N",
                   help="max_tokens per request (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos=true (by default it is sent so every request "
                        "generates exactly --max-tokens tokens)")
    p.add_argument("--extra-body", type=_extra_body, default={}, metavar="JSON",
                   help="a JSON object merged into every request's body, for fields beyond OpenAI's: "
                        "e.g. '{\"sparsity\": 0.5}' or '{\"interventions\": {...}}' (keys the script sets "
                        "itself are refused; use their own options)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="JSONL file with a 'prompt' or 'instruction' (+ optional 'input'/'instances') "
                        "field per line (default <project>/../shared/data/alpaca/seed_tasks.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="seed for the deterministic prompt order (default 0)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="per-request timeout in seconds, whole stream included (default 300)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FILE",
                   help="JSON results file (default benchmarks/out/serve_load.json under the project root; "
                        "parent folders are created)")
    g = p.add_argument_group("launching the server (optional)")
    g.add_argument("--launch", action="store_true",
                   help="start 'python -m server.cli serve --host 127.0.0.1 --port PORT' from the project "
                        "root, wait for GET /health == 200 (up to 300 s), benchmark, then stop it "
                        "(SIGTERM, wait, kill)")
    g.add_argument("--port", type=int, default=None,
                   help="port for --launch (default: a free port)")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument(s) for the launched server; repeatable; each value is split "
                        "shell-style, so write --server-arg='--model /path' or --server-arg=--flag")
    g.add_argument("--launch-timeout", type=float, default=HEALTH_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long to wait for /health after launching (default {HEALTH_TIMEOUT_S:g})")
    return p


async def _run_levels(args: argparse.Namespace, base_url: str, model: str, prompts: list[str],
                      server_pid: int | None) -> list[dict]:
    levels = []
    for c in args.concurrency:
        n = args.requests_per_level if args.requests_per_level else max(8, 4 * c)
        print(f"level concurrency={c}: {n} requests ...", file=sys.stderr, flush=True)
        lv = await run_level(
            base_url=base_url, model=model, prompts=prompts, concurrency=c, num_requests=n,
            max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos,
            api_key=args.api_key, timeout_s=args.timeout, server_pid=server_pid, extra_body=args.extra_body,
        )
        print(
            f"  done in {lv['duration_s']:.2f} s: ok={lv['completed']} failed={lv['failed']} "
            f"out_tok/s={lv['output_throughput_tok_s']:.1f}",
            file=sys.stderr, flush=True,
        )
        levels.append(lv)
    return levels


def _redact(argv: list[str]) -> list[str]:
    """Hide the --api-key value in the recorded command line."""
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif a == "--api-key":
            out.append(a)
            hide_next = True
        elif a.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if httpx is None or aiohttp is None:
        print('error: this script needs httpx and aiohttp (pip install -e ".[bench]")', file=sys.stderr)
        return 2

    raw_prompts, prompt_source = load_prompts(args.prompts)
    prompts = prompt_order(raw_prompts, args.seed)

    server_info: dict[str, Any] = {"launched": bool(args.launch), "launch_to_healthy_s": None}
    proc = log = None
    if args.launch:
        port = args.port or _free_port()
        base_url = (args.base_url or f"http://127.0.0.1:{port}").rstrip("/")
        server_args = [tok for a in args.server_arg for tok in shlex.split(a)]
        log_path = args.out.parent / (args.out.stem + "_server.log")
        proc, log = launch_server(port, server_args, log_path)
        server_info.update(
            command=[sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--host", "127.0.0.1",
                     *server_args],
            log=str(log_path),
        )
    else:
        base_url = (args.base_url or DEFAULT_BASE_URL).rstrip("/")
    server_info["base_url"] = base_url

    try:
        if proc is not None:
            healthy_s = wait_healthy(proc, base_url, args.launch_timeout, Path(server_info["log"]))
            server_info["launch_to_healthy_s"] = healthy_s
            print(f"server healthy after {healthy_s:.1f} s", file=sys.stderr)
        model = args.model or resolve_model(base_url, args.api_key, min(args.timeout, 60.0))
        started = _dt.datetime.now(_dt.timezone.utc)
        levels = asyncio.run(_run_levels(args, base_url, model, prompts, proc.pid if proc is not None else None))
        finished = _dt.datetime.now(_dt.timezone.utc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if proc is not None:
            stop_server(proc, log)
            server_info["exit_code"] = proc.returncode

    baseline = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if baseline is None and levels:
        baseline = min(levels, key=lambda lv: lv["concurrency"])
    base_tp = baseline["output_throughput_tok_s"] if baseline else 0.0
    for lv in levels:
        lv["output_throughput_ratio_vs_c1"] = (lv["output_throughput_tok_s"] / base_tp) if base_tp > 0 else None

    argv_list = _redact(list(sys.argv[1:] if argv is None else argv))
    report: dict[str, Any] = {
        "benchmark": "serve_load",
        "schema_version": 1,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": finished.isoformat(timespec="seconds"),
        "unix_time": time.time(),
        "command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv_list]),
        "argv": argv_list,
        "base_url": base_url,
        "model": model,
        "config": {
            "concurrency": args.concurrency,
            "requests_per_level": args.requests_per_level,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "ignore_eos": args.ignore_eos,
            "extra_body": args.extra_body,
            "seed": args.seed,
            "timeout_s": args.timeout,
            "prompt_source": prompt_source,
            "num_prompts_available": len(prompts),
            "warmup_requests_per_level": 1,
        },
        "metric_definitions": {
            "ttft_ms": "send -> first content chunk (choices[0].text non-empty)",
            "tpot_ms": "(e2e - ttft) / (output_tokens - 1), per request with output_tokens > 1",
            "itl_ms": "gaps between consecutive content chunks, pooled over requests",
            "e2e_ms": "send -> end of stream",
            "output_tokens": "usage.completion_tokens, else number of content chunks",
            "request_throughput_rps": "successful requests / level duration",
            "output_throughput_tok_s": "sum of output tokens of successful requests / level duration",
            "output_throughput_ratio_vs_c1": "output_throughput_tok_s / that of scaling_baseline_concurrency",
            "percentiles": "linear interpolation (numpy default)",
        },
        "scaling_baseline_concurrency": baseline["concurrency"] if baseline else None,
        "server": server_info,
        "machine": machine_info(),
        "levels": levels,
    }

    write_report(report, format_report(report), args.out)
    return 0 if all(lv["completed"] > 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
