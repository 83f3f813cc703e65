"""`voxtral-ref batch` / voxtral_ref.apps.batch.run: inputs, records equal to transcribe() one by one,
subtitles equal to `transcribe -o`, resuming (skips, retries, torn lines, a killed driver), and the same on
a local Ray cluster with an actor killed mid-run. The embedded tests need no Ray."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

import voxtral_ref
from voxtral_ref.apps import batch
from voxtral_ref.apps.cli import render
from voxtral_ref.apps.subtitles import segments, to_json
from voxtral_ref.errors import VoxtralError

from conftest import MODEL_DIRS, SPEECH_WAV

MODEL = MODEL_DIRS["mistral"]
CLIP_SECONDS = (1, 2.5, 3.2, 4, 6)                # cut from, or tiled out of, the 3.2 s golden speech


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder of clips (one nested, one at 44.1 kHz stereo) and two that cannot be transcribed."""
    d = tmp_path_factory.mktemp("clips")
    x, sr = sf.read(SPEECH_WAV, dtype="int16")
    for i, s in enumerate(CLIP_SECONDS):
        sf.write(d / f"clip{i}.wav", np.tile(x, 6)[: int(s * sr)], sr)
    (d / "sub").mkdir()
    sf.write(d / "sub" / "nested.flac", x[: 2 * sr], sr)
    y = np.stack([x, x[::-1]], axis=1).astype(np.float32) / 32768
    sf.write(d / "stereo.wav", y, 44100)                                # 3.5 s at 44.1 kHz
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    sf.write(d / "empty.wav", x[:0], sr)
    return d


BAD = {"broken", "empty"}


@pytest.fixture(scope="module")
def model():
    """One thread, as every run here (the tests share 2 cores with others: two kernel threads would wait on
    each other), restored after."""
    from voxtral_ref.runtime import ckernels
    before = ckernels.get_threads()
    ckernels.set_threads(1)
    yield voxtral_ref.load(MODEL, backend="c")
    ckernels.set_threads(before)


@pytest.fixture(scope="module")
def reference(clips, model):
    """{id: Transcript} from model.transcribe on each file alone."""
    out = {}
    for f in sorted(clips.rglob("*.*")):
        name = f.relative_to(clips).with_suffix("").as_posix()
        if name not in BAD:
            a, sr = sf.read(f, dtype="float32")
            out[name] = model.transcribe(a, sample_rate=sr)
    return out


def read_results(out):
    lines = (out / batch.RESULTS).read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), f"a file recorded twice: {sorted(ids)}"
    return {r["id"]: r for r in recs}


def assert_equals_reference(recs, reference, model, ids=None):
    """Every transcribed record is what transcribe() gives that file alone; the bad ones are errors."""
    ids = set(reference) if ids is None else ids
    assert {i for i, r in recs.items() if r["error"] is None} == ids
    for i in ids:
        r, ref = recs[i], reference[i]
        expect = to_json(ref, segments(ref.token_ids, model.tokenizer, ref.n_samples))
        assert r["token_ids"] == ref.token_ids and r["text"] == expect["text"], i
        assert r["segments"] == expect["segments"] and r["delay_ms"] == ref.delay_ms == 480, i
        assert r["duration"] == ref.n_samples / 16000 and r["timings"]["total_s"] > 0, i
        assert r["settings"]["model"] == str(MODEL.resolve()) and r["input"]["size"] > 0, i


def assert_bad_recorded(recs, clips):
    assert "cannot decode" in recs["broken"]["error"] and recs["broken"]["text"] is None
    assert "empty" in recs["empty"]["error"] and recs["empty"]["path"] == str(clips / "empty.wav")


