"""Issue 4: signed pushes with shared_secret_file, on real receivers.

Good pushes are accepted; a tampered body, a stale timestamp, a replayed nonce and
a wrong key are refused with 401 and change nothing on the secondary.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from agent.demo import make_install
from app.core.errors import ConfigError
from app.core.signing import Signer, Verifier, batch_digest
from conftest import VERSION, esmirror, held_files, session_from, set_files, tree_state

SECRET = "3f1c0e9a7b5d4e2f8a6c1b0d9e7f5a3c"
SIGNED = {"shared_secret_file": "esmirror.secret"}


def write_secret(install, secret: str = SECRET) -> None:
    (install.etc_dir / "esmirror.secret").write_text(secret + "\n")


@pytest.fixture
def signed_fleet(fleet):
    """A master and one secondary (gunicorn, 2 workers) that both hold the secret."""
    f = fleet(1, server="gunicorn", secondary_ini={**SIGNED, "max_upload_bytes": "2M"},
              master_ini=SIGNED, start=False)
    write_secret(f.master)
    write_secret(f.secondaries[0])
    f.receivers[0].start()
    return f


def test_signed_publish_is_accepted_batches_parts_delta_and_commit(signed_fleet):
    f = signed_fleet
    big = f.master.data_dir / "indexes" / "huge.idx"
    big.write_bytes(os.urandom(5 * 1024 * 1024))
    rc, report, out = f.publish()
    assert rc == 0, out
    assert report["secondaries"][0]["state"] == "in-sync"
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)
    # a few bytes of the 5 MB index change: GET chunks?path=… and POST delta/<sha>, signed
    with open(big, "r+b") as fh:
        fh.seek(1024 * 1024)
        fh.write(b"a small edit")
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed")
    rc, report, out = f.publish()
    assert rc == 0, out
    assert report["secondaries"][0]["bytes_sent"] < 1024 * 1024, report  # a delta, not the file
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)
    # a new 3 MB file goes in 2 MB parts (max_upload_bytes), each signed
    (f.master.data_dir / "indexes" / "new.idx").write_bytes(os.urandom(3 * 1024 * 1024))
    rc, report, out = f.publish()
    assert rc == 0, out
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)


def test_unsigned_master_gets_401_and_nothing_changes(signed_fleet):
    f = signed_fleet
    ini = f.master.etc_dir / "esmirror.ini"
    ini.write_text(ini.read_text().replace("shared_secret_file = esmirror.secret\n", ""))
    before = tree_state(f.secondaries[0].data_dir)
    rc, report, out = f.publish()
    assert rc == 1, out
    result = report["secondaries"][0]
    assert result["state"] == "refused"
    assert "401" in result["error"] and "shared_secret_file" in result["error"], result
    assert tree_state(f.secondaries[0].data_dir) == before


def test_wrong_key_gets_401_and_nothing_changes(signed_fleet):
    f = signed_fleet
    write_secret(f.master, "another secret of enough length")
    before = tree_state(f.secondaries[0].data_dir)
    rc, report, out = f.publish()
    assert rc == 1, out
    assert "bad signature" in report["secondaries"][0]["error"]
    assert tree_state(f.secondaries[0].data_dir) == before


# --- crafted requests: the receiver's checks one by one -------------------------

@pytest.fixture
def published(signed_fleet):
    f = signed_fleet
    assert f.publish()[0] == 0
    return f, f.receivers[0].url, f.secondaries[0]


def own_id(url: str) -> str:
    """A receiver's own id, as a master learns it: a browse signed for no one in particular."""
    answer = session_from("127.0.0.1").get(f"{url}/browse", timeout=20,
                                           headers=Signer(SECRET.encode()).headers("GET", "/browse"))
    assert answer.status_code == 200, answer.text
    return answer.json()["self"]


def send(url: str, method: str, route: str, body: bytes = b"", content: str | None = None,
         signer: Signer | None = None, headers: dict | None = None, target: str | None = None):
    """A request signed as a master signs it: for the receiver at ``url`` unless ``target``."""
    signer = signer or Signer(SECRET.encode())
    content = content or hashlib.sha256(body).hexdigest()
    signed = signer.headers(method, f"/{route}", content, (headers or {}).get("Content-Range", ""),
                            own_id(url) if target is None else target)
    return session_from("127.0.0.1").request(method, f"{url}/{route}", data=body, timeout=20,
                                             headers={**signed, **(headers or {})})


