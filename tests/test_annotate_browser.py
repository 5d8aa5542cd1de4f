"""The annotator page in a real headless Chromium (Debian's, driven by Playwright): label with
the keyboard, undo, reload and go on, then read the labels straight from SQLite; and model
text full of markup shown as text, with no script run."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rlhfkit.feedback.web.app import create_app
from rlhfkit.feedback.web.pairs import read_pairs
from rlhfkit.feedback.web.store import AnnotationStore
from rlhfkit.serve import ServerThread
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, require_chromium, write_jsonl

SCREENSHOT = Path("/tmp/annotate_screenshot.png")
CHAT = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky on a clear day?"},
]
PAIRS = [
    {"prompt": "What is the capital of France?", "responses": ["Paris is the capital of France.", "It might be Lyon."]},
    {"prompt": CHAT, "response_a": "Blue.", "response_b": "On a clear day the sky is blue,\nbecause of Rayleigh scattering."},
    {"prompt": "Say something kind.", "responses": ["You are doing great!", "Go away."]},
    {"prompt": "Two plus two?", "responses": ["Four.", "Twenty-two."]},
]
XSS = [
    "<script>window.__pwned = 1; alert('script')</script>",
    "<img src=x onerror=\"window.__pwned = 2; alert('img')\">",
    '<b>bold?</b> & <a href="javascript:alert(3)">link</a>',
]


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def serve_pairs(tmp_path: Path, records: list[dict]):
    store = AnnotationStore(tmp_path / "labels.sqlite")
    store.configure(overlap=1)
    store.add_pairs(read_pairs(write_jsonl(tmp_path / "pairs.jsonl", records))[0])
    token = store.add_annotator("alice")
    return store, ServerThread(create_app(store), "127.0.0.1", 0).start(), token


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(url)
    return page, problems


def current(page) -> tuple[str, str, str]:
    """(prompt, shown A, shown B) as the user sees them."""
    return page.inner_text("#prompt"), page.inner_text("#response-a"), page.inner_text("#response-b")


def wait_for_new_pair(page, previous_prompt: str) -> None:
    page.wait_for_function("p => document.getElementById('prompt').innerText !== p", arg=previous_prompt)


def test_label_with_the_keyboard_undo_reload_and_continue(browser, tmp_path):
    store, server, token = serve_pairs(tmp_path, PAIRS)
    base = f"http://127.0.0.1:{server.port}"
    try:
        page, problems = open_page(browser, f"{base}/#token={token}")
        page.wait_for_selector("#task:not([hidden])")
        assert "#token" not in page.url and token not in page.url  # taken out of the address bar
        assert page.inner_text("#who") == "Annotator: alice"
        assert "0 labelled by you, 4 left for you" in page.inner_text("#progress-text")
        shown = {}  # item -> the response text shown as A

        # Pair 1: "1" = A is better.
        prompt, a, b = current(page)
        assert prompt == PAIRS[0]["prompt"] and {a, b} == set(PAIRS[0]["responses"])
        shown[0] = a
        page.screenshot(path=str(SCREENSHOT))
        page.keyboard.press("1")
        wait_for_new_pair(page, prompt)

        # Pair 2 (a chat prompt): "r", type a reason, Enter, then "2" = B is better.
        prompt, a, b = current(page)
        assert "System: Answer in one short sentence." in prompt and "User: What colour is the sky" in prompt
        assert "\nbecause of Rayleigh scattering." in a + b  # newlines kept (pre-wrap)
        shown[1] = a
        page.keyboard.press("r")
        page.keyboard.type("B explains why")
        page.keyboard.press("Enter")
        assert page.input_value("#reason") == "B explains why"
        page.keyboard.press("2")
        wait_for_new_pair(page, prompt)
        assert page.input_value("#reason") == ""
        assert "2 labelled by you, 2 left for you" in page.inner_text("#progress-text")

        # "u": pair 2 comes back, same order, its reason and choice shown; then a tie ("t") instead.
        third_prompt = page.inner_text("#prompt")
        page.keyboard.press("u")
        wait_for_new_pair(page, third_prompt)
        assert current(page)[1] == shown[1]
        assert page.input_value("#reason") == "B explains why"
        assert page.get_attribute("#choose-b", "class") == "previous"
        assert "1 labelled by you" in page.inner_text("#progress-text")
        page.fill("#reason", "")  # focuses the reason box; Escape leaves it for the shortcuts
        page.keyboard.press("Escape")
        undone_prompt = current(page)[0]  # read before "t": the next pair may already show by the time it returns
        page.keyboard.press("t")
        wait_for_new_pair(page, undone_prompt)

        # Reload: the token survives in sessionStorage and the same pair is shown again.
        prompt, a, b = current(page)
        page.reload()
        page.wait_for_selector("#task:not([hidden])")
        assert current(page) == (prompt, a, b)
        shown[2] = a
        page.keyboard.press("s")  # skip pair 3
        wait_for_new_pair(page, prompt)

        prompt, a, b = current(page)
        shown[3] = a
        page.keyboard.press("3")  # tie, then Ctrl+Z undoes it from the "done" screen, then "b"
        page.wait_for_selector("#done:not([hidden])")
        page.keyboard.press("Control+z")
        page.wait_for_selector("#task:not([hidden])")
        assert current(page) == (prompt, a, b)
        page.keyboard.press("b")
        page.wait_for_selector("#done:not([hidden])")
        assert "3 labelled by you, 0 left for you" in page.inner_text("#progress-text")
        assert "3/4 pairs complete" in page.inner_text("#progress-text")  # pair 3 was skipped: no vote
        assert problems == []
        page.close()
    finally:
        server.stop()
        store.close()

    # Straight from SQLite: canonical choices (a = the file's first response), worked out
    # from what the page showed, not from the stored order.
    with sqlite3.connect(tmp_path / "labels.sqlite") as con:
        rows = con.execute("""SELECT p.item_index, p.response_a, l.choice, l.flipped, l.reason, a.name FROM labels l
                              JOIN pairs p ON p.id = l.pair_id JOIN annotators a ON a.id = l.annotator_id
                              ORDER BY l.id""").fetchall()

    def canonical(item: int, response_a: str, pressed: str) -> str:
        if pressed in ("tie", "skip"):
            return pressed
        left_is_a = shown[item] == response_a
        return pressed if left_is_a else {"a": "b", "b": "a"}[pressed]

    expected = [(0, "a", ""), (1, "tie", ""), (2, "skip", ""), (3, "b", "")]
    assert [(item, choice, reason) for item, _, choice, _, reason, _ in rows] == [
        (item, canonical(item, rows[i][1], pressed), reason) for i, (item, pressed, reason) in enumerate(expected)
    ]
    assert all(bool(flipped) == (shown[item] != response_a) for item, response_a, _, flipped, _, _ in rows)
    assert {name for *_, name in rows} == {"alice"}


def test_markup_in_model_text_is_shown_as_text(browser, tmp_path):
    records = [
        {"prompt": f"Repeat after me: {XSS[0]}", "responses": [XSS[1], XSS[2]]},
        {"prompt": [{"role": "user", "content": XSS[1]}], "responses": ["plain", XSS[0]]},
    ]
    store, server, token = serve_pairs(tmp_path, records)
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/?token={token}")
        page.wait_for_selector("#task:not([hidden])")
        for item in range(2):
            prompt, a, b = current(page)
            expected_prompt = records[item]["prompt"]
            if isinstance(expected_prompt, list):
                expected_prompt = f"User: {expected_prompt[0]['content']}"
            assert prompt == expected_prompt  # the literal markup is what the reader sees
            assert {a, b} == set(records[item]["responses"])
            # No element was made from model text: the boxes hold only text (and the chat turn's own spans).
            assert page.eval_on_selector_all("#task img, #task script, #task b, #task a", "els => els.length") == 0
            assert page.evaluate("window.__pwned") is None
            page.keyboard.press("a")
            if item == 0:
                wait_for_new_pair(page, prompt)
        page.wait_for_selector("#done:not([hidden])")
        page.wait_for_timeout(200)  # give a broken image's onerror time to fire
        assert page.evaluate("window.__pwned") is None
        assert problems == []  # no alert dialog, no console error (CSP violations would be errors)
        page.close()
    finally:
        server.stop()
        store.close()
    with sqlite3.connect(tmp_path / "labels.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM labels").fetchone() == (2,)
