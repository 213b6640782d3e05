"""Decode step time against context length on the CPU: one forward step of B rows (one new token
each) at a given position, so that attention reads that many cached keys and values per row, with
the model's own path (on CPU: one fused kernel call per decoder layer). Timing only: the cache
holds zeros, which costs what real keys cost. A second copy of the model, its steps interleaved
with ours in this one process, can be the baseline: --baseline-kv-float32 (this code with a
float32 KV cache), --baseline-isa NAME (this code's kernel built for another instruction set, e.g.
avx2 on an AVX-512 CPU), or --baseline-tree DIR (another checkout's build of
kernels/csrc/dense_cpu.c for the instruction set ours runs, e.g. a `git worktree` of an earlier
commit; its kernel must take this tree's arguments: the same DecodeLayer fields, KV cache dtype and
decode_layer signature); the two models take turns going first, step by step. --sparsity S runs
every row of both at WINA sparsity S (the wina-uniform profile), for A/Bs of the sparse path; add
--text-tokens for those: each row then reads WikiText-2 test text, one token per step (rows at
different offsets), so its kept channels change from step to step as in real decoding, where one
repeated token keeps the same rows, which the caches then hold. --background-load BUSY:IDLE
instead times each step twice, interleaved, alone and beside a process that computes for BUSY ms
and sleeps IDLE ms in turn (stopped between the loaded steps): what another program on the same
cores, such as a server's event loop or a load generator, costs the model's threads.

    python benchmarks/decode_context.py [--positions 100,500,1500] [--batch-sizes 1,8]
                                        [--baseline-kv-float32 | --baseline-isa NAME | --baseline-tree DIR |
                                         --background-load BUSY:IDLE]
                                        [--sparsity S [--text-tokens]] [--out FILE]

Prints a table, writes JSON (default benchmarks/out/decode_context.json). Nothing runs on import.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import (
    command_line,
    describe_machine,
    format_table,
    wikitext_step_tokens,
    write_report,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "decode_context.json"
BURNER = """
import sys, time
busy, idle = float(sys.argv[1]) / 1e3, float(sys.argv[2]) / 1e3
while True:
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
    time.sleep(idle)
