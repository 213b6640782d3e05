"""WINA sparse GEMV (kernels/wina_triton.py) against cuBLAS dense, on one CUDA GPU.

Layers (weight [N, K], fp16 by default):

* default model (SmolLM2-135M, hidden 576, intermediate 1536): ``qkv`` K=576 N=960 in segments
  (576, 192, 192); ``o`` K=576 N=576; ``gate_up`` K=576 N=2x1536; ``down`` K=1536 N=576.
* Llama-3-8B MLP: ``llama8b_gate_up`` K=4096 N=2x14336; ``llama8b_down`` K=14336 N=4096.

For each layer, batch (``--batches``, default 1,2,4,8) and sparsity s (``--sparsities``, default
0,0.5,0.9), x ~ N(0, 1), weight ~ N(0, 1/K); thresholds from ``thresholds_for_topk`` keep exactly
round((1-s) K) channels per row and segment. Each case is timed twice, medians both:

* eagerly, with ``triton.testing.do_bench`` (events; it flushes the L2 cache between runs): what an
  eager decode step pays, the launcher's CPU time included, which dominates for small layers;
* as replays of a captured CUDA graph (``do_bench_cudagraph``): the GPU time alone. Each call in
  the graph reads the next of several copies of the weight (``rotating``: enough to fill the L2
  twice), so the weights come from device memory, as in a decode step, also for the default
  model's small layers, which would otherwise sit in the L2 between replays.

* tile: the tile kernel (``wina_linear_sparse`` / ``wina_gate_up_sparse``: always the kernel,
  whatever DENSE_CROSSOVER_BATCH says, so that batches above it can be measured to tune it);
* gather: the gather path that serving runs (``wina_linear_gather`` / ``wina_gate_up_gather``), with
  its heuristic launch parameters, each of its launches alone (compaction unless fused, GEMV, chunk
  sum: where the time goes), and each of ``--gather-grid``'s launch parameters;
* dense: cuBLAS through ``F.linear(x, W)``; for gate_up followed by ``silu(gate) * up``, which
  the fused kernel also does.

Columns: ``ratio`` = tile / dense time (eager); ``x dense`` = cuBLAS / gather (graphs); ``1-s`` =
the time ratio on the memory roofline when every row keeps the same channels; ``rows`` = the fraction of weight rows the kernel must read, i.e. that
at least one batch row keeps (for independent rows ~ 1 - s**B: the real roofline for B > 1);
``GB/s`` = weight bytes read (dense: all; gather: ``rows`` of them) / graph time; ``err`` = max |ours -
reference| (kernels/wina_reference.py).

    python benchmarks/wina_kernel_gpu.py [--layers qkv,o,...] [--batches 1,2,4,8]
        [--sparsities 0,0.5,0.9] [--dtype float16] [--rep-ms 100] [--out benchmarks/out/wina_kernel_gpu.json]

A table goes to stdout and everything (command line, UTC time, machine, GPU, every case) to
``--out`` as JSON. Exits with a message where there is no CUDA device. Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_common import command_line, describe_machine, fmt, format_table, write_report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "wina_kernel_gpu.json"
DTYPE_NAMES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Layer:
    name: str
    k: int  # input channels
    segments: tuple[int, ...]  # output widths; gate_up layers are (I, I)
    gate_up: bool = False  # fused SwiGLU: output silu(gate) * up [B, I]

    def sparse(self, x, weight_t, col_norms, thresholds, config=None):
        """The tile kernel on this layer -> (y, kept): wina_gate_up_sparse or wina_linear_sparse."""
        from kernels import wina_triton

        if self.gate_up:
            return wina_triton.wina_gate_up_sparse(x, weight_t, col_norms, thresholds, config=config)
        return wina_triton.wina_linear_sparse(x, weight_t, col_norms, thresholds, self.segments, config=config)

    def gather(self, x, weight_t, col_norms, thresholds, config=None):
        """The gather path (what serving runs) on this layer -> (y, kept)."""
        from kernels import wina_triton

        if self.gate_up:
            return wina_triton.wina_gate_up_gather(x, weight_t, col_norms, thresholds, config=config)
        return wina_triton.wina_linear_gather(x, weight_t, col_norms, thresholds, self.segments, config=config)

    def gather_steps(self, x, weight_t, col_norms, thresholds, config=None) -> dict:
        """The gather path's launches on this layer, by name, to time one at a time."""
        from kernels import wina_triton

        widths = [self.segments[0]] * 2 if self.gate_up else list(self.segments)
        steps = wina_triton.gather_launches(x, weight_t, col_norms, thresholds, widths, None, config,
                                            swiglu=self.gate_up)
        return dict(zip(["compact", "gemv", "sum"][-len(steps):], steps, strict=True))

    def dense(self, x, weight):
        """cuBLAS through F.linear(x, weight [N, K]), then silu(gate) * up for gate_up."""
        import torch.nn.functional as F

        out = F.linear(x, weight)
        if not self.gate_up:
            return out
        half = self.segments[0]
        return F.silu(out[:, :half]) * out[:, half:]

    def reference(self, x, weight_t, col_norms, thresholds):
        """kernels/wina_reference.py on this layer -> (y, kept)."""
        from kernels.wina_reference import wina_gate_up_reference, wina_linear_reference

        if self.gate_up:
            return wina_gate_up_reference(x, weight_t, col_norms, thresholds)
        return wina_linear_reference(x, weight_t, col_norms, thresholds, self.segments)


