"""The web annotator's logic without a browser: kappas by hand, the SQLite store's assignment
rules (overlap, leases, A/B order, undo, retries), majority export round trips, status,
the `rlhfkit annotate` CLI, and the label stage with source human-web."""

from __future__ import annotations

import io
import math
import sqlite3
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from rlhfkit import cli
from rlhfkit.data.io import DataError
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.feedback.agreement import category_counts, cohen_kappa, fleiss_kappa
from rlhfkit.feedback.web.admin import ExportConfig, comparisons, export, majority, status
from rlhfkit.feedback.web.pairs import read_pairs
from rlhfkit.feedback.web.store import AnnotationStore, PairItem, StoreError, to_shown
from rlhfkit.label import LabelConfig
from rlhfkit.label import run as run_label
from tests.annotate_client import make_pairs
from tests.helpers import read_jsonl, write_jsonl


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_store(tmp_path: Path, n_pairs: int, *, overlap: int = 1, lease_seconds: float = 60.0, clock=None) -> AnnotationStore:
    store = AnnotationStore(tmp_path / "labels.sqlite", clock=clock or FakeClock())
    store.configure(overlap=overlap, lease_seconds=lease_seconds)
    store.add_pairs([PairItem(i, f"Question {i}?", (f"first {i}", f"second {i}")) for i in range(n_pairs)])
    return store


def annotator(store: AnnotationStore, name: str) -> int:
    return store.annotator_for_token(store.add_annotator(name)).id


def vote(store: AnnotationStore, who: int, canonical: str, reason: str = "") -> int:
    """Label the caller's current pair so that the stored (canonical) choice is ``canonical``."""
    assignment = store.next_assignment(who)
    store.submit(who, assignment.pair_id, to_shown(canonical, flipped=assignment.flipped), reason)
    return assignment.pair_id


# ----------------------------------------------------------------------------- kappas, by hand


def test_fleiss_kappa_wikipedia_example():
    # Fleiss' worked example (Wikipedia, "Fleiss' kappa"): 10 subjects, 14 raters, 5 categories.
    counts = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    # By hand: row sums of squares 196+60+70+94+74+98+58+46+66+66 = 828, so
    # P_o = (828 - 10*14) / (10*14*13) = 688/1820; column totals 20, 28, 39, 21, 32 of 140, so
    # P_e = (400 + 784 + 1521 + 441 + 1024) / 140**2 = 4170/19600.
    p_o, p_e = Fraction(688, 1820), Fraction(4170, 19600)
    expected = (p_o - p_e) / (1 - p_e)
    assert fleiss_kappa(counts) == pytest.approx(float(expected), abs=1e-12)
    assert fleiss_kappa(counts) == pytest.approx(0.2099, abs=1e-4)  # Wikipedia's 0.210


def test_cohen_kappa_by_hand():
    # Wikipedia's example: 50 items; yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    # P_o = 35/50 = 0.7; P_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2 / 0.5.
    assert cohen_kappa(first, second) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == pytest.approx(1.0)
    # Perfect disagreement on two categories used equally: P_o = 0, P_e = 0.5 -> -1.
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))  # P_e = 1: undefined
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["a"], ["a", "b"])


def test_fleiss_kappa_checks_its_input():
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[2, 0], [1, 2]])
    with pytest.raises(ValueError, match="at least 2"):
        fleiss_kappa([[1, 0]])
    assert category_counts([["a", "a", "tie"], ["b", "b", "b"]], ["a", "b", "tie"]) == [[2, 0, 1], [0, 3, 0]]


def test_majority():
    assert majority(["a", "a", "b"]) == "a"
    assert majority(["tie", "tie", "b"]) == "tie"
    assert majority(["a", "b"]) == "split"
    assert majority(["a", "b", "tie"]) == "split"
    assert majority(["b"]) == "b"


# ----------------------------------------------------------------------------- assignment


