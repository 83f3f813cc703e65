"""`voxtral-ref` command line. stdout carries transcripts and data; stderr carries progress and errors.
Every VoxtralError, usage mistake and warning becomes one line on stderr (errors exit non-zero), never a
traceback."""

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from ..errors import VoxtralError
from ..checkpoint.hub import DEFAULT_REPO
from .batch import add_batch_parser
from .oracle import add_oracle_parsers
from ..runtime.stream import add_stream_parser
from .serve import add_serve_parser

FORMATS = ("txt", "json", "srt", "vtt")


# --- transcribe -------------------------------------------------------------------------------------------
def cmd_transcribe(args):
    from ..config import delay_tokens

    formats = FORMATS if args.format == "all" else (args.format,)
    # Everything that can be checked without the model is checked before it loads (a real checkpoint takes
    # a while) and before any audio is transcribed (a long file takes longer).
    if args.delay_ms is not None:
        delay_tokens(args.delay_ms)
    if len(formats) > 1 and args.output_dir is None:
        raise VoxtralError("-f all writes one file per format: add -o DIR")
    if args.format in ("srt", "vtt") and len(args.audio) > 1 and args.output_dir is None:
        raise VoxtralError(f"-f {args.format} of several files would run together on stdout: add -o DIR for one "
                           "file each")
    if args.audio.count("-") > 1:
        raise VoxtralError("stdin ('-') can be read only once")
    missing = [src for src in args.audio if src != "-" and not Path(src).exists()]
    if missing:                                      # a typo should not wait for a model download
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise VoxtralError(f"audio file not found: {missing[0]}{more}")
    out_dir = output_dir(args.output_dir, args.audio) if args.output_dir else None
    if out_dir is None and isinstance(sys.stdout, ClosedStdout):
        raise VoxtralError("stdout is closed: nothing can receive the transcripts; write them to files with -o DIR")
    if out_dir is not None:
        refuse_overwriting_inputs(out_dir, args.audio, formats)
    if args.batch_size < 1:
        raise VoxtralError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load_model(args)
    if args.batch_size > 1:
        return transcribe_batched(model, formats, out_dir, args)
    failed = 0
    for src in args.audio:                     # one model for all files; an unreadable one does not stop the rest
        try:
            transcribe_file(model, src, formats, out_dir, args)
        except VoxtralError as e:
            error_line(e)
            failed += 1
    return 2 if failed else 0


def transcribe_batched(model, formats, out_dir, args):
    """--batch-size N: files are read (an unreadable one is an error line, the rest go on) and decoded N per
    pass over the weights, 2N files at a time (their audio held meanwhile); outputs in input order."""
    failed = 0
    delay_ms = model.cfg.default_delay_ms if args.delay_ms is None else args.delay_ms
    for start in range(0, len(args.audio), 2 * args.batch_size):
        read = []
        for src in args.audio[start:start + 2 * args.batch_size]:
            try:
                read.append((src, *read_input(src)))
            except VoxtralError as e:
                error_line(e)
                failed += 1
        results = model.transcribe([x for _, x, _, _ in read], delay_ms=delay_ms, batch_size=args.batch_size)
        for (src, _, sr, t_read), r in zip(read, results):
            write_result(src, r, sr, t_read, model, formats, out_dir, args)
    return 2 if failed else 0


def read_input(src):
    """An audio file (or '-') -> (16 kHz samples [N], its sample rate, seconds to read it)."""
    from ..stages.audio import read_audio, to_mono_16k
    t0 = time.perf_counter()
    audio, sr = read_audio(src)
    try:
        x = to_mono_16k(audio, sr)
    except VoxtralError as e:
        raise VoxtralError(f"{stem(src) if src == '-' else src}: {e}") from None
    return x, sr, time.perf_counter() - t0


def transcribe_file(model, src, formats, out_dir, args):
    from ..config import delay_tokens
    from .subtitles import n_decode_steps

    x, sr, t_read = read_input(src)
    delay_ms = model.cfg.default_delay_ms if args.delay_ms is None else args.delay_ms
    with progress_bar(args, stem(src) if src == "-" else src, n_decode_steps(len(x), delay_tokens(delay_ms))) as bar:
        r = model.transcribe(x, delay_ms=delay_ms, on_token=lambda _: bar.update())
    write_result(src, r, sr, t_read, model, formats, out_dir, args)


