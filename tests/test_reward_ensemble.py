"""Reward-model ensembles (Coste et al. 2024): K score heads on one shared backbone.

Aggregation (mean, wco, uwo) and the K-head Bradley-Terry loss by hand; bootstrap resamples make the heads differ;
the saved directory loads with ``from_pretrained`` and scores as trained, a single-head directory as before; RL and
best-of-n use the aggregate and report the disagreement. Runs are fp32 on the tiny model.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from rlhfkit import cli, evaluate, rl
from rlhfkit.config import ConfigError
from rlhfkit.data.pairwise import chosen_rejected, collate_rankings, tokenize_rankings
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.losses import aggregate_rewards, ensemble_preference_loss, ensemble_std, preference_loss
from rlhfkit.modeling import models
from rlhfkit.modeling.reward_model import (
    ENSEMBLE_KEY,
    MEMBERS_KEY,
    RewardModel,
    _score_head,
    load_reward_backbone,
    raw_scores,
    reward_tokenizer,
    sequence_scores,
)
from rlhfkit.reward import RewardConfig, RewardTask, bootstrap_counts, train, with_head_weights
from rlhfkit.rewards import load_reward, scores_and_members
from rlhfkit.run_layout import HELDOUT_FILE
from rlhfkit.run_layout import RLMetric as M
from tests.helpers import read_jsonl, write_jsonl
from tests.test_reward import EVAL_QUESTIONS, TRAIN_QUESTIONS, polite_rude_records

K = 3
PROMPTS = ["Capital of Peru?", "Please write me a long poem about the moon and the sea.", "Hi.", "Two plus two?"]
RESPONSES = ["Lima, happy to help!", "The moon rose over the quiet sea.", "Go away.", "Five, I think. Whatever."]

# ----------------------------------------------------------------------------- aggregation by hand


def test_aggregations_by_hand():
    scores = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 1.0]], dtype=torch.float64)
    # Row means 3, 0, 1; minima 1, 0, -1. Population variances: (4 + 1 + 9) / 3 = 14/3, 0, (4 + 4 + 0) / 3 = 8/3.
    assert aggregate_rewards(scores, "mean").tolist() == pytest.approx([3.0, 0.0, 1.0], abs=1e-12)
    assert aggregate_rewards(scores, "wco").tolist() == [1.0, 0.0, -1.0]
    assert aggregate_rewards(scores, "uwo", 0.5).tolist() == pytest.approx([3 - 7 / 3, 0.0, 1 - 4 / 3], abs=1e-12)
    assert aggregate_rewards(scores, "uwo", 0.0).tolist() == pytest.approx([3.0, 0.0, 1.0], abs=1e-12)
    assert ensemble_std(scores).tolist() == pytest.approx([math.sqrt(14 / 3), 0.0, math.sqrt(8 / 3)], abs=1e-12)
    # One member: every aggregation is its score, and it has no disagreement.
    one = torch.tensor([[0.3], [-2.0]], dtype=torch.float64)
    for how in ("mean", "wco", "uwo"):
        assert aggregate_rewards(one, how, 3.0).tolist() == [0.3, -2.0]
    assert ensemble_std(one).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="mean, wco, uwo"):
        aggregate_rewards(scores, "max")
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        aggregate_rewards(scores[0], "mean")


# ----------------------------------------------------------------------------- the K-head loss


def test_ensemble_loss_is_the_mean_of_each_heads_weighted_bradley_terry_loss():
    """Against a slow loop over heads and pairs of single-head losses (strict pairs both ways, a tie, margins)."""
    g = torch.Generator().manual_seed(0)
    P = 5
    chosen, rejected = torch.randn(P, K, generator=g, dtype=torch.float64), torch.randn(P, K, generator=g, dtype=torch.float64)
    target = torch.tensor([1.0, 1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    margin = torch.tensor([0.0, 0.5, 0.5, 0.25, 1.0], dtype=torch.float64)
    weights = torch.tensor([[1, 0, 2], [0, 3, 1], [1, 1, 0], [2, 0, 0], [1, 1, 3]], dtype=torch.float64)

    total = 0.0
    for h in range(K):
        for p in range(P):
            single = preference_loss(chosen[p : p + 1, h], rejected[p : p + 1, h], target[p : p + 1], margin[p : p + 1])
            total += float(weights[p, h]) * single.item()
    got = ensemble_preference_loss(chosen, rejected, target, margin, weights)
    assert got.shape == (P,)
    assert got.sum().item() == pytest.approx(total / K, rel=1e-12)
    # One head with weight 1 is preference_loss exactly.
    one = ensemble_preference_loss(chosen[:, :1], rejected[:, :1], target, margin)
    assert torch.equal(one, preference_loss(chosen[:, 0], rejected[:, 0], target, margin))


@pytest.mark.parametrize("packed", [False, True])
def test_k_head_task_loss_equals_k_single_head_models(packed):
    """RewardTask on a K-head model equals the mean over heads of single-head models (the same backbone, one head
    row each) scored pair by pair and weighted by the batch's bootstrap counts."""
    rm_tokenizer = reward_tokenizer(models.TINY)
    comps = [
        Comparison("Greet me.", ["Go away.", "Hello, lovely to see you!", "Hi."], [1, 2, 0]),
        Comparison("Say hi.", ["Hi!", "Hello!"], [0, 1], tie=True),
        Comparison("Two plus two?", ["Four.", "Five."], [0, 1], meta={"margin": 2.0}),
    ]
    groups, _ = tokenize_rankings(rm_tokenizer, comps, max_length=64, keep_ties=True)
    for group, counts in zip(groups, [[1, 0, 2], [0, 3, 1], [2, 1, 1]]):
        group["head_weights"] = counts
    pad = rm_tokenizer.pad_token_id
    batch = with_head_weights(lambda ex: collate_rankings(ex, pad, packed=packed), K)(groups)
    assert batch["head_weights"].tolist() == [[1, 0, 2]] * 3 + [[0, 3, 1]] + [[2, 1, 1]]  # per pair, by example

    ensemble = load_reward_backbone(models.TINY, pad_token_id=pad, head_init="normal", seed=1, ensemble_size=K).eval()
    models.set_attention(ensemble)
    task = RewardTask(margin=0.1)
    with torch.no_grad():
        got, _ = task.loss(ensemble, batch)
        total = 0.0
        for h in range(K):
            single = load_reward_backbone(models.TINY, pad_token_id=pad, head_init="normal").eval()
            models.set_attention(single)
            state = {k: v for k, v in ensemble.state_dict().items() if not k.startswith("score.")}
            single.load_state_dict({**state, "score.weight": ensemble.score.weight[h : h + 1]}, strict=True)
            c, r = chosen_rejected(batch, sequence_scores(single, batch))
            assert c.shape == (5,)
            for p in range(5):
                loss = preference_loss(c[p : p + 1], r[p : p + 1], batch["target"][p : p + 1], 0.1 + batch["margin"][p : p + 1])
                total += float(batch["head_weights"][p, h]) * loss.item()
    assert got.item() == pytest.approx(total / K, rel=1e-5)