# --- inputs -----------------------------------------------------------------------------------------------
def test_inputs_folders_globs_and_manifests(clips, tmp_path):
    folder = batch.collect_inputs([clips])
    assert [it.id for it in folder] == ["broken", *[f"clip{i}" for i in range(len(CLIP_SECONDS))], "empty",
                                        "stereo", "sub/nested"]
    assert folder[-1].path == str(clips / "sub" / "nested.flac") and folder[0].delay_ms is None
    assert [it.id for it in batch.collect_inputs([f"{clips}/**/*.flac", clips / "clip1.wav"], 160)] == \
        ["sub/nested", "clip1"]
    listed = tmp_path / "files.txt"
    listed.write_text(f"# archive\n\n{clips / 'clip0.wav'}\nmissing.wav\n")
    jl = tmp_path / "more.jsonl"
    jl.write_text(json.dumps({"path": str(clips / "clip2.wav"), "id": "calls/a", "delay_ms": 960}) + "\n"
                  + json.dumps({"path": "../x/clip2.wav"}) + "\n")
    items = batch.collect_inputs([listed, jl, clips / "clip0.wav"])    # clip0 twice: once
    assert [(it.id, it.path, it.delay_ms) for it in items] == [
        ("clip0", str(clips / "clip0.wav"), None), ("missing", str(tmp_path / "missing.wav"), None),
        ("calls/a", str(clips / "clip2.wav"), 960), ("clip2", str(tmp_path.parent / "x" / "clip2.wav"), None)]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"id": "a"}', 'needs "path"'),
    ('{"path": "a.wav", "delay": 480}', "unknown keys ['delay']"),
    ('{"path": "a.wav", "delay_ms": 500}', "delay_ms=500 is not supported"),
    ('{"path": "a.wav", "id": "../up"}', "inside OUT"),
    ('{"path": "a.wav", "id": "/abs"}', "inside OUT"),
])
def test_bad_manifest_line_is_named(tmp_path, line, message):
    m = tmp_path / "m.jsonl"
    m.write_text(f"ok.wav\n{line}\n")
    with pytest.raises(VoxtralError, match=re.escape("m.jsonl:2: ") + ".*" + re.escape(message)):
        batch.collect_inputs([m])


