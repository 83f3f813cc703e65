"""`voxtral-ref compare`: two dumps, row by row, and a verdict naming where a port's bug enters.

Every stage is causal, so an error that enters at some sample shows in a later stage only in rows that
have heard that sample. For each tensor we find the first row over tolerance; the verdict is the failing
(row, stage) pair that has heard the least audio (names.reach), pipeline order breaking ties. Decoder
rows depend on the ids fed back, so they are compared only up to the first differing token: the changed
token makes `decoder_in` differ from that position on however right the decoder is (`dump --force-ids`
feeds the port's ids to the reference so the rest stays comparable).

Shapes are strict: only documented differences are allowed (a leading batch dim of 1; HF's
teacher-forced forward with one position more; a port that writes one logits row per decoding step; a
different number of generated ids). Anything else fails and names the expected shape.
"""

from typing import NamedTuple, Optional

import numpy as np

from ...errors import VoxtralError
from .names import POSITION_STAGES, STAGES, find_stage, pipeline_order, reach, row_ms, stage_of

# With --baseline, a row fails only past this multiple of the largest error the reference itself makes in
# the port's mode (and past the plain tolerance): a port's rounding differs from ours in detail, not in size.
BASELINE_FACTOR = 2.0


class Context(NamedTuple):
    """What compare needs beyond the two tensors: the prompt length, where the ids part, the windows."""
    n_prompt: Optional[int] = None        # P
    id_limit: Optional[int] = None        # decoder rows >= this are fed different ids: not compared
    windows: dict = {}                    # {"encoder": frames, "decoder": positions} from the dump's metadata


class Row(NamedTuple):
    name: str
    ok: bool
    ref_shape: tuple
    other_shape: tuple
    max_abs: float                # max |other - ref| over the compared rows; for ids, how many differ
    rel: float                    # max over rows of the row's error / max |ref row|; ids: the fraction that differ
    first: Optional[int] = None   # first row over tolerance (None: constants, shape failures, or none)
    worst: Optional[int] = None   # the row with the largest error
    ratio: Optional[float] = None  # max_abs / the baseline's max_abs (--baseline)
    note: str = ""                # what was cropped or why it failed
    hint: str = ""                # what the error's pattern suggests


def _drop_batch(a, b):
    """HF-style dumps carry a leading batch dim of 1 ([1, T, C] vs [T, C]): drop it on either side."""
    while a.ndim > b.ndim and a.shape[0] == 1:
        a = a[0]
    while b.ndim > a.ndim and b.shape[0] == 1:
        b = b[0]
    return a, b


def _expected(name, ref):
    st = stage_of(name)
    return f"expected [{', '.join(map(str, ref.shape))}]" + (f" = {st.shape}" if st else "")


def align(name, a, b, ctx):
    """(a, b, first row's position, notes) cropped to the rows that are comparable, or a string saying why
    the shapes cannot be compared. a is REF, b OTHER, batch dims already dropped."""
    st, notes = stage_of(name), []
    axis = st.time_axis if st else None
    positional = st is not None and st.pattern in POSITION_STAGES
    offset = 0
    if a.shape != b.shape:
        if a.ndim != b.ndim or any(x != y for k, (x, y) in enumerate(zip(a.shape, b.shape)) if k != axis):
            if a.shape == b.shape[::-1]:
                return f"shape {list(b.shape)} is REF's transposed: ours is " + \
                    ("[128, T] (bands first)" if name == "mel" else "time-major [rows, features]")
            return f"shape {list(b.shape)}, {_expected(name, a)}"
        na, nb = a.shape[axis], b.shape[axis]
        if name == "logits" and ctx.n_prompt and nb == na - (ctx.n_prompt - 1):
            a, offset = a[ctx.n_prompt - 1:], ctx.n_prompt - 1
            notes.append(f"one logits row per step: OTHER's row k is REF's row P-1+k = {offset}+k")
        elif positional and (abs(na - nb) == 1 or ctx.id_limit is not None):
            n = min(na, nb)
            a, b = a.take(range(n), axis), b.take(range(n), axis)
            notes.append(f"first {n} of {na} / {nb} positions" + (" (HF's teacher-forced forward has one more)"
                                                                   if abs(na - nb) == 1 else ""))
        else:
            return f"{nb} rows along axis {axis}, {_expected(name, a)}"
    if positional and ctx.id_limit is not None and ctx.id_limit - offset < a.shape[axis]:
        n = max(ctx.id_limit - offset, 0)
        a, b = a.take(range(n), axis), b.take(range(n), axis)
        notes.append(f"positions from {ctx.id_limit} on not compared: the ids fed there differ "
                     f"(dump --force-ids compares them)")
    if name.endswith(".attention") and a.shape[1] != a.shape[2]:       # keys: the same positions as queries
        a, b = a[:, :, :a.shape[1]], b[:, :, :a.shape[1]]
    return a, b, offset, notes


