"""Quantised checkpoints (voxtral_ref/checkpoint/quantized.py): quantise once, load by mmap, the same results;
hub copies cached next to the cache entry and rebuilt when the source changes; corrupt or mismatched
files refused with one clear error."""

import ctypes
import json
import mmap
import os
import sys
import time

import numpy as np
import pytest

import voxtral_ref
from voxtral_ref import VoxtralError
from voxtral_ref.checkpoint import quantized, weights
from voxtral_ref.model import write_quantized
from voxtral_ref.runtime import ckernels, kernels

from conftest import MODEL_DIRS, load_case, make_hub_cache

BACKEND = "c" if ckernels.available() else "numpy"
RECIPE = "q4,lm_head=int8"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = voxtral_ref.load(MODEL_DIRS["mistral"], backend=BACKEND, quantize=RECIPE)
    out = tmp_path_factory.mktemp("q") / "tiny_q4"
    write_quantized(model, out)
    return model, out


def assert_same_weights(a, b):
    """Every tensor of two models' weights holds the same bytes (a quantised matrix: its panels)."""
    for name, t in b.weights._t.items():
        u = a.weights._t[name]
        np.testing.assert_array_equal(*((x.data if x.dtype == np.uint8 else x) for x in (u, t)))


def test_a_saved_checkpoint_loads_as_it_was_quantised(saved):
    """Same recipe, same bytes in every quantised matrix, same ids; its metadata records the provenance."""
    model, out = saved
    again = voxtral_ref.load(out, backend=BACKEND)
    assert again.quantize == RECIPE and again.weights.formats() == model.weights.formats()
    assert_same_weights(again, model)
    g = load_case("speech_en_480")
    assert again.transcribe(g["audio"]).token_ids == model.transcribe(g["audio"]).token_ids
    meta = quantized.read_metadata(out / quantized.QFILE)
    source = json.loads(meta["source"])
    assert meta["recipe"] == RECIPE and meta["source_format"] == "mistral" and meta["voxtral_ref"]
    assert [s["name"] for s in source] == ["consolidated.safetensors", "params.json", "tekken.json"]
    assert all(len(s["sha256"]) == 64 for s in source)
    assert sorted(p.name for p in out.iterdir()) == ["params.json", "quantized.safetensors", "tekken.json"]


def test_a_saved_checkpoint_refuses_another_recipe(saved):
    with pytest.raises(VoxtralError, match="quantised as 'q4,lm_head=int8', not 'int8'"):
        voxtral_ref.load(saved[1], quantize="int8")


def test_writing_over_the_source_is_refused(saved):
    with pytest.raises(VoxtralError, match="source checkpoint"):
        quantized.write(MODEL_DIRS["mistral"], MODEL_DIRS["mistral"], "mistral", saved[0].weights, RECIPE, "0")


@pytest.mark.parametrize("damage", ["truncate", "metadata", "shape"])
def test_a_corrupt_quantised_file_is_one_error(saved, tmp_path, damage):
    import shutil
    out = tmp_path / "q"
    shutil.copytree(saved[1], out)
    path = out / quantized.QFILE
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if damage == "truncate":
        path.write_bytes(raw[:-1000])
    else:
        if damage == "metadata":
            header["__metadata__"]["format"] = "something/else"
        else:                                 # a quantised matrix described with another shape
            q = json.loads(header["__metadata__"]["quantized"])
            q["dec.layers.0.w1"][1] += 16
            header["__metadata__"]["quantized"] = json.dumps(q)
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        path.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])
    with pytest.raises(VoxtralError):
        voxtral_ref.load(out, backend=BACKEND)


