"""The vLLM rollout engine's own logic, driven by a stand-in ``vllm`` module (vLLM itself needs a GPU).

What is checked here is rlhfkit's side of the contract: what the engine asks
vLLM for (unpadded prompt ids, sampling settings, one seed per row), how it
turns vLLM's outputs into the padded response tensor every trainer consumes,
and that vLLM's copy of the weights is the policy's at every rollout (LoRA
merged). That vLLM honours the same calls on a GPU is not tested here.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from rlhfkit import rl
from rlhfkit.generation import vllm_engine
from rlhfkit.generation.rollout import GenerationOptions, encode_prompts, response_mask_from_ids
from rlhfkit.modeling import models

PROMPTS = ["Hi", "Tell me a long story about a cat and a dog", "Why?"]


@dataclass
class FakeCompletion:
    token_ids: list[int]
    finish_reason: str


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
    """

    def __init__(self, eos: int, keep_eos: bool = True):
        self.eos, self.keep_eos = eos, keep_eos
        self.llm_kwargs, self.requests, self.pushes, self.resets = None, [], [], 0
        self.live_policy = None
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
                return [fake.complete(p.kwargs) for p in sampling_params]

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)

    def complete(self, params: dict) -> FakeOutput:
        g = torch.Generator().manual_seed(params["seed"])
        limit = params["max_tokens"]
        length = int(torch.randint(1, limit + 3, (1,), generator=g))
        tokens = torch.randint(self.eos + 1, 100, (min(length, limit),), generator=g).tolist()
        if length < limit:
            tokens[-1] = self.eos
            return FakeOutput([FakeCompletion(tokens if self.keep_eos else tokens[:-1], "stop")])
        return FakeOutput([FakeCompletion(tokens, "length")])


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
        monkeypatch.setattr(vllm_engine, "_require_cuda", lambda model: None)
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

    # Expected rows, built from the fake's draws: EOS kept (or restored), pad to the right.
    want_rows = []
    for p in params:
        tokens = FakeVLLM(tokenizer.eos_token_id, keep_eos=True).complete(p).outputs[0].token_ids
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


def test_missing_vllm_or_device_is_a_clear_error(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with pytest.raises(ImportError, match="pip install vllm"):
        vllm_engine.VLLMEngine(models.build_tiny(), tokenizer, "/models/policy")
    monkeypatch.setitem(sys.modules, "vllm", FakeVLLM(tokenizer.eos_token_id).module)  # importable; the model is on CPU
    with pytest.raises(ValueError, match="CUDA device, not cpu"):
        vllm_engine.VLLMEngine(models.build_tiny(), tokenizer, "/models/policy")
