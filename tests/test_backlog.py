"""Backlog verification in live sessions (runtime/stream.py, issue 11 item 4): a session whose audio is ahead of
its decoder verifies drafted tokens with its next position in one pass. Its ids must be exactly those of
one-at-a-time stepping (stream.BACKLOG_DRAFT = 0) and of HF's golden ids, for any chunking, with max_tokens,
EOS and past_eos, alone or in an engine's shared passes.

The real drafter (generate.draft_tokens) is right now and then on the tiny random model, which repeats
tokens but never pads. Chosen guesses come from an oracle drafter that replays the reference ids, wrong
where a test says, or from one that is always wrong (a miss's embeddings must be queued and fed again), so
every path runs: all accepted, a miss anywhere, a draft running past EOS or past the audio's end. Each test
also counts passes, so none passes without verifying."""

import math
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import voxtral_ref
from voxtral_ref.config import BOS_ID, EOS_ID, SAMPLES_PER_TOKEN, STREAMING_PAD_ID
from voxtral_ref.runtime import ckernels, engine as engine_mod, stream
from voxtral_ref.runtime.engine import Engine
from voxtral_ref.stages import generate

from conftest import MODEL_DIRS, golden_cases, load_case
from test_stream import eos_model, run_stream  # noqa: F401 - eos_model is a fixture used here

CASES = [name for name, meta in golden_cases() if "token_ids" in meta]
BACKEND = "c" if ckernels.available() else "numpy"
_models = {}


def model(fmt="mistral", **mode):
    key = (fmt, tuple(sorted(mode.items())))
    if key not in _models:
        _models[key] = voxtral_ref.load(MODEL_DIRS[fmt], backend=BACKEND, **mode)
    return _models[key]


@contextmanager
def drafting(truths, wrong=frozenset()):
    """stream.draft_tokens replaced by an oracle: a decoder whose session ids should be truths[decoder]
    gets those as its guesses, except the token indices in `wrong`, cut to k and the positions left as the
    real drafter cuts them; other decoders get the real drafter's guesses."""
    real = stream.draft_tokens

    def draft(dec, n_positions, k):
        guess = real(dec, n_positions, k)
        if dec not in truths:
            return guess
        at, right = len(dec.ids), (dec.prompt + truths[dec])[len(dec.ids):len(dec.ids) + len(guess)]
        return [t if at + j - len(dec.prompt) not in wrong else (t + 1) % 2048
                for j, t in enumerate(right)] + guess[len(right):]
    stream.draft_tokens = draft
    try:
        yield
    finally:
        stream.draft_tokens = real


@contextmanager
def counting():
    """generate.decoder_pass counted: {"passes", "rows", "tokens"} of the passes run outside an engine, and
    every pass's tokens per sequence."""
    real, seen = generate.decoder_pass, {"passes": 0, "rows": 0, "tokens": 0, "runs": [], "sizes": []}

    def counted(weights, work, trace=None):
        out = real(weights, work, trace)
        seen["passes"] += 1
        seen["rows"] += sum(len(a) for _, a in work)
        seen["sizes"].append(sum(len(a) for _, a in work))
        seen["tokens"] += sum(len(t) for t in out)
        seen["runs"] += out
        return out
    generate.decoder_pass = counted
    try:
        yield seen
    finally:
        generate.decoder_pass = real


@contextmanager
def one_at_a_time():
    saved, stream.BACKLOG_DRAFT = stream.BACKLOG_DRAFT, 0
    try:
        yield
    finally:
        stream.BACKLOG_DRAFT = saved


def whole(session, audio):
    """Fed everything at once, stepped, closed -> (ids, every Emission)."""
    session.feed(audio)
    out = [session.step()]
    if EOS_ID not in session.token_ids:                            # (after EOS nothing more is decoded)
        assert session.footprint()["waiting_embeddings"] == 0      # a miss's embeddings were all fed again
    out.append(session.close())
    return session.token_ids, out