def test_a_hub_model_keeps_its_quantised_copy_and_rebuilds_it_when_stale(tmp_path, monkeypatch):
    snap = make_hub_cache(tmp_path, MODEL_DIRS["mistral"])
    repo = "mistralai/Voxtral-Mini-4B-Realtime-2602"
    first = voxtral_ref.load(repo, backend=BACKEND, cache_dir=tmp_path, offline=True, quantize="q4")
    qdir = first.path
    assert qdir.parent.name == "voxtral_ref" and quantized.is_quantized(qdir) and first.quantize == "q4"

    calls = []
    real = kernels.quantize
    monkeypatch.setattr(kernels, "quantize", lambda w, fmt: calls.append(fmt) or real(w, fmt))
    again = voxtral_ref.load(repo, backend=BACKEND, cache_dir=tmp_path, offline=True, quantize="q4")
    assert again.path == qdir and calls == []                      # fresh: mmap'd, nothing quantised

    src = snap / "consolidated.safetensors"
    os.utime(src, ns=(0, 0))                                       # touched, same content: still fresh
    voxtral_ref.load(repo, backend=BACKEND, cache_dir=tmp_path, offline=True, quantize="q4")
    assert calls == []
    raw = bytearray(src.read_bytes())
    raw[-2] ^= 1                                                   # the source changed: rebuilt
    src.write_bytes(bytes(raw))
    rebuilt = voxtral_ref.load(repo, backend=BACKEND, cache_dir=tmp_path, offline=True, quantize="q4")
    assert calls and rebuilt.path == qdir
    assert quantized.is_fresh(quantized.read_metadata(qdir / quantized.QFILE), snap, "mistral")