def commit_body(secondary, **changes) -> bytes:
    state = json.loads((secondary.data_dir / ".esmirror" / "state.json").read_text())
    files = held_files(secondary.data_dir)
    body = {"generation": state["generation"] + 1, "master": state["master"],
            "base": state["digest"], "files": files, **changes}
    return json.dumps(body).encode()


def test_good_signed_request_is_answered(published):
    _, url, _ = published
    answer = send(url, "GET", "manifest")
    assert answer.status_code == 200, answer.text


def test_a_request_signed_for_one_secondary_is_refused_by_another(fleet):
    """Every server holds the same secret: the signature names its target (the secondary's
    own id), so a push captured on its way to one secondary does nothing at another."""
    f = fleet(2, server="gunicorn", secondary_ini=SIGNED, master_ini=SIGNED, start=False)
    for install in (f.master, *f.secondaries):
        write_secret(install)
    for receiver in f.receivers:
        receiver.start()
    assert f.publish()[0] == 0
    one, other = (r.url for r in f.receivers)
    before = tree_state(f.secondaries[1].data_dir)
    body = commit_body(f.secondaries[1], files=[e for e in json.loads(commit_body(f.secondaries[1]))["files"]
                                                if e["path"] != "overviews/basemap.ovr"])
    content = hashlib.sha256(body).hexdigest()
    headers = Signer(SECRET.encode()).headers("POST", "/commit", content, "", own_id(one))
    answer = session_from("127.0.0.1").post(f"{other}/commit", data=body, headers=headers, timeout=20)
    assert answer.status_code == 401, answer.text
    assert "signed for another server" in answer.json()["error"]
    assert tree_state(f.secondaries[1].data_dir) == before
    for route in ("manifest", "commit"):  # no target: only the first browse may go without one
        answer = send(other, "POST" if route == "commit" else "GET", route, body, target="")
        assert answer.status_code == 401 and "signed for another server" in answer.json()["error"]
    # the same commit, signed for its own target, is taken: the refusal was the target's
    assert send(other, "POST", "commit", body).status_code == 200
    assert "overviews/basemap.ovr" not in set_files(f.secondaries[1].data_dir)


def test_tampered_commit_body_is_refused(published):
    f, url, secondary = published
    before = tree_state(secondary.data_dir)
    honest = commit_body(secondary)
    tampered = commit_body(secondary, files=[e for e in json.loads(honest)["files"]
                                             if e["path"] == "catalogs.xml"])
    answer = send(url, "POST", "commit", tampered, content=hashlib.sha256(honest).hexdigest())
    assert answer.status_code == 401, answer.text
    assert "altered" in answer.json()["error"]
    assert tree_state(secondary.data_dir) == before


def test_tampered_batch_is_refused_and_no_blob_is_kept(published):
    _, url, secondary = published
    honest, evil = b"honest content", b"evil content"
    h_sha, e_sha = (hashlib.sha256(x).hexdigest() for x in (honest, evil))
    body = f"{e_sha} {len(evil)}\n".encode() + evil
    before = tree_state(secondary.data_dir)
    answer = send(url, "POST", "blobs", body, content=batch_digest([(h_sha, len(honest))]))
    assert answer.status_code == 401, answer.text
    assert "frame list" in answer.json()["error"]
    assert not (secondary.data_dir / ".esmirror" / "blobs" / e_sha).exists()
    assert tree_state(secondary.data_dir) == before
    # the same batch, honestly signed, is stored: the refusal was the signature's
    answer = send(url, "POST", "blobs", body, content=batch_digest([(e_sha, len(evil))]))
    assert answer.status_code == 201, answer.text


def test_blob_signed_for_another_name_is_refused(published):
    _, url, secondary = published
    data = b"some blob"
    sha = hashlib.sha256(data).hexdigest()
    answer = send(url, "PUT", f"blobs/{sha}", data, content="0" * 64)
    assert answer.status_code == 401, answer.text
    assert not (secondary.data_dir / ".esmirror" / "blobs" / sha).exists()


def test_path_and_query_are_signed(published):
    _, url, secondary = published
    signer = Signer(SECRET.encode())
    headers = signer.headers("GET", "/browse", target=own_id(url))
    answer = session_from("127.0.0.1").get(f"{url}/manifest", headers=headers, timeout=20)
    assert answer.status_code == 401 and "bad signature" in answer.json()["error"]
    sha = held_files(secondary.data_dir)[0]
    route = f"chunks/{sha['sha256']}?path={sha['path']}"
    headers = signer.headers("GET", f"/{route}", target=own_id(url))
    answer = session_from("127.0.0.1").get(f"{url}/{route}x", headers=headers, timeout=20)
    assert answer.status_code == 401 and "bad signature" in answer.json()["error"]


