"""The main job: ``rlhfkit demo`` (README's first command).

For now it runs the foundation stage end to end on the embedded default model:
SFT of SmolLM2-135M-Instruct on the shipped demo set, then one generation from
the result. Later stages (preferences, reward model, RL, DPO, evaluation) join
it as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rlhfkit import models
from rlhfkit.rollout import GenerationOptions, HFGenerator


@dataclass
class DemoConfig:
    """Config of the demo pipeline."""

    output_dir: str = "runs/demo"
    """Where every stage writes its outputs (one subdirectory per stage)."""
    model: str = models.SMOLLM2
    """Starting model spec."""
    sft_epochs: float = 2.0
    """Passes over the shipped SFT set."""
    sft_lr: float = 5e-5
    """SFT peak learning rate."""
    seed: int = 0
    """Seed for data order and sampling."""
    prompt: str = "My neighbour keeps parking in my spot. What should I do?"
    """Prompt for the closing generation."""


def run(config: DemoConfig) -> dict:
    """Run the demo; returns a summary dict (also printed)."""
    from rlhfkit import sft

    start = time.time()
    out = Path(config.output_dir)
    sft_config = sft.SFTConfig(
        model=config.model,
        output_dir=str(out / "sft"),
        num_epochs=config.sft_epochs,
        lr=config.sft_lr,
        batch_size=8,
        seed=config.seed,
        eval_every=10,
        save_every=20,
    )
    result = sft.train(sft_config)
    model = result.model
    tokenizer = models.load_tokenizer(str(out / "sft"))
    reply = HFGenerator(model, tokenizer).generate([config.prompt], GenerationOptions(max_new_tokens=80, temperature=0.0))[0]
    summary = {
        "sft_dir": str(out / "sft"),
        "final_loss": result.last_metrics.get("loss"),
        **result.eval_metrics,
        "seconds": round(time.time() - start, 1),
    }
    print(f"\n### prompt\n{config.prompt}\n### response (SFT model)\n{reply.strip()}\n")
    print("demo summary: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary
