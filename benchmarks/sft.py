"""SFT training throughput: rlhfkit vs TRL's SFTTrainer, same data, same settings.

    python benchmarks/sft.py [--steps 12] [--batch-size 8] [--max-length 512] [--model smollm2-135m]

Both sides train the same model (fp32 master weights, bf16 autocast, AdamW, no
gradient checkpointing, no eval, no checkpoints, loss on completion tokens only)
on the same conversational prompt/completion examples, in the *same batches*: the
TRL dataset is laid out in the order rlhfkit's loop draws examples and read with
a sequential sampler, so step ``k`` sees the same examples, padding and
non-padding token count on both sides.

Each side runs in a fresh subprocess with the same environment (glibc malloc
settings from the Makefile, offline hub, same torch thread count). Throughput
is the number of non-padding tokens of the batches trained in steps
``warmup+1 .. steps`` divided by the wall time between the end of step
``warmup`` and the end of step ``steps``:

* TRL: a ``TrainerCallback.on_step_end`` timestamp (``time.perf_counter``) and
  the trainer's own running count of ``attention_mask.sum()`` over the batches
  it trained (``_total_train_tokens``);
* rlhfkit: the per-step ``time`` and ``tokens_seen`` (sum of
  ``attention_mask.sum()``) that its loop writes to ``metrics.jsonl``.

Both counts are checked against an independent count from the tokenized
examples. The last line printed is ``ratio: R`` = rlhfkit tokens/s / TRL tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Same process environment for both sides (see the Makefile): keep freed memory
# around instead of returning it to the OS every step; never touch the network.
BENCH_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_DISABLED": "true",
}
SIDES = ("trl", "rlhfkit")
SEED = 0
LR = 2e-5


# ---------------------------------------------------------------- set-up (parent)


def synthetic_data(path: Path, n: int = 200, seed: int = 0) -> None:
    """~n prompt/completion pairs: prompt ~20 words, completion ~50 words."""
    rng = random.Random(seed)
    words = (
        "the a of to and in is it for on with as that this be at by from or an are was can you how what why "
        "make use cook rice bread water time plan code test data model train learn write read file list "
        "good fast slow small large simple clear quick easy best first next last step way idea help question"
    ).split()
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(15, 25))).capitalize() + "?"
            completion = " ".join(rng.choice(words) for _ in range(rng.randint(40, 60))).capitalize() + "."
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def data_file(tmp: Path) -> tuple[Path, str]:
    from rlhfkit.sft import demo_data_path

    demo = demo_data_path("sft.jsonl")
    if demo.is_file():
        return demo, f"shipped demo set {demo}"
    path = tmp / "synthetic_sft.jsonl"
    synthetic_data(path)
    return path, f"synthetic ({path})"


def _convert_gguf_fallback(spec: str) -> Path:
    """Dequantise SmolLM2's GGUF into a benchmark-private cache dir.

    Only used when ``rlhfkit.models.resolve`` itself fails (transformers 5.x keeps
    an ``hf_quantizer`` on GGUF-loaded models, which ``save_pretrained`` refuses).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit import models

    gguf = models.smollm2_gguf_path()
    stat = gguf.stat()
    out = models.cache_dir() / "benchmarks" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert.", dir=out.parent))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are dequantised fp32 tensors already
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    return out


def model_dir(spec: str) -> tuple[Path, str]:
    from rlhfkit import models

    try:
        return models.resolve(spec), ""
    except Exception as e:  # noqa: BLE001 - reported, then worked around for the known spec only
        if spec != models.SMOLLM2:
            raise
        note = f"rlhfkit.models.resolve({spec!r}) failed ({type(e).__name__}: {str(e)[:120]}); used the benchmark's own GGUF conversion"
        return _convert_gguf_fallback(spec), note


# ---------------------------------------------------------------- shared by workers


