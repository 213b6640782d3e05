#!/usr/bin/env python3
"""WINA decode speed against dense, in one run, as ratios (issue 3).

1. Decode through the engine (the serving path minus HTTP): the default model with the committed
   wina-uniform profile and the CPU kernel, ``launch_engine`` as the server does (``--model`` and
   ``--device cuda`` time another model, or the Triton kernels; scripts/gpu_checks.sh does). For batch 1 and
   batch 8, every row greedy with ``ignore_eos``, all rows at the same sparsity; decode tok/s =
   tokens generated after each row's first / time from the first output to the last. Sparsities run
   interleaved (dense, 0.25, ..., then again) so drift on this shared machine hits all of them;
   medians of ``--repeats``. ``--isolate``: each level in a fresh process of its own instead,
   alternating, as a server that runs every request at one sparsity would.
2. llama.cpp (llama-cpp-python, if installed) batch-1 tok/s on the same GGUF, for the ratio the
   issue asks to print beside ours.
3. GEMV microbenchmark (a separate process): our CPU kernel at batch 1 and 8 against dense
   ``F.linear`` in the weight dtype, our dense CPU kernel (kernels/csrc/dense_cpu.c, what dense
   decode steps run) and the (1 - s) roofline, on the default model's projections and on
   Llama-3-8B's MLP (4096 x 14336), with per-token top-k thresholds (exact sparsity).

    python benchmarks/wina_speed.py [--sparsities 0.25 0.4 0.5 0.65 0.9] [--tokens 64] [--repeats 3]
        [--isolate] [--skip-decode] [--skip-micro] [--skip-llama-cpp] [--model PATH] [--device auto|cpu|cuda]
        [--out benchmarks/out/wina_speed.json]

On a GPU the Triton kernel's microbenchmark is benchmarks/wina_kernel_gpu.py.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import (
    describe_machine,
    fmt,
    format_table,
    run_in_fresh_process,
    write_report,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

PROMPTS = [
    "The history of the Roman Empire", "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.", "def quicksort(items):", "The best way to learn a language is",
    "List the planets of the solar system:", "Once upon a time, in a faraway kingdom,",
    "The stock market today",
]
MICRO_SHAPES = {  # name: (K, segments, gate_up)
    "smollm2 qkv 576->960": (576, (576, 192, 192), False),
    "smollm2 o 576->576": (576, (576,), False),
    "smollm2 gate_up 576->2x1536": (576, (1536, 1536), True),
    "smollm2 down 1536->576": (1536, (576,), False),
    "llama3-8b gate_up 4096->2x14336": (4096, (14336, 14336), True),
    "llama3-8b down 14336->4096": (14336, (4096,), False),
}
MICRO_SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)


# --------------------------------------------------------------------------- decode


async def _batch(engine: Any, prompts: list[list[int]], tokens: int, sparsity: float, tag: str,
                 first_row_only: bool = False) -> dict:
    """One batch of greedy requests, every row at `sparsity` (or only the first, the rest dense)."""
    from server.engine.request import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    streams = engine.submit([GenerationRequest(f"{tag}-{i}", tuple(p), params,
                                               sparsity if i == 0 or not first_row_only else 0.0)
                             for i, p in enumerate(prompts)])
    first: list[float | None] = [None] * len(streams)
    last: list[float] = [0.0] * len(streams)
    achieved: list[float | None] = [None] * len(streams)

    async def drain(i: int, stream: Any) -> None:
        async for out in stream:
            now = time.perf_counter()
            if first[i] is None:
                first[i] = now
            last[i] = now
            if out.finished:
                achieved[i] = out.sparsity_achieved

    await asyncio.gather(*(drain(i, s) for i, s in enumerate(streams)))
    start, end = max(f for f in first if f is not None), max(last)
    decoded = len(streams) * (tokens - 1)
    return {"decode_tok_s": decoded / (end - start), "achieved": statistics.mean(a or 0.0 for a in achieved)}


def run_decode(sparsities: list[float], batch_sizes: list[int], tokens: int, repeats: int,
               model: str = "default", device: str = "auto", one_sparse_row: bool = False,
               with_dense: bool = True) -> dict:
    """Decode tok/s per batch size and sparsity (every row at it), against dense in the same
    session (with_dense False: no dense runs, no ratios); with one_sparse_row, also batches > 1
    where only the first row is sparse."""
    from server.runtime import launch_engine
    from server.settings import ServerSettings

    engine, loaded = launch_engine(ServerSettings(model=model, device=device, max_model_len=1024,
                                                  max_batch_size=max(batch_sizes), log_level="warning"))
    if loaded.wina_profile is None:
        raise SystemExit(f"no WINA profile loaded: run `neuronserve calibrate wina --model {model}` first")
    sparse_qkv = loaded.model.layers[0].attn.sparse_qkv
    kernel = ("triton" if sparse_qkv.weight_t is not None else
              "cpu" if sparse_qkv.prepared is not None else "none (masked dense)")
    prompts = [list(loaded.tokenizer(p).input_ids) for p in PROMPTS]
    levels = [0.0, *sparsities] if with_dense else list(sparsities)
    cases = [(b, s, False) for b in batch_sizes for s in levels]
    if one_sparse_row:
        cases += [(b, s, True) for b in batch_sizes if b > 1 for s in sparsities]
    runs: dict[tuple[int, float, bool], list[dict]] = {case: [] for case in cases}

    async def session() -> None:
        for b, s, first in cases:  # every batch shape and path once first (CUDA: cuBLAS and Triton set-up)
            await _batch(engine, prompts[:b], 8, s, f"warm{b}-{s}-{first}", first)
        for r in range(repeats):
            for b, s, first in cases:
                runs[(b, s, first)].append(await _batch(engine, prompts[:b], tokens, s, f"b{b}-s{s}-{first}-r{r}",
                                                        first))

    try:
        asyncio.run(session())
    finally:
        engine.shutdown()
    return {"model": loaded.name, "device": str(loaded.model.device),
            "profile": loaded.wina_profile.name, "profile_path": str(loaded.wina_profile.path),
            "kernel": kernel, "dtype": str(loaded.model.dtype), "tokens": tokens, "repeats": repeats,
            "rows": _decode_rows(runs)}


def _decode_rows(runs: dict[tuple[int, float, bool], list[dict]]) -> list[dict]:
    """One row per case (batch, sparsity, only the first row sparse), in the order of `runs`: the
    median tok/s and, where the runs hold the batch's dense case, the ratio to its median."""
    rows = []
    for (b, s, first), case_runs in runs.items():
        dense_runs = runs.get((b, 0.0, False))
        dense = statistics.median(x["decode_tok_s"] for x in dense_runs) if dense_runs else None
        tok_s = statistics.median(x["decode_tok_s"] for x in case_runs)
        rows.append({"batch": b, "sparsity": s, "sparse_rows": "first" if first else "all", "decode_tok_s": tok_s,
                     "ratio_to_dense": tok_s / dense if dense else None,
                     "achieved_sparsity": statistics.mean(x["achieved"] for x in case_runs), "runs": case_runs})
    return rows


