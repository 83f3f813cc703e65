"""Live streaming speed on the full-size model (not run by CI): is a live step faster than the 80 ms of audio
it consumes?

    python bench/make_full_checkpoint.py /work/fullsize_ckpt                       # once: random weights
    voxtral-ref quantize --model /work/fullsize_ckpt --quantize q4 -o /work/full_q4  # once per format
    python bench/live_bench.py /work/full_q4 /work/full_int8 --seconds 20          # table + bench/out/live.json

For each model directory: a paced 16 kHz source feeds one 80 ms block at a time through the public API
(`Model.stream()`, `feed()` then `step()` at once, then a wait until the next block is due), so a step is
encoder + adapter + decoder + LM head for one token, as a live client sees it. Reported per phase:
  start   a new session: the latency of its first token (from the feed that completed its audio), then
          the steps of the first --seconds of speech; after both phases, the first token of NEW_SESSIONS
          more new sessions (the model warm, as in a server: the process's first session also pays
          for whatever ran before it, here the previous model's run);
  full    the same session fast-forwarded a decoder ring's worth of positions (8448: full windows, every KV slot in use:
          what an 11-minute stream reaches), then --seconds more;
With --catch-up each step is fed every block due by then instead (at least one): a client that fell behind
hands the session all the audio waiting, whose positions then decode in one pass with drafts verified (what
the server and `voxtral-ref stream` do); the text's lag behind the source (first and last quarter of the
phase) then says whether the stream keeps up.
per phase: step ms (median, mean, p95), live RTF (the steps' time over the audio's: mean step / 80 ms at one
block a step), the bytes a step must read (weights,
plus the KV caches its attention reads), the read bandwidth probed in the same run (bench/probes.c: before
and after each phase and a quick read between every PROBE_EVERY steps; the median of them all, and their
range), the roofline ratio (mean step / (bytes / bandwidth)), the time outside the
weight-streaming kernels (step minus the time inside the C linears, ckernels.weight_seconds) and, of it, the
time inside attention (ckernels.attention_seconds: the KV caches' reads) and the rest (Python, cffi, norms,
RoPE, activation quantisation outside the linears, threads waking), and peak RSS (less the probe's 1 GiB buffer).
The fast-forward is a benchmark device: it shifts the session's clocks and fills its caches with random
keys and values at positions it never computed (their values do not change speed, but pages never written
would: they read as the kernel's shared zero page), and is never used for real transcription.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402
from bench_model import reset_peak_rss  # noqa: E402
import voxtral_ref  # noqa: E402
from voxtral_ref import config as C  # noqa: E402
from voxtral_ref.runtime import ckernels, kernels  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "cases" / "speech_en_long_480.npz"
BLOCK = C.SAMPLES_PER_TOKEN                               # 1280 samples = 80 ms: one step's audio


def rss_gb():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1e6 for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "VmHWM")}


def weight_bytes(model):
    """Bytes of every matrix a step streams: conv stem, encoder, adapter, decoder, LM head."""
    w = model.weights
    names = [n for n, t in w._t.items() if t.ndim >= 2 and n != "tok_embeddings" and ".ada_" not in n]
    return sum(w._t[n].nbytes for n in names) + w.lm_head.nbytes


def slot_bytes(kv):
    """Bytes of one position's keys (or values) in a cache: float32 rows, or KV8's codes and scales."""
    _, h, d = kv.shape
    return h * (d + 4) if isinstance(kv, kernels.KV8) else h * d * 4


def kv_bytes(session):
    """Bytes of the KV caches a step's attention reads: every live slot of every layer, keys and values."""
    caches = session._dec.caches + session._enc_caches
    return sum(2 * c.filled * slot_bytes(c.k) for c in caches)


def fast_forward(session, tokens):
    """Move a running session `tokens` positions ahead, its caches holding every position since the start
    that their rings keep (all of them once a ring has wrapped), and fill every slot (see the module doc)
    with random keys and values: slots never written would stay on the kernel's shared zero page, which
    every read then finds in cache, hiding the KV caches' real memory traffic."""
    ds = session._model.cfg.downsample
    rng = np.random.default_rng(0)
    session._dec.ids[len(session._dec.prompt):len(session._dec.prompt)] = [C.STREAMING_PAD_ID] * tokens
    for caches, shift in ((session._dec.caches, tokens), (session._enc_caches, tokens * ds)):
        for c in caches:
            newest = int(c.pos.max()) + shift
            kept = np.arange(max(0, newest - c.capacity + 1), newest + 1)              # positions the ring holds
            c.pos[:] = -1
            c.pos[kept % c.capacity] = kept
            c.filled = len(kept)
            for kv in (c.k, c.v):
                if isinstance(kv, kernels.KV8):
                    kv.blocks[...] = rng.integers(-127, 128, kv.blocks.shape, np.int8)
                    kv.scale[...] = rng.uniform(0.001, 0.01, kv.scale.shape).astype(np.float32)
                else:
                    kv[...] = rng.standard_normal(kv.shape, np.float32)
    session._n_embeds += tokens
    session._buf_start += tokens * BLOCK
    session._n_samples += tokens * BLOCK
    session._arrivals = type(session._arrivals)((end + tokens * BLOCK, t) for end, t in session._arrivals)


