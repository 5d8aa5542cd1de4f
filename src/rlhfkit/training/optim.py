"""Optimizer and learning-rate schedule shared by every trainer."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float):
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel is the fastest AdamW on CPU and CUDA (several times faster per step than foreach on CPU;
    # see benchmarks/README.md, "Design measurements"); devices without it fall back to foreach.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


@torch.no_grad()
def prime_state(optimizer: torch.optim.Optimizer) -> None:
    """Create and write the optimizer's state now instead of in its first step; the state is then exactly a fresh one.

    Runs one step with zero gradients at learning rate 0 (AdamW: the moments stay
    0, weight decay multiplies by 1 and the update adds 0, so no weight changes),
    then sets the step counts back to 0. Why: on CPU the state (two fp32 copies of
    the weights for AdamW) is otherwise allocated in the first update, in memory
    the freed activations of that update leave behind, so the next forward grows
    the heap and pays its page faults (they made the second step's policy forward
    about 1.5x slower; see benchmarks/README.md, "Design measurements"). Primed, the
    memory is taken before training starts, and a run that cannot hold it fails
    there. Gradients are put back to ``None``.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p in params:
            p.grad = None
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].zero_() if torch.is_tensor(state["step"]) else 0


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    Linear warmup from 0 over ``warmup_steps``, then ``cosine`` (to
    ``min_lr_ratio``), ``linear`` (to ``min_lr_ratio``) or ``constant``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    raise ValueError(f"unknown lr schedule '{schedule}'")


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(
            step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule, min_lr_ratio=min_lr_ratio
        ),
    )
