"""Issue 2 end to end: a master publishes to secondaries on real waitress and gunicorn servers."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time

import filelock
import pytest
import requests

from agent.client import ChangedWhileSent, FileSpan
from agent.demo import free_port, make_install, write_sample_set
from conftest import REPO, VERSION, esmirror, session_from, set_files, tree

SERVERS = ["waitress", "gunicorn"]


@pytest.mark.parametrize("server", SERVERS)
def test_first_publish_then_change_add_delete_then_noop(fleet, server):
    f = fleet(2, server=server)
    rc, report, out = f.publish()
    assert rc == 0, out
    assert report["ok"] is True
    assert [s["state"] for s in report["secondaries"]] == ["in-sync", "in-sync"]
    master_set = set_files(f.master.data_dir)
    assert len(master_set) == 8
    for s in f.secondaries:
        assert set_files(s.data_dir) == master_set  # byte-identical, nothing else
        assert not (s.data_dir / "archive").exists() or not any((s.data_dir / "archive").iterdir())

    data = f.master.data_dir
    old_changed = (data / "indexes" / "tile-1.idx").read_bytes()
    old_deleted = (data / "overviews" / "basemap.ovr").read_bytes()
    (data / "indexes" / "tile-1.idx").write_bytes(b"new index content")
    (data / "indexes" / "added.idx").write_bytes(b"an added index")
    (data / "overviews" / "basemap.ovr").unlink()
    rc, report, out = f.publish()
    assert rc == 0, out
    master_set = set_files(data)
    for s in f.secondaries:
        assert set_files(s.data_dir) == master_set
        assert not (s.data_dir / "overviews").exists()  # left empty → removed
        archived = [p for p in (s.data_dir / "archive").rglob("*") if p.is_file()]
        by_name = {p.name: p.read_bytes() for p in archived}
        assert by_name["tile-1.idx"] == old_changed
        assert by_name["basemap.ovr"] == old_deleted

    rc, report, out = f.publish()
    assert rc == 0, out
    for s in report["secondaries"]:
        assert s["state"] == "in-sync"
        assert s["bytes_sent"] == 0 and s["files_sent"] == 0



def test_a_commit_can_say_unchanged_instead_of_listing_the_set_again(fleet):
    """What a no-op publish sends: ``"unchanged": true`` for the set the secondary holds
    (its ``base``), so the whole list is neither sent nor parsed again."""
    f = fleet(1)
    rc, report, out = f.publish()
    assert rc == 0, out
    secondary = f.secondaries[0]
    before = set_files(secondary.data_dir)
    url = f.receivers[0].url
    session = session_from("127.0.0.1")
    info = session.get(f"{url}/browse", timeout=10).json()
    body = {"generation": info["generation"] + 1, "master": info["master"], "base": info["digest"]}

    wrong = session.post(f"{url}/commit", json={**body, "base": "0" * 64, "unchanged": True}, timeout=30)
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["digest"] == info["digest"]  # what the master needs to diff again
    for bad in ({**body, "unchanged": True, "files": []}, {**body, "unchanged": False}):
        answer = session.post(f"{url}/commit", json=bad, timeout=30)
        assert answer.status_code == 400, answer.text
        assert "unchanged" in answer.json()["error"]
    assert session.get(f"{url}/browse", timeout=10).json()["generation"] == info["generation"]

    answer = session.post(f"{url}/commit", json={**body, "unchanged": True}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["digest"] == info["digest"]
    assert session.get(f"{url}/browse", timeout=10).json()["generation"] == info["generation"] + 1
    assert set_files(secondary.data_dir) == before

    # the next no-op publish (generation + 2 on the master) is recorded the same way
    rc, report, out = f.publish()
    assert rc == 0, out
    assert report["secondaries"][0]["state"] == "in-sync"
    assert session.get(f"{url}/browse", timeout=10).json()["generation"] == report["generation"]
    assert set_files(secondary.data_dir) == before

def test_one_secondary_down_fails_only_that_one(fleet):
    f = fleet(2)
    f.receivers[1].stop()
    rc, report, out = f.publish()
    assert rc == 1, out
    first, second = report["secondaries"]
    assert first["state"] == "in-sync" and first["reason"] is None
    assert second["state"] == "unreachable" and second["reason"] == "unreachable"
    assert f"127.0.0.1:{f.receivers[1].port}" in second["error"]
    assert (f"connection refused, nothing listens on port {f.receivers[1].port} there; check that port "
            "in its <Secondary>") in second["error"], second
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)
    assert set_files(f.secondaries[1].data_dir) == {}


def test_secondary_with_other_express_version_is_refused_and_untouched(fleet):
    f = fleet(2, start=False)
    ini = f.secondaries[1].etc_dir / "esmirror.ini"
    ini.write_text(ini.read_text().replace(VERSION, "9.5.2"))
    for r in f.receivers:
        r.start()
    before = tree(f.secondaries[1].data_dir)
    rc, report, out = f.publish()
    assert rc == 1, out
    bad = report["secondaries"][1]
    assert bad["state"] == "refused" and bad["reason"] == "refused"
    assert "9.5.2" in bad["error"] and VERSION in bad["error"]
    assert tree(f.secondaries[1].data_dir) == before
    assert report["secondaries"][0]["state"] == "in-sync"


def test_stranger_gets_403_on_every_push_endpoint(fleet):
    f = fleet(1)
    rc, _, out = f.publish()
    assert rc == 0, out
    secondary = f.secondaries[0]
    before = tree(secondary.data_dir)
    url = f.receivers[0].url
    stranger = session_from("127.0.0.2")
    sha = "0" * 64
    calls = [("GET", "browse", None), ("GET", "manifest", None),
             ("PUT", f"blobs/{sha}", b"x"), ("POST", "blobs", f"{sha} 1\nx".encode()),
             ("POST", "commit", b'{"generation": 9, "master": "x", "base": "", "files": []}')]
    for method, route, body in calls:
        answer = stranger.request(method, f"{url}/{route}", data=body, timeout=10)
        assert answer.status_code == 403, (route, answer.text)
        assert "127.0.0.2" in answer.json()["error"]
        assert "allow_push" in answer.json()["error"]
    assert tree(secondary.data_dir) == before
    # the same routes from the allowed address work: the refusal was about the address
    assert session_from("127.0.0.1").get(f"{url}/browse", timeout=10).status_code == 200


def test_dry_run_sends_nothing(fleet):
    f = fleet(1)
    rc, report, out = f.publish("--dry-run")
    assert rc == 0, out
    assert report["secondaries"][0]["state"] == "dry-run"
    assert report["secondaries"][0]["files_sent"] == 8
    assert report["generation"] == 1 and report["dry_run"] is True  # the number it would take (and takes none)
    assert set_files(f.secondaries[0].data_dir) == {}
    rc, report, out = f.publish()
    assert rc == 0 and report["generation"] == 1 and report["dry_run"] is False, out
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed")
    before = set_files(f.secondaries[0].data_dir)
    rc, report, out = f.publish("--dry-run")  # what would go: the one changed file
    assert rc == 0 and (report["secondaries"][0]["files_sent"], report["secondaries"][0]["bytes_sent"]) == (1, 7), out
    rc, report, out = f.publish("--dry-run", "--full")  # --full: everything again
    assert rc == 0 and report["secondaries"][0]["files_sent"] == 8, out
    rc, _, text = esmirror("publish", "--install-dir", str(f.master.root), "--dry-run")
    assert rc == 0 and "dry run: nothing was sent" in text and "in sync" not in text, text
    assert text.startswith("dry run of generation 2: "), text
    assert set_files(f.secondaries[0].data_dir) == before


def test_full_resends_every_byte(fleet):
    f = fleet(1)
    assert f.publish()[0] == 0
    rc, report, out = f.publish("--full")
    assert rc == 0, out
    total = sum(os.path.getsize(f.master.data_dir / p) for p in set_files(f.master.data_dir))
    assert report["secondaries"][0]["bytes_sent"] == total
    # what it sent again is live already: no second copy of the set waits in the blob store
    blobs = f.secondaries[0].data_dir / ".esmirror" / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()] if blobs.exists() else True


def test_secondary_option_limits_the_push(fleet):
    f = fleet(2)
    rc, report, out = f.publish("--secondary", f"127.0.0.1:{f.receivers[1].port}")
    assert rc == 0, out
    assert len(report["secondaries"]) == 1
    assert set_files(f.secondaries[0].data_dir) == {}
    assert set_files(f.secondaries[1].data_dir) == set_files(f.master.data_dir)
    rc, _, out = f.publish("--secondary", "elsewhere.example:80")
    assert rc == 2 and "not in the Mirrors list" in out


def test_demo_exits_0_and_shows_both_in_sync():
    rc, _, out = esmirror("demo", timeout=180)
    assert rc == 0, out
    assert out.count("identical to the master") == 2
    assert "both secondaries in sync" in out


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_demo_stopped_by_a_signal_leaves_no_receiver_and_no_folder(signum):
    """SIGTERM or SIGHUP (a closed terminal) left the demo's two receivers running, in
    sessions of their own, for ever, and its folder behind."""
    import signal

    demo = subprocess.Popen([sys.executable, "-m", "agent", "demo"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for _ in range(10):  # (bounded: the demo prints its folder, the master, 2 receivers)
            lines.append(demo.stdout.readline())
            if lines[-1].startswith("secondary") and "receiving at" in lines[-1]:
                break
        base = lines[0].removeprefix("demo in ").strip()
        assert base and os.path.isdir(base), lines
        demo.send_signal(getattr(signal, signum))
        out = lines + [demo.communicate(timeout=60)[0]]
    finally:
        demo.kill()
    assert demo.returncode == 130, out
    assert not os.path.exists(base), out
    still = subprocess.run(["pgrep", "-f", base], capture_output=True, text=True).stdout.split()
    assert not still, still


def test_bodies_never_exceed_the_secondary_limit_large_files_go_in_parts(fleet):
    # max_upload_bytes stands in for IIS's 4 GiB − 1 cap: a 3 MiB index must travel in parts
    f = fleet(1, secondary_ini={"max_upload_bytes": "1M"})
    rc, report, out = f.publish()
    assert rc == 0, out
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)
    big = f.master.data_dir / "indexes" / "orthos-2024.idx"
    assert big.stat().st_size > 1024 * 1024
    assert report["secondaries"][0]["files_sent"] == 8


def test_a_server_that_writes_bodies_to_disk_first_gets_large_files_in_parts(fleet, make_receiver):
    """waitress (the embedded server, and IIS's) writes a whole body to a temp file before
    the app stores it: on one disk a 5 GiB file needed 7.9 GiB at the peak, and a file
    over half the free space could never be pushed. It asks for parts; gunicorn does not."""
    from agent.push import MAX_PART, file_part_size
    from app.peer import SPOOLED_PART_BYTES

    f = fleet(1, start=False)
    asked = {}
    for server in ("waitress", "gunicorn"):
        receiver = make_receiver(f.secondaries[0], server=server)
        asked[server] = requests.get(f"{receiver.url}/browse", timeout=30).json()
        receiver.stop()
    assert asked["waitress"]["part_bytes"] == SPOOLED_PART_BYTES == 256 * 1024**2
    assert "part_bytes" not in asked["gunicorn"]
    assert file_part_size(asked["waitress"]) == SPOOLED_PART_BYTES
    assert file_part_size(asked["gunicorn"]) == MAX_PART
    assert file_part_size({**asked["waitress"], "max_upload_bytes": 2 * 1024**2}) == 2 * 1024**2


@pytest.mark.parametrize("through", ["sendfile", "TLS-style reads"])
def test_a_file_range_goes_out_exactly_and_a_file_cut_short_is_named(tmp_path, through):
    """Large files leave the master as FileSpans (sendfile over plain HTTP, reads over
    TLS): the range sent is the range asked for, and a file that shrank since it was
    scanned is an error that says so, not a short body the secondary waits on."""
    data = os.urandom(300_000)
    index = tmp_path / "orthos.idx"
    index.write_bytes(data)
    plain, peer = socket.socketpair()
    # a socket.socket subclass, as ssl.SSLSocket is, takes the read-and-send path
    sock = plain if through == "sendfile" else _NotPlainSocket(fileno=plain.detach())
    got = bytearray()
    reader = threading.Thread(target=lambda: _read_all(peer, got), daemon=True)
    reader.start()
    try:
        FileSpan(index, 1000, 250_000).send_to(sock)
        with pytest.raises(ChangedWhileSent, match=r"orthos.idx changed while being sent \(bytes "
                                                   r"201000-300999 were asked for, 99000 were there\)"):
            FileSpan(index, 201_000, 100_000).send_to(sock)
    finally:
        sock.close()
        reader.join(10)
        peer.close()
    assert not reader.is_alive()
    assert bytes(got) == data[1000:251_000] + data[201_000:]


def test_a_large_file_cut_short_while_it_is_sent_says_which_file_and_what_to_do(tmp_path):
    """The file shrinks while sendfile is pushing it to a (slow) secondary: the publish
    names the file and says to publish again, instead of a bare connection error; and it
    is not the secondary's fault (it used to end "unreachable", sending ops after the
    network)."""
    from agent.client import SecondaryClient
    from app.core.express import Secondary
    from app.core.settings import load_settings

    index = tmp_path / "orthos.idx"
    index.write_bytes(os.urandom(32 * 1024 * 1024))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    body_started, cut = threading.Event(), threading.Event()

    def slow_secondary() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            seen = b""
            while b"\r\n\r\n" not in seen or len(seen) < 65536:  # headers and 64 KiB of body
                seen += conn.recv(65536)
            body_started.set()
            cut.wait(30)
            while conn.recv(1 << 20):  # until the master gives up on this body
                pass

    server = threading.Thread(target=slow_secondary, daemon=True)
    server.start()
    port = listener.getsockname()[1]
    client = SecondaryClient(Secondary("127.0.0.1", port),
                             load_settings(make_install(tmp_path / "master").root))
    try:
        def cut_when_sending() -> None:
            body_started.wait(30)
            os.truncate(index, 1024 * 1024)
            cut.set()

        cutter = threading.Thread(target=cut_when_sending, daemon=True)
        cutter.start()
        with pytest.raises(ChangedWhileSent) as caught:  # (not "unreachable": nothing is wrong there)
            client.put_blob("0" * 64, index, 32 * 1024 * 1024, 64 * 1024 * 1024)
        cutter.join(30)
    finally:
        client.close()
        server.join(30)
        listener.close()
    message = str(caught.value)
    assert f"{index} changed while being sent" in message, message
    assert "publish again once it is written" in message
    assert not server.is_alive()


class _NotPlainSocket(socket.socket):
    pass


def _read_all(sock: socket.socket, into: bytearray) -> None:
    while block := sock.recv(65536):
        into += block


def test_a_failing_master_reload_is_reported_at_once_while_a_secondary_stays_silent(tmp_path):
    """Pushes may browse their secondaries while the master reloads and scans. When the
    master's own step fails, publish must exit 1 at once, not wait for a secondary
    that takes connections but never answers (a hung server: 600 s read timeout), and
    must have sent it nothing but reads."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        master = make_install(tmp_path / "master", {"express_version": VERSION,
                                                    "reload_command": "sh -c 'exit 4'"},
                              [("127.0.0.1", port, "none")])
        write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
        started = time.monotonic()
        rc, _, out = esmirror("publish", "--install-dir", str(master.root), "--json", timeout=60)
        took = time.monotonic() - started
        assert rc == 1, out
        assert "reload_command failed on this master; nothing was sent" in out
        assert took < 20, f"took {took:.0f} s: the publish waited for the silent secondary"
        listener.settimeout(1)
        for _ in range(4):  # every connection it made (at most a few) carried one GET browse
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                break
            with connection:
                connection.settimeout(5)
                request = connection.recv(65536)
                assert request.startswith(b"GET /lizardtech/mirror/browse?digest=recorded "), request[:200]


