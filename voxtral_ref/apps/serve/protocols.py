"""WebSocket /v1/realtime in two dialects, chosen per connection.

vLLM's (the default; what the model card documents). Client events: `session.update {model}`,
`input_audio_buffer.append {audio}` (base64 PCM16, 16 kHz, mono), `input_audio_buffer.commit {final}`.
Server events: `session.created {id, created}` on connect, `transcription.delta {delta}`,
`transcription.done {text, usage}`, `error {error, code}`. As in vLLM, audio may be appended at any
time but is decoded only once a commit starts the utterance, and a commit needs a session.update that
named the served model first; `commit {final: true}` ends the audio, `transcription.done` follows with
the whole text, and the next commit starts a new utterance.

OpenAI's Realtime transcription sessions (`?intent=transcription`). Client events: `session.update
{session: {type: "transcription", audio: {input: {format: {type: "audio/pcm", rate: 24000},
transcription: {model}, turn_detection: null}}}}`, `input_audio_buffer.append/commit/clear`. Server
events: `session.created/updated {session}`, `input_audio_buffer.committed {item_id, previous_item_id}`,
`input_audio_buffer.cleared`, `conversation.item.input_audio_transcription.delta {item_id, delta}` and
`.completed {item_id, transcript, usage}`, `error {error: {type, code, message, param, event_id}}`.
The first append after a commit opens an item; its deltas stream while audio arrives (this model
transcribes live) and `.completed` follows its commit. 24 kHz audio is resampled by the session
(soxr's stream resampler, as `Model.stream` does). There is no voice activity detection: turn_detection
must stay null and the client commits.

Both: error codes are shared (invalid_json, invalid_event, unknown_event, invalid_audio,
model_not_found, model_not_validated, audio_buffer_full, processing_error, idle_timeout, ...); after an
error event the connection goes on. However a connection ends, except by the client leaving, open
audio is finished first and its final event sent. A client that leaves frees its sessions at once.
"""

import asyncio
import base64
import binascii
import contextlib
import json
import time
import uuid

from ...config import SAMPLE_RATE, prompt_ids, show
from ...errors import VoxtralError
from .http import REFUSALS, deny, error_body, language_code, model_not_found
from .sessions import pcm16

OPENAI_RATE = 24000                      # OpenAI's audio/pcm is 24 kHz, 16-bit, mono, little-endian
MAX_OUTBOX_BYTES = 4 << 20               # events queued for a client that does not read: then it is dropped
CLOSE_TIMEOUT_S = 10.0                   # the last events and the close, to a client that may not read them
INTENTS = {None: "vllm", "transcription": "openai"}
EVENT_ID_CHARS = 256                     # of a client's event_id echoed in an error


