"""ILQL: each loss term by hand, the per-token losses of a real forward against a slow per-row loop, the target
update and its schedule, the scored data formats and their errors, and a run on the tiny model whose data rewards
one token: ILQL decoding (beta > 0) must produce it far more often than the same model at beta = 0; the saved
directory loads back through ``from_pretrained`` plus the heads file and decodes the same tokens.

Expected numbers are written out as arithmetic on literals, never computed by the function under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit import ilql
from rlhfkit.config import ConfigError
from rlhfkit.data.io import DataError
from rlhfkit.data.offline import ScoredExample, collate_scored, load_scored_records, normalize_rewards, tokenize_scored
from rlhfkit.data.records import IGNORE_INDEX
from rlhfkit.generation.rollout import encode_prompts
from rlhfkit.losses import (
    awac_loss,
    awac_weights,
    bellman_targets,
    cql_loss,
    expectile_loss,
    ilql_logits,
    polyak_update_,
    q_loss,
    top_k_mask,
    v_loss,
)
from rlhfkit.modeling import models
from rlhfkit.run_layout import ILQLMetric
from tests.helpers import train_entries, write_jsonl

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)

# ----------------------------------------------------------------------------- the math by hand


def test_expectile_loss_is_asymmetric():
    # u = target - prediction: an under-estimate (u > 0) costs tau u^2, an over-estimate (1 - tau) u^2.
    out = expectile_loss(torch.tensor([2.0, -2.0, 0.0, 1.0]), 0.7)
    torch.testing.assert_close(out, torch.tensor([0.7 * 4, 0.3 * 4, 0.0, 0.7 * 1]))
    # tau = 0.5 is half the squared error, symmetric
    torch.testing.assert_close(expectile_loss(torch.tensor([3.0, -3.0]), 0.5), torch.tensor([4.5, 4.5]))
    with pytest.raises(ValueError):
        expectile_loss(torch.tensor([1.0]), 1.0)


def test_bellman_targets_stop_at_the_terminal_token():
    rewards = torch.tensor([0.0, 0.0, 1.0])
    next_values = torch.tensor([0.5, 0.25, 9.0], requires_grad=True)  # 9.0: whatever sits after the last token
    terminal = torch.tensor([False, False, True])
    out = bellman_targets(rewards, next_values, terminal, 0.9)
    torch.testing.assert_close(out, torch.tensor([0.9 * 0.5, 0.9 * 0.25, 1.0]))
    assert not out.requires_grad  # the target is held fixed


def test_q_loss_sums_the_heads():
    q_taken = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([0.5, 0.0, 1.0])
    expected = torch.tensor([0.5**2 + 0.5**2, 0.0, 1.0**2 + 2.0**2])
    torch.testing.assert_close(q_loss(q_taken, targets), expected)


def test_v_loss_regresses_to_the_target_minimum():
    target_q_taken = torch.tensor([[1.0, -1.0], [2.0, -3.0]])  # minimum over heads: [1, -3]
    values = torch.tensor([0.0, 0.0], requires_grad=True)
    out = v_loss(target_q_taken, values, 0.7)
    torch.testing.assert_close(out, torch.tensor([0.7 * 1.0, 0.3 * 9.0]))
    out.sum().backward()
    # d/dV of tau (t - V)^2 at V = 0: -2 tau t; of (1 - tau)(t - V)^2: -2 (1 - tau) t
    torch.testing.assert_close(values.grad, torch.tensor([-2 * 0.7 * 1.0, -2 * 0.3 * -3.0]))


def test_cql_loss_is_the_cross_entropy_of_q_values_summed_over_heads():
    q_logits = torch.tensor([[[0.0, LN3]], [[LN3, 0.0]]])  # (H=2, K=1, V=2)
    actions = torch.tensor([0])
    # head 0: log(e^0 + e^ln3) - 0 = ln 4; head 1: log(3 + 1) - ln 3
    torch.testing.assert_close(cql_loss(q_logits, actions), torch.tensor([LN4 + (LN4 - LN3)]))


def test_awac_loss_and_weights():
    target_q_taken = torch.tensor([[1.0], [3.0]])
    values = torch.tensor([0.5])
    torch.testing.assert_close(awac_weights(target_q_taken, values, 2.0), torch.tensor([math.exp(2.0 * (1.0 - 0.5))]))
    torch.testing.assert_close(awac_weights(target_q_taken, values, 0.0), torch.tensor([1.0]))
    lm_logits = torch.tensor([[0.0, 0.0]])
    torch.testing.assert_close(awac_loss(lm_logits, torch.tensor([1]), torch.tensor([math.e])), torch.tensor([LN2 * math.e]))


def test_ilql_logits_perturb_the_log_probs_by_the_advantage():
    lm_logits = torch.tensor([[0.0, LN3]])  # probabilities 1/4, 3/4
    q = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([0.5])
    out = ilql_logits(lm_logits, q, v, 2.0)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.25) + 2.0 * 0.5, math.log(0.75) + 2.0 * -0.5]]))
    torch.testing.assert_close(ilql_logits(lm_logits, q, v, 0.0), torch.tensor([[math.log(0.25), math.log(0.75)]]))


def test_top_k_mask():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    inf = float("-inf")
    torch.testing.assert_close(top_k_mask(logits, 2), torch.tensor([[inf, 3.0, 2.0]]))
    torch.testing.assert_close(top_k_mask(logits, 0), logits)
    torch.testing.assert_close(top_k_mask(logits, 5), logits)


def test_polyak_update():
    target, online = torch.tensor([0.0, 10.0]), torch.tensor([1.0, 20.0])
    polyak_update_([target], [online], 0.1)
    torch.testing.assert_close(target, torch.tensor([0.9 * 0.0 + 0.1 * 1.0, 0.9 * 10.0 + 0.1 * 20.0]))
    polyak_update_([target], [online], 1.0)
    assert torch.equal(target, online)
    same = torch.tensor([0.3, 1e-7, 123.456])
    kept = same.clone()
    polyak_update_([kept], [same.clone()], 0.001)
    assert torch.equal(kept, same)  # a target equal to its online tensor stays bit for bit
    with pytest.raises(ValueError):
        polyak_update_([target], [online], 1.5)


# ----------------------------------------------------------------------------- a real forward against a slow loop


def tiny_ilql_model(seed: int = 0) -> ilql.ILQLModel:
    lm = models.build_tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ilql.ILQLHeads(lm.config.hidden_size, lm.config.vocab_size, two_qs=True)
    # different target heads, so "min over target heads" and "target vs trained" both matter
    with torch.no_grad():
        for p in heads.target_q_heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ilql.ILQLModel(lm, heads)


def slow_losses(model: ilql.ILQLModel, examples: list[dict], config: ilql.ILQLConfig) -> float:
    """The summed ILQL loss of ``examples``, one unpadded row at a time, one token at a time, in Python floats."""
    decoder, head = model.lm.get_decoder(), model.lm.get_output_embeddings()
    total = 0.0
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        with torch.no_grad():
            states = decoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
        steps = [t for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
        values = [float(model.heads.v_head(states[t])) for t in steps]
        for j, t in enumerate(steps):
            a = labels[t + 1]
            last = j == len(steps) - 1
            reward = example["reward"] if last else 0.0
            target = reward + (0.0 if last else config.gamma * values[j + 1])
            qs = [h(states[t]) for h in model.heads.q_heads]
            target_min = min(float(h(states[t])[a]) for h in model.heads.target_q_heads)
            loss_q = sum((float(q[a]) - target) ** 2 for q in qs)
            u = target_min - values[j]
            loss_v = (config.tau if u >= 0 else 1 - config.tau) * u * u
            loss_cql = sum(float(torch.logsumexp(q, 0)) - float(q[a]) for q in qs)
            logits = head(states[t])
            weight = math.exp(config.awac_beta * (target_min - values[j]))
            loss_awac = (float(torch.logsumexp(logits, 0)) - float(logits[a])) * weight
            total += loss_q + loss_v + config.cql_scale * loss_cql + config.awac_scale * loss_awac
    return total


def test_token_losses_match_a_slow_per_token_loop(tokenizer):
    model = tiny_ilql_model()
    config = ilql.ILQLConfig(gamma=0.9, tau=0.7, cql_scale=0.3, awac_scale=0.5, awac_beta=0.7)
    scored = [
        ScoredExample("Say something:", " a fairly long answer of many tokens here", 1.5),
        ScoredExample("Hi", " no", -0.5),
        ScoredExample("What now?", " three tokens", 0.25),
    ]
    examples = tokenize_scored(tokenizer, scored, max_length=64, chat_template=False)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of different lengths: padding matters
    batch = collate_scored(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        tokens = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        fast = float(ilql.token_losses(tokens, batch["rewards"], config).total.sum())
    with torch.no_grad():
        slow = slow_losses(model, examples, config)
    assert fast == pytest.approx(slow, rel=1e-4)
    assert int(tokens.terminal.sum()) == len(examples)
    assert ilql.ILQLTask(config).num_items(batch) == tokens.actions.shape[0]


def test_target_heads_update_on_schedule():
    """grad_accum 2, every 2 steps: the first sync is before the forward of step 2's first micro-batch."""
    model = tiny_ilql_model()
    task = ilql.ILQLTask(ilql.ILQLConfig(grad_accum=2, target_sync_every=2, alpha=0.5))
    synced = []
    model.heads.sync_targets = lambda alpha: synced.append((int(model.heads.train_forwards), alpha))
    model.train()
    for _ in range(9):  # micro-batches 0..8: steps 0..4
        task.before_forward(model)
    assert synced == [(4, 0.5), (8, 0.5)]  # step 2 and step 4, first micro-batch each
    model.eval()
    task.before_forward(model)  # evaluation neither syncs nor counts
    assert int(model.heads.train_forwards) == 9


