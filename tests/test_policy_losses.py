"""The GRPO family of policy losses (:func:`rlhfkit.losses.policy_loss` and friends), checked two ways.

1. Small inputs whose outputs were worked out by hand; the working is in the comments.
2. Slow references written here with Python loops over floats, on random inputs. They never
   call the function under test.

Then the trainer: the default loss options are today's loss (DAPO's token mean, PPO's symmetric
clip), every non-default option trains with finite metrics, and drop_zero_variance_groups logs
the fraction of constant groups and gives their rows no gradient.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhfkit import rl
from rlhfkit.config import ConfigError, field_docs, load_config
from rlhfkit.losses import loss_token_weights, overlong_penalty, policy_loss, ppo_policy_loss, zero_variance_groups
from rlhfkit.run_layout import RLMetric
from tests.test_rl_train import COMMON_KEYS, assert_finite_entries, make_config, metrics, rl_dir  # noqa: F401

T, F_ = True, False


def as_tensor(rows, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, as_tensor(expected, actual.dtype), atol=atol, rtol=0)


def loss_and_grad(ratios, advantages, mask=None, **options):
    """Per-token losses, clipped flags and d(sum of masked losses)/d logps for the given ratios (float64)."""
    old = as_tensor([[-1.0 - 0.5 * j for j in range(len(row))] for row in ratios])
    logps = (old + as_tensor(ratios).log()).requires_grad_(True)
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor(mask)
    losses, clipped = policy_loss(logps, old, as_tensor(advantages), mask, **options)
    torch.where(mask, losses, 0.0).sum().backward()
    return losses.detach(), clipped, logps.grad


# ----------------------------------------------------------------------------- clip modes by hand


def test_asymmetric_clip_by_hand():
    # clip_eps_low 0.2, clip_eps_high 0.28 (DAPO's): r is clipped to [0.8, 1.28]. loss = max(-A r, -A clip(r));
    # the gradient w.r.t. log pi is -A r where the unclipped term is the max, 0 where the clipped one is.
    #   A=+1, r=1.5 : max(-1.5, -1.28) = -1.28   clipped     grad 0
    #   A=+1, r=1.25: inside            -1.25    unclipped   grad -1.25  (symmetric 0.2 would clip it to -1.2)
    #   A=-1, r=0.5 : max(0.5, 0.8)    =  0.8    clipped     grad 0
    #   A=-1, r=0.75: max(0.75, 0.8)   =  0.8    clipped     grad 0
    #   A=+1, r=0.5 : max(-0.5, -0.8)  = -0.5    unclipped   grad -0.5
    #   A=-1, r=1.5 : max(1.5, 1.28)   =  1.5    unclipped   grad 1.5
    ratios, adv = [[1.5, 1.25, 0.5, 0.75, 0.5, 1.5]], [[1, 1, -1, -1, 1, -1]]
    losses, clipped, grad = loss_and_grad(ratios, adv, clip="asymmetric", clip_eps_low=0.2, clip_eps_high=0.28)
    assert_close(losses, [[-1.28, -1.25, 0.8, 0.8, -0.5, 1.5]])
    assert clipped.tolist() == [[T, F_, T, T, F_, F_]]
    assert_close(grad, [[0.0, -1.25, 0.0, 0.0, -0.5, 1.5]])
    symmetric, _, _ = loss_and_grad(ratios, adv, clip="symmetric", clip_eps_low=0.2, clip_eps_high=0.2)
    assert_close(symmetric, [[-1.2, -1.2, 0.8, 0.8, -0.5, 1.5]])


def test_cispo_by_hand():
    # CISPO, eps_low 0.2, eps_high 0.28: w = sg(clip(r, 0.8, 1.28)), loss = -w A log pi, d loss / d log pi = -w A.
    #   log pi  r    A     w      loss                      grad
    #   -1.0   1.5   1    1.28   -1.28 * 1 * -1.0  =  1.28   -1.28   clipped
    #   -2.0   1.1  -2    1.1    -1.1 * -2 * -2.0  = -4.4     2.2
    #   -0.5   0.5   1    0.8    -0.8 * 1 * -0.5   =  0.4    -0.8    clipped
    #   -3.0   0.9   0.5  0.9    -0.9 * 0.5 * -3.0 =  1.35   -0.45
    # Unlike PPO, the clipped tokens keep a gradient.
    logps = as_tensor([[-1.0, -2.0, -0.5, -3.0]]).requires_grad_(True)
    old = (logps.detach() - as_tensor([[1.5, 1.1, 0.5, 0.9]]).log()).requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    losses, clipped = policy_loss(
        logps, old, as_tensor([[1, -2, 1, 0.5]]), mask, clip="cispo", clip_eps_low=0.2, clip_eps_high=0.28
    )
    losses.sum().backward()
    assert_close(losses.detach(), [[1.28, -4.4, 0.4, 1.35]])
    assert clipped.tolist() == [[T, F_, T, F_]]
    assert_close(logps.grad, [[-1.28, 2.2, -0.8, -0.45]])
    assert old.grad is None  # the importance weight is a stop-gradient


def test_cispo_gradient_is_minus_clipped_ratio_times_advantage_exactly():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 9, generator=g) - 2.0
    logps = (old + 0.5 * torch.randn(4, 9, generator=g)).requires_grad_(True)
    adv = torch.randn(4, 9, generator=g)
    mask = torch.ones(4, 9, dtype=torch.bool)
    losses, clipped = policy_loss(logps, old, adv, mask, clip="cispo", clip_eps_low=0.2, clip_eps_high=0.28)
    losses.sum().backward()
    ratio = torch.exp(logps.detach() - old)
    assert torch.equal(logps.grad, -torch.clamp(ratio, 0.8, 1.28) * adv)
    assert 0 < int(clipped.sum()) < 36  # both regimes occur


def test_dual_clip_by_hand():
    # Symmetric eps 0.2 and c = 3: for A < 0 the loss max(-A r, -A clip(r)) is capped at -c A.
    #   A=-1, r=5  : max(5, 1.2)    = 5  > cap 3  -> 3     clipped (capped)  grad 0
    #   A=-1, r=2  : max(2, 1.2)    = 2  < cap 3  -> 2     unclipped         grad -A r = 2
    #   A=-2, r=4  : max(8, 2.4)    = 8  > cap 6  -> 6     clipped (capped)  grad 0
    #   A=+1, r=5  : max(-5, -1.2)  = -1.2 (no cap for A > 0)  clipped       grad 0
    #   A=-1, r=0.5: max(0.5, 0.8)  = 0.8 < cap 3          clipped           grad 0
    #   A=+2, r=0.9: inside: -1.8                          unclipped         grad -1.8
    ratios, adv = [[5.0, 2.0, 4.0, 5.0, 0.5, 0.9]], [[-1, -1, -2, 1, -1, 2]]
    losses, clipped, grad = loss_and_grad(ratios, adv, clip="dual", clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=3.0)
    assert_close(losses, [[3.0, 2.0, 6.0, -1.2, 0.8, -1.8]])
    assert clipped.tolist() == [[T, F_, T, T, T, F_]]
    assert_close(grad, [[0.0, 2.0, 0.0, 0.0, 0.0, -1.8]])
    plain, _, _ = loss_and_grad(ratios, adv, clip="symmetric", clip_eps_low=0.2, clip_eps_high=0.2)
    assert_close(plain, [[5.0, 2.0, 8.0, -1.2, 0.8, -1.8]])  # without the cap


def test_sequence_ratio_by_hand():
    # GSPO, eps 0.2. Row 0: log-ratios [log 2, 0] (the third position is padding, log-ratio 7, ignored):
    # s = exp(log 2 / 2) = sqrt 2 = 1.414214; A = +1: max(-1.414, -1.2) = -1.2 on both tokens, clipped, grad 0.
    # Row 1: log-ratios [0.1, -0.3] (padding -9): s = exp(-0.1) = 0.904837; A = -1: max(s, clip(s)) = s on both,
    # not clipped. The masked sum of row 1 is 2 s and ds/dlog pi_t = s / 2, so each real token's gradient is s.
    s = math.exp(-0.1)
    old = as_tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    logps = (old + as_tensor([[math.log(2), 0.0, 7.0], [0.1, -0.3, -9.0]])).requires_grad_(True)
    mask = torch.tensor([[T, T, F_], [T, T, F_]])
    adv = as_tensor([[1, 1, 1], [-1, -1, -1]])
    losses, clipped = policy_loss(logps, old, adv, mask, ratio_level="sequence", clip_eps_low=0.2, clip_eps_high=0.2)
    torch.where(mask, losses, 0.0).sum().backward()
    assert_close(losses[mask], [-1.2, -1.2, s, s])
    assert clipped[mask].tolist() == [T, T, F_, F_]
    assert_close(logps.grad, [[0.0, 0.0, 0.0], [s, s, 0.0]])
    # With loss_type=grpo's weights (1 / (len_i * 2 sequences)) the loss is GSPO's objective, eq. 5:
    # the mean over sequences of max(-A s_i, -A clip(s_i)) = (-1.2 + 0.904837) / 2.
    weights = loss_token_weights(mask, "grpo", num_seqs=2, num_tokens=4, max_new_tokens=3).double()
    assert float((weights * torch.where(mask, losses.detach(), 0.0)).sum()) == pytest.approx((-1.2 + s) / 2, abs=1e-12)


@pytest.mark.parametrize("clip", ["symmetric", "asymmetric", "cispo", "dual"])
def test_sequence_ratio_of_one_token_sequences_equals_the_token_ratio(clip):
    g = torch.Generator().manual_seed(1)
    old = torch.randn(12, 1, generator=g, dtype=torch.float64) - 1.0
    adv = torch.randn(12, 1, generator=g, dtype=torch.float64) * 2
    delta = torch.randn(12, 1, generator=g, dtype=torch.float64)
    mask = torch.ones(12, 1, dtype=torch.bool)
    high = 0.2 if clip == "symmetric" else 0.28
    results = {}
    for level in ("token", "sequence"):
        logps = (old + delta).requires_grad_(True)
        losses, clipped = policy_loss(logps, old, adv, mask, ratio_level=level, clip=clip, clip_eps_low=0.2, clip_eps_high=high)
        losses.sum().backward()
        results[level] = (losses.detach(), clipped, logps.grad)
    for a, b in zip(results["token"], results["sequence"]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the same against slow references


def reference_losses(logps, old, adv, mask, *, level, clip, low, high, c):
    """Per-token losses and clipped flags with Python floats (masked-out entries: 0.0, False)."""
    out, flags = [], []
    for lp_row, old_row, a_row, m_row in zip(logps, old, adv, mask):
        real = [lp - o for lp, o, m in zip(lp_row, old_row, m_row) if m]
        seq_log_ratio = sum(real) / max(1, len(real))
        row, flag_row = [], []
        for lp, o, a, m in zip(lp_row, old_row, a_row, m_row):
            if not m:
                row.append(0.0)
                flag_row.append(False)
                continue
            r = math.exp(seq_log_ratio if level == "sequence" else lp - o)
            rc = min(max(r, 1 - low), 1 + high)
            if clip == "cispo":
                row.append(-rc * a * lp)
                flag_row.append(rc != r)
                continue
            unclipped, clipped = -a * r, -a * rc
            loss, flag = max(unclipped, clipped), clipped > unclipped
            if clip == "dual" and a < 0 and loss > -c * a:
                loss, flag = -c * a, True
            row.append(loss)
            flag_row.append(flag)
        out.append(row)
        flags.append(flag_row)
    return out, flags


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("clip", ["symmetric", "asymmetric", "cispo", "dual"])
def test_policy_loss_matches_reference(level, clip):
    rng = random.Random(7)
    B, T_ = 5, 8
    old = [[rng.gauss(-2.0, 1.0) for _ in range(T_)] for _ in range(B)]
    # log-ratios up to ~1.5 in size: ratios from ~0.2 to ~4.5, past the dual cap c = 2 and inside the clip
    logps = [[o + rng.gauss(0.0, 0.6) for o in row] for row in old]
    adv = [[rng.gauss(0.0, 1.0) for _ in range(T_)] for _ in range(B)]
    lengths = [rng.randint(1, T_) for _ in range(B)]
    mask = [[t < n for t in range(T_)] for n in lengths]
    high = 0.2 if clip == "symmetric" else 0.28
    want, want_flags = reference_losses(logps, old, adv, mask, level=level, clip=clip, low=0.2, high=high, c=2.0)
    m = torch.tensor(mask)
    losses, clipped = policy_loss(
        as_tensor(logps),
        as_tensor(old),
        as_tensor(adv),
        m,
        ratio_level=level,
        clip=clip,
        clip_eps_low=0.2,
        clip_eps_high=high,
        dual_clip_c=2.0,
    )
    assert_close(torch.where(m, losses, 0.0), want, atol=1e-12)
    assert (clipped & m).tolist() == want_flags
    assert 0 < sum(map(sum, want_flags)) < sum(lengths)  # both regimes occur


def test_token_symmetric_is_exactly_ppo_policy_loss():
    """The trainer's default loss, bit for bit: values, clipped flags and gradients."""
    g = torch.Generator().manual_seed(2)
    old = torch.randn(6, 10, generator=g) - 2.0
    delta = 0.4 * torch.randn(6, 10, generator=g)
    adv = torch.randn(6, 10, generator=g)
    mask = torch.rand(6, 10, generator=g) > 0.2
    results = []
    for new in (True, False):
        logps = (old + delta).requires_grad_(True)
        if new:
            losses, clipped = policy_loss(logps, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2)
        else:
            losses, clipped = ppo_policy_loss(logps, old, adv, 0.2)
        torch.where(mask, losses, 0.0).sum().backward()
        results.append((losses.detach(), clipped, logps.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][1].any() and not results[0][1].all()


def test_log_ratio_clamp():
    # float32, log-ratio 100: exp overflows to inf, and with A = -1 the loss -A r is inf. Clamped at 20 the ratio
    # is exp(20) = 4.85e8 and no gradient flows (the clamp is saturated). At -30 with A = +1 the clamped ratio is
    # exp(-20): loss max(-exp(-20), -0.8) = -exp(-20) = -2.06e-9.
    old = torch.zeros(1, 2)
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    logps = torch.tensor([[100.0, -30.0]], requires_grad=True)
    losses, _ = policy_loss(logps, old, adv, mask, log_ratio_clamp=20.0)
    losses.sum().backward()
    assert losses[0, 0].item() == pytest.approx(math.exp(20), rel=1e-6)
    assert losses[0, 1].item() == pytest.approx(-math.exp(-20), rel=1e-5)
    assert logps.grad.tolist() == [[0.0, 0.0]]
    for off in (None, 0.0):
        unclamped, _ = policy_loss(logps.detach(), old, adv, mask, log_ratio_clamp=off)
        assert math.isinf(unclamped[0, 0].item())
        assert unclamped[0, 1].item() == pytest.approx(-math.exp(-30), rel=1e-5)


def test_policy_loss_rejects_bad_options():
    x, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="symmetric.*one epsilon"):
        policy_loss(x, x, x, mask, clip="symmetric", clip_eps_low=0.2, clip_eps_high=0.28)
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss(x, x, x, mask, clip="dual", dual_clip_c=1.0)
    with pytest.raises(ValueError, match="unknown clip"):
        policy_loss(x, x, x, mask, clip="ppo")
    with pytest.raises(ValueError, match="unknown ratio_level"):
        policy_loss(x, x, x, mask, ratio_level="sentence")


