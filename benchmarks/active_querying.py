"""Active preference querying vs random querying: held-out reward-model accuracy reached with N labels.

    python benchmarks/active_querying.py --model SFT_DIR --samples SAMPLES.jsonl --labels POOL_LABELS.jsonl \\
        --heldout HELDOUT_LABELS.jsonl [--budgets 256,512] [--initial 128] [--ensemble-size 5] [--seeds 0] \\
        [--strategy disagreement] [--ensemble-backbones shared] [--sequential] [--max-per-prompt 2] [--epochs 2] \\
        [--batch-size 16] [--lr 1e-5] [--num-layers -1] [--max-length 512] [--precision bf16] \\
        [--random-budgets 160,192] [--reuse] [--output-dir runs/active_querying]

For each seed and each label budget N (``--budgets``), two arms train a one-head reward model (``rlhfkit.reward``)
from ``--model`` on N labelled pairs and are scored on the held-out labels:

* **random**: N pairs drawn at random from every candidate pair of ``--samples``
  (:func:`rlhfkit.active.select`, ``strategy=random``);
* **active**: the first ``--initial`` (N0) of those same random pairs train a reward-model *ensemble*
  (``--ensemble-size`` heads on one backbone, bootstrap resamples; Coste et al. 2024), which then picks the other
  N - N0 pairs from the rest of the pool by ``--strategy`` (``disagreement``: spread over heads of P(a > b);
  ``uncertainty``; or ``bal_pm``: BALD plus the novelty of the pair's prompt) with :func:`rlhfkit.active.select`;
  the reward model trains on the N0 + (N - N0). The ensemble is trained once per seed and serves every budget (one
  round of querying, not N - N0 rounds of one).
  ``--ensemble-backbones separate``: the ensemble is K whole reward models (Coste et al.'s and Christiano et al.'s
  independent members; K times the cost) instead of K heads on one backbone.
  ``--sequential``: one round per budget instead: budget N's new pairs are picked by an ensemble trained on all the
  active arm's pairs of the budget before it (N0 for the first), so each round's queries use every label so far
  (Christiano et al. 2017 query in rounds this way), at one ensemble per budget.

``--random-budgets``: more budgets for the random arm alone, its learning curve between ``--budgets``, to find how
many random labels an active budget's accuracy is worth (the first N of the same random order, so they nest).
``--reuse``: a model whose directory is finished and whose training pairs are byte for byte the ones it would train
on now is not trained again (rerun the same command with more random budgets or seeds; every arm is still rescored).

Both arms train with the same settings for the same number of epochs, so at equal N they train the same number of
steps; they differ only in *which* pairs were labelled.

**Labels.** The simulated annotator has labelled the whole pool already (``--labels``): the label of a selected pair
is looked up there instead of asking the annotator again (same labels, as the simulated annotator draws each item's
randomness from the seed and the item alone; and no labelling in the loop). A pair with no label there stops the
script, naming it. To label every pair of a samples file::

    rlhfkit query samples=SAMPLES.jsonl strategy=random num_queries=1000000 max_per_prompt=0 output=pool.jsonl
    rlhfkit label samples=pool.jsonl output=POOL_LABELS.jsonl source=simulated ...

(for samples with two responses a prompt, ``rlhfkit label samples=SAMPLES.jsonl`` labels every pair already; a K-way
ranking's pairs are read as the ranking orders them). The held-out labels are of other prompts, labelled the same way.

**Reported**: for each budget and arm, the held-out accuracy (:func:`rlhfkit.reward.heldout_accuracy`, as
``rlhfkit reward`` computes it: pairs right, ties in the held-out labels left out; run once per model, after
training) with its 95% prompt-clustered bootstrap interval (:func:`rlhfkit.stats.cluster_accuracy`) and the pair
count; the active - random difference, with several seeds its mean and a 95% bootstrap interval over seeds
(:func:`rlhfkit.stats.paired_bootstrap`); pair by pair, for each seed, each active budget minus each random budget at
least as large, on the same held-out pairs with a prompt-clustered interval
(:func:`rlhfkit.stats.cluster_accuracy_difference`: far tighter than the two arms' own intervals, as both face the
same pairs); and for each random budget the smallest active budget that reaches its accuracy.
``OUTPUT_DIR/results.json`` holds the same numbers. The command
line is printed first and last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhfkit import active, reward
from rlhfkit.data.io import read_rows
from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.modeling.models import is_complete_save
from rlhfkit.modeling.reward_model import ENSEMBLE_KEY, MEMBERS_KEY
from rlhfkit.stats import cluster_accuracy_difference, paired_bootstrap

ARMS = ("random", "active")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SFT model directory (or spec) the reward models start from")
    parser.add_argument("--samples", required=True, help="rlhfkit sample output: the pool of candidate pairs")
    parser.add_argument("--labels", required=True, help="labels of every pair of --samples (simulated annotator)")
    parser.add_argument("--heldout", required=True, help="held-out labels (other prompts) the accuracy is measured on")
    parser.add_argument("--budgets", default="256,512", help="comma-separated label budgets N")
    parser.add_argument(
        "--random-budgets",
        default="",
        help="more budgets for the random arm alone (its learning curve between --budgets: with how many random labels "
        "does random reach what active reached?)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="do not train again a model whose directory is finished and whose training pairs are the same (rerun the "
        "same command with more --random-budgets or --seeds and only the new models train)",
    )
    parser.add_argument("--initial", type=int, default=128, help="N0: random pairs the querying ensemble trains on")
    parser.add_argument("--ensemble-size", type=int, default=5, help="heads of the querying ensemble")
    parser.add_argument("--strategy", default="disagreement", choices=("disagreement", "uncertainty", "bal_pm"))
    parser.add_argument("--ensemble-backbones", default="shared", choices=("shared", "separate"))
    parser.add_argument("--sequential", action="store_true", help="one querying round per budget (see above)")
    parser.add_argument("--num-layers", type=int, default=-1, help="reward models keep the first N blocks (-1: all)")
    parser.add_argument("--max-per-prompt", type=int, default=2, help="at most this many selected pairs a prompt (0: any)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (selection and training)")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs over the N pairs (every reward model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--output-dir", default="runs/active_querying")
    args = parser.parse_args(argv)
    args.budgets = sorted({int(b) for b in args.budgets.split(",")})
    args.random_budgets = sorted(set(args.budgets) | {int(b) for b in args.random_budgets.split(",") if b.strip()})
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if not 0 < args.initial < min(args.budgets):
        parser.error(f"--initial must be in (0, smallest budget {min(args.budgets)}), got {args.initial}")
    return args


def pair_labels(path: str) -> dict[tuple[str, str, str], Comparison]:
    """Each labelled pair of ``path`` by :func:`rlhfkit.active.pair_key`: a pair's label as it is, a K-way ranking's
    pairs as two-response comparisons ordered as the ranking orders them, its tied pairs as ties (the first label
    of a pair wins)."""
    found: dict[tuple[str, str, str], Comparison] = {}
    for c in load_comparisons(path):
        if len(c.responses) == 2:
            found.setdefault(active.pair_key(c.prompt, *c.responses), c)
            continue
        position = {response_index: rank for rank, response_index in enumerate(c.ranking)}
        for i in range(len(c.responses)):
            for j in range(i + 1, len(c.responses)):
                tie = (i, j) in c.ties
                ranking = [0, 1] if tie or position[i] < position[j] else [1, 0]
                pair = Comparison(c.prompt, [c.responses[i], c.responses[j]], ranking, tie=tie, source=c.source)
                found.setdefault(active.pair_key(c.prompt, c.responses[i], c.responses[j]), pair)
    return found


def labels_of(queries: Path, labels: dict, labels_path: str) -> list[Comparison]:
    """The labels of the pairs in a query file (from :func:`rlhfkit.active.select`); a pair without one is an error."""
    found = []
    for row in read_rows(queries):
        key = active.pair_key(row.data["prompt"], *row.data["responses"])
        if key not in labels:
            raise SystemExit(
                f"{labels_path} has no label for the pair of sample {row.data['sample_index']} responses "
                f"{row.data['response_indices']} (selected in {queries}, line {row.line}): --labels must label every "
                "pair of --samples (see --help)"
            )
        found.append(labels[key])
    return found


@dataclass
class Run:
    """One arm at one budget and seed."""

    arm: str
    budget: int
    seed: int
    pairs: int
    accuracy: float
    accuracy_ci: list[float]
    heldout_pairs: int
    outcomes: dict
    """Per held-out pair: ``correct`` (1, 0.5, 0) and ``prompt`` (:func:`rlhfkit.reward.heldout_accuracy`'s
    ``per_pair``), aligned across runs, for the paired comparisons."""


def finished(out: Path, heads: int) -> bool:
    """Whether ``out`` holds a finished reward model of ``heads`` members (every save complete by
    :func:`rlhfkit.modeling.models.is_complete_save`)."""
    if not is_complete_save(out):
        return False
    saved = json.loads((out / "config.json").read_text())
    if heads == 1:
        return True
    members = saved.get(MEMBERS_KEY)
    if members is not None:  # separate members, listed once all are trained
        return len(members) == heads - 1 and all(is_complete_save(out / m) for m in members)
    return saved.get(ENSEMBLE_KEY) == heads


def save_pairs(path: Path, pairs: list[Comparison]) -> bool:
    """Write ``pairs`` to ``path``; whether the file held exactly these pairs already (what --reuse checks)."""
    before = path.read_bytes() if path.is_file() else None
    save_comparisons(path, pairs)
    return before == path.read_bytes()


def train_reward(args: argparse.Namespace, data: Path, out: Path, seed: int, *, heads: int = 1, same_data: bool = False) -> None:
    """Train a reward model on ``data`` (no held-out evaluation: :func:`heldout_result` runs the one). With
    ``--reuse``, a finished model in ``out`` trained on the same pairs (``same_data``) is kept instead."""
    if args.reuse and same_data and finished(out, heads):
        print(f"reuse: {out} (finished, trained on the same pairs)", flush=True)
        return
    config = reward.RewardConfig(
        model=args.model,
        data=str(data),
        eval_data="",
        eval_fraction=0.0,
        output_dir=str(out),
        ensemble_size=heads,
        ensemble_backbones=args.ensemble_backbones,
        ensemble_bootstrap=args.ensemble_backbones == "shared",  # separate members differ by seed (Coste et al.)
        num_layers=args.num_layers,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        precision=args.precision,
        normalize=False,  # accuracy ignores it, and the querying ensemble's probabilities use raw scores
        seed=seed,
        resume="never",
        progress=False,
        tensorboard=False,
    )
    reward.train(config)


def heldout_result(args: argparse.Namespace, model_dir: Path, heldout: list[Comparison]) -> dict:
    """:func:`rlhfkit.reward.heldout_accuracy` of the reward model in ``model_dir`` on the held-out pairs, with each
    pair's score (``pairs``: the pairs and order are the same for every model, same comparisons and settings), for
    paired active - random differences. The only held-out evaluation of the model (training runs none)."""
    from rlhfkit.modeling.reward_model import RewardModel

    rm = RewardModel(model_dir, precision=args.precision)
    result = reward.heldout_accuracy(
        rm.model,
        rm.tokenizer,
        heldout,
        batch_size=args.batch_size,
        max_length=args.max_length,
        precision=args.precision,
        per_pair=True,
    )
    return result


def paired(a: Run, b: Run) -> dict:
    """Accuracy of run ``a`` minus run ``b`` on the same held-out pairs: mean and 95% prompt-clustered interval."""
    if a.outcomes["prompt"] != b.outcomes["prompt"]:
        raise SystemExit("the two runs' held-out pairs differ; they cannot be compared pair by pair")
    return cluster_accuracy_difference(a.outcomes["correct"], b.outcomes["correct"], a.outcomes["prompt"]).as_dict()


def query(args: argparse.Namespace, out: Path, seed: int, num: int, **fields) -> Path:
    config = active.QueryConfig(
        samples=args.samples,
        num_queries=num,
        max_per_prompt=args.max_per_prompt,
        output=str(out),
        seed=seed,
        batch_size=args.batch_size,
        precision=args.precision,
        **fields,
    )
    return active.select(config)


def run_seed(args: argparse.Namespace, seed: int, labels: dict, heldout: list[Comparison]) -> list[Run]:
    root = Path(args.output_dir) / f"seed{seed}"
    runs = []

    def record(arm: str, budget: int, train: list[Comparison]) -> bool:
        """Train and score one arm; whether its training pairs were the same as those its file held before."""
        data = root / f"{arm}_{budget}.jsonl"
        same = save_pairs(data, train)
        train_reward(args, data, root / f"{arm}_{budget}", seed, same_data=same)
        result = heldout_result(args, root / f"{arm}_{budget}", heldout)
        run = Run(arm, budget, seed, len(train), result["accuracy"], result["accuracy_ci"], result["num_pairs"], result["pairs"])
        runs.append(run)
        lo, hi = result["accuracy_ci"]
        print(f"seed {seed} N={budget} {arm}: accuracy {result['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {len(train)} pairs")
        return same

    # The random order of the whole pool: budget N takes its first N (select's random picks nest).
    largest = query(args, root / "random_queries.jsonl", seed, max(args.random_budgets), strategy="random")
    random_labels = labels_of(largest, labels, args.labels)
    labelled, labelled_file = random_labels[: args.initial], root / "initial.jsonl"  # the active arm's pairs so far
    same = save_pairs(labelled_file, labelled)
    ensemble_dir = root / "ensemble"
    train_reward(args, labelled_file, ensemble_dir, seed, heads=args.ensemble_size, same_data=same)
    for budget in (b for b in args.random_budgets if b not in args.budgets):  # the random arm's curve between
        record("random", budget, random_labels[:budget])
    for budget in args.budgets:
        record("random", budget, random_labels[:budget])
        # One round (default): labelled stays the initial pairs, and every budget adds to them, picked by the
        # ensemble of the initial pairs. --sequential: each budget adds to the previous budget's pairs, picked by an
        # ensemble trained on them (labelled, labelled_file and ensemble_dir move on below).
        picked = query(
            args,
            root / f"active_queries_{budget}.jsonl",
            seed,
            budget - len(labelled),
            strategy=args.strategy,
            reward_model=str(ensemble_dir),
            exclude=str(labelled_file),
        )
        chosen = labelled + labels_of(picked, labels, args.labels)
        same = record("active", budget, chosen)
        if args.sequential and budget != args.budgets[-1]:
            labelled, labelled_file = chosen, root / f"active_{budget}.jsonl"  # record() wrote this file
            ensemble_dir = root / f"ensemble_{budget}"
            # Its pairs are the active arm's of this budget: unchanged when record() found them unchanged.
            train_reward(args, labelled_file, ensemble_dir, seed, heads=args.ensemble_size, same_data=same)
    return runs


def summarise(args: argparse.Namespace, runs: list[Run], command: str) -> dict:
    """Print the table and the comparisons; returns what results.json holds."""
    print("\nbudget  arm      seed  pairs  held-out accuracy [95% CI]  (held-out pairs)")
    for r in sorted(runs, key=lambda r: (r.budget, r.arm, r.seed)):
        print(
            f"{r.budget:6d}  {r.arm:7s}  {r.seed:4d}  {r.pairs:5d}  {r.accuracy:.3f} [{r.accuracy_ci[0]:.3f}, "
            f"{r.accuracy_ci[1]:.3f}]        ({r.heldout_pairs})"
        )
    mean: dict[tuple[str, int], float] = {}
    differences = {}
    for arm, budgets in (("random", args.random_budgets), ("active", args.budgets)):
        for budget in budgets:
            values = [r.accuracy for r in runs if r.arm == arm and r.budget == budget]
            mean[(arm, budget)] = sum(values) / len(values)
    for budget in args.budgets:
        by_seed = {(r.arm, r.seed): r.accuracy for r in runs if r.budget == budget}
        diffs = [by_seed[("active", s)] - by_seed[("random", s)] for s in args.seeds]
        estimate = paired_bootstrap(diffs, seed=0)
        differences[budget] = estimate.as_dict()
        interval = f" [{estimate.ci[0]:+.3f}, {estimate.ci[1]:+.3f}] over {len(diffs)} seeds" if len(diffs) > 1 else ""
        print(f"N={budget}: active - random accuracy {estimate.value:+.3f}{interval}")
    # Pair by pair: each seed's active run against random runs of the same seed, on the same held-out pairs.
    by_key = {(r.arm, r.budget, r.seed): r for r in runs}
    pairwise = {}
    for seed in args.seeds:
        for small in args.budgets:
            for large in (b for b in args.random_budgets if b >= small):
                d = paired(by_key[("active", small, seed)], by_key[("random", large, seed)])
                pairwise[f"active_{small}_minus_random_{large}_seed{seed}"] = d
                print(
                    f"seed {seed}: active N={small} - random N={large}: {d['value']:+.3f} [{d['ci'][0]:+.3f}, "
                    f"{d['ci'][1]:+.3f}] (paired over {d['n']} held-out pairs, prompt-clustered)"
                )
    reached = {}
    for budget in args.random_budgets:
        enough = [b for b in args.budgets if mean[("active", b)] >= mean[("random", budget)]]
        reached[budget] = min(enough) if enough else None
        what = f"active reaches it with N={reached[budget]}" if enough else "active does not reach it at any budget run"
        print(f"random N={budget} (mean accuracy {mean[('random', budget)]:.3f}): {what}")
    return {
        "command": command,
        "runs": [{k: v for k, v in vars(r).items() if k != "outcomes"} for r in runs],
        "mean_accuracy": {f"{arm}_{budget}": value for (arm, budget), value in mean.items()},
        "active_minus_random": {str(b): d for b, d in differences.items()},
        "paired": pairwise,
        "active_budget_reaching_random": {str(b): n for b, n in reached.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    labels = pair_labels(args.labels)
    heldout = load_comparisons(args.heldout)
    runs = [run for seed in args.seeds for run in run_seed(args, seed, labels, heldout)]
    results = summarise(args, runs, command)
    out = Path(args.output_dir) / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}\ncommand: {command}")
    return results


if __name__ == "__main__":
    main()
