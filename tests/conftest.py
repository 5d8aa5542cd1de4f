"""Shared fixtures: the tiny model's tokenizer, small SFT data files, fast configs.

Every test uses the ``tiny`` model spec (a random 2-layer Llama with the SmolLM2
tokenizer, built locally); nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from rlhfkit.modeling import models
from rlhfkit.sft import SFTConfig
from tests.helpers import QA_PAIRS, write_jsonl

# One thread unless OMP_NUM_THREADS says otherwise: the tiny model's ops gain
# little from a second thread, and when the other core is busy (CI neighbours,
# a second test process) OpenMP's spin-waiting made training steps ~4x slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny model's tokenizer (SmolLM2's, with its ChatML chat template)."""
    return models.load_tokenizer(models.TINY)


@pytest.fixture
def qa_file(tmp_path) -> Path:
    """JSONL file of the eight prompt/completion pairs in :data:`QA_PAIRS`."""
    return write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "completion": c} for p, c in QA_PAIRS])


@pytest.fixture
def varied_file(tmp_path) -> Path:
    """16 records whose completions differ a lot in length.

    Per-micro-batch loss means then differ from the mean over the global batch,
    so a loop that averaged micro-batch means would fail the equivalence tests.
    """
    records = [{"prompt": f"Item {i}?", "completion": " ".join(["word"] * (1 + 3 * (i % 5))) + f" {i}."} for i in range(16)]
    return write_jsonl(tmp_path / "varied.jsonl", records)


@pytest.fixture
def make_config(tmp_path):
    """``make_config(name, **fields)``: a fast fp32 SFTConfig writing to ``tmp_path/name``."""

    def make(name: str, **fields) -> SFTConfig:
        defaults = dict(
            model=models.TINY,
            output_dir=str(tmp_path / name),
            eval_fraction=0.0,
            max_length=64,
            precision="fp32",
            progress=False,
            tensorboard=False,
            lr=3e-3,
        )
        defaults.update(fields)
        return SFTConfig(**defaults)

    return make
