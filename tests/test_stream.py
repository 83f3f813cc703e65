"""Live streaming (voxtral_ref/runtime/stream.py): for any chunking, a closed session's token ids equal offline's and
HF's golden ids; tokens come out as soon as the audio allows; memory stays flat; the API's edges."""

import copy
import importlib.util
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import voxtral_ref
from voxtral_ref import VoxtralError
from voxtral_ref.runtime import ckernels
from voxtral_ref.config import EOS_ID, SAMPLES_PER_TOKEN, delay_tokens
from voxtral_ref.model import Model
from voxtral_ref.runtime.stream import LOOK_AHEAD
from voxtral_ref.stages.attention import RING_ALIGN

from conftest import MODEL_DIRS, golden_cases, load_case

CASES = [name for name, meta in golden_cases() if "token_ids" in meta]
EDGE_SIZES = [1, 159, 160, 1279, 1280, 1281]          # around a hop and a token
PRIME_SIZES = [2, 3, 7, 13, 641, 1277, 1283, 7919]
REPO = Path(__file__).resolve().parent.parent         # `python -m voxtral_ref.apps.cli` runs from the checkout
_offline = {}


def offline(model, case):
    """(golden case, offline Transcript), computed once per model and case."""
    key = (id(model), case)
    if key not in _offline:
        g = load_case(case)
        _offline[key] = g, model.transcribe(g["audio"], delay_ms=int(g["delay_ms"]))
    return _offline[key]


def run_stream(session, audio, sizes, every=1, max_tokens=None):
    """Feed `audio` in chunks of sizes cycled from `sizes` (0 = an empty feed), step after every `every`
    feeds, close; -> the concatenated emissions (ids, text)."""
    emitted = []
    i = j = 0
    while i < len(audio):
        n = sizes[j % len(sizes)]
        session.feed(audio[i:i + n])
        i, j = i + n, j + 1
        if j % every == 0:
            e = session.step(max_tokens)
            assert len(e.latency_s) == len(e.token_ids) and (max_tokens is None or len(e.token_ids) <= max_tokens)
            emitted.append(e)
    emitted.append(session.close())
    assert session.done
    return sum((e.token_ids for e in emitted), []), "".join(e.text for e in emitted)


def assert_equals_offline(model, case, ids, text):
    g, off = offline(model, case)
    assert ids == off.token_ids == g["token_ids"].tolist()
    hf_stream = g["stream_token_ids"].tolist()     # HF's recipe may stop one token early; a prefix otherwise
    assert ids[:len(hf_stream)] == hf_stream and len(hf_stream) >= len(ids) - 1
    assert text == off.text


# --- any chunking equals offline -------------------------------------------------------------------------
chunkings = st.one_of(st.sampled_from(EDGE_SIZES + PRIME_SIZES).map(lambda n: [n]),
                      st.lists(st.integers(0, 5000), min_size=1, max_size=30).filter(any))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), sizes=chunkings, every=st.integers(1, 5),
       max_tokens=st.sampled_from([None, None, 1, 3]))
@example(case="speech_en_480", sizes=[1], every=1, max_tokens=None)
@example(case="speech_en_80", sizes=[159], every=1, max_tokens=None)
@example(case="speech_en_2400", sizes=[160], every=1, max_tokens=None)
@example(case="chirp_480", sizes=[1279], every=1, max_tokens=None)
@example(case="speech_fr_480", sizes=[1280], every=1, max_tokens=1)
@example(case="speech_en_long_480", sizes=[1281], every=1, max_tokens=None)
@example(case="speech_en_long_480", sizes=[10 ** 6], every=1, max_tokens=None)
def test_any_chunking_equals_offline_and_hf(tiny_model, case, sizes, every, max_tokens):
    g, _ = offline(tiny_model, case)
    ids, text = run_stream(tiny_model.stream(delay_ms=int(g["delay_ms"])), g["audio"], sizes, every, max_tokens)
    assert_equals_offline(tiny_model, case, ids, text)


def test_transcribe_stream_yields_deltas_as_they_come(tiny_mistral):
    g, off = offline(tiny_mistral, "speech_en_480")
    fed = []

    def chunks():
        for i in range(0, len(g["audio"]), 1280):
            fed.append(i)
            yield g["audio"][i:i + 1280]
    deltas = tiny_mistral.transcribe_stream(chunks())
    first = next(deltas)
    assert first and len(fed) < len(g["audio"]) // 1280          # text before the audio ends
    assert first + "".join(deltas) == off.text


