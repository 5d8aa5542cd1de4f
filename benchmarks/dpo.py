"""DPO training throughput: rlhfkit vs TRL's DPOTrainer, same model, data, batches and settings.

    python benchmarks/dpo.py [--steps 12] [--warmup-steps 2] [--batch-size 8] [--max-length 512]
                             [--pairs 128] [--beta 0.1] [--lr 5e-6] [--model smollm2-135m] [--repeats 1]

What is trained. SmolLM2-135M-Instruct (``rlhfkit.models.resolve("smollm2-135m")``,
one local directory both sides load, fp32 master weights) with DPO, sigmoid
loss, beta 0.1, no label smoothing, AdamW lr 5e-6 (no weight decay, betas
0.9/0.999, grad-norm clip 1.0, cosine schedule, no warm-up), bf16 autocast
(TRL ``bf16=True``; rlhfkit ``precision="bf16"``), no gradient checkpointing
(TRL defaults it on: set off explicitly), no eval, no checkpoints, no reporting.

Data. ``--pairs`` (128) preference pairs built from the shipped demo set
``src/rlhfkit/assets/demo/sft.jsonl``: chosen = the demo completion, rejected = a
deliberately worse reply (a curt/rude brush-off for half the pairs, another
prompt's completion for the other half), written once as TRL *conversational*
``prompt``/``chosen``/``rejected`` records; rlhfkit reads the same file. Both
sides apply the tokenizer's chat template. The TRL dataset is laid out in the
order rlhfkit's loop draws pairs and read with a sequential sampler, so step
``k`` trains the same pairs on both sides (per-step token counts are compared).

Sides (each a fresh subprocess with identical environment, see common.py):

* ``rlhfkit``: ``rlhfkit.dpo.train(DPOConfig)``. It computes the reference
  log-probs of every pair once, before training (``compute_ref_logps``, timed
  separately; the one-off total also counts its cache hashing and write), so a
  training step is one forward/backward over chosen+rejected.
* ``trl``: ``DPOTrainer`` with its default reference handling: a frozen copy of
  the model, forwarded on every step. This is the headline comparison.
* ``trl-precompute``: ``DPOTrainer`` with ``precompute_ref_log_probs=True``
  (batch size = training batch size, as rlhfkit's), its precompute
  (``_precompute_ref_logps``) timed separately. Skip with ``--no-trl-precompute``.

How it is measured. The first ``--warmup-steps`` steps are excluded. Time is
the wall clock from the end of step ``warmup`` to the end of the last step (TRL:
``on_step_end`` callback; rlhfkit: the moment its loop logs the step). Pairs/s =
batch size x measured steps / time. Tokens/s counts non-padding tokens
(``attention_mask.sum()`` of chosen + rejected rows) as each library counts them
(TRL ``_total_train_tokens``, rlhfkit ``tokens_seen``), cross-checked against a
count from each side's tokenized data. Reference precompute is one-off work and
not in the window. The last line is ``ratio: R`` = rlhfkit pairs/s / TRL
(default) pairs/s; above 1 means rlhfkit is faster.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common

SIDES = ("trl", "trl-precompute", "rlhfkit")


# ---------------------------------------------------------------- workers


def worker_trl(s: dict, precompute: bool) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    import trl.trainer.dpo_trainer as dpo_trainer_mod
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhfkit import models

    B, L = s["batch_size"], s["max_length"]
    tokenizer = models.load_tokenizer(s["model_dir"])  # the tokenizer rlhfkit's DPO uses
    raw, kept, _ = common.load_pair_examples(s, tokenizer, keep_ties=False)
    layout = common.epoch_layout(len(kept), s["steps"], B)
    rows = [raw[kept[i]] for i in layout]
    dataset = datasets.Dataset.from_list(rows)

    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32)
    config = DPOConfig(
        **common.trl_train_kwargs(DPOConfig, s, out_dir=s["out_dir"], batch_size=B, lr=s["lr"], schedule="cosine"),
        max_length=L,
        truncation_mode="keep_start",
        padding_free=False,
        beta=s["beta"],
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        use_weighting=False,
        ld_alpha=None,
        sync_ref_model=False,
        disable_dropout=True,  # TRL's default; SmolLM2 has no dropout anyway (rlhfkit leaves the config alone)
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=B,
    )

    # One-off reference work, timed by wrapping TRL's own methods (called unchanged).
    precompute_s: list[float] = []
    hash_s: list[float] = []
    common.timed(DPOTrainer, "_precompute_ref_logps", precompute_s)
    common.timed(dpo_trainer_mod, "hash_module", hash_s)

    holder = {}
    callback, times, cpu_times, tokens_cum = common.trl_step_timer(lambda: int(holder["trainer"]._total_train_tokens))
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    init_s = time.perf_counter() - t0
    holder["trainer"] = trainer
    common.check_no_checkpointing(trainer)
    prepared = trainer.train_dataset
    if len(prepared) != len(rows):
        raise SystemExit(f"TRL kept {len(prepared)} of {len(rows)} pairs; batches would not match rlhfkit's (raise --max-length)")
    lengths = [
        min(len(p) + len(c), L) + min(len(p) + len(r), L)
        for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
    ]
    expected = [sum(lengths[k * B : (k + 1) * B]) for k in range(s["steps"])]

    trainer.train()
    w = s["warmup_steps"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref = "precomputed before training (precompute_ref_log_probs=True)" if precompute else "frozen fp32 copy, forward every step"
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
        "ref_precompute_s": sum(precompute_s) if precompute else None,
        "ref_hash_s": sum(hash_s) if precompute else None,
        "ref_precompute_pairs": len(prepared) if precompute else None,
        "init_s": init_s,
        "settings": {
            "pairs per step": config.per_device_train_batch_size * config.gradient_accumulation_steps,
            "max length": config.max_length,
            "loss": "+".join(config.loss_type),
            "beta": config.beta,
            "label smoothing": config.label_smoothing,
            "learning rate": config.learning_rate,
            "lr schedule": common.value_str(config.lr_scheduler_type),
            "warmup steps": config.warmup_steps,
            "weight decay": config.weight_decay,
            "grad clip": config.max_grad_norm,
            "adam betas / eps": f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_epsilon}",
            "autocast": "bf16" if config.bf16 else ("fp16" if config.fp16 else "none"),
            "master weights": str(model.dtype).replace("torch.", ""),
            "grad checkpointing": bool(getattr(config, "activation_checkpointing", config.gradient_checkpointing)),
            "dropout": 0.0 if config.disable_dropout else getattr(model.config, "attention_dropout", "?"),
        },
        "implementation": {
            "reference": ref,
            "optimizer": common.trl_optimizer_name(trainer),
            "version": f"trl {trl.__version__}, transformers {transformers.__version__}",
        },
    }


def worker_rlhfkit(s: dict) -> dict:
    import rlhfkit
    import rlhfkit.dpo as dpo_mod
    from rlhfkit import models
    from rlhfkit.dpo import DPOConfig, train
    from rlhfkit.tracking import read_metrics

    B = s["batch_size"]
    # A private copy of the data: rlhfkit caches reference log-probs next to the data
    # file, and every run must compute them afresh.
    data = Path(s["run_dir"]) / "pairs.jsonl"
    shutil.copyfile(s["data"], data)
    _, kept, examples = common.load_pair_examples(s, models.load_tokenizer(s["model_dir"]), keep_ties=False)
    steps = common.step_indices(len(kept), s["steps"], B)
    expected = [sum(common.pair_tokens(examples[i]) for i in idx) for idx in steps]

    compute_s: list[float] = []
    attach_s: list[float] = []
    common.timed(dpo_mod, "compute_ref_logps", compute_s)
    common.timed(dpo_mod, "attach_reference", attach_s)
    stamps = common.stamp_rlhfkit_steps("tokens_seen")

    config = DPOConfig(
        **common.rlhfkit_train_kwargs(s, out_dir=s["out_dir"], batch_size=B, lr=s["lr"], schedule="cosine"),
        model=s["model_dir"],
        precision="bf16",
        data=str(data),
        eval_fraction=0.0,
        max_length=s["max_length"],
        chat_template=True,
        beta=s["beta"],
        loss_type="sigmoid",
        label_smoothing=0.0,
        rpo_alpha=0.0,
        ref_model="",
        ref_cache=True,
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
        "ref_precompute_s": sum(compute_s),
        "ref_hash_s": sum(attach_s) - sum(compute_s),
        "ref_precompute_pairs": len(examples),
        "settings": {
            "pairs per step": config.batch_size * config.grad_accum,
            "max length": config.max_length,
            "loss": config.loss_type,
            "beta": config.beta,
            "label smoothing": config.label_smoothing,
            "learning rate": config.lr,
            "lr schedule": config.lr_schedule,
            "warmup steps": int(config.warmup_ratio * config.max_steps),
            "weight decay": config.weight_decay,
            "grad clip": config.max_grad_norm,
            "adam betas / eps": f"{config.adam_beta1}/{config.adam_beta2}/{config.adam_eps}",
            "autocast": config.precision if config.precision != "fp32" else "none",
            "master weights": str(model.dtype).replace("torch.", ""),
            "grad checkpointing": bool(config.gradient_checkpointing),
            "dropout": getattr(model.config, "attention_dropout", "?"),  # rlhfkit leaves the model's dropout as is
        },
        "implementation": {
            "reference": "log-probs precomputed once before training (compute_ref_logps, ref_cache=True)",
            "optimizer": "AdamW (rlhfkit.optim.build_optimizer, foreach=True)",
            "version": f"rlhfkit {getattr(rlhfkit, '__version__', '?')}",
        },
    }


WORKERS = {
    "trl": lambda s: worker_trl(s, precompute=False),
    "trl-precompute": lambda s: worker_trl(s, precompute=True),
    "rlhfkit": worker_rlhfkit,
}


# ---------------------------------------------------------------- driver


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, steps=12, warmup=2)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="max tokens of prompt + response (default 512)")
    p.add_argument("--pairs", type=int, default=128, help="preference pairs to build from the demo set (default 128)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (default 5e-6)")
    p.add_argument("--no-trl-precompute", action="store_true", help="skip the TRL precompute_ref_log_probs=True side")
    args = p.parse_args(argv)
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")
    sides = [s for s in SIDES if not (args.no_trl_precompute and s == "trl-precompute")]

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-dpo-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "pairs.jsonl"
        data_note = common.write_preference_file(data, args.pairs)
        model_path, model_note = common.model_dir(args.model)
        print(f"model: {args.model} -> {model_path}")
        if model_note:
            print(f"note: {model_note}")
        print(
            f"data: {data_note}; batch {args.batch_size} pairs, max_length {args.max_length}, {args.steps} steps "
            f"(first {args.warmup_steps} excluded), beta {args.beta}, lr {args.lr}, {args.threads} threads"
        )
        common.check_load()
        settings = {
            "model_dir": str(model_path), "data": str(data), "steps": args.steps, "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "beta": args.beta, "lr": args.lr,
            "threads": args.threads,
        }
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for run in range(args.repeats):
            for side in common.side_order(sides, run):
                r = common.spawn(__file__, side, settings, tmp, str(run), verbose=args.verbose)
                results[side].append(r)
                extra = f", ref precompute {r['ref_precompute_s']:.1f} s" if r.get("ref_precompute_s") is not None else ""
                print(
                    f"  run {run + 1} {side:15s}: {r['pairs'] / r['seconds']:6.2f} pairs/s, {r['tokens'] / r['seconds']:7.1f} tok/s, "
                    f"cpu use {r['cpu_seconds'] / r['seconds'] / args.threads:4.0%} of {args.threads} threads, "
                    f"step times {' '.join(f'{t:.2f}' for t in r['step_times'])} s{extra} ({r['wall']:.0f} s wall)",
                    flush=True,
                )

    ours, theirs = results["rlhfkit"][0], results["trl"][0]
    print()
    common.print_settings({side: results[side][0] for side in sides})
    for side in sides:
        for r in results[side]:
            if r["tokens"] != r["tokens_check"]:
                print(f"WARNING: {side} counted {r['tokens']} tokens in the window, its tokenized data says {r['tokens_check']}")
    if ours["step_tokens"] != theirs["step_tokens"]:
        diff = sum(abs(a - b) for a, b in zip(ours["step_tokens"], theirs["step_tokens"]))
        print(f"note: per-step token counts differ by {diff} tokens in total (tokenisation of the chat template): "
              f"rlhfkit {ours['step_tokens']} vs trl {theirs['step_tokens']}")

    B = args.batch_size
    rate = {s: statistics.median(r["pairs"] / r["seconds"] for r in results[s]) for s in sides}
    print()
    rows = []
    for side in sides:
        r = common.median_run(results[side], lambda x: x["pairs"] / x["seconds"])
        tok_rate = statistics.median(x["tokens"] / x["seconds"] for x in results[side])
        pre = "-"
        if r.get("ref_precompute_s") is not None:
            pre = f"{r['ref_precompute_s']:.1f} s / {r['ref_precompute_pairs']} pairs (+{r['ref_hash_s']:.1f} s hash/cache)"
        rows.append([
            side, f"{rate[side]:.2f}", f"{tok_rate:.1f}", f"{B / rate[side]:.3f}",
            f"{r['cpu_seconds'] / r['seconds'] / args.threads:.0%}", f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}",
            f"{r['peak_rss_mb']:.0f}", pre,
        ])
    common.print_table(["side", "pairs/s", "tokens/s", "s/step", "cpu", "loss@1", "loss@end", "peak RSS MB", "one-off reference precompute"], rows)
    print()
    print(f"rlhfkit / TRL default (reference forward every step): {rate['rlhfkit'] / rate['trl']:.2f}")
    if "trl-precompute" in rate:
        print(f"rlhfkit / TRL precompute_ref_log_probs=True:          {rate['rlhfkit'] / rate['trl-precompute']:.2f}")
    print(f"ratio: {rate['rlhfkit'] / rate['trl']:.2f}")


if __name__ == "__main__":
    if common.is_worker_invocation():
        common.worker_main(WORKERS)
    else:
        main()
