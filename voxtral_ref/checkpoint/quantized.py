"""Quantised checkpoints: quantise once, then memory-map.

Quantising the 4.4 B weights to q4 takes about a minute (csrc/qmatmul_simd.h fits every block of 32); a
quantised copy on disk loads in well under a second plus page-in. `voxtral-ref quantize --model M
--quantize q4 -o DIR` writes one, and `load(DIR)` reads it. `load(repo_id, quantize=...)` keeps one next
to the Hugging Face cache entry of the repo and rebuilds it when the source files change.

Layout of DIR: the source's config (params.json or config.json) and tekken.json, copied, and
`quantized.safetensors`, whose tensors carry the canonical names of checkpoint/weights.py:
  - a quantised matrix: uint8 [ceil(M / 16), panel bytes] in quant.py's panel layout (`lm_head` for the
    quantised output projection; `tok_embeddings` keeps the file's rows for the embedding lookup);
  - everything else: as in the source file (bf16 or f32).
Its `__metadata__` (strings, as the format requires):
  format          "voxtral_ref.quantized/1"
  source_format   "mistral" or "hf" (RoPE row order and the config file to read)
  recipe          the quantize recipe (quant.parse_recipe)
  quantized       JSON {name: [fmt, M, K]}
  source          JSON [{name, size, mtime_ns, sha256}] of the source files: weights, config, tekken.json
  voxtral_ref     the package version that wrote it
"""

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..config import parse_json, show
from ..errors import VoxtralError
from ..runtime import quant
from .weights import MAX_HEADER, Weights, read_safetensors, write_safetensors

QFILE = "quantized.safetensors"
FORMAT_TAG = "voxtral_ref.quantized/1"
CONFIG_FILES = {"mistral": "params.json", "hf": "config.json"}


def is_quantized(d):
    return (Path(d) / QFILE).is_file()


def source_files(d, fmt):
    """The files a quantised copy is made of: the weights, and the config and tekken.json it copies (a
    revision that changes only those must not find the old copy fresh)."""
    d = Path(d)
    weights = [d / "consolidated.safetensors"] if fmt == "mistral" else sorted(d.glob("model*.safetensors"))
    return weights + [d / CONFIG_FILES[fmt], d / "tekken.json"]


