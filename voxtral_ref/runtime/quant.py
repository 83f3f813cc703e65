"""Quantised weights and activations: the formats, and their NumPy twins (the specification of csrc/qmatmul*).

Decoding is memory-bound: every 80 ms step reads every weight once, so the bytes per weight set the speed.
Two formats, both for y = x @ w.T with x quantised to int8 on the fly and integer dot products:

  int8  8.5 bits per weight: w[j, k] = s[j, b] * q[j, k], q in [-127, 127], one float16 scale s per block
        of 32 inputs (b = k // 32), s = max|w| / 127 over the block.
  q4    4.5 bits per weight: w[j, k] = S[j, b] * q[j, k] - M[j, b], q in [0, 15], per block of 32 inputs a
        scale S = d[j] * sc[j, b] and an offset M = dmin[j] * mn[j, b] >= 0, with 6-bit codes sc, mn and one
        float16 pair (d, dmin) per row and super-block of 256 inputs (8 blocks). Each block's (scale, offset)
        is chosen to minimise the block's squared error (a least-squares refit over a fixed set of candidate
        scales), not from its min and max alone: see `_fit_blocks`. That is how ggml's k-quants beat Q4_1's
        5 bits per weight with 4.5 (README, "Quantised weights", has the measured errors).

Activations: x [n, K] -> xq int8 [n, K], sx float32 [n, K/A] (sx = max|x| / 127 over a block of A inputs,
xq = rint(x / sx)) and xsum int32 [n, K/32] (the sum of xq over each block of 32). Then, with u the unsigned
byte the kernel multiplies (q4: q; int8: q + 128, so both formats are "unsigned weight byte times signed
activation") and dot[i, j, b] = sum over block b of u[j, k] xq[i, k] (exact integers):

  int8  A = 32:  y[i, j] = sum_b sx[i, b] * s[j, b] * (dot[i, j, b] - 128 xsum[i, b])
  q4    A = the super-block (256, or K below it), per super-block c the exact integer sums
        I = sum_b sc[j, b] dot[i, j, b] and N = sum_b mn[j, b] xsum[i, b] over its blocks, then
        y[i, j] = sum_c sx[i, c] * (d[j, c] * I - dmin[j, c] * N)

q4's activation scale per super-block lets its 6-bit block codes multiply in integers, once per block and
row, where a float scale per block took a convert, a multiply and two multiply-adds (an 8-row pass over
hot weights 11 % faster, csrc/qmatmul_simd.h). The coarser grid's relative RMS error in x: 0.70 % against
0.54 % for normal x, 1.7 % against 0.84 % for Student-t (3) x, small beside q4's own error in w (5-10 %).
The C kernels accumulate the sum over b (int8) or c (q4) in float32 in order, one row at a time, so a
row's result does not depend on how many rows a call has.

Storage ("panels"): 16 output rows are interleaved so that one 64-byte vector holds 4 consecutive inputs of
each of the 16 rows (the operand of one AVX512-VNNI dot-product step, and 4 NEON registers' worth for an
sdot kernel). A tensor is a uint8 array [ceil(M / 16), panel_bytes]; rows past M are zero. Per panel:
  int8  per block of 32 inputs: 16 float16 scales (32 bytes), then 8 steps x 16 rows x 4 bytes u (512 bytes)
  q4    per super-block (nb = min(8, K / 32) blocks): d[16], dmin[16] float16 (64 bytes); the codes (192
        bytes: lo[g * 16 + r] = sc[r, g] & 15 | (sc[r, g + 4] & 15) << 4 for g < 4, the same for mn, then
        hi[g * 16 + r] = sc[r, g] >> 4 | (sc[r, g + 4] >> 4) << 2 | (mn[r, g] >> 4) << 4 | (mn[r, g + 4] >> 4) << 6);
        then per block 4 vectors of 64 bytes: byte 4 r + t of vector v holds q[r, 4 v + t] in its low nibble
        and q[r, 4 (v + 4) + t] in its high nibble (inputs relative to the block).
"""

import numpy as np

