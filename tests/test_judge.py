"""The AI judge and the OpenAI-compatible server, over real loopback HTTP.

Servers are real uvicorn servers on free 127.0.0.1 ports: in a thread of this
process (``rlhfkit.serve.start_in_thread``, so the tests can read the call counters
of the scripted backends in tests/judge_backends.py), and once as a subprocess
through the ``python -m rlhfkit.serve`` CLI.
"""

from __future__ import annotations

import http.client
import json
import os
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
from rlhfkit.label import LabelConfig, _labeller
from rlhfkit.label import run as run_label
from rlhfkit.serve import start_in_thread
from tests import judge_backends
from tests.annotate_client import make_pairs
from tests.helpers import free_port

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


@pytest.fixture
def scripted():
    """``scripted([reply, ...])`` -> a :class:`tests.judge_backends.ScriptedServer`, stopped after the test."""
    servers: list[judge_backends.ScriptedServer] = []

    def start(replies: list) -> judge_backends.ScriptedServer:
        servers.append(judge_backends.ScriptedServer(replies))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


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
        assert c.meta["verdicts"] == [f"Final verdict: [[{v}]]" for v in c.meta["parsed"]]
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


# ----------------------------------------------------------------------------- API keys

HI = [{"role": "user", "content": "hi"}]


def judge_label_config(tmp_path: Path, judge_url: str, **overrides) -> LabelConfig:
    samples = make_pairs(tmp_path / "samples.jsonl", 2)
    return LabelConfig(
        **{
            "samples": str(samples),
            "output": str(tmp_path / "labels.jsonl"),
            "source": "judge",
            "judge_url": judge_url,
            "concurrency": 1,
            **overrides,
        }
    )


def test_no_api_key_is_sent_unless_configured(scripted, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-secret")
    server = scripted([judge_backends.chat_reply("A")])
    assert HTTPChatClient(server.base_url).complete(HI) == "A"
    run_label(judge_label_config(tmp_path, server.base_url))  # the label stage: 2 pairs, 2 orders each
    assert len(server.requests) == 1 + 4
    assert all("authorization" not in headers for headers, _ in server.requests)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_api_key_from_the_named_env_var_goes_to_loopback_http(scripted, monkeypatch, tmp_path, host):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-judge")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-user-secret")
    server = scripted([judge_backends.chat_reply("A")])
    url = server.base_url.replace("127.0.0.1", host)
    run_label(judge_label_config(tmp_path, url, judge_api_key_env="MY_JUDGE_KEY"))
    assert [headers["authorization"] for headers, _ in server.requests] == ["Bearer sk-judge"] * 4


def test_api_key_goes_over_https_but_never_over_plain_http_to_another_host(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-judge")
    judge = _labeller(judge_label_config(tmp_path, "https://judge.example.com/v1", judge_api_key_env="MY_JUDGE_KEY"))
    assert judge.client.api_key == "sk-judge" and judge.client.url == "https://judge.example.com/v1/chat/completions"
    assert HTTPChatClient("http://[::1]:8000/v1", api_key="sk-judge").api_key == "sk-judge"  # loopback, IPv6
    for url in ("http://example.com/v1", "http://10.0.0.7:8000/v1", "http://127.0.0.1.example.com/v1"):
        with pytest.raises(ValueError, match="plain http"):
            _labeller(judge_label_config(tmp_path, url, judge_api_key_env="MY_JUDGE_KEY"))
        assert HTTPChatClient(url).api_key is None  # without a key, plain http anywhere is fine
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ValueError, match="judge_api_key_env.*MY_JUDGE_KEY.*not set"):
        _labeller(judge_label_config(tmp_path, "https://judge.example.com/v1", judge_api_key_env="MY_JUDGE_KEY"))


# ----------------------------------------------------------------------------- broken replies, deadline, settings


def test_truncated_body_is_retried(scripted):
    server = scripted([judge_backends.truncated_reply("B"), judge_backends.chat_reply("A")])
    assert client_for(server.base_url, max_retries=1).complete(HI) == "A"
    assert len(server.requests) == 2


