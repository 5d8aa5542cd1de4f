"""RL-CAI's preference labels (Bai et al. 2022, "Constitutional AI", section 4.1): ``rlhfkit cai-label CONFIG.yaml``
/ :func:`label_on_principles`. Its labels train a reward model for PPO (``rlhfkit reward``), or DPO.

Responses sampled from the SL-CAI model (``rlhfkit sample``'s output, K per prompt; SL-CAI is :mod:`rlhfkit.cai`)
are compared in pairs by an AI judge against one principle drawn at random per pair, with the principle's
multiple-choice question (``choice_request``), each pair in both orders so the judge's position bias cancels; the
soft label is the mean of the two orders' P(A), from the letters' token probabilities where the judge gives them,
else from its verdicts.

A separate stage and config from SL-CAI (its own command and module, not a ``mode:`` of ``rlhfkit cai``): it reads
another input (samples, not prompts), uses another model role (a judge, not a critic) and writes another output
(labels), and the two share no keys but the constitution and the seed. What they do share lives a layer below:
the constitution (:mod:`rlhfkit.data.constitution`), the chat clients (:mod:`rlhfkit.chat_clients`) and the resume
machinery (:mod:`rlhfkit.data.io`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from rlhfkit import log
from rlhfkit.chat_clients import remote_client
from rlhfkit.config import ConfigError
from rlhfkit.data.constitution import Constitution, Principle, load_constitution
from rlhfkit.data.io import (
    RESUME_MODES,
    atomic_temp_pattern,
    compare_settings,
    remove_stale_temps,
    settings_path,
    short_repr,
    start_over,
    write_settings,
)
from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison, Prompt
from rlhfkit.data.samples import load_items
from rlhfkit.modeling import models
from rlhfkit.stats import cluster_accuracy

LABEL_SOURCE = "cai-principles"
"""``Comparison.source`` of the labels :func:`label_on_principles` writes."""


@dataclass
class CAILabelConfig:
    """Config of RL-CAI's labelling stage (AI preferences on principles; ``rlhfkit cai-label``)."""

    samples: str = "runs/samples.jsonl"
    """Responses to compare: `rlhfkit sample`'s output (records with `prompt` and K >= 2 `responses`; sample the
    SL-CAI model, e.g. `rlhfkit sample model=SFT_DIR prompts=...`). Every pair of an item's responses is compared."""
    output: str = "runs/cai_labels.jsonl"
    """Where the labels go: rlhfkit comparison records (`rlhfkit reward data=...`, `rlhfkit dpo data=...`) with the
    soft label in meta.target."""
    constitution: str = ""
    """Constitution file whose principles' `choice_request` questions the judge answers (a principle without one
    gets a question built from its critique request). Empty: the shipped one."""
    seed: int = 0
    """Seed of the principle draws (one principle per pair; with the item's index, it alone sets an item's draws)."""
    judge_model: str = ""
    """A local model as the judge (the paper's feedback model): P(A) from its next-token logits (used when
    judge_backend and judge_url are empty)."""
    judge_url: str = ""
    """Base URL of an OpenAI-compatible endpoint as the judge, e.g. http://127.0.0.1:8000/v1 (wins over
    judge_model). Asked for `logprobs` unless method is `verdict`."""
    judge_backend: str = ""
    """A Python function `module:function` that gets the judge's chat messages and returns its reply (wins over
    judge_url and judge_model; a scripted or rule-based judge; letters only, no probabilities)."""
    judge_name: str = "default"
    """The `model` field sent to judge_url."""
    judge_api_key_env: str = ""
    """Name of the environment variable holding judge_url's API key (sent as `Authorization: Bearer`); empty: none.
    A key never goes over plain http:// to a host other than a loopback address (an error instead)."""
    judge_timeout: float = 60.0
    """judge_url: seconds per socket operation of a request attempt."""
    judge_retries: int = 4
    """judge_url: retries on connection errors, timeouts, HTTP 429 and 5xx, with exponential backoff."""
    concurrency: int = 4
    """judge_url and judge_backend: judgements in flight at once (a local model judges one at a time)."""
    method: Literal["auto", "logprobs", "verdict"] = "auto"
    """How a judgement becomes P(A): `logprobs`, the normalised probabilities of the tokens "A" and "B" (a local
    model always has them; a server must return `logprobs`, else an error); `verdict`, the letter in the reply (1,
    0, or 0.5 when none is found); `auto`, the probabilities where the judge gives them, else the letter."""
    judge_max_tokens: int = 16
    """Completion budget of a judgement read from its reply."""
    judge_temperature: float = 0.0
    """Sampling temperature of a judgement read from its reply (0: deterministic)."""
    precision: str = "bf16"
    """Compute precision of a local judge."""
    chunk_size: int = 16
    """Items judged between atomic saves of the output."""
    progress: bool = True
    """Show a progress bar."""
    resume: Literal["auto", "force", "never"] = "auto"
    """What to do with labels already in `output`. `auto`: keep them and judge only the items missing, refused (an
    error naming the changed keys) if they were made under other settings (the constitution's questions, seed,
    judge, method, judge_max_tokens, judge_temperature, precision of a local judge; recorded in `output` +
    `.meta.json`), or if a label's prompt, responses or principle are not those its item and seed give now;
    chunk_size, concurrency, timeouts and progress may change. `force`: keep them even so, printing what differs
    (a label no longer of its item's responses, or under another principle than the draw, is judged again).
    `never`: delete `output` and its settings file, and start over."""


