"""`voxtral-ref transcribe` and `voxtral-ref info`, in-process through voxtral_ref.apps.cli.main (and once
through the console script): every format and flag on the tiny checkpoints, and every bad input answered
by one line on stderr with a non-zero exit."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import voxtral_ref
from voxtral_ref.apps.subtitles import n_decode_steps, segments, to_srt, to_vtt

from conftest import MODEL_DIRS, SPEECH_WAV, load_case, make_hub_cache
from test_audio import fake_stdin, tone, wav_bytes

pytestmark = pytest.mark.usefixtures("offline")
ROOT = Path(__file__).resolve().parent.parent
MISTRAL, HF = MODEL_DIRS["mistral"], MODEL_DIRS["hf"]


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """The audio of golden case speech_en_long_480 (8.6 s, int16-exact) as a WAV file."""
    f = tmp_path_factory.mktemp("audio") / "long.wav"
    sf.write(f, load_case("speech_en_long_480")["audio"], 16000, subtype="PCM_16")
    return f


def one_error_line(code, out, err):
    assert code != 0 and out == ""
    assert err.startswith("voxtral-ref") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# --- output formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mistral", "hf"])
def test_txt_to_stdout(cli, fmt, tiny_model):
    code, out, err = cli("transcribe", SPEECH_WAV, "--model", MODEL_DIRS[fmt], "--backend", "numpy")
    assert (code, err) == (0, "")
    audio, sr = sf.read(SPEECH_WAV, dtype="float32")
    if tiny_model.cfg.format == fmt:
        assert out == tiny_model.transcribe(audio, sr).text.strip() + "\n"


def test_precision_and_quantize_reach_the_model(cli, monkeypatch):
    """--precision bf16 --quantize int8 loads the model that way and prints that model's transcript."""
    seen, real_load = [], voxtral_ref.load
    monkeypatch.setattr(voxtral_ref, "load",
                        lambda *a, **k: seen.append((k["precision"], k["quantize"])) or real_load(*a, **k))
    code, out, err = cli("transcribe", SPEECH_WAV, "-f", "json", "--model", MISTRAL, "--backend", "numpy",
                         "--precision", "bf16", "--quantize", "int8")
    audio, sr = sf.read(SPEECH_WAV, dtype="float32")
    want = real_load(MISTRAL, backend="numpy", precision="bf16", quantize="int8").transcribe(audio, sr)
    assert (code, seen) == (0, [("bf16", "int8")]) and json.loads(out)["token_ids"] == want.token_ids
    for flag, value, why in (("--precision", "fp8", "invalid choice"), ("--quantize", "int4", "unknown quantize format")):
        code, _, err = cli("transcribe", SPEECH_WAV, "--model", MISTRAL, flag, value)
        assert code == 2 and why in err and "Traceback" not in err


def test_json(cli, tiny_mistral):
    code, out, err = cli("transcribe", SPEECH_WAV, "-f", "json", "--model", MISTRAL, "--backend", "numpy")
    assert code == 0
    j = json.loads(out)
    r = tiny_mistral.transcribe(*sf.read(SPEECH_WAV, dtype="float32"))
    assert set(j) == {"text", "segments", "token_ids", "delay_ms"}
    assert j["token_ids"] == r.token_ids and j["delay_ms"] == 480 and j["text"] == r.text.strip()
    for n, s in enumerate(j["segments"]):
        assert set(s) == {"id", "start", "end", "text", "tokens"} and s["id"] == n
    assert [i for s in j["segments"] for i in s["tokens"]] == [i for i in r.token_ids if i >= 1000]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_match_the_golden_case(cli, long_wav, fmt):
    """End to end: the CLI's subtitles equal the ones made from the HF oracle's ids for the same audio."""
    code, out, _ = cli("transcribe", long_wav, "-f", fmt, "--model", MISTRAL, "--backend", "numpy")
    case = load_case("speech_en_long_480")
    segs = segments([int(i) for i in case["token_ids"]], voxtral_ref.load(MISTRAL).tokenizer, len(case["audio"]))
    assert code == 0 and out == (to_srt if fmt == "srt" else to_vtt)(segs)


def test_timestamps_are_monotone_and_inside_the_audio(cli, long_wav):
    code, out, _ = cli("transcribe", long_wav, "-f", "json", "--model", HF, "--backend", "numpy")
    segs = json.loads(out)["segments"]
    duration = sf.info(long_wav).duration
    assert code == 0 and len(segs) >= 3
    assert all(0 <= s["start"] <= s["end"] <= duration for s in segs)
    assert all(a["end"] <= b["start"] for a, b in zip(segs, segs[1:]))


