"""Self-attention shared by the encoder and the decoder: projections, RoPE (angles here, the rotation in
kernels.rope), sliding-window attention and the rolling KV cache that bounds memory for streams of any
length."""

import contextvars
import functools

import numpy as np

from ..runtime import kernels

# Opt-in observer for the oracle's attention maps (`voxtral-ref dump --attention`): called as
# probe(q, k, q_pos, k_pos, window) with every call's roped queries [T, H, hd] and keys [S, Hkv, hd].
ATTENTION_PROBE = contextvars.ContextVar("voxtral_ref_attention_probe", default=None)


def rope_angles(pos, head_dim, theta):
    """cos, sin [T, head_dim / 2] for absolute positions `pos`. Computed in float32 the way HF does
    (float32 inv_freq times float32 position), so long streams round like the oracle."""
    inv_freq = np.float32(1.0) / np.float32(theta) ** (
        np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))  # [hd/2]
    angles = pos.astype(np.float32)[:, None] * inv_freq[None, :]             # [T, hd/2]
    return np.cos(angles), np.sin(angles)


RING_ALIGN = 256                  # csrc/dispatch.h VX_ATT_ALIGN


class KVCache:
    """One layer's keys and values for the last `window` positions, in a ring buffer.

    A chunk of up to `max_chunk` new positions is written BEFORE attending, so the ring holds at least
    window + max_chunk - 1 slots: the oldest query of the chunk still finds its window - 1 predecessors.
    Slots are addressed by position modulo capacity; attention masks by position, so order is free. The
    capacity is rounded up to a multiple of RING_ALIGN past window + RING_ALIGN - 1: then the C attention's
    aligned key ranges hold, for each query, the same positions in the same order in every such ring, so a
    stream's caches (4 encoder frames a step) give the sums a file's (1000 frames a call) give.
    Keys and values are kept in the KV format in force (kernels.use): float32, or int8 codes with a scale
    per row (kernels.KV8) in the quantised modes.
    A sequence known to end within `max_positions` needs no more slots than that (short files)."""

    def __init__(self, window, max_chunk, n_kv_heads, head_dim, max_positions=None):
        ring = -(-(window + max(max_chunk, RING_ALIGN) - 1) // RING_ALIGN) * RING_ALIGN
        self.capacity = min(ring, max_positions or ring)
        self.max_chunk = max_chunk
        self.k = kernels.kv_empty((self.capacity, n_kv_heads, head_dim))      # [cap, Hkv, hd]
        self.v = kernels.kv_empty((self.capacity, n_kv_heads, head_dim))      # [cap, Hkv, hd]
        self.pos = np.full(self.capacity, -1, np.int64)                       # [cap]
        self.filled = 0

    def update(self, k, v, pos):
        """Store the new [t, Hkv, hd] keys/values at positions `pos` [t]; return all live slots."""
        if len(pos) > self.max_chunk:
            raise ValueError(f"chunk of {len(pos)} positions exceeds the cache's max_chunk {self.max_chunk}")
        slots = pos % self.capacity
        self.k[slots], self.v[slots], self.pos[slots] = k, v, pos
        self.filled = min(self.capacity, self.filled + len(pos))
        n = self.filled
        return self.k[:n], self.v[:n], self.pos[:n]


def project_qkv(x, pos, w, n_heads, n_kv_heads, head_dim, rope_theta, interleaved):
    """x [T, dim] at positions pos [T] -> roped q [T, H, hd], k [T, Hkv, hd] and v [T, Hkv, hd]. Every row on
    its own, so the rows of several sequences can be stacked and each weight read once for all of them."""
    t = x.shape[0]
    q = kernels.linear(x, w["wq"], w.get("bq")).reshape(t, n_heads, head_dim)      # [T, H, hd]
    k = kernels.linear(x, w["wk"]).reshape(t, n_kv_heads, head_dim)                # [T, Hkv, hd]
    v = kernels.linear(x, w["wv"], w.get("bv")).reshape(t, n_kv_heads, head_dim)   # [T, Hkv, hd]
    cos, sin = rope_angles(pos, head_dim, rope_theta)                              # [T, hd/2]
    return kernels.rope(q, cos, sin, interleaved), kernels.rope(k, cos, sin, interleaved), v  # split-half out


def attend(q, k, v, pos, window, cache=None):
    """One sequence's chunk: q [T, H, hd], k/v [T, Hkv, hd] at positions pos [T] -> [T, H, hd]. Keys come
    from this chunk only (cache=None: the whole sequence at once, as offline) or from the cache after this
    chunk is added (streaming / incremental decoding)."""
    k, v, k_pos = kernels.kv_pack(k), kernels.kv_pack(v), pos                    # [T, Hkv, hd] f32 | KV8
    if cache is not None:
        k, v, k_pos = cache.update(k, v, pos)                                      # [S, Hkv, hd]
    if ATTENTION_PROBE.get():
        ATTENTION_PROBE.get()(q, k, pos, k_pos, window)
    return kernels.attention(q, k, v, pos, k_pos, window)                          # [T, H, hd]


def self_attention(x, pos, w, n_heads, n_kv_heads, head_dim, rope_theta, window, interleaved, cache=None):
    """x [T, dim] -> [T, dim]. `w` holds wq, wk, wv, wo and the optional biases bq, bv, bo (the encoder
    has them, the decoder none); `cache` as in `attend`. x may also stack the rows of several sequences
    (runtime/engine.py): then `pos` and `cache` are lists, one entry per sequence in row order; the
    projections run once over all rows, attention per sequence against its own cache."""
    seqs = list(zip(pos, cache)) if isinstance(pos, list) else [(pos, cache)]
    q, k, v = project_qkv(x, np.concatenate([p for p, _ in seqs]), w, n_heads, n_kv_heads, head_dim, rope_theta,
                          interleaved)                                             # [T, H | Hkv, hd]
    ends = np.cumsum([len(p) for p, _ in seqs])
    o = [attend(q[e - len(p):e], k[e - len(p):e], v[e - len(p):e], p, window, c) for (p, c), e in zip(seqs, ends)]
    o = o[0] if len(o) == 1 else np.concatenate(o)                                 # [T, H, hd]
    return kernels.linear(o.reshape(x.shape[0], n_heads * head_dim), w["wo"], w.get("bo"))  # [T, dim]


def fused_layers(h, pos, ws, n_heads, n_kv_heads, head_dim, rope_theta, window, eps, interleaved, adas=None,
                 caches=None):
    """Layers ws[0], ws[1], ... in turn (the encoder's or the decoder's: attention block, then MLP block with
    the AdaRMSNorm scales adas [n_layers, T, dim] if given; caches[i]: layer i's cache(s), as self_attention
    takes them) in one kernel call where the backend has one: C's runs the readable layers' kernels in the
    same order (csrc/layer.c), bit for bit, without a trip through Python per kernel (some 16 per layer) or
    per layer (58 per live step). h may stack several sequences' rows, as in self_attention (pos and each
    layer's caches then lists). -> h [T, dim], or None: run the readable layers. Not while the oracle
    records attention maps."""
    caches = caches or [None] * len(ws)
    seqs = [list(zip(pos, c)) if isinstance(pos, list) else [(pos, c)] for c in caches]    # per layer
    if not kernels.fused_layers() or ATTENTION_PROBE.get():
        return None
    # stacked rows need their caches; an oversized chunk gets the readable layers' error
    for p, c in (pc for layer in seqs for pc in layer):
        if (c is None and len(seqs[0]) > 1) or (c is not None and len(p) > c.max_chunk):
            return None
    ps = [p for p, _ in seqs[0]]
    allpos = np.concatenate(ps) if len(ps) > 1 else np.asarray(ps[0])                         # [T]
    if adas is not None:                  # a scale per layer and row (a layer's [dim] serves every row)
        adas = np.broadcast_to(adas, (len(ws),) + np.shape(h))                                 # [n_layers, T, dim]
    cos, sin = _layer_angles(np.asarray(allpos, np.int64).tobytes(), head_dim, rope_theta)     # [T, hd/2]
    return kernels.layers(h, allpos, [len(p) for p in ps], ws, n_heads, n_kv_heads, head_dim, window, eps,
                          interleaved, cos, sin, adas, [[c for _, c in layer] for layer in seqs])


def fused_layer(h, pos, w, n_heads, n_kv_heads, head_dim, rope_theta, window, eps, interleaved, ada=None, cache=None):
    """One layer through fused_layers (ada [T, dim], [dim] or None; cache as self_attention takes it)."""
    return fused_layers(h, pos, [w], n_heads, n_kv_heads, head_dim, rope_theta, window, eps, interleaved,
                        None if ada is None else ada[None], [cache])


@functools.lru_cache(maxsize=4)
def _layer_angles(pos_bytes, head_dim, theta):
    """rope_angles for every layer of a pass at once (they share the positions); read-only."""
    return rope_angles(np.frombuffer(pos_bytes, np.int64), head_dim, theta)