def miss_gaps(n, decoder="float", pays=lambda rate: True):
    """Passes from one drafted pass to the next when every draft misses, for the first n gaps: stream's
    DRAFT_RATE_WEIGHT rule written out (each miss moves the rate a weight's share towards 0; below
    DRAFT_RATE_MIN, or where `pays(rate)` says no draft length pays, a session drafts once DRAFT_PROBE
    passes have run without)."""
    rate, gaps = 0.5, []
    for _ in range(n):
        rate -= stream.DRAFT_RATE_WEIGHT * rate
        gaps.append(1 if rate >= stream.DRAFT_RATE_MIN[decoder] and pays(rate) else stream.DRAFT_PROBE + 1)
    return gaps


def test_misses_thin_drafting_to_probes():
    assert miss_gaps(6, "quantised") == [1, 1, 1, 1, 17, 17] and miss_gaps(4, "float") == [1, 17, 17, 17]


@pytest.mark.timed_drafts
def test_pass_times_are_averaged_by_rows():
    m = type("M", (), {"pass_seconds": {}, "pass_lock": threading.Lock()})()
    assert stream.pass_ratio(m, 4) is None                       # nothing timed: DRAFT_RATE_MIN's rule
    stream.time_pass(m, 4, 2.0)
    assert stream.pass_ratio(m, 4) == stream.pass_ratio(m, 2) == math.inf   # no 1-row pass yet: the next goes without
    stream.time_pass(m, 1, 1.0)
    assert stream.pass_ratio(m, 4) == 2.0 and stream.pass_ratio(m, 2) is None
    stream.time_pass(m, 4, 3.0)                                  # 2 + 0.25 (3 - 2)
    assert stream.pass_ratio(m, 4) == 2.0 + stream.DRAFT_RATE_WEIGHT * 1.0


@pytest.mark.timed_drafts
def test_sessions_time_their_own_decoding_passes():
    """A plain session's passes past the prompt are timed by rows (1 + its draft) into its model's
    averages, an engine's shared passes by the engine, by their rows; a model with a drafted pass timed and
    no 1-row one runs its next pass without a draft."""
    g = load_case(CASES[0])
    m = voxtral_ref.load(MODEL_DIRS["mistral"], backend=BACKEND)
    s = m.stream(int(g["delay_ms"]))
    with missing():
        whole(s, g["audio"])
    assert {1, 4} <= set(m.pass_seconds) <= {1, 2, 3, 4} and all(t > 0 for t in m.pass_seconds.values())
    m2 = voxtral_ref.load(MODEL_DIRS["mistral"], backend=BACKEND)
    e = Engine(m2)
    real_pass, timed = engine_mod.decoder_pass, []

    def slow_pass(weights, work, trace=None):            # the engine times the pass, not a step's waiting
        time.sleep(0.02)
        timed.append(sum(len(a) for _, a in work))
        return real_pass(weights, work, trace)
    engine_mod.decoder_pass = slow_pass
    try:
        with missing():
            whole(e.stream(int(g["delay_ms"])), g["audio"])
    finally:
        engine_mod.decoder_pass = real_pass
    assert {1, 4} <= set(m2.pass_seconds) <= set(timed) and all(t >= 0.02 for t in m2.pass_seconds.values())
    m3 = voxtral_ref.load(MODEL_DIRS["mistral"], backend=BACKEND)    # drafts all right: the backlog would keep
    s = m3.stream(int(g["delay_ms"]))                                # drafting, so the pass after the first
    with counting() as seen, drafting({s._dec: g["token_ids"].tolist()}):   # drafted one times a 1-row pass
        assert whole(s, g["audio"])[0] == g["token_ids"].tolist()
    assert seen["sizes"][1:3] == [4, 1] and 1 in m3.pass_seconds