def test_overlap_k_distinct_annotators_and_never_twice(tmp_path):
    store = new_store(tmp_path, 2, overlap=2)
    x, y, z = (annotator(store, n) for n in ("x", "y", "z"))
    assert store.next_assignment(x).pair_id == 1
    assert store.next_assignment(y).pair_id == 1  # the second slot of pair 1
    assert store.next_assignment(z).pair_id == 2  # pair 1's two slots are leased
    assert store.next_assignment(x).pair_id == 1  # reopening: the same pair
    vote(store, x, "a")
    assert store.next_assignment(x).pair_id == 2  # never pair 1 again
    vote(store, x, "b")
    assert store.next_assignment(x) is None
    vote(store, y, "a")
    vote(store, z, "tie")
    assert store.next_assignment(y) is None and store.next_assignment(z) is None  # both pairs have 2 votes
    assert store.vote_counts() == (2, 2)
    progress = store.progress(y)
    assert (progress.labelled, progress.remaining, progress.pairs_complete, progress.overlap) == (1, 0, 2, 2)


def test_skip_is_not_a_vote_and_goes_to_someone_else(tmp_path):
    store = new_store(tmp_path, 1, overlap=1)
    x, y = annotator(store, "x"), annotator(store, "y")
    vote(store, x, "skip")
    assert store.next_assignment(x) is None  # x skipped it: never shown to x again
    assert store.vote_counts() == (1, 0)
    assert store.next_assignment(y).pair_id == 1
    assert store.progress(x).skipped == 1


def test_leases_expire_and_late_labels_are_kept(tmp_path):
    clock = FakeClock()
    store = new_store(tmp_path, 2, overlap=1, lease_seconds=60, clock=clock)
    x, y, z = (annotator(store, n) for n in ("x", "y", "z"))
    assert store.next_assignment(x).pair_id == 1  # x opens pair 1, then closes the tab
    assert store.next_assignment(y).pair_id == 2
    clock.now += 30
    assert store.next_assignment(z) is None  # both pairs leased
    clock.now += 31  # x's and y's leases have expired
    assert store.next_assignment(y).pair_id == 2  # y comes back in time: slot still free, lease renewed
    assert store.next_assignment(z).pair_id == 1  # x's closed tab did not lose pair 1
    # x submits late from the old tab: human work is kept, pair 1 ends with 2 votes.
    store.submit(x, 1, "a")
    assert [(lab.annotator, lab.item_index) for lab in store.labels()] == [("x", 0)]
    # Once x's lease row is gone (x reloaded after z took the slot), a stale submit is refused.
    store2 = new_store(tmp_path / "b", 1, overlap=1, lease_seconds=60, clock=clock)
    p, q = annotator(store2, "p"), annotator(store2, "q")
    store2.next_assignment(p)
    clock.now += 61
    store2.next_assignment(q)
    assert store2.next_assignment(p) is None  # p's expired lease is dropped: q holds the only slot
    with pytest.raises(StoreError) as refused:
        store2.submit(p, 1, "a")
    assert refused.value.status == 403


def test_order_is_random_per_annotator_recorded_and_stored_canonically(tmp_path):
    store = new_store(tmp_path, 40, overlap=1)
    who = annotator(store, "x")
    seen = []
    for _ in range(40):
        assignment = store.next_assignment(who)
        response_a = f"first {assignment.item_index}"
        assert assignment.flipped == (assignment.right == response_a)  # flipped: response_a shown on the right
        seen.append(assignment.flipped)
        store.submit(who, assignment.pair_id, "a")  # always the LEFT response
    assert 0 < sum(seen) < 40  # both orders occur (chance of failing: 2**-39)
    with sqlite3.connect(tmp_path / "labels.sqlite") as con:
        rows = con.execute("SELECT choice, flipped FROM labels ORDER BY id").fetchall()
    # "left" is response_b exactly when the pair was flipped.
    assert rows == [("b" if f else "a", int(f)) for f in seen]


