"""The annotation server under load and SIGKILL: 50 annotators, 5,000 labels, 0 lost, 0 duplicated.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability_server.py          # 50 annotators x 5,000 labels, twice: no kills, then 3 SIGKILLs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability_server.py --quick  # 20 annotators x 1,000 labels, 2 SIGKILLs
    .venv/bin/python benchmarks/reliability_server.py --clients 100 --labels 20000 --kills 5 --overlap 3 --seed 7

Part of the reliability benchmark (benchmarks/reliability.py calls :func:`run`);
not a test. It folds in benchmarks/annotate_load.py (the same load without kills
is the first row) and adds crashes.

Set-up: a fresh annotation database with enough pairs for the label budget
(``ceil(1.25 x labels / overlap) + annotators`` pairs, ``rlhfkit sample``
format; overlap 2: every pair wants votes from two different annotators), one
registered annotator (and token) per client, and ``rlhfkit annotate serve`` in a
subprocess on a fixed loopback port (``python -m rlhfkit.feedback.web.cli``).

Load: one thread per annotator, each with its own keep-alive connection
(stdlib ``http.client``, tests/annotate_client.py's ``Client``), labelling as fast
as it can: ``POST /api/next``, then ``POST /api/label`` (a / b / tie, 5% skips)
whose reply carries the next pair, until the shared budget of labels is spent.
2% of acknowledged labels are sent again at once (a client that retries after a
lost response; the server must answer ``duplicate: true`` with the same label id).

Crashes: a watcher thread SIGKILLs the server at ``kills`` moments drawn at
random (seeded) between 15% and 85% of the budget, a few milliseconds after the
acknowledged count passes each one (requests are in flight), and restarts it at
once with the same command on the same database and port. A client whose request
fails (connection refused or reset, no response) re-sends the *same* request
until it gets an answer -- for a label, the same pair, choice and reason, so a
label that was committed just before the kill comes back as ``duplicate``.

Verification, from the database (sqlite3, read directly) and from
``rlhfkit annotate export``: every label acknowledged to a client is stored
exactly once with the choice the client sent (mapped back through the A/B
order it was shown in); no stored label was never acknowledged; the total is
the budget; no annotator has two labels on a pair; no pair has more votes than
the overlap; each pair's ``n_votes`` counter equals its stored votes; no
annotator holds more than one lease; ``PRAGMA integrity_check`` is ok; the
export holds every acknowledged vote once. A case is one label of the budget;
it passes when that label is verified. ``labels/s`` is acknowledged labels over
the wall time of the load, restarts included; ``p50``/``p99`` are the latencies
of answered ``POST /api/label`` calls (one fsync each).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhfkit.feedback.web.store import opaque_id  # noqa: E402
from tests.annotate_client import Client, make_pairs  # noqa: E402

SEED = 20240917
SKIP_RATE = 0.05
RESEND_RATE = 0.02
RETRY_DEADLINE_S = 90.0
"""A request still failing after this long (the server did not come back) is an error."""


# ============================================================================ the server process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``rlhfkit annotate serve`` on a fixed port; :meth:`kill` (SIGKILL) and :meth:`start` again on the same db."""

    def __init__(self, db: Path, pairs: Path, overlap: int, port: int, logs: Path):
        self.db, self.pairs, self.overlap, self.port, self.logs = db, pairs, overlap, port, logs
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.start_seconds: list[float] = []
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120.0) -> None:
        self.starts += 1
        log = self.logs / f"server-{self.starts}.log"
        args = [
            sys.executable,
            "-m",
            "rlhfkit.feedback.web.cli",
            "serve",
            "--db",
            str(self.db),
            "--pairs",
            str(self.pairs),
            "--overlap",
            str(self.overlap),
            "--port",
            str(self.port),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "listening on" in log.read_text(errors="replace"):
                self.start_seconds.append(time.perf_counter() - t0)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server start {self.starts} exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"server start {self.starts} did not listen in {timeout:.0f} s:\n{log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        log = self.logs / f"server-{self.starts}.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


# ============================================================================ the load


@dataclass
class Load:
    acked: dict[tuple[str, int], str] = field(default_factory=dict)
    """(annotator, pair id) -> the choice as shown, for every label answered 200."""
    label_ids: dict[tuple[str, int], int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    double_acks: int = 0
    """A (annotator, pair) acknowledged as a new label twice."""
    resends_after_failure: int = 0
    """Requests sent again after a connection failure (the server was down or died mid-request)."""
    label_resends_duplicate: int = 0
    """Labels re-sent after a failure that the server had committed already (answered duplicate)."""
    label_resends_new: int = 0
    """Labels re-sent after a failure that the server had not committed (stored on the re-send)."""
    idempotent_resends: int = 0
    """Deliberate re-sends of an answered label, answered duplicate with the same id."""
    kills: list[int] = field(default_factory=list)
    """Acknowledged labels when each SIGKILL was sent."""
    downtime: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Stop(Exception):
    pass


def run_load(
    server: Server, tokens: dict[str, str], budget_total: int, *, kills: int, seed: int, progress: Callable[[str], None]
) -> Load:
    """``len(tokens)`` annotator threads spend ``budget_total`` labels; ``kills`` SIGKILLs + restarts meanwhile."""
    load = Load()
    lock = threading.Lock()
    budget = [budget_total]
    stop = threading.Event()
    rng = random.Random(seed)

    def claim() -> bool:
        with lock:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            return True

    def error(message: str) -> None:
        with lock:
            load.errors.append(message)

    def call(client: Client, path: str, body: Any, counter: list[int]) -> tuple[int, Any]:
        """POST until answered: a connection failure (server killed or restarting) is retried with the same body."""
        deadline = time.monotonic() + RETRY_DEADLINE_S
        delay = 0.02
        while True:
            if stop.is_set():
                raise Stop
            try:
                return client.post(path, body)
            except (OSError, http.client.HTTPException) as e:
                client.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{path} failed for {RETRY_DEADLINE_S:.0f} s: {type(e).__name__}: {e}") from e
                counter[0] += 1
                with lock:
                    load.resends_after_failure += 1
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    def annotator(name: str, token: str, own: random.Random) -> None:
        client = Client(server.url, token, timeout=20.0)
        try:
            status, data = call(client, "/api/next", None, [0])
            if status != 200:
                error(f"{name} next: {status} {data}")
                return
            assignment = data["assignment"]
            while assignment is not None and not stop.is_set() and claim():
                choice = "skip" if own.random() < SKIP_RATE else own.choice(["a", "b", "tie"])
                body = {"pair_id": assignment["pair_id"], "choice": choice, "reason": f"{name} {own.random():.6f}"}
                failures = [0]
                t0 = time.perf_counter()
                status, data = call(client, "/api/label", body, failures)
                elapsed = time.perf_counter() - t0
                key = (name, body["pair_id"])
                with lock:
                    if status != 200:
                        load.errors.append(f"{name} label {body}: {status} {data}")
                        return
                    if failures[0] == 0:
                        load.latencies.append(elapsed)
                        if data["duplicate"]:
                            load.errors.append(f"{name}: first submission of pair {body['pair_id']} answered as duplicate")
                    elif data["duplicate"]:
                        load.label_resends_duplicate += 1
                    else:
                        load.label_resends_new += 1
                    if key in load.acked:
                        load.double_acks += 1
                    load.acked[key] = choice
                    load.label_ids[key] = data["label_id"]
                if own.random() < RESEND_RATE:  # a client retrying although the answer came
                    status, again = call(client, "/api/label", body, [0])
                    with lock:
                        if status == 200 and again["duplicate"] and again["label_id"] == data["label_id"]:
                            load.idempotent_resends += 1
                        else:
                            load.errors.append(f"{name} re-send of an answered label: {status} {again}")
                    if status == 200:
                        data = again
                assignment = data["assignment"]
        except Stop:
            pass
        except Exception as e:  # noqa: BLE001 - reported in the row
            error(f"{name}: {type(e).__name__}: {e}")
        finally:
            client.close()

    thresholds = sorted(rng.uniform(0.15, 0.85) * budget_total for _ in range(kills))

    def killer() -> None:
        for threshold in thresholds:
            while not stop.is_set():
                with lock:
                    if len(load.acked) >= threshold or budget[0] <= 0:
                        break
                time.sleep(0.002)
            if stop.is_set() or budget[0] <= 0:
                return
            time.sleep(rng.uniform(0.0, 0.02))  # mid-flight: some requests sent, not answered
            with lock:
                load.kills.append(len(load.acked))
            server.kill()
            t0 = time.perf_counter()
            try:
                server.start()
            except Exception as e:  # noqa: BLE001
                error(f"restart after kill {len(load.kills)} failed: {e}")
                stop.set()
                return
            load.downtime.append(time.perf_counter() - t0)
            progress(f"    kill {len(load.kills)} at {load.kills[-1]} acknowledged labels; back in {load.downtime[-1]:.1f} s")

    threads = [
        threading.Thread(target=annotator, args=(name, token, random.Random(rng.random())), daemon=True)
        for name, token in tokens.items()
    ]
    watcher = threading.Thread(target=killer, daemon=True)
    start = time.perf_counter()
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    load.seconds = time.perf_counter() - start
    return load


# ============================================================================ verification


@dataclass
class Audit:
    verified: int
    """Acknowledged labels stored exactly once with the acknowledged choice and label id."""
    label_problems: list[str]
    """Lost, changed or duplicated acknowledged labels."""
    db_problems: list[str]
    """Everything not tied to one acknowledged label: totals, unacknowledged rows, overlap, counters, leases,
    integrity, the export."""
    stored: int


def audit(db: Path, load: Load, overlap: int, budget: int, export: Path | None) -> Audit:
    label_problems: list[str] = []
    problems: list[str] = []
    swap = {"a": "b", "b": "a"}
    with sqlite3.connect(db) as con:
        rows = con.execute("""SELECT a.name, a.id, l.pair_id, l.choice, l.flipped, l.id FROM labels l
                              JOIN annotators a ON a.id = l.annotator_id""").fetchall()
        # The API names pairs by opaque per-annotator ids (store.opaque_id, keyed by the database's own key).
        key_row = con.execute("SELECT value FROM settings WHERE key = 'public_id_key'").fetchone()
        (integrity,) = con.execute("PRAGMA integrity_check").fetchone()
        over = con.execute(
            """SELECT pair_id, COUNT(*) FROM labels WHERE choice != 'skip'
                              GROUP BY pair_id HAVING COUNT(*) > ?""",
            (overlap,),
        ).fetchall()
        counters = con.execute("""SELECT p.id, p.n_votes, (SELECT COUNT(*) FROM labels l WHERE l.pair_id = p.id
                                  AND l.choice != 'skip') FROM pairs p""").fetchall()
        leases = con.execute("SELECT annotator_id, COUNT(*) FROM leases GROUP BY annotator_id HAVING COUNT(*) > 1").fetchall()
        stale = con.execute("""SELECT COUNT(*) FROM leases s JOIN labels l
                               ON l.pair_id = s.pair_id AND l.annotator_id = s.annotator_id""").fetchone()[0]
    stored: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for name, annotator_id, pair_id, choice, flipped, label_id in rows:
        shown = swap.get(choice, choice) if flipped else choice  # back to the order the annotator saw
        public = opaque_id(key_row[0], annotator_id, pair_id) if key_row else str(pair_id)
        stored.setdefault((name, public), []).append((shown, label_id))
    verified = 0
    lost, wrong, dup = [], [], []
    for key, shown in load.acked.items():
        found = stored.get(key, [])
        if not found:
            lost.append(key)
        elif len(found) > 1:
            dup.append(key)
        elif found[0][0] != shown:
            wrong.append((key, shown, found[0][0]))
        elif found[0][1] != load.label_ids.get(key):
            wrong.append((key, f"label id {load.label_ids.get(key)}", f"label id {found[0][1]}"))
        else:
            verified += 1
    unacked = [key for key in stored if key not in load.acked]
    extra_rows = sum(len(v) - 1 for v in stored.values() if len(v) > 1)
    if lost:
        label_problems.append(f"{len(lost)} acknowledged label(s) lost, e.g. {lost[:3]}")
    if wrong:
        label_problems.append(f"{len(wrong)} acknowledged label(s) stored differently, e.g. {wrong[:3]}")
    if dup or extra_rows:
        label_problems.append(f"{extra_rows} duplicated row(s) for {len(dup)} acknowledged label(s)")
    if load.double_acks:
        label_problems.append(f"{load.double_acks} (annotator, pair) acknowledged as a new label twice")
    if unacked:
        problems.append(f"{len(unacked)} stored label(s) no client saw acknowledged, e.g. {unacked[:3]}")
    if len(rows) != budget or len(load.acked) != budget:
        problems.append(f"total: {len(rows)} stored, {len(load.acked)} acknowledged, expected {budget}")
    if over:
        problems.append(f"{len(over)} pair(s) with more than {overlap} votes, e.g. {over[:3]}")
    bad_counters = [(pid, n, real) for pid, n, real in counters if n != real]
    if bad_counters:
        problems.append(f"{len(bad_counters)} pair(s) whose n_votes differs from their stored votes, e.g. {bad_counters[:3]}")
    if leases:
        problems.append(f"{len(leases)} annotator(s) holding more than one lease")
    if stale:
        problems.append(f"{stale} lease(s) on pairs their annotator already labelled")
    if integrity != "ok":
        problems.append(f"PRAGMA integrity_check: {integrity}")
    if export is not None:
        problems += check_export(export, load, overlap)
    return Audit(verified, label_problems, problems, len(rows))


def check_export(export: Path, load: Load, overlap: int) -> list[str]:
    """Every acknowledged vote appears once in ``rlhfkit annotate export``'s records, no pair over the overlap."""
    problems = []
    votes: Counter[tuple[str, int]] = Counter()
    over = 0
    records = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record in records:
        labels = record["meta"]["labels"]
        names = [label["annotator"] for label in labels]
        if len(names) != len(set(names)):
            problems.append(f"export: item {record['meta']['item_index']} has two votes by one annotator: {names}")
        if len(labels) > overlap:
            over += 1
        for label in labels:
            votes[label["annotator"], record["meta"]["item_index"]] += 1
    acked_votes = sum(1 for choice in load.acked.values() if choice != "skip")
    if sum(votes.values()) != acked_votes:
        problems.append(f"export: {sum(votes.values())} votes in {len(records)} records, {acked_votes} acknowledged")
    if over:
        problems.append(f"export: {over} record(s) with more than {overlap} votes")
    doubled = [key for key, n in votes.items() if n > 1]
    if doubled:
        problems.append(f"export: {len(doubled)} (annotator, item) voted twice, e.g. {doubled[:3]}")
    return problems


def export_labels(db: Path, out: Path) -> tuple[Path | None, str]:
    script = Path(sys.executable).with_name("rlhfkit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rlhfkit.cli"]
    proc = subprocess.run(
        [*command, "annotate", "export", str(out), "--db", str(db)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    if proc.returncode != 0:
        return None, f"rlhfkit annotate export failed (exit {proc.returncode}): {proc.stderr[-500:]}"
    return out, ""


# ============================================================================ one scenario -> one row


def scenario(clients: int, labels: int, overlap: int, kills: int, seed: int, progress: Callable[[str], None]) -> dict:
    """Run one load (with ``kills`` SIGKILLs) on a fresh database and audit it; one row."""
    from rlhfkit.feedback.web.store import AnnotationStore

    kill_text = f"{kills} SIGKILL{'s' if kills != 1 else ''} + restarts" if kills else "no kills"
    check = f"annotate server: {clients} annotators x {labels:,} labels, overlap {overlap}, {kill_text}"
    progress(f"  {check}")
    t0 = time.perf_counter()
    n_pairs = math.ceil(1.25 * labels / overlap) + clients  # the budget, not the pool, ends the run
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-server-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "labels.sqlite"
        store = AnnotationStore(db)
        tokens = {f"annotator{i:03d}": store.add_annotator(f"annotator{i:03d}") for i in range(clients)}
        store.close()
        server = Server(db, make_pairs(tmp / "pairs.jsonl", n_pairs), overlap, free_port(), tmp)
        server.start()
        try:
            load = run_load(server, tokens, labels, kills=kills, seed=seed, progress=progress)
        finally:
            tail = server.log_tail()
            server.stop()
        if "Traceback" in tail:
            failures.append(f"server log has a traceback: ...{tail[-300:]}")
        export, problem = export_labels(db, tmp / "export.jsonl")
        if problem:
            failures.append(problem)
        report = audit(db, load, overlap, labels, export)
    db_problems = failures + report.db_problems  # the server log and the export, then the audit's
    if load.errors:
        db_problems.append(f"{len(load.errors)} client error(s), e.g. {load.errors[:3]}")
    if len(load.kills) != kills:
        db_problems.append(f"{len(load.kills)} of {kills} kills happened")
    failures = report.label_problems + db_problems
    rate = len(load.acked) / load.seconds if load.seconds else 0.0
    note = (
        f"{rate:.0f} labels/s over {load.seconds:.1f} s; p50 {load.percentile(0.5) * 1000:.0f} ms, "
        f"p99 {load.percentile(0.99) * 1000:.0f} ms per label; stored {report.stored}"
    )
    if kills:
        note += (
            f"; kills at {load.kills} acknowledged, restarts {', '.join(f'{d:.1f}' for d in load.downtime)} s; "
            f"{load.resends_after_failure} requests re-sent after a failure, of which {load.label_resends_duplicate} "
            f"labels were already committed (answered duplicate) and {load.label_resends_new} not (stored on re-send)"
        )
    note += f"; {load.idempotent_resends} deliberate re-sends answered duplicate"
    progress(f"    {note}")
    # One case per label of the budget, plus one for the database-wide invariants.
    return {
        "check": check,
        "cases": labels + 1,
        "passed": report.verified + (0 if db_problems else 1),
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 1),
        "note": note,
        "labels_per_s": round(rate, 1),
    }


def run(
    quick: bool = False,
    *,
    clients: int | None = None,
    labels: int | None = None,
    overlap: int = 2,
    kills: int | None = None,
    seed: int = SEED,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Two rows: the load without kills (annotate_load.py's check), then with ``kills`` SIGKILLs.

    Full: 50 annotators x 5,000 labels, 3 kills; quick: 20 x 1,000, 2 kills. Each row also has
    ``note`` (labels/s, latencies, what the kills did) and ``labels_per_s``.
    """
    progress = progress or (lambda line: None)
    clients = clients or (20 if quick else 50)
    labels = labels or (1_000 if quick else 5_000)
    kills = kills if kills is not None else (2 if quick else 3)
    rows = [scenario(clients, labels, overlap, 0, seed, progress)]
    if kills:
        rows.append(scenario(clients, labels, overlap, kills, seed + 1, progress))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 annotators x 1,000 labels, 2 kills")
    parser.add_argument("--clients", type=int, default=None, help="annotators (default 50; quick 20)")
    parser.add_argument("--labels", type=int, default=None, help="label budget (default 5,000; quick 1,000)")
    parser.add_argument("--overlap", type=int, default=2, help="votes wanted per pair (default 2)")
    parser.add_argument("--kills", type=int, default=None, help="SIGKILLs in the second run (default 3; quick 2)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(
        args.quick,
        clients=args.clients,
        labels=args.labels,
        overlap=args.overlap,
        kills=args.kills,
        seed=args.seed,
        progress=lambda line: print(line, flush=True),
    )
    print()
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':{width}s}  {'cases':>6s}  {'passed':>6s}  {'failed':>6s}  {'seconds':>7s}  labels/s")
    for r in rows:
        print(
            f"{r['check']:{width}s}  {r['cases']:6d}  {r['passed']:6d}  {r['cases'] - r['passed']:6d}  "
            f"{r['seconds']:7.1f}  {r['labels_per_s']:8.0f}"
        )
    for r in rows:
        print(f"\n{r['check']}:\n  {r['note']}")
        for failure in r["failures"]:
            print(f"  FAIL {failure}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0 if all(not r["failures"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