def test_a_web_server_page_in_front_is_named_as_such_not_dumped(tmp_path):
    """httpd or IIS refusing a route answers with its own HTML page: publish says who
    answered and shows the page's title, not the HTML."""
    page = (b'<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n'
            b"<title>403 Forbidden</title>\n</head><body>\n<h1>Forbidden</h1>\n"
            b"<p>You don't have permission to access this resource.</p>\n</body></html>\n")

    answer = [403]

    class Httpd(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(answer[0])
            self.send_header("Content-Type", "text/html; charset=iso-8859-1")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Httpd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        master = make_install(tmp_path / "master", {"express_version": VERSION},
                              [("127.0.0.1", server.server_port, "none")])
        write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
        rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
        assert rc == 1, out
        error = report["secondaries"][0]["error"]
        assert report["secondaries"][0]["state"] == "refused", error
        assert "answered 403 to GET browse: '403 Forbidden': the web server" in error, error
        assert "not the esmirror receiver" in error and "<" not in error, error
        assert "rules and limits" in error, error
        # the same page for other answers says what those usually mean there
        for answer[0], meaning in [(404, "nothing is mounted at /lizardtech/mirror there"),
                                   (500, "the receiver failed before it could answer"),
                                   (503, "could not get an answer from the receiver behind it")]:
            rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
            assert rc == 1, out
            error = report["secondaries"][0]["error"]
            assert f"answered {answer[0]} to GET browse" in error and meaning in error, error
            assert "rules and limits" not in error, error
            # the advice is ours and whole: only the page's words are cut short
            assert "…" not in error and error.endswith(("esmirror check there)",
                                                        "and esmirror check on that server",
                                                        "Its log says why")), error
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_collector_is_back_on_after_a_command_start_up_even_one_that_failed():
    """start_up() turns the cyclic collector off while a command imports; the long-running
    agent goes through it too, so it must never stay off (memory would only grow)."""
    import gc

    from agent.cli import start_up

    assert gc.isenabled()
    with start_up():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ImportError):
        with start_up():
            import agent.no_such_module  # noqa: F401
    assert gc.isenabled()


