"""Constitutional AI's RL stage: AI preferences on principles (rlhfkit.cai_label.label_on_principles, `rlhfkit cai-label`),
the multiple-choice judge behind it (rlhfkit.feedback.judge.ChoiceJudge) and `feedback: constitutional` pipelines.

The judges are scripted: :func:`always_a` (pure position bias), :func:`longer_judge` (prefers the longer option,
whichever letter it has), a fake OpenAI-compatible server that returns a hand-made distribution over the letters
with ``logprobs``, and the tiny model's own next-token logits, recomputed here.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlhfkit import cli
from rlhfkit.cai_label import (
    CAILabelConfig,
    draw_pair_principles,
    label_on_principles,
    order_consistency,
    order_swapped_target,
    response_pairs,
)
from rlhfkit.config import ConfigError, load_config
from rlhfkit.data.constitution import DEFAULT_CONSTITUTION, GENERIC_CHOICE_REQUEST, load_constitution
from rlhfkit.data.io import DataError
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.feedback.judge import ChoiceJudge, build_choice_messages, choice_letter, letter_probability
from tests.helpers import write_jsonl

TEST_CONSTITUTION = """\
principles:
  - id: alpha
    critique_request: "Critique under alpha."
    revision_request: "Revise under alpha."
    choice_request: "Which response is more alpha?"
  - id: beta
    critique_request: "Critique under beta."
    revision_request: "Revise under beta."
    choice_request: "Which response is more beta?"
  - id: gamma
    critique_request: "Critique under gamma."
    revision_request: "Revise under gamma."
"""

# ----------------------------------------------------------------------------- scripted judges

_OPTIONS = re.compile(r"^\(A\) (.*)\n\(B\) (.*)\n\nAnswer with", re.M)
seen: list[str] = []
calls = 0
fail_after: int | None = None


def options(messages: list[dict]) -> tuple[str, str]:
    """The two options of a choice chat (single-line responses; a repair's follow-up turns come after it)."""
    match = _OPTIONS.search(messages[0]["content"])
    assert match is not None, messages[0]["content"]
    return match.group(1), match.group(2)


def always_a(messages: list[dict]) -> str:
    """A judge with nothing but position bias."""
    if len(messages) == 1:
        seen.append(messages[0]["content"])
    return "A"


def longer_judge(messages: list[dict]) -> str:
    """Prefers the longer response, wherever it is shown; a tie on equal lengths is answered with no letter (and
    again when asked again). ``seen``: the choice prompts, a repair's follow-ups left out."""
    if len(messages) == 1:
        seen.append(messages[0]["content"])
    a, b = options(messages)
    return "The answer is (A)" if len(a) > len(b) else "The answer is (B)" if len(b) > len(a) else "Hard to say."


def ordering_judge(messages: list[dict]) -> str:
    """Prefers the longer response, and of two as long the one that sorts later: a tie only for equal responses."""
    a, b = options(messages)
    return "A" if (len(a), a) > (len(b), b) else "B" if (len(b), b) > (len(a), a) else "Either."


def flaky_longer_judge(messages: list[dict]) -> str:
    """:func:`longer_judge`, raising once ``fail_after`` calls have been made (an interrupted run)."""
    global calls
    calls += 1
    if fail_after is not None and calls > fail_after:
        raise RuntimeError("simulated interruption")
    return longer_judge(messages)


@pytest.fixture(autouse=True)
def _reset():
    global calls, fail_after
    seen.clear()
    calls, fail_after = 0, None


@pytest.fixture
def constitution_file(tmp_path) -> Path:
    path = tmp_path / "constitution.yaml"
    path.write_text(TEST_CONSTITUTION)
    return path


SAMPLES = [
    {"prompt_index": 0, "prompt": "Question 0?", "responses": ["short", "a much longer answer"], "temperatures": [0.7, 1.2]},
    {
        "prompt_index": 1,
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Question 1?"}],
        "responses": ["a long reply here", "tiny", "medium one"],
        "temperatures": [0.7, 1.0, 1.2],
    },
    {"prompt_index": 2, "prompt": "Question 2?", "responses": ["same", "same"], "temperatures": [0.7, 1.2]},
    {"prompt_index": 3, "prompt": "Question 3?", "responses": ["xx", "x"], "temperatures": [0.7, 1.2]},
]


@pytest.fixture
def samples_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "samples.jsonl", SAMPLES)


