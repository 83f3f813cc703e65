"""Batched decoding on the full-size model (not run by CI): what does one pass over the weights for M
sequences cost against one for a single sequence, and how many live streams does that sustain?

    python bench/make_full_checkpoint.py /work/fullsize_ckpt                       # once: random weights
    voxtral-ref quantize --model /work/fullsize_ckpt --quantize q4 -o /work/full_q4  # once per format
    python bench/batch_bench.py /work/full_q4 /work/full_int8 /work/fullsize_ckpt  # table + bench/out/batch.json

For each model directory (one weight format each; unquantised ones run in --precision):
  decode   M = 1, 2, 4, 8, 16 sequences per pass (runtime/engine.py's `decoder_pass`, as the engine runs
           it): each sequence prefilled with its prompt, then --tokens passes of one position per sequence,
           timed, each followed by a timed pass of one more sequence alone. Reported: ms per pass, aggregate
           tokens/s, the speed-up over the 1-row passes between them (this host's read bandwidth can switch
           between two levels within a run, so a speed-up only compares passes run side by side), the bytes
           a pass reads (decoder weights, LM head, the KV slots its attention reads) over the read bandwidth probed just
           before and after (bench/probes.c via bench_kernels.Machine), and that roofline's ratio; and what
           of a pass is inside the weight-streaming linears, inside attention, and the rest (ckernels' clocks).
  live     N sessions of one Engine, each fed an 80 ms block per round, then stepped together
           (Engine.together, as the server's `advance` does): a round is what N live clients wait for (their
           4 encoder frames each and their decoder positions, each in shared passes). The largest N whose mean round stays under 80 ms is the
           number of 16 kHz streams the machine sustains in real time (tried: every N doubling up to
           --streams, so the rounds past the limit show what each added stream costs, then the N between
           the last that kept up and the first that did not, halving the gap; --live-only skips
           decode and verify; --after S times sessions as they are S seconds into their audio, each
           fast-forwarded as live_bench's full phase is: after 15 s every encoder window is full, and
           --full-window, after 11 minutes, every KV cache). Before them, the encoder's share: one encoder + adapter pass over N
           sessions' 4-frame chunks stacked (stream.encoder_pass, as the engine runs it) against N passes
           of one each, N = 1, 2, 4, ... --streams.
  verify   one sequence's speculative verification pass (generate.greedy_decode's speculate=k: the last id
           and k drafted tokens, k + 1 rows, the caches rewound after) against the 1-row passes interleaved
           with it, k = 1..15, with the probed bandwidth; then the speed-up it buys as a function of the acceptance rate a (each
           draft right with probability a: a pass yields (1 - a^(k+1)) / (1 - a) tokens on average), the
           best k for each a, and the rate generate.draft_tokens' first guess has on the golden cases for
           THIS model: with random weights (which repeat tokens and never pad) that says nothing of the
           real model's rate, which is unknown here.
Speed does not depend on the weights' values, so random weights and random audio embeddings serve.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_bench import fast_forward, run_models, slot_bytes  # noqa: E402
import voxtral_ref  # noqa: E402
from voxtral_ref import config as C  # noqa: E402
from voxtral_ref.runtime import ckernels, kernels  # noqa: E402
from voxtral_ref.runtime.engine import Engine  # noqa: E402
from voxtral_ref.runtime.stream import encoder_pass  # noqa: E402
from voxtral_ref.stages.generate import MAX_DRAFT, Decoder, decoder_pass, draft_tokens  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "cases" / "speech_en_long_480.npz"
BLOCK = C.SAMPLES_PER_TOKEN                               # 1280 samples = 80 ms: one live step's audio
REAL_TIME_S = BLOCK / C.SAMPLE_RATE


def decoder_bytes(model):
    """Bytes of every matrix a decoder pass streams: the decoder layers' and the LM head."""
    w = model.weights
    names = [n for n, t in w._t.items() if n.startswith("dec.layers.") and t.ndim == 2 and ".ada_" not in n]
    return sum(w._t[n].nbytes for n in names) + w.lm_head.nbytes


