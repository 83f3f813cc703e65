"""Timestamps from the token clock, segments, and the txt / json / srt / vtt renderings.

The decoder takes one step per 80 ms of audio, so the index of a generated token is a time.

    padded audio   32 tokens of silence (40960 samples) | the real audio | right pad
    audio token p  padded samples [1280 p, 1280 (p + 1)) (+ 40 samples of STFT look-ahead)
    position p     decoder input = embed(id p) + audio token p; causal, so it has heard tokens 0..p
    prompt         P = 1 + 32 + d ids (d = delay_ms / 80), positions 0..P-1
    token k        (0-based, after the prompt) comes out of position P - 1 + k: the prompt's last
                   position predicts token 0, and each generated id is fed back one position later

So token k is emitted once the real audio up to

    t_emit(k) = (P - 1 + k + 1 - 32) * 80 ms = (k + 1 + d) * 80 ms

has been heard, and the model was trained to write text d tokens (delay_ms) behind the audio, so the
text token k carries belongs to real-audio token k:

    t_text(k) = t_emit(k) - delay_ms = [80 k, 80 (k + 1)) ms        (the delay cancels out)

A segment runs from the start of its first text token's frame to the end of its last one's, clamped into
the audio: start into [0, duration - 80 ms], end into [start, duration].

Accuracy: 80 ms granularity, plus the model's own alignment jitter. A word's tokens come about when the
word has been heard (others measured ~ +-0.1 s), so a cue tends to start up to one word late and end on
time. Only segment times are meaningful, not word times ([STREAMING_WORD] is not emitted for every word).

Segments end at pauses (runs of [STREAMING_PAD] of PAUSE_MS or more), after a sentence end (. ? ! …)
and, at the next word, once they pass MAX_CHARS characters or MAX_SECONDS seconds.
"""

from dataclasses import dataclass
from typing import NamedTuple

from ..config import MS_PER_TOKEN, SAMPLE_RATE, STREAMING_PAD_ID
from ..config import n_positions, prompt_ids

PAUSE_MS = 800                   # silence this long ends a cue: longer than the gaps between words
MAX_CHARS = 84                   # two subtitle lines of 42 characters
MAX_SECONDS = 7.0                # the usual longest time a subtitle stays on screen
SENTENCE_ENDS = (".", "?", "!", "…")
CJK_SENTENCE_ENDS = ("。", "？", "！")  # full-width: no space follows them


@dataclass(frozen=True)
class Segment:
    start_ms: int
    end_ms: int
    text: str
    tokens: tuple                # the text token ids of the segment


def text_span_ms(k):
    """[start, end) in ms of the real audio that generated token k's text belongs to."""
    return k * MS_PER_TOKEN, (k + 1) * MS_PER_TOKEN


def emitted_at_ms(k, n_delay):
    """How much real audio the model has heard when it emits generated token k."""
    return (k + 1 + n_delay) * MS_PER_TOKEN


def n_decode_steps(n_samples, n_delay):
    """How many tokens greedy decoding produces at most for n_samples of 16 kHz audio (one per audio
    token after the prompt): the total of a progress bar."""
    return max(1, n_positions(n_samples, n_delay) - len(prompt_ids(n_delay)))


def duration_ms(n_samples):
    return n_samples * 1000 // SAMPLE_RATE


class _Piece(NamedTuple):
    k0: int                      # first generated token of the piece
    k: int                       # the token that completes it
    text: str
    ids: tuple
    pause: int                   # longest run of [STREAMING_PAD] (tokens) since the previous piece


def _pieces(token_ids, tokenizer):
    """[_Piece]: the text each generated token completes. A character split over several tokens goes to
    the token that completes it, with all their ids, so a segment never cuts a character."""
    dec, pending, out = tokenizer.incremental(), [], []
    run = longest = 0
    for k, i in enumerate(token_ids):
        run = run + 1 if i == STREAMING_PAD_ID else 0
        longest = max(longest, run)
        if i < tokenizer.n_special:
            continue
        pending.append((k, i))
        text = dec.feed([i])
        if text:
            out.append(_Piece(pending[0][0], k, text, tuple(i for _, i in pending), longest))
            pending, run, longest = [], 0, 0
    return out


def _breaks(text, piece, start_ms, pause_tokens, max_chars, max_seconds):
    """Does `piece` start a new segment after the segment text `text`?"""
    # Scripts written without spaces (no whitespace so far) may break at any token.
    new_word = piece.text[:1].isspace() or not any(c.isspace() for c in text.strip())
    tail = text.rstrip()
    sentence_end = tail.endswith(CJK_SENTENCE_ENDS) or (tail.endswith(SENTENCE_ENDS) and new_word)
    too_long = len(text.strip()) >= max_chars or text_span_ms(piece.k)[1] - start_ms > max_seconds * 1000
    return piece.pause >= pause_tokens or sentence_end or (too_long and new_word)


def segments(token_ids, tokenizer, n_samples, pause_ms=PAUSE_MS, max_chars=MAX_CHARS, max_seconds=MAX_SECONDS):
    """Generated ids -> [Segment], times from the token clock (module docstring), inside the audio."""
    pause_tokens = max(1, pause_ms // MS_PER_TOKEN)
    groups = []
    for piece in _pieces(token_ids, tokenizer):
        g = groups[-1] if groups else None
        if g and not _breaks("".join(p.text for p in g), piece, text_span_ms(g[0].k0)[0],
                             pause_tokens, max_chars, max_seconds):
            g.append(piece)
        else:
            groups.append([piece])
    total = duration_ms(n_samples)
    out = []
    for g in groups:
        text = " ".join("".join(p.text for p in g).split())    # one line: a blank line would end an srt cue
        if not text:
            continue
        start = min(text_span_ms(g[0].k0)[0], max(total - MS_PER_TOKEN, 0))
        end = max(min(text_span_ms(g[-1].k)[1], total), start)
        out.append(Segment(start, end, text, tuple(i for p in g for i in p.ids)))
    return out


def _clock(ms, sep):
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(segs):
    return "".join(f"{n}\n{_clock(s.start_ms, ',')} --> {_clock(s.end_ms, ',')}\n{s.text}\n\n"
                   for n, s in enumerate(segs, 1))


def to_vtt(segs):
    # WebVTT cue text is HTML-like: & and < start entities and tags.
    esc = [s.text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for s in segs]
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start_ms, '.')} --> {_clock(s.end_ms, '.')}\n{t}\n\n"
                                  for s, t in zip(segs, esc))


def to_json(transcript, segs):
    """Whisper's familiar shape (text, segments with id/start/end/text/tokens), plus every generated id
    and the delay, so a reader can redo the token clock."""
    return {
        "text": transcript.text.strip(),
        "segments": [{"id": n, "start": s.start_ms / 1000, "end": s.end_ms / 1000, "text": s.text,
                      "tokens": list(s.tokens)} for n, s in enumerate(segs)],
        "token_ids": list(transcript.token_ids),
        "delay_ms": transcript.delay_ms,
    }
