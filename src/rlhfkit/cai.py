"""Constitutional AI (Bai et al. 2022): the supervised stage, SL-CAI (``rlhfkit cai CONFIG.yaml`` /
:func:`critique_revise`). RL-CAI's AI preferences on principles, which train the reward model for PPO (or DPO), are
another stage: :mod:`rlhfkit.cai_label` (``rlhfkit cai-label CONFIG.yaml``).

SL-CAI

For each prompt the model answers; then, for ``rounds`` rounds, it critiques its current answer against a
principle drawn at random from a constitution (:mod:`rlhfkit.data.constitution`) and revises the answer. The
final revisions are the SL-CAI model's fine-tuning data: ``rlhfkit sft data=OUTPUT_DIR/sft.jsonl``.

The chats (:func:`critique_messages`, :func:`revision_messages`), with optional worked examples first::

    [system turns of the prompt]  [few-shot: user prompt, assistant response, user critique request,
                                   assistant critique, user revision request, assistant revision] ...
    user: PROMPT      assistant: ANSWER      user: CRITIQUE REQUEST            -> the critique
    ... the same ...  assistant: CRITIQUE    user: REVISION REQUEST            -> the revision

Round ``r`` critiques the revision of round ``r - 1`` (round 0: the initial answer) in a fresh chat, the prompt
and that answer only, as the paper applies the same critique-revision step again to the prompt-revision pair. An
empty revision leaves the answer as it was. Principles are drawn with replacement, each prompt's from
``random.Random(seed * 1_000_003 + prompt_index)`` (:func:`draw_principles`): the same whatever the chunking or
an interruption.

Who generates: ``model`` answers (``answerer: critic`` hands answers to the critic too), and the critic critiques
and revises: ``model`` itself (the paper's setting), another local model (``critic_model``), any
OpenAI-compatible server (``critic_url``, through :class:`rlhfkit.feedback.judge.HTTPChatClient`), or a Python
function ``module:function`` taking the chat messages (``critic_backend``,
:class:`rlhfkit.generation.chat.FunctionBackend`). Local models generate a chunk's chats in one batch
(:class:`rlhfkit.generation.chat.LocalChatModel`); a server gets ``concurrency`` requests at once.

Outputs, in ``output_dir``:

* ``revisions.jsonl``: one provenance record per prompt, in prompt order: ``prompt_index``, ``prompt``,
  ``initial`` (the first answer), ``principles`` (the id drawn for each round), ``critiques`` (each round's),
  ``revision`` (the final answer), ``revised`` (whether any round gave a non-empty revision), ``seed``, and
  ``rounds``: per round ``round`` (0-based), ``principle``, ``critique_request``, ``critique``,
  ``revision_request``, ``revision`` (as generated);
* ``sft.jsonl``: rlhfkit SFT data, ``{prompt, completion}`` for a text prompt and ``{messages}`` for a chat, the
  final revision as the reply; prompts without a revision (every round's empty) are left out;
* ``preferences.jsonl`` (``preferences: true``): the cheap RL-CAI variant, "the revision is preferred over the
  original answer": rlhfkit comparison records with ``responses: [revision, initial]``, ``ranking: [0, 1]``,
  ``source: "cai-revision"`` and ``meta: {prompt_index, principles}``, for ``rlhfkit reward`` or ``rlhfkit dpo``;
  pairs whose revision equals the initial answer (or either is empty) are left out;
* ``config.yaml``: the config as run (``rlhfkit cai OUTPUT_DIR/config.yaml`` runs it again).

Resumable as ``rlhfkit sample`` is: prompts go in chunks of ``chunk_size`` on a fixed grid, each chunk generated
under the seed ``seed * 1_000_003 + its first prompt index`` and appended to ``revisions.jsonl`` in one write,
fsynced. A re-run drops a torn last line and the records of a chunk only partly written, skips the chunks already
there and does the rest, so a killed run ends with the records of an uninterrupted one, none twice or missing. It
only adds to records made under the same settings (``revisions.jsonl.meta.json``: models, critic, constitution,
few-shot examples, rounds, seed, sampling), each still holding the prompt at its index and the principles drawn
for it; otherwise it stops with an error naming what changed (``resume``). ``sft.jsonl`` and
``preferences.jsonl`` are rewritten, atomically, from ``revisions.jsonl`` at the end of every run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from tqdm.auto import tqdm

from rlhfkit import log
from rlhfkit.chat_clients import remote_client
from rlhfkit.config import ConfigError
from rlhfkit.data.constitution import (
    DEFAULT_FEW_SHOT,
    DEFAULT_PROMPTS,
    Constitution,
    FewShotExample,
    Principle,
    few_shot_digest,
    load_constitution,
    load_few_shot,
)
from rlhfkit.data.io import (
    RESUME_MODES,
    Row,
    append_whole,
    atomic_temp_pattern,
    chunk_grid,
    chunks_to_do,
    compare_settings,
    read_jsonl_log,
    remove_stale_temps,
    settings_path,
    short_repr,
    start_over,
    write_jsonl,
    write_settings,
)
from rlhfkit.data.preferences import save_comparisons
from rlhfkit.data.prompts import load_prompts
from rlhfkit.data.records import Comparison, Message, Prompt
from rlhfkit.modeling import models
from rlhfkit.training.loop import write_run_config

Messages = list[Message]

REVISIONS_FILE = "revisions.jsonl"
"""The provenance records, in ``output_dir``."""
SFT_FILE = "sft.jsonl"
"""The SL-CAI fine-tuning data, in ``output_dir``."""
PREFERENCES_FILE = "preferences.jsonl"
"""Revision-over-initial preference pairs, in ``output_dir``."""
PREFERENCE_SOURCE = "cai-revision"
"""``Comparison.source`` of those pairs."""


@dataclass
class CAIConfig:
    """Config of the SL-CAI stage (critique and revise; ``rlhfkit cai``)."""

    model: str = models.TINY
    """The model that answers, and critiques and revises unless a critic is given: `smollm2-135m`, `tiny`, a `.gguf`
    file or a model directory. SL-CAI then fine-tunes it on its own revisions (`rlhfkit sft model=M
    data=OUTPUT_DIR/sft.jsonl`)."""
    prompts: str = ""
    """JSONL/JSON of records with a `prompt` field (string or chat messages). Empty: the shipped prompts, 32
    red-team style and ordinary ones alternately (rlhfkit/assets/cai/prompts_train.jsonl; 16 more for evaluation
    in prompts_heldout.jsonl)."""
    output_dir: str = "runs/cai"
    """Where revisions.jsonl, sft.jsonl, preferences.jsonl and config.yaml go."""
    constitution: str = ""
    """Constitution file (YAML or JSON: principles with id, critique_request, revision_request). Empty: the shipped
    one (rlhfkit/assets/cai/constitution.yaml, twelve principles on harmlessness, honesty and helpfulness)."""
    few_shot: str = ""
    """Worked critique/revision examples shown before every critique and revision request (JSON/JSONL records with
    prompt, response, critique, revision, and principle or both requests). Empty: none; `default`: the two shipped
    examples (rlhfkit/assets/cai/few_shot.jsonl, written for the shipped constitution)."""
    rounds: int = 1
    """Critique-revision rounds per prompt, each against a principle drawn anew."""
    seed: int = 0
    """Seed of the principle draws (with each prompt's index) and of local sampling (with each chunk's start)."""
    answerer: Literal["model", "critic"] = "model"
    """Who writes the initial answers: `model`, or the critic (e.g. a served copy of the model: everything then goes
    to `critic_url` and `model` is not loaded)."""
    critic_model: str = ""
    """Another local model to critique and revise (empty: `model` itself, the paper's setting)."""
    critic_url: str = ""
    """Base URL of an OpenAI-compatible endpoint that critiques and revises, e.g. http://127.0.0.1:8000/v1 (wins
    over critic_model)."""
    critic_backend: str = ""
    """A Python function `module:function` that gets the chat messages and returns the reply, as the critic (wins
    over critic_url and critic_model; a scripted or rule-based critic)."""
    critic_name: str = "default"
    """The `model` field sent to critic_url."""
    critic_api_key_env: str = ""
    """Name of the environment variable holding critic_url's API key (sent as `Authorization: Bearer`); empty:
    none. A key never goes over plain http:// to a host other than a loopback address (an error instead)."""
    critic_timeout: float = 60.0
    """critic_url: seconds per socket operation of a request attempt."""
    critic_retries: int = 4
    """critic_url: retries on connection errors, timeouts, HTTP 429 and 5xx, with exponential backoff."""
    concurrency: int = 4
    """critic_url: requests in flight at once."""
    temperature: float = 0.7
    """Sampling temperature of the initial answers (0: greedy)."""
    critic_temperature: float = 0.7
    """Sampling temperature of the critiques and revisions (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of local generation (a server gets no top_p)."""
    max_new_tokens: int = 128
    """Token budget of an answer and of a revision."""
    critique_max_tokens: int = 128
    """Token budget of a critique."""
    chunk_size: int = 16
    """Prompts generated together and appended to revisions.jsonl in one write."""
    max_prompts: int = -1
    """Use only the first N prompts (-1: all)."""
    precision: str = "bf16"
    """Compute precision of local generation (`bf16`, `fp16` on CUDA, or `fp32`)."""
    preferences: bool = True
    """Also write preferences.jsonl: each final revision preferred over its initial answer (RL-CAI's cheap variant)."""
    progress: bool = True
    """Show a progress bar."""
    resume: Literal["auto", "force", "never"] = "auto"
    """What to do with records already in revisions.jsonl. `auto`: keep them and do only the prompts missing, refused
    (an error naming the changed keys) if they were made under other settings (recorded in revisions.jsonl.meta.json:
    the answering and critic models, constitution and few-shot contents, rounds, seed, temperatures, top_p, token
    budgets, precision) or hold another prompt or other principles than this run gives their index; chunk_size,
    max_prompts, concurrency, timeouts and progress may change. `force`: keep them even so, printing what differs.
    `never`: delete revisions.jsonl and its settings file, and start over."""


# ----------------------------------------------------------------------------- the chats


def _turns(prompt: Prompt) -> Messages:
    """A prompt as chat turns: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def few_shot_turns(examples: Sequence[FewShotExample]) -> Messages:
    """The worked examples as chat turns, each a whole critique and revision exchange."""
    turns: Messages = []
    for e in examples:
        turns += [m for m in _turns(e.prompt) if m["role"] != "system"]
        turns += [
            {"role": "assistant", "content": e.response},
            {"role": "user", "content": e.critique_request},
            {"role": "assistant", "content": e.critique},
            {"role": "user", "content": e.revision_request},
            {"role": "assistant", "content": e.revision},
        ]
    return turns


def critique_messages(prompt: Prompt, answer: str, principle: Principle, few_shot: Sequence[FewShotExample] = ()) -> Messages:
    """The chat that asks for a critique of ``answer`` to ``prompt`` under ``principle``: the prompt's leading
    system turns, the worked examples, the rest of the prompt, the answer, then the critique request."""
    turns = _turns(prompt)
    lead = 0
    while lead < len(turns) and turns[lead]["role"] == "system":
        lead += 1
    return [
        *turns[:lead],
        *few_shot_turns(few_shot),
        *turns[lead:],
        {"role": "assistant", "content": answer},
        {"role": "user", "content": principle.critique_request},
    ]


def revision_messages(
    prompt: Prompt, answer: str, principle: Principle, critique: str, few_shot: Sequence[FewShotExample] = ()
) -> Messages:
    """The chat that asks for the revision: :func:`critique_messages`, the critique, then the revision request."""
    return [
        *critique_messages(prompt, answer, principle, few_shot),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision_request},
    ]


def draw_principles(constitution: Constitution, seed: int, prompt_index: int, rounds: int) -> list[Principle]:
    """The principles of a prompt's rounds: ``rounds`` draws with replacement, uniform over the constitution, from
    ``random.Random(seed * 1_000_003 + prompt_index)``, so they depend on nothing else."""
    rng = random.Random(seed * 1_000_003 + prompt_index)
    return [rng.choice(constitution.principles) for _ in range(rounds)]


# ----------------------------------------------------------------------------- who generates


class Generator(Protocol):
    """Replies to a list of chats (in order), stripped of surrounding whitespace."""

    def generate(self, chats: list[Messages], *, temperature: float, max_tokens: int) -> list[str]: ...


class LocalGenerator:
    """A local causal LM (:class:`rlhfkit.generation.chat.LocalChatModel`) generating a list of chats in one batch
    (on the GPU when there is one). Sampling uses torch's global RNG, which :func:`critique_revise` seeds per chunk."""

    def __init__(self, spec: str, *, precision: str = "bf16", top_p: float = 1.0):
        from rlhfkit.generation.chat import LocalChatModel

        self.spec, self.top_p = spec, top_p
        self.chat_model = LocalChatModel(spec, precision=precision)

    def generate(self, chats: list[Messages], *, temperature: float, max_tokens: int) -> list[str]:
        from rlhfkit.generation.rollout import GenerationOptions

        if not chats:
            return []
        for i, chat in enumerate(chats):
            room = self.chat_model.token_room(chat)
            if room is not None and room < max_tokens:
                raise ConfigError(
                    f"cai: chat {i} of the batch leaves {max(room, 0)} tokens of {self.spec}'s context of "
                    f"{self.chat_model.context} for a reply of up to {max_tokens}; shorten the prompts or the few-shot "
                    "examples, or lower max_new_tokens / critique_max_tokens"
                )
        options = GenerationOptions(max_new_tokens=max_tokens, temperature=temperature, top_p=self.top_p)
        return [text.strip() for text in self.chat_model.generator.generate(chats, options)]


class ClientGenerator:
    """A chat client, one chat per request, ``concurrency`` at once: :class:`rlhfkit.feedback.judge.HTTPChatClient`
    (any OpenAI-compatible server) or a :class:`rlhfkit.generation.chat.FunctionBackend`."""

    def __init__(self, complete: Callable[[Messages, float, int], str], *, concurrency: int = 1):
        if concurrency < 1:
            raise ConfigError(f"cai: concurrency must be at least 1, got {concurrency}")
        self.complete, self.concurrency = complete, concurrency

    def generate(self, chats: list[Messages], *, temperature: float, max_tokens: int) -> list[str]:
        def one(chat: Messages) -> str:
            return str(self.complete(chat, temperature, max_tokens)).strip()

        if self.concurrency == 1 or len(chats) <= 1:
            return [one(chat) for chat in chats]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chats))) as pool:
            return list(pool.map(one, chats))


