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
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
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