def test_retry_is_acknowledged_once_and_a_changed_label_needs_undo(tmp_path):
    store = new_store(tmp_path, 3, overlap=1)
    x = annotator(store, "x")
    first = store.next_assignment(x)
    label_id, duplicate, nxt = store.submit(x, first.pair_id, "b", "why")
    again_id, again_duplicate, again_next = store.submit(x, first.pair_id, "b", "why")  # response lost, resent
    assert (duplicate, again_duplicate, again_id) == (False, True, label_id)
    assert again_next.pair_id == nxt.pair_id
    assert len(store.labels()) == 1
    with pytest.raises(StoreError) as conflict:
        store.submit(x, first.pair_id, "a", "why")
    assert conflict.value.status == 409
    with pytest.raises(StoreError) as bad:
        store.submit(x, nxt.pair_id, "maybe")
    assert bad.value.status == 422


def test_undo_restores_the_pair_in_the_same_order_and_only_for_its_owner(tmp_path):
    store = new_store(tmp_path, 3, overlap=1)
    x, y = annotator(store, "x"), annotator(store, "y")
    first = store.next_assignment(x)
    store.submit(x, first.pair_id, "a", "clearer")
    on_screen = store.next_assignment(x)
    assert store.next_assignment(y).pair_id not in (first.pair_id, on_screen.pair_id)
    with pytest.raises(StoreError) as nothing:
        store.undo(y)  # y has no labels: x's cannot be reached
    assert nothing.value.status == 409
    with pytest.raises(StoreError) as not_yours:
        store.submit(y, first.pair_id, "b")
    assert not_yours.value.status == 403
    undone, back = store.undo(x)
    # x pressed the left response: canonically response_b when the pair was shown flipped.
    assert (undone.pair_id, undone.choice, undone.reason) == (first.pair_id, "b" if first.flipped else "a", "clearer")
    assert (back.pair_id, back.left, back.right) == (first.pair_id, first.left, first.right)
    assert store.labels() == [] and store.vote_counts() == (3, 0)
    # The pair x was looking at went back to the pool.
    z = annotator(store, "z")
    assert store.next_assignment(z).pair_id == on_screen.pair_id


