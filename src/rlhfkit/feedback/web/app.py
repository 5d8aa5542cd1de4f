"""The annotation web app (FastAPI) and ``rlhfkit annotate serve``.

Routes:

* ``GET /`` - the annotator page (``static/annotate.html``); ``GET /static/common.js`` (what both
  pages share: token, API call, status line), ``/static/annotate.js``, ``/static/annotate.css`` and
  ``/static/lead.js``. Only these files exist: names are looked up in a fixed table, never joined to
  a filesystem path, so there is nothing to traverse.
* ``POST /api/next`` - the caller's current pair (leased to them) and progress.
* ``POST /api/label`` ``{"pair_id", "choice": "a"|"b"|"tie"|"skip", "reason", "grade", "both_bad"}`` -
  store a label (``a`` = the response shown on the left) and get the next pair.
  ``grade`` (optional, with ``a`` / ``b`` only): ``much_better | better | slightly_better``
  (:mod:`rlhfkit.feedback.grades`); ``both_bad`` (optional, default false): both
  responses are bad. A client that sends only the choice stores an ungraded vote.
  Answered only after the label's transaction is committed.
* ``POST /api/undo`` - delete the caller's last label and get that pair back
  (``undone``: its choice as shown, reason, grade and both_bad, to show again).
* ``POST /api/task`` - the task's guidelines (markdown text, ``""`` if none) and
  criteria (a list of short strings), as given to ``serve``, and the ``mode``.
* Thumbs mode (``serve --mode thumbs``): the same routes; an assignment is
  ``{"pair_id", "prompt", "response"}`` and ``choice`` is ``up | down | skip``.
  Every reply says ``mode``; a paused annotator's ``/api/next`` has no assignment
  and ``paused: true`` with a message.
* ``GET /healthz`` - ``{"ok": true}`` when the database answers (503 otherwise);
  no token, and nothing about the pairs or the annotators.
* ``GET /lead`` - the lead's page (``static/lead.html`` + ``lead.js``, the same
  safe renderer as the annotator page); its calls, ``POST /api/lead/overview``,
  ``/api/lead/settle`` ``{"item_index", "choice", "reason"}``, ``/api/lead/ask-more`` ``{"item_index"}``
  (one more vote on a pair: :meth:`~rlhfkit.feedback.web.store.AnnotationStore.ask_one_more`),
  ``/api/lead/annotator`` ``{"name", "action": "pause"|"resume"|"revoke"}`` and
  ``/api/lead/add-annotator`` ``{"name"}``, need the lead token
  (``rlhfkit annotate lead-token``; stored hashed, like the annotators' tokens).

Check questions (``serve --checks FILE --check-rate R``) reach annotators through ``/api/next`` like any
other pair (same fields, sides drawn as usual); only the lead's overview tells them apart, by their effect
on each annotator's check accuracy. The ``pair_id`` an annotator sees and sends back is opaque
(:meth:`~rlhfkit.feedback.web.store.AnnotationStore.public_id`: 20 hex digits, different per annotator, no
order), since row ids would give the checks away (they are added after the pairs); ``progress.remaining``
counts the checks still due to the annotator, so it drops by one after a check as after a pair.

Security:

* every ``/api`` call needs ``Authorization: Bearer TOKEN`` (401 without a known
  token); a token acts only on its own annotator's leases and labels (403/409);
* writes from another origin are refused (403): a browser's ``Sec-Fetch-Site``
  must be ``same-origin`` (or ``none``) and an ``Origin`` header must equal this
  server's own origin. Clients that send neither (curl, scripts) are not browsers
  and need the token anyway;
* request bodies over ``max_body_bytes`` (64 KiB) are refused (413) before they
  reach the app, whether or not they declare a Content-Length;
* the page is served with a Content-Security-Policy allowing only its own
  script and style, and its script never parses text as HTML: model text and the
  guidelines are rendered as markdown (headings, lists, emphasis, code, tables)
  by a small renderer that builds elements from a fixed list of tags and puts
  every piece of text in with ``textContent`` / text nodes, so markup in the text
  is shown as text (blocks have ``dir="auto"``, so right-to-left text reads right to left);
  ``Referrer-Policy: no-referrer`` keeps the token (in the page URL) from leaking.

The server binds to 127.0.0.1 by default. ``X-Forwarded-Proto`` / ``X-Forwarded-For``
are believed only from the addresses in ``ServeConfig.trusted_proxies`` (none by
default), so behind a TLS-terminating reverse proxy the page sees ``https`` and the
origin check works, and nobody else can claim to be a proxy. SIGTERM stops it as Ctrl+C does
(requests in flight answered, the database closed with its WAL checkpointed);
``rlhfkit annotate serve`` then exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from rlhfkit.feedback.web.admin import lead_overview
from rlhfkit.feedback.web.pairs import read_checks, read_pairs, read_thumb_items
from rlhfkit.feedback.web.store import MODE_THUMBS, MODES, PAUSED, AnnotationStore, Annotator, Assignment, StoreError, to_shown
from rlhfkit.serve import BodyLimit, bind_socket, drain_body, reject, url_host

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 2000
MAX_GUIDELINES_BYTES = 1024 * 1024

# name -> (file in static/, content type). The only files the app serves.
STATIC_FILES = {
    "common.js": ("common.js", "text/javascript; charset=utf-8"),
    "annotate.js": ("annotate.js", "text/javascript; charset=utf-8"),
    "annotate.css": ("annotate.css", "text/css; charset=utf-8"),
    "lead.js": ("lead.js", "text/javascript; charset=utf-8"),
}
PAGE = ("annotate.html", "text/html; charset=utf-8")
LEAD_PAGE = ("lead.html", "text/html; charset=utf-8")
PAUSED_MESSAGE = "You are paused by the lead: no pairs for now. Your labels so far are kept."

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
COMMON_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class LabelRequest(BaseModel):
    """Body of ``POST /api/label`` (module level: FastAPI resolves annotations in module globals)."""

    pair_id: str = Field(max_length=64)
    """The opaque id the assignment came with (not the database's row id)."""
    choice: Literal["a", "b", "tie", "skip", "up", "down"]
    """As shown: ``a`` is the response on the left; ``up`` / ``down`` in thumbs mode (the store checks the mode)."""
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    grade: Literal["much_better", "better", "slightly_better"] | None = None
    """How much better the chosen side is (``a`` / ``b`` only); None: an ungraded vote (older clients)."""
    both_bad: bool = False
    """Both responses are bad (with a vote, not a skip)."""


class SettleRequest(BaseModel):
    """Body of ``POST /api/lead/settle``: the lead's final label, canonical (``a`` = ``responses[0]``)."""

    item_index: int
    choice: Literal["a", "b", "tie", "up", "down"]
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class AskMoreRequest(BaseModel):
    """Body of ``POST /api/lead/ask-more``: the pair that should get one more vote."""

    item_index: int


class AnnotatorAction(BaseModel):
    """Body of ``POST /api/lead/annotator``."""

    name: str = Field(max_length=64)
    action: Literal["pause", "resume", "revoke"]


class NewAnnotator(BaseModel):
    """Body of ``POST /api/lead/add-annotator``."""

    name: str = Field(max_length=64)


ACTION_STATES = {"pause": "paused", "resume": "active", "revoke": "revoked"}


# ----------------------------------------------------------------------------- request guard


def cross_origin_problem(headers: dict[str, str], scheme: str) -> str | None:
    """Why a state-changing request looks cross-origin, or None if it does not."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-origin write refused (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    if origin is not None and origin != f"{scheme}://{headers.get('host', '')}":
        return f"cross-origin write refused (Origin: {origin})"
    return None


class RequestGuard:
    """ASGI middleware: cross-origin writes (403), body size (413, :class:`rlhfkit.serve.BodyLimit`),
    security headers on every response."""

    def __init__(self, app: Any, *, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self._limited = BodyLimit(app, max_body_bytes=max_body_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in COMMON_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send_with_headers)
            return
        problem = cross_origin_problem(headers, scope.get("scheme", "http"))
        if problem:
            # Read the (bounded) body first: closing with it unread resets the connection before the 403 arrives.
            await drain_body(receive, 4 * self._limited.max_body_bytes)
            await reject(send_with_headers, 403, {"detail": problem})
            return
        await self._limited(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------- the app


def _static(name: str) -> bytes:
    return resources.files("rlhfkit.feedback.web").joinpath("static", name).read_bytes()


def _assignment_json(assignment: Assignment, mode: str, opaque_id: str) -> dict:
    if mode == MODE_THUMBS:
        return {"pair_id": opaque_id, "prompt": assignment.prompt, "response": assignment.left}
    # The A/B order stays server-side: the page sends what it showed, the store maps it back.
    return {"pair_id": opaque_id, "prompt": assignment.prompt, "a": assignment.left, "b": assignment.right}


def create_app(
    store: AnnotationStore, *, max_body_bytes: int = MAX_BODY_BYTES, guidelines: str = "", criteria: Sequence[str] = ()
):
    """The FastAPI app over ``store`` (wrapped in :class:`RequestGuard`).

    ``guidelines`` (markdown) and ``criteria`` (short strings, e.g. helpful /
    harmless / honest) are shown to every annotator above the pair.
    """
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="rlhfkit annotate", docs_url=None, redoc_url=None, openapi_url=None)
    files = {name: (_static(file), kind) for name, (file, kind) in STATIC_FILES.items()}
    page = _static(PAGE[0])
    lead_page = _static(LEAD_PAGE[0])
    task = {"guidelines": guidelines, "criteria": [c.strip() for c in criteria if c.strip()]}
    mode = store.mode  # fixed while serving: the mode changes only on an empty database

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    def annotator(authorization: str | None = Header(default=None)) -> Annotator:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing token: send Authorization: Bearer TOKEN", headers={"WWW-Authenticate": "Bearer"})
        found = store.annotator_for_token(token.strip())
        if found is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def lead(authorization: str | None = Header(default=None)) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or not store.is_lead_token(token.strip()):
            raise HTTPException(401, "lead token needed: create one with `rlhfkit annotate lead-token --db DB`")

    def reply(who: Annotator, assignment: Assignment | None, **extra: Any) -> dict:
        paused = assignment is None and store.annotator_states().get(who.name) == PAUSED
        return {
            "annotator": who.name,
            "mode": mode,
            "assignment": assignment and _assignment_json(assignment, mode, store.public_id(who.id, assignment.pair_id)),
            "progress": asdict(store.progress(who.id)),
            "paused": paused,
            **({"message": PAUSED_MESSAGE} if paused else {}),
            **extra,
        }

    @app.get("/")
    def annotate_page() -> Response:
        return Response(page, media_type=PAGE[1], headers={"content-security-policy": PAGE_CSP})

    @app.get("/lead")
    def lead_page_route() -> Response:
        return Response(lead_page, media_type=LEAD_PAGE[1], headers={"content-security-policy": PAGE_CSP})

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        ok = store.healthy()
        return JSONResponse(status_code=200 if ok else 503, content={"ok": ok})

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, "not found")
        content, kind = files[name]
        return Response(content, media_type=kind)

    # Plain `def` endpoints run in the thread pool; the store serialises writes itself.
    @app.post("/api/next")
    def next_pair(who: Annotator = Depends(annotator)) -> dict:
        return reply(who, store.next_assignment(who.id))

    @app.post("/api/label")
    def label(request: LabelRequest, who: Annotator = Depends(annotator)) -> dict:
        pair_id = store.pair_for_public_id(who.id, request.pair_id)
        if pair_id is None:
            raise StoreError(403, "this pair is not assigned to you; reload the page to get your next pair")
        label_id, duplicate, assignment = store.submit(
            who.id, pair_id, request.choice, request.reason.strip(), grade=request.grade, both_bad=request.both_bad
        )
        return reply(who, assignment, label_id=label_id, duplicate=duplicate)

    @app.post("/api/undo")
    def undo(who: Annotator = Depends(annotator)) -> dict:
        undone, assignment = store.undo(who.id)
        shown = to_shown(undone.choice, flipped=undone.flipped)
        return reply(
            who,
            assignment,
            undone={
                "pair_id": store.public_id(who.id, undone.pair_id),
                "choice": shown,
                "reason": undone.reason,
                "grade": undone.grade,
                "both_bad": undone.both_bad,
            },
        )

    @app.post("/api/task")
    def task_brief(who: Annotator = Depends(annotator)) -> dict:
        return {**task, "mode": mode}

    @app.post("/api/lead/overview", dependencies=[Depends(lead)])
    def overview() -> dict:
        return lead_overview(store)

    @app.post("/api/lead/settle", dependencies=[Depends(lead)])
    def settle(request: SettleRequest) -> dict:
        decision = store.settle(request.item_index, request.choice, request.reason.strip())
        return {"settled": asdict(decision), "overview": lead_overview(store)}

    @app.post("/api/lead/ask-more", dependencies=[Depends(lead)])
    def ask_more(request: AskMoreRequest) -> dict:
        wanted = store.ask_one_more(request.item_index)
        return {"item_index": request.item_index, "votes_wanted": wanted, "overview": lead_overview(store)}

    @app.post("/api/lead/annotator", dependencies=[Depends(lead)])
    def annotator_action(request: AnnotatorAction) -> dict:
        try:
            store.set_annotator_state(request.name, ACTION_STATES[request.action])
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return {"overview": lead_overview(store)}

    @app.post("/api/lead/add-annotator", dependencies=[Depends(lead)])
    def add_annotator(request: NewAnnotator) -> dict:
        try:
            token = store.add_annotator(request.name)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return {"name": request.name, "token": token, "overview": lead_overview(store)}

    return RequestGuard(app, max_body_bytes=max_body_bytes)


# ----------------------------------------------------------------------------- serving


@dataclass
class ServeConfig:
    """``rlhfkit annotate serve --db DB [--pairs PAIRS.jsonl] [--guidelines FILE.md] [--criterion TEXT ...]
    [--host --port --overlap --lease-seconds]``."""

    db: str
    """The annotation database (SQLite; created if missing). The single source of truth."""
    pairs: str = ""
    """Pairs to add first: `rlhfkit sample` output or seed pairs (JSON/JSONL). Empty: serve what the db holds."""
    host: str = "127.0.0.1"
    """Interface to bind; the default serves this machine only."""
    port: int = 8765
    """Port (0 picks a free one; the address is printed to stderr)."""
    overlap: int | None = None
    """Votes wanted per pair, from different annotators (k). None: keep the db's value (1 for a new db)."""
    lease_seconds: float | None = None
    """How long a shown pair stays reserved for its annotator. None: keep the db's value (600 for a new db)."""
    guidelines: str | None = None
    """A markdown file with the labelling guidelines, shown (collapsible) above every pair. Read once at start;
    a missing or unreadable file is an error naming it. None: no guidelines."""
    criteria: list[str] = field(default_factory=list)
    """What to judge by, shown as a short list above the pair (e.g. ``["helpful", "harmless", "honest"]``)."""
    mode: str | None = None
    """``pairs`` (compare two responses) or ``thumbs`` (thumbs up / down on each response of `pairs`, any number
    per record; export writes KTO records). None: keep the db's mode (``pairs`` for a new db). One mode per db."""
    trusted_proxies: str = ""
    """Comma-separated addresses of reverse proxies whose ``X-Forwarded-Proto`` / ``X-Forwarded-For`` are believed
    (e.g. ``127.0.0.1`` for nginx or Caddy on this machine). Empty: no proxy headers are believed."""
    checks: str = ""
    """Check questions to add (:func:`rlhfkit.feedback.web.pairs.read_checks`: pairs with ``"expected": "a" | "b"``),
    mixed into every annotator's queue and scored on the lead's page, never exported. Pairs mode only."""
    check_rate: float | None = None
    """Share of each annotator's assignments that are check questions (0 to 1), while the checks last
    (:func:`~rlhfkit.feedback.web.store.checks_due`). None: keep the db's value (0.1 for a new db)."""


def read_guidelines(path: str | Path) -> str:
    """The guidelines file's text; a ValueError naming the file when it is missing, unreadable, not UTF-8 or over 1 MiB."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"guidelines file {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"guidelines file {path}: is a directory, not a markdown file") from None
    except OSError as e:
        raise ValueError(f"guidelines file {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_GUIDELINES_BYTES:
        raise ValueError(f"guidelines file {path}: {len(data)} bytes; guidelines over 1 MiB are not shown in a page")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"guidelines file {path}: not UTF-8 text (byte {e.start})") from None


def prepare(config: ServeConfig) -> AnnotationStore:
    """Open the database, store the settings and load the pairs; prints a summary to stderr."""
    if config.mode is not None and config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    checks = read_checks(config.checks) if config.checks else []  # before the db: a bad file changes nothing
    store = AnnotationStore(config.db)
    try:
        store.configure(
            overlap=config.overlap, lease_seconds=config.lease_seconds, mode=config.mode, check_rate=config.check_rate
        )
        if store.mode == MODE_THUMBS:
            thumbs, empty = read_thumb_items(config.pairs) if config.pairs else ([], 0)
            added = store.add_thumbs(thumbs)
        else:
            items, empty = read_pairs(config.pairs) if config.pairs else ([], 0)
            added = store.add_pairs(items)
        if config.checks:
            new_checks = store.add_checks(checks)
    except BaseException:
        store.close()
        raise
    total, complete = store.vote_counts()
    note = f" ({empty} left out: empty response)" if empty else ""
    print(
        f"rlhfkit annotate: {config.db}: {total} {'responses to rate' if store.mode == MODE_THUMBS else 'pairs'} "
        f"({added} new{note}), {complete} complete, "
        f"{store.overlap} vote(s) each, annotators: {', '.join(store.annotators()) or 'none yet'}",
        file=sys.stderr,
        flush=True,
    )
    if config.checks:
        print(
            f"rlhfkit annotate: {len(store.checks())} check question(s) from {config.checks} ({new_checks} new), "
            f"{store.check_rate:.0%} of new assignments while an annotator has some left; not exported",
            file=sys.stderr,
            flush=True,
        )
    return store


def web_server(app: Any, *, trusted_proxies: str = "", log_level: str = "warning"):
    """A uvicorn server for ``app`` that believes proxy headers only from ``trusted_proxies`` (comma-separated).

    uvicorn by default believes ``X-Forwarded-*`` from 127.0.0.1, so anything on this machine could claim
    another scheme or client address; here nothing is believed unless configured.
    """
    import uvicorn

    proxies = [p.strip() for p in trusted_proxies.split(",") if p.strip()]
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
    )
    return uvicorn.Server(config)


class Terminated(Exception):
    """Raised in the main thread by SIGTERM while :func:`serve` runs, once the server has shut down."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def serve(config: ServeConfig) -> None:
    """Serve the annotation app until interrupted (``rlhfkit annotate serve``).

    Prints ``rlhfkit annotate: listening on http://HOST:PORT/`` to stderr once
    the socket is bound; annotators open ``http://HOST:PORT/#token=TOKEN``.

    SIGTERM (``kill``, systemd, Docker) shuts down as Ctrl+C does: requests in
    flight are answered (for up to 2 s), then the database is closed with its WAL
    checkpointed into the ``.sqlite`` file, and the function returns normally
    (``rlhfkit annotate serve`` exits 0; after Ctrl+C it exits 130).
    """
    guidelines = read_guidelines(config.guidelines) if config.guidelines else ""  # before the db: fail early
    store = prepare(config)
    if config.guidelines or config.criteria:
        print(
            f"rlhfkit annotate: guidelines: {config.guidelines or 'none'}; criteria: {', '.join(config.criteria) or 'none'}",
            file=sys.stderr,
            flush=True,
        )
    # uvicorn catches SIGTERM and SIGINT while it runs, shuts down gracefully, then
    # restores the handlers it found and raises the signal again. SIGINT's default
    # handler raises KeyboardInterrupt (the `finally` below runs); SIGTERM's default
    # kills the process on the spot, which would skip `store.close()`. So SIGTERM
    # gets a handler that raises Terminated instead (main thread only: signal handlers
    # cannot be set elsewhere, and a server in a thread is stopped by its owner).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        sock = bind_socket(config.host, config.port)
        url = f"http://{url_host(config.host)}:{sock.getsockname()[1]}/"
        print(
            f"rlhfkit annotate: listening on {url} ; annotators open {url}#token=TOKEN "
            f"(tokens from `rlhfkit annotate add-annotator NAME --db {config.db}`)",
            file=sys.stderr,
            flush=True,
        )
        app = create_app(store, guidelines=guidelines, criteria=config.criteria)
        web_server(app, trusted_proxies=config.trusted_proxies).run(sockets=[sock])
    except Terminated:
        print("rlhfkit annotate: stopped by SIGTERM", file=sys.stderr, flush=True)
    finally:
        try:
            store.close()
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
