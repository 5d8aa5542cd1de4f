"""The rollout sampler draws tokens with the probabilities it is given (checked by counting)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.rollout import InverseCDFSampler


def _draw(sampler: InverseCDFSampler, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Token drawn in each of ``n`` rows of the same logits; the processor must leave exactly one finite logit."""
    out = sampler(None, logits.expand(n, -1).clone())
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == 1).all() and (out[finite] == 0).all()
    return out.argmax(-1)


def test_frequencies_match_softmax_with_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0, 0.5]])
    n = 200_000
    counts = torch.bincount(_draw(InverseCDFSampler(0.7), logits, n), minlength=6).double()
    want = torch.softmax(logits[0].double() / 0.7, -1)
    # Each count is Binomial(n, p): within 5 standard deviations.
    sd = (n * want * (1 - want)).sqrt()
    assert ((counts - n * want).abs() <= 5 * sd + 1).all(), (counts / n, want)
    assert counts[4] == 0  # p ~ 1e-19


def test_zero_probability_tokens_are_never_drawn():
    torch.manual_seed(1)
    logits = torch.full((1, 50), float("-inf"))
    logits[0, 0] = float("-inf")  # first entry impossible: a draw of u = 0 must not pick it
    logits[0, [3, 17, 49]] = torch.tensor([0.0, 1.0, -1.0])
    drawn = _draw(InverseCDFSampler(1.0), logits, 20_000)
    assert set(drawn.unique().tolist()) == {3, 17, 49}


def test_top_p_keeps_the_smallest_likely_set():
    torch.manual_seed(2)
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])  # sorted: 0.5, 0.3 | 0.15, 0.05
    logits = probs.log().unsqueeze(0)
    n = 100_000
    counts = torch.bincount(_draw(InverseCDFSampler(1.0, top_p=0.75), logits, n), minlength=4).double()
    assert counts[0] == 0 and counts[3] == 0  # outside the nucleus (0.5 + 0.3 >= 0.75)
    assert abs(counts[1] / n - 0.5 / 0.8) < 0.01 and abs(counts[2] / n - 0.3 / 0.8) < 0.01


def test_temperature_zero_is_an_error():
    with pytest.raises(ValueError, match="temperature > 0"):
        InverseCDFSampler(0.0)