@pytest.mark.timed_drafts
def test_sessions_sharing_every_pass_time_a_row_a_chunk():
    """Two engine sessions behind their audio, stepped together, so every decoding pass holds both: the
    engine times a pass by its rows a chunk, so the 1-row time pass_ratio divides by is the time of both
    sessions' undrafted pass. (By total rows no 1-row pass was ever timed, pass_ratio stayed inf, and
    the sessions stopped drafting for good: 2 live q4 sessions on 2 Zen 4 cores ran 2-row passes, 1.1 tokens
    a session each, busy 1.38x real time.) With drafts always right they keep verifying them."""
    g = load_case(CASES[0])
    ids = g["token_ids"].tolist()
    m = voxtral_ref.load(MODEL_DIRS["mistral"], backend=BACKEND)
    e = Engine(m)
    a, b = e.stream(int(g["delay_ms"])), e.stream(int(g["delay_ms"]))
    real_pass, chunks = engine_mod.decoder_pass, []

    def shared_pass(weights, work, trace=None):
        chunks.append(len(work))
        return real_pass(weights, work, trace)
    engine_mod.decoder_pass = shared_pass
    try:
        with drafting({a._dec: ids, b._dec: ids}):
            for s in (a, b):
                s.feed(g["audio"])
            e.together([a.step, b.step])
            e.together([a.close, b.close])
    finally:
        engine_mod.decoder_pass = real_pass
    assert a.token_ids == b.token_ids == ids
    assert set(chunks) == {2}                                     # every pass held both sessions
    assert 1 in m.pass_seconds and max(m.pass_seconds) <= 1 + stream.BACKLOG_DRAFT


def test_draft_length_buys_the_most_tokens_per_second():
    """(1 + a + ... + a^j) / ratio(1 + j), j = 0..k: with rows free (not timed) the whole draft; with q4's
    costs on 2 Zen 1 cores (~1 + 0.34 a row) one guess at a = 1/2, all three when nearly all are right, none
    when few are; a draft whose 1-row pass is not timed yet (inf) none."""
    free, zen1 = (lambda rows: None), (lambda rows: 1 + 0.34 * (rows - 1))
    assert stream.draft_length(0.5, free, 3) == 3 and stream.draft_length(0.0, free, 2) == 2
    assert [stream.draft_length(a, zen1, 3) for a in (0.1, 0.3, 0.5, 0.7, 0.95)] == [0, 0, 1, 2, 3]
    assert stream.draft_length(0.9, lambda rows: math.inf, 3) == 0 and stream.draft_length(0.9, zen1, 0) == 0


@pytest.mark.timed_drafts
@pytest.mark.parametrize("ratio", [1.0, 1.2, 2.0])
def test_costly_rows_thin_drafting(monkeypatch, ratio):
    """Where a drafted pass costs `ratio` times a 1-row one, a session drafts only while some draft length
    pays at its rate (stream.draft_length; never below DRAFT_RATE_MIN): with every draft missing, the drafted
    passes come as miss_gaps says (at 2.0 none pays at the starting rate of 1/2, so the first drafted pass is
    a probe, after DRAFT_PROBE passes without, the prompt's rest the first); the ids stay the golden ones."""
    costs = (lambda rows: ratio if rows > 1 else 1.0)
    monkeypatch.setattr(stream, "pass_ratio", lambda model, rows: costs(rows))
    m = model("mistral")
    decoder = "quantised" if m.decoder_quantised else "float"
    pays = (lambda rate: stream.draft_length(rate, costs, stream.BACKLOG_DRAFT) > 0)
    for case in CASES:
        g = load_case(case)
        s = m.stream(int(g["delay_ms"]))
        with counting() as seen, missing():
            ids, _ = whole(s, g["audio"])
        assert ids == g["token_ids"].tolist()
        drafted = [i for i, rows in enumerate(seen["sizes"][1:]) if rows > 1]
        first = 0 if pays(0.5) else stream.DRAFT_PROBE - 1           # the prompt's rest: the first pass without
        assert drafted[:1] == [first] or (first and not drafted)   # (a short case may end before the probe)
        assert (ratio == 2.0) == (first > 0)
        gaps = np.diff(drafted).tolist()
        assert all(g >= w for g, w in zip(gaps, miss_gaps(len(gaps), decoder, pays)))
        assert sum(g > w for g, w in zip(gaps, miss_gaps(len(gaps), decoder, pays))) <= 1


