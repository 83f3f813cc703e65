"""Stage 5: offline transcription, as HF's processor + generate do it.

Delayed-streams decoding: the decoder advances one position per 80 ms of audio, always. Position p's
input is embed(token p) + audio_embedding[p]; its logits choose token p + 1. The prompt
[BOS] + [STREAMING_PAD] x (32 + delay) covers the 32 tokens of left-pad silence and the first `delay`
tokens of audio, so text for audio token k appears `delay` tokens later. Decoding stops at EOS or when
the (right-padded) audio runs out: HF's max_length is the number of audio tokens.
"""

import contextvars

import numpy as np

from .adapter import adapter, downsample
from .attention import KVCache
from ..config import EOS_ID, N_LEFT_PAD_TOKENS, SAMPLES_PER_TOKEN, STREAMING_PAD_ID, prompt_ids, right_pad_samples
from .decoder import ada_scales, decoder_forward, embed, lm_head
from ..errors import VoxtralError
from .encoder import conv_stem, encoder_transformer
from .mel import log_mel

# Prompt positions whose audio embedding sees only the left pad's silence: embedding e needs padded samples
# below 1280 (e + 1) + 40 (runtime/stream.py), and the audio starts at 40960 = 32 * 1280, so embeddings
# 0..30 are silence alone and 31 already hears the first 40 samples.
PREFIX = N_LEFT_PAD_TOKENS - 1

# Speculative verification: at most this many drafted tokens per chunk (a chunk of k + 1 positions must fit
# a cache's max_chunk, the prompt's 33 or more; the bench covers k = 1..15).
MAX_DRAFT = 15
# draft_tokens reads this many of the latest ids to choose its guess after a text token
DRAFT_HISTORY = 64

# The batching engine (runtime/engine.py) runs the decoder passes of the sessions it steps together with
# other sequences': while it steps one, this holds its run(decoder, audio_embeds) -> token (kernels.use's way).
BATCHED = contextvars.ContextVar("voxtral_ref_batched_pass", default=None)


def pad_offline(audio, n_delay):
    """32 tokens of silence on the left; on the right, align to a token and add delay + 1 + 10 tokens
    so the delayed text of the last words gets decoded. [N] -> [N + 40960 + right]"""
    left = N_LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN                                      # 40960 = 32 * 1280
    return np.pad(audio, (left, right_pad_samples(len(audio), n_delay))).astype(np.float32)


def encode(weights, padded, trace=None):
    """Padded samples -> audio embeddings [n_tokens, 3072], the whole file at once (the encoder is
    causal, so this equals running it chunk by chunk)."""
    interleaved = weights.cfg.format == "mistral"
    if trace:
        trace("padded_audio", padded)
    mel = log_mel(padded)                                                             # [128, T], T % 8 == 0
    if trace:
        trace("mel", mel)
    x, _ = conv_stem(mel, weights, trace=trace)                                        # [T/2, 1280]
    x = encoder_transformer(x, np.arange(len(x)), weights, interleaved, trace=trace)  # [T/2, 1280]
    a = downsample(x, weights.cfg.downsample)                                         # [T/8, 5120]
    if trace:
        trace("adapter_in", a)
    out = adapter(a, weights["adapter.w_in"], weights["adapter.w_out"])               # [T/8, 3072]
    if trace:
        trace("adapter_out", out)
    return out


