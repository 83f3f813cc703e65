"""One config object for both on-disk formats, and the constants of the audio front end.

Mistral's `params.json` (+ the `audio` section of `tekken.json`) and HF's `config.json` describe the same
model with different key names; both are read into `ModelConfig`. Values HF hard-codes rather than stores
(encoder window and eps, downsample factor, AdaRMSNorm bottleneck, mel parameters) take the real model's
values when the file does not carry them.
"""

import json
import math
from dataclasses import dataclass, field

from .errors import VoxtralError

# --- audio front end (the real model's values; tekken.json `audio` may restate them) ---------------------
SAMPLE_RATE = 16000                       # Hz
FRAME_RATE = 12.5                         # text tokens per second
SAMPLES_PER_TOKEN = 1280                  # 1280 = 16000 / 12.5  (80 ms of audio per text token)
HOP = 160                                 # STFT hop (10 ms)
N_FFT = 400                               # STFT window (25 ms); HF's docstring says 512, the code uses 400
MEL_FRAMES_PER_TOKEN = 8                  # 8 = 1280 / 160
DOWNSAMPLE = 4                            # encoder frames stacked per token: 4 = 8 / 2 (conv2 has stride 2)
N_MELS = 128
LOG_MEL_MAX = 1.5                         # fixed global max of the log10 mel, not a per-utterance one
LOG_MEL_FLOOR = LOG_MEL_MAX - 8.0         # -6.5: log10 values are floored here (an 80 dB range)

# --- streaming prompt and padding (mistral-common's streaming transcription request) ---------------------
N_LEFT_PAD_TOKENS = 32                    # 40960 = 32 * 1280 zero samples before the audio
OFFLINE_BUFFER_TOKENS = 10                # extra right pad that lets the delayed text flush offline
DEFAULT_DELAY_MS = 480                    # 6 tokens: the delay the model card recommends
MS_PER_TOKEN = 80                         # 80 = 1000 * 1280 / 16000

# --- Tekken special token ids (ranks < 1000 are specials; text id = 1000 + BPE rank) ---------------------
BOS_ID = 1
EOS_ID = 2
STREAMING_PAD_ID = 32                     # emitted while the model waits for words
STREAMING_WORD_ID = 33                    # emitted at word boundaries
N_SPECIAL_TOKENS = 1000

ALLOWED_DELAYS_MS = tuple(range(80, 1201, 80)) + (2400,)


def delay_tokens(delay_ms):
    """480 ms -> 6. The model was trained for multiples of 80 ms in 80..1200, and 2400."""
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, (int, float)) or delay_ms not in ALLOWED_DELAYS_MS:
        raise VoxtralError(
            f"delay_ms={delay_ms!r} is not supported: use a multiple of 80 from 80 to 1200, or 2400"
        )
    return int(delay_ms) // MS_PER_TOKEN


def prompt_ids(n_delay):
    """[BOS] + [STREAMING_PAD] x (32 + delay): 39 ids at 480 ms; covers the left pad and the delay."""
    return [BOS_ID] + [STREAMING_PAD_ID] * (N_LEFT_PAD_TOKENS + n_delay)


def right_pad_samples(n_samples, n_delay):
    """Offline right pad: align to a whole token, then (delay + 1 + 10) tokens of silence."""
    align = (SAMPLES_PER_TOKEN - n_samples % SAMPLES_PER_TOKEN) % SAMPLES_PER_TOKEN
    return align + (n_delay + 1 + OFFLINE_BUFFER_TOKENS) * SAMPLES_PER_TOKEN


@dataclass(frozen=True)
class EncoderConfig:
    dim: int = 1280
    n_layers: int = 32
    n_heads: int = 32
    head_dim: int = 64                    # q/k/v width 2048 = 32 * 64, not the 1280 model width
    hidden_dim: int = 5120                # SwiGLU width
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int = 750             # post-conv frames: 750 / 50 Hz = 15 s
    n_mels: int = N_MELS


