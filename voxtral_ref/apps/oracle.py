"""The golden-tensor oracle: `voxtral-ref dump`, `compare` and `explain`.

A port of Voxtral Realtime to another runtime is debugged by dumping the same intermediates from both
sides and looking for the FIRST stage where they part: every later stage differs too, so only the code
of that one stage needs reading. `STAGES` below is the single source of the names, their pipeline order,
which axis grows with the audio, and the plain-language line `explain` prints; docs/tensors.md documents
them (shapes, positions, tolerances) and a test keeps the two in step.
"""

import fnmatch
import json
import re
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from ..config import (EOS_ID, MEL_FRAMES_PER_TOKEN, MS_PER_TOKEN, N_LEFT_PAD_TOKENS, SAMPLE_RATE, STREAMING_PAD_ID,
                     STREAMING_WORD_ID, delay_tokens, prompt_ids)
from ..errors import VoxtralError
from ..checkpoint.weights import read_safetensors, write_safetensors


class Stage(NamedTuple):
    pattern: str                  # a tensor name; "{i}" stands for a layer number
    time_axis: Optional[int]      # the axis that grows with the audio; None for per-utterance constants
    what: str                     # what the stage does, in one line


STAGES = (
    Stage("audio", 0, "the input: mono float32 samples at 16 kHz"),
    Stage("padded_audio", 0, "2.56 s (32 tokens) of silence on the left; on the right, up to a whole 80 ms "
          "token plus delay + 11 tokens, so the delayed text of the last words still comes out"),
    Stage("mel", 1, "log-mel spectrogram, 100 frames/s: 25 ms Hann windows every 10 ms, 128 mel bands up to "
          "8 kHz, log10 floored at -6.5, then (x + 4) / 4"),
    Stage("conv1", 0, "causal convolution over 3 mel frames (stride 1) + GELU: 128 bands -> encoder width"),
    Stage("conv2", 0, "causal convolution over 3 frames with stride 2 + GELU: halves the rate to 50 frames/s"),
    Stage("encoder.layers.{i}", 0, "encoder layer: causal sliding-window self-attention with RoPE, then a "
          "SwiGLU MLP, each added to the residual stream"),
    Stage("encoder_out", 0, "the encoder's final RMSNorm"),
    Stage("adapter_in", 0, "4 consecutive encoder frames side by side: one vector per 80 ms, the text rate"),
    Stage("adapter_out", 0, "projector Linear-GELU-Linear to the decoder width: one audio embedding per "
          "text position"),
    Stage("t_cond", None, "sinusoidal embedding of the delay in tokens, [cos | sin]: tells the decoder how far "
          "behind the audio it writes"),
    Stage("decoder.layers.{i}.ada_scale", None, "this layer's scale from t_cond (Linear-GELU-Linear); its MLP "
          "input is RMSNorm(h) * (1 + scale)"),
    Stage("prompt_ids", 0, "the prompt: BOS, then STREAMING_PAD over the 32 silent tokens and the delay"),
    Stage("decoder_in", 0, "token embedding + audio embedding of each position (added; no placeholder tokens)"),
    Stage("decoder.layers.{i}", 0, "decoder layer: grouped-query causal self-attention with RoPE and a KV "
          "cache, then the AdaRMSNorm-scaled SwiGLU MLP"),
    Stage("final_norm", 0, "the decoder's final RMSNorm"),
    Stage("logits", 0, "a score per vocabulary entry (LM head tied to the token embeddings); the argmax at "
          "position p is token p + 1"),
    Stage("token_ids", 0, "the greedy output after the prompt: text, STREAMING_PAD while waiting for words, "
          "STREAMING_WORD at word boundaries, maybe a final EOS"),
)
TOKEN_ID_NAMES = ("prompt_ids", "token_ids")


def name_regex(pattern):
    """A name pattern as a regex matching whole names; "{i}" captures the layer number."""
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + r"\Z")


_STAGE_RES = [name_regex(s.pattern) for s in STAGES]


def stage_names(cfg):
    """Every name in a full dump for this model config, in pipeline order."""
    n_layers = {"encoder": cfg.encoder.n_layers, "decoder": cfg.decoder.n_layers}
    return [s.pattern.format(i=i) for s in STAGES
            for i in (range(n_layers[s.pattern.split(".")[0]]) if "{i}" in s.pattern else [None])]