def test_all_formats_to_a_directory_with_one_model(cli, tmp_path, long_wav, monkeypatch):
    loads = []
    real_load = voxtral_ref.load
    monkeypatch.setattr(voxtral_ref, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out_dir = tmp_path / "new" / "subs"
    code, out, err = cli("transcribe", SPEECH_WAV, long_wav, "-o", out_dir, "-f", "all", "--model", MISTRAL)
    assert (code, out, err, len(loads)) == (0, "", "", 1)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("speech_en", "long") for ext in ("txt", "json", "srt", "vtt"))
    assert (out_dir / "long.srt").read_text(encoding="utf-8").startswith("1\n00:00:00,")
    assert (out_dir / "long.vtt").read_text(encoding="utf-8").startswith("WEBVTT\n\n")
    assert json.loads((out_dir / "long.json").read_text())["text"] + "\n" == (out_dir / "long.txt").read_text()


def test_stdin(cli, monkeypatch):
    _, from_file, _ = cli("transcribe", SPEECH_WAV, "--model", MISTRAL, "-f", "json")
    fake_stdin(monkeypatch, SPEECH_WAV.read_bytes())
    code, from_stdin, _ = cli("transcribe", "-", "--model", MISTRAL, "-f", "json")
    assert code == 0 and from_stdin == from_file


def test_44k_stereo_input(cli, tmp_path):
    f = tmp_path / "stereo.wav"
    f.write_bytes(wav_bytes(np.stack([tone(300, 3.0), tone(500, 3.0)], axis=1), 44100))
    code, out, _ = cli("transcribe", f, "-f", "json", "--model", MISTRAL)
    j = json.loads(out)
    assert code == 0 and len(j["token_ids"]) == n_decode_steps(48000, 6)
    assert all(0 <= s["start"] <= s["end"] <= 3.0 for s in j["segments"])


def test_delay(cli):
    code, out, _ = cli("transcribe", SPEECH_WAV, "-f", "json", "--delay-ms", "80", "--model", HF)
    j = json.loads(out)
    assert code == 0 and j["delay_ms"] == 80
    assert len(j["token_ids"]) == n_decode_steps(sf.info(SPEECH_WAV).frames, 1)


def test_quiet_and_verbose(cli, tmp_path):
    assert cli("transcribe", SPEECH_WAV, "--model", MISTRAL, "--quiet")[2] == ""
    code, _, err = cli("transcribe", SPEECH_WAV, "--model", MISTRAL, "--verbose", "-o", tmp_path)
    assert code == 0 and "loaded in" in err and "real-time factor" in err and f"wrote {tmp_path / 'speech_en.txt'}" in err


def test_threads(cli, monkeypatch):
    from voxtral_ref.runtime import ckernels
    code, _, err = cli("transcribe", SPEECH_WAV, "--model", MISTRAL, "--backend", "numpy", "--threads", "2")
    if not hasattr(ckernels, "set_threads") or not ckernels.available():
        assert code == 0 and err.startswith("voxtral-ref: warning: --threads applies to the C kernels")
    calls = []
    monkeypatch.setattr(ckernels, "available", lambda: True)
    monkeypatch.setattr(ckernels, "set_threads", calls.append, raising=False)
    assert cli("transcribe", SPEECH_WAV, "--model", MISTRAL, "--backend", "numpy", "--threads", "3")[0] == 0
    assert calls == [3]


@pytest.mark.parametrize("fmt", ["mistral", "hf"])
def test_info(cli, fmt):
    code, out, err = cli("info", "--model", MODEL_DIRS[fmt])
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert code == 0 and err == ""
    assert set(lines) == {"model", "format", "parameters", "dtypes", "weights", "files", "encoder", "decoder", "delay",
                          "kernels"}
    assert lines["format"].split()[0] == fmt and "(547,232)" in lines["parameters"]
    assert lines["dtypes"].strip() == ("bfloat16 x57" if fmt == "mistral" else "float32 x57")
    assert "tekken.json" in lines["files"] and "2 layers, dim 96" in lines["decoder"]
    assert lines["kernels"].split()[0] in ("c", "numpy")


def test_a_hub_repo_id_from_the_cache(cli, tmp_path):
    make_hub_cache(tmp_path, HF)
    code, out, _ = cli("transcribe", SPEECH_WAV, "--cache-dir", tmp_path, "--weights-format", "hf", "--offline")
    assert code == 0 and out == cli("transcribe", SPEECH_WAV, "--model", HF)[1]


