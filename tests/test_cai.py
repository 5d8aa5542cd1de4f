"""Constitutional AI's supervised stage (rlhfkit.cai) and constitution files (rlhfkit.data.constitution).

The critic in most tests is scripted (:func:`scripted_critic`): it echoes the principle id it was asked about and
the answer it was shown, so the provenance of every record can be written down exactly. It runs behind a real
OpenAI-compatible server (``rlhfkit.serve`` in a thread) or as a ``module:function`` backend.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from rlhfkit import cli
from rlhfkit.cai import CAIConfig, critique_messages, critique_revise, draw_principles, few_shot_turns, revision_messages
from rlhfkit.config import ConfigError
from rlhfkit.data.constitution import (
    DEFAULT_FEW_SHOT,
    DEFAULT_PROMPTS,
    HELDOUT_PROMPTS,
    FewShotExample,
    Principle,
    load_constitution,
    load_few_shot,
)
from rlhfkit.data.io import DataError
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.prompts import load_prompts
from rlhfkit.data.sft import load_sft_file
from rlhfkit.serve import start_in_thread
from rlhfkit.sft import train as train_sft
from tests.helpers import read_jsonl, write_jsonl

# ----------------------------------------------------------------------------- a scripted critic

TEST_CONSTITUTION = """\
name: test
principles:
  - id: alpha
    critique_request: "Critique under alpha."
    revision_request: "Revise under alpha."
  - id: beta
    critique_request: "Critique under beta."
    revision_request: "Revise under beta."
  - id: gamma
    critique_request: "Critique under gamma."
    revision_request: "Revise under gamma."
"""

_REQUEST = re.compile(r"(Critique|Revise) under (\w+)\.")


def scripted_critic(messages: list[dict]) -> str:
    """``answer to <PROMPT>`` for a plain prompt; ``critique[ID] of <ANSWER>`` for a critique request under
    principle ID; ``ANSWER | revised[ID]`` for a revision request (ANSWER: the answer the chat critiques)."""
    match = _REQUEST.fullmatch(messages[-1]["content"])
    if match is None:
        return f"answer to <{messages[-1]['content']}>"
    kind, principle = match.groups()
    if kind == "Critique":
        return f"critique[{principle}] of <{messages[-2]['content']}>"
    return f"{messages[-4]['content']} | revised[{principle}]"


calls = 0
fail_after: int | None = None
seen_chats: list[list[dict]] = []


def recording_critic(messages: list[dict]) -> str:
    """:func:`scripted_critic`, keeping every chat it gets in ``seen_chats``."""
    seen_chats.append(messages)
    return scripted_critic(messages)


def flaky_critic(messages: list[dict]) -> str:
    """:func:`scripted_critic`, raising once ``fail_after`` calls have been made (an interrupted run)."""
    global calls
    calls += 1
    if fail_after is not None and calls > fail_after:
        raise RuntimeError("simulated interruption")
    return scripted_critic(messages)


@pytest.fixture
def constitution_file(tmp_path) -> Path:
    path = tmp_path / "constitution.yaml"
    path.write_text(TEST_CONSTITUTION)
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    records = [{"prompt": f"Question {i}?"} for i in range(4)]
    records.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Chat question?"}]})
    return write_jsonl(tmp_path / "prompts.jsonl", records)


def expected_record(index: int, prompt, constitution, *, seed: int, rounds: int, initial: str | None = None) -> dict:
    """The provenance record :func:`scripted_critic` must give, worked out here from the draws alone."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    answer = f"answer to <{text}>" if initial is None else initial
    rng = random.Random(seed * 1_000_003 + index)
    ids = [rng.choice(constitution.ids) for _ in range(rounds)]
    first, steps = answer, []
    for r, principle_id in enumerate(ids):
        critique = f"critique[{principle_id}] of <{answer}>"
        revision = f"{answer} | revised[{principle_id}]"
        steps.append(
            {
                "round": r,
                "principle": principle_id,
                "critique_request": f"Critique under {principle_id}.",
                "critique": critique,
                "revision_request": f"Revise under {principle_id}.",
                "revision": revision,
            }
        )
        answer = revision
    return {
        "prompt_index": index,
        "prompt": prompt,
        "initial": first,
        "principles": ids,
        "critiques": [s["critique"] for s in steps],
        "revision": answer,
        "revised": True,
        "seed": seed,
        "rounds": steps,
    }