# ----------------------------------------------------------------------------- loss normalisation


def test_loss_token_weights_by_hand():
    # One micro-batch of a step with 6 sequences and 12 tokens in all, max_new_tokens 4. Lengths here: 3, 1, 2.
    #   grpo   : 1 / (len_i * 6)  -> 1/18, 1/6, 1/12 on each row's tokens
    #   dapo   : 1 / 12 on every token
    #   dr_grpo: 1 / (6 * 4) = 1/24 on every token
    #   bnpo   : 1 / 6, this micro-batch's own 6 tokens
    mask = torch.tensor([[T, T, T, F_], [T, F_, F_, F_], [T, T, F_, F_]])
    counts = dict(num_seqs=6, num_tokens=12, max_new_tokens=4)
    expected = {"grpo": [1 / 18, 1 / 6, 1 / 12], "dapo": [1 / 12] * 3, "dr_grpo": [1 / 24] * 3, "bnpo": [1 / 6] * 3}
    for loss_type, per_row in expected.items():
        weights = loss_token_weights(mask, loss_type, **counts)
        want = [[w if m else 0.0 for m in row] for w, row in zip(per_row, mask.tolist())]
        assert_close(weights, want, atol=1e-7)
        assert weights.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown loss_type"):
        loss_token_weights(mask, "token_mean", **counts)


