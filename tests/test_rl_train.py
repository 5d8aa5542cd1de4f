"""Online RL end to end on the tiny model: learning behaviour, every algorithm, resume, outputs.

The reward is programmatic: minus the response length in characters (responses
are stripped, so whitespace counts as nothing). The random tiny policy is close
to uniform over 49k tokens at temperature 1, which gives no policy anything to
learn from in a few steps; at temperature 0.1 its logits are sharp enough that
it tends to repeat the previous token, and the last prompt token is the newline
after ``assistant``. Repeating newlines gives an empty, zero-length response, so
the policy can find the high-reward behaviour within ~10 steps.

The settings of the two learning tests were checked on seeds 0-9 (fp32, CPU):
every seed passed both assertions. The smallest rise of the score was 37
characters (PPO) and 40 (GRPO) against the 15 required; the largest
per-sequence KL was 17 (PPO) and 11 (GRPO) against the bound of 20. The RLOO and REINFORCE
settings were checked the same way (their smallest rises 33 and 20, largest KLs 17.7 and 11.0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from rlhfkit import rl
from rlhfkit.config import ConfigError, field_docs
from rlhfkit.data.io import read_jsonl_records
from rlhfkit.modeling import models
from rlhfkit.modeling.policy import load_critic
from rlhfkit.run_layout import RLMetric as M
from rlhfkit.training import loop
from tests.helpers import read_jsonl, saved_weights, write_jsonl

REWARD_MODULE = '''
def shortness(prompts, responses, **kwargs):
    """Minus the response length in characters."""
    return [-float(len(r)) for r in responses]
'''

# What every metrics.jsonl entry holds (MetricsLogger adds step and time); PPO adds its own.
COMMON_KEYS = {
    "step",
    "time",
    M.SCORE,
    M.KL,
    M.KL_K3,
    "beta",
    M.REWARD,
    M.ENTROPY,
    M.RESPONSE_LENGTH,
    M.EOS_RATE,
    M.POLICY_LOSS,
    M.CLIPFRAC,
    M.APPROX_KL,
    "lr",
}
PPO_KEYS = {M.VALUE_LOSS, M.VALUE_CLIPFRAC, M.EXPLAINED_VARIANCE}


@pytest.fixture
def rl_dir(tmp_path, monkeypatch) -> Path:
    """A working directory holding the reward module ``rl_test_rewards.py``."""
    (tmp_path / "rl_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_config(out: Path, *, config_class=rl.RLConfig, **fields) -> rl.RLConfig:
    defaults = dict(
        policy=models.TINY,
        reward_model="rl_test_rewards:shortness",
        output_dir=str(out),
        precision="fp32",
        max_new_tokens=8,
        temperature=0.1,
        lr=1e-3,
        progress=False,
        tensorboard=False,
        log_samples=1,
    )
    defaults.update(fields)
    return config_class(**defaults)


def metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def assert_finite_entries(entries: list[dict], keys: set[str]) -> None:
    for entry in entries:
        missing = keys - entry.keys()
        assert not missing, f"step {entry.get('step')}: missing {sorted(missing)}"
        bad = {k: entry[k] for k in keys if not (isinstance(entry[k], (int, float)) and math.isfinite(entry[k]))}
        assert not bad, f"step {entry['step']}: non-finite {bad}"


def assert_reward_rises_with_bounded_kl(entries: list[dict], *, steps: int, margin: float, kl_bound: float) -> None:
    scores = [e[M.SCORE] for e in entries]
    kls = [e[M.KL] for e in entries]
    assert [e["step"] for e in entries] == list(range(1, steps + 1))
    # The score's best 3-step mean must beat its first by `margin`, with the KL bounded up to there. Once the
    # policy has collapsed onto one answer (rollout entropy 0.01-0.04, often the empty one at score 0) it may drift
    # later: on an avx512_bf16 CPU PPO, NLPO and CISPO reached 0 by steps 8-10 and then drifted (KL 23.8 at step
    # 15), where on AVX2 CPUs the same seeds stayed (float rounding picks the run). Measured on PPO_LEARNING, seeds
    # 0-6: seed 1 sat at score -16 for steps 12-14 (entropy 0.01-0.04), then one update took the rollout entropy to
    # 6.0 and the KL from 11.3 to 28.7; seeds 1 and 5 drifted with whiten_advantages=false too, so the advantages'
    # whitening is not the cause. This check is weaker than the last 3 steps'.
    means = [sum(scores[i : i + 3]) / 3 for i in range(len(scores) - 2)]
    first, peak = means[0], max(range(len(means)), key=means.__getitem__)
    trace = f"scores {[round(s, 1) for s in scores]}, kl {[round(k, 1) for k in kls]}"
    assert means[peak] > first + margin, f"score rose from {first:.1f} to at best {means[peak]:.1f} (< {margin}); {trace}"
    assert max(kls[: peak + 3]) < kl_bound, f"KL reached {max(kls[: peak + 3]):.2f} >= {kl_bound} by step {peak + 3}; {trace}"


# ----------------------------------------------------------------------------- learning behaviour
#
# KL is the `kl` metric: the sum over response tokens of log pi(y_t) - log ref(y_t)
# on the sampled tokens (nats per 8-token response). Collapsing onto newlines costs
# about 10. In trial runs where the policy drifted instead of learning (lr 2e-3 to
# 3e-3) the KL reached 22 to 48 within 16 steps, so a bound of 20 tells the two apart.


PPO_LEARNING = dict(
    value="head", batch_size=16, max_steps=16, score_norm=True, lam=1.0, ppo_epochs=2, num_minibatches=2, target_kl_stop=0.1
)
"""The PPO settings under which the tiny policy learns the shortness reward in 16 steps (see the test below); NLPO's
learning test runs its masked PPO with the same."""


def update_beside_slow_loss(trainer, scored, monkeypatch, slow_loss) -> tuple[dict, list]:
    """``trainer.update(scored)`` with each backpropagated loss compared against ``slow_loss(model, scored)`` on the
    same weights (before the optimizer steps); returns the update's stats and, per backward, (loss, slow loss,
    (gradients, slow gradients))."""
    seen: list = []
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def backward(loss):
        want = slow_loss(trainer.model, scored)
        grads = torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(want, params)
        seen.append((loss.item(), want.item(), grads))
        loss.backward()

    monkeypatch.setattr(trainer.acc, "backward", backward)
    return trainer.update(scored), seen


def assert_same_loss_and_gradients(seen: list) -> None:
    """One backward, whose loss and gradients equal the slow loop's."""
    assert len(seen) == 1
    got, want, (got_grads, want_grads) = seen[0]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, rtol=1e-3, atol=1e-6 + 1e-3 * w.abs().max().item())