def _critic(config: CAIConfig, local: Callable[[str], LocalGenerator]) -> Generator:
    """The critic ``config`` names; ``local(spec)`` gives a local model, loaded once per spec."""
    client = remote_client(
        "cai",
        "critic",
        backend=config.critic_backend,
        url=config.critic_url,
        name=config.critic_name,
        api_key_env=config.critic_api_key_env,
        timeout=config.critic_timeout,
        retries=config.critic_retries,
    )
    if client is None:
        return local(config.critic_model or config.model)
    return ClientGenerator(
        lambda chat, temperature, max_tokens: client.complete(chat, temperature=temperature, max_tokens=max_tokens),
        concurrency=1 if config.critic_backend else config.concurrency,
    )


def _critic_kind(config: CAIConfig) -> str:
    if config.critic_backend:
        return "backend"
    if config.critic_url:
        return "url"
    return "local"


def cai_settings(config: CAIConfig, constitution: Constitution, few_shot: list[FewShotExample]) -> dict[str, Any]:
    """What the records of revisions.jsonl depend on besides their prompts: recorded beside it and compared on a
    re-run (:attr:`CAIConfig.resume`). Only the generators in use are recorded."""
    settings: dict[str, Any] = {
        "constitution": constitution.digest(),
        "few_shot": few_shot_digest(few_shot),
        "rounds": config.rounds,
        "seed": config.seed,
        "answerer": config.answerer,
        "temperature": config.temperature,
        "critic_temperature": config.critic_temperature,
        "max_new_tokens": config.max_new_tokens,
        "critique_max_tokens": config.critique_max_tokens,
    }
    kind = _critic_kind(config)
    local_specs = [config.model] if config.answerer == "model" else []
    if kind == "backend":
        settings["critic_backend"] = config.critic_backend
    elif kind == "url":
        settings["critic_url"], settings["critic_name"] = config.critic_url, config.critic_name
    else:
        local_specs.append(config.critic_model or config.model)
        settings["critic_model"] = config.critic_model or config.model
    if config.answerer == "model":
        settings["model"] = config.model
    for spec in dict.fromkeys(local_specs):
        settings.setdefault("model_files", {})[spec] = models.model_identity(spec)
    if local_specs:
        settings["top_p"], settings["precision"] = config.top_p, config.precision
    return settings


