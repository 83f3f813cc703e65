"""Live sessions of one Engine share encoder passes (runtime/engine.py, stream.encoder_pass): the conv-stem
frames of every session stepping at the same time go through the encoder and the adapter as one stacked
pass, attention per session against its own caches.

Exactness: each session's audio embeddings and ids must be those of the same session run alone. With q4
weights the embeddings are compared bit for bit (the quantised linears compute each row the same way
whatever the rows, and attention runs per session); in f32 the float32 linear multiplies 1-4 rows with a
GEMV and more with a GEMM, which sums in another order, so there they agree to rounding and the ids are
equal. Every test also counts the passes, so that a run in which no pass was shared cannot pass."""

import numpy as np
import pytest

import voxtral_ref
from voxtral_ref.runtime import ckernels
from voxtral_ref.runtime.engine import Engine
from voxtral_ref.runtime.stream import StreamSession
from voxtral_ref.stages.audio import to_mono_16k

from conftest import MODEL_DIRS, golden_cases, load_case
from test_engine import sessions_in_threads, stream_ids

CASES = [(name, int(meta["delay_ms"])) for name, meta in golden_cases() if "token_ids" in meta]
BACKEND = "c" if ckernels.available() else "numpy"
MODES = {"f32": {}, "q4": {"quantize": "q4"}}
MODELS = {}


def model_of(mode, backend=BACKEND):
    if (mode, backend) not in MODELS:
        MODELS[mode, backend] = voxtral_ref.load(MODEL_DIRS["mistral"], backend=backend, **MODES[mode])
    return MODELS[mode, backend]


def audio_of(name):
    return to_mono_16k(load_case(name)["audio"], 16000)


@pytest.fixture
def encoded(monkeypatch):
    """StreamSession._encode recorded: {session: [its audio embeddings [n, dim] per encoder step]}."""
    seen, real = {}, StreamSession._encode

    def encode(self, n):
        out = real(self, n)
        seen.setdefault(self, []).append(out)
        return out
    monkeypatch.setattr(StreamSession, "_encode", encode)
    return seen


def check_same_embeddings(mode, mine, alone):
    """One session's encoder steps against the same session's alone: as many, of the same sizes, equal."""
    assert [len(e) for e in mine] == [len(e) for e in alone]
    for a, b in zip(mine, alone):
        if mode == "q4":
            assert np.array_equal(a, b)
        else:
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()    # float32 rounding, at the rows' scale


@pytest.mark.parametrize("mode", MODES)
def test_sessions_in_threads_share_encoder_passes_and_equal_each_alone(mode, encoded):
    """Five sessions of one engine, each stepped by its own thread, mixed delays, ragged feeds (random cuts),
    three starting together and two joining once passes have run, each leaving when its audio ends: every
    session's embeddings and ids are those of a plain session fed the same way, and encoder passes were
    shared (fewer passes than the sessions' encoder steps, every step through the engine)."""
    model = model_of(mode)
    rng = np.random.default_rng(11)
    plan = []
    for name, delay in CASES[:5]:
        audio = audio_of(name)
        plan.append((audio, delay, sorted(rng.choice(np.arange(1, len(audio)), size=8, replace=False).tolist())))
    plain = [model.stream(d) for _, d, _ in plan]
    alone = [stream_ids(s, a, c) for s, (a, _, c) in zip(plain, plan)]
    engine = Engine(model)
    results, sessions = sessions_in_threads(engine, plan, lambda: engine.encoder_passes)
    assert results == alone
    for i, s in enumerate(plain):
        check_same_embeddings(mode, encoded[sessions[i]], encoded[s])
    steps = sum(len(encoded[s]) for s in sessions)
    assert engine.encoder_chunks == steps                    # every encoder step went through the engine ...
    assert engine.encoder_passes < steps                     # ... and some of them shared a pass


