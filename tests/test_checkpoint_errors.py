"""Checkpoints that are quantised, mislabelled or describe a model this implementation does not run: one clear
VoxtralError naming the field, never a traceback, a silent fallback or a silently different model."""

import shutil

import numpy as np
import pytest

import voxtral_ref
from voxtral_ref.checkpoint import quantized
from voxtral_ref.checkpoint.weights import read_safetensors, write_safetensors
from voxtral_ref.model import write_quantized

from conftest import MODEL_DIRS, edit_json, expect_error, load_case

M = MODEL_DIRS["mistral"]


@pytest.fixture(scope="module")
def q4_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny_q4"
    write_quantized(voxtral_ref.load(M, quantize="q4"), out)
    return out


@pytest.fixture
def q4_copy(q4_dir, tmp_path):
    return shutil.copytree(q4_dir, tmp_path / "q4")


def rewrite_quantized(d, edit_meta=None, edit_tensors=None):
    """Rewrite d's quantized.safetensors with its metadata and tensors edited in place."""
    path = d / quantized.QFILE
    meta = dict(quantized.read_metadata(path))
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    (edit_meta or (lambda m: None))(meta)
    (edit_tensors or (lambda t: None))(tensors)
    write_safetensors(path, tensors, meta)


# --- quantised checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("quantized", "[1, 2]"),                                   # AttributeError: 'list' ... 'items', before
    ("quantized", '{"dec.layers.0.w1": "q4"}'),
    ("quantized", "not json"),
    ("source", "{}"),
    ("source", '[{"name": "consolidated.safetensors"}]'),
])
def test_quantized_metadata_of_the_wrong_type(q4_copy, key, value):
    rewrite_quantized(q4_copy, edit_meta=lambda m: m.update({key: value}))
    expect_error(lambda: voxtral_ref.load(q4_copy), "quantized.safetensors", key)


@pytest.mark.parametrize("name", ["dec.layers.0.ffn_norm", "enc.layers.1.bq", "enc.conv1.bias", "dec.norm"])
def test_nan_in_a_small_tensor_of_a_quantised_checkpoint(q4_copy, name):
    """Before: an empty transcript and exit 0."""
    rewrite_quantized(q4_copy, edit_tensors=lambda t: t[name].reshape(-1).__setitem__(2, np.nan))
    expect_error(lambda: voxtral_ref.load(q4_copy), "NaN or infinite", name)


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
def test_quantize_refuses_to_write_over_another_checkpoint(tmp_path, cli, fmt):
    """Before: it overwrote the checkpoint's tekken.json, and the directory then loaded as the quantised model."""
    out = shutil.copytree(MODEL_DIRS[fmt], tmp_path / "other")
    tekken = (out / "tekken.json").read_bytes()
    code, _, err = cli("quantize", "--model", M, "--quantize", "q4", "-o", out)
    assert code == 2 and "holds a checkpoint" in err and str(out) in err, err
    assert (out / "tekken.json").read_bytes() == tekken and not quantized.is_quantized(out)


def test_quantize_may_rewrite_an_earlier_output(q4_copy, cli):
    code, _, err = cli("quantize", "--model", MODEL_DIRS["hf"], "--quantize", "int8", "-o", q4_copy)
    assert code == 0, err
    assert voxtral_ref.load(q4_copy).quantize == "int8"


def test_quantize_copies_a_quantised_checkpoint(q4_dir, tmp_path, cli):
    """Before: `No such file or directory: .../consolidated.safetensors`."""
    out = tmp_path / "again"
    code, _, err = cli("quantize", "--model", q4_dir, "--quantize", "q4", "-o", out)
    assert code == 0, err
    a, b = voxtral_ref.load(q4_dir), voxtral_ref.load(out)
    assert a.quantize == b.quantize == "q4" and a.weights.formats() == b.weights.formats()
    meta = [quantized.read_metadata(d / quantized.QFILE)["source"] for d in (q4_dir, out)]
    assert meta[0] == meta[1]                                   # the original source's fingerprint
    code, _, err = cli("quantize", "--model", q4_dir, "--quantize", "int8", "-o", tmp_path / "other")
    assert code == 2 and "quantised as 'q4'" in err, err


