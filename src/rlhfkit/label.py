"""Labelling samples: ``rlhfkit label CONFIG.yaml`` / :func:`run`.

One interface, four feedback sources, one output record
(:class:`~rlhfkit.data.records.Comparison`, saved in rlhfkit's JSONL form):

* ``simulated`` — a score function turned into Bradley-Terry choices
  (:class:`rlhfkit.feedback.simulated.SimulatedAnnotator`); the stand-in for humans.
  Its temperature is in the scorer's units, or with ``temperature_scale: spread`` in
  units of the scores' standard deviation over the samples file;
* ``judge`` — an AI judge (RLAIF), a local model or any OpenAI-compatible endpoint,
  each pair judged in both orders (:class:`rlhfkit.feedback.judge.AIJudge`);
* ``human`` — a person at the terminal (:func:`rlhfkit.feedback.terminal.annotate`);
* ``human-web`` — a team in the browser (:func:`_label_from_web`, on :mod:`rlhfkit.feedback.web.admin`):
  the pairs go into ``web_db``, the stage waits until each has ``overlap`` votes
  (or every annotator has voted on or skipped it), then writes the majority labels.

Input is the output of ``rlhfkit sample`` (records with ``prompt`` and
``responses``). Labelling is resumable: items already in the output (by
``meta.item_index``) are skipped, and the output is rewritten atomically every
``save_seconds`` (:class:`~rlhfkit.data.io.ThrottledSave`: never more than about a
fifth of the time, so labelling stays linear in the number of labels), at the end,
and when labelling fails part way, so an error loses no label and a kill at
most those since the last save. A re-run only adds to labels
made under the same labeller settings (``resume``; recorded beside the output in
``labels.jsonl.meta.json``, see :func:`labeller_settings`) of the same items (each
label's prompt and responses must be those of the item at its ``item_index``);
otherwise the stage stops with an error naming the changed keys. The simulated
annotator draws each item's randomness from the seed and the item's index alone,
so a resumed run gives exactly the labels of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data.io import (
    RESUME_MODES,
    ThrottledSave,
    atomic_temp_pattern,
    compare_settings,
    remove_stale_temps,
    settings_path,
    short_repr,
    start_over,
    write_settings,
)
from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.data.samples import load_items
from rlhfkit.feedback.scorers import load_scorer
from rlhfkit.feedback.simulated import SimulatedAnnotator, score_spread
from rlhfkit.feedback.terminal import annotate
from rlhfkit.feedback.web.admin import comparisons, item_list, wait_for_labels
from rlhfkit.feedback.web.pairs import read_checks, read_pairs
from rlhfkit.feedback.web.store import AnnotationStore


@dataclass
class LabelConfig:
    """Config of the labelling stage."""

    samples: str = "runs/samples.jsonl"
    """Samples to label: JSONL records with `prompt` and `responses` (from `rlhfkit sample`)."""
    output: str = "runs/labels.jsonl"
    """Where the labels go (rlhfkit comparison JSONL)."""
    source: Literal["simulated", "judge", "human", "human-web"] = "simulated"
    """Feedback source."""
    scorer: str = "demo"
    """Simulated: score function (`sentiment`, `length`, `banned`, `rubric`/`demo`, or `module:function`)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Simulated: keyword arguments for the scorer, e.g. `{target_words: 20}` for `length`; each must be
    a named parameter of the function."""
    temperature: float = 1.0
    """Simulated: Bradley-Terry temperature (0: always the higher score)."""
    flip_rate: float = 0.0
    """Simulated: probability of flipping each choice (label noise)."""
    tie_threshold: float = 0.0
    """Simulated: score differences at or below this are ties."""
    temperature_scale: Literal["absolute", "spread"] = "absolute"
    """Simulated: units of `temperature` and `tie_threshold`. `absolute`: the scorer's own units (tuned to
    the demo rubric). `spread`: multiples of the score spread -- the population standard deviation of the
    scorer's scores on every response of every item in `samples`, scored once before labelling -- so the
    labels do not depend on the scorer's scale (the same scorer x100 gives the same labels). A spread of 0
    (every score equal) counts as 1."""
    judge_model: str = ""
    """Judge: a local model spec (used when `judge_url` is empty)."""
    judge_url: str = ""
    """Judge: base URL of an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."""
    judge_name: str = "default"
    """Judge: the `model` field sent to the endpoint."""
    judge_api_key_env: str = ""
    """Judge: name of the environment variable holding the endpoint's API key (e.g. `OPENAI_API_KEY`), sent as
    `Authorization: Bearer`. Empty: no key is sent. A key never goes over plain http:// to a host other than
    127.0.0.1, ::1 or localhost (an error instead)."""
    judge_max_tokens: int = 16
    """Judge: completion budget per judgement; raise it for judges that reason before answering (a verdict
    cut off by the budget is unparseable and becomes a tie)."""
    judge_temperature: float = 0.0
    """Judge: sampling temperature of the judge (0: deterministic)."""
    judge_timeout: float = 60.0
    """Judge (HTTP): seconds per socket operation of a request attempt. A whole request, retries included, gives
    up after judge_timeout x (judge_retries + 1) plus the backoff waits between attempts."""
    judge_retries: int = 4
    """Judge (HTTP): retries after the first attempt, on connection errors, timeouts, truncated replies, HTTP 429
    and 5xx, with exponential backoff."""
    rubric: str = ""
    """Judge: rubric or constitution text (empty: the built-in polite/positive/concise rubric)."""
    concurrency: int = 4
    """Judge: HTTP requests in flight."""
    annotator: str = "human"
    """Human: annotator name recorded in each label."""
    web_db: str = "runs/annotations.sqlite"
    """Human-web: the annotation database. The pipeline refuses a path inside its label directory, which a rerun
    clears."""
    overlap: int | None = None
    """Human-web: votes wanted per pair, from different annotators. None: keep web_db's value (1 for a new db),
    e.g. the one `rlhfkit annotate serve --overlap` stored."""
    web_serve: bool = True
    """Human-web: serve the app from this process while waiting (false: a separate `rlhfkit annotate serve` uses web_db)."""
    web_host: str = "127.0.0.1"
    """Human-web: interface the app binds to."""
    web_port: int = 8765
    """Human-web: port of the app (0: a free one, printed)."""
    web_guidelines: str = ""
    """Human-web: a markdown file of labelling guidelines, shown above every pair (as `rlhfkit annotate serve
    --guidelines`); a missing or unreadable file stops the stage before web_db is touched. Needs web_serve: true (a
    separate server takes its own --guidelines). Empty: none."""
    web_criteria: list[str] = field(default_factory=list)
    """Human-web: what to judge by, shown above the pair (as `serve --criterion`), e.g. `[helpful, harmless]`. Needs
    web_serve: true."""
    web_checks: str = ""
    """Human-web: check questions to add to web_db (as `serve --checks`: pairs with `"expected": "a" | "b"`), mixed
    into each annotator's queue, scored on the lead's page, never in `output`. Empty: add none (checks already in
    web_db are still shown)."""
    web_check_rate: float | None = None
    """Human-web: share of each annotator's assignments that are check questions, 0 to 1 (as `serve --check-rate`).
    None: keep web_db's value (0.1 for a new db)."""
    wait_timeout: float = 3600.0
    """Human-web: give up after this many seconds: the stage fails naming the pairs still waiting, and the labels
    stay in web_db (run the stage again to keep waiting); 0 waits forever."""
    poll_seconds: float = 5.0
    """Human-web: how often to check whether every pair is settled: it has its `overlap` votes, or every
    registered annotator has voted on or skipped it."""
    chunk_size: int = 64
    """Items labelled by one call of the labeller (a judge's concurrency works within a chunk)."""
    save_seconds: float = 10.0
    """Rewrite `output` (atomically, every label so far) at most this often, and at the end; also after a failure
    part way. Never more than a fifth of the time goes to rewriting, however many labels there are. 0: after every
    chunk."""
    seed: int = 0
    """Seed of the simulated annotator (with an item's index, it alone sets that item's random draws)."""
    resume: Literal["auto", "force", "never"] = "auto"
    """Simulated and judge: what to do with labels already in `output`. `auto`: keep them and label only the items
    missing, refused (an error naming the changed keys) if they were made under other labeller settings (source;
    simulated: scorer, scorer_args, temperature, flip_rate, tie_threshold, temperature_scale, seed; judge:
    judge_model or judge_url, judge_name, rubric, judge_max_tokens, judge_temperature; recorded in `output` +
    `.meta.json`), or if a label's prompt and responses are not those of the item at its item_index in `samples`;
    the other keys (chunk_size, concurrency, judge_timeout...) may change. `force`: keep them even so, printing
    what differs. `never`: delete `output` and its settings file, and start over. (human and human-web resume from
    their own records: the terminal's labels file, web_db.)"""


