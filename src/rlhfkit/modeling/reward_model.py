"""Reward-model scoring: the scalar-head backbone, its scores on padded or packed batches, and :class:`RewardModel`.

A reward model is transformers' ``*ForSequenceClassification`` with ``num_labels=1`` (a causal-LM backbone and a
scalar ``score`` head read at the last non-padding token), so ``AutoModelForSequenceClassification.from_pretrained``
loads what :func:`rlhfkit.reward.train` writes. :class:`RewardModel` applies the gain and bias that training fits
(``config.json``: ``rlhfkit_reward_gain``, ``rlhfkit_reward_bias``). The head runs in fp32 under any autocast
(:func:`fp32_score_head`).

A **reward-model ensemble** (``rlhfkit reward ensemble_size=K``) is the same class with ``num_labels=K``: K score
heads, the rows of one ``score`` layer of shape (K, hidden), on one shared backbone; ``config.json`` adds
``rlhfkit_ensemble_size: K`` and holds the gain and bias as lists, one per head. ``from_pretrained`` loads it as it
is (raw logits: (N, K)). :class:`RewardModel` normalises each head with its own gain and bias, then aggregates the K
member scores into one reward (:func:`rlhfkit.losses.aggregate_rewards`: mean, wco or uwo).

An ensemble of **separate** reward models (``ensemble_backbones: separate``) is member 0's directory, a single reward
model as above, whose ``config.json`` lists the other members' directories (``rlhfkit_ensemble_members``, relative
to it). :class:`RewardModel` loads every member and scores with each; ``from_pretrained`` loads member 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data import packing
from rlhfkit.data.pairwise import tokenize_response
from rlhfkit.data.sft import collate_sft
from rlhfkit.losses import REWARD_AGGREGATIONS, aggregate_rewards
from rlhfkit.modeling import attention, models

ENSEMBLE_KEY = "rlhfkit_ensemble_size"
"""``config.json`` key of a reward-model ensemble: its number of heads (absent: one head)."""
MEMBERS_KEY = "rlhfkit_ensemble_members"
"""``config.json`` key of an ensemble of separate reward models (``ensemble_backbones: separate``), in member 0's
directory: the other members' directories, relative to it (absent: no other member)."""
MEMBERS_DIR = "members"
"""Where ``rlhfkit reward ensemble_backbones=separate`` puts members 1..K-1 in its output directory."""


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
    """Score of each sequence of a padded or packed batch, read at its last token. Shape: (N,) for a one-head model,
    (N, K) for a K-head ensemble.

    Packed: the model's own pooling expects one sequence per row, so the score head's
    per-position output is captured (a forward hook; the forward still runs through
    the wrapped model, so DDP syncs gradients) and read at each sequence's last token.
    """
    if packing.is_packed(batch):
        attention.require_kernel(model)
        with attention.capture_output(_score_head(model)) as outputs:
            model(**packing.model_inputs(batch))
        return outputs[-1][0][packing.last_positions(batch)].squeeze(-1).float()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits.squeeze(-1).float()


def ensemble_size(config) -> int:
    """The number of score heads of a reward model's transformers ``config``: ``rlhfkit_ensemble_size`` (1 when
    absent, as in every single-head directory). Anything else with more than one output (a K-class classifier) is
    not a reward model: a ValueError says so."""
    size = int(getattr(config, ENSEMBLE_KEY, None) or 1)
    labels = int(getattr(config, "num_labels", 1))
    if labels != size:
        what = f"an rlhfkit ensemble of {size} heads" if size > 1 else "a reward model"
        raise ValueError(
            f"{what} must have {size} output(s), this one has num_labels={labels} (a classifier, not a reward model?)"
        )
    return size


def head_normalisation(config) -> tuple[list[float], list[float]]:
    """``(gains, biases)``, one per head, stored by training (a float for one head, lists for an ensemble); absent:
    gain 1, bias 0 (raw scores)."""
    k = ensemble_size(config)

    def per_head(name: str, default: float) -> list[float]:
        value = getattr(config, name, default)
        values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * k
        if len(values) != k:
            raise ValueError(f"reward model: {name} has {len(values)} values for {k} heads")
        return values

    return per_head("rlhfkit_reward_gain", 1.0), per_head("rlhfkit_reward_bias", 0.0)