def test_a_recipe_that_quantises_nothing_is_no_quantisation(tiny_mistral):
    """Before: quantize="none" kept the KV caches in int8, and encoder_out moved by 0.031."""
    none = voxtral_ref.load(M, backend="numpy", quantize="none")
    assert none.kv == "f32" and none.quantize is None
    x = load_case("speech_en_480")["audio"]
    traces = []
    for model in (none, tiny_mistral):
        seen = {}
        model.transcribe(x, trace=lambda name, v: seen.setdefault(name, np.array(v)))
        traces.append(seen["encoder_out"])
    np.testing.assert_array_equal(*traces)


def test_quantize_none_writes_nothing(tmp_path, cli):
    out = tmp_path / "none"
    code, _, err = cli("quantize", "--model", M, "--quantize", "none", "-o", out)
    assert code == 2 and "nothing to quantise" in err and not quantized.is_quantized(out), err


# --- settings the files carry that this implementation has one value for -------------------------------------
def enc(p):
    return p["multimodal"]["whisper_model_args"]["encoder_args"]


@pytest.mark.parametrize("edit, key, value, supported", [
    (lambda p: p.update(causal=False), "causal", False, True),
    (lambda p: p.update(use_biases=True), "use_biases", True, False),
    (lambda p: p.update(tied_embeddings=False), "tied_embeddings", False, True),
    (lambda p: p.update(ada_rms_norm_t_cond=False), "ada_rms_norm_t_cond", False, True),
    (lambda p: enc(p).update(causal=False), "causal", False, True),
    (lambda p: enc(p).update(causal=1), "causal", 1, True),                # a number is not a bool
    (lambda p: enc(p).update(use_biases=False), "use_biases", False, True),
    (lambda p: enc(p).update(ffn_type="gelu"), "ffn_type", "gelu", "swiglu"),
    (lambda p: enc(p).update(norm_type="layer_norm"), "norm_type", "layer_norm", "rms_norm"),
    (lambda p: enc(p).update(pos_embed="sinusoidal"), "pos_embed", "sinusoidal", "rope"),
    (lambda p: enc(p)["audio_encoding_args"].update(sampling_rate=8000), "sampling_rate", 8000, 16000),
    (lambda p: enc(p)["audio_encoding_args"].update(hop_length=320), "hop_length", 320, 160),
    (lambda p: enc(p)["audio_encoding_args"].update(window_size=512), "window_size", 512, 400),
    (lambda p: enc(p)["audio_encoding_args"].update(frame_rate=25), "frame_rate", 25, 12.5),
    (lambda p: enc(p)["audio_encoding_args"].update(global_log_mel_max=1.0), "global_log_mel_max", 1.0, 1.5),
    (lambda p: enc(p)["audio_encoding_args"].update(transcription_format="offline"), "transcription_format",
     "offline", "streaming"),
])
def test_params_settings_not_implemented(mistral_copy, edit, key, value, supported):
    """Before: each loaded and gave the unchanged transcript, exit 0."""
    edit_json(mistral_copy / "params.json", edit)
    expect_error(lambda: voxtral_ref.load(mistral_copy), "params.json", key, repr(value), repr(supported))