def test_bootstrap_counts_are_resamples_and_differ_by_head():
    counts = bootstrap_counts(50, K, seed=7)
    assert counts.shape == (50, K)
    assert counts.sum(0).tolist() == [50.0] * K  # n draws each
    assert all(0.45 < float((counts[:, h] > 0).float().mean()) < 0.8 for h in range(K))  # about 1 - 1/e drawn
    assert not torch.equal(counts[:, 0], counts[:, 1]) and not torch.equal(counts[:, 1], counts[:, 2])
    assert torch.equal(counts, bootstrap_counts(50, K, seed=7))  # the same on every process and on resume


# ----------------------------------------------------------------------------- training, saving, loading


def _config(root: Path, **fields) -> RewardConfig:
    defaults = dict(
        model=models.TINY,
        data=str(write_jsonl(root / "train.jsonl", polite_rude_records(TRAIN_QUESTIONS, 0))),
        eval_data=str(write_jsonl(root / "eval.jsonl", polite_rude_records(EVAL_QUESTIONS, 1))),
        output_dir=str(root / "out"),
        max_length=64,
        precision="fp32",
        progress=False,
        tensorboard=False,
        lr=1e-3,
        max_steps=12,
        batch_size=8,
        seed=0,
    )
    return RewardConfig(**{**defaults, **fields})


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory) -> Path:
    """A 3-head ensemble trained through the CLI (``rlhfkit reward ... ensemble_size=3``) for 12 steps."""
    root = tmp_path_factory.mktemp("ensemble")
    config = _config(root)
    args = [f"{k}={v}" for k, v in vars(config).items() if k in ("model", "data", "eval_data", "output_dir", "lr")]
    args += ["max_length=64", "precision=fp32", "progress=false", "tensorboard=false", "max_steps=12", "batch_size=8"]
    assert cli.main(["reward", *args, f"ensemble_size={K}"]) == 0
    return Path(config.output_dir)


def test_saved_ensemble_loads_with_from_pretrained_and_scores_as_trained(ensemble_dir):
    from transformers import AutoModelForSequenceClassification

    saved = json.loads((ensemble_dir / "config.json").read_text())
    assert len(saved["id2label"]) == K
    assert saved["rlhfkit_ensemble_size"] == K
    gains, biases = saved["rlhfkit_reward_gain"], saved["rlhfkit_reward_bias"]
    assert len(gains) == len(biases) == K and len(set(gains)) == K  # one gain per head

    hf = AutoModelForSequenceClassification.from_pretrained(ensemble_dir, dtype=torch.float32).eval()
    assert hf.score.weight.shape == (K, hf.config.hidden_size)
    reward = load_reward(str(ensemble_dir), precision="fp32")
    assert isinstance(reward, RewardModel) and reward.num_members == K
    raw = reward.raw(PROMPTS, RESPONSES)
    assert raw.shape == (len(PROMPTS), K)
    tok = reward_tokenizer(str(ensemble_dir))
    tok.pad_token_id = hf.config.pad_token_id
    by_hand = raw_scores(hf, tok, PROMPTS, RESPONSES, precision="fp32", batch_size=1)  # each alone, no padding
    torch.testing.assert_close(raw, by_hand, rtol=0, atol=1e-5)
    members = reward.member_scores(PROMPTS, RESPONSES)
    torch.testing.assert_close(members, torch.tensor(gains) * raw + torch.tensor(biases))
    assert reward(PROMPTS, RESPONSES) == pytest.approx(members.mean(-1).tolist(), abs=1e-6)

    # Normalisation is per head: on its samples (every response of the training data) each head has mean 0, std 1.
    prompts, responses = [], []
    for comp in load_comparisons(str(ensemble_dir.parent / "train.jsonl")):
        prompts += [comp.prompt] * len(comp.responses)
        responses += comp.responses
    normalised = reward.member_scores(prompts, responses)
    for h in range(K):
        assert statistics.fmean(normalised[:, h].tolist()) == pytest.approx(0.0, abs=1e-4)
        assert statistics.stdev(normalised[:, h].tolist()) == pytest.approx(1.0, abs=1e-4)

    # heldout.json: the heads' mean, and each head.
    held = json.loads((ensemble_dir / HELDOUT_FILE).read_text())
    assert held["ensemble_size"] == K and len(held["head_accuracy"]) == K
    assert held["accuracy"] > 0.5 and held["num_pairs"] == len(EVAL_QUESTIONS)


