"""Best-of-n by a reward-model ensemble (mean, WCO, UWO) against a single reward model, scored by the gold scorer.

    python benchmarks/ensemble_best_of_n.py --policy SFT_DIR --prompts PROMPTS.jsonl --single RM_DIR \\
        --ensemble ENSEMBLE_DIR [--gold demo] [--n 16] [--max-prompts 240] [--max-new-tokens 64] \\
        [--temperature 0.7] [--uwo-coef 0.5] [--precision bf16] [--seed 0] [--output-dir runs/ensemble_bon]

Issue 24's check of Coste et al. 2024 ("Reward Model Ensembles Help Mitigate Overoptimization"): does ranking
best-of-n samples by an ensemble's worst member (WCO) reach a gold score at least as high as ranking them by a single
reward model, at the largest n?

1. **One pool.** ``--n`` samples per prompt of the first ``--max-prompts`` prompts from ``--policy``
   (:func:`rlhfkit.sample.run`, every sample at ``--temperature``), written to ``OUTPUT_DIR/pool.jsonl`` (resumed
   when it is there with the same settings). Every ranker picks from this same pool, so the comparison is paired.
2. **Scores.** The gold scorer scores every sample (``--gold``: a built-in scorer or ``module:function``); the single
   reward model its normalised score; the ensemble (``rlhfkit reward ensemble_size=K``, shared heads or
   ``ensemble_backbones=separate``) each member's normalised score, aggregated by
   :func:`rlhfkit.losses.aggregate_rewards` as ``mean``, ``wco`` and ``uwo``.
3. **Best-of-n**, n = 1, 2, 4, ... up to ``--n``: each ranker picks, for each prompt, the highest-scored of the
   prompt's first n samples (the nested pools of ``rlhfkit eval``'s best-of-n); the picked sample's gold score is
   that prompt's outcome.

Besides ``single``, ``members`` is each ensemble member ranking alone, its picks' gold averaged per prompt over the
K members (a single reward model of the ensemble's own recipe, without the luck of one seed).

**Printed** for each n and ranker: the mean gold score of its picks with a 95% bootstrap interval over prompts
(:func:`rlhfkit.stats.paired_bootstrap`) and, for each ensemble aggregation, its per-prompt difference from the single
reward model's pick: mean, 95% paired-bootstrap interval and a sign-flip p-value
(:func:`rlhfkit.stats.sign_flip_p_value`); also the ensemble's mean disagreement (population std over members) on the
pool, and each reward model's held-out accuracy when its ``heldout.json`` is there. ``OUTPUT_DIR/results.json`` holds
the same numbers; the command line is printed first and last. The last line, ``wco - single at n=N: D [lo, hi]``,
is the issue's acceptance number (met when D >= 0).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from rlhfkit import evaluate, sample
from rlhfkit.data.samples import load_items
from rlhfkit.losses import REWARD_AGGREGATIONS, ensemble_std
from rlhfkit.modeling.reward_model import RewardModel
from rlhfkit.rewards import load_reward
from rlhfkit.run_layout import HELDOUT_FILE
from rlhfkit.stats import paired_bootstrap, sign_flip_p_value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="the model whose samples are ranked (the SFT model)")
    parser.add_argument("--prompts", required=True, help="prompt file (held-out prompts)")
    parser.add_argument(
        "--single", required=True, help="a single reward-model directory, or `member0`: the ensemble's first member"
    )
    parser.add_argument("--ensemble", required=True, help="a reward-model ensemble directory")
    parser.add_argument("--gold", default="demo", help="gold scorer: built-in name or module:function")
    parser.add_argument("--n", type=int, default=16, help="samples per prompt (the largest best-of-n)")
    parser.add_argument("--max-prompts", type=int, default=240)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--uwo-coef", type=float, default=0.5, help="uwo: weight of the members' variance")
    parser.add_argument("--batch-size", type=int, default=64, help="sampling batch (prompts)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/ensemble_bon")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n must be at least 2, got {args.n}")
    return args


def compare(per_ranker: dict[str, torch.Tensor], seed: int) -> dict:
    """Each ranker's mean gold with its interval, and each non-single ranker's paired difference from ``single``."""
    out: dict = {}
    for name, values in per_ranker.items():
        entry = {"gold": paired_bootstrap(values.tolist(), seed=seed).as_dict()}
        if name != "single":
            diff = (values - per_ranker["single"]).tolist()
            entry["minus_single"] = {**paired_bootstrap(diff, seed=seed).as_dict(), "p_value": sign_flip_p_value(diff, seed=seed)}
        out[name] = entry
    return out


def heldout(path: str) -> dict | None:
    file = Path(path) / HELDOUT_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool_file = sample.run(
        sample.SampleConfig(
            model=args.policy,
            prompts=args.prompts,
            output=str(out / "pool.jsonl"),
            temperatures=[args.temperature] * args.n,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            max_prompts=args.max_prompts,
            seed=args.seed,
            precision=args.precision,
        )
    )
    items = load_items(pool_file)
    prompts = [p for p, responses in items for _ in responses]
    responses = [r for _, rs in items for r in rs]
    P, N = len(items), args.n
    if any(len(rs) != N for _, rs in items):
        raise SystemExit(f"{pool_file}: every record must hold {N} responses (--n)")

    gold = torch.tensor(load_reward(args.gold)(prompts, responses), dtype=torch.float64).view(P, N)
    ensemble = RewardModel(args.ensemble, precision=args.precision)
    if ensemble.num_members < 2:
        raise SystemExit(f"--ensemble {args.ensemble} is a single reward model, not an ensemble")
    members = ensemble.member_scores(prompts, responses).double()  # (P * N, K)
    if args.single == "member0":  # the ensemble's first member alone (its own gain and bias)
        single_scores = members[:, 0]
    else:
        single = RewardModel(args.single, precision=args.precision)
        if single.num_members != 1:
            raise SystemExit(f"--single {args.single} is an ensemble of {single.num_members}; give one reward model")
        single_scores = torch.tensor(single(prompts, responses), dtype=torch.float64)
    # Each ranker (prompts, N, R): mean, wco, uwo, and each member alone ("members": the single reward model of the
    # ensemble's recipe without the luck of which seed is "the" single one), as rlhfkit eval ranks an ensemble pool.
    ranked = evaluate.ensemble_rankers(members.view(P, N, -1), args.uwo_coef)
    rankers = {"single": single_scores.view(P, N, 1), **{how: ranked[how] for how in REWARD_AGGREGATIONS}}
    rankers["members"] = ranked["members"]
    spread = float(ensemble_std(members).mean())

    ns = [1 << i for i in range(N.bit_length()) if 1 << i <= N]

    def outcomes(n: int) -> dict[str, torch.Tensor]:
        return {name: evaluate.ranker_outcome(r, gold, n) for name, r in rankers.items()}

    table = {n: compare(outcomes(n), args.seed) for n in ns}
    print(
        f"\npool: {P} prompts x {N} samples of {args.policy}; gold {args.gold}; ensemble of {ensemble.num_members} "
        f"members, mean disagreement {spread:.3f} (normalised units)"
    )
    for name, path in (("single", args.single), ("ensemble", args.ensemble)):  # member 0's heldout.json is the ensemble's
        if name == "single" and args.single == "member0":
            continue
        held = heldout(path)
        if held is not None:
            lo, hi = held["accuracy_ci"]
            print(
                f"{name} reward model held-out accuracy {held['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {held['num_pairs']} pairs"
            )
    print("\n   n  ranker   gold [95% CI]              minus single [95% CI]          p")
    for n, rows in table.items():
        for name, entry in rows.items():
            g = entry["gold"]
            line = f"{n:4d}  {name:7s}  {g['value']:.4f} [{g['ci'][0]:.4f}, {g['ci'][1]:.4f}]"
            if "minus_single" in entry:
                d = entry["minus_single"]
                line += f"   {d['value']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]   {d['p_value']:.3f}"
            print(line)
    last = table[ns[-1]]
    # WCO against each member alone at the largest n, from the same per-prompt values compare() used.
    last_outcomes = outcomes(ns[-1])
    wco_vs_members = (last_outcomes["wco"] - last_outcomes["members"]).tolist()
    m = {
        **paired_bootstrap(wco_vs_members, seed=args.seed).as_dict(),
        "p_value": sign_flip_p_value(wco_vs_members, seed=args.seed),
    }
    results = {
        "command": command,
        "num_prompts": P,
        "n": N,
        "ensemble_size": ensemble.num_members,
        "mean_disagreement": spread,
        "heldout": {"single": None if args.single == "member0" else heldout(args.single), "ensemble": heldout(args.ensemble)},
        "best_of_n": {str(n): rows for n, rows in table.items()},
        "wco_minus_members": m,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    d = last["wco"]["minus_single"]
    print(f"results: {out / 'results.json'}\ncommand: {command}")
    print(f"wco - members at n={ns[-1]}: {m['value']:+.4f} [{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}] (p = {m['p_value']:.3f})")
    print(f"wco - single at n={ns[-1]}: {d['value']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] (p = {d['p_value']:.3f})")
    return results


if __name__ == "__main__":
    main()
