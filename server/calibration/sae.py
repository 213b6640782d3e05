"""`neuronserve calibrate sae`: train a TopK sparse autoencoder on the served model's residual stream.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
- z = TopK(W_enc^T (x - b_dec) + b_enc), x_hat = W_dec^T z + b_dec (SAELens `topk`, apply_b_dec_to_input).
  `--architecture batchtopk` (Bussmann et al. 2024) keeps the training batch's k * N largest
  pre-activations instead of each token's k, and is saved as SAELens `jumprelu` with the threshold
  that gives k latents per token on average over a sample of the training tokens.
- Decoder rows have unit norm: the gradient component parallel to each row is removed before the
  Adam step and the rows are renormalised after it.
- b_dec starts at the geometric median of a sample of the data; W_dec rows start as random unit
  directions and W_enc as W_dec's transpose; b_enc at 0.
- A latent is dead when it has not fired for `dead_window_tokens` training tokens. The AuxK loss
  reconstructs the main reconstruction's error with the top k_aux = d_in / 2 dead latents, scaled
  by `aux_coefficient`, which gives dead latents a gradient and revives them.
- Training runs in a normalised space (x / s, s the data's root-mean-square element) so that the
  learning rate does not depend on the layer's scale; the scale is folded into b_enc and b_dec on
  save, so the saved decoder rows stay unit-norm in the model's own units.

Activations come from our own forward pass (`model.residual_stream`, layers 0..L only), over a corpus
built from text on this machine (see `build_corpus`). Position 0 of every sequence (the attention
sink, ~150x the median norm at mid layers) is left out of training and of splicing. Activations
are cached under `<cache>/sae-activations/` (float16), so a rerun or a resumed run skips the forward
passes; training checkpoints every `checkpoint_every` steps and resumes from the last one.

The encoder backward is sparse: only the k (and k_aux) selected pre-activations carry a gradient,
so W_enc's gradient is a sparse x dense product instead of a second dense [N, d_in] x [d_in, d_sae]
matmul. The dense forward matmul and its top-k are the whole per-token cost.
"""

from __future__ import annotations

import argparse
import email
import gzip
import hashlib
import html
import json
import logging
import math
import random
import sys
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from server.calibration.data import (
    alpaca_texts,
    default_data_dir,
    extraction_texts,
    rtp_calibration_lines,
    tweet_rows,
    wikitext_valid_text,
)
from server.interventions.sae import (
    SaeConfig,
    SaeFormatError,
    SparseAutoencoder,
    check_model,
)
from server.model.edits import ResidualRecorder

logger = logging.getLogger(__name__)

# A token whose residual norm exceeds this multiple of the median (over positions >= 1) is a
# "massive-norm" token (attention-sink-like). Position 0 is always one of them and always excluded;
# the few later ones are kept out of training (their squared error would swamp the loss) and are
# reported separately, since they inflate explained variance.
MASSIVE_NORM_RATIO = 10.0


TRAINED_ARCHITECTURES = ("topk", "batchtopk")

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class CorpusConfig:
    """What the activations are collected on. Shares are of `corpus_tokens`; a source that has
    fewer tokens than its share gives all it has (the corpus is then smaller)."""

    corpus_tokens: int = 1_200_000
    sequence_length: int = 256
    shares: dict[str, float] = field(default_factory=lambda: {
        "wikitext2-valid": 0.24, "alpaca-chat": 0.18, "tweets": 0.14, "rtp": 0.06,
        "python-stdlib": 0.20, "system-docs": 0.17})
    sample_prompts: int = 96  # text the served model samples itself (chat prompts)
    sample_tokens: int = 128
    sample_temperature: float = 0.8
    sample_top_p: float = 0.95
    seed: int = 0
    data_dir: Path = field(default_factory=default_data_dir)


@dataclass
class SaeTrainingConfig:
    layer: int = 15
    width: int = 8192
    k: int = 32  # TopK: latents per token; BatchTopK: the batch's average
    architecture: str = "topk"  # or "batchtopk" (saved as jumprelu)
    train_tokens: int = 28_800_000  # tokens processed (epochs = train_tokens / corpus tokens)
    batch_size: int = 1024
    lr: float = 5e-4
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # linear decay to 0 over the last share of steps
    aux_k: int | None = None  # None: d_in // 2
    aux_coefficient: float = 1 / 32
    dead_window_tokens: int = 250_000
    checkpoint_every: int = 200
    seed: int = 0
    dtype: str = "float16"  # of the saved weights


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


CORPUS_SOURCES = ("wikitext2-valid", "alpaca-chat", "tweets", "rtp", "python-stdlib", "system-docs",
                  "pile-extraction", "gnu-info", "package-docs")

SAMPLE_TOPICS = ("the ocean", "a small bakery", "black holes", "the French revolution", "machine learning",
                 "a rainy city at night", "gardening tomatoes", "chess openings", "the immune system",
                 "a dragon who is afraid of heights", "climate change", "medieval castles", "jazz music",
                 "the stock market", "learning a new language", "volcanoes", "friendship", "space travel",
                 "a detective in Tokyo", "healthy breakfast ideas", "ancient Egypt", "electric cars",
                 "a lost dog finding its way home", "the history of the internet")
SAMPLE_TASKS = ("Write a short story about {}.", "Explain {} to a ten-year-old.", "Write a poem about {}.",
                "Give me five interesting facts about {}.", "Write a persuasive paragraph about {}.",
                "Describe {} in the style of a news report.", "What are the pros and cons of {}?",
                "Write a Python function related to {} and explain it.", "Write a dialogue between two people about {}.",
                "Summarize what you know about {} in three sentences.")


def _chat(tokenizer, user: str, assistant: str | None = None) -> str:
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=assistant is None)


def tweets_texts(data_dir: Path) -> list[str]:
    return [html.unescape(row["tweet"]) for row in tweet_rows(data_dir)]


