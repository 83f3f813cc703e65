"""`voxtral-ref explain`: the pipeline on your audio, stage by stage; the delayed-streams grid; a plot."""

import sys
import warnings
from pathlib import Path

import numpy as np

from ...config import (EOS_ID, MEL_FRAMES_PER_TOKEN, MS_PER_TOKEN, N_FFT, SAMPLE_RATE, STREAMING_PAD_ID,
                       STREAMING_WORD_ID)
from ...errors import VoxtralError
from .capture import capture
from .names import LEFT_PAD, STAGES, find_stage
from .tensorio import refuse_overwriting

LEFT_PAD_MS = 1000 * LEFT_PAD // SAMPLE_RATE                  # 2560: real audio starts here on the padded clock


def _shape(s):
    return "[" + ", ".join(map(str, s)) + "]"


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


def token_label(tokenizer, i):
    """What to print for one id: the text, or `.` / `|` / EOS for the streaming specials."""
    short = {STREAMING_PAD_ID: ".", STREAMING_WORD_ID: "|", EOS_ID: "EOS"}
    if i in short:
        return short[i]
    text = tokenizer.token_bytes(i).decode("utf-8", errors="replace").replace("\n", "\\n")   # one line per label
    return text or tokenizer.special_names.get(i, f"<{i}>")


def margins(logits):
    """Top-two logit margin per row: how close each greedy choice was to a tie. [rows, V] -> [rows]"""
    top2 = np.partition(logits, -2, axis=-1)[:, -2:]                                  # [rows, 2]
    return top2[:, 1] - top2[:, 0]


def grid_rows(prompt, token_ids, logits, n_delay):
    """The delayed-streams grid, one dict per decoder position p: its 80 ms slot on the padded clock, the
    real audio it has heard, the id fed there, the id it emits (token k = p - P + 1) and the real audio
    that token's text is about (80k ms: the delay d cancels), and the top-two margin of that choice."""
    seq, p_len = list(prompt) + list(token_ids), len(prompt)
    m = margins(logits)
    rows = []
    for p in range(len(seq) - 1):
        k = p - p_len + 1
        rows.append({"position": p, "slot_ms": MS_PER_TOKEN * p, "heard_to_ms": MS_PER_TOKEN * (p + 1) - LEFT_PAD_MS,
                     "fed": seq[p], "emitted": seq[p + 1] if k >= 0 else None,
                     "about_ms": MS_PER_TOKEN * k if k >= 0 else None, "margin": float(m[p]),
                     "delay": n_delay})
    return rows


def grid_lines(rows, tokenizer):
    lines = ["position  slot (ms)  heard to (ms)  fed id  emits id  text          about audio (ms)  top-2 margin"]
    for r in rows:
        emit = "" if r["emitted"] is None else f"{r['emitted']:>8}  {token_label(tokenizer, r['emitted'])[:12]:<12}"
        about = "" if r["about_ms"] is None else f"{r['about_ms']}-{r['about_ms'] + MS_PER_TOKEN}"
        lines.append(f"{r['position']:>8}  {r['slot_ms']:>9}  {r['heard_to_ms']:>13}  {r['fed']:>6}  "
                     f"{emit or ' ' * 22:<22}  {about:>16}  {r['margin']:>12.4g}")
    return lines


def band_hz():
    """The frequency each of the 128 mel bands peaks at (its filter's maximum), for axis labels."""
    from ...stages.mel import mel_filters
    return np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)[mel_filters().argmax(0)]         # [128]


def check_plot_path(path, inputs):
    """--plot must name a picture format matplotlib writes, in a folder that exists, and not an input."""
    _require_matplotlib()
    from matplotlib.figure import Figure
    p = Path(path)
    kinds = Figure().canvas.get_supported_filetypes()
    if p.suffix.lower().lstrip(".") not in kinds:
        raise VoxtralError(f"--plot {p}: not a picture format; use one of .{', .'.join(sorted(kinds))}")
    if not p.parent.is_dir():
        raise VoxtralError(f"--plot {p}: the folder {p.parent} does not exist")
    refuse_overwriting(p, inputs)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VoxtralError("--plot needs matplotlib: pip install 'voxtral_ref[plot]' (or pip install matplotlib)") from None


