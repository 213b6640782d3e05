"""Concept steering vectors: difference in means against a hand computation, llama.cpp control
vectors (GGUF) read with the right layers and values, and widths that do not fit refused."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from server.calibration.vector import (VectorCalibrationConfig, add_arguments, difference_in_means, read_texts,
                                       run)
from server.interventions.vectors import SteeringVector, load_control_vector_gguf
from server.profiles import ProfileError, load_profile
from server.runtime import load_model
from server.settings import ServerSettings

POSITIVE = ["The bride and groom cut the wedding cake.", "Guests threw rice at the newlyweds.",
            "She walked down the aisle in a white dress."]
NEGATIVE = ["The committee approved the annual budget.", "He fixed the bicycle chain in the garage.",
            "Rain is expected on Tuesday afternoon."]


@pytest.fixture(scope="module")
def loaded():
    # float32 so the batched (right-padded) path and the one-text-at-a-time reference agree closely
    return load_model(ServerSettings(max_model_len=128, wina_profile="none", dtype="float32", log_level="warning"))


def _hand_mean(model, tokenizer, texts, layer):
    """Each text alone through residual_stream, positions >= 1 averaged, then the texts averaged."""
    per_text = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text)])
        h = model.residual_stream(ids, layer)[0]  # [T, hidden]
        per_text.append(h[1:].mean(dim=0))
    return torch.stack(per_text).mean(dim=0)


def test_difference_in_means_is_the_hand_computed_mean(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    layer = 7
    # batch size 2 over 3 texts of different lengths: padding and a second batch are exercised
    vector, counts, quality = difference_in_means(model, tokenizer, POSITIVE, NEGATIVE,
                                                  VectorCalibrationConfig(layer=layer, batch_size=2))
    expected = _hand_mean(model, tokenizer, POSITIVE, layer) - _hand_mean(model, tokenizer, NEGATIVE, layer)
    assert vector.shape == (model.config.hidden_size,)
    # float32 throughout; batched attention with a mask vs. one causal sequence differs only by
    # summation order (~1e-5 relative on residuals of norm ~100)
    torch.testing.assert_close(vector, expected, rtol=1e-4, atol=2e-3)
    # position 0 really is left out: including it would move the mean by far more than the tolerance
    with_sink = torch.stack([model.residual_stream(torch.tensor([tokenizer.encode(t)]), layer)[0].mean(0)
                             for t in POSITIVE]).mean(0)
    assert (with_sink - _hand_mean(model, tokenizer, POSITIVE, layer)).norm() > 1.0
    assert counts["positive"]["texts"] == 3 and counts["negative"]["texts"] == 3
    assert counts["positive"]["tokens"] == sum(len(tokenizer.encode(t)) - 1 for t in POSITIVE)
    assert quality["norm"] == pytest.approx(float(expected.norm()), rel=1e-3)


def test_read_texts_plain_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first example\n\n  second example  \n")
    assert read_texts(plain) == ["first example", "  second example  "]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "line one\nline two"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    assert read_texts(jsonl) == ["line one\nline two", "x"]
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"prompt": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        read_texts(bad)


def _write_control_vector(path, directions: dict[int, np.ndarray], arch: str = "controlvector") -> None:
    """The file llama.cpp's cvector-generator and repeng write: arch "controlvector", one F32
    tensor direction.N per layer N >= 1."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_int32(f"{arch}.layer_count", len(directions))
    for layer, values in directions.items():
        writer.add_tensor(f"direction.{layer}", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_control_vector_loads_with_its_layers_and_values(tmp_path, loaded):
    hidden, num_layers = loaded.model.config.hidden_size, len(loaded.model.layers)
    rng = np.random.default_rng(0)
    directions = {n: rng.standard_normal(hidden).astype(np.float32) for n in range(1, num_layers)}
    directions[5] = np.zeros(hidden, np.float32)  # generators write every layer; a zero one adds nothing
    path = tmp_path / "happy.gguf"
    _write_control_vector(path, directions)
    vector = load_control_vector_gguf(path)
    assert vector.name == "happy"
    # direction.N is added after our decoder layer N (llama.cpp's graph layer il = N, 0-based)
    assert vector.layers == tuple(n for n in range(1, num_layers) if n != 5)
    for row, layer in enumerate(vector.layers):
        assert torch.equal(vector.directions[row], torch.from_numpy(directions[layer]))
    assert vector.metadata["model_hint"] == "llama" and vector.metadata["zero_layers_dropped"] == [5]
    vector.check_model(hidden, num_layers)  # fits the served model


def test_gguf_control_vector_of_the_wrong_width_is_refused(tmp_path, loaded):
    hidden, num_layers = loaded.model.config.hidden_size, len(loaded.model.layers)
    path = tmp_path / "llama8b.gguf"
    _write_control_vector(path, {n: np.ones(4096) for n in range(1, 4)})  # a Llama-3-8B vector
    vector = load_control_vector_gguf(path)
    with pytest.raises(ProfileError, match="width 4096"):
        vector.check_model(hidden, num_layers)
    # a layer the model does not have is refused too (llama.cpp would drop it silently)
    deep = tmp_path / "deep.gguf"
    _write_control_vector(deep, {num_layers + 2: np.ones(hidden)})
    with pytest.raises(ProfileError, match="layers"):
        load_control_vector_gguf(deep).check_model(hidden, num_layers)


def test_gguf_files_that_are_not_control_vectors_are_refused(tmp_path):
    zero = tmp_path / "zero.gguf"
    _write_control_vector(zero, {0: np.ones(8)})
    with pytest.raises(ProfileError, match="direction.0"):
        load_control_vector_gguf(zero)
    mixed = tmp_path / "mixed.gguf"
    _write_control_vector(mixed, {1: np.ones(8), 2: np.ones(9)})
    with pytest.raises(ProfileError, match="widths"):
        load_control_vector_gguf(mixed)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ProfileError):
        load_control_vector_gguf(not_gguf)