def fast(tmp_path, name: str, **fields) -> CAIConfig:
    """A CAIConfig for the tiny model with small token budgets, writing to ``tmp_path/name``."""
    defaults = dict(
        model="tiny", output_dir=str(tmp_path / name), max_new_tokens=6, critique_max_tokens=6, precision="fp32", progress=False
    )
    defaults.update(fields)
    return CAIConfig(**defaults)


# ----------------------------------------------------------------------------- constitution files


def test_the_shipped_constitution_few_shot_examples_and_prompts_load():
    constitution = load_constitution()
    assert 8 <= len(constitution.principles) <= 12
    assert len(set(constitution.ids)) == len(constitution.ids)
    assert {p.category for p in constitution.principles} == {"harmlessness", "honesty", "helpfulness"}
    assert all(p.critique_request and p.revision_request for p in constitution.principles)
    examples = load_few_shot(DEFAULT_FEW_SHOT, constitution)
    assert examples and all(e.principle in constitution.ids for e in examples)
    for path in (DEFAULT_PROMPTS, HELDOUT_PROMPTS):
        kinds = {json.loads(line)["kind"] for line in path.read_text().splitlines()}
        assert kinds == {"red-team", "ordinary"} and load_prompts(path)
    assert not set(load_prompts(DEFAULT_PROMPTS)) & set(load_prompts(HELDOUT_PROMPTS))


def test_a_bare_list_and_a_json_file_are_constitutions_too(tmp_path):
    principles = [{"id": "x", "critique_request": "Find faults.", "revision_request": "Fix them."}]
    listed = tmp_path / "list.yaml"
    listed.write_text("- id: x\n  critique_request: Find faults.\n  revision_request: Fix them.\n")
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"principles": principles}, indent="\t"))  # tabs: not YAML, read as JSON
    for path in (listed, as_json):
        constitution = load_constitution(path)
        assert constitution.principles == (Principle("x", "Find faults.", "Fix them."),)
        assert constitution.path == str(path)
    assert load_constitution(listed).digest() == load_constitution(as_json).digest()


GOOD = "  - id: a\n    critique_request: C\n    revision_request: R\n"


@pytest.mark.parametrize(
    "text, line, field, problem",
    [
        ("principles:\n" + GOOD + "  - id: b\n    critique_request: C\n", 5, "principles[1].revision_request", "missing"),
        (
            "principles:\n" + GOOD + "  - id: b\n    critique_request: '  '\n    revision_request: R\n",
            6,
            "principles[1].critique_request",
            "empty",
        ),
        (
            "principles:\n" + GOOD + "  - id: b\n    critque_request: C\n    revision_request: R\n",
            6,
            "principles[1].critque_request",
            "unknown key",
        ),
        (
            "principles:\n" + GOOD + "  - id: a\n    critique_request: C2\n    revision_request: R2\n",
            5,
            "principles[1].id",
            "duplicate id 'a' (first: principle 0, line 2)",
        ),
        (
            "principles:\n" + GOOD + "  - id: 7\n    critique_request: C\n    revision_request: R\n",
            5,
            "principles[1].id",
            "expected a string (quote it), got int",
        ),
        (
            "principles:\n" + GOOD + "    revision_request: R2\n",
            5,
            "principles[0].revision_request",
            "given twice (first on line 4)",
        ),
        ("principles:\n" + GOOD + "  - just a string\n", 5, "principles[1]", "expected a principle"),
        ("principles: []\n", 1, "principles", "no principles"),
        ("principle:\n" + GOOD, 2, "principle", "unknown key"),
        ("name: x\n", 1, "principles", "missing"),
        ("principles:\n" + GOOD + "  - id: [b\n", 6, None, "invalid YAML"),
    ],
)
def test_a_bad_constitution_names_the_file_line_and_field(tmp_path, text, line, field, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        load_constitution(path)
    e = caught.value
    assert (e.path, e.line, e.field) == (str(path), line, field)
    assert problem in e.problem
    assert str(e).startswith(f"{path}:{line}: ")


def test_a_bad_json_constitution_names_the_principle(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            [{"id": "a", "critique_request": "C", "revision_request": "R"}, {"id": "b", "critique_request": "C"}], indent=2
        )
    )
    with pytest.raises(DataError, match=r"bad\.json:7: field '\[1\]\.revision_request': missing"):
        load_constitution(path)
    path.write_text(json.dumps([{"id": "a", "critique_request": "C"}], indent="\t"))  # read as JSON: no lines
    with pytest.raises(DataError, match=r"bad\.json: field '\[0\]\.revision_request': missing"):
        load_constitution(path)
    with pytest.raises(DataError, match="missing.yaml: file not found"):
        load_constitution(tmp_path / "missing.yaml")