def test_the_hub_copy_survives_races_interruptions_damage_and_a_changed_config(tmp_path, monkeypatch):
    """The quantised copy beside a hub entry: built once by two loads at a time (a lock; the second finds it
    fresh), rebuilt after an interrupted write or damage, stale when the config or tekken.json changes, one
    directory per recipe (spaces aside), and a cache that cannot hold it quantises in memory."""
    import threading
    import time
    import warnings
    snap = make_hub_cache(tmp_path, MODEL_DIRS["mistral"])
    repo, g = "mistralai/Voxtral-Mini-4B-Realtime-2602", load_case("speech_en_480")

    def load(recipe="q4"):
        return voxtral_ref.load(repo, backend=BACKEND, cache_dir=tmp_path, offline=True, quantize=recipe)
    builds, real = [], quantized.write

    def slow_write(*args):
        builds.append(1)
        time.sleep(0.3)                                            # the full model takes ~15 s
        return real(*args)
    monkeypatch.setattr(quantized, "write", slow_write)
    models = []
    threads = [threading.Thread(target=lambda: models.append(load())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want = voxtral_ref.load(MODEL_DIRS["mistral"], backend=BACKEND, quantize="q4").transcribe(g["audio"]).token_ids
    assert len(builds) == 1 and [m.transcribe(g["audio"]).token_ids for m in models] == [want, want]
    qdir = models[0].path

    (qdir / quantized.QFILE).unlink()                              # killed mid-write: configs, a partial file
    (qdir / f".{quantized.QFILE}.999.partial").write_bytes(b"\0" * 100)
    assert load().transcribe(g["audio"]).token_ids == want and len(builds) == 2
    with open(qdir / quantized.QFILE, "r+b") as f:                 # damaged
        f.write(b"garbage!")
    assert load().transcribe(g["audio"]).token_ids == want and len(builds) == 3
    tekken = json.loads((snap / "tekken.json").read_text())        # a revision changing only tekken.json
    tekken["audio"]["transcription_delay_ms"] = 960
    (snap / "tekken.json").unlink()                                # a symlink into the blobs
    (snap / "tekken.json").write_text(json.dumps(tekken))
    assert load().cfg.default_delay_ms == 960 and len(builds) == 4

    assert load(" q4 , lm_head = int8 ").path == load("q4,lm_head=int8").path and len(builds) == 5
    assert load("q4,enc.layers.?.w2=int8").path != load("q4,enc.layers.*.w2=int8").path and len(builds) == 7

    def cannot(*args):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(quantized, "write", cannot)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = load("int8")
    assert "quantising in memory" in str(caught[-1].message) and fallback.quantize == "int8"
    assert fallback.transcribe(g["audio"]).token_ids == \
        voxtral_ref.load(snap, backend=BACKEND, quantize="int8").transcribe(g["audio"]).token_ids


def vm_flags(address):
    """The VmFlags of this process's mapping holding `address` (Linux /proc/self/smaps), or None."""
    if not os.path.exists("/proc/self/smaps"):
        return None
    hit = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            hit = lo <= address < hi
        elif hit and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


@pytest.mark.skipif(not (hasattr(__import__("mmap"), "MADV_HUGEPAGE") and os.path.exists("/sys/kernel/mm/transparent_hugepage")),
                    reason="no transparent huge pages here")
def test_weights_are_mapped_asking_for_huge_pages(saved):
    """A loaded quantised file's streamed matrices and an in-memory quantised matrix of 1 MB or more carry the
    huge-page advice (VmFlags `hg`: kernels.huge_pages); the embedding table, which a quantised LM head
    leaves to one lookup per token, the advice against (`nh`); a KV ring neither (its pages come as a
    stream fills it)."""
    again = voxtral_ref.load(saved[1], backend=BACKEND)
    mapped = max((t.data for t in again.weights._t.values() if hasattr(t, "fmt")), key=lambda a: a.nbytes)
    table, head = again.weights._t["tok_embeddings"], again.weights.lm_head.data
    for a, flag in ((mapped, "hg"), (head, "hg"), (table, "nh")):               # a byte in a whole page of it
        assert a.nbytes > 2 * 4096 and flag in vm_flags(a.ctypes.data + a.nbytes // 2)
    with kernels.use(BACKEND):
        qt = kernels.quantize(np.ones((2048, 1024), np.float32), "int8")
        ring = kernels.lazy_zeros((4 << 20,), np.uint8)
    if BACKEND == "c":
        assert qt.data.nbytes >= kernels.LAZY_MIN_BYTES and "hg" in vm_flags(qt.data.ctypes.data)
    assert not {"hg", "nh"} & set(vm_flags(ring.ctypes.data))


def page_cache_share(buf, start, length):
    """The share of the pages of bytes [start, start + length) of a file mapping that the page cache holds
    (Linux mincore)."""
    pages = -(-length // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    address = np.frombuffer(buf, np.uint8).ctypes.data + start
    assert ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) == 0
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(os, "posix_fadvise")
                         and hasattr(mmap, "MADV_WILLNEED")), reason="needs Linux's mincore, posix_fadvise and MADV_WILLNEED")
def test_the_embedding_table_is_read_ahead_into_the_page_cache(saved):
    """With a quantised LM head the embedding table serves one row per token; load() has the OS read it into
    the page cache in the background (kernels.read_ahead), so that a token's first lookup, inside a pass
    every sequence of it waits for, does not wait on the disk. Checked from a file just dropped from the
    page cache."""
    path = saved[1] / quantized.QFILE
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as probe:
            if page_cache_share(probe, 0, len(probe)) > 0.5:
                pytest.skip("this file system keeps the file in memory")
    finally:
        os.close(fd)
    again = voxtral_ref.load(saved[1], backend=BACKEND)
    again.weights.table_read_ahead.join(30)            # the requests are made; the reads complete after
    table = weights.mapped_pages(again.weights._t["tok_embeddings"])
    deadline = time.monotonic() + 10
    while page_cache_share(*table) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert page_cache_share(*table) == 1.0


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_a_written_checkpoint_leaves_the_page_cache(saved, tmp_path, monkeypatch):
    """quantized.write writes the file out and drops it from the page cache (so its first load maps it in
    2 MB pages), and the file is complete: it loads with the same bytes."""
    calls = []
    monkeypatch.setattr(quantized.os, "posix_fadvise", lambda fd, off, n, advice: calls.append((os.fstat(fd).st_size, advice)),
                        raising=False)
    model, _ = saved
    quantized.write(tmp_path / "q", MODEL_DIRS["mistral"], "mistral", model.weights, RECIPE, "0")
    assert calls == [((tmp_path / "q" / quantized.QFILE).stat().st_size, os.POSIX_FADV_DONTNEED)]
    again = voxtral_ref.load(tmp_path / "q", backend=BACKEND)
    assert_same_weights(again, model)
