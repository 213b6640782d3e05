"""How much a WINA-sparse model's output depends on tiny changes to its numbers.

A hard threshold on the score |x_i| * ||W[:, i]|| is a step function: an input near its threshold
is kept or dropped on a difference in the last bits, and a dropped channel changes the next
layer's inputs by its whole contribution, which moves further channels across their thresholds.
So two exact implementations of the same sparse model (float32 sums in different orders, as the
fused CPU layer and the torch layer are) can give visibly different logits where the dense model's
agree to rounding (benchmarks/prefill_cpu.py --sparsity compares those two paths).

This measures it without a second implementation: one prompt of --tokens WikiText-2 test tokens
at each sparsity, prefilled in chunks as the engine prefills a sparse prompt (at most
model.sparse_chunk_tokens tokens each, 64 on CPU with the kernel: the fused layer path), once as
it is and once with the token embeddings scaled by (1 + --perturbation) (default 2**-9: about one
float16 rounding step of the embedding); for each sparsity, the largest logit difference over all
positions and the share of positions where both pick the same next token. (Without the CPU kernel
the output head shares the embedding's storage, so the perturbation scales the logits too, by the
same factor everywhere: the next token is unchanged by that, the logit difference grows by about
2**-9 of a logit.)

    python benchmarks/wina_sensitivity.py [--sparsities 0,0.25,0.4,0.5] [--tokens 48] [--perturbation P]
                                          [--out FILE]

Prints a table, writes JSON (default benchmarks/out/wina_sensitivity.json). Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

from bench_common import (
    command_line,
    describe_machine,
    format_table,
    prefill_in_chunks,
    wikitext_step_tokens,
    write_report,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out" / "wina_sensitivity.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0,0.25,0.4,0.5", help="WINA sparsities (comma-separated)")
    parser.add_argument("--tokens", type=int, default=48, help="prompt length in tokens (default 48)")
    parser.add_argument("--perturbation", type=float, default=2**-9,
                        help="relative change of the token embeddings (default 2**-9)")
    parser.add_argument("--profile", default="wina-uniform", help="WINA profile (default wina-uniform)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import torch

    from server.runtime import load_model
    from server.settings import ServerSettings

    sparsities = [float(s) for s in args.sparsities.split(",")]
    loaded = load_model(ServerSettings(max_model_len=max(16, args.tokens), wina_profile=args.profile,
                                       load_interventions=False, log_level="warning"))
    model = loaded.model
    if model.wina is None and any(s > 0 for s in sparsities):
        raise SystemExit(f"no WINA profile {args.profile!r} for this model: run `neuronserve calibrate wina` first")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    step_tokens = wikitext_step_tokens(loaded.tokenizer)
    tokens = torch.cat([step_tokens(step, 1) for step in range(args.tokens)], dim=1)  # [1, T]
    original = model.embed.clone()
    chunk = model.sparse_chunk_tokens or args.tokens
    rows = []
    try:
        for sparsity in sparsities:
            logits = []
            for scale in (1.0, 1.0 + args.perturbation):
                model.embed.copy_(original * scale)
                cache = model.new_cache(1)
                logits.append(prefill_in_chunks(model, tokens, cache, chunk, sparsity,
                                                all_logits=True)[0])  # [T, V]
            rows.append({"sparsity": sparsity,
                         "max_logit_difference": float((logits[0] - logits[1]).abs().max()),
                         "same_next_token_share": float((logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean())})
    finally:
        model.embed.copy_(original)
    text = "\n".join([
        (f"wina_sensitivity  {started}  {loaded.name}  profile {args.profile}  {args.tokens} WikiText-2 test tokens  "
         f"in chunks of {chunk}  embeddings x (1 + {args.perturbation:g})"),
        format_table(["sparsity", "max |logit diff|", "same next token"],
                     [[f"{r['sparsity']:g}", f"{r['max_logit_difference']:.3f}", f"{r['same_next_token_share']:.1%}"]
                      for r in rows]),
    ])
    report = {"benchmark": "wina_sensitivity", "started_utc": started, "command": command_line(argv),
              "machine": describe_machine(), "model": loaded.name, "profile": args.profile, "tokens": args.tokens,
              "perturbation": args.perturbation, "chunk_tokens": chunk, "results": rows}
    write_report(report, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
