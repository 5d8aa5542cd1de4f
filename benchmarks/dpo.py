"""DPO training throughput: rlhfkit vs TRL's DPOTrainer, same model, data, batches and settings.

    python benchmarks/dpo.py [--steps 12] [--warmup-steps 2] [--batch-size 8] [--max-length 512]
                             [--pairs 128] [--beta 0.1] [--lr 5e-6] [--model smollm2-135m] [--repeats 1]

What is trained. SmolLM2-135M-Instruct (``rlhfkit.modeling.models.resolve("smollm2-135m")``,
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
* ``trl-precompute-eager`` / ``trl-precompute-sdpa``: ``DPOTrainer`` with
  ``precompute_ref_log_probs=True`` (batch size = training batch size, as
  rlhfkit's), its precompute (``_precompute_ref_logps``) timed separately: the
  same work as rlhfkit (reference log-probs once, then one forward/backward per
  step), so this is the headline comparison. The model is loaded with
  ``attn_implementation="eager"`` and ``"sdpa"`` (transformers' default) in two
  separate runs; the faster one is used for the ratio (``--trl-attention`` picks a
  subset).
* ``trl-default-eager`` / ``trl-default-sdpa`` (only with ``--trl-default``):
  ``DPOTrainer`` with its default reference handling, a frozen copy of the model
  forwarded on every step (more work per step than rlhfkit does); its ratio is
  printed above the headline, labelled as such.

How it is measured. The first ``--warmup-steps`` steps are excluded. Time is
the wall clock from the end of step ``warmup`` to the end of the last step (TRL:
``on_step_end`` callback; rlhfkit: the moment its loop logs the step). Pairs/s =
batch size x measured steps / time. Tokens/s counts non-padding tokens
(``attention_mask.sum()`` of chosen + rejected rows) as each library counts them
(TRL ``_total_train_tokens``, rlhfkit ``tokens_seen``), cross-checked against a
count from each side's tokenized data. Reference precompute is one-off work and
not in the window.

Equal work is asserted: every side must train exactly the same non-padding
tokens at every step, and the losses at step 2 must agree within
``--loss-rtol`` (5%: DPO's loss sums log-prob differences over every response
token, so bf16 rounding moves it more than SFT's; on SmolLM2 at batch 8 TRL's own
eager and sdpa runs differ by 3.2% at step 2, rlhfkit lies between them; step 1
is ``ln 2`` by construction, policy = reference), else the script exits 1
without a ratio. Model FLOP/s: 6 x N x tokens/s for the
sides with a precomputed reference (forward + backward of every trained token;
the one-off precompute is outside the window), 8 x N x tokens/s for TRL's default
mode (plus the reference forward each step); printed as a share of a bf16 matmul
probe's peak measured before and after the runs (``common.FLOPS_NOTE``).

The last line is ``ratio: R`` = rlhfkit pairs/s / TRL (precompute_ref_log_probs=True,
faster attention) pairs/s, the median over ``--repeats`` pairs of runs (sides
alternating; the range is printed above it); above 1 means rlhfkit is faster.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import common

# FLOPs per parameter per trained token (see common.FLOPS_NOTE): forward + backward,
# plus a reference forward every step in TRL's default mode.
FLOPS_PER_PARAM_TOKEN = {"trl-default": 8, "trl-precompute": 6, "rlhfkit": 6}
DPO_LOSS_RTOL = 0.05


# ---------------------------------------------------------------- workers


def worker_trl(s: dict, precompute: bool, attn: str) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    import trl.trainer.dpo_trainer as dpo_trainer_mod
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.modeling import models

    B, L = s["batch_size"], s["max_length"]
    tokenizer = models.load_tokenizer(s["model_dir"])  # the tokenizer rlhfkit's DPO uses
    raw, kept, _ = common.load_pair_examples(s, tokenizer, keep_ties=False)
    layout = common.epoch_layout(len(kept), s["steps"], B)
    rows = [raw[kept[i]] for i in layout]
    dataset = datasets.Dataset.from_list(rows)

    # TRL builds the reference model with the policy's attention kernel (DPOTrainer: attn_implementation from
    # model.config), so this choice applies to both.
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=torch.float32, attn_implementation=attn)
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
        DPOTrainer,
        len(rows),
        "pairs; batches would not match rlhfkit's (raise --max-length)",
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
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
    losses = common.trl_losses(trainer)
    ref_model = getattr(trainer, "ref_model", None)
    if not precompute and ref_model is not None and common.attention_of(ref_model) != attn:
        raise SystemExit(f"TRL's reference model runs {common.attention_of(ref_model)} attention, not {attn}")
    ref = "precomputed before training (precompute_ref_log_probs=True)" if precompute else "frozen fp32 copy, forward every step"
    return {
        **common.measured(w, times, cpu_times, tokens_cum, expected),
        "pairs": B * (s["steps"] - w),
        "losses": losses,
        "params_n": common.matmul_params(trainer.model),
        "attention": common.attention_of(trainer.model),
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
    from rlhfkit.dpo import DPOConfig, train
    from rlhfkit.modeling import models

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
        "losses": [m.get("loss") for m in metrics],
        "params_n": common.matmul_params(result.model),
        "attention": common.attention_of(result.model),
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
            "optimizer": "AdamW (rlhfkit.training.optim.build_optimizer, fused=True)",
            "version": f"rlhfkit {getattr(rlhfkit, '__version__', '?')}",
        },
    }


WORKERS = {
    **common.trl_workers("trl-default", worker_trl, precompute=False),
    **common.trl_workers("trl-precompute", worker_trl, precompute=True),
    "rlhfkit": worker_rlhfkit,
}


def flops_k(side: str) -> float:
    return FLOPS_PER_PARAM_TOKEN["rlhfkit" if side == "rlhfkit" else side.rsplit("-", 1)[0]]


# ---------------------------------------------------------------- driver


def main(argv=None) -> None:
    # DPO's step-2 loss is the most rounding-sensitive (see common.check_equal_work): 5%, not 2%.
    p = common.make_parser(__doc__, steps=12, warmup=2, loss_rtol=DPO_LOSS_RTOL)
    common.add_pair_args(p)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (default 5e-6)")
    p.add_argument(
        "--trl-default",
        action="store_true",
        help="also run TRL's default mode (reference forward every step: more work per step than rlhfkit), "
        "its ratio printed above the headline",
    )
    args = common.parse_args(p, argv)
    sides = [*common.trl_sides("trl-precompute", args), "rlhfkit"]
    if args.trl_default:
        sides = [*common.trl_sides("trl-default", args), *sides]

    def precompute_note(r: dict) -> str:
        return f", ref precompute {r['ref_precompute_s']:.1f} s" if r.get("ref_precompute_s") is not None else ""

    def precompute_column(r: dict) -> str:
        if r.get("ref_precompute_s") is None:
            return "-"
        return f"{r['ref_precompute_s']:.1f} s / {r['ref_precompute_pairs']} pairs (+{r['ref_hash_s']:.1f} s hash/cache)"

    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-dpo-") as tmp_name:
        tmp = Path(tmp_name)
        settings = common.start_pairs(args, tmp, f"beta {args.beta}, lr {args.lr}", beta=args.beta, lr=args.lr)
        results = common.run_sides(__file__, sides, settings, tmp, args, width=20, rates=common.pair_rates, after=precompute_note)
        peak = common.final_peak(settings, args)

    print()
    common.print_settings({side: results[side][0] for side in sides})
    common.check_token_counts(results)
    print()
    common.print_pair_table(results, args, peak, flops_k, {"one-off reference precompute": precompute_column})
    print(
        f"N = {results['rlhfkit'][0]['params_n'] / 1e6:.1f}M parameters; k = 6 with a precomputed reference, 8 in TRL's "
        f"default mode; {common.FLOPS_NOTE}"
    )
    print()
    common.check_equal_work(
        results, "rlhfkit", warmup=args.warmup_steps, what="non-padding tokens trained (chosen + rejected)", rtol=args.loss_rtol
    )
    print()

    def pair_rate(r: dict) -> float:
        return r["pairs"] / r["seconds"]

    if args.trl_default:
        default = common.fastest_trl(results, "trl-default", pair_rate, "pairs/s")
        common.report_ratio(
            f"not the headline: rlhfkit / TRL default mode (reference forward every step, "
            f"{common.trl_attention(default)} attention) pairs/s",
            common.pair_ratios(results, "rlhfkit", default, pair_rate),
        )
    trl = common.fastest_trl(results, "trl-precompute", pair_rate, "pairs/s")
    ratio = common.report_ratio(
        f"rlhfkit / TRL precompute_ref_log_probs=True ({common.trl_attention(trl)} attention) pairs/s",
        common.pair_ratios(results, "rlhfkit", trl, pair_rate),
    )
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    common.run_script(WORKERS, main)