@pytest.mark.parametrize("mode,backend", [("q4", BACKEND), ("f32", BACKEND), ("q4", "numpy")])
def test_sessions_stepped_together_run_one_encoder_pass_per_round(mode, backend, encoded):
    """Engine.together (the server's advance), a block of audio per session per round: sessions with mixed
    delays, one joining at round 4, one closed at round 9 while the others go on, the rest closing when their
    audio ends. Each round runs as many encoder passes as the most encoder steps a session took in it (one:
    every pass takes every session with a chunk on its way), and each session ends with its plain ids and
    embeddings."""
    model = model_of(mode, backend)
    block, join, leave = 4000, 4, 9
    plan = [(audio_of(n), d) for n, d in CASES[:4]]
    plan[1] = (plan[1][0][:leave * block], plan[1][1])      # session 1's audio stops after `leave` blocks
    plain = [model.stream(d) for _, d in plan]
    alone = [stream_ids(s, a, list(range(block, len(a), block))) for s, (a, _) in zip(plain, plan)]
    engine = Engine(model)
    made = {i: engine.stream(d) for i, (_, d) in enumerate(plan) if i != 3}
    sessions, shared, start = dict(made), 0, 0
    while sessions:
        if start == join * block:
            sessions[3] = made[3] = engine.stream(plan[3][1])   # joins: its audio starts now
        calls, closing = [], []
        for i, s in sessions.items():
            audio, offset = plan[i][0], start - (join * block if i == 3 else 0)
            if offset < len(audio):
                s.feed(audio[offset:offset + block])
                calls.append(s.step)
            else:
                calls.append(s.close)
                closing.append(i)
        before = {s: len(encoded.get(s, [])) for s in sessions.values()}
        passes, chunks = engine.encoder_passes, engine.encoder_chunks
        assert all(e is None for _, e in engine.together(calls))
        steps = [len(encoded.get(s, [])) - before[s] for s in sessions.values()]
        assert engine.encoder_passes - passes == max(steps)
        assert engine.encoder_chunks - chunks == sum(steps)
        shared += sum(steps) - max(steps)
        for i in closing:
            assert sessions.pop(i).token_ids == alone[i]
        start += block
    assert shared > 20                                       # the rounds' steps did share passes
    for i, s in enumerate(plain):
        check_same_embeddings(mode, encoded[made[i]], encoded[s])


def test_a_malformed_encoder_chunk_fails_alone_before_the_pass(encoded):
    """A session whose encoder chunk would overrun its caches (its chunk size forced past their max_chunk)
    fails with one clear error before its chunk joins a pass; the others share their passes and finish
    with their plain ids."""
    model = model_of("q4")
    longest = max(CASES, key=lambda c: len(audio_of(c[0])))
    plan = [(audio_of(n), d) for n, d in (CASES[0], longest, CASES[2])]
    assert len(plan[1][0]) > 70 * 1280                       # fed at once: more than its prompt's chunks
    plain = [stream_ids(model.stream(d), a, [len(a) // 2]) for a, d in plan]
    engine = Engine(model)
    sessions = [engine.stream(d) for _, d in plan]
    sessions[1]._batch = 1000
    for s, (a, _) in zip(sessions, plan):
        s.feed(a[:len(a) // 2] if s is not sessions[1] else a)
    out = engine.together([s.step for s in sessions])
    assert isinstance(out[1][1], ValueError) and "encoder chunk" in str(out[1][1])
    assert out[0][1] is None and out[2][1] is None
    assert sessions[1] not in encoded                        # it never got embeddings
    for s, (a, _) in zip([sessions[0], sessions[2]], [plan[0], plan[2]]):
        s.feed(a[len(a) // 2:])
    assert all(e is None for _, e in engine.together([sessions[0].close, sessions[2].close]))
    assert [sessions[0].token_ids, sessions[2].token_ids] == [plain[0], plain[2]]
    assert engine.encoder_passes < engine.encoder_chunks     # the good ones still shared
