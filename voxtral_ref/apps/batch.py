"""`voxtral-ref batch`: an archive of audio files -> one JSON Lines results file plus subtitles, in this
process or on a Ray cluster; resumable, and nothing is lost when something dies.

    inputs             files; folders (their audio files, recursively); globs; manifests (.txt / .lst:
                       one path a line; .jsonl: {"path", "id"?, "delay_ms"?} a line; either may mix the two;
                       relative paths start at the manifest's folder)
    OUT/results.jsonl  one line per file: id, path, duration (s), text, segments, token_ids, delay_ms,
                       timings, worker, error (null when it transcribed), input (size, mtime_ns, sha256),
                       settings
    OUT/<id>.<fmt>     the chosen formats, rendered and named as `transcribe -o` writes them

An id is the file's path under the folder or glob root it was found in, without its suffix (a plain file
or manifest line: its stem, unless the manifest gives one), so OUT mirrors a folder's tree.

Why nothing is lost: a finished file's subtitles are written whole (beside, then renamed), then its record
is appended in one write and fsync'd. So whenever the process dies, each recorded file is complete and
each unrecorded one is redone by the next run, which skips a file whose record has no error, the same
settings and the same input (size and mtime, or the same sha256 when only the mtime moved), and retries
the rest. It first rewrites the results file atomically without the records it will redo (and any torn
last line), so every file has exactly one line.

Where it runs: embedded (this process, FILES_PER_CALL files per model call) or on Ray (`ray=True`):
Ray Data reads and decodes the files in parallel tasks, a pool of model actors (each loads the model once)
transcribes, and this process writes each result as it arrives. Both go through the same decode() and
transcribe_decoded(), so both give the same records.
"""

import glob
import hashlib
import json
import os
import socket
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass
from inspect import signature
from itertools import groupby
from pathlib import Path, PurePosixPath

import numpy as np

from ..checkpoint.hub import DEFAULT_REPO, looks_local, resolve
from ..config import SAMPLE_RATE, delay_tokens
from ..errors import VoxtralError

RESULTS = "results.jsonl"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc")
MANIFEST_SUFFIXES = (".txt", ".lst", ".jsonl")
# Files handed to the model in one call (and to a Ray actor in one task): the unit the batching engine
# decodes together. It is also what a kill can lose: the files of the call in flight.
FILES_PER_CALL = 4
# A file name holds 255 bytes (Linux, macOS, Windows); the longest name written for an id, write_text's
# temporary `.<id>.json.<pid>.tmp`, adds 18 (a pid has up to 7 digits).
MAX_ID_PART_BYTES = 255 - len("..json.1234567.tmp")


@dataclass(frozen=True)
class Item:
    id: str                          # keys the record and names OUT/<id>.<fmt>
    path: str                        # absolute
    delay_ms: int | None = None      # None: the model's default (tekken.json)


@dataclass(frozen=True)
class Summary:
    transcribed: int                 # this run, without error
    failed: int                      # this run, recorded with an error
    skipped: int                     # done by an earlier run with the same input and settings
    audio_s: float                   # transcribed this run
    wall_s: float
    results: Path


# --- inputs -----------------------------------------------------------------------------------------------
def collect_inputs(inputs, delay_ms=None):
    """Files, folders, globs and manifests -> [Item], each file once, ids unique."""
    items = []
    for src in map(str, inputs):
        p = Path(src)
        if glob.has_magic(src):
            found = [Path(f) for f in sorted(glob.glob(src, recursive=True)) if Path(f).is_file()]
            if not found:
                raise VoxtralError(f"no file matches {src}")
            items += [item_under(glob_root(src), f, delay_ms) for f in found]
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file())
            if not found:
                raise VoxtralError(f"{src}: no audio files ({' '.join(AUDIO_SUFFIXES)}) in this folder")
            items += [item_under(p, f, delay_ms) for f in found]
        elif not p.exists():
            raise VoxtralError(f"input not found: {src}")
        elif p.suffix.lower() in MANIFEST_SUFFIXES:
            items += read_manifest(p, delay_ms)
        else:
            items.append(Item(fits(p.stem, p), str(p.resolve()), delay_ms))
    return unique(items)


