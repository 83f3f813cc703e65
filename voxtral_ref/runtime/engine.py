"""Continuous batching: one decoder pass over the weights serves the next positions of many sequences.

Decoding is memory-bound: a pass for one position of one stream reads every decoder weight (3.65 GB in
int8) to multiply a single row. A pass that stacks the pending rows of M sequences reads them once for all
(`generate.decoder_pass`: every weight one kernels.linear over the stack, attention per sequence against
its own KV caches, the AdaRMSNorm scale per row from its own sequence's delay). Sequences join and leave
between passes, and any mix of delays, offline files and live sessions shares them.

Each sequence feeds exactly the chunks it feeds alone (`Decoder.chunk`: the silence prefix, the rest of the
prompt, then one position per pass) and every row is computed on its own, so its ids are those of decoding
it alone. With quantised weights its logits are bit-identical too (the int8 / q4 kernels compute each row
the same way whatever the number of rows); the float32 / bf16 `linear` does so up to 4 rows (its GEMV) and
switches to a GEMM above, which sums in another order, so past 4 rows a pass's logits differ from a lone
sequence's by float32 rounding.

Two ways in:
  files      `Model.transcribe(list, batch_size=N)` (`transcribe_batch`): N threads each run a file exactly
             as transcribe() does, in a session of this engine, the next file taking the place of one
             that ends, so a batch gives each file transcribe()'s result.
  stream()   live sessions (StreamSession's feed/step/close), each stepped by its caller's thread, or
             several at once by `together` (the server's `advance`). While a session steps, its decoder
             chunks wait here for a pass. A pass runs as soon as every thread stepping one of this engine's
             sessions is waiting for one (or max_batch chunks wait): a session still encoding its next
             position will have it within milliseconds, and a pass costs about as much for 16 rows as for
             one. It takes up to max_batch chunks, oldest first; one of the waiting threads runs it for all.
A live session behind its audio brings the last id and drafted tokens (runtime/stream.py's backlog
verification): its chunk is several rows, and the drafts only fill the rows a pass has to spare under
max_batch (`_fit_drafts`): catching up never pushes a shared pass past max_batch rows.
A live session's encoder chunks meet the same way (`stream.encoder_pass`): the conv-stem frames of each
session stepping at the same time, at its own positions, stacked through every encoder and adapter weight
once, attention per session against its own encoder caches; N streams then read the encoder's weights
once per round instead of N times. When every stepping thread waits, the waiting encoder chunks run first:
their sessions' decoder positions then join the decoder pass the others wait in.
A chunk that is malformed fails alone, before it joins a pass; an error inside a pass (out of memory) fails
every sequence in that pass.
"""

import contextlib
import threading
import time

from .stream import ENCODER_BATCHED, StreamSession, check_encoder_chunk, encoder_pass, time_pass
from ..config import SAMPLE_RATE, delay_tokens, is_whole, n_positions
from ..errors import VoxtralError
from ..stages.generate import BATCHED, check_chunk, decoder_pass

MAX_BATCH = 16                    # rows per pass: the small-row kernels' range (issue 11)


ENCODER, DECODER = "encoder", "decoder"      # the passes, in the order a pass is chosen when all wait


class _Job:
    """One sequence's chunk waiting for a pass, and what the pass made of it. work: a decoder chunk's
    (Decoder, its audio embeddings), or a session's encoder chunk (conv-stem frames, positions, caches)."""

    def __init__(self, kind, work):
        self.kind, self.work = kind, work
        self.result, self.error, self.done = None, None, False
        self.ticket = None                # while queued: the jobs of its thread's call, which waits for all

    @property
    def dec(self):                        # a decoder chunk's Decoder ...
        return self.work[0]

    @property
    def audio_embeds(self):               # ... and its audio embeddings [t, dim]
        return self.work[1]


