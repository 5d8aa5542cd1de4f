"""The chat client that a stage's ``<role>_backend`` / ``<role>_url`` keys name: SL-CAI's critic (:mod:`rlhfkit.cai`)
and RL-CAI's judge (:mod:`rlhfkit.cai_label`).

Both stages take the same three ways to reach a chat model other than a local one, under their own key prefix: a
Python function ``module:function`` (:class:`FunctionClient`), or an OpenAI-compatible server
(:class:`rlhfkit.feedback.judge.HTTPChatClient`) with its API key read from an environment variable. They live here,
a layer below the stages, because no stage imports another.
"""

from __future__ import annotations

import os
from typing import Any

from rlhfkit.config import ConfigError
from rlhfkit.data.records import Message


class FunctionClient:
    """A ``module:function`` backend (:class:`rlhfkit.generation.chat.FunctionBackend`) as a chat client."""

    def __init__(self, spec: str):
        from rlhfkit.generation.chat import FunctionBackend, load_function

        self.backend = FunctionBackend(load_function(spec))

    def complete(self, messages: list[Message], temperature: float = 0.0, max_tokens: int = 16) -> str:
        return self.backend.chat(messages, n=1, temperature=temperature, max_tokens=max_tokens).texts[0]


def remote_client(
    stage: str, role: str, *, backend: str, url: str, name: str, api_key_env: str, timeout: float, retries: int
) -> Any:
    """The chat client of a ``module:function`` ``backend`` (wins) or of the OpenAI-compatible server at ``url``
    (:class:`rlhfkit.feedback.judge.HTTPChatClient`, its key read from ``$api_key_env``); None when neither is set
    (a local model then). A bad one is a ConfigError naming ``stage`` and its ``role``'s key (``critic_url``)."""
    if backend:
        try:
            return FunctionClient(backend)
        except ValueError as e:
            raise ConfigError(f"{stage}: {role}_backend: {e}") from None
    if not url:
        return None
    from rlhfkit.feedback.judge import HTTPChatClient  # optional: pydantic (through rlhfkit.serve)

    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise ConfigError(f"{stage}: {role}_api_key_env names ${api_key_env}, which is not set")
    try:
        return HTTPChatClient(url, model=name, api_key=api_key, timeout=timeout, max_retries=retries)
    except ValueError as e:
        raise ConfigError(f"{stage}: {role}_url: {e}") from None
