"""Learning-rate schedule and optimizer groups, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.training.optim import build_optimizer, build_scheduler, lr_lambda, prime_state

# warmup 4 of 20 steps: warmup multipliers (step + 1) / 4; then cosine over the
# remaining 16 steps, progress = (step - 4) / 16, from 1 down to min_lr_ratio.
# cos(pi/4) = 0.70710678, cos(3 pi/4) = -0.70710678.
COSINE_MIN_0_1 = {
    0: 0.25,
    1: 0.5,
    2: 0.75,
    3: 1.0,
    4: 1.0,  # progress 0
    8: 0.1 + 0.9 * 0.5 * (1 + 0.70710678),  # progress 1/4 -> 0.86819805
    12: 0.55,  # progress 1/2 -> 0.1 + 0.9 * 0.5
    16: 0.1 + 0.9 * 0.5 * (1 - 0.70710678),  # progress 3/4 -> 0.23180195
    20: 0.1,  # progress 1
    25: 0.1,  # past the end: stays at the floor
}


@pytest.mark.parametrize("step, expected", sorted(COSINE_MIN_0_1.items()))
def test_warmup_then_cosine(step, expected):
    got = lr_lambda(step, warmup_steps=4, total_steps=20, schedule="cosine", min_lr_ratio=0.1)
    assert got == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (5, 0.5), (10, 0.0)])
def test_cosine_without_warmup(step, expected):
    assert lr_lambda(step, warmup_steps=0, total_steps=10, schedule="cosine", min_lr_ratio=0.0) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("step, expected", [(0, 0.5), (1, 1.0), (2, 1.0), (6, 0.6), (10, 0.2)])
def test_warmup_then_linear(step, expected):
    # warmup 2, then linear over 8 steps from 1 to 0.2: 1 - 0.8 * (step - 2) / 8
    got = lr_lambda(step, warmup_steps=2, total_steps=10, schedule="linear", min_lr_ratio=0.2)
    assert got == pytest.approx(expected, abs=1e-12)


def test_constant_after_warmup():
    values = [lr_lambda(s, warmup_steps=2, total_steps=6, schedule="constant", min_lr_ratio=0.0) for s in range(6)]
    assert values == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_lambda(5, warmup_steps=0, total_steps=10, schedule="step", min_lr_ratio=0.0)


def test_scheduler_applies_lambda_to_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([param], lr=0.2)
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=20, schedule="cosine", min_lr_ratio=0.1)
    seen = []
    for _ in range(13):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step in (0, 1, 2, 3, 4, 8, 12):
        assert seen[step] == pytest.approx(0.2 * COSINE_MIN_0_1[step], abs=1e-9)
    assert math.isclose(seen[12], 0.11)


def test_no_weight_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


def _train_steps(prime: bool, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10, schedule="cosine", min_lr_ratio=0.0)
    weights_before = [p.detach().clone() for p in model.parameters()]
    if prime:
        prime_state(optimizer)
        # Priming moves no weight and leaves no gradient, but the state exists, with step counts at 0.
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights_before))
        assert all(p.grad is None for p in model.parameters())
        assert len(optimizer.state) == 6  # 2 linears (weight, bias) + the norm (weight, bias)
        for state in optimizer.state.values():
            assert float(state["step"]) == 0.0
            assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)  # the scheduler's lr is back
    x = torch.randn(6, 5)
    for _ in range(steps):
        model(x).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def test_primed_optimizer_trains_exactly_like_a_fresh_one():
    fresh, fresh_opt = _train_steps(prime=False)
    primed, primed_opt = _train_steps(prime=True)
    for a, b in zip(fresh.parameters(), primed.parameters()):
        assert torch.equal(a, b)
    for p_fresh, p_primed in zip(fresh.parameters(), primed.parameters()):
        s_fresh, s_primed = fresh_opt.state[p_fresh], primed_opt.state[p_primed]
        assert float(s_fresh["step"]) == float(s_primed["step"]) == 3.0
        assert torch.equal(s_fresh["exp_avg"], s_primed["exp_avg"])
        assert torch.equal(s_fresh["exp_avg_sq"], s_primed["exp_avg_sq"])


def test_global_mean_scale_by_hand():
    from rlhfkit.training.loop import global_mean_scale

    assert global_mean_scale(10, 1, 1) == pytest.approx(0.1)
    assert global_mean_scale(10, 2, 1) == pytest.approx(0.2)
    assert global_mean_scale(12, 2, 3) == pytest.approx(0.5)
    assert global_mean_scale(0, 4, 2) == pytest.approx(8.0)  # an empty global batch divides by 1, not 0


def test_global_mean_scale_gives_the_gradient_of_the_global_batch_mean():
    """2 processes x 2 micro-batches of unequal sizes: accelerate divides each micro-batch's loss by grad_accum and
    DDP averages gradients over processes; with the scale, the result is the gradient of the mean over all items."""
    from rlhfkit.training.loop import global_mean_scale

    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    parts = [torch.randn(n, 3) for n in (1, 4, 2, 3)]  # process 0 takes parts 0 and 1, process 1 parts 2 and 3
    items = sum(p.shape[0] for p in parts)
    (want,) = torch.autograd.grad(torch.cat(parts).matmul(w).pow(2).mean(), w)
    per_process = []
    for micro_batches in (parts[:2], parts[2:]):
        grad = torch.zeros(3)
        for p in micro_batches:
            loss = p.matmul(w).pow(2).sum() * global_mean_scale(items, 2, 2)
            grad += torch.autograd.grad(loss / 2, w)[0]  # accelerate: loss / grad_accum
        per_process.append(grad)
    torch.testing.assert_close(sum(per_process) / 2, want)  # DDP: the mean over processes
