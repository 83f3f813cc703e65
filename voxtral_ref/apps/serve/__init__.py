"""`voxtral-ref serve`: a realtime transcription server (pip install 'voxtral_ref[serve]').

WebSocket /v1/realtime speaks vLLM's realtime protocol, or OpenAI's Realtime transcription sessions with
`?intent=transcription` (protocols.py); POST /v1/audio/transcriptions, GET /v1/models, /health and
/metrics are HTTP (http.py); one thread runs the model for every session (sessions.py). Starlette on
uvicorn; SIGTERM or Ctrl-C stops admitting clients, finishes every open stream with its final event,
closes the connections and exits 0 (a second signal exits at once).
"""

import os
import socket
from pathlib import Path

from ...errors import VoxtralError

API_KEY_ENV = "VOXTRAL_REF_API_KEY"


def add_serve_parser(subparsers):
    from ..cli import add_model_args, port_number, positive_float, positive_int
    p = subparsers.add_parser(
        "serve", help="run a realtime transcription server (vLLM and OpenAI realtime protocols, HTTP uploads)",
        description="Serve the model over WebSocket /v1/realtime (vLLM's protocol; OpenAI Realtime transcription "
                    "sessions with ?intent=transcription), POST /v1/audio/transcriptions, GET /v1/models, "
                    "/health and /metrics. Needs pip install 'voxtral_ref[serve]'.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--api-key", help=f"require `Authorization: Bearer KEY` on every request but /health "
                                     f"(default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients name (default: --model, or a directory's name)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; default: CORS off)")
    p.add_argument("--max-sessions", type=positive_int, default=64,
                   help="WebSocket clients plus uploads at once; more are refused (default 64)")
    p.add_argument("--max-buffer-seconds", type=positive_float, default=30.0,
                   help="audio a session may hold ahead of the decoder before appends are refused (default 30)")
    p.add_argument("--max-message-kb", type=positive_int, default=1024,
                   help="largest WebSocket message; larger ones close the connection with 1009 (default 1024)")
    p.add_argument("--max-upload-mb", type=positive_int, default=25, help="largest upload (default 25)")
    p.add_argument("--max-upload-minutes", type=positive_float, default=120.0,
                   help="most audio in one upload, whatever its size compressed (default 120)")
    p.add_argument("--idle-timeout", type=positive_float, default=60.0,
                   help="seconds without a client event before its stream is finished and closed (default 60)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args):
    try:
        import prometheus_client, starlette, uvicorn, websockets, multipart   # noqa: F401,E401
    except ImportError as e:
        raise VoxtralError(f"serve needs the optional server packages: pip install 'voxtral_ref[serve]' ({e})") from None
    from ..cli import load_model, note
    from .http import Limits, ServerState, serve
    sock = bind(args.host, args.port)                    # before the model loads: a taken port fails fast
    model = load_model(args)
    limits = Limits(args.max_sessions, args.max_buffer_seconds, args.max_message_kb << 10,
                    args.max_upload_mb << 20, args.max_upload_minutes * 60, args.idle_timeout)
    state = ServerState(model, args.served_model_name or model_name(args.model), limits)
    host, port = sock.getsockname()[:2]
    note(f"serving {state.model_name!r} on http://{host}:{port} (ws://{host}:{port}/v1/realtime)"
         + (", API key required" if args.api_key or os.environ.get(API_KEY_ENV) else ""))
    serve(state, sock, args.api_key or os.environ.get(API_KEY_ENV), args.cors_origin)
    note("stopped")
    return 0


def model_name(model):
    """--model as clients see it: a hub id as given, a local directory by its name (no server paths)."""
    return Path(model).name if Path(model).is_dir() else model


def bind(host, port):
    """A listening socket: clients that connect before uvicorn runs wait in its backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise VoxtralError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
