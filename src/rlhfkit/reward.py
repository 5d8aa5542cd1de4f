"""Reward model: ``rlhfkit reward CONFIG.yaml`` / :func:`train`; scoring with the result is
:class:`rlhfkit.modeling.reward_model.RewardModel`.

The model is a causal-LM backbone with a scalar head read at the last
non-padding token: transformers' ``*ForSequenceClassification`` with
``num_labels=1``, so ``AutoModelForSequenceClassification.from_pretrained(dir)``
loads the result and gives the same raw scores.

1. Comparisons (any supported format) expand to pairs: a K-way ranking gives all
   K(K-1)/2 pairs, a tie (or a ranking's tied pair) gives target 0.5.
2. Loss: Bradley-Terry with soft targets and an optional margin
   (:func:`rlhfkit.losses.preference_loss`); one forward over chosen + rejected.
3. After training, a gain and bias are fitted so the normalisation samples (by
   default every response in the training data — in the pipeline, samples of the
   SFT model) score mean 0, std 1 at the training precision. They are stored in ``config.json`` as
   ``rlhfkit_reward_gain`` / ``rlhfkit_reward_bias``; :class:`~rlhfkit.modeling.reward_model.RewardModel` applies
   them (``normalised = gain * raw + bias``), raw transformers outputs do not.
4. The trained model scores every pair of the held-out comparisons (``eval_data``, or the
   ``eval_fraction`` split): ``OUTPUT_DIR/heldout.json`` holds its accuracy with a
   prompt-clustered bootstrap interval (:func:`heldout_accuracy`).

The scalar head runs in fp32 even under a bf16 autocast (:func:`rlhfkit.modeling.reward_model.fp32_score_head`);
the backbone runs at the training precision.

**Ensembles** (``ensemble_size=K``, Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization"):
K score heads on one shared backbone -- a ``score`` layer of shape (K, hidden) instead of (1, hidden), saved with
``num_labels=K`` and ``rlhfkit_ensemble_size: K``, so ``from_pretrained`` still loads it (raw logits (N, K)).

* Each head starts from its own row of the normal init and, with ``ensemble_bootstrap`` (the default), trains on
  its own bootstrap resample of the training examples: example ``i`` counts ``w_ih`` times for head ``h``, the
  number of times a draw of n examples with replacement picked it (a comparison when rankings are grouped, a pair
  otherwise). The loss is :func:`rlhfkit.losses.ensemble_preference_loss`, ``(1/K) sum_h sum_p w_ph loss_ph``: each
  head's weighted Bradley-Terry loss, averaged over heads (one head, weight 1: today's loss). Held-out loss and
  accuracy use every pair for every head.
* Coste et al. train K independent models on all the data with different seeds (init and data order; they cite
  Lakshminarayanan et al. 2017 for training on all of it). A shared trunk is the cheap variant: one forward per
  response whatever K, a model the size of one (K x hidden more parameters). The trade-off: the members share every
  feature of the backbone, so they can disagree only through their heads, and their errors are more correlated than
  those of independent models; disagreement and conservatism are smaller. With the trunk shared, a seed leaves the
  heads only their init to differ by (they read the same features of the same batches in the same order); the
  bootstraps add different data to fit. ``ensemble_bootstrap: false`` trains every head on every example (the
  paper's all-data choice; the heads then differ by their init only).
* ``ensemble_backbones: separate`` trains K whole reward models instead, one after another, on the same
  train/held-out split, member k from seed ``seed + k`` (with ``ensemble_bootstrap``, on its own resample of the
  training examples, drawn as the heads' are): Coste et al.'s recipe, at K times the cost. Member 0 is
  ``output_dir`` (a single reward model that ``from_pretrained`` loads); members 1..K-1 are
  ``output_dir/members/k``, and ``output_dir/config.json`` lists them (``rlhfkit_ensemble_members``), so
  :class:`~rlhfkit.modeling.reward_model.RewardModel` loads all K and every ``reward_model=`` takes the directory.
* Normalisation is per head: a gain and bias for each, fitted as in 3. (lists in ``config.json``), applied before
  the heads are aggregated (:class:`~rlhfkit.modeling.reward_model.RewardModel`).
* ``heldout.json`` holds the accuracy of the heads' mean normalised score, and each head's (``head_accuracy``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data.io import DataError, atomic_write_text, evenly_spaced, read_rows
from rlhfkit.data.pairwise import chosen_rejected, collate_pairs, collate_rankings, load_pair_splits, tokenize_rankings
from rlhfkit.data.preferences import load_comparisons, parse_prompt
from rlhfkit.data.records import Comparison
from rlhfkit.data.sft import IGNORE_INDEX
from rlhfkit.losses import ensemble_preference_loss, preference_loss
from rlhfkit.modeling import forward, models
from rlhfkit.modeling.reward_model import (
    MEMBERS_DIR,
    MEMBERS_KEY,
    fp32_score_head,
    head_normalisation,
    load_reward_backbone,
    raw_scores,
    reward_tokenizer,
    sequence_scores,
)
from rlhfkit.modeling.reward_model import RewardModel as RewardModel  # scoring lives in modeling/; kept importable here
from rlhfkit.run_layout import HELDOUT_FILE
from rlhfkit.run_layout import PreferenceMetric as M
from rlhfkit.stats import cluster_accuracy
from rlhfkit.training.loop import EvalOptions, FitResult, TrainOptions, fit, write_run_config

"""Held-out accuracy of a trained reward model, in its output directory (see :func:`heldout_accuracy`)."""


@dataclass
class RewardConfig(models.ModelOptions, TrainOptions, EvalOptions):
    """Config of the reward-model stage."""

    data: str = ""
    """Preference data: seed, TRL, hh-rlhf, ranking or rlhfkit format (.json, .jsonl, .parquet)."""
    eval_data: str = ""
    """Optional held-out preference file; if empty, `eval_fraction` of `data` is held out."""
    eval_fraction: float = 0.1
    """Fraction of comparisons held out when `eval_data` is empty (0 disables eval)."""
    eval_min_pairs: int = 0
    """With `eval_fraction` > 0 and no `eval_data`: hold out more comparisons than `eval_fraction` (up to a quarter)
    until the held-out split has this many strict pairs (ties do not count), so that the held-out accuracy is
    measured on enough pairs whatever share of the labels are ties. 0: `eval_fraction` alone."""
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
    head_init: Literal["zero", "normal", "keep"] = "normal"
    """Score-head initialisation: N(0, 1/(hidden+1)) or zeros (the seed design). With zeros the
    backbone gets no gradient until the head has moved, which at small learning rates is slow. `keep`: `model` is a
    reward model (a round-one reward model trained on new labels) whose head, of `ensemble_size` heads, trains on
    as it is; with `zero` or `normal` a reward model's blocks are kept and its head drawn again."""
    normalize: bool = True
    """Fit a gain and bias so the normalisation samples score mean 0, std 1."""
    norm_data: str = ""
    """JSONL of {prompt, response} samples for normalisation; empty: every response in `data`
    (held-out comparisons included; in the pipeline these are all samples of the SFT model)."""
    norm_max_samples: int = 1024
    """Score at most this many normalisation samples, evenly spaced over them (0 or less: all); a mean and
    std need no more, and scoring every response of a large preference set takes minutes."""
    ensemble_size: int = 1
    """Score heads on one shared backbone: K > 1 trains a reward-model ensemble (Coste et al. 2024), which RL,
    best-of-n and evaluation aggregate with `reward_aggregation` (mean, wco, uwo). 1: one reward model."""
    ensemble_bootstrap: bool = True
    """ensemble_size > 1: each member trains on its own bootstrap resample of the training examples (so the heads,
    which share every backbone feature, disagree); false: every member on every example, differing by seed only."""
    ensemble_backbones: Literal["shared", "separate"] = "shared"
    """ensemble_size > 1: `shared`: K score heads on one backbone (one forward whatever K); `separate`: K whole reward
    models trained one after another from seeds seed, seed+1, ... (head init and data order), as Coste et al. 2024
    did: K times the training and scoring cost, and members that share no feature. Member 0 is `output_dir` itself
    (a single reward model `from_pretrained` loads), members 1..K-1 `output_dir/members/k`, listed in its
    config.json."""
    num_layers: int = -1
    """Keep only the backbone's first `num_layers` transformer blocks (-1: all): a smaller, cheaper reward model
    initialised from the same weights, as InstructGPT (sec. 3.5) trained a 6B reward model for its 175B policies.
    Training, RL's scoring and best-of-n cost about num_layers / all of the full model's block compute. The saved
    model's config.json says `num_hidden_layers: num_layers`, so `from_pretrained` loads it as it is."""
    lr: float = 1e-5
    """Peak learning rate."""
    output_dir: str = "runs/reward"
    """Where the reward model, checkpoints and metrics go."""