@dataclass(frozen=True)
class DecoderConfig:
    dim: int = 3072
    n_layers: int = 26
    n_heads: int = 32
    n_kv_heads: int = 8                   # GQA: 4 query heads share one kv head
    head_dim: int = 128
    hidden_dim: int = 9216
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int = 8192            # tokens: 8192 * 80 ms = 655 s
    vocab_size: int = 131072
    ada_dim: int = 32                     # AdaRMSNorm bottleneck (HF hard-codes 32)


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    downsample: int = DOWNSAMPLE
    # "mistral": consolidated.safetensors, q/k rows in interleaved-pair RoPE order;
    # "hf": model.safetensors, rows already permuted to split-half (NeoX) order by HF's converter.
    format: str = "mistral"
    default_delay_ms: int = DEFAULT_DELAY_MS

    def validate(self):
        e, d = self.encoder, self.decoder
        checks = [
            (e.head_dim % 2 == 0 and d.head_dim % 2 == 0, "head_dim must be even for RoPE"),
            (d.n_heads % d.n_kv_heads == 0, f"n_heads {d.n_heads} is not a multiple of n_kv_heads {d.n_kv_heads}"),
            (e.n_mels == N_MELS, f"num_mel_bins {e.n_mels} != {N_MELS}: the front end is fixed at 128 mel bins"),
            (self.downsample == DOWNSAMPLE, f"downsample_factor {self.downsample} != 4 (8 mel frames per token)"),
            (d.vocab_size > N_SPECIAL_TOKENS, f"vocab_size {d.vocab_size} leaves no room for text tokens"),
        ]
        for v in (e.dim, e.n_layers, e.n_heads, e.hidden_dim, e.sliding_window, d.dim, d.n_layers,
                  d.n_heads, d.n_kv_heads, d.hidden_dim, d.sliding_window, d.ada_dim):
            checks.append((isinstance(v, int) and v > 0, f"config value {v!r} must be a positive integer"))
        for ok, msg in checks:
            if not ok:
                raise VoxtralError(f"inconsistent config: {msg}")
        if self.default_delay_ms not in ALLOWED_DELAYS_MS:
            raise VoxtralError(f"inconsistent config: transcription_delay_ms {self.default_delay_ms} in tekken.json")
        return self


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise VoxtralError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VoxtralError(f"{path} is not valid JSON ({e})") from None


def _get(d, key, where, default=None, required=True):
    if key in d and d[key] is not None:
        return d[key]
    if required and default is None:
        raise VoxtralError(f"{where} lacks the key {key!r}")
    return default


def from_params_json(path, tekken_audio=None):
    """Mistral-native params.json (as shipped next to consolidated.safetensors)."""
    p = _read_json(path)
    try:
        wma = p["multimodal"]["whisper_model_args"]
        ea = wma["encoder_args"]
    except (KeyError, TypeError):
        raise VoxtralError(f"{path}: no multimodal.whisper_model_args.encoder_args: not a Voxtral checkpoint") from None
    enc = EncoderConfig(
        dim=_get(ea, "dim", path), n_layers=_get(ea, "n_layers", path), n_heads=_get(ea, "n_heads", path),
        head_dim=_get(ea, "head_dim", path), hidden_dim=_get(ea, "hidden_dim", path),
        rope_theta=float(_get(ea, "rope_theta", path)), norm_eps=float(_get(ea, "norm_eps", path, 1e-5)),
        sliding_window=_get(ea, "sliding_window", path, 750),
        n_mels=_get(ea.get("audio_encoding_args", {}), "num_mel_bins", path, N_MELS),
    )
    if ea.get("n_kv_heads", enc.n_heads) != enc.n_heads:
        raise VoxtralError(f"inconsistent config: encoder n_kv_heads {ea['n_kv_heads']} != n_heads {enc.n_heads}")
    dec = DecoderConfig(
        dim=_get(p, "dim", path), n_layers=_get(p, "n_layers", path), n_heads=_get(p, "n_heads", path),
        n_kv_heads=_get(p, "n_kv_heads", path), head_dim=_get(p, "head_dim", path),
        hidden_dim=_get(p, "hidden_dim", path), rope_theta=float(_get(p, "rope_theta", path)),
        norm_eps=float(_get(p, "norm_eps", path, 1e-5)), sliding_window=_get(p, "sliding_window", path, 8192),
        vocab_size=_get(p, "vocab_size", path), ada_dim=_get(p, "ada_rms_norm_t_cond_dim", path, 32),
    )
    ds = wma.get("downsample_args", {}).get("downsample_factor", DOWNSAMPLE)
    return ModelConfig(enc, dec, ds, "mistral", _delay_from_tekken(tekken_audio)).validate()