# ----------------------------------------------------------------------------- one chunk


def critique_revise_chunk(
    items: Sequence[tuple[int, Prompt]],
    *,
    answerer: Generator,
    critic: Generator,
    constitution: Constitution,
    config: CAIConfig,
    few_shot: Sequence[FewShotExample] = (),
) -> list[dict[str, Any]]:
    """The provenance records of ``(prompt_index, prompt)`` items: answer each prompt, then critique and revise it
    for ``config.rounds`` rounds (every item's round in one ``generate`` call of each kind)."""
    prompts = [prompt for _, prompt in items]
    initial = answerer.generate([_turns(p) for p in prompts], temperature=config.temperature, max_tokens=config.max_new_tokens)
    draws = [draw_principles(constitution, config.seed, index, config.rounds) for index, _ in items]
    current = list(initial)
    rounds: list[list[dict[str, Any]]] = [[] for _ in items]
    for r in range(config.rounds):
        principles = [draw[r] for draw in draws]
        critiques = critic.generate(
            [critique_messages(p, a, pr, few_shot) for p, a, pr in zip(prompts, current, principles)],
            temperature=config.critic_temperature,
            max_tokens=config.critique_max_tokens,
        )
        revisions = critic.generate(
            [revision_messages(p, a, pr, c, few_shot) for p, a, pr, c in zip(prompts, current, principles, critiques)],
            temperature=config.critic_temperature,
            max_tokens=config.max_new_tokens,
        )
        for j, (principle, critique, revision) in enumerate(zip(principles, critiques, revisions)):
            rounds[j].append(
                {
                    "round": r,
                    "principle": principle.id,
                    "critique_request": principle.critique_request,
                    "critique": critique,
                    "revision_request": principle.revision_request,
                    "revision": revision,
                }
            )
            if revision:
                current[j] = revision
    return [
        {
            "prompt_index": index,
            "prompt": prompt,
            "initial": initial[j],
            "principles": [step["principle"] for step in rounds[j]],
            "critiques": [step["critique"] for step in rounds[j]],
            "revision": current[j],
            "revised": any(step["revision"] for step in rounds[j]),
            "seed": config.seed,
            "rounds": rounds[j],
        }
        for j, (index, prompt) in enumerate(items)
    ]


