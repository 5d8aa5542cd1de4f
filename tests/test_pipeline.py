"""Pipeline orchestration: stage skipping, config-hash invalidation, --from, failures.

The orchestration tests replace each stage's function with a recorder that
writes a file into its output directory, so they test the pipeline logic alone
in milliseconds; one test runs the real stages end to end on the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from rlhfkit import dpo, evaluate, label, pipeline, report, reward, rl, sample, sft
from rlhfkit.config import ConfigError

ORDER = ["sft", "sample", "label", "reward", "gate", "dpo", "eval", "report"]
REAL_SFT_TRAIN = sft.train  # before the `calls` fixture replaces it


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
    monkeypatch.setattr(dpo, "train", recorder("dpo", lambda c: c.output_dir))
    monkeypatch.setattr(rl, "train", recorder("rl", lambda c: c.output_dir))
    monkeypatch.setattr(pipeline, "check_gate", recorder("gate", lambda c: Path(c.output).parent))
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
    assert calls == ["reward", "gate", "dpo", "eval", "report"]
    assert status["sft"] == status["sample"] == status["label"] == "skipped"


def test_an_input_file_edited_in_place_reruns_its_stage(tmp_path, calls):
    """The stage hash covers the contents of the files a config names, not only their paths."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n', encoding="utf-8")
    pipeline.run(config(tmp_path, sample={"prompts": str(prompts)}))
    calls.clear()
    pipeline.run(config(tmp_path, sample={"prompts": str(prompts)}))
    assert calls == ["report"]  # same contents: skipped
    prompts.write_text('{"prompt": "b"}\n', encoding="utf-8")
    calls.clear()
    status = pipeline.run(config(tmp_path, sample={"prompts": str(prompts)}))
    assert calls == ["sample", "label", "reward", "gate", "dpo", "eval", "report"]
    assert status["sft"] == "skipped"


def test_a_new_rlhfkit_version_reruns_every_stage(tmp_path, calls, monkeypatch):
    import rlhfkit

    pipeline.run(config(tmp_path))
    calls.clear()
    monkeypatch.setattr(rlhfkit, "__version__", rlhfkit.__version__ + ".post1")
    pipeline.run(config(tmp_path))
    assert calls == ORDER


def test_changed_upstream_config_invalidates_downstream(tmp_path, calls):
    pipeline.run(config(tmp_path))
    calls.clear()
    pipeline.run(config(tmp_path, sft={"lr": 1e-4}))
    assert calls == ORDER


