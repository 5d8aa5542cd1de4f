"""benchmarks/gpu_check.py: its CPU dry run end to end, and its checks of a stage's metrics on hand-written files.

The GPU run itself (SmolLM2-135M's shape in bf16 on CUDA, and the vLLM rollout engine) is not tested here: there is
no GPU. The dry run (``--device cpu --tiny``) goes through the same code: model preparation, data, the four stage
calls, reading their metrics.jsonl back, the rates and MFU, the vLLM line, the summary and the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def write_metrics(path: Path, lines: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path / "metrics.jsonl"


def test_cpu_dry_run_runs_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "gpu_check: OK" in proc.stdout, log
    assert "vllm: NOT RUN" in proc.stdout, log  # never on CPU; here vLLM is not even installed
    if importlib.util.find_spec("vllm") is None:
        assert "vllm: NOT RUN (not installed)" in proc.stdout, log
    assert "model: rlhfkit's tiny" in proc.stdout, log
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["ok"] is True and summary["failures"] == []
    assert summary["vllm"].startswith("NOT RUN")
    assert set(gpu_check.STAGES) <= set(summary["stages"])
    for name in gpu_check.STAGES:
        stage = summary["stages"][name]
        assert stage["ok"], stage
        assert stage["steps"] == stage["planned_steps"] == (gpu_check.TINY.rl_steps if name == "grpo" else gpu_check.TINY.steps)
        assert math.isfinite(stage["loss_first"]) and math.isfinite(stage["loss_last"]), stage
        assert stage["tokens_per_s"] > 0 and stage["mfu"] > 0, stage
        assert f"{name} " in proc.stdout and "tok/s" in proc.stdout
    assert summary["stages"]["grpo"]["gen_tokens_per_s"] > 0


def test_a_nan_loss_fails_the_stage_and_the_check(tmp_path, capsys):
    lines = [
        '{"step": 1, "time": 1.0, "loss": 2.5, "tokens_per_s": 100.0, "tokens_seen": 100}',
        '{"step": 2, "time": 2.0, "loss": "nan", "tokens_per_s": 100.0, "tokens_seen": 200}',  # rlhfkit's logger
        '{"step": 3, "time": 3.0, "loss": NaN, "tokens_per_s": 100.0, "tokens_seen": 300}',  # a bare NaN
    ]
    out = tmp_path / "sft"
    env = gpu_check.Env(type("Args", (), {"peak_tflops": 989.0})(), gpu_check.TINY, n_policy=1000, n_reward=500)
    result = gpu_check.run_stage(
        "sft",
        out,
        lambda: write_metrics(out, lines),
        env,
        kind="loop",
        flops_per_token=6000.0,
        formula="6N",
        loss_key="loss",
        planned=3,
    )
    assert not result["ok"]
    assert result["problems"] == ["step 2: loss = nan is not finite", "step 3: loss = nan is not finite"]
    assert result["tokens_per_s"] == pytest.approx(100.0)  # steps 2-3 (warm-up 1 left out)

    good = [{"stage": s, "ok": True, "problems": []} for s in ("reward", "dpo", "grpo")]
    status = gpu_check.finish({}, [result, *good], [], str(tmp_path / "summary.json"))
    printed = capsys.readouterr().out
    assert status == 1
    assert "gpu_check: FAILED sft: step 2: loss = nan is not finite" in printed
    assert "gpu_check: OK" not in printed
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["ok"] is False and summary["stages"]["sft"]["ok"] is False


@pytest.mark.parametrize(
    "lines, problem",
    [
        (['{"step": 1, "update/policy_loss": "inf"}'], "step 1: update/policy_loss = inf is not finite"),
        (['{"step": 1, "eval_loss": "-inf"}'], "step 1: eval_loss = -inf is not finite"),
        (['{"step": 1, "loss": "oops"}'], "step 1: loss = 'oops' is not a number"),
        (['{"step": 1, "lr": 0.1}'], "no loss was logged in metrics.jsonl"),
        (["{not json"], "metrics.jsonl line 1 is not a JSON object"),
        ([], "metrics.jsonl is missing or empty"),
    ],
)
def test_check_losses_reports(tmp_path, lines, problem):
    path = write_metrics(tmp_path, lines) if lines else tmp_path / "absent.jsonl"
    assert gpu_check.check_losses(gpu_check.read_metrics(path)) == [problem]


def test_finite_losses_pass_and_a_missing_stage_fails(tmp_path, capsys):
    path = write_metrics(tmp_path, ['{"step": 1, "loss": 0.5, "update/policy_loss": -0.1, "rollout/score": "nan"}'])
    assert gpu_check.check_losses(gpu_check.read_metrics(path)) == []  # only losses are checked
    ok, reasons = gpu_check.verdict([{"stage": s, "ok": True} for s in ("sft", "sft_lora", "reward", "dpo")])
    assert not ok and reasons == ["grpo: did not run"]
    assert gpu_check.finish({}, [{"stage": s, "ok": True} for s in gpu_check.STAGES], ["vllm: not run"], None) == 1
    assert capsys.readouterr().out.strip().endswith("gpu_check: FAILED vllm: not run")


@pytest.mark.parametrize("stored", [True, False])
def test_the_lora_stage_fails_unless_the_frozen_base_is_stored_in_bf16(tmp_path, monkeypatch, stored):
    from types import SimpleNamespace

    from rlhfkit.data.prompts import demo_data_path
    from rlhfkit.modeling import models

    if not stored:
        monkeypatch.setattr(models, "store_frozen_linears", lambda model, dtype: None)
    args = SimpleNamespace(precision="bf16", peak_tflops=1.0)
    env = gpu_check.Env(args, gpu_check.Sizes(**gpu_check.TINY.__dict__), n_policy=1_000_000, n_reward=1_000_000)
    result = gpu_check.stage_sft_lora(env, models.TINY, demo_data_path("sft.jsonl"), tmp_path)
    assert result["steps"] == gpu_check.TINY.steps
    if stored:
        assert result["ok"] and result["frozen_dtypes"] == ["torch.bfloat16"], result
    else:
        assert not result["ok"] and result["frozen_dtypes"] == [], result
        assert any("LoRA base not stored in torch.bfloat16" in p for p in result["problems"])


def test_sampler_check():
    records = [
        {"step": 1, "rollout/sampler_logp_diff": 0.01, "rollout/sampler_logp_diff_max": 0.2},
        {"step": 2, "rollout/sampler_logp_diff": 0.03, "rollout/sampler_logp_diff_max": 0.4},
    ]
    stats = gpu_check.sampler_stats(records)
    assert stats["rollout/sampler_logp_diff"]["mean"] == pytest.approx(0.02)
    assert stats["rollout/sampler_logp_diff_max"]["max"] == pytest.approx(0.4)
    assert gpu_check.check_sampler(stats, 0.5) == []
    assert gpu_check.check_sampler(stats, 0.01) == ["mean |trainer - vLLM| log-prob difference 0.0200 nats is not below 0.01"]
    assert gpu_check.check_sampler({}, 0.5) == ["no trainer-vs-sampler log-prob metric (a name containing 'sampler') was logged"]
    bad = gpu_check.sampler_stats([*records, {"step": 3, "rollout/sampler_logp_diff": "nan"}])
    assert gpu_check.check_sampler(bad, 0.5) == ["rollout/sampler_logp_diff is not finite at 1 of 3 steps"]


def test_rl_throughput_leaves_out_the_warmup():
    records = [
        {"step": s, "train_tokens_per_s": 1000.0, "time_update": 1.0, "time_step": 4.0, "gen_tokens_per_s": 50.0,
         "time_generate": 2.0}
        for s in (1, 2, 3)
    ]  # fmt: skip
    records[0]["time_step"] = 40.0  # a slow first step: left out
    rate = gpu_check.rl_throughput(records, warmup=1)
    assert rate["tokens_per_s"] == pytest.approx(250.0) and rate["gen_tokens_per_s"] == pytest.approx(50.0)
    assert (rate["first_step"], rate["last_step"]) == (2, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal is for machines without CUDA")
def test_refuses_the_full_check_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() sets a few variables: keep them to this test
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "gpu_check: FAILED no CUDA device" in capsys.readouterr().out
    assert json.loads((tmp_path / "x.json").read_text(encoding="utf-8"))["ok"] is False