# ----------------------------------------------------------------------------- outputs derived from the records


def sft_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """SL-CAI fine-tuning data (rlhfkit's SFT format) from provenance records: each revised prompt with its final
    revision as the reply."""
    out = []
    for record in records:
        if not record["revised"] or not record["revision"]:
            continue
        prompt = record["prompt"]
        if isinstance(prompt, str):
            out.append({"prompt": prompt, "completion": record["revision"]})
        else:
            out.append({"messages": [*_turns(prompt), {"role": "assistant", "content": record["revision"]}]})
    return out


def preference_pairs(records: Sequence[dict[str, Any]]) -> list[Comparison]:
    """RL-CAI's cheap variant: each final revision preferred over its initial answer (pairs of equal or empty
    responses left out)."""
    pairs = []
    for record in records:
        revision, initial = record["revision"], record["initial"]
        if not revision.strip() or not initial.strip() or revision == initial:
            continue
        pairs.append(
            Comparison(
                prompt=record["prompt"],
                responses=[revision, initial],
                ranking=[0, 1],
                reason=f"revised after critiques against {', '.join(record['principles'])}",
                source=PREFERENCE_SOURCE,
                meta={"prompt_index": record["prompt_index"], "principles": list(record["principles"])},
            )
        )
    return pairs