def find_stage(name):
    """(index in STAGES, layer number or -1), or None for a name outside the pipeline."""
    for k, rx in enumerate(_STAGE_RES):
        m = rx.match(name)
        if m:
            return k, int(m.group(1)) if m.groups() else -1
    return None


def pipeline_order(names):
    """Names sorted as data flows through the model (layers by number); unknown names last, by name."""
    def key(name):
        s = find_stage(name)
        return (*s, name) if s else (len(STAGES), -1, name)
    return sorted(names, key=key)


# --- capture and dump -------------------------------------------------------------------------------------
def capture(model, audio, sample_rate=SAMPLE_RATE, delay_ms=None):
    """Transcribe with a trace -> (Transcript, {name: array} in pipeline order, {name: seconds}).

    Tensors traced once per decoder step are concatenated along positions. Seconds are wall time since
    the previous traced tensor, summed per name (so they are per-stage only as far as the pipeline traces
    each tensor as soon as it is computed)."""
    parts, seconds = {}, {}
    last = time.perf_counter()

    def trace(name, tensor):
        nonlocal last
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - last
        parts.setdefault(name, []).append(np.array(tensor))
        last = time.perf_counter()                               # our copy is not the pipeline's time

    r = model.transcribe(audio, sample_rate, delay_ms=delay_ms, trace=trace)
    tensors = {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in parts.items()}
    tensors["prompt_ids"] = np.asarray(prompt_ids(delay_tokens(r.delay_ms)), np.int64)
    tensors["token_ids"] = np.asarray(r.token_ids, np.int64)
    return r, {n: tensors[n] for n in pipeline_order(tensors)}, seconds


def select(names, patterns):
    """The names matching any pattern: a glob (`decoder.layers.*.ada_scale`) or a prefix ending at a name
    boundary (`encoder` selects encoder.layers.* and encoder_out; `decoder.layers.1` not layer 10)."""
    def hit(name, p):
        return fnmatch.fnmatchcase(name, p) or (name.startswith(p) and name[len(p):][:1] in ("", ".", "_"))
    for p in patterns:
        if not any(hit(n, p) for n in names):
            raise VoxtralError(f"--stages {p!r} matches no tensor; the names are: {', '.join(names)}")
    return [n for n in names if any(hit(n, p) for p in patterns)]


def _load(args):
    """The model and the audio of a dump or explain command line."""
    from .. import load
    from ..stages.audio import read_audio
    return (load(args.model, backend=args.backend), *read_audio(args.audio))


def cmd_dump(args):
    from .. import __version__
    model, audio, sr = _load(args)
    names = select(stage_names(model.cfg), args.stages or ["*"])       # a bad pattern fails before the run
    r, tensors, _ = capture(model, audio, sr, args.delay_ms)
    out = {n: tensors[n].astype(np.int64 if n in TOKEN_ID_NAMES else np.float32) for n in names}
    meta = {"model": str(model.path), "format": model.cfg.format, "delay_ms": str(r.delay_ms),
            "voxtral_ref_version": __version__, "backend": model.backend, "audio": str(args.audio),
            "names": "docs/tensors.md: decoder tensors cover positions 0..L-2 (the last token is never fed back)"}
    write_safetensors(args.out, out, meta)
    size = sum(a.nbytes for a in out.values())
    print(f"voxtral-ref dump: {len(out)} tensors, {size / 1e6:.1f} MB -> {args.out}", file=sys.stderr)