# --- when tokens come out ----------------------------------------------------------------------------------
@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_each_token_comes_with_its_last_needed_sample(tiny_mistral, delay_ms):
    """Token k needs real audio up to sample 1280 (delay + 1 + k) + 40: one sample fewer and it waits."""
    audio = load_case("speech_en_480")["audio"]
    s = tiny_mistral.stream(delay_ms=delay_ms)
    fed = 0
    for k in range(5):
        need = SAMPLES_PER_TOKEN * (delay_tokens(delay_ms) + 1 + k) + LOOK_AHEAD
        s.feed(audio[fed:need - 1])
        assert s.step().token_ids == []
        s.feed(audio[need - 1:need])
        assert len(s.step().token_ids) == 1
        fed = need
    assert len(s.token_ids) == 5


def test_prompt_positions_run_as_their_audio_arrives(tiny_mistral):
    """The prompt's positions after the silence prefix are decoded in the steps their audio comes in, so the
    step that completes the first token's audio runs one position (the last of the prompt), not the rest of it."""
    audio = load_case("speech_en_480")["audio"]
    s = tiny_mistral.stream(delay_ms=480)
    dec = s._dec
    need = SAMPLES_PER_TOKEN * (delay_tokens(480) + 1) + LOOK_AHEAD
    s.feed(audio[:need - 1])
    assert s.step().token_ids == [] and dec.ids == dec.prompt[:-1]
    rows, run = [], dec.run_chunk
    dec.run_chunk = lambda embeds: rows.append(len(embeds)) or run(embeds)
    s.feed(audio[need - 1:need])
    assert len(s.step().token_ids) == 1 and rows == [1]


# --- long streams: windows wrap, memory stays flat ----------------------------------------------------------
def test_long_stream_equals_offline_with_flat_state(tiny_mistral):
    """A minute of audio: 3000+ encoder frames through a 48-frame window, 780 tokens through a 24-token one."""
    audio = np.tile(load_case("speech_en_long_480")["audio"], 7)                  # 60.4 s
    off = tiny_mistral.transcribe(audio)
    cfg = tiny_mistral.cfg
    assert len(off.token_ids) > 20 * cfg.decoder.sliding_window and len(set(off.token_ids)) > 20
    s = tiny_mistral.stream()
    rng = np.random.default_rng(0)
    start, i, sizes = s.footprint(), 0, []
    while i < len(audio):
        n = int(rng.integers(1, 4000))
        s.feed(audio[i:i + n])
        i += n
        s.step()
        fp = s.footprint()
        # after a step, only what the next token lacks remains: < 1280 + 240 samples, however much was fed
        assert fp["audio_buffer"] < SAMPLES_PER_TOKEN + 240 and fp["arrivals"] <= fp["audio_buffer"] + 2
        assert fp["waiting_embeddings"] < len(s._dec.prompt)
        assert (fp["encoder_kv_slots"], fp["decoder_kv_slots"]) == (start["encoder_kv_slots"], start["decoder_kv_slots"])
        sizes.append(fp["audio_buffer"])
    s.close()
    assert s.token_ids == off.token_ids and s.text == off.text
    for slots, c, chunk in [(start["encoder_kv_slots"], cfg.encoder, 4 * len(s._dec.prompt)),
                            (start["decoder_kv_slots"], cfg.decoder, len(s._dec.prompt))]:
        per_layer = slots // c.n_layers       # window + chunk - 1, rounded up as KVCache says (RING_ALIGN)
        assert per_layer * c.n_layers == slots and per_layer % RING_ALIGN == 0
        assert c.sliding_window + max(chunk, RING_ALIGN) - 1 <= per_layer < c.sliding_window + max(chunk, RING_ALIGN) - 1 + RING_ALIGN