def reward_tokenizer(spec: str):
    """The tokenizer, padded with a token that never ends a scored sequence.

    transformers reads the score at the last token that is not ``pad_token_id``;
    if padding were EOS, a sequence ending in EOS would be read one token early.
    """
    tokenizer = models.load_tokenizer(spec)
    if tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.unk_token is not None:
        if tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def truncated_config(config, num_layers: int):
    """``config`` (a transformers config) cut to its first ``num_layers`` blocks; -1 leaves it as it is.

    Per-layer lists (``layer_types``: sliding or full attention per block, in Qwen2/3, Gemma, ...) are cut with it."""
    if num_layers == -1:
        return config
    total = config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ConfigError(f"num_layers must be -1 or between 1 and the model's {total} layers (got {num_layers})")
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    return config


def load_reward_backbone(
    spec: str, *, pad_token_id: int, head_init: str = "zero", seed: int = 0, ensemble_size: int = 1, num_layers: int = -1
):
    """A ``*ForSequenceClassification`` from a model spec, head initialised: ``num_labels=1``, or for an ensemble
    ``num_labels=ensemble_size`` heads (one ``score`` layer of shape (K, hidden); ``head_init="normal"`` draws each
    row apart, so the heads start different). ``num_layers`` keeps the first blocks only (:func:`truncated_config`);
    the weights of the blocks kept are the checkpoint's.

    ``spec`` may be a reward model's directory (a round-one reward model trained again on new labels): its blocks
    start this one; its head is drawn again (``zero``, ``normal``: any number of heads), or with
    ``head_init="keep"`` kept as trained (the same number of heads). Its rlhfkit keys (ensemble size, members) do
    not carry over: they describe the model being loaded, not the one being trained."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if ensemble_size < 1:
        raise ConfigError(f"ensemble_size must be >= 1 (got {ensemble_size})")
    if spec == models.TINY:
        if head_init == "keep":
            raise ConfigError("head_init=keep: the tiny model has no trained head to keep; use head_init=normal or zero")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(
                truncated_config(models.tiny_config(num_labels=ensemble_size), num_layers), dtype=torch.float32
            )
    else:
        from transformers.utils import logging as hf_logging

        path = models.resolve(spec)
        saved = AutoConfig.from_pretrained(path)
        is_reward_model = any(a.endswith("ForSequenceClassification") for a in saved.architectures or [])
        if head_init == "keep" and not (is_reward_model and saved.num_labels == ensemble_size):
            raise ConfigError(
                f"head_init=keep: {spec} is not a reward model with {ensemble_size} head(s) (its config.json: "
                f"architectures {saved.architectures}, {saved.num_labels} labels); head_init=normal draws a new head"
            )
        if is_reward_model and head_init != "keep":
            log.info(
                f"reward: {spec} is a reward model: its blocks start this one, its head is drawn again "
                f"(head_init={head_init}; head_init=keep trains its head on)"
            )
        # A head that is drawn anew is missing from an SFT checkpoint, and transformers' load report would flag it.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            config = truncated_config(AutoConfig.from_pretrained(path, num_labels=ensemble_size), num_layers)
            # A reward model's head of another size is drawn again below, so its size is no error; every other
            # weight's shape comes from the same config.json, so nothing else can differ.
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=torch.float32, ignore_mismatched_sizes=saved.num_labels != ensemble_size
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        for key in (ENSEMBLE_KEY, MEMBERS_KEY):
            if hasattr(model.config, key):
                delattr(model.config, key)
    model.config.pad_token_id = pad_token_id
    if ensemble_size > 1:  # a single-head model's config.json stays as it always was
        setattr(model.config, ENSEMBLE_KEY, ensemble_size)
    if head_init == "keep":
        return fp32_score_head(model)
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
def raw_scores(
    model,
    tokenizer,
    prompts: list,
    responses: list[str],
    *,
    batch_size: int = 16,
    chat_template: bool = True,
    max_length: int = 1024,
    precision: str = "bf16",
    progress: str | None = None,
    packed: bool | None = None,
) -> torch.Tensor:
    """Raw scores of (prompt, response) pairs. Shape: (N,), or (N, K) for a K-head ensemble. ``progress``: a
    progress-bar title.

    ``packed`` (default: whether ``model`` attends with rlhfkit's kernel): each batch is one packed row
    (:mod:`rlhfkit.data.packing`) with no padding, in which consecutive rows with the same prompt share one run of it
    (a best-of-n pool's n responses, an eval's samples per prompt) and the start every sequence shares (a chat
    template's system prompt) runs once; the scores are read at each sequence's last token, as the reward stage
    trains them. Otherwise a padded batch."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    packed = attention.uses_kernel(model) if packed is None else packed
    was_training = model.training
    model.eval()
    scores = []
    bar = tqdm(total=len(responses), unit="response", desc=progress, disable=progress is None)
    for start in range(0, len(responses), batch_size):
        rows = list(zip(prompts[start : start + batch_size], responses[start : start + batch_size]))
        seqs = []
        for prompt, response in rows:
            ids, labels = tokenize_response(tokenizer, prompt, response, chat_template=chat_template)
            seqs.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
        if packed:
            groups: list[list[list[int]]] = []
            for i, seq in enumerate(seqs):  # a run of rows with one prompt is a group: its prompt runs once
                if i and rows[i][0] == rows[i - 1][0]:
                    groups[-1].append(seq["input_ids"])
                else:
                    groups.append([seq["input_ids"]])
            batch = {k: v.to(device) for k, v in packing.pack(groups).items()}
            with models.autocast(device, precision):
                scores.append(sequence_scores(model, batch).cpu())
        else:
            batch = collate_sft(seqs, tokenizer.pad_token_id)
            with models.autocast(device, precision):
                inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
                logits = model(**inputs).logits
            scores.append(logits.squeeze(-1).float().cpu())
        bar.update(len(seqs))
    bar.close()
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def head_inputs(model, tokenizer, prompts: list, responses: list[str], **kwargs) -> torch.Tensor:
    """What the score head of ``model`` reads for each (prompt, response): the final hidden state at the response's
    last token, (N, hidden) in fp32. :func:`raw_scores` (``kwargs`` are its options) with the head's output
    replaced by its input for the call (a forward hook), so tokenisation, chat template, packing and truncation are
    the scores' own: ``head(head_inputs(...))`` is :func:`raw_scores`. Features for querying rules that compare
    responses or prompts (:func:`rlhfkit.active.diverse_pick`)."""
    handle = _score_head(model).register_forward_hook(lambda module, args, output: args[0].float())
    try:
        return raw_scores(model, tokenizer, prompts, responses, **kwargs)
    finally:
        handle.remove()


def member_dirs(path: str | Path, config=None) -> list[Path]:
    """The directories of a reward model's members: ``path`` itself, then the separate members its ``config.json``
    lists (``rlhfkit_ensemble_members``; ``config``: its transformers config, if loaded). A listed directory that is
    not a model is a ConfigError naming it."""
    path = Path(path)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    listed = getattr(config, MEMBERS_KEY, None) or []
    if not isinstance(listed, list) or not all(isinstance(d, str) for d in listed):
        raise ConfigError(f"{path / 'config.json'}: {MEMBERS_KEY} must be a list of directories, got {listed!r}")
    dirs = [path] + [path / d for d in listed]
    for d in dirs[1:]:
        if not (d / "config.json").is_file():
            raise ConfigError(
                f"{path / 'config.json'}: {MEMBERS_KEY} lists {d}, which is not a reward-model directory (no config.json)"
            )
    return dirs


class RewardModel:
    """Scores text with a trained reward-model directory (its own tokenizer), normalised.

    ``RewardModel(dir)(prompts, responses) -> list[float]`` — the same signature as a
    ``module:function`` reward, so PPO, evaluation and best-of-n take either.

    An ensemble directory (``rlhfkit reward ensemble_size=K``) scores with all K heads in one forward (separate
    members, ``ensemble_backbones=separate``: one forward each):
    :meth:`member_scores` gives each head's normalised score, (N, K); calling the model gives them aggregated by
    ``aggregation`` (:func:`rlhfkit.losses.aggregate_rewards`: ``mean``, ``wco`` or ``uwo`` with ``uwo_coef``). For
    a single-head directory every aggregation is its score.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str = "bf16",
        batch_size: int = 16,
        device=None,
        aggregation: str = "mean",
        uwo_coef: float = 0.5,
    ):
        """``device``: where it scores (default :func:`rlhfkit.modeling.models.inference_device`). On CUDA with
        ``precision`` bf16 its weights are bf16 (half the memory; the score head stays fp32); on the CPU they stay
        fp32 under bf16 autocast, which this project measured faster there than bf16 weights."""
        from transformers import AutoModelForSequenceClassification

        if aggregation not in REWARD_AGGREGATIONS:
            raise ConfigError(f"reward_aggregation must be one of {', '.join(REWARD_AGGREGATIONS)}, not {aggregation!r}")
        if not uwo_coef >= 0:
            raise ConfigError(f"reward_uwo_coef must be >= 0 (got {uwo_coef}): a negative one rewards disagreement")
        self.path = str(path)
        self.tokenizer = reward_tokenizer(self.path)
        device = torch.device(device) if device is not None else models.inference_device()
        dtype = torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32

        def load(member: Path):
            model = AutoModelForSequenceClassification.from_pretrained(member, dtype=dtype).eval()
            head = _score_head(model)
            if isinstance(head, torch.nn.Linear):
                head.float()
            model = fp32_score_head(model.to(device))
            try:  # packed scoring (raw_scores): rlhfkit's kernel, as the reward stage trains with
                models.set_attention(model)
            except (ValueError, NotImplementedError) as e:  # an architecture transformers cannot give another kernel
                log.info(f"reward model {member}: padded scoring ({e})")
            return model

        self.model = load(Path(self.path))
        # Separate members (ensemble_backbones: separate): single-head models beside this one, scored one by one.
        self.members = [self.model] + [load(d) for d in member_dirs(self.path, self.model.config)[1:]]
        for member in self.members[1:]:
            if ensemble_size(member.config) != 1 or ensemble_size(self.model.config) != 1:
                raise ConfigError(f"{self.path}: an ensemble of separate members must have single-head members")
            if member.config.pad_token_id != self.model.config.pad_token_id:
                raise ConfigError(f"{self.path}: its members pad with different tokens (not one tokenizer)")
        self.tokenizer.pad_token_id = self.model.config.pad_token_id
        if len(self.members) > 1:
            self.num_members = len(self.members)
            each = [head_normalisation(m.config) for m in self.members]  # one head each: ([gain], [bias])
            gains, biases = [g[0] for g, _ in each], [b[0] for _, b in each]
        else:
            self.num_members = ensemble_size(self.model.config)
            gains, biases = head_normalisation(self.model.config)
        self.gains, self.biases = torch.tensor(gains), torch.tensor(biases)
        self.gain, self.bias = gains[0], biases[0]  # a single-head model's, as before ensembles
        self.chat_template = bool(getattr(self.model.config, "rlhfkit_chat_template", True))
        self.precision, self.batch_size = precision, batch_size
        self.aggregation, self.uwo_coef = aggregation, uwo_coef

    def raw(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """Raw (unnormalised) scores: (N,), or (N, K) for an ensemble."""
        scores = [raw_scores(member, self.tokenizer, prompts, responses, **self._options()) for member in self.members]
        return scores[0] if len(scores) == 1 else torch.stack(scores, -1)

    def features(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """What the (first member's) score head reads for each pair: (N, hidden), fp32 (:func:`head_inputs`)."""
        return head_inputs(self.model, self.tokenizer, prompts, responses, **self._options())

    def raw_and_features(self, prompts: list, responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`raw` and :meth:`features` together. One forward when the heads share one trunk: the score head is
        linear on the features, computed in fp32 as :func:`fp32_score_head` does, so its map of them is :meth:`raw`.
        Separate members (or a head that is not ``nn.Linear``) score with a forward of their own."""
        x = self.features(prompts, responses)
        head = _score_head(self.model)
        if len(self.members) > 1 or not isinstance(head, torch.nn.Linear):
            return self.raw(prompts, responses), x
        bias = None if head.bias is None else head.bias.float()
        raw = F.linear(x, head.weight.float(), bias)
        return (raw.squeeze(-1) if raw.shape[-1] == 1 else raw), x

    def _options(self) -> dict:
        """How this model scores: :func:`raw_scores`'s options."""
        return dict(batch_size=self.batch_size, chat_template=self.chat_template, precision=self.precision)

    def member_scores(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """Each head's normalised score ``gain_h * raw_h + bias_h``: (N, K) (K = 1 for a single-head model)."""
        raw = self.raw(prompts, responses).reshape(len(responses), self.num_members)
        return self.gains * raw + self.biases

    def aggregate(self, members: torch.Tensor) -> torch.Tensor:
        """:meth:`member_scores` as one reward per sample, by this model's ``aggregation``: (N, K) -> (N,)."""
        return aggregate_rewards(members, self.aggregation, self.uwo_coef)

    def __call__(self, prompts: list, responses: list[str], **kwargs) -> list[float]:
        if self.num_members == 1:  # gain * raw + bias, bit for bit as before ensembles
            return (self.gain * self.raw(prompts, responses) + self.bias).tolist()
        return self.aggregate(self.member_scores(prompts, responses)).tolist()