class Decoder:
    """Greedy decoding state: per-layer KV caches, the position clock and the delay conditioning.
    Shared by offline transcription and streaming sessions.

    The prompt is fed in two parts: its first PREFIX positions, whose audio is the left pad's silence
    alone (so their state is the same for every input, and a stream can start from a saved copy of it:
    runtime/stream.py), then the rest, which predicts the first token. A live session feeds the rest as its
    audio arrives (`horizon`), so the first token's step computes only the positions its own audio brought;
    in float32 and with quantised weights a row's result does not depend on the rows computed with it, so
    every position is computed bit for bit as offline computes it (in bf16 precision the matmuls sum 1 row
    and 8 in different orders: a stream follows offline up to a near tie, as it already did).

    Speculative verification (offline, where every position's audio is known): `draft` holds k guessed
    tokens, fed after the last id in one chunk of k + 1 positions. Row i's logits choose the token after
    position i; the guesses that match keep their positions (their inputs were what greedy decoding
    feeds), and the caches rewind past the first miss: the ids are exactly greedy decoding's."""

    def __init__(self, weights, n_delay, max_positions=None, trace=None):
        cfg = weights.cfg.decoder
        self.weights, self.trace = weights, trace
        self.interleaved = weights.cfg.format == "mistral"
        self.prompt = prompt_ids(n_delay)
        self.ada = ada_scales(weights, n_delay, trace=trace)                          # [n_layers, 3072]
        self.caches = [KVCache(cfg.sliding_window, len(self.prompt), cfg.n_kv_heads, cfg.head_dim, max_positions)
                       for _ in range(cfg.n_layers)]
        self.ids = []                                                                 # every id fed or emitted
        self.draft = []                                                               # guesses fed after ids[-1]
        self.verified = 0                                                             # drafts the last pass checked
        self.horizon = None                                                           # positions with audio (None: all)

    def chunk(self):
        """(ids, position of the first) this decoder feeds next: the silence prefix, then the rest of the
        prompt (as far as `horizon`, at least one position), then its last token (and the draft, if any)."""
        if not self.ids:
            return self.prompt[:PREFIX], 0
        if len(self.ids) < len(self.prompt):
            end = len(self.prompt) if self.horizon is None else min(len(self.prompt), max(self.horizon, len(self.ids) + 1))
            return self.prompt[len(self.ids):end], len(self.ids)
        return self.ids[-1:] + self.draft, len(self.ids) - 1

    def predicts(self, p0, n):
        """Whether a chunk of n positions from p0 chooses a token: it reaches the prompt's end."""
        return p0 + n >= len(self.prompt)

    def finished(self, n_positions):
        """Offline's rule (HF's generate): stop after EOS, or once the last of n_positions has been fed."""
        ids = self.ids
        return len(ids) > len(self.prompt) and (ids[-1] == EOS_ID or len(ids) >= n_positions)

    def prefill(self, audio_embeds):
        """Feed the prompt's first PREFIX positions ([PREFIX, 3072] audio embeddings); no token yet."""
        if self.ids or len(audio_embeds) != PREFIX:
            raise ValueError(f"prefill takes the first {PREFIX} positions of a fresh decoder, got {len(audio_embeds)}")
        self.run_chunk(audio_embeds)

    def step(self, audio_embeds):
        """Feed the next positions; return the token they predict. Until the prompt is in: its audio
        embeddings ([len(prompt), 3072], or the rest of them after prefill); then one position at a time."""
        if not self.ids:
            self.prefill(audio_embeds[:PREFIX])
            audio_embeds = audio_embeds[PREFIX:]
        token, = self.run_chunk(audio_embeds)
        return token

    def run_chunk(self, audio_embeds):
        """Run chunk() with its positions' audio embeddings [t, 3072] -> the tokens it adds (none for the
        silence prefix, one, or with a draft up to k + 1): in a pass of its own, or in the engine's shared
        pass when the engine steps it."""
        run = BATCHED.get()
        return run(self, audio_embeds) if run else decoder_pass(self.weights, [(self, audio_embeds)], self.trace)[0]

    def fed(self, ids, p0, logits):
        """Record that a pass ran chunk() (ids from position p0); `logits` [1 + len(draft), V] of its last
        rows (None for the silence prefix and the prompt's positions before its last) -> the tokens greedy
        decoding chooses, appended to ids: the first, then each next one whose input the draft guessed right."""
        if p0 + len(ids) <= len(self.prompt):
            self.ids = list(self.prompt[:p0 + len(ids)])
        self.verified = len(self.draft) if logits is not None else 0
        if logits is None:
            return []
        choice = np.argmax(logits, axis=-1)                                            # [1 + k]
        # argmax takes a NaN (or an infinity) as the largest value, so a broken weight shows in the chosen
        # logits: refuse it here, at no cost, rather than emit token 0 for ever (load() checks only the
        # small tensors; `info --verify` reads every weight)
        if not np.isfinite(logits[np.arange(len(choice)), choice]).all():
            raise VoxtralError(f"the model computed NaN or infinite logits at position {p0 + len(ids) - len(choice)}: its "
                               "weights hold NaN or infinite values (`voxtral-ref info --verify` finds them)")
        choice = [int(i) for i in choice]
        n = 1
        while n < len(choice) and self.draft[n - 1] == choice[n - 1]:
            n += 1                                     # position n's input was the token greedy chose there
        self.ids += choice[:n]
        if self.draft:
            self.rewind(p0 + n)
            self.draft = []
        return choice[:n]

    def rewind(self, n_positions):
        """Keep the caches' first n_positions positions, as if the later ones had not run. Only the count
        of live slots changes: unwritten slots hold position -1, which the window could reach, so they must
        stay out, while a rejected position's slot past the count (or, in a full ring, any) is masked by
        causality until the position is computed again, which overwrites it; a full ring has dropped only
        positions a window ago (its k + 1 <= max_chunk extra slots cover the chunk)."""
        for c in self.caches:
            c.filled = min(c.capacity, n_positions)


def check_chunk(dec, audio_embeds):
    """A chunk's audio embeddings must cover its positions: one clear error for a malformed one, raised
    before it joins a pass (where it would fail the other sequences too)."""
    ids, _ = dec.chunk()
    dim = dec.weights.cfg.decoder.dim
    if np.shape(audio_embeds) != (len(ids), dim):
        raise ValueError(f"the decoder's next chunk is {len(ids)} positions: it takes audio embeddings of shape "
                         f"({len(ids)}, {dim}), got {np.shape(audio_embeds)}")