class RewardTask:
    """The loop's :class:`~rlhfkit.training.loop.Task` for reward modelling. Items are pairs."""

    def __init__(self, margin: float):
        self.margin = margin

    def num_items(self, batch) -> int:
        return int(batch["target"].shape[0])

    def num_tokens(self, batch) -> int:
        return forward.num_tokens(batch)

    def loss(self, model, batch):
        """``(summed loss, stats)``. An ensemble's scores are (S, K): the loss is
        :func:`~rlhfkit.losses.ensemble_preference_loss` with the batch's ``head_weights`` (P, K) (bootstrap counts;
        absent: 1), and accuracy and margin are those of the heads' mean (raw) score."""
        chosen, rejected = chosen_rejected(batch, sequence_scores(model, batch))
        target = batch["target"]
        if chosen.dim() == 2:  # K heads
            losses = ensemble_preference_loss(chosen, rejected, target, self.margin + batch["margin"], batch.get("head_weights"))
            chosen, rejected = chosen.mean(-1), rejected.mean(-1)
        else:
            losses = preference_loss(chosen, rejected, target, self.margin + batch["margin"])
        # A tie counts as half right; a strict preference as right when chosen scores higher.
        correct = torch.where(target > 0.5, (chosen > rejected).float(), torch.full_like(target, 0.5))
        stats = {M.ACCURACY: correct.sum(), M.MARGIN: (chosen - rejected).detach().sum()}
        return losses.sum(), stats


