"""Reward models judged on one labels file's held-out comparisons, paired: which one orders them better?

    python benchmarks/reward_accuracy_on_labels.py LABELS --seed S [--eval-fraction 0.1] [--eval-min-pairs 0] \\
        --model NAME=REWARD_DIR[:mean|wco|uwo] --model ... [--output results.json]

The held-out comparisons are those ``rlhfkit reward data=LABELS seed=S eval_fraction=F eval_min_pairs=M`` holds out
(:func:`rlhfkit.data.io.split_holdout` over the file's records). Every strict pair of each one counts (a K-way ranking
gives K(K-1)/2 less its tied pairs; tie labels none): 1 when a model scores the better response higher, 0.5 on equal scores, else 0.
Each model's accuracy has a 95% prompt-clustered bootstrap interval (:func:`rlhfkit.stats.cluster_accuracy`), and each
model minus the first is paired on the same pairs (:func:`rlhfkit.stats.cluster_accuracy_difference`). An ensemble
directory ranks by its aggregation (the suffix; mean when none), as RL and best-of-n use it.

What it answers that ``heldout.json`` cannot: reward models trained on *noisy* labels (``rlhfkit label
flip_rate=0.25``, Coste et al. 2024's setting) judged on the *clean* labels of the same held-out prompts (the clean
file: same records, same seed, so the same split), or several reward models judged on one set.

**Check.** Where a model is a single reward model trained on LABELS with this seed and fraction (its
``config.yaml``; with the same --eval-min-pairs), the pairs here must be its own held-out pairs: as many as its ``heldout.json`` counts, and the same
accuracy, exactly in fp32; in bf16 within ``--bf16-slack`` pairs (2), since the reward stage measured it on the model in
memory in training's batches and here it is scored as RL and best-of-n score it (:func:`rlhfkit.rewards.load_reward`),
in other batches, which moves bf16 near-ties (on a SmolLM2 demo run one pair of 384). The script prints the gap.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
from pathlib import Path

from best_of_n_rankers import parse_ranker, write_results

from rlhfkit import stats
from rlhfkit.config import load_config
from rlhfkit.data.io import split_holdout
from rlhfkit.data.pairwise import strict_pair_count
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.modeling.reward_model import MEMBERS_KEY
from rlhfkit.reward import RewardConfig
from rlhfkit.rewards import load_reward


def strict_pairs(comparisons: list) -> tuple[list[tuple[int, int, int]], list[str]]:
    """Every strict pair of the comparisons as ``(comparison, better, worse)`` response indices (ranking order, best
    first; tie labels and a ranking's tied pairs give none), and each pair's cluster (its prompt, as JSON)."""
    pairs, clusters = [], []
    for i, c in enumerate(comparisons):
        if c.tie:
            continue
        for a, b in itertools.combinations(c.ranking, 2):
            if (min(a, b), max(a, b)) in c.ties:
                continue
            pairs.append((i, a, b))
            clusters.append(json.dumps(c.prompt, sort_keys=True))
    return pairs, clusters


def pair_scores(pairs: list[tuple[int, int, int]], scores: list[list[float]]) -> list[float]:
    """1 where the better response scores higher, 0.5 on equal scores, else 0 (``scores[i]``: comparison i's)."""
    return [1.0 if scores[i][a] > scores[i][b] else 0.5 if scores[i][a] == scores[i][b] else 0.0 for i, a, b in pairs]


def _own_heldout(directory: str, labels: Path, seed: int, fraction: float, min_pairs: int) -> dict | None:
    """``heldout.json`` of a single reward model trained on ``labels`` with this split, else None."""
    root = Path(directory)
    if not all((root / f).is_file() for f in ("config.yaml", "config.json", "heldout.json")):
        return None
    config = load_config(RewardConfig, root / "config.yaml", stages={"reward"})
    single = config.ensemble_size == 1 and not json.loads((root / "config.json").read_text()).get(MEMBERS_KEY)
    same_split = (
        bool(config.data)
        and Path(config.data).resolve() == labels.resolve()
        and not config.eval_data
        and config.seed == seed
        and math.isclose(config.eval_fraction, fraction)
        and config.eval_min_pairs == min_pairs
    )
    return json.loads((root / "heldout.json").read_text()) if single and same_split else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", type=Path, help="a comparisons file (rlhfkit label's output)")
    parser.add_argument("--seed", type=int, required=True, help="the reward stage's seed (sets the split)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="the reward stage's eval_fraction")
    parser.add_argument("--eval-min-pairs", type=int, default=0, help="the reward stage's eval_min_pairs")
    parser.add_argument(
        "--model", action="append", required=True, help="NAME=REWARD_DIR[:mean|wco|uwo]; the first is the reference"
    )
    parser.add_argument("--precision", default="bf16", help="scoring precision (the demo's reward models: bf16)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--bf16-slack", type=int, default=2, help="the check's tolerance in bf16, in pairs (see Check)")
    parser.add_argument("--output", type=Path, default=None, help="results JSON (default: print only)")
    args = parser.parse_args(argv)
    command = shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    print(command, flush=True)
    models = [parse_ranker(m, "--model") for m in args.model]
    if len({name for name, _, _ in models}) != len(models):
        raise SystemExit("--model: names must differ")

    _, held = split_holdout(
        load_comparisons(args.labels), args.eval_fraction, args.seed, min_held=args.eval_min_pairs, weight=strict_pair_count
    )
    pairs, clusters = strict_pairs(held)
    if not pairs:
        raise SystemExit(f"{args.labels}: no strict pair among the {len(held)} held-out comparisons")
    prompts = [c.prompt for c in held for _ in c.responses]
    responses = [r for c in held for r in c.responses]
    offsets = list(itertools.accumulate([0, *(len(c.responses) for c in held)]))
    correct, checks = {}, {}
    for name, directory, aggregation in models:
        fn = load_reward(directory, precision=args.precision, aggregation=aggregation)
        flat = list(fn(prompts, responses))
        del fn
        correct[name] = pair_scores(pairs, [flat[offsets[i] : offsets[i + 1]] for i in range(len(held))])
        own = (
            _own_heldout(directory, args.labels, args.seed, args.eval_fraction, args.eval_min_pairs)
            if aggregation == "mean"
            else None
        )
        if own is not None:
            apart = round(abs(own["accuracy"] * len(pairs) - sum(correct[name])), 6)  # net pairs scored otherwise
            slack = args.bf16_slack if args.precision == "bf16" else 0
            checks[name] = {"ok": own.get("num_pairs") == len(pairs) and apart <= slack, "pairs_apart": apart}

    reference = models[0][0]
    results_by_model = {}
    for name, values in correct.items():
        est = stats.cluster_accuracy(values, clusters, resamples=args.resamples, seed=args.seed)
        entry = {"accuracy": est.value, "accuracy_ci": list(est.ci), "num_pairs": est.n}
        line = f"{name}: {est.value:.3f} [{est.ci[0]:.3f}, {est.ci[1]:.3f}]"
        if name != reference:
            diff = stats.cluster_accuracy_difference(
                values, correct[reference], clusters, resamples=args.resamples, seed=args.seed
            )
            entry[f"minus_{reference}"], entry[f"minus_{reference}_ci"] = diff.value, list(diff.ci)
            line += f" ({name} - {reference} {diff.value:+.3f} [{diff.ci[0]:+.3f}, {diff.ci[1]:+.3f}])"
        results_by_model[name] = entry
        print(line)
    print(f"on {len(pairs)} strict pairs of {len(held)} held-out comparisons ({len(set(clusters))} prompts) of {args.labels}")
    for name, check in checks.items():
        verdict = "passed" if check["ok"] else "FAILED"
        print(
            f"check {verdict}: {name} trained on these labels with this split; its accuracy is {check['pairs_apart']:g} pair(s) from its heldout.json's"
        )
    results = {
        "command": command,
        "labels": str(args.labels),
        "seed": args.seed,
        "eval_fraction": args.eval_fraction,
        "eval_min_pairs": args.eval_min_pairs,
        "num_pairs": len(pairs),
        "num_prompts": len(set(clusters)),
        "models": [{"name": n, "reward_model": d, "aggregation": a} for n, d, a in models],
        "by_model": results_by_model,
        "own_heldout_check": checks,
    }
    write_results(args.output, results)
    return results


if __name__ == "__main__":
    main()
