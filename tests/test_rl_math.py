"""The math of online RL, checked two ways: numbers worked out by hand, and a slow reference.

Each function in :mod:`rlhfkit.losses` used by the RL trainers is compared with

1. small inputs whose outputs were computed by hand and are written below as
   literals (the working is in the comments), and
2. an independent, obviously correct reference written here with plain Python
   loops over floats, on random inputs with random contiguous masks.

The references never call the function under test (the whitening bug that
torchtune's tests missed came from computing the expected value with the code
being tested). Rollout and policy helpers are checked the same way, plus one
check on the tiny model that left padding changes no log-prob.
"""

from __future__ import annotations

import contextlib
import math
import random

import pytest
import torch
import torch.nn.functional as F

from rlhfkit import losses, rl
from rlhfkit.generation.rollout import Rollout, response_mask_from_ids
from rlhfkit.losses import (
    approx_kl,
    discounted_returns,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)
from rlhfkit.modeling import logps as logps_mod
from rlhfkit.modeling import models
from rlhfkit.modeling.forward import position_ids_from_mask
from rlhfkit.modeling.logps import entropy_from_logits, gather_logps, gather_logps_and_entropy
from rlhfkit.modeling.policy import ActorCritic, load_critic, packed_response_logps, packed_rollout, response_logps
from rlhfkit.rl import AdaptiveKLController
from tests.helpers import ON_CUDA

T, F_ = True, False  # short names keep hand-written masks readable
LN2 = math.log(2.0)


def as_tensor(rows, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def random_contiguous_mask(rng: random.Random, batch: int, width: int) -> list[list[bool]]:
    """One contiguous run of True per row, random start and length (>= 1); row 0 has a single token."""
    rows = []
    for b in range(batch):
        length = 1 if b == 0 else rng.randint(1, width)
        start = rng.randint(0, width - length)
        rows.append([start <= t < start + length for t in range(width)])
    return rows


def random_floats(rng: random.Random, batch: int, width: int, scale: float = 1.0) -> list[list[float]]:
    return [[rng.gauss(0.0, scale) for _ in range(width)] for _ in range(batch)]


def assert_close(got: torch.Tensor, want, *, atol: float = 1e-9) -> None:
    want = torch.as_tensor(want, dtype=got.dtype)
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got, want, atol=atol, rtol=0.0)


# ----------------------------------------------------------------------------- slow references


def ref_gae(rewards, values, mask, gamma, lam):
    """Per row: walk the response backwards; the value after its last token is 0."""
    advantages, returns = [], []
    for r, v, m in zip(rewards, values, mask):
        adv = [0.0] * len(r)
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(len(r))):
            if not m[t]:
                continue
            delta = r[t] + gamma * next_value - v[t]
            adv[t] = delta + gamma * lam * next_adv
            next_value, next_adv = v[t], adv[t]
        advantages.append(adv)
        returns.append([adv[t] + v[t] if m[t] else 0.0 for t in range(len(r))])
    return advantages, returns


def ref_discounted_returns(rewards, mask, gamma):
    out = []
    for r, m in zip(rewards, mask):
        row = [0.0] * len(r)
        for t in range(len(r)):
            if m[t]:
                row[t] = sum(gamma ** (k - t) * r[k] for k in range(t, len(r)) if m[k])
        out.append(row)
    return out


