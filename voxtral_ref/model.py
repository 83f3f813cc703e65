"""`load(path or repo id) -> Model`: a checkpoint in either format, ready to transcribe."""

import ctypes
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import config as C
from .runtime import kernels, quant
from .stages.audio import to_mono_16k
from .errors import VoxtralError
from .stages.generate import MAX_DRAFT, encode, greedy_decode, pad_offline
from .checkpoint import hub, quantized
from .checkpoint.hub import DEFAULT_REPO, detect_format, resolve
from .stages.tokenizer import Tekken
from .checkpoint.weights import load_weights

# transcribe() runs through a streaming session, fed the first token's audio, then chunks doubling up to
# SESSION_FEED: the first token comes after encoding ~0.6 s, not the whole file (HF's generate also encodes
# as it decodes), the ids are the same (tests/test_stream.py, tests/test_golden.py) and memory stays flat in
# the file's length. Batches (transcribe(list, batch_size)) run the same sessions through an Engine. The
# whole-file order (encode everything, then decode) remains the oracle's: with a trace.
SESSION_FEED = 60 * C.SAMPLE_RATE                     # at most this many samples per session step
# ... and steps it at most this many tokens at a time, so on_token hears of each pass's tokens soon after it,
# while the session's backlog verifies drafts (runtime/stream.py: up to `speculate` per pass) in every pass
# but the step's last ones (step(max_tokens) cuts a draft to the tokens it may still return)
TOKENS_PER_STEP = 16


