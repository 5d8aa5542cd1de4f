"""The run report: ``rlhfkit report RUN_DIR`` / :func:`run`, the pipeline's last stage.

Reads a pipeline run directory and writes one self-contained HTML file (plots
are PNGs embedded as base64 ``data:`` URIs; no JavaScript, no external CSS,
nothing fetched when it is opened). Its sections, in order:

* the title: model, main algorithm and total wall-clock time (the sum of the
  stages' ``.stage.json`` seconds);
* **Headline**: one row per player of ``eval/eval.json`` (the SFT baseline, the
  policies with the main one first, best-of-n by n): win rate vs the baseline,
  gold score, gold difference, p-value, KL, proxy score and verdict, every
  number with its 95% interval; the reward model's held-out accuracy
  (``reward/heldout.json``) and the reward-model gate (``gate/gate.json``);
* **Reward–KL frontier** (Gao, Schulman & Hilton 2022; Stiennon et al. 2020):
  gold score against KL and against sqrt(KL) for each policy stage's probe
  points (``<alg>/frontier.jsonl``), best-of-n at its analytic KL and each
  policy's final eval point, with the Gao et al. forms fitted by
  :func:`rlhfkit.stats.fit_gao_bon` / :func:`rlhfkit.stats.fit_gao_rl`;
  with an ensemble reward model, best-of-n ranked by one member, by each member
  alone and by each aggregation (``eval.json``'s ``best_of_n_ensemble``), with a
  table and a plain verdict on whether the ensemble delayed over-optimisation
  (Coste et al. 2024);
* **Over-optimisation check**: one noise-aware verdict per policy stage
  (:func:`rlhfkit.stats.overoptimisation` on its probe points), with its
  proxy and gold over training;
* **Policy optimisation**: each policy stage's training metrics;
* **Training doctor**: each policy stage's findings of :func:`rlhfkit.doctor.diagnose` (what it sees in the
  metrics, why it can happen, what to try);
* the reward model's curves, loss curves per stage, the Elo table, the eval
  samples side by side, and a per-stage timing table.

Every file is optional: a partial run gets a report that lists what is missing.
The older layout (one ``rl/`` stage, ``eval.json`` without ``players``) still
renders. All text that comes from files (model output above all) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rlhfkit import doctor, log, stats
from rlhfkit.data.io import atomic_write_text, jsonl_lines
from rlhfkit.probe import FRONTIER_FILE
from rlhfkit.run_layout import (
    EVAL_PREFIX,
    GATE_FILE,  # the writers' names, so a rename cannot silently empty a section
    HELDOUT_FILE,
    OFFLINE_ALGORITHMS,
    OFFLINE_RL_ALGORITHMS,
    ONLINE_ALGORITHMS,
    current_metric_names,
)
from rlhfkit.run_layout import POLICY_ALGORITHMS as POLICY_STAGES
from rlhfkit.run_layout import ILQLMetric as IM
from rlhfkit.run_layout import PreferenceMetric as PM
from rlhfkit.run_layout import RLMetric as RM
from rlhfkit.training.tracking import read_metrics

# ---------------------------------------------------------------- the run directory's layout

PIPELINE_FILE = "pipeline.json"
"""The PipelineConfig, at the run directory's top level."""
METRICS_FILE = "metrics.jsonl"
"""A training stage's logged metrics, in its stage directory."""
EVAL_FILE = "eval.json"
"""The evaluation, in the eval stage's directory (and copied to the run directory's top level)."""
STAGE_MARKER = ".stage.json"
"""A finished stage's marker: ``{"hash", "seconds", "finished"}``."""

SFT_STAGE = "sft"
REWARD_STAGE = "reward"
GATE_STAGE = "gate"
EVAL_STAGE = "eval"
REPORT_STAGE = "report"
STAGES_BEFORE_POLICY = ("sft", "sample", "label", "reward", "gate")
"""Stages that run before the policy stages, in pipeline order."""
LEGACY_POLICY_STAGE = "rl"
"""The older layout's single policy stage directory (its algorithm is pipeline.json's)."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A stage name read from pipeline.json must be a plain directory name (no paths)."""

_Z95 = 1.96


@dataclass
class ReportConfig:
    """Config of the report stage."""

    run_dir: str = "runs/pipeline"
    """Pipeline run directory to report on (the pipeline's `output_dir`)."""
    output: str = ""
    """Where the HTML goes; empty: RUN_DIR/report.html."""


# ---------------------------------------------------------------- reading a run


@dataclass
class PolicyStage:
    """One policy-optimisation stage of the run."""

    name: str
    """The algorithm, e.g. ``"ppo"`` (also its player name in eval.json)."""
    directory: str
    """Its directory, relative to the run directory (``name``, or ``rl`` in the older layout)."""
    metrics: list[dict[str, Any]] | None = None
    """``metrics.jsonl`` entries; None if missing or unreadable."""
    frontier: list[dict[str, Any]] | None = None
    """Probe points from ``frontier.jsonl`` in step order (last line per step wins); None if missing."""

    @property
    def kinds(self) -> tuple[bool, bool]:
        """(online RL, preference-pair training): from the algorithm's name (the pipeline's record); only a stage
        of unknown name (the older ``rl/`` layout) is told by the keys its metrics hold."""
        if self.name in ONLINE_ALGORITHMS or self.name in OFFLINE_ALGORITHMS:
            return self.name in ONLINE_ALGORITHMS, self.name in OFFLINE_ALGORITHMS
        entries = self.metrics or []
        return any(RM.SCORE in e for e in entries), any(PM.REWARDS_CHOSEN in e or PM.MARGIN in e for e in entries)


@dataclass
class RunData:
    """What the report reads from a run directory; ``None`` or empty where a file is missing."""

    run_dir: Path
    pipeline: dict[str, Any] | None = None
    """``pipeline.json`` (the PipelineConfig)."""
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """``sft`` / ``reward`` -> ``metrics.jsonl`` entries, for those that have the file."""
    policies: list[PolicyStage] = field(default_factory=list)
    """The policy stages, the main algorithm first."""
    heldout: dict[str, Any] | None = None
    """``reward/heldout.json``."""
    gate: dict[str, Any] | None = None
    """``gate/gate.json``."""
    evaluation: dict[str, Any] | None = None
    """``eval/eval.json`` (or the top-level copy)."""
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Stage -> its ``.stage.json`` marker, for finished stages."""
    missing: list[str] = field(default_factory=list)
    """One line per missing or unreadable part, for the report's notice."""
    left_out: list[str] = field(default_factory=list)
    """Policy directories present but not named in pipeline.json (an earlier run's), not reported."""

    @property
    def algorithm(self) -> str:
        """The main algorithm: pipeline.json's, else the first policy stage's, else "unknown algorithm"."""
        alg = (self.pipeline or {}).get("algorithm")
        if isinstance(alg, str) and alg:
            return alg
        return self.policies[0].name if self.policies else "unknown algorithm"