def config(tmp_path, samples_file, constitution_file, **fields) -> CAILabelConfig:
    defaults = dict(
        samples=str(samples_file),
        output=str(tmp_path / "labels.jsonl"),
        constitution=str(constitution_file),
        judge_backend=f"{__name__}:longer_judge",
        seed=3,
        progress=False,
        concurrency=1,
    )
    defaults.update(fields)
    return CAILabelConfig(**defaults)


# ----------------------------------------------------------------------------- the prompt and the constitution


def test_the_choice_prompt_is_the_papers_multiple_choice_question():
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How do I boil an egg?"}]
    messages = build_choice_messages(chat, "Boil it.", "Put it in water for 8 minutes.", "  Which is more helpful?\n")
    assert messages == [
        {
            "role": "user",
            "content": "Consider the following conversation between a human and an assistant:\n"
            "\n"
            "System: Be kind.\n"
            "\n"
            "Human: How do I boil an egg?\n"
            "\n"
            "Which is more helpful?\n"
            "Options:\n"
            "(A) Boil it.\n"
            "(B) Put it in water for 8 minutes.\n"
            "\n"
            "Answer with exactly one letter: A or B. The answer is:",
        }
    ]
    assert build_choice_messages("Hi?", "x", "y", "Q?")[0]["content"].startswith(
        "Consider the following conversation between a human and an assistant:\n\nHuman: Hi?\n\nQ?\nOptions:\n(A) x\n(B) y\n"
    )


def test_choice_requests_are_optional_and_the_shipped_constitution_has_one_per_principle(tmp_path, constitution_file):
    shipped = load_constitution(DEFAULT_CONSTITUTION)
    assert all(p.choice_request and p.choice_question() == p.choice_request for p in shipped.principles)
    assert len({p.choice_request for p in shipped.principles}) == len(shipped.principles)
    mine = load_constitution(constitution_file)
    assert mine["alpha"].choice_question() == "Which response is more alpha?"
    # Without one (a constitution written before the field): a generic question quoting the critique request.
    assert mine["gamma"].choice_question() == GENERIC_CHOICE_REQUEST.format(critique_request="Critique under gamma.")
    assert mine["gamma"].choice_question().endswith('"Critique under gamma."')
    # SL-CAI's digest does not move with the questions (its records stay resumable); the labels' digest does.
    without = tmp_path / "without.yaml"
    without.write_text(re.sub(r"    choice_request: .*\n", "", TEST_CONSTITUTION))
    old = load_constitution(without)
    assert old.digest() == mine.digest() and old.choice_digest() != mine.choice_digest()
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEST_CONSTITUTION.replace('choice_request: "Which response is more beta?"', "choice_request: 3"))
    with pytest.raises(DataError, match=r"principles\[1\]\.choice_request.*expected a string"):
        load_constitution(bad)


# ----------------------------------------------------------------------------- both orders


def test_both_orders_are_asked_and_a_position_biased_judge_gives_only_ties(tmp_path, samples_file, constitution_file):
    result = label_on_principles(config(tmp_path, samples_file, constitution_file, judge_backend=f"{__name__}:always_a"))
    labels = load_comparisons(result.labels)
    assert len(labels) == 1 + 3 + 1 + 1 == result.comparisons == result.ties  # all pairs of K = 2, 3, 2, 2
    # Consistent on no pair, and always the first position.
    assert result.consistency["consistent"]["value"] == 0.0 and result.consistency["first_position"] == 1.0
    for label in labels:
        assert label.tie and label.meta["target"] == 0.5 and label.ranking == [0, 1]
        assert label.meta["p_first"] == [1.0, 0.0]  # order 1 says x, order 2 says y
        assert label.meta["parsed"] == ["A", "A"] and label.meta["method"] == "verdict"
    # Every pair was shown both ways round.
    assert len(seen) == 2 * len(labels)
    for k, label in enumerate(labels):
        x, y = label.responses
        assert f"(A) {x}\n(B) {y}\n" in seen[2 * k] and f"(A) {y}\n(B) {x}\n" in seen[2 * k + 1]


