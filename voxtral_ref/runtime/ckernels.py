"""The C kernels (csrc/, compiled by cffi into voxtral_ref._kernels) behind the same signatures as the
NumPy twins in kernels.py. Model code never imports this module directly: `kernels.use("c")` routes
calls here.

Weights are passed by pointer, never copied: float32, `ml_dtypes.bfloat16` (read-only views into the
mmap'd checkpoint are fine) or `quant.QTensor` (int8 / q4 panels, with int8 activations). Activations are
float32 otherwise, so results equal the twins to float32 rounding.

Environment: VOXTRAL_REF_THREADS=n sets the thread count (default: one per available core);
VOXTRAL_REF_ISA=scalar|avx2|avxvnni|avx512|avx512bf16|avx512amx caps the instruction set (default: the best the CPU has), as
`set_threads` / `set_isa` do at run time.

If the extension was not built, importing still works: `available()` is False and the kernels fall back
to the NumPy twins with a single warning.
"""

import contextlib
import os
import warnings

import ml_dtypes
import numpy as np

from . import kernels, quant

try:
    from .._kernels import ffi, lib
except ImportError:  # not built (e.g. a source checkout without `pip install .`)
    ffi = lib = None

ISA_LEVELS = ("scalar", "avx2", "avxvnni", "avx512", "avx512bf16", "avx512amx")
ISA_VW = {"scalar": 1, "avx2": 8, "avxvnni": 8, "avx512": 16, "avx512bf16": 16, "avx512amx": 16}    # floats per vector (simd.h VW)
_WTYPES = {np.dtype(np.float32): 0, np.dtype(ml_dtypes.bfloat16): 1}                          # csrc/kernels.h
_XTYPES = {"f32": 0, "bf16": 1}                                                              # csrc/kernels.h
_warned = False
MAX_THREADS_PER_CORE = 4


def available():
    return lib is not None


def _missing():
    global _warned
    if not _warned:
        warnings.warn("the C kernels are not built (voxtral_ref._kernels missing): using the NumPy twins",
                      stacklevel=3)
        _warned = True


# --- configuration --------------------------------------------------------------------------------------
def set_threads(n):
    """Threads for every kernel; n <= 0 restores the default (one per available core). More than
    MAX_THREADS_PER_CORE per available core is capped, with a warning: each is a thread the process keeps
    (csrc/pool.c), tens of thousands exhaust it, and beyond the cores they only add contention."""
    if lib is None:
        return
    n, cap = int(n) if n and n > 0 else _default_threads(), MAX_THREADS_PER_CORE * _default_threads()
    if n > cap:
        warnings.warn(f"{n} threads capped at {cap} ({MAX_THREADS_PER_CORE} per available core)")
    lib.vx_set_threads(min(n, cap))


def get_threads():
    return lib.vx_get_threads() if lib is not None else 1


class CoreShare:
    """The kernels' threads shared by two threads of one job, sides 0 and 1 (runtime/stream.py: a file's
    decoder and its encoder running ahead): while both work, side 0's regions take `first` threads and side
    1's the rest; while one side waits, the other's take them all. Each side says when it starts and stops
    working (`working`) and runs its kernels inside `side(i)` (vx_follow_cap). The two sides run at once only
    while at most one of them takes more than one thread: the team serves one region at a time (pool.c)."""

    def __init__(self, first):
        n = get_threads()
        if not 1 <= first < n:
            raise ValueError(f"a share of {first} of {n} threads leaves the other side none")
        self._all, self._both = n, (first, n - first)
        # [side]: the threads its regions take now; each side writes only the other's
        self._caps = ffi.new("int[2]", [n, n])

    @contextlib.contextmanager
    def side(self, i):
        lib.vx_follow_cap(self._caps + i)
        try:
            yield
        finally:
            lib.vx_follow_cap(ffi.NULL)

    @contextlib.contextmanager
    def working(self, i):
        """Side i works inside: the other side's regions meanwhile take only their share."""
        self._caps[1 - i] = self._both[1 - i]
        try:
            yield
        finally:
            self._caps[1 - i] = self._all


