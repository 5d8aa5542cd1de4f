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

import shutil
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

    t0 = time.perf_counter()
    trainer, times, cpu_times, tokens_cum = common.trl_token_trainer(
        DPOTrainer, len(rows), "pairs; batches would not match rlhfkit's (raise --max-length)",
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
    )
    init_s = time.perf_counter() - t0
    prepared = trainer.train_dataset
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
        **common.measured(w, times, cpu_times, tokens_cum, expected),
        "pairs": B * (s["steps"] - w),
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
            **common.trl_training_settings(config, model),
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
    metrics, times, cpu_times = common.rlhfkit_steps(s, stamps, "tokens_seen")
    tokens_cum = [int(m["tokens_seen"]) for m in metrics]
    w = s["warmup_steps"]
    return {
        **common.measured(w, times, cpu_times, tokens_cum, expected),
        "pairs": B * (s["steps"] - w),
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
            **common.rlhfkit_training_settings(config, result.model),
        },
        "implementation": {
            "reference": "log-probs precomputed once before training (compute_ref_logps, ref_cache=True)",
            "optimizer": "AdamW (rlhfkit.optim.build_optimizer, fused=True)",
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
    p = common.make_parser(__doc__, steps=12, warmup=2)
    common.add_pair_args(p)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (default 5e-6)")
    p.add_argument("--no-trl-precompute", action="store_true", help="skip the TRL precompute_ref_log_probs=True side")
    args = common.parse_args(p, argv)
    sides = [s for s in SIDES if not (args.no_trl_precompute and s == "trl-precompute")]

    def precompute_note(r: dict) -> str:
        return f", ref precompute {r['ref_precompute_s']:.1f} s" if r.get("ref_precompute_s") is not None else ""

    def precompute_column(r: dict) -> str:
        if r.get("ref_precompute_s") is None:
            return "-"
        return f"{r['ref_precompute_s']:.1f} s / {r['ref_precompute_pairs']} pairs (+{r['ref_hash_s']:.1f} s hash/cache)"

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-dpo-") as tmp_name:
        tmp = Path(tmp_name)
        settings = common.start_pairs(args, tmp, f"beta {args.beta}, lr {args.lr}", beta=args.beta, lr=args.lr)
        results = common.run_sides(__file__, sides, settings, tmp, args, width=15, rates=common.pair_rates, after=precompute_note)

    print()
    common.print_settings({side: results[side][0] for side in sides})
    common.check_token_counts(results)
    print()
    rate = common.print_pair_table(results, args, {"one-off reference precompute": precompute_column})
    print()
    print(f"rlhfkit / TRL default (reference forward every step): {rate['rlhfkit'] / rate['trl']:.2f}")
    if "trl-precompute" in rate:
        print(f"rlhfkit / TRL precompute_ref_log_probs=True:          {rate['rlhfkit'] / rate['trl-precompute']:.2f}")
    print(f"ratio: {rate['rlhfkit'] / rate['trl']:.2f}")


if __name__ == "__main__":
    common.run_script(WORKERS, main)
