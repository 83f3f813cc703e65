"""The batching engine (runtime/engine.py): sequences decoded together give exactly what each gives alone.

Quantised weights: every row of every pass is computed the same way whatever the batch (the int8 / q4 kernels
are row-independent), so ids AND the logits of every position are bit-identical to decoding alone. f32 / bf16:
the float32 `linear` multiplies 1-4 rows with a GEMV and more with a GEMM, which sums in another order, so
a batched row differs from a lone one by float32 rounding; bit-identity would need a kernel that computes
each row the same way whatever the number of rows. There the ids are compared (the golden cases' top-two
logits are at least 1e-3 of the scale apart, far above that rounding)."""

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import voxtral_ref
from voxtral_ref.config import delay_tokens
from voxtral_ref.errors import VoxtralError
from voxtral_ref.runtime import ckernels
from voxtral_ref.runtime.engine import Engine
from voxtral_ref.stages import generate
from voxtral_ref.stages.audio import to_mono_16k
from voxtral_ref.stages.generate import Decoder, encode, greedy_decode, pad_offline

from conftest import MODEL_DIRS, golden_cases, load_case

CASES = [(name, int(meta["delay_ms"])) for name, meta in golden_cases() if "token_ids" in meta]
BACKENDS = ["numpy"] + (["c"] if ckernels.available() else [])
MODES = {"f32": {}, "bf16": {"precision": "bf16"}, "int8": {"quantize": "int8"}, "q4": {"quantize": "q4"}}


class Run:
    """One (backend, mode) model, the golden cases' audio embeddings and their decoding alone (ids and the
    logits of every chosen token), each computed once."""

    def __init__(self, backend, mode):
        self.mode = mode
        self.model = voxtral_ref.load(MODEL_DIRS["mistral"], backend=backend, **MODES[mode])
        with self.model.kernel_mode():
            self.embeds = [encode(self.model.weights, pad_offline(to_mono_16k(load_case(n)["audio"], 16000),
                                                                  delay_tokens(d))) for n, d in CASES]
        self.alone = []
        for e, (_, d) in zip(self.embeds, CASES):
            with recording() as logits, self.model.kernel_mode():
                ids = greedy_decode(self.model.weights, e, delay_tokens(d))
            self.alone.append((ids, next(iter(logits.values()))))

    @property
    def exact(self):
        """Whether batched logits must equal the lone ones bit for bit (see the module doc)."""
        return self.mode in ("int8", "q4")

    def source(self, i):
        return lambda: (self.embeds[i], delay_tokens(CASES[i][1]))


class recording:
    """Decoder.fed wrapped: the logits each decoder chose its tokens from, {decoder: [V] rows}, in the
    order the decoders first ran (the order an Engine takes its sources in)."""

    def __enter__(self):
        self.original, self.logits = Decoder.fed, {}

        def fed(dec, ids, p0, logits):
            if logits is not None:
                self.logits.setdefault(dec, []).append(np.array(logits))
            return self.original(dec, ids, p0, logits)
        Decoder.fed = fed
        return self.logits

    def __exit__(self, *exc):
        Decoder.fed = self.original


RUNS = {}


def run_of(backend, mode):
    if (backend, mode) not in RUNS:
        RUNS[backend, mode] = Run(backend, mode)
    return RUNS[backend, mode]


def check_equal_alone(run, order, results, logits):
    """results: {index into order: ids}; logits: recording() of the batched run."""
    assert sorted(results) == list(range(len(order)))
    for k, case in enumerate(order):
        ids, alone_logits = run.alone[case]
        assert results[k] == ids, f"{CASES[case][0]} (place {k}) differs from decoding alone"
        if run.exact:
            got = list(logits.values())[k]
            assert len(got) == len(alone_logits)
            assert all(np.array_equal(a, b) for a, b in zip(got, alone_logits)), f"{CASES[case][0]}: logits differ"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_golden_case_decoded_together_equals_decoding_alone(backend, mode):
    """All golden cases, 4 per pass: ragged lengths (35..118 tokens), delays 80, 480 and 2400 ms mixed, each
    file leaving when it ends and the next joining in its place."""
    run = run_of(backend, mode)
    engine = Engine(run.model, 4)
    with recording() as logits:
        results = dict(engine.decode([run.source(i) for i in range(len(CASES))]))
    check_equal_alone(run, range(len(CASES)), results, logits)
    assert engine.rows / engine.passes > 2                     # it did decode them together


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, len(CASES) - 1), min_size=1, max_size=6),
       max_batch=st.integers(1, 5), mode=st.sampled_from(["f32", "q4"]))