def test_a_large_file_reports_its_bytes_as_they_go_not_once_at_the_end(tmp_path):
    """A 150 MiB index took a progress bar from 0 to done in one jump (and the agent's
    GET publish/<id> showed no bytes for a minute on a slow link): sendfile now goes in
    PROGRESS_BLOCK pieces, each told as it leaves."""
    import socket
    import threading

    from agent.client import PROGRESS_BLOCK, FileSpan

    path = tmp_path / "big.idx"
    path.write_bytes(os.urandom(2 * PROGRESS_BLOCK + 12345))
    sender, receiver = socket.socketpair()
    got = bytearray()

    def drain() -> None:
        while data := receiver.recv(1 << 20):
            got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    told: list[int] = []
    try:
        FileSpan(path, 0, path.stat().st_size, told.append).send_to(sender)
    finally:
        sender.close()
        reader.join(timeout=30)
        receiver.close()
    assert told == [PROGRESS_BLOCK, PROGRESS_BLOCK, 12345]
    assert bytes(got) == path.read_bytes()


def test_a_publish_looks_at_the_recorded_digest_and_still_repairs_a_drifted_secondary(fleet):
    """A publish's first look (browse?digest=recorded) takes the digest the secondary's last
    commit recorded, without scanning its files. A secondary edited by hand since still
    gets repaired: its commit sees the drift, answers 409, and the master diffs again."""
    f = fleet(1)
    assert f.publish()[0] == 0
    url = f.receivers[0].url
    edited = f.secondaries[0].data_dir / "indexes" / "tile-2.idx"
    edited.write_bytes(b"edited by hand")
    looked = requests.get(f"{url}/browse", params={"digest": "recorded"}, timeout=30).json()
    scanned = requests.get(f"{url}/browse", timeout=30).json()
    assert looked["drift"] is None and scanned["drift"] is True
    assert looked["digest"] != scanned["digest"]
    state = json.loads((f.secondaries[0].data_dir / ".esmirror" / "state.json").read_text())
    assert looked["digest"] == state["digest"]
    rc, report, out = f.publish("--dry-run")
    assert rc == 0 and report["secondaries"][0]["files_sent"] == 1, out  # the dry run still diffs
    rc, report, out = f.publish()
    assert rc == 0, out
    assert report["secondaries"][0]["files_sent"] == 1, report
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)


