"""Reference log-probs computed once before training, split over the processes, cached next to the run.

DPO and KTO both score every example under the frozen reference model before the first step (TRL's
``precompute_ref_log_probs``). :func:`reference_logps` does it for either: each process scores every
``num_processes``-th example on its device, the parts are gathered back in order (:func:`interleave`), and the
result is cached in ``OUTPUT_DIR/.rlhfkit-cache/`` under a key that hashes the data files, every reference weight,
the tokenizer and the settings that change the numbers (:func:`cache_path`; the hashing runs once, on the main
process). A later run with the same key loads the cache instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit import log
from rlhfkit.modeling import models
from rlhfkit.training.loop import process_state

REF_CACHE_DIR = ".rlhfkit-cache"
"""The reference-log-prob cache's directory, inside the output directory."""


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_model(model) -> str:
    """Content hash of a model's weights (names, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hash_tokenizer(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((text + str(tokenizer.chat_template)).encode()).hexdigest()


def cache_path(config, ref_model, tokenizer, *, tag: str = "ref", extra: dict[str, Any] | None = None) -> Path:
    """Where the reference log-probs for this (data, reference, tokenizer, settings) live; hashes every weight.

    ``config`` has ``data``, ``eval_data``, ``output_dir``, ``max_length``, ``chat_template``, ``precision``,
    ``eval_fraction`` and ``seed`` (a DPO or KTO config); ``extra`` adds a stage's own keys; the file is
    ``DATA_NAME.TAG-DIGEST.safetensors``.
    """
    key = {
        "data": hash_file(config.data),
        "eval_data": hash_file(config.eval_data) if config.eval_data else "",
        "model": hash_model(ref_model),
        "tokenizer": hash_tokenizer(tokenizer),
        "max_length": config.max_length,
        "chat_template": config.chat_template,
        "precision": config.precision,
        "eval_fraction": config.eval_fraction,
        "seed": config.seed,
        **(extra or {}),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(config.output_dir) / REF_CACHE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{Path(config.data).name}.{tag}-{digest}.safetensors"


@torch.no_grad()
def score_batches(
    model,
    examples: list[dict],
    score: Callable[[Any, list[dict], torch.device], torch.Tensor],
    *,
    precision: str,
    batch_size: int,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """``score(model, chunk, device)`` (rows of fp32 log-probs) over ``examples`` in chunks of ``batch_size``, with
    the adapters off (a LoRA model's base is the reference) and autocast to ``precision``; the rows concatenated."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with models.adapters_disabled(model):
        for start in tqdm(range(0, len(examples), batch_size), unit="batch", desc=desc, disable=not progress):
            with models.autocast(device, precision):
                out.append(score(model, examples[start : start + batch_size], device).float().cpu())
    model.train()
    return torch.cat(out) if out else torch.zeros(0, 2)


def interleave(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Rows ``0..n-1`` from ``parts[r]`` = rows ``r, r + P, r + 2P, ...`` (``P = len(parts)``), back in order."""
    out = torch.zeros(n, *parts[0].shape[1:], dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


def reference_logps(
    ref,
    examples: list[dict],
    compute: Callable[[Any, list[dict], bool], torch.Tensor],
    *,
    find_cache: Callable[[], Path] | None,
    stage: str,
) -> torch.Tensor:
    """``compute(ref, examples, progress)`` for all ``examples``, split over the processes, or the cache.

    ``find_cache()`` (run on the main process only: it hashes every weight) gives the cache file; None: no cache.
    Every process gets the whole (N, ...) tensor. A cache whose row count is not N is an error naming it.
    """
    from accelerate.utils import broadcast_object_list, gather_object
    from safetensors.torch import load_file, save_file

    state = process_state()
    path, cached = None, False
    if find_cache is not None:
        found: list[Any] = [None, False]
        if state.is_main_process:
            found[0] = find_cache()
            found[1] = found[0].exists()
        path, cached = broadcast_object_list(found)
    if cached:
        logps = load_file(str(path))["ref_logps"]
        log.info(f"{stage}: reference log-probs loaded from cache {path}")
    else:
        # Each process scores every num_processes-th example on its device; the parts are gathered (all processes).
        rank, world = state.process_index, state.num_processes
        ref.to(state.device)
        part = compute(ref, examples[rank::world], state.is_main_process)
        logps = interleave(gather_object([part]) if world > 1 else [part], len(examples))
        if path is not None and state.is_main_process:
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"ref_logps": logps}, str(tmp))
            tmp.replace(path)
            log.info(f"{stage}: reference log-probs cached at {path}")
    state.wait_for_everyone()
    if logps.shape[0] != len(examples):
        raise RuntimeError(f"reference cache {path} has {logps.shape[0]} rows, expected {len(examples)}")
    return logps