class BadEvent(Exception):
    def __init__(self, code, message, param=None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


async def realtime(ws):
    """The /v1/realtime endpoint: picks the dialect by `intent`."""
    intent = ws.query_params.get("intent")
    if intent not in INTENTS:
        ws.app.state.server.metrics.errors.labels("invalid_value").inc()
        return await deny(ws.scope, ws.send, 400, error_body(
            f"unknown intent {show(intent)}: leave it out (vLLM's protocol) or use intent=transcription "
            "(OpenAI's)", "invalid_value", param="intent"))
    cls = OpenAIConnection if INTENTS[intent] == "openai" else VllmConnection
    await cls(ws, ws.app.state.server).run()


class Connection:
    """One WebSocket client: a reader that answers each event at once, sessions that the model's thread
    advances, and one sender task that writes every event out in order."""

    def __init__(self, ws, state):
        self.ws, self.state = ws, state
        self.scheduler = state.scheduler
        self.sessions = []                   # this client's sessions awaiting their final event
        self.outbox = asyncio.Queue()
        self.outbox_bytes = 0                # queued and not yet handed to the transport
        self._settled = asyncio.Event()      # set while no session awaits its final event
        self._reader = None
        self._stopping = None                # why the connection is being ended by the server

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def run(self):
        await self.ws.accept()
        refused = self.state.admit(self)
        if refused:
            self.error(refused, REFUSALS[refused])
            await self.ws.send_text(self.outbox.get_nowait())
            await self.ws.close(1013, REFUSALS[refused])          # 1013: try again later
            return
        self._sender = sender = asyncio.create_task(self._send_all())
        try:
            self.emit(self.created())
            self._reader = asyncio.create_task(self._read_all())
            await asyncio.wait({self._reader})
            end = self._stopping or self._reader.result()
            if end != "gone":
                await self._finish(end)
        finally:
            for s in self.sessions:
                self.scheduler.forget(s)
            self.sessions.clear()
            self.outbox.put_nowait(None)
            # a client that stopped reading cannot hold its place: its transport waits for it, this does not
            await asyncio.wait({sender}, timeout=CLOSE_TIMEOUT_S)
            sender.cancel()
            self.state.release(self)
        if end != "gone":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ws.close(1001 if end == "shutdown" else 1000), CLOSE_TIMEOUT_S)

    def shutdown(self):
        """SIGTERM: stop reading; run() finishes the open audio, sends the final events and closes."""
        self._stop("shutdown")

    def _stop(self, why):
        if self._stopping is None:
            self._stopping = why
        if self._reader is not None:
            self._reader.cancel()

    async def _finish(self, end):
        self.end_audio()
        while self.sessions:
            await self._settled.wait()
        if end == "idle":
            self.error("idle_timeout", f"no event for {self.state.limits.idle_timeout_s:g} s: closing")

    async def _read_all(self):
        """-> "gone" (the client left or stopped reading) or "idle"."""
        limit = self.state.limits.idle_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), limit)
            except asyncio.TimeoutError:
                if any(s.ending for s in self.sessions):           # a final is on its way: not idle
                    continue
                return "idle"
            if message["type"] == "websocket.disconnect":
                return "gone"
            self.handle(message.get("text"))

    async def _send_all(self):
        while (text := await self.outbox.get()) is not None:
            try:
                await self.ws.send_text(text)  # waits while the client's transport is full
            except Exception:                  # noqa: BLE001 - the client is gone; the reader sees it too
                return
            self.outbox_bytes -= len(text)

    # --- events -------------------------------------------------------------------------------------------
    def handle(self, text):
        event = {}
        try:
            if text is None:
                raise BadEvent("invalid_json", "expected a text message holding one JSON event")
            try:
                event = json.loads(text)
            except (ValueError, RecursionError):
                raise BadEvent("invalid_json", "the message is not valid JSON") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                event = event if isinstance(event, dict) else {}
                raise BadEvent("invalid_event", "an event is a JSON object with a string `type`", "type")
            handler = self.handlers.get(event["type"])
            if handler is None:
                raise BadEvent("unknown_event", f"unknown event type {event['type'][:64]!r}", "type")
            handler(self, event)
        except BadEvent as e:
            event_id = event.get("event_id")
            self.error(e.code, e.message, e.param, event_id[:EVENT_ID_CHARS] if isinstance(event_id, str) else None)

    def emit(self, event):
        """Queue an event for the client; one that lets MAX_OUTBOX_BYTES pile up unread is dropped, as if
        it had left (its sessions are forgotten: no final, nothing more to send)."""
        text = json.dumps(event, ensure_ascii=False)
        try:
            text.encode()
        except UnicodeEncodeError:             # a lone surrogate the client sent (an event_id): \u-escape it
            text = json.dumps(event)
        self.outbox_bytes += len(text)
        self.outbox.put_nowait(text)
        if self.outbox_bytes > MAX_OUTBOX_BYTES:
            self._stop("gone")

    def audio(self, event):
        """The event's base64 PCM16 `audio` -> int16 samples, refused beyond the session's buffer cap."""
        b64 = event.get("audio")
        if not isinstance(b64, str):
            raise BadEvent("invalid_event", "`audio` must be a base64 string of PCM16 samples", "audio")
        try:
            samples = pcm16(base64.b64decode(b64, validate=True))
        except (binascii.Error, ValueError, VoxtralError) as e:
            why = str(e) if isinstance(e, VoxtralError) else "`audio` is not valid base64"
            raise BadEvent("invalid_audio", why, "audio") from None
        if not len(samples):
            raise BadEvent("invalid_audio", "`audio` holds no samples", "audio")
        return samples

    def feed(self, s, samples):
        cap = self.state.limits.max_buffer_s
        if s.lag_s() + len(samples) / s.sample_rate > cap:
            raise BadEvent("audio_buffer_full", f"more than {cap:g} s of audio waiting to be decoded: this chunk "
                           "was dropped; send audio no faster than the server decodes it", "audio")
        self.scheduler.feed(s, samples)

    def open(self, rate, started):
        s = self.scheduler.open(rate, lambda e, final, err: self._delivered(s, e, final, err), started)
        self.sessions.append(s)
        self._settled.clear()
        return s

    def drop(self, s):
        """Forget a session of this client's unfinished: no final event will come for it."""
        self.scheduler.forget(s)
        self.sessions.remove(s)
        if not self.sessions:
            self._settled.set()

    def _delivered(self, s, e, final, err):
        """A pass's result for one of this client's sessions, in the event loop."""
        if err is not None:
            self.error("processing_error", err if isinstance(err, VoxtralError) else
                       "the transcription failed (see the server's log)", type_="server_error")
        if e is not None and e.text:
            self.delta(s, e.text)
        if final:
            self.final(s)
            if s in self.sessions:
                self.sessions.remove(s)
            if not self.sessions:
                self._settled.set()

    def error(self, code, message, param=None, event_id=None, type_="invalid_request_error"):
        self.state.metrics.errors.labels(code).inc()
        self.emit(self.error_event(code, str(message), param, event_id, type_))


