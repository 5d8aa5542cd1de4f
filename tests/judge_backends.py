"""Scripted judge backends for tests/test_judge.py, served with ``rlhfkit serve --backend tests.judge_backends:NAME``.

Each is ``fn(messages) -> str``. They read the two responses back out of the
prompt built by :func:`rlhfkit.feedback.judge.build_judge_messages`, so the
tests also check that the prompt carries both responses in the order given.
Call counters are module state, read and reset by the tests (the server runs
in a thread of the test process).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

from fastapi import HTTPException

_RESPONSE = {
    letter: re.compile(rf"\[The Start of Response {letter}\]\n(.*?)\n\[The End of Response {letter}\]", re.S)
    for letter in "AB"
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
