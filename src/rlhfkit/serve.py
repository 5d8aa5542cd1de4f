"""An OpenAI-compatible chat server: ``POST /v1/chat/completions`` and ``GET /v1/models``.

    rlhfkit serve MODEL [--host 127.0.0.1] [--port 8000] [--backend module:function]
    python -m rlhfkit.serve MODEL ...

It puts a local policy (or a scripted function) behind the API that every LLM
tool already speaks, so the AI judge (:mod:`rlhfkit.feedback.judge`), evaluation
harnesses and chat UIs can use it unchanged. Two backends:

* **a causal LM** from a model spec (``smollm2-135m``, ``tiny``, a ``.gguf`` file
  or a model directory), generating with :class:`rlhfkit.generation.rollout.HFGenerator`.
  One model serves one request at a time (a lock serialises ``generate``).
* **a Python function** ``backend="module:function"``, called as
  ``fn(messages: list[dict]) -> str`` and imported with the working directory on
  ``sys.path``. It turns a rule-based judge (or a test's scripted judge) into a
  server. Its calls run concurrently in the server's thread pool. If it raises
  ``fastapi.HTTPException`` the client gets that status; any other exception is a
  generic HTTP 500, its traceback logged on the server (logger ``rlhfkit.serve``)
  and not sent, as it can hold paths, data or secrets. ``MODEL`` is then only the
  name reported by ``/v1/models``.

Limits, so that one request cannot pin the model (generation holds its lock) or
exhaust memory (the KV cache is reserved for ``prompt + max_tokens`` up front):
``max_tokens`` may be at most the model's context (``max_position_embeddings``)
minus the prompt, and at most ``max_tokens_limit`` (``--max-tokens-limit``), or
the request is a 400; without ``max_tokens`` a request gets
:data:`DEFAULT_MAX_TOKENS` or that limit, whichever is smaller. A request body
over :data:`MAX_BODY_BYTES` is a 413.

Departures from the OpenAI API, on purpose: the request's ``model`` field is not
checked (one server serves one model, and clients that send ``"default"`` or any
other name still work); no streaming, tools, logprobs or stop strings. ``usage``
is approximate: the model backend re-tokenises the decoded reply (HFGenerator
returns text), so ``completion_tokens`` and hence ``finish_reason: "length"`` can
be off by a few tokens; a scripted backend counts whitespace-separated words.
Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``, and an
invalid request is a 400 (not FastAPI's 422), as with OpenAI.

The server binds to 127.0.0.1 by default: it has no authentication, so expose
it beyond the machine only behind something that has.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, Field

from rlhfkit.generation.chat import (  # the backends live in generation/chat.py; their old names still import from here
    DEFAULT_MAX_TOKENS,
    ChatBackend,
    make_backend,
)
from rlhfkit.generation.chat import Completion as Completion
from rlhfkit.generation.chat import FunctionBackend as FunctionBackend
from rlhfkit.generation.chat import LocalChatModel as LocalChatModel
from rlhfkit.generation.chat import Messages as Messages
from rlhfkit.generation.chat import load_function as load_function

DEFAULT_MAX_TOKENS_LIMIT = 4096
"""The most completion tokens a request may ask for, unless ``max_tokens_limit`` says otherwise."""
MAX_BODY_BYTES = 4 << 20
"""Largest request body accepted (413 beyond): room for a long conversation, none for a memory attack."""

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the app


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    """Text, or OpenAI's list of content parts (only the text parts are used)."""


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request that we honour; others are ignored.

    Defined at module level: FastAPI resolves the endpoint's (string) annotations
    in module globals, so a class local to :func:`create_app` would not be found.
    """

    model: str = ""
    """Not checked: one server serves one model."""
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """OpenAI's default 1.0; 0 is greedy."""
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; either works (default :data:`DEFAULT_MAX_TOKENS`)."""
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    """Only ``False`` is supported."""


def message_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of OpenAI's content-part list joined (None: "").

    Shared by this server's requests and the judge client's replies; anything else is a TypeError.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TypeError(f"message content is neither text nor a list of content parts: {content!r:.200}")
    return "".join(
        part["text"]
        for part in content
        if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)
    )


def _error_body(status: int, message: str) -> dict:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def create_app(
    backend: ChatBackend,
    model_name: str,
    *,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_body_bytes: int = MAX_BODY_BYTES,
):
    """The FastAPI app serving ``backend`` under the name ``model_name``.

    ``max_tokens_limit``: the most completion tokens a request may ask for (the model's
    context minus the prompt caps it further); ``max_body_bytes``: larger bodies get 413.
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be at least 1, got {max_tokens_limit}")
    app = FastAPI(title="rlhfkit serve", description=f"OpenAI-compatible chat API for '{model_name}'")
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes, error=lambda message: _error_body(413, message))
    created = int(time.time())

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content=_error_body(status, message), headers=headers)

    # Starlette's class, so unknown routes (404) and methods (405) get the same shape.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error(400, f"invalid request: {problems}")

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "rlhfkit"}]}

    # A plain `def` endpoint: FastAPI runs it in a worker thread, so a slow
    # function backend does not block the event loop and requests overlap.
    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> dict:
        if request.stream:
            raise HTTPException(400, "streaming is not supported by rlhfkit serve")
        messages = [{"role": m.role, "content": message_text(m.content)} for m in request.messages]
        max_tokens = _max_tokens(
            backend.token_room(messages), request.max_tokens or request.max_completion_tokens, max_tokens_limit
        )
        try:
            out = backend.chat(messages, n=request.n, temperature=request.temperature, max_tokens=max_tokens)
        except StarletteHTTPException:  # the backend chose the status (fastapi's class is a subclass)
            raise
        except Exception as e:  # the details stay in the log: exception text can hold paths, data or secrets
            logger.exception("POST /v1/chat/completions: the backend failed")
            raise HTTPException(500, "internal server error: the backend failed (details are in the server's log)") from e
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length" if used >= max_tokens else "stop",
            }
            for i, (text, used) in enumerate(zip(out.texts, out.completion_tokens))
        ]
        completion_tokens = sum(out.completion_tokens)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": out.prompt_tokens + completion_tokens,
            },
        }

    return app