def load_examples(args):
    """rlhfkit's view of the data: conversations kept after tokenisation, with their token lists."""
    from rlhfkit import models
    from rlhfkit.data.sft import load_sft_file, tokenize_sft

    tokenizer = models.load_tokenizer(args.model_dir)
    conversations = load_sft_file(args.data)
    kept, examples = [], []
    for conv in conversations:
        ex, _ = tokenize_sft(tokenizer, [conv], max_length=args.max_length, chat_template=True)
        if ex:
            kept.append(conv)
            examples.append(ex[0])
    return tokenizer, kept, examples


def step_indices(args, n: int) -> list[list[int]]:
    """Example indices of each optimizer step, exactly as rlhfkit.loop.fit draws them (one process)."""
    from rlhfkit.loop import epoch_order, shard_indices

    B, GA = args.batch_size, args.grad_accum
    steps_per_epoch = n // (B * GA)
    if steps_per_epoch == 0:
        raise SystemExit(f"{n} examples are fewer than one batch of {B * GA}")
    out = []
    for step in range(args.steps):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(n, SEED, epoch)
        idx = []
        for k in range(GA):
            idx += shard_indices(order, in_epoch * GA + k, B, 1, 0)
        out.append(idx)
    return out


def window(times: list[float], tokens_cum: list[int], warmup: int) -> tuple[float, int]:
    """(seconds, tokens) between the end of step ``warmup`` and the end of the last step."""
    return times[-1] - times[warmup - 1], tokens_cum[-1] - tokens_cum[warmup - 1]


# ---------------------------------------------------------------- workers