"""


def busy_idle_ms(text: str) -> tuple[float, float]:
    """An argparse type: "2:18" -> (2.0, 18.0)."""
    try:
        busy, idle = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BUSY:IDLE in ms, e.g. 2:18; got {text!r}") from None
    if busy <= 0 or idle < 0:
        raise argparse.ArgumentTypeError(f"BUSY must be > 0 and IDLE >= 0; got {text!r}")
    return busy, idle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", default="100,500,1500", help="context lengths (comma-separated)")
    parser.add_argument("--batch-sizes", default="1,8", help="rows per step (comma-separated)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per point (median)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--sparsity", type=float, default=0.0,
                        help="every row at this WINA sparsity (the default wina-uniform profile; both models)")
    parser.add_argument("--text-tokens", action="store_true",
                        help="feed WikiText-2 test tokens (one per step and row) instead of one fixed random token")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline-tree", type=Path, default=None,
                          help="also time the kernel built from DIR/kernels/csrc/dense_cpu.c, interleaved")
    baseline.add_argument("--baseline-isa", default=None, choices=["avx2", "avx512"],
                          help="also time this code's kernel built for this instruction set, interleaved")
    baseline.add_argument("--baseline-kv-float32", action="store_true",
                          help="also time this code with a float32 KV cache, interleaved")
    baseline.add_argument("--background-load", type=busy_idle_ms, default=None, metavar="BUSY:IDLE",
                          help="time each step alone and beside a process busy BUSY ms of every BUSY + IDLE, "
                               "interleaved")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import ctypes
    import tempfile

    import torch

    from kernels.cpu_build import INSTRUCTION_SETS, build_library
    from kernels.dense_cpu import CpuDenseKernel
    from server.model.config import ModelConfig
    from server.model.llama import LlamaDecoder
    from server.model.loader import load_checkpoint
    from server.runtime import attach_wina, load_model
    from server.settings import ServerSettings

    positions = [int(p) for p in args.positions.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = ServerSettings(max_model_len=max(16, max(positions) + 1), dtype=args.dtype,
                              wina_profile="wina-uniform" if args.sparsity > 0 else "none",
                              load_interventions=False, log_level="warning")
    loaded = load_model(settings)
    models = {"ours": loaded.model}
    if args.baseline_tree is not None or args.baseline_kv_float32 or args.baseline_isa is not None:
        ours, ckpt = loaded.model, load_checkpoint(settings.model, settings.cache_dir)
        kernel, kv_dtype = ours.dense_kernel, torch.float32
        if args.baseline_tree is not None:
            isa = INSTRUCTION_SETS[ours.dense_kernel.instruction_set]  # the build ours runs
            library = build_library(args.baseline_tree / "kernels" / "csrc" / "dense_cpu.c", Path(tempfile.mkdtemp()),
                                    isa)
            kernel, kv_dtype = CpuDenseKernel(ctypes.CDLL(str(library)), isa.name), None
        if args.baseline_isa is not None:
            kernel, kv_dtype = CpuDenseKernel.load(settings.cache_dir / "kernels", args.baseline_isa), None
            if kernel is None:
                parser.error(f"this CPU cannot run the {args.baseline_isa} build")
        models["baseline"] = LlamaDecoder(ModelConfig.from_hf(ckpt.hf_config), ckpt.state_dict, ours.dtype, ours.device,
                                          ours.max_model_len, kernel, kv_dtype=kv_dtype)
        if args.sparsity > 0:
            attach_wina(models["baseline"], loaded.wina_profile, settings)
    burner = None
    if args.background_load is not None:  # the same model timed alone ("ours") and beside the burner
        models["loaded"] = loaded.model
        burner = subprocess.Popen([sys.executable, "-c", BURNER, *(str(v) for v in args.background_load)])
        atexit.register(burner.kill)  # also when a step fails: never leave it stopped behind
        burner.send_signal(signal.SIGSTOP)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    caches = {name: model.new_cache(max(batch_sizes)) for name, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    step_tokens = wikitext_step_tokens(loaded.tokenizer) if args.text_tokens else None
    rows = []
    for B in batch_sizes:
        for position in positions:
            tokens = torch.randint(0, loaded.model.config.vocab_size, (B, 1), generator=generator)
            slots, starts = torch.arange(B), torch.full((B,), position)
            times: dict[str, list[float]] = {name: [] for name in models}
            for step in range(args.steps + 1):  # the first, a warm-up, is not counted
                if step_tokens is not None:
                    tokens = step_tokens(step, B)
                order = list(models.items())
                for name, model in order if step % 2 else order[::-1]:
                    plan = model.sparsity_plan([args.sparsity] * B, 1)
                    if name == "loaded":
                        burner.send_signal(signal.SIGCONT)
                    start = time.perf_counter()
                    model(tokens, slots, starts, caches[name], sparsity=plan)
                    if step:
                        times[name].append(time.perf_counter() - start)
                    if name == "loaded":
                        burner.send_signal(signal.SIGSTOP)
            row = {"batch": B, "position": position}
            for name, taken in times.items():
                ms = statistics.median(taken) * 1e3
                row[f"{name}_step_ms"] = ms
                row[f"{name}_tokens_per_s"] = B / ms * 1e3
            rows.append(row)
    other = next((name for name in ("baseline", "loaded") if name in models), None)
    model = loaded.model
    text = "\n".join([
        (f"decode_context  {started}  {loaded.name}  {args.dtype}  torch {torch.__version__}  threads "
         f"{torch.get_num_threads()}  fused kernel: {model.decode_layers is not None}  sparsity {args.sparsity}  "
         f"{'WikiText-2 tokens  ' if args.text_tokens else ''}"
         f"(median of {args.steps} steps)"),
        format_table(["batch", "position", "step ms", "tok/s"] + ([f"{other} step ms", f"{other} / ours"] if other else []),
                     [[str(r["batch"]), str(r["position"]), f"{r['ours_step_ms']:.1f}", f"{r['ours_tokens_per_s']:.1f}"]
                      + ([f"{r[f'{other}_step_ms']:.1f}", f"{r[f'{other}_step_ms'] / r['ours_step_ms']:.2f}"]
                         if other else []) for r in rows]),
    ])
    report = {"benchmark": "decode_context", "started_utc": started, "command": command_line(argv),
              "machine": describe_machine(), "model": loaded.name, "dtype": args.dtype, "steps": args.steps,
              "baseline_tree": None if args.baseline_tree is None else str(args.baseline_tree),
              "baseline_kv_float32": args.baseline_kv_float32, "baseline_isa": args.baseline_isa,
              "background_load_busy_idle_ms": args.background_load,
              "sparsity": args.sparsity, "text_tokens": args.text_tokens,
              "instruction_set": None if model.dense_kernel is None else model.dense_kernel.instruction_set,
              "results": rows}
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