def _read_json(root: Path, relative: str, what: str, missing: list[str]) -> Any:
    path = root / relative
    if not path.is_file():
        missing.append(f"{what}: {relative} not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        missing.append(f"{what}: {relative} unreadable ({e})")
        return None


def _read_dict(root: Path, relative: str, what: str, missing: list[str]) -> dict[str, Any] | None:
    value = _read_json(root, relative, what, missing)
    if value is not None and not isinstance(value, dict):
        missing.append(f"{what}: {relative} is not a JSON object")
        return None
    return value


def _num(value: Any) -> float | None:
    """``value`` as a finite float; None if absent, not a number, or NaN/inf (logged as strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _ci(value: Any) -> tuple[float, float] | None:
    """A ``[low, high]`` interval as two finite floats; None otherwise."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = _num(value[0]), _num(value[1])
        if low is not None and high is not None:
            return low, high
    return None


def read_frontier(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Probe points of ``frontier.jsonl`` in step order, the last line of a repeated step winning.

    Returns (points, number of unreadable lines skipped). Each point has "step"
    (a number) and "kl", "kl_se", "gold", "gold_se", "proxy", "proxy_se",
    "num_prompts", "response_length", each a finite float or None.
    """
    by_step: dict[float, dict[str, Any]] = {}
    bad = 0
    for line in jsonl_lines(path.read_text(encoding="utf-8")):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:  # a run killed mid-write can leave a truncated last line
            bad += 1
            continue
        step = _num(entry.get("step")) if isinstance(entry, dict) else None
        if step is None:
            bad += 1
            continue
        point = {
            k: _num(entry.get(k))
            for k in ("kl", "kl_se", "gold", "gold_se", "proxy", "proxy_se", "num_prompts", "response_length")
        }
        by_step[step] = {"step": int(step) if step.is_integer() else step, **point}
    return [by_step[s] for s in sorted(by_step)], bad


def _policy_stages(root: Path, pipeline: dict[str, Any] | None) -> tuple[list[PolicyStage], list[str]]:
    """The policy stages, and the policy directories left out.

    pipeline.json's [algorithm] + compare when it names any: another policy directory present was left by an
    earlier run in the same directory (``algorithm`` or ``compare`` changed since), trained against that run's
    reward model, so it is left out and named. Without pipeline.json, every policy directory present."""
    names: list[str] = []
    if isinstance(pipeline, dict):
        compare = pipeline.get("compare")
        for name in [pipeline.get("algorithm"), *(compare if isinstance(compare, list) else [])]:
            if isinstance(name, str) and _SAFE_NAME.fullmatch(name) and name not in names:
                names.append(name)
    present = [s for s in POLICY_STAGES if s not in names and (root / s).is_dir()]
    left_out: list[str] = []
    if names:
        left_out = present
    else:
        names = present
    stages = [PolicyStage(name, name) for name in names]
    if (root / LEGACY_POLICY_STAGE).is_dir():  # older layout: rl/ holds the main algorithm's run
        if stages and not (root / stages[0].directory).is_dir():
            stages[0].directory = LEGACY_POLICY_STAGE
        elif not any(s.name == LEGACY_POLICY_STAGE for s in stages):
            stages.insert(0, PolicyStage(LEGACY_POLICY_STAGE, LEGACY_POLICY_STAGE))
    return stages, left_out


def _read_stage_metrics(root: Path, directory: str, what: str, missing: list[str]) -> list[dict[str, Any]] | None:
    relative = f"{directory}/{METRICS_FILE}"
    if not (root / relative).is_file():
        missing.append(f"{what}: {relative} not found")
        return None
    try:
        return [current_metric_names(entry) for entry in read_metrics(root / directory)]  # an older run's names too
    except ValueError as e:  # a run killed mid-write can leave a truncated last line
        missing.append(f"{what}: {relative} unreadable ({e})")
        return None


def load_run(run_dir: str | Path) -> RunData:
    """Read every part of a run directory that exists; note the rest in ``missing``."""
    root = Path(run_dir)
    data = RunData(run_dir=root)
    missing = data.missing
    data.pipeline = _read_dict(root, PIPELINE_FILE, "run config (model, algorithms)", missing)
    for stage, what in ((SFT_STAGE, "SFT metrics"), (REWARD_STAGE, "reward-model metrics")):
        entries = _read_stage_metrics(root, stage, what, missing)
        if entries is not None:
            data.metrics[stage] = entries
    data.heldout = _read_dict(root, f"{REWARD_STAGE}/{HELDOUT_FILE}", "reward-model held-out accuracy", missing)
    data.policies, data.left_out = _policy_stages(root, data.pipeline)
    legacy = any(p.directory == LEGACY_POLICY_STAGE for p in data.policies)
    if not legacy:  # the older layout had no gate
        data.gate = _read_dict(root, f"{GATE_STAGE}/{GATE_FILE}", "reward-model gate", missing)
    if not data.policies:
        missing.append(f"policy stages: no {', '.join(POLICY_STAGES)} directory, and no pipeline.json naming them")
    for policy in data.policies:
        policy.metrics = _read_stage_metrics(root, policy.directory, f"{policy.name} training metrics", missing)
        relative = f"{policy.directory}/{FRONTIER_FILE}"
        if policy.name in OFFLINE_RL_ALGORITHMS and not (root / relative).is_file():
            continue  # ILQL trains without sampling: it logs no probe points, and none are missing
        if not (root / relative).is_file():
            missing.append(f"{policy.name} probe points (frontier, over-optimisation): {relative} not found")
            continue
        try:
            policy.frontier, bad = read_frontier(root / relative)
        except OSError as e:
            missing.append(f"{policy.name} probe points: {relative} unreadable ({e})")
            continue
        if bad:
            missing.append(f"{policy.name} probe points: {bad} unreadable line(s) of {relative} skipped")
    eval_what = "evaluation (headline numbers, frontier, Elo, samples)"
    primary = f"{EVAL_STAGE}/{EVAL_FILE}"
    if not (root / primary).is_file() and (root / EVAL_FILE).is_file():
        data.evaluation = _read_dict(root, EVAL_FILE, eval_what, missing)  # the top-level copy
    else:
        data.evaluation = _read_dict(root, primary, eval_what, missing)

    expected = [s for s in STAGES_BEFORE_POLICY if not (legacy and s == GATE_STAGE)]
    expected += [p.directory for p in data.policies] + [EVAL_STAGE]
    found = sorted(p.parent.name for p in root.glob(f"*/{STAGE_MARKER}"))
    for stage in list(dict.fromkeys(expected + found)):
        if stage == REPORT_STAGE:  # this stage: its marker is written after we return
            continue
        relative = f"{stage}/{STAGE_MARKER}"
        if (root / relative).is_file():
            timing = _read_dict(root, relative, f"stage '{stage}' timing", missing)
            if timing is not None:
                data.timings[stage] = timing
        else:
            missing.append(f"stage '{stage}': not finished ({relative} not found)")
    return data


def series(entries: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the entries that log ``key`` as a finite number."""
    steps, values = [], []
    for entry in entries:
        step, value = _num(entry.get("step")), _num(entry.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


# ---------------------------------------------------------------- players of the evaluation


@dataclass
class Player:
    """One row of the headline: a player of eval.json."""

    name: str
    kind: Literal["baseline", "policy", "best_of_n"]
    stats: dict[str, Any]
    n: int | None = None
    """Best-of-n: its n."""


def players(evaluation: dict[str, Any] | None, main: str | None, order: list[str]) -> list[Player]:
    """eval.json's players: baseline(s) first, then the policies (``main`` first, then by ``order``,
    then as listed), then best-of-n by n. An older eval.json without ``players`` is mapped onto
    the same shape (baseline, ``main`` as the policy, one best-of-n)."""
    if not isinstance(evaluation, dict):
        return []
    table = evaluation.get("players")
    baseline_name = evaluation.get("baseline_name") if isinstance(evaluation.get("baseline_name"), str) else "sft"
    main = evaluation.get("main_player") if isinstance(evaluation.get("main_player"), str) else main
    out: list[Player] = []
    if isinstance(table, dict) and table:
        for name, entry in table.items():
            if not isinstance(entry, dict):
                continue
            kind = entry.get("kind")
            n = entry.get("n")
            match = re.fullmatch(r"best_of_(\d+)", str(name))
            if kind not in ("baseline", "policy", "best_of_n"):
                kind = "baseline" if name == baseline_name else "best_of_n" if match else "policy"
            if kind == "best_of_n" and not (isinstance(n, int) and not isinstance(n, bool)):
                n = int(match.group(1)) if match else None
            out.append(Player(str(name), kind, dict(entry), n if kind == "best_of_n" else None))
    else:  # older eval.json: top-level numbers for one policy
        base = {"gold_score": evaluation.get("gold_score_baseline"), "gold_score_ci": evaluation.get("gold_score_baseline_ci")}
        if isinstance(evaluation.get("baseline_stats"), dict):
            base = {**evaluation["baseline_stats"], **{k: v for k, v in base.items() if v is not None}}
        out.append(Player(baseline_name, "baseline", base))
        pol = dict(evaluation["policy_stats"]) if isinstance(evaluation.get("policy_stats"), dict) else {}
        out.append(Player(main or "policy", "policy", pol))
        main = main or "policy"
        bon = evaluation.get("best_of_n")
        if isinstance(bon, dict) and isinstance(bon.get("n"), int):
            out.append(
                Player(
                    f"best_of_{bon['n']}",
                    "best_of_n",
                    {
                        "gold_score": bon.get("gold_score"),
                        "kl": bon.get("kl_analytic"),
                        "win_rate": bon.get("win_rate_vs_baseline"),
                    },
                    bon["n"],
                )
            )
    # The top-level numbers are the main player's and the baseline's: fill in what an entry lacks.
    top_main = {
        "win_rate": "win_rate",
        "win_rate_ci": "win_rate_ci",
        "p_value": "p_value",
        "gold_score": "gold_score_policy",
        "gold_score_ci": "gold_score_policy_ci",
        "kl": "kl",
        "kl_ci": "kl_ci",
        "kl_std": "kl_std",
        "verdict": "verdict",
    }
    top_base = {"gold_score": "gold_score_baseline", "gold_score_ci": "gold_score_baseline_ci"}
    for player in out:
        mapping = (
            top_main
            if player.kind == "policy" and player.name == main
            else top_base
            if player.kind == "baseline" and player.name == baseline_name
            else {}
        )
        for key, top in mapping.items():
            if player.stats.get(key) is None and evaluation.get(top) is not None:
                player.stats[key] = evaluation[top]
    baseline_gold = next((_num(p.stats.get("gold_score")) for p in out if p.kind == "baseline"), None)
    for player in out:  # older eval.json: the difference without its interval
        gold = _num(player.stats.get("gold_score"))
        if player.kind != "baseline" and player.stats.get("gold_diff") is None and None not in (gold, baseline_gold):
            player.stats["gold_diff"] = gold - baseline_gold

    rank = {name: i for i, name in enumerate([main, *order])}
    kinds = {"baseline": 0, "policy": 1, "best_of_n": 2}
    listed = {id(p): i for i, p in enumerate(out)}
    return sorted(
        out, key=lambda p: (kinds[p.kind], p.n if p.n is not None else math.inf, rank.get(p.name, len(rank)), listed[id(p)])
    )


def _main_player(data: RunData) -> str:
    evaluation = data.evaluation or {}
    main = evaluation.get("main_player")
    return main if isinstance(main, str) else data.algorithm


# ---------------------------------------------------------------- Gao et al. fits


@dataclass
class Fit:
    """A Gao et al. 2022 form fitted to one curve of the frontier (or why it was not)."""

    label: str
    """The curve: "best-of-n" or a policy stage's algorithm."""
    form: Literal["bon", "rl"]
    """"bon": R(d) = d (α − β d); "rl": R(d) = d (α − β log d)."""
    origin: float | None
    """Gold score at d = 0 (R = gold − origin)."""
    num_points: int = 0
    """Points with d > 0 that the fit used."""
    d_max: float = 0.0
    alpha: float | None = None
    beta: float | None = None
    skipped: str | None = None
    """Why there is no fit."""

    def gain(self, d: np.ndarray) -> np.ndarray:
        """R(d) of the fitted form."""
        if self.form == "bon":
            return d * (self.alpha - self.beta * d)
        safe = np.where(d > 0, d, 1.0)
        return np.where(d > 0, d * (self.alpha - self.beta * np.log(safe)), 0.0)

    @property
    def peak(self) -> float | None:
        """d at which the fitted gold peaks (None when β ≤ 0: no peak)."""
        if self.alpha is None or self.beta is None or self.beta <= 0:
            return None
        if self.form == "bon":
            return self.alpha / (2 * self.beta)
        exponent = self.alpha / self.beta - 1
        return math.exp(exponent) if exponent < 700 else None


FORMS = {"bon": "d (α − β d)", "rl": "d (α − β log d)"}


def fit_curve(label: str, form: Literal["bon", "rl"], kl: list[float], gold: list[float], origin: float | None) -> Fit:
    """Fit ``form`` to points (KL, gold) with d = sqrt(KL) and R = gold − ``origin``.

    Skipped (``Fit.skipped`` says why) without an origin, with fewer than 3
    points at distinct d > 0 (d = 0 carries no information: R(0) = 0 by
    construction), or when the fit raises or returns a non-finite value.
    """
    fit = Fit(label, form, origin)
    if origin is None:
        fit.skipped = "no gold score at KL 0 to measure the gain from"
        return fit
    d = [math.sqrt(max(k, 0.0)) for k in kl]
    fit.num_points = sum(1 for x in d if x > 0)
    fit.d_max = max(d, default=0.0)
    distinct = len({round(x, 12) for x in d if x > 0})
    if distinct < 3:
        fit.skipped = f"fewer than 3 points with distinct KL > 0 ({distinct})"
        return fit
    gains = [g - origin for g in gold]
    try:
        alpha, beta = (stats.fit_gao_bon if form == "bon" else stats.fit_gao_rl)(d, gains)
    except (ValueError, ArithmeticError) as e:  # LinAlgError is a ValueError
        fit.skipped = f"the fit failed ({e})"
        return fit
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        fit.skipped = "the fit is not finite"
        return fit
    fit.alpha, fit.beta = alpha, beta
    return fit


@dataclass
class Frontier:
    """Everything the frontier figure and its fit table show."""

    baseline: tuple[float, tuple[float, float] | None] | None = None
    """Baseline gold and its interval (at KL 0)."""
    paths: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    """(algorithm, probe points with kl and gold) per policy stage with a frontier."""
    best_of_n: list[tuple[int, float, float, tuple[float, float] | None]] = field(default_factory=list)
    """(n, analytic KL, gold, gold interval)."""
    finals: list[tuple[str, float, float, tuple[float, float] | None, tuple[float, float] | None]] = field(default_factory=list)
    """(policy, KL, gold, KL interval, gold interval) of each policy's eval."""
    fits: list[Fit] = field(default_factory=list)
    rankers: list[tuple[str, list[tuple[int, float, float, tuple[float, float] | None]]]] = field(default_factory=list)
    """An ensemble proxy's best-of-n by ranker (``member_0``, ``members``, ``mean``, ``wco``, ``uwo``): (ranker,
    [(n, analytic KL, gold, gold interval)]), from eval.json's ``best_of_n_ensemble``."""

    @property
    def empty(self) -> bool:
        return not (self.paths or self.best_of_n or self.finals)


def build_frontier(data: RunData) -> Frontier:
    frontier = Frontier()
    roster = players(data.evaluation, _main_player(data), [p.name for p in data.policies])
    base = next((p for p in roster if p.kind == "baseline"), None)
    base_gold = _num(base.stats.get("gold_score")) if base else None
    if base_gold is not None:
        frontier.baseline = (base_gold, _ci(base.stats.get("gold_score_ci")))
    for p in roster:
        gold = _num(p.stats.get("gold_score"))
        if gold is None:
            continue
        if p.kind == "best_of_n":
            kl = stats.analytic_bon_kl(p.n) if isinstance(p.n, int) and p.n >= 1 else _num(p.stats.get("kl"))
            if kl is not None:
                frontier.best_of_n.append((p.n, kl, gold, _ci(p.stats.get("gold_score_ci"))))
        elif p.kind == "policy" and _num(p.stats.get("kl")) is not None:
            frontier.finals.append(
                (p.name, float(p.stats["kl"]), gold, _ci(p.stats.get("kl_ci")), _ci(p.stats.get("gold_score_ci")))
            )
    if frontier.best_of_n:
        origin = base_gold
        if origin is None:  # best-of-1 is an independent draw of the baseline
            origin = next((g for n, _, g, _ in frontier.best_of_n if n == 1), None)
        frontier.fits.append(
            fit_curve("best-of-n", "bon", [b[1] for b in frontier.best_of_n], [b[2] for b in frontier.best_of_n], origin)
        )
    for name, curve_points in ensemble_curves((data.evaluation or {}).get("best_of_n_ensemble")).items():
        frontier.rankers.append((name, curve_points))
    for policy in data.policies:
        points = [pt for pt in policy.frontier or [] if pt["kl"] is not None and pt["gold"] is not None]
        if not points:
            continue
        frontier.paths.append((policy.name, points))
        start = next((pt["gold"] for pt in points if pt["step"] == 0), None)
        fit = fit_curve(policy.name, "rl", [pt["kl"] for pt in points], [pt["gold"] for pt in points], start)
        if start is None:
            fit.skipped = "no step-0 probe point (the starting policy) to measure the gain from"
        frontier.fits.append(fit)
    return frontier


RANKER_LABELS = {
    "member_0": "one member alone (member 0)",
    "members": "each member alone (mean over members)",
    "mean": "ensemble mean",
    "wco": "ensemble WCO (worst member)",
    "uwo": "ensemble UWO (mean - λ var)",
}
_RANKER_STYLE = {  # (colour, line style)
    "member_0": ("black", ":"),
    "members": ("dimgray", "-."),
    "mean": ("C1", "--"),
    "wco": ("darkred", "-"),
    "uwo": ("purple", "--"),
}


def ensemble_curves(block: Any) -> dict[str, list[tuple[int, float, float, tuple[float, float] | None]]]:
    """eval.json's ``best_of_n_ensemble`` -> ranker -> [(n, analytic KL, gold, gold interval)] in n order; {} when
    the block is missing or malformed (an older eval.json, a single reward model)."""
    if not isinstance(block, dict) or not isinstance(block.get("by_n"), dict):
        return {}
    curves: dict[str, list[tuple[int, float, float, tuple[float, float] | None]]] = {}
    for key in sorted(block["by_n"], key=lambda k: int(k) if str(k).isdigit() else 0):
        if not str(key).isdigit() or not isinstance(block["by_n"][key], dict):
            continue
        n = int(key)
        for name, entry in block["by_n"][key].items():
            gold = _num(entry.get("gold_score")) if isinstance(entry, dict) else None
            if gold is not None and n >= 1:
                curves.setdefault(name, []).append((n, stats.analytic_bon_kl(n), gold, _ci(entry.get("gold_score_ci"))))
    return curves


def ensemble_verdict(block: Any) -> str | None:
    """A plain sentence on the ensemble's best-of-n against one member alone: WCO's gold at the largest n minus
    member 0's (the paired interval decides higher / lower / not distinguishable), and the n at which each ranker's
    gold peaked: a peak before the largest n is over-optimisation (gold fell as n grew), and WCO peaking later than
    the single member is the delay Coste et al. 2024 report. None without the block."""
    curves = ensemble_curves(block)
    single, wco = curves.get("member_0"), curves.get("wco")
    if not single or not wco:
        return None
    n_max = max(n for n, *_ in wco)
    last = block["by_n"][str(n_max)]["wco"]
    d, ci, p = _num(last.get("minus_member_0")), _ci(last.get("minus_member_0_ci")), _num(last.get("minus_member_0_p"))
    parts = []
    if d is not None and ci is not None:
        how = "higher than" if ci[0] > 0 else "lower than" if ci[1] < 0 else "not distinguishable from"
        p_text = f", p = {fmt_p(p)}" if p is not None else ""
        parts.append(
            f"At n = {n_max}, best-of-n ranked by the ensemble's worst member (WCO) reached a gold score {how} "
            f"one member alone: difference {d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]{p_text}."
        )
    peaks = {name: max(points, key=lambda q: q[2])[0] for name, points in curves.items()}
    fell = [name for name in ("member_0", "members", "wco") if name in peaks and peaks[name] < n_max]
    if not fell:
        parts.append(
            f"No ranker's gold peaked before n = {n_max} (point estimates): no over-optimisation for the ensemble to "
            "delay at these n; a larger best_of_n would show whether it comes later."
        )
    else:
        peak_text = ", ".join(
            f"{RANKER_LABELS.get(name, name)} at n = {peaks[name]}" for name in ("member_0", "members", "wco") if name in peaks
        )
        if peaks["wco"] > peaks["member_0"]:
            tail = "WCO peaked later than one member alone: on these prompts it delayed over-optimisation"
        elif peaks["wco"] == peaks["member_0"]:
            tail = "WCO peaked at the same n as one member alone: no delay seen"
        else:
            tail = "WCO peaked earlier than one member alone: no delay seen"
        parts.append(f"Gold peaked for {peak_text} (point estimates; see the intervals). {tail}.")
    return " ".join(parts)


def _ensemble_table(block: Any) -> str:
    curves = ensemble_curves(block)
    names = [name for name in RANKER_LABELS if name in curves] + [name for name in curves if name not in RANKER_LABELS]
    if not names:
        return ""
    header = ["n", *[RANKER_LABELS.get(name, name) for name in names], "WCO − member 0", "WCO − members"]
    rows = []
    for n in sorted({n for points in curves.values() for n, *_ in points}):
        by_name = block["by_n"][str(n)]
        row = [str(n)]
        for name in names:
            entry = by_name.get(name) or {}
            row.append(fmt_est(entry.get("gold_score"), entry.get("gold_score_ci")))
        wco = by_name.get("wco") or {}
        for other in ("member_0", "members"):
            d, ci, p = _num(wco.get(f"minus_{other}")), _ci(wco.get(f"minus_{other}_ci")), wco.get(f"minus_{other}_p")
            value = "–" if d is None else f"{d:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " [no CI]")
            row.append(value + (f", p = {fmt_p(p)}" if d is not None and p is not None else ""))
        rows.append([esc(cell) for cell in row])
    return _table(header, rows, "narrow")


# ---------------------------------------------------------------- plots


@dataclass
class Curve:
    """One line on a panel."""

    label: str
    steps: list[float]
    values: list[float]
    markers: bool = False
    """Draw points too (eval entries are sparse)."""


def curve(entries: list[dict[str, Any]], key: str, label: str | None = None) -> Curve:
    steps, values = series(entries, key)
    return Curve(label or key, steps, values, markers=key.startswith("eval_") or len(steps) < 3)


def _png(figure) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (rendered by Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # explicit Agg: no display, no global pyplot state
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _style(ax, xlabel: str, ylabel: str | None = None) -> None:
    ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.ticklabel_format(axis="y", useOffset=False)  # flat curves: plain values, not "1e-5+6.931e-1"
    ax.grid(alpha=0.3)


def panels_figure(panels: list[tuple[str, list[Curve]]]) -> str | None:
    """A grid of panels (title, curves) over training steps; None if no curve has data."""
    from matplotlib.figure import Figure

    panels = [(title, [c for c in curves if c.steps]) for title, curves in panels]
    panels = [(title, curves) for title, curves in panels if curves]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figure = Figure(figsize=(3.6 * ncols, 2.7 * nrows), layout="constrained")
    for i, (title, curves) in enumerate(panels):
        ax = figure.add_subplot(nrows, ncols, i + 1)
        for c in curves:
            ax.plot(c.steps, c.values, marker="o" if c.markers else None, markersize=3, linewidth=1.2, label=c.label)
        ax.set_title(title, fontsize=10)
        _style(ax, "step")
        if len(curves) > 1:
            ax.legend(fontsize=8)
    return _png(figure)


def _colours(names: list[str]) -> dict[str, str]:
    """One colour per policy, the same in every figure (C1 is kept for best-of-n)."""
    palette = ["C0", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]
    return {name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys(names))}


def _yerr(value: float, ci: tuple[float, float] | None) -> list[list[float]] | None:
    if ci is None:
        return None
    return [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]]


def _bon_yerr(points: list[tuple[int, float, float, tuple[float, float] | None]]) -> list[list[float]]:
    """Error bars (below, above) of best-of-n points (n, KL, gold, gold interval); 0 where there is no interval."""
    return [
        [max(g - ci[0], 0.0) if ci else 0.0 for _, _, g, ci in points],
        [max(ci[1] - g, 0.0) if ci else 0.0 for _, _, g, ci in points],
    ]


def frontier_figure(frontier: Frontier, colours: dict[str, str]) -> str | None:
    """Gold score against KL (left) and sqrt(KL) (right): probe paths, best-of-n, final eval points, fits."""
    from matplotlib.figure import Figure

    if frontier.empty:
        return None
    figure = Figure(figsize=(11.0, 4.6), layout="constrained")
    axes = [figure.add_subplot(1, 2, i + 1) for i in range(2)]
    for panel, ax in enumerate(axes):
        x = (lambda kl: kl) if panel == 0 else (lambda kl: math.sqrt(max(kl, 0.0)))
        if frontier.baseline is not None:
            gold, ci = frontier.baseline
            ax.errorbar(
                [0.0],
                [gold],
                yerr=_yerr(gold, ci),
                fmt="s",
                color="black",
                markersize=6,
                capsize=3,
                label="SFT baseline (eval)",
                zorder=4,
            )
        for name, points in frontier.paths:
            ax.errorbar(
                [x(p["kl"]) for p in points],
                [p["gold"] for p in points],
                yerr=[_Z95 * (p["gold_se"] or 0.0) for p in points],
                fmt="-o",
                color=colours[name],
                markersize=3.5,
                linewidth=1.2,
                elinewidth=0.8,
                capsize=2,
                alpha=0.9,
                label=f"{name} during training (probe points)",
                zorder=2,
            )
        if frontier.best_of_n:
            bon = frontier.best_of_n
            ax.errorbar(
                [x(kl) for _, kl, _, _ in bon],
                [g for _, _, g, _ in bon],
                yerr=_bon_yerr(bon),
                fmt="^",
                color="C1",
                markersize=6,
                capsize=3,
                label="best-of-n (eval, analytic KL)",
                zorder=3,
            )
            if panel == 1:
                for n, kl, gold, _ in bon:
                    ax.annotate(f"n={n}", (x(kl), gold), textcoords="offset points", xytext=(4, -10), fontsize=7)
        for name, points in frontier.rankers:
            colour, style = _RANKER_STYLE.get(name, ("C7", ":"))
            ax.errorbar(
                [x(kl) for _, kl, _, _ in points],
                [g for _, _, g, _ in points],
                yerr=_bon_yerr(points),
                fmt=".",
                linestyle=style,
                color=colour,
                markersize=5,
                linewidth=1.1,
                elinewidth=0.6,
                capsize=2,
                alpha=0.85,
                label=f"best-of-n by {RANKER_LABELS.get(name, name)}",
                zorder=2,
            )
        for name, kl, gold, kl_ci, gold_ci in frontier.finals:
            xerr = None
            if kl_ci is not None:
                xerr = [[max(x(kl) - x(kl_ci[0]), 0.0)], [max(x(kl_ci[1]) - x(kl), 0.0)]]
            ax.errorbar(
                [x(kl)],
                [gold],
                xerr=xerr,
                yerr=_yerr(gold, gold_ci),
                fmt="*",
                markersize=13,
                color=colours.get(name, "C7"),
                markeredgecolor="black",
                capsize=3,
                label=f"{name} final (eval)",
                zorder=5,
            )
        for fit in frontier.fits:
            if fit.alpha is None:
                continue
            d = np.linspace(0.0, max(fit.d_max * 1.15, 1e-3), 200)
            y = fit.origin + fit.gain(d)
            colour = "C1" if fit.form == "bon" else colours.get(fit.label, "C7")
            ax.plot(
                d**2 if panel == 0 else d,
                y,
                linestyle="--",
                linewidth=1.3,
                color=colour,
                label=f"{fit.label} fit: {FORMS[fit.form]}",
                zorder=1,
            )
        _style(ax, "KL(policy || SFT), nats" if panel == 0 else "sqrt(KL), nats^½", "mean gold score")
        ax.set_title("gold score vs KL" if panel == 0 else "gold score vs sqrt(KL)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: " fit: " in labels[i])  # the fitted curves last
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    figure.legend(handles, labels, loc="outside lower center", ncols=min(3, max(1, len(labels))), fontsize=8)
    return _png(figure)


def probe_figure(name: str, points: list[dict[str, Any]], verdict: dict[str, Any]) -> str | None:
    """One policy stage's proxy (left) and gold ± 1.96 SE (right) against step, from its probe points."""
    from matplotlib.figure import Figure

    if not points:
        return None
    figure = Figure(figsize=(8.0, 2.7), layout="constrained")
    steps = [p["step"] for p in points]
    for i, (key, colour, title) in enumerate(
        (("proxy", "C0", f"{name}: proxy (reward model) ± 1.96 SE"), ("gold", "C2", f"{name}: gold ± 1.96 SE"))
    ):
        ax = figure.add_subplot(1, 2, i + 1)
        err = [_Z95 * (p[f"{key}_se"] or 0.0) for p in points]
        ax.errorbar(
            steps,
            [p[key] for p in points],
            yerr=err,
            fmt="-o",
            color=colour,
            markersize=3,
            linewidth=1.2,
            elinewidth=0.8,
            capsize=2,
        )
        for mark, style, label in (("peak_step", ":", "gold peak"), ("drop_step", "--", "compared point")):
            if verdict.get(mark) is not None:
                ax.axvline(verdict[mark], color="0.4", linestyle=style, linewidth=1, label=label)
        ax.set_title(title, fontsize=10)
        _style(ax, "step")
        if i == 1 and verdict.get("peak_step") is not None:
            ax.legend(fontsize=7)
    return _png(figure)


# ---------------------------------------------------------------- HTML helpers


def esc(value: Any) -> str:
    """Text from a file, safe to place in HTML (never rendered as markup)."""
    return html.escape(str(value), quote=True)


def _f(number: float) -> str:
    return f"{number:.1f}" if abs(number) >= 100 else f"{number:.3f}"


def fmt(value: Any) -> str:
    """A table cell: floats to 3 decimals (1 when large), anything else as text."""
    number = _num(value)
    if number is None or isinstance(value, int):
        return esc(value)
    return _f(number)


def fmt_est(value: Any, ci: Any = None) -> str:
    """``0.660 [0.600, 0.720]``: a number with its interval; "–" when there is no number."""
    number = _num(value)
    if number is None:
        return "–"
    interval = _ci(ci)
    return _f(number) + (f" [{_f(interval[0])}, {_f(interval[1])}]" if interval else " [no CI]")


def fmt_p(value: Any) -> str:
    p = _num(value)
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _img(uri: str | None, alt: str, unavailable: str) -> str:
    if uri is None:
        return f'<p class="na">{esc(unavailable)}</p>' if unavailable else ""
    return f'<img src="{uri}" alt="{esc(alt)}">'


def _table(header: list[str], rows: list[list[str]], css: str = "", row_ids: list[str | None] | None = None) -> str:
    """``header`` is escaped here; cells must already be HTML; ``row_ids`` are escaped here."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    ids = row_ids or [None] * len(rows)
    body = "".join(
        (f'<tr id="{esc(i)}">' if i else "<tr>") + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row, i in zip(rows, ids)
    )
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _card(title: str, value: str, detail: str = "", element_id: str = "") -> str:
    ident = f' id="{esc(element_id)}"' if element_id else ""
    return (
        f'<div class="card"{ident}><div class="label">{esc(title)}</div><div class="value">{value}</div>'
        f'<div class="detail">{detail}</div></div>'
    )


# ---------------------------------------------------------------- sections


def _accuracy_text(source: dict[str, Any]) -> str | None:
    """``0.710 [0.660, 0.760] on 480 pairs (80 prompts)``; None without an accuracy."""
    if _num(source.get("accuracy")) is None:
        return None
    text = fmt_est(source["accuracy"], source.get("accuracy_ci"))
    pairs, prompts = source.get("num_pairs"), source.get("num_prompts")
    if _num(pairs) is not None:
        text += f" on {pairs:g} pairs" + (f" ({prompts:g} prompts)" if _num(prompts) is not None else "")
    if _num(source.get("ties")):
        text += f", {source['ties']:g} ties"
    return text


def _reward_model_card(data: RunData) -> str:
    source = data.heldout if isinstance(data.heldout, dict) else None
    where = f"{REWARD_STAGE}/{HELDOUT_FILE}"
    if source is None or _num(source.get("accuracy")) is None:
        rm = (data.evaluation or {}).get("reward_model")
        source, where = (rm, f"{EVAL_STAGE}/{EVAL_FILE}") if isinstance(rm, dict) else (None, "")
    text = _accuracy_text(source) if source else None
    if text is None:
        return _card("reward model: held-out accuracy", "–", "not measured (no held-out accuracy)", "reward-model-accuracy")
    return _card(
        "reward model: held-out accuracy",
        esc(text),
        f"preference pairs the RM ranks as the labels do; 95% cluster-bootstrap CI over prompts (from {esc(where)})",
        "reward-model-accuracy",
    )


def _gate_box(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return ""
    verdict = str(gate.get("verdict", "unknown"))
    message = gate.get("message") or ""
    accuracy = _accuracy_text(gate)
    detail = f" Accuracy {esc(accuracy)}." if accuracy else ""
    body = f"Reward-model gate: <strong>{esc(verdict)}</strong>.{detail} {esc(message)}"
    if verdict in ("failed", "overridden"):
        return f'<div class="warning" id="gate-verdict">⚠ {body}</div>'
    css = "ok" if verdict == "passed" else "neutral"
    return f'<p class="{css}" id="gate-verdict">{"✓ " if verdict == "passed" else ""}{body}</p>'


def _headline(data: RunData) -> str:
    evaluation = data.evaluation
    parts = []
    if evaluation is None:
        parts.append(f'<p class="na">No evaluation: {EVAL_STAGE}/{EVAL_FILE} is missing.</p>')
    roster = players(evaluation, _main_player(data), [p.name for p in data.policies])
    main = _main_player(data)
    baseline = next((p.name for p in roster if p.kind == "baseline"), "sft")
    main_entry = next((p for p in roster if p.kind == "policy" and p.name == main), None)
    if main_entry is not None:
        verdict = main_entry.stats.get("verdict")
        win, win_ci = _num(main_entry.stats.get("win_rate")), _ci(main_entry.stats.get("win_rate_ci"))
        if not isinstance(verdict, str) and win is not None:
            verdict = f"win rate vs {baseline}: {fmt_est(win, win_ci)}"
        if isinstance(verdict, str):
            p = main_entry.stats.get("p_value")
            tail = (
                f" (gold-scorer win rate vs {esc(baseline)} with its 95% interval"
                + (f"; p = {fmt_p(p)}" if _num(p) is not None else "")
                + ")"
            )
            parts.append(f'<p class="lead" id="main-verdict">Main policy <strong>{esc(main)}</strong>: {esc(verdict)}{tail}.</p>')
    if roster:
        rows, ids = [], []
        for p in roster:
            s = p.stats
            if p.kind == "baseline":
                win, diff, pv, kl = "– (reference)", "–", "–", "0 (reference)"
            else:
                win = fmt_est(s.get("win_rate"), s.get("win_rate_ci"))
                diff = fmt_est(s.get("gold_diff"), s.get("gold_diff_ci"))
                pv = fmt_p(s.get("p_value"))
                kl = fmt_est(s.get("kl"), s.get("kl_ci"))
                if p.kind == "best_of_n" and _num(s.get("kl")) is not None:
                    kl = f"{_f(float(s['kl']))} (analytic)"
            kind = {
                "baseline": "baseline",
                "policy": "policy" + (" (main)" if p.name == main else ""),
                "best_of_n": f"best-of-{p.n}",
            }[p.kind]
            rows.append(
                [
                    f"<strong>{esc(p.name)}</strong>",
                    esc(kind),
                    esc(win),
                    esc(fmt_est(s.get("gold_score"), s.get("gold_score_ci"))),
                    esc(diff),
                    esc(pv),
                    esc(kl),
                    esc(fmt_est(s.get("proxy_score"), s.get("proxy_score_ci"))),
                    esc(s.get("verdict") or "–"),
                ]
            )
            ids.append(f"player-{p.name}")
        parts.append(
            _table(
                [
                    "player",
                    "kind",
                    f"win rate vs {baseline} [95% CI]",
                    "gold score [CI]",
                    f"gold − {baseline} [CI]",
                    "p-value",
                    "KL to SFT [CI]",
                    "proxy score [CI]",
                    "verdict",
                ],
                rows,
                "narrow headline",
                ids,
            )
        )
        extra = [k for k in ("response_length", "eos_rate") if any(k in p.stats for p in roster)]
        if extra:
            parts.append(
                "<h3>Responses</h3>"
                + _table(
                    ["player", *extra], [[esc(p.name)] + [fmt(p.stats.get(k, "–")) for k in extra] for p in roster], "narrow"
                )
            )
        parts.append(
            '<p class="small">Win rate: per prompt, the fraction of (player, baseline) sample pairs the '
            "gold scorer prefers, ties counting half, averaged over prompts; intervals are 95% paired "
            "bootstrap intervals over prompts; p-value: paired sign-flip test of the per-prompt gold "
            "difference. Best-of-n KL is analytic, log n − (n − 1)/n.</p>"
        )
    facts = [
        f"{k.replace('_', ' ')}: {esc(evaluation[k])}"
        for k in ("gold", "num_prompts", "samples_per_prompt", "temperature")
        if isinstance(evaluation, dict) and k in evaluation
    ]
    kl_samples = evaluation.get("kl_samples_per_prompt") if isinstance(evaluation, dict) else None
    if kl_samples is not None and kl_samples != evaluation.get("samples_per_prompt"):
        facts.append(f"KL on the first {esc(evaluation['kl_samples_per_prompt'])} sample(s) of each prompt")
    if facts:
        parts.append(f'<p class="small">{" · ".join(facts)}</p>')
    parts.append(f'<div class="cards">{_reward_model_card(data)}</div>')
    parts.append(_gate_box(data.gate))
    return "".join(parts)


def _fit_table(fits: list[Fit]) -> str:
    if not fits:
        return '<p class="na">No curve to fit.</p>'
    rows, ids = [], []
    for fit in fits:
        form = f"R(d) = {FORMS[fit.form]} ({'best-of-n' if fit.form == 'bon' else 'RL'} form)"
        if fit.alpha is None:
            rows.append([esc(fit.label), esc(form), str(fit.num_points), "–", "–", f"skipped: {esc(fit.skipped)}", "–"])
        else:
            peak = fit.peak
            peak_text = f"d* = {peak:.3f} (KL {peak**2:.3f})" if peak is not None else "none (β ≤ 0: still rising)"
            if peak is not None and peak > fit.d_max:
                peak_text += f", beyond the measured range (d ≤ {fit.d_max:.3f}): an extrapolation"
            gain = fit.gain(np.array([peak]))[0] if peak is not None else None
            rows.append(
                [
                    esc(fit.label),
                    esc(form),
                    str(fit.num_points),
                    f"{fit.alpha:.4f}",
                    f"{fit.beta:.4f}",
                    esc(peak_text),
                    f"{gain:+.3f}" if gain is not None else "–",
                ]
            )
        ids.append(f"fit-{fit.label.replace(' ', '-')}")
    return _table(["curve", "form", "points (d > 0)", "α", "β", "fitted gold peak", "gold gain at peak"], rows, "narrow", ids)


def _frontier_section(data: RunData, colours: dict[str, str]) -> str:
    frontier = build_frontier(data)
    if frontier.empty:
        return (
            '<p class="na">Not available: needs eval/eval.json (players with a gold score and KL) or a '
            "policy stage's frontier.jsonl.</p>"
        )
    parts = [_img(frontier_figure(frontier, colours), "reward-KL frontier: gold score vs KL and vs sqrt(KL)", "Nothing to plot.")]
    notes = [
        "Each policy stage's line runs through its probe points during training (step 0 = the SFT policy), "
        "error bars ±1.96 SE; triangles are best-of-n at its analytic KL, log n − (n − 1)/n, with the eval's "
        "95% interval; stars are each policy's final eval point with its intervals; the square is the SFT "
        "baseline.",
        "Dashed lines are the forms of Gao, Schulman &amp; Hilton 2022 with d = sqrt(KL) and R = gold − gold at "
        "d = 0 (the baseline's for best-of-n, step 0's for a training path): best-of-n R(d) = d(α − βd) fitted to "
        "the best-of-n points; R(d) = d(α − β log d), Gao et al.'s form for RL, fitted to every training path — "
        "for DPO it is applied to its path for comparison only. Least squares, unweighted.",
        "Probe points are measured on a fixed held-out subset of prompts, so their absolute gold may differ "
        "slightly from the eval's (stars, triangles).",
    ]
    parts.append("".join(f'<p class="small">{n}</p>' for n in notes))
    parts.append("<h3>Fitted coefficients</h3>" + _fit_table(frontier.fits))
    block = (data.evaluation or {}).get("best_of_n_ensemble")
    if frontier.rankers:
        size = block.get("ensemble_size", "?")
        parts.append(
            f'<h3 id="ensemble-frontier">Reward-model ensemble against over-optimisation</h3><p class="small">The proxy '
            f"is an ensemble of {esc(size)} reward models. One pool of best-of-n samples per prompt "
            f"({esc(block.get('num_prompts', '?'))} prompts) ranked by each: its first member alone, each member alone "
            "(averaged per prompt: a single reward model of the same recipe without the luck of one seed), and the "
            "ensemble's mean, worst-case (WCO) and uncertainty-weighted (UWO) scores (Coste et al. 2024); gold mean "
            "with its 95% interval over prompts, and WCO's paired difference from one member with its interval and "
            "sign-flip p. The same curves are on the frontier above (dotted and dashed lines).</p>"
        )
        verdict_text = ensemble_verdict(block)
        if verdict_text:
            parts.append(f'<p class="neutral" id="ensemble-verdict">{esc(verdict_text)}</p>')
        parts.append(_ensemble_table(block))
    skipped = [f for f in frontier.fits if f.skipped]
    if skipped:
        parts.append(
            '<p class="neutral">' + "; ".join(f"{esc(f.label)}: fit skipped ({esc(f.skipped)})" for f in skipped) + ".</p>"
        )
    return "".join(parts)


def _overoptimisation_verdict(policy: PolicyStage) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str]:
    """(verdict of stats.overoptimisation or None, the points it used, why not measured)."""
    if policy.frontier is None:
        return None, [], f"no {FRONTIER_FILE} in {policy.directory}/ (the stage logged no probe points)"
    with_proxy = [p for p in policy.frontier if p["proxy"] is not None]
    if not with_proxy:
        why = f"its {FRONTIER_FILE} logs no proxy (reward-model) score"
        if policy.name == "dpo":
            why += " — DPO trains on fixed preference pairs, so it has no reward-model proxy unless its frontier logs one"
        return None, [], why
    points = [p for p in with_proxy if None not in (p["kl"], p["gold"], p["gold_se"])]
    if len(points) < 2:
        return None, points, f"fewer than 2 probe points with kl, gold, gold_se and proxy ({len(points)})"
    verdict = stats.overoptimisation([{k: p[k] for k in ("step", "kl", "gold", "gold_se", "proxy")} for p in points])
    return verdict, points, ""


def _overoptimisation_section(data: RunData) -> str:
    if not data.policies:
        return '<p class="neutral">Over-optimisation: not measured (no policy stage).</p>'
    boxes, flagged = [], []
    for policy in data.policies:
        ident = f"overoptimisation-{policy.name}"
        verdict, points, why = _overoptimisation_verdict(policy)
        name = esc(policy.name)
        if verdict is None or verdict["verdict"] == "not measured":
            boxes.append(
                f'<p class="neutral" id="{esc(ident)}">{name}: over-optimisation not measured '
                f"({esc(why or 'fewer than 2 probe points')}).</p>"
            )
            continue
        v = verdict
        numbers = (
            f"gold peaked at step {v['peak_step']:g} (KL {v['peak_kl']:.3f}, gold {v['peak_gold']:.3f}, "
            f"proxy {v['peak_proxy']:.3f}); final gold {v['final_gold']:.3f} at step {points[-1]['step']:g}; "
            f"drop to step {v['drop_step']:g}: {v['drop']:.3f} vs threshold {v['drop_threshold']:.3f} "
            f"(1.96 × the two points' combined SE); {v['num_points']} probe points"
        )
        if v["verdict"] == "over-optimised":
            flagged.append(policy.name)
            boxes.append(
                f'<div class="warning" id="{esc(ident)}"><strong>⚠ {name}: over-optimised.</strong> '
                f"The proxy kept rising while the gold score fell by more than its noise: "
                f"{esc(numbers)}.</div>"
            )
        else:
            boxes.append(f'<p class="ok" id="{esc(ident)}">✓ {name}: no over-optimisation detected — {esc(numbers)}.</p>')
        boxes.append(_img(probe_figure(policy.name, points, v), f"{policy.name}: proxy and gold over training", ""))
    head = (
        '<p class="small">Per policy stage, from its probe points (held-out prompts): the gold peak p* and a '
        "later point q are compared; the run is over-optimised when the proxy at q is above the proxy at p* "
        "while gold fell by more than 1.96 × sqrt(SE(p*)² + SE(q)²) (Gao et al. 2022; "
        "<code>rlhfkit.stats.overoptimisation</code>).</p>"
    )
    if flagged:
        head = (
            f'<div class="warning" id="overoptimisation-warning"><strong>⚠ Over-optimisation warning:</strong> '
            f"{esc(', '.join(flagged))} — the proxy reward keeps rising while the gold score falls: the policy "
            f"is exploiting the reward model. Consider an earlier checkpoint, a larger KL coefficient, or more "
            f"preference data.</div>"
        ) + head
    return head + "".join(boxes)


def _policy_panels(policy: PolicyStage) -> str:
    entries = policy.metrics
    if entries is None:
        return f'<p class="na">No training metrics: {esc(policy.directory)}/{METRICS_FILE} is missing.</p>'
    online, dpo = policy.kinds
    ev = EVAL_PREFIX
    parts = []
    if online:
        figure = panels_figure(
            [
                ("proxy score (reward model)", [curve(entries, RM.SCORE)]),
                ("gold score (same samples)", [curve(entries, RM.GOLD)]),
                ("reward (score − β·KL)", [curve(entries, RM.REWARD)]),
                ("KL to reference (per sequence)", [curve(entries, RM.KL, "k1"), curve(entries, RM.KL_K3, "k3")]),
                ("entropy", [curve(entries, RM.ENTROPY)]),
                ("response length", [curve(entries, RM.RESPONSE_LENGTH)]),
                ("value loss", [curve(entries, RM.VALUE_LOSS)]),
                ("clip fraction", [curve(entries, RM.CLIPFRAC)]),
                ("approx KL (old → new)", [curve(entries, RM.APPROX_KL)]),
            ]
        )
        parts.append(_img(figure, f"{policy.name}: online RL metrics", "No online-RL metrics logged."))
    if dpo:
        figure = panels_figure(
            [
                ("preference accuracy", [curve(entries, PM.ACCURACY, "train"), curve(entries, ev + PM.ACCURACY, "eval")]),
                ("reward margin", [curve(entries, PM.MARGIN, "train"), curve(entries, ev + PM.MARGIN, "eval")]),
                (
                    "implicit rewards",
                    [
                        curve(entries, PM.REWARDS_CHOSEN, "chosen"),
                        curve(entries, PM.REWARDS_REJECTED, "rejected"),
                        curve(entries, ev + PM.REWARDS_CHOSEN, "chosen (eval)"),
                        curve(entries, ev + PM.REWARDS_REJECTED, "rejected (eval)"),
                    ],
                ),
            ]
        )
        parts.append(_img(figure, f"{policy.name}: DPO metrics", "No DPO metrics logged."))
    if policy.name in OFFLINE_RL_ALGORITHMS:
        figure = panels_figure(
            [
                ("loss", [curve(entries, IM.LOSS, "train"), curve(entries, ev + IM.LOSS, "eval")]),
                ("Bellman (Q) loss", [curve(entries, IM.LOSS_Q)]),
                ("expectile (V) loss", [curve(entries, IM.LOSS_V)]),
                ("CQL loss", [curve(entries, IM.LOSS_CQL)]),
                ("language-model (AWAC) loss", [curve(entries, IM.LOSS_AWAC)]),
                ("V and target min Q", [curve(entries, IM.VALUE, "V"), curve(entries, IM.TARGET_Q, "min Q target")]),
            ]
        )
        parts.append(_img(figure, f"{policy.name}: ILQL metrics", "No ILQL metrics logged."))
    if not parts:
        parts.append(f'<p class="na">{esc(policy.directory)}/{METRICS_FILE} has no online-RL, DPO or ILQL metrics.</p>')
    return "".join(parts)


def _policy_section(data: RunData) -> str:
    if not data.policies:
        return '<p class="na">No policy stage.</p>'
    return "".join(
        f'<h3 id="policy-{esc(p.name)}">{esc(p.name)}'
        + (f' <span class="small">({esc(p.directory)}/)</span>' if p.directory != p.name else "")
        + "</h3>"
        + _policy_panels(p)
        for p in data.policies
    )


def _doctor_section(data: RunData) -> str:
    if not data.policies:
        return '<p class="na">No policy stage.</p>'
    parts = [
        '<p class="small">What <code>rlhfkit doctor</code> sees in each policy stage\'s metrics (and probe '
        "points): rules on trends over windows of steps, each with why it can happen and what to try.</p>"
    ]
    for policy in data.policies:
        ident = f"doctor-{policy.name}"
        if policy.metrics is None:
            parts.append(f'<p class="na" id="{esc(ident)}">{esc(policy.name)}: no {esc(METRICS_FILE)} to read.</p>')
            continue
        findings = doctor.diagnose(policy.metrics, policy.frontier)
        steps = doctor.logged_steps(policy.metrics)
        problems = sum(f.severity == "problem" for f in findings)
        if not problems:
            notes = f"; {len(findings)} note(s)" if findings else ""
            parts.append(f'<p class="ok" id="{esc(ident)}">✓ {esc(policy.name)}: no problems found in {steps} steps{notes}.</p>')
        else:
            parts.append(
                f'<div class="warning" id="{esc(ident)}"><strong>⚠ {esc(policy.name)}: {problems} problem(s) in '
                f"{steps} steps.</strong></div>"
            )
        items = "".join(
            f"<li><strong>{esc(f.severity)}: {esc(f.rule)}</strong> ({esc(doctor.steps_text(f.steps))}). {esc(f.seen)} "
            f"{esc(f.why)} <em>Try:</em> {esc(f.advice)}</li>"
            for f in findings
        )
        if items:
            parts.append(f"<ul>{items}</ul>")
    return "".join(parts)


def _reward_section(data: RunData) -> str:
    reward = data.metrics.get(REWARD_STAGE)
    parts = []
    text = _accuracy_text(data.heldout) if isinstance(data.heldout, dict) else None
    if text:
        parts.append(f"<p>Held-out accuracy: {esc(text)}.</p>")
    if reward is None:
        parts.append(f'<p class="na">No reward-model metrics: {REWARD_STAGE}/{METRICS_FILE} is missing.</p>')
    else:
        parts.append(
            _img(
                panels_figure(
                    [
                        (
                            "preference accuracy",
                            [curve(reward, PM.ACCURACY, "train"), curve(reward, EVAL_PREFIX + PM.ACCURACY, "eval")],
                        )
                    ]
                ),
                "reward-model accuracy",
                "No accuracy logged.",
            )
        )
    return "".join(parts)


def _loss_section(data: RunData) -> str:
    sft, reward = data.metrics.get(SFT_STAGE), data.metrics.get(REWARD_STAGE)
    panels = [
        ("SFT loss", [curve(sft or [], PM.LOSS, "train"), curve(sft or [], EVAL_PREFIX + PM.LOSS, "eval")]),
        ("reward-model loss", [curve(reward or [], PM.LOSS, "train"), curve(reward or [], EVAL_PREFIX + PM.LOSS, "eval")]),
    ]
    for p in data.policies:
        entries = p.metrics or []
        panels.append(
            (
                f"{p.name} loss",
                [
                    curve(entries, PM.LOSS, "train"),
                    curve(entries, EVAL_PREFIX + PM.LOSS, "eval"),
                    curve(entries, RM.POLICY_LOSS, "policy loss"),
                    curve(entries, RM.VALUE_LOSS, "value loss"),
                ],
            )
        )
    absent = [f"{s}/{METRICS_FILE}" for s in (SFT_STAGE, REWARD_STAGE) if s not in data.metrics]
    absent += [f"{p.directory}/{METRICS_FILE}" for p in data.policies if p.metrics is None]
    out = _img(panels_figure(panels), "loss curves", "No loss curves logged.")
    if absent:
        out += f'<p class="na">Not plotted (missing): {esc(", ".join(absent))}.</p>'
    return out


def _elo(evaluation: dict[str, Any] | None) -> str:
    rows = (evaluation or {}).get("elo")
    if not isinstance(rows, list) or not rows:
        return '<p class="na">No Elo table in the evaluation.</p>'
    rows = [r for r in rows if isinstance(r, dict)]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return _table(keys, [[fmt(r.get(k, "–")) for k in keys] for r in rows], "narrow")


def _samples(evaluation: dict[str, Any] | None, main: str) -> str:
    samples = (evaluation or {}).get("samples")
    if not isinstance(samples, list) or not samples:
        return '<p class="na">No samples in the evaluation.</p>'
    rows = []
    for s in samples:
        if not isinstance(s, dict):
            continue
        base, pol = _num(s.get("gold_baseline")), _num(s.get("gold_policy"))
        better = "" if base is None or pol is None or base == pol else ("policy" if pol > base else "baseline")

        def cell(text: Any, score: Any, who: str, better: str = better) -> str:
            css = ' class="better"' if better == who else ""
            return (
                f'<div{css}><div class="text">{esc(text if text is not None else "")}</div>'
                f'<div class="score">gold {fmt(score if score is not None else "–")}</div></div>'
            )

        rows.append(
            [
                f'<div class="text">{esc(s.get("prompt", ""))}</div>',
                cell(s.get("baseline"), s.get("gold_baseline"), "baseline"),
                cell(s.get("policy"), s.get("gold_policy"), "policy"),
            ]
        )
    return f'<p class="small">{len(rows)} held-out prompts; the higher gold score is shaded.</p>' + _table(
        ["prompt", "SFT baseline", f"main policy ({main})"], rows, "samples"
    )


def _timings(timings: dict[str, dict[str, Any]]) -> str:
    if not timings:
        return '<p class="na">No finished stages (no .stage.json markers).</p>'
    rows = [
        [esc(stage), esc(fmt_duration(_num(t.get("seconds")) or 0.0)), esc(t.get("finished", "–"))]
        for stage, t in timings.items()
    ]
    return _table(["stage", "wall-clock", "finished"], rows, "narrow")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2433; background: #f6f7f9;
       margin: 0; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #e3e6ea;
padding-bottom: 4px; } h3 { font-size: 1.05em; margin: 1.4em 0 0.5em; }
.subtitle { color: #5b6475; margin: 0 0 12px; } .small { color: #5b6475; font-size: 0.9em; }
.lead { font-size: 1.1em; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { flex: 1 1 200px; border: 1px solid #e3e6ea; border-radius: 8px; padding: 10px 14px; background: #fbfcfd; }
.card .label { font-size: 0.8em; text-transform: uppercase; letter-spacing: 0.04em; color: #5b6475; }
.card .value { font-size: 1.3em; font-weight: 600; } .card .detail { font-size: 0.85em; color: #5b6475; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #e3e6ea; padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #f1f3f6; } table.narrow td { font-variant-numeric: tabular-nums; }
table.headline { font-size: 0.85em; } table.headline td:first-child { white-space: nowrap; }
table.samples { width: 100%; table-layout: fixed; } table.samples td { width: 33%; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.score { font-size: 0.82em; color: #5b6475; margin-top: 4px; } .better { background: #eaf6ec; }
.warning { border: 2px solid #c62828; background: #fdecea; color: #7f1d1d; padding: 12px 16px; border-radius: 8px;
           font-size: 1.05em; margin: 10px 0; }
.missing { border: 1px solid #e0b252; background: #fff8e6; padding: 8px 16px; border-radius: 8px; margin: 10px 0; }
.ok { color: #1b5e20; } .neutral, .na { color: #5b6475; font-style: italic; }
pre { background: #f6f7f9; padding: 10px; overflow-x: auto; font-size: 0.85em; }
"""


def render(data: RunData) -> str:
    """The whole report as one HTML string."""
    pipeline = data.pipeline or {}
    model = pipeline.get("model", "unknown model")
    algorithm = data.algorithm
    compare = [p.name for p in data.policies if p.name != algorithm]
    title = f"{esc(model)} · {esc(algorithm)}" + (f" (vs {esc(', '.join(compare))})" if compare else "")
    total = sum(_num(t.get("seconds")) or 0.0 for t in data.timings.values())
    evaluation = data.evaluation if isinstance(data.evaluation, dict) else None
    main = _main_player(data)
    colours = _colours(
        [main, *[p.name for p in data.policies], *[p.name for p in players(evaluation, main, []) if p.kind == "policy"]]
    )

    out = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>rlhfkit report: {title}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>rlhfkit report: {title}</h1>",
        f'<p class="subtitle">total wall-clock {esc(fmt_duration(total)) if data.timings else "unknown"} '
        f"over {len(data.timings)} finished stage(s) · "
        f"run directory <code>{esc(data.run_dir)}</code> · generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
    ]
    if data.missing:
        items = "".join(f"<li>{esc(m)}</li>" for m in data.missing)
        out.append(f'<div class="missing" id="missing-parts"><strong>Partial run — missing parts:</strong><ul>{items}</ul></div>')

    if data.left_out:
        dirs = ", ".join(f"{d}/" for d in data.left_out)
        out.append(
            f'<div class="missing" id="left-out"><strong>Not part of this run:</strong> {esc(dirs)} '
            f"(not among the algorithms {PIPELINE_FILE} names: left by an earlier run in this directory, against "
            "that run's reward model), so not shown.</div>"
        )
    out.append('<h2 id="headline">Headline</h2>' + _headline(data))
    out.append('<h2 id="frontier">Reward–KL frontier</h2>' + _frontier_section(data, colours))
    out.append('<h2 id="overoptimisation">Over-optimisation check</h2>' + _overoptimisation_section(data))
    out.append('<h2 id="policy-optimisation">Policy optimisation</h2>' + _policy_section(data))
    out.append('<h2 id="doctor">Training doctor</h2>' + _doctor_section(data))
    out.append('<h2 id="reward-model">Reward model</h2>' + _reward_section(data))
    out.append('<h2 id="losses">Loss curves</h2>' + _loss_section(data))
    out.append('<h2 id="elo">Elo ratings</h2>' + _elo(evaluation))
    out.append('<h2 id="samples">Samples: before and after</h2>' + _samples(evaluation, main))
    out.append('<h2 id="stages">Stages</h2>' + _timings(data.timings))
    if data.pipeline is not None:
        out.append(
            f"<details><summary>Run config ({PIPELINE_FILE})</summary>"
            f"<pre>{esc(json.dumps(data.pipeline, indent=2, default=str))}</pre></details>"
        )
    out.append("</main></body></html>\n")
    return "\n".join(out)


def run(config: ReportConfig) -> Path:
    """Write the report of ``config.run_dir``; returns the HTML file's path."""
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"report: run directory {run_dir} not found")
    output = Path(config.output) if config.output else run_dir / "report.html"
    data = load_run(run_dir)
    atomic_write_text(output, render(data))
    note = f" ({len(data.missing)} part(s) missing)" if data.missing else ""
    log.info(f"report: -> {output}{note}")
    return output
