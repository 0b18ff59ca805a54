"""A secondary that answers what no esmirror receiver would: the master fails that one secondary
with a readable reason, never a traceback, and the others still get the set."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent.demo import Receiver, free_port, make_install, write_sample_set
from app.core import PROTOCOL
from app.core.express import platform_tag
from app.core.manifest import Manifest
from conftest import VERSION, esmirror, set_files


class FakeSecondary(ThreadingHTTPServer):
    """Answers like a receiver, except for the route named in ``hostile``."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.hostile: dict[str, tuple[int, bytes]] = {}

    def normal(self, method: str, route: str, body: bytes) -> tuple[int, Any]:
        if route == "browse":
            return 200, {"protocol": PROTOCOL, "express_version": VERSION, "platform": platform_tag(),
                         "generation": None, "digest": "0" * 64, "master": None, "warnings": [],
                         "archive_bytes": 0, "max_upload_bytes": 4 << 30, "free_bytes": 1 << 40,
                         "reserve_bytes": 0}
        if route == "manifest":
            return 200, {"generation": None, "digest": "0" * 64, "files": []}
        if route == "commit":
            sent = json.loads(body)
            return 200, {"generation": sent["generation"], "archive_id": None, "warnings": [],
                         "digest": Manifest.from_list(sent["files"]).digest}
        return 201, {}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        route = self.path.split("/mirror/", 1)[-1].split("?")[0]
        route = "blobs" if route.startswith("blobs") else route
        server: FakeSecondary = self.server  # type: ignore[assignment]
        if route in server.hostile:
            status, data = server.hostile[route]
        else:
            status, answer = server.normal(self.command, route, body)
            data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = _any


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-secondary")
    real_port, fake_port = free_port(), free_port()
    real = make_install(root / "real", {"allow_push": "127.0.0.1", "express_version": VERSION})
    master = make_install(root / "master", {"express_version": VERSION},
                          [("127.0.0.1", fake_port, "none"), ("127.0.0.1", real_port, "none")])
    write_sample_set(master.data_dir, root / "images", big_mb=1)
    receiver = Receiver(real, real_port, server="waitress", log=root / "real.log").start()
    fake = FakeSecondary(fake_port)
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        yield master, real, fake, fake_port
    finally:
        fake.shutdown()
        fake.server_close()
        receiver.stop()


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


CASES = [  # (id, route, status, body, words the fake's error holds)
    ("browse-a-list", "browse", 200, b"[]", "not an object"),
    ("browse-deep-nesting", "browse", 200, b"[" * 100_000, "not JSON"),
    ("browse-protocol", "browse", 200, None, "protocol"),
    # another JSON service on the port: it was said to speak "esmirror protocol None"
    ("browse-not-esmirror", "browse", 200, _json({"weird": True}),
     "answered GET browse, but not as an esmirror receiver (its answer has no protocol)"),
    ("browse-part-size-text", "browse", 200, None, "max_upload_bytes"),
    ("browse-warnings-number", "browse", 200, None, "warnings"),
    ("manifest-files-numbers", "manifest", 200, _json({"digest": "1" * 64, "files": [1]}), "manifest"),
    ("manifest-unsafe-path", "manifest", 200, _json({"digest": "1" * 64, "files": [
        {"path": "../x", "sha256": "2" * 64, "size": 1}]}), "'..'"),
    ("commit-a-list", "commit", 200, b"[]", "not an object"),
    ("commit-another-set", "commit", 200, _json({"generation": 1, "digest": "3" * 64}),
     "answered the commit with set 333333333333"),
    ("commit-reasons-numbers", "commit", 422, _json({"error": "no\nway", "reasons": [1, 2]}), "no way"),
    ("commit-missing-number", "commit", 409, _json({"error": "missing", "missing": 5}), "missing"),
]
REASONS = {"browse-protocol": "refused", "browse-not-esmirror": "refused", "commit-reasons-numbers": "invalid-set", "commit-missing-number": "conflict"}
BROWSE_CHANGES = {"browse-protocol": {"protocol": 999}, "browse-part-size-text": {"max_upload_bytes": "abc"},
                  "browse-warnings-number": {"warnings": 5}}


@pytest.mark.parametrize("name,route,status,body,words", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_answer_fails_that_secondary_only(world, name, route, status, body, words):
    master, real, fake, fake_port = world
    if name in BROWSE_CHANGES:
        body = _json({**fake.normal("GET", "browse", b"")[1], **BROWSE_CHANGES[name]})
    fake.hostile = {route: (status, body)}
    try:
        rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
    finally:
        fake.hostile = {}
    assert rc == 1, out
    assert "Traceback" not in out and report is not None, out
    by_port = {s["port"]: s for s in report["secondaries"]}
    bad = by_port[fake_port]
    assert bad["state"] != "in-sync" and words in bad["error"], bad
    assert bad["reason"] == REASONS.get(name, "bad-answer"), bad  # (not answered as a receiver does)
    assert "\n" not in bad["error"].split("\n  ")[0], bad["error"]
    assert "esmirror bug" not in bad["error"], bad["error"]
    assert [s["state"] for p, s in by_port.items() if p != fake_port] == ["in-sync"]
    assert set_files(real.data_dir) == set_files(master.data_dir)


def test_status_names_a_secondary_whose_browse_is_malformed(world):
    master, _, fake, fake_port = world
    fake.hostile = {"browse": (200, _json({**fake.normal("GET", "browse", b"")[1], "warnings": [1]}))}
    try:
        rc, report, out = esmirror("status", "--install-dir", str(master.root), "--json")
        rc_text, _, text = esmirror("status", "--install-dir", str(master.root))
    finally:
        fake.hostile = {}
    assert rc == 1 and rc_text == 1, out + text
    assert "Traceback" not in out + text
    assert "warnings" in json.dumps(report) and f"127.0.0.1:{fake_port}" in text, out
