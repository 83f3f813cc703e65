"""One config object for both on-disk formats, and the constants of the audio front end.

Mistral's `params.json` (+ the `audio` section of `tekken.json`) and HF's `config.json` describe the same
model with different key names; both are read into `ModelConfig`. Values HF hard-codes rather than stores
(encoder window and eps, downsample factor, AdaRMSNorm bottleneck, mel parameters) take the real model's
values when the file does not carry them. Settings this implementation has one value for (activations, norm
and RoPE types, the front end's rates) may be restated; any other value is refused (`fixed`).
"""

import json
import math
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
# The fixed front end as the files restate it: params.json's audio_encoding_args, tekken.json's audio section
STREAMING_AUDIO = {"sampling_rate": SAMPLE_RATE, "frame_rate": FRAME_RATE, "transcription_format": "streaming"}
SPECTROGRAM = {"hop_length": HOP, "window_size": N_FFT}
# Largest sliding window accepted (encoder frames or decoder tokens; the real model's are 750 and 8192): a
# stream session allocates its KV rings at the full window, so a typo of 10**8 must not reach it.
MAX_WINDOW = 1 << 16


def is_whole(v):
    """Any integer type (np.int64 from an array included), never a float or a bool: 480.0 is a mistake
    somewhere, True is not 1."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def delay_tokens(delay_ms):
    """480 ms -> 6. The model was trained for multiples of 80 ms in 80..1200, and 2400."""
    if not is_whole(delay_ms) or delay_ms not in ALLOWED_DELAYS_MS:
        raise VoxtralError(
            f"delay_ms={delay_ms!r} is not supported: use an integer multiple of 80 from 80 to 1200, or 2400"
        )
    return int(delay_ms) // MS_PER_TOKEN


def prompt_ids(n_delay):
    """[BOS] + [STREAMING_PAD] x (32 + delay): 39 ids at 480 ms; covers the left pad and the delay."""
    return [BOS_ID] + [STREAMING_PAD_ID] * (N_LEFT_PAD_TOKENS + n_delay)


def right_pad_samples(n_samples, n_delay):
    """Offline right pad: align to a whole token, then (delay + 1 + 10) tokens of silence."""
    align = (SAMPLES_PER_TOKEN - n_samples % SAMPLES_PER_TOKEN) % SAMPLES_PER_TOKEN
    return align + (n_delay + 1 + OFFLINE_BUFFER_TOKENS) * SAMPLES_PER_TOKEN


def n_positions(n_samples, n_delay):
    """Decoder positions offline runs for n_samples of audio: one per 80 ms of the padded signal
    (left pad + audio + right pad), its last position the last one before the padded end."""
    return (N_LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN + n_samples + right_pad_samples(n_samples, n_delay)) // SAMPLES_PER_TOKEN


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

    def validate(self, where="config"):
        """Ranges and cross-checks no single field shows; `where` names the file in the message. Every
        dimension is checked against the tensors' shapes later, before anything is allocated (weights.py)."""
        e, d = self.encoder, self.decoder
        checks = [
            (e.head_dim % 2 == 0 and d.head_dim % 2 == 0, "head_dim must be even for RoPE"),
            (d.n_heads % d.n_kv_heads == 0, f"n_heads {d.n_heads} is not a multiple of n_kv_heads {d.n_kv_heads}"),
            (e.n_mels == N_MELS, f"num_mel_bins {e.n_mels} != {N_MELS}: the front end is fixed at 128 mel bins"),
            (self.downsample == DOWNSAMPLE, f"downsample_factor {self.downsample} != 4 (8 mel frames per token)"),
            (d.vocab_size > N_SPECIAL_TOKENS, f"vocab_size {d.vocab_size} leaves no room for text tokens"),
            (self.default_delay_ms in ALLOWED_DELAYS_MS, f"transcription_delay_ms {self.default_delay_ms} in tekken.json"),
        ]
        for part, c in (("encoder", e), ("decoder", d)):
            # a base <= 1 makes every RoPE frequency >= 1 (0 divides by zero): no trained model has one
            checks.append((c.rope_theta > 1, f"{part} rope_theta {c.rope_theta:g} must be > 1 (the model's is 1e6)"))
            checks.append((0 < c.norm_eps < 1, f"{part} norm_eps {c.norm_eps:g} must be in (0, 1) (the model's is 1e-5)"))
            # a session allocates its KV rings at the full window before the first sample arrives
            checks.append((c.sliding_window <= MAX_WINDOW, f"{part} sliding_window {c.sliding_window} exceeds "
                                                           f"{MAX_WINDOW} (the model's are 750 and 8192)"))
        for ok, msg in checks:
            if not ok:
                raise VoxtralError(f"{where}: inconsistent config: {msg}")
        return self


