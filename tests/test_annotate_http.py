"""The annotation server over real HTTP on loopback: security (tokens, other annotators,
cross-origin writes, body size, path traversal), a load test (50 annotators, 5,000 labels),
a crash test (SIGKILL mid-load, restart, every acknowledged label still there), and SIGTERM
(a clean exit leaving a self-contained .sqlite file)."""

from __future__ import annotations

import http.client
import json
import select
import shutil
import signal
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhfkit.feedback.web.app import MAX_BODY_BYTES, create_app
from rlhfkit.feedback.web.pairs import read_pairs
from rlhfkit.feedback.web.store import AnnotationStore, opaque_id
from rlhfkit.serve import ServerThread
from tests.annotate_client import Client, LoadResult, ServerProcess, audit, make_pairs, run_load, summary


@dataclass
class Running:
    url: str
    store: AnnotationStore
    tokens: dict[str, str]
    db: Path


@pytest.fixture
def server(tmp_path):
    """The app in a thread of this process, 6 pairs, overlap 1, annotators alice and bob."""
    store = AnnotationStore(tmp_path / "labels.sqlite")
    store.configure(overlap=1)
    store.add_pairs(read_pairs(make_pairs(tmp_path / "pairs.jsonl", 6))[0])
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob")}
    thread = ServerThread(create_app(store), "127.0.0.1", 0).start()
    try:
        yield Running(f"http://127.0.0.1:{thread.port}", store, tokens, tmp_path / "labels.sqlite")
    finally:
        thread.stop()
        store.close()


# ----------------------------------------------------------------------------- security


def test_every_api_call_needs_a_valid_token(server):
    for token in (None, "", "not-a-token", server.tokens["alice"] + "x"):
        client = Client(server.url, token)
        for path, body in (("/api/next", {}), ("/api/label", {"pair_id": "1", "choice": "a"}), ("/api/undo", {})):
            status, data = client.post(path, body)
            assert status == 401, (token, path, data)
    basic = Client(server.url, None)
    status, _ = basic.post("/api/next", headers={"Authorization": f"Basic {server.tokens['alice']}"})
    assert status == 401
    assert server.store.labels() == []
    status, data = Client(server.url, server.tokens["alice"]).post("/api/next")
    assert status == 200 and data["annotator"] == "alice"
    assert data["assignment"]["pair_id"] == server.store.public_id(1, 1)  # alice's opaque id for row 1


def test_another_annotators_token_cannot_touch_your_labels(server):
    alice, bob = Client(server.url, server.tokens["alice"]), Client(server.url, server.tokens["bob"])
    pair = alice.post("/api/next")[1]["assignment"]["pair_id"]
    assert bob.post("/api/next")[1]["assignment"]["pair_id"] != pair
    status, data = bob.post("/api/label", {"pair_id": pair, "choice": "a"})  # alice's pair, bob's token
    assert status == 403 and "not assigned to you" in data["detail"]
    status, data = alice.post("/api/label", {"pair_id": pair, "choice": "b", "reason": "alice's"})
    assert status == 200 and not data["duplicate"]
    assert bob.post("/api/undo") == (409, {"detail": "nothing to undo"})  # bob cannot reach alice's label
    assert bob.post("/api/label", {"pair_id": pair, "choice": "a"})[0] == 403
    [label] = server.store.labels()
    assert (label.annotator, label.reason) == ("alice", "alice's")
    status, data = alice.post("/api/undo")
    undone = {"pair_id": pair, "choice": "b", "reason": "alice's", "grade": None, "both_bad": False}  # sent ungraded
    assert status == 200 and data["undone"] == undone


