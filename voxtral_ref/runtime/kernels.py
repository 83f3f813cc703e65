"""The hot operations, each as a readable NumPy twin, and the one place that picks NumPy or C.

Model code calls `kernels.linear`, `kernels.attention`, ...; which implementation runs is chosen per call
by the backend in force (`with kernels.use("c"): ...`, set by `Model`), and so is the precision of the
matmul inputs: "f32" (the oracle path) or "bf16", where every linear first rounds its input to bfloat16,
the precision a bf16 model's matmuls see (HF's torch_dtype=bfloat16), which lets CPUs with bf16 dot
products run the GEMMs twice as fast. Products and sums stay float32 in both. The NumPy twins below are
the specification: every C kernel in csrc/ is tested against its twin.

Layouts (all row-major, float32 activations):
  linear     x [N, K] f32, w [M, K] f32 | bf16 (as stored in the checkpoint) | quant.QTensor (int8 / q4,
             x then quantised to int8: see quant.py), b [M] f32 or None -> [N, M]
  attention  q [Tq, Hq, D], k/v [Tk, Hkv, D] f32 or KV8 (int8 caches), q_pos [Tq] / k_pos [Tk] int absolute
             positions -> [Tq, Hq, D]
  rope       x [T, H, D] f32, cos/sin [T, D/2] f32 -> [T, H, D] (split-half layout)
"""

import contextlib
import contextvars
import mmap
import threading

import ml_dtypes
import numpy as np
from scipy.special import erf

from . import quant

BACKENDS = ("numpy", "c")
PRECISIONS = ("f32", "bf16")
_backend = contextvars.ContextVar("voxtral_ref_backend", default="numpy")
_precision = contextvars.ContextVar("voxtral_ref_precision", default="f32")
_kv = contextvars.ContextVar("voxtral_ref_kv", default="f32")
KV_FORMATS = ("f32", "int8")


@contextlib.contextmanager
def use(backend, precision="f32", kv="f32"):
    """Run the enclosed calls on `backend` ("numpy" or "c") with matmul inputs in `precision`, and attention
    keys and values kept in `kv` ("f32", or "int8": the compact caches of the quantised modes, KV8, a
    quarter of the bytes a step reads; keys and values are quantised whether cached or not, so a stream
    and a whole file see the same values)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if kv not in KV_FORMATS:
        raise ValueError(f"unknown KV format {kv!r}: choose one of {', '.join(KV_FORMATS)}")
    tokens = _backend.set(backend), _precision.set(precision), _kv.set(kv)
    try:
        yield
    finally:
        _backend.reset(tokens[0])
        _precision.reset(tokens[1])
        _kv.reset(tokens[2])


KV8_BLOCK = 32                    # positions per block of an int8 cache's codes: csrc/kernels.h VX_KV8_BLOCK
LAZY_MIN_BYTES = 1 << 20


def huge_pages(buf, start=0, length=None, on=True):
    """Ask for 2 MB pages for bytes [start, start + length) of an mmap, where the OS offers them (Linux
    transparent huge pages, `madvise` mode): a step streams every weight once, and with 4 KB pages each
    4 KB costs a TLB miss. A file read in through such a range is cached in 2 MB pages and mapped with them
    (one cached in 4 KB pages stays so until evicted: quantized.write drops its fresh file from the cache
    for this). Measured on the full-size q4 checkpoint read in cold, a live step's linears 62.4 / 62.1 ->
    61.1 / 59.7 ms (alternated runs). on=False asks for 4 KB pages even where the cache holds 2 MB ones."""
    option = getattr(mmap, "MADV_HUGEPAGE" if on else "MADV_NOHUGEPAGE", None)
    if option is not None and hasattr(buf, "madvise"):
        try:
            buf.madvise(option, start, len(buf) - start if length is None else length)
        except OSError:                 # a kernel built without huge pages: the advice is only advice
            pass


READ_AHEAD_STEP = 128 << 10       # bytes per read-ahead request: Linux reads at most the device's read_ahead_kb
                                  # (128 KB by default) of one; a whole-table request read ~1 % of it here


def read_ahead(buf, start, length):
    """Have the OS read bytes [start, start + length) of a file mapping into its page cache, in the
    background (a daemon thread of MADV_WILLNEED requests), without mapping them into this process. For the
    embedding table a quantised LM head leaves to one lookup per token: a row not in the page cache is read
    from disk at its first lookup, inside a pass every sequence of it waits for (the full-size q4 table after
    a cold start: 121 of 500 random rows took 0.5-12 ms each). -> the thread (None where the OS takes no such
    advice): once it ends the requests are made, and the reads complete after (the full-size table: 0.18 s of
    requests, all of it cached ~1 s on)."""
    if not (hasattr(mmap, "MADV_WILLNEED") and hasattr(buf, "madvise")):
        return None

    def run():
        try:
            for at in range(start, start + length, READ_AHEAD_STEP):
                buf.madvise(mmap.MADV_WILLNEED, at, min(READ_AHEAD_STEP, start + length - at))
        except (OSError, ValueError):   # advice only: a closed mapping, a kernel without it
            pass
    thread = threading.Thread(target=run, name="voxtral-ref read-ahead", daemon=True)
    thread.start()
    return thread


def lazy_zeros(shape, dtype, huge=False):
    """Zeros whose pages the OS provides only as they are first written, and takes back when the array goes:
    a private anonymous mapping (for 1 MB and more). A cache's ring is sized for its whole window, but a
    stream fills it over minutes. From np.zeros it came out of the heap, where load() keeps freed memory for
    reuse (model.keep_freed_memory_for_reuse), so calloc had to clear it at once: opening a stream of the
    full model (0.58 GB of int8 rings) took 22 ms to 1 s, while the server's event loop waited.
    huge: in 2 MB pages (huge_pages), for weights, written whole at once and streamed on
    every step; not for the rings, where each first write would commit 2 MB."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < LAZY_MIN_BYTES or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if huge:
        huge_pages(buf)
    return np.frombuffer(buf, dtype).reshape(shape)