def rtp_texts(data_dir: Path) -> list[str]:
    """Prompt + continuation of every calibration item, non-toxic file first."""
    return [item["prompt"]["text"] + item.get("continuation", {}).get("text", "")
            for cls in ("nontoxic", "toxic") for item in rtp_calibration_lines(data_dir, cls)]


def python_stdlib_texts(max_chars_per_file: int = 6000) -> list[str]:
    """Source (code and docstrings) of the Python standard library on this machine, the start of each
    file (so that many modules are seen, not a few long ones)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts)
    return [p.read_text(errors="replace")[:max_chars_per_file] for p in files]


def _distinct_long(texts: Iterable[str], min_chars: int = 200) -> list[str]:
    """Each text once (by content), in order, those of `min_chars` characters or fewer left out."""
    seen, kept = set(), []
    for text in texts:
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest not in seen and len(text) > min_chars:
            seen.add(digest)
            kept.append(text)
    return kept


def system_doc_texts(max_chars_per_file: int = 8000) -> list[str]:
    """Licence texts and package documentation that ship with the OS (/usr/share/common-licenses,
    /usr/share/doc/*/{copyright,README*}, plain text only), each distinct text once."""
    paths = sorted(Path("/usr/share/common-licenses").glob("*")) if Path("/usr/share/common-licenses").is_dir() else []
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        paths += sorted(p for p in doc.glob("*/*") if p.is_file() and (p.name == "copyright" or p.name.startswith("README"))
                        and p.suffix not in (".gz", ".bz2", ".xz", ".html"))

    def read():
        for path in paths:
            try:
                yield path.resolve().read_text(errors="strict")[:max_chars_per_file]
            except (UnicodeDecodeError, OSError, IsADirectoryError):
                continue
    return _distinct_long(read())


def gnu_info_texts(max_chars_per_node: int = 8000) -> list[str]:
    """The nodes (sections) of the GNU Info manuals that ship with the OS (/usr/share/info/*.info*.gz:
    coreutils, find, diffutils, ...), each without its navigation header; menus and tag tables left out."""
    root = Path("/usr/share/info")
    texts = []
    for path in sorted(root.glob("*.info*.gz")) if root.is_dir() else []:
        try:
            with gzip.open(path, "rt", errors="replace") as f:
                manual = f.read()
        except OSError:
            continue
        for node in manual.split("\x1f")[1:]:  # Info separates nodes with ^_
            header, _, body = node.strip("\n").partition("\n")
            if not header.startswith("File:") or body.lstrip().startswith("* Menu:"):
                continue
            body = body.strip()[:max_chars_per_node]
            if len(body) > 200:
                texts.append(body)
    return texts


def package_doc_texts(max_chars_per_package: int = 8000) -> list[str]:
    """The long descriptions (README) of the Python packages installed beside neuronserve
    (site-packages/*.dist-info/METADATA bodies), each distinct text once."""
    root = Path(sysconfig.get_paths()["purelib"])
    bodies = (email.message_from_string(path.read_text(errors="replace")).get_payload()
              for path in sorted(root.glob("*.dist-info/METADATA")))
    return _distinct_long(body.strip()[:max_chars_per_package] for body in bodies if isinstance(body, str))


