"""Active preference querying (rlhfkit.active): acquisition scores by hand, the pick, `select` end to end, the output
read by the labelling stage and the annotation app, soft labels from votes into cDPO, and the benchmark on the tiny
model."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit import active, cli, dpo
from rlhfkit.config import ConfigError
from rlhfkit.data.pairwise import collate_pairs, tokenize_pairs
from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.data.samples import load_items
from rlhfkit.feedback.grades import pair_targets
from rlhfkit.feedback.web.pairs import read_pairs
from rlhfkit.label import LabelConfig
from rlhfkit.label import run as label_run
from rlhfkit.modeling import models
from rlhfkit.modeling.reward_model import RewardModel, load_reward_backbone, reward_tokenizer
from tests.helpers import read_jsonl, write_jsonl

LN3 = math.log(3)

# ----------------------------------------------------------------------------- acquisition scores by hand


def test_disagreement_and_uncertainty_by_hand():
    # Rows: heads' score differences (ln 3, -ln 3); (ln 3, ln 3); (5, 10). Scores of b are not zero, so the
    # functions must take differences.
    b = torch.tensor([[1.0, 2.0], [0.5, 0.5], [-1.0, 3.0]], dtype=torch.float64)
    a = b + torch.tensor([[LN3, -LN3], [LN3, LN3], [5.0, 10.0]], dtype=torch.float64)
    # P = (3/4, 1/4): population std 1/4, mean 1/2. P = (3/4, 3/4): std 0, mean 3/4 -> 1 - |3/2 - 1| = 1/2.
    # P = (sigmoid 5, sigmoid 10): the heads are 5 units apart but agree on the label.
    s5, s10 = 1 / (1 + math.exp(-5)), 1 / (1 + math.exp(-10))
    got = active.preference_disagreement(a, b).tolist()
    assert got == pytest.approx([0.25, 0.0, (s10 - s5) / 2], abs=1e-12)
    assert got[2] < 0.004  # while the std of the reward differences would be 2.5
    assert active.preference_uncertainty(a, b).tolist() == pytest.approx([1.0, 0.5, 1 - abs(2 * (s5 + s10) / 2 - 1)], abs=1e-12)
    # One head: no disagreement; uncertainty from its own P(a > b) = 3/4 -> 1/2, and symmetric in a and b.
    one_a, one_b = torch.tensor([[LN3]]), torch.tensor([[0.0]])
    assert active.preference_disagreement(one_a, one_b).tolist() == [0.0]
    assert active.preference_uncertainty(one_a, one_b).tolist() == pytest.approx([0.5])
    assert active.preference_uncertainty(one_b, one_a).tolist() == pytest.approx([0.5])
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        active.preference_disagreement(a[0], b[0])


def test_pick_takes_the_best_scores_under_the_per_prompt_cap():
    scores = [0.9, 0.8, 0.7, 0.6, 0.6]
    groups = ["p", "p", "p", "q", "r"]
    tiebreak = [0.0, 0.0, 0.0, 0.1, 0.2]  # candidate 4 beats 3 on the tie-break
    assert active.pick(scores, tiebreak, groups, num=3, max_per_group=2) == [0, 1, 4]
    assert active.pick(scores, tiebreak, groups, num=3, max_per_group=0) == [0, 1, 2]  # no cap
    assert active.pick(scores, tiebreak, groups, num=10, max_per_group=1) == [0, 4, 3]  # runs out


def test_bald_by_hand():
    # Two heads with P = 0.5 and 0.5: no disagreement, BALD 0; P = sigmoid(+-log 3) = 0.75 and 0.25: mean 0.5, so
    # H(0.5) - H(0.75) = log 2 - (log 4 - 0.75 log 3) = 0.75 log 3 - log 2.
    margins = torch.tensor([[0.0, 0.0], [math.log(3), -math.log(3)]], dtype=torch.float64)
    assert active.preference_bald(margins, torch.zeros_like(margins)).tolist() == pytest.approx(
        [0.0, 0.75 * math.log(3) - math.log(2)], abs=1e-12
    )


def test_diverse_pick_by_hand():
    """BAL-PM's greedy batch: standardised uncertainty plus beta times standardised log distance to the nearest
    labelled prompt, each pick counting as labelled for the next."""
    features = torch.tensor([[0.0], [1.0], [4.0], [4.0]], dtype=torch.float64)  # candidates' prompt features
    labelled = torch.tensor([[0.0]], dtype=torch.float64)
    uncertainty = torch.tensor([3.0, 2.0, 1.5, 1.0], dtype=torch.float64)
    common = dict(tiebreak=[0.1, 0.2, 0.3, 0.4], groups=["a", "b", "c", "d"], max_per_group=0)
    # beta 0: uncertainty alone, best first.
    assert active.diverse_pick(uncertainty, features, labelled, num=4, beta=0.0, **common) == [0, 1, 2, 3]
    # beta 0 with equal uncertainties: the higher tiebreak first (3 before 2).
    equal = torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    assert active.diverse_pick(equal, features, labelled, num=4, beta=0.0, **common) == [0, 1, 3, 2]

    def slow(beta: float) -> list[int]:
        chosen, known = [], [0.0]
        for _ in range(4):
            free = [i for i in range(4) if i not in chosen]
            u = [uncertainty[i].item() for i in free]
            h = [math.log(max(min(abs(features[i, 0].item() - k) for k in known), 1e-6)) for i in free]
            zu = (np.array(u) - np.mean(u)) / max(np.std(u), 1e-12)  # one candidate left: 0
            zh = (np.array(h) - np.mean(h)) / max(np.std(h), 1e-12)
            score = list(zu + beta * zh)
            best = max(score)
            k = max((j for j in range(len(free)) if score[j] == best), key=lambda j: common["tiebreak"][free[j]])
            chosen.append(free[k])
            known.append(features[free[k], 0].item())
        return chosen

    # beta 1, first pick by hand: log distances log 1e-6, 0, log 4, log 4 standardise to -1.73, 0.43, 0.65, 0.65 and
    # the uncertainties to 1.52, 0.17, -0.51, -1.18; the sums -0.21, 0.60, 0.14, -0.53 make candidate 1 first
    # (candidate 0 sits on a labelled prompt: its uncertainty no longer wins).
    picked = active.diverse_pick(uncertainty, features, labelled, num=4, beta=1.0, **common)
    assert picked[0] == 1 and picked == slow(1.0) and sorted(picked) == [0, 1, 2, 3]
    # the per-prompt cap, as active.pick: two candidates of one group, cap 1 -> only one of them
    capped = active.diverse_pick(
        uncertainty,
        features,
        labelled,
        num=4,
        beta=1.0,
        tiebreak=common["tiebreak"],
        groups=["a", "b", "c", "c"],
        max_per_group=1,
    )
    assert len(capped) == 3 and len({2, 3} & set(capped)) == 1
    # Nothing labelled yet: every distance is infinite, the novelty term counts 0 for the first pick (uncertainty
    # decides: candidate 0); the rest are picked as among candidates 1-3 with 0's prompt labelled.
    none = torch.zeros(0, 1, dtype=torch.float64)
    first = active.diverse_pick(uncertainty, features, none, num=4, beta=1.0, **common)
    rest = active.diverse_pick(
        uncertainty[1:],
        features[1:],
        features[:1],
        num=3,
        beta=1.0,
        tiebreak=[0.2, 0.3, 0.4],
        groups=["b", "c", "d"],
        max_per_group=0,
    )
    assert first == [0, *(i + 1 for i in rest)]


# ----------------------------------------------------------------------------- select with a scripted ensemble

# Each response's raw score under two heads. Pairs of P1: a1-a2 and a2-a3 have head differences (-ln 3, ln 3) and
# (ln 3, -ln 3): P = (1/4, 3/4), disagreement 1/4; a1-a3 has none. b1-b2: P = (sigmoid 2, 1/2), disagreement
# (sigmoid(2) - 1/2) / 2 = 0.1904. P3's pairs are no candidates: two equal responses, an empty one.
HEAD_SCORES = {"a1": (0.0, 0.0), "a2": (LN3, -LN3), "a3": (0.0, 0.0), "b1": (2.0, 0.0), "b2": (0.0, 0.0)}
B_DISAGREEMENT = (1 / (1 + math.exp(-2)) - 0.5) / 2


class ScriptedEnsemble:
    """Stands in for RewardModel: raw scores from HEAD_SCORES, and a record of what it was asked to score."""

    scored: list[list[str]] = []

    def __init__(self, path, *, precision="bf16", batch_size=16, **kwargs):
        self.num_members, self.path = 2, str(path)

    def raw(self, prompts, responses):
        ScriptedEnsemble.scored.append(list(responses))
        return torch.tensor([HEAD_SCORES[r] for r in responses])

    def raw_and_features(self, prompts, responses):
        return self.raw(prompts, responses), self.features(prompts, responses)


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    """(samples file, ensemble dir) with ScriptedEnsemble in place of the reward model."""
    monkeypatch.setattr("rlhfkit.modeling.reward_model.RewardModel", ScriptedEnsemble)
    ScriptedEnsemble.scored = []
    samples = write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {"prompt_index": 0, "prompt": "P1?", "responses": ["a1", "a2", "a3"]},
            {"prompt_index": 1, "prompt": "P2?", "responses": ["b1", "b2"]},
            {"prompt_index": 2, "prompt": "P3?", "responses": ["c1", "c1", " "]},
        ],
    )
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "config.json").write_text("{}")
    return samples, ensemble


def query(tmp_path, samples, name="q.jsonl", **fields) -> list[dict]:
    config = active.QueryConfig(samples=str(samples), output=str(tmp_path / name), **fields)
    return read_jsonl(active.select(config))


def test_select_picks_the_highest_disagreement(tmp_path, scripted):
    samples, ensemble = scripted
    picked = query(tmp_path, samples, reward_model=str(ensemble), num_queries=2, max_per_prompt=2)
    assert sorted(tuple(r["responses"]) for r in picked) == [("a1", "a2"), ("a2", "a3")]
    assert [r["acquisition"] for r in picked] == pytest.approx([0.25, 0.25])
    assert {tuple(r["response_indices"]) for r in picked} == {(0, 1), (1, 2)} and {r["sample_index"] for r in picked} == {0}
    # Each response of a candidate pair was scored once, in one call; P3's were not scored at all.
    assert [sorted(s) for s in ScriptedEnsemble.scored] == [["a1", "a2", "a3", "b1", "b2"]]
    # All 4 candidates in score order; the a1-a3 pair, on which the heads agree, comes last.
    everything = query(tmp_path, samples, reward_model=str(ensemble), num_queries=10, max_per_prompt=0)
    assert [r["acquisition"] for r in everything] == pytest.approx([0.25, 0.25, B_DISAGREEMENT, 0.0])
    assert everything[-1]["responses"] == ["a1", "a3"]


def test_select_respects_max_per_prompt_and_exclude(tmp_path, scripted):
    samples, ensemble = scripted
    one_each = query(tmp_path, samples, reward_model=str(ensemble), num_queries=2, max_per_prompt=1)
    assert [r["prompt"] for r in one_each] == ["P1?", "P2?"]
    assert one_each[0]["responses"] in (["a1", "a2"], ["a2", "a3"])
    assert one_each[1]["acquisition"] == pytest.approx(B_DISAGREEMENT)
    # a1-a2 is labelled already (responses in the other order): the next best after a2-a3 is b1-b2.
    labelled = tmp_path / "labelled.jsonl"
    save_comparisons(labelled, [Comparison("P1?", ["a2", "a1"], [1, 0], source="human:x")])
    picked = query(tmp_path, samples, reward_model=str(ensemble), num_queries=2, max_per_prompt=2, exclude=str(labelled))
    assert [r["responses"] for r in picked] == [["a2", "a3"], ["b1", "b2"]]
    # A K-way ranking labels each of its pairs: only b1-b2 and nothing of P1 is left.
    save_comparisons(labelled, [Comparison("P1?", ["a3", "a1", "a2"], [0, 1, 2])])
    picked = query(tmp_path, samples, reward_model=str(ensemble), num_queries=5, exclude=str(labelled))
    assert [r["responses"] for r in picked] == [["b1", "b2"]]


def test_select_bal_pm_weighs_bald_against_prompt_novelty(tmp_path, scripted, monkeypatch):
    """strategy=bal_pm: BALD of each pair, then diverse_pick with each prompt's mean response feature."""
    samples, ensemble = scripted
    features = {"a1": (0.0, 0.0), "a2": (2.0, 0.0), "a3": (1.0, 0.0), "b1": (0.0, 5.0), "b2": (0.0, 7.0), "x": (9.0, 9.0)}
    monkeypatch.setattr(
        ScriptedEnsemble,
        "features",
        lambda self, prompts, responses: torch.tensor([features[r] for r in responses]),
        raising=False,
    )
    # BALD by hand: a1-a2 and a2-a3 have P = (1/4, 3/4): H(1/2) - H(3/4) = 0.75 ln 3 - ln 2 = 0.1308; b1-b2 has
    # P = (sigmoid 2, 1/2); a1-a3 0.
    s2 = 1 / (1 + math.exp(-2))

    def entropy(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    b_bald = entropy((s2 + 0.5) / 2) - (entropy(s2) + entropy(0.5)) / 2
    alone = query(tmp_path, samples, reward_model=str(ensemble), strategy="bal_pm", beta=0.0, num_queries=10, max_per_prompt=0)
    assert [r["acquisition"] for r in alone] == pytest.approx(
        [0.75 * LN3 - math.log(2)] * 2 + [b_bald, 0.0], abs=1e-6
    )  # fp32 scores
    assert b_bald < 0.75 * LN3 - math.log(2)
    # P1 labelled already (its prompt feature, the mean of a1..a3, is (1, 0)): with beta 1 P2's pair, of lower
    # BALD, comes first; then P1's (distance 0 to a labelled prompt) -- only a2-a3 is left of them.
    labelled = tmp_path / "labelled.jsonl"
    save_comparisons(labelled, [Comparison("P1?", ["a2", "a1"], [1, 0])])
    picked = query(tmp_path, samples, reward_model=str(ensemble), strategy="bal_pm", num_queries=2, exclude=str(labelled))
    assert [r["responses"] for r in picked] == [["b1", "b2"], ["a2", "a3"]]
    # beta 0 with the same exclude: BALD alone, a2-a3 first
    picked = query(
        tmp_path, samples, reward_model=str(ensemble), strategy="bal_pm", beta=0.0, num_queries=2, exclude=str(labelled)
    )
    assert [r["responses"] for r in picked] == [["a2", "a3"], ["b1", "b2"]]
    # A labelled prompt not among the samples is scored for its feature: here it sits at P2's prompt feature
    # (b1, b2: mean (0, 6)), so P1 is the novel one.
    save_comparisons(labelled, [Comparison("P9?", ["b1", "b2"], [0, 1])])
    seen = {}
    real = active.diverse_pick

    def spy(uncertainty, prompt_features, labelled_features, **kw):
        seen.update(prompts=prompt_features, labelled=labelled_features)
        return real(uncertainty, prompt_features, labelled_features, **kw)

    monkeypatch.setattr(active, "diverse_pick", spy)
    picked = query(tmp_path, samples, reward_model=str(ensemble), strategy="bal_pm", num_queries=1, exclude=str(labelled))
    assert picked[0]["prompt"] == "P1?"
    # Prompt features are standardised by the samples' five responses (mean (0.6, 2.4), sample std (sqrt(3.2 / 4),
    # sqrt(45.2 / 4)), as the linear benchmark), and the outside prompt by the same: P9's equals P2's exactly.
    std = torch.tensor([math.sqrt(3.2 / 4), math.sqrt(45.2 / 4)], dtype=torch.float64)
    p1, p2 = (
        (torch.tensor([1.0, 0.0]) - torch.tensor([0.6, 2.4])) / std,
        (torch.tensor([0.0, 6.0]) - torch.tensor([0.6, 2.4])) / std,
    )
    rows = {tuple(r) for r in seen["prompts"].tolist()}
    assert len(rows) == 2 and all(any(torch.allclose(torch.tensor(r, dtype=torch.float64), p) for r in rows) for p in (p1, p2))
    assert seen["labelled"].shape == (1, 2) and torch.allclose(seen["labelled"][0], p2)


def test_select_refuses_bad_configs(tmp_path, scripted, monkeypatch):
    samples, ensemble = scripted
    with pytest.raises(ConfigError, match="strategy must be one of disagreement, uncertainty, bal_pm, random"):
        query(tmp_path, samples, reward_model=str(ensemble), strategy="max")
    with pytest.raises(ConfigError, match="needs `reward_model`"):
        query(tmp_path, samples)
    with pytest.raises(ConfigError, match="not a reward-model directory"):
        query(tmp_path, samples, reward_model=str(tmp_path))
    monkeypatch.setattr(ScriptedEnsemble, "__init__", lambda self, path, **kw: setattr(self, "num_members", 1))
    with pytest.raises(ConfigError, match="needs a reward-model ensemble.*use strategy=uncertainty"):
        query(tmp_path, samples, reward_model=str(ensemble))
    with pytest.raises(ConfigError, match="strategy=bal_pm needs a reward-model ensemble"):
        query(tmp_path, samples, reward_model=str(ensemble), strategy="bal_pm")


def test_random_is_seeded_reproducible_and_nested(tmp_path):
    samples = write_jsonl(
        tmp_path / "samples.jsonl", [{"prompt": f"Q{i}?", "responses": [f"x{i}", f"y{i}", f"z{i}"]} for i in range(10)]
    )
    first = query(tmp_path, samples, "r1.jsonl", strategy="random", num_queries=6, seed=3)
    again = query(tmp_path, samples, "r2.jsonl", strategy="random", num_queries=6, seed=3)
    other = query(tmp_path, samples, "r3.jsonl", strategy="random", num_queries=6, seed=4)
    fewer = query(tmp_path, samples, "r4.jsonl", strategy="random", num_queries=4, seed=3)
    assert first == again and first != other
    assert fewer == first[:4]  # a smaller budget takes the first pairs of a larger one
    # max_per_prompt=2 (the default) holds; 30 candidates, none repeated.
    capped = query(tmp_path, samples, "r5.jsonl", strategy="random", num_queries=100, seed=3)
    assert len(capped) == 20 and max(sum(r["prompt"] == f"Q{i}?" for r in capped) for i in range(10)) == 2
    everything = query(tmp_path, samples, "r6.jsonl", strategy="random", num_queries=100, max_per_prompt=0)
    assert len({(r["prompt"], *r["responses"]) for r in everything}) == 30


# ----------------------------------------------------------------------------- the output flows into labelling


def test_queries_are_labelled_by_the_label_stage_and_read_by_the_annotation_app(tmp_path, tokenizer):
    """A real one-head tiny reward model picks pairs by uncertainty; the simulated annotator labels exactly them."""
    rm_dir = tmp_path / "rm"
    rm_tokenizer = reward_tokenizer(models.TINY)
    model = load_reward_backbone(models.TINY, pad_token_id=rm_tokenizer.pad_token_id, head_init="normal", seed=1)
    models.save_pretrained(model, rm_tokenizer, rm_dir)
    responses = ["Hi.", "Hello there, friend!", "Greetings to you and yours, my good friend."]
    samples = write_jsonl(
        tmp_path / "samples.jsonl",
        [{"prompt": [{"role": "user", "content": f"Greet person {i}."}], "responses": responses} for i in range(4)],
    )
    picked = query(tmp_path, samples, reward_model=str(rm_dir), strategy="uncertainty", num_queries=6, precision="fp32")
    assert len(picked) == 6
    # The scores it ranked by are 1 - |2 sigmoid(r_a - r_b) - 1| of the model's own raw scores.
    rm = RewardModel(rm_dir, precision="fp32")
    for r in picked:
        score_a, score_b = rm.raw([r["prompt"]] * 2, r["responses"]).tolist()
        p = 1 / (1 + math.exp(-(score_a - score_b)))
        assert r["acquisition"] == pytest.approx(1 - abs(2 * p - 1), abs=1e-5)
    assert [r["acquisition"] for r in picked] == sorted((r["acquisition"] for r in picked), reverse=True)

    labels = label_run(
        LabelConfig(samples=str(tmp_path / "q.jsonl"), output=str(tmp_path / "labels.jsonl"), scorer="length", temperature=0)
    )
    assert [(c.prompt, c.responses) for c in labels] == [(r["prompt"], r["responses"]) for r in picked]
    assert all(c.chosen == max(c.responses, key=lambda r: len(r.split())) for c in labels)  # the longer one wins
    pairs, empty = read_pairs(tmp_path / "q.jsonl")  # what `rlhfkit annotate serve` loads
    assert empty == 0 and [p.responses for p in pairs] == [tuple(r["responses"]) for r in picked]
    # Labelled pairs are excluded next time: the other 6 of the 4 x 3 candidates remain.
    rest = query(tmp_path, samples, "next.jsonl", strategy="random", num_queries=12, exclude=str(tmp_path / "labels.jsonl"))
    keys = {active.pair_key(r["prompt"], *r["responses"]) for r in rest}
    assert len(keys) == 6 and not keys & {active.pair_key(c.prompt, *c.responses) for c in labels}


def test_query_is_a_cli_stage(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"Q{i}?", "responses": [f"x{i}", f"y{i}"]} for i in range(3)])
    out = tmp_path / "q.jsonl"
    assert cli.main(["query", f"samples={samples}", "strategy=random", "num_queries=2", f"output={out}"]) == 0
    assert len(read_jsonl(out)) == 2


