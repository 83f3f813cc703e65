"""Write a full-size random checkpoint in the real Mistral on-disk format, for speed and memory benchmarks.

    python bench/make_full_checkpoint.py /work/fullsize_ckpt

params.json carries the real model's values, consolidated.safetensors the real 711 tensor names and shapes
in bf16 (8.86 GB), tekken.json the tiny golden tokenizer grown to the real vocabulary size. Speed does
not depend on the weights' values; they are N(0, 0.02) (norm weights 1) so activations stay finite.
Tensors are generated and written one at a time, so the script needs a few hundred MB of memory.
"""

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from voxtral_ref.config import DecoderConfig, EncoderConfig, ModelConfig
from voxtral_ref.checkpoint.weights import canonical_names

GOLDEN_TEKKEN = Path(__file__).resolve().parent.parent / "golden" / "models" / "tiny_mistral" / "tekken.json"


def params_json(cfg):
    """The real params.json layout (see golden/models/tiny_mistral/params.json) with the real values."""
    e, d = cfg.encoder, cfg.decoder
    return {
        "dim": d.dim, "n_layers": d.n_layers, "head_dim": d.head_dim, "hidden_dim": d.hidden_dim,
        "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads, "use_biases": False, "causal": True,
        "rope_theta": d.rope_theta, "norm_eps": d.norm_eps, "vocab_size": d.vocab_size, "model_parallel": 1,
        "tied_embeddings": True, "sliding_window": d.sliding_window, "model_max_length": 131072,
        "multimodal": {"whisper_model_args": {
            "encoder_args": {
                "audio_encoding_args": {"sampling_rate": 16000, "frame_rate": 12.5, "num_mel_bins": 128,
                                        "hop_length": 160, "window_size": 400, "chunk_length_s": None,
                                        "global_log_mel_max": 1.5, "transcription_format": "streaming"},
                "dim": e.dim, "n_layers": e.n_layers, "head_dim": e.head_dim, "hidden_dim": e.hidden_dim,
                "n_heads": e.n_heads, "vocab_size": d.vocab_size, "n_kv_heads": e.n_heads, "use_biases": True,
                "use_cache": False, "rope_theta": e.rope_theta, "causal": True, "norm_eps": e.norm_eps,
                "pos_embed": "rope", "max_source_positions": None, "ffn_type": "swiglu",
                "norm_type": "rms_norm", "sliding_window": e.sliding_window},
            "downsample_args": {"downsample_factor": cfg.downsample}}},
        "ada_rms_norm_t_cond": True, "ada_rms_norm_t_cond_dim": d.ada_dim,
    }


def random_tensor(rng, canon, shape):
    if canon.endswith("norm") or canon.endswith("_norm"):
        return np.ones(shape, ml_dtypes.bfloat16)
    out = np.empty(shape, ml_dtypes.bfloat16)
    flat = out.reshape(-1)
    for s in range(0, flat.size, 1 << 26):                   # 64 Mi values (256 MB of f32) at a time
        n = min(1 << 26, flat.size - s)
        flat[s:s + n] = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).astype(ml_dtypes.bfloat16)
    return out


def write_streaming(path, rows, rng):
    """safetensors written tensor by tensor: the header first (from shapes alone), then each tensor."""
    header, offset = {}, 0
    for canon, name, shape in rows:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i, (canon, name, shape) in enumerate(rows):
            f.write(random_tensor(rng, canon, shape).tobytes())
            print(f"\r{i + 1}/{len(rows)} tensors", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return 8 + len(raw) + offset


def full_vocab_tekken(vocab_size):
    """The tiny golden tokenizer grown to the real vocabulary: its BPE ranks, then distinct placeholder
    tokens ("<1048>", ...) up to vocab_size - 1000 (the loader checks the vocabulary covers the model's)."""
    tekken = json.loads(GOLDEN_TEKKEN.read_text())
    n = vocab_size - tekken["config"]["default_num_special_tokens"]
    for rank in range(len(tekken["vocab"]), n):
        text = f"<{rank}>"
        tekken["vocab"].append({"rank": rank, "token_bytes": base64.b64encode(text.encode()).decode(), "token_str": text})
    tekken["config"].update(default_vocab_size=vocab_size, num_vocab_tokens=n)
    return tekken


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(EncoderConfig(), DecoderConfig())      # the defaults are the real model's values
    (args.out / "params.json").write_text(json.dumps(params_json(cfg), indent=2))
    (args.out / "tekken.json").write_text(json.dumps(full_vocab_tekken(cfg.decoder.vocab_size)))
    rows = [(canon, mistral, shape) for canon, mistral, _hf, shape in canonical_names(cfg)]
    t0 = time.perf_counter()
    size = write_streaming(args.out / "consolidated.safetensors", rows, np.random.default_rng(args.seed))
    print(f"{len(rows)} tensors, {size:,} bytes in {time.perf_counter() - t0:.0f} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