LABELLER_KEYS: dict[str, tuple[str, ...]] = {
    "simulated": ("scorer", "scorer_args", "temperature", "flip_rate", "tie_threshold", "temperature_scale", "seed"),
    "judge": ("judge_model", "judge_url", "judge_name", "rubric", "judge_max_tokens", "judge_temperature"),
}
"""The keys of each source that change its labels: recorded beside the output, and compared on a re-run."""


def labeller_settings(config: LabelConfig) -> dict[str, object]:
    """What the labels of ``config.output`` depend on, besides their items (:attr:`LabelConfig.resume`). A judge
    with a ``judge_url`` ignores ``judge_model``, and a local one ``judge_url``: only the one in use is recorded."""
    keys = list(LABELLER_KEYS.get(config.source, ()))
    if config.source == "judge":
        keys.remove("judge_model" if config.judge_url else "judge_url")
    settings: dict[str, object] = {"source": config.source, **{key: getattr(config, key) for key in keys}}
    if config.source == "simulated":  # labels written before the annotator recorded a ranking's ties lack this
        settings["ranking_ties"] = "recorded"
    return settings


def _expected_source(config: LabelConfig) -> str:
    """``Comparison.source`` of the labels ``config`` makes."""
    return f"simulated:{_scorer_name(config)}" if config.source == "simulated" else f"judge:{config.judge_name}"


