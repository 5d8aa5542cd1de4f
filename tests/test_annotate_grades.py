"""Graded preferences and guidelines in the web annotator, without a browser: the grade -> margin /
soft-label mapping by hand, the store (canonical order, validation, retries, undo), the schema
migration of a version-1 database, the export's meta (grade, both_bad, target, margin), the soft
target reaching the reward model's loss, and the HTTP API (grades from new and old clients,
/api/task, the --guidelines and --criterion flags)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
import torch

from rlhfkit import cli
from rlhfkit.data.pairwise import collate_pairs, soft_target, tokenize_pairs
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.feedback import grades
from rlhfkit.feedback.web.admin import ExportConfig, comparisons, export
from rlhfkit.feedback.web.app import create_app, read_guidelines
from rlhfkit.feedback.web.pairs import read_pairs
from rlhfkit.feedback.web.store import SCHEMA_VERSION, AnnotationStore, PairItem, StoreError, to_shown
from rlhfkit.losses import preference_loss
from rlhfkit.reward import RewardTask
from rlhfkit.serve import ServerThread
from tests.annotate_client import Client, ServerProcess, make_pairs
from tests.helpers import read_jsonl


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_store(path: Path, n_pairs: int, *, overlap: int = 1) -> AnnotationStore:
    store = AnnotationStore(path, clock=FakeClock())
    store.configure(overlap=overlap)
    store.add_pairs([PairItem(i, f"Question {i}?", (f"first {i}", f"second {i}")) for i in range(n_pairs)])
    return store


def annotator(store: AnnotationStore, name: str) -> int:
    return store.annotator_for_token(store.add_annotator(name)).id


def vote(store: AnnotationStore, who: int, canonical: str, grade: str | None = None, *, both_bad: bool = False) -> int:
    """Label the caller's current pair so that the stored (canonical) choice is ``canonical``."""
    assignment = store.next_assignment(who)
    store.submit(who, assignment.pair_id, to_shown(canonical, flipped=assignment.flipped), grade=grade, both_bad=both_bad)
    return assignment.pair_id


# ----------------------------------------------------------------------------- the mapping, by hand


def test_the_grade_mapping_lives_in_one_place():
    assert grades.STRENGTHS == ("much_better", "better", "slightly_better")
    assert grades.MARGIN == {"much_better": 1.0, "better": 0.5, "slightly_better": 0.25}
    assert grades.SOFT_LABEL == {"much_better": 1.0, "better": 0.9, "slightly_better": 0.7}
    assert [grades.scale_grade(c, s) for c, s in [("a", "much_better"), ("tie", None), ("b", "slightly_better")]] == [
        "a_much_better",
        "tie",
        "b_slightly_better",
    ]
    assert grades.scale_grade("a", None) is None  # ungraded
    assert grades.prob_a("b", "better") == pytest.approx(0.1) and grades.prob_a("a", None) == 1.0
    assert grades.margin_a("b", "much_better") == -1.0 and grades.margin_a("tie", None) == 0.0
    # One vote each.
    assert grades.pair_targets([("a", "slightly_better")], chosen=0, tie=False) == (0.7, 0.25)
    assert grades.pair_targets([("b", "much_better")], chosen=1, tie=False) == (1.0, 1.0)
    assert grades.pair_targets([("b", None)], chosen=1, tie=False) == (1.0, 0.0)  # ungraded: as before grades
    assert grades.pair_targets([("tie", None)], chosen=0, tie=True) == (0.5, 0.0)
    # a much (P(a) 1.0), a slightly (0.7), b better (0.1): P(a) = 1.8 / 3 = 0.6; margins toward a
    # 1.0 + 0.25 - 0.5 = 0.75, mean 0.25.
    mixed = [("a", "much_better"), ("a", "slightly_better"), ("b", "better")]
    assert grades.pair_targets(mixed, chosen=0, tie=False) == (0.6, 0.25)
    # A split (a better, b better): P(a) = (0.9 + 0.1) / 2 = 0.5, no margin.
    assert grades.pair_targets([("a", "better"), ("b", "better")], chosen=0, tie=True) == (0.5, 0.0)
    # The majority picked a (slightly, twice), one annotator found b much better: P(a) = 1.4 / 3,
    # below 0.5; margin toward a (0.25 + 0.25 - 1) / 3 < 0, floored at 0.
    assert grades.pair_targets([("a", "slightly_better")] * 2 + [("b", "much_better")], chosen=0, tie=False) == (
        round(1.4 / 3, 6),
        0.0,
    )
    with pytest.raises(ValueError, match="grade must be one of"):
        grades.check_vote("a", "a_lot_better")
    with pytest.raises(ValueError, match="goes with choice a or b"):
        grades.check_vote("tie", "better")


