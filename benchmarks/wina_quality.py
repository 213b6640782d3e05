#!/usr/bin/env python3
"""Model quality under WINA vs TEAL sparsity: WikiText-2 perplexity and zero-shot accuracy on
ARC-Easy, PIQA and LAMBADA, per sparsity profile and target sparsity.

The model is the served one, loaded as the server loads it (``load_model(ServerSettings(
wina_profile="none", max_model_len=1024))``: SmolLM2-135M-Instruct, float16 on CPU by default).
For each profile ``server/default_profiles/smollm2-135m-instruct/wina-<criterion>-<allocation>.safetensors``
(criterion wina | teal | wina_official, allocation uniform | greedy) its thresholds are attached with
``model.attach_sparsity(WinaTable(...), None)`` (no CPU kernel: the masked dense path, which gives
the same numbers as the kernel and is what any prefill of more than a few tokens uses anyway), and
every request of the configuration runs at the one target sparsity through
``model.sparsity_plan([target] * B, T)``. Sparsity 0 takes the plain dense path and is computed
once (it is the same model for every profile).

Tasks (lm-evaluation-harness conventions, no BOS token, as lm-eval's HF backend does for this
tokenizer; a continuation is scored on the tokens of tokenize(context + continuation) after those of
tokenize(context)):

* WikiText-2 perplexity: the TEST split, by default ``wikitext2/wiki.test.raw.nonblank-crlf`` (the
  raw text, CRLF converted to LF; see that folder's SOURCE.txt: it is the HF wikitext-2-raw-v1 test
  rows with the blank rows dropped) tokenized as a whole, the first ``--wikitext-tokens`` tokens cut
  into non-overlapping ``--window``-token windows; every window is scored on its tokens 2..W (the
  first token of a window has no context). ppl = exp(total NLL / scored tokens).
* ARC-Easy (test, 2376 items): "Question: {q}\\nAnswer:" + " {choice}"; acc = argmax of the
  summed log-likelihood, acc_norm = argmax of log-likelihood / len(choice in characters).
* PIQA (validation, 1838 items): "Question: {goal}\\nAnswer:" + " {sol}"; acc and acc_norm as above.
* LAMBADA (OpenAI version, 5153 items): context + " {last word}"; acc = the greedy (argmax) tokens
  equal the last word's tokens at every position, ppl = exp(-mean over items of the word's
  log-likelihood) (lm-eval's lambada_openai metrics).

Zero-shot tasks use a seeded random subset of ``--items`` items per task (the same items for every
configuration). An item's context runs once; its keys/values are copied to one cache slot per
choice and the choices run after it (the numbers of context + choice in one sequence, up to float
rounding). Rows are batched by length and right-padded (with causal attention the padding never
reaches a real token); only the continuation positions go through the LM head. "achieved sparsity"
is the mean over every real (non-padding) token processed of the share of the projections' weights
its inputs did not need (``SparsityPlan.skipped_fraction``'s measure).

Default sizes (16,384 WikiText tokens, 120 items per task) keep the 17 configurations (dense + 4
profiles x 4 targets) near 40 minutes on a 2-core CPU; raise them for tighter numbers (the run time
grows linearly). At sparsity > 0 the masks make the model sensitive to float rounding: a token's
log-probabilities can move by whole nats when the same text runs in a forward of another length
(a mask flips near its threshold and the change grows through the layers), so single items differ
between batchings; the aggregates are what to read. Results are deterministic for given options.

    python benchmarks/wina_quality.py [--sparsities 0 0.25 0.4 0.5 0.65]
        [--profiles wina-uniform teal-uniform wina-greedy teal-greedy] [--wikitext-tokens 16384]
        [--window 512] [--items 120] [--seed 1234] [--threads auto] [--out benchmarks/out]

Writes ``wina_quality.json`` (command line, machine, settings, every number), ``wina_quality.txt``
(the tables) and ``wina_quality.png`` (4 panels vs sparsity) to ``--out``. Nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import describe_machine, fmt as _fmt, format_table as _table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "out"
DEFAULT_PROFILE_DIR = PROJECT_ROOT / "server" / "default_profiles" / "smollm2-135m-instruct"
DEFAULT_PROFILES = ("wina-uniform", "teal-uniform", "wina-greedy", "teal-greedy")
DEFAULT_SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65)
MAX_MODEL_LEN = 1024
TASKS = ("wikitext2", "arc_easy", "piqa", "lambada")
WIKITEXT_FILES = {"raw": "wiki.test.raw.nonblank-crlf", "tokens": "wiki.test.tokens"}
DENSE = "dense"


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _stderr_acc(p: float, n: int) -> float:
    """lm-eval's standard error of a mean of 0/1 outcomes."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


# --------------------------------------------------------------------------- data


@dataclass
class Request:
    """One scored continuation: the model sees (context + continuation)[:-1]; the log-likelihood
    is summed over the continuation's tokens."""

    context: list[int]
    continuation: list[int]

    @property
    def input_ids(self) -> list[int]:
        return (self.context + self.continuation)[:-1]


