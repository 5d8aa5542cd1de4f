"""The lead: lead token, pause / resume / revoke, stuck and split pairs, settling a pair (store, HTTP, CLI),
the health endpoint, and the lead's page in a real headless Chromium settling a stuck pair so the label
stage's wait ends with the lead's label."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rlhfkit.feedback.web import cli
from rlhfkit.feedback.web.admin import comparisons, lead_overview, wait_for_labels
from rlhfkit.feedback.web.app import create_app, web_server
from rlhfkit.feedback.web.pairs import read_pairs
from rlhfkit.feedback.web.store import AnnotationStore, to_shown
from rlhfkit.serve import ServerThread
from tests.annotate_client import Client
from tests.helpers import write_jsonl

PAIRS = [
    {"prompt": "What is the capital of France?", "responses": ["Paris.", "Lyon."]},
    {
        "prompt": "Say <b>hi</b> <script>window.__pwned = 1</script>",
        "responses": ["**Hi!**", '<img src=x onerror="window.__pwned = 2">'],
    },
    {"prompt": "Two plus two?", "responses": ["Four.", "Five."]},
]
SHOTS = Path("/tmp/s20/shots")


def pair_store(tmp_path: Path, *, overlap: int = 1) -> tuple[AnnotationStore, dict[str, str]]:
    store = AnnotationStore(tmp_path / "labels.sqlite")
    store.configure(overlap=overlap)
    store.add_pairs(read_pairs(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))[0])
    return store, {name: store.add_annotator(name) for name in ("alice", "bob")}


def ids(store: AnnotationStore, tokens: dict[str, str]) -> dict[str, int]:
    return {name: store.annotator_for_token(token).id for name, token in tokens.items()}


def label_all(store: AnnotationStore, who: int, choices: list[str]) -> None:
    """Label the next pairs with these canonical choices (``a`` = ``responses[0]``, whatever side it is shown on)."""
    for choice in choices:
        shown = store.next_assignment(who)
        store.submit(who, shown.pair_id, to_shown(choice, flipped=shown.flipped), reason=f"{choice} reason")


def test_stuck_and_split_pairs_and_settling_them(tmp_path):
    store, tokens = pair_store(tmp_path, overlap=2)
    who = ids(store, tokens)
    label_all(store, who["alice"], ["skip", "a", "a"])
    label_all(store, who["bob"], ["skip", "b", "a"])
    # Pair 0: skipped by both (stuck: settled for the pipeline, but unlabelled); pair 1: split; pair 2: a.
    state = store.settlement()
    assert (state.exhausted, state.waiting, state.complete) == ((0,), (), 2)
    overview = lead_overview(store)
    assert [s["item_index"] for s in overview["stuck"]] == [0] and [s["item_index"] for s in overview["split"]] == [1]
    assert overview["stuck"][0]["skips"] == [
        {"annotator": "alice", "reason": "skip reason"},
        {"annotator": "bob", "reason": "skip reason"},
    ]
    assert overview["stuck"][0]["responses"] == ["Paris.", "Lyon."]  # canonical order, whatever was shown
    assert overview["progress"] == {
        "items": 3, "complete": 2, "waiting": 0, "stuck": 1, "settled_by_lead": 0, "check_questions": 0, "votes": 4,
        "last_hour": 6,
    }  # fmt: skip
    assert overview["agreement"]["by_day"][0]["items"] == 2 and overview["agreement"]["by_day"][0]["agree"] == 0.5
    assert [c.meta["item_index"] for c in comparisons(store)] == [1, 2]
    # The lead settles both: the stuck pair gets a label, the split one the lead's choice instead of a tie.
    store.settle(0, "a", "Paris is right")
    store.settle(1, "b")
    labels = {c.meta["item_index"]: c for c in comparisons(store)}
    assert (labels[0].chosen, labels[0].tie, labels[0].meta["lead"]["reason"]) == ("Paris.", False, "Paris is right")
    assert labels[0].meta["majority"] is None and labels[0].source == "human-web:lead"
    assert (labels[1].chosen, labels[1].tie, labels[1].meta["majority"]) == (PAIRS[1]["responses"][1], False, "split")
    assert labels[1].meta["target"] == 1.0 and "lead" in labels[1].source
    overview = lead_overview(store)
    assert overview["stuck"] == [] and overview["split"] == [] and overview["progress"]["settled_by_lead"] == 2
    assert store.settlement().by_lead == (0, 1) and store.vote_counts() == (3, 3)
    store.close()


def test_pause_resume_revoke(tmp_path):
    store, tokens = pair_store(tmp_path)
    who = ids(store, tokens)
    held = store.next_assignment(who["alice"])
    store.set_annotator_state("alice", "paused")
    assert store.next_assignment(who["alice"]) is None
    assert store.next_assignment(who["bob"]).pair_id == held.pair_id  # alice's lease went back to the pool
    # Only active annotators count as "left to ask": bob skipping everything makes every pair stuck.
    label_all(store, who["bob"], ["skip", "skip", "skip"])
    assert store.settlement().exhausted == (0, 1, 2)
    store.set_annotator_state("alice", "active")
    assert store.settlement().waiting == (0, 1, 2)  # resumed: she can still be asked
    store.set_annotator_state("alice", "revoked")
    assert store.annotator_for_token(tokens["alice"]) is None  # the token is dead
    with pytest.raises(ValueError, match="revoked; give them a new token"):
        store.set_annotator_state("alice", "active")
    fresh = store.add_annotator("alice", replace_token=True)
    assert store.annotator_for_token(fresh).state == "active"
    with pytest.raises(ValueError, match="no annotator named 'carol'"):
        store.set_annotator_state("carol", "paused")
    store.close()


def test_lead_api_needs_the_lead_token_and_healthz_tells_nothing(tmp_path):
    store, tokens = pair_store(tmp_path)
    lead_token = store.new_lead_token()
    assert lead_token not in (tmp_path / "labels.sqlite").read_bytes().decode("latin-1")  # stored hashed
    server = ServerThread(create_app(store), "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    lead, alice, nobody = Client(base, lead_token), Client(base, tokens["alice"]), Client(base, None)
    try:
        assert nobody.call("GET", "/healthz") == (200, {"ok": True})
        for client in (nobody, alice):  # an annotator's token is not the lead's
            status, body = client.post("/api/lead/overview")
            assert status == 401 and "lead token" in body["detail"]
        status, body = lead.post("/api/lead/overview")
        assert status == 200 and body["progress"]["items"] == 3
        assert lead.post("/api/next")[0] == 401  # and the lead's token is not an annotator's
        status, body = lead.post("/api/lead/annotator", {"name": "alice", "action": "pause"})
        assert status == 200 and body["overview"]["annotators"][0]["state"] == "paused"
        status, body = alice.post("/api/next")
        assert status == 200 and body["assignment"] is None and body["paused"] and "paused by the lead" in body["message"]
        status, body = lead.post("/api/lead/add-annotator", {"name": "carol"})
        assert status == 200 and Client(base, body["token"]).post("/api/next")[1]["annotator"] == "carol"
        assert lead.post("/api/lead/settle", {"item_index": 9, "choice": "a"})[0] == 404
        assert lead.post("/api/lead/settle", {"item_index": 0, "choice": "up"})[0] == 422  # a pairs db
        status, body = lead.post("/api/lead/settle", {"item_index": 0, "choice": "a"}, headers={"Origin": "http://evil"})
        assert status == 403  # the cross-origin guard covers the lead's writes too
        status, page = nobody.call("GET", "/lead")
        assert status == 200 and "lead.js" in page
    finally:
        for client in (lead, alice, nobody):
            client.close()
        server.stop()
        store.close()


def test_cli_lead_token_and_annotator_management(tmp_path, capsys):
    store, _ = pair_store(tmp_path)
    store.close()
    db = str(tmp_path / "labels.sqlite")
    assert cli.main(["lead-token", "--db", db]) == 0
    token = capsys.readouterr().out.strip()
    assert cli.main(["annotator", "bob", "pause", "--db", db]) == 0
    store = AnnotationStore(db)
    assert store.is_lead_token(token) and store.annotator_states() == {"alice": "active", "bob": "paused"}
    store.close()
    assert cli.main(["annotator", "nobody", "pause", "--db", db]) == 2
    assert "no annotator named 'nobody'" in capsys.readouterr().err


def test_proxy_headers_are_believed_only_from_configured_proxies():
    assert web_server(object()).config.proxy_headers is False
    config = web_server(object(), trusted_proxies="127.0.0.1, 10.0.0.2").config
    assert config.proxy_headers is True and config.forwarded_allow_ips == ["127.0.0.1", "10.0.0.2"]


def test_a_version_2_database_gains_the_lead_tables_and_keeps_its_labels(tmp_path):
    store, tokens = pair_store(tmp_path)
    label_all(store, ids(store, tokens)["alice"], ["a", "skip"])
    store.close()
    db = tmp_path / "labels.sqlite"
    with sqlite3.connect(db) as con:  # make it look like version 2: the old CHECK, no state, no settled
        sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'labels'").fetchone()[0]
        con.executescript(
            f"""DROP TABLE settled; ALTER TABLE labels RENAME TO new_labels;
            {sql.replace(", 'up', 'down'", "")}; INSERT INTO labels SELECT * FROM new_labels; DROP TABLE new_labels;
            ALTER TABLE annotators DROP COLUMN state; UPDATE settings SET value = '2' WHERE key = 'schema';
            ALTER TABLE labels DROP COLUMN shown; ALTER TABLE leases DROP COLUMN shown;
            ALTER TABLE pairs DROP COLUMN check_answer; ALTER TABLE pairs DROP COLUMN votes_wanted;"""
        )
    store = AnnotationStore(db)
    assert [(lab.item_index, lab.choice) for lab in store.labels()] == [(0, "a"), (1, "skip")]
    assert store.annotator_states() == {"alice": "active", "bob": "active"}
    store.settle(1, "b")
    store.close()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone() == ("4",)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert "'up', 'down'" in con.execute("SELECT sql FROM sqlite_master WHERE name = 'labels'").fetchone()[0]
        assert con.execute("SELECT name FROM sqlite_master WHERE name = 'labels_by_annotator'").fetchone()


# ----------------------------------------------------------------------------- in the browser


def test_the_lead_settles_a_stuck_pair_on_the_lead_page_and_the_label_stage_finishes(tmp_path):
    """Alice and Bob skip pair 1 (so it is stuck: nobody is left to ask) and label the others. On /lead, in
    Chromium, the lead sees it with both skip reasons (model markup shown as text), settles it as "B
    better" with a reason; ``wait_for_labels`` then returns and the export has the lead's label. Screenshots
    of the lead's page (desktop and phone) go to /tmp/s20/shots/."""
    from tests.helpers import require_chromium
    from tests.test_annotate_browser import CHROMIUM, CHROMIUM_ARGS, open_page

    require_chromium()
    from playwright.sync_api import sync_playwright

    store, tokens = pair_store(tmp_path)
    who = ids(store, tokens)
    label_all(store, who["alice"], ["a", "skip", "a"])
    store.submit(who["bob"], store.next_assignment(who["bob"]).pair_id, "skip", reason="can't tell, <b>markup</b>")
    assert store.settlement().exhausted == (1,)
    assert 1 not in {c.meta["item_index"] for c in comparisons(store)}  # stuck: no label yet
    lead_token = store.new_lead_token()
    server = ServerThread(create_app(store), "127.0.0.1", 0).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/lead#token={lead_token}")
            page.wait_for_selector("#overview:not([hidden])")
            assert lead_token not in page.url
            assert "2/3 complete" in page.inner_text("#progress-text") and "1 stuck" in page.inner_text("#progress-text")
            card = page.locator('#stuck article[data-item="1"]')
            assert "Say <b>hi</b> <script>window.__pwned = 1</script>" in card.inner_text()  # markup as text
            assert "bob skipped: can't tell, <b>markup</b>" in card.inner_text()
            assert "alice skipped: skip reason" in card.inner_text()
            assert card.locator("strong").inner_text() == "Hi!"  # markdown rendered by the shared renderer
            assert page.eval_on_selector_all("#stuck img, #stuck script, #stuck b", "els => els.length") == 0
            assert page.locator('#annotators tr[data-name="bob"]').inner_text().startswith("bob\tactive\t0\t1")
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "lead-desktop.png"), full_page=True)
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(f"http://127.0.0.1:{server.port}/lead#token={lead_token}")
            phone.wait_for_selector("#overview:not([hidden])")
            phone.screenshot(path=str(SHOTS / "lead-phone.png"), full_page=True)
            phone.close()
            card.locator("input").fill("B is the only safe one")
            card.locator('button[data-settle="b"]').click()
            page.wait_for_selector("#stuck-none:not([hidden])")
            assert "Item 1 settled: b." in page.inner_text("#message")
            assert "3/3 complete" in page.inner_text("#progress-text")
            page.locator('#annotators tr[data-name="bob"] button[data-action="pause"]').click()
            page.wait_for_selector('#annotators tr[data-name="bob"] td.state-paused')
            assert page.evaluate("window.__pwned") is None
            assert problems == []
            browser.close()
        settled = wait_for_labels(store, timeout=5, poll_seconds=0.1, progress=False)  # the label stage's wait
        assert settled.waiting == () and settled.by_lead == (1,)
        labels = {c.meta["item_index"]: c for c in comparisons(store)}
        assert sorted(labels) == [0, 1, 2]
        assert labels[1].chosen == PAIRS[1]["responses"][1] and labels[1].meta["lead"]["reason"] == "B is the only safe one"
        assert store.annotator_states()["bob"] == "paused"
    finally:
        server.stop()
        store.close()
