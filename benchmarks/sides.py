"""Inside a benchmark worker: the settings both libraries get, and how each one's steps are timed.

Split from :mod:`common` (the driver side: model and data, subprocesses,
reporting), which re-exports these names so scripts call ``common.X`` for both.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

SEED = 0


def value_str(x: Any) -> str:
    """Enums (TRL's SchedulerType, OptimizerNames) as their plain value."""
    return str(getattr(x, "value", x))


def dtype_name(dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- settings shared by both libraries


def no_checkpointing_kwargs(config_cls) -> dict[str, bool]:
    """Turn activation (gradient) checkpointing off in a TRL config.

    TRL configs default ``gradient_checkpointing=True``; transformers 5.x renamed it
    ``activation_checkpointing`` (the old name is an alias). Set whichever exist.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {k: False for k in ("activation_checkpointing", "gradient_checkpointing") if k in names}


def _shared_train_settings(
    s: dict, *, out_dir: str, batch_size: int, grad_accum: int, lr: float, schedule: str
) -> list[tuple[str, str, Any]]:
    """The training settings both libraries get: ``(rlhfkit TrainOptions field, TRL TrainingArguments field, value)``.

    AdamW, no weight decay, grad-norm clip 1.0; the warm-up (none) is set per
    library, as their fields differ in kind (a ratio and a step count).
    """
    return [
        ("output_dir", "output_dir", out_dir),
        ("seed", "seed", SEED),
        ("max_steps", "max_steps", s["steps"]),
        ("batch_size", "per_device_train_batch_size", batch_size),
        ("grad_accum", "gradient_accumulation_steps", grad_accum),
        ("lr", "learning_rate", lr),
        ("lr_schedule", "lr_scheduler_type", schedule),
        ("weight_decay", "weight_decay", 0.0),
        ("adam_beta1", "adam_beta1", 0.9),
        ("adam_beta2", "adam_beta2", 0.999),
        ("adam_eps", "adam_epsilon", 1e-8),
        ("max_grad_norm", "max_grad_norm", 1.0),
    ]


def trl_train_kwargs(
    config_cls, s: dict, *, out_dir: str, batch_size: int, grad_accum: int = 1, lr: float, schedule: str
) -> dict[str, Any]:
    """TrainingArguments fields every TRL side sets the same way (matching rlhfkit's settings)."""
    import torch

    kwargs = {
        theirs: value
        for _, theirs, value in _shared_train_settings(
            s, out_dir=out_dir, batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule
        )
    }
    kwargs.update(
        no_checkpointing_kwargs(config_cls),
        bf16=True,  # bf16 autocast, fp32 master weights (the model is loaded in fp32)
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        warmup_steps=0,
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(config_cls)}:
        kwargs["train_sampling_strategy"] = "sequential"  # datasets are laid out in rlhfkit's order
    return kwargs


def rlhfkit_train_kwargs(
    s: dict, *, out_dir: str, batch_size: int, grad_accum: int = 1, lr: float, schedule: str, config_cls=None
) -> dict[str, Any]:
    """rlhfkit TrainOptions fields every rlhfkit side sets the same way (matching TRL's).

    ``eval_every=0`` (no periodic eval) is left out for a ``config_cls`` without
    held-out evaluation (the online-RL configs have no ``eval_every``).
    """
    kwargs = {
        ours: value
        for ours, _, value in _shared_train_settings(
            s, out_dir=out_dir, batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule
        )
    }
    kwargs.update(
        warmup_ratio=0.0,
        eval_every=0,
        log_every=1,
        save_every=0,
        resume="never",
        progress=False,
        tensorboard=False,  # the TRL side reports to nothing either
        gradient_checkpointing=False,
    )
    if config_cls is not None and "eval_every" not in {f.name for f in dataclasses.fields(config_cls)}:
        del kwargs["eval_every"]
    return kwargs


def trl_training_settings(config, model) -> dict[str, Any]:
    """Optimizer, precision and dropout rows of a TRL side's ``settings``, read back from its config.

    The same rows, in the same order, as :func:`rlhfkit_training_settings`.
    """
    return {
        "learning rate": config.learning_rate,
        "lr schedule": value_str(config.lr_scheduler_type),
        "warmup steps": config.warmup_steps,
        "weight decay": config.weight_decay,
        "grad clip": config.max_grad_norm,
        "adam betas / eps": f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_epsilon}",
        "autocast": "bf16" if config.bf16 else ("fp16" if config.fp16 else "none"),
        "master weights": dtype_name(model.dtype),
        "grad checkpointing": bool(getattr(config, "activation_checkpointing", config.gradient_checkpointing)),
        "dropout": 0.0 if config.disable_dropout else getattr(model.config, "attention_dropout", "?"),
    }


def rlhfkit_training_settings(config, model) -> dict[str, Any]:
    """Optimizer, precision and dropout rows of an rlhfkit side's ``settings`` (see :func:`trl_training_settings`)."""
    return {
        "learning rate": config.lr,
        "lr schedule": config.lr_schedule,
        "warmup steps": int(config.warmup_ratio * config.max_steps),
        "weight decay": config.weight_decay,
        "grad clip": config.max_grad_norm,
        "adam betas / eps": f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_eps}",
        "autocast": config.precision if config.precision != "fp32" else "none",
        "master weights": dtype_name(model.dtype),
        "grad checkpointing": bool(config.gradient_checkpointing),
        "dropout": getattr(model.config, "attention_dropout", "?"),  # rlhfkit leaves the model's dropout as is
    }


def trl_optimizer_name(trainer) -> str:
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    return f"{type(inner).__name__} ({value_str(trainer.args.optim)})"


def check_no_checkpointing(trainer) -> None:
    # transformers 5.x renamed is_gradient_checkpointing (now a deprecated alias) to is_activation_checkpointing.
    model = trainer.model
    if getattr(model, "is_activation_checkpointing", None) or (
        not hasattr(model, "is_activation_checkpointing") and getattr(model, "is_gradient_checkpointing", False)
    ):
        raise SystemExit("TRL enabled gradient checkpointing although it was set off")


# ---------------------------------------------------------------- timing helpers (workers)


def trl_step_timer(on_step: Callable[[], Any] | None = None):
    """A TrainerCallback recording ``perf_counter`` / ``process_time`` at every ``on_step_end``.

    Returns ``(callback, times, cpu_times, extras)``; ``extras`` collects ``on_step()``'s value per step.
    """
    from transformers import TrainerCallback

    times: list[float] = []
    cpu_times: list[float] = []
    extras: list[Any] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            times.append(time.perf_counter())
            cpu_times.append(time.process_time())
            if on_step is not None:
                extras.append(on_step())

    return StepTimer(), times, cpu_times, extras


def trl_token_trainer(trainer_cls, n_rows: int, dropped: str, **kwargs):
    """``trainer_cls(**kwargs)`` with a :func:`trl_step_timer` that also reads the trainer's running token count.

    Stops if TRL turned gradient checkpointing on, or kept fewer than ``n_rows``
    rows of the data set (``dropped`` ends that message). Returns
    ``(trainer, times, cpu_times, tokens_cum)``, the lists filled as it trains.
    """
    holder = {}
    callback, times, cpu_times, tokens_cum = trl_step_timer(lambda: int(holder["trainer"]._total_train_tokens))
    trainer = holder["trainer"] = trainer_cls(**kwargs, callbacks=[callback])
    check_no_checkpointing(trainer)
    if len(trainer.train_dataset) != n_rows:
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {n_rows} {dropped}")
    return trainer, times, cpu_times, tokens_cum


def stamp_rlhfkit_steps(key: str) -> dict[int, tuple[float, float]]:
    """Note ``(perf_counter, process_time)`` whenever rlhfkit logs a step whose metrics contain ``key``.

    Wraps ``MetricsLogger.log`` (the moment the loop writes the step to
    metrics.jsonl); the wrapped method is called unchanged.
    """
    from rlhfkit.training.tracking import MetricsLogger

    stamps: dict[int, tuple[float, float]] = {}
    original = MetricsLogger.log

    def log(self, step, metrics):
        if key in metrics:
            stamps[step] = (time.perf_counter(), time.process_time())
        return original(self, step, metrics)

    MetricsLogger.log = log
    return stamps


def rlhfkit_steps(s: dict, stamps: dict[int, tuple[float, float]], key: str) -> tuple[list[dict], list[float], list[float]]:
    """``(metrics, times, cpu_times)`` of the steps rlhfkit logged with ``key``, after training.

    ``metrics`` are those rows of ``s["out_dir"]/metrics.jsonl``; the times are
    the :func:`stamp_rlhfkit_steps` stamps of each. Stops unless there are
    exactly ``s["steps"]`` of them, every one stamped.
    """
    from rlhfkit.training.tracking import read_metrics

    metrics = [m for m in read_metrics(s["out_dir"]) if key in m]
    if len(metrics) != s["steps"] or sorted(stamps) != [m["step"] for m in metrics]:
        raise SystemExit(f"rlhfkit logged {len(metrics)} steps, expected {s['steps']}")
    return metrics, [stamps[m["step"]][0] for m in metrics], [stamps[m["step"]][1] for m in metrics]


def timed(owner, name: str, records: list[float]) -> None:
    """Replace ``owner.name`` (a function or method) by a wrapper appending each call's wall time to ``records``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            records.append(time.perf_counter() - t0)

    wrapper.__wrapped__ = original
    setattr(owner, name, wrapper)


def window(cumulative: list[float], warmup: int) -> float:
    """Growth of a running reading taken every step (a clock, a token count) over the measured window.

    The window runs from the end of step ``warmup`` to the end of the last step.
    """
    return cumulative[-1] - cumulative[warmup - 1]


def step_durations(times: list[float]) -> list[float]:
    """Duration of steps 2..N (step 1 has no start stamp)."""
    return [b - a for a, b in zip(times, times[1:])]


def measured(
    warmup: int,
    times: list[float],
    cpu_times: list[float],
    tokens_cum: list[int] | None = None,
    expected: list[int] | None = None,
) -> dict[str, Any]:
    """Result fields of the measured window, from readings taken at the end of every step.

    ``seconds`` / ``cpu_seconds``: wall / CPU time of the window (:func:`window`);
    ``step_times``: :func:`step_durations`. With ``tokens_cum`` (the library's
    running count of non-padding tokens) also ``tokens`` (trained in the window),
    ``tokens_check`` (the same from the tokenized data, ``expected`` tokens per
    step) and ``step_tokens`` (per step, as the library counted them).
    """
    out = {"seconds": window(times, warmup), "cpu_seconds": window(cpu_times, warmup), "step_times": step_durations(times)}
    if tokens_cum is not None:
        out["tokens"] = window(tokens_cum, warmup)
        out["tokens_check"] = sum(expected[warmup:])
        out["step_tokens"] = [b - a for a, b in zip([0, *tokens_cum], tokens_cum)]
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss; KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# ---------------------------------------------------------------- equal work and model FLOPs (workers)


TRL_ATTENTIONS = ("eager", "sdpa")
"""The attention kernels every TRL side is run with; the faster one is used for the ratio."""


def trl_attention(side: str) -> str:
    """The attention kernel a TRL side name asks for: ``"trl-precompute-sdpa"`` -> ``"sdpa"``."""
    attn = side.rsplit("-", 1)[-1]
    if attn not in TRL_ATTENTIONS:
        raise ValueError(f"side {side!r} names no attention kernel ({', '.join(TRL_ATTENTIONS)})")
    return attn


def attention_of(model) -> str:
    """The attention kernel a loaded model actually runs (its config's ``_attn_implementation``)."""
    return str(getattr(model.config, "_attn_implementation", "?"))


def matmul_params(model) -> int:
    """N in the ``6 N`` FLOPs-per-trained-token rule: the parameters a token's forward multiplies by.

    Every distinct parameter, counted once, less the input embedding unless it is
    tied to the output layer (an embedding lookup does no multiply; a tied LM head
    does one, V x H per token). SmolLM2-135M (tied): all 134.5M; its reward model
    (score head, no LM head): the trunk less the embedding, plus the head.
    Attention's sequence-length-squared terms are not counted (<2% at these lengths).
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and (out is None or out.weight is not emb.weight):
        total -= emb.weight.numel()
    return int(total)


def trl_losses(trainer) -> list[float]:
    """The training loss TRL logged at each step (``logging_steps=1``), in step order."""
    return [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------- generation


def instrument_generate(records: list[dict], force_length: bool = False) -> None:
    """Wrap ``GenerationMixin.generate``: per call, wall time, batch, decode steps, tokens, and the autocast in force.

    ``prompt_tokens`` counts the input's attention mask; ``generated_tokens`` each
    row's new tokens up to and including its first EOS (the EOS ids of the call:
    ``eos_token_id`` or the generation config's). With ``force_length`` the call
    gets ``min_new_tokens = max_new_tokens`` (transformers then masks EOS until
    then), for a library that has no option of its own for it. The autocast is
    read by a forward pre-hook on the first decoder layer, i.e. inside the model's
    forward, where an accelerate-patched forward (TRL) or an outer
    ``torch.autocast`` (rlhfkit) would be active.
    """
    import torch
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        config = kwargs.get("generation_config") or self.generation_config
        if force_length:
            kwargs["min_new_tokens"] = kwargs.get("max_new_tokens") or config.max_new_tokens
        device = self.device.type
        seen: dict = {}

        def hook(module, hook_args, hook_kwargs):
            if "autocast" not in seen:
                seen["autocast"] = (
                    str(torch.get_autocast_dtype(device)).replace("torch.", "") if torch.is_autocast_enabled(device) else "none"
                )
                handle.remove()  # one look is enough; no hook on the remaining decode steps

        layer = self.get_decoder().layers[0]
        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        t0 = time.perf_counter()
        try:
            out = original(self, *args, **kwargs)
        finally:
            handle.remove()
        seconds = time.perf_counter() - t0
        sequences = out if torch.is_tensor(out) else out.sequences
        width = input_ids.shape[1] if input_ids is not None else 0
        new = sequences[:, width:]
        eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if eos and new.shape[1]:
            is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
            lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
        else:
            lengths = torch.full((new.shape[0],), new.shape[1])
        records.append(
            {
                "seconds": seconds,
                "batch": int(sequences.shape[0]),
                "decode_steps": int(new.shape[1]),
                "prompt_tokens": int(mask.sum()) if mask is not None else int(sequences.shape[0] * width),
                "generated_tokens": int(lengths.sum()),
                "min_new_tokens": kwargs.get("min_new_tokens", getattr(config, "min_new_tokens", None)),
                "autocast": seen.get("autocast", "?"),
                "weights": dtype_name(next(self.parameters()).dtype),
            }
        )
        return out

    GenerationMixin.generate = generate
