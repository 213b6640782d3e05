"""The same model code on CUDA; skipped cleanly where torch sees no GPU."""

from __future__ import annotations

import pytest
import torch

from server.model import LlamaDecoder, ModelConfig
from server.model.loader import load_checkpoint
from server.settings import default_cache_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_forward_matches_cpu_float32():
    ckpt = load_checkpoint("default", default_cache_dir())
    config = ModelConfig.from_hf(ckpt.hf_config)
    ids = ckpt.tokenizer("The capital of France is", return_tensors="pt").input_ids
    outs = []
    for device in ("cpu", "cuda"):
        model = LlamaDecoder(config, ckpt.state_dict, torch.float32, torch.device(device), 128)
        cache = model.new_cache(2)
        dev = torch.device(device)
        logits = model(ids.to(dev), torch.tensor([0], device=dev), torch.tensor([0], device=dev), cache,
                       all_logits=True)
        outs.append(logits.cpu())
    # TF32 matmuls on CUDA keep ~1e-3 relative precision; logits reach ~30, so 0.1 absolute.
    torch.testing.assert_close(outs[1], outs[0], atol=0.1, rtol=0)
    assert torch.equal(outs[1][0, -1].argmax(), outs[0][0, -1].argmax())