def write_result(src, r, sr, t_read, model, formats, out_dir, args):
    """One transcript to its files (-o) or stdout, with -v's timings on stderr."""
    from .subtitles import duration_ms, segments, to_json

    name = stem(src) if src == "-" else src
    segs = segments(r.token_ids, model.tokenizer, r.n_samples)
    if args.verbose:
        seconds, tm = duration_ms(r.n_samples) / 1000, r.timings
        alongside = " on its own thread, alongside" if tm.get("encoded_ahead") else ","
        split = f"encode {tm['encode_s']:.2f} s{alongside} decode {tm['decode_s']:.2f} s" + (
            f", first token after {tm['first_token_s']:.2f} s" if "first_token_s" in tm else "")
        note(f"{name}: {seconds:.2f} s of audio at {sr} Hz; read {t_read:.2f} s, {split} "
             f"({len(r.token_ids)} tokens); real-time factor {tm['total_s'] / max(seconds, 1e-3):.2f}; "
             f"{len(segs)} segments")
    if out_dir is not None:
        write_outputs(out_dir, stem(src), r, segs, formats, args.verbose)
        return
    (fmt,) = formats                                  # -f all needs -o
    if fmt == "json" and len(args.audio) > 1:         # which file each line is (srt and vtt of several need -o)
        text = json_text({"path": src, **to_json(r, segs)}) + "\n"
    else:
        text = render(fmt, r, segs, pretty=False)
    sys.stdout.write(text)
    sys.stdout.flush()


def render(fmt, r, segs, pretty):
    """One transcript in one output format. JSON to stdout is one line per file (JSON Lines)."""
    from .subtitles import to_json, to_srt, to_vtt
    if fmt == "txt":
        return r.text.strip() + "\n"
    if fmt == "json":
        return json_text(to_json(r, segs), indent=2 if pretty else None) + "\n"
    return (to_srt if fmt == "srt" else to_vtt)(segs)


def json_text(obj, indent=None):
    """JSON with text as it is, but a file name's undecodable bytes (lone surrogates to Python, which
    UTF-8 cannot hold) as \\u escapes: JSON readers give back the same surrogates, os.fsencode the bytes."""
    return printable(json.dumps(obj, ensure_ascii=False, indent=indent))


def printable(text):
    """`text` with lone surrogates (undecodable bytes of a file name) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stem(src):
    return "stdin" if src == "-" else Path(src).stem


def refuse_overwriting_inputs(out_dir, sources, formats):
    """An input named like an output (`talk.txt` holding audio, -o next to it) would be overwritten."""
    for src in sources:
        for fmt in formats:
            out = out_dir / f"{stem(src)}.{fmt}"
            if src != "-" and out.exists() and os.path.samefile(out, src):
                raise VoxtralError(f"-o {out_dir} would overwrite the input {src} with its {fmt} transcript: "
                                   "choose another directory")


def output_dir(path, sources):
    """-o DIR: created if needed and proven writable now, not after an hour of transcription."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise VoxtralError(f"-o {d}: not a directory")
    seen = {}
    for src in sources:
        other = seen.setdefault(stem(src), src)
        if other != src:
            raise VoxtralError(f"{other} and {src} would both be written as {d / stem(src)}.*: "
                               "rename one or transcribe them separately")
    try:
        d.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise VoxtralError(f"-o {d}: cannot write there ({e.strerror or e})") from None
    return d


def write_outputs(out_dir, name, r, segs, formats, verbose=False):
    """<out_dir>/<name>.<fmt> for each format (`transcribe -o` and `batch` write the same files)."""
    for fmt in formats:
        write_text(out_dir / f"{name}.{fmt}", render(fmt, r, segs, pretty=True), verbose)


def write_text(path, text, verbose=False):
    """Whole or not at all: written beside `path`, flushed to disk, then renamed over it, so a kill at any
    moment leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise VoxtralError(f"cannot write {path}: {e.strerror or e}") from None
    if verbose:
        note(f"wrote {path}")


def progress_bar(args, name, total):
    """Decoding progress on stderr: only on a terminal, not with --quiet, and only once a file has taken
    a couple of seconds (short files finish before a bar would help)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=name, unit="tok", file=sys.stderr, leave=False, delay=2,
                disable=args.quiet or not sys.stderr.isatty())


