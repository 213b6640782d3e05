"""Time from launching `neuronserve serve` to a 200 from /health, cold (empty caches) and warm.

    python benchmarks/startup.py [--repeats 2] [--model default] [--device auto] [--out benchmarks/out/startup.json]

Cold: an empty `--cache-dir` (the re-laid weights, compiled CPU kernels) and an empty Triton cache
(compiled GPU kernels); warm: both as the cold run left them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import describe_machine, write_report

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_to_healthy(cache_dir: Path, model: str, device: str, timeout: float = 600) -> float:
    port = _free_port()
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache_dir / "triton")}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", model,
                             "--device", device, "--cache-dir", str(cache_dir), "--log-level", "warning"],
                            cwd=ROOT, env=env)
    try:
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server did not become healthy")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="default", help="as `neuronserve serve --model`")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "startup.json")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        importlib.import_module("torch")  # loaded, so that describe_machine names the GPU
    results = {"cold_s": [], "warm_s": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            results["cold_s"].append(launch_to_healthy(Path(tmp), args.model, args.device))
            results["warm_s"].append(launch_to_healthy(Path(tmp), args.model, args.device))
    report = {
        "command": " ".join(sys.argv), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe_machine(),
        "definition": "seconds from process launch to the first 200 from /health (model loaded, "
                      "re-laid and warmed up); cold = empty cache dir and Triton cache, warm = both from the cold run",
        "model": args.model, "device": args.device,
        **results,
        "cold_median_s": sorted(results["cold_s"])[len(results["cold_s"]) // 2],
        "warm_median_s": sorted(results["warm_s"])[len(results["warm_s"]) // 2],
    }
    write_report(report, f"launch to healthy: cold {report['cold_median_s']:.1f} s, warm "
                 f"{report['warm_median_s']:.1f} s (runs: cold {['%.1f' % x for x in results['cold_s']]}, "
                 f"warm {['%.1f' % x for x in results['warm_s']]})", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
