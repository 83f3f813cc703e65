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
  attention  q [Tq, Hq, D], k/v [Tk, Hkv, D] f32, q_pos [Tq] / k_pos [Tk] int absolute positions -> [Tq, Hq, D]
  rope       x [T, H, D] f32, cos/sin [T, D/2] f32 -> [T, H, D] (split-half layout)
"""

import contextlib
import contextvars

import ml_dtypes
import numpy as np
from scipy.special import erf

from . import quant

BACKENDS = ("numpy", "c")
PRECISIONS = ("f32", "bf16")
_backend = contextvars.ContextVar("voxtral_ref_backend", default="numpy")
_precision = contextvars.ContextVar("voxtral_ref_precision", default="f32")
_kv = contextvars.ContextVar("voxtral_ref_kv", default="f32")
KV_DTYPES = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}


@contextlib.contextmanager
def use(backend, precision="f32", kv="f32"):
    """Run the enclosed calls on `backend` ("numpy" or "c") with matmul inputs in `precision`, and attention
    keys and values kept in `kv` ("f32", or "bf16": the compact caches of the quantised modes, half the
    bytes a step reads; keys and values rounded to bfloat16 whether cached or not, so a stream and a whole
    file see the same values)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    tokens = _backend.set(backend), _precision.set(precision), _kv.set(kv)
    try:
        yield
    finally:
        _backend.reset(tokens[0])
        _precision.reset(tokens[1])
        _kv.reset(tokens[2])


def kv_dtype():
    """The dtype attention keys and values are kept in (see `use`)."""
    return KV_DTYPES[_kv.get()]


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
    memory stays O(block * window) however long the sequence."""
    k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)  # a bf16 cache's values, widened exactly
    tq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv                                               # query heads per kv head
    out = np.empty_like(q)                                      # [Tq, Hq, D]
    scale = np.float32(1.0 / np.sqrt(d))
    for s in range(0, tq, 128):
        qb, qp = q[s:s + 128], q_pos[s:s + 128]                 # [b, Hq, D], [b]
        sel = np.nonzero((k_pos > qp.min() - window) & (k_pos <= qp.max()))[0]
        kb, vb, kp = k[sel], v[sel], k_pos[sel]                 # [t, Hkv, D]
        qg = qb.reshape(len(qb), hkv, g, d)                     # [b, Hkv, g, D]
        scores = np.einsum("bhgd,thd->hgbt", qg, kb) * scale    # [Hkv, g, b, t]
        visible = (kp[None, :] > qp[:, None] - window) & (kp[None, :] <= qp[:, None])  # [b, t]
        scores = np.where(visible, scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(-1, keepdims=True)
        ob = np.einsum("hgbt,thd->bhgd", p, vb)                 # [b, Hkv, g, D]
        out[s:s + 128] = ob.reshape(len(qb), hq, d)
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