def token_figure(mel, token_ids, n_prompt, n_samples, tokenizer, delay_ms):
    """-> a matplotlib Figure: the log-mel spectrogram (Hz) on the 80 ms token grid, and under it two rows of
    tokens: each at the position that emitted it, and each at the audio its text is about, `delay` earlier
    (an arrow shows the shift). The prompt's positions are shaded: they are fed, not generated."""
    from matplotlib.figure import Figure
    n_tok = mel.shape[1] // MEL_FRAMES_PER_TOKEN
    sec = MS_PER_TOKEN / 1000                                           # 0.08 s per token
    start, shift = LEFT_PAD_MS / 1000, delay_ms / 1000
    fig = Figure(figsize=(min(max(8.0, 0.12 * n_tok), 80.0), 5.0), layout="constrained")
    ax, ax_tok = fig.subplots(2, 1, sharex=True, height_ratios=[4, 1.4])
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, n_tok * sec, 0, mel.shape[0]))
    ax.vlines(np.arange(n_tok + 1) * sec, 0, mel.shape[0], colors="white", linewidths=0.3, alpha=0.35)
    hz = band_hz()
    ticks = [k for k in range(0, 128, 16)] + [127]
    ax.set_yticks([k + 0.5 for k in ticks], [f"{hz[k]:.0f}" for k in ticks])
    ax.set_ylabel("frequency (Hz, mel-spaced bands)")
    # the first token comes out once position P - 1 has heard its whole slot: at the prompt's end
    marks = ((start, "audio starts"), (n_prompt * sec, "first output"), (start + n_samples / SAMPLE_RATE, "audio ends"))
    for k, (x, label) in enumerate(marks):
        for a in (ax, ax_tok):
            a.axvline(x, color="cyan", linewidth=1)
        ax.text(x, mel.shape[0] * (0.97 - 0.08 * k), f" {label}", color="cyan", va="top", fontsize=8)
    ax_tok.axvspan(0, n_prompt * sec, color="0.85", zorder=0)
    ax_tok.text(0.05, 0.5, "prompt: fed, not generated", fontsize=7, va="center")
    ax.set_title(f"log-mel spectrogram on the 80 ms token grid; tokens where they are emitted (top row) and at the "
                 f"audio they are about (bottom row, {delay_ms} ms earlier)", fontsize=9)
    for k, i in enumerate(token_ids):
        label = token_label(tokenizer, int(i))
        x = (n_prompt - 1 + k + 0.5) * sec
        ax_tok.text(x, 0.98, label, rotation=90, ha="center", va="top", fontsize=6)
        ax_tok.text(x - shift, 0.02, label, rotation=90, ha="center", va="bottom", fontsize=6, color="0.3")
    first_text = next((k for k, i in enumerate(token_ids) if int(i) not in (STREAMING_PAD_ID, STREAMING_WORD_ID)), None)
    if first_text is not None:
        x = (n_prompt - 1 + first_text + 0.5) * sec
        ax_tok.annotate("", xy=(x - shift, 0.45), xytext=(x, 0.45),
                        arrowprops={"arrowstyle": "->", "color": "tab:blue"})
        ax_tok.text(x - shift / 2, 0.5, f"delay {delay_ms} ms", ha="center", va="bottom", fontsize=7,
                    color="tab:blue")
    ax_tok.set_yticks([0.25, 0.75], ["about", "emitted"], fontsize=7)
    ax_tok.set_ylim(0, 1)
    ax_tok.set_xlabel("time in the padded audio (s); real audio starts at 2.56 s")
    return fig


def save_figure(fig, path):
    with warnings.catch_warnings():                  # scripts the default font lacks are drawn as boxes: fine here
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=100)


def explain(args, load):
    if args.plot:
        check_plot_path(args.plot, [args.audio, args.model])            # before the slow part
    model, audio, sr = load(args)
    r, tensors, seconds = capture(model, audio, sr, args.delay_ms)
    d = model.cfg
    print(f"model {model.path} ({d.format} format, {model.backend} backend): encoder width C={d.encoder.dim}, "
          f"decoder width D={d.decoder.dim}, vocabulary V={d.decoder.vocab_size}")
    print(f"audio {args.audio}: {r.n_samples / SAMPLE_RATE:.2f} s; delay {r.delay_ms} ms; "
          f"time = wall time since the previous traced tensor, summed over decoder steps")
    print("\n".join(explain_lines(tensors, seconds)))
    print(f"text: {r.text!r}")
    if args.grid:
        rows = grid_rows(tensors["prompt_ids"], r.token_ids, tensors["logits"], r.delay_ms // MS_PER_TOKEN)
        print(f"\ndelayed-streams grid: position p hears the audio up to its slot's end and emits token "
              f"k = p - {len(tensors['prompt_ids']) - 1}, whose text is about audio [80k, 80k + 80) ms; "
              f"times after 'slot' are on the real audio's clock")
        print("\n".join(grid_lines(rows, model.tokenizer)))
    if args.plot:
        save_figure(token_figure(tensors["mel"], r.token_ids, len(tensors["prompt_ids"]), r.n_samples,
                                 model.tokenizer, r.delay_ms), args.plot)
        print(f"voxtral-ref explain: plot -> {args.plot}", file=sys.stderr)
