"""Plain helpers shared by the tests (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Eight short, distinct question/answer pairs: small enough to memorise in seconds.
QA_PAIRS = [
    ("Capital of France?", "Paris."),
    ("Two plus two?", "Four."),
    ("Colour of the sky?", "Blue."),
    ("Opposite of hot?", "Cold."),
    ("Largest planet?", "Jupiter."),
    ("Author of Hamlet?", "Shakespeare."),
    ("Boiling point of water?", "100 degrees Celsius."),
    ("Say hello.", "Hello there!"),
]


# Browser tests drive Debian's chromium with Playwright (Playwright's own browser
# download cannot work offline); .ci/run installs it.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browser_required() -> bool:
    """Whether a missing browser fails the run instead of skipping: under CI (``CI`` set, as .ci/run does)
    or with ``RLHFKIT_REQUIRE_BROWSER=1``. The browser tests are the only real-DOM checks of the app and report."""
    return os.environ.get("RLHFKIT_REQUIRE_BROWSER", "") not in ("", "0") or os.environ.get("CI", "") not in ("", "0", "false")


def require_chromium() -> None:
    """Skip the calling test unless Debian's chromium and Playwright are installed (fail under CI)."""
    import importlib.util

    missing = []
    if not CHROMIUM.exists():
        missing.append("Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install playwright)")
    if missing:
        why = "browser check needs " + " and ".join(missing)
        if browser_required():
            pytest.fail(why + " -- required under CI (CI / RLHFKIT_REQUIRE_BROWSER set)", pytrace=False)
        pytest.skip(why)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def train_entries(output_dir: str | Path) -> list[dict]:
    """Training entries of ``OUTPUT_DIR/metrics.jsonl`` (those with a ``loss``)."""
    return [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "loss" in r]


ON_CUDA = torch.cuda.is_available()
"""The library puts models on the accelerator when there is one; these tests also run on a GPU machine."""

RESUME_ATOL = 1e-5 if ON_CUDA else 1e-6
"""Final weights of a resumed run vs an uninterrupted one: CUDA's embedding backward adds with atomics (not
bitwise reproducible); measured 3e-6 on an H200, 0 on the CPU."""


def on_device_of(model, batch: dict) -> dict:
    """``batch``'s tensors moved to ``model``'s device (tests build batches on the CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def saved_weights(output_dir: str | Path) -> dict[str, torch.Tensor]:
    """The final model's tensors as written to ``OUTPUT_DIR/model.safetensors``."""
    return load_file(str(Path(output_dir) / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"largest weight difference {worst:.3g} > {atol:g}"


def characters(prompts: list, responses: list[str], **kwargs) -> list[float]:
    """Scorer (``tests.helpers:characters``): response length in characters. Random tiny-model
    responses rarely tie on it, unlike the word counts the built-in scorers use."""
    return [float(len(r)) for r in responses]


def free_port() -> int:
    """A TCP port nothing listens on now (for a launch's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(
    target: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 900,
    fsdp: bool = False,
):
    """``accelerate launch`` of ``target`` (``["-m", "rlhfkit.cli", ...]`` or ``[script, ...]``) in two CPU processes.

    ``--cpu`` would start one process (multi-CPU needs mpirun and a hostfile); ``--multi_gpu`` starts two through
    torchrun, and ``ACCELERATE_USE_CPU=true`` makes each join a gloo process group. Returns the finished process
    (stdout and stderr as text); fails the test if it runs past ``timeout`` seconds. On a timeout the launcher gets
    SIGTERM, not ``subprocess.run``'s SIGKILL: torchrun's workers run in sessions of their own and its agent stops
    them on SIGTERM, where a killed agent would leave them running.

    ``fsdp=True``: accelerate's FSDP2 plugin (transformer-layer auto-wrap, full state dicts, reshard after forward)
    instead of DDP, through ``tests/fsdp_on_cpu.py`` (accelerate itself runs FSDP only on accelerator devices).
    """
    if fsdp:
        mode = [
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
            "--fsdp_reshard_after_forward",
            "true",
        ]
        target = [str(Path(__file__).with_name("fsdp_on_cpu.py")), *target]
    else:
        mode = ["--multi_gpu"]
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        *mode,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *target,
    ]
    full_env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **(env or {}),
    }
    proc = subprocess.Popen(command, env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=120)
        pytest.fail(f"accelerate launch ran past {timeout} s; stderr: {stderr[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
