"""NLPO (PPO with a masking policy's top-p action mask, Ramamurthy et al. 2022) and ``rlhfkit nlpo``.

The mask and the masked log-probs by hand and against slow loops; the ratio inside the mask by hand; the loss the
trainer backpropagates against an independent token-by-token loop; nlpo_top_p=1 is PPO; every sampled token lies in
the mask (recomputed from the masking policy's full-sequence logits); the refresh schedule; learning at bounded KL;
exact resume; the command end to end.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import cli, rl
from rlhfkit.config import ConfigError
from rlhfkit.generation.rollout import pack_token_mask, unpack_token_mask
from rlhfkit.losses import masked_token_logps, policy_loss, top_p_mask
from rlhfkit.modeling import models
from rlhfkit.modeling.policy import response_logits
from rlhfkit.run_layout import RLMetric as M
from tests.test_rl_train import (  # noqa: F401 (rl_dir is a fixture)
    COMMON_KEYS,
    PPO_KEYS,
    PPO_LEARNING,
    assert_finite_entries,
    assert_reward_rises_with_bounded_kl,
    assert_same_loss_and_gradients,
    assert_same_weights_and_rollouts,
    make_config,
    metrics,
    rl_dir,
    straight_and_crashed_runs,
    update_beside_slow_loss,
)

# ----------------------------------------------------------------------------- the mask and masked log-probs by hand

# Probabilities 0.15, 0.5, 0.05, 0.3 for tokens 0-3: by rank t1 (mass before it 0), t3 (0.5), t0 (0.8), t2 (0.95).
HAND_LOGITS = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()


@pytest.mark.parametrize(
    "top_p,kept",
    [
        (0.01, [1]),  # the most likely token alone
        (0.4, [1]),
        (0.6, [1, 3]),  # t3's mass before it, 0.5, is below 0.6
        (0.9, [0, 1, 3]),
        (0.99, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_mask_by_hand(top_p, kept):
    want = torch.zeros(4, dtype=torch.bool)
    want[kept] = True
    assert torch.equal(top_p_mask(HAND_LOGITS, top_p), want)
    assert torch.equal(top_p_mask(HAND_LOGITS[None, None], top_p), want[None, None])  # (B, T, V)


def test_top_p_mask_at_a_temperature_by_hand():
    """At temperature 0.5 the probabilities go as p^2: 0.0616, 0.6849, 0.0068, 0.2466; t0's mass before it is
    0.9315, so top-p 0.9 keeps t1 and t3 only (at temperature 1 it keeps t0 too)."""
    assert top_p_mask(HAND_LOGITS / 0.5, 0.9).tolist() == [False, True, False, True]


def test_top_p_mask_keeps_the_top_token_and_everything_at_one():
    logits = torch.tensor([[0.0, 0.0, 10.0], [-1e4, 0.0, -1e4]])
    assert top_p_mask(logits, 1e-9).tolist() == [[False, False, True], [False, True, False]]
    # top_p = 1 keeps every token even where the float cumulative sum reaches 1 before the last one.
    tiny = torch.tensor([30.0, 0.0, -30.0, -60.0])
    assert (torch.softmax(tiny, -1).cumsum(-1)[:-1] >= 1.0).any()
    assert top_p_mask(tiny, 1.0).all()
    # Ties at the edge keep the lower token id (a stable sort).
    assert top_p_mask(torch.zeros(4), 0.5).tolist() == [True, True, False, False]


def _slow_top_p(logits: list[float], top_p: float) -> list[bool]:
    """The nucleus in plain Python floats: most likely first (lower id first on ties), keep while the mass of the
    tokens before is below top_p, the first always."""
    top = max(logits)
    weights = [math.exp(z - top) for z in logits]
    probs = [w / sum(weights) for w in weights]
    keep, before = [False] * len(logits), 0.0
    for rank, v in enumerate(sorted(range(len(logits)), key=lambda i: (-probs[i], i))):
        if rank > 0 and before >= top_p:
            break
        keep[v], before = True, before + probs[v]
    return keep


def test_top_p_mask_and_masked_logps_match_slow_loops():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 50) * 2.0
    tokens = torch.randint(50, (2, 3))
    for top_p in (0.3, 0.7, 0.95):
        nucleus = top_p_mask(logits, top_p)
        keep = nucleus | torch.nn.functional.one_hot(tokens, 50).bool()  # the token in the mask, as a rollout's is
        logps, entropy = masked_token_logps(logits, keep, tokens, 0.7, with_entropy=True)
        for b in range(2):
            for t in range(3):
                row = logits[b, t].tolist()
                want_keep = _slow_top_p(row, top_p)
                assert nucleus[b, t].tolist() == want_keep
                want_keep[tokens[b, t]] = True
                kept = [z / 0.7 for z, k in zip(row, want_keep) if k]
                log_total = math.log(sum(math.exp(z) for z in kept))
                assert logps[b, t].item() == pytest.approx(row[tokens[b, t]] / 0.7 - log_total, abs=1e-5)
                want_entropy = -sum(math.exp(z - log_total) * (z - log_total) for z in kept)
                assert entropy[b, t].item() == pytest.approx(want_entropy, abs=1e-5)


def test_masked_logps_by_hand_and_their_gradient():
    """Logits 2, 1, 0, -1 with token 2 masked out: token 3's log-prob is -1 - log(e^2 + e + e^-1); the masked
    token gets no gradient (probability 0), the others ``1[v = token] - p_v``."""
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]], requires_grad=True)
    keep = torch.tensor([[[True, True, False, True]]])
    logps, entropy = masked_token_logps(logits, keep, torch.tensor([[3]]), with_entropy=True)
    total = math.exp(2) + math.exp(1) + math.exp(-1)
    assert logps.item() == pytest.approx(-1 - math.log(total), rel=1e-6)
    probs = [math.exp(2) / total, math.exp(1) / total, 0.0, math.exp(-1) / total]
    assert entropy.item() == pytest.approx(-sum(p * math.log(p) for p in probs if p > 0), rel=1e-6)
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    assert grad[0, 0].tolist() == pytest.approx([-probs[0], -probs[1], 0.0, 1 - probs[3]], abs=1e-6)
    # The entropy's gradient is finite (0 log 0 is 0 outside the mask, not NaN) and 0 on the masked logit.
    (entropy_grad,) = torch.autograd.grad(
        masked_token_logps(logits, keep, torch.tensor([[3]]), with_entropy=True)[1].sum(), logits
    )
    assert torch.isfinite(entropy_grad).all() and entropy_grad[0, 0, 2] == 0


def test_masked_logps_with_every_token_kept_are_the_log_softmax():
    torch.manual_seed(1)
    logits, tokens = torch.randn(2, 5, 30), torch.randint(30, (2, 5))
    logps, _ = masked_token_logps(logits, torch.ones(2, 5, 30, dtype=torch.bool), tokens, 0.5)
    want = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.equal(logps, want)


def test_pack_and_unpack_token_masks():
    torch.manual_seed(2)
    mask = torch.rand(3, 4, 13) < 0.5  # 13 tokens: two bytes, the second part padding
    packed = pack_token_mask(mask)
    assert packed.shape == (3, 4, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_token_mask(packed, 13), mask)
    assert pack_token_mask(torch.tensor([True] + [False] * 7 + [False, True])).tolist() == [1, 2]


# ----------------------------------------------------------------------------- the ratio inside the mask by hand


def test_ppo_ratio_inside_the_mask_by_hand():
    """Old logits 2, 1, 0, -1, new 1, 1, 3, 0, the mask keeping tokens 0 and 1, token 0 sampled: its probability
    inside the mask is e^2 / (e^2 + e) = 1 / (1 + e^-1) old and 1/2 new, so the ratio is (1 + e^-1) / 2 = 0.6839.
    Unmasked it would be 0.1025 / 0.6439 = 0.159: the masked-out token 2, whose logit rose to 3, does not count."""
    old_logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    new_logits = torch.tensor([[[1.0, 1.0, 3.0, 0.0]]], requires_grad=True)
    keep = torch.tensor([[[True, True, False, False]]])
    token = torch.tensor([[0]])
    old, _ = masked_token_logps(old_logits, keep, token)
    new, _ = masked_token_logps(new_logits, keep, token)
    ratio = (1 + math.exp(-1)) / 2
    assert torch.exp(new - old).item() == pytest.approx(ratio, rel=1e-6)
    unmasked = torch.log_softmax(new_logits, -1)[..., 0] - torch.log_softmax(old_logits, -1)[..., 0]
    assert torch.exp(unmasked).item() == pytest.approx(0.1592, abs=1e-4)
    # PPO's clipped loss on it, max(-A r, -A clip(r, 0.8, 1.2)) with r = 0.684: A = 1, -0.684 against -0.8, the
    # unclipped term; A = -1, 0.684 against 0.8, the clipped term.
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, clipped = policy_loss(new, old, torch.tensor([[1.0]]), mask)
    assert loss.item() == pytest.approx(-ratio, rel=1e-6) and not clipped.item()
    loss, clipped = policy_loss(new, old, torch.tensor([[-1.0]]), mask)
    assert loss.item() == pytest.approx(0.8, rel=1e-6) and clipped.item()


# ----------------------------------------------------------------------------- the trainer's loss, by a slow loop


def _slow_nlpo_loss(model, scored: rl.Scored, config: rl.RLConfig) -> torch.Tensor:
    """The NLPO loss of one micro-batch holding the whole rollout, token by token: PPO's clipped surrogate on the
    log-prob of the token among the kept tokens of the rollout's mask (its bytes unpacked by numpy) plus
    vf_coef x PPO's clipped value loss, summed over response tokens and divided by their number."""
    r = scored.rollout
    logits, values = response_logits(model, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    total, n, eps = torch.zeros(()), 0, config.clip_eps
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not r.response_mask[i, t]:
                continue
            bits = np.unpackbits(r.action_mask[i, t].numpy(), bitorder="little")[: logits.shape[-1]]
            kept = torch.from_numpy(np.flatnonzero(bits))
            token = int(r.response_ids[i, t])
            assert token in kept.tolist()
            logp = torch.log_softmax(logits[i, t, kept].float() / r.temperature, -1)[kept.tolist().index(token)]
            ratio = torch.exp(logp - scored.old_logps[i, t])
            adv = scored.advantages[i, t]
            total = total + torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
            v, v_old, ret = values[i, t], scored.values[i, t], scored.returns[i, t]
            v_clipped = v_old + (v - v_old).clamp(-config.value_clip_eps, config.value_clip_eps)
            total = total + config.vf_coef * 0.5 * torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2)
            n += 1
    return total / n


