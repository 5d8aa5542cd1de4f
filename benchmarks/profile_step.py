"""Where one step's time goes: one rlhfkit step of each stage under torch.profiler, split into matmul, attention,
elementwise, optimizer and Python/framework overhead.

    python benchmarks/profile_step.py [--stages sft,reward,dpo,grpo,generate] [--model smollm2-135m] [--out FILE.json]

Each stage runs in its own fresh subprocess (the benchmarks' environment, common.BENCH_ENV) through its Python
function with the benchmarks' settings (SFT: the demo set, batch 8, max length 512; reward and DPO: 128 demo pairs,
batch 8; GRPO: 16 prompts x 2 completions of exactly 64 tokens, beta 0.04, the demo rubric as reward; generate:
rlhfkit's HFGenerator sampling 64 tokens for 128 evaluation prompts, the demo eval's batch). Training stages run 3
steps; the profiler records exactly step 3 (from the moment the loop logs step 2 to the moment it logs step 3), so
start-up, the first steps' allocations and DPO's one-off reference pass are outside it. ``generate`` profiles the
second of two calls.

How time is attributed: every operator's *self* CPU time (its own time, children excluded) goes to one category,
by the first rule that holds:

* **optimizer**: inside ``Optimizer.step`` (the profiler labels it ``Optimizer.step#AdamW.step``);
* **attention**: inside the attention kernel's forward (the script wraps rlhfkit's registered kernel and its decode
  attention in ``record_function("rlhfkit::attention")``) or inside the backward node of an op only attention uses
  here (``BmmBackward0``, ``BaddbmmBackward0``, ``SoftmaxBackward0``: the linears are ``mm``/``addmm``/oneDNN
  linears, and no other softmax runs in a step);
* **matmul**: a matrix-multiply operator (:data:`MATMUL_OPS`, or a name containing ``linear``) elsewhere: the
  linear layers, the LM head, their backward;
* **elementwise**: every other operator (norms, activations, casts and copies, the loss and log-probs, sampling).

**python/other** is the step's wall time less the operators' total self time: the Python of the loop and the
model's forward, autograd's bookkeeping, and the profiler's own overhead (the step under the profiler is printed
beside step 2's unprofiled wall time; the difference is what profiling added). Self time is wall time on the
calling thread, so a multi-threaded kernel counts once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

STAGES = ("sft", "reward", "dpo", "grpo", "generate")
CATEGORIES = ("matmul", "attention", "elementwise", "optimizer", "python/other")
ATTENTION_SCOPE = "rlhfkit::attention"
ATTENTION_BACKWARD = ("BmmBackward0", "BaddbmmBackward0", "SoftmaxBackward0")
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::dot"})
OP_PREFIXES = ("aten::", "mkldnn::", "onednn::", "prim::")


def category(name: str, ancestors: list[str]) -> str | None:
    """The category of an operator ``name`` called under ``ancestors`` (outermost first); None: not an operator
    (a scope or the autograd engine's own event, whose self time is left to python/other)."""
    if not name.startswith(OP_PREFIXES):
        return None
    if any(a.startswith("Optimizer.step") for a in ancestors):
        return "optimizer"
    for a in ancestors:
        if a == ATTENTION_SCOPE:
            return "attention"
        if a.startswith("autograd::engine::evaluate_function: ") and a.rsplit(": ", 1)[1] in ATTENTION_BACKWARD:
            return "attention"
    if name in MATMUL_OPS or "linear" in name:
        return "matmul"
    return "elementwise"


def split(events, wall_s: float) -> dict[str, float]:
    """Seconds per category of the profiled ``events`` (torch.profiler FunctionEvents) over a step of ``wall_s``."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        ancestors, parent = [], e.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        c = category(e.name, ancestors[::-1])
        if c is not None:
            out[c] += e.self_cpu_time_total / 1e6
    out["python/other"] = wall_s - sum(out[c] for c in CATEGORIES if c != "python/other")
    return out


def wrap_attention() -> None:
    """Run rlhfkit's attention kernel (training, prefill) and its decode attention inside ``ATTENTION_SCOPE``."""
    from torch.profiler import record_function
    from transformers import AttentionInterface

    from rlhfkit.data.packing import ATTENTION
    from rlhfkit.generation import fast_decode
    from rlhfkit.modeling import attention

    def scoped(fn):
        def wrapper(*args, **kwargs):
            with record_function(ATTENTION_SCOPE):
                return fn(*args, **kwargs)

        return wrapper

    AttentionInterface.register(ATTENTION, scoped(attention.packed_attention))
    fast_decode.decode_attention = scoped(fast_decode.decode_attention)


def profile_training_step(train, config, key: str, step: int = 3) -> dict:
    """``train(config)`` with the profiler on for exactly step ``step`` (between the loop's logs of ``step - 1`` and
    ``step``); the split of that step and the wall time of the unprofiled step before it."""
    from torch.profiler import ProfilerActivity, profile

    from rlhfkit.training.tracking import MetricsLogger

    prof = profile(activities=[ProfilerActivity.CPU])
    stamps: dict[int, float] = {}
    original = MetricsLogger.log

    def log(self, s, metrics):
        result = original(self, s, metrics)
        if key in metrics:
            stamps[s] = time.perf_counter()
            if s == step:
                prof.stop()
            elif s == step - 1:
                prof.start()
        return result

    MetricsLogger.log = log
    train(config)
    MetricsLogger.log = original
    if sorted(stamps)[-3:] != [step - 2, step - 1, step]:
        raise SystemExit(f"expected steps {step - 2}..{step} to be logged, got {sorted(stamps)}")
    wall = stamps[step] - stamps[step - 1]
    return {"wall_s": wall, "unprofiled_wall_s": stamps[step - 1] - stamps[step - 2], "split": split(prof.events(), wall)}


def worker(stage: str, s: dict) -> dict:
    import torch

    torch.set_num_threads(s["threads"])
    torch.manual_seed(common.SEED)
    wrap_attention()
    out_dir = str(Path(s["tmp"]) / stage)
    train_kwargs = common.rlhfkit_train_kwargs(
        {"steps": 3}, out_dir=out_dir, batch_size=8, lr=1e-5, schedule="constant", config_cls=None
    )
    pairs = dict(model=s["model_dir"], precision="bf16", data=s["pairs"], eval_fraction=0.0, max_length=512)
    if stage == "sft":
        from rlhfkit.sft import SFTConfig, train

        config = SFTConfig(
            **train_kwargs, model=s["model_dir"], data=s["sft"], eval_fraction=0.0, max_length=512, precision="bf16"
        )
        return profile_training_step(train, config, "tokens_seen")
    if stage == "reward":
        from rlhfkit.reward import RewardConfig, train

        return profile_training_step(train, RewardConfig(**train_kwargs, **pairs, normalize=False), "tokens_seen")
    if stage == "dpo":
        from rlhfkit.dpo import DPOConfig, train

        return profile_training_step(train, DPOConfig(**train_kwargs, **pairs, beta=0.1), "tokens_seen")
    if stage == "grpo":
        from rlhfkit.rl import GRPOConfig, train

        del train_kwargs["eval_every"]
        config = GRPOConfig(
            **{**train_kwargs, "batch_size": 16},
            policy=s["model_dir"],
            reward_model="demo",
            prompts=s["prompts"],
            precision="bf16",
            generation_precision="bf16",
            samples_per_prompt=2,
            max_new_tokens=64,
            temperature=1.0,
            beta=0.04,
            ppo_epochs=1,
            num_minibatches=1,
            log_samples=0,
        )
        common.instrument_generate([], force_length=True)  # exactly 64 tokens, as online_rl.py
        return profile_training_step(train, config, "time_step")
    return profile_generate(s)


def profile_generate(s: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from rlhfkit.data.prompts import load_prompts
    from rlhfkit.generation.rollout import GenerationOptions, HFGenerator
    from rlhfkit.modeling import models

    common.instrument_generate([], force_length=True)
    model = models.load_causal_lm(s["model_dir"])
    generator = HFGenerator(model, models.load_tokenizer(s["model_dir"], padding_side="left"), precision="bf16")
    prompts = load_prompts(s["eval_prompts"])
    options = GenerationOptions(max_new_tokens=64, temperature=0.7)
    t0 = time.perf_counter()
    generator.generate(prompts[:128], options)
    unprofiled = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        generator.generate(prompts[128:256], options)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "unprofiled_wall_s": unprofiled, "split": split(prof.events(), wall)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.partition("\n\n")[0],
        epilog=__doc__.partition("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    p.add_argument("--model", default="smollm2-135m", help="rlhfkit model spec (default smollm2-135m; tiny: a smoke test)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="", help="also write the splits as JSON here")
    args = p.parse_args(argv)
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    if bad := [x for x in stages if x not in STAGES]:
        p.error(f"unknown stages {bad}; choose from {', '.join(STAGES)}")
    common.check_load()
    results = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-profile-") as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        common.write_preference_file(pairs, 128)
        settings = {
            "model_dir": str(common.resolve_model(args.model)),
            "threads": args.threads,
            "tmp": tmp,
            "sft": str(common.demo_path("sft.jsonl")),
            "pairs": str(pairs),
            "prompts": str(common.demo_path("prompts_train.jsonl")),
            "eval_prompts": str(common.demo_path("prompts_eval.jsonl")),
        }
        settings_file = Path(tmp) / "settings.json"
        settings_file.write_text(json.dumps(settings))
        env = {**os.environ, **common.BENCH_ENV, "OMP_NUM_THREADS": str(args.threads)}
        for stage in stages:
            result_file = Path(tmp) / f"{stage}.json"
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", stage, str(settings_file), str(result_file)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stdout.write((proc.stdout + proc.stderr)[-5000:])
                raise SystemExit(f"{stage} failed (exit {proc.returncode})")
            results[stage] = json.loads(result_file.read_text())
            r = results[stage]
            print(
                f"  {stage}: profiled step {r['wall_s']:.2f} s (unprofiled step before it {r['unprofiled_wall_s']:.2f} s)",
                flush=True,
            )
    rows = []
    for stage, r in results.items():
        sp = r["split"]
        rows.append(
            [
                stage,
                f"{r['unprofiled_wall_s']:.2f}",
                f"{r['wall_s']:.2f}",
                *(f"{sp[c]:.2f} ({sp[c] / r['wall_s']:.0%})" for c in CATEGORIES),
            ]
        )
    print()
    common.print_table(["stage", "step s (unprofiled)", "step s (profiled)", *(f"{c} s" for c in CATEGORIES)], rows)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        stage, settings_path, result_path = sys.argv[2:]
        Path(result_path).write_text(json.dumps(worker(stage, json.loads(Path(settings_path).read_text()))))
    else:
        main()