def test_a_judge_preferring_the_longer_response_gives_hard_labels_either_way_round(tmp_path, samples_file, constitution_file):
    result = label_on_principles(config(tmp_path, samples_file, constitution_file))
    labels = load_comparisons(result.labels)
    # Both orders agree on the 5 pairs of unequal lengths, not on the tie; no position bias.
    assert result.consistency["consistent"]["value"] == pytest.approx(5 / 6) and result.consistency["pairs"] == 6
    assert result.consistency["first_position"] == pytest.approx(0.5)
    by_key = {(c.meta["item_index"], tuple(c.meta["pair"])): c for c in labels}
    assert list(by_key) == [(0, (0, 1)), (1, (0, 1)), (1, (0, 2)), (1, (1, 2)), (2, (0, 1)), (3, (0, 1))]
    for (index, (i, j)), label in by_key.items():
        x, y = SAMPLES[index]["responses"][i], SAMPLES[index]["responses"][j]
        assert label.responses == [x, y]
        if len(x) == len(y):  # no letter in either order: 0.5 each, a tie
            assert label.tie and label.meta["target"] == 0.5 and label.meta["parsed"] == [None, None]
            continue
        longer = 0 if len(x) > len(y) else 1
        assert not label.tie and label.ranking == [longer, 1 - longer] and label.meta["target"] == 1.0
        assert label.chosen == max(x, y, key=len)
        assert label.meta["p_first"] == ([1.0, 1.0] if longer == 0 else [0.0, 0.0])
        assert label.meta["parsed"] == (["A", "B"] if longer == 0 else ["B", "A"])
        assert label.source == "cai-principles" and label.meta["method"] == "verdict"
    # The short response in position A of the first item's first order, the long one in the second.
    assert by_key[(0, (0, 1))].ranking == [1, 0]


def test_order_swapped_target_is_the_mean_of_the_two_orders():
    assert order_swapped_target(1.0, 1.0) == 0.5  # "A" both times: position bias only
    assert order_swapped_target(1.0, 0.0) == 1.0 and order_swapped_target(0.0, 1.0) == 0.0
    assert order_swapped_target(0.9, 0.3) == pytest.approx((0.9 + 0.7) / 2)
    assert order_swapped_target(0.5, 0.0) == 0.75  # an unparseable order counts 0.5


# ----------------------------------------------------------------------------- token probabilities


def test_letter_probability_normalises_the_letters_over_a_hand_made_distribution():
    dist = {"A": math.log(0.5), " A": math.log(0.1), "B": math.log(0.2), "(B": math.log(0.1), "a": math.log(0.05), "C": -1.0}
    assert letter_probability(dist) == pytest.approx(0.6 / 0.9)
    assert letter_probability({"A": -3.0}) == 1.0 and letter_probability({" B": -0.1}) == 0.0
    assert letter_probability({"The": -0.1, "C": -2.0}) is None
    assert [choice_letter(t) for t in ("A", " B", "(A", "**B", "A)", "a", "AB", "The")] == [
        "A",
        "B",
        "A",
        "B",
        "A",
        None,
        None,
        None,
    ]


