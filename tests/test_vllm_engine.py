"""The vLLM rollout engine's own logic, driven by a stand-in ``vllm`` module (vLLM itself needs a GPU).

What is checked here is rlhfkit's side of the contract: what the engine asks
vLLM for (unpadded prompt ids, sampling settings, one seed per row), how it
turns vLLM's outputs into the padded response tensor every trainer consumes
(and its sampler log-probs into a tensor aligned with it), that vLLM's copy of
the weights is the policy's at every rollout (LoRA merged), and that the RL
update logs the sampler/trainer mismatch and applies the truncated importance
weights. That vLLM honours the same calls on a GPU is not tested here.
"""

from __future__ import annotations

import math
import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from rlhfkit import rl
from rlhfkit.generation import vllm_engine
from rlhfkit.generation.rollout import GenerationOptions, HFEngine, encode_prompts, make_rollout, response_mask_from_ids
from rlhfkit.modeling import models
from rlhfkit.run_layout import RLMetric as M

PROMPTS = ["Hi", "Tell me a long story about a cat and a dog", "Why?"]


@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeCompletion:
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, FakeLogprob]] | None = None


@dataclass
class FakeOutput:
    outputs: list[FakeCompletion]


class FakeVLLM:
    """``vllm``'s ``LLM`` and ``SamplingParams`` as the engine uses them, recording every call.

    ``generate`` draws each response from its request's seed: a length in
    ``1..max_tokens + 2`` (past ``max_tokens``: truncated, ``finish_reason``
    "length") of non-EOS tokens, ending in EOS when shorter ("stop"); with
    ``keep_eos=False`` the EOS is left out of ``token_ids``, as vLLM may do.
    ``live_policy``, when set, must hold exactly the weights last pushed.
    With ``logprobs=0`` asked, each completion carries one ``{token id: Logprob}``
    per token of ``token_ids``, the sampled token's log-prob from ``logprob_fn(prompt
    ids, token ids)`` (default :func:`fake_logprobs`) after a decoy entry for another
    token; ``with_logprobs=False`` returns none (``logprobs`` None).
    """

    def __init__(self, eos: int, keep_eos: bool = True):
        self.eos, self.keep_eos = eos, keep_eos
        self.llm_kwargs, self.requests, self.pushes, self.resets = None, [], [], 0
        self.live_policy = None
        self.logprob_fn, self.with_logprobs = fake_logprobs, True
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class Model:
            def load_weights(self, weights):
                fake.pushes.append({name: w.clone() for name, w in weights})

        class LLM:
            def __init__(self, **kwargs):
                fake.llm_kwargs = kwargs
                self.llm_engine = types.SimpleNamespace(
                    model_executor=types.SimpleNamespace(
                        driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=Model()))
                    )
                )

            def reset_prefix_cache(self):
                fake.resets += 1

            def generate(self, prompts, sampling_params, use_tqdm):
                fake.requests.append((prompts, [p.kwargs for p in sampling_params]))
                if fake.live_policy is not None:
                    pushed = fake.pushes[-1]
                    for name, param in fake.live_policy.named_parameters():
                        assert torch.equal(pushed[name], param.detach()), f"vLLM has stale {name}"
                return [fake.complete(p.kwargs, prompt["prompt_token_ids"]) for p, prompt in zip(sampling_params, prompts)]

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)

    def complete(self, params: dict, prompt_ids: list[int] = ()) -> FakeOutput:
        g = torch.Generator().manual_seed(params["seed"])
        limit = params["max_tokens"]
        length = int(torch.randint(1, limit + 3, (1,), generator=g))
        tokens = torch.randint(self.eos + 1, 100, (min(length, limit),), generator=g).tolist()
        reason = "length"
        if length < limit:
            tokens[-1] = self.eos
            tokens, reason = (tokens if self.keep_eos else tokens[:-1]), "stop"
        logprobs = None
        if self.with_logprobs and params.get("logprobs") == 0:
            values = self.logprob_fn(list(prompt_ids), tokens)
            logprobs = [{t + 1: FakeLogprob(-99.0), t: FakeLogprob(v)} for t, v in zip(tokens, values)]
        return FakeOutput([FakeCompletion(tokens, reason, logprobs)])