def test_few_shot_examples_take_a_principle_or_both_requests(tmp_path, constitution_file):
    constitution = load_constitution(constitution_file)
    base = {"prompt": "P", "response": "A", "critique": "C", "revision": "R"}
    path = write_jsonl(
        tmp_path / "shots.jsonl", [base | {"principle": "beta"}, base | {"critique_request": "Why?", "revision_request": "Fix."}]
    )
    first, second = load_few_shot(path, constitution)
    assert (first.critique_request, first.revision_request, first.principle) == (
        "Critique under beta.",
        "Revise under beta.",
        "beta",
    )
    assert (second.critique_request, second.revision_request, second.principle) == ("Why?", "Fix.", "")
    for record, line_field in [
        (base | {"principle": "delta"}, "field 'principle': 'delta' is not a principle"),
        (base, "field 'principle': missing"),
        (base | {"critique_request": "Why?"}, "field 'revision_request': missing"),
        ({"prompt": "P", "response": "A", "critique": "", "revision": "R", "principle": "beta"}, "field 'critique': empty"),
    ]:
        bad = write_jsonl(tmp_path / "bad.jsonl", [base | {"principle": "beta"}, record])
        with pytest.raises(DataError, match=f"bad.jsonl:2: {re.escape(line_field)}"):
            load_few_shot(bad, constitution)


# ----------------------------------------------------------------------------- the chats and the draws


def test_the_critique_and_revision_chats_are_exact():
    principle = Principle("p", "What is wrong?", "Fix it.")
    shot = FewShotExample("Shot prompt", "Shot answer", "Shot request?", "Shot critique", "Shot fix.", "Shot revision")
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    assert few_shot_turns([shot]) == [
        {"role": "user", "content": "Shot prompt"},
        {"role": "assistant", "content": "Shot answer"},
        {"role": "user", "content": "Shot request?"},
        {"role": "assistant", "content": "Shot critique"},
        {"role": "user", "content": "Shot fix."},
        {"role": "assistant", "content": "Shot revision"},
    ]
    assert critique_messages(prompt, "Hello.", principle, [shot]) == [
        {"role": "system", "content": "Be kind."},
        *few_shot_turns([shot]),
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is wrong?"},
    ]
    assert revision_messages("Hi?", "Hello.", principle, "Too short.") == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is wrong?"},
        {"role": "assistant", "content": "Too short."},
        {"role": "user", "content": "Fix it."},
    ]


def test_principle_draws_are_reproducible_by_seed(constitution_file):
    constitution = load_constitution(constitution_file)

    def ids(seed, index, rounds=4):
        return [p.id for p in draw_principles(constitution, seed, index, rounds)]

    assert ids(3, 5) == ids(3, 5)
    assert ids(3, 5)[:2] == ids(3, 5, rounds=2)  # more rounds only add draws
    rng = random.Random(3 * 1_000_003 + 5)
    assert ids(3, 5) == [rng.choice(constitution.ids) for _ in range(4)]
    draws = {seed: [ids(seed, i) for i in range(20)] for seed in (0, 1)}
    assert draws[0] != draws[1]
    assert {p for prompt in draws[0] for p in prompt} == set(constitution.ids)


# ----------------------------------------------------------------------------- the stage


@pytest.fixture
def scripted_server():
    server = start_in_thread("critic", backend=f"{__name__}:scripted_critic")
    yield server.base_url
    server.stop()


