"""voxtral-ref dump / compare / explain (voxtral_ref/apps/oracle.py), on the tiny checkpoint against the HF
transformers tensors: golden/cases once they exist, else the earlier oracle run in /tmp/oracle, whose HF
hook names differ from ours (so it exercises --map)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import soundfile as sf

import voxtral_ref
from voxtral_ref import VoxtralError
from voxtral_ref.apps import cli, oracle
from voxtral_ref.runtime import kernels
from voxtral_ref.stages import decoder, mel

from conftest import GOLDEN, MODEL_DIRS, golden_cases, load_case

DOCS = Path(__file__).resolve().parent.parent / "docs" / "tensors.md"
EARLY_ORACLE = Path("/tmp/oracle")
EARLY_ORACLE_MAP = {                           # its HF hook names -> ours
    "conv_stem_out": "conv2", "encoder_layer{i}_out": "encoder.layers.{i}", "projector_in": "adapter_in",
    "projector_out": "adapter_out", "decoder_inputs_embeds": "decoder_in",
    "decoder_layer{i}_ada_scale": "decoder.layers.{i}.ada_scale", "decoder_layer{i}_out": "decoder.layers.{i}",
    "decoder_final_norm_out": "final_norm",
}
# The tiny model has 2 encoder and 2 decoder layers: the complete dump, in pipeline order.
TINY_NAMES = [
    "audio", "padded_audio", "mel", "conv1", "conv2", "encoder.layers.0", "encoder.layers.1", "encoder_out",
    "adapter_in", "adapter_out", "t_cond", "decoder.layers.0.ada_scale", "decoder.layers.1.ada_scale",
    "prompt_ids", "decoder_in", "decoder.layers.0", "decoder.layers.1", "final_norm", "logits", "token_ids",
]


def run(capsys, *argv):
    """voxtral-ref as a user runs it -> (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny checkpoint, one audio file and HF's tensors for it (+ the name map they need)."""
    d = tmp_path_factory.mktemp("oracle")
    cases = [name for name, meta in golden_cases() if not meta.get("batch")]
    if cases:
        g = load_case(cases[0])
        model, ref, names = MODEL_DIRS["hf"], GOLDEN / "cases" / f"{cases[0]}.npz", None
    elif (EARLY_ORACLE / "tensors.npz").exists():
        g = dict(np.load(EARLY_ORACLE / "tensors.npz"))
        g["delay_ms"] = 480
        model, ref, names = EARLY_ORACLE / "model", EARLY_ORACLE / "tensors.npz", d / "map.json"
        names.write_text(json.dumps(EARLY_ORACLE_MAP))
    else:
        pytest.skip("no HF tensors: run golden/make_golden.py")
    wav = d / "audio.wav"
    sf.write(wav, g["audio"], 16000, subtype="FLOAT")            # lossless: the dump sees HF's samples
    dump = d / "dump.safetensors"
    assert cli.main(["dump", "--model", str(model), str(wav), "--out", str(dump), "--backend", "numpy",
                     "--delay-ms", str(int(g["delay_ms"]))]) == 0
    return SimpleNamespace(model=model, wav=wav, delay_ms=int(g["delay_ms"]), ref=ref, map=names, dump=dump,
                           dir=d, tensors=oracle.load_tensors(dump))


def safetensors_metadata(path):
    """The header's __metadata__, read by hand (the format: u64 length, then JSON)."""
    raw = Path(path).read_bytes()
    return json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]


# --- dump -------------------------------------------------------------------------------------------------
def test_dump_names_are_pinned(tiny):
    t = tiny.tensors
    assert list(t) == TINY_NAMES == oracle.stage_names(voxtral_ref.load(tiny.model).cfg)
    assert {n: a.dtype for n, a in t.items() if a.dtype != np.float32} == {"prompt_ids": np.int64, "token_ids": np.int64}
    n_pos = len(t["prompt_ids"]) + len(t["token_ids"]) - 1         # the last generated token is never fed back
    assert {t[n].shape[0] for n in ("decoder_in", "decoder.layers.0", "final_norm", "logits")} == {n_pos}
    n_mel = t["mel"].shape[1]
    assert t["mel"].shape[0] == 128 and t["conv1"].shape[0] == n_mel and t["conv2"].shape[0] == n_mel // 2
    assert t["adapter_in"].shape[0] == t["adapter_out"].shape[0] == n_mel // 8
    meta = safetensors_metadata(tiny.dump)
    assert meta["format"] == "hf" and meta["delay_ms"] == str(tiny.delay_ms) and meta["backend"] == "numpy"
    assert meta["model"] == str(tiny.model) and meta["voxtral_ref_version"]


