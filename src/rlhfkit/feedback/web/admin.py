"""Status (throughput and agreement), export, and waiting for labels; the pairs to label are read by
:func:`rlhfkit.feedback.web.pairs.read_pairs`.

* :func:`status` / ``rlhfkit annotate status``: labels per annotator, throughput
  and inter-annotator agreement (Fleiss' kappa over pairs with ``overlap`` votes,
  Cohen's kappa for each two annotators who share pairs).
* :func:`export` / ``rlhfkit annotate export``: one
  :class:`~rlhfkit.data.records.Comparison` per pair, the majority vote. A pair
  whose top vote is shared (one A and one B, say) is exported as a **tie** with
  ``meta.majority == "split"``, so a disagreement trains as P = 0.5 rather than
  a coin flip, and every pair carries its votes, each annotator's choice, reason
  and A/B order in ``meta``. TRL has no ties: ``--format trl`` leaves ties and
  splits out and says how many. It writes ``.jsonl``, ``.json`` or ``.parquet``
  and refuses any other extension (a ValueError naming the path).

  Graded votes (:mod:`rlhfkit.feedback.grades`) reach every record's ``meta``:
  ``grade`` (the pair's grade on the 7-point scale), ``both_bad``, ``target`` (the
  soft label P(chosen preferred), the mean over the votes) and ``margin`` (the
  Bradley-Terry margin); reward-model training reads ``target`` and ``margin``
  (:func:`rlhfkit.data.pairwise.tokenize_pairs`). "Both bad" pairs are kept by
  default, with their grade, and counted; ``drop_both_bad`` / ``--drop-both-bad``
  leaves them out.

  Reasons are the annotators' own words, kept verbatim, and "A" / "B" in them
  mean the sides **as shown on screen**, which for a pair shown swapped are the
  reverse of the exported ``response_a`` / ``response_b``. So each vote in
  ``meta.labels`` carries ``reason_sides`` (``"screen A = response_b, screen B =
  response_a"`` when swapped), and in the joined ``reason`` a reason given on a
  swapped pair is prefixed ``(shown swapped: screen A = response_b)``; an
  unprefixed reason was given with ``response_a`` on the left. The text itself
  is not rewritten: "A" can be part of a word or a quote, and guessing wrong
  would change what the annotator said.
* :func:`wait_for_labels` and :func:`comparisons`: what the pipeline's ``label`` stage with
  ``source: human-web`` runs on (``rlhfkit.label``).
* Thumbs mode (:data:`~rlhfkit.feedback.web.store.MODE_THUMBS`): :func:`thumbs_records` / ``export``
  write KTO records (``prompt``, ``completion``, ``label``: the majority of up / down votes, and
  ``meta``); an item with as many ups as downs is left out and counted, unless the lead settled it.
* The lead (:func:`lead_overview`): progress, throughput, agreement per day, stuck and split pairs
  with their skip reasons, and per annotator the quality numbers of :func:`store_status`: accuracy on
  check questions, agreement with the majority, position bias and median seconds per label. Answers to
  check questions are never exported. A pair the lead settled exports the lead's choice as its label
  (``meta.lead``), whatever the votes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal

from rlhfkit.data.preferences import _write_records, save_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.feedback.agreement import (
    category_counts,
    check_accuracy,
    cohen_kappa,
    fleiss_kappa,
    majority_agreement,
    position_bias,
)
from rlhfkit.feedback.grades import pair_targets, scale_grade
from rlhfkit.feedback.web.pairs import read_pairs as read_pairs  # moved to pairs.py; the old name still imports
from rlhfkit.feedback.web.store import (
    MODE_PAIRS,
    MODE_THUMBS,
    MODE_VOTES,
    THUMB_UP,
    VOTES,
    AnnotationStore,
    LeadDecision,
    Settlement,
    StoredLabel,
    to_shown,
)

SESSION_GAP_SECONDS = 600.0
"""Gaps between one annotator's labels longer than this are breaks, not labelling time."""


SWAPPED_NOTE = " (shown swapped: screen A = response_b)"
"""Added after the annotator's name in the joined ``reason`` when the pair was shown swapped."""
EXPORT_SUFFIXES = (".jsonl", ".json", ".parquet")
"""The extensions :func:`export` writes (anything else would silently get JSONL)."""


