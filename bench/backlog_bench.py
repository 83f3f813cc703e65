"""Draining a live session's backlog on the full-size model (not run by CI): a session fed --seconds of audio
at once (a client that sent a long chunk, or a session that fell behind), then stepped until it has decoded
all of it, with and without backlog verification (runtime/stream.py: BACKLOG_DRAFT drafted tokens verified
with each position in one decoder pass).

    python bench/backlog_bench.py /work/full_q4            # table on stdout + bench/out/backlog.json

Per draft cap k (0: one position per pass, as before) and drafter:
  real     generate.draft_tokens: what a session does. Random weights repeat tokens (and never pad), so
           its guesses are right more often here than the real model's may be;
  oracle   the ids of the k = 0 run replayed as drafts (every draft right, a benchmark device): what it
           buys when every draft is right, the upper bound.
Reported (the fastest of --repeats runs of each): wall seconds of the step that drains the backlog, split into encoding (the same for all) and the
rest (decoder passes), passes, rows, the drafts' acceptance rate and the decode speed-up over k = 0.
The real model's acceptance rate is unknown here (no real weights): with rate a and k drafts a pass yields
(1 - a^(k+1)) / (1 - a) tokens (bench/batch_bench.py's verify table gives the speed-up per a).
"""

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import voxtral_ref
from voxtral_ref import config as C
from voxtral_ref.runtime import ckernels, kernels, stream
from voxtral_ref.stages import generate

OUT = Path(__file__).resolve().parent / "out"
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "cases" / "speech_en_long_480.npz"


@contextmanager
def counting():
    """generate.decoder_pass counted: passes, rows, drafted tokens, tokens kept."""
    real, n = generate.decoder_pass, {"passes": 0, "rows": 0, "drafted": 0, "tokens": 0}

    def counted(weights, work, trace=None):
        drafted = sum(len(dec.draft) for dec, _ in work)
        out = real(weights, work, trace)
        n["passes"], n["rows"] = n["passes"] + 1, n["rows"] + sum(len(a) for _, a in work)
        n["drafted"], n["tokens"] = n["drafted"] + drafted, n["tokens"] + sum(len(t) for t in out)
        return out
    generate.decoder_pass = counted
    try:
        yield n
    finally:
        generate.decoder_pass = real


@contextmanager
def setup(k, replay=None):
    """stream.BACKLOG_DRAFT = k; with `replay` (the ids a session should give), drafts that are all right."""
    saved = stream.BACKLOG_DRAFT, stream.draft_tokens
    stream.BACKLOG_DRAFT = k
    if replay is not None:
        def oracle(dec, n_positions, k):
            at = len(dec.ids) - len(dec.prompt)
            return replay[at:at + len(saved[1](dec, n_positions, k))]
        stream.draft_tokens = oracle
    try:
        yield
    finally:
        stream.BACKLOG_DRAFT, stream.draft_tokens = saved


def drain(model, audio, k, replay=None):
    """A fresh session (its silence prefix already saved) fed `audio` at once and stepped once -> record."""
    session = model.stream()
    with setup(k, replay), counting() as n:
        session.feed(audio)
        t0 = time.perf_counter()
        e = session.step()
        wall = time.perf_counter() - t0
    accepted = n["tokens"] - n["passes"]
    return {"k": k, "drafter": "oracle" if replay is not None else "real", "wall_s": wall,
            "encode_s": session.encode_s, "decode_s": wall - session.encode_s, "tokens": len(e.token_ids),
            "ids": e.token_ids, **n, "acceptance": accepted / n["drafted"] if n["drafted"] else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="full-size checkpoint directory (quantised ones load as they are)")
    ap.add_argument("--seconds", type=float, default=4.0, help="backlog fed at once (default 4 s)")
    ap.add_argument("--caps", type=int, nargs="+", default=[3, 7], help="draft caps k to try besides 0")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting, the fastest kept (default 2)")
    ap.add_argument("--precision", default="bf16", choices=kernels.PRECISIONS)
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    ap.add_argument("--json", type=Path, default=OUT / "backlog.json")
    args = ap.parse_args()
    ckernels.set_threads(args.threads)
    model = voxtral_ref.load(args.model, backend="c", precision=args.precision)
    with np.load(GOLDEN) as z:
        audio = z["audio"][:int(args.seconds * C.SAMPLE_RATE)]
    drain(model, audio[:C.SAMPLE_RATE], 0)                      # warm-up: the saved prefix, pages, threads
    plain = drain(model, audio, 0)
    runs = []
    for _ in range(args.repeats):                               # each setting's fastest run is kept
        rounds = [drain(model, audio, 0)] + [drain(model, audio, k, replay) for k in args.caps
                                             for replay in (None, plain["ids"])]
        runs = [min(a, b, key=lambda r: r["wall_s"]) for a, b in zip(runs, rounds)] if runs else rounds
    plain = runs[0]
    pad_share = plain["ids"].count(C.STREAMING_PAD_ID) / max(len(plain["ids"]), 1)
    label = model.quantize or model.precision
    print(f"{label}, {ckernels.get_threads()} threads: {args.seconds:g} s fed at once, {plain['tokens']} tokens "
          f"({100 * pad_share:.0f} % [STREAMING_PAD] among them)")
    print(f"{'k':>3} {'drafter':>7} {'wall s':>7} {'encode s':>8} {'decode s':>8} {'passes':>6} {'rows':>5} "
          f"{'accepted':>8} {'decode vs k=0':>13}  ids")
    for r in runs:
        # the ids equal k = 0's where every row of a pass is computed as it is alone (see the README)
        r["first_differing_token"] = next((i for i, (a, b) in enumerate(zip(r["ids"], plain["ids"])) if a != b),
                                          None if len(r["ids"]) == len(plain["ids"]) else len(r["ids"]))
        acc = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f} %"
        same = "= k=0's" if r["first_differing_token"] is None else f"differ from token {r['first_differing_token']}"
        print(f"{r['k']:>3} {r['drafter']:>7} {r['wall_s']:>7.2f} {r['encode_s']:>8.2f} {r['decode_s']:>8.2f} "
              f"{r['passes']:>6} {r['rows']:>5} {acc:>8} {plain['decode_s'] / r['decode_s']:>12.2f}x  {same}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(args.model), "quantize": model.quantize, "precision": model.precision,
                                     "threads": ckernels.get_threads(), "seconds": args.seconds,
                                     "pad_share": pad_share, "runs": runs}, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