class Engine:
    """Decodes many sequences together: `decode` for files, `stream` for live sessions (thread-safe)."""

    def __init__(self, model, max_batch=MAX_BATCH):
        if not is_whole(max_batch) or max_batch < 1:
            raise VoxtralError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model, self.max_batch = model, int(max_batch)
        self._cv = threading.Condition(threading.Lock())
        self._queues = {ENCODER: [], DECODER: []}  # [_Job] waiting for a pass of each kind, oldest first
        self._stepping = 0                # threads inside `stepping()`: a pass waits for each of them ...
        self._waiting = 0                 # ... to be waiting for one
        self._running = False             # one of the waiting threads is running a pass
        self.passes, self.rows = 0, 0     # decoder passes run, and the chunks they took (rows / passes per pass)
        self.encoder_passes, self.encoder_chunks = 0, 0   # the same for encoder passes (sessions' chunks)

    # --- live sessions -----------------------------------------------------------------------------------
    def stream(self, delay_ms=None, sample_rate=SAMPLE_RATE, past_eos=False):
        """A live session (as Model.stream) whose decoder positions run in this engine's shared passes."""
        return EngineSession(self, delay_ms, sample_rate, past_eos)

    def together(self, calls):
        """Run zero-argument calls that step this engine's sessions (their step(), close(), or work around
        them), each in a thread of its own, max_batch at a time, all counted as stepping before any starts:
        a pass then waits for each of them to have its position ready or be done, so none runs short of a
        row that is on its way. -> [(result, None) or (None, exception)] in order."""
        results = [None] * len(calls)

        def worker(i, call):
            try:
                with self._routed():
                    results[i] = (call(), None)
            except Exception as e:                           # noqa: BLE001 - handed back with its call
                results[i] = (None, e)
            finally:
                self._leave()

        for lo in range(0, len(calls), self.max_batch):
            group = [threading.Thread(target=worker, args=(i, calls[i]), name="voxtral-ref step")
                     for i in range(lo, min(lo + self.max_batch, len(calls)))]
            with self._cv:
                self._stepping += len(group)
            for t in group:
                t.start()
            for t in group:
                t.join()
        return results

    @contextlib.contextmanager
    def stepping(self):
        """Count this thread among those a pass waits for, and send its decoders' chunks here (once: inside
        `together`, or nested, the thread is counted already)."""
        if BATCHED.get() == self._run_one:
            yield
            return
        with self._cv:
            self._stepping += 1
        try:
            with self._routed():
                yield
        finally:
            self._leave()

    @contextlib.contextmanager
    def holding(self, lock):
        """Hold `lock`. A thread counted as stepping (in `together`) stops counting while it waits for it:
        the thread holding it may be waiting for a pass, which would wait for this one (two calls of one
        `together` stepping the same session)."""
        if not lock.acquire(blocking=False):
            counted = BATCHED.get() == self._run_one
            if counted:
                self._leave()
            try:
                lock.acquire()
            finally:
                if counted:
                    with self._cv:
                        self._stepping += 1
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _routed(self):
        """Send this thread's decoder chunks and sessions' encoder chunks to this engine's passes."""
        tokens = BATCHED.set(self._run_one), ENCODER_BATCHED.set(self._encode_one)
        try:
            yield
        finally:
            BATCHED.reset(tokens[0])
            ENCODER_BATCHED.reset(tokens[1])

    def _leave(self):
        with self._cv:
            self._stepping -= 1
            self._cv.notify_all()          # the threads left waiting may now be all there is

    def _run_one(self, dec, audio_embeds):
        job, = self.run([(dec, audio_embeds)])
        if job.error is not None:
            raise job.error
        return job.result

    def _encode_one(self, frames, pos, caches):
        """A session's encoder chunk (stream.ENCODER_BATCHED) -> its audio embeddings, from a shared pass."""
        check_encoder_chunk(self.model.weights, frames, pos, caches)     # a malformed one fails alone, here
        job = _Job(ENCODER, (frames, pos, caches))
        self._wait([job])
        if job.error is not None:
            raise job.error
        return job.result

    # --- the passes --------------------------------------------------------------------------------------
    def run(self, work):
        """[(Decoder, audio embeddings of its next chunk)] -> their _Jobs once done (tokens or error), run in
        this engine's next passes together with the other threads' chunks. Call inside `stepping()`."""
        jobs = [_Job(DECODER, w) for w in work]
        for job in jobs:
            try:
                check_chunk(*job.work)
            except ValueError as e:
                job.error, job.done = e, True
        self._wait([j for j in jobs if not j.done])
        return jobs

    def _wait(self, ticket):
        """Queue a thread's jobs and wait until they are done, running passes (any thread's) meanwhile."""
        for j in ticket:
            j.ticket = ticket
        with self._cv:
            if ticket:
                for j in ticket:
                    self._queues[j.kind].append(j)
                self._waiting += 1        # until the pass that completes the ticket (_finish)
            while not all(j.done for j in ticket):
                kind = self._next_pass()
                if kind is None:
                    self._cv.wait()
                    continue
                queue = self._queues[kind]
                batch, self._queues[kind] = queue[:self.max_batch], queue[self.max_batch:]
                if kind == DECODER:
                    _fit_drafts(batch, self.max_batch)
                self._running = True
                self._cv.release()
                try:
                    error = self._pass(kind, batch)
                finally:
                    self._cv.acquire()
                    self._finish(kind, batch)
                if error is not None and not isinstance(error, Exception):
                    raise error               # KeyboardInterrupt: every job of the pass holds it too
            # every pass with one of them has finished: job -> ticket -> job is a cycle that only the cyclic
            # garbage collector would free, holding the KV caches a job refers to until then (a server's RSS
            # grew with its vanished clients, apps/serve/sessions.py)
            for j in ticket:
                j.ticket = None

    def _next_pass(self):
        """Under the lock: the kind of pass to run now, or None to wait. A full queue runs at once; else a pass
        waits for every stepping thread to be waiting, and then encoder chunks go first: their sessions'
        decoder positions can then join the next decoder pass instead of needing one of their own."""
        if self._running:
            return None
        full = [k for k, q in self._queues.items() if len(q) >= self.max_batch]
        if full:
            return full[0]
        if self._waiting < self._stepping:
            return None
        return next((k for k, q in self._queues.items() if q), None)

    def _pass(self, kind, batch):
        """One pass of the kind over the batch's chunks, the lock released (other threads queue meanwhile).
        -> None, or the error that failed every chunk of it."""
        run = encoder_pass if kind == ENCODER else decoder_pass
        # a decoding pass (every chunk past its prompt) is timed by its rows a chunk, as a plain session times
        # its own (stream.time_pass): what each session's drafted rows cost when its peers draft alike. By its
        # total rows, sessions that always share passes never timed a 1-row one (pass_ratio: inf), so they
        # never drafted: 2 live q4 sessions of an engine on 2 Zen 4 cores ran passes of 2 rows for 1.1 tokens a
        # session, busy 1.38x real time (twenty-sixth session)
        decoding = kind != ENCODER and all(j.dec.chunk()[1] >= len(j.dec.prompt) for j in batch)
        try:
            t0 = time.perf_counter()
            with self.model.kernel_mode():
                results = run(self.model.weights, [j.work for j in batch])
            if decoding:
                rows = sum(len(j.audio_embeds) for j in batch)
                time_pass(self.model, max(1, round(rows / len(batch))), time.perf_counter() - t0)
        except BaseException as e:                           # noqa: BLE001 - handed to every sequence in it
            for j in batch:
                j.error = e
            return e
        for j, r in zip(batch, results):
            j.result = r
        return None

    def _finish(self, kind, batch):
        """Under the lock: the batch's jobs are done, and the threads whose every job is done stop counting
        as waiting in the same step, so a thread served here cannot pass for one still waiting while it
        prepares its next chunk (a pass would then start without it)."""
        for j in batch:
            j.done = True
        for ticket in {id(j.ticket): j.ticket for j in batch}.values():
            if all(j.done for j in ticket):
                self._waiting -= 1
        if kind == ENCODER:
            self.encoder_passes, self.encoder_chunks = self.encoder_passes + 1, self.encoder_chunks + len(batch)
        else:
            self.passes, self.rows = self.passes + 1, self.rows + len(batch)
        self._running = False
        self._cv.notify_all()