def test_garbage_status_line_is_retried_then_a_judge_request_error(scripted):
    server = scripted([b"SPAM SPAM SPAM\r\n\r\n"])
    with pytest.raises(JudgeRequestError, match="after 2 attempts; last error: BadStatusLine"):
        client_for(server.base_url, max_retries=1).complete(HI)
    assert len(server.requests) == 2
    server = scripted([judge_backends.truncated_reply("A")])
    with pytest.raises(JudgeRequestError, match="after 3 attempts; last error: IncompleteRead"):
        client_for(server.base_url, max_retries=2).complete(HI)


def test_content_parts_are_read_as_text(scripted):
    parts = [
        {"type": "text", "text": "Final verdict: "},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "[[B]]"},
    ]
    server = scripted([judge_backends.chat_reply(parts)])
    assert client_for(server.base_url).complete(HI) == "Final verdict: [[B]]"
    label = AIJudge(client_for(server.base_url), concurrency=1).label("Ask.", ["one", "two"])
    assert label.meta["parsed"] == ["B", "B"] and label.tie  # a letter each time (position bias: a tie)
    server = scripted([judge_backends.chat_reply({"text": "A"})])
    with pytest.raises(JudgeRequestError, match="neither text nor a list of content parts"):
        client_for(server.base_url).complete(HI)


def test_a_stalled_server_fails_at_the_deadline(scripted):
    server = scripted([judge_backends.stall(30)])
    client = client_for(server.base_url, timeout=0.4, max_retries=20, deadline=1.0)
    start = time.monotonic()
    with pytest.raises(JudgeRequestError, match="1 s deadline; last error: TimeoutError") as info:
        client.complete(HI)
    assert 1.0 <= time.monotonic() - start < 1.8
    assert "after 3 attempts" in str(info.value) or "after 4 attempts" in str(info.value)
    # The default leaves room for every attempt's timeout and the longest waits between them (1 + 2 s, +10% jitter).
    assert HTTPChatClient(server.base_url, timeout=10, max_retries=2, backoff=1).deadline == pytest.approx(30 + 3.3)


def test_a_trickling_body_fails_at_the_deadline(scripted):
    # A byte every 50 ms never trips the per-read timeout; only the deadline ends the call.
    server = scripted([judge_backends.trickle(0.05)])
    start = time.monotonic()
    with pytest.raises(JudgeRequestError, match="deadline"):
        client_for(server.base_url, timeout=5, max_retries=3, deadline=0.6).complete(HI)
    assert time.monotonic() - start < 1.5


def test_label_config_reaches_the_judge_and_its_client(scripted, tmp_path):
    server = scripted([judge_backends.chat_reply("A")])
    config = judge_label_config(
        tmp_path, server.base_url, judge_max_tokens=200, judge_temperature=0.3, judge_timeout=0.3, judge_retries=1
    )
    run_label(config)
    assert [(body["max_tokens"], body["temperature"]) for _, body in server.requests] == [(200, 0.3)] * 4
    defaults = LabelConfig()
    assert (defaults.judge_max_tokens, defaults.judge_temperature, defaults.judge_timeout, defaults.judge_retries) == (
        16,
        0.0,
        60.0,
        4,
    )
    # judge_timeout and judge_retries: a stalled server costs 2 attempts of 0.3 s, then the stage fails.
    stalled = scripted([judge_backends.stall(30)])
    start = time.monotonic()
    with pytest.raises(JudgeRequestError, match="after 2 attempts"):
        run_label(
            judge_label_config(
                tmp_path, stalled.base_url, judge_timeout=0.3, judge_retries=1, output=str(tmp_path / "stalled.jsonl")
            )
        )
    assert time.monotonic() - start < 2.0 and len(stalled.requests) == 2


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


def test_max_tokens_is_capped_at_the_configured_limit(serve_backend):
    server = start_in_thread("judge", backend=f"{judge_backends.__name__}:mumbles", max_tokens_limit=5)
    try:
        url = f"{server.base_url}/chat/completions"
        for field in ("max_tokens", "max_completion_tokens"):
            status, body = post_json(url, {"messages": HI, field: 6})
            assert status == 400 and "max_tokens 6 is over this request's limit of 5" in body["error"]["message"]
            assert "max_tokens_limit" in body["error"]["message"]
        assert post_json(url, {"messages": HI, "max_tokens": 5})[0] == 200
        # No max_tokens: the default (256) is capped too; the 7-word reply fills the 5 allowed.
        status, body = post_json(url, {"messages": HI})
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()


