"""Invariants of the stages, checked on generated inputs (hypothesis): causality (appending input never
changes earlier outputs), the sliding window, the mel front end's framing and the cache's bounds."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from voxtral_ref.runtime import kernels
from voxtral_ref.stages.attention import RING_ALIGN, KVCache, rope_angles
from voxtral_ref.runtime.kernels import interleaved_to_split_half, rope_np
from voxtral_ref.stages.encoder import conv_stem
from voxtral_ref.stages.mel import log_mel, log_mel_frames, mel_filters

FAST = settings(max_examples=25, deadline=None)


def naive_attention(q, k, v, q_pos, k_pos, window):
    """Float64, one query and head at a time, straight from the definition."""
    tq, hq, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros(q.shape)
    for i in range(tq):
        for h in range(hq):
            vis = (k_pos > q_pos[i] - window) & (k_pos <= q_pos[i])
            s = (k[vis, h // g].astype(np.float64) @ q[i, h]) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[vis, h // g]
    return out


@FAST
@given(tq=st.integers(1, 40), extra=st.integers(0, 300), hkv=st.sampled_from([1, 2, 4]), g=st.sampled_from([1, 3, 4]),
       d=st.sampled_from([2, 8, 18]), window=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_attention_twin_equals_definition(tq, extra, hkv, g, d, window, seed):
    rng = np.random.default_rng(seed)
    tk = tq + extra % 50
    k_pos = rng.permutation(tk).astype(np.int64)                 # ring buffers store keys out of order
    q_pos = np.sort(k_pos)[-tq:]
    q = rng.standard_normal((tq, hkv * g, d)).astype(np.float32)
    k, v = (rng.standard_normal((tk, hkv, d)).astype(np.float32) for _ in range(2))
    got = kernels.attention_np(q, k, v, q_pos, k_pos, window)
    np.testing.assert_allclose(got, naive_attention(q, k, v, q_pos, k_pos, window), atol=2e-5)


@FAST
@given(n=st.integers(1, 4000), more=st.integers(1, 2000), seed=st.integers(0, 2**31))
def test_mel_is_causal_and_framed_on_hops(n, more, seed):
    """Frame k covers samples [160k - 200, 160k + 200): appending audio changes only frames whose window
    reached the end (where HF's reflect padding sat), and there are N // 160 frames."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n + more).astype(np.float32)
    a, b = log_mel(x[:n]), log_mel(x)
    assert a.shape == (128, n // 160) and b.shape == (128, (n + more) // 160)
    stable = max(0, (n - 200) // 160 + 1)                        # frames with 160k + 200 <= n
    np.testing.assert_array_equal(a[:, :stable], b[:, :stable])


def test_mel_frames_equal_whole_file_mel_with_zero_borders():
    """With zeros around the audio (always true after padding), reflect padding equals zero extension, so
    the streaming front end may compute frames from a plain buffer."""
    x = np.zeros(8000, np.float32)
    x[1000:6000] = np.random.default_rng(0).uniform(-1, 1, 5000)
    buf = np.concatenate([np.zeros(200), x, np.zeros(200)])
    np.testing.assert_array_equal(log_mel_frames(buf, 50), log_mel(x))


def test_mel_filters_are_slaney_normalised_triangles():
    f = mel_filters()
    assert f.shape == (201, 128) and (f >= 0).all()
    assert (np.count_nonzero(f, axis=0) >= 1).all()              # every filter sees at least one bin
    assert np.argmax(f, axis=0).tolist() == sorted(np.argmax(f, axis=0).tolist())  # centres ascend



@FAST
@given(t=st.integers(1, 12), more=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_conv_stem_is_causal(t, more, seed):
    rng = np.random.default_rng(seed)
    c = 6
    w = {"enc.conv1.weight": rng.standard_normal((c, 128, 3)).astype(np.float32) * 0.1,
         "enc.conv1.bias": rng.standard_normal(c).astype(np.float32),
         "enc.conv2.weight": rng.standard_normal((c, c, 3)).astype(np.float32) * 0.1,
         "enc.conv2.bias": rng.standard_normal(c).astype(np.float32)}
    mel = rng.standard_normal((128, 2 * (t + more))).astype(np.float32)
    (short, _), (full, _) = conv_stem(mel[:, :2 * t], w), conv_stem(mel, w)
    assert short.shape == (t, c) and full.shape == (t + more, c)
    np.testing.assert_allclose(short, full[:t], rtol=1e-6, atol=1e-6)
    _, history = conv_stem(mel[:, :2 * t], w)                    # the stream's padding cache
    rest, _ = conv_stem(mel[:, 2 * t:], w, history)
    np.testing.assert_allclose(np.concatenate([short, rest]), full, rtol=1e-6, atol=1e-6)


@FAST
@given(hd=st.sampled_from([2, 8, 64]), seed=st.integers(0, 2**31))
def test_rope_layouts_agree_and_preserve_norms(hd, seed):
    """Interleaved-pair RoPE (Mistral's layout) equals split-half RoPE after the row permutation, and
    rotations preserve each pair's norm."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 3, hd)).astype(np.float32)
    pos = rng.integers(0, 100000, 5)
    cos, sin = rope_angles(pos, hd, 1e6)
    y = rope_np(x, cos, sin, interleaved=True)
    xi = x.reshape(5, 3, hd // 2, 2)                              # interleaved pairs, done directly
    c, s = cos[:, None], sin[:, None]
    direct = np.stack([xi[..., 0] * c - xi[..., 1] * s, xi[..., 1] * c + xi[..., 0] * s], -1).reshape(5, 3, hd)
    np.testing.assert_allclose(y, interleaved_to_split_half(direct), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@FAST
@given(window=st.integers(1, 20), chunks=st.lists(st.integers(1, 40), min_size=1, max_size=40), seed=st.integers(0, 2**31))
def test_kv_cache_attention_equals_full_sequence(window, chunks, seed):
    """Feeding a sequence chunk by chunk through the bounded ring (which wraps past 512 positions here)
    equals attending over the whole sequence at once, and the ring never grows past its capacity: at least
    window + max_chunk - 1 slots, rounded up to a multiple of RING_ALIGN past window + RING_ALIGN - 1."""
    rng = np.random.default_rng(seed)
    n = sum(chunks)
    q, k, v = (rng.standard_normal((n, 2, 4)).astype(np.float32) for _ in range(3))
    pos = np.arange(n)
    full = kernels.attention_np(q, k, v, pos, pos, window)
    cache, out, p = KVCache(window, 40, 2, 4), [], 0
    assert cache.capacity % RING_ALIGN == 0 and window + RING_ALIGN - 1 <= cache.capacity < window + 2 * RING_ALIGN - 1
    for c in chunks:
        kk, vv, kp = cache.update(k[p:p + c], v[p:p + c], pos[p:p + c])
        assert len(kp) <= cache.capacity
        out.append(kernels.attention_np(q[p:p + c], kk, vv, pos[p:p + c], kp, window))
        p += c
    np.testing.assert_allclose(np.concatenate(out), full, rtol=1e-5, atol=1e-6)