def test_dump_stages_selects_by_prefix_and_glob(tiny, capsys):
    out = tiny.dir / "some.safetensors"
    rc, _, _ = run(capsys, "dump", "--model", tiny.model, tiny.wav, "--out", out, "--backend", "numpy",
                   "--stages", "encoder", "decoder.layers.*.ada_scale", "decoder.layers.1")
    assert rc == 0
    assert list(oracle.load_tensors(out)) == ["encoder.layers.0", "encoder.layers.1", "encoder_out",
                                              "decoder.layers.0.ada_scale", "decoder.layers.1.ada_scale",
                                              "decoder.layers.1"]


def test_dump_stages_matching_nothing_is_an_error(tiny, capsys):
    rc, out, err = run(capsys, "dump", "--model", tiny.model, tiny.wav, "--out", tiny.dir / "x.safetensors",
                       "--backend", "numpy", "--stages", "encoder.layer")
    assert rc == 2 and out == "" and "'encoder.layer' matches no tensor" in err


# --- compare ----------------------------------------------------------------------------------------------
def test_dump_compared_with_itself_passes(tiny, capsys):
    rc, out, _ = run(capsys, "compare", tiny.dump, tiny.dump)
    assert rc == 0
    assert f"{len(TINY_NAMES)} compared, 0 over tolerance" in out and "FAIL" not in out


def test_npz_and_npy_folder_inputs(tiny, capsys):
    npz, folder = tiny.dir / "dump.npz", tiny.dir / "npy"
    np.savez(npz, **tiny.tensors)
    folder.mkdir()
    for name, a in tiny.tensors.items():
        np.save(folder / f"{name}.npy", a)
    rc, out, _ = run(capsys, "compare", npz, folder)
    assert rc == 0 and f"{len(TINY_NAMES)} compared, 0 over tolerance" in out


def perturbed(tiny, **changes):
    """The dump with some tensors changed, as a .npz."""
    t = {**tiny.tensors, **changes}
    path = tiny.dir / "perturbed.npz"
    np.savez(path, **t)
    return path


def test_perturbed_stage_is_reported_as_the_first_divergence(tiny, capsys):
    t = tiny.tensors
    bump = {n: t[n] + np.float32(0.01) * np.abs(t[n]).max() for n in ("encoder.layers.1", "adapter_out", "logits")}
    rc, out, _ = run(capsys, "compare", tiny.dump, perturbed(tiny, **bump))
    assert rc == 1
    marked = [line for line in out.splitlines() if line.startswith(">> ")]
    assert len(marked) == 1 and marked[0].split()[1] == "encoder.layers.1" and marked[0].endswith("FAIL")
    assert out.splitlines()[-1].endswith("3 over tolerance (|err| <= 0 + 0.0001 * max|ref|; token ids exact); "
                                         "first divergence: encoder.layers.1")


def test_error_within_tolerance_passes_and_tolerance_flags_work(tiny, capsys):
    logits = tiny.tensors["logits"]
    other = perturbed(tiny, logits=logits + np.float32(1e-3) * np.abs(logits).max())
    assert run(capsys, "compare", tiny.dump, other)[0] == 1
    assert run(capsys, "compare", tiny.dump, other, "--rtol", "2e-3")[0] == 0
    assert run(capsys, "compare", tiny.dump, other, "--atol", "1")[0] == 0


def test_token_ids_are_compared_exactly(tiny, capsys):
    ids = tiny.tensors["token_ids"]
    changed = ids.copy()
    changed[3] += 1
    rc, out, _ = run(capsys, "compare", tiny.dump, perturbed(tiny, token_ids=changed))
    assert rc == 1 and f"1 ids differ, the first at 3: {ids[3]} vs {ids[3] + 1}" in out
    rc, out, _ = run(capsys, "compare", tiny.dump, perturbed(tiny, token_ids=ids[:-1]))
    assert rc == 1 and "first divergence: token_ids" in out


def test_matches_the_hf_oracle(tiny, capsys):
    """HF's teacher-forced forward covers positions 0..L-1, our decoding 0..L-2: compared over the common
    length, every stage within the default tolerance."""
    rc, out, _ = run(capsys, "compare", tiny.ref, tiny.dump, *(["--map", tiny.map] if tiny.map else []))
    assert rc == 0, out
    n_pos = len(tiny.tensors["logits"])
    compared = {line.split()[0]: line for line in out.splitlines()[3:] if line.startswith("   ")}
    assert {"mel", "conv2", "encoder.layers.1", "adapter_out", "t_cond", "decoder.layers.1.ada_scale",
            "decoder_in", "decoder.layers.1", "final_norm", "logits"} <= set(compared)
    assert f"first {n_pos} of {n_pos + 1} / {n_pos} along axis 0" in compared["logits"]


def test_compare_reading_errors(tiny, capsys):
    rc, _, err = run(capsys, "compare", tiny.dump, tiny.dir / "missing.npz")
    assert rc == 2 and "missing file" in err
    other = tiny.dir / "other_names.npz"
    np.savez(other, something=np.zeros(3, np.float32))
    rc, _, err = run(capsys, "compare", tiny.dump, other)
    assert rc == 2 and "no tensor name in common" in err