def fingerprint(paths):
    """[{name, size, mtime_ns, sha256}] of the source files (sha256 read in 16 MB pieces)."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        st = os.stat(p)
        out.append({"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()})
    return out


def is_fresh(meta, src_dir, fmt):
    """Whether a quantised copy was made from the files now in `src_dir`: size and mtime equal, or (a copy
    touched since) the same sha256."""
    recorded = {f["name"]: f for f in json.loads(meta["source"])}
    files = source_files(src_dir, fmt)
    if sorted(recorded) != sorted(p.name for p in files):
        return False
    for p in files:
        st, rec = os.stat(p), recorded[p.name]
        if st.st_size != rec["size"]:
            return False
        if st.st_mtime_ns != rec["mtime_ns"] and fingerprint([p])[0]["sha256"] != rec["sha256"]:
            return False
    return True


def write(out_dir, src_dir, fmt, weights, recipe, version):
    """Write `weights` (already quantised by `recipe`) as a quantised checkpoint in out_dir, atomically:
    the file appears complete or not at all. `src_dir` may itself be a quantised checkpoint (a copy)."""
    out_dir, src_dir = Path(out_dir), Path(src_dir)
    if out_dir.resolve() == src_dir.resolve():
        raise VoxtralError(f"the output directory {out_dir} is the source checkpoint's: choose another")
    # over another checkpoint, its tekken.json would be replaced, and the directory then load as our copy; a
    # config without weights beside it is what an interrupted write of ours leaves (the weights go last)
    theirs = ("consolidated.safetensors", "model*.safetensors", "model.safetensors.index.json")
    found = sorted({f.name for pattern in theirs for f in out_dir.glob(pattern)})
    if found:
        raise VoxtralError(f"the output directory {out_dir} holds a checkpoint ({', '.join(found)}): choose an empty "
                           "directory, or one an earlier `voxtral-ref quantize` wrote")
    if is_quantized(src_dir):
        source = read_metadata(src_dir / QFILE)["source"]
    else:
        source = json.dumps(fingerprint(source_files(src_dir, fmt)))
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, qinfo = {}, {}
    held = dict(weights._t)
    if weights._lm_head is not None:
        held["lm_head"] = weights._lm_head
    for name, t in held.items():
        if isinstance(t, quant.QTensor):
            tensors[name], qinfo[name] = t.data, [t.fmt, *t.shape]
        else:
            tensors[name] = t
    meta = {"format": FORMAT_TAG, "source_format": fmt, "recipe": recipe, "quantized": json.dumps(qinfo),
            "source": source, "voxtral_ref": version}
    # each file whole or not at all, the weights last (is_quantized: complete); temporary names of this
    # process's own, removed if it fails (a full disk must not stay full, nor a second writer clobber them)
    (out_dir / QFILE).unlink(missing_ok=True)
    for name in (CONFIG_FILES[fmt], "tekken.json", QFILE):
        tmp = out_dir / f".{name}.{os.getpid()}.partial"
        try:
            if name == QFILE:
                write_safetensors(tmp, tensors, meta)
                uncache(tmp)
            else:
                shutil.copyfile(src_dir / name, tmp)
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def building(out_dir):
    """Hold the lock of a quantised copy's directory: two processes loading one hub model with quantize=
    build its copy once, the second then finding it fresh (without it, one renamed the other's half-written
    file into place and mapped it)."""
    import fcntl
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir.parent / f".{out_dir.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def uncache(path):
    """Write a fresh file to disk and drop it from the page cache, which holds what was just written in 4 KB
    pages: its first load then reads it back in the 2 MB pages its mapping asks for (kernels.huge_pages)
    instead of mapping those 4 KB pages for as long as they stay cached."""
    if not hasattr(os, "posix_fadvise"):
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_metadata(path):
    """The `__metadata__` of a quantised checkpoint, checked to be ours."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER:
                raise ValueError(f"a header of {n} bytes")
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise VoxtralError(f"{path} is not a readable quantised checkpoint ({e})") from None
    tag = meta.get("format") if isinstance(meta, dict) else None
    if tag != FORMAT_TAG:
        raise VoxtralError(f"{path} is not a voxtral_ref quantised checkpoint (format {show(tag)}, "
                           f"expected {FORMAT_TAG!r}): re-create it with `voxtral-ref quantize`")
    for key in ("source_format", "recipe", "quantized", "source"):
        if not isinstance(meta.get(key), str):
            raise VoxtralError(f"{path}: quantised checkpoint metadata lacks the string {key!r}: re-create it with "
                               "`voxtral-ref quantize`")
    if meta["source_format"] not in CONFIG_FILES:
        raise VoxtralError(f"{path}: unknown source_format {meta['source_format']!r}")
    for key, ok, want in (("quantized", _is_qinfo, "{name: [format, rows, columns]}"),
                          ("source", _is_fingerprint, "[{name, size, mtime_ns, sha256}]")):
        value = parse_json(meta[key], f"{path}: metadata {key}")
        if not ok(value):
            raise VoxtralError(f"{path} is corrupt: its metadata {key} is {show(value)}, expected {want}")
    return meta


def _is_qinfo(v):
    return isinstance(v, dict) and all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                                       and all(_is_count(n) for n in e[1:]) for e in v.values())


def _is_fingerprint(v):
    fields = {"name": str, "size": int, "mtime_ns": int, "sha256": str}
    return isinstance(v, list) and all(isinstance(f, dict) and all(isinstance(f.get(k), t) for k, t in fields.items())
                                       for f in v)


def _is_count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


def load_weights(d, cfg, meta):
    """Weights from a quantised checkpoint directory (mmap'd; QTensors wrap the uint8 panels in place)."""
    path = Path(d) / QFILE
    tensors = read_safetensors(path)
    try:
        qinfo = json.loads(meta["quantized"])
        for name, (fmt, m, k) in qinfo.items():
            tensors[name] = quant.QTensor(fmt, tensors[name], (m, k))
    except (KeyError, TypeError, ValueError) as e:
        raise VoxtralError(f"{path} is corrupt: its quantised tensors do not match their description ({e})") from None
    lm_head = tensors.pop("lm_head", None)
    weights = Weights(tensors, cfg, str(path), canonical=True)
    weights.check_finite()
    if lm_head is not None:
        if lm_head.shape != weights["tok_embeddings"].shape:
            raise VoxtralError(f"{path} is corrupt: lm_head has shape {lm_head.shape}, "
                               f"the embedding {weights['tok_embeddings'].shape}")
        weights._lm_head = lm_head
    return weights