def test_loss_token_weights_over_a_whole_step_match_the_reference():
    """A step of 2 processes x 2 micro-batches of 3 sequences each, random lengths (one empty response)."""
    rng = random.Random(3)
    max_new, T_ = 6, 6
    micro = [[rng.randint(1, max_new) for _ in range(3)] for _ in range(4)]
    micro[2][1] = 0
    masks = [torch.tensor([[t < n for t in range(T_)] for n in lengths]) for lengths in micro]
    losses = [[[rng.gauss(0, 1) for _ in range(T_)] for _ in lengths] for lengths in micro]
    num_seqs = sum(len(lengths) for lengths in micro)
    num_tokens = sum(sum(lengths) for lengths in micro)
    # References: the step's loss under each normalisation, with loops.
    all_rows = [(row[:n]) for lengths, rows in zip(micro, losses) for n, row in zip(lengths, rows)]
    want = {
        "grpo": sum(sum(r) / len(r) for r in all_rows if r) / num_seqs,
        "dapo": sum(map(sum, all_rows)) / num_tokens,
        "dr_grpo": sum(map(sum, all_rows)) / (num_seqs * max_new),
        # bnpo: each micro-batch's token mean, averaged over the step's 4 micro-batches
        "bnpo": sum(sum(sum(row[:n]) for n, row in zip(lengths, rows)) / sum(lengths) for lengths, rows in zip(micro, losses))
        / len(micro),
    }
    for loss_type, value in want.items():
        per_micro = [
            loss_token_weights(m, loss_type, num_seqs=num_seqs, num_tokens=num_tokens, max_new_tokens=max_new) for m in masks
        ]
        total = sum(float((w.double() * as_tensor(l)).sum()) for w, l in zip(per_micro, losses))
        if loss_type == "bnpo":
            total /= len(micro)
        assert total == pytest.approx(value, rel=1e-6), loss_type
        weight_sums = [float(w.sum()) for w in per_micro]
        if loss_type == "bnpo":
            assert weight_sums == pytest.approx([1.0] * 4)
        elif loss_type == "dr_grpo":
            assert sum(weight_sums) == pytest.approx(num_tokens / (num_seqs * max_new))
        elif loss_type == "grpo":
            assert sum(weight_sums) == pytest.approx((num_seqs - 1) / num_seqs)  # the empty response counts for 0
        else:
            assert sum(weight_sums) == pytest.approx(1.0)


