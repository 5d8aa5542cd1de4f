"""Elo / Bradley-Terry ratings of models from labelled comparisons: ``rlhfkit elo CONFIG.yaml`` / :func:`run`.

The ratings themselves (the Bradley-Terry fit, its prior, the bootstrap table, classic online Elo) are
:mod:`rlhfkit.ratings`; their names still import from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data.io import DataError, atomic_write_text
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.ratings import BASE_RATING as BASE_RATING
from rlhfkit.ratings import Match, collect_matches, format_table, rating_table
from rlhfkit.ratings import bradley_terry_ratings as bradley_terry_ratings
from rlhfkit.ratings import matches_from_comparisons as matches_from_comparisons
from rlhfkit.ratings import online_elo as online_elo


@dataclass
class EloConfig:
    """Config of the ratings stage (``rlhfkit elo CONFIG.yaml [key=value ...]``)."""

    data: list[str] = field(default_factory=list)
    """Comparison files (JSON/JSONL/Parquet, any preference format) whose records name their players in `meta.players`; `data=a.jsonl,b.jsonl` on the command line."""
    bootstrap: int = 1000
    """Bootstrap resamples of the matches for the 95% intervals (0: no intervals)."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    anchor: str = ""
    """Player pinned at rating 1000; empty: the mean rating is 1000."""
    prior: float = 1.0
    """Virtual tied games per player against a fixed reference, so undefeated players stay finite (0: plain MLE, needs bootstrap=0)."""
    output: str = ""
    """JSON file for the table (a list of rows, written atomically); empty: only print it."""


def run(config: EloConfig) -> list[dict[str, Any]]:
    """Rate the players of ``config.data``'s comparisons; print the table, optionally write it as JSON."""
    if not config.data:
        raise ConfigError("key 'data': no comparison files given")
    matches: list[Match] = []
    records = skipped = same_player = 0
    for path in config.data:
        comparisons = load_comparisons(path)
        try:
            found, file_skipped, file_same = collect_matches(comparisons, first_number=1, label="record")
        except ValueError as e:
            raise DataError(path, None, "meta.players", str(e)) from None
        matches += found
        records, skipped, same_player = records + len(comparisons), skipped + file_skipped, same_player + file_same
    if not matches:
        raise DataError(
            ", ".join(config.data),
            None,
            "meta.players",
            f"no matches between players in {records} records ({skipped} without meta.players, "
            f"{same_player} same-player pairs); each record needs meta.players, one name per response",
        )
    try:
        rows = rating_table(
            matches, bootstrap=config.bootstrap, seed=config.seed, anchor=config.anchor or None, prior=config.prior
        )
    except ValueError as e:  # the matches are valid by now: what is left is anchor, prior or bootstrap
        raise ConfigError(str(e)) from None
    log.info(
        f"elo: {len(matches)} matches between {len(rows)} players from {records} records "
        f"({skipped} without meta.players skipped, {same_player} same-player pairs dropped)"
    )
    log.info(format_table(rows))
    if config.output:
        atomic_write_text(config.output, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        log.info(f"elo: table -> {config.output}")
    return rows