def test_features_are_what_every_head_reads(ensemble_dir):
    """RewardModel.features: the score head's input, so each head's raw score is its linear map of it; the same
    packed (the reward model's kernel) and padded (batch_size 1 and 3 rows of unequal length)."""
    from rlhfkit.modeling.reward_model import head_inputs

    reward = load_reward(str(ensemble_dir), precision="fp32")
    x = reward.features(PROMPTS, RESPONSES)
    head = reward.model.get_submodule("score")
    assert x.shape == (len(PROMPTS), reward.model.config.hidden_size) and x.dtype == torch.float32
    torch.testing.assert_close(x @ head.weight.float().T, reward.raw(PROMPTS, RESPONSES), rtol=0, atol=1e-5)
    padded = head_inputs(reward.model, reward.tokenizer, PROMPTS, RESPONSES, precision="fp32", batch_size=3, packed=False)
    torch.testing.assert_close(padded, x, rtol=0, atol=1e-5)
    # the hook is gone afterwards: the model scores again
    assert reward.raw(PROMPTS, RESPONSES).shape == (len(PROMPTS), K)
    # raw_and_features: one forward, the same two tensors
    both = reward.raw_and_features(PROMPTS, RESPONSES)
    torch.testing.assert_close(both[0], reward.raw(PROMPTS, RESPONSES), rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1], x, rtol=0, atol=0)


@pytest.mark.parametrize("heads", [1, K])
def test_a_reward_model_directory_starts_another_with_its_blocks_and_any_number_of_heads(ensemble_dir, heads):
    """Round two: ``model=`` a trained reward model (here the 3-head ensemble) starts a reward model of 1 or K heads
    (transformers refuses a checkpoint whose head has another size unless told): every block is the checkpoint's
    own, and the head is drawn again as from an SFT model (seeded, not the checkpoint's)."""
    from safetensors.torch import load_file

    saved = load_file(str(ensemble_dir / "model.safetensors"))
    tok = reward_tokenizer(str(ensemble_dir))
    model = load_reward_backbone(str(ensemble_dir), pad_token_id=tok.pad_token_id, head_init="normal", ensemble_size=heads)
    weights = model.state_dict()
    assert weights["score.weight"].shape == (heads, saved["score.weight"].shape[1])
    assert not torch.equal(weights["score.weight"], saved["score.weight"][:heads].float())
    blocks = [name for name in saved if name != "score.weight"]
    assert blocks and all(torch.equal(weights[name], saved[name].to(weights[name].dtype)) for name in blocks)
    again = load_reward_backbone(str(ensemble_dir), pad_token_id=tok.pad_token_id, head_init="normal", ensemble_size=heads)
    assert torch.equal(again.state_dict()["score.weight"], weights["score.weight"])
    # The checkpoint's ensemble size does not carry over to a one-head model (its saved config.json would say K).
    assert getattr(model.config, ENSEMBLE_KEY, 1) == heads


def test_head_init_keep_trains_a_reward_models_own_head_on(ensemble_dir, tmp_path):
    """``head_init=keep``: the checkpoint's head as trained, which needs as many heads; a separate ensemble's member
    list does not carry over into the model trained from member 0; an SFT model or another head count is refused."""
    import shutil

    from safetensors.torch import load_file

    tok = reward_tokenizer(str(ensemble_dir))
    kept = load_reward_backbone(str(ensemble_dir), pad_token_id=tok.pad_token_id, head_init="keep", ensemble_size=K)
    saved = load_file(str(ensemble_dir / "model.safetensors"))["score.weight"]
    assert torch.equal(kept.state_dict()["score.weight"], saved.float())
    member0 = tmp_path / "member0"
    shutil.copytree(ensemble_dir, member0)
    written = json.loads((member0 / "config.json").read_text())
    (member0 / "config.json").write_text(json.dumps({**written, MEMBERS_KEY: ["members/1"]}))
    again = load_reward_backbone(str(member0), pad_token_id=tok.pad_token_id, head_init="keep", ensemble_size=K)
    assert not hasattr(again.config, MEMBERS_KEY) and getattr(again.config, ENSEMBLE_KEY) == K
    with pytest.raises(ConfigError, match=r"head_init=keep: .* not a reward model with 1 head"):
        load_reward_backbone(str(ensemble_dir), pad_token_id=tok.pad_token_id, head_init="keep", ensemble_size=1)
    with pytest.raises(ConfigError, match="no trained head"):
        load_reward_backbone(models.TINY, pad_token_id=tok.pad_token_id, head_init="keep")


