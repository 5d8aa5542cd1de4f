"""The end-to-end pipeline: ``rlhfkit run PIPELINE.yaml [--from STAGE]`` and ``rlhfkit demo``.

Stages, each reading the previous stage's output directory:

    sft -> sample -> label -> reward -> rl (ppo | grpo | rloo | dpo) -> eval -> report

Each stage's full config (the stage defaults, the wiring to earlier outputs, and
the pipeline file's overrides for it) is hashed together with the hash of the
stage before it. A finished stage writes ``OUTPUT/STAGE/.stage.json`` holding
that hash; on the next run, a stage whose recorded hash matches is skipped, and
one whose hash changed — its config or anything upstream — runs again, from a
clean directory, and so does everything after it. ``--from STAGE`` forces a
rerun from that stage on. A stage that fails leaves the earlier stages'
outputs untouched and no marker of its own, and the error names it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from rlhfkit import models
from rlhfkit.config import ConfigError, from_dict, merge_sections, to_dict
from rlhfkit.data.io import atomic_write_text

STAGES = ("sft", "sample", "label", "reward", "rl", "eval", "report")


class StageError(RuntimeError):
    """A pipeline stage failed; ``stage`` names it."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")


@dataclass
class PipelineConfig:
    """Config of a pipeline run. Per-stage sections override that stage's config keys."""

    output_dir: str = "runs/pipeline"
    """Root directory; each stage writes to OUTPUT_DIR/STAGE."""
    model: str = models.SMOLLM2
    """Starting model spec."""
    algorithm: Literal["dpo", "ppo", "grpo", "rloo"] = "dpo"
    """Policy-optimisation stage."""
    gold: str = "demo"
    """The simulated annotator's score function (labels) and the gold scorer (evaluation)."""
    seed: int = 0
    """Seed passed to every stage."""
    sft: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config sft` keys."""
    sample: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config sample` keys."""
    label: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config label` keys."""
    reward: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config reward` keys."""
    rl: dict[str, Any] = field(default_factory=dict)
    """Overrides of the chosen algorithm's keys (`rlhfkit config dpo|ppo|grpo|rloo`)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Overrides of `rlhfkit config eval` keys."""


@dataclass
class Stage:
    name: str
    config: Any
    run: Callable[[Any], Any]
    directory: Path


def build_stages(p: PipelineConfig) -> list[Stage]:
    """Every stage's typed config, wired to the outputs of the stages before it."""
    from rlhfkit import dpo, evaluate, label, report, reward, rl, sample, sft

    out = Path(p.output_dir)
    d = {name: out / name for name in STAGES}

    def make(cls, name: str, wired: dict[str, Any], overrides: dict[str, Any]):
        clash = sorted(set(overrides) & set(wired) - {"seed"})
        if clash:
            raise ConfigError(f"pipeline: section '{name}' may not set '{clash[0]}' (the pipeline wires it)")
        return from_dict(cls, {**wired, **overrides}, source=f"pipeline section '{name}'")

    labels = str(d["label"] / "labels.jsonl")
    stages = [
        Stage("sft", make(sft.SFTConfig, "sft", {"model": p.model, "output_dir": str(d["sft"]), "seed": p.seed}, p.sft),
              sft.train, d["sft"]),
        Stage("sample", make(sample.SampleConfig, "sample", {"model": str(d["sft"]), "output": str(d["sample"] / "samples.jsonl"),
                                                             "seed": p.seed}, p.sample), sample.run, d["sample"]),
        Stage("label", make(label.LabelConfig, "label", {"samples": str(d["sample"] / "samples.jsonl"), "output": labels,
                                                         "scorer": p.gold, "seed": p.seed}, p.label), label.run, d["label"]),
        Stage("reward", make(reward.RewardConfig, "reward", {"model": str(d["sft"]), "data": labels,
                                                             "output_dir": str(d["reward"]), "seed": p.seed}, p.reward),
              reward.train, d["reward"]),
    ]
    if p.algorithm == "dpo":
        rl_config = make(dpo.DPOConfig, "rl", {"model": str(d["sft"]), "data": labels, "output_dir": str(d["rl"]),
                                               "seed": p.seed}, p.rl)
        stages.append(Stage("rl", rl_config, dpo.train, d["rl"]))
    else:
        cls = {"ppo": rl.RLConfig, "grpo": rl.GRPOConfig, "rloo": rl.RLOOConfig}[p.algorithm]
        rl_config = make(cls, "rl", {"policy": str(d["sft"]), "reward_model": str(d["reward"]),
                                     "output_dir": str(d["rl"]), "seed": p.seed}, p.rl)
        stages.append(Stage("rl", rl_config, rl.train, d["rl"]))
    stages.append(Stage("eval", make(evaluate.EvalConfig, "eval", {
        "policy": str(d["rl"]), "baseline": str(d["sft"]), "gold": p.gold, "proxy": str(d["reward"]),
        "output": str(d["eval"] / "eval.json"), "seed": p.seed}, p.eval), evaluate.run, d["eval"]))
    stages.append(Stage("report", report.ReportConfig(run_dir=str(out), output=str(out / "report.html")),
                        report.run, d["report"]))
    return stages


def _hash(config: Any, upstream: str) -> str:
    payload = json.dumps({"config": to_dict(config), "type": type(config).__name__, "upstream": upstream},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _marker(stage: Stage) -> Path:
    return stage.directory / ".stage.json"


def _publish_eval(stage: Stage, out: Path) -> None:
    """Copy the eval stage's ``eval.json`` next to ``report.html`` (where users look first)."""
    results = Path(stage.config.output)
    if results.is_file():
        atomic_write_text(out / "eval.json", results.read_text())


def _run_stage(stage: Stage, digest: str, start: float) -> None:
    """Run one stage from a clean directory; on success, record its hash in the marker."""
    # A stale or partial output must not leak into the new run (trainers resume from checkpoints).
    if stage.directory.exists():
        shutil.rmtree(stage.directory)
    stage.directory.mkdir(parents=True)
    print(f"pipeline: {stage.name}: running ({time.time() - start:.0f}s elapsed)")
    t0 = time.time()
    try:
        stage.run(stage.config)
    except Exception as e:  # noqa: BLE001 - re-raised with the stage name
        raise StageError(stage.name, e) from e
    atomic_write_text(_marker(stage), json.dumps({"hash": digest, "seconds": round(time.time() - t0, 1),
                                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def run(config: PipelineConfig, *, from_stage: str | None = None) -> dict[str, str]:
    """Run (or resume) the pipeline. Returns ``{stage: "ran" | "skipped"}``."""
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from: unknown stage '{from_stage}' (stages: {', '.join(STAGES)})")
    stages = build_stages(config)  # all configs are checked before anything runs
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline.json", json.dumps(to_dict(config), indent=2, default=str))
    status: dict[str, str] = {}
    upstream = ""
    forced = False
    start = time.time()
    for stage in stages:
        digest = _hash(stage.config, upstream)
        upstream = digest
        forced = forced or stage.name == from_stage
        marker = _marker(stage)
        recorded = json.loads(marker.read_text())["hash"] if marker.exists() else None
        if not forced and recorded == digest and stage.name != "report":
            print(f"pipeline: {stage.name}: up to date, skipped")
            status[stage.name] = "skipped"
        else:
            _run_stage(stage, digest, start)
            status[stage.name] = "ran"
        if stage.name == "eval":  # the headline numbers also sit next to report.html
            _publish_eval(stage, out)
    print(f"pipeline: done in {time.time() - start:.0f}s -> {out / 'report.html'}")
    return status


def demo_config(**overrides: Any) -> PipelineConfig:
    """The built-in demo: SmolLM2-135M, shipped data, the polite/positive/concise rubric."""
    base: dict[str, Any] = {
        "output_dir": "runs/demo",
        "model": models.SMOLLM2,
        "algorithm": "dpo",
        "gold": "demo",
        "sft": {"num_epochs": 2, "lr": 5e-5, "batch_size": 8, "eval_every": 20, "save_every": 40},
        "sample": {"max_prompts": 128, "max_new_tokens": 64, "batch_size": 32},
        # The rubric's score gaps are small (median ~0.12): a low Bradley-Terry temperature keeps
        # the simulated labels informative (median P(preferred) ~0.9) instead of near-coin flips.
        "label": {"temperature": 0.05},
        "reward": {"num_epochs": 2, "lr": 3e-5, "batch_size": 8, "eval_every": 10},
        "rl": {"num_epochs": 2, "lr": 3e-5, "beta": 0.1, "batch_size": 8, "eval_every": 10},
        "eval": {"max_new_tokens": 64, "best_of_n": 4, "batch_size": 32},
    }
    return from_dict(PipelineConfig, merge_sections(base, overrides), source="demo")
