"""The server's session layer: many transcriptions, one model, one thread that runs it.

Every live WebSocket utterance and every uploaded file is a `Session` around a `StreamSession`. The event
loop only queues audio (`StreamSession.feed` is cheap and thread-safe) and asks for the end; the
`Scheduler`'s single thread owns the model and runs passes: each pass takes every session that has work
and calls `advance` on them, which decodes at most TOKENS_PER_PASS tokens per session. So a session that
is far behind (a client sending faster than real time, a long upload) is caught up in slices between
the others' turns, a silent client costs nothing, and the event loop never waits on the model.
`advance` is the one place the model runs: the sessions come from one batching engine
(runtime/engine.py) and step in threads of their own, so their decoder positions share passes over the
weights.

Results go back to the event loop with `loop.call_soon_threadsafe`; a session forgotten in the meantime
(its client disconnected) drops them, and its memory goes with its last reference.

Memory stays flat under load only with glibc's malloc told two things (`Heap`). Measured with 32 tiny-model
sessions: the live heap (mallinfo2's in-use bytes, the count of live Python objects; tracemalloc's total in
a 16-session run) stayed flat while RSS crept 104 -> 126 MB from 5 s to 40 s and glibc's 16 arenas held 186
-> 299 MB free. Each stepping thread (Engine.together starts fresh ones every pass) gets an arena of its
own, up to 8 per core, and `load()` keeps freed memory for reuse (no mmap, trim only beyond 256 MB free: the
offline encoder's speed), so every arena keeps its own high-water mark. One arena and a periodic malloc_trim
keep RSS at the live heap's size.
"""

import ctypes
import functools
import platform
import threading
import time
import traceback
import sys

import numpy as np

from ...config import EOS_ID, MS_PER_TOKEN, SAMPLE_RATE, SAMPLES_PER_TOKEN
from ...errors import VoxtralError
from ...runtime.engine import Engine

TOKENS_PER_PASS = 25                 # 2 s of audio per session per pass: catching up never starves the others
TRIM_EVERY_S = 5.0                   # freed heap pages go back to the OS this often while passes run


class Session:
    """One transcription. Fields written by the event loop (audio, end) are read by the scheduler's
    thread under the scheduler's lock; the stream itself is only stepped by that thread."""

    def __init__(self, engine, sample_rate, deliver, started=True):
        self.engine = engine            # the scheduler's, shared by all its sessions
        self.stream = engine.stream(None, sample_rate)
        self.sample_rate = sample_rate
        self.deliver = deliver          # deliver(emission, final, error) in the event loop thread
        self.started = started          # vLLM's protocol decodes only once the client commits
        self.received = 0               # samples fed, at sample_rate
        self.n_tokens = 0               # tokens decoded so far
        self.fresh = False              # audio fed since the last pass
        self.behind = False             # the last pass hit TOKENS_PER_PASS: more audio is decodable
        self.ending = False             # the client ended the audio
        self.finished = False           # the final emission was made
        self.forgotten = False          # the client is gone: drop whatever comes back
        self.upload = None              # [N] 16 kHz audio still to feed (files), a slice per pass
        self.at_eos = False             # decoding stopped at EOS, as offline does: later audio is dropped

    @property
    def received_s(self):
        return self.received / self.sample_rate

    def lag_s(self):
        """Seconds of received audio the decoder has not reached yet (0 after EOS: nothing more will be
        decoded). Token n comes out once (n + 1 + delay) tokens of audio are in, so n tokens cover
        (n + delay) * 80 ms; the result has the token clock's 80 ms granularity."""
        if self.at_eos:
            return 0.0
        upload = 0 if self.upload is None else len(self.upload) / SAMPLE_RATE
        covered = (self.n_tokens + self.stream.n_delay) * MS_PER_TOKEN / 1000
        return max(0.0, self.received_s - covered) + upload

    def has_work(self):
        if self.finished or self.forgotten or not self.started:
            return False
        return self.fresh or self.behind or self.ending or self.upload is not None

    def top_up(self):
        """Uploads are fed one pass of audio at a time, once the decoder has caught up, so the stream's
        buffer holds a slice and not the whole file."""
        if self.upload is None or self.behind:
            return
        n = TOKENS_PER_PASS * SAMPLES_PER_TOKEN
        piece, rest = self.upload[:n], self.upload[n:]
        self.stream.feed(piece)
        self.received += len(piece)
        self.upload = rest if len(rest) else None
        self.fresh = True


def advance(sessions):
    """One pass over the sessions that have work -> [(session, Emission or None, final, error)]. Each
    decodes at most TOKENS_PER_PASS tokens; a session whose audio has ended and been caught up is
    closed (offline's right pad, the final tokens). A failure stays with its session. The sessions step
    together (Engine.together), so their decoder positions share passes over the weights."""
    if not sessions:
        return []
    return [r for r, _ in sessions[0].engine.together([functools.partial(advance_one, s) for s in sessions])]