# --- info -------------------------------------------------------------------------------------------------
def cmd_info(args):
    model = load_model(args)
    for key, value in describe(model):
        print(f"{key + ':':<12} {value}")
    if args.tensors:
        held = model.weights.formats()
        for name, t in [*model.weights._t.items(), ("lm_head", model.weights.lm_head)]:
            print(f"{name:<36} {held[name]:<9} {'x'.join(map(str, t.shape)):<16} {size(t.nbytes)}")
    if args.verify:
        print(f"{'verify:':<12} {verify_weights(model)}")


# --- quantize ---------------------------------------------------------------------------------------------
def cmd_quantize(args):
    """Quantise a checkpoint once and write it as a directory load() memory-maps (checkpoint/quantized.py)."""
    from ..model import write_quantized
    if not args.quantize:
        raise VoxtralError("quantize needs --quantize RECIPE (e.g. q4, int8, q4,lm_head=int8)")
    t0 = time.perf_counter()
    model = load_model(args)
    t1 = time.perf_counter()
    write_quantized(model, Path(args.output))
    note(f"{model.path} quantised as {model.quantize} in {t1 - t0:.1f} s, written to {args.output} in "
         f"{time.perf_counter() - t1:.1f} s")


def weight_files(model):
    from ..checkpoint import quantized
    if quantized.is_quantized(model.path):
        return [model.path / quantized.QFILE]
    return sorted(model.path.glob("consolidated.safetensors" if model.cfg.format == "mistral" else "model*.safetensors"))


def verify_weights(model):
    """`info --verify`: every value of every tensor in the weight files, NaN and infinities counted. load()
    checks only the small tensors; a NaN in a matrix makes every logit NaN and every id 0, silently."""
    from ..checkpoint.weights import count_nonfinite, read_safetensors
    bad, n = [], 0
    for f in weight_files(model):
        for name, t in read_safetensors(f).items():
            n, k = n + 1, count_nonfinite(t)
            if k:
                bad.append(f"{name} ({k} values)")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise VoxtralError(f"{len(bad)} of {n} tensors hold NaN or infinite values: {', '.join(bad[:3])}{more}")
    return f"{n} tensors, every value finite"


def describe(model):
    """[(key, value)] lines about a loaded checkpoint and what will run it."""
    from ..config import ALLOWED_DELAYS_MS, HOP, MS_PER_TOKEN, SAMPLE_RATE
    from ..checkpoint.weights import read_safetensors

    encoder_hz = SAMPLE_RATE / HOP / 2                 # 100 mel frames a second, halved by conv2's stride

    c, e, d = model.cfg, model.cfg.encoder, model.cfg.decoder
    rope = "interleaved-pair" if c.format == "mistral" else "split-half (NeoX)"
    files = weight_files(model)
    dtypes = Counter(str(t.dtype) for f in files for t in read_safetensors(f).values())
    files = [f for f in sorted(model.path.iterdir()) if f.is_file()]
    delays = f"{ALLOWED_DELAYS_MS[0]}..{ALLOWED_DELAYS_MS[-2]} by {MS_PER_TOKEN}, {ALLOWED_DELAYS_MS[-1]}"
    return [
        ("model", model.path),
        ("format", f"{c.format} ({', '.join(f.name for f in files)}; q/k rows in {rope} RoPE order)"),
        ("parameters", f"{count(model.weights.n_params())} ({model.weights.n_params():,})"),
        ("dtypes", ", ".join(f"{k} x{n}" for k, n in dtypes.most_common())),
        ("weights", weights_summary(model.weights)),
        ("files", ", ".join(f"{f.name} {size(f.stat().st_size)}" for f in files)),
        ("encoder", f"{e.n_layers} layers, dim {e.dim}, {e.n_heads} heads x {e.head_dim}, SwiGLU {e.hidden_dim}, "
                    f"window {e.sliding_window} frames ({e.sliding_window / encoder_hz:g} s), RoPE theta {e.rope_theta:g}"),
        ("decoder", f"{d.n_layers} layers, dim {d.dim}, {d.n_heads} heads / {d.n_kv_heads} kv x {d.head_dim}, "
                    f"SwiGLU {d.hidden_dim}, window {d.sliding_window} tokens, vocab {d.vocab_size}, "
                    f"RoPE theta {d.rope_theta:g}"),
        ("delay", f"{c.default_delay_ms} ms by default (tekken.json); --delay-ms takes {delays}"),
        ("kernels", kernels_summary(model.backend)),
    ]