def test_a_set_that_leaves_out_catalogs_xml_is_never_sent(fleet):
    """exclude = catalogs.xml (or catalogs.xml a symlink): the master checked the file, but
    the set it would send has none, which every secondary refuses. Refused here, at once."""
    f = fleet(1, master_ini={"exclude": "catalogs.xml"})
    rc, report, out = f.publish()
    assert rc == 1, out
    assert "catalogs.xml is not part of the set" in out and "include/exclude" in out, out
    assert set_files(f.secondaries[0].data_dir) == {}
    assert not (f.master.data_dir / ".esmirror" / "master.json").exists()  # no generation spent


@pytest.mark.parametrize("value, advice", [
    ("overviews/", "write 'overviews/**'"),
    ("/indexes/**", "without a leading / or ./ (write 'indexes/**')"),
    ("./indexes/**", "without a leading / or ./ (write 'indexes/**')"),
    ("indexes\\tile-0.idx", "separate folders with /"),
])
def test_glob_forms_that_could_only_match_nothing_are_refused_with_the_right_form(fleet, value, advice):
    f = fleet(1, master_ini={"include": value}, start=False)
    rc, _, out = f.publish()
    assert rc == 2, out
    assert "bad value for include" in out and advice in out, out


@pytest.mark.parametrize("which", ["indexes/tile-1.idx", "indexes/orthos-2024.idx"])
def test_a_file_changed_after_the_scan_fails_its_push_naming_the_file(fleet, which):
    """The secondary refuses the bytes (they hash to another name) with a 400 naming only a
    hash prefix; the master knows the file, and now says which (a small file in a batch, a
    large one on its own)."""
    from agent.fleet import master_hash_cache, master_identity
    from agent.push import LocalSet, push
    from app.core.express import Secondary
    from app.core.manifest import scan
    from app.core.settings import load_settings

    f = fleet(1)
    settings = load_settings(f.master.root)
    scanned = scan(settings.data_dir, master_hash_cache(settings), settings.include, settings.exclude)
    mine = master_identity(settings)
    local = LocalSet(scanned.manifest, settings.data_dir, 1, mine["self"])
    changed = f.master.data_dir / which
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: written while the publish was under way
    changed.write_bytes(bytes(data))
    result = push(Secondary("127.0.0.1", f.receivers[0].port), settings, local, mine)
    assert result.state == "failed", result
    assert "answered 400" in result.error and f"(on this master: {which}; if it was being written, " \
        "publish again once it is written)" in result.error, result.error
    assert set_files(f.secondaries[0].data_dir) == {}


