"""Frontier probes: gold score, proxy score and KL of the policy *during* training.

Gao et al. (2022) and Stiennon et al. (2020) judge a preference-optimisation
method by the path it draws in the (KL to the reference, gold reward) plane,
not by its last point alone: a method that keeps raising the proxy (the reward
model) while the gold score falls is over-optimising. So PPO, GRPO, RLOO and
DPO can each, at ``probe_points`` evenly spaced steps (and at step 0, the
starting policy), sample one response per prompt for a fixed held-out prompt
subset (spread over the prompt file: :func:`probe_subset`) and record, in ``OUTPUT_DIR/frontier.jsonl``::

    {"step", "kl", "kl_se", "gold", "gold_se", "proxy", "proxy_se", "num_prompts", "response_length"}

``kl`` is the mean per-sequence k1 KL to the frozen reference on the policy's
own samples (:func:`rlhfkit.evaluate.sequence_kl`); ``*_se`` are standard
errors of the means over prompts. Every probe reseeds sampling with the same
seed (common random numbers: the points differ by the policy, not by the
draw) inside a forked RNG, so probing never changes what training samples and
a resumed run stays exact. The report draws the frontier and runs the
over-optimisation check (:func:`rlhfkit.stats.overoptimisation`) from this file.

Stages that start from the same policy (the pipeline's DPO and PPO, both from the SFT model) make the same
step-0 probe: with ``probe_cache`` set, the first keeps its row under a fingerprint of everything the probe depends
on (:meth:`FrontierProbe.fingerprint`) and the others read it (``"cached"``: the file's name, in their row).

Multi-process runs: the probe runs on the main process with the unwrapped
model, which is right for DDP; under FSDP or ZeRO-3 the parameters are sharded
and this has not been made to work (nor run).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit import log
from rlhfkit.data.io import append_jsonl, atomic_write_text, evenly_spaced, truncate_jsonl_by_step
from rlhfkit.data.prompts import demo_data_path, load_prompts

FRONTIER_FILE = "frontier.jsonl"
"""The probe points of a training run, in its output directory."""


@dataclass
class ProbeOptions:
    """Frontier probes during training (mixed into the RL and DPO configs)."""

    probe_points: int = 0
    """Probes at this many evenly spaced steps, plus one at step 0 (0 disables)."""
    probe_prompts: str = ""
    """Held-out prompts (JSONL with `prompt`); empty: the shipped demo eval prompts."""
    probe_max_prompts: int = 32
    """Use N of the probe prompts, one response each, spread evenly over the file (:func:`probe_subset`); 0: all."""
    probe_max_new_tokens: int = 64
    """Response length limit of probe samples."""
    probe_temperature: float = 0.7
    """Sampling temperature of probe samples (and of their KL)."""
    probe_cache: str = ""
    """A directory keeping the step-0 probe (of the starting policy) under a fingerprint of everything it depends on
    (:meth:`FrontierProbe.fingerprint`); a run that starts from the same point reads its row instead of sampling
    again. The pipeline's DPO and PPO stages share one. Empty: off."""
    gold: str = ""
    """Gold scorer (built-in, `module:function` or reward-model dir) for the probes (and, in RL, logged as
    `gold_score` on each step's samples); it never affects training. Empty: no probes, no gold_score."""
    gold_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to a scorer `gold`, as `reward_args`."""


def probe_steps(total_steps: int, points: int) -> list[int]:
    """Step 0 and ``points`` steps evenly spaced up to ``total_steps`` (the last one included)."""
    if points <= 0:
        return []
    return sorted({0, *(max(1, round(k * total_steps / points)) for k in range(1, points + 1))})


def probe_subset(prompts: list, n: int) -> list:
    """``n`` prompts spread evenly over ``prompts``, the first and the last included (:func:`evenly_spaced`), or all
    of them when ``n`` is 0 or at least their number.

    Not the first ``n``: a prompt file written topic by topic (the demo's eval prompts: how-to questions first,
    thank-you notes and rude questions later) would probe one kind of request and draw a frontier that the eval,
    on every kind, does not share (the seed-0 DPO policy's first eval sample per prompt scored a gold 0.014 on the
    first 32 prompts against 0.138 on all 240, the SFT model's 0.051 against 0.074; benchmarks/demo_runs.md,
    session 45).
    """
    return [prompts[i] for i in evenly_spaced(len(prompts), n)]


FINGERPRINT_RESPONSE = "Thank you for asking. Here is a short answer."
"""The fixed response the gold and proxy scorers score, with every probe prompt, for :meth:`FrontierProbe.fingerprint`."""


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


class FrontierProbe:
    """Call ``probe(policy, step, total_steps)`` after every step; it samples and logs only at :func:`probe_steps`.

    ``reference`` is the frozen starting policy (or ``policy`` itself for LoRA: its base, adapters off);
    ``gold`` and ``proxy`` are score functions ``fn(prompts, responses) -> list[float]`` (the proxy, the
    reward model, may be None).
    """

    def __init__(
        self,
        options: ProbeOptions,
        *,
        tokenizer,
        reference,
        gold: Callable,
        proxy: Callable | None,
        output_dir: str | Path,
        seed: int,
        precision: str,
    ):
        self.options, self.tokenizer, self.reference = options, tokenizer, reference
        self.gold, self.proxy = gold, proxy
        prompts = load_prompts(options.probe_prompts or demo_data_path("prompts_eval.jsonl"))
        self.prompts = probe_subset(prompts, options.probe_max_prompts)
        self.path = Path(output_dir) / FRONTIER_FILE
        self.seed, self.precision = seed, precision

    @torch.no_grad()
    def __call__(self, policy, step: int, total_steps: int) -> dict | None:
        if step not in probe_steps(total_steps, self.options.probe_points):
            return None
        t0 = time.perf_counter()
        cached = self._cache_file(policy) if step == 0 and self.options.probe_cache else None
        if cached is not None and cached.exists():
            row = {**json.loads(cached.read_text()), "step": step, "cached": cached.name}
        else:
            row = self._measure(policy, step)
            if cached is not None:
                atomic_write_text(cached, json.dumps(row))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        # A resumed run probes its resumed step again: rows at this step or later (from the run before the
        # restart) go, so the file holds each step once, as an uninterrupted run's would.
        truncate_jsonl_by_step(self.path, step - 1)
        append_jsonl(self.path, row)
        proxy = "" if row["proxy"] is None else f", proxy {row['proxy']:.3f}"
        reused = f", read from {cached}" if "cached" in row else ""
        log.info(
            f"probe: step {step}: gold {row['gold']:.3f} ± {row['gold_se']:.3f}{proxy}, KL {row['kl']:.2f} "
            f"({row['seconds']:.0f}s{reused})"
        )
        return row

    def _measure(self, policy, step: int) -> dict[str, Any]:
        """Sample one response per probe prompt (reseeded, in a forked RNG), score it, and measure its KL."""
        from rlhfkit.evaluate import KL_PRECISION, sequence_kl  # start-up: report imports probe; loads transformers
        from rlhfkit.generation.rollout import GenerationOptions, HFEngine, make_rollout  # start-up: loads transformers

        o = self.options
        was_training = policy.training
        policy.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + 777)
            engine = HFEngine(policy, self.tokenizer, precision=self.precision)
            rollout = make_rollout(
                engine, self.tokenizer, self.prompts, GenerationOptions(o.probe_max_new_tokens, o.probe_temperature, 1.0)
            )
        kl = sequence_kl(policy, self.reference, rollout, precision=KL_PRECISION).tolist()
        policy.train(was_training)
        gold = self.gold(rollout.prompts, rollout.responses)
        row: dict[str, Any] = {"step": step}
        row["kl"], row["kl_se"] = _mean_se(kl)
        row["gold"], row["gold_se"] = _mean_se(gold)
        row["proxy"] = row["proxy_se"] = None
        if self.proxy is not None:
            row["proxy"], row["proxy_se"] = _mean_se(list(self.proxy(rollout.prompts, rollout.responses)))
        row["num_prompts"] = len(self.prompts)
        row["response_length"] = float(rollout.lengths.float().mean())
        return row

    def fingerprint(self, policy) -> str:
        """A digest of everything the starting policy's probe depends on: the policy's and the reference's weights
        (names, dtypes, bytes; :func:`rlhfkit.training.reference.hash_model`) and the policy's attention, the
        tokenizer, the prompts, the sampling options, the seed and the precision, the gold scorer's name and arguments,
        and the gold and proxy scorers' scores of one fixed response to every probe prompt (so another reward model,
        scale, normalisation or ensemble aggregation gives another digest, though RL and DPO describe their proxies
        differently). About 3 s for two 135M-parameter models and a reward model scoring 32 responses (fp32, 2 cores),
        against 26-33 s for the probe it saves; only a step-0 probe with ``probe_cache`` set takes it."""
        from rlhfkit.training.reference import hash_model, hash_tokenizer  # start-up: loads transformers

        fixed = [FINGERPRINT_RESPONSE] * len(self.prompts)
        proxy = None if self.proxy is None else [float(x) for x in self.proxy(self.prompts, fixed)]
        key = {
            "policy": hash_model(policy),
            "reference": "the policy's base" if self.reference is policy else hash_model(self.reference),
            "attention": str(getattr(getattr(policy, "config", None), "_attn_implementation", "")),
            "tokenizer": hash_tokenizer(self.tokenizer),
            "prompts": self.prompts,
            "sampling": [self.options.probe_max_new_tokens, self.options.probe_temperature, self.seed, self.precision],
            "gold": [self.options.gold, self.options.gold_args, [float(x) for x in self.gold(self.prompts, fixed)]],
            "proxy": proxy,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def _cache_file(self, policy) -> Path:
        directory = Path(self.options.probe_cache)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"probe0-{self.fingerprint(policy)}.json"
