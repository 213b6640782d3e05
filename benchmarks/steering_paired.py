"""Paired comparison of two `steering_eval.py` reports that differ in one setting (e.g. --positions).

Both reports must share every other setting, so that cell (concept, method, strength) and prompt
i of one match those of the other: same prompts, seeds and concept features. Per method and
strength, over every concept and prompt:

* word rate in each report, and the mean paired difference (second - first) with its standard
  error, treating generations as independent (the same prompts repeat across concepts, so it is
  somewhat optimistic);
* discordant pairs (on-topic in only one report) and the two-sided sign test on them;
* the reports' own geometric-mean perplexity, and in how many concepts the second is lower.

A generation is on-topic when its text matches one of the concept's words, as in steering_eval.py.

    python benchmarks/steering_paired.py FIRST.json SECOND.json [--out benchmarks/results/NAME.json]

Prints the table; --out also writes every row as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench_common import command_line, format_table, write_report
from steering_eval import concept_pattern

SETTING_THAT_MAY_DIFFER = ("positions",)


def on_topic(report: dict, cell: dict) -> list[bool]:
    pattern = concept_pattern(report["concepts"][cell["concept"]]["words"])
    return [bool(pattern.search(g["text"])) for g in cell["generations"]]


def sign_test(first_only: int, second_only: int) -> float:
    """Two-sided exact sign test on the discordant pairs."""
    n = first_only + second_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(first_only, second_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def aggregate(report: dict, method: str, strength: float) -> dict:
    """The report's own row for (method, strength): word rate, geometric-mean perplexity, ..."""
    return next(t for t in report["aggregate"]["by_method_strength"]
                if t["method"] == method and t["strength_rel"] == strength)


def compare(first: dict, second: dict) -> list[dict[str, Any]]:
    shared = {k: v for k, v in first["config"].items() if k not in SETTING_THAT_MAY_DIFFER}
    if shared != {k: v for k, v in second["config"].items() if k not in SETTING_THAT_MAY_DIFFER}:
        raise SystemExit("the reports differ in more than " + ", ".join(SETTING_THAT_MAY_DIFFER))

    def key(cell: dict) -> tuple:
        return cell["concept"], cell["method"], cell["strength_rel"]

    second_cells = {key(c): c for c in second["cells"]}
    rows = []
    for method in first["config"]["methods"]:
        for strength in first["config"]["strengths"]:
            cells = [c for c in first["cells"] if c["method"] == method and c["strength_rel"] == strength]
            diffs, first_only, second_only, lower = [], 0, 0, 0
            for cell in cells:
                other = second_cells[key(cell)]
                for a, b in zip(on_topic(first, cell), on_topic(second, other), strict=True):
                    diffs.append(int(b) - int(a))
                    first_only += a and not b
                    second_only += b and not a
                lower += other["perplexity"] < cell["perplexity"]
            n = len(diffs)
            mean = sum(diffs) / n
            se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
            a, b = (aggregate(report, method, strength) for report in (first, second))
            rows.append({
                "method": method, "strength_rel": strength, "pairs": n,
                "word_rate_first": a["word_rate"], "word_rate_second": b["word_rate"],
                "difference": mean, "difference_se": se, "first_only": first_only, "second_only": second_only,
                "sign_test_p": sign_test(first_only, second_only),
                "perplexity_first": a["perplexity"], "perplexity_second": b["perplexity"],
                "concepts_second_lower_perplexity": lower, "concepts": len(cells),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = parser.parse_args(argv)
    first, second = (json.loads(p.read_text()) for p in (args.first, args.second))
    rows = compare(first, second)
    labels = [", ".join(f"{k} {r['config'].get(k)}" for k in SETTING_THAT_MAY_DIFFER) for r in (first, second)]
    table = format_table(
        ["method", "r", "word rate 1", "word rate 2", "diff (SE)", "only 1 / only 2", "sign p", "ppl 1", "ppl 2",
         "concepts ppl 2 < 1"],
        [[r["method"], f"{r['strength_rel']:g}", f"{r['word_rate_first']:.3f}", f"{r['word_rate_second']:.3f}",
          f"{r['difference']:+.3f} ({r['difference_se']:.3f})", f"{r['first_only']} / {r['second_only']}",
          f"{r['sign_test_p']:.2g}", f"{r['perplexity_first']:.2f}", f"{r['perplexity_second']:.2f}",
          f"{r['concepts_second_lower_perplexity']}/{r['concepts']}"] for r in rows])
    text = (f"1 = {args.first.name} ({labels[0]}); 2 = {args.second.name} ({labels[1]}); "
            f"{rows[0]['pairs'] if rows else 0} paired generations per row\n\n{table}")
    if args.out is None:
        print(text)
        return 0
    write_report({"benchmark": "steering_paired", "command": command_line(argv), "first": str(args.first),
                  "second": str(args.second), "rows": rows}, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
