"""Active vs random preference querying, many repeats: a linear score head on a frozen reward-model backbone.

    python benchmarks/active_querying_linear.py --model smollm2-135m --samples POOL_SAMPLES.jsonl \\
        --labels POOL_LABELS.jsonl --heldout HELDOUT_LABELS.jsonl [--budgets 64,96,...,512] [--initial 32] \\
        [--round-size 16] [--ensemble-size 8] \\
        [--strategies disagreement,uncertainty,d_optimal,variance_reduction,importance,bal_pm] \\
        [--targets 1024] [--mix 0.5] [--beta 1.0] [--seeds 0-49] \\
        [--max-per-prompt 3] [--l2 1.0] [--num-layers -1] [--precision fp32] [--output-dir runs/aq_linear]

``active_querying.py`` fine-tunes a whole reward model per arm, budget and seed (minutes each on a CPU), so its few
seeds cannot separate the querying rule from one training run's noise: there the random arm's own curve was not
monotone. This script asks the same question of a reward model whose training is exact and takes milliseconds, so
that it can repeat the experiment over many seeds and budgets:

* **The reward model** is rlhfkit's reward model (``rlhfkit.modeling.reward_model``: the backbone's final hidden
  state at the last token, then a linear ``score`` head) with the backbone frozen and only the head trained: the
  features of every response are computed once (:func:`features`: the library's own scorer,
  :func:`~rlhfkit.modeling.reward_model.raw_scores`, with the head set to the identity), standardised over the
  pool, and the head is fitted by the library's Bradley-Terry loss (:func:`rlhfkit.losses.preference_loss`) plus an
  L2 penalty ``l2 / 2 * |w|^2``, to convergence with L-BFGS (:func:`fit_heads`). The objective is convex, so a set
  of labelled pairs determines its reward model: no training noise, the arms differ only by *which* pairs they
  labelled. (A linear probe: weaker than fine-tuning the backbone; the accuracies here are that model's.)
* **random**: the pool's pairs in the seeded order :func:`rlhfkit.active.select` draws with ``strategy=random``
  (at most ``--max-per-prompt`` a prompt); budget N takes the first N.
* **active** (one arm per ``--strategies`` entry): the first ``--initial`` of the same random pairs, then rounds of
  ``--round-size`` pairs, each picked from the unlabelled rest by :func:`rlhfkit.active.pick` (at most
  ``--max-per-prompt`` a prompt a round) on the acquisition score of an ensemble of ``--ensemble-size`` heads, each
  fitted to its own bootstrap resample of every pair labelled so far (:func:`rlhfkit.reward.bootstrap_counts`;
  Coste et al. 2024's ensembles, Christiano et al. 2017's rounds): ``disagreement``
  (:func:`rlhfkit.active.preference_disagreement`) or ``uncertainty`` (:func:`~rlhfkit.active.preference_uncertainty`).
  Two more arms score pairs by the head's Laplace posterior instead of an ensemble (:func:`greedy_laplace_picks`,
  each round on the head fitted to every label so far): ``d_optimal`` (the expected information gain about the
  head) and ``variance_reduction`` (the expected drop in the predictive variance on ``--targets`` pool pairs, which
  discounts outliers), each batch picked greedily with the posterior updated after every pick. ``importance``
  draws each round's pairs at random instead, from a proposal that favours pairs of large posterior logit spread
  (mixed with the uniform draw by ``--mix``; :func:`importance_picks`), and fits every head of the arm to the
  pairs weighted by Farquhar et al. 2021's LURE weights (:func:`lure_weights`), which make the weighted loss an
  unbiased estimate of the whole pool's: active selection without its selection bias. ``bal_pm`` (Melo et al.
  2024's BAL-PM) scores by the ensemble's BALD plus ``--beta`` times the novelty of the pair's prompt among the
  prompts labelled so far (:func:`rlhfkit.active.diverse_pick`, as ``rlhfkit query strategy=bal_pm``), which
  should keep uncertainty sampling off redundant prompts.
  Labels come from ``--labels`` (the simulated annotator labelled the whole pool beforehand; ``active_querying.py
  --help`` gives the commands); a selected pair without a label stops the script, naming it. A K-way ranking's tied
  pairs (``Comparison.ties``) are ties here; labels written before the annotator recorded them order tied responses
  arbitrarily, which adds coin flips to the held-out accuracy: label the held-out pairs one by one then
  (``examples/active_querying_linear.sh`` does).

**Reported**, for each budget and arm: the held-out accuracy (pairs of ``--heldout`` right; ties in the labels left
out; equal scores half right) as the mean over seeds with a 95% interval that resamples both the seeds and the
held-out prompts (:func:`rlhfkit.stats.seed_cluster_bootstrap`); each active arm minus random at the same budget,
paired pair by pair and seed by seed, with the same two-way interval; and the **labels saved**: for each active
budget, the random budget (linear between the budgets run) at which random's mean accuracy first reaches the active
arm's, with a 95% interval from the same resampling, and the ratio of the two budgets. ``OUTPUT_DIR/results.json``
holds the numbers and, per seed and arm, the pool pairs labelled in the order picked (``picks``: numbers of
:func:`rlhfkit.active.candidates` of ``--samples``; budget N's are the first N), to audit what each rule chose; the
command line is printed first and last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from rlhfkit import active
from rlhfkit.data.samples import load_items
from rlhfkit.losses import preference_loss
from rlhfkit.reward import bootstrap_counts
from rlhfkit.stats import cluster_sums, seed_cluster_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from active_querying import pair_labels  # noqa: E402  (the same pair lookup as the fine-tuning benchmark)

RANDOM = "random"
ENSEMBLE_RULES = {"disagreement": active.preference_disagreement, "uncertainty": active.preference_uncertainty}
"""Arms scored by an ensemble of bootstrap heads (the library's rules)."""
LAPLACE_RULES = ("d_optimal", "variance_reduction")
"""Arms scored by the head's Laplace posterior (:func:`greedy_laplace_picks`)."""
IMPORTANCE = "importance"
"""The arm that draws pairs at random with a posterior-informed proposal and weights them back
(:func:`importance_picks`, :func:`lure_weights`)."""
BAL_PM = "bal_pm"
"""The arm that adds to the ensemble's BALD the novelty of the pair's prompt among those labelled (the library's
``rlhfkit query strategy=bal_pm``: :func:`rlhfkit.active.preference_bald`, :func:`rlhfkit.active.diverse_pick`;
Melo et al. 2024)."""
STRATEGIES = (*ENSEMBLE_RULES, *LAPLACE_RULES, IMPORTANCE, BAL_PM)


def parse_seeds(text: str) -> list[int]:
    """``0,3,5`` or ``0-49`` (inclusive), or both comma-separated."""
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            low, high = part.split("-", 1)
            seeds.extend(range(int(low), int(high) + 1))
        elif part.strip():
            seeds.append(int(part))
    return sorted(set(seeds))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reward-model backbone (model spec or directory)")
    parser.add_argument("--samples", required=True, help="rlhfkit sample output: the pool of candidate pairs")
    parser.add_argument("--labels", required=True, help="labels of every pair of --samples (simulated annotator)")
    parser.add_argument("--heldout", required=True, help="held-out labels (other prompts) the accuracy is measured on")
    parser.add_argument("--budgets", default="64,96,128,192,256,384,512", help="comma-separated label budgets")
    parser.add_argument("--initial", type=int, default=32, help="random pairs before the first active round")
    parser.add_argument("--round-size", type=int, default=16, help="pairs picked per active round")
    parser.add_argument("--ensemble-size", type=int, default=8, help="bootstrap heads of the querying ensemble")
    parser.add_argument(
        "--strategies", default="disagreement,uncertainty", help=f"active arms (comma-separated): {', '.join(STRATEGIES)}"
    )
    parser.add_argument(
        "--targets", type=int, default=1024, help="variance_reduction: pool pairs (a seeded sample) whose variance it reduces"
    )
    parser.add_argument(
        "--mix", type=float, default=0.5, help="importance: the uniform share of its proposal (defensive mixture; 1: random)"
    )
    parser.add_argument(
        "--beta", type=float, default=1.0, help="bal_pm: the weight of the prompt-novelty term (both terms standardised)"
    )
    parser.add_argument("--seeds", default="0-49", help="seeds: '0-49' or '0,1,2' (selection order and bootstraps)")
    parser.add_argument("--max-per-prompt", type=int, default=3, help="at most this many pairs a prompt (0: any)")
    parser.add_argument("--l2", type=float, default=1.0, help="L2 penalty on the head (standardised features)")
    parser.add_argument("--num-layers", type=int, default=-1, help="the backbone keeps its first N blocks (-1: all)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="responses per forward when computing features")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--output-dir", default="runs/active_querying_linear")
    add_features_dir(parser)
    args = parser.parse_args(argv)
    args.budgets = sorted({int(b) for b in args.budgets.split(",")})
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.seeds = parse_seeds(args.seeds)
    for strategy in args.strategies:
        if strategy not in STRATEGIES:
            parser.error(f"--strategies: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if args.targets < 1:
        parser.error("--targets must be >= 1")
    if not 0 < args.mix <= 1:
        parser.error(f"--mix must be in (0, 1] (the proposal must reach every pair), got {args.mix}")
    if not 0 < args.initial <= min(args.budgets):
        parser.error(f"--initial must be in (0, smallest budget {min(args.budgets)}], got {args.initial}")
    if args.round_size < 1 or args.ensemble_size < 2:
        parser.error("--round-size must be >= 1 and --ensemble-size >= 2")
    return args


# ----------------------------------------------------------------------------- features of the frozen backbone


def add_features_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--features-dir",
        default="",
        help="where the features are cached (default: --output-dir); give both linear benchmarks the same one to "
        "compute each response's features once",
    )


@torch.no_grad()
def features(
    spec: str, prompts: list, responses: list[str], *, num_layers: int, max_length: int, batch_size: int, precision: str
) -> torch.Tensor:
    """(n, hidden) float64: what the score head of rlhfkit's reward model reads for each (prompt, response): the
    final hidden state at the response's last token (the library's :func:`~rlhfkit.modeling.reward_model.head_inputs`,
    so tokenisation, chat template, packing and truncation are the reward stage's)."""
    from rlhfkit.modeling.reward_model import head_inputs, load_reward_backbone, reward_tokenizer

    tokenizer = reward_tokenizer(spec)
    model = load_reward_backbone(spec, pad_token_id=tokenizer.pad_token_id, num_layers=num_layers)
    out = head_inputs(
        model,
        tokenizer,
        prompts,
        responses,
        batch_size=batch_size,
        max_length=max_length,
        precision=precision,
        progress="features",
    )
    return out.reshape(len(responses), model.config.hidden_size).double()


def cached_features(args: argparse.Namespace, texts: list[tuple]) -> torch.Tensor:
    """:func:`features` of ``texts`` ((prompt, response) pairs), in their order. Cached in OUTPUT_DIR, one file per
    backbone setting (model, blocks, length, precision), keyed by each text: only texts not in it are computed (so
    the two linear benchmarks, and reruns, share one computation)."""
    setting = hashlib.sha256(json.dumps([args.model, args.num_layers, args.max_length, args.precision]).encode()).hexdigest()[:16]
    path = Path(args.features_dir or args.output_dir) / f"features_{setting}.pt"
    cache = torch.load(path) if path.is_file() else {"keys": [], "x": None}
    row = {key: i for i, key in enumerate(cache["keys"])}
    keys = [json.dumps(list(t), sort_keys=True) for t in texts]
    missing = [key for key in dict.fromkeys(keys) if key not in row]
    if missing:
        new = features(
            args.model,
            [json.loads(key)[0] for key in missing],
            [json.loads(key)[1] for key in missing],
            num_layers=args.num_layers,
            max_length=args.max_length,
            batch_size=args.batch_size,
            precision=args.precision,
        )
        cache = {"keys": cache["keys"] + missing, "x": new if cache["x"] is None else torch.cat([cache["x"], new])}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(cache, tmp)
        tmp.replace(path)  # a killed run leaves the old cache whole
        row = {key: i for i, key in enumerate(cache["keys"])}
    print(f"features: {len(keys) - len(missing)} of {len(keys)} from {path}", flush=True)
    return cache["x"][[row[key] for key in keys]]


# ----------------------------------------------------------------------------- the linear head


def fit_heads(diffs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, l2: float) -> torch.Tensor:
    """Heads ``W`` (d, K) minimising, for each head k independently,
    ``sum_i weights[i, k] * preference_loss(diffs[i] @ W[:, k], 0, targets[i]) / sum_i weights[i, k] + l2 / 2 * |W[:, k]|^2``.

    diffs: (n, d) feature of the first response minus the second's; targets: (n,) P(first preferred) (1, 0, 0.5);
    weights: (n, K) (bootstrap counts; ones for one plain fit). Strictly convex for l2 > 0: L-BFGS finds the one
    minimum (the sum over heads is separable, so one solve fits them all)."""
    n, d = diffs.shape
    heads = weights.shape[1]
    w = torch.zeros(d, heads, dtype=torch.float64, requires_grad=True)
    norm = weights.sum(0).clamp_min(1e-12)
    optimizer = torch.optim.LBFGS(
        [w], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        scores = diffs @ w  # (n, K): r(first) - r(second) for each head
        losses = preference_loss(scores, torch.zeros_like(scores), targets[:, None].expand_as(scores))
        loss = ((weights * losses).sum(0) / norm).sum() + l2 / 2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def accuracy_per_pair(w: torch.Tensor, heldout_diffs: torch.Tensor) -> np.ndarray:
    """Each held-out pair right (1), wrong (0) or scored equal (1/2); diffs are preferred minus other."""
    margin = heldout_diffs @ w
    return ((margin > 0).double() + 0.5 * (margin == 0).double()).numpy()


# ----------------------------------------------------------------------------- the head's Laplace posterior


def posterior_covariance(diffs: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    """The Laplace posterior covariance of the head fitted by :func:`fit_heads` (one head ``w``, plain weights) to
    the labelled pairs' ``diffs`` (n, d): the inverse Hessian of ``n`` times its objective,
    ``(sum_i s_i d_i d_i^T + n l2 I)^-1``, with ``s_i = p_i (1 - p_i)`` the Fisher weight of pair i at ``w``
    (``p_i = sigmoid(d_i @ w)``; MacKay 1992, "The evidence framework applied to classification networks")."""
    p = torch.sigmoid(diffs @ w)
    precision = (diffs.T * (p * (1 - p))) @ diffs + len(diffs) * l2 * torch.eye(diffs.shape[1], dtype=diffs.dtype)
    cov = torch.linalg.inv(precision)
    return (cov + cov.T) / 2


def greedy_laplace_picks(
    candidates: torch.Tensor,
    w: torch.Tensor,
    cov: torch.Tensor,
    targets: torch.Tensor,
    rule: str,
    *,
    num: int,
    tiebreak: list[float],
    groups: list[str],
    max_per_group: int,
) -> list[int]:
    """A batch of ``num`` candidates (rows of ``candidates``, pair feature differences (C, d)), picked greedily under
    the head's Laplace posterior N(``w``, ``cov``): each pick is the candidate of highest score, and the posterior is
    then updated as if it were labelled (the rank-one update of ``cov`` by its predicted Fisher weight), so a batch
    does not spend labels on one direction twice (batch-mode experimental design). Scores, with ``s_x = p_x (1 -
    p_x)`` at ``w``:

    * ``d_optimal``: ``log(1 + s_x x^T cov x)``, the expected information gain about the head (the log-determinant
      growth of the posterior precision; D-optimal design, MacKay 1992 "Information-based objective functions for
      active data selection"; BALD for this posterior, Houlsby et al. 2011). It favours pairs far out along poorly
      known directions -- the outliers that disagreement sampling picked here;
    * ``variance_reduction``: ``sum_t s_t^2 (t^T cov x)^2 s_x / (1 + s_x x^T cov x)`` over the rows ``t`` of
      ``targets`` (pairs like those the model will be asked about: a sample of the pool): the drop in the summed
      predictive variance of ``P(t)`` (delta method: ``s_t^2`` times the margin's variance) that labelling ``x``
      brings. Prediction-oriented rather than parameter-oriented acquisition (Cohn, Ghahramani & Jordan 1996's
      variance reduction; EPIG, Bickford Smith et al. 2023), which discounts outliers that inform no typical pair.

    Equal scores go to the higher ``tiebreak``; a candidate whose group already has ``max_per_group`` picks in this
    batch (0: no cap) is skipped, as :func:`rlhfkit.active.pick` does. Fewer than ``num`` when the candidates run
    out."""
    if rule not in LAPLACE_RULES:
        raise ValueError(f"rule must be one of {LAPLACE_RULES}, got {rule!r}")
    fisher = torch.sigmoid(candidates @ w)
    fisher = fisher * (1 - fisher)
    projected = candidates @ cov  # (C, d)
    q = (projected * candidates).sum(1)  # x^T cov x
    if rule == "variance_reduction":
        target_fisher = torch.sigmoid(targets @ w)
        target_weight = (target_fisher * (1 - target_fisher)) ** 2
        g = targets @ projected.T  # (T, C): t^T cov x

    def score(free: torch.Tensor) -> torch.Tensor:
        if rule == "d_optimal":
            return torch.log1p(fisher * q)
        return (target_weight[:, None] * g * g).sum(0) * fisher / (1 + fisher * q)

    def picked(k: int) -> None:
        # cov <- (cov^-1 + s x x^T)^-1 (Sherman-Morrison), and every quantity above with it
        nonlocal cov, q, g
        x, s = candidates[k], fisher[k]
        u = cov @ x
        c = s / (1 + s * (x @ u))
        cov = cov - c * torch.outer(u, u)
        along = candidates @ u  # (C,)
        q = q - c * along * along
        if rule == "variance_reduction":
            g = g - c * torch.outer(targets @ u, along)

    return active.greedy_pick(score, picked, num=num, tiebreak=tiebreak, groups=groups, max_per_group=max_per_group)


def importance_picks(
    candidates: torch.Tensor,
    w: torch.Tensor,
    cov: torch.Tensor,
    *,
    num: int,
    rng: np.random.Generator,
    mix: float,
    groups: list[str],
    max_per_group: int,
) -> tuple[list[int], list[float]]:
    """A batch of ``num`` candidates (rows of ``candidates``, (C, d)) drawn at random without replacement, and the
    probability each had when it was drawn. The proposal mixes a score with the uniform draw (a defensive mixture,
    Hesterberg 1995, so every candidate keeps a probability of at least ``mix`` / its number):
    ``q(x) = (1 - mix) * a(x) / sum(a) + mix / n`` over the ``n`` candidates still open, with
    ``a(x) = sqrt(s_x x^T cov x)`` (``s_x = p_x (1 - p_x)`` at ``w``): the standard deviation of the pair's logit
    under the head's Laplace posterior N(``w``, ``cov``), times the Fisher weight's square root -- the expected size
    of the gradient the pair's label would bring, in the posterior's metric (expected gradient length, Settles,
    Craven & Ray 2008). Drawn, not taken greedily: the picks then come with their probabilities, which
    :func:`lure_weights` turns into weights that undo the selection bias (the rules above pick by score and lost
    labels here, fitting a misspecified head to pairs unlike the held-out ones). A candidate whose group already
    has ``max_per_group`` draws in this batch (0: no cap) leaves the open set, as :func:`rlhfkit.active.pick` skips
    it; its pairs then have probability 0 for the rest of the batch, which the weights do not undo (a small
    departure from unbiasedness, as random's order is capped too). Fewer than ``num`` when the candidates run out."""
    fisher = torch.sigmoid(candidates @ w)
    fisher = fisher * (1 - fisher)
    score = torch.sqrt((fisher * ((candidates @ cov) * candidates).sum(1)).clamp_min(0)).numpy()
    open_ = np.ones(len(candidates), dtype=bool)
    group_ids = np.unique(np.asarray(groups), return_inverse=True)[1]
    per_group: dict[int, int] = {}
    picked, probabilities = [], []
    while len(picked) < num and open_.any():
        a = np.where(open_, score, 0.0)
        total = a.sum()
        q = (1 - mix) * (a / total if total > 0 else open_ / open_.sum()) + mix * open_ / open_.sum()
        q = q / q.sum()
        k = int(rng.choice(len(candidates), p=q))
        picked.append(k)
        probabilities.append(float(q[k]))
        open_[k] = False
        group = int(group_ids[k])
        per_group[group] = per_group.get(group, 0) + 1
        if max_per_group and per_group[group] >= max_per_group:
            open_ &= group_ids != group
    return picked, probabilities


def lure_weights(probabilities: list[float], pool_size: int) -> np.ndarray:
    """The weights of Farquhar, Gal & Rainforth (2021, "On statistical bias in active learning: how and when to fix
    it", eq. 3, the R_LURE estimator) for ``M`` pairs drawn one after another without replacement from a pool of
    ``N`` = ``pool_size``, the m-th with probability ``q_m`` (given the draws before it):
    ``v_m = 1 + (N - M) / (N - m) * (1 / ((N - m + 1) q_m) - 1)``. Then ``sum_m v_m L_m / M`` is an unbiased estimate
    of the pool's mean loss ``sum_i L_i / N`` whatever the proposal (one that can reach every pair), so a head
    fitted to the weighted pairs aims at the fit to the whole pool, as random's does. A uniform draw
    (``q_m = 1 / (N - m + 1)``) has weight 1, and no weight is negative ((N - M) / (N - m) <= 1)."""
    q = np.asarray(probabilities, dtype=np.float64)
    size = len(q)
    if size > pool_size:
        raise ValueError(f"{size} draws from a pool of {pool_size}")
    m = np.arange(1, size + 1)
    # m = M = N: the last draw has no undrawn rest, (N - M) / (N - m) = 0 / 0; its q is 1 and its weight 1
    share = np.divide(pool_size - size, pool_size - m, out=np.ones(size), where=pool_size - m > 0)
    return 1 + share * (1 / ((pool_size - m + 1) * q) - 1)


def unbiased_variance_ratio(
    diffs: torch.Tensor,
    w: torch.Tensor,
    cov: torch.Tensor,
    heldout_diffs: torch.Tensor,
    label_probability: torch.Tensor | None = None,
) -> float:
    """How much any unbiased (importance-weighted) selection could save, to first order: the least variance a
    proposal can give the pool's mean gradient, relative to the uniform draw's.

    Near the head ``w`` the fit moves by ``n cov`` times the error of the labelled pairs' mean gradient (the scale
    ``n`` cancels in the ratio), an estimate of
    the pool's ``m = sum_i u_i / N`` with ``u_i = (y_i - p_i) d_i`` (``p_i = sigmoid(d_i @ w)``; ``y_i`` the label);
    the held-out predictions move by the margin change weighted by ``s_t = p_t (1 - p_t)``, so the error is measured
    in ``A = cov (mean_t s_t^2 t t^T) cov`` over the held-out pairs ``t``. Drawing ``n`` pairs from a proposal ``q``
    (with replacement: n << N) and weighting each by ``1 / (N q_i)`` gives ``E|m_hat - m|_A^2 = (sum_i E|u_i|_A^2 /
    (N^2 q_i) - |m|_A^2) / n``, least at ``q_i ∝ g_i = sqrt(E|u_i|_A^2)`` (the standard optimal importance sampling);
    the ratio to the uniform draw is ``((mean g)^2 - |m|_A^2) / (mean g^2 - |m|_A^2)``, and one minus it is about the
    share of labels the best such proposal saves. ``E`` is over the label: ``y_i = 1`` with probability
    ``label_probability`` (the annotator's own, for an oracle that no querying rule can beat), else the head's
    ``p_i`` (then ``m = 0``: what a rule knowing only the head could reach)."""
    p = torch.sigmoid(diffs @ w)
    truth = p if label_probability is None else label_probability
    held = torch.sigmoid(heldout_diffs @ w)
    metric = cov @ ((heldout_diffs.T * (held * (1 - held)) ** 2) @ heldout_diffs / len(heldout_diffs)) @ cov
    squared = (truth * (1 - p) ** 2 + (1 - truth) * p**2) * ((diffs @ metric) * diffs).sum(1)  # E|u_i|_A^2
    mean_gradient = ((truth - p)[:, None] * diffs).mean(0)
    bias = float(mean_gradient @ metric @ mean_gradient)
    return (float(squared.sqrt().mean()) ** 2 - bias) / (float(squared.mean()) - bias)


def variance_ratios(
    heads: dict[int, torch.Tensor], order: list[int], pool: dict, heldout_diffs: torch.Tensor, l2: float
) -> dict[int, dict]:
    """:func:`unbiased_variance_ratio` at random's head for each budget (``heads[N]``, fitted to the first N pairs of
    ``order``): ``model`` (labels as the head predicts them) and, when every pool label records the annotator's
    probability, ``oracle``."""
    diffs = pool["diffs"]
    out = {}
    for budget, w in heads.items():
        cov = posterior_covariance(diffs[torch.tensor(order[:budget])], w, l2)
        out[budget] = {"model": unbiased_variance_ratio(diffs, w, cov, heldout_diffs)}
        if pool.get("label_probability") is not None:
            out[budget]["oracle"] = unbiased_variance_ratio(diffs, w, cov, heldout_diffs, pool["label_probability"])
    return out


# ----------------------------------------------------------------------------- one seed


def random_order(seed: int, groups: list[str], num: int, max_per_prompt: int) -> tuple[list[float], list[int]]:
    """:func:`rlhfkit.active.select`'s random draw for ``seed`` over the pool (one number per candidate, also the
    tie-break of every later pick) and the first ``num`` candidates in that order, at most ``max_per_prompt`` a
    prompt; a pool too small for ``num`` stops the script."""
    tiebreak = np.random.default_rng(seed).random(len(groups)).tolist()
    order = active.pick(tiebreak, tiebreak, groups, num=num, max_per_group=max_per_prompt)
    if len(order) < num:
        raise SystemExit(f"the pool gives only {len(order)} pairs at --max-per-prompt {max_per_prompt}, {num} needed")
    return tiebreak, order


def run_seed(
    seed: int, args: argparse.Namespace, pool: dict, heldout_diffs: torch.Tensor
) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, list[int]], dict[int, dict]]:
    """Per arm, per budget: each held-out pair's correctness (1, 0.5, 0) for this seed; per arm the pool pairs
    (candidate numbers) it labelled, in the order it picked them (budget N's pairs are the first N); and, when the
    ``importance`` arm runs, :func:`variance_ratios` at random's heads (else empty)."""
    diffs, targets, groups = pool["diffs"], pool["targets"], pool["groups"]
    plain = torch.ones(len(targets), 1, dtype=torch.float64)

    def fit(chosen: list[int], probabilities: list[float] | None = None) -> torch.Tensor:
        """The head fitted to ``chosen``; weighted by :func:`lure_weights` when their draw ``probabilities`` are given."""
        index = torch.tensor(chosen)
        weights = plain[index] if probabilities is None else torch.from_numpy(lure_weights(probabilities, len(targets)))[:, None]
        return fit_heads(diffs[index], targets[index], weights, args.l2)[:, 0]

    def evaluate(chosen: list[int], probabilities: list[float] | None = None) -> np.ndarray:
        return accuracy_per_pair(fit(chosen, probabilities), heldout_diffs)

    tiebreak, order = random_order(seed, groups, max(args.budgets), args.max_per_prompt)
    random_heads = {b: fit(order[:b]) for b in args.budgets}
    results = {RANDOM: {b: accuracy_per_pair(w, heldout_diffs) for b, w in random_heads.items()}}
    ratios = variance_ratios(random_heads, order, pool, heldout_diffs, args.l2) if IMPORTANCE in args.strategies else {}
    picks = {RANDOM: order[: max(args.budgets)]}
    target_rows = np.random.default_rng(10_000 + seed).permutation(len(targets))[: args.targets]
    for strategy in args.strategies:
        chosen, by_budget, round_number = list(order[: args.initial]), {}, 0
        # importance: each pick's draw probability (the first are random's: uniform over the pairs not yet drawn)
        probabilities = [1 / (len(targets) - j) for j in range(args.initial)] if strategy == IMPORTANCE else None
        draws = np.random.default_rng(777_000 + seed)
        for budget in args.budgets:
            while len(chosen) < budget:
                index = torch.tensor(chosen)
                rest = sorted(set(range(len(targets))) - set(chosen))
                num = min(args.round_size, budget - len(chosen))
                if strategy == IMPORTANCE:
                    w = fit(chosen, probabilities)
                    picked, drawn = importance_picks(
                        diffs[rest],
                        w,
                        posterior_covariance(diffs[index], w, args.l2),
                        num=num,
                        rng=draws,
                        mix=args.mix,
                        groups=[groups[i] for i in rest],
                        max_per_group=args.max_per_prompt,
                    )
                    probabilities.extend(drawn)
                elif strategy in ENSEMBLE_RULES or strategy == BAL_PM:
                    counts = bootstrap_counts(len(chosen), args.ensemble_size, seed * 100_003 + round_number)
                    heads = fit_heads(diffs[index], targets[index], counts.double(), args.l2)
                    margins = diffs[rest] @ heads  # (P, K): r_k(a) - r_k(b) = acquisition's inputs up to a shift
                    if strategy == BAL_PM:
                        picked = active.diverse_pick(
                            active.preference_bald(margins, torch.zeros_like(margins)),
                            pool["prompt_features"][rest],
                            pool["prompt_features"][index],
                            num=num,
                            beta=args.beta,
                            tiebreak=[tiebreak[i] for i in rest],
                            groups=[groups[i] for i in rest],
                            max_per_group=args.max_per_prompt,
                        )
                    else:
                        score = ENSEMBLE_RULES[strategy](margins, torch.zeros_like(margins)).tolist()
                        picked = active.pick(
                            score,
                            [tiebreak[i] for i in rest],
                            [groups[i] for i in rest],
                            num=num,
                            max_per_group=args.max_per_prompt,
                        )
                else:
                    w = fit_heads(diffs[index], targets[index], plain[index], args.l2)[:, 0]
                    picked = greedy_laplace_picks(
                        diffs[rest],
                        w,
                        posterior_covariance(diffs[index], w, args.l2),
                        diffs[target_rows],
                        strategy,
                        num=num,
                        tiebreak=[tiebreak[i] for i in rest],
                        groups=[groups[i] for i in rest],
                        max_per_group=args.max_per_prompt,
                    )
                if not picked:
                    raise SystemExit(f"seed {seed}: the pool has no pair left to pick for budget {budget} ({len(chosen)} picked)")
                chosen.extend(rest[i] for i in picked)
                round_number += 1
            by_budget[budget] = evaluate(chosen, probabilities)
        results[strategy] = by_budget
        picks[strategy] = chosen
    return results, picks, ratios


# ----------------------------------------------------------------------------- summary


def random_budget_reaching(curve: np.ndarray, budgets: list[int], target: float) -> float:
    """The budget at which ``curve`` (random's mean accuracy at each of ``budgets``, linear in between) first
    reaches ``target``: ``budgets[0]`` when it starts there already (a bound: random may need fewer), inf when it
    never does within the budgets run."""
    if curve[0] >= target:
        return float(budgets[0])
    for i in range(1, len(curve)):
        if curve[i] >= target:
            low, high = curve[i - 1], curve[i]
            return budgets[i - 1] + (budgets[i] - budgets[i - 1]) * (target - low) / (high - low)
    return float("inf")


def labels_saved(
    random: list[np.ndarray], arm: list[np.ndarray], budgets: list[int], clusters: list, *, resamples: int = 1000, seed: int = 0
) -> list[dict]:
    """For each budget, the random budget whose mean accuracy equals ``arm``'s mean accuracy there
    (:func:`random_budget_reaching`), with a 95% percentile interval from resampling the seeds and the held-out
    prompts together (as :func:`rlhfkit.stats.seed_cluster_bootstrap`). ``random``, ``arm``: per budget, the
    (seeds, pairs) correctness table."""
    random_sums = np.stack([cluster_sums(v, clusters)[0] for v in random])  # (B, S, C)
    arm_sums = np.stack([cluster_sums(v, clusters)[0] for v in arm])
    sizes = cluster_sums(random[0], clusters)[1]
    seeds, groups = random_sums.shape[1:]

    def estimate(seed_w: np.ndarray, cluster_w: np.ndarray) -> list[float]:
        denominator = seed_w.sum() * (cluster_w @ sizes)
        random_curve = np.einsum("s,bsc,c->b", seed_w, random_sums, cluster_w) / denominator
        arm_curve = np.einsum("s,bsc,c->b", seed_w, arm_sums, cluster_w) / denominator
        return [random_budget_reaching(random_curve, budgets, a) for a in arm_curve]

    rng = np.random.default_rng(seed)
    point = estimate(np.ones(seeds), np.ones(groups))
    replicates = np.array(
        [
            estimate(
                rng.multinomial(seeds, np.full(seeds, 1 / seeds)).astype(np.float64),
                rng.multinomial(groups, np.full(groups, 1 / groups)).astype(np.float64),
            )
            for _ in range(resamples)
        ]
    )  # (R, B); inf where random does not reach the arm within the budgets run
    return [
        {
            "budget": budget,
            "random_budget": point[j],
            # No interpolation between order statistics: a replicate may be inf (random never reaches the arm).
            "random_budget_ci": [float(q) for q in np.quantile(replicates[:, j], [0.025, 0.975], method="inverted_cdf")],
            "ratio": point[j] / budget,
        }
        for j, budget in enumerate(budgets)
    ]


def summarise(args: argparse.Namespace, table: dict, clusters: list, command: str) -> dict:
    arms = [RANDOM, *args.strategies]
    accuracy, difference = {}, {}
    print(f"\nheld-out accuracy, mean over {len(args.seeds)} seeds [95% CI over seeds and held-out prompts]")
    print("budget  " + "  ".join(f"{arm:>24s}" for arm in arms))
    for budget in args.budgets:
        cells = []
        for arm in arms:
            est = seed_cluster_bootstrap(np.stack(table[arm][budget]), clusters).as_dict()
            accuracy[f"{arm}_{budget}"] = est
            cells.append(f"{est['value']:.3f} [{est['ci'][0]:.3f}, {est['ci'][1]:.3f}]")
        print(f"{budget:6d}  " + "  ".join(f"{c:>24s}" for c in cells))
    for arm in args.strategies:
        for budget in args.budgets:
            values = np.stack(table[arm][budget]) - np.stack(table[RANDOM][budget])
            est = seed_cluster_bootstrap(values, clusters).as_dict()
            difference[f"{arm}_{budget}"] = est
            print(f"{arm} - random at N={budget}: {est['value']:+.4f} [{est['ci'][0]:+.4f}, {est['ci'][1]:+.4f}] (paired)")
    saved = {}
    for arm in args.strategies:
        saved[arm] = labels_saved(
            [np.stack(table[RANDOM][b]) for b in args.budgets],
            [np.stack(table[arm][b]) for b in args.budgets],
            args.budgets,
            clusters,
        )
        for s in saved[arm]:
            lo, hi = s["random_budget_ci"]
            print(
                f"{arm} with N={s['budget']} labels = random with N={s['random_budget']:.0f} [95% CI {lo:.0f}, {hi:.0f}]: "
                f"random needs x{s['ratio']:.2f} the labels (above 1: active saves labels)"
            )
    return {
        "command": command,
        "seeds": args.seeds,
        "heldout_pairs": len(clusters),
        "accuracy": accuracy,
        "minus_random": difference,
        "labels_saved": saved,
    }


def summarise_ratios(budgets: list[int], ratios: dict[int, dict[int, dict]]) -> dict:
    """Per budget and kind (``model``, ``oracle``): the mean, min and max over seeds of :func:`variance_ratios`."""
    out: dict = {}
    print("\nthe least variance of an unbiased selection relative to random's, at random's head (first order; 1 - it")
    print("is about the share of labels such a rule could save): mean [min, max] over seeds")
    for budget in budgets:
        out[str(budget)] = {}
        for kind in ratios[next(iter(ratios))][budget]:
            values = [ratios[seed][budget][kind] for seed in ratios]
            out[str(budget)][kind] = {"mean": float(np.mean(values)), "min": min(values), "max": max(values)}
        print(
            f"N={budget}: "
            + ", ".join(f"{kind} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" for kind, v in out[str(budget)].items())
        )
    return out


class TextIndex:
    """Distinct (prompt, response) pairs in order of first appearance: the rows of the feature matrix."""

    def __init__(self) -> None:
        self.texts: list[tuple] = []
        self._row: dict[str, int] = {}

    def __call__(self, prompt, response: str) -> int:
        """The row of (prompt, response), added if new."""
        key = json.dumps([prompt, response], sort_keys=True)
        if key not in self._row:
            self._row[key] = len(self.texts)
            self.texts.append((prompt, response))
        return self._row[key]


def labelled_pool(samples: str, labels_path: str, texts: TextIndex) -> dict:
    """Every candidate pair of ``samples`` (:func:`rlhfkit.active.candidates`) with its label from ``labels_path``:
    ``first``, ``second`` (rows of ``texts``), ``targets`` (P(first preferred): 1, 0 or 1/2 for a tie), ``groups``
    (the prompt) and ``label_probability``: the probability with which the annotator preferred the first (the
    simulated annotator's ``p_first``, before flip noise), None unless every label records it. A pair without a
    label stops the script, naming it."""
    items = load_items(samples)
    labels = pair_labels(labels_path)
    first, second, targets, groups, probability = [], [], [], [], []
    for c in active.candidates(items):
        a, b = items[c.sample_index][1][c.first], items[c.sample_index][1][c.second]
        label = labels.get(active.pair_key(c.prompt, a, b))
        if label is None:
            raise SystemExit(
                f"{labels_path} has no label for sample {c.sample_index}'s responses {c.first} and {c.second} "
                f"(in {samples}): --labels must label every pair of --samples"
            )
        first.append(texts(c.prompt, a))
        second.append(texts(c.prompt, b))
        targets.append(0.5 if label.tie else float(label.responses[label.ranking[0]] == a))
        groups.append(json.dumps(c.prompt, sort_keys=True))
        p_first = label.meta.get("p_first") if len(label.responses) == 2 else None  # the simulated annotator's
        probability.append(None if p_first is None else (p_first if label.responses[0] == a else 1 - p_first))
    return {
        "first": torch.tensor(first),
        "second": torch.tensor(second),
        "targets": torch.tensor(targets, dtype=torch.float64),
        "groups": groups,
        "label_probability": None if None in probability else torch.tensor(probability, dtype=torch.float64),
    }


def standardised(x: torch.Tensor, pool: dict) -> torch.Tensor:
    """``x`` standardised by the mean and std of the pool's responses (so the L2 penalty treats every feature alike)."""
    rows = torch.unique(torch.cat([pool["first"], pool["second"]]))
    return (x - x[rows].mean(0)) / x[rows].std(0).clamp_min(1e-8)


def prompt_features(z: torch.Tensor, pool: dict) -> torch.Tensor:
    """Each pool pair's prompt feature (P, f): the mean of the (standardised) features of its prompt's responses in the
    pool -- the backbone's final hidden state after prompt and response, averaged over the responses, so what they
    share (the prompt) remains. ``bal_pm``'s measure of how alike two prompts are."""
    rows_of: dict[str, set[int]] = {}
    for group, a, b in zip(pool["groups"], pool["first"].tolist(), pool["second"].tolist(), strict=True):
        rows_of.setdefault(group, set()).update((a, b))
    mean = {group: z[sorted(rows)].mean(0) for group, rows in rows_of.items()}
    return torch.stack([mean[group] for group in pool["groups"]])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    texts = TextIndex()
    labelled = labelled_pool(args.samples, args.labels, texts)
    judged = pair_labels(args.heldout)
    heldout = [c for c in judged.values() if not c.tie]
    if not heldout:
        raise SystemExit(f"{args.heldout}: no held-out pair with a preference (all {len(judged)} are ties)")
    better = torch.tensor([texts(h.prompt, h.responses[h.ranking[0]]) for h in heldout])
    worse = torch.tensor([texts(h.prompt, h.responses[h.ranking[1]]) for h in heldout])
    z = standardised(cached_features(args, texts.texts), labelled)
    pool = {
        "diffs": z[labelled["first"]] - z[labelled["second"]],
        "targets": labelled["targets"],
        "groups": labelled["groups"],
        "label_probability": labelled["label_probability"],
        "prompt_features": prompt_features(z, labelled),
    }
    heldout_diffs = z[better] - z[worse]
    clusters = [json.dumps(h.prompt, sort_keys=True) for h in heldout]
    print(
        f"pool: {len(pool['targets'])} candidate pairs of {len(set(pool['groups']))} prompts; "
        f"held out: {len(heldout)} pairs of {len(set(clusters))} prompts",
        flush=True,
    )

    table: dict[str, dict[int, list[np.ndarray]]] = {arm: {b: [] for b in args.budgets} for arm in [RANDOM, *args.strategies]}
    picks: dict[int, dict[str, list[int]]] = {}
    ratios: dict[int, dict[int, dict]] = {}
    for seed in args.seeds:
        outcomes, picks[seed], ratios[seed] = run_seed(seed, args, pool, heldout_diffs)
        for arm, by_budget in outcomes.items():
            for budget, correct in by_budget.items():
                table[arm][budget].append(correct)
        last = {arm: float(table[arm][max(args.budgets)][-1].mean()) for arm in table}
        print(
            f"seed {seed}: accuracy at N={max(args.budgets)}: " + ", ".join(f"{a} {v:.3f}" for a, v in last.items()), flush=True
        )
    results = summarise(args, table, clusters, command)
    if IMPORTANCE in args.strategies:
        results["unbiased_variance_ratio"] = summarise_ratios(args.budgets, ratios)
    results["picks"] = {str(seed): arms for seed, arms in picks.items()}
    out = Path(args.output_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}\ncommand: {command}")
    return results


if __name__ == "__main__":
    main()