class _FakeClient:
    """A client with a hand-made P(A) per chat, through ``complete_with_logprobs``; ``complete`` says 'B'."""

    def __init__(self, p_a, *, with_logprobs=True):
        self.p_a, self.with_logprobs = p_a, with_logprobs

    def complete(self, messages, temperature=0.0, max_tokens=16):
        return "B"

    def complete_with_logprobs(self, messages, temperature=0.0, max_tokens=16, top_logprobs=20):
        p = self.p_a(messages)
        alternatives = {"A": math.log(p), "B": math.log(1 - p), "C": math.log(1e-3)} if self.with_logprobs else None
        return ("A" if p > 0.5 else "B"), alternatives


def test_the_choice_judge_reads_probabilities_where_it_can_and_letters_otherwise():
    chat = build_choice_messages("Q?", "x", "y", "Which?")
    choice = ChoiceJudge(_FakeClient(lambda m: 0.8)).judge([chat])[0]
    assert choice.method == "logprobs" and choice.p_a == pytest.approx(0.8) and choice.letter == "A"
    fallback = ChoiceJudge(_FakeClient(lambda m: 0.8, with_logprobs=False)).judge([chat])[0]
    # No probabilities in the reply: its letter counts (the same request's text, "A"; not asked again: `complete` says B).
    assert (fallback.method, fallback.p_a, fallback.letter, fallback.text) == ("verdict", 1.0, "A", "A")
    assert ChoiceJudge(_FakeClient(lambda m: 0.8), method="verdict").judge([chat])[0].p_a == 0.0
    with pytest.raises(RuntimeError, match="no token probabilities"):
        ChoiceJudge(_FakeClient(lambda m: 0.8, with_logprobs=False), method="logprobs").judge([chat])


BIAS, SKILL = 0.8, 1.5
"""The fake server's judge: logit P(A) = BIAS + SKILL * sign(len(A) - len(B)) (it likes A and long answers)."""


def _served_p_a(content: str) -> float:
    a, b = options([{"content": content}])
    sign = (len(a) > len(b)) - (len(a) < len(b))
    return 1 / (1 + math.exp(-(BIAS + SKILL * sign)))


