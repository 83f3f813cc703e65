"""Fuzz tests that stay: hypothesis mutates the tiny checkpoints' files (the safetensors header, params.json,
config.json, tekken.json) and the audio handed to transcribe, and every mutation must end in one of:
  error      a VoxtralError (one line);
  same       a valid load whose token ids (and text) equal the unmutated checkpoint's;
  meaning    a valid load of a file whose mutation changed what it legitimately says: tensors that equal what
             the mutated header declares (a relabelled dtype, say), or a config differing only in settings
             the tensors cannot pin down (RoPE base, eps, windows, delay, the heads/head_dim split), run with
             every intermediate finite; for audio, another valid rate or layout of the same samples.
Anything else fails the test: another exception, a config the file contradicts, a hang (a timeout per
example) or unbounded memory (the worker process runs under an address-space limit, so an allocation
sized by a bad field raises MemoryError there, which counts as another exception).

Loads run in one worker process (started once, restarted after a crash or timeout) fed by this process.
The default profile runs a few examples per file type (CI); the long run is
    python -m pytest -q tests/test_fuzz.py --hypothesis-profile=fuzz -s
with >= 500 examples per file type, printing the outcome counts at the end.
"""

import hashlib
import json
import os
import pickle
import resource
import select
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MODEL_DIRS, SPEECH_WAV