def test_a_one_head_reward_model_trained_from_an_ensemble_is_saved_as_one_head(ensemble_dir, tmp_path):
    """``rlhfkit reward model=ENSEMBLE_DIR`` (ensemble_size 1): the saved model is a one-head reward model, not one
    whose config.json still names the checkpoint's K heads."""
    train(_config(tmp_path, model=str(ensemble_dir), max_steps=1, eval_data="", eval_fraction=0.0))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ENSEMBLE_KEY not in written and MEMBERS_KEY not in written
    assert RewardModel(tmp_path / "out", precision="fp32").raw(PROMPTS, RESPONSES).shape == (len(PROMPTS),)


def test_the_saved_model_scores_as_the_trained_one_in_memory(tmp_path):
    """train() -> save -> from_pretrained: the same raw scores as the model in memory at the end of training."""
    result = train(_config(tmp_path, ensemble_size=2, max_steps=3, eval_data="", eval_fraction=0.0))
    tok = reward_tokenizer(models.TINY)
    in_memory = raw_scores(result.model, tok, PROMPTS, RESPONSES, precision="fp32")
    loaded = RewardModel(tmp_path / "out", precision="fp32").raw(PROMPTS, RESPONSES)
    assert in_memory.shape == (len(PROMPTS), 2)
    torch.testing.assert_close(loaded, in_memory, rtol=0, atol=1e-6)


def test_heads_trained_on_different_bootstraps_end_up_different(tmp_path):
    """Heads that start identical (zero init) differ only through their resamples: after training they do (the
    closest two rows 10-22% of the largest row's norm apart on seeds 0-5; 5% required)."""
    result = train(_config(tmp_path, ensemble_size=K, head_init="zero", eval_data="", eval_fraction=0.0, normalize=False))
    weight = _score_head(result.model).weight.detach()
    norms = weight.norm(dim=1)
    assert (norms > 0).all()
    for a in range(K):
        for b in range(a + 1, K):
            assert (weight[a] - weight[b]).norm() > 0.05 * norms.max(), (a, b, weight.norm(dim=1))
    reward = RewardModel(tmp_path / "out", precision="fp32")
    spread = ensemble_std(reward.member_scores(PROMPTS, RESPONSES))
    assert (spread > 1e-4).all(), spread  # small after 12 steps (raw units ~0.3): seeds 0-5 gave 0.0016 to 0.008

    # The refusal: zero init and no bootstrap would give K identical members.
    with pytest.raises(ConfigError, match="identical members"):
        train(_config(tmp_path, ensemble_size=K, head_init="zero", ensemble_bootstrap=False, output_dir=str(tmp_path / "no")))


def test_a_single_head_directory_loads_and_scores_as_before(tmp_path):
    """A directory as rlhfkit always wrote it (num_labels 1, float gain and bias, no ensemble key) still loads:
    one member, score gain * raw + bias, and every aggregation is a no-op; training with ensemble_size 1 writes
    that same format."""
    tok = reward_tokenizer(models.TINY)
    model = load_reward_backbone(models.TINY, pad_token_id=tok.pad_token_id, head_init="normal", seed=2)
    model.config.rlhfkit_reward_gain, model.config.rlhfkit_reward_bias = 0.5, -0.25
    models.save_pretrained(model, tok, tmp_path / "old")
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "rlhfkit_ensemble_size" not in saved and saved["rlhfkit_reward_gain"] == 0.5
    raw = raw_scores(model, tok, PROMPTS, RESPONSES, precision="fp32")
    for how in ("mean", "wco", "uwo"):
        reward = load_reward(str(tmp_path / "old"), precision="fp32", aggregation=how, uwo_coef=2.0)
        assert reward.num_members == 1
        assert reward(PROMPTS, RESPONSES) == pytest.approx((0.5 * raw - 0.25).tolist(), abs=1e-6)
        torch.testing.assert_close(reward.raw_and_features(PROMPTS, RESPONSES)[0], raw, rtol=0, atol=1e-5)  # (N,)
        scores, members = scores_and_members(reward, PROMPTS, RESPONSES)
        assert members is None and scores == reward(PROMPTS, RESPONSES)

    train(_config(tmp_path, max_steps=1, eval_data="", eval_fraction=0.0))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rlhfkit_ensemble_size" not in written and isinstance(written["rlhfkit_reward_gain"], float)
    assert len(written["id2label"]) == 1

    # A classifier with several outputs and no ensemble key is not a reward model.
    from transformers import AutoModelForSequenceClassification

    two = AutoModelForSequenceClassification.from_config(models.tiny_config(num_labels=2))
    models.save_pretrained(two, tok, tmp_path / "classifier")
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel(tmp_path / "classifier", precision="fp32")
    with pytest.raises(ConfigError, match="reward_uwo_coef"):
        RewardModel(tmp_path / "old", precision="fp32", uwo_coef=-1.0)


# ----------------------------------------------------------------------------- RL and best-of-n


