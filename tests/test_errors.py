"""Bad input gets one clear VoxtralError, never a traceback from deep inside or a silent wrong answer."""

import json
import shutil

import numpy as np
import pytest

import voxtral_ref
from voxtral_ref import VoxtralError
from voxtral_ref.checkpoint.weights import read_safetensors, write_safetensors

from conftest import MODEL_DIRS


@pytest.fixture
def mistral_copy(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(MODEL_DIRS["mistral"], d)
    return d


def expect_error(fn, *words):
    with pytest.raises(VoxtralError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_missing_directory(tmp_path):
    expect_error(lambda: voxtral_ref.load(tmp_path / "nope"), "not found")


def test_directory_without_weights(tmp_path):
    expect_error(lambda: voxtral_ref.load(tmp_path), "no Voxtral checkpoint")


def test_truncated_safetensors(mistral_copy):
    f = mistral_copy / "consolidated.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(lambda: voxtral_ref.load(mistral_copy), "truncated")


@pytest.mark.parametrize("garbage", [b"", b"1234", b"\xff" * 64, (20).to_bytes(8, "little") + b"{not json} " * 4])
def test_corrupt_safetensors(mistral_copy, garbage):
    (mistral_copy / "consolidated.safetensors").write_bytes(garbage)
    expect_error(lambda: voxtral_ref.load(mistral_copy), "consolidated.safetensors")


def test_missing_tensor(mistral_copy):
    f = mistral_copy / "consolidated.safetensors"
    t = dict(read_safetensors(f))
    name = next(n for n in t if n.endswith("layers.0.attention.wq.weight"))
    del t[name]
    write_safetensors(f, {k: np.array(v) for k, v in t.items()})
    expect_error(lambda: voxtral_ref.load(mistral_copy), "missing tensors", name)


def test_shapes_that_disagree_with_the_config(mistral_copy):
    p = mistral_copy / "params.json"
    params = json.loads(p.read_text())
    params["hidden_dim"] += 2
    p.write_text(json.dumps(params))
    expect_error(lambda: voxtral_ref.load(mistral_copy), "has shape", "the config says")


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.update(n_kv_heads=3), ("inconsistent config", "n_kv_heads")),
    (lambda p: p.pop("dim"), ("lacks the key", "dim")),
    (lambda p: p.pop("multimodal"), ("not a Voxtral checkpoint",)),
    (lambda p: p.update(n_layers=-1), ("positive integer",)),
])
def test_inconsistent_params(mistral_copy, edit, words):
    p = mistral_copy / "params.json"
    params = json.loads(p.read_text())
    edit(params)
    p.write_text(json.dumps(params))
    expect_error(lambda: voxtral_ref.load(mistral_copy), *words)


def test_corrupt_and_missing_tekken(mistral_copy):
    (mistral_copy / "tekken.json").write_text('{"vocab": [')
    expect_error(lambda: voxtral_ref.load(mistral_copy), "tekken.json")
    (mistral_copy / "tekken.json").unlink()
    expect_error(lambda: voxtral_ref.load(mistral_copy), "missing file", "tekken.json")


def test_tekken_audio_section_must_match_the_front_end(mistral_copy):
    p = mistral_copy / "tekken.json"
    t = json.loads(p.read_text())
    t["audio"]["sampling_rate"] = 24000
    p.write_text(json.dumps(t))
    expect_error(lambda: voxtral_ref.load(mistral_copy), "sampling_rate")


@pytest.mark.parametrize("audio, words", [
    (np.array([], np.float32), ("empty",)),
    (np.array([0.1, np.nan, 0.2], np.float32), ("NaN",)),
    (np.array([0.1, np.inf], np.float32), ("NaN or infinite",)),
    (np.zeros((2, 2, 2), np.float32), ("shape",)),
    (np.array(["a", "b"]), ("dtype",)),
])
def test_bad_audio(tiny_mistral, audio, words):
    expect_error(lambda: tiny_mistral.transcribe(audio), *words)


@pytest.mark.parametrize("delay", [0, 40, 100, 1280, 2320, 4800, -80, "480", True])
def test_impossible_delay(tiny_mistral, delay):
    expect_error(lambda: tiny_mistral.transcribe(np.zeros(1600, np.float32), delay_ms=delay), "delay_ms")


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, True])
def test_impossible_sample_rate(tiny_mistral, rate):
    expect_error(lambda: tiny_mistral.transcribe(np.zeros(1600, np.float32), sample_rate=rate), "sample_rate")


def test_unknown_backend_precision_or_quantize():
    expect_error(lambda: voxtral_ref.load(MODEL_DIRS["mistral"], backend="gpu"), "backend")
    expect_error(lambda: voxtral_ref.load(MODEL_DIRS["mistral"], precision="fp16"), "precision")
    expect_error(lambda: voxtral_ref.load(MODEL_DIRS["mistral"], quantize="int4"), "quantize")