@pytest.mark.timed_drafts
def test_right_drafts_grow_to_the_length_that_pays(monkeypatch):
    """q4's costs on 2 Zen 1 cores pinned (~1 + 0.34 a row): a session whose guesses are all right starts at
    one drafted token (its rate 1/2) and, as the rate climbs, verifies all three; the ids are the golden ones."""
    monkeypatch.setattr(stream, "pass_ratio", lambda model, rows: 1 + 0.34 * (rows - 1))
    g = load_case(max(CASES, key=lambda c: len(load_case(c)["token_ids"])))
    golden = g["token_ids"].tolist()
    s = model("mistral").stream(int(g["delay_ms"]))
    with counting() as seen, drafting({s._dec: golden}):
        assert whole(s, g["audio"])[0] == golden
    rows = [r for r in seen["sizes"][1:] if r > 1]
    assert rows[0] == 2 and 3 in rows and rows[-2] == 4 and rows == sorted(rows[:-1]) + rows[-1:]


def test_drafter_guesses_runs_and_pads_after_text_unless_text_repeats():
    """generate.draft_tokens' rule on made-up ids: a run's token again (pads included); after a text token
    a pad, unless among the latest DRAFT_HISTORY ids text tokens were more often repeated than padded after;
    never past the audio's positions."""
    P, prompt = STREAMING_PAD_ID, [BOS_ID] + [STREAMING_PAD_ID] * 38

    def draft(generated, k=3, n_positions=10 ** 6):
        dec = type("Dec", (), {"prompt": prompt, "ids": prompt + generated})
        return generate.draft_tokens(dec, n_positions, k)
    assert draft([]) == [P] * 3 and draft([1500, P]) == [P] * 3
    assert draft([1500]) == [P] * 3                                    # no text seen before: a pad
    assert draft([1500, 1500, 1600]) == [1600] * 3                     # 1 repeat, no pad after text
    assert draft([1500, 1500, P, 1600]) == [P] * 3                     # 1 repeat, 1 pad: a pad
    assert draft([1500, 1500, 1500, P, 1600], k=5) == [1600] * 5       # 2 repeats, 1 pad
    assert draft([1500, 1500, 1500, P, 1600], n_positions=len(prompt) + 7) == [1600] * 2
    assert draft([1500, 1500, 1500, P, 1600], k=0) == []
    old = [1500] * 5 + [P] * generate.DRAFT_HISTORY                    # 4 repeats, 1 pad: beyond the history
    assert draft(old + [1600, 1600, 1700]) == [1700] * 3 and draft(old + [1600, P, 1700]) == [P] * 3