# The reader for every JSON file of a checkpoint; they come from the hub or from anyone, so nothing in them
# is trusted: a FIFO or device named params.json would block, NaN/Infinity and duplicate keys are not JSON
# (RFC 8259; Python's json module accepts both), and a deeply nested file would exhaust the recursion limit.
MAX_JSON_BYTES = 256 << 20                # tekken.json, the largest, is about 15 MB


def regular_file_size(path):
    """Size of `path` if it is a regular file (symlinks followed); otherwise one clear VoxtralError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VoxtralError(f"missing file: {path}") from None
    except (OSError, ValueError) as e:                      # ValueError: a NUL byte in the name
        raise VoxtralError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise VoxtralError(f"{path} is not a regular file (a directory, FIFO or device): refusing to read it")
    return st.st_size


def parse_json(raw, where):
    """Strict JSON (bytes or str) -> object, or a VoxtralError naming `where`."""
    def no_constant(name):
        raise ValueError(f"{name} is not a JSON value")

    def finite(text):
        x = float(text)
        if not math.isfinite(x):
            raise ValueError(f"number {text} overflows a float")
        return x

    def no_duplicates(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):
            dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
            raise ValueError(f"duplicate key {dup!r}")
        return d
    try:
        return json.loads(raw, object_pairs_hook=no_duplicates, parse_constant=no_constant, parse_float=finite)
    except RecursionError:
        raise VoxtralError(f"{where} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:           # JSONDecodeError is a ValueError
        raise VoxtralError(f"{where} is not valid JSON ({show(str(e), 120)})") from None


def read_json(path):
    if regular_file_size(path) > MAX_JSON_BYTES:
        raise VoxtralError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB: not a checkpoint's JSON file")
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise VoxtralError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_json(raw, path)


def show(value, limit=60):
    """repr for a message, cut short: a fuzzed file can put megabytes where a number belongs."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# --- typed fields: a bool is not an integer, a string is not a number, a null is not a section ----------
def section(d, key, where, required=True, kind=dict):
    v = d.get(key)
    if v is None and not required:
        return kind()
    if key not in d:
        raise VoxtralError(f"{where} lacks the key {key!r}")
    if not isinstance(v, kind):
        raise VoxtralError(f"{where}: {key} must be a JSON {'object' if kind is dict else 'list'}, got {show(v)}")
    return v


def fixed(d, expected, where):
    """Settings this implementation has one value for (the real model's): a file may restate one or leave it
    out (or null), but any other value would otherwise run silently as the one implemented."""
    for key, want in expected.items():
        got = d.get(key)
        if got is not None and (got != want or isinstance(got, bool) != isinstance(want, bool)):
            raise VoxtralError(f"{where}: {key} is {show(got)}; this implementation supports only {want!r}")


def _value(d, key, where, default):
    v = d.get(key)
    if v is None:
        if default is None:
            raise VoxtralError(f"{where} lacks the key {key!r}")
        return default
    return v