class _LogprobHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        p_a = _served_p_a(body["messages"][-1]["content"])
        top = [{"token": " A", "logprob": math.log(p_a)}, {"token": " B", "logprob": math.log(1 - p_a)}]
        top.sort(key=lambda alt: -alt["logprob"])
        letter = top[0]["token"]
        reply = {
            "choices": [
                {
                    "message": {"role": "assistant", "content": f"({letter.strip()})"},
                    # The reply's tokens "(" then the letter: the letter's position holds the alternatives.
                    "logprobs": {
                        "content": [
                            {"token": "(", "logprob": 0.0, "top_logprobs": [{"token": "(", "logprob": 0.0}]},
                            {"token": letter, "logprob": top[0]["logprob"], "top_logprobs": top},
                        ]
                    }
                    if body.get("logprobs")
                    else None,
                }
            ]
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def logprob_server():
    _LogprobHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LogprobHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_soft_labels_from_a_servers_logprobs_are_the_mean_of_the_normalised_probabilities(
    tmp_path, samples_file, constitution_file, logprob_server
):
    result = label_on_principles(config(tmp_path, samples_file, constitution_file, judge_backend="", judge_url=logprob_server))
    assert all(r["logprobs"] is True and r["top_logprobs"] == 20 for r in _LogprobHandler.requests)
    assert len(_LogprobHandler.requests) == 2 * result.comparisons and result.methods == {"logprobs": result.comparisons}
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    for label in load_comparisons(result.labels):
        x, y = label.responses
        sign = (len(x) > len(y)) - (len(x) < len(y))
        p_a_first, p_a_second = sigmoid(BIAS + SKILL * sign), sigmoid(BIAS - SKILL * sign)
        p_x = (p_a_first + 1 - p_a_second) / 2
        # The bias towards A cancels: P(x) depends on the lengths alone, symmetric around 0.5.
        assert p_x == pytest.approx(0.5 + sign * (sigmoid(BIAS + SKILL) - sigmoid(BIAS - SKILL)) / 2)
        assert label.meta["p_first"] == pytest.approx([p_a_first, 1 - p_a_second])
        assert label.meta["target"] == pytest.approx(max(p_x, 1 - p_x))
        assert label.tie == (sign == 0) and label.ranking == ([0, 1] if p_x >= 0.5 else [1, 0])
        assert label.meta["method"] == "logprobs" and label.meta["verdicts"][0] in ("(A)", "(B)")


def test_the_tiny_models_next_token_probabilities_give_its_labels(tmp_path, samples_file, constitution_file):
    import torch

    from rlhfkit.generation.rollout import render_prompt
    from rlhfkit.modeling import models

    cfg = config(
        tmp_path, samples_file, constitution_file, judge_backend="", judge_model="tiny", method="logprobs", precision="fp32"
    )
    labels = load_comparisons(label_on_principles(cfg).labels)
    tokenizer, model = models.load_tokenizer("tiny"), models.load_causal_lm("tiny").eval()
    constitution = load_constitution(constitution_file)

    vocab = tokenizer.get_vocab()  # byte-level BPE: "A" and "\u0120A" (space, then A) are the letter tokens
    letter_ids = {letter: [vocab[t] for t in (letter, "\u0120" + letter) if t in vocab] for letter in "AB"}
    assert all(len(ids) == 2 for ids in letter_ids.values())

    def p_a(prompt, a, b, question):  # the softmax over the letter tokens, recomputed here
        text = render_prompt(tokenizer, build_choice_messages(prompt, a, b, question))
        with torch.no_grad():
            logits = model(input_ids=tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]).logits[0, -1]
        probs = torch.softmax(logits.float(), -1)
        mass = {letter: float(probs[ids].sum()) for letter, ids in letter_ids.items()}
        return mass["A"] / (mass["A"] + mass["B"])

    for label in labels:
        index, (i, j) = label.meta["item_index"], label.meta["pair"]
        pairs = response_pairs(len(SAMPLES[index]["responses"]))
        principle = draw_pair_principles(constitution, 3, index, len(pairs))[pairs.index((i, j))]
        x, y = label.responses
        first, second = (
            p_a(label.prompt, x, y, principle.choice_question()),
            p_a(label.prompt, y, x, principle.choice_question()),
        )
        assert label.meta["p_first"] == pytest.approx([first, 1 - second], abs=1e-5)
        p_x = (first + 1 - second) / 2
        assert label.meta["target"] == pytest.approx(max(p_x, 1 - p_x), abs=1e-5)
        assert label.ranking == ([0, 1] if p_x >= 0.5 else [1, 0]) and label.tie == (x == y)  # same chats: exactly 0.5
        assert label.meta["method"] == "logprobs" and label.meta["verdicts"] == ["", ""]


def test_logprobs_are_refused_where_the_judge_has_none(tmp_path, samples_file, constitution_file):
    from rlhfkit.serve import start_in_thread

    with pytest.raises(ConfigError, match="method 'logprobs'.*no token probabilities"):
        label_on_principles(config(tmp_path, samples_file, constitution_file, method="logprobs"))
    server = start_in_thread("judge", backend=f"{__name__}:longer_judge")  # rlhfkit serve: no logprobs
    try:
        url = server.base_url
        auto = label_on_principles(config(tmp_path, samples_file, constitution_file, judge_backend="", judge_url=url))
        assert auto.methods == {"verdict": 6}
        with pytest.raises(RuntimeError, match="no token probabilities"):
            label_on_principles(
                config(
                    tmp_path,
                    samples_file,
                    constitution_file,
                    judge_backend="",
                    judge_url=url,
                    method="logprobs",
                    output=str(tmp_path / "lp.jsonl"),
                )
            )
    finally:
        server.stop()


# ----------------------------------------------------------------------------- principles, resume, CLI