def test_ppo_reward_rises_while_kl_stays_bounded(rl_dir):
    # A value head on a random trunk starts out as noise, so PPO gets whitened scores
    # (the head's scale), lam = 1 (no bias from the untrained values) and two epochs
    # of two minibatches per rollout; with one epoch it needs ~25 steps. The epochs stop
    # early past an approx-KL of 0.1: without that, once every response is empty (score 0,
    # by step ~8) the policy drifted away in some runs (KL 20-24 by steps 11-16, padded
    # and packed alike; which run does depends on float rounding).
    config = make_config(rl_dir / "ppo", algorithm="ppo", seed=0, **PPO_LEARNING)
    rl.train(config)
    entries = metrics(rl_dir / "ppo")
    assert_finite_entries(entries, COMMON_KEYS | PPO_KEYS)
    assert entries[0][M.APPROX_KL] > 0.01  # minibatches after the first are scored by an updated policy
    assert_reward_rises_with_bounded_kl(entries, steps=16, margin=15.0, kl_bound=20.0)


def grpo_learning_config(out: Path, **fields) -> rl.GRPOConfig:
    """The GRPO loss variants' learning run: 4 prompts x 4 samples, 16 steps of 2 epochs of 2 minibatches."""
    settings = dict(batch_size=4, samples_per_prompt=4, max_steps=16, ppo_epochs=2, num_minibatches=2, seed=0)
    return make_config(out, config_class=rl.GRPOConfig, **{**settings, **fields})


@pytest.mark.parametrize(
    "fields",
    [
        dict(),  # the default: loss_type dapo (token mean over the batch), symmetric clip
        dict(loss_type="grpo"),  # DeepSeekMath eq. 3: mean per response, then over responses
        dict(loss_type="dr_grpo", scale_advantages=False),  # Dr.GRPO: constant normaliser, no std scaling
        dict(loss_type="bnpo"),
        dict(clip="asymmetric", clip_eps_high=0.28),  # DAPO's clip-higher
        dict(ratio_level="sequence"),  # GSPO: the length-normalised sequence ratio
        dict(clip="dual", dual_clip_c=3.0),
    ],
    ids=["dapo", "grpo", "dr_grpo", "bnpo", "clip_higher", "gspo", "dual_clip"],
)
def test_grpo_reward_rises_while_kl_stays_bounded(rl_dir, fields):
    """Every GRPO loss variant (issue 24) learns the shortness reward within the same bounds."""
    out = rl_dir / "grpo"
    config = grpo_learning_config(out, **fields)
    assert config.algorithm == "grpo" and config.beta == 0.04
    rl.train(config)
    entries = metrics(out)
    assert_finite_entries(entries, COMMON_KEYS)
    assert_reward_rises_with_bounded_kl(entries, steps=16, margin=15.0, kl_bound=20.0)


def test_cispo_reward_rises_while_kl_stays_bounded_in_two_of_three_seeds(rl_dir):
    """CISPO (clipped, stop-gradient importance weights; issue 24) learns the shortness reward within the bounds
    above in at least 2 of seeds 0-2, with the demo's approx-KL early stop (target_kl_stop 0.1).

    Why not one seed, as the other variants: CISPO keeps a gradient on every token (no trust region), and once
    every response is empty (score 0, by step ~10) the KL term alone moves the policy; some runs then drift away
    at the last steps, and which ones depends on float rounding. On a 2-core AVX2 machine, one thread as under
    pytest, clip_eps_high 2.0, seeds 0-5: without the early stop the largest KL went past 20 in 2 of 6 runs (29.4
    at step 16 for seed 0, 27.2 for seed 2), with it in 1 of 6 (seed 0); seed 0 had passed on the avx512 machine.
    Every run's score rose by 18 or more."""
    failures = []
    for seed in range(3):
        out = rl_dir / f"cispo{seed}"
        rl.train(grpo_learning_config(out, seed=seed, clip="cispo", clip_eps_high=2.0, target_kl_stop=0.1))
        entries = metrics(out)
        assert_finite_entries(entries, COMMON_KEYS)
        try:
            assert_reward_rises_with_bounded_kl(entries, steps=16, margin=15.0, kl_bound=20.0)
        except AssertionError as e:
            failures.append(f"seed {seed}: {e}")
        if seed == 1 and not failures:
            break  # two of three passed
    assert len(failures) <= 1, failures


@pytest.mark.parametrize(
    "algorithm,fields",
    [
        # GRPO's settings: groups of 4 (the leave-one-out baseline needs >= 2), the KL (k1, beta 0.05) in the
        # sequence reward. Seeds 0-9: the score rose by 33 to 53, the largest KL was 17.7 (seed 6).
        ("rloo", dict(batch_size=4, samples_per_prompt=4)),
        # Eight prompts, two responses each, advantages not whitened. Whitened, once every response is empty
        # (score 0) the advantages are the KL penalties alone, blown up to unit scale, and the policy drifted away
        # (batch 4 x 4, seed 0: KL 31 and the score back at -46 by step 16). Seeds 0-9: the score rose by 20 to
        # 52, the largest KL was 11.0. (16 x 1 and 4 x 4 had seeds that stalled, at rises of 15-18.)
        ("reinforce", dict(batch_size=8, samples_per_prompt=2, whiten_advantages=False)),
    ],
)
def test_rloo_and_reinforce_reward_rise_while_kl_stays_bounded(rl_dir, algorithm, fields):
    """The settings of the GRPO test (two epochs of two minibatches, 16 steps), the same bounds.
    With lr = 0 approx-KL stayed 0 and the score moved by 7.4 (RLOO) and 2.5 (REINFORCE), noise between the
    first and last three steps: the test failed on each."""
    config = make_config(rl_dir / algorithm, algorithm=algorithm, max_steps=16, ppo_epochs=2, num_minibatches=2, seed=0, **fields)
    rl.train(config)
    entries = metrics(rl_dir / algorithm)
    assert_finite_entries(entries, COMMON_KEYS)
    assert entries[0][M.KL] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself
    # Minibatches after the first are scored by an updated policy: approx-KL to the sampling policy is positive.
    assert entries[0][M.APPROX_KL] > 0.01
    assert_reward_rises_with_bounded_kl(entries, steps=16, margin=15.0, kl_bound=20.0)


# ----------------------------------------------------------------------------- every algorithm runs


@pytest.mark.parametrize(
    "algorithm,fields",
    [
        ("rloo", dict(samples_per_prompt=2)),
        ("reinforce", dict(gamma=0.9)),
        # One epoch and one minibatch: GRPO's fast path, whose KL and entropy come from the update.
        ("grpo", dict(samples_per_prompt=2, beta=0.04)),
    ],
)
def test_algorithms_run_with_finite_metrics(rl_dir, algorithm, fields):
    out = rl_dir / algorithm
    rl.train(make_config(out, algorithm=algorithm, batch_size=2, max_steps=3, temperature=1.0, **fields))
    entries = metrics(out)
    assert [e["step"] for e in entries] == [1, 2, 3]
    assert_finite_entries(entries, COMMON_KEYS)
    assert not PPO_KEYS & entries[-1].keys()  # no value function outside PPO
    assert not (out / "value_head.safetensors").exists()
    assert entries[0][M.KL] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself


def test_the_metrics_contract_holds_every_key_the_report_plots(rl_dir):
    """rl.py writes every RLMetric (rlhfkit.run_layout), which the report plots: a renamed key fails here, not as
    an empty plot. gold_score needs a gold scorer, value_loss ppo."""
    from rlhfkit.run_layout import RLMetric

    out = rl_dir / "contract"
    rl.train(make_config(out, algorithm="ppo", batch_size=2, max_steps=1, gold="rl_test_rewards:shortness"))
    contract = {v for k, v in vars(RLMetric).items() if k.isupper()}
    assert len(contract) == 27 and all(v.startswith(("rollout/", "update/")) for v in contract)
    optional = {RLMetric.ZERO_VARIANCE_GROUPS, RLMetric.OVERLONG_PENALTY}  # with their options (test_policy_losses)
    optional |= {RLMetric.ENSEMBLE_STD, RLMetric.ENSEMBLE_MEAN}  # an ensemble reward model (test_reward_ensemble)
    optional |= {RLMetric.SAMPLER_LOGP_DIFF, RLMetric.SAMPLER_LOGP_DIFF_MAX, RLMetric.IS_WEIGHT_MEAN}  # vLLM (test_vllm_engine)
    assert contract - optional <= metrics(out)[-1].keys()


def test_kl_coef_is_the_deprecated_name_of_beta():
    from rlhfkit.config import from_dict

    with pytest.warns(FutureWarning, match="kl_coef is deprecated.*use beta"):
        config = rl.RLConfig(kl_coef=0.2)
    assert (config.beta, config.kl_coef) == (0.2, None)
    with pytest.warns(FutureWarning, match="kl_coef is deprecated"):
        config = from_dict(rl.GRPOConfig, {"kl_coef": 0.01}, source="grpo.yaml")
    assert (config.beta, config.kl_coef) == (0.01, None)
    assert rl.RLConfig().beta == 0.05 and rl.GRPOConfig().beta == 0.04


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_beta_zero_loads_no_reference_and_trains_as_a_zero_kl_penalty_does(rl_dir, algorithm):
    """beta 0 (no adaptive control, no probe): no reference model, no reference forward, no KL metric. The
    control keeps a reference (adaptive_kl from beta 0 stays 0), so its KL term is zero: same weights."""
    from tests.helpers import saved_weights

    fields = dict(algorithm=algorithm, batch_size=2, max_steps=2, temperature=1.0, beta=0.0, seed=3)
    if algorithm == "grpo":
        fields["samples_per_prompt"] = 2
    trainer = rl.RLTrainer(make_config(rl_dir / "direct", **fields))
    assert trainer.ref is None and not trainer.config.needs_reference
    scored, stats = trainer.rollout_and_score(trainer.prompts_for_step(0))
    assert scored.ref_logps is None and M.KL not in stats
    assert M.UPDATE_KL not in trainer.update(scored)

    rl.train(make_config(rl_dir / "noref", **fields))
    entries = metrics(rl_dir / "noref")
    assert [e["step"] for e in entries] == [1, 2] and not {M.KL, M.KL_K3} & entries[-1].keys()
    assert_finite_entries(entries, COMMON_KEYS - {M.KL, M.KL_K3})
    rl.train(make_config(rl_dir / "ref", adaptive_kl=True, **fields))
    assert M.KL in metrics(rl_dir / "ref")[-1]
    noref, ref = saved_weights(rl_dir / "noref"), saved_weights(rl_dir / "ref")
    assert all(torch.allclose(noref[k], ref[k], atol=1e-6) for k in ref)


def test_ppo_outputs(rl_dir):
    """metrics.jsonl, samples.jsonl, config.yaml, checkpoints and a loadable model directory."""
    out = rl_dir / "ppo"
    trainer = rl.train(
        make_config(
            out, algorithm="ppo", batch_size=2, max_steps=2, temperature=1.0, save_every=1, keep_checkpoints=1, log_samples=2
        )
    )
    entries = metrics(out)
    assert [e["step"] for e in entries] == [1, 2]
    assert_finite_entries(entries, COMMON_KEYS | PPO_KEYS)
    # One epoch of one minibatch: the update's only forward precedes its only optimizer step, so it scores
    # the sampling policy itself: every ratio is 1 and approx-KL is 0 at every step, and neither the ratio
    # nor the values (those the rollout recorded) are clipped. (With more minibatches or epochs approx-KL is
    # positive: see the learning tests.)
    assert [e[M.APPROX_KL] for e in entries] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert [e[M.CLIPFRAC] for e in entries] == [e[M.VALUE_CLIPFRAC] for e in entries] == [0.0, 0.0]
    assert entries[-1][M.RESPONSE_LENGTH] <= 8

    samples = read_jsonl(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert all(s["score"] == -len(s["response"]) for s in samples)
    assert (out / "config.yaml").read_text().startswith("stage: ppo")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert json.loads((out / "rl_state.json").read_text())["steps"] == 2
    assert (out / "value_head.safetensors").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(out)
    trained = trainer.acc.unwrap_model(trainer.model).policy.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name].cpu()), name
    initial = models.build_tiny().state_dict()
    assert any(not torch.equal(loaded.state_dict()[k], initial[k]) for k in initial)  # it did train


def test_ppo_with_a_separate_critic(rl_dir):
    out = rl_dir / "critic"
    rl.train(make_config(out, algorithm="ppo", value="critic", batch_size=2, max_steps=2, temperature=1.0))
    entries = metrics(out)
    assert_finite_entries(entries, COMMON_KEYS | PPO_KEYS)
    assert entries[-1][M.VALUE_LOSS] > 0.0
    assert not (out / "value_head.safetensors").exists()
    # The critic started as the tiny model (critic_init empty, reward not a directory) and was trained.
    critic = AutoModelForTokenClassification.from_pretrained(out / "critic")
    initial = load_critic(models.TINY, vocab_size=critic.config.vocab_size).state_dict()
    assert critic.state_dict().keys() == initial.keys()
    assert any(not torch.equal(critic.state_dict()[k], initial[k]) for k in initial)


# ----------------------------------------------------------------------------- equivalences