def test_nlpo_update_backpropagates_ppo_loss_inside_the_mask(rl_dir, monkeypatch):
    """At temperature 1 the tiny policy is near uniform, and top-p 0.5 keeps about half the vocabulary: the loss
    the update backpropagates, and its gradients, equal the slow loop's, on a rollout whose old log-probs are moved
    (ratios away from 1, some clipped)."""
    config = make_config(rl_dir / "nlpo", config_class=rl.NLPOConfig, batch_size=3, temperature=1.0, nlpo_top_p=0.5, value="head")
    trainer = rl.RLTrainer(config)
    scored, _ = trainer.rollout_and_score(trainer.prompts_for_step(0))
    r = scored.rollout
    assert r.response_mask.sum() > 3
    vocab = trainer.masking.config.vocab_size
    kept = unpack_token_mask(r.action_mask, vocab)[r.response_mask].float().mean().item()
    assert 0.3 < kept < 0.7  # a real restriction
    shift = torch.tensor([0.3, -0.3, 0.05]).repeat(r.response_mask.numel())[: r.response_mask.numel()].view_as(r.response_mask)
    scored = dataclasses.replace(scored, old_logps=scored.old_logps + shift)
    stats, seen = update_beside_slow_loss(trainer, scored, monkeypatch, lambda model, s: _slow_nlpo_loss(model, s, config))
    assert_same_loss_and_gradients(seen)
    assert stats[M.CLIPFRAC] > 0  # the moved old log-probs put some ratios outside the clip