LAYERS = {
    layer.name: layer
    for layer in (
        Layer("llama8b_down", 14336, (4096,)),
        Layer("llama8b_gate_up", 4096, (14336, 14336), gate_up=True),
        Layer("qkv", 576, (576, 192, 192)),
        Layer("o", 576, (576,)),
        Layer("gate_up", 576, (1536, 1536), gate_up=True),
        Layer("down", 1536, (576,)),
    )
}


def rotating(weight) -> list:
    """weight [N, K] -> [(weight, weight_t [K, N] contiguous)] copies, as many as make twice the L2
    cache (at most 64): a captured graph whose calls read copy after copy reads them from device
    memory, as a decode step does, and not from the L2 where a single small layer would stay."""
    import torch

    l2_bytes = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 50 * 2**20)
    copies = max(1, min(64, -(-2 * l2_bytes // (weight.numel() * weight.element_size()))))
    return [(w, w.t().contiguous()) for w in [weight] + [weight.clone() for _ in range(copies - 1)]]


def cycling(calls: list):
    """One callable that runs calls[0], calls[1], ... in turn (each a different weight copy)."""
    state = {"next": 0}

    def call():
        fn = calls[state["next"] % len(calls)]
        state["next"] += 1
        return fn()
    return call


def comma_list(kind):
    """An argparse type: "1,2,4" -> [kind("1"), kind("2"), kind("4")]."""
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def layer_names(text: str) -> list[str]:
    """An argparse type: comma-separated names of LAYERS."""
    names = comma_list(str)(text)
    unknown = [name for name in names if name not in LAYERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layers {unknown}; choose from {list(LAYERS)}")
    return names


GRID_FIELDS = "chunk:block_n[:unroll[:num_warps[:reduce_block_n[:reduce_unroll[:fused[:loop_stages]]]]]]"


def gather_config_arg(text: str) -> tuple:
    """An argparse type: "256:1024:8:4" -> (256, 1024, 8, 4), GatherConfig's fields in order
    (fused as 0 or 1; loop_stages 0 for none)."""
    values: list = [int(v) for v in text.split(":")]
    if not 2 <= len(values) <= 8 or (len(values) >= 7 and values[6] not in (0, 1)):
        raise argparse.ArgumentTypeError(f"expected {GRID_FIELDS}; got {text!r}")
    if len(values) >= 7:
        values[6] = bool(values[6])
    if len(values) == 8:
        values[7] = values[7] or None
    return tuple(values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=layer_names, default=list(LAYERS),
                        help=f"comma-separated subset of {','.join(LAYERS)} (default: all)")
    parser.add_argument("--batches", type=comma_list(int), default=[1, 2, 4, 8],
                        help="comma-separated batch sizes, each <= 32 (default: 1,2,4,8)")
    parser.add_argument("--sparsities", type=comma_list(float), default=[0.0, 0.5, 0.9],
                        help="comma-separated fractions of input channels skipped (default: 0,0.5,0.9)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float16", help="weight and input dtype")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time per case")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broadcast-configs", type=Path, default=None,
                        help="also time batch 1 on the broadcast path, with the configs of this tuning file "
                             "(benchmarks/wina_tune_gpu.py --path broadcast --batches 1)")
    parser.add_argument("--gather-grid", type=comma_list(gather_config_arg), default=[],
                        help="also time the gather path with each of these launch parameters, "
                             f"{GRID_FIELDS} separated by commas")
    parser.add_argument("--real-inputs", type=Path, default=None,
                        help="also time the default model's own layer on its recorded inputs and calibrated "
                             "thresholds (the file benchmarks/wina_real_inputs.py saves)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    args = parser.parse_args(argv)
    if any(not 1 <= b <= 32 for b in args.batches):
        parser.error("batch sizes must be in 1..32 (the sparse kernel's limit)")
    if any(not 0.0 <= s <= 1.0 for s in args.sparsities):
        parser.error("sparsities must be in [0, 1]")
    return args


def bench_case(layer: Layer, batch: int, sparsity: float | None, dtype, args: argparse.Namespace,
               weights: tuple, inputs: tuple | None = None) -> dict[str, Any]:
    """One timed case. `inputs`: (x [batch, K], thresholds [batch, G]) to use instead of random
    inputs at top-k thresholds (the --real-inputs cases; `sparsity` None: the achieved one)."""
    import torch
    import triton.testing

    from kernels import wina_triton
    from kernels.wina_reference import thresholds_for_topk

    copies, col_norms = weights  # [(weight [N, K], weight_t [K, N])], [G, K]
    weight, weight_t = copies[0]
    gen = torch.Generator(device="cuda").manual_seed(args.seed + batch)
    if inputs is None:
        x = torch.randn(batch, layer.k, device="cuda", generator=gen).to(dtype)
        thresholds = thresholds_for_topk(x, col_norms, round((1.0 - sparsity) * layer.k)).to("cuda")
    else:
        x, thresholds = inputs
    ref, ref_kept = layer.reference(x, weight_t, col_norms, thresholds)

    def sparse_with(w_t):
        return layer.sparse(x, w_t, col_norms, thresholds)

    def dense_with(w):
        return layer.dense(x, w)

    def sparse():
        return sparse_with(weight_t)

    def dense():
        return dense_with(weight)

    out, kept = sparse()
    err = (out.float() - ref.float()).abs().max().item()
    # The kernel reads weight row k for segment g when any batch row keeps channel k for g.
    scores = x.float().abs().unsqueeze(1) * col_norms.unsqueeze(0)  # [B, G, K]
    any_row = (scores > thresholds.unsqueeze(-1)).any(dim=0).float()  # [G, K]
    widths = torch.tensor(layer.segments, dtype=torch.float32, device="cuda")
    rows = float((any_row.mean(dim=1) * widths).sum() / widths.sum())
    weight_bytes = weight.numel() * weight.element_size()

    def events_ms(fn):  # CPU launch cost included, as an eager decode step pays it
        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

    def graph_ms(fn):  # GPU time alone: replays of a captured CUDA graph
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")

    def from_memory(fn, arg: int):
        """fn, called on weight copy after copy: in a graph each call reads its weights from device
        memory (small layers would otherwise read a single copy from the L2)."""
        return cycling([lambda c=c: fn(c[arg]) for c in copies])

    triton_ms, dense_ms = events_ms(sparse), events_ms(dense)
    triton_graph_ms, dense_graph_ms = graph_ms(from_memory(sparse_with, 1)), graph_ms(from_memory(dense_with, 0))
    config = wina_triton.pick_config(batch, layer.k, layer.segments, layer.gate_up, x.device,
                                     weight_bytes=weight_t.element_size())
    broadcast = {}
    if args.broadcast_configs is not None and batch == 1:  # the same case on the broadcast path, tuned
        tuned = wina_triton.load_tuned_configs(args.broadcast_configs)
        broadcast_config = tuned.get(wina_triton.tuning_key(layer.gate_up, 1, layer.k, layer.segments,
                                                            weight_t.element_size()))
        if broadcast_config is not None:
            def broadcast_with(w_t):
                return layer.sparse(x, w_t, col_norms, thresholds, broadcast_config)
            broadcast = {"broadcast_graph_us": graph_ms(from_memory(broadcast_with, 1)) * 1e3,
                         "broadcast_max_abs_err": (broadcast_with(weight_t)[0].float() - ref.float()).abs().max().item(),
                         "broadcast_config": asdict(broadcast_config)}
    # The gather path: its heuristic launch parameters, then each of --gather-grid's (chunk fixed
    # per layer in serving; the grid lets a run compare chunks too).
    gather_configs = [None] + [wina_triton.GatherConfig(*c) for c in args.gather_grid]
    gather_us = {}
    gather_err = 0.0
    gather_kept_ok = True
    for gather_config in gather_configs:
        def gather_with(w_t, gather_config=gather_config):
            return layer.gather(x, w_t, col_norms, thresholds, gather_config)
        name = "heuristic" if gather_config is None else ":".join(str(v) for v in asdict(gather_config).values())
        try:
            g_out, g_kept = gather_with(weight_t)
        except Exception as error:  # a grid entry that does not compile: say so, time the rest
            if gather_config is None:
                raise
            print(f"{layer.name} B={batch}: gather {name} failed: {error!r}"[:400], flush=True)
            continue
        gather_err = max(gather_err, (g_out.float() - ref.float()).abs().max().item())
        gather_kept_ok &= bool(torch.equal(g_kept.cpu(), ref_kept.cpu()))
        gather_us[name] = graph_ms(from_memory(gather_with, 1)) * 1e3
    best_gather = min(gather_us, key=gather_us.get)
    # Each launch of the heuristic's gather path alone (the same buffers, weights from memory).
    steps_per_copy = [layer.gather_steps(x, w_t, col_norms, thresholds) for _, w_t in copies]
    for steps in steps_per_copy:
        for step in steps.values():
            step()
    step_us = {name: graph_ms(cycling([steps[name] for steps in steps_per_copy])) * 1e3
               for name in steps_per_copy[0]}
    gather = {"gather_graph_us": gather_us["heuristic"], "gather_eager_us": events_ms(
                  lambda: layer.gather(x, weight_t, col_norms, thresholds)) * 1e3,
              "gather_best_us": gather_us[best_gather], "gather_best": best_gather, "gather_all_us": gather_us,
              "gather_steps_us": step_us,
              "gather_config": asdict(wina_triton.gather_config(batch, layer.k, layer.segments, x.device)),
              "gather_max_abs_err": gather_err, "gather_kept_matches": gather_kept_ok}
    achieved = 1.0 - float(ref_kept.float().mean()) / layer.k
    sparsity = achieved if sparsity is None else sparsity
    return {
        "layer": layer.name, "k": layer.k, "segments": list(layer.segments), "gate_up": layer.gate_up,
        "batch": batch, "sparsity": sparsity,
        "achieved_sparsity": achieved,
        "kept_matches": bool(torch.equal(kept.cpu(), ref_kept.cpu())),
        "triton_us": triton_ms * 1e3, "dense_us": dense_ms * 1e3, "ratio": triton_ms / dense_ms,
        "triton_graph_us": triton_graph_ms * 1e3, "dense_graph_us": dense_graph_ms * 1e3,
        "graph_ratio": triton_graph_ms / dense_graph_ms, **broadcast, **gather,
        "roofline_ratio": 1.0 - sparsity, "rows_read": rows,
        "triton_gbps": rows * weight_bytes / (triton_graph_ms * 1e-3) / 1e9,
        "gather_gbps": rows * weight_bytes / (gather["gather_graph_us"] * 1e-6) / 1e9,
        "dense_gbps": weight_bytes / (dense_graph_ms * 1e-3) / 1e9,
        "max_abs_err": err, "config": asdict(config), "weight_copies": len(copies),
    }


def real_input_cases(args: argparse.Namespace, dtype) -> list[dict[str, Any]]:
    """The default model's own layer, inputs and calibrated thresholds (benchmarks/wina_real_inputs.py):
    batch 1 on the first request's row, and every batch of --batches up to the rows saved."""
    from safetensors.torch import load_file

    saved = load_file(str(args.real_inputs), device="cuda")
    cases = []
    for name in ("qkv", "o", "gate_up", "down"):
        weight = saved[f"{name}.weight"].to(dtype)  # [N, K]
        segments = tuple(int(w) for w in saved[f"{name}.segments"])
        layer = Layer(f"real_{name}", weight.shape[1], segments, gate_up=name == "gate_up")
        weights = (rotating(weight), saved[f"{name}.col_norms"])
        rows = saved[f"{name}.x"]  # [R, K] float32
        for batch in (b for b in args.batches if b <= rows.shape[0]):
            x = rows[:batch].to(dtype)
            thresholds = saved[f"{name}.thresholds"].expand(batch, -1).contiguous()  # [batch, G]
            case = bench_case(layer, batch, None, dtype, args, weights, (x, thresholds))
            cases.append(case)
            print(f"  {layer.name} B={batch} (real, sparsity {case['achieved_sparsity']:.2f}): in a CUDA graph "
                  f"{case['triton_graph_us']:.1f} vs {case['dense_graph_us']:.1f} us, rows read "
                  f"{case['rows_read']:.3f}", flush=True)
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("wina_kernel_gpu: torch is not installed")
    if not torch.cuda.is_available():
        sys.exit("wina_kernel_gpu: no CUDA device (torch.cuda.is_available() is False); "
                 "this benchmark times the compiled Triton kernel and needs an NVIDIA GPU")
    try:
        from kernels import wina_triton
    except ImportError as exc:
        sys.exit(f"wina_kernel_gpu: cannot import the Triton kernels ({exc}); pip install 'neuronserve[triton]'")
    if wina_triton.INTERPRETED:
        sys.exit("wina_kernel_gpu: TRITON_INTERPRET is set; unset it to time the compiled kernel")
    from kernels.wina_reference import column_norms

    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}; dtype {args.dtype}; DENSE_CROSSOVER_BATCH={wina_triton.DENSE_CROSSOVER_BATCH}\n")
    torch.manual_seed(args.seed)
    cases = []
    for name in args.layers:
        layer = LAYERS[name]
        n = sum(layer.segments)
        weight = (torch.randn(n, layer.k, device="cuda") / layer.k**0.5).to(dtype)  # [N, K]
        weights = (rotating(weight), column_norms(weight, layer.segments))
        for batch in args.batches:
            for sparsity in args.sparsities:
                case = bench_case(layer, batch, sparsity, dtype, args, weights)
                cases.append(case)
                dot = (f", broadcast path {case['broadcast_graph_us']:.1f} us" if "broadcast_graph_us" in case
                       else "")
                print(f"  {name} B={batch} s={sparsity}: tile {case['triton_us']:.1f} us, dense "
                      f"{case['dense_us']:.1f} us; in a CUDA graph tile {case['triton_graph_us']:.1f}, gather "
                      f"{case['gather_graph_us']:.1f} (best {case['gather_best_us']:.1f} {case['gather_best']}) vs "
                      f"{case['dense_graph_us']:.1f} us{dot}", flush=True)
                # the cases so far, in case a lent machine's time limit stops the run
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"benchmark": "wina_kernel_gpu", "partial": True,
                                                "command": command_line(argv), "cases": cases}, indent=2) + "\n")
        del weight, weights
        torch.cuda.empty_cache()
    if args.real_inputs is not None:
        cases += real_input_cases(args, dtype)

    headers = ["layer", "B", "s", "tile us", "dense us", "ratio", "graph: tile", "gather", "its steps", "best",
               "dense", "x dense", "1-s", "rows", "gather GB/s", "dense GB/s", "err", "kept ok"]
    rows = [[c["layer"], str(c["batch"]), fmt(c["sparsity"], 2), fmt(c["triton_us"]), fmt(c["dense_us"]),
             fmt(c["ratio"], 2), fmt(c["triton_graph_us"]), fmt(c["gather_graph_us"]),
             "+".join(fmt(v) for v in c["gather_steps_us"].values()), fmt(c["gather_best_us"]),
             fmt(c["dense_graph_us"]), fmt(c["dense_graph_us"] / c["gather_graph_us"], 2),
             fmt(c["roofline_ratio"], 2), fmt(c["rows_read"], 2), fmt(c["gather_gbps"], 0),
             fmt(c["dense_gbps"], 0), f"{max(c['max_abs_err'], c['gather_max_abs_err']):.1e}",
             "yes" if c["kept_matches"] and c["gather_kept_matches"] else "NO"]
            for c in cases]
    text = (f"WINA sparse GEMV vs cuBLAS dense on {gpu} ({args.dtype})\n"
            "ratio = tile/dense time (eager); graph columns: GPU time alone, tile kernel, gather path "
            "(served; heuristic, its launches each alone, best of --gather-grid), cuBLAS; x dense = cuBLAS / "
            "gather; 1-s = the "
            "roofline ratio; rows = weight rows read\n\n"
            + format_table(headers, rows))
    report = {
        "benchmark": "wina_kernel_gpu",
        "command": command_line(argv),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(("torch", "triton")),
        "gpu": gpu,
        "dtype": args.dtype,
        "dense_crossover_batch": wina_triton.DENSE_CROSSOVER_BATCH,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cases": cases,
    }
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
