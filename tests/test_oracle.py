"""voxtral-ref dump / compare / check-stage / explain (voxtral_ref/apps/oracle/), on the tiny checkpoint against the HF
transformers tensors: golden/cases once they exist, else the earlier oracle run in /tmp/oracle, whose HF
hook names differ from ours (so it exercises --map)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

import voxtral_ref
from voxtral_ref import VoxtralError
from voxtral_ref.apps import cli, oracle
from voxtral_ref.apps.oracle import explain
from voxtral_ref.apps.oracle.compare import Context

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
    assert "3 over tolerance (|err| <= 0 + 0.0001 * max|ref| per row; token ids exact)" in out
    assert out.splitlines()[-1] == "verdict: the first divergence is encoder.layers.1, first at row 0 (0 ms)"


def test_error_within_tolerance_passes_and_tolerance_flags_work(tiny, capsys):
    logits = tiny.tensors["logits"]
    other = perturbed(tiny, logits=logits + np.float32(1e-3) * np.abs(logits).max(1, keepdims=True))
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
    assert rc == 1 and "first divergence is token_ids" in out and "near tie" in out


def test_matches_the_hf_oracle(tiny, capsys):
    """HF's teacher-forced forward covers positions 0..L-1, our decoding 0..L-2: compared over the common
    length, every stage within the default tolerance."""
    rc, out, _ = run(capsys, "compare", tiny.ref, tiny.dump, *(["--map", tiny.map] if tiny.map else []))
    assert rc == 0, out
    n_pos = len(tiny.tensors["logits"])
    compared = {line.split()[0]: line for line in out.splitlines()[3:] if line.startswith("   ")}
    assert {"mel", "conv2", "encoder.layers.1", "adapter_out", "t_cond", "decoder.layers.1.ada_scale",
            "decoder_in", "decoder.layers.1", "final_norm", "logits"} <= set(compared)
    assert f"first {n_pos} of {n_pos + 1} / {n_pos} positions (HF's teacher-forced forward has one more)" \
        in compared["logits"]


def test_compare_reading_errors(tiny, capsys):
    rc, _, err = run(capsys, "compare", tiny.dump, tiny.dir / "missing.npz")
    assert rc == 2 and "missing file" in err
    other = tiny.dir / "other_names.npz"
    np.savez(other, something=np.zeros(3, np.float32))
    rc, _, err = run(capsys, "compare", tiny.dump, other)
    assert rc == 2 and "no tensor name in common" in err


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
    short = oracle.compare_tensor("mel", mel, mel[:, :8], 1e-4, 0)            # strict: no silent cropping
    assert not short.ok and short.note == "8 rows along axis 1, expected [128, 16] = [128, T], T = N' / 160"
    assert not oracle.compare_tensor("t_cond", x[0], x[0, :2], 1e-4, 0).ok          # constants have no time axis
    nan = x.copy()
    nan[0, 0] = np.nan
    assert not oracle.compare_tensor("conv1", x, nan, 1e-4, 0).ok


def test_pipeline_order_puts_layers_by_number():
    names = ["logits", "encoder.layers.10", "decoder.layers.2.ada_scale", "zzz", "encoder.layers.9", "mel"]
    assert oracle.pipeline_order(names) == ["mel", "encoder.layers.9", "encoder.layers.10",
                                            "decoder.layers.2.ada_scale", "logits", "zzz"]


# --- blame by position, strict shapes ---------------------------------------------------------------------
def test_first_bad_row_and_its_time(tiny, capsys):
    """An error from encoder frame 100 on: the row, its time on the padded clock (20 ms per frame), the worst
    row; logits wrong from position 30 (2400 ms, later audio than frame 100's 2000 ms) do not take the blame,
    logits wrong from position 0 do (position 0 cannot depend on frame 100)."""
    t = tiny.tensors
    enc = t["encoder.layers.1"].copy()
    enc[100:] += np.float32(0.01) * np.abs(enc[100:]).max(1, keepdims=True)
    enc[150] *= 2
    logits = t["logits"].copy()
    logits[30:] += np.float32(0.01) * np.abs(t["logits"]).max()                   # decoder positions: 80 ms each
    rc, out, _ = run(capsys, "compare", tiny.dump, perturbed(tiny, **{"encoder.layers.1": enc, "logits": logits}))
    row = next(line for line in out.splitlines() if line.split()[1:2] == ["encoder.layers.1"])
    assert rc == 1 and row.startswith(">> ") and "100 (2000 ms)" in row and "150 (3000 ms)" in row
    assert out.splitlines()[-1] == "verdict: the first divergence is encoder.layers.1, first at row 100 (2000 ms)"
    logits[:30] += 1.0
    rc, out, _ = run(capsys, "compare", tiny.dump, perturbed(tiny, **{"encoder.layers.1": enc, "logits": logits}))
    assert out.splitlines()[-2] == "verdict: the first divergence is logits, first at row 0 (0 ms)"


def test_decoder_rows_are_compared_up_to_the_first_differing_token(tiny):
    """A changed token k changes what is fed at position P + k: decoder rows from there on are not compared."""
    t = dict(tiny.tensors)
    p, k = len(t["prompt_ids"]), 5
    ids = t["token_ids"].copy()
    ids[k] += 1
    din = t["decoder_in"].copy()
    din[p + k:] += 1.0                                   # what feeding the other id does
    rows, _, _, ctx = oracle.compare_all(t, {**t, "token_ids": ids, "decoder_in": din}, 1e-4, 0)
    assert ctx.id_limit == p + k
    row = {r.name: r for r in rows}
    assert row["decoder_in"].ok and "positions from 44 on not compared" in row["decoder_in"].note
    v, hint = oracle.verdict(rows, ctx)
    assert (v.name, v.first) == ("token_ids", k) and "near tie" in hint and "--force-ids" in hint


def test_only_documented_shape_differences_are_cropped():
    ctx = Context(n_prompt=3)
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    hf = oracle.compare_tensor("decoder_in", x, np.concatenate([x, x[:1]]), 1e-4, 0, ctx)    # HF: one row more
    assert hf.ok and hf.note == "first 10 of 10 / 11 positions (HF's teacher-forced forward has one more)"
    two = oracle.compare_tensor("decoder_in", x, np.concatenate([x, x[:2]]), 1e-4, 0, ctx)
    assert not two.ok and two.note == "12 rows along axis 0, expected [10, 4] = [L-1, D], L = P + len(token_ids)"
    per_step = oracle.compare_tensor("logits", x, x[2:], 1e-4, 0, ctx)                   # rows P-1.. only
    assert per_step.ok and "one logits row per step" in per_step.note
    wrong = x[2:].copy()
    wrong[3] += 1
    assert oracle.compare_tensor("logits", x, wrong, 1e-4, 0, ctx).first == 5             # REF's numbering
    enc = oracle.compare_tensor("encoder.layers.0", x, x[:9], 1e-4, 0, ctx)
    assert not enc.ok and enc.note == "9 rows along axis 0, expected [10, 4] = [T/2, C]"
    audio = oracle.compare_tensor("padded_audio", x[:, 0], x[:9, 0], 1e-4, 0, ctx)
    assert not audio.ok and "N' = 40960 + N + align + (d + 11) * 1280" in audio.note


def test_mel_with_one_frame_more_fails_with_the_formula(tiny, capsys):
    mel = tiny.tensors["mel"]
    rc, out, _ = run(capsys, "compare", tiny.dump, perturbed(tiny, mel=np.concatenate([mel, mel[:, -1:]], 1)))
    assert rc == 1 and f"expected [128, {mel.shape[1]}] = [128, T], T = N' / 160" in out


# --- robustness (issue 15): one clear line, never a traceback or a silent pass -----------------------------
@pytest.mark.parametrize("flag,value", [("--rtol", "nan"), ("--atol", "inf"), ("--rtol", "-1"), ("--atol", "x")])
def test_tolerances_must_be_finite(tiny, capsys, flag, value):
    rc, out, err = run(capsys, "compare", tiny.dump, tiny.dump, flag, value)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and flag in err


def test_nan_in_the_port_fails_whatever_the_tolerance(tiny, capsys):
    enc = tiny.tensors["encoder_out"].copy()
    enc[7, 3] = np.nan
    rc, out, _ = run(capsys, "compare", tiny.dump, perturbed(tiny, encoder_out=enc), "--atol", "1e30")
    assert rc == 1 and "first divergence is encoder_out, first at row 7" in out


def test_unreadable_inputs_are_one_line(tiny, capsys):
    empty = tiny.dir / "empty.npz"
    np.savez(empty)
    text = tiny.dir / "text.npz"
    text.write_text("not a zip")
    pickled = tiny.dir / "objects.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    torch_file = tiny.dir / "port.pt"
    torch_file.write_bytes(b"\x80\x02")
    for path, msg in ((empty, "holds no tensors"), (text, "cannot read tensors"), (pickled, "cannot read tensors"),
                      (torch_file, "cannot read this kind of file"), (tiny.dir / "nope.npz", "missing file")):
        rc, out, err = run(capsys, "compare", tiny.dump, path)
        assert rc == 2 and out == "" and msg in err and len(err.splitlines()) == 1, err


def test_string_and_complex_tensors_fail_with_a_reason(tiny, capsys):
    t = tiny.tensors
    other = perturbed(tiny, t_cond=np.array(["x"] * len(t["t_cond"])), mel=t["mel"].astype(np.complex64))
    rc, out, _ = run(capsys, "compare", tiny.dump, other)
    lines = {line.split()[1] if line.startswith(">> ") else line.split()[0]: line for line in out.splitlines()[3:]}
    assert rc == 1 and "OTHER is not numeric (dtype <U1)" in lines["t_cond"]
    assert "OTHER is complex (complex64)" in lines["mel"] and "FAIL" in lines["mel"]


# --- dump: formats, metadata, modes -----------------------------------------------------------------------
def dump(capsys, tiny, out, *extra):
    return run(capsys, "dump", "--model", tiny.model, tiny.wav, "--out", out, "--backend", "numpy",
               "--delay-ms", tiny.delay_ms, *extra)


@pytest.mark.parametrize("out", ["d.npz", "d.safetensors", "npy_dir"])
def test_dump_writes_what_the_suffix_says_with_metadata(tiny, capsys, out):
    path = tiny.dir / "formats" / out
    path.parent.mkdir(exist_ok=True)
    rc, _, err = dump(capsys, tiny, path, "--stages", "encoder_out", "prompt_ids")
    assert rc == 0 and str(path) in err
    tensors, meta = oracle.load_tensors(path, with_metadata=True)
    assert list(tensors) == ["encoder_out", "prompt_ids"] and meta["encoder_window"] == "48"
    assert meta["n_prompt"] == "39" and meta["precision"] == "f32" and meta["quantize"] == "None"
    if out == "npy_dir":
        assert sorted(f.name for f in path.iterdir()) == ["__metadata__.json", "encoder_out.npy", "prompt_ids.npy"]
    else:
        assert path.read_bytes()[:2] == (b"PK" if out.endswith(".npz") else path.read_bytes()[:2])


def test_dump_refuses_what_it_cannot_write(tiny, capsys):
    for out, msg in ((tiny.dir / "x.pt", "cannot write '.pt' files"),
                     (tiny.dir / "no" / "such" / "x.npz", "does not exist"),
                     (tiny.wav, "cannot write '.wav' files"),
                     (Path(tiny.model) / next(Path(tiny.model).glob("*.safetensors")).name, "overwrite an input")):
        rc, out_, err = dump(capsys, tiny, out)
        assert rc == 2 and out_ == "" and msg in err, err
    rc, _, err = dump(capsys, tiny, tiny.dir / "q.npz", "--quantize", "bogus")
    assert rc == 2 and "quantize" in err and "'bogus'" in err and len(err.splitlines()) == 1


def test_dump_precision_and_quantize_make_a_baseline(tiny, capsys):
    base = tiny.dir / "bf16.npz"
    assert dump(capsys, tiny, base, "--precision", "bf16", "--quantize", "int8")[0] == 0
    meta = oracle.load_tensors(base, with_metadata=True)[1]
    assert (meta["precision"], meta["quantize"]) == ("bf16", "int8")
    rc, out, _ = run(capsys, "compare", tiny.dump, base)
    assert rc == 1
    rc, out, _ = run(capsys, "compare", tiny.dump, base, "--baseline", base)
    assert rc == 0 and "x base" in out and "or <= 2 x the baseline's error" in out


def test_force_ids_keeps_positions_comparable_after_a_token_differs(tiny, capsys):
    t = tiny.tensors
    p, k = len(t["prompt_ids"]), 4
    port_ids = t["token_ids"].copy()
    port_ids[k] = (port_ids[k] + 1) % 2048
    ids_file = tiny.dir / "port_ids.json"
    ids_file.write_text(json.dumps({"token_ids": port_ids.tolist()}))          # transcribe -f json's shape
    forced = tiny.dir / "forced.npz"
    rc, _, err = dump(capsys, tiny, forced, "--force-ids", ids_file)
    assert rc == 0 and f"first differs at token {k}: {t['token_ids'][k]} where the port fed {port_ids[k]}" in err
    f = oracle.load_tensors(forced)
    assert np.array_equal(f["token_ids"], port_ids) and f["logits"].shape == t["logits"].shape
    for name in ("decoder_in", "decoder.layers.1", "logits"):                  # identical before P + k ...
        assert np.array_equal(f[name][:p + k], t[name][:p + k]), name
    assert not np.allclose(f["decoder_in"][p + k], t["decoder_in"][p + k])     # ... fed the port's id there
    ours = tiny.dir / "ours.json"
    ours.write_text(json.dumps(t["token_ids"].tolist()))
    assert dump(capsys, tiny, tiny.dir / "same.npz", "--force-ids", ours)[0] == 0
    same = oracle.load_tensors(tiny.dir / "same.npz")
    assert all(np.array_equal(same[n], t[n]) for n in t)                       # forcing our own ids changes nothing


def test_force_ids_bad_files(tiny, capsys):
    for content, msg in (("[1, 2.5]", "integer ids"), ("[]", "integer ids"), ("[99999]", "every id must be in"),
                         (json.dumps([5] * 1000), "positions for")):
        path = tiny.dir / "bad_ids.json"
        path.write_text(content)
        rc, out, err = dump(capsys, tiny, tiny.dir / "f.npz", "--force-ids", path)
        assert rc == 2 and msg in err, err


def test_stream_dump_records_timing_and_equals_offline(tiny, capsys):
    out = tiny.dir / "stream.npz"
    rc, lines, _ = dump(capsys, tiny, out, "--stream", "--chunk", "1000")
    records = [json.loads(line) for line in lines.splitlines()]
    t = tiny.tensors
    p = len(t["prompt_ids"])
    assert rc == 0 and [r["id"] for r in records] == t["token_ids"].tolist()
    assert [r["position"] for r in records] == list(range(p - 1, p - 1 + len(records)))
    n, d = len(t["audio"]), p - 33
    for r in records:   # token k comes out in the first step with 1280 (d + 1 + k) + 40 samples (README, Streaming)
        need = 1280 * (d + 1 + r["token"]) + 40
        if r["at_close"]:                                       # only the right padding completes it
            assert need > n and r["samples_fed"] == n
        else:
            assert need <= r["samples_fed"] < need + 1000 and r["samples_fed"] in (n, 1000 * -(-need // 1000))
    # the margin is the top-two gap of the row that chose the id: offline's row P - 1 + k
    offline = explain.margins(t["logits"])[p - 1:p - 1 + len(records)]
    np.testing.assert_allclose([r["margin"] for r in records], offline, atol=1e-4 * np.abs(t["logits"]).max())
    rc, report, _ = run(capsys, "compare", tiny.dump, out)
    assert rc == 0 and "decoder.layers.1" in report


def test_attention_maps_are_opt_in_and_are_distributions(tiny, capsys):
    out = tiny.dir / "att.npz"
    assert dump(capsys, tiny, out, "--attention", "--stages", "encoder.layers.0.attention",
                "decoder.layers.1.attention")[0] == 0
    a = oracle.load_tensors(out)
    enc, dec = a["encoder.layers.0.attention"], a["decoder.layers.1.attention"]
    n_enc, n_dec = tiny.tensors["conv2"].shape[0], tiny.tensors["decoder_in"].shape[0]
    assert enc.shape == (4, n_enc, n_enc) and dec.shape == (4, n_dec, n_dec)
    for m, window in ((enc, 48), (dec, 24)):
        np.testing.assert_allclose(m.sum(-1), 1, atol=1e-5)
        q, k = np.indices(m.shape[1:])
        assert not m[:, (k > q) | (k <= q - window)].any()                   # causal, sliding window
    assert "encoder.layers.0.attention" not in tiny.tensors                   # opt-in only


# --- check-stage ------------------------------------------------------------------------------------------
def test_check_stage_runs_one_stage_on_the_ports_input(tiny, capsys):
    t = tiny.tensors
    enc1 = t["encoder.layers.1"] + np.float32(0.01) * np.abs(t["encoder.layers.1"]).max(1, keepdims=True)
    port = perturbed(tiny, **{"encoder.layers.1": enc1})
    ok = run(capsys, "check-stage", "encoder_out", "--input", tiny.dump, "--model", tiny.model, "--backend", "numpy")
    assert ok[0] == 0 and "the final norm on encoder.layers.1" in ok[1]
    rc, out, _ = run(capsys, "check-stage", "encoder.layers.1", "--input", port, "--model", tiny.model)
    assert rc == 1 and "verdict: the first divergence is encoder.layers.1, first at row 0" in out
    rc, _, err = run(capsys, "check-stage", "decoder.layers.7", "--input", port, "--model", tiny.model)
    assert rc == 2 and "has no decoder.layers.7" in err
    rc, _, err = run(capsys, "check-stage", "token_ids", "--input", port, "--model", tiny.model)
    assert rc == 2 and "check-stage runs one stage" in err


# --- explain ----------------------------------------------------------------------------------------------
def test_explain_walks_every_stage(tiny, capsys):
    rc, out, _ = run(capsys, "explain", "--model", tiny.model, tiny.wav, "--backend", "numpy")
    assert rc == 0
    rows = [line.split()[0] for line in out.splitlines()[2:] if not line.startswith(("#", "text:"))]
    assert rows == TINY_NAMES
    for stage in oracle.STAGES:
        assert (f"# {stage.what}" in out) == ("attention" not in stage.pattern)
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


def test_explain_plot_shades_the_prompt_shows_the_delay_and_labels_hz(tiny):
    """The figure explain --plot saves: Hz on the frequency axis, the prompt's positions shaded, each token
    under the position that emitted it and under the real audio its text is about, the delay apart."""
    t = tiny.tensors
    p, ids, sec = len(t["prompt_ids"]), t["token_ids"], 0.08
    tokenizer = voxtral_ref.load(tiny.model, backend="numpy").tokenizer
    fig = explain.token_figure(t["mel"], ids, p, len(t["audio"]), tokenizer, tiny.delay_ms)
    ax, ax_tok = fig.axes
    hz = explain.band_hz()
    assert hz[0] < 100 and 7000 < hz[127] < 8000 and np.all(np.diff(hz) >= 0)
    assert [x.get_text() for x in ax.get_yticklabels()] == [f"{hz[k]:.0f}" for k in (*range(0, 128, 16), 127)]
    assert "Hz" in ax.get_ylabel()
    (shade,) = ax_tok.patches                                   # the prompt: positions 0..P-1 are fed, not generated
    xs = shade.get_path().transformed(shade.get_patch_transform()).vertices[:, 0]
    assert (xs.min(), xs.max()) == pytest.approx((0, p * sec))
    labels = [x for x in ax_tok.texts if x.get_rotation() == 90]
    emitted = sorted(x.get_position()[0] for x in labels if x.get_position()[1] > 0.5)
    about = sorted(x.get_position()[0] for x in labels if x.get_position()[1] < 0.5)
    k = np.arange(len(ids))
    np.testing.assert_allclose(emitted, (p - 1 + k + 0.5) * sec)           # the slot of position P - 1 + k
    np.testing.assert_allclose(about, 2.56 + (k + 0.5) * sec)              # real audio [80k, 80k + 80) ms
    assert any(x.get_text() == f"delay {tiny.delay_ms} ms" for x in ax_tok.texts)
    marks = {x.get_text().strip(): x.get_position()[0] for x in ax.texts}
    d = tiny.delay_ms // 80                                     # the first token: after (d + 1) tokens of real audio
    assert marks["first output"] == pytest.approx(2.56 + (d + 1) * sec)
    assert marks["audio ends"] == pytest.approx(2.56 + len(t["audio"]) / 16000)


def test_explain_plot_without_matplotlib_says_what_to_install(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import matplotlib -> ImportError
    rc, out, err = run(capsys, "explain", "--model", tiny.model, tiny.wav, "--plot", tiny.dir / "no.png")
    assert rc == 2 and out == "" and "pip install 'voxtral_ref[plot]'" in err


# --- docs -------------------------------------------------------------------------------------------------
def test_docs_name_every_stage():
    text = DOCS.read_text(encoding="utf-8")
    for stage in oracle.STAGES:
        assert f"`{stage.pattern}`" in text, stage.pattern


def test_explain_grid_is_the_delayed_streams_table(tiny, capsys):
    rc, out, _ = run(capsys, "explain", "--model", tiny.model, tiny.wav, "--backend", "numpy", "--grid")
    grid = out[out.index("position  slot"):].splitlines()[1:]
    t = tiny.tensors
    p = len(t["prompt_ids"])
    assert rc == 0 and len(grid) == len(t["logits"])
    first = grid[p - 1].split()                                     # the first emitting position
    assert first[:5] == [str(p - 1), str(80 * (p - 1)), str(80 * p - 2560), "32", str(t["token_ids"][0])]
    assert first[-2:-1] == ["0-80"] or "0-80" in grid[p - 1]


@pytest.mark.parametrize("plot,msg", [("x.wav", "not a picture format"), ("no/such/dir/x.png", "does not exist")])
def test_explain_plot_path_is_checked_first(tiny, capsys, plot, msg):
    pytest.importorskip("matplotlib")
    rc, out, err = run(capsys, "explain", "--model", tiny.model, tiny.wav, "--plot", tiny.dir / plot)
    assert rc == 2 and out == "" and msg in err
