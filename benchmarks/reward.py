"""Reward-model training throughput: rlhfkit vs TRL's RewardTrainer, same model, data, batches and settings.

    python benchmarks/reward.py [--steps 12] [--warmup-steps 2] [--batch-size 8] [--max-length 512]
                                [--pairs 128] [--lr 1e-5] [--model smollm2-135m] [--repeats 1]

What is trained. A scalar reward model on SmolLM2-135M-Instruct
(``rlhfkit.models.resolve("smollm2-135m")``, one local directory both sides load):
``AutoModelForSequenceClassification`` with ``num_labels=1``, fp32 master
weights, score head initialised to zeros on both sides (rlhfkit's default),
padded with the same token (rlhfkit's reward tokenizer: ``<|endoftext|>``, so a
sequence ending in EOS is read at the right position). Bradley-Terry loss
``-logsigmoid(r_chosen - r_rejected)`` averaged over the pairs of the batch, one
forward over chosen + rejected rows. AdamW lr 1e-5 (no weight decay, betas
0.9/0.999, grad-norm clip 1.0, cosine schedule, no warm-up), bf16 autocast
(TRL ``bf16=True``; rlhfkit ``precision="bf16"``), no gradient checkpointing
(TRL defaults it on: set off explicitly), no eval, no checkpoints, no
reporting; rlhfkit's post-training score normalisation is off (it runs after
the timed steps anyway, and TRL has no counterpart).

Data. ``--pairs`` (128) preference pairs built from the shipped demo set
``src/rlhfkit/assets/demo/sft.jsonl`` (chosen = the demo completion, rejected =
a curt/rude rewrite or another prompt's completion), written once as TRL
conversational ``prompt``/``chosen``/``rejected`` records that both sides read,
both applying the chat template. The TRL dataset is laid out in the order
rlhfkit's loop draws pairs and read with a sequential sampler, so step ``k``
trains the same pairs on both sides (per-step token counts are compared). TRL
*drops* pairs longer than ``max_length`` where rlhfkit truncates them; the
benchmark stops if TRL dropped any.

How it is measured. Each side runs in a fresh subprocess with identical
environment (see common.py). The first ``--warmup-steps`` steps are excluded.
Time is the wall clock from the end of step ``warmup`` to the end of the last
step (TRL: ``on_step_end`` callback; rlhfkit: the moment its loop logs the step).
Pairs/s = batch size x measured steps / time. Tokens/s counts non-padding tokens
of chosen + rejected rows as each library counts them (TRL
``_total_train_tokens``, rlhfkit ``tokens_seen``), cross-checked against each
side's tokenized data. The last line is ``ratio: R`` = rlhfkit pairs/s / TRL
pairs/s; above 1 means rlhfkit is faster.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import common

SIDES = ("trl", "rlhfkit")


def reward_tokenizer(model_dir: str):
    from rlhfkit.reward import _reward_tokenizer

    return _reward_tokenizer(model_dir)


def settings_of(*, batch, max_length, lr, schedule, warmup, wd, clip, betas, autocast, model, ckpt, dropout, loss) -> dict:
    return {
        "pairs per step": batch,
        "max length": max_length,
        "loss": loss,
        "learning rate": lr,
        "lr schedule": schedule,
        "warmup steps": warmup,
        "weight decay": wd,
        "grad clip": clip,
        "adam betas / eps": betas,
        "autocast": autocast,
        "master weights": str(model.dtype).replace("torch.", ""),
        "grad checkpointing": bool(ckpt),
        "dropout": dropout,
        "pad token id": model.config.pad_token_id,
        "score head": f"{type(model).__name__} num_labels={model.config.num_labels}",
    }


# ---------------------------------------------------------------- workers


def worker_trl(s: dict) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    B, L = s["batch_size"], s["max_length"]
    tokenizer = reward_tokenizer(s["model_dir"])
    raw, kept, _ = common.load_pair_examples(s, tokenizer, keep_ties=True)
    layout = common.epoch_layout(len(kept), s["steps"], B)
    rows = [raw[kept[i]] for i in layout]
    dataset = datasets.Dataset.from_list(rows)

    model = AutoModelForSequenceClassification.from_pretrained(s["model_dir"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.nn.init.zeros_(model.score.weight)  # as rlhfkit's head_init="zero"
    if getattr(model.score, "bias", None) is not None:
        torch.nn.init.zeros_(model.score.bias)

    config = RewardConfig(
        **common.trl_train_kwargs(RewardConfig, s, out_dir=s["out_dir"], batch_size=B, lr=s["lr"], schedule="cosine"),
        max_length=L,
        disable_dropout=True,  # TRL's default; SmolLM2 has no dropout anyway
        center_rewards_coefficient=None,
    )
    holder = {}
    callback, times, cpu_times, tokens_cum = common.trl_step_timer(lambda: int(holder["trainer"]._total_train_tokens))
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    holder["trainer"] = trainer
    common.check_no_checkpointing(trainer)
    prepared = trainer.train_dataset
    if len(prepared) != len(rows):
        raise SystemExit(f"TRL kept {len(prepared)} of {len(rows)} pairs (it drops pairs over max_length); raise --max-length")
    lengths = [len(c) + len(r) for c, r in zip(prepared["chosen_ids"], prepared["rejected_ids"])]
    expected = [sum(lengths[k * B : (k + 1) * B]) for k in range(s["steps"])]

    trainer.train()
    w = s["warmup_steps"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": common.window(times, w),
        "cpu_seconds": cpu_times[-1] - cpu_times[w - 1],
        "step_times": common.step_durations(times),
        "pairs": B * (s["steps"] - w),
        "tokens": tokens_cum[-1] - tokens_cum[w - 1],
        "tokens_check": sum(expected[w:]),
        "step_tokens": [b - a for a, b in zip([0] + tokens_cum, tokens_cum)],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "settings": settings_of(
            batch=config.per_device_train_batch_size * config.gradient_accumulation_steps, max_length=config.max_length,
            lr=config.learning_rate, schedule=common.value_str(config.lr_scheduler_type), warmup=config.warmup_steps,
            wd=config.weight_decay, clip=config.max_grad_norm,
            betas=f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_epsilon}",
            autocast="bf16" if config.bf16 else ("fp16" if config.fp16 else "none"), model=model,
            ckpt=getattr(config, "activation_checkpointing", config.gradient_checkpointing),
            dropout=0.0 if config.disable_dropout else getattr(model.config, "attention_dropout", "?"),
            loss="bradley-terry, margin 0" if config.center_rewards_coefficient is None else "bradley-terry + centering",
        ),
        "implementation": {
            "optimizer": common.trl_optimizer_name(trainer),
            "too long pairs": "dropped",
            "version": f"trl {trl.__version__}, transformers {transformers.__version__}",
        },
    }


def worker_rlhfkit(s: dict) -> dict:
    import rlhfkit
    from rlhfkit.reward import RewardConfig, train
    from rlhfkit.tracking import read_metrics

    B = s["batch_size"]
    _, kept, examples = common.load_pair_examples(s, reward_tokenizer(s["model_dir"]), keep_ties=True)
    steps = common.step_indices(len(kept), s["steps"], B)
    expected = [sum(common.pair_tokens(examples[i]) for i in idx) for idx in steps]
    stamps = common.stamp_rlhfkit_steps("tokens_seen")

    config = RewardConfig(
        **common.rlhfkit_train_kwargs(s, out_dir=s["out_dir"], batch_size=B, lr=s["lr"], schedule="cosine"),
        model=s["model_dir"],
        precision="bf16",
        data=s["data"],
        eval_fraction=0.0,
        max_length=s["max_length"],
        chat_template=True,
        margin=0.0,
        head_init="zero",
        normalize=False,  # after the timed steps anyway; TRL has no counterpart
    )
    result = train(config)
    metrics = [m for m in read_metrics(s["out_dir"]) if "tokens_seen" in m]
    if len(metrics) != s["steps"] or sorted(stamps) != [m["step"] for m in metrics]:
        raise SystemExit(f"rlhfkit logged {len(metrics)} steps, expected {s['steps']}")
    times = [stamps[m["step"]][0] for m in metrics]
    cpu_times = [stamps[m["step"]][1] for m in metrics]
    tokens_cum = [int(m["tokens_seen"]) for m in metrics]
    w = s["warmup_steps"]
    model = result.model
    return {
        "seconds": common.window(times, w),
        "cpu_seconds": cpu_times[-1] - cpu_times[w - 1],
        "step_times": common.step_durations(times),
        "pairs": B * (s["steps"] - w),
        "tokens": tokens_cum[-1] - tokens_cum[w - 1],
        "tokens_check": sum(expected[w:]),
        "step_tokens": [b - a for a, b in zip([0] + tokens_cum, tokens_cum)],
        "first_loss": metrics[0].get("loss"),
        "last_loss": result.last_metrics.get("loss"),
        "settings": settings_of(
            batch=config.batch_size * config.grad_accum, max_length=config.max_length, lr=config.lr,
            schedule=config.lr_schedule, warmup=int(config.warmup_ratio * config.max_steps), wd=config.weight_decay,
            clip=config.max_grad_norm, betas=f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_eps}",
            autocast=config.precision if config.precision != "fp32" else "none", model=model,
            ckpt=config.gradient_checkpointing, dropout=getattr(model.config, "attention_dropout", "?"),
            loss=f"bradley-terry, margin {config.margin:g}",
        ),
        "implementation": {
            "optimizer": "AdamW (rlhfkit.optim.build_optimizer, foreach=True)",
            "too long pairs": "truncated",
            "version": f"rlhfkit {getattr(rlhfkit, '__version__', '?')}",
        },
    }


WORKERS = {"trl": worker_trl, "rlhfkit": worker_rlhfkit}


# ---------------------------------------------------------------- driver


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, steps=12, warmup=2)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens of prompt + response (default 512)")
    p.add_argument("--pairs", type=int, default=128, help="preference pairs to build from the demo set (default 128)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    args = p.parse_args(argv)
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-reward-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "pairs.jsonl"
        data_note = common.write_preference_file(data, args.pairs)
        model_path, model_note = common.model_dir(args.model)
        print(f"model: {args.model} -> {model_path}")
        if model_note:
            print(f"note: {model_note}")
        print(
            f"data: {data_note}; batch {args.batch_size} pairs, max_length {args.max_length}, {args.steps} steps "
            f"(first {args.warmup_steps} excluded), lr {args.lr}, {args.threads} threads"
        )
        common.check_load()
        settings = {
            "model_dir": str(model_path), "data": str(data), "steps": args.steps, "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr, "threads": args.threads,
        }
        results: dict[str, list[dict]] = {s: [] for s in SIDES}
        for run in range(args.repeats):
            for side in common.side_order(SIDES, run):
                r = common.spawn(__file__, side, settings, tmp, str(run), verbose=args.verbose)
                results[side].append(r)
                print(
                    f"  run {run + 1} {side:8s}: {r['pairs'] / r['seconds']:6.2f} pairs/s, {r['tokens'] / r['seconds']:7.1f} tok/s, "
                    f"cpu use {r['cpu_seconds'] / r['seconds'] / args.threads:4.0%} of {args.threads} threads, "
                    f"step times {' '.join(f'{t:.2f}' for t in r['step_times'])} s ({r['wall']:.0f} s wall)",
                    flush=True,
                )

    print()
    common.print_settings({side: results[side][0] for side in SIDES})
    for side in SIDES:
        for r in results[side]:
            if r["tokens"] != r["tokens_check"]:
                print(f"WARNING: {side} counted {r['tokens']} tokens in the window, its tokenized data says {r['tokens_check']}")
    ours, theirs = results["rlhfkit"][0], results["trl"][0]
    if ours["step_tokens"] != theirs["step_tokens"]:
        diff = sum(abs(a - b) for a, b in zip(ours["step_tokens"], theirs["step_tokens"]))
        print(f"note: per-step token counts differ by {diff} tokens in total (tokenisation of the chat template): "
              f"rlhfkit {ours['step_tokens']} vs trl {theirs['step_tokens']}")

    B = args.batch_size
    rate = {s: statistics.median(r["pairs"] / r["seconds"] for r in results[s]) for s in SIDES}
    print()
    rows = []
    for side in SIDES:
        r = common.median_run(results[side], lambda x: x["pairs"] / x["seconds"])
        tok_rate = statistics.median(x["tokens"] / x["seconds"] for x in results[side])
        rows.append([
            side, f"{rate[side]:.2f}", f"{tok_rate:.1f}", f"{B / rate[side]:.3f}",
            f"{r['cpu_seconds'] / r['seconds'] / args.threads:.0%}", f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}",
            f"{r['peak_rss_mb']:.0f}",
        ])
    common.print_table(["side", "pairs/s", "tokens/s", "s/step", "cpu", "loss@1", "loss@end", "peak RSS MB"], rows)
    print()
    print(f"ratio: {rate['rlhfkit'] / rate['trl']:.2f}")


if __name__ == "__main__":
    if common.is_worker_invocation():
        common.worker_main(WORKERS)
    else:
        main()