# ----------------------------------------------------------------------------- votes -> soft label -> cDPO


def test_multi_annotator_soft_label_reaches_conservative_dpo(tokenizer, monkeypatch):
    """Two votes, "A slightly better" (P 0.7) and "A better" (P 0.9), give target 0.8 (grades.pair_targets, as the
    annotation export writes it); DPO's loss mixes it with label_smoothing eps as cDPO's P = p (1 - eps) + (1 - p) eps.
    (The same soft label in the Bradley-Terry reward loss: tests/test_annotate_grades.py.)"""
    target, margin = pair_targets([("a", "slightly_better"), ("a", "better")], chosen=0, tie=False)
    assert (target, margin) == (0.8, 0.375)
    labelled = Comparison("Greet me.", ["Hello!", "Go away."], [0, 1], meta={"target": target, "margin": margin})
    pairs, _ = tokenize_pairs(tokenizer, [labelled], max_length=64)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["target"].tolist() == pytest.approx([0.8])
    # Policy log-probs -1 (chosen), -3 (rejected); reference -2, -2: h = 1 - (-1) = 2, beta h = 1.
    monkeypatch.setattr(
        "rlhfkit.modeling.forward.sequence_logps", lambda model, batch: (torch.tensor([-1.0, -3.0]), torch.tensor([4, 4]))
    )
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, _ = dpo.DPOTask(dpo.DPOConfig(beta=0.5, label_smoothing=0.1)).loss(None, batch)
    # P(chosen) = 0.8 x 0.9 + 0.2 x 0.1 = 0.74: -(0.74 ln sigmoid(1) + 0.26 ln sigmoid(-1)).
    assert loss.item() == pytest.approx(0.74 * math.log(1 + math.exp(-1)) + 0.26 * math.log(1 + math.e), rel=1e-6)
    # A hard label (target 1) with the same eps is plain cDPO: 0.9 ln(1 + e^-1) + 0.1 ln(1 + e).
    batch["target"] = torch.tensor([1.0])
    loss, _ = dpo.DPOTask(dpo.DPOConfig(beta=0.5, label_smoothing=0.1)).loss(None, batch)
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e), rel=1e-6)


