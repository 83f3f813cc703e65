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
from voxtral_ref.runtime import ckernels, stream
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
        self.mode, self._transcribed = mode, {}
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

    def transcribed(self, delay):
        """transcribe() of each golden case of this delay, alone: [(case, ids, logits of its chosen tokens)]."""
        if delay not in self._transcribed:
            self._transcribed[delay] = []
            for case, (name, d) in enumerate(CASES):
                if d == delay:
                    with recording() as logits:
                        ids = self.model.transcribe(load_case(name)["audio"], delay_ms=d).token_ids
                    self._transcribed[delay].append((case, ids, next(iter(logits.values()))))
        return self._transcribed[delay]


class recording:
    """Decoder.fed wrapped: the logits each decoder chose its kept tokens from, {decoder: [V] rows, one per
    token}, in the order the decoders first ran. Rows of a pass's rejected drafts are left out: how many
    drafts a pass verifies depends on the batch (a backlog's drafts fill spare rows), the kept tokens' rows
    do not."""

    def __enter__(self):
        self.original, self.logits = Decoder.fed, {}

        def fed(dec, ids, p0, logits):
            tokens = self.original(dec, ids, p0, logits)
            if logits is not None:
                self.logits.setdefault(dec, []).extend(np.array(logits[:len(tokens)]))
            return tokens
        Decoder.fed = fed
        return self.logits

    def __exit__(self, *exc):
        Decoder.fed = self.original


RUNS = {}


def run_of(backend, mode):
    if (backend, mode) not in RUNS:
        RUNS[backend, mode] = Run(backend, mode)
    return RUNS[backend, mode]


def batch_equals_alone(run, delay, order, batch_size, monkeypatch):
    """transcribe(files, batch_size) of the golden cases order (indices into run.transcribed(delay), repeats
    allowed) -> asserts each file's ids are transcribe()'s alone, and with quantised weights on the C backend
    the logits of every kept token bit for bit; -> the engine the batch ran in."""
    from voxtral_ref.runtime import engine as engine_module
    alone = run.transcribed(delay)
    engines = []

    class Recorded(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)
    monkeypatch.setattr(engine_module, "Engine", Recorded)
    with recording() as logits:
        batch = run.model.transcribe([load_case(CASES[alone[k][0]][0])["audio"] for k in order], delay_ms=delay,
                                     batch_size=batch_size)
    if run.model.backend == "numpy" and run.mode == "bf16":
        # NumPy's matmul (BLAS) sums a stack of rows in another order than one row, and rounding the next
        # layer's input to bf16 can turn that float32-level difference into a flipped near tie; so here the
        # ids equal the lone ones up to a near tie of the lone logits (the C kernels compute each row alone)
        for r, k in zip(batch, order):
            got, (_, want, rows) = r.token_ids, alone[k]
            i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
            if i is None:
                assert got == want
            else:
                top2 = np.sort(rows[i])[-2:]
                assert (top2[1] - top2[0]) / np.abs(rows[i]).max() < 1e-2, f"token {i} differs at a clear margin"
        return engines[0] if engines else None
    assert [r.token_ids for r in batch] == [alone[k][1] for k in order]
    # each decoder's logits equal those of its file alone. C only: a backlog's drafts (at close) depend on
    # the batch, and only the C attention computes a query the same way whatever the others in its call
    # (the NumPy twin's einsum may sum in another order; ids still equal)
    if run.exact and run.model.backend == "c":
        for got in logits.values():
            assert any(len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
                       for _, _, want in alone), "batched logits differ from every file's alone"
    return engines[0] if engines else None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_golden_case_transcribed_together_equals_transcribing_alone(backend, mode, monkeypatch):
    """All golden cases of each delay (80, 480 and 2400 ms), 2 at a time: ragged lengths, each file leaving
    when it ends and the next joining in its place, passes shared."""
    run = run_of(backend, mode)
    for delay in sorted({d for _, d in CASES}):
        n = len(run.transcribed(delay))
        engine = batch_equals_alone(run, delay, range(n), 2, monkeypatch)
        if n > 1:   # decoder passes shared (whether encoder chunks meet depends on timing: test_engine_encoder.py)
            assert engine.rows > engine.passes


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, 3), min_size=1, max_size=6), batch_size=st.integers(2, 5),
       mode=st.sampled_from(["f32", "q4"]))
