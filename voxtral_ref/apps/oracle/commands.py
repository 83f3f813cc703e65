"""The oracle's sub-commands on `voxtral-ref`: dump, compare, check-stage, check-weights, explain."""

import json
import sys
from pathlib import Path

import numpy as np

from ...errors import VoxtralError
from ...runtime.kernels import PRECISIONS
from .capture import capture, capture_stream
from .compare import check_tolerance, compare_all, format_report, require_common
from .names import TOKEN_ID_NAMES, select, stage_names
from .tensorio import load_name_map, load_tensors, out_kind, refuse_overwriting, rename, save_tensors


def _load(args, **kw):
    """The model and the audio of a command line that runs the reference."""
    from ... import load
    from ...stages.audio import read_audio
    return (load(args.model, backend=args.backend, **kw), *read_audio(args.audio))


def read_ids(path):
    """The ids a port generated (after the prompt): a JSON list, a JSON object with `token_ids` (what
    `transcribe -f json` writes), or a tensor file holding `token_ids`."""
    p = Path(path)
    if p.suffix == ".json":
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VoxtralError(f"missing file: {p}") from None
        except (OSError, ValueError) as e:
            raise VoxtralError(f"cannot read ids from {p}: {e}") from None
        ids = raw.get("token_ids") if isinstance(raw, dict) else raw
    else:
        ids = load_tensors(p).get("token_ids")
    ok = isinstance(ids, (list, np.ndarray)) and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in np.asarray(ids, object).reshape(-1))
    if not ok or not len(ids):
        raise VoxtralError(f"{p}: expected a non-empty list of integer ids (JSON [..], {{\"token_ids\": [..]}}, or "
                           "a tensor file with token_ids)")
    return [int(i) for i in np.asarray(ids).reshape(-1)]


def dump_metadata(model, args, delay_ms, n_prompt, extra=()):
    from ... import __version__
    cfg = model.cfg
    meta = {"model": str(model.path), "format": cfg.format, "delay_ms": str(delay_ms),
            "voxtral_ref_version": __version__, "backend": model.backend, "audio": str(args.audio),
            "precision": model.precision, "quantize": str(model.quantize),
            "n_prompt": str(n_prompt), "encoder_window": str(cfg.encoder.sliding_window),
            "decoder_window": str(cfg.decoder.sliding_window),
            "names": "docs/tensors.md: decoder tensors cover positions 0..L-2 (the last token is never fed back)"}
    meta.update(extra)
    return meta


def cmd_dump(args):
    kind = out_kind(args.out)                                           # before the slow part
    refuse_overwriting(args.out, [args.audio, args.model])
    if args.stream and (args.force_ids or args.attention):
        raise VoxtralError("--stream records a live session's own decoding: no --force-ids or --attention")
    force = read_ids(args.force_ids) if args.force_ids else None
    model, audio, sr = _load(args, precision=args.precision, quantize=args.quantize)
    names = select(stage_names(model.cfg, args.attention), args.stages or ["*"])   # a bad pattern fails first
    extra = {}
    if args.stream:
        records, tensors = capture_stream(model, audio, sr, args.delay_ms, args.chunk)
        for rec in records:
            print(json.dumps(rec), flush=True)
        delay_ms = model.cfg.default_delay_ms if args.delay_ms is None else args.delay_ms
        extra = {"stream_chunk": str(args.chunk), "sample_rate": str(sr)}
    else:
        r, tensors, _ = capture(model, audio, sr, args.delay_ms, force, args.attention)
        delay_ms = r.delay_ms
        if force is not None:
            chose = r.timings["argmax"]
            part = next((k for k, (a, b) in enumerate(zip(chose, force)) if a != b), None)
            extra = {"force_ids": str(args.force_ids), "argmax_ids": json.dumps(chose)}
            print(f"voxtral-ref dump: teacher forcing with {len(force)} ids from {args.force_ids}; the reference's "
                  + ("own choice agrees at every step" if part is None else
                     f"own choice first differs at token {part}: {chose[part]} where the port fed {force[part]}"),
                  file=sys.stderr)
    out = {n: tensors[n].astype(np.int64 if n in TOKEN_ID_NAMES else np.float32) for n in names if n in tensors}
    save_tensors(args.out, out, dump_metadata(model, args, delay_ms, len(tensors["prompt_ids"]), extra))
    size = sum(a.nbytes for a in out.values())
    print(f"voxtral-ref dump: {len(out)} tensors, {size / 1e6:.1f} MB -> {args.out} ({kind})", file=sys.stderr)


def _compared(path, rules):
    tensors, meta = load_tensors(path, with_metadata=True)
    return rename(tensors, rules), meta


def cmd_compare(args):
    rules = load_name_map(args.map) if args.map else []
    (ref, meta), (other, _) = (_compared(p, rules) for p in (args.ref, args.other))
    base = _compared(args.baseline, rules)[0] if args.baseline else None
    rows, only_ref, only_other, ctx = compare_all(ref, other, args.rtol, args.atol, meta, base)
    require_common(rows, args.ref, args.other)
    print(f"REF   {args.ref}\nOTHER {args.other}" + (f"\nBASE  {args.baseline}" if base else ""))
    print("\n".join(format_report(rows, only_ref, only_other, args.rtol, args.atol, ctx, base is not None)))
    return 0 if all(r.ok for r in rows) else 1