def kv_read_bytes(decoders):
    return sum(2 * c.filled * slot_bytes(c.k) for d in decoders for c in d.caches)


def timed_pass(model, decs, embeds, draft=0, split=None):
    """Seconds of one decoder pass over the sequences' next chunks (embeds: each one's [positions, dim]), each
    past its prompt feeding `draft` [STREAMING_PAD] drafts after its last id (a verification pass). `split`:
    a list that gets the pass's seconds inside the weight-streaming linears and inside attention
    (ckernels' clocks)."""
    chunks = []
    for d, e in zip(decs, embeds):
        if len(d.ids) >= len(d.prompt):
            d.draft = [C.STREAMING_PAD_ID] * draft
        ids, p0 = d.chunk()
        chunks.append((d, e[p0:p0 + len(ids)]))
    lin, att, t = ckernels.weight_seconds(), ckernels.attention_seconds(), time.perf_counter()
    decoder_pass(model.weights, chunks)
    t = time.perf_counter() - t
    if split is not None:
        split.append((ckernels.weight_seconds() - lin, ckernels.attention_seconds() - att))
    for d in decs:
        d.draft = []
    return t


def bench_decode(model, rows, tokens, machine, rng):
    """-> one record per M: M sequences decoded together, `tokens` timed passes of one position each, each
    followed by a timed pass of one more sequence alone, so that every speed-up compares passes run in the
    same memory regime (this host's bandwidth can switch between two levels within a run)."""
    dim, out = model.cfg.decoder.dim, []

    def sequences(m, positions):
        decs = [Decoder(model.weights, C.delay_tokens(480), max_positions=positions) for _ in range(m)]
        embeds = [0.1 * rng.standard_normal((len(decs[0].prompt) + positions, dim), dtype=np.float32) for _ in range(m)]
        return decs, embeds

    with model.kernel_mode():
        alone = sequences(1, 64 + tokens * len(rows))                # the 1-row passes interleaved with each M's
        for _ in range(2):                                           # the prompt: silence prefix, then the rest
            timed_pass(model, *alone)
        for m in rows:
            decs, embeds = sequences(m, 64 + tokens)
            for _ in range(2):
                timed_pass(model, decs, embeds)
            bw_before = machine.read_gbs()
            times, singles, split = [], [], []
            for _ in range(tokens):
                times.append(timed_pass(model, decs, embeds, split=split))
                singles.append(timed_pass(model, *alone))
            bw = (bw_before + machine.read_gbs()) / 2
            mean, single = float(np.mean(times)), float(np.mean(singles))
            linears, attention = (1e3 * float(x) for x in np.mean(split, axis=0))
            nbytes = decoder_bytes(model) + kv_read_bytes(decs)
            r = {"rows": m, "pass_ms_mean": 1e3 * mean, "pass_ms_median": 1e3 * float(np.median(times)),
                 "tokens_per_s": m / mean, "one_row_pass_ms_mean": 1e3 * single, "speedup_vs_1": m * single / mean,
                 "bytes_per_pass_GB": nbytes / 1e9, "read_GB/s": bw,
                 "read_GB/s_before_after": [bw_before, 2 * bw - bw_before], "vs_roofline": mean / (nbytes / 1e9 / bw),
                 "linears_ms_mean": linears, "attention_ms_mean": attention}
            out.append(r)
            print(f"  decode M={m:>2}: pass {r['pass_ms_mean']:.1f} ms (median {r['pass_ms_median']:.1f}), "
                  f"{r['tokens_per_s']:.1f} tokens/s = {r['speedup_vs_1']:.2f}x the 1-row passes between them "
                  f"({r['one_row_pass_ms_mean']:.1f} ms); {nbytes / 1e9:.2f} GB/pass at {bw:.1f} GB/s -> "
                  f"{r['vs_roofline']:.2f}x roofline; of a pass: linears {linears:.1f} ms, attention {attention:.1f}, "
                  f"the rest {r['pass_ms_mean'] - linears - attention:.1f}", flush=True)
    return out


