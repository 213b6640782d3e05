"""The CPU matrix products behind `server.model.layers.Linear`, timed one against another on the
default model's projection shapes: why every CPU projection runs our dense kernel on the half
weight's panel copy (it beats torch's half and float32 GEMMs at every row count timed).

For each projection shape (SmolLM2-135M: fused qkv, o, fused gate/up, down, the tied head) and each
row count, every variant runs over `--weights` distinct weights in turn (a decode step reads 30
layers' weights, so none stays in cache), interleaved round by round; the median of the rounds is
reported, with the bytes of weight read per second where that is meaningful.

Variants:
  f16 linear       F.linear on float16 weights (torch's half GEMV; per-row cost for more rows)
  f32 mkl W@x^T    torch.mm(W, x^T) on a float32 copy (MKL, weight-major)
  f32 onednn       torch.ops.mkldnn._linear_pointwise on a oneDNN-packed float32 copy (the
                   path for prefills until the fourth session; now only without the kernel)
  f16 ours ISA     our CPU dense kernel (kernels/csrc/dense_cpu.c) on the float16 weight in its
                   panel layout, float32 input: the path for every CPU projection (up to 16
                   rows from the second session of 2026-11-26, all rows from the fourth); one
                   variant per build this CPU runs (avx2, and avx512 where the CPU has it)

    python benchmarks/cpu_gemm.py [--rows 1,3,8,16,64,512] [--rounds 5] [--out FILE]

Prints a table, writes JSON (default benchmarks/out/cpu_gemm.json). Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import describe_machine, format_table, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "cpu_gemm.json"
# (name, out_features, in_features, calls per forward) of SmolLM2-135M-Instruct's projections
SHAPES = (("qkv", 960, 576, 30), ("o", 576, 576, 30), ("gate_up", 3072, 576, 30), ("down", 576, 1536, 30),
          ("head", 49152, 576, 1))


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _ours(kernel: Any, x: Any, panels: list[Any], index: int) -> Any:
    return kernel.linear(x, panels[index])


def measure_shape(name: str, out_features: int, in_features: int, rows: list[int], weights: int,
                  rounds: int, max_f16_rows: int, kernels: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    count = 2 if name == "head" else weights  # the head alone is 57 MB in float16
    generator = torch.Generator().manual_seed(0)
    f32 = [torch.randn(out_features, in_features, generator=generator) for _ in range(count)]
    f16 = [w.half() for w in f32]
    packed = ([torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in f32]
              if torch.backends.mkldnn.is_available() else None)
    panels = {isa: [kernel.pack(w) for w in f16] for isa, kernel in kernels.items()}
    results = []
    for m in rows:
        x32 = torch.randn(m, in_features, generator=generator)
        x16 = x32.half()
        variants = {"f32 mkl W@x^T": lambda i: torch.mm(f32[i], x32.t())}
        if m <= max_f16_rows:
            variants["f16 linear"] = lambda i: F.linear(x16, f16[i])
        if packed is not None:
            variants["f32 onednn"] = lambda i: torch.ops.mkldnn._linear_pointwise(x32, packed[i], None, "none", [], "")
        for isa, kernel in kernels.items():  # each build of our kernel this CPU runs
            variants[f"f16 ours {isa}"] = functools.partial(_ours, kernel, x32, panels[isa])
        reference = F.linear(x32, f32[0])
        errors = {v: float((fn(0).float().reshape(m, -1) - reference).abs().max()) for v, fn in variants.items()
                  if v != "f32 mkl W@x^T"}
        calls = max(2, min(count * 4, int(2e8 / (out_features * in_features * max(m, 1)))))
        per_call: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for variant, fn in variants.items():
                index = iter(range(10**9))
                per_call[variant].append(_time(lambda: fn(next(index) % count), calls))
        for variant, times in per_call.items():
            seconds = statistics.median(times)
            weight_bytes = out_features * in_features * (2 if variant.startswith("f16") else 4)
            results.append({"shape": name, "out_features": out_features, "in_features": in_features, "rows": m,
                            "variant": variant, "us": seconds * 1e6, "weight_gb_s": weight_bytes / seconds / 1e9,
                            "max_abs_error_vs_f32_linear": errors.get(variant), "rounds": times})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,3,8,16,64,512", help="row counts (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (median)")
    parser.add_argument("--weights", type=int, default=16, help="distinct weights cycled through per shape")
    parser.add_argument("--max-f16-rows", type=int, default=16,
                        help="time torch's float16 GEMM up to this many rows (its cost grows per row)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    from kernels.cpu_build import supported_instruction_sets
    from kernels.dense_cpu import CpuDenseKernel

    kernels = {isa.name: CpuDenseKernel.load(instruction_set=isa.name) for isa in supported_instruction_sets()}
    kernels = {name: kernel for name, kernel in kernels.items() if kernel is not None}
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results = []
    for name, out_features, in_features, _ in SHAPES:
        print(f"timing {name} [{out_features} x {in_features}] ...", file=sys.stderr, flush=True)
        results.extend(measure_shape(name, out_features, in_features, rows, args.weights, args.rounds,
                                     args.max_f16_rows, kernels))
    # What one forward pass of the default model spends in its projections, per variant and rows.
    calls = {name: n for name, _, _, n in SHAPES}
    per_forward = []
    for m in rows:
        for variant in dict.fromkeys(r["variant"] for r in results if r["rows"] == m):
            picked = [r for r in results if r["rows"] == m and r["variant"] == variant]
            if len(picked) == len(SHAPES):
                per_forward.append({"rows": m, "variant": variant,
                                    "ms": sum(r["us"] * calls[r["shape"]] for r in picked) / 1e3})
    table_rows = []
    for r in results:
        base = next(x for x in results if x["shape"] == r["shape"] and x["rows"] == r["rows"]
                    and x["variant"] == "f32 mkl W@x^T")
        table_rows.append([r["shape"], str(r["rows"]), r["variant"], f"{r['us']:.0f}", f"{r['weight_gb_s']:.1f}",
                           f"{base['us'] / r['us']:.2f}"])
    text = "\n".join([
        f"cpu_gemm  {started}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"oneDNN {torch.backends.mkldnn.is_available()}",
        format_table(["shape", "rows", "variant", "us/call", "weight GB/s", "speed vs f32 mkl"], table_rows),
        "",
        "projections of one forward pass (30 layers x 4 + the head):",
        format_table(["rows", "variant", "ms", "speed vs f32 mkl"], [
            [str(p["rows"]), p["variant"], f"{p['ms']:.1f}",
             f"{next(q['ms'] for q in per_forward if q['rows'] == p['rows'] and q['variant'] == 'f32 mkl W@x^T') / p['ms']:.2f}"]
            for p in per_forward]),
    ])
    report = {"benchmark": "cpu_gemm", "started_utc": started, "command": " ".join(["python", *sys.argv]),
              "machine": describe_machine(("torch",)), "threads": torch.get_num_threads(), "results": results,
              "per_forward": per_forward}
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
