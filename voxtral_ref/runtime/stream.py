"""Live transcription: feed audio as it arrives and get each token as soon as the audio allows, with exactly
the token ids of the offline `Model.transcribe` for any way the audio is cut into chunks.

The offline pipeline, cut in time. Offline pads 32 tokens of silence on the left and (at the end) aligns to
1280 samples and adds delay + 11 tokens of silence on the right, then computes every stage over the whole
padded signal. Every stage is causal, so a session runs the same functions token by token:
  mel      frame k covers padded samples [160k - 200, 160k + 200); the borders are zeros, so HF's reflect
           padding equals zero extension and `mel.log_mel_frames` works on a buffer that starts 200
           samples before the first frame it computes. Mel is computed in whole tokens (8 frames), which
           keeps conv2's stride-2 parity and the 4-frame adapter groups aligned with offline.
  conv     `encoder.conv_stem` with `history`: the last 2 mel frames (conv1) and the last conv1 frame
           (conv2) of the previous tokens instead of the zeros offline puts before frame 0.
  encoder  `encoder.encoder_transformer` with one `KVCache` per layer; RoPE positions are absolute. A
           session of a batching engine hands this chunk (and the adapter's) to the engine, which runs
           the chunks of the sessions stepping at the same time as one stacked pass (`encoder_pass`).
  decoder  `generate.Decoder`: its first step takes the prompt's len(prompt) audio embeddings at once,
           then one per 80 ms token. A session behind the audio (fed faster than real time, or at close,
           the right pad) has the embeddings of several positions ready: then each pass also verifies up
           to BACKLOG_DRAFT drafted tokens (generate.draft_tokens, as greedy_decode's speculate=k), keeps
           the tokens one-at-a-time stepping would choose and queues a rejected draft's embeddings again;
           by default only where a pass computes each row as alone (Model.rows_exact), so the ids are
           one-at-a-time stepping's exactly. transcribe() runs a file through such a session.
Audio embedding e needs mel frames <= 8e + 7, i.e. padded samples < 1280 (e + 1) + 40 (40 samples =
2.5 ms look-ahead). Generated token k is predicted at position len(prompt) - 1 + k, so it is emitted as
soon as the stream holds 1280 (delay + 1 + k) + 40 samples of real audio (9000 for the first token at
480 ms, HF's first streaming chunk), plus the compute. `close()` appends offline's right pad and decodes
to the end exactly as offline does: up to the last position offline runs, or to EOS.

End of speech (EOS). Offline decoding stops at EOS; a closed stream must give the same ids, so by default
a session keeps EOS as its last id and emits nothing more, but stays open: feed() still accepts audio
(and drops it) and close() still ends it normally, so a live source is never cut off with an error.
Mistral's guidance for realtime use is that EOS must not end a stream; `past_eos=True` follows it and
keeps decoding after EOS (EOS is fed back like any other token). Its ids then equal offline's only up to
and including the first EOS.

Memory is O(1) in the stream's length: the audio buffer holds at most the samples the next frames need
plus what was fed and not yet processed; encoder and decoder KV caches are rings of (window + chunk - 1)
slots or a little more (KVCache); at most one batch of audio embeddings (plus a draft's) waits for the decoder. Only the output (ids,
text) grows.

Input at other sample rates goes through soxr's stream resampler at the quality `Model.transcribe` uses;
for soxr 1.1.0 its output for any chunking is identical, sample for sample, to the one-shot
`soxr.resample` of the whole file (tests/test_stream.py checks this through the token ids).
"""

import collections
import contextlib
import contextvars
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import kernels
from ..stages.adapter import adapter, downsample
from ..stages.attention import KVCache
from ..stages.audio import MAX_CHANNELS, RESAMPLE_QUALITY, check_sample_rate, to_mono_float32
from ..config import (EOS_ID, HOP, MEL_FRAMES_PER_TOKEN, MS_PER_TOKEN, N_FFT, N_LEFT_PAD_TOKENS, SAMPLE_RATE, SAMPLES_PER_TOKEN,
                     delay_tokens, is_whole, n_positions, right_pad_samples)
from ..stages.decoder import lm_head
from ..stages.encoder import conv_stem, encoder_transformer
from ..errors import VoxtralError
from ..stages.generate import BATCHED, PREFIX, Decoder, draft_tokens
from ..stages.mel import log_mel_frames