def test_sync_targets_moves_only_the_targets():
    heads = ilql.ILQLHeads(4, 6)
    with torch.no_grad():
        for p in heads.q_heads.parameters():
            p.add_(1.0)
    before = [p.clone() for p in heads.target_q_heads.parameters()]
    online = [p.clone() for p in heads.q_heads.parameters()]
    heads.sync_targets(0.25)
    for t, b, o in zip(heads.target_q_heads.parameters(), before, online):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * o)
    for p, o in zip(heads.q_heads.parameters(), online):
        assert torch.equal(p, o)
    assert not any(p.requires_grad for p in heads.target_q_heads.parameters())


# ----------------------------------------------------------------------------- data


def test_scored_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "scored.jsonl",
        [
            {"prompt": "a?", "response": "yes", "reward": 1},
            {"prompt": "b?", "responses": ["x", "y"], "scores": [0.5, -2.0]},
            {"prompt": "c?", "chosen": "good", "rejected": "bad"},
            {"prompt": "d?", "response_a": "p", "response_b": "q", "preferred": "tie"},
            {"prompt": "e?", "responses": ["worse", "better"], "ranking": [1, 0], "tie": False, "meta": {}},
        ],
    )
    records = load_scored_records(path, chosen_reward=2.0, rejected_reward=-3.0)
    flat = [(e.prompt, e.response, e.reward) for r in records for e in r]
    assert flat == [
        ("a?", "yes", 1.0),
        ("b?", "x", 0.5),
        ("b?", "y", -2.0),
        ("c?", "good", 2.0),
        ("c?", "bad", -3.0),
        ("e?", "better", 2.0),
        ("e?", "worse", -3.0),
    ]


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"prompt": "a", "response": "r"}, "reward", "missing"),
        ({"prompt": "a", "response": "r", "reward": "high"}, "reward", "expected a number"),
        ({"prompt": "a", "response": "r", "reward": True}, "reward", "expected a number"),
        ({"prompt": "a", "response": "r", "reward": float("nan")}, "reward", "finite"),
        ({"prompt": "a", "reward": 1}, "response", "missing"),
        ({"response": "r", "reward": 1}, "prompt", "missing"),
        ({"prompt": "a", "responses": ["x", "y"], "scores": [1]}, "scores", "2 numbers"),
        ({"prompt": "a", "responses": ["x"], "rewards": ["1"]}, "rewards[0]", "expected a number"),
        ({"prompt": "a", "text": "?"}, None, "unrecognised"),
    ],
)
def test_scored_errors_name_file_line_and_field(tmp_path, record, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "fine", "reward": 0}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as err:
        load_scored_records(path)
    assert err.value.path == str(path) and err.value.line == 2 and err.value.field == field
    assert problem in err.value.problem


