"""``rlhfkit annotate``: label pairs by hand, in the browser or at the terminal.

    rlhfkit annotate serve --pairs PAIRS.jsonl [--db DB] [--mode pairs|thumbs] [--guidelines FILE.md] [--criterion TEXT ...]
                           [--host H --port P --overlap K --lease-seconds S --trusted-proxies IPS]
                           [--checks CHECKS.jsonl --check-rate R]
    rlhfkit annotate add-annotator NAME [--db DB] [--new-token]   (prints the token)
    rlhfkit annotate annotator NAME pause|resume|revoke [--db DB]
    rlhfkit annotate lead-token [--db DB]                          (prints a new lead token for /lead)
    rlhfkit annotate status [--db DB]
    rlhfkit annotate export [--db DB] --format jsonl|trl|seed OUTPUT.jsonl|.json|.parquet [--min-votes N] [--drop-both-bad]
                                                                   (a thumbs db writes KTO records)
    rlhfkit annotate terminal SAMPLES OUTPUT [--annotator NAME] [--mode pairs|thumbs]
    rlhfkit annotate SAMPLES OUTPUT [--annotator NAME]                      (the same, older spelling)

DB defaults to ``runs/annotations.sqlite``, the label stage's ``web_db``.
Each subcommand wraps one Python function; see :mod:`rlhfkit.feedback.web`.
"""

from __future__ import annotations

import argparse
import sys

from rlhfkit.feedback.web.store import MODE_PAIRS, MODE_THUMBS, MODES

DEFAULT_DB = "runs/annotations.sqlite"  # the label stage's `web_db` default
COMMANDS = ("serve", "add-annotator", "annotator", "lead-token", "status", "export", "terminal")


def build_parser(prog: str = "rlhfkit annotate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Label response pairs by hand: a web app for a team, or the terminal."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the annotation web app (FastAPI + SQLite)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"annotation database (SQLite; created if missing; default {DEFAULT_DB})")
    p.add_argument(
        "--pairs",
        default="",
        help="pairs to add: `rlhfkit sample` output or seed pairs (JSON/JSONL); with --mode thumbs every response is an item",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="pairs: compare two responses; thumbs: thumbs up/down on one response, exported for KTO (default: the db's)",
    )
    p.add_argument(
        "--trusted-proxies",
        default="",
        metavar="IPS",
        help="comma-separated reverse-proxy addresses whose X-Forwarded-Proto/-For are believed (default: none)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; the address is printed)")
    p.add_argument(
        "--overlap", type=int, default=None, help="votes per pair from different annotators (default: the db's, 1 for a new db)"
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=None,
        help="how long a shown pair stays reserved (default: the db's, 600 for a new db)",
    )
    p.add_argument(
        "--checks",
        default="",
        metavar="FILE",
        help='check questions: pairs (same formats as --pairs) with "expected": "a" or "b"; mixed in, scored, not exported',
    )
    p.add_argument(
        "--check-rate",
        type=float,
        default=None,
        metavar="R",
        help="share of each annotator's assignments that are check questions, 0-1 (default: the db's, 0.1 for a new db)",
    )
    p.add_argument(
        "--guidelines", default=None, metavar="FILE", help="markdown file of labelling guidelines, shown above every pair"
    )
    p.add_argument(
        "--criterion",
        dest="criteria",
        action="append",
        default=[],
        metavar="TEXT",
        help="something to judge by, shown above the pair; repeat it (--criterion helpful --criterion harmless)",
    )

    p = sub.add_parser("add-annotator", help="register an annotator and print their token")
    p.add_argument("name")
    p.add_argument("--db", default=DEFAULT_DB, help=f"annotation database (default {DEFAULT_DB})")
    p.add_argument("--new-token", action="store_true", help="give an existing annotator a new token (the old one stops working)")

    p = sub.add_parser("annotator", help="pause, resume or revoke an annotator (as the lead's page does)")
    p.add_argument("name")
    p.add_argument("action", choices=["pause", "resume", "revoke"])
    p.add_argument("--db", default=DEFAULT_DB, help=f"annotation database (default {DEFAULT_DB})")

    p = sub.add_parser("lead-token", help="print a new token for the lead's page /lead (the old one stops working)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"annotation database (default {DEFAULT_DB})")

    p = sub.add_parser("status", help="labels per annotator, throughput, agreement (Cohen's / Fleiss' kappa)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"annotation database (default {DEFAULT_DB})")

    p = sub.add_parser("export", help="write the majority label of each pair")
    p.add_argument(
        "output", help="output file: .jsonl, .json or .parquet (the extension picks the file type; others are refused)"
    )
    p.add_argument("--db", default=DEFAULT_DB, help=f"annotation database (default {DEFAULT_DB})")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "trl", "seed"])
    p.add_argument("--min-votes", type=int, default=1, help="only pairs with at least this many votes (default 1)")
    p.add_argument(
        "--drop-both-bad",
        action="store_true",
        help="leave out pairs most annotators marked 'both bad' (default: kept, with their grade and meta.both_bad)",
    )

    p = sub.add_parser("terminal", help="label samples by hand in the terminal (a/b/tie, undo, resume)")
    p.add_argument("samples", help="samples JSONL (from `rlhfkit sample`)")
    p.add_argument("output", help="labels JSONL (saved after every answer; re-run to resume)")
    p.add_argument("--annotator", default="human")
    p.add_argument(
        "--mode", choices=MODES, default=MODE_PAIRS, help="pairs: a/b/tie; thumbs: up/down on each response (KTO records)"
    )
    return parser