HALF_WINDOW = N_FFT // 2                  # 200: a mel frame reaches this far either side of its centre
LOOK_AHEAD = HALF_WINDOW - HOP            # 40 samples (2.5 ms) past a token's 1280 for its last frame
# A file's session (transcribe()) encodes up to this many tokens per encoder call: 1000 frames, wide enough
# for the GEMMs' efficiency (39 tokens per call cost 15-20 % more than one whole-file pass, measured)
FILE_ENCODE_TOKENS = 250
# A session behind the audio (a backlog of positions whose embeddings are ready: a file's in transcribe(), a
# live stream fed faster than real time or at close) verifies up to this many drafted tokens per decoder pass
# (generate.draft_tokens) by default. 3: a 4-row pass costs about what a 1-row one does
# on the full-size model (README, Batching: q4 0.99-1.06x, int8 1.02-1.06x), so all-missed drafts cost
# little (bench/backlog_bench.py: 7 cost 1.3x) and right ones drain a backlog up to 3.7x faster; and 4
# queries x 4 heads per kv head still take the C attention's path for one query (csrc/attention.c: up to
# 16 rows on AVX-512), so with the C kernels a pass's rows are bit-identical to one-at-a-time stepping's
# (Model.rows_exact; elsewhere a session drafts only when asked).
BACKLOG_DRAFT = 3
# An encoder running ahead of its decoder (EncoderAhead) starts no chunk while this many of its embeddings wait
AHEAD_TOKENS = FILE_ENCODE_TOKENS
# Drafts cost their rows whether right or wrong (a 4-row pass 1.06-1.17x a 1-row one with q4 / int8 weights,
# ~1.45x with bf16 ones, more in a pass shared with other sessions' rows: 2 live sessions whose drafts all
# missed ran 8-row passes for 2 tokens), so a session drafts while its guesses pay: it keeps the share of
# its drafted passes that kept a draft, as an exponential average (weight DRAFT_RATE_WEIGHT, from 1/2), and
# below the share that pays for the extra rows it drafts only on every DRAFT_PROBE-th backlog pass, to
# notice when its guesses fit again. A pass that keeps a draft keeps 1.5-2 of them on the golden cases, so
# the share that pays is ~0.1 with a quantised decoder and ~0.3 with a float one; a little above:
# DRAFT_RATE_MIN. With every guess wrong that is 4 (quantised) or 2 drafted passes, then 1 in 17 (~1-3 %
# more rows than none). A back-off by streaks of misses (2^n passes without drafts, up to 32) lost most of
# the drafts' gain on the golden cases' ids, on the misses at a stream's start.
DRAFT_RATE_WEIGHT, DRAFT_PROBE = 0.25, 16
DRAFT_RATE_MIN = {"quantised": 0.15, "float": 0.3}        # by Model.decoder_quantised
# DRAFT_RATE_MIN holds where the extra rows cost little, as where reading the weights bounds a pass. Where
# the arithmetic bounds it they cost more (q4 on 2 Zen 1 cores at 2.0 GHz, AVX2: a 2-row pass 1.25x a 1-row
# one, 4 rows 2.01x; int8 1.17x, 1.72x: bench/batch_bench.py), so a session keeps of its draft the k tokens
# that buy the most tokens per second (draft_length), none if no k pays: with each guess right at the share
# of drafted passes that kept a draft, a pass of k drafts yields (1 - a^(k+1)) / (1 - a) tokens on average,
# against its measured time over a 1-row pass's (time_pass, pass_ratio).


def time_pass(model, rows, seconds):
    """Add a decoding pass of `rows` rows (a plain session's 1 + its draft, or an engine's shared pass, timed
    there: a session's step in an engine also waits for the others') to the model's averages (weight
    DRAFT_RATE_WEIGHT)."""
    with model.pass_lock:
        old = model.pass_seconds.get(rows)
        model.pass_seconds[rows] = seconds if old is None else old + DRAFT_RATE_WEIGHT * (seconds - old)


def draft_length(a, ratio, k):
    """Of k drafted tokens, each right with probability a (the first guess's rate), the number to verify
    that maximises tokens per unit of time, (1 + a + ... + a^j) / ratio(1 + j) for j = 0..k, a tie going
    to the longer; ratio(rows) None (not timed) counts as 1, as where rows cost nothing."""
    best, best_j, tokens = 1.0, 0, 1.0
    for j in range(1, k + 1):
        tokens += a ** j
        r = ratio(1 + j)
        value = tokens / (1.0 if r is None else r)
        if value >= best:
            best, best_j = value, j
    return best_j


def pass_ratio(model, rows):
    """The time of a `rows`-row decoding pass over a 1-row one's on this model; None while no pass of that
    many rows was timed; inf while passes were timed but no 1-row one (a backlog whose drafts keep paying
    would never run one: the session's next pass then goes without its draft, and times one)."""
    seconds = model.pass_seconds
    if 1 not in seconds:
        return math.inf if seconds else None
    return seconds[rows] / seconds[1] if rows in seconds else None


# The batching engine (runtime/engine.py) runs the encoder chunks of the sessions it steps together with
# other sessions' chunks: while it steps one, this holds its run(frames, pos, caches) -> audio embeddings
# (the encoder's twin of generate.BATCHED).
ENCODER_BATCHED = contextvars.ContextVar("voxtral_ref_batched_encoder_pass", default=None)


@dataclass
class Emission:
    """What one step() or close() produced."""
    token_ids: list = field(default_factory=list)   # generated ids, specials included (as Transcript)
    text: str = ""                                  # the text delta; all deltas joined = the transcript
    # per token: seconds from the feed() (or, for the right pad, the close()) that completed its audio
    latency_s: list = field(default_factory=list)


