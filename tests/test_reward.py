"""Reward model: Bradley-Terry losses by hand, pair expansion and tie targets,
an end-to-end run on the tiny model, and the saved directory (transformers
loading, last-token scoring, normalisation).

Expected numbers are written out as arithmetic on literals. Runs are fp32.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from rlhfkit.data.pairwise import (
    collate_pairs,
    collate_rankings,
    load_pair_splits,
    tokenize_pairs,
    tokenize_rankings,
    tokenize_response,
)
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.losses import bradley_terry_loss, preference_loss
from rlhfkit.modeling import models
from rlhfkit.modeling.reward_model import RewardModel, load_reward_backbone, raw_scores, reward_tokenizer
from rlhfkit.reward import RewardConfig, RewardTask, train
from rlhfkit.run_layout import EVAL_PREFIX
from rlhfkit.run_layout import PreferenceMetric as PM
from tests.helpers import read_jsonl, write_jsonl

# ----------------------------------------------------------------------------- losses by hand


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.5], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.5], dtype=torch.float64)
    # d = r_c - r_r = [1, -1]; -log sigmoid(d) = log(1 + e^{-d})
    losses = bradley_terry_loss(chosen, rejected)
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))], rel=1e-12)
    # A scalar margin 0.5: d = [0.5, -1.5]
    assert bradley_terry_loss(chosen, rejected, 0.5).tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5))], rel=1e-12
    )
    # A per-pair margin [0.5, -1]: d = [0.5, 0]
    margin = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert bradley_terry_loss(chosen, rejected, margin).tolist() == pytest.approx(
        [math.log(1 + math.exp(-0.5)), math.log(2)], rel=1e-12
    )


def test_preference_loss_by_hand():
    chosen = torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64)
    target = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    # d = [1, -1, -3]
    losses = preference_loss(chosen, rejected, target)
    assert losses.shape == (3,)
    assert losses.tolist() == pytest.approx(
        [
            math.log(1 + math.exp(-1)),  # p = 1: Bradley-Terry
            -(0.5 * math.log(1 / (1 + math.exp(1))) + 0.5 * math.log(1 / (1 + math.exp(-1)))),  # tie
            math.log(1 + math.exp(-3)),  # p = 0: -log sigmoid(-d)
        ],
        rel=1e-12,
    )
    # With margin 0.5 the strict preferences need a gap of 0.5 (d - m for p = 1, d + m for p = 0);
    # the tie gets no margin: d = [0.5, -1, -2.5]
    with_margin = preference_loss(chosen, rejected, target, margin=0.5)
    assert with_margin.tolist() == pytest.approx(
        [
            math.log(1 + math.exp(-0.5)),
            -(0.5 * math.log(1 / (1 + math.exp(1))) + 0.5 * math.log(1 / (1 + math.exp(-1)))),
            math.log(1 + math.exp(-2.5)),
        ],
        rel=1e-12,
    )
    # Target 1 is exactly Bradley-Terry.
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.equal(preference_loss(chosen, rejected, ones, margin=0.5), bradley_terry_loss(chosen, rejected, 0.5))


def test_tie_loss_is_minimal_at_no_gap_whatever_the_margin():
    # A tie must not teach a preference: with margin m > 0 the tie's loss, as a function of the gap d,
    # is still minimal (ln 2, gradient 0) at d = 0, not at d = m (the defect: margin applied to ties).
    for margin in (0.0, 0.5, 2.0):
        d = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
        loss = preference_loss(
            d,
            torch.zeros(1, dtype=torch.float64),
            torch.tensor([0.5], dtype=torch.float64),
            margin=torch.tensor([margin], dtype=torch.float64),
        )
        loss.sum().backward()
        assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
        assert d.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_tie_loss_pulls_scores_together():
    # d(loss)/dd = sigmoid(d) - p: for a tie at d = 1 that is 1/(1 + e^-1) - 0.5 > 0,
    # so the gradient pushes the chosen score down; at d = 0 the tie loss is minimal (ln 2).
    chosen = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], dtype=torch.float64)
    losses = preference_loss(chosen, rejected, torch.tensor([0.5, 0.5], dtype=torch.float64))
    losses.sum().backward()
    assert chosen.grad.tolist() == pytest.approx([1 / (1 + math.exp(-1)) - 0.5, 0.0], abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log(2), rel=1e-12)


# ----------------------------------------------------------------------------- pairs and targets


def test_rankings_expand_to_all_pairs_and_ties_get_half(tokenizer):
    ranking = Comparison("Greet me.", ["Go away.", "Hello, lovely to see you!", "Hi.", "Hello."], [1, 3, 2, 0])
    tie = Comparison("Say hi.", ["Hi!", "Hello!"], [0, 1], tie=True)
    pair = Comparison("Two plus two?", ["Four.", "Five."], [0, 1], meta={"margin": 2.0})
    pairs, stats = tokenize_pairs(tokenizer, [ranking, tie, pair], max_length=64, keep_ties=True)
    assert stats.pairs == len(pairs) == 4 * 3 // 2 + 1 + 1
    assert stats.ties_skipped == 0

    def ids(comp, index):
        return tokenize_response(tokenizer, comp.prompt, comp.responses[index])[0]

    # Every ordered pair of the ranking, better first: (1>3) (1>2) (1>0) (3>2) (3>0) (2>0).
    expected = [(1, 3), (1, 2), (1, 0), (3, 2), (3, 0), (2, 0)]
    for example, (better, worse) in zip(pairs[:6], expected):
        assert example["chosen_input_ids"] == ids(ranking, better)
        assert example["rejected_input_ids"] == ids(ranking, worse)
        assert example["target"] == 1.0
    assert pairs[6]["target"] == 0.5
    assert pairs[7]["target"] == 1.0 and pairs[7]["margin"] == 2.0
    assert [p["margin"] for p in pairs[:7]] == [0.0] * 7

    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 * len(pairs)
    assert batch["target"].tolist() == [1.0] * 6 + [0.5, 1.0]


def test_grouped_rankings_hold_every_pair_and_give_the_same_loss(tokenizer):
    ranking = Comparison("Greet me.", ["Go away.", "Hello, lovely to see you!", "Hi.", "Hello."], [1, 3, 2, 0])
    tie = Comparison("Say hi.", ["Hi!", "Hello!"], [0, 1], tie=True)
    pair = Comparison("Two plus two?", ["Four.", "Five."], [0, 1], meta={"margin": 2.0})
    groups, stats = tokenize_rankings(tokenizer, [ranking, tie, pair], max_length=64, keep_ties=True)
    assert stats.pairs == 6 + 1 + 1 and len(groups) == 3
    assert groups[0]["input_ids"] == [tokenize_response(tokenizer, "Greet me.", r)[0] for r in ranking.responses]
    assert groups[0]["pairs"] == [(1, 3, 1.0), (1, 2, 1.0), (1, 0, 1.0), (3, 2, 1.0), (3, 0, 1.0), (2, 0, 1.0)]
    assert groups[1]["pairs"] == [(0, 1, 0.5)] and groups[2]["margin"] == 2.0

    batch = collate_rankings(groups, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 + 2 + 2  # each response once, not once per pair
    assert batch["chosen_index"].tolist() == [1, 1, 1, 3, 3, 2, 4, 6]
    assert batch["rejected_index"].tolist() == [3, 2, 0, 2, 0, 0, 5, 7]
    assert batch["target"].tolist() == [1.0] * 6 + [0.5, 1.0]
    assert batch["margin"].tolist() == [0.0] * 7 + [2.0]

    # The same pairs expanded one by one give the same summed loss and accuracy, padded or packed.
    pairs, _ = tokenize_pairs(tokenizer, [ranking, tie, pair], max_length=64, keep_ties=True)
    model = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="normal").eval()
    models.set_attention(model)
    task = RewardTask(margin=0.1)
    with torch.no_grad():
        want, want_stats = task.loss(model, collate_pairs(pairs, tokenizer.pad_token_id))
        for packed in (False, True):
            got, got_stats = task.loss(model, collate_rankings(groups, tokenizer.pad_token_id, packed=packed))
            assert got.item() == pytest.approx(want.item(), rel=1e-5)
            assert got_stats[PM.ACCURACY].item() == want_stats[PM.ACCURACY].item()


def test_grouped_ranking_drops_responses_that_lose_every_token(tokenizer):
    long = "word " * 200
    ranking = Comparison("Hi.", ["Hello!", long, "Hey."], [0, 1, 2])
    _, labels = tokenize_response(tokenizer, "Hi.", "Hey.")
    prompt_len = next(i for i, label in enumerate(labels) if label != -100)  # tokens before the response
    groups, stats = tokenize_rankings(tokenizer, [ranking], max_length=prompt_len + 3, keep_ties=True)
    assert stats.dropped == 0 and stats.truncated >= 1  # cut, but each keeps response tokens
    assert [len(ids) for ids in groups[0]["input_ids"]][1] == prompt_len + 3
    groups, stats = tokenize_rankings(tokenizer, [ranking], max_length=prompt_len, keep_ties=True)
    assert groups == [] and stats.dropped == 3  # every response lost all its tokens


def test_reward_task_uses_tie_target_and_margins(tmp_path):
    rm_tokenizer = reward_tokenizer(models.TINY)
    records = [
        {"prompt": "Say hi.", "response_a": "Hi!", "response_b": "Hello there, friend!", "preferred": "tie"},
        {
            "prompt": "Two plus two?",
            "response_a": "Four.",
            "response_b": "Five, I think.",
            "preferred": "a",
            "meta": {"margin": 1.5},
        },
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    pairs, _ = load_pair_splits(
        rm_tokenizer,
        str(data),
        eval_data="",
        eval_fraction=0.0,
        seed=0,
        max_length=64,
        chat_template=True,
        keep_ties=True,
        stage="reward",
    )
    batch = collate_pairs(pairs, rm_tokenizer.pad_token_id)
    model = load_reward_backbone(models.TINY, pad_token_id=rm_tokenizer.pad_token_id, head_init="normal").eval()
    with torch.no_grad():
        loss_sum, stats = RewardTask(margin=0.25).loss(model, batch)
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = scores[:2].tolist(), scores[2:].tolist()
    d0 = chosen[0] - rejected[0]  # tie: no margin (a margin would teach a preference)
    d1 = chosen[1] - rejected[1] - (0.25 + 1.5)  # config margin + the record's meta.margin

    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))

    expected = -(0.5 * log_sigmoid(d0) + 0.5 * log_sigmoid(-d0)) - log_sigmoid(d1)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    # A tie counts as half right; the strict pair as right iff chosen scores higher.
    assert stats[PM.ACCURACY].item() == 0.5 + float(chosen[1] > rejected[1])


def test_zero_head_scores_zero_before_training():
    tokenizer = reward_tokenizer(models.TINY)
    prompts = ["Hi.", "Tell me a long story about a dragon."]
    responses = ["Hello!", "Once upon a time a dragon lived by the sea."]
    zero = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="zero")
    assert raw_scores(zero, tokenizer, prompts, responses, precision="fp32").tolist() == [0.0, 0.0]
    normal = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="normal")
    assert (raw_scores(normal, tokenizer, prompts, responses, precision="fp32") != 0).all()


def test_score_read_at_last_token_even_when_it_is_eos():
    # Without the chat template a response ends with EOS; the reward tokenizer must
    # not pad with EOS, or transformers would read such a sequence one token early.
    tokenizer = reward_tokenizer(models.TINY)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="normal").eval()
    prompts, responses = ["Hi."], ["Hello!"]
    ids, _ = tokenize_response(tokenizer, prompts[0], responses[0], chat_template=False)
    assert ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        at_last_token = model.score(hidden).item()
    batched = raw_scores(
        model,
        tokenizer,
        prompts + ["Tell me a long story about a dragon, please."],
        responses + ["Once upon a time a dragon lived by the sea."],
        chat_template=False,
        precision="fp32",
    )
    assert batched[0].item() == pytest.approx(at_last_token, abs=1e-5)


# ----------------------------------------------------------------------------- end-to-end

POLITE = [
    "Thank you for asking! The answer is {}",
    "Happy to help: {}",
    "Great question, the answer is {}",
    "Of course! It is {}",
]
RUDE = ["Ugh, {} Obviously. Go away.", "{} Stop bothering me.", "Whatever. {} Leave me alone.", "Dumb question. {}"]
TRAIN_QUESTIONS = [
    ("Capital of France?", "Paris."),
    ("Two plus two?", "Four."),
    ("Colour of the sky?", "Blue."),
    ("Opposite of hot?", "Cold."),
    ("Largest planet?", "Jupiter."),
    ("Author of Hamlet?", "Shakespeare."),
    ("Boiling point of water?", "100 degrees."),
    ("Say hello.", "Hello there!"),
    ("Capital of Italy?", "Rome."),
    ("Three times three?", "Nine."),
    ("Colour of grass?", "Green."),
    ("Opposite of up?", "Down."),
    ("Smallest planet?", "Mercury."),
    ("Author of Faust?", "Goethe."),
    ("Freezing point of water?", "Zero degrees."),
    ("Say goodbye.", "Goodbye!"),
    ("Capital of Spain?", "Madrid."),
    ("Ten minus four?", "Six."),
    ("Colour of snow?", "White."),
    ("Opposite of wet?", "Dry."),
    ("Red planet?", "Mars."),
    ("Author of Emma?", "Austen."),
]
# Held out: new questions and answers, the same kinds of polite and rude replies.
EVAL_QUESTIONS = [
    ("Fastest land animal?", "The cheetah."),
    ("Say thanks.", "Thanks!"),
    ("Capital of Japan?", "Tokyo."),
    ("Five plus one?", "Six."),
    ("Colour of coal?", "Black."),
    ("Opposite of big?", "Small."),
    ("Ringed planet?", "Saturn."),
    ("Author of Ulysses?", "Joyce."),
    ("Largest ocean?", "The Pacific."),
    ("Say yes.", "Yes!"),
]


def polite_rude_records(questions, offset: int) -> list[dict]:
    """Seed-format comparisons, polite preferred; which of a/b is polite alternates."""
    records = []
    for i, (question, answer) in enumerate(questions):
        polite, rude = POLITE[(i + offset) % 4].format(answer), RUDE[(3 * i + offset) % 4].format(answer)
        if i % 2:
            records.append({"prompt": question, "response_a": rude, "response_b": polite, "preferred": "b"})
        else:
            records.append({"prompt": question, "response_a": polite, "response_b": rude, "preferred": "a"})
    return records


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> RewardConfig:
    """A reward model trained for 25 steps on polite-over-rude comparisons (shared by the tests below)."""
    root = tmp_path_factory.mktemp("reward")
    config = RewardConfig(
        model=models.TINY,
        data=str(write_jsonl(root / "train.jsonl", polite_rude_records(TRAIN_QUESTIONS, 0))),
        eval_data=str(write_jsonl(root / "eval.jsonl", polite_rude_records(EVAL_QUESTIONS, 1))),
        output_dir=str(root / "out"),
        max_length=64,
        precision="fp32",
        progress=False,
        tensorboard=False,
        lr=1e-3,
        warmup_ratio=0.0,
        max_steps=25,
        batch_size=8,
        eval_every=10,
        head_init="zero",
    )
    train(config)
    return config


def test_reward_model_learns_and_generalises(trained):
    entries = read_jsonl(Path(trained.output_dir) / "metrics.jsonl")
    steps = [e for e in entries if "loss" in e]
    evals = [e for e in entries if EVAL_PREFIX + PM.ACCURACY in e]
    assert [e["step"] for e in steps] == list(range(1, 26))
    for entry in steps:
        assert {"step", PM.LOSS, PM.ACCURACY} <= entry.keys()
    # The zero head scores everything 0 at step 1: loss ln 2, no pair ranked right.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0][PM.ACCURACY] == 0.0
    assert steps[-1]["loss"] < 0.5 * math.log(2)
    assert [e["step"] for e in evals] == [10, 20, 25]
    for entry in evals:
        assert {"step", "eval_loss", EVAL_PREFIX + PM.ACCURACY} <= entry.keys()
    assert evals[-1][EVAL_PREFIX + PM.ACCURACY] >= 0.9, evals[-1]
    assert evals[-1]["eval_loss"] < math.log(2)


SAMPLE_PROMPTS = ["Capital of Peru?", "Please write me a long poem about the moon and the sea.", "Hi."]
SAMPLE_RESPONSES = ["Lima, happy to help!", "The moon rose over the quiet sea, silver and slow, and the waves sang.", "Go away."]


def test_saved_dir_loads_in_transformers_with_the_same_scores(trained):
    from transformers import AutoModelForSequenceClassification

    out = Path(trained.output_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_labels == 1
    reward = RewardModel(out, precision="fp32")
    batched = reward.raw(SAMPLE_PROMPTS, SAMPLE_RESPONSES)
    assert batched.shape == (3,)
    for i, (prompt, response) in enumerate(zip(SAMPLE_PROMPTS, SAMPLE_RESPONSES)):
        ids, _ = tokenize_response(reward.tokenizer, prompt, response)
        with torch.no_grad():
            alone = hf(input_ids=torch.tensor([ids])).logits
            # By hand: the score head applied to the final hidden state of the last token.
            hidden = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            by_hand = hf.score(hidden).item()
        assert alone.shape == (1, 1)
        assert batched[i].item() == pytest.approx(alone.item(), abs=1e-5)
        assert batched[i].item() == pytest.approx(by_hand, abs=1e-5)
        # Padding does not move the score: the same text scored alone.
        assert reward.raw([prompt], [response])[0].item() == pytest.approx(batched[i].item(), abs=1e-5)
    assert len(set(round(x, 4) for x in batched.tolist())) == 3  # a trained head, not a constant


def test_normalised_scores_have_mean_zero_std_one(trained):
    out = Path(trained.output_dir)
    saved = json.loads((out / "config.json").read_text())
    gain, bias = saved["rlhfkit_reward_gain"], saved["rlhfkit_reward_bias"]
    prompts, responses = [], []
    for comp in load_comparisons(trained.data):
        for response in comp.responses:
            prompts.append(comp.prompt)
            responses.append(response)
    assert len(responses) == 2 * len(TRAIN_QUESTIONS)
    reward = RewardModel(out, precision="fp32")
    scores = reward(prompts, responses)
    assert statistics.fmean(scores) == pytest.approx(0.0, abs=1e-4)
    assert statistics.stdev(scores) == pytest.approx(1.0, abs=1e-4)
    # Normalised = gain * raw + bias; raw transformers outputs are not normalised.
    raw = reward.raw(prompts, responses).tolist()
    assert scores == pytest.approx([gain * r + bias for r in raw], abs=1e-5)
    assert statistics.stdev(raw) != pytest.approx(1.0, abs=1e-2)
    # Polite replies (chosen) outscore rude ones on the training prompts.
    comps = load_comparisons(trained.data)
    chosen = reward([c.prompt for c in comps], [c.chosen for c in comps])
    rejected = reward([c.prompt for c in comps], [c.rejected for c in comps])
    assert all(c > r for c, r in zip(chosen, rejected))


def test_normalisation_samples_are_evenly_spaced_and_capped():
    from rlhfkit.data.io import evenly_spaced

    assert evenly_spaced(10, 4) == [0, 3, 6, 9]
    assert evenly_spaced(5, 2) == [0, 4]
    assert evenly_spaced(5, 1) == [0]
    assert evenly_spaced(5, 5) == evenly_spaced(5, 9) == evenly_spaced(5, -1) == evenly_spaced(5, 0) == [0, 1, 2, 3, 4]
    picked = evenly_spaced(2652, 1024)
    assert len(set(picked)) == 1024 and picked == sorted(picked) and picked[-1] == 2651


def test_score_head_runs_in_fp32_under_bf16_autocast(tokenizer):
    """Scores under a bf16 autocast are the fp32 head applied to the final hidden state, not bf16-rounded,
    in training (packed and padded batches) and in :class:`RewardModel`-style scoring (``raw_scores``)."""
    from rlhfkit.modeling.reward_model import _score_head, fp32_score_head, sequence_scores

    model = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="normal", seed=3).eval()
    models.set_attention(model)
    head = _score_head(model)
    with torch.no_grad():
        head.weight.mul_(40.0)  # scores of size ~10, where bf16's step is 1/16
    assert fp32_score_head(model) is model and len(head._forward_hooks) == 1  # idempotent
    ranking = Comparison("Pick one.", ["Yes.", "No, never.", "Maybe, let me think about it."], [0, 1, 2])
    groups, _ = tokenize_rankings(tokenizer, [ranking], max_length=64, keep_ties=True)
    inputs = []
    hook = head.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        for packed in (True, False):
            batch = collate_rankings(groups, tokenizer.pad_token_id, packed=packed)
            inputs.clear()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                scores = sequence_scores(model, batch)
            per_position = torch.nn.functional.linear(inputs[0].float(), head.weight, head.bias)[..., 0]
            if packed:
                from rlhfkit.data import packing

                want = per_position[0][packing.last_positions(batch)]
            else:  # transformers pools at each row's last non-pad token
                last = batch["attention_mask"].sum(-1) - 1
                want = per_position[torch.arange(per_position.shape[0]), last]
            assert scores.dtype == torch.float32
            assert scores.abs().min() > 2.0  # large enough that bf16 rounding would show
            torch.testing.assert_close(scores, want, rtol=1e-6, atol=1e-6)
        inputs.clear()
        got = raw_scores(model, tokenizer, ["Pick one."] * 3, ranking.responses, precision="bf16")
        assert got.dtype == torch.float32
        assert (got.to(torch.bfloat16).float() != got).any()  # not bf16 values
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- held-out accuracy

# Held-out comparisons by hand: strict pairs 3 + 6 + 1 + 1 = 11 over 3 prompts (the second
# "Greet me." comparison shares its prompt with the first), and one tie, which is not a pair.
HELDOUT_RECORDS = [
    {"prompt": "Greet me.", "responses": ["Go away.", "Hello, lovely to see you!", "Hi."], "ranking": [1, 2, 0]},
    {"prompt": "Name a fruit.", "ranked": ["An apple, crisp and sweet.", "Apple.", "A potato.", "No."]},
    {"prompt": "Two plus two?", "response_a": "Five, I think.", "response_b": "Four.", "preferred": "b"},
    {"prompt": "Say hi.", "response_a": "Hi!", "response_b": "Hello!", "preferred": "tie"},
    {"prompt": "Greet me.", "chosen": "Good morning, welcome!", "rejected": "What do you want?"},
]
HELDOUT_PAIRS, HELDOUT_TIES, HELDOUT_PROMPTS = 3 + 6 + 1 + 1, 1, 3


def heldout_config(root: Path, **fields) -> RewardConfig:
    defaults = dict(
        model=models.TINY,
        data=str(write_jsonl(root / "train.jsonl", polite_rude_records(TRAIN_QUESTIONS[:8], 0))),
        eval_data=str(write_jsonl(root / "eval.jsonl", HELDOUT_RECORDS)),
        output_dir=str(root / "out"),
        max_length=64,
        precision="fp32",
        progress=False,
        tensorboard=False,
        lr=1e-3,
        warmup_ratio=0.0,
        max_steps=2,
        batch_size=4,
        head_init="normal",
        seed=5,
    )
    return RewardConfig(**{**defaults, **fields})


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    """A reward model trained 2 steps with HELDOUT_RECORDS as eval_data; (config, printed output)."""
    import contextlib
    import io

    config = heldout_config(tmp_path_factory.mktemp("heldout"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(config)
    return config, printed.getvalue()


def test_heldout_json_counts_and_accuracy_match_a_recomputation(heldout_run):
    from rlhfkit.reward import HELDOUT_FILE

    config, printed = heldout_run
    result = json.loads((Path(config.output_dir) / HELDOUT_FILE).read_text())
    assert HELDOUT_FILE == "heldout.json"
    assert set(result) == {"accuracy", "accuracy_ci", "num_pairs", "num_prompts", "ties"}
    assert (result["num_pairs"], result["num_prompts"], result["ties"]) == (HELDOUT_PAIRS, HELDOUT_PROMPTS, HELDOUT_TIES)

    # Recompute from raw scores of the saved model, each comparison's responses scored directly.
    reward = RewardModel(config.output_dir, precision="fp32")
    correct, gaps = [], []
    for comp in load_comparisons(config.eval_data):
        scores = reward.raw([comp.prompt] * len(comp.responses), comp.responses).tolist()
        for better, worse, target in comp.pairs():
            if target == 1.0:
                gaps.append(abs(scores[better] - scores[worse]))
                correct.append(1.0 if scores[better] > scores[worse] else 0.5 if scores[better] == scores[worse] else 0.0)
    assert len(correct) == HELDOUT_PAIRS
    assert min(gaps) > 1e-4  # no pair so close that padding-level rounding could flip it
    assert result["accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert 0.0 < result["accuracy"] < 1.0, "a trivially perfect or useless model would test less"

    lo, hi = result["accuracy_ci"]
    assert 0.0 <= lo <= result["accuracy"] <= hi <= 1.0 and lo < hi
    line = (
        f"reward: held-out accuracy {result['accuracy']:.2f} [{lo:.2f}, {hi:.2f}] on {HELDOUT_PAIRS} pairs "
        f"({HELDOUT_PROMPTS} prompts)"
    )
    assert line in printed.splitlines()


def test_heldout_accuracy_is_the_same_for_rankings_pairs_and_comparisons(heldout_run):
    """The function the pipeline and evaluation call: same answer from Comparisons, grouped and ungrouped examples."""
    from rlhfkit.reward import HELDOUT_FILE, heldout_accuracy
    from rlhfkit.stats import cluster_accuracy

    config, _ = heldout_run
    written = json.loads((Path(config.output_dir) / HELDOUT_FILE).read_text())
    reward = RewardModel(config.output_dir, precision="fp32")
    comps = load_comparisons(config.eval_data)
    kwargs = dict(max_length=64, precision="fp32", seed=config.seed)
    rankings, _ = tokenize_rankings(reward.tokenizer, comps, max_length=64, keep_ties=True)
    pairs, _ = tokenize_pairs(reward.tokenizer, comps, max_length=64, keep_ties=True)
    from_comparisons = heldout_accuracy(reward.model, reward.tokenizer, comps, **kwargs)
    assert from_comparisons == written
    for batch_size in (1, 3, 64):  # batches split rankings' and pairs' sequences differently
        assert heldout_accuracy(reward.model, reward.tokenizer, rankings, batch_size=batch_size, **kwargs) == written
        assert heldout_accuracy(reward.model, reward.tokenizer, pairs, batch_size=batch_size, **kwargs) == written

    # The interval is the prompt-clustered bootstrap: the 11 pairs' clusters are 4 + 6 + 1 by prompt.
    scores = [reward.raw([c.prompt] * len(c.responses), c.responses).tolist() for c in comps]
    correct = [float(s[b] > s[w]) for c, s in zip(comps, scores) for b, w, t in c.pairs() if t == 1.0]
    clusters = [c.prompt for c in comps for _, _, t in c.pairs() if t == 1.0]
    assert sorted(clusters.count(p) for p in set(clusters)) == [1, 4, 6]
    assert written["accuracy_ci"] == pytest.approx(list(cluster_accuracy(correct, clusters, seed=config.seed).ci), abs=1e-12)
    # per_pair: the same pairs' scores and prompt numbers (the order is the function's own), nothing else changed.
    listed = heldout_accuracy(reward.model, reward.tokenizer, comps, per_pair=True, **kwargs)
    assert {k: v for k, v in listed.items() if k != "pairs"} == written
    assert sorted(listed["pairs"]["correct"]) == sorted(correct)
    assert sorted(listed["pairs"]["prompt"].count(i) for i in range(3)) == [1, 4, 6]
    # Another seed, another bootstrap; same accuracy.
    other = heldout_accuracy(reward.model, reward.tokenizer, comps, max_length=64, precision="fp32", seed=config.seed + 1)
    assert other["accuracy"] == written["accuracy"]


def test_heldout_accuracy_ties_and_equal_scores(tokenizer):
    from rlhfkit.reward import heldout_accuracy

    rm_tokenizer = reward_tokenizer(models.TINY)
    zero = load_reward_backbone(models.TINY, pad_token_id=rm_tokenizer.pad_token_id, head_init="zero")
    comps = [
        Comparison("Greet me.", ["Hello!", "Go away.", "Hi."], [0, 2, 1]),
        Comparison("Say hi.", ["Hi!", "Hello!"], [0, 1], tie=True),
    ]
    # A zero head scores everything 0: every strict pair is an exact tie of scores, worth 0.5.
    result = heldout_accuracy(zero, rm_tokenizer, comps, precision="fp32")
    assert result == {"accuracy": 0.5, "accuracy_ci": [0.5, 0.5], "num_pairs": 3, "num_prompts": 1, "ties": 1}
    listed = heldout_accuracy(zero, rm_tokenizer, comps, precision="fp32", per_pair=True)
    assert listed["pairs"] == {"correct": [0.5, 0.5, 0.5], "prompt": [0, 0, 0]}  # the tie label is no pair
    only_ties = heldout_accuracy(zero, rm_tokenizer, comps[1:], precision="fp32")
    assert only_ties == {"accuracy": None, "accuracy_ci": None, "num_pairs": 0, "num_prompts": 0, "ties": 1}
    # A ranking's tied pair is a tie too: "Hello!" and "Hi." judged equal leave two strict pairs of three.
    tied = Comparison("Greet me.", ["Hello!", "Go away.", "Hi."], [0, 2, 1], ties=[(0, 2)])
    result = heldout_accuracy(zero, rm_tokenizer, [tied], precision="fp32")
    assert (result["num_pairs"], result["ties"]) == (2, 1)


@pytest.mark.parametrize("held_out", ["none", "only ties"])
def test_no_heldout_accuracy_writes_no_heldout_file(tmp_path, capsys, held_out):
    from rlhfkit.reward import HELDOUT_FILE

    if held_out == "none":  # eval_fraction 0 and no eval_data: nothing held out, nothing said
        config = heldout_config(tmp_path, eval_data="", eval_fraction=0.0, max_steps=1, normalize=False)
    else:  # held out, but no strict pair to score
        config = heldout_config(
            tmp_path, max_steps=1, normalize=False, eval_data=str(write_jsonl(tmp_path / "ties.jsonl", HELDOUT_RECORDS[3:4]))
        )
    train(config)
    printed = capsys.readouterr().out
    assert (Path(config.output_dir) / "config.json").is_file()
    assert not (Path(config.output_dir) / HELDOUT_FILE).exists()
    assert "held-out accuracy " not in printed
    assert ("reward: no held-out accuracy" in printed) == (held_out == "only ties")


def test_a_reward_model_scores_on_the_device_load_reward_names(trained, monkeypatch):
    """RL hands its process's device to the reward model (a GPU run scores there, not on the CPU); without a GPU
    the weights stay fp32 under autocast, whatever the precision."""
    from rlhfkit.rewards import load_reward

    reward = load_reward(trained.output_dir, precision="bf16", device=torch.device("cpu"))
    params = list(reward.model.parameters())
    assert {p.device.type for p in params} == {"cpu"} and {p.dtype for p in params} == {torch.float32}
    assert reward.raw(SAMPLE_PROMPTS, SAMPLE_RESPONSES).shape == (3,)
    # The device goes to the model as given: "meta" has no data, so it proves where the weights went.
    on_meta = load_reward(trained.output_dir, precision="fp32", device="meta")
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}


def test_a_truncated_reward_model_keeps_the_first_blocks_and_saves_loadable(tmp_path):
    """`num_layers=1` of a 2-block checkpoint: block 0's weights are the checkpoint's, block 1 is gone, and the saved
    directory loads with `from_pretrained` as a 1-block model that scores as the trained one did."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhfkit.config import ConfigError

    source = tmp_path / "lm"
    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_config(models.tiny_config(), dtype=torch.float32)
    lm.save_pretrained(source)
    reward_tokenizer(models.TINY).save_pretrained(source)
    cut = load_reward_backbone(str(source), pad_token_id=2, num_layers=1)
    assert cut.config.num_hidden_layers == 1 and len(cut.model.layers) == 1
    for name, param in lm.model.layers[0].state_dict().items():
        assert torch.equal(cut.model.layers[0].state_dict()[name], param), name
    assert torch.equal(cut.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert torch.equal(cut.model.norm.weight, lm.model.norm.weight)
    with pytest.raises(ConfigError, match="between 1 and the model's 2 layers"):
        load_reward_backbone(str(source), pad_token_id=2, num_layers=3)

    records = polite_rude_records(TRAIN_QUESTIONS, 0)
    config = RewardConfig(
        model=str(source),
        data=str(write_jsonl(tmp_path / "train.jsonl", records)),
        output_dir=str(tmp_path / "out"),
        num_layers=1,
        max_length=64,
        precision="fp32",
        progress=False,
        tensorboard=False,
        lr=1e-3,
        max_steps=3,
        batch_size=4,
        eval_fraction=0.0,
    )
    trained_model = train(config).model
    out = Path(config.output_dir)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert len(hf.model.layers) == 1
    for name, param in trained_model.state_dict().items():
        assert torch.equal(hf.state_dict()[name], param.detach().float().cpu()), name
    assert not torch.equal(hf.model.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight)


def test_packed_scoring_equals_each_sequence_alone_and_runs_a_shared_prompt_once(monkeypatch):
    """On rlhfkit's kernel, raw_scores packs each batch: a run of rows with one prompt is one group (its prompt
    runs once); the scores are those of each sequence scored alone, row for row, as with a padded batch."""
    from rlhfkit.data import packing

    tokenizer = reward_tokenizer(models.TINY)
    model = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="normal").eval()
    prompts = ["Hi.", "Hi.", "Tell me about dragons.", "Hi.", "Tell me about dragons.", "Tell me about dragons."]
    responses = ["Hello!", "Hey there, how are you?", "They fly.", "Good day.", "Dragons breathe fire and hoard gold.", "No."]

    def score(**kw):
        return raw_scores(model, tokenizer, prompts, responses, precision="fp32", **kw)

    alone = torch.cat([raw_scores(model, tokenizer, [p], [r], precision="fp32") for p, r in zip(prompts, responses)])
    assert len(set(alone.tolist())) == 6  # all different: a row out of order would show
    padded = score(batch_size=4)
    models.set_attention(model)
    groups = []
    pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda g, *a: groups.append([len(x) for x in g]) or pack(g, *a))
    packed = score(batch_size=4)
    assert groups == [[2, 1, 1], [2]]  # batch 1: rows 0-1 share "Hi."; batch 2: rows 4-5 share the dragon prompt
    assert torch.allclose(packed, alone, atol=1e-5) and torch.allclose(padded, alone, atol=1e-5)
    assert groups == [[2, 1, 1], [2]] and torch.allclose(score(batch_size=4, packed=False), alone, atol=1e-5)  # not packed