# A quick bandwidth read (256 MB, a few ms, outside the timed steps, though it leaves the last-level cache
# holding the probe's buffer) after every PROBE_EVERY steps: on hosts whose bandwidth switches between levels
# within a phase (the twenty-third session's Zen 4: ~30 and ~55 GB/s), probes only before and after a phase
# can name a regime the steps between them did not run in.
PROBE_EVERY = 10


def paced(session, audio, seconds, block, machine, catch_up=False):
    """Feed `seconds` of audio `block` samples at a time in real time (catch_up: every block due by then,
    at least one, before each step); -> step seconds, linear seconds, attention seconds, first-token
    latency, the bandwidth read between steps, and after each step the text's lag behind the source (the
    time since the source began less the 80 ms each token of the phase covers: the step's own time for a
    stream that keeps up)."""
    steps, inside, attn, first, reads, lags, tokens = [], [], [], None, [], [], 0
    n_blocks, fed, i = int(seconds * C.SAMPLE_RATE) // block, 0, 0
    block_s = block / C.SAMPLE_RATE
    t_start = time.perf_counter()
    while fed < n_blocks:
        wait = t_start + fed * block_s - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        due = min(n_blocks, int((time.perf_counter() - t_start) / block_s) + 1) if catch_up else fed + 1
        chunk = np.concatenate([audio[(b * block) % len(audio):][:block] for b in range(fed, due)])
        fed = due
        lin0, att0 = ckernels.weight_seconds(), ckernels.attention_seconds()
        t0 = time.perf_counter()
        session.feed(chunk)
        e = session.step()
        steps.append(time.perf_counter() - t0)
        inside.append(ckernels.weight_seconds() - lin0)
        attn.append(ckernels.attention_seconds() - att0)
        tokens += len(e.token_ids)
        # block b is fed when it is due, at t_start + b block_s, as if its audio had just ended there: the
        # source began one block before t_start
        lags.append(time.perf_counter() - t_start + block_s - tokens * C.MS_PER_TOKEN / 1000)
        if first is None and e.latency_s:
            first = e.latency_s[0]
        if i % PROBE_EVERY == PROBE_EVERY - 1:
            reads.append(machine.read_gbs_once())       # outside the steps, but inside the lag's clock
        i += 1
    return np.array(steps), np.array(inside), np.array(attn), first, reads, np.array(lags)


NEW_SESSIONS = 3


def lead_samples(session):
    """The first token needs 1280 * (delay + 1) + 40 samples: what to feed before the block that completes it."""
    return BLOCK * (session.n_delay + 1) + 40 - BLOCK


def first_token_s(model, audio, block):
    """A new session fed up to just before its first token's audio, stepped, then the block that completes
    it: -> that token's latency."""
    session = model.stream()
    lead = lead_samples(session)
    session.feed(audio[:lead])
    session.step()
    session.feed(audio[lead:lead + block])
    return session.step().latency_s[0]


