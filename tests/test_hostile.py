"""Issue 4: hostile input to a secondary is refused with a readable answer and changes nothing.

One secondary per server (waitress, gunicorn) holds a published set and an archive
entry; every case sends one bad request from the allowed address and checks the
status, that the answer is a readable message (never a 500, never a traceback),
and that the working directory and archive hash the same before and after.
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest

from agent.demo import Receiver, free_port, make_install, write_sample_set
from conftest import VERSION, esmirror, held_files, session_from, tree_state

LIMIT = 2 * 1024 * 1024  # max_upload_bytes of the secondary under attack


@dataclass
class Target:
    server: str
    url: str
    secondary: Any
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def known_sha(self) -> str:
        return next(f["sha256"] for f in self.state["applied"] if f["path"] == "catalogs.xml")

    def commit(self, **changes: Any) -> bytes:
        body = {"generation": self.state["generation"] + 1, "master": self.state["master"],
                "base": self.state["digest"], "files": list(self.state["applied"])}
        body.update(changes)
        return json.dumps(body).encode()

    def commit_with(self, *entries: dict[str, Any]) -> bytes:
        return self.commit(files=list(self.state["applied"]) + list(entries))

    def entry(self, path: Any) -> dict[str, Any]:
        return {"path": path, "sha256": self.known_sha, "size": self.size(self.known_sha)}

    def size(self, sha: str) -> int:
        return next(f["size"] for f in self.state["applied"] if f["sha256"] == sha)


@pytest.fixture(scope="module", params=["waitress", "gunicorn"])
def target(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    port = free_port()
    secondary = make_install(root / "secondary", {"allow_push": "127.0.0.1",
                                                  "express_version": VERSION,
                                                  "max_upload_bytes": str(LIMIT)})
    master = make_install(root / "master", {"express_version": VERSION},
                          [("127.0.0.1", port, "none")])
    write_sample_set(master.data_dir, root / "images", big_mb=3)
    receiver = Receiver(secondary, port, server=request.param, log=root / "receiver.log").start()
    try:
        for change in (None, b"changed so that the archive holds an entry"):
            if change:
                (master.data_dir / "indexes" / "tile-1.idx").write_bytes(change)
            rc, _, out = esmirror("publish", "--install-dir", str(master.root), "--json")
            assert rc == 0, out
        state = json.loads((secondary.data_dir / ".esmirror" / "state.json").read_text())
        state["applied"] = held_files(secondary.data_dir)
        assert any((secondary.data_dir / "archive").iterdir())
        yield Target(request.param, receiver.url, secondary, state)
    finally:
        receiver.stop()


# --- how cases are sent ----------------------------------------------------------

def raw(url: str, head: str, body: bytes = b"", timeout: float = 20.0) -> tuple[int, str]:
    """Send bytes as they are (no client fixes them up); (status, body text)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head.replace("{prefix}", parts.path).encode("latin-1") + body)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                length = [int(line.split(b":", 1)[1]) for line in data[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(data) >= head_end + 4 + length[0]:
                    break
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def request(t: Target, method: str, route: str, body: bytes = b"",
            headers: dict[str, str] | None = None) -> tuple[int, str]:
    answer = session_from("127.0.0.1").request(method, f"{t.url}/{route}", data=body,
                                               headers=headers or {}, timeout=60)
    return answer.status_code, answer.text


def put_blob(t: Target, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    status, text = request(t, "PUT", f"blobs/{sha}", data)
    assert status == 201, text
    return sha


class catalogs_commit:
    """Upload a hostile catalogs.xml first (a legitimate step, before the snapshot), then ask
    to make it live."""

    def __init__(self, xml: bytes) -> None:
        self.xml = xml
        self.sha = hashlib.sha256(xml).hexdigest()

    def prepare(self, t: Target) -> None:
        put_blob(t, self.xml)

    def __call__(self, t: Target) -> tuple[int, str]:
        files = [f if f["path"] != "catalogs.xml" else {"path": "catalogs.xml", "sha256": self.sha,
                                                          "size": len(self.xml)}
                 for f in t.state["applied"]]
        return request(t, "POST", "commit", t.commit(files=files))


def over_limit(route: str, method: str = "POST") -> Callable[[Target], tuple[int, str]]:
    """A declared length one byte over the limit, and no body byte sent: the answer must come
    without reading the body (gunicorn: the app's JSON; waitress refuses it itself, in text)."""
    def send(t: Target) -> tuple[int, str]:
        return raw(t.url, f"{method} {{prefix}}/{route} HTTP/1.1\r\nHost: x\r\nContent-Length: "
                   f"{LIMIT + 1}\r\nConnection: close\r\n\r\n")
    return send


def framed(*blobs: bytes) -> bytes:
    out = b""
    for data in blobs:
        out += f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode() + data
    return out


OVER = "max_upload_bytes|exceeds max_body"  # the app's JSON, or waitress's own text
BAD_SHA = hashlib.sha256(b"what the name promises").hexdigest()


def json_case(body: bytes) -> Callable[[Target], tuple[int, str]]:
    return lambda t: request(t, "POST", "commit", body)


# --- the cases: (id, send, status, words the message must hold) -----------------------

PATHS = [
    ("dotdot", "../evil.idx", "'..'"),
    ("dotdot-inside", "indexes/../../evil.idx", "'..'"),
    ("absolute", "/etc/passwd", "absolute"),
    ("drive-letter", "C:/evil.idx", "drive"),
    ("drive-relative", "c:evil.idx", "drive"),
    ("backslash", "indexes\\evil.idx", "backslash"),
    ("nul", "evil\x00.idx", "control"),
    ("newline", "evil\n.idx", "control"),
    ("del", "evil\x7f.idx", "control"),
    ("reserved-con", "CON", "reserved"),
    ("reserved-nul-ext", "indexes/nul.txt", "reserved"),
    ("reserved-com1", "COM1.idx", "reserved"),
    ("reserved-lpt9", "lpt9", "reserved"),
    ("empty-segment", "indexes//evil.idx", "empty"),
    ("dot-segment", "./evil.idx", "'.'"),
    ("trailing-slash", "indexes/", "empty"),
    ("empty-path", "", "empty"),
    ("trailing-dot", "evil.", "dot"),
    ("trailing-space", "evil ", "space"),
    ("less-than", "a<b", "not allowed"),
    ("quote", 'a"b', "not allowed"),
    ("pipe", "a|b", "not allowed"),
    ("question", "a?b", "not allowed"),
    ("star", "a*b", "not allowed"),
    ("colon-stream", "catalogs.xml:evil", "not allowed"),
    ("archive", "archive/evil.idx", "never part of the set"),
    ("esmirror-state", ".esmirror/state.json", "never part of the set"),
    ("archive-other-case", "ARCHIVE/evil.idx", "never part of the set"),
    ("long-segment", "indexes/" + "a" * 256, "255 bytes"),
    ("long-path", "/".join(["b" * 200] * 6), "1024 bytes"),
    ("not-a-string", 123, "string"),
    ("lone-surrogate", "evil\ud800.idx", "UTF-8"),
]

CASES: list[tuple[str, Callable[[Target], tuple[int, str]], int | dict[str, int], str]] = [
    (f"path-{name}", (lambda p: lambda t: request(t, "POST", "commit", t.commit_with(t.entry(p))))(path),
     422, words)
    for name, path, words in PATHS
]
CASES += [
    ("path-case-collision", lambda t: request(t, "POST", "commit", t.commit_with(t.entry("Catalogs.XML"))),
     422, "same file"),
    ("path-unicode-collision", lambda t: request(t, "POST", "commit", t.commit_with(
        t.entry("caf\u00e9.idx"), t.entry("cafe\u0301.idx"))), 422, "same file"),
    ("path-duplicate", lambda t: request(t, "POST", "commit", t.commit_with(t.entry("dup.idx"),
                                                                            t.entry("dup.idx"))),
     422, "same file"),
    ("path-inside-a-file", lambda t: request(t, "POST", "commit", t.commit_with(
        t.entry("catalogs.xml/evil.idx"))), 422, "inside 'catalogs.xml'"),
    ("path-inside-a-file-other-case", lambda t: request(t, "POST", "commit", t.commit_with(
        t.entry("x.idx"), t.entry("X.IDX/evil.idx"))), 422, "inside 'x.idx'"),
    # blobs
    ("blob-hash-mismatch", lambda t: request(t, "PUT", f"blobs/{BAD_SHA}", b"something else"),
     400, "hash to"),
    ("blob-name-uppercase", lambda t: request(t, "PUT", f"blobs/{BAD_SHA.upper()}", b"x"),
     400, "SHA-256"),
    ("blob-name-short", lambda t: request(t, "PUT", "blobs/abc123", b"x"), 400, "SHA-256"),
    ("blob-name-traversal", lambda t: request(t, "PUT", "blobs/..%2F..%2Fcatalogs.xml", b"x"),
     {"waitress": 404, "gunicorn": 404}, "not found"),
    ("blob-range-malformed", lambda t: request(t, "PUT", f"blobs/{BAD_SHA}", b"x",
                                               {"Content-Range": "bytes=0-0"}), 400, "Content-Range"),
    ("blob-range-wrong-length", lambda t: request(t, "PUT", f"blobs/{BAD_SHA}", b"xyz",
                                                  {"Content-Range": "bytes 0-9/100"}), 400, "covers"),
    ("blob-range-huge-numbers", lambda t: request(t, "PUT", f"blobs/{BAD_SHA}", b"x", {
        "Content-Range": "bytes 0-0/" + "9" * 4400}), 400, "Content-Range"),
    ("blob-range-past-total", lambda t: request(t, "PUT", f"blobs/{BAD_SHA}", b"xyz",
                                                {"Content-Range": "bytes 0-2/2"}), 400, "past"),
    ("blob-range-last-part-wrong-hash", lambda t: request(t, "PUT", f"blobs/{BAD_SHA}", b"xyz",
                                                          {"Content-Range": "bytes 0-2/3"}),
     400, "hash to"),
    ("batch-bad-header", lambda t: request(t, "POST", "blobs", b"hello world\n"), 400, "frame header"),
    ("batch-second-frame-mismatch", lambda t: request(
        t, "POST", "blobs", framed(b"good frame") + f"{BAD_SHA} 5\n".encode() + b"wrong"),
     400, "hash to"),
    ("batch-frame-longer-than-body", lambda t: request(
        t, "POST", "blobs", f"{BAD_SHA} 100000\n".encode() + b"short"), 400, "claims"),
    ("batch-trailing-garbage", lambda t: request(t, "POST", "blobs", framed(b"ok") + b"abc"),
     400, "frame header"),
    # lengths
    ("put-over-limit-not-read", lambda t: raw(
        t.url, f"PUT {{prefix}}/blobs/{BAD_SHA} HTTP/1.1\r\nHost: x\r\nContent-Length: "
        f"{10 * 1024**3}\r\nConnection: close\r\n\r\n", b"only a few bytes"), 413, OVER),
    ("put-just-over-limit", over_limit(f"blobs/{BAD_SHA}", "PUT"), 413, OVER),
    ("batch-over-limit", over_limit("blobs"), 413, OVER),
    ("commit-over-limit", over_limit("commit"), 413, OVER),
    ("put-missing-length", lambda t: raw(
        t.url, f"PUT {{prefix}}/blobs/{BAD_SHA} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
     411, "Content-Length"),
    ("commit-missing-length", lambda t: raw(
        t.url, "POST {prefix}/commit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
     411, "Content-Length"),
    # waitress reads a chunked body itself (within its limit) and hands the app its length
    ("put-chunked", lambda t: raw(
        t.url, f"PUT {{prefix}}/blobs/{BAD_SHA} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
        "\r\nConnection: close\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
     {"waitress": 400, "gunicorn": 411}, "hash to|Content-Length"),
    ("bad-content-length", lambda t: raw(
        t.url, "POST {prefix}/commit HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n"
        "Connection: close\r\n\r\n"), 400, "Content-Length|Bad Request|Invalid"),
    ("two-content-lengths", lambda t: raw(
        t.url, "POST {prefix}/commit HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 40"
        "\r\nConnection: close\r\n\r\n{}"), 400, "Content-Length|Bad Request|Invalid|ontent"),
    # JSON
    ("json-empty", json_case(b""), 400, "not JSON"),
    ("json-malformed", json_case(b'{"generation": 1,'), 400, "not JSON"),
    ("json-not-utf8", json_case(b'{"master": "\xff\xfe"}'), 400, "not JSON"),
    ("json-deep-nesting", json_case(b"[" * 200_000 + b"]" * 200_000), 400, "not JSON"),
    ("json-huge-number", json_case(b'{"generation": ' + b"9" * 10_000 + b"}"), 400, "not JSON"),
    ("json-array", json_case(b"[1, 2, 3]"), 400, "JSON object"),
    ("json-null", json_case(b"null"), 400, "JSON object"),
    ("json-string", json_case(b'"commit please"'), 400, "JSON object"),
    ("json-unknown-field", lambda t: request(t, "POST", "commit", t.commit(extra=1)), 400, "unknown"),
    ("json-generation-string", lambda t: request(t, "POST", "commit", t.commit(generation="7")),
     400, "generation"),
    ("json-generation-negative", lambda t: request(t, "POST", "commit", t.commit(generation=-1)),
     400, "generation"),
    # the generation names the archive entry's folder: an absurd one used to break the
    # commit's rollback and leave the receiver answering 500 until its journal was removed
    ("json-generation-huge", lambda t: request(t, "POST", "commit", t.commit(
        generation=10**250, files=[f for f in t.state["applied"] if f["path"] != "indexes/tile-1.idx"])),
     400, "generation"),
    ("json-generation-bool", lambda t: request(t, "POST", "commit", t.commit(generation=True)),
     400, "generation"),
    ("json-master-path", lambda t: request(t, "POST", "commit", t.commit(master="../../x")),
     400, "master"),
    ("json-master-long", lambda t: request(t, "POST", "commit", t.commit(master="a" * 1000)),
     400, "master"),
    ("json-base-number", lambda t: request(t, "POST", "commit", t.commit(base=5)), 400, "base"),
    ("json-files-missing", lambda t: request(t, "POST", "commit", json.dumps(
        {k: v for k, v in json.loads(t.commit()).items() if k != "files"}).encode()), 400, "files"),
    ("json-files-object", lambda t: request(t, "POST", "commit", t.commit(files={"a": 1})),
     400, "files"),
    ("json-file-missing-sha", lambda t: request(t, "POST", "commit", t.commit_with(
        {"path": "x.idx", "size": 1})), 400, "files["),
    ("json-file-extra-key", lambda t: request(t, "POST", "commit", t.commit_with(
        {**t.entry("x.idx"), "mode": 777})), 400, "files["),
    ("json-file-sha-uppercase", lambda t: request(t, "POST", "commit", t.commit_with(
        {**t.entry("x.idx"), "sha256": t.known_sha.upper()})), 400, "sha256"),
    ("json-file-size-negative", lambda t: request(t, "POST", "commit", t.commit_with(
        {**t.entry("x.idx"), "size": -1})), 400, "size"),
    ("json-file-size-float", lambda t: request(t, "POST", "commit", t.commit_with(
        {**t.entry("x.idx"), "size": 1.5})), 400, "size"),
    ("json-file-size-absurd", lambda t: request(t, "POST", "commit", t.commit_with(
        {**t.entry("x.idx"), "size": 10**4000})), 400, "size"),
    ("json-file-size-bool", lambda t: request(t, "POST", "commit", t.commit_with(
        {**t.entry("x.idx"), "size": False})), 400, "size"),
    ("json-file-size-not-its-content", lambda t: request(t, "POST", "commit", t.commit_with(
        {**t.entry("x.idx"), "size": t.size(t.known_sha) + 1})), 422, "sizes do not match"),
    ("json-file-not-object", lambda t: request(t, "POST", "commit", t.commit_with("x.idx")),
     400, "files["),
    # huge manifests
    ("manifest-over-limit", lambda t: request(t, "POST", "commit", t.commit_with(
        *[t.entry(f"many/{i:07d}.idx") for i in range(LIMIT // 100)])), 413,
     OVER),
    ("manifest-large-missing-blobs", lambda t: request(t, "POST", "commit", t.commit_with(
        *[{"path": f"many/{i:06d}.idx", "sha256": hashlib.sha256(b"%d" % i).hexdigest(), "size": 1}
          for i in range(12_000)])), 409, "never uploaded"),
    # the commit itself
    ("commit-other-master", lambda t: request(t, "POST", "commit", t.commit(master="f" * 32)),
     409, "esmirror release"),
    ("commit-stale-base", lambda t: request(t, "POST", "commit", t.commit(base="0" * 64)),
     409, "base digest"),
    ("commit-older-generation", lambda t: request(t, "POST", "commit", t.commit(generation=0)),
     409, "older"),
    ("commit-without-catalogs", lambda t: request(t, "POST", "commit", t.commit(files=[
        f for f in t.state["applied"] if f["path"] != "catalogs.xml"])), 422, "catalogs.xml"),
    # XML attacks in catalogs.xml
    ("xml-billion-laughs", catalogs_commit(b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<CatalogConfig><Catalog name="a"><Path>&lol3;</Path></Catalog></CatalogConfig>"""), 422, "DOCTYPE"),
    ("xml-external-entity", catalogs_commit(b"""<?xml version="1.0"?>
<!DOCTYPE c [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<CatalogConfig><Catalog name="a"><Path>&xxe;</Path></Catalog></CatalogConfig>"""), 422, "DOCTYPE"),
    ("xml-external-dtd", catalogs_commit(b"""<?xml version="1.0"?>
<!DOCTYPE CatalogConfig SYSTEM "http://127.0.0.1:9/evil.dtd">
<CatalogConfig/>"""), 422, "DOCTYPE"),
    ("xml-parameter-entity", catalogs_commit(b"""<?xml version="1.0"?>
<!DOCTYPE c [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>
<CatalogConfig/>"""), 422, "DOCTYPE"),
    ("xml-deep-nesting", catalogs_commit(
        b"<CatalogConfig>" + b"<Globals>" * 100_000 + b"</Globals>" * 100_000
        + b"</CatalogConfig>"), 422, "catalogs.xml"),
    ("xml-not-well-formed", catalogs_commit(b"<CatalogConfig><Catalog>"), 422,
     "well-formed"),
    ("xml-wrong-root", catalogs_commit(b"<ImageServer/>"), 422, "CatalogConfig"),
    ("xml-binary", catalogs_commit(bytes(range(256)) * 8), 422, "catalogs.xml"),
    # sub-file deltas
    ("chunks-bad-sha", lambda t: request(t, "GET", "chunks/not-a-sha"), 400, "SHA-256"),
    ("chunks-path-traversal", lambda t: request(t, "GET", f"chunks/{BAD_SHA}?path=../../../etc/passwd"),
     404, "no file"),
    ("chunks-absolute-path", lambda t: request(t, "GET", f"chunks/{BAD_SHA}?path=/etc/passwd"),
     404, "no file"),
    ("delta-garbage", lambda t: request(t, "POST", f"delta/{BAD_SHA}", b"garbage\n" * 10), 400,
     "delta"),
    ("delta-size-absurd", lambda t: request(t, "POST", f"delta/{BAD_SHA}", json.dumps(
        {"size": 10**4000, "bases": []}).encode() + b"\n"), 400, "delta body starts"),
    ("delta-deep-nesting", lambda t: request(t, "POST", f"delta/{BAD_SHA}", b"[" * 30_000 + b"\n"),
     400, "delta body starts"),
    ("delta-copy-past-the-base", lambda t: request(t, "POST", f"delta/{BAD_SHA}", json.dumps(
        {"size": 10, "bases": [{"sha256": t.known_sha, "path": "catalogs.xml"}]}).encode()
        + b"\nC 0 99999999999999999999 10\n"), 400, "runs past"),
    # gunicorn passes a chunked body on and its chunk parser raises while the app reads;
    # waitress reads the chunks itself and refuses them before the app
    ("delta-streamed-bad-chunk-size", lambda t: raw(
        t.url, "POST {prefix}/delta HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n", b"zz\r\nabc\r\n0\r\n\r\n"), 400, "broke off|Bad Request|chunk"),
    ("delta-streamed-chunk-without-crlf", lambda t: raw(
        t.url, "POST {prefix}/delta HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n", b"5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n"), 400,
     "broke off|Bad Request|chunk"),
    # routes
    ("route-unknown", lambda t: request(t, "GET", "nothing-here"), 404, "not found|Not Found"),
    ("route-wrong-method", lambda t: request(t, "DELETE", "commit"), 405, "Method Not Allowed"),
    ("route-outside-prefix", lambda t: request(t, "GET", "../../other"), 404, "mounted at"),
]


@pytest.mark.parametrize("name,send,status,words", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_and_changes_nothing(target, name, send, status, words):
    expected = status[target.server] if isinstance(status, dict) else status
    if hasattr(send, "prepare"):
        send.prepare(target)
    before = tree_state(target.secondary.data_dir)
    got, text = send(target)
    assert got == expected, (got, text[:500])
    assert "Traceback" not in text and 'File "' not in text
    try:
        answer = json.loads(text)
        message = " ".join([answer["error"], *answer.get("reasons", [])])
    except (ValueError, KeyError, TypeError):
        # only the web server's own refusals (before the app) are plain text
        assert target.server == "waitress" or got == 400, text[:300]
        message = text
    assert message.strip(), text
    assert any(w in message for w in words.split("|")), (words, message[:500])
    if name.startswith("path-") and got == 422:
        assert json.loads(text)["reasons"], text
    assert tree_state(target.secondary.data_dir) == before


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40