# ----------------------------------------------------------------------------- majority vote


def reason_sides(*, flipped: bool) -> str:
    """Which response each on-screen side was: ``"screen A = response_a, screen B = response_b"`` or, swapped, the reverse."""
    left, right = ("response_b", "response_a") if flipped else ("response_a", "response_b")
    return f"screen A = {left}, screen B = {right}"


def majority(votes: Sequence[str], categories: Sequence[str] = VOTES) -> str:
    """``a``, ``b`` or ``tie`` (or, with thumbs' categories, ``up`` / ``down``) when one has the most votes;
    ``split`` when the top count is shared."""
    counts = Counter(votes)
    top = max(counts.values())
    winners = [choice for choice in categories if counts[choice] == top]
    return winners[0] if len(winners) == 1 else "split"


LEAD = "lead"
"""The name the lead's decision carries in ``source`` and ``reason``."""


def _lead_meta(decision: LeadDecision | None) -> dict | None:
    return None if decision is None else {"choice": decision.choice, "reason": decision.reason, "created": decision.created}


def comparisons(store: AnnotationStore, *, min_votes: int = 1) -> list[Comparison]:
    """One majority-vote Comparison per pair with at least ``min_votes`` votes, in pair order.

    ``meta``: ``item_index``, ``votes`` (``{"a", "b", "tie"}`` counts), ``majority``
    (``a | b | tie | split``), ``agreement`` (share of votes for the majority; for a
    split, the shared top share), ``skips``, and ``labels``: each vote's
    annotator, choice (canonical), reason (verbatim: "A"/"B" in it are the sides
    as shown), ``shown`` order (``"ab"``, or ``"ba"`` when the annotator saw
    response B on the left), ``reason_sides`` (the same in words:
    ``"screen A = response_b, screen B = response_a"``), ``grade`` (canonical, on
    the 7-point scale :data:`rlhfkit.feedback.grades.SCALE`: ``a_much_better`` ...
    ``tie`` ... ``b_much_better``; None for an ungraded vote) and ``both_bad``.

    Graded preferences (:mod:`rlhfkit.feedback.grades` holds the numbers):

    * ``grade``: the votes' common grade on the 7-point scale, ``"mixed"`` when
      they differ, None when every vote is ungraded (a choice without a strength);
    * ``target``: P(``responses[ranking[0]]`` is preferred), the mean of the votes'
      soft labels (much better 1.0, better 0.9, slightly better 0.7, tie 0.5,
      ungraded 1.0); for a tie or split, P(``response_a`` is preferred);
    * ``margin``: the Bradley-Terry margin, the mean of the votes' margins toward
      the chosen side (much better 1.0, better 0.5, slightly better 0.25, ungraded
      0) floored at 0; 0 for a tie or split;
    * ``both_bad``: more than half of the votes marked both responses bad
      (``both_bad_votes`` counts them).

    ``reason`` joins the votes' reasons as ``annotator: reason``; a reason given
    on a pair shown swapped reads ``annotator (shown swapped: screen A =
    response_b): reason``, so "A is better" cannot be read against the wrong side.
    """
    by_pair: dict[int, list[StoredLabel]] = defaultdict(list)
    for label in store.labels():
        by_pair[label.item_index].append(label)
    decisions = store.decisions()
    out = []
    for pair in store.pairs():
        labels = by_pair.get(pair.item_index, [])
        votes = [label for label in labels if label.choice != "skip"]
        decision = decisions.get(pair.item_index)
        if decision is None and len(votes) < max(min_votes, 1):
            continue
        voted = majority([v.choice for v in votes]) if votes else None
        # The lead's decision is the final label; the votes stay in meta for the record.
        result = decision.choice if decision is not None else voted
        counts = Counter(v.choice for v in votes)
        names = [v.annotator for v in votes] + ([LEAD] if decision is not None else [])
        reasons = [f"{v.annotator}{SWAPPED_NOTE if v.flipped else ''}: {v.reason}" for v in votes if v.reason]
        if decision is not None and decision.reason:
            reasons.append(f"{LEAD}: {decision.reason}")
        grades = [scale_grade(v.choice, v.grade) for v in votes]
        common = (grades[0] if len(set(grades)) == 1 else "mixed") if grades else None
        scored = [(v.choice, v.grade) for v in votes] if decision is None else [(decision.choice, None)]
        target, margin = pair_targets(scored, chosen=1 if result == "b" else 0, tie=result in ("tie", "split"))
        both_bad = sum(v.both_bad for v in votes)
        meta = {
            "item_index": pair.item_index,
            "votes": {choice: counts[choice] for choice in VOTES},
            "majority": voted,
            "lead": _lead_meta(decision),
            "agreement": counts[result] / len(votes)
            if decision is not None and votes
            else (max(counts.values()) / len(votes) if votes else None),
            "skips": len(labels) - len(votes),
            "labels": [
                {
                    "annotator": v.annotator,
                    "choice": v.choice,
                    "reason": v.reason,
                    "shown": "ba" if v.flipped else "ab",
                    "reason_sides": reason_sides(flipped=v.flipped),
                    "grade": grade,
                    "both_bad": v.both_bad,
                }
                for v, grade in zip(votes, grades)
            ],
            "grade": common,
            "target": target,
            "margin": margin,
            "both_bad": both_bad * 2 > len(votes) if votes else False,
            "both_bad_votes": both_bad,
        }
        out.append(
            Comparison(
                prompt=pair.prompt,
                responses=list(pair.responses),
                ranking=[1, 0] if result == "b" else [0, 1],
                tie=result in ("tie", "split"),
                reason=" | ".join(reasons),
                source="human-web:" + ",".join(names),
                meta=meta,
            )
        )
    return out


