"""Bad input on the command line, found by an audit: file names that are not UTF-8, manifest ids that
cannot name files, out-of-range ports, NaN in oracle dumps, cut-short and undecodable audio, several
files to stdout, too many channels, misleading messages, VOXTRAL_REF_THREADS and dumps into a user's
folder. Each is one clear line (or a warning) and never a traceback, a lost file or a wrong answer."""

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxtral_ref.stages.audio import read_audio

from conftest import MODEL_DIRS, SPEECH_WAV
from test_audio import fake_stdin
from test_cli import one_error_line

pytestmark = pytest.mark.usefixtures("offline")
MISTRAL = MODEL_DIRS["mistral"]


@pytest.fixture
def transcript(cli):
    """What `transcribe SPEECH_WAV` prints."""
    code, out, _ = cli("transcribe", SPEECH_WAV, "--model", MISTRAL)
    assert code == 0 and out
    return out


def non_utf8(folder):
    """A copy of SPEECH_WAV named caf<0xE9>.wav: Latin-1, not UTF-8, as Python holds it (surrogateescape)."""
    f = Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.wav"))
    shutil.copy(SPEECH_WAV, f)
    return f


# --- 1: file names that are not UTF-8 ---------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_transcribed(cli, tmp_path, transcript):
    f = non_utf8(tmp_path)
    assert cli("transcribe", f, "--model", MISTRAL) == (0, transcript, "")
    code, out, err = cli("transcribe", f, SPEECH_WAV, "-f", "json", "--model", MISTRAL, "-v", "-o", tmp_path / "o")
    assert code == 0 and "caf\\udce9.wav: 3.20 s of audio" in err
    assert os.listdir(os.fsencode(tmp_path / "o")).count(b"caf\xe9.json") == 1
    code, out, _ = cli("transcribe", f, SPEECH_WAV, "-f", "json", "--model", MISTRAL)
    assert code == 0 and [json.loads(line)["path"] for line in out.splitlines()] == [str(f), str(SPEECH_WAV)]


def test_batch_of_a_file_name_that_is_not_utf8(cli, tmp_path):
    (tmp_path / "in").mkdir()
    f = non_utf8(tmp_path / "in")
    code, _, err = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "-f", "txt", "--model", MISTRAL, "-q")
    assert code == 0 and "1 transcribed" in err
    (rec,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert (rec["id"], rec["path"], rec["error"]) == (f.stem, str(f.resolve()), None)
    assert b"caf\xe9.txt" in os.listdir(os.fsencode(tmp_path / "out"))
    assert "1 already done" in cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--model", MISTRAL)[2]


# --- 2: manifest ids that cannot name files ---------------------------------------------------------------
@pytest.mark.parametrize("id, words", [("a\u0000b", "control character"), ("a\nb", "control character"),
                                       ("\ud800x", "lone surrogate"), ("x" * 300, "too long")])
def test_manifest_ids_that_cannot_name_files_are_refused_up_front(cli, tmp_path, id, words):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"path": str(SPEECH_WAV), "id": id}) + "\n")
    err = one_error_line(*cli("batch", manifest, "-o", tmp_path / "out", "--model", tmp_path / "no_model"))
    assert f"{manifest}:1: id" in err and words in err and not (tmp_path / "out").exists()


def test_a_file_name_too_long_for_its_outputs_is_refused_up_front(cli, tmp_path):
    f = tmp_path / ("x" * 240 + ".wav")                   # fits, but .<id>.json.<pid>.tmp does not
    shutil.copy(SPEECH_WAV, f)
    assert "too long" in one_error_line(*cli("batch", f, "-o", tmp_path / "out", "--model", MISTRAL))


# --- 3: ports ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_a_usage_error(cli, port):
    assert "must be 0..65535" in one_error_line(*cli("serve", "--port", port, "--model", MISTRAL))


# --- 4: NaN in the oracle's dumps -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """A dump of mel and conv1, and a copy with one NaN in mel."""
    from voxtral_ref.apps.cli import main
    d = tmp_path_factory.mktemp("dumps")
    assert main(["dump", "--model", str(MISTRAL), str(SPEECH_WAV), "--out", str(d / "ref.npz"),
                 "--stages", "mel", "conv1"]) == 0
    with np.load(d / "ref.npz") as z:
        tensors = {k: z[k] for k in z.files}
    tensors["mel"][3, 5] = np.nan
    np.savez(d / "nan.npz", **tensors)
    return d


@pytest.mark.parametrize("ref, other, side", [("nan", "ref", "REF"), ("ref", "nan", "OTHER")])
def test_compare_fails_on_nan_on_either_side(cli, dumps, ref, other, side):
    code, out, _ = cli("compare", dumps / f"{ref}.npz", dumps / f"{other}.npz")
    (mel,) = [line for line in out.splitlines() if line.split()[1:2] == ["mel"]]
    assert code == 1 and "FAIL" in mel and f"{side} holds 1 NaN or infinite values" in mel
    assert "verdict: the first divergence is mel, first at row 5" in out


def test_compare_fails_on_nan_in_the_baseline(cli, dumps):
    code, out, _ = cli("compare", dumps / "ref.npz", dumps / "ref.npz", "--baseline", dumps / "nan.npz")
    assert code == 1 and "BASE holds 1 NaN or infinite values" in out


