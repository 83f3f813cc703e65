"""Load test for `voxtral-ref serve`, on 127.0.0.1 only: starts the server as a subprocess, then N WebSocket
clients (vLLM's protocol and OpenAI's transcription sessions, mixed) each stream the same speech, tiled to
--seconds, paced in real time (100 ms chunks), commit, and wait for the final event. Then --cycles clients
connect, stream a second of audio and vanish mid-stream.

Reports, from the client side: per-session lag (audio sent minus audio the received text covers; the
token clock maps text to audio: token k needs (k + 1 + delay) * 80 ms), delta latency (from sending the
chunk that completes a token's audio to receiving its text) p50/p95, time from the final commit to the
final event, errors, whether each final transcript equals offline `Model.transcribe` of the same audio,
the server's passes (how many, their mean time and sessions, the share of the wall time they took), and
the server's RSS over time: flat after warm-up means its least-squares slope over the second half of
the audio (every client still streaming; the final flush comes after) is at most FLAT_MB_PER_MIN above
what the sessions' KV caches add by filling their rings meanwhile (cache_growth: the decoder's grow for
11 minutes, ~41 MB a minute a session in the full-size quantised modes; the tiny models' by little). After
the disconnect cycles (each batch waits until the server has room for it under its session limit, since a
large model takes a while to drop vanished clients): the server's RSS every 50 cycles and once the idle
server has trimmed its heap, its open sessions and clients.

    python bench/serve_load.py --model golden/models/tiny_mistral --sessions 64 --seconds 60 --cycles 200
"""

import argparse
import asyncio
import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_bench import slot_bytes  # noqa: E402
import voxtral_ref  # noqa: E402
from voxtral_ref.apps.serve.sessions import TRIM_EVERY_S  # noqa: E402
from voxtral_ref.config import DOWNSAMPLE, FRAME_RATE, N_LEFT_PAD_TOKENS, SAMPLES_PER_TOKEN  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHUNK_S = 0.1
RSS_EVERY_S = 2.0
FLAT_MB_PER_MIN = 5.0            # the creep this bench found (glibc arenas, sessions.Heap) was ~50 MB/min


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def max_sessions(args):
    return args.sessions + 16


def start_server(args):
    cmd = [sys.executable, "-m", "voxtral_ref.apps.cli", "serve", "--model", args.model, "--port", "0",
           "--backend", args.backend, "--max-sessions", str(max_sessions(args)), "--served-model-name", "m"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    while not (m := re.search(r"http://127\.0\.0\.1:(\d+)", proc.stderr.readline())):
        if proc.poll() is not None:
            sys.exit("the server did not start")
    return proc, int(m.group(1))


def text_ends(model, ids):
    """Length of the text after each generated token (offline ids): maps a received text length to the
    token that completed it."""
    dec, n, out = model.tokenizer.incremental(), 0, []
    for i in ids:
        n += len(dec.feed([i]))
        out.append(n)
    return np.array(out)


class Reference:
    """One protocol's audio, its offline transcript, and where each token's audio ends."""

    def __init__(self, model, audio16, rate):
        self.rate = rate
        self.pcm = audio16 if rate == 16000 else to_pcm(soxr.resample(audio16 / 32768, 16000, rate))
        r = model.transcribe(self.pcm, sample_rate=rate)
        self.text, self.ends = r.text, text_ends(model, r.token_ids)
        d = model.cfg.default_delay_ms // 80
        # samples (at `rate`) that must have been sent before token k can come out
        k = np.arange(len(r.token_ids))
        self.need = np.ceil((SAMPLES_PER_TOKEN * (k + 1 + d) + 40) * rate / 16000).astype(int)
        self.covered_s = (k + 1 + d) * 0.08


def to_pcm(x):
    return (np.clip(x, -1, 32767 / 32768) * 32768).astype(np.int16)


async def client(port, ref, openai, start_delay, stats):
    """Stream ref.pcm in real time; record latencies and lag; check the final transcript."""
    await asyncio.sleep(start_delay)
    url = f"ws://127.0.0.1:{port}/v1/realtime" + ("?intent=transcription" if openai else "")
    chunk = int(ref.rate * CHUNK_S)
    sent_at, lat, lags, text, errors = [], [], [], "", 0
    done_evt = "conversation.item.input_audio_transcription.completed" if openai else "transcription.done"
    delta_evt = "conversation.item.input_audio_transcription.delta" if openai else "transcription.delta"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        if not openai:
            await ws.send(json.dumps({"type": "session.update", "model": "m"}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        final, committed = {}, False

        async def reader():
            nonlocal text, errors
            async for raw in ws:
                e = json.loads(raw)
                now = time.perf_counter()
                if e["type"] == delta_evt:
                    text += e["delta"]
                    k = int(np.searchsorted(ref.ends, len(text)))          # the token completing the text
                    k = min(k, len(ref.need) - 1)
                    i = int(np.searchsorted([s for s, _ in sent_at], ref.need[k]))
                    if i < len(sent_at):
                        lat.append(now - sent_at[i][1])
                    if not committed:                         # after the commit, the right pad's tokens
                        lags.append(len(sent_at) * CHUNK_S - ref.covered_s[k])
                elif e["type"] == done_evt:
                    final["text"], final["t"] = e.get("text", e.get("transcript")), now
                    return
                elif e["type"] == "error":
                    errors += 1
        task = asyncio.create_task(reader())
        t0 = time.perf_counter()
        for n, i in enumerate(range(0, len(ref.pcm), chunk)):
            await asyncio.sleep(max(0.0, t0 + n * CHUNK_S - time.perf_counter()))
            piece = ref.pcm[i:i + chunk]
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(piece.tobytes()).decode()}))
            sent_at.append((i + len(piece), time.perf_counter()))
        t_commit, committed = time.perf_counter(), True
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", **({} if openai else {"final": True})}))
        await asyncio.wait_for(task, 600)
    stats.append({"openai": openai, "equal": final.get("text") == ref.text, "errors": errors, "lat": lat,
                  "lags": lags, "flush": final["t"] - t_commit})


