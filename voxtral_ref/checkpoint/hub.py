"""Where a checkpoint lives: a local directory, or a Hugging Face hub repo id fetched once into the
standard HF cache (HF_HUB_CACHE / HF_HOME, default ~/.cache/huggingface/hub) and reused from there.

The hub repo ships the model twice (Mistral's consolidated.safetensors and HF's model*.safetensors, about
9 GB each), so only the files of one format are fetched: Mistral's by default, HF's on request.
Offline (`offline=True`, or HF_HUB_OFFLINE=1 as for every HF tool) nothing touches the network: the
cached snapshot is used, or one message says which files are missing and how to get them.
"""

import hashlib
import os
import re
from pathlib import Path

from ..config import show
from ..errors import VoxtralError

DEFAULT_REPO = "mistralai/Voxtral-Mini-4B-Realtime-2602"
# The files that identify each on-disk format; tekken.json (and a shard index) come along when fetching.
FORMATS = {"mistral": ("params.json", "consolidated.safetensors"), "hf": ("config.json", "model*.safetensors")}
FETCH_EXTRA = {"mistral": ("tekken.json",), "hf": ("model.safetensors.index.json", "tekken.json")}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def missing_files(model_dir, fmt):
    """The names (or patterns) of `fmt`'s defining files that `model_dir` lacks."""
    return [name for name in FORMATS[fmt] if not any(Path(model_dir).glob(name))]


def detect_format(model_dir, wanted=None):
    """'mistral' (params.json + consolidated.safetensors) or 'hf' (config.json + model*.safetensors);
    with `wanted`, that format or an error. A directory holding both is read as Mistral by default."""
    d = Path(model_dir)
    if not d.is_dir():
        raise VoxtralError(f"model directory not found: {d}")
    for fmt in [wanted] if wanted else FORMATS:
        if not missing_files(d, fmt):
            return fmt
    if wanted:
        raise VoxtralError(f"{d} holds no {wanted}-format checkpoint: it lacks {', '.join(missing_files(d, wanted))}")
    raise VoxtralError(f"{d} holds no Voxtral checkpoint: expected params.json + consolidated.safetensors "
                       "(Mistral format) or config.json + model.safetensors (HF format)")


def env_offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (the library reads it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def looks_local(model):
    """A path rather than an `org/name` repo id: absolute, relative with ./ or ~, or not shaped org/name."""
    s = str(model)
    return isinstance(model, Path) or s.startswith((".", "~", os.sep)) or not _REPO_ID.match(s)


def resolve(model=DEFAULT_REPO, revision=None, offline=None, weights_format=None, cache_dir=None, progress=True):
    """--model -> the checkpoint directory. An existing directory (or anything path-shaped) is used as is;
    an `org/name` repo id is looked up in the HF cache and downloaded there if needed."""
    if weights_format not in (None, *FORMATS):
        raise VoxtralError(f"unknown weights_format {weights_format!r}: choose mistral or hf")
    # Path() raises TypeError on None, numbers and bytes, and reads "" as the current directory
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise VoxtralError(f"model must be a checkpoint directory or a hub repo id (a non-empty str or path), "
                           f"got {show(model)}")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise VoxtralError(f"revision must be a branch, tag or commit hash, got {show(revision)}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise VoxtralError(f"cache_dir must be a directory path, got {show(cache_dir)}")
    if offline is not None and not isinstance(offline, bool):       # "no" would be true
        raise VoxtralError(f"offline must be True, False or None, got {show(offline)}")
    p = Path(model).expanduser()
    if p.exists() or looks_local(model):
        if p.exists() and not p.is_dir():
            raise VoxtralError(f"{p} is a file: --model takes a checkpoint directory or a hub repo id")
        if not p.is_dir():
            raise VoxtralError(f"model directory not found: {p}")
        if revision:
            raise VoxtralError(f"--revision {revision} applies to hub repo ids, not to the local directory {p}")
        return p
    fmt = weights_format or "mistral"
    offline = bool(offline) or env_offline()
    snap = _snapshot(str(model), revision, offline, fmt, cache_dir, progress)
    if missing_files(snap, fmt) or not (snap / "tekken.json").exists():
        raise VoxtralError(_not_cached(str(model), revision, fmt, cache_dir, f"the cached snapshot {snap} is incomplete"))
    return snap


def _snapshot(repo, revision, offline, fmt, cache_dir, progress):
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                      allow_patterns=[*FORMATS[fmt], *FETCH_EXTRA[fmt]]))
    except HFValidationError:
        raise VoxtralError(f"--model {repo!r} is neither a directory nor a hub repo id (org/name)") from None
    except RevisionNotFoundError:
        raise VoxtralError(f"{repo} has no revision {revision!r} on the hub") from None
    except GatedRepoError:
        raise VoxtralError(f"{repo} is gated: accept its terms on huggingface.co, then log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise VoxtralError(f"{repo} is neither a local directory nor a model repo on the hub "
                           "(private repos need hf auth login)") from None
    except LocalEntryNotFoundError as e:
        why = ("downloads are off (--offline or HF_HUB_OFFLINE=1)" if offline
               else f"the hub cannot be reached ({_first_line(e.__cause__ or e)})")
        cache = Path(cache_dir or constants.HF_HUB_CACHE).resolve()
        entry = cache / f"models--{repo.replace('/', '--')}"
        if revision and entry.is_dir():                        # the repo is cached, the revision is not
            refs = sorted(r.name for r in (entry / "refs").glob("*")) if (entry / "refs").is_dir() else []
            where = (f"{repo} is in the Hugging Face cache {cache}, but not at revision {revision!r} (cached refs: "
                     f"{', '.join(refs) or 'none'}; full commit hashes also work), and {why}")
        else:
            where = f"{repo} is neither a local directory nor in the Hugging Face cache {cache}, and {why}"
        raise VoxtralError(_not_cached(repo, revision, fmt, cache_dir, where)) from None
    except Exception as e:  # the network stack raises many types; all mean the same to the user
        raise VoxtralError(f"downloading {repo} failed ({_first_line(e)})") from None


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _not_cached(repo, revision, fmt, cache_dir, where):
    """One line: what is missing and the two ways to get it onto this machine."""
    want = [*FORMATS[fmt], *FETCH_EXTRA[fmt]]
    if any("*" in w for w in want):
        files = " ".join(f'--include "{w}"' for w in want)
    else:
        files = " ".join(want)
    rev = f" --revision {revision}" if revision else ""
    return (f"{where}; it needs the files {', '.join(want)}. On a connected machine run `hf download {repo} {files}{rev} "
            f"--local-dir DIR`, copy DIR here and pass --model DIR (or run it without --local-dir and copy the "
            "HF cache)")


def is_snapshot(d):
    """Whether `d` is a snapshot in the Hugging Face cache layout (.../models--org--name/snapshots/<rev>)."""
    d = Path(d)
    return d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--")


def quantized_cache_dir(snapshot, recipe):
    """Where a hub model's quantised copy lives: beside the repo's snapshots in its cache entry, one
    directory per recipe (its staleness is checked against the snapshot's files, see checkpoint/quantized.py)."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", recipe)               # readable, but "*" and "?" both give "_":
    tag = hashlib.sha256(recipe.encode()).hexdigest()[:8]            # the recipe's own hash tells them apart
    return Path(snapshot).parent.parent / "voxtral_ref" / f"quantized-{slug}-{tag}"