def test_delta_signed_for_another_name_is_refused(published):
    _, url, _ = published
    answer = send(url, "POST", f"delta/{'a' * 64}", b"whatever", content="b" * 64)
    assert answer.status_code == 401, answer.text
    assert "sha256 in its name" in answer.json()["error"]


def test_a_streamed_delta_is_refused_when_signing_is_on(published):
    """A stream's sha256 comes at its end, so there is no digest to sign up front."""
    _, url, _ = published
    answer = send(url, "POST", "delta", b"whatever")
    assert answer.status_code == 401, answer.text
    assert "streamed delta" in answer.json()["error"]


@pytest.mark.parametrize("offset", [-3600, -301, 301, 86400])
def test_timestamp_outside_the_window_is_refused(published, offset):
    _, url, secondary = published
    before = tree_state(secondary.data_dir)
    signer = Signer(SECRET.encode(), clock=lambda: time.time() + offset)
    answer = send(url, "POST", "commit", commit_body(secondary), signer=signer)
    assert answer.status_code == 401, answer.text
    assert "clock" in answer.json()["error"]
    assert tree_state(secondary.data_dir) == before


def test_replayed_request_is_refused_on_every_worker(published):
    _, url, secondary = published
    body = commit_body(secondary, base="0" * 64)  # a valid signature on a commit that fails later
    headers = Signer(SECRET.encode()).headers("POST", "/commit", hashlib.sha256(body).hexdigest(),
                                                target=own_id(url))
    session = session_from("127.0.0.1")
    first = session.post(f"{url}/commit", data=body, headers=headers, timeout=20)
    assert first.status_code == 409, first.text  # got past the signature
    before = tree_state(secondary.data_dir)
    for _ in range(6):  # two gunicorn workers: replays land on both
        again = session_from("127.0.0.1").post(f"{url}/commit", data=body, headers=headers,
                                               timeout=20)
        assert again.status_code == 401, again.text
        assert "replayed" in again.json()["error"]
    assert tree_state(secondary.data_dir) == before


@pytest.mark.parametrize("headers", [
    {},
    {"X-Esmirror-Signature": "00", "X-Esmirror-Timestamp": "x", "X-Esmirror-Nonce": "0" * 32,
     "X-Esmirror-Content-SHA256": "0" * 64},
    {"X-Esmirror-Signature": "00", "X-Esmirror-Timestamp": "1", "X-Esmirror-Nonce": "../../x",
     "X-Esmirror-Content-SHA256": "0" * 64},
    {"X-Esmirror-Signature": "\u00e9" * 64, "X-Esmirror-Timestamp": "1", "X-Esmirror-Nonce": "0" * 32,
     "X-Esmirror-Content-SHA256": "0" * 64},  # (hmac.compare_digest refuses non-ASCII text)
])
def test_unsigned_or_malformed_signature_gets_401(published, headers):
    _, url, secondary = published
    before = tree_state(secondary.data_dir)
    answer = session_from("127.0.0.1").post(f"{url}/commit", data=commit_body(secondary),
                                            headers=headers, timeout=20)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]
    assert tree_state(secondary.data_dir) == before


def test_ip_check_comes_first(published):
    _, url, _ = published
    answer = session_from("127.0.0.2").get(f"{url}/manifest", timeout=20)
    assert answer.status_code == 403


# --- configuration ---------------------------------------------------------------

@pytest.mark.parametrize("content", [None, "short"])
def test_unusable_secret_file_is_a_config_error(tmp_path, content):
    from app import create_app
    from app.core.settings import load_settings

    install = make_install(tmp_path / "s", {**SIGNED, "express_version": VERSION})
    if content is not None:
        write_secret(install, content)
    with pytest.raises(ConfigError, match="shared_secret_file"):
        create_app(load_settings(install.root))
    with pytest.raises(ConfigError, match="shared_secret_file"):
        Signer.from_settings(load_settings(install.root))


def test_master_with_unreadable_secret_exits_2_and_sends_nothing(fleet):
    f = fleet(1, master_ini=SIGNED)
    before = tree_state(f.secondaries[0].data_dir)
    rc, _, out = f.publish()
    assert rc == 2, out
    assert "shared_secret_file" in out
    assert tree_state(f.secondaries[0].data_dir) == before