class VllmConnection(Connection):
    def __init__(self, ws, state):
        super().__init__(ws, state)
        self.validated = False
        self.current = None                       # the utterance audio is appended to

    def created(self):
        return {"type": "session.created", "id": f"sess-{uuid.uuid4().hex}", "created": int(time.time())}

    def error_event(self, code, message, param, event_id, type_):
        return {"type": "error", "error": message, "code": code}

    def session_update(self, event):
        model = event.get("model")
        if model != self.state.model_name:
            raise BadEvent("model_not_found", model_not_found(model, self.state.model_name), "model")
        self.validated = True

    def append(self, event):
        samples = self.audio(event)
        self.feed(self.current or self._new(), samples)

    def commit(self, event):
        if not self.validated:
            raise BadEvent("model_not_validated", "send session.update with the served model before committing "
                           "audio", "model")
        final = event.get("final", False)
        if not isinstance(final, bool):
            raise BadEvent("invalid_event", f"`final` must be true or false, got {show(final)}", "final")
        s = self.current or self._new()
        if final:
            self.scheduler.end(s)
            self.current = None
        else:
            self.scheduler.start(s)

    def _new(self):
        self.current = self.open(SAMPLE_RATE, started=False)
        return self.current

    def end_audio(self):
        """The connection ends: an utterance the client started (committed) is finished; audio it only
        appended was never asked for, and is dropped, as vLLM drops it."""
        s, self.current = self.current, None
        if s is None:
            return
        if s.started:
            self.scheduler.end(s)
        else:
            self.drop(s)

    def delta(self, s, text):
        self.emit({"type": "transcription.delta", "delta": text})

    def final(self, s):
        n_prompt = len(prompt_ids(s.stream.n_delay))
        self.emit({"type": "transcription.done", "text": s.stream.text,
                   "usage": {"prompt_tokens": n_prompt, "completion_tokens": s.n_tokens,
                             "total_tokens": n_prompt + s.n_tokens}})

    handlers = {"session.update": session_update, "input_audio_buffer.append": append,
                "input_audio_buffer.commit": commit}