# ----------------------------------------------------------------------------- the benchmark, on the tiny model

POLITE = ["Sure, happy to help: {}", "Of course! {} Have a lovely day.", "Great question. {}"]
RUDE = ["{} Obviously.", "Ugh. {}", "{} Stop asking."]


def polite_rude_samples(path: Path, count: int, offset: int) -> Path:
    """Samples of ``count`` prompts, each with two polite and one rude response (the demo rubric prefers polite)."""
    rows = []
    for i in range(offset, offset + count):
        answer = f"The answer is {i}."
        rows.append(
            {
                "prompt": f"Question number {i}?",
                "responses": [POLITE[i % 3].format(answer), RUDE[i % 3].format(answer), POLITE[(i + 1) % 3].format(answer)],
            }
        )
    return write_jsonl(path, rows)


def _benchmark_module(name: str = "active_querying"):
    """A script of benchmarks/ as a module (they import each other by name, so the folder is on the path meanwhile)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _labelled_pool(tmp_path: Path) -> Path:
    """8 pool prompts and 3 held-out ones of 3 responses each, every pair labelled by the simulated annotator (as
    the script's docstring says to): ``pool.jsonl`` and ``heldout.jsonl``; returns the pool's samples file."""
    samples = polite_rude_samples(tmp_path / "samples.jsonl", 8, 0)
    heldout_samples = polite_rude_samples(tmp_path / "heldout_samples.jsonl", 3, 100)
    # Every pair of the pool, labelled by the simulated annotator (as the script's docstring says to).
    for source, name in ((samples, "pool"), (heldout_samples, "heldout")):
        pool = active.select(
            active.QueryConfig(
                samples=str(source),
                strategy="random",
                num_queries=10**6,
                max_per_prompt=0,
                output=str(tmp_path / f"{name}.q.jsonl"),
            )
        )
        label_run(LabelConfig(samples=str(pool), output=str(tmp_path / f"{name}.jsonl"), scorer="demo", temperature=0))
    return samples


def test_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path, capsys):
    active_querying = _benchmark_module()
    samples = _labelled_pool(tmp_path)
    out = tmp_path / "bench"
    argv = [
        *("--model", models.TINY, "--samples", str(samples), "--labels", str(tmp_path / "pool.jsonl")),
        *("--heldout", str(tmp_path / "heldout.jsonl"), "--budgets", "8,6", "--initial", "4", "--ensemble-size", "2"),
        *("--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--max-length", "48", "--precision", "fp32"),
        *("--seeds", "0", "--output-dir", str(out)),
    ]
    capsys.readouterr()  # what labelling printed
    results = active_querying.main(argv)
    printed = capsys.readouterr().out
    assert printed.startswith("command: ") and "--budgets 8,6" in printed.splitlines()[0]
    runs = results["runs"]
    assert sorted((r["arm"], r["budget"], r["seed"]) for r in runs) == sorted(
        (arm, n, s) for arm in ("random", "active") for n in (6, 8) for s in (0,)
    )
    strict = sum(not c.tie for c in load_comparisons(tmp_path / "heldout.jsonl"))  # held-out ties are left out
    assert strict >= 6 and all(r["pairs"] == r["budget"] and r["heldout_pairs"] == strict for r in runs)
    assert all(r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] for r in runs)
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    assert set(results["active_minus_random"]) == {"6", "8"} and "active - random accuracy" in printed
    # Pair by pair on the same held-out pairs: the mean difference is the two accuracies' difference, exactly.
    accuracy = {(r["arm"], r["budget"]): r["accuracy"] for r in runs}
    assert set(results["paired"]) == {f"active_{a}_minus_random_{b}_seed0" for a, b in ((6, 6), (6, 8), (8, 8))}
    for (a, b), d in zip(
        ((6, 6), (6, 8), (8, 8)), (results["paired"][f"active_{a}_minus_random_{b}_seed0"] for a, b in ((6, 6), (6, 8), (8, 8)))
    ):
        assert d["value"] == pytest.approx(accuracy[("active", a)] - accuracy[("random", b)], abs=1e-12)
        assert d["n"] == strict and d["ci"][0] <= d["value"] <= d["ci"][1]
    assert "seed 0: active N=6 - random N=8: " in printed
    # The active arm trained on the 4 initial random pairs plus the ensemble's picks, none of them initial ones.
    seed0 = out / "seed0"
    initial = [c.responses for c in load_comparisons(seed0 / "initial.jsonl")]
    assert initial == [c.responses for c in load_comparisons(seed0 / "random_8.jsonl")][:4]
    active_train = [c.responses for c in load_comparisons(seed0 / "active_8.jsonl")]
    assert active_train[:4] == initial and not {tuple(r) for r in active_train[4:]} & {tuple(r) for r in initial}
    picks = read_jsonl(seed0 / "active_queries_8.jsonl")
    assert len(picks) == 4 and all(r["acquisition"] >= 0 for r in picks)


def _sequential_argv(tmp_path: Path, samples: Path, out: Path) -> list[str]:
    """The benchmark on the tiny model: budgets 6 and 8 from 4 initial pairs, sequential rounds, 2 separate members."""
    return [
        *("--model", models.TINY, "--samples", str(samples), "--labels", str(tmp_path / "pool.jsonl")),
        *("--heldout", str(tmp_path / "heldout.jsonl"), "--budgets", "6,8", "--initial", "4", "--ensemble-size", "2"),
        *("--ensemble-backbones", "separate", "--sequential", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3"),
        *("--max-length", "48", "--precision", "fp32", "--seeds", "0", "--output-dir", str(out)),
    ]


def test_benchmark_sequential_rounds_with_separate_members(tmp_path, capsys):
    """``--sequential --ensemble-backbones separate``: budget 8's new pairs add to budget 6's active pairs (none
    picked twice), chosen by an ensemble of 2 separate reward models trained on those 6."""
    active_querying = _benchmark_module()
    samples = _labelled_pool(tmp_path)
    out = tmp_path / "bench"
    argv = _sequential_argv(tmp_path, samples, out)
    results = active_querying.main(argv)
    capsys.readouterr()
    assert sorted((r["arm"], r["budget"]) for r in results["runs"]) == [
        ("active", 6),
        ("active", 8),
        ("random", 6),
        ("random", 8),
    ]
    seed0 = out / "seed0"
    first = [c.responses for c in load_comparisons(seed0 / "active_6.jsonl")]
    second = [c.responses for c in load_comparisons(seed0 / "active_8.jsonl")]
    assert len(first) == 6 and len(second) == 8 and second[:6] == first
    assert not {tuple(r) for r in second[6:]} & {tuple(r) for r in first}
    assert len(read_jsonl(seed0 / "active_queries_8.jsonl")) == 2
    for ensemble in (seed0 / "ensemble", seed0 / "ensemble_6"):  # round 1's and round 2's queriers: 2 models each
        assert json.loads((ensemble / "config.json").read_text())["rlhfkit_ensemble_members"] == ["members/1"]
    assert not (seed0 / "ensemble_8").exists()  # no round after the last budget


def test_benchmark_reuse_trains_only_the_new_random_budget(tmp_path, capsys):
    """Rerun with ``--random-budgets 7 --reuse``: every finished model trained on the same pairs is kept (its
    accuracy unchanged), only the random arm at N = 7 trains, on the first 7 pairs of the same random order, and the
    paired comparisons now include active N = 6 against random N = 7. A model whose save is unfinished (a file its
    completion marker lists is gone) trains again."""
    active_querying = _benchmark_module()
    samples = _labelled_pool(tmp_path)
    out = tmp_path / "bench"
    argv = _sequential_argv(tmp_path, samples, out)
    first = active_querying.main(argv)
    capsys.readouterr()
    (out / "seed0" / "random_8" / "model.safetensors").unlink()
    second = active_querying.main([*argv, "--random-budgets", "7", "--reuse"])
    printed = capsys.readouterr().out
    reused = {line.split()[1] for line in printed.splitlines() if line.startswith("reuse: ")}
    seed0 = out / "seed0"
    assert reused == {str(seed0 / d) for d in ("ensemble", "ensemble_6", "random_6", "active_6", "active_8")}
    accuracy = {(r["arm"], r["budget"]): r["accuracy"] for r in second["runs"]}
    assert {(r["arm"], r["budget"]): r["accuracy"] for r in first["runs"]} == {
        k: v for k, v in accuracy.items() if k != ("random", 7)
    }
    random_7 = [c.responses for c in load_comparisons(seed0 / "random_7.jsonl")]
    assert random_7 == [c.responses for c in load_comparisons(seed0 / "random_8.jsonl")][:7]
    assert ("random", 7) in accuracy and ("active", 7) not in accuracy
    d = second["paired"]["active_6_minus_random_7_seed0"]
    assert d["value"] == pytest.approx(accuracy[("active", 6)] - accuracy[("random", 7)], abs=1e-12)
    assert "random N=7 (mean accuracy" in printed


# ----------------------------------------------------------------------------- the linear-head benchmark


def _linear_module():
    return _benchmark_module("active_querying_linear")


def test_linear_fit_is_the_penalised_bradley_terry_minimum():
    """One pair, one feature, difference 1, target 1, l2 = 0.5: the minimum of ln(1 + e^-w) + w^2 / 4 solves
    sigmoid(-w) = w / 2 (found here by bisection). Two heads with bootstrap counts (1, 0) and (0, 1) on two pairs fit
    each pair alone; a tie (target 1/2) has its minimum at w = 0."""
    linear = _linear_module()
    low, high = 0.0, 2.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if 1 / (1 + math.exp(mid)) > mid / 2 else (low, mid)
    w = linear.fit_heads(
        torch.tensor([[1.0]], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        0.5,
    )
    assert w.item() == pytest.approx(low, abs=1e-7)
    diffs = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    two = linear.fit_heads(diffs, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.eye(2, dtype=torch.float64), 0.5)
    alone = [
        linear.fit_heads(diffs[i : i + 1], torch.ones(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), 0.5)
        for i in (0, 1)
    ]
    assert two[0, 0].item() == pytest.approx(alone[0].item(), abs=1e-6) and two[0, 1].item() == pytest.approx(
        alone[1].item(), abs=1e-6
    )
    assert two.shape == (1, 2)  # one feature, two heads
    tie = linear.fit_heads(
        torch.tensor([[3.0]], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        0.1,
    )
    assert tie.item() == pytest.approx(0.0, abs=1e-8)


def test_linear_features_are_what_the_reward_head_reads():
    """features @ w equals the raw score of the library's reward model whose (one) head has weights w."""
    linear = _linear_module()
    from rlhfkit.modeling.reward_model import load_reward_backbone, raw_scores, reward_tokenizer

    prompts = ["What is 2 + 2?", "What is 2 + 2?", "Name a colour."]
    responses = ["It is 4.", "Four, of course!", "Blue."]
    x = linear.features(models.TINY, prompts, responses, num_layers=-1, max_length=64, batch_size=2, precision="fp32")
    tokenizer = reward_tokenizer(models.TINY)
    model = load_reward_backbone(models.TINY, pad_token_id=tokenizer.pad_token_id, head_init="normal", seed=3)
    expected = raw_scores(model, tokenizer, prompts, responses, batch_size=2, max_length=64, precision="fp32")
    weight = model.get_submodule("score").weight.detach().double()[0]
    assert x.shape == (3, model.config.hidden_size)
    assert torch.allclose(x @ weight, expected.double(), atol=1e-5)


def test_linear_posterior_covariance_is_the_inverse_hessian_of_the_fit():
    """posterior_covariance = the inverse of n times the Hessian of fit_heads' objective at its minimum (autograd)."""
    linear = _linear_module()
    gen = torch.Generator().manual_seed(0)
    diffs = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    targets = torch.tensor([1, 0, 1, 1, 0.5, 0, 1], dtype=torch.float64)
    w = linear.fit_heads(diffs, targets, torch.ones(7, 1, dtype=torch.float64), 0.3)[:, 0]

    def objective(v):
        margin = diffs @ v
        return (
            -(targets * torch.nn.functional.logsigmoid(margin) + (1 - targets) * torch.nn.functional.logsigmoid(-margin))
        ).mean() + 0.15 * (v @ v)

    hessian = torch.autograd.functional.hessian(objective, w)
    assert torch.allclose(linear.posterior_covariance(diffs, w, 0.3), torch.linalg.inv(7 * hessian), atol=1e-10)


def _laplace_reference(candidates, w, precision, targets, rule, num, tiebreak, groups, cap):
    """greedy_laplace_picks the slow way: each step inverts the precision with the picks so far added, and scores
    every candidate by its definition (the log-determinant growth; the summed drop in the targets' variance of P)."""
    p = torch.sigmoid(candidates @ w)
    fisher = p * (1 - p)
    pt = torch.sigmoid(targets @ w)
    chosen, per_group = [], {}
    while len(chosen) < num:
        best = None
        cov = torch.linalg.inv(precision)
        before = torch.einsum("td,de,te->t", targets, cov, targets)
        for k in range(len(candidates)):
            if k in chosen or (cap and per_group.get(groups[k], 0) >= cap):
                continue
            added = precision + fisher[k] * torch.outer(candidates[k], candidates[k])
            if rule == "d_optimal":
                score = float(torch.logdet(added) - torch.logdet(precision))
            else:
                after = torch.einsum("td,de,te->t", targets, torch.linalg.inv(added), targets)
                score = float(((pt * (1 - pt)) ** 2 * (before - after)).sum())
            if best is None or score > best[0] + 1e-9 or (abs(score - best[0]) <= 1e-9 and tiebreak[k] > tiebreak[best[1]]):
                best = (score, k)
        if best is None:
            break
        k = best[1]
        chosen.append(k)
        per_group[groups[k]] = per_group.get(groups[k], 0) + 1
        precision = precision + fisher[k] * torch.outer(candidates[k], candidates[k])
    return chosen


@pytest.mark.parametrize("rule", ["d_optimal", "variance_reduction"])
def test_linear_laplace_picks_match_a_slow_reference(rule):
    """Greedy batches with rank-one updates equal the picks of the slow reference, with and without a per-prompt cap;
    the candidates running out gives a shorter batch."""
    linear = _linear_module()
    gen = torch.Generator().manual_seed(1)
    candidates = torch.randn(12, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    targets = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([0.5, -0.3, 1.0], dtype=torch.float64)
    precision = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 1.0]], dtype=torch.float64)
    tiebreak = torch.rand(12, generator=gen).tolist()
    groups = [f"p{i % 4}" for i in range(12)]
    for cap, num in ((0, 6), (1, 4), (2, 8)):
        fast = linear.greedy_laplace_picks(
            candidates,
            w,
            torch.linalg.inv(precision),
            targets,
            rule,
            num=num,
            tiebreak=tiebreak,
            groups=groups,
            max_per_group=cap,
        )
        assert fast == _laplace_reference(candidates, w, precision, targets, rule, num, tiebreak, groups, cap)
        assert len(set(fast)) == len(fast) == num
    few = linear.greedy_laplace_picks(
        candidates, w, torch.linalg.inv(precision), targets, rule, num=6, tiebreak=tiebreak, groups=groups, max_per_group=1
    )
    assert len(few) == 4 and len({groups[k] for k in few}) == 4  # one a prompt, 4 prompts
    # Two copies of one candidate: the first is picked by its tiebreak, and the copy scores less after the update.
    twice = torch.cat([candidates[:1], candidates[:1]])
    first = linear.greedy_laplace_picks(
        twice, w, torch.linalg.inv(precision), targets, rule, num=1, tiebreak=[0.2, 0.9], groups=["a", "b"], max_per_group=0
    )
    assert first == [1]
    with pytest.raises(ValueError, match="rule must be"):
        linear.greedy_laplace_picks(
            candidates, w, precision, targets, "bald", num=1, tiebreak=tiebreak, groups=groups, max_per_group=0
        )


