"""Stage 1: 16 kHz samples -> log-mel spectrogram [128, T], 100 frames per second.

Matches HF's VoxtralRealtimeFeatureExtractor: periodic Hann(400), n_fft 400, hop 160, centred frames
(reflect pad 200), power spectrum with the LAST TIME FRAME dropped (`stft[..., :-1]`), Slaney mel filters
0-8 kHz, log10 floored at the fixed global max 1.5 - 8, then (x + 4) / 4.
The FFT runs in float64; HF's float32 torch.stft agrees to ~1e-5.
"""

import functools

import numpy as np

from ..config import HOP, LOG_MEL_FLOOR, N_FFT, N_MELS, SAMPLE_RATE


def hann_window(n=N_FFT):
    """Periodic Hann (torch.hann_window default): the window of an n-point DFT, not a symmetric one."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)                 # [400]


def _hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log_part, 3.0 * f / 200.0)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=1)
def mel_filters():
    """Slaney-normalised triangular filters [201, 128] (HF's mel_filter_bank with norm='slaney')."""
    n_bins = N_FFT // 2 + 1                                                  # 201 = 400 / 2 + 1
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, n_bins)                      # [201]
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))  # [130]
    width = np.diff(edges)                                                   # [129]
    slopes = edges[None, :] - fft_freqs[:, None]                             # [201, 130]
    down = -slopes[:, :-2] / width[:-1]                                      # [201, 128]
    up = slopes[:, 2:] / width[1:]                                           # [201, 128]
    tri = np.maximum(0.0, np.minimum(down, up))                              # [201, 128]
    return tri * (2.0 / (edges[2:] - edges[:-2]))                            # equal-area (slaney) norm


def log_mel_frames(x, n_frames):
    """Frames 0..n_frames-1 where frame k is the 400 samples x[160k : 160k + 400] (centred on sample
    160k + 200). The streaming front end calls this on its own buffer; `log_mel` on the padded file."""
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[: n_frames * HOP : HOP]  # [n, 400]
    spec = np.fft.rfft(frames * hann_window(), axis=-1)                      # [n, 201] complex128
    power = spec.real ** 2 + spec.imag ** 2                                  # [n, 201]
    # einsum's own loops, not `@`: OpenBLAS takes a second thread for a product of 24 frames or more (a
    # chunk of 240 ms), which then spins on a core the C kernels run on, so a server whose sessions fell
    # behind (bigger chunks) fell further behind (3 live q4 sessions, bench/serve_load.py, alternated:
    # 0.60-0.64 s behind the audio after 40 s with `@`, 0.22-0.25 s so); a 60 s chunk takes 29 ms, not 3
    mel = np.einsum("nf,fm->nm", power, mel_filters(), optimize=False)       # [n, 201] -> [n, 128]
    log = np.maximum(np.log10(np.maximum(mel, 1e-10)), LOG_MEL_FLOOR)        # [n, 128]
    return ((log + 4.0) / 4.0).astype(np.float32).T                          # [128, n]


def log_mel(audio):
    """[N] float32 samples -> [128, N // 160]. torch.stft(center=True) gives 1 + N // 160 frames; HF drops
    the last one, so an N that is a multiple of 1280 gives a multiple of 8 frames (whole tokens)."""
    x = np.pad(np.asarray(audio, dtype=np.float64), N_FFT // 2, mode="reflect")  # [N + 400]
    return log_mel_frames(x, len(audio) // HOP)                              # [128, N // 160]
