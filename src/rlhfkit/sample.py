"""Sampling responses to label: ``rlhfkit sample CONFIG.yaml`` / :func:`run`.

For every prompt, one response per entry of ``temperatures`` (the seed design:
two responses, at 0.7 and 1.2, so pairs differ in quality). Generation is
batched with a KV cache (:class:`rlhfkit.rollout.HFGenerator`). Each finished
prompt is appended to the output JSONL and flushed at once, so a crash loses at
most the batch in flight; a re-run skips prompts already written (by
``prompt_index``) and drops a torn last line, so nothing is duplicated or lost.

A re-run only adds to records sampled under the same settings (``resume``): the
settings are recorded beside the output (``samples.jsonl.meta.json``, see
:func:`sampling_settings`), and each record must still hold the prompt at its
``prompt_index`` and the config's temperatures; otherwise the stage stops with
an error naming the changed keys.

Output records: ``{"prompt_index", "prompt", "responses": [...], "temperatures": [...]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from rlhfkit import models
from rlhfkit.config import ConfigError
from rlhfkit.data.io import (DataError, Row, changed_settings, read_jsonl_log, read_rows, read_settings, settings_path,
                             write_settings)
from rlhfkit.rollout import GenerationOptions, HFGenerator


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


RESUME_MODES = ("auto", "force", "never")
"""The values of :attr:`SampleConfig.resume` (those of :attr:`rlhfkit.loop.TrainOptions.resume`, less a path)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""Files of a model directory that identify its weights by name, size and modification time (:func:`model_identity`)."""


def model_identity(spec: str) -> str:
    """A cheap identity of what model ``spec`` names, beyond the spec itself. A model directory: a hash of its
    ``config.json`` and of the names, sizes and modification times of its weight files (hashing the weights costs
    too much; the time tells a model retrained in place, whose sizes stay the same). A file (``.gguf``): its size
    and modification time. A built-in name (``tiny``, ``smollm2-135m``): empty."""
    path = Path(spec)
    if path.is_dir():
        digest = hashlib.sha256()
        config = path / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                         if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        digest.update(json.dumps(weights).encode())
        return "sha256:" + digest.hexdigest()
    if path.is_file():
        return f"{path.stat().st_size} bytes, modified {path.stat().st_mtime_ns} ns"
    return ""


def sampling_settings(config: SampleConfig) -> dict[str, Any]:
    """What the records of ``config.output`` depend on, besides their prompts: recorded beside it, and compared
    on a re-run (:attr:`SampleConfig.resume`)."""
    return {
        "model": config.model, "model_files": model_identity(config.model),
        "temperatures": list(config.temperatures), "top_p": config.top_p, "max_new_tokens": config.max_new_tokens,
        "stop": list(config.stop), "seed": config.seed, "precision": config.precision,
    }


def load_prompts(path: str | Path) -> list:
    """Prompts from a JSON/JSONL file of records with a `prompt` field (string or messages)."""
    from rlhfkit.data.sft import parse_messages

    prompts = []
    for row in read_rows(path):
        value = row.data.get("prompt")
        if isinstance(value, list):
            prompts.append([{"role": r, "content": c} for r, c in parse_messages(row, "prompt")])
        else:
            prompts.append(row.get_str("prompt"))
    if not prompts:
        raise DataError(path, None, "prompt", "no prompts")
    return prompts


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` without surrounding whitespace, cut at the first occurrence of any ``stop`` string.

    ``cut_at_stop("  Hi.\\n\\nMore", ["\\n\\n"]) == "Hi."``; no ``stop``: just stripped.
    """
    text = text.strip()
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def _start_over(output: Path) -> None:
    """``resume=never``: delete ``output`` and its settings file."""
    removed = [path for path in (output, settings_path(output)) if path.exists()]
    for path in removed:
        path.unlink()
    if removed:
        print(f"sample: resume=never: deleted {' and '.join(map(str, removed))}; starting over")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resumable(config: SampleConfig, rows: list[Row], prompts: list, settings: dict[str, Any]) -> set[int]:
    """The prompt indices of the records already in ``config.output`` (``rows``), after checking that they were
    sampled under ``settings`` from ``prompts`` (every prompt of the file, before max_prompts): a ConfigError
    naming every difference, or under ``resume=force`` a printed note."""
    output = Path(config.output)
    done: set[int] = set()
    if not rows:
        return done
    changes: dict[str, str] = {}
    try:
        saved = read_settings(output)
    except DataError as e:  # written atomically, so only a damaged disk or a hand edit gets here
        changes["settings"], saved = e.problem, {}
    if saved:
        changes.update(changed_settings(saved, settings))
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
            detail = f"prompt_index {index} holds {_short(first.get('prompt'))}, {where} has {_short(prompts[index])}"
        changes["prompt"] = f"{len(wrong_prompt)} of {len(rows)} records differ from {where} (first: {detail})"
    if wrong_temperatures and "temperatures" not in changes:
        sampled_at = wrong_temperatures[0].data.get("temperatures")
        changes["temperatures"] = (f"{len(wrong_temperatures)} of {len(rows)} records were sampled at "
                                   f"{sampled_at!r}, the config has {temperatures!r}")
    if changes:
        listing = "; ".join(f"{key}: {change}" for key, change in changes.items())
        if config.resume == "force":
            print(f"sample: resume=force: keeping the {len(rows)} records in {output} though they differ ({listing})")
            return done
        raise ConfigError(
            f"sample: cannot resume {output}: its {len(rows)} records were sampled under other settings ({listing}); "
            f"set resume=never to delete it (and {settings_path(output)}) and start over, write to another output, "
            "or set resume=force to keep its records anyway")
    if saved is None:
        print(f"sample: warning: {output} has no settings file {settings_path(output)} (written by an older rlhfkit): "
              "its prompts and temperatures match, but the model and the other sampling settings could not be checked")
    return done


def run(config: SampleConfig) -> Path:
    """Generate samples; returns the output path. Records already in the output are kept, or refused, as
    :attr:`SampleConfig.resume` says."""
    from rlhfkit.sft import demo_data_path

    if config.resume not in RESUME_MODES:
        raise ConfigError(f"sample: resume must be one of {', '.join(RESUME_MODES)}, got {config.resume!r}")
    prompts = load_prompts(config.prompts or demo_data_path("prompts_train.jsonl"))
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if config.resume == "never":
        _start_over(output)
    settings = sampling_settings(config)
    # A torn last line (a kill mid-write) is cut off the file, so the appends below start on a whole line.
    done = _resumable(config, read_jsonl_log(output, repair=True), prompts, settings)
    if config.max_prompts > 0:
        prompts = prompts[: config.max_prompts]
    todo = [i for i in range(len(prompts)) if i not in done]
    if not todo:
        print(f"sample: all {len(prompts)} prompts already in {output}")
        return output
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model).eval()
    generator = HFGenerator(model, tokenizer, precision=config.precision)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt", disable=not config.progress,
               desc="sample")
    with open(output, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            torch.manual_seed(config.seed * 1_000_003 + batch[0])
            responses = [
                generator.generate([prompts[i] for i in batch], GenerationOptions(config.max_new_tokens, t, config.top_p))
                for t in config.temperatures
            ]
            if start == 0:  # before the first new record (not before a failed load): what every record now matches
                write_settings(output, settings)
            for j, index in enumerate(batch):
                record = {
                    "prompt_index": index,
                    "prompt": prompts[index],
                    "responses": [cut_at_stop(r[j], config.stop) for r in responses],
                    "temperatures": list(config.temperatures),
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return output
