"""Stage 2: log-mel [128, T] -> audio encoder states [T/2, 1280] at 50 Hz.

A causal conv stem (k3 s1, then k3 s2 halving the frame rate), then pre-norm transformer layers with
RoPE and causal sliding-window attention (750 frames = 15 s, the current frame included), SwiGLU MLPs
and biases exactly where the checkpoint has them (q, v, o, down), then a final RMSNorm.
Everything is causal: frame j never depends on a later mel frame, which is what makes streaming exact.
"""

import numpy as np

from ..runtime import kernels
from .attention import fused_layer, fused_layers, self_attention

CONV_KERNEL = 3                           # both conv layers: kernel 3 over time


def conv1d(x, w, b, stride, k=CONV_KERNEL):
    """Unpadded ("valid") conv over time as one matmul. x [T, Cin] (time-major), w [Cout, Cin, k] (or its
    quantised [Cout, Cin * k] matrix), b [Cout] -> [(T - k) // stride + 1, Cout]."""
    cout, cin = w.shape[0], x.shape[1]
    n_out = (x.shape[0] - k) // stride + 1
    taps = np.stack([x[j: j + stride * (n_out - 1) + 1: stride] for j in range(k)], axis=-1)  # [n, Cin, k]
    w2 = w if w.ndim == 2 else w.reshape(cout, cin * k)                                     # [Cout, Cin * k]
    return kernels.linear(taps.reshape(n_out, cin * k), w2, b)                              # [n, Cout]


def conv_left_pad(stride, kernel=CONV_KERNEL):
    """HF's VoxtralRealtimeCausalConv1d pads (k - 1) + 1 - stride frames on the left, none on the right:
    2 frames for conv1 (stride 1), 1 for conv2 (stride 2). Streaming keeps these frames as history."""
    return kernel - stride


def conv_stem(mel, w, history=None, trace=None):
    """mel [128, T] -> ([T/2, C], history) for even T. `history` maps "conv1"/"conv2" to the input frames
    that precede this chunk; None means the start of the audio, i.e. zeros, HF's causal padding. The
    returned history is what the next chunk needs (a stream's conv padding cache; offline ignores it)."""
    c1 = w["enc.conv1.weight"].shape[0]
    h1 = history["conv1"] if history else np.zeros((conv_left_pad(1), mel.shape[0]), np.float32)
    x1 = np.concatenate([h1, mel.T])                                             # [2 + T, 128]
    y1 = kernels.gelu(conv1d(x1, w["enc.conv1.weight"], w["enc.conv1.bias"], 1))  # [T, C]
    if trace:
        trace("conv1", y1)
    h2 = history["conv2"] if history else np.zeros((conv_left_pad(2), c1), np.float32)
    x2 = np.concatenate([h2, y1])                                                # [1 + T, C]
    y2 = kernels.gelu(conv1d(x2, w["enc.conv2.weight"], w["enc.conv2.bias"], 2))  # [T/2, C]
    if trace:
        trace("conv2", y2)
    # stride 2 and even T: the next output's window starts at x2's last frame
    return y2, {"conv1": x1[-conv_left_pad(1):], "conv2": x2[-conv_left_pad(2):]}


def encoder_layer(x, pos, w, cfg, interleaved, cache=None):
    """x [T, 1280] -> [T, 1280]; pos [T] absolute frame positions. x may also stack the rows of several
    streams (runtime/engine.py): then pos and cache are lists, one entry per stream in row order, and
    attention runs per stream against its own cache (as self_attention and fused_layer take them)."""
    y = fused_layer(x, pos, w, cfg.n_heads, cfg.n_heads, cfg.head_dim, cfg.rope_theta, cfg.sliding_window,
                    cfg.norm_eps, interleaved, cache=cache)                             # C: these lines in one call
    if y is not None:
        return y
    h = kernels.rms_norm(x, w["attention_norm"], cfg.norm_eps)                          # [T, 1280]
    x = x + self_attention(h, pos, w, cfg.n_heads, cfg.n_heads, cfg.head_dim, cfg.rope_theta,
                           cfg.sliding_window, interleaved, cache)                      # MHA: kv heads = heads
    h = kernels.rms_norm(x, w["ffn_norm"], cfg.norm_eps)                                # [T, 1280]
    gate = kernels.silu_mul(kernels.linear(h, w["w1"]), kernels.linear(h, w["w3"]))     # [T, 5120]
    return x + kernels.linear(gate, w["w2"], w["b2"])                                   # [T, 1280]


def encoder_transformer(x, pos, weights, interleaved, caches=None, trace=None):
    """[T, 1280] conv-stem frames at positions `pos` -> [T, 1280] final-normed encoder states.
    caches: one KVCache per layer when streaming, None to attend within this (whole) sequence.
    Stacked streams (runtime/engine.py): x [R, 1280] holds their chunks in row order, pos a list of their
    positions and caches a list of their per-layer caches; every weight then runs once over all R rows
    (each row computed on its own) and attention per stream."""
    cfg = weights.cfg.encoder
    stacked = isinstance(pos, list)
    layers = [weights.layer(f"enc.layers.{i}") for i in range(cfg.n_layers)]
    layer_caches = [[c[i] for c in caches] if stacked else caches[i] if caches else None for i in range(cfg.n_layers)]
    y = None if trace else fused_layers(x, pos, layers, cfg.n_heads, cfg.n_heads, cfg.head_dim, cfg.rope_theta,  # C: the
                                        cfg.sliding_window, cfg.norm_eps, interleaved, caches=layer_caches)  # loop below
    if y is not None:
        x = y                                                                            # [T, 1280]
    else:
        for i in range(cfg.n_layers):
            x = encoder_layer(x, pos, layers[i], cfg, interleaved, layer_caches[i])       # [T, 1280]
            if trace:
                trace(f"encoder.layers.{i}", x)
    x = kernels.rms_norm(x, weights["enc.norm"], cfg.norm_eps)                          # [T, 1280]
    if trace:
        trace("encoder_out", x)
    return x