def decoder_pass(weights, work, trace=None):
    """One decoder pass over the next chunk (Decoder.chunk) of one or more sequences, their rows stacked:
    every weight runs once for all rows, attention per sequence (decoder_forward), the LM head only on the
    rows that choose a token. work: [(Decoder, audio embeddings of its chunk's positions [t_i, 3072])]
    -> per sequence the token its chunk predicts, None for a silence prefix. With `trace` (one sequence)
    every row's logits are computed and traced."""
    for dec, a in work:
        check_chunk(dec, a)
    chunks = [dec.chunk() for dec, _ in work]
    h = np.concatenate([embed(weights["tok_embeddings"], ids) + a
                        for (ids, _), (_, a) in zip(chunks, work)])                   # [R, 3072]
    if trace:
        trace("decoder_in", h)
    seqs = [(np.arange(p0, p0 + len(ids)), dec.ada, dec.caches) for (ids, p0), (dec, _) in zip(chunks, work)]
    x = decoder_forward(h, seqs, weights, weights.cfg.format == "mistral", trace)     # [R, 3072]
    ends = np.cumsum([len(ids) for ids, _ in chunks])
    # the rows that choose tokens: a chunk's last, and its draft's (none before the prompt's last position)
    rows = {i: np.arange(ends[i] - 1 - len(dec.draft), ends[i]) for i, (dec, _) in enumerate(work)
            if dec.predicts(chunks[i][1], len(chunks[i][0]))}
    pick = np.concatenate(list(rows.values())) if rows else np.zeros(0, np.int64)
    if trace:
        logits = lm_head(x, weights.lm_head)                                          # [R, V]
        trace("logits", logits)
        logits = logits[pick]
    elif rows:
        logits = lm_head(x[pick], weights.lm_head)                                    # [len(pick), V]
    starts = dict(zip(rows, np.cumsum([0] + [len(r) for r in rows.values()])))
    return [dec.fed(ids, p0, logits[starts[i]:starts[i] + len(rows[i])] if i in rows else None)
            for i, ((ids, p0), (dec, _)) in enumerate(zip(chunks, work))]


def greedy_decode(weights, audio_embeds, n_delay, trace=None, on_token=None, speculate=0):
    """audio_embeds [n_tokens, 3072] -> generated ids (after the prompt; specials and a final EOS kept).
    speculate=k: each pass also verifies k drafted tokens (`draft_tokens`); the ids are the same."""
    n = len(audio_embeds)
    dec = Decoder(weights, n_delay, max_positions=n, trace=trace)
    while not dec.finished(n):
        if len(dec.ids) >= len(dec.prompt):
            dec.draft = draft_tokens(dec, n, speculate)
        ids, p0 = dec.chunk()
        for token in stop_at_end(dec, n, dec.run_chunk(audio_embeds[p0:p0 + len(ids)])):
            if on_token:
                on_token(token)
    return dec.ids[len(dec.prompt):]


def draft_tokens(dec, n_positions, k):
    """The guess for the next k tokens, cut to the audio positions left: the last id again, k times, except
    after a text token, where [STREAMING_PAD] is guessed unless this stream's recent text tokens were more
    often repeated than followed by a pad. The model pads while it waits for words, so runs of pads are its
    commonest output, and a run's next token is the run's own; after a word the stream's recent habit
    decides (random checkpoints, as golden/cases shows, repeat a token for several positions). A cheap
    drafter: no model, DRAFT_HISTORY ids read per pass."""
    k = max(0, min(k, n_positions - len(dec.ids)))
    last = dec.ids[-1]
    if k == 0 or last == STREAMING_PAD_ID:
        return [STREAMING_PAD_ID] * k
    recent = dec.ids[max(len(dec.prompt) - 1, len(dec.ids) - DRAFT_HISTORY):]        # the prompt's last id on
    after_text = [(a, b) for a, b in zip(recent, recent[1:]) if a != STREAMING_PAD_ID]
    repeats = sum(a == b for a, b in after_text)
    pads = sum(b == STREAMING_PAD_ID for _, b in after_text)
    return [last if repeats > pads else STREAMING_PAD_ID] * k


def stop_at_end(dec, n_positions, tokens):
    """Drop from a verified run the tokens greedy decoding would not have reached (after an EOS, or past
    the last position), so the ids end where its do. -> the tokens kept."""
    keep = len(tokens)
    for j, t in enumerate(tokens):
        if t == EOS_ID or len(dec.ids) - len(tokens) + j + 1 >= n_positions:
            keep = j + 1
            break
    del dec.ids[len(dec.ids) - len(tokens) + keep:]
    return tokens[:keep]
