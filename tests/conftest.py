"""Shared fixtures: the tiny golden checkpoints (both on-disk formats) and the golden cases made by
golden/make_golden.py from the HF transformers oracle."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import voxtral_ref
from hypothesis import settings

# The long fuzz run (tests/test_fuzz.py): python -m pytest -q tests/test_fuzz.py --hypothesis-profile=fuzz -s
settings.register_profile("fuzz", max_examples=500, deadline=None)

GOLDEN = Path(os.environ.get("VOXTRAL_REF_GOLDEN", Path(__file__).resolve().parent.parent / "golden"))
MODEL_DIRS = {"mistral": GOLDEN / "models" / "tiny_mistral", "hf": GOLDEN / "models" / "tiny_hf"}


def golden_cases():
    """[(name, metadata)] from golden/cases/index.json."""
    index = GOLDEN / "cases" / "index.json"
    if not index.exists():
        return []
    return sorted((c["name"], c) for c in json.loads(index.read_text())["cases"])


def load_case(name):
    with np.load(GOLDEN / "cases" / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session", params=["mistral", "hf"])
def tiny_model(request):
    """The tiny random checkpoint in each format, NumPy backend."""
    return voxtral_ref.load(MODEL_DIRS[request.param], backend="numpy")


@pytest.fixture(scope="session")
def tiny_mistral():
    return voxtral_ref.load(MODEL_DIRS["mistral"], backend="numpy")


def pytest_configure(config):
    config.addinivalue_line("markers", "timed_drafts: sessions draft by their passes' measured costs (stream.pass_ratio)")


@pytest.fixture(autouse=True)
def _untimed_drafts(request, monkeypatch):
    """Sessions draft by DRAFT_RATE_MIN alone, as where extra rows cost nothing: with the passes' measured
    times (stream.pass_ratio) a loaded machine would move how many drafted passes a test sees. The tests
    marked timed_drafts (tests/test_backlog.py) test that rule itself."""
    if "timed_drafts" not in request.keywords:
        from voxtral_ref.runtime import stream
        monkeypatch.setattr(stream, "pass_ratio", lambda model, rows: None)


SPEECH_WAV = GOLDEN / "audio" / "speech_en.wav"     # 16-bit PCM at 16 kHz: the audio of golden case speech_en_480


@pytest.fixture
def mistral_copy(tmp_path):
    """A copy of the tiny Mistral-format checkpoint to break."""
    return shutil.copytree(MODEL_DIRS["mistral"], tmp_path / "ckpt")


@pytest.fixture
def hf_copy(tmp_path):
    """A copy of the tiny HF-format checkpoint to break."""
    return shutil.copytree(MODEL_DIRS["hf"], tmp_path / "hf")


def expect_error(fn, *words):
    """fn() must raise one VoxtralError, a one-line message holding every word -> the message."""
    from voxtral_ref import VoxtralError
    with pytest.raises(VoxtralError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1: voxtral_ref.checkpoint.hub reads it at call time, so nothing here can wait on a network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cli(capsys):
    """Run `voxtral-ref ARGS...` in-process -> (exit code, stdout, stderr)."""
    from voxtral_ref.apps.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def make_hub_cache(cache, model_dir, repo="mistralai/Voxtral-Mini-4B-Realtime-2602", commit="a" * 40, ref="main"):
    """The Hugging Face cache layout a download leaves (models--org--name/snapshots/<commit>/ and
    refs/<ref>), holding `model_dir`'s files (copies instead of symlinks to blobs). -> the snapshot dir."""
    import shutil
    repo_dir = Path(cache) / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        shutil.copy(f, snap / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snap