def from_config_json(path, tekken_audio=None):
    """HF `config.json` (model_type voxtral_realtime)."""
    c = _read_json(path)
    if c.get("model_type") != "voxtral_realtime":
        raise VoxtralError(f"{path}: model_type {c.get('model_type')!r} is not 'voxtral_realtime'")
    a, t = c.get("audio_config") or {}, c.get("text_config") or {}
    # HF's encoder config class defaults rope_theta to 1e4 while the real model uses 1e6; a config.json
    # without it would make HF itself use 1e4, so we follow the file and only default like HF does.
    a_rope = (a.get("rope_parameters") or {}).get("rope_theta", a.get("rope_theta", 1e4))
    t_rope = (t.get("rope_parameters") or {}).get("rope_theta", t.get("rope_theta", 1e6))
    enc = EncoderConfig(
        dim=a.get("hidden_size", 1280), n_layers=a.get("num_hidden_layers", 32),
        n_heads=a.get("num_attention_heads", 32), head_dim=a.get("head_dim", 64),
        hidden_dim=a.get("intermediate_size", 5120), rope_theta=float(a_rope),
        norm_eps=float(a.get("rms_norm_eps", 1e-5)), sliding_window=a.get("sliding_window", 750),
        n_mels=a.get("num_mel_bins", N_MELS),
    )
    dec = DecoderConfig(
        dim=t.get("hidden_size", 3072), n_layers=t.get("num_hidden_layers", 26),
        n_heads=t.get("num_attention_heads", 32), n_kv_heads=t.get("num_key_value_heads", 8),
        head_dim=t.get("head_dim", 128), hidden_dim=t.get("intermediate_size", 9216),
        rope_theta=float(t_rope), norm_eps=float(t.get("rms_norm_eps", 1e-5)),
        sliding_window=t.get("sliding_window") or 8192, vocab_size=t.get("vocab_size", 131072),
    )
    return ModelConfig(enc, dec, c.get("downsample_factor", DOWNSAMPLE), "hf", _delay_from_tekken(tekken_audio)).validate()


def _delay_from_tekken(audio):
    """Check tekken.json's `audio` section against the fixed front end; return its default delay."""
    if not audio:
        return DEFAULT_DELAY_MS
    enc = audio.get("audio_encoding_config") or {}
    expect = {"sampling_rate": (audio.get("sampling_rate"), SAMPLE_RATE),
              "frame_rate": (audio.get("frame_rate"), FRAME_RATE),
              "hop_length": (enc.get("hop_length"), HOP), "window_size": (enc.get("window_size"), N_FFT),
              "num_mel_bins": (enc.get("num_mel_bins"), N_MELS),
              "streaming_n_left_pad_tokens": (audio.get("streaming_n_left_pad_tokens"), N_LEFT_PAD_TOKENS)}
    for key, (got, want) in expect.items():
        if got is not None and not math.isclose(float(got), float(want)):
            raise VoxtralError(f"inconsistent config: tekken.json audio.{key} = {got}, this model needs {want}")
    return int(audio.get("transcription_delay_ms", DEFAULT_DELAY_MS))