def test_default_weights_are_the_trainers_token_mean_scale():
    # The trainer's default (loss_type=dapo) keeps its old masked sum x grad_accum x P / global_tokens;
    # loss_token_weights(..., "dapo") is exactly mask / global_tokens, the same normalisation.
    mask = torch.tensor([[T, T, F_], [T, F_, F_]])
    weights = loss_token_weights(mask, "dapo", num_seqs=8, num_tokens=17.0, max_new_tokens=3)
    assert torch.equal(weights, mask.float() / 17.0)
    grad_accum, processes = 2, 4
    assert_close(weights * grad_accum * processes, (mask.float() * (grad_accum * processes / 17.0)).tolist(), atol=1e-7)
    assert rl.RLConfig().loss_type == "dapo"


# ----------------------------------------------------------------------------- DAPO's group filter and length penalty


def test_zero_variance_groups_by_hand():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, -1.0, -1.0, -0.5])
    assert zero_variance_groups(scores, 3).tolist() == [T, F_, T, F_]
    # pairs: (1, 1) (1, 0) (1, 0) (2, 2) (2, -1) (-1, -0.5)
    assert zero_variance_groups(scores, 2).tolist() == [T, F_, F_, T, F_, F_]


def test_overlong_penalty_by_hand():
    # DAPO eq. 13 with L_max = 8, L_cache = 4: 0 up to 4 tokens, (4 - len) / 4 from 5 to 8, -1 beyond.
    lengths = torch.tensor([0, 3, 4, 5, 6, 8, 9])
    assert overlong_penalty(lengths, 8, 4).tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # The whole budget as the buffer: (0 - len) / 8.
    assert overlong_penalty(torch.tensor([0, 2, 8]), 8, 8).tolist() == [0.0, -0.25, -1.0]
    for buffer in (0, 9):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty(lengths, 8, buffer)