def test_normalize_rewards_uses_the_training_split():
    train, held = [{"reward": 0.0}, {"reward": 2.0}], [{"reward": 4.0}]
    assert normalize_rewards(train, held) == (1.0, 1.0)
    assert [e["reward"] for e in train + held] == [-1.0, 1.0, 3.0]


def test_config_refusals(tmp_path):
    with pytest.raises(ConfigError, match="data"):
        ilql.train(ilql.ILQLConfig(output_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="packing"):
        ilql.train(ilql.ILQLConfig(data="d.jsonl", packing=True, output_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="tau"):
        ilql.train(ilql.ILQLConfig(data="d.jsonl", tau=1.0, output_dir=str(tmp_path / "x")))


# ----------------------------------------------------------------------------- learning on the tiny model

WORDS = (" apple", " river", " stone", " cloud")
"""One-token responses; the data rewards the first (1) and not the others (0), each given equally often."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("ilql")
    prompts = [f"Say a word {i}:" for i in range(8)]
    records = [{"prompt": p, "response": w, "reward": 1.0 if w == WORDS[0] else 0.0} for p in prompts for w in WORDS]
    data = write_jsonl(tmp / "scored.jsonl", records)
    config = ilql.ILQLConfig(
        model=models.TINY,
        data=str(data),
        output_dir=str(tmp / "run"),
        eval_fraction=0.0,
        max_length=32,
        chat_template=False,
        precision="fp32",
        progress=False,
        tensorboard=False,
        lr=1e-3,  # the tiny random model needs a far larger step than ILQL's usual 5e-5
        lr_schedule="constant",
        warmup_ratio=0.0,
        batch_size=8,
        max_steps=40,
        alpha=0.2,  # TRLX's 0.001 would leave the target heads at their random start in 40 steps
        target_sync_every=1,
    )
    result = ilql.train(config)
    return config, result, prompts


def rewarded_rate(lm, heads, tokenizer, prompts, beta: float, seed: int = 0) -> tuple[float, torch.Tensor]:
    """Fraction of sampled responses whose first token is the rewarded word's, 8 samples per prompt."""
    rewarded = tokenizer(WORDS[0], add_special_tokens=False)["input_ids"]
    assert len(rewarded) == 1
    ids, mask = encode_prompts(tokenizer, prompts * 8, chat_template=False)
    response = ilql.ilql_generate_ids(
        lm,
        heads,
        ids,
        mask,
        ilql.ILQLDecodeOptions(beta=beta, top_k=0, max_new_tokens=2),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(seed),
    )
    return float((response[:, 0] == rewarded[0]).float().mean()), response


def test_ilql_decoding_prefers_the_rewarded_response(trained, tokenizer):
    config, result, prompts = trained
    lm, heads = result.model.lm, result.model.heads
    lm.eval()
    base_rate, _ = rewarded_rate(lm, heads, tokenizer, prompts, beta=0.0)
    ilql_rate, _ = rewarded_rate(lm, heads, tokenizer, prompts, beta=4.0)
    # The data gives the rewarded word a quarter of the time; behaviour cloning can at best match that.
    assert ilql_rate >= 0.8, (base_rate, ilql_rate)
    assert ilql_rate >= base_rate + 0.4, (base_rate, ilql_rate)
    entries = train_entries(config.output_dir)
    assert entries and all(k in entries[-1] for k in (ILQLMetric.LOSS_Q, ILQLMetric.LOSS_V, ILQLMetric.LOSS_CQL))
    # the Q loss fell: the heads learned the Bellman targets
    assert entries[-1][ILQLMetric.LOSS_Q] < entries[0][ILQLMetric.LOSS_Q]


def test_saved_model_loads_with_from_pretrained_and_heads(trained, tokenizer):
    from transformers import AutoModelForCausalLM

    config, result, prompts = trained
    out = Path(config.output_dir)
    assert models.is_complete_save(out) and (out / ilql.HEADS_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)
    trained_state = result.model.lm.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, trained_state[name]), name
    lm, heads = ilql.load_ilql(out)
    for name, tensor in result.model.heads.state_dict().items():
        assert torch.equal(heads.state_dict()[name], tensor), name
    result.model.lm.eval()
    _, expected = rewarded_rate(result.model.lm, result.model.heads, tokenizer, prompts, beta=4.0, seed=3)
    _, loaded = rewarded_rate(lm, heads, tokenizer, prompts, beta=4.0, seed=3)
    assert torch.equal(loaded, expected)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, tokenizer):
    """Killed after step 2 (a checkpoint) and resumed to step 4: the same LM, heads and target heads as 4 steps in
    one go; the target schedule (grad_accum 2, every step, alpha 0.5) resumes where it was."""
    records = [{"prompt": f"Q{i}:", "response": w, "reward": float(i % 3)} for i in range(4) for w in WORDS]
    data = write_jsonl(tmp_path / "scored.jsonl", records)

    def config(name: str, steps: int) -> ilql.ILQLConfig:
        return ilql.ILQLConfig(
            model=models.TINY,
            data=str(data),
            output_dir=str(tmp_path / name),
            eval_fraction=0.0,
            max_length=32,
            chat_template=False,
            precision="fp32",
            progress=False,
            tensorboard=False,
            lr=1e-3,
            lr_schedule="constant",  # the first part's schedule must not depend on its shorter max_steps
            warmup_ratio=0.0,
            batch_size=4,
            grad_accum=2,
            max_steps=steps,
            save_every=2,
            alpha=0.5,
            target_sync_every=1,
        )

    whole = ilql.train(config("whole", 4)).model
    ilql.train(config("parts", 2))
    resumed = ilql.train(config("parts", 4)).model
    assert int(resumed.heads.train_forwards) == int(whole.heads.train_forwards) == 8
    expected = whole.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert (tensor - expected[name]).abs().max().item() <= 1e-6, name
    # and the target heads did move (the schedule ran), away from where they started
    start = tiny_ilql_model().heads  # same seed (0) as the runs' heads
    moved = max(
        (a - b).abs().max().item() for a, b in zip(resumed.heads.target_q_heads.parameters(), start.target_q_heads.parameters())
    )
    assert moved > 1e-4


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """DDP over two CPU processes with batch 4 each trains as one process with batch 8: the same losses, the same
    LM, heads and target heads (the target updates run on both processes alike)."""
    import yaml

    from rlhfkit.config import to_dict
    from tests.helpers import launch_two_cpu_processes

    records = [{"prompt": f"Q{i}:", "response": w, "reward": float(i % 3)} for i in range(4) for w in WORDS]
    data = write_jsonl(tmp_path / "scored.jsonl", records)

    def config(name: str, batch_size: int) -> ilql.ILQLConfig:
        return ilql.ILQLConfig(
            model=models.TINY,
            data=str(data),
            output_dir=str(tmp_path / name),
            eval_fraction=0.0,
            max_length=32,
            chat_template=False,
            precision="fp32",
            progress=False,
            tensorboard=False,
            lr=1e-3,
            batch_size=batch_size,
            max_steps=3,
            alpha=0.5,
            target_sync_every=1,
            seed=3,
        )

    two = config("two", 4)
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(two)), encoding="utf-8")
    script = tmp_path / "run_ilql.py"
    script.write_text(
        "import sys\nfrom rlhfkit import ilql\nfrom rlhfkit.config import load_config\n"
        "ilql.train(load_config(ilql.ILQLConfig, sys.argv[1], []))\n"
    )
    proc = launch_two_cpu_processes([str(script), str(config_file)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = config("one", 8)
    ilql.train(one)
    two_log, one_log = train_entries(two.output_dir), train_entries(one.output_dir)
    assert [r["step"] for r in two_log] == [1, 2, 3]
    for key in ("loss", ILQLMetric.LOSS_Q, ILQLMetric.LOSS_V, ILQLMetric.TARGET_Q):
        assert [r[key] for r in two_log] == pytest.approx([r[key] for r in one_log], rel=1e-4, abs=1e-6), key
    lm_two, heads_two = ilql.load_ilql(two.output_dir)
    lm_one, heads_one = ilql.load_ilql(one.output_dir)
    for a, b in ((lm_two, lm_one), (heads_two, heads_one)):
        state = b.state_dict()
        worst = max((t - state[k]).abs().max().item() for k, t in a.state_dict().items() if t.is_floating_point())
        assert worst <= 1e-5


def test_text_generator_from_the_saved_directory(trained):
    config, _, prompts = trained
    generator = ilql.ILQLGenerator.from_dir(config.output_dir, chat_template=False)
    options = ilql.ILQLDecodeOptions(beta=4.0, top_k=5, max_new_tokens=2)
    texts = generator.generate(prompts, options, seed=0)
    assert len(texts) == len(prompts)
    assert sum(text.strip() == WORDS[0].strip() for text in texts) >= 0.75 * len(prompts), texts
    assert generator.generate(prompts, options, seed=0) == texts  # seeded
