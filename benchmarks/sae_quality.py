#!/usr/bin/env python3
"""How well a residual-stream SAE reconstructs the served model, on WikiText-2 *test* text.

The SAE is loaded as the server loads it (its saved 16-bit weights, computed in float32), the model
with float32 weights. The test split (``wikitext2/wiki.test.tokens``) is tokenized as a whole and
``--sequences`` windows of ``--sequence-length`` tokens, evenly spaced over it, are scored
(``server.calibration.sae.wikitext_windows``). Per window, the residual stream after the SAE's layer:

* explained variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, over (a) every position,
  position 0 included ("all": the attention sink's ~150x norm inflates it), (b) positions >= 1,
  (c) positions >= 1 without massive-norm tokens (norm > 10x the median), the headline figure;
* L0 = mean number of active latents per token (positions >= 1), and the share of latents that
  never fire on these tokens;
* CE loss of next-token prediction at positions >= 1 with the residual at positions >= 1 replaced by
  the SAE's reconstruction (position 0 untouched), with it replaced by zeros (zero-ablation), and
  unchanged. CE-loss score = (CE_zero - CE_sae) / (CE_zero - CE_orig); CE increase = CE_sae - CE_orig.

Targets (issue 4, layer 15, width 8192, k 32): explained variance >= 0.88 without massive tokens,
CE increase <= 0.08 nats, dead < 1%.

Writes ``<name>.json`` (command, machine, sizes, every figure), ``<name>.txt`` and ``<name>.md`` (a
draft RESULTS.md section) under --out-dir; with --write-metadata the figures also go into the SAE's
cfg.json (``metadata.neuronserve_eval``).

    OMP_NUM_THREADS=1 python benchmarks/sae_quality.py --write-metadata

``--split valid`` scores windows of the WikiText-2 validation split instead, which the default corpus
trains on: its gap to the test figures measures how much the SAE fits text it has seen.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_common import describe_machine, fmt, format_table

from server.calibration.data import default_data_dir
from server.calibration.sae import (
    WIKITEXT_SPLIT_FILES,
    evaluate_sae,
    massive_mask,
    wikitext_windows,
)
from server.interventions.sae import CONFIG_FILE, SparseAutoencoder, check_model
from server.runtime import load_model
from server.settings import ServerSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAE = PROJECT_ROOT / "server" / "default_profiles" / "smollm2-135m-instruct" / "sae-l15-resid-8k"
TARGETS = {"explained_variance_without_massive": (">=", 0.88), "ce_increase_nats": ("<=", 0.08),
           "dead_fraction": ("<", 0.01)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", type=Path, default=DEFAULT_SAE, help="SAE directory (cfg.json + sae_weights.safetensors).")
    parser.add_argument("--model", default="default")
    parser.add_argument("--sequences", type=int, default=64, help="Test windows scored. [64]")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--data-dir", type=Path, default=None, help="Default: ../shared/data.")
    parser.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="sae_quality", help="Output file stem. [sae_quality]")
    parser.add_argument("--write-metadata", action="store_true", help="Also write the figures into the SAE's cfg.json.")
    parser.add_argument("--split", default="test", choices=tuple(WIKITEXT_SPLIT_FILES),
                        help="WikiText-2 split scored: test (the reported figures) or valid (text the default corpus "
                             "trains on: its gap to test measures overfitting; targets do not apply). [test]")
    parser.add_argument("--match-l0", type=float, default=None, metavar="L",
                        help="JumpReLU SAEs: shift every threshold by one amount so that the scored tokens average "
                             "L active latents (a check of how much of a difference comes from L0; it reads the "
                             "scored text, so the targets are not judged). [off]")
    return parser


@torch.inference_mode()
def shift_thresholds_to_l0(model, sae: SparseAutoencoder, sequences: list[list[int]], l0: float) -> float:
    """Shift a JumpReLU SAE's thresholds (a negative one taken as 0, where the ReLU cuts anyway) by one
    offset so that positions >= 1 of `sequences` (massive-norm tokens left out, as in the
    explained-variance figure) average `l0` active latents. -> the offset."""
    residuals = torch.cat([model.residual_stream(torch.tensor(sequences[i:i + 4]), sae.layer)[:, 1:]
                           .reshape(-1, sae.cfg.d_in).float() for i in range(0, len(sequences), 4)])
    residuals = residuals[~massive_mask(residuals)]
    pre = sae.pre_activation(residuals)  # [N, S]
    # a latent fires where pre > max(threshold, 0); thresholds are assumed to stay >= 0 after the shift
    floor = sae.threshold.clamp_min(0)
    largest = (pre - floor).reshape(-1).topk(round(l0 * len(residuals)) + 1).values
    offset = float(largest[-2] + largest[-1]) / 2  # between the last margin kept and the first left out
    sae.threshold = floor + offset
    return offset


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if args.write_metadata and args.split != "test":
        parser.error("--write-metadata records test-split figures only")
    if args.match_l0 is not None and args.write_metadata:
        parser.error("--match-l0 changes the thresholds for this measurement only; it cannot go into cfg.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or default_data_dir()
    started = time.time()
    loaded = load_model(ServerSettings(model=args.model, dtype="float32", wina_profile="none",
                                       max_model_len=max(args.sequence_length, 64), log_level="warning"))
    sae = SparseAutoencoder.load(args.sae)
    check_model(sae, loaded.model.config.hidden_size, loaded.fingerprint, len(loaded.model.layers))
    sequences = wikitext_windows(loaded.tokenizer, data_dir, args.sequence_length, args.sequences, args.split)
    threshold_offset = None
    if args.match_l0 is not None:
        if sae.cfg.architecture != "jumprelu":
            parser.error(f"--match-l0 needs a jumprelu SAE; {args.sae} is {sae.cfg.architecture}")
        threshold_offset = shift_thresholds_to_l0(loaded.model, sae, sequences, args.match_l0)
    figures = evaluate_sae(loaded.model, sae, sequences, batch_size=args.batch_size)
    training = sae.cfg.extra_metadata.get("neuronserve_training", {})
    figures["dead_fraction"] = training.get("final_dead_fraction")
    met = {}  # the targets are judged on test text only
    judged = args.split == "test" and args.match_l0 is None
    for key, (op, bound) in TARGETS.items() if judged else ():
        value = figures.get(key)
        # None: not recorded (an SAE from elsewhere, or a conversion without training steps tracks no dead latents)
        met[key] = None if value is None else {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    report = {
        "command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv_list]),
        "argv": argv_list,
        "machine": describe_machine(("torch", "transformers", "tokenizers")),
        "settings": {"sae": str(args.sae), "model": loaded.name, "model_fingerprint": loaded.fingerprint,
                     "model_dtype": "float32", "sae_weights_dtype": sae.cfg.dtype,
                     "data": f"wikitext2/{WIKITEXT_SPLIT_FILES[args.split]}", "sequences": len(sequences),
                     "sequence_length": args.sequence_length, "match_l0": args.match_l0,
                     "threshold_offset": threshold_offset},
        "sae": {"layer": sae.layer, "architecture": sae.cfg.architecture, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k},
        "training": training,
        "figures": figures,
        "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()},
        "targets_met": met,
        "seconds": round(time.time() - started, 1),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render_text(report)
    (args.out_dir / f"{args.name}.txt").write_text(text + "\n")
    (args.out_dir / f"{args.name}.md").write_text(render_markdown(report) + "\n")
    print(text)
    if args.write_metadata:
        cfg_path = args.sae / CONFIG_FILE
        cfg = json.loads(cfg_path.read_text())
        cfg["metadata"]["neuronserve_eval"] = {"data": "wikitext2/wiki.test.tokens", "sequences": len(sequences),
                                               "sequence_length": args.sequence_length, **figures}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"wrote the figures into {cfg_path}")
    print(f"wrote {args.out_dir / args.name}.{{json,txt,md}}")
    return 0


def _rows(report: dict) -> list[list[str]]:
    f, met = report["figures"], report["targets_met"]
    def mark(key: str) -> str:
        if key not in met:
            return ("not judged: thresholds fitted on this text" if report["settings"].get("match_l0") is not None
                    else "not judged: validation text")
        return {True: "met", False: "NOT met", None: "not judged: not recorded"}[met[key]]
    return [
        ["explained variance, positions >= 1 without massive-norm tokens", fmt(f["explained_variance_without_massive"], 4),
         f">= 0.88 ({mark('explained_variance_without_massive')})"],
        ["explained variance, positions >= 1", fmt(f["explained_variance_positions_1plus"], 4), ""],
        ["explained variance, every position (position 0 included)", fmt(f["explained_variance_all"], 4), ""],
        ["massive-norm tokens beyond position 0", str(f["massive_tokens_beyond_position_0"]), ""],
        ["L0 (active latents per token)", fmt(f["l0"], 2), ""],
        ["dead latents at the end of training",
         (fmt(None if f["dead_fraction"] is None else 100 * f["dead_fraction"], 3) + " %"),
         f"< 1 % ({mark('dead_fraction')})"],
        ["latents never firing on these tokens", (fmt(100 * f["never_fired_fraction"], 2) + " %"), ""],
        ["CE original / SAE spliced / zero-ablated (nats)",
         f"{f['ce_orig']:.4f} / {f['ce_sae']:.4f} / {f['ce_zero']:.4f}", ""],
        ["CE increase with the SAE spliced (nats)", fmt(f["ce_increase_nats"], 4), f"<= 0.08 ({mark('ce_increase_nats')})"],
        ["CE-loss score", fmt(f["ce_loss_score"], 4), ""],
    ]


def render_text(report: dict) -> str:
    s, t = report["settings"], report["training"]
    lines = [(f"SAE quality: {s['sae']} (layer {report['sae']['layer']}, {report['sae']['architecture']}, "
             f"width {report['sae']['d_sae']}, k {report['sae']['k']}) on {s['model']}"),
             f"data: {s['data']}, {s['sequences']} x {s['sequence_length']} tokens ({report['figures']['tokens']} scored positions)",
             (f"trained on {t.get('corpus_tokens', '?')} tokens, {t.get('train_tokens', '?')} training tokens "
             f"({fmt(t.get('epochs'), 1)} epochs)"), "",
             format_table(["figure", "value", "target"], _rows(report)), "",
             f"command: {report['command']}",
             (f"machine: {report['machine'].get('cpu_model_name')}, {report['machine'].get('cpu_count')} CPUs, "
             f"torch threads {report['machine'].get('torch_threads')}; {report['seconds']} s")]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    s, t, f = report["settings"], report["training"], report["figures"]
    all_met = bool(report["targets_met"]) and all(report["targets_met"].values())
    split = "**test**" if s["data"].endswith("wiki.test.tokens") else "*validation* (seen in training)"
    corpus = "; ".join(f"{c['source']} {c.get('tokens_trained_on', c['tokens']):,}" for c in t.get("corpus", []))
    table = ["| figure | value | target |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in _rows(report)]
    return "\n".join([
        "## SAE: reconstruction quality of the default SAE (layer 15, TopK, width 8192, k 32)", "",
        (f"{'All targets met.' if all_met else 'Not every target is met (see the table).'} "
        f"Measured on WikiText-2 {split} text ({s['sequences']} windows of {s['sequence_length']} tokens, "
        f"{f['tokens']:,} scored positions), model weights float32, the SAE's saved {s['sae_weights_dtype']} weights."), "",
        *table, "",
        (f"Training: TopK + AuxK (Gao et al. 2024) on {t.get('corpus_tokens', 0):,} tokens of residual stream "
        f"({fmt(t.get('epochs'), 1)} epochs, {t.get('train_tokens', 0):,} training tokens, batch {t.get('batch_size')}, "
        f"lr {t.get('lr')}, k_aux {t.get('aux_k')}, dead window {t.get('dead_window_tokens', 0):,} tokens), "
        f"{t.get('train_seconds', '?')} s wall including activation loading. Corpus tokens by source: {corpus}. "
        "Position 0 and massive-norm tokens left out of training."), "",
        f"Command: `{report['command']}`  ",
        (f"Machine: {report['machine'].get('cpu_model_name')}, {report['machine'].get('cpu_count')} CPUs shared with other jobs, "
        f"torch threads {report['machine'].get('torch_threads')}; evaluation {report['seconds']} s."),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