def test_principles_are_drawn_per_pair_by_seed_and_item_and_recorded(tmp_path, samples_file, constitution_file):
    constitution = load_constitution(constitution_file)
    labels = load_comparisons(label_on_principles(config(tmp_path, samples_file, constitution_file)).labels)
    for k, label in enumerate(labels):
        index, pair = label.meta["item_index"], tuple(label.meta["pair"])
        pairs = response_pairs(len(SAMPLES[index]["responses"]))
        rng = random.Random(f"rl-cai 3 {index}")  # the documented draw, written out
        expected = [rng.choice(constitution.ids) for _ in pairs][pairs.index(pair)]
        assert label.meta["principle"] == expected
        question = constitution[expected].choice_question()
        assert f"\n\n{question}\nOptions:\n" in seen[2 * k] and f"\n\n{question}\nOptions:\n" in seen[2 * k + 1]
    # The draws depend on the seed and the item alone; over many items every principle comes up.
    assert draw_pair_principles(constitution, 3, 1, 3) == draw_pair_principles(constitution, 3, 1, 3)
    many = [p.id for index in range(60) for p in draw_pair_principles(constitution, 3, index, 1)]
    assert set(many) == set(constitution.ids)
    assert many != [p.id for index in range(60) for p in draw_pair_principles(constitution, 4, index, 1)]


def test_an_interrupted_run_resumes_to_the_uninterrupted_output(tmp_path, samples_file, constitution_file):
    global fail_after
    whole = label_on_principles(config(tmp_path, samples_file, constitution_file, output=str(tmp_path / "whole.jsonl")))
    cfg = config(tmp_path, samples_file, constitution_file, judge_backend=f"{__name__}:flaky_longer_judge", chunk_size=2)
    fail_after = 9  # the first chunk (items 0 and 1: 4 pairs, 8 calls) is saved, the second fails
    with pytest.raises(RuntimeError, match="simulated interruption"):
        label_on_principles(cfg)
    assert {c.meta["item_index"] for c in load_comparisons(cfg.output)} == {0, 1}
    fail_after = None
    before = calls
    label_on_principles(cfg)
    assert calls - before == 2 * 2 + 2  # items 2 and 3 only, both orders (item 2 asked again: no letter)
    assert Path(cfg.output).read_text() == Path(whole.labels).read_text()
    # Other settings are refused, with the changed keys named; resume=never starts over.
    with pytest.raises(ConfigError, match=r"cannot resume .*seed: 3 -> 4"):
        label_on_principles(CAILabelConfig(**{**vars(cfg), "seed": 4}))
    with pytest.raises(ConfigError, match=r"cannot resume .*judge_backend"):
        label_on_principles(CAILabelConfig(**{**vars(cfg), "judge_backend": f"{__name__}:always_a"}))
    label_on_principles(CAILabelConfig(**{**vars(cfg), "judge_backend": f"{__name__}:always_a", "resume": "never"}))
    assert all(c.tie for c in load_comparisons(cfg.output))


def test_bad_settings_fail_before_any_judge_loads(tmp_path, samples_file, constitution_file):
    with pytest.raises(ConfigError, match="no judge"):
        label_on_principles(config(tmp_path, samples_file, constitution_file, judge_backend=""))
    with pytest.raises(ConfigError, match="method must be one of"):
        label_on_principles(config(tmp_path, samples_file, constitution_file, method="vote"))
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Q?", "responses": ["only one"]}])
    with pytest.raises(DataError, match="responses.*at least 2"):
        label_on_principles(config(tmp_path, one, constitution_file, judge_backend="", judge_model="/no/such/model"))


@pytest.mark.skipif("cai-label" not in cli.STAGES, reason="rlhfkit cai-label: apply the cli.py patch (not this file's)")
def test_the_cli_labels_samples_end_to_end(tmp_path, samples_file, constitution_file, capsys):
    out = tmp_path / "cli.jsonl"
    args = [f"samples={samples_file}", f"output={out}", f"constitution={constitution_file}", "seed=3", "progress=false"]
    assert cli.main(["cai-label", f"judge_backend={__name__}:longer_judge", *args]) == 0
    labels = load_comparisons(out)
    assert len(labels) == 6 and all(c.source == "cai-principles" and "principle" in c.meta for c in labels)
    assert json.loads((tmp_path / "cli.jsonl.meta.json").read_text())["judge_backend"] == f"{__name__}:longer_judge"
    assert cli.main(["cai-label", "judge_backend=", *args]) == 2
    assert "no judge" in capsys.readouterr().err


