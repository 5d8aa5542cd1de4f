"""Thumbs up / down mode: the store, the HTTP API, the export KTO reads (and trains on), the terminal
annotator, and the page in a real headless Chromium (click and keyboard)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from rlhfkit.data.unpaired import load_unpaired
from rlhfkit.feedback.terminal import annotate_thumbs, main_thumbs
from rlhfkit.feedback.web import cli
from rlhfkit.feedback.web.admin import ExportConfig, export, thumbs_records
from rlhfkit.feedback.web.app import create_app
from rlhfkit.feedback.web.pairs import read_thumb_items
from rlhfkit.feedback.web.store import MODE_PAIRS, MODE_THUMBS, AnnotationStore, PairItem, StoreError
from rlhfkit.serve import ServerThread
from tests.annotate_client import Client
from tests.helpers import read_jsonl, write_jsonl

SAMPLES = [
    {"prompt": "What is the capital of France?", "responses": ["Paris.", "Lyon, probably."]},
    {"prompt": [{"role": "user", "content": "Say something **kind**."}], "responses": ["You are doing great!", "", "Go away."]},
]
"""Five responses in all; the empty one (item 3) keeps its number and is not rated."""


def thumbs_store(tmp_path: Path, *, overlap: int = 1) -> AnnotationStore:
    store = AnnotationStore(tmp_path / "thumbs.sqlite")
    store.configure(overlap=overlap)
    items, empty = read_thumb_items(write_jsonl(tmp_path / "samples.jsonl", SAMPLES))
    assert (len(items), empty) == (4, 1)
    assert store.add_thumbs(items) == 4
    return store


def test_samples_become_one_item_per_response(tmp_path):
    items, _ = read_thumb_items(write_jsonl(tmp_path / "s.jsonl", SAMPLES))
    assert [(i.item_index, i.response) for i in items] == [
        (0, "Paris."),
        (1, "Lyon, probably."),
        (2, "You are doing great!"),
        (4, "Go away."),
    ]
    assert items[2].prompt == [{"role": "user", "content": "Say something **kind**."}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "responses": "not a list"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field .responses.: expected a non-empty list"):
        read_thumb_items(bad)


def test_votes_majority_ties_and_the_kto_export(tmp_path):
    store = thumbs_store(tmp_path, overlap=2)
    assert store.mode == MODE_THUMBS
    x, y = (store.annotator_for_token(store.add_annotator(n)).id for n in ("x", "y"))
    # Thumbs items are never shown swapped, and take only up / down / skip.
    first = store.next_assignment(x)
    assert (first.item_index, first.left, first.right, first.flipped) == (0, "Paris.", "", False)
    with pytest.raises(StoreError, match="up, down, skip in thumbs mode"):
        store.submit(x, first.pair_id, "a")
    with pytest.raises(StoreError, match="thumbs mode rates one"):
        store.submit(x, first.pair_id, "up", both_bad=True)
    answers = {x: ["up", "down", "up", "skip"], y: ["up", "up", "down", "down"]}
    for who, choices in answers.items():
        for choice in choices:
            shown = store.next_assignment(who)
            store.submit(who, shown.pair_id, choice, reason=f"{who}:{choice}")
    records, ties = thumbs_records(store)
    # item 0: up+up; item 1: down+up (tie, left out); item 2: up+down (tie); item 4: y down, x skipped.
    assert ties == 2
    assert [(r["meta"]["item_index"], r["completion"], r["label"]) for r in records] == [
        (0, "Paris.", True),
        (4, "Go away.", False),
    ]
    assert records[1]["meta"]["skipped"] == [{"annotator": "x", "reason": "1:skip"}]
    assert records[0]["meta"]["votes"] == {"up": 2, "down": 0} and records[0]["meta"]["annotators"] == ["x", "y"]
    # The lead settles a tie: it is exported with the lead's label.
    store.settle(1, "down", "Lyon is wrong")
    records, ties = thumbs_records(store)
    assert ties == 1 and [(r["meta"]["item_index"], r["label"]) for r in records] == [(0, True), (1, False), (4, False)]
    assert records[1]["meta"]["lead"]["reason"] == "Lyon is wrong"
    with pytest.raises(StoreError, match="up, down"):
        store.settle(2, "a")
    store.close()

    out = tmp_path / "kto.jsonl"
    result = export(ExportConfig(db=str(tmp_path / "thumbs.sqlite"), output=str(out)))
    assert (result.written, result.left_out, result.thumbs) == (3, 1, True)
    examples = load_unpaired(out)  # the KTO reader takes the file as it is
    assert [(e.completion, e.desirable) for e in examples] == [("Paris.", True), ("Lyon, probably.", False), ("Go away.", False)]
    assert examples[2].prompt == [{"role": "user", "content": "Say something **kind**."}]
    with pytest.raises(ValueError, match="thumbs database exports KTO records"):
        export(ExportConfig(db=str(tmp_path / "thumbs.sqlite"), output=str(out), format="trl"))


def test_one_mode_per_database(tmp_path):
    store = AnnotationStore(tmp_path / "pairs.sqlite")
    store.add_pairs([PairItem(0, "Q?", ("a", "b"))])
    assert store.mode == MODE_PAIRS
    with pytest.raises(ValueError, match="holds 1 item.*pairs mode; use a new --db for thumbs"):
        store.configure(mode=MODE_THUMBS)
    token = store.add_annotator("x")
    shown = store.next_assignment(store.annotator_for_token(token).id)
    with pytest.raises(StoreError, match="in pairs mode"):  # a pair takes no thumbs
        store.submit(store.annotator_for_token(token).id, shown.pair_id, "up")
    store.close()


def test_http_thumbs_round_trip(tmp_path):
    store = thumbs_store(tmp_path)
    token = store.add_annotator("alice")
    server = ServerThread(create_app(store), "127.0.0.1", 0).start()
    client = Client(f"http://127.0.0.1:{server.port}", token)
    try:
        status, data = client.post("/api/next")
        assert status == 200 and data["mode"] == MODE_THUMBS
        assert data["assignment"] == {
            "pair_id": data["assignment"]["pair_id"],
            "prompt": SAMPLES[0]["prompt"],
            "response": "Paris.",
        }
        status, bad = client.post("/api/label", {"pair_id": data["assignment"]["pair_id"], "choice": "tie"})
        assert status == 422 and "thumbs mode" in bad["detail"]
        status, data = client.post("/api/label", {"pair_id": data["assignment"]["pair_id"], "choice": "up", "reason": "right"})
        assert status == 200 and data["assignment"]["response"] == "Lyon, probably."
        status, undone = client.post("/api/undo")
        assert status == 200 and undone["undone"]["choice"] == "up" and undone["undone"]["reason"] == "right"
        status, task = client.post("/api/task")
        assert task["mode"] == MODE_THUMBS
    finally:
        client.close()
        server.stop()
        store.close()


def test_exported_thumbs_train_kto_on_the_tiny_model(tmp_path, capsys):
    """``rlhfkit annotate export`` of a thumbs database, then 2 KTO steps on it with the tiny model."""
    from rlhfkit import kto
    from tests.test_kto import kto_config

    store = thumbs_store(tmp_path)
    who = store.annotator_for_token(store.add_annotator("alice")).id
    for choice in ["up", "down", "up", "down"]:
        store.submit(who, store.next_assignment(who).pair_id, choice)
    store.close()
    out = tmp_path / "kto.jsonl"
    assert cli.main(["export", "--db", str(tmp_path / "thumbs.sqlite"), str(out)]) == 0
    assert "4 KTO records in" in capsys.readouterr().err
    assert [r["label"] for r in read_jsonl(out)] == [True, False, True, False]
    config = kto_config(tmp_path, "kto", data=str(out), max_steps=2, batch_size=4, ref_cache=False)
    kto.train(config)
    assert "4 train examples (2 desirable, 2 undesirable)" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]


def test_terminal_thumbs_mode_saves_undoes_and_resumes(tmp_path):
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    out = tmp_path / "thumbs.jsonl"
    # Item 0 up with a reason; item 1 down; undo (item 1 again) then up; quit at item 2.
    typed = io.StringIO("y\nshort and right\nn\n\nu\n+\n\nq\n")
    screen = io.StringIO()
    items, _ = read_thumb_items(samples)
    dense = [None] * 5
    for item in items:
        dense[item.item_index] = (item.prompt, item.response)
    annotate_thumbs(dense, out, annotator="alice", stdin=typed, stdout=screen)
    assert "--- Response ---\n  Lyon, probably." in screen.getvalue()
    assert [(r["item_index"], r["label"], r["meta"]["labels"][0]["reason"]) for r in read_jsonl(out)] == [
        (0, True, "short and right"),
        (1, True, ""),
    ]
    # Resume from the CLI: items 0 and 1 are not shown again; item 2 down, item 4 skipped, then done.
    import sys

    stdin, stdout = sys.stdin, sys.stdout
    sys.stdin, sys.stdout = io.StringIO("-\n\ns\n"), io.StringIO()
    try:
        assert cli.main(["terminal", str(samples), str(out), "--annotator", "alice", "--mode", "thumbs"]) == 0
        shown = sys.stdout.getvalue()
    finally:
        sys.stdin, sys.stdout = stdin, stdout
    assert "Paris." not in shown and "You are doing great!" in shown
    assert [(e.completion, e.desirable) for e in load_unpaired(out)] == [
        ("Paris.", True),
        ("Lyon, probably.", True),
        ("You are doing great!", False),
    ]
    # A labels file from other samples is refused, naming the file.
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "Other?", "responses": ["x", "y", "z"]}])
    with pytest.raises(ValueError, match=r"thumbs.jsonl.*does not match item 0"):
        main_thumbs(other, out)


# ----------------------------------------------------------------------------- in the browser

SHOTS = Path("/tmp/s20/shots")
XSS_RESPONSE = '<img src=x onerror="window.__pwned = 1"> **bold** and `code`'


def test_thumbs_up_by_click_and_down_by_keyboard_reach_the_kto_export(tmp_path):
    """In Chromium an annotator gives 👍 to one response (click) and 👎 to another (ArrowDown), skips one with
    "s", undoes with "u" and rates it 👍 with "y"; the export holds the KTO records with those labels. Markup in
    the response is shown as text (markdown rendered), no script runs."""
    from tests.helpers import require_chromium
    from tests.test_annotate_browser import CHROMIUM, CHROMIUM_ARGS, open_page

    require_chromium()
    from playwright.sync_api import sync_playwright

    samples = [
        {"prompt": "What is the capital of France?", "responses": ["Paris is the capital.", XSS_RESPONSE]},
        {"prompt": "Two plus two?", "responses": ["Four."]},
    ]
    store = AnnotationStore(tmp_path / "thumbs.sqlite")
    store.configure(overlap=2)  # bob, on a phone, still has items for the screenshot
    store.add_thumbs(read_thumb_items(write_jsonl(tmp_path / "samples.jsonl", samples))[0])
    token = store.add_annotator("alice")
    server = ServerThread(create_app(store), "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{server.port}/#token={token}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page, problems = open_page(browser, url)
            page.wait_for_selector("#task:not([hidden])")
            assert page.inner_text("#title") == "Is this response good?"
            assert page.is_visible("#thumb-up") and page.is_visible("#thumb-down")
            assert not page.is_visible("#card-b") and not page.is_visible("#choose-a")  # the pair's scale is off
            assert page.inner_text("#response-a") == "Paris is the capital."
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "thumbs-desktop.png"), full_page=True)
            page.keyboard.press("a")  # a pair key: nothing happens in thumbs mode
            page.wait_for_timeout(200)
            assert page.inner_text("#response-a") == "Paris is the capital."
            page.click("#thumb-up")  # 👍 by click
            page.wait_for_function("() => document.getElementById('response-a').innerText.includes('bold')")
            # The payload is text; **bold** and `code` are rendered by the safe markdown renderer.
            assert page.eval_on_selector_all("#task img", "els => els.length") == 0
            assert page.inner_text("#response-a strong") == "bold"
            page.keyboard.press("r")
            page.keyboard.type("markup soup")
            page.keyboard.press("Enter")
            page.keyboard.press("ArrowDown")  # 👎 by keyboard, with a reason
            page.wait_for_function("() => document.getElementById('response-a').innerText === 'Four.'")
            assert "Saved: \U0001f44e bad." in page.inner_text("#message")
            page.keyboard.press("s")  # skip, then undo it and give 👍 with "y"
            page.wait_for_selector("#done:not([hidden])")
            page.keyboard.press("u")
            page.wait_for_selector("#task:not([hidden])")
            assert page.get_attribute("#choose-skip", "class") == "previous"
            page.keyboard.press("y")
            page.wait_for_selector("#done:not([hidden])")
            assert "3 labelled by you, 0 left for you" in page.inner_text("#progress-text")
            assert page.evaluate("window.__pwned") is None
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            # A second annotator's page on a phone, for the screenshot (the first one is done).
            phone.goto(f"http://127.0.0.1:{server.port}/#token={store.add_annotator('bob')}")
            phone.wait_for_selector("#task:not([hidden])")
            phone.screenshot(path=str(SHOTS / "thumbs-phone.png"), full_page=True)
            assert problems == []
            browser.close()
    finally:
        server.stop()
        store.close()
    out = tmp_path / "kto.jsonl"
    export(ExportConfig(db=str(tmp_path / "thumbs.sqlite"), output=str(out)))
    records = read_jsonl(out)
    assert [(r["completion"], r["label"]) for r in records] == [
        ("Paris is the capital.", True),
        (XSS_RESPONSE, False),
        ("Four.", True),
    ]
    assert records[1]["meta"]["labels"] == [{"annotator": "alice", "choice": "down", "reason": "markup soup"}]
    assert [(e.completion, e.desirable) for e in load_unpaired(out)] == [(r["completion"], r["label"]) for r in records]
