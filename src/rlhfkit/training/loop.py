"""The one training loop shared by every offline stage (SFT, reward model, DPO).

It is built on accelerate's :class:`~accelerate.Accelerator`, so the same code
runs on one CPU, one GPU, or under ``accelerate launch`` with DDP, FSDP or
DeepSpeed. A stage supplies a :class:`Task` — how to count loss items in a batch
and how to compute the summed loss — and the loop does the rest:

1. shard a seeded, per-epoch permutation of the data across processes;
2. for each optimizer step, take ``grad_accum`` micro-batches per process and
   normalise the loss by the number of loss items (tokens, pairs) in the *whole*
   global batch, so ``grad_accum x batch`` and ``processes x batch`` give the same
   gradient as one big batch (not a mean of per-micro-batch means);
3. clip gradients, step AdamW and the warmup + cosine schedule;
4. log to ``metrics.jsonl`` / TensorBoard, evaluate, checkpoint durably (:class:`Checkpointer`);
5. on restart, resume from the newest checkpoint exactly where it stopped
   (weights, optimizer, scheduler, RNG states and data position), if it was
   written under the same config (:data:`RESUME_FREE_KEYS` aside).

Online RL (PPO/GRPO) has a different step — rollouts, then epochs over them —
but reuses the pieces here: :func:`make_accelerator`, :class:`Checkpointer` and
:class:`~rlhfkit.training.tracking.MetricsLogger`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from rlhfkit import log
from rlhfkit.config import ConfigError, to_dict
from rlhfkit.data.io import atomic_write_text, fsync_path, fsync_tree
from rlhfkit.modeling.models import (
    CheckpointError,
    checkpoint_dirs,
    describe_write_failure,
    free_space,
    is_write_failure,
    remove_stale_temps,
)
from rlhfkit.run_layout import EVAL_PREFIX
from rlhfkit.training.optim import build_optimizer, build_scheduler, prime_state
from rlhfkit.training.sharding import is_sharded, whole_parameters
from rlhfkit.training.tracking import MetricsLogger, is_eval_record


@dataclass
class TrainOptions:
    """Optimisation, logging and checkpointing fields shared by every trainer config."""

    output_dir: str = "runs/out"
    """Where the final model, checkpoints, metrics.jsonl and TensorBoard logs go."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means `num_epochs` passes over the data."""
    num_epochs: float = 1.0
    """Passes over the training data when `max_steps` is -1."""
    batch_size: int = 8
    """Micro-batch size per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step. Global batch = batch_size x grad_accum x processes."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent in linear warmup."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = 1
    """Write metrics every N steps."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: none)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """`auto`: resume from the newest checkpoint in output_dir if any (an older one if it cannot be loaded, saying
    why), refused if the config changed since it was written (only the keys in `rlhfkit.training.loop.RESUME_FREE_KEYS`,
    e.g. max_steps and logging, may change); `force`: resume from the newest checkpoint even if the config
    changed, printing the changed keys (their new values apply from there on); `never`: start over; or the path
    of a checkpoint (refused too if the config differs)."""
    progress: bool = True
    """Show a progress bar (rate, ETA, tokens/s)."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events under output_dir/tensorboard."""


@dataclass
class EvalOptions:
    """For trainers with a held-out split (SFT, reward model, DPO); online RL has none."""

    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""