def weight_seconds():
    """Seconds spent inside the weight-streaming linears (vx_linear, vx_qlinear) since load: benchmarks
    subtract it from a step's time to get what runs outside them."""
    return lib.vx_kernel_seconds(lib.VX_TIME_WEIGHTS)


def attention_seconds():
    """Seconds spent inside attention (vx_attention; in a one-call layer, its KV stores and its sequences'
    attention) since load: what of a step's time outside the linears is reading the KV caches."""
    return lib.vx_kernel_seconds(lib.VX_TIME_ATTENTION)


def set_isa(name):
    """Cap the instruction set (one of ISA_LEVELS; the highest level this CPU supports at or below it is used).
    Returns the level now in use. Used by the tests to exercise every path on one machine."""
    if name not in ISA_LEVELS:
        raise ValueError(f"unknown ISA level {name!r}: choose one of {', '.join(ISA_LEVELS)}")
    if lib is None:
        return "numpy"
    return ISA_LEVELS[lib.vx_set_isa(ISA_LEVELS.index(name))]


def get_isa():
    return ISA_LEVELS[lib.vx_get_isa()] if lib is not None else "numpy"


def supported_isas():
    """The levels this CPU can run, lowest first."""
    return [name for i, name in enumerate(ISA_LEVELS) if lib.vx_isa_supported(i)] if lib is not None else []


def info():
    """One line for `voxtral-ref info`: the ISA path and threads in use."""
    if lib is None:
        return "C kernels: not built (NumPy fallback)"
    level = lib.vx_get_isa()
    detail = ffi.string(lib.vx_isa_detail(level)).decode()
    return (f"C kernels: {ISA_LEVELS[level]} ({detail}; float32 accumulation), {get_threads()} thread(s); "
            f"CPU supports {', '.join(supported_isas())}")


def _default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- kernels --------------------------------------------------------------------------------------------
def _ptr(ctype, a):
    """a C-contiguous array as a `ctype` argument. ffi.from_buffer, not a.ctypes.data: a live step makes
    some 2700 of these calls, and ctypes costs 1.2 us each against 0.15 us (3 ms per step)."""
    return ffi.from_buffer(_ARRAY_TYPES[ctype], a)


_ARRAY_TYPES = {"float *": "float[]", "void *": "char[]", "uint8_t *": "uint8_t[]", "int8_t *": "int8_t[]",
                "int32_t *": "int32_t[]", "int64_t *": "int64_t[]"}


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def linear(x, w, b=None, precision="f32"):
    """x [..., K] @ w[M, K].T (+ b[M]) -> [..., M] float32, x first rounded to bf16 if precision is
    "bf16"; with a quant.QTensor weight x is quantised to int8 instead. See kernels.linear_np."""
    if lib is None:
        _missing()
        return kernels.linear_np(x, w, b, precision)
    if not isinstance(w, quant.QTensor) and (np.dtype(w.dtype) not in _WTYPES or not w.flags.c_contiguous):
        w = _f32(w)                      # unusual dtype or layout: one float32 copy
    if w.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D [M, K], got shape {w.shape}")
    m, k = w.shape
    x = _f32(x)
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(x.size // k if k else int(np.prod(lead)), k)
    y = np.empty(lead + (m,), np.float32)
    bias = None if b is None else _f32(b)
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"linear: bias shape {bias.shape} does not match {m} outputs")
    bias_ptr = ffi.NULL if bias is None else _ptr("float *", bias)
    if isinstance(w, quant.QTensor):
        lib.vx_qlinear(_ptr("float *", x2), x2.shape[0], k, _ptr("uint8_t *", w.data), _QFORMATS[w.fmt], m, bias_ptr,
                       _ptr("float *", y))
    else:
        lib.vx_linear(_ptr("float *", x2), x2.shape[0], k, _XTYPES[precision], _ptr("void *", w),
                      _WTYPES[np.dtype(w.dtype)], m, bias_ptr, _ptr("float *", y))
    return y


_QFORMATS = {"int8": 0, "q4": 1}                                                             # csrc/kernels.h