def glob_root(pattern):
    """The folder before a glob's first wildcard: ids are paths below it."""
    parts = Path(pattern).parts
    n = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:n]) if n else Path(".")


def item_under(root, f, delay_ms):
    return Item(fits(f.relative_to(root).with_suffix("").as_posix(), f), str(f.resolve()), delay_ms)


def read_manifest(path, delay_ms):
    """One input a line: a path, or a JSON object {"path", "id"?, "delay_ms"?}; blank and # lines skipped.
    A listed file that is missing is not an error here: it is recorded as one, and the run goes on."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VoxtralError(f"cannot read manifest {path}: {getattr(e, 'strerror', None) or e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        line, where = line.strip(), f"{path}:{n}"
        if not line or line.startswith("#"):
            continue
        entry = manifest_entry(line, where) if line.startswith("{") else {"path": line}
        f = (path.parent / entry["path"]).resolve()
        d = entry.get("delay_ms", delay_ms)
        try:
            if d is not None:
                delay_tokens(d)
        except VoxtralError as e:
            raise VoxtralError(f"{where}: {e}") from None
        items.append(Item(check_id(entry.get("id", f.stem), where), str(f), d))
    return items


def manifest_entry(line, where):
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise VoxtralError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise VoxtralError(f'{where}: a JSON line needs "path" (a string), got {line[:80]}')
    unknown = set(entry) - {"path", "id", "delay_ms"}
    if unknown:
        raise VoxtralError(f'{where}: unknown keys {sorted(unknown)}: a line takes "path", "id", "delay_ms"')
    return entry


def check_id(name, where):
    """A manifest's id names files under OUT, so it must stay inside it and be a file name there."""
    p = PurePosixPath(name) if isinstance(name, str) and name.strip() else None
    if p is None or p.is_absolute() or ".." in p.parts or not p.parts:
        raise VoxtralError(f"{where}: id {name!r} must be a relative name inside OUT (no '..')")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise VoxtralError(f"{where}: id {name!r} holds a control character or a lone surrogate, which a file "
                           "name under OUT cannot")
    return fits(str(p), where)


def fits(name, where):
    """An id too long to name files under OUT would fail once its file is transcribed: refused now."""
    long = next((part for part in name.split("/") if len(os.fsencode(part)) > MAX_ID_PART_BYTES), None)
    if long is not None:
        raise VoxtralError(f"{where}: id {name!r} is too long for a file name: {len(os.fsencode(long))} bytes in "
                           f"one part, at most {MAX_ID_PART_BYTES}")
    return name


def unique(items):
    seen = {}
    for it in items:
        other = seen.setdefault(it.id, it)
        if other.path != it.path:
            raise VoxtralError(f"{other.path} and {it.path} would both be recorded as {it.id!r}: pass their "
                               "common folder, or give them ids in a JSON Lines manifest")
        if other != it:
            raise VoxtralError(f"{it.path} is listed twice with different delays ({other.delay_ms}, {it.delay_ms})")
    return list(seen.values())


# --- what is done -----------------------------------------------------------------------------------------
def settings_of(model, load_options):
    """What decides the transcript besides the input and its delay. A local checkpoint is named by its
    absolute path, a hub one by repo id and revision (the files under either are not hashed)."""
    from .. import load
    defaults = {k: p.default for k, p in signature(load).parameters.items()}      # so API and CLI runs agree
    local = Path(model)
    return {"model": str(local.resolve()) if local.is_dir() else str(model),
            **{k: load_options.get(k, defaults[k]) for k in ("revision", "weights_format", "precision", "quantize")}}


