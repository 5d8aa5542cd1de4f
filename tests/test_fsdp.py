"""Reward, DPO and online RL under FSDP2 on two CPU processes equal the same runs under DDP.

The runs go through ``accelerate launch --use_fsdp --fsdp_version 2`` with transformer-layer auto-wrap, full
state dicts and resharding after forward (:func:`tests.helpers.launch_two_cpu_processes` with ``fsdp=True``;
``tests/fsdp_on_cpu.py`` lets accelerate run its FSDP plugin on CPU processes). Each process then holds half of
every parameter as a DTensor shard. SFT under FSDP2 (with accumulation, a checkpoint and a resume) is in
``tests/test_distributed_loop.py``.

What each run exercises and what failed before ``training.sharding``:

* **reward**: the final save scores the normalisation samples on the main process alone; on shards those forwards
  were all-gathers the other process never joined (a hang, review D3).
* **dpo** with a frontier probe: the probe generates on the main process alone (transformers' ``synced_gpus``
  all-reduce per decode step, a hang); the stand-alone command also failed at start-up under a CPU launch
  (``attach_reference`` set up a one-process state).
* **ppo** with a value head, PPO-ptx, a probe and a checkpoint, and **grpo** sampled: generation called the
  unwrapped policy, whose root parameters (embeddings, head) were still shards (``aten.embedding got mixed
  torch.Tensor and DTensor``, review D2); FSDP2's meta-device loading untied the LM head from the embeddings of the
  ``ActorCritic``; the final save wrote from shards.

DDP and FSDP2 run the same arithmetic on the same data here (two processes, the same seeds and rows), so the
metrics and weights agree to float rounding; sampled GRPO draws the same responses in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.config import ConfigError
from rlhfkit.data.prompts import demo_data_path
from rlhfkit.modeling import models
from rlhfkit.training import sharding
from tests.helpers import assert_same_weights, launch_two_cpu_processes, read_jsonl, write_jsonl
from tests.test_dpo import polite_rude_records

SCORERS = '''
def characters(prompts, responses, **kwargs):
    """Characters of the response plus the prompt's length mod 5 (the tiny model's greedy replies are blank)."""
    return [float(len(r) + len(str(p)) % 5) for p, r in zip(prompts, responses)]
'''


def is_timing(key: str) -> bool:
    """What depends on the clock, not on the run."""
    return key.startswith("time") or key.endswith("_per_s") or key == "tok_s"


COMMON = dict(model=models.TINY, precision="fp32", progress=False, tensorboard=False, lr=1e-3, seed=3)
RL = dict(
    policy=models.TINY,
    precision="fp32",
    progress=False,
    tensorboard=False,
    lr=1e-3,
    seed=1,
    reward_model="fsdp_scorers:characters",
    max_new_tokens=6,
    log_samples=0,
    max_steps=2,
    batch_size=4,
)
PROBE = dict(gold="fsdp_scorers:characters", probe_points=1, probe_max_prompts=4, probe_max_new_tokens=4)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "fsdp_scorers.py").write_text(SCORERS, encoding="utf-8")
    write_jsonl(tmp_path / "prefs.jsonl", polite_rude_records())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_both(stage: str, fields: dict, workdir: Path) -> dict[str, Path]:
    """``rlhfkit STAGE`` with ``fields`` under DDP and under FSDP2 (two processes each); the two output dirs."""
    outs = {}
    for mode in ("ddp", "fsdp"):
        out = workdir / f"{stage}-{mode}"
        config_file = workdir / f"{stage}-{mode}.yaml"
        config_file.write_text(yaml.safe_dump({**fields, "output_dir": str(out)}), encoding="utf-8")
        proc = launch_two_cpu_processes(
            ["-m", "rlhfkit.cli", stage, str(config_file)], cwd=workdir, timeout=300, fsdp=mode == "fsdp"
        )
        assert proc.returncode == 0, f"{mode}: {proc.stderr[-4000:]}"
        outs[mode] = out
    return outs


def assert_same_metrics(outs: dict[str, Path], *, rel: float) -> list[dict]:
    """Both runs logged the same steps and values (bar timings); returns the FSDP run's records."""
    ddp, fsdp = (read_jsonl(outs[m] / "metrics.jsonl") for m in ("ddp", "fsdp"))
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp]
    for a, b in zip(ddp, fsdp, strict=True):
        assert a.keys() == b.keys()
        for key in (k for k in a if not is_timing(k)):
            if isinstance(a[key], float):
                # abs: a DPO reward is beta x (a difference of two ~-100 log-probs), so its reduction-order rounding
                # is absolute, not relative (FSDP2 against DDP on an avx512 CPU: 0.0191927 against 0.0191921)
                assert b[key] == pytest.approx(a[key], rel=rel, abs=2e-6), f"step {a['step']}: {key}"
    return fsdp