# ----------------------------------------------------------------------------- the store


def test_grades_are_stored_canonically_validated_and_retried(tmp_path):
    store = new_store(tmp_path / "labels.sqlite", 4)
    x = annotator(store, "x")
    first = store.next_assignment(x)
    # "A much better" as shown, with both bad: canonically response_b when the pair was shown swapped.
    label_id, duplicate, second = store.submit(x, first.pair_id, "a", "clear", grade="much_better", both_bad=True)
    [stored] = store.labels()
    assert (stored.choice, stored.grade, stored.both_bad) == ("b" if first.flipped else "a", "much_better", True)
    # A retry with the same grade is the same label; another grade or flag is a change (409: undo first).
    assert store.submit(x, first.pair_id, "a", "clear", grade="much_better", both_bad=True)[:2] == (label_id, True)
    for changed in ({"grade": "better", "both_bad": True}, {"grade": "much_better", "both_bad": False}, {}):
        with pytest.raises(StoreError) as conflict:
            store.submit(x, first.pair_id, "a", "clear", **changed)
        assert conflict.value.status == 409
    # Wrong combinations are 422s, and nothing is stored.
    for choice, kwargs, message in (
        ("a", {"grade": "huge"}, "grade must be one of"),
        ("tie", {"grade": "better"}, "goes with choice a or b"),
        ("skip", {"grade": "slightly_better"}, "goes with choice a or b"),
        ("skip", {"both_bad": True}, "a skip is not one"),
    ):
        with pytest.raises(StoreError, match=message) as bad:
            store.submit(x, second.pair_id, choice, **kwargs)
        assert bad.value.status == 422
    assert len(store.labels()) == 1
    # A tie can be "both bad"; a choice without a grade is an ungraded vote.
    store.submit(x, second.pair_id, "tie", both_bad=True)
    third = store.next_assignment(x)
    store.submit(x, third.pair_id, "b")
    assert [(label.choice, label.grade, label.both_bad) for label in store.labels()[1:]] == [
        ("tie", None, True),
        ("a" if third.flipped else "b", None, False),
    ]
    # Undo gives back the grade and the flag (the page shows them again).
    undone, back = store.undo(x)
    assert (undone.grade, undone.both_bad, back.pair_id) == (None, False, third.pair_id)
    store.submit(x, third.pair_id, "b", grade="slightly_better")
    undone, _ = store.undo(x)
    assert (to_shown(undone.choice, flipped=undone.flipped), undone.grade) == ("b", "slightly_better")
    # The database itself refuses a grade on a tie.
    with sqlite3.connect(tmp_path / "labels.sqlite") as con, pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        con.execute("UPDATE labels SET grade = 'better' WHERE choice = 'tie'")
    store.close()


# ----------------------------------------------------------------------------- migration

