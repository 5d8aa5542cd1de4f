"""Chat backends: something that answers a list of chat messages (a local causal LM, or a Python function).

The OpenAI-compatible server (:mod:`rlhfkit.serve`) and the AI judge (:mod:`rlhfkit.feedback.judge`) both use them.
The model backend imports torch and transformers only when it is built, so a server over a function starts fast.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Messages = list[dict[str, str]]

DEFAULT_MAX_TOKENS = 256
"""Completion length when a request gives no ``max_tokens`` (capped like an explicit one)."""


@dataclass
class Completion:
    """One or more generated replies to a message list, with usage counts."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: list[int]
    """Per reply; a reply that used all of ``max_tokens`` is reported with finish_reason ``length``."""


class ChatBackend(Protocol):
    """What the server needs from a backend."""

    def chat(self, messages: Messages, *, n: int, temperature: float, max_tokens: int) -> Completion:
        """``n`` replies to ``messages``."""

    def token_room(self, messages: Messages) -> int | None:
        """How many tokens fit after ``messages`` in the model's context (None: no context to fill)."""


class FunctionBackend:
    """A Python callable ``fn(messages) -> str`` as a backend (scripted or rule-based judges).

    ``temperature`` and ``max_tokens`` are not passed on (the function decides its
    own reply); ``n`` replies are ``n`` calls. Usage counts are word counts.
    """

    def __init__(self, fn: Callable[[Messages], str]):
        self.fn = fn

    def chat(self, messages: Messages, *, n: int, temperature: float, max_tokens: int) -> Completion:
        texts = [str(self.fn(messages)) for _ in range(n)]
        prompt_words = sum(len(m.get("content", "").split()) for m in messages)
        return Completion(texts, prompt_words, [len(t.split()) for t in texts])

    def token_room(self, messages: Messages) -> int | None:
        return None


class LocalChatModel:
    """A transformers causal LM that answers chat messages: load once, generate under a lock.

    Shared by the server's model backend and :class:`rlhfkit.feedback.judge.LocalChatClient`.
    ``generate`` is serialised because one model instance is not safe to call
    from several threads, and batching unrelated requests is not worth it here.
    The model goes to CUDA when available (``device="auto"``), else CPU.
    """

    def __init__(self, model_spec: str, *, precision: str = "bf16", device: str = "auto"):
        import torch

        from rlhfkit.generation.rollout import HFGenerator
        from rlhfkit.modeling import models

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_spec = model_spec
        self.tokenizer = models.load_tokenizer(model_spec)
        model = models.load_causal_lm(model_spec).to(device)
        self.context: int | None = getattr(model.config, "max_position_embeddings", None)
        """Tokens the model can attend over (prompt + completion); None if its config does not say."""
        self.generator = HFGenerator(model, self.tokenizer, precision=precision)
        self._lock = threading.Lock()

    def _prompt_tokens(self, messages: Messages) -> int:
        from rlhfkit.generation.rollout import render_prompt

        return len(self.tokenizer(render_prompt(self.tokenizer, messages), add_special_tokens=False)["input_ids"])

    def token_room(self, messages: Messages) -> int | None:
        return None if self.context is None else self.context - self._prompt_tokens(messages)

    def chat(
        self, messages: Messages, *, n: int = 1, temperature: float = 0.0, max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> Completion:
        """``n`` replies (``temperature`` 0 = greedy, so all ``n`` are then identical)."""
        from rlhfkit.generation.rollout import GenerationOptions

        options = GenerationOptions(max_new_tokens=max_tokens, temperature=temperature)
        with self._lock:
            texts = self.generator.generate([messages] * n, options)
        # Re-tokenising the decoded text approximates the generated count (EOS is not counted).
        completion_tokens = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return Completion(texts, self._prompt_tokens(messages), completion_tokens)


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``"module:function"`` with the working directory on ``sys.path`` (for the import only)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"backend must look like 'module:function', got '{spec}'")
    from rlhfkit.feedback.scorers import import_from_cwd

    cwd = os.getcwd()
    try:
        module = import_from_cwd(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import backend module '{module_name}' (searched the working directory {cwd}): {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"backend module '{module_name}' has no attribute '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"backend '{spec}' is not callable")
    return fn


def make_backend(model: str, backend: str = "", *, precision: str = "bf16") -> ChatBackend:
    """A function backend if ``backend`` is ``"module:function"``, else the causal LM ``model``."""
    if backend:
        return FunctionBackend(load_function(backend))
    return LocalChatModel(model, precision=precision)
