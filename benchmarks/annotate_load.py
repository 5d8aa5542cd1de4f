"""Load on the web annotation server: N concurrent annotators submit M labels on loopback.

    .venv/bin/python benchmarks/annotate_load.py                    # 50 clients, 5,000 labels, overlap 3
    .venv/bin/python benchmarks/annotate_load.py --clients 100 --labels 20000 --overlap 5

Starts ``rlhfkit annotate serve`` in a subprocess on a fresh database, runs one
thread per annotator (each its own keep-alive connection, stdlib http.client):
next pair -> label (a / b / tie, 5% skips) -> the reply carries the next pair;
2% of labels are sent twice, as a client retrying after a lost response. Then it
reads the database directly and prints labels acknowledged, stored, lost
(acknowledged but missing or different), duplicates, errors, and p50/p99 latency
of ``POST /api/label`` (which includes the fsync of the label's transaction).
Exits 1 if lost, duplicates or errors is not 0. tests/test_annotate_http.py runs
the same thing at the default size.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhfkit.feedback.web.store import AnnotationStore  # noqa: E402
from tests.annotate_client import ServerProcess, audit, make_pairs, run_load, summary  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--labels", type=int, default=5000)
    parser.add_argument("--overlap", type=int, default=3)
    args = parser.parse_args()
    # Enough pairs that the label budget, not the pool, ends the run (skips are not votes).
    n_pairs = math.ceil(1.25 * args.labels / args.overlap) + args.clients
    with tempfile.TemporaryDirectory(prefix="annotate-load-") as tmp:
        db = Path(tmp) / "labels.sqlite"
        store = AnnotationStore(db)
        tokens = {f"annotator{i:03d}": store.add_annotator(f"annotator{i:03d}") for i in range(args.clients)}
        store.close()
        server = ServerProcess(db, make_pairs(Path(tmp) / "pairs.jsonl", n_pairs), overlap=args.overlap)
        try:
            result = run_load(server.url, tokens, args.labels)
        finally:
            server.stop()
        report = audit(db, result.acked, args.overlap)
    print(summary(result, report, args.clients))
    print(f"pairs={n_pairs} overlap={args.overlap} seconds={result.seconds:.1f} "
          f"unacknowledged={report.unacknowledged} over_overlap={report.over_overlap} integrity={report.integrity}")
    for error in result.errors[:5]:
        print("error:", error)
    bad = report.lost or report.duplicates or result.double_acks or result.errors or len(result.acked) != args.labels
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