def main(argv: list[str] | None = None, *, prog: str = "rlhfkit annotate") -> int:
    """Run ``rlhfkit annotate ...``; returns the exit code (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["terminal", *argv]  # `rlhfkit annotate SAMPLES OUTPUT`, the spelling before the web app
    ns = build_parser(prog).parse_args(argv)
    from rlhfkit.data.io import DataError

    try:
        return _run(ns)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"{prog} {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(ns: argparse.Namespace) -> int:
    if ns.command == "terminal":
        if ns.mode == MODE_THUMBS:
            from rlhfkit.feedback.terminal import main_thumbs

            main_thumbs(ns.samples, ns.output, ns.annotator)
            return 0
        from rlhfkit.feedback.terminal import main_annotate

        main_annotate(ns.samples, ns.output, ns.annotator)
        return 0
    if ns.command == "serve":
        from rlhfkit.feedback.web.app import ServeConfig, serve

        serve(
            ServeConfig(
                db=ns.db,
                pairs=ns.pairs,
                host=ns.host,
                port=ns.port,
                overlap=ns.overlap,
                lease_seconds=ns.lease_seconds,
                guidelines=ns.guidelines,
                criteria=ns.criteria,
                mode=ns.mode,
                trusted_proxies=ns.trusted_proxies,
                checks=ns.checks,
                check_rate=ns.check_rate,
            )
        )
        return 0
    if ns.command in ("annotator", "lead-token"):
        from rlhfkit.feedback.web.store import AnnotationStore

        store = AnnotationStore(ns.db, create=False)
        try:
            if ns.command == "lead-token":
                token = store.new_lead_token()
                print(token)
                print(f"lead: open http://HOST:PORT/lead#token={token} (the token is shown only now)", file=sys.stderr)
                return 0
            from rlhfkit.feedback.web.app import ACTION_STATES

            store.set_annotator_state(ns.name, ACTION_STATES[ns.action])
        finally:
            store.close()
        print(f"{ns.name}: {ACTION_STATES[ns.action]}", file=sys.stderr)
        return 0
    if ns.command == "add-annotator":
        from rlhfkit.feedback.web.store import AnnotationStore

        store = AnnotationStore(ns.db)
        try:
            token = store.add_annotator(ns.name, replace_token=ns.new_token)
        finally:
            store.close()
        print(token)
        print(
            f"{ns.name}: open http://HOST:PORT/#token={token} on the server started with "
            f"`rlhfkit annotate serve --db {ns.db}` (the token is shown only now)",
            file=sys.stderr,
        )
        return 0
    if ns.command == "status":
        from rlhfkit.feedback.web.admin import format_status, status

        print(format_status(status(ns.db)))
        return 0
    from rlhfkit.feedback.web.admin import ExportConfig, export

    config = ExportConfig(db=ns.db, output=ns.output, format=ns.format, min_votes=ns.min_votes, drop_both_bad=ns.drop_both_bad)
    result = export(config)
    written, left_out = result
    if result.thumbs:
        tied = f"; {left_out} item(s) with as many ups as downs left out" if left_out else ""
        print(f"rlhfkit annotate export: {written} KTO records in {ns.output}{tied}", file=sys.stderr)
        return 0
    notes = [f"{left_out} ties/splits left out (TRL has no ties)"] if left_out else []
    if result.both_bad:
        what = "left out (--drop-both-bad)" if ns.drop_both_bad else "kept, marked meta.both_bad"
        notes.append(f"{result.both_bad} both-bad pair(s) {what}")
    note = "; " + "; ".join(notes) if notes else ""
    print(f"rlhfkit annotate export: {written} records in {ns.output} ({ns.format}){note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m rlhfkit.feedback.web.cli"))
