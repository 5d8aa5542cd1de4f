"""Two data-parallel CPU processes (gloo) train exactly like one process with their joint batch.

``accelerate launch --cpu --num_processes 2`` does not do this: with ``--cpu``
accelerate's launcher starts a single process (multi-CPU needs mpirun and a
hostfile). ``--multi_gpu`` starts the processes through torchrun, and
``ACCELERATE_USE_CPU=true`` makes each of them join a gloo process group
(without it, accelerate sets up a single-process run in each; rlhfkit refuses
to train then, see :func:`rlhfkit.training.loop.make_accelerator`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import to_dict
from rlhfkit.sft import train
from rlhfkit.training import loop
from tests.helpers import assert_same_weights, launch_two_cpu_processes, saved_weights, train_entries


@pytest.mark.slow
def test_two_processes_equal_one_with_the_joint_batch(varied_file, make_config):
    steps = 4  # 16 examples / global batch 8: two epochs
    common = dict(data=str(varied_file), max_steps=steps, lr=1e-3, warmup_ratio=0.0, seed=7)
    one = make_config("one", batch_size=8, **common)
    two = make_config("two", batch_size=4, **common)

    config_file = Path(two.output_dir).with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump(to_dict(two)), encoding="utf-8")
    proc = launch_two_cpu_processes(["-m", "rlhfkit.cli", "sft", str(config_file)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Library messages go through rlhfkit.log: the main process prints them, the other does not.
    assert proc.stdout.count("sft data: ") == 1, proc.stdout[-2000:]

    train(one)
    one_log, two_log = train_entries(one.output_dir), train_entries(two.output_dir)
    # Exactly one writer (rank 0) and two processes: 2 steps per epoch, not 4.
    assert [r["step"] for r in two_log] == list(range(1, steps + 1))
    assert [r["epoch"] for r in two_log] == [0.5, 1.0, 1.5, 2.0]
    assert [r["tokens_seen"] for r in two_log] == [r["tokens_seen"] for r in one_log]
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-4)
    assert [r["grad_norm"] for r in two_log] == pytest.approx([r["grad_norm"] for r in one_log], rel=1e-4)
    assert_same_weights(saved_weights(two.output_dir), saved_weights(one.output_dir), atol=1e-5)


def test_refuses_to_train_unjoined_processes(monkeypatch):
    # What torchrun without ACCELERATE_USE_CPU looks like on a CPU machine.
    if os.environ.get("ACCELERATE_USE_CPU"):
        pytest.skip("already joined over gloo")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        loop.make_accelerator("fp32")
