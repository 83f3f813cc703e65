"""Bad input gets one clear VoxtralError, never a traceback from deep inside or a silent wrong answer."""

import json
import shutil

import numpy as np
import pytest

import voxtral_ref
from voxtral_ref import VoxtralError
from voxtral_ref.checkpoint.weights import read_safetensors, write_safetensors

from conftest import MODEL_DIRS, edit_json, expect_error


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


# --- issue 15's examples, one test each ------------------------------------------------------------------
def write_header(path, edit):
    """Rewrite a safetensors file's header through `edit(header dict) -> header text`; data unchanged."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = edit(json.loads(raw[8:8 + n])).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def first_tensor(h):
    return next(k for k in h if k != "__metadata__")


def set_field(field, value):
    def edit(h):
        h[first_tensor(h)][field] = value
        return json.dumps(h)
    return edit


def shift_offsets(delta, all_tensors):
    def edit(h):
        names = [k for k in h if k != "__metadata__"] if all_tensors else [first_tensor(h)]
        for k in names:
            h[k]["data_offsets"] = [o + delta for o in h[k]["data_offsets"]]
        return json.dumps(h)
    return edit


def overlap(h):
    a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
    h[b]["data_offsets"] = h[a]["data_offsets"]              # two tensors share bytes; the last ones are orphaned
    return json.dumps(h)


def duplicate_key(h):
    k = first_tensor(h)
    return json.dumps(h)[:-1] + f', {json.dumps(k)}: {json.dumps(h[k])}' + "}"


@pytest.mark.parametrize("edit, words", [
    (set_field("shape", [2**64]), ("spans",)),
    (lambda h: json.dumps(h).replace(json.dumps(h[first_tensor(h)]["shape"]), "[1e400]", 1), ("not valid JSON", "overflows")),
    (set_field("shape", [2**32, 2**32, 96]), ("spans",)),                    # the product wraps to 0 in int64
    (set_field("shape", [-1, 96]), ("shape", "non-negative integers")),
    (set_field("shape", [96.0]), ("shape", "non-negative integers")),
    (set_field("data_offsets", [-8, 0]), ("data_offsets",)),                 # read the header as weights before
    (set_field("data_offsets", [0.0, 2.5]), ("data_offsets",)),
    (set_field("data_offsets", [0, 2, 4]), ("data_offsets",)),
    (set_field("dtype", "F64"), ("dtype",)),
    (set_field("dtype", ["BF16"]), ("dtype",)),
    (overlap, ("contiguous",)),
    (shift_offsets(2, all_tensors=True), ("contiguous",)),                   # a gap before the first tensor
    (shift_offsets(-2, all_tensors=True), ("data_offsets",)),
    (shift_offsets(2, all_tensors=False), ("contiguous",)),
    (duplicate_key, ("duplicate key",)),
    (lambda h: "[" * 100000 + "]" * 100000, ("nested too deeply",)),      # was a RecursionError
    (lambda h: json.dumps({**h, "__metadata__": {"a": 1}}), ("__metadata__",)),
    (lambda h: json.dumps({**h, "x": {"dtype": "F32", "shape": [1], "data_offsets": [10**9, 10**9 + 4]}}), ("contiguous",)),
])
def test_safetensors_header_rules(mistral_copy, edit, words):
    write_header(mistral_copy / "consolidated.safetensors", edit)
    expect_error(lambda: voxtral_ref.load(mistral_copy), "consolidated.safetensors", *words)


def test_safetensors_bytes_past_the_last_tensor(mistral_copy):
    f = mistral_copy / "consolidated.safetensors"
    f.write_bytes(f.read_bytes() + b"\0\0")
    expect_error(lambda: voxtral_ref.load(mistral_copy), "data block")


def test_safetensors_header_may_be_reordered_and_padded(mistral_copy):
    """What the format allows (any key order, __metadata__ strings, trailing spaces) still loads, equal."""
    write_header(mistral_copy / "consolidated.safetensors",
                 lambda h: json.dumps({"__metadata__": {"format": "pt"}, **dict(reversed(h.items()))}) + "   ")
    x = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    assert voxtral_ref.load(mistral_copy).transcribe(x).token_ids == voxtral_ref.load(MODEL_DIRS["mistral"]).transcribe(x).token_ids


def encoder_args(p):
    return p["multimodal"]["whisper_model_args"]["encoder_args"]


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.update(n_kv_heads=0), ("n_kv_heads", "positive integer")),
    (lambda p: p.update(dim="96"), ("dim", "positive integer", "'96'")),
    (lambda p: p.update(dim=96.0), ("dim", "positive integer")),
    (lambda p: p.update(multimodal=None), ("not a Voxtral checkpoint",)),
    (lambda p: p["multimodal"].update(whisper_model_args=[]), ("not a Voxtral checkpoint",)),
    (lambda p: encoder_args(p).update(audio_encoding_args=3), ("audio_encoding_args", "JSON object")),
    (lambda p: p.update(norm_eps="x"), ("norm_eps", "positive finite number")),
    (lambda p: p.update(rope_theta=0), ("rope_theta",)),                      # an empty transcript, exit 0, before
    (lambda p: p.update(rope_theta=1), ("rope_theta", "> 1")),
    (lambda p: p.update(norm_eps=2.0), ("norm_eps", "(0, 1)")),
    (lambda p: p.update(n_layers=1), ("decoder", "n_layers 1")),              # ran a truncated model, before
    (lambda p: encoder_args(p).update(n_layers=3), ("encoder", "n_layers 3")),
    (lambda p: p.update(n_layers=10**9), ("n_layers 1000000000",)),           # memory grew without bound, before
    (lambda p: p.update(n_heads=True), ("n_heads", "positive integer", "True")),
    (lambda p: encoder_args(p).update(sliding_window=10**8), ("sliding_window", "65536")),  # a 23.8 GiB ring
    (lambda p: p.update(vocab_size=3000), ("vocab_size",)),
])
def test_config_types_ranges_and_cross_checks(mistral_copy, edit, words):
    edit_json(mistral_copy / "params.json", edit)
    msg = expect_error(lambda: voxtral_ref.load(mistral_copy), *words)
    assert "params.json" in msg or "consolidated.safetensors" in msg            # the layer counts are the file's


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(text_config=[]), ("text_config", "JSON object")),
    (lambda c: c["text_config"].update(num_key_value_heads=0), ("num_key_value_heads",)),
    (lambda c: c["audio_config"]["rope_parameters"].update(rope_theta="1e6"), ("rope_theta",)),
    (lambda c: c["text_config"].update(num_hidden_layers=1), ("n_layers 1",)),
    (lambda c: c.update(downsample_factor=False), ("downsample_factor",)),
])
def test_hf_config_types_and_cross_checks(hf_copy, edit, words):
    edit_json(hf_copy / "config.json", edit)
    expect_error(lambda: voxtral_ref.load(hf_copy), *words)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.update(audio=1), ("audio", "JSON object")),
    (lambda t: t["audio"].update(transcription_delay_ms=""), ("transcription_delay_ms",)),
    (lambda t: t["audio"].update(transcription_delay_ms=480.5), ("transcription_delay_ms",)),
    (lambda t: t["audio"].update(sampling_rate="16000"), ("sampling_rate",)),
    (lambda t: t["config"].update(default_num_special_tokens=2**31), ("vocab",)),
    (lambda t: t["config"].update(default_num_special_tokens=1001, default_vocab_size=2049),
     ("default_num_special_tokens", "1000")),
    (lambda t: t["config"].update(default_vocab_size=2000), ("default_vocab_size 2000", "vocab_size 2048")),
    (lambda t: t.update(vocab=[]), ("vocab holds 0 tokens",)),                  # an empty transcript, before
    (lambda t: t["vocab"][5].update(token_bytes="not base64!"), ("vocab entry 5",)),
    (lambda t: t.update(config=None), ("config", "JSON object")),
])
def test_tekken_schema(mistral_copy, edit, words):
    edit_json(mistral_copy / "tekken.json", edit)
    expect_error(lambda: voxtral_ref.load(mistral_copy), "tekken.json", *words)


def test_tekken_special_rank_of_minus_infinity(mistral_copy):
    p = mistral_copy / "tekken.json"
    p.write_text(p.read_text().replace('"rank": 5,', '"rank": -Infinity,', 1))
    expect_error(lambda: voxtral_ref.load(mistral_copy), "tekken.json", "-Infinity")


def test_json_with_duplicate_keys_or_nan(mistral_copy):
    p = mistral_copy / "params.json"
    text = p.read_text()
    p.write_text(text.replace('"dim": 96,', '"dim": 96, "dim": 48,', 1))
    expect_error(lambda: voxtral_ref.load(mistral_copy), "params.json", "duplicate key 'dim'")
    p.write_text(text.replace('"norm_eps": 1e-05', '"norm_eps": NaN', 1))
    expect_error(lambda: voxtral_ref.load(mistral_copy), "params.json", "NaN")


def test_fifo_named_params_json_is_refused_not_opened(mistral_copy):
    import os
    (mistral_copy / "params.json").unlink()
    os.mkfifo(mistral_copy / "params.json")                  # opening it would block forever
    expect_error(lambda: voxtral_ref.load(mistral_copy), "params.json", "not a regular file")


def shard(hf_copy, target):
    """An index whose weight_map points every tensor at `target`."""
    names = read_safetensors(hf_copy / "model.safetensors")
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))


@pytest.mark.parametrize("target", ["/etc/passwd", "../model.safetensors", "sub/../../x.safetensors", "params.json"])
def test_shards_stay_inside_the_checkpoint(hf_copy, target):
    shard(hf_copy, target)
    expect_error(lambda: voxtral_ref.load(hf_copy), "model.safetensors.index.json", "inside")


def test_shard_index_must_match_the_shards(hf_copy):
    shard(hf_copy, "model.safetensors")
    voxtral_ref.load(hf_copy)                                   # a valid one-shard index loads
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["not.in.the.file"] = "model.safetensors"
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(lambda: voxtral_ref.load(hf_copy), "not.in.the.file", "not in the shard")


def poison(ckpt, suffix, value=np.nan):
    f = ckpt / "consolidated.safetensors"
    t = {k: np.array(v) for k, v in read_safetensors(f).items()}
    name = next(n for n in t if n.endswith(suffix))
    t[name].reshape(-1)[3] = value
    write_safetensors(f, t)
    return name


@pytest.mark.parametrize("suffix", ["layers.0.attention_norm.weight", "conv_layers.0.conv.bias", "norm.weight"])
def test_nan_in_a_small_tensor_is_refused_at_load(mistral_copy, suffix):
    name = poison(mistral_copy, suffix, np.inf)
    expect_error(lambda: voxtral_ref.load(mistral_copy), "NaN or infinite", name)


def test_nan_in_a_matrix_is_found_by_info_verify(mistral_copy, cli):
    """load() leaves the large matrices alone (reading them all is what --verify is for)."""
    name = poison(mistral_copy, "layers.1.feed_forward.w2.weight")
    voxtral_ref.load(mistral_copy)
    code, out, err = cli("info", "--model", mistral_copy)
    assert code == 0 and "verify" not in out
    code, out, err = cli("info", "--model", mistral_copy, "--verify")
    assert code == 2 and err.count("\n") == 1 and "1 of 57 tensors" in err and name in err, err
    code, out, err = cli("info", "--model", MODEL_DIRS["mistral"], "--verify")
    assert code == 0 and "57 tensors, every value finite" in out


@pytest.mark.parametrize("suffix", ["layers.1.feed_forward.w2.weight", "tok_embeddings.weight"])
def test_nan_in_a_matrix_stops_decoding_with_a_clear_error(mistral_copy, suffix):
    """A NaN that load() does not read (a matrix) must not come out as an empty transcript: argmax takes
    NaN for the largest logit, so every token would be id 0. The chosen logits are checked each pass, in
    every path that chooses tokens (offline, drafted passes, streams, the batching engine)."""
    poison(mistral_copy, suffix)
    x = speech()
    for backend in ("numpy", "c"):
        model = voxtral_ref.load(mistral_copy, backend=backend)
        expect_error(lambda: model.transcribe(x), "NaN or infinite logits", "info --verify")
        expect_error(lambda: model.transcribe([x, x[:8000]], batch_size=2), "NaN or infinite logits")
        session = model.stream()
        session.feed(x)
        expect_error(lambda: (session.step(), session.close()), "NaN or infinite logits")


def speech():
    import soundfile as sf
    from conftest import SPEECH_WAV
    return sf.read(SPEECH_WAV, dtype="float32")[0][:16000]


@pytest.mark.parametrize("make, words", [
    (lambda x: np.stack([x, x]), ("[channels, samples]", "audio.T")),        # torchaudio's layout
    (lambda x: x[None], ("[channels, samples]",)),
    (lambda x: np.round(x * 32767).astype(np.int64), ("int64", "ambiguous")),  # was scaled by 2**-63
    (lambda x: np.zeros((len(x), 0), np.float32), ("1..16 channels",)),
    (lambda x: x.astype(np.complex64), ("dtype complex64",)),
    (lambda x: np.array([x, x[:5]], dtype=object), ("dtype object",)),
])
def test_audio_layouts_and_dtypes(tiny_mistral, make, words):
    expect_error(lambda: tiny_mistral.transcribe(make(speech())), *words)
    expect_error(lambda: tiny_mistral.stream().feed(make(speech())), *words)


@pytest.mark.parametrize("rate", [1, 999, 768001, 2**63, 10**12])           # 2.2 h of audio; a hang; 0 samples
def test_implausible_sample_rates(tiny_mistral, rate):
    expect_error(lambda: tiny_mistral.transcribe(speech()[:8000], sample_rate=rate), "1000 to 768000 Hz")
    expect_error(lambda: tiny_mistral.stream(sample_rate=rate), "1000 to 768000 Hz")


def test_too_short_to_resample(tiny_mistral):
    expect_error(lambda: tiny_mistral.transcribe(np.zeros(2, np.float32), sample_rate=768000), "too short")


def test_delay_accepts_any_integer_type_and_no_float(tiny_mistral):
    x = speech()[:4000]
    assert tiny_mistral.transcribe(x, delay_ms=np.int64(480)).token_ids == tiny_mistral.transcribe(x, delay_ms=480).token_ids
    expect_error(lambda: tiny_mistral.transcribe(x, delay_ms=480.0), "delay_ms", "integer")


def test_ragged_chunk_fed_to_a_stream(tiny_mistral):
    expect_error(lambda: tiny_mistral.stream().feed([[0.1, 0.2], [0.3]]), "array of samples")


def test_unknown_weights_format():
    expect_error(lambda: voxtral_ref.load(MODEL_DIRS["mistral"], weights_format="bogus"), "weights_format", "bogus")


def test_threads_are_capped():
    from voxtral_ref.runtime import ckernels
    if not ckernels.available():
        pytest.skip("C kernels not built")
    before = ckernels.get_threads()
    try:
        with pytest.warns(UserWarning, match="capped"):
            ckernels.set_threads(40000)                        # aborted libgomp, before
        assert ckernels.get_threads() == ckernels.MAX_THREADS_PER_CORE * ckernels._default_threads()
        m = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
        assert m.transcribe(speech()[:4000]).token_ids
    finally:
        ckernels.set_threads(before)


def run_cli(*args, env=None, **kw):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "voxtral_ref.apps.cli", *map(str, args)], capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=120, **kw)


def test_threads_env_var_is_capped():
    from conftest import SPEECH_WAV
    r = run_cli("transcribe", "--model", MODEL_DIRS["mistral"], "--backend", "c", SPEECH_WAV,
                env={"VOXTRAL_REF_THREADS": "100000"})
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert b"capped" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr


def test_stream_that_fails_midway_hands_back_what_it_had(tiny_mistral):
    x = speech()
    want = tiny_mistral.transcribe(x[:12800]).text
    assert want
    chunks = [x[i:i + 1600] for i in range(0, 12800, 1600)] + [np.full(160, np.nan, np.float32), x[12800:]]
    got = []
    with pytest.raises(VoxtralError, match="NaN"):
        for delta in tiny_mistral.transcribe_stream(chunks):
            got.append(delta)
    assert "".join(got) == want


def test_stream_keeps_a_bad_chunks_audio_before_its_bad_sample(tiny_mistral):
    """The chunk that holds the NaN is not dropped whole: its samples before the NaN were heard."""
    x = speech().copy()
    want = tiny_mistral.transcribe(x[:14000]).text
    assert want != tiny_mistral.transcribe(x[:8000]).text
    x[14000] = np.nan
    got = []
    with pytest.raises(VoxtralError, match="NaN"):
        for delta in tiny_mistral.transcribe_stream([x[:8000], x[8000:]]):
            got.append(delta)
    assert "".join(got) == want
    with pytest.raises(VoxtralError, match="of shape"):                  # a chunk that is not samples at all
        list(tiny_mistral.transcribe_stream([x[:8000], np.zeros((100, 17), np.float32)]))
    with pytest.raises(VoxtralError, match="past_eos must be True or False"):
        tiny_mistral.stream(past_eos="no")


def test_cli_stream_that_fails_midway_flushes_then_fails(tmp_path):
    import soundfile as sf
    x = speech().copy()
    want = voxtral_ref.load(MODEL_DIRS["mistral"]).transcribe(x[:9600]).text
    x[9600:9700] = np.nan                  # inside the CLI's first chunk: the audio before it is transcribed still
    wav = tmp_path / "mid_nan.wav"
    sf.write(wav, x, 16000, subtype="FLOAT")
    with open(wav, "rb") as f:
        r = run_cli("stream", "--model", MODEL_DIRS["mistral"], stdin=f)
    assert r.returncode == 2 and r.stdout.decode().strip() == want.strip() and want.strip()
    assert r.stderr.decode().splitlines()[-1].startswith("voxtral-ref: error:") and b"NaN" in r.stderr


def test_cli_stream_refuses_more_channels_than_it_mixes_down(tmp_path):
    import soundfile as sf
    r = run_cli("stream", "--model", MODEL_DIRS["mistral"], "--format", "s16le", "--channels", "17",
                stdin=open("/dev/null", "rb"))
    assert r.returncode == 2 and b"--channels 1 to 16" in r.stderr, r.stderr
    sf.write(wav := tmp_path / "ch17.wav", np.zeros((1600, 17), np.int16), 16000)
    with open(wav, "rb") as f:
        r = run_cli("stream", "--model", MODEL_DIRS["mistral"], stdin=f)
    assert r.returncode == 2 and b"stdin has 17 channels" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr


def test_cli_stream_refuses_a_rate_it_cannot_read_and_an_empty_stream():
    from conftest import SPEECH_WAV
    with open(SPEECH_WAV, "rb") as f:
        r = run_cli("stream", "--model", MODEL_DIRS["mistral"], "--format", "s16le", "--rate", "40", stdin=f)
    assert r.returncode == 2 and b"1000 to 768000 Hz" in r.stderr and not r.stdout.strip()
    r = run_cli("stream", "--model", MODEL_DIRS["mistral"], "--format", "s16le", stdin=open("/dev/null", "rb"))
    assert r.returncode == 2 and b"no audio arrived" in r.stderr


@pytest.mark.parametrize("closed, args, words", [
    (0, ["transcribe", "-"], b"stdin is closed"),
    (1, ["transcribe", "AUDIO"], b"stdout is closed"),
    (1, ["info"], b"stdout is closed"),
    (1, ["--help"], b"stdout is closed"),
    (2, ["transcribe", "AUDIO"], None),
])
def test_cli_with_a_closed_std_stream(closed, args, words):
    """`<&-`, `>&-`, `2>&-`: one line on stderr (if open) and a non-zero exit, or a normal run."""
    import os
    from conftest import SPEECH_WAV
    model = [] if args == ["--help"] else ["--model", MODEL_DIRS["mistral"]]
    args = [SPEECH_WAV if a == "AUDIO" else a for a in args] + model
    r = run_cli(*args, preexec_fn=lambda: os.close(closed))
    if words is None:                                         # stderr closed: the transcript still comes
        assert r.returncode == 0 and r.stdout.strip()
    else:
        assert r.returncode == 2 and words in r.stderr and r.stderr.count(b"\n") == 1, r.stderr


def test_cli_writing_to_a_full_disk():
    import subprocess
    import sys
    from conftest import SPEECH_WAV
    with open("/dev/full", "w") as full:                      # `> /dev/full` gave an OSError traceback
        r = subprocess.run([sys.executable, "-m", "voxtral_ref.apps.cli", "transcribe", str(SPEECH_WAV), "--model",
                            str(MODEL_DIRS["mistral"])], stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 2 and r.stderr == b"voxtral-ref: error: No space left on device\n", r.stderr


def test_cli_stdin_is_read_with_a_limit(cli, monkeypatch):
    """`transcribe - < /dev/zero` read without end; now it stops at MAX_STDIN_BYTES (made small here)."""
    import sys
    from voxtral_ref.stages import audio
    monkeypatch.setattr(audio, "MAX_STDIN_BYTES", 1 << 20)
    with open("/dev/zero") as zero:
        monkeypatch.setattr(sys, "stdin", zero)
        code, out, err = cli("transcribe", "-", "--model", MODEL_DIRS["mistral"])
    assert code == 2 and "more than" in err and "voxtral-ref stream" in err and not out


def test_cli_transcribe_never_overwrites_its_input(tmp_path, cli):
    from conftest import SPEECH_WAV
    audio = tmp_path / "talk.txt"                              # audio that happens to be named like a transcript
    shutil.copy(SPEECH_WAV, audio)
    before = audio.read_bytes()
    code, out, err = cli("transcribe", audio, "-o", tmp_path, "--model", MODEL_DIRS["mistral"])
    assert code == 2 and "would overwrite the input" in err and audio.read_bytes() == before
