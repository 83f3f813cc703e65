"""Stage 0: whatever the user has -> mono float32 samples at 16 kHz, validated."""

import io
import struct
import sys
import warnings
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
        if not data:
            raise VoxtralError("audio '-' means stdin, but stdin was empty: pipe audio in")
        return decode("stdin", io.BytesIO(data))
    f = Path(source)
    if not f.exists():
        raise VoxtralError(f"audio file not found: {f}")
    if f.is_dir():
        raise VoxtralError(f"{f} is a directory, not an audio file")
    try:
        # an open file, not its name: soundfile encodes names as UTF-8, which a name that is not fails
        with open(f, "rb") as fh:
            return decode(f, fh)
    except OSError as e:
        raise VoxtralError(f"cannot read {f}: {e.strerror or e}") from None


def decode(name, f):
    """read_audio's decoding of an open binary file `f`, errors naming it `name`."""
    import soundfile as sf
    cut = cut_short(f)
    if cut:
        warnings.warn(f"{name} is cut short: its header gives its audio {cut[0]} bytes, {cut[1]} are there; "
                      "transcribing what is there")
    try:
        s = sf.SoundFile(f)
    except sf.LibsndfileError as e:
        why = e.error_string.rstrip(".")
        raise VoxtralError(f"cannot decode {name} ({why}): this reads {READABLE}; {FFMPEG_HINT}") from None
    with s:
        if s.channels > MAX_CHANNELS:
            raise VoxtralError(f"{name} has {s.channels} channels, more than the {MAX_CHANNELS} that are mixed down: "
                               "mix it down first (ffmpeg -i IN -ac 1 -f wav - | voxtral-ref transcribe -)")
        try:
            blocks = list(frame_blocks(s, READ_BLOCK_S * s.samplerate)) or [np.zeros((0, s.channels), np.float32)]
        except MemoryError:
            raise VoxtralError(f"cannot decode {name}: its audio does not fit in memory") from None
        except sf.LibsndfileError as e:     # e.g. a streamed FLAC (no length in its header): libsndfile fails at its end
            raise VoxtralError(f"cannot decode {name} ({e.error_string.rstrip('.')}): {FFMPEG_HINT}") from None
        a = np.concatenate(blocks)                                            # [N, channels]
        return (a[:, 0] if s.channels == 1 else a), s.samplerate


READ_BLOCK_S = 10                           # files are decoded this much at a time


def frame_blocks(f, block):
    """The frames of an open SoundFile as float32 [n, channels] blocks of up to `block`, read until the file
    ends, whatever its header's frame count says: too large in a VBR MP3 without a Xing header or a cut MP3
    (soundfile's blocks() then pads with uninitialised memory), absent in a streamed FLAC (its read() would
    allocate 2^63 frames; libsndfile then fails at the stream's end, which the callers report)."""
    while len(b := f.read(block, dtype="float32", always_2d=True)):
        yield b


def cut_short(f):
    """(bytes of audio a WAV or AIFF header declares, bytes the file holds) when it holds fewer, else None
    (libsndfile reads what is there without a word). Other formats do not tell this cheaply."""
    head = f.read(12)
    if head[:4] == b"RIFF" and head[8:] == b"WAVE":
        order, wanted = "<", b"data"
    elif head[:4] == b"FORM" and head[8:] in (b"AIFF", b"AIFC"):
        order, wanted = ">", b"SSND"
    else:
        f.seek(0)
        return None
    size, at, found = f.seek(0, io.SEEK_END), 12, None
    for _ in range(64):                     # the audio chunk comes after a few others, or not at all
        f.seek(at)
        chunk = f.read(8)
        if len(chunk) < 8:
            break
        kind, n = struct.unpack(order + "4sI", chunk)
        if kind == wanted:
            # 0xFFFFFFFF: a writer to a pipe (ffmpeg) cannot go back to fill the size in
            found = (n, size - at - 8) if n != 0xFFFFFFFF and n > size - at - 8 else None
            break
        at += 8 + n + (n & 1)
    f.seek(0)
    return found