PANEL = 16                      # output rows interleaved per panel
BLOCK = 32                      # inputs per scale block (activations, int8 weights, q4 blocks)
SUPER = 256                     # inputs per q4 super-block: 8 blocks share one float16 (d, dmin)
STEP = 4                        # inputs per 32-bit lane of one dot-product step
FORMATS = ("int8", "q4")
BITS_PER_WEIGHT = {"int8": 8.5, "q4": 4.5}   # 8 + 16/32 ; 4 + (2 * 6 + 2 * 16 / 8) / 32
Q4_CANDIDATES = 10              # scales tried per q4 block (see _fit_blocks)


class QTensor:
    """A quantised weight [M, K] in panel layout. Accepted by `kernels.linear` wherever a weight is;
    np.asarray(qt, np.float32) dequantises it."""

    def __init__(self, fmt, data, shape):
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantised format {fmt!r}: choose {' or '.join(FORMATS)}")
        m, k = check_shape(shape, fmt)
        expect = (n_panels(m), panel_bytes(fmt, k))
        if data.dtype != np.uint8 or data.shape != expect:
            raise ValueError(f"{fmt} data for a [{m}, {k}] weight must be uint8 {expect}, got {data.dtype} {data.shape}")
        self.fmt, self.data, self.shape = fmt, data, (m, k)
        self.ndim, self.size, self.dtype = 2, m * k, np.dtype(np.uint8)

    @property
    def nbytes(self):
        return self.data.nbytes

    def dequantize(self):
        return dequantize_np(self)

    def rows(self, ids):
        """Dequantised rows [len(ids), K] (the embedding lookup of a quantised tied table): only the panels
        holding them are expanded."""
        ids = np.asarray(ids)
        out = np.empty((len(ids), self.shape[1]), np.float32)
        for p in np.unique(ids // PANEL):
            sel = ids // PANEL == p
            out[sel] = _dequantize_panel(self.fmt, self.data[p], self.shape[1])[ids[sel] % PANEL]
        return out

    def __array__(self, dtype=None, copy=None):
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype, copy=False)


def check_shape(shape, fmt):
    if len(shape) != 2 or shape[0] <= 0 or not fits(fmt, shape):
        raise ValueError(f"{fmt} weights need a 2-D [M, K] shape with K a multiple of {BLOCK}"
                         + (f" (and of {SUPER} past {SUPER})" if fmt == "q4" else "") + f", got {tuple(shape)}")
    return shape