def test_linear_lure_weights_by_hand():
    linear = _linear_module()
    # N = 4, M = 2, each drawn with probability 1/2: v_1 = 1 + (2/3)(1/(4 * 1/2) - 1) = 2/3, v_2 = 1 + (2/2)(1/(3 * 1/2) - 1) = 2/3
    assert linear.lure_weights([0.5, 0.5], 4) == pytest.approx([2 / 3, 2 / 3], abs=1e-15)
    # drawn uniformly (1/4, then 1/3 of the rest): weight 1, whatever M
    assert linear.lure_weights([1 / 4, 1 / 3, 1 / 2], 4) == pytest.approx([1.0, 1.0, 1.0], abs=1e-15)
    # a rare draw counts more, a likely one less: N = 3, M = 1, q = 1/6 -> 1 + (2/2)(2 - 1) = 2; q = 2/3 -> 1/2
    assert linear.lure_weights([1 / 6], 3) == pytest.approx([2.0]) and linear.lure_weights([2 / 3], 3) == pytest.approx([0.5])
    # the whole pool drawn: the last draw's q is 1 and (N - M) / (N - m) = 0/0 -> weight 1, not NaN
    assert linear.lure_weights([0.9, 1.0], 2) == pytest.approx([1 + 0 * (1 / (2 * 0.9) - 1), 1.0])
    with pytest.raises(ValueError, match="3 draws from a pool of 2"):
        linear.lure_weights([0.5, 0.5, 1.0], 2)


