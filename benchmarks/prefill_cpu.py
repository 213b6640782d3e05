"""Prompt prefill on the CPU: the default model's forward pass over one prompt of T tokens, with
the layers run as one fused kernel call (kernels/csrc/dense_cpu.c, the path for prompt chunks of
up to CpuDenseKernel.MAX_ROWS tokens; a longer prompt in chunks of MAX_ROWS) against the torch
layer around the same kernel's projections (the path for longer dense chunks), interleaved in one
process. Why MAX_ROWS is what it is, and what a prompt costs to prefill (time to first token,
minus the HTTP). The "served path" column says which of the two the engine takes.

With --sparsity S (> 0), every prompt runs at WINA sparsity S with the served `wina-uniform`
profile, on WikiText-2 test text instead of random tokens (masks on random tokens say little).
For each length, both paths' logits at every position are compared once: the largest difference
and the share of positions where they pick the same next token. The two paths compute the same
model up to float32 summation order; hard thresholds turn such differences into different kept
channels, which is what the comparison shows.

    python benchmarks/prefill_cpu.py [--tokens 16,32,64,128,256] [--repeats 5] [--sparsity S] [--out FILE]

Prints a table, writes JSON (default benchmarks/out/prefill_cpu.json). Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

from bench_common import (
    command_line,
    describe_machine,
    format_table,
    prefill_in_chunks,
    wikitext_step_tokens,
    write_report,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "prefill_cpu.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="16,32,64,128,256", help="prompt lengths (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per length (median)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--sparsity", type=float, default=0.0, help="WINA sparsity of every prompt (default 0: dense)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import torch

    from kernels.dense_cpu import CpuDenseKernel
    from server.runtime import load_model
    from server.settings import ServerSettings

    lengths = [int(t) for t in args.tokens.split(",")]
    sparse = args.sparsity > 0
    loaded = load_model(ServerSettings(max_model_len=max(16, *lengths), dtype=args.dtype,
                                       wina_profile="wina-uniform" if sparse else "none",
                                       load_interventions=False, log_level="warning"))
    model = loaded.model
    fused_layers = model.decode_layers
    if fused_layers is None:
        raise SystemExit("the CPU kernel did not load here: nothing to compare")
    if sparse and model.wina is None:
        raise SystemExit("no WINA profile loaded for this model: run `neuronserve calibrate wina` first")
    text_tokens = wikitext_step_tokens(loaded.tokenizer) if sparse else None

    def forward(tokens, path: str, all_logits: bool = False):
        # the fused path takes at most MAX_ROWS tokens a call: longer prompts in chunks of that many
        model.decode_layers = fused_layers if path == "fused" else None
        chunk = CpuDenseKernel.MAX_ROWS if path == "fused" else tokens.shape[1]
        return prefill_in_chunks(model, tokens, cache, chunk, args.sparsity, all_logits)

    def served_path(T: int) -> str:
        # the engine: dense prompts in one chunk (up to --prefill-chunk-tokens), which runs fused up to
        # MAX_ROWS tokens; sparse prompts in chunks of at most model.sparse_chunk_tokens, all fused
        if T <= CpuDenseKernel.MAX_ROWS:
            return "fused"
        return f"fused, chunks of {CpuDenseKernel.MAX_ROWS}" if sparse else "torch layer"

    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cache = model.new_cache(1)
    generator = torch.Generator().manual_seed(0)
    rows = []
    try:
        for T in lengths:
            if sparse:  # [1, T] of text
                tokens = torch.cat([text_tokens(step, 1) for step in range(T)], dim=1)
            else:
                tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=generator)
            times: dict[str, list[float]] = {"fused": [], "torch": []}
            logits = {}
            for path in times:  # once, outside the timing: every position's logits by each path
                logits[path] = forward(tokens, path, all_logits=True)[0]  # [T, V]
            for _ in range(args.repeats):
                for path, taken in times.items():
                    start = time.perf_counter()
                    forward(tokens, path)
                    taken.append(time.perf_counter() - start)
            fused, plain = (statistics.median(times[p]) * 1e3 for p in ("fused", "torch"))
            agree = (logits["fused"].argmax(-1) == logits["torch"].argmax(-1)).float().mean()
            rows.append({"tokens": T, "fused_ms": fused, "torch_layer_ms": plain, "torch_over_fused": plain / fused,
                         "fused_ms_per_token": fused / T, "served_path": served_path(T),
                         "max_logit_difference": float((logits["fused"] - logits["torch"]).abs().max()),
                         "same_next_token_share": float(agree)})
    finally:
        model.decode_layers = fused_layers
    text = "\n".join([
        (f"prefill_cpu  {started}  {loaded.name}  {args.dtype}  torch {torch.__version__}  threads "
         f"{torch.get_num_threads()}  sparsity {args.sparsity:g}  (median of {args.repeats} interleaved rounds)"),
        format_table(["tokens", "fused ms", "torch layer ms", "torch / fused", "ms per token (fused)", "served path",
                      "max |logit diff|", "same next token"],
                     [[str(r["tokens"]), f"{r['fused_ms']:.1f}", f"{r['torch_layer_ms']:.1f}",
                       f"{r['torch_over_fused']:.2f}", f"{r['fused_ms_per_token']:.2f}",
                       r["served_path"],
                       f"{r['max_logit_difference']:.3f}", f"{r['same_next_token_share']:.1%}"] for r in rows]),
    ])
    report = {"benchmark": "prefill_cpu", "started_utc": started, "command": command_line(argv),
              "machine": describe_machine(), "model": loaded.name, "dtype": args.dtype, "repeats": args.repeats,
              "sparsity": args.sparsity, "profile": "wina-uniform" if sparse else None,
              "max_fused_rows": CpuDenseKernel.MAX_ROWS, "results": rows}
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