# --- compare ----------------------------------------------------------------------------------------------
def load_tensors(path):
    """{name: ndarray} from a .safetensors file, a .npz file or a folder of NAME.npy files."""
    p = Path(path)
    try:
        if p.is_dir():
            files = sorted(p.glob("*.npy"))
            if not files:
                raise VoxtralError(f"{p} holds no .npy files")
            return {f.stem: np.load(f) for f in files}
        if p.suffix == ".safetensors":
            return read_safetensors(p)
        if p.suffix == ".npz":
            with np.load(p) as z:
                return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise VoxtralError(f"missing file: {p}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise VoxtralError(f"cannot read tensors from {p}: {e}") from None
    if not p.exists():
        raise VoxtralError(f"missing file: {p}")
    raise VoxtralError(f"{p}: expected a .safetensors file, a .npz file or a folder of .npy files")


def load_name_map(path):
    """A JSON object {their name: our name}; "{i}" in both stands for a layer number. -> [(regex, ours)]"""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VoxtralError(f"missing file: {path}") from None
    except (OSError, ValueError) as e:
        raise VoxtralError(f"cannot read the name map {path}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise VoxtralError(f"{path}: a name map is a JSON object of strings, {{\"their_name\": \"our_name\"}}")
    return [(name_regex(k), v) for k, v in raw.items()]


def rename(tensors, rules):
    """Apply a name map to one side's names; names no rule matches are kept."""
    out = {}
    for name, t in tensors.items():
        new = name
        for rx, ours in rules:
            m = rx.match(name)
            if m:
                new = ours.replace("{i}", m.group(1)) if m.groups() else ours
                break
        if new in out:
            raise VoxtralError(f"two tensors are named (or mapped to) {new!r}: fix the name map")
        out[new] = t
    return out


class Row(NamedTuple):
    name: str
    ok: bool
    ref_shape: tuple
    other_shape: tuple
    max_abs: float                # max |other - ref|; for token ids, how many differ
    rel: float                    # max_abs / max |ref|, the error relative to the tensor's scale; ids: the fraction
    note: str


def _drop_batch(a, b):
    """HF-style dumps carry a leading batch dim of 1 ([1, T, C] vs [T, C]): drop it on either side."""
    while a.ndim > b.ndim and a.shape[0] == 1:
        a = a[0]
    while b.ndim > a.ndim and b.shape[0] == 1:
        b = b[0]
    return a, b


def compare_tensor(name, ref, other, rtol, atol):
    """One row: floats must agree within atol + rtol * max|ref| over the common extent of the time axis;
    token ids must be identical, length included (a port that stops early has diverged)."""
    shapes = (tuple(ref.shape), tuple(other.shape))
    a, b = _drop_batch(np.asarray(ref), np.asarray(other))
    notes = ["batch dim dropped"] if (a.ndim, b.ndim) != tuple(map(len, shapes)) else []
    stage = find_stage(name)
    axis = STAGES[stage[0]].time_axis if stage else 0
    cropped = a.shape != b.shape
    if cropped:
        differ = [k for k in range(a.ndim) if a.shape[k] != b.shape[k]] if a.ndim == b.ndim else None
        if axis is None or differ != [axis]:
            hint = ": transposed? ours is time-major" if a.shape == b.shape[::-1] else ""
            return Row(name, False, *shapes, np.nan, np.nan, "; ".join(notes + [f"shapes differ{hint}"]))
        n = min(a.shape[axis], b.shape[axis])
        notes.append(f"first {n} of {a.shape[axis]} / {b.shape[axis]} along axis {axis}")
        a, b = a.take(range(n), axis), b.take(range(n), axis)
    if a.dtype.kind in "iub" or b.dtype.kind in "iub":               # ids: count the ones that differ
        wrong = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
        if len(wrong):
            k = wrong[0]
            notes.append(f"{len(wrong)} ids differ, the first at {k}: {a.reshape(-1)[k]} vs {b.reshape(-1)[k]}")
        ok = not len(wrong) and not cropped
        return Row(name, ok, *shapes, float(len(wrong)), len(wrong) / max(a.size, 1), "; ".join(notes))
    a, b = a.astype(np.float64), b.astype(np.float64)
    err = float(np.abs(a - b).max(initial=0.0)) if np.isfinite(b).all() else np.inf
    scale = float(np.abs(a).max(initial=0.0))
    rel = err / scale if scale else (0.0 if err == 0 else np.inf)
    return Row(name, err <= atol + rtol * scale, *shapes, err, rel, "; ".join(notes))


def compare_all(ref, other, rtol, atol):
    """(rows for the common names in pipeline order, names only in ref, names only in other)."""
    common = pipeline_order(set(ref) & set(other))
    rows = [compare_tensor(n, ref[n], other[n], rtol, atol) for n in common]
    return rows, pipeline_order(set(ref) - set(other)), pipeline_order(set(other) - set(ref))


def _shape(s):
    return "[" + ", ".join(map(str, s)) + "]"


def format_report(rows, only_ref, only_other, rtol, atol):
    """The comparison as text lines; the first failing row (in pipeline order) is marked `>>`."""
    first = next((r.name for r in rows if not r.ok), None)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"   {'stage':<{width}}  {'ref shape':<16} {'other shape':<16} {'max abs err':>11} {'rel err':>9}  result"]
    for r in rows:
        mark = ">> " if r.name == first else "   "
        lines.append(f"{mark}{r.name:<{width}}  {_shape(r.ref_shape):<16} {_shape(r.other_shape):<16} "
                     f"{r.max_abs:>11.3g} {r.rel:>9.2g}  {'ok' if r.ok else 'FAIL'}"
                     + (f"  ({r.note})" if r.note else ""))
    for label, names in (("only in REF", only_ref), ("only in OTHER", only_other)):
        if names:
            lines.append(f"{label} (not compared): {', '.join(names)}")
    bad = sum(not r.ok for r in rows)
    rule = f"|err| <= {atol:g} + {rtol:g} * max|ref|; token ids exact"
    lines.append(f"{len(rows)} compared, {bad} over tolerance ({rule})"
                 + (f"; first divergence: {first}" if first else ""))
    return lines


def cmd_compare(args):
    rules = load_name_map(args.map) if args.map else []
    ref, other = (rename(load_tensors(p), rules) for p in (args.ref, args.other))
    rows, only_ref, only_other = compare_all(ref, other, args.rtol, args.atol)
    if not rows:
        raise VoxtralError(f"{args.ref} and {args.other} have no tensor name in common: give a --map")
    print(f"REF   {args.ref}\nOTHER {args.other}")
    print("\n".join(format_report(rows, only_ref, only_other, args.rtol, args.atol)))
    return 0 if all(r.ok for r in rows) else 1


# --- explain ----------------------------------------------------------------------------------------------
def _describe(t):
    """Value statistics of a float tensor; the ids themselves for an id tensor."""
    if t.dtype.kind in "iu":
        head = " ".join(map(str, t[:12])) + (" ..." if len(t) > 12 else "")
        return f"{len(t)} ids: {head}"
    return (f"min {t.min():+.4g}  max {t.max():+.4g}  mean {t.mean(dtype=np.float64):+.4g}  "
            f"std {t.std(dtype=np.float64):.4g}")


def explain_lines(tensors, seconds):
    """One row per tensor in pipeline order; before each stage (or each stack of layers), what it does."""
    width = max(len(n) for n in tensors)
    lines, seen = [], set()
    for name, t in tensors.items():
        stage = find_stage(name)
        if stage and stage[0] not in seen:
            seen.add(stage[0])
            lines.append(f"# {STAGES[stage[0]].what}")
        ms = f"{1e3 * seconds[name]:9.1f} ms" if name in seconds else " " * 12
        lines.append(f"{name:<{width}}  {_shape(t.shape):<14} {ms}  {_describe(t)}")
    return lines


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VoxtralError("--plot needs matplotlib: pip install 'voxtral_ref[plot]' (or pip install matplotlib)") from None


def token_label(tokenizer, i):
    """What to print under the spectrogram for one id."""
    short = {STREAMING_PAD_ID: ".", STREAMING_WORD_ID: "|", EOS_ID: "EOS"}
    if i in short:
        return short[i]
    text = tokenizer.token_bytes(i).decode("utf-8", errors="replace").replace("\n", "\\n")   # one line per label
    return text or tokenizer.special_names.get(i, f"<{i}>")


def plot_tokens(path, mel, token_ids, n_prompt, n_samples, tokenizer, delay_ms):
    """The log-mel spectrogram on the 80 ms token grid, and under it each emitted token at the position
    that emitted it: that position has seen audio only up to its own token, so text lags speech by the
    delay."""
    from matplotlib.figure import Figure
    n_tok = mel.shape[1] // MEL_FRAMES_PER_TOKEN
    sec = MS_PER_TOKEN / 1000                                           # 0.08 s per token
    start = N_LEFT_PAD_TOKENS * sec
    fig = Figure(figsize=(min(max(8.0, 0.12 * n_tok), 80.0), 5.0), layout="constrained")
    ax, ax_tok = fig.subplots(2, 1, sharex=True, height_ratios=[4, 1])
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, n_tok * sec, 0, mel.shape[0]))
    ax.vlines(np.arange(n_tok + 1) * sec, 0, mel.shape[0], colors="white", linewidths=0.3, alpha=0.35)
    marks = ((start, "audio starts"), ((n_prompt - 1) * sec, "first output"), (start + n_samples / SAMPLE_RATE, "audio ends"))
    for k, (x, label) in enumerate(marks):
        for a in (ax, ax_tok):
            a.axvline(x, color="cyan", linewidth=1)
        ax.text(x, mel.shape[0] * (0.97 - 0.08 * k), f" {label}", color="cyan", va="top", fontsize=8)
    ax.set_ylabel("mel band")
    ax.set_title(f"log-mel spectrogram, 80 ms token grid; tokens at the position that emitted them "
                 f"(delay {delay_ms} ms)", fontsize=9)
    for k, i in enumerate(token_ids):
        ax_tok.text((n_prompt - 1 + k + 0.5) * sec, 0.95, token_label(tokenizer, int(i)), rotation=90,
                    ha="center", va="top", fontsize=7)
    ax_tok.set_yticks([])
    ax_tok.set_xlabel("time in the padded audio (s)")
    with warnings.catch_warnings():                  # scripts the default font lacks are drawn as boxes: fine here
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=100)