def test_top_p_one_is_ppo(rl_dir, monkeypatch):
    """nlpo_top_p=1 keeps every token: the same rollout as ppo's (the same draws), the same old log-probs and
    advantages, and the same backpropagated loss, up to float rounding (NLPO's log-softmax against PPO's fused
    kernel). ppo with packing off: NLPO's forward is padded; nlpo with ppo's value head (its default is a critic)."""
    results = {}
    for name, cls, extra in (("ppo", rl.RLConfig, {}), ("nlpo", rl.NLPOConfig, {"nlpo_top_p": 1.0, "value": "head"})):
        config = make_config(rl_dir / name, config_class=cls, batch_size=4, temperature=1.0, packing=False, seed=5, **extra)
        trainer = rl.RLTrainer(config)
        torch.manual_seed(7)
        scored, stats = trainer.rollout_and_score(trainer.prompts_for_step(0))
        seen = []
        monkeypatch.setattr(trainer.acc, "backward", lambda loss, seen=seen: seen.append(loss.detach()))
        trainer.update(scored)
        results[name] = (scored, stats, seen[0].item())
    (ppo, ppo_stats, ppo_loss), (nlpo, nlpo_stats, nlpo_loss) = results["ppo"], results["nlpo"]
    assert ppo.rollout.action_mask is None and bool((nlpo.rollout.action_mask == 255).all())
    assert torch.equal(ppo.rollout.response_ids, nlpo.rollout.response_ids)
    assert torch.allclose(ppo.old_logps, nlpo.old_logps, atol=1e-5)
    assert torch.allclose(ppo.advantages, nlpo.advantages, atol=1e-4)
    assert nlpo_stats[M.KL] == pytest.approx(ppo_stats[M.KL], abs=1e-4)
    assert nlpo_loss == pytest.approx(ppo_loss, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- the rollout samples inside the mask


def test_every_sampled_token_lies_in_the_masking_policys_top_p_set(rl_dir):
    """A masking policy unlike the policy (another random tiny model): at temperature 1 both are near uniform, and
    top-p 0.5 keeps about half of the vocabulary, which half depends on the masking model. Every sampled token lies
    in the mask recomputed from the masking model's logits on the full sequences (no KV cache), and the rollout's
    stored masks are those (but for rounding at the edge of the nucleus). Without the mask (ppo, the same draws)
    about half the tokens fall outside it."""
    fields = dict(batch_size=4, temperature=1.0, max_new_tokens=8, seed=11)
    trainer = rl.RLTrainer(make_config(rl_dir / "nlpo", config_class=rl.NLPOConfig, nlpo_top_p=0.5, **fields))
    trainer.masking.load_state_dict(models.build_tiny(seed=1).state_dict())
    torch.manual_seed(3)
    scored, _ = trainer.rollout_and_score(trainer.prompts_for_step(0))
    r = scored.rollout
    with torch.no_grad():
        logits, _ = response_logits(trainer.masking, r.input_ids, r.attention_mask, r.response_ids.shape[1])
    recomputed = top_p_mask(logits.float() / r.temperature, 0.5)
    stored = unpack_token_mask(r.action_mask, logits.shape[-1])
    real = r.response_mask
    assert real.sum() >= 16
    inside = recomputed.gather(-1, r.response_ids[..., None]).squeeze(-1)
    assert inside[real].all()
    assert stored.gather(-1, r.response_ids[..., None]).squeeze(-1)[real].all()
    agree = (stored == recomputed)[real].float().mean().item()
    assert agree > 0.999, f"stored and recomputed masks agree on {agree:.5f} of the entries"
    assert 0.3 < recomputed[real].float().mean().item() < 0.7

    ppo = rl.RLTrainer(make_config(rl_dir / "ppo", algorithm="ppo", **fields))
    torch.manual_seed(3)
    free = ppo.rollout_and_score(ppo.prompts_for_step(0))[0].rollout
    assert free.action_mask is None
    with torch.no_grad():
        free_logits, _ = response_logits(trainer.masking, free.input_ids, free.attention_mask, free.response_ids.shape[1])
    free_inside = top_p_mask(free_logits.float(), 0.5).gather(-1, free.response_ids[..., None]).squeeze(-1)
    assert free_inside[free.response_mask].float().mean().item() < 0.8


def test_masking_policy_is_refreshed_every_nlpo_update_every_steps(rl_dir):
    """mu = 2: steps 0 and 1 mask with the starting policy, steps 2 and 3 with the policy as step 2 found it."""
    trainer = rl.RLTrainer(
        make_config(rl_dir / "nlpo", config_class=rl.NLPOConfig, batch_size=2, temperature=1.0, nlpo_update_every=2)
    )

    def policy_now() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.acc.unwrap_model(trainer.model).policy.named_parameters()}

    def masking_equals(params: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(p, params[k]) for k, p in trainer.masking.named_parameters())

    start = policy_now()
    trainer.step()
    trainer.step()
    after_two = policy_now()
    assert masking_equals(start) and not masking_equals(after_two)
    trainer.step()  # step 2 copies the policy before its rollout
    assert masking_equals(after_two) and not masking_equals(policy_now())
    trainer.step()
    assert masking_equals(after_two)


# ----------------------------------------------------------------------------- learning behaviour


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nlpo_reward_rises_while_kl_stays_bounded(rl_dir, seed):
    """PPO's learning test's settings (whitened scores, lam 1, two epochs of two minibatches, early stop at
    approx-KL 0.1), with the paper's top-p 0.9, NLPOConfig's separate critic, and a masking policy refreshed every
    2 steps.

    The KL is the masked policy's (the one that samples) to the unmasked reference: about 0.1 nats per token, the
    -log of the kept mass, already at step 1, where policy and masking policy are the reference.

    Checked (fp32, CPU, one thread), seeds 0-5: with the critic the score rose by 27 to 49 (nlpo_update_every=2;
    largest KL 15.3) and by 18 to 52 (at 5, the default; largest KL 15.4). With a value head on the policy trunk
    (value=head) seed 1 at 2 reached score 0, then fell back to -51 after the refresh of step 10 (KL 31.5): the value
    loss had moved the logits of the masked-out tokens, which get no policy gradient, and the new mask let them
    through; at 1 seed 1's KL reached 24.5. Temperature 0.1 makes the tiny model's nuclei small (at 1.0 no seed
    learned in 16 steps, with either schedule)."""
    config = make_config(
        rl_dir / "nlpo",
        config_class=rl.NLPOConfig,
        **{**PPO_LEARNING, "value": "critic"},
        nlpo_top_p=0.9,
        nlpo_update_every=2,
        seed=seed,
    )
    rl.train(config)
    entries = metrics(rl_dir / "nlpo")
    assert_finite_entries(entries, COMMON_KEYS | PPO_KEYS)
    assert entries[0][M.KL] > 0.05  # the mask alone moves the sampling policy away from the reference
    assert_reward_rises_with_bounded_kl(entries, steps=16, margin=15.0, kl_bound=20.0)