def test_a_folder_behind_a_symlink_on_the_master_is_not_removed_from_secondaries_without_force(fleet, tmp_path):
    """An admin moves overviews/ to another disk and symlinks it back: the set skips the
    symlink (as it must), and every secondary's overviews/ was archived away, the publish
    saying 'all in sync' with one warning among others."""
    from agentproc import FAST_AGENT, AgentProcess, wait_for

    f = fleet(1, master_ini=FAST_AGENT)
    assert f.publish()[0] == 0
    secondary = f.secondaries[0].data_dir
    held = sorted(p for p in set_files(secondary) if p.startswith("overviews/"))
    assert held
    moved = tmp_path / "bigdisk" / "overviews"
    moved.parent.mkdir()
    (f.master.data_dir / "overviews").rename(moved)
    os.symlink(moved, f.master.data_dir / "overviews")
    rc, report, out = f.publish()
    assert rc == 1, out
    [result] = report["secondaries"]
    assert result["state"] == "failed" and result["bytes_sent"] == 0, result
    assert f"overviews ({len(held)} file" in result["error"], result["error"]
    assert "Publishing would remove them there; nothing was sent" in result["error"]
    assert sorted(p for p in set_files(secondary) if p.startswith("overviews/")) == held
    # nor does the agent's catch-up of that secondary remove them (it did, within a second)
    agent = AgentProcess(f.master, tmp_path / "agent.log").start()
    try:
        def tried_again():
            rc, status, _ = esmirror("status", "--install-dir", str(f.master.root), "--json")
            return status["secondaries"][0]["failed_tries"] >= 3
        wait_for("the agent tries a catch-up, twice", tried_again, 60)
    finally:
        agent.stop()
    assert sorted(p for p in set_files(secondary) if p.startswith("overviews/")) == held
    rc, report, out = f.publish("--force")  # the admin means it: they go to the archive
    assert rc == 0, out
    assert not [p for p in set_files(secondary) if p.startswith("overviews/")]
    assert set_files(secondary) == set_files(f.master.data_dir)


ISERV_NS = '<ImageServer xmlns="http://www.lizardtech.com/iserv">'


def _in_namespace(text: str) -> bytes:
    return text.replace("<ImageServer>", ISERV_NS).encode()


def _utf16_broken(text: str) -> bytes:  # Notepad's "Unicode", and a tag left open
    return text.replace("</ImageServer>", "<Broken></ImageServer>").encode("utf-16")


def _prefixed_broken(text: str) -> bytes:
    return (text.replace("<ImageServer>", '<ImageServer xmlns:i="http://www.lizardtech.com/iserv">')
            .replace("Mirrors>", "i:Mirrors>").replace("<Secondary", "<i:Secondary")
            .replace("</ImageServer>", "<Broken></ImageServer>").encode())


@pytest.mark.parametrize("saved", [str.encode, _in_namespace, _utf16_broken, _prefixed_broken],
                         ids=["plain", "default-namespace", "utf-16-broken", "prefixed-broken"])
def test_a_promoted_secondary_refuses_its_old_master(fleet, saved):
    """The master dies, a secondary is promoted (Mirrors added to its iserv-cfg.xml) and
    edited; the old master comes back and publishes: it overwrote the new master's set
    and reported it in sync. It still did when the promoted server's iserv-cfg.xml had a
    default namespace (xmlns= on the root), or was UTF-16 or used a prefix (<i:Mirrors>)
    and did not parse."""
    f = fleet(1)
    assert f.publish()[0] == 0
    promoted = f.secondaries[0]
    cfg = promoted.etc_dir / "iserv-cfg.xml"
    cfg.write_bytes(saved(cfg.read_text().replace("<ImageManager/>", '<ImageManager/>\n  <Mirrors>\n'
                                                  '    <Secondary host="192.0.2.7" port="8080"/>\n'
                                                  '  </Mirrors>')))
    (promoted.data_dir / "indexes" / "new-master-only.idx").write_bytes(b"the new master's own")
    before = set_files(promoted.data_dir)
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"the old master again")
    rc, report, out = f.publish()
    assert rc == 1, out
    [result] = report["secondaries"]
    assert result["state"] == "refused", result
    if saved in (_utf16_broken, _prefixed_broken):  # (a file that does not parse is named as such)
        assert "does not parse" in result["error"] and "counts as a master" in result["error"], result
    else:
        assert "is a master itself (its iserv-cfg.xml lists Mirrors) and takes no pushes" in result["error"]
    assert set_files(promoted.data_dir) == before
    info = requests.get(f"{f.receivers[0].url}/browse", timeout=30).json()
    assert info["role"] == "master"
    # a commit that skips the look (an older agent, a script) is refused there too
    answer = requests.post(f"{f.receivers[0].url}/commit", timeout=30, json={
        "generation": 9, "master": info["master"], "base": info["digest"], "unchanged": True})
    assert answer.status_code == 409 and "this server is a master" in answer.json()["error"], answer.text
    assert set_files(promoted.data_dir) == before


def test_a_master_whose_iserv_cfg_has_a_default_namespace_publishes(fleet):
    """<ImageServer xmlns="http://www.lizardtech.com/iserv">: publish said "has no <Mirrors>
    element: this server is not a master"."""
    f = fleet(1)
    cfg = f.master.etc_dir / "iserv-cfg.xml"
    cfg.write_bytes(_in_namespace(cfg.read_text()))
    rc, report, out = f.publish()
    assert rc == 0, out
    assert [s["state"] for s in report["secondaries"]] == ["in-sync"]
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)


def test_a_master_restored_from_a_backup_continues_from_its_secondaries_generation(fleet, tmp_path):
    """A master's var/data restored from a backup has an older generation counter than its
    secondaries, which refuse an older generation from it (409): every publish failed, and
    the agent retried for ever, until someone published as many times as the backup was old."""
    f = fleet(2)
    first, second = (f"127.0.0.1:{r.port}" for r in f.receivers)
    assert f.publish()[0] == 0
    backup = tmp_path / "backup"
    shutil.copytree(f.master.data_dir, backup, symlinks=True)  # generation 1, ledger and all
    for n, targets in ((2, ()), (3, ("--secondary", second)), (4, ("--secondary", second))):
        (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"generation %d" % n)
        assert f.publish(*targets)[0] == 0
    shutil.rmtree(f.master.data_dir)
    shutil.copytree(backup, f.master.data_dir, symlinks=True)
    (f.master.data_dir / "indexes" / "tile-2.idx").write_bytes(b"after the restore")
    # the first secondary's browse is in before the publish numbers itself: it holds 2, so 3;
    # the second, pushed after it, holds 4 and refuses 3, saying what happened
    rc, report, out = f.publish("--max-parallel", "1")
    assert rc == 1, out
    assert report["generation"] == 3
    states = {f"{r['host']}:{r['port']}": (r["state"], r["error"]) for r in report["secondaries"]}
    assert states[first] == ("in-sync", None)
    assert states[second][0] == "failed" and "this master's generation counter is behind that " \
        "server's (4): was its var/data restored from a backup? The next publish continues from 5" \
        in states[second][1], states
    rc, report, out = f.publish()
    assert rc == 0 and report["generation"] == 5, out
    assert set_files(f.secondaries[1].data_dir) == set_files(f.master.data_dir)


