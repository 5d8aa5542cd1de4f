"""Sampling responses to label: ``rlhfkit sample CONFIG.yaml`` / :func:`run`.

For every prompt, one response per entry of ``temperatures`` (the seed design:
two responses, at 0.7 and 1.2, so pairs differ in quality). Generation is
batched with a KV cache (:class:`rlhfkit.generation.rollout.HFGenerator`) on a fixed grid
(batch k is prompts ``[k*B, (k+1)*B)``, seeded from ``seed`` and ``k*B``). Each
finished batch is appended to the output JSONL in one write and fsynced, so a
crash loses at most the batch in flight; a re-run skips batches already written
(by ``prompt_index``), drops a torn last line and the records of a batch only
partly written (a full disk, a kill inside the write) and samples that batch
again whole, so nothing is duplicated or lost and the file ends as an
uninterrupted run's.

A re-run only adds to records sampled under the same settings (``resume``): the
settings are recorded beside the output (``samples.jsonl.meta.json``, see
:func:`sampling_settings`), and each record must still hold the prompt at its
``prompt_index`` and the config's temperatures; otherwise the stage stops with
an error naming the changed keys.

Output records: ``{"prompt_index", "prompt", "responses": [...], "temperatures": [...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from rlhfkit import log
from rlhfkit.config import ConfigError
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
    write_settings,
)
from rlhfkit.data.prompts import demo_data_path, load_prompts
from rlhfkit.generation.rollout import GenerationOptions, HFGenerator
from rlhfkit.generation.workers import Workers, cached
from rlhfkit.modeling import models


@dataclass
class SampleConfig:
    """Config of the sampling stage."""

    model: str = models.TINY
    """Model spec to sample from (usually the SFT output directory)."""
    prompts: str = ""
    """JSONL/JSON of records with a `prompt` field (string or chat-message list). Empty: the shipped demo prompts."""
    output: str = "runs/samples.jsonl"
    """Output JSONL (appended to; re-runs resume)."""
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.2])
    """One response per temperature per prompt."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 96
    """Maximum response length in tokens."""
    stop: list[str] = field(default_factory=list)
    """Cut each response at the first occurrence of any of these strings, which is not kept (as the
    ``stop`` of OpenAI-style APIs); e.g. ``["\\n\\n"]`` keeps the first paragraph. Leading whitespace
    is dropped first, so a response that opens with a blank line is not cut to nothing."""
    batch_size: int = 16
    """Prompts generated together."""
    max_prompts: int = -1
    """Use only the first N prompts (-1: all)."""
    seed: int = 0
    """Sampling seed (each batch is reseeded from it and its first prompt index)."""
    precision: str = "bf16"
    """Compute precision for generation."""
    workers: int = 1
    """Processes that sample batches side by side (:mod:`rlhfkit.generation.workers`), sharing this process's
    threads: on 2 CPU cores (fp32) 2 took 8% less time than 1 on both. The samples are the same (each batch has
    its own seed); 1 (the default, and for a GPU): sample here."""
    progress: bool = True
    """Show a progress bar."""
    resume: Literal["auto", "force", "never"] = "auto"
    """What to do with records already in `output`. `auto`: keep them and sample only the prompts missing, refused
    (an error naming the changed keys) if they were sampled under other settings -- another model (its spec, or for
    a model directory its config.json and its weight files' names, sizes and modification times), temperatures,
    top_p, max_new_tokens, stop, seed or precision (recorded in `output` + `.meta.json`), or a record whose prompt
    is no longer the prompt at its prompt_index; batch_size, max_prompts, prompts (the path) and progress may
    change. `force`: keep them even so, printing what differs. `never`: delete `output` and its settings file, and
    start over."""