def keep_freed_memory_for_reuse():
    """glibc serves each block over 32 MB (at most; the threshold adapts) with a fresh mmap and returns it on
    free, so every layer's [T, 5120] temporaries are page-faulted and zeroed again: 10-20% of the encoder's
    time on the full model (sys time 0.3-0.9 s of a 6 s encode). Serving them from the heap instead, and
    trimming it only beyond 256 MB free, lets numpy reuse the same pages (sys time 0.04 s). Process-wide,
    so done once at load; a no-op off Linux, or where the C library has no mallopt."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt:
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                                 # glibc's malloc.h
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 256 << 20)


@dataclass
class Transcript:
    text: str
    token_ids: list                   # generated ids after the prompt, specials included
    delay_ms: int
    n_samples: int = 0                # of the 16 kHz input, before padding
    timings: dict = field(default_factory=dict)


def resolve_backend(backend):
    if backend not in ("auto",) + kernels.BACKENDS:
        raise VoxtralError(f"unknown backend {backend!r}: choose auto, c or numpy")
    if backend == "numpy":
        return "numpy"
    from .runtime import ckernels
    if ckernels.available():
        return "c"
    if backend == "c":
        warnings.warn("the C kernels are not built (voxtral_ref._kernels missing): using the NumPy backend")
    return "numpy"


def load(model=DEFAULT_REPO, backend="auto", revision=None, offline=None, weights_format=None, cache_dir=None,
         progress=True, precision="f32", quantize=None):
    """Load a checkpoint (Mistral or HF format, with its tekken.json) from a directory, or from a hub repo
    id fetched once into the Hugging Face cache (hub.resolve). `weights_format` ("mistral" or "hf")
    picks one when a directory holds both, and which files a download fetches (default Mistral's).
    `precision` of the matmul inputs: "f32" (the oracle path) or "bf16" (rounded to bfloat16 as in a bf16
    model; 1.5-1.8x faster encoding measured where the CPU has bf16 dot products; see kernels.py).
    `quantize` replaces the large matrices by quantised copies (runtime/quant.py) that the kernels multiply
    with int8 activations: "int8" (8.5 bits per weight), "q4" (4.5 bits), or a recipe such as
    "q4,lm_head=int8" (quant.parse_recipe). A hub model's quantised copy is kept next to its cache entry
    (rebuilt when the source changes); a local checkpoint is quantised at load, unless `model` is a
    directory written by `voxtral-ref quantize`, which loads as it is (quantize=None or its own recipe)."""
    if precision not in kernels.PRECISIONS:
        raise VoxtralError(f"unknown precision {precision!r}: choose f32 or bf16")
    if isinstance(quantize, str):              # "q4, lm_head=int8" is "q4,lm_head=int8" (names hold no spaces)
        quantize = "".join(quantize.split())
    d = resolve(model, revision, offline, weights_format, cache_dir, progress)
    if quantized.is_quantized(d):
        return _load_quantized(d, backend, precision, quantize)
    fmt = detect_format(d, weights_format)
    formats = _plan(quantize, d, fmt)
    if not formats:                  # a recipe that quantises nothing ("none") is no quantisation: float KV caches
        quantize = None
    if formats and hub.is_snapshot(d):
        return _load_cached_copy(d, fmt, backend, precision, quantize, formats)
    return _load_checkpoint(d, fmt, backend, precision, quantize, formats)


def _load_cached_copy(d, fmt, backend, precision, quantize, formats):
    """A hub snapshot quantised: its copy beside the cache entry, (re)built under a lock when missing, stale,
    damaged or of another recipe. A cache that cannot hold it (read-only, full) gets a warning, and the
    model quantised in memory, as a local checkpoint is."""
    qdir = hub.quantized_cache_dir(d, quantize)

    def fresh():
        try:
            meta = quantized.read_metadata(qdir / quantized.QFILE)
        except VoxtralError:                   # missing, torn or overwritten: ours to rebuild
            return False
        return meta["recipe"] == quantize and quantized.is_fresh(meta, d, fmt)
    try:
        with quantized.building(qdir):
            if not fresh():
                model = _load_checkpoint(d, fmt, backend, precision, quantize, formats)
                write_quantized(model, qdir)
    except OSError as e:
        warnings.warn(f"cannot keep the quantised copy in {qdir} ({e.strerror or e}): quantising in memory, "
                      "again at every load")
        return _load_checkpoint(d, fmt, backend, precision, quantize, formats)
    return _load_quantized(qdir, backend, precision, quantize)


def _load_checkpoint(d, fmt, backend, precision, quantize, formats):
    """A Mistral or HF checkpoint directory, its matrices quantised as `formats` says ({} for none)."""
    tok = Tekken(d / "tekken.json")
    read = C.from_params_json if fmt == "mistral" else C.from_config_json
    cfg = read(d / ("params.json" if fmt == "mistral" else "config.json"), tok)
    keep_freed_memory_for_reuse()
    weights, backend = load_weights(d, cfg), resolve_backend(backend)
    if formats:
        with kernels.use(backend):
            weights.quantize(formats, kernels.quantize)
    weights.advise_pages()
    return Model(cfg, weights, tok, backend, d, precision, quantize, fmt)


def _plan(quantize, d, fmt):
    """{matrix: format} of a recipe, or a VoxtralError naming what is wrong with it."""
    if quantize is None:
        return {}
    from .checkpoint.weights import canonical_names
    try:
        read = C.from_params_json if fmt == "mistral" else C.from_config_json
        cfg = read(d / quantized.CONFIG_FILES[fmt], Tekken(d / "tekken.json"))
        shapes = {row[0]: row[3] for row in canonical_names(cfg)}
        return quant.plan(quantize, {**shapes, "lm_head": shapes["tok_embeddings"]})
    except ValueError as e:
        raise VoxtralError(f"quantize={quantize!r}: {e}") from None


def _load_quantized(d, backend, precision, quantize):
    """A directory written by write_quantized, memory-mapped."""
    meta = quantized.read_metadata(d / quantized.QFILE)
    if quantize is not None and quantize != meta["recipe"]:
        raise VoxtralError(f"{d} holds weights quantised as {meta['recipe']!r}, not {quantize!r}: load it with "
                           f"quantize=None, or quantize the original checkpoint")
    fmt = meta["source_format"]
    tok = Tekken(d / "tekken.json")
    read = C.from_params_json if fmt == "mistral" else C.from_config_json
    cfg = read(d / quantized.CONFIG_FILES[fmt], tok)
    keep_freed_memory_for_reuse()
    weights = quantized.load_weights(d, cfg, meta)
    weights.advise_pages()
    return Model(cfg, weights, tok, resolve_backend(backend), d, precision, meta["recipe"], fmt)


def write_quantized(model, out_dir):
    """Save a model loaded with quantize=... as a quantised checkpoint (see checkpoint/quantized.py)."""
    from . import __version__
    if not model.quantize:
        raise VoxtralError("nothing to quantise: the model was loaded without a quantize recipe, or with one that "
                           "keeps every matrix (e.g. 'none'); give one such as q4")
    quantized.write(out_dir, model.path, model.source_format, model.weights, model.quantize, __version__)


class Model:
    def __init__(self, cfg, weights, tokenizer, backend, path, precision="f32", quantize=None, source_format=None):
        self.cfg, self.weights, self.tokenizer, self.backend, self.path = cfg, weights, tokenizer, backend, path
        self.precision, self.quantize, self.source_format = precision, quantize, source_format or cfg.format
        # attention keys and values in int8 where the weights are quantised: a quarter of the bytes a live
        # step's attention reads (the KV caches grow to 1.7 GB at a full decoder window in float32, 0.46 GB in
        # int8), and integer dot products for the scores; f32 stays exact
        self.kv = "int8" if quantize else "f32"
        self.prefixes, self.prefix_lock = {}, threading.Lock()   # runtime/stream.session_prefix's saved starts
        # runtime/stream.time_pass's averages, {rows: seconds} of decoding passes (a plain session's own, an
        # engine's shared ones): what drafted rows cost on this host
        self.pass_seconds, self.pass_lock = {}, threading.Lock()

    def transcribe(self, audio, sample_rate=C.SAMPLE_RATE, delay_ms=None, trace=None, on_token=None, batch_size=1,
                   speculate=None):
        """One waveform -> Transcript; a list of waveforms -> a list, each result equal to transcribing its
        file alone (same ids). `batch_size` > 1 decodes up to that many files per pass over the weights
        (runtime/engine.py), which costs little more than one. `on_token(id)` is called as each token is
        generated (progress bars, live output; single waveforms only). `speculate=k` (0..MAX_DRAFT; one
        waveform) verifies up to k drafted tokens (generate.draft_tokens) with each position in one pass:
        the same ids, fewer passes when the drafts are right; 0 decodes one position per pass; None: a
        session's default (runtime/stream.BACKLOG_DRAFT) where a pass computes every row bit for bit as
        alone (`rows_exact`), else none, and none with a trace. A single waveform is encoded as it is
        decoded (see SESSION_FEED; with the C kernels on 2 threads by an encoder on a thread of its own,
        running ahead: `encodes_ahead`), except with `trace`, which encodes the whole file first
        (generate.greedy_decode) and traces each position once unless asked to speculate."""
        if not C.is_whole(batch_size) or batch_size < 1:
            raise VoxtralError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if speculate is not None and (not C.is_whole(speculate) or not 0 <= speculate <= MAX_DRAFT):
            raise VoxtralError(f"speculate must be None or an integer from 0 to {MAX_DRAFT}, got {speculate!r}")
        batch_size, speculate = int(batch_size), None if speculate is None else int(speculate)
        if isinstance(audio, (list, tuple)):
            if trace is not None or on_token is not None:
                raise VoxtralError("trace and on_token take one waveform, not a list")
            if speculate is not None and batch_size > 1:
                raise VoxtralError("speculate takes one waveform at a time (batch_size=1): an engine's sessions "
                                   "draft by their own rule")
            xs = []                    # every input checked first: one error naming the bad one, before any compute
            for i, a in enumerate(audio):
                if isinstance(a, (str, bytes, os.PathLike)):
                    raise VoxtralError(f"audio {i} of the batch is a file name: transcribe() takes samples (read the "
                                       "file with soundfile.read, or run `voxtral-ref transcribe` on the files)")
                if np.isscalar(a):
                    raise VoxtralError(f"audio {i} of the batch is a single number: a list or tuple is a batch of "
                                       "waveforms; pass one waveform as an array (np.asarray(samples))")
                try:
                    xs.append(to_mono_16k(a, sample_rate))                   # [N] @ 16 kHz
                except VoxtralError as e:
                    raise VoxtralError(f"audio {i} of the batch: {e}") from None
            if batch_size == 1:
                return [self.transcribe(x, C.SAMPLE_RATE, delay_ms, speculate=speculate) for x in xs]
            from .runtime.engine import transcribe_batch
            return transcribe_batch(self, xs, self.cfg.default_delay_ms if delay_ms is None else delay_ms, batch_size)
        delay_ms = self.cfg.default_delay_ms if delay_ms is None else delay_ms
        n_delay = C.delay_tokens(delay_ms)
        x = to_mono_16k(audio, sample_rate)                                  # [N] @ 16 kHz
        t0 = time.perf_counter()
        if trace is None:
            return self._transcribe_in_session(x, delay_ms, on_token, t0, max_draft=speculate)
        with self.kernel_mode():
            if trace:
                trace("audio", x)
            embeds = encode(self.weights, pad_offline(x, n_delay), trace=trace)   # [n_tokens, dim]
            t1 = time.perf_counter()
            ids = greedy_decode(self.weights, embeds, n_delay, trace=trace, on_token=on_token, speculate=speculate or 0)
        t2 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0}
        return Transcript(self.tokenizer.decode(ids), ids, delay_ms, len(x), timings)

    @property
    def decoder_quantised(self):
        """Whether every decoder matrix and the LM head is int8 / q4 (see `quantize=`)."""
        return all(f in quant.FORMATS for n, f in self.weights.formats().items()
                   if n == "lm_head" or n.startswith("dec.layers.") and n.rsplit(".", 1)[1] in quant.MATRIX_SUFFIXES)

    @property
    def rows_exact(self):
        """Whether a decoder pass of up to 4 rows (a position and its 3 drafts) computes each row bit for bit
        as it computes that row alone: with the C kernels (their float32 / bf16 GEMV sums each row in one
        order for 1-4 rows, the int8 / q4 linears take each row on its own, and attention each query), or
        with a quantised decoder (NumPy's twins of those kernels are row-independent too, while its float
        `x @ w.T` sums 1 and 4 rows in other orders, which could flip a near-tie). Sessions (and so
        transcribe()) draft by default only where it holds, so their ids are exactly those of one-at-a-time
        decoding, as a stream fed in real time decodes, for any chunking."""
        return self.backend == "c" or self.decoder_quantised

    def kernel_mode(self):
        """The context the model's computations run in: its backend, precision and KV dtype (kernels.use)."""
        return kernels.use(self.backend, self.precision, self.kv)

    def _transcribe_in_session(self, x, delay_ms, on_token, t0, session=None, max_draft=None):
        """transcribe() through a session (see SESSION_FEED): encoding and decoding interleave, so timings
        give the encoder's total (encode_s), the rest (decode_s: all but the time the decoding waited for the
        encoder, which with an encoder running ahead overlaps encode_s) and the first token's time. `session`:
        one made for x by the caller (an Engine's, for batches), else a plain one drafting up to max_draft,
        its encoder running ahead where that pays (`encodes_ahead`)."""
        from .runtime.stream import LOOK_AHEAD, StreamSession
        n_delay = C.delay_tokens(delay_ms)
        session = session or StreamSession(self, delay_ms, max_positions=C.n_positions(len(x), n_delay),
                                           max_draft=max_draft, encode_ahead=self.encodes_ahead)
        first = []

        def emit(tokens):
            if tokens and not first:
                first.append(time.perf_counter() - t0)
            for t in tokens:
                if on_token:
                    on_token(t)
            return tokens

        # The same pieces either way, so the encoder's chunks are (stream.EncoderAhead): the next is fed once
        # the session has decoded all it was fed, or, with an encoder running ahead, once that has less than
        # SESSION_FEED samples left to encode.
        start, size = 0, C.SAMPLES_PER_TOKEN * (n_delay + 1) + LOOK_AHEAD      # the first token's audio
        idle = True
        try:
            while True:
                while start < len(x) and (session.samples_unencoded() < SESSION_FEED if session.encodes_ahead
                                          else idle):
                    session.feed(x[start:start + size])
                    start, size, idle = start + size, min(2 * size, SESSION_FEED), False
                    if start >= len(x) and session.encodes_ahead:
                        session._end_audio()           # its pad is encoded ahead too
                if not emit(session.step(max_tokens=TOKENS_PER_STEP).token_ids):
                    if start >= len(x):
                        break
                    idle = True
            emit(session.close().token_ids)
        finally:
            session.stop_encoding()
        total = time.perf_counter() - t0
        timings = {"encode_s": session.encode_s, "decode_s": total - session.wait_s, "total_s": total,
                   "first_token_s": first[0] if first else total, "encoded_ahead": session.encodes_ahead}
        return Transcript(self.tokenizer.decode(session.token_ids), session.token_ids, delay_ms, len(x), timings)

    @property
    def encodes_ahead(self):
        """Whether transcribe() runs a file's encoder on a thread of its own, ahead of its decoder
        (runtime/stream.EncoderAhead): with the C kernels on 2 threads, one for each (where it was measured to
        pay: README, Performance). With more, the decoder's side would need a team of threads too, and the
        kernels' team serves one region at a time (csrc/pool.c), so the two sides would take turns."""
        from .runtime import ckernels     # (on first use: importing it reads VOXTRAL_REF_THREADS, and warns)
        return self.backend == "c" and ckernels.available() and ckernels.get_threads() == 2

    def stream(self, delay_ms=None, sample_rate=C.SAMPLE_RATE, past_eos=False):
        """A live session: feed(samples), step() -> Emission, close() -> Emission (see voxtral_ref.stream).
        For any chunking, a closed session's token_ids equal transcribe()'s."""
        from .runtime.stream import StreamSession
        return StreamSession(self, delay_ms, sample_rate, past_eos)

    def transcribe_stream(self, chunks, sample_rate=C.SAMPLE_RATE, delay_ms=None):
        """Iterable of audio chunks -> iterator of text deltas, each yielded as soon as it is decoded."""
        from .runtime.stream import text_deltas
        return text_deltas(self.stream(delay_ms, sample_rate), chunks)