def thumbs_records(store: AnnotationStore, *, min_votes: int = 1) -> tuple[list[dict], int]:
    """KTO records of a thumbs database, one per item with at least ``min_votes`` votes (or a lead's decision),
    and how many items were left out for a tie (as many ups as downs, not settled by the lead).

    Each record is ``{"prompt", "completion", "label", "meta"}`` (:func:`rlhfkit.data.unpaired.unpaired_record`;
    ``rlhfkit kto data=FILE`` reads it as it is). ``label`` is the majority (``true``: more ups), or the lead's
    decision. ``meta``: ``item_index``, ``votes`` (``{"up", "down"}``), ``agreement`` (share of votes for
    the label), ``skips``, ``annotators`` (who voted), ``labels`` (each vote's annotator, choice and reason;
    skips with their reasons under ``skipped``), ``source`` (``human-web:NAMES``) and ``lead`` (the lead's
    choice and reason, or None).
    """
    from rlhfkit.data.unpaired import unpaired_record  # here: that module imports torch, the server must start fast

    by_item: dict[int, list[StoredLabel]] = defaultdict(list)
    for label in store.labels():
        by_item[label.item_index].append(label)
    decisions = store.decisions()
    records, ties = [], 0
    for item in store.thumbs():
        labels = by_item.get(item.item_index, [])
        votes = [label for label in labels if label.choice != "skip"]
        decision = decisions.get(item.item_index)
        if decision is None and len(votes) < max(min_votes, 1):
            continue
        counts = Counter(v.choice for v in votes)
        result = decision.choice if decision is not None else majority([v.choice for v in votes], MODE_VOTES[MODE_THUMBS])
        if result == "split":
            ties += 1
            continue
        names = [v.annotator for v in votes] + ([LEAD] if decision is not None else [])
        meta = {
            "item_index": item.item_index,
            "votes": {choice: counts[choice] for choice in MODE_VOTES[MODE_THUMBS]},
            "agreement": counts[result] / len(votes) if votes else None,
            "skips": len(labels) - len(votes),
            "annotators": [v.annotator for v in votes],
            "labels": [{"annotator": v.annotator, "choice": v.choice, "reason": v.reason} for v in votes],
            "skipped": [{"annotator": v.annotator, "reason": v.reason} for v in labels if v.choice == "skip"],
            "source": "human-web:" + ",".join(names),
            "lead": _lead_meta(decision),
        }
        records.append(unpaired_record(item.prompt, item.response, result == THUMB_UP, meta))
    return records, ties


