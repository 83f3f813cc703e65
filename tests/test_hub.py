"""--model resolution (voxtral_ref/checkpoint/hub.py): local directories, and hub repo ids served from a fake Hugging
Face cache. HF_HUB_OFFLINE=1 throughout: there is no network here and no test may wait for one."""

import shutil

import numpy as np
import pytest

import voxtral_ref
from voxtral_ref import VoxtralError
from voxtral_ref.checkpoint.hub import DEFAULT_REPO, detect_format, looks_local, resolve

from conftest import MODEL_DIRS, make_hub_cache

pytestmark = pytest.mark.usefixtures("offline")
REPO = DEFAULT_REPO


def error_of(fn):
    with pytest.raises(VoxtralError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_local_directories_pass_through(tmp_path):
    assert resolve(MODEL_DIRS["mistral"]) == MODEL_DIRS["mistral"]
    assert resolve(str(MODEL_DIRS["hf"])) == MODEL_DIRS["hf"]
    assert "not found" in error_of(lambda: resolve(tmp_path / "nope"))
    assert "not found" in error_of(lambda: resolve("./nope"))
    f = tmp_path / "params.json"
    f.write_text("{}")
    assert "is a file" in error_of(lambda: resolve(f))
    assert "--revision" in error_of(lambda: resolve(MODEL_DIRS["mistral"], revision="main"))


@pytest.mark.parametrize("name, local", [("mistralai/Voxtral-Mini-4B-Realtime-2602", False), ("org/name", False),
                                         ("./org/name", True), ("/abs/dir", True), ("~/models/x", True),
                                         ("a/b/c", True), ("plainname", True), ("bad id/x", True)])
def test_what_counts_as_a_repo_id(name, local):
    assert looks_local(name) == local


def test_a_cached_snapshot_is_used_offline(tmp_path, monkeypatch):
    snap = make_hub_cache(tmp_path, MODEL_DIRS["mistral"])
    assert resolve(REPO, cache_dir=tmp_path) == snap                      # HF_HUB_OFFLINE=1 from the env
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve(REPO, cache_dir=tmp_path, offline=True) == snap        # or the flag


def test_load_takes_a_repo_id_and_gives_what_the_directory_gives(tmp_path, tiny_mistral):
    make_hub_cache(tmp_path, MODEL_DIRS["mistral"])
    model = voxtral_ref.load(REPO, backend="numpy", cache_dir=tmp_path)
    audio = np.random.default_rng(1).uniform(-0.5, 0.5, 16000).astype(np.float32)
    assert model.transcribe(audio).token_ids == tiny_mistral.transcribe(audio).token_ids


def test_hf_format_by_request(tmp_path):
    make_hub_cache(tmp_path, MODEL_DIRS["hf"])
    assert voxtral_ref.load(REPO, cache_dir=tmp_path, weights_format="hf").cfg.format == "hf"
    msg = error_of(lambda: resolve(REPO, cache_dir=tmp_path))              # Mistral files wanted by default
    assert "incomplete" in msg and "params.json" in msg and "hf download" in msg


def test_a_directory_with_both_formats(tmp_path):
    for d in MODEL_DIRS.values():
        for f in d.iterdir():
            shutil.copy(f, tmp_path / f.name)
    assert detect_format(tmp_path) == "mistral"
    assert detect_format(tmp_path, "hf") == "hf"
    assert voxtral_ref.load(tmp_path, weights_format="hf").cfg.format == "hf"
    (tmp_path / "config.json").unlink()
    assert "no hf-format checkpoint" in error_of(lambda: detect_format(tmp_path, "hf"))


def test_revisions(tmp_path):
    snap = make_hub_cache(tmp_path, MODEL_DIRS["mistral"], commit="b" * 40, ref="v1.0")
    assert resolve(REPO, revision="v1.0", cache_dir=tmp_path) == snap
    assert resolve(REPO, revision="b" * 40, cache_dir=tmp_path) == snap    # a commit needs no ref
    msg = error_of(lambda: resolve(REPO, revision="v2.0", cache_dir=tmp_path))
    assert "--revision v2.0" in msg and "not at revision 'v2.0' (cached refs: v1.0" in msg
    for bad, words in (({"revision": ""}, "revision must be"), ({"revision": 5}, "revision must be"),
                       ({"offline": "no"}, "offline must be"), ({"cache_dir": 5}, "cache_dir must be")):
        assert words in error_of(lambda: resolve(REPO, **{"cache_dir": tmp_path, **bad}))


def test_nothing_cached_offline_says_what_and_how(tmp_path):
    msg = error_of(lambda: resolve(REPO, cache_dir=tmp_path))
    for words in (REPO, str(tmp_path), "HF_HUB_OFFLINE=1", "params.json, consolidated.safetensors, tekken.json",
                  f"hf download {REPO} params.json consolidated.safetensors tekken.json", "--model DIR"):
        assert words in msg, msg
    msg = error_of(lambda: resolve(REPO, cache_dir=tmp_path, weights_format="hf"))
    assert '--include "model*.safetensors"' in msg
