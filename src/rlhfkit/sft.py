"""Supervised fine-tuning: ``rlhfkit sft CONFIG.yaml`` / :func:`train`.

The loss is the mean cross-entropy over target (completion / assistant) tokens
of the whole global batch; prompt, template and padding tokens are masked
(see :mod:`rlhfkit.data.sft`). Logits are computed only at positions that
predict a target token: the LM head (49k x 576 for SmolLM2) and the fp32
softmax are a fifth of the compute, and prompts are often half the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit import log
from rlhfkit.data.io import DataError, split_holdout
from rlhfkit.data.prompts import demo_data_path
from rlhfkit.data.sft import IGNORE_INDEX, collate_sft, load_sft_file, tokenize_sft
from rlhfkit.modeling import forward, models
from rlhfkit.modeling.forward import sft_loss_sum
from rlhfkit.training.loop import EvalOptions, FitResult, TrainOptions, fit, write_run_config


@dataclass
class SFTConfig(models.ModelOptions, TrainOptions, EvalOptions):
    """Config of the SFT stage (model, data, and the shared training options)."""

    data: str = ""
    """SFT data file (.json list or .jsonl): `prompt`/`completion` or `messages` records. Empty: the shipped demo set."""
    eval_data: str = ""
    """Optional held-out file; if empty, `eval_fraction` of `data` is held out."""
    eval_fraction: float = 0.05
    """Fraction of `data` held out for evaluation when `eval_data` is empty (0 disables eval)."""
    max_length: int = 512
    """Maximum tokens per example (prompt + completion)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than `max_length`."""
    chat_template: bool = True
    """Render examples with the tokenizer's chat template; false: plain prompt + completion + EOS."""
    output_dir: str = "runs/sft"
    """Where the final model, checkpoints and metrics go."""


class SFTTask:
    """Next-token cross-entropy on target tokens (the loop's :class:`~rlhfkit.training.loop.Task`)."""

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return forward.num_tokens(batch)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return sft_loss_sum(model, batch), {}


def train(config: SFTConfig) -> FitResult:
    """Fine-tune ``config.model`` on ``config.data``; write a loadable model to ``config.output_dir``.

    Data are read and validated before the model is loaded, so bad input fails
    in seconds with the file, line and field.
    """
    data_path = config.data or str(demo_data_path("sft.jsonl"))
    conversations = load_sft_file(data_path)
    eval_conversations = load_sft_file(config.eval_data) if config.eval_data else None
    if eval_conversations is None:
        conversations, eval_conversations = split_holdout(conversations, config.eval_fraction, config.seed)

    tokenizer = models.load_tokenizer(config.model)
    tok = dict(max_length=config.max_length, overlong=config.overlong, chat_template=config.chat_template)
    train_set, stats = tokenize_sft(tokenizer, conversations, **tok)
    eval_set, eval_stats = tokenize_sft(tokenizer, eval_conversations, **tok)
    log.info(
        f"sft data: {stats.kept} train examples ({stats.truncated} truncated, {stats.dropped} dropped "
        f"over max_length={config.max_length}); {eval_stats.kept} held out"
    )
    if not train_set:
        if not conversations:
            why = (
                f"all {len(eval_conversations)} example(s) went to the held-out split "
                f"(eval_fraction={config.eval_fraction}); add examples, set eval_fraction=0 or give eval_data"
            )
        else:
            why = (
                f"all {len(conversations)} training example(s) were longer than max_length={config.max_length} "
                f"({stats.dropped} dropped, overlong={config.overlong})"
            )
        raise DataError(data_path, None, None, f"no training examples left: {why}")

    out = Path(config.output_dir)
    write_run_config(out, "sft", config)

    model = models.load_causal_lm(config.model)
    model = models.prepare_for_training(model, config)

    def save(unwrapped, out_dir: Path, state_dict) -> None:
        models.save_pretrained(unwrapped, tokenizer, out_dir, state_dict=state_dict)

    pad_id = tokenizer.pad_token_id
    return fit(
        config,
        model=model,
        task=SFTTask(),
        train_set=train_set,
        eval_set=eval_set,
        collate=lambda examples: collate_sft(examples, pad_id, packed=config.packing),
        precision=config.precision,
        save_model=save,
        run_info={"stage": "sft", "data": data_path},
    )