def test_max_tokens_is_capped_at_the_models_context():
    from rlhfkit.generation.rollout import render_prompt
    from rlhfkit.modeling import models
    from rlhfkit.serve import LocalChatModel, ServerThread, create_app

    model = LocalChatModel("tiny", precision="fp32")
    long_chat = [{"role": "user", "content": "word " * 1500}]
    prompt_tokens = len(model.tokenizer(render_prompt(model.tokenizer, long_chat), add_special_tokens=False)["input_ids"])
    context = models.load_causal_lm("tiny").config.max_position_embeddings
    assert model.token_room(long_chat) == context - prompt_tokens and 0 < context - prompt_tokens < 1000
    server = ServerThread(create_app(model, "tiny", max_tokens_limit=100_000), "127.0.0.1", 0).start()
    try:
        url = f"{server.base_url}/chat/completions"
        for asked in (context - prompt_tokens + 1, 10**9):  # rejected before anything is generated or allocated
            status, body = post_json(url, {"messages": long_chat, "max_tokens": asked})
            assert status == 400 and f"limit of {context - prompt_tokens}" in body["error"]["message"], body
            assert "context" in body["error"]["message"]
        too_long = [{"role": "user", "content": "word " * (context + 10)}]
        status, body = post_json(url, {"messages": too_long, "max_tokens": 1})
        assert status == 400 and "no room" in body["error"]["message"]
        assert post_json(url, {"messages": long_chat, "max_tokens": 2, "temperature": 0})[0] == 200
    finally:
        server.stop()


def test_oversized_request_bodies_get_413(serve_backend):
    url = serve_backend("always_a")
    host, port = url.split("//")[1].split("/")[0].split(":")
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    status, body = post_json(f"{url}/chat/completions", json.loads(big))
    assert status == 413 and body["error"]["code"] == 413
    from rlhfkit.serve import MAX_BODY_BYTES

    assert MAX_BODY_BYTES < len(big) and f"over {MAX_BODY_BYTES} bytes" in body["error"]["message"]
    conn = http.client.HTTPConnection(host, int(port), timeout=10)  # chunked: counted as it arrives
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=iter([big[: len(big) // 2], big[len(big) // 2 :]]),
        encode_chunked=True,
        headers={"Content-Type": "application/json"},
    )
    assert conn.getresponse().status == 413
    conn.close()
    assert post_json(f"{url}/chat/completions", {"messages": HI})[0] == 200


def test_backend_errors_are_a_generic_500_logged_in_full(serve_backend, caplog):
    url = serve_backend("flaky_500")
    with caplog.at_level("ERROR", logger="rlhfkit.serve"):
        status, body = post_json(f"{url}/chat/completions", {"messages": HI})
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "simulated crash" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    assert "server's log" in body["error"]["message"]
    [record] = [r for r in caplog.records if r.name == "rlhfkit.serve"]
    assert record.exc_info[0] is RuntimeError and "simulated crash" in str(record.exc_info[1])


def test_local_chat_client_judges_in_process():
    client = LocalChatClient("tiny", precision="fp32")
    judge = AIJudge(client, concurrency=8)
    assert judge.concurrency == 1  # one local model, one generation at a time
    label = judge.label(*PLEASE_PAIRS[0])  # a random model: any outcome, but a valid record
    assert label.source == "judge:judge" and len(label.meta["verdicts"]) == 2


def test_cli_serves_a_function_from_the_working_directory(tmp_path):
    (tmp_path / "my_judge.py").write_text(
        textwrap.dedent("""
        def judge(messages):
            return "Final verdict: B" if "please" in messages[-1]["content"].split("[The Start of Response B]")[1].lower() else "A"
    """)
    )
    env = dict(os.environ, PYTHONPATH="")  # the module must come from the working directory
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlhfkit.serve",
            "rule-judge",
            "--port",
            "0",
            "--backend",
            "my_judge:judge",
            "--max-tokens-limit",
            "16",
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
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
        status, body = post_json(f"{base_url}/chat/completions", {"messages": HI, "max_tokens": 17})
        assert status == 400 and "limit of 16" in body["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
