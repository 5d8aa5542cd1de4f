"""The AI judge and the OpenAI-compatible server, over real loopback HTTP.

Servers are real uvicorn servers on free 127.0.0.1 ports: in a thread of this
process (``rlhfkit.serve.start_in_thread``, so the tests can read the call counters
of the scripted backends in tests/judge_backends.py), and once as a subprocess
through the ``python -m rlhfkit.serve`` CLI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhfkit.data.records import Comparison
from rlhfkit.feedback.judge import (
    ANSWER_INSTRUCTION,
    DEFAULT_RUBRIC,
    AIJudge,
    HTTPChatClient,
    JudgeRequestError,
    LocalChatClient,
    build_judge_messages,
    parse_verdict,
)
from rlhfkit.serve import start_in_thread
from tests import judge_backends

# Pairs where exactly one response says "please", in both positions.
PLEASE_PAIRS = [
    ("Ask for the salt.", ["Could you please pass the salt?", "Pass the salt."]),
    ("Ask for the salt.", ["Salt. Now.", "Please pass the salt, thank you."]),
    ([{"role": "user", "content": "Ask for help."}], ["Help me.", "Please help me."]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet me."}], ["Hello, please sit down.", "Sit."]),
]
PLEASE_RANKINGS = [[0, 1], [1, 0], [1, 0], [0, 1]]


@pytest.fixture
def serve_backend():
    """``serve_backend("NAME")`` -> base URL of a fresh server in a thread for ``tests.judge_backends:NAME``.

    The server imports the same module object as this test, so the tests can read its call counters.
    """
    servers = []
    judge_backends.reset()

    def start(name: str, model: str = "judge") -> str:
        servers.append(start_in_thread(model, backend=f"{judge_backends.__name__}:{name}"))
        return servers[-1].base_url

    yield start
    for server in servers:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_for(base_url: str, **kwargs) -> HTTPChatClient:
    kwargs.setdefault("backoff", 0.01)  # fast retries in tests
    return HTTPChatClient(base_url, **kwargs)


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),
        ("b", "B"),
        ("  a.  ", "A"),
        ("[[A]]", "A"),
        ("Answer: B", "B"),
        ("answer: a", "A"),
        ("Response A is better.", "A"),
        ("response b is clearly better", "B"),
        ("**B**", "B"),
        ("Final verdict: A", "A"),
        ("final verdict: b", "B"),
        ("I prefer Response A.", "A"),
        ("The better response is B because it says please.", "B"),
        ("Response B wins", "B"),
        # Reasoning first, verdict last: the last explicit verdict wins.
        ("A good answer would be polite. Response A is rude, Response B is not.\nFinal verdict: B", "B"),
        ("[[A]] ... on reflection, [[B]]", "B"),
        ("Initially I leaned towards A, but the final verdict is **B**.", "B"),
        # The article is not a verdict, nor is a mention of both letters.
        ("A good answer would be polite.", None),
        ("The answer is a tie.", None),
        ("Answer with exactly one letter: A or B", None),
        ("Response A and Response B are equally good.", None),
        ("Answer with exactly one letter: A or B.\nA", "A"),
        # Bare capital letters as a fallback: one letter is a verdict, both are not.
        ("I think A would be better", "A"),
        ("A is polite but B is concise", None),
        ("I cannot decide.", None),
        ("", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_judge_prompt_holds_rubric_transcript_and_both_responses():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet me."}]
    system, user = build_judge_messages(chat, "first reply", "second reply", "Be kind.")
    assert system["role"] == "system" and user["role"] == "user"
    content = user["content"]
    assert "Be kind." in content and DEFAULT_RUBRIC not in content
    assert "System: Be brief.\n\nUser: Greet me." in content
    assert content.index("first reply") < content.index("second reply")
    assert judge_backends.responses_in([system, user]) == ("first reply", "second reply")
    assert content.endswith(ANSWER_INSTRUCTION)


def test_judge_rejects_non_pairs():
    judge = AIJudge(HTTPChatClient("http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="pairs only"):
        judge.label("p", ["a", "b", "c"])


# ----------------------------------------------------------------------------- judging over HTTP


def test_consistent_judge_ranks_pairs_in_both_positions(serve_backend):
    judge = AIJudge(client_for(serve_backend("prefers_please")), name="polite")
    labels = judge.label_many(PLEASE_PAIRS)
    assert [c.ranking for c in labels] == PLEASE_RANKINGS
    for c, (prompt, responses) in zip(labels, PLEASE_PAIRS):
        assert isinstance(c, Comparison) and not c.tie
        assert c.prompt == prompt and c.responses == responses
        assert c.source == "judge:polite"
        assert "please" in c.chosen.lower() and "please" not in c.rejected.lower()
        assert c.meta["verdicts"] == ["Final verdict: [[%s]]" % v for v in c.meta["parsed"]]
        # Order 0 shows (r0, r1), order 1 (r1, r0): the same winner gets opposite letters.
        assert c.meta["parsed"] == (["A", "B"] if c.ranking == [0, 1] else ["B", "A"])
        assert "both orders prefer" in c.reason
    assert judge.label(*PLEASE_PAIRS[1]).ranking == [1, 0]


def test_position_biased_judge_gives_only_ties(serve_backend):
    judge = AIJudge(client_for(serve_backend("always_a")))
    labels = judge.label_many(PLEASE_PAIRS)
    assert all(c.tie for c in labels)
    assert all(c.meta["parsed"] == ["A", "A"] for c in labels)
    assert all("position bias" in c.reason for c in labels)
    assert all(c.pairs() == [(0, 1, 0.5)] for c in labels)


def test_unparseable_verdicts_are_repaired_or_tie(serve_backend):
    nudged = AIJudge(client_for(serve_backend("needs_nudge"))).label_many(PLEASE_PAIRS)
    assert [c.ranking for c in nudged] == PLEASE_RANKINGS
    assert all(c.meta["attempts"] == [2, 2] and not c.tie for c in nudged)
    mumbled = AIJudge(client_for(serve_backend("mumbles")), repair_attempts=1).label(*PLEASE_PAIRS[0])
    assert mumbled.tie and mumbled.meta["parsed"] == [None, None] and mumbled.meta["attempts"] == [2, 2]
    assert "unparseable" in mumbled.reason


@pytest.mark.parametrize("backend", ["flaky_500", "flaky_429"])
def test_retries_recover_from_server_errors_and_rate_limits(serve_backend, backend):
    judge = AIJudge(client_for(serve_backend(backend)), concurrency=4)
    labels = judge.label_many(PLEASE_PAIRS)
    assert [c.ranking for c in labels] == PLEASE_RANKINGS
    # Every unique judge prompt failed once, then succeeded on the retry.
    assert len(judge_backends.calls) == 2 * len(PLEASE_PAIRS)
    assert set(judge_backends.calls.values()) == {2}


def test_client_errors_fail_at_once_with_the_server_message(serve_backend):
    client = client_for(serve_backend("rejects"), max_retries=4)
    with pytest.raises(JudgeRequestError, match="HTTP 400: context length exceeded") as info:
        client.complete([{"role": "user", "content": "hi"}])
    assert client.url in str(info.value)
    assert judge_backends.calls["rejects"] == 1  # no retries


def test_closed_port_fails_after_retries_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = HTTPChatClient(url, max_retries=2, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(JudgeRequestError) as info:
        client.complete([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert f"{url}/chat/completions" in message and "after 3 attempts" in message
    assert "Connection" in message or "refused" in message.lower()
    assert time.perf_counter() - start >= 0.01 + 0.02  # it did back off between attempts


def test_requests_run_concurrently_up_to_the_limit(serve_backend):
    base_url = serve_backend("slow")
    pairs = [("Ask.", [f"Please do {i}.", f"Do {i}."]) for i in range(8)]
    judge = AIJudge(client_for(base_url), concurrency=8)
    start = time.perf_counter()
    labels = judge.label_many(pairs)
    elapsed = time.perf_counter() - start
    assert [c.ranking for c in labels] == [[0, 1]] * 8
    assert elapsed < 16 * 0.2 / 3, f"16 requests of 0.2 s took {elapsed:.2f} s: not concurrent"
    assert 2 <= judge_backends.peak_in_flight <= 8

    judge_backends.reset()
    AIJudge(client_for(base_url), concurrency=2).label_many(pairs[:3])
    assert judge_backends.peak_in_flight <= 2


# ----------------------------------------------------------------------------- the server itself


def post_json(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tiny_model_server_speaks_openai_chat_completions():
    server = start_in_thread("tiny", precision="fp32")
    try:
        status, body = post_json(
            f"{server.base_url}/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0, "max_tokens": 5},
        )
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as response:
            models = json.loads(response.read())
        assert [m["id"] for m in models["data"]] == ["tiny"]

        # Invalid requests are OpenAI-style 400s.
        status, body = post_json(f"{server.base_url}/chat/completions", {"messages": []})
        assert status == 400 and "messages" in body["error"]["message"]
    finally:
        server.stop()


def test_local_chat_client_judges_in_process():
    client = LocalChatClient("tiny", precision="fp32")
    judge = AIJudge(client, concurrency=8)
    assert judge.concurrency == 1  # one local model, one generation at a time
    label = judge.label(*PLEASE_PAIRS[0])  # a random model: any outcome, but a valid record
    assert label.source == "judge:judge" and len(label.meta["verdicts"]) == 2


def test_cli_serves_a_function_from_the_working_directory(tmp_path):
    (tmp_path / "my_judge.py").write_text(textwrap.dedent('''
        def judge(messages):
            return "Final verdict: B" if "please" in messages[-1]["content"].split("[The Start of Response B]")[1].lower() else "A"
    '''))
    env = dict(os.environ, PYTHONPATH="")  # the module must come from the working directory
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit.serve", "rule-judge", "--port", "0", "--backend", "my_judge:judge"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = ""
        while "listening on" not in line:
            line = proc.stderr.readline()
            assert line, f"server exited (rc={proc.poll()}) before listening"
        base_url = line.split("listening on", 1)[1].strip()
        assert base_url.startswith("http://127.0.0.1:")
        judge = AIJudge(HTTPChatClient(base_url, max_retries=0), name="rule")  # the socket listens already
        label = judge.label(*PLEASE_PAIRS[1])
        assert label.ranking == [1, 0] and not label.tie and label.source == "judge:rule"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