def test_linear_lure_weights_make_an_adaptive_draw_unbiased():
    """Every ordered draw of M = 3 from N = 5 pairs, each draw's proposal depending on the draws before it (and
    mixing in the uniform): the LURE-weighted mean loss averages, over the draws' probabilities, to the pool's mean
    loss exactly, while the plain mean of the drawn losses does not."""
    linear = _linear_module()
    losses = np.array([0.3, 2.0, 0.1, 1.2, 0.7])
    size, draws = len(losses), 3

    def proposal(drawn: tuple[int, ...]) -> np.ndarray:
        score = np.array([1.0, 4.0, 0.5, 2.0, 3.0]) * (1 + np.arange(size) * len(drawn))  # changes with the draws
        score[list(drawn)] = 0.0
        q = 0.7 * score / score.sum() + 0.3 * (score > 0) / (size - len(drawn))
        return q / q.sum()

    expected_weighted = expected_plain = total = 0.0
    for first in range(size):
        for second in range(size):
            for third in range(size):
                sequence = (first, second, third)
                if len(set(sequence)) < draws:
                    continue
                qs = [proposal(sequence[:m])[sequence[m]] for m in range(draws)]
                probability = float(np.prod(qs))
                weights = linear.lure_weights(qs, size)
                expected_weighted += probability * float(weights @ losses[list(sequence)]) / draws
                expected_plain += probability * float(losses[list(sequence)].mean())
                total += probability
    assert total == pytest.approx(1.0, abs=1e-12)
    assert expected_weighted == pytest.approx(losses.mean(), abs=1e-12)
    assert abs(expected_plain - losses.mean()) > 0.05  # the draw favours high scores: unweighted, it is biased