def _pack(token_lists: list[list[int]], eos: int, length: int, budget: int) -> list[list[int]]:
    """Join documents with EOS and cut into `length`-token sequences, up to `budget` tokens."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids + [eos])
        if len(flat) >= budget + length:
            break
    n = min(len(flat) // length, max(budget // length, 0))
    return [flat[i * length:(i + 1) * length] for i in range(n)]


@torch.inference_mode()
def sample_texts(model, tokenizer, config: CorpusConfig, batch_size: int = 16) -> list[list[int]]:
    """Chat prompts (topic x task, seeded) and the served model's own sampled answers, as token ids
    (prompt + answer). Sampling uses our forward pass with a slot cache."""
    rng = random.Random(config.seed + 1)
    pairs = [(t, topic) for t in SAMPLE_TASKS for topic in SAMPLE_TOPICS]
    rng.shuffle(pairs)
    prompts = [tokenizer.encode(_chat(tokenizer, task.format(topic)), add_special_tokens=False)
               for task, topic in pairs[:config.sample_prompts]]
    generator = torch.Generator().manual_seed(config.seed + 2)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling model text", unit="batch"):
        rows = prompts[start:start + batch_size]
        B = len(rows)
        cache = model.new_cache(B)
        last = []
        for b, ids in enumerate(rows):  # prefill each row alone (different lengths)
            logits = model(torch.tensor([ids]), torch.tensor([b]), torch.tensor([0]), cache)  # [1, V]
            last.append(logits[0])
        # Sampled on the CPU with a CPU generator: the same corpus whatever device the model is on.
        logits = torch.stack(last).cpu()  # [B, V]
        lengths = torch.tensor([len(r) for r in rows])
        generated = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(config.sample_tokens):
            probs = torch.softmax(logits / config.sample_temperature, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < config.sample_top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [B, 1]
            tokens = order.gather(-1, choice)  # [B, 1]
            for b in range(B):
                if not done[b]:
                    generated[b].append(int(tokens[b]))
                    done[b] = int(tokens[b]) == eos
            if all(done):
                break
            logits = model(tokens, torch.arange(B), lengths, cache).cpu()
            lengths = lengths + 1
        out.extend(r + g for r, g in zip(rows, generated))
    return out


def build_corpus(model, tokenizer, config: CorpusConfig) -> tuple[list[list[int]], list[str], list[dict[str, Any]]]:
    """-> (sequences of `sequence_length` token ids, shuffled with the seed; the source of each;
    per-source description)."""
    rng = random.Random(config.seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    L = config.sequence_length

    def encode(texts: list[str]) -> list[list[int]]:
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def shuffled(texts: list[str]) -> list[str]:
        texts = list(texts)
        rng.shuffle(texts)
        return texts

    readers = {
        "wikitext2-valid": ("WikiText-2 validation split (wiki.valid.tokens), in order", lambda: [wikitext_valid_text(config.data_dir)]),
        "alpaca-chat": ("AlpacaEval instructions + text-davinci-003 answers and seed tasks, in the chat template",
                        lambda: [_chat(tokenizer, *t.split("\n\n", 1)) if "\n\n" in t else t
                                 for t in shuffled(alpaca_texts(config.data_dir))]),
        "tweets": ("tweets (offensive/labeled_data.csv, all classes)", lambda: shuffled(tweets_texts(config.data_dir))),
        "rtp": ("RealToxicityPrompts calibration prompts + continuations (rtp/*.calib.jsonl)",
                lambda: shuffled(rtp_texts(config.data_dir))),
        "python-stdlib": ("Python standard library source and docstrings (first 6000 chars of each module)",
                          lambda: shuffled(python_stdlib_texts())),
        "system-docs": ("OS licence texts and package copyright/README files (/usr/share/common-licenses, /usr/share/doc)",
                        lambda: shuffled(system_doc_texts())),
        "pile-extraction": ("Pile slices of the extraction benchmark (extraction/extraction_val.jsonl), 200 GPT-2 tokens each",
                            lambda: shuffled(extraction_texts(config.data_dir))),
        "gnu-info": ("GNU Info manuals of the OS (/usr/share/info), one text per node",
                     lambda: shuffled(gnu_info_texts())),
        "package-docs": ("READMEs of the installed Python packages (site-packages/*.dist-info/METADATA)",
                         lambda: shuffled(package_doc_texts())),
    }
    sequences: list[list[int]] = []
    sources: list[str] = []
    described: list[dict[str, Any]] = []
    for name, share in config.shares.items():
        description, read = readers[name]
        budget = int(share * config.corpus_tokens)
        if budget < L:
            continue
        packed = _pack(encode(read()), eos, L, budget)
        sequences.extend(packed)
        sources.extend([name] * len(packed))
        described.append({"source": name, "what": description, "sequences": len(packed), "tokens": len(packed) * L})
    if config.sample_prompts > 0:
        samples = sample_texts(model, tokenizer, config)
        packed = _pack(samples, eos, L, config.sample_prompts * (config.sample_tokens + 64))
        sequences.extend(packed)
        sources.extend(["model-samples"] * len(packed))
        described.append({"source": "model-samples",
                          "what": f"the served model's own answers (T={config.sample_temperature}, top_p={config.sample_top_p}, "
                                  f"<= {config.sample_tokens} tokens) to {config.sample_prompts} seeded chat prompts "
                                  "(topic x task), prompt included",
                          "sequences": len(packed), "tokens": len(packed) * L})
    order = list(range(len(sequences)))
    rng.shuffle(order)
    return [sequences[i] for i in order], [sources[i] for i in order], described


# ---------------------------------------------------------------------------------------------
# Activation cache
# ---------------------------------------------------------------------------------------------


SHARD_SEQUENCES = 64


def activation_cache_dir(cache_root: Path, fingerprint: str, layer: int, sequences: list[list[int]]) -> Path:
    digest = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:16]
    return cache_root / "sae-activations" / f"{fingerprint}-L{layer}-{digest}"


@torch.inference_mode()
def collect_activations(model, layer: int, sequences: list[list[int]], directory: Path,
                        n_shards: int | None = None, batch_size: int = 8) -> Path:
    """Residual stream after `layer` at positions >= 1 of every sequence, in float16 shards of
    SHARD_SEQUENCES sequences each ([n * (T - 1), d] per shard), the first `n_shards` shards (None:
    all). Shards already on disk are kept, so an interrupted collection resumes."""
    directory.mkdir(parents=True, exist_ok=True)
    n_shards = min(n_shards or len(sequences), math.ceil(len(sequences) / SHARD_SEQUENCES))
    todo = [s for s in range(n_shards) if not (directory / f"shard_{s:05d}.pt").exists()]
    bar = tqdm(total=len(todo) * SHARD_SEQUENCES, desc=f"activations (layer {layer})", unit="seq")
    for s in todo:
        chunk = sequences[s * SHARD_SEQUENCES:(s + 1) * SHARD_SEQUENCES]
        parts = []
        for b in range(0, len(chunk), batch_size):
            ids = torch.tensor(chunk[b:b + batch_size])  # [B, T]
            h = model.residual_stream(ids, layer)  # [B, T, d] float32
            parts.append(h[:, 1:].reshape(-1, h.shape[-1]).to(torch.float16).cpu())  # position 0 left out
            bar.update(len(ids))
        tmp = directory / f"shard_{s:05d}.pt.tmp"
        torch.save(torch.cat(parts), tmp)
        tmp.rename(directory / f"shard_{s:05d}.pt")  # atomic: a shard on disk is always complete
    bar.close()
    return directory


def load_activations(directory: Path, n_shards: int) -> torch.Tensor:
    """-> [N, d] float16, the tokens of the first n_shards shards."""
    return torch.cat([torch.load(directory / f"shard_{s:05d}.pt") for s in range(n_shards)])


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class _SparseEncoderGrad(torch.autograd.Function):
    """vals[j] = xc[rows[j]] . W_enc_t[cols[j]] + b_enc[cols[j]] for the selected (row, latent)
    pairs, forward values given (they are gathered from the dense pre-activations). Backward touches
    only the selected entries: a sparse [N, S] gradient times dense matrices, instead of a dense
    [N, S] gradient."""

    @staticmethod
    def forward(ctx, values, xc, W_enc_t, b_enc, rows, cols):
        ctx.save_for_backward(xc, W_enc_t, rows, cols)
        ctx.n_latents = b_enc.shape[0]
        return values

    @staticmethod
    def backward(ctx, grad):  # grad: [M], one per selected pair
        xc, W_enc_t, rows, cols = ctx.saved_tensors
        # indices are in range by construction (selected from [N, S]): skip the invariant checks
        G = torch.sparse_coo_tensor(torch.stack([rows, cols]), grad, (xc.shape[0], ctx.n_latents),
                                    check_invariants=False).coalesce()  # [N, S]
        grad_W = torch.sparse.mm(G.t(), xc)  # [S, d]
        grad_x = torch.sparse.mm(G, W_enc_t)  # [N, d]
        grad_b = torch.zeros(ctx.n_latents, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return None, grad_x, grad_W, grad_b, None, None


class TopKTrainer(torch.nn.Module):
    """The trainable SAE, in normalised units (x / scale). W_enc is kept transposed ([S, d]) so that
    its rows gather cheaply.

    TopK keeps each token's k largest pre-activations. BatchTopK (Bussmann et al. 2024, "BatchTopK
    Sparse Autoencoders") keeps the batch's k * N largest, so a token uses as many latents as it
    needs and the batch averages k; at inference a single threshold replaces the batch (see
    `batch_topk_threshold`), which makes the saved SAE a JumpReLU one, as SAELens saves it."""

    def __init__(self, d_in: int, width: int, k: int, aux_k: int, generator: torch.Generator,
                 batch_topk: bool = False) -> None:
        super().__init__()
        W_dec = torch.randn(width, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)  # [S, d], unit rows
        self.W_enc_t = torch.nn.Parameter(W_dec.clone())  # [S, d]: encoder = decoder transpose
        self.b_enc = torch.nn.Parameter(torch.zeros(width))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.k, self.aux_k, self.batch_topk = k, aux_k, batch_topk

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, d] -> [N, S] (no gradient: the selected entries get theirs in _reconstruct)."""
        with torch.no_grad():
            return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc_t.t())

    def _select_batch(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pre: [N, S] -> (rows, cols) of the batch's k * N largest entries, rows ascending. The
        search runs over each row's `candidates` largest (4 k), which holds the answer unless some
        row takes all of its candidates; then it runs over the whole matrix."""
        N, S = pre.shape
        candidates = min(4 * self.k, S)
        top = pre.topk(candidates, dim=1)  # [N, c]
        chosen = top.values.reshape(-1).topk(self.k * N, sorted=False).indices.sort().values  # [k N]
        rows = chosen // candidates
        if int(torch.bincount(rows, minlength=N).max()) < candidates:
            return rows, top.indices.reshape(-1)[chosen]
        chosen = pre.reshape(-1).topk(self.k * N, sorted=False).indices.sort().values
        return chosen // S, chosen % S

    def _reconstruct(self, pre: torch.Tensor, xc: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected latents' ReLU values z [M] and W_dec^T z per token [N, d]; rows ascending."""
        values = pre[rows, cols]
        z = _SparseEncoderGrad.apply(values, xc, self.W_enc_t, self.b_enc, rows, cols).relu()
        offsets = torch.searchsorted(rows, torch.arange(len(pre), device=rows.device))  # each token's first pair
        return z, F.embedding_bag(cols, self.W_dec, offsets, per_sample_weights=z, mode="sum")

    def forward(self, x: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, d]; dead: [S] bool -> (x_hat [N, d], fired [S] bool, aux loss scalar)."""
        pre = self.pre_activation(x)  # [N, S]
        N = len(x)
        xc = x - self.b_dec
        if self.batch_topk:
            rows, cols = self._select_batch(pre)
        else:
            rows = torch.arange(N).repeat_interleave(self.k)
            cols = pre.topk(self.k, dim=1).indices.reshape(-1)
        z, decoded = self._reconstruct(pre, xc, rows, cols)
        x_hat = decoded + self.b_dec  # [N, d]
        fired = torch.zeros(pre.shape[1], dtype=torch.bool)
        fired[cols[z > 0]] = True
        n_dead = int(dead.sum())
        aux = x_hat.new_zeros(())
        if n_dead > 0 and self.aux_k > 0:
            # AuxK: each token's top dead latents reconstruct the main reconstruction's error.
            error = (x - x_hat).detach()  # [N, d]
            dead_idx = dead.nonzero().squeeze(1)  # [D]
            k_aux = min(self.aux_k, n_dead)
            local = pre.index_select(1, dead_idx).topk(k_aux, dim=1).indices  # [N, k_aux]
            _, error_hat = self._reconstruct(pre, xc, torch.arange(N).repeat_interleave(k_aux),
                                             dead_idx[local].reshape(-1))
            aux = (error_hat - error).pow(2).sum(-1).mean()
        return x_hat, fired, aux

    @torch.no_grad()
    def batch_topk_threshold(self, x: torch.Tensor, chunk: int = 4096) -> float:
        """The JumpReLU threshold that replaces BatchTopK at inference: the (k * N)-th largest
        pre-activation over x: [N, d], so that these tokens average k active latents."""
        candidates = min(4 * self.k, self.W_dec.shape[0])
        while True:
            kept, row_floor = [], []
            for start in range(0, len(x), chunk):
                top = self.pre_activation(x[start:start + chunk]).topk(candidates, dim=1).values  # [n, c]
                kept.append(top.reshape(-1))
                row_floor.append(top[:, -1])
            threshold = float(torch.cat(kept).topk(self.k * len(x)).values[-1])
            # exact unless some row has more entries at or above it than it has candidates
            if candidates == self.W_dec.shape[0] or bool((torch.cat(row_floor) < threshold).all()):
                return threshold
            candidates = min(2 * candidates, self.W_dec.shape[0])

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def geometric_median(x: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm. x: [N, d] -> [d]"""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-6)
        median = (weights.unsqueeze(1) * x).sum(0) / weights.sum()
    return median