class Task(Protocol):
    """What a stage gives the loop: loss items and a summed loss for a batch."""

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss items in a batch (target tokens for SFT, pairs for a reward model or DPO)."""

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Non-padding tokens in a batch, for throughput."""

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(sum of per-item losses, {name: sum of a per-item statistic})``."""


DEEPSPEED_AUTO = "auto"
"""The value in a DeepSpeed config that asks whoever starts DeepSpeed (accelerate, here rlhfkit) to fill a key in."""


def fill_deepspeed_config(
    config: dict[str, Any], *, micro_batch_size: int, grad_accum: int, num_processes: int, max_grad_norm: float
) -> dict[str, Any]:
    """A copy of DeepSpeed config ``config`` with the keys this run decides filled in where they are ``"auto"`` or
    missing, so that ``acc.prepare(model, optimizer)`` works without a DataLoader and trains as the run's config says.

    What each key gets, and why rlhfkit fills it rather than leaving it to accelerate's
    ``Accelerator._prepare_deepspeed`` (accelerate/accelerator.py):

    - ``train_micro_batch_size_per_gpu`` = ``micro_batch_size`` (rows per process) and ``train_batch_size`` =
      ``micro_batch_size x grad_accum x num_processes``: accelerate fills ``"auto"`` from the ``batch_size`` of a
      DataLoader passed to ``prepare`` and raises without one; rlhfkit shards its data itself (:func:`shard_indices`)
      and passes none.
    - ``gradient_accumulation_steps`` = ``grad_accum``: an explicit value there replaces the Accelerator's (with only
      a warning), but the loop takes ``grad_accum`` micro-batches per step and scales the loss by it
      (:func:`global_mean_scale`). accelerate writes 1 into a DeepSpeed config file that lacks the key
      (``DeepSpeedPlugin.__post_init__``, accelerate/utils/dataclasses.py), so only ``"auto"`` is safe for every
      ``grad_accum``.
    - ``gradient_clipping`` = ``max_grad_norm`` (0: DeepSpeed does not clip): accelerate fills ``"auto"`` with 1.0,
      DeepSpeed's default for a missing key is 1.0 too (``GRADIENT_CLIPPING_DEFAULT``, deepspeed/runtime/constants.py),
      and under DeepSpeed ``acc.clip_grad_norm_`` clips nothing (``Accelerator.clip_grad_norm_`` returns the engine's
      norm): the engine is the only one that clips.
    - under ZeRO stage 3, ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` = True: accelerate fills
      ``"auto"`` with False, and ``Accelerator.get_state_dict``, which :func:`fit` calls to save the final model, then
      refuses to gather the partitioned weights, after the whole run.

    ``config`` itself is not changed.

    Raises:
        ConfigError: naming every key that ``config`` sets to another value than the run's.
    """
    filled = copy.deepcopy(config)
    zero = filled.get("zero_optimization", {})
    # key -> (the run's value, where it comes from); a dotted key lives in the zero_optimization section
    wanted: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (micro_batch_size, "rows per process per micro-batch"),
        "gradient_accumulation_steps": (grad_accum, "grad_accum"),
        "train_batch_size": (
            micro_batch_size * grad_accum * num_processes,
            f"batch_size x grad_accum x processes = {micro_batch_size} x {grad_accum} x {num_processes}",
        ),
        "gradient_clipping": (float(max_grad_norm), "max_grad_norm"),
    }
    if zero.get("stage") == 3:
        wanted["zero_optimization.stage3_gather_16bit_weights_on_model_save"] = (True, "the final save gathers the weights")
    conflicts = []
    for full_key, (value, source) in wanted.items():
        node, key = (zero, full_key.partition(".")[2]) if "." in full_key else (filled, full_key)
        current = node.get(key, DEEPSPEED_AUTO)
        if current == DEEPSPEED_AUTO:
            node[key] = value
        elif current != value:
            conflicts.append(f"{full_key} is {current!r}, the run needs {value!r} ({source})")
    if conflicts:
        raise ConfigError(
            "the DeepSpeed config disagrees with the run: "
            + "; ".join(conflicts)
            + '; set these keys to "auto" (rlhfkit fills them in) or to the values the run needs (with '
            "`accelerate launch` and no DeepSpeed JSON, ZeRO-3's gather is --zero3_save_16bit_model true)"
        )
    return filled


def _refuse_stale_optimizer(acc) -> None:
    """Refuse FSDP version 1 with ``use_orig_params`` false, where the optimizer built before wrapping trains nothing.

    rlhfkit builds the optimizer before ``acc.prepare`` wraps the model. FSDP1 without ``use_orig_params`` replaces
    the parameters with flat ones; accelerate re-points the optimizer only for FSDP2, XLA, and FSDP1's meta
    parameters (``Accelerator.prepare`` / ``_get_parameters_to_remap``, accelerate/accelerator.py), so the optimizer
    would step parameters the model no longer uses. Building the optimizer after wrapping instead would not be right
    either: the flat parameters are all 1-D, so :func:`~rlhfkit.training.optim.build_optimizer`'s no-decay rule
    (biases and norms) would take every weight.
    """
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP or acc.is_fsdp2:
        return
    if not acc.state.fsdp_plugin.use_orig_params:
        raise ConfigError(
            "FSDP version 1 with use_orig_params false is not supported: it replaces the parameters the optimizer "
            "holds, so training would not change the weights; set fsdp_use_orig_params: true in the accelerate config "
            "(`accelerate launch --fsdp_use_orig_params true`, its default) or use FSDP2 (fsdp_version: 2)"
        )


def _refuse_lora_under_fsdp(acc, model) -> None:
    """Refuse a LoRA (peft) model under FSDP: its final save (peft's state dict, then the merge) fails on the
    sharded model (``Attempted to access the data pointer on an invalid python storage``, seen under FSDP2 on 2 CPU
    processes), and no gathered LoRA save has been built or tested."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return
    if any(hasattr(m, "peft_config") for m in (model, getattr(model, "policy", None), getattr(model, "critic", None))):
        raise ConfigError("LoRA (lora_r > 0) under FSDP is not supported: train LoRA under DDP (`accelerate launch --multi_gpu`)")


def prepare(acc, model, optimizer, *, micro_batch_size: int | None = None, max_grad_norm: float | None = None):
    """``acc.prepare(model, optimizer)``, minus accelerate's fp32 cast of everything the model returns.

    Under mixed precision accelerate wraps the model's forward in autocast and casts
    its outputs to fp32. rlhfkit runs every forward inside ``acc.autocast()`` anyway,
    and losses read logits a chunk of rows at a time in fp32 (:mod:`rlhfkit.losses`),
    so the cast only made a whole fp32 copy of the bf16 logits, and of their gradient:
    for a GRPO step of SmolLM2 (1,927 x 49k logits) 380 MB each. Time per update was
    the same with and without it (measured); memory is what it saves. Values are
    unchanged: bf16 -> fp32 is exact, and the gradient is rounded to bf16 where it
    meets the bf16 matmul either way.

    Under DeepSpeed, ``micro_batch_size`` (rows per process per micro-batch) and ``max_grad_norm`` are required: they
    complete the DeepSpeed config first (:func:`fill_deepspeed_config`). FSDP version 1 without ``use_orig_params``
    is refused (:func:`_refuse_stale_optimizer`), and so is LoRA under FSDP (:func:`_refuse_lora_under_fsdp`).

    On CPU the optimizer state is then made up front (:func:`rlhfkit.training.optim.prime_state`), except under
    DeepSpeed, whose ZeRO optimizer steps on the gradients it reduced into its own buffers: a step without a backward
    fails there (``KeyError`` in ``DeepSpeedZeroOptimizer.scaled_global_norm``, ZeRO-2).
    """
    _refuse_stale_optimizer(acc)
    _refuse_lora_under_fsdp(acc, model)
    plugin = acc.state.deepspeed_plugin
    if plugin is not None:
        if micro_batch_size is None or max_grad_norm is None:
            raise TypeError("under DeepSpeed, prepare() needs micro_batch_size and max_grad_norm (they fill its config)")
        filled = fill_deepspeed_config(
            plugin.deepspeed_config,
            micro_batch_size=micro_batch_size,
            grad_accum=acc.gradient_accumulation_steps,
            num_processes=acc.num_processes,
            max_grad_norm=max_grad_norm,
        )
        # In place: the plugin's HfDeepSpeedConfig holds this same dict, and accelerate reads it there.
        plugin.deepspeed_config.clear()
        plugin.deepspeed_config.update(filled)
    model, optimizer = acc.prepare(model, optimizer)
    acc.unwrap_model(model, keep_fp32_wrapper=False)  # removes the wrapper in place
    if acc.device.type == "cpu" and plugin is None:
        prime_state(getattr(optimizer, "optimizer", optimizer))  # the torch optimizer inside accelerate's wrapper
    return model, optimizer


def process_state():
    """accelerate's ``PartialState`` as this run's Accelerator will find it, for work before the Accelerator exists.

    Under a CPU launch (``ACCELERATE_USE_CPU=true``) that is the joined gloo group: a plain ``PartialState()`` reads
    no such flag (``AcceleratorState`` does, accelerate/state.py) and would set up a one-process state that the
    Accelerator then cannot join.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def make_accelerator(precision: str, grad_accum: int = 1):
    """An Accelerator with bf16/fp16 autocast (fp32 master weights) or plain fp32."""
    from accelerate import Accelerator

    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
    if precision not in mixed:
        raise ValueError(f"precision must be one of bf16, fp16, fp32; got '{precision}'")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision fp16 needs a CUDA GPU; use bf16 on CPU")
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton that refuses a different
    # mixed_precision once set, so a second run in the same process (a pipeline,
    # a notebook, tests) with another precision would fail. Forget it; the
    # PartialState (process group, device) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=mixed[precision], gradient_accumulation_steps=grad_accum)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        # accelerate only joins CPU processes into a gloo group when asked to, so
        # `accelerate launch --multi_gpu` on a machine without GPUs would otherwise
        # train independent copies that overwrite each other's output_dir.
        raise RuntimeError(
            f"launched as one of {world_size} processes, but accelerate set up a single-process run; "
            "on a machine without GPUs set ACCELERATE_USE_CPU=true so the processes train together (gloo)"
        )
    return accelerator


# ----------------------------------------------------------------------------- what every trainer's run shares
# fit() below and rl.RLTrainer / rl.train both start, normalise and report through these, so the two loops keep
# one copy of each rule.


def start_accelerator(precision: str, grad_accum: int, seed: int):
    """The run's Accelerator (:func:`make_accelerator`), with every RNG seeded (accelerate's ``set_seed``)."""
    acc = make_accelerator(precision, grad_accum)
    from accelerate.utils import set_seed

    set_seed(seed)
    return acc


def build_optimization(model, options: TrainOptions, total_steps: int):
    """``(optimizer, scheduler)`` from the options: AdamW, and the schedule with ``warmup_ratio`` of ``total_steps``.

    The scheduler is neither prepared (accelerate would step a prepared scheduler once per process) nor registered
    with accelerate (which pickles it): the :class:`Checkpointer` keeps its state as JSON.
    """
    optimizer = build_optimizer(
        model,
        lr=options.lr,
        weight_decay=options.weight_decay,
        betas=(options.adam_beta1, options.adam_beta2),
        eps=options.adam_eps,
    )
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=int(options.warmup_ratio * total_steps),
        total_steps=total_steps,
        schedule=options.lr_schedule,
        min_lr_ratio=options.min_lr_ratio,
    )
    return optimizer, scheduler


def global_mean_scale(global_count: float, grad_accum: int, num_processes: int) -> float:
    """The factor that turns a micro-batch's loss *sum* into its share of the mean over the global batch.

    The loss of an optimiser step is the sum of per-item (token, pair, ...) losses over every micro-batch of every
    process, divided by ``global_count``, the items in that whole global batch. accelerate divides each micro-batch's
    loss by ``grad_accum`` and DDP averages gradients over ``num_processes``; multiplying a micro-batch's summed loss
    by ``grad_accum * num_processes / global_count`` undoes both, so the gradient is exactly that of the global mean
    however the batch is split (at least 1 item is assumed, so an empty batch gives a zero loss, not a division by 0).
    """
    return grad_accum * num_processes / max(1.0, global_count)


def step_bar(options: TrainOptions, acc, *, total: int, initial: int, desc: str):
    """The run's progress bar (steps, rate, ETA), on the main process only and when ``options.progress``."""
    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=not (options.progress and acc.is_main_process),
        desc=desc,
    )


def write_run_config(out: Path, stage: str, config) -> None:
    """``OUT/config.yaml``: the stage's name and its whole config, as the run used it (atomic)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump({"stage": stage, **to_dict(config)}, sort_keys=False))


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def shard_indices(order: Sequence[int], round_index: int, batch_size: int, num_processes: int, rank: int) -> list[int]:
    """Indices of micro-batch ``round_index`` for process ``rank``.

    A *round* is ``batch_size x num_processes`` consecutive examples of the epoch
    order; process ``rank`` takes its contiguous slice. One process with batch
    ``2b`` therefore sees exactly what two processes with batch ``b`` see together.
    """
    start = (round_index * num_processes + rank) * batch_size
    return list(order[start : start + batch_size])


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint as ``trainer_state.json``."""

    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Non-padding tokens processed, all processes."""
    total_steps: int = 0
    steps_per_epoch: int = 0

    @property
    def epoch(self) -> float:
        return self.step / max(1, self.steps_per_epoch)


RESUME_FREE_KEYS = frozenset(
    {
        # How long to train, and where: a finished run can be extended with more steps.
        "max_steps",
        "num_epochs",
        "output_dir",
        "resume",
        # What is logged, kept or shown.
        "log_every",
        "save_every",
        "keep_checkpoints",
        "progress",
        "tensorboard",
        "log_samples",
        # Evaluation and frontier probes: measured beside training (the probe in a forked RNG), never trained on.
        "eval_every",
        "probe_points",
        "probe_prompts",
        "probe_max_prompts",
        "probe_max_new_tokens",
        "probe_temperature",
        "probe_cache",
        "gold",
        "gold_args",
        "proxy",
        # DPO: cached or recomputed, the reference log-probs are the same numbers.
        "ref_cache",
    }
)
"""The config keys that may differ between a run and its resumption. Every other key of a trainer's
config is in each checkpoint's fingerprint (:func:`config_fingerprint`), and a resume under another
value is refused unless ``resume=force``."""

TRAINER_STATE_FILE = "trainer_state.json"
"""A checkpoint's trainer state, config fingerprint and file sizes; written last, inside the temp directory."""
SCHEDULER_FILE = "scheduler.json"
"""The LR scheduler's ``state_dict`` as JSON. Registered with accelerate it would be pickled, and read
back with ``torch.load(weights_only=False)``, which runs any code a checkpoint carries."""


CHECKPOINT_TEMP = re.compile(r"\.tmp-step-\d{7,}")
"""Names of :meth:`Checkpointer.save`'s temp directories (``.tmp-step-NNNNNNN``)."""


def config_fingerprint(config) -> dict[str, Any]:
    """``to_dict(config)`` less :data:`RESUME_FREE_KEYS`, as JSON reads it back (lists, not tuples)."""
    return json.loads(json.dumps({k: v for k, v in to_dict(config).items() if k not in RESUME_FREE_KEYS}))


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs between two fingerprints."""
    unset = object()

    def shown(value: Any) -> str:
        return "(unset)" if value is unset else repr(value)

    changes = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key, unset), current.get(key, unset)
        if old != new:
            changes.append(f"{key}: {shown(old)} -> {shown(new)}")
    return changes


class Checkpointer:
    """Durable, resumable checkpoints under ``OUTPUT_DIR/checkpoints/step-NNNNNNN``.

    Each checkpoint holds accelerate's state (model weights as safetensors, the
    optimizer and per-process RNG states, which accelerate reads back with
    ``torch.load(weights_only=True)``), the LR scheduler's state as JSON
    (:data:`SCHEDULER_FILE`) and :data:`TRAINER_STATE_FILE`: the trainer's
    ``state``, the config's fingerprint and every file's size. It is written to a
    hidden temp directory; every file in it and the directory are fsynced, it is
    renamed into place, and the parent directory is fsynced. A crash or a power
    loss mid-save leaves the previous checkpoints intact and no partial one.

    :meth:`resume` refuses a checkpoint written under another config unless told
    ``force``, and falls back to an older checkpoint when the newest cannot be
    loaded (a file cut short or damaged: a disk that dropped writes, a partial
    copy, a checkpoint from before they were fsynced), printing which one
    failed and why.

    ``scheduler`` is the trainer's ``LambdaLR`` (:func:`rlhfkit.training.optim.build_scheduler`),
    not registered with accelerate; ``config`` the trainer's config dataclass.
    """

    def __init__(self, accelerator, output_dir: str | Path, *, keep: int, scheduler, config):
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.scheduler = scheduler
        self.config = config

    def all(self) -> list[Path]:
        return checkpoint_dirs(self.root)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step``. A write that fails (a full disk) removes the temp directory and raises
        :class:`CheckpointError` naming the checkpoint, the free space, the error and the previous checkpoint,
        which is intact. Temp directories that earlier, killed saves left (``.tmp-step-*``) are removed first."""
        acc = self.accelerator
        main = acc.is_main_process
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        try:
            if main:
                self.root.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(self.root, CHECKPOINT_TEMP)  # tmp among them, if a killed save left it
                tmp.mkdir()
            acc.wait_for_everyone()  # tmp exists before any process writes into it
            acc.save_state(str(tmp))
            # Every process has written its files: accelerate's save_state ends without a barrier, each process
            # writing its RNG states last (random_states_<rank>.pkl, save_accelerator_state in
            # accelerate/checkpointing.py), and the rename below must not move tmp from under a process still writing.
            acc.wait_for_everyone()
            if main:
                (tmp / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.state_dict()))
                files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                record = {**state, "config": config_fingerprint(self.config), "files": files}
                (tmp / TRAINER_STATE_FILE).write_text(json.dumps(record, indent=2))
                fsync_tree(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_path(self.root)
        except Exception as e:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            if not is_write_failure(e):
                raise
            raise CheckpointError(self._save_failed(final, e)) from e
        if main:
            for old in self.all()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _save_failed(self, final: Path, error: BaseException) -> str:
        previous = [p for p in self.all() if p != final]
        intact = (
            f"the previous checkpoint, {previous[-1]}, is intact (a rerun resumes from it)"
            if previous
            else "there is no earlier checkpoint (a rerun starts over)"
        )
        return (
            f"cannot write checkpoint {final}: {describe_write_failure(error)}; {free_space(self.root)}; "
            f"the partial checkpoint was removed and {intact}"
        )

    def resume(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        """Load the checkpoint ``resume`` asks for (:attr:`TrainOptions.resume`): ``(its path, its trainer state)``,
        or None when there is none to resume from. ``auto`` and ``force`` try the newest first, then older ones."""
        if resume == "never":
            return None
        candidates = self.all()[::-1] if resume in ("auto", "force") else [Path(resume)]
        main = self.accelerator.is_main_process
        failures = []
        for i, path in enumerate(candidates):
            try:
                saved = self._read(path)
                self._check_config(path, saved["config"], force=resume == "force")
                self._load(path)
            except CheckpointError as e:
                failures.append(f"{path}: {e}")
                if main:
                    fallback = "; trying the one before it" if i + 1 < len(candidates) else ""
                    log.warning(f"checkpoint {path} cannot be loaded: {e}{fallback}")
                continue
            return path, saved
        if failures:
            raise CheckpointError(
                "no checkpoint could be loaded (" + "; ".join(failures) + "); set resume=never to start over "
                "(overwriting them), or use another output_dir"
            )
        return None

    def _read(self, path: Path) -> dict[str, Any]:
        """The trainer state of checkpoint ``path``, after checking that every file it lists has its written size."""
        try:
            saved = json.loads((path / TRAINER_STATE_FILE).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"not a checkpoint (no {TRAINER_STATE_FILE})") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{TRAINER_STATE_FILE} is unreadable ({e})") from e
        if "files" not in saved or "config" not in saved:
            raise CheckpointError(f"{TRAINER_STATE_FILE} has no file sizes or config (written by an older rlhfkit)")
        for name, size in saved["files"].items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{name} is missing")
            if file.stat().st_size != size:
                raise CheckpointError(f"{name} is {file.stat().st_size} bytes, {size} were written")
        return saved

    def _check_config(self, path: Path, saved: dict[str, Any], *, force: bool) -> None:
        changes = config_changes(saved, config_fingerprint(self.config))
        if not changes:
            return
        listing = ", ".join(changes)
        if not force:
            raise ConfigError(
                f"cannot resume from {path}: the config changed since it was written ({listing}); set resume=force "
                "to continue from it with the new values, resume=never to start over, or use another output_dir"
            )
        if self.accelerator.is_main_process:
            log.warning(f"resume=force: continuing from {path} under a changed config: {listing}")

    def _load(self, path: Path) -> None:
        """Weights, optimizer and RNG states through accelerate, the scheduler from JSON (nothing unpickled but by
        ``torch.load(weights_only=True)``). What is restored is where training is: weights, moments, step, RNG.
        The hyperparameters stay this run's: accelerate puts the saved lr, betas, eps and weight decay back into
        the param groups and LambdaLR its saved ``base_lrs``, which differ from the config's only under
        ``resume=force``, so both are set back, and the lr follows this run's schedule from the restored step."""
        scheduler = self.scheduler
        settings = [{k: v for k, v in group.items() if k != "params"} for group in scheduler.optimizer.param_groups]
        base_lrs = list(scheduler.base_lrs)
        try:
            self.accelerator.load_state(str(path))
            scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
            raise CheckpointError(f"{type(e).__name__}: {e}") from e
        scheduler.base_lrs = base_lrs
        # optimizer.load_state_dict made new param-group dicts: read them now.
        groups = scheduler.optimizer.param_groups
        for group, setting, lr_lambda, base_lr in zip(groups, settings, scheduler.lr_lambdas, base_lrs):
            group.update(setting)
            group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)


@dataclass
class FitResult:
    model: Any
    """The trained model, unwrapped from any distributed wrapper."""
    state: TrainState
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def reduce_sum(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over processes (one all-reduce)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    tensor = accelerator.reduce(tensor, reduction="sum")
    return dict(zip(keys, tensor.tolist()))


def _to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fit(
    options: TrainOptions,
    *,
    model,
    task: Task,
    train_set: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    eval_set: Sequence[Any] | None = None,
    precision: str = "bf16",
    save_model: Callable[[Any, Path, dict | None], None] | None = None,
    run_info: dict[str, Any] | None = None,
    on_step: Callable[[Any, int, int], Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_set`` with ``task``'s loss; see the module docstring.

    ``save_model(unwrapped_model, output_dir, state_dict)`` writes the final model
    on the main process; ``state_dict`` is the gathered full state under FSDP or
    DeepSpeed (None otherwise: use the model's own).
    ``run_info`` is stored in each checkpoint, for the record.
    ``on_step(unwrapped_model, step, total_steps)`` runs on the main process before the first step and after every
    step (the others wait): DPO's frontier probe (:mod:`rlhfkit.probe`).
    """
    acc = start_accelerator(precision, options.grad_accum, options.seed)
    out = Path(options.output_dir)
    P, rank, B = acc.num_processes, acc.process_index, options.batch_size
    round_size = B * P
    steps_per_epoch = len(train_set) // (round_size * options.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training examples are fewer than one global batch "
            f"(batch_size {B} x grad_accum {options.grad_accum} x processes {P})"
        )
    total_steps = options.max_steps if options.max_steps > 0 else max(1, math.ceil(options.num_epochs * steps_per_epoch))
    optimizer, scheduler = build_optimization(model, options, total_steps)
    model, optimizer = prepare(acc, model, optimizer, micro_batch_size=B, max_grad_norm=options.max_grad_norm)

    state = TrainState(total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    checkpointer = Checkpointer(acc, out, keep=options.keep_checkpoints, scheduler=scheduler, config=options)
    resumed = checkpointer.resume(options.resume)
    if resumed is not None:
        resume_from, saved = resumed
        state.step, state.tokens_seen = saved["step"], saved["tokens_seen"]
        if saved.get("steps_per_epoch") != steps_per_epoch:
            raise ValueError(
                f"cannot resume from {resume_from}: it was written with {saved.get('steps_per_epoch')} steps per "
                f"epoch, this run has {steps_per_epoch} (data, batch size or processes changed)"
            )
    logger = MetricsLogger(out, enabled=acc.is_main_process, tensorboard=options.tensorboard)
    # The final evaluation is logged after the last step's checkpoint. A run resumed from that checkpoint (a kill
    # during the final save) evaluates and logs it again, so the record the killed run wrote goes. An evaluation
    # at a step short of the end is logged before that step's checkpoint, and a resumed run does not redo it.
    final_eval_again = resumed is not None and state.step >= total_steps
    logger.truncate_after(state.step, drop_at_step=is_eval_record if final_eval_again else None)
    if resumed is not None and acc.is_main_process:
        log.info(f"resumed from {resumed[0]} at step {state.step}")

    def run_eval() -> dict[str, float]:
        if not eval_set:
            return {}
        model.eval()
        sums = {"loss": 0.0, "items": 0.0}
        rounds = math.ceil(len(eval_set) / round_size)
        with torch.no_grad():
            for r in range(rounds):
                idx = shard_indices(range(len(eval_set)), r, B, P, rank)
                # Every process runs the same number of forwards (FSDP needs that);
                # one with no examples left runs a dummy batch and counts nothing.
                weight = 1.0 if idx else 0.0
                batch = _to_device(collate([eval_set[i] for i in (idx or [0])]), acc.device)
                with acc.autocast():
                    loss_sum, stats = task.loss(model, batch)
                sums["loss"] += weight * loss_sum.item()
                sums["items"] += weight * task.num_items(batch)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + weight * float(v)
        sums = reduce_sum(acc, sums)
        items = max(1.0, sums.pop("items"))
        model.train()
        return {EVAL_PREFIX + k: v / items for k, v in sums.items()}

    bar = step_bar(options, acc, total=total_steps, initial=state.step, desc=out.name)

    def after_step() -> None:
        if on_step is not None:
            with whole_parameters(acc, model) as unwrapped:  # every process gathers; the main one probes
                if acc.is_main_process:
                    on_step(unwrapped, state.step, total_steps)
            acc.wait_for_everyone()
            model.train()

    after_step()
    model.train()
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    window_start, window_tokens = time.perf_counter(), 0.0
    while state.step < total_steps:
        epoch, step_in_epoch = divmod(state.step, steps_per_epoch)
        order = epoch_order(len(train_set), options.seed, epoch)
        batches = [
            collate([train_set[i] for i in shard_indices(order, step_in_epoch * options.grad_accum + k, B, P, rank)])
            for k in range(options.grad_accum)
        ]
        local = {
            "items": float(sum(task.num_items(b) for b in batches)),
            "tokens": float(sum(task.num_tokens(b) for b in batches)),
        }
        global_counts = reduce_sum(acc, local)
        global_items = max(1.0, global_counts["items"])
        scale = global_mean_scale(global_items, options.grad_accum, P)  # the gradient of the global batch's mean
        sums: dict[str, float] = {"loss": 0.0}
        grad_norm = None
        for batch in batches:
            batch = _to_device(batch, acc.device)
            with acc.accumulate(model):
                with acc.autocast():
                    loss_sum, stats = task.loss(model, batch)
                acc.backward(loss_sum * scale)
                if acc.sync_gradients and options.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums["loss"] += loss_sum.detach().item()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        scheduler.step()
        state.step += 1
        state.tokens_seen += int(global_counts["tokens"])
        window_tokens += global_counts["tokens"]
        after_step()
        bar.update(1)

        if state.step % options.log_every == 0 or state.step == total_steps:
            sums = reduce_sum(acc, sums)
            elapsed = time.perf_counter() - window_start
            last = {k: v / global_items for k, v in sums.items()}
            last.update(
                lr=scheduler.get_last_lr()[0],
                epoch=round(state.epoch, 4),
                tokens_per_s=window_tokens / max(elapsed, 1e-9),
                tokens_seen=state.tokens_seen,
            )
            if grad_norm is not None:
                last["grad_norm"] = float(grad_norm)
            logger.log(state.step, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            window_start, window_tokens = time.perf_counter(), 0.0

        eval_every = getattr(options, "eval_every", 0)  # EvalOptions
        if eval_every > 0 and state.step % eval_every == 0 and state.step < total_steps:
            eval_metrics = run_eval()
            if eval_metrics:
                logger.log(state.step, eval_metrics)
        if options.save_every > 0 and state.step % options.save_every == 0:
            checkpointer.save(state.step, {**asdict(state), "run_info": run_info or {}})
    bar.close()

    eval_metrics = run_eval()
    if eval_metrics:
        logger.log(state.step, eval_metrics)
        if acc.is_main_process:
            log.info("eval: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    logger.close()
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    if save_model is not None:
        state_dict = acc.get_state_dict(model) if is_sharded(acc) else None  # collective: all processes
        # Whole parameters while the main process saves: a save may run forwards (the reward model's normalisation),
        # which on FSDP shards would be collectives the other processes never join.
        with whole_parameters(acc, model) as whole:
            if acc.is_main_process:
                save_model(whole, out, state_dict)
    acc.wait_for_everyone()
    return FitResult(model=unwrapped, state=state, last_metrics=last, eval_metrics=eval_metrics)