def ref_mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and Bessel-corrected variance of a flat list."""
    n = len(values)
    mean = sum(values) / n
    var = sum((x - mean) ** 2 for x in values) / (n - 1) if n > 1 else 0.0
    return mean, var


def ref_whiten(x, mask, shift_mean, eps=1e-8):
    picked = [v for row, mrow in zip(x, mask) for v, m in zip(row, mrow) if m]
    mean, var = ref_mean_var(picked)
    out = []
    for row, mrow in zip(x, mask):
        new_row = []
        for v, m in zip(row, mrow):
            w = (v - mean) / math.sqrt(var + eps)
            if not shift_mean:
                w += mean
            new_row.append(w if m else 0.0)
        out.append(new_row)
    return out


# ----------------------------------------------------------------------------- GAE and returns


def test_gae_by_hand():
    # gamma = lam = 0.5, so gamma * lam = 0.25.
    # Row 0, three tokens, r = [0, 0, 1], V = [1, 2, 4]:
    #   t=2: delta = 1 + 0.5*0 - 4 = -3,            A = -3
    #   t=1: delta = 0 + 0.5*4 - 2 = 0,             A = 0 + 0.25*(-3) = -0.75
    #   t=0: delta = 0 + 0.5*2 - 1 = 0,             A = 0 + 0.25*(-0.75) = -0.1875
    # Row 1, a single token (r = 2, V = 1); the 9s and 7s are padding and must not leak:
    #   t=0: delta = 2 + 0 - 1 = 1,                 A = 1
    # Row 2, two tokens, r = [0, 2], V = [2, 0]:
    #   t=1: delta = 2 + 0 - 0 = 2,                 A = 2
    #   t=0: delta = 0 + 0.5*0 - 2 = -2,            A = -2 + 0.25*2 = -1.5
    rewards = as_tensor([[0, 0, 1], [2, 9, 9], [0, 2, 5]])
    values = as_tensor([[1, 2, 4], [1, 7, 7], [2, 0, 3]])
    mask = torch.tensor([[T, T, T], [T, F_, F_], [T, T, F_]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert_close(advantages, [[-0.1875, -0.75, -3.0], [1.0, 0.0, 0.0], [-1.5, 2.0, 0.0]])
    assert_close(returns, [[0.8125, 1.25, 1.0], [2.0, 0.0, 0.0], [0.5, 2.0, 0.0]])


def test_gae_lambda_one_is_reward_to_go_minus_value():
    # gamma = 1, lam = 1: A_t = sum_{k>=t} r_k - V_t; returns are the plain reward-to-go.
    rewards = as_tensor([[1, 2, 3]])
    values = as_tensor([[10, 20, 30]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert_close(advantages, [[6 - 10, 5 - 20, 3 - 30]])
    assert_close(returns, [[6.0, 5.0, 3.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_reference_on_random_inputs(gamma, lam):
    rng = random.Random(1234)
    B, W = 6, 9
    rewards, values = random_floats(rng, B, W), random_floats(rng, B, W)
    mask = random_contiguous_mask(rng, B, W)
    want_adv, want_ret = ref_gae(rewards, values, mask, gamma, lam)
    got_adv, got_ret = gae(as_tensor(rewards), as_tensor(values), torch.tensor(mask), gamma=gamma, lam=lam)
    assert_close(got_adv, want_adv)
    assert_close(got_ret, want_ret)


def test_discounted_returns_by_hand():
    # gamma = 0.5. Row 0: G2 = 4, G1 = 2 + 0.5*4 = 4, G0 = 1 + 0.5*4 = 3.
    # Row 1 ends after two tokens, so its 100 is padding: G1 = 2, G0 = 1 + 0.5*2 = 2.
    rewards = as_tensor([[1, 2, 4], [1, 2, 100]])
    mask = torch.tensor([[T, T, T], [T, T, F_]])
    assert_close(discounted_returns(rewards, mask, gamma=0.5), [[3.0, 4.0, 4.0], [2.0, 2.0, 0.0]])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_reference(gamma):
    rng = random.Random(99)
    rewards = random_floats(rng, 5, 8)
    mask = random_contiguous_mask(rng, 5, 8)
    got = discounted_returns(as_tensor(rewards), torch.tensor(mask), gamma=gamma)
    assert_close(got, ref_discounted_returns(rewards, mask, gamma))


# ----------------------------------------------------------------------------- masked statistics, whitening


def test_masked_mean_and_var_by_hand():
    x = as_tensor([[1, 2, 3, 100]])
    mask = torch.tensor([[T, T, T, F_]])
    # Entries 1, 2, 3: mean 2; squared deviations 1 + 0 + 1 = 2; unbiased var 2/2, biased 2/3.
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    # Per row; a row with no True entry has mean 0 (no division by zero).
    rows = as_tensor([[1, 2, 3], [4, 5, 6]])
    row_mask = torch.tensor([[T, T, F_], [F_, F_, F_]])
    assert_close(masked_mean(rows, row_mask, dim=1), [1.5, 0.0])
    # One entry: no unbiased variance, reported as 0.
    assert masked_var(x, torch.tensor([[T, F_, F_, F_]])).item() == 0.0


def test_masked_mean_and_var_match_reference():
    rng = random.Random(7)
    x = random_floats(rng, 4, 10, scale=3.0)
    mask = random_contiguous_mask(rng, 4, 10)
    picked = [v for row, mrow in zip(x, mask) for v, m in zip(row, mrow) if m]
    mean, var = ref_mean_var(picked)
    assert masked_mean(as_tensor(x), torch.tensor(mask)).item() == pytest.approx(mean, abs=1e-12)
    assert masked_var(as_tensor(x), torch.tensor(mask)).item() == pytest.approx(var, abs=1e-12)
    row_means = [sum(v for v, m in zip(row, mrow) if m) / sum(mrow) for row, mrow in zip(x, mask)]
    assert_close(masked_mean(as_tensor(x), torch.tensor(mask), dim=1), row_means)


def test_whiten_by_hand():
    # Masked entries 1, 2, 3: mean 2, Bessel variance 1, so whitening gives -1, 0, 1.
    x = as_tensor([[1, 2, 3, 100]])
    mask = torch.tensor([[T, T, T, F_]])
    assert_close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-7)
    # shift_mean=False keeps the mean: (x - 2) / 1 + 2 = x; the unmasked entry is still 0.
    assert_close(whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-7)
    # 2, 4, 6, 8: mean 5, variance (9 + 1 + 1 + 9) / 3 = 20/3, so 1/std = sqrt(3/20).
    s = math.sqrt(3 / 20)
    y = as_tensor([[2, 4], [6, 8]])
    assert_close(whiten(y, torch.ones(2, 2, dtype=torch.bool)), [[-3 * s, -s], [s, 3 * s]], atol=1e-7)
    assert_close(
        whiten(y, torch.ones(2, 2, dtype=torch.bool), shift_mean=False), [[5 - 3 * s, 5 - s], [5 + s, 5 + 3 * s]], atol=1e-7
    )


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_reference(shift_mean):
    rng = random.Random(21 + shift_mean)
    x = random_floats(rng, 5, 7, scale=4.0)
    x = [[v + 3.0 for v in row] for row in x]  # a non-zero mean, so shift_mean matters
    mask = random_contiguous_mask(rng, 5, 7)
    got = whiten(as_tensor(x), torch.tensor(mask), shift_mean=shift_mean)
    assert_close(got, ref_whiten(x, mask, shift_mean))
    picked = got[torch.tensor(mask)]
    assert picked.var().item() == pytest.approx(1.0, abs=1e-6)  # unit (Bessel) variance
    assert picked.mean().item() == pytest.approx(
        0.0 if shift_mean else ref_mean_var([v for row, mrow in zip(x, mask) for v, m in zip(row, mrow) if m])[0], abs=1e-9
    )


# ----------------------------------------------------------------------------- KL estimators


def test_kl_penalty_by_hand():
    # Row 0: pi_theta = 1/2, pi_ref = 1/4, so r = 1/2:
    #   k1 = -log r = ln 2, k2 = (ln 2)^2 / 2, k3 = (1/2 - 1) + ln 2 = ln 2 - 1/2.
    # Row 1: pi_theta = 1/4, pi_ref = 1/2, so r = 2:
    #   k1 = -ln 2, k2 = (ln 2)^2 / 2, k3 = (2 - 1) - ln 2 = 1 - ln 2.
    # Row 2: equal probabilities: every estimator is 0.
    logps = torch.log(as_tensor([0.5, 0.25, 0.3]))
    ref_logps = torch.log(as_tensor([0.25, 0.5, 0.3]))
    assert_close(kl_penalty(logps, ref_logps, "k1"), [LN2, -LN2, 0.0], atol=1e-12)
    assert_close(kl_penalty(logps, ref_logps, "k2"), [LN2**2 / 2, LN2**2 / 2, 0.0], atol=1e-12)
    assert_close(kl_penalty(logps, ref_logps, "k3"), [LN2 - 0.5, 1 - LN2, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logps, ref_logps, "k4")


def test_kl_penalty_matches_reference_and_k3_is_nonnegative():
    rng = random.Random(5)
    logps = random_floats(rng, 4, 16, scale=2.0)
    ref_logps = random_floats(rng, 4, 16, scale=2.0)
    lp, rlp = as_tensor(logps), as_tensor(ref_logps)
    for estimator, formula in [
        ("k1", lambda a, b: a - b),
        ("k2", lambda a, b: 0.5 * (b - a) ** 2),
        ("k3", lambda a, b: (math.exp(b - a) - 1) - (b - a)),
    ]:
        want = [[formula(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(logps, ref_logps)]
        assert_close(kl_penalty(lp, rlp, estimator), want, atol=1e-9)
    k1 = kl_penalty(lp, rlp, "k1")
    assert (k1 < 0).any()  # k1 is only non-negative on average
    # With x = log r = -k1: k2 = x^2 / 2, and k3 = e^x - 1 - x = x^2/2 + x^3/6 + ... is zero only at
    # x = 0 and lies below k2 where x < 0 (the Taylor remainder e^t x^3 / 6 is negative) and above it where x > 0.
    k2, k3 = kl_penalty(lp, rlp, "k2"), kl_penalty(lp, rlp, "k3")
    assert_close(k2, 0.5 * k1**2, atol=1e-12)
    assert (k1 != 0).all() and (k3 > 0).all()
    assert torch.equal(k3 < k2, k1 > 0)
    assert torch.equal(kl_penalty(lp, lp, "k3"), torch.zeros_like(lp))
    # Large and tiny log-ratios: exact where exp(x) - 1 - x is not. At x = +-1e-9, k3 = x^2/2 +- x^3/6
    # = 5e-19 (to 1e-9 relative); exp(x) - 1 - x gives 2.8e-17 and 8.3e-17 there (cancellation).
    extreme = as_tensor([-30.0, -1e-9, 0.0, 1e-9, 30.0])
    k3 = kl_penalty(torch.zeros_like(extreme), extreme, "k3")
    assert k3.tolist() == pytest.approx([29 + math.exp(-30), 5e-19, 0.0, 5e-19, math.exp(30) - 31], rel=1e-5, abs=0)


def test_kl_estimators_average_to_the_exact_kl():
    # pi_theta = (0.5, 0.3, 0.2), pi_ref = (0.2, 0.3, 0.5). By hand,
    # KL(pi_theta || pi_ref) = 0.5 ln(0.5/0.2) + 0.3 ln 1 + 0.2 ln(0.2/0.5) = 0.3 ln 2.5.
    # k1 and k3 are unbiased; k2 is not: E[k2] = (0.5 + 0.2) (ln 2.5)^2 / 2.
    pi_theta = as_tensor([0.5, 0.3, 0.2])
    pi_ref = as_tensor([0.2, 0.3, 0.5])
    exact_kl = 0.3 * math.log(2.5)
    assert exact_kl == pytest.approx(0.274887, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(pi_theta, 200_000, replacement=True, generator=generator)
    logps, ref_logps = pi_theta.log()[samples], pi_ref.log()[samples]
    # Standard errors: about 0.0016 (k1) and 0.0009 (k3); 0.01 is > 5 of them.
    assert kl_penalty(logps, ref_logps, "k1").mean().item() == pytest.approx(exact_kl, abs=0.01)
    assert kl_penalty(logps, ref_logps, "k3").mean().item() == pytest.approx(exact_kl, abs=0.01)
    expected_k2 = 0.7 * math.log(2.5) ** 2 / 2
    assert kl_penalty(logps, ref_logps, "k2").mean().item() == pytest.approx(expected_k2, abs=0.01)
    assert kl_penalty(logps, ref_logps, "k2").mean().item() > exact_kl + 0.015  # the bias is visible at this sample size


# ----------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_by_hand():
    # eps = 0.2, so the ratio is clipped to [0.8, 1.2]; loss = max(-A rho, -A clip(rho)).
    #   A=+1, rho=1.5: max(-1.5, -1.2) = -1.2    clipped (no extra credit past 1 + eps)
    #   A=+1, rho=0.5: max(-0.5, -0.8) = -0.5    unclipped (a worse ratio is still penalised)
    #   A=-1, rho=1.5: max( 1.5,  1.2) =  1.5    unclipped
    #   A=-1, rho=0.5: max( 0.5,  0.8) =  0.8    clipped
    #   A=+2, rho=1.1: inside the range:  -2.2   unclipped
    #   A=-2, rho=0.9: inside the range:   1.8   unclipped
    #   A= 0, rho=3.0: 0                         unclipped
    advantages = as_tensor([[1, 1, -1, -1, 2, -2, 0]])
    ratios = as_tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 0.9, 3.0]])
    old_logps = as_tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7, -2.2]])
    losses, clipped = ppo_policy_loss(old_logps + ratios.log(), old_logps, advantages, clip_eps=0.2)
    assert_close(losses, [[-1.2, -0.5, 1.5, 0.8, -2.2, 1.8, 0.0]], atol=1e-12)
    assert clipped.tolist() == [[T, F_, F_, T, F_, F_, F_]]


def test_ppo_policy_loss_matches_reference():
    rng = random.Random(11)
    eps = 0.2
    old = random_floats(rng, 3, 12, scale=1.0)
    new = [[o + rng.gauss(0.0, 0.4) for o in row] for row in old]  # ratios inside and outside [0.8, 1.2]
    adv = random_floats(rng, 3, 12)
    want_loss, want_clip = [], []
    for rn, ro, ra in zip(new, old, adv):
        loss_row, clip_row = [], []
        for n, o, a in zip(rn, ro, ra):
            rho = math.exp(n - o)
            unclipped, clipped = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
            loss_row.append(max(unclipped, clipped))
            clip_row.append(clipped > unclipped)
        want_loss.append(loss_row)
        want_clip.append(clip_row)
    losses, clipped = ppo_policy_loss(as_tensor(new), as_tensor(old), as_tensor(adv), clip_eps=eps)
    assert_close(losses, want_loss, atol=1e-12)
    assert clipped.tolist() == want_clip
    assert 0 < sum(map(sum, want_clip)) < 36  # both regimes occur


def test_ppo_policy_loss_gradient_vanishes_when_clipped():
    # The clipped term is constant in the parameters: no gradient flows through it.
    logps = torch.log(as_tensor([1.5, 1.1])).requires_grad_(True)
    losses, clipped = ppo_policy_loss(logps, torch.zeros(2, dtype=torch.float64), as_tensor([1.0, 1.0]), clip_eps=0.2)
    losses.sum().backward()
    assert clipped.tolist() == [T, F_]
    # d(-A rho)/d logp = -A rho = -1.1 for the unclipped token.
    assert_close(logps.grad, [0.0, -1.1], atol=1e-12)


def test_ppo_value_loss_by_hand():
    # eps = 0.2; clipped value = V_old + clip(V - V_old, -0.2, 0.2); loss = 0.5 max(err^2, err_clipped^2).
    #   V=1, V_old=0.5, R=2: V_clip=0.7; errors 1 and 1.69 -> 0.845, clipped
    #   V=1, V_old=0.9, R=2: V_clip=1.0 (inside);        -> 0.5,   not clipped
    #   V=0, V_old=0.5, R=2: V_clip=0.3; errors 4 and 2.89 -> 2.0, not clipped
    values = as_tensor([1.0, 1.0, 0.0])
    old_values = as_tensor([0.5, 0.9, 0.5])
    returns = as_tensor([2.0, 2.0, 2.0])
    losses, clipped = ppo_value_loss(values, old_values, returns, clip_eps=0.2)
    assert_close(losses, [0.845, 0.5, 2.0], atol=1e-12)
    assert clipped.tolist() == [T, F_, F_]


def test_ppo_value_loss_matches_reference():
    rng = random.Random(13)
    eps = 0.2
    values, old, returns = (random_floats(rng, 1, 20)[0] for _ in range(3))
    want_loss, want_clip = [], []
    for v, o, r in zip(values, old, returns):
        v_clip = o + min(max(v - o, -eps), eps)
        err, err_clip = (v - r) ** 2, (v_clip - r) ** 2
        want_loss.append(0.5 * max(err, err_clip))
        want_clip.append(err_clip > err)
    losses, clipped = ppo_value_loss(as_tensor(values), as_tensor(old), as_tensor(returns), clip_eps=eps)
    assert_close(losses, want_loss, atol=1e-12)
    assert clipped.tolist() == want_clip


def test_approx_kl_by_hand_and_reference():
    # logps - old = ln 2, so r = pi_theta/pi_old = 2: (2 - 1) - ln 2. Equal log-probs: 0.
    # logps - old = -ln 2, r = 1/2: (1/2 - 1) + ln 2.
    got = approx_kl(as_tensor([LN2, 0.0, -LN2]), torch.zeros(3, dtype=torch.float64))
    assert_close(got, [1 - LN2, 0.0, LN2 - 0.5], atol=1e-12)
    rng = random.Random(17)
    new, old = random_floats(rng, 1, 10)[0], random_floats(rng, 1, 10)[0]
    want = [math.exp(n - o) - 1 - (n - o) for n, o in zip(new, old)]
    assert_close(approx_kl(as_tensor(new), as_tensor(old)), want, atol=1e-9)


def test_truncated_is_weights_by_hand():
    # w = min(exp(trainer - sampler), cap), cap = 2; 0 off the mask, 1 where the sampler gave no log-prob (NaN).
    #   trainer - sampler =  ln 1.5: 1.5                  under the cap
    #   trainer - sampler = -ln 2:   0.5                  the sampler found it likelier: no floor
    #   trainer - sampler =  ln 3:   min(3, 2) = 2        truncated
    #   trainer - sampler =  0:      1
    #   trainer - sampler =  50:     exp(50) -> 2         truncated (no overflow past the cap)
    #   masked out (padding):        0                    whatever the log-probs
    #   sampler NaN:                 1                    uncorrected
    sampler = as_tensor([[-1.0, -0.3, -2.0, -0.7, -60.0, 0.0, math.nan]])
    trainer = sampler.nan_to_num(0.0) + as_tensor([[math.log(1.5), -LN2, math.log(3.0), 0.0, 50.0, 5.0, 0.0]])
    mask = torch.tensor([[T, T, T, T, T, F_, T]])
    trainer.requires_grad_(True)
    got = losses.truncated_is_weights(trainer, sampler, mask, cap=2.0)
    assert_close(got, [[1.5, 0.5, 2.0, 1.0, 2.0, 0.0, 1.0]], atol=1e-12)
    assert not got.requires_grad  # a weight, not a path for the gradient
    # Another cap truncates elsewhere: 1.2 leaves 0.5 and 1 alone and caps 1.5, 3 and exp(50).
    got = losses.truncated_is_weights(trainer, sampler, mask, cap=1.2)
    assert_close(got, [[1.2, 0.5, 1.2, 1.0, 1.2, 0.0, 1.0]], atol=1e-12)


def test_explained_variance_by_hand():
    targets = as_tensor([1.0, 2.0, 3.0, 50.0])
    mask = torch.tensor([T, T, T, F_])  # the 50 is padding
    assert explained_variance(targets, targets, mask).item() == pytest.approx(1.0)
    # A constant prediction explains nothing: residuals -1, 0, 1 have the targets' variance.
    assert explained_variance(as_tensor([2.0, 2.0, 2.0, 0.0]), targets, mask).item() == pytest.approx(0.0)
    # Predictions 1, 2, 4: residuals 0, 0, -1, mean -1/3, variance ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3.
    assert explained_variance(as_tensor([1.0, 2.0, 4.0, 9.0]), targets, mask).item() == pytest.approx(2 / 3)
    # Constant targets: undefined.
    assert math.isnan(explained_variance(as_tensor([1.0, 2.0]), as_tensor([3.0, 3.0]), torch.tensor([T, T])).item())


def test_explained_variance_matches_reference():
    rng = random.Random(19)
    preds, targets = random_floats(rng, 3, 9), random_floats(rng, 3, 9)
    mask = random_contiguous_mask(rng, 3, 9)
    picked_t = [t for row, mrow in zip(targets, mask) for t, m in zip(row, mrow) if m]
    picked_r = [t - p for rt, rp, mrow in zip(targets, preds, mask) for t, p, m in zip(rt, rp, mrow) if m]
    want = 1 - ref_mean_var(picked_r)[1] / ref_mean_var(picked_t)[1]
    got = explained_variance(as_tensor(preds), as_tensor(targets), torch.tensor(mask)).item()
    assert got == pytest.approx(want, abs=1e-9)


# ----------------------------------------------------------------------------- group baselines


def test_rloo_advantages_by_hand():
    scores = as_tensor([1.0, 2.0, 3.0, 6.0])
    # Groups of 2: the baseline is the other sample. [1-2, 2-1, 3-6, 6-3].
    assert_close(rloo_advantages(scores, 2), [-1.0, 1.0, -3.0, 3.0])
    # One group of 4: baseline_i = (12 - s_i) / 3 = 11/3, 10/3, 3, 2.
    assert_close(rloo_advantages(scores, 4), [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    with pytest.raises(ValueError):
        rloo_advantages(scores, 1)


def test_grpo_advantages_by_hand():
    scores = as_tensor([1.0, 2.0, 3.0, 6.0])
    # Groups of 2: means 1.5 and 4.5; Bessel stds sqrt(0.5) and sqrt(4.5).
    assert_close(grpo_advantages(scores, 2, scale=False), [-0.5, 0.5, -1.5, 1.5])
    s1, s2 = math.sqrt(0.5) + 1e-4, math.sqrt(4.5) + 1e-4
    assert_close(grpo_advantages(scores, 2), [-0.5 / s1, 0.5 / s1, -1.5 / s2, 1.5 / s2])
    # One group of 4: mean 3, centred -2, -1, 0, 3; std sqrt((4 + 1 + 0 + 9) / 3).
    s = math.sqrt(14 / 3) + 1e-4
    assert_close(grpo_advantages(scores, 4), [-2 / s, -1 / s, 0.0, 3 / s])
    # A group whose samples all scored the same teaches nothing (and does not divide by zero).
    assert_close(grpo_advantages(as_tensor([5.0, 5.0, 1.0, 2.0]), 2)[:2], [0.0, 0.0])


def test_group_advantages_match_reference():
    rng = random.Random(23)
    k = 4
    scores = [rng.gauss(0.0, 2.0) for _ in range(3 * k)]
    want_rloo, want_grpo, want_drgrpo = [], [], []
    for g in range(3):
        group = scores[g * k : (g + 1) * k]
        mean, var = ref_mean_var(group)
        for i, s in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            want_rloo.append(s - sum(others) / len(others))
            want_drgrpo.append(s - mean)
            want_grpo.append((s - mean) / (math.sqrt(var) + 1e-4))
    assert_close(rloo_advantages(as_tensor(scores), k), want_rloo)
    assert_close(grpo_advantages(as_tensor(scores), k), want_grpo)
    assert_close(grpo_advantages(as_tensor(scores), k, scale=False), want_drgrpo)


# ----------------------------------------------------------------------------- log-probabilities and entropy


def test_gather_logps_and_entropy_by_hand():
    # logits (0, ln 3): softmax (1/4, 3/4). At temperature 1/2 the logits double: (1/10, 9/10).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    token = torch.tensor([[1]])
    assert gather_logps(logits, token).item() == pytest.approx(math.log(0.75))
    assert gather_logps(logits, token, temperature=0.5).item() == pytest.approx(math.log(0.9))
    assert entropy_from_logits(logits).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # Uniform over V tokens: entropy ln V.
    assert entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7))


def log_softmax_gather(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The textbook way: the full log-softmax of logits / temperature, then pick each token's entry."""
    return F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_logps_matches_log_softmax_and_gather(temperature):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 50, generator=generator) * 3
    tokens = torch.randint(0, 50, (2, 5), generator=generator)
    want = log_softmax_gather(logits, tokens, temperature)
    got = gather_logps(logits, tokens, temperature=temperature)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # bf16 logits are upcast before the logsumexp.
    got_bf16 = gather_logps(logits.bfloat16(), tokens, temperature=temperature)
    assert got_bf16.dtype == torch.float32
    want_bf16 = log_softmax_gather(logits.bfloat16(), tokens, temperature)
    torch.testing.assert_close(got_bf16, want_bf16, atol=1e-5, rtol=0)


