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
examples.

Fair settings. TRL's side runs twice, with ``attn_implementation="eager"`` and
with ``"sdpa"`` (transformers' default), and the faster of the two is used for the
ratio (rlhfkit runs eager attention on CPU); ``--trl-attention`` picks a subset.
Equal work is asserted: every side must train exactly the same non-padding
tokens at every step, and the losses at step 2 (the same batch after one
identical update) must agree within ``--loss-rtol`` (2%); otherwise the script
exits 1 without a ratio. A bf16 matmul probe (2048 x 2048, the benchmark's
thread count) before and after the runs gives the machine's peak, and each
side's model FLOP/s (6 x N x tokens/s, see ``common.FLOPS_NOTE``) is printed as
a share of it.

The last line printed is ``ratio: R`` = rlhfkit tokens/s / TRL tokens/s, the
median over ``--repeats`` pairs of runs (sides alternating), whose range is
printed above it.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
from pathlib import Path

import common

LR = 2e-5
FLOPS_PER_PARAM_TOKEN = 6  # forward + backward of every trained token


# ---------------------------------------------------------------- set-up (driver)


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
    from rlhfkit.data.prompts import demo_data_path

    demo = demo_data_path("sft.jsonl")
    if demo.is_file():
        return demo, f"shipped demo set {demo}"
    path = tmp / "synthetic_sft.jsonl"
    synthetic_data(path)
    return path, f"synthetic ({path})"


# ---------------------------------------------------------------- shared by workers


def load_examples(s: dict):
    """rlhfkit's view of the data: conversations kept after tokenisation, with their token lists."""
    from rlhfkit.data.sft import load_sft_file, tokenize_sft
    from rlhfkit.modeling import models

    tokenizer = models.load_tokenizer(s["model_dir"])
    kept, examples = [], []
    for conv in load_sft_file(s["data"]):
        ex, _ = tokenize_sft(tokenizer, [conv], max_length=s["max_length"], chat_template=True)
        if ex:
            kept.append(conv)
            examples.append(ex[0])
    return tokenizer, kept, examples


def step_indices(s: dict, n: int) -> list[list[int]]:
    """Example indices of each optimizer step (all its micro-batches), exactly as rlhfkit.training.loop.fit draws them."""
    return common.step_indices(n, s["steps"], s["batch_size"] * s["grad_accum"])


# ---------------------------------------------------------------- workers


def worker_trl(s: dict, attn: str) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer, convs, _ = load_examples(s)
    rows = []
    for idx in step_indices(s, len(convs)):
        for i in idx:
            (_, prompt), (_, completion) = convs[i].messages
            rows.append(
                {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": completion}]}
            )
    dataset = datasets.Dataset.from_list(rows)

    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32, attn_implementation=attn)
    per_step = s["batch_size"] * s["grad_accum"]
    config = SFTConfig(
        **common.trl_train_kwargs(
            SFTConfig, s, out_dir=s["out_dir"], batch_size=s["batch_size"], grad_accum=s["grad_accum"], lr=LR, schedule="cosine"
        ),
        max_length=s["max_length"],
        completion_only_loss=True,
        packing=False,
        padding_free=False,
    )

    trainer, times, cpu_times, tokens_cum = common.trl_token_trainer(
        SFTTrainer,
        len(rows),
        "examples; batches would not match rlhfkit's",
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    prepared = trainer.train_dataset
    lengths = [len(x) for x in prepared["input_ids"]]
    targets = [sum(1 for t in x[1:] if t != -100) for x in prepared["labels"]]
    expected = [sum(lengths[k * per_step : (k + 1) * per_step]) for k in range(s["steps"])]

    trainer.train()
    losses = common.trl_losses(trainer)
    return {
        **common.measured(s["warmup_steps"], times, cpu_times, tokens_cum, expected),
        "losses": losses,
        "params_n": common.matmul_params(trainer.model),
        "attention": common.attention_of(trainer.model),
        "version": f"trl {trl.__version__}, transformers {transformers.__version__}",
        "optimizer": common.trl_optimizer_name(trainer),
        "target_tokens": sum(targets),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def worker_rlhfkit(s: dict) -> dict:
    import rlhfkit
    from rlhfkit.sft import SFTConfig, train

    _, convs, examples = load_examples(s)
    steps = step_indices(s, len(convs))
    expected = [sum(len(examples[i]["input_ids"]) for i in idx) for idx in steps]
    targets = sum(sum(1 for t in examples[i]["labels"][1:] if t != -100) for idx in steps for i in idx)

    config = SFTConfig(
        **common.rlhfkit_train_kwargs(
            s, out_dir=s["out_dir"], batch_size=s["batch_size"], grad_accum=s["grad_accum"], lr=LR, schedule="cosine"
        ),
        model=s["model_dir"],
        data=s["data"],
        eval_fraction=0.0,
        max_length=s["max_length"],
        chat_template=True,
        precision="bf16",
    )
    # The loop logs every step (log_every=1) to metrics.jsonl with a wall-clock
    # "time" (ms resolution) and "tokens_seen"; note the same moment with
    # perf_counter / process_time too (wrapping the method, not changing it).
    stamps = common.stamp_rlhfkit_steps("tokens_seen")
    result = train(config)
    metrics, times, cpu_times = common.rlhfkit_steps(s, stamps, "tokens_seen")
    tokens_cum = [int(m["tokens_seen"]) for m in metrics]
    w = s["warmup_steps"]
    return {
        **common.measured(w, times, cpu_times, tokens_cum, expected),
        "jsonl_seconds": metrics[-1]["time"] - metrics[w - 1]["time"],
        "losses": [m.get("loss") for m in metrics],
        "params_n": common.matmul_params(result.model),
        "attention": common.attention_of(result.model),
        "version": f"rlhfkit {getattr(rlhfkit, '__version__', '?')}",
        "optimizer": "AdamW (rlhfkit.training.optim.build_optimizer, fused=True)",
        "target_tokens": targets,
        "first_loss": metrics[0].get("loss"),
        "last_loss": result.last_metrics.get("loss"),
    }


WORKERS = {**common.trl_workers("trl", worker_trl), "rlhfkit": worker_rlhfkit}


# ---------------------------------------------------------------- driver


def main(argv=None) -> None:
    p = common.make_parser(__doc__, steps=12, warmup=2)
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per example (default 512)")
    p.add_argument("--data", default="", help="prompt/completion JSONL (default: the shipped demo set, else synthetic)")
    args = common.parse_args(p, argv)

    os.environ.update(common.BENCH_ENV)
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-sft-") as tmp_name:
        tmp = Path(tmp_name)
        if args.data:
            data, data_note = Path(args.data).resolve(), args.data
            if not data.is_file():
                p.error(f"--data {args.data}: no such file")
        else:
            data, data_note = data_file(tmp)
        settings = common.start(
            args,
            f"data: {data_note}; batch {args.batch_size} x grad_accum {args.grad_accum}, max_length {args.max_length}, "
            f"{args.steps} steps (first {args.warmup_steps} excluded), bf16 autocast, {args.threads} threads",
            data=str(data),
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_length=args.max_length,
        )
        sides = [*common.trl_sides("trl", args), "rlhfkit"]
        results = common.run_sides(
            __file__, sides, settings, tmp, args, width=9, rates=lambda r: f"{r['tokens'] / r['seconds']:7.1f} tok/s"
        )
        peak = common.final_peak(settings, args)

    common.check_token_counts(results)

    def tok_rate(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    rate = {s: common.median_rate(results[s], tok_rate) for s in sides}
    measured = args.steps - args.warmup_steps
    print()
    rows = []
    for side in sides:
        r = common.median_run(results[side], tok_rate)
        gflops = statistics.median(common.model_gflops(x, FLOPS_PER_PARAM_TOKEN) for x in results[side])
        rows.append(
            [
                side,
                r["tokens"],
                f"{r['seconds']:.2f}",
                f"{rate[side]:.1f}",
                f"{r['seconds'] / measured:.3f}",
                f"{common.cpu_use(r, args.threads):.0%}",
                f"{gflops:.1f}",
                f"{gflops / peak:.1%}",
                r["attention"],
                f"{r['first_loss']:.4f}",
                f"{r['last_loss']:.4f}",
            ]
        )
    common.print_table(
        ["side", "tokens", "seconds", "tokens/s", "s/step", "cpu", "model GFLOP/s", "of peak", "attention", "loss@1", "loss@end"],
        rows,
    )
    print("optimizers: " + "; ".join(f"{side} {results[side][0]['optimizer']}" for side in sides))
    print(f"N = {results['rlhfkit'][0]['params_n'] / 1e6:.1f}M parameters; {common.FLOPS_NOTE}")
    if args.repeats > 1:
        # Same batches every run, so the fastest time of each step over the runs is
        # a contention-robust estimate (other processes only ever slow a step down).
        best = {}
        for side in sides:
            rs = results[side]
            window_steps = range(args.warmup_steps - 1, args.steps - 1)  # step_times[i] = step i+2
            seconds = sum(min(r["step_times"][i] for r in rs) for i in window_steps)
            best[side] = rs[0]["tokens"] / seconds
        print(f"best-per-step over {args.repeats} runs (tok/s): " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
    print()
    common.check_equal_work(results, "rlhfkit", warmup=args.warmup_steps, what="non-padding tokens trained", rtol=args.loss_rtol)
    print()
    trl = common.fastest_trl(results, "trl", tok_rate, "tok/s")
    ratio = common.report_ratio(
        f"rlhfkit / TRL ({common.trl_attention(trl)} attention) tokens/s", common.pair_ratios(results, "rlhfkit", trl, tok_rate)
    )
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    common.run_script(WORKERS, main)
