"""The command line: chat smoke run, a tiny SFT run, `config` listing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlhfkit import cli
from tests.helpers import train_entries


def rlhfkit_command() -> list[str]:
    script = Path(sys.executable).with_name("rlhfkit")  # the installed console script
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlhfkit.cli"]


def test_chat_tiny_exits_0():
    proc = subprocess.run(
        [*rlhfkit_command(), "chat", "tiny", "--prompt", "hi", "--max-new-tokens", "5"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "### prompt\nhi\n### response\n" in proc.stdout


def test_sft_with_yaml_and_overrides(tmp_path, qa_file, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: tiny\ndata: {qa_file}\neval_fraction: 0\nmax_steps: 5\nbatch_size: 4\n"
        "precision: fp32\nprogress: false\ntensorboard: false\n",
        encoding="utf-8",
    )
    out = tmp_path / "cli-sft"
    rc = cli.main(["sft", str(config), "max_steps=2", "lr=1e-4", f"output_dir={out}"])
    assert rc == 0
    assert [r["step"] for r in train_entries(out)] == [1, 2]  # the override won over the YAML
    assert (out / "model.safetensors").is_file()
    assert "lr: 0.0001" in (out / "config.yaml").read_text()
    # The run's own config.yaml (which records `stage: sft`) runs again as it is...
    again = tmp_path / "cli-sft-again"
    assert cli.main(["sft", str(out / "config.yaml"), "max_steps=1", f"output_dir={again}"]) == 0
    assert [r["step"] for r in train_entries(again)] == [1]
    # ...but not as another stage's config.
    assert cli.main(["dpo", str(out / "config.yaml")]) == 2
    assert "field 'stage': this file is a 'sft' config" in capsys.readouterr().err


def test_config_lists_keys_with_docs(capsys):
    assert cli.main(["config", "sft"]) == 0
    text = capsys.readouterr().out
    assert "max_steps: -1\n    Optimizer steps to run" in text
    assert "overlong: 'truncate'" in text


def test_an_os_error_is_one_line_without_a_traceback(monkeypatch, capsys):
    import errno

    import pytest

    from rlhfkit import sample

    def full_disk(config):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write(2) reports it: no file name

    monkeypatch.setattr(sample, "run", full_disk)
    assert cli.main(["sample", "model=tiny"]) == 1
    assert capsys.readouterr().err == "rlhfkit sample: error: No space left on device\n"

    def unwritable(config):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/samples.jsonl")

    monkeypatch.setattr(sample, "run", unwritable)
    assert cli.main(["sample", "model=tiny"]) == 1
    assert capsys.readouterr().err == "rlhfkit sample: error: Permission denied: /runs/samples.jsonl\n"

    def bug(config):
        raise TypeError("a programming error")

    monkeypatch.setattr(sample, "run", bug)
    with pytest.raises(TypeError):  # not caught: its traceback is what finds it
        cli.main(["sample", "model=tiny"])


def test_a_full_disk_in_a_checkpoint_is_one_line_from_the_console_script(tmp_path, qa_file):
    # A real process: the write fails inside torch's zip writer (optimizer.bin) because RLIMIT_FSIZE cuts it,
    # as a full disk does; the CLI prints the CheckpointError on one line.
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: tiny\ndata: {qa_file}\neval_fraction: 0\nmax_steps: 2\nsave_every: 1\nbatch_size: 4\n"
        "precision: fp32\nprogress: false\ntensorboard: false\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    limit = (
        "import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (15_000_000, resource.RLIM_INFINITY)); "
        "sys.argv = ['rlhfkit', *sys.argv[1:]]; runpy.run_module('rlhfkit.cli', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", limit, "sft", str(config), f"output_dir={out}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("rlhfkit sft: error: cannot write checkpoint "), proc.stderr[-4000:]
    assert "File too large" in errors[0] or "EFBIG" in errors[0]
    assert not list((out / "checkpoints").glob(".tmp-step-*"))


def test_an_error_is_printed_on_its_own_line_after_an_open_progress_bar(monkeypatch, capsys):
    from tqdm.auto import tqdm

    from rlhfkit import sample

    def fails_mid_bar(config):
        bar = tqdm(total=10, desc="sample")
        bar.update(3)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample, "run", fails_mid_bar)
    assert cli.main(["sample", "model=tiny"]) == 1
    err = capsys.readouterr().err
    assert err.endswith("\nrlhfkit sample: error: No space left on device\n"), repr(err)  # not glued to the bar


class _Dist:
    """A stand-in for ``torch.distributed`` under a launch: records what the CLI asks of it."""

    def __init__(self):
        self.calls = []

    def is_available(self):
        return True

    def is_initialized(self):
        return "destroy_process_group" not in self.calls

    def barrier(self):
        self.calls.append("barrier")

    def destroy_process_group(self):
        self.calls.append("destroy_process_group")


def test_a_command_that_succeeds_under_a_launch_destroys_the_process_groups_and_one_that_fails_does_not(monkeypatch):
    # Left to the interpreter's exit, gloo's threads aborted a finished rank (SIGABRT) in CI; after a failure the
    # other processes may never reach a barrier, so nothing is waited for then.
    dist = _Dist()
    monkeypatch.setitem(sys.modules, "torch.distributed", dist)
    monkeypatch.setattr(cli, "_run_stage", lambda *a: 0)
    assert cli.main(["sft", "max_steps=1"]) == 0
    assert dist.calls == ["barrier", "destroy_process_group"]
    failed = _Dist()
    monkeypatch.setitem(sys.modules, "torch.distributed", failed)
    monkeypatch.setattr(cli, "_run_stage", lambda *a: 1)
    assert cli.main(["sft", "max_steps=1"]) == 1
    assert failed.calls == []