BUGS = {   # a typical porting bug -> the stage compare must blame (measured sizes: docs/tensors.md)
    "mel floored at -8 instead of -6.5": ("mel", lambda: mock.patch.object(mel, "LOG_MEL_FLOOR", -8.0)),
    "attention window one frame too wide": ("encoder.layers.0", lambda: mock.patch.object(
        kernels, "attention_np", lambda q, k, v, qp, kp, w, f=kernels.attention_np: f(q, k, v, qp, kp, w + 1))),
    "t_cond with the sin half first": ("t_cond", lambda: mock.patch.object(
        decoder, "time_embedding", lambda n, d, f=decoder.time_embedding: np.roll(f(n, d), d // 2))),
}


@pytest.mark.parametrize("bug", BUGS)
def test_typical_bugs_are_blamed_on_their_stage(tiny, bug):
    stage, patch = BUGS[bug]
    ref = oracle.rename(oracle.load_tensors(tiny.ref), oracle.load_name_map(tiny.map) if tiny.map else [])
    audio, sr = sf.read(tiny.wav, dtype="float32")
    with patch():
        _, ours, _ = oracle.capture(voxtral_ref.load(tiny.model, backend="numpy"), audio, sr, tiny.delay_ms)
    rows, _, _ = oracle.compare_all(ref, ours, 1e-4, 0)
    assert next(r.name for r in rows if not r.ok) == stage


# --- compare, the pieces ----------------------------------------------------------------------------------
def test_name_map_carries_layer_numbers(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"blk{i}.out": "encoder.layers.{i}", "mel_spec": "mel"}))
    rules = oracle.load_name_map(path)
    assert list(oracle.rename({"blk12.out": 1, "mel_spec": 2, "logits": 3}, rules)) == ["encoder.layers.12", "mel", "logits"]
    with pytest.raises(VoxtralError, match="mapped to"):
        oracle.rename({"mel_spec": 1, "mel": 2}, rules)


def test_shapes_batch_dims_and_time_axes():
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    assert oracle.compare_tensor("conv1", x, x[None], 1e-4, 0).note == "batch dim dropped"
    transposed = oracle.compare_tensor("conv1", x, x.T.copy(), 1e-4, 0)
    assert not transposed.ok and "transposed" in transposed.note
    mel = np.ones((128, 16), np.float32)
    assert oracle.compare_tensor("mel", mel, mel[:, :8], 1e-4, 0).note == "first 8 of 16 / 8 along axis 1"
    assert not oracle.compare_tensor("t_cond", x[0], x[0, :2], 1e-4, 0).ok          # constants have no time axis
    nan = x.copy()
    nan[0, 0] = np.nan
    assert not oracle.compare_tensor("conv1", x, nan, 1e-4, 0).ok


def test_pipeline_order_puts_layers_by_number():
    names = ["logits", "encoder.layers.10", "decoder.layers.2.ada_scale", "zzz", "encoder.layers.9", "mel"]
    assert oracle.pipeline_order(names) == ["mel", "encoder.layers.9", "encoder.layers.10",
                                            "decoder.layers.2.ada_scale", "logits", "zzz"]


# --- explain ----------------------------------------------------------------------------------------------
def test_explain_walks_every_stage(tiny, capsys):
    rc, out, _ = run(capsys, "explain", "--model", tiny.model, tiny.wav, "--backend", "numpy")
    assert rc == 0
    rows = [line.split()[0] for line in out.splitlines()[2:] if not line.startswith(("#", "text:"))]
    assert rows == TINY_NAMES
    for stage in oracle.STAGES:
        assert f"# {stage.what}" in out
    assert "[128, " in out and " ms  min " in out and out.splitlines()[-1].startswith("text: ")


def test_explain_plot_is_a_png(tiny, capsys):
    pytest.importorskip("matplotlib")
    png = tiny.dir / "plot.png"
    rc, _, err = run(capsys, "explain", "--model", tiny.model, tiny.wav, "--backend", "numpy", "--plot", png)
    assert rc == 0 and str(png) in err
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    assert width >= 800 and height == 500 and len(raw) > 20_000


def test_explain_plot_without_matplotlib_says_what_to_install(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import matplotlib -> ImportError
    rc, out, err = run(capsys, "explain", "--model", tiny.model, tiny.wav, "--plot", tiny.dir / "no.png")
    assert rc == 2 and out == "" and "pip install 'voxtral_ref[plot]'" in err


# --- docs -------------------------------------------------------------------------------------------------
def test_docs_name_every_stage():
    text = DOCS.read_text(encoding="utf-8")
    for stage in oracle.STAGES:
        assert f"`{stage.pattern}`" in text, stage.pattern