def _calibrate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def test_calibrate_vector_command_writes_a_profile(tmp_path, loaded):
    pos, neg = tmp_path / "weddings.pos.txt", tmp_path / "weddings.neg.txt"
    pos.write_text("\n".join(POSITIVE) + "\n")
    neg.write_text("\n".join(NEGATIVE) + "\n")
    assert _calibrate(["--positive", str(pos), "--negative", str(neg), "--layer", "7", "--dtype", "float32",
                       "--out", str(tmp_path)]) == 0
    profile = load_profile(tmp_path / "vector-weddings.safetensors")
    profile.check_model(loaded.fingerprint, loaded.name)
    vector = SteeringVector.from_profile(profile)
    assert vector.layers == (7,) and vector.name == "weddings"
    expected = (_hand_mean(loaded.model, loaded.tokenizer, POSITIVE, 7)
                - _hand_mean(loaded.model, loaded.tokenizer, NEGATIVE, 7))
    torch.testing.assert_close(vector.directions[0], expected, rtol=1e-4, atol=2e-3)  # as above
    assert profile.header["parameters"]["layer"] == 7
    assert profile.header["data"]["positive"]["texts"] == 3
    assert profile.header["quality"]["norm"] > 0
    # a GGUF control vector converts into a profile with its layers kept
    gguf_path = tmp_path / "calm.gguf"
    _write_control_vector(gguf_path, {3: np.full(loaded.model.config.hidden_size, 0.5)})
    assert _calibrate(["--from-gguf", str(gguf_path), "--out", str(tmp_path)]) == 0
    converted = SteeringVector.from_profile(load_profile(tmp_path / "vector-calm.safetensors"))
    assert converted.layers == (3,) and torch.all(converted.directions == 0.5)
    # missing inputs and a layer out of range are refused with exit code 2
    assert _calibrate(["--positive", str(pos), "--out", str(tmp_path)]) == 2
    assert _calibrate(["--positive", str(pos), "--negative", str(neg), "--layer", "99", "--out", str(tmp_path)]) == 2


def test_shipped_concept_vectors_fit_the_default_model(loaded):
    """The vectors committed for the default model (concepts, and `toxicity` from the EigenShift
    calibration) load for it, so a fresh server can steer with {"vector": NAME} out of the box."""
    from server.settings import default_profile_dirs

    shipped = sorted(default_profile_dirs()[0].glob("smollm2-135m-instruct/vector-*.safetensors"))
    assert len(shipped) >= 3
    for path in shipped:
        profile = load_profile(path)
        profile.check_model(loaded.fingerprint, loaded.name)  # float32 load: same fingerprint
        vector = SteeringVector.from_profile(profile)
        vector.check_model(loaded.model.config.hidden_size, len(loaded.model.layers))
        # inside the usable window of added norms (README: about 20-50 at strength 1-2)
        assert vector.layers == (15,) and 10 < float(vector.directions.norm()) < 60
