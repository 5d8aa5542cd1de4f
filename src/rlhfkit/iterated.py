"""Iterated (online) DPO: ``rlhfkit iterated-dpo CONFIG.yaml`` / :func:`run`.

Rounds of sample -> label -> DPO, as in Anthropic's iterated online RLHF (Bai et
al. 2022, sec. 4.5) and "iterative DPO" (Xu et al. 2023): each round samples
from the latest policy, labels the new pairs with any feedback source, and
trains on them. The DPO reference is either kept (the starting model, every
round) or refreshed to the policy that produced the round's samples.
Every round's samples, labels and model are kept under ``OUTPUT/round-K``; a
finished round (its model directory is a complete save, :func:`rlhfkit.modeling.models.is_complete_save`)
is not redone, and a round whose save was interrupted is redone whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit import dpo, label, log, sample
from rlhfkit.config import from_dict
from rlhfkit.data.io import write_jsonl
from rlhfkit.data.prompts import demo_data_path, load_prompts
from rlhfkit.modeling import models
from rlhfkit.pipeline import Processes


@dataclass
class IteratedDPOConfig:
    """Config of iterated DPO."""

    model: str = models.TINY
    """Starting policy (usually the SFT output)."""
    prompts: str = ""
    """Prompts to sample from each round (empty: the shipped demo prompts)."""
    rounds: int = 2
    """Number of sample -> label -> DPO rounds."""
    prompts_per_round: int = 64
    """Prompts sampled per round (taken in turn from the prompt file, wrapping around)."""
    reference: Literal["initial", "refresh"] = "initial"
    """DPO reference: the starting model every round, or the policy that produced the round's samples."""
    output_dir: str = "runs/iterated-dpo"
    """Where round-K/{samples.jsonl, labels.jsonl, model/} go."""
    seed: int = 0
    """Seed for sampling, labelling and training (offset by the round)."""
    sample: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config sample` keys."""
    label: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config label` keys (the feedback source and its settings)."""
    dpo: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config dpo` keys."""


def run(config: IteratedDPOConfig) -> list[Path]:
    """Run every round; returns the model directory of each round.

    Under ``accelerate launch`` (as :mod:`rlhfkit.pipeline`): DPO trains in every process; the round's
    bookkeeping, sampling and labelling run on the main process alone, the others waiting for it.
    """
    procs = Processes.join()
    all_prompts = load_prompts(config.prompts or demo_data_path("prompts_train.jsonl"))
    out = Path(config.output_dir)
    policy, produced = config.model, []
    for k in range(config.rounds):
        round_dir = out / f"round-{k}"
        model_dir = round_dir / "model"
        if procs.on_main(functools.partial(models.is_complete_save, model_dir)):
            log.info(f"iterated-dpo: round {k} done, skipped")
            policy = str(model_dir)
            produced.append(model_dir)
            continue
        seed = config.seed + k
        procs.on_main(functools.partial(_sample_and_label, config, k, policy, all_prompts, round_dir, seed))
        reference = config.model if config.reference == "initial" else policy
        dpo.train(
            from_dict(
                dpo.DPOConfig,
                {
                    "model": policy,
                    "ref_model": "" if reference == policy else reference,
                    "data": str(round_dir / "labels.jsonl"),
                    "output_dir": str(model_dir),
                    "seed": seed,
                    **config.dpo,
                },
                source=f"iterated-dpo round {k} dpo",
            )
        )
        policy = str(model_dir)
        produced.append(model_dir)
    return produced


def _sample_and_label(config: IteratedDPOConfig, k: int, policy: str, all_prompts: list, round_dir: Path, seed: int) -> None:
    """Round ``k``'s prompts, responses from ``policy`` and their labels, in ``round_dir``."""
    round_dir.mkdir(parents=True, exist_ok=True)
    start = (k * config.prompts_per_round) % len(all_prompts)
    chunk = [all_prompts[(start + i) % len(all_prompts)] for i in range(config.prompts_per_round)]
    prompt_file = round_dir / "prompts.jsonl"
    write_jsonl(prompt_file, [{"prompt": p} for p in chunk])
    sample.run(
        from_dict(
            sample.SampleConfig,
            {
                "model": policy,
                "prompts": str(prompt_file),
                "output": str(round_dir / "samples.jsonl"),
                "seed": seed,
                **config.sample,
            },
            source=f"iterated-dpo round {k} sample",
        )
    )
    label.run(
        from_dict(
            label.LabelConfig,
            {
                "samples": str(round_dir / "samples.jsonl"),
                "output": str(round_dir / "labels.jsonl"),
                "seed": seed,
                **config.label,
            },
            source=f"iterated-dpo round {k} label",
        )
    )
