"""Scorers and the simulated annotator: hand-computed scores, sampling statistics, loading.

Statistical checks use a fixed seed and a 4-sigma binomial tolerance, so they are
deterministic here and would pass for ~all seeds.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import textwrap

import pytest

from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.feedback import DEMO_RUBRIC, Rubric, SimulatedAnnotator, load_scorer
from rlhfkit.feedback.scorers import banned_words, length_target, sentiment
from tests.helpers import write_jsonl


def table_scorer(table: dict[str, float]):
    """A scorer that looks each response up in ``table`` (prompt ignored)."""

    def score(prompts, responses):
        return [table[r] for r in responses]

    return score


def binomial_tolerance(p: float, n: int) -> float:
    return 4.0 * math.sqrt(p * (1.0 - p) / n) + 1e-12


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` pairs of random replies mixing polite, rude and neutral words, of random lengths."""
    vocab = ["thanks", "great", "please", "glad", "idiot", "stupid", "hate", "not", "the", "soup", "is", "warm", "pan"]
    rng = random.Random(seed)

    def reply() -> str:
        return " ".join(rng.choices(vocab, k=rng.randint(1, 70)))

    return [("Any tips?", [reply(), reply()]) for _ in range(n)]


# ----------------------------------------------------------------------------- scorers, by hand


def test_sentiment_counts_positive_and_rude_words():
    text = "Thanks, that is a great idea but you are an idiot"  # 11 words: +thanks +great -idiot
    assert sentiment(["p"], [text]) == pytest.approx([(2 - 1) / math.sqrt(11 + 1)])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("This is not good.", -1 / math.sqrt(5)),  # 4 words, "good" negated
        ("That was not very good", -1 / math.sqrt(6)),  # negator 2 words back still reaches
        ("I don't hate it", 1 / math.sqrt(5)),  # "hate" negated
        ("I don\u2019t hate it", 1 / math.sqrt(5)),  # curly apostrophe
        ("No problem, glad to help!", 2 / math.sqrt(6)),  # the comma ends the negation scope
        ("GREAT!!!", 1 / math.sqrt(2)),  # case and punctuation
        ("", 0.0),
        ("The pan is hot.", 0.0),
    ],
)
def test_sentiment_negation_case_and_edges(text, expected):
    assert sentiment(["p"], [text]) == pytest.approx([expected])


def test_length_target_pseudo_huber():
    forty, sixty, ten = " ".join(["w"] * 40), " ".join(["w"] * 60), " ".join(["w"] * 10)
    got = length_target(["p"] * 3, [forty, sixty, ten])
    # d = 0, +1, -1.5  ->  -(sqrt(1 + d^2) - 1)
    assert got == pytest.approx([0.0, 1 - math.sqrt(2), 1 - math.sqrt(1 + 2.25)])
    eight = "one two three, four five six seven eight!"
    assert length_target(["p"], [eight], target_words=5, width=2) == pytest.approx([1 - math.sqrt(1 + 1.5**2)])
    with pytest.raises(ValueError, match="width"):
        length_target(["p"], ["x"], width=0)


def test_banned_words_penalty_per_occurrence():
    texts = ["Shut up, you stupid idiot.", "The shutter is stuck.", "You're not STUPID", "Happy to help"]
    assert banned_words(["p"] * 4, texts) == [-3.0, 0.0, -1.0, 0.0]
    assert banned_words(["p"], [texts[0]], penalty=0.5) == [-1.5]
    assert banned_words(["p"], [texts[0]], words=["UP"]) == [-1.0]
    with pytest.raises(ValueError, match="single words"):
        banned_words(["p"], ["x"], words=["shut up"])


def test_scorer_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        sentiment(["a", "b"], ["x"])


def test_rubric_by_hand():
    text = "Thanks, that is a great idea but you are an idiot"  # 11 words, 1 banned word
    rubric = Rubric({"sentiment": 1.0, "length": 0.5, "banned": 2.0}, length_target=10, length_width=5)
    expected = 1 / math.sqrt(12) + 0.5 * (1 - math.sqrt(1 + (1 / 5) ** 2)) + 2.0 * -1.0
    assert rubric(["p"], [text]) == pytest.approx([expected])