def test_a_yaml_config_reaches_the_function_as_the_cli_reads_it(tmp_path, samples_file, constitution_file):
    path = tmp_path / "label.yaml"
    path.write_text(f"samples: {samples_file}\noutput: {tmp_path / 'y.jsonl'}\nconstitution: {constitution_file}\nseed: 3\n")
    cfg = load_config(CAILabelConfig, path, [f"judge_backend={__name__}:longer_judge", "progress=false"])
    assert label_on_principles(cfg).comparisons == 6


# ----------------------------------------------------------------------------- the pipeline


def test_feedback_constitutional_runs_sl_cai_then_sft_sample_ai_labels_reward_and_dpo(tmp_path, constitution_file):
    """SL-CAI (a scripted critic) -> SFT on the revisions -> sample the SL-CAI model -> labels on principles (the
    longer-response judge) -> reward model -> DPO -> eval -> report, on the tiny model."""
    from rlhfkit import pipeline

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(6)])
    cfg = pipeline.PipelineConfig(
        output_dir=str(tmp_path / "run"),
        model="tiny",
        algorithm="dpo",
        feedback="constitutional",
        cai={
            "prompts": str(prompts),
            "constitution": str(constitution_file),
            "critic_backend": "tests.test_cai:scripted_critic",
            "answerer": "critic",
            "progress": False,
        },
        sft={"max_steps": 2, "batch_size": 2, "progress": False},
        sample={"max_new_tokens": 6, "batch_size": 8, "temperatures": [1.0, 1.0, 1.0], "progress": False},
        label={"judge_backend": f"{__name__}:ordering_judge", "progress": False},
        reward={"max_steps": 1, "batch_size": 2, "progress": False, "eval_fraction": 0.25},
        dpo={"max_steps": 1, "batch_size": 2, "progress": False, "eval_fraction": 0.25},
        eval={"max_prompts": 2, "max_new_tokens": 4, "best_of_n": 1, "bootstrap": 10, "progress": False},
        reward_gate=False,
    )
    names = [s.name for s in pipeline.build_stages(cfg)]
    assert names == ["cai", "sft", "sample", "label", "reward", "gate", "dpo", "eval", "report"]
    status = pipeline.run(cfg)
    assert list(status) == names and set(status.values()) == {"ran"}
    run = tmp_path / "run"
    finished = [(run / n / ".stage.json").stat().st_mtime_ns for n in names[:-1]]
    assert finished == sorted(finished)  # each stage's marker written after the one before it
    # The SFT stage trained on SL-CAI's revisions, the sampler used SL-CAI's prompts and model.
    stages = {s.name: s.config for s in pipeline.build_stages(cfg)}
    assert stages["sft"].data == str(run / "cai" / "sft.jsonl") and (run / "cai" / "sft.jsonl").stat().st_size > 0
    assert stages["sample"].prompts == str(prompts) and stages["sample"].model == str(run / "sft")
    labels = load_comparisons(run / "label" / "labels.jsonl")
    assert len(labels) == 6 * 3  # 3 pairs of 3 responses per prompt
    assert {c.source for c in labels} == {"cai-principles"}
    assert all(c.meta["principle"] in ("alpha", "beta", "gamma") and 0.5 <= c.meta["target"] <= 1.0 for c in labels)
    samples = [json.loads(line) for line in (run / "sample" / "samples.jsonl").read_text().splitlines()]
    for label in labels:  # the labels are of the sampled responses, the judge's choice first
        i, j = label.meta["pair"]
        assert label.responses == [samples[label.meta["item_index"]]["responses"][k] for k in (i, j)]
        x, y = label.responses
        assert label.tie == (x == y) and (x == y or label.chosen == max(x, y, key=lambda r: (len(r), r)))
    assert (run / "reward" / "heldout.json").is_file() and (run / "dpo" / "model.safetensors").is_file()
    assert (run / "report.html").is_file()
    # Nothing changed: every stage is skipped (the report is always redone).
    assert [n for n, v in pipeline.run(cfg).items() if v == "ran"] == ["report"]