def test_any_batch_composition_equals_decoding_alone(order, max_batch, mode):
    """Any files (repeats included), any max_batch: a file joins when a place frees, at whatever point the
    others have reached."""
    run = run_of(BACKENDS[-1], mode)
    with recording() as logits:
        results = dict(Engine(run.model, max_batch).decode([run.source(i) for i in order]))
    check_equal_alone(run, order, results, logits)


def test_a_failing_file_fails_alone():
    run = run_of(BACKENDS[-1], "q4")

    def bad_audio():
        raise VoxtralError("audio contains NaN")
    results = dict(Engine(run.model, 3).decode([run.source(0), bad_audio, run.source(1), run.source(2)]))
    assert isinstance(results.pop(1), VoxtralError)
    assert [results[0], results[2], results[3]] == [run.alone[i][0] for i in range(3)]


def test_a_malformed_chunk_fails_alone_before_the_pass():
    run = run_of(BACKENDS[-1], "q4")
    with run.model.kernel_mode():
        good, bad = Decoder(run.model.weights, 6), Decoder(run.model.weights, 6)
    engine = Engine(run.model)
    with engine.stepping():
        ok, failed = engine.run([(good, run.embeds[0][:generate.PREFIX]), (bad, run.embeds[0][:3])])
    assert ok.error is None and failed.error is not None and "31 positions" in str(failed.error)
    assert len(good.ids) == generate.PREFIX and not bad.ids and engine.passes == 1


def test_transcribe_batch_size_equals_transcribing_alone():
    run = run_of(BACKENDS[-1], "int8")
    audios = [load_case(n)["audio"] for n, d in CASES if d == 480]
    batch = run.model.transcribe(audios, batch_size=3)
    assert [r.token_ids for r in batch] == [run.alone[i][0] for i, (_, d) in enumerate(CASES) if d == 480]
    assert [r.text for r in batch] == [run.model.tokenizer.decode(r.token_ids) for r in batch]
    assert all(r.timings["decode_s"] > 0 and r.timings["encode_s"] > 0 for r in batch)
    assert run.model.transcribe([], batch_size=4) == []


