"""Reward-model training throughput: rlhfkit vs TRL's RewardTrainer, same model, data, batches and settings.

    python benchmarks/reward.py [--steps 12] [--warmup-steps 2] [--batch-size 8] [--max-length 512]
                                [--pairs 128] [--lr 1e-5] [--model smollm2-135m] [--repeats 1]

What is trained. A scalar reward model on SmolLM2-135M-Instruct
(``rlhfkit.modeling.models.resolve("smollm2-135m")``, one local directory both sides load):
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
side's tokenized data.

Fair settings. TRL's side runs with ``attn_implementation="eager"`` and with
``"sdpa"`` (transformers' default); the faster is used for the ratio
(``--trl-attention`` picks a subset). Equal work is asserted: every side must
train exactly the same non-padding tokens at every step, and the losses at step
2 must agree within ``--loss-rtol`` (2%; step 1 is ``ln 2`` by construction, the
score head starting at zero), else the script exits 1 without a ratio. Model
FLOP/s = 6 x N x tokens/s (N: the trunk without its embedding, plus the score
head; see ``common.FLOPS_NOTE``), printed as a share of a bf16 matmul probe's
peak measured before and after the runs.

The last line is ``ratio: R`` = rlhfkit pairs/s / TRL pairs/s, the median over
``--repeats`` pairs of runs (sides alternating; the range is printed above it);
above 1 means rlhfkit is faster.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common

FLOPS_PER_PARAM_TOKEN = 6  # forward + backward of every trained token


def reward_tokenizer(model_dir: str):
    from rlhfkit.modeling.reward_model import reward_tokenizer

    return reward_tokenizer(model_dir)


def settings_of(model, *, batch: int, max_length: int, loss: str, training: dict) -> dict:
    """A side's ``settings``: the reward-model rows around the shared ``training`` rows."""
    return {
        "pairs per step": batch,
        "max length": max_length,
        "loss": loss,
        **training,
        "pad token id": model.config.pad_token_id,
        "score head": f"{type(model).__name__} num_labels={model.config.num_labels}",
    }


# ---------------------------------------------------------------- workers


def worker_trl(s: dict, attn: str) -> dict:
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

    model = AutoModelForSequenceClassification.from_pretrained(
        s["model_dir"], num_labels=1, dtype=torch.float32, attn_implementation=attn
    )
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
    trainer, times, cpu_times, tokens_cum = common.trl_token_trainer(
        RewardTrainer,
        len(rows),
        "pairs (it drops pairs over max_length); raise --max-length",
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    prepared = trainer.train_dataset
    lengths = [len(c) + len(r) for c, r in zip(prepared["chosen_ids"], prepared["rejected_ids"])]
    expected = [sum(lengths[k * B : (k + 1) * B]) for k in range(s["steps"])]

    trainer.train()
    w = s["warmup_steps"]
    losses = common.trl_losses(trainer)
    return {
        **common.measured(w, times, cpu_times, tokens_cum, expected),
        "pairs": B * (s["steps"] - w),
        "losses": losses,
        "params_n": common.matmul_params(trainer.model),
        "attention": common.attention_of(trainer.model),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "settings": settings_of(
            model,
            batch=config.per_device_train_batch_size * config.gradient_accumulation_steps,
            max_length=config.max_length,
            loss="bradley-terry, margin 0" if config.center_rewards_coefficient is None else "bradley-terry + centering",
            training=common.trl_training_settings(config, model),
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
    metrics, times, cpu_times = common.rlhfkit_steps(s, stamps, "tokens_seen")
    tokens_cum = [int(m["tokens_seen"]) for m in metrics]
    w = s["warmup_steps"]
    model = result.model
    return {
        **common.measured(w, times, cpu_times, tokens_cum, expected),
        "pairs": B * (s["steps"] - w),
        "losses": [m.get("loss") for m in metrics],
        "params_n": common.matmul_params(model),
        "attention": common.attention_of(model),
        "first_loss": metrics[0].get("loss"),
        "last_loss": result.last_metrics.get("loss"),
        "settings": settings_of(
            model,
            batch=config.batch_size * config.grad_accum,
            max_length=config.max_length,
            loss=f"bradley-terry, margin {config.margin:g}",
            training=common.rlhfkit_training_settings(config, model),
        ),
        "implementation": {
            "optimizer": "AdamW (rlhfkit.training.optim.build_optimizer, fused=True)",
            "too long pairs": "truncated",
            "version": f"rlhfkit {getattr(rlhfkit, '__version__', '?')}",
        },
    }


WORKERS = {**common.trl_workers("trl", worker_trl), "rlhfkit": worker_rlhfkit}


# ---------------------------------------------------------------- driver


def main(argv=None) -> None:
    p = common.make_parser(__doc__, steps=12, warmup=2)
    common.add_pair_args(p)
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    args = common.parse_args(p, argv)

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-reward-") as tmp_name:
        tmp = Path(tmp_name)
        settings = common.start_pairs(args, tmp, f"lr {args.lr}", lr=args.lr)
        sides = [*common.trl_sides("trl", args), "rlhfkit"]
        results = common.run_sides(__file__, sides, settings, tmp, args, width=9, rates=common.pair_rates)
        peak = common.final_peak(settings, args)

    print()
    common.print_settings({side: results[side][0] for side in sides})
    common.check_token_counts(results)
    print()
    common.print_pair_table(results, args, peak, lambda side: FLOPS_PER_PARAM_TOKEN)
    print(f"N = {results['rlhfkit'][0]['params_n'] / 1e6:.1f}M parameters; {common.FLOPS_NOTE}")
    print()
    common.check_equal_work(
        results, "rlhfkit", warmup=args.warmup_steps, what="non-padding tokens trained (chosen + rejected)", rtol=args.loss_rtol
    )
    print()

    def pair_rate(r: dict) -> float:
        return r["pairs"] / r["seconds"]

    trl = common.fastest_trl(results, "trl", pair_rate, "pairs/s")
    ratio = common.report_ratio(
        f"rlhfkit / TRL ({common.trl_attention(trl)} attention) pairs/s", common.pair_ratios(results, "rlhfkit", trl, pair_rate)
    )
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    common.run_script(WORKERS, main)