def bench_verify(model, tokens, machine, rng):
    """-> {k: mean ms of a (k+1)-row verification pass of one sequence}, k = 0 the plain 1-row pass, and the
    ratios of each k's passes to the 1-row passes interleaved with them (same memory regime)."""
    dim, out, ratio = model.cfg.decoder.dim, {}, {}
    with model.kernel_mode():
        n = 64 + (MAX_DRAFT + 1) * (2 * tokens + 2) * (MAX_DRAFT + 2)            # positions, however many are kept
        dec = Decoder(model.weights, C.delay_tokens(480), max_positions=n)
        embeds = [0.1 * rng.standard_normal((n, dim), dtype=np.float32)]              # [n, dim]
        for _ in range(2):                                       # the prompt's chunks, untimed
            timed_pass(model, [dec], embeds)
        bw_before = machine.read_gbs()
        singles = []
        for k in range(MAX_DRAFT + 1):
            times, ones = [], []
            for _ in range(tokens):
                times.append(timed_pass(model, [dec], embeds, k))
                ones.append(timed_pass(model, [dec], embeds))
            out[k] = 1e3 * float(np.mean(times))
            ratio[k] = float(np.mean(times) / np.mean(ones)) if k else 1.0    # k = 0: plain decoding itself
            singles += ones
        bw = (bw_before + machine.read_gbs()) / 2
    print("  verify: (k+1)-row pass / the 1-row passes between them: "
          + ", ".join(f"k={k} {ratio[k]:.2f}x" for k in range(1, MAX_DRAFT + 1))
          + f" (1-row {1e3 * np.mean(singles):.1f} ms; probe {bw:.1f} GB/s)", flush=True)
    return {"pass_ms": out, "vs_one_row": ratio, "read_GB/s": bw}


def speedups(vs_one_row, rates=(0.0, 0.25, 0.5, 0.75, 0.9)):
    """For each acceptance rate: the best k and its speed-up over plain decoding (tokens per second), from
    each (k+1)-row pass's cost in 1-row passes."""
    out = {}
    for a in rates:
        gain = {k: sum(a ** i for i in range(k + 1)) / vs_one_row[k] for k in vs_one_row}
        best = max(gain, key=gain.get)
        out[a] = {"best_k": best, "speedup": gain[best], "k=7": gain[7] if 7 in gain else None}
    print("  verify: speed-up at acceptance rate " + ", ".join(f"{a:.2f}: {r['speedup']:.2f}x (k={r['best_k']})"
                                                            for a, r in out.items()), flush=True)
    return out


def draft_rate(model):
    """How often generate.draft_tokens' first guess is right on the golden cases for this model: at every
    generated position, its guess from the ids before against greedy decoding's id there."""
    right = total = 0
    for case in json.loads((GOLDEN.parent / "index.json").read_text())["cases"]:
        if "token_ids" in case:
            with np.load(GOLDEN.parent / case["file"]) as z:
                ids = model.transcribe(z["audio"], delay_ms=int(case["delay_ms"])).token_ids
            prompt = C.prompt_ids(C.delay_tokens(int(case["delay_ms"])))
            for i, token in enumerate(ids[1:], 1):
                seen = SimpleNamespace(prompt=prompt, ids=prompt + ids[:i])     # what draft_tokens reads of a Decoder
                right, total = right + (draft_tokens(seen, len(seen.ids) + 1, 1) == [token]), total + 1
    rate = right / max(total, 1)
    print(f"  verify: the drafter's first guess is right at {100 * rate:.1f} % of this model's {total} positions on "
          f"the golden cases (random weights: not the real model's rate)", flush=True)
    return rate