def test_transcribe_batch_refuses_bad_input_before_any_compute():
    model = run_of(BACKENDS[-1], "int8").model
    a = load_case(CASES[0][0])["audio"]
    with pytest.raises(VoxtralError, match="audio 1 of the batch"):
        model.transcribe([a, np.array([np.nan, 0.0], np.float32)], batch_size=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(VoxtralError, match="batch_size"):
            model.transcribe([a], batch_size=bad)


def stream_ids(session, audio, chunks):
    """Feed audio cut at `chunks` (sample offsets), step after each feed, close -> the session's ids."""
    for lo, hi in zip([0] + chunks, chunks + [len(audio)]):
        session.feed(audio[lo:hi])
        session.step()
    session.close()
    return session.token_ids


@pytest.mark.parametrize("mode", ["f32", "q4"])
def test_live_sessions_stepped_together_equal_each_alone(mode):
    """Sessions of one engine, each stepped by its own thread, with mixed delays and chunkings, joining
    late and leaving early (ragged lengths): ids equal to a plain session fed the same way."""
    run = run_of(BACKENDS[-1], mode)
    rng = np.random.default_rng(5)
    plan = []
    for i, (name, delay) in enumerate(CASES[:5]):
        audio = to_mono_16k(load_case(name)["audio"], 16000)
        chunks = sorted(rng.choice(np.arange(1, len(audio)), size=6, replace=False).tolist())
        plan.append((audio, delay, chunks))
    alone = [stream_ids(run.model.stream(d), a, c) for a, d, c in plan]
    engine, results, errors = Engine(run.model), {}, []
    started = threading.Barrier(3)                            # sessions 0-2 start together, 3-4 join later

    def client(i, audio, delay, chunks):
        try:
            s = engine.stream(delay)
            if i < 3:
                started.wait()
            results[i] = stream_ids(s, audio, chunks)
        except Exception as e:                               # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i, *p)) for i, p in enumerate(plan)]
    for t in threads[:3]:
        t.start()
    while engine.passes < 3:                                 # the late ones join once the first have started
        threading.Event().wait(0.001)
    for t in threads[3:]:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [results[i] for i in range(len(plan))] == alone
    assert engine.rows > engine.passes                       # positions of several sessions shared passes


def test_sessions_stepped_together_share_every_pass():
    """Engine.together (the server's advance): sessions with mixed delays, fed a block each per round, step
    in shared passes (each pass takes every session that has a position) and end with their plain ids."""
    run = run_of(BACKENDS[-1], "q4")
    plan = [(to_mono_16k(load_case(n)["audio"], 16000), d) for n, d in CASES[:4]]
    block = 4000
    alone = [stream_ids(run.model.stream(d), a, list(range(block, len(a), block))) for a, d in plan]
    engine = Engine(run.model)
    sessions = [engine.stream(d) for _, d in plan]
    for start in range(0, max(len(a) for a, _ in plan) + block, block):
        for s, (a, _) in zip(sessions, plan):
            if start < len(a):
                s.feed(a[start:start + block])
        passes = engine.passes
        out = engine.together([s.step for s in sessions] if start < max(len(a) for a, _ in plan)
                              else [s.close for s in sessions])
        assert all(e is None for _, e in out)
        # one token per position: a session with k positions this round took part in k passes, and no pass
        # ran without a session that had its position on the way, so the passes are as many as the most
        assert engine.passes - passes == max(len(e.token_ids) for e, _ in out)
    assert [s.token_ids for s in sessions] == alone
    assert engine.rows / engine.passes > 1.5


def test_cli_batch_size_writes_what_one_by_one_writes(cli, tmp_path):
    import soundfile as sf
    paths = []
    for name, d in CASES:
        if d == 480:
            paths.append(tmp_path / f"{name}.wav")
            sf.write(paths[-1], load_case(name)["audio"], 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF????WAVEfmt ")
    args = ["transcribe", *paths[:2], tmp_path / "broken.wav", *paths[2:], "--model", MODEL_DIRS["mistral"],
            "--quantize", "q4", "-f", "json", "-q"]
    one = cli(*args)
    batched = cli(*args, "--batch-size", "3")
    assert one[0] == batched[0] == 2                          # the broken file fails alone ...
    assert one[1] == batched[1] and len(batched[1].splitlines()) == len(paths)   # ... the others are written
    assert "broken.wav" in batched[2]
    code, _, err = cli("transcribe", paths[0], "--model", MODEL_DIRS["mistral"], "--batch-size", "0")
    assert code == 2 and "--batch-size" in err


def test_a_session_with_bad_audio_fails_alone():
    run = run_of(BACKENDS[-1], "q4")
    engine = Engine(run.model)
    audio = [to_mono_16k(load_case(n)["audio"], 16000) for n, _ in CASES[:3]]
    plain = [stream_ids(run.model.stream(d), a, [len(a) // 2]) for a, (_, d) in zip(audio, CASES[:3])]
    results, errors = {}, {}
    go = threading.Barrier(3)

    def client(i):
        s = engine.stream(CASES[i][1])
        go.wait()
        try:
            if i == 1:
                s.feed(audio[i][:4000])
                s.step()
                s.feed(np.full(100, np.nan, np.float32))     # the bad chunk: refused, the session ends
            results[i] = stream_ids(s, audio[i], [len(audio[i]) // 2])
        except VoxtralError as e:
            errors[i] = e
            s.close()                                         # what came before is still decoded

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert list(errors) == [1]
    assert [results[0], results[2]] == [plain[0], plain[2]]


def test_engine_refuses_a_bad_max_batch():
    for bad in (0, -3, 2.0, None):
        with pytest.raises(VoxtralError, match="max_batch"):
            Engine(run_of(BACKENDS[-1], "q4").model, bad)