def test_from_stage_forces_rerun_from_there(tmp_path, calls):
    pipeline.run(config(tmp_path))
    calls.clear()
    pipeline.run(config(tmp_path), from_stage="label")
    assert calls == ["label", "reward", "gate", "dpo", "eval", "report"]


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
    # Its own earlier output is back, marker and all (the marker's hash is the earlier config's: it reruns).
    assert (run / "reward" / "reward.out").read_text() == "output of reward"
    assert not (run / ".reward.previous").exists()


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
    assert calls == ["reward", "gate", "dpo", "eval", "report"]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_rerun_with_broken_sft_data_keeps_the_finished_sft_model(tmp_path, calls, monkeypatch, capsys, qa_file):
    """`rlhfkit run` once deleted the finished sft stage's model before the new sft data was even read: a rerun
    pointed at a broken file lost the model (10 files), then failed cleanly; pipeline.json was rewritten first."""
    import yaml

    from rlhfkit import cli

    monkeypatch.setattr(sft, "train", REAL_SFT_TRAIN)  # the real sft stage on the tiny model; the rest record
    sft_section = {
        "data": str(qa_file),
        "max_steps": 1,
        "batch_size": 2,
        "eval_fraction": 0.0,
        "precision": "fp32",
        "progress": False,
        "tensorboard": False,
    }
    good = tmp_path / "pipeline.yaml"
    good.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "model": "tiny", "sft": sft_section}))
    assert cli.main(["run", str(good)]) == 0
    run = tmp_path / "run"
    before, record = files_of(run / "sft"), (run / "pipeline.json").read_bytes()
    assert "model.safetensors" in before and ".stage.json" in before

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{broken\n', encoding="utf-8")
    bad = tmp_path / "pipeline_bad.yaml"
    bad.write_text(yaml.safe_dump({"output_dir": str(run), "model": "tiny", "sft": {**sft_section, "data": str(broken)}}))
    capsys.readouterr()
    calls.clear()
    assert cli.main(["run", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "stage 'sft' failed" in err and str(broken) in err and "Traceback" not in err
    assert "sft: failed; its earlier output is restored" in out
    assert files_of(run / "sft") == before  # byte-identical, marker included
    assert (run / "pipeline.json").read_bytes() == record  # still the config the outputs were made under
    assert not (run / ".sft.previous").exists()
    assert calls == []

    assert cli.main(["run", str(good)]) == 0  # the earlier config again: nothing is out of date
    assert calls == ["report"]


def test_an_interrupted_stage_restores_its_earlier_output(tmp_path, calls, monkeypatch):
    pipeline.run(config(tmp_path))
    run = tmp_path / "run"
    before, record = files_of(run), (run / "pipeline.json").read_bytes()

    def interrupted(cfg):
        Path(cfg.output_dir, "partial.bin").write_text("half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config(tmp_path, sft={"lr": 1e-4}))
    assert files_of(run) == before and (run / "pipeline.json").read_bytes() == record
    assert not (run / ".sft.previous").exists()


def test_a_successful_rerun_replaces_the_earlier_output_and_the_record(tmp_path, calls):
    pipeline.run(config(tmp_path))
    run = tmp_path / "run"
    (run / "reward" / "stale.bin").write_text("from the earlier run")
    pipeline.run(config(tmp_path, reward={"lr": 1e-4}))
    assert not (run / "reward" / "stale.bin").exists()  # a clean directory, as before
    assert [p.name for p in run.iterdir() if p.name.endswith(".previous")] == []
    assert json.loads((run / "pipeline.json").read_text())["reward"] == {"lr": 1e-4}


def test_pipeline_json_is_written_as_stages_finish(tmp_path, calls, monkeypatch):
    run = tmp_path / "run"

    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(sft, "train", broken)
    with pytest.raises(pipeline.StageError):
        pipeline.run(config(tmp_path))
    assert not (run / "pipeline.json").exists()  # nothing finished: nothing to describe
    assert not (run / "sft" / ".stage.json").exists()
    monkeypatch.setattr(sft, "train", lambda cfg: None)
    monkeypatch.setattr(sample, "run", broken)
    with pytest.raises(pipeline.StageError, match="stage 'sample'"):
        pipeline.run(config(tmp_path, seed=3))
    assert json.loads((run / "pipeline.json").read_text())["seed"] == 3  # written when sft finished


@pytest.mark.parametrize("state", ["partial", "missing", "finished"])
def test_a_leftover_previous_directory_is_settled_on_the_next_run(tmp_path, calls, state):
    """A run killed (kill -9) while a stage ran again leaves the earlier output in OUTPUT/.STAGE.previous."""
    pipeline.run(config(tmp_path))
    run = tmp_path / "run"
    earlier = files_of(run / "sft")
    (run / "sft").rename(run / ".sft.previous")
    if state == "partial":  # killed mid-stage: a new output without its marker
        (run / "sft").mkdir()
        (run / "sft" / "checkpoint.bin").write_text("half")
    elif state == "finished":  # killed after the new output's marker, before the earlier one was deleted
        (run / "sft").mkdir()
        (run / "sft" / "sft.out").write_text("output of sft")
        (run / "sft" / ".stage.json").write_bytes(earlier[".stage.json"])
        (run / ".sft.previous" / "only-in-earlier.txt").write_text("x")
    calls.clear()
    status = pipeline.run(config(tmp_path))
    assert not (run / ".sft.previous").exists()
    assert status["sft"] == "skipped" and calls == ["report"]  # the recorded hash still decides
    assert files_of(run / "sft") == earlier


def test_a_restored_earlier_output_that_is_out_of_date_reruns(tmp_path, calls):
    pipeline.run(config(tmp_path))
    run = tmp_path / "run"
    (run / "sft").rename(run / ".sft.previous")
    calls.clear()
    pipeline.run(config(tmp_path, sft={"lr": 1e-4}))
    assert calls == ORDER and not (run / ".sft.previous").exists()


def test_section_may_not_override_wiring(tmp_path, calls):
    with pytest.raises(ConfigError, match="section 'rl' may not set 'data'"):
        pipeline.run(config(tmp_path, rl={"data": "elsewhere.jsonl"}))
    assert calls == []


def test_unknown_key_in_a_section_names_the_section(tmp_path, calls):
    with pytest.raises(ConfigError, match="pipeline section 'reward'.*unknown key 'lrr'"):
        pipeline.run(config(tmp_path, reward={"lrr": 1}))


def test_web_db_inside_the_label_directory_is_refused(tmp_path, calls, monkeypatch):
    # A rerun of the label stage deletes its directory: a database there would lose every human label.
    monkeypatch.chdir(tmp_path)
    for web_db in (str(tmp_path / "run" / "label" / "web.sqlite"), "run/label/sub/web.sqlite", "run/x/../label/w.db"):
        with pytest.raises(ConfigError, match=r"pipeline section 'label': web_db .* inside the label stage's directory"):
            pipeline.run(config(tmp_path, label={"source": "human-web", "web_db": web_db}))
    assert calls == [] and not (tmp_path / "run").exists()
    for web_db in ("run/web.sqlite", str(tmp_path / "run" / "labels.sqlite")):  # beside it is fine
        stages = pipeline.build_stages(config(tmp_path, label={"source": "human-web", "web_db": web_db}))
        assert stages[2].config.web_db == web_db


def test_dotted_cli_overrides_reach_sections(tmp_path):
    from rlhfkit.config import load_config

    path = tmp_path / "p.yaml"
    path.write_text("output_dir: x\nreward:\n  lr: 0.001\n  num_epochs: 3\n")
    cfg = load_config(pipeline.PipelineConfig, path, ["reward.lr=1e-5", "rl.beta=0.2"])
    assert cfg.reward == {"lr": 1e-5, "num_epochs": 3}
    assert cfg.rl == {"beta": 0.2}


def assert_headline_numbers_recompute(cfg: pipeline.PipelineConfig, results: dict) -> None:
    """eval.json's win rate, gold scores and KL equal what its listed samples give when recomputed here.

    With one sample per prompt, ``samples`` holds every sample the headline numbers came from: the gold
    scorer re-scores them; the win rate is the fraction of prompts the policy wins (a tie counts half);
    the policy's samples, re-drawn with the eval's seeds, give the KL with every row run on its own
    (no padding) through the policy and the reference (the baseline)."""
    import torch

    from rlhfkit.data.prompts import demo_data_path, load_prompts
    from rlhfkit.modeling import models
    from rlhfkit.rewards import load_reward

    ec = next(s for s in pipeline.build_stages(cfg) if s.name == "eval").config
    assert ec.samples_per_prompt == 1 and not ec.reference
    prompts = load_prompts(ec.prompts or demo_data_path("prompts_eval.jsonl"))[: ec.max_prompts]
    samples = results["samples"]
    assert len(samples) == len(prompts) == results["num_prompts"] == 4
    gold = load_reward(ec.gold, precision=ec.precision)
    policy_gold, baseline_gold = [s["gold_policy"] for s in samples], [s["gold_baseline"] for s in samples]
    assert gold(prompts, [s["policy"] for s in samples]) == pytest.approx(policy_gold)
    assert gold(prompts, [s["baseline"] for s in samples]) == pytest.approx(baseline_gold)
    assert results["gold_score_policy"] == pytest.approx(sum(policy_gold) / 4)
    assert results["gold_score_baseline"] == pytest.approx(sum(baseline_gold) / 4)
    wins = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_gold, baseline_gold)]
    assert results["win_rate"] == pytest.approx(sum(wins) / 4)
    lo, hi = results["win_rate_ci"]
    assert 0.0 <= lo <= results["win_rate"] <= hi <= 1.0

    rollout, policy, _ = evaluate._sample(ec.policy, prompts, ec, "policy", n=1, seed_offset=1)
    assert rollout.responses == [s["policy"] for s in samples]  # the same draw as the eval's
    reference = models.load_causal_lm(ec.baseline).eval()
    kls = []
    with torch.no_grad():
        for i in range(len(prompts)):
            query = rollout.query_ids[i][rollout.query_mask[i]]
            response = rollout.response_ids[i][rollout.response_mask[i]]
            ids = torch.cat([query, response])[None]
            logps = []
            for model in (policy, reference):
                with models.autocast(torch.device("cpu"), ec.precision):
                    logits = model(input_ids=ids).logits[0, len(query) - 1 : -1].float()
                logps.append(torch.log_softmax(logits / ec.temperature, -1).gather(-1, response[:, None]).sum())
            kls.append(float(logps[0] - logps[1]))
    # The eval batches the rows (left-padded) under bf16 autocast; alone they round a little differently
    # (3.5e-4 apart on a KL of 0.237 when written).
    assert results["kl"] == pytest.approx(sum(kls) / 4, abs=0.01), kls


def tiny_real_config(output_dir, **fields) -> pipeline.PipelineConfig:
    """A tiny-model pipeline; ``fields`` replace its settings (a section whole)."""
    settings = dict(
        output_dir=str(output_dir),
        model="tiny",
        algorithm="dpo",
        sft={"max_steps": 2, "batch_size": 4, "progress": False},
        sample={"max_prompts": 8, "max_new_tokens": 8, "batch_size": 8, "progress": False},
        reward={"max_steps": 2, "batch_size": 2, "progress": False, "eval_fraction": 0.25},
        # lr: DPO's default 5e-6 leaves the tiny policy within ~0.01 nats of the SFT model, too close to check the KL.
        rl={"max_steps": 2, "batch_size": 2, "progress": False, "eval_fraction": 0.25, "lr": 1e-3},
        eval={"max_prompts": 4, "max_new_tokens": 8, "best_of_n": 2, "bootstrap": 20, "progress": False},
    )
    return pipeline.PipelineConfig(**{**settings, **fields})


@pytest.mark.slow
def test_stage_processes_give_the_same_run_as_one_process(tmp_path):
    """stage_processes: each model stage in a spawned child, and there (as in the demo on a CPU) sample and eval
    sampling in 2 worker processes; the outputs equal an in-process run's."""
    # fp32 sampling: on a CPU with oneDNN bf16 kernels (avx512_bf16) a bf16 matmul's rounding depends on the batch's
    # shape, so a worker's half batch samples other tokens than the whole batch would (an AVX2 CPU runs bf16 on a
    # reference path, where it did not); this test is about the processes, not the precision.
    fp32 = {"precision": "fp32", "generation_precision": "fp32"}
    sample = {"max_prompts": 8, "max_new_tokens": 8, "batch_size": 4, "progress": False, "precision": "fp32"}
    evaluation = {"max_prompts": 4, "max_new_tokens": 8, "best_of_n": 2, "bootstrap": 20, "progress": False, **fp32}
    reward = {"max_steps": 2, "batch_size": 2, "progress": False, "eval_fraction": 0.25, "precision": "fp32"}
    one = tiny_real_config(tmp_path / "one", sample=sample, eval=evaluation, reward=reward)
    many = tiny_real_config(
        tmp_path / "many", stage_processes=True, sample={**sample, "workers": 2}, eval={**evaluation, "workers": 2}, reward=reward
    )
    pipeline.run(one)
    assert all(v == "ran" for v in pipeline.run(many).values())
    a, b = (json.loads((Path(c.output_dir) / "eval.json").read_text()) for c in (one, many))
    keys = ("win_rate", "win_rate_ci", "gold_score_policy", "gold_score_baseline")
    assert [a[k] for k in keys] == [b[k] for k in keys]
    # The KL's and the reward model's float forwards (and the reward model's training) run on the child's threads:
    # their sums may round in another order (up to 1.7e-3 apart on an avx512_bf16 CPU), so those are compared to a
    # tolerance; every sample, gold score and win rate exactly.
    assert b["kl"] == pytest.approx(a["kl"], rel=1e-3)

    def split(players: dict) -> tuple[dict, dict]:  # every (player, key) but the spec (a path in the run): exact, rounded
        exact, rounded = {}, {}
        for name, entry in players.items():
            for key, value in entry.items():
                if key != "spec":
                    (rounded if "kl" in key or "proxy" in key else exact)[name, key] = value
        return exact, rounded

    (exact_a, rounded_a), (exact_b, rounded_b) = split(a["players"]), split(b["players"])
    assert exact_b == exact_a
    assert rounded_b.keys() == rounded_a.keys()
    for key, value in rounded_a.items():
        assert rounded_b[key] == pytest.approx(value, rel=1e-3, abs=5e-3), key
    assert (Path(many.output_dir) / "sample" / "samples.jsonl").read_bytes() == (
        Path(one.output_dir) / "sample" / "samples.jsonl"
    ).read_bytes()
    assert (Path(many.output_dir) / "dpo" / "model.safetensors").is_file()
    # A stage's error comes back from its child, named, and the run stops there.
    broken = dataclasses.replace(many, output_dir=str(tmp_path / "broken"), sft={"max_steps": 2, "data": "/no/such.jsonl"})
    with pytest.raises(pipeline.StageError, match="stage 'sft' failed.*no/such"):
        pipeline.run(broken)


@pytest.mark.slow
def test_real_pipeline_on_tiny_model(tmp_path):
    """Every real stage, wired together, on the tiny model (seconds per stage)."""
    cfg = tiny_real_config(tmp_path / "run")
    status = pipeline.run(cfg)
    assert all(v == "ran" for v in status.values())
    run = tmp_path / "run"
    results = json.loads((run / "eval.json").read_text())  # the interface: DIR/eval.json
    assert results == json.loads((run / "eval" / "eval.json").read_text())
    assert_headline_numbers_recompute(cfg, results)
    assert (run / "report.html").is_file()
    assert (run / "dpo" / "model.safetensors").is_file()


@pytest.mark.slow
def test_iterated_dpo_keeps_every_round(tmp_path):
    from rlhfkit import iterated

    cfg = iterated.IteratedDPOConfig(
        model="tiny",
        rounds=2,
        prompts_per_round=4,
        output_dir=str(tmp_path / "it"),
        reference="refresh",
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


# ---------------------------------------------------------------- several policy stages, the gate, the demo


def test_compared_algorithms_run_after_the_main_one_and_are_evaluated_beside_it(tmp_path, calls):
    cfg = config(tmp_path, algorithm="dpo", compare=["ppo"])
    stages = {s.name: s for s in pipeline.build_stages(cfg)}
    assert list(stages) == ["sft", "sample", "label", "reward", "gate", "dpo", "ppo", "eval", "report"]
    run = tmp_path / "run"
    assert stages["eval"].config.policy == str(run / "dpo")
    assert stages["eval"].config.extra_policies == [str(run / "ppo")]
    assert stages["ppo"].config.reward_model == str(run / "reward")
    assert stages["dpo"].config.proxy == str(run / "reward")
    assert stages["ppo"].config.gold == stages["dpo"].config.gold == "demo"  # both probe their frontier
    assert stages["gate"].config.needed  # ppo trains against the reward model
    pipeline.run(cfg)
    assert calls == ["sft", "sample", "label", "reward", "gate", "dpo", "rl", "eval", "report"]
    calls.clear()
    pipeline.run(cfg, from_stage="rl")  # --from rl: the first policy stage
    assert calls == ["dpo", "rl", "eval", "report"]


def test_algorithm_sections_reach_their_stage_and_rl_reaches_the_main_one(tmp_path):
    cfg = config(tmp_path, algorithm="ppo", compare=["dpo"], ppo={"lr": 1e-5, "beta": 0.2}, dpo={"beta": 0.3}, rl={"beta": 0.1})
    stages = {s.name: s for s in pipeline.build_stages(cfg)}
    assert stages["ppo"].config.lr == 1e-5 and stages["ppo"].config.beta == 0.1  # rl wins over ppo
    assert stages["dpo"].config.beta == 0.3
    with pytest.raises(ConfigError, match="section 'dpo'.*unknown key 'kl_coef'"):
        pipeline.build_stages(config(tmp_path, algorithm="ppo", compare=["dpo"], dpo={"kl_coef": 0.1}))


def test_demo_dpo_trains_on_the_first_half_of_the_labelled_prompts(tmp_path):
    """The demo's DPO reads half of what the sample stage labels, whatever its size; a given value stays."""

    def dpo_stage(**overrides):
        cfg = pipeline.demo_config(output_dir=str(tmp_path), **overrides)
        return next(s for s in pipeline.build_stages(cfg) if s.name == "dpo").config

    assert pipeline.demo_config().sample["max_prompts"] == 512 and dpo_stage().max_comparisons == 256
    assert dpo_stage(**{"sample.max_prompts": 101}).max_comparisons == 50
    assert dpo_stage(sample={"max_prompts": -1}).max_comparisons == -1  # every prompt of the file: all its labels
    assert dpo_stage(**{"sample.max_prompts": 100, "dpo.max_comparisons": 80}).max_comparisons == 80
    assert dpo_stage(dpo={"max_comparisons": 0}).max_comparisons == 0


@pytest.mark.parametrize("algorithm", ["dpo", "ppo", "grpo", "rloo", "a2c", "nlpo", "reinforce"])
def test_demo_config_builds_for_every_algorithm(tmp_path, algorithm):
    """`rlhfkit demo algorithm=A` once failed at once (DPO's beta in the shared rl section)."""
    cfg = pipeline.demo_config(algorithm=algorithm, output_dir=str(tmp_path))
    assert cfg.stage_processes  # each model stage in a fresh process (the eval's generation ran ~3x faster so)
    names = [s.name for s in pipeline.build_stages(cfg)]
    assert names[names.index("gate") + 1] == algorithm
    assert ("ppo" if algorithm == "dpo" else "dpo") in names
    gate = next(s for s in pipeline.build_stages(cfg) if s.name == "gate").config
    assert gate.needed  # every demo trains one RL method against the reward model


def _heldout(tmp_path, accuracy, lo, hi, pairs=240):
    d = tmp_path / "reward"
    d.mkdir(parents=True, exist_ok=True)
    (d / "heldout.json").write_text(
        json.dumps({"accuracy": accuracy, "accuracy_ci": [lo, hi], "num_pairs": pairs, "num_prompts": pairs // 6, "ties": 0})
    )
    return pipeline.GateConfig(reward_dir=str(d), output=str(tmp_path / "gate" / "gate.json"))


def test_gate_stops_rl_against_a_reward_model_at_chance(tmp_path):
    gate = _heldout(tmp_path, 0.53, 0.47, 0.59)
    with pytest.raises(RuntimeError, match=r"0\.530 \[0\.470, 0\.590\] on 240 pairs.*more or cleaner preference data"):
        pipeline.check_gate(gate)
    assert json.loads(Path(gate.output).read_text())["verdict"] == "failed"
    gate.enforce = False
    assert pipeline.check_gate(gate)["verdict"] == "overridden"
    gate.enforce, gate.needed = True, False  # DPO only: recorded, nothing stops
    assert pipeline.check_gate(gate)["verdict"] == "not needed"


def test_gate_passes_a_reward_model_whose_interval_excludes_chance(tmp_path):
    gate = _heldout(tmp_path, 0.66, 0.6, 0.72)
    result = pipeline.check_gate(gate)
    assert result["verdict"] == "passed" and result["accuracy_ci"] == [0.6, 0.72]
    gate.min_accuracy = 0.6  # the lower end must be above the threshold, not equal to it
    with pytest.raises(RuntimeError):
        pipeline.check_gate(gate)


def test_gate_fails_without_held_out_pairs(tmp_path):
    gate = pipeline.GateConfig(reward_dir=str(tmp_path), output=str(tmp_path / "gate.json"))
    with pytest.raises(RuntimeError, match="no held-out accuracy"):
        pipeline.check_gate(gate)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "ppo", "grpo", "rloo"])
def test_demo_stages_run_for_every_algorithm_on_the_tiny_model(tmp_path, algorithm):
    """The demo's own stages and wiring (the main algorithm, its comparison, probes, best-of-n, the gate's
    verdict, the report), every size cut down to the tiny model."""
    small_rl = {
        "max_steps": 2,
        "batch_size": 2,
        "max_new_tokens": 6,
        "progress": False,
        "probe_points": 2,
        "probe_max_prompts": 3,
        "probe_max_new_tokens": 6,
        "precision": "fp32",
    }
    cfg = pipeline.demo_config(
        output_dir=str(tmp_path / "run"),
        model="tiny",
        algorithm=algorithm,
        reward_gate=False,
        stage_processes=False,  # the demo runs stages in child processes; equal to one process (tested above)
        sft={"max_steps": 2, "batch_size": 4, "progress": False, "precision": "fp32"},
        sample={"max_prompts": 12, "max_new_tokens": 6, "batch_size": 12, "progress": False, "precision": "fp32"},
        reward={"max_steps": 2, "batch_size": 2, "progress": False, "eval_fraction": 0.25, "precision": "fp32"},
        dpo={
            "max_steps": 2,
            "batch_size": 2,
            "progress": False,
            "probe_points": 2,
            "probe_max_prompts": 3,
            "probe_max_new_tokens": 6,
            "precision": "fp32",
        },
        ppo=small_rl,
        grpo=small_rl,
        rloo=small_rl,
        eval={
            "max_prompts": 4,
            "max_new_tokens": 6,
            "best_of_n": 4,
            "samples_per_prompt": 2,
            "bootstrap": 20,
            "resamples": 200,
            "progress": False,
            "precision": "fp32",
            "generation_precision": "fp32",
        },
    )
    status = pipeline.run(cfg)
    assert all(v == "ran" for v in status.values())
    run = tmp_path / "run"
    results = json.loads((run / "eval.json").read_text())
    other = "ppo" if algorithm == "dpo" else "dpo"
    assert results["main_player"] == algorithm
    assert set(results["players"]) == {"sft", algorithm, other, "best_of_1", "best_of_2", "best_of_4"}
    for name in (algorithm, other):
        entry = results["players"][name]
        lo, hi = entry["win_rate_ci"]
        assert lo <= entry["win_rate"] <= hi and 0 <= entry["p_value"] <= 1
        assert (run / name / "model.safetensors").is_file()
        frontier = [json.loads(line) for line in (run / name / "frontier.jsonl").read_text().splitlines()]
        assert [p["step"] for p in frontier] == [0, 1, 2]
        assert abs(frontier[0]["kl"]) < 1e-4  # the starting policy is the reference
    # Both start from the SFT model: the second stage reads the first's step-0 probe from OUTPUT/probe_cache.
    first, second = (
        [json.loads(x) for x in (run / n / "frontier.jsonl").read_text().splitlines()][0] for n in (algorithm, other)
    )
    assert "cached" not in first and second.pop("cached") in {f.name for f in (run / pipeline.PROBE_CACHE).iterdir()}
    assert {k: v for k, v in second.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert results["win_rate"] == results["players"][algorithm]["win_rate"]
    # The reward model's held-out accuracy is reward/heldout.json's, counted on the comparisons the reward
    # stage held out of the labels: every strict pair of each ranking (K(K-1)/2 less its tied pairs), ties apart.
    from rlhfkit.data.io import split_holdout
    from rlhfkit.data.pairwise import strict_pair_count
    from rlhfkit.data.preferences import load_comparisons

    assert results["reward_model"] == json.loads((run / "reward" / "heldout.json").read_text())
    rc = next(s for s in pipeline.build_stages(cfg) if s.name == "reward").config
    assert rc.eval_min_pairs == 240  # the demo's: more than 12 prompts' labels hold, so a quarter of them is held out
    comparisons = load_comparisons(rc.data)
    _, held = split_holdout(comparisons, rc.eval_fraction, rc.seed, min_held=rc.eval_min_pairs, weight=strict_pair_count)
    assert len(held) == len(comparisons) // 4
    strict = [c for c in held if not c.tie]
    tied = sum(len(c.ties) for c in strict)
    assert results["reward_model"]["num_pairs"] == sum(len(c.responses) * (len(c.responses) - 1) // 2 for c in strict) - tied
    assert results["reward_model"]["ties"] == len(held) - len(strict) + tied
    lo, hi = results["reward_model"]["accuracy_ci"]
    assert 0.0 <= lo <= results["reward_model"]["accuracy"] <= hi <= 1.0
    assert json.loads((run / "gate" / "gate.json").read_text())["verdict"] in ("passed", "overridden")
    assert (run / "report.html").is_file()
    if algorithm == "dpo":  # once: benchmarks/best_of_n_rankers.py draws this run's best-of-n pool again
        _check_best_of_n_rankers(run, results)
        _check_reward_accuracy_on_labels(run, rc)
        _check_ensemble_label_noise_example(run, tmp_path / "noise")


def _check_best_of_n_rankers(run: Path, results: dict) -> None:
    """The run's own reward model ranks the re-drawn pool to eval.json's best-of-n gold exactly (the same pool),
    and the gold scorer as a ranker (an oracle: the best gold of the same n samples) is never below it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import best_of_n_rankers

    out = best_of_n_rankers.main([str(run), "--ranker", f"own={run / 'reward'}", "--ranker", "oracle=demo"])
    assert out["eval_check"] == {"own": True}
    for n, entry in out["by_n"].items():
        assert entry["own"]["gold_score"] == pytest.approx(results["players"][f"best_of_{n}"]["gold_score"], abs=1e-12)
        assert entry["oracle"]["minus_own"] >= 0.0 if n != "1" else entry["oracle"]["minus_own"] == 0.0


def _check_reward_accuracy_on_labels(run: Path, rc) -> None:
    """benchmarks/reward_accuracy_on_labels.py finds the reward stage's own held-out split: the run's reward model
    scores its heldout.json accuracy there, on as many pairs; a second ranker's paired difference is the difference of
    the two accuracies."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reward_accuracy_on_labels as bench

    own = json.loads((run / "reward" / "heldout.json").read_text())

    def judge(seed: int, *models: str) -> dict:
        split = [
            rc.data,
            "--seed",
            str(seed),
            "--eval-fraction",
            str(rc.eval_fraction),
            "--eval-min-pairs",
            str(rc.eval_min_pairs),
        ]
        return bench.main([*split, "--precision", "fp32", "--resamples", "200", *(a for m in models for a in ("--model", m))])

    out = judge(rc.seed, f"own={run / 'reward'}", "oracle=demo")
    assert out["own_heldout_check"] == {"own": {"ok": True, "pairs_apart": 0.0}}  # fp32: exactly its own
    assert out["num_pairs"] == own["num_pairs"]
    assert out["by_model"]["own"]["accuracy"] == pytest.approx(own["accuracy"], abs=1e-12)
    oracle = out["by_model"]["oracle"]
    assert oracle["minus_own"] == pytest.approx(oracle["accuracy"] - own["accuracy"], abs=1e-12)
    # Another seed holds out other comparisons: no longer the model's own split, so no check.
    other = judge(rc.seed + 1, f"own={run / 'reward'}")
    assert other["own_heldout_check"] == {}


def _check_ensemble_label_noise_example(run: Path, out: Path) -> None:
    """examples/ensemble_label_noise.sh end to end on the tiny run: with flip_rate 1 every noisy ranking is the run's
    own ranking reversed (so the run's annotator, scorer, temperature and seed, was carried over), both benchmarks
    find the run's own pool and split, and the ensemble has K members."""
    import subprocess
    import sys

    from rlhfkit.data.preferences import load_comparisons

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RLHFKIT": str(Path(sys.executable).parent / "rlhfkit"), "PYTHON": sys.executable, "K": "2"}
    done = subprocess.run(
        ["bash", str(root / "examples" / "ensemble_label_noise.sh"), str(run), str(out), "1.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    clean, noisy = load_comparisons(run / "label" / "labels.jsonl"), load_comparisons(out / "labels.jsonl")
    assert [c.prompt for c in noisy] == [c.prompt for c in clean]
    assert all(n.ranking == (c.ranking if c.tie else c.ranking[::-1]) for n, c in zip(noisy, clean))
    assert json.loads((out / "rankers.json").read_text())["eval_check"] == {"clean": True}
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["own_heldout_check"]["clean"]["ok"]
    assert set(accuracy["by_model"]) == {"single", "wco", "mean", "clean"}
    assert len(json.loads((out / "sep" / "config.json").read_text())["rlhfkit_ensemble_members"]) == 1


def test_reward_accuracy_on_labels_counts_every_strict_pair_in_ranking_order():
    """Hand-worked: a 3-way ranking [2, 0, 1] gives pairs (2, 0), (2, 1), (0, 1); a tie label gives none; equal
    scores count 0.5."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reward_accuracy_on_labels as bench

    from rlhfkit.data.records import Comparison

    held = [
        Comparison(prompt="p", responses=["a", "b", "c"], ranking=[2, 0, 1]),
        Comparison(prompt="q", responses=["x", "y"], ranking=[0, 1], tie=True),
        Comparison(prompt="r", responses=["u", "v"], ranking=[1, 0]),
    ]
    pairs, clusters = bench.strict_pairs(held)
    assert pairs == [(0, 2, 0), (0, 2, 1), (0, 0, 1), (2, 1, 0)]
    assert clusters == ['"p"', '"p"', '"p"', '"r"']
    # scores: comparison 0 orders c > a > b except a = b; comparison 2 prefers u, wrongly
    scores = [[0.5, 0.5, 0.9], [0.0, 0.0], [1.0, -1.0]]
    assert bench.pair_scores(pairs, scores) == [1.0, 1.0, 0.5, 0.0]


def test_demo_config_builds_with_ilql(tmp_path):
    """`algorithm: ilql` (compared with DPO, the demo's default for a main algorithm other than dpo): trained from
    the SFT model on the labels, no reward model needed (the gate only records); `compare: [ilql]` beside PPO."""
    from rlhfkit import ilql

    cfg = pipeline.demo_config(algorithm="ilql", output_dir=str(tmp_path), ilql={"lr": 1e-5})
    stages = {s.name: s for s in pipeline.build_stages(cfg)}
    names = list(stages)
    assert names[names.index("gate") + 1 :] == ["ilql", "dpo", "eval", "report"]
    ilql_config = stages["ilql"].config
    assert isinstance(ilql_config, ilql.ILQLConfig)
    assert (ilql_config.model, ilql_config.data, ilql_config.output_dir) == (
        str(tmp_path / "sft"),
        str(tmp_path / "label" / "labels.jsonl"),
        str(tmp_path / "ilql"),
    )
    assert ilql_config.lr == 1e-5 and stages["ilql"].run is ilql.train and stages["ilql"].every_process
    assert not stages["gate"].config.needed
    assert stages["eval"].config.policy == str(tmp_path / "ilql")
    with pytest.raises(ConfigError, match="section 'ilql' may not set 'data'"):
        pipeline.build_stages(pipeline.demo_config(algorithm="ilql", output_dir=str(tmp_path), ilql={"data": "x.jsonl"}))
    with_ppo = {s.name: s for s in pipeline.build_stages(config(tmp_path, algorithm="ppo", compare=["ilql"]))}
    assert with_ppo["gate"].config.needed and "ilql" in with_ppo
    assert with_ppo["eval"].config.extra_policies == [str(tmp_path / "run" / "ilql")]


@pytest.mark.slow
def test_pipeline_runs_ilql_on_the_tiny_model(tmp_path):
    """sft -> sample -> label -> reward -> gate -> ilql -> eval (with ILQL decoding) -> report, on the tiny model;
    the report reads the run (ILQL's metrics are not DPO's or RL's: it must not fail on them)."""
    from rlhfkit.run_layout import ILQLMetric

    cfg = pipeline.demo_config(
        output_dir=str(tmp_path / "run"),
        model="tiny",
        algorithm="ilql",
        compare=[],
        stage_processes=False,
        sft={"max_steps": 2, "batch_size": 4, "progress": False, "precision": "fp32"},
        sample={"max_prompts": 12, "max_new_tokens": 6, "batch_size": 12, "progress": False, "precision": "fp32"},
        reward={"max_steps": 2, "batch_size": 2, "progress": False, "eval_fraction": 0.25, "precision": "fp32"},
        ilql={"max_steps": 3, "batch_size": 4, "progress": False, "max_length": 64, "precision": "fp32"},
        eval={
            "max_prompts": 4,
            "max_new_tokens": 6,
            "best_of_n": 2,
            "samples_per_prompt": 1,
            "bootstrap": 20,
            "resamples": 200,
            "ilql_beta": 2.0,
            "progress": False,
            "precision": "fp32",
            "generation_precision": "fp32",
        },
    )
    status = pipeline.run(cfg)
    assert all(v == "ran" for v in status.values()) and "ilql" in status
    run = tmp_path / "run"
    assert (run / "ilql" / "ilql_heads.safetensors").is_file()
    entries = [json.loads(line) for line in (run / "ilql" / "metrics.jsonl").read_text().splitlines()]
    assert any(ILQLMetric.LOSS_Q in e for e in entries)
    results = json.loads((run / "eval.json").read_text())
    assert results["main_player"] == "ilql"
    assert results["players"]["ilql"]["decoding"] == {"method": "ilql", "beta": 2.0, "top_k": 20}
    lo, hi = results["win_rate_ci"]
    assert lo <= results["win_rate"] <= hi
    assert json.loads((run / "gate" / "gate.json").read_text())["verdict"] == "not needed"
    assert status["report"] == "ran" and (run / "report.html").is_file()
    page = (run / "report.html").read_text()
    assert "ilql: ILQL metrics" in page  # its loss panels, not a "no metrics" note
    assert "ilql probe points" not in page  # ILQL samples nothing while training: no probe points are missing
