"""Best-of-n by several reward models on one pool, paired: which ranker's picks score higher with the gold scorer?

    python benchmarks/best_of_n_rankers.py RUN_DIR --ranker NAME=REWARD_DIR[:mean|wco|uwo] --ranker ... \\
        [--output results.json]

``RUN_DIR`` is a finished pipeline run (``rlhfkit demo`` / ``rlhfkit run``). Its eval stage's config (rebuilt
from ``RUN_DIR/pipeline.json`` by :func:`rlhfkit.pipeline.build_stages`, so every setting is the run's) draws the
best-of-n pool again with :func:`rlhfkit.evaluate.best_of_n_pool`: the same baseline, prompts, seed and settings,
so the same samples as that eval's (on the same machine; the script checks it, below). Each ``--ranker`` scores
the whole pool (an ensemble directory aggregated as its suffix says, Coste et al. 2024); the gold scorer scores
it once. For each n = 1, 2, 4, ... N, each ranker's per-prompt gold of its best-of-n pick is compared with the
first ranker's by :func:`rlhfkit.evaluate.compare_rankers`: the mean with a 95% bootstrap interval over
prompts, the paired difference with its interval, and a sign-flip p-value.

This answers what one eval cannot: two reward models trained in two runs (a single reward model and an ensemble
from the same labels, say) ranking the *same* samples, so their difference is paired prompt by prompt.

**Check.** Where a ranker is the run's own eval proxy (same directory and aggregation), its best-of-n gold must
equal the ``best_of_<n>`` gold of the run's ``eval.json`` for every n; the script prints whether it does.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from rlhfkit import evaluate, pipeline
from rlhfkit.config import from_dict
from rlhfkit.rewards import load_reward


def parse_ranker(text: str, flag: str = "--ranker") -> tuple[str, str, str]:
    """``NAME=DIR[:aggregation]`` -> (name, directory, aggregation); aggregation mean when not given. ``flag``: the
    option named in the error."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"{flag} {text!r}: expected NAME=REWARD_DIR[:mean|wco|uwo]")
    directory, colon, aggregation = rest.rpartition(":")
    if colon and aggregation in ("mean", "wco", "uwo"):
        return name, directory, aggregation
    return name, rest, "mean"


def write_results(path: Path | None, results: dict) -> None:
    """``results`` as indented JSON at ``path`` (its folder made), and say where; nothing when ``path`` is None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"-> {path}")


def eval_config(run_dir: Path) -> evaluate.EvalConfig:
    """The run's eval stage config, rebuilt from its pipeline.json."""
    record = json.loads((run_dir / "pipeline.json").read_text())
    config = from_dict(pipeline.PipelineConfig, record, source=str(run_dir / "pipeline.json"))
    stage = next(s for s in pipeline.build_stages(config) if s.name == "eval")
    return stage.config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--ranker", action="append", required=True, help="NAME=REWARD_DIR[:mean|wco|uwo]; the first is the reference"
    )
    parser.add_argument("--output", type=Path, default=None, help="results JSON (default: print only)")
    args = parser.parse_args(argv)
    command = shlex.join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    print(command, flush=True)
    rankers = [parse_ranker(r) for r in args.ranker]
    if len({name for name, _, _ in rankers}) != len(rankers):
        raise SystemExit("--ranker: names must differ")

    c = eval_config(args.run_dir)
    N = c.best_of_n
    prompts = evaluate.pool_prompts(c, evaluate.eval_prompts(c))
    M = len(prompts)
    pool = evaluate.best_of_n_pool(c, prompts)
    gold = torch.tensor(list(load_reward(c.gold, precision=c.precision)(pool.prompts, pool.responses)), dtype=torch.float64)
    gold = gold.view(M, N)
    scores = {}
    for name, directory, aggregation in rankers:
        fn = load_reward(directory, precision=c.precision, aggregation=aggregation, uwo_coef=c.reward_uwo_coef)
        scores[name] = torch.tensor(list(fn(pool.prompts, pool.responses)), dtype=torch.float64).view(M, N, 1)
        del fn

    reference = rankers[0][0]
    sizes = evaluate.best_of_n_sizes(N)
    by_n = {}
    for n in sizes:
        outcomes = {name: evaluate.ranker_outcome(s, gold, n) for name, s in scores.items()}
        by_n[str(n)] = evaluate.compare_rankers(outcomes, single=reference, seed=c.seed, resamples=c.resamples)

    # The check: a ranker that is the run's own proxy reproduces the eval's best-of-n gold.
    run_eval = json.loads((args.run_dir / "eval" / "eval.json").read_text())
    checks = {}
    for name, directory, aggregation in rankers:
        if Path(directory).resolve() == Path(c.proxy).resolve() and aggregation == c.reward_aggregation:
            ours = [by_n[str(n)][name]["gold_score"] for n in sizes]
            theirs = [run_eval["players"][f"best_of_{n}"]["gold_score"] for n in sizes]
            checks[name] = all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(ours, theirs))

    def interval(entry: dict, key: str) -> str:
        lo, hi = entry[f"{key}_ci"]
        return f"{entry[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    print(f"pool: {M} prompts x {N} samples from {c.baseline}; gold {c.gold}; reference ranker {reference}")
    for n, entry in by_n.items():
        parts = []
        for name in scores:
            e = entry[name]
            lo, hi = e["gold_score_ci"]
            part = f"{name} {e['gold_score']:.3f} [{lo:.3f}, {hi:.3f}]"
            if name != reference:
                part += f" ({name} - {reference} {interval(e, f'minus_{reference}')}, p = {e[f'minus_{reference}_p']:.3g})"
            parts.append(part)
        print(f"n = {n}: " + "; ".join(parts))
    for name, ok in checks.items():
        print(f"check: {name} is the run's eval proxy; its best-of-n gold {'equals' if ok else 'DIFFERS FROM'} eval.json's")
    results = {
        "command": command,
        "run_dir": str(args.run_dir),
        "num_prompts": M,
        "best_of_n": N,
        "gold": c.gold,
        "rankers": [{"name": n, "reward_model": d, "aggregation": a} for n, d, a in rankers],
        "by_n": by_n,
        "eval_check": checks,
    }
    write_results(args.output, results)
    print(command, flush=True)
    return results


if __name__ == "__main__":
    main()