def test_provenance_records_are_exact_with_a_scripted_server(tmp_path, constitution_file, prompts_file, scripted_server):
    config = fast(
        tmp_path,
        "cai",
        prompts=str(prompts_file),
        constitution=str(constitution_file),
        critic_url=scripted_server,
        answerer="critic",
        rounds=3,
        seed=7,
        chunk_size=2,
        concurrency=3,
    )
    result = critique_revise(config)
    constitution = load_constitution(constitution_file)
    prompts = load_prompts(prompts_file)
    expected = [expected_record(i, p, constitution, seed=7, rounds=3) for i, p in enumerate(prompts)]
    assert read_jsonl(result.revisions) == expected
    assert result.records == 5 and result.sft_records == 5 and result.preference_pairs == 5

    sft = read_jsonl(result.sft)
    assert sft[0] == {"prompt": "Question 0?", "completion": expected[0]["revision"]}
    assert sft[4] == {"messages": [*prompts[4], {"role": "assistant", "content": expected[4]["revision"]}]}
    assert [c.messages[-1][1] for c in load_sft_file(result.sft)] == [r["revision"] for r in expected]

    pairs = load_comparisons(result.preferences)
    assert [(c.chosen, c.rejected, c.source) for c in pairs] == [(r["revision"], r["initial"], "cai-revision") for r in expected]
    assert pairs[1].meta == {"prompt_index": 1, "principles": expected[1]["principles"]}
    assert pairs[4].prompt == prompts[4]


def test_few_shot_examples_reach_the_critic(tmp_path, constitution_file, prompts_file):
    seen_chats.clear()
    shots = write_jsonl(
        tmp_path / "shots.jsonl", [{"prompt": "S", "response": "A", "critique": "C", "revision": "R", "principle": "gamma"}]
    )
    config = fast(
        tmp_path,
        "cai",
        prompts=str(prompts_file),
        constitution=str(constitution_file),
        critic_backend=f"{__name__}:recording_critic",
        answerer="critic",
        few_shot=str(shots),
        max_prompts=1,
        preferences=False,
    )
    result = critique_revise(config)
    record = read_jsonl(result.revisions)[0]
    example = load_few_shot(shots, load_constitution(constitution_file))
    principle = load_constitution(constitution_file)[record["principles"][0]]
    assert seen_chats == [
        [{"role": "user", "content": "Question 0?"}],
        critique_messages("Question 0?", record["initial"], principle, example),
        revision_messages("Question 0?", record["initial"], principle, record["critiques"][0], example),
    ]
    assert seen_chats[1][:6] == few_shot_turns(example) and result.preferences is None
    assert not (tmp_path / "cai" / "preferences.jsonl").exists()


def test_the_tiny_model_critiques_and_revises_itself_and_the_sft_data_trains(tmp_path, prompts_file, make_config):
    result = critique_revise(
        fast(tmp_path, "cai", prompts=str(prompts_file), max_prompts=3, rounds=2, temperature=1.0, critic_temperature=1.0)
    )
    records = read_jsonl(result.revisions)
    assert [r["prompt_index"] for r in records] == [0, 1, 2]
    for r in records:
        assert len(r["rounds"]) == len(r["principles"]) == len(r["critiques"]) == 2
        assert r["principles"] == [p.id for p in draw_principles(load_constitution(), 0, r["prompt_index"], 2)]
        chain = [r["initial"]] + [s["revision"] for s in r["rounds"]]
        assert r["revision"] == next(text for text in reversed(chain) if text)
    fit = train_sft(make_config("sl-cai", data=str(result.sft), max_steps=2, batch_size=2))
    assert fit.state.step == 2
    if result.preferences is not None and result.preference_pairs:
        assert len(load_comparisons(result.preferences)) == result.preference_pairs


def test_resume_after_an_interruption_gives_the_uninterrupted_output(tmp_path, constitution_file, prompts_file):
    global calls, fail_after
    fields = dict(
        prompts=str(prompts_file),
        constitution=str(constitution_file),
        critic_backend=f"{__name__}:flaky_critic",
        rounds=2,
        chunk_size=2,
        temperature=1.0,  # the tiny model answers by sampling: each chunk's seed must be its own
    )
    calls, fail_after = 0, None
    whole = critique_revise(fast(tmp_path, "whole", **fields))
    # Each chunk of 2 prompts makes 2 rounds x (2 critiques + 2 revisions) = 8 calls: fail in the third chunk.
    calls, fail_after = 0, 17
    with pytest.raises(RuntimeError, match="simulated interruption"):
        critique_revise(fast(tmp_path, "cut", **fields))
    cut = tmp_path / "cut" / "revisions.jsonl"
    lines = cut.read_bytes().split(b"\n")
    assert len(lines) == 5  # two chunks, then the empty string after the last newline
    # A kill inside the second chunk's write: its second record lost, the first whole, a torn line after it.
    cut.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:25])
    calls, fail_after = 0, None
    resumed = critique_revise(fast(tmp_path, "cut", **fields))
    assert cut.read_bytes() == whole.revisions.read_bytes()
    assert resumed.sft.read_bytes() == whole.sft.read_bytes()
    assert resumed.preferences.read_bytes() == whole.preferences.read_bytes()
    assert calls == 8 + 4  # the chunk [2, 3] again, whole, and the last chunk, [4]

    calls = 0  # nothing left to do: nothing is generated, the outputs are written again the same
    critique_revise(fast(tmp_path, "cut", **fields))
    assert calls == 0 and cut.read_bytes() == whole.revisions.read_bytes()