def test_entropy_matches_manual_loop():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 11, generator=generator, dtype=torch.float64) * 2
    got = entropy_from_logits(logits)
    for b in range(3):
        for t in range(4):
            row = logits[b, t].tolist()
            top = max(row)
            z = sum(math.exp(x - top) for x in row)
            probs = [math.exp(x - top) / z for x in row]
            want = -sum(p * math.log(p) for p in probs)
            assert got[b, t].item() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- rollout helpers


def test_response_mask_from_ids():
    eos = 2
    response = torch.tensor(
        [
            [5, 6, eos, 7],  # EOS in the middle: it is kept, what follows is padding
            [5, 6, 7, eos],  # EOS last
            [5, 6, 7, 8],  # no EOS: truncated at max_new_tokens
            [eos, 5, eos, 6],  # EOS first: a one-token response; the second EOS is padding too
        ]
    )
    mask, has_eos = response_mask_from_ids(response, eos)
    assert mask.tolist() == [[T, T, T, F_], [T, T, T, T], [T, T, T, T], [T, F_, F_, F_]]
    assert has_eos.tolist() == [T, T, F_, T]
    assert mask.dtype == torch.bool and has_eos.dtype == torch.bool


def test_position_ids_from_mask_with_left_padding():
    attention_mask = torch.tensor(
        [
            [0, 0, 1, 1, 1],  # left padding: the first real token is position 0
            [1, 1, 1, 1, 1],
            [0, 1, 1, 0, 0],  # left padding, then response padding after EOS (masked; value irrelevant)
        ],
        dtype=torch.bool,
    )
    assert position_ids_from_mask(attention_mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]