class StreamSession:
    """One live stream. feed() queues audio (cheap, thread-safe); step() does the work the audio allows;
    close() ends the audio. Make one with `Model.stream()`."""

    def __init__(self, model, delay_ms=None, sample_rate=SAMPLE_RATE, past_eos=False, reuse_prefix=True,
                 max_positions=None, max_draft=None, encode_ahead=False):
        """max_positions: the stream's length in decoder positions when known in advance (transcribe()
        of a file): its caches then hold no more slots than it will use, instead of full windows.
        max_draft: drafted tokens a backlogged pass verifies, at most (transcribe()'s speculate; None:
        BACKLOG_DRAFT where a pass computes each row as alone, Model.rows_exact, else none).
        encode_ahead: the encoder runs on a thread of its own, ahead of the decoder, as far as the audio fed
        allows (EncoderAhead; transcribe()'s where it pays, `encodes_ahead`)."""
        check_sample_rate(sample_rate)
        if not isinstance(past_eos, bool):                     # "no" would be true
            raise VoxtralError(f"past_eos must be True or False, got {past_eos!r}")
        self.delay_ms = model.cfg.default_delay_ms if delay_ms is None else delay_ms
        self.n_delay = delay_tokens(self.delay_ms)
        self.sample_rate, self.past_eos = sample_rate, past_eos
        self.text = ""
        self._model = model
        enc = model.cfg.encoder
        with model.kernel_mode():                              # caches in the model's KV dtype
            # max_positions None (live): rings of window + prompt - 1 positions
            self._dec = Decoder(model.weights, self.n_delay, max_positions)
            # tokens encoded at once, at most: the prompt's live (each step's latency); a file's (transcribe():
            # max_positions known) more, for wide encoder GEMMs
            self._batch = len(self._dec.prompt) if max_positions is None else max(len(self._dec.prompt), FILE_ENCODE_TOKENS)
            ds = model.cfg.downsample
            self._enc_caches = [KVCache(enc.sliding_window, ds * self._batch, enc.n_heads, enc.head_dim,
                                        max_positions and ds * max_positions) for _ in range(enc.n_layers)]
        self._history = None                                   # conv stem's left context; None: zeros, as offline
        # Padded-stream samples [_buf_start, _buf_start + len(_buf)): to start, the 200 zeros frame 0 reaches
        # before sample 0 and the 32 tokens of left pad.
        self._buf_start = -HALF_WINDOW
        self._buf = np.zeros(HALF_WINDOW + N_LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN, np.float32)
        self._embeds = np.zeros((0, model.cfg.decoder.dim), np.float32)  # computed, not yet fed [m, dim]
        self._max_draft = (BACKLOG_DRAFT if model.rows_exact else 0) if max_draft is None else max_draft
        self._draft_rate, self._undrafted = 0.5, 0      # drafted passes that kept a draft; passes since one
        self._draft_rate_min = DRAFT_RATE_MIN["quantised" if model.decoder_quantised else "float"]
        self._n_embeds = 0                                     # audio embeddings computed so far
        self._arrivals = collections.deque()                   # (padded end, feed time) of chunks in use
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            import soxr
            self._resampler = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32",
                                                  quality=RESAMPLE_QUALITY)
        self._n_samples = 0                                    # 16 kHz samples received
        self.encode_s = 0.0                                    # seconds spent encoding audio (for timings)
        self.wait_s = 0.0                                      # ... of them, or waiting for them, in step() and close()
        # guards the audio buffer, which an EncoderAhead's thread trims while step() appends to it
        self._audio = threading.Condition()
        if reuse_prefix:                                       # False: compute the silence prefix (as a check)
            self._restore(session_prefix(model, self.n_delay))
        self._n_positions = None                               # offline's audio tokens, known at close()
        self._utf8 = model.tokenizer.incremental()
        self._lock = threading.Lock()                          # guards _pending, _closed and _ended
        self._work = threading.Lock()                          # one step() or close() computes at a time
        self._pending, self._closed, self._done = [], False, False
        self._ended = False                                    # no more audio: closed, or _end_audio
        self._ahead = EncoderAhead(self) if encode_ahead else None

    # --- public API ---------------------------------------------------------------------------------------
    @property
    def token_ids(self):
        """Generated ids so far (after the prompt, specials and EOS kept, as `Transcript.token_ids`)."""
        return self._dec.ids[len(self._dec.prompt):]

    @property
    def done(self):
        """True once close() has decoded everything."""
        return self._done

    def feed(self, samples):
        """Queue audio at the session's sample rate: [N] or [N, channels], float or int PCM, any N >= 0."""
        a = to_mono_float32(samples).copy()                    # own it: callers (sounddevice) reuse buffers
        with self._lock:
            if self._ended:
                raise VoxtralError("feed() after close(): this stream has ended; start a new one with Model.stream()")
            if a.size:
                self._pending.append((a, time.perf_counter()))

    def step(self, max_tokens=None):
        """Decode what the audio fed so far allows (at most `max_tokens` tokens) -> Emission."""
        if max_tokens is not None and (not is_whole(max_tokens) or max_tokens < 0):
            raise VoxtralError(f"max_tokens must be None or an integer >= 0, got {max_tokens!r}")
        max_tokens = None if max_tokens is None else int(max_tokens)
        with self._work:
            with self._lock:
                if self._closed:
                    raise VoxtralError("step() after close(): this stream has ended; its result is in .text "
                                       "and .token_ids")
            return self._advance(max_tokens, closing=False)

    def close(self):
        """End of audio: pad on the right as offline does and decode to the end -> the final Emission.
        Closing again returns an empty Emission."""
        with self._work:
            with self._lock:
                if self._closed:
                    return Emission()
                self._closed = self._ended = True
            try:
                return self._advance(None, closing=True)
            finally:
                self.stop_encoding()

    def _end_audio(self):
        """No more audio will come (transcribe(), once it has fed the whole file): pad the end now, as close()
        does, so that an encoder running ahead encodes the pad while the decoder still works; step() then
        decodes to the end, and close() adds nothing."""
        with self._work:
            with self._lock:
                pending, self._pending, self._ended = self._pending, [], True
            self._take_audio(pending, closing=True)

    def stop_encoding(self):
        """Stop an encoder running ahead (close() does; so must whoever abandons such a session), once the
        chunk it is encoding is done."""
        if self._ahead is not None:
            self._ahead.stop()

    @property
    def encodes_ahead(self):
        return self._ahead is not None

    def samples_unencoded(self):
        """Audio fed and not yet encoded, in samples at the session's rate (transcribe() feeds an encoder
        running ahead by it)."""
        with self._lock:
            pending = sum(len(a) for a, _ in self._pending)
        with self._audio:
            return pending + len(self._buf)

    def footprint(self):
        """Sizes of the compute state, which stay flat however long the stream runs."""
        return {"audio_buffer": len(self._buf), "waiting_embeddings": len(self._embeds),
                "arrivals": len(self._arrivals),
                "encoder_kv_slots": sum(c.k.shape[0] for c in self._enc_caches),
                "decoder_kv_slots": sum(c.k.shape[0] for c in self._dec.caches)}

    # --- the work -----------------------------------------------------------------------------------------
    def _advance(self, max_tokens, closing):
        with self._lock:
            pending, self._pending = self._pending, []
        ids, latency = [], []
        dec = self._dec
        with self._model.kernel_mode(), self._ahead.share.side(0) if self._ahead else contextlib.nullcontext():
            self._take_audio(pending, closing)
            while not self._stopped() and (max_tokens is None or len(ids) < max_tokens):
                # past the prompt, a backlog's positions verify drafts (none while the oracle traces each
                # position once: apps/oracle/capture.py)
                if len(dec.ids) >= len(dec.prompt) and dec.trace is None:
                    k = self._max_draft if max_tokens is None else min(self._max_draft, max_tokens - len(ids) - 1)
                    dec.draft = draft_tokens(dec, len(dec.ids) - 1 + self._ready(), k)
                    if self._undrafted < DRAFT_PROBE:       # (a probe verifies the whole draft)
                        keep = 0 if self._draft_rate < self._draft_rate_min else draft_length(
                            self._draft_rate, lambda rows: pass_ratio(self._model, rows), len(dec.draft))
                        dec.draft = dec.draft[:keep]
                dec.horizon = len(dec.ids) + self._ready()       # the prompt's positions as their audio arrives
                _, p0 = dec.chunk()
                # (once it has tokens to return, a step does not wait for an encoder running ahead: on_token
                # then hears of them as they come)
                embeds = self._next_embeds(wait=closing or not ids)   # [PREFIX, the prompt's rest, or 1 + k, dim]
                if embeds is None:
                    break
                t0 = time.perf_counter()
                with self._ahead.share.working(0) if self._ahead else contextlib.nullcontext():
                    tokens = dec.run_chunk(embeds)              # none for the silence prefix
                if p0 >= len(dec.prompt) and BATCHED.get() is None:   # a decoding pass of its own (engine.py times shared ones)
                    time_pass(self._model, len(embeds), time.perf_counter() - t0)
                self._count_drafts(dec.verified, len(tokens))
                # the embeddings of the positions kept leave the queue; a rejected draft's are fed again
                self._embeds = self._embeds[dec.chunk()[1] - p0:]
                for n in range(len(dec.ids) - len(tokens) + 1, len(dec.ids) + 1):
                    ids.append(dec.ids[n - 1])
                    latency.append(self._latency(n))
                    if self._stops_at(n):       # one-at-a-time stepping stops here: decoding ends, so the
                        del dec.ids[n:]         # verified tokens after it go without rewinding the caches
                        break
        with self._audio:
            if self._buf.base is not None:                 # trimmed views would pin a large fed chunk
                self._buf = self._buf.copy()
        text = self._utf8.feed(ids) + (self._utf8.flush() if closing else "")
        self.text += text
        self._done = closing
        return Emission(ids, text, latency)

    def _count_drafts(self, verified, n_tokens):
        """DRAFT_RATE_WEIGHT's rule, after a pass that verified `verified` drafts and kept n_tokens tokens."""
        if verified:
            self._draft_rate += DRAFT_RATE_WEIGHT * ((n_tokens > 1) - self._draft_rate)
            self._undrafted = 0
        else:
            self._undrafted += 1

    def _stopped(self):
        """Whether decoding has ended (offline's rule, `_stops_at`, on the ids so far)."""
        return self._stops_at(len(self._dec.ids))

    def _stops_at(self, n):
        """Whether decoding stops once the ids are the first n: offline's rule, after EOS (unless past_eos),
        or once the last position before the padded end has run."""
        ids, p = self._dec.ids, len(self._dec.prompt)
        if n > p and ids[n - 1] == EOS_ID and not self.past_eos:
            return True
        return self._n_positions is not None and n >= self._n_positions

    def _take_audio(self, pending, closing):
        """Append queued chunks (resampled to 16 kHz) to the buffer; at close, offline's right pad."""
        if self._stopped():                                 # after EOS nothing is decoded: drop the audio
            with self._audio:
                self._buf, self._arrivals = self._buf[:0], collections.deque()
                if self._ahead:
                    self._ahead.bounds.clear()
            return
        chunks = [(self._resampler.resample_chunk(a) if self._resampler else a, t) for a, t in pending]
        closing = closing and self._n_positions is None       # (padded once: _end_audio, then close())
        if closing:
            now = time.perf_counter()
            if self._resampler:
                chunks.append((self._resampler.resample_chunk(np.zeros(0, np.float32), last=True), now))
        self._n_samples += sum(len(a) for a, _ in chunks)
        if closing:
            chunks.append((np.zeros(right_pad_samples(self._n_samples, self.n_delay), np.float32), now))
            # offline's decoding ends with the padded audio; with no audio at all there is nothing to decode
            self._n_positions = n_positions(self._n_samples, self.n_delay) if self._n_samples else 0
        with self._audio:
            end = self._buf_start + len(self._buf)
            pieces = [self._buf]
            for a, t in chunks:
                if len(a):
                    end += len(a)
                    pieces.append(a)
                    self._arrivals.append((end, t))
                    if self._ahead:                     # its chunks end where encoding on demand ends them
                        self._ahead.bounds.append((end - LOOK_AHEAD) // SAMPLES_PER_TOKEN)
            if len(pieces) > 1:
                self._buf = np.concatenate(pieces)                            # [buffered samples]
                if self._ahead:
                    self._ahead._kick()

    def _next_embeds(self, wait=True):
        """The audio embeddings of the decoder's next chunk (Decoder.chunk: the silence prefix, the prompt's
        rest, then the last id and its draft), or None if the audio is not there yet. They stay queued: the
        pass's caller drops those of the positions it keeps."""
        need = len(self._dec.chunk()[0])
        while len(self._embeds) < need:
            t0 = time.perf_counter()
            if self._ahead:
                got = self._ahead.take(wait)
            else:
                n = self._chunk_length(self._encodable())
                got = self._encode(n) if n > 0 else None
            self.wait_s += time.perf_counter() - t0
            if got is None:
                return None
            self._embeds = np.concatenate([self._embeds, got])                # [m + n, dim]
        return self._embeds[:need]

    def _chunk_length(self, encodable):
        """The next encoder chunk's tokens, of `encodable` ready to encode: the silence prefix on its own, as
        session_prefix encodes it whatever audio is there, then up to the session's batch."""
        return min(encodable, self._batch if self._n_embeds else PREFIX)

    def _encodable(self):
        """How many more audio embeddings the buffered audio allows."""
        with self._audio:
            return (self._buf_start + len(self._buf) - LOOK_AHEAD) // SAMPLES_PER_TOKEN - self._n_embeds

    def _ready(self):
        """Decoder positions whose audio embeddings are queued or can be computed now: the backlog."""
        return len(self._embeds) + (self._ahead.backlog() if self._ahead else self._encodable())

    def _encode(self, n):
        """The next n audio embeddings from the buffer, which starts 200 samples before their first frame.
        Mel and conv stem here (cheap, and they carry this session's history); the encoder and the adapter
        in a pass of their own, or in the engine's shared pass when an engine steps this session."""
        t0 = time.perf_counter()
        w, ds = self._model.weights, self._model.cfg.downsample
        with self._audio:                                   # (its samples, and the next chunk's start)
            buf, first = self._buf, self._n_embeds
            self._buf = self._buf[n * SAMPLES_PER_TOKEN:]        # the next frame starts 200 before its token
            self._buf_start += n * SAMPLES_PER_TOKEN
            self._n_embeds += n
        mel = log_mel_frames(buf, n * MEL_FRAMES_PER_TOKEN)                       # [128, 8n]
        x, self._history = conv_stem(mel, w, self._history)                     # [4n, C]
        pos = np.arange(first * ds, (first + n) * ds)                           # absolute encoder frames [4n]
        run = ENCODER_BATCHED.get()
        chunk = (x, pos, self._enc_caches)
        out = run(*chunk) if run else encoder_pass(w, [chunk])[0]                # [n, dim]
        self.encode_s += time.perf_counter() - t0
        return out

    def _snapshot(self):
        """The compute state after the silence prefix (see session_prefix): copies of the live cache slots."""
        def caches(cs):
            return [(c.k[:c.filled].copy(), c.v[:c.filled].copy(), c.pos[:c.filled].copy()) for c in cs]
        return {"enc": caches(self._enc_caches), "dec": caches(self._dec.caches), "ids": list(self._dec.ids),
                "history": {k: v.copy() for k, v in self._history.items()}, "n_embeds": self._n_embeds}

    def _restore(self, state):
        for caches, saved in ((self._enc_caches, state["enc"]), (self._dec.caches, state["dec"])):
            for c, (k, v, pos) in zip(caches, saved):
                c.k[:len(pos)], c.v[:len(pos)], c.pos[:len(pos)], c.filled = k, v, pos, len(pos)
        self._dec.ids = list(state["ids"])
        self._history = {k: v.copy() for k, v in state["history"].items()}
        n = state["n_embeds"]
        self._buf, self._buf_start, self._n_embeds = self._buf[n * SAMPLES_PER_TOKEN:], self._buf_start + n * SAMPLES_PER_TOKEN, n

    def _latency(self, n):
        """Seconds since the feed() that brought the last sample needed by the token that made the ids n long."""
        need = SAMPLES_PER_TOKEN * (n - 1) + LOOK_AHEAD          # its position's embedding's end
        while self._arrivals[0][0] < need:
            self._arrivals.popleft()
        return time.perf_counter() - self._arrivals[0][1]


class EncoderAhead:
    """A file's encoder on a thread of its own, running ahead of its decoder (StreamSession(encode_ahead=True),
    as transcribe() makes them where `encodes_ahead` pays). Encoding a file is bound by the arithmetic and
    decoding it by reading the weights, so the two together on their own threads (ckernels.CoreShare: one
    kernel thread each while both work, both to one while the other waits) finish sooner than one after the
    other (README, Performance). Its chunks end where the session's on-demand encoding ends them
    when transcribe() steps it (at each fed piece's last whole token, and every `_batch` tokens), so the
    embeddings, and with them the ids, are the same bits either way (tests/test_stream.py). It starts no
    chunk while AHEAD_TOKENS embeddings wait for the decoder, which keeps memory flat. Its thread runs only
    while it has a chunk to encode (`_kick` starts one), so a session dropped without close() leaves no
    thread behind."""

    def __init__(self, session):
        from . import ckernels                  # (as Model.encodes_ahead)
        self._s = session
        self.cond = session._audio               # guards the session's audio buffer and everything below
        self.bounds = collections.deque()        # the token each fed piece's whole tokens end at
        self._ready, self._n_ready, self._working = [], 0, 0      # embeddings computed, not yet taken
        self._error, self._stopping = None, False
        self._running, self._threads = False, []  # whether a thread encodes; those started, to join
        self.share = ckernels.CoreShare(1)      # side 0 the decoder's, on its own thread while both work

    def _next_chunk(self):
        """Tokens of the next chunk it can encode now, 0 if none (under cond)."""
        s = self._s
        while self.bounds and self.bounds[0] <= s._n_embeds:
            self.bounds.popleft()
        if not self.bounds or self._n_ready >= AHEAD_TOKENS or self._stopping or self._error is not None:
            return 0
        return s._chunk_length(self.bounds[0] - s._n_embeds)

    def _kick(self):
        """Start the thread if there is a chunk to encode and it is not running (under cond)."""
        if not self._running and self._next_chunk():
            self._running = True
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(threading.Thread(target=self._run, name="voxtral_ref encoder", daemon=True))
            self._threads[-1].start()

    def _run(self):
        with self._s._model.kernel_mode(), self.share.side(1):
            while True:
                with self.cond:
                    n = self._next_chunk()
                    if not n:
                        self._running = False
                        self.cond.notify_all()
                        return
                    self._working = n
                try:
                    with self.share.working(1):
                        out = self._s._encode(n)                                 # [n, dim]
                except BaseException as e:     # (the decoder's side raises it)
                    with self.cond:
                        self._error, self._working, self._running = e, 0, False
                        self.cond.notify_all()
                    return
                with self.cond:
                    self._ready.append(out)
                    self._n_ready, self._working = self._n_ready + n, 0
                    self.cond.notify_all()

    def take(self, wait):
        """The embeddings computed since the last take [m, dim]. None if there are none and either the encoder
        has no audio to work on or not `wait`; else it waits for them."""
        with self.cond:
            self._kick()
            while wait and not self._ready and self._error is None and self._running:
                self.cond.wait()
            if self._error is not None:
                raise self._error
            if not self._ready:
                return None
            out, self._ready, self._n_ready = np.concatenate(self._ready), [], 0
            self._kick()                                # (room for more)
            return out

    def backlog(self):
        """Embeddings computed and not yet taken, or, when there are none, those of the chunk being encoded or
        the next (what the decoder would wait for). Not all the audio fed allows: a pass that drafted into
        those would wait for chunks it need not wait for (the first token of a 30 s file: 0.3 -> 1.5 s)."""
        with self.cond:
            return self._n_ready or self._working or self._next_chunk()

    def stop(self):
        """Start no more chunks, and wait for the one being encoded."""
        with self.cond:
            self._stopping, threads = True, list(self._threads)
        for t in threads:
            t.join()


def check_encoder_chunk(weights, frames, pos, caches):
    """A session's encoder chunk is conv-stem frames [4n, C] (n >= 1) at positions pos [4n], at most its
    caches' max_chunk: one clear error for a malformed one, raised before it joins a pass (where it would
    fail the other sessions too, with their caches written half-way)."""
    enc, ds = weights.cfg.encoder, weights.cfg.downsample
    t = len(pos)
    if np.shape(frames) != (t, enc.dim) or t == 0 or t % ds:
        raise ValueError(f"an encoder chunk is whole tokens of {ds} frames of width {enc.dim} at as many positions: "
                         f"got frames of shape {np.shape(frames)} at {t} positions")
    if len(caches) != enc.n_layers or t > caches[0].max_chunk:
        raise ValueError(f"an encoder chunk of {t} frames needs {enc.n_layers} caches taking {t} positions at "
                         f"once: got {len(caches)} taking {caches[0].max_chunk if caches else 0}")


def encoder_pass(weights, work):
    """One pass over the encoder and the adapter for the next chunk of one or more sessions, their rows
    stacked: every weight runs once for all rows (each row on its own, so with the row-independent
    quantised kernels a row's bits do not depend on the others), attention per session against its own
    caches. work: [(conv-stem frames [4n_i, C], their absolute positions [4n_i], the session's KVCache per
    layer)] -> per session its audio embeddings [n_i, dim]."""
    for frames, pos, caches in work:
        check_encoder_chunk(weights, frames, pos, caches)
    ds = weights.cfg.downsample
    x = np.concatenate([f for f, _, _ in work])                                                    # [R, C]
    x = encoder_transformer(x, [p for _, p, _ in work], weights, weights.cfg.format == "mistral",
                            [c for _, _, c in work])                                               # [R, C]
    # each chunk is whole groups of ds frames, so the stacked groups are each session's own
    out = adapter(downsample(x, ds), weights["adapter.w_in"], weights["adapter.w_out"])           # [R / ds, dim]
    return np.split(out, np.cumsum([len(p) // ds for _, p, _ in work])[:-1])


def session_prefix(model, n_delay):
    """The state every session of (model, delay) is in once it has run the first PREFIX tokens, which hear
    only the left pad's silence: encoder caches, conv history and decoder caches. Computed once per
    (model, delay, backend, precision) by a session of its own, exactly as a session without it would
    (tests/test_stream.py checks the ids and caches are bit-identical), then copied into each new session,
    which so starts with only its own audio's positions to compute.
    Its positions' tokens are all given, so it never multiplies the LM head: one zero row then goes through
    the head too, so that the first session's first token, after its audio, does not wait for the head's
    first read. With the file dropped from the page cache: the server's first client, full-size int8, 582 ->
    105 ms after its audio; bench/live_bench.py's first session, full-size q4, 427 / 360 -> 109 / 100 ms."""
    key = (n_delay, model.backend, model.precision)

    def compute():
        s = StreamSession(model, n_delay * MS_PER_TOKEN, reuse_prefix=False)
        with model.kernel_mode():
            s._dec.prefill(s._next_embeds())
            lm_head(np.zeros((1, model.cfg.decoder.dim), np.float32), model.weights.lm_head)  # [1, dim] -> [1, V]
        return s._snapshot()
    with model.prefix_lock:
        if key not in model.prefixes:
            # in passes of its own, never an engine's: a thread of the engine waiting on this lock could be
            # one that engine's passes wait for (two sessions of a new delay made in Engine.together)
            model.prefixes[key] = contextvars.Context().run(compute)
        return model.prefixes[key]


def text_deltas(session, chunks):
    """Feed each chunk, yield each non-empty text delta as soon as it is decoded, then close. A chunk that
    fails (NaN samples, a source that raises) ends the audio there: the text of everything fed before it is
    still decoded and yielded, then the error is raised."""
    error = None
    try:
        for chunk in chunks:
            _, bad = feed_finite_part(session, chunk)
            if bad:
                raise bad
            delta = session.step().text
            if delta:
                yield delta
    except Exception as e:
        error = e
    delta = session.close().text
    if delta:
        yield delta
    if error is not None:
        raise error


# --- `voxtral-ref stream` -------------------------------------------------------------------------------------
RAW_DTYPES = {"s16le": "<i2", "f32le": "<f4"}
BLOCKS_PER_SECOND = 50                    # the microphone's blocks: 20 ms, a quarter of a token, so little delay
# Each feed takes all the audio already waiting (a pipe's, or the microphone's queued blocks), up to
# FEED_MAX_S: a source that got ahead of the decoder (a machine slower than real time, a stall) then has
# several positions decoded in a pass with their drafts verified (BACKLOG_DRAFT), as the server's sessions
# do, where feeding 20 ms blocks one step at a time kept the stream a position a pass and behind for good. Full-size q4 on 2 Zen 4 cores, 30 s of speech
# piped in real time: compute 1.32-1.33x real time and 9.3 s behind at the end with 20 ms feeds, 0.93-0.97x and
# at most 0.8 s behind feeding what waits (docs/performance-log.md, twenty-sixth session).
FEED_MAX_S = 1.0
# bytes a frame of each WAV sample format takes in the pipe (unknown formats count 8: fewer frames read
# than are waiting never blocks)
WAV_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
                    "FLOAT": 4, "DOUBLE": 8}


def add_stream_parser(subparsers):
    s = subparsers.add_parser(
        "stream", help="transcribe live audio from stdin or the microphone",
        description="Transcribe audio as it arrives: text on stdout as it is decoded, timings on stderr. "
                    "The final text equals `transcribe` on the same audio.")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--format", choices=["wav"] + list(RAW_DTYPES), default="wav",
                   help="stdin holds a WAV stream (any rate) or raw little-endian PCM at --rate (default wav)")
    s.add_argument("--rate", type=int, default=SAMPLE_RATE, help="sample rate of raw stdin or the microphone (Hz)")
    s.add_argument("--channels", type=int, default=1, help="interleaved channels of raw stdin (mixed down)")
    s.add_argument("--from-mic", action="store_true", help="capture the default microphone (pip install 'voxtral_ref[mic]')")
    s.add_argument("--delay-ms", type=int, default=None)
    s.add_argument("--past-eos", action="store_true",
                   help="keep decoding after EOS (Mistral's realtime guidance); by default text stops at EOS, as offline")
    s.add_argument("--backend", choices=["auto", "c", "numpy"], default="auto")
    s.add_argument("--precision", choices=kernels.PRECISIONS, default="f32",
                   help="matmul inputs in float32 (default) or rounded to bf16 (faster where the CPU has bf16 dot products)")
    s.add_argument("--quantize", metavar="RECIPE", default=None,
                   help="quantised weights: int8, q4 or a recipe such as q4,lm_head=int8 (see `transcribe --help`)")
    s.set_defaults(func=cli_stream)


def cli_stream(args):
    from .. import load
    if args.rate <= 0 or not 1 <= args.channels <= MAX_CHANNELS:
        raise VoxtralError(f"--rate must be positive and --channels 1 to {MAX_CHANNELS}, got {args.rate} and "
                           f"{args.channels}")
    stop = threading.Event()                            # set by Ctrl-C: the audio ends there
    if args.from_mic:
        rate, chunks = args.rate, _mic_chunks(_import_sounddevice(), args.rate, stop)
    elif sys.stdin is None or sys.stdin.isatty():
        raise VoxtralError("no audio on stdin: pipe a WAV file or raw PCM into `voxtral-ref stream`, or use --from-mic")
    elif args.format == "wav":
        rate, chunks = _wav_chunks(sys.stdin.fileno(), stop)
    else:
        rate, chunks = args.rate, _raw_chunks(sys.stdin.fileno(), np.dtype(RAW_DTYPES[args.format]), args.channels,
                                              max(1, int(args.rate * FEED_MAX_S)), stop)
    model = load(args.model, backend=args.backend, precision=args.precision, quantize=args.quantize)
    session = model.stream(args.delay_ms, rate, args.past_eos)
    report = _Report(rate, session.n_delay)
    print(f"voxtral-ref stream: {rate} Hz in, delay {session.delay_ms} ms, {model.precision} precision"
          + (f", {model.quantize} weights" if model.quantize else "")
          + ("; Ctrl-C to stop" if args.from_mic else ""), file=sys.stderr)

    def on_ctrl_c(signum, frame):
        """The first Ctrl-C ends the audio and lets the session flush (never interrupting a step half-way,
        which would lose audio); a second one aborts."""
        print("voxtral-ref stream: stopping, flushing", file=sys.stderr)
        stop.set()
        signal.signal(signal.SIGINT, previous)
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    error = None
    try:
        try:
            for chunk in chunks:
                n, bad = feed_finite_part(session, chunk)
                report.fed(n)
                if bad:
                    raise bad
                report.emit(session.step)
        except Exception as e:                          # a bad chunk ends the audio: flush what came before
            error = e
        report.emit(session.close, streaming=False)
    finally:
        signal.signal(signal.SIGINT, previous)
        chunks.close()                                  # stops the microphone
    report.finish()
    if error is not None:
        raise error
    if not report.samples:                              # as `transcribe` refuses empty input
        raise VoxtralError("no audio arrived (0 samples): the stream was empty")


def feed_finite_part(session, chunk):
    """session.feed(chunk) -> (frames fed, None); a chunk refused (a NaN or infinite sample, say) has its
    frames before its first bad sample fed, so nothing heard is lost -> (their count, the error)."""
    try:
        session.feed(chunk)
        return len(chunk), None
    except VoxtralError as e:
        error = e
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            bad = ~np.isfinite(np.asarray(chunk, np.float32).reshape(len(chunk), -1)).all(axis=1)   # [n]
    except (TypeError, ValueError):                          # not samples at all: the error says so
        return 0, error
    n = int(bad.argmax()) if bad.any() else 0
    if n:
        session.feed(chunk[:n])
    return n, error


class _Report:
    """Writes text deltas to stdout as they come and keeps the timing figures for stderr."""

    def __init__(self, rate, n_delay):
        self.rate, self.n_delay, self.samples, self.tokens, self.compute = rate, n_delay, 0, 0, 0.0
        self.latency_sum, self.latency_max = 0.0, 0.0
        self.start, self.lag, self.lag_max, self.at_eos = None, 0.0, 0.0, False
        self.held, self.printed = "", False             # trailing spaces not written yet; any text written

    def fed(self, n):
        if self.start is None:                          # when the source began, if it runs in real time
            self.start = time.perf_counter() - n / self.rate
        self.samples += n

    def emit(self, work, streaming=True):
        t = time.perf_counter()
        e = work()
        self.compute += time.perf_counter() - t
        self.tokens += len(e.token_ids)
        self.latency_sum += sum(e.latency_s)
        self.latency_max = max([self.latency_max] + e.latency_s)
        self.at_eos = self.at_eos or EOS_ID in e.token_ids    # no text follows EOS (unless --past-eos)
        if streaming and not self.at_eos:
            # how far the text is behind a real-time source, as the server's Session.lag_s counts it: n tokens
            # cover (n + delay) tokens of audio; the latencies above count from each chunk's feed, so they
            # would miss audio waiting in a pipe. 0 for a source faster than real time (a file).
            covered = (self.tokens + self.n_delay) * MS_PER_TOKEN / 1000
            self.lag = max(0.0, time.perf_counter() - self.start - covered)
            self.lag_max = max(self.lag_max, self.lag)
        # the text as `transcribe` prints it, stripped: spaces are held back until text follows them
        text = (self.held + e.text) if self.printed else (self.held + e.text).lstrip()
        shown = text.rstrip()
        self.held = text[len(shown):]
        if shown:
            sys.stdout.write(shown)
            sys.stdout.flush()
            self.printed = True

    def finish(self):
        print(flush=True)
        seconds = self.samples / self.rate
        print(f"voxtral-ref stream: {seconds:.2f} s of audio, {self.tokens} tokens, compute {self.compute:.2f} s "
              f"({self.compute / max(seconds, 1e-9):.3f}x realtime); latency from the feed of the last audio sample "
              f"a token needs to the token: mean {1e3 * self.latency_sum / max(self.tokens, 1):.1f} ms, "
              f"max {1e3 * self.latency_max:.1f} ms; text behind a real-time source: at most {self.lag_max:.2f} s, "
              f"{self.lag:.2f} s when the audio ended", file=sys.stderr)


def _wav_chunks(fd, stop):
    """(rate, generator of [n, channels] blocks) from a WAV stream; libsndfile reads pipes given a descriptor."""
    import soundfile as sf
    try:
        f = sf.SoundFile(fd, closefd=False)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise VoxtralError(f"stdin is not a WAV stream ({e}); for raw PCM pass --format s16le or f32le") from None
    if f.channels > MAX_CHANNELS:
        f.close()
        raise VoxtralError(f"stdin has {f.channels} channels, more than the {MAX_CHANNELS} that are mixed down: mix it "
                           "down first (ffmpeg -i IN -ac 1 -f wav - | voxtral-ref stream)")

    def blocks():
        with f:
            most = max(1, int(f.samplerate * FEED_MAX_S))
            frame_bytes = WAV_SAMPLE_BYTES.get(f.subtype, 8) * f.channels
            while _until_readable(fd, stop):
                # no more frames than are waiting: libsndfile's read blocks until it has them all, and a
                # blocked read outlives Ctrl-C (a stalled source would lose the audio already heard)
                n = min(most, max(1, _bytes_waiting(fd) // frame_bytes))
                if not len(chunk := f.read(n, dtype="float32")):
                    return
                yield chunk                                                  # [n] or [n, channels]
    return f.samplerate, blocks()


def _until_readable(fd, stop):
    """Wait until fd has bytes to read (or its end), or `stop` is set (Ctrl-C) -> whether to read on. A read
    that blocked on a stalled source would outlive Ctrl-C: Python retries a read the signal interrupts."""
    import select
    while not stop.is_set():
        try:
            if select.select([fd], [], [], 0.1)[0]:
                return True
        except (OSError, ValueError):            # not a descriptor select takes: read, as before
            return True
    return False


def _bytes_waiting(fd):
    """Bytes a read of fd returns without blocking (a pipe's contents, a file's rest); 0 if unknown."""
    try:
        import fcntl
        import termios
        n = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, n)
    except (ImportError, AttributeError, OSError, ValueError):   # no FIONREAD here (Windows), or not for this fd
        return 0
    return int.from_bytes(n, sys.byteorder)


def _raw_chunks(fd, dtype, channels, max_frames, stop):
    """Blocks of raw interleaved PCM as they arrive (a read of a pipe returns what it has, up to max_frames)."""
    frame = dtype.itemsize * channels
    rest = b""
    while _until_readable(fd, stop) and (data := os.read(fd, max_frames * frame)):
        data = rest + data
        whole = len(data) // frame * frame
        rest = data[whole:]
        if whole:
            yield np.frombuffer(data[:whole], dtype).reshape(-1, channels)   # [n, channels]
    if rest:
        print(f"voxtral-ref stream: dropped {len(rest)} trailing bytes (not a whole {frame}-byte frame)",
              file=sys.stderr)


def _import_sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as e:  # OSError: the package is there but PortAudio is not
        raise VoxtralError(f"--from-mic needs the optional sounddevice package: pip install 'voxtral_ref[mic]' "
                           f"({type(e).__name__}: {e})") from None
    return sounddevice


def _mic_chunks(sd, rate, stop):
    """Blocks from the default input device until `stop`; the audio callback hands them over by a queue,
    and each chunk joins every block waiting there, up to FEED_MAX_S. Blocks captured before `stop` are
    still yielded once the device is closed."""
    import queue
    blocks, most = queue.Queue(), max(1, int(rate * FEED_MAX_S))

    def waiting(first):
        chunk = [first]
        while sum(map(len, chunk)) < most and not blocks.empty():
            chunk.append(blocks.get())
        return np.concatenate(chunk)                                       # [n, 1]
    with sd.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=rate // BLOCKS_PER_SECOND,
                        callback=lambda data, frames, t, status: blocks.put(data.copy())):
        while not stop.is_set():
            try:
                yield waiting(blocks.get(timeout=0.05))
            except queue.Empty:
                pass
    while not blocks.empty():
        yield waiting(blocks.get())
