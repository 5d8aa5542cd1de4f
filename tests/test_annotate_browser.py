"""The annotator page in a real headless Chromium (Debian's, driven by Playwright): label with
the keyboard, undo, reload and go on, then read the labels straight from SQLite; and model
text full of markup shown as text, with no script run."""

from __future__ import annotations

import sqlite3
import time
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


# ----------------------------------------------------------------------------- issue 25: RTL, scrolling, errors, tokens

RTL_SCREENSHOT = Path("/tmp/s18/rtl.png")
ARABIC_PROMPT = "ما هي عاصمة فرنسا؟"
HEBREW_A = "פריז היא בירת צרפת."
HEBREW_B = "אולי ליון?"
PERSIAN_CHAT = [{"role": "user", "content": "آسمان در یک روز صاف چه رنگی است؟"}]
PERSIAN_REASON = "پاسخ اول درست است."

DIRECTION = "el => [getComputedStyle(el).direction, el.matches(':dir(rtl)')]"
TEXT_EDGES = """el => {
  const range = document.createRange();
  range.selectNodeContents(el);
  const text = range.getBoundingClientRect(), box = el.getBoundingClientRect();
  return {gapLeft: text.left - box.left, gapRight: box.right - text.right};
}"""


def stored_labels(tmp_path: Path):
    store = AnnotationStore(tmp_path / "labels.sqlite", create=False)
    try:
        return store.labels()
    finally:
        store.close()


def direction(page, selector: str) -> str:
    computed, matches_rtl = page.eval_on_selector(selector, DIRECTION)
    assert matches_rtl == (computed == "rtl"), (selector, computed, matches_rtl)
    return computed


def test_right_to_left_text_is_laid_out_right_to_left(browser, tmp_path):
    records = [
        {"prompt": ARABIC_PROMPT, "responses": [HEBREW_A, HEBREW_B]},
        {"prompt": "What is the capital of France?", "responses": ["Paris.", "Lyon?"]},
        {"prompt": PERSIAN_CHAT, "responses": ["آبی.", "Blue."]},
    ]
    store, server, token = serve_pairs(tmp_path, records)
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={token}")
        page.wait_for_selector("#task:not([hidden])")
        assert current(page)[0] == ARABIC_PROMPT
        for selector in ("#prompt", "#response-a", "#response-b"):
            assert direction(page, selector) == "rtl", selector
            # Laid out from the right: the text hugs the box's right edge, far from its left one.
            edges = page.eval_on_selector(selector, TEXT_EDGES)
            assert edges["gapRight"] < 20 < edges["gapLeft"], (selector, edges)
        assert direction(page, "h2") == "ltr"  # the page's own (English) labels stay left to right
        assert direction(page, "#reason") == "ltr"  # empty
        page.keyboard.press("r")
        page.keyboard.type(PERSIAN_REASON)
        assert direction(page, "#reason") == "rtl"
        page.keyboard.press("Enter")
        RTL_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(RTL_SCREENSHOT))
        page.keyboard.press("a")
        wait_for_new_pair(page, ARABIC_PROMPT)

        # An English pair stays left to right, and the reason box with it.
        assert current(page)[0] == "What is the capital of France?"
        for selector in ("#prompt", "#response-a", "#response-b", "#reason"):
            assert direction(page, selector) == "ltr", selector
        page.keyboard.press("b")
        wait_for_new_pair(page, "What is the capital of France?")

        # A chat turn takes its direction from its content, not from the English role label.
        assert direction(page, "#prompt .turn") == "rtl"
        assert page.inner_text("#prompt") == f"User: {PERSIAN_CHAT[0]['content']}"
        shown_a = page.inner_text("#response-a")
        assert direction(page, "#response-a") == ("rtl" if shown_a == "آبی." else "ltr")
        assert direction(page, "#response-b") == ("ltr" if shown_a == "آبی." else "rtl")
        assert problems == []
        page.close()
    finally:
        server.stop()
        store.close()
    assert stored_labels(tmp_path)[0].reason == PERSIAN_REASON


LONG = "\n".join(f"Line {i} of a long answer." for i in range(150))


