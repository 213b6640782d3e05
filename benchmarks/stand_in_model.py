#!/usr/bin/env python3
"""A random-weight Llama of the default model's shapes (SmolLM2-135M), saved as a transformers
checkpoint directory, for timing and testing where the default model's GGUF file is not at hand (a
lent GPU machine gets no copy of it). It exercises the same code paths at the same sizes; it says
nothing about quality, and WINA profiles calibrated on it fit only it.

    python benchmarks/stand_in_model.py OUT_DIR --tokenizer DIR [--seed 0]

DIR holds the default model's tokenizer (`tokenizer.save_pretrained`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# SmolLM2-135M-Instruct's shapes. A wider init than transformers' 0.02 spreads the random model's
# logits (std ~2 instead of ~0.5), so that greedy choices are not decided by rounding.
STAND_IN_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       tie_word_embeddings=True, initializer_range=0.05)


def save_stand_in(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **STAND_IN_SHAPES)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_stand_in(args.out, args.tokenizer, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