def export_sae(trainer: TopKTrainer, scale: float, layer: int, config: SaeTrainingConfig, model_name: str,
               context_size: int, metadata: dict[str, Any], threshold: float | None = None) -> SparseAutoencoder:
    """Fold the normalisation into the weights: pre_saved = x @ W_enc + scale * b_enc equals
    scale * pre_normalised, so latents are in model units and W_dec rows stay unit-norm. A BatchTopK
    SAE is saved as JumpReLU with `threshold` (normalised units, from training) for every latent."""
    d_in, width = trainer.W_dec.shape[1], trainer.W_dec.shape[0]
    batch_topk = config.architecture == "batchtopk"
    if batch_topk and threshold is None:
        raise ValueError("a BatchTopK SAE is saved with its inference threshold")
    cfg = SaeConfig(architecture="jumprelu" if batch_topk else "topk", d_in=d_in, d_sae=width,
                    k=None if batch_topk else config.k,
                    hook_name=f"blocks.{layer}.hook_resid_post", model_name=model_name,
                    apply_b_dec_to_input=True, dtype=config.dtype, context_size=context_size,
                    extra_metadata=metadata)
    with torch.no_grad():
        return SparseAutoencoder(cfg, trainer.W_enc_t.t().clone(), trainer.b_enc * scale, trainer.W_dec.clone(),
                                 trainer.b_dec * scale,
                                 torch.full((width,), threshold * scale) if batch_topk else None)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def massive_mask(acts: torch.Tensor, ratio: float = MASSIVE_NORM_RATIO) -> torch.Tensor:
    """acts: [N, d] -> [N] bool, True for tokens whose norm exceeds ratio x the median norm."""
    norms = acts.float().norm(dim=1)
    return norms > ratio * norms.median()