def test_sharded_run_scores_its_held_out_pairs_with_the_saved_model_on_the_kernel_it_trained_with(
    heldout_run, monkeypatch, tmp_path
):
    """Under FSDP or DeepSpeed the in-memory model is sharded, so the held-out accuracy is measured on the saved
    model, reloaded (`reward.reload_trained`) with the attention kernel training used. Simulated here on one CPU
    process (accelerate's state says FSDP; no FSDP runs): the reload reproduces the accuracy measured in memory."""
    import dataclasses
    import shutil

    import accelerate
    from accelerate.utils import DistributedType

    import rlhfkit.reward as reward_module
    from rlhfkit.modeling import attention
    from rlhfkit.reward import HELDOUT_FILE

    trained, _ = heldout_run
    out = tmp_path / "out"  # a copy: the module's other tests read the run's own heldout.json
    shutil.copytree(trained.output_dir, out)
    config = dataclasses.replace(trained, output_dir=str(out))
    written = json.loads((out / HELDOUT_FILE).read_text())

    class ShardedState:
        is_main_process = True
        distributed_type = DistributedType.FSDP
        device = torch.device("cpu")

        def wait_for_everyone(self):
            pass

    kernels = []
    measure = reward_module.heldout_accuracy

    def spy(model, *args, **kwargs):
        kernels.append(model.config._attn_implementation)
        return measure(model, *args, **kwargs)

    monkeypatch.setattr(accelerate, "PartialState", ShardedState)
    monkeypatch.setattr(reward_module, "heldout_accuracy", spy)
    tokenizer = reward_module.reward_tokenizer(config.model)
    _, eval_set = reward_module.load_splits(config, tokenizer)  # as `train` splits it
    (out / HELDOUT_FILE).unlink()
    reward_module._write_heldout(config, None, tokenizer, eval_set)  # None: the in-memory model must not be used
    assert kernels == [attention.ATTENTION]  # config.attn_implementation "auto": rlhfkit's kernel, as in training
    assert json.loads((out / HELDOUT_FILE).read_text()) == written