@contextmanager
def missing():
    """stream.draft_tokens replaced by one whose guesses are all wrong: BOS, which no position emits."""
    real = stream.draft_tokens
    stream.draft_tokens = lambda dec, n_positions, k: [BOS_ID] * len(real(dec, n_positions, k))
    try:
        yield
    finally:
        stream.draft_tokens = real


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
def test_backlogged_session_equals_golden_with_real_wrong_and_right_drafts(fmt):
    """Every golden case fed at once gives HF's ids with the real drafter (the tiny random model repeats
    tokens, so some of its guesses are right: fewer passes than tokens over the cases), with drafts that all miss (each
    drafted pass verifies 3 guesses and keeps one token; after a few the session drafts only now and then:
    miss_gaps) and with an oracle's right-3-in-4 drafts."""
    m, saved = model(fmt), 0
    for case in CASES:
        g = load_case(case)
        golden = g["token_ids"].tolist()
        s = m.stream(int(g["delay_ms"]))                     # outside the count: the first computes the prefix
        with counting() as real:
            ids, out = whole(s, g["audio"])
        assert ids == golden and all(len(e.latency_s) == len(e.token_ids) for e in out)
        assert real["passes"] <= real["tokens"] == len(ids)
        saved += real["tokens"] - real["passes"]
        s = m.stream(int(g["delay_ms"]))
        with counting() as wrong, missing():
            ids, out = whole(s, g["audio"])
        assert ids == golden and all(len(e.latency_s) == len(e.token_ids) for e in out)
        assert wrong["passes"] == wrong["tokens"] == len(ids)                # all missed ...
        after_prompt = wrong["sizes"][1:]                                    # (the first: the prompt's rest)
        drafted = [i for i, rows in enumerate(after_prompt) if rows > 1]
        gaps = np.diff(drafted).tolist()             # a pass with no backlog (the audio all decoded) pauses no draft
        assert drafted[0] == 0 and len(drafted) >= 3 and all(g >= w for g, w in zip(gaps, miss_gaps(len(gaps))))
        assert sum(g > w for g, w in zip(gaps, miss_gaps(len(gaps)))) <= 1   # step() then close(): one such pass
        assert all(after_prompt[i] == 4 for i in drafted[:-1])              # ... after verifying 3 guesses
        s = m.stream(int(g["delay_ms"]))
        with counting() as right, drafting({s._dec: golden}, wrong=set(range(2, 200, 4))):
            ids, _ = whole(s, g["audio"])
        assert ids == golden and "".join(e.text for e in out) == s.text
        assert right["passes"] < len(ids) // 2 and right["tokens"] == len(ids)
    assert saved > len(CASES)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES),
       sizes=st.one_of(st.sampled_from([[1279], [1281], [4000], [10 ** 6]]),
                       st.lists(st.integers(0, 20000), min_size=1, max_size=12).filter(any)),
       every=st.integers(1, 3), max_tokens=st.sampled_from([None, None, 1, 2, 3, 5]),
       wrong=st.sets(st.integers(0, 120), max_size=60), fmt=st.sampled_from(["mistral", "hf"]))
