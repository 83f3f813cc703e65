"""Per-matrix error of voxtral_ref's quantised formats next to ggml's, on the same matrices (not run by CI).

    python bench/quant_error.py /work/fullsize_ckpt            # needs the `gguf` package (the oracle extra)

For each matrix: relative RMS error ||W' - W|| / ||W|| of our int8 (8.5 bits per weight) and q4 (4.5 bits),
and of the gguf package's own quantisers Q8_0 (8.5 bits), Q4_1 (5 bits) and Q4_0 (4.5 bits). Matrices: a few
of the checkpoint's (the full-size benchmark checkpoint is Gaussian, N(0, 0.02)), and heavy-tailed ones,
since real weights have outliers that Gaussian random ones lack: Student t with 3 degrees of freedom, and
Gaussian with 0.1% of the weights 20x larger. Prints a table; the q4 column must be below Q4_1's.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from voxtral_ref import load  # noqa: E402
from voxtral_ref.runtime import ckernels, quant  # noqa: E402

ROWS = 1024                                     # rows taken from each checkpoint matrix (the error is per row)


def rel_rms(a, ref):
    return float(np.sqrt(np.mean((a - ref) ** 2) / np.mean(ref ** 2)))


def gguf_error(w, name):
    import gguf
    from gguf import quants
    t = getattr(gguf.GGMLQuantizationType, name)
    return rel_rms(quants.dequantize(quants.quantize(w, t), t).reshape(w.shape), w)


def matrices(model_dir):
    rng = np.random.default_rng(0)
    out = []
    if model_dir:
        w = load(model_dir, backend="c", progress=False).weights
        for name in ("enc.layers.0.wq", "enc.layers.0.w2", "dec.layers.0.w1", "dec.layers.0.w2", "tok_embeddings"):
            out.append((name, np.asarray(w._t[name][:ROWS], np.float32)))
    out.append(("Student t (3 dof), 1024x3072", (rng.standard_t(3, (ROWS, 3072)) * 0.01).astype(np.float32)))
    g = rng.standard_normal((ROWS, 3072)).astype(np.float32) * np.float32(0.02)
    hit = rng.random(g.shape) < 1e-3
    g[hit] *= 20
    out.append(("Gaussian + 0.1% outliers x20, 1024x3072", g))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="a checkpoint directory (optional: synthetic matrices only)")
    args = ap.parse_args()
    print(f"{'matrix':<42} {'int8':>7} {'Q8_0':>7} {'q4':>7} {'Q4_1':>7} {'Q4_0':>7}   (relative RMS error)")
    for name, w in matrices(args.model):
        ours = {fmt: rel_rms(ckernels.quantize(w, fmt).dequantize(), w) for fmt in quant.FORMATS}
        ref = {t: gguf_error(w, t) for t in ("Q8_0", "Q4_1", "Q4_0")}
        print(f"{name:<42} {ours['int8']:7.4f} {ref['Q8_0']:7.4f} {ours['q4']:7.4f} {ref['Q4_1']:7.4f} {ref['Q4_0']:7.4f}"
              + ("" if ours["q4"] < ref["Q4_1"] else "   <- q4 not below Q4_1"), flush=True)


if __name__ == "__main__":
    main()
