"""Plain helpers shared by the tests (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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

    import pytest

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