def _max_tokens(room: int | None, asked: int | None, limit: int) -> int:
    """The request's completion budget: ``asked`` (or the default) if within the limits, else an HTTP 400.

    ``room``: tokens left in the model's context after the prompt (None: no context);
    ``limit``: the server's ``max_tokens_limit``.
    """
    from fastapi import HTTPException

    if room is not None and room < 1:
        raise HTTPException(400, f"the prompt leaves no room in the model's context ({-room} tokens too long)")
    cap, why = (
        (limit, "the server's max_tokens_limit")
        if room is None or limit <= room
        else (room, "the model's context minus the prompt")
    )
    if asked is not None and asked > cap:
        raise HTTPException(400, f"max_tokens {asked} is over this request's limit of {cap} ({why})")
    return asked if asked is not None else min(DEFAULT_MAX_TOKENS, cap)


# ----------------------------------------------------------------------------- request bodies


async def drain_body(receive: Any, limit: int) -> None:
    """Read and drop up to ``limit`` bytes of a refused request body.

    Closing a socket with unread data in its receive buffer makes the kernel send
    a TCP reset, which can reach the client before the 413 and hide it (seen as
    ``ConnectionResetError``). Bodies larger than ``limit`` are cut off anyway.
    """
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def reject(send: Any, status: int, payload: dict) -> None:
    """Answer an ASGI request with ``status`` and the JSON ``payload``, closing the connection."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over ``max_body_bytes`` gets 413 before the app reads any of it.

    Declared sizes (``Content-Length``) are refused at once; a chunked upload is
    counted as it arrives. ``error(message)`` is the 413's JSON body, in the app's
    own error shape (default ``{"detail": message}``, FastAPI's).
    """

    def __init__(self, app: Any, *, max_body_bytes: int, error: Callable[[str], dict] = lambda message: {"detail": message}):
        self.app, self.max_body_bytes, self.error = app, max_body_bytes, error

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.error(f"request body over {self.max_body_bytes} bytes")
        declared = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await drain_body(receive, 4 * self.max_body_bytes)
            await reject(send, 413, refusal)
            return
        # Read the whole (bounded) body first, counting, so a chunked upload cannot exceed the limit either.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                if more:
                    await drain_body(receive, 4 * self.max_body_bytes)
                await reject(send, 413, refusal)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------- running it


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; binding it ourselves lets ``port=0`` pick a free port we can report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    # Listening now (uvicorn listens again, harmlessly) queues clients that connect
    # before the event loop starts, instead of refusing them.
    sock.listen(2048)
    return sock