def n_panels(m):
    return -(-m // PANEL)


def blocks_per_super(k):
    return min(SUPER, k) // BLOCK


def panel_bytes(fmt, k):
    if fmt == "int8":
        return k // BLOCK * (2 * PANEL + PANEL * BLOCK)                      # 544 bytes per 512 weights
    nb = blocks_per_super(k)
    return k // (nb * BLOCK) * (4 * PANEL + 12 * PANEL + nb * PANEL * BLOCK // 2)   # 2304 per 4096 weights


# --- activations ---------------------------------------------------------------------------------------------
def quantize_act_np(x, block=BLOCK):
    """x [n, K] float32 -> (xq int8 [n, K], sx float32 [n, K/block], xsum int32 [n, K/block]): symmetric int8
    per block (32 for the linears; one block per head row for attention's int8 caches), sx = max|x| / 127,
    xq = rint(x / sx) (all 0 where the block is)."""
    x = np.asarray(x, np.float32)
    n, k = x.shape
    g = x.reshape(n, k // block, block)                                      # [n, K/b, b]
    sx = np.abs(g).max(-1) / np.float32(127)                                 # [n, K/b]
    safe = np.where(sx > 0, sx, np.float32(1))
    xq = np.clip(np.rint(g / safe[..., None]), -127, 127).astype(np.int8)    # [n, K/b, b]
    return xq.reshape(n, k), sx, xq.astype(np.int32).sum(-1, dtype=np.int32)


# --- int8 weights ----------------------------------------------------------------------------------------------
def _to_f16(a):
    return np.asarray(a, np.float32).astype(np.float16)


def quantize_int8_np(w):
    """[M, K] float -> QTensor("int8"). s = float16(max|w| / 127) per block; q = rint(w / s), clipped."""
    m, k = check_shape(w.shape, "int8")
    g = _padded_rows(w).reshape(-1, k // BLOCK, BLOCK)                       # [M', K/32, 32]
    s16 = _to_f16(np.abs(g).max(-1) / np.float32(127))                       # [M', K/32]
    s = s16.astype(np.float32)
    q = np.clip(np.rint(g / np.where(s > 0, s, np.float32(1))[..., None]), -127, 127).astype(np.int16)
    u = (q + 128).astype(np.uint8)                                           # [M', K/32, 32]
    panels = []
    for p in range(n_panels(m)):
        rows = slice(p * PANEL, (p + 1) * PANEL)
        sc = s16[rows].T.copy().view(np.uint8).reshape(k // BLOCK, 2 * PANEL)                   # [K/32, 32 B]
        steps = u[rows].reshape(PANEL, k // BLOCK, BLOCK // STEP, STEP).transpose(1, 2, 0, 3)  # [K/32, 8, 16, 4]
        panels.append(np.concatenate([sc, steps.reshape(k // BLOCK, -1)], axis=1).reshape(-1))
    return QTensor("int8", np.stack(panels), (m, k))


def _int8_panel(raw, k):
    """One int8 panel -> (S [16, K/32] f32, u [16, K] u8)."""
    blocks = raw.reshape(k // BLOCK, 2 * PANEL + PANEL * BLOCK)
    s = blocks[:, :2 * PANEL].copy().view(np.float16).astype(np.float32).T               # [16, K/32]
    u = blocks[:, 2 * PANEL:].reshape(k // BLOCK, BLOCK // STEP, PANEL, STEP).transpose(2, 0, 1, 3)
    return s, u.reshape(PANEL, k)


# --- q4 weights ---------------------------------------------------------------------------------------------
def _seq_sum(a):
    """Sum over the last axis strictly left to right in float32: the order the C quantiser uses, so both
    pick the same candidate (NumPy's own sum is pairwise)."""
    acc = np.zeros(a.shape[:-1], np.float32)
    for t in range(a.shape[-1]):
        acc = acc + a[..., t]
    return acc


def _fit_blocks(g):
    """Per block of 32 values (rows of g [B, 32] float32): (scale >= 0, offset >= 0) such that
    w ~ scale * q - offset with q = clip(rint((w + offset) / scale), 0, 15) has the least squared error over:
      - candidate 0: the block's range, lo = min(w, 0) .. max(w), in 15 steps;
      - candidates c = 1..Q4_CANDIDATES-1: the same range in 15 + (c - 3) / 4 steps (a finer or coarser grid)
        mapped to q, then the (scale, offset) refitted to those q by least squares (offset kept >= 0).
    Every operation is float32 with left-to-right sums: csrc/qmatmul_simd.h does exactly the same."""
    f32 = np.float32
    lo = np.minimum(g.min(-1), f32(0))                                        # [B]
    hi = g.max(-1)
    rng = hi - lo
    best_s, best_o = rng / f32(15), f32(0) - lo                               # 0 - x: never a -0.0
    best_e = _block_error(g, best_s, best_o)
    n = f32(BLOCK)
    sum_w = _seq_sum(g)
    for c in range(1, Q4_CANDIDATES):
        steps = f32(15) + f32(c - 3) / f32(4)
        inv = np.where(rng > 0, steps / np.where(rng > 0, rng, f32(1)), f32(0))
        q = np.clip(np.rint((g - lo[:, None]) * inv[:, None]), f32(0), f32(15))    # [B, 32]
        sq, sqq, sqw = _seq_sum(q), _seq_sum(q * q), _seq_sum(q * g)
        det = n * sqq - sq * sq
        ok = det > 0
        det1 = np.where(ok, det, f32(1))
        s = (n * sqw - sq * sum_w) / det1
        m = (sum_w - s * sq) / n                                             # w ~ s q + m
        pos = m > 0                                                          # offset must stay >= 0: m = 0
        s = np.where(pos, sqw / np.where(sqq > 0, sqq, f32(1)), s)
        m = np.where(pos, f32(0), m)
        ok &= s > 0
        e = _block_error(g, np.where(ok, s, f32(1)), f32(0) - m)
        better = ok & (e < best_e)
        best_s, best_o, best_e = np.where(better, s, best_s), np.where(better, f32(0) - m, best_o), np.where(better, e, best_e)
    return best_s, best_o


def _q4_codes(g, scale, offset):
    """q = clip(rint((w + offset) * (1 / scale)), 0, 15), 0 where scale is 0."""
    f32 = np.float32
    inv = f32(1) / np.where(scale > 0, scale, f32(1))
    q = np.clip(np.rint((g + offset[..., None]) * inv[..., None]), f32(0), f32(15))
    return np.where((scale > 0)[..., None], q, f32(0))


def _block_error(g, scale, offset):
    q = _q4_codes(g, scale, offset)
    r = q * scale[..., None] - offset[..., None] - g
    return _seq_sum(r * r)


def quantize_q4_np(w):
    """[M, K] float -> QTensor("q4"): per block the least-squares (scale, offset) of `_fit_blocks`, coded in
    6 bits against the super-block's largest (d = max scale / 63, dmin = max offset / 63, both float16),
    then q recomputed with the decoded scale and offset."""
    m, k = check_shape(w.shape, "q4")
    nb = blocks_per_super(k)
    g = _padded_rows(w).reshape(-1, k // BLOCK, BLOCK)                       # [M', K/32, 32]
    rows = g.shape[0]
    s, o = _fit_blocks(g.reshape(-1, BLOCK))
    s, o = s.reshape(rows, -1, nb), o.reshape(rows, -1, nb)                  # [M', supers, nb]
    # (+ 0 turns a -0.0 maximum into +0.0, so the float16 bits do not depend on which zero max() returned)
    d16 = _to_f16(s.max(-1) / np.float32(63) + np.float32(0))                # [M', supers]
    dmin16 = _to_f16(o.max(-1) / np.float32(63) + np.float32(0))
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    sc = np.clip(np.rint(s / np.where(d > 0, d, 1)[..., None]), 0, 63).astype(np.uint8)      # [M', supers, nb]
    mn = np.clip(np.rint(o / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.uint8)
    scale, offset = d[..., None] * sc.astype(np.float32), dmin[..., None] * mn.astype(np.float32)
    q = _q4_codes(g.reshape(rows, -1, nb, BLOCK), scale, offset).astype(np.uint8)             # [M', supers, nb, 32]
    panels = []
    for p in range(n_panels(m)):
        r = slice(p * PANEL, (p + 1) * PANEL)
        panels.append(np.concatenate([_q4_super(d16[r, i], dmin16[r, i], sc[r, i], mn[r, i], q[r, i])
                                      for i in range(k // (nb * BLOCK))]))
    return QTensor("q4", np.stack(panels), (m, k))


def _q4_super(d16, dmin16, sc, mn, q):
    """One panel's super-block: d16, dmin16 [16] f16, sc, mn [16, nb] u8, q [16, nb, 32] u8 -> bytes."""
    nb = sc.shape[1]
    sc8, mn8 = np.zeros((PANEL, 8), np.uint8), np.zeros((PANEL, 8), np.uint8)
    sc8[:, :nb], mn8[:, :nb] = sc, mn
    lo_sc = (sc8[:, :4] & 15) | (sc8[:, 4:] & 15) << 4                       # [16, 4]
    lo_mn = (mn8[:, :4] & 15) | (mn8[:, 4:] & 15) << 4
    hi = sc8[:, :4] >> 4 | (sc8[:, 4:] >> 4) << 2 | (mn8[:, :4] >> 4) << 4 | (mn8[:, 4:] >> 4) << 6
    codes = [a.T.reshape(-1) for a in (lo_sc, lo_mn, hi)]                    # [g * 16 + r]
    v = q.reshape(PANEL, nb, 2, 4, STEP)                                     # [r, b, half, v, t]
    nib = (v[:, :, 0] | v[:, :, 1] << 4).transpose(1, 2, 0, 3)               # [b, v, r, t]
    return np.concatenate([np.ascontiguousarray(d16).view(np.uint8), np.ascontiguousarray(dmin16).view(np.uint8),
                           *codes, nib.reshape(-1)])


def _q4_fields(raw, k):
    """One q4 panel's fields: d, dmin [supers, 16] f32, sc, mn [supers, nb, 16] int32, u [16, K] u8."""
    nb = blocks_per_super(k)
    sup = raw.reshape(k // (nb * BLOCK), -1)
    d = sup[:, :32].copy().view(np.float16).astype(np.float32)                # [supers, 16]
    dmin = sup[:, 32:64].copy().view(np.float16).astype(np.float32)
    lo_sc, lo_mn, hi = (sup[:, 64 + 64 * i:128 + 64 * i].reshape(-1, 4, PANEL) for i in range(3))   # [supers, g, r]
    sc = np.concatenate([lo_sc & 15 | (hi & 3) << 4, lo_sc >> 4 | (hi >> 2 & 3) << 4], axis=1)[:, :nb]  # [supers, nb, r]
    mn = np.concatenate([lo_mn & 15 | (hi >> 4 & 3) << 4, lo_mn >> 4 | (hi >> 6) << 4], axis=1)[:, :nb]
    nib = sup[:, 256:].reshape(-1, nb, 4, PANEL, STEP)                       # [supers, b, v, r, t]
    u = np.stack([nib & 15, nib >> 4], axis=2)                               # [supers, b, half, v, r, t]
    return d, dmin, sc.astype(np.int32), mn.astype(np.int32), u.transpose(4, 0, 1, 2, 3, 5).reshape(PANEL, k)


def _q4_panel(raw, k):
    """One q4 panel -> (S [16, K/32], M [16, K/32] f32, u [16, K] u8)."""
    d, dmin, sc, mn, u = _q4_fields(raw, k)
    scale = (d[:, None, :] * sc.astype(np.float32)).transpose(2, 0, 1).reshape(PANEL, -1)    # [16, K/32]
    offset = (dmin[:, None, :] * mn.astype(np.float32)).transpose(2, 0, 1).reshape(PANEL, -1)
    return scale, offset, u


def _panel_terms(fmt, raw, k):
    """(S, M, u) of one panel in the common form w = S u - M per block (int8: M = 128 S)."""
    if fmt == "q4":
        return _q4_panel(raw, k)
    s, u = _int8_panel(raw, k)
    return s, np.float32(128) * s, u


def _dequantize_panel(fmt, raw, k):
    s, m, u = _panel_terms(fmt, raw, k)
    w = u.reshape(PANEL, -1, BLOCK).astype(np.float32) * s[..., None] - m[..., None]
    return w.reshape(PANEL, k)


def dequantize_np(qt):
    m, k = qt.shape
    return np.concatenate([_dequantize_panel(qt.fmt, p, k) for p in qt.data])[:m]


def _padded_rows(w):
    w = np.asarray(w, np.float32)
    pad = n_panels(w.shape[0]) * PANEL - w.shape[0]
    return np.pad(w, ((0, pad), (0, 0))) if pad else w


def act_block(fmt, k):
    """Inputs per activation scale for a `fmt` matrix of width k (the module docstring's A)."""
    return BLOCK if fmt == "int8" else blocks_per_super(k) * BLOCK


def qlinear_np(x, qt, b=None):
    """y = x @ w.T (+ b) the way the C kernels compute it: x quantised per block of act_block inputs
    (quantize_act_np), exact integer sums, then the module docstring's float sum (here in float64; the kernels
    accumulate in float32, so they agree to float32 rounding of that sum). x [..., K] -> [..., M]."""
    m, k = qt.shape
    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    xq, sx, _ = quantize_act_np(x.reshape(-1, k), act_block(qt.fmt, k))     # [n, K], [n, K/A]
    xb = xq.reshape(len(xq), -1, BLOCK).astype(np.int64)                     # [n, K/32, 32]
    xsum = xb.sum(-1)                                                        # [n, K/32]
    y = np.empty((len(xq), n_panels(m) * PANEL))
    for p, raw in enumerate(qt.data):
        fields = _int8_panel(raw, k) if qt.fmt == "int8" else _q4_fields(raw, k)
        u = fields[-1]                                                       # [16, K]
        dot = np.einsum("ibk,jbk->ijb", xb, u.reshape(PANEL, -1, BLOCK).astype(np.int64))   # [n, 16, K/32]
        if qt.fmt == "int8":
            s = fields[0]                                                    # [16, K/32]
            terms = sx[:, None, :].astype(np.float64) * s[None].astype(np.float64) * (dot - 128 * xsum[:, None, :])
        else:
            d, dmin, sc, mn, _ = fields                                      # [C, 16] x2, [C, nb, 16] x2
            nb = sc.shape[1]
            dot = dot.reshape(len(xq), PANEL, -1, nb)                        # [n, 16, C, nb]
            isum = (dot * sc.transpose(2, 0, 1)[None]).sum(-1)               # [n, 16, C]
            nsum = np.einsum("icb,cbj->ijc", xsum.reshape(len(xq), -1, nb), mn)   # [n, 16, C]
            terms = sx[:, None, :].astype(np.float64) * (d.T[None].astype(np.float64) * isum
                                                         - dmin.T[None].astype(np.float64) * nsum)
        y[:, p * PANEL:(p + 1) * PANEL] = terms.sum(-1)
    y = y[:, :m].astype(np.float32)
    if b is not None:
        y = y + b
    return y.reshape(lead + (m,))


def quantize_np(w, fmt):
    return quantize_int8_np(w) if fmt == "int8" else quantize_q4_np(w)


# --- recipes: which matrices get which format -------------------------------------------------------------------
# The matrices a live step streams, by group (canonical names, checkpoint/weights.py), the conv stem's kernels
# included (as [Cout, Cin * 3] matrices): quantised, every encoder matmul computes each row the same way
# whatever the number of rows, so a stream's 4-frame steps give offline's values exactly. Norms, biases, the
# AdaRMSNorm MLPs (run once per transcription) and the embedding lookup (one row per token) keep the file's
# dtype: a few MB of the 8.9 GB.
GROUPS = {"conv": "enc.conv*", "enc": "enc.layers.*", "adapter": "adapter.*", "dec": "dec.layers.*",
          "lm_head": "lm_head"}
MATRIX_SUFFIXES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def quantizable(names):
    """The canonical names (plus "lm_head", the tied output projection) that a recipe may quantise."""
    mats = [n for n in names if n.startswith(("enc.layers.", "dec.layers.")) and n.rsplit(".", 1)[1] in MATRIX_SUFFIXES]
    convs = [n for n in names if n.startswith("enc.conv") and n.endswith(".weight")]
    return convs + mats + [n for n in names if n.startswith("adapter.")] + ["lm_head"]


def fits(fmt, shape):
    """Whether a [M, K] matrix (a conv kernel flattened to [Cout, Cin * k]) can be stored in `fmt`."""
    k = int(np.prod(shape[1:]))
    return k > 0 and k % BLOCK == 0 and (fmt == "int8" or k <= SUPER or k % SUPER == 0)


def parse_recipe(spec):
    """"q4" | "int8" | "q4,lm_head=int8,enc.layers.*.w2=int8" | "none" -> [(pattern, fmt or None)], applied in
    order (later entries win). A bare format applies to every quantisable matrix; a key is a group (enc,
    adapter, dec, lm_head) or a glob over canonical names; "none" keeps the file's weights."""
    if spec is None:
        return []
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"quantize must be a recipe string such as 'q4' or 'q4,lm_head=int8', got {spec!r}")
    rules = []
    for part in spec.split(","):
        key, _, fmt = part.strip().rpartition("=")
        fmt = fmt.strip()
        if fmt not in FORMATS + ("none",):
            raise ValueError(f"unknown quantize format {fmt!r} in {spec!r}: choose int8, q4 or none")
        rules.append((GROUPS.get(key.strip(), key.strip()) or "*", None if fmt == "none" else fmt))
    return rules


def plan(spec, shapes):
    """{name: fmt} for the quantisable matrices of `shapes` ({canonical name: shape}, "lm_head" included) that
    a recipe selects; a rule that selects nothing is an error. A q4 matrix whose width q4 cannot hold (the
    conv stem's first kernel, 384 = 128 * 3 inputs) takes int8; one that fits neither keeps its dtype."""
    import fnmatch
    targets, out = quantizable(list(shapes)), {}
    for pattern, fmt in parse_recipe(spec):
        hit = [n for n in targets if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ValueError(f"quantize rule {pattern!r} matches no quantisable matrix (groups: {', '.join(GROUPS)})")
        for n in hit:
            out[n] = fmt
    out = {n: (f if not f or fits(f, shapes[n]) else "int8") for n, f in out.items()}
    return {n: f for n, f in out.items() if f and fits(f, shapes[n])}
