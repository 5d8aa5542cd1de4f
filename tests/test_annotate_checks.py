"""Quality control in the annotation app: check questions (file format, mixing into the queue, scoring, never
exported), per-annotator agreement with the majority, position bias and seconds per label (hand-worked values),
the lead's "ask one more", the schema 3 -> 4 migration, and in Chromium an annotator answering a check question
wrong and the lead seeing it."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path

import pytest

from rlhfkit.data.io import DataError
from rlhfkit.feedback.agreement import check_accuracy, majority_agreement, position_bias
from rlhfkit.feedback.web import cli
from rlhfkit.feedback.web.admin import ExportConfig, export, format_status, lead_overview, store_status
from rlhfkit.feedback.web.app import ServeConfig, create_app, prepare
from rlhfkit.feedback.web.pairs import read_checks, read_pairs
from rlhfkit.feedback.web.store import AnnotationStore, StoreError, checks_due, to_shown
from rlhfkit.serve import ServerThread
from tests.annotate_client import Client
from tests.helpers import write_jsonl

PAIRS = [
    {"prompt": "What is the capital of France?", "responses": ["Paris.", "Lyon."]},
    {"prompt": "Two plus two?", "responses": ["Four.", "Five."]},
    {"prompt": "Largest planet?", "responses": ["Jupiter.", "Mars."]},
]
CHECKS = [
    {"prompt": "Is water wet? (check)", "response_a": "It is dry.", "response_b": "Yes, it is wet.", "expected": "b"},
    {"prompt": "Sky colour? (check)", "responses": ["Blue.", "Green."], "expected": "a"},
]


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def checked_store(tmp_path: Path, *, rate: float, overlap: int = 1, clock=None) -> tuple[AnnotationStore, dict[str, int]]:
    store = AnnotationStore(tmp_path / "labels.sqlite", **({"clock": clock} if clock else {}))
    store.configure(overlap=overlap, check_rate=rate)
    store.add_pairs(read_pairs(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))[0])
    store.add_checks(read_checks(write_jsonl(tmp_path / "checks.jsonl", CHECKS)))
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob", "carol")}
    return store, {name: store.annotator_for_token(token).id for name, token in tokens.items()}


def answer(store: AnnotationStore, who: int, canonical: str) -> tuple[int, bool]:
    """Label whatever ``who`` is shown next with the canonical choice; returns (item_index, flipped)."""
    shown = store.next_assignment(who)
    store.submit(who, shown.pair_id, to_shown(canonical, flipped=shown.flipped))
    return shown.item_index, shown.flipped


# ----------------------------------------------------------------------------- the pure statistics, by hand


def test_check_accuracy_by_hand():
    assert check_accuracy(["a", "b", "tie", "a"], ["a", "b", "b", "a"]) == (0.75, 4)  # 3 of 4 right
    accuracy, n = check_accuracy([], [])
    assert math.isnan(accuracy) and n == 0
    with pytest.raises(ValueError, match="2 answers vs 1"):
        check_accuracy(["a", "b"], ["a"])


def test_majority_agreement_is_leave_one_out_by_hand():
    votes = {
        # item 1: x, y say a, z says b. x: others {y: a, z: b} split -> not counted; y likewise;
        # z: others a, a -> majority a, z said b: disagrees.
        1: {"x": "a", "y": "a", "z": "b"},
        # item 2: x a, y a. x: other a -> agrees; y: other a -> agrees.
        2: {"x": "a", "y": "a"},
        # item 3: x tie, z b. x: other b -> disagrees; z: other tie -> disagrees.
        3: {"x": "tie", "z": "b"},
        # item 4: one vote, not counted.
        4: {"y": "b"},
    }
    assert majority_agreement(votes) == {"x": (0.5, 2), "y": (1.0, 1), "z": (0.0, 2)}
    assert majority_agreement({1: {"x": "a"}}) == {}


def test_position_bias_by_hand():
    assert position_bias(["a", "a", "b", "tie", "a", "skip"]) == (0.75, 4)  # 3 of the 4 decided votes left
    assert position_bias(["up", "down"], left="up", right="down") == (0.5, 2)
    share, n = position_bias(["tie"])
    assert math.isnan(share) and n == 0


# ----------------------------------------------------------------------------- the checks file


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"prompt": "p", "responses": ["x", "y"]}, r"checks.jsonl:2: field 'expected': missing"),
        ({"prompt": "p", "responses": ["x", "y"], "expected": "tie"}, r"checks.jsonl:2: field 'expected': expected \"a\""),
        ({"prompt": "p", "responses": ["x", "y"], "expected": "chosen"}, r"checks.jsonl:2: field 'expected'"),
        ({"prompt": "p", "response_a": "x", "response_b": " ", "expected": "a"}, r"checks.jsonl:2: field 'responses'"),
        ({"prompt": "p", "responses": ["x"], "expected": "a"}, r"checks.jsonl:2: field 'responses'"),
    ],
)
def test_a_bad_checks_file_names_file_line_and_field(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "checks.jsonl", [CHECKS[0], record])
    with pytest.raises(DataError, match=problem):
        read_checks(path)


def test_serve_refuses_a_bad_checks_file_before_touching_the_database(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    checks = write_jsonl(tmp_path / "checks.jsonl", [{"prompt": "p", "responses": ["x", "y"], "expected": "c"}])
    db = tmp_path / "labels.sqlite"
    argv = ["serve", "--pairs", str(pairs), "--db", str(db), "--checks", str(checks), "--port", "0"]
    assert cli.main(argv) == 2
    assert "checks.jsonl:1: field 'expected'" in capsys.readouterr().err and not db.exists()
    with pytest.raises(ValueError, match="check rate must be between 0 and 1"):
        prepare(ServeConfig(db=str(db), pairs=str(pairs), check_rate=1.5))


# ----------------------------------------------------------------------------- mixing in, scoring, not exporting


def test_checks_are_mixed_in_scored_and_never_exported(tmp_path):
    store, who = checked_store(tmp_path, rate=1.0)
    # Rate 1: while alice has unanswered checks, each new assignment is one; then the ordinary pairs.
    seen = [answer(store, who["alice"], "b")[0] for _ in range(2)]
    assert sorted(seen) == [-2, -1]  # checks 0 and 1 (stored under negative item indices)
    assert answer(store, who["alice"], "a")[0] == 0
    assert store.progress(who["alice"]).pairs_total == 3  # checks are not pairs to label
    # alice answered check 0 (expected b) with b: right; check 1 (expected a) with b: wrong.
    alice = {a.name: a for a in store_status(store).annotators}["alice"]
    assert (alice.check_accuracy, alice.checks, alice.votes) == (0.5, 2, 1)
    expected = {-1: "b", -2: "a"}  # CHECKS[0] and CHECKS[1]
    assert [(label.item_index, label.check_answer) for label in store.check_labels()] == [(i, expected[i]) for i in seen]
    assert [label.item_index for label in store.labels()] == [0]  # labels() has no check answers
    out = tmp_path / "labels.jsonl"
    assert export(ExportConfig(db=str(store.path), output=str(out))).written == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["meta"]["item_index"] for r in records] == [0] and "check" not in out.read_text()
    assert store.vote_counts() == (3, 1) and store.settlement().waiting == (1, 2)
    with pytest.raises(StoreError, match="no item -1"):
        store.settle(-1, "a")  # the lead cannot settle a check question
    store.close()


def test_rate_zero_never_shows_a_check_and_no_checks_are_shown_once_the_pairs_run_out(tmp_path):
    store, who = checked_store(tmp_path, rate=0.0, overlap=2)
    assert [answer(store, who["bob"], "a")[0] for _ in range(3)] == [0, 1, 2]
    assert store.next_assignment(who["bob"]) is None
    store.configure(check_rate=1.0)
    assert store.next_assignment(who["bob"]) is None  # nothing left to label: no checks alone
    assert answer(store, who["carol"], "a")[0] < 0  # but carol, with pairs left, gets one
    store.close()


def test_quality_numbers_by_hand_in_status_overview_and_cli(tmp_path, capsys):
    clock = Clock()
    store, who = checked_store(tmp_path, rate=0.0, overlap=3, clock=clock)
    # alice: a, a, b on pairs 0-2, 4 s / 6 s / 10 s each -> median 6 s.
    # bob: a, b, b. carol: a, a (then nothing).
    for seconds, choice in zip((4, 6, 10), "aab"):
        shown = store.next_assignment(who["alice"])
        clock.t += seconds
        store.submit(who["alice"], shown.pair_id, to_shown(choice, flipped=shown.flipped))
    flips = {}
    for name, choices in (("bob", "abb"), ("carol", "aa")):
        for choice in choices:
            index, flipped = answer(store, who[name], choice)
            flips[name, index] = (choice, flipped)
    status = {a.name: a for a in store_status(store).annotators}
    # Leave-one-out majority. Pair 0 (alice a, bob a, carol a): all three agree with the others.
    # Pair 1 (a, b, a): alice's others (b, a) split, not counted; carol's others (a, b) likewise;
    # bob's others (a, a): he disagrees. Pair 2 (alice b, bob b): both agree.
    # alice 2/2, bob 2/3, carol 1/1.
    assert (status["alice"].majority_agreement, status["alice"].majority_items) == (1.0, 2)
    assert (status["bob"].majority_agreement, status["bob"].majority_items) == (2 / 3, 3)
    assert (status["carol"].majority_agreement, status["carol"].majority_items) == (1.0, 1)
    assert status["alice"].seconds_per_label == 6.0
    # Position bias: bob's votes as shown, counted by hand from the recorded sides.
    bob_left = sum(to_shown(choice, flipped=flipped) == "a" for (name, _), (choice, flipped) in flips.items() if name == "bob")
    assert (status["bob"].left_share, status["bob"].left_votes) == (bob_left / 3, 3)
    assert math.isnan(status["alice"].check_accuracy) and status["alice"].checks == 0
    overview = {a["name"]: a for a in lead_overview(store)["annotators"]}
    assert overview["bob"]["majority_agreement"] == pytest.approx(2 / 3) and overview["bob"]["left_votes"] == 3
    assert overview["alice"]["check_accuracy"] is None and overview["alice"]["seconds_per_label"] == 6.0
    text = format_status(store_status(store))
    assert "2 check question(s), not exported" in text
    assert "67% (3)" in [line for line in text.splitlines() if line.startswith("bob")][0]
    store.close()
    assert cli.main(["status", "--db", str(tmp_path / "labels.sqlite")]) == 0
    assert "checks right" in capsys.readouterr().out


def test_checks_due_by_hand():
    # rate r: round(pairs * r / (1 - r)) checks in all, less those answered, at most those unanswered.
    assert checks_due(0.1, pairs=20, answered=0, unanswered=5) == 2  # 20 / 9 = 2.2 -> 2
    assert checks_due(0.1, pairs=20, answered=1, unanswered=4) == 1
    assert checks_due(0.1, pairs=20, answered=3, unanswered=2) == 0  # never negative
    assert checks_due(0.2, pairs=2, answered=0, unanswered=5) == 1  # 2 / 4 = 0.5 -> 1 (half rounds up)
    assert checks_due(0.5, pairs=3, answered=0, unanswered=2) == 2  # 3 wanted, 2 left
    assert checks_due(0.0, pairs=100, answered=0, unanswered=5) == 0
    assert checks_due(1.0, pairs=1, answered=4, unanswered=3) == 3  # rate 1: every check


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_a_check_cannot_be_told_from_a_pair_over_http(tmp_path, rate):
    """Every field an annotator gets: the assignment's keys, its id (opaque, the same format, no order), and
    the progress, which falls by one after a check just as after a pair (and rises by one after an undo)."""
    store, _ = checked_store(tmp_path, rate=rate, overlap=2)
    token = store.add_annotator("dave")
    dave = store.annotator_for_token(token).id
    server = ServerThread(create_app(store), "127.0.0.1", 0).start()
    client = Client(f"http://127.0.0.1:{server.port}", token)
    shown: list[tuple[bool, dict, dict]] = []  # (is a check, assignment, progress while it is on screen)
    try:
        status, body = client.post("/api/next")
        while body["assignment"] is not None:
            assignment = body["assignment"]
            shown.append(("(check)" in assignment["prompt"], assignment, body["progress"]))
            status, body = client.post("/api/label", {"pair_id": assignment["pair_id"], "choice": "a"})
            assert status == 200
        assert [check for check, _, _ in shown].count(True) == 2 and len(shown) == 5  # rate 0.5: 3 wanted, 2 exist
        assert shown[-1][0] is False  # the checks due come before the last pair, never after it
        # The count on screen falls by one per answer, whichever kind it was: 5, 4, 3, 2, 1, then 0.
        assert [progress["remaining"] for _, _, progress in shown] + [body["progress"]["remaining"]] == [5, 4, 3, 2, 1, 0]
        assert [progress["labelled"] for _, _, progress in shown] == [0, 1, 2, 3, 4]
        keys = {(check, tuple(sorted(assignment))) for check, assignment, _ in shown}
        assert keys == {(True, ("a", "b", "pair_id", "prompt")), (False, ("a", "b", "pair_id", "prompt"))}
        ids = [assignment["pair_id"] for _, assignment, _ in shown]
        assert all(re.fullmatch(r"[0-9a-f]{20}", pair_id) for pair_id in ids) and len(set(ids)) == 5
        rows = {store.pair_for_public_id(dave, pair_id) for pair_id in ids}
        assert rows == {1, 2, 3, 4, 5} and not rows & {int(pair_id, 16) for pair_id in ids}  # not the row ids
        # Undo: the count rises by one again, whichever kind comes back.
        last_check = max(i for i, (check, _, _) in enumerate(shown) if check)
        for _ in range(len(shown) - last_check):
            before = body["progress"]["remaining"]
            status, body = client.post("/api/undo")
            assert status == 200 and body["progress"]["remaining"] == before + 1
        assert "(check)" in body["assignment"]["prompt"] and body["undone"]["pair_id"] == shown[last_check][1]["pair_id"]
        # Another annotator knows the same pairs by other ids.
        alice = Client(f"http://127.0.0.1:{server.port}", store.add_annotator("erin"))
        assert alice.post("/api/next")[1]["assignment"]["pair_id"] not in ids
        alice.close()
    finally:
        client.close()
        server.stop()
        store.close()


def test_label_stage_serves_guidelines_and_checks_and_writes_only_the_pairs(tmp_path):
    """``source: human-web`` with the team options of ``serve``: the stage's app shows the guidelines and criteria,
    mixes the checks in (rate 0.5: both of them, among the 3 pairs), and its labels file holds the 3 pairs only."""
    import socket
    import threading
    import time

    from rlhfkit.data.preferences import load_comparisons
    from rlhfkit.label import LabelConfig
    from rlhfkit.label import run as run_label

    with socket.socket() as probe:  # a free port for the stage's server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db = tmp_path / "web.sqlite"
    (tmp_path / "guide.md").write_text("# Prefer the *correct* answer\n", encoding="utf-8")
    store = AnnotationStore(db)
    token = store.add_annotator("dave")
    store.close()
    config = LabelConfig(
        samples=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)),
        output=str(tmp_path / "labels.jsonl"),
        source="human-web",
        web_db=str(db),
        web_port=port,
        web_guidelines=str(tmp_path / "guide.md"),
        web_criteria=["correct", " "],
        web_checks=str(write_jsonl(tmp_path / "checks.jsonl", CHECKS)),
        web_check_rate=0.5,
        poll_seconds=0.02,
        wait_timeout=60,
    )
    stage = threading.Thread(target=run_label, args=(config,))
    stage.start()
    client = Client(f"http://127.0.0.1:{port}", token)
    deadline = time.monotonic() + 30
    while True:
        try:
            status, task = client.post("/api/task")
            break
        except OSError:
            assert stage.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
    try:
        assert status == 200 and task == {
            "guidelines": "# Prefer the *correct* answer\n",
            "criteria": ["correct"],
            "mode": "pairs",
        }
        status, data = client.post("/api/next")
        prompts = []
        while data["assignment"] is not None:
            prompts.append(data["assignment"]["prompt"])
            status, data = client.post("/api/label", {"pair_id": data["assignment"]["pair_id"], "choice": "a"})
            assert status == 200
    finally:
        client.close()
        stage.join(30)
    assert not stage.is_alive()
    assert sum("(check)" in prompt for prompt in prompts) == 2 and len(prompts) == 5
    labels = load_comparisons(config.output)
    assert sorted(c.meta["item_index"] for c in labels) == [0, 1, 2]
    assert sorted(c.prompt for c in labels) == sorted(p["prompt"] for p in PAIRS)  # no check in the labels
    store = AnnotationStore(db, create=False)
    assert len(store.check_labels()) == 2 and store.check_rate == 0.5  # the check answers stay in the db
    store.close()


def test_label_stage_refuses_guidelines_it_would_not_show(tmp_path):
    from rlhfkit.config import ConfigError
    from rlhfkit.label import LabelConfig
    from rlhfkit.label import run as run_label

    config = LabelConfig(
        samples=str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)),
        source="human-web",
        web_db=str(tmp_path / "web.sqlite"),
        web_serve=False,
        web_criteria=["correct"],
    )
    with pytest.raises(ConfigError, match="web_serve: false"):
        run_label(config)
    assert not (tmp_path / "web.sqlite").exists()


# ----------------------------------------------------------------------------- ask one more


def test_ask_one_more_sends_a_split_pair_to_another_annotator(tmp_path):
    store, who = checked_store(tmp_path, rate=0.0, overlap=2)
    lead_token = store.new_lead_token()
    answer(store, who["alice"], "a")
    answer(store, who["bob"], "b")  # pair 0: split, complete with its 2 votes
    assert store.next_assignment(who["carol"]).item_index in (1, 2)  # carol is not asked about pair 0
    server = ServerThread(create_app(store), "127.0.0.1", 0).start()
    lead = Client(f"http://127.0.0.1:{server.port}", lead_token)
    try:
        overview = lead.post("/api/lead/overview")[1]
        assert [(s["item_index"], s["votes_wanted"]) for s in overview["split"]] == [(0, 2)]
        status, body = lead.post("/api/lead/ask-more", {"item_index": 0})
        assert status == 200 and body["votes_wanted"] == 3
        assert body["overview"]["split"][0]["votes_wanted"] == 3 and body["overview"]["progress"]["complete"] == 0
        assert lead.post("/api/lead/ask-more", {"item_index": 7})[0] == 404
        assert lead.post("/api/lead/ask-more", {"item_index": -1})[0] == 404  # a check question
        assert Client(f"http://127.0.0.1:{server.port}", None).post("/api/lead/ask-more", {"item_index": 0})[0] == 401
    finally:
        lead.close()
        server.stop()
    # carol labels the pair she holds; then pair 0 (lowest first), which wants a third vote now, is hers.
    store.submit(who["carol"], store.next_assignment(who["carol"]).pair_id, "a")
    assert store.next_assignment(who["carol"]).item_index == 0
    assert 0 in store.settlement().waiting
    shown = store.next_assignment(who["carol"])
    store.submit(who["carol"], shown.pair_id, to_shown("b", flipped=shown.flipped))
    assert [s["item_index"] for s in lead_overview(store)["split"]] == []  # 2 b to 1 a: decided
    assert 0 not in store.settlement().waiting and store.votes_wanted() == {0: 3}
    store.settle(1, "a")
    with pytest.raises(StoreError, match="settled by the lead"):
        store.ask_one_more(1)
    store.close()


# ----------------------------------------------------------------------------- migration


def test_a_version_3_database_opens_as_version_4_with_its_labels(tmp_path):
    clock = Clock()
    store, who = checked_store(tmp_path, rate=0.0, clock=clock)
    for seconds in (5, 7):
        shown = store.next_assignment(who["alice"])
        clock.t += seconds
        store.submit(who["alice"], shown.pair_id, "a", reason="why")
    store.close()
    db = tmp_path / "labels.sqlite"
    with sqlite3.connect(db) as con:  # as version 3 wrote it: no checks, no votes_wanted, no shown times
        con.executescript(
            """DELETE FROM labels WHERE pair_id IN (SELECT id FROM pairs WHERE check_answer IS NOT NULL);
            DELETE FROM pairs WHERE check_answer IS NOT NULL;
            ALTER TABLE labels DROP COLUMN shown; ALTER TABLE leases DROP COLUMN shown;
            ALTER TABLE pairs DROP COLUMN check_answer; ALTER TABLE pairs DROP COLUMN votes_wanted;
            UPDATE settings SET value = '3' WHERE key = 'schema';"""
        )
    store = AnnotationStore(db)
    assert [(label.item_index, label.reason, label.shown_at) for label in store.labels()] == [(0, "why", None), (1, "why", None)]
    assert store_status(store).annotators[0].seconds_per_label == 7.0  # no shown times: the gap between labels
    assert store.add_checks(read_checks(tmp_path / "checks.jsonl")) == 2 and store.ask_one_more(0) == 2
    store.close()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone() == ("4",)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            con.execute("UPDATE pairs SET check_answer = 'tie' WHERE item_index = -1")


# ----------------------------------------------------------------------------- in the browser


def test_an_annotator_answers_a_check_wrong_and_the_lead_sees_it(tmp_path):
    """Dave, with the check rate at 1, is shown check 0 (whose right answer is canonical ``b``) in Chromium and
    clicks the other side; the lead's page shows his check accuracy as 0% (1). Then the lead asks one more
    vote for a split pair with the page's button."""
    from tests.helpers import require_chromium
    from tests.test_annotate_browser import CHROMIUM, CHROMIUM_ARGS, open_page

    require_chromium()
    from playwright.sync_api import sync_playwright

    store, who = checked_store(tmp_path, rate=0.0, overlap=2)
    answer(store, who["alice"], "a")
    answer(store, who["bob"], "b")  # pair 0 is split
    store.configure(check_rate=1.0)
    dave = store.add_annotator("dave")
    lead_token = store.new_lead_token()
    server = ServerThread(create_app(store), "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page, problems = open_page(browser, f"{base}/#token={dave}")
            page.wait_for_selector("#task:not([hidden])")
            assert "(check)" in page.inner_text("#prompt")  # rate 1: a check first
            if "Sky colour" in page.inner_text("#prompt"):  # the other check came first: a tie (wrong there too)
                page.click("#choose-tie")
                page.wait_for_function("() => document.getElementById('prompt').textContent.includes('wet')")
            wrong = "#choose-a" if page.inner_text("#response-a").strip() == "It is dry." else "#choose-b"
            page.click(wrong)
            page.wait_for_function("() => !document.getElementById('prompt').textContent.includes('wet')")
            answered = [label for label in store.check_labels() if label.annotator == "dave"]
            assert answered[-1].choice == "a" and answered[-1].check_answer == "b"
            lead, lead_problems = open_page(browser, f"{base}/lead#token={lead_token}")
            lead.wait_for_selector("#overview:not([hidden])")
            row = lead.locator('#annotators tr[data-name="dave"]')
            assert row.locator("td.checks").inner_text() == f"0% ({len(answered)})"
            assert lead.locator('#annotators tr[data-name="alice"] td.checks').inner_text() == "n/a"
            assert "2 check questions (not exported)" in lead.inner_text("#progress-text")
            lead.locator('#split article[data-item="0"] button[data-ask-more="0"]').click()
            lead.wait_for_function("() => document.getElementById('message').textContent.includes('one more vote')")
            assert "wants 3" in lead.inner_text('#split article[data-item="0"]')
            assert problems == [] and lead_problems == []
            browser.close()
        assert store.votes_wanted() == {0: 3}
    finally:
        server.stop()
        store.close()