# --- threads --------------------------------------------------------------------------------------------
def test_feed_from_one_thread_step_from_others(tiny_model):
    g, _ = offline(tiny_model, "speech_en_long_480")
    s = tiny_model.stream()
    half, stepped, fed = len(g["audio"]) // 2, threading.Event(), threading.Event()

    def feeder():
        rng = np.random.default_rng(1)
        i = 0
        while i < len(g["audio"]):
            n = int(rng.integers(0, 3000))
            s.feed(g["audio"][i:i + n])
            i += n
            if i >= half:                                   # mid-stream: make sure tokens came out already
                stepped.wait(timeout=60)
        fed.set()

    emitted, errors = [], []

    def stepper():
        try:
            while not fed.is_set():
                emitted.append(s.step())
                if emitted[-1].token_ids:
                    stepped.set()
        except Exception as e:   # surfaced by the assertion below
            errors.append(e)
    threads = [threading.Thread(target=feeder)] + [threading.Thread(target=stepper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and stepped.is_set()
    emitted.append(s.close())
    ids = sum((e.token_ids for e in emitted), [])
    assert ids == s.token_ids
    assert_equals_offline(tiny_model, "speech_en_long_480", s.token_ids, s.text)


@pytest.mark.skipif(not ckernels.available(), reason="the C kernels are not built")
def test_c_backend_stream_equals_golden():
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    for case in CASES:
        g = load_case(case)
        ids, _ = run_stream(model.stream(delay_ms=int(g["delay_ms"])), g["audio"], [1281, 7, 4000])
        assert ids == model.transcribe(g["audio"], delay_ms=int(g["delay_ms"])).token_ids == g["token_ids"].tolist()


QUANTISED = {}


def quantised_model(backend, fmt):
    if (backend, fmt) not in QUANTISED:
        QUANTISED[backend, fmt] = voxtral_ref.load(MODEL_DIRS["mistral"], backend=backend, quantize=fmt)
    return QUANTISED[backend, fmt]


def assert_stream_is_offline_bit_for_bit(model, case, sizes, every=1):
    """ids equal, and the logits each token was chosen from equal bit for bit."""
    from test_engine import recording
    g = load_case(case)
    with recording() as logits:
        off = model.transcribe(g["audio"], delay_ms=int(g["delay_ms"])).token_ids
    with recording() as streamed:
        ids, _ = run_stream(model.stream(delay_ms=int(g["delay_ms"])), g["audio"], sizes, every)
    assert ids == off
    (want,), (got,) = logits.values(), streamed.values()
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("sizes", [[1], [1281], [7, 4000, 1281]])
@pytest.mark.parametrize("fmt", ["int8", "q4"])
@pytest.mark.parametrize("backend", ["c", "numpy"] if ckernels.available() else ["numpy"])
def test_quantised_stream_equals_offline_bit_for_bit(backend, fmt, sizes):
    """With quantised weights (int8 KV caches) a stream computes what offline computes, bit for bit, though
    its encoder runs 4 frames a call against offline's 1000: the linears compute each row alone, attention
    scores are exact integers, every sum over keys follows their positions (the C kernel's key ranges are
    aligned to positions and merged in position order; the twin sums left to right), and the rings'
    capacities keep those ranges aligned (stages/attention.py RING_ALIGN). These quantised ids differ from
    float32's on this tiny random model, so a session that fell back to float32 would fail here."""
    model = quantised_model(backend, fmt)
    for case in CASES if backend == "c" else CASES[:3]:
        assert_stream_is_offline_bit_for_bit(model, case, sizes)


@pytest.mark.skipif(not ckernels.available(), reason="the C kernels are not built")
@settings(max_examples=12, deadline=None)
@given(case=st.sampled_from(CASES), sizes=chunkings, every=st.integers(1, 4), fmt=st.sampled_from(["int8", "q4"]))
def test_quantised_any_chunking_equals_offline_bit_for_bit(case, sizes, every, fmt):
    assert_stream_is_offline_bit_for_bit(quantised_model("c", fmt), case, sizes, every)


@pytest.mark.parametrize("sizes", [[1], [1281], [7, 4000, 1281]])
def test_bf16_stream_follows_offline(sizes):
    """A bf16 session runs the model's precision (its ids differ from float32's on this tiny random model).
    Its float32 caches' attention and the bf16 matmuls (GEMV against the GEMM) sum in another order for 4
    frames than for the whole file, and rounding the next matmul's input to bf16 can turn that float32-level
    difference into a whole step: so ids equal offline's up to a near tie of offline's own logits (within the
    5e-2 of scale that tests/test_golden.py's isolation test bounds input rounding by)."""
    from voxtral_ref.apps.oracle import capture
    backend = "c" if ckernels.available() else "numpy"
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend=backend, precision="bf16")
    for case in CASES:
        g = load_case(case)
        ids, _ = run_stream(model.stream(delay_ms=int(g["delay_ms"])), g["audio"], sizes)
        off, tensors, _ = capture(model, g["audio"], delay_ms=int(g["delay_ms"]))
        i = next((j for j, (a, b) in enumerate(zip(ids, off.token_ids)) if a != b), None)
        if i is None:
            assert ids == off.token_ids
            continue
        logits = tensors["logits"][len(g["prompt_ids"]) - 1 + i]
        top2 = np.sort(logits)[-2:]
        assert (top2[1] - top2[0]) / np.abs(logits).max() < 0.1, f"{case}: token {i} differs at a clear margin"


@pytest.mark.parametrize("mode", [{}, {"quantize": "q4"}], ids=["f32", "q4"])
def test_saved_prefix_is_bit_identical_to_computing_it(mode):
    """A session starts from the saved state of the 31 silence-only positions (session_prefix); one that
    computes them itself ends with the same ids and bit-identical encoder and decoder caches."""
    from voxtral_ref.runtime.stream import StreamSession
    backend = "c" if ckernels.available() else "numpy"
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend=backend, **mode)
    g = load_case("speech_en_480")
    saved, computed = model.stream(), StreamSession(model, reuse_prefix=False)
    assert model.prefixes                                        # the first session saved it
    ids = [run_stream(s, g["audio"], [1281])[0] for s in (saved, computed)]
    assert ids[0] == ids[1]
    if not mode:                                                 # float32: also offline's (see above for q4)
        assert ids[0] == model.transcribe(g["audio"]).token_ids
    for a, b in zip(saved._enc_caches + saved._dec.caches, computed._enc_caches + computed._dec.caches):
        assert a.filled == b.filled
        np.testing.assert_array_equal(a.pos, b.pos)
        np.testing.assert_array_equal(a.k, b.k)
        np.testing.assert_array_equal(a.v, b.v)


