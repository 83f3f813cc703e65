#!/usr/bin/env python3
"""Generate the golden reference data for voxtral_ref from Hugging Face transformers.

Dev-only tool (needs torch, transformers >= 5.2, mistral-common, soundfile, scipy and the
espeak-ng binary). CI never runs it; it only consumes what this script writes:

  golden/models/tiny_hf/        config.json, generation_config.json, model.safetensors (f32), tekken.json
  golden/models/tiny_mistral/   params.json, consolidated.safetensors (bf16, original names/layout), tekken.json
  golden/cases/<name>.npz       per-case tensors (see golden/README.md)
  golden/cases/index.json       case list + metadata

Usage:  python golden/make_golden.py            (deterministic; ~10-20 s on 2 cores)
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from threading import Thread

import numpy as np
import soundfile as sf
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------
# Real-model constants (tokenizer / audio framing)
# ---------------------------------------------------------------------------------------------
SR = 16000
HOP = 160
WIN = 400
SAMPLES_PER_TOK = 1280          # 16000 / 12.5
MEL_PER_TOK = 8                 # 1280 / 160
N_LEFT_PAD_TOK = 32
BUFFER_TOK = 10                 # mistral-common OFFLINE_STREAMING_BUFFER_TOKENS
BOS, EOS, PAD, SPAD, SWORD = 1, 2, 11, 32, 33
N_SPECIAL = 1000

# ---------------------------------------------------------------------------------------------
# Tiny model hyper-parameters (the golden model)
# ---------------------------------------------------------------------------------------------
TINY = dict(
    enc_dim=64, enc_layers=2, enc_heads=4, enc_head_dim=16, enc_hidden=128, enc_window=48,
    enc_theta=1e6, dec_dim=96, dec_layers=2, dec_heads=4, dec_kv_heads=2, dec_head_dim=32,
    dec_hidden=192, dec_window=24, dec_theta=1e6, vocab=2048, eps=1e-5, max_pos=4096,
)

# chosen by a seed/scale scan so that every case has >= 12 distinct generated ids and a comfortable
# top1-top2 logit gap (see README)
DEFAULT_SEED = 24
DEFAULT_PROJ_SCALE = 10.0
DEFAULT_ENC_ATTN_SCALE = 0.3
DEFAULT_DEC_ATTN_SCALE = 0.5


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# tekken.json
# ---------------------------------------------------------------------------------------------
SPECIAL_NAMES = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]",
    10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]",
    16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]",
    24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[STREAMING_PAD]", 33: "[STREAMING_WORD]",
    34: "[REPEAT_AUDIO_TEXT]",
    # mistral-common's v13 instruct tokenizer requires these to exist; their ranks are placeholders
    # (not verified against the real tokenizer) and the streaming prompt never uses them.
    20: "[ARGS]", 21: "[CALL_ID]", 22: "[THINK]", 23: "[/THINK]", 26: "[TRANSCRIBE]",
    35: "[NEXT_AUDIO_TEXT]",
}


def tekken_dict(vocab_size, delay_ms=480):
    """Tiny streaming-audio Tekken tokenizer: real BPE ranks (mistral-common's tekken_240911.json),
    truncated to vocab_size - 1000 text tokens, 1000 control tokens at the real ranks."""
    import mistral_common

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    with open(src, encoding="utf-8") as f:
        base = json.load(f)
    n_text = vocab_size - N_SPECIAL
    cfg = dict(base["config"])
    cfg.update(num_vocab_tokens=n_text, default_vocab_size=vocab_size,
               default_num_special_tokens=N_SPECIAL, version="v13")
    return {
        "config": cfg,
        "vocab": base["vocab"][:n_text],
        "special_tokens": [
            {"rank": i, "token_str": SPECIAL_NAMES.get(i, f"<SPECIAL_{i}>"), "is_control": True}
            for i in range(N_SPECIAL)
        ],
        "audio": {
            "sampling_rate": SR,
            "frame_rate": 12.5,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": HOP, "window_size": WIN},
            "chunk_length_s": None,
            "transcription_delay_ms": delay_ms,
            "streaming_look_ahead_ms": 2.5,
            "streaming_look_back_ms": 52.5,
            "streaming_n_left_pad_tokens": N_LEFT_PAD_TOK,
            "transcription_format": "streaming",
        },
    }


def write_json(path, obj, indent=None):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        if indent is not None:
            f.write("\n")


def make_processor(tekken_path):
    from transformers import MistralCommonBackend, VoxtralRealtimeFeatureExtractor, VoxtralRealtimeProcessor

    tok = MistralCommonBackend(tokenizer_path=tekken_path)
    return VoxtralRealtimeProcessor(feature_extractor=VoxtralRealtimeFeatureExtractor(), tokenizer=tok)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def tiny_hf_config():
    from transformers import VoxtralRealtimeConfig

    t = TINY
    audio = dict(
        hidden_size=t["enc_dim"], intermediate_size=t["enc_hidden"], num_hidden_layers=t["enc_layers"],
        num_attention_heads=t["enc_heads"], head_dim=t["enc_head_dim"], num_mel_bins=128,
        max_position_embeddings=1500, rms_norm_eps=t["eps"], sliding_window=t["enc_window"],
        rope_parameters={"rope_type": "default", "rope_theta": t["enc_theta"]},
        vocab_size=t["vocab"], hidden_act="silu", activation_function="gelu",
    )
    text = dict(
        vocab_size=t["vocab"], hidden_size=t["dec_dim"], intermediate_size=t["dec_hidden"],
        num_hidden_layers=t["dec_layers"], num_attention_heads=t["dec_heads"],
        num_key_value_heads=t["dec_kv_heads"], head_dim=t["dec_head_dim"],
        max_position_embeddings=t["max_pos"], rms_norm_eps=t["eps"], sliding_window=t["dec_window"],
        rope_parameters={"rope_type": "default", "rope_theta": t["dec_theta"]},
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, hidden_act="silu",
    )
    return VoxtralRealtimeConfig(audio_config=audio, text_config=text)


def build_model(seed=DEFAULT_SEED, proj_scale=DEFAULT_PROJ_SCALE, enc_attn_scale=DEFAULT_ENC_ATTN_SCALE,
                dec_attn_scale=DEFAULT_DEC_ATTN_SCALE):
    """Random tiny model: HF default init, then non-trivial norm weights and biases, a scaled-up
    adapter output projection (so the audio path drives the decoder), and finally every parameter
    rounded to a bf16-representable float32 value."""
    from transformers import VoxtralRealtimeForConditionalGeneration
    from transformers.models.voxtral_realtime.modeling_voxtral_realtime import VoxtralRealtimeRMSNorm

    torch.manual_seed(seed)
    cfg = tiny_hf_config()
    cfg._attn_implementation = "eager"
    model = VoxtralRealtimeForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            # unit-gain init (std 1/sqrt(fan_in)); HF's default std 0.02 leaves the tiny encoder's
            # output dominated by biases, i.e. nearly constant in time
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(fan_in))
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
        for mod in model.modules():
            if isinstance(mod, VoxtralRealtimeRMSNorm):
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        # zero-sum conv kernels: a constant log-mel offset (silence is -0.625 in every bin) or the
        # positive mean of GELU outputs then contributes nothing, so the conv stem responds to
        # spectral shape and its changes
        for conv in (model.model.audio_tower.embedder.conv1, model.model.audio_tower.embedder.conv2):
            conv.weight.sub_(conv.weight.mean(dim=(1, 2), keepdim=True))
        # adapter output projection: remove its response to the all-ones direction (GELU outputs
        # share a positive mean) and scale it up so the audio embedding dominates the token embedding
        w2 = model.model.multi_modal_projector.linear_2.weight
        w2.sub_(w2.mean(dim=1, keepdim=True))
        w2.mul_(proj_scale)
        # damp the attention branches (they average over the window and make every stream smooth in
        # time) so that per-frame information reaches the decoder; they still matter (window tests)
        for layer in model.model.audio_tower.layers:
            layer.self_attn.o_proj.weight.mul_(enc_attn_scale)
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(dec_attn_scale)
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.generation_config.pad_token_id = PAD
    return model


def load_hf_model(path):
    from transformers import VoxtralRealtimeForConditionalGeneration

    m = VoxtralRealtimeForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


# --- original Mistral layout -----------------------------------------------------------------
E = "mm_streams_embeddings.embedding_module."
W = E + "whisper_encoder."


def hf_to_mistral_names(n_enc, n_dec):
    """in-memory HF state-dict name -> original consolidated.safetensors name."""
    m = {
        "model.language_model.embed_tokens.weight": E + "tok_embeddings.weight",
        "model.language_model.norm.weight": "norm.weight",
        "model.audio_tower.embedder.conv1.weight": W + "conv_layers.0.conv.weight",
        "model.audio_tower.embedder.conv1.bias": W + "conv_layers.0.conv.bias",
        "model.audio_tower.embedder.conv2.weight": W + "conv_layers.1.conv.weight",
        "model.audio_tower.embedder.conv2.bias": W + "conv_layers.1.conv.bias",
        "model.audio_tower.norm.weight": W + "transformer.norm.weight",
        "model.multi_modal_projector.linear_1.weight": E + "audio_language_projection.0.weight",
        "model.multi_modal_projector.linear_2.weight": E + "audio_language_projection.2.weight",
    }
    for i in range(n_enc):
        h, o = f"model.audio_tower.layers.{i}.", f"{W}transformer.layers.{i}."
        for a, b in [("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")]:
            m[f"{h}self_attn.{a}_proj.weight"] = f"{o}attention.{b}.weight"
        for a, b in [("q", "wq"), ("v", "wv"), ("o", "wo")]:
            m[f"{h}self_attn.{a}_proj.bias"] = f"{o}attention.{b}.bias"
        m[h + "self_attn_layer_norm.weight"] = o + "attention_norm.weight"
        m[h + "final_layer_norm.weight"] = o + "ffn_norm.weight"
        m[h + "mlp.gate_proj.weight"] = o + "feed_forward.w1.weight"
        m[h + "mlp.down_proj.weight"] = o + "feed_forward.w2.weight"
        m[h + "mlp.down_proj.bias"] = o + "feed_forward.w2.bias"
        m[h + "mlp.up_proj.weight"] = o + "feed_forward.w3.weight"
    for i in range(n_dec):
        h, o = f"model.language_model.layers.{i}.", f"layers.{i}."
        for a, b in [("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")]:
            m[f"{h}self_attn.{a}_proj.weight"] = f"{o}attention.{b}.weight"
        m[h + "input_layernorm.weight"] = o + "attention_norm.weight"
        m[h + "post_attention_layernorm.weight"] = o + "ffn_norm.weight"
        m[h + "mlp.gate_proj.weight"] = o + "feed_forward.w1.weight"
        m[h + "mlp.down_proj.weight"] = o + "feed_forward.w2.weight"
        m[h + "mlp.up_proj.weight"] = o + "feed_forward.w3.weight"
        m[h + "ada_rms_norm.linear1.weight"] = o + "ada_rms_norm_t_cond.0.weight"
        m[h + "ada_rms_norm.linear2.weight"] = o + "ada_rms_norm_t_cond.2.weight"
    return m


def rope_heads(hf_name):
    """Number of heads of a RoPE-permuted tensor (q/k weights, encoder q bias), else None."""
    t = TINY
    if hf_name.startswith("model.audio_tower.") and (
        hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight") or hf_name.endswith("q_proj.bias")
    ):
        return t["enc_heads"]
    if hf_name.startswith("model.language_model."):
        if hf_name.endswith("q_proj.weight"):
            return t["dec_heads"]
        if hf_name.endswith("k_proj.weight"):
            return t["dec_kv_heads"]
    return None


def interleave_rows(x, n_heads):
    """HF split-half row order -> original interleaved order (inverse of the HF converter's
    per-head hf = cat(orig[0::2], orig[1::2]))."""
    shp = x.shape
    hd = shp[0] // n_heads
    y = x.reshape(n_heads, 2, hd // 2, *shp[1:]).transpose(1, 2)
    return y.reshape(shp)


def split_half_rows(x, n_heads):
    """Original interleaved row order -> HF split-half order (what the HF converter does)."""
    shp = x.shape
    hd = shp[0] // n_heads
    y = x.reshape(n_heads, hd // 2, 2, *shp[1:]).transpose(1, 2)
    return y.reshape(shp)


def mistral_params_json():
    t = TINY
    return {
        "dim": t["dec_dim"],
        "n_layers": t["dec_layers"],
        "head_dim": t["dec_head_dim"],
        "hidden_dim": t["dec_hidden"],
        "n_heads": t["dec_heads"],
        "n_kv_heads": t["dec_kv_heads"],
        "use_biases": False,
        "causal": True,
        "rope_theta": t["dec_theta"],
        "norm_eps": t["eps"],
        "vocab_size": t["vocab"],
        "model_parallel": 1,
        "tied_embeddings": True,
        "sliding_window": t["dec_window"],
        "model_max_length": t["max_pos"],
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": SR,
                        "frame_rate": 12.5,
                        "num_mel_bins": 128,
                        "hop_length": HOP,
                        "window_size": WIN,
                        "chunk_length_s": None,
                        "global_log_mel_max": 1.5,
                        "transcription_format": "streaming",
                    },
                    "dim": t["enc_dim"],
                    "n_layers": t["enc_layers"],
                    "head_dim": t["enc_head_dim"],
                    "hidden_dim": t["enc_hidden"],
                    "n_heads": t["enc_heads"],
                    "vocab_size": t["vocab"],
                    "n_kv_heads": t["enc_heads"],
                    "use_biases": True,
                    "use_cache": False,
                    "rope_theta": t["enc_theta"],
                    "causal": True,
                    "norm_eps": t["eps"],
                    "pos_embed": "rope",
                    "max_source_positions": None,
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "sliding_window": t["enc_window"],
                },
                "downsample_args": {"downsample_factor": 4},
            }
        },
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": 32,
    }


def write_mistral(model, out_dir):
    from safetensors.torch import save_file

    sd = model.state_dict()
    names = hf_to_mistral_names(TINY["enc_layers"], TINY["dec_layers"])
    extra = set(sd) - set(names) - {"lm_head.weight"}
    assert not extra, f"unmapped HF tensors: {sorted(extra)}"
    out = {}
    for hf_name, orig_name in names.items():
        x = sd[hf_name].detach().clone()
        nh = rope_heads(hf_name)
        if nh is not None:
            x = interleave_rows(x, nh)
        out[orig_name] = x.to(torch.bfloat16).contiguous()
    save_file(out, os.path.join(out_dir, "consolidated.safetensors"))
    write_json(os.path.join(out_dir, "params.json"), mistral_params_json(), indent=2)
    return len(out)


def verify_mistral(model, out_dir):
    """Reload consolidated.safetensors, convert with the forward (HF converter) permutation and
    compare bit-exactly with the HF state dict."""
    from safetensors.torch import load_file

    sd = model.state_dict()
    loaded = load_file(os.path.join(out_dir, "consolidated.safetensors"))
    names = hf_to_mistral_names(TINY["enc_layers"], TINY["dec_layers"])
    assert set(loaded) == set(names.values()), "tensor name set mismatch"
    assert all(v.dtype == torch.bfloat16 for v in loaded.values())
    for hf_name, orig_name in names.items():
        x = loaded[orig_name].float()
        nh = rope_heads(hf_name)
        if nh is not None:
            x = split_half_rows(x, nh)
        assert torch.equal(x, sd[hf_name]), f"mismatch {hf_name} <- {orig_name}"
    assert torch.equal(sd["lm_head.weight"], sd["model.language_model.embed_tokens.weight"])
    # also check the permutation is a real (non-identity) permutation and invertible
    q = sd["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(split_half_rows(interleave_rows(q, TINY["dec_heads"]), TINY["dec_heads"]), q)
    assert not torch.equal(interleave_rows(q, TINY["dec_heads"]), q)
    return len(loaded)


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------
def to_pcm16(x, peak=None):
    x = np.asarray(x, np.float64)
    if peak is not None:
        x = x * (peak / max(1e-9, np.abs(x).max()))
    q = np.clip(np.round(x * 32768.0), -32768, 32767)
    return (q / 32768.0).astype(np.float32)


def chirp_noise(seconds, seed, f_lo=150.0, f_hi=2500.0, seg=0.12):
    """Continuous-phase chirp sequence: every `seg` seconds the instantaneous frequency sweeps
    linearly to a new random target in [f_lo, f_hi] (log-uniform); plus a 3rd-harmonic partial,
    a slow amplitude modulation and white noise with a random per-segment level."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    n_seg = int(math.ceil(seconds / seg)) + 1
    knots = np.exp(rng.uniform(np.log(f_lo), np.log(f_hi), n_seg + 1))
    f = np.interp(t, np.arange(n_seg + 1) * seg, knots)
    phase = 2 * np.pi * np.cumsum(f) / SR
    am = 0.6 + 0.4 * np.sin(2 * np.pi * 1.7 * t)
    x = am * (0.35 * np.sin(phase) + 0.12 * np.sin(3 * phase))
    noise_lvl = np.repeat(rng.uniform(0.01, 0.12, n_seg + 1), int(round(seg * SR)))[:n]
    x += noise_lvl * rng.standard_normal(n)
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)
    return to_pcm16(x * ramp)