@dataclass
class ExportConfig:
    """``rlhfkit annotate export --db DB --format F OUTPUT``."""

    db: str
    """The annotation database."""
    output: str
    """Where to write: ``.jsonl``, ``.json`` or ``.parquet`` (another extension is a ValueError)."""
    format: Literal["jsonl", "trl", "seed"] = "jsonl"
    """``jsonl``: rlhfkit comparison records (every field; what the trainers read);
    ``seed``: prompt/response_a/response_b/preferred (a split is ``tie``);
    ``trl``: prompt/chosen/rejected, ties and splits left out. A thumbs database always writes KTO records
    (:func:`thumbs_records`) and takes only ``jsonl`` (the default)."""
    min_votes: int = 1
    """Export pairs with at least this many votes (set it to the overlap for complete pairs only)."""
    drop_both_bad: bool = False
    """Leave out pairs marked both bad (``meta.both_bad``). Default: keep them, with their grade; training then
    learns the preference between two bad responses like any other (filter on ``meta.both_bad`` to do otherwise)."""


class ExportResult(tuple):
    """``(records written, ties left out)`` as :func:`export` has always returned, plus ``both_bad``:
    how many both-bad pairs were kept (or, with ``drop_both_bad``, left out)."""

    both_bad: int
    thumbs: bool
    """A thumbs database: KTO records were written, and ``left_out`` counts the tied items."""

    def __new__(cls, written: int, left_out: int, both_bad: int = 0, *, thumbs: bool = False) -> ExportResult:
        result = super().__new__(cls, (written, left_out))
        result.both_bad = both_bad
        result.thumbs = thumbs
        return result

    @property
    def written(self) -> int:
        return self[0]

    @property
    def left_out(self) -> int:
        return self[1]


def export(config: ExportConfig) -> ExportResult:
    """Write the majority labels; returns ``(records written, ties left out)`` (the latter only for TRL), with
    ``.both_bad``, the number of both-bad pairs kept or, with ``drop_both_bad``, left out.

    The output's extension picks the file type: ``.jsonl``, ``.json`` (a JSON list)
    or ``.parquet``; any other is a ValueError naming the path, before anything is read or written.
    """
    check_export_path(config.output)
    store = AnnotationStore(config.db, create=False)
    try:
        if store.mode == MODE_THUMBS:
            if config.format != "jsonl":
                raise ValueError(
                    f"{config.db}: a thumbs database exports KTO records (prompt, completion, label); "
                    f"--format {config.format} is for pairs: leave --format out"
                )
            records, ties = thumbs_records(store, min_votes=config.min_votes)
            _write_records(Path(config.output), records)
            return ExportResult(len(records), ties, thumbs=True)
        labels = comparisons(store, min_votes=config.min_votes)
    finally:
        store.close()
    both_bad = sum(bool(c.meta["both_bad"]) for c in labels)
    if config.drop_both_bad:
        labels = [c for c in labels if not c.meta["both_bad"]]
    left_out = sum(c.tie for c in labels) if config.format == "trl" else 0
    save_format = "rlhfkit" if config.format == "jsonl" else config.format
    save_comparisons(config.output, labels, save_format, skip_ties=config.format == "trl")
    return ExportResult(len(labels) - left_out, left_out, both_bad)


def check_export_path(output: str | Path) -> None:
    """A ValueError unless ``output`` ends in an extension :func:`export` writes."""
    suffix = Path(output).suffix
    if suffix not in EXPORT_SUFFIXES:
        what = f"extension {suffix!r}" if suffix else "no extension"
        raise ValueError(
            f"{output}: {what}; export writes .jsonl (JSON lines), .json (a JSON list) or .parquet "
            "(lower case), whatever the --format; name the output file with one of these"
        )


# ----------------------------------------------------------------------------- status


@dataclass
class AnnotatorStatus:
    name: str
    votes: int
    skips: int
    last_hour: int
    """Labels (votes and skips) in the last hour."""
    seconds_per_label: float
    """Median seconds from a pair being shown to its label (check questions and skips included). For a database
    from before shown times were kept (schema < 4): the median gap between consecutive labels, breaks over
    10 minutes left out, nan with < 2 labels."""
    check_accuracy: float = math.nan
    """Share of answered check questions (skips left out) answered with the known better side; nan with none."""
    checks: int = 0
    """Check questions answered (skips left out)."""
    majority_agreement: float = math.nan
    """Share of this annotator's votes on pairs with >= 2 votes that match the other voters' majority
    (:func:`rlhfkit.feedback.agreement.majority_agreement`: leave-one-out, pairs where the others split left out)."""
    majority_items: int = 0
    """Pairs counted in ``majority_agreement``."""
    left_share: float = math.nan
    """Position bias: share of this annotator's non-tie votes (check questions included) for the response shown
    on the left; near 0.5 is unbiased. nan in thumbs mode or without such votes."""
    left_votes: int = 0
    """Non-tie votes counted in ``left_share``."""