def test_a_model_reads_its_lm_head_with_its_first_prefix(monkeypatch):
    """The silence prefix never multiplies the LM head (its tokens are given), so computing it also runs one
    zero row through the head: the model's first session then finds the head read in before its first
    token. Once per prefix, not per session."""
    from voxtral_ref.runtime import stream
    heads, real = [], stream.lm_head
    monkeypatch.setattr(stream, "lm_head", lambda x, w: heads.append((x.copy(), w)) or real(x, w))
    model = voxtral_ref.load(MODEL_DIRS["mistral"])
    model.stream()
    assert len(heads) == 1 and heads[0][1] is model.weights.lm_head and not heads[0][0].any()
    model.stream()
    assert len(heads) == 1


# --- resampling ---------------------------------------------------------------------------------------------
def test_soxr_stream_resampler_equals_one_shot():
    """Why a chunked 44.1 kHz stream can equal transcribe() on the whole file: soxr's stream resampler gives
    the one-shot resampler's samples exactly, whatever the chunking."""
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 44100 * 2 + 17).astype(np.float32)
    whole = soxr.resample(x, 44100, 16000, quality="HQ")
    rs = soxr.ResampleStream(44100, 16000, 1, dtype="float32", quality="HQ")
    parts = [rs.resample_chunk(x[i:i + n]) for i, n in zip(range(0, len(x), 997), [997] * len(x))]
    parts.append(rs.resample_chunk(np.zeros(0, np.float32), last=True))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("sizes", [[1], [441], [1, 4410, 7, 0, 13]])
def test_44k_chunked_equals_whole(tiny_mistral, sizes):
    audio = soxr.resample(load_case("speech_en_480")["audio"], 16000, 44100).astype(np.float32)
    off = tiny_mistral.transcribe(audio, sample_rate=44100)
    ids, text = run_stream(tiny_mistral.stream(sample_rate=44100), audio, sizes, every=7)
    assert ids == off.token_ids and text == off.text


