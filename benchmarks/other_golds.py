"""Gold scorers that are not the demo's rubric: checks that the demo's recipe is not fitted to it.

Each is ``fn(prompts, responses, **kwargs) -> list[float]`` (a prompt: a string or a chat-message list, scored by its last user turn), the
interface of ``rlhfkit demo gold=module:function``. From the repository root::

    rlhfkit demo output_dir=runs/demo_relevance gold=benchmarks.other_golds:relevance
    rlhfkit demo output_dir=runs/demo_rating10 gold=benchmarks.other_golds:rating10

They differ from ``rlhfkit.feedback.scorers.DEMO_RUBRIC`` (sentiment words, a 40-word length target, banned
words) in what they reward, in scale (0-100, an integer 1-10, about -3..+3) and in how often two responses tie
exactly (39% and 33% of the demo's sample-stage pairs for ``relevance`` and ``rating10``, 2% for the rubric).
``relevance`` and ``rating10`` depend on the prompt, which the rubric does not. Results: benchmarks/demo_runs.md, "Other gold scorers".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rlhfkit.feedback.simulated import prompt_text

STOP = set(
    """a an the and or but if then so to of in on at by for with from as is are was were be been being
i you he she it we they me my your our their this that these those what which who whom how why when where
do does did can could would should will shall may might must have has had not no yes please tell give
make write explain describe list some any about into over than more most very just also""".split()
)


def _words(t: str) -> list[str]:
    return re.findall(r"[a-z]+", t.lower())


def _coverage(prompt: Any, response: str) -> tuple[float, int]:
    """(the share of the prompt's content words the response uses, stems by 5-letter prefix; its word count)."""
    asked = {w[:5] for w in _words(prompt_text(prompt)) if w not in STOP and len(w) > 2}
    words = _words(response)
    return len(asked & {w[:5] for w in words}) / max(1, len(asked)), len(words)


def relevance(prompts: Sequence[Any], responses: Sequence[str], **kwargs: Any) -> list[float]:
    """0-100: share of the prompt's content words the response uses (stems by 5-letter prefix),
    minus 1 point per word beyond 70."""
    out = []
    for p, r in zip(prompts, responses):
        cover, n = _coverage(p, r)
        out.append(100.0 * cover - max(0, n - 70))
    return out


def detail(prompts: Sequence[Any], responses: Sequence[str], **kwargs: Any) -> list[float]:
    """About -3..+3: distinct words (more is better), digits and list items count as detail,
    repeated words and exclamation marks cost."""
    out = []
    for r in responses:
        w = _words(r)
        distinct = len(set(w))
        rep = (len(w) - distinct) / max(1, len(w))
        items = len(re.findall(r"(?m)^\s*(?:\d+[.)]|[-*])\s", r))
        digits = len(re.findall(r"\d", r))
        out.append(distinct / 15.0 - 3.0 * rep + 0.3 * min(items, 5) + 0.05 * min(digits, 10) - 0.5 * r.count("!") - 1.5)
    return out


def rating10(prompts: Sequence[Any], responses: Sequence[str], **kwargs: Any) -> list[float]:
    """An integer 1-10, like a judge's rating: points for covering the prompt, a complete last sentence,
    20-60 words, no repeated sentences, some concrete detail (digits, lists, examples)."""
    out = []
    for p, r in zip(prompts, responses):
        cover, n = _coverage(p, r)
        sents = [s.strip().lower() for s in re.split(r"[.!?]+", r) if s.strip()]
        score = 1 + round(4 * cover)
        score += 2 if 20 <= n <= 60 else (1 if 10 <= n <= 80 else 0)
        score += 1 if r.rstrip().endswith((".", "!", "?")) else 0
        score += 1 if len(set(sents)) == len(sents) else 0
        score += 1 if re.search(r"(?m)\d|^\s*[-*]\s|for example|such as", r.lower()) else 0
        out.append(float(min(10, score)))
    return out
