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
from tests.test_annotate_store import FakeClock

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


def serve_pairs(tmp_path: Path, records: list[dict], clock=time.time, **app_options):
    store = AnnotationStore(tmp_path / "labels.sqlite", clock=clock)
    store.configure(overlap=1)
    store.add_pairs(read_pairs(write_jsonl(tmp_path / "pairs.jsonl", records))[0])
    token = store.add_annotator("alice")
    return store, ServerThread(create_app(store, **app_options), "127.0.0.1", 0).start(), token


def open_page(browser, url: str, viewport: dict | None = None):
    page = browser.new_page(viewport=viewport or {"width": 1280, "height": 800})
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

    # The store's clock is a fake one: on a slow machine a real 1-second lease ran out before the page had loaded
    # (the page then got the pair at once, and never showed the done page).
    clock = FakeClock()
    store, server, alice = serve_pairs(tmp_path, PAIRS[:1], clock=clock)
    store.configure(lease_seconds=60.0)
    bob = Client(f"http://127.0.0.1:{server.port}", store.add_annotator("bob"))
    try:
        assert bob.post("/api/next")[1]["assignment"] is not None  # bob's tab takes the only pair, then is left
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.clock.install()
        page.goto(f"http://127.0.0.1:{server.port}/#token={alice}")
        page.wait_for_selector("#done:not([hidden])")
        assert "1 pair still needs a vote" in page.inner_text("#done-waiting")
        clock.now += 61.0  # bob's reservation runs out (the server's clock)
        page.clock.run_for(16_000)  # the page's own timer: it asks again
        page.wait_for_selector("#task:not([hidden])")
        assert current(page)[0] == PAIRS[0]["prompt"]
        page.close()
    finally:
        bob.close()
        server.stop()
        store.close()


# ----------------------------------------------------------------------------- issue 25: guidelines, grades, markdown

SHOTS = Path("/tmp/s19/shots")
GUIDELINES = """# How to judge

Read the **prompt** first, then both answers.

- Prefer answers that are *correct*, then *helpful*.
- A refusal of a harmless request is **worse** than a short answer.
- Use *much better* only when one answer is clearly unusable.

<script>window.__pwned = 'guidelines'</script> stays text, as does `<img src=x onerror="window.__pwned = 'g2'">`.
"""
CRITERIA = ["helpful", "harmless", "honest"]
MARKDOWN_ANSWER = """## Sorting a list in Python

Use **`sorted()`** for a *new* list, or `list.sort()` to sort *in place*:

```python
numbers = [3, 1, 2]
print(sorted(numbers))  # [1, 2, 3]
html = "<script>window.__pwned = 'code'</script>"
```

| Function | Returns | In place |
|---|:---:|---:|
| `sorted(xs)` | a new list | no |
| `xs.sort()` | <img src=x onerror="window.__pwned = 'cell'"> | yes |

1. Pick one.
2. Call it:
   - with `key=` for a custom order
   - with `reverse=True` to flip it

> Tip: *both* are stable. [a link](javascript:window.__pwned='link') stays text.

# <script>window.__pwned = 'heading'</script>
**<b>bold?</b>** and <img src=x onerror="window.__pwned = 'inline'">
"""
PLAIN_ANSWER = "Just use `sort`. It works.\n\nOr don't."
MARKDOWN_CHAT = [{"role": "user", "content": "Two ways to sort, please:\n\n- a new list\n- *in place*"}]


