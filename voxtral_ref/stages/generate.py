"""Stage 5: offline transcription, as HF's processor + generate do it.

Delayed-streams decoding: the decoder advances one position per 80 ms of audio, always. Position p's
input is embed(token p) + audio_embedding[p]; its logits choose token p + 1. The prompt
[BOS] + [STREAMING_PAD] x (32 + delay) covers the 32 tokens of left-pad silence and the first `delay`
tokens of audio, so text for audio token k appears `delay` tokens later. Decoding stops at EOS or when
the (right-padded) audio runs out: HF's max_length is the number of audio tokens.
"""

import numpy as np

from .adapter import adapter, downsample
from .attention import KVCache
from ..config import EOS_ID, N_LEFT_PAD_TOKENS, SAMPLES_PER_TOKEN, prompt_ids, right_pad_samples
from .decoder import ada_scales, decoder_forward, embed, lm_head
from .encoder import conv_stem, encoder_transformer
from .mel import log_mel

# Prompt positions whose audio embedding sees only the left pad's silence: embedding e needs padded samples
# below 1280 (e + 1) + 40 (runtime/stream.py), and the audio starts at 40960 = 32 * 1280, so embeddings
# 0..30 are silence alone and 31 already hears the first 40 samples.
PREFIX = N_LEFT_PAD_TOKENS - 1


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
    runtime/stream.py), then the rest, which predicts the first token. Offline feeds the same two parts,
    so both compute every position the same way."""

    def __init__(self, weights, n_delay, max_positions=None, trace=None):
        cfg = weights.cfg.decoder
        self.weights, self.trace = weights, trace
        self.interleaved = weights.cfg.format == "mistral"
        self.prompt = prompt_ids(n_delay)
        self.ada = ada_scales(weights, n_delay, trace=trace)                          # n_layers x [3072]
        self.caches = [KVCache(cfg.sliding_window, len(self.prompt), cfg.n_kv_heads, cfg.head_dim, max_positions)
                       for _ in range(cfg.n_layers)]
        self.ids = []                                                                 # every id fed or emitted

    def prefill(self, audio_embeds):
        """Feed the prompt's first PREFIX positions ([PREFIX, 3072] audio embeddings); no token yet."""
        if self.ids or len(audio_embeds) != PREFIX:
            raise ValueError(f"prefill takes the first {PREFIX} positions of a fresh decoder, got {len(audio_embeds)}")
        self._forward(self.prompt[:PREFIX], 0, audio_embeds)
        self.ids = list(self.prompt[:PREFIX])

    def step(self, audio_embeds):
        """Feed the next positions; return the token they predict. Until the prompt is in: its audio
        embeddings ([len(prompt), 3072], or the rest of them after prefill); then one position at a time."""
        if not self.ids:
            self.prefill(audio_embeds[:PREFIX])
            audio_embeds = audio_embeds[PREFIX:]
        if len(self.ids) < len(self.prompt):
            feed, p0 = self.prompt[len(self.ids):], len(self.ids)
            self.ids = list(self.prompt)
        else:
            feed, p0 = self.ids[-1:], len(self.ids) - 1
        logits = self._forward(feed, p0, audio_embeds)                                 # [t or 1, V]
        token = int(np.argmax(logits[-1]))
        self.ids.append(token)
        return token

    def _forward(self, feed, p0, audio_embeds):
        """Positions p0.. with input ids `feed` -> logits of the last one (of all of them when tracing)."""
        h = embed(self.weights["tok_embeddings"], feed) + audio_embeds                 # [t, 3072]
        pos = np.arange(p0, p0 + len(feed))
        if self.trace:
            self.trace("decoder_in", h)
        x = decoder_forward(h, pos, self.weights, self.ada, self.interleaved, self.caches, self.trace)
        logits = lm_head(x if self.trace else x[-1:], self.weights.lm_head)           # [t or 1, V]
        if self.trace:
            self.trace("logits", logits)
        return logits


def greedy_decode(weights, audio_embeds, n_delay, trace=None, on_token=None):
    """audio_embeds [n_tokens, 3072] -> generated ids (after the prompt; specials and a final EOS kept)."""
    n = len(audio_embeds)
    dec = Decoder(weights, n_delay, max_positions=n, trace=trace)
    p = len(dec.prompt)
    out = []
    while not out or (out[-1] != EOS_ID and p + len(out) < n):
        pos = p + len(out) - 1                                        # position of the last id fed
        token = dec.step(audio_embeds[:p] if not out else audio_embeds[pos:pos + 1])
        out.append(token)
        if on_token:
            on_token(token)
    return out
