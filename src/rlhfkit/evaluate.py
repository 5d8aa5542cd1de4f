"""Evaluation of a policy against a baseline: ``rlhfkit eval CONFIG.yaml`` / :func:`run`.

On held-out prompts, one response per prompt from the policy and from the
baseline (same sampling settings), then:

* **win rate** of the policy over the baseline by the *gold* scorer (the
  simulated annotator's score, a reward model, or any ``module:function``):
  a win counts 1, an exact tie 0.5;
* **mean gold score** of both;
* **sequence-level KL** of the policy to the reference (the baseline unless
  given): the sum over response tokens of ``log pi(y_t) - log ref(y_t)`` on the
  policy's own samples (the k1 estimator), with both distributions at the
  sampling temperature; averaged over prompts;
* response length and EOS rate;
* the **best-of-n** baseline: n baseline samples per prompt, the best by the
  proxy reward (a reward model, or gold when none), with its gold score and
  its analytic KL ``log n - (n - 1) / n`` (Stiennon et al. 2020, appendix; the
  bound of Beirami et al. 2024);
* an **Elo table** (Bradley-Terry ratings with bootstrap intervals) of all
  players — baseline, policy, best-of-n and any extra checkpoints — from their
  pairwise gold-score comparisons on the same prompts.

Everything lands in ``eval.json`` (written atomically).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhfkit import models
from rlhfkit.data.io import atomic_write_text
from rlhfkit.data.records import Comparison
from rlhfkit.rollout import GenerationOptions, HFEngine, Rollout, make_rollout


@dataclass
class EvalConfig:
    """Config of the evaluation stage."""

    policy: str = models.TINY
    """The policy to evaluate (model spec or directory)."""
    baseline: str = models.TINY
    """The baseline it is compared with (usually the SFT model)."""
    reference: str = ""
    """Reference for the KL; empty: the baseline."""
    prompts: str = ""
    """Held-out prompts (JSONL/JSON with `prompt`); empty: the shipped demo eval prompts."""
    gold: str = "demo"
    """Gold scorer: built-in (sentiment, length, banned, demo), `module:function`, or a reward-model dir."""
    proxy: str = ""
    """Proxy reward that picks the best of n (e.g. the trained reward model); empty: gold."""
    best_of_n: int = 4
    """n for the best-of-n baseline (0 disables)."""
    extra_policies: list[str] = field(default_factory=list)
    """More checkpoints to place in the Elo table (model specs or directories)."""
    max_prompts: int = -1
    """Use only the first N prompts (-1: all)."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 0.7
    """Sampling temperature for every player."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    batch_size: int = 32
    """Prompts generated together."""
    seed: int = 0
    """Sampling seed."""
    precision: str = "bf16"
    """Precision of the KL forward passes."""
    generation_precision: str = "bf16"
    """Decoding precision: bf16 (autocast) or fp32."""
    bootstrap: int = 200
    """Bootstrap resamples for the Elo intervals."""
    output: str = "runs/eval/eval.json"
    """Where the results go."""
    progress: bool = True
    """Show progress bars while sampling."""


def _sample(spec: str, prompts: list, config: EvalConfig, desc: str, *, n: int = 1, seed_offset: int = 0) -> tuple[Rollout, object, object]:
    tokenizer = models.load_tokenizer(spec)
    model = models.load_causal_lm(spec).eval()
    engine = HFEngine(model, tokenizer, precision=config.generation_precision)
    options = GenerationOptions(config.max_new_tokens, config.temperature, config.top_p)
    parts = []
    bar = tqdm(total=len(prompts) * n, unit="response", desc=f"eval: {desc}", disable=not config.progress)
    for start in range(0, len(prompts), config.batch_size):
        torch.manual_seed(config.seed * 1_000_003 + start + seed_offset)
        parts.append(make_rollout(engine, tokenizer, prompts[start : start + config.batch_size], options, samples_per_prompt=n))
        bar.update(len(parts[-1].responses))
    bar.close()
    return _concat(parts, tokenizer.pad_token_id), model, tokenizer


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts of different widths (queries left-padded, responses right-padded)."""
    P = max(p.query_ids.shape[1] for p in parts)
    R = max(p.response_ids.shape[1] for p in parts)

    def lpad(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def rpad(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Rollout(
        prompts=[q for p in parts for q in p.prompts], responses=[r for p in parts for r in p.responses],
        query_ids=torch.cat([lpad(p.query_ids, P, pad_id) for p in parts]),
        query_mask=torch.cat([lpad(p.query_mask, P, False) for p in parts]),
        response_ids=torch.cat([rpad(p.response_ids, R, pad_id) for p in parts]),
        response_mask=torch.cat([rpad(p.response_mask, R, False) for p in parts]),
        has_eos=torch.cat([p.has_eos for p in parts]), temperature=parts[0].temperature,
    )


@torch.no_grad()
def sequence_kl(policy, reference, rollout: Rollout, *, precision: str, batch_size: int = 16) -> torch.Tensor:
    """Per-sequence k1 KL, ``sum_t log pi(y_t) - log ref(y_t)`` on the rollout's tokens. Shape (B,)."""
    from rlhfkit.policy import response_logps

    out = []
    for start in range(0, len(rollout.responses), batch_size):
        sub = rollout.select(list(range(start, min(start + batch_size, len(rollout.responses)))))
        logps = []
        for model in (policy, reference):
            device = next(model.parameters()).device
            with models.autocast(device, precision):
                lp, _, _ = response_logps(model, sub.input_ids.to(device), sub.attention_mask.to(device),
                                          sub.response_ids.to(device), temperature=rollout.temperature)
            logps.append(lp.float().cpu())
        out.append(torch.where(sub.response_mask, logps[0] - logps[1], 0.0).sum(-1))
    return torch.cat(out)


def _stats(rollout: Rollout, scores: list[float]) -> dict[str, float]:
    return {
        "gold_score": sum(scores) / len(scores),
        "response_length": float(rollout.lengths.float().mean()),
        "eos_rate": float(rollout.has_eos.float().mean()),
    }


def win_rate(policy_scores: list[float], baseline_scores: list[float]) -> float:
    """Fraction of prompts where the policy's score is higher (ties count half)."""
    wins = sum(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_scores, baseline_scores))
    return wins / len(policy_scores)


def run(config: EvalConfig) -> dict:
    """Evaluate; returns the results dict (also written to ``config.output``)."""
    from rlhfkit.elo import matches_from_comparisons, rating_table
    from rlhfkit.rewards import load_reward
    from rlhfkit.sample import load_prompts
    from rlhfkit.sft import demo_data_path

    prompts = load_prompts(config.prompts or demo_data_path("prompts_eval.jsonl"))
    if config.max_prompts > 0:
        prompts = prompts[: config.max_prompts]
    gold = load_reward(config.gold, precision=config.precision)

    base_roll, base_model, _ = _sample(config.baseline, prompts, config, "baseline")
    pol_roll, pol_model, _ = _sample(config.policy, prompts, config, "policy", seed_offset=1)
    base_scores = gold(base_roll.prompts, base_roll.responses)
    pol_scores = gold(pol_roll.prompts, pol_roll.responses)
    reference = base_model if not config.reference else models.load_causal_lm(config.reference).eval()
    kl = sequence_kl(pol_model, reference, pol_roll, precision=config.precision)
    del pol_model

    # name -> (responses, gold scores), one per prompt
    players = {"baseline": (base_roll.responses, base_scores), "policy": (pol_roll.responses, pol_scores)}
    results: dict = {
        "policy": config.policy,
        "baseline": config.baseline,
        "gold": config.gold,
        "num_prompts": len(prompts),
        "temperature": config.temperature,
        "win_rate": win_rate(pol_scores, base_scores),
        "gold_score_policy": sum(pol_scores) / len(pol_scores),
        "gold_score_baseline": sum(base_scores) / len(base_scores),
        "kl": float(kl.mean()),
        "kl_std": float(kl.std()) if len(kl) > 1 else 0.0,
        "policy_stats": _stats(pol_roll, pol_scores),
        "baseline_stats": _stats(base_roll, base_scores),
    }

    if config.best_of_n > 1:
        n = config.best_of_n
        bon_roll, _, _ = _sample(config.baseline, prompts, config, f"best-of-{n}", n=n, seed_offset=2)
        proxy = load_reward(config.proxy, precision=config.precision) if config.proxy else gold
        proxy_scores = torch.tensor(proxy(bon_roll.prompts, bon_roll.responses)).view(-1, n)
        best = proxy_scores.argmax(-1)
        picks = [i * n + int(b) for i, b in enumerate(best)]
        bon_gold = gold([bon_roll.prompts[i] for i in picks], [bon_roll.responses[i] for i in picks])
        players[f"best_of_{n}"] = ([bon_roll.responses[i] for i in picks], bon_gold)
        results["best_of_n"] = {
            "n": n,
            "proxy": config.proxy or config.gold,
            "gold_score": sum(bon_gold) / len(bon_gold),
            "kl_analytic": math.log(n) - (n - 1) / n,
            "win_rate_vs_baseline": win_rate(bon_gold, base_scores),
        }
    for i, spec in enumerate(config.extra_policies):
        name = Path(spec).name or spec
        roll, _, _ = _sample(spec, prompts, config, name, seed_offset=10 + i)
        players[name] = (roll.responses, gold(roll.prompts, roll.responses))

    # Elo / Bradley-Terry over every pair of players, one match per prompt.
    names = list(players)
    comparisons = []
    for j, prompt in enumerate(prompts):
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                (ra, sa), (rb, sb) = [(players[names[x]][0][j], players[names[x]][1][j]) for x in (a, b)]
                comparisons.append(Comparison(
                    prompt=prompt, responses=[ra, rb],
                    ranking=[0, 1] if sa >= sb else [1, 0], tie=sa == sb,
                    source=f"gold:{config.gold}", meta={"players": [names[a], names[b]]},
                ))
    results["elo"] = rating_table(matches_from_comparisons(comparisons), bootstrap=config.bootstrap, seed=config.seed)
    results["samples"] = [
        {"prompt": p if isinstance(p, str) else p[-1]["content"], "baseline": b, "policy": q,
         "gold_baseline": sb, "gold_policy": sq}
        for p, b, q, sb, sq in zip(prompts, base_roll.responses, pol_roll.responses, base_scores, pol_scores)
    ]
    atomic_write_text(config.output, json.dumps(results, indent=2, ensure_ascii=False))
    print(
        f"eval: win rate {results['win_rate']:.3f}, gold {results['gold_score_policy']:.3f} vs "
        f"{results['gold_score_baseline']:.3f} (baseline), KL {results['kl']:.3f} -> {config.output}"
    )
    return results