def test_guidelines_and_criteria_are_shown_above_the_pair(browser, tmp_path):
    store, server, token = serve_pairs(tmp_path, PAIRS[:2], guidelines=GUIDELINES, criteria=CRITERIA)
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={token}")
        page.wait_for_selector("#task:not([hidden])")
        page.wait_for_selector("#guidelines-text h1")
        # Above the pair, open at first, rendered as markdown.
        assert page.is_visible("#guidelines") and page.evaluate("document.getElementById('guidelines').open")
        top = page.eval_on_selector("#guidelines", "el => el.getBoundingClientRect().bottom")
        assert top < page.eval_on_selector("#prompt", "el => el.getBoundingClientRect().top")
        assert page.inner_text("#guidelines-text h1") == "How to judge"
        assert page.eval_on_selector_all("#guidelines-text li", "els => els.map(e => e.innerText)") == [
            "Prefer answers that are correct, then helpful.",
            "A refusal of a harmless request is worse than a short answer.",
            "Use much better only when one answer is clearly unusable.",
        ]
        assert page.inner_text("#guidelines-text strong") == "prompt"
        assert "<script>window.__pwned = 'guidelines'</script> stays text" in page.inner_text("#guidelines-text")
        assert page.eval_on_selector_all("#brief script, #brief img", "els => els.length") == 0
        # The criteria, as a short list.
        assert page.eval_on_selector_all("#criteria-list li", "els => els.map(e => e.textContent)") == CRITERIA
        assert page.is_visible("#criteria")
        # Collapsible: closed with a click, and it stays closed for this tab (next pair, reload).
        page.click("#guidelines summary")
        assert not page.is_visible("#guidelines-text") and page.is_visible("#guidelines summary")
        prompt = current(page)[0]
        page.keyboard.press("a")
        wait_for_new_pair(page, prompt)
        assert not page.is_visible("#guidelines-text")
        page.reload()
        page.wait_for_selector("#brief:not([hidden])")
        assert not page.is_visible("#guidelines-text") and page.is_visible("#criteria")
        page.click("#guidelines summary")
        assert page.is_visible("#guidelines-text")
        assert page.evaluate("window.__pwned") is None
        assert problems == []
        page.close()
    finally:
        server.stop()
        store.close()
    # Without guidelines or criteria nothing of it shows.
    store, server, token = serve_pairs(tmp_path / "plain", PAIRS[:1])
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={token}")
        page.wait_for_selector("#task:not([hidden])")
        page.wait_for_timeout(200)
        assert not page.is_visible("#brief") and not page.is_visible("#guidelines")
        assert problems == []
        page.close()
    finally:
        server.stop()
        store.close()


def test_graded_labels_and_both_bad_reach_the_export(browser, tmp_path):
    from rlhfkit import cli
    from tests.helpers import read_jsonl

    records = [{"prompt": f"Question {i}?", "responses": [f"First answer {i}.", f"Second answer {i}."]} for i in range(4)]
    store, server, token = serve_pairs(tmp_path, records)
    left = {}  # item -> index (0 = response_a) of the response the page showed as A
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={token}")
        page.wait_for_selector("#task:not([hidden])")
        assert page.get_attribute("#both-bad", "aria-pressed") == "false"
        assert page.eval_on_selector_all(
            ".scale button", "els => els.map(e => e.textContent.split(' ')[0] + ' ' + (e.dataset.grade || e.dataset.choice))"
        ) == ["A much_better", "A better", "A slightly_better", "Tie tie", "B slightly_better", "B better", "B much_better"]

        def shown_a(item: int) -> None:
            left[item] = records[item]["responses"].index(page.inner_text("#response-a"))

        # Pair 0: Shift+A = "A much better".
        prompt = current(page)[0]
        shown_a(0)
        page.keyboard.press("Shift+A")
        wait_for_new_pair(page, prompt)
        assert page.inner_text("#message") == "Saved: A much better."

        # Pair 1: x (both bad), then v = "B slightly better".
        prompt = current(page)[0]
        shown_a(1)
        page.keyboard.press("x")
        assert page.get_attribute("#both-bad", "aria-pressed") == "true"
        page.keyboard.press("v")
        wait_for_new_pair(page, prompt)
        assert page.inner_text("#message") == "Saved: B slightly better, both bad."
        assert page.get_attribute("#both-bad", "aria-pressed") == "false"  # a new pair starts without it

        # Pair 2: a click on "A slightly better", undone: the button and the flag show what was chosen.
        prompt = current(page)[0]
        shown_a(2)
        page.click("#both-bad")
        page.click("#choose-a-slightly")
        wait_for_new_pair(page, prompt)
        next_prompt = current(page)[0]
        page.keyboard.press("u")
        wait_for_new_pair(page, next_prompt)
        assert page.get_attribute("#choose-a-slightly", "class") == "previous"
        assert page.get_attribute("#both-bad", "aria-pressed") == "true"
        assert "you had chosen: A slightly better, both bad" in page.inner_text("#message")
        page.keyboard.press("x")  # not both bad after all
        page.keyboard.press("2")  # "B better", the old key
        wait_for_new_pair(page, prompt)

        # Pair 3: tie with the old key.
        prompt = current(page)[0]
        shown_a(3)
        page.keyboard.press("t")
        page.wait_for_selector("#done:not([hidden])")
        assert problems == []
        page.close()
    finally:
        server.stop()
        store.close()

    db, output = tmp_path / "labels.sqlite", tmp_path / "labels.jsonl"
    assert cli.main(["annotate", "export", "--db", str(db), str(output)]) == 0
    exported = {r["meta"]["item_index"]: r for r in read_jsonl(output)}

    def canonical(item: int, shown: str) -> str:
        """The response the annotator meant by screen side `shown`, in the file's order."""
        return "ab"[left[item] if shown == "a" else 1 - left[item]]

    # (item, screen side chosen, grade on screen, both bad) -> what the export must say.
    pressed = [(0, "a", "much_better", False), (1, "b", "slightly_better", True), (2, "b", "better", False)]
    for item, side, grade, both_bad in pressed:
        record, winner = exported[item], canonical(item, side)
        assert record["ranking"] == ([0, 1] if winner == "a" else [1, 0]) and not record["tie"]
        assert record["meta"]["grade"] == f"{winner}_{grade}"
        assert record["meta"]["labels"][0]["grade"] == f"{winner}_{grade}"
        assert record["meta"]["both_bad"] is both_bad and record["meta"]["labels"][0]["both_bad"] is both_bad
        assert (record["meta"]["target"], record["meta"]["margin"]) == {
            "much_better": (1.0, 1.0),
            "better": (0.9, 0.5),
            "slightly_better": (0.7, 0.25),
        }[grade]
    assert exported[3]["tie"] and exported[3]["meta"]["grade"] == "tie" and exported[3]["meta"]["target"] == 0.5