class _Crash(Exception):
    pass


def straight_and_crashed_runs(rl_dir: Path, monkeypatch, fields: dict, crash_step: int) -> tuple[Path, Path]:
    """Train ``fields`` to the end in ``rl_dir/straight``, and in ``rl_dir/resumed`` until a crash while writing the
    ``crash_step`` checkpoint. Returns both directories; the caller resumes the second."""
    straight, resumed = rl_dir / "straight", rl_dir / "resumed"
    rl.train(make_config(straight, **fields))
    save = loop.Checkpointer.save

    def crash(self, step, state):
        if step == crash_step:
            raise _Crash(f"simulated crash while writing the step-{crash_step} checkpoint")
        save(self, step, state)

    with monkeypatch.context() as patch:
        patch.setattr(loop.Checkpointer, "save", crash)
        with pytest.raises(_Crash):
            rl.train(make_config(resumed, **fields))
    return straight, resumed


def assert_same_weights_and_rollouts(straight: Path, resumed: Path) -> None:
    """Bit-equal saved weights, and the same logged steps, scores and KLs."""
    a, b = saved_weights(straight), saved_weights(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    for x, y in zip(metrics(straight), metrics(resumed), strict=True):
        assert (x["step"], x[M.SCORE], x[M.KL]) == (y["step"], y[M.SCORE], y[M.KL])


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_resumed_run_equals_uninterrupted_run(rl_dir, monkeypatch, algorithm):
    """Crash at the step-4 checkpoint of a 4-step run (steps 3 and 4 logged, the last checkpoint at
    step 2), rerun the same config: same weights, and the logs hold each step once.

    Exact equality, not a tolerance: the checkpoint restores weights, optimizer,
    scheduler and RNG states, so the resumed run samples the same responses.
    """
    fields = dict(
        algorithm=algorithm,
        batch_size=2,
        samples_per_prompt=2,
        max_steps=4,
        save_every=2,
        temperature=1.0,
        ppo_epochs=2,
        num_minibatches=2,
        seed=3,
    )
    straight, resumed = straight_and_crashed_runs(rl_dir, monkeypatch, fields, crash_step=4)
    assert [e["step"] for e in metrics(resumed)] == [1, 2, 3, 4]
    assert not (resumed / "model.safetensors").exists()

    rl.train(make_config(resumed, **fields))  # resume="auto" picks up checkpoints/step-0000002

    assert_same_weights_and_rollouts(straight, resumed)
    if algorithm == "ppo":
        from safetensors.torch import load_file

        head_a, head_b = (load_file(str(d / "value_head.safetensors")) for d in (straight, resumed))
        assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    # samples.jsonl is cut back to the checkpoint's step too (steps 3 and 4 were once logged twice).
    samples = [read_jsonl_records(d / "samples.jsonl") for d in (straight, resumed)]
    assert [r["step"] for r in samples[1]] == [1, 2, 3, 4]
    assert samples[0] == samples[1]


def test_resume_refuses_a_changed_config_and_allows_max_steps_or_force(rl_dir, capsys):
    fields = dict(algorithm="reinforce", batch_size=2, save_every=2, temperature=1.0)
    out = rl_dir / "run"
    rl.train(make_config(out, max_steps=2, **fields))
    with pytest.raises(ConfigError) as info:
        rl.train(make_config(out, max_steps=4, lr=1e-4, samples_per_prompt=2, **fields))
    message = str(info.value)
    assert "lr: 0.001 -> 0.0001" in message
    assert "samples_per_prompt: 1 -> 2" in message
    assert "max_steps" not in message
    assert [e["step"] for e in metrics(out)] == [1, 2]  # refused before any step

    # More steps and more logged samples: resumed.
    capsys.readouterr()
    rl.train(make_config(out, max_steps=3, log_samples=2, **fields))
    assert f"resumed from {out / 'checkpoints' / 'step-0000002'} at step 2" in capsys.readouterr().out
    assert [e["step"] for e in metrics(out)] == [1, 2, 3]

    # resume=force: resumed from step 2 (step 3 had no checkpoint) under the new lr, the change printed.
    rl.train(make_config(out, max_steps=4, resume="force", lr=1e-4, **fields))
    printed = capsys.readouterr().out
    assert "lr: 0.001 -> 0.0001" in printed
    assert f"resumed from {out / 'checkpoints' / 'step-0000002'} at step 2" in printed
    entries = metrics(out)
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    assert [e["lr"] for e in entries] == [1e-3, 1e-3, 1e-4, 1e-4]


def test_ptx_max_length_cuts_demonstrations(rl_dir):
    long_answer = " ".join(["word"] * 60)
    data = write_jsonl(
        rl_dir / "ptx.jsonl", [{"prompt": "Tell a story.", "completion": long_answer}, {"prompt": "Hi?", "completion": "Hello."}]
    )
    trainer = rl.RLTrainer(
        make_config(rl_dir / "ptx", algorithm="reinforce", ptx_data=str(data), ptx_coef=0.5, ptx_max_length=48)
    )
    # With the chat template the two are 96 and 36 tokens: the long one is cut at ptx_max_length, the short one kept.
    assert sorted(len(example["input_ids"]) for example in trainer.ptx) == [36, 48]
    assert "ptx_max_length" in field_docs(rl.RLConfig)


def test_grad_accum_gives_the_same_update(rl_dir):
    """6 responses in 4 micro-batches (2, 2, 1, 1) step like one batch of 6.

    Ceil-sized chunks cut 6 rows into 3 micro-batches, so accelerate never reached
    its 4th and skipped the optimizer step (the gradients leaked into the next step).
    """
    weights = {}
    for grad_accum in (1, 4):
        out = rl_dir / f"ga{grad_accum}"
        rl.train(
            make_config(
                out, algorithm="reinforce", batch_size=6, grad_accum=grad_accum, max_steps=1, temperature=1.0, max_grad_norm=0.0
            )
        )
        weights[grad_accum] = saved_weights(out)
    initial = models.build_tiny().state_dict()
    assert any(not torch.equal(weights[4][k], initial[k]) for k in initial)  # the optimizer did step
    worst = max((weights[1][k] - weights[4][k]).abs().max().item() for k in weights[1])
    # 1% of one step (lr 1e-3). Adam moves every coordinate by ~lr whatever its gradient's size,
    # so on coordinates with near-zero gradients, float summation order alone shows up at ~5e-6;
    # the skipped step this guards against differs by the whole step, ~1e-3.
    assert worst <= 1e-5, f"grad_accum=4 differs from one batch by {worst:.3g}"


def test_too_few_responses_for_grad_accum_is_an_error(rl_dir):
    with pytest.raises(ValueError, match="grad_accum=4"):
        rl.RLTrainer(make_config(rl_dir / "bad", algorithm="reinforce", batch_size=3, grad_accum=4))


def test_reward_args_are_bound_to_a_scorer_reward_and_checked(rl_dir):
    from rlhfkit.rewards import load_reward

    three, ten = "one two three", " ".join(["word"] * 10)
    default = load_reward("length")(["Say it."] * 2, [three, ten])
    short = load_reward("length", args={"target_words": 3})(["Say it."] * 2, [three, ten])
    assert default[1] > default[0]  # the default 40-word target prefers ten words
    assert short[0] > short[1] and short[0] == pytest.approx(0.0)  # exactly on target: no penalty
    with pytest.raises(ValueError, match=r"no parameter 'target'.*reward_args may set: target_words, width"):
        rl.RLTrainer(make_config(rl_dir / "bad", reward_model="length", reward_args={"target": 3}))
    with pytest.raises(ValueError, match=r"no parameter 'bogus'.*gold_args may set"):
        rl.RLTrainer(make_config(rl_dir / "bad", gold="length", gold_args={"bogus": 1}))
    reward_dir = rl_dir / "rm"
    reward_dir.mkdir()
    (reward_dir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="reward_args: .* reward-model directory, which takes no arguments"):
        load_reward(str(reward_dir), args={"target_words": 3})
