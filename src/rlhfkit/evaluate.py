"""Evaluation of policies against a baseline: ``rlhfkit eval CONFIG.yaml`` / :func:`run`.

On held-out prompts, ``samples_per_prompt`` responses per prompt from every
player (same sampling settings, each player its own seed), then, for every
player against the baseline (the SFT model in the pipeline):

* **win rate** by the *gold* scorer (the simulated annotator's score, a reward
  model, or any ``module:function``): per prompt, the fraction of
  (player, baseline) sample pairs the player wins, ties counting half; its mean
  over prompts, with a 95% paired bootstrap interval over prompts
  (:mod:`rlhfkit.stats`);
* **mean gold score** with its interval, the **gold difference** to the
  baseline with its interval, and a paired sign-flip **p-value** on the
  per-prompt differences;
* **sequence-level KL** to the reference (the baseline unless given): the sum
  over response tokens of ``log pi(y_t) - log ref(y_t)`` on the player's own
  samples (the k1 estimator), at the sampling temperature; its mean over
  prompts, with an interval;
* the **proxy** score (the reward model) of the same samples, when a proxy is
  given: the gap between proxy and gold is what over-optimisation looks like. A
  reward-model ensemble's heads are aggregated by ``reward_aggregation`` (mean,
  wco, uwo; :func:`rlhfkit.losses.aggregate_rewards`), for the proxy score and for
  best-of-n's ranking alike, and their disagreement is reported
  (``proxy_ensemble_std``: the mean over samples of each one's std over the heads);
* **best-of-n** for n = 1, 2, 4, ... up to ``best_of_n``: from one pool of
  ``best_of_n`` baseline samples per prompt (drawn apart from the baseline's
  own samples), the first n are ranked by the proxy (gold when none) and the
  best one is scored by gold; KL is analytic, ``log n - (n - 1) / n``
  (Stiennon et al. 2020, appendix; an upper bound, Beirami et al. 2024). The
  pool is nested, so every n costs nothing beyond the largest; best-of-1 is an
  independent draw of the baseline and should tie with it (a check). With an
  ensemble proxy the same pool is also ranked by its first member alone
  (``member_0``), by each member alone (``members``, averaged per prompt) and
  by each aggregation (mean, wco, uwo): ``best_of_n_ensemble`` holds each
  ranker's gold per n and each aggregation's paired difference from
  ``member_0`` and ``members``, whether the ensemble delays over-optimisation
  (Coste et al. 2024; the report draws these curves on its frontier);
* a plain **verdict** per player: "better than sft: 0.66 [0.60, 0.72]" when the
  win-rate interval lies above 0.5, "worse than ..." below, else "not
  distinguishable from ...";
* the **reward model's** held-out accuracy with its interval, read from the
  proxy directory's ``heldout.json`` when the proxy is a trained reward model;
* an **Elo table** (Bradley-Terry ratings with bootstrap intervals) of all
  players from their pairwise gold comparisons on the first sample per prompt.

A policy that is an ``rlhfkit ilql`` output directory (it holds
``ilql_heads.safetensors``) is sampled with ILQL's decoding,
``top_k(log pi + ilql_beta (min Q - V))`` at the same temperature
(:class:`rlhfkit.generation.ilql_decode.ILQLEngine`), and its KL is that of the
policy that sampled (the perturbed, top-k distribution) to the reference;
``ilql_beta: 0`` samples its behaviour-cloned LM as any other policy. Each
player's ``decoding`` in ``eval.json`` says which was used. The baseline and the
best-of-n pool are always sampled plainly.

Everything lands in ``eval.json`` (written atomically). The top-level
``win_rate``, ``win_rate_ci``, ``gold_score_policy``, ``gold_score_baseline``
and ``kl`` are those of ``policy`` (the pipeline's main algorithm);
``players`` holds one entry per player.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from rlhfkit import log, stats
from rlhfkit.data.io import atomic_write_text
from rlhfkit.data.prompts import demo_data_path, load_prompts
from rlhfkit.data.records import Comparison
from rlhfkit.generation.ilql_decode import ILQLDecodeOptions, ILQLEngine, ilql_response_logps
from rlhfkit.generation.rollout import GenerationOptions, HFEngine, Rollout, make_rollout
from rlhfkit.generation.workers import Workers, cached
from rlhfkit.losses import aggregate_rewards, ensemble_std
from rlhfkit.modeling import attention, models
from rlhfkit.modeling.ilql_heads import is_ilql_dir, load_ilql
from rlhfkit.modeling.policy import packed_response_logps, response_logps
from rlhfkit.ratings import matches_from_comparisons, rating_table
from rlhfkit.rewards import load_reward, scores_and_members
from rlhfkit.run_layout import HELDOUT_FILE

KL_PRECISION = "fp32"
"""Precision of the KL forward passes, here and in the training stages' probes (:mod:`rlhfkit.probe`): in bf16 each
sequence's KL was off by 0.36 nats on average (mean KL 0.38; a bias of +0.01 to +0.02), measured on SmolLM2's demo
DPO policy, 48 responses."""


@dataclass
class EvalConfig:
    """Config of the evaluation stage."""

    policy: str = models.TINY
    """The main policy to evaluate (model spec or directory); its numbers are eval.json's top level."""
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
    reward_aggregation: Literal["mean", "wco", "uwo"] = "mean"
    """How a reward-model ensemble proxy's heads (`rlhfkit reward ensemble_size=K`) combine into the proxy score
    that ranks best-of-n (Coste et al. 2024): mean; wco, the lowest head; uwo, the mean minus reward_uwo_coef x the
    heads' variance. No effect on a single reward model or a scorer. A gold that is an ensemble is its heads' mean."""
    reward_uwo_coef: float = 0.5
    """reward_aggregation=uwo: lambda, the weight of the heads' variance (>= 0)."""
    best_of_n: int = 4
    """Largest n of the best-of-n baseline; every power of two up to it is reported (0 or 1 disables)."""
    best_of_n_prompts: int = -1
    """Draw the best-of-n pool for the first N prompts only (-1: all); each best-of-n player is then
    compared with the baseline on those prompts. The pool is `best_of_n` samples per prompt, the largest
    generation cost of an eval, and best-of-n only traces the frontier (its own interval says how well)."""
    extra_policies: list[str] = field(default_factory=list)
    """More policies evaluated like `policy` (model specs or directories), named by their directory."""
    samples_per_prompt: int = 1
    """Responses per prompt from every player (the baseline and each policy)."""
    max_prompts: int = -1
    """Use only the first N prompts (-1: all)."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 0.7
    """Sampling temperature for every player."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    batch_size: int = 32
    """Responses generated together (prompts x samples per prompt)."""
    seed: int = 0
    """Sampling seed."""
    ilql_beta: float = ILQLDecodeOptions.beta
    """A policy that is an `rlhfkit ilql` output directory is sampled with ILQL's decoding, logits = log pi +
    ilql_beta (min Q - V), top `ilql_top_k`, at `temperature` (`rlhfkit chat DIR --ilql-beta B`'s); 0: its
    behaviour-cloned LM, sampled as any other policy."""
    ilql_top_k: int = ILQLDecodeOptions.top_k
    """ILQL decoding keeps the k best perturbed logits (0: all); `top_p` must then stay 1."""
    precision: str = "bf16"
    """Precision of the reward models' scoring (the gold scorer when it is a reward model, and the proxy)."""
    kl_precision: str = KL_PRECISION
    """Precision of the KL forward passes (the policy's and the reference's log-probs of each response); see
    :data:`KL_PRECISION`."""
    kl_samples_per_prompt: int = 0
    """Measure each policy's KL on its first N samples of each prompt only (0: all `samples_per_prompt`). The KL is
    the mean over prompts, with its interval; its two fp32 forwards per response cost more than sampling the
    response, so one sample per prompt buys the KL at a fraction of the cost while every sample still counts for
    the win rate and gold score."""
    generation_precision: str = "bf16"
    """Decoding precision: bf16 (autocast) or fp32."""
    workers: int = 1
    """Processes that sample side by side, and measure each plain policy's KL (:mod:`rlhfkit.generation.workers`),
    sharing this process's threads: on 2 CPU cores (fp32) an eval with 2 took 16% less time than with 1 (a tiny one
    took longer: each worker loads the models). The results are the same (each chunk has its own seed, each KL slice
    the same batches); ILQL decoding samples here. 1 (the default, and for a GPU): everything here."""
    bootstrap: int = 200
    """Bootstrap resamples for the Elo intervals."""
    resamples: int = 2000
    """Bootstrap resamples for the win-rate, gold and KL intervals (over prompts)."""
    output: str = "runs/eval/eval.json"
    """Where the results go."""
    progress: bool = True
    """Show progress bars while sampling."""


