"""Every C kernel against its NumPy twin (voxtral_ref/runtime/kernels.py), on every ISA level this CPU can run
(the level is capped with ckernels.set_isa, so the scalar and AVX2 paths are tested on an AVX-512
machine too), with hypothesis-drawn shapes: one row, odd sizes, non-multiples of the SIMD width, the
GEMV / GEMM switch, window edges, GQA ratios, keys in any order.

Tolerances: a float32 dot product of length K may differ from another summation order by a few ulps of
sum |x_k w_k|, so linear is compared relative to that row scale; attention outputs are convex
combinations of value rows, so they are compared relative to max |v|."""

import contextlib
import os
import threading
import time
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxtral_ref.runtime import ckernels as ck
from voxtral_ref.runtime import kernels, quant

pytestmark = pytest.mark.skipif(not ck.available(), reason="C kernels not built (pip install . builds them)")

ISAS = [pytest.param(level, marks=pytest.mark.skipif(level not in ck.supported_isas(), reason=f"CPU lacks {level}"))
        for level in ck.ISA_LEVELS]
FAST = settings(max_examples=60, deadline=None)
WTYPES = ["f32", "bf16"]


@contextlib.contextmanager
def isa(level):
    before = ck.get_isa()
    assert ck.set_isa(level) == level
    try:
        yield
    finally:
        ck.set_isa(before)


@contextlib.contextmanager
def threads(n):
    before = ck.get_threads()
    ck.set_threads(n)
    try:
        yield
    finally:
        ck.set_threads(before)


def weight(rng, m, k, wtype):
    w = rng.standard_normal((m, k), dtype=np.float32)
    return w.astype(ml_dtypes.bfloat16) if wtype == "bf16" else w


def assert_linear_close(x, w, b, precision="f32"):
    y = ck.linear(x, w, b, precision)
    ref = kernels.linear_np(x, w, b, precision)
    wf = np.asarray(w, dtype=np.float32)
    scale = np.abs(x) @ np.abs(wf).T + (0 if b is None else np.abs(b))      # [N, M] row scale of each dot
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_array_less(np.abs(y - ref), 1e-5 * scale + 1e-30)


# --- linear ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ISAS)
@FAST
@given(n=st.one_of(st.integers(1, 6), st.integers(7, 40)), k=st.integers(1, 300), m=st.integers(1, 90),
       wtype=st.sampled_from(WTYPES), precision=st.sampled_from(kernels.PRECISIONS), bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_linear_matches_twin(level, n, k, m, wtype, precision, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(m, dtype=np.float32) if bias else None
    with isa(level):
        assert_linear_close(x, weight(rng, m, k, wtype), b, precision)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_linear_many_rows(level, wtype, precision):
    """More activation rows than the GEMM packs at once (1024), odd sizes everywhere."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1100, 37), dtype=np.float32)
    with isa(level):
        assert_linear_close(x, weight(rng, 45, 37, wtype), rng.standard_normal(45, dtype=np.float32), precision)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("precision", kernels.PRECISIONS)
@pytest.mark.parametrize("n", [1, 4, 5, 29])
def test_linear_long_rows(level, wtype, precision, n):
    """K past one GEMM k-block (1024) and not a multiple of it (odd, so the last bf16 pair is half
    empty); rows past one GEMM column block."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 1101), dtype=np.float32)
    with isa(level):
        assert_linear_close(x, weight(rng, 600, 1101, wtype), rng.standard_normal(600, dtype=np.float32),
                            precision)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_linear_gemv_long_rows(level, wtype, n):
    """Long GEMV rows (7000 inputs, like the decoder's 9216-wide w2), not a multiple of the vector width."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 7000), dtype=np.float32)
    with isa(level):
        assert_linear_close(x, weight(rng, 37, 7000, wtype), rng.standard_normal(37, dtype=np.float32))


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_linear_gemv_rows_do_not_depend_on_the_rows(level, wtype, precision):
    """The GEMV (1-4 rows) sums each row in one order whatever the rows and threads: a pass of a position and
    its drafts gives each row bit for bit what it gets alone (Model.rows_exact). Widths not a multiple of
    the vector, output counts not a multiple of the weight rows sharing an x load."""
    rng = np.random.default_rng(5)
    for k, m in ((3072, 64), (1101, 37), (7000, 5)):
        w, x = weight(rng, m, k, wtype), rng.standard_normal((4, k), dtype=np.float32)
        with isa(level):
            with threads(1):
                alone = [ck.linear(x[i:i + 1], w, None, precision)[0] for i in range(4)]
            for n in (2, 3, 4):
                y = ck.linear(x[:n], w, None, precision)
                for i in range(n):
                    np.testing.assert_array_equal(y[i], alone[i])


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("n", [3, 40])
@pytest.mark.parametrize("wdtype", [np.float32, ml_dtypes.bfloat16])
def test_bf16_precision_rounds_x_like_ml_dtypes(level, n, wdtype):
    """With an identity weight, y is the rounded x itself: ties go to even, carries ripple into the
    exponent, signs and NaN survive, in the GEMV (n <= 4) and both GEMMs (bf16 dot products for bf16
    weights). Subnormal x is left out: the dot-product instruction flushes it to zero (DAZ), a difference
    of < 1e-38 that no model tensor can notice."""
    one, ulp = np.float32(1.0), np.float32(2.0 ** -8)
    special = np.array([one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2), np.float32(1.9980469) + ulp / 4,
                        np.float32(255.5), np.float32(3e38), np.float32(-7.1e-30), 0.0, -0.0], np.float32)
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 64), dtype=np.float32) * np.float32(10.0) ** rng.integers(-20, 20, (n, 64))).astype(np.float32)
    x[0, :len(special)] = special
    eye = np.eye(64, dtype=np.float32).astype(wdtype)
    with isa(level):
        y = ck.linear(x, eye, precision="bf16")
    np.testing.assert_array_equal(y, kernels.round_bf16(x))
    x[1, 5] = np.nan
    with isa(level):
        assert np.isnan(ck.linear(x, eye, precision="bf16")[1, 5])


def test_linear_reads_readonly_bf16_views_and_any_leading_shape():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((33, 70), dtype=np.float32).astype(ml_dtypes.bfloat16).tobytes()
    w = np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(33, 70)          # read-only, like the mmap
    assert not w.flags.writeable
    x = rng.standard_normal((2, 3, 70), dtype=np.float32)
    y = ck.linear(x, w)
    assert y.shape == (2, 3, 33)
    np.testing.assert_allclose(y, kernels.linear_np(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ck.linear(x[0, 0], w), kernels.linear_np(x[0, 0], w), rtol=1e-5, atol=1e-5)


def test_linear_other_weight_dtypes_are_values():
    """A plain int8 / float16 / float64 array is a weight like any other (converted), not a quantised one."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16), dtype=np.float32)
    for w in (rng.integers(-5, 5, (7, 16)).astype(np.int8), rng.standard_normal((7, 16)).astype(np.float16),
              rng.standard_normal((7, 16)), rng.standard_normal((16, 7), dtype=np.float32).T):
        np.testing.assert_allclose(ck.linear(x, w), kernels.linear_np(x, w).astype(np.float32), rtol=1e-5, atol=1e-5)


def test_linear_empty_inputs():
    w = np.ones((4, 3), np.float32)
    assert ck.linear(np.zeros((0, 3), np.float32), w).shape == (0, 4)
    np.testing.assert_array_equal(ck.linear(np.zeros((2, 0), np.float32), np.zeros((4, 0), np.float32),
                                            np.arange(4, dtype=np.float32)), [[0, 1, 2, 3]] * 2)


# --- quantised weights (runtime/quant.py) ------------------------------------------------------------------
QFORMATS = list(quant.FORMATS)
QWIDTHS = [32, 96, 256, 512, 768]          # one block; the tiny model's odd widths; one and several super-blocks


def quant_weight(rng, m, k, heavy=False):
    """Gaussian rows, or heavy-tailed ones (Student t, 3 degrees of freedom: real weights have outliers),
    with an all-zero block and a row of exact ties for the rounding."""
    w = (rng.standard_t(3, (m, k)) if heavy else rng.standard_normal((m, k))).astype(np.float32) * rng.uniform(1e-3, 10)
    w[0, :32] = 0
    if m > 1:
        w[1] = np.resize(np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 126.5], np.float32), k)
    return w


