"""The token clock and segmentation (voxtral_ref/apps/subtitles.py) on hand-made id sequences, the tiny model's
real timing behaviour, and golden srt/vtt files for one tiny case."""

import json
from pathlib import Path

import numpy as np
import pytest

from voxtral_ref.config import N_LEFT_PAD_TOKENS, SAMPLES_PER_TOKEN, STREAMING_PAD_ID, STREAMING_WORD_ID, prompt_ids
from voxtral_ref.apps.oracle import capture
from voxtral_ref.apps.subtitles import (Segment, emitted_at_ms, n_decode_steps, segments, text_span_ms, to_json, to_srt,
                                   to_vtt)
from voxtral_ref.model import Transcript
from voxtral_ref.stages.tokenizer import Tekken

from conftest import MODEL_DIRS

DATA = Path(__file__).resolve().parent / "data"
PAD, WORD = STREAMING_PAD_ID, STREAMING_WORD_ID


@pytest.fixture(scope="module")
def tok():
    return Tekken(MODEL_DIRS["mistral"] / "tekken.json")


def ids(text):
    """Byte-level ids: the first 256 ranks of a Tekken vocab are the single bytes."""
    return [1000 + b for b in text.encode("utf-8")]


def seconds(n):
    return n * 16000


def test_clock_formulas():
    # token k's text is audio frame k; it is emitted once frame k + delay has been heard
    assert text_span_ms(0) == (0, 80) and text_span_ms(12) == (960, 1040)
    assert emitted_at_ms(0, 6) == 560 and emitted_at_ms(10, 1) == 960
    # 2 s at 480 ms: 94720 padded samples = 74 audio tokens, 39 of them prompt -> 35 generated (golden chirp case)
    assert n_decode_steps(32000, 6) == 35


@pytest.mark.parametrize("delay_ms", [80, 480])
def test_token_k_has_heard_exactly_the_audio_the_clock_says(tiny_mistral, delay_ms):
    """Change the audio from the first sample token j may not see: the logits of tokens 0..j stay
    bit-identical and those of token j + 1 change, so emitted_at_ms is exact (not 80 ms early or late)."""
    d = delay_ms // 80
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(seconds(2))).astype(np.float32)
    _, base, _ = capture(tiny_mistral, audio, delay_ms=delay_ms)
    p = len(prompt_ids(d))
    for j in (0, 5):
        horizon = emitted_at_ms(j, d) * 16 + 40              # + the STFT window's 2.5 ms look-ahead
        changed = audio.copy()
        changed[horizon:] += 0.2
        _, other, _ = capture(tiny_mistral, changed, delay_ms=delay_ms)
        rows = slice(p - 1, p + j)                           # the positions whose logits give tokens 0..j
        np.testing.assert_array_equal(base["logits"][rows], other["logits"][rows])
        assert not np.allclose(base["logits"][p + j], other["logits"][p + j])
    assert N_LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN == 40960     # the derivation's left pad


def test_sentence_pause_and_word_splits(tok):
    seq = (ids("Hello there.") + [PAD] * 3 + ids(" How are") + [WORD] + ids(" you?") + [PAD] * 10
           + ids("Fine") + [PAD, PAD] + ids(" thanks") + ids(" 3.5 times!"))
    segs = segments(seq, tok, seconds(10))
    assert [s.text for s in segs] == ["Hello there.", "How are you?", "Fine thanks 3.5 times!"]
    k_how = len(ids("Hello there.")) + 3                     # " How" starts right after the pause
    assert segs[1].start_ms == text_span_ms(k_how)[0]
    assert segs[0].end_ms == text_span_ms(len(ids("Hello there.")) - 1)[1]
    assert [i for s in segs for i in s.tokens] == [i for i in seq if i >= 1000]