def summary(steps, inside, attn, nbytes, bw, seconds, lags):
    """seconds: the audio the steps were fed."""
    mean, q = steps.mean(), max(1, len(lags) // 4)
    return {"steps": len(steps), "step_ms_median": 1e3 * float(np.median(steps)), "step_ms_mean": 1e3 * float(mean),
            "step_ms_p95": 1e3 * float(np.percentile(steps, 95)),
            "live_rtf": float(steps.sum() / seconds),        # one block a step: mean step / block
            "lag_s_first_quarter": float(lags[:q].mean()), "lag_s_last_quarter": float(lags[-q:].mean()),
            "lag_s_max": float(lags.max()),
            "bytes_per_step_GB": nbytes / 1e9, "read_GB/s": bw, "roofline_ms": 1e3 * nbytes / 1e9 / bw,
            "vs_roofline": float(mean / (nbytes / 1e9 / bw)),
            "outside_kernels_ms_mean": 1e3 * float((steps - inside).mean()),
            "attention_ms_mean": 1e3 * float(attn.mean()), "rest_ms_mean": 1e3 * float((steps - inside - attn).mean())}


def run(path, args, machine):
    reset_peak_rss()
    t0 = time.perf_counter()
    model = voxtral_ref.load(path, backend="c", precision=args.precision)
    load_s = time.perf_counter() - t0
    with np.load(GOLDEN) as z:
        audio = z["audio"]
    out = {"model": str(path), "quantize": model.quantize, "precision": model.precision, "load_s": load_s,
           "weight_GB": weight_bytes(model) / 1e9}
    label = model.quantize or model.precision
    block = BLOCK * args.block_ms // C.MS_PER_TOKEN
    out["block_ms"] = args.block_ms
    session = model.stream()
    lead = lead_samples(session)        # then the block that completes the first token, timed as a client sees it
    session.feed(audio[:lead])
    session.step()
    for phase in ("start", "full"):
        if phase == "full":
            fast_forward(session, session._dec.caches[0].capacity)        # every slot of every ring in use
        bw_before = machine.read_gbs()
        steps, inside, attn, first, reads, lags = paced(session, audio[lead:], args.seconds, block, machine,
                                                        args.catch_up)
        reads = [bw_before, *reads, machine.read_gbs()]
        bw = float(np.median(reads))
        fed_s = int(args.seconds * C.SAMPLE_RATE) // block * block / C.SAMPLE_RATE
        out[phase] = summary(steps, inside, attn, weight_bytes(model) + kv_bytes(session), bw, fed_s, lags)
        out[phase]["read_GB/s_reads"] = reads
        if phase == "start":
            out["first_token_latency_ms"] = 1e3 * first if first is not None else None
        r = out[phase]
        print(f"{label:>10} {phase:>5}: step {r['step_ms_median']:.1f} / {r['step_ms_mean']:.1f} / "
              f"{r['step_ms_p95']:.1f} ms (median/mean/p95), live RTF {r['live_rtf']:.2f}, "
              f"{r['bytes_per_step_GB']:.2f} GB/step at {bw:.1f} GB/s ({min(reads):.1f}-{max(reads):.1f}) -> "
              f"roofline {r['roofline_ms']:.1f} ms "
              f"({r['vs_roofline']:.2f}x), outside kernels {r['outside_kernels_ms_mean']:.1f} ms (attention "
              f"{r['attention_ms_mean']:.1f}, the rest {r['rest_ms_mean']:.1f})"
              + (f"; catching up: {r['steps']} steps, text {r['lag_s_first_quarter']:.2f} -> "
                 f"{r['lag_s_last_quarter']:.2f} s behind (first / last quarter, max {r['lag_s_max']:.2f})"
                 if args.catch_up else ""), flush=True)
    out["peak_rss_GB"] = rss_gb().get("VmHWM") - machine.buf.nbytes / 1e9   # the probe's buffer is not the model's
    session = None                      # its full-window caches go before the new sessions open
    out["new_sessions_first_token_ms"] = [1e3 * first_token_s(model, audio, block) for _ in range(NEW_SESSIONS)]
    print(f"{label:>10}: load {load_s:.2f} s, first token {out['first_token_latency_ms']:.0f} ms after its audio "
          f"(then {NEW_SESSIONS} new sessions: " + " / ".join(f"{t:.0f}" for t in out["new_sessions_first_token_ms"])
          + f" ms), peak RSS {out['peak_rss_GB']:.2f} GB", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="checkpoint directories (quantised ones load as they are)")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per phase (default 20 s)")
    ap.add_argument("--precision", default="bf16", choices=kernels.PRECISIONS,
                    help="matmul inputs of the unquantised matrices (default bf16)")
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    ap.add_argument("--block-ms", type=int, default=C.MS_PER_TOKEN, choices=[80, 160, 240],
                    help="audio per feed() + step(): wider blocks step the encoder less often and decode a "
                         "backlog of positions per step, for more latency (default 80)")
    ap.add_argument("--catch-up", action="store_true",
                    help="before each step feed every block due by then, as `voxtral-ref serve` and `voxtral-ref "
                         "stream` do: a step behind the audio decodes the positions waiting in one pass, "
                         "verifying drafts; reports how far the text falls behind the source")
    ap.add_argument("--json", type=Path, default=OUT / "live.json")
    run_models(ap.parse_args(), run)


def run_models(args, run):
    """Kernel threads as --threads says, the bandwidth probes built, run(path, args, machine) for each of
    args.models, their records written to --json (bench/batch_bench.py runs the same way)."""
    from voxtral_ref.runtime import ckernels
    ckernels.set_threads(args.threads)
    machine = bench_kernels.Machine(bench_kernels.build_probes(), ckernels.get_threads())
    results = {"threads": ckernels.get_threads(), "runs": [run(p, args, machine) for p in args.models]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
