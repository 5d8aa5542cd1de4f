"""Best-of-n by a reward-model ensemble (WCO, UWO, mean) against one reward model, over many repeats: linear heads.

    python benchmarks/ensemble_best_of_n_linear.py --model smollm2-135m --samples POOL_SAMPLES.jsonl \\
        --labels POOL_LABELS.jsonl --bon BON_SAMPLES.jsonl [--gold demo] [--train-pairs 128,512] \\
        [--ensemble-size 4] [--seeds 0-49] [--l2 1.0] [--uwo-coef 0.5] [--output-dir runs/ensemble_bon_linear] \\
        [--features-dir DIR]

Issue 24's check of Coste et al. 2024 ("Reward Model Ensembles Help Mitigate Overoptimization"), asked of the reward
model of ``active_querying_linear.py`` (rlhfkit's reward model with its backbone frozen: a linear score head on the
final hidden state at the last token, fitted exactly by the Bradley-Terry loss plus ``l2 / 2 |w|^2``), so that the
whole experiment repeats over many training sets instead of resting on one training run:

1. **Training pairs.** For each seed and each ``--train-pairs`` N: the first N pairs of the pool's seeded random
   order (:func:`rlhfkit.active.pick` on ``select``'s random draw, at most ``--max-per-prompt`` a prompt), labelled
   by ``--labels``.
2. **Reward models.** The ensemble: ``--ensemble-size`` K heads, each fitted on its own bootstrap resample of the N
   pairs (:func:`rlhfkit.reward.bootstrap_counts`; a convex fit has no seed to vary, so the resample is what makes
   the members differ). Its rankers are :func:`rlhfkit.evaluate.ensemble_rankers`'s: ``member_0`` (one member: the
   single reward model), ``members`` (each member alone, averaged), ``mean``, ``wco``, ``uwo``; and ``all_pairs``,
   one head fitted on the N pairs themselves (the single reward model that saw every pair once).
3. **Best-of-n** on ``--bon``: a samples file of held-out prompts with N_max responses each (the first n of a
   prompt's responses are its best-of-n pool, for n = 1, 2, 4, ... N_max), or several, comma-separated, whose
   responses to a prompt are joined in that order (:func:`joined_items`: a larger pool from another sampling seed).
   Each ranker picks the highest-scored (:func:`rlhfkit.evaluate.ranker_outcome`) and the pick's ``--gold`` score is
   the outcome.

**Printed**, for each N, n and ranker: the mean gold over seeds and prompts with a 95% interval resampling both
(:func:`rlhfkit.stats.seed_cluster_bootstrap`); for each aggregation its paired difference from ``member_0``, from
``members`` and from ``all_pairs`` with the same interval; and the over-optimisation check (Gao et al. 2022's
best-of-n curve turning down): for each ranker, the paired difference between the gold of its pick from the first n
responses and from the first n/2 (``minus_half``), with "falls at n" where the whole interval lies below 0. The last
line, ``wco - member_0 at n=N_max (N pairs): D [lo, hi]``, is the acceptance number. ``OUTPUT_DIR/results.json``
holds everything; the command is printed first and last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from rlhfkit import evaluate
from rlhfkit.data.preferences import prompt_key
from rlhfkit.data.samples import load_items
from rlhfkit.reward import bootstrap_counts
from rlhfkit.rewards import load_reward
from rlhfkit.stats import seed_cluster_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from active_querying_linear import (  # noqa: E402
    TextIndex,
    add_features_dir,
    cached_features,
    fit_heads,
    labelled_pool,
    parse_seeds,
    random_order,
    standardised,
)

AGGREGATIONS = ("mean", "wco", "uwo")
SINGLES = (evaluate.ENSEMBLE_SINGLE, "members", "all_pairs")


def interval(d: dict) -> str:
    """An estimate and its 95% interval, as printed: ``+0.0123 [-0.0045, +0.0291]``."""
    return f"{d['value']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def overoptimisation_line(steps: list[tuple[int, dict]]) -> str:
    """``steps``: (n, the estimate of gold at n minus gold at n/2). Each step with its interval, then the verdict: the
    n at which the gold fell beyond noise (the whole interval below 0), or none."""
    cells = ", ".join(f"{n}: {interval(d)}" for n, d in steps)
    falls = [n for n, d in steps if d["ci"][1] < 0]
    return f"{cells} -> " + (f"falls at n = {', '.join(map(str, falls))}" if falls else "no fall beyond noise")


def joined_items(paths: list[str]) -> list[tuple]:
    """The (prompt, responses) items of the first samples file, each prompt's responses followed by its responses in
    every other file, in the order given (a prompt is matched by its text); prompts missing from any file are left
    out, with a line saying how many."""
    items = load_items(paths[0])
    for path in paths[1:]:
        more: dict[str, list[str]] = {}
        for prompt, responses in load_items(path):
            more.setdefault(prompt_key(prompt), []).extend(responses)
        joined = [(p, r + more[k]) for p, r in items if (k := prompt_key(p)) in more]
        if len(joined) < len(items):
            print(f"--bon: {len(items) - len(joined)} of {len(items)} prompts are not in {path}: left out", flush=True)
        items = joined
    if not items:
        raise SystemExit(f"--bon: no prompt is in every one of {', '.join(paths)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reward-model backbone (model spec or directory)")
    parser.add_argument("--samples", required=True, help="rlhfkit sample output: the pool the training pairs come from")
    parser.add_argument("--labels", required=True, help="labels of every pair of --samples (simulated annotator)")
    parser.add_argument(
        "--bon",
        required=True,
        help="samples of held-out prompts, N_max responses each: the best-of-n pools (A,B,...: each prompt's responses joined)",
    )
    parser.add_argument("--gold", default="demo", help="gold scorer (built-in or module:function)")
    parser.add_argument("--train-pairs", default="128,512", help="comma-separated training-set sizes N")
    parser.add_argument("--ensemble-size", type=int, default=4)
    parser.add_argument("--seeds", default="0-49", help="seeds: '0-49' or '0,1,2'")
    parser.add_argument("--max-per-prompt", type=int, default=3, help="at most this many training pairs a prompt (0: any)")
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--uwo-coef", type=float, default=0.5)
    parser.add_argument("--num-layers", type=int, default=-1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--output-dir", default="runs/ensemble_bon_linear")
    add_features_dir(parser)
    args = parser.parse_args(argv)
    args.train_pairs = sorted({int(n) for n in args.train_pairs.split(",")})
    args.seeds = parse_seeds(args.seeds)
    if args.ensemble_size < 2:
        parser.error("--ensemble-size must be >= 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    bon_items = joined_items(args.bon.split(","))
    n_max = min(len(responses) for _, responses in bon_items)
    bon_texts = [(prompt, responses[i]) for prompt, responses in bon_items for i in range(n_max)]
    texts = TextIndex()
    pool = labelled_pool(args.samples, args.labels, texts)
    bon_rows = torch.tensor([texts(p, r) for p, r in bon_texts])
    z = standardised(cached_features(args, texts.texts), pool)
    diffs, targets = z[pool["first"]] - z[pool["second"]], pool["targets"]
    bon_z = z[bon_rows].view(len(bon_items), n_max, -1)
    gold = torch.tensor(load_reward(args.gold)([p for p, _ in bon_texts], [r for _, r in bon_texts]), dtype=torch.float64)
    gold = gold.view(len(bon_items), n_max)
    ns = [n for n in (2**i for i in range(n_max.bit_length())) if n <= n_max]
    print(f"pool: {len(targets)} labelled pairs; best-of-n: {len(bon_items)} prompts x {n_max} samples; n = {ns}", flush=True)

    # outcome[(N, n, ranker)]: one (prompts,) row of picked gold per seed
    outcome: dict[tuple[int, int, str], list[np.ndarray]] = {}
    for seed in args.seeds:
        _, order = random_order(seed, pool["groups"], max(args.train_pairs), args.max_per_prompt)
        for size in args.train_pairs:
            chosen = torch.tensor(order[:size])
            counts = bootstrap_counts(size, args.ensemble_size, seed).double()
            heads = fit_heads(diffs[chosen], targets[chosen], counts, args.l2)
            single = fit_heads(diffs[chosen], targets[chosen], torch.ones(size, 1, dtype=torch.float64), args.l2)
            rankers = evaluate.ensemble_rankers(bon_z @ heads, args.uwo_coef)
            rankers["all_pairs"] = bon_z @ single
            for n in ns:
                for name, ranker in rankers.items():
                    outcome.setdefault((size, n, name), []).append(evaluate.ranker_outcome(ranker, gold, n).numpy())
        print(f"seed {seed} done", flush=True)

    clusters = list(range(len(bon_items)))
    results: dict = {"command": command, "seeds": args.seeds, "prompts": len(bon_items), "n": ns, "by_train_pairs": {}}
    for size in args.train_pairs:
        block: dict = {}
        print(
            f"\n{size} training pairs: gold of the best-of-n pick, mean over {len(args.seeds)} seeds [95% CI over seeds and prompts]"
        )
        for n in ns:
            row: dict = {}
            for name in (*SINGLES, *AGGREGATIONS):
                picked = np.stack(outcome[(size, n, name)])  # (seeds, prompts): the gold of each pick
                row[name] = {"gold": seed_cluster_bootstrap(picked, clusters).as_dict()}
                if name in AGGREGATIONS:
                    for other in SINGLES:
                        diff = picked - np.stack(outcome[(size, n, other)])
                        row[name][f"minus_{other}"] = seed_cluster_bootstrap(diff, clusters).as_dict()
                if n > 1:  # over-optimisation: the gold of a pick from twice the pool, against half of it
                    diff = picked - np.stack(outcome[(size, n // 2, name)])
                    row[name]["minus_half"] = seed_cluster_bootstrap(diff, clusters).as_dict()
            block[str(n)] = row
            cells = ", ".join(f"{name} {row[name]['gold']['value']:.4f}" for name in (*SINGLES, *AGGREGATIONS))
            print(f"  n={n:3d}: {cells}")
            for name in AGGREGATIONS:
                d = row[name][f"minus_{evaluate.ENSEMBLE_SINGLE}"]
                print(f"         {name} - member_0 {interval(d)}")
        print("  over-optimisation (gold at n minus gold at n/2; 'falls' where the whole interval is below 0):")
        for name in (*SINGLES, *AGGREGATIONS):
            print(f"    {name}: {overoptimisation_line([(n, block[str(n)][name]['minus_half']) for n in ns if n > 1])}")
        results["by_train_pairs"][str(size)] = block
    out = Path(args.output_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}\ncommand: {command}")
    for size in args.train_pairs:
        d = results["by_train_pairs"][str(size)][str(ns[-1])]["wco"][f"minus_{evaluate.ENSEMBLE_SINGLE}"]
        print(f"wco - member_0 at n={ns[-1]} ({size} pairs): {interval(d)}")
    return results


if __name__ == "__main__":
    main()