async def vanish(port, pcm16):
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "model": "m"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for i in range(0, 16000, 1600):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm16[i:i + 1600].tobytes()).decode()}))
        await asyncio.sleep(0.2)
        ws.transport.abort()                               # no close handshake: the client just vanishes


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))


async def sample_rss(pid, series, t0, stop):
    while not stop.is_set():
        series.append((time.perf_counter() - t0, rss_mb(pid)))
        try:
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)
        except asyncio.TimeoutError:
            pass


def cache_growth(model, sessions, t0, t1):
    """MB a minute that `sessions` streams' KV caches add between t0 and t1 seconds of their audio: each
    ring's rows are first written (and paged in) as its positions arrive, after the left pad's, until the
    ring is full."""
    s, pad_s = model.stream(), N_LEFT_PAD_TOKENS / FRAME_RATE
    rings = [(c, FRAME_RATE) for c in s._dec.caches] + [(c, DOWNSAMPLE * FRAME_RATE) for c in s._enc_caches]
    grown = sum(2 * slot_bytes(c.k) * (min(c.capacity, rate * (t1 + pad_s)) - min(c.capacity, rate * (t0 + pad_s)))
                for c, rate in rings)
    return sessions * grown / 1e6 * 60 / (t1 - t0)


async def room(port, limit, n, timeout_s=300.0):
    """Wait until the server admits n more clients under its session limit; -> seconds waited, None if not."""
    t0 = time.perf_counter()
    while metric(port, "voxtral_clients") + n > limit:
        if time.perf_counter() - t0 > timeout_s:
            return None
        await asyncio.sleep(0.2)
    return time.perf_counter() - t0


def slope_mb_per_min(series, t0, t1):
    """Least-squares slope of RSS over the samples in [t0, t1)."""
    pts = [(t, r) for t, r in series if t0 <= t < t1]
    return 60 * float(np.polyfit(*zip(*pts), 1)[0]) if len(pts) >= 3 else float("nan")


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