# --- end of speech --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eos_model(tiny_mistral):
    """The tiny model with EOS's (tied) embedding made a slightly louder copy of a token it emits mid-way,
    so that EOS wins there: a model that ends a transcript early."""
    g, off = offline(tiny_mistral, "speech_en_long_480")
    word = off.token_ids[len(off.token_ids) // 2]
    w = copy.copy(tiny_mistral.weights)
    w._t = dict(w._t)
    emb = np.array(w._t["tok_embeddings"], dtype=np.float32)
    emb[EOS_ID] = 1.05 * emb[word]
    w._t["tok_embeddings"] = emb
    m = Model(tiny_mistral.cfg, w, tiny_mistral.tokenizer, tiny_mistral.backend, tiny_mistral.path)
    ids = m.transcribe(g["audio"]).token_ids
    assert ids[-1] == EOS_ID and len(ids) < len(off.token_ids)                   # offline stops early
    return m, g["audio"], ids


def test_eos_ends_the_output_not_the_session(eos_model):
    m, audio, offline_ids = eos_model
    s = m.stream()
    s.feed(audio)
    assert s.step().token_ids == offline_ids                         # everything up to EOS, EOS kept
    s.feed(audio)                                                    # a live source goes on: accepted ...
    assert s.step().token_ids == [] and not s.done                   # ... and ignored
    assert s.close().token_ids == [] and s.token_ids == offline_ids and s.done
    ids, _ = run_stream(m.stream(), audio, [1279])
    assert ids == offline_ids


def test_past_eos_keeps_decoding(eos_model):
    m, audio, offline_ids = eos_model
    s = m.stream(past_eos=True)
    ids, _ = run_stream(s, audio, [1280])
    assert ids[:len(offline_ids)] == offline_ids and len(ids) > len(offline_ids)


# --- API edges --------------------------------------------------------------------------------------------
def test_close_twice_and_use_after_close(tiny_mistral):
    s = tiny_mistral.stream()
    s.feed(load_case("chirp_480")["audio"])
    first = s.close()
    assert first.token_ids and s.done
    again = s.close()
    assert again.token_ids == [] and again.text == "" and s.token_ids == first.token_ids
    with pytest.raises(VoxtralError, match="after close"):
        s.feed(np.zeros(10, np.float32))
    with pytest.raises(VoxtralError, match="after close"):
        s.step()


def test_empty_feeds_and_empty_stream(tiny_mistral):
    s = tiny_mistral.stream()
    for _ in range(3):
        s.feed(np.zeros(0, np.float32))
        s.feed([])
        assert s.step().token_ids == []
    e = s.close()
    assert e.token_ids == [] and e.text == "" and s.done and s.token_ids == []


def test_early_close_returns_everything_emitted(tiny_mistral):
    """Closing mid-stream ends the audio there: the result is offline's on the audio fed so far."""
    audio = load_case("speech_en_480")["audio"][:20000]
    s = tiny_mistral.stream()
    s.feed(audio)
    head = s.step().token_ids
    tail = s.close().token_ids
    assert head and head + tail == s.token_ids == tiny_mistral.transcribe(audio).token_ids


@pytest.mark.parametrize("bad, words", [
    (np.array([0.0, np.nan], np.float32), "NaN"), (np.array([np.inf]), "infinite"),
    (np.zeros((2, 2, 2), np.float32), "shape"), (np.array(["a"]), "dtype")])
def test_bad_feeds(tiny_mistral, bad, words):
    s = tiny_mistral.stream()
    with pytest.raises(VoxtralError, match=words):
        s.feed(bad)
    assert s.close().token_ids == []                                  # the bad chunk was not queued


@pytest.mark.parametrize("kwargs, words", [({"delay_ms": 100}, "delay_ms"), ({"sample_rate": 0}, "sample_rate"),
                                           ({"sample_rate": 44100.0}, "sample_rate")])
def test_bad_session_settings(tiny_mistral, kwargs, words):
    with pytest.raises(VoxtralError, match=words):
        tiny_mistral.stream(**kwargs)


@pytest.mark.parametrize("max_tokens", [-1, 1.5, True])
def test_bad_max_tokens(tiny_mistral, max_tokens):
    with pytest.raises(VoxtralError, match="max_tokens"):
        tiny_mistral.stream().step(max_tokens)


# --- CLI ------------------------------------------------------------------------------------------------
def cli(args, stdin_path=None, env=None):
    with open(stdin_path or "/dev/null", "rb") as f:
        command = [sys.executable, "-m", "voxtral_ref.apps.cli", "stream", "--model", str(MODEL_DIRS["mistral"]),
                   "--backend", "numpy", *args]
        return subprocess.run(command, stdin=f, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


@pytest.mark.parametrize("fmt", ["wav", "s16le"])
def test_cli_stream_prints_offline_text(tiny_mistral, tmp_path, fmt):
    g, off = offline(tiny_mistral, "speech_en_480")
    pcm = np.round(g["audio"] * 32768).astype("<i2")                # golden audio is exact 16-bit PCM
    path = tmp_path / f"a.{fmt}"
    if fmt == "wav":
        sf.write(path, pcm, 16000, subtype="PCM_16")
    else:
        pcm.tofile(path)
    r = cli(["--format", fmt], path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == off.text.strip() + "\n"
    assert f"{len(off.token_ids)} tokens" in r.stderr and "latency" in r.stderr


def test_cli_stream_precision_and_quantize(tmp_path):
    """--precision bf16 --quantize int8 reach the session's model: the text is that model's session's text
    for the CLI's chunks, FEED_MAX_S from a file, whose audio is all waiting (a bf16 or quantised stream
    follows offline only up to a near tie)."""
    from voxtral_ref.runtime.stream import FEED_MAX_S
    g = load_case("speech_en_480")
    path = tmp_path / "a.wav"
    pcm = np.round(g["audio"] * 32768).astype("<i2")
    sf.write(path, pcm, 16000, subtype="PCM_16")
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="numpy", precision="bf16", quantize="int8")   # as cli()
    _, text = run_stream(model.stream(), pcm.astype(np.float32) / 32768, [int(16000 * FEED_MAX_S)])
    r = cli(["--precision", "bf16", "--quantize", "int8"], path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == text.strip() + "\n" and "bf16 precision, int8 weights" in r.stderr


def test_cli_stream_errors_are_one_line(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"not audio at all" * 10)
    checks = [([], "WAV")] + ([(["--from-mic"], "sounddevice")] if importlib.util.find_spec("sounddevice") is None else [])
    for args, words in checks:
        r = cli(args, path)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_sources_join_the_audio_waiting():
    """A source that got ahead of the decoder is read in one chunk, up to FEED_MAX_S, not 20 ms a step (so its
    positions decode together, verifying drafts); with less waiting, what is there (a read of more would block
    until it came, past a Ctrl-C)."""
    from voxtral_ref.runtime.stream import FEED_MAX_S, _bytes_waiting, _raw_chunks, _wav_chunks
    assert _bytes_waiting(-1) == 0                      # unknown: read a block, which blocks at worst
    most = int(16000 * FEED_MAX_S)
    pcm = (np.arange(int(1.5 * most)) % 2000 - 1000).astype("<i2")
    buf = io.BytesIO()
    sf.write(buf, pcm, 16000, format="WAV", subtype="PCM_16")
    for wav in (True, False):
        r, w = os.pipe()
        os.write(w, buf.getvalue() if wav else pcm.tobytes())              # 48 KB: within a pipe's 64 KB
        os.close(w)
        with open(r, "rb") as f:
            chunks = list(_wav_chunks(f.fileno(), threading.Event())[1] if wav
                          else _raw_chunks(f.fileno(), np.dtype("<i2"), 1, most, threading.Event()))
        assert [len(c) for c in chunks] == [most, len(pcm) - most], wav
        joined = np.concatenate(chunks).reshape(-1)
        assert np.array_equal(joined, pcm / 32768 if wav else pcm)
    r, w = os.pipe()                                    # a trickle: 30 ms waiting, then the writer goes on
    os.write(w, buf.getvalue()[:44 + 960])
    with open(r, "rb") as f:
        first = next(_wav_chunks(f.fileno(), threading.Event())[1])
    os.close(w)
    assert len(first) == 480


@pytest.mark.parametrize("fmt", ["wav", "s16le"])
def test_cli_ctrl_c_ends_a_stalled_source_and_flushes(tiny_mistral, fmt):
    """A source that stops sending but stays open (a frozen recorder): the first Ctrl-C ends the audio and
    everything received is transcribed, as offline. A read blocked on the pipe used to outlive the signal
    (Python retries it): the second Ctrl-C then exited without the flush, or not at all (WAV)."""
    g, off = offline(tiny_mistral, "speech_en_480")
    pcm = np.round(g["audio"] * 32768).astype("<i2")
    buf = io.BytesIO()
    sf.write(buf, pcm, 16000, format="RAW" if fmt == "s16le" else "WAV", subtype="PCM_16")
    data = buf.getvalue()
    if fmt == "wav":                                    # a live WAV stream (ffmpeg's to a pipe): no length
        assert data[36:40] == b"data"
        data = data[:4] + b"\xff\xff\xff\xff" + data[8:40] + b"\xff\xff\xff\xff" + data[44:]
    command = [sys.executable, "-m", "voxtral_ref.apps.cli", "stream", "--model", str(MODEL_DIRS["mistral"]),
               "--backend", "numpy", "--format", fmt]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        proc.stdin.write(data)
        proc.stdin.flush()                              # ... and the writer stays open, sending nothing more
        assert proc.stderr.readline().startswith(b"voxtral-ref stream:")      # the model is loaded
        time.sleep(2.0)                                 # the audio is in and decoded: the read now waits
        proc.send_signal(signal.SIGINT)
        proc.wait(30)                                   # stdin still open (communicate() would close it)
        out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
    assert proc.returncode == 0, err
    assert out == off.text.strip() + "\n" and "flushing" in err


def test_cli_report_prints_the_text_stripped_as_transcribe_does(capsys):
    """Deltas go out as they come, but a leading space and spaces before the end are not written: stdout is
    `voxtral-ref transcribe`'s text (stripped, then a newline)."""
    from voxtral_ref.runtime import stream as rs
    report = rs._Report(16000, n_delay=6)
    for text in ("  ", " Hello", " ", "", "world.\n ", " "):
        report.emit(lambda: rs.Emission([], text, []), streaming=False)
    report.finish()
    assert capsys.readouterr().out == "Hello world.\n"


def test_cli_report_counts_the_text_behind_a_real_time_source(monkeypatch, capsys):
    """The stderr line's lag is wall time since the source began less the audio the tokens cover, 0 for a
    source faster than real time, and not counted after EOS (no text follows it)."""
    from voxtral_ref.runtime import stream as rs
    clock = [100.0]
    monkeypatch.setattr(rs.time, "perf_counter", lambda: clock[0])
    report = rs._Report(16000, n_delay=6)

    def step(ids, seconds):
        def work():
            clock[0] += seconds
            return rs.Emission(ids, "", [0.0] * len(ids))
        return work
    report.fed(16000)                                   # 1 s read at t = 100: the source began at 99
    report.emit(step([1] * 4, 0.5))                     # t = 100.5; (4 + 6) tokens cover 0.8 s: 0.7 s behind
    assert report.lag == pytest.approx(0.7)
    report.fed(16000)
    report.emit(step([1] * 20, 0.1))                    # t = 100.6; 30 tokens cover 2.4 s: ahead, 0
    assert report.lag == 0.0 and report.lag_max == pytest.approx(0.7)
    report.emit(step([rs.EOS_ID], 5.0))
    report.emit(step([], 5.0))                          # after EOS: no text is owed
    assert report.lag == 0.0
    report.finish()
    assert "at most 0.70 s, 0.00 s when the audio ended" in capsys.readouterr().err


FAKE_SOUNDDEVICE = """
import os, signal, threading, time
import numpy as np

class InputStream:  # delivers a recording in blocks from the audio thread, then presses Ctrl-C
    def __init__(self, samplerate, channels, dtype, blocksize, callback):
        self.blocksize, self.callback = blocksize, callback

    def __enter__(self):
        def run():
            x = np.load(os.environ["FAKE_MIC_NPY"])
            for i in range(0, len(x), self.blocksize):
                self.callback(x[i:i + self.blocksize, None], self.blocksize, None, None)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=run, daemon=True).start()
        return self

    def __exit__(self, *exc):
        return False
"""


def test_cli_from_mic_ctrl_c_flushes_everything(tiny_mistral, tmp_path):
    """With a stand-in for sounddevice: the first Ctrl-C ends the audio, and what was captured is all
    transcribed, exactly as offline."""
    g, off = offline(tiny_mistral, "speech_en_480")
    (tmp_path / "sounddevice.py").write_text(FAKE_SOUNDDEVICE)
    np.save(tmp_path / "mic.npy", g["audio"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "FAKE_MIC_NPY": str(tmp_path / "mic.npy")}
    r = cli(["--from-mic"], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == off.text.strip() + "\n" and "flushing" in r.stderr


# --- a file's encoder running ahead of its decoder (stream.EncoderAhead) -------------------------------------
needs_c = pytest.mark.skipif(not ckernels.available(), reason="the C kernels are not built")
AHEAD_MODES = {"f32": {}, "bf16": {"precision": "bf16"}, "q4": {"quantize": "q4"}}
AHEAD_MODELS = {}


@pytest.fixture
def two_threads():
    """Kernel threads enough to share (the test machine may have one core): ckernels.CoreShare needs 2."""
    before = ckernels.get_threads()
    ckernels.set_threads(2)
    yield
    ckernels.set_threads(before)


def transcribed_ahead(model, audio, delay_ms, ahead, monkeypatch):
    """transcribe() with its encoder ahead (on its thread) or not -> (Transcript, [each encoder chunk's
    embeddings], the logits of every kept token)."""
    from test_engine import recording
    from voxtral_ref.runtime.stream import StreamSession, session_prefix
    session_prefix(model, delay_tokens(model.cfg.default_delay_ms if delay_ms is None else delay_ms))  # (not recorded)
    monkeypatch.setattr(Model, "encodes_ahead", property(lambda self: ahead))
    chunks, encode = [], StreamSession._encode

    def recorded(session, n):
        out = encode(session, n)
        chunks.append(out.copy())
        return out
    monkeypatch.setattr(StreamSession, "_encode", recorded)
    with recording() as logits:
        t = model.transcribe(audio, delay_ms=delay_ms)
    monkeypatch.undo()
    assert not [th for th in threading.enumerate() if th.name == "voxtral_ref encoder"]   # stopped and joined
    return t, chunks, next(iter(logits.values()), [])


@needs_c
@pytest.mark.parametrize("mode", AHEAD_MODES)
def test_encoding_ahead_computes_what_encoding_on_demand_does(mode, two_threads, monkeypatch):
    """The encoder on its own thread cuts the audio into the chunks the session's on-demand encoding cuts it
    into, whatever the two threads' timing, so every embedding, every kept token's logits and the ids come
    out bit for bit the same, in float32 and bf16 too (where a chunk's bits depend on its length)."""
    if mode not in AHEAD_MODELS:
        AHEAD_MODELS[mode] = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c", **AHEAD_MODES[mode])
    model = AHEAD_MODELS[mode]
    assert model.encodes_ahead                                   # transcribe()'s default here
    for case in CASES:
        g = load_case(case)
        (t0, chunks0, logits0), (t1, chunks1, logits1) = (
            transcribed_ahead(model, g["audio"], int(g["delay_ms"]), ahead, monkeypatch) for ahead in (False, True))
        assert t1.token_ids == t0.token_ids and t1.text == t0.text
        if mode == "f32":
            assert t1.token_ids == g["token_ids"].tolist()
        assert [len(c) for c in chunks1] == [len(c) for c in chunks0] and len(chunks0) > 1
        assert all(np.array_equal(a, b) for a, b in zip(chunks1, chunks0))
        assert len(logits1) == len(logits0) and all(np.array_equal(a, b) for a, b in zip(logits1, logits0))


@needs_c
def test_an_encoder_error_reaches_the_caller(two_threads, monkeypatch):
    """An error on the encoder's thread is raised by transcribe() (whose finally stops the thread: checked in
    transcribed_ahead), and the model transcribes normally afterwards."""
    from voxtral_ref.runtime import stream
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    g = load_case("speech_en_long_480")
    model.stream()                                  # its silence prefix is computed before the failures start
    calls, encoder_pass = [], stream.encoder_pass

    def failing(weights, work):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise MemoryError("no room for the third chunk")
        return encoder_pass(weights, work)
    monkeypatch.setattr(stream, "encoder_pass", failing)
    with pytest.raises(MemoryError, match="third chunk"):
        transcribed_ahead(model, g["audio"], 480, True, monkeypatch)
    assert set(calls) == {"voxtral_ref encoder"}
    assert not [th for th in threading.enumerate() if th.name == "voxtral_ref encoder"]
    assert model.transcribe(g["audio"]).token_ids == g["token_ids"].tolist()


@needs_c
def test_encoding_ahead_stops_at_eos_with_the_same_ids(eos_model, two_threads, monkeypatch):
    m, audio, offline_ids = eos_model
    m = Model(m.cfg, m.weights, m.tokenizer, "c", m.path)
    t, _, _ = transcribed_ahead(m, audio, None, True, monkeypatch)
    assert t.token_ids == transcribed_ahead(m, audio, None, False, monkeypatch)[0].token_ids
    assert t.token_ids[-1] == EOS_ID


@needs_c
def test_encoding_ahead_keeps_memory_flat(two_threads, monkeypatch):
    """Its thread starts no chunk while AHEAD_TOKENS embeddings wait for the decoder: with a decoder slower
    than the encoder, what waits is fewer than that many plus one chunk (a file's chunks are up to 250
    tokens): every take is one or more whole chunks, all but the last of them fewer than AHEAD_TOKENS."""
    from voxtral_ref.runtime import stream
    from voxtral_ref.stages.generate import Decoder
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    g = load_case("speech_en_long_480")
    monkeypatch.setattr(stream, "AHEAD_TOKENS", 8)
    taken, run_chunk, take = [], Decoder.run_chunk, stream.EncoderAhead.take

    def slow(dec, embeds):
        time.sleep(0.01)
        return run_chunk(dec, embeds)

    def counted(ahead, wait):
        out = take(ahead, wait)
        if out is not None:
            taken.append(len(out))
        return out
    monkeypatch.setattr(Decoder, "run_chunk", slow)
    monkeypatch.setattr(stream.EncoderAhead, "take", counted)
    t, chunks, _ = transcribed_ahead(model, g["audio"], 480, True, monkeypatch)
    assert t.token_ids == g["token_ids"].tolist()
    lengths = [len(c) for c in chunks]
    assert max(lengths) > 8 and sum(taken) == sum(lengths)
    for n in taken:
        got = []
        while sum(got) < n:
            assert sum(got) < 8, (taken, lengths)
            got.append(lengths.pop(0))
        assert sum(got) == n, (taken, lengths)


@needs_c
def test_core_share_moves_each_sides_threads(two_threads):
    """ckernels.CoreShare: a side's regions take all the threads while the other waits, its share while
    the other works; a thread that follows no side keeps the setting."""
    share = ckernels.CoreShare(1)
    seen = {}

    def other_side():
        with share.side(1):
            seen["alone"] = ckernels.get_threads()
            with share.working(1):
                seen["working"] = ckernels.get_threads()
                done.wait()
    done = threading.Event()
    with share.side(0):
        assert ckernels.get_threads() == 2
        t = threading.Thread(target=other_side)
        with share.working(0):
            t.start()
            while "working" not in seen:
                time.sleep(0.001)
            assert ckernels.get_threads() == 1                      # both work: 1 + 1
            done.set()
            t.join()
        assert ckernels.get_threads() == 2                          # the other is done
    assert seen == {"alone": 1, "working": 1} and ckernels.get_threads() == 2
    with pytest.raises(ValueError, match="none"):
        ckernels.CoreShare(2)


@needs_c
def test_a_dropped_session_leaves_no_encoder_thread(two_threads):
    """The encoder's thread runs only while it has chunks to encode: a session left without close() ends
    its thread once its audio is encoded (or AHEAD_TOKENS wait), and is then collected."""
    import gc
    import weakref
    from voxtral_ref.runtime.stream import StreamSession
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    g = load_case("speech_en_long_480")
    s = StreamSession(model, max_positions=1000, encode_ahead=True)
    s.feed(g["audio"])
    assert s.step(max_tokens=2).token_ids
    threads, gone = list(s._ahead._threads), weakref.ref(s)
    assert threads
    del s
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    gc.collect()
    assert gone() is None


@needs_c
def test_end_audio_pads_once_and_refuses_more(two_threads):
    """transcribe()'s _end_audio pads the end as close() does: step() then decodes to the end, close() adds
    nothing, and a feed after it is refused as after close()."""
    from voxtral_ref.runtime.stream import StreamSession
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    g = load_case("speech_en_480")
    for ahead in (False, True):
        s = StreamSession(model, max_positions=1000, encode_ahead=ahead)
        s.feed(g["audio"])
        s._end_audio()
        with pytest.raises(VoxtralError, match="after close"):
            s.feed(g["audio"])
        ids = []
        while e := s.step().token_ids:
            ids += e
        assert s.close().token_ids == [] and ids == s.token_ids == g["token_ids"].tolist()