@dataclass
class _ProxyScores:
    """The proxy's scores of a rollout's samples, and an ensemble proxy's disagreement on each (else None)."""

    scores: list[float]
    std: list[float] | None


def decoding(spec: str, config: EvalConfig) -> dict:
    """How a policy is sampled (its ``decoding`` in eval.json): ``{"method": "ilql", "beta", "top_k"}`` for an
    ``rlhfkit ilql`` output directory at ``ilql_beta > 0``, else ``{"method": "plain"}``."""
    if config.ilql_beta > 0 and is_ilql_dir(spec):
        return {"method": "ilql", "beta": config.ilql_beta, "top_k": config.ilql_top_k}
    return {"method": "plain"}


def _plain_model(spec: str):
    """A policy to sample plainly or score: loaded for inference, attending with rlhfkit's kernel (decode steps take
    the lean forward, :func:`rlhfkit.generation.fast_decode.lean_decode_steps`)."""
    model = models.load_causal_lm(spec).eval().to(models.inference_device())
    models.set_attention(model)
    return model


def _worker_model(spec: str) -> tuple[object, object]:
    """In a worker: ``spec``'s model for inference and its tokenizer, loaded once while in use
    (:func:`~rlhfkit.generation.workers.cached` keeps two: a policy and its reference)."""
    return cached(("eval", spec), lambda: (_plain_model(spec), models.load_tokenizer(spec)))