@contextlib.contextmanager
def recorded_position_ids(policy):
    """Collect the ``position_ids`` each forward of the policy's decoder receives (None if absent).

    The tiny Llama uses RoPE, which sees only position differences, so a batch
    whose rows are all shifted by their padding would still give the right
    log-probs; checking what was passed catches a missing or wrong position id.
    """
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    hook = policy.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def _left_padded_batch(pad_id: int):
    """Three (prompt, response) pairs of different lengths as one [left-padded query | right-padded response] batch."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (2, 3), (7, 4)]  # row 1 is short on both sides
    pairs = [
        (torch.randint(3, 5000, (p,), generator=generator), torch.randint(3, 5000, (r,), generator=generator)) for p, r in shapes
    ]
    P, R = max(p for p, _ in shapes), max(r for _, r in shapes)
    input_ids = torch.full((len(pairs), P + R), pad_id)
    attention_mask = torch.zeros((len(pairs), P + R), dtype=torch.bool)
    response_ids = torch.full((len(pairs), R), pad_id)
    for i, (query, response) in enumerate(pairs):
        input_ids[i, P - len(query) : P] = query
        attention_mask[i, P - len(query) : P] = True
        input_ids[i, P : P + len(response)] = response
        attention_mask[i, P : P + len(response)] = True
        response_ids[i, : len(response)] = response
    return pairs, input_ids, attention_mask, response_ids


@pytest.mark.parametrize("value", ["none", "head", "critic"])
def test_left_padding_changes_no_logp_or_value(value):
    policy = models.build_tiny(seed=3)
    critic = load_critic(models.TINY, vocab_size=policy.config.vocab_size) if value == "critic" else None
    torch.manual_seed(0)
    model = ActorCritic(policy, value=value, critic=critic).eval()
    pairs, input_ids, attention_mask, response_ids = _left_padded_batch(pad_id=policy.config.pad_token_id)
    assert not attention_mask[:, 0].all()  # some rows really are left-padded

    # The decoder must receive positions that skip the left padding.
    with recorded_position_ids(policy) as seen, torch.no_grad():
        batch_logps, _, batch_values = response_logps(model, input_ids, attention_mask, response_ids)
    P = input_ids.shape[1] - response_ids.shape[1]
    assert seen[0] is not None, "the decoder got no position_ids"
    for i, (query, _) in enumerate(pairs):
        first = P - len(query)
        assert seen[0][i, first:P].tolist() == list(range(len(query)))

    for i, (query, response) in enumerate(pairs):
        alone = torch.cat([query, response])[None]
        with torch.no_grad():
            logps, _, values = response_logps(model, alone, torch.ones_like(alone, dtype=torch.bool), response[None])
        n = len(response)
        torch.testing.assert_close(batch_logps[i, :n], logps[0], atol=1e-4, rtol=0)
        if value == "none":
            assert batch_values is None and values is None
        else:
            torch.testing.assert_close(batch_values[i, :n], values[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("value", ["none", "head", "critic"])
def test_packed_rollout_equals_each_row_alone(value):
    """Rows 0-2 share a query (a GRPO group), row 3 has its own; row 2's response ends early
    (masked tail); rows 0 and 1 share their first response tokens (but row 2 does not)."""
    policy = models.build_tiny(seed=3)
    models.set_attention(policy)
    critic = load_critic(models.TINY, vocab_size=policy.config.vocab_size) if value == "critic" else None
    if critic is not None:
        models.set_attention(critic)
    torch.manual_seed(0)
    model = ActorCritic(policy, value=value, critic=critic).eval()
    g = torch.Generator().manual_seed(1)
    query, other = torch.randint(3, 5000, (6,), generator=g), torch.randint(3, 5000, (3,), generator=g)
    common = torch.randint(3, 5000, (2,), generator=g)
    rows = [
        (query, torch.cat([common, torch.randint(3, 5000, (3,), generator=g)])),
        (query, torch.cat([common, torch.randint(3, 5000, (3,), generator=g)])),
        (query, torch.randint(3, 5000, (2,), generator=g)),
        (other, torch.randint(3, 5000, (5,), generator=g)),
    ]
    P, R, pad = 6, 5, policy.config.pad_token_id
    query_ids, query_mask = torch.full((4, P), pad), torch.zeros((4, P), dtype=torch.bool)
    response_ids, response_mask = torch.full((4, R), pad), torch.zeros((4, R), dtype=torch.bool)
    for i, (q, r) in enumerate(rows):
        query_ids[i, P - len(q) :], query_mask[i, P - len(q) :] = q, True
        response_ids[i, : len(r)], response_mask[i, : len(r)] = r, True

    batch, positions, _, _ = packed_rollout(query_ids, query_mask, response_ids, response_mask)
    assert batch["input_ids"].shape[1] == 6 + 5 + 5 + 2 + 3 + 5  # the group's query once
    assert positions.shape == (int(response_mask.sum()),)
    with torch.no_grad():
        logps, values, entropy = packed_response_logps(
            model, query_ids, query_mask, response_ids, response_mask, temperature=0.7, with_entropy=True
        )
        ref_logps, ref_values, _ = packed_response_logps(
            policy, query_ids, query_mask, response_ids, response_mask, temperature=0.7
        )
    assert ref_values is None and (values is None) == (value == "none")
    assert (logps[~response_mask] == 0).all() and (entropy[~response_mask] == 0).all()
    for i, (q, r) in enumerate(rows):
        alone = torch.cat([q, r])[None]
        with torch.no_grad():
            want, logits, want_values = response_logps(
                model, alone, torch.ones_like(alone, dtype=torch.bool), r[None], temperature=0.7
            )
        n = len(r)
        # rtol: packing changes fp32 summation order; on an AVX2-only CPU a log-prob of -10.8 differed by 1.05e-5.
        torch.testing.assert_close(logps[i, :n], want[0], atol=1e-5, rtol=2e-6)
        torch.testing.assert_close(ref_logps[i, :n], want[0], atol=1e-5, rtol=2e-6)
        torch.testing.assert_close(entropy[i, :n], entropy_from_logits(logits[0] / 0.7), atol=1e-5, rtol=2e-6)
        if value != "none":
            torch.testing.assert_close(values[i, :n], want_values[0], atol=1e-5, rtol=2e-6)
    # The trainer's padded path (packing=false) gives the same, entropy included.
    rollout = Rollout(
        [""] * 4,
        [""] * 4,
        query_ids,
        query_mask,
        response_ids,
        response_mask,
        has_eos=torch.zeros(4, dtype=torch.bool),
        temperature=0.7,
    )
    with torch.no_grad():
        padded = rl._forward(model, rollout, [0, 1, 2, 3], torch.device("cpu"), with_entropy=True, packed=False)
    for got, want in zip(padded, (logps, values, entropy)):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got[response_mask], want[response_mask], atol=1e-5, rtol=0)


def test_response_logps_of_plain_lm_equals_actor_critic():
    policy = models.build_tiny(seed=3).eval()
    _, input_ids, attention_mask, response_ids = _left_padded_batch(pad_id=policy.config.pad_token_id)
    with recorded_position_ids(policy) as seen, torch.no_grad():
        lm_logps, _, lm_values = response_logps(policy, input_ids, attention_mask, response_ids, temperature=0.7)
    assert seen[0] is not None, "the decoder got no position_ids"
    assert torch.equal(seen[0], position_ids_from_mask(attention_mask))  # the reference-model path passes them too
    with torch.no_grad():
        ac_logps, _, _ = response_logps(ActorCritic(policy), input_ids, attention_mask, response_ids, temperature=0.7)
        # Reference: full forward, the logits at position P-1+j predict response token j.
        full = policy(
            input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids_from_mask(attention_mask)
        ).logits
    R = response_ids.shape[1]
    want = log_softmax_gather(full[:, -R - 1 : -1], response_ids, temperature=0.7)
    assert lm_values is None
    torch.testing.assert_close(lm_logps, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ac_logps, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- adaptive KL


def test_adaptive_kl_controller_by_hand():
    # beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), Ziegler et al. 2019.
    ctl = AdaptiveKLController(init=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.6, n_samples=100)  # error 0.1: 0.1 * (1 + 0.1 * 0.01) = 0.1001
    assert ctl.value == pytest.approx(0.1001, rel=1e-12)
    ctl.update(current_kl=60.0, n_samples=64)  # error 9 clipped to 0.2: * 1.00128
    assert ctl.value == pytest.approx(0.1001 * 1.00128, rel=1e-12)
    ctl.update(current_kl=0.0, n_samples=5_000)  # error -1 clipped to -0.2: * 0.9
    assert ctl.value == pytest.approx(0.1001 * 1.00128 * 0.9, rel=1e-12)
    ctl.update(current_kl=6.0, n_samples=1_000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.1001 * 1.00128 * 0.9, rel=1e-12)


def test_adaptive_kl_controller_matches_formula_on_random_inputs():
    rng = random.Random(29)
    ctl = AdaptiveKLController(init=0.05, target=3.0, horizon=2_000)
    beta = 0.05
    for _ in range(50):
        kl, n = rng.uniform(0.0, 8.0), rng.randint(1, 256)
        error = min(max(kl / 3.0 - 1.0, -0.2), 0.2)
        beta = beta * (1.0 + error * n / 2_000)
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(beta, rel=1e-12)


def test_fused_logps_and_entropy_equal_the_separate_ones():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, 7, 50, generator=g)).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, 50, (5, 7), generator=g)
    for temperature in (1.0, 0.7):
        logps, entropy = gather_logps_and_entropy(logits, tokens, temperature)
        want = gather_logps(logits, tokens, temperature)
        torch.testing.assert_close(logps, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, entropy_from_logits(logits.detach().float() / temperature), atol=1e-5, rtol=0)
        assert not entropy.requires_grad
        (grad,) = torch.autograd.grad(logps.sum(), logits)
        (want_grad,) = torch.autograd.grad(want.sum(), logits)
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logps_values_and_gradients_equal_the_full_log_softmax(monkeypatch, temperature):
    # 3 rows per chunk over 4 x 5 rows: several chunks and a short last one.
    monkeypatch.setattr(logps_mod, "_CHUNK_VALUES", 3 * 50)
    g = torch.Generator().manual_seed(4)
    logits = (4 * torch.randn(4, 5, 50, generator=g)).requires_grad_(True)
    tokens = torch.randint(0, 50, (4, 5), generator=g)
    weights = torch.randn(4, 5, generator=g)  # a non-uniform upstream gradient
    logps, entropy = gather_logps_and_entropy(logits, tokens, temperature)
    want = log_softmax_gather(logits, tokens, temperature)
    torch.testing.assert_close(logps, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(gather_logps(logits, tokens, temperature), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach() / temperature), atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad((logps * weights).sum(), logits)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", ["cpu", "cuda"] if ON_CUDA else ["cpu"])  # cuda: the recompute path
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_token_logps_in_row_blocks_equal_the_linear_then_log_softmax(monkeypatch, device, autocast, bias, temperature):
    from rlhfkit.modeling import policy as policy_mod

    monkeypatch.setattr(policy_mod, "HEAD_BLOCK_ROWS", 3)  # 10 rows: blocks of 3, 3, 3 and 1
    monkeypatch.setattr(policy_mod, "CUDA_HEAD_BLOCK_VALUES", 3 * 17)  # the same blocks on CUDA
    monkeypatch.setattr(logps_mod, "_CHUNK_VALUES", 2 * 17)  # and inside a block, chunks of 2 rows
    monkeypatch.setattr(logps_mod, "_CUDA_CHUNK_VALUES", 2 * 17)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 17, bias=bias).to(device)
    states = (2 * torch.randn(10, 8)).to(device).requires_grad_(True)
    tokens = torch.randint(0, 17, (10,)).to(device)
    upstream = torch.randn(10).to(device)  # a non-uniform upstream gradient

    def run(fn):
        head.zero_grad()
        states.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logps, entropy = fn(states)
        (logps * upstream).sum().backward()
        grads = [states.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
        return logps, entropy, grads

    def reference(x):  # the head, then the log-softmax of the whole logits: an independent path
        logits = head(x).float()
        return log_softmax_gather(logits, tokens, temperature), entropy_from_logits(logits.detach() / temperature)

    got, got_entropy, got_grads = run(lambda x: policy_mod.head_token_logps(head, x, tokens, temperature, with_entropy=True))
    want, want_entropy, want_grads = run(reference)
    assert got.dtype == got_entropy.dtype == torch.float32 and not got_entropy.requires_grad
    tol = dict(atol=0.03, rtol=0.02) if autocast else dict(atol=1e-5, rtol=0)  # bf16 logits: rounded once more
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_entropy, want_entropy, **tol)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0.05 if autocast else 1e-5, rtol=0.02 if autocast else 0)
    with torch.no_grad():  # without a gradient only a block-sized logits buffer: the same values
        logps, _ = policy_mod.head_token_logps(head, states, tokens, temperature)
    torch.testing.assert_close(logps, got.detach(), atol=0, rtol=0) if not autocast else None


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cuda"] if ON_CUDA else ["cpu"])
def test_recomputed_head_gradients_equal_the_kept_logits_and_keep_no_full_logits(monkeypatch, device, autocast, bias):
    """linear_token_logps(recompute=True), the CUDA path: the same log-probs and gradients (input, weight, bias) as
    keeping the (N, V) logits for the backward, while nothing of N x V values is saved between the passes."""
    monkeypatch.setattr(logps_mod, "_CHUNK_VALUES", 2 * 23)  # chunks of 2 rows inside each block
    monkeypatch.setattr(logps_mod, "_CUDA_CHUNK_VALUES", 2 * 23)
    g = torch.Generator().manual_seed(3)
    n, hidden, vocab = 11, 8, 23
    x0 = (2 * torch.randn(n, hidden, generator=g)).to(device)
    w0 = torch.randn(vocab, hidden, generator=g).to(device)
    b0 = torch.randn(vocab, generator=g).to(device) if bias else None
    tokens = torch.randint(0, vocab, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)

    def run(recompute):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True) if bias else None
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        dtype = torch.bfloat16 if autocast else torch.float32
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = logps_mod.linear_token_logps(
                x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), tokens, 0.8, block_rows=4, recompute=recompute
            )
        (logps * upstream).sum().backward()
        return logps.detach(), [t.grad for t in (x, w, b) if t is not None], saved

    want, want_grads, kept_shapes = run(False)
    got, got_grads, saved_shapes = run(True)
    assert (n, vocab) in kept_shapes and all(s[0] * (s[1] if len(s) > 1 else 1) < n * vocab for s in saved_shapes)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the forward computes the same blocks either way
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=0.02 if autocast else 1e-5, rtol=0.02 if autocast else 1e-5)


def test_chunk_sizes_are_cache_sized_on_cpu_and_larger_on_gpus():
    assert logps_mod.chunk_values(torch.device("cpu")) == logps_mod._CHUNK_VALUES == 1 << 22
    assert logps_mod.chunk_values(torch.device("cuda")) == 1 << 26


def test_logps_backward_leaves_fp32_logits_as_they_were():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g, requires_grad=True)
    before = logits.detach().clone()
    tokens = torch.randint(0, 40, (6,), generator=g)
    gather_logps(logits, tokens).sum().backward()  # temperature 1: no scaled copy to work on
    assert torch.equal(logits.detach(), before)


# ----------------------------------------------------------------------------- losses.advantages: every algorithm
ADV_MASK = torch.tensor([[True, True, False], [True, True, True]])
ADV_SCORES = torch.tensor([1.0, 2.0])
ADV_KL = torch.tensor([[0.5, 0.5, 9.0], [0.0, 1.0, 0.0]])  # 9.0 lies past row 0's end: it must not count


def test_advantages_reinforce_by_hand():
    # token rewards (beta 0.1): row 0 [-0.05, -0.05 + 1]; row 1 [0, -0.1, 2]. Reward-to-go: [0.9, 0.95],
    # [1.9, 1.9, 2.0]; minus their mean 7.65 / 5 = 1.53.
    adv, returns = losses.advantages("reinforce", ADV_SCORES, ADV_MASK, kl=ADV_KL, beta=0.1, gamma=1.0, whiten_advantages=False)
    assert returns is None
    assert torch.allclose(adv, torch.tensor([[-0.63, -0.58, 0.0], [0.37, 0.37, 0.47]]), atol=1e-6)


def test_advantages_ppo_by_hand():
    # lam 0: A_t = r_t + V_{t+1} - V_t, the value after the last token 0. Row 0: -0.05 + 0.5 - 0.5, 0.95 - 0.5;
    # row 1: 0 + 1 - 1, -0.1 + 1 - 1, 2 - 1. Returns = A + V.
    values = torch.tensor([[0.5, 0.5, 7.0], [1.0, 1.0, 1.0]])
    adv, returns = losses.advantages(
        "ppo", ADV_SCORES, ADV_MASK, kl=ADV_KL, beta=0.1, values=values, gamma=1.0, lam=0.0, whiten_advantages=False
    )
    assert torch.allclose(adv, torch.tensor([[-0.05, 0.45, 0.0], [0.0, -0.1, 1.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.45, 0.95, 0.0], [1.0, 0.9, 2.0]]), atol=1e-6)
    # lam 1 and zero values: the reward-to-go itself; no KL given is a zero KL.
    adv, _ = losses.advantages("ppo", ADV_SCORES, ADV_MASK, values=torch.zeros(2, 3), gamma=1.0, lam=1.0, whiten_advantages=False)
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]]))
    whitened, _ = losses.advantages("ppo", ADV_SCORES, ADV_MASK, kl=ADV_KL, beta=0.1, values=values, lam=0.0)
    assert torch.allclose(
        whitened,
        losses.whiten(
            adv_lam0 := losses.advantages(
                "ppo", ADV_SCORES, ADV_MASK, kl=ADV_KL, beta=0.1, values=values, lam=0.0, whiten_advantages=False
            )[0],
            ADV_MASK,
        ),
    )
    assert adv_lam0[0, 2] == 0 and whitened[0, 2] == 0
    with pytest.raises(ValueError, match="need values"):
        losses.advantages("ppo", ADV_SCORES, ADV_MASK)


def test_advantages_rloo_and_grpo_by_hand():
    # rloo: sequence rewards 1 - 0.1 * 1.0 = 0.9 and 2 - 0.1 * 1.0 = 1.9 (one group of 2): -1 and +1 on every token.
    adv, returns = losses.advantages("rloo", ADV_SCORES, ADV_MASK, kl=ADV_KL, beta=0.1, group_size=2)
    assert returns is None
    assert torch.allclose(adv, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]))
    # grpo: the KL is not in the advantage. Scores 1, 2: mean 1.5, Bessel std 0.5 * sqrt(2).
    adv, _ = losses.advantages("grpo", ADV_SCORES, ADV_MASK, kl=ADV_KL, beta=0.1, group_size=2)
    a = 0.5 / (0.5 * 2**0.5 + 1e-4)
    assert torch.allclose(adv, torch.tensor([[-a, -a, 0.0], [a, a, a]]))
    adv, _ = losses.advantages("grpo", ADV_SCORES, ADV_MASK, group_size=2, scale=False)
    assert torch.allclose(adv, torch.tensor([[-0.5, -0.5, 0.0], [0.5, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="unknown algorithm 'bogus'"):
        losses.advantages("bogus", ADV_SCORES, ADV_MASK)


def test_a2c_advantages_are_ppos():
    values = torch.tensor([[0.5, -0.25, 0.0], [1.0, 0.0, 2.0]])
    kwargs = dict(kl=ADV_KL, beta=0.1, values=values, gamma=0.9, lam=0.8)
    for whiten_advantages in (True, False):
        ppo = losses.advantages("ppo", ADV_SCORES, ADV_MASK, whiten_advantages=whiten_advantages, **kwargs)
        a2c = losses.advantages("a2c", ADV_SCORES, ADV_MASK, whiten_advantages=whiten_advantages, **kwargs)
        assert torch.equal(ppo[0], a2c[0]) and torch.equal(ppo[1], a2c[1])