def weights_summary(weights):
    """What the matrices hold as the model runs, by group: "enc 224 q4, ..., lm_head int8; 2.52 GB streamed
    per live step" (the file's dtype where not quantised). `--tensors` lists every tensor."""
    groups = {}
    for name, fmt in weights.formats().items():
        group = name.split(".")[0] if not name.startswith("enc.conv") else "conv"
        groups.setdefault(group, Counter())[fmt] += 1
    parts = [f"{g} " + " + ".join(f"{n} {f}" for f, n in c.most_common()) for g, c in groups.items()]
    return "; ".join(parts)


def kernels_summary(backend):
    """The backend --backend resolves to, and what voxtral_ref.ckernels says about itself (ISA, threads)."""
    from ..runtime import ckernels
    about = getattr(ckernels, "info", None)
    built = "C kernels built" if ckernels.available() else "C kernels not built"
    return f"{backend} backend; " + (about() if callable(about) else built)


def count(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def size(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# --- shared -----------------------------------------------------------------------------------------------
def load_model(args):
    from .. import load
    set_threads(args.threads)
    t0 = time.perf_counter()
    model = load(args.model, backend=args.backend, revision=args.revision, offline=args.offline,
                 weights_format=args.weights_format, cache_dir=args.cache_dir, progress=not getattr(args, "quiet", False),
                 precision=args.precision, quantize=args.quantize)
    if getattr(args, "verbose", False):
        note(f"model {model.path} ({model.cfg.format} format, {count(model.weights.n_params())} parameters, "
             f"{model.backend} backend) loaded in {time.perf_counter() - t0:.2f} s")
    return model


def set_threads(n):
    if n is None:
        return
    from ..runtime import ckernels
    if not (ckernels.available() and hasattr(ckernels, "set_threads")):
        warnings.warn("--threads applies to the C kernels, which are not built here: ignored")
        return
    ckernels.set_threads(n)


def positive_float(s):
    """A finite number above 0 (argparse's float takes "nan" and "inf")."""
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {s}")
    return x


def whole_number(s, lo, hi=None):
    """argparse's int in lo..hi, with a one-line reason."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {s!r}") from None
    if n < lo or (hi is not None and n > hi):
        raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}" if hi is None else f"must be {lo}..{hi}, got {n}")
    return n


def positive_int(s):
    return whole_number(s, 1)


def port_number(s):
    """A TCP port (0 picks a free one); bind() raises OverflowError past 65535."""
    return whole_number(s, 0, 65535)


def add_model_args(p):
    """--model and what picks, fetches and runs it."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_REPO, metavar="DIR|REPO",
                   help=f"checkpoint directory, or hub repo id fetched once into the HF cache (default {DEFAULT_REPO})")
    g.add_argument("--revision", metavar="REV", help="hub branch, tag or commit (default main)")
    g.add_argument("--weights-format", choices=["mistral", "hf"],
                   help="Mistral's consolidated.safetensors (fetched by default) or HF's model*.safetensors")
    g.add_argument("--offline", action="store_true",
                   help="never touch the network, only the HF cache (as HF_HUB_OFFLINE=1)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="hub cache directory (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    g.add_argument("--backend", choices=["auto", "c", "numpy"], default="auto",
                   help="auto: the C kernels when built, else NumPy")
    g.add_argument("--threads", type=positive_int, metavar="N", help="threads for the C kernels (default: all cores)")
    g.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                   help="matmul inputs in float32 (default, the oracle path) or rounded to bf16 as in a bf16 model: "
                        "1.5-1.8x faster encoding where the CPU has bf16 dot products")
    g.add_argument("--quantize", metavar="RECIPE", default=None,
                   help="int8 (8.5 bits per weight), q4 (4.5 bits) or a recipe such as q4,lm_head=int8: every large matrix "
                        "quantised (once: a hub model's copy is cached; see `voxtral-ref quantize`), "
                        "matmul inputs rounded to int8")


def note(msg):
    print(printable(f"voxtral-ref: {msg}"), file=sys.stderr)   # whatever stderr's encoding errors are


def error_line(e):
    note(f"error: {e}")


def _warning_line(message, category, filename, lineno, file=None, line=None):
    note(f"warning: {message}")


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line naming it and where help is, not the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    p = OneLineParser(prog="voxtral-ref", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files to text, JSON or subtitles",
                       description="Transcribe audio files (WAV, FLAC, OGG, MP3; '-' reads stdin). Text goes to "
                                   "stdout unless -o DIR is given.")
    t.add_argument("audio", nargs="+", help="audio files; '-' reads stdin (e.g. ffmpeg -i in.m4a -f wav - | ...)")
    t.add_argument("-o", "--output-dir", metavar="DIR", help="write <name>.<format> files here instead of stdout")
    t.add_argument("-f", "--format", choices=[*FORMATS, "all"], default="txt",
                   help="txt (default), json (Whisper-like), srt, vtt, or all (needs -o)")
    t.add_argument("--delay-ms", type=int, metavar="MS", help="transcription delay: 80..1200 by 80, or 2400 (default 480)")
    t.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="decode N files per pass over the weights (same transcripts, more files per second; "
                        "no progress bar)")
    add_model_args(t)
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar or download progress")
    t.add_argument("-v", "--verbose", action="store_true", help="timings and written files on stderr")
    t.set_defaults(func=cmd_transcribe)

    i = sub.add_parser("info", help="describe a checkpoint and the kernels that will run it")
    add_model_args(i)
    i.add_argument("--verify", action="store_true",
                   help="also read every weight and report NaN or infinite values (reads the whole checkpoint)")
    i.add_argument("--tensors", action="store_true", help="list every tensor: what it holds, its shape and bytes")
    i.set_defaults(func=cmd_info)

    q = sub.add_parser("quantize", help="quantise a checkpoint once into a directory that loads in a second",
                       description="Quantise every large matrix (--quantize q4, int8 or a recipe) and write a "
                                   "checkpoint directory that `--model DIR` memory-maps without quantising again.")
    add_model_args(q)
    q.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write (created if needed)")
    q.set_defaults(func=cmd_quantize)

    add_batch_parser(sub)                   # batch (archives; embedded or on Ray)
    add_oracle_parsers(sub)                 # dump, compare, check-stage, check-weights, explain
    add_stream_parser(sub)                  # stream (live audio)
    add_serve_parser(sub)                   # serve (realtime server; the [serve] extra)
    return p


class ClosedStdout(io.TextIOBase):
    """sys.stdout when the shell closed it (`>&-`): output has nowhere to go, so writing it is an error."""

    def writable(self):
        return True

    def write(self, s):
        raise VoxtralError("stdout is closed: nothing can receive the output")


def park_closed_stdio():
    """A std stream the shell closed (`<&-`, `>&-`, `2>&-`) leaves its descriptor free: the next file opened
    would take it, and stray writes to fd 1 or 2 would land in that file. /dev/null takes the descriptor
    instead; sys.stdout refuses writes, sys.stderr discards them (the exit code still tells), and a closed
    sys.stdin stays None for read_audio and `stream` to report."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)                   # the lowest free descriptor: this one
    if sys.stdout is None:
        sys.stdout = ClosedStdout()
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


def silence_stdout():
    """After a failed write, point fd 1 at /dev/null so the interpreter's exit-time flush cannot fail too."""
    if not isinstance(sys.stdout, ClosedStdout):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv=None):
    park_closed_stdio()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                 # --help, or a usage mistake already reported in one line
        return e.code
    except VoxtralError as e:               # --help with stdout closed
        error_line(e)
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            code = args.func(args) or 0
            sys.stdout.flush()              # `> /dev/full` fails here, inside the handlers below
            return code
        except VoxtralError as e:
            error_line(e)
            return 2
        except KeyboardInterrupt:
            print("voxtral-ref: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:             # the reader left (`| head`): stop quietly, as other Unix tools do
            silence_stdout()
            return 141
        except OSError as e:                # a full disk or an I/O error, on stdout or on a file
            error_line(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
            silence_stdout()
            return 2
        except MemoryError:
            error_line("out of memory")
            return 2


if __name__ == "__main__":
    sys.exit(main())