@dataclass
class Status:
    """What ``rlhfkit annotate status`` prints."""

    pairs: int
    complete: int
    """Pairs with at least ``overlap`` votes."""
    overlap: int
    votes: int
    annotators: list[AnnotatorStatus]
    fleiss: float
    """Fleiss' kappa over pairs with ``overlap`` (>= 2) votes, the first ``overlap`` of each; nan if none."""
    fleiss_pairs: int
    cohen: list[tuple[str, str, float, int]] = field(default_factory=list)
    """``(annotator, annotator, kappa, shared pairs)`` for every two annotators who voted on the same pairs."""
    check_questions: int = 0
    """Check questions in the database (``serve --checks``); never exported."""


def status(db: str | Path, *, now: float | None = None) -> Status:
    """Progress, throughput and agreement of the annotation database ``db``."""
    store = AnnotationStore(db, create=False)
    try:
        return store_status(store, now=now)
    finally:
        store.close()


def store_status(store: AnnotationStore, *, now: float | None = None) -> Status:
    """:func:`status` of an open store (the lead's page)."""
    now = time.time() if now is None else now
    overlap, labels, names, mode = store.overlap, store.labels(), store.annotators(), store.mode
    categories = MODE_VOTES[mode]
    checks = store.check_labels()
    pairs, complete = store.vote_counts()
    votes_by_pair: dict[int, list[StoredLabel]] = defaultdict(list)
    by_annotator: dict[str, list[StoredLabel]] = defaultdict(list)
    checks_by_annotator: dict[str, list[StoredLabel]] = defaultdict(list)
    for label in labels:
        by_annotator[label.annotator].append(label)
        if label.choice != "skip":
            votes_by_pair[label.item_index].append(label)
    for label in checks:
        checks_by_annotator[label.annotator].append(label)
    with_majority = majority_agreement({i: {v.annotator: v.choice for v in votes} for i, votes in votes_by_pair.items()})

    people = []
    for name in names:
        mine, answered = by_annotator.get(name, []), checks_by_annotator.get(name, [])
        check_votes = [label for label in answered if label.choice != "skip"]
        accuracy, n_checks = check_accuracy([v.choice for v in check_votes], [v.check_answer for v in check_votes])
        agreement, n_agree = with_majority.get(name, (math.nan, 0))
        everything = sorted(mine + answered, key=lambda label: label.id)
        shown = [to_shown(v.choice, flipped=v.flipped) for v in everything] if mode == MODE_PAIRS else []
        left_share, left_votes = position_bias(shown)
        people.append(
            AnnotatorStatus(
                name=name,
                votes=sum(label.choice != "skip" for label in mine),
                skips=sum(label.choice == "skip" for label in mine),
                last_hour=sum(label.created > now - 3600 for label in mine),
                seconds_per_label=_seconds_per_label(everything),
                check_accuracy=accuracy,
                checks=n_checks,
                majority_agreement=agreement,
                majority_items=n_agree,
                left_share=left_share,
                left_votes=left_votes,
            )
        )

    full = [votes[:overlap] for votes in votes_by_pair.values() if overlap >= 2 and len(votes) >= overlap]
    fleiss = fleiss_kappa(category_counts([[v.choice for v in votes] for votes in full], categories)) if full else math.nan

    cohen = []
    choice_of = {(label.annotator, label.item_index): label.choice for label in labels if label.choice != "skip"}
    for first, second in combinations(names, 2):
        shared = sorted({i for (n, i) in choice_of if n == first} & {i for (n, i) in choice_of if n == second})
        if shared:
            kappa = cohen_kappa([choice_of[first, i] for i in shared], [choice_of[second, i] for i in shared])
            cohen.append((first, second, kappa, len(shared)))
    n_checks = len(store.checks()) if mode == MODE_PAIRS else 0
    return Status(pairs, complete, overlap, sum(p.votes for p in people), people, fleiss, len(full), cohen, n_checks)