LONG = settings.default.max_examples >= 500          # --hypothesis-profile=fuzz (registered in conftest.py)
FUZZ = settings(max_examples=settings.default.max_examples if LONG else 25, deadline=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEMORY_LIMIT = 3 << 30            # bytes of address space for the worker (it needs ~0.5 GB for the tiny model)
TIMEOUT_S = 60                    # per example; the tiny model loads and transcribes in well under a second
N_SAMPLES = 8000                  # 0.5 s of speech: 17 tokens, text included
# Settings no tensor shape pins down: a mutation may change them and still be a valid checkpoint.
FREE_FIELDS = {f"{part}.{k}" for part in ("encoder", "decoder")
               for k in ("rope_theta", "norm_eps", "sliding_window", "n_heads", "head_dim", "n_kv_heads")}
FREE_FIELDS.add("default_delay_ms")
COUNTS = {}                       # file type -> Counter of outcomes, printed at the end


# --- the worker: load + transcribe under a memory limit ---------------------------------------------------
def worker_loop():
    """Reads one pickled job per line of hex from stdin, answers one JSON line each."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import voxtral_ref
    from voxtral_ref.checkpoint.weights import canonical_names
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                                    # anything else printed goes to stderr, not into the answers
    speech, tiny = speech_samples(), voxtral_ref.load(MODEL_DIRS["mistral"], backend="c")
    for line in sys.stdin:
        job = pickle.loads(bytes.fromhex(line))
        try:
            if job["kind"] == "audio":
                out = run_audio(tiny, job["audio"], job["rate"])
            else:
                model = voxtral_ref.load(job["dir"], backend="c")
                model.stream()                                   # allocates the KV rings: windows are checked
                out = run_transcribe(model, speech, 16000)
                out["cfg"] = asdict(model.cfg)
                out["weights"] = {c[0]: digest(model.weights[c[0]]) for c in canonical_names(model.cfg)}
                tok = model.tokenizer
                out["vocab"] = digest_bytes(b"\0".join(tok.token_bytes(i) for i in range(model.cfg.decoder.vocab_size)))
        except voxtral_ref.VoxtralError as e:
            out = {"outcome": "error", "message": str(e)}
        except BaseException as e:                                   # MemoryError included: that is the point
            out = {"outcome": "other", "message": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(out), file=answers, flush=True)


def run_transcribe(model, audio, rate):
    nonfinite = []
    r = model.transcribe(audio, sample_rate=rate,
                         trace=lambda name, t: nonfinite.append(name) if np.asarray(t).dtype.kind == "f"
                         and not np.isfinite(t).all() else None)
    return {"outcome": "ok", "ids": r.token_ids, "text": r.text, "nonfinite": nonfinite}


def run_audio(model, audio, rate):
    """transcribe, then the same audio fed to a stream in one chunk: both must agree."""
    out = run_transcribe(model, audio, rate)
    session = model.stream(sample_rate=rate)
    session.feed(audio)
    session.close()
    out["stream_ids"] = session.token_ids
    return out


def digest(a):
    a = np.ascontiguousarray(a)
    return f"{a.dtype}{a.shape}" + hashlib.sha1(a.view(np.uint8)).hexdigest()


def digest_bytes(b):
    return hashlib.sha1(b).hexdigest()


def speech_samples():
    import soundfile as sf
    return sf.read(SPEECH_WAV, dtype="float32")[0][:N_SAMPLES]


class Worker:
    def __init__(self):
        self.proc = None

    def run(self, job):
        if self.proc is None or self.proc.poll() is not None:
            env = dict(os.environ, VOXTRAL_REF_THREADS="1")
            self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, env=env, cwd=Path(__file__).parent)
        self.proc.stdin.write(pickle.dumps(job).hex() + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            return {"outcome": "hang" if not ready else "crash"}
        return json.loads(line)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()
    for kind, c in sorted(COUNTS.items()):
        print(f"\nfuzz {kind}: {sum(c.values())} examples: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items())))


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="voxtral_fuzz_"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- JSON values and mutations ----------------------------------------------------------------------------
class Raw:
    """A token written verbatim: 1e400, NaN, a truncated or deeply nested document."""

    def __init__(self, text):
        self.text = text


class Pairs(list):
    """An object written from (key, value) pairs, so a key can appear twice."""


def dump(v):
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(x)}" for k, x in v) + "}"
    if isinstance(v, dict):
        return dump(Pairs(v.items()))
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


ODD_VALUES = [0, -1, 1, 2, 3, 47, 2**31, 2**32, 2**63, 2**64, 10**9, 10**18, -2**63, 0.5, -0.0, 1e-320, 1e300,
              Raw("1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), "", "x", "96", "1e6", None, True, False,
              [], {}, [2**64], [2**32, 2**32, 96], [-1, 10], [0.5, 10], [1e400], "BF16", "F16", "F32", "I64", "U8",
              Raw("[" * 5000 + "]" * 5000), "/etc/passwd", "../consolidated.safetensors"]
json_values = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6))


def paths(tree, prefix=()):
    """Every (path, value) in a JSON tree, the root included."""
    yield prefix, tree
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


def pick_path(draw, tree, big=64):
    """A random node; in long lists (tekken's vocab) a random element stands for the rest."""
    path, node = (), tree
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        k = draw(st.sampled_from(keys[:big] + keys[big:][::max(1, len(keys) // big)]))
        path, node = path + (k,), node[k]
    return path


def set_path(tree, path, value):
    if not path:
        return value
    tree[path[0]] = set_path(tree[path[0]], path[1:], value)
    return tree


@st.composite
def mutated_json(draw, original):
    """(text, what) of one mutation of a JSON document."""
    tree = json.loads(json.dumps(original))
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "duplicate", "tweak", "raw"]))
    path = pick_path(draw, tree)
    parent_path, key = path[:-1], path[-1] if path else None
    parent = tree
    for k in parent_path:
        parent = parent[k]
    if op == "replace" or (op in ("delete", "duplicate") and not path):
        tree = set_path(tree, path, draw(json_values))
    elif op == "delete":
        del parent[key]
    elif op == "add":
        node = parent[key] if path else tree
        target = node if isinstance(node, (dict, list)) else parent
        value = draw(json_values)
        if isinstance(target, dict):
            target[draw(st.sampled_from(["dim", "n_layers", "x", "__metadata__", "weight_map", "audio"]))] = value
        else:
            target.append(value)
    elif op == "duplicate" and isinstance(parent, dict):
        pairs = Pairs(parent.items())
        pairs.append((key, draw(st.sampled_from([parent[key], draw(json_values)]))))
        tree = set_path(tree, parent_path, pairs)
    elif op == "tweak":
        v = parent[key] if path else tree
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            new = draw(st.sampled_from([v + 1, v - 1, v * 2, -v, float(v), str(v), [v], v // 2, 0]))
        else:
            new = draw(st.sampled_from([None, [v], {"v": v}, str(v)]))
        tree = set_path(tree, path, new)
    text = dump(tree)
    if op == "raw":
        i = draw(st.integers(0, len(text)))
        text = draw(st.sampled_from([text[:i], text[:i] + draw(st.sampled_from(["\x00", "}", "\"", "\udcff", "[" * 3000]))
                                     + text[i:], text + " " * 7, "\n" + text]))
    return text, f"{op} {'.'.join(map(str, path))}"


# --- checkpoints ------------------------------------------------------------------------------------------
def write_ckpt(scratch, fmt, files):
    """A checkpoint dir: the tiny one's files, `files` {name: bytes or str} replacing some (atomically, so a
    worker still holding the previous file's mmap is never handed a truncated page)."""
    d = scratch / fmt
    d.mkdir(exist_ok=True)
    for f in MODEL_DIRS[fmt].iterdir():
        data = files.get(f.name, f.read_bytes())
        tmp = d / (f.name + ".tmp")
        tmp.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        os.replace(tmp, d / f.name)
    return d


@pytest.fixture(scope="module")
def base(worker, scratch):
    """The unmutated checkpoints' results, through the same worker."""
    out = {fmt: worker.run({"kind": "load", "dir": str(write_ckpt(scratch, fmt, {}))}) for fmt in MODEL_DIRS}
    assert all(r["outcome"] == "ok" and r["text"] for r in out.values()), out
    return out


def check_load(kind, result, base, what, declared=None):
    """The oracle for a mutated checkpoint; `declared` (safetensors) gives what the mutated header says."""
    c = COUNTS.setdefault(kind, Counter())
    outcome = result["outcome"]
    if outcome == "error":
        assert "\n" not in result["message"], result["message"]
        c["error"] += 1
        return
    assert outcome == "ok", f"{what}: {outcome} {result.get('message', '')}"
    same_tensors = result["weights"] == base["weights"]
    same_cfg = result["cfg"] == base["cfg"]
    if same_tensors and same_cfg:
        assert result["ids"] == base["ids"], f"{what}: accepted with different ids"
        if result["vocab"] == base["vocab"]:
            assert result["text"] == base["text"], what
        c["same" if result["vocab"] == base["vocab"] else "meaning (token bytes)"] += 1
        return
    assert not result["nonfinite"], f"{what}: accepted, and {result['nonfinite'][:3]} are not finite"
    if not same_tensors:
        assert declared is not None and result["weights"] == declared(), \
            f"{what}: accepted with tensors that differ from the file's and from what its header declares"
        c["meaning (tensors as declared)"] += 1
    if not same_cfg:
        new, old = flatten(result["cfg"]), flatten(base["cfg"])
        changed = {k for k in new if new[k] != old[k]}
        assert changed <= FREE_FIELDS, f"{what}: accepted a config that contradicts the file: {changed - FREE_FIELDS}"
        c["meaning (settings)"] += 1


def flatten(cfg):
    """{"encoder": {"dim": 64}, "format": "mistral"} -> {"encoder.dim": 64, "format": "mistral"}"""
    return {f"{k}.{j}" if isinstance(v, dict) else k: (v[j] if isinstance(v, dict) else v)
            for k, v in cfg.items() for j in (v if isinstance(v, dict) else [None])}


# --- safetensors headers ----------------------------------------------------------------------------------
def split_safetensors(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@st.composite
def mutated_safetensors(draw, header, data):
    """(file bytes, mutated header or None, its data block, what)."""
    op = draw(st.sampled_from(["json", "json", "json", "swap", "shift", "length", "data", "benign"]))
    h = json.loads(json.dumps(header))
    names = sorted(k for k in h if k != "__metadata__")
    if op == "json":
        text, what = draw(mutated_json(h))
    else:
        what = op
        if op == "swap":
            a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
            h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        elif op == "shift":
            k = draw(st.sampled_from([-8, -2, -1, 1, 2, 8, 2**63]))
            for name in draw(st.sampled_from([[draw(st.sampled_from(names))], names])):
                h[name]["data_offsets"] = [o + k for o in h[name]["data_offsets"]]
        elif op == "benign":              # must load and give the same result
            h = dict(sorted(h.items(), reverse=draw(st.booleans())))
            h["__metadata__"] = {"format": "pt", "note": draw(st.text(max_size=20))}
        text = dump(h)
    raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.sampled_from([0, 0, 1, 3, 8]))
    n = len(raw)
    if op == "length":
        n = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, 2**32, 2**64 - 1]))
    body = data
    if op == "data":
        body = draw(st.sampled_from([data[:-1], data[:-2], data + b"\0" * 2, data[: len(data) // 2], b""]))
    try:
        parsed = json.loads(raw, parse_constant=lambda c: 1 / 0) if op != "length" else None
    except (ValueError, ZeroDivisionError, RecursionError):
        parsed = None
    return n.to_bytes(8, "little") + raw + body, parsed, body, what


def declared_digests(header, data, names):
    """What the mutated header declares for each canonical tensor (disk name -> canonical name in `names`),
    read from the data block by the format's own rules, independently of the reader under test."""
    from voxtral_ref.checkpoint.weights import DTYPES
    out = {}
    for canon, disk in names:
        info = header[disk]
        start, end = info["data_offsets"]
        a = np.frombuffer(data[start:end], DTYPES[info["dtype"]]).reshape(info["shape"])
        out[canon] = digest(a if a.ndim == 2 else a.astype(np.float32))
    return out


@given(data=st.data())
@FUZZ
def test_fuzz_safetensors_header(worker, scratch, base, data):
    from voxtral_ref import config as C
    from voxtral_ref.checkpoint.weights import canonical_names
    header, block = split_safetensors(MODEL_DIRS["mistral"] / "consolidated.safetensors")
    blob, parsed, body, what = data.draw(mutated_safetensors(header, block))
    d = write_ckpt(scratch, "mistral", {"consolidated.safetensors": blob})
    names = [(r[0], r[1]) for r in canonical_names(C.from_params_json(MODEL_DIRS["mistral"] / "params.json"))]
    check_load("safetensors header", worker.run({"kind": "load", "dir": str(d)}), base["mistral"], what,
               declared=lambda: parsed and declared_digests(parsed, body, names))


# --- params.json, config.json, tekken.json ----------------------------------------------------------------
@pytest.mark.parametrize("fmt, name", [("mistral", "params.json"), ("hf", "config.json"), ("mistral", "tekken.json")])
@given(data=st.data())
@FUZZ
def test_fuzz_json(worker, scratch, base, fmt, name, data):
    original = json.loads((MODEL_DIRS[fmt] / name).read_text())
    text, what = data.draw(mutated_json(original))
    d = write_ckpt(scratch, fmt, {name: text})
    check_load(name, worker.run({"kind": "load", "dir": str(d)}), base[fmt], f"{name}: {what}")


# --- audio ------------------------------------------------------------------------------------------------
@st.composite
def presented_audio(draw):
    """(audio, rate, expected): the same 0.5 s of int16 speech presented validly ("same"), at another valid
    rate ("resampled"), or wrongly ("error"); or any array hypothesis makes ("any")."""
    x16 = np.round(speech_samples() * 32767).astype(np.int16)                         # [N]
    x = x16.astype(np.float32) / 32768
    kind = draw(st.sampled_from(["same", "same", "error", "error", "resampled", "any"]))
    if kind == "same":
        a = draw(st.sampled_from([x, x.astype(np.float64), x16, x16.astype(np.int32) << 16, x[:, None],
                                  np.stack([x, x], 1), np.stack([x] * 4, 1)]))
        return a, draw(st.sampled_from([16000, np.int32(16000), np.int64(16000), np.uint16(16000)])), kind
    if kind == "error":
        bad = x.copy()
        bad[draw(st.integers(0, len(x) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        a = draw(st.sampled_from([bad, x16.astype(np.int64), x16.astype(np.uint64), x.astype(np.complex64),
                                  x > 0, x.astype(str), np.float32(0.5), x.reshape(2, -1, 2), np.stack([x, x]),
                                  x[None], x[:0], np.zeros((len(x), 0), np.float32), np.array([x, None], object)]))
        rate = draw(st.sampled_from([16000, 0, -16000, 1, 999, 768001, 2**63, 10**12, 16000.0, True, "16000", None]))
        if rate == 16000 and type(rate) is int and a is bad and draw(st.booleans()):
            a = x                                             # a valid array with an invalid rate below
            rate = draw(st.sampled_from([0, 1, 999, 768001, 2**63, 10**12, 16000.0, True]))
        return a, rate, kind
    if kind == "resampled":
        return x, draw(st.sampled_from([1000, 8000, 22050, 44100, 48000, 768000])), kind
    from hypothesis.extra.numpy import array_shapes, arrays, scalar_dtypes
    shape = st.one_of(array_shapes(min_dims=0, max_dims=3, max_side=8), st.tuples(st.integers(0, 4000)),
                      st.tuples(st.integers(0, 4000), st.integers(0, 20)))
    a = draw(arrays(scalar_dtypes(), shape))
    return a, draw(st.sampled_from([16000, 8000, 48000, 1, 10**12])), kind


@pytest.fixture(scope="module")
def clean_ids(worker):
    x = np.round(speech_samples() * 32767).astype(np.int16).astype(np.float32) / 32768
    return worker.run({"kind": "audio", "audio": x, "rate": 16000})["ids"]


@given(data=st.data())
@FUZZ
def test_fuzz_audio(worker, clean_ids, data):
    audio, rate, kind = data.draw(presented_audio())
    r = worker.run({"kind": "audio", "audio": audio, "rate": rate})
    c = COUNTS.setdefault("audio", Counter())
    what = f"{kind}: {type(audio).__name__} {getattr(audio, 'dtype', '')} {np.shape(audio)} at {rate!r}"
    assert r["outcome"] in ("ok", "error"), f"{what}: {r}"
    if kind == "error":
        assert r["outcome"] == "error", f"{what}: accepted"
    if r["outcome"] == "error":
        assert kind in ("error", "any") and "\n" not in r["message"], f"{what}: {r['message']}"
        c["error"] += 1
        return
    assert not r["nonfinite"] and r["ids"] == r["stream_ids"], what
    if kind == "same":
        assert r["ids"] == clean_ids, what
    c["same" if kind == "same" else "valid (other audio)"] += 1


if __name__ == "__main__":
    worker_loop()