def row_errors(a, b, axis):
    """Max |b - a| per row along the time axis (one row for constants); NaN or Inf in either -> inf."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):
        err = np.abs(b - a)
    err[~np.isfinite(err)] = np.inf
    err = np.moveaxis(err, axis, 0) if axis is not None else err[None]
    return err.reshape(len(err), -1).max(1, initial=0.0)                          # [rows]


def compare_tensor(name, ref, other, rtol, atol, ctx=Context(), base=None):
    """One Row: floats within atol + rtol * max|ref| row by row (and, with a baseline, within
    BASELINE_FACTOR times its error), ids identical, shapes as documented."""
    shapes = (tuple(np.shape(ref)), tuple(np.shape(other)))
    ref, other = np.asarray(ref), np.asarray(other)
    for side, t in (("REF", ref), ("OTHER", other)):
        if t.dtype.kind == "c":
            return Row(name, False, *shapes, np.nan, np.nan, note=f"{side} is complex ({t.dtype}): no stage is; "
                       "compare real and imaginary parts as two tensors")
        if t.dtype.kind not in "fiub":
            return Row(name, False, *shapes, np.nan, np.nan, note=f"{side} is not numeric (dtype {t.dtype})")
    a, b = _drop_batch(ref, other)
    dropped = ["batch dim dropped"] if (a.ndim, b.ndim) != (ref.ndim, other.ndim) else []
    aligned = align(name, a, b, ctx)
    if isinstance(aligned, str):
        return Row(name, False, *shapes, np.nan, np.nan, note="; ".join(dropped + [aligned]))
    a, b, offset, notes = aligned
    # NaN passes every tolerance test it meets (and in REF it makes the tolerance itself infinite): any
    # non-finite value fails, named
    nonfinite = [f"{side} holds {n} NaN or infinite values" for side, t in (("REF", a), ("OTHER", b), ("BASE", base))
                 if t is not None and np.asarray(t).dtype.kind == "f" and (n := int((~np.isfinite(t)).sum()))]
    notes = dropped + nonfinite + notes
    st = stage_of(name)
    axis = st.time_axis if st else None
    if a.dtype.kind in "iub" or b.dtype.kind in "iub":                           # ids: exact, length too
        row = _compare_ids(name, a.reshape(-1), b.reshape(-1), shapes, notes)
        if not row.ok and base is not None and np.array_equal(np.asarray(base).reshape(-1), b.reshape(-1)):
            return row._replace(ok=True, note=row.note + "; equal to the baseline's: the mode's own choice")
        return row
    errs = row_errors(a, b, axis)                                                # [rows]
    # Each row is measured against its own scale (max |ref| over the row; the whole tensor's for samples and
    # constants): RMSNorm rescales every row to unit size, so a small row's error grows by the same factor
    # downstream, and only errors relative to their row keep their size from stage to stage.
    scale = row_errors(np.zeros_like(a), a, axis) if a.ndim > 1 else \
        np.full(len(errs), np.abs(a.astype(np.float64)).max(initial=0.0))       # [rows]
    tol = atol + rtol * scale
    ratio = None
    max_abs = float(errs.max(initial=0.0))
    if base is not None:                     # the baseline's worst row: its per-row errors are too noisy to use
        base_max = float(_baseline_errors(name, a, base, offset, axis).max(initial=0.0))
        tol = np.maximum(tol, BASELINE_FACTOR * base_max)
        ratio = max_abs / base_max if base_max > 0 else (0.0 if max_abs == 0 else np.inf)
    bad = np.flatnonzero((errs > tol) | np.isinf(errs))                       # inf: a NaN or inf in a row
    with np.errstate(divide="ignore", invalid="ignore"):
        rels = np.where(errs == 0, 0.0, errs / scale)
    rel = float(rels.max(initial=0.0))
    timed = axis is not None
    first = int(bad[0]) + offset if len(bad) and timed else None
    worst = int(np.argmax(errs)) + offset if len(errs) and timed else None
    row = Row(name, not len(bad) and not nonfinite, *shapes, max_abs, rel, first, worst, ratio, "; ".join(notes))
    return row._replace(hint=pattern_hint(row, a, b, ctx)) if len(bad) and not nonfinite else row


def _compare_ids(name, a, b, shapes, notes):
    n = min(len(a), len(b))
    wrong = np.flatnonzero(a[:n] != b[:n])
    first = int(wrong[0]) if len(wrong) else (n if len(a) != len(b) else None)
    if len(wrong):
        notes.append(f"{len(wrong)} ids differ, the first at {first}: {a[first]} vs {b[first]}")
    if len(a) != len(b):
        notes.append(f"{len(a)} vs {len(b)} ids")
    count = len(wrong) + abs(len(a) - len(b))
    return Row(name, first is None, *shapes, float(count), count / max(len(a), 1), first, first,
               note="; ".join(notes))


def _baseline_errors(name, a, base, offset, axis):
    """The reference's own error in the port's mode, per compared row (0 where the baseline has no row)."""
    base = _drop_batch(np.asarray(base, np.float32), a)[0]
    if axis is None:
        return row_errors(a, base, None) if base.shape == a.shape else np.zeros(1)
    n = min(a.shape[axis], base.shape[axis] - offset)
    out = np.zeros(a.shape[axis])
    if n > 0 and base.ndim == a.ndim:
        out[:n] = row_errors(a.take(range(n), axis), base.take(range(offset, offset + n), axis), axis)
    return out


def _explains(b, a, guess):
    """Does `guess` (a transformation of REF) account for OTHER far better than REF itself does?"""
    return guess.shape == b.shape and np.abs(b - guess).max(initial=0) <= 0.1 * np.abs(b - a).max(initial=0)


def pattern_hint(row, a, b, ctx):
    """What a failing tensor's error pattern suggests, where it is telling."""
    name, first = row.name, row.first
    a, b = a.astype(np.float64), b.astype(np.float64)
    if name == "t_cond" and _explains(b, a, np.roll(a, len(a) // 2)):
        return "OTHER is REF with its halves swapped: t_cond is [cos | sin], cos first"
    if name == "adapter_in" and a.shape == b.shape:
        n, c = a.shape[0], a.shape[1] // 4
        if _explains(b, a, a.reshape(n, 4, c).transpose(0, 2, 1).reshape(n, 4 * c)):
            return ("frames concatenated channel-major: adapter_in is a row-major reshape [T/2, C] -> [T/8, 4C], "
                    "frame 4k's C values first")
    layer = name.split(".")[0] if name.startswith(("encoder.layers.", "decoder.layers.")) and \
        name.count(".") == 2 else None
    window = ctx.windows.get(layer) if layer else None
    if window and first in (window - 1, window):
        return (f"first bad row {first} = window {window}{' - 1' if first < window else ''}: the sliding-window "
                f"rule (key j is visible to query i iff i - window < j <= i, window {window})")
    if layer == "decoder" and ctx.n_prompt and first == ctx.n_prompt:
        return (f"the prompt's rows 0..{first - 1} (prefill) agree and decoding fails from its first step: the "
                "KV cache (ring size, which positions it keeps) or the decode step's position")
    if layer and first == 1:
        return ("row 0 agrees, row 1 does not: position 0 attends only to itself and rotates by angle 0, so "
                "look at q/k: the RoPE layout (interleaved pairs vs split halves), theta, or the positions")
    if a.shape == b.shape and a.size:
        c = a.ravel() @ b.ravel() / max(a.ravel() @ a.ravel(), 1e-300)
        if abs(c - 1) > 1e-3 and _explains(b, a, c * a):
            return f"OTHER = {c:.6g} x REF: a scale factor (a norm weight, an attention scale, a unit?)"
    return ""


def context(ref, other, meta, base=None):
    """The Context of a comparison: P from either side's prompt_ids (or the metadata), the first position
    fed a different id (REF against OTHER, and against the baseline), the windows from REF's metadata."""
    n_prompt = next((len(np.asarray(t["prompt_ids"]).reshape(-1)) for t in (ref, other) if "prompt_ids" in t),
                    int(meta["n_prompt"]) if str(meta.get("n_prompt", "")).isdigit() else None)
    limit = None
    for side in (other, base):
        if n_prompt and side is not None and "token_ids" in ref and "token_ids" in side:
            r = compare_tensor("token_ids", ref["token_ids"], side["token_ids"], 0, 0)
            if r.first is not None:
                limit = min(limit or 1 << 62, n_prompt + r.first)
    windows = {k: int(meta[f"{k}_window"]) for k in ("encoder", "decoder") if str(meta.get(f"{k}_window", "")).isdigit()}
    return Context(n_prompt, limit, windows)


def compare_all(ref, other, rtol, atol, meta=None, base=None):
    """(rows for the common names in pipeline order, names only in ref, names only in other, Context)."""
    ctx = context(ref, other, meta or {}, base)
    common = pipeline_order(set(ref) & set(other))
    rows = [compare_tensor(n, ref[n], other[n], rtol, atol, ctx, None if base is None else base.get(n))
            for n in common]
    return rows, pipeline_order(set(ref) - set(other)), pipeline_order(set(other) - set(ref)), ctx


def _order_key(row, ctx):
    """(padded samples the failing row has heard, pipeline position): the earliest is where the bug enters."""
    s = find_stage(row.name)
    if s is None:
        return (float("inf"), len(STAGES), -1)
    st = STAGES[s[0]]
    r = row.first if row.first is not None else 0
    if st.pattern == "token_ids":                 # token k is chosen by position P - 1 + k
        r += (ctx.n_prompt or 1) - 1
    if st.time_axis is None:                      # constants enter the data flow at decoder position 0
        return (reach(STAGES[find_stage("decoder_in")[0]], 0), *s)
    return (reach(st, r), *s)


def verdict(rows, ctx):
    """The failing Row where the bug enters, and the hint for it (from its pattern and its context)."""
    failing = [r for r in rows if not r.ok]
    if not failing:
        return None, ""
    v = min(failing, key=lambda r: _order_key(r, ctx))
    if v.hint:
        return v, v.hint
    name = v.name
    if name == "token_ids":
        return v, ("the logits agree within tolerance up to this token, yet the argmax differs: a near tie "
                   "between the top two; dump --force-ids with the port's ids compares the positions after it")
    if name == "logits" and v.first is not None:
        return v, "final_norm agrees: the LM head (tied: logits = final_norm @ tok_embeddings.T, no bias)"
    if name.startswith("decoder.layers.") and name.count(".") == 2 and v.first == 0:
        return v, ("wrong from row 0 while decoder_in and the ada scales agree: the layer's norms or MLP; "
                   "AdaRMSNorm scales only the FFN norm, RMSNorm(h) * (1 + ada_scale)")
    if name in ("conv1", "conv2") and v.first == 0:
        return v, ("wrong from row 0 while its input agrees: the conv's left padding (2 frames of zeros for conv1, "
                   "1 for conv2, none on the right), its bias, or the exact (erf) GELU")
    return v, ""


def _shape(s):
    return "[" + ", ".join(map(str, s)) + "]"


def _where(name, r):
    st = stage_of(name)
    if r is None or st is None or st.time_axis is None:
        return "-"
    return f"{r} ({row_ms(st, r):.0f} ms)"


def format_report(rows, only_ref, only_other, rtol, atol, ctx, baseline=False):
    """The comparison as text lines; the verdict row is marked `>>` and explained at the end."""
    v, hint = verdict(rows, ctx)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"   {'stage':<{width}}  {'ref shape':<16} {'other shape':<16} {'max abs err':>11} {'rel err':>9}"
             + (f" {'x base':>7}" if baseline else "") + f"  {'first bad row':>16}  {'worst row':>16}  result"]
    for r in rows:
        mark = ">> " if v is not None and r.name == v.name else "   "
        lines.append(f"{mark}{r.name:<{width}}  {_shape(r.ref_shape):<16} {_shape(r.other_shape):<16} "
                     f"{r.max_abs:>11.3g} {r.rel:>9.2g}" + (f" {r.ratio if r.ratio is not None else np.nan:>7.3g}"
                                                             if baseline else "")
                     + f"  {_where(r.name, r.first):>16}  {_where(r.name, r.worst):>16}  {'ok' if r.ok else 'FAIL'}"
                     + (f"  ({r.note})" if r.note else ""))
    for label, names in (("only in REF", only_ref), ("only in OTHER", only_other)):
        if names:
            lines.append(f"{label} (not compared): {', '.join(names)}")
    bad = sum(not r.ok for r in rows)
    rule = f"|err| <= {atol:g} + {rtol:g} * max|ref| per row" + \
        (f", or <= {BASELINE_FACTOR:g} x the baseline's error" if baseline else "") + "; token ids exact"
    lines.append(f"{len(rows)} compared, {bad} over tolerance ({rule}); times on the padded clock "
                 f"(real audio starts at 2560 ms)")
    if v is not None:
        at = "" if v.first is None else f", first at row {v.first}" + \
            (f" ({row_ms(stage_of(v.name), v.first):.0f} ms)" if stage_of(v.name) else "")
        lines.append(f"verdict: the first divergence is {v.name}{at}" + (f"\nhint: {hint}" if hint else ""))
    return lines


def check_tolerance(text):
    """argparse type for --rtol/--atol: a finite number >= 0 (NaN would pass everything)."""
    import argparse
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance is a finite number >= 0")
    return x


def require_common(rows, ref_path, other_path):
    if not rows:
        raise VoxtralError(f"{ref_path} and {other_path} have no tensor name in common: give a --map")