def test_any_chunking_and_draft_misses_equal_golden(case, sizes, every, max_tokens, wrong, fmt):
    """run_stream checks each step's len(latency_s) == len(token_ids) <= max_tokens."""
    g = load_case(case)
    s = model(fmt).stream(int(g["delay_ms"]))
    with counting() as seen, drafting({s._dec: g["token_ids"].tolist()}, wrong):
        ids, text = run_stream(s, g["audio"], sizes, every, max_tokens)
    assert ids == g["token_ids"].tolist() and text == s.text
    # a pass per token at most, besides the prompt's: its positions after the silence prefix but the last
    # may each run in a pass of their own, as their audio arrives
    assert seen["tokens"] == len(ids) and seen["passes"] <= len(ids) + len(s._dec.prompt) - generate.PREFIX - 1


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5])
def test_max_tokens_caps_the_draft(max_tokens):
    """A backlog drained max_tokens at a time by right drafts: every step gives exactly max_tokens tokens
    until the audio runs out, its pass holding at most max_tokens rows (max_tokens = 1: no draft at all)."""
    g = load_case("speech_en_long_480")
    golden = g["token_ids"].tolist()
    s = model().stream()
    s.feed(g["audio"])
    with drafting({s._dec: golden}):
        with counting() as seen:
            steps = [s.step(max_tokens).token_ids for _ in range(len(golden) // max_tokens)]
        steps.append(s.close().token_ids)
    assert sum(steps, []) == golden
    assert all(len(t) == max_tokens for t in steps[:len(steps) // 2])   # the backlog lasts past the half
    prompt_rows = len(s._dec.prompt) - generate.PREFIX                   # the first step's pass: the prompt's rest
    if max_tokens == 1:
        assert seen["rows"] - prompt_rows == seen["passes"] - 1
    else:
        assert seen["passes"] < seen["tokens"] and seen["rows"] - prompt_rows <= max_tokens * (seen["passes"] - 1)


@pytest.mark.parametrize("past_eos", [False, True])
def test_eos_and_past_eos(eos_model, past_eos):  # noqa: F811 - the fixture imported above
    """Drafts that run through EOS into the tokens after it (those one-at-a-time stepping with past_eos
    decodes): without past_eos the pass's tokens after EOS are dropped and the output ends at EOS; with it
    EOS is fed back like any token and the ids go on exactly as one at a time."""
    m, audio, offline_ids = eos_model
    with one_at_a_time():
        reference, _ = whole(m.stream(past_eos=True), audio)
    assert reference[:len(offline_ids)] == offline_ids and len(reference) > len(offline_ids) + 4
    expected = reference if past_eos else offline_ids
    for wrong in (set(), {len(offline_ids) + 1}, set(range(0, 200, 3))):
        # drafting asked for: the fixture's model runs on the NumPy backend, whose float linears sum 1 and 4
        # rows apart, so its sessions draft nothing by default (Model.rows_exact)
        s = stream.StreamSession(m, past_eos=past_eos, max_draft=stream.BACKLOG_DRAFT)
        with counting() as seen, drafting({s._dec: reference}, wrong):
            ids, _ = whole(s, audio)
        assert ids == expected
        if not wrong:                        # a pass verified EOS and the tokens after it
            assert any(EOS_ID in t[:-1] for t in seen["runs"])


def test_latencies_are_one_at_a_time_stepping_s(monkeypatch):
    """Each token's latency counts from the feed() that completed its audio (a fake clock makes them exact):
    a backlog's tokens, verified several per pass, report what one-at-a-time stepping reports. The audio
    comes in two feeds split at 4 successive tokens' ends, so one split falls inside a pass's run."""
    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now
    clock = Clock()
    monkeypatch.setattr(stream, "time", clock)
    g = load_case("speech_en_480")
    golden = g["token_ids"].tolist()

    def run(s, split):
        clock.now = 0.0
        s.feed(g["audio"][:split])
        clock.now = 10.0
        s.feed(g["audio"][split:])
        clock.now = 100.0
        e = s.step()
        clock.now = 200.0
        return e, s.close()
    for split in range(len(g["audio"]) // 2, len(g["audio"]) // 2 + 4 * SAMPLES_PER_TOKEN, SAMPLES_PER_TOKEN):
        with one_at_a_time():
            plain = run(model().stream(), split)
        s = model().stream()
        with counting() as seen, drafting({s._dec: golden}):
            spec = run(s, split)
        assert seen["passes"] < len(golden)
        for a, b in zip(plain, spec):
            assert a.token_ids == b.token_ids and a.latency_s == b.latency_s
        assert set(spec[0].latency_s) == {100.0, 90.0} and set(spec[1].latency_s) == {0.0}
        assert spec[0].token_ids + spec[1].token_ids == golden


@pytest.mark.skipif(not ckernels.available(), reason="the C kernels are not built")
@pytest.mark.parametrize("mode", [{}, {"precision": "bf16"}, {"quantize": "int8"}, {"quantize": "q4"}],
                         ids=["f32", "bf16", "int8", "q4"])
def test_logits_are_one_at_a_time_stepping_s_bit_for_bit(mode):
    """With the C kernels a row of a pass is computed as it is alone (Model.rows_exact: the int8 / q4
    linears are row-independent, the float32 / bf16 GEMV sums each of 1-4 rows in one order, and up to
    BACKLOG_DRAFT + 1 queries take the C attention's path for one query): every logit a backlogged session
    chooses from, right drafts or all missed, equals one-at-a-time stepping's."""
    m, g = model("mistral", **mode), load_case("speech_en_long_480")
    assert m.rows_exact

    def logits(drafts):
        rows, fed = [], generate.Decoder.fed

        def recorded(dec, ids, p0, out):
            tokens = fed(dec, ids, p0, out)
            if out is not None:
                rows.extend(np.array(out[:len(tokens)]))            # the rows that chose the kept tokens
            return tokens
        s = m.stream()
        generate.Decoder.fed = recorded
        try:
            with drafts(s), counting() as seen:
                whole(s, g["audio"])
        finally:
            generate.Decoder.fed = fed
        return s.token_ids, rows, seen["passes"]
    with one_at_a_time():
        ids, plain, _ = logits(lambda s: drafting({}))
    for drafts in (lambda s: drafting({}), lambda s: drafting({s._dec: ids}, wrong=set(range(0, 200, 3)))):
        got, rows, passes = logits(drafts)
        assert got == ids and len(rows) == len(plain) and all(np.array_equal(a, b) for a, b in zip(rows, plain))
    assert passes < len(ids)


@pytest.mark.parametrize("mode", [{}, {"quantize": "q4"}], ids=["f32", "q4"])
def test_engine_sessions_mixed_with_plain_ones(mode):
    """One engine of max_batch 4 rows: two sessions fed everything at once (backlogged, right drafts with
    misses), two fed a block per round (real time), stepped together by Engine.together, while a plain
    session decodes a backlog in its own passes in another thread. Each ends with the ids one-at-a-time
    stepping gives it; the backlogged ones' drafts were cut to the rows a pass had spare, and verified."""
    m = model("mistral", **mode)
    plan = [(case, load_case(case)) for case in ("speech_en_long_480", "speech_en_2400", "chirp_480",
                                                 "speech_fr_480", "speech_en_80")]
    with one_at_a_time():
        alone = [whole(m.stream(int(g["delay_ms"])), g["audio"])[0] for _, g in plan]
    if not mode:
        assert alone == [g["token_ids"].tolist() for _, g in plan]
    engine = Engine(m, max_batch=4)
    sessions = [engine.stream(int(g["delay_ms"])) for _, g in plan[:4]] + [m.stream(int(plan[4][1]["delay_ms"]))]
    fitted, real_fit = [], engine_mod._fit_drafts

    def fit(batch, max_rows):
        before = [len(j.dec.draft) for j in batch]
        real_fit(batch, max_rows)
        fitted.append((before, [len(j.dec.draft) for j in batch], sum(len(j.audio_embeds) for j in batch)))
    engine_mod._fit_drafts = fit
    plain_out = []
    try:
        with drafting({s._dec: ids for s, ids in zip(sessions, alone)}, wrong=set(range(1, 200, 5))):
            plain = threading.Thread(target=lambda: plain_out.append(whole(sessions[4], plan[4][1]["audio"])[0]))
            plain.start()
            for s, (_, g) in zip(sessions[:2], plan[:2]):
                s.feed(g["audio"])
            block, rounds = 3 * 1280, max(len(g["audio"]) for _, g in plan[2:4]) // (3 * 1280) + 2
            for r in range(rounds):
                for s, (_, g) in zip(sessions[2:4], plan[2:4]):
                    s.feed(g["audio"][r * block:(r + 1) * block])
                out = engine.together([s.step for s in sessions[:4]])
                assert all(e is None for _, e in out)
            assert all(e is None for _, e in engine.together([s.close for s in sessions[:4]]))
            plain.join(60)
    finally:
        engine_mod._fit_drafts = real_fit
    assert [s.token_ids for s in sessions[:4]] + plain_out == alone
    assert all(rows <= 4 or after == [0] * len(after) for _, after, rows in fitted)   # drafts fill spare rows only
    assert any(sum(b) > sum(a) for b, a, _ in fitted)                                 # some were cut ...
    assert any(sum(a) for _, a, _ in fitted)                                          # ... some verified
    assert engine.passes < sum(len(ids) for ids in alone[:4])                         # right drafts saved passes
