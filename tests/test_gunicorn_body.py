"""Large bodies read straight off gunicorn's socket (app/gunicorn_body.py), on a real gunicorn.

A probe app reports which reader it was handed, the body's hash and the client's
port, so each test sees whether the fast reader was used, whether the bytes were
right, and whether the keep-alive connection survived what the app left unread.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.demo import free_port, make_install
from app.core.settings import DEFAULT_PREFIX
from app.gunicorn_body import MIN_LENGTH

from conftest import REPO, VERSION, session_from

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn is Unix only")

PROBE = textwrap.dedent("""
    import hashlib, json
    from urllib.parse import parse_qs
    from app.gunicorn_body import GunicornBody

    def probe(environ, start_response):
        body = environ["wsgi.input"]
        take = parse_qs(environ.get("QUERY_STRING", "")).get("take", [None])[0]
        how = parse_qs(environ.get("QUERY_STRING", "")).get("how", ["read"])[0]
        h, got = hashlib.sha256(), 0
        want = int(take) if take is not None else None
        while want is None or got < want:
            step = 65536 if want is None else min(65536, want - got)
            piece = body.readline(step) if how == "readline" else body.read(step)
            if not piece:
                break
            h.update(piece)
            got += len(piece)
        out = json.dumps({"reader": type(body).__name__, "sha256": h.hexdigest(), "read": got,
                          "port": environ.get("REMOTE_PORT")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(out)))])
        return [out]

    app = GunicornBody(probe)
""")


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "probe_app.py").write_text(PROBE)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    with open(tmp_path / "gunicorn.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
                                 "--worker-class", "gthread", "--threads", "2", "--workers", "1",
                                 "probe_app:app"], env=env, cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def post(conn: http.client.HTTPConnection, body: bytes | Iterator[bytes], query: str = "",
         chunked: bool = False) -> dict:
    conn.request("POST", f"/{query}", body=body, encode_chunked=chunked,
                 headers={} if chunked else {"Content-Length": str(len(body))})  # type: ignore[arg-type]
    answer = conn.getresponse()
    assert answer.status == 200
    return json.loads(answer.read())


def test_a_large_body_is_read_off_the_socket_and_arrives_intact(probe):
    body = os.urandom(3 * MIN_LENGTH + 12345)
    conn = http.client.HTTPConnection("127.0.0.1", probe, timeout=30)
    got = post(conn, body)
    assert got["reader"] == "SocketBody", "the installed gunicorn no longer matches app/gunicorn_body.py"
    assert (got["sha256"], got["read"]) == (hashlib.sha256(body).hexdigest(), len(body))
    # the same connection serves the next request: gunicorn was told the body was all read
    again = post(conn, body[:MIN_LENGTH])
    assert again["port"] == got["port"] and again["sha256"] == hashlib.sha256(body[:MIN_LENGTH]).hexdigest()
    conn.close()


def test_small_and_chunked_bodies_stay_with_gunicorns_reader(probe):
    conn = http.client.HTTPConnection("127.0.0.1", probe, timeout=30)
    small = post(conn, b"x" * (MIN_LENGTH - 1))
    assert small["reader"] == "Body" and small["read"] == MIN_LENGTH - 1
    big = os.urandom(2 * MIN_LENGTH)
    chunked = post(conn, iter([big[:MIN_LENGTH], big[MIN_LENGTH:]]), chunked=True)
    assert chunked["reader"] == "Body" and chunked["sha256"] == hashlib.sha256(big).hexdigest()
    conn.close()


def test_what_the_app_leaves_unread_goes_back_to_gunicorn(probe):
    """The app stops early; gunicorn drains the rest (it drains up to 64 KiB, then
    closes) and the next request on the connection is read from where it really starts."""
    body = os.urandom(MIN_LENGTH + 30000)
    conn = http.client.HTTPConnection("127.0.0.1", probe, timeout=30)
    first = post(conn, body, f"?take={MIN_LENGTH - 7}")
    assert first["reader"] == "SocketBody" and first["read"] == MIN_LENGTH - 7
    second = post(conn, body)
    assert second["port"] == first["port"], "the connection was dropped instead of drained"
    assert second["sha256"] == hashlib.sha256(body).hexdigest()
    conn.close()


def test_readline_splits_at_newlines_like_gunicorns_reader(probe):
    body = b"".join(b"line %d\n" % i for i in range(60000))
    assert len(body) > MIN_LENGTH
    conn = http.client.HTTPConnection("127.0.0.1", probe, timeout=30)
    got = post(conn, body, "?how=readline")
    assert got["reader"] == "SocketBody" and got["read"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    conn.close()


def test_a_body_cut_off_midway_is_refused_and_leaves_nothing(make_receiver, tmp_path):
    """Through the real receiver: the client sends half a large blob and goes away.
    The upload ends as a refused short body (no traceback, no temp file), and the
    receiver goes on serving."""
    install = make_install(tmp_path / "secondary", {"allow_push": "127.0.0.1", "express_version": VERSION})
    receiver = make_receiver(install, server="gunicorn")
    data = os.urandom(4 * MIN_LENGTH)
    sha = hashlib.sha256(data).hexdigest()
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        sock.sendall(f"PUT {DEFAULT_PREFIX}/blobs/{sha} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     f"application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                     + data[:len(data) // 2])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"ended" in answer, answer[:300]
    log = receiver.log.read_text() if receiver.log else ""
    assert "Traceback" not in log
    state = install.data_dir / ".esmirror"
    assert not list((state / "tmp").glob("*")) and not (state / "blobs" / sha).exists()
    ok = session_from("127.0.0.1").put(f"{receiver.url}/blobs/{sha}", data=data, timeout=60,
                                       headers={"Content-Type": "application/octet-stream"})
    assert ok.status_code == 201 and (state / "blobs" / sha).read_bytes() == data


def test_socket_body_reads_exact_sizes_lines_and_an_early_end():
    """The reader alone, over a socket pair: sizes across what was already received,
    lines with and without a limit, and a sender that stops short."""
    from app.gunicorn_body import SocketBody

    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"ne\nsecond line\nthird")
        body = SocketBody(a, b"first li", 8 + 20 + 10)
        assert body.readline() == b"first line\n"
        assert body.readline(3) == b"sec"
        assert body.readline() == b"ond line\n"
        assert body.read(2) == b"th" and body.unread() == b"ird"
        b.sendall(b"1234")
        b.shutdown(socket.SHUT_WR)  # 3 of the announced bytes never come
        assert body.read() == b"ird1234" and body.failed
        assert body.read(5) == b"" and body.readline() == b""

    # readinto (the blob writer's path): what came ahead first, then the socket, no further
    # than the body, 0 at its end
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"CDEFGHxyz")  # "xyz" belongs to the next request
        body = SocketBody(a, b"AB", 8)
        space = bytearray(16)
        assert body.readinto(memoryview(space)[:5]) == 2 and space[:2] == b"AB"
        got = 0
        while got < 6:  # a recv may return less than asked
            n = body.readinto(memoryview(space)[2 + got:16])
            assert n > 0
            got += n
        assert space[:8] == b"ABCDEFGH" and body.left == 0
        assert body.readinto(memoryview(space)) == 0 and not body.failed
        assert a.recv(3) == b"xyz"
        b.shutdown(socket.SHUT_WR)
        cut = SocketBody(a, b"", 4)
        assert cut.readinto(memoryview(space)) == 0 and cut.failed