def test_markdown_renders_while_script_payloads_stay_inert(browser, tmp_path):
    records = [
        {"prompt": "How do I sort a list in Python?", "responses": [MARKDOWN_ANSWER, PLAIN_ANSWER]},
        {"prompt": MARKDOWN_CHAT, "responses": [MARKDOWN_ANSWER, XSS[1]]},
    ]
    store, server, token = serve_pairs(tmp_path, records, guidelines=GUIDELINES, criteria=CRITERIA)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={token}")
        page.wait_for_selector("#task:not([hidden])")
        page.wait_for_selector("#guidelines-text h1")
        side = "#response-a" if "Sorting" in page.inner_text("#response-a") else "#response-b"
        other = "#response-b" if side == "#response-a" else "#response-a"
        # Rendered: heading, code block, table, nested list, quote, emphasis, inline code.
        assert page.inner_text(f"{side} h2") == "Sorting a list in Python"
        code = page.eval_on_selector(f"{side} pre code", "el => el.textContent")
        assert code.startswith("numbers = [3, 1, 2]\n") and "html = \"<script>window.__pwned = 'code'</script>\"" in code
        assert page.eval_on_selector_all(f"{side} table th", "els => els.map(e => e.textContent)") == [
            "Function",
            "Returns",
            "In place",
        ]
        cells = page.eval_on_selector_all(f"{side} table tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
        assert cells == [
            ["sorted(xs)", "a new list", "no"],
            ["xs.sort()", "<img src=x onerror=\"window.__pwned = 'cell'\">", "yes"],
        ]
        assert page.eval_on_selector_all(f"{side} table td.align-right", "els => els.length") == 2
        assert page.eval_on_selector_all(f"{side} ol > li", "els => els.length") == 2
        assert page.eval_on_selector_all(f"{side} ol > li ul > li code", "els => els.map(e => e.textContent)") == [
            "key=",
            "reverse=True",
        ]
        assert page.inner_text(f"{side} blockquote").startswith("Tip: both are stable. [a link](javascript:")
        assert page.eval_on_selector(f"{side} strong code", "el => el.textContent") == "sorted()"
        assert page.inner_text(f"{side} h1") == "<script>window.__pwned = 'heading'</script>"
        assert "<b>bold?</b> and <img src=x onerror=" in page.inner_text(side)
        # A short answer stays as written: one paragraph per block, inline code, no stray markup.
        assert page.eval_on_selector_all(f"{other} p", "els => els.map(e => e.innerText)") == [
            "Just use sort. It works.",
            "Or don't.",
        ]
        # Inert: no element was made from the payloads, nothing ran.
        for selector in ("script", "img", "a", "b", "iframe", "[onerror]"):
            assert page.eval_on_selector_all(f"#task {selector}, #brief {selector}", "els => els.length") == 0, selector
        page.wait_for_timeout(200)  # give a broken image's onerror time to fire
        assert page.evaluate("window.__pwned") is None

        # Screenshots: guidelines, the graded scale and a markdown answer, desktop and phone.
        page.screenshot(path=str(SHOTS / "annotate-desktop.png"), full_page=True)
        phone, phone_problems = open_page(
            browser, f"http://127.0.0.1:{server.port}/#token={token}", viewport={"width": 390, "height": 844}
        )
        phone.wait_for_selector("#guidelines-text h1")
        assert phone.eval_on_selector(".scale", "el => el.scrollWidth <= el.clientWidth")  # the scale fits
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling of the page
        phone.screenshot(path=str(SHOTS / "annotate-phone.png"), full_page=True)
        phone.close()

        # "Plain text" shows the model's text exactly as written; unticked, the rendering is back.
        page.check("#plain")
        assert page.inner_text(side) == MARKDOWN_ANSWER.rstrip("\n") or page.inner_text(side) == MARKDOWN_ANSWER
        assert page.eval_on_selector_all(f"{side} table, {side} pre", "els => els.length") == 0
        page.uncheck("#plain")
        assert page.eval_on_selector_all(f"{side} table, {side} pre", "els => els.length") == 2

        # A chat prompt's markdown turn, then the next pair.
        prompt = current(page)[0]
        page.keyboard.press("a")
        wait_for_new_pair(page, prompt)
        assert page.eval_on_selector_all("#prompt .turn-body li", "els => els.map(e => e.innerText)") == [
            "a new list",
            "in place",
        ]
        assert page.inner_text("#prompt .role") == "User:"
        assert page.eval_on_selector_all("#task script, #task img", "els => els.length") == 0
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None
        assert problems == [] and phone_problems == []
        page.close()
    finally:
        server.stop()
        store.close()


ALLOWED_TAGS = {"P", "H1", "H2", "H3", "H4", "H5", "H6", "STRONG", "EM", "DEL", "CODE", "PRE", "UL", "OL", "LI"}
ALLOWED_TAGS |= {"BLOCKQUOTE", "HR", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "DIV", "SPAN"}
RENDERED = """els => els.flatMap(box => [...box.querySelectorAll('*')]).map(e =>
  [e.tagName, [...e.attributes].map(a => a.name + '=' + a.value)])"""


def test_markdown_renderer_makes_only_its_own_elements_and_stays_fast_on_hostile_text(browser, tmp_path):
    hostile = [
        "*a " * 20000 + "**b " * 10000 + "`" * 3000 + " _x_y " * 5000 + "~~" * 3000,  # unclosed delimiters: 190 kB
        "> " * 400 + "deep quote\n" + "".join("  " * i + "- item\n" for i in range(300)),  # nesting
        "| a | b |\n|---|---|\n" + "| <script>x</script> | <svg onload=alert(1)> |\n" * 2000,  # a long table
        "```\n" + "<iframe src=javascript:alert(1)>\n" * 2000,  # a fence never closed
        '<div onclick="alert(1)" class="x">*em* <style>body{display:none}</style></div>\n\n'
        '<a href="https://evil.example">[x](https://evil.example)</a> ![img](x onerror=alert(1))\n\n'
        "# <h1>heading</h1> ## \\*not em\\* `<code>` **<i>**",
    ]
    records = [{"prompt": f"Hostile {i}", "responses": [text, "Fine."]} for i, text in enumerate(hostile)]
    store, server, token = serve_pairs(tmp_path, records, guidelines=hostile[-1])
    try:
        page, problems = open_page(browser, f"http://127.0.0.1:{server.port}/#token={token}")
        for i, text in enumerate(hostile):
            page.wait_for_function("p => document.getElementById('prompt').innerText === p", arg=f"Hostile {i}")
            page.wait_for_selector("#brief:not([hidden])")
            rendered = page.eval_on_selector_all("#prompt, #response-a, #response-b, #guidelines-text", RENDERED)
            tags = {tag for tag, _ in rendered}
            assert tags <= ALLOWED_TAGS, (i, tags - ALLOWED_TAGS)
            attributes = {a.split("=")[0] for _, attrs in rendered for a in attrs}
            assert attributes <= {"dir", "class", "start"}, (i, attributes)
            assert {a for _, attrs in rendered for a in attrs if a.startswith("class=")} <= {
                "class=turn",
                "class=role",
                "class=turn-body",
                "class=table-wrap",
                "class=align-left",
                "class=align-center",
                "class=align-right",
            }
            side = "#response-a" if page.inner_text("#response-b") == "Fine." else "#response-b"
            shown = page.eval_on_selector(side, "el => el.textContent")
            # Rendering only drops markdown syntax: every other character is still there, as text.
            for fragment in ("<script>x</script>", "<svg onload=alert(1)>", "<iframe src=javascript:alert(1)>", "<style>"):
                if fragment in text:
                    assert fragment in shown, (i, fragment)
            # Fast: re-rendering this response (the "Plain text" toggle twice) takes well under a second.
            elapsed = page.evaluate("""() => {
                const box = document.getElementById('plain');
                const t0 = performance.now();
                box.click(); box.click();
                return performance.now() - t0;
            }""")
            assert elapsed < 1500, (i, elapsed)
            page.keyboard.press("s")
        page.wait_for_selector("#done:not([hidden])")
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None
        assert problems == []
        page.close()
    finally:
        server.stop()
        store.close()
