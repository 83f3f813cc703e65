"""`voxtral-ref check-weights REF PORT_FILE`: a port's converted weights against the checkpoint.

Weight conversion is where ports break most often, and silently: a transposed square matrix, q/k rows
left in Mistral's interleaved-pair RoPE order (or permuted twice), a scale folded in. Tensors are paired by
canonical name (voxtral_ref.checkpoint.weights.canonical_names); the port may use canonical, Mistral or HF
names (or a --map). Each pair is compared in the layout the port's names imply (HF names: split-half RoPE
rows; Mistral names: interleaved; canonical or other names: REF's own), as a relative RMS error
rms(port - ref) / rms(ref), against what the port's storage format costs: the same tensor rounded to that
format (f16, bf16, or a GGUF quantisation through the `gguf` package) and back. A pair that fails is tried
against the usual mistakes, and the one that explains it is named.
"""

from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from ...checkpoint.weights import canonical_names, read_safetensors
from ...errors import VoxtralError
from .tensorio import load_tensors, rename

# A pair passes when its error is within this multiple of its format's own rounding error, plus float32's.
FORMAT_SLACK, F32_FLOOR = 1.5, 1e-6


class WeightRow(NamedTuple):
    name: str                     # canonical
    port_name: str
    fmt: str                      # the port's storage: F32, F16, BF16, Q4_0, ...
    shape: tuple
    port_shape: tuple
    rel_rms: float
    expected: float               # the format's own relative RMS error on this tensor
    ok: bool
    finding: str