def test_bad_inputs(clips, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sf.write(tmp_path / "a" / "x.wav", np.zeros(100, np.int16), 16000)
    sf.write(tmp_path / "b" / "x.wav", np.zeros(100, np.int16), 16000)
    with pytest.raises(VoxtralError, match="would both be recorded as 'x'"):
        batch.collect_inputs([tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav"])
    assert [it.id for it in batch.collect_inputs([tmp_path])] == ["a/x", "b/x"]     # their folder: no clash
    with pytest.raises(VoxtralError, match="input not found"):
        batch.collect_inputs([tmp_path / "nope.wav"])
    with pytest.raises(VoxtralError, match="no file matches"):
        batch.collect_inputs([f"{tmp_path}/*.mp3"])
    (tmp_path / "none").mkdir()
    with pytest.raises(VoxtralError, match="no audio files"):
        batch.collect_inputs([tmp_path / "none"])
    with pytest.raises(VoxtralError, match="listed twice with different delays"):
        batch.collect_inputs([clips / "clip0.wav", _manifest(tmp_path, clips / "clip0.wav", 160)])


def _manifest(tmp_path, path, delay_ms):
    m = tmp_path / "one.jsonl"
    m.write_text(json.dumps({"path": str(path), "delay_ms": delay_ms}) + "\n")
    return m


# --- embedded ---------------------------------------------------------------------------------------------
def test_embedded_equals_transcribe_and_writes_what_transcribe_writes(clips, reference, model, tmp_path, cli):
    out = tmp_path / "out"
    code, stdout, err = cli("batch", clips, "-o", out, "-f", "srt", "-f", "all", "--model", MODEL, "--threads", "1", "-q")
    assert code == 2 and stdout == ""                                    # two files failed
    assert f"{len(reference)} transcribed, 2 failed, 0 already done" in err and "Traceback" not in err
    recs = read_results(out)
    assert_equals_reference(recs, reference, model)
    assert_bad_recorded(recs, clips)
    # The same files, names and bytes as `transcribe -o` (nested ids mirror the folder).
    files = [clips / "clip3.wav", clips / "stereo.wav", clips / "sub" / "nested.flac"]
    code, _, _ = cli("transcribe", *files, "-o", tmp_path / "t", "-f", "all", "--model", MODEL, "--threads", "1")
    assert code == 0
    for name, f in (("clip3", "clip3"), ("stereo", "stereo"), ("sub/nested", "nested")):
        for fmt in ("txt", "json", "srt", "vtt"):
            assert (out / f"{name}.{fmt}").read_bytes() == (tmp_path / "t" / f"{f}.{fmt}").read_bytes()
    assert not (out / "broken.txt").exists() and not list(out.rglob("*.tmp"))


def test_rerun_skips_done_retries_failed_redoes_changed(clips, reference, model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("clip0", "clip2", "broken"):
        (src / f"{name}.wav").write_bytes((clips / f"{name}.wav").read_bytes())
    out = tmp_path / "out"
    s = batch.run([src], out, ["txt"], model=MODEL, threads=1)
    assert (s.transcribed, s.failed, s.skipped) == (2, 1, 0)
    first = read_results(out)
    s = batch.run([src], out, ["txt", "vtt"], model=MODEL, threads=1)              # only the failure is tried again
    assert (s.transcribed, s.failed, s.skipped) == (0, 1, 2) and (out / "clip0.vtt").exists()
    assert read_results(out)["clip0"] == first["clip0"]
    (src / "broken.wav").write_bytes((clips / "clip1.wav").read_bytes())           # fixed
    os.utime(src / "clip0.wav", ns=(1, 1))                                         # a copy: new mtime, same bytes
    (src / "clip2.wav").write_bytes((clips / "clip3.wav").read_bytes())            # other content
    s = batch.run([src], out, ["txt"], model=MODEL, threads=1)
    assert (s.transcribed, s.failed, s.skipped) == (2, 0, 1)
    recs = read_results(out)
    assert recs["broken"]["token_ids"] == reference["clip1"].token_ids
    assert recs["clip2"]["token_ids"] == reference["clip3"].token_ids
    assert (out / "clip2.txt").read_text() == reference["clip3"].text.strip() + "\n"
    # a redone file's outputs of the old content go, those of a skipped one stay (they match its record)
    assert not (out / "clip2.vtt").exists() and (out / "clip0.vtt").exists()
    default = read_results(out)["clip0"]["delay_ms"]
    s = batch.run([src], out, ["txt"], model=MODEL, delay_ms=default, threads=1)   # the default, by name
    assert (s.transcribed, s.skipped) == (0, 3)
    s = batch.run([src], out, model=MODEL, delay_ms=960, threads=1)                # other settings: all redone
    assert (s.transcribed, s.skipped) == (3, 0)
    assert {r["delay_ms"] for r in read_results(out).values()} == {960}
    assert not [f.name for f in out.iterdir() if f.suffix in (".txt", ".vtt")]     # none of the old delay's


def test_torn_line_and_other_ids_survive_a_rerun(clips, reference, model, tmp_path):
    out = tmp_path / "out"
    batch.run([clips / "clip0.wav", clips / "clip1.wav"], out, model=MODEL, threads=1)
    with open(out / batch.RESULTS, "a") as f:                            # a crash cut a write short
        f.write('{"id": "clip4", "path": "/x", "tok')
    s = batch.run([clips / "clip1.wav", clips / "clip4.wav"], out, model=MODEL, threads=1)
    assert (s.transcribed, s.skipped) == (1, 1)
    recs = read_results(out)                                             # clip0 kept: not in this run, not lost
    assert_equals_reference(recs, reference, model, {"clip0", "clip1", "clip4"})


def test_embedded_driver_killed_then_rerun(clips, reference, model, tmp_path):
    """SIGKILL the CLI once it has recorded a file: the rerun finishes, each file recorded once."""
    out = tmp_path / "out"
    manifest, ids = repeated(clips, tmp_path)
    n_at_kill = kill_after_first_record(
        [sys.executable, "-m", "voxtral_ref.apps.cli", "batch", manifest, "-o", out, "-f", "srt", "--model", MODEL,
         "--threads", "1"], out)
    assert 0 < n_at_kill < len(ids), "the run was not killed mid-way: make it longer"
    s = batch.run([manifest], out, ["srt"], model=MODEL, threads=1)
    assert s.skipped >= n_at_kill and s.skipped + s.transcribed == len(ids) and s.failed == 0
    recs = read_results(out)
    assert set(recs) == set(ids)
    for i, c in ids.items():                      # every subtitle whole, whenever the kill came
        assert recs[i]["token_ids"] == reference[c].token_ids
        ref = reference[c]
        assert (out / f"{i}.srt").read_text() == render("srt", ref, segments(ref.token_ids, model.tokenizer,
                                                                                ref.n_samples), pretty=True)
    assert not list(out.rglob("*.tmp"))           # a kill's leftover temp files are cleared by the rerun


def repeated(clips, tmp_path):
    """A manifest of the longer clips 4 times over under other ids (3 model calls' worth) -> (path, {id: clip})."""
    ids = {f"r{k}/clip{i}": f"clip{i}" for k in range(4) for i in range(2, len(CLIP_SECONDS))}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(clips / f"{c}.wav"), "id": i}) + "\n" for i, c in ids.items()))
    return manifest, ids


def kill_after_first_record(cmd, out):
    """Run cmd, SIGKILL it as soon as results.jsonl has a line -> lines at that moment."""
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and p.poll() is None:
            results = out / batch.RESULTS
            if results.exists() and results.read_text().count("\n") > 0:
                break
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        err = p.communicate(timeout=30)[1].decode()
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL, f"the run ended by itself: {err[-2000:]}"
    return (out / batch.RESULTS).read_text().count("\n")


def test_one_run_per_output_folder(tmp_path, clips):
    out = tmp_path / "out"
    out.mkdir()
    fd = batch.lock(out)
    try:
        with pytest.raises(VoxtralError, match="another voxtral-ref batch is writing to"):
            batch.run([clips / "clip0.wav"], out, model=MODEL, threads=1)
    finally:
        os.close(fd)