def fingerprint(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_of(path)}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def same_settings(rec, item, settings):
    """The record's settings are these; a delay named now also matches a record made at the default delay
    that was this one (its result's delay_ms): asking for the default by name redoes nothing."""
    recorded = dict(rec.get("settings") or {})
    asked = recorded.pop("delay_ms", None)
    return recorded == settings and (asked == item.delay_ms or
                                     (item.delay_ms is not None and rec.get("delay_ms") == item.delay_ms))


def is_done(rec, item, settings):
    """Does an earlier record stand for this item? Same settings, no error, and the same input: size and
    mtime, or (when only the mtime moved, as a copy does) the same content."""
    if rec is None or rec.get("error") is not None or not same_settings(rec, item, settings):
        return False
    try:
        st = os.stat(item.path)
    except OSError:
        return False
    old = rec.get("input") or {}
    return st.st_size == old.get("size") and (st.st_mtime_ns == old.get("mtime_ns")
                                              or sha256_of(item.path) == old.get("sha256"))


def read_records(path):
    """{id: record}, the last line of each id. A line that does not parse is the torn end of a write a
    crash cut short: dropped, so its file is redone."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise VoxtralError(f"cannot read {path}: {e.strerror or e}") from None
    records = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            records[rec["id"]] = rec
    return records


def json_line(rec):
    from .cli import json_text
    return json_text(rec) + "\n"


def transcript_of(rec):
    """A record -> (Transcript, [Segment]), what the subtitle writers take: outputs can be rendered again
    from the results file alone, without the model."""
    from ..model import Transcript
    from .subtitles import Segment
    segs = [Segment(round(s["start"] * 1000), round(s["end"] * 1000), s["text"], tuple(s["tokens"]))
            for s in rec["segments"]]
    return Transcript(rec["text"], rec["token_ids"], rec["delay_ms"], round(rec["duration"] * SAMPLE_RATE)), segs


# --- the work: the same functions run here and in Ray's tasks and actors -----------------------------------
def decode(item):
    """{id, path, delay_ms} -> (meta, [N] float32 samples at 16 kHz). A file that cannot be read or
    decoded gets meta["error"] and no samples: it becomes an error record, and the run goes on."""
    from ..stages.audio import read_audio, to_mono_16k
    t0 = time.perf_counter()
    meta = {**item, "input": None, "error": None}
    x = np.zeros(0, np.float32)
    try:
        meta["input"] = fingerprint(item["path"])
        x = to_mono_16k(*read_audio(item["path"]))
    except OSError as e:
        meta["error"] = f"cannot read {item['path']}: {e.strerror or e}"
    except VoxtralError as e:
        meta["error"] = str(e)
    except Exception as e:           # whatever else a decoder library raises on a strange file is about that file
        meta["error"] = f"cannot decode {item['path']}: {type(e).__name__}: {e}"
    meta["read_s"] = time.perf_counter() - t0
    return meta, x


def transcribe_many(model, audios, delay_ms):
    """The one place batch calls the model: [samples] -> [Transcript], the files decoded together (each
    result equals transcribing its file alone; runtime/engine.py)."""
    return model.transcribe(list(audios), delay_ms=delay_ms, batch_size=FILES_PER_CALL)


def transcribe_decoded(model, decoded):
    """[(meta, samples)] -> [record] in the same order; the files that decoded go through the model
    together (consecutive ones with the same delay in one call)."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ok = [(m, x) for m, x in decoded if m["error"] is None]
    done = {}
    for delay_ms, group in groupby(ok, key=lambda mx: mx[0]["delay_ms"]):
        group = list(group)
        done.update(zip([m["id"] for m, _ in group], transcribe_many(model, [x for _, x in group], delay_ms)))
    return [record(m, done.get(m["id"]), model.tokenizer, worker) for m, _ in decoded]