def test_agent_with_unreadable_secret_does_not_start(fleet):
    """An agent that started with a bad secret looked healthy in status while every publish
    and catch-up failed: it now stops at once, as publish does, naming the file."""
    f = fleet(1, master_ini=SIGNED, start=False)
    rc, _, out = esmirror("agent", "--install-dir", str(f.master.root), timeout=60)
    assert rc == 2 and "shared_secret_file" in out and "esmirror.secret" in out, out
    write_secret(f.master, "short")
    rc, _, out = esmirror("agent", "--install-dir", str(f.master.root), timeout=60)
    assert rc == 2 and "holds 5 bytes" in out, out


def test_nonces_are_pruned_after_three_windows(tmp_path):
    now = [1_000_000.0]
    verifier = Verifier(SECRET.encode(), tmp_path / "nonces", "me", window=10, clock=lambda: now[0])
    signer = Signer(SECRET.encode(), clock=lambda: now[0])
    headers = signer.headers("GET", "/manifest", target="me")
    assert verifier.verify("GET", "/manifest", headers)
    stored = list((tmp_path / "nonces").iterdir())
    old = now[0] - 31
    for path in stored:
        os.utime(path, (old, old))
    now[0] += 61
    verifier.verify("GET", "/manifest", signer.headers("GET", "/manifest", target="me"))
    assert headers["X-Esmirror-Nonce"] not in os.listdir(tmp_path / "nonces")


class LosesFirstAnswer:
    """A proxy on loopback that forwards each request to the receiver but, for the first
    one, drops the receiver's answer and says 503 instead: a response lost on the way
    back after the secondary saw (and recorded) the request's nonce."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.nonces: list[str] = []
        self.answers: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import http.client

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                client.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    more = client.recv(65536)
                    if not more:
                        break
                    data += more
                head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
                self.nonces.append(headers.get("X-Esmirror-Nonce", ""))
                upstream = http.client.HTTPConnection("127.0.0.1", self.target, timeout=10)
                upstream.request(method, path, headers={k: v for k, v in headers.items()
                                                        if k.lower() != "connection"})
                answer = upstream.getresponse()
                body = answer.read()
                upstream.close()
                if len(self.answers) == 0:
                    status, body, ctype = 503, b"lost", "text/plain"
                else:
                    status, ctype = answer.status, answer.getheader("Content-Type", "")
                self.answers.append(answer.status)
                client.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: "
                               f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)

    def close(self) -> None:
        self.sock.close()


def browse_through_a_proxy_that_loses_the_first_answer(f) -> tuple[dict, LosesFirstAnswer]:
    from agent.client import SecondaryClient
    from app.core.express import Secondary
    from app.core.settings import load_settings

    proxy = LosesFirstAnswer(f.receivers[0].port)
    try:
        client = SecondaryClient(Secondary("127.0.0.1", proxy.port), load_settings(f.master.root))
        try:
            return client.browse(), proxy
        finally:
            client.close()
    finally:
        proxy.close()


def test_a_signed_get_whose_answer_was_lost_is_retried_with_a_new_signature(signed_fleet):
    """Resent unchanged, the retry would reuse its nonce and be refused as replayed (401)."""
    info, proxy = browse_through_a_proxy_that_loses_the_first_answer(signed_fleet)
    assert info["express_version"] == VERSION
    assert proxy.answers == [200, 200]  # the secondary answered both attempts
    assert len(set(proxy.nonces)) == 2 and all(proxy.nonces), proxy.nonces


def test_an_unsigned_get_whose_answer_was_lost_is_retried_too(fleet):
    info, proxy = browse_through_a_proxy_that_loses_the_first_answer(fleet(1, server="gunicorn"))
    assert info["express_version"] == VERSION
    assert proxy.answers == [200, 200]
    assert proxy.nonces == ["", ""]  # nothing signed


def test_a_nonce_is_kept_its_whole_window_whatever_the_files_clock(tmp_path):
    """Nonces were pruned by this machine's clock against their files' times: with the
    clock 20 minutes ahead of the filesystem's (a share's server), every nonce was dropped
    at the next prune, and a signed request could be replayed."""
    import time

    from app.core.signing import _PRUNE_EVERY, NonceStore

    store = NonceStore(tmp_path / "nonces", keep=900)
    ahead = time.time() + 1200  # this process's clock, the files' is the real one
    assert store.claim("n1", ahead) is True
    assert store.claim("n1", ahead + _PRUNE_EVERY + 1) is False  # (a prune ran first)