def test_a_secondary_seeded_with_the_masters_own_state_is_refused_saying_why(fleet):
    """A new secondary seeded with 'cp -a' of the master's var/data, .esmirror/ included,
    took the master's own id: its page showed the master's history and agent, and a push
    to it went on as if nothing were wrong."""
    f = fleet(1)
    seeded = f.secondaries[0]
    assert f.publish()[0] == 0  # (the master's state now holds its id, ledger, history)
    f.receivers[0].stop()
    shutil.rmtree(seeded.data_dir)
    shutil.copytree(f.master.data_dir, seeded.data_dir)
    f.receivers[0].start()
    rc, report, out = f.publish()
    assert rc == 1, out
    [result] = report["secondaries"]
    assert result["state"] == "refused" and "has this master's own id" in result["error"], result
    assert "Delete var/data/.esmirror/self-id on 127.0.0.1" in result["error"]
    f.receivers[0].stop()
    (seeded.data_dir / ".esmirror" / "self-id").unlink()
    f.receivers[0].start()
    assert f.publish()[0] == 0


def test_a_large_file_cut_short_in_parts_resumes_where_it_stopped(fleet):
    """The secondary kept the parts of a file whose push died (.partial, 6 hours), but the
    master always started again at byte 0, and the secondary then dropped what it had."""
    f = fleet(1, secondary_ini={"max_upload_bytes": "1M"})  # the 3 MiB index travels in 1 MiB parts
    receiver, secondary = f.receivers[0], f.secondaries[0]
    receiver.stop()
    receiver.env = {"ESMIRROR_CRASH_AT": "upload-part:1"}  # dies once the first part is written
    receiver.start()
    assert f.publish()[0] == 1
    receiver.stop()
    receiver.env = None
    receiver.start()
    held = requests.get(f"{receiver.url}/manifest", timeout=30).json()
    big = f.master.data_dir / "indexes" / "orthos-2024.idx"
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    assert held["partial"] == {sha: 1024 * 1024}, held["partial"]
    rc, report, out = f.publish()
    assert rc == 0, out
    sizes = {hashlib.sha256((f.master.data_dir / p).read_bytes()).hexdigest(): (f.master.data_dir / p).stat().st_size
             for p in set_files(f.master.data_dir)}
    expected = sum(size for s, size in sizes.items() if s not in held["uploaded"]) - 1024 * 1024
    assert report["secondaries"][0]["bytes_sent"] == expected, (report, expected)
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def test_a_mirrors_entry_that_leads_back_to_the_master_itself_is_named_as_such(fleet, make_receiver):
    """The master's own receiver listed in its Mirrors was refused as 'copied from this
    master: delete its self-id', advice that, followed, broke the whole fleet."""
    f = fleet(1)
    own = make_receiver(f.master)
    cfg = f.master.etc_dir / "iserv-cfg.xml"
    cfg.write_text(cfg.read_text().replace("</Mirrors>", f'<Secondary host="127.0.0.1" port="{own.port}"/></Mirrors>'))
    rc, report, out = f.publish()
    assert rc == 1, out
    mine = next(r for r in report["secondaries"] if r["port"] == own.port)
    assert mine["state"] == "refused" and "is this master itself" in mine["error"], mine
    assert "self-id" not in mine["error"]
    other = next(r for r in report["secondaries"] if r["port"] != own.port)
    assert other["state"] == "in-sync", other


def test_a_master_whose_iserv_cfg_is_broken_still_takes_no_pushes(fleet):
    """A promoted secondary with a Mirrors list in an iserv-cfg.xml that no longer parses
    (one tag left open) was taken for a secondary: the old master's publish overwrote it."""
    f = fleet(1)
    assert f.publish()[0] == 0
    promoted = f.secondaries[0]
    cfg = promoted.etc_dir / "iserv-cfg.xml"
    cfg.write_text('<?xml version="1.0"?>\n<ImageServer>\n  <ImageManager>\n  <Mirrors>\n'
                   '    <Secondary host="192.0.2.7"/>\n  </Mirrors>\n</ImageServer>\n')
    before = set_files(promoted.data_dir)
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"the old master again")
    rc, report, out = f.publish()
    assert rc == 1 and report["secondaries"][0]["state"] == "refused", out
    assert set_files(promoted.data_dir) == before
    # said as it is: a broken file there, not only 'a master itself' (a secondary whose
    # iserv-cfg.xml an admin broke was taken for a promoted one)
    error = report["secondaries"][0]["error"]
    assert f"takes no pushes: {cfg} does not parse (" in error, error
    assert "counts as a master and takes no pushes until that file is fixed" in error, error
    # a Mirrors only in a comment of a broken file is no Mirrors
    cfg.write_text('<?xml version="1.0"?>\n<ImageServer>\n  <ImageManager>\n'
                   '  <!-- <Mirrors><Secondary host="192.0.2.7"/></Mirrors> -->\n</ImageServer>\n')
    assert f.publish()[0] == 0


def test_a_resumed_upload_follows_where_the_secondary_says_it_stands(fleet):
    """The master resumes from the size its look found; if more (or less) arrived since,
    the secondary answers 409 with resume_from, and the master goes on from there."""
    from agent.client import SecondaryClient
    from app.core.express import Secondary
    from app.core.settings import load_settings

    f = fleet(1, secondary_ini={"max_upload_bytes": "1M"})
    big = f.master.data_dir / "indexes" / "orthos-2024.idx"
    data = big.read_bytes()
    sha, mib = hashlib.sha256(data).hexdigest(), 1024 * 1024
    url = f"{f.receivers[0].url}/blobs/{sha}"
    for start in (0, mib):  # two parts arrived: 2 MiB stand there
        answer = requests.put(url, data=data[start:start + mib], timeout=30, headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + mib - 1}/{len(data)}"})
        assert answer.status_code == 202, answer.text
    sent: list[int] = []
    client = SecondaryClient(Secondary("127.0.0.1", f.receivers[0].port), load_settings(f.master.root))
    try:
        client.put_blob(sha, big, len(data), mib, sent.append, start=mib)  # its look said 1 MiB
    finally:
        client.close()
    # the part it sent from 1 MiB was refused (its bytes had gone: no 100-continue), then
    # only the rest after the 2 MiB went
    assert sent == [mib, len(data) - 2 * mib], sent
    stored = requests.get(f"{f.receivers[0].url}/manifest", timeout=30).json()
    assert sha in stored["uploaded"] and stored["partial"] == {}, stored