def test_pairs_load_idempotently_and_annotator_rules(tmp_path):
    store = new_store(tmp_path, 2)
    assert store.add_pairs([PairItem(0, "Question 0?", ("first 0", "second 0")), PairItem(2, "New?", ("p", "q"))]) == 1
    with pytest.raises(ValueError, match="item 1 is already stored with a different"):
        store.add_pairs([PairItem(1, "Changed?", ("first 1", "second 1"))])
    token = store.add_annotator("alice")
    with pytest.raises(ValueError, match="already exists"):
        store.add_annotator("alice")
    new_token = store.add_annotator("alice", replace_token=True)
    assert store.annotator_for_token(token) is None and store.annotator_for_token(new_token).name == "alice"
    for bad in ("", "a b", "<script>", "x" * 65):
        with pytest.raises(ValueError, match="annotator name"):
            store.add_annotator(bad)
    with sqlite3.connect(tmp_path / "labels.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        stored = [t for (t,) in con.execute("SELECT token_sha256 FROM annotators")]
    assert new_token not in stored  # only hashes are kept
    with pytest.raises(FileNotFoundError):
        AnnotationStore(tmp_path / "missing.sqlite", create=False)


def test_read_pairs_formats_and_errors(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}]
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt_index": 0, "prompt": "Q0?", "responses": ["x0", "y0"], "temperatures": [0.7, 1.2]},
            {"prompt": chat, "response_a": "Blue.", "response_b": "Red.", "preferred": "a"},
            {"prompt": "Q2?", "responses": ["", "y2"]},
        ],
    )
    items, empty = read_pairs(path)
    assert items == [PairItem(0, "Q0?", ("x0", "y0")), PairItem(1, chat, ("Blue.", "Red."))]
    assert empty == 1
    write_jsonl(path, [{"prompt": "Q?", "responses": ["a", "b"]}, {"prompt": "Q?", "responses": ["a", "b", "c"]}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'responses': the web annotator compares pairs; got 3"):
        read_pairs(path)
    write_jsonl(path, [{"prompt": [{"role": "robot", "content": "hi"}], "responses": ["a", "b"]}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'prompt\[0\].role'"):
        read_pairs(path)


# ----------------------------------------------------------------------------- export and status

# Canonical votes of x, y, z on pairs 0..3; every annotator skips pair 4.
VOTES = {"x": ["a", "b", "a", "tie"], "y": ["a", "b", "b", "tie"], "z": ["b", "b", "tie", "a"]}


def voted_store(tmp_path: Path, clock: FakeClock) -> AnnotationStore:
    store = new_store(tmp_path, 5, overlap=3, clock=clock)
    ids = {name: annotator(store, name) for name in VOTES}
    for item in range(4):
        for name, choices in VOTES.items():
            clock.now += 10
            vote(store, ids[name], choices[item], reason=f"{name} on {item}" if name == "z" else "")
    for name in VOTES:
        vote(store, ids[name], "skip")
    return store


def test_majority_export_round_trips_in_every_format(tmp_path):
    store = voted_store(tmp_path, FakeClock())
    labels = comparisons(store)
    assert [c.meta["item_index"] for c in labels] == [0, 1, 2, 3]  # pair 4: skips only, no vote
    assert [(c.ranking, c.tie, c.meta["majority"]) for c in labels] == [
        ([0, 1], False, "a"),
        ([1, 0], False, "b"),
        ([0, 1], True, "split"),
        ([0, 1], True, "tie"),
    ]
    assert [c.meta["votes"] for c in labels] == [
        {"a": 2, "b": 1, "tie": 0},
        {"a": 0, "b": 3, "tie": 0},
        {"a": 1, "b": 1, "tie": 1},
        {"a": 1, "b": 0, "tie": 2},
    ]
    assert labels[0].meta["agreement"] == pytest.approx(2 / 3) and labels[1].meta["agreement"] == 1.0
    z_swapped = labels[0].meta["labels"][2]["shown"] == "ba"  # the A/B order is drawn at random
    note = " (shown swapped: screen A = response_b)" if z_swapped else ""
    assert labels[0].reason == f"z{note}: z on 0" and labels[0].source == "human-web:x,y,z"
    assert {entry["shown"] for c in labels for entry in c.meta["labels"]} <= {"ab", "ba"}
    assert all(
        entry["reason_sides"]
        == (
            "screen A = response_b, screen B = response_a"
            if entry["shown"] == "ba"
            else "screen A = response_a, screen B = response_b"
        )
        for c in labels
        for entry in c.meta["labels"]
    )
    store.close()

    db = str(tmp_path / "labels.sqlite")
    assert export(ExportConfig(db=db, output=str(tmp_path / "all.jsonl"))) == (4, 0)
    assert load_comparisons(tmp_path / "all.jsonl") == labels  # exact round trip, meta included

    assert export(ExportConfig(db=db, output=str(tmp_path / "seed.jsonl"), format="seed")) == (4, 0)
    seed = read_jsonl(tmp_path / "seed.jsonl")
    assert [r["preferred"] for r in seed] == ["a", "b", "tie", "tie"]
    assert seed[2]["meta"]["majority"] == "split"  # a disagreement stays visible
    assert [c.tie for c in load_comparisons(tmp_path / "seed.jsonl")] == [False, False, True, True]

    assert export(ExportConfig(db=db, output=str(tmp_path / "trl.jsonl"), format="trl")) == (2, 2)
    trl = read_jsonl(tmp_path / "trl.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in trl] == [("first 0", "second 0"), ("second 1", "first 1")]
    assert [c.chosen for c in load_comparisons(tmp_path / "trl.jsonl")] == ["first 0", "second 1"]

    assert export(ExportConfig(db=db, output=str(tmp_path / "none.jsonl"), min_votes=4)) == (0, 0)


def test_export_refuses_an_extension_it_does_not_write(tmp_path, capsys):
    voted_store(tmp_path, FakeClock()).close()
    db = str(tmp_path / "labels.sqlite")
    for name in ("labels.csv", "labels.txt", "labels", "labels.JSONL", "labels.jsonl.gz"):
        output = tmp_path / name
        with pytest.raises(ValueError, match=r"export writes \.jsonl .*\.json .*\.parquet") as caught:
            export(ExportConfig(db=db, output=str(output)))
        assert str(output) in str(caught.value)
        assert not output.exists()
        assert cli.main(["annotate", "export", "--db", db, "--format", "seed", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"rlhfkit annotate export: error: {output}: " in err and ".jsonl" in err and ".parquet" in err
        assert not output.exists()
    for name in ("ok.jsonl", "ok.json", "ok.parquet"):
        assert export(ExportConfig(db=db, output=str(tmp_path / name))) == (4, 0)
    assert load_comparisons(tmp_path / "ok.parquet") == load_comparisons(tmp_path / "ok.json")


def test_a_reason_given_on_a_swapped_pair_says_which_side_it_meant(tmp_path, monkeypatch):
    store = new_store(tmp_path, 3)
    alice = annotator(store, "alice")
    # The A/B order is drawn with secrets.randbelow(2) (1: swapped): pair 0 swapped, pairs 1 and 2 not.
    draws = iter([1, 0, 0])
    monkeypatch.setattr("rlhfkit.feedback.web.store.secrets.randbelow", lambda n: next(draws))
    for reason in ("A is better", "A is better", ""):
        assignment = store.next_assignment(alice)
        store.submit(alice, assignment.pair_id, "a", reason)  # pressed "A is better": the left response
    labels = comparisons(store)
    store.close()
    swapped, plain, no_reason = labels
    # Pair 0 was shown swapped: the left response, screen A, was response_b ("second 0").
    assert swapped.ranking == [1, 0] and swapped.chosen == "second 0"
    assert swapped.reason == "alice (shown swapped: screen A = response_b): A is better"
    [entry] = swapped.meta["labels"]
    assert entry == {
        "annotator": "alice",
        "choice": "b",
        "reason": "A is better",  # the annotator's words, verbatim
        "shown": "ba",
        "reason_sides": "screen A = response_b, screen B = response_a",
        "grade": None,  # sent without a strength: an ungraded vote
        "both_bad": False,
    }
    assert plain.ranking == [0, 1] and plain.reason == "alice: A is better"
    assert plain.meta["labels"][0]["reason_sides"] == "screen A = response_a, screen B = response_b"
    assert no_reason.reason == "" and no_reason.meta["labels"][0]["shown"] == "ab"

    db = str(tmp_path / "labels.sqlite")
    for fmt in ("jsonl", "seed"):
        export(ExportConfig(db=db, output=str(tmp_path / f"{fmt}.jsonl"), format=fmt))
        first = read_jsonl(tmp_path / f"{fmt}.jsonl")[0]
        assert first["reason"] == "alice (shown swapped: screen A = response_b): A is better"
        assert first["meta"]["labels"][0]["reason_sides"] == "screen A = response_b, screen B = response_a"
    assert read_jsonl(tmp_path / "seed.jsonl")[0]["preferred"] == "b"


def test_closing_the_store_checkpoints_the_wal_into_the_database_file(tmp_path):
    store = new_store(tmp_path, 4)
    other = sqlite3.connect(tmp_path / "labels.sqlite")  # another reader: SQLite would not checkpoint on close itself
    other.execute("SELECT COUNT(*) FROM pairs").fetchone()
    alice = annotator(store, "alice")
    for _ in range(3):
        vote(store, alice, "a")
    assert (tmp_path / "labels.sqlite-wal").stat().st_size > 0
    store.close()
    store.close()  # twice is harmless
    assert (tmp_path / "labels.sqlite-wal").stat().st_size == 0
    other.close()
    backup = tmp_path / "copy.sqlite"
    backup.write_bytes((tmp_path / "labels.sqlite").read_bytes())
    with sqlite3.connect(backup) as con:
        assert con.execute("SELECT COUNT(*) FROM labels").fetchone() == (3,)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_status_agreement_and_throughput_by_hand(tmp_path):
    clock = FakeClock()
    voted_store(tmp_path, clock).close()
    report = status(tmp_path / "labels.sqlite", now=clock.now)
    assert (report.pairs, report.complete, report.overlap, report.votes) == (5, 4, 3, 12)
    # Counts (a, b, tie): [2,1,0], [0,3,0], [1,1,1], [1,0,2]. P_i = 1/3, 1, 0, 1/3 -> P_o = 5/12;
    # totals a 4, b 5, tie 3 of 12 -> P_e = 50/144; kappa = (5/12 - 50/144) / (1 - 50/144) = 5/47.
    assert report.fleiss == pytest.approx(5 / 47) and report.fleiss_pairs == 4
    # x/y agree on 3 of 4 (P_o 3/4), P_e = (2*1 + 1*2 + 1*1)/16 -> 7/11; x/z: P_o 1/4, P_e 5/16 -> -1/11;
    # y/z: P_o 1/4, P_e (1 + 4 + 1)/16 -> -1/5.
    assert [(a, b, n) for a, b, _, n in report.cohen] == [("x", "y", 4), ("x", "z", 4), ("y", "z", 4)]
    assert [k for *_, k, _ in report.cohen] == pytest.approx([7 / 11, -1 / 11, -1 / 5])
    # Labels every 10 s by the clock, three annotators in turn: 30 s between one annotator's labels.
    x = report.annotators[0]
    assert (x.name, x.votes, x.skips, x.last_hour, x.seconds_per_label) == ("x", 4, 1, 5, 30.0)


# ----------------------------------------------------------------------------- the CLI


def test_annotate_cli_add_annotator_status_export(tmp_path, capsys):
    db = tmp_path / "labels.sqlite"
    voted_store(tmp_path, FakeClock()).close()
    assert cli.main(["annotate", "add-annotator", "dora", "--db", str(db)]) == 0
    token = capsys.readouterr().out.strip()
    store = AnnotationStore(db)
    assert store.annotator_for_token(token).name == "dora"
    store.close()
    assert cli.main(["annotate", "add-annotator", "dora", "--db", str(db)]) == 2
    assert "already exists" in capsys.readouterr().err

    assert cli.main(["annotate", "status", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "pairs: 4/5 complete (3 vote(s) each); 12 votes in all" in out
    assert "Fleiss' kappa: 0.106 over 4 pair(s)" in out and "Cohen's kappa x / y: 0.636 over 4 shared pair(s)" in out
    assert "dora" in out

    assert cli.main(["annotate", "export", "--db", str(db), "--format", "trl", str(tmp_path / "t.jsonl")]) == 0
    assert "2 records" in capsys.readouterr().err and len(read_jsonl(tmp_path / "t.jsonl")) == 2
    assert cli.main(["annotate", "status", "--db", str(tmp_path / "nope.sqlite")]) == 2


@pytest.mark.parametrize("form", [["terminal"], []])
def test_terminal_annotator_keeps_its_command(tmp_path, monkeypatch, form):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "Q?", "responses": ["x", "y"]}])
    monkeypatch.setattr(sys, "stdin", io.StringIO("b\nshorter\n"))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli.main(["annotate", *form, str(samples), str(tmp_path / "out.jsonl"), "--annotator", "eve"]) == 0
    assert [(r["ranking"], r["reason"], r["source"]) for r in read_jsonl(tmp_path / "out.jsonl")] == [
        ([1, 0], "shorter", "human:eve")
    ]


# ----------------------------------------------------------------------------- the label stage


def test_label_stage_waits_for_web_labels_then_writes_them(tmp_path):
    samples = make_pairs(tmp_path / "samples.jsonl", 3)
    config = LabelConfig(
        samples=str(samples),
        output=str(tmp_path / "label" / "labels.jsonl"),
        source="human-web",
        web_db=str(tmp_path / "web.sqlite"),
        overlap=2,
        web_serve=False,
        poll_seconds=0.02,
        wait_timeout=60,
    )
    result: dict = {}
    stage = threading.Thread(target=lambda: result.setdefault("labels", run_label(config)))
    stage.start()
    while "loaded" not in result:
        assert stage.is_alive()
        time.sleep(0.01)
        if (tmp_path / "web.sqlite").exists():
            probe = AnnotationStore(tmp_path / "web.sqlite", create=False)
            if probe.vote_counts()[0] == 3:
                result["loaded"] = True
            probe.close()
    store = AnnotationStore(tmp_path / "web.sqlite")  # the team labels while the stage waits
    x, y = annotator(store, "x"), annotator(store, "y")
    for choice in ("a", "b", "tie"):
        vote(store, x, choice)
    assert stage.is_alive()  # 3 of 6 votes: still waiting
    for choice in ("a", "a", "tie"):
        vote(store, y, choice)
    stage.join(30)
    assert not stage.is_alive()
    labels = load_comparisons(config.output)
    assert labels == result["labels"]
    assert [(c.meta["item_index"], c.meta["majority"]) for c in labels] == [(0, "a"), (1, "split"), (2, "tie")]


def test_label_stage_times_out_and_keeps_the_db(tmp_path):
    config = LabelConfig(
        samples=str(make_pairs(tmp_path / "s.jsonl", 2)),
        output=str(tmp_path / "labels.jsonl"),
        source="human-web",
        web_db=str(tmp_path / "web.sqlite"),
        web_serve=False,
        poll_seconds=0.01,
        wait_timeout=0.1,
    )
    with pytest.raises(TimeoutError, match="0/2 pairs have their 1 vote"):
        run_label(config)
    assert not Path(config.output).exists()
    assert AnnotationStore(tmp_path / "web.sqlite").vote_counts() == (2, 0)


def pre_labelled_db(tmp_path: Path, samples: Path, choices: list[str], *, overlap: int = 1) -> Path:
    """A web db holding ``samples``' pairs, one annotator ``x`` who answered ``choices`` in pair order."""
    db = tmp_path / "web.sqlite"
    store = AnnotationStore(db)
    store.configure(overlap=overlap)
    store.add_pairs(read_pairs(samples)[0])
    x = annotator(store, "x")
    for choice in choices:
        vote(store, x, choice)
    store.close()
    return db


def test_a_pair_every_annotator_voted_on_or_skipped_is_settled(tmp_path):
    store = new_store(tmp_path, 3, overlap=2)
    assert store.settlement().waiting == (0, 1, 2) and store.settlement().exhausted == ()  # nobody registered yet
    x, y = annotator(store, "x"), annotator(store, "y")
    for choice in ("a", "b", "skip"):
        vote(store, x, choice)
    for choice in ("a", "skip", "skip"):
        vote(store, y, choice)
    # Pair 0 has its 2 votes; pair 1 (1 vote) and pair 2 (none) were seen by both: nobody is left to ask.
    assert store.next_assignment(x) is None and store.next_assignment(y) is None
    settled = store.settlement()
    assert (settled.pairs, settled.complete, settled.exhausted, settled.waiting) == (3, 1, (1, 2), ())
    assert store.vote_counts() == (3, 1)  # "complete" still means overlap votes
    annotator(store, "z")  # a new annotator can still vote on them: they wait again
    assert store.settlement().exhausted == () and store.settlement().waiting == (1, 2)


def test_label_stage_finishes_when_the_only_annotator_skips_a_pair(tmp_path, capsys):
    samples = make_pairs(tmp_path / "samples.jsonl", 2)
    db = pre_labelled_db(tmp_path, samples, ["b", "skip"])
    config = LabelConfig(
        samples=str(samples),
        output=str(tmp_path / "labels.jsonl"),
        source="human-web",
        web_db=str(db),
        web_serve=False,
        poll_seconds=0.01,
        wait_timeout=5,
    )
    start = time.monotonic()
    labels = run_label(config)
    assert time.monotonic() - start < 4  # settled at once, not after the timeout
    assert [(c.meta["item_index"], c.ranking, c.tie) for c in load_comparisons(config.output)] == [(0, [1, 0], False)]
    assert labels == load_comparisons(config.output)
    out = capsys.readouterr().out
    assert "1 labels in" in out
    assert "1 pair(s) skipped by every annotator, left unlabelled: item 1" in out


def test_label_stage_timeout_names_the_stuck_pairs_and_keeps_the_labels(tmp_path):
    samples = make_pairs(tmp_path / "samples.jsonl", 4)
    db = pre_labelled_db(tmp_path, samples, ["a", "skip"], overlap=2)  # x, the only annotator, is done with 0 and 1
    config = LabelConfig(
        samples=str(samples),
        output=str(tmp_path / "labels.jsonl"),
        source="human-web",
        web_db=str(db),
        web_serve=False,
        poll_seconds=0.01,
        wait_timeout=0.2,
    )
    with pytest.raises(TimeoutError) as info:
        run_label(config)
    message = str(info.value)
    assert "0/4 pairs have their 2 vote(s)" in message
    assert "2 pair(s) still wait for an annotator who has not voted on or skipped them: items 2, 3" in message
    assert not Path(config.output).exists()
    store = AnnotationStore(db, create=False)
    assert [(label.item_index, label.choice) for label in store.labels()] == [(0, "a"), (1, "skip")]


def test_label_wait_timeout_is_finite_by_default():
    assert 0 < LabelConfig().wait_timeout < math.inf


def test_label_stage_keeps_the_databases_overlap(tmp_path, capsys):
    samples = make_pairs(tmp_path / "samples.jsonl", 2)
    store = AnnotationStore(tmp_path / "web.sqlite")
    store.configure(overlap=3)  # as `rlhfkit annotate serve --overlap 3` leaves it
    store.close()
    config = LabelConfig(
        samples=str(samples),
        output=str(tmp_path / "labels.jsonl"),
        source="human-web",
        web_db=str(tmp_path / "web.sqlite"),
        web_serve=False,
        poll_seconds=0.01,
        wait_timeout=0.1,
    )
    with pytest.raises(TimeoutError, match="0/2 pairs have their 3 vote"):
        run_label(config)
    assert "3 vote(s) each" in capsys.readouterr().out
    assert AnnotationStore(tmp_path / "web.sqlite", create=False).overlap == 3
    assert config.overlap is None  # the default: keep the database's value
    # A new database gets 1; an explicit overlap is stored.
    fresh = LabelConfig(**{**config.__dict__, "web_db": str(tmp_path / "new.sqlite")})
    with pytest.raises(TimeoutError, match="0/2 pairs have their 1 vote"):
        run_label(fresh)
    explicit = LabelConfig(**{**config.__dict__, "overlap": 2})
    with pytest.raises(TimeoutError, match="0/2 pairs have their 2 vote"):
        run_label(explicit)
    assert AnnotationStore(tmp_path / "web.sqlite", create=False).overlap == 2


def test_a_failed_commit_is_rolled_back_and_later_writes_succeed(tmp_path):
    store = new_store(tmp_path, 2, overlap=2)
    x = annotator(store, "x")
    # A deferred foreign-key violation makes COMMIT itself fail, and SQLite then leaves the transaction open.
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), store._write() as db:
        db.execute("PRAGMA defer_foreign_keys = ON")
        db.execute("INSERT INTO leases (pair_id, annotator_id, flipped, expires) VALUES (999, 999, 0, 0)")
    y = annotator(store, "y")  # a later write goes through
    assert vote(store, x, "a") == 1 and vote(store, y, "b") == 1
    assert [(label.annotator, label.choice) for label in store.labels()] == [("x", "a"), ("y", "b")]
    reopened = AnnotationStore(tmp_path / "labels.sqlite", create=False)  # and it is committed, without the bad row
    assert reopened.annotators() == ["x", "y"] and len(reopened.labels()) == 2
    assert reopened._read("SELECT COUNT(*) FROM leases WHERE pair_id = 999") == [(0,)]