def test_grpo_with_an_ensemble_and_wco_scores_the_minimum_and_logs_disagreement(ensemble_dir, tmp_path):
    config = rl.GRPOConfig(
        policy=models.TINY,
        reward_model=str(ensemble_dir),
        reward_aggregation="wco",
        output_dir=str(tmp_path / "grpo"),
        precision="fp32",
        max_new_tokens=8,
        temperature=1.0,
        batch_size=2,
        samples_per_prompt=2,
        max_steps=2,
        progress=False,
        tensorboard=False,
        log_samples=0,
    )
    trainer = rl.RLTrainer(config)
    scored, stats = trainer.rollout_and_score(trainer.prompts_for_step(0))
    members = trainer.reward_fn.member_scores(scored.rollout.prompts, scored.rollout.responses)
    assert members.shape == (4, K)
    torch.testing.assert_close(scored.scores, members.min(-1).values)  # no penalties: the score is the worst head
    assert stats[M.ENSEMBLE_STD] == pytest.approx(float(ensemble_std(members).mean()), rel=1e-5)
    assert stats[M.ENSEMBLE_MEAN] == pytest.approx(float(members.mean()), rel=1e-5)
    assert stats[M.SCORE] < stats[M.ENSEMBLE_MEAN]  # the minimum of disagreeing heads is below their mean

    rl.train(config)
    entries = read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
    assert [e["step"] for e in entries] == [1, 2]
    for entry in entries:
        assert math.isfinite(entry[M.ENSEMBLE_STD]) and entry[M.ENSEMBLE_STD] > 0
        assert entry[M.SCORE] <= entry[M.ENSEMBLE_MEAN]


def test_best_of_n_ranks_by_the_aggregate(ensemble_dir, tmp_path, monkeypatch):
    """A constructed pool: in every prompt's pair of samples, the first has a higher mean over the heads, the
    second a higher minimum. best_of_2 picks the first under mean, the second under wco."""
    config = evaluate.EvalConfig(
        policy="tiny",
        baseline="tiny",
        gold="length",
        proxy=str(ensemble_dir),
        max_prompts=4,
        max_new_tokens=6,
        batch_size=8,
        best_of_n=2,
        samples_per_prompt=1,
        precision="fp32",
        generation_precision="fp32",
        bootstrap=10,
        resamples=100,
        progress=False,
        output=str(tmp_path / "eval.json"),
    )
    from rlhfkit.data.prompts import demo_data_path, load_prompts

    prompts = load_prompts(demo_data_path("prompts_eval.jsonl"))[:4]
    pool, _, _ = evaluate._sample(config.baseline, prompts, config, "pool", n=2, seed_offset=2)  # as run() draws it
    assert len(set(pool.responses)) == len(pool.responses)
    high_mean, high_min = [4.0, 4.0, -5.0], [0.5, 0.5, 0.5]  # mean 1 (min -5) against mean 0.5 (min 0.5)
    table = {r: (high_mean if i % 2 == 0 else high_min) for i, r in enumerate(pool.responses)}

    def members(self, prompts, responses):
        return torch.tensor([table.get(r, [0.0, 0.0, 0.0]) for r in responses])

    monkeypatch.setattr(RewardModel, "member_scores", members)
    by_mean = evaluate.run(config)["players"]["best_of_2"]
    by_wco = evaluate.run(evaluate.EvalConfig(**{**vars(config), "reward_aggregation": "wco"}))
    assert by_mean["proxy_score"] == pytest.approx(1.0)  # every pick the high-mean sample, scored by the mean
    assert by_mean["proxy_ensemble_std"] == pytest.approx(math.sqrt(18.0))  # deviations 3, 3, -6
    best = by_wco["players"]["best_of_2"]
    assert best["proxy_score"] == pytest.approx(0.5)  # the high-minimum sample (the other would score -5)
    assert best["proxy_ensemble_std"] == pytest.approx(0.0)
    assert by_wco["reward_aggregation"] == "wco" and by_wco["proxy_ensemble_size"] == K
    assert by_wco["best_of_n"]["aggregation"] == "wco"

    # The ensemble's curves, whatever the configured aggregation: each ranker's picks' gold, by hand. Per prompt,
    # member 0 alone, member 1 alone and the mean pick the first sample; member 2 alone (-5 < 0.5), wco and uwo
    # (1 - 0.5 x 18 = -8 < 0.5) the second; "members" averages the three members' picks.
    g = load_reward("length")(pool.prompts, pool.responses)
    first, second = g[0::2], g[1::2]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    want = {
        "member_0": mean(first),
        "members": mean([(2 * a + b) / 3 for a, b in zip(first, second)]),
        "mean": mean(first),
        "wco": mean(second),
        "uwo": mean(second),
    }
    for results in (by_wco, evaluate.run(config)):
        block = results["best_of_n_ensemble"]
        assert (block["single"], block["ensemble_size"], block["num_prompts"]) == ("member_0", K, 4)
        assert set(block["by_n"]) == {"1", "2"}
        for name, entry in block["by_n"]["1"].items():  # best-of-1: everybody takes the first sample
            assert entry["gold_score"] == pytest.approx(mean(first)), name
        two = block["by_n"]["2"]
        assert {name: two[name]["gold_score"] for name in want} == pytest.approx(want)
        assert two["wco"]["minus_member_0"] == pytest.approx(mean(second) - mean(first))
        assert two["wco"]["minus_members"] == pytest.approx(want["wco"] - want["members"])
        lo, hi = two["wco"]["minus_member_0_ci"]
        assert lo <= two["wco"]["minus_member_0"] <= hi and 0.0 <= two["wco"]["minus_member_0_p"] <= 1.0
        assert "minus_member_0" not in two["member_0"] and "minus_member_0" not in two["members"]