def cmd_check_stage(args):
    from .check_stage import check_stage
    rules = load_name_map(args.map) if args.map else []
    port, _ = _compared(args.input, rules)
    from ... import load
    model = load(args.model, backend=args.backend)
    row, ctx, what = check_stage(model, args.name, port, args.rtol, args.atol, args.delay_ms, args.precision)
    print(f"check-stage {args.name}: the reference's {what} (float32), run on {args.input}'s own input, "
          f"against its {args.name}" + (f"; baseline: the same in {args.precision}" if args.precision != "f32" else ""))
    print("\n".join(format_report([row], [], [], args.rtol, args.atol, ctx, args.precision != "f32")))
    return 0 if row.ok else 1


def cmd_check_weights(args):
    from .check_weights import check_weights, format_weights
    rules = load_name_map(args.map) if args.map else []
    rows = check_weights(args.ref, args.port, rules)
    print("\n".join(format_weights(rows)))
    return 0 if all(r.ok for r in rows) else 1


def cmd_explain(args):
    from .explain import explain
    return explain(args, _load)


def add_oracle_parsers(sub):
    """Register the oracle's sub-commands on the `voxtral-ref` sub-command parser."""
    def model_args(p, audio=True):
        if audio:
            p.add_argument("audio")
        p.add_argument("--model", required=True, help="checkpoint directory")
        p.add_argument("--delay-ms", type=int, default=None)
        p.add_argument("--backend", choices=["auto", "c", "numpy"], default="auto")

    def tolerances(p):
        p.add_argument("--rtol", type=check_tolerance, default=1e-4, help="tolerance relative to max|ref| (1e-4)")
        p.add_argument("--atol", type=check_tolerance, default=0.0, help="absolute tolerance added to it (0)")
        p.add_argument("--map", metavar="FILE", help='a JSON file {"their name": "our name"}; "{i}" stands for a '
                       'layer number')

    d = sub.add_parser("dump", help="write every intermediate tensor of one transcription (docs/tensors.md)")
    model_args(d)
    d.add_argument("--out", required=True, help="NAME.safetensors, NAME.npz, or a folder of NAME.npy")
    d.add_argument("--stages", nargs="+", metavar="NAME", help="only these names: prefixes or globs")
    d.add_argument("--precision", choices=PRECISIONS, default="f32", help="the reference's precision (a baseline "
                   "for a bf16 port: compare --baseline)")
    d.add_argument("--quantize", default=None, help="as voxtral_ref.load(quantize=...), e.g. int8")
    d.add_argument("--force-ids", metavar="FILE", help="teacher forcing: feed the port's ids (JSON list, "
                   "transcribe -f json output, or a dump with token_ids) instead of ours")
    d.add_argument("--attention", action="store_true", help="also each layer's attention weights (large)")
    d.add_argument("--stream", action="store_true", help="run a live session: JSON Lines per emitted token on "
                   "stdout (samples fed, position, id, top-two margin), the decoder tensors to --out")
    d.add_argument("--chunk", type=int, default=1280, help="with --stream: samples fed per step (1280)")
    d.set_defaults(func=cmd_dump)

    c = sub.add_parser("compare", help="compare two dumps row by row: where a port's bug enters; exit 1 over "
                       "tolerance")
    c.add_argument("ref", help="reference tensors: .safetensors, .npz or a folder of .npy")
    c.add_argument("other", help="tensors to check, same formats")
    tolerances(c)
    c.add_argument("--baseline", metavar="DUMP", help="the reference dumped in the port's mode (dump --precision "
                   "bf16 / --quantize): errors within 2x of its own pass, and are shown as a ratio to it")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("check-stage", help="run one reference stage on a port's own input tensor: that stage's "
                       "error alone")
    s.add_argument("name", help="the stage or layer, e.g. encoder.layers.3, conv2, logits")
    s.add_argument("--input", required=True, metavar="PORT_DUMP", help="the port's dump: holds NAME and its input")
    model_args(s, audio=False)
    tolerances(s)
    s.add_argument("--precision", choices=PRECISIONS, default="f32", help="the port's precision: bf16 makes the "
                   "stage's own bf16 rounding the baseline")
    s.set_defaults(func=cmd_check_stage)

    w = sub.add_parser("check-weights", help="compare a port's converted weights with a checkpoint, tensor by "
                       "tensor")
    w.add_argument("ref", help="the checkpoint directory (Mistral or HF format)")
    w.add_argument("port", help="the port's weights: .safetensors, .npz, .gguf, a folder of .npy or a checkpoint")
    w.add_argument("--map", metavar="FILE", help='a JSON file {"their name": "canonical, Mistral or HF name"}; '
                   '"{i}" a layer number')
    w.set_defaults(func=cmd_check_weights)

    e = sub.add_parser("explain", help="walk the pipeline stage by stage: shapes, statistics, time")
    model_args(e)
    e.add_argument("--plot", metavar="PNG", help="draw the log-mel spectrogram (Hz) and the emitted tokens")
    e.add_argument("--grid", action="store_true", help="the delayed-streams grid: per decoder position its time, "
                   "fed id, emitted id, the audio it is about, top-two margin")
    e.set_defaults(func=cmd_explain)