def load_initial_weights(trainer: TopKTrainer, sae: SparseAutoencoder, scale: float) -> None:
    """Start training from an existing SAE (a fine-tune) instead of a random init. Its decoder rows
    are normalised to unit norm, with the norm moved into the encoder so that each latent's
    contribution n_i * z_i is unchanged; the biases are divided by the training scale (the trainer
    works on x / scale)."""
    if sae.cfg.d_in != trainer.W_dec.shape[1] or sae.cfg.d_sae != trainer.W_dec.shape[0]:
        raise ValueError(f"the initial SAE is {sae.cfg.d_in} -> {sae.cfg.d_sae}; training "
                         f"{trainer.W_dec.shape[1]} -> {trainer.W_dec.shape[0]}")
    if not sae.cfg.apply_b_dec_to_input:
        raise ValueError("the initial SAE must subtract b_dec from its input (apply_b_dec_to_input)")
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)  # [S]
    with torch.no_grad():
        trainer.W_dec.copy_(sae.W_dec / norms.unsqueeze(1))
        trainer.W_enc_t.copy_(sae.W_enc.t() * norms.unsqueeze(1))
        trainer.b_enc.copy_(sae.b_enc * norms / scale)
        trainer.b_dec.copy_(sae.b_dec / scale)


def train_sae(acts: torch.Tensor, config: SaeTrainingConfig, checkpoint: Path | None = None,
              resume: bool = False, initial: SparseAutoencoder | None = None) -> tuple[TopKTrainer, float, dict[str, Any]]:
    """acts: [N, d] (float16 or float32; massive-norm tokens already removed) -> (trainer, scale, log).
    Deterministic for config.seed: the batch order is a seeded permutation per epoch. `initial`:
    fine-tune that SAE's weights instead of starting from a random init."""
    torch.manual_seed(config.seed)
    N, d_in = acts.shape
    generator = torch.Generator().manual_seed(config.seed)
    sample = acts[torch.randperm(N, generator=generator)[:32768]].float()
    scale = float(sample.pow(2).mean().sqrt())  # rms element
    aux_k = config.aux_k if config.aux_k is not None else d_in // 2
    if config.architecture not in TRAINED_ARCHITECTURES:
        raise ValueError(f"architecture {config.architecture!r} is not one of {TRAINED_ARCHITECTURES}")
    trainer = TopKTrainer(d_in, config.width, config.k, aux_k, generator, config.architecture == "batchtopk")
    if initial is not None:
        load_initial_weights(trainer, initial, scale)
    else:
        with torch.no_grad():
            trainer.b_dec.copy_(geometric_median(sample / scale))
    # fused: one kernel for all four tensors (10x faster than the foreach path on CPU, same update)
    optimizer = torch.optim.Adam(trainer.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    # a fine-tune may take no step at all: a TopK SAE converted to BatchTopK then only gets its threshold
    steps = max(config.train_tokens // config.batch_size, 0 if initial is not None else 1)
    batches_per_epoch = N // config.batch_size
    decay_start = int(steps * (1 - config.decay_fraction))

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / max(config.warmup_steps, 1))
        decay = 1.0 if step < decay_start else max(0.0, (steps - step) / max(steps - decay_start, 1))
        return config.lr * warm * decay

    since_fired = torch.zeros(config.width, dtype=torch.long)  # tokens since each latent last fired
    log: dict[str, Any] = {"steps": steps, "batches_per_epoch": batches_per_epoch, "history": []}
    start_step = 0
    if checkpoint is not None and resume and checkpoint.exists():
        state = torch.load(checkpoint)
        trainer.load_state_dict(state["trainer"])
        optimizer.load_state_dict(state["optimizer"])
        since_fired, start_step, log, scale = state["since_fired"], state["step"], state["log"], state["scale"]
        logger.info("resumed SAE training at step %d of %d from %s", start_step, steps, checkpoint)
    permutation, permutation_epoch = None, -1
    bar = tqdm(total=steps, initial=start_step, desc=f"training SAE (width {config.width}, k {config.k})", unit="step")
    window_mse, window_var, window_aux = 0.0, 0.0, 0.0
    for step in range(start_step, steps):
        epoch, position = divmod(step, batches_per_epoch)
        if epoch != permutation_epoch:
            permutation = torch.randperm(N, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
            permutation_epoch = epoch
        x = acts[permutation[position * config.batch_size:(position + 1) * config.batch_size]].float() / scale
        dead = since_fired >= config.dead_window_tokens
        x_hat, fired, aux = trainer(x, dead)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        loss = mse + config.aux_coefficient * aux
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.remove_parallel_gradient()
        optimizer.step()
        trainer.normalise_decoder()
        since_fired += len(x)
        since_fired[fired] = 0
        with torch.no_grad():
            window_mse += float(mse)
            window_var += float((x - x.mean(0)).pow(2).sum(-1).mean())
            window_aux += float(aux)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            entry = {"step": step + 1, "tokens": (step + 1) * config.batch_size,
                     "explained_variance": 1 - window_mse / window_var, "aux_loss": window_aux / 50,
                     "dead_fraction": float((since_fired >= config.dead_window_tokens).float().mean())}
            log["history"].append(entry)
            bar.set_postfix(ev=f"{entry['explained_variance']:.3f}", dead=f"{entry['dead_fraction']:.4f}")
            window_mse, window_var, window_aux = 0.0, 0.0, 0.0
        bar.update(1)
        if checkpoint is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"trainer": trainer.state_dict(), "optimizer": optimizer.state_dict(),
                        "since_fired": since_fired, "step": step + 1, "log": log, "scale": scale}, tmp)
            tmp.rename(checkpoint)
    bar.close()
    # not tracked without training steps
    log["final_dead_fraction"] = float((since_fired >= config.dead_window_tokens).float().mean()) if steps else None
    log["scale"] = scale
    if config.architecture == "batchtopk":
        log["threshold"] = trainer.batch_topk_threshold(sample / scale)  # normalised units, as training
    return trainer, scale, log


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