def test_any_batch_composition_equals_transcribing_alone(order, batch_size, mode, monkeypatch):
    """Any of the 480 ms files (repeats included), any batch_size: a file joins when a place frees, at
    whatever point the others have reached."""
    run = run_of(BACKENDS[-1], mode)
    batch_equals_alone(run, 480, order, batch_size, monkeypatch)


def test_a_failing_file_fails_alone(monkeypatch):
    """A file whose transcription fails raises its error once the others have ended; they run to the end."""
    model = run_of(BACKENDS[-1], "q4").model
    audios = [load_case(n)["audio"] for n, d in CASES if d == 480][:3]
    done, original = [], type(model)._transcribe_in_session

    def flaky(self, x, *args):
        if len(x) == len(audios[1]):
            raise VoxtralError("decoding failed")
        done.append(len(x))
        return original(self, x, *args)
    monkeypatch.setattr(type(model), "_transcribe_in_session", flaky)
    with pytest.raises(VoxtralError, match="decoding failed"):
        model.transcribe(audios, batch_size=2)
    assert sorted(done) == sorted([len(audios[0]), len(audios[2])])


def test_a_malformed_chunk_fails_alone_before_the_pass():
    run = run_of(BACKENDS[-1], "q4")
    with run.model.kernel_mode():
        good, bad = Decoder(run.model.weights, 6), Decoder(run.model.weights, 6)
    engine = Engine(run.model)
    with engine.stepping():
        ok, failed = engine.run([(good, run.embeds[0][:generate.PREFIX]), (bad, run.embeds[0][:3])])
    assert ok.error is None and failed.error is not None and "31 positions" in str(failed.error)
    assert len(good.ids) == generate.PREFIX and not bad.ids and engine.passes == 1


@pytest.mark.parametrize("mode", ["int8", "q4"])
def test_transcribe_batch_size_equals_transcribing_alone(mode):
    """Each file of a batch runs what transcribe() runs for it alone (its session, an engine's), so the ids
    are transcribe()'s exactly, quantised modes included."""
    run = run_of(BACKENDS[-1], mode)
    audios = [load_case(n)["audio"] for n, d in CASES if d == 480]
    batch = run.model.transcribe(audios, batch_size=3)
    assert [r.token_ids for r in batch] == [run.model.transcribe(a).token_ids for a in audios]
    assert [r.text for r in batch] == [run.model.tokenizer.decode(r.token_ids) for r in batch]
    assert all(r.timings["decode_s"] > 0 and r.timings["encode_s"] > 0 for r in batch)
    assert run.model.transcribe([], batch_size=4) == []


