"""The SQLite store behind the web annotation app: pairs, annotators, leases and labels.

The database file is the single source of truth; the server keeps no state of
its own, so it can be killed at any moment and restarted on the same file.

* WAL journal with ``synchronous=FULL``: a label's transaction is on disk (the
  WAL fsynced) when :meth:`AnnotationStore.submit` returns, and the app answers
  only after that, so an acknowledged label survives a crash of the process or
  of the machine. Readers (``rlhfkit annotate status``/``export``, the pipeline
  waiting for labels) never block the server.
* Every write is one ``BEGIN IMMEDIATE`` transaction under a lock; a submit also
  leases the annotator's next pair in the same transaction (one fsync per label).
* :meth:`AnnotationStore.close` checkpoints the WAL into the ``.sqlite`` file
  (``wal_checkpoint(TRUNCATE)``): after a clean shutdown (Ctrl+C or SIGTERM) the
  ``.sqlite`` file alone holds everything, so a backup of just that file is complete.

Tables (``choice`` values are always in the **canonical** order of the pairs
file: ``a`` = its ``responses[0]`` / ``response_a``):

* ``pairs``: ``item_index`` (0-based record number in the pairs file), the prompt
  (JSON), ``response_a``, ``response_b`` and ``n_votes``, the number of labels
  other than skips, kept in step by submit and undo;
* ``annotators``: name and the SHA-256 of their token (the token itself is shown
  once, by :meth:`add_annotator`, and never stored);
* ``leases``: the pair an annotator is looking at, whether it is shown swapped
  (``flipped``: canonical B on the left) and when the lease expires;
* ``labels``: one row per (pair, annotator): ``a | b | tie | skip``, the order it
  was shown in, the reason, the time, the ``grade`` (how much better, for ``a`` /
  ``b``: one of :data:`rlhfkit.feedback.grades.STRENGTHS`, or NULL when the client
  sent only the choice) and ``both_bad`` (the annotator found both responses bad).

Thumbs mode (``settings.mode`` = ``thumbs``; a database holds one mode, ``pairs`` unless set):
each item is **one** response to a prompt, stored in ``pairs`` with the response in
``response_a`` and ``response_b`` empty; its labels are ``up | down | skip``, never
shown swapped, without grade or both_bad. Overlap, leases, skips and undo work as
for pairs.

The lead (``settings.lead_token_sha256``: one lead token, stored hashed like the
annotators' tokens) can pause, resume or revoke an annotator (``annotators.state``:
a paused annotator gets no pairs, a revoked one's token stops working; neither
counts as someone left to ask) and settle a pair (``settled``: the lead's choice is
the pair's final label; a settled pair is complete and is no longer handed out).

Schema versions (``settings.schema``): 1 had no ``grade`` / ``both_bad``; opening a
version-1 file adds the two columns (existing labels: ungraded, not both bad) and
marks it version 2, keeping every label. Version 3 adds the thumbs choices (the
``labels`` table is rebuilt with the wider CHECK, rows and ids kept),
``annotators.state`` (existing annotators: active) and the ``settled`` table.
Version 4 adds check questions (``pairs.check_answer``: the known better side, canonical ``a`` / ``b``;
NULL for an ordinary pair), the lead's "ask one more" (``pairs.votes_wanted``: votes this pair needs, when
the lead raised it above ``overlap``; NULL: ``overlap``) and when each pair was shown (``leases.shown``,
copied to ``labels.shown`` on submit; NULL for labels from before version 4). Existing rows: ordinary pairs,
no raised count, shown time unknown. A file of a newer version is refused.

Check questions (:meth:`add_checks`) are pairs with a known answer, stored in ``pairs`` with a negative
``item_index`` (check ``k`` of the checks file is ``-(k + 1)``), so they never collide with the pairs file's
records. :meth:`next_assignment` hands each annotator unseen checks in place of some of their pairs, about
``settings.check_rate`` of their assignments (:func:`checks_due`) at random places before their last pair,
shown swapped or not as usual, so it looks like any other pair. Every annotator may answer every check once.
To annotators a pair is known only by an opaque id (:meth:`AnnotationStore.public_id`: a keyed hash of the
annotator and the row id, the key kept in ``settings``), so a check's later row id does not show, and their
"left for you" count (:attr:`Progress.remaining`) includes the checks still due to them, so it drops by one
after a check as after a pair. Checks are not pairs to label: :meth:`pairs`, :meth:`labels`, the pairs'
progress, :meth:`settlement` and the export leave them out; :meth:`check_labels` reads their answers.

Assignment rules (:meth:`next_assignment`):

* a pair gets at most ``overlap`` votes from different annotators, counting
  unexpired leases as votes on the way; once a lease expires (a closed tab) the
  slot is free for someone else;
* an annotator never gets a pair they labelled or skipped (until they undo it);
* an annotator holds at most one lease; reopening the page shows the same pair
  in the same order, even after the lease expired if the slot is still free;
* a label that arrives late (the lease expired and the slot was given to someone
  else meanwhile) is still kept: human work is never thrown away, so a pair can
  end with more than ``overlap`` votes;
* a skip does not count as a vote; the pair goes to someone else.

A pair is **settled** (:meth:`settlement`, what the pipeline waits for) once it
has ``overlap`` votes, once the lead settled it, or once every active annotator
has voted on or skipped it: nobody is left to ask, so waiting longer cannot help
(the lead's page lists such pairs as stuck). A newly registered or resumed
annotator reopens such a pair.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.data.records import Prompt
from rlhfkit.feedback.grades import STRENGTHS, check_vote

CHOICES: tuple[str, ...] = ("a", "b", "tie", "skip")
"""What an annotator can answer on a pair; stored in canonical order (``a`` = the file's ``response_a``)."""
VOTES: tuple[str, ...] = ("a", "b", "tie")
"""The choices that count as a vote on a pair (everything but skip)."""
MODE_PAIRS = "pairs"
"""Compare two responses (the 7-point scale): the default mode."""
MODE_THUMBS = "thumbs"
"""Thumbs up / down on one response; exported as KTO records."""
MODES: tuple[str, ...] = (MODE_PAIRS, MODE_THUMBS)
THUMB_UP, THUMB_DOWN = "up", "down"
THUMB_VOTES: tuple[str, ...] = (THUMB_UP, THUMB_DOWN)
"""The votes of thumbs mode (``up``: desirable)."""
THUMB_CHOICES: tuple[str, ...] = (*THUMB_VOTES, "skip")
MODE_CHOICES = {MODE_PAIRS: CHOICES, MODE_THUMBS: THUMB_CHOICES}
MODE_VOTES = {MODE_PAIRS: VOTES, MODE_THUMBS: THUMB_VOTES}
ACTIVE, PAUSED, REVOKED = "active", "paused", "revoked"
ANNOTATOR_STATES: tuple[str, ...] = (ACTIVE, PAUSED, REVOKED)
"""``annotators.state``: paused gets no pairs (resumable), revoked has no working token."""

SCHEMA_VERSION = "4"
DEFAULT_CHECK_RATE = 0.1
"""Share of new assignments that are check questions, when the database has checks and no rate of its own."""
CHECK_ANSWERS: tuple[str, ...] = ("a", "b")
"""What a check question's known answer can be (canonical: ``a`` = the checks file's ``response_a``)."""
DEFAULT_OVERLAP = 1
DEFAULT_LEASE_SECONDS = 600.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    item_index INTEGER NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    n_votes INTEGER NOT NULL DEFAULT 0,
    check_answer TEXT CHECK (check_answer IS NULL OR check_answer IN ('a', 'b')),
    votes_wanted INTEGER
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused', 'revoked'))
);
CREATE TABLE IF NOT EXISTS leases (
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    flipped INTEGER NOT NULL,
    expires REAL NOT NULL,
    shown REAL,
    PRIMARY KEY (pair_id, annotator_id)
);
CREATE INDEX IF NOT EXISTS leases_by_annotator ON leases(annotator_id);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip', 'up', 'down')),
    flipped INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    grade TEXT CHECK (grade IS NULL OR (grade IN ('much_better', 'better', 'slightly_better') AND choice IN ('a', 'b'))),
    both_bad INTEGER NOT NULL DEFAULT 0 CHECK (both_bad IN (0, 1)),
    shown REAL,
    UNIQUE (pair_id, annotator_id)
);
CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels(annotator_id, id);
CREATE TABLE IF NOT EXISTS settled (
    pair_id INTEGER PRIMARY KEY REFERENCES pairs(id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'up', 'down')),
    reason TEXT NOT NULL,
    created REAL NOT NULL
);
"""
_ANNOTATOR_STATE_COLUMN = "state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused', 'revoked'))"

_MIGRATIONS = {
    # version -> the statements that take a file of that version to the next one
    "1": (
        "ALTER TABLE labels ADD COLUMN grade TEXT CHECK (grade IS NULL OR "
        "(grade IN ('much_better', 'better', 'slightly_better') AND choice IN ('a', 'b')))",
        "ALTER TABLE labels ADD COLUMN both_bad INTEGER NOT NULL DEFAULT 0 CHECK (both_bad IN (0, 1))",
    ),
    # SQLite cannot widen a CHECK in place: the labels table is rebuilt (same columns, rows and ids)
    # with the thumbs choices allowed. Nothing references labels, so dropping the old one is safe.
    "2": (
        # The version-3 labels table, frozen here: version 4 adds `shown` to it by its own migration.
        _SCHEMA.split("CREATE TABLE IF NOT EXISTS labels")[1]
        .split(";")[0]
        .replace("    shown REAL,\n", "")
        .join(["CREATE TABLE labels_v3", ""]),
        "INSERT INTO labels_v3 (id, pair_id, annotator_id, choice, flipped, reason, created, grade, both_bad) "
        "SELECT id, pair_id, annotator_id, choice, flipped, reason, created, grade, both_bad FROM labels",
        "DROP TABLE labels",
        "ALTER TABLE labels_v3 RENAME TO labels",
        "CREATE INDEX labels_by_annotator ON labels(annotator_id, id)",
        f"ALTER TABLE annotators ADD COLUMN {_ANNOTATOR_STATE_COLUMN}",
    ),
    "3": (
        "ALTER TABLE pairs ADD COLUMN check_answer TEXT CHECK (check_answer IS NULL OR check_answer IN ('a', 'b'))",
        "ALTER TABLE pairs ADD COLUMN votes_wanted INTEGER",
        "ALTER TABLE leases ADD COLUMN shown REAL",
        "ALTER TABLE labels ADD COLUMN shown REAL",
    ),
}
assert set(STRENGTHS) == {"much_better", "better", "slightly_better"}  # the CHECK constraints above spell them out


_WANTED = "MAX(:k, COALESCE(p.votes_wanted, 0))"
"""The votes pair ``p`` needs: ``overlap`` (``:k``), or more where the lead asked for more."""
_COMPLETE_SQL = f"""SELECT COUNT(*), COALESCE(SUM(p.n_votes >= {_WANTED} OR EXISTS (SELECT 1 FROM settled d WHERE d.pair_id = p.id)), 0)
                   FROM pairs p WHERE p.check_answer IS NULL"""
"""``(items, complete)``: complete = the votes it needs, or settled by the lead; check questions left out."""

_LABEL_SELECT = """SELECT l.id, l.pair_id, p.item_index, a.name, l.choice, l.flipped, l.reason, l.created,
                          l.grade, l.both_bad, l.shown, p.check_answer
                   FROM labels l JOIN pairs p ON p.id = l.pair_id JOIN annotators a ON a.id = l.annotator_id"""
"""Columns of :class:`StoredLabel`, in order."""


class StoreError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the app answers with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class PairItem:
    """One pair to label, in canonical order."""

    item_index: int
    """0-based position of the record in the pairs file (``meta.item_index`` of the exported label)."""
    prompt: Prompt
    responses: tuple[str, str]
    """``(response_a, response_b)``."""


@dataclass(frozen=True)
class ThumbItem:
    """One response to rate (thumbs mode)."""

    item_index: int
    """0-based position among every response of the samples file, record by record (``meta.item_index``)."""
    prompt: Prompt
    response: str


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    state: str = ACTIVE
    """One of :data:`ANNOTATOR_STATES` (a revoked annotator's token finds nobody)."""


@dataclass(frozen=True)
class Assignment:
    """A pair leased to one annotator, in the order that annotator sees it."""

    pair_id: int
    item_index: int
    prompt: Prompt
    left: str
    """Shown as "A": canonical ``response_b`` when ``flipped``, else ``response_a``."""
    right: str
    flipped: bool
    expires: float


@dataclass(frozen=True)
class StoredLabel:
    """A row of ``labels`` with its pair's item index and the annotator's name."""

    id: int
    pair_id: int
    item_index: int
    annotator: str
    choice: str
    """Canonical: ``a`` means the pair file's ``response_a`` is better."""
    flipped: bool
    """The annotator saw ``response_b`` on the left."""
    reason: str
    created: float
    grade: str | None = None
    """How much better (``much_better | better | slightly_better``) for ``a`` / ``b``; None: ungraded, or a tie or skip."""
    both_bad: bool = False
    """The annotator marked both responses as bad."""
    shown_at: float | None = None
    """When the pair was put on the annotator's screen (None for labels from before schema 4); ``created - shown_at``
    is the time the label took."""
    check_answer: str | None = None
    """For an answer to a check question: the known better side (canonical); None for an ordinary pair."""


@dataclass(frozen=True)
class CheckItem:
    """A check question: a pair whose better response is known (:meth:`AnnotationStore.add_checks`)."""

    check_index: int
    """0-based record number in the checks file."""
    prompt: Prompt
    responses: tuple[str, str]
    """``(response_a, response_b)``, as in the checks file."""
    expected: str
    """The better response, canonical: ``a`` (``response_a`` / ``responses[0]``) or ``b``."""


def check_item_index(check_index: int) -> int:
    """The ``item_index`` a check question is stored under: negative, so it never meets a pairs-file record."""
    return -(check_index + 1)


@dataclass(frozen=True)
class Progress:
    """What one annotator's page shows."""

    labelled: int
    """Votes (a / b / tie) this annotator has given."""
    skipped: int
    remaining: int
    """What this annotator will still be shown, the one on screen included: the pairs still short of their votes
    that they have not labelled or skipped, plus the check questions still due to them (:func:`checks_due`), so
    answering a check lowers it by one just as answering a pair does. 0 once no pair is left for them."""
    pairs_total: int
    pairs_complete: int
    """Pairs with at least ``overlap`` votes."""
    overlap: int


@dataclass(frozen=True)
class Settlement:
    """Which pairs the pipeline's label stage still waits for (:meth:`AnnotationStore.settlement`)."""

    pairs: int
    complete: int
    """Pairs with at least ``overlap`` votes."""
    exhausted: tuple[int, ...]
    """Item indices of the pairs short of ``overlap`` votes, not settled by the lead, that every active
    annotator has voted on or skipped: settled, as nobody is left to ask (the lead's "stuck" pairs)."""
    waiting: tuple[int, ...]
    """Item indices of the other pairs short of ``overlap`` votes: some active annotator has not seen them yet
    (all of them while no annotator is active)."""
    by_lead: tuple[int, ...] = ()
    """Item indices of the pairs the lead settled (counted in ``complete``)."""


@dataclass(frozen=True)
class LeadDecision:
    """The lead's final label for a pair (:meth:`AnnotationStore.settle`)."""

    item_index: int
    choice: str
    """Canonical, as in :class:`StoredLabel` (``a | b | tie``, or ``up | down`` in thumbs mode)."""
    reason: str
    created: float


def _stored_label(row: tuple) -> StoredLabel:
    label_id, pair_id, item_index, name, choice, flipped, reason, created, grade, both_bad, shown, check_answer = row
    return StoredLabel(
        label_id, pair_id, item_index, name, choice, bool(flipped), reason, created, grade, bool(both_bad), shown, check_answer
    )


_RANDOM = secrets.SystemRandom()


def _draw() -> float:
    """A uniform draw in [0, 1) for mixing in check questions (module level, so a test can make it certain)."""
    return _RANDOM.random()


def checks_due(rate: float, *, pairs: int, answered: int, unanswered: int) -> int:
    """How many more check questions an annotator is shown.

    Checks are ``rate`` of an annotator's assignments: with ``pairs`` ordinary pairs for them (done and still
    to do), ``round(pairs * rate / (1 - rate))`` checks in all (every check at rate 1), less the ``answered``
    ones, at most the ``unanswered`` ones. A fixed number rather than an independent draw per assignment, so
    the count the annotator sees is exact and falls by one per answer whichever kind it was.
    """
    if rate >= 1:
        return unanswered
    wanted = math.floor(pairs * rate / (1 - rate) + 0.5)
    return max(0, min(unanswered, wanted - answered))


def opaque_id(key: str, annotator_id: int, pair_id: int) -> str:
    """The id annotator ``annotator_id`` knows pair ``pair_id`` by: 20 hex digits of an HMAC-SHA256 under ``key``.

    Row ids are in insertion order, so check questions (added after the pairs) would have the highest; a keyed
    hash has no order, and per annotator, so two annotators cannot compare ids either.
    """
    return hmac.new(key.encode(), f"{annotator_id}:{pair_id}".encode(), hashlib.sha256).hexdigest()[:20]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def to_canonical(shown_choice: str, *, flipped: bool) -> str:
    """A choice made on the page (``a`` = the left response) in the pairs file's order."""
    if flipped and shown_choice in ("a", "b"):
        return "b" if shown_choice == "a" else "a"
    return shown_choice


def to_shown(canonical_choice: str, *, flipped: bool) -> str:
    """The inverse of :func:`to_canonical` (swapping is its own inverse)."""
    return to_canonical(canonical_choice, flipped=flipped)


class AnnotationStore:
    """One open annotation database; safe to share between threads.

    Args:
        path: the SQLite file.
        create: create the file and its tables if missing; with False a missing
            file is a FileNotFoundError (status and export must not invent an empty database).
        clock: time source (seconds); tests pass a fake one to expire leases.
    """

    def __init__(self, path: str | Path, *, create: bool = True, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such annotation database (create it with `rlhfkit annotate serve`)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._public_key: str | None = None
        self._closed = False
        # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._write() as db:
            # Statement by statement: executescript() would COMMIT the transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO settings VALUES ('schema', ?)", (SCHEMA_VERSION,))
            else:
                version = row[0]
                while version in _MIGRATIONS:  # an older file: bring it up to date, labels kept
                    for statement in _MIGRATIONS[version]:
                        db.execute(statement)
                    version = str(int(version) + 1)
                    db.execute("UPDATE settings SET value = ? WHERE key = 'schema'", (version,))
                if version != SCHEMA_VERSION:
                    raise ValueError(
                        f"{self.path}: annotation schema {row[0]}, this rlhfkit reads {SCHEMA_VERSION} "
                        "(a newer rlhfkit wrote it; upgrade rlhfkit to open it)"
                    )

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close; closing twice is harmless.

        ``wal_checkpoint(TRUNCATE)`` copies every committed transaction from the
        ``-wal`` file into the ``.sqlite`` file and empties the WAL, so after a clean
        shutdown the ``.sqlite`` file alone holds every label (a backup of just that
        file is complete). The data is safe without it (the WAL is fsynced on every
        commit), so a checkpoint that cannot finish (another process in the middle of
        a read for longer than the 30 s busy timeout, a read-only file) is left to
        SQLite: the WAL keeps those transactions and is replayed on the next open.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # busy or read-only: the WAL still holds the data, and SQLite replays it on the next open
            finally:
                self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (and, with synchronous=FULL, fsynced) on exit."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (a deferred constraint, SQLITE_FULL, an I/O error) can leave the
                # transaction open, and every later BEGIN would fail until a restart. SQLite may also
                # have rolled back on its own already, and a second ROLLBACK would hide the cause.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- settings ------------------------------------------------------------

    def configure(
        self,
        *,
        overlap: int | None = None,
        lease_seconds: float | None = None,
        mode: str | None = None,
        check_rate: float | None = None,
    ) -> None:
        """Store the overlap ``k``, the lease length, the mode and the check rate (the share of new assignments that
        are check questions, 0 to 1); the server, status and export all read them from here.

        ``mode`` (:data:`MODES`) can change only while the database holds no items: pairs and single
        responses do not mix in one database (a ValueError saying so).
        """
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode is not None and mode != self.mode:
            (items,) = self._read("SELECT COUNT(*) FROM pairs")[0]
            if items:
                raise ValueError(
                    f"{self.path}: this database holds {items} item(s) in {self.mode} mode; "
                    f"use a new --db for {mode} mode (one mode per database)"
                )
        if overlap is not None and overlap < 1:
            raise ValueError(f"overlap must be at least 1, got {overlap}")
        if lease_seconds is not None and lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        if check_rate is not None and not 0 <= check_rate <= 1:
            raise ValueError(f"check rate must be between 0 and 1 (a share of the pairs shown), got {check_rate}")
        settings = (("overlap", overlap), ("lease_seconds", lease_seconds), ("mode", mode), ("check_rate", check_rate))
        with self._write() as db:
            for key, value in settings:
                if value is not None:
                    db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, str(value)))

    def _setting_text(self, db: sqlite3.Connection, key: str, default: str) -> str:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _setting(self, db: sqlite3.Connection, key: str, default: float) -> float:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row else default

    @property
    def overlap(self) -> int:
        """How many different annotators should vote on each pair (``k``)."""
        with self._lock:
            return int(self._setting(self._db, "overlap", DEFAULT_OVERLAP))

    @property
    def mode(self) -> str:
        """:data:`MODE_PAIRS` (the default) or :data:`MODE_THUMBS`."""
        rows = self._read("SELECT value FROM settings WHERE key = 'mode'")
        return rows[0][0] if rows else MODE_PAIRS

    @property
    def check_rate(self) -> float:
        """The share of new assignments that are check questions (when there are checks left to show)."""
        with self._lock:
            return self._setting(self._db, "check_rate", DEFAULT_CHECK_RATE)

    @property
    def lease_seconds(self) -> float:
        with self._lock:
            return self._setting(self._db, "lease_seconds", DEFAULT_LEASE_SECONDS)

    # -- pairs and annotators --------------------------------------------------

    def add_pairs(self, items: Sequence[PairItem]) -> int:
        """Add pairs not in the database yet (by ``item_index``); returns how many were new.

        Loading the same file again is a no-op, and a file that grew adds its new
        records; an ``item_index`` already stored with other text is a ValueError
        (labels would silently refer to the wrong pair).
        """
        return self._add_items([(item.item_index, item.prompt, item.responses, None) for item in items])

    def add_checks(self, checks: Sequence[CheckItem]) -> int:
        """Add check questions not in the database yet (by ``check_index``); returns how many were new.

        Pairs mode only (a ValueError in a thumbs database). As for :meth:`add_pairs`, loading the same file
        again is a no-op and a check already stored with another text or answer is a ValueError.
        """
        if self.mode != MODE_PAIRS:
            raise ValueError(f"{self.path}: check questions compare two responses; this database is in {self.mode} mode")
        for check in checks:
            if check.expected not in CHECK_ANSWERS:
                raise ValueError(f"check {check.check_index}: expected must be one of {', '.join(CHECK_ANSWERS)}")
        rows = [(check_item_index(c.check_index), c.prompt, c.responses, c.expected) for c in checks]
        return self._add_items(rows, what="check")

    def _add_items(self, items: Sequence[tuple[int, Prompt, tuple[str, str], str | None]], what: str = "item") -> int:
        added = 0
        with self._write() as db:
            for item_index, prompt, responses, check_answer in items:
                prompt_json = json.dumps(prompt, ensure_ascii=False)
                row = db.execute(
                    "SELECT prompt, response_a, response_b, check_answer FROM pairs WHERE item_index = ?", (item_index,)
                ).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO pairs (item_index, prompt, response_a, response_b, check_answer) VALUES (?, ?, ?, ?, ?)",
                        (item_index, prompt_json, *responses, check_answer),
                    )
                    added += 1
                elif (json.loads(row[0]), (row[1], row[2]), row[3]) != (prompt, tuple(responses), check_answer):
                    number = -item_index - 1 if check_answer is not None else item_index
                    raise ValueError(
                        f"{self.path}: {what} {number} is already stored with a different prompt, responses or answer; "
                        f"is this database from another {'checks' if check_answer is not None else 'pairs'} file? "
                        "Use a new --db for new pairs."
                    )
        return added

    def add_thumbs(self, items: Sequence[ThumbItem]) -> int:
        """Add thumbs items not in the database yet (by ``item_index``); returns how many were new.

        Sets the database's mode to thumbs first (a ValueError if it holds pairs); the
        response is stored as ``response_a`` with an empty ``response_b``.
        """
        self.configure(mode=MODE_THUMBS)
        return self.add_pairs([PairItem(item.item_index, item.prompt, (item.response, "")) for item in items])

    def thumbs(self) -> list[ThumbItem]:
        """Every item of a thumbs database, as :class:`ThumbItem`."""
        return [ThumbItem(item.item_index, item.prompt, item.responses[0]) for item in self.pairs()]

    def add_annotator(self, name: str, *, replace_token: bool = False) -> str:
        """Register ``name`` and return its new token (shown once; only its hash is stored).

        ``replace_token=True`` gives an existing annotator a new token (the old one
        stops working); their labels stay theirs.
        """
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"annotator name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        token = secrets.token_urlsafe(24)
        with self._write() as db:
            exists = db.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()
            if exists and not replace_token:
                raise ValueError(f"annotator {name!r} already exists (pass replace_token / --new-token for a new token)")
            if exists:  # a new token also lifts a revocation: the lead (or CLI) let them back in
                db.execute(
                    "UPDATE annotators SET token_sha256 = ?, state = ? WHERE id = ?", (token_hash(token), ACTIVE, exists[0])
                )
            else:
                db.execute(
                    "INSERT INTO annotators (name, token_sha256, created) VALUES (?, ?, ?)",
                    (name, token_hash(token), self._clock()),
                )
        return token

    def annotator_for_token(self, token: str) -> Annotator | None:
        """The annotator holding ``token``; None for an unknown or revoked token."""
        rows = self._read(
            "SELECT id, name, state FROM annotators WHERE token_sha256 = ? AND state != ?", (token_hash(token), REVOKED)
        )
        return Annotator(*rows[0]) if rows else None

    def annotators(self) -> list[str]:
        return [name for (name,) in self._read("SELECT name FROM annotators ORDER BY id")]

    def annotator_states(self) -> dict[str, str]:
        """Every annotator's name -> :data:`ANNOTATOR_STATES` value, in registration order."""
        return dict(self._read("SELECT name, state FROM annotators ORDER BY id"))

    def set_annotator_state(self, name: str, state: str) -> None:
        """Pause, resume (``active``) or revoke ``name``; a ValueError for an unknown name or state.

        Pausing or revoking gives the annotator's leased pair back to the pool at once. Revoking
        also replaces the stored token hash with a random one, so the old token cannot come back
        by a later resume; ``add_annotator(name, replace_token=True)`` issues a new token.
        """
        if state not in ANNOTATOR_STATES:
            raise ValueError(f"state must be one of {', '.join(ANNOTATOR_STATES)}, got {state!r}")
        with self._write() as db:
            row = db.execute("SELECT id, state FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ValueError(f"no annotator named {name!r}")
            if row[1] == REVOKED and state != REVOKED:
                raise ValueError(f"annotator {name!r} is revoked; give them a new token (add-annotator --new-token)")
            db.execute("UPDATE annotators SET state = ? WHERE id = ?", (state, row[0]))
            if state != ACTIVE:
                db.execute("DELETE FROM leases WHERE annotator_id = ?", (row[0],))
            if state == REVOKED:
                db.execute("UPDATE annotators SET token_sha256 = ? WHERE id = ?", (token_hash(secrets.token_urlsafe(24)), row[0]))

    def public_id(self, annotator_id: int, pair_id: int) -> str:
        """The opaque id ``annotator_id`` sees for pair ``pair_id`` (:func:`opaque_id`); stable across restarts."""
        if self._public_key is None:
            with self._write() as db:  # made once per database; a settings row, so no schema change
                db.execute("INSERT OR IGNORE INTO settings VALUES ('public_id_key', ?)", (secrets.token_hex(32),))
                (self._public_key,) = db.execute("SELECT value FROM settings WHERE key = 'public_id_key'").fetchone()
        return opaque_id(self._public_key, annotator_id, pair_id)

    def pair_for_public_id(self, annotator_id: int, opaque: str) -> int | None:
        """The row id of the pair ``annotator_id`` knows as ``opaque``: one leased to them or labelled by them
        (a retried or undone label); None for any other id."""
        # The pairs held first (a label's usual case: one lease), then the labelled ones newest first (a retry or
        # an undo names a recent one): one hash per candidate, so an ordinary label costs one or two.
        held = self._read("SELECT pair_id FROM leases WHERE annotator_id = ?", (annotator_id,))
        for (pair_id,) in held:
            if hmac.compare_digest(self.public_id(annotator_id, pair_id), opaque):
                return pair_id
        labelled = self._read("SELECT pair_id FROM labels WHERE annotator_id = ? ORDER BY id DESC", (annotator_id,))
        for (pair_id,) in labelled:
            if hmac.compare_digest(self.public_id(annotator_id, pair_id), opaque):
                return pair_id
        return None

    # -- the lead ----------------------------------------------------------------

    def new_lead_token(self) -> str:
        """A new lead token (returned once; only its SHA-256 is stored); the previous one stops working."""
        token = secrets.token_urlsafe(24)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES ('lead_token_sha256', ?)", (token_hash(token),))
        return token

    def is_lead_token(self, token: str) -> bool:
        rows = self._read("SELECT value FROM settings WHERE key = 'lead_token_sha256'")
        return bool(rows) and secrets.compare_digest(rows[0][0], token_hash(token))

    def settle(self, item_index: int, choice: str, reason: str = "") -> LeadDecision:
        """The lead's final label for item ``item_index`` (canonical choice; replaces an earlier decision).

        The pair counts as complete from now on and is no longer handed out (leases on it end).
        A choice that is not a vote of the database's mode, or an unknown item, is a StoreError (422 / 404).
        """
        votes = MODE_VOTES[self.mode]
        if choice not in votes:
            raise StoreError(422, f"choice must be one of {', '.join(votes)}, got {choice!r}")
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT id FROM pairs WHERE item_index = ? AND check_answer IS NULL", (item_index,)).fetchone()
            if row is None:
                raise StoreError(404, f"no item {item_index}")
            db.execute("INSERT OR REPLACE INTO settled VALUES (?, ?, ?, ?)", (row[0], choice, reason, now))
            db.execute("DELETE FROM leases WHERE pair_id = ?", (row[0],))
        return LeadDecision(item_index, choice, reason, now)

    def ask_one_more(self, item_index: int) -> int:
        """The lead asks for one more vote on item ``item_index`` (a split pair, say); returns the votes it now needs.

        The pair needs one vote more than it has (and never fewer than before), so an annotator who has not
        voted on or skipped it gets it next; it counts as waiting until then. A settled pair, a check
        question or an unknown item is a StoreError (409 / 404).
        """
        with self._write() as db:
            row = db.execute(
                "SELECT id, n_votes, votes_wanted FROM pairs WHERE item_index = ? AND check_answer IS NULL", (item_index,)
            ).fetchone()
            if row is None:
                raise StoreError(404, f"no item {item_index}")
            pair_id, votes, wanted = row
            if db.execute("SELECT 1 FROM settled WHERE pair_id = ?", (pair_id,)).fetchone():
                raise StoreError(409, f"item {item_index} is settled by the lead; it needs no more votes")
            overlap = int(self._setting(db, "overlap", DEFAULT_OVERLAP))
            wanted = max(overlap, wanted or 0, votes) + 1
            db.execute("UPDATE pairs SET votes_wanted = ? WHERE id = ?", (wanted, pair_id))
        return wanted

    def votes_wanted(self) -> dict[int, int]:
        """Item index -> votes needed, for the pairs where the lead asked for more than ``overlap``."""
        rows = self._read("SELECT item_index, votes_wanted FROM pairs WHERE votes_wanted IS NOT NULL AND check_answer IS NULL")
        overlap = self.overlap
        return {index: wanted for index, wanted in rows if wanted > overlap}

    def decisions(self) -> dict[int, LeadDecision]:
        """The lead's decisions by item index."""
        rows = self._read("SELECT p.item_index, s.choice, s.reason, s.created FROM settled s JOIN pairs p ON p.id = s.pair_id")
        return {row[0]: LeadDecision(*row) for row in rows}

    # -- the annotator's loop: next, submit, undo ------------------------------

    def next_assignment(self, annotator_id: int) -> Assignment | None:
        """The pair this annotator should label now (leased to them), or None when there is none left
        (or the annotator is paused)."""
        with self._write() as db:
            return self._next(db, annotator_id)

    def submit(
        self,
        annotator_id: int,
        pair_id: int,
        shown_choice: str,
        reason: str = "",
        *,
        grade: str | None = None,
        both_bad: bool = False,
    ) -> tuple[int, bool, Assignment | None]:
        """Record a label; returns ``(label id, was already recorded, next assignment)``.

        ``shown_choice`` is what the annotator pressed (``a`` = the left response).
        ``grade`` says how much better the chosen side is (``much_better``,
        ``better``, ``slightly_better``; only with ``a`` / ``b``; None: ungraded) and
        is the same whichever side was shown first; ``both_bad`` marks both
        responses as bad (not with a skip). Either given wrongly is a 422.
        Sending the same label again (a retry after a lost response) is
        acknowledged without a second row; a different label for a pair this
        annotator already labelled is a 409 (undo first). Labelling a pair not
        leased to this annotator is a 403.
        """
        mode = self.mode
        choices = MODE_CHOICES[mode]
        if shown_choice not in choices:
            raise StoreError(422, f"choice must be one of {', '.join(choices)} in {mode} mode, got {shown_choice!r}")
        try:
            check_vote(shown_choice, grade)
        except ValueError as e:
            raise StoreError(422, str(e)) from None
        if both_bad and shown_choice == "skip":
            raise StoreError(422, "both_bad marks a vote; a skip is not one")
        if both_bad and mode == MODE_THUMBS:
            raise StoreError(422, "both_bad compares two responses; thumbs mode rates one")
        now = self._clock()
        with self._write() as db:
            done = db.execute(
                "SELECT id, choice, flipped, reason, grade, both_bad FROM labels WHERE pair_id = ? AND annotator_id = ?",
                (pair_id, annotator_id),
            ).fetchone()
            if done is not None:
                label_id, choice, flipped, old_reason, old_grade, old_both_bad = done
                resent = (to_canonical(shown_choice, flipped=bool(flipped)), reason, grade, int(both_bad))
                if (choice, old_reason, old_grade, old_both_bad) == resent:
                    return label_id, True, self._next(db, annotator_id)
                raise StoreError(409, "this pair already has your label; undo it first to change it")
            lease = db.execute(
                "SELECT flipped, shown FROM leases WHERE pair_id = ? AND annotator_id = ?", (pair_id, annotator_id)
            ).fetchone()
            if self._state(db, annotator_id) != ACTIVE:
                raise StoreError(403, "you are paused by the lead; your labels so far are kept")
            if lease is None:
                raise StoreError(403, "this pair is not assigned to you; reload the page to get your next pair")
            choice = to_canonical(shown_choice, flipped=bool(lease[0]))
            cursor = db.execute(
                """INSERT INTO labels (pair_id, annotator_id, choice, flipped, reason, created, grade, both_bad, shown)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (pair_id, annotator_id, choice, lease[0], reason, now, grade, int(both_bad), lease[1]),
            )
            db.execute("DELETE FROM leases WHERE pair_id = ? AND annotator_id = ?", (pair_id, annotator_id))
            if choice != "skip":
                db.execute("UPDATE pairs SET n_votes = n_votes + 1 WHERE id = ?", (pair_id,))
            return int(cursor.lastrowid), False, self._next(db, annotator_id)

    def undo(self, annotator_id: int) -> tuple[StoredLabel, Assignment]:
        """Delete this annotator's most recent label and lease its pair back to them (same order).

        Returns the removed label (so the page can show the choice and reason
        again) and the assignment to show. The pair that was on screen goes back
        to the pool. Only the caller's own labels can be undone: there is no way
        to name another annotator's label. Nothing to undo is a 409.
        """
        now = self._clock()
        with self._write() as db:
            row = db.execute(f"{_LABEL_SELECT} WHERE l.annotator_id = ? ORDER BY l.id DESC LIMIT 1", (annotator_id,)).fetchone()
            if row is None:
                raise StoreError(409, "nothing to undo")
            label = _stored_label(row)
            db.execute("DELETE FROM leases WHERE annotator_id = ?", (annotator_id,))
            db.execute("DELETE FROM labels WHERE id = ?", (label.id,))
            if label.choice != "skip":
                db.execute("UPDATE pairs SET n_votes = n_votes - 1 WHERE id = ?", (label.pair_id,))
            db.execute(
                "INSERT INTO leases (pair_id, annotator_id, flipped, expires, shown) VALUES (?, ?, ?, ?, ?)",
                (
                    label.pair_id,
                    annotator_id,
                    int(label.flipped),
                    now + self._setting(db, "lease_seconds", DEFAULT_LEASE_SECONDS),
                    now,  # shown again now: the time to the new label starts here
                ),
            )
            assignment = self._next(db, annotator_id)
        assert assignment is not None and assignment.pair_id == label.pair_id
        return label, assignment

    def _state(self, db: sqlite3.Connection, annotator_id: int) -> str:
        row = db.execute("SELECT state FROM annotators WHERE id = ?", (annotator_id,)).fetchone()
        return row[0] if row else REVOKED

    def _next(self, db: sqlite3.Connection, annotator_id: int) -> Assignment | None:
        if self._state(db, annotator_id) != ACTIVE:
            return None
        now = self._clock()
        overlap = int(self._setting(db, "overlap", DEFAULT_OVERLAP))
        expires = now + self._setting(db, "lease_seconds", DEFAULT_LEASE_SECONDS)
        held = db.execute(
            "SELECT pair_id, flipped, expires FROM leases WHERE annotator_id = ? ORDER BY pair_id LIMIT 1", (annotator_id,)
        ).fetchone()
        if held is not None:
            pair_id, flipped, held_until = held
            settled = db.execute("SELECT 1 FROM settled WHERE pair_id = ?", (pair_id,)).fetchone()
            # A check question has no vote limit: everyone may answer it, so its lease never lapses.
            (is_check,) = db.execute("SELECT check_answer IS NOT NULL FROM pairs WHERE id = ?", (pair_id,)).fetchone()
            if not settled and (held_until > now or is_check or self._free_slots(db, pair_id, now) > 0):
                db.execute(
                    "UPDATE leases SET expires = ? WHERE pair_id = ? AND annotator_id = ?", (expires, pair_id, annotator_id)
                )
                return self._assignment(db, pair_id, bool(flipped), expires)
            # Expired, and the slot went to someone else meanwhile (or the lead settled the pair).
            db.execute("DELETE FROM leases WHERE pair_id = ? AND annotator_id = ?", (pair_id, annotator_id))
        # Lowest id first, so pairs are completed (and usable) in file order.
        row = db.execute(
            f"""SELECT p.id FROM pairs p
               WHERE p.check_answer IS NULL AND p.n_votes < {_WANTED}
                 AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.id AND l.annotator_id = :me)
                 AND NOT EXISTS (SELECT 1 FROM settled d WHERE d.pair_id = p.id)
                 AND p.n_votes + (SELECT COUNT(*) FROM leases s WHERE s.pair_id = p.id AND s.expires > :now) < {_WANTED}
               ORDER BY p.id LIMIT 1""",
            {"k": overlap, "me": annotator_id, "now": now},
        ).fetchone()
        if row is None:
            return None  # nothing left to label: no check questions either, they would only waste time
        # A check question this annotator has not answered, in place of the pair (which stays in the pool). The
        # checks still due go to random places among the pairs left but the last one (all first at rate 1), so
        # the count the page shows is exact. No draw at all without checks: the A/B draw below stays the first.
        check = db.execute(
            """SELECT p.id FROM pairs p WHERE p.check_answer IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.id AND l.annotator_id = ?)
               ORDER BY RANDOM() LIMIT 1""",
            (annotator_id,),
        ).fetchone()
        if check is not None:
            left, due = self._queue(db, annotator_id)
            every_time = left <= 1 or self._setting(db, "check_rate", DEFAULT_CHECK_RATE) >= 1
            if due > 0 and (every_time or _draw() < due / (due + left - 1)):
                row = check
        # A/B order drawn per (annotator, pair), then fixed; a thumbs item has one response, never swapped.
        flipped = self._setting_text(db, "mode", MODE_PAIRS) == MODE_PAIRS and secrets.randbelow(2) == 1
        db.execute(
            "INSERT INTO leases (pair_id, annotator_id, flipped, expires, shown) VALUES (?, ?, ?, ?, ?)",
            (row[0], annotator_id, int(flipped), expires, now),
        )
        return self._assignment(db, row[0], flipped, expires)

    def _free_slots(self, db: sqlite3.Connection, pair_id: int, now: float) -> int:
        overlap = int(self._setting(db, "overlap", DEFAULT_OVERLAP))
        (votes, wanted) = db.execute(
            f"SELECT n_votes, {_WANTED} FROM pairs p WHERE id = :id", {"k": overlap, "id": pair_id}
        ).fetchone()
        (leased,) = db.execute("SELECT COUNT(*) FROM leases WHERE pair_id = ? AND expires > ?", (pair_id, now)).fetchone()
        return wanted - votes - leased

    def _assignment(self, db: sqlite3.Connection, pair_id: int, flipped: bool, expires: float) -> Assignment:
        item_index, prompt, response_a, response_b = db.execute(
            "SELECT item_index, prompt, response_a, response_b FROM pairs WHERE id = ?", (pair_id,)
        ).fetchone()
        left, right = (response_b, response_a) if flipped else (response_a, response_b)
        return Assignment(pair_id, item_index, json.loads(prompt), left, right, flipped, expires)

    def _queue(self, db: sqlite3.Connection, annotator_id: int) -> tuple[int, int]:
        """``(pairs left, checks due)`` for this annotator: the pairs still short of their votes that they have
        not labelled or skipped, and :func:`checks_due` (at least 1 while a check is leased to them)."""
        overlap = int(self._setting(db, "overlap", DEFAULT_OVERLAP))
        (left,) = db.execute(
            f"""SELECT COUNT(*) FROM pairs p WHERE p.check_answer IS NULL AND p.n_votes < {_WANTED}
               AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.id AND l.annotator_id = :me)
               AND NOT EXISTS (SELECT 1 FROM settled d WHERE d.pair_id = p.id)""",
            {"k": overlap, "me": annotator_id},
        ).fetchone()
        done, answered, unanswered, held = db.execute(
            """SELECT
                 (SELECT COUNT(*) FROM labels l JOIN pairs p ON p.id = l.pair_id
                  WHERE l.annotator_id = :me AND p.check_answer IS NULL),
                 (SELECT COUNT(*) FROM labels l JOIN pairs p ON p.id = l.pair_id
                  WHERE l.annotator_id = :me AND p.check_answer IS NOT NULL),
                 (SELECT COUNT(*) FROM pairs p WHERE p.check_answer IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.id AND l.annotator_id = :me)),
                 EXISTS (SELECT 1 FROM leases s JOIN pairs p ON p.id = s.pair_id
                         WHERE s.annotator_id = :me AND p.check_answer IS NOT NULL)""",
            {"me": annotator_id},
        ).fetchone()
        rate = self._setting(db, "check_rate", DEFAULT_CHECK_RATE)
        # Checks are shown only while pairs are left for this annotator; a leased one stays until answered.
        due = checks_due(rate, pairs=done + left, answered=answered, unanswered=unanswered) if left else 0
        return left, max(due, int(held))

    def progress(self, annotator_id: int) -> Progress:
        with self._lock:
            db = self._db
            overlap = int(self._setting(db, "overlap", DEFAULT_OVERLAP))
            labelled, skipped = db.execute(
                "SELECT COALESCE(SUM(choice != 'skip'), 0), COALESCE(SUM(choice = 'skip'), 0) FROM labels WHERE annotator_id = ?",
                (annotator_id,),
            ).fetchone()
            total, complete = db.execute(_COMPLETE_SQL, {"k": overlap}).fetchone()
            left, due = self._queue(db, annotator_id)
        return Progress(labelled, skipped, left + due, total, complete, overlap)

    # -- reading everything (status, export) -----------------------------------

    def pairs(self) -> list[PairItem]:
        """The pairs to label (check questions left out), in file order."""
        rows = self._read(
            "SELECT item_index, prompt, response_a, response_b FROM pairs WHERE check_answer IS NULL ORDER BY item_index"
        )
        return [PairItem(index, json.loads(prompt), (a, b)) for index, prompt, a, b in rows]

    def checks(self) -> list[CheckItem]:
        """The check questions, in checks-file order."""
        rows = self._read(
            "SELECT item_index, prompt, response_a, response_b, check_answer FROM pairs "
            "WHERE check_answer IS NOT NULL ORDER BY item_index DESC"
        )
        return [CheckItem(-index - 1, json.loads(prompt), (a, b), answer) for index, prompt, a, b, answer in rows]

    def labels(self) -> list[StoredLabel]:
        """Every label on a pair to label (skips included; answers to check questions left out), oldest first."""
        return [_stored_label(row) for row in self._read(f"{_LABEL_SELECT} WHERE p.check_answer IS NULL ORDER BY l.id")]

    def check_labels(self) -> list[StoredLabel]:
        """Every answer to a check question (skips included), oldest first; ``check_answer`` holds the known answer."""
        return [_stored_label(row) for row in self._read(f"{_LABEL_SELECT} WHERE p.check_answer IS NOT NULL ORDER BY l.id")]

    def settlement(self) -> Settlement:
        """Which pairs are complete, which are settled short of their votes, and which still wait."""
        with self._lock:
            overlap = int(self._setting(self._db, "overlap", DEFAULT_OVERLAP))
            (annotators,) = self._db.execute("SELECT COUNT(*) FROM annotators WHERE state = ?", (ACTIVE,)).fetchone()
            # labels has one row per (pair, annotator), so `seen` counts the active annotators done with the pair.
            rows = self._db.execute(
                f"""SELECT p.item_index, p.n_votes - {_WANTED},
                          (SELECT COUNT(*) FROM labels l JOIN annotators a ON a.id = l.annotator_id
                           WHERE l.pair_id = p.id AND a.state = :active),
                          EXISTS (SELECT 1 FROM settled d WHERE d.pair_id = p.id)
                   FROM pairs p WHERE p.check_answer IS NULL ORDER BY p.item_index""",
                {"active": ACTIVE, "k": overlap},
            ).fetchall()
        by_lead = tuple(index for index, _, _, settled in rows if settled)
        short = [(index, seen) for index, surplus, seen, settled in rows if surplus < 0 and not settled]
        exhausted = tuple(index for index, seen in short if annotators and seen >= annotators)
        waiting = tuple(index for index, seen in short if not annotators or seen < annotators)
        return Settlement(len(rows), len(rows) - len(short), exhausted, waiting, by_lead)

    def vote_counts(self) -> tuple[int, int]:
        """``(pairs, pairs with at least overlap votes)`` - what the pipeline polls."""
        with self._lock:
            overlap = int(self._setting(self._db, "overlap", DEFAULT_OVERLAP))
            total, complete = self._db.execute(_COMPLETE_SQL, {"k": overlap}).fetchone()
        return total, complete

    def healthy(self) -> bool:
        """The database answers a query (``GET /healthz``)."""
        try:
            self._read("SELECT COUNT(*) FROM settings")
        except sqlite3.Error:
            return False
        return True
