"""Reading audio (voxtral_ref/stages/audio.py): file formats, PCM flavours, stdin, and the messages for what
cannot be read."""

import io
import struct
import sys

import numpy as np
import pytest
import soundfile as sf

from voxtral_ref import VoxtralError
from voxtral_ref.stages.audio import read_audio, to_mono_16k

from conftest import SPEECH_WAV

RATE = 44100


def tone(freq=440.0, seconds=1.0, rate=RATE, amp=0.3):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def wav_bytes(x, rate, subtype="PCM_16", fmt="WAV"):
    b = io.BytesIO()
    sf.write(b, x, rate, format=fmt, subtype=subtype)
    return b.getvalue()


def error_of(fn):
    with pytest.raises(VoxtralError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("fmt, subtype, ext, tol", [
    ("WAV", "PCM_16", "wav", 1 / 32768), ("WAV", "PCM_U8", "wav", 1 / 128), ("WAV", "PCM_32", "wav", 1e-7),
    ("WAV", "FLOAT", "wav", 0), ("FLAC", "PCM_24", "flac", 1 / 2**23), ("OGG", "VORBIS", "ogg", None),
    ("MP3", "MPEG_LAYER_III", "mp3", None),
])
def test_formats_and_pcm_flavours(tmp_path, fmt, subtype, ext, tol):
    x = np.stack([tone(440), tone(660)], axis=1)                         # stereo
    f = tmp_path / f"a.{ext}"
    f.write_bytes(wav_bytes(x, RATE, subtype, fmt))
    y, rate = read_audio(f)
    assert rate == RATE and y.dtype == np.float32 and y.shape[1] == 2
    if tol is None:                                                     # lossy: length within a codec frame
        assert abs(len(y) - len(x)) < 2048 and 0.2 < np.abs(y).max() < 0.4
    else:
        assert y.shape == x.shape and np.abs(y - x).max() <= tol


def test_44k_stereo_becomes_16k_mono(tmp_path):
    left, right = tone(440), tone(440)
    mono = to_mono_16k(np.stack([left, right], axis=1), RATE)
    assert mono.dtype == np.float32 and abs(len(mono) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(mono))                                 # 1 Hz bins over 1 s
    assert abs(int(np.argmax(spectrum)) - 440) <= 1
    assert 0.28 < np.abs(mono[1000:-1000]).max() < 0.32                 # HQ resampling keeps the level
    cancel = to_mono_16k(np.stack([left, -left], axis=1), RATE)          # channels are averaged
    assert np.abs(cancel).max() < 1e-6


@pytest.mark.parametrize("dtype, lo, hi", [(np.int16, -1.0, 32767 / 32768), (np.uint8, -1.0, 127 / 128),
                                          (np.int32, -1.0, (2**31 - 1) / 2**31)])
def test_integer_pcm_arrays(dtype, lo, hi):
    info = np.iinfo(dtype)
    y = to_mono_16k(np.array([info.min, info.max, (info.max + info.min + 1) // 2], dtype=dtype))
    np.testing.assert_allclose(y, [lo, hi, 0.0], atol=1e-7)


def fake_stdin(monkeypatch, data, tty=False):
    stdin = io.TextIOWrapper(io.BytesIO(data))
    stdin.isatty = lambda: tty
    monkeypatch.setattr(sys, "stdin", stdin)


def test_stdin(monkeypatch):
    fake_stdin(monkeypatch, SPEECH_WAV.read_bytes())
    y, rate = read_audio("-")
    np.testing.assert_array_equal(y, sf.read(SPEECH_WAV, dtype="float32")[0])
    assert rate == 16000


def test_stdin_from_a_pipe_writer(monkeypatch):
    """ffmpeg writing WAV to a pipe cannot go back to fill in the sizes: they stay 0xFFFFFFFF."""
    x = tone(300, 0.5, 16000)
    data = bytearray(wav_bytes(x, 16000))
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)
    i = data.find(b"data")
    data[i + 4:i + 8] = struct.pack("<I", 0xFFFFFFFF)
    fake_stdin(monkeypatch, bytes(data))
    y, _ = read_audio("-")
    assert len(y) == len(x) and np.abs(y - x).max() <= 1 / 32768


def test_stdin_on_a_terminal(monkeypatch):
    fake_stdin(monkeypatch, b"", tty=True)
    assert "stdin is a terminal" in error_of(lambda: read_audio("-"))


def test_what_cannot_be_read(tmp_path):
    assert "not found" in error_of(lambda: read_audio(tmp_path / "missing.wav"))
    assert "is a directory" in error_of(lambda: read_audio(tmp_path))
    m4a = tmp_path / "talk.m4a"
    m4a.write_bytes(b"\0\0\0\x20ftypM4A \0\0\0\0" + bytes(512))
    msg = error_of(lambda: read_audio(m4a))
    assert "talk.m4a" in msg and "ffmpeg -i in.m4a -f wav - | voxtral-ref transcribe -" in msg
    half = tmp_path / "half.wav"
    half.write_bytes(SPEECH_WAV.read_bytes()[:30])                      # a header cut short
    assert "cannot decode" in error_of(lambda: read_audio(half))


def test_empty_and_nan_audio(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(wav_bytes(np.zeros(0, np.float32), 16000))
    assert "empty" in error_of(lambda: to_mono_16k(*read_audio(empty)))
    nan = tmp_path / "nan.wav"
    nan.write_bytes(wav_bytes(np.array([0.1, np.nan, 0.2], np.float32), 16000, "FLOAT"))
    assert "NaN" in error_of(lambda: to_mono_16k(*read_audio(nan)))
