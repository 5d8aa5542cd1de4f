"""Test tooling for the web annotation app: an HTTP client, a server subprocess, and a load driver.

Shared by tests/test_annotate_*.py and benchmarks/reliability_server.py. Only the
standard library is used on the client side (``http.client``), one keep-alive
connection per simulated annotator.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]


def make_pairs(path: Path, n: int) -> Path:
    """``n`` distinct pairs in ``rlhfkit sample`` format."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"prompt_index": i, "prompt": f"Question {i}?", "responses": [f"Answer {i} first", f"Answer {i} second"]}
                )
                + "\n"
            )
    return path


class Client:
    """One annotator's HTTP connection. ``call`` returns ``(status, json body)``."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 30.0):
        parts = urlsplit(base_url)
        self.host, self.port, self.token, self.timeout = parts.hostname, parts.port, token, timeout
        self._conn: http.client.HTTPConnection | None = None

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"{}")
        sent = {"Content-Type": "application/json"}
        if self.token is not None:
            sent["Authorization"] = f"Bearer {self.token}"
        sent.update(headers or {})
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self._conn.request(method, path, body=payload if method != "GET" else None, headers=sent)
            response = self._conn.getresponse()
            data = response.read()
        except Exception:
            self.close()
            raise
        if response.getheader("connection", "").lower() == "close":
            self.close()
        try:
            return response.status, json.loads(data) if data else None
        except json.JSONDecodeError:
            return response.status, data.decode("utf-8", "replace")

    def post(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        return self.call("POST", path, body, **kwargs)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ServerProcess:
    """``rlhfkit annotate serve`` in a subprocess on a free loopback port (stderr goes to a log file)."""

    def __init__(
        self,
        db: Path,
        pairs: Path | None = None,
        *,
        overlap: int | None = None,
        log: Path | None = None,
        extra_args: Sequence[str] = (),
    ):
        args = [sys.executable, "-m", "rlhfkit.feedback.web.cli", "serve", "--db", str(db), "--port", "0"]
        if pairs is not None:
            args += ["--pairs", str(pairs)]
        if overlap is not None:
            args += ["--overlap", str(overlap)]
        args += list(extra_args)
        self.log = log or db.with_suffix(f".server-{time.monotonic_ns()}.log")
        self._log_file = open(self.log, "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+/)", self.log.read_text(errors="replace"))
            if match:
                return match.group(1).rstrip("/")
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"server did not start in {timeout} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log_file.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


# ----------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    acked: dict[tuple[str, int], str] = field(default_factory=dict)
    """(annotator, pair_id) -> the choice as shown, for every label answered with a 2xx."""
    graded: dict[tuple[str, int], tuple[str | None, bool]] = field(default_factory=dict)
    """(annotator, pair_id) -> (grade, both_bad) sent with each acknowledged label (None: sent without a grade)."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per POST /api/label."""
    errors: list[str] = field(default_factory=list)
    double_acks: int = 0
    """The same (annotator, pair) acknowledged as a new label twice (must be 0)."""
    retries_acked_as_duplicate: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_load(
    base_url: str,
    tokens: dict[str, str],
    total_labels: int,
    *,
    retry_rate: float = 0.02,
    skip_rate: float = 0.05,
    seed: int = 0,
    stop: threading.Event | None = None,
    result: LoadResult | None = None,
) -> LoadResult:
    """``len(tokens)`` concurrent annotators submit ``total_labels`` labels in all.

    Each annotator thread asks for its next pair, labels it (a / b / tie, some
    skips; a / b with a random grade or none, as an older client sends; now and
    then "both bad") and gets the next pair in the reply. With probability ``retry_rate`` it
    sends the same label again, as a client would after a lost response; the
    server must acknowledge it as a duplicate without storing a second row.
    Connection failures (a killed server) end that thread; ``stop`` ends all.
    Pass ``result`` to watch it fill while the load runs in another thread.
    """
    result = LoadResult() if result is None else result
    lock = threading.Lock()
    budget = [total_labels]
    stop = stop or threading.Event()

    def claim() -> bool:
        with lock:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            return True

    def annotator(name: str, token: str, rng: random.Random) -> None:
        client = Client(base_url, token)
        try:
            status, data = client.post("/api/next")
            if status != 200:
                with lock:
                    result.errors.append(f"{name} next: {status} {data}")
                return
            assignment = data["assignment"]
            while assignment is not None and not stop.is_set() and claim():
                choice = "skip" if rng.random() < skip_rate else rng.choice(["a", "b", "tie"])
                body = {"pair_id": assignment["pair_id"], "choice": choice, "reason": f"{name} {rng.random():.3f}"}
                grade = rng.choice([None, "much_better", "better", "slightly_better"]) if choice in ("a", "b") else None
                both_bad = choice != "skip" and rng.random() < 0.1
                if grade is not None:
                    body["grade"] = grade
                if both_bad:
                    body["both_bad"] = True
                t0 = time.perf_counter()
                status, data = client.post("/api/label", body)
                elapsed = time.perf_counter() - t0
                with lock:
                    result.latencies.append(elapsed)
                    if status != 200:
                        result.errors.append(f"{name} label: {status} {data}")
                        return
                    if data["duplicate"]:
                        result.errors.append(f"{name}: first submission of pair {body['pair_id']} answered as duplicate")
                    key = (name, body["pair_id"])
                    if key in result.acked:
                        result.double_acks += 1
                    result.acked[key] = choice
                    result.graded[key] = (grade, both_bad)
                if rng.random() < retry_rate:
                    status, again = client.post("/api/label", body)
                    with lock:
                        if status == 200 and again["duplicate"] and again["label_id"] == data["label_id"]:
                            result.retries_acked_as_duplicate += 1
                        else:
                            result.errors.append(f"{name} retry: {status} {again}")
                assignment = data["assignment"]
        except (OSError, http.client.HTTPException) as e:
            if not stop.is_set():
                with lock:
                    result.errors.append(f"{name}: {type(e).__name__}: {e}")
        finally:
            client.close()

    rng = random.Random(seed)
    threads = [
        threading.Thread(target=annotator, args=(name, token, random.Random(rng.random())), daemon=True)
        for name, token in tokens.items()
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class Audit:
    stored: int
    lost: list[tuple[str, int]]
    """Acknowledged labels missing from the db, or stored with another choice."""
    duplicates: int
    """Stored rows beyond one per (annotator, pair)."""
    unacknowledged: int
    """Stored rows no client saw acknowledged (expected only around a crash)."""
    over_overlap: int
    """Pairs with more votes than the overlap."""
    integrity: str
    regraded: list[tuple[str, int]] = field(default_factory=list)
    """Acknowledged labels stored with another grade or both-bad flag than was sent (with ``graded``)."""


def audit(
    db: Path,
    acked: dict[tuple[str, int], str],
    overlap: int,
    graded: dict[tuple[str, int], tuple[str | None, bool]] | None = None,
) -> Audit:
    """Compare the acknowledgements with the database, read directly with sqlite3."""
    with sqlite3.connect(db) as con:
        rows = con.execute("""SELECT a.name, l.pair_id, l.choice, l.flipped, l.grade, l.both_bad FROM labels l
                              JOIN annotators a ON a.id = l.annotator_id""").fetchall()
        (integrity,) = con.execute("PRAGMA integrity_check").fetchone()
        over = con.execute(
            """SELECT COUNT(*) FROM (SELECT pair_id FROM labels WHERE choice != 'skip'
                              GROUP BY pair_id HAVING COUNT(*) > ?)""",
            (overlap,),
        ).fetchone()[0]
    stored: dict[tuple[str, int], str] = {}
    stored_grades: dict[tuple[str, int], tuple[str | None, bool]] = {}
    duplicates = 0
    for name, pair_id, choice, flipped, grade, both_bad in rows:
        if (name, pair_id) in stored:
            duplicates += 1
        swap = {"a": "b", "b": "a"}
        stored[name, pair_id] = swap.get(choice, choice) if flipped else choice  # back to the order shown
        stored_grades[name, pair_id] = (grade, bool(both_bad))  # the grade is the same in either order
    lost = [key for key, shown in acked.items() if stored.get(key) != shown]
    regraded = [key for key, sent in (graded or {}).items() if key in acked and stored_grades.get(key) != sent]
    return Audit(len(rows), lost, duplicates, len(set(stored) - set(acked)), over, integrity, regraded)


def summary(result: LoadResult, report: Audit, clients: int) -> str:
    return (
        f"clients={clients} labels={len(result.acked)} stored={report.stored} lost={len(report.lost)} "
        f"duplicates={report.duplicates + result.double_acks} errors={len(result.errors)} "
        f"retries_acked_as_duplicate={result.retries_acked_as_duplicate} "
        f"p50={result.percentile(0.5) * 1000:.1f}ms p99={result.percentile(0.99) * 1000:.1f}ms "
        f"mean={statistics.fmean(result.latencies) * 1000 if result.latencies else float('nan'):.1f}ms "
        f"throughput={len(result.acked) / result.seconds if result.seconds else 0:.0f} labels/s"
    )