def bench_encoder(model, counts, machine, rng, repeats=4):
    """-> {N: (ms of one stacked encoder pass for N sessions' chunks, ms of N passes of one)}, medians."""
    sessions, ds = [model.stream() for _ in range(max(counts))], model.cfg.downsample
    frames = 0.1 * rng.standard_normal((ds, model.cfg.encoder.dim), dtype=np.float32)  # one 80 ms step's [4, C]

    def chunk(s):                                   # the session's next positions, as its steps advance them
        s._n_embeds += 1
        return frames, np.arange((s._n_embeds - 1) * ds, s._n_embeds * ds), s._enc_caches
    out, bw_before = {}, machine.read_gbs()
    with model.kernel_mode():
        for n in counts:
            stacked, alone = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                encoder_pass(model.weights, [chunk(s) for s in sessions[:n]])
                stacked.append(time.perf_counter() - t)
                t = time.perf_counter()
                for s in sessions[:n]:
                    encoder_pass(model.weights, [chunk(s)])
                alone.append(time.perf_counter() - t)
            out[n] = (1e3 * float(np.median(stacked)), 1e3 * float(np.median(alone)))
    bw = (bw_before + machine.read_gbs()) / 2
    print("  encoder, N sessions' 4 frames: " + ", ".join(f"N={n} {a:.1f} ms stacked / {b:.1f} ms one by one"
                                                         for n, (a, b) in out.items()) + f"; probe {bw:.1f} GB/s",
          flush=True)
    return {"pass_ms_stacked_vs_one_by_one": out, "read_GB/s": bw}


def how_far(after):
    """bench_live's `after`, as its lines say it"""
    return "at full windows" if math.isinf(after) else f"after {after:g} s of audio" if after else ""


def bench_live(model, n, rounds, audio, machine, after=0):
    """N sessions of one engine stepped together for `rounds` blocks -> round times and the engine's rows/pass.
    after: each session fast-forwarded by that many seconds of audio first (live_bench.fast_forward), its
    caches then as a stream's are that far in: after 15 s every encoder window is full; inf: a decoder
    ring's worth of positions (8448, 11 minutes), every slot of every cache in use, and each round reads
    them all."""
    engine = Engine(model)
    sessions = [engine.stream() for _ in range(n)]
    lead = BLOCK * (sessions[0].n_delay + 1) + 40                  # the first token's audio: fed untimed

    def round_(start, length):
        t = time.perf_counter()
        for s in sessions:
            s.feed(audio[start % len(audio):][:length])
        for _, error in engine.together([s.step for s in sessions]):
            if error is not None:
                raise error
        return time.perf_counter() - t
    round_(0, lead)
    if after:
        for s in sessions:     # inf: a decoder ring's worth of positions, so that every slot of every ring is in use
            fast_forward(s, s._dec.caches[0].capacity if math.isinf(after) else round(after / REAL_TIME_S))
        round_(lead, BLOCK)                                        # untimed: the caches' first sweep
    bw_before = machine.read_gbs()
    passes0, rows0 = engine.passes, engine.rows
    enc0, chunks0 = engine.encoder_passes, engine.encoder_chunks
    times = [round_(lead + i * BLOCK, BLOCK) for i in range(rounds)]
    bw = (bw_before + machine.read_gbs()) / 2
    mean = float(np.mean(times))
    passes, enc = engine.passes - passes0, engine.encoder_passes - enc0
    r = {"streams": n, "round_ms_mean": 1e3 * mean, "round_ms_p95": 1e3 * float(np.percentile(times, 95)),
         "live_rtf": mean / REAL_TIME_S, "passes_per_round": passes / rounds,
         "rows_per_pass": (engine.rows - rows0) / max(passes, 1), "encoder_passes_per_round": enc / rounds,
         "sessions_per_encoder_pass": (engine.encoder_chunks - chunks0) / max(enc, 1), "read_GB/s": bw,
         "after_s": None if math.isinf(after) else after, "full_window": math.isinf(after)}
    print(f"  live N={n:>2}{f' ({how_far(after)})' if after else ''}: round {r['round_ms_mean']:.1f} ms mean, {r['round_ms_p95']:.1f} p95 -> RTF "
          f"{r['live_rtf']:.2f}; {r['passes_per_round']:.1f} decoder passes per round, {r['rows_per_pass']:.1f} "
          f"rows each; {r['encoder_passes_per_round']:.1f} encoder passes per round, "
          f"{r['sessions_per_encoder_pass']:.1f} sessions each; probe {bw:.1f} GB/s", flush=True)
    return r