def test_output_that_cannot_be_written_never_turns_a_publish_into_a_failure(fleet):
    """A reader gone (``| true``, ``| head``), a full disk behind stdout, or a stream
    cron closed: the publish runs and exits with its own code; only a real write error
    is said, once, on stderr."""
    f = fleet(1)
    catalogs = f.master.data_dir / "catalogs.xml"
    cli = f"{shlex.quote(sys.executable)} -m agent"
    master = shlex.quote(str(f.master.root))
    for n, (line, said) in enumerate([
            (f"{cli} publish --install-dir {master} | true", ""),
            (f"PYTHONIOENCODING=ascii {cli} publish --json --install-dir {master} | true", ""),
            (f"{cli} publish --json --install-dir {master} >/dev/full",
             "cannot write to standard output: No space left on device; the command itself ran"),
            (f"{cli} publish --install-dir {master} >/dev/null 2>&-", ""),
            (f"{cli} publish --install-dir {master} >&-", "")]):
        catalogs.write_text(catalogs.read_text() + f"<!-- {n} -->\n", encoding="utf-8")
        done = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert done.returncode == 0, (line, done.stderr)
        assert done.stderr.strip() == (f"esmirror: {said} (its exit code says how it went)" if said else ""), \
            (line, done.stderr)
        assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir), line


def test_a_receiver_whose_python_encodes_names_as_ascii_says_so_instead_of_failing_500(fleet):
    """mod_wsgi's Python under Debian's LANG=C encodes file names as ASCII (the python
    command would switch to UTF-8; an embedded one does not). A set with é in a name or
    a catalog Path got 'internal error' on every push; now the 503 and browse say why
    and what to set, and an ASCII set still goes through."""
    ascii_env = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    f = fleet(1, start=False)
    (f.secondaries[0].data_dir / "notes-é.txt").write_text("an admin's")  # outside the set
    f.receivers[0].env = ascii_env
    f.receivers[0].start()
    catalogs = f.master.data_dir / "catalogs.xml"
    catalogs.write_text(catalogs.read_text().replace("/dem</Path>", "/dém</Path>"), encoding="utf-8")
    rc, report, out = f.publish()
    assert rc == 0, out  # (ASCII names; the catalog Path only warns)
    assert any("cannot be checked" in w and "C.UTF-8" in w for w in report["secondaries"][0]["warnings"]), report
    (f.master.data_dir / "indexes" / "café.idx").write_bytes(b"x")
    rc, report, out = f.publish()
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert "answered 503" in error and "encodes file names as ascii" in error, error
    assert "cannot write 'indexes/café.idx'" in error and "lang=C.UTF-8 locale=C.UTF-8" in error, error
    info = requests.get(f"{f.receivers[0].url}/browse", timeout=30).json()
    assert any("not UTF-8" in w for w in info["warnings"]), info
    # its own file with a UTF-8 name is not blamed on the name
    assert any("notes-é.txt: not readable as UTF-8 by this process" in w for w in info["warnings"]), \
        info["warnings"]
    assert not (f.secondaries[0].data_dir / "indexes" / "café.idx").exists()


