"""Peers that go silent, or answer a byte at a time: every wait ends, and says why.

requests' timeouts bound each wait for a byte, so a secondary that drips its answer held
`esmirror browse`, `status` and `publish` (and the publish lock) for ever; a manifest
fetched ahead that timed out was asked for again, doubling a 600 s wait; and under
gunicorn a master that went silent mid-body held a worker thread until the receiver
restarted. The limits are shortened here (module constants); the defaults are minutes.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from agent import client as client_module
from agent.demo import make_install, write_sample_set
from app.core.errors import RemoteError
from app.core.express import Secondary
from app.core.settings import load_settings
from conftest import VERSION


def _read_head(conn: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes] | None:
    """An HTTP head and whatever came after it; None when the connection ends first."""
    data = buffered
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return None
        data += piece
        if len(data) > 1 << 20:
            return None
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _content_length(head: bytes) -> int:
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return int(match.group(1)) if match else 0


class SlowPeer:
    """A loopback server thread per connection, stopped (and its connections closed) by stop().

    Without ``upstream`` it answers every request one byte every ``every`` seconds, the
    head included. With ``upstream`` (a real receiver's port) it relays requests, and drips
    only the answers to requests whose first line matches ``drip`` (a pattern, once set);
    a request whose first line matches ``cut`` gets no answer: its connection is closed.
    """

    def __init__(self, upstream: int | None = None, drip: str | None = None, every: float = 0.2,
                 cut: str | None = None) -> None:
        self.upstream, self.every = upstream, every
        self.drip = re.compile(drip.encode()) if drip else None
        self.cut = re.compile(cut.encode()) if cut else None  # requests whose connection it closes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.seen: list[bytes] = []  # the first line of every request
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _send(self, conn: socket.socket, answer: bytes, slowly: bool) -> None:
        if not slowly:
            conn.sendall(answer)
            return
        for i in range(len(answer)):
            if self.stopping.wait(self.every):
                return
            conn.sendall(answer[i:i + 1])

    def _serve(self, conn: socket.socket) -> None:
        buffered = b""
        try:
            while not self.stopping.is_set():
                got = _read_head(conn, buffered)
                if got is None:
                    return
                head, rest = got
                length = _content_length(head)
                while len(rest) < length:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    rest += piece
                body, buffered = rest[:length], rest[length:]
                first = head.split(b"\r\n", 1)[0]
                slowly = bool(self.drip and self.drip.search(first))  # (as the request came)
                self.seen.append(first)
                if self.cut and self.cut.search(first):
                    return  # (as a receiver stopped while it works: no answer at all)
                if self.upstream is None:
                    self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b" " * 1000, True)
                    return
                with socket.create_connection(("127.0.0.1", self.upstream), timeout=60) as up:
                    up.sendall(head + body)
                    answer = _read_head(up)
                    assert answer is not None
                    answer_head, answer_body = answer
                    while len(answer_body) < _content_length(answer_head):
                        answer_body += up.recv(65536)
                self._send(conn, answer_head + answer_body, slowly)
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def slow_peer():
    started: list[SlowPeer] = []

    def start(**kwargs) -> SlowPeer:
        started.append(SlowPeer(**kwargs))
        return started[-1]

    yield start
    for peer in started:
        peer.stop()


def test_a_browse_answered_a_byte_at_a_time_ends_at_its_limit(tmp_path, slow_peer, monkeypatch):
    monkeypatch.setattr(client_module, "BROWSE_TIMEOUT", 2.0)
    peer = slow_peer()
    install = make_install(tmp_path / "m", {"express_version": VERSION})
    client = client_module.SecondaryClient(Secondary("127.0.0.1", peer.port), load_settings(install.root))
    started = time.monotonic()
    with pytest.raises(RemoteError) as failed:
        client.browse()
    client.close()
    assert time.monotonic() - started < 15  # (each byte came in 0.2 s: no read timeout fires)
    assert f"127.0.0.1:{peer.port} took more than 2 s over GET browse" in failed.value.message
    assert "check that server and the network to it" in failed.value.message
    assert failed.value.details.get("kind") == "unreachable"


def test_a_manifest_answered_a_byte_at_a_time_fails_that_secondary_once(
        tmp_path, slow_peer, make_receiver, monkeypatch):
    """The early manifest fetch met the limit: push() must not ask again and wait as long."""
    from agent.fleet import publish

    monkeypatch.setattr(client_module, "ANSWER_DEADLINE", 4.0)
    secondary = make_install(tmp_path / "s", {"allow_push": "127.0.0.1", "express_version": VERSION})
    receiver = make_receiver(secondary)
    peer = slow_peer(upstream=receiver.port)
    master = make_install(tmp_path / "m", {"express_version": VERSION}, [("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    settings = load_settings(master.root)
    mirror = Secondary("127.0.0.1", peer.port)
    first = publish(settings, [mirror])
    assert first.ok, first.secondaries[0].error
    (master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed")
    peer.drip = re.compile(rb"^GET \S*/manifest ")
    before = len(peer.seen)
    started = time.monotonic()
    report = publish(settings, [mirror])
    took = time.monotonic() - started
    [result] = report.secondaries
    assert result.state == "unreachable" and not report.ok
    assert "took more than 4 s over GET manifest" in result.error, result.error
    manifests = [line for line in peer.seen[before:] if b"/manifest " in line]
    assert len(manifests) == 1, peer.seen
    assert took < 30, took


def test_a_silent_sender_frees_the_gunicorn_thread_reading_its_body(monkeypatch):
    """A master whose network dropped mid-upload leaves its connection half open: the
    thread reading that body gives up after IDLE_TIMEOUT instead of waiting for ever."""
    from app import gunicorn_body

    monkeypatch.setattr(gunicorn_body, "IDLE_TIMEOUT", 1.0)
    ours, theirs = socket.socketpair()
    outcome: list[object] = []

    def app(environ, start_response):
        try:
            outcome.append(environ["wsgi.input"].read(1000))
        except TimeoutError as exc:
            outcome.append(exc)
        start_response("200 OK", [])
        return [b""]

    theirs.sendall(b"x" * 500)  # half the body, then nothing
    environ = {"gunicorn.socket": ours, "CONTENT_LENGTH": "1000", "wsgi.input": ours.makefile("rb")}
    worker = threading.Thread(target=gunicorn_body.GunicornBody(app), args=(environ, lambda *a: None),
                              daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=20)
    try:
        assert not worker.is_alive(), "the body's reader still waits"
        assert time.monotonic() - started < 10
        assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    finally:
        theirs.close()
        ours.close()


def test_ctrl_c_stops_a_publish_waiting_on_a_slow_secondary_at_once(tmp_path, slow_peer):
    """Ctrl-C ended the wait only after every push in flight had ended: with one waiting on a
    slow secondary, minutes (the probe's first Ctrl-C did nothing for 35 s)."""
    import signal
    import subprocess
    import sys

    from conftest import REPO

    peer = slow_peer()
    master = make_install(tmp_path / "m", {"express_version": VERSION}, [("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "publish", "--install-dir", str(master.root)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        counter = master.data_dir / ".esmirror" / "master.json"
        # its browse is being answered, and generation 1 is taken
        while not (peer.seen and counter.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert peer.seen and counter.exists(), "the publish never asked"
        # past the counter's own durable write (its folder's flush): a Ctrl-C inside that
        # write stops the publish before it has spent a generation, and so audits none
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - interrupted < 10
        assert proc.returncode == 130, (out, err)
        assert "esmirror: interrupted; a secondary applies a set whole or not at all" in err
        assert "Traceback" not in err
        # the audit log says the publish of generation 1 ended there, not nothing
        last = json.loads((master.data_dir / ".esmirror" / "audit.log").read_text().splitlines()[-1])
        assert (last["event"], last["generation"], last["outcome"]) == ("publish", 1, "interrupted"), last
        assert "stopped on this master (Ctrl-C)" in last["error"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("asker", ["agent", "command line"])
def test_a_catch_up_to_a_slow_secondary_steps_aside_for_a_publish(tmp_path, slow_peer, make_receiver,
                                                                  asker):
    """The agent's catch-up of a slow secondary held the publish lock to its end: a publish
    asked for meanwhile, through the agent or by 'esmirror publish', waited as long (here
    the manifest's answer alone drips for many minutes). The catch-up now steps aside at once."""
    from agentproc import FAST_AGENT, AgentProcess, http, wait_for
    from conftest import esmirror, free_port, set_files

    secondary = make_install(tmp_path / "s", {"allow_push": "127.0.0.1", "express_version": VERSION})
    port = free_port()
    peer = slow_peer(upstream=port, every=0.5)
    master = make_install(tmp_path / "m", {"express_version": VERSION, **FAST_AGENT},
                          [("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    # generation 1 while the secondary is down: the agent will owe it a catch-up
    rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
    assert rc == 1 and report["secondaries"][0]["state"] == "unreachable", out
    master_receiver = make_receiver(master) if asker == "agent" else None
    make_receiver(secondary, port=port)
    peer.drip = re.compile(rb"^GET \S*/manifest ")
    agent = AgentProcess(master, tmp_path / "agent.log").start()
    try:
        wait_for("the catch-up's manifest is answered, slowly",
                 lambda: any(b"/manifest " in line for line in peer.seen), 60)
        peer.drip = None  # what comes next is relayed at full speed
        (master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"generation 2")
        started = time.monotonic()
        if master_receiver is not None:
            request_id = http().post(f"{master_receiver.url}/publish", json={}, timeout=10).json()["id"]

            def finished():
                record = http().get(f"{master_receiver.url}/publish/{request_id}", timeout=10).json()
                return record if record["state"] in ("done", "failed") else None
            record = wait_for("the publish ends", finished, 100)
            assert record["state"] == "done" and record["ok"], record
            assert record["generation"] == 2
        else:
            rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json", timeout=100)
            assert rc == 0 and report["generation"] == 2, out
            assert "a catch-up of the agent's steps aside within seconds); waiting for it to end" in out
        took = time.monotonic() - started
        assert took < 30, took
        assert set_files(secondary.data_dir) == set_files(master.data_dir)
        assert (secondary.data_dir / "indexes" / "tile-1.idx").read_bytes() == b"generation 2"
        wait_for("the agent logs why the catch-up stopped", lambda: "catch-up stops: " in agent.output(), 10)
        assert not list((master.data_dir / ".esmirror").glob("publish-waiting.*"))
    finally:
        agent.stop()
    assert "Traceback" not in agent.output(), agent.output()


def test_each_secondary_records_when_its_own_push_ended(tmp_path, slow_peer, make_receiver):
    """last_push.at was the end of the whole publish for every secondary: a fast one looked
    as if it had been pushed to when the slowest one ended."""
    from conftest import esmirror

    receivers = [make_receiver(make_install(tmp_path / f"s{n}", {"allow_push": "127.0.0.1",
                                                                 "express_version": VERSION}))
                 for n in range(2)]
    peer = slow_peer(upstream=receivers[1].port, drip=r"^POST \S*/commit ", every=0.01)
    master = make_install(tmp_path / "m", {"express_version": VERSION},
                          [("127.0.0.1", receivers[0].port, "none"), ("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
    assert rc == 0, out
    fast, slow = report["secondaries"]
    assert fast["ended"] < slow["ended"], report  # (ISO times: seconds apart)
    rc, status, out = esmirror("status", "--install-dir", str(master.root), "--json")
    assert [row["last_push"]["at"] for row in status["secondaries"]] == [fast["ended"], slow["ended"]]


def test_status_reports_a_secondary_that_never_answers_within_its_timeout(tmp_path, slow_peer,
                                                                          make_receiver):
    """`status` waited out the browse limit (60 s) for a hung receiver or a host dropping
    packets: longer than a monitoring check's own timeout, so the check said nothing useful."""
    from conftest import esmirror

    receiver = make_receiver(make_install(tmp_path / "s", {"allow_push": "127.0.0.1",
                                                           "express_version": VERSION}))
    peer = slow_peer()  # answers a byte every 0.2 s: its browse would take minutes
    master = make_install(tmp_path / "m", {"express_version": VERSION},
                          [("127.0.0.1", receiver.port, "none"), ("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    rc, _, out = esmirror("publish", "--install-dir", str(master.root), "--secondary",
                          f"127.0.0.1:{receiver.port}")
    assert rc == 0, out
    rc, status, out = esmirror("status", "--install-dir", str(master.root), "--json",
                               "--timeout", "5", timeout=30)
    assert rc == 1, out
    good, hung = status["secondaries"]
    assert good["state"] == "in-sync", good
    assert hung["state"] == "unreachable", hung
    assert "no answer within 5 s" in hung["detail"] and "--timeout" in hung["detail"], hung
    rc, _, out = esmirror("status", "--install-dir", str(master.root), "--timeout", "5", timeout=30)
    assert rc == 1 and f"127.0.0.1:{peer.port}: unreachable: since " in out, out
    rc, _, out = esmirror("status", "--install-dir", str(master.root), "--timeout", "0")
    assert rc == 2 and "--timeout" in out, out


def test_a_receiver_that_stops_mid_commit_is_not_blamed_on_tls(tmp_path, slow_peer, make_receiver):
    """A secondary whose web server restarted during a commit (logrotate reloads httpd) was
    reported as 'if that port speaks HTTPS, set its ssl…', though it had answered this push."""
    from conftest import esmirror

    receiver = make_receiver(make_install(tmp_path / "s", {"allow_push": "127.0.0.1",
                                                           "express_version": VERSION}))
    peer = slow_peer(upstream=receiver.port, cut=r"^POST \S*/commit ")
    master = make_install(tmp_path / "m", {"express_version": VERSION}, [("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert "closed the connection without answering: its receiver or web server was stopped or " \
           "restarted while it worked" in error, error
    assert "ssl" not in error and "the set may be live there" in error, error


def test_a_publish_stopped_by_sigterm_records_what_it_did_and_why_the_rest_lag(tmp_path, slow_peer,
                                                                                make_receiver):
    """SIGTERM or SIGHUP (a closed ssh session) killed a publish outright: no audit line, no
    history, and status said the generation 'was published to other secondaries only'."""
    import signal
    import subprocess
    import sys

    from agentproc import audit_lines, wait_for
    from conftest import REPO, esmirror, set_files

    fast, slow = (make_receiver(make_install(tmp_path / f"s{n}", {"allow_push": "127.0.0.1",
                                                                  "express_version": VERSION}))
                  for n in range(2))
    # the push's own look at the slow one answers a byte every 0.2 s; status's look does not
    peer = slow_peer(upstream=slow.port, drip=r"^GET \S*/browse\?digest=recorded")
    master = make_install(tmp_path / "m", {"express_version": VERSION},
                          [("127.0.0.1", fast.port, "none"), ("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    publishing = subprocess.Popen([sys.executable, "-m", "agent", "publish", "--install-dir",
                                   str(master.root)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("the fast secondary holds the set",
                 lambda: (fast.install.data_dir / "catalogs.xml").exists()
                 and set_files(fast.install.data_dir) == set_files(master.data_dir), 60)
        time.sleep(2.0)  # (its answer read: the slow one's look takes minutes, no hurry)
        publishing.send_signal(signal.SIGTERM)
        out, _ = publishing.communicate(timeout=30)
    finally:
        publishing.kill()
    assert publishing.returncode == 130, out
    assert "esmirror: interrupted" in out, out
    rc, status, out = esmirror("status", "--install-dir", str(master.root), "--json", "--timeout", "10")
    assert rc == 1, out
    done, cut = status["secondaries"]
    assert done["state"] == "in-sync", done
    assert cut["state"] == "behind" and "the publish was stopped on this master" in cut["detail"], cut
    assert "other secondaries only" not in cut["detail"], cut
    events = [(e["event"], e.get("outcome"), e.get("reason")) for e in audit_lines(master)]
    assert ("publish", "interrupted", None) in events and ("push", "in-sync", None) in events, events
    assert ("push", "failed", "interrupted") in events, events  # (the one it cut)


def test_a_publish_killed_outright_is_not_said_to_have_reached_other_secondaries(tmp_path, slow_peer,
                                                                                 make_receiver):
    """kill -9 of a publish after it numbered itself: status said the generation 'was
    published to other secondaries only', though it had reached none."""
    from conftest import esmirror

    master, publishing = _stuck_publish(tmp_path, slow_peer, make_receiver)
    publishing.kill()
    publishing.wait(timeout=30)
    rc, status, out = esmirror("status", "--install-dir", str(master.root), "--json", "--timeout", "10")
    assert rc == 1, out
    row = status["secondaries"][0]
    assert row["state"] == "behind", row
    assert "the publish of generation 1 has recorded no push: it is still running, or it was " \
           "killed before it ended" in row["detail"], row


def test_a_publish_under_way_shows_as_publishing_not_as_published_elsewhere(tmp_path, slow_peer,
                                                                            make_receiver):
    """status during a publish said every secondary was behind because 'generation N was
    published to other secondaries only: publish again', a false page at every publish."""
    import signal

    from conftest import esmirror

    master, publishing = _stuck_publish(tmp_path, slow_peer, make_receiver)
    try:
        rc, status, out = esmirror("status", "--install-dir", str(master.root), "--json", "--timeout", "10")
        rc_text, _, text = esmirror("status", "--install-dir", str(master.root), "--timeout", "10")
    finally:
        publishing.send_signal(signal.SIGTERM)
        publishing.wait(timeout=30)
    assert rc == 1 and status["publishing"] is True, out
    row = status["secondaries"][0]
    assert row["state"] == "publishing" and "a publish under way is pushing this master's set to it " \
        "now" in row["detail"], row
    assert "a publish is under way" in text, text


def test_nohup_keeps_a_publish_through_sighup_and_a_stopped_json_publish_says_so(tmp_path, slow_peer,
                                                                                   make_receiver):
    """SIGHUP handling replaced nohup's ignore, so 'nohup esmirror publish &' stopped at
    logout; and a publish --json stopped by a signal printed no JSON document."""
    import json
    import signal
    import subprocess

    master, publishing = _stuck_publish(tmp_path, slow_peer, make_receiver, "--json", prefix=("nohup",),
                                        stdout=subprocess.PIPE)
    try:
        publishing.send_signal(signal.SIGHUP)  # a logout: nohup's ignore holds
        time.sleep(1.0)
        assert publishing.poll() is None
        publishing.send_signal(signal.SIGTERM)
        out, _ = publishing.communicate(timeout=30)
    finally:
        publishing.kill()
    assert publishing.returncode == 130, out
    answer = json.loads(out)
    assert answer["ok"] is False and answer["error"].startswith("interrupted"), answer


def _stuck_publish(tmp_path, slow_peer, make_receiver, *args: str, prefix: tuple[str, ...] = (),
                   stdout=None):
    """A master whose one secondary's publish look (browse?digest=recorded) drips, and
    `esmirror publish` started against it and waited for until it has numbered itself:
    a publish under way for a minute. (master, the Popen); the caller stops it."""
    import json
    import subprocess
    import sys

    from agentproc import wait_for
    from conftest import REPO

    receiver = make_receiver(make_install(tmp_path / "s", {"allow_push": "127.0.0.1",
                                                           "express_version": VERSION}))
    peer = slow_peer(upstream=receiver.port, drip=r"^GET \S*/browse\?digest=recorded")
    master = make_install(tmp_path / "m", {"express_version": VERSION}, [("127.0.0.1", peer.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    record = master.data_dir / ".esmirror" / "master.json"
    publishing = subprocess.Popen([*prefix, sys.executable, "-m", "agent", "publish", "--install-dir",
                                   str(master.root), *args], cwd=REPO, text=True,
                                  stdout=stdout or subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("the publish numbers itself", lambda: record.exists()
                 and json.loads(record.read_text()).get("generation") == 1, 30)
    except BaseException:
        publishing.kill()
        publishing.wait(timeout=30)
        raise
    return master, publishing
