"""An AI judge as a feedback source (RLAIF; Bai et al. 2022, "Constitutional AI"; Lee et al. 2023).

A chat model reads a rubric (or a constitution), a prompt and two responses, and
answers "A" or "B". :class:`AIJudge` turns those answers into the same
:class:`~rlhfkit.data.records.Comparison` record that human and simulated
annotators produce.

LLM judges favour a position (usually the first answer; Zheng et al. 2023,
"Judging LLM-as-a-Judge with MT-Bench", section 3.3). Following their remedy,
every pair is judged twice, with the responses swapped, and a preference is only
recorded when both orders pick the same response; otherwise the label is a tie.
A judge that always says "A" therefore produces only ties, never a fake signal.

RL-CAI's multiple-choice comparisons (Bai et al. 2022, section 4.1) have their own
prompt (:func:`build_choice_messages`) and judge (:class:`ChoiceJudge`), which reads
P(A) from the letters' token probabilities where the backend gives them
(:func:`letter_probability`) and from the reply's letter otherwise; the Constitutional
AI stage asks both orders and combines them (:func:`rlhfkit.cai_label.label_on_principles`).

Clients (anything with ``complete(messages, temperature=..., max_tokens=...) -> str``):

* :class:`HTTPChatClient` - any OpenAI-compatible ``/v1/chat/completions`` server
  (OpenAI, vLLM, llama.cpp, ``rlhfkit serve``), stdlib ``urllib`` only, with
  retries, exponential backoff and a deadline for the whole call;
* :class:`LocalChatClient` - a local transformers model, in process.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

from rlhfkit.data.records import Comparison, Message, Prompt
from rlhfkit.generation.chat import LocalChatModel
from rlhfkit.serve import message_text

Verdict = str | None
"""``"A"``, ``"B"`` or ``None`` (no verdict found)."""

DEFAULT_RUBRIC = """\
1. Helpful: it answers the user's request directly and correctly.
2. Polite: it is courteous and respectful; no insults or rudeness.
3. Positive: its tone is warm and encouraging rather than hostile or dismissive.
4. Concise: it says what is needed without padding or rambling.
5. Harmless: it does not help with anything dangerous, illegal or hurtful."""
"""The default judging rubric; the same taste as the demo's simulated annotator
(:data:`rlhfkit.feedback.scorers.DEMO_RUBRIC`: polite, positive, concise), in words."""

JUDGE_SYSTEM_PROMPT = (
    "You are an impartial judge. You compare two responses from AI assistants to the same "
    "conversation and decide which one better satisfies the rubric you are given. "
    "The order in which the responses are shown and their length must not influence you."
)

ANSWER_INSTRUCTION = "Answer with exactly one letter: A or B."
"""The last line of every judge prompt, and the follow-up when an answer cannot be parsed."""


class ChatClient(Protocol):
    """What :class:`AIJudge` needs: one chat completion as text."""

    def complete(self, messages: list[Message], temperature: float = 0.0, max_tokens: int = 16) -> str: ...


class JudgeRequestError(RuntimeError):
    """A chat-completion request failed (after retries where retrying made sense)."""


# ----------------------------------------------------------------------------- clients


def _chat_completions_url(base_url: str) -> str:
    """``.../v1/chat/completions`` from a base URL.

    Like the OpenAI SDK, ``base_url`` normally ends in the API root
    (``https://api.openai.com/v1``); a bare ``http://host:port`` gets ``/v1``.
    """
    parsed = urllib.parse.urlsplit(base_url.rstrip("/"))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"base_url must be an http(s) URL, got '{base_url}'")
    path = parsed.path or "/v1"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path + "/chat/completions", "", ""))


def _is_loopback(host: str) -> bool:
    """``localhost``, or an address in 127.0.0.0/8 or ``::1``: traffic that never leaves the machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name
        return False


def _error_message(body: bytes) -> str:
    """The server's error text: OpenAI's ``{"error": {"message"}}``, FastAPI's ``{"detail"}``, or the raw body."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in data:
            return str(data["detail"])
    return text[:500]


class HTTPChatClient:
    """An OpenAI-compatible chat-completions client over ``urllib`` (no extra dependencies).

    Args:
        base_url: API root, e.g. ``http://127.0.0.1:8000/v1`` (a bare host:port gets ``/v1``).
        model: the ``model`` field sent with each request.
        api_key: sent as ``Authorization: Bearer``; None sends no key. The environment
            is never read here: a key goes only where the caller sends it (the label
            stage's ``judge_api_key_env``). A key over plain ``http://`` to a host other
            than a loopback address (127.0.0.1, ::1, localhost) is a ValueError: anyone
            on the way could read it.
        timeout: seconds per socket operation of an attempt (connect, send, each read).
        max_retries: retries after the first attempt, on connection errors,
            timeouts, truncated or garbled replies (``http.client.HTTPException``),
            HTTP 429 and 5xx. Other 4xx errors fail at once: repeating a bad request
            cannot help.
        backoff: the wait before retry ``i`` (0-based) is ``backoff * 2**i`` seconds plus
            up to 10% jitter (so concurrent workers do not retry in lockstep), or the
            server's ``Retry-After`` if longer.
        deadline: seconds for the whole call, attempts and waits included (None: room
            for every attempt's ``timeout`` and the longest backoff waits between them,
            ``timeout * (max_retries + 1) + 1.1 * backoff * (2**max_retries - 1)``).
            It is checked before each attempt, wait and read, and each attempt's socket
            timeout is capped to the time left, so a call ends by the deadline plus at
            most one socket wait.

    Thread-safe: each call opens its own connection.
    """

    def __init__(
        self,
        base_url: str,
        model: str = "default",
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        deadline: float | None = None,
    ):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout <= 0 or (deadline is not None and deadline <= 0):
            raise ValueError(f"timeout and deadline must be positive, got {timeout} and {deadline}")
        self.url = _chat_completions_url(base_url)
        parsed = urllib.parse.urlsplit(self.url)
        if api_key and parsed.scheme == "http" and not _is_loopback(parsed.hostname or ""):
            raise ValueError(
                f"refusing to send an API key over plain http:// to {parsed.hostname} (anyone on the way "
                "could read it): use https://, a loopback address (127.0.0.1, ::1, localhost), or no key"
            )
        self.model = model
        self.api_key = api_key
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        if deadline is None:
            deadline = timeout * (max_retries + 1) + 1.1 * backoff * (2**max_retries - 1)
        self.deadline = deadline
        self._jitter = random.Random()

    def complete(self, messages: list[Message], temperature: float = 0.0, max_tokens: int = 16) -> str:
        """The assistant text of one completion; raises :class:`JudgeRequestError` on failure."""
        payload = self._post(
            {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens, "n": 1}
        )
        return self._content(payload)

    def complete_with_logprobs(
        self, messages: list[Message], temperature: float = 0.0, max_tokens: int = 16, top_logprobs: int = 20
    ) -> tuple[str, dict[str, float] | None]:
        """The assistant text of one completion, and the next-token alternatives (``{token: logprob}``, the
        ``top_logprobs`` most likely) at the first token of the reply that is a choice letter (``A``, `` A``,
        ``(B``...; :func:`choice_letter`), or None when the server sent no such token or no ``logprobs`` at all
        (``rlhfkit serve`` sends none). Asks for them as OpenAI's chat API does (``logprobs: true``,
        ``top_logprobs``; vLLM and llama.cpp's server answer too)."""
        payload = self._post(
            {
                "model": self.model,
                "messages": messages,
                "temperature": temperature,
                "max_tokens": max_tokens,
                "n": 1,
                "logprobs": True,
                "top_logprobs": top_logprobs,
            }
        )
        text = self._content(payload)
        try:
            positions = json.loads(payload)["choices"][0]["logprobs"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return text, None
        for position in positions if isinstance(positions, list) else []:
            if not isinstance(position, dict) or choice_letter(str(position.get("token", ""))) is None:
                continue
            alternatives = {
                str(alt["token"]): float(alt["logprob"])
                for alt in position.get("top_logprobs") or []
                if isinstance(alt, dict) and isinstance(alt.get("logprob"), (int, float))
            }
            alternatives.setdefault(str(position["token"]), float(position.get("logprob", 0.0)))
            return text, alternatives
        return text, None

    def _post(self, request_body: dict) -> bytes:
        """POST one chat-completions request (retries, backoff and the deadline as the class says); the reply body."""
        body = json.dumps(request_body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        give_up = time.monotonic() + self.deadline
        last_error, attempts = "", 0
        while attempts <= self.max_retries:
            left = give_up - time.monotonic()
            if left <= 0:
                break
            attempts += 1
            retry_after = 0.0
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=min(self.timeout, left)) as response:
                    return self._read(response, give_up)
            except urllib.error.HTTPError as e:
                message = _error_message(e.read())
                if e.code != 429 and e.code < 500:
                    raise JudgeRequestError(f"POST {self.url} failed with HTTP {e.code}: {message}") from e
                last_error = f"HTTP {e.code}: {message}"
                retry_after = self._retry_after(e.headers.get("Retry-After"))
            # Refused, reset, DNS, timeout (OSError); a truncated body or a garbled status line
            # (http.client.IncompleteRead, BadStatusLine: HTTPExceptions, not OSErrors).
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last_error = f"{type(reason).__name__}: {reason}"
            if attempts <= self.max_retries:
                wait = self.backoff * 2 ** (attempts - 1)
                time.sleep(
                    min(max(wait + self._jitter.uniform(0, 0.1 * wait), retry_after), max(give_up - time.monotonic(), 0.0))
                )
        late = f" and its {self.deadline:g} s deadline" if attempts <= self.max_retries else ""
        raise JudgeRequestError(f"POST {self.url} failed after {attempts} attempts{late}; last error: {last_error}")

    def _read(self, response: http.client.HTTPResponse, give_up: float) -> bytes:
        """The whole body, read as it arrives so that a server trickling it cannot outlast the deadline."""
        chunks = []
        while chunk := response.read1(65536):
            chunks.append(chunk)
            if time.monotonic() >= give_up:
                raise TimeoutError(f"the {self.deadline:g} s deadline passed while reading the reply")
        body = b"".join(chunks)
        declared = response.headers.get("Content-Length", "")
        # read1 reports a connection closed early as the end of the body; read() would raise this.
        if declared.isdigit() and len(body) < int(declared):
            raise http.client.IncompleteRead(body, int(declared) - len(body))
        return body

    def _content(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeRequestError(f"POST {self.url} returned no choices[0].message.content: {payload[:300]!r}") from e
        try:
            return message_text(content)  # null (a refusal) is "", content parts are joined
        except TypeError as e:
            raise JudgeRequestError(f"POST {self.url}: {e}") from e

    @staticmethod
    def _retry_after(value: str | None) -> float:
        """Seconds from a numeric ``Retry-After`` header, capped at 60 s (HTTP dates are ignored)."""
        try:
            return min(max(float(value), 0.0), 60.0) if value else 0.0
        except ValueError:
            return 0.0


class LocalChatClient:
    """The :class:`HTTPChatClient` interface on a local transformers model, in process.

    Decoding is greedy at the judge's default ``temperature=0``. Generation is
    serialised, so :class:`AIJudge` runs it with one worker (``max_concurrency``).
    """

    max_concurrency = 1

    def __init__(self, model_spec: str, precision: str = "bf16"):
        self.model = LocalChatModel(model_spec, precision=precision)

    def complete(self, messages: list[Message], temperature: float = 0.0, max_tokens: int = 16) -> str:
        return self.model.chat(messages, n=1, temperature=temperature, max_tokens=max_tokens).texts[0]

    def letter_logprobs(self, messages: list[Message]) -> dict[str, float]:
        """``{token: log-probability}`` of the choice-letter tokens (``A``, `` A``, ``B``, `` B``: those the
        tokenizer writes as one token) as the model's first reply token after ``messages`` (chat template and
        generation prompt), from one forward pass at temperature 1 (nothing is generated)."""
        import torch

        from rlhfkit.generation.rollout import render_prompt
        from rlhfkit.modeling.models import autocast

        tokenizer, engine = self.model.tokenizer, self.model.generator.engine
        ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
        device = next(engine.model.parameters()).device
        with self.model._lock, torch.no_grad(), autocast(device, engine.precision):
            logits = engine.model(input_ids=ids.to(device)).logits[0, -1].float()
        logps = torch.log_softmax(logits, dim=-1)
        letters = {}
        for variant in ("A", " A", "B", " B"):
            token = tokenizer.encode(variant, add_special_tokens=False)
            if len(token) == 1:
                letters[tokenizer.decode(token)] = float(logps[token[0]])
        return letters


# ----------------------------------------------------------------------------- the judge prompt


def render_transcript(prompt: Prompt) -> str:
    """A prompt as readable text: a string as is, a message list as ``Role: content`` turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in prompt)


def build_judge_messages(prompt: Prompt, response_a: str, response_b: str, rubric: str = DEFAULT_RUBRIC) -> list[Message]:
    """The judge's chat messages: system instructions, then the rubric, conversation and both responses.

    The layout follows MT-Bench's pairwise judge prompt (Zheng et al. 2023). Each
    block is delimited by ``[The Start of ...]`` / ``[The End of ...]`` lines, and
    the prompt ends with :data:`ANSWER_INSTRUCTION`.
    """
    user = (
        f"Rubric:\n{rubric.strip()}\n\n"
        f"[The Start of Conversation]\n{render_transcript(prompt)}\n[The End of Conversation]\n\n"
        f"[The Start of Response A]\n{response_a}\n[The End of Response A]\n\n"
        f"[The Start of Response B]\n{response_b}\n[The End of Response B]\n\n"
        "Which response better satisfies the rubric as the assistant's next reply? "
        f"{ANSWER_INSTRUCTION}"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


CHOICE_PROMPT = """\
Consider the following conversation between a human and an assistant:

{conversation}

{question}
Options:
(A) {response_a}
(B) {response_b}

{instruction} The answer is:"""
"""The multiple-choice comparison of Constitutional AI (Bai et al. 2022, section 4.1): the conversation, a
principle's question, the two responses as options (A) and (B). It is one user turn, ending with
:data:`ANSWER_INSTRUCTION` and the paper's "The answer is:", so the reply's first token is the letter."""


def render_conversation(prompt: Prompt) -> str:
    """A prompt as the paper's ``Human:`` / ``Assistant:`` transcript (a system turn is ``System:``); a string is
    one human turn."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m.get('role', 'user'), 'Human')}: {m.get('content', '')}" for m in turns)


def build_choice_messages(prompt: Prompt, response_a: str, response_b: str, question: str) -> list[Message]:
    """The judge's chat for one multiple-choice comparison (:data:`CHOICE_PROMPT`): a single user turn."""
    text = CHOICE_PROMPT.format(
        conversation=render_conversation(prompt),
        question=question.strip(),
        response_a=response_a,
        response_b=response_b,
        instruction=ANSWER_INSTRUCTION,
    )
    return [{"role": "user", "content": text}]


_LETTER_TOKEN = re.compile(r"[\s(\[*_\"']*([AB])[\s)\].:*_\"']*")


def choice_letter(token: str) -> Verdict:
    """``"A"`` or ``"B"`` when a token is the choice letter alone (``A``, `` B``, ``(A``, ``**B``, ``A)``); else
    None. Capitals only: a lowercase ``a`` is usually the article."""
    match = _LETTER_TOKEN.fullmatch(token)
    return match.group(1) if match else None


def letter_probability(logprobs: dict[str, float]) -> float | None:
    """P(A) / (P(A) + P(B)) from next-token alternatives ``{token: log-probability}``: each letter's probability
    is the sum over the tokens that are that letter (:func:`choice_letter`: ``A`` and `` A`` both count), and the
    two are normalised over themselves, as the paper normalises the probabilities of "(A)" and "(B)". A letter
    missing from the alternatives counts as probability 0 (a server lists only its top tokens); None when both are
    missing."""
    mass = {"A": 0.0, "B": 0.0}
    found = False
    for token, logprob in logprobs.items():
        letter = choice_letter(token)
        if letter is not None and math.isfinite(logprob):
            mass[letter] += math.exp(logprob)
            found = True
    total = mass["A"] + mass["B"]
    if not found or total == 0.0:
        return None
    return mass["A"] / total


# ----------------------------------------------------------------------------- parsing verdicts

_MARKUP = r"""[\s*_`"'(\[]*"""  # emphasis, quotes and brackets around a letter
_WHO = r"(?:response|assistant|option|output|answer|candidate)"
_END = r"(?![A-Za-z0-9])"  # the letter is a whole token

# Explicit verdict patterns (case-insensitive); the letter is group 1 (or group 2, for the bare capital).
_EXPLICIT = [
    # MT-Bench's [[A]].
    re.compile(r"\[\[\s*([ab])\s*\]\]", re.I),
    # A labelled verdict: "Final verdict: A", "Answer: B", "the better response is A", "winner = B".
    re.compile(
        r"\b(?:final\s+)?(?:verdict|answer|choice|decision|winner|preference|judg(?:e)?ment|selection|"
        r"(?:better|best|preferred|stronger)\s+(?:response|answer|one|option|reply))"
        rf"\s*(?:is\s*:?|:|=|-)\s*(?:that\s+)?{_MARKUP}(?:{_WHO}\s*)?{_MARKUP}([ab]){_END}",
        re.I,
    ),
    # "Response A is better", "assistant b is clearly better", "Response B wins", "A is better" (bare: capital only).
    re.compile(
        rf"(?:\b{_WHO}\s*([ab])|(?-i:(?<![A-Za-z0-9])([AB])))\s*{_MARKUP}\s*"
        r"(?:(?:is|was)\s+(?:(?:clearly|much|slightly|somewhat|far|definitely|significantly|marginally|overall|the|a\s+bit)\s+){0,2}"
        r"(?:better|superior|preferred|preferable|stronger|best|winner)|wins)\b",
        re.I,
    ),
    # "I prefer Response A", "choose B", "I'd go with b".
    re.compile(
        rf"\b(?:prefer|choose|chose|pick|picked|select|selected|go\s+with|vote\s+for|favou?r)\s+{_MARKUP}(?:{_WHO}\s*)?{_MARKUP}([ab]){_END}",
        re.I,
    ),
    # An emphasised letter anywhere: **A**, __B__.
    re.compile(r"(?:\*\*|__)\s*([ab])\s*[.)]?\s*(?:\*\*|__)", re.I),
    # A line holding only the letter: "B", "(a)", "Response B.", "> **A**".
    re.compile(rf"^[\s>*_`\"'(\[]*(?:{_WHO}\s*)?([ab])[\s*_`\"')\].!]*$", re.I | re.M),
]

# Both letters named together ("A or B", "Response A and Response B", "A/B"): a mention, not a verdict.
_BOTH = re.compile(rf"(?:{_WHO}\s*)?(?<![A-Za-z0-9])[ab]\s*(?:or|and|nor|vs\.?|versus|/)\s*(?:{_WHO}\s*)?[ab]{_END}", re.I)
# Fallback tokens: a capital A or B standing alone.
_BARE = re.compile(rf"(?<![A-Za-z0-9])([AB]){_END}")
# The article "A" opening a sentence: "A good answer would ..."
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)$")
# A lowercase word after "A" makes it the article, unless that word reads as a verb
# or conjunction with the letter as subject ("A is better", "A would be", "A and B").
_WORD_AFTER = re.compile(
    r"[ \t]+(?!(?:is|was|would|will|should|could|can|might|may|does|did|has|had|seems|wins|says|uses|gives|"
    r"answers|follows|offers|provides|and|or|but|vs)\b)[a-z]"
)


def _lowercase_article(text: str, pos: int) -> bool:
    """A lowercase ``a`` followed by a word is the article ("answer: a tie"), in every rule."""
    return text[pos] == "a" and bool(_WORD_AFTER.match(text, pos + 1))


def _sentence_article(text: str, pos: int) -> bool:
    """A capital ``A`` opening a sentence and followed by a lowercase word ("A good answer would ...")."""
    return text[pos] == "A" and bool(_WORD_AFTER.match(text, pos + 1)) and bool(_SENTENCE_START.search(text[:pos]))


def parse_verdict(text: str) -> Verdict:
    """The judge's verdict, ``"A"`` or ``"B"``, or ``None`` if there is none.

    Rules, in order:

    1. **Explicit verdicts** count wherever they are, case-insensitively:
       ``[[A]]``; a labelled verdict (``Final verdict: A``, ``Answer: b``,
       ``The better response is B``); ``Response A is better`` / ``B wins``;
       ``I prefer/choose/pick B``; an emphasised letter (``**B**``); a line
       holding only the letter (``A``, ``(b)``, ``Response B.``). If several
       are found, the **last** one wins (judges that reason first conclude last).
    2. Otherwise, **bare capital letters** ``A``/``B`` standing alone: if only one
       of the two letters occurs, it is the verdict; if both occur, ``None``.
    3. Never a verdict: both letters named together (``A or B``, ``Response A and
       Response B``); a lowercase ``a`` followed by a word (``answer: a tie``), in
       any rule; in rule 2, a capital ``A`` opening a sentence and followed by a
       lowercase word (``A good answer would ...``). A following verb or
       conjunction (``A is``, ``A would``, ``a and``) keeps the letter a letter.
       Negations are not understood (``A is not better`` is no explicit verdict),
       so judges should be asked for a plain letter, as :func:`build_judge_messages` does.
    """
    both = [m.span() for m in _BOTH.finditer(text)]

    def mentioned_together(pos: int) -> bool:
        return any(start <= pos < end for start, end in both)

    explicit: list[tuple[int, str]] = []
    for pattern in _EXPLICIT:
        for match in pattern.finditer(text):
            group = 1 if match.group(1) else 2
            pos = match.start(group)
            if mentioned_together(pos) or _lowercase_article(text, pos):
                continue
            explicit.append((pos, text[pos].upper()))
    if explicit:
        return max(explicit)[1]
    letters = {
        m.group(1) for m in _BARE.finditer(text) if not mentioned_together(m.start(1)) and not _sentence_article(text, m.start(1))
    }
    return letters.pop() if len(letters) == 1 else None


# ----------------------------------------------------------------------------- the judge


class AIJudge:
    """Labels pairs of responses with a chat model, judging each pair in both orders.

    Args:
        client: anything with ``complete(messages, temperature=, max_tokens=) -> str``
            (:class:`HTTPChatClient`, :class:`LocalChatClient`, your own).
        rubric: what "better" means, e.g. :data:`DEFAULT_RUBRIC` or a constitution.
        concurrency: judge requests in flight at once (a thread pool). Clients
            with a ``max_concurrency`` attribute cap it (:class:`LocalChatClient`: 1).
        name: recorded as ``source=f"judge:{name}"``.
        max_tokens: completion budget per judgement; raise it for judges that reason first.
        temperature: sampling temperature of the judge (0 = deterministic).
        repair_attempts: when an answer has no parseable verdict, ask again this
            many times, appending the answer and :data:`ANSWER_INSTRUCTION` as a follow-up turn.

    Request failures (after the client's own retries) raise; only unparseable
    answers and disagreement between the two orders become ties.
    """

    def __init__(
        self,
        client: ChatClient,
        rubric: str = DEFAULT_RUBRIC,
        concurrency: int = 4,
        name: str = "judge",
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        repair_attempts: int = 1,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.client, self.rubric, self.name = client, rubric, name
        self.concurrency = min(concurrency, getattr(client, "max_concurrency", concurrency))
        self.max_tokens, self.temperature, self.repair_attempts = max_tokens, temperature, repair_attempts

    def label(self, prompt: Prompt, responses: Sequence[str]) -> Comparison:
        """One :class:`Comparison` of a pair of responses to ``prompt`` (string or chat messages)."""
        return self.label_many([(prompt, responses)])[0]

    def label_many(self, items: Iterable[tuple[Prompt, Sequence[str]]]) -> list[Comparison]:
        """Label ``(prompt, [response_0, response_1])`` items; 2 judge calls per item, run concurrently."""
        pairs = [(prompt, list(responses)) for prompt, responses in items]
        for _, responses in pairs:
            if len(responses) != 2:
                raise ValueError(f"AIJudge compares pairs only (K=2), got {len(responses)} responses")
        # Order 0 shows (response 0, response 1) as (A, B); order 1 swaps them.
        jobs = [(prompt, r[order], r[1 - order]) for prompt, r in pairs for order in (0, 1)]
        if self.concurrency == 1 or len(jobs) <= 1:
            answers = [self._judge_once(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
                answers = list(pool.map(lambda job: self._judge_once(*job), jobs))
        return [self._combine(prompt, r, answers[2 * i], answers[2 * i + 1]) for i, (prompt, r) in enumerate(pairs)]

    def _judge_once(self, prompt: Prompt, response_a: str, response_b: str) -> tuple[str, Verdict, int]:
        """``(raw answer, parsed verdict, attempts)`` for one ordering."""
        messages = build_judge_messages(prompt, response_a, response_b, self.rubric)
        for attempt in range(self.repair_attempts + 1):  # noqa: B007 (the count of tries is returned)
            raw = self.client.complete(messages, temperature=self.temperature, max_tokens=self.max_tokens)
            verdict = parse_verdict(raw)
            if verdict is not None:
                break
            messages = messages + [{"role": "assistant", "content": raw}, {"role": "user", "content": ANSWER_INSTRUCTION}]
        return raw, verdict, attempt + 1

    def _combine(self, prompt: Prompt, responses: list[str], first: tuple, second: tuple) -> Comparison:
        """A preference if both orders pick the same response, else a tie."""
        (raw_first, verdict_first, tries_first), (raw_second, verdict_second, tries_second) = first, second
        # Map each verdict letter back to a response index: order 0 has A=0, order 1 has A=1.
        winner_first = None if verdict_first is None else "AB".index(verdict_first)
        winner_second = None if verdict_second is None else 1 - "AB".index(verdict_second)
        if winner_first is not None and winner_first == winner_second:
            ranking, tie, outcome = [winner_first, 1 - winner_first], False, f"both orders prefer response {winner_first}"
        elif winner_first is None or winner_second is None:
            ranking, tie, outcome = [0, 1], True, "tie: unparseable verdict"
        else:
            ranking, tie, outcome = [0, 1], True, "tie: the orders disagree (position bias)"
        reason = f"A=0,B=1: {_short(raw_first)!r}; A=1,B=0: {_short(raw_second)!r}; {outcome}"
        return Comparison(
            prompt=prompt,
            responses=responses,
            ranking=ranking,
            tie=tie,
            reason=reason,
            source=f"judge:{self.name}",
            meta={
                "verdicts": [raw_first, raw_second],
                "parsed": [verdict_first, verdict_second],
                "attempts": [tries_first, tries_second],
            },
        )


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- multiple-choice judgements (RL-CAI)

ChoiceMethod = Literal["auto", "logprobs", "verdict"]
CHOICE_METHODS = ("auto", "logprobs", "verdict")
"""How :class:`ChoiceJudge` reads a judgement: ``logprobs`` (the letters' token probabilities; an error where the
backend gives none), ``verdict`` (the letter in the reply's text), or ``auto`` (probabilities where the backend
gives them for a call, else the text)."""


@dataclass
class Choice:
    """One multiple-choice judgement of a pair shown as (A, B)."""

    text: str
    """The judge's reply (with ``logprobs`` from a local model nothing is generated: empty)."""
    letter: Verdict
    """The letter chosen: parsed from ``text``, or the more probable one (None: unparseable, or a dead heat)."""
    p_a: float
    """P(A is preferred): the normalised letter probability, or 1, 0, or 0.5 (no verdict) from ``letter``."""
    method: Literal["logprobs", "verdict"]
    """Where ``p_a`` came from."""


class ChoiceJudge:
    """Answers multiple-choice comparisons (:func:`build_choice_messages`) with a chat client, reading each
    answer's probability of "A" from the letters' token probabilities where the client exposes them (a local
    model's next-token logits, :meth:`LocalChatClient.letter_logprobs`; an OpenAI-compatible server's
    ``logprobs``, :meth:`HTTPChatClient.complete_with_logprobs`), else from the letter in its reply.

    Args:
        client: a :class:`ChatClient`; with ``letter_logprobs`` or ``complete_with_logprobs`` it can give
            probabilities.
        method: see :data:`CHOICE_METHODS`.
        concurrency: judgements in flight at once (capped by the client's ``max_concurrency``).
        max_tokens, temperature: of each completion.
        repair_attempts: a reply without a letter is asked again this many times, with :data:`ANSWER_INSTRUCTION`
            as a follow-up turn.
    """

    def __init__(
        self,
        client: ChatClient,
        *,
        method: ChoiceMethod = "auto",
        concurrency: int = 4,
        max_tokens: int = 16,
        temperature: float = 0.0,
        repair_attempts: int = 1,
    ):
        if method not in CHOICE_METHODS:
            raise ValueError(f"method must be one of {', '.join(CHOICE_METHODS)}, got {method!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.local_logprobs = hasattr(client, "letter_logprobs")
        self.server_logprobs = hasattr(client, "complete_with_logprobs")
        if method == "logprobs" and not (self.local_logprobs or self.server_logprobs):
            raise ValueError(f"method 'logprobs': {type(client).__name__} gives no token probabilities")
        self.client, self.method = client, method
        self.concurrency = min(concurrency, getattr(client, "max_concurrency", concurrency))
        self.max_tokens, self.temperature, self.repair_attempts = max_tokens, temperature, repair_attempts

    def judge(self, chats: Sequence[list[Message]]) -> list[Choice]:
        """One :class:`Choice` per chat, in order."""
        if self.concurrency == 1 or len(chats) <= 1:
            return [self._one(chat) for chat in chats]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chats))) as pool:
            return list(pool.map(self._one, chats))

    def _one(self, chat: list[Message]) -> Choice:
        if self.method != "verdict" and self.local_logprobs:
            p_a = letter_probability(self.client.letter_logprobs(chat))  # type: ignore[attr-defined]
            if p_a is not None:
                return Choice("", "A" if p_a > 0.5 else "B" if p_a < 0.5 else None, p_a, "logprobs")
            text = None
        elif self.method != "verdict" and self.server_logprobs:
            text, alternatives = self.client.complete_with_logprobs(  # type: ignore[attr-defined]
                chat, temperature=self.temperature, max_tokens=self.max_tokens
            )
            p_a = letter_probability(alternatives) if alternatives else None
            if p_a is not None:
                return Choice(text, parse_verdict(text), p_a, "logprobs")
        else:
            text = None
        if self.method == "logprobs":
            raise JudgeRequestError("the judge gave no token probabilities for the letters A and B (method 'logprobs')")
        return self._verdict(chat, text)

    def _verdict(self, chat: list[Message], text: str | None) -> Choice:
        """The letter in the reply (``text``, or asked for now), asked again ``repair_attempts`` times if none."""
        messages = list(chat)
        for attempt in range(self.repair_attempts + 1):
            if text is None or attempt > 0:
                text = self.client.complete(messages, temperature=self.temperature, max_tokens=self.max_tokens)
            letter = parse_verdict(text)
            if letter is not None:
                return Choice(text, letter, 1.0 if letter == "A" else 0.0, "verdict")
            messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": ANSWER_INSTRUCTION}]
        return Choice(text or "", None, 0.5, "verdict")
