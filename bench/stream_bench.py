"""Streaming latency and memory: `python bench/stream_bench.py --model golden/models/tiny_mistral --minutes 10`.

latency  feeds the audio so that each feed() completes exactly one token's audio (its 1280 samples + the
         40-sample look-ahead), steps at once, and reports the time from that feed() to the token.
memory   streams `--minutes` of audio in 20 ms chunks, stepping after each, and samples the process's
         resident set size (VmRSS) and the session's state sizes every 30 s of audio.
Prints one JSON object on stdout; progress on stderr. The audio is a golden speech clip, repeated.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import voxtral_ref
from voxtral_ref.config import SAMPLE_RATE, SAMPLES_PER_TOKEN, delay_tokens
from voxtral_ref.runtime.stream import LOOK_AHEAD

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "cases" / "speech_en_long_480.npz"


def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clip():
    with np.load(GOLDEN) as z:
        return z["audio"]


def audio_of(seconds):
    return np.resize(clip(), int(seconds * SAMPLE_RATE))                # the clip repeated, cut to length


def blocks_of(seconds, block):
    """The same audio as 20 ms blocks, made on the fly so the input does not weigh on the RSS."""
    x = clip()
    for i in range(0, int(seconds * SAMPLE_RATE), block):
        idx = np.arange(i, min(i + block, int(seconds * SAMPLE_RATE))) % len(x)
        yield x[idx]


def latency(model, seconds):
    """Per-token seconds from the feed() that completes a token's audio to its emission."""
    s = model.stream()
    audio = audio_of(seconds)
    first = SAMPLES_PER_TOKEN * (delay_tokens(s.delay_ms) + 1) + LOOK_AHEAD     # the first token's audio
    ends = range(first, len(audio) + 1, SAMPLES_PER_TOKEN)
    lat, start = [], 0
    for end in ends:
        s.feed(audio[start:end])
        lat += s.step().latency_s
        start = end
    lat = np.array(lat[1:]) * 1e3                                        # ms; the first token also runs the prompt
    return {"tokens": len(lat), "median_ms": round(float(np.median(lat)), 3),
            "p95_ms": round(float(np.percentile(lat, 95)), 3), "max_ms": round(float(lat.max()), 3)}


def memory(model, minutes):
    s = model.stream()
    block, every = SAMPLE_RATE // 50, 30 * SAMPLE_RATE
    samples, fed, t0 = [], 0, time.perf_counter()
    for b in blocks_of(60 * minutes, block):
        s.feed(b)
        s.step()
        fed += len(b)
        if fed % every < block:
            samples.append({"audio_s": fed // SAMPLE_RATE, "rss_mb": round(rss_mb(), 1), **s.footprint()})
            print(f"{samples[-1]}", file=sys.stderr)
    s.close()
    rss = [x["rss_mb"] for x in samples]
    return {"audio_minutes": minutes, "tokens": len(s.token_ids), "wall_s": round(time.perf_counter() - t0, 1),
            "rss_mb_first_sample": rss[0], "rss_mb_last_sample": rss[-1], "rss_mb_max": max(rss),
            "state_first": {k: v for k, v in samples[0].items() if k not in ("audio_s", "rss_mb")},
            "state_last": {k: v for k, v in samples[-1].items() if k not in ("audio_s", "rss_mb")}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="auto")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--latency-seconds", type=float, default=60.0)
    a = p.parse_args()
    model = voxtral_ref.load(a.model, backend=a.backend)
    print(json.dumps({"model": a.model, "backend": model.backend, "latency": latency(model, a.latency_seconds),
                      "memory": memory(model, a.minutes)}))


if __name__ == "__main__":
    main()