WIKITEXT_SPLIT_FILES = {"test": "wiki.test.tokens", "valid": "wiki.valid.tokens"}


def wikitext_windows(tokenizer, data_dir: Path, sequence_length: int, n_sequences: int,
                     split: str = "test") -> list[list[int]]:
    """`n_sequences` pieces of a WikiText-2 split, evenly spaced over it: the *test* split for every
    reported figure; the validation split (which the default corpus trains on) to measure overfitting."""
    ids = tokenizer.encode((data_dir / "wikitext2" / WIKITEXT_SPLIT_FILES[split]).read_text(), add_special_tokens=False)
    available = len(ids) // sequence_length
    n = min(n_sequences, available)
    starts = [int(i * available / n) * sequence_length for i in range(n)]
    return [ids[s:s + sequence_length] for s in starts]


def _suffix_logits(model, h: torch.Tensor, first_layer: int) -> torch.Tensor:
    """Run decoder layers first_layer.. on a residual stream h: [B, T, d] of whole sequences (causal,
    positions 0..T-1) -> float32 logits [B, T, V]. Splicing at layer L recomputes only what follows."""
    h = h.to(model.device)
    B, T, _ = h.shape
    positions = torch.arange(T, device=h.device).expand(B, T)
    attn_mask = (torch.arange(T, device=h.device).view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)
    rope = model.rope.tables(positions)
    slots = torch.arange(B, device=h.device)
    cache = model.new_cache(B)
    for i in range(first_layer, len(model.layers)):
        h = model.layers[i].forward(h, rope, cache.layer(i, slots, positions, T, None), attn_mask, False, None, None)
    return model.head.forward(model.norm.forward(h)).float()