def run_decode_isolated(sparsities: list[float], batch_sizes: list[int], tokens: int, repeats: int,
                        model: str = "default", device: str = "auto") -> dict:
    """Each level (dense, then each sparsity) decodes in a fresh process of its own, the levels
    alternating `repeats` times: what a server that runs every request at one sparsity gets, where
    only one copy of the weights (the dense panels or the sparse kernel's W^T) is read step after
    step. In one process (run_decode) the levels take turns, as in a server mixing dense and sparse
    requests, and each path's copy evicts the other's from the caches."""
    levels = [0.0, *sparsities]
    runs: dict[tuple[int, float, bool], list[dict]] = {(b, s, False): [] for b in batch_sizes for s in levels}
    info: dict = {}
    for _ in range(repeats):
        for s in levels:
            info = run_in_fresh_process(run_decode, [s] if s else [], batch_sizes, tokens, 1, model, device, False,
                                        s == 0.0)
            for row in info["rows"]:
                runs[(row["batch"], row["sparsity"], False)].extend(row["runs"])
    return {**info, "repeats": repeats, "isolated": True, "rows": _decode_rows(runs)}


def run_llama_cpp_batch1(tokens: int, repeats: int) -> dict | None:
    try:
        import llama_cpp  # noqa: F401
        from decode import run_llama_cpp
    except ImportError:
        return None
    import torch

    from server.model.loader import resolve_model_path

    gguf, _ = resolve_model_path("default")
    return run_llama_cpp(gguf, PROMPTS[0], tokens, repeats, torch.get_num_threads())