def sampling_settings(config: SampleConfig) -> dict[str, Any]:
    """What the records of ``config.output`` depend on, besides their prompts: recorded beside it, and compared
    on a re-run (:attr:`SampleConfig.resume`)."""
    return {
        "model": config.model,
        "model_files": models.model_identity(config.model),
        "temperatures": list(config.temperatures),
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "stop": list(config.stop),
        "seed": config.seed,
        "precision": config.precision,
    }


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` without surrounding whitespace, cut at the first occurrence of any ``stop`` string.

    ``cut_at_stop("  Hi.\\n\\nMore", ["\\n\\n"]) == "Hi."``; no ``stop``: just stripped.
    """
    text = text.strip()
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def _resumable(config: SampleConfig, rows: list[Row], prompts: list, settings: dict[str, Any]) -> set[int]:
    """The prompt indices of the records already in ``config.output`` (``rows``), after checking that they were
    sampled under ``settings`` from ``prompts`` (every prompt of the file, before max_prompts): a ConfigError
    naming every difference, or under ``resume=force`` a printed note."""
    output = Path(config.output)
    done: set[int] = set()
    if not rows:
        return done
    saved, changes = compare_settings(output, settings)
    temperatures = json.loads(json.dumps(list(config.temperatures)))
    wrong_prompt: list[Row] = []
    wrong_temperatures: list[Row] = []
    for row in rows:
        index = row.data.get("prompt_index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise row.error("prompt_index", f"expected a non-negative integer, got {index!r}")
        done.add(index)
        if index >= len(prompts) or row.data.get("prompt") != prompts[index]:
            wrong_prompt.append(row)
        if row.data.get("temperatures") != temperatures:
            wrong_temperatures.append(row)
    if wrong_prompt:
        first, where = wrong_prompt[0].data, config.prompts or "the demo prompts"
        index = first["prompt_index"]
        if index >= len(prompts):
            detail = f"prompt_index {index} is past the {len(prompts)} prompts of {where}"
        else:
            detail = f"prompt_index {index} holds {short_repr(first.get('prompt'))}, {where} has {short_repr(prompts[index])}"
        changes["prompt"] = f"{len(wrong_prompt)} of {len(rows)} records differ from {where} (first: {detail})"
    if wrong_temperatures and "temperatures" not in changes:
        sampled_at = wrong_temperatures[0].data.get("temperatures")
        changes["temperatures"] = (
            f"{len(wrong_temperatures)} of {len(rows)} records were sampled at {sampled_at!r}, the config has {temperatures!r}"
        )
    if changes:
        listing = "; ".join(f"{key}: {change}" for key, change in changes.items())
        if config.resume == "force":
            log.warning(f"sample: resume=force: keeping the {len(rows)} records in {output} though they differ ({listing})")
            return done
        raise ConfigError(
            f"sample: cannot resume {output}: its {len(rows)} records were sampled under other settings ({listing}); "
            f"set resume=never to delete it (and {settings_path(output)}) and start over, write to another output, "
            "or set resume=force to keep its records anyway"
        )
    if saved is None:
        log.info(
            f"sample: warning: {output} has no settings file {settings_path(output)} (written by an older rlhfkit): "
            "its prompts and temperatures match, but the model and the other sampling settings could not be checked"
        )
    return done


def run(config: SampleConfig) -> Path:
    """Generate samples; returns the output path. Records already in the output are kept, or refused, as
    :attr:`SampleConfig.resume` says."""

    if config.resume not in RESUME_MODES:
        raise ConfigError(f"sample: resume must be one of {', '.join(RESUME_MODES)}, got {config.resume!r}")
    if config.batch_size < 1:
        raise ConfigError(f"sample: batch_size must be at least 1, got {config.batch_size}")
    if config.workers < 1:
        raise ConfigError(f"sample: workers must be at least 1, got {config.workers}")
    prompts = load_prompts(config.prompts or demo_data_path("prompts_train.jsonl"))
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Temp files of an atomic rewrite of the output or its settings that a kill left (one writer per output).
    remove_stale_temps(output.parent, atomic_temp_pattern(output))
    if config.resume == "never":
        start_over(output, "sample")
    settings = sampling_settings(config)
    # A torn last line (a kill mid-write) is cut off the file, so the appends below start on a whole line.
    rows = read_jsonl_log(output, repair=True)
    done = _resumable(config, rows, prompts, settings)
    if config.max_prompts > 0:
        prompts = prompts[: config.max_prompts]
    # Batch k is prompts [k*B, (k+1)*B), sampled under its own seed whatever is on disk (a batch only partly
    # written is dropped and sampled again whole), so a resumed run samples each prompt as an uninterrupted one.
    todo = chunks_to_do(output, rows, chunk_grid(len(prompts), config.batch_size), done, stage="sample", unit="batch(es)")
    if not todo:
        log.info(f"sample: all {len(prompts)} prompts already in {output}")
        return output
    bar = tqdm(
        total=len(prompts), initial=len(prompts) - sum(map(len, todo)), unit="prompt", disable=not config.progress, desc="sample"
    )
    jobs = [(config, [prompts[i] for i in batch], batch[0]) for batch in todo]
    with open(output, "ab", buffering=0) as f, Workers(min(config.workers, len(todo))) as pool:
        for k, (batch, responses) in enumerate(zip(todo, pool.imap(_sample_job, jobs))):
            if k == 0:  # before the first new record (not before a failed load): what every record now matches
                write_settings(output, settings)
            text = "".join(
                json.dumps(
                    {
                        "prompt_index": index,
                        "prompt": prompts[index],
                        "responses": [cut_at_stop(r[j], config.stop) for r in responses],
                        "temperatures": list(config.temperatures),
                    },
                    ensure_ascii=False,
                )
                + "\n"
                for j, index in enumerate(batch)
            )
            append_whole(f, text.encode("utf-8"))
            bar.update(len(batch))
    bar.close()
    return output


def _generator(config: SampleConfig) -> HFGenerator:
    model = models.load_causal_lm(config.model).eval().to(models.inference_device())
    return HFGenerator(model, models.load_tokenizer(config.model), precision=config.precision)


def _sample_job(config: SampleConfig, prompts: list, first_index: int) -> list[list[str]]:
    """One batch (a job of :class:`~rlhfkit.generation.workers.Workers`): its model loaded once per process,
    its draws seeded from ``seed`` and its first prompt's index alone."""
    generator = cached(("sample", config.model, config.precision), lambda: _generator(config))
    torch.manual_seed(config.seed * 1_000_003 + first_index)
    return _sample_batch(generator, prompts, config)


def _sample_batch(generator: HFGenerator, prompts: list, config: SampleConfig) -> list[list[str]]:
    """One list of responses per entry of ``config.temperatures`` (each in prompt order).

    A temperature listed k times is one generate call with each prompt repeated k times, and the
    repeats share their prompt's prefill (:class:`rlhfkit.generation.rollout.HFEngine`): the demo's
    ``[0.7, 1.0, 0.7, 1.0]`` is two calls of 2 x 64 rows instead of four of 64.
    """
    out: list[list[str]] = [[] for _ in config.temperatures]
    for t in dict.fromkeys(config.temperatures):
        slots = [j for j, u in enumerate(config.temperatures) if u == t]
        options = GenerationOptions(config.max_new_tokens, t, config.top_p)
        texts = generator.generate([p for p in prompts for _ in slots], options)
        for k, j in enumerate(slots):
            out[j] = texts[k :: len(slots)]
    return out