@torch.inference_mode()
def evaluate_sae(model, sae: SparseAutoencoder, sequences: list[list[int]], batch_size: int = 4) -> dict[str, Any]:
    """Explained variance (all positions >= 1, and without massive-norm tokens), L0, latents that never
    fire, and the CE-loss score with the SAE spliced in at its layer (positions >= 1; position 0 is
    left as is), against the original model and zero-ablation (positions >= 1 set to 0). CE is over
    next-token predictions made at positions >= 1 (the prediction at position 0 is the same in every
    mode)."""
    layer = sae.layer
    ce = {"orig": 0.0, "sae": 0.0, "zero": 0.0}
    n_pred = 0
    recorded = []
    for b in tqdm(range(0, len(sequences), batch_size), desc="evaluating SAE (CE with splice)", unit="batch"):
        ids = torch.tensor(sequences[b:b + batch_size])  # [B, T]
        B = ids.shape[0]
        targets = ids[:, 2:].reshape(-1)  # predicted at positions 1..T-2
        edits = ResidualRecorder(layer)
        logits = {"orig": model(ids, torch.arange(B), torch.zeros(B, dtype=torch.long), model.new_cache(B),
                                all_logits=True, edits=edits)}  # [B, T, V]
        h = edits.recorded.to(sae.W_dec.device)  # [B, T, d]: the SAE's device (CPU when trained here)
        spliced = h.clone()
        spliced[:, 1:] = sae.decode(sae.encode(h[:, 1:]))
        logits["sae"] = _suffix_logits(model, spliced, layer + 1)
        zeroed = h.clone()
        zeroed[:, 1:] = 0
        logits["zero"] = _suffix_logits(model, zeroed, layer + 1)
        if b == 0:  # the suffix pass must reproduce the full forward pass exactly
            same = _suffix_logits(model, h, layer + 1)
            if not torch.allclose(same, logits["orig"], atol=1e-3, rtol=1e-3):
                raise RuntimeError("suffix forward pass disagrees with the model's forward pass")
        for mode, values in logits.items():
            ce[mode] += float(F.cross_entropy(values[:, 1:-1].reshape(-1, values.shape[-1]), targets.to(values.device),
                                              reduction="sum"))
        recorded.append(h.reshape(-1, h.shape[-1]).float())  # position 0 included, for the "all" figure
        n_pred += targets.numel()
    ce = {m: v / n_pred for m, v in ce.items()}
    x = torch.cat(recorded)  # [N, d], every position
    x_hat = sae.decode(sae.encode(x))
    position0 = torch.zeros(len(sequences), len(sequences[0]), dtype=torch.bool)
    position0[:, 0] = True
    position0 = position0.reshape(-1)
    later = ~position0
    massive = position0.clone()
    massive[later] = massive_mask(x[later])
    z = sae.encode(x[later])  # the latents of the positions that are spliced

    def explained(keep: torch.Tensor) -> float:
        xs, hs = x[keep], x_hat[keep]
        return float(1 - (xs - hs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())

    fired = (z > 0).any(0)
    return {
        "tokens": int(later.sum()),
        "sequences": len(sequences),
        "explained_variance_all": explained(torch.ones_like(massive)),  # position 0 included
        "explained_variance_positions_1plus": explained(later),
        "explained_variance_without_massive": explained(~massive),
        "massive_tokens_beyond_position_0": int((massive & later).sum()),
        "massive_norm_ratio": MASSIVE_NORM_RATIO,
        "l0": float((z > 0).sum(-1).float().mean()),
        "never_fired_fraction": float(1 - fired.float().mean()),
        "ce_orig": ce["orig"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
        "ce_increase_nats": ce["sae"] - ce["orig"],
        "ce_loss_score": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["orig"]),
    }


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="Model to train on (as for serve). [default]")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="Device for the model's forward passes (SAE training runs on CPU). [cpu]")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Model weights' dtype for collecting activations. [float32]")
    parser.add_argument("--layer", type=int, default=15, help="Residual stream after this decoder layer. [15]")
    parser.add_argument("--width", type=int, default=8192, help="Number of latents (d_sae). [8192]")
    parser.add_argument("--k", type=int, default=32,
                        help="Active latents per token (TopK), or per token on average (BatchTopK). [32]")
    parser.add_argument("--architecture", default="topk", choices=TRAINED_ARCHITECTURES,
                        help="topk: each token's k largest latents; batchtopk: the training batch's k x N "
                             "largest, a single threshold at inference (saved as SAELens jumprelu). [topk]")
    parser.add_argument("--tokens", type=int, default=28_800_000,
                        help="Training tokens processed (several epochs over the corpus when larger); 0 with "
                             "--init-from and --architecture batchtopk: no training, only the threshold. [28.8M]")
    parser.add_argument("--corpus-tokens", type=int, default=1_200_000,
                        help="Tokens of text to collect activations on. [1.2M]")
    parser.add_argument("--collect-tokens", type=int, default=0,
                        help="Collect activations for only this many tokens of the (shuffled) corpus (0: all). [0]")
    parser.add_argument("--corpus-shares", type=parse_corpus_shares, default=None, metavar="SOURCE=SHARE,...",
                        help="Share of --corpus-tokens taken from each text source, e.g. "
                             "'wikitext2-valid=0.5,pile-extraction=0.2'; sources left out give nothing. Sources: "
                             + ", ".join(CORPUS_SOURCES) + ". [" + ",".join(f"{k}={v}" for k, v in CorpusConfig().shares.items()) + "]")
    parser.add_argument("--sample-prompts", type=int, default=96,
                        help="Chat prompts the model answers itself for the corpus (0: none; at most "
                             f"{len(SAMPLE_TASKS) * len(SAMPLE_TOPICS)}). [96]")
    parser.add_argument("--sample-tokens", type=int, default=CorpusConfig.sample_tokens,
                        help=f"Longest answer sampled per prompt. [{CorpusConfig.sample_tokens}]")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1024, help="Tokens per training step. [1024]")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dead-window", type=int, default=250_000,
                        help="A latent that has not fired for this many tokens is dead (AuxK). [250000]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="Default: ../shared/data.")
    parser.add_argument("--eval-sequences", type=int, default=64,
                        help="WikiText-2 test sequences for the reported figures (0: skip). [64]")
    parser.add_argument("--out", type=Path, default=None,
                        help="SAE directory. Default: <cache>/profiles/<model name>/sae-l<L>-resid-<width/1024>k/.")
    parser.add_argument("--init-from", type=Path, default=None, metavar="SAE_DIR",
                        help="Fine-tune this SAE (same model, layer and width) instead of starting from a random "
                             "init, e.g. to move a TopK SAE to BatchTopK with a short, low-lr run. [off]")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the last checkpoint of the same run (same flags and seed).")