# ----------------------------------------------------------------------------- config


def test_loss_fields_are_documented_and_read_from_overrides():
    new = [
        "clip",
        "clip_eps_low",
        "clip_eps_high",
        "dual_clip_c",
        "ratio_level",
        "log_ratio_clamp",
        "loss_type",
        "scale_advantages",
        "drop_zero_variance_groups",
        "overlong_buffer",
        "overlong_penalty_coef",
    ]
    docs = field_docs(rl.RLConfig)
    assert all(docs.get(name) for name in new)
    config = load_config(
        rl.GRPOConfig,
        None,
        ["clip=asymmetric", "clip_eps_high=0.28", "loss_type=dr_grpo", "scale_advantages=false", "ratio_level=sequence"],
    )
    assert config.policy_loss_options() == dict(
        ratio_level="sequence", clip="asymmetric", clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, log_ratio_clamp=20.0
    )
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(rl.RLConfig, None, ["loss_type=token_mean"])
    with pytest.raises(ValueError, match="clip=asymmetric"):
        rl.RLConfig(clip_eps_high=0.28).policy_loss_options()
    with pytest.raises(ValueError, match="drop_zero_variance_groups"):
        rl.RLConfig(algorithm="ppo", drop_zero_variance_groups=True).policy_loss_options()
    with pytest.raises(ValueError, match="overlong_buffer"):
        rl.RLConfig(max_new_tokens=8, overlong_buffer=9).policy_loss_options()


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize(
    "algorithm,fields",
    [
        # Two epochs of two minibatches: the ratios move off 1, so the clips are exercised.
        ("grpo", dict(loss_type="grpo", clip="asymmetric", clip_eps_high=0.28, ppo_epochs=2, num_minibatches=2)),
        ("grpo", dict(loss_type="dr_grpo", scale_advantages=False, ratio_level="sequence", ppo_epochs=2, num_minibatches=2)),
        ("grpo", dict(loss_type="bnpo", clip="cispo", clip_eps_high=2.0, grad_accum=2, ppo_epochs=2)),
        ("rloo", dict(clip="dual", drop_zero_variance_groups=True, overlong_buffer=4, num_minibatches=2)),
        ("ppo", dict(loss_type="grpo", ratio_level="sequence", clip="dual", ppo_epochs=2, num_minibatches=2)),
        ("reinforce", dict(loss_type="bnpo", log_ratio_clamp=0.0, num_minibatches=2, ppo_epochs=2)),
    ],
)
def test_loss_options_train_with_finite_metrics(rl_dir, algorithm, fields):
    out = rl_dir / "run"
    samples = 1 if algorithm in ("ppo", "reinforce") else 2
    rl.train(
        make_config(out, algorithm=algorithm, batch_size=4, samples_per_prompt=samples, max_steps=2, temperature=1.0, **fields)
    )
    entries = metrics(out)
    keys = set(COMMON_KEYS)
    if fields.get("drop_zero_variance_groups"):
        keys |= {RLMetric.ZERO_VARIANCE_GROUPS}
    if fields.get("overlong_buffer"):
        keys |= {RLMetric.OVERLONG_PENALTY}
    assert [e["step"] for e in entries] == [1, 2]
    assert_finite_entries(entries, keys)