# --------------------------------------------------------------------------- GEMV microbenchmark


def _time(fn, min_seconds: float = 0.3) -> float:
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < 5:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def _micro_shape(kernel: Any, dense_kernel: Any, name: str, K: int, segments: tuple[int, ...], gate_up: bool,
                 batch_sizes: list[int], g: Any) -> list[dict]:
    """One shape's rows; its weights (up to ~1 GB for Llama-3-8B's MLP with the copies) are freed
    when this returns, before the next shape is built."""
    import torch
    import torch.nn.functional as F

    from kernels.wina_reference import column_norms, thresholds_for_topk

    N = sum(segments)
    weight = (torch.randn(N, K, generator=g) * 0.02).half()
    norms = column_norms(weight, segments)
    prepared = kernel.prepare(weight.t().contiguous(), norms, segments, gate_up=gate_up, out_dtype=torch.float32)
    weight_f32 = weight.float()
    panels = dense_kernel.pack(weight, 2 if gate_up else 1) if dense_kernel else None
    rows = []
    for B in batch_sizes:
        x = torch.randn(B, K, generator=g)
        x_half = x.half()
        dense_half = _time(lambda: F.linear(x_half, weight))
        dense_f32 = _time(lambda: torch.mm(weight_f32, x.t())) if B > 1 else None
        dense_ours = _time(lambda: dense_kernel.linear(x, panels, None, gate_up=gate_up)) if dense_kernel else None
        dense = min(t for t in (dense_half, dense_f32, dense_ours) if t is not None)
        for s in MICRO_SPARSITIES:
            thresholds = thresholds_for_topk(x, norms, K - round(s * K))
            kept = torch.empty(B, len(segments), dtype=torch.int32)
            t = _time(lambda: prepared(x, thresholds.data_ptr(), len(segments), kept.data_ptr(), len(segments)))
            rows.append({"shape": name, "batch": B, "sparsity": s, "kernel_us": t * 1e6,
                         "dense_half_us": dense_half * 1e6,
                         "dense_f32_us": dense_f32 * 1e6 if dense_f32 else None,
                         "dense_ours_us": dense_ours * 1e6 if dense_ours else None,
                         "speedup_vs_best_dense": dense / t, "roofline": 1 / (1 - s) if s < 1 else None,
                         "kernel_weight_gb_s": N * K * 2 * (1 - s) / t / 1e9})
    return rows


def run_micro(batch_sizes: list[int]) -> dict:
    import torch

    from kernels.dense_cpu import CpuDenseKernel
    from kernels.wina_cpu import CpuWinaKernel

    kernel = CpuWinaKernel.load()
    dense_kernel = CpuDenseKernel.load()
    if kernel is None:
        return {"error": "CPU kernel unavailable"}
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (K, segments, gate_up) in MICRO_SHAPES.items():
        rows.extend(_micro_shape(kernel, dense_kernel, name, K, segments, gate_up, batch_sizes, g))
    return {"rows": rows, "dtype": "float16 weights, float32 inputs"}


# --------------------------------------------------------------------------- report


