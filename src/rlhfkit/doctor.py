"""The training doctor: ``rlhfkit doctor RUN_DIR`` / :func:`run`, also a section of the report.

Reads a training run's ``metrics.jsonl`` (and its ``frontier.jsonl``, if the run probed one) and names, in
plain words, what it sees and what to try. Each rule is a small pure function over the parsed metrics
(:data:`RULES`; :func:`diagnose` runs them all) that returns :class:`Finding` objects: what was seen, with the
numbers; why it can happen; what to try. A finding is a *problem* (``--strict`` exits 1) or a *note*.

The rules read trends, not single steps: they compare means over windows of ``window`` logged steps (the
first window against the last, or the worst window of the run), so one noisy batch does not raise a finding.

=========================  ========  =====================================================================
rule                       severity  when
=========================  ========  =====================================================================
``non_finite``             problem   a loss (or score, KL, entropy) logged as NaN or inf
``negative_kl``            problem   some window's mean k1 KL (``rollout/kl``) is below ``-negative_kl``
``entropy_collapse``       problem   entropy ends below ``entropy_fraction`` of its start, or below
                                     ``entropy_floor`` having started above it
``clip_fraction_high``     problem   the last window's mean clip fraction is above ``clipfrac_high``
``clip_fraction_zero``     note      the clip fraction is 0 at every step although the policy moved
                                     between sampling and update (several epochs or minibatches)
``value_loss_explosion``   problem   the last window's mean value loss is over ``value_loss_growth``
                                     times the first window's
``length_exploitation``    problem   the EOS rate falls by ``eos_rate_drop`` while the length grows by
                                     ``length_growth``, or while it ends below ``eos_rate_floor``
``length_growth``          note      the length grows by ``length_growth`` with the EOS rate holding
``kl_far``                 note      the last window's mean k1 KL per response token is above
                                     ``kl_per_token_high`` (the policy far from its reference)
``zero_variance_groups``   problem   over ``zero_variance_share`` of the groups are all-equal and the
                                     policy loss is near 0 (a note when the loss is not near 0)
``overoptimisation``       problem   the proxy reward rises while the gold score falls by more than its
                                     noise (:func:`rlhfkit.stats.overoptimisation` on the frontier probes,
                                     else the logged gold score's windows)
``sampler_mismatch``       problem   vLLM's log-probs differ from the trainer's by over
                                     ``sampler_logp_diff`` nats per token on a window's mean (a note when
                                     only the largest difference exceeds ``sampler_logp_diff_max``)
=========================  ========  =====================================================================

The metric names are :class:`rlhfkit.run_layout.RLMetric`'s (a run from before they were namespaced is read
through :func:`rlhfkit.run_layout.current_metric_names`).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from rlhfkit import log, stats
from rlhfkit.config import ConfigError
from rlhfkit.data.io import read_jsonl_records
from rlhfkit.probe import FRONTIER_FILE
from rlhfkit.run_layout import POLICY_ALGORITHMS, current_metric_names
from rlhfkit.run_layout import RLMetric as M
from rlhfkit.training.tracking import read_metrics

METRICS_FILE = "metrics.jsonl"
"""A training run's logged metrics, in its output directory."""
LEGACY_POLICY_STAGE = "rl"
"""The older pipeline layout's single policy stage directory."""
_Z95 = 1.96
"""Standard errors a fall must exceed (two-sided 95%), as :func:`rlhfkit.stats.overoptimisation` uses."""


