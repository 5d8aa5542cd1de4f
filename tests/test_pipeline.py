"""Pipeline orchestration: stage skipping, config-hash invalidation, --from, failures.

The orchestration tests replace each stage's function with a recorder that
writes a file into its output directory, so they test the pipeline logic alone
in milliseconds; one test runs the real stages end to end on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit import dpo, evaluate, label, pipeline, report, reward, sample, sft
from rlhfkit.config import ConfigError

ORDER = ["sft", "sample", "label", "reward", "rl", "eval", "report"]


@pytest.fixture
def calls(monkeypatch):
    """Replace every stage function with a recorder; returns the list of stages run."""
    ran: list[str] = []

    def recorder(name, directory_of):
        def fn(config):
            ran.append(name)
            out = Path(directory_of(config))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.out").write_text(f"output of {name}")

        return fn

    monkeypatch.setattr(sft, "train", recorder("sft", lambda c: c.output_dir))
    monkeypatch.setattr(sample, "run", recorder("sample", lambda c: Path(c.output).parent))
    monkeypatch.setattr(label, "run", recorder("label", lambda c: Path(c.output).parent))
    monkeypatch.setattr(reward, "train", recorder("reward", lambda c: c.output_dir))
    monkeypatch.setattr(dpo, "train", recorder("rl", lambda c: c.output_dir))
    monkeypatch.setattr(evaluate, "run", recorder("eval", lambda c: Path(c.output).parent))
    monkeypatch.setattr(report, "run", recorder("report", lambda c: Path(c.run_dir) / "report"))
    return ran


def config(tmp_path, **overrides):
    base = {"output_dir": str(tmp_path / "run"), "model": "tiny"}
    base.update(overrides)
    return pipeline.PipelineConfig(**base)


def test_first_run_runs_every_stage_in_order(tmp_path, calls):
    status = pipeline.run(config(tmp_path))
    assert calls == ORDER
    assert all(status[s] == "ran" for s in ORDER)
    for stage in ORDER[:-1]:
        marker = json.loads((tmp_path / "run" / stage / ".stage.json").read_text())
        assert len(marker["hash"]) == 64


def test_second_run_skips_finished_stages(tmp_path, calls):
    pipeline.run(config(tmp_path))
    calls.clear()
    status = pipeline.run(config(tmp_path))
    assert calls == ["report"]  # the report is always regenerated (cheap)
    assert [s for s in ORDER if status[s] == "skipped"] == ORDER[:-1]


def test_changed_stage_config_reruns_it_and_everything_after(tmp_path, calls):
    pipeline.run(config(tmp_path))
    calls.clear()
    status = pipeline.run(config(tmp_path, reward={"lr": 1e-4}))
    assert calls == ["reward", "rl", "eval", "report"]
    assert status["sft"] == status["sample"] == status["label"] == "skipped"


def test_changed_upstream_config_invalidates_downstream(tmp_path, calls):
    pipeline.run(config(tmp_path))
    calls.clear()
    pipeline.run(config(tmp_path, sft={"lr": 1e-4}))
    assert calls == ORDER


def test_from_stage_forces_rerun_from_there(tmp_path, calls):
    pipeline.run(config(tmp_path))
    calls.clear()
    pipeline.run(config(tmp_path), from_stage="label")
    assert calls == ["label", "reward", "rl", "eval", "report"]


def test_unknown_from_stage_is_an_error(tmp_path, calls):
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        pipeline.run(config(tmp_path), from_stage="nope")
    assert calls == []


def test_failing_stage_names_itself_and_leaves_earlier_outputs_intact(tmp_path, calls, monkeypatch):
    pipeline.run(config(tmp_path))
    run = tmp_path / "run"
    before = {p: p.read_bytes() for stage in ("sft", "sample", "label") for p in (run / stage).rglob("*") if p.is_file()}
    assert len(before) == 6  # an output and a marker per stage

    def broken(cfg):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(reward, "train", broken)
    calls.clear()
    with pytest.raises(pipeline.StageError, match="stage 'reward' failed: RuntimeError: disk on fire") as info:
        pipeline.run(config(tmp_path, reward={"lr": 1e-4}))
    assert info.value.stage == "reward"
    assert calls == []  # sft, sample, label skipped; reward failed before recording
    after = {p: p.read_bytes() for p in before}
    assert after == before  # earlier stages untouched
    assert not (tmp_path / "run" / "reward" / ".stage.json").exists()


def test_rerun_after_failure_resumes_at_failed_stage(tmp_path, calls, monkeypatch):
    pipeline.run(config(tmp_path))
    original = reward.train

    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(reward, "train", broken)
    with pytest.raises(pipeline.StageError):
        pipeline.run(config(tmp_path, reward={"lr": 1e-4}))
    monkeypatch.setattr(reward, "train", original)
    calls.clear()
    pipeline.run(config(tmp_path, reward={"lr": 1e-4}))
    assert calls == ["reward", "rl", "eval", "report"]


def test_section_may_not_override_wiring(tmp_path, calls):
    with pytest.raises(ConfigError, match="section 'rl' may not set 'data'"):
        pipeline.run(config(tmp_path, rl={"data": "elsewhere.jsonl"}))
    assert calls == []


def test_unknown_key_in_a_section_names_the_section(tmp_path, calls):
    with pytest.raises(ConfigError, match="pipeline section 'reward'.*unknown key 'lrr'"):
        pipeline.run(config(tmp_path, reward={"lrr": 1}))


def test_dotted_cli_overrides_reach_sections(tmp_path):
    from rlhfkit.config import load_config

    path = tmp_path / "p.yaml"
    path.write_text("output_dir: x\nreward:\n  lr: 0.001\n  num_epochs: 3\n")
    cfg = load_config(pipeline.PipelineConfig, path, ["reward.lr=1e-5", "rl.beta=0.2"])
    assert cfg.reward == {"lr": 1e-5, "num_epochs": 3}
    assert cfg.rl == {"beta": 0.2}


@pytest.mark.slow
def test_real_pipeline_on_tiny_model(tmp_path):
    """Every real stage, wired together, on the tiny model (seconds per stage)."""
    cfg = pipeline.PipelineConfig(
        output_dir=str(tmp_path / "run"), model="tiny", algorithm="dpo",
        sft={"max_steps": 2, "batch_size": 4, "progress": False},
        sample={"max_prompts": 8, "max_new_tokens": 8, "batch_size": 8, "progress": False},
        reward={"max_steps": 2, "batch_size": 2, "progress": False, "eval_fraction": 0.25},
        rl={"max_steps": 2, "batch_size": 2, "progress": False, "eval_fraction": 0.25},
        eval={"max_prompts": 4, "max_new_tokens": 8, "best_of_n": 2, "bootstrap": 20, "progress": False},
    )
    status = pipeline.run(cfg)
    assert all(v == "ran" for v in status.values())
    run = tmp_path / "run"
    results = json.loads((run / "eval.json").read_text())  # the interface: DIR/eval.json
    assert results == json.loads((run / "eval" / "eval.json").read_text())
    for key in ("win_rate", "gold_score_policy", "gold_score_baseline", "kl"):
        assert isinstance(results[key], float)
    assert (run / "report.html").is_file()
    assert (run / "rl" / "model.safetensors").is_file()


@pytest.mark.slow
def test_iterated_dpo_keeps_every_round(tmp_path):
    from rlhfkit import iterated

    cfg = iterated.IteratedDPOConfig(
        model="tiny", rounds=2, prompts_per_round=4, output_dir=str(tmp_path / "it"), reference="refresh",
        sample={"max_new_tokens": 6, "batch_size": 4, "progress": False},
        label={"scorer": "tests.helpers:characters"},
        dpo={"max_steps": 1, "batch_size": 2, "eval_fraction": 0.0, "progress": False, "ref_cache": False},
    )
    dirs = iterated.run(cfg)
    assert [d.name for d in dirs] == ["model", "model"]
    for k in range(2):
        round_dir = tmp_path / "it" / f"round-{k}"
        assert len((round_dir / "samples.jsonl").read_text().splitlines()) == 4
        assert len((round_dir / "labels.jsonl").read_text().splitlines()) == 4
        assert (round_dir / "model" / "config.json").is_file()
    # Round 1 sampled from round 0's model; its DPO reference was that model too ("refresh").
    import yaml

    round1 = yaml.safe_load((tmp_path / "it" / "round-1" / "model" / "config.yaml").read_text())
    assert round1["model"] == str(tmp_path / "it" / "round-0" / "model")
    assert round1["ref_model"] == ""
    # A second call finds both rounds done.
    assert iterated.run(cfg) == dirs
