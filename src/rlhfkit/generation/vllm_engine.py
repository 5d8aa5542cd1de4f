"""vLLM rollouts for GPUs: :class:`VLLMEngine` implements :class:`rlhfkit.generation.rollout.RolloutEngine`.

Colocated, as TRL's ``vllm_mode="colocate"``: each training process runs its own
vLLM engine in-process (``distributed_executor_backend="external_launcher"``) on
its own GPU, with ``gpu_memory_utilization`` of that GPU for vLLM's weights and
KV cache; the trainer keeps the rest. Before each rollout the trainer pushes the
policy's current weights (:meth:`VLLMEngine.load_weights`: LoRA adapters merged
for the push and unmerged after, HF parameter names, which vLLM's model
``load_weights`` maps onto its fused layers) and the prefix cache is reset, so a
rollout always samples from the policy being trained.

The engine returns token ids, and keeps the log-probs vLLM's sampler gave them
(``logprobs=0``, the sampled token's; ``logprobs_mode="processed_logprobs"``, of
the distribution it sampled from: after temperature and top-p, as TRL asks) in
:attr:`VLLMEngine.last_logprobs`, which :func:`rlhfkit.generation.rollout.make_rollout`
carries as ``Rollout.sampler_logps``. The trainer still recomputes the log-probs
with its own forward (logits / temperature), as on the transformers path, and
those are the loss's old log-probs. vLLM's numerics differ (bf16 kernels,
another attention), so its samples are slightly off-policy: the trainer logs the
gap (``rollout/sampler_logp_diff``, ``_max``) and, with
``RLConfig.vllm_importance_sampling`` (the default), weights each token's
policy-gradient loss by the truncated ratio ``min(pi_old / pi_vllm,
vllm_importance_sampling_cap)`` (:func:`rlhfkit.losses.truncated_is_weights`,
truncated importance sampling as in TRL). With ``top_p < 1`` vLLM's log-probs are
of the renormalised nucleus while the trainer's are of the whole softmax, so the
gap and the weights also carry that truncation (``-log`` of the nucleus mass).

Import-guarded: ``import vllm`` happens in the constructor, and a missing
package or a non-CUDA device is a clear error there. Not run in this
repository's CI (no GPU, and vLLM pulls a CUDA build of torch); the unit tests
drive this class with a stand-in ``vllm`` module that records what it is given.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import torch

from rlhfkit.generation.rollout import GenerationOptions


def named_weights_for_vllm(model):
    """``(name, tensor)`` of the policy's weights under transformers' names, for vLLM's ``load_weights``.

    A peft model must have its adapters merged first (:meth:`VLLMEngine.load_weights`
    does it): its names lose the ``base_model.model.`` prefix and ``.base_layer``,
    and the adapter matrices themselves are skipped. Tied weights appear once
    (``named_parameters`` yields a shared tensor once), as in a checkpoint.
    """
    peft_prefix = getattr(model, "prefix", None) if hasattr(model, "merge_adapter") else None
    for name, param in model.named_parameters():
        if peft_prefix is not None:
            if peft_prefix in name or "original_module" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", "")
        yield name, param.detach()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _require_cuda() -> None:
    """The engine starts before the trainer moves its models to the GPU (V6 in the GPU review), so this checks the
    machine, not where the policy is now."""
    if not torch.cuda.is_available():
        raise ValueError("rollout_engine=vllm needs a CUDA GPU, and none is available; use rollout_engine=hf")


class VLLMEngine:
    """Rollouts from a colocated vLLM engine (see the module docstring).

    ``model`` is the policy being trained (an ``AutoModelForCausalLM``, or its peft
    wrapper); ``model_dir`` the directory it was loaded from, which vLLM loads
    once for the architecture and tokenizer; its weights are then replaced by
    the policy's. ``seed + rank`` seeds vLLM (TRL seeds by process index,
    ``trl/generation/vllm_generation.py``); each row also gets its own sampling
    seed drawn from torch's global RNG, so a run (and a resumed run, which
    restores that RNG) samples the same tokens, and the k copies of a prompt
    differ. Every rank draws the same ``(world_size, rows)`` block and takes its
    own row of it: different seeds on different ranks, and the ranks' RNGs stay
    in step. ``max_model_len`` bounds vLLM's KV cache (prompt + response; left
    ``None``, vLLM takes the model's own limit, 131,072 tokens for Llama-3.1, and
    may refuse to start).
    """

    def __init__(
        self,
        model,
        tokenizer,
        model_dir: str | Path,
        *,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
    ):
        try:
            import vllm
        except ImportError:
            raise ImportError(
                "rollout_engine=vllm needs vLLM, which is not installed: `pip install vllm` (CUDA only; or use rollout_engine=hf)"
            ) from None
        _require_cuda()
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self._sampling_params = vllm.SamplingParams
        # vLLM's in-process ("external launcher") executor reads the torch.distributed variables; a
        # single process gets the one-process defaults, and a launched run already has them.
        for key, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, str(value))
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        self.llm = vllm.LLM(
            model=str(model_dir),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            distributed_executor_backend="external_launcher",
            seed=seed + rank,
            enable_prefix_caching=True,
            # TRL passes 4096: "Latest vLLM v1 memory profiler is misled by the high default value"
            # (trl/generation/vllm_generation.py); vLLM's default on H100/H200 is 16384.
            max_num_batched_tokens=4096,
            dtype="bfloat16" if torch.cuda.is_bf16_supported() else "float16",
            # The sampled tokens' log-probs (last_logprobs) of the distribution sampled from, after temperature and
            # top-p, not of the raw logits (vLLM's default); TRL asks the same for its importance sampling.
            logprobs_mode="processed_logprobs",
        )
        self.last_logprobs: torch.Tensor | None = None
        """(B, R) float32: the log-probs vLLM's sampler gave the tokens the last :meth:`generate` returned, aligned
        with them: 0.0 at padding, NaN where vLLM gave none (an EOS it left out and the engine appended, or a
        response it returned no log-probs for: the trainer leaves those tokens uncorrected). None before the first
        call."""
        self.load_weights(model)
        # TRL waits here too: each rank's engine loads on its own schedule (vllm_generation.py).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def load_weights(self, model) -> None:
        """Copy the policy's current weights into vLLM and drop its prefix cache (it was computed with the old ones)."""
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            with torch.no_grad():
                target.load_weights(named_weights_for_vllm(model))
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
        """Response ids (B, R) for left-padded ``query_ids``/``query_mask`` (B, P); right-padded with pad after EOS.

        R is the longest response (at most ``max_new_tokens``). ``temperature`` 0 is
        greedy; vLLM stops at the tokenizer's EOS, which is kept as the last token of
        a finished response (appended if vLLM left it out of ``token_ids``).
        """
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(query_ids, query_mask)]
        seeds = torch.randint(0, 2**31 - 1, (self.world_size, len(prompts)))[self.rank].tolist()
        # Stop at the tokenizer's EOS only, as the transformers engine does (not at other ids the model's
        # generation config may list as EOS).
        params = [
            self._sampling_params(
                n=1,
                temperature=options.temperature,
                top_p=options.top_p,
                max_tokens=options.max_new_tokens,
                seed=seed,
                ignore_eos=True,
                stop_token_ids=[eos],
                detokenize=False,  # token ids only; rlhfkit decodes
                logprobs=0,  # the sampled token's log-prob only (last_logprobs)
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        rows, row_logprobs = [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = _sampled_logprobs(tokens, completion.logprobs)
            if completion.finish_reason == "stop" and (not tokens or tokens[-1] != eos) and len(tokens) < options.max_new_tokens:
                tokens.append(eos)
                if logprobs is not None:
                    logprobs.append(float("nan"))  # vLLM gave none for the appended EOS
            rows.append(tokens)
            row_logprobs.append(logprobs)
        width = max((len(r) for r in rows), default=0)
        response = torch.full((len(rows), width), pad, dtype=torch.long)
        sampler = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (tokens, logprobs) in enumerate(zip(rows, row_logprobs)):
            response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            # A response without log-probs is NaN (unknown), rather than the whole batch None: all ranks stay alike.
            sampler[i, : len(tokens)] = math.nan if logprobs is None else torch.tensor(logprobs, dtype=torch.float32)
        self.last_logprobs = sampler
        return response


def _sampled_logprobs(token_ids: list[int], logprobs) -> list[float] | None:
    """The log-probs of the sampled ``token_ids`` from a vLLM ``CompletionOutput.logprobs`` (asked for with
    ``logprobs=0``): one ``{token id: Logprob}`` per generated token, the sampled one among them. None when vLLM
    returned none, or not one per token."""
    if logprobs is None or len(logprobs) != len(token_ids):
        return None
    return [float(position[token].logprob) for token, position in zip(token_ids, logprobs)]