def _seconds_per_label(labels: Sequence[StoredLabel]) -> float:
    """Median seconds from shown to labelled; without shown times (older labels), the median gap between labels."""
    timed = [label.created - label.shown_at for label in labels if label.shown_at is not None]
    if timed:
        return statistics.median(timed)
    gaps = [b.created - a.created for a, b in zip(labels, labels[1:]) if b.created - a.created <= SESSION_GAP_SECONDS]
    return statistics.median(gaps) if gaps else math.nan


def _share(x: float, n: int) -> str:
    """``"75% (4)"``: a share with its count, or ``"n/a"``."""
    return "n/a" if math.isnan(x) else f"{x:.0%} ({n})"


def format_status(s: Status) -> str:
    def num(x: float, spec: str = ".3f") -> str:
        return "n/a" if math.isnan(x) else format(x, spec)

    checks = f"; {s.check_questions} check question(s), not exported" if s.check_questions else ""
    lines = [f"pairs: {s.complete}/{s.pairs} complete ({s.overlap} vote(s) each); {s.votes} votes in all{checks}"]
    lines.append(
        f"{'annotator':<20} {'votes':>6} {'skips':>6} {'last hour':>10} {'s/label':>8} "
        f"{'checks right':>13} {'with majority':>14} {'left (bias)':>12}"
    )
    for a in s.annotators:
        lines.append(
            f"{a.name:<20} {a.votes:>6} {a.skips:>6} {a.last_hour:>10} {num(a.seconds_per_label, '.1f'):>8} "
            f"{_share(a.check_accuracy, a.checks):>13} {_share(a.majority_agreement, a.majority_items):>14} "
            f"{_share(a.left_share, a.left_votes):>12}"
        )
    lines.append(f"Fleiss' kappa: {num(s.fleiss)} over {s.fleiss_pairs} pair(s) with {s.overlap} votes")
    for first, second, kappa, shared in s.cohen:
        lines.append(f"Cohen's kappa {first} / {second}: {num(kappa)} over {shared} shared pair(s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the pipeline's label stage


def item_list(indices: Sequence[int], limit: int = 20) -> str:
    """``item 3`` / ``items 0, 1, 2`` (the first ``limit``, then how many more)."""
    shown = ", ".join(str(i) for i in indices[:limit])
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return f"item{'s' if len(indices) > 1 else ''} {shown}{more}"


def wait_for_labels(store: AnnotationStore, *, timeout: float, poll_seconds: float = 5.0, progress: bool = True) -> Settlement:
    """Block until every pair is settled (:meth:`AnnotationStore.settlement`) and return where it stands.

    A pair is settled with its ``overlap`` votes, or once every registered annotator
    has voted on or skipped it. ``timeout`` > 0 raises TimeoutError after that many
    seconds, naming the pairs still waiting (0 waits forever).
    """
    from tqdm.auto import tqdm

    state = store.settlement()
    deadline = time.monotonic() + timeout if timeout > 0 else math.inf
    bar = tqdm(
        total=state.pairs, initial=state.pairs - len(state.waiting), unit="pair", desc="label (human-web)", disable=not progress
    )
    try:
        while state.waiting:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{state.complete}/{state.pairs} pairs have their {store.overlap} vote(s) after {timeout:g} s; "
                    f"{len(state.waiting)} pair(s) still wait for an annotator who has not voted on or skipped them: "
                    f"{item_list(state.waiting)}. The labels so far are kept in {store.path}; run the stage again to "
                    "keep waiting, or register more annotators"
                )
            time.sleep(poll_seconds)
            state = store.settlement()
            bar.total = state.pairs
            bar.update(state.pairs - len(state.waiting) - bar.n)
    finally:
        bar.close()
    return state