def assert_same_files(outs: dict[str, Path], name: str, *, atol: float) -> None:
    assert_same_weights(load_file(str(outs["fsdp"] / name)), load_file(str(outs["ddp"] / name)), atol=atol)


@pytest.mark.slow
def test_reward_model_under_fsdp2_saves_its_normalisation_as_ddp_does(workdir):
    fields = {**COMMON, "data": "prefs.jsonl", "eval_fraction": 0.0, "max_length": 64, "batch_size": 2, "max_steps": 3}
    outs = run_both("reward", fields, workdir)
    assert_same_metrics(outs, rel=1e-5)
    assert_same_files(outs, "model.safetensors", atol=1e-5)
    ddp, fsdp = (json.loads((outs[m] / "config.json").read_text()) for m in ("ddp", "fsdp"))
    for key in ("rlhfkit_reward_gain", "rlhfkit_reward_bias"):
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-4), key
    assert fsdp["rlhfkit_reward_gain"] != 1.0  # the normalisation ran
    AutoModelForSequenceClassification.from_pretrained(outs["fsdp"])


@pytest.mark.slow
def test_dpo_under_fsdp2_with_a_probe_and_a_checkpoint_equals_ddp(workdir):
    fields = {
        **COMMON,
        **PROBE,
        "data": "prefs.jsonl",
        "eval_fraction": 0.0,
        "max_length": 64,
        "lr_schedule": "constant",
        "batch_size": 2,
        "max_steps": 3,
        "save_every": 2,
    }
    outs = run_both("dpo", fields, workdir)
    records = assert_same_metrics(outs, rel=1e-5)
    assert records[-1]["loss"] < records[0]["loss"]
    assert (outs["fsdp"] / "checkpoints" / "step-0000002" / "pytorch_model_fsdp.bin").is_file()
    probes = [read_jsonl(outs[m] / "frontier.jsonl") for m in ("ddp", "fsdp")]
    assert [p["step"] for p in probes[1]] == [0, 3]
    assert [p["gold"] for p in probes[1]] == [p["gold"] for p in probes[0]]
    assert_same_files(outs, "model.safetensors", atol=1e-5)
    AutoModelForCausalLM.from_pretrained(outs["fsdp"])


@pytest.mark.slow
def test_ppo_with_a_value_head_ptx_probe_and_checkpoint_under_fsdp2_equals_ddp(workdir):
    fields = {**RL, **PROBE, "save_every": 1, "ptx_data": str(demo_data_path("sft.jsonl")), "ptx_coef": 0.5, "ptx_max_length": 48}
    outs = run_both("ppo", fields, workdir)
    assert_same_metrics(outs, rel=1e-5)
    assert_same_files(outs, "model.safetensors", atol=1e-5)
    assert_same_files(outs, "value_head.safetensors", atol=1e-5)
    assert [p["step"] for p in read_jsonl(outs["fsdp"] / "frontier.jsonl")] == [0, 2]
    assert (outs["fsdp"] / "checkpoints" / "step-0000002").is_dir()
    # The LM head stayed tied to the embeddings (FSDP2's meta-device loading re-ties through ActorCritic.tie_weights).
    saved = load_file(str(outs["fsdp"] / "model.safetensors"))
    assert "lm_head.weight" not in saved
    loaded = AutoModelForCausalLM.from_pretrained(outs["fsdp"])
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


@pytest.mark.slow
def test_sampled_grpo_under_fsdp2_draws_and_learns_as_ddp_does(workdir):
    outs = run_both("grpo", {**RL, "max_steps": 3}, workdir)
    assert_same_metrics(outs, rel=1e-5)
    assert_same_files(outs, "model.safetensors", atol=1e-5)
    start = models.build_tiny().state_dict()
    trained = load_file(str(outs["fsdp"] / "model.safetensors"))
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-4  # the steps changed the weights


class FakeAccelerator:
    def __init__(self, distributed_type, *, fsdp2: bool = False, zero_stage: int | None = None):
        from types import SimpleNamespace

        self.distributed_type = distributed_type
        self.is_fsdp2 = fsdp2
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))


def test_rl_refuses_fsdp1_and_zero3_and_takes_fsdp2_zero2_and_ddp():
    from accelerate.utils import DistributedType as D

    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding.check_rl_sharding(FakeAccelerator(D.FSDP, fsdp2=False))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        sharding.check_rl_sharding(FakeAccelerator(D.DEEPSPEED, zero_stage=3))
    for acc in (FakeAccelerator(D.FSDP, fsdp2=True), FakeAccelerator(D.DEEPSPEED, zero_stage=2), FakeAccelerator(D.MULTI_GPU)):
        sharding.check_rl_sharding(acc)