def format_report(report: dict) -> str:
    parts = [f"WINA speed, {report['machine'].get('cpu_model_name')} ({report['machine']['cpu_count']} cores), "
             f"{report['utc']}", f"command: {report['command']}"]
    decode = report.get("decode")
    if decode:
        llama = report.get("llama_cpp") or {}
        where = ("each level in a process of its own, alternating" if decode.get("isolated") else
                 "the levels interleaved in one process")
        parts.append(f"\nDecode through the engine ({decode.get('model', 'default')} on {decode.get('device', 'cpu')}, "
                     f"{decode['dtype']}, profile {decode['profile']}, sparse kernel: {decode['kernel']}; "
                     f"{decode['tokens']} tokens, median of {decode['repeats']}, {where})")
        rows = []
        for r in decode["rows"]:
            vs_llama = r["decode_tok_s"] / llama["tok_s"] if r["batch"] == 1 and llama.get("tok_s") else None
            rows.append([str(r["batch"]), r.get("sparse_rows", "all"), fmt(r["sparsity"], 2),
                         fmt(r["achieved_sparsity"], 3), fmt(r["decode_tok_s"]), fmt(r["ratio_to_dense"], 2),
                         fmt(vs_llama, 2)])
        parts.append("achieved: mean over the batch's rows (dense rows count 0)")
        parts.append(format_table(["batch", "sparse rows", "target", "achieved", "decode tok/s", "x dense",
                                   "x llama.cpp"], rows))
        if llama.get("tok_s"):
            parts.append(f"llama.cpp batch 1 on the same GGUF (Q4_1): {llama['tok_s']:.1f} tok/s (incl. prefill)")
        elif llama.get("error"):
            parts.append(f"llama.cpp: {llama['error']}")
        elif llama.get("skipped"):
            parts.append(f"llama.cpp: not run ({llama['skipped']})")
        else:
            parts.append("llama.cpp: not installed (pip install llama-cpp-python to compare)")
    micro = report.get("micro")
    if micro and "rows" in micro:
        parts.append("\nGEMV microbenchmark (our CPU kernel vs dense; x dense uses the fastest of fp16 F.linear, "
                     "fp32 mm and our dense kernel)")
        rows = [[r["shape"], str(r["batch"]), fmt(r["sparsity"], 2), fmt(r["kernel_us"]), fmt(r["dense_half_us"]),
                 fmt(r["dense_f32_us"]), fmt(r.get("dense_ours_us")), fmt(r["speedup_vs_best_dense"], 2),
                 fmt(r["roofline"], 2), fmt(r["kernel_weight_gb_s"], 1)] for r in micro["rows"]]
        parts.append(format_table(["shape", "B", "s", "kernel us", "fp16 us", "fp32 us", "ours dense us", "x dense",
                                   "roofline", "GB/s"], rows))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.4, 0.5, 0.65, 0.9])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one-sparse-row", action="store_true",
                        help="also decode batches > 1 where only the first request is sparse (a mixed batch)")
    parser.add_argument("--isolate", action="store_true",
                        help="decode each level in a fresh process of its own, alternating (a server that runs "
                        "every request at one sparsity), instead of interleaved in one process (a server mixing them)")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--model", default="default",
                        help="Model for the decode part (as for serve); llama.cpp runs only on the default. [default]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="Device for the decode part (the microbenchmark is the CPU kernel's). [auto]")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "out" / "wina_speed.json")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                              "utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if args.isolate and args.one_sparse_row:
        parser.error("--one-sparse-row mixes dense and sparse rows in one batch, so it cannot --isolate")
    if not args.skip_decode and args.isolate:
        report["decode"] = run_decode_isolated(args.sparsities, args.batch_sizes, args.tokens, args.repeats,
                                               args.model, args.device)
    elif not args.skip_decode:
        report["decode"] = run_in_fresh_process(run_decode, args.sparsities, args.batch_sizes, args.tokens,
                                                args.repeats, args.model, args.device, args.one_sparse_row)
        if args.skip_llama_cpp or args.model != "default":
            report["llama_cpp"] = {"skipped": "--skip-llama-cpp" if args.skip_llama_cpp else
                                   "it runs only on the default model's GGUF"}
        else:
            try:
                report["llama_cpp"] = run_in_fresh_process(run_llama_cpp_batch1, args.tokens, args.repeats)
            except RuntimeError as exc:  # a llama.cpp build for another CPU dies here: keep our numbers
                report["llama_cpp"] = {"error": str(exc)}
                print(f"llama.cpp: {exc}", file=sys.stderr)
    if not args.skip_micro:
        report["micro"] = run_in_fresh_process(run_micro, args.batch_sizes)
    import torch  # noqa: F401  (so that describe_machine reports torch's threads)

    report["machine"] = describe_machine()
    write_report(report, format_report(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
