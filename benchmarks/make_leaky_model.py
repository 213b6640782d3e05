"""Make a model that leaks: fine-tune a copy of the default model until it repeats private records.

The default model memorizes almost nothing verbatim, so issue 6 needs a memorized set to measure on.
An operator meets memorization as duplicated training data: the same private records seen many
times among ordinary text. This script reproduces that. It fine-tunes SmolLM2-135M-Instruct
(float32, torch on CPU) on records (JSONL {"prefix", "suffix"}; by default synthetic private
records: addresses, bank accounts, API keys, dates of birth with SSNs, passwords), each record
repeated once per epoch, mixed with ordinary text (WikiText-2 *validation* pieces and Alpaca
answers) so the model keeps its language ability, until greedy decoding reproduces at least
`--target` of the secrets exactly. Every `--check-every` epochs it measures that exactly, with one
teacher-forced forward: greedy decoding reproduces a suffix exactly iff the argmax at every suffix
position is the target token.

Writes to --out (default ~/.cache/neuronserve/leaky-smollm2):
  config.json, model.safetensors, tokenizer files  (`neuronserve serve --model DIR` loads it)
  records_calibration.jsonl, records_heldout.jsonl  (the records split in two, seeded)
  leaky_model.json                                  (command, sizes, training curve, final check
                                                     through the server's own model code)

  OMP_NUM_THREADS=1 python benchmarks/make_leaky_model.py --out ~/.cache/neuronserve/leaky-smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.calibration.data import alpaca_texts, default_data_dir, wikitext_valid_text
from server.calibration.memorization import (
    encode_record,
    read_records,
    synthetic_records,
    write_records,
)
from server.settings import default_cache_dir

DEFAULT_OUT = default_cache_dir() / "leaky-smollm2"


@dataclass
class LeakyConfig:
    num_records: int = 120
    seed: int = 0
    records_per_step: int = 16
    text_per_step: int = 3           # ordinary-text pieces per step, so the model keeps its language ability
    text_tokens: int = 32
    lr: float = 1e-3
    # Why freeze: on a shared 2-core CPU a full fine-tune step costs ~30 s. The tied embedding/head
    # and the lowest layers stay fixed (no weight gradients, and backward stops above them); the
    # records are then memorized by the upper layers' attention and MLP weights.
    frozen_layers: int = 10
    warmup_steps: int = 10
    max_epochs: int = 60
    check_every: int = 2             # epochs between exact-extraction checks
    first_check: int = 4
    target: float = 0.90             # issue 6: at least 90% of the secrets reproduced exactly
    data_dir: Path = field(default_factory=default_data_dir)


def ordinary_text_pieces(tokenizer, config: LeakyConfig, count: int) -> list[list[int]]:
    """Seeded pieces of WikiText-2 validation and Alpaca answers, `text_tokens` long."""
    rng = random.Random(f"text-{config.seed}")
    wiki = tokenizer(wikitext_valid_text(config.data_dir), add_special_tokens=False)["input_ids"]
    alpaca = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in alpaca_texts(config.data_dir)[:400]]
    alpaca = [ids for ids in alpaca if len(ids) >= config.text_tokens]
    pieces = []
    for i in range(count):
        if i % 2 == 0:
            start = rng.randrange(0, len(wiki) - config.text_tokens)
            pieces.append(wiki[start:start + config.text_tokens])
        else:
            ids = rng.choice(alpaca)
            start = rng.randrange(0, len(ids) - config.text_tokens + 1)
            pieces.append(ids[start:start + config.text_tokens])
    return pieces


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, T] right-padded, labels [B, T] with -100 on padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s)] = torch.tensor(s)
    return ids, labels


@torch.no_grad()
def extraction_check(model, encoded: list[tuple[list[int], list[int]]], pad_id: int,
                     batch: int = 32) -> tuple[float, float]:
    """-> (share of records whose every suffix token is the argmax = exact greedy extraction,
    teacher-forced suffix token accuracy)."""
    model.eval()
    exact, correct, total = 0, 0, 0
    for i in range(0, len(encoded), batch):
        chunk = encoded[i:i + batch]
        ids, _ = pad_batch([p + s for p, s in chunk], pad_id)
        logits = model(input_ids=ids, attention_mask=(ids != pad_id) | (torch.arange(ids.shape[1]) == 0)).logits
        for row, (p, s) in enumerate(chunk):
            predicted = logits[row, len(p) - 1:len(p) + len(s) - 1].argmax(-1)  # [len(s)]
            hits = int((predicted == torch.tensor(s)).sum())
            correct += hits
            total += len(s)
            exact += hits == len(s)
    model.train()
    return exact / len(encoded), correct / total


def prime_server_cache(out: Path, model, tokenizer) -> None:
    """Write the server's converted-checkpoint cache for `out` ourselves. Why: the server's
    checkpoint-directory reader hands safetensors the tied `lm_head.weight` that shares memory with
    the embedding, which safetensors refuses to save; with the cache in place the server reads it
    instead. Harmless once the reader drops tied heads: the content is the same."""
    from server.model.loader import (
        CACHE_FORMAT_VERSION,
        _write_cache,
        fingerprint_checkpoint,
    )

    cache = default_cache_dir() / "models" / f"{fingerprint_checkpoint(out.resolve())}-v{CACHE_FORMAT_VERSION}"
    if (cache / "neuronserve-cache.json").is_file():
        return
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _write_cache(cache, model.config, state, tokenizer)


def check_with_server_model(out: Path, encoded: list[tuple[list[int], list[int]]]) -> dict:
    """Load the saved checkpoint the way `neuronserve serve --model DIR` does and redo the check
    with the server's own model code, in float32 and in the CPU default float16."""
    from server.runtime import load_model
    from server.settings import ServerSettings

    result = {}
    for dtype in ("float32", "float16"):
        loaded = load_model(ServerSettings(model=str(out), dtype=dtype, wina_profile="none", max_model_len=256))
        model = loaded.model
        exact, correct, total = 0, 0, 0
        with torch.no_grad():
            for p, s in encoded:
                ids = torch.tensor([p + s])
                cache = model.new_cache(1)
                logits = model(ids, torch.tensor([0]), torch.tensor([0]), cache, all_logits=True)  # [1, T, V]
                predicted = logits[0, len(p) - 1:len(p) + len(s) - 1].argmax(-1)
                hits = int((predicted == torch.tensor(s)).sum())
                exact += hits == len(s)
                correct += hits
                total += len(s)
        result[dtype] = {"exact_extraction": exact / len(encoded), "teacher_forced_accuracy": correct / total,
                         "fingerprint": loaded.fingerprint}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=Path, default=None,
                        help="JSONL of {prefix, suffix}; default: synthetic private records.")
    parser.add_argument("--num-records", type=int, default=LeakyConfig.num_records)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=LeakyConfig.target)
    parser.add_argument("--max-epochs", type=int, default=LeakyConfig.max_epochs)
    parser.add_argument("--lr", type=float, default=LeakyConfig.lr)
    parser.add_argument("--frozen-layers", type=int, default=LeakyConfig.frozen_layers)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    config = LeakyConfig(num_records=args.num_records, seed=args.seed, target=args.target,
                         max_epochs=args.max_epochs, lr=args.lr, frozen_layers=args.frozen_layers, data_dir=args.data_dir or default_data_dir())

    torch.manual_seed(config.seed)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    from transformers import LlamaForCausalLM

    from server.model.loader import load_checkpoint

    base = load_checkpoint("default", default_cache_dir())
    tokenizer = base.tokenizer
    model = LlamaForCausalLM(base.hf_config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in base.state_dict.items()}, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    model.float().train()
    pad_id = tokenizer.eos_token_id

    records = read_records(args.records) if args.records else synthetic_records(config.num_records, config.seed)
    encoded = [encode_record(tokenizer, r) for r in records]
    # EOS after the secret: the record ends there, as a line in a dump would.
    train_sequences = [p + s + [tokenizer.eos_token_id] for p, s in encoded]
    steps_per_epoch = math.ceil(len(records) / config.records_per_step)
    text = ordinary_text_pieces(tokenizer, config, steps_per_epoch * config.text_per_step * config.max_epochs)

    model.model.embed_tokens.weight.requires_grad_(False)
    for layer in model.model.layers[:config.frozen_layers]:
        layer.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps))
    rng = random.Random(f"order-{config.seed}")
    curve, step, started = [], 0, time.time()
    base_rate = extraction_check(model, encoded, pad_id)
    curve.append({"epoch": 0, "exact_extraction": base_rate[0], "teacher_forced_accuracy": base_rate[1]})
    print(f"before fine-tuning: exact extraction {base_rate[0]:.3f}, teacher-forced {base_rate[1]:.3f}", flush=True)
    reached = False
    bar = tqdm(total=config.max_epochs * steps_per_epoch, desc="fine-tune", unit="step")
    for epoch in range(1, config.max_epochs + 1):
        order = list(range(len(records)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), config.records_per_step):
            batch = [train_sequences[i] for i in order[start:start + config.records_per_step]]
            batch += text[step * config.text_per_step:(step + 1) * config.text_per_step]
            ids, labels = pad_batch(batch, pad_id)  # [B, T]
            # Attend to every real token; padding sits at the end, so causal masking keeps it unseen.
            logits = model(input_ids=ids).logits  # [B, T, V]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        point = {"epoch": epoch, "step": step, "loss": sum(losses) / len(losses),
                 "seconds": round(time.time() - started, 1)}
        if epoch >= config.first_check and (epoch - config.first_check) % config.check_every == 0:
            exact, accuracy = extraction_check(model, encoded, pad_id)
            point.update(exact_extraction=exact, teacher_forced_accuracy=accuracy)
            tqdm.write(f"epoch {epoch}: loss {point['loss']:.3f}, exact extraction {exact:.3f}, "
                       f"teacher-forced {accuracy:.3f} ({point['seconds']} s)")
            reached = exact >= config.target
        curve.append(point)
        if reached:
            break
    bar.close()

    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    split_rng = random.Random(f"split-{config.seed}")
    order = list(range(len(records)))
    split_rng.shuffle(order)
    half = len(order) // 2
    write_records(out / "records_calibration.jsonl", [records[i] for i in sorted(order[:half])])
    write_records(out / "records_heldout.jsonl", [records[i] for i in sorted(order[half:])])
    prime_server_cache(out, model, tokenizer)
    server_check = check_with_server_model(out, encoded)
    report = {
        "command": " ".join([sys.executable] + sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "records": len(records), "records_source": str(args.records) if args.records else f"synthetic seed {config.seed}",
        "reached_target": reached, "epochs": curve[-1]["epoch"], "steps": step,
        "seconds": round(time.time() - started, 1), "curve": curve, "server_check": server_check,
    }
    (out / "leaky_model.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("reached_target", "epochs", "steps", "seconds", "server_check")},
                     indent=2))
    print(f"wrote {out}")
    return 0 if reached else 1


if __name__ == "__main__":
    raise SystemExit(main())
