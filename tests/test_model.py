"""Our decoder against transformers' own forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kernels.cpu_build import supported_instruction_sets
from kernels.dense_cpu import CpuDenseKernel
from server.model import LlamaDecoder, ModelConfig
from server.model.loader import load_checkpoint
from server.settings import default_cache_dir

PROMPT = "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed"


def _ours(ckpt, dtype=torch.float32, max_len=256, dense_kernel=True, instruction_set="auto") -> LlamaDecoder:
    # the served CPU path: few-row projections through our dense kernel where it builds
    return LlamaDecoder(ModelConfig.from_hf(ckpt.hf_config), ckpt.state_dict, dtype, torch.device("cpu"), max_len,
                        CpuDenseKernel.load(instruction_set=instruction_set) if dense_kernel else None)


def _reference_logits(ckpt, ids: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_config(ckpt.hf_config, dtype=torch.float32)
    hf.load_state_dict(ckpt.state_dict, strict=False)
    hf.tie_weights()
    with torch.no_grad():
        return hf.eval()(ids).logits


@pytest.fixture(scope="module")
def default_ckpt():
    return load_checkpoint("default", default_cache_dir())


def test_default_model_matches_transformers(default_ckpt):
    ids = default_ckpt.tokenizer(PROMPT, return_tensors="pt").input_ids
    ref = _reference_logits(default_ckpt, ids)
    model = _ours(default_ckpt)
    cache = model.new_cache(2)
    ours = model(ids, torch.tensor([1]), torch.tensor([0]), cache, all_logits=True)
    # Both run fp32 with the same op order except SDPA's kernel choice and a fused RMSNorm; the
    # logits reach ~30 in magnitude, so 1e-3 absolute is ~1e-5 relative: float32 rounding.
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_chunked_prefill_and_decode_match_one_pass(default_ckpt):
    ids = default_ckpt.tokenizer(PROMPT, return_tensors="pt").input_ids
    model = _ours(default_ckpt)
    cache = model.new_cache(3)
    whole = model(ids, torch.tensor([0]), torch.tensor([0]), cache, all_logits=True)
    n = ids.shape[1]
    parts = [model(ids[:, :5], torch.tensor([2]), torch.tensor([0]), cache, all_logits=True),
             model(ids[:, 5:n - 1], torch.tensor([2]), torch.tensor([5]), cache, all_logits=True),
             model(ids[:, n - 1:], torch.tensor([2]), torch.tensor([n - 1]), cache, all_logits=True)]
    # Same math in a different blocking (chunk sizes change the matmul shapes): float32 rounding.
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-3, rtol=0)


def test_batched_decode_rows_are_independent(default_ckpt):
    """Two prompts of different lengths decoded together equal each decoded alone."""
    tok = default_ckpt.tokenizer
    model = _ours(default_ckpt)
    cache = model.new_cache(4)
    a = tok("Hello there, my name is", return_tensors="pt").input_ids
    b = tok("Once upon a time in a land far, far away, there", return_tensors="pt").input_ids
    model(a, torch.tensor([0]), torch.tensor([0]), cache)
    model(b, torch.tensor([3]), torch.tensor([0]), cache)
    nxt = torch.tensor([[11], [12]])
    together = model(nxt, torch.tensor([0, 3]), torch.tensor([a.shape[1], b.shape[1]]), cache)
    alone_a = model(nxt[:1], torch.tensor([0]), torch.tensor([a.shape[1]]), cache)
    alone_b = model(nxt[1:], torch.tensor([3]), torch.tensor([b.shape[1]]), cache)
    # Masked padding keys contribute exact zeros; only matmul blocking differs (fp32 rounding).
    torch.testing.assert_close(together, torch.cat([alone_a, alone_b]), atol=1e-3, rtol=0)


def test_decode_reads_contiguous_and_scattered_slots_alike(default_ckpt):
    """A batch whose slots are one ascending range reads the cache as a view; any other slot order
    gathers it. Both must give each row its own keys: the same prompts in slots 0, 1, 2 and in
    slots 5, 3, 4 decode to the same logits."""
    tok = default_ckpt.tokenizer
    model = _ours(default_ckpt, dtype=torch.float16)  # half weights, as served on CPU
    cache = model.new_cache(6)
    prompts = [tok(t, return_tensors="pt").input_ids for t in
               ("Hello there, my name is", "Once upon a time in a land far away", "def add(a, b):")]
    for slots in ([0, 1, 2], [5, 3, 4]):
        for slot, ids in zip(slots, prompts):
            model(ids, torch.tensor([slot]), torch.tensor([0]), cache)
    nxt = torch.tensor([[11], [12], [13]])
    starts = torch.tensor([p.shape[1] for p in prompts])
    contiguous = model(nxt, torch.tensor([0, 1, 2]), starts, cache)
    scattered = model(nxt, torch.tensor([5, 3, 4]), starts, cache)
    assert torch.equal(contiguous, scattered)
    alone = model(nxt[1:2], torch.tensor([1]), starts[1:2], cache)  # slot 1 written twice: same keys
    assert contiguous.argmax(-1)[1] == alone.argmax(-1)[0]


@pytest.mark.skipif(CpuDenseKernel.load() is None, reason="CPU dense kernel needs AVX2/FMA/F16C and gcc")
def test_dense_kernel_decodes_as_torch_does(default_ckpt):
    """Half weights with few-row projections through our kernel and through torch's GEMV/GEMM:
    the same math up to float32 summation order (and the kernel keeps the GEMV's input in float32
    where torch's half GEMV rounds it to half), so greedy decoding of two rows must pick the same
    tokens and the logits must stay within half-precision rounding."""
    tok = default_ckpt.tokenizer
    models = [_ours(default_ckpt, dtype=torch.float16, dense_kernel=use) for use in (True, False)]
    assert models[0].head.dense_kernel is not None and models[1].head.dense_kernel is None
    prompts = [tok(t, return_tensors="pt").input_ids for t in ("The capital of France is", PROMPT)]
    tokens, logits = [], []
    for model in models:
        cache = model.new_cache(2)
        last = torch.stack([model(ids, torch.tensor([slot]), torch.tensor([0]), cache)[0]
                            for slot, ids in enumerate(prompts)])  # [2, V]
        starts = torch.tensor([p.shape[1] for p in prompts])
        steps = []
        for step in range(12):
            nxt = last.argmax(-1, keepdim=True)  # [2, 1]
            steps.append(nxt)
            last = model(nxt, torch.tensor([0, 1]), starts + step, cache)
        tokens.append(torch.cat(steps, dim=1))
        logits.append(last)
    assert torch.equal(tokens[0], tokens[1])
    torch.testing.assert_close(logits[0], logits[1], atol=0.1, rtol=0)


@pytest.mark.skipif(len(supported_instruction_sets()) < 2 or CpuDenseKernel.load(instruction_set="avx512") is None,
                    reason="this CPU runs one build of the kernel (AVX-512 needs avx512f/vl/bw/dq)")
def test_kernel_builds_decode_to_the_same_bits(default_ckpt):
    """The AVX2 and AVX-512 builds of the CPU kernel, through the whole served path (a prompt over
    MAX_ROWS tokens through the torch layer, a short one through the fused layer, then fused decode
    steps of three rows): the same logits, bit for bit."""
    tok = default_ckpt.tokenizer
    prompts = [tok(PROMPT * 6, return_tensors="pt").input_ids, tok("The capital of France is", return_tensors="pt").input_ids,
               tok(PROMPT, return_tensors="pt").input_ids]
    assert prompts[0].shape[1] > CpuDenseKernel.MAX_ROWS >= max(p.shape[1] for p in prompts[1:])
    results = []
    for instruction_set in ("avx2", "avx512"):
        model = _ours(default_ckpt, dtype=torch.float16, max_len=512, instruction_set=instruction_set)
        assert model.dense_kernel.instruction_set == instruction_set and model.decode_layers is not None
        cache = model.new_cache(3)
        last = torch.stack([model(ids, torch.tensor([slot]), torch.tensor([0]), cache)[0]
                            for slot, ids in enumerate(prompts)])  # [3, V]
        outputs = [last]
        starts = torch.tensor([p.shape[1] for p in prompts])
        for step in range(6):
            last = model(last.argmax(-1, keepdim=True), torch.arange(3), starts + step, cache)
            outputs.append(last)
        results.append(torch.stack(outputs))
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(CpuDenseKernel.load() is None, reason="CPU dense kernel needs AVX2/FMA/F16C and gcc")
def test_half_kv_cache_written_by_either_path(default_ckpt):
    """On CPU with the kernel the KV cache is in the model dtype. A prompt chunk over MAX_ROWS
    tokens writes it through the torch layer (which reads float32 copies), shorter chunks and
    decode steps through the kernel: either writer, then kernel decode steps, gives the same
    greedy tokens and logits within half-precision rounding."""
    model = _ours(default_ckpt, dtype=torch.float16, max_len=256)
    assert model.kv_dtype == torch.float16 and model.decode_layers is not None
    ids = torch.randint(0, default_ckpt.hf_config.vocab_size, (1, CpuDenseKernel.MAX_ROWS + 16),
                        generator=torch.Generator().manual_seed(0))
    T = ids.shape[1]
    results = []
    for chunks in ([(0, T)], [(0, T // 2), (T // 2, T)]):  # torch layer, then the fused kernel
        cache = model.new_cache(1)
        for a, b in chunks:
            last = model(ids[:, a:b], torch.tensor([0]), torch.tensor([a]), cache)
        steps = []
        for step in range(4):
            token = last.argmax(-1, keepdim=True)  # [1, 1]
            steps.append(token)
            last = model(token, torch.tensor([0]), torch.tensor([T + step]), cache)
        results.append((torch.cat(steps, dim=1), last))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=0.1, rtol=0)


@pytest.mark.parametrize(
    "tied,bias,rope,head_dim,heads,kv_heads,T",
    [(True, False, None, 16, 4, 2, 40),
     (False, True, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0},
      16, 4, 2, 40),
     (False, False, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, 16, 4, 2, 40),
     (True, False, None, 12, 4, 2, 40),  # not a multiple of 8: the kernel's attention takes its scalar tail
     # the kernel's attention takes query heads three at a time (3 + 3 + 2 here), and keys in
     # blocks of 64: decode steps up to position 99 cross one
     (True, False, None, 16, 8, 1, 100)],
    ids=["tied", "untied-bias-llama3", "linear-rope", "head-dim-12", "eight-query-heads-per-kv-head"],
)
def test_random_llama_checkpoint_matches_transformers(tmp_path, default_ckpt, tied, bias, rope, head_dim, heads,
                                                      kv_heads, T):
    """A small random-weight Llama saved to disk loads through the checkpoint-directory path."""
    torch.manual_seed(0)
    kwargs = dict(vocab_size=default_ckpt.hf_config.vocab_size, hidden_size=heads * head_dim, intermediate_size=96,
                  num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, tie_word_embeddings=tied, attention_bias=bias,
                  rms_norm_eps=1e-6)
    if rope is not None:
        kwargs["rope_parameters"] = rope
    config = LlamaConfig(**kwargs)
    model = LlamaForCausalLM(config).eval()
    if bias:
        for layer in model.model.layers:  # random, so a broken bias path cannot pass by zeros
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(tmp_path)
    default_ckpt.tokenizer.save_pretrained(tmp_path)
    cache_dir = tmp_path.parent / f"{tmp_path.name}-cache"
    assert not load_checkpoint(str(tmp_path), cache_dir=cache_dir).from_cache  # converts and caches
    ckpt = load_checkpoint(str(tmp_path), cache_dir=cache_dir)  # a tied head must survive the cache
    assert ckpt.from_cache
    ids = torch.randint(0, config.vocab_size, (1, T))
    with torch.no_grad():
        ref = model(ids).logits
    ours = _ours(ckpt)
    out = ours(ids, torch.tensor([0]), torch.tensor([0]), ours.new_cache(1), all_logits=True)
    # Random small weights give logits of order 1: 1e-4 is float32 rounding over three layers.
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the tokens after 37 again as decode steps (the CPU decode kernel's path), in slot 2 of 3,
    # after a prefill in chunks (each one fused kernel call per layer, as short prompt chunks run)
    cache = ours.new_cache(3)
    chunks = [ours(ids[:, a:b], torch.tensor([2]), torch.tensor([a]), cache, all_logits=True)
              for a, b in ((0, 12), (12, 28), (28, 37))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), ref[:, :37], atol=1e-4, rtol=1e-4)
    steps = [ours(ids[:, p:p + 1], torch.tensor([2]), torch.tensor([p]), cache) for p in range(37, T)]
    torch.testing.assert_close(torch.stack(steps, dim=1), ref[:, 37:T], atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a Llama-family"):
        ModelConfig.from_hf(GPT2Config(n_layer=1, n_embd=32, n_head=2))