def test_next_pair_opens_at_its_top_and_a_failed_save_is_in_view(browser, tmp_path):
    records = [{"prompt": f"Long question {i}?", "responses": [f"{LONG}\nA{i}", f"{LONG}\nB{i}"]} for i in range(3)]
    store, server, token = serve_pairs(tmp_path, records)
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={token}")
        page.wait_for_selector("#task:not([hidden])")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # down to the buttons
        assert page.evaluate("window.scrollY") > 1000
        prompt = current(page)[0]
        page.click("#choose-a")
        wait_for_new_pair(page, prompt)
        assert page.evaluate("window.scrollY") == 0  # the next pair opens at its top

        # A save that fails (the token was revoked meanwhile) far down a long pair: the error is in view.
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        scrolled = page.evaluate("window.scrollY")
        assert scrolled > 1000
        store.add_annotator("alice", replace_token=True)
        page.click("#choose-b")
        page.wait_for_selector("#message.error:not([hidden])")
        assert "Not saved: unknown token" in page.inner_text("#message")
        box = page.eval_on_selector("#message", "el => el.getBoundingClientRect().toJSON()")
        height = page.evaluate("window.innerHeight")
        assert 0 <= box["top"] and box["bottom"] <= height and box["height"] > 10, (box, height)
        assert abs(page.evaluate("window.scrollY") - scrolled) < 100  # the page did not jump away from the pair
        assert page.eval_on_selector(
            "#message",
            "el => document.elementFromPoint(el.getBoundingClientRect().left + 5, el.getBoundingClientRect().top + 5) === el",
        )  # on top, not covered
        page.close()
        assert [p for p in problems if "401" not in p] == []  # the browser logs the failed request itself
    finally:
        server.stop()
        store.close()


def test_a_token_link_pasted_into_an_open_tab_takes_effect_without_a_reload(browser, tmp_path):
    store, server, alice = serve_pairs(tmp_path, PAIRS)
    bob = store.add_annotator("bob")
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={alice}")
        page.wait_for_selector("#task:not([hidden])")
        assert page.inner_text("#who") == "Annotator: alice"
        alice_prompt = current(page)[0]
        page.evaluate("() => { window.__sameDocument = true; }")
        page.evaluate("t => { location.hash = 'token=' + t; }", bob)
        page.wait_for_function("() => document.getElementById('who').textContent === 'Annotator: bob'")
        assert page.evaluate("window.__sameDocument") is True  # no reload happened
        assert bob not in page.url and "#token" not in page.url  # taken out of the address bar again
        assert current(page)[0] != alice_prompt  # alice still holds her pair; bob gets the next one
        bob_prompt = current(page)[0]
        page.keyboard.press("a")
        wait_for_new_pair(page, bob_prompt)
        page.reload()  # the new token is the one kept for this tab
        page.wait_for_selector("#task:not([hidden])")
        assert page.inner_text("#who") == "Annotator: bob"
        assert problems == []
        page.close()
    finally:
        server.stop()
        store.close()
    assert [(label.annotator, label.item_index) for label in stored_labels(tmp_path)] == [("bob", 1)]


def test_done_page_picks_up_a_pair_an_abandoned_tab_gave_back(browser, tmp_path):
    from tests.annotate_client import Client

    store, server, alice = serve_pairs(tmp_path, PAIRS[:1])
    store.configure(lease_seconds=1.0)
    bob = Client(f"http://127.0.0.1:{server.port}", store.add_annotator("bob"))
    try:
        assert bob.post("/api/next")[1]["assignment"] is not None  # bob's tab takes the only pair, then is left
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.clock.install()
        page.goto(f"http://127.0.0.1:{server.port}/#token={alice}")
        page.wait_for_selector("#done:not([hidden])")
        assert "1 pair still needs a vote" in page.inner_text("#done-waiting")
        time.sleep(1.2)  # bob's reservation runs out (the server's real clock)
        page.clock.run_for(16_000)  # the page's own timer: it asks again
        page.wait_for_selector("#task:not([hidden])")
        assert current(page)[0] == PAIRS[0]["prompt"]
        page.close()
    finally:
        bob.close()
        server.stop()
        store.close()