def _prompt_key(prompt: object) -> object:
    """A prompt as compared between a label and its item: a chat by its roles and contents only."""
    if isinstance(prompt, list):
        return [(m.get("role"), m.get("content")) if isinstance(m, dict) else m for m in prompt]
    return prompt


def _refuse_or_keep(config: LabelConfig, changes: dict[str, str], count: int) -> None:
    """Raise a ConfigError listing ``changes`` (``resume=auto``), or print them (``force``)."""
    if not changes:
        return
    output = Path(config.output)
    listing = "; ".join(f"{key}: {change}" for key, change in changes.items())
    if config.resume == "force":
        log.warning(f"label: resume=force: keeping the {count} labels in {output} though they differ ({listing})")
        return
    raise ConfigError(
        f"label: cannot resume {output}: its {count} labels were made under other settings ({listing}); "
        f"set resume=never to delete it (and {settings_path(output)}) and start over, write to another output, "
        "or set resume=force to keep its labels anyway"
    )


def _check_resume(config: LabelConfig, labels: list[Comparison], items: list) -> bool:
    """Check that ``labels`` (already in the output) were made by this config's labeller from ``items``: a
    ConfigError naming every difference, or under ``resume=force`` a printed note. Returns whether they match."""
    if not labels:
        return True
    output = Path(config.output)
    saved, changes = compare_settings(output, labeller_settings(config))
    wrong_item, wrong_source = [], []
    source = _expected_source(config)
    for label in labels:
        index = label.meta.get("item_index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(items):
            wrong_item.append((label, f"item_index {index!r} is not an item of the {len(items)} in {config.samples}"))
        else:
            prompt, responses = items[index]
            if _prompt_key(label.prompt) != _prompt_key(prompt) or list(label.responses) != list(responses):
                wrong_item.append(
                    (
                        label,
                        f"item_index {index} labels {short_repr(label.responses)} for "
                        f"{short_repr(label.prompt)}, {config.samples} has {short_repr(responses)} for "
                        f"{short_repr(prompt)}",
                    )
                )
        if label.source != source:
            wrong_source.append(label)
    if wrong_item:
        changes["samples"] = (
            f"{len(wrong_item)} of {len(labels)} labels are not of the item at their item_index (first: {wrong_item[0][1]})"
        )
    if wrong_source and not changes:
        changes["source"] = (
            f"{len(wrong_source)} of {len(labels)} labels are by {wrong_source[0].source!r}, this config labels as {source!r}"
        )
    _refuse_or_keep(config, changes, len(labels))
    if saved is None and not changes:
        log.info(
            f"label: warning: {output} has no settings file {settings_path(output)} (written by an older rlhfkit): "
            f"its labels are of the items of {config.samples} and by {source!r}, but the other labeller settings "
            "could not be checked"
        )
    return not changes


def _check_temperature(config: LabelConfig, labels: list[Comparison], temperature: float) -> None:
    """Simulated: the temperature the labels were made at (in the scorer's units) is the one this run uses; with
    ``temperature_scale: spread`` it moves with the samples' score spread, which new items in ``samples`` change."""
    used = [c.meta.get("temperature") for c in labels]
    wrong = [t for t in used if not isinstance(t, (int, float)) or not math.isclose(t, temperature, rel_tol=1e-12)]
    if wrong:
        _refuse_or_keep(
            config,
            {
                "temperature": f"{len(wrong)} of {len(labels)} labels were made at temperature "
                f"{wrong[0]!r} (in the scorer's units), this run uses {temperature!r}"
            },
            len(labels),
        )


def _scorer_name(config: LabelConfig) -> str:
    """The scorer as recorded in each label's source: ``length`` or, with arguments, ``length(target_words=20)``.

    An argument is written as its repr, bounded (reprlib) when it is large: a value of aliased YAML
    (a billion-laughs bomb) must not be expanded. Small values keep their plain repr, as earlier labels
    recorded them (resuming compares the names)."""
    import itertools
    import reprlib

    def small(value: object, budget: int = 1000) -> bool:  # at most `budget` values, no long string
        stack, seen = [value], 0
        while stack:
            item = stack.pop()
            seen += 1
            if seen > budget or isinstance(item, (str, bytes)) and len(item) > 10_000:
                return False
            if isinstance(item, dict):
                stack.extend(itertools.islice(itertools.chain.from_iterable(item.items()), 2 * budget))
            elif isinstance(item, (list, tuple, set, frozenset)):
                stack.extend(itertools.islice(item, budget))
        return True

    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother = 3, 200, 200
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = bounded.maxfrozenset = 8
    name = config.scorer.replace(":", ".")
    if config.scorer_args:
        name += (
            "("
            + ", ".join(
                f"{k}={repr(v) if small(v) else bounded.repr(v)}"
                for k, v in sorted(config.scorer_args.items(), key=lambda kv: str(kv[0]))
            )
            + ")"
        )
    return name


def _simulated_scale(config: LabelConfig, scorer, items: list) -> float:
    """What `temperature` and `tie_threshold` are multiplied by: 1, or the score spread of ``items``."""
    if config.temperature_scale not in ("absolute", "spread"):
        raise ConfigError(f"label: temperature_scale must be 'absolute' or 'spread', got {config.temperature_scale!r}")
    if config.temperature_scale == "absolute" or not items:
        return 1.0
    spread = score_spread(scorer, items)
    if spread == 0.0:
        count = sum(len(responses) for _, responses in items)
        log.warning(f"label: score spread is 0 (all {count} scores of {config.scorer} are equal); using 1.0 instead")
        spread = 1.0
    line = f"label: score spread {spread:.3g} -> temperature {config.temperature * spread:.3g}"
    if config.tie_threshold:
        line += f", tie threshold {config.tie_threshold * spread:.3g}"
    log.info(line)
    return spread


def _labeller(config: LabelConfig, items: list | None = None):
    """The labeller of ``config.source``. ``items``: what sets the score spread when
    ``temperature_scale`` is ``spread`` (every item of the samples file, so a resumed run
    uses the same temperature; None or empty: no scoring, the temperature as given)."""
    if config.source == "simulated":
        scorer = load_scorer(config.scorer, config.scorer_args)
        scale = _simulated_scale(config, scorer, items or [])
        return SimulatedAnnotator(
            scorer,
            temperature=config.temperature * scale,
            flip_rate=config.flip_rate,
            seed=config.seed,
            tie_threshold=config.tie_threshold * scale,
            name=_scorer_name(config),
        )
    if config.source == "judge":
        from rlhfkit.feedback.judge import DEFAULT_RUBRIC, AIJudge, HTTPChatClient, LocalChatClient  # optional: pydantic

        if config.judge_url:
            api_key = os.environ.get(config.judge_api_key_env) if config.judge_api_key_env else None
            if config.judge_api_key_env and not api_key:
                raise ConfigError(f"label: judge_api_key_env names ${config.judge_api_key_env}, which is not set")
            client = HTTPChatClient(
                config.judge_url,
                model=config.judge_name,
                api_key=api_key,
                timeout=config.judge_timeout,
                max_retries=config.judge_retries,
            )
            concurrency = config.concurrency
        elif config.judge_model:
            client, concurrency = LocalChatClient(config.judge_model), 1
        else:
            raise ConfigError("label: source=judge needs judge_url or judge_model")
        return AIJudge(
            client,
            rubric=config.rubric or DEFAULT_RUBRIC,
            concurrency=concurrency,
            name=config.judge_name,
            max_tokens=config.judge_max_tokens,
            temperature=config.judge_temperature,
        )
    raise ConfigError(f"label: unknown source '{config.source}'")


def run(config: LabelConfig) -> list[Comparison]:
    """Label every item of ``config.samples``; returns all labels in the output."""
    items = load_items(config.samples)
    output = Path(config.output)
    if config.source == "human":
        return annotate(items, output, annotator=config.annotator)
    if config.source == "human-web":
        return _label_from_web(config)

    if config.resume not in RESUME_MODES:
        raise ConfigError(f"label: resume must be one of {', '.join(RESUME_MODES)}, got {config.resume!r}")
    if config.chunk_size < 1:
        raise ConfigError(f"label: chunk_size must be at least 1, got {config.chunk_size}")
    if not config.save_seconds >= 0:
        raise ConfigError(f"label: save_seconds must be at least 0, got {config.save_seconds}")
    # Temp files of an atomic rewrite of the labels or their settings that a kill left (one writer per output).
    remove_stale_temps(output.parent, atomic_temp_pattern(output))
    if config.resume == "never":
        start_over(output, "label")
    labels = load_comparisons(output) if output.exists() else []
    matching = _check_resume(config, labels, items)
    done = {c.meta.get("item_index") for c in labels}
    todo = [i for i in range(len(items)) if i not in done]
    # The spread is measured on every item (not just those left), so a resumed run labels with the
    # same temperature; with nothing left to label there is nothing to measure.
    labeller = _labeller(config, items if todo else None)
    if todo and config.source == "simulated" and labels and matching:
        _check_temperature(config, labels, labeller.temperature)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="pair", desc=f"label ({config.source})")
    saver = ThrottledSave(lambda: save_comparisons(output, labels), config.save_seconds)
    try:
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start : start + config.chunk_size]
            # The simulated annotator draws each item's randomness from (seed, item index): resuming changes nothing.
            by_index = {"indices": chunk} if config.source == "simulated" else {}
            new = labeller.label_many([items[i] for i in chunk], **by_index)
            for index, comparison in zip(chunk, new):
                comparison.meta["item_index"] = index
            labels.extend(new)
            if start == 0:  # before the first new label (not before a failed one): what every label now matches
                write_settings(output, labeller_settings(config))
            saver.changed()
            bar.update(len(chunk))
    finally:  # the labels made before a failure (or Ctrl-C) are kept
        saver.flush()
        bar.close()
    ties = sum(c.tie + len(c.ties) for c in labels)
    log.info(f"label: {len(labels)} labels in {output} ({ties} tied pairs)")
    return labels


