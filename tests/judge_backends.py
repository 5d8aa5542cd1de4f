"""Scripted judge backends for tests/test_judge.py, served with ``rlhfkit serve --backend tests.judge_backends:NAME``,
and :class:`ScriptedServer`, a raw HTTP server for the replies no real server gives on cue.

Each backend is ``fn(messages) -> str``. They read the two responses back out of the
prompt built by :func:`rlhfkit.feedback.judge.build_judge_messages`, so the
tests also check that the prompt carries both responses in the order given.
Call counters are module state, read and reset by the tests (the server runs
in a thread of the test process).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from fastapi import HTTPException

_RESPONSE = {
    letter: re.compile(rf"\[The Start of Response {letter}\]\n(.*?)\n\[The End of Response {letter}\]", re.S) for letter in "AB"
}

lock = threading.Lock()
calls: Counter[str] = Counter()
"""Calls per unique judge prompt (the last message's content)."""
in_flight = 0
peak_in_flight = 0


def reset() -> None:
    global in_flight, peak_in_flight
    with lock:
        calls.clear()
        in_flight = peak_in_flight = 0


def responses_in(messages: list[dict]) -> tuple[str, str]:
    """Responses A and B as shown in the judge prompt (the first user message after the system prompt)."""
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return tuple(_RESPONSE[letter].search(prompt).group(1) for letter in "AB")  # type: ignore[return-value]


def prefers_please(messages: list[dict]) -> str:
    """A consistent judge: the response containing "please" wins, wherever it is shown."""
    response_a, _ = responses_in(messages)
    return "Final verdict: [[A]]" if "please" in response_a.lower() else "Final verdict: [[B]]"


def always_a(messages: list[dict]) -> str:
    """A judge with pure position bias."""
    return "A"


def mumbles(messages: list[dict]) -> str:
    """Never gives a verdict."""
    return "Both have merits; it is hard to say."


def needs_nudge(messages: list[dict]) -> str:
    """Rambles on the first turn, answers properly when asked again (the judge's repair turn)."""
    if len(messages) == 2:
        return "Both have merits; it is hard to say."
    return prefers_please(messages)


def _fail_first_call(messages: list[dict], status: int) -> str:
    key = messages[-1]["content"]
    with lock:
        calls[key] += 1
        first = calls[key] == 1
    if first:
        if status == 500:
            raise RuntimeError("simulated crash on the first call")
        raise HTTPException(status, "slow down", headers={"Retry-After": "0"})
    return prefers_please(messages)


def flaky_500(messages: list[dict]) -> str:
    """HTTP 500 on the first call per unique prompt, then :func:`prefers_please`."""
    return _fail_first_call(messages, 500)


def flaky_429(messages: list[dict]) -> str:
    """HTTP 429 (rate limited) on the first call per unique prompt, then :func:`prefers_please`."""
    return _fail_first_call(messages, 429)


def rejects(messages: list[dict]) -> str:
    """A 400: the client must not retry it."""
    with lock:
        calls["rejects"] += 1
    raise HTTPException(400, "context length exceeded")


def slow(messages: list[dict]) -> str:
    """:func:`prefers_please` after 0.2 s, recording how many calls overlap."""
    global in_flight, peak_in_flight
    with lock:
        in_flight += 1
        peak_in_flight = max(peak_in_flight, in_flight)
    try:
        time.sleep(0.2)
        return prefers_please(messages)
    finally:
        with lock:
            in_flight -= 1


# ----------------------------------------------------------------------------- a server that misbehaves on cue


def chat_reply(content: object, *, status: str = "200 OK") -> bytes:
    """A whole HTTP response carrying one chat completion whose message content is ``content``."""
    body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status.encode(),
        len(body),
        body,
    )


def truncated_reply(content: object) -> bytes:
    """:func:`chat_reply` cut off mid-body (its Content-Length promises more): the client reads an IncompleteRead."""
    whole = chat_reply(content)
    return whole[: len(whole) - 10]


def stall(seconds: float) -> Callable[[socket.socket, threading.Event], None]:
    """A reply that sends nothing for ``seconds`` (or until the server stops)."""
    return lambda sock, stopped: stopped.wait(seconds)


def trickle(interval: float, length: int = 1000) -> Callable[[socket.socket, threading.Event], None]:
    """A reply whose headers promise ``length`` bytes, then sends one every ``interval`` seconds."""

    def send(sock: socket.socket, stopped: threading.Event) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)
        for _ in range(length):
            if stopped.wait(interval):
                return
            sock.sendall(b" ")

    return send


class ScriptedServer:
    """A loopback HTTP server that answers its i-th request with ``replies[i]`` (the last one again after that).

    A reply is raw bytes (a whole response, well formed or not) or ``fn(socket, stopped_event)``;
    the connection is closed after each reply. ``requests`` records each request's headers
    (lower-cased names) and JSON body. For what a real server will not do on cue: truncated
    bodies, garbage status lines, stalls.
    """

    def __init__(self, replies: list[bytes | Callable[[socket.socket, threading.Event], None]]):
        self.replies = replies
        self.requests: list[tuple[dict[str, str], dict]] = []
        self._lock, self._stopped = threading.Lock(), threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._answer, args=(sock,), daemon=True).start()

    def _answer(self, sock: socket.socket) -> None:
        with sock, sock.makefile("rb") as stream:
            request_line = stream.readline()
            if not request_line:
                return
            headers = {}
            for line in iter(stream.readline, b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = json.loads(stream.read(int(headers.get("content-length", 0))) or b"{}")
            with self._lock:
                self.requests.append((headers, body))
                reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
            try:
                if callable(reply):
                    reply(sock, self._stopped)
                else:
                    sock.sendall(reply)
            except OSError:  # the client gave up first
                pass

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