def quantize_act(x, block=quant.BLOCK):
    """(xq, sx, xsum) for x [n, K]: bit for bit quant.quantize_act_np."""
    if lib is None:
        _missing()
        return quant.quantize_act_np(x, block)
    x = _f32(x)
    n, k = x.shape
    if block <= 0 or k % block:
        raise ValueError(f"quantize_act: width {k} is not a multiple of the block {block}")
    xq, sx, xsum = np.empty((n, k), np.int8), np.empty((n, k // block), np.float32), np.empty((n, k // block), np.int32)
    lib.vx_quantize_act(_ptr("float *", x), n, k, block, _ptr("int8_t *", xq), _ptr("float *", sx),
                        _ptr("int32_t *", xsum))
    return xq, sx, xsum


def quantize(w, fmt):
    """w [M, K] float32 / bfloat16 (read in place) -> quant.QTensor, bit for bit quant.quantize_np."""
    if lib is None:
        _missing()
        return quant.quantize_np(w, fmt)
    if np.dtype(w.dtype) not in _WTYPES or not w.flags.c_contiguous:
        w = _f32(w)
    m, k = quant.check_shape(w.shape, fmt)
    out = kernels.lazy_zeros((quant.n_panels(m), quant.panel_bytes(fmt, k)), np.uint8, huge=True)
    lib.vx_quantize_weights(_ptr("void *", w), _WTYPES[np.dtype(w.dtype)], m, k, _QFORMATS[fmt], _ptr("uint8_t *", out))
    return quant.QTensor(fmt, out, (m, k))


def attention(q, k, v, q_pos, k_pos, window):
    """Sliding-window causal GQA attention; see kernels.attention_np. k and v: float32, or kernels.KV8 (an
    int8 cache, read in place)."""
    if lib is None:
        _missing()
        return kernels.attention_np(q, k, v, q_pos, k_pos, window)
    q = _f32(q)
    int8 = isinstance(k, kernels.KV8)
    if int8 != isinstance(v, kernels.KV8):
        raise ValueError("attention: keys and values must be both float32 or both int8 (KV8)")
    if not int8:
        k, v = _f32(k), _f32(v)
    q_pos, k_pos = np.ascontiguousarray(q_pos, np.int64), np.ascontiguousarray(k_pos, np.int64)
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if k.shape != v.shape or k.shape[2] != d or hq % hkv or q_pos.shape != (tq,) or k_pos.shape != (tk,):
        raise ValueError(f"attention: bad shapes q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"q_pos {q_pos.shape}, k_pos {k_pos.shape}")
    # The kernel compares positions as float32 offsets from each query block; keep them exact.
    if tq and int(q_pos.max()) - int(q_pos.min()) + int(window) >= 1 << 23:
        return kernels.attention_np(q, k, v, q_pos, k_pos, window)
    if int8:                                         # the codes in their blocks, as the kernel reads them
        k, ks = np.ascontiguousarray(k.blocks), np.ascontiguousarray(k.scale)
        v, vs = np.ascontiguousarray(v.blocks), np.ascontiguousarray(v.scale)
    out = np.empty_like(q)
    if tq and tk:
        lib.vx_attention(_ptr("float *", q), _ptr("void *", k), _ptr("void *", v),
                         _ptr("float *", ks) if int8 else ffi.NULL, _ptr("float *", vs) if int8 else ffi.NULL,
                         _KV_INT8 if int8 else _KV_F32, _ptr("float *", out), tq, tk, hq, hkv, d,
                         _ptr("int64_t *", q_pos), _ptr("int64_t *", k_pos), int(window))
    else:
        out.fill(np.nan)                 # no keys at all: the twin's softmax over nothing
    return out


_KV_F32, _KV_INT8 = 0, 1                                                                     # csrc/kernels.h


def attention_scores(qc, kc):
    """The active level's integer scores over an int8 cache (what attention uses): qc [rows, d] int8 codes .
    kc [keys, d] int8 codes -> [rows, keys] int32; None where the level sums the codes in float32 instead.
    Its twin is the exact integer product qc @ kc.T."""
    if lib is None:                      # no C library: attention runs its NumPy twin, which has no such kernel
        return None
    qc, kc = np.ascontiguousarray(qc, np.int8), np.ascontiguousarray(kc, np.int8)
    (rows, d), (keys, dk) = qc.shape, kc.shape
    if d != dk or d % 64 or d > 256 or keys % 16:
        raise ValueError(f"attention_scores: d must match and be a multiple of 64 up to 256 and keys of 16, "
                         f"got q {qc.shape}, k {kc.shape}")
    s = np.empty((rows, keys), np.int32)
    return s if lib.vx_attention_idots(_ptr("int8_t *", qc), rows, _ptr("int8_t *", kc), keys, d, _ptr("int32_t *", s)) else None


def rope(x, cos, sin, interleaved=False):
    """Rotary embedding into split-half layout; see kernels.rope_np."""
    if lib is None:
        _missing()
        return kernels.rope_np(x, cos, sin, interleaved)
    x, cos, sin = _f32(x), _f32(cos), _f32(sin)
    t, h, d = x.shape
    if d % 2 or cos.shape != (t, d // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: bad shapes x {x.shape}, cos {cos.shape}, sin {sin.shape}")
    y = np.empty_like(x)
    lib.vx_rope(_ptr("float *", x), _ptr("float *", cos), _ptr("float *", sin), _ptr("float *", y), t, h, d,
                int(bool(interleaved)))
    return y


def rms_norm(x, w, eps):
    """w * x / sqrt(mean(x^2) + eps) over the last axis; see kernels.rms_norm_np."""
    if lib is None:
        _missing()
        return kernels.rms_norm_np(x, w, eps)
    x, w = _f32(x), _f32(w)
    d = x.shape[-1]
    if w.shape != (d,):
        raise ValueError(f"rms_norm: weight shape {w.shape} does not match {d} features")
    y = np.empty_like(x)
    lib.vx_rms_norm(_ptr("float *", x), _ptr("float *", w), float(eps), _ptr("float *", y), x.size // max(d, 1), d)
    return y


def silu_mul(a, b):
    """silu(a) * b elementwise; see kernels.silu_mul_np."""
    if lib is None:
        _missing()
        return kernels.silu_mul_np(a, b)
    a, b = _f32(a), _f32(b)
    if a.shape != b.shape:
        a, b = (_f32(t) for t in np.broadcast_arrays(a, b))
    y = np.empty_like(a)
    lib.vx_silu_mul(_ptr("float *", a), _ptr("float *", b), _ptr("float *", y), a.size)
    return y


def layers(h, pos, seq_rows, ws, n_heads, n_kv_heads, head_dim, window, eps, interleaved, cos, sin, adas, caches, kv,
           precision):
    """Layers ws[0], ws[1], ... (the encoder's or the decoder's) in turn in one C call (csrc/layer.c): h [T, dim]
    at positions pos [T] -> [T, dim], bit for bit what the readable layers compute (stages/encoder.encoder_layer,
    decoder.decoder_layer) with these kernels. The rows stack the sequences of seq_rows (rows each); caches[i]:
    layer i's stages.attention.KVCache per sequence (one sequence may have None: a whole sequence at once).
    ws: the layers' tensors (checkpoint.weights.Layer); cos, sin [T, head_dim / 2]; adas [n_layers, T, dim]
    or None; kv: the KV format. None if a tensor is of a kind the call does not take (the caller then runs
    the readable layers)."""
    descs = []
    for w in ws:
        if getattr(w, "_vx", None) is None:
            w._vx = _describe_layer(w, n_heads, n_kv_heads, head_dim, window, eps, interleaved)
        if w._vx is False:
            return None
        descs.append(w._vx[0])
    out = np.array(h, dtype=np.float32, order="C")                   # [T, dim], updated in place
    pos, cos, sin = np.ascontiguousarray(pos, np.int64), _f32(cos), _f32(sin)
    adas = None if adas is None else _f32(adas)
    held = [c for layer_caches in caches for c in layer_caches]      # [n_layers * nseq], layer-major
    rings = [_ring(c, kv) for c in held]                             # each cache's own struct
    for r, c in zip(rings, held):
        r.filled = c.filled if c is not None else 0
    lib.vx_layers_forward(ffi.new("vx_layer *[]", descs), len(descs), _ptr("float *", out), len(pos),
                          _ptr("int64_t *", pos), _ptr("float *", cos), _ptr("float *", sin),
                          ffi.NULL if adas is None else _ptr("float *", adas), _XTYPES[precision], len(seq_rows),
                          _ptr("int64_t *", np.asarray(seq_rows, np.int64)), ffi.new("vx_kv_ring *[]", rings))
    for r, c in zip(rings, held):
        if c is not None:
            c.filled = int(r.filled)
    return out


_QMATS = {"int8": 2, "q4": 3}                                          # csrc/kernels.h VX_MAT_* (past _WTYPES')


def _describe_layer(w, n_heads, n_kv_heads, head_dim, window, eps, interleaved):
    """(cffi vx_layer, the buffers it points into), or False if a matrix is neither float32 / bf16 rows
    nor quantised panels."""
    keep = []

    def buf(ctype, a):
        keep.append(_ptr(ctype, a))
        return keep[-1]

    d = ffi.new("vx_layer *")
    for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2"):
        t, m = w[name], getattr(d, name)
        if isinstance(t, quant.QTensor):
            m.data, m.kind = buf("uint8_t *", t.data), _QMATS[t.fmt]
        elif np.dtype(t.dtype) in _WTYPES and t.flags.c_contiguous and t.ndim == 2:
            m.data, m.kind = buf("void *", t), _WTYPES[np.dtype(t.dtype)]
        else:
            return False
        m.m, m.k = t.shape
    for name in ("attention_norm", "ffn_norm"):
        setattr(d, name, buf("float *", _f32(w[name])))
    for name in ("bq", "bv", "bo", "b2"):
        setattr(d, name, buf("float *", _f32(w[name])) if name in w else ffi.NULL)
    d.dim, d.n_heads, d.n_kv_heads, d.head_dim = w["wo"].shape[0], n_heads, n_kv_heads, head_dim
    d.interleaved, d.window, d.eps = int(bool(interleaved)), int(window), float(eps)
    return d, keep


def _ring(cache, kv):
    """The cffi vx_kv_ring of a KVCache (made once, kept on it: its arrays never move), or an empty one."""
    if cache is None:
        r = ffi.new("vx_kv_ring *")
        r.kvtype = _KV_INT8 if kv == "int8" else _KV_F32
        return r
    if getattr(cache, "_vx", None) is None:
        r = ffi.new("vx_kv_ring *")
        int8 = isinstance(cache.k, kernels.KV8)
        keep = [_ptr("void *", cache.k.blocks if int8 else cache.k), _ptr("void *", cache.v.blocks if int8 else cache.v),
                _ptr("int64_t *", cache.pos)]
        r.k, r.v, r.pos = keep
        if int8:
            keep += [_ptr("float *", cache.k.scale), _ptr("float *", cache.v.scale)]
            r.k_scale, r.v_scale = keep[3:]
        r.capacity, r.kvtype = cache.capacity, _KV_INT8 if int8 else _KV_F32
        cache._vx = (r, keep)
    return cache._vx[0]


def _configure_from_env():
    threads, isa = os.environ.get("VOXTRAL_REF_THREADS", ""), os.environ.get("VOXTRAL_REF_ISA", "")
    try:
        n = int(threads) if threads else 0                         # unset: set_threads' default
    except ValueError:
        n = -1
    if threads and n < 1:                                          # as --threads refuses it
        warnings.warn(f"ignoring VOXTRAL_REF_THREADS={threads!r}: not a whole number of at least 1")
        n = 0
    set_threads(n)
    try:
        set_isa(isa or ISA_LEVELS[-1])
    except ValueError as e:
        warnings.warn(f"ignoring VOXTRAL_REF_ISA: {e}")


if lib is not None:
    _configure_from_env()
