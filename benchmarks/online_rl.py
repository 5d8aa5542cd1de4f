"""Online RL step time: rlhfkit GRPO and RLOO vs TRL's GRPOTrainer and RLOOTrainer, same prompts and settings.

    python benchmarks/online_rl.py [--steps 8] [--warmup-steps 2] [--prompts-per-step 16] [--group-size 2]
                                   [--max-new-tokens 64] [--beta 0.04] [--lr 1e-6] [--model smollm2-135m]
                                   [--sides trl-grpo,rlhfkit-grpo,trl-rloo,rlhfkit-rloo] [--trl-attention eager,sdpa]
                                   [--stop-at-eos] [--repeats 1]

What is run. Each side trains SmolLM2-135M-Instruct (``rlhfkit.modeling.models.resolve
("smollm2-135m")``, one local directory all sides load; fp32 master weights,
bf16 autocast for training, no gradient checkpointing — TRL defaults it on, it
is set off) for ``--steps`` RL steps (default 8: 2 warm-up + 6 measured). One
step = sample ``--group-size`` (2) completions for each of ``--prompts-per-step``
(16) prompts (32 completions; temperature 1.0, top-p 1.0, no top-k, exactly
``--max-new-tokens`` (64) new tokens each, see "Equal work"), score them, forward the
frozen reference (and, where the algorithm needs them, the sampling policy's
log-probs and values), then exactly ONE optimizer step on all 32 completions
(TRL ``num_iterations=1``, ``steps_per_generation=1``, ``gradient_accumulation_steps=1``;
rlhfkit ``ppo_epochs=1``, ``num_minibatches=1``, ``grad_accum=1``). AdamW lr 1e-6,
constant schedule, no warm-up, no weight decay, grad-norm clip 1.0, clip epsilon
0.2. The KL coefficient beta is the same on every side (``--beta``, default 0.04,
rlhfkit GRPO's default; note TRL GRPO's own default is beta=0, which would skip
the reference model altogether, and TRL RLOO's is 0.05).

Sides (each a fresh subprocess with identical environment, see common.py):

* ``rlhfkit-grpo``: ``rlhfkit.rl.train(GRPOConfig)`` — group-normalised scores,
  k3 KL in the loss, token-mean loss (= TRL ``loss_type="dapo"``).
* ``trl-grpo-eager`` / ``trl-grpo-sdpa``: ``GRPOTrainer``, ``loss_type="dapo"``,
  ``scale_rewards="group"``.
* ``rlhfkit-rloo``: ``rlhfkit.rl.train(RLOOConfig)`` — leave-one-out baseline,
  k1 KL in the sequence reward, a no-grad forward of the sampling policy (old
  log-probs) and of the reference each step, then one update.
* ``trl-rloo-eager`` / ``trl-rloo-sdpa``: ``RLOOTrainer`` — the same algorithm and
  the same passes (TRL 1.16's RLOO computes the old log-probs every step, a
  sequence-level importance ratio, ``normalize_advantages=False``). The
  like-for-like RLOO line.
* ``rlhfkit-ppo`` (optional, via ``--sides``): ``rlhfkit.rl.train(RLConfig(algorithm="ppo",
  value="head"))``, compared with TRL RLOO (TRL has no PPO trainer any more): not like for like.

Every TRL trainer runs twice, with the model loaded with ``attn_implementation="eager"``
and ``"sdpa"`` (transformers' default; TRL builds its reference model with the
policy's kernel), and the faster of the two is used for the ratio
(``--trl-attention`` picks a subset).

Prompts: ``src/rlhfkit/assets/demo/prompts_train.jsonl``, rendered as one user
turn with the chat template on every side. The TRL dataset is laid out in the
order rlhfkit draws prompts (``shuffle_dataset=False``), so step ``k`` uses the
same 16 prompts everywhere. Reward: rlhfkit's built-in demo rubric
(``rlhfkit.feedback.scorers.DEMO_RUBRIC``); rlhfkit sides use it by name
(``reward_model="demo"``), TRL sides through :func:`demo_rubric`, a wrapper with
TRL's ``reward_funcs`` signature. Generation precision: TRL decodes under the
training autocast (bf16) — rlhfkit is set to the same (``generation_precision=
"bf16"``) unless ``--rlhfkit-generation-precision`` says otherwise (rlhfkit's
own default, ``auto``, follows the training precision); the autocast actually active while
decoding is recorded on every side and printed.

Equal work. Sampling differs between the libraries (different random streams),
so with stop-at-EOS the sides would decode different numbers of tokens. By
default every completion is therefore forced to its full ``--max-new-tokens``:
TRL through its own ``generation_kwargs={"min_new_tokens": N}``, rlhfkit (which
has no such option) by adding ``min_new_tokens=N`` to its ``generate`` call in
the benchmark's wrapper of ``GenerationMixin.generate``; both make transformers
mask EOS until N tokens exist. The generated tokens of every step, counted from
``generate``'s output (up to and including a first EOS), must then equal the
budget prompts x completions x max_new_tokens exactly on every side, else the
script exits 1. ``--stop-at-eos`` restores stopping at EOS; then only the
budgets are compared and the generated tokens are printed. The losses at step 2
are printed but not compared (the completions are sampled).

How it is measured. Seconds/step = wall clock from the end of the warm-up
step(s) to the end of the last step, divided by the measured steps (TRL:
``on_step_end`` callback; rlhfkit: the moment its loop logs the step). Its split,
measured the same way on every side by wrapping (not changing) methods:

* generate: wall time of ``model.generate`` (``GenerationMixin.generate``
  wrapped; one call per step on every side), which also records the number of
  decode steps, the prompt and generated tokens, and the autocast active inside the model;
* score + fwd: the rest of the rollout phase (TRL ``_generate_and_score_completions``,
  rlhfkit ``RLTrainer.rollout_and_score``, each wrapped) minus generate:
  reward, reference / old-policy / value forwards, advantages;
* update + other: step wall time minus the rollout phase: loss forward,
  backward, optimizer step, logging.

The libraries' own timings are printed as a cross-check (rlhfkit's
``time_generate`` / ``time_score_forward`` / ``time_update`` / ``time_step`` from
metrics.jsonl; TRL's ``profiling`` timings of ``transformers.generate`` and
``_prepare_inputs``, captured by hooking ``ProfilingContext._log_metrics``, and
its ``step_time`` metric). Peak RSS is each worker's
``getrusage(RUSAGE_SELF).ru_maxrss``.

Model FLOP/s = k x N x T / s with T the prompt + generated tokens of a step and
k = 2 (generate: prefill + decode) + 2 (reference forward, when beta > 0) + 6
(update) for GRPO, + 2 more for the old-policy forward of RLOO and PPO; the same
formula for both libraries of a pair, printed as a share of a bf16 matmul probe's
peak measured before and after the runs (``common.FLOPS_NOTE``).

The last line is ``ratio: R`` = TRL GRPO seconds/step (faster attention) /
rlhfkit GRPO seconds/step, the median over ``--repeats`` pairs of runs (sides
alternating; the range, and the RLOO ratio, are printed above it); above 1
means rlhfkit is faster.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import common

ALL_SIDES = ("trl-grpo", "rlhfkit-grpo", "trl-rloo", "rlhfkit-rloo", "rlhfkit-ppo")
DEFAULT_SIDES = ("trl-grpo", "rlhfkit-grpo", "trl-rloo", "rlhfkit-rloo")
TRL_BASES = ("trl-grpo", "trl-rloo")  # expanded to one side per --trl-attention kernel


def flops_k(algorithm: str, beta: float) -> float:
    """FLOPs per parameter per token of a step (see the module docstring): generate, reference, [old policy,] update."""
    return 2 + (2 if beta > 0 else 0) + (2 if algorithm in ("rloo", "ppo") else 0) + 6


def demo_rubric(prompts, completions, **kwargs) -> list[float]:
    """rlhfkit's demo rubric with TRL's reward-function signature.

    TRL passes conversational prompts (message lists) and completions (a list
    with one assistant message each); rlhfkit's reward sees the last user turn
    and the stripped response text, so this does exactly what
    ``rlhfkit.rewards.load_reward("demo")`` does.
    """
    from rlhfkit.feedback.scorers import DEMO_RUBRIC
    from rlhfkit.feedback.simulated import prompt_text

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return DEMO_RUBRIC([prompt_text(p) for p in prompts], [t.strip() for t in texts])


# ---------------------------------------------------------------- shared by workers


def load_prompts(s: dict) -> list:
    from rlhfkit.data.prompts import load_prompts as rlhfkit_load_prompts

    return rlhfkit_load_prompts(s["prompts"])


def record_rollouts(owner, name: str, durations: list[float], step_prompts: list[list[str]], prompts_of) -> None:
    """Wrap the rollout method ``owner.name``: its wall time per call, and the prompt texts it was given.

    ``prompts_of(args)`` extracts the (distinct, in order) prompts of one call;
    they are compared across sides to check every side trained on the same prompts.
    """
    from rlhfkit.feedback.simulated import prompt_text

    original = getattr(owner, name)

    def wrapper(self, *args, **kwargs):
        step_prompts.append([prompt_text(p) for p in prompts_of(args, kwargs)])
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            durations.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def per_step(s: dict, times: list[float], cpu_times: list[float], gens: list[dict], rollouts: list[float]) -> dict:
    """Window totals and the per-step split over the measured steps."""
    n, w = s["steps"], s["warmup_steps"]
    if len(times) != n or len(gens) != n or len(rollouts) != n:
        raise SystemExit(f"expected {n} steps, generate calls and rollouts; got {len(times)}, {len(gens)}, {len(rollouts)}")
    walls = [times[i] - times[i - 1] for i in range(w, n)]
    gen = [gens[i]["seconds"] for i in range(w, n)]
    roll = [rollouts[i] for i in range(w, n)]
    return {
        **common.measured(w, times, cpu_times),
        # prompt + generated tokens of the measured steps (the T of the model-FLOPs count)
        "tokens": sum(gens[i]["prompt_tokens"] + gens[i]["generated_tokens"] for i in range(w, n)),
        "step_tokens": [g["generated_tokens"] for g in gens],
        "min_new_tokens": sorted({str(g["min_new_tokens"]) for g in gens}),
        "generate": statistics.fmean(gen),
        "score_fwd": statistics.fmean(r - g for r, g in zip(roll, gen)),
        "update": statistics.fmean(x - r for x, r in zip(walls, roll)),
        "decode_steps": statistics.fmean(gens[i]["decode_steps"] for i in range(w, n)),
        "gen_prompt_tokens": statistics.fmean(gens[i]["prompt_tokens"] for i in range(w, n)),
        "gen_tokens": statistics.fmean(gens[i]["generated_tokens"] for i in range(w, n)),
        "gen_batch": gens[-1]["batch"],
        "gen_autocast": sorted({g["autocast"] for g in gens}),
        "gen_weights": sorted({g["weights"] for g in gens}),
    }


def window_mean(values: list[float], s: dict) -> float:
    return statistics.fmean(values[s["warmup_steps"] :])


# ---------------------------------------------------------------- workers


def worker_trl(s: dict, algorithm: str, attn: str) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM
    from trl.extras import profiling

    from rlhfkit.modeling import models

    if algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    P, G = s["prompts_per_step"], s["group_size"]
    prompts = load_prompts(s)
    steps = common.step_indices(len(prompts), s["steps"], P)
    rows = []
    for idx in steps:
        for i in idx:
            p = prompts[i]
            rows.append({"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p})
    dataset = datasets.Dataset.from_list(rows)

    tokenizer = models.load_tokenizer(s["model_dir"], padding_side="left")
    # TRL builds its reference model with the policy's attention kernel (model.config._attn_implementation).
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32, attn_implementation=attn)
    extra = dict(loss_type="dapo", scale_rewards="group") if algorithm == "grpo" else dict(normalize_advantages=False)
    if s["force_length"]:
        extra["generation_kwargs"] = {"min_new_tokens": s["max_new_tokens"]}  # no EOS before max_new_tokens
    config = Config(
        **common.trl_train_kwargs(Config, s, out_dir=s["out_dir"], batch_size=P * G, lr=s["lr"], schedule="constant"),
        num_generations=G,
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        beta=s["beta"],
        num_iterations=1,
        steps_per_generation=1,
        epsilon=0.2,
        shuffle_dataset=False,  # the dataset is already in rlhfkit's prompt order
        mask_truncated_completions=False,
        log_completions=False,
        **extra,
    )

    gens: list[dict] = []
    rollouts: list[float] = []
    step_prompts: list[list[str]] = []
    prof: list[tuple[str, int, float]] = []
    common.instrument_generate(gens)
    # The generation batch holds each prompt num_generations times in a row.
    record_rollouts(
        Trainer,
        "_generate_and_score_completions",
        rollouts,
        step_prompts,
        lambda a, kw: [x["prompt"] for x in (a[0] if a else kw["inputs"])][::G],
    )
    original_log = profiling.ProfilingContext._log_metrics

    def log_metrics(self, duration):
        prof.append((self.name, self.step, duration))
        return original_log(self, duration)

    profiling.ProfilingContext._log_metrics = log_metrics

    callback, times, cpu_times, _ = common.trl_step_timer()
    trainer = Trainer(
        model=model,
        reward_funcs=[demo_rubric],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    common.check_no_checkpointing(trainer)
    trainer.train()

    out = per_step(s, times, cpu_times, gens, rollouts)
    out["generation_s"] = out["generate"]  # generate does TRL's prefill and decoding
    out["decode_shape"] = common.decode_shape(trainer.model)
    ref = getattr(trainer, "ref_model", None)
    if ref is not None and common.attention_of(ref) != attn:
        raise SystemExit(f"TRL's reference model runs {common.attention_of(ref)} attention, not {attn}")
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    n, w = s["steps"], s["warmup_steps"]

    def prof_mean(suffix: str):
        per = [sum(d for name, step, d in prof if name.endswith(suffix) and step == k) for k in range(w, n)]
        return statistics.fmean(per) if any(per) else None

    ref_desc = (
        "none (beta=0)"
        if ref is None
        else f"{common.dtype_name(next(ref.parameters()).dtype)} weights under the training autocast"
    )
    gen_kwargs = config.generation_kwargs or {}
    out.update(
        {
            "step_prompts": step_prompts,
            "losses": common.trl_losses(trainer),
            "loss_name": "loss",
            "params_n": common.matmul_params(trainer.model),
            "attention": common.attention_of(trainer.model),
            "algorithm": algorithm,
            "mean_length": window_mean([h["completions/mean_length"] for h in logs], s) if len(logs) == n else None,
            "reward": window_mean([h["reward"] for h in logs], s) if len(logs) == n and "reward" in logs[0] else None,
            "lib_timing": {
                "generate (profiling)": prof_mean(".transformers.generate"),
                "_prepare_inputs (profiling)": prof_mean("._prepare_inputs"),
                "step_time (metric)": window_mean([h["step_time"] for h in logs], s)
                if len(logs) == n and "step_time" in logs[0]
                else None,
            },
            "settings": {
                "prompts per step": config.generation_batch_size // config.num_generations,
                "completions per prompt": config.num_generations,
                "completions per optimizer step": config.per_device_train_batch_size * config.gradient_accumulation_steps,
                "max new tokens": config.max_completion_length,
                "min new tokens (forced length)": gen_kwargs.get("min_new_tokens", "none (stop at EOS)"),
                "generation budget (tokens/step)": (
                    config.generation_batch_size * config.max_completion_length // (config.steps_per_generation or 1)
                ),
                "temperature / top-p / top-k": f"{config.temperature}/{config.top_p}/{config.top_k or 0}",
                "beta (KL coef)": config.beta,
                "update passes per rollout": f"{config.num_iterations} x {config.steps_per_generation} minibatch",
                "clip epsilon": config.epsilon,
                "learning rate": config.learning_rate,
                "lr schedule": common.value_str(config.lr_scheduler_type),
                "weight decay / grad clip": f"{config.weight_decay}/{config.max_grad_norm}",
                "adam betas / eps": f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_epsilon}",
                "training autocast": "bf16" if config.bf16 else ("fp16" if config.fp16 else "none"),
                "generation autocast (measured)": "/".join(out["gen_autocast"]),
                "min_new_tokens in generate (measured)": "/".join(out["min_new_tokens"]),
                "master weights": common.dtype_name(model.dtype),
                "grad checkpointing": bool(getattr(config, "activation_checkpointing", config.gradient_checkpointing)),
            },
            "implementation": {
                "algorithm": (
                    "GRPO, loss_type=dapo (token mean), scale_rewards=group, k3 KL in loss"
                    if algorithm == "grpo"
                    else "RLOO, leave-one-out baseline, k1 KL in sequence reward, old-policy forward each step, "
                    "sequence-level clipped ratio"
                ),
                "attention": common.attention_of(trainer.model),
                "forced length": (
                    "TRL's own generation_kwargs={'min_new_tokens': N}" if s["force_length"] else "no (stop at EOS)"
                ),
                "reference model": ref_desc,
                "reward": "demo_rubric (DEMO_RUBRIC wrapped for reward_funcs)",
                "optimizer": common.trl_optimizer_name(trainer),
                "version": f"trl {trl.__version__}, transformers {transformers.__version__}",
            },
        }
    )
    return out


def worker_rlhfkit(s: dict, algorithm: str) -> dict:
    import rlhfkit
    from rlhfkit.generation.rollout import HFEngine
    from rlhfkit.rl import GRPOConfig, RLConfig, RLOOConfig, RLTrainer, train

    P, G = s["prompts_per_step"], s["group_size"]
    gens: list[dict] = []
    rollouts: list[float] = []
    step_prompts: list[list[str]] = []
    common.instrument_generate(gens, force_length=s["force_length"])  # rlhfkit has no min_new_tokens option
    record_rollouts(RLTrainer, "rollout_and_score", rollouts, step_prompts, lambda a, kw: a[0] if a else kw["prompts"])
    stamps = common.stamp_rlhfkit_steps("time_step")
    # rlhfkit prefills (once per distinct prompt) before calling generate: its whole generation is HFEngine.generate.
    engine_times: list[float] = []
    common.timed(HFEngine, "generate", engine_times)
    # One generate call per rollout, as the per-call records expect: no dropping of finished rows (with forced
    # lengths no row ends early anyway; without, rlhfkit does the same row-steps as TRL's generate).
    HFEngine.compact_every = 0

    cls = {"grpo": GRPOConfig, "ppo": RLConfig, "rloo": RLOOConfig}[algorithm]
    extra = {"value": "head", "algorithm": "ppo"} if algorithm == "ppo" else {}
    config = cls(
        **common.rlhfkit_train_kwargs(s, out_dir=s["out_dir"], batch_size=P, lr=s["lr"], schedule="constant", config_cls=cls),
        policy=s["model_dir"],
        reward_model="demo",
        prompts=s["prompts"],
        precision="bf16",
        generation_precision=s["generation_precision"],
        samples_per_prompt=G,
        max_new_tokens=s["max_new_tokens"],
        temperature=s["temperature"],
        top_p=1.0,
        beta=s["beta"],
        adaptive_kl=False,
        ppo_epochs=1,
        num_minibatches=1,
        clip_eps=0.2,
        missing_eos_penalty=0.0,
        score_norm=False,
        score_clip=0.0,
        log_samples=0,
        **extra,
    )
    trainer = train(config)
    from rlhfkit.run_layout import RLMetric

    metrics, times, cpu_times = common.rlhfkit_steps(s, stamps, "time_step")
    out = per_step(s, times, cpu_times, gens, rollouts)
    if len(engine_times) != s["steps"]:
        raise SystemExit(f"expected {s['steps']} HFEngine.generate calls, got {len(engine_times)}")
    out["generation_s"] = window_mean(engine_times, s)
    col = lambda key: window_mean([m[key] for m in metrics], s) if all(key in m for m in metrics) else None  # noqa: E731
    policy = trainer.acc.unwrap_model(trainer.model).policy
    ref = trainer.ref
    out.update(
        {
            "step_prompts": step_prompts,
            "losses": [m.get(RLMetric.POLICY_LOSS) for m in metrics],
            "loss_name": RLMetric.POLICY_LOSS,
            "params_n": common.matmul_params(policy),
            "decode_shape": common.decode_shape(policy),
            "attention": common.attention_of(policy),
            "algorithm": algorithm,
            "mean_length": col(RLMetric.RESPONSE_LENGTH),
            "reward": col(RLMetric.SCORE),
            "lib_timing": {
                "time_generate": col("time_generate"),
                "time_score_forward": col("time_score_forward"),
                "time_update": col("time_update"),
                "time_step": col("time_step"),
            },
            "settings": {
                "prompts per step": config.batch_size,
                "completions per prompt": config.samples_per_prompt,
                "completions per optimizer step": config.batch_size * config.samples_per_prompt // config.num_minibatches,
                "max new tokens": config.max_new_tokens,
                "min new tokens (forced length)": (config.max_new_tokens if s["force_length"] else "none (stop at EOS)"),
                "generation budget (tokens/step)": config.batch_size * config.samples_per_prompt * config.max_new_tokens,
                "temperature / top-p / top-k": f"{config.temperature}/{config.top_p}/0",
                "beta (KL coef)": config.beta,
                "update passes per rollout": f"{config.ppo_epochs} x {config.num_minibatches} minibatch",
                "clip epsilon": config.clip_eps,
                "learning rate": config.lr,
                "lr schedule": config.lr_schedule,
                "weight decay / grad clip": f"{config.weight_decay}/{config.max_grad_norm}",
                "adam betas / eps": f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_eps}",
                "training autocast": config.precision if config.precision != "fp32" else "none",
                "generation autocast (measured)": "/".join(out["gen_autocast"]),
                "min_new_tokens in generate (measured)": "/".join(out["min_new_tokens"]),
                "master weights": common.dtype_name(next(policy.parameters()).dtype),
                "grad checkpointing": bool(config.gradient_checkpointing),
            },
            "implementation": {
                "algorithm": {
                    "grpo": "GRPO, token-mean loss, group-normalised scores, k3 KL in loss",
                    "ppo": f"PPO, value head on the policy trunk, GAE (gamma {config.gamma}, lambda {config.lam}), k1 KL in reward",
                    "rloo": "RLOO, leave-one-out baseline, k1 KL in sequence reward, old-policy forward each step, "
                    "token-level clipped ratio",
                }[algorithm],
                "attention": common.attention_of(policy),
                "forced length": (
                    "min_new_tokens added to generate by the benchmark's wrapper (rlhfkit has no option)"
                    if s["force_length"]
                    else "no (stop at EOS)"
                ),
                "reference model": "none (LoRA base)"
                if ref is None
                else f"{common.dtype_name(next(ref.parameters()).dtype)} weights (frozen copy)",
                "reward": "reward_model='demo' (DEMO_RUBRIC)",
                "optimizer": "AdamW (rlhfkit.training.optim.build_optimizer, fused=True)",
                "version": f"rlhfkit {getattr(rlhfkit, '__version__', '?')}, generation_precision={config.generation_precision}",
            },
        }
    )
    return out


WORKERS = {
    **common.trl_workers("trl-grpo", worker_trl, algorithm="grpo"),
    **common.trl_workers("trl-rloo", worker_trl, algorithm="rloo"),
    "rlhfkit-grpo": lambda s: worker_rlhfkit(s, "grpo"),
    "rlhfkit-ppo": lambda s: worker_rlhfkit(s, "ppo"),
    "rlhfkit-rloo": lambda s: worker_rlhfkit(s, "rloo"),
}


# ---------------------------------------------------------------- driver


def main(argv=None) -> None:
    p = common.make_parser(__doc__, steps=8, warmup=2)
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per RL step (default 16)")
    p.add_argument("--group-size", type=int, default=2, help="completions per prompt (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion tokens, forced unless --stop-at-eos (default 64)")
    p.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="stop completions at EOS instead of forcing max-new-tokens (then only the budgets are compared)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient, same on every side (default 0.04)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate, constant (default 1e-6)")
    p.add_argument(
        "--rlhfkit-generation-precision",
        default="bf16",
        choices=["bf16", "fp32", "auto"],
        help="rlhfkit decoding autocast (default bf16, as TRL decodes; rlhfkit's own default 'auto' is fp32 on CPU)",
    )
    p.add_argument(
        "--sides",
        default=",".join(DEFAULT_SIDES),
        help=f"comma-separated sides to run, from {', '.join(ALL_SIDES)} (default: {','.join(DEFAULT_SIDES)}); "
        "each TRL side runs once per --trl-attention kernel",
    )
    args = common.parse_args(p, argv)
    bases = [x.strip() for x in args.sides.split(",") if x.strip()]
    if unknown := [x for x in bases if x not in ALL_SIDES]:
        p.error(f"unknown sides {unknown}; choose from {', '.join(ALL_SIDES)}")
    if not {"trl-grpo", "rlhfkit-grpo"} <= set(bases):
        p.error("--sides must include trl-grpo and rlhfkit-grpo (the headline ratio)")
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (GRPO/RLOO need groups)")
    sides = [x for b in dict.fromkeys(bases) for x in (common.trl_sides(b, args) if b in TRL_BASES else [b])]
    force = not args.stop_at_eos
    measured = args.steps - args.warmup_steps
    budget = args.prompts_per_step * args.group_size * args.max_new_tokens

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-rl-") as tmp_name:
        tmp = Path(tmp_name)
        prompts = common.demo_path("prompts_train.jsonl")
        settings = common.start(
            args,
            f"prompts: {prompts}; {args.prompts_per_step} prompts x {args.group_size} completions per step, "
            f"{'exactly' if force else 'at most'} {args.max_new_tokens} new tokens, temperature {args.temperature}, "
            f"beta {args.beta}, lr {args.lr}, {args.steps} steps (first {args.warmup_steps} excluded), {args.threads} threads",
            prompts=str(prompts),
            prompts_per_step=args.prompts_per_step,
            group_size=args.group_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            beta=args.beta,
            lr=args.lr,
            generation_precision=args.rlhfkit_generation_precision,
            force_length=force,
        )
        results = common.run_sides(
            __file__,
            sides,
            settings,
            tmp,
            args,
            width=max(len(x) for x in sides),
            rates=lambda r: (
                f"{r['seconds'] / measured:6.2f} s/step (generate {r['generate']:.2f}, "
                f"score+fwd {r['score_fwd']:.2f}, update+other {r['update']:.2f})"
            ),
        )
        peak = common.final_peak(settings, args)
        bandwidth = max(settings["bandwidth_gbs"], common.measure_bandwidth(args.threads, "after the runs"))

    print()
    common.print_settings({side: results[side][0] for side in sides})
    reference = results["rlhfkit-grpo"][0]["step_prompts"]
    for side in sides:
        for r in results[side]:
            if r["step_prompts"] != reference:
                print(f"WARNING: {side} did not see the same prompts per step as rlhfkit-grpo")
    if all(r["step_prompts"] == reference for side in sides for r in results[side]):
        print(f"checked: every side got the same {args.prompts_per_step} prompts at each of the {args.steps} steps")
    print(f"note: TRL GRPOTrainer's own default beta is 0.0 (no reference model at all); here beta={args.beta} on every side")

    def sps(r: dict) -> float:
        return r["seconds"] / measured

    def step_rate(r: dict) -> float:
        return measured / r["seconds"]

    print()
    rows = []
    fmt = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    for side in sides:
        r = common.median_run(results[side], sps)
        gflops = statistics.median(common.model_gflops(x, flops_k(x["algorithm"], args.beta)) for x in results[side])
        rows.append(
            [
                side,
                f"{1 / common.median_rate(results[side], step_rate):.2f}",
                fmt(r["generate"]),
                fmt(r["score_fwd"]),
                fmt(r["update"]),
                f"{common.cpu_use(r, args.threads):.0%}",
                f"{gflops:.1f}",
                f"{gflops / peak:.1%}",
                r["attention"],
                f"{r['decode_steps']:.1f}",
                fmt(r["mean_length"], ".1f"),
                fmt(r["reward"], ".3f"),
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    common.print_table(
        [
            "side",
            "s/step",
            "generate",
            "score+fwd",
            "update+other",
            "cpu",
            "model GFLOP/s",
            "of peak",
            "attention",
            "decode steps",
            "mean len",
            "reward",
            "peak RSS MB",
        ],
        rows,
    )
    print(
        f"N = {results['rlhfkit-grpo'][0]['params_n'] / 1e6:.1f}M parameters; tokens = prompt + generated tokens of a "
        f"step; k = {flops_k('grpo', args.beta):g} for GRPO, {flops_k('rloo', args.beta):g} for RLOO/PPO; {common.FLOPS_NOTE}"
    )
    # A step's generation: TRL's `generate` (its prefill included), rlhfkit's HFEngine.generate (its shared prefill
    # included).
    common.print_generation_bounds(results, sides, sps, peak=peak, bandwidth=bandwidth)
    print("library-logged timings (mean over the measured steps, seconds):")
    for side in sides:
        r = common.median_run(results[side], sps)
        print(f"  {side}: " + ", ".join(f"{k} {fmt(v)}" for k, v in r["lib_timing"].items()))
    print()
    loss_note = ": completions are sampled, so they differ between libraries; TRL logs `loss`, rlhfkit `update/policy_loss`"
    if force:
        common.check_equal_work(
            results,
            "rlhfkit-grpo",
            warmup=args.warmup_steps,
            rtol=args.loss_rtol,
            compare_loss=False,
            what="generated tokens (forced to max_new_tokens)",
            expected_tokens=[budget] * args.steps,
            loss_note=loss_note,
        )
    else:
        print(
            "note: --stop-at-eos: generated tokens per step differ between the sides (sampling); compared below is the "
            "budget each side was configured with (prompts x completions x max_new_tokens)"
        )
        for side in sides:
            print(
                f"  {side}: generated tokens/step {' '.join(str(t) for t in results[side][0]['step_tokens'][args.warmup_steps :])}"
            )
        budgets = {
            side: [{**r, "step_tokens": [r["settings"]["generation budget (tokens/step)"]] * args.steps} for r in runs]
            for side, runs in results.items()
        }
        common.check_equal_work(
            budgets,
            "rlhfkit-grpo",
            warmup=args.warmup_steps,
            rtol=args.loss_rtol,
            compare_loss=False,
            what="generation budget (tokens)",
            expected_tokens=[budget] * args.steps,
            loss_note=loss_note,
        )
    print()
    per_step_s = dict(unit="s/step", show=lambda x: f"{1 / x:.2f}")
    trl_rloo = common.fastest_trl(results, "trl-rloo", step_rate, **per_step_s)
    if trl_rloo and "rlhfkit-ppo" in results:
        common.report_ratio(
            f"not like for like: TRL RLOO ({common.trl_attention(trl_rloo)} attention) / rlhfkit PPO seconds per step",
            common.pair_ratios(results, "rlhfkit-ppo", trl_rloo, step_rate),
        )
    if trl_rloo and "rlhfkit-rloo" in results:
        common.report_ratio(
            f"RLOO: TRL RLOOTrainer ({common.trl_attention(trl_rloo)} attention) / rlhfkit RLOO seconds per step",
            common.pair_ratios(results, "rlhfkit-rloo", trl_rloo, step_rate),
        )
    trl = common.fastest_trl(results, "trl-grpo", step_rate, **per_step_s)
    ratio = common.report_ratio(
        f"GRPO: TRL GRPOTrainer ({common.trl_attention(trl)} attention) / rlhfkit GRPO seconds per step",
        common.pair_ratios(results, "rlhfkit-grpo", trl, step_rate),
    )
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    common.run_script(WORKERS, main)