def test_the_constitutional_pipelines_wiring_and_its_errors(tmp_path):
    from rlhfkit import pipeline
    from rlhfkit.data.constitution import DEFAULT_PROMPTS, HELDOUT_PROMPTS

    out = tmp_path / "run"
    base = {"output_dir": str(out), "model": "tiny", "feedback": "constitutional"}
    stages = {s.name: s.config for s in pipeline.build_stages(pipeline.PipelineConfig(**base))}
    assert stages["cai"].model == "tiny" and stages["sft"].data == str(out / "cai" / "sft.jsonl")
    assert stages["sample"].prompts == str(DEFAULT_PROMPTS) and stages["eval"].prompts == str(HELDOUT_PROMPTS)
    assert stages["label"].judge_model == "tiny" and stages["label"].samples == str(out / "sample" / "samples.jsonl")
    assert stages["reward"].data == stages["dpo"].data == stages["label"].output
    # Sections may move the defaults (prompts, judge, constitution) but not the wiring.
    mine = pipeline.PipelineConfig(
        **base,
        cai={"constitution": "my.yaml"},
        sample={"prompts": "p.jsonl"},
        label={"judge_url": "http://127.0.0.1:1/v1"},
        eval={"prompts": "e.jsonl"},
    )
    stages = {s.name: s.config for s in pipeline.build_stages(mine)}
    assert stages["label"].constitution == "my.yaml" and stages["label"].judge_url == "http://127.0.0.1:1/v1"
    assert (stages["sample"].prompts, stages["eval"].prompts) == ("p.jsonl", "e.jsonl")
    with pytest.raises(ConfigError, match="section 'sft' may not set 'data'"):
        pipeline.build_stages(pipeline.PipelineConfig(**base, sft={"data": "x.jsonl"}))
    with pytest.raises(ConfigError, match="'label'.*source"):  # a LabelConfig key is not a CAILabelConfig key
        pipeline.build_stages(pipeline.PipelineConfig(**base, label={"source": "judge"}))
    with pytest.raises(ConfigError, match="section 'cai' is used only with feedback: constitutional"):
        pipeline.build_stages(pipeline.PipelineConfig(output_dir=str(out), cai={"rounds": 2}))
    assert [s.name for s in pipeline.build_stages(pipeline.PipelineConfig(output_dir=str(out)))][:3] == ["sft", "sample", "label"]


def test_order_consistency_by_hand():
    def label(item, p_x_as_a, p_x_as_b):
        return Comparison(
            prompt="q", responses=["x", "y"], ranking=[0, 1], meta={"item_index": item, "p_first": [p_x_as_a, p_x_as_b]}
        )

    labels = [label(0, 0.7, 0.6), label(0, 0.7, 0.4), label(1, 0.3, 0.2), label(2, 0.5, 0.9)]
    got = order_consistency(labels)
    assert got["pairs"] == 4
    assert got["consistent"]["value"] == pytest.approx(2 / 4)  # both above 1/2, both below; not 0.7/0.4 nor 0.5/0.9
    # P(A) in each order: 0.7, 0.4 | 0.7, 0.6 | 0.3, 0.8 | 0.5, 0.1
    assert got["first_position"] == pytest.approx((0.7 + 0.4 + 0.7 + 0.6 + 0.3 + 0.8 + 0.5 + 0.1) / 8)
    lo, hi = got["consistent"]["ci"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0 and lo < hi
    with pytest.raises(ValueError, match="no labels"):
        order_consistency([])