# ----------------------------------------------------------------------------- the lead's page


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def lead_overview(store: AnnotationStore, *, now: float | None = None) -> dict:
    """What the lead's page (``/lead``) shows, as JSON-ready data.

    * ``progress``: items, complete (``overlap`` votes or settled by the lead), waiting, stuck, settled_by_lead;
    * ``annotators``: each one's state, votes, skips, labels in the last hour, median seconds per label, and
      the quality numbers of :class:`AnnotatorStatus`: ``check_accuracy`` / ``checks``, ``majority_agreement`` /
      ``majority_items`` and ``left_share`` / ``left_votes`` (position bias); None where there is nothing to count;
    * ``agreement``: Fleiss' kappa (pairs with ``overlap`` >= 2 votes), Cohen's kappa per two annotators,
      and ``by_day``: for each UTC day, the items whose second vote came that day and the share of them whose
      votes all agree (inter-annotator agreement over time);
    * ``stuck``: items short of votes that every active annotator has voted on or skipped (nobody is left to
      ask), with their votes and each skip's annotator and reason; ``split``: items whose votes tie at the top
      (a split pair, or as many ups as downs). Neither lists an item the lead settled. Each entry carries the
      prompt and the response(s) in canonical order (``a`` = ``responses[0]``), so the lead judges the same text,
      and ``votes_wanted``, the votes it needs (``overlap``, or more after :meth:`AnnotationStore.ask_one_more`).
      A split pair the lead asked one more vote for stays listed until the votes decide it.
    """
    now = time.time() if now is None else now
    mode, overlap = store.mode, store.overlap
    summary = store_status(store, now=now)
    settlement = store.settlement()
    decisions = store.decisions()
    states = store.annotator_states()
    by_item: dict[int, list[StoredLabel]] = defaultdict(list)
    for label in store.labels():
        by_item[label.item_index].append(label)
    categories = MODE_VOTES[mode]
    wanted = store.votes_wanted()

    def entry(item_index: int, prompt, responses: list[str]) -> dict:
        labels = by_item.get(item_index, [])
        votes = [label for label in labels if label.choice != "skip"]
        return {
            "item_index": item_index,
            "votes_wanted": wanted.get(item_index, overlap),
            "prompt": prompt,
            "responses": responses,
            "votes": {c: sum(v.choice == c for v in votes) for c in categories},
            "voters": [{"annotator": v.annotator, "choice": v.choice, "reason": v.reason} for v in votes],
            "skips": [{"annotator": v.annotator, "reason": v.reason} for v in labels if v.choice == "skip"],
        }

    texts = {p.item_index: (p.prompt, list(p.responses[:1] if mode == MODE_THUMBS else p.responses)) for p in store.pairs()}
    stuck = [entry(i, *texts[i]) for i in settlement.exhausted]
    split = []
    by_day: dict[str, list[bool]] = defaultdict(list)
    for index, labels in sorted(by_item.items()):
        votes = [label for label in labels if label.choice != "skip"]
        if len(votes) >= 2:
            day = time.strftime("%Y-%m-%d", time.gmtime(votes[1].created))
            by_day[day].append(len({v.choice for v in votes}) == 1)
            if index not in decisions and majority([v.choice for v in votes], categories) == "split":
                split.append(entry(index, *texts[index]))
    return {
        "mode": mode,
        "overlap": overlap,
        "choices": list(categories),
        "progress": {
            "items": settlement.pairs,
            "complete": settlement.complete,
            "waiting": len(settlement.waiting),
            "stuck": len(settlement.exhausted),
            "settled_by_lead": len(settlement.by_lead),
            "check_questions": summary.check_questions,
            "votes": summary.votes,
            "last_hour": sum(a.last_hour for a in summary.annotators),
        },
        "annotators": [
            {
                "name": a.name,
                "state": states.get(a.name, "active"),
                "votes": a.votes,
                "skips": a.skips,
                "last_hour": a.last_hour,
                "seconds_per_label": _finite(a.seconds_per_label),
                "check_accuracy": _finite(a.check_accuracy),
                "checks": a.checks,
                "majority_agreement": _finite(a.majority_agreement),
                "majority_items": a.majority_items,
                "left_share": _finite(a.left_share),
                "left_votes": a.left_votes,
            }
            for a in summary.annotators
        ],
        "agreement": {
            "fleiss": _finite(summary.fleiss),
            "fleiss_items": summary.fleiss_pairs,
            "cohen": [{"pair": [a, b], "kappa": _finite(k), "shared": n} for a, b, k, n in summary.cohen],
            "by_day": [{"day": d, "items": len(v), "agree": sum(v) / len(v)} for d, v in sorted(by_day.items())],
        },
        "stuck": stuck,
        "split": split,
    }