SCRIPTED_REWARD = '''
def half_constant(prompts, responses, **kwargs):
    """Groups of 2 in order: groups 0, 2, ... score 1.0 for both; groups 1, 3, ... differ (by 0.5 at least)."""
    return [1.0 if (i // 2) % 2 == 0 else -float(len(r)) + 0.5 * (i % 2) for i, r in enumerate(responses)]
'''


def test_drop_zero_variance_groups_logs_the_fraction_and_drops_their_gradient(rl_dir):
    (rl_dir / "scripted_rewards.py").write_text(SCRIPTED_REWARD)
    fields = dict(
        algorithm="grpo",
        reward_model="scripted_rewards:half_constant",
        batch_size=4,
        samples_per_prompt=2,
        temperature=1.0,
        drop_zero_variance_groups=True,
    )
    out = rl_dir / "run"
    rl.train(make_config(out, max_steps=2, **fields))
    assert [e[RLMetric.ZERO_VARIANCE_GROUPS] for e in metrics(out)] == [0.5, 0.5]

    # The constant groups (rows 0-1 and 4-5) are out of the loss: give only them an advantage, and the
    # update leaves every weight as it was (no KL term, Adam's first step from zero gradients is zero).
    trainer = rl.RLTrainer(make_config(rl_dir / "direct", beta=0.0, **fields))
    scored, stats = trainer.rollout_and_score(trainer.prompts_for_step(0))
    assert stats[RLMetric.ZERO_VARIANCE_GROUPS] == 0.5
    assert scored.keep.tolist() == [F_, F_, T, T, F_, F_, T, T]
    mask = scored.rollout.response_mask
    scored.advantages = torch.where(mask & ~scored.keep[:, None], 1.0, 0.0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.update(scored)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Control: the same advantages with every row in the loss do move the weights.
    scored.keep = None
    trainer.update(scored)
    assert any(not torch.equal(before[k], trainer.model.state_dict()[k]) for k in before)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_step_normalised_loss_types_give_the_same_update_under_grad_accum(rl_dir, loss_type):
    """As tests/test_rl_train.py's grad_accum test, for the weighted path: the step's sequence and token counts
    make 6 responses in 4 micro-batches (2, 2, 1, 1) step like one batch of 6 (bnpo, a per-micro-batch mean,
    does depend on the split)."""
    from rlhfkit.modeling import models
    from tests.helpers import saved_weights

    weights = {}
    for grad_accum in (1, 4):
        out = rl_dir / f"ga{grad_accum}"
        rl.train(
            make_config(
                out,
                algorithm="reinforce",
                batch_size=6,
                grad_accum=grad_accum,
                max_steps=1,
                temperature=1.0,
                max_grad_norm=0.0,
                loss_type=loss_type,
            )
        )
        weights[grad_accum] = saved_weights(out)
    initial = models.build_tiny().state_dict()
    assert any(not torch.equal(weights[4][k], initial[k]) for k in initial)
    worst = max((weights[1][k] - weights[4][k]).abs().max().item() for k in weights[1])
    assert worst <= 1e-5, f"grad_accum=4 differs from one batch by {worst:.3g}"