def parse_corpus_shares(text: str) -> dict[str, float]:
    shares = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in CORPUS_SOURCES:
            raise argparse.ArgumentTypeError(f"{item!r}: expected SOURCE=SHARE with SOURCE one of {', '.join(CORPUS_SOURCES)}")
        try:
            shares[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: share {value!r} is not a number") from None
        if not 0 <= shares[name] <= 1:
            raise argparse.ArgumentTypeError(f"{item!r}: a share is between 0 and 1")
    if not shares or sum(shares.values()) > 1 + 1e-9:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one source, shares summing to at most 1")
    return shares


def run(args: argparse.Namespace) -> int:
    from server.profiles import model_slug
    from server.runtime import load_model
    from server.settings import ServerSettings

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    # room for the corpus windows and for the model's own samples (a chat prompt + sample_tokens)
    settings = ServerSettings(model=args.model, device=args.device, dtype=args.dtype, wina_profile="none",
                              max_model_len=max(args.sequence_length, args.sample_tokens + 256))
    loaded = load_model(settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    if not 0 <= args.sample_prompts <= len(SAMPLE_TASKS) * len(SAMPLE_TOPICS):
        print(f"neuronserve: --sample-prompts {args.sample_prompts} outside 0..{len(SAMPLE_TASKS) * len(SAMPLE_TOPICS)} "
              "(the topic x task prompts)", file=sys.stderr)
        return 2
    if args.sample_tokens < 1:
        print(f"neuronserve: --sample-tokens {args.sample_tokens} must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.layer < len(model.layers):
        print(f"neuronserve: --layer {args.layer} outside 0..{len(model.layers) - 1}", file=sys.stderr)
        return 2
    if args.tokens < 0 or (args.tokens == 0 and args.init_from is None):
        print(f"neuronserve: --tokens {args.tokens}: give a positive number (0 only with --init-from)", file=sys.stderr)
        return 2
    initial = None
    if args.init_from is not None:
        try:
            initial = SparseAutoencoder.load(args.init_from)
            check_model(initial, model.config.hidden_size, loaded.fingerprint, len(model.layers))
        except SaeFormatError as error:
            print(f"neuronserve: --init-from {args.init_from}: {error}", file=sys.stderr)
            return 2
        if (initial.layer, initial.cfg.d_sae) != (args.layer, args.width):
            print(f"neuronserve: --init-from {args.init_from} is layer {initial.layer}, width {initial.cfg.d_sae}; "
                  f"this run asks for layer {args.layer}, width {args.width}", file=sys.stderr)
            return 2
    corpus_config = CorpusConfig(corpus_tokens=args.corpus_tokens, sequence_length=args.sequence_length,
                                 sample_prompts=args.sample_prompts, sample_tokens=args.sample_tokens, seed=args.seed,
                                 **({"shares": args.corpus_shares} if args.corpus_shares else {}),
                                 **({"data_dir": args.data_dir} if args.data_dir else {}))
    if not (corpus_config.data_dir / "wikitext2").is_dir():
        print(f"neuronserve: calibration data not found under {corpus_config.data_dir} (--data-dir)", file=sys.stderr)
        return 2
    train_config = SaeTrainingConfig(layer=args.layer, width=args.width, k=args.k, architecture=args.architecture,
                                     train_tokens=args.tokens,
                                     batch_size=args.batch_size, lr=args.lr, dead_window_tokens=args.dead_window,
                                     seed=args.seed)
    cache_root = settings.cache_dir
    corpus_key = hashlib.sha256(json.dumps({k: str(v) for k, v in asdict(corpus_config).items()}, sort_keys=True)
                                .encode() + loaded.fingerprint.encode()).hexdigest()[:16]
    corpus_file = cache_root / "sae-corpus" / f"{corpus_key}.json"
    if corpus_file.exists():
        saved = json.loads(corpus_file.read_text())
        sequences, source_of, described = saved["sequences"], saved["sources"], saved["described"]
    else:
        sequences, source_of, described = build_corpus(model, tokenizer, corpus_config)
        corpus_file.parent.mkdir(parents=True, exist_ok=True)
        corpus_file.write_text(json.dumps({"sequences": sequences, "sources": source_of, "described": described}))
    for source in described:
        print(f"corpus: {source['source']}: {source['tokens']} tokens ({source['what']})")
    act_dir = activation_cache_dir(cache_root, loaded.fingerprint, args.layer, sequences)
    # The corpus is shuffled, so its first shards are a uniform sample of every source.
    n_shards = math.ceil(len(sequences) / SHARD_SEQUENCES)
    if args.collect_tokens:
        n_shards = min(n_shards, math.ceil(args.collect_tokens / (SHARD_SEQUENCES * (args.sequence_length - 1))))
    collect_activations(model, args.layer, sequences, act_dir, n_shards)
    acts = load_activations(act_dir, n_shards)  # [N, d] float16, positions >= 1
    used = {}
    for seq_index in range(min(n_shards * SHARD_SEQUENCES, len(sequences))):
        source = source_of[seq_index]
        used[source] = used.get(source, 0) + args.sequence_length - 1
    for source in described:
        source["tokens_trained_on"] = used.get(source["source"], 0)
    massive = massive_mask(acts)
    acts = acts[~massive]
    print(f"activations: {acts.shape[0]} tokens at layer {args.layer} ({int(massive.sum())} massive-norm tokens "
          f"beyond position 0 left out), cached in {act_dir}")
    initial_digest = "" if initial is None else hashlib.sha256(initial.W_dec.numpy().tobytes()).hexdigest()[:16]
    run_key = hashlib.sha256((act_dir.name + json.dumps(asdict(train_config), sort_keys=True) + initial_digest)
                             .encode()).hexdigest()[:16]
    checkpoint = cache_root / "sae-train" / f"{run_key}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    trainer, scale, log = train_sae(acts, train_config, checkpoint, resume=args.resume, initial=initial)
    metadata: dict[str, Any] = {
        "neuronserve_model_fingerprint": loaded.fingerprint,
        "neuronserve_training": {
            "recipe": ("BatchTopK (Bussmann et al. 2024)" if args.architecture == "batchtopk" else "TopK")
            + " + AuxK (Gao et al. 2024), unit-norm decoder, "
            + ("b_dec at geometric median, W_enc = W_dec^T init" if initial is None
               else f"fine-tuned from {args.init_from.resolve().name} (weights sha256 {initial_digest})"),
            "corpus": described, "corpus_tokens": int(acts.shape[0]),
            "massive_tokens_left_out": int(massive.sum()), "position_0": "left out",
            "train_tokens": train_config.train_tokens, "epochs": train_config.train_tokens / acts.shape[0],
            "batch_size": train_config.batch_size, "lr": train_config.lr, "aux_k": train_config.aux_k or acts.shape[1] // 2,
            "aux_coefficient": train_config.aux_coefficient, "dead_window_tokens": train_config.dead_window_tokens,
            "seed": train_config.seed, "activations_dtype": f"model weights {args.dtype}, residual float32, cached float16",
            "final_dead_fraction": log["final_dead_fraction"],
            "final_train_explained_variance": log["history"][-1]["explained_variance"] if log["history"] else None,
            "train_seconds": round(time.time() - started),
        },
    }
    if "threshold" in log:
        metadata["neuronserve_training"]["threshold_normalised"] = log["threshold"]
    sae = export_sae(trainer, scale, args.layer, train_config, loaded.name, args.sequence_length, metadata,
                     log.get("threshold"))
    if args.eval_sequences > 0:
        sequences_test = wikitext_windows(tokenizer, corpus_config.data_dir, args.sequence_length, args.eval_sequences)
        # Evaluate the weights as they will be saved (16-bit), not the float32 trainer.
        rounded = SparseAutoencoder(sae.cfg, *(None if t is None else t.to(getattr(torch, train_config.dtype)).float()
                                               for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold)))
        figures = evaluate_sae(model, rounded, sequences_test)
        sae.cfg.extra_metadata["neuronserve_eval"] = {"data": "wikitext2/wiki.test.tokens", **figures}
        print("eval (WikiText-2 test): " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in figures.items()))
    out = args.out or cache_root / "profiles" / model_slug(loaded.name) / f"sae-l{args.layer}-resid-{args.width // 1024}k"
    sae.save(out)
    print(f"wrote {out}")
    return 0
