"""Stage 4: (token embedding + audio embedding) -> next-token logits, one 80 ms position at a time.

A Ministral-style decoder: pre-RMSNorm, GQA attention (32 query heads share 8 kv heads) with RoPE and a
sliding window, SwiGLU, no biases, LM head tied to the token embeddings. What is particular to Voxtral
Realtime is the delay conditioning: a sinusoidal embedding of the delay (in tokens) goes through a small
per-layer MLP whose output rescales the FFN branch's norm, `RMSNorm(h) * (1 + ada)` (AdaRMSNorm).
"""

import numpy as np

from ..runtime import kernels
from .attention import fused_layer, fused_layers, self_attention


def time_embedding(n_delay, dim, theta=10000.0):
    """Sinusoidal embedding of the delay t = n_delay tokens: [cos(t f_i) | sin(t f_i)], COS FIRST,
    f_i = theta^(-i / (dim/2)). Float32 like HF's VoxtralRealtimeTimeEmbedding. -> [dim]"""
    half = dim // 2
    inv_freq = np.exp(np.float32(-np.log(theta)) * np.arange(half, dtype=np.float32) / np.float32(half))  # [dim/2]
    angles = np.float32(n_delay) * inv_freq.astype(np.float32)                          # [dim/2]
    return np.concatenate([np.cos(angles), np.sin(angles)]).astype(np.float32)          # [dim]


def ada_scale(t_cond, w_down, w_up):
    """Per-layer AdaRMSNorm scale: Linear(3072 -> 32), exact GELU, Linear(32 -> 3072). [dim] -> [dim]"""
    return kernels.linear(kernels.gelu(kernels.linear(t_cond[None], w_down)), w_up)[0]  # [1, 32] -> [dim]


def embed(tok_embeddings, ids):
    """Rows of the (bf16 or f32) embedding table as float32: [n] -> [n, dim]."""
    return np.asarray(tok_embeddings[np.asarray(ids)], dtype=np.float32)


def decoder_layer(h, pos, w, cfg, ada, interleaved, cache):
    """h [T, 3072] at positions pos [T] -> [T, 3072]; `ada` [3072] is this layer's constant scale. h may also
    stack the rows of several sequences (runtime/engine.py): then pos and cache are lists, one entry per
    sequence in row order (see self_attention), and ada [T, 3072] gives each row its own sequence's scale."""
    y = fused_layer(h, pos, w, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.sliding_window,
                    cfg.norm_eps, interleaved, ada, cache)                              # C: these lines in one call
    if y is not None:
        return y
    x = kernels.rms_norm(h, w["attention_norm"], cfg.norm_eps)                           # [T, 3072]
    h = h + self_attention(x, pos, w, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta,
                           cfg.sliding_window, interleaved, cache)                       # [T, 3072]
    x = kernels.rms_norm(h, w["ffn_norm"], cfg.norm_eps) * (np.float32(1.0) + ada)       # AdaRMSNorm, FFN only
    gate = kernels.silu_mul(kernels.linear(x, w["w1"]), kernels.linear(x, w["w3"]))      # [T, 9216]
    return h + kernels.linear(gate, w["w2"])                                             # [T, 3072]


def decoder_forward(h, seqs, weights, interleaved, trace=None):
    """Decoder input embeddings h [R, 3072] -> final-normed states [R, 3072]. h stacks the rows of one or
    more sequences; `seqs` holds per sequence, in row order, (pos [t_i], ada: its per-layer scales
    (`ada_scales`), caches: its KVCache per layer). Every weight runs once over all R rows (each row
    computed on its own, so a row does not depend on the others) and attention per sequence."""
    cfg = weights.cfg.decoder
    pos, rows = [p for p, _, _ in seqs], [len(p) for p, _, _ in seqs]
    # every layer's scale for every row (a row's own delay) in one step per pass, not one per layer: the
    # Python between a 1-row pass's layer calls 0.7 -> 0.3 ms, a 16-row pass's 1.7-2.1 -> 1.3-1.4 ms
    ada = np.repeat(np.stack([a for _, a, _ in seqs], axis=1), rows, axis=1)           # [n_layers, R, 3072]
    layers = [weights.layer(f"dec.layers.{i}") for i in range(cfg.n_layers)]
    caches = [[c[i] for _, _, c in seqs] for i in range(cfg.n_layers)]
    y = None if trace else fused_layers(h, pos, layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta,
                                        cfg.sliding_window, cfg.norm_eps, interleaved, ada, caches)  # C: the loop below
    if y is not None:
        h = y                                                                            # [R, 3072]
    else:
        for i in range(cfg.n_layers):
            h = decoder_layer(h, pos, layers[i], cfg, ada[i], interleaved, caches[i])      # [R, 3072]
            if trace:
                trace(f"decoder.layers.{i}", h)
    x = kernels.rms_norm(h, weights["dec.norm"], cfg.norm_eps)                           # [R, 3072]
    if trace:
        trace("final_norm", x)
    return x


def lm_head(x, w):
    """Output projection, tied to the token embedding (or its int8 copy): [T, 3072] -> [T, V] logits."""
    return kernels.linear(x, w)                                                          # [T, V]


def ada_scales(weights, n_delay, trace=None):
    """The delay conditioning is constant for a whole transcription: compute each layer's scale once.
    -> [n_layers, 3072]"""
    cfg = weights.cfg.decoder
    t_cond = time_embedding(n_delay, cfg.dim)                                            # [3072]
    if trace:
        trace("t_cond", t_cond)
    scales = []
    for i in range(cfg.n_layers):
        scales.append(ada_scale(t_cond, weights[f"dec.layers.{i}.ada_down"], weights[f"dec.layers.{i}.ada_up"]))
        if trace:
            trace(f"decoder.layers.{i}.ada_scale", scales[-1])                           # [3072]
    return np.stack(scales)                                                              # [n_layers, 3072]
