"""Generation from a policy.

:class:`HFGenerator` wraps transformers ``generate`` (batched, KV cache, left
padding). It is the engine behind ``rlhfkit chat`` and, later, behind rollouts;
a vLLM engine can implement the same ``generate`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]


@dataclass
class GenerationOptions:
    """Sampling settings."""

    max_new_tokens: int = 64
    """Tokens to generate at most (generation also stops at EOS)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables it)."""


def render_prompt(tokenizer, prompt: Prompt, *, chat_template: bool = True) -> str:
    """Prompt text: a string becomes one user turn, rendered with the chat template plus
    the generation prompt; a message list is rendered as is; ``chat_template=False``
    leaves a string untouched."""
    if isinstance(prompt, str):
        if not chat_template:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


class HFGenerator:
    """Batched sampling with transformers ``generate`` under the training precision."""

    def __init__(self, model, tokenizer, *, precision: str = "bf16", chat_template: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.precision, self.chat_template = precision, chat_template

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], options: GenerationOptions) -> list[str]:
        """One completion per prompt (text after the prompt, special tokens removed)."""
        tok = self.tokenizer
        texts = [render_prompt(tok, p, chat_template=self.chat_template) for p in prompts]
        side = tok.padding_side
        tok.padding_side = "left"  # generation appends on the right
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        sample = options.temperature > 0
        kwargs = dict(
            max_new_tokens=options.max_new_tokens,
            do_sample=sample,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=0)
        was_training = self.model.training
        self.model.eval()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.model.generate(**enc, **kwargs)
        self.model.train(was_training)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        return tok.batch_decode(new_tokens, skip_special_tokens=True)