def test_resume_refuses_records_made_under_other_settings(tmp_path, constitution_file, prompts_file):
    fields = dict(
        prompts=str(prompts_file),
        constitution=str(constitution_file),
        critic_backend=f"{__name__}:scripted_critic",
        answerer="critic",
        max_prompts=2,
    )
    critique_revise(fast(tmp_path, "cai", **fields))
    with pytest.raises(ConfigError, match=r"cannot resume .*seed: 0 -> 1"):
        critique_revise(fast(tmp_path, "cai", **(fields | {"seed": 1, "max_prompts": 3})))
    other = tmp_path / "other.yaml"
    other.write_text(TEST_CONSTITUTION.replace("Revise under beta.", "Revise under beta, please."))
    with pytest.raises(ConfigError, match=r"constitution: 'sha256:"):
        critique_revise(fast(tmp_path, "cai", **(fields | {"constitution": str(other)})))
    # The prompts file changed under the records: named too.
    write_jsonl(prompts_file, [{"prompt": "Another question?"}, {"prompt": "Question 1?"}])
    with pytest.raises(ConfigError, match=r"prompt: 1 of 2 records differ .*prompt_index 0 holds 'Question 0\?'"):
        critique_revise(fast(tmp_path, "cai", **fields))
    result = critique_revise(fast(tmp_path, "cai", **fields, resume="never"))
    assert [r["prompt"] for r in read_jsonl(result.revisions)] == ["Another question?", "Question 1?"]


def test_bad_settings_fail_before_any_model_loads(tmp_path, constitution_file):
    with pytest.raises(ConfigError, match="rounds must be at least 1"):
        critique_revise(fast(tmp_path, "cai", rounds=0))
    with pytest.raises(DataError, match="nope.yaml: file not found"):
        critique_revise(fast(tmp_path, "cai", constitution=str(tmp_path / "nope.yaml")))
    with pytest.raises(ConfigError, match="critic_backend: .*cannot import"):
        critique_revise(
            fast(tmp_path, "cai", constitution=str(constitution_file), critic_backend="no_such_module:fn", max_prompts=1)
        )


def test_the_cli_runs_end_to_end_on_the_tiny_model(tmp_path, constitution_file, prompts_file, capsys):
    out = tmp_path / "run"
    args = [
        f"prompts={prompts_file}",
        f"output_dir={out}",
        "max_new_tokens=6",
        "critique_max_tokens=6",
        "precision=fp32",
        "progress=false",
    ]
    assert cli.main(["cai", "model=tiny", f"constitution={constitution_file}", "max_prompts=2", *args]) == 0
    records = read_jsonl(out / "revisions.jsonl")
    assert len(records) == 2
    assert all({"prompt", "initial", "critiques", "revision", "principles"} <= set(r) for r in records)
    assert all(set(r["principles"]) <= {"alpha", "beta", "gamma"} for r in records)
    assert len(load_sft_file(out / "sft.jsonl")) == sum(r["revised"] for r in records)
    # The run's own config.yaml runs it again (stage: cai): everything is there already.
    capsys.readouterr()
    assert cli.main(["cai", str(out / "config.yaml")]) == 0
    assert "all 2 prompts already in" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles:\n  - id: a\n    critique_request: C\n")
    assert cli.main(["cai", f"constitution={bad}", "output_dir=" + str(tmp_path / "bad-run")]) == 2
    assert f"{bad}:2: field 'principles[0].revision_request': missing" in capsys.readouterr().err
