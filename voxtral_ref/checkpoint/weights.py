"""Checkpoint files -> named tensors, memory-mapped and never copied to float32 as a whole.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and one flat data block. We read it ourselves (rather than with the `safetensors` package)
because NumPy has no bfloat16: `ml_dtypes.bfloat16` gives the mmap'd bytes a real dtype, so the C kernels
consume bf16 weights in place and the NumPy path converts one tensor at a time.

Both on-disk formats are mapped onto one set of short canonical names (see `canonical_names`):
  Mistral `consolidated.safetensors` (bf16, names under `mm_streams_embeddings.embedding_module.`)
  HF `model.safetensors` or shards + `model.safetensors.index.json` (names as `save_pretrained` writes them)
"""

import json
import math
import mmap
import re
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config import parse_json, read_json, regular_file_size, show
from ..errors import VoxtralError
from ..runtime import quant
from ..runtime.kernels import huge_pages, read_ahead

DTYPES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16, "I8": np.int8,
          "U8": np.uint8, "I32": np.int32, "I64": np.int64}
MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path):
    """{name: read-only ndarray view into the mmap'd file}. The header is checked by the format's rules
    (check_header) before any view is made."""
    path = Path(path)
    if sys.byteorder != "little":
        raise VoxtralError("safetensors files are little-endian; this machine is not")
    size = regular_file_size(path)                  # a FIFO would block open(), a directory fail oddly
    try:
        f = open(path, "rb")
    except OSError as e:
        raise VoxtralError(f"cannot read {path}: {e.strerror}") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise VoxtralError(f"{path} is not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise VoxtralError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
        layout = check_header(parse_json(f.read(n), f"{path}'s safetensors header"), size - 8 - n, path)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return {name: np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=8 + n + start).reshape(shape)
            for name, dtype, shape, start in layout}