def _fit_drafts(batch, max_rows):
    """Cut the drafts of a pass's chunks (the oldest chunks' kept first) to the rows left under max_rows by
    the chunks' own rows: past a few rows a pass costs about its rows (README, Batching), while a draft
    costs nothing to drop (its session feeds those positions again; exact either way)."""
    spare = max_rows - sum(len(j.audio_embeds) - len(j.dec.draft) for j in batch)
    for j in batch:
        keep = min(len(j.dec.draft), max(spare, 0))
        spare -= keep
        if keep < len(j.dec.draft):
            j.work = (j.dec, j.audio_embeds[:len(j.audio_embeds) - len(j.dec.draft) + keep])   # [1 + keep, dim]
            j.dec.draft = j.dec.draft[:keep]


class EngineSession(StreamSession):
    """A live session (see runtime/stream.py) whose steps run their decoder positions in the engine's passes,
    with the other sessions' that are stepping at the same time. Make one with `Engine.stream()`."""

    def __init__(self, engine, delay_ms=None, sample_rate=SAMPLE_RATE, past_eos=False, max_positions=None):
        super().__init__(engine.model, delay_ms, sample_rate, past_eos, max_positions=max_positions)
        self._engine = engine
        self._turn = threading.Lock()     # one thread of this session at a time counts as stepping

    def step(self, max_tokens=None):
        with self._engine.holding(self._turn), self._engine.stepping():
            return super().step(max_tokens)

    def close(self):
        with self._engine.holding(self._turn), self._engine.stepping():
            return super().close()


def transcribe_batch(model, xs, delay_ms, batch_size):
    """Model.transcribe(list, batch_size=N) of checked 16 kHz inputs xs ([N_i] float32 each): N threads each
    take the next file and run exactly what transcribe() runs for it alone (Model._transcribe_in_session: the
    same feeds, encoder chunks and decoder positions), its session one of an Engine's, so the files' encoder
    and decoder passes are shared. -> [Transcript], each transcribe()'s for its file: the same ids, and with
    quantised weights the same logits bit for bit (every row is computed on its own); a file whose decoding
    fails raises its error once all have ended."""
    engine, n_delay, out = Engine(model, batch_size), delay_tokens(delay_ms), [None] * len(xs)
    todo, lock, stop = iter(range(len(xs))), threading.Lock(), threading.Event()

    def worker():
        while not stop.is_set():
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                # made before counting as stepping: the first computes the silence prefix, alone, while the
                # others wait for it (runtime/stream.session_prefix)
                session = EngineSession(engine, delay_ms, max_positions=n_positions(len(xs[i]), n_delay))
                with engine.stepping():  # counted between its steps too: a pass waits for its next position
                    out[i] = model._transcribe_in_session(xs[i], delay_ms, None, time.perf_counter(), session)
            except Exception as e:                           # noqa: BLE001 - raised below, once all have ended
                out[i] = e

    threads = [threading.Thread(target=worker, name="voxtral-ref file") for _ in range(min(batch_size, len(xs)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:                 # Ctrl-C: the files in flight end, no other starts (and keeps the process)
        stop.set()
        raise
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out