def read_port(path):
    """{name: (float32 array, storage format)} from a .gguf (dequantised), .safetensors, .npz, a folder of
    .npy, or a checkpoint directory (Mistral or HF)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return _read_gguf(p)
    if p.is_dir() and not any(p.glob("*.npy")):
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise VoxtralError(f"{p} holds no .safetensors or .npy files")
        tensors = {}
        for f in files:
            tensors.update(read_safetensors(f))
    else:
        tensors = load_tensors(p)
    out = {}
    for name, t in tensors.items():
        if t.dtype.kind not in "f" and t.dtype != ml_dtypes.bfloat16:
            continue                                               # ids, quantisation scales: not weights
        fmt = "BF16" if t.dtype == ml_dtypes.bfloat16 else {2: "F16", 4: "F32", 8: "F64"}[t.dtype.itemsize]
        out[name] = (np.asarray(t, np.float32), fmt)
    return out


def _read_gguf(p):
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise VoxtralError("reading GGUF needs the gguf package: pip install 'voxtral_ref[oracle]'") from None
    try:
        reader = gguf.GGUFReader(p)
    except FileNotFoundError:
        raise VoxtralError(f"missing file: {p}") from None
    except (OSError, ValueError, KeyError) as e:
        raise VoxtralError(f"cannot read GGUF {p}: {e}") from None
    out = {}
    for t in reader.tensors:
        try:
            out[t.name] = (np.asarray(dequantize(t.data, t.tensor_type), np.float32), t.tensor_type.name)
        except NotImplementedError:
            raise VoxtralError(f"{p}: tensor {t.name} is {t.tensor_type.name}, which the gguf package cannot "
                               "dequantise") from None
    return out


def format_error(ref, fmt):
    """Relative RMS error of `ref` stored as `fmt` and read back: what a correct conversion costs."""
    if fmt in ("F32", "F64"):
        return 0.0
    if fmt in ("F16", "BF16"):
        back = ref.astype(np.float16 if fmt == "F16" else ml_dtypes.bfloat16).astype(np.float32)
    else:
        import gguf
        from gguf.quants import dequantize, quantize
        q = gguf.GGMLQuantizationType[fmt]
        try:
            back = dequantize(quantize(ref, q), q).reshape(ref.shape)
        except (NotImplementedError, ValueError, AssertionError):
            return np.nan                                          # no reference quantiser: no expectation
    return rel_rms(back, ref)


def rel_rms(x, ref):
    den = float(np.sqrt(np.mean(np.square(ref, dtype=np.float64)))) if ref.size else 0.0
    num = float(np.sqrt(np.mean(np.square(x.astype(np.float64) - ref)))) if ref.size else 0.0
    return num / den if den else (0.0 if num == 0 else np.inf)


def rope_rows(w, head_dim, to_split_half):
    """Permute q/k projection rows (or a q bias) between Mistral's interleaved pairs (2i, 2i+1) and HF's
    split halves (i, i + hd/2), per head. [H*hd, ...] -> [H*hd, ...]"""
    h, rest = w.shape[0] // head_dim, w.shape[1:]
    if to_split_half:
        return w.reshape(h, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(h, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _rope_head_dim(canon, cfg):
    part = canon.split(".")
    if part[-1] in ("wq", "wk", "bq"):
        return cfg.encoder.head_dim if part[0] == "enc" else cfg.decoder.head_dim
    return None


def check_pair(canon, port_name, ref, port, fmt, head_dim, want_split_half, ref_split_half):
    """One WeightRow: `ref` (REF's layout) brought to the layout the port's names imply, then compared."""
    if head_dim and want_split_half is not None and want_split_half != ref_split_half:
        ref = rope_rows(ref, head_dim, want_split_half)
    expected = format_error(ref, fmt) if port.shape == ref.shape else np.nan
    limit = FORMAT_SLACK * (0.0 if np.isnan(expected) else expected) + F32_FLOOR

    def row(err, ok, finding):
        return WeightRow(canon, port_name, fmt, ref.shape, port.shape, err, expected, ok, finding)

    guesses = []
    if port.shape == ref.shape:
        err = rel_rms(port, ref)
        if err <= limit:
            return row(err, True, "")
        if head_dim:
            for split in (True, False):
                guesses.append((rope_rows(ref, head_dim, split), "q/k rows in the other RoPE layout: " +
                                ("split halves (HF) where interleaved pairs (Mistral) belong" if split else
                                 "interleaved pairs (Mistral) where split halves (HF) belong")))
    else:
        err = np.nan
    if ref.ndim == 2 and port.shape == ref.shape[::-1] and ref.shape[0] != ref.shape[1]:
        guesses.append((ref.T, "transposed: stored [in, out], the checkpoint's layout is [out, in]"))
    if port.shape == ref.shape and ref.ndim == 2 and ref.shape[0] == ref.shape[1]:
        guesses.append((ref.T, "transposed (a square matrix: same shape, rows and columns swapped)"))
    if port.shape == ref.shape and port.size:
        x, y = ref.astype(np.float64).ravel(), port.astype(np.float64).ravel()
        c = float(x @ y / max(x @ x, 1e-300))
        guesses.append((c * ref, f"scaled: the port's tensor is {c:.6g} x the checkpoint's"))
    for guess, finding in guesses:
        if guess.shape == port.shape and rel_rms(port, guess) <= limit:
            return row(err, False, finding)
    if port.shape != ref.shape:
        return row(err, False, f"shape {list(port.shape)}, expected {list(ref.shape)}")
    return row(err, False, "")


def check_weights(ref_dir, port_path, rules=()):
    """WeightRows for every tensor the model reads (a missing one fails), plus the port's names that pair
    with nothing (as rows with ok=False and no shape)."""
    from ... import load
    model = load(ref_dir, backend="numpy")
    cfg = model.cfg
    port = rename(read_port(port_path), rules)
    names = canonical_names(cfg)
    scheme = {}                                                 # any name -> (canonical, split-half wanted?)
    for canon, mistral, hf, _ in names:
        scheme[canon] = (canon, None)
        scheme[mistral] = (canon, False)
        scheme[hf] = (canon, True)
    ref_split_half = cfg.format == "hf"
    rows, seen = [], set()
    for name in sorted(port):
        if name not in scheme:
            rows.append(WeightRow("-", name, port[name][1], (), port[name][0].shape, np.nan, np.nan, False,
                                  "no tensor of the model has this name: give a --map"))
            continue
        canon, want = scheme[name]
        seen.add(canon)
        ref = np.asarray(model.weights[canon], np.float32)
        rows.append(check_pair(canon, name, ref, port[name][0], port[name][1], _rope_head_dim(canon, cfg), want,
                               ref_split_half))
    for canon, _, _, shape in names:
        if canon not in seen:
            rows.append(WeightRow(canon, "-", "-", shape, (), np.nan, np.nan, False, "missing from the port"))
    order = {n[0]: k for k, n in enumerate(names)}
    return sorted(rows, key=lambda r: order.get(r.name, len(order)))


def format_weights(rows):
    width = max(len(r.name) for r in rows)
    pw = max(len(r.port_name) for r in rows)
    lines = [f"{'canonical name':<{width}}  {'port name':<{pw}}  {'format':<6}  {'rel RMS err':>11}  "
             f"{'format alone':>12}  result"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.port_name:<{pw}}  {r.fmt:<6}  {r.rel_rms:>11.3g}  {r.expected:>12.3g}  "
                     f"{'ok' if r.ok else 'FAIL'}" + (f"  ({r.finding})" if r.finding else ""))
    bad = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} tensors, {bad} failing (a tensor passes within {FORMAT_SLACK:g} x its format's own "
                 f"rounding error + {F32_FLOOR:g})")
    return lines
