"""Stage 0: whatever the user has -> mono float32 samples at 16 kHz, validated."""

import io
import sys
from pathlib import Path

import numpy as np

from ..config import SAMPLE_RATE
from ..errors import VoxtralError


RESAMPLE_QUALITY = "HQ"                   # soxr's high quality; its one-shot and stream resamplers agree exactly


# Sample rates accepted, in Hz: telephone-band 8 kHz sits well inside, 768 kHz is the highest rate audio
# hardware offers. A rate outside is a mistake (sample_rate=1 would turn 0.5 s into 2.2 h of audio;
# 2**63 hangs the resampler).
MIN_RATE, MAX_RATE = 1000, 768000
# 2-D audio is [samples, channels] (soundfile's layout). More columns than this is read as torchaudio's
# [channels, samples] (or x[None]), which would otherwise be mixed down to 1-2 "samples" of silence.
MAX_CHANNELS = 16


def to_mono_16k(audio, sample_rate=SAMPLE_RATE):
    """[N] or [N, channels] samples (float, or int PCM scaled to [-1, 1)) at `sample_rate` -> [N'] float32
    at 16 kHz. Channels are averaged; other rates are resampled with soxr (high quality)."""
    check_sample_rate(sample_rate)
    a = to_mono_float32(audio)
    if a.size == 0:
        raise VoxtralError("the audio is empty (0 samples)")
    if sample_rate != SAMPLE_RATE:
        import soxr
        a = soxr.resample(a, int(sample_rate), SAMPLE_RATE, quality=RESAMPLE_QUALITY).astype(np.float32)
        if a.size == 0:
            raise VoxtralError(f"the audio is too short: resampled from {sample_rate} Hz to 16 kHz it has no samples")
    return a


def to_mono_float32(audio):
    """Validate and mix down, without resampling: [N] or [N, channels] -> [N] float32. Empty is allowed
    (a stream's chunk may be); NaN and infinities are not."""
    try:
        a = np.asarray(audio)
    except (ValueError, TypeError) as e:                    # ragged lists, objects numpy cannot hold
        raise VoxtralError(f"audio must be an array of samples ({e})") from None
    if a.dtype in (np.int64, np.uint64):
        raise VoxtralError(f"audio of dtype {a.dtype} is ambiguous (PCM has 8 to 32 bits): convert it, e.g. "
                           "x.astype(np.int16) for 16-bit values, or pass float samples in [-1, 1]")
    if a.dtype.kind in "iu":
        a = pcm_to_float(a)
    elif a.dtype.kind != "f":
        raise VoxtralError(f"audio must be an array of samples, got dtype {a.dtype}")
    if a.ndim == 2 and not 1 <= a.shape[1] <= MAX_CHANNELS:
        raise VoxtralError(f"audio of shape {a.shape} is not [samples, channels] with 1..{MAX_CHANNELS} channels; "
                           "for [channels, samples] (torchaudio's layout) pass audio.T, for mono a 1-D array")
    if a.ndim not in (1, 2):
        raise VoxtralError(f"audio must be [samples] or [samples, channels], got shape {a.shape}")
    # NaN, infinities and values past float32's range come out of the cast and the mix as NaN or inf (no
    # warnings: they are refused just below, once, with one message)
    with np.errstate(over="ignore", invalid="ignore"):
        a = a.astype(np.float32, copy=False)
        if a.ndim == 2:
            a = a.mean(axis=1, dtype=np.float32)                             # [N, C] -> [N]
    if not np.isfinite(a).all():
        raise VoxtralError(f"the audio contains {int((~np.isfinite(a)).sum())} NaN or infinite samples "
                           "(or samples beyond float32's range)")
    return a


def check_sample_rate(sample_rate):
    if (isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer))
            or not MIN_RATE <= sample_rate <= MAX_RATE):
        raise VoxtralError(f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {sample_rate!r}")


def pcm_to_float(a):
    """Integer PCM -> float in [-1, 1): int16 / 32768, as soundfile reads 16-bit WAV."""
    info = np.iinfo(a.dtype)
    if info.min == 0:                                                       # unsigned PCM is offset
        return (a.astype(np.float64) - (info.max + 1) / 2) / ((info.max + 1) / 2)
    return a.astype(np.float64) / -float(info.min)


# libsndfile (through soundfile) decodes these; for anything else ffmpeg is one pipe away.
READABLE = "WAV, FLAC, OGG (Vorbis/Opus), MP3, AIFF"
FFMPEG_HINT = "convert it on the fly: ffmpeg -i in.m4a -f wav - | voxtral-ref transcribe -"
MAX_STDIN_BYTES = 2 << 30                 # 18 h of 16 kHz 16-bit mono (ffmpeg -ar 16000 -ac 1 -f wav)


def read_audio(source):
    """(samples, sample rate) of an audio file, or of all of stdin when `source` is "-". Samples are
    float32 [N] (mono) or [N, channels]; integer PCM comes scaled to [-1, 1) (int16 / 32768)."""
    import soundfile as sf

    if source == "-":
        if sys.stdin is None:                                # started with stdin closed (`<&-`)
            raise VoxtralError("audio '-' means stdin, but stdin is closed: pipe audio in")
        if sys.stdin.isatty():
            raise VoxtralError("audio '-' means stdin, but stdin is a terminal: pipe audio in (e.g. "
                               "ffmpeg -i in.m4a -f wav - | voxtral-ref transcribe -)")
        # libsndfile needs to seek (headers, trailing chunks), which a pipe cannot: read it all first, but
        # not without end (`< /dev/zero`).
        data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
        if len(data) > MAX_STDIN_BYTES:
            raise VoxtralError(f"stdin holds more than {MAX_STDIN_BYTES >> 30} GiB: for audio that long use "
                               "`voxtral-ref stream`, which reads as it goes")
        name, f = "stdin", io.BytesIO(data)
    else:
        name = f = Path(source)
        if not f.exists():
            raise VoxtralError(f"audio file not found: {f}")
        if f.is_dir():
            raise VoxtralError(f"{f} is a directory, not an audio file")
    try:
        return sf.read(f, dtype="float32", always_2d=False)
    except sf.LibsndfileError as e:
        why = e.error_string.rstrip(".")
        raise VoxtralError(f"cannot decode {name} ({why}): this reads {READABLE}; {FFMPEG_HINT}") from None
    except OSError as e:
        raise VoxtralError(f"cannot read {name}: {e.strerror or e}") from None
