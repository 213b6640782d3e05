"""Calibration text from `../shared/data/` (validation splits and instruction data only: the test
splits are for measuring). Every reader takes the data directory as an argument."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """NEURONSERVE_DATA_DIR, else ../shared/data beside the project."""
    return Path(os.environ.get("NEURONSERVE_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data"))


def alpaca_texts(data_dir: Path) -> list[str]:
    """Instruction plus answer, one text each: the 805 AlpacaEval items, then the 175 seed tasks."""
    texts = []
    items = json.loads((data_dir / "alpaca" / "alpaca_eval_text_davinci_003_outputs.json").read_text())
    texts.extend(f"{item['instruction']}\n\n{item['output']}" for item in items)
    for line in (data_dir / "alpaca" / "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        for instance in task["instances"]:
            prompt = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")
            texts.append(f"{prompt}\n\n{instance['output']}")
    return texts


def wikitext_valid_text(data_dir: Path) -> str:
    """The WikiText-2 validation split (tokenized release), as one string."""
    return (data_dir / "wikitext2" / "wiki.valid.tokens").read_text()


def extraction_texts(data_dir: Path) -> list[str]:
    """The 1000 Pile slices of the extraction benchmark's validation file (extraction/extraction_val.jsonl),
    preprefix + prefix + suffix as one text each (about 200 GPT-2 tokens of web, code and book text)."""
    rows = [json.loads(line) for line in (data_dir / "extraction" / "extraction_val.jsonl").read_text().splitlines()]
    return [row["preprefix"] + row["prefix"] + row["suffix"] for row in rows]


def tweet_rows(data_dir: Path) -> list[dict[str, str]]:
    """Davidson et al. tweets (offensive/labeled_data.csv): one dict per row, with at least the
    columns "tweet" and "class" (0 hate speech, 1 offensive language, 2 neither)."""
    with open(data_dir / "offensive" / "labeled_data.csv", newline="") as f:
        return list(csv.DictReader(f))


def rtp_calibration_lines(data_dir: Path, cls: str) -> list[dict]:
    """The DecodingTrust RealToxicityPrompts calibration file of one class ("toxic" or
    "nontoxic"), one parsed JSON object per line, in file order (line indices define the splits)."""
    return [json.loads(line) for line in (data_dir / "rtp" / f"{cls}.calib.jsonl").read_text().splitlines()]
