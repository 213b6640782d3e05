"""EigenShift gated-mode sweep (issue 5): gate quantile x k x alpha on one reused fit.

Calls server.calibration.eigenshift's own functions (the code path of `neuronserve calibrate
eigenshift`) with the committed profile's fit options (200 + 200 RTP fit prompts, 200 tweets per
class, seed 0), so the fit runs once and the sweep covers gated settings only, on all 120 sweep-part
toxic prompts x 4 samples, with WikiText-2 validation perplexity in 512- and 256-token windows
(the calibration command sweeps scale mode too and uses 256-token windows). The rule is the
calibration's: the least toxic setting within +10% validation perplexity.

  python benchmarks/eigenshift_gate_sweep.py fit                    -> DIR/fit.pt
  python benchmarks/eigenshift_gate_sweep.py sweep NAME SETTING...  -> DIR/rows_NAME.jsonl (SETTING: none | k:alpha:q)
  python benchmarks/eigenshift_gate_sweep.py assemble OUT.json [SETTING...]
        -> the table and the rule's choice as JSON; each SETTING's profile under DIR/profiles/
  python benchmarks/eigenshift_gate_sweep.py diagnose OUT.json
        -> after the choice, never used for it: each setting's perplexity change on validation vs
           TEST text, by position in the window, and how often the gate acts

DIR: $EIGENSHIFT_SWEEP_DIR or benchmarks/out/eigenshift_gate_sweep. Several `sweep` processes may
share one list of settings (each claims a setting with a file). $SWEEP_PROMPTS, $SWEEP_SAMPLES and
$PPL_TOKENS change the sizes (120, 4, 8192).
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

from server.calibration import eigenshift as es
from server.calibration.data import wikitext_valid_text
from server.runtime import load_model
from server.settings import ServerSettings

DIR = Path(os.environ.get("EIGENSHIFT_SWEEP_DIR", PROJECT_ROOT / "benchmarks" / "out" / "eigenshift_gate_sweep"))
SCORING = "matched-std-offensive"
SWEEP_PROMPTS = int(os.environ.get("SWEEP_PROMPTS", "120"))
SWEEP_SAMPLES = int(os.environ.get("SWEEP_SAMPLES", "4"))
PPL_TOKENS = int(os.environ.get("PPL_TOKENS", "8192"))


def config(**kw):
    return es.EigenShiftCalibrationConfig(fit_prompts=200, offensive_per_class=200, sweep_prompts=SWEEP_PROMPTS,
                                          sweep_samples=SWEEP_SAMPLES, seed=0, **kw)


def load():
    return load_model(ServerSettings(model="default", device="cpu", dtype="float32", max_model_len=1024,
                                     wina_profile="none", threads=1))


def fit():
    t0 = time.monotonic()
    loaded = load()
    model, tok = loaded.model, loaded.tokenizer
    cfg = config()
    torch.manual_seed(cfg.seed)
    fitted = es.fit_contrasts(model, tok, cfg, es.load_scorer(cfg.scorer))
    svd, contrast = fitted.svd, fitted.contrasts["matched-offensive"]
    stats = contrast.stats(svd.V)
    ranked = es.component_scores(stats, SCORING).argsort(descending=True)
    DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"U": svd.U, "S": svd.S, "V": svd.V, "toxic": contrast.toxic, "nontoxic": contrast.nontoxic,
                "nontoxic_weight": contrast.nontoxic_weight, "delta": stats["delta"], "ranked": ranked,
                "data": fitted.data,
                "fingerprint": loaded.fingerprint, "name": loaded.name,
                "seconds": round(time.monotonic() - t0, 1)}, DIR / "fit.pt")
    print("fit done", round(time.monotonic() - t0, 1), "s; top-5", ranked[:5].tolist(),
          fitted.data["rtp_fit"]["toxic_continuations"], fitted.data["offensive_fit"])


def load_fit():
    f = torch.load(DIR / "fit.pt")
    svd = es.HeadSVD(f["U"], f["S"], f["V"])
    contrast = es.ContrastSet(f["toxic"], f["nontoxic"], f["nontoxic_weight"])
    return f, svd, contrast


def parse_setting(setting):
    """'k:alpha:q' -> (k, alpha, gate quantile)"""
    k, alpha, q = setting.split(":")
    return int(k), float(alpha), float(q)


def profile_for(f, svd, contrast, k, alpha, q, name=f"{es.PROFILE_NAME}-{SCORING}-gated"):
    return es.make_profile(svd, f["ranked"], k, alpha, name, "gated", contrast, f["delta"], q)


def sweep(tag, settings):
    f, svd, contrast = load_fit()
    loaded = load()
    model, tok = loaded.model, loaded.tokenizer
    cfg = config()
    scorer = es.load_scorer(cfg.scorer)
    prompts = es.rtp_prompts(cfg.data_dir, "sweep", cfg.sweep_prompts)["toxic"]
    ids = es._encode(tok, [t for _, t in prompts])
    gen_config = es.GenerationConfig(cfg.max_new_tokens, cfg.sweep_samples, 1.0, cfg.top_p, cfg.seed + 1, cfg.batch_rows)
    text = wikitext_valid_text(cfg.data_dir)
    wiki512 = es.wikitext_sequences(tok, text, PPL_TOKENS, 512)
    wiki256 = es.wikitext_sequences(tok, text, PPL_TOKENS, 256)
    h512 = es.final_hidden(model, wiki512, progress=False)
    h256 = es.final_hidden(model, wiki256, progress=False)
    out = DIR / f"rows_{tag}.jsonl"
    done = {json.loads(line)["setting"] for line in out.read_text().splitlines()} if out.exists() else set()
    for s in settings:
        if s in done:
            continue
        try:  # a claim file per setting, so that several processes can share one list of settings
            os.close(os.open(DIR / f"claim_{SWEEP_PROMPTS}x{SWEEP_SAMPLES}_{s}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        t0 = time.monotonic()
        if s == "none":
            edit, row = es.RowEdit(), {"scoring": "none", "mode": "scale", "k": 0, "alpha": 1.0, "gate_quantile": None}
        else:
            k, alpha, q = parse_setting(s)
            p = profile_for(f, svd, contrast, k, alpha, q)
            edit = es.RowEdit(f"{SCORING} gated", p, alpha)
            row = {"scoring": SCORING, "mode": "gated", "k": k, "alpha": alpha, "gate_quantile": q}
        gens = es.generate(model, tok, ids, gen_config, edit, progress=False)
        tox = es.toxicity_of(gens, scorer, cfg.sweep_samples)
        row.update(setting=s, toxicity_rate=round(tox.rate, 4), flagged=round(tox.rate * tox.continuations),
                   continuations=tox.continuations, expected_max_toxicity=round(tox.expected_max, 4),
                   fluency_ppl=round(tox.fluency_ppl, 2),
                   wikitext_valid_ppl_512=round(es.perplexity_from_hidden(model, h512, wiki512, edit), 3),
                   wikitext_valid_ppl_256=round(es.perplexity_from_hidden(model, h256, wiki256, edit), 3),
                   seconds=round(time.monotonic() - t0, 1))
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def assemble(out_json, max_inc=0.10):
    rows = [json.loads(line) for p in sorted(DIR.glob("rows_*.jsonl")) for line in p.read_text().splitlines()]
    rows = list({r["setting"]: r for r in rows}.values())
    base = next(r for r in rows if r["setting"] == "none")
    rows.sort(key=lambda r: (r["k"], r["alpha"], -(r["gate_quantile"] or 2)))
    for r in rows:
        n = r["continuations"]
        r["toxicity_se"] = round(math.sqrt(r["toxicity_rate"] * (1 - r["toxicity_rate"]) / n), 4)
        r["ppl_change_512"] = round(r["wikitext_valid_ppl_512"] / base["wikitext_valid_ppl_512"] - 1, 4)
        r["ppl_change_256"] = round(r["wikitext_valid_ppl_256"] / base["wikitext_valid_ppl_256"] - 1, 4)
        r["toxicity_reduction"] = round(1 - r["toxicity_rate"] / base["toxicity_rate"], 4)
    allowed = [r for r in rows if r["setting"] != "none" and r["ppl_change_512"] <= max_inc]
    chosen = min(allowed, key=lambda r: (r["toxicity_rate"], r["wikitext_valid_ppl_512"]))
    f = load_fit()[0]
    cfg = config()
    report = {
        "what": "EigenShift gated-mode sweep (issue 5): gate quantile x k x alpha, matched-std-offensive scoring, "
                "one fit reused (same functions and fit options as the committed calibration)",
        "fit": {**f["data"], "fit_prompts_per_class": 200, "offensive_per_class": 200, "seed": 0,
                "top5_components": f["ranked"][:5].tolist(), "fit_seconds": f["seconds"]},
        "sweep_data": {**es.describe_split({"toxic": es.rtp_prompts(cfg.data_dir, "sweep", SWEEP_PROMPTS)["toxic"]}, "sweep"),
                       "samples_per_prompt": SWEEP_SAMPLES, "temperature": 1.0, "top_p": cfg.top_p,
                       "max_new_tokens": cfg.max_new_tokens, "generation_seed": cfg.seed + 1},
        "perplexity": {"source": "wikitext2/wiki.valid.tokens", "tokens": PPL_TOKENS, "windows": [512, 256],
                       "rule_uses": 512},
        "rule": f"least toxic sweep setting with WikiText-2 validation perplexity (512-token windows) up by at most "
                f"{max_inc:.0%} (ties: lower perplexity)",
        "se_note": "toxicity_se: binomial sqrt(p(1-p)/n) over continuations; ignores within-prompt correlation of the samples",
        "chosen": chosen, "rows": rows}
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    hdr = "| scoring | mode | k | alpha | gate q | toxicity rate (flagged/n) | SE | EMT | valid ppl 512 | change | valid ppl 256 | change | fluency ppl |"
    print(hdr)
    print("|" + "---|" * 13)
    for r in rows:
        print(f"| {r['scoring']} | {r['mode']} | {r['k']} | {r['alpha']} | {r['gate_quantile']} | "
              f"{100 * r['toxicity_rate']:.1f}% ({r['flagged']}/{r['continuations']}) | {100 * r['toxicity_se']:.1f} | "
              f"{r['expected_max_toxicity']:.3f} | {r['wikitext_valid_ppl_512']:.2f} | {100 * r['ppl_change_512']:+.1f}% | "
              f"{r['wikitext_valid_ppl_256']:.2f} | {100 * r['ppl_change_256']:+.1f}% | {r['fluency_ppl']:.1f} |")
    print("chosen:", chosen["setting"])
    return report


def write_candidate(report, setting, path):
    f, svd, contrast = load_fit()
    k, alpha, q = parse_setting(setting)
    p = profile_for(f, svd, contrast, k, alpha, q, name=es.PROFILE_NAME)
    sweep_rows = [{"scoring": r["scoring"], "mode": r["mode"], "k": r["k"], "alpha": r["alpha"],
                   "gate_quantile": r["gate_quantile"], "toxicity_rate": r["toxicity_rate"],
                   "expected_max_toxicity": r["expected_max_toxicity"], "fluency_ppl": r["fluency_ppl"],
                   "wikitext_valid_ppl": r["wikitext_valid_ppl_512"], "ppl_change": r["ppl_change_512"],
                   "toxicity_reduction": r["toxicity_reduction"]} for r in report["rows"]]
    chosen = next(r for r in sweep_rows if (r["k"], r["alpha"], r["gate_quantile"]) == (k, alpha, q))
    cfg = config()
    es.save_eigenshift_profile(
        Path(path), p, model_fingerprint=f["fingerprint"], model_name=f["name"],
        parameters={"scoring": SCORING, "gate_quantile": q, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                    "projection": "h @ V (V^T h), not the published reconstruct.py's V h"},
        data={"rtp_fit": f["data"]["rtp_fit"], "offensive_fit": f["data"]["offensive_fit"],
              "scorer": f["data"]["scorer"], "scorer_threshold": f["data"]["scorer_threshold"],
              "sweep": report["sweep_data"], "perplexity": report["perplexity"]},
        quality={"chosen": chosen, "rule": report["rule"], "sweep": sweep_rows})
    print("wrote", path)


@torch.inference_mode()
def diagnose(out_json):
    """After the choice, never used for it: each swept setting's perplexity change on WikiText-2
    validation and TEST text (first PPL_TOKENS tokens, 512-token windows), the extra NLL by position
    in the window (128-token buckets), the worst window, and the share of positions the gate acts on."""
    f, svd, contrast = load_fit()
    loaded = load()
    model, tok = loaded.model, loaded.tokenizer
    data_dir = config().data_dir
    texts = {"valid": wikitext_valid_text(data_dir), "test": (data_dir / "wikitext2" / "wiki.test.tokens").read_text()}
    sequences = {name: es.wikitext_sequences(tok, text, PPL_TOKENS, 512) for name, text in texts.items()}
    hidden = {name: es.final_hidden(model, seq, progress=False) for name, seq in sequences.items()}
    base = {name: es.token_nll_from_hidden(model, hidden[name], sequences[name], es.RowEdit()) for name in sequences}
    settings = {json.loads(line)["setting"] for p in DIR.glob("rows_*.jsonl") for line in p.read_text().splitlines()}
    rows = []
    for setting in sorted(settings - {"none"}):
        k, alpha, q = parse_setting(setting)
        profile = profile_for(f, svd, contrast, k, alpha, q)
        edit = es.RowEdit("gated", profile, alpha)
        row = {"setting": setting}
        for name, seq in sequences.items():
            extra = es.token_nll_from_hidden(model, hidden[name], seq, edit) - base[name]  # [windows, L - 1]
            row[f"{name}_ppl_change"] = round(float(torch.exp(extra.mean()) - 1), 4)
            row[f"{name}_extra_nll_by_pos"] = [round(float(extra[:, i:i + 128].mean()), 4) for i in range(0, 511, 128)]
            row[f"{name}_worst_window_ppl_change"] = round(float(torch.exp(extra.mean(1)).max() - 1), 4)
            proj = profile.projection(hidden[name][:, :-1].reshape(-1, hidden[name].shape[-1]))
            row[f"{name}_rows_gated_share"] = round(float((proj != 0).any(-1).float().mean()), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(out_json).write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("fit", "sweep", "assemble", "diagnose") or (argv[0] != "fit" and len(argv) < 2):
        print(__doc__)
        return 2
    if argv[0] == "fit":
        fit()
    elif argv[0] == "sweep":
        sweep(argv[1], argv[2:])
    elif argv[0] == "diagnose":
        diagnose(argv[1])
    else:
        report = assemble(argv[1])
        for s in argv[2:]:
            write_candidate(report, s, DIR / "profiles" / f"eigenshift-toxicity-gated-{s.replace(':', '_')}.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