# ----------------------------------------------------------------------------- resume


def test_resumed_nlpo_run_equals_uninterrupted_run(rl_dir, monkeypatch):
    """mu = 3, checkpoints every 2 steps, a crash writing the step-6 one: the rerun resumes at step 4, whose masking
    policy is the policy as step 3 found it (refreshed at steps 0 and 3): neither the starting policy (a fresh
    trainer's copy) nor the policy at step 4, so it must come from the checkpoint. Same weights, same logged
    rollouts as the uninterrupted run."""
    fields = dict(
        config_class=rl.NLPOConfig,
        batch_size=2,
        samples_per_prompt=2,
        max_steps=6,
        save_every=2,
        temperature=1.0,
        ppo_epochs=2,
        num_minibatches=2,
        nlpo_top_p=0.6,
        nlpo_update_every=3,
        seed=3,
    )
    straight, resumed = straight_and_crashed_runs(rl_dir, monkeypatch, fields, crash_step=6)
    checkpoint = resumed / "checkpoints" / "step-0000004"
    masking = load_file(str(checkpoint / rl.NLPO_MASKING_FILE))
    policy = {k.removeprefix("policy."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    initial = models.build_tiny().state_dict()
    shared = masking.keys() & policy.keys()  # (each file keeps one name of the tied embedding and LM head)
    assert len(shared) >= len(masking) - 1
    assert any(not torch.equal(masking[k], initial[k]) for k in masking)  # not the starting policy
    assert any(not torch.equal(masking[k], policy[k]) for k in shared)  # nor the policy at step 4

    rl.train(make_config(resumed, **fields))  # resume="auto" picks up checkpoints/step-0000004

    assert_same_weights_and_rollouts(straight, resumed)


# ----------------------------------------------------------------------------- config and command


def test_nlpo_config_checks():
    config = rl.NLPOConfig()
    assert (config.algorithm, config.nlpo_top_p, config.nlpo_update_every, config.value) == ("nlpo", 0.9, 5, "critic")
    with pytest.raises(ConfigError, match="nlpo_top_p must be in"):
        rl.NLPOConfig(nlpo_top_p=0.0)
    with pytest.raises(ConfigError, match="nlpo_top_p must be in"):
        rl.NLPOConfig(nlpo_top_p=1.5)
    with pytest.raises(ConfigError, match="nlpo_update_every must be >= 1"):
        rl.NLPOConfig(nlpo_update_every=0)
    with pytest.raises(ConfigError, match="is algorithm nlpo"):
        rl.NLPOConfig(algorithm="ppo")


def test_nlpo_needs_its_config_and_the_hf_engine(rl_dir):
    with pytest.raises(ConfigError, match="takes NLPOConfig's keys"):
        rl.RLTrainer(make_config(rl_dir / "a", algorithm="nlpo"))
    with pytest.raises(ConfigError, match="needs rollout_engine=hf"):
        rl.RLTrainer(make_config(rl_dir / "b", config_class=rl.NLPOConfig, rollout_engine="vllm"))


def test_command_trains_a_loadable_model(rl_dir):
    out = rl_dir / "nlpo"
    args = [
        "policy=tiny",
        "reward_model=rl_test_rewards:shortness",
        f"output_dir={out}",
        "max_steps=2",
        "batch_size=2",
        "max_new_tokens=4",
        "precision=fp32",
        "progress=false",
        "tensorboard=false",
        "nlpo_top_p=0.8",
        "nlpo_update_every=1",
    ]
    assert cli.main(["nlpo", *args]) == 0
    entries = metrics(out)
    assert [e["step"] for e in entries] == [1, 2]
    assert_finite_entries(entries, COMMON_KEYS | PPO_KEYS)
    assert (out / "config.yaml").read_text().startswith("stage: nlpo")
    assert not (out / "value_head.safetensors").exists()  # nlpo's value function is a separate critic
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0
    assert AutoModelForCausalLM.from_pretrained(out / "critic").config.vocab_size > 0


def test_config_lists_the_nlpo_keys(capsys):
    assert cli.main(["config", "nlpo"]) == 0
    text = capsys.readouterr().out
    assert "algorithm: 'nlpo'" in text and "nlpo_top_p: 0.9" in text and "nlpo_update_every: 5" in text
