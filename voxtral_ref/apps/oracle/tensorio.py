"""Tensor files in and out: .safetensors, .npz or a folder of NAME.npy, chosen by the path's suffix.

Every dump carries provenance metadata ({str: str}): the safetensors header's `__metadata__`, a
`__metadata__` JSON string inside a .npz, or `__metadata__.json` in a folder. Readers skip it.
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from ...checkpoint.weights import read_safetensors, write_safetensors
from ...errors import VoxtralError
from .names import name_regex

META = "__metadata__"
FORMATS = "a .safetensors file, a .npz file or a folder of .npy files"


def out_kind(path):
    """How `--out PATH` is written: "safetensors", "npz" or "dir" (no suffix, or an existing folder).
    Checked before any work, so a typo costs nothing."""
    p = Path(path)
    kind = ("dir" if p.is_dir() or not p.suffix else
            {".safetensors": "safetensors", ".npz": "npz"}.get(p.suffix.lower()))
    if kind is None:
        raise VoxtralError(f"--out {p}: cannot write {p.suffix!r} files; give {FORMATS} (a path without suffix)")
    if not p.is_dir() and not p.parent.is_dir():
        raise VoxtralError(f"--out {p}: the folder {p.parent} does not exist")
    if kind == "dir" and p.is_dir() and any(p.iterdir()) and not (p / f"{META}.json").is_file():
        raise VoxtralError(f"--out {p}: the folder holds files that are not an earlier dump (no {META}.json), "
                           "which the dump would overwrite or mix with: give a new or empty folder")
    return kind


def refuse_overwriting(out, inputs):
    """An output must never be one of the command's inputs (the audio, a checkpoint file)."""
    o = Path(out).resolve()
    for i in inputs:
        i = Path(i).resolve()
        if o == i or (i.is_dir() and o.parent == i and o.exists()):
            raise VoxtralError(f"refusing to overwrite an input: {out}")


def save_tensors(path, tensors, metadata):
    """Write {name: ndarray} in the format `out_kind(path)` names."""
    kind, p = out_kind(path), Path(path)
    if kind == "safetensors":
        write_safetensors(p, tensors, metadata)
    elif kind == "npz":
        np.savez(p, **tensors, **{META: np.array(json.dumps(metadata))})
    else:
        p.mkdir(exist_ok=True)
        for old in p.glob("*.npy"):              # an earlier dump's: every .npy here is read as part of this one
            old.unlink()
        for name, a in tensors.items():
            np.save(p / f"{name}.npy", a)
        (p / f"{META}.json").write_text(json.dumps(metadata, indent=1), encoding="utf-8")


def load_tensors(path, with_metadata=False):
    """{name: ndarray} (and the metadata dict if asked) from any of FORMATS; one clear error otherwise."""
    p = Path(path)
    meta = {}
    try:
        if p.is_dir():
            files = sorted(p.glob("*.npy"))
            tensors = {f.stem: np.load(f, allow_pickle=False) for f in files}
            if (p / f"{META}.json").is_file():
                meta = json.loads((p / f"{META}.json").read_text(encoding="utf-8"))
        elif p.suffix == ".safetensors":
            tensors = read_safetensors(p)
            with p.open("rb") as f:                                  # read_safetensors checked the header
                meta = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get(META) or {}
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                tensors = {k: z[k] for k in z.files}
            if META in tensors:
                meta = json.loads(str(tensors.pop(META)))
        elif not p.exists():
            raise FileNotFoundError
        else:
            raise VoxtralError(f"{p}: cannot read this kind of file; give {FORMATS}")
    except FileNotFoundError:
        raise VoxtralError(f"missing file: {p}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise VoxtralError(f"cannot read tensors from {p}: {e}") from None
    if not tensors:
        raise VoxtralError(f"{p} holds no tensors")
    if not isinstance(meta, dict):
        raise VoxtralError(f"{p}: its {META} is not a JSON object")
    return (tensors, meta) if with_metadata else tensors


def load_name_map(path):
    """A JSON object {their name: our name}; "{i}" in both stands for a layer number. -> [(regex, ours)]"""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VoxtralError(f"name map not found: {path} (--map takes a JSON file holding "
                           '{"their name": "our name"})') from None
    except (OSError, ValueError) as e:
        raise VoxtralError(f"cannot read the name map {path}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise VoxtralError(f"{path}: a name map is a JSON object of strings, {{\"their_name\": \"our_name\"}}")
    return [(name_regex(k), v) for k, v in raw.items()]


def rename(tensors, rules):
    """Apply a name map to one side's names; names no rule matches are kept."""
    out = {}
    for name, t in tensors.items():
        new = name
        for rx, ours in rules:
            m = rx.match(name)
            if m:
                new = ours.replace("{i}", m.group(1)) if m.groups() else ours
                break
        if new in out:
            raise VoxtralError(f"two tensors are named (or mapped to) {new!r}: fix the name map")
        out[new] = t
    return out