class OpenAIConnection(Connection):
    def __init__(self, ws, state):
        super().__init__(ws, state)
        self.id = f"sess_{uuid.uuid4().hex}"
        self.current = None                        # the item audio is appended to
        self.item_ids = {}                         # session -> its item id
        self.last_item = None

    def event(self, type_, **fields):
        return {"type": type_, "event_id": f"event_{uuid.uuid4().hex}", **fields}

    def session(self):
        return {"type": "transcription", "id": self.id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": OPENAI_RATE},
                                    "transcription": {"model": self.state.model_name},
                                    "turn_detection": None, "noise_reduction": None}},
                "include": []}

    def created(self):
        return self.event("session.created", session=self.session())

    def error_event(self, code, message, param, event_id, type_):
        return self.event("error", error={"type": type_, "code": code, "message": message, "param": param,
                                          "event_id": event_id})

    def session_update(self, event):
        """Checks what this server can do and changes nothing (the one format, model and mode it has);
        answers session.updated with the session as it is."""
        session = event.get("session")
        if not isinstance(session, dict):
            raise BadEvent("invalid_event", "session.update needs a `session` object", "session")
        if session.get("type", "transcription") != "transcription":
            raise BadEvent("invalid_value", "this server runs transcription sessions only: session.type must be "
                           "'transcription'", "session.type")
        audio_in = _get(session, "audio", "input")
        fmt = _get(audio_in, "format")
        if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", OPENAI_RATE) != OPENAI_RATE:
            raise BadEvent("invalid_value", "the input format must be audio/pcm at 24000 Hz",
                           "session.audio.input.format")
        transcription = _get(audio_in, "transcription")
        model = transcription.get("model", self.state.model_name)
        if model != self.state.model_name:
            raise BadEvent("model_not_found", model_not_found(model, self.state.model_name),
                           "session.audio.input.transcription.model")
        why = language_code(transcription.get("language"))
        if why:
            raise BadEvent("invalid_value", why, "session.audio.input.transcription.language")
        if transcription.get("prompt"):
            raise BadEvent("invalid_value", "this model takes no text prompt: leave it out",
                           "session.audio.input.transcription.prompt")
        if audio_in.get("turn_detection") is not None:
            raise BadEvent("invalid_value", "turn detection is not supported: set turn_detection to null and "
                           "commit the audio", "session.audio.input.turn_detection")
        if audio_in.get("noise_reduction") is not None:
            raise BadEvent("invalid_value", "noise reduction is not offered: set noise_reduction to null",
                           "session.audio.input.noise_reduction")
        if session.get("include"):
            raise BadEvent("invalid_value", "this server returns no logprobs: leave `include` empty", "session.include")
        self.emit(self.event("session.updated", session=self.session()))

    def append(self, event):
        samples = self.audio(event)
        if self.current is None:
            self.current = self.open(OPENAI_RATE, started=True)
            self.item_ids[self.current] = f"item_{uuid.uuid4().hex}"
        self.feed(self.current, samples)

    def commit(self, event):
        if self.current is None:
            raise BadEvent("input_audio_buffer_commit_empty", "no audio was appended since the last commit")
        self.end_audio()

    def clear(self, event):
        if self.current is not None:
            self.drop(self.current)
            del self.item_ids[self.current]
            self.current = None
        self.emit(self.event("input_audio_buffer.cleared"))

    def end_audio(self):
        if self.current is None:
            return
        item = self.item_ids[self.current]
        self.emit(self.event("input_audio_buffer.committed", item_id=item, previous_item_id=self.last_item))
        self.scheduler.end(self.current)
        self.current, self.last_item = None, item

    def delta(self, s, text):
        self.emit(self.event("conversation.item.input_audio_transcription.delta", item_id=self.item_ids[s],
                             content_index=0, delta=text))

    def final(self, s):
        self.emit(self.event("conversation.item.input_audio_transcription.completed",
                             item_id=self.item_ids.pop(s), content_index=0, transcript=s.stream.text,
                             usage={"type": "duration", "seconds": round(s.received_s, 3)}))

    handlers = {"session.update": session_update, "input_audio_buffer.append": append,
                "input_audio_buffer.commit": commit, "input_audio_buffer.clear": clear}


def _get(obj, *keys):
    """obj[k1][k2]... where each level must be an object if present; a missing or null level is {}."""
    for k in keys:
        obj = obj.get(k)
        if obj is None:
            obj = {}
        elif not isinstance(obj, dict):
            raise BadEvent("invalid_event", f"`{k}` must be an object", k)
    return obj