def test_a_critic_starts_from_an_ensemble_as_the_mean_of_its_heads(ensemble_dir, tmp_path):
    """value=critic with an ensemble reward model (critic_init empty): the critic's value head is the mean of the
    K score heads, its trunk the reward model's; the PPO trainer builds and takes a step."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.modeling.policy import load_critic

    hf = AutoModelForSequenceClassification.from_pretrained(ensemble_dir, dtype=torch.float32)
    critic = load_critic(str(ensemble_dir), vocab_size=hf.config.vocab_size)
    assert critic.score.weight.shape == (1, hf.config.hidden_size) and critic.config.num_labels == 1
    torch.testing.assert_close(critic.score.weight, hf.score.weight.mean(0, keepdim=True))
    torch.testing.assert_close(critic.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert not hasattr(critic.config, "rlhfkit_ensemble_size")
    config = rl.RLConfig(
        algorithm="ppo",
        value="critic",
        policy=models.TINY,
        reward_model=str(ensemble_dir),
        output_dir=str(tmp_path / "ppo"),
        precision="fp32",
        max_new_tokens=4,
        batch_size=2,
        max_steps=1,
        progress=False,
        tensorboard=False,
    )
    rl.train(config)
    assert (tmp_path / "ppo" / "critic" / "config.json").is_file()


def test_the_pipelines_reward_aggregation_reaches_rl_and_eval(tmp_path):
    from rlhfkit.pipeline import PipelineConfig, build_stages

    p = PipelineConfig(
        output_dir=str(tmp_path),
        model="tiny",
        algorithm="grpo",
        compare=["ppo", "dpo"],
        reward={"ensemble_size": K},
        reward_aggregation="uwo",
        reward_uwo_coef=1.5,
        ppo={"reward_aggregation": "wco"},  # a stage's own section wins
    )
    configs = {stage.name: stage.config for stage in build_stages(p)}
    assert configs["reward"].ensemble_size == K
    assert (configs["grpo"].reward_aggregation, configs["grpo"].reward_uwo_coef) == ("uwo", 1.5)
    assert (configs["ppo"].reward_aggregation, configs["ppo"].reward_uwo_coef) == ("wco", 1.5)
    assert (configs["eval"].reward_aggregation, configs["eval"].reward_uwo_coef) == ("uwo", 1.5)
    assert not hasattr(configs["dpo"], "reward_aggregation")
    default = {
        stage.name: stage.config
        for stage in build_stages(PipelineConfig(output_dir=str(tmp_path), model="tiny", algorithm="grpo"))
    }
    assert default["grpo"].reward_aggregation == default["eval"].reward_aggregation == "mean"


# ----------------------------------------------------------------------------- separate members


def test_separate_members_are_the_single_runs_of_seeds_seed_to_seed_plus_k(tmp_path):
    """``ensemble_backbones=separate``: member k is exactly the single reward model a run with seed ``seed + k``
    trains on the same split (no bootstrap); the directory lists the members, loads with ``from_pretrained`` as
    member 0, and :class:`RewardModel` scores each member as that member's own directory does; heldout.json judges
    the members' mean normalised score and each member apart."""
    from transformers import AutoModelForSequenceClassification

    fields = dict(max_steps=4)
    keys = ("model", "data", "eval_data", "output_dir", "lr")
    args = [f"{k}={v}" for k, v in vars(_config(tmp_path, **fields)).items() if k in keys]
    args += ["max_length=64", "precision=fp32", "progress=false", "tensorboard=false", "max_steps=4", "batch_size=8"]
    args += [f"ensemble_size={K}", "ensemble_backbones=separate", "ensemble_bootstrap=false"]
    assert cli.main(["reward", *args]) == 0
    out = tmp_path / "out"
    saved = json.loads((out / "config.json").read_text())
    assert saved["rlhfkit_ensemble_members"] == [f"members/{k}" for k in range(1, K)]
    assert "rlhfkit_ensemble_size" not in saved  # member 0 is a single reward model
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert hf.config.num_labels == 1

    # Member 1 against a single run from seed 1 on its own: the same weights.
    alone = train(_config(tmp_path, **fields, seed=1, output_dir=str(tmp_path / "alone")))
    member = AutoModelForSequenceClassification.from_pretrained(out / "members" / "1", dtype=torch.float32)
    for (name, a), b in zip(alone.model.state_dict().items(), member.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    zero = hf.state_dict()["score.weight"]
    assert not torch.equal(zero, member.state_dict()["score.weight"])

    ensemble = RewardModel(out, precision="fp32", aggregation="wco")
    assert ensemble.num_members == K
    members = ensemble.member_scores(PROMPTS, RESPONSES)
    singles = [RewardModel(d, precision="fp32") for d in [out, out / "members" / "1", out / "members" / "2"]]
    singles[0].members = singles[0].members[:1]  # member 0's directory alone, as a single model
    singles[0].num_members = 1
    for k, single in enumerate(singles):
        torch.testing.assert_close(members[:, k], torch.tensor(single(PROMPTS, RESPONSES)), rtol=0, atol=1e-6)
    assert ensemble(PROMPTS, RESPONSES) == pytest.approx(members.min(-1).values.tolist(), abs=1e-6)

    held = json.loads((out / HELDOUT_FILE).read_text())
    own = [json.loads((out / "members" / str(k) / HELDOUT_FILE).read_text()) for k in range(1, K)]
    assert held["ensemble_size"] == K and held["num_pairs"] == own[0]["num_pairs"] == own[1]["num_pairs"] > 0
    assert held["head_accuracy"][1:] == [o["accuracy"] for o in own]


def test_separate_members_with_bootstrap_each_train_on_their_own_resample(tmp_path, monkeypatch):
    """With ``ensemble_bootstrap``, member k's training examples are the examples repeated as column k of
    :func:`bootstrap_counts` says (the resample the k-th shared head would get), and its seed is seed + k; every
    member holds out the same examples (one split, by the run's seed)."""
    from rlhfkit import reward as reward_module

    seen = []
    real = reward_module._train_one

    def recording(config, tokenizer, train_set, eval_set, norm_samples):
        seen.append((config.seed, config.ensemble_size, [id(e) for e in train_set], [id(e) for e in eval_set]))
        return real(config, tokenizer, train_set, eval_set, norm_samples)

    monkeypatch.setattr(reward_module, "_train_one", recording)
    config = _config(tmp_path, max_steps=1, eval_data="", eval_fraction=0.25, seed=3, ensemble_size=2)
    config.ensemble_backbones = "separate"
    train(config)
    assert [(seed, size) for seed, size, _, _ in seen] == [(3, 1), (4, 1)]
    assert seen[0][3] == seen[1][3] and len(seen[0][3]) > 0  # the same held-out examples, the very objects
    first = seen[0][2]
    n = len(load_comparisons(config.data)) - len(seen[0][3])
    counts = bootstrap_counts(n, 2, seed=3 * 1_000_003 + 24)
    assert len(first) == len(seen[1][2]) == n  # a resample is as large as the training set
    assert first != seen[1][2]
    assert sorted(first.count(i) for i in set(first)) == sorted(int(c) for c in counts[:, 0].tolist() if c > 0)
    assert sorted(seen[1][2].count(i) for i in set(seen[1][2])) == sorted(int(c) for c in counts[:, 1].tolist() if c > 0)


def test_a_member_list_that_names_no_model_is_an_error_naming_it(tmp_path):
    train(_config(tmp_path, max_steps=1, eval_data="", eval_fraction=0.0))
    path = tmp_path / "out" / "config.json"
    saved = json.loads(path.read_text())
    saved["rlhfkit_ensemble_members"] = ["members/9"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"members/9.*no config.json"):
        RewardModel(tmp_path / "out", precision="fp32")


def _ensemble_bon_module():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import ensemble_best_of_n
    finally:
        sys.path.pop(0)
    return ensemble_best_of_n


def test_best_of_n_gold_picks_the_highest_ranked_of_the_first_n():
    ranking = torch.tensor([[0.1, 0.9, 0.5, 2.0], [3.0, 1.0, 3.0, 0.0]], dtype=torch.float64)
    gold = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]], dtype=torch.float64)
    assert evaluate.best_of_n_gold(ranking, gold, 1).tolist() == [10.0, 20.0]
    assert evaluate.best_of_n_gold(ranking, gold, 2).tolist() == [11.0, 20.0]
    assert evaluate.best_of_n_gold(ranking, gold, 4).tolist() == [13.0, 20.0]  # a tie: the first one


