"""rlhfkit eval: every player against the baseline, with intervals; best-of-n from one nested pool."""

from __future__ import annotations

import json
import math

import pytest

from rlhfkit import evaluate, stats


def _config(tmp_path, **kw):
    base = dict(
        policy="tiny",
        baseline="tiny",
        gold="length",
        max_prompts=6,
        max_new_tokens=6,
        batch_size=8,
        best_of_n=8,
        samples_per_prompt=2,
        precision="fp32",
        generation_precision="fp32",
        bootstrap=20,
        resamples=300,
        progress=False,
        output=str(tmp_path / "eval.json"),
    )
    base.update(kw)
    return evaluate.EvalConfig(**base)


def test_best_of_n_by_gold_never_loses_gold_as_n_doubles(tmp_path):
    """With the gold scorer as the ranker, the pick from the first 2n samples of a prompt scores at least the
    pick from its first n (the pool is nested); KL is the analytic log n - (n - 1) / n."""
    results = evaluate.run(_config(tmp_path))
    players = results["players"]
    assert set(players) == {"tiny", "tiny_2", "best_of_1", "best_of_2", "best_of_4", "best_of_8"}
    golds = [players[f"best_of_{n}"]["gold_score"] for n in (1, 2, 4, 8)]
    assert all(a <= b + 1e-12 for a, b in zip(golds, golds[1:]))
    for n in (1, 2, 4, 8):
        assert players[f"best_of_{n}"]["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert json.loads((tmp_path / "eval.json").read_text())["players"].keys() == players.keys()


def test_best_of_n_pool_on_the_first_prompts_only(tmp_path):
    """best_of_n_prompts=3 draws the pool for 3 of the 6 prompts: the best-of-n players are compared with
    the baseline on those 3 (num_prompts), and left out of the Elo table, which needs every prompt."""
    capped = evaluate.run(_config(tmp_path, best_of_n=4, best_of_n_prompts=3))
    assert [capped["players"][f"best_of_{n}"]["num_prompts"] for n in (1, 2, 4)] == [3, 3, 3]
    assert capped["num_prompts"] == 6
    rated = {row["player"] for row in capped["elo"]}
    assert not any(str(name).startswith("best_of") for name in rated)
    full = evaluate.run(_config(tmp_path / "full", best_of_n=2))
    assert full["players"]["best_of_2"]["num_prompts"] == 6


def test_players_get_distinct_names(tmp_path):
    results = evaluate.run(_config(tmp_path, best_of_n=0, extra_policies=["tiny"]))  # three players named tiny
    assert list(results["players"]) == ["tiny", "tiny_2", "tiny_3"]
    assert results["main_player"] == "tiny_2" and results["baseline_name"] == "tiny"


def test_policy_entry_matches_an_independent_recomputation(tmp_path):
    """The policy's win rate, gold and p-value equal stats' functions applied to the scores of the samples the
    run drew (re-drawn here with the same seeds)."""
    from rlhfkit.data.prompts import demo_data_path, load_prompts
    from rlhfkit.rewards import load_reward

    (tmp_path / "pol").mkdir()
    from rlhfkit.modeling import models

    model, tok = models.load_causal_lm("tiny"), models.load_tokenizer("tiny")
    models.save_pretrained(model, tok, tmp_path / "pol")
    cfg = _config(tmp_path, policy=str(tmp_path / "pol"), best_of_n=0)
    results = evaluate.run(cfg)
    entry = results["players"]["pol"]
    prompts = load_prompts(demo_data_path("prompts_eval.jsonl"))[:6]
    gold = load_reward("length")
    base, _, _ = evaluate._sample("tiny", prompts, cfg, "b", n=2)
    pol, _, _ = evaluate._sample(str(tmp_path / "pol"), prompts, cfg, "p", n=2, seed_offset=1)
    bg, pg = gold(base.prompts, base.responses), gold(pol.prompts, pol.responses)
    by = lambda xs: [xs[i : i + 2] for i in range(0, len(xs), 2)]  # noqa: E731
    wins = stats.win_fractions(by(pg), by(bg))
    assert entry["win_rate"] == pytest.approx(float(wins.mean()))
    diffs = [sum(p) / 2 - sum(b) / 2 for p, b in zip(by(pg), by(bg))]
    assert entry["gold_diff"] == pytest.approx(sum(diffs) / len(diffs))
    assert entry["p_value"] == pytest.approx(stats.sign_flip_p_value(diffs, seed=0))
    assert results["win_rate"] == entry["win_rate"] and results["win_rate_ci"] == entry["win_rate_ci"]
    # The verdict follows from the interval: better when it lies above 0.5, worse below, else not distinguishable.
    lo, hi = entry["win_rate_ci"]
    assert lo <= entry["win_rate"] <= hi
    word = "better than" if lo > 0.5 else "worse than" if hi < 0.5 else "not distinguishable from"
    assert entry["verdict"] == f"{word} tiny: {entry['win_rate']:.2f} [{lo:.2f}, {hi:.2f}]"
    assert entry["kl"] == pytest.approx(0.0, abs=1e-4)  # the same weights as the reference


def test_kl_on_the_first_samples_of_each_prompt_equals_sequence_kl_on_those_samples(tmp_path):
    """kl_samples_per_prompt=1 with 3 samples per prompt: the policy's KL is the mean of sequence_kl over the first
    sample of each prompt (re-drawn here with the run's seeds), not over all three; 0 takes all of them."""
    import torch

    from rlhfkit.data.prompts import demo_data_path, load_prompts
    from rlhfkit.modeling import models

    model, tok = models.load_causal_lm("tiny"), models.load_tokenizer("tiny")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    models.save_pretrained(model, tok, tmp_path / "pol")
    policy = str(tmp_path / "pol")
    cfg = _config(tmp_path, policy=policy, best_of_n=0, samples_per_prompt=3, kl_samples_per_prompt=1)
    results = evaluate.run(cfg)
    assert results["kl_samples_per_prompt"] == 1
    prompts = load_prompts(demo_data_path("prompts_eval.jsonl"))[:6]
    pol, pol_model, _ = evaluate._sample(policy, prompts, cfg, "p", n=3, seed_offset=1)
    reference = models.load_causal_lm("tiny").eval()
    every = evaluate.sequence_kl(pol_model, reference, pol, precision="fp32")
    first = every[0::3]
    assert results["kl"] == pytest.approx(float(first.mean()), rel=1e-5)
    assert abs(float(first.mean()) - float(every.mean())) > 1e-3  # the test tells the two apart
    everything = evaluate.run(_config(tmp_path / "all", policy=policy, best_of_n=0, samples_per_prompt=3))
    assert everything["kl_samples_per_prompt"] == 3
    assert everything["kl"] == pytest.approx(float(every.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="kl_samples_per_prompt"):
        evaluate.run(_config(tmp_path, kl_samples_per_prompt=-1))


SCORED: dict[str, list[str]] = {"gold": [], "proxy": []}


def counting_gold(prompts, responses, **_):
    SCORED["gold"].extend(responses)
    return [float(r.count("e")) for r in responses]


def counting_proxy(prompts, responses, **_):
    SCORED["proxy"].extend(responses)
    return [float(len(r)) for r in responses]


def test_best_of_n_scores_its_pool_once_and_gold_scores_only_the_picks(tmp_path):
    """The proxy ranks the pool in one pass and each n reuses those scores (no re-scoring of the picks); the gold
    scorer sees only responses some n picked. Each n's proxy score is the mean over prompts of the best proxy score
    among its first n samples, and its gold score is the gold of exactly those picks."""
    for calls in SCORED.values():
        calls.clear()
    P, K, N = 3, 2, 4
    results = evaluate.run(
        _config(
            tmp_path,
            gold="tests.test_evaluate:counting_gold",
            proxy="tests.test_evaluate:counting_proxy",
            max_prompts=P,
            samples_per_prompt=K,
            best_of_n=N,
            max_new_tokens=8,
        )
    )
    pool = SCORED["proxy"][2 * P * K :]  # after the baseline's and the policy's samples
    assert len(SCORED["proxy"]) == 2 * P * K + P * N  # not one response more: the picks were not scored again
    picks = {n: [max(pool[j * N : j * N + n], key=len) for j in range(P)] for n in (1, 2, 4)}
    gold_bon = SCORED["gold"][2 * P * K :]
    assert set(gold_bon) == {r for chosen in picks.values() for r in chosen}
    assert len(gold_bon) <= P * 3
    for n, chosen in picks.items():
        player = results["players"][f"best_of_{n}"]
        assert player["proxy_score"] == pytest.approx(sum(len(r) for r in chosen) / P)
        assert player["gold_score"] == pytest.approx(sum(r.count("e") for r in chosen) / P)


def test_sequence_kl_packed_and_padded_equal_a_slow_loop_over_single_sequences():
    """sequence_kl on rlhfkit's kernel (packed: a prompt's samples share it) and on eager attention (padded) both
    equal sum_t log pi(y_t) - log ref(y_t) at the rollout's temperature, each sequence run alone."""
    import torch

    from rlhfkit.generation.rollout import GenerationOptions, HFEngine, make_rollout
    from rlhfkit.modeling import models

    tokenizer = models.load_tokenizer(models.TINY, padding_side="left")
    reference = models.build_tiny().eval()
    policy = models.build_tiny().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    models.set_attention(policy)
    models.set_attention(reference)
    prompts = ["Say hi.", "Name a colour, please.", "Count to three."]
    torch.manual_seed(0)
    engine = HFEngine(policy, tokenizer, precision="fp32")
    rollout = make_rollout(engine, tokenizer, prompts, GenerationOptions(7, 0.8, 1.0), samples_per_prompt=3)
    rollout.response_mask[::2, 3:] = False  # responses of 3, 5 and 7 tokens, as if EOS came early
    rollout.response_mask[1::4, 5:] = False
    assert rollout.response_mask.sum(-1).min() >= 1 and rollout.response_mask.sum(-1).unique().numel() > 1

    def slow(model, b: int) -> torch.Tensor:
        query = rollout.query_ids[b][rollout.query_mask[b]]
        response = rollout.response_ids[b][rollout.response_mask[b]]
        with torch.no_grad():
            logits = model(torch.cat([query, response])[None]).logits[0].float() / rollout.temperature
        logps = torch.log_softmax(logits, -1)[len(query) - 1 : -1]
        return logps.gather(-1, response[:, None]).sum()

    want = torch.stack([slow(policy, b) - slow(reference, b) for b in range(len(rollout.responses))])
    packed = evaluate.sequence_kl(policy, reference, rollout, precision="fp32", batch_size=4)
    for model in (policy, reference):
        models.set_attention(model, "eager")
    padded = evaluate.sequence_kl(policy, reference, rollout, precision="fp32", batch_size=4)
    assert want.abs().min() > 1e-3  # the policy differs from the reference on every sample
    assert torch.allclose(packed, want, atol=1e-4) and torch.allclose(padded, want, atol=1e-4)


def test_two_sampling_workers_give_the_eval_of_one(tmp_path, monkeypatch):
    """Each chunk draws from its own seed and each KL job scores the batches this process would: with the sampling
    and a plain policy's KL in two worker processes, every player's samples, scores, KL and best-of-n equal those
    of one process."""
    from rlhfkit.modeling import models

    policy = tmp_path / "pol"  # other weights than the baseline: a KL that is not 0
    models.save_pretrained(models.build_tiny(seed=1), models.load_tokenizer("tiny"), policy)
    monkeypatch.setattr(evaluate, "KL_JOB_ROWS", 16)  # 20 responses: two KL jobs
    one = evaluate.run(_config(tmp_path / "one", policy=str(policy), max_prompts=10))
    two = evaluate.run(_config(tmp_path / "two", policy=str(policy), max_prompts=10, workers=2))
    assert json.dumps(two, sort_keys=True) == json.dumps(one, sort_keys=True)
    assert abs(one["players"]["pol"]["kl"]) > 0.05  # k1 may be negative on a sample
    assert len({s["policy"] for s in one["samples"]}) > 1  # the samples differ between prompts: a real comparison

    # A policy that is the baseline's spec: KL 0 in the workers, as here, and no KL forward in either
    def no_forward(*args, **kwargs):
        raise AssertionError("the KL of the reference's own weights was computed")

    monkeypatch.setattr(evaluate, "sequence_kl", no_forward)
    monkeypatch.setattr(evaluate, "_workers_kl", no_forward)
    same = [evaluate.run(_config(tmp_path / f"same{w}", max_prompts=4, best_of_n=0, workers=w)) for w in (1, 2)]
    assert same[0]["players"]["tiny_2"]["kl"] == same[1]["players"]["tiny_2"]["kl"] == 0.0
    with pytest.raises(ValueError, match="workers must be >= 1"):
        evaluate.run(_config(tmp_path, workers=0))