def bootstrap_counts(n: int, heads: int, seed: int) -> torch.Tensor:
    """``(n, heads)`` bootstrap counts: column ``h`` counts how often each of ``n`` examples was drawn in ``n`` draws
    with replacement (head ``h``'s resample; each column sums to ``n``, about 63% of its entries are non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    columns = [torch.bincount(torch.randint(n, (n,), generator=generator), minlength=n) for _ in range(heads)]
    return torch.stack(columns, 1).float()


def with_head_weights(collate, heads: int):
    """``collate`` whose batches also hold ``head_weights`` (P, heads): each pair's example's ``head_weights`` (its
    bootstrap counts, :func:`bootstrap_counts`), 1 for an example without (held-out ones). Pairs are in the order
    both collates give them: example by example (a grouped example's pairs in its order)."""

    def collate_weighted(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(examples)
        weights = [e.get("head_weights", [1.0] * heads) for e in examples for _ in range(len(e["pairs"]) if "pairs" in e else 1)]
        batch["head_weights"] = torch.tensor(weights, dtype=torch.float32)
        return batch

    return collate_weighted


def _prompt_key(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[int, ...]:
    """The tokens before the response (the rendered prompt): pairs with the same key share a prompt."""
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return tuple(input_ids[:start])


def heldout_accuracy(
    model,
    tokenizer,
    comparisons_or_examples: Sequence,
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    chat_template: bool = True,
    precision: str = "bf16",
    seed: int = 0,
    resamples: int = 2000,
    gains: Sequence[float] | None = None,
    per_pair: bool = False,
) -> dict:
    """Pairwise accuracy of a reward model on held-out comparisons, with a 95% prompt-clustered bootstrap interval.

    ``comparisons_or_examples``: :class:`~rlhfkit.data.records.Comparison` records (tokenised here
    with ``max_length`` and ``chat_template``, as training does), or examples already tokenised by
    :func:`~rlhfkit.data.pairwise.load_pair_splits` -- whole rankings
    (:func:`~rlhfkit.data.pairwise.tokenize_rankings`) or single pairs
    (:func:`~rlhfkit.data.pairwise.tokenize_pairs`); ``max_length`` and ``chat_template`` then do nothing.
    ``model``: a ``*ForSequenceClassification`` (unwrapped; peft is fine); its raw scores are used
    (normalisation is monotone, it changes no order). A list of them is an ensemble of separate single-head
    models (``ensemble_backbones: separate``), one member each. ``tokenizer`` gives the padding id.

    Every strict pair (chosen ranked above rejected) counts: a K-way ranking gives K(K-1)/2, less its tied pairs. A
    pair scores 1.0 when the model scores chosen above rejected, 0.5 when the two scores are
    exactly equal, else 0.0. Ties (a tie label, a ranking's tied pair) are not strict pairs: they are counted in
    ``ties`` and left out.
    Pairs are clustered by prompt (the tokens before the response, so comparisons that share a
    prompt share a cluster) and the interval is :func:`rlhfkit.stats.cluster_accuracy` with
    ``seed`` and ``resamples``.

    Returns ``{"accuracy": float, "accuracy_ci": [lo, hi], "num_pairs": int, "num_prompts": int,
    "ties": int}``; with no strict pair, ``accuracy`` and ``accuracy_ci`` are None.

    A K-head ensemble (or K separate models) is judged by the mean of its heads' normalised scores (``gains``: each
    head's gain, which is all the normalisation changes in a difference of two scores; None: 1); the result adds
    ``ensemble_size`` and ``head_accuracy``, each head's accuracy on the same pairs.

    ``per_pair``: the result adds ``pairs``, ``{"correct": [...], "prompt": [...]}``, each strict pair's score (1, 0.5
    or 0) and its prompt's number (0, 1, ... in order of first appearance), in an order fixed by the examples and
    ``batch_size``: two models judged on the same comparisons with the same settings give aligned lists, for a
    paired comparison (:func:`rlhfkit.stats.cluster_accuracy` of their per-pair differences).
    """
    examples = list(comparisons_or_examples)
    if examples and isinstance(examples[0], Comparison):
        examples, _ = tokenize_rankings(tokenizer, examples, max_length=max_length, chat_template=chat_template, keep_ties=True)
    grouped = bool(examples) and "pairs" in examples[0]
    collate = collate_rankings if grouped else collate_pairs

    def sequences(example: dict) -> int:
        return len(example["input_ids"]) if grouped else 2

    # Batches of whole examples holding about batch_size sequences each.
    batches, current, size = [], [], 0
    for example in examples:
        current.append(example)
        size += sequences(example)
        if size >= batch_size:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)

    members = list(model) if isinstance(model, (list, tuple)) else [model]
    device = next(members[0].parameters()).device
    was_training = [m.training for m in members]
    for m in members:
        m.eval()
    correct: list[float] = []
    clusters: list[tuple[int, ...]] = []
    head_correct: list[list[float]] = []  # an ensemble's: per pair, per head
    ties = 0

    def right(c: float, r: float) -> float:
        return 1.0 if c > r else 0.5 if c == r else 0.0

    try:
        for chunk in batches:
            batch = collate(chunk, tokenizer.pad_token_id)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            with torch.no_grad(), models.autocast(device, precision):
                if len(members) == 1:
                    scores = sequence_scores(members[0], inputs).cpu()
                else:
                    scores = torch.stack([sequence_scores(m, inputs).cpu() for m in members], -1)
            chosen, rejected = chosen_rejected(batch, scores)
            heads: list = [None] * len(chosen)
            if chosen.dim() == 2:  # an ensemble: each head's pairs, and the heads' mean normalised score
                heads = list(zip(chosen.tolist(), rejected.tolist()))
                g = torch.ones(chosen.shape[1]) if gains is None else torch.tensor(list(gains), dtype=torch.float32)
                chosen, rejected = (g * chosen).mean(-1), (g * rejected).mean(-1)
            if grouped:  # pairs in collate_rankings order: example by example
                keys = [_prompt_key(e["input_ids"][0], e["labels"][0]) for e in chunk for _ in e["pairs"]]
            else:
                keys = [_prompt_key(e["chosen_input_ids"], e["chosen_labels"]) for e in chunk]
            for c, r, target, key, head in zip(chosen.tolist(), rejected.tolist(), batch["target"].tolist(), keys, heads):
                if target == 0.5:  # a tie label (or soft labels that cancel out)
                    ties += 1
                    continue
                # A soft label (graded human labels' meta.target) below 0.5 prefers the rejected response.
                flip = target < 0.5
                correct.append(right(r, c) if flip else right(c, r))
                clusters.append(key)
                if head is not None:
                    head_correct.append([right(hr, hc) if flip else right(hc, hr) for hc, hr in zip(*head)])
    finally:
        for m, mode in zip(members, was_training):
            m.train(mode)
    result: dict = {
        "accuracy": None,
        "accuracy_ci": None,
        "num_pairs": len(correct),
        "num_prompts": len(set(clusters)),
        "ties": ties,
    }
    if correct:
        estimate = cluster_accuracy(correct, clusters, resamples=resamples, seed=seed)
        result["accuracy"] = float(estimate.value)
        result["accuracy_ci"] = [float(estimate.ci[0]), float(estimate.ci[1])]
    if per_pair:
        numbers: dict = {}
        result["pairs"] = {"correct": correct, "prompt": [numbers.setdefault(k, len(numbers)) for k in clusters]}
    if head_correct:
        result["ensemble_size"] = len(head_correct[0])
        result["head_accuracy"] = [sum(column) / len(column) for column in zip(*head_correct)]
    return result


def load_splits(config: RewardConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """The stage's tokenised (train, held-out) examples: held out are ``config.eval_data``'s comparisons, else
    ``config.eval_fraction`` of ``config.data``'s (more where ``config.eval_min_pairs`` needs), drawn with
    ``config.seed``; ties kept."""
    return load_pair_splits(
        tokenizer,
        config.data,
        eval_data=config.eval_data,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        max_length=config.max_length,
        chat_template=config.chat_template,
        keep_ties=True,
        stage="reward",
        grouped=config.group_rankings,
        min_heldout_pairs=config.eval_min_pairs,
    )


def reload_trained(directory: Path, config: RewardConfig, device) -> torch.nn.Module:
    """A reward model this stage saved in ``directory``, loaded for scoring as it was trained: fp32 weights, the fp32
    score head, and the attention kernel it trained with (``config.attn_implementation``). Its held-out accuracy
    was measured in memory with that kernel; reloaded with another, near-tied pairs flip under bf16 (SmolLM2, 8
    blocks: member 0 of an ensemble at 0.768 with transformers' sdpa against 0.773 as the single model it is)."""
    from transformers import AutoModelForSequenceClassification

    model = fp32_score_head(AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)).to(device)
    models.set_attention(model, config.attn_implementation)
    return model


def _write_heldout(config: RewardConfig, model, tokenizer, eval_set: list[dict]) -> None:
    """Score the held-out examples with the trained model on the main process; write HELDOUT_FILE.

    Nothing is written when the held-out comparisons are all ties (no accuracy to report)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.is_main_process:
        out = Path(config.output_dir)
        if state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            model = reload_trained(out, config, state.device)  # the in-memory model is sharded; the saved one is whole
        gains = None
        if config.ensemble_size > 1:  # the heads' gains, as saved (the mean of normalised scores is what RL sees)
            from transformers import AutoConfig

            gains, _ = head_normalisation(AutoConfig.from_pretrained(out))
        result = heldout_accuracy(
            model, tokenizer, eval_set, batch_size=config.batch_size, precision=config.precision, seed=config.seed, gains=gains
        )
        _report_heldout(out, result)
    state.wait_for_everyone()


def _report_heldout(out: Path, result: dict) -> None:
    """Write a :func:`heldout_accuracy` result to ``out/HELDOUT_FILE`` and print it (nothing written without an
    accuracy: readers of HELDOUT_FILE expect one)."""
    if result["accuracy"] is None:
        log.warning(f"reward: no held-out accuracy: the held-out comparisons hold no strict pair ({result['ties']} ties)")
        return
    atomic_write_text(out / HELDOUT_FILE, json.dumps(result, indent=2) + "\n")
    lo, hi = result["accuracy_ci"]
    log.info(
        f"reward: held-out accuracy {result['accuracy']:.2f} [{lo:.2f}, {hi:.2f}] on {result['num_pairs']} "
        f"pairs ({result['num_prompts']} prompts)"
    )
    if "head_accuracy" in result:
        log.info(f"reward: held-out accuracy of each member: {', '.join(f'{a:.2f}' for a in result['head_accuracy'])}")


def _norm_samples(config: RewardConfig) -> tuple[list, list[str]]:
    """The (prompts, responses) the trained model's scores are normalised on. Read (and validated: every problem
    a DataError naming file, line and field) before training starts, so a bad ``norm_data`` fails in seconds."""
    if config.norm_data:
        rows = read_rows(config.norm_data)
        if not rows:
            raise DataError(config.norm_data, None, None, "no records (an empty norm_data file)")
        prompts, responses = [parse_prompt(r, "prompt") for r in rows], [r.get_str("response") for r in rows]
    else:
        prompts, responses = [], []
        for comp in load_comparisons(config.data):
            for response in comp.responses:
                prompts.append(comp.prompt)
                responses.append(response)
    keep = evenly_spaced(len(responses), config.norm_max_samples)
    return [prompts[i] for i in keep], [responses[i] for i in keep]


def train(config: RewardConfig) -> FitResult:
    """Train a reward model on ``config.data``; save a loadable ``*ForSequenceClassification``.

    With held-out data, also writes ``OUTPUT_DIR/heldout.json`` (:data:`HELDOUT_FILE`,
    :func:`heldout_accuracy` of the model as trained) and prints its accuracy.
    """
    if not config.data:
        raise ConfigError("reward: `data` (a preference file) is required")
    if config.ensemble_size < 1:
        raise ConfigError(f"reward: ensemble_size must be >= 1 (got {config.ensemble_size})")
    if config.eval_min_pairs < 0:
        raise ConfigError(f"reward: eval_min_pairs must be >= 0 (got {config.eval_min_pairs})")
    shared = config.ensemble_backbones == "shared"
    if config.ensemble_size > 1 and shared and not config.ensemble_bootstrap and config.head_init == "zero":
        raise ConfigError(
            "reward: ensemble_size > 1 with head_init=zero and ensemble_bootstrap=false: every head would start and "
            "train the same (identical members); use head_init=normal or ensemble_bootstrap=true"
        )
    # Before any model loads: a bad norm_data file must not surface at save time, after training.
    norm_samples = _norm_samples(config) if config.normalize else None
    tokenizer = reward_tokenizer(config.model)
    train_set, eval_set = load_splits(config, tokenizer)
    if config.ensemble_size > 1 and config.ensemble_backbones == "separate":
        return _train_separate(config, tokenizer, train_set, eval_set, norm_samples)
    return _train_one(config, tokenizer, train_set, eval_set, norm_samples)


def _train_separate(config: RewardConfig, tokenizer, train_set: list[dict], eval_set: list[dict], norm_samples) -> FitResult:
    """``ensemble_backbones: separate``: K single reward models on one split (see the module docstring), then the
    members' list in member 0's config.json and the ensemble's held-out accuracy in ``heldout.json``."""
    from accelerate import PartialState

    K, out = config.ensemble_size, Path(config.output_dir)
    counts = bootstrap_counts(len(train_set), K, seed=config.seed * 1_000_003 + 24) if config.ensemble_bootstrap else None
    member_dirs = [out] + [out / MEMBERS_DIR / str(k) for k in range(1, K)]
    first: FitResult | None = None  # member 0's, returned; the others' models are not kept in memory
    for k, member_out in enumerate(member_dirs):
        log.info(f"reward: ensemble member {k + 1} of {K} (seed {config.seed + k}) -> {member_out}")
        data = train_set
        if counts is not None:  # the member's bootstrap resample: example i repeated counts[i, k] times
            data = [example for example, n in zip(train_set, counts[:, k].tolist()) for _ in range(int(n))]
        member = replace(config, ensemble_size=1, seed=config.seed + k, output_dir=str(member_out))
        result = _train_one(member, tokenizer, data, eval_set, norm_samples)
        first = first or result
    state = PartialState()
    if state.is_main_process:
        saved = json.loads((out / "config.json").read_text())
        saved[MEMBERS_KEY] = [str(d.relative_to(out)) for d in member_dirs[1:]]
        atomic_write_text(out / "config.json", json.dumps(saved, indent=2, sort_keys=True) + "\n")
        write_run_config(out, "reward", config)
        if eval_set:
            members = [reload_trained(d, config, state.device) for d in member_dirs]
            gains = [head_normalisation(m.config)[0][0] for m in members]
            ensemble_result = heldout_accuracy(
                members,
                tokenizer,
                eval_set,
                batch_size=config.batch_size,
                precision=config.precision,
                seed=config.seed,
                gains=gains,
            )
            _report_heldout(out, ensemble_result)
    state.wait_for_everyone()
    assert first is not None  # K >= 2 members trained
    return first


def _train_one(config: RewardConfig, tokenizer, train_set: list[dict], eval_set: list[dict], norm_samples) -> FitResult:
    """Train one reward model (one head, or ``ensemble_size`` heads on its backbone) on the split; save it, and
    write its held-out accuracy when there is a held-out set."""
    out = Path(config.output_dir)
    write_run_config(out, "reward", config)

    K = config.ensemble_size
    if K > 1 and config.ensemble_bootstrap:  # each head's resample of the training examples, the same on every process
        counts = bootstrap_counts(len(train_set), K, seed=config.seed * 1_000_003 + 24)
        for example, row in zip(train_set, counts.tolist()):
            example["head_weights"] = row
        log.info(
            f"reward: {K} heads, each on a bootstrap resample of the {len(train_set)} training examples "
            f"({float((counts > 0).float().mean()):.0%} of them drawn per head on average)"
        )
    model = load_reward_backbone(
        config.model,
        pad_token_id=tokenizer.pad_token_id,
        head_init=config.head_init,
        seed=config.seed,
        ensemble_size=K,
        num_layers=config.num_layers,
    )
    model = models.prepare_for_training(model, config)
    if config.lora_r > 0:  # the fresh head must train too
        for name, param in model.named_parameters():
            if "score" in name:
                param.requires_grad_(True)

    def save(unwrapped, out_dir: Path, state_dict) -> None:
        target = unwrapped
        if hasattr(target, "merge_and_unload"):
            target = models.merged_copy(target)
        gains, biases = [1.0] * K, [0.0] * K
        if norm_samples is not None:
            prompts, responses = norm_samples
            scores = raw_scores(
                target,
                tokenizer,
                prompts,
                responses,
                chat_template=config.chat_template,
                max_length=config.max_length,
                precision=config.precision,
                progress="reward: normalisation" if config.progress else None,
            ).reshape(len(responses), K)
            for h in range(K):  # each head its own gain and bias
                column = scores[:, h]
                std = float(column.std()) if len(column) > 1 else 1.0
                gains[h] = 1.0 / max(std, 1e-6)
                biases[h] = -float(column.mean()) * gains[h]
                head = f" head {h}" if K > 1 else ""
                log.info(
                    f"reward: normalisation{head} on {len(column)} samples: raw mean {float(column.mean()):.4f}, std {std:.4f}"
                )
        # One head: floats, as single reward models always stored them; an ensemble: a list, one per head.
        target.config.rlhfkit_reward_gain = gains[0] if K == 1 else gains
        target.config.rlhfkit_reward_bias = biases[0] if K == 1 else biases
        target.config.rlhfkit_chat_template = config.chat_template
        models.save_pretrained(target, tokenizer, out_dir, state_dict=None if target is not unwrapped else state_dict)

    pad_id = tokenizer.pad_token_id
    collate = collate_rankings if config.group_rankings else collate_pairs

    def collate_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id, packed=config.packing)

    result = fit(
        config,
        model=model,
        task=RewardTask(config.margin),
        train_set=train_set,
        eval_set=eval_set,
        collate=with_head_weights(collate_batch, K) if K > 1 else collate_batch,
        precision=config.precision,
        save_model=save,
        run_info={"stage": "reward", "data": config.data},
    )
    if eval_set:  # no held-out data (eval_fraction 0, no eval_data): nothing written
        _write_heldout(config, result.model, tokenizer, eval_set)
    return result