def test_ensemble_rankers_and_their_outcomes_by_hand():
    # 1 prompt, 3 samples, 2 members. member 0 prefers sample 2, member 1 sample 0; mean: (1, 1.5, 2) -> sample 2;
    # wco: (0, 1, -1) -> sample 1; uwo (coef 1): mean - var = (1 - 1, 1.5 - 0.25, 2 - 9) -> sample 1.
    members = torch.tensor([[[0.0, 2.0], [1.0, 2.0], [5.0, -1.0]]], dtype=torch.float64)
    gold = torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64)
    rankers = evaluate.ensemble_rankers(members, uwo_coef=1.0)
    assert list(rankers) == ["member_0", "members", "mean", "wco", "uwo"]
    got = {name: evaluate.ranker_outcome(r, gold, 3).item() for name, r in rankers.items()}
    assert got == {"member_0": 30.0, "members": (30.0 + 10.0) / 2, "mean": 30.0, "wco": 20.0, "uwo": 20.0}
    first_two = {name: evaluate.ranker_outcome(r, gold, 2).item() for name, r in rankers.items()}
    assert first_two == {"member_0": 20.0, "members": 15.0, "mean": 20.0, "wco": 20.0, "uwo": 20.0}
    with pytest.raises(ValueError, match="K >= 2"):
        evaluate.ensemble_rankers(members[..., :1])
    table = evaluate.compare_rankers(
        {"member_0": torch.tensor([1.0, 3.0]), "members": torch.tensor([2.0, 2.0]), "wco": torch.tensor([2.0, 5.0])},
        single="member_0",
        seed=0,
    )
    assert table["wco"]["minus_member_0"] == pytest.approx(1.5) and table["wco"]["minus_members"] == pytest.approx(1.5)
    assert table["member_0"]["gold_score"] == pytest.approx(2.0) and set(table["members"]) == {"gold_score", "gold_score_ci"}