@pytest.mark.parametrize("args, message", [
    (["{clip}", "--model", "{model}"], "the following arguments are required: -o/--output-dir"),
    (["{clip}", "-o", "{out}", "--model", "{model}", "--workers", "2"], "add --ray or --ray-address"),
    (["{clip}", "-o", "{out}", "--model", "{model}", "--delay-ms", "500"], "delay_ms=500 is not supported"),
    (["{clip}", "-o", "{out}", "-f", "pdf"], "invalid choice: 'pdf'"),
])
def test_cli_mistakes_are_one_line(cli, clips, tmp_path, args, message):
    code, out, err = cli("batch", *[a.format(clip=clips / "clip0.wav", out=tmp_path / "o", model=MODEL) for a in args])
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


# --- on Ray -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the Ray tests (starting one takes seconds): 2 CPUs, no dashboard."""
    ray = pytest.importorskip("ray", reason="the Ray tests need pip install 'voxtral_ref[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def transcriber_actors(ray):
    return [a for a, v in ray._private.state.actors().items()
            if "Transcriber" in v["ActorClassName"] and v["State"] == "ALIVE"]


def test_ray_equals_transcribe_with_an_actor_killed_mid_run(ray_cluster, clips, reference, model, tmp_path):
    """The clips and the repeated manifest on 2 actors; one actor is killed (ray.kill) once a file is
    recorded: each file is still recorded once, as transcribe() gives it, and the bad ones as errors."""
    ray = ray_cluster
    out = tmp_path / "out"
    manifest, ids = repeated(clips, tmp_path)
    killed = {}

    def kill_one_actor():                # once a file is recorded, the actors are busy with the others
        results = out / batch.RESULTS
        while not (results.exists() and results.read_text().count("\n")):
            time.sleep(0.01)
        actor = transcriber_actors(ray)[0]
        killed["lines"] = results.read_text().count("\n")
        # No public call gives a handle to a Ray Data actor, and ray.kill needs one. no_restart=False:
        # Ray restarts it, as after a crash, and retries its tasks.
        ray.kill(ray._private.worker.global_worker.core_worker.get_actor_handle(ray.ActorID.from_hex(actor)),
                 no_restart=False)
        killed["actor"] = actor

    t = threading.Thread(target=kill_one_actor, daemon=True)
    t.start()
    s = batch.run([clips, manifest], out, ["srt"], model=MODEL, ray=True, workers=2, threads=1)
    t.join(timeout=10)
    n = len(reference) + len(ids)
    assert "actor" in killed and killed["lines"] < n + len(BAD), f"not killed mid-run: {killed}"
    assert (s.transcribed, s.failed) == (n, len(BAD))
    recs = read_results(out)
    assert set(recs) == set(reference) | set(ids) | BAD
    assert_equals_reference({i: r for i, r in recs.items() if i not in ids}, reference, model)
    assert all(recs[i]["token_ids"] == reference[c].token_ids for i, c in ids.items())
    assert_bad_recorded(recs, clips)
    assert all((out / f"{i}.srt").exists() for i in recs if i not in BAD)


def test_ray_driver_killed_then_rerun(ray_cluster, clips, reference, model, tmp_path):
    ray = ray_cluster
    out = tmp_path / "out"
    manifest, ids = repeated(clips, tmp_path)
    n_at_kill = kill_after_first_record(
        [sys.executable, "-m", "voxtral_ref.apps.cli", "batch", manifest, "-o", out, "--model", MODEL, "-q",
         "--ray-address", ray.get_runtime_context().gcs_address, "--workers", "2", "--threads", "1"], out)
    assert 0 < n_at_kill < len(ids)
    s = batch.run([manifest], out, model=MODEL, ray=True, workers=2, threads=1)
    assert s.skipped >= n_at_kill and s.skipped + s.transcribed == len(ids) and s.failed == 0
    recs = read_results(out)
    assert set(recs) == set(ids)
    assert all(recs[i]["token_ids"] == reference[c].token_ids for i, c in ids.items())


def test_ray_failure_is_one_error(ray_cluster, clips, tmp_path):
    """Actors that cannot load the model end the run with one VoxtralError, not Ray's traceback."""
    bad = tmp_path / "model"
    shutil.copytree(MODEL, bad)
    (bad / "tekken.json").write_text('{"vocab": [')        # the driver checks the folder; only actors load it
    with pytest.raises(VoxtralError, match=r"^on Ray: .*tekken\.json"):
        batch.run([clips / "clip0.wav"], tmp_path / "out", model=bad, ray=True, workers=1, threads=1)
    assert (tmp_path / "out" / batch.RESULTS).read_text() == ""
