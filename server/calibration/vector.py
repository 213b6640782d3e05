"""`neuronserve calibrate vector`: a difference-in-means steering vector from two sets of texts, or
a llama.cpp control vector (GGUF) converted into a profile for the served model.

Difference in means (the standard baseline, e.g. Turner et al. 2023's activation addition, Rimsky
et al. 2024's contrastive activation addition, and what llama.cpp's `cvector-generator --method
mean` computes): run the model over every text, take the residual stream after decoder layer L at
token positions >= 1 (position 0 is the attention sink, whose norm is ~100x the others' at mid
layers and would swamp the mean), average them within each text, then over the texts of each set;
the vector is mean(positive) - mean(negative). Each text weighs the same whatever its length.

Input files: plain text, one example per line (blank lines skipped), or JSONL (`.jsonl`, or a file
whose first line is a JSON object) with a "text" field per line. No escape processing: use JSONL
for examples that span lines.

The vector is stored raw (not normalised): strength 1 adds the whole difference between the two
sets' mean activations. Its norm, and the median norm of the residual stream at that layer, are in
the profile, so a user can pick strengths relative to either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from server.interventions.vectors import (
    SteeringVector,
    load_control_vector_gguf,
    save_vector_profile,
)
from server.model.llama import LlamaDecoder
from server.profiles import ProfileError

logger = logging.getLogger(__name__)

SKIP_POSITIONS = 1  # leave out position 0, the attention sink


@dataclass
class VectorCalibrationConfig:
    layer: int
    batch_size: int = 16
    max_tokens: int = 512  # longer texts are cut here
    add_special_tokens: bool = True  # as the tokenizer would for a prompt


@dataclass(frozen=True)
class SetMeans:
    """The residual stream of one set of texts at one layer."""

    mean: torch.Tensor  # [hidden] float32: mean over texts of each text's mean over positions >= 1
    texts: int  # texts that counted (a text of one token has no position >= 1)
    skipped: int  # texts left out for being one token long
    tokens: int  # positions averaged, over all texts
    median_norm: float  # median norm of the residual vectors averaged (positions >= 1)
    text_means: torch.Tensor  # [texts, hidden] float32: each text's own mean


def read_texts(path: Path) -> list[str]:
    """One example per line, or JSONL with a "text" field."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no examples")
    if path.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: a JSONL line needs a \"text\" field ({error})") from error
        return texts
    return lines