@pytest.mark.parametrize("level", ISAS)
@FAST
@given(m=st.integers(1, 40), k=st.sampled_from(QWIDTHS), fmt=st.sampled_from(QFORMATS), bf16=st.booleans(),
       heavy=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_quantize_weights_is_bit_exact_with_twin(level, m, k, fmt, bf16, heavy, seed):
    """Every byte of the panels (codes, float16 scales, nibbles) equals the twin's, at every ISA level; the
    rows past m of the last panel are zero."""
    w = quant_weight(np.random.default_rng(seed), m, k, heavy)
    if bf16:
        w = w.astype(ml_dtypes.bfloat16)
    with isa(level):
        a = ck.quantize(w, fmt)
    b = quant.quantize_np(w, fmt)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.shape == (m, k) and a.nbytes == quant.n_panels(m) * quant.panel_bytes(fmt, k)


@pytest.mark.parametrize("level", ISAS)
@FAST
@given(n=st.integers(1, 20), k=st.sampled_from(QWIDTHS), row_block=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_quantize_act_is_bit_exact_with_twin(level, n, k, row_block, seed):
    """Blocks of 32 (the linears) or one block per row (attention's int8 keys, values and queries)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k), dtype=np.float32) * np.float32(10.0) ** rng.integers(-3, 3, (n, 1))
    x[0, :32] = 0
    x[-1, -8:] = [0.5, 1.5, -2.5, 127, -127, 3.5, 0, 1]                    # ties (with the block max 127: scale 1)
    block = k if row_block else quant.BLOCK
    with isa(level):
        got = ck.quantize_act(x, block)
    for a, b in zip(got, quant.quantize_act_np(x, block)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("block", [8, 16, 24, 48, 64, 80])
def test_quantize_act_any_block_is_bit_exact_with_twin(level, block):
    """Block widths off and on the 16-float vector (the avx512 levels take multiples of 16 in 512-bit steps)."""
    rng = np.random.default_rng(block)
    x = rng.standard_normal((3, 960), dtype=np.float32) * np.float32(7.0)
    x[1, :block] = 0
    x[2, :4] = [63.5, -0.5, 1.5, 127]                                        # ties, rounded to even
    with isa(level):
        got = ck.quantize_act(x, block)
    for a, b in zip(got, quant.quantize_act_np(x, block)):
        np.testing.assert_array_equal(a, b)


def test_quantised_round_trip_error():
    """int8: within half a step of the float16 scale; q4: within half a step plus the 6-bit coding of
    scale and offset, and on average better than the plain min-max grid (the fit's purpose)."""
    rng = np.random.default_rng(0)
    w = quant_weight(rng, 64, 512)
    a = quant.quantize_np(w, "int8")
    s, _, _ = quant._panel_terms("int8", a.data[0], 512)                     # [16, K/32] float32 scales
    assert np.all(np.abs(a.dequantize()[:16] - w[:16]) <= np.repeat(s, 32, axis=1) * 0.501)
    g = rng.standard_normal((4096, 32)).astype(np.float32)
    lo, hi = np.minimum(g.min(1), 0), g.max(1)
    plain = quant._block_error(g, (hi - lo) / np.float32(15), -lo)
    fitted = quant._block_error(g, *quant._fit_blocks(g))
    assert np.all(fitted <= plain) and fitted.mean() < 0.92 * plain.mean()


def assert_qlinear_close(x, qt, b):
    y = ck.linear(x, qt, b)
    ref = quant.qlinear_np(x, qt, b)
    scale = np.abs(x) @ np.abs(qt.dequantize()).T + (0 if b is None else np.abs(b))
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_array_less(np.abs(y - ref), 2e-6 * scale + 1e-30)     # float32 sums of exact int dots


@pytest.mark.parametrize("level", ISAS)
@FAST
@given(n=st.one_of(st.integers(1, 9), st.integers(10, 40)), k=st.sampled_from(QWIDTHS), m=st.integers(1, 70),
       fmt=st.sampled_from(QFORMATS), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_qlinear_matches_twin(level, n, k, m, fmt, bias, seed):
    """The kernels' float32 sum over blocks agrees with the twin's float64 one to float32 rounding, for
    1..8 rows (one register tile) and more (several tiles), odd m (a partial last panel)."""
    rng = np.random.default_rng(seed)
    qt = quant.quantize_np(quant_weight(rng, m, k), fmt)
    x = rng.standard_normal((n, k), dtype=np.float32)
    with isa(level):
        assert_qlinear_close(x, qt, rng.standard_normal(m, dtype=np.float32) if bias else None)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("fmt", QFORMATS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_qlinear_largest_codes_do_not_saturate(level, fmt, sign):
    """Every weight at its largest code (q4 15, int8 +-127) times every activation at +-127: the AVX2
    kernel's int16 partial sums (VPMADDUBSW) are at their largest here and must not saturate."""
    qt = quant.quantize_np(np.full((32, 512), sign, np.float32), fmt)
    x = np.stack([np.ones(512, np.float32), -np.ones(512, np.float32), np.tile([1.0, -1.0], 256).astype(np.float32)])
    with isa(level):
        assert_qlinear_close(x, qt, None)
    np.testing.assert_allclose(quant.qlinear_np(x[:2], qt), [[512 * sign] * 32, [-512 * sign] * 32], rtol=1e-2)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("fmt", QFORMATS)
def test_qlinear_rows_do_not_depend_on_the_batch(level, fmt):
    """A row's result is bit-identical whatever rows share the call (and the thread count): what lets
    batches and streams give exactly the ids of one sequence alone. 75 rows of 9216 inputs span three of
    the driver's row blocks (csrc/qmatmul.c rows_per_block: 32 rows at that width)."""
    rng = np.random.default_rng(3)
    for n, k in ((19, 768), (75, 9216)):
        qt = quant.quantize_np(quant_weight(rng, 100, k), fmt)
        x = rng.standard_normal((n, k), dtype=np.float32)
        with isa(level):
            whole = ck.linear(x, qt)
            with threads(1):
                one = ck.linear(x[:1], qt)
            parts = np.concatenate([ck.linear(x[i:i + 5], qt) for i in range(0, n, 5)])
        np.testing.assert_array_equal(whole, parts)
        np.testing.assert_array_equal(whole[:1], one)


@pytest.mark.skipif(not {"avx512bf16", "avx512amx"} <= set(ck.supported_isas()), reason="CPU lacks AMX")
@pytest.mark.parametrize("fmt", QFORMATS)
@pytest.mark.parametrize("k", [32, 96, 768])
def test_amx_rows_are_the_vnni_rows(fmt, k):
    """The AMX tiles sum a q4 super-block's exact integers and the kernel's tail repeats the VNNI kernel's
    float steps, so every row is avx512bf16's bit for bit: passes below AMX_MIN_ROWS (VNNI), whole groups
    of 16 rows in pairs and alone, a last group taken by the tiles (>= 8 rows) or by the VNNI kernel, 340
    rows over two of the driver's row blocks at k = 768; one block, an odd number of them (a half-empty last
    pair) and several super-blocks; a partial last panel (m = 45) and a bias. int8 always takes the VNNI
    kernel here."""
    rng = np.random.default_rng(k)
    qt = quant.quantize_np(quant_weight(rng, 45, k), fmt)
    b = rng.standard_normal(45, dtype=np.float32)
    for n in (1, 11, 12, 16, 23, 32, 39, 40, 48, 61, 340):
        x = rng.standard_normal((n, k), dtype=np.float32)
        with isa("avx512bf16"):
            want = ck.linear(x, qt, b)
        with isa("avx512amx"):
            np.testing.assert_array_equal(ck.linear(x, qt, b), want)


def test_qlinear_through_kernels_linear_and_any_leading_shape():
    rng = np.random.default_rng(0)
    qt = quant.quantize_np(quant_weight(rng, 33, 96), "q4")
    x = rng.standard_normal((2, 3, 96), dtype=np.float32)
    with kernels.use("c", "bf16"):                       # precision does not apply: x is quantised to int8
        y = kernels.linear(x, qt)
    assert y.shape == (2, 3, 33)
    np.testing.assert_array_equal(y, ck.linear(x.reshape(6, 96), qt).reshape(2, 3, 33))
    np.testing.assert_allclose(y, kernels.linear_np(x, qt), rtol=1e-5, atol=1e-4)


def test_qtensor_checks_and_rows():
    rng = np.random.default_rng(0)
    w = quant_weight(rng, 40, 256)
    qt = quant.quantize_np(w, "q4")
    np.testing.assert_array_equal(qt.rows([39, 0, 17]), qt.dequantize()[[39, 0, 17]])
    for shape in [(4, 40), (4, 288), (4,)]:
        with pytest.raises(ValueError):
            quant.quantize_np(np.ones(shape, np.float32), "q4")
    with pytest.raises(ValueError):
        quant.QTensor("q4", qt.data[:, :-1], (40, 256))
    with pytest.raises(ValueError):
        quant.QTensor("q3", qt.data, (40, 256))


def test_recipes():
    names = {"enc.conv1.weight": (64, 128, 3), "enc.conv1.bias": (64,), "enc.layers.0.wq": (64, 64),
             "enc.layers.0.bq": (64,), "adapter.w_in": (96, 256), "dec.layers.0.w2": (96, 512),
             "dec.layers.0.ada_up": (96, 32), "tok_embeddings": (100, 96), "lm_head": (100, 96)}
    assert quant.plan("q4", names) == {"enc.conv1.weight": "int8", "enc.layers.0.wq": "q4", "adapter.w_in": "q4",
                                       "dec.layers.0.w2": "q4", "lm_head": "q4"}
    assert quant.plan("q4,lm_head=int8,enc=none,conv=none", names) == {"adapter.w_in": "q4", "dec.layers.0.w2": "q4",
                                                                         "lm_head": "int8"}
    assert quant.plan("int8,dec.layers.*.w2=q4", names)["dec.layers.0.w2"] == "q4"
    for bad in ["q5", "q4,nothing=int8", "", "q4,lm_head=fp8"]:
        with pytest.raises(ValueError):
            quant.plan(bad, names)


# --- attention ------------------------------------------------------------------------------------------
def kv8(x):
    """float32 keys or values [T, Hkv, D] -> kernels.KV8, quantised as a cache stores them."""
    t, h, d = x.shape
    codes, scale, _ = quant.quantize_act_np(x.reshape(t * h, d), d)
    return kernels.KV8.pack(codes.reshape(t, h, d), scale.reshape(t, h))


@pytest.mark.parametrize("s", [1, 31, 32, 33, 100])
def test_an_int8_cache_keeps_its_rows_in_head_major_blocks(s):
    """KV8 acts as an array of rows whatever its storage: rows round-trip through pack, prefix slices are views
    onto the same blocks, fancy reads and writes reach the right rows, and the codes sit where the C kernels
    look for them (csrc/dispatch.h vx_kv8_row: block j // 32, then head, then row j % 32)."""
    assert ck.lib is None or ck.lib.VX_KV8_BLOCK == kernels.KV8_BLOCK
    rng, h, d = np.random.default_rng(s), 3, 8
    codes = rng.integers(-127, 128, (s, h, d)).astype(np.int8)
    scale = rng.uniform(0.1, 1.0, (s, h)).astype(np.float32)
    kv = kernels.KV8.pack(codes, scale)
    assert kv.shape == (s, h, d) and kv.blocks.shape == (-(-s // 32), h, 32, d)
    np.testing.assert_array_equal(kv.codes, codes)
    for j in range(s):
        for hk in range(h):
            np.testing.assert_array_equal(kv.blocks.reshape(-1)[((j // 32 * h + hk) * 32 + j % 32) * d:][:d], codes[j, hk])
    np.testing.assert_array_equal(np.asarray(kv, np.float32), codes.astype(np.float32) * scale[..., None])
    head = kv[:s - s // 2]
    assert np.shares_memory(head.blocks, kv.blocks) and head.shape == (s - s // 2, h, d)
    np.testing.assert_array_equal(head.codes, codes[:s - s // 2])
    pick = rng.permutation(s)[:max(1, s // 3)]
    np.testing.assert_array_equal(kv[pick].codes, codes[pick])
    np.testing.assert_array_equal(kv[pick].scale, scale[pick])
    new = kernels.KV8.pack(codes[pick][:, :, ::-1].copy(), scale[pick] * 2)
    kv[pick] = new
    codes[pick], scale[pick] = codes[pick][:, :, ::-1], scale[pick] * 2
    np.testing.assert_array_equal(kv.codes, codes)
    np.testing.assert_array_equal(kv.scale, scale)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("tq, tk, hq, hkv, d", [(1, 300, 32, 8, 128), (4, 200, 4, 4, 16), (39, 39, 8, 2, 32),
                                                (40, 100, 4, 4, 64), (3, 500, 6, 3, 24), (2, 700, 32, 32, 64)])
def test_attention_over_an_int8_cache(level, tq, tk, hq, hkv, d):
    """int8 keys and values (the quantised modes' compact caches) on both paths (few rows: split by keys,
    and with few key ranges by groups of kv heads too; many: by rows), a ring's unordered positions: the
    same bits on 1, 2 and 3 threads, the twin's result to float32 rounding, and the float32 keys' and
    values' result to int8's rounding (relative RMS error)."""
    rng = np.random.default_rng(tk)
    q = rng.standard_normal((tq, hq, d), dtype=np.float32) * np.float32(3)
    kf, vf = (rng.standard_normal((tk, hkv, d), dtype=np.float32) for _ in range(2))
    kp, qp = np.roll(np.arange(tk), 7), np.arange(tk - tq, tk)
    k, v = kv8(kf), kv8(vf)
    ys = []
    for n in (1, 2, 3):
        with isa(level), threads(n):
            ys.append(ck.attention(q, k, v, qp, kp, 90))
    y = ys[0]
    for other in ys[1:]:
        np.testing.assert_array_equal(other, y)
    np.testing.assert_allclose(y, kernels.attention_np(q, k, v, qp, kp, 90), rtol=0, atol=2e-6 * np.abs(vf).max() * 3)
    yf = kernels.attention_np(q, kf, vf, qp, kp, 90)
    assert np.sqrt(np.mean((y - yf) ** 2) / np.mean(yf ** 2)) < 0.03       # measured 0.85-1.65 % (q x 3: sharp)


@pytest.mark.parametrize("plain, vnni", [pytest.param(a, b, marks=pytest.mark.skipif(
    not {a, b} <= set(ck.supported_isas()), reason=f"CPU lacks {b}")) for a, b in [("avx512", "avx512bf16"), ("avx2", "avxvnni")]])
@pytest.mark.parametrize("tq, hq, hkv, d", [(1, 32, 8, 128), (4, 32, 32, 64), (3, 8, 2, 192), (1, 4, 1, 256)])
def test_vnni_scores_are_the_exact_integers(plain, vnni, tq, hq, hkv, d):
    """Over an int8 cache a score's dot product is an exact integer: a VNNI level's integer kernel (biased
    bytes, the bias taken off; AVX512-VNNI at avx512bf16, AVX-VNNI at avxvnni) and its plain level's
    (avx512's float32 FMAs, avx2's VPMADDUBSW) agree bit for bit, so the whole outputs do (they share every
    other step)."""
    rng = np.random.default_rng(d)
    tk = 777
    q = rng.standard_normal((tq, hq, d), dtype=np.float32) * np.float32(3)
    k, v = (kv8(rng.standard_normal((tk, hkv, d), dtype=np.float32)) for _ in range(2))
    kp, qp = np.roll(np.arange(tk), 100), np.arange(tk - tq, tk)
    with isa(plain):
        want = ck.attention(q, k, v, qp, kp, 500)
    with isa(vnni):
        np.testing.assert_array_equal(ck.attention(q, k, v, qp, kp, 500), want)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("rows, keys, d", [(1, 16, 64), (4, 32, 128), (7, 48, 192), (16, 16, 256), (3, 80, 64)])
def test_integer_scores_are_the_exact_products(level, rows, keys, d):
    """attention's integer score kernel against its twin, the exact product of the codes: the VNNI levels'
    biased VPDPBUSD (the bias taken off), avx2's VPMADDUBSW of |k| with k's sign moved onto q. Codes of +-127
    make the largest pairs (2 * 127 * 127 in one int16 lane of VPMADDUBSW: no saturation). The levels
    without one (scalar, avx512) sum the codes in float32, which the attention tests cover."""
    rng = np.random.default_rng(rows * keys + d)
    qc = rng.integers(-127, 128, (rows, d)).astype(np.int8)
    kc = rng.integers(-127, 128, (keys, d)).astype(np.int8)
    qc[0], kc[0], kc[1], kc[2] = 127, -127, 127, 0
    with isa(level):
        s = ck.attention_scores(qc, kc)
    assert (s is not None) == (level in ("avx2", "avxvnni", "avx512bf16", "avx512amx"))
    if s is not None:
        np.testing.assert_array_equal(s, qc.astype(np.int32) @ kc.astype(np.int32).T)



@pytest.mark.parametrize("level", ISAS)
@FAST
@given(n=st.integers(1, 1400), tq=st.integers(1, 16), g=st.sampled_from([1, 4]), d=st.sampled_from([16, 64, 128]),
       window=st.integers(1, 400), chunks=st.tuples(st.integers(1, 1000), st.integers(1, 1000)),
       kv=st.sampled_from(["f32", "int8"]), seed=st.integers(0, 2**32 - 1))
def test_a_query_gets_the_same_from_any_aligned_ring(level, n, tq, g, d, window, chunks, kv, seed):
    """Positions 0..n-1 in two KV rings of different capacities (as KVCache sizes them for two chunk sizes,
    say a stream's 4 frames and a file's 1000): the last tq queries' outputs are bit for bit the same, the
    C attention's aligned key ranges merged in position order. (As in test_a_query_gets_what_it_gets_alone,
    where a vector cannot hold a GQA group the many-row path runs, which makes no such promise.)"""
    from voxtral_ref.stages.attention import KVCache
    if g > ck.ISA_VW[level]:
        return
    rng = np.random.default_rng(seed)
    tq = min(tq, n)
    hkv = 2
    q = rng.standard_normal((tq, hkv * g, d), dtype=np.float32) * np.float32(3)
    k, v = (rng.standard_normal((n, hkv, d), dtype=np.float32) for _ in range(2))
    outs = []
    for chunk in chunks:
        cap = KVCache(window, chunk, 1, 1).capacity
        slots = np.arange(n) % cap
        kr, vr, kp = np.zeros((cap, hkv, d), np.float32), np.zeros((cap, hkv, d), np.float32), np.full(cap, -1)
        kr[slots], vr[slots], kp[slots] = k, v, np.arange(n)
        m = min(n, cap)
        kr, vr, kp = kr[:m], vr[:m], kp[:m]
        if kv == "int8":
            kr, vr = kv8(kr), kv8(vr)
        with isa(level):
            outs.append(ck.attention(q, kr, vr, np.arange(n - tq, n), kp, window))
    np.testing.assert_array_equal(outs[0], outs[1])

@FAST
@given(tq=st.integers(2, 20), past=st.integers(0, 300), g=st.sampled_from([1, 4]), d=st.sampled_from([8, 64]),
       window=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_the_twin_gives_a_query_what_it_gets_alone(tq, past, g, d, window, seed):
    """The NumPy twin over an int8 cache: each query's output bit for bit what a call of its own gives
    (exact integer scores, sums over keys left to right), so the NumPy backend's speculative passes,
    batches and streams keep one-at-a-time decoding's ids too."""
    rng = np.random.default_rng(seed)
    tk = past + tq
    q = rng.standard_normal((tq, 2 * g, d), dtype=np.float32) * np.float32(3)
    k, v = (kv8(rng.standard_normal((tk, 2, d), dtype=np.float32)) for _ in range(2))
    k_pos, q_pos = np.roll(np.arange(tk), int(rng.integers(tk))) + 50, np.arange(50 + past, 50 + tk)
    together = kernels.attention_np(q, k, v, q_pos, k_pos, window)
    for i in range(tq):
        np.testing.assert_array_equal(together[i], kernels.attention_np(q[i:i + 1], k, v, q_pos[i:i + 1], k_pos, window)[0])


def test_kv_caches_follow_the_model_mode():
    import voxtral_ref
    from conftest import MODEL_DIRS
    for mode, kind in (({}, np.ndarray), ({"quantize": "q4"}, kernels.KV8)):
        s = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c", **mode).stream()
        caches = s._enc_caches + s._dec.caches
        assert {type(c.k) for c in caches} == {type(c.v) for c in caches} == {kind}
        assert {c.k.codes.dtype if kind is kernels.KV8 else c.k.dtype for c in caches} == {
            np.dtype(np.int8 if kind is kernels.KV8 else np.float32)}


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the process's RSS (Linux)")
def test_a_cache_ring_takes_memory_as_it_fills():
    """A full-size decoder layer's int8 ring (8.6 MB of codes, a stream's for 11 minutes) costs no memory
    and no time to open: its pages come as positions are written, and go with it."""
    from voxtral_ref.stages.attention import KVCache

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with kernels.use("c", kv="int8"):
        before = rss()
        caches = [KVCache(8192, 39, 8, 128) for _ in range(24)]            # 24 x 2 x 8.6 MB of codes
        opened = rss() - before
        codes = sum(c.k.blocks.nbytes + c.v.blocks.nbytes for c in caches)
        assert codes > 400e6 and opened < 0.1 * codes
        k = kernels.kv_pack(np.ones((32, 8, 128), np.float32))
        for c in caches:
            c.update(k, k, np.arange(32))                                  # one block of 32 positions each
        # (with transparent huge pages a first write maps 2 MB of each ring's 8.6 MB)
        assert not caches[0].k.blocks[1:].any() and rss() - before < 0.5 * codes
        del caches, c
        assert rss() - before < 0.1 * codes


def ring_order(tk, rng):
    """Key slots as a KV ring buffer holds them: ascending positions rotated by a random amount."""
    return np.roll(np.arange(tk), rng.integers(0, tk))


@pytest.mark.parametrize("level", ISAS)
@FAST
@given(tq=st.integers(1, 40), past=st.integers(0, 60), hkv=st.integers(1, 3), g=st.sampled_from([1, 2, 4]),
       d=st.one_of(st.integers(1, 40), st.sampled_from([64, 128])), window=st.integers(1, 70),
       order=st.sampled_from(["sorted", "ring", "shuffled"]), base=st.sampled_from([0, 12345, 10**9]),
       sharp=st.sampled_from([1.0, 8.0]), kv=st.sampled_from(["f32", "int8"]), seed=st.integers(0, 2**32 - 1))
def test_attention_matches_twin(level, tq, past, hkv, g, d, window, order, base, sharp, kv, seed):
    rng = np.random.default_rng(seed)
    tk = past + tq                                   # a cache holding `past` earlier positions plus this chunk
    q = rng.standard_normal((tq, hkv * g, d), dtype=np.float32) * np.float32(sharp)
    k = rng.standard_normal((tk, hkv, d), dtype=np.float32)
    v = rng.standard_normal((tk, hkv, d), dtype=np.float32)
    k_pos = base + np.arange(tk, dtype=np.int64)
    q_pos = k_pos[past:].copy()
    perm = {"sorted": np.arange(tk), "ring": ring_order(tk, rng), "shuffled": rng.permutation(tk)}[order]
    k, v, k_pos = k[perm], v[perm], k_pos[perm]
    if kv == "int8":
        k, v = kv8(k), kv8(v)
    with isa(level):
        out = ck.attention(q, k, v, q_pos, k_pos, window)
    ref = kernels.attention_np(q, k, v, q_pos, k_pos, window)
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_array_less(np.abs(out - ref), 2e-6 * np.abs(v).max() * max(1.0, sharp))


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("tq,g,d,window", [(1, 4, 128, 300), (1, 1, 64, 10**6), (3, 2, 33, 250), (4, 1, 64, 750)])
def test_attention_decode_over_a_long_cache(level, tq, g, d, window):
    """Decode-shaped calls split the keys over threads and merge partial softmaxes: a ring cache longer
    than the window leaves whole key ranges that no query sees."""
    rng = np.random.default_rng(d)
    tk, hkv = 1100, 2
    q = rng.standard_normal((tq, hkv * g, d), dtype=np.float32) * np.float32(3)
    k, v = (rng.standard_normal((tk, hkv, d), dtype=np.float32) for _ in range(2))
    k_pos = np.roll(np.arange(5000, 5000 + tk), 357)
    q_pos = np.arange(5000 + tk - tq, 5000 + tk)
    ref = kernels.attention_np(q, k, v, q_pos, k_pos, window)
    outs = []
    for n in (1, 2, 3):
        with isa(level), threads(n):
            outs.append(ck.attention(q, k, v, q_pos, k_pos, window))
    np.testing.assert_array_less(np.abs(outs[0] - ref), 1e-5 * np.abs(v).max())
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])                 # the thread count changes nothing


@pytest.mark.parametrize("level", ISAS)
def test_attention_window_edges(level):
    """window 1 sees only itself; a key exactly `window` back is hidden, one closer is visible."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((20, 2, 8), dtype=np.float32) for _ in range(3))
    pos = np.arange(20)
    with isa(level):
        np.testing.assert_allclose(ck.attention(q, k, v, pos, pos, 1), v, rtol=1e-6, atol=1e-6)
        for w in (2, 5, 19, 20, 10**6):
            np.testing.assert_allclose(ck.attention(q, k, v, pos, pos, w), kernels.attention_np(q, k, v, pos, pos, w),
                                       rtol=1e-5, atol=1e-5)


def test_attention_query_that_sees_no_key_is_nan():
    q = np.ones((2, 1, 4), np.float32)
    k = v = np.ones((3, 1, 4), np.float32)
    out = ck.attention(q, k, v, np.array([0, 10]), np.array([5, 6, 7]), 3)   # keys too late / too old
    assert np.isnan(out).all()
    out = ck.attention(q, k, v, np.array([7, 8]), np.array([5, 6, 7]), 3)
    assert np.isfinite(out).all()


# --- norms ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ISAS)
@FAST
@given(rows=st.integers(1, 9), d=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       eps=st.sampled_from([1e-5, 1e-6]), seed=st.integers(0, 2**32 - 1))
def test_rms_norm_matches_twin(level, rows, d, scale, eps, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d), dtype=np.float32) * np.float32(scale)
    w = rng.standard_normal(d, dtype=np.float32)
    with isa(level):
        y = ck.rms_norm(x, w, eps)
    np.testing.assert_allclose(y, kernels.rms_norm_np(x, w, eps), rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("level", ISAS)
@FAST
@given(shape=st.sampled_from([(1,), (7,), (3, 17), (2, 9216), (5, 33)]), scale=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2**32 - 1))
def test_silu_mul_matches_twin(level, shape, scale, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    b = rng.standard_normal(shape, dtype=np.float32)
    with isa(level):
        y = ck.silu_mul(a, b)
    with np.errstate(over="ignore"):
        ref = kernels.silu_mul_np(a, b)
    # absolute slack: the C exp saturates in (88, 88.72], moving results of magnitude ~1e-37 (see simd.h)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-36)


# --- rope -----------------------------------------------------------------------------------------------
@FAST
@given(t=st.integers(1, 40), h=st.integers(1, 9), half=st.integers(1, 70), interleaved=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_rope_matches_twin(t, h, half, interleaved, seed):
    """Both layouts, odd head counts and half-widths, large angles (positions up to 1e6)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, h, 2 * half), dtype=np.float32)
    angles = rng.uniform(0, 1e6, (t, half)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    y = ck.rope(x, cos, sin, interleaved)
    np.testing.assert_allclose(y, kernels.rope_np(x, cos, sin, interleaved), rtol=0, atol=1e-6 * np.abs(x).max())


def test_rope_rejects_bad_shapes():
    x = np.ones((3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="rope"):
        ck.rope(x, np.ones((3, 3), np.float32), np.ones((3, 3), np.float32))


# --- plumbing -------------------------------------------------------------------------------------------
def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(0)
    x1, x40 = rng.standard_normal((1, 700), dtype=np.float32), rng.standard_normal((40, 700), dtype=np.float32)
    w = rng.standard_normal((520, 700), dtype=np.float32).astype(ml_dtypes.bfloat16)
    q = rng.standard_normal((300, 4, 64), dtype=np.float32)
    kv = rng.standard_normal((300, 2, 64), dtype=np.float32)
    pos = np.arange(300)
    runs = []
    for n in (1, 2, 3, 8, 2):                # 8 past the cores (no spinning), then 2 with idle workers left over
        with threads(n):
            runs.append([ck.linear(x1, w), ck.linear(x40, w), ck.linear(x1, w, precision="bf16"),
                         ck.linear(x40, w, precision="bf16"), ck.attention(q, kv, kv, pos, pos, 100),
                         ck.rope(q, q[:, 0, :32], q[:, 1, :32], True),
                         ck.rms_norm(x40, x40[0], 1e-5), ck.silu_mul(x40, x40)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_kernels_called_from_many_threads_at_once():
    """The kernels share one team of worker threads (csrc/pool.c), one caller's region at a time: calls
    from several Python threads at once (the engine's and the server's sessions step in theirs) each get
    what a lone call gets. The GEMM's threads also meet at barriers inside their region (1100 rows: two
    blocks of activations)."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1100, 96), dtype=np.float32), rng.standard_normal((200, 96), dtype=np.float32)
    xq, wq = rng.standard_normal((3, 1280), dtype=np.float32), ck.quantize(rng.standard_normal((512, 1280), dtype=np.float32), "q4")
    q, kv = rng.standard_normal((1, 32, 128), dtype=np.float32), rng.standard_normal((900, 8, 128), dtype=np.float32)
    pos = np.arange(900)
    calls = [lambda: ck.linear(x, w), lambda: ck.linear(xq, wq), lambda: ck.attention(q, kv, kv, pos[-1:], pos, 800)]
    with threads(2):
        want = [c() for c in calls]
        wrong = []

        def run(i):
            for _ in range(15):
                if not np.array_equal(calls[i % 3](), want[i % 3]):
                    wrong.append(i)
        workers = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    assert not wrong


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_kernels_run_in_a_child_of_fork():
    """A child of fork() has none of its parent's worker threads: it starts its own (a team that believed
    its workers alive would wait for them forever)."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 700), dtype=np.float32), rng.standard_normal((520, 700), dtype=np.float32)
    with threads(2):
        want = ck.linear(x, w)                       # the parent's workers exist now
        pid = os.fork()
        if pid == 0:                                 # the child: its verdict is its exit status
            os._exit(0 if np.array_equal(ck.linear(x, w), want) else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's kernel call hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_isa_and_thread_controls():
    best = ck.supported_isas()[-1]
    assert ck.supported_isas()[0] == "scalar"
    with isa("scalar"):
        assert ck.get_isa() == "scalar" and "scalar" in ck.info()
    assert ck.set_isa(ck.ISA_LEVELS[-1]) == best
    with pytest.raises(ValueError):
        ck.set_isa("sse9")
    with threads(3):
        assert ck.get_threads() == 3


def test_kernel_clocks_count_each_kind_apart():
    # the benches split a step's time by these clocks: a linear must move only the weights' clock, an
    # attention call only attention's
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 256), np.float32), rng.standard_normal((512, 256), np.float32)
    q, k = rng.standard_normal((1, 2, 64), np.float32), rng.standard_normal((300, 1, 64), np.float32)
    before = ck.weight_seconds(), ck.attention_seconds()
    ck.linear(x, w)
    ck.linear(x, ck.quantize(w, "q4"))
    middle = ck.weight_seconds(), ck.attention_seconds()
    ck.attention(q, k, k, np.array([299]), np.arange(300), 0)
    after = ck.weight_seconds(), ck.attention_seconds()
    assert middle[0] > before[0] and middle[1] == before[1]
    assert after[0] == middle[0] and after[1] > middle[1]


def test_backend_dispatch_reaches_the_c_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(ck, "rms_norm", lambda x, w, eps: calls.append("c") or kernels.rms_norm_np(x, w, eps))
    x = np.ones((2, 4), np.float32)
    with kernels.use("c"):
        kernels.rms_norm(x, x[0], 1e-5)
    kernels.rms_norm(x, x[0], 1e-5)
    assert calls == ["c"]


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ck, "lib", None)
    monkeypatch.setattr(ck, "_warned", False)
    assert not ck.available() and ck.supported_isas() == [] and "not built" in ck.info()
    x = np.ones((2, 3), np.float32)
    with pytest.warns(UserWarning, match="not built"):
        y = ck.linear(x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.silu_mul(x, x)
    np.testing.assert_array_equal(y, kernels.linear_np(x, x))


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
@pytest.mark.parametrize("mode", [{}, {"precision": "bf16"}, {"quantize": "q4"}, {"quantize": "int8"},
                                  {"quantize": "q4,enc=none,dec.layers.*.wk=int8", "precision": "bf16"}])
def test_one_call_layer_is_the_readable_layer(fmt, mode, monkeypatch):
    """csrc/layer.c runs a layer in one call: bit for bit the readable layer (encoder and decoder, a whole
    sequence, chunks through a KV ring, ring wrap-around included, and two sequences' rows stacked with
    their own rings), caches alike afterwards."""
    import voxtral_ref
    from conftest import MODEL_DIRS
    from voxtral_ref.stages import attention, decoder, encoder
    model = voxtral_ref.load(MODEL_DIRS[fmt], backend="c", **mode)
    cfg, w, inter = model.cfg, model.weights, fmt == "mistral"
    rng = np.random.default_rng(0)

    def run(fused):
        monkeypatch.setattr(kernels, "fused_layers", lambda: fused and kernels._c() is not None)
        out = []
        with model.kernel_mode():
            for stage, c, layer in (("enc", cfg.encoder, encoder.encoder_layer), ("dec", cfg.decoder, decoder.decoder_layer)):
                lw = w.layer(f"{stage}.layers.0")
                ada = [] if stage == "enc" else [np.repeat(rng.standard_normal((1, c.dim), np.float32), 40, axis=0)]
                x = rng.standard_normal((40, c.dim), dtype=np.float32)
                pos = np.arange(40)
                kvh = c.n_heads if stage == "enc" else c.n_kv_heads
                out.append(layer(x, pos, lw, c, *ada, inter, None))
                cache = attention.KVCache(window=12, max_chunk=8, n_kv_heads=kvh, head_dim=c.head_dim)
                for p0 in range(0, 40, 8):                   # 5 chunks through a 19-slot ring
                    args = (x[p0:p0 + 8], pos[p0:p0 + 8], lw, c) + tuple(a[:8] for a in ada) + (inter, cache)
                    out.append(layer(*args))
                out += [np.asarray(cache.k, np.float32), np.asarray(cache.v, np.float32), cache.pos.copy(),
                        np.array(cache.filled)]
                # two sequences' rows stacked (the engine's passes), each with its own ring and AdaRMSNorm rows
                two = [attention.KVCache(window=12, max_chunk=8, n_kv_heads=kvh, head_dim=c.head_dim) for _ in range(2)]
                for p0, (n1, n2) in zip(range(0, 40, 8), [(3, 5), (8, 1), (1, 8), (5, 5), (2, 7)]):
                    ps = [pos[p0:p0 + n1], pos[p0:p0 + n2] + 3]
                    xs = rng.standard_normal((n1 + n2, c.dim), dtype=np.float32)
                    ad = [] if stage == "enc" else [rng.standard_normal((n1 + n2, c.dim), dtype=np.float32)]
                    out.append(layer(xs, ps, lw, c, *ad, inter, two))
                out += [np.asarray(t.k, np.float32) for t in two] + [np.array([t.filled for t in two])]
        return out

    rng = np.random.default_rng(0)
    fused = run(True)
    rng = np.random.default_rng(0)
    readable = run(False)
    assert len(fused) == len(readable)
    for a, b in zip(fused, readable):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", [{}, {"quantize": "q4"}])
def test_one_call_stack_is_the_readable_layers(mode, monkeypatch):
    """decoder_forward and encoder_transformer run their whole stack in one C call (vx_layers_forward, each
    layer's AdaRMSNorm rows and rings its own): bit for bit the readable layers one by one, for two stacked
    sequences of different delays through their rings, chunk after chunk, the caches alike afterwards."""
    import voxtral_ref
    from conftest import MODEL_DIRS
    from voxtral_ref.stages import attention, decoder, encoder
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c", **mode)
    cfg, w = model.cfg, model.weights

    def run(fused):
        monkeypatch.setattr(kernels, "fused_layers", lambda: fused)
        rng, out = np.random.default_rng(2), []
        with model.kernel_mode():
            for stage, c in (("enc", cfg.encoder), ("dec", cfg.decoder)):
                kvh = c.n_heads if stage == "enc" else c.n_kv_heads
                rings = [[attention.KVCache(window=12, max_chunk=8, n_kv_heads=kvh, head_dim=c.head_dim)
                          for _ in range(c.n_layers)] for _ in range(2)]
                for p0, (n1, n2) in zip(range(0, 40, 8), [(3, 5), (8, 1), (1, 8), (5, 5), (2, 7)]):
                    ps = [np.arange(p0, p0 + n1), np.arange(p0, p0 + n2) + 3]
                    x = rng.standard_normal((n1 + n2, c.dim), dtype=np.float32)
                    if stage == "enc":
                        out.append(encoder.encoder_transformer(x, ps, w, True, rings))
                    else:
                        seqs = [(p, decoder.ada_scales(w, d), r) for p, d, r in zip(ps, (2, 6), rings)]
                        out.append(decoder.decoder_forward(x, seqs, w, True))
                out += [np.asarray(r.k, np.float32) for seq in rings for r in seq] + [np.array([r.filled for seq in rings for r in seq])]
        return out

    fused, readable = run(True), run(False)
    assert len(fused) == len(readable)
    for a, b in zip(fused, readable):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", [{}, {"quantize": "q4"}])
def test_sequences_attending_one_per_thread_get_what_they_get_alone(mode):
    """layer.c gives several sequences' attention one thread each when their work shares out evenly (no
    sequence more than a thread's share), in whole rounds of the threads: of these 3 on 2 threads the two
    with the most work, while the third's call, as a sequence alone does, splits its keys over the threads.
    Each sequence's rows and ring come out bit for bit the same either way."""
    import voxtral_ref
    from conftest import MODEL_DIRS
    from voxtral_ref.stages import attention, decoder, encoder
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend="c", **mode)
    cfg, w = model.cfg, model.weights
    history = [64, 40, 56]                               # positions each sequence's ring holds already
    with threads(2), model.kernel_mode():
        for stage, c, layer in (("enc", cfg.encoder, encoder.encoder_layer), ("dec", cfg.decoder, decoder.decoder_layer)):
            lw, kvh = w.layer(f"{stage}.layers.0"), c.n_heads if stage == "enc" else c.n_kv_heads
            # layer.c's test: rows * heads * min(keys, window + rows) * head_dim per sequence, 2 threads
            work = [8 * c.n_heads * min(n + 8, c.sliding_window + 8) * c.head_dim for n in history]
            assert sum(work) >= 32768 and 2 * max(work) <= sum(work)
            rng = np.random.default_rng(1)
            xs = [rng.standard_normal((n + 8, c.dim), dtype=np.float32) for n in history]
            ada = [rng.standard_normal((n + 8, c.dim), dtype=np.float32) for n in history]

            def rings():                                 # each sequence's history, 8 positions a call
                out = []
                for x, a, n in zip(xs, ada, history):
                    ring = attention.KVCache(window=c.sliding_window, max_chunk=8, n_kv_heads=kvh, head_dim=c.head_dim)
                    for p0 in range(0, n, 8):
                        layer(x[p0:p0 + 8], np.arange(p0, p0 + 8), lw, c, *([a[p0:p0 + 8]] if stage == "dec" else []),
                              True, ring)
                    out.append(ring)
                return out
            together, alone = rings(), rings()
            ends = [(x[-8:], np.arange(n, n + 8), a[-8:]) for x, a, n in zip(xs, ada, history)]
            stacked = layer(np.concatenate([x for x, _, _ in ends]), [p for _, p, _ in ends], lw, c,
                            *([np.concatenate([a for _, _, a in ends])] if stage == "dec" else []), True, together)
            for i, ((x, p, a), ring) in enumerate(zip(ends, alone)):
                own = layer(x, p, lw, c, *([a] if stage == "dec" else []), True, ring)
                np.testing.assert_array_equal(stacked[8 * i:8 * i + 8], own)
                for t in ("k", "v"):
                    np.testing.assert_array_equal(np.asarray(getattr(together[i], t), np.float32),
                                                  np.asarray(getattr(ring, t), np.float32))


@pytest.mark.parametrize("level", ISAS)
@FAST
@given(tq=st.integers(2, 16), past=st.integers(0, 400), hkv=st.integers(1, 3), g=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([8, 24, 64, 128]), window=st.integers(1, 300), order=st.sampled_from(["sorted", "ring"]),
       kv=st.sampled_from(["f32", "int8"]), seed=st.integers(0, 2**32 - 1))
def test_a_query_gets_what_it_gets_alone(level, tq, past, hkv, g, d, window, order, kv, seed):
    """A decode step with drafts (up to 16 queries over a cache): each query's output is bit for bit the one
    a call of its own gives, so verifying drafts (and a backlog, and the engine's sessions) computes every
    kept position exactly as one-at-a-time decoding does. (Where a vector cannot hold a GQA group, the
    scalar level, the many-row path runs and only the twin's tolerance holds.)"""
    if g > ck.ISA_VW[level]:
        return
    rng = np.random.default_rng(seed)
    tk = past + tq
    q = rng.standard_normal((tq, hkv * g, d), dtype=np.float32) * np.float32(3)
    k, v = (rng.standard_normal((tk, hkv, d), dtype=np.float32) for _ in range(2))
    k_pos = np.arange(tk, dtype=np.int64) + 1000
    perm = ring_order(tk, rng) if order == "ring" else np.arange(tk)
    k, v, k_pos = k[perm], v[perm], k_pos[perm]
    if kv == "int8":
        k, v = kv8(k), kv8(v)
    q_pos = np.arange(1000 + past, 1000 + tk)
    with isa(level):
        together = ck.attention(q, k, v, q_pos, k_pos, window)
        for i in range(tq):
            np.testing.assert_array_equal(together[i], ck.attention(q[i:i + 1], k, v, q_pos[i:i + 1], k_pos, window)[0])