def run(path, args, machine):
    model = voxtral_ref.load(path, backend="c", precision=args.precision)
    label = model.quantize or model.precision
    print(f"{path}: {label} weights, decoder + LM head {decoder_bytes(model) / 1e9:.2f} GB", flush=True)
    out = {"model": str(path), "quantize": model.quantize, "precision": model.precision}
    if not args.live_only:
        out["decode"] = bench_decode(model, args.rows, args.tokens, machine, np.random.default_rng(0))
        out["verify"] = bench_verify(model, args.tokens, machine, np.random.default_rng(1))
        out["verify"]["speedup_by_acceptance"] = speedups(out["verify"]["vs_one_row"])
        out["verify"]["draft_rate_golden"] = draft_rate(model)
    with np.load(GOLDEN) as z:
        audio = voxtral_ref.stages.audio.to_mono_16k(z["audio"], C.SAMPLE_RATE)
    counts = [2 ** i for i in range(args.streams.bit_length())]                     # 1, 2, 4, ... <= streams
    out["encoder"] = bench_encoder(model, counts, machine, np.random.default_rng(2))
    out["live"], n = [], 1
    while n <= args.streams:
        out["live"].append(bench_live(model, n, args.rounds, audio, machine, args.after))
        n *= 2

    def keeps_up(r):
        return r["round_ms_mean"] < 1e3 * REAL_TIME_S
    # then between the last N that kept up and the first that did not, by halving the gap
    lo = max([r["streams"] for r in out["live"] if keeps_up(r)], default=0)
    hi = min([r["streams"] for r in out["live"] if not keeps_up(r) and r["streams"] > lo], default=lo + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        out["live"].append(bench_live(model, mid, args.rounds, audio, machine, args.after))
        lo, hi = (mid, hi) if keeps_up(out["live"][-1]) else (lo, mid)
    sustained = max([r["streams"] for r in out["live"] if keeps_up(r)], default=0)
    out["live_streams_sustained"] = sustained
    print(f"{label}: {sustained} live stream(s) sustained in real time (mean round under 80 ms) {how_far(args.after)}".rstrip(),
          flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="checkpoint directories (quantised ones load as they are)")
    ap.add_argument("--rows", default="1,2,4,8,16", help="sequences per pass to time (default 1,2,4,8,16)")
    ap.add_argument("--tokens", type=int, default=16, help="timed passes per M (default 16)")
    ap.add_argument("--streams", type=int, default=16, help="most live streams to try, doubling from 1 (default 16)")
    ap.add_argument("--rounds", type=int, default=12, help="timed 80 ms rounds per N (default 12)")
    ap.add_argument("--live-only", action="store_true", help="only the live streams (no decode, no verify)")
    ap.add_argument("--after", type=float, default=0.0, metavar="SECONDS",
                    help="live streams as they are that far in (each session fast-forwarded first; default 0: young)")
    ap.add_argument("--full-window", dest="after", action="store_const", const=math.inf,
                    help="as far in as fills every KV slot (11 minutes: full encoder and decoder windows)")
    ap.add_argument("--precision", default="bf16", choices=kernels.PRECISIONS,
                    help="matmul inputs of the unquantised matrices (default bf16)")
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    ap.add_argument("--json", type=Path, default=OUT / "batch.json")
    args = ap.parse_args()
    args.rows = [int(m) for m in args.rows.split(",")]
    run_models(args, run)


if __name__ == "__main__":
    main()