def test_linear_importance_picks_draw_from_the_stated_proposal():
    linear = _linear_module()
    gen = torch.Generator().manual_seed(5)
    candidates = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64)
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64)
    groups = ["p0", "p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]
    p = torch.sigmoid(candidates @ w)
    score = torch.sqrt(p * (1 - p) * torch.einsum("cd,de,ce->c", candidates, cov, candidates)).numpy()

    def reference_q(open_: np.ndarray, mix: float) -> np.ndarray:
        a = np.where(open_, score, 0.0)
        return (1 - mix) * a / a.sum() + mix * open_ / open_.sum()

    for mix, cap in [(0.5, 0), (0.3, 2), (1.0, 0)]:
        picked, probabilities = linear.importance_picks(
            candidates, w, cov, num=5, rng=np.random.default_rng(11), mix=mix, groups=groups, max_per_group=cap
        )
        assert len(set(picked)) == len(picked) == 5
        if cap:
            assert max(sum(groups[k] == g for k in picked) for g in set(groups)) <= cap
        open_ = np.ones(9, dtype=bool)  # replay: each probability is the proposal over the pairs still open
        for k, q in zip(picked, probabilities, strict=True):
            assert open_[k] and q == pytest.approx(reference_q(open_, mix)[k], rel=1e-12)
            open_[k] = False
            if cap and sum(groups[j] == groups[k] for j in picked[: picked.index(k) + 1]) >= cap:
                open_ &= np.array([g != groups[k] for g in groups])
        if mix == 1.0:  # all uniform
            assert probabilities == pytest.approx([1 / 9, 1 / 8, 1 / 7, 1 / 6, 1 / 5])
    # The first draw's frequencies follow the proposal (4,000 draws; 5 standard errors)
    first = (
        np.bincount(
            [
                linear.importance_picks(
                    candidates, w, cov, num=1, rng=np.random.default_rng(s), mix=0.5, groups=groups, max_per_group=0
                )[0][0]
                for s in range(4000)
            ],
            minlength=9,
        )
        / 4000
    )
    q = reference_q(np.ones(9, dtype=bool), 0.5)
    assert np.all(np.abs(first - q) < 5 * np.sqrt(q * (1 - q) / 4000))
    # Fewer than asked when the candidates run out under the cap
    few, _ = linear.importance_picks(
        candidates, w, cov, num=8, rng=np.random.default_rng(0), mix=0.5, groups=groups, max_per_group=1
    )
    assert len(few) == 4 and len({groups[k] for k in few}) == 4


def test_linear_unbiased_variance_ratio_by_hand_and_by_simulation():
    linear = _linear_module()
    one = torch.ones(1, 1, dtype=torch.float64)
    diffs, w, held = torch.tensor([[1.0], [3.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), one
    # w = 0: p = 1/2, every E(y - p)^2 = 1/4, so g_i ∝ |d_i| and the ratio is (mean |d|)^2 / mean d^2 = 2^2 / 5
    assert linear.unbiased_variance_ratio(diffs, w, 2 * one, held) == pytest.approx(0.8, abs=1e-12)
    # labels known to be 1 and 0: E(y - p)^2 still 1/4, so mean g = sqrt(A) and mean g^2 = 5A/4 (A the metric);
    # m = ((1/2) 1 - (1/2) 3) / 2 = -1/2, |m|_A^2 = A/4: ((mean g)^2 - A/4) / (mean g^2 - A/4) = (3A/4) / A = 3/4
    oracle = linear.unbiased_variance_ratio(diffs, w, 2 * one, held, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert oracle == pytest.approx(0.75, abs=1e-12)
    # Simulated: n draws with replacement, labels y ~ Bernoulli(P), the importance-weighted mean gradient's squared
    # A-error with the best proposal over that with the uniform draw (20,000 repeats each) matches the formula.
    gen = torch.Generator().manual_seed(3)
    size, dim, n, repeats = 40, 3, 10, 20_000
    diffs = (
        torch.randn(size, dim, generator=gen, dtype=torch.float64) * torch.rand(size, 1, generator=gen, dtype=torch.float64) * 3
    )
    w = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    truth = torch.rand(size, generator=gen, dtype=torch.float64)
    held = torch.randn(25, dim, generator=gen, dtype=torch.float64)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 0.2 * torch.eye(dim, dtype=torch.float64)
    expected = linear.unbiased_variance_ratio(diffs, w, cov, held, truth)
    p = torch.sigmoid(diffs @ w).numpy()
    s_t = torch.sigmoid(held @ w).numpy()
    metric = cov.numpy() @ ((held.numpy().T * (s_t * (1 - s_t)) ** 2) @ held.numpy() / 25) @ cov.numpy()
    x, P = diffs.numpy(), truth.numpy()
    m = ((P - p)[:, None] * x).mean(0)
    g = np.sqrt((P * (1 - p) ** 2 + (1 - P) * p**2) * np.einsum("id,de,ie->i", x, metric, x))
    rng = np.random.default_rng(0)

    def mse(q: np.ndarray) -> float:
        rows = rng.choice(size, size=(repeats, n), p=q)
        y = rng.random((repeats, n)) < P[rows]
        u = (y - p[rows])[..., None] * x[rows] / (size * q[rows])[..., None]
        error = u.mean(1) - m
        return float(np.einsum("rd,de,re->r", error, metric, error).mean())

    simulated = mse(g / g.sum()) / mse(np.full(size, 1 / size))
    assert expected < 0.9 and simulated == pytest.approx(expected, rel=0.05)


def test_linear_random_budget_reaching_by_hand():
    linear = _linear_module()
    curve, budgets = np.array([0.60, 0.64, 0.70]), [100, 200, 400]
    assert linear.random_budget_reaching(curve, budgets, 0.62) == pytest.approx(150.0)  # halfway from 0.60 to 0.64
    assert linear.random_budget_reaching(curve, budgets, 0.67) == pytest.approx(300.0)
    assert linear.random_budget_reaching(curve, budgets, 0.55) == 100.0  # reached at the first budget (a bound)
    assert linear.random_budget_reaching(curve, budgets, 0.71) == math.inf


def test_linear_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path, capsys):
    linear = _linear_module()
    samples = _labelled_pool(tmp_path)
    out = tmp_path / "linear"
    argv = [
        *("--model", models.TINY, "--samples", str(samples), "--labels", str(tmp_path / "pool.jsonl")),
        *("--heldout", str(tmp_path / "heldout.jsonl"), "--budgets", "6,10", "--initial", "4", "--round-size", "2"),
        *("--ensemble-size", "3", "--seeds", "0-2", "--max-per-prompt", "0", "--max-length", "48", "--output-dir", str(out)),
        *("--strategies", "disagreement,uncertainty,d_optimal,variance_reduction,importance,bal_pm", "--targets", "5"),
    ]
    capsys.readouterr()
    results = linear.main(argv)
    printed = capsys.readouterr().out
    assert printed.startswith("command: ") and results["seeds"] == [0, 1, 2]
    strict = sum(not c.tie for c in load_comparisons(tmp_path / "heldout.jsonl"))
    assert results["heldout_pairs"] == strict >= 6
    arms = ("disagreement", "uncertainty", "d_optimal", "variance_reduction", "importance", "bal_pm")
    assert set(results["accuracy"]) == {f"{arm}_{n}" for arm in ("random", *arms) for n in (6, 10)}
    for arm in arms:
        for n in (6, 10):
            a, r, d = results["accuracy"][f"{arm}_{n}"], results["accuracy"][f"random_{n}"], results["minus_random"][f"{arm}_{n}"]
            assert d["value"] == pytest.approx(a["value"] - r["value"], abs=1e-12) and d["n"] == 3
            assert a["ci"][0] <= a["value"] <= a["ci"][1] and d["ci"][0] <= d["value"] <= d["ci"][1]
        assert [s["budget"] for s in results["labels_saved"][arm]] == [6, 10]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    # The importance arm reports what the best unbiased proposal could save: the pool's labels are the simulated
    # annotator's (each records its probability), so the oracle's ratio is there too; both lie in (0, 1]
    ratios = results["unbiased_variance_ratio"]
    assert set(ratios) == {"6", "10"} and all(set(r) == {"model", "oracle"} for r in ratios.values())
    assert all(0 < v["min"] <= v["mean"] <= v["max"] <= 1 + 1e-12 for r in ratios.values() for v in r.values())
    # Each arm's picks: 10 distinct pool pairs a seed; every arm starts from the same 4 random pairs; random's are the
    # first 10 of select()'s random draw (seed 1, no cap), in the same order.
    drawn = read_jsonl(
        active.select(
            active.QueryConfig(
                samples=str(samples),
                strategy="random",
                num_queries=10,
                max_per_prompt=0,
                seed=1,
                output=str(tmp_path / "q1.jsonl"),
            )
        )
    )
    pool = active.candidates(load_items(samples))
    for by_arm in results["picks"].values():
        assert all(len(set(p)) == len(p) == 10 for p in by_arm.values())
        assert all(picked[:4] == by_arm["random"][:4] for picked in by_arm.values()) and len(by_arm) == 7
    assert [[pool[i].sample_index, [pool[i].first, pool[i].second]] for i in results["picks"]["1"]["random"]] == [
        [r["sample_index"], r["response_indices"]] for r in drawn
    ]
    # The features were computed once: a rerun reads them all from the cache.
    linear.main(argv)
    first_run = re.search(r"features: (\d+) of (\d+) from", printed)
    assert first_run and first_run.group(1) == "0"  # nothing cached at first
    rerun = re.search(r"features: (\d+) of (\d+) from", capsys.readouterr().out)
    assert rerun and rerun.group(1) == rerun.group(2) == first_run.group(2)  # every text read from the cache


def test_linear_ensemble_best_of_n_on_the_tiny_model(tmp_path, capsys):
    """The ensemble best-of-n script: at n = 1 every ranker picks each prompt's first sample, so every ranker's gold
    is the gold scorer's mean over the first samples and every difference is exactly 0; at n = 2 each difference is
    the two rankers' gold difference."""
    ensemble_best_of_n_linear = _benchmark_module("ensemble_best_of_n_linear")
    from rlhfkit.rewards import load_reward

    samples = _labelled_pool(tmp_path)
    bon = polite_rude_samples(tmp_path / "bon.jsonl", 4, 200)
    argv = [
        *("--model", models.TINY, "--samples", str(samples), "--labels", str(tmp_path / "pool.jsonl"), "--bon", str(bon)),
        *("--train-pairs", "6,10", "--ensemble-size", "3", "--seeds", "0-2", "--max-per-prompt", "0", "--max-length", "48"),
        *("--output-dir", str(tmp_path / "bon_out"), "--features-dir", str(tmp_path / "features")),
    ]
    capsys.readouterr()
    results = ensemble_best_of_n_linear.main(argv)
    printed = capsys.readouterr().out
    assert results["n"] == [1, 2] and results["prompts"] == 4
    rows = read_jsonl(bon)
    first_gold = load_reward("demo")([r["prompt"] for r in rows], [r["responses"][0] for r in rows])
    for size in ("6", "10"):
        at1, at2 = results["by_train_pairs"][size]["1"], results["by_train_pairs"][size]["2"]
        for name in ("member_0", "members", "all_pairs", "mean", "wco", "uwo"):
            assert at1[name]["gold"]["value"] == pytest.approx(sum(first_gold) / 4, abs=1e-12)
        for name in ("mean", "wco", "uwo"):
            assert at1[name]["minus_member_0"]["value"] == 0.0 and at1[name]["minus_member_0"]["ci"] == [0.0, 0.0]
            for other in ("member_0", "members", "all_pairs"):
                d = at2[name][f"minus_{other}"]
                assert d["value"] == pytest.approx(at2[name]["gold"]["value"] - at2[other]["gold"]["value"], abs=1e-12)
                assert d["ci"][0] <= d["value"] + 1e-12 and d["value"] <= d["ci"][1] + 1e-12 and d["n"] == 3
        for name in ("member_0", "members", "all_pairs", "mean", "wco", "uwo"):  # the over-optimisation check
            d = at2[name]["minus_half"]
            assert d["value"] == pytest.approx(at2[name]["gold"]["value"] - at1[name]["gold"]["value"], abs=1e-12)
            assert d["ci"][0] <= d["value"] + 1e-12 and d["value"] <= d["ci"][1] + 1e-12 and "minus_half" not in at1[name]
    assert printed.count("    wco: 2: ") == 2 and "over-optimisation (gold at n minus gold at n/2" in printed
    assert printed.strip().splitlines()[-1].startswith("wco - member_0 at n=2 (10 pairs): ")
    assert len(list((tmp_path / "features").glob("features_*.pt"))) == 1 and not list((tmp_path / "bon_out").glob("features_*"))


def test_best_of_n_pools_join_files_prompt_by_prompt(tmp_path, capsys):
    """``--bon A,B``: each prompt of A keeps its responses and gains B's for the same prompt (matched by text, chat
    prompts too, whatever B's order); a prompt of A missing from B is left out, with a line saying so."""
    joined_items = _benchmark_module("ensemble_best_of_n_linear").joined_items
    chat = [{"role": "user", "content": "Hi?"}]
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "P0", "responses": ["a0", "a1"]},
            {"prompt": chat, "responses": ["c0", "c1"]},
            {"prompt": "P2", "responses": ["x", "y"]},
        ],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"prompt": chat, "responses": ["c2", "c3", "c4"]},
            {"prompt": "P9", "responses": ["z", "w"]},
            {"prompt": "P0", "responses": ["a2", "a3"]},
        ],
    )
    capsys.readouterr()
    assert joined_items([str(a), str(b)]) == [("P0", ["a0", "a1", "a2", "a3"]), (chat, ["c0", "c1", "c2", "c3", "c4"])]
    assert "--bon: 1 of 3 prompts are not in" in capsys.readouterr().out
    assert joined_items([str(a)]) == [("P0", ["a0", "a1"]), (chat, ["c0", "c1"]), ("P2", ["x", "y"])]
    only = write_jsonl(tmp_path / "only.jsonl", [{"prompt": "P9", "responses": ["z", "w"]}])
    with pytest.raises(SystemExit, match="no prompt is in every one of"):
        joined_items([str(a), str(only)])