def test_a_receiver_that_cannot_start_under_a_web_server_answers_why(tmp_path):
    """Behind httpd, IIS or a gunicorn unit, a receiver whose esmirror.ini no longer reads
    (a typo, then a graceful restart) was the web server's bare 500 or no worker at all;
    now each request gets a 503 naming the file, the line and how to restart it."""
    from conftest import spawn_listening, stop_session

    port = free_port()
    secondary = make_install(tmp_path / "secondary", {"allow_psuh": "127.0.0.1", "express_version": VERSION})
    master = make_install(tmp_path / "master", {"express_version": VERSION}, [("127.0.0.1", port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    gunicorn = spawn_listening([sys.executable, "-m", "gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}",
                                "app.wsgi:application"], port, tmp_path / "gunicorn.log", cwd=REPO,
                               env={**os.environ, "ESMIRROR_INSTALL_DIR": str(secondary.root)})
    try:
        rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
        assert rc == 1, out
        error = report["secondaries"][0]["error"]
        assert "answered 503 to GET browse: this esmirror receiver cannot start (it tries again every 5 s): " \
            in error, error
        assert "esmirror.ini:2: unknown key 'allow_psuh'" in error, error
        assert "esmirror.ini:2: unknown key 'allow_psuh'" in (tmp_path / "gunicorn.log").read_text()
        # the details (a quoted line of esmirror.ini, paths) only to this machine: no allow list loaded
        through_proxy = requests.get(f"http://127.0.0.1:{port}/lizardtech/mirror/browse", timeout=30,
                                     headers={"X-Forwarded-For": "198.51.100.7"})
        assert through_proxy.status_code == 503, through_proxy.text
        assert "its settings do not load; esmirror check on that server names the line" \
            in through_proxy.json()["error"] and "allow_psuh" not in through_proxy.text, through_proxy.text
        # fixed: the next try starts it, no restart needed; but a try never waits for a
        # commit under way elsewhere (its lock held: minutes), it answers and tries later
        (secondary.etc_dir / "esmirror.ini").write_text(
            f"[esmirror]\nallow_push = 127.0.0.1\nexpress_version = {VERSION}\n", encoding="utf-8")
        (secondary.data_dir / ".esmirror").mkdir(exist_ok=True)
        held = filelock.FileLock(secondary.data_dir / ".esmirror" / "commit.lock")
        with held:
            time.sleep(5.5)
            started = time.monotonic()
            answer = requests.get(f"http://127.0.0.1:{port}/lizardtech/mirror/browse", timeout=60)
            assert answer.status_code == 503 and time.monotonic() - started < 10, answer.text
            assert "commit.lock is held by another process" in answer.json()["error"], answer.text
        time.sleep(5.5)
        rc, _, out = esmirror("publish", "--install-dir", str(master.root))
        assert rc == 0, out
    finally:
        stop_session(gunicorn)


def test_a_name_that_is_not_utf8_is_shown_escaped_the_same_everywhere(fleet):
    """Python's own escape (\\udcff) or a replacement character (�) hid which file to
    rename; both sides now show the bytes as \\xff, whatever the terminal."""
    f = fleet(1)
    bad = os.fsdecode(b"indexes/\xff\xfe.idx")
    (f.master.data_dir / bad).write_bytes(b"x")
    rc, _, out = esmirror("publish", "--install-dir", str(f.master.root))
    assert r"indexes/\xff\xfe.idx: not valid UTF-8: rename it" in out, out
    (f.master.data_dir / bad).unlink()
    (f.secondaries[0].data_dir / "indexes").mkdir(exist_ok=True)
    (f.secondaries[0].data_dir / bad).write_bytes(b"x")
    rc, _, out = esmirror("publish", "--install-dir", str(f.master.root))
    assert rc == 0, out
    assert r"indexes/\xff\xfe.idx: not valid UTF-8: rename it" in out, out
    assert "\\udc" not in out and "\ufffd" not in out, out


def test_a_receiver_says_at_start_what_it_serves_where(fleet, tmp_path):
    for server in ("waitress", "gunicorn"):
        f = fleet(1, server=server)
        log = (tmp_path / "secondary1.log").read_text()
        assert (f"esmirror receiver: {f.secondaries[0].data_dir} at http://127.0.0.1:{f.receivers[0].port}"
                f"/lizardtech/mirror ({server}; pushes from 127.0.0.1)") in log, log
        f.stop()
        (tmp_path / "secondary1.log").unlink()


def _cache_claims(master, rel: str, content: bytes) -> None:
    """The master's hash cache says ``rel``, as it stands, holds ``content``: what a second
    write through a memory map leaves (the stat as the scan saw it, other bytes)."""
    from app.core.manifest import HASH_CACHE_FILE, HashCache, _stat_key

    cache = HashCache(master.data_dir / ".esmirror" / HASH_CACHE_FILE)
    cache.entries[rel] = _stat_key(os.stat(master.data_dir / rel)) + [hashlib.sha256(content).hexdigest()]
    cache.dirty = True
    cache.save(cache.entries)


def test_full_reads_every_file_again_and_a_refused_file_is_read_at_the_next_publish(fleet):
    """A change that leaves the stat as it was (a memory map) was missed for good: --full
    trusted the hash cache too, and sent the new bytes under the old hash, which the
    secondary refused (400) at every publish, blaming the network."""
    f = fleet(1)
    rel = "indexes/tile-0.idx"
    assert f.publish()[0] == 0
    path, held = f.master.data_dir / rel, f.secondaries[0].data_dir / rel
    before = path.read_bytes()
    path.write_bytes(b"B" * len(before))
    _cache_claims(f.master, rel, before)
    rc, report, out = f.publish()
    assert rc == 0 and held.read_bytes() == before, out  # (unseen: the stat is the one cached)
    rc, report, out = f.publish("--full")
    assert rc == 0, out
    assert held.read_bytes() == b"B" * len(before)

    path.write_bytes(b"D" * len(before))
    _cache_claims(f.master, rel, b"E" * len(before))  # a hash the secondary does not hold: sent
    rc, report, out = f.publish()
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert "answered 400" in error and f"on this master {rel} no longer holds what the scan read" in error
    assert "The next publish reads it again" in error, error
    rc, report, out = f.publish()
    assert rc == 0, out
    assert held.read_bytes() == b"D" * len(before)


def test_one_server_under_two_names_is_pushed_once_and_the_twin_named(tmp_path, make_receiver):
    """Listed as 127.0.0.1 and as 127.1 (localhost, say), one receiver was pushed to twice, the two
    pushes waiting on each other's commit lock, and the publish said all was well."""
    secondary = make_install(tmp_path / "s", {"allow_push": "127.0.0.1", "express_version": VERSION})
    receiver = make_receiver(secondary)
    master = make_install(tmp_path / "m", {"express_version": VERSION},  # (127.1: no resolver needed)
                          [("127.0.0.1", receiver.port, "none"), ("127.1", receiver.port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=1)
    rc, report, out = esmirror("publish", "--install-dir", str(master.root), "--json")
    assert rc == 1, out
    states = sorted(r["state"] for r in report["secondaries"])
    assert states == ["in-sync", "refused"], report
    refused = next(r for r in report["secondaries"] if r["state"] == "refused")
    assert "one server listed under two names in Mirrors" in refused["error"], refused
    assert set_files(secondary.data_dir) == set_files(master.data_dir)
    # and a look at the fleet says so too: it used to clear the refusal, as if fixed
    time.sleep(1.1)  # (the ledger's times are whole seconds: a look counts from the next one)
    rc, fleet, out = esmirror("status", "--install-dir", str(master.root), "--json")
    assert sorted(s["state"] for s in fleet["secondaries"]) == ["in-sync", "refused"], out
    twin = next(s for s in fleet["secondaries"] if s["state"] == "refused")
    assert "one server listed under two names in Mirrors" in twin["detail"], twin
    # the one listed second, whichever answered first: each look names the same one
    assert twin["name"] == f"127.1:{receiver.port}", twin
    for _ in range(2):
        rc, fleet, out = esmirror("status", "--install-dir", str(master.root), "--json")
        assert [s["state"] for s in fleet["secondaries"]] == ["in-sync", "refused"], out
