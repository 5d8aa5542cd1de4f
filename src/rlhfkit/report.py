"""The run report: ``rlhfkit report RUN_DIR`` / :func:`run`, the pipeline's last stage.

Reads a pipeline run directory and writes one self-contained HTML file (plots
are PNGs embedded as base64 ``data:`` URIs; no JavaScript, no external CSS,
nothing fetched when it is opened):

* the title: model, algorithm and total wall-clock time (the sum of the stages'
  ``.stage.json`` seconds), and a per-stage timing table;
* the headline numbers from ``eval/eval.json``: win rate, gold score of the
  policy vs the SFT baseline, KL to the reference, best-of-n;
* the over-optimisation check (Gao et al. 2022): over the second half of online
  RL, the proxy ``score`` trending up (least-squares slope > 0) while the
  ``gold_score`` on the same samples trends down is flagged;
* the gold-score-vs-KL frontier: baseline at KL 0, best-of-n at its analytic KL,
  the final policy at its measured KL, and — for online RL with a gold scorer —
  the policy's path during training;
* loss curves per stage, reward-model accuracy, the RL/DPO training metrics;
* the Elo table and the eval samples, baseline and policy side by side.

Every file is optional: a partial run gets a report that lists what is missing.
All text that comes from files (model output above all) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.data.io import atomic_write_text
from rlhfkit.pipeline import STAGES
from rlhfkit.tracking import read_metrics

METRIC_STAGES = ("sft", "reward", "rl")
"""Stages whose ``metrics.jsonl`` the report plots."""


@dataclass
class ReportConfig:
    """Config of the report stage."""

    run_dir: str = "runs/pipeline"
    """Pipeline run directory to report on (the pipeline's `output_dir`)."""
    output: str = ""
    """Where the HTML goes; empty: RUN_DIR/report.html."""


# ---------------------------------------------------------------- reading a run


@dataclass
class RunData:
    """What the report reads from a run directory; ``None`` or empty where a file is missing."""

    run_dir: Path
    pipeline: dict[str, Any] | None = None
    """``pipeline.json`` (the PipelineConfig)."""
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Stage -> ``metrics.jsonl`` entries, for the stages that have the file."""
    evaluation: dict[str, Any] | None = None
    """``eval/eval.json``."""
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Stage -> its ``.stage.json`` marker, for finished stages."""
    missing: list[str] = field(default_factory=list)
    """One line per missing or unreadable part, for the report's notice."""


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


def load_run(run_dir: str | Path) -> RunData:
    """Read every part of a run directory that exists; note the rest in ``missing``."""
    root = Path(run_dir)
    data = RunData(run_dir=root)
    data.pipeline = _read_json(root, "pipeline.json", "run config (model, algorithm)", data.missing)
    what = {"sft": "SFT metrics", "reward": "reward-model metrics", "rl": "RL/DPO metrics"}
    for stage in METRIC_STAGES:
        path = root / stage / "metrics.jsonl"
        if not path.is_file():
            data.missing.append(f"{what[stage]}: {stage}/metrics.jsonl not found")
            continue
        try:
            data.metrics[stage] = read_metrics(path.parent)
        except ValueError as e:  # a run killed mid-write can leave a truncated last line
            data.missing.append(f"{what[stage]}: {stage}/metrics.jsonl unreadable ({e})")
    data.evaluation = _read_json(root, "eval/eval.json",
                                 "evaluation (headline numbers, frontier, Elo, samples)", data.missing)
    for stage in STAGES:
        if stage == "report":  # this stage: its marker is written after we return
            continue
        marker = root / stage / ".stage.json"
        if marker.is_file():
            timing = _read_json(root, f"{stage}/.stage.json", f"stage '{stage}' timing", data.missing)
            if isinstance(timing, dict):
                data.timings[stage] = timing
        else:
            data.missing.append(f"stage '{stage}': not finished ({stage}/.stage.json not found)")
    return data


def _num(value: Any) -> float | None:
    """``value`` as a finite float; None if absent, not a number, or NaN/inf (logged as strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(entries: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the entries that log ``key`` as a finite number."""
    steps, values = [], []
    for entry in entries:
        step, value = _num(entry.get("step")), _num(entry.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


# ---------------------------------------------------------------- over-optimisation


def trend(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` on ``xs`` (0 when there is no spread in ``xs``)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx


@dataclass(frozen=True)
class OverOptimisation:
    """Verdict of :func:`detect_overoptimisation`."""

    status: Literal["detected", "not_detected", "not_measured", "too_short"]
    """`not_measured`: no entry logs both `score` and `gold_score`; `too_short`: under 2 points in the second half."""
    score_slope: float | None = None
    """Least-squares slope of the proxy `score` per step over the second half."""
    gold_slope: float | None = None
    """Least-squares slope of `gold_score` per step over the second half."""
    steps: list[float] = field(default_factory=list)
    """The second half's steps (the points both slopes were fitted on)."""


def detect_overoptimisation(entries: list[dict[str, Any]]) -> OverOptimisation:
    """Reward over-optimisation: over the second half of the logged RL steps, the proxy
    ``score`` rises (slope > 0) while ``gold_score`` on the same samples falls (slope < 0).

    Only the second half is fitted because early training usually raises both;
    the divergence that Gao et al. (2022) describe shows up late.
    """
    points = sorted(
        (e["step"], e["score"], e["gold_score"]) for e in entries
        if _num(e.get("step")) is not None and _num(e.get("score")) is not None
        and _num(e.get("gold_score")) is not None
    )
    if not points:
        return OverOptimisation("not_measured")
    half = points[len(points) // 2:]
    if len(half) < 2:
        return OverOptimisation("too_short")
    steps = [float(p[0]) for p in half]
    score_slope = trend(steps, [float(p[1]) for p in half])
    gold_slope = trend(steps, [float(p[2]) for p in half])
    status = "detected" if score_slope > 0 and gold_slope < 0 else "not_detected"
    return OverOptimisation(status, score_slope, gold_slope, steps)


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
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)  # flat curves: plain values, not "1e-5+6.931e-1"
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    return _png(figure)


def trend_figure(entries: list[dict[str, Any]], verdict: OverOptimisation) -> str | None:
    """Proxy score and gold score over training, each with its second-half least-squares line."""
    from matplotlib.figure import Figure

    if verdict.score_slope is None:
        return None
    figure = Figure(figsize=(7.2, 2.7), layout="constrained")
    for i, (key, slope, colour) in enumerate((("score", verdict.score_slope, "C0"),
                                             ("gold_score", verdict.gold_slope, "C2"))):
        ax = figure.add_subplot(1, 2, i + 1)
        steps, values = series(entries, key)
        ax.plot(steps, values, color=colour, linewidth=1.2, label=key)
        # The points the slope was fitted on: second half, entries logging both metrics.
        fit = [(float(e["step"]), float(e[key])) for e in entries
               if _num(e.get("score")) is not None and _num(e.get("gold_score")) is not None
               and _num(e.get("step")) is not None and e["step"] >= verdict.steps[0]]
        xs, ys = [s for s, _ in sorted(fit)], [v for _, v in sorted(fit)]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        ax.plot([xs[0], xs[-1]], [mean_y + slope * (xs[0] - mean_x), mean_y + slope * (xs[-1] - mean_x)],
                color="black", linestyle="--", linewidth=1.5, label=f"2nd-half trend ({slope:+.3g}/step)")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)  # flat curves: plain values, not "1e-5+6.931e-1"
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(figure)


def frontier_figure(evaluation: dict[str, Any], rl_entries: list[dict[str, Any]]) -> str | None:
    """Gold score against KL to the reference, one labelled point per evaluated policy."""
    from matplotlib.figure import Figure

    points = []  # (label, kl, gold, style)
    base_gold = _num(evaluation.get("gold_score_baseline"))
    if base_gold is not None:
        points.append(("SFT baseline", 0.0, base_gold, dict(marker="s", color="black")))
    bon = evaluation.get("best_of_n") or {}
    if _num(bon.get("kl_analytic")) is not None and _num(bon.get("gold_score")) is not None:
        points.append((f"best-of-{bon.get('n', 'n')}", bon["kl_analytic"], bon["gold_score"],
                       dict(marker="^", color="C1")))
    if _num(evaluation.get("kl")) is not None and _num(evaluation.get("gold_score_policy")) is not None:
        points.append(("final policy", evaluation["kl"], evaluation["gold_score_policy"], dict(marker="o", color="C0")))
    # Online RL with a gold scorer logs both per step: the policy's path to its final point.
    path = [(e["kl"], e["gold_score"]) for e in rl_entries
            if _num(e.get("kl")) is not None and _num(e.get("gold_score")) is not None]
    if not points and not path:
        return None
    figure = Figure(figsize=(9.0, 4.2), layout="constrained")
    ax = figure.add_subplot(1, 1, 1)
    if path:
        ax.plot([p[0] for p in path], [p[1] for p in path], color="0.6", linewidth=1, marker=".", markersize=3,
                label="policy during training (train prompts)", zorder=1)
    for label, kl, gold, style in points:
        ax.scatter([kl], [gold], s=60, zorder=3, label=label, **style)
        ax.annotate(f"{label}\n({kl:.2f}, {gold:.3f})", (kl, gold), textcoords="offset points", xytext=(6, 6),
                    fontsize=8)
    ax.set_xlabel("KL(policy || reference), nats per sequence", fontsize=9)
    ax.set_ylabel("mean gold score", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)


# ---------------------------------------------------------------- HTML


def esc(value: Any) -> str:
    """Text from a file, safe to place in HTML (never rendered as markup)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A table cell: floats to 3 decimals (1 when large), anything else as text."""
    number = _num(value)
    if number is None or isinstance(value, int):
        return esc(value)
    return f"{number:.1f}" if abs(number) >= 100 else f"{number:.3f}"


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _img(uri: str | None, alt: str, unavailable: str) -> str:
    if uri is None:
        return f'<p class="na">{esc(unavailable)}</p>'
    return f'<img src="{uri}" alt="{esc(alt)}">'


def _table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    """``header`` is escaped here; cells must already be HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _card(title: str, value: str, detail: str = "") -> str:
    return f'<div class="card"><div class="label">{esc(title)}</div><div class="value">{value}</div>' \
           f'<div class="detail">{detail}</div></div>'


def _headline(evaluation: dict[str, Any] | None) -> str:
    if evaluation is None:
        return '<p class="na">No evaluation: eval/eval.json is missing.</p>'
    cards = []
    win = _num(evaluation.get("win_rate"))
    if win is not None:
        cards.append(_card("win rate vs SFT baseline", f"{100 * win:.1f}%", "by the gold scorer; ties count half"))
    pol, base = _num(evaluation.get("gold_score_policy")), _num(evaluation.get("gold_score_baseline"))
    if pol is not None and base is not None:
        cards.append(_card("gold score: policy vs baseline", f"{pol:.3f} vs {base:.3f}", f"Δ = {pol - base:+.3f}"))
    kl, kl_std = _num(evaluation.get("kl")), _num(evaluation.get("kl_std"))
    if kl is not None:
        cards.append(_card("KL to reference", f"{kl:.3f}",
                           "nats per sequence" + (f", ± {kl_std:.3f} sd over prompts" if kl_std is not None else "")))
    bon = evaluation.get("best_of_n")
    if isinstance(bon, dict) and _num(bon.get("gold_score")) is not None:
        detail = []
        if _num(bon.get("kl_analytic")) is not None:
            detail.append(f"analytic KL {bon['kl_analytic']:.3f}")
        if _num(bon.get("win_rate_vs_baseline")) is not None:
            detail.append(f"win rate {100 * bon['win_rate_vs_baseline']:.1f}%")
        cards.append(_card(f"best-of-{bon.get('n', 'n')} gold score", f"{bon['gold_score']:.3f}",
                           esc(", ".join(detail))))
    parts = [f'<div class="cards">{"".join(cards)}</div>']
    stats = {name: evaluation.get(f"{name}_stats") for name in ("policy", "baseline")}
    if any(isinstance(s, dict) for s in stats.values()):
        keys = list(dict.fromkeys(k for s in stats.values() if isinstance(s, dict) for k in s))
        rows = [[esc(name)] + [fmt(s.get(k, "–")) if isinstance(s, dict) else "–" for k in keys]
                for name, s in stats.items()]
        parts.append(_table(["", *keys], rows, "narrow"))
    facts = [f"{k}: {esc(evaluation[k])}" for k in ("gold", "num_prompts", "temperature") if k in evaluation]
    if facts:
        parts.append(f'<p class="small">{" · ".join(facts)}</p>')
    return "".join(parts)


def _overoptimisation(entries: list[dict[str, Any]] | None) -> str:
    if entries is None:
        return '<p class="neutral">Over-optimisation: not measured (rl/metrics.jsonl is missing).</p>'
    if not any("score" in e for e in entries):
        return ('<p class="neutral">Over-optimisation: not measured (no proxy <code>score</code> in the RL metrics; '
                'DPO trains on fixed preference pairs and logs no reward-model score).</p>')
    verdict = detect_overoptimisation(entries)
    if verdict.status == "not_measured":
        return ('<p class="neutral">Over-optimisation: not measured (the RL metrics have no <code>gold_score</code>; '
                'configure a gold scorer for the RL stage to measure it).</p>')
    if verdict.status == "too_short":
        return '<p class="neutral">Over-optimisation: too few logged steps to fit a trend.</p>'
    slopes = (f"Second half of training (steps {verdict.steps[0]:g}–{verdict.steps[-1]:g}): proxy score slope "
              f"{verdict.score_slope:+.3g}/step, gold score slope {verdict.gold_slope:+.3g}/step")
    if verdict.status == "detected":
        box = (f'<div class="warning" id="overoptimisation-warning"><strong>⚠ Over-optimisation warning.</strong> '
               f'The proxy reward keeps rising while the gold score falls: the policy is exploiting the reward '
               f'model. {esc(slopes)}. Consider an earlier checkpoint, a larger KL coefficient, or more '
               f'preference data.</div>')
    else:
        box = f'<p class="ok">✓ No over-optimisation detected. {esc(slopes)}.</p>'
    return box + _img(trend_figure(entries, verdict), "proxy and gold score trends", "")


def _rl_section(entries: list[dict[str, Any]] | None) -> str:
    if entries is None:
        return '<p class="na">No RL/DPO metrics: rl/metrics.jsonl is missing.</p>'
    online = any("score" in e for e in entries)
    dpo = any("rewards_chosen" in e or "margin" in e for e in entries)
    parts = []
    if online:
        figure = panels_figure([
            ("proxy score (reward model)", [curve(entries, "score")]),
            ("gold score (same samples)", [curve(entries, "gold_score")]),
            ("reward (score − β·KL)", [curve(entries, "reward")]),
            ("KL to reference (per sequence)", [curve(entries, "kl", "k1"), curve(entries, "kl_k3", "k3")]),
            ("entropy", [curve(entries, "entropy")]),
            ("response length", [curve(entries, "response_length")]),
            ("value loss", [curve(entries, "value_loss")]),
            ("clip fraction", [curve(entries, "clipfrac")]),
            ("approx KL (old → new)", [curve(entries, "approx_kl")]),
        ])
        parts.append("<h3>Online RL</h3>" + _img(figure, "online RL metrics", "No online-RL metrics logged."))
    if dpo:
        figure = panels_figure([
            ("preference accuracy", [curve(entries, "accuracy", "train"), curve(entries, "eval_accuracy", "eval")]),
            ("reward margin", [curve(entries, "margin", "train"), curve(entries, "eval_margin", "eval")]),
            ("implicit rewards", [curve(entries, "rewards_chosen", "chosen"),
                                  curve(entries, "rewards_rejected", "rejected"),
                                  curve(entries, "eval_rewards_chosen", "chosen (eval)"),
                                  curve(entries, "eval_rewards_rejected", "rejected (eval)")]),
        ])
        parts.append("<h3>DPO</h3>" + _img(figure, "DPO metrics", "No DPO metrics logged."))
    if not parts:
        parts.append('<p class="na">rl/metrics.jsonl has no online-RL or DPO metrics.</p>')
    return "".join(parts)


def _elo(evaluation: dict[str, Any] | None) -> str:
    rows = (evaluation or {}).get("elo")
    if not isinstance(rows, list) or not rows:
        return '<p class="na">No Elo table in the evaluation.</p>'
    rows = [r for r in rows if isinstance(r, dict)]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return _table(keys, [[fmt(r.get(k, "–")) for k in keys] for r in rows], "narrow")


def _samples(evaluation: dict[str, Any] | None) -> str:
    samples = (evaluation or {}).get("samples")
    if not isinstance(samples, list) or not samples:
        return '<p class="na">No samples in the evaluation.</p>'
    rows = []
    for s in samples:
        if not isinstance(s, dict):
            continue
        base, pol = _num(s.get("gold_baseline")), _num(s.get("gold_policy"))
        better = "" if base is None or pol is None or base == pol else ("policy" if pol > base else "baseline")

        def cell(text: Any, score: Any, who: str) -> str:
            css = ' class="better"' if better == who else ""
            return (f'<div{css}><div class="text">{esc(text if text is not None else "")}</div>'
                    f'<div class="score">gold {fmt(score if score is not None else "–")}</div></div>')

        rows.append([f'<div class="text">{esc(s.get("prompt", ""))}</div>',
                     cell(s.get("baseline"), s.get("gold_baseline"), "baseline"),
                     cell(s.get("policy"), s.get("gold_policy"), "policy")])
    return (f'<p class="small">{len(rows)} held-out prompts; the higher gold score is shaded.</p>'
            + _table(["prompt", "SFT baseline", "final policy"], rows, "samples"))


def _timings(timings: dict[str, dict[str, Any]]) -> str:
    if not timings:
        return '<p class="na">No finished stages (no .stage.json markers).</p>'
    rows = [[esc(stage), esc(fmt_duration(_num(t.get("seconds")) or 0.0)), esc(t.get("finished", "–"))]
            for stage, t in timings.items()]
    return _table(["stage", "wall-clock", "finished"], rows, "narrow")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2433; background: #f6f7f9;
       margin: 0; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #e3e6ea;
padding-bottom: 4px; } h3 { font-size: 1.05em; margin: 1.4em 0 0.5em; }
.subtitle { color: #5b6475; margin: 0 0 12px; } .small { color: #5b6475; font-size: 0.9em; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { flex: 1 1 200px; border: 1px solid #e3e6ea; border-radius: 8px; padding: 10px 14px; background: #fbfcfd; }
.card .label { font-size: 0.8em; text-transform: uppercase; letter-spacing: 0.04em; color: #5b6475; }
.card .value { font-size: 1.5em; font-weight: 600; } .card .detail { font-size: 0.85em; color: #5b6475; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #e3e6ea; padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #f1f3f6; } table.narrow td { font-variant-numeric: tabular-nums; }
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
    algorithm = pipeline.get("algorithm", "unknown algorithm")
    total = sum(_num(t.get("seconds")) or 0.0 for t in data.timings.values())
    metrics = data.metrics
    sft, reward, rl = metrics.get("sft"), metrics.get("reward"), metrics.get("rl")
    evaluation = data.evaluation if isinstance(data.evaluation, dict) else None

    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f'<title>rlhfkit report: {esc(model)} · {esc(algorithm)}</title><style>{_CSS}</style></head><body><main>',
           f'<h1>rlhfkit report: {esc(model)} · {esc(algorithm)}</h1>',
           f'<p class="subtitle">total wall-clock {esc(fmt_duration(total)) if data.timings else "unknown"} '
           f'over {len(data.timings)} finished stage(s) · '
           f'run directory <code>{esc(data.run_dir)}</code> · generated {esc(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>']
    if data.missing:
        items = "".join(f"<li>{esc(m)}</li>" for m in data.missing)
        out.append(f'<div class="missing" id="missing-parts"><strong>Partial run — missing parts:</strong>'
                   f'<ul>{items}</ul></div>')

    out.append("<h2>Headline</h2>" + _headline(evaluation))
    out.append("<h2>Over-optimisation check</h2>" + _overoptimisation(rl))
    out.append("<h2>Gold score vs KL frontier</h2>")
    if evaluation is None and not rl:
        out.append('<p class="na">Not available: needs eval/eval.json or RL metrics with gold_score.</p>')
    else:
        out.append(_img(frontier_figure(evaluation or {}, rl or []), "gold score vs KL frontier",
                        "No policy has both a gold score and a KL."))
        out.append('<p class="small">Up and to the left is better: more gold score per nat of KL. Best-of-n sits '
                   'at its analytic KL, log n − (n − 1)/n; the training path is measured on training prompts.</p>')

    out.append("<h2>Loss curves</h2>")
    absent = [f"{stage}/metrics.jsonl" for stage in METRIC_STAGES if stage not in metrics]
    rl_losses = ([curve(rl or [], "loss", "train"), curve(rl or [], "eval_loss", "eval"),
                  curve(rl or [], "policy_loss", "policy loss"), curve(rl or [], "value_loss", "value loss")])
    out.append(_img(panels_figure([
        ("SFT loss", [curve(sft or [], "loss", "train"), curve(sft or [], "eval_loss", "eval")]),
        ("reward-model loss", [curve(reward or [], "loss", "train"), curve(reward or [], "eval_loss", "eval")]),
        (f"{algorithm.upper()} loss" if algorithm in ("dpo", "ppo", "grpo", "rloo") else "RL/DPO loss", rl_losses),
    ]), "loss curves", "No loss curves logged."))
    if absent:
        out.append(f'<p class="na">Not plotted (missing): {esc(", ".join(absent))}.</p>')

    out.append("<h2>Reward model</h2>")
    if reward is None:
        out.append('<p class="na">No reward-model metrics: reward/metrics.jsonl is missing.</p>')
    else:
        out.append(_img(panels_figure([("preference accuracy", [curve(reward, "accuracy", "train"),
                                                                curve(reward, "eval_accuracy", "eval")])]),
                        "reward-model accuracy", "No accuracy logged."))

    out.append("<h2>Policy optimisation</h2>" + _rl_section(rl))
    out.append("<h2>Elo ratings</h2>" + _elo(evaluation))
    out.append("<h2>Samples: before and after</h2>" + _samples(evaluation))
    out.append("<h2>Stages</h2>" + _timings(data.timings))
    if data.pipeline is not None:
        out.append("<details><summary>Run config (pipeline.json)</summary>"
                   f"<pre>{esc(json.dumps(data.pipeline, indent=2, default=str))}</pre></details>")
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
    print(f"report: -> {output}{note}")
    return output