def test_transcribe_batch_refuses_bad_input_before_any_compute():
    model = run_of(BACKENDS[-1], "int8").model
    a = load_case(CASES[0][0])["audio"]
    for batch_size in (1, 2):                    # one by one too: nothing is transcribed before the bad one
        with pytest.raises(VoxtralError, match="audio 1 of the batch"):
            model.transcribe([a, np.array([np.nan, 0.0], np.float32), a], batch_size=batch_size)
        with pytest.raises(VoxtralError, match="audio 0 of the batch: the audio is empty"):
            model.transcribe([[]], batch_size=batch_size)
        with pytest.raises(VoxtralError, match="a single number"):
            model.transcribe(list(a[:100]), batch_size=batch_size)
        assert [r.token_ids for r in model.transcribe([list(a)], batch_size=batch_size)] == \
            [model.transcribe(a).token_ids]
        for bad, words in ((["a.wav"], "a file name"), ([(a, 16000)], "audio 0 of the batch: audio must be")):
            with pytest.raises(VoxtralError, match=words):
                model.transcribe(bad, batch_size=batch_size)
    with pytest.raises(VoxtralError, match="one waveform"):
        model.transcribe([a], on_token=print)
    with pytest.raises(VoxtralError, match="speculate"):
        model.transcribe([a, a], batch_size=2, speculate=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(VoxtralError, match="batch_size"):
            model.transcribe([a], batch_size=bad)
    # integers of any type, as delay_ms takes them (an np.int64 from an array, say)
    assert model.transcribe([a], batch_size=np.int64(2))[0].token_ids == \
        model.transcribe(a, speculate=np.int32(1)).token_ids == model.transcribe(a).token_ids
    session = model.stream()
    session.feed(a)
    assert len(session.step(max_tokens=np.int64(1)).token_ids) <= 1
    assert Engine(model, max_batch=np.int16(4)).max_batch == 4


def test_ctrl_c_stops_a_batch_from_starting_more_files(monkeypatch):
    """KeyboardInterrupt reaches the caller at once, and the worker threads finish only the files in flight
    (they kept taking files until the list was done, and the process could not exit meanwhile)."""
    import os
    import signal
    import time
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    a = load_case(CASES[0][0])["audio"]
    started, real = [], model._transcribe_in_session
    monkeypatch.setattr(model, "_transcribe_in_session", lambda *args: started.append(1) or real(*args))
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        model.transcribe([a] * 200, batch_size=2)
    deadline = time.monotonic() + 30
    while any(t.name == "voxtral-ref file" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(started) < 200


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
    engine = Engine(run.model)
    results, _ = sessions_in_threads(engine, plan, lambda: engine.passes)
    assert results == alone
    assert engine.rows > engine.passes                       # positions of several sessions shared passes


def sessions_in_threads(engine, plan, passes):
    """A session of `engine` per (audio, delay, cuts) of plan, each fed (stream_ids) by a thread of its own:
    0-2 start together, the rest join once passes() >= 3, each leaves when its audio ends.
    -> (their ids, the sessions), in plan's order."""
    results, sessions, errors = {}, {}, []
    started = threading.Barrier(3)

    def client(i, audio, delay, chunks):
        try:
            sessions[i] = engine.stream(delay)
            if i < 3:
                started.wait()
            results[i] = stream_ids(sessions[i], audio, chunks)
        except Exception as e:                               # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i, *p)) for i, p in enumerate(plan)]
    for t in threads[:3]:
        t.start()
    while passes() < 3 and not errors:                       # the late ones join once the first have started
        threading.Event().wait(0.001)
    for t in threads[3:]:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    return [results[i] for i in range(len(plan))], [sessions[i] for i in range(len(plan))]


def test_sessions_stepped_together_share_every_pass(monkeypatch):
    """Engine.together (the server's advance): sessions with mixed delays, fed a block each per round, step
    in shared passes (each pass takes every session that has a position) and end with their plain ids.
    Without drafts (tests/test_backlog.py has them), so that a pass gives a session one token."""
    monkeypatch.setattr(stream, "BACKLOG_DRAFT", 0)
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


def within(seconds, fn):
    """fn() in a thread; a hang fails the test instead of the suite."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "deadlock"
    return out[0]


def test_together_calls_that_wait_on_each_other_do_not_deadlock():
    """Two calls of one `together` counted as stepping, one waiting on a lock the other holds while it waits
    for a pass: the pass must not wait for the blocked one. (1) two sessions of a delay whose silence prefix
    is not computed yet (the model's prefix lock); (2) the same session stepped and closed by two calls (its
    turn lock)."""
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    a = load_case(CASES[0][0])["audio"]
    engine = Engine(model)

    def new_session():
        s = engine.stream(960)
        s.feed(a)
        s.step()
        s.close()
        return s.token_ids
    results = within(60, lambda: engine.together([new_session, new_session]))
    assert [r for r, _ in results] == [model.transcribe(a, delay_ms=960).token_ids] * 2
    s, o = engine.stream(), engine.stream()
    s.feed(a)
    o.feed(a)
    results = within(60, lambda: engine.together([s.step, o.step, s.close]))
    assert [e for _, e in results] == [None] * 3
    o.close()
    assert s.token_ids == o.token_ids == model.transcribe(a).token_ids


def test_engine_refuses_a_bad_max_batch():
    for bad in (0, -3, 2.0, None):
        with pytest.raises(VoxtralError, match="max_batch"):
            Engine(run_of(BACKENDS[-1], "q4").model, bad)


# --- exact speculative verification ---------------------------------------------------------------------------
def oracle_drafter(run, case, wrong):
    """A drafter that knows greedy decoding's ids for `case` and guesses them, except where `wrong` (a set of
    token indices) says: so every verification path runs (all accepted, a miss at any place, drafts running
    past EOS or the audio's end). The real drafter's guesses ([STREAMING_PAD]) are all misses on the tiny
    random model, which never pads."""
    truth = None

    def draft(dec, n_positions, k):
        nonlocal truth
        truth = truth or dec.prompt + run.alone[case][0]
        at, k = len(dec.ids), max(0, min(k, n_positions - len(dec.ids)))
        guess = [t if at + j - len(dec.prompt) not in wrong else (t + 1) % 2048 for j, t in enumerate(truth[at:at + k])]
        return guess + [generate.STREAMING_PAD_ID] * (k - len(guess))
    return draft


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_speculative_verification_gives_greedy_ids(backend, mode, monkeypatch):
    """Every golden case with a drafter right 3 times out of 4 (k = 5); the real drafter's all-miss runs are
    test_speculate_is_checked's."""
    run = run_of(backend, mode)
    for case, (_, delay) in enumerate(CASES):
        monkeypatch.setattr(generate, "draft_tokens", oracle_drafter(run, case, set(range(3, 200, 4))))
        with run.model.kernel_mode():
            assert greedy_decode(run.model.weights, run.embeds[case], delay_tokens(delay), speculate=5) == run.alone[case][0]


def verification_passes(n_generated, n_positions, n_prompt, k, wrong):
    """How many passes exact verification takes after the prompt's: each accepts its first token and then
    one more per leading right guess (greedy_decode's draft is cut to the positions left)."""
    g, passes = 1, 0
    while g < n_generated:
        kk = max(0, min(k, n_positions - (n_prompt + g)))
        a = 1
        while a <= kk and g + a - 1 not in wrong:
            a += 1
        g, passes = g + a, passes + 1
    return passes


@settings(max_examples=15, deadline=None)
@given(case=st.integers(0, len(CASES) - 1), k=st.integers(1, generate.MAX_DRAFT),
       wrong=st.sets(st.integers(0, 120), max_size=40), mode=st.sampled_from(["f32", "q4"]))
def test_any_draft_length_and_misses_give_greedy_ids(case, k, wrong, mode):
    """Ids as greedy's, exactly as many passes as right guesses allow (no guess wrongly refused), and the
    caches left as greedy decoding leaves them: the same positions live (a rejected position's slot must
    not count as live: on the real model's 8192-position window an unwritten slot would be reached)."""
    run = run_of(BACKENDS[-1], mode)
    seen, made, passes = [], [], [0]

    class Recorded(Decoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    def counted(*a, **kw):
        passes[0] += 1
        return decoder_pass(*a, **kw)
    decoder_pass = generate.decoder_pass
    saved = generate.draft_tokens, generate.Decoder, generate.decoder_pass
    generate.draft_tokens, generate.Decoder, generate.decoder_pass = oracle_drafter(run, case, wrong), Recorded, counted
    try:
        with run.model.kernel_mode():
            embeds, n_delay = run.embeds[case], delay_tokens(CASES[case][1])
            ids = greedy_decode(run.model.weights, embeds, n_delay, on_token=seen.append, speculate=k)
            greedy_decode(run.model.weights, embeds, n_delay)
    finally:
        generate.draft_tokens, generate.Decoder, generate.decoder_pass = saved
    assert ids == seen == run.alone[case][0]
    spec, plain = made
    assert passes[0] - 2 - len(ids) - 1 == verification_passes(len(ids), len(embeds), len(plain.prompt), k, wrong)
    q, window = len(plain.ids) - 1, run.model.cfg.decoder.sliding_window     # the next query's reach
    for a, b in zip(spec.caches, plain.caches):
        seen_by = [sorted(p for p in c.pos[:c.filled] if q - window < p < q) for c in (a, b)]
        assert seen_by[0] == seen_by[1] and (a.pos[:a.filled] >= 0).all()


def test_a_rejected_draft_leaves_the_caches_as_plain_decoding():
    """Before the ring is full: after a verification pass, the live slots are exactly plain decoding's
    (a rejected position's slot must not count: the real model's window would reach its position -1)."""
    run = run_of(BACKENDS[-1], "q4")
    embeds, truth = run.embeds[0], run.alone[0][0]
    with run.model.kernel_mode():
        spec, plain = Decoder(run.model.weights, 6), Decoder(run.model.weights, 6)
        for dec in (spec, plain):
            for _ in range(4):                                        # prefix, prompt, 3 tokens
                ids, p0 = dec.chunk()
                dec.run_chunk(embeds[p0:p0 + len(ids)])
        for draft in (lambda at: [truth[at] + 1, 5, 6], lambda at: [truth[at], truth[at + 1], 7, 8]):
            spec.draft = draft(len(spec.ids) - len(spec.prompt))      # guesses of the tokens after the next
            ids, p0 = spec.chunk()
            got = spec.run_chunk(embeds[p0:p0 + len(ids)])
            for _ in got:
                ids, p0 = plain.chunk()
                plain.run_chunk(embeds[p0:p0 + len(ids)])
            assert plain.ids == spec.ids
            for a, b in zip(spec.caches, plain.caches):
                assert a.filled == b.filled < a.capacity
                assert np.array_equal(a.pos[:a.filled], b.pos[:b.filled])
        assert len(spec.ids) - len(spec.prompt) == 3 + 1 + 3          # the first draft missed, the second hit twice


def test_speculate_is_checked():
    model = run_of(BACKENDS[-1], "q4").model
    a = load_case(CASES[0][0])["audio"]
    assert model.transcribe(a, delay_ms=CASES[0][1], speculate=4).token_ids == run_of(BACKENDS[-1], "q4").alone[0][0]
    for bad in (-1, generate.MAX_DRAFT + 1, 2.0, True):
        with pytest.raises(VoxtralError, match="speculate"):
            model.transcribe(a, speculate=bad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_transcribe_verifies_drafts_by_default(backend, mode, monkeypatch):
    """transcribe()'s session verifies the real drafter's guesses (right now and then on the tiny model,
    which repeats tokens): every golden case gives the ids of speculate=0 (one pass for the prompt's rest,
    then one per position) in fewer passes. By default only where a pass computes each row as alone
    (Model.rows_exact: the C kernels, or quantised weights); else when asked. (In bf16 a session's chunked
    encoder rounds apart from the whole file's, so its ids are compared with the session's own;
    test_golden.py holds them to HF's.) The passes are counted with the encoder in turn: running ahead
    (stream.EncoderAhead), what a pass may draft into depends on how far the encoder has got, so the count
    varies with the two threads' timing; the ids do not (test_stream.py's encoding-ahead tests)."""
    from voxtral_ref.model import Model
    monkeypatch.setattr(Model, "encodes_ahead", property(lambda self: False))
    run, real = run_of(backend, mode), generate.decoder_pass
    assert run.model.rows_exact == (backend == "c" or mode in ("int8", "q4"))
    passes = [0]

    def counted(*a, **kw):
        passes[0] += 1
        return real(*a, **kw)
    monkeypatch.setattr(generate, "decoder_pass", counted)
    saved = 0
    for name, delay in CASES:
        audio = load_case(name)["audio"]
        run.model.transcribe(audio, delay_ms=delay)                     # the delay's silence prefix, computed once
        counts, ids = {}, {}
        for k in (None, 0, 3):
            passes[0] = 0
            ids[k] = run.model.transcribe(audio, delay_ms=delay, speculate=k).token_ids
            counts[k] = passes[0]
        assert ids[None] == ids[0] == ids[3] and counts[0] == len(ids[0]) and counts[3] <= counts[0]
        assert counts[None] == counts[3 if run.model.rows_exact else 0]
        saved += counts[0] - counts[3]
    assert saved > len(CASES)