def int_field(d, key, where, default=None):
    v = _value(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise VoxtralError(f"{where}: {key} must be a positive integer, got {show(v)}")
    return v


def float_field(d, key, where, default=None):
    v = _value(d, key, where, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise VoxtralError(f"{where}: {key} must be a positive finite number, got {show(v)}")
    return float(v)


def from_params_json(path, tekken=None):
    """Mistral-native params.json (as shipped next to consolidated.safetensors), checked against tekken.json."""
    p = read_json(path)
    if not isinstance(p, dict):
        raise VoxtralError(f"{path}: not a JSON object")
    try:
        wma = p["multimodal"]["whisper_model_args"]
        ea = wma["encoder_args"]
    except (KeyError, TypeError):
        raise VoxtralError(f"{path}: no multimodal.whisper_model_args.encoder_args: not a Voxtral checkpoint") from None
    w = f"{path}: encoder_args"
    if not isinstance(ea, dict):
        raise VoxtralError(f"{w} must be a JSON object, got {show(ea)}")
    # the architecture's switches: only these values are implemented (stages/encoder.py, stages/decoder.py)
    fixed(p, {"causal": True, "use_biases": False, "tied_embeddings": True, "ada_rms_norm_t_cond": True}, path)
    fixed(ea, {"causal": True, "use_biases": True, "pos_embed": "rope", "ffn_type": "swiglu", "norm_type": "rms_norm"}, w)
    audio = section(ea, "audio_encoding_args", w, False)
    fixed(audio, {**STREAMING_AUDIO, **SPECTROGRAM, "global_log_mel_max": LOG_MEL_MAX}, f"{w}.audio_encoding_args")
    enc = EncoderConfig(
        dim=int_field(ea, "dim", w), n_layers=int_field(ea, "n_layers", w), n_heads=int_field(ea, "n_heads", w),
        head_dim=int_field(ea, "head_dim", w), hidden_dim=int_field(ea, "hidden_dim", w),
        rope_theta=float_field(ea, "rope_theta", w), norm_eps=float_field(ea, "norm_eps", w, 1e-5),
        sliding_window=int_field(ea, "sliding_window", w, 750),
        n_mels=int_field(audio, "num_mel_bins", w, N_MELS),
    )
    if int_field(ea, "n_kv_heads", w, enc.n_heads) != enc.n_heads:
        raise VoxtralError(f"{w}: inconsistent config: n_kv_heads {ea['n_kv_heads']} != n_heads {enc.n_heads}")
    dec = DecoderConfig(
        dim=int_field(p, "dim", path), n_layers=int_field(p, "n_layers", path), n_heads=int_field(p, "n_heads", path),
        n_kv_heads=int_field(p, "n_kv_heads", path), head_dim=int_field(p, "head_dim", path),
        hidden_dim=int_field(p, "hidden_dim", path), rope_theta=float_field(p, "rope_theta", path),
        norm_eps=float_field(p, "norm_eps", path, 1e-5), sliding_window=int_field(p, "sliding_window", path, 8192),
        vocab_size=int_field(p, "vocab_size", path), ada_dim=int_field(p, "ada_rms_norm_t_cond_dim", path, 32),
    )
    ds = int_field(section(wma, "downsample_args", w, False), "downsample_factor", w, DOWNSAMPLE)
    return _checked(ModelConfig(enc, dec, ds, "mistral", _delay_from_tekken(tekken)), path, tekken)


def from_config_json(path, tekken=None):
    """HF `config.json` (model_type voxtral_realtime), checked against tekken.json."""
    c = read_json(path)
    if not isinstance(c, dict) or c.get("model_type") != "voxtral_realtime":
        model_type = c.get("model_type") if isinstance(c, dict) else None
        raise VoxtralError(f"{path}: model_type {show(model_type)} is not 'voxtral_realtime'")
    # HF would build a missing sub-config from its defaults, but HF's converter always writes both: without
    # them, every dimension would be a default, and the first mismatch would blame another file
    wa, wt = f"{path}: audio_config", f"{path}: text_config"
    a, t = section(c, "audio_config", path), section(c, "text_config", path)
    fixed(c, {"audio_length_per_tok": MEL_FRAMES_PER_TOKEN, "projector_hidden_act": "gelu",
              "tie_word_embeddings": True}, path)
    fixed(a, {"hidden_act": "silu"}, wa)                   # activation_function is stored, but HF never reads it
    fixed(t, {"hidden_act": "silu", "tie_word_embeddings": True}, wt)
    # HF's encoder config class defaults rope_theta to 1e4 while the real model uses 1e6; a config.json
    # without it would make HF itself use 1e4, so we follow the file and only default like HF does.
    a_rope, t_rope = _hf_rope_theta(a, wa, 1e4), _hf_rope_theta(t, wt, 1e6)
    enc = EncoderConfig(
        dim=int_field(a, "hidden_size", wa, 1280), n_layers=int_field(a, "num_hidden_layers", wa, 32),
        n_heads=int_field(a, "num_attention_heads", wa, 32), head_dim=int_field(a, "head_dim", wa, 64),
        hidden_dim=int_field(a, "intermediate_size", wa, 5120), rope_theta=a_rope,
        norm_eps=float_field(a, "rms_norm_eps", wa, 1e-5), sliding_window=int_field(a, "sliding_window", wa, 750),
        n_mels=int_field(a, "num_mel_bins", wa, N_MELS),
    )
    dec = DecoderConfig(
        dim=int_field(t, "hidden_size", wt, 3072), n_layers=int_field(t, "num_hidden_layers", wt, 26),
        n_heads=int_field(t, "num_attention_heads", wt, 32), n_kv_heads=int_field(t, "num_key_value_heads", wt, 8),
        head_dim=int_field(t, "head_dim", wt, 128), hidden_dim=int_field(t, "intermediate_size", wt, 9216),
        rope_theta=t_rope, norm_eps=float_field(t, "rms_norm_eps", wt, 1e-5),
        sliding_window=int_field(t, "sliding_window", wt, 8192), vocab_size=int_field(t, "vocab_size", wt, 131072),
    )
    ds = int_field(c, "downsample_factor", path, DOWNSAMPLE)
    # HF's fallback when the processor (tekken.json's delay) does not say
    n_delay = c.get("default_num_delay_tokens")
    delay = DEFAULT_DELAY_MS if n_delay is None else _supported_delay(n_delay, MS_PER_TOKEN, "default_num_delay_tokens", path)
    return _checked(ModelConfig(enc, dec, ds, "hf", _delay_from_tekken(tekken, delay)), path, tekken)


def _hf_rope_theta(sub, where, default):
    """rope_theta of an HF sub-config, whose RoPE must be the plain one (no yarn, linear or dynamic scaling),
    under rope_parameters or its older name rope_scaling."""
    for key in ("rope_parameters", "rope_scaling"):
        fixed(section(sub, key, where, False), {"rope_type": "default", "type": "default"}, f"{where}.{key}")
    return float_field(section(sub, "rope_parameters", where, False), "rope_theta", where, sub.get("rope_theta", default))


def _checked(cfg, path, tekken):
    """validate(), then the tokenizer against the model: the decoder's special ids (BOS, EOS, the streaming
    pads) are the fixed ranks below 1000, and every id the LM head can produce must decode."""
    cfg.validate(path)
    if tekken is not None:
        if tekken.n_special != N_SPECIAL_TOKENS:
            raise VoxtralError(f"{tekken.path}: default_num_special_tokens is {tekken.n_special}; this model's "
                               f"special ids assume {N_SPECIAL_TOKENS}")
        if tekken.vocab_size != cfg.decoder.vocab_size:
            raise VoxtralError(f"{tekken.path}: default_vocab_size {tekken.vocab_size} != the model's vocab_size "
                               f"{cfg.decoder.vocab_size} in {path}")
    return cfg


def _delay_from_tekken(tekken, default=DEFAULT_DELAY_MS):
    """Check tekken.json's `audio` section against the fixed front end; return its default delay."""
    audio = tekken.audio if tekken is not None else {}
    if not audio:
        return default
    where = f"{tekken.path}: audio"
    fixed(audio, {**STREAMING_AUDIO, "streaming_n_left_pad_tokens": N_LEFT_PAD_TOKENS}, where)
    fixed(section(audio, "audio_encoding_config", where, False), {**SPECTROGRAM, "num_mel_bins": N_MELS},
          f"{where}.audio_encoding_config")
    delay = audio.get("transcription_delay_ms")
    return default if delay is None else _supported_delay(delay, 1, "transcription_delay_ms", where)


def _supported_delay(value, unit_ms, key, where):
    """A file's default delay, in ms (unit_ms 1) or in tokens (80) -> ms, if the model supports it (delay_tokens)."""
    if isinstance(value, bool) or not isinstance(value, int) or value * unit_ms not in ALLOWED_DELAYS_MS:
        lo, hi, top = (ALLOWED_DELAYS_MS[i] // unit_ms for i in (0, -2, -1))
        raise VoxtralError(f"{where}: {key} is {show(value)}; the model supports {lo}, {2 * lo}, ... {hi}, or {top}")
    return value * unit_ms
