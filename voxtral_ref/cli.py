"""`voxtral-ref` command line. stdout carries transcripts and data; stderr carries progress and errors.
Every VoxtralError becomes one line on stderr and a non-zero exit, never a traceback."""

import argparse
import json
import sys

from .errors import VoxtralError
from .oracle import add_oracle_parsers
from .stream import add_stream_parser


def cmd_transcribe(args):
    import soundfile as sf

    from . import load
    model = load(args.model, backend=args.backend)
    for path in args.audio:
        try:
            audio, sr = sf.read(path, dtype="float32", always_2d=False)
        except (sf.LibsndfileError, OSError) as e:
            raise VoxtralError(f"cannot read audio {path}: {e}") from None
        r = model.transcribe(audio, sample_rate=sr, delay_ms=args.delay_ms)
        if args.format == "json":
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "delay_ms": r.delay_ms}, ensure_ascii=False))
        else:
            print(r.text, flush=True)


def build_parser():
    p = argparse.ArgumentParser(prog="voxtral-ref", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe audio files")
    t.add_argument("audio", nargs="+")
    t.add_argument("--model", required=True, help="checkpoint directory")
    t.add_argument("--delay-ms", type=int, default=None)
    t.add_argument("--format", choices=["txt", "json"], default="txt")
    t.add_argument("--backend", choices=["auto", "c", "numpy"], default="auto")
    t.set_defaults(func=cmd_transcribe)
    add_oracle_parsers(sub)                 # dump, compare, explain
    add_stream_parser(sub)                  # stream (live audio)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except VoxtralError as e:
        print(f"voxtral-ref: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("voxtral-ref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