def cmd_explain(args):
    if args.plot:
        _require_matplotlib()                                           # before the slow part
    model, audio, sr = _load(args)
    r, tensors, seconds = capture(model, audio, sr, args.delay_ms)
    d = model.cfg
    print(f"model {model.path} ({d.format} format, {model.backend} backend): encoder width C={d.encoder.dim}, "
          f"decoder width D={d.decoder.dim}, vocabulary V={d.decoder.vocab_size}")
    print(f"audio {args.audio}: {r.n_samples / SAMPLE_RATE:.2f} s; delay {r.delay_ms} ms; "
          f"time = wall time since the previous traced tensor, summed over decoder steps")
    print("\n".join(explain_lines(tensors, seconds)))
    print(f"text: {r.text!r}")
    if args.plot:
        plot_tokens(args.plot, tensors["mel"], r.token_ids, len(tensors["prompt_ids"]), r.n_samples,
                    model.tokenizer, r.delay_ms)
        print(f"voxtral-ref explain: plot -> {args.plot}", file=sys.stderr)


# --- command line -----------------------------------------------------------------------------------------
def add_oracle_parsers(sub):
    """Register dump, compare and explain on the `voxtral-ref` sub-command parser."""
    def model_args(p):
        p.add_argument("audio")
        p.add_argument("--model", required=True, help="checkpoint directory")
        p.add_argument("--delay-ms", type=int, default=None)
        p.add_argument("--backend", choices=["auto", "c", "numpy"], default="auto")

    d = sub.add_parser("dump", help="write every intermediate tensor of one transcription (docs/tensors.md)")
    model_args(d)
    d.add_argument("--out", required=True, help="the .safetensors file to write")
    d.add_argument("--stages", nargs="+", metavar="NAME", help="only these names: prefixes or globs")
    d.set_defaults(func=cmd_dump)

    c = sub.add_parser("compare", help="compare two dumps stage by stage; exit 1 over tolerance")
    c.add_argument("ref", help="reference tensors: .safetensors, .npz or a folder of .npy")
    c.add_argument("other", help="tensors to check, same formats")
    c.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to max|ref| (default 1e-4)")
    c.add_argument("--atol", type=float, default=0.0, help="absolute tolerance added to it (default 0)")
    c.add_argument("--map", help='JSON {"their name": "our name"}; "{i}" stands for a layer number')
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser("explain", help="walk the pipeline stage by stage: shapes, statistics, time")
    model_args(e)
    e.add_argument("--plot", metavar="PNG", help="draw the log-mel spectrogram and the emitted tokens")
    e.set_defaults(func=cmd_explain)
