"""Reward model: ``rlhfkit reward CONFIG.yaml`` / :func:`train`, and :class:`RewardModel` for scoring.

The model is a causal-LM backbone with a scalar head read at the last
non-padding token: transformers' ``*ForSequenceClassification`` with
``num_labels=1``, so ``AutoModelForSequenceClassification.from_pretrained(dir)``
loads the result and gives the same raw scores.

1. Comparisons (any supported format) expand to pairs: a K-way ranking gives all
   K(K-1)/2 pairs, a tie gives target 0.5.
2. Loss: Bradley-Terry with soft targets and an optional margin
   (:func:`rlhfkit.losses.preference_loss`); one forward over chosen + rejected.
3. After training, a gain and bias are fitted so the normalisation samples (by
   default every response in the training data — in the pipeline, samples of the
   SFT model) score mean 0, std 1 at the training precision. They are stored in ``config.json`` as
   ``rlhfkit_reward_gain`` / ``rlhfkit_reward_bias``; :class:`RewardModel` applies
   them (``normalised = gain * raw + bias``), raw transformers outputs do not.

The scalar head runs in fp32 even under a bf16 autocast (:func:`fp32_score_head`);
the backbone runs at the training precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml

from rlhfkit import forward, models, packing
from rlhfkit.config import to_dict
from rlhfkit.data.io import atomic_write_text
from rlhfkit.data.pairwise import chosen_rejected, collate_pairs, collate_rankings, load_pair_splits, tokenize_response
from rlhfkit.data.sft import collate_sft
from rlhfkit.loop import FitResult, TrainOptions, fit
from rlhfkit.losses import preference_loss


@dataclass
class RewardConfig(models.ModelOptions, TrainOptions):
    """Config of the reward-model stage."""

    data: str = ""
    """Preference data: seed, TRL, hh-rlhf, ranking or rlhfkit format (.json, .jsonl, .parquet)."""
    eval_data: str = ""
    """Optional held-out preference file; if empty, `eval_fraction` of `data` is held out."""
    eval_fraction: float = 0.1
    """Fraction of comparisons held out when `eval_data` is empty (0 disables eval)."""
    max_length: int = 512
    """Maximum tokens of prompt + response; longer responses are cut."""
    chat_template: bool = True
    """Render prompt + response with the chat template (as SFT does)."""
    group_rankings: bool = True
    """A K-way ranking is one batch element holding all its K(K-1)/2 pairs (InstructGPT, sec. 3.5: one
    forward per response, no overfitting from seeing each response K-1 times an epoch); `batch_size`
    then counts comparisons. false: rankings expand to independent, shuffled pairs. Same for K = 2."""
    margin: float = 0.0
    """Constant margin in the Bradley-Terry loss (Llama 2's margin ranking loss); a record's
    `meta.margin` is added to it."""
    head_init: Literal["zero", "normal"] = "normal"
    """Score-head initialisation: N(0, 1/(hidden+1)) or zeros (the seed design). With zeros the
    backbone gets no gradient until the head has moved, which at small learning rates is slow."""
    normalize: bool = True
    """Fit a gain and bias so the normalisation samples score mean 0, std 1."""
    norm_data: str = ""
    """JSONL of {prompt, response} samples for normalisation; empty: every response in `data`
    (held-out comparisons included; in the pipeline these are all samples of the SFT model)."""
    norm_max_samples: int = 1024
    """Score at most this many normalisation samples, evenly spaced over them (-1: all); a mean and
    std need no more, and scoring every response of a large preference set takes minutes."""
    lr: float = 1e-5
    """Peak learning rate."""
    output_dir: str = "runs/reward"
    """Where the reward model, checkpoints and metrics go."""


class RewardTask:
    """The loop's :class:`~rlhfkit.loop.Task` for reward modelling. Items are pairs."""

    def __init__(self, margin: float):
        self.margin = margin

    def num_items(self, batch) -> int:
        return int(batch["target"].shape[0])

    def num_tokens(self, batch) -> int:
        return forward.num_tokens(batch)

    def loss(self, model, batch):
        chosen, rejected = chosen_rejected(batch, sequence_scores(model, batch))
        target = batch["target"]
        losses = preference_loss(chosen, rejected, target, self.margin + batch["margin"])
        # A tie counts as half right; a strict preference as right when chosen scores higher.
        correct = torch.where(target > 0.5, (chosen > rejected).float(), torch.full_like(target, 0.5))
        stats = {"accuracy": correct.sum(), "margin": (chosen - rejected).detach().sum()}
        return losses.sum(), stats


def _score_head(model) -> torch.nn.Module:
    """The ``score`` linear layer of a (possibly DDP/peft-wrapped) ``*ForSequenceClassification``."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "score":
            return module
    raise ValueError("reward model has no `score` head")


def _fp32_head_output(module: torch.nn.Linear, args, output) -> torch.Tensor:
    """Forward hook: the head's output recomputed in fp32 with autocast off (see :func:`fp32_score_head`)."""
    (hidden,) = args
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if module.bias is None else module.bias.float()
        return F.linear(hidden.float(), module.weight.float(), bias)


def fp32_score_head(model):
    """Make the score head of ``model`` compute in fp32 under any autocast; returns ``model``.

    Under a bf16 autocast the head's output would be bf16, 8 significant bits: two
    scores closer than about 1/128 of their size round to the same number, so a
    pair the model orders correctly counts as wrong (a tie is not ``chosen >
    rejected``) and PPO sees a reward rounded to that step. The head is one
    ``hidden -> 1`` product per position, so fp32 costs nothing; the final norm's
    output it reads is fp32 already. (On a SmolLM2 reward model whose margins were a
    few units it changed 1 of 900 held-out pairs; it matters when scores sit close
    together.) Idempotent; a head that is not an ``nn.Linear`` is left as it is.
    """
    head = _score_head(model)
    if isinstance(head, torch.nn.Linear) and not getattr(head, "_rlhfkit_fp32", False):
        head.register_forward_hook(_fp32_head_output)
        head._rlhfkit_fp32 = True
    return model


def sequence_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar score of each sequence of a padded or packed batch, read at its last token. Shape: (N,).

    Packed: the model's own pooling expects one sequence per row, so the score head's
    per-position output is captured (a forward hook; the forward still runs through
    the wrapped model, so DDP syncs gradients) and read at each sequence's last token.
    """
    if packing.is_packed(batch):
        packing.require_kernel(model)
        with packing.capture_output(_score_head(model)) as outputs:
            model(**packing.model_inputs(batch))
        return outputs[-1][0, :, 0][packing.last_positions(batch)].float()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits.squeeze(-1).float()


def _reward_tokenizer(spec: str):
    """The tokenizer, padded with a token that never ends a scored sequence.

    transformers reads the score at the last token that is not ``pad_token_id``;
    if padding were EOS, a sequence ending in EOS would be read one token early.
    """
    tokenizer = models.load_tokenizer(spec)
    if tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.unk_token is not None:
        if tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def load_reward_backbone(spec: str, *, pad_token_id: int, head_init: str = "zero", seed: int = 0):
    """A ``*ForSequenceClassification`` (num_labels=1) from a model spec, head initialised."""
    from transformers import AutoModelForSequenceClassification

    if spec == models.TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(models.tiny_config(num_labels=1), dtype=torch.float32)
    else:
        from transformers.utils import logging as hf_logging

        # The score head is new by design; transformers' load report would flag it as missing.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(models.resolve(spec), num_labels=1, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_token_id
    head = model.get_submodule("score")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if head_init == "zero":
            torch.nn.init.zeros_(head.weight)
        else:
            torch.nn.init.normal_(head.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    return fp32_score_head(model)


@torch.no_grad()
def raw_scores(model, tokenizer, prompts: list, responses: list[str], *, batch_size: int = 16,
               chat_template: bool = True, max_length: int = 1024, precision: str = "bf16",
               progress: str | None = None) -> torch.Tensor:
    """Raw scalar scores of (prompt, response) pairs. Shape: (N,). ``progress``: a progress-bar title."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    bar = tqdm(total=len(responses), unit="response", desc=progress, disable=progress is None)
    for start in range(0, len(responses), batch_size):
        seqs = []
        for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
            ids, labels = tokenize_response(tokenizer, prompt, response, chat_template=chat_template)
            seqs.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
        batch = collate_sft(seqs, tokenizer.pad_token_id)
        with models.autocast(device, precision):
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        scores.append(logits.squeeze(-1).float().cpu())
        bar.update(len(seqs))
    bar.close()
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


class RewardModel:
    """Scores text with a trained reward-model directory (its own tokenizer), normalised.

    ``RewardModel(dir)(prompts, responses) -> list[float]`` — the same signature as a
    ``module:function`` reward, so PPO, evaluation and best-of-n take either.
    """

    def __init__(self, path: str | Path, *, precision: str = "bf16", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification

        self.path = str(path)
        self.tokenizer = _reward_tokenizer(self.path)
        self.model = fp32_score_head(AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32).eval())
        self.tokenizer.pad_token_id = self.model.config.pad_token_id
        self.gain = float(getattr(self.model.config, "rlhfkit_reward_gain", 1.0))
        self.bias = float(getattr(self.model.config, "rlhfkit_reward_bias", 0.0))
        self.chat_template = bool(getattr(self.model.config, "rlhfkit_chat_template", True))
        self.precision, self.batch_size = precision, batch_size

    def raw(self, prompts: list, responses: list[str]) -> torch.Tensor:
        return raw_scores(self.model, self.tokenizer, prompts, responses, batch_size=self.batch_size,
                          chat_template=self.chat_template, precision=self.precision)

    def __call__(self, prompts: list, responses: list[str], **kwargs) -> list[float]:
        return (self.gain * self.raw(prompts, responses) + self.bias).tolist()


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included (all of them if ``k`` is
    -1 or at least ``n``)."""
    if k < 0 or k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def _norm_samples(config: RewardConfig) -> tuple[list, list[str]]:
    if config.norm_data:
        from rlhfkit.data.io import read_rows

        rows = read_rows(config.norm_data)
        prompts, responses = [r.data["prompt"] for r in rows], [r.get_str("response") for r in rows]
    else:
        from rlhfkit.data.preferences import load_comparisons

        prompts, responses = [], []
        for comp in load_comparisons(config.data):
            for response in comp.responses:
                prompts.append(comp.prompt)
                responses.append(response)
    keep = evenly_spaced(len(responses), config.norm_max_samples)
    return [prompts[i] for i in keep], [responses[i] for i in keep]


def train(config: RewardConfig) -> FitResult:
    """Train a reward model on ``config.data``; save a loadable ``*ForSequenceClassification``."""
    if not config.data:
        raise ValueError("reward: `data` (a preference file) is required")
    tokenizer = _reward_tokenizer(config.model)
    train_set, eval_set = load_pair_splits(
        tokenizer, config.data, eval_data=config.eval_data, eval_fraction=config.eval_fraction, seed=config.seed,
        max_length=config.max_length, chat_template=config.chat_template, keep_ties=True, stage="reward",
        grouped=config.group_rankings,
    )
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump({"stage": "reward", **to_dict(config)}, sort_keys=False))

    model = load_reward_backbone(config.model, pad_token_id=tokenizer.pad_token_id, head_init=config.head_init, seed=config.seed)
    model = models.prepare_for_training(model, config)
    if config.lora_r > 0:  # the fresh head must train too
        for name, param in model.named_parameters():
            if "score" in name:
                param.requires_grad_(True)

    def save(unwrapped, out_dir: Path, state_dict) -> None:
        target = unwrapped
        if hasattr(target, "merge_and_unload"):
            import copy

            target = copy.deepcopy(target).merge_and_unload()
        gain, bias = 1.0, 0.0
        if config.normalize:
            prompts, responses = _norm_samples(config)
            scores = raw_scores(target, tokenizer, prompts, responses, chat_template=config.chat_template,
                                max_length=config.max_length, precision=config.precision,
                                progress="reward: normalisation" if config.progress else None)
            std = float(scores.std()) if len(scores) > 1 else 1.0
            gain = 1.0 / max(std, 1e-6)
            bias = -float(scores.mean()) * gain
            print(f"reward: normalisation on {len(scores)} samples: raw mean {float(scores.mean()):.4f}, std {std:.4f}")
        target.config.rlhfkit_reward_gain = gain
        target.config.rlhfkit_reward_bias = bias
        target.config.rlhfkit_chat_template = config.chat_template
        models.save_pretrained(target, tokenizer, out_dir, state_dict=None if target is not unwrapped else state_dict)

    pad_id = tokenizer.pad_token_id
    collate = collate_rankings if config.group_rankings else collate_pairs
    return fit(
        config,
        model=model,
        task=RewardTask(config.margin),
        train_set=train_set,
        eval_set=eval_set,
        collate=lambda examples: collate(examples, pad_id, packed=config.packing),
        precision=config.precision,
        save_model=save,
        run_info={"stage": "reward", "data": config.data},
    )