# ----------------------------------------------------------------------------- the stage


def _check_config(config: CAIConfig) -> None:
    if config.resume not in RESUME_MODES:
        raise ConfigError(f"cai: resume must be one of {', '.join(RESUME_MODES)}, got {config.resume!r}")
    if config.rounds < 1:
        raise ConfigError(f"cai: rounds must be at least 1, got {config.rounds}")
    if config.chunk_size < 1:
        raise ConfigError(f"cai: chunk_size must be at least 1, got {config.chunk_size}")
    for key in ("max_new_tokens", "critique_max_tokens"):
        if getattr(config, key) < 1:
            raise ConfigError(f"cai: {key} must be at least 1, got {getattr(config, key)}")
    for key in ("temperature", "critic_temperature"):
        if getattr(config, key) < 0:
            raise ConfigError(f"cai: {key} must be 0 (greedy) or more, got {getattr(config, key)}")
    if config.answerer not in ("model", "critic"):
        raise ConfigError(f"cai: answerer must be 'model' or 'critic', got {config.answerer!r}")


def _resumable(
    config: CAIConfig, output: Path, rows: list[Row], prompts: list, constitution: Constitution, settings: dict[str, Any]
) -> set[int]:
    """The prompt indices already in ``output`` (its ``rows``), after checking they were made under ``settings``
    from ``prompts`` with this run's principle draws: a ConfigError naming each difference, or under
    ``resume=force`` a printed note."""
    done: set[int] = set()
    if not rows:
        return done
    saved, changes = compare_settings(output, settings)
    wrong_prompt: list[str] = []
    wrong_draw: list[str] = []
    where = config.prompts or "the shipped prompts"
    for row in rows:
        index = row.data.get("prompt_index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise row.error("prompt_index", f"expected a non-negative integer, got {index!r}")
        if index in done:
            raise row.error("prompt_index", f"prompt_index {index} is in the file twice (not written by rlhfkit cai?)")
        done.add(index)
        if index >= len(prompts):
            wrong_prompt.append(f"prompt_index {index} is past the {len(prompts)} prompts of {where}")
        elif row.data.get("prompt") != prompts[index]:
            wrong_prompt.append(
                f"prompt_index {index} holds {short_repr(row.data.get('prompt'))}, {where} has {short_repr(prompts[index])}"
            )
        else:
            drawn = [p.id for p in draw_principles(constitution, config.seed, index, config.rounds)]
            if row.data.get("principles") != drawn:
                wrong_draw.append(f"prompt_index {index} has {row.data.get('principles')!r}, this run draws {drawn!r}")
    if wrong_prompt:
        changes["prompt"] = f"{len(wrong_prompt)} of {len(rows)} records differ from {where} (first: {wrong_prompt[0]})"
    if wrong_draw and not changes:
        changes["principles"] = f"{len(wrong_draw)} of {len(rows)} records (first: {wrong_draw[0]})"
    if changes:
        listing = "; ".join(f"{key}: {change}" for key, change in changes.items())
        if config.resume == "force":
            log.warning(f"cai: resume=force: keeping the {len(rows)} records in {output} though they differ ({listing})")
            return done
        raise ConfigError(
            f"cai: cannot resume {output}: its {len(rows)} records were made under other settings ({listing}); "
            f"set resume=never to delete it (and {settings_path(output)}) and start over, write to another "
            "output_dir, or set resume=force to keep its records anyway"
        )
    if saved is None:
        log.info(
            f"cai: warning: {output} has no settings file {settings_path(output)}: its prompts and principles match, "
            "but the models and the other settings could not be checked"
        )
    return done


@dataclass
class CAIResult:
    """What :func:`critique_revise` wrote."""

    revisions: Path
    sft: Path
    preferences: Path | None
    records: int
    """Provenance records of this run's prompts in revisions.jsonl."""
    sft_records: int
    preference_pairs: int


def critique_revise(config: CAIConfig) -> CAIResult:
    """SL-CAI's data: answer every prompt, critique and revise each answer for ``config.rounds`` rounds against
    principles drawn from the constitution, and write the provenance records, the SFT data made of the final
    revisions and (``preferences``) the revision-over-initial pairs to ``config.output_dir`` (see the module
    docstring). Records already there are kept, or refused, as :attr:`CAIConfig.resume` says. The constitution,
    few-shot examples and prompts are read and checked before any model is loaded."""
    _check_config(config)
    constitution = load_constitution(config.constitution or None)
    few_shot_path = DEFAULT_FEW_SHOT if config.few_shot == "default" else config.few_shot
    few_shot = load_few_shot(few_shot_path, constitution) if few_shot_path else []
    all_prompts = load_prompts(config.prompts or DEFAULT_PROMPTS)
    prompts = all_prompts[: config.max_prompts] if config.max_prompts > 0 else all_prompts

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    output, sft_path, preferences_path = out / REVISIONS_FILE, out / SFT_FILE, out / PREFERENCES_FILE
    for path in (output, sft_path, preferences_path):  # temps of an atomic write that a kill left
        remove_stale_temps(out, atomic_temp_pattern(path))
    if config.resume == "never":
        start_over(output, "cai")
    settings = cai_settings(config, constitution, few_shot)
    rows = read_jsonl_log(output, repair=True)  # a torn last line is cut off, so appends start on a whole line
    done = _resumable(config, output, rows, all_prompts, constitution, settings)
    write_run_config(out, "cai", config)
    todo = chunks_to_do(output, rows, chunk_grid(len(prompts), config.chunk_size), done, stage="cai")
    if todo:
        _run_chunks(config, todo, prompts, output, settings, constitution, few_shot)
    else:
        log.info(f"cai: all {len(prompts)} prompts already in {output}")

    by_index = {row.data["prompt_index"]: row.data for row in read_jsonl_log(output)}
    records = [by_index[i] for i in range(len(prompts)) if i in by_index]
    sft = sft_records(records)
    write_jsonl(sft_path, sft)
    pairs: list[Comparison] = []
    if config.preferences:
        pairs = preference_pairs(records)
        save_comparisons(preferences_path, pairs)
    unrevised = sum(not r["revised"] or not r["revision"] for r in records)
    changed = sum(r["revision"] != r["initial"] for r in records)
    log.info(
        f"cai: {len(records)} records in {output} ({changed} revised to a different answer); {len(sft)} SFT records in "
        f"{sft_path}"
        + (f" ({unrevised} left out: every revision empty)" if unrevised else "")
        + (f"; {len(pairs)} preference pairs in {preferences_path}" if config.preferences else "")
    )
    return CAIResult(output, sft_path, preferences_path if config.preferences else None, len(records), len(sft), len(pairs))


def _run_chunks(
    config: CAIConfig,
    todo: list[list[int]],
    prompts: list,
    output: Path,
    settings: dict[str, Any],
    constitution: Constitution,
    few_shot: list[FewShotExample],
) -> None:
    """Generate the chunks ``todo`` and append their records to ``output``, one write per chunk."""
    import torch

    loaded: dict[str, LocalGenerator] = {}

    def local(spec: str) -> LocalGenerator:
        if spec not in loaded:
            loaded[spec] = LocalGenerator(spec, precision=config.precision, top_p=config.top_p)
        return loaded[spec]

    critic = _critic(config, local)
    answerer = critic if config.answerer == "critic" else local(config.model)
    bar = tqdm(
        total=len(prompts),
        initial=len(prompts) - sum(map(len, todo)),
        unit="prompt",
        disable=not config.progress,
        desc=f"cai ({config.rounds} round{'s' if config.rounds != 1 else ''})",
    )
    with open(output, "ab", buffering=0) as f:
        for k, chunk in enumerate(todo):
            torch.manual_seed(config.seed * 1_000_003 + chunk[0])
            records = critique_revise_chunk(
                [(i, prompts[i]) for i in chunk],
                answerer=answerer,
                critic=critic,
                constitution=constitution,
                config=config,
                few_shot=few_shot,
            )
            if k == 0:  # before the first new record (not before a failed load): what every record now matches
                write_settings(output, settings)
            append_whole(f, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
            bar.update(len(chunk))
    bar.close()
