"""benchmarks/other_golds.py: the gold scorers README's "Other gold scorers" runs used, on values worked out by hand,
and loadable as ``gold=benchmarks.other_golds:NAME`` from the repository root (the command README gives)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.feedback.scorers import load_scorer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def golds(monkeypatch):
    monkeypatch.chdir(ROOT)
    return {name: load_scorer(f"benchmarks.other_golds:{name}") for name in ("relevance", "detail", "rating10")}


def test_relevance_is_the_share_of_prompt_content_words_used_less_a_point_per_word_over_70(golds):
    prompt = "How do I bake bread?"  # content words: bake, bread (how, do, i are stop words)
    long_off_topic = " ".join(["word"] * 75)  # covers nothing, 5 words over 70
    chat = [{"role": "user", "content": prompt}]  # a chat prompt scores by its last message
    assert golds["relevance"](
        [prompt, prompt, prompt, chat], ["Bake the bread at 200C.", "Knead it well.", long_off_topic, "Bread: bake it."]
    ) == [100.0, 0.0, -5.0, 100.0]
    # stems by their first 5 letters: "baking" shares "bakin" with nothing, "breads" shares "bread"
    assert golds["relevance"]([prompt], ["Baking breads."]) == [50.0]


def test_rating10_adds_its_points_as_documented(golds):
    prompt = "How do I bake bread?"
    # cover 1 -> 1 + 4; 7 words (<10) -> +0; ends with "." -> +1; no repeated sentence -> +1; digits -> +1
    short = "Bake the bread at 200 degrees for 30 minutes."
    # cover 0 -> 1; 22 words (20-60) -> +2; no final stop -> +0; "keep at it" twice -> +0; no detail -> +0
    repeated = (
        "Keep at it. Keep at it. You will get there with patience, practice and steady work over the coming weeks and months"
    )
    assert golds["rating10"]([prompt, prompt], [short, repeated]) == [8.0, 3.0]


def test_detail_counts_distinct_words_lists_and_digits_and_charges_repeats_and_exclamations(golds):
    # words (letters only): go home go out times, 4 distinct: 4/15 - 3 * 1/5; two list items +0.6; digits 1, 2, 3
    # +0.15; one "!" -0.5; -1.5
    text = "1. go home\n2. go out 3 times!"
    (score,) = golds["detail"](["anything"], [text])
    assert score == pytest.approx(4 / 15 - 3 * (1 / 5) + 0.3 * 2 + 0.05 * 3 - 0.5 - 1.5)