def worker_trl(args) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer, convs, _ = load_examples(args)
    steps = step_indices(args, len(convs))
    rows = []
    for idx in steps:
        for i in idx:
            (_, prompt), (_, completion) = convs[i].messages
            rows.append({"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": completion}]})
    dataset = datasets.Dataset.from_list(rows)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    # transformers 5.x renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing.
    no_ckpt = {"gradient_checkpointing": False}
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}:
        no_ckpt = {"activation_checkpointing": False}
    config = SFTConfig(
        **no_ckpt,
        output_dir=args.out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        train_sampling_strategy="sequential",  # the dataset is already in rlhfkit's batch order
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=SEED,
    )

    times: list[float] = []
    cpu_times: list[float] = []
    tokens_cum: list[int] = []
    holder = {}

    class StepTimer(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            times.append(time.perf_counter())
            cpu_times.append(time.process_time())
            tokens_cum.append(int(holder["trainer"]._total_train_tokens))

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
    holder["trainer"] = trainer
    model_ = trainer.model
    if getattr(model_, "is_activation_checkpointing", None) or (
        not hasattr(model_, "is_activation_checkpointing") and getattr(model_, "is_gradient_checkpointing", False)
    ):
        raise SystemExit("TRL enabled gradient checkpointing")
    prepared = trainer.train_dataset
    if len(prepared) != len(rows):
        raise SystemExit(f"TRL kept {len(prepared)} of {len(rows)} examples; batches would not match rlhfkit's")
    lengths = [len(x) for x in prepared["input_ids"]]
    targets = [sum(1 for t in x[1:] if t != -100) for x in prepared["labels"]]
    per_step = args.batch_size * args.grad_accum
    expected = [sum(lengths[s * per_step : (s + 1) * per_step]) for s in range(args.steps)]

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds, tokens = window(times, tokens_cum, args.warmup_steps)
    return {
        "side": "trl",
        "cpu_seconds": cpu_times[-1] - cpu_times[args.warmup_steps - 1],
        "version": f"trl {trl.__version__}, transformers {transformers.__version__}",
        "optimizer": f"{type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, 'optimizer') else trainer.optimizer).__name__} ({getattr(config.optim, 'value', config.optim)})",
        "step_times": [b - a for a, b in zip(times, times[1:])],
        "seconds": seconds,
        "tokens": tokens,
        "tokens_check": sum(expected[args.warmup_steps :]),
        "step_tokens": [b - a for a, b in zip([0] + tokens_cum, tokens_cum)],
        "target_tokens": sum(targets),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def worker_rlhfkit(args) -> dict:
    import rlhfkit
    from rlhfkit.sft import SFTConfig, train
    from rlhfkit.tracking import MetricsLogger, read_metrics

    _, convs, examples = load_examples(args)
    steps = step_indices(args, len(convs))
    expected = [sum(len(examples[i]["input_ids"]) for i in idx) for idx in steps]
    targets = sum(sum(1 for t in examples[i]["labels"][1:] if t != -100) for idx in steps for i in idx)

    config = SFTConfig(
        model=str(args.model_dir),
        data=str(args.data),
        eval_fraction=0.0,
        max_length=args.max_length,
        chat_template=True,
        precision="bf16",
        gradient_checkpointing=False,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        lr=LR,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_schedule="cosine",
        warmup_ratio=0.0,
        seed=SEED,
        output_dir=args.out_dir,
        save_every=0,
        eval_every=0,
        log_every=1,
        resume="never",
        progress=False,
        tensorboard=False,  # the TRL side reports to nothing either
    )
    # The loop logs every step (log_every=1) to metrics.jsonl with a wall-clock
    # "time" (ms resolution) and "tokens_seen"; note the same moment with
    # perf_counter / process_time too (wrapping the method, not changing it).
    stamps: dict[int, tuple[float, float]] = {}
    original_log = MetricsLogger.log

    def log(self, step, metrics):
        if "tokens_seen" in metrics:
            stamps[step] = (time.perf_counter(), time.process_time())
        return original_log(self, step, metrics)

    MetricsLogger.log = log
    result = train(config)
    metrics = [m for m in read_metrics(args.out_dir) if "tokens_seen" in m]
    if len(metrics) != args.steps or sorted(stamps) != [m["step"] for m in metrics]:
        raise SystemExit(f"rlhfkit logged {len(metrics)} steps, expected {args.steps}")
    times = [stamps[m["step"]][0] for m in metrics]
    cpu_times = [stamps[m["step"]][1] for m in metrics]
    tokens_cum = [int(m["tokens_seen"]) for m in metrics]
    seconds, tokens = window(times, tokens_cum, args.warmup_steps)
    jsonl_seconds = metrics[-1]["time"] - metrics[args.warmup_steps - 1]["time"]
    return {
        "side": "rlhfkit",
        "cpu_seconds": cpu_times[-1] - cpu_times[args.warmup_steps - 1],
        "jsonl_seconds": jsonl_seconds,
        "version": f"rlhfkit {getattr(rlhfkit, '__version__', '?')}",
        "optimizer": "AdamW (rlhfkit.optim.build_optimizer, foreach=True)",
        "step_times": [b - a for a, b in zip(times, times[1:])],
        "seconds": seconds,
        "tokens": tokens,
        "tokens_check": sum(expected[args.warmup_steps :]),
        "step_tokens": [b - a for a, b in zip([0] + tokens_cum, tokens_cum)],
        "target_tokens": targets,
        "first_loss": metrics[0].get("loss"),
        "last_loss": result.last_metrics.get("loss"),
    }


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    result = (worker_trl if args.worker == "trl" else worker_rlhfkit)(args)
    result["threads"] = torch.get_num_threads()
    result["env"] = {k: os.environ.get(k) for k in BENCH_ENV}
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def spawn(side: str, args, model_path: Path, data: Path, tmp: Path, run: int) -> dict:
    out_dir = tmp / f"{side}-{run}"
    result = tmp / f"{side}-{run}.json"
    log = tmp / f"{side}-{run}.log"
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", side,
        "--model-dir", str(model_path), "--data", str(data), "--out-dir", str(out_dir), "--result", str(result),
        "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size),
        "--grad-accum", str(args.grad_accum), "--max-length", str(args.max_length), "--threads", str(args.threads),
    ]
    env = {**os.environ, **BENCH_ENV, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f if not args.verbose else None, stderr=subprocess.STDOUT if not args.verbose else None)
    if proc.returncode != 0 or not result.is_file():
        sys.stdout.write(log.read_text() if log.exists() and not args.verbose else "")
        raise SystemExit(f"{side} worker failed (exit {proc.returncode}); log above")
    out = json.loads(result.read_text())
    out["wall"] = time.perf_counter() - t0
    return out


def main(argv=None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="rlhfkit model spec (default smollm2-135m)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per measured run (default 12)")
    p.add_argument("--warmup-steps", type=int, default=2, help="leading steps excluded from the rate (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per example (default 512)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating TRL/rlhfkit; the median rate is reported")
    p.add_argument("--data", default="", help="prompt/completion JSONL (default: the shipped demo set, else synthetic)")
    p.add_argument("--verbose", action="store_true", help="show the workers' output")
    # internal: worker mode
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        return run_worker(args)
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")

    os.environ.update(BENCH_ENV)
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-sft-") as tmp_name:
        tmp = Path(tmp_name)
        if args.data:
            data, data_note = Path(args.data).resolve(), args.data
            if not data.is_file():
                p.error(f"--data {args.data}: no such file")
        else:
            data, data_note = data_file(tmp)
        model_path, model_note = model_dir(args.model)
        print(f"model: {args.model} -> {model_path}")
        if model_note:
            print(f"note: {model_note}")
        print(
            f"data: {data_note}; batch {args.batch_size} x grad_accum {args.grad_accum}, max_length {args.max_length}, "
            f"{args.steps} steps (first {args.warmup_steps} excluded), bf16 autocast, {args.threads} threads"
        )
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: load average {load:.1f} before start; other processes share the CPU and will skew timings")
        results: dict[str, list[dict]] = {s: [] for s in SIDES}
        for run in range(args.repeats):
            for side in (SIDES if run % 2 == 0 else SIDES[::-1]):
                r = spawn(side, args, model_path, data, tmp, run)
                results[side].append(r)
                print(
                    f"  run {run + 1} {side:8s}: {r['tokens'] / r['seconds']:7.1f} tok/s, "
                    f"cpu use {r['cpu_seconds'] / r['seconds'] / args.threads:4.0%} of {args.threads} threads, "
                    f"step times {' '.join(f'{t:.2f}' for t in r['step_times'])} s  ({r['wall']:.0f} s wall)",
                    flush=True,
                )

    for side in SIDES:
        for r in results[side]:
            if r["tokens"] != r["tokens_check"]:
                print(f"WARNING: {side} trained {r['tokens']} tokens in the window, the tokenized examples say {r['tokens_check']}")
    a, b = results["trl"][0], results["rlhfkit"][0]
    if a["step_tokens"] != b["step_tokens"]:
        print(f"note: per-step token counts differ: trl {a['step_tokens']} vs rlhfkit {b['step_tokens']}")

    rate = {s: statistics.median(r["tokens"] / r["seconds"] for r in results[s]) for s in SIDES}
    print()
    print(f"{'side':8s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} {'s/step':>7s} {'loss@1':>7s} {'loss@end':>8s}  optimizer")
    for side in SIDES:
        rs = results[side]
        r = min(rs, key=lambda x: abs(x["tokens"] / x["seconds"] - rate[side]))  # the median run
        measured = args.steps - args.warmup_steps
        print(
            f"{side:8s} {r['tokens']:7d} {r['seconds']:8.2f} {rate[side]:9.1f} {r['seconds'] / measured:7.3f} "
            f"{r['first_loss']:7.4f} {r['last_loss']:8.4f}  {r['optimizer']}"
        )
    if args.repeats > 1:
        # Same batches every run, so the fastest time of each step over the runs is
        # a contention-robust estimate (other processes only ever slow a step down).
        best = {}
        for side in SIDES:
            rs = results[side]
            window_steps = range(args.warmup_steps - 1, args.steps - 1)  # step_times[i] = step i+2
            seconds = sum(min(r["step_times"][i] for r in rs) for i in window_steps)
            best[side] = rs[0]["tokens"] / seconds
        print(
            f"best-per-step over {args.repeats} runs: trl {best['trl']:.1f} tok/s, rlhfkit {best['rlhfkit']:.1f} tok/s "
            f"(ratio {best['rlhfkit'] / best['trl']:.2f})"
        )
    print(f"ratio: {rate['rlhfkit'] / rate['trl']:.2f}")


if __name__ == "__main__":
    main()
