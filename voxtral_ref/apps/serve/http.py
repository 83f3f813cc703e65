"""The ASGI application: routes, Bearer auth, limits, metrics, and POST /v1/audio/transcriptions.

Errors to clients are OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with messages
written for the client: never a traceback or a server path (those go to the server's stderr).
"""

import asyncio
import contextlib
import hmac
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
import uvicorn

from ...config import SAMPLE_RATE, delay_tokens, show
from ...errors import VoxtralError
from ...model import Transcript
from ...runtime.stream import session_prefix
from ..subtitles import segments, to_json, to_srt, to_vtt
from .sessions import Scheduler

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMED_FORMATS = ("json", "text")       # stream=true sends text events: no subtitle or segment formats
# OpenAI's upload fields: those this model has no use for are refused with a reason, not silently dropped
UPLOAD_FIELDS = ("file", "model", "response_format", "stream", "language", "prompt", "temperature",
                 "timestamp_granularities[]", "include[]", "chunking_strategy")
OPEN_PATHS = ("/health",)                 # liveness probes need no key


@dataclass
class Limits:
    max_sessions: int = 64                # WebSocket clients plus uploads in progress
    max_buffer_s: float = 30.0            # audio a session may hold ahead of the decoder
    max_message_bytes: int = 1 << 20      # one WebSocket message
    max_upload_bytes: int = 25 << 20      # one upload (OpenAI's own limit)
    max_upload_s: float = 7200.0          # the audio in one upload: 25 MB of Opus or MP3 can hold many hours
    idle_timeout_s: float = 60.0          # a WebSocket client silent this long is finished and closed


class Metrics:
    """Prometheus series, in a registry of their own (one per app, so tests can run several)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.open_sessions = Gauge("voxtral_open_sessions", "Transcriptions in progress", registry=r)
        self.clients = Gauge("voxtral_clients", "WebSocket clients and uploads admitted", registry=r)
        self.queued_audio = Gauge("voxtral_queued_audio_seconds",
                                  "Audio received and not yet decoded, summed over sessions", registry=r)
        self.pass_seconds = Histogram("voxtral_pass_seconds", "Time of one model pass over the sessions",
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.pass_sessions = Histogram("voxtral_pass_sessions", "Sessions advanced in one pass",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.session_lag = Histogram("voxtral_session_lag_seconds",
                                     "Per session after each pass: audio received and not yet decoded",
                                     buckets=(.1, .25, .5, 1, 2, 5, 10, 30, 60), registry=r)
        self.token_latency = Histogram("voxtral_token_latency_seconds",
                                       "From the arrival of the audio a token needs to the token",
                                       buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.errors = Counter("voxtral_client_errors", "Error events and responses sent, by code", ["code"],
                              registry=r)


@dataclass
class ServerState:
    model: object
    model_name: str
    limits: Limits
    metrics: Metrics = field(default_factory=Metrics)
    scheduler: Scheduler = None
    clients: set = field(default_factory=set)   # admitted WebSocket connections and uploads
    draining: bool = False
    created: int = 0                            # when the server started (for /v1/models)
    settled: asyncio.Event = None               # set whenever no client is left

    def admit(self, client):
        """Reserve a place for a client -> None, or why not (an error code)."""
        if self.draining:
            return "shutting_down"
        if len(self.clients) >= self.limits.max_sessions:
            return "too_many_sessions"
        self.clients.add(client)
        self.settled.clear()
        self.metrics.clients.set(len(self.clients))
        return None

    def release(self, client):
        self.clients.discard(client)
        self.metrics.clients.set(len(self.clients))
        if not self.clients:
            self.settled.set()

    async def drain(self):
        """Stop admitting; finish every WebSocket client with its final events; let uploads complete."""
        self.draining = True
        for c in list(self.clients):
            if hasattr(c, "shutdown"):
                c.shutdown()
        await self.settled.wait()


REFUSALS = {"shutting_down": "the server is shutting down", "too_many_sessions": "the server is at its session limit"}


def error_body(message, code, type_="invalid_request_error", param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(state, status, message, code, param=None, headers=None):
    state.metrics.errors.labels(code).inc()
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(error_body(message, code, type_, param), status_code=status, headers=headers)


def model_not_found(model, served):
    return f"the model {show(model)} does not exist: this server serves {served!r}"


def language_code(value):
    """OpenAI's `language` (ISO-639-1, e.g. "en"): accepted and not needed, since the model detects the
    language itself; anything else is refused -> None, or why not."""
    if value in (None, "") or (isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha()):
        return None
    return f"language must be an ISO-639-1 code such as 'en' (the model detects it itself), got {show(value)}"


# --- routes -------------------------------------------------------------------------------------------
async def health(request):
    state = request.app.state.server
    if state.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return JSONResponse({"status": "ok", "sessions": state.scheduler.count()})


def model_card(state):
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "voxtral_ref"}


async def models(request):
    return JSONResponse({"object": "list", "data": [model_card(request.app.state.server)]})


async def model(request):
    """GET /v1/models/{id}, what the openai client's models.retrieve asks."""
    state = request.app.state.server
    if request.path_params["model"] != state.model_name:
        return error_response(state, 404, model_not_found(request.path_params["model"], state.model_name),
                              "model_not_found", "model")
    return JSONResponse(model_card(state))