def response_pairs(k: int) -> list[tuple[int, int]]:
    """The pairs of ``k`` responses that are compared: every ``(i, j)`` with ``i < j``, in order."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def draw_pair_principles(constitution: Constitution, seed: int, item_index: int, pairs: int) -> list[Principle]:
    """The principle of each of an item's ``pairs`` comparisons: draws with replacement, uniform over the
    constitution, from ``random.Random(f"rl-cai {seed} {item_index}")`` (a string seed, so they are not the draws
    :func:`rlhfkit.cai.draw_principles` gave the same prompt index in SL-CAI), depending on nothing else."""
    rng = random.Random(f"rl-cai {seed} {item_index}")
    return [rng.choice(constitution.principles) for _ in range(pairs)]


def order_swapped_target(p_a_first: float, p_a_second: float) -> float:
    """P(response x preferred) from the two orders of the pair (x, y): shown as (A=x, B=y) the judge gave
    P(A) = ``p_a_first``, shown as (A=y, B=x) P(A) = ``p_a_second``; the mean of ``p_a_first`` and
    ``1 - p_a_second``. A judge that always picks A (pure position bias) gives 0.5."""
    return (p_a_first + (1.0 - p_a_second)) / 2.0


def principle_comparison(
    prompt: Prompt, x: str, y: str, principle: Principle, first: Any, second: Any, *, item_index: int, pair: tuple[int, int]
) -> Comparison:
    """The label of the pair (x, y) from the judge's two :class:`~rlhfkit.feedback.judge.Choice` s: ``first``
    with A=x, ``second`` with A=y. ``ranking`` puts the response the mean prefers first (a tie at exactly 0.5),
    and ``meta["target"]`` is P(that response is preferred), the soft Bradley-Terry target."""
    # Rounded so that float noise cannot split an exact tie (identical responses, a judge without a preference).
    p_x = round(order_swapped_target(first.p_a, second.p_a), 9)
    if p_x >= 0.5:
        ranking, target = [0, 1], p_x
    else:
        ranking, target = [1, 0], 1.0 - p_x
    methods = [first.method, second.method]
    method = methods[0] if methods[0] == methods[1] else "mixed"
    return Comparison(
        prompt=prompt,
        responses=[x, y],
        ranking=ranking,
        tie=p_x == 0.5,
        reason=(
            f"principle {principle.id}: A=0,B=1 -> {first.letter or '?'} (P(A) {first.p_a:.3f}); "
            f"A=1,B=0 -> {second.letter or '?'} (P(A) {second.p_a:.3f}); P(response 0) {p_x:.3f}"
        ),
        source=LABEL_SOURCE,
        meta={
            "item_index": item_index,
            "pair": list(pair),
            "principle": principle.id,
            "method": method,
            "target": target,
            "p_first": [first.p_a, 1.0 - second.p_a],
            "verdicts": [first.text, second.text],
            "parsed": [first.letter, second.letter],
            "methods": methods,
        },
    )


def label_chunk(
    items: Sequence[tuple[int, Prompt, list[str]]], *, judge: Any, constitution: Constitution, seed: int
) -> list[Comparison]:
    """The labels of ``(item_index, prompt, responses)`` items: every pair of each item's responses, under its
    drawn principle, judged in both orders (all the chunk's judgements in one :meth:`ChoiceJudge.judge` call)."""
    from rlhfkit.feedback.judge import build_choice_messages

    jobs: list[tuple[int, Prompt, str, str, Principle, tuple[int, int]]] = []
    for index, prompt, responses in items:
        pairs = response_pairs(len(responses))
        for pair, principle in zip(pairs, draw_pair_principles(constitution, seed, index, len(pairs))):
            jobs.append((index, prompt, responses[pair[0]], responses[pair[1]], principle, pair))
    chats = []
    for _, prompt, x, y, principle, _ in jobs:
        question = principle.choice_question()
        chats += [build_choice_messages(prompt, x, y, question), build_choice_messages(prompt, y, x, question)]
    choices = judge.judge(chats)
    return [
        principle_comparison(prompt, x, y, principle, choices[2 * k], choices[2 * k + 1], item_index=index, pair=pair)
        for k, (index, prompt, x, y, principle, pair) in enumerate(jobs)
    ]


def _judge(config: CAILabelConfig) -> Any:
    """The :class:`~rlhfkit.feedback.judge.ChoiceJudge` that ``config`` names (a local model is loaded here)."""
    from rlhfkit.feedback.judge import ChoiceJudge, LocalChatClient  # optional: pydantic (through rlhfkit.serve)

    client = remote_client(
        "cai-label",
        "judge",
        backend=config.judge_backend,
        url=config.judge_url,
        name=config.judge_name,
        api_key_env=config.judge_api_key_env,
        timeout=config.judge_timeout,
        retries=config.judge_retries,
    )
    if client is None:
        client = LocalChatClient(config.judge_model, precision=config.precision)
    try:
        return ChoiceJudge(
            client,
            method=config.method,
            concurrency=config.concurrency,
            max_tokens=config.judge_max_tokens,
            temperature=config.judge_temperature,
        )
    except ValueError as e:
        raise ConfigError(f"cai-label: {e}") from None


def label_settings(config: CAILabelConfig, constitution: Constitution) -> dict[str, Any]:
    """What the labels of ``config.output`` depend on besides their items: recorded beside it and compared on a
    re-run (:attr:`CAILabelConfig.resume`). Only the judge in use is recorded."""
    settings: dict[str, Any] = {
        "source": LABEL_SOURCE,
        "constitution": constitution.choice_digest(),
        "seed": config.seed,
        "method": config.method,
        "judge_max_tokens": config.judge_max_tokens,
        "judge_temperature": config.judge_temperature,
    }
    if config.judge_backend:
        settings["judge_backend"] = config.judge_backend
    elif config.judge_url:
        settings["judge_url"], settings["judge_name"] = config.judge_url, config.judge_name
    else:
        settings["judge_model"] = config.judge_model
        settings["model_files"] = models.model_identity(config.judge_model)
        settings["precision"] = config.precision
    return settings


def _check_label_config(config: CAILabelConfig) -> None:
    from rlhfkit.feedback.judge import CHOICE_METHODS

    if config.resume not in RESUME_MODES:
        raise ConfigError(f"cai-label: resume must be one of {', '.join(RESUME_MODES)}, got {config.resume!r}")
    if config.method not in CHOICE_METHODS:
        raise ConfigError(f"cai-label: method must be one of {', '.join(CHOICE_METHODS)}, got {config.method!r}")
    if config.chunk_size < 1:
        raise ConfigError(f"cai-label: chunk_size must be at least 1, got {config.chunk_size}")
    if config.judge_max_tokens < 1:
        raise ConfigError(f"cai-label: judge_max_tokens must be at least 1, got {config.judge_max_tokens}")
    if config.judge_temperature < 0:
        raise ConfigError(f"cai-label: judge_temperature must be 0 (greedy) or more, got {config.judge_temperature}")
    if config.concurrency < 1:
        raise ConfigError(f"cai-label: concurrency must be at least 1, got {config.concurrency}")
    if not (config.judge_backend or config.judge_url or config.judge_model):
        raise ConfigError("cai-label: no judge: set judge_model (a local model), judge_url or judge_backend")


def _resumable_labels(
    config: CAILabelConfig,
    labels: list[Comparison],
    items: list[tuple[Prompt, list[str]]],
    constitution: Constitution,
    settings: dict[str, Any],
) -> set[int]:
    """The item indices whose every pair is labelled in ``labels`` (already in the output), after checking each
    label against its item, its pair and this run's principle draw: a ConfigError naming each difference, or under
    ``resume=force`` a printed note."""
    output = Path(config.output)
    saved, changes = compare_settings(output, settings)
    wrong: list[str] = []
    by_item: dict[int, set[tuple[int, int]]] = {}
    for label in labels:
        index, pair = label.meta.get("item_index"), label.meta.get("pair")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(items):
            wrong.append(f"item_index {index!r} is not an item of the {len(items)} in {config.samples}")
            continue
        prompt, responses = items[index]
        pairs = response_pairs(len(responses))
        if not isinstance(pair, list) or tuple(pair) not in pairs:
            wrong.append(f"item_index {index}: pair {pair!r} is not a pair of its {len(responses)} responses")
            continue
        i, j = pair
        # Both prompts come through parse_prompt (a chat as {role, content} turns), so they compare as they are.
        if label.prompt != prompt or list(label.responses) != [responses[i], responses[j]]:
            wrong.append(
                f"item_index {index} pair {pair} labels {short_repr(label.responses)}, {config.samples} has "
                f"{short_repr([responses[i], responses[j]])}"
            )
            continue
        drawn = draw_pair_principles(constitution, config.seed, index, len(pairs))[pairs.index((i, j))].id
        if label.meta.get("principle") != drawn:
            wrong.append(f"item_index {index} pair {pair} is under {label.meta.get('principle')!r}, this run draws {drawn!r}")
            continue
        by_item.setdefault(index, set()).add((i, j))
    if wrong:
        changes["labels"] = f"{len(wrong)} of {len(labels)} do not match the samples and draws (first: {wrong[0]})"
    if changes:
        listing = "; ".join(f"{key}: {change}" for key, change in changes.items())
        if config.resume != "force":
            raise ConfigError(
                f"cai-label: cannot resume {output}: its {len(labels)} labels were made under other settings "
                f"({listing}); set resume=never to delete it (and {settings_path(output)}) and start over, write to "
                "another output, or set resume=force to keep its labels anyway"
            )
        log.warning(f"cai-label: resume=force: keeping the {len(labels)} labels in {output} though they differ ({listing})")
    elif saved is None:
        log.info(
            f"cai-label: warning: {output} has no settings file {settings_path(output)}: its labels match the "
            "samples and draws, but the judge and the other settings could not be checked"
        )
    return {index for index, done in by_item.items() if done == set(response_pairs(len(items[index][1])))}


@dataclass
class CAILabelResult:
    """What :func:`label_on_principles` wrote."""

    labels: Path
    comparisons: int
    """Labels in the output (one per pair of responses)."""
    ties: int
    methods: dict[str, int]
    """How many labels came from token probabilities (``logprobs``), letters (``verdict``) or both (``mixed``)."""
    consistency: dict | None = None
    """:func:`order_consistency` of the labels (None when there are none)."""


def order_consistency(labels: Sequence[Comparison], *, seed: int = 0) -> dict:
    """How far the judge's two orders of each pair agree: the check that RL-CAI's labels mean something.

    A pair is *order-consistent* when both of its judgements prefer the same response: P(x) above 1/2 with x shown
    as A and with x shown as B (``meta["p_first"]``, both P(x); exactly 1/2 in either counts as not consistent).
    A judge with no view but the position (always A) is consistent on none; one that reads the responses, on most.
    Returns ``{"consistent": Estimate.as_dict() (the fraction, a 95% bootstrap interval clustered by item), "pairs": n,
    "first_position": mean P(the response shown first) over all 2n judgements (1/2: no position bias)}``.
    """
    if not labels:
        raise ValueError("no labels")
    agree, items, first = [], [], []
    for label in labels:
        p_x_as_a, p_x_as_b = label.meta["p_first"]
        agree.append(float((p_x_as_a > 0.5 and p_x_as_b > 0.5) or (p_x_as_a < 0.5 and p_x_as_b < 0.5)))
        items.append(label.meta["item_index"])
        first += [p_x_as_a, 1.0 - p_x_as_b]  # P(A) in each order
    estimate = cluster_accuracy(agree, items, seed=seed)
    return {"consistent": estimate.as_dict(), "pairs": len(labels), "first_position": sum(first) / len(first)}


def label_on_principles(config: CAILabelConfig) -> CAILabelResult:
    """RL-CAI's preference labels (Bai et al. 2022, section 4.1): for every item of ``config.samples``, every pair
    (x, y) of its responses is compared by an AI judge against one principle drawn at random
    (:func:`draw_pair_principles`), with the principle's multiple-choice question
    (:func:`rlhfkit.feedback.judge.build_choice_messages`), in both orders, (A=x, B=y) and (A=y, B=x), which cancels
    the judge's position bias. The soft label P(x preferred) is the mean of the two orders' (:func:`order_swapped_target`),
    each order's P(A) being the normalised probability of the tokens "A" and "B" where the judge gives them, else
    its verdict (1, 0, or 0.5 when unparseable).

    Writes rlhfkit comparison records to ``config.output``: ``responses: [x, y]``, ``ranking`` with the preferred
    one first, ``tie`` when P(x) is exactly 0.5, ``source: "cai-principles"``, and ``meta``: ``item_index``,
    ``pair`` (indices of x and y in the item's responses), ``principle`` (its id), ``method`` (``logprobs``,
    ``verdict``, or ``mixed``), ``target`` (P(the first-ranked response is preferred): the soft Bradley-Terry
    target), ``p_first`` (P(x) from each order), ``verdicts`` (each order's reply), ``parsed`` (each order's
    letter) and ``methods`` (each order's). They feed ``rlhfkit reward`` (then PPO) or ``rlhfkit dpo``.

    Resumable like ``rlhfkit label``: items are judged in chunks of ``chunk_size``, and the output is rewritten
    atomically (with the settings beside it) after each, in item and pair order; a re-run keeps the items whose
    labels are all there and judges the rest, or refuses labels made under other settings
    (:attr:`CAILabelConfig.resume`). The draws depend on the seed and the item's index alone, so a resumed run with
    a deterministic judge writes what an uninterrupted one does. The constitution and the samples are read and
    checked before a judge is loaded."""
    _check_label_config(config)
    constitution = load_constitution(config.constitution or None)
    items = load_items(config.samples)

    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output.parent, atomic_temp_pattern(output))
    if config.resume == "never":
        start_over(output, "cai-label")
    settings = label_settings(config, constitution)
    labels = load_comparisons(output) if output.exists() else []
    done = _resumable_labels(config, labels, items, constitution, settings) if labels else set()
    labels = [c for c in labels if c.meta.get("item_index") in done]  # an item only partly there is judged again

    def order(comparison: Comparison) -> tuple[int, int, int]:
        index, (i, j) = comparison.meta["item_index"], comparison.meta["pair"]
        return index, i, j

    todo = [i for i in range(len(items)) if i not in done]
    if todo:
        judge = _judge(config)
        bar = tqdm(total=len(items), initial=len(done), unit="item", disable=not config.progress, desc="cai-label")
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start : start + config.chunk_size]
            labels += label_chunk([(i, *items[i]) for i in chunk], judge=judge, constitution=constitution, seed=config.seed)
            if start == 0:  # before the first new label: what every label now matches
                write_settings(output, settings)
            save_comparisons(output, sorted(labels, key=order))
            bar.update(len(chunk))
        bar.close()
    else:
        log.info(f"cai-label: all {len(items)} items already in {output}")
    labels.sort(key=order)
    methods: dict[str, int] = {}
    for label in labels:
        methods[label.meta["method"]] = methods.get(label.meta["method"], 0) + 1
    ties = sum(c.tie for c in labels)
    log.info(
        f"cai-label: {len(labels)} labels of {len(items)} items in {output} ({ties} ties; "
        + ", ".join(f"{count} by {method}" for method, count in sorted(methods.items()))
        + ")"
    )
    consistency = order_consistency(labels) if labels else None
    if consistency is not None:
        c = consistency["consistent"]
        log.info(
            f"cai-label: the judge preferred the same response in both orders on {c['value']:.3f} "
            f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] of {consistency['pairs']} pairs; mean P(first position) "
            f"{consistency['first_position']:.3f} (0.5: no position bias)"
        )
    return CAILabelResult(output, len(labels), ties, methods, consistency)