def test_demo_rubric_by_hand():
    text = "Thank you, glad to help!"  # 5 words: +thank +glad +help; d = (5 - 40) / 20 = -1.75
    expected = 3 / math.sqrt(6) + 0.5 * (1 - math.sqrt(1 + 1.75**2))
    assert DEMO_RUBRIC(["p"], [text]) == pytest.approx([expected])
    assert DEMO_RUBRIC.weights == {"sentiment": 1.0, "length": 0.5, "banned": 1.0}


def test_rubric_is_the_weighted_sum_of_its_scorers():
    responses = [r for _, pair in random_pairs(20) for r in pair]
    prompts = ["p"] * len(responses)
    rubric = Rubric({"sentiment": 0.7, "length": 0.3, "banned": 1.5}, length_target=25, length_width=10)
    expected = [
        0.7 * s + 0.3 * n + 1.5 * b
        for s, n, b in zip(
            sentiment(prompts, responses),
            length_target(prompts, responses, target_words=25, width=10),
            banned_words(prompts, responses),
        )
    ]
    assert rubric(prompts, responses) == pytest.approx(expected)


def test_rubric_skips_zero_weights_and_rejects_unknown_names():
    assert set(Rubric({"sentiment": 1.0, "length": 0.0}).components(["p"], ["hi"])) == {"sentiment"}
    with pytest.raises(ValueError, match="unknown scorer 'politeness'"):
        Rubric({"politeness": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        Rubric({})


# ----------------------------------------------------------------------------- annotator: pairs


def test_zero_temperature_agrees_with_scores_on_every_pair():
    items = random_pairs(50)
    items += [("Any tips?", [pair[0], pair[0]]) for _, pair in items[:5]]  # identical replies: ties
    labels = SimulatedAnnotator(DEMO_RUBRIC, temperature=0.0).label_many(items)
    scores = [DEMO_RUBRIC(["Any tips?"] * 2, pair) for _, pair in items]
    assert sum(a == b for a, b in scores) == 5
    for label, (a, b) in zip(labels, scores):
        assert label.meta["scores"] == pytest.approx([a, b])
        if a == b:
            assert label.tie and label.meta["p_first"] == 0.5
        else:
            assert not label.tie
            assert label.ranking == ([0, 1] if a > b else [1, 0])
            assert label.meta["p_first"] == (1.0 if a > b else 0.0)


@pytest.mark.parametrize("diff, temperature", [(0.5, 1.0), (1.0, 1.0), (1.0, 0.5), (-0.7, 2.0), (3.0, 1.0)])
def test_bradley_terry_frequency_matches_sigmoid(diff, temperature):
    n = 4000
    annotator = SimulatedAnnotator(table_scorer({"a": diff, "b": 0.0}), temperature=temperature, seed=1)
    labels = annotator.label_many([("q", ["a", "b"])] * n)
    p_first = 1.0 / (1.0 + math.exp(-diff / temperature))
    freq = sum(label.ranking == [0, 1] for label in labels) / n
    assert abs(freq - p_first) <= binomial_tolerance(p_first, n)
    assert labels[0].meta["p_first"] == pytest.approx(p_first)
    assert not any(label.tie for label in labels)


def test_flip_rate_one_inverts_every_zero_temperature_choice():
    items = random_pairs(50)
    clean = SimulatedAnnotator(DEMO_RUBRIC, temperature=0.0).label_many(items)
    flipped = SimulatedAnnotator(DEMO_RUBRIC, temperature=0.0, flip_rate=1.0).label_many(items)
    for a, b in zip(clean, flipped):
        assert b.tie == a.tie
        assert b.ranking == (a.ranking if a.tie else a.ranking[::-1])
        assert b.meta["flipped"] == (not a.tie)


def test_flip_rate_flips_that_fraction():
    n, rate = 5000, 0.2
    items = [("q", ["good", "bad"])] * n
    labels = SimulatedAnnotator(table_scorer({"good": 1.0, "bad": 0.0}), temperature=0.0, flip_rate=rate).label_many(items)
    freq = sum(label.ranking == [1, 0] for label in labels) / n
    assert abs(freq - rate) <= binomial_tolerance(rate, n)
    assert sum(label.meta["flipped"] for label in labels) == sum(label.ranking == [1, 0] for label in labels)


def test_flip_noise_shares_randomness_with_the_clean_annotator():
    """Same seed, only flip_rate changed: exactly the flipped labels differ (at temperature > 0 too)."""
    scorer = table_scorer({"a": 0.3, "b": 0.0})
    items = [("q", ["a", "b"])] * 500
    clean = SimulatedAnnotator(scorer, temperature=1.0, seed=7).label_many(items)
    noisy = SimulatedAnnotator(scorer, temperature=1.0, seed=7, flip_rate=0.3).label_many(items)
    for a, b in zip(clean, noisy):
        assert (a.ranking != b.ranking) == b.meta["flipped"]


def test_ties():
    scorer = table_scorer({"a": 1.0, "a2": 1.0, "close": 1.05, "far": 1.2})
    for temperature in (0.0, 1.0):
        label = SimulatedAnnotator(scorer, temperature=temperature, flip_rate=1.0).label("q", ["a", "a2"])
        assert label.tie and label.ranking == [0, 1] and not label.meta["flipped"]
        assert label.pairs() == [(0, 1, 0.5)]
    annotator = SimulatedAnnotator(scorer, temperature=1.0, tie_threshold=0.1)
    assert all(label.tie for label in annotator.label_many([("q", ["close", "a"])] * 100))
    assert not any(label.tie for label in annotator.label_many([("q", ["far", "a"])] * 100))


# ----------------------------------------------------------------------------- annotator: K > 2


def test_a_rankings_equal_scores_are_tied_pairs_and_the_draws_are_unchanged():
    """Plackett-Luce orders equal scores at random; the annotator marks those pairs as ties (target 0.5), so a coarse
    scorer's many equal scores are not turned into coin-flip preferences. The ranking itself is the same draw."""
    scorer = table_scorer({"a": 3.0, "b": 3.0, "c": 1.0, "d": 3.0, "e": 1.5})
    items = [("q", ["a", "b", "c", "d"])] * 200
    labels = SimulatedAnnotator(scorer, temperature=1.0, seed=5).label_many(items)
    assert all(label.ties == [(0, 1), (0, 3), (1, 3)] for label in labels)
    # Every pair of a, b, d is a tie, whatever order the draw put them in; the pairs with c keep the draw's order.
    expected = {frozenset(p): 0.5 if 2 not in p else 1.0 for p in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]}
    assert all({frozenset((i, j)): t for i, j, t in label.pairs()} == expected for label in labels)
    assert 0 < sum(label.ranking[0] == 2 for label in labels) < 40  # c (2 below the others, T = 1) rarely first
    # A threshold adds ties and changes nothing else: the same rankings, seed for seed.
    wider = SimulatedAnnotator(scorer, temperature=1.0, seed=5, tie_threshold=0.5).label_many([("q", ["a", "c", "e"])] * 50)
    plain = SimulatedAnnotator(scorer, temperature=1.0, seed=5).label_many([("q", ["a", "c", "e"])] * 50)
    assert [w.ranking for w in wider] == [p.ranking for p in plain]
    assert all(w.ties == [(1, 2)] for w in wider) and all(p.ties == [] for p in plain)
    # Zero temperature: a stable sort, the tied ones in index order, still marked tied.
    sorted_label = SimulatedAnnotator(scorer, temperature=0.0).label("q", ["c", "b", "a"])
    assert sorted_label.ranking == [1, 2, 0] and sorted_label.ties == [(1, 2)]


def test_zero_temperature_ranking_sorts_by_score():
    assert SimulatedAnnotator(table_scorer({"x": 0.1, "y": 2.0, "z": -1.0}), temperature=0.0).label(
        "q", ["x", "y", "z"]
    ).ranking == [1, 0, 2]
    rng = random.Random(3)
    for _ in range(20):
        k = rng.randint(3, 6)
        table = {f"r{i}": rng.gauss(0, 1) for i in range(k)}
        label = SimulatedAnnotator(table_scorer(table), temperature=0.0).label("q", list(table))
        assert [table[f"r{i}"] for i in label.ranking] == sorted(table.values(), reverse=True)
        assert not label.tie


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_plackett_luce_frequencies(temperature):
    n = 6000
    s = {"a": 1.0, "b": 0.0, "c": -0.5}
    annotator = SimulatedAnnotator(table_scorer(s), temperature=temperature, seed=2)
    labels = annotator.label_many([("q", ["a", "b", "c"])] * n)
    e = {k: math.exp(v / temperature) for k, v in s.items()}
    # P(ranking a > b > c) = e_a / (e_a + e_b + e_c) * e_b / (e_b + e_c),  e_i = exp(s_i / T)
    p_abc = e["a"] / (e["a"] + e["b"] + e["c"]) * e["b"] / (e["b"] + e["c"])
    freq_abc = sum(label.ranking == [0, 1, 2] for label in labels) / n
    assert abs(freq_abc - p_abc) <= binomial_tolerance(p_abc, n)
    for index, key in enumerate("abc"):
        p_top = e[key] / sum(e.values())
        freq_top = sum(label.ranking[0] == index for label in labels) / n
        assert abs(freq_top - p_top) <= binomial_tolerance(p_top, n)
    assert labels[0].meta["p_first"] == pytest.approx(e["a"] / sum(e.values()))


def test_flip_reverses_a_ranking():
    label = SimulatedAnnotator(table_scorer({"x": 0.1, "y": 2.0, "z": -1.0}), temperature=0.0, flip_rate=1.0).label(
        "q", ["x", "y", "z"]
    )
    assert label.ranking == [2, 0, 1] and label.meta["flipped"]


# ----------------------------------------------------------------------------- annotator: plumbing


def test_reproducible_and_batching_invariant():
    items = random_pairs(30) + [("q", ["a b", "thanks", "idiot"])] * 10
    make = lambda seed: SimulatedAnnotator(DEMO_RUBRIC, temperature=0.5, flip_rate=0.1, seed=seed)  # noqa: E731
    batched = make(0).label_many(items)
    one_by_one_annotator = make(0)
    one_by_one = [one_by_one_annotator.label(prompt, responses) for prompt, responses in items]
    assert batched == one_by_one == make(0).label_many(items)
    assert [c.ranking for c in make(1).label_many(items)] != [c.ranking for c in batched]


def test_an_items_label_depends_only_on_the_seed_and_its_index():
    """What lets a resumed labelling stage give the labels of an uninterrupted one: before, one random stream ran
    through the items, so labelling from item k on (a resumed run) gave item k the draws of item 0."""
    items = random_pairs(30) + [("q", ["a b", "thanks", "idiot"])] * 10
    make = lambda: SimulatedAnnotator(DEMO_RUBRIC, temperature=1.0, flip_rate=0.2, seed=3)  # noqa: E731
    whole = make().label_many(items)
    assert make().label_many(items[17:], indices=range(17, len(items))) == whole[17:]  # a fresh process, resumed
    backwards = list(reversed(range(len(items))))
    assert make().label_many([items[i] for i in backwards], indices=backwards) == [whole[i] for i in backwards]
    assert make().label(*items[33], index=33) == whole[33]
    # Without indices an annotator numbers the items it is given across calls: two calls equal one.
    split = make()
    assert split.label_many(items[:17]) + split.label_many(items[17:]) == whole and split.next_index == len(items)
    # The draws are random: at temperature 1 the demo rubric's close pairs go either way, and the seed matters.
    assert len({tuple(c.ranking) for c in whole[:30]}) == 2
    other = SimulatedAnnotator(DEMO_RUBRIC, temperature=1.0, flip_rate=0.2, seed=4).label_many(items)
    assert [c.ranking for c in other] != [c.ranking for c in whole]
    with pytest.raises(ValueError, match="2 indices for 1 items"):
        make().label_many(items[:1], indices=[0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        make().label_many(items[:1], indices=[-1])
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        SimulatedAnnotator(DEMO_RUBRIC, seed=-1)


def test_chat_prompts_score_the_last_user_turn_and_records_are_comparisons():
    seen = []

    def recording_scorer(prompts, responses):
        seen.extend(prompts)
        return [float(len(r)) for r in responses]

    chat = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    annotator = SimulatedAnnotator(recording_scorer, temperature=0.0, name="len")
    labels = annotator.label_many([{"prompt": chat, "responses": ["hi", "hello"]}, ("plain", ["x", "yy"])])
    assert seen == ["second", "second", "plain", "plain"]
    assert all(isinstance(label, Comparison) for label in labels)
    assert labels[0].prompt == chat and labels[0].chosen == "hello" and labels[0].rejected == "hi"
    assert labels[0].source == "simulated:len"
    with pytest.raises(ValueError, match="no user message"):
        annotator.label([{"role": "system", "content": "x"}], ["a", "b"])


def test_annotator_validation():
    scorer = table_scorer({"a": 0.0, "b": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        SimulatedAnnotator(scorer, temperature=-1.0)
    with pytest.raises(ValueError, match="flip_rate"):
        SimulatedAnnotator(scorer, flip_rate=1.5)
    with pytest.raises(ValueError, match="tie_threshold"):
        SimulatedAnnotator(scorer, tie_threshold=-0.1)
    with pytest.raises(ValueError, match="at least 2 responses"):
        SimulatedAnnotator(scorer).label("q", ["a"])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        SimulatedAnnotator(lambda prompts, responses: [0.0]).label("q", ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        SimulatedAnnotator(lambda prompts, responses: [0.0, float("nan")]).label("q", ["a", "b"])


# ----------------------------------------------------------------------------- load_scorer

MODULE = "rlhfkit_test_user_rewards"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user reward module in a temp working directory (removed from sys.modules afterwards)."""
    (tmp_path / f"{MODULE}.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def exclamations(prompts, responses, **kwargs):
                return np.array([float(r.count("!")) for r in responses])

            class Judge:
                @staticmethod
                def length(prompts, responses):
                    return [len(r) for r in responses]

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    sys.modules.pop(MODULE, None)


def test_builtin_names():
    assert load_scorer("sentiment") is sentiment
    assert load_scorer("length") is length_target
    assert load_scorer("banned") is banned_words
    assert load_scorer("demo") is DEMO_RUBRIC and load_scorer("rubric") is DEMO_RUBRIC


def test_module_function_from_the_working_directory(user_module):
    fn = load_scorer(f"{MODULE}:exclamations")
    # The working directory was on sys.path for that import only: a json.py or yaml.py in it must not
    # shadow packages imported later in the process.
    assert str(user_module) not in sys.path
    assert list(fn(["p", "p"], ["hi!!", "hi"])) == [2.0, 0.0]
    assert load_scorer(f"{MODULE}:Judge.length")(["p"], ["abc"]) == [3]
    label = SimulatedAnnotator(f"{MODULE}:exclamations", temperature=0.0).label("q", ["ok", "ok!"])
    assert label.ranking == [1, 0] and label.meta["scores"] == [0.0, 1.0]
    rubric = Rubric({"sentiment": 1.0, f"{MODULE}:exclamations": 0.5})
    assert rubric(["p"], ["great!!"]) == pytest.approx([1 / math.sqrt(2) + 0.5 * 2.0])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "bad scorer spec ''"),
        ("politeness", "unknown scorer 'politeness': expected one of"),
        (f"{MODULE}:", "both parts non-empty"),
        (":exclamations", "both parts non-empty"),
        (f"{MODULE}:a:b", "both parts non-empty"),
        ("rlhfkit_no_such_module:fn", "cannot import module 'rlhfkit_no_such_module'"),
        (f"{MODULE}:missing", "has no attribute 'missing'"),
        (f"{MODULE}:NOT_CALLABLE", "expected a callable"),
    ],
)
def test_bad_specs(user_module, spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_scorer(spec)
    assert repr(spec) in str(info.value)


def test_label_stage_binds_scorer_args_and_rejects_unknown_names(tmp_path):
    from rlhfkit import label
    from rlhfkit.label import LabelConfig

    ten, thirty = " ".join(["word"] * 10), " ".join(["word"] * 30)
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "Describe it.", "responses": [thirty, ten]}])
    for target, preferred in [(40, 0), (10, 1)]:  # the default target prefers 30 words, target 10 prefers 10
        out = tmp_path / f"labels_{target}.jsonl"
        label.run(
            LabelConfig(
                samples=str(samples),
                output=str(out),
                scorer="length",
                temperature=0.0,
                scorer_args={"target_words": target} if target != 40 else {},
            )
        )
        (comparison,) = load_comparisons(out)
        assert comparison.ranking[0] == preferred
        assert comparison.source == ("simulated:length" if target == 40 else f"simulated:length(target_words={target})")
    with pytest.raises(ValueError, match="no parameter 'target'.*target_words, width"):
        label.run(
            LabelConfig(samples=str(samples), output=str(tmp_path / "bad.jsonl"), scorer="length", scorer_args={"target": 10})
        )
    assert not (tmp_path / "bad.jsonl").exists()


# ----------------------------------------------------------------------------- temperature relative to the spread


def gold_scorer(prompts, responses):
    """Scorer ``tests.test_simulated:gold_scorer``: the demo rubric."""
    return DEMO_RUBRIC(prompts, responses)


def gold_scorer_x100(prompts, responses):
    """Scorer ``tests.test_simulated:gold_scorer_x100``: the demo rubric in units 100 times smaller."""
    return [100.0 * s for s in DEMO_RUBRIC(prompts, responses)]


def constant_scorer(prompts, responses):
    """Scorer ``tests.test_simulated:constant_scorer``: every response scores 2."""
    return [2.0] * len(responses)


def spread_samples(path) -> list[dict]:
    """40 pairs, 10 three-way items and 5 pairs of identical replies (ties at any scale)."""
    records = [{"prompt": prompt, "responses": pair} for prompt, pair in random_pairs(40, seed=4)]
    triples = random_pairs(15, seed=5)
    records += [{"prompt": "Any tips?", "responses": triples[i][1] + triples[i + 5][1][:1]} for i in range(10)]
    records += [{"prompt": "Any tips?", "responses": [pair[0], pair[0]]} for _, pair in random_pairs(5, seed=6)]
    write_jsonl(path, records)
    return records


def test_score_spread_by_hand():
    from rlhfkit.feedback.simulated import score_spread

    table = table_scorer({"a": 1.0, "b": 3.0, "c": 0.0, "d": 2.0, "e": 4.0})
    # Scores 1, 3, 0, 2, 4: mean 2, squared deviations 1 + 1 + 4 + 0 + 4 = 10; population variance 10 / 5 = 2.
    assert score_spread(table, [("q", ["a", "b"]), {"prompt": "q", "responses": ["c", "d", "e"]}]) == pytest.approx(
        math.sqrt(2.0), rel=1e-12
    )
    assert score_spread(table, [("q", ["a", "a"]), ("q", ["a", "a", "a"])]) == 0.0
    assert score_spread(table, []) == 0.0


def test_spread_scale_gives_the_same_labels_at_any_scorer_scale(tmp_path, capsys):
    from rlhfkit import label
    from rlhfkit.label import LabelConfig

    samples = tmp_path / "samples.jsonl"
    records = spread_samples(samples)
    responses = [r for record in records for r in record["responses"]]
    spread = statistics.pstdev(DEMO_RUBRIC(["Any tips?"] * len(responses), responses))  # by hand: population std

    def run(scorer: str, scale: str, temperature: float = 0.5) -> list[Comparison]:
        out = tmp_path / f"{scorer.rsplit(':', 1)[1]}_{scale}_{temperature}.jsonl"
        return label.run(
            LabelConfig(
                samples=str(samples),
                output=str(out),
                scorer=scorer,
                temperature=temperature,
                temperature_scale=scale,
                tie_threshold=0.01,
                seed=11,
                chunk_size=16,
            )
        )

    capsys.readouterr()
    base = run("tests.test_simulated:gold_scorer", "spread")
    printed = capsys.readouterr().out
    scaled = run("tests.test_simulated:gold_scorer_x100", "spread")
    printed_scaled = capsys.readouterr().out
    line = f"label: score spread {spread:.3g} -> temperature {0.5 * spread:.3g}, tie threshold {0.01 * spread:.3g}"
    assert line in printed.splitlines()
    assert f"label: score spread {100 * spread:.3g} -> temperature {50 * spread:.3g}" in printed_scaled
    assert [c.meta["temperature"] for c in base] == pytest.approx([0.5 * spread] * len(records), rel=1e-12)
    assert [c.meta["temperature"] for c in scaled] == pytest.approx([50 * spread] * len(records), rel=1e-12)
    assert [(c.ranking, c.tie) for c in scaled] == [(c.ranking, c.tie) for c in base]
    assert sum(c.tie for c in base) == 5

    # The temperature matters here: labels are not simply the score order.
    def by_score(c: Comparison) -> list[int]:
        return sorted(range(len(c.responses)), key=lambda i: -c.meta["scores"][i])

    assert sum(not c.tie and c.ranking != by_score(c) for c in base) >= 5

    # In absolute units the same temperature is a different labeller for the two scales.
    absolute = run("tests.test_simulated:gold_scorer", "absolute")
    absolute_scaled = run("tests.test_simulated:gold_scorer_x100", "absolute")
    assert "score spread" not in capsys.readouterr().out
    assert [(c.ranking, c.tie) for c in absolute_scaled] != [(c.ranking, c.tie) for c in absolute]
    assert all(c.meta["temperature"] == 0.5 for c in absolute + absolute_scaled)


def test_spread_is_measured_on_every_item_when_resuming(tmp_path, capsys):
    from rlhfkit import label
    from rlhfkit.label import LabelConfig

    samples = tmp_path / "samples.jsonl"
    records = spread_samples(samples)
    out = tmp_path / "labels.jsonl"
    config = LabelConfig(
        samples=str(samples),
        output=str(out),
        scorer="tests.test_simulated:gold_scorer",
        temperature=0.5,
        temperature_scale="spread",
        seed=3,
    )
    full = label.run(config)
    first = capsys.readouterr().out
    # Keep the first 10 labels (as if the run had stopped there) and resume.
    save_comparisons(out, full[:10])
    resumed = label.run(config)
    assert [c.meta["item_index"] for c in resumed] == list(range(len(records)))
    assert resumed[:10] == full[:10]
    assert {c.meta["temperature"] for c in resumed} == {full[0].meta["temperature"]}
    again = capsys.readouterr().out
    spread_line = [line for line in first.splitlines() if line.startswith("label: score spread")]
    assert len(spread_line) == 1 and spread_line[0] in again.splitlines()
    # Nothing left to label: nothing is scored.
    label.run(config)
    assert "score spread" not in capsys.readouterr().out


def test_zero_spread_falls_back_to_one(tmp_path, capsys):
    from rlhfkit import label
    from rlhfkit.label import LabelConfig

    samples = tmp_path / "samples.jsonl"
    spread_samples(samples)
    labels = label.run(
        LabelConfig(
            samples=str(samples),
            output=str(tmp_path / "labels.jsonl"),
            scorer="tests.test_simulated:constant_scorer",
            temperature=0.25,
            temperature_scale="spread",
        )
    )
    printed = capsys.readouterr().out
    assert "label: score spread is 0" in printed and "using 1.0" in printed
    assert "label: score spread 1 -> temperature 0.25" in printed
    assert all(c.meta["temperature"] == 0.25 for c in labels)


def test_temperature_scale_is_checked():
    from rlhfkit.config import ConfigError, from_dict
    from rlhfkit.label import LabelConfig

    assert LabelConfig().temperature_scale == "absolute"
    with pytest.raises(ConfigError, match="temperature_scale"):
        from_dict(LabelConfig, {"temperature_scale": "relative"})


# ----------------------------------------------------------------------------- caution (harmlessness keywords)


def test_caution_by_hand():
    from rlhfkit.feedback.scorers import caution, load_scorer

    responses = [
        "I can't help with that, but I can suggest something else.",  # refusal
        "Sure! First, wait until the guard looks away.",  # complies
        "Instead, you could ask the shop politely.",  # redirect, capitalised and followed by a comma
        "It is insteadily fine.",  # not the word "instead"
        "That would be illegal.",  # names the harm
        "I can help with that.",  # "i can" is not "i can't"
        "",
    ]
    assert caution([""] * len(responses), responses) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert load_scorer("caution")(["p"], ["Please talk to a doctor."]) == [1.0]
    assert caution(["p", "p"], ["no way", "way no"], phrases=["no way"]) == [1.0, 0.0]  # words in order
    with pytest.raises(ValueError, match="at least one word"):
        caution(["p"], ["x"], phrases=["!!"])