class KV8:
    """Keys or values in an int8 cache: S rows of Hkv heads, a (position, head) row being one float32 scale
    times D int8 codes (quantised as activations are, one block per row: quant.quantize_act_np).
    The scales are [S, Hkv]; the codes are kept as the C attention reads them, in blocks of KV8_BLOCK
    positions, head-major within a block: blocks [ceil(S / 32), Hkv, 32, D], so that a block's rows of one
    head are contiguous and the kernel reads them in place (csrc/attention_simd.h); `codes` gives them
    by position, [S, Hkv, D]. Indexing, assignment and copy act on rows, like an array of them (a prefix
    slice is a view, any other index a copy, an integer one keeping its row axis: kv[0] is 1 row);
    np.asarray(kv, np.float32) dequantises."""

    def __init__(self, blocks, scale):
        self.blocks, self.scale = blocks, scale                 # [ceil(S / 32), Hkv, 32, D] int8, [S, Hkv]

    @classmethod
    def empty(cls, shape, zeros=np.zeros):
        """zeros: lazy_zeros for a cache's ring"""
        s, h, d = shape
        return cls(zeros((-(-s // KV8_BLOCK), h, KV8_BLOCK, d), np.int8), zeros((s, h), np.float32))

    @classmethod
    def pack(cls, codes, scale):
        """codes [S, Hkv, D] int8 and their scales [S, Hkv] -> KV8"""
        kv = cls.empty(codes.shape)
        kv[:len(codes)] = codes, scale
        return kv

    def _rows(self, idx):
        """the positions an index selects, and where their codes sit: [n], ([n] block, [n] row in it)"""
        p = np.arange(len(self.scale))[idx].reshape(-1)
        return p, (p // KV8_BLOCK, p % KV8_BLOCK)

    @property
    def codes(self):
        """the codes by position (a copy): [S, Hkv, D] int8"""
        h, d = self.blocks.shape[1], self.blocks.shape[3]
        return self.blocks.transpose(0, 2, 1, 3).reshape(-1, h, d)[:len(self.scale)]   # [S, Hkv, D]

    def __getitem__(self, idx):
        if isinstance(idx, slice) and idx.start in (None, 0) and idx.step in (None, 1):
            n = len(range(*idx.indices(len(self.scale))))
            return KV8(self.blocks[:-(-n // KV8_BLOCK)], self.scale[:n])
        p, (b, r) = self._rows(idx)
        return KV8.pack(self.blocks.transpose(0, 2, 1, 3)[b, r], self.scale[p])

    def __setitem__(self, idx, other):
        """kv[idx] = another KV8, or (codes [n, Hkv, D], scales [n, Hkv])"""
        codes, scale = (other.codes, other.scale) if isinstance(other, KV8) else other
        p, (b, r) = self._rows(idx)
        self.blocks.transpose(0, 2, 1, 3)[b, r] = codes
        self.scale[p] = scale

    def copy(self):
        return KV8(self.blocks.copy(), self.scale.copy())

    @property
    def shape(self):
        return (len(self.scale), self.blocks.shape[1], self.blocks.shape[3])

    @property
    def nbytes(self):
        return self.blocks.nbytes + self.scale.nbytes

    def __array__(self, dtype=None, copy=None):
        x = self.codes.astype(np.float32) * self.scale[..., None]
        return x if dtype is None else x.astype(dtype, copy=False)


def kv_empty(shape):
    """A cache's zeroed keys (or values) [S, Hkv, D] in the KV format in force (see `use`)."""
    return KV8.empty(shape, lazy_zeros) if _kv.get() == "int8" else lazy_zeros(shape, np.float32)


def kv_pack(x):
    """Fresh keys or values [T, Hkv, D] float32 in the KV format in force: as they are, or KV8."""
    if _kv.get() != "int8":
        return np.asarray(x, np.float32)
    t, h, d = x.shape
    c = _c()
    codes, scale, _ = (c.quantize_act if c else quant.quantize_act_np)(x.reshape(t * h, d), d)  # [T*Hkv, D], [T*Hkv, 1]
    return KV8.pack(codes.reshape(t, h, d), scale.reshape(t, h))


def _c():
    """The C implementation module when the backend is "c", else None. Imported on first use (ckernels imports
    this module) and kept: a live step makes some 400 calls here."""
    global _ckernels
    if _backend.get() != "c":
        return None
    if _ckernels is None:
        from . import ckernels
        _ckernels = ckernels
    return _ckernels


_ckernels = None


# --- twins ------------------------------------------------------------------------------------------------
def round_bf16(x):
    """float32 rounded to the nearest bfloat16 (ties to even), kept as float32."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def linear_np(x, w, b=None, precision="f32"):
    if isinstance(w, quant.QTensor):
        return quant.qlinear_np(x, w, b)       # x quantised to int8 whatever the precision
    if precision == "bf16":
        x = round_bf16(x)                      # the only rounding: products and sums stay float32
    y = x @ np.asarray(w, dtype=np.float32).T  # [N, K] @ [K, M] -> [N, M]
    return y if b is None else y + b


def attention_np(q, k, v, q_pos, k_pos, window):
    """Causal sliding-window attention, GQA. Key j is visible to query i iff
    q_pos[i] - window < k_pos[j] <= q_pos[i]  (the window counts the query's own position, as HF's
    sliding-window mask does). Softmax in float32 with scale 1/sqrt(D). Queries are taken in blocks so
    memory stays O(block * window) however long the sequence.
    With KV8 keys and values (an int8 cache) the queries are quantised as the keys are (one int8 block per
    head row), so a score is the exact integer dot product of the codes times (the query's scale / sqrt(D))
    times the key's scale: the same in every kernel path and call shape, and the C kernels' integer
    dot-product instructions compute it. The values are dequantised."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv                                               # query heads per kv head
    scale = np.float32(1.0 / np.sqrt(d))
    if isinstance(k, KV8):
        kscale, k = k.scale, k.codes.astype(np.float32)         # [Tk, Hkv], [Tk, Hkv, D]
        qc, qs, _ = quant.quantize_act_np(q.reshape(-1, d), d)  # [Tq*Hq, D] int8, [Tq*Hq, 1]
        # float32 sums of these integers stay below 2^24 (D * 127^2): exact, whatever einsum's order
        q, qfactor = qc.reshape(q.shape).astype(np.float32), (qs * scale).reshape(tq, hq)   # [Tq, Hq, D], [Tq, Hq]
    else:
        kscale = np.ones(k.shape[:2], np.float32)
        qfactor = np.full((tq, hq), scale, np.float32)
    v = np.asarray(v, np.float32)                               # an int8 cache's values, dequantised
    out = np.empty_like(q)                                      # [Tq, Hq, D]
    for s in range(0, tq, 128):
        qb, qp = q[s:s + 128], q_pos[s:s + 128]                 # [b, Hq, D], [b]
        sel = np.nonzero((k_pos > qp.min() - window) & (k_pos <= qp.max()))[0]
        sel = sel[np.argsort(k_pos[sel], kind="stable")]        # by position: a ring's slot order wraps
        kb, vb, kp, ks = k[sel], v[sel], k_pos[sel], kscale[sel]  # [t, Hkv, D], [t, Hkv]
        qg = qb.reshape(len(qb), hkv, g, d)                     # [b, Hkv, g, D]
        qf = qfactor[s:s + 128].reshape(len(qb), hkv, g).transpose(1, 2, 0)[..., None]  # [Hkv, g, b, 1]
        scores = np.einsum("bhgd,thd->hgbt", qg, kb) * qf * ks.T[:, None, None, :]  # [Hkv, g, b, t]
        visible = (kp[None, :] > qp[:, None] - window) & (kp[None, :] <= qp[:, None])  # [b, t]
        scores = np.where(visible, scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        p = np.exp(scores)
        # Sums over keys run left to right in position order (np.cumsum; BLAS and np.sum block theirs by the
        # array's length), so the keys another query of the call brings in, masked to exact zeros, change no
        # rounding: a query's result is the same whatever the call (a speculative pass, a batch, a stream's
        # chunking) and whatever ring the keys sit in.
        p /= np.cumsum(p, -1)[..., -1:]
        ob = np.zeros((hkv, g, len(qb), d), np.float32)         # [Hkv, g, b, D]
        for t0 in range(0, len(sel), 16):
            terms = p[..., t0:t0 + 16, None] * vb[t0:t0 + 16].transpose(1, 0, 2)[:, None, None]  # [Hkv, g, b, 16, D]
            ob = np.cumsum(np.concatenate([ob[..., None, :], terms], axis=-2), axis=-2)[..., -1, :]
        out[s:s + 128] = ob.transpose(2, 0, 1, 3).reshape(len(qb), hq, d)
    return out


def interleaved_to_split_half(x):
    """Mistral's consolidated checkpoint lays q/k rows out for RoPE on adjacent pairs (2i, 2i+1); HF's
    converter permutes the rows to (i, i + hd/2). Permuting the projection's OUTPUT columns the same way
    is exact and costs no copy of the weights: [T, H, hd] -> [T, H, hd]."""
    t, h, hd = x.shape
    return x.reshape(t, h, hd // 2, 2).transpose(0, 1, 3, 2).reshape(t, h, hd)


def rope_np(x, cos, sin, interleaved=False):
    """Split-half ("NeoX") rotary embedding, HF's layout: the pair (i, i + hd/2) rotates by angle i.
    x [T, H, hd] (its pairs adjacent if `interleaved`, Mistral's layout); cos, sin [T, hd/2] -> [T, H, hd]
    in split-half layout."""
    if interleaved:
        x = interleaved_to_split_half(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                                    # [T, H, hd/2] each
    c, s = cos[:, None, :], sin[:, None, :]                                  # [T, 1, hd/2]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)       # [T, H, hd]


def rms_norm_np(x, w, eps):
    """w * x / sqrt(mean(x^2) + eps) over the last axis, in float32 (HF's RMSNorm)."""
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)))


def silu_mul_np(a, b):
    """SwiGLU gate: silu(a) * b."""
    return a / (np.float32(1.0) + np.exp(-a)) * b


def gelu(x):
    """Exact (erf) GELU, as HF uses in the conv stem, adapter and AdaRMSNorm MLP."""
    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(np.float32)


# --- dispatch -------------------------------------------------------------------------------------------
def linear(x, w, b=None):
    c, precision = _c(), _precision.get()
    return c.linear(x, w, b, precision) if c else linear_np(x, w, b, precision)


def attention(q, k, v, q_pos, k_pos, window):
    c = _c()
    return c.attention(q, k, v, q_pos, k_pos, window) if c else attention_np(q, k, v, q_pos, k_pos, window)


def fused_layers():
    """Whether the backend runs whole transformer layers in one call (`layers`)."""
    return _c() is not None


def layers(h, pos, seq_rows, ws, n_heads, n_kv_heads, head_dim, window, eps, interleaved, cos, sin, adas, caches):
    """Whole encoder or decoder layers in one call (C backend: ckernels.layers, bit for bit the readable
    layers in stages/), or None where it does not apply; see stages/attention.fused_layers."""
    c = _c()
    return c.layers(h, pos, seq_rows, ws, n_heads, n_kv_heads, head_dim, window, eps, interleaved, cos, sin, adas,
                    caches, _kv.get(), _precision.get()) if c else None


def rope(x, cos, sin, interleaved=False):
    c = _c()
    return c.rope(x, cos, sin, interleaved) if c else rope_np(x, cos, sin, interleaved)


def rms_norm(x, w, eps):
    c = _c()
    return c.rms_norm(x, w, eps) if c else rms_norm_np(x, w, eps)


def silu_mul(a, b):
    c = _c()
    return c.silu_mul(a, b) if c else silu_mul_np(a, b)


def quantize(w, fmt):
    """A weight matrix -> quant.QTensor in format "int8" or "q4"."""
    c = _c()
    return c.quantize(w, fmt) if c else quant.quantize_np(w, fmt)