# --- mistakes ---------------------------------------------------------------------------------------------
@pytest.fixture
def broken(tmp_path):
    """Ways to break a copy of the tiny checkpoint and the audio."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(MISTRAL, ckpt)
    empty, nan, m4a = tmp_path / "empty.wav", tmp_path / "nan.wav", tmp_path / "talk.m4a"
    empty.write_bytes(wav_bytes(np.zeros(0, np.float32), 16000))
    nan.write_bytes(wav_bytes(np.array([0.1, np.nan] * 800, np.float32), 16000, "FLOAT"))
    m4a.write_bytes(b"\0\0\0\x20ftypM4A " + bytes(512))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "sub").mkdir()
    shutil.copy(SPEECH_WAV, tmp_path / "sub")
    return tmp_path


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD = {  # name: (arguments, what to break first, words the message must hold)
    "no such audio": (["missing.wav"], None, "audio file not found"),
    "no such model dir": (["{speech}", "--model", "nope/dir/x"], None, "model directory not found"),
    "dir without weights": (["{speech}", "--model", "."], None, "holds no Voxtral checkpoint"),
    "truncated safetensors": (["{speech}", "--model", "ckpt"], lambda d: truncate(d / "ckpt/consolidated.safetensors"),
                              "truncated"),
    "corrupt tekken": (["{speech}", "--model", "ckpt"], lambda d: (d / "ckpt/tekken.json").write_text('{"vocab": ['),
                       "tekken.json is not valid JSON"),
    "zero-length audio": (["empty.wav"], None, "empty.wav: the audio is empty"),
    "NaN audio": (["nan.wav"], None, "nan.wav: the audio contains 800 NaN"),
    "unsupported format": (["talk.m4a"], None, "ffmpeg -i in.m4a -f wav - | voxtral-ref transcribe -"),
    "bad delay": (["{speech}", "--delay-ms", "100"], None, "delay_ms=100 is not supported"),
    "delay not a number": (["{speech}", "--delay-ms", "fast"], None, "invalid int value: 'fast'"),
    "output dir is a file": (["{speech}", "-o", "a_file"], None, "not a directory"),
    "output dir under a file": (["{speech}", "-o", "a_file/sub"], None, "cannot write there"),
    "all formats to stdout": (["{speech}", "-f", "all"], None, "add -o DIR"),
    "unknown format": (["{speech}", "-f", "docx"], None, "invalid choice: 'docx'"),
    "stdin twice": (["-", "-"], None, "only once"),
    "same name twice": (["{speech}", "sub/speech_en.wav", "-o", "out"], None, "would both be written"),
    "zero threads": (["{speech}", "--threads", "0"], None, "must be at least 1"),
    "nothing cached offline": (["{speech}", "--model", "org/model", "--cache-dir", "."], None,
                               "downloads are off"),
    "no audio argument": ([], None, "the following arguments are required: audio"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gets_one_line(cli, broken, monkeypatch, name):
    args, breaking, words = BAD[name]
    if breaking:
        breaking(broken)
    monkeypatch.chdir(broken)
    args = [a.format(speech=SPEECH_WAV) for a in args]
    if "--model" not in args:
        args += ["--model", str(MISTRAL)]
    err = one_error_line(*cli("transcribe", *args))
    assert words in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert "cannot write there" in one_error_line(*cli("transcribe", SPEECH_WAV, "-o", ro, "--model", MISTRAL))


def test_output_dir_that_cannot_be_created(cli, tmp_path):
    """Runs as root too (root ignores directory permissions): a file stands where the directory would go."""
    (tmp_path / "afile").write_text("")
    err = one_error_line(*cli("transcribe", SPEECH_WAV, "-o", tmp_path / "afile" / "sub", "--model", MISTRAL))
    assert "cannot write there" in err


def test_a_bad_file_does_not_stop_the_others(cli, broken):
    code, out, err = cli("transcribe", broken / "talk.m4a", SPEECH_WAV, "--model", MISTRAL)
    assert code == 2 and out == cli("transcribe", SPEECH_WAV, "--model", MISTRAL)[1]
    assert err.count("\n") == 1 and "talk.m4a" in err


def test_missing_files_are_reported_before_the_model_loads(cli, tmp_path):
    err = one_error_line(*cli("transcribe", SPEECH_WAV, tmp_path / "a.wav", tmp_path / "b.wav", "--offline"))
    assert err == f"voxtral-ref: error: audio file not found: {tmp_path / 'a.wav'} (and 1 more)\n"


def test_info_on_a_bad_model(cli, tmp_path):
    assert "holds no Voxtral checkpoint" in one_error_line(*cli("info", "--model", tmp_path))


# --- the installed command --------------------------------------------------------------------------------
def test_console_script(tmp_path):
    """What `pip install .` puts on PATH: pyproject's entry point, run as a separate process."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["voxtral-ref"]
    assert entry == "voxtral_ref.apps.cli:main"
    exe = shutil.which("voxtral-ref")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from voxtral_ref.apps.cli import main; sys.exit(main())"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    make_hub_cache(tmp_path, MISTRAL)                      # the default --model, found through HF_HUB_CACHE
    ok = subprocess.run(cmd + ["transcribe", str(SPEECH_WAV), "-f", "srt"], env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("1\n00:00:") and ok.stderr == ""
    bad = subprocess.run(cmd + ["transcribe", str(tmp_path / "x.wav")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"voxtral-ref: error: audio file not found: {tmp_path / 'x.wav'}\n"


def test_a_reader_that_leaves_early(tmp_path):
    """`voxtral-ref transcribe ... | head -c 1` with the pipe already closed: no traceback."""
    cmd = [sys.executable, "-m", "voxtral_ref.apps.cli", "transcribe", str(SPEECH_WAV), "--model", str(MISTRAL)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""