def fake_logprobs(prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """A stand-in sampler's log-probs: distinct for every token and position."""
    return [-0.5 - 0.01 * j - 0.001 * t for j, t in enumerate(token_ids)]


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer):
    """Installs a :class:`FakeVLLM` as ``vllm`` and lets the engine run on CPU."""

    # The engine sets the torch.distributed variables vLLM reads; restore them (absent) afterwards,
    # or later tests' accelerate would think it was launched.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)

    def install(keep_eos: bool = True) -> FakeVLLM:
        fake = FakeVLLM(tokenizer.eos_token_id, keep_eos)
        monkeypatch.setitem(sys.modules, "vllm", fake.module)
        monkeypatch.setattr(vllm_engine, "_require_cuda", lambda: None)
        return fake

    return install


@pytest.mark.parametrize("keep_eos", [True, False])
def test_requests_and_padded_responses(fake_vllm, tokenizer, keep_eos):
    fake = fake_vllm(keep_eos)
    policy = models.build_tiny()
    # SmolLM2's tokenizer pads with EOS; a distinct pad id shows whether the EOS is really there.
    ids_only = types.SimpleNamespace(eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    engine = vllm_engine.VLLMEngine(policy, ids_only, "/models/policy", gpu_memory_utilization=0.25, seed=3)
    assert fake.llm_kwargs["model"] == "/models/policy" and fake.llm_kwargs["gpu_memory_utilization"] == 0.25
    assert fake.llm_kwargs["seed"] == 3 and fake.llm_kwargs["distributed_executor_backend"] == "external_launcher"
    assert fake.llm_kwargs["max_num_batched_tokens"] == 4096
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0

    ids, mask = encode_prompts(tokenizer, PROMPTS * 4)  # left-padded, as make_rollout passes them
    options = GenerationOptions(max_new_tokens=6, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    response = engine.generate(ids, mask, options)

    prompts, params = fake.requests[-1]
    assert [p["prompt_token_ids"] for p in prompts] == [row[m].tolist() for row, m in zip(ids, mask)]
    assert len({p["seed"] for p in params}) == len(prompts)  # copies of a prompt get different samples
    for p in params:
        assert (p["temperature"], p["top_p"], p["max_tokens"], p["n"]) == (0.7, 0.9, 6, 1)
        assert p["stop_token_ids"] == [tokenizer.eos_token_id] and p["ignore_eos"]  # the tokenizer's EOS only
        assert p["detokenize"] is False
        assert p["logprobs"] == 0  # the sampled token's log-prob (engine.last_logprobs)

    # Expected rows, built from the fake's draws: EOS kept (or restored), pad to the right.
    want_rows = []
    for p in params:
        tokens = FakeVLLM(tokenizer.eos_token_id, keep_eos=True).complete({**p, "logprobs": None}).outputs[0].token_ids
        want_rows.append(tokens)
    assert response.shape == (len(prompts), max(len(r) for r in want_rows))
    for row, want in zip(response.tolist(), want_rows):
        assert row[: len(want)] == want and all(t == 0 for t in row[len(want) :])
    _, has_eos = response_mask_from_ids(response, tokenizer.eos_token_id)
    assert has_eos.tolist() == [len(r) < 6 for r in want_rows]
    assert not has_eos.all() and has_eos.any()  # both kinds occur with these seeds

    torch.manual_seed(0)
    assert torch.equal(engine.generate(ids, mask, options), response)  # the torch RNG decides the samples


def test_each_rank_samples_with_its_own_seeds_and_the_rngs_stay_in_step(fake_vllm, tokenizer):
    fake = fake_vllm()
    ids, mask = encode_prompts(tokenizer, PROMPTS * 2)
    options = GenerationOptions(max_new_tokens=6, temperature=0.7, top_p=0.9)
    seeds, states = [], []
    for rank in (0, 1):
        engine = vllm_engine.VLLMEngine(models.build_tiny(), tokenizer, "/m", seed=3, rank=rank, world_size=2)
        assert fake.llm_kwargs["seed"] == 3 + rank
        torch.manual_seed(0)
        engine.generate(ids, mask, options)
        seeds.append([p["seed"] for p in fake.requests[-1][1]])
        states.append(torch.get_rng_state())
    assert not set(seeds[0]) & set(seeds[1])  # different samples on different ranks
    assert torch.equal(states[0], states[1])  # the global RNG advanced alike: later draws agree across ranks


def test_pushed_weights_are_the_policys_with_lora_merged(fake_vllm, tokenizer):
    from peft import LoraConfig, get_peft_model

    fake = fake_vllm()
    base = models.build_tiny()
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero adapters, so merging changes the pushed weights
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
    x = torch.tensor([[1, 5, 9, 3]])
    before = policy(input_ids=x).logits
    engine = vllm_engine.VLLMEngine(policy, tokenizer, "/models/policy")

    merged = get_peft_model(models.build_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    merged.load_state_dict(policy.state_dict())
    want = dict(merged.merge_and_unload().named_parameters())
    pushed = fake.pushes[-1]
    assert pushed.keys() == want.keys()
    for name, param in want.items():
        torch.testing.assert_close(pushed[name], param.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(
        pushed["model.layers.0.self_attn.q_proj.weight"], base.model.layers[0].self_attn.q_proj.base_layer.weight
    )
    torch.testing.assert_close(policy(input_ids=x).logits, before, rtol=0, atol=1e-6)  # adapters unmerged again
    engine.load_weights(policy)
    assert len(fake.pushes) == 2 and fake.resets == 2  # every push drops the prefix cache


def test_grpo_run_samples_from_the_current_policy(fake_vllm, tmp_path):
    fake = fake_vllm()
    config = rl.GRPOConfig(
        policy=models.TINY,
        reward_model="length",
        output_dir=str(tmp_path / "out"),
        precision="fp32",
        rollout_engine="vllm",
        batch_size=2,
        samples_per_prompt=2,
        max_new_tokens=6,
        lr=1e-2,
        max_steps=3,
        progress=False,
        tensorboard=False,
        save_every=0,
        log_samples=0,
    )
    trainer = rl.RLTrainer(config)
    policy = trainer.acc.unwrap_model(trainer.model).policy
    fake.live_policy = policy  # every generate checks that vLLM holds exactly these weights
    initial = {n: p.detach().clone() for n, p in policy.named_parameters()}
    for step in range(3):
        scored, _ = trainer.rollout_and_score(trainer.prompts_for_step(step))
        trainer.update(scored)
        trainer.step_count += 1
    assert len(fake.requests) == 3 and len(fake.pushes) == 4  # at start-up, then before each rollout
    _, mask = encode_prompts(trainer.tokenizer, trainer.prompts)
    assert fake.llm_kwargs["max_model_len"] == int(mask.sum(1).max()) + 6  # the longest prompt + max_new_tokens
    assert (
        max(len(p["prompt_token_ids"]) for prompts, _ in fake.requests for p in prompts) + 6 <= fake.llm_kwargs["max_model_len"]
    )
    assert any(not torch.equal(initial[n], p) for n, p in policy.named_parameters())  # the policy did move


@pytest.mark.parametrize("keep_eos", [True, False])
def test_sampler_logprobs_come_back_aligned_with_the_responses(fake_vllm, tokenizer, keep_eos):
    fake = fake_vllm(keep_eos)
    eos = tokenizer.eos_token_id
    engine = vllm_engine.VLLMEngine(models.build_tiny(), tokenizer, "/models/policy")
    assert fake.llm_kwargs["logprobs_mode"] == "processed_logprobs"  # of the distribution sampled (temperature, top-p)
    assert engine.last_logprobs is None
    options = GenerationOptions(max_new_tokens=6, temperature=0.7, top_p=0.9)
    torch.manual_seed(0)
    rollout = make_rollout(engine, tokenizer, PROMPTS * 2, options, samples_per_prompt=2)
    got = rollout.sampler_logps
    assert got.shape == rollout.response_ids.shape and got.dtype == torch.float32
    assert all(p["logprobs"] == 0 for p in fake.requests[-1][1])
    padded = appended = 0
    for i, p in enumerate(fake.requests[-1][1]):
        completion = FakeVLLM(eos, keep_eos).complete(p).outputs[0]  # the same draw again
        n = len(completion.token_ids)
        assert rollout.response_ids[i, :n].tolist() == completion.token_ids
        assert got[i, :n].tolist() == pytest.approx(fake_logprobs([], completion.token_ids), rel=1e-6)
        if not keep_eos and completion.finish_reason == "stop":  # the engine appended the EOS: no log-prob for it
            assert rollout.response_ids[i, n] == eos and math.isnan(got[i, n])
            n, appended = n + 1, appended + 1
        assert (got[i, n:] == 0).all()  # padding
        padded += n < got.shape[1]
    assert padded and (keep_eos or appended)  # both cases occur with these seeds
    sub = rollout.select([3, 0])  # rows keep their log-probs
    assert torch.equal(sub.sampler_logps.nan_to_num(7.0), got[[3, 0]].nan_to_num(7.0))

    fake.with_logprobs = False  # vLLM returned none: unknown (NaN) on every response token, 0 on padding
    blind = make_rollout(engine, tokenizer, PROMPTS * 2, options)
    assert torch.equal(blind.sampler_logps.isnan(), blind.response_mask) and blind.response_mask.any()
    assert (blind.sampler_logps[~blind.response_mask] == 0).all() and not blind.response_mask.all()
    policy = models.build_tiny()
    models.set_attention(policy)
    hf_rollout = make_rollout(HFEngine(policy, tokenizer), tokenizer, PROMPTS, GenerationOptions(max_new_tokens=3))
    assert hf_rollout.sampler_logps is None and hf_rollout.select([1]).sampler_logps is None  # the trainer's own weights


DELTAS = (0.3, -0.2, 1.0)
"""trainer - sampler log-prob at response positions 0, 1, 2, 3, ... (cycling) in the RL test."""
WEIGHTS = (math.exp(0.3), math.exp(-0.2), 2.0)
"""min(exp(delta), cap 2) for each of DELTAS: exp(1.0) = 2.72 is truncated to the cap."""


def logprobs_off_by_deltas(policy, temperature: float):
    """A ``logprob_fn``: the policy's own log-probs of the sampled tokens (logits / temperature), minus DELTAS."""

    def fn(prompt_ids: list[int], token_ids: list[int]) -> list[float]:
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1 : -1]
        own = (logits.float() / temperature).log_softmax(-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]
        return [float(v) - DELTAS[j % 3] for j, v in enumerate(own)]

    return fn


@pytest.mark.parametrize("correct", [True, False], ids=["corrected", "uncorrected"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "old_logps"])
def test_rl_step_logs_the_mismatch_and_weights_the_policy_loss(fake_vllm, tmp_path, monkeypatch, fast, correct):
    fake = fake_vllm()
    config = rl.GRPOConfig(
        policy=models.TINY,
        reward_model="length",
        output_dir=str(tmp_path / "out"),
        precision="fp32",
        rollout_engine="vllm",
        batch_size=2,
        samples_per_prompt=2,
        max_new_tokens=6,
        temperature=0.7,
        beta=0.0,  # no KL term: the loss is the policy term alone
        ppo_epochs=1 if fast else 2,  # grpo's fast path (no old log-probs before the update) or not
        vllm_importance_sampling=correct,
        lr=1e-2,
        max_steps=1,
        progress=False,
        tensorboard=False,
        save_every=0,
        log_samples=0,
    )
    trainer = rl.RLTrainer(config)
    fake.logprob_fn = logprobs_off_by_deltas(trainer.acc.unwrap_model(trainer.model).policy, 0.7)
    losses, backward = [], trainer.acc.backward
    monkeypatch.setattr(trainer.acc, "backward", lambda loss: (losses.append(loss.item()), backward(loss))[1])
    scored, roll_stats = trainer.rollout_and_score(trainer.prompts_for_step(0))
    upd_stats = trainer.update(scored)
    assert (scored.old_logps is None) == fast

    mask, adv = scored.rollout.response_mask, scored.advantages
    position = torch.arange(mask.shape[1]).expand_as(mask)
    delta = torch.tensor(DELTAS)[position % 3]
    weight = torch.tensor(WEIGHTS)[position % 3] if correct else torch.ones(mask.shape)
    assert (position[mask] == 2).any()  # some token's weight is truncated at the cap
    # Measured where the old log-probs are: before the update, or in grpo's fast path in its single pass.
    measured, other = (upd_stats, roll_stats) if fast else (roll_stats, upd_stats)
    assert measured[M.SAMPLER_LOGP_DIFF] == pytest.approx(float(delta.abs()[mask].mean()), abs=1e-4)
    assert measured[M.SAMPLER_LOGP_DIFF_MAX] == pytest.approx(1.0, abs=1e-4)
    assert M.SAMPLER_LOGP_DIFF not in other and M.SAMPLER_LOGP_DIFF_MAX not in other
    if correct:
        assert measured[M.IS_WEIGHT_MEAN] == pytest.approx(float(weight[mask].mean()), abs=1e-4)
    else:
        assert M.IS_WEIGHT_MEAN not in measured and M.IS_WEIGHT_MEAN not in other
    # The first backward, at ratio 1: dapo's token mean of -A * w, the weights hand-computed from DELTAS.
    want = float((-adv * weight)[mask].sum() / mask.sum())
    assert losses[0] == pytest.approx(want, abs=1e-5)
    assert abs(want - float((-adv)[mask].sum() / mask.sum())) > 1e-3 or not correct  # the weights matter here
    if fast:  # one pass at ratio 1: the logged policy loss is the weighted one
        assert upd_stats[M.POLICY_LOSS] == pytest.approx(want, abs=1e-5)


def test_mismatch_statistics_by_hand():
    one_process = types.SimpleNamespace(num_processes=1)  # what _global_means and _whole_batch ask of accelerate
    trainer = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-3.0, -1.0, 9.0, 9.0]])
    sampler = torch.tensor([[-1.5, -1.0, math.nan, 0.0], [-3.0, -2.2, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # Known tokens (mask, sampler not NaN): trainer - sampler = 0.5, -1.0, 0.0, 1.2 -> |.| mean 2.7 / 4, max 1.2.
    # Weights on the 5 masked tokens: exp(0.5), exp(-1), 1 (NaN: uncorrected), exp(0) = 1, min(exp(1.2), 2) = 2.
    stats = rl._sampler_mismatch(one_process, trainer, sampler, mask, 2.0)
    assert stats[M.SAMPLER_LOGP_DIFF] == pytest.approx(0.675, abs=1e-6)
    assert stats[M.SAMPLER_LOGP_DIFF_MAX] == pytest.approx(1.2, abs=1e-6)
    assert stats[M.IS_WEIGHT_MEAN] == pytest.approx((math.exp(0.5) + math.exp(-1.0) + 1 + 1 + 2) / 5, abs=1e-6)
    assert M.IS_WEIGHT_MEAN not in rl._sampler_mismatch(one_process, trainer, sampler, mask, None)  # not applied
    unknown = torch.full_like(sampler, math.nan)  # no log-prob anywhere: no difference to report; weights all 1
    assert rl._sampler_mismatch(one_process, trainer, unknown, mask, 2.0) == {M.IS_WEIGHT_MEAN: 1.0}


def test_importance_sampling_cap_must_be_positive():
    with pytest.raises(rl.ConfigError, match="vllm_importance_sampling_cap must be > 0"):
        rl.GRPOConfig(vllm_importance_sampling_cap=0.0).policy_loss_options()


def test_missing_vllm_or_device_is_a_clear_error(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with pytest.raises(ImportError, match="pip install vllm"):
        vllm_engine.VLLMEngine(models.build_tiny(), tokenizer, "/models/policy")
    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM(tokenizer.eos_token_id).module)  # importable; no GPU here
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        vllm_engine.VLLMEngine(models.build_tiny(), tokenizer, "/models/policy")


def test_the_engine_starts_before_the_trainer_puts_a_model_on_the_device(fake_vllm, tmp_path, monkeypatch):
    """vLLM's start-up check compares the free GPU memory with its share: the reference, the reward model and the
    prepared policy must not be on the device yet (review V6). Recorded here as the order of the calls."""
    events: list[str] = []
    fake = fake_vllm()
    start = vllm_engine.VLLMEngine.__init__

    def recording_start(self, *args, **kwargs):
        events.append("engine")
        start(self, *args, **kwargs)

    monkeypatch.setattr(vllm_engine.VLLMEngine, "__init__", recording_start)
    load_reward, prepare, to = rl.load_reward, rl.prepare, torch.nn.Module.to
    monkeypatch.setattr(rl, "load_reward", lambda *a, **k: (events.append("reward " + str(k["device"])), load_reward(*a, **k))[1])
    monkeypatch.setattr(rl, "prepare", lambda *a, **k: (events.append("prepare"), prepare(*a, **k))[1])

    def recording_to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device):
            events.append(f"to {args[0]}")
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    config = rl.RLConfig(
        policy=models.TINY,
        reward_model="length",
        output_dir=str(tmp_path / "out"),
        precision="fp32",
        rollout_engine="vllm",
        max_steps=1,
        progress=False,
        tensorboard=False,
    )
    rl.RLTrainer(config)
    assert fake.pushes  # the engine started and took the policy's weights
    assert events[0] == "engine", events
    assert {"prepare", "reward cpu", "to cpu"} <= set(events[1:]), events  # the reference copy, moved after it