def test_check_stage_refuses_a_nan_input(cli, dumps):
    err = one_error_line(*cli("check-stage", "conv1", "--input", dumps / "nan.npz", "--model", MISTRAL))
    assert "the port's mel holds 1 NaN or infinite values" in err


# --- 5: audio cut short -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("AIFF", "PCM_16")])
def test_audio_cut_short_is_transcribed_with_a_warning(cli, tmp_path, fmt, subtype):
    whole, cut = tmp_path / f"whole.{fmt.lower()}", tmp_path / f"cut.{fmt.lower()}"
    sf.write(whole, sf.read(SPEECH_WAV, dtype="int16")[0], 16000, format=fmt, subtype=subtype)
    cut.write_bytes(whole.read_bytes()[:-1000])
    code, out, err = cli("transcribe", cut, "--model", MISTRAL)
    assert code == 0 and out and err.startswith(f"voxtral-ref: warning: {cut} is cut short") and err.count("\n") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_audio(whole)                                  # whole: no warning


# --- 6: a header that declares more audio than fits in memory ---------------------------------------------
def test_an_absurd_header_is_that_files_error_only(cli, tmp_path, transcript):
    """The file is read a block at a time to its end (audio.frame_blocks), not into what its header declares
    (a 256 GiB allocation); libsndfile then fails where the frames run out: that file's error only."""
    flac = tmp_path / "huge.flac"
    sf.write(flac, sf.read(SPEECH_WAV, dtype="int16")[0], 16000)
    b = bytearray(flac.read_bytes())
    b[21] |= 0x0F                                          # STREAMINFO's 36-bit total samples: 2**36 - 1
    b[22:26] = b"\xff\xff\xff\xff"
    flac.write_bytes(bytes(b))
    code, out, err = cli("transcribe", SPEECH_WAV, flac, SPEECH_WAV, "--model", MISTRAL)
    assert code == 2 and out.count(transcript) == 2
    assert err.startswith(f"voxtral-ref: error: cannot decode {flac} (") and err.count("\n") == 1, err


# --- 7: several files to stdout ---------------------------------------------------------------------------
def test_several_json_transcripts_name_their_files(cli, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\0\0\0\0WAVEnot really")
    code, out, err = cli("transcribe", SPEECH_WAV, bad, SPEECH_WAV.parent / "." / SPEECH_WAV.name, "-f", "json",
                         "--model", MISTRAL)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 2 and "bad.wav" in err
    assert [j["path"] for j in lines] == [str(SPEECH_WAV), str(SPEECH_WAV.parent / "." / SPEECH_WAV.name)]
    assert set(lines[0]) == {"path", "text", "segments", "token_ids", "delay_ms"}


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_several_subtitle_files_to_stdout_are_refused(cli, fmt):
    err = one_error_line(*cli("transcribe", SPEECH_WAV, SPEECH_WAV, "-f", fmt, "--model", "no/model"))
    assert "add -o DIR" in err


# --- 8: channels ------------------------------------------------------------------------------------------
def test_too_many_channels_in_a_file(cli, tmp_path):
    f = tmp_path / "ch17.wav"
    sf.write(f, np.zeros((1600, 17), np.float32), 16000, subtype="PCM_16")
    err = one_error_line(*cli("transcribe", f, "--model", MISTRAL))
    assert "ch17.wav has 17 channels" in err and "-ac 1" in err and "audio.T" not in err


# --- 9: misleading messages -------------------------------------------------------------------------------
def test_map_is_a_file(cli, dumps):
    err = one_error_line(*cli("compare", dumps / "ref.npz", dumps / "ref.npz", "--map", '{"a": "mel"}'))
    assert "--map takes a JSON file" in err
    assert 'a JSON file {"their name": "our name"}' in " ".join(cli("compare", "--help")[1].split())


def test_empty_stdin(cli, monkeypatch):
    fake_stdin(monkeypatch, b"")
    assert "stdin was empty" in one_error_line(*cli("transcribe", "-", "--model", MISTRAL))


# --- 10: VOXTRAL_REF_THREADS ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-2", "abc"])
def test_threads_from_the_environment_below_one_are_ignored_with_a_warning(monkeypatch, value):
    from voxtral_ref.runtime import ckernels
    if not ckernels.available():
        pytest.skip("the C kernels are not built")
    before = ckernels.get_threads()
    monkeypatch.setenv("VOXTRAL_REF_THREADS", value)
    try:
        with pytest.warns(UserWarning, match=f"ignoring VOXTRAL_REF_THREADS='{value}'"):
            ckernels._configure_from_env()
        assert ckernels.get_threads() == ckernels._default_threads()
    finally:
        ckernels.set_threads(before)


# --- 11: dump into a folder -------------------------------------------------------------------------------
def test_dump_refuses_a_folder_of_other_files_and_redumps_into_its_own(cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "audio.npy").write_text("my data")
    err = one_error_line(*cli("dump", "--model", MISTRAL, SPEECH_WAV, "--out", mine))
    assert "not an earlier dump" in err and (mine / "audio.npy").read_text() == "my data"
    d = tmp_path / "dump"
    assert cli("dump", "--model", MISTRAL, SPEECH_WAV, "--out", d, "--stages", "mel", "conv1")[0] == 0
    assert cli("dump", "--model", MISTRAL, SPEECH_WAV, "--out", d, "--stages", "mel")[0] == 0
    assert sorted(p.name for p in d.iterdir()) == ["__metadata__.json", "mel.npy"]     # no stale conv1
