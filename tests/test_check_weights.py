"""voxtral-ref check-weights: a port's converted weights against the tiny checkpoint, across formats and
names, with the typical conversion mistakes planted and named."""

import numpy as np
import pytest

from voxtral_ref.apps.oracle.check_weights import check_weights, format_error, rope_rows
from voxtral_ref.checkpoint.weights import read_safetensors

from conftest import MODEL_DIRS

MISTRAL = MODEL_DIRS["mistral"]
ENC0 = "mm_streams_embeddings.embedding_module.whisper_encoder.transformer.layers.0."


@pytest.fixture(scope="module")
def mistral_tensors():
    return {k: np.asarray(v, np.float32) for k, v in read_safetensors(MISTRAL / "consolidated.safetensors").items()}


def failing(rows):
    return {r.name: r.finding for r in rows if not r.ok}


def test_the_two_formats_agree_across_names_and_rope_layouts():
    """HF's file has split-half q/k rows, Mistral's interleaved pairs: paired by name, both pass both ways."""
    assert failing(check_weights(MISTRAL, MODEL_DIRS["hf"])) == {}
    assert failing(check_weights(MODEL_DIRS["hf"], MISTRAL)) == {}


def test_rope_row_permutation_round_trips():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(rope_rows(rope_rows(w, 8, True), 8, False), w)
    assert rope_rows(np.arange(8.0), 8, True).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]   # pairs (2i, 2i+1) -> (i, i+4)


def test_planted_conversion_mistakes_are_named(tmp_path, mistral_tensors, cli):
    t = dict(mistral_tensors)
    hf_q = read_safetensors(MODEL_DIRS["hf"] / "model.safetensors")["language_model.model.layers.1.self_attn.q_proj.weight"]
    t[ENC0 + "attention.wo.weight"] = t[ENC0 + "attention.wo.weight"].T.copy()       # square: same shape
    t["layers.0.feed_forward.w1.weight"] = t["layers.0.feed_forward.w1.weight"].T.copy()
    t["layers.1.attention.wq.weight"] = np.asarray(hf_q)                               # HF rows under a Mistral name
    t["layers.0.feed_forward.w2.weight"] = t["layers.0.feed_forward.w2.weight"] * 1.5
    t["norm.weight"] = t["norm.weight"] + 0.01
    del t["layers.1.attention.wk.weight"]
    t["extra.weight"] = np.zeros(3, np.float32)
    port = tmp_path / "port.npz"
    np.savez(port, **t)
    got = failing(check_weights(MISTRAL, port))
    assert got == {
        "enc.layers.0.wo": "transposed (a square matrix: same shape, rows and columns swapped)",
        "dec.layers.0.w1": "transposed: stored [in, out], the checkpoint's layout is [out, in]",
        "dec.layers.1.wq": "q/k rows in the other RoPE layout: split halves (HF) where interleaved pairs (Mistral) belong",
        "dec.layers.0.w2": "scaled: the port's tensor is 1.5 x the checkpoint's",
        "dec.norm": "",
        "dec.layers.1.wk": "missing from the port",
        "-": "no tensor of the model has this name: give a --map",
    }
    rc, out, err = cli("check-weights", MISTRAL, port)
    assert rc == 1 and out.splitlines()[-1].startswith("58 tensors, 7 failing")


def test_q4_0_gguf_conversion_is_within_the_formats_error(tmp_path, mistral_tensors, cli):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize
    Q = gguf.GGMLQuantizationType
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(path, "voxtral")
    n_q4 = 0
    for name, v in mistral_tensors.items():
        if v.ndim == 2 and v.shape[1] % 32 == 0:                 # Q4_0 blocks of 32 along each row
            w.add_tensor(name, quantize(v, Q.Q4_0), raw_dtype=Q.Q4_0)
            n_q4 += 1
        else:                                                    # vectors in F16, conv kernels in F32
            w.add_tensor(name, v.astype(np.float16) if v.ndim == 1 else v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rows = check_weights(MISTRAL, path)
    assert all(r.ok for r in rows) and len(rows) == 57
    q4 = [r for r in rows if r.fmt == "Q4_0"]
    assert len(q4) == n_q4 > 20
    assert all(0.05 < r.rel_rms < 0.12 and r.rel_rms <= 1.5 * r.expected for r in q4)   # 4 bits: ~9 % RMS
    assert {r.fmt for r in rows} == {"Q4_0", "F16", "F32"}
    assert format_error(mistral_tensors["norm.weight"], "F32") == 0.0
    rc, out, _ = cli("check-weights", MISTRAL, path)
    assert rc == 0 and out.splitlines()[-1].startswith("57 tensors, 0 failing")
    rc, _, err = cli("check-weights", MISTRAL, tmp_path / "none.gguf")
    assert rc == 2 and "missing file" in err