def advance_one(s):
    try:
        s.top_up()
        s.fresh = False
        if s.ending and not s.behind and s.upload is None:
            e, final = s.stream.close(), True
        else:
            e, final = s.stream.step(TOKENS_PER_PASS), False
            s.behind = len(e.token_ids) == TOKENS_PER_PASS
        s.n_tokens += len(e.token_ids)
        s.at_eos = s.at_eos or EOS_ID in e.token_ids
        return s, e, final, None
    except Exception as err:                           # noqa: BLE001 - one session's fault ends only it
        if not isinstance(err, VoxtralError):
            traceback.print_exc(file=sys.stderr)       # for the operator; the client gets a plain message
        return s, None, True, err


class Heap:
    """glibc's malloc, set for a server: one arena for every thread (Python allocates under the GIL, so more
    arenas add no parallelism, only memory each keeps), and `trim()` to hand freed pages back to the OS
    (`load()` sets a 256 MB trim threshold, so glibc alone never does). A no-op without glibc."""

    def __init__(self):
        self._libc = ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None
        if self._libc is not None:
            M_ARENA_MAX = -8                                                   # glibc's malloc.h
            self._libc.mallopt(M_ARENA_MAX, 1)      # threads started from now on; the server starts them all

    def trim(self):
        if self._libc is not None:
            self._libc.malloc_trim(0)


class Scheduler:
    """Owns the model: one thread runs `advance` over the sessions that have work, pass after pass; their
    sessions share one batching engine."""

    def __init__(self, model, loop, metrics):
        self.model, self.loop, self.metrics = model, loop, metrics
        self.engine = Engine(model)
        self.heap = Heap()
        self._cv = threading.Condition()
        self._sessions = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="voxtral-ref model", daemon=True)
        self._thread.start()

    # --- called from the event loop ---------------------------------------------------------------------
    def open(self, sample_rate, deliver, started=True, upload=None):
        """A new Session; with `upload` ([N] 16 kHz samples) a whole file, ended from the start."""
        with self._cv:
            s = Session(self.engine, sample_rate, deliver, started)
            s.upload, s.ending = upload, upload is not None
            self._sessions.append(s)
            self._cv.notify()
            self.metrics.open_sessions.set(len(self._sessions))
            return s

    def forget(self, s):
        """The client is gone (or cleared the audio): the session leaves at once, mid-pass results are
        dropped."""
        with self._cv:
            s.forgotten, s.deliver = True, None
            if s in self._sessions:
                self._sessions.remove(s)
            self.metrics.open_sessions.set(len(self._sessions))

    def feed(self, s, samples):
        """Queue audio (int16 or float PCM at the session's rate)."""
        with self._cv:
            s.stream.feed(samples)
            s.received += len(samples)
            s.fresh = True
            self._cv.notify()

    def start(self, s):
        with self._cv:
            s.started = True
            self._cv.notify()

    def end(self, s):
        """End of audio: the session is caught up, closed, and its final emission delivered."""
        with self._cv:
            s.ending = s.started = True
            self._cv.notify()

    def lags(self):
        with self._cv:
            return [s.lag_s() for s in self._sessions]

    def count(self):
        with self._cv:
            return len(self._sessions)

    def stop(self):
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()

    # --- the model's thread -----------------------------------------------------------------------------
    def _run(self):
        trimmed, ran = time.monotonic(), False          # ran: passes since the last trim
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or any(s.has_work() for s in self._sessions),
                                  TRIM_EVERY_S if ran else None)
                if self._stop:
                    return
            if ran and time.monotonic() - trimmed >= TRIM_EVERY_S:
                self.heap.trim()
                trimmed, ran = time.monotonic(), False
            ran = self._pass() or ran

    def _pass(self):
        """One pass over the sessions that have work -> whether there were any. Only this call's locals hold
        them: a finished or forgotten session is not kept alive by the last pass while the server idles."""
        with self._cv:
            batch = [s for s in self._sessions if s.has_work()]
        if not batch:
            return False
        t0 = time.perf_counter()
        results = advance(batch)
        self.metrics.pass_seconds.observe(time.perf_counter() - t0)
        self.metrics.pass_sessions.observe(len(batch))
        with self._cv:
            for s, e, final, err in results:
                if final:
                    s.finished = True
                    if s in self._sessions:
                        self._sessions.remove(s)
                if e is not None:
                    for t in e.latency_s:
                        self.metrics.token_latency.observe(t)
                if not s.forgotten:
                    self.metrics.session_lag.observe(s.lag_s())
                    self.loop.call_soon_threadsafe(_deliver, s, e, final, err)
            self.metrics.open_sessions.set(len(self._sessions))
        return True


def _deliver(s, e, final, err):
    if not s.forgotten:
        s.deliver(e, final, err)
    if final:
        # Its last result: the callback goes (forget() drops it too). A client's callback refers back to the
        # session (protocols.Connection.open), a cycle that only a full run of the cyclic garbage collector
        # would free, and those are rare: on the full-size q4 model the server's RSS had grown 2.6 -> 6.2 GB
        # after 100 vanished clients, their sessions' KV caches still held.
        s.deliver = None


def pcm16(raw):
    """Little-endian 16-bit PCM bytes -> int16 samples [N]; an odd byte count is refused, not truncated."""
    if len(raw) % 2:
        raise VoxtralError(f"PCM16 audio must have an even number of bytes, got {len(raw)}")
    return np.frombuffer(raw, "<i2")