@dataclass
class DoctorConfig:
    """Config of the training doctor (``rlhfkit doctor RUN_DIR [--strict] [key=value ...]``): the run to read and
    the rules' thresholds. Rules compare means over windows of `window` logged steps, not single steps."""

    run_dir: str = "runs/pipeline"
    """A training run's output directory (its metrics.jsonl, and frontier.jsonl if any), or a pipeline run
    directory, whose policy stages (ppo, grpo, rloo, dpo) are each read."""
    strict: bool = False
    """The command exits 1 when a finding is a problem (not a note); findings are printed either way."""
    window: int = 5
    """Logged steps per window; a run shorter than two windows is split into halves."""
    min_steps: int = 4
    """Rules on a trend (first window against the last) need at least this many logged steps."""
    negative_kl: float = 0.01
    """negative_kl: a window's mean k1 KL (`rollout/kl`, nats per sequence) below minus this."""
    entropy_fraction: float = 0.1
    """entropy_collapse: the last window's mean entropy below this fraction of the first window's..."""
    entropy_floor: float = 0.05
    """...or below this many nats per token, having started at or above it."""
    clipfrac_high: float = 0.3
    """clip_fraction_high: the last window's mean clip fraction (`update/clipfrac`) above this."""
    value_loss_growth: float = 10.0
    """value_loss_explosion: the last window's mean value loss above this many times the first window's."""
    length_growth: float = 0.5
    """length_exploitation, length_growth: the mean response length grew by more than this fraction (0.5: 50%)."""
    eos_rate_drop: float = 0.2
    """length_exploitation: the EOS rate (share of responses that ended, not cut at max_new_tokens) fell by more
    than this (absolute, first window to last)..."""
    eos_rate_floor: float = 0.5
    """...and the length grew, or the EOS rate ended below this."""
    kl_per_token_high: float = 0.5
    """kl_far: the last window's mean k1 KL (`rollout/kl`, nats per sequence) over its mean response length above
    this many nats per token. The SmolLM2 demo's PPO ends near 0.035; its PPO with beta=0 averaged 0.91 over its last
    five steps, with repetitive, degraded text."""
    zero_variance_share: float = 0.5
    """zero_variance_groups: the last window's mean share of groups whose samples all scored the same above this."""
    policy_loss_near_zero: float = 0.01
    """zero_variance_groups: the policy loss counts as near zero when the last window's mean |loss| is below this."""
    sampler_logp_diff: float = 0.1
    """sampler_mismatch: a window's mean |trainer log-prob - vLLM's| per token (nats) above this."""
    sampler_logp_diff_max: float = 5.0
    """sampler_mismatch (a note): a window's mean of the largest per-token difference above this (nats)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_steps < 2:
            raise ConfigError(f"window must be >= 1 and min_steps >= 2 (got {self.window}, {self.min_steps})")
        if not 0 < self.entropy_fraction < 1:
            raise ConfigError(f"entropy_fraction must be in (0, 1) (got {self.entropy_fraction})")
        if not self.value_loss_growth > 1:
            raise ConfigError(f"value_loss_growth must be > 1 (got {self.value_loss_growth})")


Severity = Literal["problem", "note"]


@dataclass(frozen=True)
class Finding:
    """One thing the doctor saw in a run."""

    rule: str
    """The rule that found it (a name of :data:`RULES`' functions, e.g. ``"entropy_collapse"``)."""
    severity: Severity
    """``"problem"``: training went wrong, or is going wrong; ``"note"``: worth a look, may be fine."""
    steps: tuple[float, float]
    """The first and last logged step of the evidence."""
    seen: str
    """What was seen, with the numbers."""
    why: str
    """Why it can happen."""
    advice: str
    """What to try."""
    source: str = ""
    """The stage it concerns, when a pipeline run directory was read (``"ppo"``); empty otherwise."""

    @property
    def message(self) -> str:
        """The whole finding in plain words: seen, why, what to try."""
        return f"{self.seen} {self.why} Try: {self.advice}"


# ---------------------------------------------------------------- reading the metrics

Series = list[tuple[float, float]]
"""``(step, value)`` pairs in step order."""


def _num(value: Any) -> float | None:
    """``value`` as a finite float; None if absent, not a number, or NaN/inf (logged as strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_non_finite(value: Any) -> bool:
    """Whether a logged value is NaN or inf (MetricsLogger writes them as the strings "nan", "inf", "-inf")."""
    if isinstance(value, str):
        return value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity")
    return isinstance(value, float) and not math.isfinite(value)


def _sorted_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records that have a numeric step, in step order (a stable sort: logging order within a step)."""
    kept = [r for r in records if isinstance(r, dict) and _num(r.get("step")) is not None]
    return sorted(kept, key=lambda r: float(r["step"]))


def series(records: Sequence[dict[str, Any]], key: str) -> Series:
    """``(step, value)`` of the records that log ``key`` as a finite number, in step order."""
    out = []
    for record in _sorted_records(records):
        value = _num(record.get(key))
        if value is not None:
            out.append((float(record["step"]), value))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _sd(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than 2 values)."""
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _ends(points: Series, options: DoctorConfig) -> tuple[Series, Series] | None:
    """The first and the last window of ``points`` (halves, on a run shorter than two windows); None below
    ``min_steps`` points."""
    if len(points) < options.min_steps:
        return None
    w = min(options.window, len(points) // 2)
    return points[:w], points[-w:]


def _windows(points: Series, options: DoctorConfig) -> list[Series]:
    """Every run of ``window`` consecutive points (the whole series, if shorter)."""
    w = min(options.window, len(points))
    return [points[i : i + w] for i in range(len(points) - w + 1)] if w else []


def _vals(points: Series) -> list[float]:
    return [v for _, v in points]


def _span(points: Series) -> tuple[float, float]:
    return points[0][0], points[-1][0]


def steps_text(steps: tuple[float, float]) -> str:
    """``"step 4"`` or ``"steps 4–8"``."""
    a, b = (f"{s:g}" for s in steps)
    return f"step {a}" if a == b else f"steps {a}–{b}"


def _g(x: float) -> str:
    """A number for a sentence: three significant digits."""
    return f"{x:.3g}"


# ---------------------------------------------------------------- the rules


Rule = Callable[[list[dict[str, Any]], "list[dict[str, Any]] | None", DoctorConfig], list[Finding]]
"""A rule: (records in step order, frontier points or None, options) -> its findings (none: nothing seen)."""

_CHECKED_FOR_NON_FINITE = (M.SCORE, M.REWARD, M.KL, M.KL_K3, M.ENTROPY, "grad_norm")
"""Besides every key with "loss" in its name: the numbers a diverged run turns to NaN first."""


def non_finite(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """A loss (or score, reward, KL, entropy, gradient norm) logged as NaN or inf."""
    bad: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            if ("loss" in key or key in _CHECKED_FOR_NON_FINITE) and _is_non_finite(value):
                bad.setdefault(key, []).append(float(record["step"]))
    if not bad:
        return []
    steps = sorted({s for found in bad.values() for s in found})
    keys = ", ".join(f"{k} ({len(s)} step(s), first at step {s[0]:g})" for k, s in sorted(bad.items()))
    return [
        Finding(
            "non_finite",
            "problem",
            (steps[0], steps[-1]),
            f"Non-finite values (NaN or inf) were logged: {keys}.",
            "The update diverged or overflowed: a learning rate too high for the batch, an fp16 overflow, an "
            "importance ratio or log-ratio blowing up, or a reward that returned NaN; once a loss is NaN the "
            "weights are usually NaN too.",
            "resume from the last checkpoint before the first bad step with a lower lr, a smaller max_grad_norm, "
            "bf16 or fp32 instead of fp16, and log_ratio_clamp on (RL); check the reward function on the samples "
            "of that step (samples.jsonl).",
        )
    ]


def negative_kl(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """The k1 KL estimate (``rollout/kl``) negative on average over a window."""
    kl = series(records, M.KL)
    windows = _windows(kl, o)
    if len(kl) < 2 or not windows:
        return []
    worst = min(windows, key=lambda w: _mean(_vals(w)))
    mean = _mean(_vals(worst))
    if mean >= -o.negative_kl:
        return []
    negatives = sum(v < 0 for _, v in kl)
    k3 = [v for s, v in series(records, M.KL_K3) if worst[0][0] <= s <= worst[-1][0]]
    k3_text = f"; the k3 estimate over the same steps averaged {_g(_mean(k3))}" if k3 else ""
    return [
        Finding(
            "negative_kl",
            "problem",
            _span(worst),
            f"The k1 estimate of the KL to the reference ({M.KL}, nats per sequence) averaged {_g(mean)} over "
            f"{steps_text(_span(worst))}, below -{_g(o.negative_kl)}; {negatives} of {len(kl)} logged steps were "
            f"negative{k3_text}.",
            "The KL itself is never negative, but k1 = log π(y) − log π_ref(y), summed over the sampled tokens, is "
            "an estimator: unbiased only for tokens drawn from π at the temperature and top-p its log-probs assume, "
            "and each sample's value is negative whenever the reference gives the sampled token more probability. "
            "A negative batch mean means too few samples for its variance, or sampling that does not match the "
            "log-probs (top_p < 1 truncates the distribution the log-probs do not; a vLLM sampler that differs "
            "from the trainer). With kl_estimator=k1 the penalty then becomes a bonus, and adaptive_kl's "
            "controller, which reads this k1 mean, adapts β to a wrong KL.",
            "kl_estimator=k3 (never negative per token, unbiased, lower variance); a larger batch_size or "
            "samples_per_prompt; top_p=1 (the log-probs are of the untruncated distribution at `temperature`).",
        )
    ]


def entropy_collapse(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """The policy's entropy falling to a small fraction of its start, or below an absolute floor."""
    ends = _ends(series(records, M.ENTROPY), o)
    if ends is None:
        return []
    first, last = (_mean(_vals(e)) for e in ends)
    if first <= 0:
        return []
    fraction_hit = last < o.entropy_fraction * first
    floor_hit = last < o.entropy_floor <= first
    if not (fraction_hit or floor_hit):
        return []
    why = f"below {_g(o.entropy_fraction)} of its start" if fraction_hit else f"below the floor of {_g(o.entropy_floor)}"
    return [
        Finding(
            "entropy_collapse",
            "problem",
            (ends[0][0][0], ends[1][-1][0]),
            f"The policy's entropy ({M.ENTROPY}, nats per token) fell from {_g(first)} ({steps_text(_span(ends[0]))}) "
            f"to {_g(last)} ({steps_text(_span(ends[1]))}), {why}.",
            "The policy has become (nearly) deterministic: it samples the same tokens whatever it is asked, so "
            "the rollouts stop exploring and the advantages stop carrying information. Usual causes: a learning "
            "rate too high, a KL penalty too weak to hold it near the reference, or a reward that one narrow "
            "behaviour maximises.",
            "a lower lr; a larger beta (or adaptive_kl with a lower target_kl), which holds the policy near the "
            "reference's entropy; a higher sampling temperature; an entropy bonus in the loss (not an rlhfkit "
            "option: a custom loss); read samples.jsonl for the collapsed behaviour.",
        )
    ]


def clip_fraction(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """The ratio clip binding on too many tokens, or never although the policy moved within the update."""
    clip = series(records, M.CLIPFRAC)
    if not clip:
        return []
    last = clip[-min(o.window, len(clip)) :]
    mean = _mean(_vals(last))
    if mean > o.clipfrac_high:
        return [
            Finding(
                "clip_fraction_high",
                "problem",
                _span(last),
                f"The clip fraction ({M.CLIPFRAC}) averaged {_g(mean)} over {steps_text(_span(last))}, above "
                f"{_g(o.clipfrac_high)}: on that share of tokens the importance ratio left the clip range.",
                "Each update moves the policy far from the one that sampled the rollout, so most tokens get no "
                "gradient from the clipped objective and the update is off-policy: too high a learning rate, "
                "too many epochs or minibatches per rollout, or a clip range too narrow.",
                "a lower lr; fewer ppo_epochs or num_minibatches; target_kl_stop to end an update's epochs early; "
                "a wider clip_eps (or clip=asymmetric with a higher clip_eps_high).",
            )
        ]
    epochs = max(_vals(series(records, M.EPOCHS_DONE)), default=0.0)
    moved = max(_vals(series(records, M.APPROX_KL)), default=0.0) > 0
    if len(clip) >= o.min_steps and all(v == 0 for _, v in clip) and (epochs > 1 or moved):
        how = f"{epochs:g} epochs per rollout" if epochs > 1 else f"{M.APPROX_KL} above 0"
        return [
            Finding(
                "clip_fraction_zero",
                "note",
                _span(clip),
                f"The clip fraction ({M.CLIPFRAC}) was exactly 0 at all {len(clip)} logged steps, although the "
                f"policy changed between sampling and update ({how}).",
                "The importance ratio never left the clip range: each update is small next to clip_eps, so the "
                "clip never acts (training is safe, but may be slower than it could be).",
                "a higher lr, or more ppo_epochs; a narrower clip_eps if the aim is a tighter trust region.",
            )
        ]
    return []


def value_loss_explosion(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """PPO's value loss growing by an order of magnitude (non-finite values are :func:`non_finite`'s)."""
    ends = _ends(series(records, M.VALUE_LOSS), o)
    if ends is None:
        return []
    first, last = (_mean(_vals(e)) for e in ends)
    if not (first > 0 and last > o.value_loss_growth * first):
        return []
    return [
        Finding(
            "value_loss_explosion",
            "problem",
            (ends[0][0][0], ends[1][-1][0]),
            f"The value loss ({M.VALUE_LOSS}) grew from {_g(first)} ({steps_text(_span(ends[0]))}) to "
            f"{_g(last)} ({steps_text(_span(ends[1]))}), {_g(last / first)} times, over the "
            f"{_g(o.value_loss_growth)}x limit.",
            "The critic is not keeping up with the returns: the rewards' scale grew (an unnormalised reward "
            "model, a KL penalty growing with the KL), or the value learning rate is too high and it diverges; "
            "bad values make noisy advantages, which shake the policy in turn.",
            "score_norm=true or score_clip; a smaller vf_coef or a lower lr; value_clip_eps; check "
            f"{M.EXPLAINED_VARIANCE} (near 1 when the critic predicts the returns).",
        )
    ]


def length_exploitation(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """Responses growing long and no longer ending (the EOS rate falling): the reward paying for length."""
    length_ends = _ends(series(records, M.RESPONSE_LENGTH), o)
    eos_ends = _ends(series(records, M.EOS_RATE), o)
    growth, length_text = None, ""
    if length_ends is not None:
        len_first, len_last = (_mean(_vals(e)) for e in length_ends)
        if len_first > 0:
            growth = (len_last - len_first) / len_first
            length_text = (
                f"the mean response length ({M.RESPONSE_LENGTH}) went from {_g(len_first)} tokens "
                f"({steps_text(_span(length_ends[0]))}) to {_g(len_last)} ({steps_text(_span(length_ends[1]))}), "
                f"{growth:+.0%}"
            )
    grew = growth is not None and growth > o.length_growth
    if eos_ends is not None:
        eos_first, eos_last = (_mean(_vals(e)) for e in eos_ends)
        if eos_first - eos_last > o.eos_rate_drop and (grew or eos_last < o.eos_rate_floor):
            return [
                Finding(
                    "length_exploitation",
                    "problem",
                    (eos_ends[0][0][0], eos_ends[1][-1][0]),
                    f"The EOS rate ({M.EOS_RATE}, the share of responses that ended rather than being cut at "
                    f"max_new_tokens) fell from {_g(eos_first)} ({steps_text(_span(eos_ends[0]))}) to "
                    f"{_g(eos_last)} ({steps_text(_span(eos_ends[1]))})" + (f", while {length_text}." if length_text else "."),
                    "The policy is learning to run on: the reward (a reward model above all) pays for longer "
                    "answers (length exploitation, Singhal et al. 2023), or the policy degenerated into repetition "
                    "that never reaches EOS. Cut responses are scored unfinished, and the KL grows with length.",
                    "missing_eos_penalty (a score penalty for a response cut without EOS); overlong_buffer (DAPO's "
                    "soft overlong punishment); a larger beta; a reward model trained or normalised against "
                    "length; read samples.jsonl for the long responses.",
                )
            ]
    if grew and length_ends is not None:
        score = _ends(series(records, M.SCORE), o)
        score_text = ""
        if score is not None:
            score_text = f"; the score ({M.SCORE}) went from {_g(_mean(_vals(score[0])))} to {_g(_mean(_vals(score[1])))}"
        eos_text = f"; the EOS rate did not fall by more than {_g(o.eos_rate_drop)}" if eos_ends is not None else ""
        return [
            Finding(
                "length_growth",
                "note",
                (length_ends[0][0][0], length_ends[1][-1][0]),
                f"{length_text[0].upper()}{length_text[1:]}, above +{o.length_growth:.0%}{score_text}{eos_text}.",
                "Longer answers may be what the task wants, or the start of length exploitation: reward models "
                "often prefer longer responses whatever their content (Singhal et al. 2023).",
                "compare the gold score (or read samples.jsonl) against the length; missing_eos_penalty or "
                "overlong_buffer if the responses start to hit max_new_tokens.",
            )
        ]
    return []


def kl_far(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """The policy far from its reference: the last window's KL per response token above ``kl_per_token_high``."""
    ends = _ends(series(records, M.KL), o)
    length = series(records, M.RESPONSE_LENGTH)
    if ends is None or not length:
        return []
    last = ends[1]
    span = _span(last)
    lengths = [v for s, v in length if span[0] <= s <= span[1]]
    tokens = _mean(lengths) if lengths else 0.0
    if tokens <= 0:
        return []
    kl = _mean(_vals(last))
    per_token = kl / tokens
    if per_token <= o.kl_per_token_high:
        return []
    betas = [v for s, v in series(records, "beta") if span[0] <= s <= span[1]]
    beta_text = ""
    if betas and max(betas) == 0:
        beta_text = " beta was 0 over those steps: no KL penalty held the policy near the reference."
    elif betas:
        beta_text = f" beta averaged {_g(_mean(betas))} over those steps."
    return [
        Finding(
            "kl_far",
            "note",
            span,
            f"The k1 KL to the reference ({M.KL}) averaged {_g(kl)} nats per response over {steps_text(span)}, "
            f"{_g(per_token)} nats per token on responses of {_g(tokens)} tokens (above {_g(o.kl_per_token_high)}; "
            f"it started at {_g(_mean(_vals(ends[0])))} over {steps_text(_span(ends[0]))}).{beta_text}",
            "So far from the reference, the policy writes text the reward model never saw in training, where its "
            "scores are least reliable: the regime where a proxy reward is over-optimised (Gao et al. 2022) and "
            "text turns repetitive or degenerate. A gold score that still rises does not rule it out when the gold "
            "scorer is itself a program that can be gamed.",
            "read samples.jsonl; probe_points > 0 with a gold scorer to draw the reward-KL frontier; a larger beta, "
            "or adaptive_kl with a target_kl; a lower lr or fewer steps; keep the checkpoint from before the drift.",
        )
    ]


def zero_variance_groups(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """GRPO/RLOO groups whose samples all scored the same (no advantage, no gradient), with the loss near 0."""
    share = series(records, M.ZERO_VARIANCE_GROUPS)
    if not share:
        return []
    last = share[-min(o.window, len(share)) :]
    mean = _mean(_vals(last))
    if mean <= o.zero_variance_share:
        return []
    loss = [abs(v) for s, v in series(records, M.POLICY_LOSS) if last[0][0] <= s <= last[-1][0]]
    near_zero = bool(loss) and _mean(loss) < o.policy_loss_near_zero
    loss_text = (
        f"; the policy loss ({M.POLICY_LOSS}) averaged {_g(_mean(loss))} in absolute value"
        + (f", near zero (below {_g(o.policy_loss_near_zero)})" if near_zero else "")
        if loss
        else ""
    )
    return [
        Finding(
            "zero_variance_groups",
            "problem" if near_zero else "note",
            _span(last),
            f"On average {_g(mean)} of the groups ({M.ZERO_VARIANCE_GROUPS}) had samples that all scored the same "
            f"over {steps_text(_span(last))}, above {_g(o.zero_variance_share)}{loss_text}.",
            "A group-relative advantage is a sample's score minus its group's mean: when every sample of a prompt "
            "scores the same, every advantage is 0 and that prompt teaches nothing. The prompts have become too "
            "easy (all solved) or are too hard (none), the reward is too coarse (pass/fail), or the samples are "
            "too alike (low temperature, collapsed entropy)" + (", so the update has almost no signal." if near_zero else "."),
            "more samples_per_prompt; prompts of the difficulty the policy is at (neither always nor never "
            "solved); a higher temperature; a reward with finer grades. drop_zero_variance_groups keeps such "
            "groups out of the loss (DAPO's filter) but adds no signal; DAPO also resamples them.",
        )
    ]


def _frontier_points(frontier: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Probe points with a finite step, kl, gold, gold_se (>= 0) and proxy, in step order."""
    points = []
    for p in frontier or []:
        if not isinstance(p, dict):
            continue
        point = {k: _num(p.get(k)) for k in ("step", "kl", "gold", "gold_se", "proxy")}
        if None not in point.values() and point["gold_se"] >= 0:  # type: ignore[operator]
            points.append(point)
    return sorted(points, key=lambda p: p["step"])


_OVEROPT_WHY = (
    "The policy is exploiting the proxy: it finds what the reward model scores highly but the gold scorer "
    "does not — reward hacking, the over-optimisation Gao, Schulman & Hilton (2022) measure, where the gold "
    "score peaks at some KL from the reference and then falls while the proxy keeps rising."
)
_OVEROPT_ADVICE = (
    "a larger beta (a stronger KL penalty), or adaptive_kl with a target_kl near the KL of the gold peak; stop "
    "at the best gold point (max_steps at its step, or keep its checkpoint: save_every, keep_checkpoints); a "
    "better reward model (more or cleaner preference data), or an ensemble of reward models."
)


def overoptimisation(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """The proxy reward rising while the gold score falls by more than its noise.

    With probe points (``frontier.jsonl``: held-out prompts, each point's gold with its standard error), the
    verdict is :func:`rlhfkit.stats.overoptimisation`'s, the report's: a later point whose proxy is above the gold
    peak's and whose gold is below it by more than 1.96 combined standard errors. Without them, the same test on
    the logged ``rollout/gold_score``: the best earlier window of ``window`` steps against the last, each window's
    standard error its spread over its steps over sqrt(window)."""
    points = _frontier_points(frontier)
    if len(points) >= 2:
        v = stats.overoptimisation(points)
        if v["verdict"] != "over-optimised":
            return []
        by_step = {p["step"]: p for p in points}
        peak, low = by_step[v["peak_step"]], by_step[v["drop_step"]]
        return [
            Finding(
                "overoptimisation",
                "problem",
                (v["peak_step"], v["drop_step"]),
                f"On the held-out probes ({FRONTIER_FILE}) the gold score peaked at {_g(peak['gold'])} ± "
                f"{_g(peak['gold_se'])} (SE) at step {v['peak_step']:g} (KL {_g(peak['kl'])}) and fell to "
                f"{_g(low['gold'])} ± {_g(low['gold_se'])} by step {v['drop_step']:g} (KL {_g(low['kl'])}): a fall "
                f"of {_g(v['drop'])}, more than {_Z95} combined standard errors ({_g(v['drop_threshold'])}), while "
                f"the proxy (reward-model) score rose from {_g(peak['proxy'])} to {_g(low['proxy'])}.",
                _OVEROPT_WHY,
                _OVEROPT_ADVICE,
            )
        ]
    gold = dict(series(records, M.GOLD))
    proxy = dict(series(records, M.SCORE))
    both = [(s, gold[s], proxy[s]) for s in gold if s in proxy]
    w = min(o.window, len(both) // 2)
    if len(both) < o.min_steps or w < 2:
        return []
    # Windows of w steps, back from the last step: the last window against the best earlier one.
    blocks = [both[end - w : end] for end in range(len(both), w - 1, -w)]
    last, earlier = blocks[0], blocks[1:]
    best = max(earlier, key=lambda b: _mean([g for _, g, _ in b]))
    gold_peak, gold_last = _mean([g for _, g, _ in best]), _mean([g for _, g, _ in last])
    proxy_peak, proxy_last = _mean([p for _, _, p in best]), _mean([p for _, _, p in last])
    se_peak, se_last = (_sd([g for _, g, _ in b]) / math.sqrt(w) for b in (best, last))
    threshold = _Z95 * math.sqrt(se_peak**2 + se_last**2)
    drop = gold_peak - gold_last
    if not (proxy_last > proxy_peak and drop > 0 and drop > threshold):
        return []
    span_peak, span_last = (best[0][0], best[-1][0]), (last[0][0], last[-1][0])
    return [
        Finding(
            "overoptimisation",
            "problem",
            (span_peak[0], span_last[1]),
            f"The gold score ({M.GOLD}) averaged {_g(gold_peak)} ± {_g(se_peak)} (SE) over "
            f"{steps_text(span_peak)}, its best window, and {_g(gold_last)} ± {_g(se_last)} over "
            f"{steps_text(span_last)}: a fall of {_g(drop)}, more than {_Z95} combined standard errors "
            f"({_g(threshold)}), while the proxy score ({M.SCORE}) rose from {_g(proxy_peak)} to {_g(proxy_last)}.",
            _OVEROPT_WHY + " (These are the training samples' scores; held-out probes, probe_points > 0, are the "
            "cleaner measurement.)",
            _OVEROPT_ADVICE,
        )
    ]


def sampler_mismatch(records: list[dict[str, Any]], frontier: list[dict[str, Any]] | None, o: DoctorConfig) -> list[Finding]:
    """vLLM's log-probs of the sampled tokens far from the trainer's (the training/inference mismatch)."""
    diff = series(records, M.SAMPLER_LOGP_DIFF)
    largest = series(records, M.SAMPLER_LOGP_DIFF_MAX)
    if not diff and not largest:
        return []
    worst_mean = max(_windows(diff, o), key=lambda w: _mean(_vals(w)), default=None)
    worst_max = max(_windows(largest, o), key=lambda w: _mean(_vals(w)), default=None)
    mean_hit = worst_mean is not None and _mean(_vals(worst_mean)) > o.sampler_logp_diff
    max_hit = worst_max is not None and _mean(_vals(worst_max)) > o.sampler_logp_diff_max
    if not (mean_hit or max_hit):
        return []
    evidence = worst_mean if mean_hit else worst_max
    assert evidence is not None
    parts = []
    if worst_mean is not None:
        parts.append(
            f"the mean |trainer log-prob − vLLM's| per sampled token ({M.SAMPLER_LOGP_DIFF}) reached "
            f"{_g(_mean(_vals(worst_mean)))} nats averaged over {steps_text(_span(worst_mean))} (limit "
            f"{_g(o.sampler_logp_diff)})"
        )
    if worst_max is not None:
        parts.append(
            f"the largest per-token difference ({M.SAMPLER_LOGP_DIFF_MAX}) averaged {_g(_mean(_vals(worst_max)))} "
            f"nats over {steps_text(_span(worst_max))} (limit {_g(o.sampler_logp_diff_max)})"
        )
    weights = [v for s, v in series(records, M.IS_WEIGHT_MEAN) if evidence[0][0] <= s <= evidence[-1][0]]
    if weights:
        correction = (
            f" The importance-sampling correction is on (mean truncated weight {M.IS_WEIGHT_MEAN} "
            f"{_g(_mean(weights))} over those steps; far from 1, it is doing heavy lifting)."
        )
        advice_is = "keep vllm_importance_sampling on (it is)"
    else:
        correction = f" No {M.IS_WEIGHT_MEAN} was logged: the importance-sampling correction is off."
        advice_is = "vllm_importance_sampling=true (the default), which reweights each token by the truncated ratio"
    return [
        Finding(
            "sampler_mismatch",
            "problem" if mean_hit else "note",
            _span(evidence),
            "The rollout engine's log-probs disagree with the trainer's: " + "; ".join(parts) + "." + correction,
            "vLLM samples with its own kernels and precision (bf16 or fp16, other attention and matmul order, "
            "sometimes a different sampler), so the tokens come from a slightly different policy than the one "
            "the trainer computes the ratio and the KL for; the gap makes the update off-policy and grows as "
            "the weights move (Yao et al. 2025).",
            f"{advice_is}; a lower vllm_importance_sampling_cap to bound the weights; matching precisions "
            "(the trainer's precision=bf16, as vLLM decodes).",
        )
    ]


RULES: list[Rule] = [
    non_finite,
    negative_kl,
    entropy_collapse,
    clip_fraction,
    value_loss_explosion,
    length_exploitation,
    kl_far,
    zero_variance_groups,
    overoptimisation,
    sampler_mismatch,
]
"""Every rule, in the order findings are listed."""


def diagnose(
    records: Sequence[dict[str, Any]], frontier: Sequence[dict[str, Any]] | None = None, *, options: DoctorConfig | None = None
) -> list[Finding]:
    """The findings of every rule (:data:`RULES`) on a run's ``metrics.jsonl`` entries (today's names, or those
    of a run from before the namespacing) and, if it probed, its ``frontier.jsonl`` points (``step``, ``kl``,
    ``gold``, ``gold_se``, ``proxy``). Pure: reads nothing, prints nothing."""
    o = options if options is not None else DoctorConfig()
    entries = _sorted_records([current_metric_names(r) for r in records if isinstance(r, dict)])
    points = list(frontier) if frontier is not None else None
    return [finding for rule in RULES for finding in rule(entries, points, o)]


# ---------------------------------------------------------------- a run directory


def read_frontier_points(path: str | Path) -> list[dict[str, Any]]:
    """``frontier.jsonl``'s probe points in step order, the last line of a repeated step winning (a torn last line
    is ignored; an unreadable line elsewhere is a :class:`~rlhfkit.data.io.DataError`)."""
    by_step: dict[float, dict[str, Any]] = {}
    for entry in read_jsonl_records(path):
        step = _num(entry.get("step")) if isinstance(entry, dict) else None
        if step is not None:
            by_step[step] = entry
    return [by_step[s] for s in sorted(by_step)]


def _targets(root: Path) -> list[tuple[str, Path]]:
    """(stage name or "", directory) of each training run under ``root``: itself, or a pipeline's policy stages."""
    if (root / METRICS_FILE).is_file():
        return [("", root)]
    names = [*POLICY_ALGORITHMS, LEGACY_POLICY_STAGE]
    return [(name, root / name) for name in names if (root / name / METRICS_FILE).is_file()]


def logged_steps(records: Sequence[dict[str, Any]]) -> int:
    """How many distinct steps ``records`` log."""
    return len({float(r["step"]) for r in _sorted_records(records)})


def format_findings(findings: Sequence[Finding], steps: int, where: str = "") -> str:
    """The findings as plain text: a summary line, then one block per finding (what was seen, why, what to try)."""
    head = f"{where}: " if where else ""
    problems = sum(f.severity == "problem" for f in findings)
    notes = len(findings) - problems
    if not problems:
        summary = f"{head}no problems found in {steps} steps" + (f"; {notes} note(s)" if notes else "")
    else:
        summary = f"{head}{problems} problem(s)" + (f" and {notes} note(s)" if notes else "") + f" in {steps} steps"
    lines = [summary]
    for f in findings:
        lines += ["", f"{f.severity.upper()} {f.rule} ({steps_text(f.steps)})"]
        for label, text in (("seen", f.seen), ("why", f.why), ("try", f.advice)):
            lines.append(textwrap.fill(text, 100, initial_indent=f"  {label}: ", subsequent_indent="    "))
    return "\n".join(lines)


def run(config: DoctorConfig) -> list[Finding]:
    """Diagnose the run in ``config.run_dir`` (its ``metrics.jsonl`` and ``frontier.jsonl``; a pipeline run
    directory: each policy stage's), print the findings and return them. ``FileNotFoundError`` names the path
    when there is no ``metrics.jsonl`` to read."""
    root = Path(config.run_dir)
    targets = _targets(root)
    if not targets:
        stages = ", ".join(f"{s}/{METRICS_FILE}" for s in (*POLICY_ALGORITHMS, LEGACY_POLICY_STAGE))
        raise FileNotFoundError(
            f"doctor: {root / METRICS_FILE} not found (nor, for a pipeline run directory, any of {stages} under {root})"
        )
    findings: list[Finding] = []
    for stage, directory in targets:
        records = read_metrics(directory)
        frontier_path = directory / FRONTIER_FILE
        frontier = read_frontier_points(frontier_path) if frontier_path.is_file() else None
        found = [replace(f, source=stage) for f in diagnose(records, frontier, options=config)]
        log.info(format_findings(found, logged_steps(records), str(directory / METRICS_FILE)))
        if len(targets) > 1:
            log.info("")
        findings += found
    return findings