def residual_means(model: LlamaDecoder, tokenizer, texts: list[str], config: VectorCalibrationConfig,
                   label: str = "texts") -> SetMeans:
    """Each text's mean residual stream after `config.layer` over positions >= 1, and their mean.
    Texts are batched right-padded (sorted by length so padding is small): padding sits after a
    text's last token, so causal attention never lets it touch the text's own positions."""
    encoded = [tokenizer.encode(t, add_special_tokens=config.add_special_tokens)[:config.max_tokens] for t in texts]
    usable = [ids for ids in encoded if len(ids) > SKIP_POSITIONS]
    skipped = len(encoded) - len(usable)
    if not usable:
        raise ValueError(f"every one of the {len(encoded)} {label} is a single token; nothing to average")
    usable.sort(key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    means, norms = [], []
    for start in tqdm(range(0, len(usable), config.batch_size), desc=f"layer {config.layer} {label}",
                      unit="batch", leave=False):
        batch = usable[start:start + config.batch_size]
        T = max(map(len, batch))
        ids = torch.tensor([seq + [pad] * (T - len(seq)) for seq in batch])  # [B, T]
        h = model.residual_stream(ids, config.layer)  # [B, T, hidden] float32
        for row, seq in enumerate(batch):
            kept = h[row, SKIP_POSITIONS:len(seq)]  # [n, hidden]
            means.append(kept.mean(dim=0))
            norms.append(kept.norm(dim=-1))
    text_means = torch.stack(means).cpu()  # [texts, hidden]
    all_norms = torch.cat(norms)
    return SetMeans(text_means.mean(dim=0), len(usable), skipped, int(all_norms.numel()),
                    float(all_norms.median()), text_means)


def difference_in_means(model: LlamaDecoder, tokenizer, positive: list[str], negative: list[str],
                        config: VectorCalibrationConfig) -> tuple[torch.Tensor, dict, dict]:
    """-> (vector [hidden] = mean(positive) - mean(negative), data counts, quality figures)."""
    pos = residual_means(model, tokenizer, positive, config, "positive texts")
    neg = residual_means(model, tokenizer, negative, config, "negative texts")
    vector = pos.mean - neg.mean  # [hidden]
    norm = float(vector.norm())
    # How well the direction separates the two sets (on the calibration texts themselves, so an
    # optimistic figure): each text's mean projected on the unit direction, split at the midpoint.
    unit = vector / max(norm, 1e-12)
    pos_proj, neg_proj = pos.text_means @ unit, neg.text_means @ unit  # [texts]
    midpoint = 0.5 * float(pos.mean @ unit + neg.mean @ unit)
    correct = int((pos_proj > midpoint).sum()) + int((neg_proj <= midpoint).sum())
    median_norm = 0.5 * (pos.median_norm + neg.median_norm)
    counts = {"positive": {"texts": pos.texts, "skipped_single_token": pos.skipped, "tokens": pos.tokens},
              "negative": {"texts": neg.texts, "skipped_single_token": neg.skipped, "tokens": neg.tokens}}
    quality = {
        "norm": round(norm, 4),
        "residual_median_norm": round(median_norm, 4),
        "relative_norm": round(norm / median_norm, 4),
        "cosine_of_set_means": round(float(torch.nn.functional.cosine_similarity(pos.mean, neg.mean, dim=0)), 4),
        "in_sample_separation_accuracy": round(correct / (pos.texts + neg.texts), 4),
    }
    return vector, counts, quality


def _file_record(path: Path) -> dict:
    return {"file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def default_name(positive: Path) -> str:
    """`weddings.pos.txt` -> `weddings`; `happy_positive.jsonl` -> `happy`."""
    stem = positive.name.split(".")[0]
    for suffix in ("_positive", "-positive", "_pos", "-pos"):
        stem = stem.removesuffix(suffix)
    return stem or "vector"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--positive", type=Path, help="Texts that show the concept: one per line, or JSONL "
                        "with \"text\".")
    parser.add_argument("--negative", type=Path, help="Contrasting texts without it (same format).")
    parser.add_argument("--layer", type=int, help="Residual stream after this decoder layer (0-based).")
    parser.add_argument("--from-gguf", type=Path, default=None, metavar="FILE",
                        help="Instead: convert a llama.cpp control vector (direction.N tensors, added after "
                        "layer N) into a profile for this model.")
    parser.add_argument("--name", default=None, help="Profile name (requests say {\"vector\": NAME}). Default: "
                        "the positive file's name before its first dot, or the GGUF file's stem.")
    parser.add_argument("--model", default="default", help="Model to calibrate (as for serve). [default]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Calibrate in the dtype you serve with (auto: as serve picks).")
    parser.add_argument("--max-tokens", type=int, default=512, help="Longer texts are cut to this many tokens.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="Recorded; the computation draws no random numbers.")
    parser.add_argument("--data-dir", type=Path, default=None, help="Unused (the texts are given); accepted "
                        "for symmetry with the other calibrate commands.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Output directory. Default: <cache>/profiles/<model name>/.")


def run(args: argparse.Namespace) -> int:
    from server.profiles import model_slug
    from server.runtime import load_model
    from server.settings import ServerSettings

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_gguf is None and (args.positive is None or args.negative is None or args.layer is None):
        print("neuronserve: calibrate vector needs --positive, --negative and --layer (or --from-gguf FILE)",
              file=sys.stderr)
        return 2
    for path in (args.from_gguf,) if args.from_gguf else (args.positive, args.negative):
        if not path.is_file():
            print(f"neuronserve: {path} not found", file=sys.stderr)
            return 2
    torch.manual_seed(args.seed)
    settings = ServerSettings(model=args.model, device=args.device, dtype=args.dtype,
                              max_model_len=max(args.max_tokens, 16), wina_profile="none")
    loaded = load_model(settings)
    model = loaded.model
    out = args.out or settings.cache_dir / "profiles" / model_slug(loaded.name)
    num_layers, hidden = len(model.layers), model.config.hidden_size

    if args.from_gguf is not None:
        try:
            vector = load_control_vector_gguf(args.from_gguf, args.name)
            vector.check_model(hidden, num_layers)
        except ProfileError as error:
            print(f"neuronserve: {error}", file=sys.stderr)
            return 2
        parameters = {"source": "llama.cpp control vector", "layers": list(vector.layers),
                      "layer_convention": vector.metadata["layer_convention"]}
        data = {"gguf": {**_file_record(args.from_gguf), "model_hint": vector.metadata.get("model_hint"),
                         "zero_layers_dropped": vector.metadata.get("zero_layers_dropped")}}
        quality = {"norms": [round(float(n), 4) for n in vector.directions.norm(dim=-1)]}
    else:
        if not 0 <= args.layer < num_layers:
            print(f"neuronserve: --layer {args.layer} outside 0..{num_layers - 1}", file=sys.stderr)
            return 2
        try:
            positive, negative = read_texts(args.positive), read_texts(args.negative)
        except ValueError as error:
            print(f"neuronserve: {error}", file=sys.stderr)
            return 2
        config = VectorCalibrationConfig(layer=args.layer, batch_size=args.batch_size, max_tokens=args.max_tokens)
        direction, counts, quality = difference_in_means(model, loaded.tokenizer, positive, negative, config)
        vector = SteeringVector(args.name or default_name(args.positive), (args.layer,), direction.unsqueeze(0))
        parameters = {"layer": args.layer, "method": "difference in means",
                      "averaging": "per text over token positions >= 1, then over texts",
                      "max_tokens": args.max_tokens, "dtype": str(model.dtype).removeprefix("torch."),
                      "seed": args.seed}
        data = {"positive": {**_file_record(args.positive), **counts["positive"]},
                "negative": {**_file_record(args.negative), **counts["negative"]}}
    path = save_vector_profile(out / f"vector-{vector.name}.safetensors", vector,
                               model_fingerprint=loaded.fingerprint, model_name=loaded.name,
                               parameters=parameters, data=data, quality=quality)
    print(f"wrote {path}")
    print(f"vector {vector.name!r}: layers {list(vector.layers)}, " + ", ".join(f"{k} {v}" for k, v in quality.items()))
    return 0