def test_ensemble_best_of_n_script_on_the_tiny_model(tmp_path, capsys):
    """The script end to end on the tiny model (numbers meaningless): its WCO row is the gold of the samples the
    lowest member ranks highest, recomputed here from the pool file and the members' own directories."""
    bench = _ensemble_bon_module()
    fields = dict(max_steps=2, eval_data="", eval_fraction=0.0)
    train(_config(tmp_path, **fields, output_dir=str(tmp_path / "single")))
    config = _config(tmp_path, **fields, output_dir=str(tmp_path / "ens"), ensemble_size=2, ensemble_bootstrap=False)
    config.ensemble_backbones = "separate"
    train(config)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in EVAL_QUESTIONS[:3]])
    capsys.readouterr()  # what training printed
    argv = [
        *("--policy", models.TINY, "--prompts", str(prompts), "--single", str(tmp_path / "single")),
        *("--ensemble", str(tmp_path / "ens"), "--gold", "length", "--n", "4", "--max-new-tokens", "6"),
        *("--precision", "fp32", "--output-dir", str(tmp_path / "bench")),
    ]
    results = bench.main(argv)
    printed = capsys.readouterr().out
    assert printed.startswith("command: ") and "wco - single at n=4:" in printed.splitlines()[-1]
    assert set(results["best_of_n"]) == {"1", "2", "4"} and results["ensemble_size"] == 2

    pool = read_jsonl(tmp_path / "bench" / "pool.jsonl")
    assert len(pool) == 3 and all(len(r["responses"]) == 4 for r in pool)
    ps = [r["prompt"] for r in pool for _ in r["responses"]]
    rs = [x for r in pool for x in r["responses"]]
    gold = torch.tensor(load_reward("length")(ps, rs), dtype=torch.float64).view(3, 4)
    members = [RewardModel(d, precision="fp32") for d in (tmp_path / "ens", tmp_path / "ens" / "members" / "1")]
    members[0].members, members[0].num_members = members[0].members[:1], 1  # member 0 alone
    each = torch.stack([torch.tensor(m(ps, rs)) for m in members], -1)
    lowest = each.min(-1).values.view(3, 4)
    expected = gold.gather(1, lowest.argmax(-1, keepdim=True)).mean()
    alone = torch.stack([gold.gather(1, each[:, k].view(3, 4).argmax(-1, keepdim=True)) for k in range(2)]).mean(0).mean()
    assert results["best_of_n"]["4"]["members"]["gold"]["value"] == pytest.approx(float(alone), abs=1e-9)
    assert results["wco_minus_members"]["value"] == pytest.approx(float(expected - alone), abs=1e-9)
    assert results["best_of_n"]["4"]["wco"]["gold"]["value"] == pytest.approx(float(expected), abs=1e-9)
    single = torch.tensor(RewardModel(tmp_path / "single", precision="fp32")(ps, rs)).view(3, 4)
    by_single = gold.gather(1, single.argmax(-1, keepdim=True)).mean()
    assert results["best_of_n"]["4"]["wco"]["minus_single"]["value"] == pytest.approx(float(expected - by_single), abs=1e-9)
    # n = 1: every ranker takes the first sample.
    firsts = [entry["gold"]["value"] for entry in results["best_of_n"]["1"].values()]
    assert firsts == [pytest.approx(float(gold[:, 0].mean()), abs=1e-9)] * 5  # single, mean, wco, uwo, members


def test_separate_members_held_out_accuracy_uses_the_kernel_each_member_trained_with(tmp_path, monkeypatch):
    """Each member's own held-out accuracy is measured in memory with the attention kernel it trained with; the
    ensemble's per-member accuracy, on the reloaded members, uses the same kernel, so the two agree. (With
    transformers' default kernel instead, near-tied pairs flip under bf16: on SmolLM2 member 0 read 0.768 against
    the 0.773 it reported as a single model.)"""
    import rlhfkit.reward as reward_module

    kernels: list[list[str]] = []
    measure = reward_module.heldout_accuracy

    def spy(model, *args, **kwargs):
        members = list(model) if isinstance(model, (list, tuple)) else [model]
        kernels.append([m.config._attn_implementation for m in members])
        return measure(model, *args, **kwargs)

    monkeypatch.setattr(reward_module, "heldout_accuracy", spy)
    config = _config(tmp_path, max_steps=2, ensemble_size=K)
    config.ensemble_backbones, config.ensemble_bootstrap = "separate", False
    train(config)
    assert len(kernels) == K + 1 and len(kernels[-1]) == K  # each member's own run, then the ensemble
    trained_with = {k for call in kernels[:-1] for k in call}
    assert len(trained_with) == 1 and kernels[-1] == [trained_with.pop()] * K
    held = json.loads((tmp_path / "out" / HELDOUT_FILE).read_text())
    own = [json.loads((tmp_path / "out" / "members" / str(k) / HELDOUT_FILE).read_text()) for k in range(1, K)]
    assert held["head_accuracy"][1:] == [o["accuracy"] for o in own]