def espeak(text, voice, speed=160):
    """espeak-ng (22050 Hz, 16-bit) -> float -> resample_poly 320/441 to 16 kHz -> peak 0.6 -> int16."""
    import soundfile as sf
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as td:
        wav = os.path.join(td, "s.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", wav, text], check=True)
        x, sr = sf.read(wav, dtype="float64")
    assert sr == 22050, sr
    y = resample_poly(x, 320, 441)
    return to_pcm16(y, peak=0.6)


def espeak_version():
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
        return out.strip().split("  ")[0]
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------
class Recorder:
    """Captures intermediates of ONE teacher-forced forward (batch row 0 or all rows)."""

    def __init__(self, model):
        self.store = {}
        self.on = False
        m = model.model
        at, lm = m.audio_tower, m.language_model
        F = torch.nn.functional
        H = []
        # conv modules return pre-GELU [B, C, T]; HF applies nn.functional.gelu (exact erf) right
        # after each conv, so applying the same op here reproduces the post-GELU activations.
        H.append(at.embedder.conv1.register_forward_hook(self._h("conv1", lambda i, o: F.gelu(o).transpose(1, 2))))
        H.append(at.embedder.conv2.register_forward_hook(self._h("conv2", lambda i, o: F.gelu(o).transpose(1, 2))))
        H.append(at.embedder.register_forward_hook(self._h("_embedder_out", lambda i, o: o)))
        for k, layer in enumerate(at.layers):
            H.append(layer.register_forward_hook(self._h(f"encoder.layers.{k}", lambda i, o: o)))
        H.append(at.register_forward_hook(self._h("encoder_out", lambda i, o: o.last_hidden_state)))
        H.append(m.multi_modal_projector.register_forward_hook(self._h("adapter_in", lambda i, o: i[0])))
        H.append(m.multi_modal_projector.register_forward_hook(self._h("adapter_out", lambda i, o: o)))
        H.append(m.time_embedding.register_forward_hook(self._h("t_cond", lambda i, o: o)))
        for k, layer in enumerate(lm.layers):
            H.append(layer.ada_rms_norm.register_forward_hook(self._h(f"decoder.layers.{k}.ada_scale", lambda i, o: o)))
            H.append(layer.register_forward_hook(self._h(f"decoder.layers.{k}", lambda i, o: o)))
        H.append(lm.norm.register_forward_hook(self._h("final_norm", lambda i, o: o)))
        H.append(model.lm_head.register_forward_hook(self._h("logits", lambda i, o: o)))

        def pre(module, args, kwargs):
            if self.on:
                self.store["decoder_in"] = kwargs["inputs_embeds"].detach().float().numpy().copy()

        H.append(lm.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles = H

    def _h(self, name, fn):
        def hook(module, inp, out):
            if self.on:
                assert name not in self.store, f"hook {name} fired twice"
                self.store[name] = fn(inp, out).detach().float().numpy().copy()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------
def manual_offline(audio, num_delay):
    n = audio.shape[0]
    right = (SAMPLES_PER_TOK - n % SAMPLES_PER_TOK) % SAMPLES_PER_TOK
    right += (num_delay + 1 + BUFFER_TOK) * SAMPLES_PER_TOK
    ids = [BOS] + [SPAD] * (N_LEFT_PAD_TOK + num_delay)
    return ids, np.pad(audio, (N_LEFT_PAD_TOK * SAMPLES_PER_TOK, right)).astype(np.float32)


def gap_stats(logits):
    """Smallest top1 - top2 logit gap over the steps: absolute, relative to the step's logit standard
    deviation over the vocabulary (the primary "logit scale"), and relative to the step's max |logit|."""
    s = np.sort(logits.astype(np.float64), axis=-1)
    gap = s[:, -1] - s[:, -2]
    return float(gap.min()), float((gap / logits.std(-1)).min()), float((gap / np.abs(logits).max(-1)).min())


def offline_generate(model, inputs, num_delay):
    with torch.no_grad():
        kw = {k: v for k, v in inputs.items() if k != "num_delay_tokens"}
        g = model.generate(**kw, num_delay_tokens=num_delay, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    return g.sequences, torch.stack(g.logits, dim=1).float().numpy()


def streaming_generate(model, processor, audio, num_delay):
    """HF's documented streaming recipe: first chunk + an input_features generator."""
    from transformers import TextIteratorStreamer

    a = np.pad(audio, (0, processor.num_right_pad_tokens * processor.raw_audio_length_per_tok))
    first = processor(a[: processor.num_samples_first_audio_chunk], is_streaming=True,
                      is_first_audio_chunk=True, return_tensors="pt")
    assert int(first.num_delay_tokens) == num_delay

    def feats():
        yield first.input_features
        idx = processor.num_mel_frames_first_audio_chunk
        start = idx * HOP - WIN // 2
        while start + processor.num_samples_per_audio_chunk < a.shape[0]:
            c = processor(a[start: start + processor.num_samples_per_audio_chunk], is_streaming=True,
                          is_first_audio_chunk=False, return_tensors="pt")
            yield c.input_features
            idx += processor.audio_length_per_tok
            start = idx * HOP - WIN // 2

    streamer = TextIteratorStreamer(processor.tokenizer, skip_special_tokens=True, timeout=300)
    res = {}

    def run():
        with torch.no_grad():
            res["g"] = model.generate(input_ids=first.input_ids, input_features=feats(),
                                      num_delay_tokens=num_delay, streamer=streamer, do_sample=False,
                                      return_dict_in_generate=True, output_logits=True)

    th = Thread(target=run)
    th.start()
    text = "".join(streamer)
    th.join()
    g = res["g"]
    return g.sequences[0].tolist(), torch.stack(g.logits, dim=1)[0].float().numpy(), first.input_ids[0].tolist(), text


def run_case(model, processor, audio, num_delay, want_stream=True, tensors=True):
    """Offline processor -> generate -> teacher-forced forward with hooks (+ HF streaming)."""
    inputs = processor(audio, return_tensors="pt")
    prompt = inputs.input_ids[0].tolist()
    assert int(inputs.num_delay_tokens) == num_delay
    ids_m, padded = manual_offline(audio, num_delay)
    assert prompt == ids_m, (prompt, ids_m)
    feats_m = processor.feature_extractor(padded, sampling_rate=SR, return_tensors="pt").input_features
    assert torch.equal(feats_m, inputs.input_features), "manual padding/features != processor"
    feats = inputs.input_features
    T = feats.shape[-1]
    assert T % MEL_PER_TOK == 0 and T // MEL_PER_TOK == len(padded) // SAMPLES_PER_TOK

    seqs, gen_logits = offline_generate(model, inputs, num_delay)
    seq = seqs[0].tolist()
    gen_logits = gen_logits[0]
    P = len(prompt)
    new = seq[P:]
    L = len(seq)
    assert L == T // MEL_PER_TOK or new[-1] == EOS, (L, T)

    r = {"prompt_ids": prompt, "token_ids": new, "generate_logits": gen_logits, "padded_audio": padded,
         "mel": feats[0].numpy(), "n_tokens_total": L}
    if tensors:
        rec = Recorder(model)
        rec.on = True
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq]), input_features=feats[..., : L * MEL_PER_TOK],
                        num_delay_tokens=num_delay, use_cache=False)
        rec.on = False
        rec.remove()
        st = rec.store
        assert np.array_equal(st["conv2"], st.pop("_embedder_out")), "conv2 post-GELU hook != embedder output"
        logits = out.logits[0].float().numpy()
        assert np.array_equal(logits, st["logits"][0])
        tf_pred = logits[P - 1: L - 1].argmax(-1).tolist()
        assert tf_pred == new, "teacher-forced argmax != generated ids"
        r["tf_vs_gen_max_abs"] = float(np.abs(logits[P - 1: L - 1] - gen_logits).max())
        # do the sliding windows matter for this case? (re-run with each window disabled)
        for which, cfg in (("decoder", model.config.text_config), ("encoder", model.config.audio_config)):
            w = cfg.sliding_window
            cfg.sliding_window = 1 << 20
            try:
                with torch.no_grad():
                    o2 = model(input_ids=torch.tensor([seq]), input_features=feats[..., : L * MEL_PER_TOK],
                               num_delay_tokens=num_delay, use_cache=False)
            finally:
                cfg.sliding_window = w
            r[f"logit_change_without_{which}_window"] = float(np.abs(o2.logits[0].float().numpy() - logits).max())
        for k, v in st.items():
            r[k] = v[0]  # drop batch dim ([B,...] -> [...]); t_cond is already 1-D
        r["t_cond"] = st["t_cond"]
    if want_stream:
        s_seq, s_logits, s_prompt, text = streaming_generate(model, processor, audio, num_delay)
        assert s_prompt == prompt
        s_new = s_seq[P:]
        r["stream_token_ids"] = s_new
        n = min(len(s_new), len(new))
        r["stream_equal"] = s_new == new
        r["stream_prefix_equal"] = s_new[:n] == new[:n]
        r["stream_len"] = len(s_new)
        r["stream_vs_offline_max_abs_logit"] = float(np.abs(s_logits[:n] - gen_logits[:n]).max())
        r["stream_text"] = text
    return r


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
CASES = [
    # name, kind, args, delay_ms
    ("chirp_480", "chirp", dict(seconds=2.0, seed=7), 480),
    ("speech_en_480", "espeak", dict(text="The quick brown fox jumps over the lazy dog.", voice="en-us"), 480),
    ("speech_en_long_480", "espeak", dict(
        text="The quick brown fox jumps over the lazy dog. Seven silver swans swam silently "
             "along the quiet river at dawn, far away.", voice="en-us"), 480),
    ("speech_en_80", "espeak", dict(text="The quick brown fox jumps over the lazy dog.", voice="en-us"), 80),
    ("speech_en_2400", "espeak", dict(text="A small yellow boat drifted slowly past the old stone bridge.",
                                       voice="en-us"), 2400),
    ("speech_fr_480", "espeak", dict(text="Bonjour, je m'appelle Marie et j'habite à Paris depuis trois ans.",
                                     voice="fr"), 480),
]
BATCH = ("batch_480", [("espeak", dict(text="Good morning, how are you today?", voice="en-us")),
                       ("espeak", dict(text="Guten Abend, wie geht es Ihnen heute? Alles gut.", voice="de"))], 480)


