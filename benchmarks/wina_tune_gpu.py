"""Tune the WINA Triton kernels' launch parameters on one CUDA GPU; write the table they read.

For each layer of ``benchmarks/wina_kernel_gpu.py`` (``--layers``) and batches (``--batches``,
default 1 and 8), at one sparsity (``--sparsity``, default 0.5, per-row top-k on
random inputs), this times candidate configurations (block sizes, K splits, warps, pipelining
stages) and keeps the fastest whose output matches the torch reference. It searches in two rounds:
a coarse grid of tile shapes and K splits, then warps and stages around the best three.

Timing is GPU time alone, as replays of a captured CUDA graph, with the weights read from device
memory and not from the L2 cache: each call in the graph reads the next of several copies of the
weight, enough copies to overflow the L2 twice (``rotating``). Decode reads each layer's weights
once per token, after the other layers' weights went through the cache, so this is the time a
decode step pays; the default model's layers (1-4 MB) would otherwise sit in a 50 MB L2.

Batches whose rows pad to the same batch tile run one compiled kernel and get one configuration,
the one with the least time summed over them; on CUDA every batch of 1 to 16 rows uses the
16-row tl.dot tile (``DOT_MIN_BATCH``), so ``--batches 1,8`` tunes one configuration per shape
for both.

The winners go to ``--configs`` (default ``kernels/configs/<GPU name>.json``, which
``kernels.wina_triton.pick_config`` reads for that GPU; entries already in the file for other
shapes are kept), the measurements (dense cuBLAS, heuristic and tuned times) to ``--out``
as JSON, and a table to stdout.

    python benchmarks/wina_tune_gpu.py [--layers llama8b_down,...] [--batches 1,8] [--rep-ms 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import functools
import json
import multiprocessing
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench_common import describe_machine, fmt, format_table, write_report
from wina_kernel_gpu import LAYERS, Layer, comma_list, cycling, layer_names, rotating

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "wina_tune_gpu.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=layer_names, default=list(LAYERS),
                        help=f"comma-separated subset of {','.join(LAYERS)} (default: all)")
    parser.add_argument("--batches", type=comma_list(int), default=[1, 8],
                        help="comma-separated batch sizes, each <= 16 (default: 1,8)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of input channels skipped")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--rep-ms", type=int, default=5, help="do_bench_cudagraph time per candidate")
    parser.add_argument("--path", choices=("auto", "dot", "broadcast"), default="auto",
                        help="the kernel path to tune: the one pick_config takes (auto), or one forced, to "
                             "compare (pick_config reads only the auto entries: write forced ones elsewhere)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that compile the candidates before they are timed (0: none)")
    parser.add_argument("--configs", type=Path, default=None,
                        help="tuning file to update (default: kernels/configs/<GPU name>.json)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    args = parser.parse_args(argv)
    if any(not 1 <= b <= 16 for b in args.batches):
        parser.error("batch sizes must be in 1..16 (larger batches take the dense path)")
    return args


def coarse_grid(layer: Layer, batch: int, wt, use_dot: bool | None = None) -> list:
    """Tile shapes x K splits (1, 2, 4 or 16 chunks per program, or all in one program)."""
    block_b, use_dot = wt._tile(batch, use_dot)
    tiles = 2 if layer.gate_up else 1
    widest = max(layer.segments)
    configs = []
    for block_n in (64, 128, 256):  # 128-byte fp16 rows and up
        if block_n > 2 * widest:
            continue
        for block_k in (32, 64, 128):
            # registers: the broadcast path holds a [BLOCK_B, BLOCK_K, BLOCK_N] product per tile
            if not use_dot and block_b * block_k * block_n * tiles > 32768:
                continue
            chunks = -(-layer.k // block_k)
            for per_split in sorted({1, 2, 4, 16, chunks}):
                split_k = -(-chunks // min(per_split, chunks))
                configs.append(wt.WinaKernelConfig(block_k=block_k, block_n=block_n, split_k=split_k,
                                                   num_warps=4, use_dot=use_dot))
    return list(dict.fromkeys(configs))


def refine_grid(best: list) -> list:
    """Warps and pipelining stages around the best few of the coarse round."""
    configs = []
    for config in best:
        configs += [replace(config, num_warps=w) for w in (2, 8)]
        configs += [replace(config, num_stages=s) for s in (1, 2, 4)]
    return list(dict.fromkeys(configs))


def compile_configs(layer_name: str, batch: int, dtype_name: str, configs: list[dict]) -> int:
    """In a worker process: run each config once on a problem of the case's exact shapes, so that
    Triton compiles it into its on-disk cache (compiling one by one in the timing process was the
    slow part of a tuning run). -> how many ran."""
    import torch

    from kernels import wina_triton as wt
    from kernels.wina_reference import column_norms, thresholds_for_topk

    layer = LAYERS[layer_name]
    weight = torch.randn(sum(layer.segments), layer.k, device="cuda").to(getattr(torch, dtype_name))
    col_norms = column_norms(weight, layer.segments)
    x = torch.randn(batch, layer.k, device="cuda").to(weight.dtype)
    thresholds = thresholds_for_topk(x, col_norms, layer.k // 2).to("cuda")
    weight_t = weight.t().contiguous()
    ran = 0
    for entry in configs:
        try:
            layer.sparse(x, weight_t, col_norms, thresholds, wt.WinaKernelConfig(**entry))
            ran += 1
        except Exception:  # noqa: BLE001, S112 - the timing process records why a config fails
            continue
    torch.cuda.synchronize()
    return ran


def precompile(pool, layer: Layer, batch: int, dtype_name: str, configs: list) -> None:
    """Compile `configs` in the worker pool, a share per worker (None: compile while timing)."""
    if pool is None or not configs:
        return
    workers = pool._max_workers
    shares = [[asdict(c) for c in configs[i::workers]] for i in range(workers)]
    for future in [pool.submit(compile_configs, layer.name, batch, dtype_name, share) for share in shares if share]:
        future.result()


def tune_case(layer: Layer, batches: list[int], args: argparse.Namespace, wt, pool=None) -> dict[str, Any]:
    """One configuration for `batches`, which share a batch tile (so one compiled kernel and one
    tuning entry): the candidate with the least summed time over them."""
    import torch
    import triton.testing

    from kernels.wina_reference import column_norms, thresholds_for_topk

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    n = sum(layer.segments)
    weight = (torch.randn(n, layer.k, device="cuda") / layer.k**0.5).to(dtype)  # [N, K]
    col_norms = column_norms(weight, layer.segments)
    weights = rotating(weight)  # [(weight [N, K], weight_t [K, N])], enough copies to overflow the L2
    problems = {}  # batch -> (x [B, K], thresholds [B, G], reference output)
    for batch in batches:
        x = torch.randn(batch, layer.k, device="cuda").to(dtype)
        thresholds = thresholds_for_topk(x, col_norms, round((1.0 - args.sparsity) * layer.k)).to("cuda")
        ref, _ = layer.reference(x, weights[0][1], col_norms, thresholds)
        problems[batch] = (x, thresholds, ref.float())

    def sparse_fn(config, batch):  # each call of a captured graph reads the next weight copy
        x, thresholds, _ = problems[batch]
        return cycling([functools.partial(layer.sparse, x, w_t, col_norms, thresholds, config) for _, w_t in weights])

    def graph_us(fn) -> float:
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median") * 1e3

    # fp32 sums in another order, then one rounding: within a few output ulps (2**-9 relative
    # for fp16 / bf16 allows 2-4), plus an absolute floor for values near zero.
    rtol = 2**-9 if dtype == torch.float16 else 2**-6

    def matches(config, batch) -> bool:
        out = sparse_fn(config, batch)()[0].float()
        ref = problems[batch][2]
        return bool(((out - ref).abs() <= 1e-3 + rtol * ref.abs()).all())

    timings: dict[Any, dict[int, float]] = {}  # config -> batch -> us
    rejected = []

    def measure(configs):
        for config in configs:
            if config in timings:
                continue
            try:
                if not all(matches(config, b) for b in batches):
                    rejected.append(asdict(config))
                    continue
                timings[config] = {b: graph_us(sparse_fn(config, b)) for b in batches}
            except Exception as error:  # noqa: BLE001 - a config the compiler refuses is skipped
                rejected.append({**asdict(config), "error": f"{type(error).__name__}: {str(error)[:200]}"})

    def total(config) -> float:
        return sum(timings[config].values())

    started = time.perf_counter()
    device = weight.device
    use_dot = {"auto": None, "dot": True, "broadcast": False}[args.path]
    heuristic = wt.heuristic_config(batches[0], layer.k, layer.segments, layer.gate_up, device, use_dot)
    coarse = [heuristic, *coarse_grid(layer, batches[0], wt, use_dot)]
    precompile(pool, layer, batches[0], args.dtype, coarse)
    measure(coarse)
    refined = refine_grid(sorted(timings, key=total)[:3])
    precompile(pool, layer, batches[0], args.dtype, refined)
    measure(refined)
    best = min(timings, key=total)
    dense_us = {b: graph_us(cycling([functools.partial(layer.dense, problems[b][0], w) for w, _ in weights]))
                for b in batches}
    return {
        "layer": layer.name, "k": layer.k, "segments": list(layer.segments), "gate_up": layer.gate_up,
        "batches": batches, "sparsity": args.sparsity, "weight_copies": len(weights),
        "key": wt.tuning_key(layer.gate_up, wt._tile(batches[0], use_dot)[0], layer.k, layer.segments,
                             weight.element_size()),
        "best": asdict(best), "best_us": timings[best],
        "heuristic": asdict(heuristic), "heuristic_us": timings.get(heuristic),
        "dense_us": dense_us, "x_dense": {b: dense_us[b] / timings[best][b] for b in batches},
        "candidates": len(timings), "rejected": rejected, "seconds": time.perf_counter() - started,
        "all": sorted(([asdict(c), t] for c, t in timings.items()), key=lambda item: sum(item[1].values())),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("wina_tune_gpu: no CUDA device; this tunes the compiled Triton kernels")
    from kernels import wina_triton as wt

    if wt.INTERPRETED:
        sys.exit("wina_tune_gpu: TRITON_INTERPRET is set; unset it to time the compiled kernels")
    gpu = torch.cuda.get_device_name(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs_path = args.configs or wt.tuned_configs_path(gpu)
    print(f"GPU: {gpu} ({sms} SMs); {args.dtype}; sparsity {args.sparsity}; writing {configs_path}\n", flush=True)
    table = json.loads(configs_path.read_text()) if configs_path.is_file() else {"configs": {}, "measured": {}}
    table.update(gpu=gpu, dtype=args.dtype,
                 command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/wina_tune_gpu.py",
                                                          *(sys.argv[1:] if argv is None else argv)]),
                 note="written by benchmarks/wina_tune_gpu.py: GPU time in a CUDA graph, weights from "
                      "device memory, random inputs at per-row top-k sparsity")
    configs_path.parent.mkdir(parents=True, exist_ok=True)
    cases = []
    pool = None
    if args.compile_workers > 0:
        pool = concurrent.futures.ProcessPoolExecutor(args.compile_workers,
                                                      mp_context=multiprocessing.get_context("spawn"))
    tiles: dict[int, list[int]] = {}  # batches that share a batch tile share one tuned config
    for batch in args.batches:
        tiles.setdefault(wt._tile(batch, {"auto": None, "dot": True, "broadcast": False}[args.path])[0],
                         []).append(batch)
    for name in args.layers:
        for batches in tiles.values():
            case = tune_case(LAYERS[name], batches, args, wt, pool)
            torch.cuda.empty_cache()  # the case's weight copies
            cases.append(case)
            timing = ", ".join(f"B={b}: {case['best_us'][b]:.1f} us vs cuBLAS {case['dense_us'][b]:.1f} "
                               f"(x{case['x_dense'][b]:.2f})" for b in batches)
            print(f"  {name} {timing}; {case['best']}; {case['candidates']} candidates, "
                  f"{len(case['rejected'])} rejected, {case['seconds']:.0f} s", flush=True)
            # written after every case, so that a run cut short keeps what it measured
            table["configs"][case["key"]] = {k: v for k, v in case["best"].items() if v is not None}
            table["measured"][case["key"]] = {
                "batches": batches, "sparsity": case["sparsity"], "tuned_us": case["best_us"],
                "heuristic_us": case["heuristic_us"], "cublas_us": case["dense_us"]}
            table["utc_time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            configs_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")

    if pool is not None:
        pool.shutdown()
    headers = ["layer", "B", "tuned us", "heuristic us", "cuBLAS us", "x cuBLAS", "config"]
    rows = [[c["layer"], str(b), fmt(c["best_us"][b]), fmt((c["heuristic_us"] or {}).get(b)), fmt(c["dense_us"][b]),
             fmt(c["x_dense"][b], 2), "k{block_k} n{block_n} s{split_k} w{num_warps} st{num_stages}".format(**c["best"])]
            for c in cases for b in c["batches"]]
    text = (f"WINA kernel tuning on {gpu} ({args.dtype}, sparsity {args.sparsity}, GPU time in a CUDA graph, "
            "weights from device memory)\n\n" + format_table(headers, rows))
    report = {
        "benchmark": "wina_tune_gpu", "command": table["command"], "utc_time": table["utc_time"],
        "machine": describe_machine(("torch", "triton")), "gpu": gpu, "configs_path": str(configs_path),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "cases": cases,
    }
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