def uvicorn_server(app, *, log_level: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2))


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "",
    *,
    precision: str = "bf16",
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
) -> None:
    """Serve ``model`` (or the function ``backend``) until interrupted.

    ``port=0`` picks a free port; the address is printed to stderr as
    ``rlhfkit serve: listening on http://HOST:PORT/v1`` once the socket is bound.
    ``max_tokens_limit``: the most completion tokens one request may ask for.
    """
    app = create_app(make_backend(model, backend, precision=precision), model, max_tokens_limit=max_tokens_limit)
    sock = bind_socket(host, port)
    print(f"rlhfkit serve: listening on http://{url_host(host)}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    uvicorn_server(app, log_level="info").run(sockets=[sock])


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ServerThread:
    """A server running in a background thread of this process (tests, notebooks).

    Use :func:`start_in_thread` or :func:`running_server`; ``base_url`` is
    ``http://HOST:PORT/v1`` and :meth:`stop` shuts the server down.
    """

    def __init__(self, app, host: str, port: int, *, log_level: str = "warning"):
        self._sock = bind_socket(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.base_url = f"http://{url_host(host)}:{self.port}/v1"
        self._server = uvicorn_server(app, log_level=log_level)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="rlhfkit-serve"
        )

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.base_url} exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server on {self.base_url} did not start within {timeout:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()


def start_in_thread(
    model: str,
    host: str = "127.0.0.1",
    port: int = 0,
    backend: str = "",
    *,
    precision: str = "bf16",
    log_level: str = "warning",
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
) -> ServerThread:
    """Start :func:`serve`'s server in a daemon thread (``port=0``: a free port) and wait until it accepts requests."""
    app = create_app(make_backend(model, backend, precision=precision), model, max_tokens_limit=max_tokens_limit)
    return ServerThread(app, host, port, log_level=log_level).start()


@contextmanager
def running_server(
    model: str, host: str = "127.0.0.1", port: int = 0, backend: str = "", **kwargs: Any
) -> Iterator[ServerThread]:
    """``with running_server("tiny") as server: ... server.base_url ...`` - stopped on exit."""
    server = start_in_thread(model, host, port, backend, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------- CLI


def build_parser(prog: str = "rlhfkit serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a model (or a Python function) with an OpenAI-compatible chat API."
    )
    parser.add_argument(
        "model", help="model spec (smollm2-135m, tiny, a .gguf file, a model directory); with --backend, just the served name"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only; the server has no auth)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; the address is printed to stderr)")
    parser.add_argument(
        "--backend",
        default="",
        metavar="MODULE:FUNCTION",
        help="serve fn(messages) -> str instead of a model (imported from the working directory)",
    )
    parser.add_argument(
        "--precision", default="bf16", choices=["bf16", "fp32", "fp16"], help="compute precision of the model backend"
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=DEFAULT_MAX_TOKENS_LIMIT,
        metavar="N",
        help=f"the most completion tokens a request may ask for (default {DEFAULT_MAX_TOKENS_LIMIT}; "
        "the model's context minus the prompt caps it too)",
    )
    return parser


def main_serve(argv: list[str] | None = None, *, prog: str = "rlhfkit serve") -> int:
    """``rlhfkit serve MODEL [--host H --port P --backend module:function]``; returns an exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = build_parser(prog).parse_args(argv)
    try:
        serve(ns.model, ns.host, ns.port, ns.backend, precision=ns.precision, max_tokens_limit=ns.max_tokens_limit)
    except (ValueError, OSError) as e:  # ValueError includes models.ModelLoadError
        print(f"rlhfkit serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main_serve(prog="python -m rlhfkit.serve"))