V1_SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE pairs (id INTEGER PRIMARY KEY, item_index INTEGER NOT NULL UNIQUE, prompt TEXT NOT NULL,
                    response_a TEXT NOT NULL, response_b TEXT NOT NULL, n_votes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE annotators (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
                         created REAL NOT NULL);
CREATE TABLE leases (pair_id INTEGER NOT NULL REFERENCES pairs(id), annotator_id INTEGER NOT NULL REFERENCES annotators(id),
                     flipped INTEGER NOT NULL, expires REAL NOT NULL, PRIMARY KEY (pair_id, annotator_id));
CREATE INDEX leases_by_annotator ON leases(annotator_id);
CREATE TABLE labels (id INTEGER PRIMARY KEY AUTOINCREMENT, pair_id INTEGER NOT NULL REFERENCES pairs(id),
                     annotator_id INTEGER NOT NULL REFERENCES annotators(id),
                     choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')), flipped INTEGER NOT NULL,
                     reason TEXT NOT NULL, created REAL NOT NULL, UNIQUE (pair_id, annotator_id));
CREATE INDEX labels_by_annotator ON labels(annotator_id, id);
"""
"""The tables as rlhfkit wrote them before grades (schema version 1), verbatim."""


def version_1_database(path: Path) -> Path:
    """A database as the version-1 store left it: 4 pairs, annotators x and y, three labels and a lease."""
    with sqlite3.connect(path) as con:
        con.executescript(V1_SCHEMA)
        con.executemany("INSERT INTO settings VALUES (?, ?)", [("schema", "1"), ("overlap", "1"), ("lease_seconds", "600.0")])
        con.executemany(
            "INSERT INTO pairs (id, item_index, prompt, response_a, response_b, n_votes) VALUES (?, ?, ?, ?, ?, ?)",
            [(i + 1, i, f'"Question {i}?"', f"first {i}", f"second {i}", 1 if i < 2 else 0) for i in range(4)],
        )
        con.executemany("INSERT INTO annotators VALUES (?, ?, ?, ?)", [(1, "x", "0" * 64, 1.0), (2, "y", "1" * 64, 2.0)])
        con.executemany(
            "INSERT INTO labels (pair_id, annotator_id, choice, flipped, reason, created) VALUES (?, ?, ?, ?, ?, ?)",
            [(1, 1, "b", 1, "A is better", 10.0), (2, 2, "tie", 0, "", 11.0), (3, 1, "skip", 0, "", 12.0)],
        )
        con.execute("INSERT INTO leases VALUES (4, 2, 1, 9999999999.0)")
    return path


def test_a_version_1_database_opens_keeps_its_labels_and_takes_grades(tmp_path):
    db = version_1_database(tmp_path / "old.sqlite")
    store = AnnotationStore(db, create=False)  # e.g. `rlhfkit annotate status` on last month's file
    labels = store.labels()
    assert [(lab.item_index, lab.annotator, lab.choice, lab.flipped, lab.reason) for lab in labels] == [
        (0, "x", "b", True, "A is better"),
        (1, "y", "tie", False, ""),
        (2, "x", "skip", False, ""),
    ]
    assert all(lab.grade is None and lab.both_bad is False for lab in labels)  # ungraded, as they were given
    assert store.vote_counts() == (4, 2) and store.overlap == 1
    # The old labels export exactly as before grades: hard targets, no margin.
    old = comparisons(store)
    assert [(c.ranking, c.tie, c.meta["target"], c.meta["margin"], c.meta["grade"]) for c in old] == [
        ([1, 0], False, 1.0, 0.0, None),
        ([0, 1], True, 0.5, 0.0, "tie"),
    ]
    # The lease survived: y's pair comes back in the same order, and takes a graded vote.
    y = 2
    held = store.next_assignment(y)
    assert (held.item_index, held.flipped) == (3, True)
    store.submit(y, held.pair_id, "a", grade="slightly_better", both_bad=True)  # left = response_b
    assert (store.labels()[-1].choice, store.labels()[-1].grade, store.labels()[-1].both_bad) == ("b", "slightly_better", True)
    store.close()

    with sqlite3.connect(db) as con:
        assert con.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone() == (SCHEMA_VERSION,) == ("4",)
        columns = [row[1] for row in con.execute("PRAGMA table_info(labels)")]
        assert columns[-3:] == ["grade", "both_bad", "shown"]  # shown: schema 4
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # the migrated table has the new constraints
            con.execute("UPDATE labels SET grade = 'better' WHERE choice = 'tie'")
    reopened = AnnotationStore(db, create=False)  # opening again changes nothing
    assert len(reopened.labels()) == 4 and reopened.labels()[0].reason == "A is better"
    reopened.close()
    out = tmp_path / "old.jsonl"
    export(ExportConfig(db=str(db), output=str(out)))
    assert [(r["meta"]["item_index"], r["meta"]["target"], r["meta"]["both_bad"]) for r in read_jsonl(out)] == [
        (0, 1.0, False),
        (1, 0.5, False),
        (3, 0.7, True),
    ]


def test_a_database_from_a_newer_rlhfkit_is_refused(tmp_path):
    db = version_1_database(tmp_path / "new.sqlite")
    with sqlite3.connect(db) as con:
        con.execute("UPDATE settings SET value = '5' WHERE key = 'schema'")
    with pytest.raises(ValueError, match=r"new.sqlite: annotation schema 5, this rlhfkit reads 4"):
        AnnotationStore(db, create=False)


# ----------------------------------------------------------------------------- export and the soft target


def graded_store(path: Path) -> AnnotationStore:
    """Overlap 2, annotators x and y, three pairs: 0 slightly a (both), 1 much b and both bad (both), 2 split."""
    store = new_store(path, 3, overlap=2)
    x, y = annotator(store, "x"), annotator(store, "y")
    for who in (x, y):
        vote(store, who, "a", "slightly_better")
        vote(store, who, "b", "much_better", both_bad=True)
    vote(store, x, "a", "better")
    vote(store, y, "b", "slightly_better", both_bad=True)
    return store


def test_export_carries_grade_both_bad_target_and_margin(tmp_path, capsys):
    graded_store(tmp_path / "labels.sqlite").close()
    db = str(tmp_path / "labels.sqlite")
    assert export(ExportConfig(db=db, output=str(tmp_path / "all.jsonl"))) == (3, 0)
    records = read_jsonl(tmp_path / "all.jsonl")
    meta = [r["meta"] for r in records]
    assert [(r["ranking"], r["tie"]) for r in records] == [([0, 1], False), ([1, 0], False), ([0, 1], True)]
    assert [m["grade"] for m in meta] == ["a_slightly_better", "b_much_better", "mixed"]
    # Pair 2: a better (P(a) 0.9) and b slightly better (P(a) 0.3): P(a) = 0.6, a split, no margin.
    assert [(m["target"], m["margin"]) for m in meta] == [(0.7, 0.25), (1.0, 1.0), (0.6, 0.0)]
    assert [(m["both_bad"], m["both_bad_votes"]) for m in meta] == [(False, 0), (True, 2), (False, 1)]  # 1 of 2 is no majority
    assert [(v["annotator"], v["grade"], v["both_bad"]) for v in meta[2]["labels"]] == [
        ("x", "a_better", False),
        ("y", "b_slightly_better", True),
    ]
    # Every format keeps meta; the loaded records carry the soft target for training.
    for fmt, name in (("seed", "seed.jsonl"), ("jsonl", "all.parquet")):
        export(ExportConfig(db=db, output=str(tmp_path / name), format=fmt))
        assert [soft_target(c) for c in load_comparisons(tmp_path / name)] == [0.7, 1.0, 0.6]
    # "Both bad" pairs are kept by default, and counted; --drop-both-bad leaves them out.
    assert cli.main(["annotate", "export", "--db", db, str(tmp_path / "kept.jsonl")]) == 0
    assert "3 records" in (err := capsys.readouterr().err) and "1 both-bad pair(s) kept, marked meta.both_bad" in err
    assert cli.main(["annotate", "export", "--db", db, "--drop-both-bad", str(tmp_path / "dropped.jsonl")]) == 0
    assert "2 records" in (err := capsys.readouterr().err) and "1 both-bad pair(s) left out (--drop-both-bad)" in err
    assert [r["meta"]["item_index"] for r in read_jsonl(tmp_path / "dropped.jsonl")] == [0, 2]
    result = export(ExportConfig(db=db, output=str(tmp_path / "trl.jsonl"), format="trl", drop_both_bad=True))
    assert (result.written, result.left_out, result.both_bad) == (1, 1, 1)


def test_a_soft_target_reaches_the_reward_loss(tmp_path, tokenizer, monkeypatch):
    graded_store(tmp_path / "labels.sqlite").close()
    export(ExportConfig(db=str(tmp_path / "labels.sqlite"), output=str(tmp_path / "labels.jsonl")))
    labels = load_comparisons(tmp_path / "labels.jsonl")
    pairs, stats = tokenize_pairs(tokenizer, labels[:2], max_length=64, keep_ties=False)
    # Pair 0 ("A slightly better" twice): target 0.7 instead of 1.0, margin 0.25. Pair 1 ("B much better",
    # both bad): kept for training like any other pair, with its grade: target 1.0, margin 1.0.
    assert [(p["target"], p["margin"]) for p in pairs] == [(0.7, 0.25), (1.0, 1.0)] and stats.pairs == 2
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["target"].tolist() == pytest.approx([0.7, 1.0])

    # The reward model scores each chosen response ln 3 above its rejected one: sigmoid(ln 3) = 3/4.
    scores = torch.tensor([math.log(3), math.log(3), 0.0, 0.0])  # rows: chosen, chosen, rejected, rejected
    monkeypatch.setattr("rlhfkit.reward.sequence_scores", lambda model, batch: scores)
    loss, _ = RewardTask(margin=0.0).loss(None, batch)
    # Pair 0, a soft target: -(0.7 ln 3/4 + 0.3 ln 1/4) (the margin is for strict targets only).
    # Pair 1, a strict target with margin 1: -ln sigmoid(ln 3 - 1) = ln(1 + e / 3).
    by_hand = 0.7 * math.log(4 / 3) + 0.3 * math.log(4) + math.log(1 + math.e / 3)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # The hard target it replaced would have given -ln 3/4 for pair 0.
    hard = preference_loss(scores[:1], scores[2:3], torch.tensor([1.0]), torch.tensor([0.25]))
    assert hard.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(math.log(3) - 0.25)))), rel=1e-6)


def test_soft_targets_apply_to_pairs_only_and_are_checked(tokenizer):
    ranking = Comparison("Greet me.", ["Hello!", "Hi.", "Go away."], [0, 1, 2], meta={"target": 0.7})
    tie = Comparison("Say hi.", ["Hi!", "Hello!"], [0, 1], tie=True, meta={"target": 0.6})
    plain = Comparison("Two plus two?", ["Four.", "Five."], [0, 1])
    pairs, _ = tokenize_pairs(tokenizer, [ranking, tie, plain], max_length=64)
    assert [p["target"] for p in pairs] == [1.0, 1.0, 1.0, 0.6, 1.0]  # a ranking keeps its hard targets
    for bad in (1.5, -0.1, "0.7", True, float("nan")):
        broken = Comparison("Q?", ["x", "y"], [0, 1], source="human-web:x", meta={"target": bad})
        with pytest.raises(ValueError, match=r"comparison 1 \(human-web:x\): meta.target must be a number in \[0, 1\]"):
            tokenize_pairs(tokenizer, [plain, broken], max_length=64)


# ----------------------------------------------------------------------------- over HTTP


@pytest.fixture
def served(tmp_path):
    store = AnnotationStore(tmp_path / "labels.sqlite")
    store.add_pairs(read_pairs(make_pairs(tmp_path / "pairs.jsonl", 4))[0])
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob")}
    guidelines = "# Rules\n\nPrefer **correct** answers. <script>alert(1)</script>"
    app = create_app(store, guidelines=guidelines, criteria=["helpful", " harmless ", "", "honest"])
    thread = ServerThread(app, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{thread.port}", store, tokens, guidelines
    finally:
        thread.stop()
        store.close()


def test_grade_api_new_and_old_clients(served):
    url, store, tokens, _ = served
    alice = Client(url, tokens["alice"])
    pair = alice.post("/api/next")[1]["assignment"]["pair_id"]
    for body, message in (
        ({"choice": "a", "grade": "huge"}, "much_better"),
        ({"choice": "tie", "grade": "better"}, "goes with choice a or b"),
        ({"choice": "skip", "both_bad": True}, "a skip is not one"),
    ):
        status, data = alice.post("/api/label", {"pair_id": pair, **body})
        assert status == 422 and message in str(data["detail"]), (body, data)
    status, data = alice.post("/api/label", {"pair_id": pair, "choice": "b", "grade": "much_better", "both_bad": True})
    assert status == 200 and not data["duplicate"]
    retry = alice.post("/api/label", {"pair_id": pair, "choice": "b", "grade": "much_better", "both_bad": True})
    assert retry[0] == 200 and retry[1]["duplicate"]
    assert alice.post("/api/label", {"pair_id": pair, "choice": "b", "grade": "better", "both_bad": True})[0] == 409
    # An older client sends only the choice: an ungraded vote.
    second = data["assignment"]["pair_id"]
    assert alice.post("/api/label", {"pair_id": second, "choice": "a", "reason": "old page"})[0] == 200
    first, old = store.labels()
    assert (first.grade, first.both_bad, old.grade, old.both_bad) == ("much_better", True, None, False)
    assert first.choice == ("a" if first.flipped else "b")  # "B" as shown, stored in the pairs file's order
    status, data = alice.post("/api/undo")
    assert data["undone"] == {"pair_id": second, "choice": "a", "reason": "old page", "grade": None, "both_bad": False}
    status, data = alice.post("/api/undo")  # the graded label comes back as it was pressed
    assert data["undone"] == {"pair_id": pair, "choice": "b", "reason": "", "grade": "much_better", "both_bad": True}
    assert store.labels() == []
    alice.close()


def test_task_endpoint_gives_guidelines_and_criteria_to_annotators_only(served):
    url, _, tokens, guidelines = served
    assert Client(url, None).post("/api/task")[0] == 401
    assert Client(url, "not-a-token").post("/api/task")[0] == 401
    status, data = Client(url, tokens["bob"]).post("/api/task")
    assert status == 200 and data == {"guidelines": guidelines, "criteria": ["helpful", "harmless", "honest"], "mode": "pairs"}
    assert Client(url, tokens["bob"]).post("/api/task", headers={"Origin": "http://evil.example"})[0] == 403


def test_serve_with_guidelines_and_criteria(tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("\ufeff# Guidelines\n\nBe *fair*.\n", encoding="utf-8")  # a BOM from an editor is dropped
    db = tmp_path / "labels.sqlite"
    store = AnnotationStore(db)
    token = store.add_annotator("alice")
    store.close()
    process = ServerProcess(
        db,
        make_pairs(tmp_path / "pairs.jsonl", 2),
        extra_args=["--guidelines", str(guide), "--criterion", "helpful", "--criterion", "harmless: no dangerous advice"],
    )
    try:
        status, data = Client(process.url, token).post("/api/task")
    finally:
        process.stop()
    assert status == 200
    assert data == {
        "guidelines": "# Guidelines\n\nBe *fair*.\n",
        "criteria": ["helpful", "harmless: no dangerous advice"],
        "mode": "pairs",
    }
    assert f"guidelines: {guide}; criteria: helpful, harmless: no dangerous advice" in process.log.read_text()


def test_a_missing_or_unreadable_guidelines_file_is_an_error_naming_it(tmp_path, capsys):
    pairs = make_pairs(tmp_path / "pairs.jsonl", 2)
    (tmp_path / "binary.md").write_bytes(b"# Rules\n\xff\xfe")
    (tmp_path / "folder.md").mkdir()
    for name, why in (("missing.md", "no such file"), ("binary.md", "not UTF-8 text"), ("folder.md", "is a directory")):
        path = tmp_path / name
        db = tmp_path / f"{name}.sqlite"
        argv = ["annotate", "serve", "--db", str(db), "--pairs", str(pairs), "--port", "0", "--guidelines", str(path)]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"rlhfkit annotate serve: error: guidelines file {path}: {why}" in err, err
        assert not db.exists()  # refused before the database is created
    with pytest.raises(ValueError, match="guidelines file"):
        read_guidelines(tmp_path / "missing.md")