def record(meta, r, tokenizer, worker):
    """One results line. An error record has the same keys, null where there is no transcript."""
    from .subtitles import segments, to_json
    rec = {"id": meta["id"], "path": meta["path"], "duration": None, "text": None, "segments": None,
           "token_ids": None, "delay_ms": None, "timings": {"read_s": meta["read_s"]}, "worker": worker,
           "error": meta["error"], "input": meta["input"]}
    if r is None:
        return rec
    return {**rec, **to_json(r, segments(r.token_ids, tokenizer, r.n_samples)),
            "duration": r.n_samples / SAMPLE_RATE, "timings": {**rec["timings"], **r.timings}}


def run_embedded(todo, model, load_options, threads, progress, write):
    from .. import load
    from ..runtime import ckernels
    from .cli import set_threads
    before = ckernels.get_threads()
    set_threads(threads)
    try:
        m = load(model, progress=progress, **load_options)
        for start in range(0, len(todo), FILES_PER_CALL):
            for rec in transcribe_decoded(m, [decode(asdict(it)) for it in todo[start:start + FILES_PER_CALL]]):
                write(rec)
    finally:
        ckernels.set_threads(before)                 # the caller's process, as it was


# --- on Ray -----------------------------------------------------------------------------------------------
def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise VoxtralError("--ray needs Ray Data: pip install 'voxtral_ref[ray]'") from None
    return ray


def decode_row(row):
    """A Ray Data task: meta travels as JSON (nullable, nested), samples as a tensor column."""
    meta, x = decode(row)
    return {"meta": json.dumps(meta), "audio": x}


class Transcriber:
    """A Ray actor of the pool: loads the model once, then transcribes batches of decoded rows."""

    def __init__(self, model, load_options, threads):
        from .. import load
        from .cli import set_threads
        set_threads(threads)
        self.model = load(model, progress=False, **load_options)

    def __call__(self, batch):
        decoded = [(json.loads(m), np.asarray(x, np.float32)) for m, x in zip(batch["meta"], batch["audio"])]
        return {"record": [json_line(r) for r in transcribe_decoded(self.model, decoded)]}


def run_on_ray(todo, model, load_options, threads, workers, address, write):
    """Decoding in Ray Data tasks, `workers` model actors of `threads` CPUs each (default: one 1-thread
    actor per CPU of the cluster), results written here as each batch completes. A Ray cluster already
    connected to (ray.init done by the caller) is used as it is; otherwise ray.init(address) joins
    `address` ("auto", "ray://head:10001", RAY_ADDRESS when None) or starts a local one, shut down after."""
    import logging
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        threads = threads or 1
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        ds = (ray.data.from_items([asdict(it) for it in todo], override_num_blocks=len(todo))
              # The actors hold every CPU they ask for: decoding asks for none, or it would wait for them
              # forever. It is I/O and resampling, small beside transcription, so one task per actor in
              # flight keeps them fed; unbounded, Ray would start a worker process per file at once.
              .map(decode_row, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=workers))
              .map_batches(Transcriber, fn_constructor_kwargs={"model": model, "load_options": load_options,
                                                               "threads": threads},
                           batch_size=FILES_PER_CALL, compute=ray.data.ActorPoolStrategy(size=workers),
                           num_cpus=threads))
        ds.context.enable_progress_bars = False          # this run's own: ours counts files and audio hours
        for row in ds.iter_rows():
            write(json.loads(row["record"]))
    except ray.exceptions.RayError as e:             # an actor or task that kept failing, e.g. no model there
        raise VoxtralError(f"on Ray: {last_line(e)}") from None
    finally:
        if started:
            ray.shutdown()


def last_line(error):
    """What a remote traceback ends with: its exception, without the module path of a VoxtralError."""
    lines = [t.strip() for t in str(error).splitlines() if t.strip()] or [type(error).__name__]
    return lines[-1].split("VoxtralError: ", 1)[-1]