@pytest.mark.parametrize("edit, key, value, supported", [
    (lambda c: c["audio_config"].update(hidden_act="gelu"), "hidden_act", "gelu", "silu"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act", "gelu", "silu"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn", factor=4.0), "rope_type", "yarn", "default"),
    (lambda c: c["audio_config"]["rope_parameters"].update(rope_type="linear", factor=2.0), "rope_type", "linear",
     "default"),
    (lambda c: c["text_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}), "type", "yarn", "default"),
    (lambda c: c.update(tie_word_embeddings=False), "tie_word_embeddings", False, True),
    (lambda c: c["text_config"].update(tie_word_embeddings=False), "tie_word_embeddings", False, True),
    (lambda c: c.update(audio_length_per_tok=4), "audio_length_per_tok", 4, 8),
    (lambda c: c.update(projector_hidden_act="relu"), "projector_hidden_act", "relu", "gelu"),
])
def test_hf_config_settings_not_implemented(hf_copy, edit, key, value, supported):
    edit_json(hf_copy / "config.json", edit)
    expect_error(lambda: voxtral_ref.load(hf_copy), "config.json", key, repr(value), repr(supported))


@pytest.mark.parametrize("n", [0, 16, 100, 6.0, True])
def test_hf_default_delay_the_model_does_not_support(hf_copy, n):
    edit_json(hf_copy / "config.json", lambda c: c.update(default_num_delay_tokens=n))
    expect_error(lambda: voxtral_ref.load(hf_copy), "config.json", "default_num_delay_tokens", repr(n), "1, 2, ... 15, or 30")


def test_hf_default_delay_is_used_where_tekken_json_gives_none(hf_copy):
    """As in HF: the processor's delay (tekken.json) wins; the config's is the fallback."""
    edit_json(hf_copy / "config.json", lambda c: c.update(default_num_delay_tokens=10))
    assert voxtral_ref.load(hf_copy).cfg.default_delay_ms == 480
    edit_json(hf_copy / "tekken.json", lambda t: t["audio"].pop("transcription_delay_ms"))
    assert voxtral_ref.load(hf_copy).cfg.default_delay_ms == 800


def special(t, rank):
    return next(s for s in t["special_tokens"] if s["rank"] == rank)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("special_tokens"), ("lacks the key 'special_tokens'",)),
    (lambda t: special(t, 32).update(token_str="[PAD]"), ("special token 32", "'[PAD]'", "'[STREAMING_PAD]'")),
    (lambda t: special(t, 2).update(token_str="<eos>"), ("special token 2", "'<eos>'", "'</s>'")),
    (lambda t: special(t, 40).update(rank=39), ("both have rank 39",)),
    (lambda t: special(t, 40).update(token_str="<SPECIAL_39>"), ("'<SPECIAL_39>' appears twice",)),
    (lambda t: t["vocab"][5].update(rank=6), ("vocab entry 5 has rank 6",)),
    (lambda t: t.pop("audio"), ("lacks the key 'audio'",)),
    (lambda t: t["audio"].update(transcription_format="offline"), ("transcription_format", "'offline'", "'streaming'")),
])
def test_tekken_settings_not_implemented(mistral_copy, edit, words):
    edit_json(mistral_copy / "tekken.json", edit)
    expect_error(lambda: voxtral_ref.load(mistral_copy), "tekken.json", *words)


# --- messages that named the wrong thing ------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["text_config", "audio_config"])
def test_hf_config_without_a_sub_config(hf_copy, key):
    """Before (text_config): `tekken.json: default_vocab_size 2048 != the model's vocab_size 131072`."""
    edit_json(hf_copy / "config.json", lambda c: c.pop(key))
    expect_error(lambda: voxtral_ref.load(hf_copy), "config.json", f"lacks the key {key!r}")


@pytest.mark.parametrize("text, words", [
    ("{}", ("lacks the key 'config'",)),                        # before: config must be a JSON object, got None
    (None, ("lacks the key 'vocab'",)),                         # before: vocab holds None tokens
])
def test_tekken_without_config_or_vocab(mistral_copy, text, words):
    p = mistral_copy / "tekken.json"
    if text is None:
        edit_json(p, lambda t: t.pop("vocab"))
    else:
        p.write_text(text)
    expect_error(lambda: voxtral_ref.load(mistral_copy), "tekken.json", *words)


@pytest.mark.parametrize("model", [None, 5, b"golden/models/tiny_mistral", "", "  "])
def test_load_needs_a_directory_or_repo_id(model):
    """Before: TypeError for None, 5 and bytes; "" loaded the current directory."""
    expect_error(lambda: voxtral_ref.load(model), "model must be a checkpoint directory or a hub repo id", repr(model))