def _label_from_web(config: LabelConfig) -> list[Comparison]:
    """``source: human-web``: collect labels with the web app, then write them as the stage's output.

    Loads ``config.samples`` into ``config.web_db`` (pairs already there are kept) with the check questions of
    ``config.web_checks``, stores ``config.overlap`` and ``config.web_check_rate`` unless None (then the
    database keeps its own), optionally serves the app in this process (``config.web_serve``, with the
    guidelines and criteria), waits until
    every pair is settled (:func:`wait_for_labels`), and saves the majority labels
    to ``config.output`` in rlhfkit's comparison JSONL (answers to check questions are not labels: they stay in
    the database for the lead's page and ``rlhfkit annotate status``). A pair that every annotator
    skipped has no label; the summary printed at the end names such pairs.
    """
    from rlhfkit.feedback.web.app import create_app, read_guidelines  # optional: pydantic (and fastapi for the app)
    from rlhfkit.serve import ServerThread  # optional: pydantic

    if (config.web_guidelines or config.web_criteria) and not config.web_serve:
        raise ConfigError(
            "label: web_guidelines and web_criteria are shown by the app this stage serves; with web_serve: false "
            "give them to `rlhfkit annotate serve` (--guidelines, --criterion) instead"
        )
    # Every file is read before the db is opened: a bad one changes nothing.
    items, empty = read_pairs(config.samples)
    checks = read_checks(config.web_checks) if config.web_checks else []
    guidelines = read_guidelines(config.web_guidelines) if config.web_guidelines else ""
    store = AnnotationStore(config.web_db)
    try:
        store.configure(overlap=config.overlap, check_rate=config.web_check_rate)
        overlap = store.overlap
        added = store.add_pairs(items)
        new_checks = store.add_checks(checks) if checks else 0
        note = f" ({empty} with an empty response left out)" if empty else ""
        log.info(f"label: {len(items)} pairs in {config.web_db}, {added} new{note}; {overlap} vote(s) each")
        if checks:
            log.info(
                f"label: {len(checks)} check question(s) from {config.web_checks} ({new_checks} new), "
                f"{store.check_rate:.0%} of each annotator's assignments; not in {config.output}"
            )
        server = None
        if config.web_serve:
            app = create_app(store, guidelines=guidelines, criteria=config.web_criteria)
            server = ServerThread(app, config.web_host, config.web_port).start()
            print(
                f"label: annotation app on http://{config.web_host}:{server.port}/ ; give each annotator a link with "
                f"`rlhfkit annotate add-annotator NAME --db {config.web_db}`",
                file=sys.stderr,
                flush=True,
            )
        try:
            settled = wait_for_labels(store, timeout=config.wait_timeout, poll_seconds=config.poll_seconds)
        finally:
            if server is not None:
                server.stop()
        labels = comparisons(store)
    finally:
        store.close()
    save_comparisons(config.output, labels)
    log.info(f"label: {len(labels)} labels in {config.output} ({sum(c.tie for c in labels)} ties or splits)")
    labelled = {c.meta["item_index"] for c in labels}
    unlabelled = [i for i in settled.exhausted if i not in labelled]
    fewer = [i for i in settled.exhausted if i in labelled]
    if unlabelled:
        log.info(f"label: {len(unlabelled)} pair(s) skipped by every annotator, left unlabelled: {item_list(unlabelled)}")
    if fewer:
        log.info(
            f"label: {len(fewer)} pair(s) with fewer than {overlap} vote(s), the other annotators skipped them: {item_list(fewer)}"
        )
    return labels