async def main(args):
    model = voxtral_ref.load(args.model, backend=args.backend)
    speech, _ = sf.read(ROOT / "golden" / "audio" / "speech_en.wav", dtype="int16")
    audio = np.tile(speech, int(np.ceil(args.seconds * 16000 / len(speech))))[:int(args.seconds * 16000)]
    refs = {False: Reference(model, audio, 16000), True: Reference(model, audio, 24000)}
    proc, port = start_server(args)
    try:
        t0, stop, series = time.perf_counter(), asyncio.Event(), []
        sampler = asyncio.create_task(sample_rss(proc.pid, series, t0, stop))
        stats = []
        spread = min(2.0, args.seconds / 4)                 # stagger the starts over 2 s
        results = await asyncio.gather(*(client(port, refs[n % 2 == 1], n % 2 == 1, spread * n / args.sessions,
                                                stats) for n in range(args.sessions)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        t_stream = time.perf_counter() - t0
        passes = {n: metric(port, f"voxtral_pass_{n}") for n in ("seconds_sum", "seconds_count", "sessions_sum")}
        cycle_rss, waited, done = [(0, rss_mb(proc.pid))], 0.0, 0        # (cycles done, RSS)
        while done < args.cycles:
            n = min(8, args.cycles - done)
            if (w := await room(port, max_sessions(args), n)) is None:
                break                                       # reported below: the server never made room
            waited += w
            await asyncio.gather(*(vanish(port, speech) for _ in range(n)))
            done += n
            if done // 50 > (done - n) // 50 or done == args.cycles:     # past a multiple of 50
                cycle_rss.append((done, rss_mb(proc.pid)))
        await asyncio.sleep(TRIM_EVERY_S + 1)               # the idle server trims its heap once more
        open_after, clients_after = metric(port, "voxtral_open_sessions"), metric(port, "voxtral_clients")
        rss_after = rss_mb(proc.pid)
        stop.set()
        await sampler
    finally:
        proc.terminate()
        code = proc.wait(60)

    first = [np.mean(s["lags"][:len(s["lags"]) // 4]) for s in stats if len(s["lags"]) >= 8]
    last = [np.mean(s["lags"][-len(s["lags"]) // 4:]) for s in stats if len(s["lags"]) >= 8]
    print(f"{args.sessions} sessions ({sum(s['openai'] for s in stats)} OpenAI, "
          f"{sum(not s['openai'] for s in stats)} vLLM) x {args.seconds:g} s of audio, real-time paced; "
          f"model {args.model}, backend {args.backend}; wall {t_stream:.1f} s")
    print(f"  finished {len(stats)}, client exceptions {len(failures)}"
          + (f" (first: {failures[0]!r})" if failures else "")
          + f", error events {sum(s['errors'] for s in stats)}; final == offline transcribe(): "
          f"{sum(s['equal'] for s in stats)}/{len(stats)}")
    for name, sel in (("all", (False, True)), ("vLLM", (False,)), ("OpenAI", (True,))):
        xs = [x for s in stats if s["openai"] in sel for x in s["lat"]]
        print(f"  delta latency ({name}): p50 {1e3 * pct(xs, 50):.0f} ms, p95 {1e3 * pct(xs, 95):.0f} ms "
              f"({len(xs)} deltas)")
    if first:
        print(f"  lag behind the audio while streaming (80 ms token grain): first quarter mean {np.mean(first):.2f} s, "
              f"last quarter mean {np.mean(last):.2f} s, last quarter max {np.max(last):.2f} s")
    else:
        print("  lag behind the audio: no text arrived before the final commit (the server fell behind)")
    n_pass = max(passes["seconds_count"], 1)
    print(f"  the model's thread: {passes['seconds_count']:.0f} passes, {1e3 * passes['seconds_sum'] / n_pass:.1f} ms "
          f"and {passes['sessions_sum'] / n_pass:.2f} sessions per pass on average, busy "
          f"{100 * passes['seconds_sum'] / t_stream:.0f} % of the wall time")
    print(f"  final commit -> final event: p50 {pct([s['flush'] for s in stats], 50):.2f} s, "
          f"max {max(s['flush'] for s in stats):.2f} s")
    print("  server RSS (MB) over time: " + ", ".join(f"{t:.0f}s {r:.0f}" for t, r in series))
    slope = slope_mb_per_min(series, args.seconds / 2, args.seconds)
    caches = cache_growth(model, len(stats), args.seconds / 2, args.seconds)
    print(f"  RSS slope over the second half of the audio ({args.seconds / 2:g}-{args.seconds:g} s): "
          f"{slope:+.1f} MB/min, against {caches:+.1f} for the KV caches filling their rings: "
          + ("too few samples" if np.isnan(slope) else "flat" if slope <= caches + FLAT_MB_PER_MIN else "GROWING")
          + f" (flat: at most {FLAT_MB_PER_MIN:+g} MB/min more)")
    print(f"  {done} of {args.cycles} connect/stream/vanish cycles"
          + ("" if done == args.cycles else " (then the server kept its session limit full for 300 s)")
          + f", {waited:.1f} s waiting for room under the session limit: RSS (MB) "
          + ", ".join(f"{n} {r:.0f}" for n, r in cycle_rss)
          + f", {TRIM_EVERY_S + 1:g} s later {rss_after:.0f}; open sessions after: {open_after:g}, "
          f"clients after: {clients_after:g}")
    print(f"  server exit code after SIGTERM: {code}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "golden" / "models" / "tiny_mistral"))
    p.add_argument("--backend", default="c")
    p.add_argument("--sessions", type=int, default=64, help="concurrent clients (at most 256)")
    p.add_argument("--seconds", type=float, default=60.0, help="audio per client (at most 600)")
    p.add_argument("--cycles", type=int, default=200, help="connect/disconnect cycles (at most 2000)")
    a = p.parse_args()
    if not (1 <= a.sessions <= 256 and 1 <= a.seconds <= 600 and 0 <= a.cycles <= 2000):
        sys.exit("--sessions 1..256, --seconds 1..600, --cycles 0..2000: this bench stays bounded")
    asyncio.run(main(a))