def encode_pair(tokenizer: Any, context: str, continuation: str, max_len: int) -> Request:
    """lm-eval's HFLM._encode_pair: trailing spaces of the context move to the continuation; the
    context's tokens are tokenize(context) (so every choice of an item shares them) and the
    continuation's are those of tokenize(context + continuation) after the first len(context tokens).
    Left-truncated to fit max_len input tokens, as lm-eval does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = list(tokenizer(context, add_special_tokens=False).input_ids)
    cont = list(whole[len(ctx):])
    if not cont:
        raise ValueError(f"empty continuation for {continuation!r}")
    if len(ctx) + len(cont) - 1 > max_len:
        ctx = ctx[len(ctx) + len(cont) - 1 - max_len:]
    return Request(ctx, cont)


def _subset(n: int, k: int, seed: int, task: str) -> list[int]:
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted(random.Random(f"{seed}-{task}").sample(range(n), k))


def load_tasks(data_dir: Path, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every task's items, tokenized once: wikitext windows, and per zero-shot item its requests."""
    tasks: dict[str, Any] = {}

    # WikiText-2 test
    wt_path = data_dir / "wikitext2" / WIKITEXT_FILES[args.wikitext_file]
    text = wt_path.read_text(encoding="utf-8")
    if args.wikitext_file == "raw":
        text = text.replace("\r\n", "\n")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    n_windows = min(args.wikitext_tokens, len(ids)) // args.window
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(n_windows)]
    tasks["wikitext2"] = {
        "file": str(wt_path),
        "file_choice": args.wikitext_file,
        "preprocessing": "CRLF -> LF, tokenized as one text without BOS" if args.wikitext_file == "raw"
        else "tokenized as one text without BOS (the <unk> markers are left as text)",
        "text_tokens_total": len(ids),
        "windows": windows,
        "window": args.window,
        "scored_tokens": n_windows * (args.window - 1),
    }

    zs = data_dir / "zeroshot"
    # ARC-Easy: llm-foundry's copy, query already "Question: ..."
    arc = [json.loads(line) for line in (zs / "arc_easy.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    pick = _subset(len(arc), args.items, args.seed, "arc_easy")
    items = []
    for i in pick:
        doc = arc[i]
        context = doc["query"] + "\nAnswer:"
        items.append({
            "index": i, "gold": int(doc["gold"]),
            "choice_chars": [len(c) for c in doc["choices"]],
            "requests": [encode_pair(tokenizer, context, " " + c, MAX_MODEL_LEN) for c in doc["choices"]],
        })
    tasks["arc_easy"] = {"file": str(zs / "arc_easy.jsonl"), "total_items": len(arc), "items": items}

    # PIQA validation
    piqa = [json.loads(line) for line in (zs / "piqa_valid.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [int(x) for x in (zs / "piqa_valid-labels.lst").read_text().split()]
    if len(labels) != len(piqa):
        raise SystemExit(f"PIQA: {len(piqa)} items but {len(labels)} labels")
    pick = _subset(len(piqa), args.items, args.seed, "piqa")
    items = []
    for i in pick:
        doc = piqa[i]
        context = f"Question: {doc['goal']}\nAnswer:"
        sols = [doc["sol1"], doc["sol2"]]
        items.append({
            "index": i, "gold": labels[i], "choice_chars": [len(s) for s in sols],
            "requests": [encode_pair(tokenizer, context, " " + s, MAX_MODEL_LEN) for s in sols],
        })
    tasks["piqa"] = {"file": str(zs / "piqa_valid.jsonl"), "total_items": len(piqa), "items": items}

    # LAMBADA (OpenAI): llm-foundry's {context, continuation}; the target is " " + last word
    lam = [json.loads(line) for line in (zs / "lambada_openai.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    pick = _subset(len(lam), args.items, args.seed, "lambada")
    items = []
    for i in pick:
        doc = lam[i]
        items.append({"index": i, "requests": [encode_pair(tokenizer, doc["context"].rstrip(" "),
                                                            " " + doc["continuation"].strip(), MAX_MODEL_LEN)]})
    tasks["lambada"] = {"file": str(zs / "lambada_openai.jsonl"), "total_items": len(lam), "items": items}
    return tasks


# --------------------------------------------------------------------------- scoring


class _HiddenOut:
    """While active, the model's LM head is an identity, so `model(...)` returns the final-normed
    hidden states [B, T, hidden] (float32); the real head is applied to the positions we need."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        self.head = model.head
        self.identity = torch.nn.Identity()

    def __enter__(self) -> Any:
        self.model.head = self.identity
        return self.head

    def __exit__(self, *exc: Any) -> None:
        self.model.head = self.head


class ThreadGovernor:
    """--threads auto: this machine is shared, and torch's OpenMP pool with one thread per core
    slows down several-fold when another process takes a core (its threads wait on each other).
    Every few seconds the CPU time used by other processes is read from /proc; while they use
    more than half a core we compute on one thread fewer. The numbers do not change: the float32
    GEMMs give bit-identical results on 1 and 2 threads (checked on this model)."""

    INTERVAL_S = 3.0

    def __init__(self, fixed: int | None) -> None:
        import os

        import torch

        self.torch = torch
        self.fixed = fixed
        self.max_threads = fixed or torch.get_num_threads()
        self.hz = os.sysconf("SC_CLK_TCK")
        self.switches = 0
        self.seconds_at: dict[int, float] = {}
        self.current = torch.get_num_threads()
        self.enabled = fixed is None and self.max_threads > 1 and self._sample() is not None
        self.last = self._sample() if self.enabled else None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                parts = [int(x) for x in fh.readline().split()[1:]]
            with open("/proc/self/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(parts[:3]) + sum(parts[5:8])  # user nice system, irq softirq steal
        return time.monotonic(), float(busy), float(int(fields[11]) + int(fields[12]))  # utime + stime

    def tick(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last[0] < self.INTERVAL_S:
            return
        sample = self._sample()
        if sample is None:
            return
        wall = sample[0] - self.last[0]
        others = ((sample[1] - self.last[1]) - (sample[2] - self.last[2])) / self.hz / wall  # cores
        self.seconds_at[self.current] = self.seconds_at.get(self.current, 0.0) + wall
        self.last = sample
        want = max(1, self.max_threads - 1) if others > 0.5 else self.max_threads
        if want != self.current:
            self.torch.set_num_threads(want)
            self.current = want
            self.switches += 1

    def summary(self) -> dict[str, Any]:
        return {"mode": "fixed" if self.fixed else ("auto" if self.enabled else "torch default"),
                "max_threads": self.max_threads, "switches": self.switches,
                "seconds_at_threads": {str(k): round(v, 1) for k, v in sorted(self.seconds_at.items())}}


class Scorer:
    """Runs the forwards of one configuration (one target sparsity) and accumulates the achieved
    sparsity over the real (non-padding) tokens. Each forward gets its own KV cache sized to the
    batch (the model's new_cache would allocate max_model_len positions per slot)."""

    def __init__(self, model: Any, target: float, batch_tokens: int, pad_id: int,
                 governor: ThreadGovernor | None = None) -> None:
        self.model = model
        self.governor = governor
        self.target = target
        self.batch_tokens = batch_tokens
        self.pad_id = pad_id
        self.skipped_sum = 0.0  # sum over real tokens of their skipped weight fraction
        self.tokens = 0
        self.forward_seconds = 0.0

    def new_cache(self, slots: int, length: int) -> Any:
        from server.model.kv_cache import KVCache

        c, model = self.model.config, self.model
        return KVCache(c.num_layers, slots, length, c.num_kv_heads, c.head_dim, model.kv_dtype, model.device)

    def forward(self, rows: list[list[int]], cache: Any, slots: list[int], starts: list[int]) -> Any:
        """rows right-padded to one length T, row b written at starts[b] in slot slots[b] ->
        final-normed hidden states [B, T, hidden] float32 (the LM head is applied by the caller).
        Right padding is harmless: under causal masking no real token sees a later position."""
        import torch

        B, T = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        real = torch.zeros(B, T, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            real[b, :len(r)] = True
        model = self.model
        if self.governor is not None:
            self.governor.tick()
        plan = model.sparsity_plan([self.target] * B, T)
        t0 = time.perf_counter()
        with _HiddenOut(model):
            hidden = model(ids, torch.tensor(slots, dtype=torch.long), torch.tensor(starts, dtype=torch.long),
                           cache, all_logits=True, sparsity=plan)
        self.forward_seconds += time.perf_counter() - t0
        if plan is not None:
            L = plan.kept.shape[0]
            read = (plan.kept.float() * plan.weight_sizes).sum(dim=(0, 2))  # [B*T]
            per_token = 1.0 - read / (L * plan.layer_weight_total)
            self.skipped_sum += float(per_token[real.reshape(-1)].sum())
        self.tokens += int(real.sum())
        return hidden

    def _logprobs(self, hidden: Any) -> Any:
        import torch

        return torch.log_softmax(self.model.head.forward(hidden).float(), dim=-1)

    def _chunks(self, order: list[int], length: Any, width: Any) -> list[list[int]]:
        """`order` (sorted by length, longest first) cut into runs whose padded size
        (sum of width) x (longest length) stays within batch_tokens; a run also ends where the rows
        get much shorter than its longest once it holds batch_tokens / 2 padded tokens (padding costs)."""
        chunks: list[list[int]] = []
        cur: list[int] = []
        rows = 0
        for i in order:
            longest = length(cur[0]) if cur else 0
            if cur and ((rows + width(i)) * longest > self.batch_tokens
                        or (length(i) < 0.8 * longest and 2 * rows * longest >= self.batch_tokens)):
                chunks.append(cur)
                cur, rows = [], 0
            cur.append(i)
            rows += width(i)
        if cur:
            chunks.append(cur)
        return chunks

    def score_groups(self, groups: list[list[Request]], progress: Any) -> list[list[tuple[float, bool]]]:
        """Each group's requests share one context (the choices of an item). Groups are taken in
        order of context length, as many at a time as fit a KV cache of cache_budget positions;
        their contexts run once each (in chunks of similar length), each context's keys/values are
        copied to one slot per choice, and then the choices' tokens run after their contexts (in
        chunks of similar continuation length, so little padding is computed). -> per group, per
        request: (sum of the continuation's log-probs, every continuation token is the argmax)."""
        import torch

        for grp in groups:
            if any(r.context != grp[0].context for r in grp):
                raise ValueError("requests of a group must share their context")
        out: list[list[tuple[float, bool]]] = [[] for _ in groups]
        order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0].context))
        cache_budget = 8 * self.batch_tokens  # positions x slots of one KV cache
        start = 0
        while start < len(order):
            # one super-batch: groups order[start:end], one cache
            end, n_rows, ctx_max, cont_max = start, 0, 0, 0
            while end < len(order):
                grp = groups[order[end]]
                new_rows = n_rows + len(grp)
                new_len = max(ctx_max, len(grp[0].context)) + max(cont_max, *(len(r.continuation) - 1 for r in grp))
                if end > start and new_rows * new_len > cache_budget:
                    break
                n_rows, ctx_max = new_rows, max(ctx_max, len(grp[0].context))
                cont_max = max(cont_max, *(len(r.continuation) - 1 for r in grp))
                end += 1
            batch = order[start:end]
            start = end
            cache = self.new_cache(n_rows, ctx_max + cont_max)
            first_slot, slot = [], 0
            for g in batch:
                first_slot.append(slot)
                slot += len(groups[g])
            contexts = [groups[g][0].context for g in batch]
            # 1. the contexts (already longest first), one row per group, into its first slot
            first_lp: list[Any] = [None] * len(batch)
            for chunk in self._chunks(list(range(len(batch))), lambda b: len(contexts[b]), lambda b: 1):
                hidden = self.forward([contexts[b] for b in chunk], cache, [first_slot[b] for b in chunk],
                                      [0] * len(chunk))
                last = torch.stack([hidden[k, len(contexts[b]) - 1] for k, b in enumerate(chunk)])
                lp = self._logprobs(last)  # predicts every choice's first token
                for k, b in enumerate(chunk):
                    first = torch.tensor([r.continuation[0] for r in groups[batch[b]]], dtype=torch.long)
                    first_lp[b] = (lp[k, first].tolist(), (lp[k].argmax() == first).tolist())
            # 2. copy each context's keys/values to its other choices' slots
            for b, g in enumerate(batch):
                n, s0 = len(contexts[b]), first_slot[b]
                for j in range(1, len(groups[g])):
                    cache.keys[:, s0 + j, :, :n] = cache.keys[:, s0, :, :n]
                    cache.values[:, s0 + j, :, :n] = cache.values[:, s0, :, :n]
            # 3. every choice's tokens but its last, after its context, longest first
            owners = [(b, j) for b, g in enumerate(batch) for j, r in enumerate(groups[g])
                      if len(r.continuation) > 1]
            owners.sort(key=lambda o: -len(groups[batch[o[0]]][o[1]].continuation))
            rest: dict[tuple[int, int], Any] = {}
            cont = lambda o: groups[batch[o[0]]][o[1]].continuation  # noqa: E731
            for chunk in self._chunks(list(range(len(owners))), lambda i: len(cont(owners[i])) - 1, lambda i: 1):
                hidden = self.forward([cont(owners[i])[:-1] for i in chunk], cache,
                                      [first_slot[owners[i][0]] + owners[i][1] for i in chunk],
                                      [len(contexts[owners[i][0]]) for i in chunk])
                # one LM head call for the chunk: every row's continuation positions, concatenated
                lengths = [len(cont(owners[i])) - 1 for i in chunk]
                lp = self._logprobs(torch.cat([hidden[k, :n] for k, n in enumerate(lengths)]))  # [sum n, V]
                target = torch.tensor([t for i in chunk for t in cont(owners[i])[1:]], dtype=torch.long)
                token_ll = lp.gather(1, target.unsqueeze(1)).squeeze(1)
                hit = lp.argmax(dim=-1) == target
                offset = 0
                for i, n in zip(chunk, lengths):
                    rest[owners[i]] = (float(token_ll[offset:offset + n].sum()), bool(hit[offset:offset + n].all()))
                    offset += n
            for b, g in enumerate(batch):
                lls, greedies = first_lp[b]
                for j, r in enumerate(groups[g]):
                    ll, greedy = lls[j], greedies[j]
                    if len(r.continuation) > 1:
                        ll += rest[(b, j)][0]
                        greedy = greedy and rest[(b, j)][1]
                    out[g].append((float(ll), bool(greedy)))
            progress.update(sum(len(groups[g]) for g in batch))
        return out

    def perplexity(self, windows: list[list[int]], progress: Any) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        nll, count = 0.0, 0
        per_row = 1  # batch 1: plain causal attention, the fastest path for long rows
        for start in range(0, len(windows), per_row):
            rows = windows[start:start + per_row]
            cache = self.new_cache(len(rows), max(len(w) for w in rows))
            hidden = self.forward(rows, cache, list(range(len(rows))), [0] * len(rows))
            for b, w in enumerate(rows):
                logits = self.model.head.forward(hidden[b, :len(w) - 1]).float()
                target = torch.tensor(w[1:], dtype=torch.long)
                nll += float(F.cross_entropy(logits, target, reduction="sum"))
                count += len(w) - 1
            progress.update(len(rows))
        return {"ppl": math.exp(nll / count) if count else float("nan"), "nll_sum": nll, "scored_tokens": count}

    @property
    def achieved(self) -> float | None:
        if self.target <= 0:
            return 0.0
        return self.skipped_sum / self.tokens if self.tokens else None


def _multiple_choice(scorer: Scorer, items: list[dict[str, Any]], progress: Any) -> dict[str, Any]:
    scores = scorer.score_groups([it["requests"] for it in items], progress)
    correct = correct_norm = 0
    for it, sc in zip(items, scores):
        lls = [ll for ll, _ in sc]
        n = len(lls)
        pred = max(range(n), key=lambda j: lls[j])
        pred_norm = max(range(n), key=lambda j: lls[j] / it["choice_chars"][j])
        correct += pred == it["gold"]
        correct_norm += pred_norm == it["gold"]
    n = len(items)
    acc, acc_norm = correct / n, correct_norm / n
    return {"acc": acc, "acc_stderr": _stderr_acc(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": _stderr_acc(acc_norm, n), "items": n}


def _lambada(scorer: Scorer, items: list[dict[str, Any]], progress: Any) -> dict[str, Any]:
    scores = [sc[0] for sc in scorer.score_groups([it["requests"] for it in items], progress)]
    n = len(items)
    acc = sum(g for _, g in scores) / n
    return {"acc": acc, "acc_stderr": _stderr_acc(acc, n), "ppl": math.exp(-sum(ll for ll, _ in scores) / n),
            "items": n}


def evaluate(model: Any, target: float, tasks: dict[str, Any], args: argparse.Namespace, label: str,
             pad_id: int, governor: ThreadGovernor | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    scorer = Scorer(model, target, args.batch_tokens, pad_id, governor)
    result: dict[str, Any] = {"target_sparsity": target}
    t0 = time.perf_counter()
    tqdm_kw = {"file": sys.stderr, "mininterval": 10.0, "dynamic_ncols": True, "leave": True}
    wt = tasks["wikitext2"]
    with tqdm(total=len(wt["windows"]), desc=f"{label} wikitext2", unit="win", **tqdm_kw) as bar:
        result["wikitext2"] = scorer.perplexity(wt["windows"], bar)
    for name in ("arc_easy", "piqa"):
        items = tasks[name]["items"]
        with tqdm(total=sum(len(it["requests"]) for it in items), desc=f"{label} {name}", unit="seq",
                  **tqdm_kw) as bar:
            result[name] = _multiple_choice(scorer, items, bar)
    items = tasks["lambada"]["items"]
    with tqdm(total=len(items), desc=f"{label} lambada", unit="seq", **tqdm_kw) as bar:
        result["lambada"] = _lambada(scorer, items, bar)
    result["achieved_sparsity"] = scorer.achieved
    result["tokens_processed"] = scorer.tokens
    result["forward_seconds"] = scorer.forward_seconds
    result["seconds"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- report


def _rows_for(report: dict[str, Any], profile: str) -> list[dict[str, Any]]:
    """The profile's results by ascending target; sparsity 0 is the shared dense run."""
    rows = []
    for s in report["settings"]["sparsities"]:
        r = report["results"][DENSE] if s == 0 else report["results"].get(profile, {}).get(_key(s))
        if r is not None:
            rows.append(r)
    return rows


def _key(s: float) -> str:
    return f"{s:g}"


def format_report(report: dict[str, Any]) -> str:
    st = report["settings"]
    m = report["machine"]
    wt = report["data"]["wikitext2"]
    lines = [
        f"WINA vs TEAL quality benchmark  {report['started_utc']}  {m['cpu_model_name'] or m['processor']}  "
        f"torch {m['torch_version']} threads={m['torch_threads']}",
        f"model {report['model']['name']} ({report['model']['dtype']}, {report['model']['device']}), "
        f"fingerprint {report['model']['fingerprint']}; masked dense sparse path (no CPU kernel)",
        f"WikiText-2 test ({Path(wt['file']).name}, {wt['preprocessing']}): first {wt['tokens_used']} of "
        f"{wt['text_tokens_total']} tokens, {wt['windows']} non-overlapping {st['window']}-token windows, "
        f"{wt['scored_tokens']} scored tokens",
        "zero-shot: seeded random subsets (seed {seed}), same items for every configuration: {sizes}".format(
            seed=st["seed"], sizes=", ".join(f"{k} {v['items']}/{v['total_items']}" for k, v in report["data"].items()
                                             if k != "wikitext2")),
        f"command: {report['command']}",
        f"wall time {report['wall_seconds'] / 60:.1f} min; torch threads: {report['threads']['mode']}, at most "
        f"{report['threads']['max_threads']}, seconds at each count {report['threads']['seconds_at_threads']}",
        "",
    ]
    headers = ["profile", "target", "achieved", "wiki ppl", "ARC-E acc", "ARC-E norm", "PIQA acc", "PIQA norm",
               "LAMBADA acc", "LAMBADA ppl"]
    rows = []
    for profile in st["profiles"]:
        for r in _rows_for(report, profile):
            rows.append([
                profile, f"{r['target_sparsity']:.2f}", _fmt(r["achieved_sparsity"], 3),
                _fmt(r["wikitext2"]["ppl"], 2),
                _fmt(100 * r["arc_easy"]["acc"], 1), _fmt(100 * r["arc_easy"]["acc_norm"], 1),
                _fmt(100 * r["piqa"]["acc"], 1), _fmt(100 * r["piqa"]["acc_norm"], 1),
                _fmt(100 * r["lambada"]["acc"], 1), _fmt(r["lambada"]["ppl"], 2),
            ])
    lines.append(_table(headers, rows))
    n_items = {k: v["items"] for k, v in report["data"].items() if k != "wikitext2"}
    se = {k: 100 * _stderr_acc(0.5, n) for k, n in n_items.items()}
    lines.append("  accuracies in %; sparsity 0 is one dense run shared by every profile; 'achieved' = mean over "
                 "all tokens processed of the share of projection weights skipped")
    lines.append("  standard error of an accuracy near 50%: " + ", ".join(f"{k} +-{v:.1f} pts" for k, v in se.items())
                 + " (items are the same for every row, so row-to-row differences are paired and less noisy)")
    lines.append("")

    # WINA - TEAL at equal allocation and target
    drows = []
    for alloc in ("uniform", "greedy"):
        w, t = f"wina-{alloc}", f"teal-{alloc}"
        if w not in st["profiles"] or t not in st["profiles"]:
            continue
        for s in st["sparsities"]:
            if s == 0:
                continue
            rw, rt = report["results"].get(w, {}).get(_key(s)), report["results"].get(t, {}).get(_key(s))
            if rw is None or rt is None:
                continue
            drows.append([
                alloc, f"{s:.2f}", f"{rw['wikitext2']['ppl']:.2f} vs {rt['wikitext2']['ppl']:.2f}",
                f"{100 * (rw['arc_easy']['acc'] - rt['arc_easy']['acc']):+.1f}",
                f"{100 * (rw['arc_easy']['acc_norm'] - rt['arc_easy']['acc_norm']):+.1f}",
                f"{100 * (rw['piqa']['acc'] - rt['piqa']['acc']):+.1f}",
                f"{100 * (rw['piqa']['acc_norm'] - rt['piqa']['acc_norm']):+.1f}",
                f"{100 * (rw['lambada']['acc'] - rt['lambada']['acc']):+.1f}",
                f"{(rw['achieved_sparsity'] or 0) - (rt['achieved_sparsity'] or 0):+.3f}",
            ])
    if drows:
        lines.append("WINA minus TEAL (same allocation and target; ppl shown as WINA vs TEAL, lower is better; "
                     "accuracy deltas in points, positive = WINA better):")
        lines.append(_table(["allocation", "target", "wiki ppl W vs T", "dARC-E", "dARC-E norm", "dPIQA",
                             "dPIQA norm", "dLAMBADA", "d achieved"], drows))
        lines.append("")
    timing = []
    for key, value in report["results"].items():
        for target, r in ([("0", value)] if key == DENSE else value.items()):
            timing.append([key, target, f"{r['seconds']:.0f}", f"{r['forward_seconds']:.0f}", str(r["tokens_processed"])])
    lines.append("time per configuration:")
    lines.append(_table(["config", "target", "seconds", "forward s", "real tokens"], timing))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib unavailable ({type(exc).__name__}: {exc}); `pip install -e .[bench]`"
    st = report["settings"]
    panels = [
        ("WikiText-2 perplexity (log scale)", lambda r: r["wikitext2"]["ppl"], None),
        ("ARC-Easy acc_norm", lambda r: 100 * r["arc_easy"]["acc_norm"], 25.0),
        ("PIQA acc_norm", lambda r: 100 * r["piqa"]["acc_norm"], 50.0),
        ("LAMBADA acc", lambda r: 100 * r["lambada"]["acc"], None),
    ]
    style = {"wina": "tab:blue", "teal": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, get, chance) in zip(axes.flat, panels):
        for profile in st["profiles"]:
            rows = _rows_for(report, profile)
            if not rows:
                continue
            crit, _, alloc = profile.partition("-")
            ax.plot([r["target_sparsity"] for r in rows], [get(r) for r in rows], marker="o", label=profile,
                    color=style.get(crit), linestyle="-" if alloc == "uniform" else "--")
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        if title.startswith("WikiText"):
            ax.set_yscale("log")
            ax.set_ylabel("perplexity")
        else:
            ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.set_xlabel("target sparsity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    n = {k: v["items"] for k, v in report["data"].items() if k != "wikitext2"}
    fig.suptitle(f"{report['model']['name']} ({report['model']['dtype']}): WINA vs TEAL sparsity — "
                 f"WikiText-2 {report['data']['wikitext2']['tokens_used']} tokens, "
                 + ", ".join(f"{k} {v} items" for k, v in n.items()), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES),
                   help="target sparsities (0 = the dense model, computed once)")
    p.add_argument("--profiles", nargs="+", default=list(DEFAULT_PROFILES),
                   help="<criterion>-<allocation> names; file wina-<name>.safetensors in --profile-dir")
    p.add_argument("--profile-dir", type=Path, default=DEFAULT_PROFILE_DIR, help="where the profiles are")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="shared data folder (default: server.calibration.data.default_data_dir())")
    p.add_argument("--wikitext-file", choices=sorted(WIKITEXT_FILES), default="raw",
                   help="raw = wiki.test.raw.nonblank-crlf (CRLF->LF), tokens = wiki.test.tokens")
    p.add_argument("--wikitext-tokens", type=int, default=16384, help="first N tokens of the test split")
    p.add_argument("--window", type=int, default=512, help="perplexity window (non-overlapping)")
    p.add_argument("--items", type=int, default=120, help="items per zero-shot task (0 or >= size: all)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the zero-shot subsets")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward")
    p.add_argument("--threads", default="auto",
                   help="torch threads: a number, or auto = torch's default, one fewer while other processes "
                        "keep a core busy (see ThreadGovernor; results are the same)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder for wina_quality.{json,txt,png}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server.model.sparsity import NORMED_PROJECTIONS

    if args.window < 2 or args.window > MAX_MODEL_LEN:
        raise SystemExit(f"error: --window must be in 2..{MAX_MODEL_LEN}")
    if args.batch_tokens < MAX_MODEL_LEN:
        raise SystemExit(f"error: --batch-tokens must be >= {MAX_MODEL_LEN}")
    sparsities = sorted(set(args.sparsities))
    if any(s < 0 or s >= 1 for s in sparsities):
        raise SystemExit("error: sparsities must be in [0, 1)")
    for name in args.profiles:
        crit, _, alloc = name.partition("-")
        if crit not in NORMED_PROJECTIONS or not alloc:
            raise SystemExit(f"error: profile {name!r} is not <{'|'.join(NORMED_PROJECTIONS)}>-<allocation>")

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    fixed_threads = None if args.threads == "auto" else int(args.threads)
    if fixed_threads is not None:
        torch.set_num_threads(fixed_threads)
    torch.manual_seed(args.seed)

    from server.calibration.data import default_data_dir
    from server.model.sparsity import WinaTable
    from server.profiles import load_profile
    from server.runtime import load_model
    from server.settings import ServerSettings

    started = _now_utc()
    t_start = time.perf_counter()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    data_dir = args.data_dir or default_data_dir()

    # Profiles first: fail before the long part if one is missing or made for another model.
    paths = {name: args.profile_dir / f"wina-{name}.safetensors" for name in args.profiles}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing and any(s > 0 for s in sparsities):
        raise SystemExit("error: missing profile(s): " + ", ".join(missing))

    print("loading the model ...", file=sys.stderr, flush=True)
    loaded = load_model(ServerSettings(wina_profile="none", max_model_len=MAX_MODEL_LEN, log_level="warning"))
    model, tokenizer = loaded.model, loaded.tokenizer
    profiles: dict[str, Any] = {}
    if any(s > 0 for s in sparsities):
        for name, path in paths.items():
            prof = load_profile(path)
            if prof.method != "wina":
                raise SystemExit(f"error: {path} is a {prof.method!r} profile")
            prof.check_model(loaded.fingerprint, loaded.name)
            params = prof.header.get("parameters", {})
            crit = name.partition("-")[0]
            if params.get("criterion") != crit:
                raise SystemExit(f"error: {path} has criterion {params.get('criterion')!r}, expected {crit!r}")
            profiles[name] = prof

    print("tokenizing the data ...", file=sys.stderr, flush=True)
    tasks = load_tasks(data_dir, tokenizer, args)
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    wt = tasks["wikitext2"]
    data_info: dict[str, Any] = {
        "wikitext2": {"file": wt["file"], "file_choice": wt["file_choice"], "preprocessing": wt["preprocessing"],
                      "text_tokens_total": wt["text_tokens_total"], "tokens_used": len(wt["windows"]) * args.window,
                      "windows": len(wt["windows"]), "scored_tokens": wt["scored_tokens"]},
    }
    for name in ("arc_easy", "piqa", "lambada"):
        t = tasks[name]
        data_info[name] = {"file": t["file"], "total_items": t["total_items"], "items": len(t["items"]),
                           "item_indices": [it["index"] for it in t["items"]],
                           "requests": sum(len(it["requests"]) for it in t["items"]),
                           "input_tokens": sum(len(r.input_ids) for it in t["items"] for r in it["requests"])}

    report: dict[str, Any] = {
        "benchmark": "wina_quality",
        "schema_version": 1,
        "started_utc": started,
        "command": shlex.join([sys.executable, str(Path(__file__).resolve()), *argv_list]),
        "argv": argv_list,
        "machine": describe_machine(("torch", "transformers", "tokenizers")),
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint, "dtype": str(model.dtype).replace("torch.", ""),
                  "device": str(model.device), "max_model_len": MAX_MODEL_LEN},
        "settings": {
            "sparsities": sparsities, "profiles": list(args.profiles), "profile_dir": str(args.profile_dir),
            "data_dir": str(data_dir), "wikitext_file": args.wikitext_file, "wikitext_tokens": args.wikitext_tokens,
            "window": args.window, "items": args.items, "seed": args.seed, "batch_tokens": args.batch_tokens,
            "threads": args.threads, "bos_token": False, "sparse_path": "masked dense (attach_sparsity(table, None))",
        },
        "profiles": {name: {"path": str(p.path), "name": p.name, "parameters": p.header.get("parameters"),
                            "created": p.header.get("created"),
                            "levels": [round(float(x), 6) for x in p.tensors["levels"].float()]}
                     for name, p in profiles.items()},
        "data": data_info,
        "definitions": {
            "wikitext2.ppl": "exp(sum NLL / scored tokens) over non-overlapping windows, each scored on tokens 2..W",
            "acc": "argmax over choices of the summed continuation log-likelihood equals the gold choice",
            "acc_norm": "argmax of log-likelihood / len(choice text in characters) (lm-eval acc_norm)",
            "lambada.acc": "every token of ' ' + last word is the argmax given the context (lm-eval is_greedy)",
            "lambada.ppl": "exp(-mean over items of the log-likelihood of ' ' + last word)",
            "achieved_sparsity": "mean over all real tokens processed (all tasks) of 1 - (weights of the kept input "
                                 "channels, by each projection's output width) / (all projection weights)",
            "stderr": "sqrt(p (1 - p) / (n - 1)) as lm-eval",
        },
        "results": {},
    }
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, txt_path, png_path = (out_dir / f"wina_quality.{ext}" for ext in ("json", "txt", "png"))

    def save_partial() -> None:
        report["wall_seconds"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    configs: list[tuple[str, float]] = []
    if 0 in sparsities:
        configs.append((DENSE, 0.0))
    configs += [(name, s) for name in profiles for s in sparsities if s > 0]
    print(f"{len(configs)} configurations; wikitext {len(wt['windows'])} windows, "
          + ", ".join(f"{k} {v['items']} items ({v['requests']} requests, {v['input_tokens']} tokens)"
                      for k, v in data_info.items() if k != "wikitext2"), file=sys.stderr, flush=True)
    governor = ThreadGovernor(fixed_threads)
    attached = None
    for i, (name, target) in enumerate(configs):
        if name != DENSE and attached != name:
            prof = profiles[name]
            table = WinaTable(prof.header["parameters"]["criterion"], prof.tensors["levels"].float(),
                              prof.tensors["thresholds"].float())
            if target > table.max_sparsity + 1e-9:
                print(f"warning: {name} is calibrated up to {table.max_sparsity}, target {target} is clamped",
                      file=sys.stderr, flush=True)
            model.attach_sparsity(table, None)
            attached = name
        label = f"[{i + 1}/{len(configs)}] {name}@{target:g}"
        res = evaluate(model, target, tasks, args, label, pad_id, governor)
        if name == DENSE:
            report["results"][DENSE] = res
        else:
            report["results"].setdefault(name, {})[_key(target)] = res
        print(f"{label}: ppl {res['wikitext2']['ppl']:.2f}  arc {res['arc_easy']['acc']:.3f}/"
              f"{res['arc_easy']['acc_norm']:.3f}  piqa {res['piqa']['acc']:.3f}/{res['piqa']['acc_norm']:.3f}  "
              f"lambada {res['lambada']['acc']:.3f}  achieved {res['achieved_sparsity']:.3f}  "
              f"({res['seconds']:.0f} s)", file=sys.stderr, flush=True)
        save_partial()

    report["threads"] = governor.summary()
    report["finished_utc"] = _now_utc()
    report["wall_seconds"] = time.perf_counter() - t_start
    text = format_report(report)
    problem = plot(report, png_path)
    report["plot"] = str(png_path) if problem is None else None
    if problem:
        report["plot_problem"] = problem
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    txt_path.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nwrote {json_path}, {txt_path}" + (f", {png_path}" if problem is None else f" (no plot: {problem})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