# --- the run ----------------------------------------------------------------------------------------------
class Writer:
    """Writes each finished file: its outputs, then its record (module docstring: why in this order)."""

    def __init__(self, out_dir, todo, settings, formats, progress):
        from tqdm import tqdm
        self.out_dir, self.settings, self.formats = out_dir, settings, formats
        self.todo = {it.id: it for it in todo}
        self.fd = os.open(out_dir / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.transcribed = self.failed = 0
        self.audio_s, self.t0 = 0.0, time.perf_counter()
        self.bar = tqdm(total=len(todo), desc="batch", unit="file", file=sys.stderr, delay=2,
                        disable=not progress or not sys.stderr.isatty())

    def write(self, rec):
        from .cli import write_outputs
        it = self.todo.pop(rec["id"], None)
        if it is None:                # Ray promises a task's output at least once, not exactly once
            return
        rec["settings"] = {**self.settings, "delay_ms": it.delay_ms}
        # an earlier run's outputs of this id are of other audio or settings (it is redone): none may stay
        # beside the new record in a format this run does not write
        remove_outputs(self.out_dir, rec["id"], keep=self.formats if rec["error"] is None else ())
        if rec["error"] is None:
            write_outputs(self.out_dir, rec["id"], *transcript_of(rec), self.formats)
            self.transcribed, self.audio_s = self.transcribed + 1, self.audio_s + rec["duration"]
        else:
            self.failed += 1
        data = json_line(rec).encode()
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(f"{len(data)} bytes to write, fewer written")
            os.fsync(self.fd)
        except OSError as e:         # the rerun drops the torn line and redoes the file
            raise VoxtralError(f"cannot write {self.out_dir / RESULTS}: {e.strerror or e}") from None
        wall_h = (time.perf_counter() - self.t0) / 3600
        self.bar.set_postfix_str(f"{self.audio_s / 3600:.2f} h of audio, {self.audio_s / 3600 / max(wall_h, 1e-9):.1f} h/h")
        self.bar.update()

    def close(self):
        self.bar.close()
        os.close(self.fd)


def remove_outputs(out_dir, name, keep=()):
    from .cli import FORMATS
    for fmt in FORMATS:
        if fmt not in keep:
            (out_dir / f"{name}.{fmt}").unlink(missing_ok=True)


def lock(out_dir):
    """One run per OUT at a time: two would each rewrite the results file under the other."""
    import fcntl
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VoxtralError(f"another voxtral-ref batch is writing to {out_dir}") from None
    return fd


def output_formats(formats):
    from .cli import FORMATS
    bad = [f for f in formats if f not in (*FORMATS, "all")]
    if bad:
        raise VoxtralError(f"unknown format {bad[0]!r}: choose from {', '.join(FORMATS)} or all")
    return FORMATS if "all" in formats else tuple(dict.fromkeys(formats))


def run(inputs, out_dir, formats=(), delay_ms=None, model=DEFAULT_REPO, *, threads=None, ray=False,
        ray_address=None, workers=None, progress=False, **load_options):
    """Transcribe `inputs` (files, folders, globs, manifests) into out_dir/results.jsonl and
    out_dir/<id>.<format> -> Summary. Embedded unless `ray` or `ray_address`; `threads` per actor on Ray
    (C kernel threads embedded); `workers` Ray actors; `load_options` go to voxtral_ref.load (backend,
    precision, quantize, revision, weights_format, offline, cache_dir)."""
    from .cli import output_dir, write_outputs, write_text
    formats = output_formats(formats)
    if delay_ms is not None:
        delay_tokens(delay_ms)
    if workers is not None and not (ray or ray_address):
        raise VoxtralError("--workers is the number of Ray actors: add --ray or --ray-address")
    items = collect_inputs(inputs, delay_ms)          # mistakes in the inputs surface before any work
    if looks_local(model):                            # ... and a mistyped model before a cluster starts
        resolve(model, load_options.get("revision"), weights_format=load_options.get("weights_format"))
    out = output_dir(out_dir, ())
    lock_fd = lock(out)
    try:
        for tmp in out.rglob(".*.tmp"):              # what write_text had in hand when a run was killed
            tmp.unlink()
        settings = settings_of(model, load_options)
        records = read_records(out / RESULTS)
        done = {it.id for it in items if is_done(records.get(it.id), it, settings)}
        todo = [it for it in items if it.id not in done]
        redo = {it.id for it in todo}
        write_text(out / RESULTS, "".join(json_line(r) for i, r in records.items() if i not in redo))
        for name in done:                             # formats asked for now that an earlier run did not write
            missing = [f for f in formats if not (out / f"{name}.{f}").exists()]
            if missing:
                write_outputs(out, name, *transcript_of(records[name]), missing)
        writer = Writer(out, todo, settings, formats, progress)
        try:
            if todo and (ray or ray_address):
                run_on_ray(todo, model, load_options, threads, workers, ray_address, writer.write)
            elif todo:
                run_embedded(todo, model, load_options, threads, progress, writer.write)
        finally:
            writer.close()
        return Summary(writer.transcribed, writer.failed, len(done), writer.audio_s,
                       time.perf_counter() - writer.t0, out / RESULTS)
    finally:
        os.close(lock_fd)


# --- command line -----------------------------------------------------------------------------------------
def cmd_batch(args):
    import logging
    from .cli import note
    from .. import load
    if args.ray or args.ray_address:     # Ray Data's logs, tracebacks included: its failures end as our one line
        import_ray()
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    load_options = {k: getattr(args, k) for k in signature(load).parameters
                    if k not in ("model", "progress") and hasattr(args, k)}       # what add_model_args offers
    s = run(args.inputs, args.output_dir, args.format, args.delay_ms, args.model, threads=args.threads,
            ray=args.ray, ray_address=args.ray_address, workers=args.workers, progress=not args.quiet,
            **load_options)
    speed = f", {s.audio_s / s.wall_s:.2f}x real time" if s.audio_s and s.wall_s else ""
    note(f"batch: {s.transcribed} transcribed, {s.failed} failed, {s.skipped} already done; {s.audio_s:.0f} s "
         f"({s.audio_s / 3600:.2f} h) of audio in {s.wall_s:.0f} s{speed}; results in {s.results}")
    return 2 if s.failed else 0


def add_batch_parser(subparsers):
    from .cli import FORMATS, add_model_args, positive_int
    b = subparsers.add_parser(
        "batch", help="transcribe an archive into a results file, resumably; in this process or on Ray",
        description="Transcribe many files into OUT/results.jsonl (one JSON line per file) and optional "
                    "OUT/<id>.<format> files. Rerunning skips what is done and retries what failed.")
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="audio files, folders, quoted globs ('calls/**/*.wav'), or manifests (.txt / .lst: one "
                        'path a line; .jsonl: {"path", "id", "delay_ms"} a line)')
    b.add_argument("-o", "--output-dir", required=True, metavar="OUT", help="results.jsonl and subtitles go here")
    b.add_argument("-f", "--format", action="append", choices=[*FORMATS, "all"], default=[],
                   help="also write OUT/<id>.<format>, as transcribe -o does (repeat for several; all: the four)")
    b.add_argument("--delay-ms", type=int, metavar="MS",
                   help="transcription delay: 80..1200 by 80, or 2400 (default 480; a manifest line may set its own)")
    add_model_args(b)
    r = b.add_argument_group("Ray (pip install 'voxtral_ref[ray]')")
    r.add_argument("--ray", action="store_true",
                   help="run on Ray: the cluster in RAY_ADDRESS, or a new local one")
    r.add_argument("--ray-address", metavar="ADDR", help="join this cluster (auto, HOST:6379, ray://HOST:10001)")
    r.add_argument("--workers", type=positive_int, metavar="N",
                   help="model actors (default: cluster CPUs / --threads; on Ray --threads defaults to 1)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch)