def test_cross_origin_writes_are_refused(server):
    alice = Client(server.url, server.tokens["alice"])
    own = server.url  # http://127.0.0.1:PORT
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": own.replace("127.0.0.1", "localhost")},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": own, "Sec-Fetch-Site": "cross-site"},
    ):
        status, data = alice.post("/api/next", headers=headers)
        assert status == 403 and "cross-origin" in data["detail"], headers
    assert server.store.progress(1).remaining == 6 and server.store.labels() == []
    pair = alice.post("/api/next", headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})[1]["assignment"]["pair_id"]
    status, _ = alice.post("/api/label", {"pair_id": pair, "choice": "a"}, headers={"Origin": "http://evil.example"})
    assert status == 403 and server.store.labels() == []
    # The refusal waits for the body: http.client sends headers and body in two writes, and a server that
    # answers and closes before the body arrives makes the kernel reset the connection, which can reach the
    # client before the 403 (a CI run failed so, with ConnectionResetError).
    body = json.dumps({"pair_id": pair, "choice": "a"}).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
        head = (
            f"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.tokens['alice']}\r\n"
            f"Origin: http://evil.example\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode())
        assert select.select([sock], [], [], 0.5)[0] == [], "answered before reading the body"
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403") and b"cross-origin" in reply and server.store.labels() == []


def test_oversized_bodies_are_refused(server):
    alice = Client(server.url, server.tokens["alice"])
    pair = alice.post("/api/next")[1]["assignment"]["pair_id"]
    big = b'{"pair_id": "%s", "choice": "a", "reason": "%s"}' % (pair.encode(), b"x" * MAX_BODY_BYTES)
    assert alice.post("/api/label", raw=big)[0] == 413
    # No Content-Length: a chunked upload is counted as it arrives.
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    conn.request(
        "POST",
        "/api/label",
        body=iter([big[:40_000], big[40_000:]]),
        encode_chunked=True,
        headers={"Authorization": f"Bearer {server.tokens['alice']}", "Content-Type": "application/json"},
    )
    assert conn.getresponse().status == 413
    conn.close()
    status, _ = alice.post("/api/label", {"pair_id": pair, "choice": "a", "reason": "y" * 2001})  # under 64 KiB
    assert status == 422
    assert server.store.labels() == []
    assert alice.post("/api/label", {"pair_id": pair, "choice": "a", "reason": "y" * 2000})[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/static/..%5c..%5cetc%5cpasswd",
        "/static/annotate.js/../../../../etc/passwd",
        "/static/%252e%252e%252fetc%252fpasswd",
        "/static//etc/passwd",
        "/static/annotate.html",  # a file in static/, but not one the app serves under /static/
        "/static/__init__.py",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_no_path_traversal(server, path):
    status, body = Client(server.url, None).call("GET", path)
    assert status == 404, (path, status)
    assert "root:" not in str(body)


def test_page_and_static_files_with_security_headers(server):
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read().decode()
    assert response.status == 200 and "annotate.js" in page
    csp = response.getheader("content-security-policy")
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert response.getheader("referrer-policy") == "no-referrer"
    assert response.getheader("x-content-type-options") == "nosniff"
    for name, kind in (("annotate.js", "text/javascript"), ("annotate.css", "text/css")):
        conn.request("GET", f"/static/{name}")
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200 and response.getheader("content-type").startswith(kind)
        assert "http://" not in body and "https://" not in body  # no CDN
    conn.close()
    js = (Path(__file__).parents[1] / "src/rlhfkit/feedback/web/static/annotate.js").read_text()
    for parser in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser", "createContextualFragment"):
        assert parser not in js, parser  # text is never parsed as HTML (the markdown renderer builds nodes)


# ----------------------------------------------------------------------------- load


def by_row_id(db: Path, acked: dict[tuple[str, str], object]) -> dict[tuple[str, int], object]:
    """The acknowledgements keyed by (annotator, row id), as :func:`audit` reads the database: the API's pair ids
    are opaque (:func:`rlhfkit.feedback.web.store.opaque_id`, keyed by the database's own key)."""
    with sqlite3.connect(db) as con:
        (key,) = con.execute("SELECT value FROM settings WHERE key = 'public_id_key'").fetchone()
        annotators = con.execute("SELECT name, id FROM annotators").fetchall()
        pairs = [pair_id for (pair_id,) in con.execute("SELECT id FROM pairs")]
    rows = {(name, opaque_id(key, who, pair_id)): (name, pair_id) for name, who in annotators for pair_id in pairs}
    return {rows[opaque]: value for opaque, value in acked.items()}


def add_annotators(db: Path, n: int) -> dict[str, str]:
    store = AnnotationStore(db)
    try:
        return {f"annotator{i:02d}": store.add_annotator(f"annotator{i:02d}") for i in range(n)}
    finally:
        store.close()


def test_fifty_annotators_submit_five_thousand_labels(tmp_path):
    clients, labels, overlap = 50, 5000, 3
    db = tmp_path / "labels.sqlite"
    tokens = add_annotators(db, clients)
    process = ServerProcess(db, make_pairs(tmp_path / "pairs.jsonl", 2000), overlap=overlap)
    try:
        result = run_load(process.url, tokens, labels)
    finally:
        process.stop()
    report = audit(db, by_row_id(db, result.acked), overlap, by_row_id(db, result.graded))
    print("\nload:", summary(result, report, clients))
    assert result.errors == []
    assert len(result.acked) == labels and report.stored == labels
    assert report.lost == [] and report.duplicates == 0 and result.double_acks == 0
    assert report.regraded == [] and len(result.graded) == labels  # grades and both-bad flags stored as sent
    assert {grade for grade, _ in result.graded.values()} == {None, "much_better", "better", "slightly_better"}
    assert report.unacknowledged == 0 and report.over_overlap == 0 and report.integrity == "ok"
    assert result.retries_acked_as_duplicate > 0  # retries happened and were absorbed


# ----------------------------------------------------------------------------- crash


def test_sigkill_mid_load_loses_no_acknowledged_label(tmp_path):
    overlap = 2
    db = tmp_path / "labels.sqlite"
    tokens = add_annotators(db, 10)
    process = ServerProcess(db, make_pairs(tmp_path / "pairs.jsonl", 1000), overlap=overlap)
    result, stop = LoadResult(), threading.Event()
    load = threading.Thread(
        target=run_load, args=(process.url, tokens, 1500), kwargs={"retry_rate": 0.0, "stop": stop, "result": result}
    )
    load.start()
    deadline = time.monotonic() + 60
    while len(result.acked) < 300:
        assert load.is_alive() and time.monotonic() < deadline, result.errors
        time.sleep(0.005)
    process.kill()  # SIGKILL while ten clients are mid-request
    load.join(30)
    assert process.proc.returncode == -9
    acked = dict(result.acked)
    assert 300 <= len(acked) < 1500  # killed mid-load
    assert any("Error" in e or "Connection" in e for e in result.errors)  # clients saw the crash

    restarted = ServerProcess(db)  # same database, no --pairs
    try:
        report = audit(db, by_row_id(db, acked), overlap)
        print(
            f"\ncrash: acknowledged before the kill={len(acked)} stored={report.stored} lost={len(report.lost)} "
            f"duplicates={report.duplicates} stored-but-unacknowledged={report.unacknowledged} "
            f"integrity={report.integrity}"
        )
        assert report.lost == [] and report.duplicates == 0 and report.integrity == "ok"
        assert report.unacknowledged <= len(tokens)  # at most the requests in flight when it died
        # Labelling goes on after the restart, from the same database.
        after = run_load(restarted.url, tokens, 200, retry_rate=0.0, seed=1)
        assert after.errors == [] and len(after.acked) == 200
    finally:
        restarted.stop()
    final = audit(db, by_row_id(db, {**acked, **after.acked}), overlap)
    assert final.lost == [] and final.duplicates == 0 and final.over_overlap == 0


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_shuts_down_cleanly_leaving_a_self_contained_sqlite_file(tmp_path):
    """SIGTERM (kill, systemd, Docker) closes the database as Ctrl+C does, its WAL checkpointed: a backup
    of the .sqlite file alone, without -wal and -shm, holds every acknowledged label."""
    overlap = 2
    db = tmp_path / "labels.sqlite"
    tokens = add_annotators(db, 3)
    process = ServerProcess(db, make_pairs(tmp_path / "pairs.jsonl", 20), overlap=overlap)
    acked: dict[tuple[str, str], str] = {}
    # A second reader keeps the database open through the shutdown (`rlhfkit annotate status`, or the
    # pipeline's label stage with web_serve: false): the server's connection is then not the last one,
    # so SQLite would not checkpoint on close by itself.
    watcher = sqlite3.connect(db)
    clients = []
    try:
        for n, (name, token) in enumerate(tokens.items()):
            client = Client(process.url, token)
            clients.append(client)  # left open: keep-alive connections while the server shuts down
            assignment = client.post("/api/next")[1]["assignment"]
            for i in range(4 + n):
                choice = ("a", "b", "tie", "skip")[(i + n) % 4]
                status, data = client.post("/api/label", {"pair_id": assignment["pair_id"], "choice": choice, "reason": "r"})
                assert status == 200 and not data["duplicate"]
                acked[name, assignment["pair_id"]] = choice
                assignment = data["assignment"]
        assert watcher.execute("SELECT COUNT(*) FROM labels").fetchone() == (len(acked),)
        assert (tmp_path / "labels.sqlite-wal").stat().st_size > 0  # the labels are in the WAL so far
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=30) == 0  # a clean exit, not death by signal (-15)
    finally:
        for client in clients:
            client.close()
        process.stop()
    assert "stopped by SIGTERM" in process.log.read_text()
    assert (tmp_path / "labels.sqlite-wal").stat().st_size == 0  # checkpointed into the .sqlite file, then truncated

    backup = tmp_path / "backup" / "labels.sqlite"
    backup.parent.mkdir()
    shutil.copyfile(db, backup)  # the .sqlite file only
    watcher.close()
    report = audit(backup, by_row_id(backup, acked), overlap)
    assert report.integrity == "ok"
    assert report.lost == [] and report.stored == len(acked) == 15
    assert report.duplicates == 0 and report.unacknowledged == 0
    with sqlite3.connect(backup) as con:
        assert con.execute("SELECT COUNT(*) FROM annotators").fetchone() == (3,)
        assert con.execute("SELECT COUNT(*) FROM pairs").fetchone() == (20,)


# ----------------------------------------------------------------------------- the label stage serving the app


def test_label_stage_serves_the_app_until_every_pair_is_labelled(tmp_path):
    import socket

    from rlhfkit.data.preferences import load_comparisons
    from rlhfkit.label import LabelConfig
    from rlhfkit.label import run as run_label

    with socket.socket() as probe:  # a free port for the stage's server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db = tmp_path / "web.sqlite"
    tokens = add_annotators(db, 1)
    config = LabelConfig(
        samples=str(make_pairs(tmp_path / "samples.jsonl", 3)),
        output=str(tmp_path / "labels.jsonl"),
        source="human-web",
        web_db=str(db),
        web_port=port,
        poll_seconds=0.02,
        wait_timeout=60,
    )
    stage = threading.Thread(target=run_label, args=(config,))
    stage.start()
    client = Client(f"http://127.0.0.1:{port}", tokens["annotator00"])
    deadline = time.monotonic() + 30
    while True:
        try:
            status, data = client.post("/api/next")
            break
        except OSError:
            assert stage.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
    for _ in range(3):
        assert status == 200 and data["assignment"] is not None
        status, data = client.post("/api/label", {"pair_id": data["assignment"]["pair_id"], "choice": "tie"})
    assert status == 200 and data["assignment"] is None
    stage.join(30)
    assert not stage.is_alive()
    assert [(c.meta["item_index"], c.tie) for c in load_comparisons(config.output)] == [(0, True), (1, True), (2, True)]
    client.close()
    with pytest.raises(OSError):  # the stage stopped its server
        Client(f"http://127.0.0.1:{port}", tokens["annotator00"]).post("/api/next")