def make_audio(kind, args):
    if kind == "chirp":
        a = chirp_noise(**args)
        desc = (f"synthetic chirp sequence (random log-uniform targets in [{args.get('f_lo', 150.0):g}, "
                f"{args.get('f_hi', 2500.0):g}] Hz every {args.get('seg', 0.12):g} s, 3rd harmonic, AM) + white noise, "
                f"seed {args['seed']}, {args['seconds']:g} s")
    else:
        a = espeak(**args)
        desc = f"espeak-ng -v {args['voice']} -s 160: {args['text']!r}; resample_poly 22050->16000, peak 0.6, int16"
    assert np.array_equal(a, to_pcm16(a)), "audio not 16-bit PCM exact"
    return a, desc


def case_npz(r, audio, delay_ms, num_delay):
    d = {
        "audio": audio.astype(np.float32),
        "padded_audio": r["padded_audio"].astype(np.float32),
        "mel": r["mel"].astype(np.float32),
        "prompt_ids": np.array(r["prompt_ids"], np.int64),
        "token_ids": np.array(r["token_ids"], np.int64),
        "stream_token_ids": np.array(r["stream_token_ids"], np.int64),
        "generate_logits": r["generate_logits"].astype(np.float32),
        "delay_ms": np.array(delay_ms, np.int64),
        "num_delay_tokens": np.array(num_delay, np.int64),
    }
    keys = ["conv1", "conv2"] + [k for k in r if k.startswith("encoder.layers.")] + [
        "encoder_out", "adapter_in", "adapter_out", "t_cond"] + sorted(
        k for k in r if k.startswith("decoder.layers.")) + ["decoder_in", "final_norm", "logits"]
    for k in keys:
        d[k] = np.ascontiguousarray(r[k], dtype=np.float32)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--proj-scale", type=float, default=DEFAULT_PROJ_SCALE)
    ap.add_argument("--enc-attn-scale", type=float, default=DEFAULT_ENC_ATTN_SCALE)
    ap.add_argument("--dec-attn-scale", type=float, default=DEFAULT_DEC_ATTN_SCALE)
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)

    import mistral_common
    import scipy
    import soundfile
    import transformers

    versions = dict(torch=torch.__version__, transformers=transformers.__version__,
                    mistral_common=mistral_common.__version__, numpy=np.__version__, scipy=scipy.__version__,
                    soundfile=soundfile.__version__, espeak_ng=espeak_version(), python=sys.version.split()[0])
    log("versions:", versions)

    out = os.path.abspath(args.out)
    hf_dir = os.path.join(out, "models", "tiny_hf")
    mi_dir = os.path.join(out, "models", "tiny_mistral")
    case_dir = os.path.join(out, "cases")
    for d in (hf_dir, mi_dir, case_dir):
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)

    # tokenizer(s)
    tk = tekken_dict(TINY["vocab"])
    for d in (hf_dir, mi_dir):
        write_json(os.path.join(d, "tekken.json"), tk)
    tmp = tempfile.mkdtemp(prefix="voxtral_golden_")
    processors = {}

    def processor_for(delay_ms):
        if delay_ms not in processors:
            if delay_ms == 480:
                path = os.path.join(hf_dir, "tekken.json")
            else:
                path = os.path.join(tmp, f"tekken_{delay_ms}.json")
                write_json(path, tekken_dict(TINY["vocab"], delay_ms))
            processors[delay_ms] = make_processor(path)
        return processors[delay_ms]

    p480 = processor_for(480)
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tkz = Tekkenizer.from_file(os.path.join(hf_dir, "tekken.json"))
    assert tkz.n_words == TINY["vocab"], tkz.n_words
    assert [tkz.id_to_piece(i) for i in (0, 1, 2, 11, 24, 25, 32, 33, 34)] == [
        "<unk>", "<s>", "</s>", "<pad>", "[AUDIO]", "[BEGIN_AUDIO]", "[STREAMING_PAD]", "[STREAMING_WORD]",
        "[REPEAT_AUDIO_TEXT]"]
    assert tkz.bos_id == BOS and tkz.eos_id == EOS and tkz.pad_id == PAD
    log("tekken ok: n_words", tkz.n_words, "processor num_delay_tokens", p480.num_delay_tokens)

    # model: build, save HF, reload from disk (golden data come from the reloaded model)
    model0 = build_model(args.seed, args.proj_scale, args.enc_attn_scale, args.dec_attn_scale)
    model0.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cj = json.load(f)
    assert cj["audio_config"]["rope_parameters"]["rope_theta"] == TINY["enc_theta"], cj["audio_config"]
    assert cj["audio_config"]["sliding_window"] == TINY["enc_window"]
    assert cj["text_config"]["sliding_window"] == TINY["dec_window"]
    model = load_hf_model(hf_dir)
    sd0, sd1 = model0.state_dict(), model.state_dict()
    assert set(sd0) == set(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0), "HF reload mismatch"
    assert all(torch.equal(p, p.bfloat16().float()) for p in model.parameters()), "params not bf16-exact"
    enc_if = model.model.audio_tower.rotary_emb.inv_freq[1].item()
    assert abs(enc_if / TINY["enc_theta"] ** (-2 / TINY["enc_head_dim"]) - 1) < 1e-6, "encoder rope_theta not 1e6"
    del model0
    n_t = write_mistral(model, mi_dir)
    n_v = verify_mistral(model, mi_dir)
    log(f"models written: HF {hf_dir}; Mistral {mi_dir} ({n_t} tensors, verified {n_v} bit-exact after permutation)")
    n_params = sum(p.numel() for p in model.parameters())

    index = {"versions": versions, "seed": args.seed, "proj_scale": args.proj_scale,
             "enc_attn_scale": args.enc_attn_scale, "dec_attn_scale": args.dec_attn_scale, "tiny_config": TINY,
             "n_params": n_params, "cases": []}
    failures = []

    def check_quality(name, ids, glog):
        nd = len(set(ids))
        g_abs, g_rel, g_relmax = gap_stats(glog)
        ok = nd >= 12 and g_rel > 1e-3 and g_relmax > 1e-3
        if not ok:
            failures.append(f"{name}: distinct {nd}, rel gap {g_rel:.2e} (std) {g_relmax:.2e} (max|logit|)")
        return nd, g_abs, g_rel, g_relmax

    def meta(name, r, desc, audio, delay_ms, num_delay):
        nd, g_abs, g_rel, g_relmax = check_quality(name, r["token_ids"], r["generate_logits"])
        m = {
            "name": name, "file": f"{name}.npz", "model_dir": "tiny_hf", "model_dir_mistral": "tiny_mistral",
            "delay_ms": delay_ms, "num_delay_tokens": num_delay, "audio": desc, "n_samples": int(audio.shape[0]),
            "n_padded_samples": int(r["padded_audio"].shape[0]), "n_mel_frames": int(r["mel"].shape[-1]),
            "n_prompt": len(r["prompt_ids"]), "n_generated": len(r["token_ids"]), "n_distinct_ids": nd,
            "min_logit_gap": g_abs, "min_logit_gap_rel_std": g_rel, "min_logit_gap_rel_maxabs": g_relmax, "token_ids": list(map(int, r["token_ids"])),
            "eos_emitted": EOS in r["token_ids"],
            "teacher_forced_argmax_equals_generate": True,
            "tf_vs_generate_max_abs_logit_diff": r["tf_vs_gen_max_abs"],
            "max_abs_logit_change_without_decoder_window": r["logit_change_without_decoder_window"],
            "max_abs_logit_change_without_encoder_window": r["logit_change_without_encoder_window"],
            "stream_equals_offline": r["stream_equal"], "stream_prefix_equals_offline": r["stream_prefix_equal"],
            "stream_n_generated": r["stream_len"],
            # HF's streaming recipe pads only (delay+11) tokens of silence without aligning to 1280 and
            # reads 200 samples past each token, so it yields one token fewer iff 1 <= N % 1280 <= 200
            "stream_n_generated_predicted": len(r["token_ids"]) - int(1 <= audio.shape[0] % SAMPLES_PER_TOK <= 200),
            "stream_vs_offline_max_abs_logit_diff": r["stream_vs_offline_max_abs_logit"],
            "stream_text_repr": repr(r["stream_text"]),
            "torch": versions["torch"], "transformers": versions["transformers"],
        }
        return m

    audio_cache = {}
    for name, kind, a_args, delay_ms in CASES:
        key = (kind, json.dumps(a_args, sort_keys=True))
        if key not in audio_cache:
            audio_cache[key] = make_audio(kind, a_args)
        audio, desc = audio_cache[key]
        proc = processor_for(delay_ms)
        nd_ = proc.num_delay_tokens
        assert nd_ == math.ceil(delay_ms / 80)
        r = run_case(model, proc, audio, nd_)
        np.savez_compressed(os.path.join(case_dir, f"{name}.npz"), **case_npz(r, audio, delay_ms, nd_))
        if name == "speech_en_480":  # the README's first command transcribes this file
            os.makedirs(os.path.join(args.out, "audio"), exist_ok=True)
            sf.write(os.path.join(args.out, "audio", "speech_en.wav"), audio, SR, subtype="PCM_16")
        m = meta(name, r, desc, audio, delay_ms, nd_)
        index["cases"].append(m)
        if not (m["stream_prefix_equals_offline"] and m["stream_n_generated"] == m["stream_n_generated_predicted"]):
            log(f"WARNING [{name}]: HF streaming differs from HF offline beyond the known length rule")
        log(f"[{name}] N={m['n_samples']} delay={delay_ms} gen={m['n_generated']} distinct={m['n_distinct_ids']} "
            f"gap={m['min_logit_gap']:.4f} rel={m['min_logit_gap_rel_std']:.2e} tf-gen={m['tf_vs_generate_max_abs_logit_diff']:.1e} "
            f"stream_equal={m['stream_equals_offline']} ({m['stream_n_generated']} vs {m['n_generated']}) "
            f"window effect dec/enc {m['max_abs_logit_change_without_decoder_window']:.2f}/"
            f"{m['max_abs_logit_change_without_encoder_window']:.2f}")

    # batch of two different-length audios: batch run + each alone
    bname, items, delay_ms = BATCH
    proc = processor_for(delay_ms)
    nd_ = proc.num_delay_tokens
    auds, descs = zip(*(make_audio(k, a) for k, a in items))
    alone, alone_meta = [], []
    for j, (a, desc) in enumerate(zip(auds, descs)):
        name = f"{bname}_item{j}"
        r = run_case(model, proc, a, nd_)  # (intermediates computed and checked, not stored)
        m = meta(name, r, desc, a, delay_ms, nd_)
        for k in ("file", "model_dir", "model_dir_mistral", "torch", "transformers"):
            m.pop(k)
        alone.append(r)
        alone_meta.append(m)
        log(f"[{name}] N={m['n_samples']} gen={m['n_generated']} distinct={m['n_distinct_ids']} "
            f"gap={m['min_logit_gap']:.4f} rel={m['min_logit_gap_rel_std']:.2e} stream_equal={m['stream_equals_offline']}")
    binp = proc(list(auds), return_tensors="pt")
    bseq, blog = offline_generate(model, binp, nd_)
    P = binp.input_ids.shape[1]
    with torch.no_grad():
        bout = model(input_ids=bseq, input_features=binp.input_features[..., : bseq.shape[1] * MEL_PER_TOK],
                     attention_mask=torch.ones_like(bseq), num_delay_tokens=nd_, use_cache=False)
    btf = bout.logits.float().numpy()
    bnew = bseq[:, P:].numpy()
    bm = {"name": bname, "file": f"{bname}.npz", "model_dir": "tiny_hf", "model_dir_mistral": "tiny_mistral",
          "delay_ms": delay_ms, "num_delay_tokens": nd_, "batch": True,
          "items": [f"{bname}_item{j}" for j in range(len(auds))], "audio": list(descs),
          "n_samples": [int(a.shape[0]) for a in auds], "n_mel_frames": int(binp.input_features.shape[-1]),
          "n_prompt": P, "n_generated": int(bnew.shape[1]), "token_ids": bnew.tolist(),
          "torch": versions["torch"], "transformers": versions["transformers"]}
    cmp = []
    for j, r in enumerate(alone):
        n = len(r["token_ids"])
        row = bnew[j].tolist()
        cmp.append({
            "item": j, "alone_n_generated": n, "batch_prefix_equals_alone": row[:n] == r["token_ids"],
            "max_abs_logit_diff_vs_alone": float(np.abs(blog[j, :n] - r["generate_logits"]).max()),
            "batch_extra_tokens_after_alone": row[n:],
        })
        g_abs, g_rel, g_relmax = gap_stats(blog[j])
        cmp[-1].update(n_distinct_ids=len(set(row)), min_logit_gap=g_abs, min_logit_gap_rel_std=g_rel,
                       min_logit_gap_rel_maxabs=g_relmax)
    tf_ok = all((btf[j, P - 1:-1].argmax(-1) == bnew[j]).all() for j in range(len(auds)))
    for c, am in zip(cmp, alone_meta):
        c["alone"] = am
    bm["vs_alone"] = cmp
    bm["teacher_forced_argmax_equals_generate"] = bool(tf_ok)
    bm["tf_vs_generate_max_abs_logit_diff"] = float(np.abs(btf[:, P - 1:-1] - blog).max())
    assert tf_ok, "batch teacher-forced argmax != generated"
    Np = max(len(r["padded_audio"]) for r in alone)
    bz = {
        "audio_lengths": np.array([a.shape[0] for a in auds], np.int64),
        "padded_audio": np.stack([np.pad(r["padded_audio"], (0, Np - len(r["padded_audio"]))) for r in alone]),
        "mel": binp.input_features.numpy().astype(np.float32),
        "prompt_ids": binp.input_ids.numpy().astype(np.int64),
        "token_ids": bnew.astype(np.int64),
        "generate_logits": blog.astype(np.float32),
        "delay_ms": np.array(delay_ms, np.int64), "num_delay_tokens": np.array(nd_, np.int64),
    }
    for j, a in enumerate(auds):
        bz[f"audio_{j}"] = a
        bz[f"alone_token_ids_{j}"] = np.array(alone[j]["token_ids"], np.int64)
        bz[f"alone_stream_token_ids_{j}"] = np.array(alone[j]["stream_token_ids"], np.int64)
        bz[f"alone_generate_logits_{j}"] = alone[j]["generate_logits"].astype(np.float32)
        Tj = alone[j]["mel"].shape[-1]
        assert np.array_equal(alone[j]["mel"], bz["mel"][j, :, :Tj]), "alone mel != prefix of batch mel"
        assert np.all(bz["mel"][j, :, Tj:] == bz["mel"][j, 0, -1]), "batch mel padding is not silence"
    # the batch padding is: each item padded by mistral-common, then right-padded with zeros to the longest
    fe = proc.feature_extractor(list(bz["padded_audio"]), sampling_rate=SR, return_tensors="pt").input_features
    assert torch.equal(fe, binp.input_features), "batch padded_audio does not reproduce batch mel"
    np.savez_compressed(os.path.join(case_dir, f"{bname}.npz"), **bz)
    index["batches"] = [bm]
    log(f"[{bname}] mel {tuple(binp.input_features.shape)} gen {bnew.shape[1]} vs alone: {cmp}")

    index["all_stream_equal_offline"] = all(c["stream_equals_offline"] for c in index["cases"])
    index["all_stream_prefix_equal_offline"] = all(c["stream_prefix_equals_offline"] for c in index["cases"])
    index["all_stream_lengths_as_predicted"] = all(
        c["stream_n_generated"] == c["stream_n_generated_predicted"] for c in index["cases"])
    index["quality_failures"] = failures
    write_json(os.path.join(case_dir, "index.json"), index, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    log(f"done in {time.time() - t0:.1f}s; golden size {total / 1e6:.2f} MB; quality failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