def check_header(header, data_len, path):
    """A parsed safetensors header -> [(name, dtype, shape, start)], by the format's rules (those the
    reference `safetensors` implementation enforces): `__metadata__` maps strings to strings; every tensor
    has a known dtype, a shape of non-negative integers and data_offsets [start, end] of non-negative
    integers whose span holds exactly prod(shape) elements (computed in Python integers: no int64 wrap-
    around), and the tensors, sorted by offset, tile the data block exactly: contiguous, no overlap, no gap,
    nothing past the end. Anything else is one VoxtralError naming the file and the tensor."""
    if not isinstance(header, dict):
        raise VoxtralError(f"{path} is corrupt: its safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise VoxtralError(f"{path} is corrupt: __metadata__ must map strings to strings, got {show(meta)}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise VoxtralError(f"{path} is corrupt: tensor {show(name)} is {show(info)}, not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise VoxtralError(f"{path}: tensor {show(name)} has dtype {show(dtype)}; this reads {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_count(s) for s in shape):
            raise VoxtralError(f"{path} is corrupt: tensor {show(name)} has shape {show(shape)}, "
                               "expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise VoxtralError(f"{path} is corrupt: tensor {show(name)} has data_offsets {show(offsets)}, "
                               "expected [start, end] with 0 <= start <= end")
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise VoxtralError(f"{path} is corrupt: tensor {show(name)} spans {offsets[1] - offsets[0]} bytes, "
                               f"its shape {show(shape)} of {dtype} needs {nbytes}")
        spans.append((offsets[0], offsets[1], name, DTYPES[dtype], tuple(shape)))
    end = 0
    for start, stop, name, _, _ in sorted(spans):
        if start != end:
            raise VoxtralError(f"{path} is corrupt: tensor {show(name)} starts at byte {start} of the data block, "
                               f"where the tensors before it end at {end} (tensors must be contiguous, not overlap)")
        end = stop
    if end != data_len:
        what = "truncated" if end > data_len else "corrupt"
        raise VoxtralError(f"{path} is {what}: its tensors need {end} bytes, the data block has {data_len}")
    return [(name, dtype, shape, start) for start, _, name, dtype, shape in spans]


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def write_safetensors(path, tensors, metadata=None):
    """Write {name: ndarray} (float32, bfloat16, ...) as safetensors; used for tiny test checkpoints,
    the full-size benchmark checkpoint and `voxtral-ref dump`. `metadata` ({str: str}) becomes the
    header's `__metadata__`, which the format reserves for free-form provenance."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header = {"__metadata__": dict(metadata)} if metadata else {}
    offset, arrays = 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data block 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())


# --- names ------------------------------------------------------------------------------------------------
_MISTRAL_PREFIX = "mm_streams_embeddings.embedding_module."
_WHISPER = _MISTRAL_PREFIX + "whisper_encoder."
LAYER_PREFIXES = {"encoder": (_WHISPER + "transformer.layers.", "audio_tower.layers."),   # (mistral, hf)
                  "decoder": ("layers.", "language_model.model.layers.")}
_ENC_LAYER = {  # canonical suffix: (mistral suffix, hf suffix)
    "attention_norm": ("attention_norm.weight", "self_attn_layer_norm.weight"),
    "wq": ("attention.wq.weight", "self_attn.q_proj.weight"), "bq": ("attention.wq.bias", "self_attn.q_proj.bias"),
    "wk": ("attention.wk.weight", "self_attn.k_proj.weight"),
    "wv": ("attention.wv.weight", "self_attn.v_proj.weight"), "bv": ("attention.wv.bias", "self_attn.v_proj.bias"),
    "wo": ("attention.wo.weight", "self_attn.o_proj.weight"), "bo": ("attention.wo.bias", "self_attn.o_proj.bias"),
    "ffn_norm": ("ffn_norm.weight", "final_layer_norm.weight"),
    "w1": ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    "w2": ("feed_forward.w2.weight", "mlp.down_proj.weight"), "b2": ("feed_forward.w2.bias", "mlp.down_proj.bias"),
    "w3": ("feed_forward.w3.weight", "mlp.up_proj.weight"),
}
_DEC_LAYER = {
    "attention_norm": ("attention_norm.weight", "input_layernorm.weight"),
    "wq": ("attention.wq.weight", "self_attn.q_proj.weight"), "wk": ("attention.wk.weight", "self_attn.k_proj.weight"),
    "wv": ("attention.wv.weight", "self_attn.v_proj.weight"), "wo": ("attention.wo.weight", "self_attn.o_proj.weight"),
    "ffn_norm": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "w1": ("feed_forward.w1.weight", "mlp.gate_proj.weight"), "w2": ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    "w3": ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    "ada_down": ("ada_rms_norm_t_cond.0.weight", "ada_rms_norm.linear1.weight"),
    "ada_up": ("ada_rms_norm_t_cond.2.weight", "ada_rms_norm.linear2.weight"),
}


def canonical_names(cfg):
    """[(canonical name, mistral name, hf name, shape)] for every tensor the model reads."""
    e, d = cfg.encoder, cfg.decoder
    W = _WHISPER
    qe, qd, kvd = e.n_heads * e.head_dim, d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    rows = [
        ("tok_embeddings", _MISTRAL_PREFIX + "tok_embeddings.weight", "language_model.model.embed_tokens.weight", (d.vocab_size, d.dim)),
        ("enc.conv1.weight", W + "conv_layers.0.conv.weight", "audio_tower.embedder.conv1.weight", (e.dim, e.n_mels, 3)),
        ("enc.conv1.bias", W + "conv_layers.0.conv.bias", "audio_tower.embedder.conv1.bias", (e.dim,)),
        ("enc.conv2.weight", W + "conv_layers.1.conv.weight", "audio_tower.embedder.conv2.weight", (e.dim, e.dim, 3)),
        ("enc.conv2.bias", W + "conv_layers.1.conv.bias", "audio_tower.embedder.conv2.bias", (e.dim,)),
        ("enc.norm", W + "transformer.norm.weight", "audio_tower.norm.weight", (e.dim,)),
        ("adapter.w_in", _MISTRAL_PREFIX + "audio_language_projection.0.weight", "multi_modal_projector.linear_1.weight", (d.dim, e.dim * cfg.downsample)),
        ("adapter.w_out", _MISTRAL_PREFIX + "audio_language_projection.2.weight", "multi_modal_projector.linear_2.weight", (d.dim, d.dim)),
        ("dec.norm", "norm.weight", "language_model.model.norm.weight", (d.dim,)),
    ]
    enc_shapes = {"attention_norm": (e.dim,), "wq": (qe, e.dim), "bq": (qe,), "wk": (qe, e.dim), "wv": (qe, e.dim),
                  "bv": (qe,), "wo": (e.dim, qe), "bo": (e.dim,), "ffn_norm": (e.dim,), "w1": (e.hidden_dim, e.dim),
                  "w2": (e.dim, e.hidden_dim), "b2": (e.dim,), "w3": (e.hidden_dim, e.dim)}
    dec_shapes = {"attention_norm": (d.dim,), "wq": (qd, d.dim), "wk": (kvd, d.dim), "wv": (kvd, d.dim),
                  "wo": (d.dim, qd), "ffn_norm": (d.dim,), "w1": (d.hidden_dim, d.dim), "w2": (d.dim, d.hidden_dim),
                  "w3": (d.hidden_dim, d.dim), "ada_down": (d.ada_dim, d.dim), "ada_up": (d.dim, d.ada_dim)}
    (enc_m, enc_h), (dec_m, dec_h) = LAYER_PREFIXES["encoder"], LAYER_PREFIXES["decoder"]
    for i in range(e.n_layers):
        for k, (m, h) in _ENC_LAYER.items():
            rows.append((f"enc.layers.{i}.{k}", f"{enc_m}{i}.{m}", f"{enc_h}{i}.{h}", enc_shapes[k]))
    for i in range(d.n_layers):
        for k, (m, h) in _DEC_LAYER.items():
            rows.append((f"dec.layers.{i}.{k}", f"{dec_m}{i}.{m}", f"{dec_h}{i}.{h}", dec_shapes[k]))
    return rows


def mapped_pages(t):
    """(the mmap an mmap'd tensor lies in, the offset and length of the whole pages inside the tensor), or
    None (not mmap'd, or no whole page)."""
    mm = t
    while isinstance(mm, (np.ndarray, memoryview)):                      # view -> view -> memoryview -> mmap
        mm = mm.base if isinstance(mm, np.ndarray) else mm.obj
    if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise"):
        return None
    start = t.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    return (mm, lo, hi - lo) if hi > lo else None


def release_pages(t):
    """Drop an mmap'd tensor's pages from this process (they stay in the page cache; touching them again
    re-reads them), so a tensor replaced by a quantised copy stops counting in RSS."""
    pages = mapped_pages(t)
    if pages:
        pages[0].madvise(mmap.MADV_DONTNEED, pages[1], pages[2])


class Layer(dict):
    """One layer's tensors by their short names; the C backend keeps its descriptor of them on it
    (runtime/ckernels.layers), so it lives and dies with them."""


class Weights:
    """Canonical name -> tensor. Matrices stay in their file dtype (bf16 or f32, mmap'd); vectors (norms,
    biases) and conv kernels, a few MB in all, are converted to float32 once."""

    def __init__(self, tensors, cfg, source, canonical=False):
        """`tensors` by their names in the file: Mistral's or HF's per cfg.format, or the canonical names
        themselves (canonical=True: a quantised checkpoint, whose matrices may be quant.QTensor)."""
        self.cfg, self.source, self._t, self._small, self._layers = cfg, source, {}, {}, {}
        self._lm_head = None                                   # a quantised copy (quantize); else the tied embedding
        self.table_read_ahead = None                           # advise_pages' read-ahead of the table (a thread)
        self._disk = {}                                        # canonical name -> name in the file, for messages
        fmt_col = 0 if canonical else 1 if cfg.format == "mistral" else 2
        missing = []
        for row in canonical_names(cfg):
            canon, disk, shape = row[0], row[fmt_col], row[3]
            self._disk[canon] = disk
            if disk not in tensors:
                missing.append(disk)
                continue
            t = tensors[disk]
            if isinstance(t, quant.QTensor):                   # conv kernels are quantised as [Cout, Cin * k]
                shape = (shape[0], int(np.prod(shape[1:])))
            if tuple(t.shape) != shape:
                raise VoxtralError(f"{source}: tensor {disk} has shape {tuple(t.shape)}, the config says {shape}")
            if not isinstance(t, quant.QTensor) and t.dtype not in (np.float32, ml_dtypes.bfloat16, np.float16):
                raise VoxtralError(f"{source}: tensor {disk} has dtype {t.dtype}; expected bf16/f16/f32")
            self._t[canon] = t
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise VoxtralError(f"{source}: missing tensors {', '.join(missing[:3])}{more}: wrong or incomplete checkpoint")

    def check_finite(self):
        """NaN or infinities in the small tensors (norms, biases, conv kernels) would make every logit NaN and
        every id 0, so they are refused at load; reading the large matrices is `voxtral-ref info --verify`'s job."""
        bad = [self._disk[n] for n, t in self._t.items() if t.ndim != 2 and not np.isfinite(self[n]).all()]
        if bad:
            raise VoxtralError(f"{self.source}: NaN or infinite values in {', '.join(bad[:3])}"
                               + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "") + ": a corrupt checkpoint")

    def __getitem__(self, name):
        t = self._t[name]
        if t.ndim == 2 or isinstance(t, quant.QTensor):
            return t
        if name not in self._small:
            self._small[name] = np.asarray(t, dtype=np.float32)
        return self._small[name]

    def layer(self, prefix):
        """{'wq': ..., 'attention_norm': ...} for one encoder or decoder layer."""
        if prefix not in self._layers:  # built once: the decode loop asks for every layer at every step
            n = len(prefix) + 1
            self._layers[prefix] = Layer({k[n:]: self[k] for k in self._t if k.startswith(prefix + ".")})
        return self._layers[prefix]

    @property
    def lm_head(self):
        """The output projection [V, 3072]: the tied token embedding, or its quantised copy."""
        return self._t["tok_embeddings"] if self._lm_head is None else self._lm_head

    def quantize(self, formats, quantize):
        """Replace each matrix named in `formats` ({canonical name or "lm_head": "int8" | "q4"}, see
        quant.plan) by `quantize(w, fmt)` and release the file pages it replaced. The embedding lookup keeps
        the file's rows (one row per token: exact input embeddings at no cost in speed)."""
        self._layers.clear()                                   # layer dicts hold the tensors they were built from
        for name, fmt in formats.items():
            if name == "lm_head":
                self._lm_head = quantize(self._t["tok_embeddings"], fmt)
                release_pages(self._t["tok_embeddings"])       # lookups fault in the rows they read
            else:                                              # conv kernels as [Cout, Cin * k] matrices
                t = self._t[name]
                self._t[name] = quantize(t.reshape(t.shape[0], -1), fmt)
                release_pages(t)

    def advise_pages(self):
        """Once the weights are final: the mmap'd matrices a step streams in 2 MB pages (kernels.huge_pages),
        the embedding table in 4 KB ones when a quantised LM head replaces it: it then serves one row per
        token, and in 2 MB pages every lookup would map 2 MB of it (a q4 live_bench run's peak RSS: 3.45 GB
        with it in 2 MB pages, 15 s a phase; 3.17 GB in 4 KB pages, 8 s a phase), and read ahead into the
        page cache (kernels.read_ahead), so that no token's first lookup waits on the disk."""
        held = [t.data if isinstance(t, quant.QTensor) else t for t in [*self._t.values(), self._lm_head] if t is not None]
        for mm in {id(p[0]): p[0] for p in map(mapped_pages, held) if p}.values():   # whole files: one mapping each
            huge_pages(mm)
        table = mapped_pages(self._t["tok_embeddings"]) if self._lm_head is not None else None
        if table:
            huge_pages(*table, on=False)
            self.table_read_ahead = read_ahead(*table)   # its pages into the page cache, not into RSS

    def formats(self):
        """{canonical name (and "lm_head"): what it holds}: "int8" / "q4" for quantised matrices, else the
        file's dtype."""
        held = {n: getattr(t, "fmt", None) or str(t.dtype) for n, t in self._t.items()}
        held["lm_head"] = held["tok_embeddings"] if self._lm_head is None else self._lm_head.fmt
        return held

    def n_params(self):
        return sum(int(t.size) for t in self._t.values())


def load_weights(model_dir, cfg):
    """The checkpoint's tensors as `Weights`, after every check that needs no weight values read: headers,
    shard paths, layer counts, then (in Weights) each tensor's name, shape and dtype against the config; then
    the small tensors' values (Weights.check_finite)."""
    model_dir = Path(model_dir)
    if cfg.format == "mistral":
        path = model_dir / "consolidated.safetensors"
        tensors, source = read_safetensors(path), str(path)
    else:
        tensors, source = _read_hf_shards(model_dir), str(model_dir)
    check_layer_counts(tensors, cfg, source)
    weights = Weights(tensors, cfg, source)
    weights.check_finite()
    return weights


def _read_hf_shards(model_dir):
    """HF's model.safetensors, or the shards model.safetensors.index.json lists. A shard name is a path
    relative to the checkpoint directory and must stay inside it (an index naming /etc/passwd or ../x is
    refused before anything is opened); each tensor is in exactly the shard the index says."""
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        return read_safetensors(model_dir / "model.safetensors")
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise VoxtralError(f"{index} is corrupt: expected a weight_map of tensor name -> shard file name")
    for shard in set(weight_map.values()):
        parts = Path(shard).parts
        if not parts or Path(shard).is_absolute() or ".." in parts or not shard.endswith(".safetensors"):
            raise VoxtralError(f"{index}: shard {show(shard)} is not a .safetensors file inside {model_dir}")
    tensors, where = {}, {}
    for shard in sorted(set(weight_map.values())):
        for name, t in read_safetensors(model_dir / shard).items():
            if name in tensors:
                raise VoxtralError(f"{model_dir}: tensor {name} is in both {where[name]} and {shard}")
            tensors[name], where[name] = t, shard
    wrong = [n for n, shard in weight_map.items() if where.get(n) != shard]
    if wrong:
        raise VoxtralError(f"{index}: tensor {show(wrong[0])} is not in the shard {weight_map[wrong[0]]} it names")
    return tensors


def check_layer_counts(tensors, cfg, source):
    """The config's n_layers against the layers the file holds, before anything is built from n_layers: a
    config saying 1 layer would otherwise run a truncated model, one saying 10**9 would build 10**9 rows."""
    for part, c in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        prefix = re.escape(LAYER_PREFIXES[part][0 if cfg.format == "mistral" else 1])
        found = {int(m.group(1)) for name in tensors if (m := re.match(prefix + r"(\d+)\.", name))}
        if len(found) != c.n_layers or max(found, default=-1) != c.n_layers - 1:     # i.e. not 0..n_layers-1
            held = f"layers {min(found)}..{max(found)}" if found else "no layers"
            raise VoxtralError(f"{source} holds {part} {held} ({len(found)} in all), the config says "
                               f"n_layers {c.n_layers}")


def count_nonfinite(t, rows=4096):
    """NaN and infinite values in a tensor, a block of rows at a time (no float32 copy of a large matrix)."""
    if t.dtype.kind != "f" and t.dtype != ml_dtypes.bfloat16:
        return 0
    flat = t.reshape(len(t), -1) if t.ndim else t.reshape(1, 1)
    return sum(int(flat[i:i + rows].size - np.count_nonzero(np.isfinite(flat[i:i + rows])))
               for i in range(0, len(flat), rows))