def _chunk_job(spec: str, prompts: list, options: GenerationOptions, n: int, seed: int, precision: str) -> Rollout:
    """One chunk of :func:`_sample` in a worker process (:class:`~rlhfkit.generation.workers.Workers`), its draws
    seeded from ``seed`` alone, as :func:`_sample` draws the chunk here."""
    model, tokenizer = _worker_model(spec)
    torch.manual_seed(seed)
    return make_rollout(HFEngine(model, tokenizer, precision=precision), tokenizer, prompts, options, samples_per_prompt=n)


def _sample(
    spec: str,
    prompts: list,
    config: EvalConfig,
    desc: str,
    *,
    n: int = 1,
    seed_offset: int = 0,
    ilql: bool = False,
    pool: Workers | None = None,
    keep_model: bool = True,
) -> tuple[Rollout, object, HFEngine | ILQLEngine | None]:
    """``n`` samples per prompt from ``spec``: ``(rollout, its model, the engine that sampled)``; ``ilql``: with
    ILQL's decoding (``spec`` is an ILQL output directory). ``pool`` of more than one worker: plain decoding's
    chunks are sampled there (the same samples), and the model is loaded here afterwards only if ``keep_model``
    (else None), the engine None."""
    tokenizer = models.load_tokenizer(spec)
    options = GenerationOptions(config.max_new_tokens, config.temperature, config.top_p)
    chunk = max(1, config.batch_size // n)  # about batch_size rows per generate call, whatever n
    starts = range(0, len(prompts), chunk)

    def seed(start: int) -> int:
        return config.seed * 1_000_003 + start * 64 + seed_offset

    if pool is not None and pool.count > 1 and not ilql:
        jobs = [(spec, prompts[s : s + chunk], options, n, seed(s), config.generation_precision) for s in starts]
        bar = tqdm(total=len(prompts) * n, unit="response", desc=f"eval: {desc}", disable=not config.progress)
        parts = []
        for part in pool.imap(_chunk_job, jobs):
            parts.append(part)
            bar.update(len(part.responses))
        bar.close()
        return _concat(parts, tokenizer.pad_token_id), _plain_model(spec) if keep_model else None, None
    device = models.inference_device()
    engine: HFEngine | ILQLEngine
    if ilql:
        model, heads = load_ilql(spec)
        model = model.to(device)
        engine = ILQLEngine(
            model,
            heads.to(device),
            tokenizer,
            beta=config.ilql_beta,
            top_k=config.ilql_top_k,
            precision=config.generation_precision,
        )
    else:
        model = _plain_model(spec)
        engine = HFEngine(model, tokenizer, precision=config.generation_precision)
    parts = []
    bar = tqdm(total=len(prompts) * n, unit="response", desc=f"eval: {desc}", disable=not config.progress)
    for start in starts:
        torch.manual_seed(seed(start))
        parts.append(make_rollout(engine, tokenizer, prompts[start : start + chunk], options, samples_per_prompt=n))
        bar.update(len(parts[-1].responses))
    bar.close()
    return _concat(parts, tokenizer.pad_token_id), model, engine


def _concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts of different widths (queries left-padded, responses right-padded)."""
    P = max(p.query_ids.shape[1] for p in parts)
    R = max(p.response_ids.shape[1] for p in parts)

    def lpad(x, width, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def rpad(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Rollout(
        prompts=[q for p in parts for q in p.prompts],
        responses=[r for p in parts for r in p.responses],
        query_ids=torch.cat([lpad(p.query_ids, P, pad_id) for p in parts]),
        query_mask=torch.cat([lpad(p.query_mask, P, False) for p in parts]),
        response_ids=torch.cat([rpad(p.response_ids, R, pad_id) for p in parts]),
        response_mask=torch.cat([rpad(p.response_mask, R, False) for p in parts]),
        has_eos=torch.cat([p.has_eos for p in parts]),
        temperature=parts[0].temperature,
    )


@torch.no_grad()
def sequence_kl(
    policy, reference, rollout: Rollout, *, precision: str, batch_size: int = 16, ilql: ILQLEngine | None = None
) -> torch.Tensor:
    """Per-sequence k1 KL, ``sum_t log pi(y_t) - log ref(y_t)`` on the rollout's tokens. Shape (B,).

    ``reference`` may be ``policy`` itself when it is a LoRA model: the reference is then its base,
    adapters disabled. ``ilql``: the rollout was sampled with ILQL's decoding; ``log pi`` is then that of the
    policy that sampled (:func:`~rlhfkit.generation.ilql_decode.ilql_response_logps`: the perturbed, top-k
    distribution), not the LM's.

    A model that attends with rlhfkit's kernel (every model :func:`run` samples) scores packed batches
    (:func:`~rlhfkit.modeling.policy.packed_response_logps`): a prompt's samples share one run of it, no padding, and
    the log-probs of the response tokens only, never the whole vocabulary's logits of every position.
    """

    def lm_logps(model, sub: Rollout, *, as_base: bool) -> torch.Tensor:
        device = next(model.parameters()).device
        with models.autocast(device, precision), models.adapters_disabled(model) if as_base else contextlib.nullcontext():
            if attention.uses_kernel(model):
                lp, _, _ = packed_response_logps(
                    model,
                    sub.query_ids,
                    sub.query_mask,
                    sub.response_ids,
                    sub.response_mask,
                    temperature=rollout.temperature,
                    device=device,
                )
                return lp.float().cpu()
            lp, _, _ = response_logps(
                model,
                sub.input_ids.to(device),
                sub.attention_mask.to(device),
                sub.response_ids.to(device),
                temperature=rollout.temperature,
            )
        return lp.float().cpu()

    out = []
    for start in range(0, len(rollout.responses), batch_size):
        sub = rollout.select(list(range(start, min(start + batch_size, len(rollout.responses)))))
        if ilql is None:
            policy_logps = lm_logps(policy, sub, as_base=False)
        else:
            with models.autocast(next(ilql.lm.parameters()).device, precision):
                policy_logps = ilql_response_logps(
                    ilql.lm,
                    ilql.heads,
                    sub.input_ids,
                    sub.attention_mask,
                    sub.response_ids,
                    beta=ilql.beta,
                    top_k=ilql.top_k,
                    temperature=rollout.temperature,
                )
        reference_logps = lm_logps(reference, sub, as_base=reference is policy)
        out.append(torch.where(sub.response_mask, policy_logps - reference_logps, 0.0).sum(-1))
    return torch.cat(out)


KL_JOB_ROWS = 32
"""Responses per KL job in the workers: a multiple of :func:`sequence_kl`'s batch of 16, so each job scores exactly
the batches this process would (the same numbers)."""


def _kl_job(spec: str, reference: str, rollout: Rollout, precision: str) -> torch.Tensor:
    """:func:`sequence_kl` of one slice of a rollout in a worker."""
    return sequence_kl(_worker_model(spec)[0], _worker_model(reference)[0], rollout, precision=precision)


def _workers_kl(workers: Workers, spec: str, reference: str, rollout: Rollout, precision: str) -> torch.Tensor:
    """Per-sequence KL of a plain policy's rollout against ``reference``, measured in the workers: the fp32 forwards
    took 17.6 s on 2 threads and 28.3 s on 1 for 48 responses (2-core AVX2 VM), so two 1-thread processes finish
    sooner than one on both. Same values as :func:`sequence_kl` here (batches of 16 in both)."""
    n = len(rollout.responses)
    jobs = [
        (spec, reference, rollout.select(list(range(s, min(s + KL_JOB_ROWS, n)))), precision) for s in range(0, n, KL_JOB_ROWS)
    ]
    return torch.cat(list(workers.imap(_kl_job, jobs)))


def eval_prompts(config: EvalConfig) -> list:
    """The held-out prompts the eval uses: ``config.prompts`` (the shipped demo eval prompts when empty), the first
    ``max_prompts`` of them."""
    prompts = load_prompts(config.prompts or demo_data_path("prompts_eval.jsonl"))
    return prompts[: config.max_prompts] if config.max_prompts > 0 else prompts


def pool_prompts(config: EvalConfig, prompts: list) -> list:
    """The prompts of the best-of-n pool: the first ``config.best_of_n_prompts`` of the eval's (all when < 0)."""
    return prompts if config.best_of_n_prompts < 0 else prompts[: config.best_of_n_prompts]


def best_of_n_pool(config: EvalConfig, prompts: list, workers: Workers | None = None) -> Rollout:
    """The best-of-n pool: ``config.best_of_n`` samples per prompt from ``config.baseline``, seeded as :func:`run`
    draws it, so the same config and prompts give the same pool again (to rank it by other reward models)."""
    desc = f"best-of-{config.best_of_n} pool"
    pool, _, _ = _sample(
        config.baseline, prompts, config, desc, n=config.best_of_n, seed_offset=2, pool=workers, keep_model=False
    )
    return pool


def best_of_n_sizes(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``: the best-of-n sizes evaluated from one pool of ``n``."""
    return [1 << b for b in range(n.bit_length())]


ENSEMBLE_SINGLE = "member_0"
"""The single reward model the ensemble's best-of-n curves are compared with: the ensemble's first member alone."""


def best_of_n_gold(ranking: torch.Tensor, gold: torch.Tensor, n: int) -> torch.Tensor:
    """Per prompt, the gold score of the sample ``ranking`` scores highest among the prompt's first ``n``.
    ``ranking`` and ``gold``: (prompts, N) with N >= n; the first of equal scores wins. Returns (prompts,)."""
    return ranker_outcome(ranking[..., None], gold, n)


def ensemble_rankers(members: torch.Tensor, uwo_coef: float = 0.5) -> dict[str, torch.Tensor]:
    """The rankers an ensemble's best-of-n is compared by, from its members' scores (prompts, N, K), K >= 2.

    Each ranker is (prompts, N, R): R columns each rank the pool alone and the ranker's outcome is the mean of their
    picks' gold (:func:`ranker_outcome`). ``member_0`` (:data:`ENSEMBLE_SINGLE`): the first member alone, one reward
    model; ``members``: each member alone (K columns), a single reward model of the ensemble's recipe without the luck
    of which seed is "the" single one; ``mean``, ``wco``, ``uwo``: the aggregations of
    :func:`rlhfkit.losses.aggregate_rewards` (Coste et al. 2024)."""
    if members.dim() != 3 or members.shape[-1] < 2:
        raise ValueError(f"ensemble_rankers: members must be (prompts, N, K) with K >= 2, got {tuple(members.shape)}")
    P, N, K = members.shape
    flat = members.reshape(P * N, K)
    rankers = {ENSEMBLE_SINGLE: members[..., :1], "members": members}
    for how in ("mean", "wco", "uwo"):
        rankers[how] = aggregate_rewards(flat, how, uwo_coef).view(P, N, 1)
    return rankers


def ranker_picks(ranker: torch.Tensor, n: int) -> torch.Tensor:
    """Index (within the prompt's N) of each column's best of the first ``n`` samples: (prompts, N, R) -> (prompts, R)."""
    return ranker[:, :n].argmax(1)


def ranker_outcome(ranker: torch.Tensor, gold: torch.Tensor, n: int) -> torch.Tensor:
    """Per prompt, the mean over the ranker's R columns of the gold score of each column's best-of-``n`` pick.
    ``ranker`` (prompts, N, R), ``gold`` (prompts, N) -> (prompts,)."""
    return gold.gather(1, ranker_picks(ranker, n)).mean(1)


def compare_rankers(outcomes: dict[str, torch.Tensor], *, single: str, seed: int, resamples: int = 2000) -> dict:
    """Each ranker's per-prompt best-of-n gold: its mean with a 95% bootstrap interval over prompts, and, for each
    ranker but ``single`` and ``members``, its paired difference from ``single`` and from ``members`` (when present):
    mean, 95% paired-bootstrap interval and sign-flip p-value (:mod:`rlhfkit.stats`)."""
    out: dict = {}
    for name, values in outcomes.items():
        est = stats.paired_bootstrap(values.tolist(), resamples=resamples, seed=seed)
        entry: dict = {"gold_score": est.value, "gold_score_ci": list(est.ci)}
        if name not in (single, "members"):
            for other in (single, "members"):
                if other not in outcomes:
                    continue
                diff = (values - outcomes[other]).tolist()
                d = stats.paired_bootstrap(diff, resamples=resamples, seed=seed)
                entry[f"minus_{other}"] = d.value
                entry[f"minus_{other}_ci"] = list(d.ci)
                entry[f"minus_{other}_p"] = stats.sign_flip_p_value(diff, seed=seed)
        out[name] = entry
    return out


def _per_prompt(values: list[float], k: int) -> list[list[float]]:
    """Rows grouped by prompt (``k`` consecutive rows each) -> one list per prompt."""
    return [values[i : i + k] for i in range(0, len(values), k)]


def verdict(name: str, baseline: str, win: float, ci: tuple[float, float] | list[float]) -> str:
    """A plain sentence: better / worse / not distinguishable, by whether the interval excludes 0.5."""
    interval = f"{win:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    if ci[0] > 0.5:
        return f"better than {baseline}: {interval}"
    if ci[1] < 0.5:
        return f"worse than {baseline}: {interval}"
    return f"not distinguishable from {baseline}: {interval}"


def compare(gold: list[list[float]], baseline_gold: list[list[float]], *, seed: int, resamples: int) -> dict:
    """A player's gold scores against the baseline's, both grouped per prompt: win rate, gold, difference, p-value."""
    wins = stats.win_fractions(gold, baseline_gold)
    means = [sum(g) / len(g) for g in gold]
    diffs = [m - sum(b) / len(b) for m, b in zip(means, baseline_gold)]
    win = stats.paired_bootstrap(wins, resamples=resamples, seed=seed)
    score = stats.paired_bootstrap(means, resamples=resamples, seed=seed)
    diff = stats.paired_bootstrap(diffs, resamples=resamples, seed=seed)
    return {
        "win_rate": win.value,
        "win_rate_ci": list(win.ci),
        "gold_score": score.value,
        "gold_score_ci": list(score.ci),
        "gold_diff": diff.value,
        "gold_diff_ci": list(diff.ci),
        "p_value": stats.sign_flip_p_value(diffs, seed=seed),
    }


def _mean_ci(values: list[list[float]], *, seed: int, resamples: int) -> tuple[float, list[float]]:
    """Mean over prompts of per-prompt means, with its bootstrap interval."""
    est = stats.paired_bootstrap([sum(v) / len(v) for v in values], resamples=resamples, seed=seed)
    return est.value, list(est.ci)


def reward_model_accuracy(proxy: str) -> dict | None:
    """The trained reward model's held-out accuracy, from its directory's ``heldout.json`` (None if absent)."""
    path = Path(proxy) / HELDOUT_FILE if proxy else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def _decoding_note(entry: dict) -> str:
    """`` (ILQL decoding, beta 4, top-k 20)`` for a player sampled with ILQL's decoding, else nothing."""
    how = entry.get("decoding", {})
    return f" (ILQL decoding, beta {how['beta']:g}, top-k {how['top_k']})" if how.get("method") == "ilql" else ""


def player_name(spec: str) -> str:
    """A player's key in ``players``: the directory's name (``runs/demo/dpo`` -> ``dpo``), or the spec."""
    return Path(spec).name or spec


def run(config: EvalConfig) -> dict:
    """Evaluate; returns the results dict (also written to ``config.output``)."""
    if config.workers < 1:
        raise ValueError(f"eval: workers must be >= 1, got {config.workers}")
    with Workers(config.workers) as workers:
        return _run(config, workers)


def _run(config: EvalConfig, workers: Workers) -> dict:
    c = config
    K = c.samples_per_prompt
    if K < 1:
        raise ValueError(f"eval: samples_per_prompt must be >= 1, got {K}")
    if c.kl_samples_per_prompt < 0:
        raise ValueError(f"eval: kl_samples_per_prompt must be >= 0 (0: all samples), got {c.kl_samples_per_prompt}")
    K_kl = min(K, c.kl_samples_per_prompt) if c.kl_samples_per_prompt else K
    prompts = eval_prompts(c)
    gold = load_reward(c.gold, precision=c.precision)
    proxy = (
        load_reward(c.proxy, precision=c.precision, aggregation=c.reward_aggregation, uwo_coef=c.reward_uwo_coef)
        if c.proxy
        else None
    )
    base_name = player_name(c.baseline)
    policies = [c.policy, *c.extra_policies]
    decodings = [decoding(spec, c) for spec in policies]
    if c.top_p < 1.0 and any(d["method"] == "ilql" for d in decodings):
        raise ValueError(
            f"eval: top_p={c.top_p} with an ILQL policy: ILQL decoding truncates by top-k (ilql_top_k), so leave top_p "
            "at 1 (or set ilql_beta=0 to sample its behaviour-cloned LM plainly)"
        )
    names: list[str] = []
    for spec in policies:  # directory names, made unique: two runs/x/dpo become dpo and dpo_2
        name, k = player_name(spec), 2
        while name in names or name == base_name:
            name, k = f"{player_name(spec)}_{k}", k + 1
        names.append(name)

    def score(roll: Rollout) -> tuple[list[float], _ProxyScores | None]:
        if proxy is None:
            return gold(roll.prompts, roll.responses), None
        proxy_scores, members = scores_and_members(proxy, roll.prompts, roll.responses)
        spread = ensemble_std(members).tolist() if members is not None else None
        return gold(roll.prompts, roll.responses), _ProxyScores(proxy_scores, spread)

    def describe(roll: Rollout, gold_scores: list[float], proxied: _ProxyScores | None, k: int) -> dict:
        out = {"response_length": float(roll.lengths.float().mean()), "eos_rate": float(roll.has_eos.float().mean())}
        if proxied is not None:
            per_prompt = _per_prompt(proxied.scores, k)
            out["proxy_score"], out["proxy_score_ci"] = _mean_ci(per_prompt, seed=c.seed, resamples=c.resamples)
            if proxied.std is not None:
                out["proxy_ensemble_std"] = sum(proxied.std) / len(proxied.std)
        return out

    # -- the baseline: K samples per prompt; its model is the KL reference unless one is given. With workers, a
    # plain policy's KL is measured there too, and this process needs the reference only for an ILQL policy.
    reference_here = workers.count == 1 or any(d["method"] == "ilql" for d in decodings)
    base_roll, base_model, _ = _sample(
        c.baseline, prompts, c, "baseline", n=K, pool=workers, keep_model=reference_here and not c.reference
    )  # always plain (the reference)
    base_gold, base_proxy = score(base_roll)
    base_by_prompt = _per_prompt(base_gold, K)
    value, ci = _mean_ci(base_by_prompt, seed=c.seed, resamples=c.resamples)
    players: dict[str, dict] = {
        base_name: {
            "kind": "baseline",
            "spec": c.baseline,
            "decoding": {"method": "plain"},
            "gold_score": value,
            "gold_score_ci": ci,
            **describe(base_roll, base_gold, base_proxy, K),
        }
    }
    reference = (_plain_model(c.reference) if c.reference else base_model) if reference_here else None
    first_sample = {base_name: (base_roll.responses[::K], base_gold[::K])}  # for the Elo table
    reference_spec = c.reference or c.baseline

    # -- each policy: K samples per prompt, compared with the baseline's, and its KL
    for i, (spec, name, how) in enumerate(zip(policies, names, decodings)):
        ilql = how["method"] == "ilql"
        kl_in_workers = workers.count > 1 and not ilql
        roll, model, engine = _sample(
            spec, prompts, c, name, n=K, seed_offset=1 + 10 * i, ilql=ilql, pool=workers, keep_model=not kl_in_workers
        )
        pol_gold, pol_proxy = score(roll)
        kl_roll = roll if K_kl == K else roll.select([j for j in range(len(roll.responses)) if j % K < K_kl])
        if not ilql and spec == reference_spec:
            kl = torch.zeros(len(kl_roll.responses))  # the reference's own weights: KL 0, without two forwards each
        elif kl_in_workers:
            kl = _workers_kl(workers, spec, reference_spec, kl_roll, c.kl_precision)
        else:
            kl = sequence_kl(
                model, reference, kl_roll, precision=c.kl_precision, ilql=engine if isinstance(engine, ILQLEngine) else None
            )
        del model, engine
        kl_mean, kl_ci = _mean_ci(_per_prompt(kl.tolist(), K_kl), seed=c.seed, resamples=c.resamples)
        entry = {
            "kind": "policy",
            "spec": spec,
            "decoding": how,
            **compare(_per_prompt(pol_gold, K), base_by_prompt, seed=c.seed, resamples=c.resamples),
            "kl": kl_mean,
            "kl_ci": kl_ci,
            "kl_std": float(kl.std()) if len(kl) > 1 else 0.0,
            **describe(roll, pol_gold, pol_proxy, K),
        }
        entry["verdict"] = verdict(name, base_name, entry["win_rate"], entry["win_rate_ci"])
        players[name] = entry
        first_sample[name] = (roll.responses[::K], pol_gold[::K])
        if i == 0:
            samples = [
                {
                    "prompt": p if isinstance(p, str) else p[-1]["content"],
                    "baseline": b,
                    "policy": q,
                    "gold_baseline": sb,
                    "gold_policy": sq,
                }
                for p, b, q, sb, sq in zip(prompts, base_roll.responses[::K], roll.responses[::K], base_gold[::K], pol_gold[::K])
            ]
    del base_model, reference

    # -- best-of-n from one nested pool of N baseline samples per prompt
    N = c.best_of_n
    pool_at = pool_prompts(c, prompts)
    M = len(pool_at)
    ensemble_bon: dict | None = None  # an ensemble proxy's rankers, for the report's frontier
    if N > 1 and M > 0:
        pool = best_of_n_pool(c, pool_at, workers)
        # The ranker scores the pool once; each n's picks reuse those scores (the proxy's, with an ensemble's
        # spread), and the gold scorer runs once on the responses some n picks.
        members = None
        if proxy is None:
            pool_proxy, ranking = None, gold(pool.prompts, pool.responses)
        else:
            ranking, members = scores_and_members(proxy, pool.prompts, pool.responses)
            pool_proxy = _ProxyScores(ranking, ensemble_std(members).tolist() if members is not None else None)
        ranks = torch.tensor(ranking).view(-1, N)
        every_pick = {n: [j * N + int(b) for j, b in enumerate(ranks[:, :n].argmax(-1))] for n in best_of_n_sizes(N)}
        picked = {i for picks in every_pick.values() for i in picks}
        # An ensemble proxy: its members alone and each aggregation rank the same pool too (the report's ensemble
        # curves); gold scores every sample any of them picks, once.
        rankers = ensemble_rankers(members.double().view(M, N, -1), c.reward_uwo_coef) if members is not None else {}
        offsets = torch.arange(M)[:, None] * N
        for r in rankers.values():
            for n in best_of_n_sizes(N):
                picked.update((ranker_picks(r, n) + offsets).flatten().tolist())
        picked = sorted(picked)
        picked_gold = (
            dict(zip(picked, gold([pool.prompts[i] for i in picked], [pool.responses[i] for i in picked])))
            if proxy is not None
            else dict(enumerate(ranking))
        )
        for n, picks in every_pick.items():
            sub = pool.select(picks)
            bon_gold = [picked_gold[i] for i in picks]
            bon_proxy = (
                None
                if pool_proxy is None
                else _ProxyScores(
                    [pool_proxy.scores[i] for i in picks], None if pool_proxy.std is None else [pool_proxy.std[i] for i in picks]
                )
            )
            name = f"best_of_{n}"
            entry = {
                "kind": "best_of_n",
                "n": n,
                "spec": c.baseline,
                **compare([[g] for g in bon_gold], base_by_prompt[:M], seed=c.seed, resamples=c.resamples),
                "kl": math.log(n) - (n - 1) / n,
                "num_prompts": M,
                **describe(sub, bon_gold, bon_proxy, 1),
            }
            entry["verdict"] = verdict(name, base_name, entry["win_rate"], entry["win_rate_ci"])
            players[name] = entry
            if M == len(prompts):  # the Elo table needs every player on every prompt
                first_sample[name] = (sub.responses, bon_gold)
        if rankers:
            gold_pool = torch.full((M * N,), math.nan, dtype=torch.float64)
            gold_pool[picked] = torch.tensor([picked_gold[i] for i in picked], dtype=torch.float64)
            gold_pool = gold_pool.view(M, N)  # NaN where nobody picked: never gathered
            ensemble_bon = {
                "single": ENSEMBLE_SINGLE,
                "ensemble_size": members.shape[-1],
                "uwo_coef": c.reward_uwo_coef,
                "num_prompts": M,
                "by_n": {
                    str(n): compare_rankers(
                        {name: ranker_outcome(r, gold_pool, n) for name, r in rankers.items()},
                        single=ENSEMBLE_SINGLE,
                        seed=c.seed,
                        resamples=c.resamples,
                    )
                    for n in best_of_n_sizes(N)
                },
            }

    main = players[names[0]]
    ensemble = proxy is not None and getattr(proxy, "num_members", 1) > 1
    results: dict = {
        "policy": c.policy,
        "baseline": c.baseline,
        "gold": c.gold,
        "proxy": c.proxy,
        **({"proxy_ensemble_size": proxy.num_members, "reward_aggregation": c.reward_aggregation} if ensemble else {}),
        "num_prompts": len(prompts),
        "samples_per_prompt": K,
        "kl_samples_per_prompt": K_kl,
        "temperature": c.temperature,
        "decoding": main["decoding"],
        "main_player": names[0],
        "baseline_name": base_name,
        "win_rate": main["win_rate"],
        "win_rate_ci": main["win_rate_ci"],
        "p_value": main["p_value"],
        "gold_score_policy": main["gold_score"],
        "gold_score_policy_ci": main["gold_score_ci"],
        "gold_score_baseline": players[base_name]["gold_score"],
        "gold_score_baseline_ci": players[base_name]["gold_score_ci"],
        "kl": main["kl"],
        "kl_ci": main["kl_ci"],
        "kl_std": main["kl_std"],
        "verdict": main["verdict"],
        "players": players,
    }
    accuracy = reward_model_accuracy(c.proxy)
    if accuracy is not None:
        results["reward_model"] = accuracy
    if N > 1 and M > 0:
        largest = players[f"best_of_{1 << (N.bit_length() - 1)}"]
        results["best_of_n"] = {
            "n": largest["n"],
            "proxy": c.proxy or c.gold,
            "gold_score": largest["gold_score"],
            "kl_analytic": largest["kl"],
            "win_rate_vs_baseline": largest["win_rate"],
            **({"aggregation": c.reward_aggregation} if ensemble else {}),
        }
    if ensemble_bon is not None:
        results["best_of_n_ensemble"] = ensemble_bon

    # Elo / Bradley-Terry over every pair of players, one match per prompt (first sample each).
    order = list(first_sample)
    comparisons = []
    for j, prompt in enumerate(prompts):
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                (ra, sa), (rb, sb) = [(first_sample[order[x]][0][j], first_sample[order[x]][1][j]) for x in (a, b)]
                comparisons.append(
                    Comparison(
                        prompt=prompt,
                        responses=[ra, rb],
                        ranking=[0, 1] if sa >= sb else [1, 0],
                        tie=sa == sb,
                        source=f"gold:{c.gold}",
                        meta={"players": [order[a], order[b]]},
                    )
                )
    results["elo"] = rating_table(matches_from_comparisons(comparisons), bootstrap=c.bootstrap, seed=c.seed)
    results["samples"] = samples
    atomic_write_text(c.output, json.dumps(results, indent=2, ensure_ascii=False))
    for name, entry in players.items():
        if entry["kind"] != "baseline":
            log.info(
                f"eval: {name}{_decoding_note(entry)}: {entry['verdict']}; gold {entry['gold_score']:.3f} vs "
                f"{players[base_name]['gold_score']:.3f}, p = {entry['p_value']:.3g}, KL {entry['kl']:.2f}"
            )
    log.info(f"eval: -> {c.output}")
    return results