def test_a_short_pause_does_not_split(tok):
    seq = ids("one") + [PAD] * 9 + ids(" two")               # 720 ms < PAUSE_MS
    assert [s.text for s in segments(seq, tok, seconds(5))] == ["one two"]
    assert [s.text for s in segments(seq, tok, seconds(5), pause_ms=400)] == ["one", "two"]


def test_long_segments_split_at_a_word(tok):
    seq = ids(" ".join(["word"] * 40))                      # 199 characters, one token per 80 ms
    segs = segments(seq, tok, seconds(30), max_seconds=100)
    assert len(segs) == 3 and all(len(s.text) <= 84 + len(" word") for s in segs)
    assert " ".join(s.text for s in segs) == " ".join(["word"] * 40)
    by_time = segments(seq, tok, seconds(30), max_seconds=2.0)
    assert all(s.end_ms - s.start_ms <= 2000 + 5 * 80 for s in by_time) and len(by_time) >= 7


def test_scripts_without_spaces(tok):
    seq = ids("你好。") + ids("再见。")
    assert [s.text for s in segments(seq, tok, seconds(5))] == ["你好。", "再见。"]
    long = ids("字" * 100)
    assert max(len(s.text) for s in segments(long, tok, seconds(30), max_seconds=100)) <= 85


def test_a_character_split_over_tokens_stays_whole(tok):
    seq = ids("a") + [PAD] + ids("é")[:1] + [PAD] * 12 + ids("é")[1:] + ids(" b")
    segs = segments(seq, tok, seconds(5))
    assert [s.text for s in segs] == ["a", "é b"]            # the pause inside the character splits
    assert segs[1].start_ms == text_span_ms(2)[0]            # é starts at its first byte's token


def test_times_are_clamped_into_the_audio(tok):
    seq = [PAD] * 20 + ids("late words")
    segs = segments(seq, tok, seconds(1))                   # text tokens from 1.6 s on, audio of 1 s
    assert len(segs) == 1 and (segs[0].start_ms, segs[0].end_ms) == (920, 1000)
    assert segments([PAD, WORD, 2], tok, seconds(1)) == []
    assert segments(ids("  \n "), tok, seconds(1)) == []
    assert segments(ids("x"), tok, 100) == [Segment(0, 6, "x", tuple(ids("x")))]   # 100 samples = 6.25 ms


def test_renderings():
    segs = [Segment(0, 1500, "Hi <b> & you", (1, 2)), Segment(3_723_040, 3_723_999, "Later.", (3,))]
    assert to_srt(segs) == ("1\n00:00:00,000 --> 00:00:01,500\nHi <b> & you\n\n"
                            "2\n01:02:03,040 --> 01:02:03,999\nLater.\n\n")
    assert to_vtt(segs) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHi &lt;b&gt; &amp; you\n\n"
                            "01:02:03.040 --> 01:02:03.999\nLater.\n\n")
    j = to_json(Transcript(" Hi you Later.", [5, 1, 2, 3], 480, 16000), segs)
    assert j == {"text": "Hi you Later.", "token_ids": [5, 1, 2, 3], "delay_ms": 480,
                 "segments": [{"id": 0, "start": 0.0, "end": 1.5, "text": "Hi <b> & you", "tokens": [1, 2]},
                              {"id": 1, "start": 3723.04, "end": 3723.999, "text": "Later.", "tokens": [3]}]}


def test_golden_srt_and_vtt(tok):
    """Generated ids of the golden case speech_en_long_480 (HF oracle, tiny model; copied into
    tests/data so this test does not move when golden/ is regenerated) -> the checked-by-eye files."""
    case = json.loads((DATA / "tiny_speech_en_long.json").read_text())
    segs = segments(case["token_ids"], tok, case["n_samples"])
    assert to_srt(segs) == (DATA / "tiny_speech_en_long.srt").read_text(encoding="utf-8")
    assert to_vtt(segs) == (DATA / "tiny_speech_en_long.vtt").read_text(encoding="utf-8")