async def http_error(request, exc):
    """Starlette's own 404 / 405 (and malformed-body 400s) in OpenAI's error shape, counted like the rest."""
    state = request.app.state.server
    codes = {404: ("not_found", f"no such endpoint: {request.method} {show(request.url.path)}"),
             405: ("method_not_allowed", f"{request.url.path} does not take {request.method}")}
    code, message = codes.get(exc.status_code, ("invalid_request", str(exc.detail)))
    return error_response(state, exc.status_code, message, code, headers=exc.headers)


async def metrics(request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    state = request.app.state.server
    state.metrics.queued_audio.set(sum(state.scheduler.lags()))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class TooLarge(Exception):
    pass


def limited(receive, limit):
    """The request body's receive channel, refusing more than `limit` bytes (whatever Content-Length says)."""
    seen = 0

    async def receive_limited():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise TooLarge()
        return message
    return receive_limited


class TooLong(VoxtralError):
    pass


def decode_upload(data, max_s):
    """An uploaded file's bytes -> [N] mono float32 at 16 kHz, the samples Model.transcribe makes of the
    file. Decoded and mixed down a block at a time (audio.frame_blocks), and refused past `max_s` seconds
    whatever its header says: a few hundred KB of FLAC silence decode to hours (gigabytes of float32)."""
    import soundfile as sf
    from ...stages.audio import (MAX_CHANNELS, READ_BLOCK_S, READABLE, check_sample_rate, frame_blocks, to_mono_16k,
                                 to_mono_float32)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = f.samplerate, f.channels
            check_sample_rate(rate)
            if not 1 <= channels <= MAX_CHANNELS:
                raise VoxtralError(f"the file has {channels} channels: this server reads 1 to {MAX_CHANNELS}")
            blocks, n, limit = [], 0, max_s * rate
            for block in frame_blocks(f, READ_BLOCK_S * rate):
                n += len(block)
                if n > limit:
                    raise TooLong(f"the upload holds more than {max_s / 60:g} minutes of audio, this server's limit")
                blocks.append(to_mono_float32(block))                        # [b, channels] -> [b]
    except VoxtralError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise VoxtralError(f"cannot decode the uploaded file: this server reads {READABLE}") from e
    return to_mono_16k(np.concatenate(blocks) if blocks else np.zeros(0, np.float32), rate)


def upload_options(form, served):
    """The form's fields other than the file -> (response_format, stream), or raise BadField. OpenAI's
    fields that change nothing here are accepted only at values that ask for nothing this model lacks."""
    unknown = [k for k in form.keys() if k not in UPLOAD_FIELDS]
    if unknown:
        raise BadField(f"unknown field {show(unknown[0])}: this endpoint takes {', '.join(UPLOAD_FIELDS)}", unknown[0])
    for k, v in form.multi_items():
        if k != "file" and not isinstance(v, str):
            raise BadField(f"`{k}` must be a plain form field, not a file", k)
    model = form.get("model")
    if not model:
        raise BadField("`model` is required (GET /v1/models lists it)", "model")
    if model != served:
        raise BadField(model_not_found(model, served), "model", 404, "model_not_found")
    fmt = form.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise BadField(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {show(fmt)}",
                       "response_format")
    stream = (form.get("stream") or "false").lower()
    if stream not in ("true", "false"):
        raise BadField(f"stream must be true or false, got {show(form.get('stream'))}", "stream")
    stream = stream == "true"
    if stream and fmt not in STREAMED_FORMATS:
        raise BadField(f"stream=true sends text events: response_format must be json or text, got {fmt!r}",
                       "response_format")
    why = language_code(form.get("language"))
    if why:
        raise BadField(why, "language")
    if form.get("prompt"):
        raise BadField("this model takes no text prompt: leave `prompt` out", "prompt")
    try:
        if float(form.get("temperature") or 0) != 0:
            raise ValueError
    except ValueError:
        raise BadField(f"this server decodes greedily: temperature must be 0, got {show(form.get('temperature'))}",
                       "temperature") from None
    for g in form.getlist("timestamp_granularities[]"):
        if g != "segment":
            raise BadField(f"timestamp_granularities[] may only be 'segment' (the token clock times segments, not "
                           f"words), got {show(g)}", "timestamp_granularities[]")
        if fmt != "verbose_json":
            raise BadField("timestamp_granularities[] needs response_format verbose_json", "timestamp_granularities[]")
    if form.getlist("include[]"):
        raise BadField(f"include[] asks for {show(form.getlist('include[]'))}: this server returns no logprobs",
                       "include[]")
    if form.get("chunking_strategy") not in (None, "auto"):
        raise BadField("chunking_strategy may only be 'auto': the model transcribes the whole file as one stream",
                       "chunking_strategy")
    return fmt, stream


class BadField(Exception):
    def __init__(self, message, param, status=400, code="invalid_value"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


async def transcriptions(request):
    """OpenAI's POST /v1/audio/transcriptions: multipart `file`, `model`, `response_format`, `stream` (and
    OpenAI's other fields, checked by upload_options)."""
    state = request.app.state.server
    limit = state.limits.max_upload_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        return error_response(state, 413, f"the upload is larger than {limit} bytes", "file_too_large", "file")
    try:
        form = await Request(request.scope, limited(request.receive, limit)).form(max_files=1, max_fields=16)
        upload = form.get("file")
        data = await upload.read() if hasattr(upload, "read") else None
    except TooLarge:
        return error_response(state, 413, f"the upload is larger than {limit} bytes", "file_too_large", "file")
    except HTTPException as e:                         # python-multipart's reason: too many files or fields
        return error_response(state, 400, f"the body is not a valid upload: {e.detail}", "invalid_request")
    except Exception:                                  # noqa: BLE001 - any malformed body is the client's
        return error_response(state, 400, "the body is not a valid multipart/form-data upload", "invalid_request")
    if data is None:
        return error_response(state, 400, "a `file` part with the audio is required", "invalid_request", "file")
    try:
        fmt, stream = upload_options(form, state.model_name)
    except BadField as e:
        return error_response(state, e.status, e.message, e.code, e.param)
    refused = state.admit(request)                     # before decoding: admitted uploads bound the memory
    if refused:
        return error_response(state, 503, REFUSALS[refused], refused)
    try:
        audio = await asyncio.to_thread(decode_upload, data, state.limits.max_upload_s)   # off the event loop
    except VoxtralError as e:
        state.release(request)
        if isinstance(e, TooLong):
            return error_response(state, 413, str(e), "audio_too_long", "file")
        return error_response(state, 400, str(e), "invalid_audio", "file")
    except MemoryError:
        state.release(request)
        return error_response(state, 413, "the upload's audio does not fit in this server's memory", "audio_too_long",
                              "file")
    except BaseException:                              # its place is freed whatever failed
        state.release(request)
        raise
    try:
        results = asyncio.Queue()
        s = state.scheduler.open(SAMPLE_RATE, lambda e, final, err: results.put_nowait((e, final, err)),
                                 upload=audio)
    except BaseException:
        state.release(request)
        raise

    def cleanup():
        state.scheduler.forget(s)
        state.release(request)
    if stream:
        return _Finally(StreamingResponse(_sse(state, s, results), media_type="text/event-stream"), cleanup)
    try:
        while True:
            result = await _next_or_disconnect(request, results)
            if result is None:
                return Response(status_code=499)       # nobody is listening any more
            e, final, err = result
            if final:
                break
    finally:
        cleanup()
    if err is not None:
        return error_response(state, 500, _failure(err), "processing_error")
    r = Transcript(s.stream.text, s.stream.token_ids, s.stream.delay_ms, len(audio))
    return _render(fmt, r, state.model.tokenizer)


class _Finally:
    """A response that runs `cleanup` once it is over, however it ends (sent, or the client hung up)."""

    def __init__(self, response, cleanup):
        self.response, self.cleanup = response, cleanup

    async def __call__(self, scope, receive, send):
        try:
            await self.response(scope, receive, send)
        finally:
            self.cleanup()


async def _next_or_disconnect(request, results):
    """The next result of the session, or None if the client hangs up first (the body is read, so what
    receive() brings next is the disconnect)."""
    get = asyncio.ensure_future(results.get())
    gone = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not get.done():
        get.cancel()
        return None
    return get.result()


async def _sse(state, s, results):
    """transcript.text.delta events as tokens are decoded, then transcript.text.done."""
    while True:
        e, final, err = await results.get()
        if err is not None:
            state.metrics.errors.labels("processing_error").inc()
            yield _event({"type": "error", **error_body(_failure(err), "processing_error", "server_error")})
            return
        if e.text:
            yield _event({"type": "transcript.text.delta", "delta": e.text})
        if final:
            yield _event({"type": "transcript.text.done", "text": s.stream.text,
                          "usage": {"type": "duration", "seconds": round(s.received_s, 3)}})
            return


def _event(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _failure(err):
    """What a client is told when its transcription fails: VoxtralError messages are written for users;
    anything else is the server's problem, logged there."""
    return str(err) if isinstance(err, VoxtralError) else "the transcription failed (see the server's log)"


def _render(fmt, r, tokenizer):
    """One finished transcript in an OpenAI response_format; srt, vtt and verbose_json's segments come from
    the token clock (apps/subtitles.py), as `voxtral-ref transcribe -f srt|vtt|json` writes them."""
    usage = {"type": "duration", "seconds": round(r.n_samples / SAMPLE_RATE, 3)}
    if fmt == "json":
        return JSONResponse({"text": r.text.strip(), "usage": usage})
    if fmt == "text":
        return PlainTextResponse(r.text.strip() + "\n")
    segs = segments(r.token_ids, tokenizer, r.n_samples)
    if fmt == "srt":
        return PlainTextResponse(to_srt(segs))
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(segs), media_type="text/vtt")
    return JSONResponse({"task": "transcribe", "duration": r.n_samples / SAMPLE_RATE, **to_json(r, segs),
                         "usage": usage})


# --- auth ---------------------------------------------------------------------------------------------
async def deny(scope, send, status, body, headers=()):
    """Refuse an HTTP request or a WebSocket handshake with a JSON error body."""
    headers = [(b"content-type", b"application/json"), *headers]
    body = json.dumps(body).encode()
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:                                              # a server without denial responses: HTTP 403
        await send({"type": "websocket.close", "code": 1008})


class BearerAuth:
    """ASGI middleware: every request but OPEN_PATHS needs `Authorization: Bearer <key>`, the header
    OpenAI's clients send, on HTTP and on the WebSocket handshake alike (the scheme's case is free, as
    RFC 7235 has it)."""

    def __init__(self, app, api_key, metrics):
        self.app, self.expected, self.metrics = app, api_key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.expected):
            return await self.app(scope, receive, send)
        self.metrics.errors.labels("invalid_api_key").inc()
        await deny(scope, send, 401, error_body("a valid `Authorization: Bearer <api key>` header is required",
                                                "invalid_api_key"), [(b"www-authenticate", b"Bearer")])


LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


class WebSocketOrigin:
    """ASGI middleware: a WebSocket handshake from a browser page (it sends `Origin`) must come from an
    origin --cors-origin allows, or be this server's own at a loopback address. Browsers apply no CORS to
    WebSockets, so without this any page a user visits could stream through a server on their machine. The
    Host header alone proves nothing: a page whose name an attacker re-points at 127.0.0.1 (DNS rebinding)
    sends a Host and an Origin that agree. Clients that are not browsers send no Origin and pass."""

    def __init__(self, app, allowed, metrics):
        self.app, self.allowed, self.metrics = app, set(allowed), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        host = headers.get(b"host", b"").decode("latin-1")
        hostname = host[:host.index("]") + 1] if host.startswith("[") else host.partition(":")[0]
        own = origin.partition("://")[2] == host and hostname in LOOPBACK
        if not origin or "*" in self.allowed or origin in self.allowed or own:
            return await self.app(scope, receive, send)
        self.metrics.errors.labels("origin_not_allowed").inc()
        await deny(scope, send, 403, error_body(f"WebSocket connections from the origin {show(origin)} are not "
                                                "allowed: start the server with --cors-origin for it",
                                                "origin_not_allowed"))


def build_app(state, api_key=None, cors_origins=()):
    """The Starlette app; the model's thread starts with it and stops with it."""
    from .protocols import realtime

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.created = int(time.time())
        state.settled = asyncio.Event()
        state.settled.set()
        # a session starts from the state after the prompt's silence, computed once per delay
        # (runtime/stream.session_prefix, which also reads the LM head in): for the default delay now, not in
        # the first client's open() on the event loop (0.7 s on the full int8 model, with every other client
        # waiting)
        session_prefix(state.model, delay_tokens(state.model.cfg.default_delay_ms))
        state.scheduler = Scheduler(state.model, asyncio.get_running_loop(), state.metrics)
        try:
            yield
        finally:
            state.scheduler.stop()

    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    middleware.append(Middleware(WebSocketOrigin, allowed=cors_origins, metrics=state.metrics))
    if api_key:
        middleware.append(Middleware(BearerAuth, api_key=api_key, metrics=state.metrics))
    app = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/v1/models/{model:path}", model),
        Route("/metrics", metrics), Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        WebSocketRoute("/v1/realtime", realtime),
    ], middleware=middleware, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = state
    return app


# --- the server -----------------------------------------------------------------------------------------
def serve(state, sock, api_key=None, cors_origins=()):
    """Run on a bound socket until SIGTERM/SIGINT, or until `should_exit` is set from another thread."""
    config = uvicorn.Config(build_app(state, api_key, cors_origins), ws="websockets-sansio",
                            ws_max_size=state.limits.max_message_bytes, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    GracefulServer(config, state).run(sockets=[sock])


class GracefulServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains the clients (final events sent, connections closed) before uvicorn
    stops. uvicorn alone closes open WebSockets with 1012 and no final event, then re-raises the signal,
    which exits non-zero. A second signal stops at once."""

    def __init__(self, config, state):
        super().__init__(config)
        self.state, self.loop = state, None

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame):
        if self.state.draining or self.loop is None:
            self.force_exit = self.should_exit = True
            return
        self.state.draining = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self):
        await self.state.drain()
        self.should_exit = True