def test_overoptimisation_verdict_needs_the_whole_interval_below_zero():
    line = _benchmark_module("ensemble_best_of_n_linear").overoptimisation_line
    rising = {"value": 0.02, "ci": [0.01, 0.03]}
    noisy_dip = {"value": -0.01, "ci": [-0.03, 0.001]}
    fall = {"value": -0.02, "ci": [-0.03, -0.005]}
    assert (
        line([(2, rising), (4, noisy_dip)])
        == "2: +0.0200 [+0.0100, +0.0300], 4: -0.0100 [-0.0300, +0.0010] -> no fall beyond noise"
    )
    assert line([(2, rising), (4, fall), (8, noisy_dip), (16, fall)]).endswith("-> falls at n = 4, 16")


def test_linear_benchmark_stops_when_every_heldout_pair_is_a_tie(tmp_path):
    linear = _linear_module()
    samples = _labelled_pool(tmp_path)
    ties = tmp_path / "ties.jsonl"
    save_comparisons(ties, [Comparison("Q?", ["a", "b"], [0, 1], tie=True), Comparison("R?", ["c", "d"], [0, 1], tie=True)])
    argv = [
        *("--model", models.TINY, "--samples", str(samples), "--labels", str(tmp_path / "pool.jsonl")),
        *("--heldout", str(ties), "--budgets", "6", "--initial", "4", "--output-dir", str(tmp_path / "out")),
    ]
    with pytest.raises(SystemExit, match=r"ties.jsonl: no held-out pair with a preference \(all 2 are ties\)"):
        linear.main(argv)
    assert not (tmp_path / "out").exists()  # stopped before computing anything
