"""Throughput of `voxtral-ref batch` on a folder of clips: embedded with 1 and 2 threads, and on a local Ray
cluster (2 actors x 1 thread), each into a fresh output folder. Prints files/s, audio hours per wall hour,
real-time factor per core (what sizing workers needs: see README, Batch transcription) and Ray's overhead.

    python bench/bench_batch.py                                  # tiny model, 24 clips of 10 s
    python bench/bench_batch.py --model /work/fullsize_ckpt --files 4 --seconds 30 --quantize int8
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from voxtral_ref.apps import batch

ROOT = Path(__file__).resolve().parent.parent


def make_clips(d, n, seconds):
    """n clips of the golden speech tiled to `seconds`, each shifted so no two are the same file."""
    x, sr = sf.read(ROOT / "golden" / "audio" / "speech_en.wav", dtype="int16")
    long = np.tile(x, int(seconds * sr // len(x)) + 2)
    for i in range(n):
        sf.write(d / f"clip{i:03d}.wav", long[i * 160:i * 160 + int(seconds * sr)], sr)


def one(label, clips, work, cores, **kw):
    out = work / label.replace(" ", "_")
    t0 = time.perf_counter()
    s = batch.run([clips], out, **kw)
    wall = time.perf_counter() - t0                  # the whole call: model load (and actor start) included
    assert s.failed == 0 and s.transcribed > 0
    rtf_core = wall * cores / s.audio_s
    print(f"{label:<28} {s.transcribed / wall:7.2f} files/s  {s.audio_s / wall:7.1f} audio h per wall h  "
          f"wall {wall:6.2f} s  RTF x cores {rtf_core:.3f}", flush=True)
    return wall


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "golden" / "models" / "tiny_mistral"))
    p.add_argument("--files", type=int, default=24)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--precision", default="f32")
    p.add_argument("--quantize", default=None)
    p.add_argument("--no-ray", action="store_true")
    a = p.parse_args()
    kw = dict(model=a.model, precision=a.precision, quantize=a.quantize)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clips = work / "clips"
        clips.mkdir()
        make_clips(clips, a.files, a.seconds)
        print(f"{a.files} clips of {a.seconds:g} s ({a.files * a.seconds / 3600:.3f} h), model {a.model}")
        one("embedded, 1 thread", clips, work, 1, threads=1, **kw)
        embedded = one("embedded, 2 threads", clips, work, 2, threads=2, **kw)
        if a.no_ray:
            return
        import ray
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        print(f"ray.init (local cluster, 2 CPUs): {time.perf_counter() - t0:.2f} s", flush=True)
        try:
            cold = one("ray 2 actors x 1 thread", clips, work, 2, ray=True, workers=2, threads=1, **kw)
            warm = one("ray again (workers warm)", clips, work, 2, ray=True, workers=2, threads=1, **kw)
        finally:
            ray.shutdown()
        print(f"ray / embedded 2 threads, wall: {cold / embedded:.2f}x first run, {warm / embedded:.2f}x second; "
              f"overhead {cold - embedded:+.2f} s, {warm - embedded:+.2f} s")


if __name__ == "__main__":
    main()
