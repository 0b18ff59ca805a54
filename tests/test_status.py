"""Issue 6: esmirror status, GET status, the ledger's states, backoff bounds, the audit log, progress bars."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from agentproc import FAST_AGENT, http
from agent.demo import make_install
from app.core.audit import audit, read_audit
from app.core.ledger import lags, retry_delay, secondary_state
from app.core.settings import load_settings
from conftest import REPO, VERSION, esmirror


def test_backoff_grows_and_never_passes_retry_max(tmp_path):
    install = make_install(tmp_path / "m", {"retry_initial": "0.5", "retry_max": "8"})
    settings = load_settings(install.root)
    rng = random.Random(7)
    delays = [retry_delay(settings, n, rng) for n in range(1, 30)]
    assert all(0.25 <= d <= 8 for d in delays), delays
    assert 0.25 <= delays[0] <= 0.5           # the first retry comes quickly
    assert all(4 <= d <= 8 for d in delays[5:])  # then doubles up to the bound, never past it
    assert len({round(d, 6) for d in delays[5:]}) > 1  # jitter: not all at the same instant
    bad = make_install(tmp_path / "bad", {"retry_max": "-1"})
    rc, _, out = esmirror("status", "--install-dir", str(bad.root))
    assert rc == 2 and "retry_max" in out and "esmirror.ini:" in out


def test_states_say_what_a_person_needs():
    published = {"generation": 5, "digest": "d5"}
    assert secondary_state(None, published)[0] == "unknown"
    seen = {"observed": {"generation": 3, "digest": "d3", "drift": False}}
    state, detail = secondary_state(seen, published)
    assert state == "behind" and "holds generation 3" in detail and "generation 5" in detail
    # newer than this master's record (the master restored from an older backup): not 'behind'
    # in so many words, and what the next publish does to it
    state, detail = secondary_state({"observed": {"generation": 7, "digest": "d7"}}, published)
    assert state == "behind" and detail.startswith("holds generation 7, newer than generation 5 "
                                                   "this master last published"), detail
    assert "the next publish replaces that set" in detail
    failing = {**seen, "last_push": {"state": "failed", "error": "reload_command exited with 1"},
               "next_retry": time.time() + 30}
    state, detail = secondary_state(failing, published)
    assert state == "behind" and "reload_command exited with 1" in detail and "retries at" in detail
    stale = {**seen, "stale": "the master's set changed since generation 4 was published"}
    assert "changed since generation 4" in secondary_state(stale, published)[1]
    assert secondary_state({"observed": {"generation": 5, "digest": "d5"}}, published)[0] == "in-sync"
    drift = {"observed": {"generation": 5, "digest": "dx", "drift": True}}
    assert secondary_state(drift, published)[0] == "drift"
    down = {**drift, "unreachable_since": "2026-01-01T00:00:00Z", "error": "connection refused"}
    assert secondary_state(down, published) == ("unreachable",
                                                 "since 2026-01-01T00:00:00Z: connection refused")
    refused = {**seen, "last_push": {"state": "refused", "error": "another master",
                                     "at": "2026-01-01T00:00:00Z", "refused_by_look": True}}
    assert secondary_state(refused, published) == ("refused", "another master")
    # fixed since (a later look was not refused): behind, saying why the last push failed; it
    # stayed red until the next publish
    fixed = {**refused, "observed": {**seen["observed"], "at": "2026-01-01T00:05:00Z"}}
    state, detail = secondary_state(fixed, published)
    assert state == "behind" and "last push refused: another master" in detail, detail
    # but a refusal of the push routes (allow_push), which a look never tries, stands
    routes = {**fixed, "last_push": {**fixed["last_push"], "error": "answered 403 to GET manifest",
                                     "refused_by_look": False}}
    assert secondary_state(routes, published) == ("refused", "answered 403 to GET manifest")
    # left out of the last publish (--secondary): nothing will bring it but a publish
    left_out = {**seen, "wanted_generation": 3, "wanted_digest": "d3", "last_push": {"state": "in-sync"}}
    state, detail = secondary_state(left_out, published)
    assert state == "behind" and "generation 5 was published to other secondaries only" in detail, detail
    assert "publish again to bring it here" in detail, detail
    # no secondary's push of it recorded at all: running, or killed (not "other secondaries")
    state, detail = secondary_state(left_out, published, reached_others=False)
    assert state == "behind" and "the publish of generation 5 has recorded no push" in detail, detail


def test_a_secondary_a_running_publish_already_reached_is_not_caught_up():
    """The ledger learns of a publish when it ends; a look before that finds secondaries
    holding the newer generation. They were taken for lagging, and the agent logged a
    catch-up of every healthy secondary; a catch-up would push the older set."""
    entry = {"wanted_generation": 158, "wanted_digest": "d158", "confirmed_generation": 158,
             "confirmed_digest": "d158",
             "observed": {"generation": 159, "digest": "d159", "drift": False, "master": "m"}}
    assert lags(entry, "m") is False
    restored = {**entry, "observed": {**entry["observed"], "generation": 150, "digest": "d150"}}
    assert lags(restored, "m") is True  # (older, from a backup: caught up, as before)


def test_audit_log_is_one_json_line_per_event_and_rotates(tmp_path):
    install = make_install(tmp_path / "s")
    settings = load_settings(install.root)
    for n in range(40):
        audit(settings, "commit", caller="127.0.0.1", master="m1", generation=n,
              files={"added": n, "changed": 0, "removed": 0}, outcome="ok", max_bytes=1000, backups=2)
    log = settings.state_dir / "audit.log"
    rotated = sorted(p.name for p in settings.state_dir.glob("audit.log.*") if not p.name.endswith(".lock"))
    assert rotated == ["audit.log.1", "audit.log.2"]  # older ones dropped
    assert log.stat().st_size <= 1000
    lines = read_audit(settings)
    assert lines[-1]["generation"] == 39 and lines[-1]["caller"] == "127.0.0.1"
    assert {"time", "event", "caller", "master", "generation", "files", "outcome"} <= set(lines[-1])
    older = (settings.state_dir / "audit.log.1").read_text().splitlines()
    assert older and int(__import__("json").loads(older[-1])["generation"]) == lines[0]["generation"] - 1


def test_status_names_the_refusal_and_prints_a_table(fleet, make_receiver):
    f = fleet(2, start=False)
    ini = f.secondaries[1].etc_dir / "esmirror.ini"
    ini.write_text(ini.read_text().replace(VERSION, "9.5.2"))
    for r in f.receivers:
        r.start()
    catalogs = f.master.data_dir / "catalogs.xml"
    catalogs.write_text(catalogs.read_text().replace("/staging<", "/nowhere<"))  # a Path nobody can read
    assert f.publish()[0] == 1
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1, out
    good, bad = status["secondaries"]
    assert good["state"] == "in-sync" and good["generation"] == 1 and good["last_contact"]
    assert len(good["unreadable_paths"]) == 1 and "/nowhere" in good["unreadable_paths"][0]
    assert bad["state"] == "refused" and "9.5.2" in bad["detail"] and VERSION in bad["detail"]
    # for a monitoring check: room there, and when a push last left it in sync (never, the refused one)
    import shutil
    assert abs(good["free_bytes"] - shutil.disk_usage(f.secondaries[0].data_dir).free) < 64 * 1024**2
    assert good["reserve_bytes"] > 0 and (good["free_inodes"] is None or good["free_inodes"] > 0)
    assert good["last_in_sync_push"] == good["last_push"]["at"] and good["last_in_sync_push"].endswith("Z")
    assert bad["last_in_sync_push"] is None
    assert bad["next_retry"].endswith("Z") and bad["next_retry"] > bad["last_push"]["at"]  # ISO, as the rest
    assert status["publishes"][0]["caller"].startswith("command line")
    assert status["publishes"][0]["ok"] is False
    rc, _, out = esmirror("status", "--install-dir", str(f.master.root))
    assert rc == 1
    assert f"127.0.0.1:{f.receivers[1].port}  refused" in out
    assert "1 of 2 secondaries not in sync" in out
    assert "/nowhere is not readable" in out

    # the same view over HTTP, from the ledger; a secondary's status is about itself
    master = make_receiver(f.master)
    over_http = http().get(f"{master.url}/status", timeout=10).json()
    assert [s["state"] for s in over_http["secondaries"]] == ["in-sync", "refused"]
    page = http().get(f"{master.url}/", timeout=10).text
    assert "Catalog Paths it cannot read" in page and "/nowhere" in page
    assert over_http["agent"]["running"] is False
    mine = http().get(f"{f.receivers[0].url}/status", timeout=10).json()
    assert mine["role"] == "secondary" and mine["self"]["generation"] == 1
    assert "agent" not in mine and "publishing" not in mine, mine  # a master's fields only
    # the top level speaks of this server, as a monitoring script reads it
    assert (mine["ok"], mine["generation"], mine["drift"]) == (True, 1, False), mine
    assert mine["master"] == mine["self"]["master"] and mine["applied_at"].endswith("Z")
    assert mine["detail"].startswith("holds generation 1 from master ")
    page = http().get(f"{f.receivers[0].url}/", timeout=10)
    assert page.status_code == 200 and "Secondary" in page.text
    (f.secondaries[0].data_dir / "catalogs.xml").write_text("<CatalogConfig/>\n")
    mine = http().get(f"{f.receivers[0].url}/status", timeout=10).json()
    assert (mine["ok"], mine["generation"], mine["drift"]) == (False, 1, True), mine
    assert "changed by hand since generation 1" in mine["detail"]


def test_agent_waits_for_the_publish_lock_held_by_another_publish(fleet, make_receiver, tmp_path):
    import filelock

    from agentproc import AgentProcess, wait_for

    f = fleet(1, master_ini=FAST_AGENT)
    master = make_receiver(f.master)
    lock = filelock.FileLock(f.master.data_dir / ".esmirror" / "publish.lock")
    lock.acquire()  # as `esmirror publish` would hold it
    agent = AgentProcess(f.master, tmp_path / "agent.log").start()
    try:
        request_id = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # it waits, queued, the whole time the lock is taken
            record = http().get(f"{master.url}/publish/{request_id}", timeout=10).json()
            assert record["state"] == "queued", record
            time.sleep(0.05)
        assert not (f.secondaries[0].data_dir / "catalogs.xml").exists()
        lock.release()
        done = wait_for("the publish runs once the lock is free", lambda: http().get(
            f"{master.url}/publish/{request_id}", timeout=10).json()["state"] == "done", 60)
        assert done
        assert (f.secondaries[0].data_dir / "catalogs.xml").exists()
    finally:
        if lock.is_locked:
            lock.release()
        agent.stop()


def test_a_publish_waiting_for_the_publish_lock_says_so(fleet):
    """It waited in silence while the agent held the lock (retrying a slow secondary)."""
    import filelock

    f = fleet(1)
    lock = filelock.FileLock(f.master.data_dir / ".esmirror" / "publish.lock")
    lock.acquire()  # as the agent would hold it
    proc = subprocess.Popen([sys.executable, "-m", "agent", "publish", "--install-dir", str(f.master.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        assert not (f.secondaries[0].data_dir / "catalogs.xml").exists()
        lock.release()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        assert "esmirror: another publish holds this master's publish lock" in err, err
        assert (f.secondaries[0].data_dir / "catalogs.xml").exists()
    finally:
        if lock.is_locked:
            lock.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_progress_bars_on_a_terminal(fleet):
    try:
        leader, follower = pty.openpty()
    except OSError as exc:  # a chroot without /dev/pts mounted has no terminals to give
        pytest.skip(f"no pseudo-terminal available here: {exc}")
    f = fleet(2)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "publish", "--install-dir", str(f.master.root)],
                            stdin=follower, stdout=follower, stderr=follower, cwd=REPO,
                            env=os.environ.copy())
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    out = b"".join(chunks).decode(errors="replace")
    for r in f.receivers:
        assert f"127.0.0.1:{r.port}" in out
    assert "B/s" in out and "in-sync" in out  # a bar per secondary, bytes and rate, then its state


def test_publish_ids_sort_by_creation_even_within_one_second():
    from app.core.publishes import new_id

    ids = []
    for _ in range(200):
        ids.append(new_id())
        time.sleep(0.00001)
    assert ids == sorted(ids)  # the queue's order, and which request is newer, come from this


def test_status_says_refused_for_tls_and_for_another_master(fleet, make_receiver, tmp_path):
    import trustme

    f = fleet(1)
    assert f.publish()[0] == 0
    # the secondary now belongs to another master
    state_file = f.secondaries[0].data_dir / ".esmirror" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "master": "0ther0master"}))
    # a second secondary on HTTPS whose certificate comes from a CA the master does not trust
    theirs, ours = trustme.CA(), trustme.CA()
    cert = theirs.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ours.cert_pem.write_to_path(str(f.master.etc_dir / "ca-bundle.crt"))
    tls_install = make_install(tmp_path / "tls-secondary",
                               {"allow_push": "127.0.0.1", "express_version": VERSION})
    tls = make_receiver(tls_install, server="gunicorn", extra=[
        "--certfile", str(tmp_path / "server.pem"), "--keyfile", str(tmp_path / "server.pem")])
    cfg = f.master.etc_dir / "iserv-cfg.xml"
    cfg.write_text(cfg.read_text().replace(
        "  </Mirrors>", f'    <Secondary host="127.0.0.1" port="{tls.port}" ssl="strict"/>\n  </Mirrors>'))
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1, out
    owned, refused_tls = status["secondaries"]
    assert owned["state"] == "refused" and "another master (0ther0master)" in owned["detail"]
    assert "esmirror release" in owned["detail"]
    assert refused_tls["state"] == "refused", refused_tls
    assert refused_tls["detail"].startswith(f"TLS to 127.0.0.1:{tls.port} failed")
    assert "ca-bundle.crt" in refused_tls["detail"]

    # a publish says why in a word; the ledger it writes (no look after it) counts a TLS
    # failure as a refusal too: the channel is wrong, not down
    from app.core.ledger import fleet_status

    rc, report, out = f.publish()
    pushed = report["secondaries"][1]
    assert rc == 1 and (pushed["state"], pushed["reason"]) == ("unreachable", "tls"), pushed
    assert report["secondaries"][0]["reason"] == "refused", report  # (owned by another master)
    row = fleet_status(load_settings(f.master.root))["secondaries"][1]
    assert row["state"] == "refused" and row["unreachable_since"] is None, row
    assert row["last_push"]["reason"] == "tls" and row["detail"].startswith("TLS to "), row

    # its allow_push no longer names this master either (a failover's step 2): the other
    # master is what is said, not 'add this master to allow_push', which would undo it
    ini = f.secondaries[0].etc_dir / "esmirror.ini"
    ini.write_text(ini.read_text().replace("allow_push = 127.0.0.1", "allow_push = 192.0.2.99"))
    f.receivers[0].stop()
    f.receivers[0].start()
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    owned = status["secondaries"][0]
    assert owned["state"] == "refused" and "another master (0ther0master)" in owned["detail"], owned
    assert "retire it and change nothing there" in owned["detail"] and "allow_push" not in owned["detail"]


def test_a_secondary_whose_lists_leave_this_master_out_is_refused_not_unreachable(fleet):
    """It answers every look with 403: the network is fine and the allow list is what to fix,
    so status says refused, naming the list, not unreachable."""
    f = fleet(1, secondary_ini={"allow_push": "127.0.0.9", "allow_admin": "127.0.0.9"})
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1, out
    row = status["secondaries"][0]
    assert row["state"] == "refused", row
    assert "allow_push" in row["detail"] and "127.0.0.1" in row["detail"], row
    # said for the master's operator: the secondary's host, and allow_push alone (browse's
    # own words were 'allow_push or allow_admin … on this server')
    assert ("it does not let this master's address 127.0.0.1 push; add it to allow_push in "
            "ImageServer/etc/esmirror.ini on 127.0.0.1, render") in row["detail"], row
    assert "on this server" not in row["detail"] and "allow_admin" not in row["detail"], row
    # 'esmirror browse' from an admin's machine keeps the receiver's own words: advice to
    # give that machine push rights would be wrong
    rc, _, out = esmirror("browse", f"127.0.0.1:{f.receivers[0].port}")
    assert rc == 1 and "add it to allow_push or allow_admin" in out and "this master" not in out, out


def test_a_browse_sent_before_a_push_ended_does_not_undo_what_the_push_recorded(tmp_path):
    """The agent's periodic browse answered (generation 2) while a push of generation 4 was
    committing, and was saved after it: status showed generation 2 for minutes."""
    from app.core.express import Secondary
    from app.core.ledger import Ledger

    settings = load_settings(make_install(tmp_path / "m").root)
    ledger, secondary = Ledger(settings), Secondary("127.0.0.1", 21002)
    asked = time.time()
    time.sleep(0.01)
    ledger.record_push(secondary, {"state": "in-sync", "generation": 4, "digest": "d4"}, 4, "d4")
    ledger.record_contact(secondary, {"generation": 2, "digest": "d2", "drift": False}, asked=asked)
    entry = ledger.read()[secondary.name]
    assert entry["observed"]["generation"] == 4 and entry["confirmed_generation"] == 4
    ledger.record_contact(secondary, {"generation": 2, "digest": "d2", "drift": False}, asked=time.time())
    assert ledger.read()[secondary.name]["observed"]["generation"] == 2  # a later look is news


def test_a_clock_set_back_stops_neither_retries_nor_news_nor_the_no_agent_warning(tmp_path):
    """Times in the ledger and the heartbeat are wall-clock times. Written before the clock
    was put back by hours, they sat 'in the future': no catch-up for that long, every newer
    browse thrown away as older, and a dead agent shown running."""
    from app.core.express import Secondary
    from app.core.ledger import Ledger, agent_pulse
    from app.core.state import write_json

    settings = load_settings(make_install(tmp_path / "m", {"retry_max": "300"}).root)
    ledger, secondary = Ledger(settings), Secondary("127.0.0.1", 21002)
    ledger.record_push(secondary, {"state": "unreachable", "error": "connection refused"}, 1, "d1")
    hours_ahead = time.time() + 3 * 3600
    with ledger.edit() as data:
        data[secondary.name]["next_retry"] = hours_ahead
        data[secondary.name]["observed"] = {"generation": 0, "epoch": hours_ahead}
    assert ledger.due([secondary]) == [secondary]
    ledger.record_contact(secondary, {"generation": 1, "digest": "d1", "drift": False}, asked=time.time())
    assert ledger.read()[secondary.name]["observed"]["generation"] == 1
    write_json(settings.state_dir / "agent.json", {"pid": 1, "started": "", "heartbeat": hours_ahead,
                                                    "stopped": False})
    assert agent_pulse(settings)["running"] is False
    write_json(settings.state_dir / "agent.json", {"pid": 1, "started": "", "heartbeat": time.time(),
                                                    "stopped": False})
    assert agent_pulse(settings)["running"] is True


def test_a_typo_in_mirrors_is_shown_on_the_masters_status_page(fleet, make_receiver):
    """port="18104x" in iserv-cfg.xml: the master's page said 'Secondary (no Mirrors here)'
    and its JSON 'role: secondary', the error only on the command line and in the agent's log."""
    f = fleet(1)
    master = make_receiver(f.master)
    cfg = f.master.etc_dir / "iserv-cfg.xml"
    cfg.write_text(cfg.read_text().replace(f'port="{f.receivers[0].port}"', f'port="{f.receivers[0].port}x"'))
    status = http().get(f"{master.url}/status", timeout=30).json()
    assert status["role"] == "master" and status["ok"] is False, status
    assert f"port='{f.receivers[0].port}x' is not a port number" in status["error"], status
    page = http().get(f"{master.url}/", timeout=30).text
    assert "Mirrors cannot be read" in page and "is not a port number" in page


def test_a_request_made_after_the_clock_was_set_back_is_still_the_newest(tmp_path):
    """Ids came from the wall clock alone: after the clock was put back an hour, a new request
    sorted before the ones queued just before, and superseding took it for the older."""
    from app.core.publishes import PublishQueue, new_id

    queue = PublishQueue(load_settings(make_install(tmp_path / "m").root))
    ahead = queue.submit({}, "test", [])
    ahead_id = new_id(time.time() + 3600)  # made before the clock went back an hour
    (queue.dir / f"{ahead['id']}.json").rename(queue.dir / f"{ahead_id}.json")
    newest = queue.submit({}, "test", [])
    assert newest["id"] > ahead_id


def test_status_after_a_publish_to_some_secondaries_says_so(fleet):
    f = fleet(2)
    assert f.publish()[0] == 0
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"only to the first")
    first = f"127.0.0.1:{f.receivers[0].port}"
    rc, _, out = esmirror("publish", "--install-dir", str(f.master.root), "--secondary", first)
    assert rc == 0, out
    rc, _, out = esmirror("status", "--install-dir", str(f.master.root))
    assert rc == 1, out
    assert (f"127.0.0.1:{f.receivers[1].port}: behind: holds generation 1, the master published "
            "generation 2; generation 2 was published to other secondaries only") in out, out
    assert "done: all 1 in sync  generation 2" in out, out
    # one of the two down: the failures are counted within that publish ('1 of 2 secondaries'
    # read as one failed, and was counted against the fleet of today)
    f.receivers[1].stop()
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"to both, one down")
    assert esmirror("publish", "--install-dir", str(f.master.root))[0] == 1
    rc, _, out = esmirror("status", "--install-dir", str(f.master.root))
    assert ": 1 of 2 not in sync  generation 3" in out, out


def test_status_by_an_account_that_cannot_record_says_so_instead_of_old_answers(open_tmp, make_receiver,
                                                                                   as_nobody):
    """Run by a monitoring account, status could not write the ledger, so it reported the
    ledger's older answers (all in sync, exit 0) while a secondary was down; only a
    warning on stderr said anything."""
    secondary = make_install(open_tmp / "s", {"allow_push": "127.0.0.1", "express_version": VERSION})
    receiver = make_receiver(secondary)
    master = make_install(open_tmp / "m", {"express_version": VERSION}, [("127.0.0.1", receiver.port, "none")])
    (master.data_dir / "catalogs.xml").write_text("<CatalogConfig/>\n")
    rc, _, out = esmirror("publish", "--install-dir", str(master.root))
    assert rc == 0, out
    subprocess.run(["chmod", "-R", "a+rX", str(open_tmp)], check=True)
    receiver.stop()  # down now: the ledger still says in sync
    done = subprocess.run([*as_nobody, sys.executable, "-m", "agent", "status", "--install-dir",
                           str(master.root)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is not writable by nobody" in done.stderr and "run it as root" in done.stderr, done.stderr
    assert "in sync" not in done.stdout, done.stdout


def test_a_request_no_agent_will_run_is_a_problem_status_reports(fleet):
    """With the agent dead, a queued publish request waits for ever, yet status said all
    was well (exit 0): the fleet would never get what was asked."""
    from app.core.publishes import PublishQueue

    f = fleet(1)
    assert f.publish()[0] == 0
    rc, _, out = esmirror("status", "--install-dir", str(f.master.root))
    assert rc == 0, out
    request = PublishQueue(load_settings(f.master.root)).submit({}, "127.0.0.1", [])
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1 and status["secondaries"][0]["state"] == "in-sync", out
    assert status["problems"] == [f"publish request {request['id']} is queued but no esmirror agent "
                                  "runs: it waits until one starts (systemctl start esmirror-agent)"], out
    rc, _, out = esmirror("status", "--install-dir", str(f.master.root))
    assert rc == 1 and "problem: publish request" in out, out


def test_a_secondary_that_would_refuse_pushes_is_refused_by_the_look(fleet):
    """A master in a secondary's allow_admin but not its allow_push passed every look
    (browse takes either), so status said in-sync until a publish failed at its commit."""
    f = fleet(1)
    assert f.publish()[0] == 0
    receiver, secondary = f.receivers[0], f.secondaries[0]
    receiver.stop()
    ini = secondary.root / "ImageServer" / "etc" / "esmirror.ini"
    ini.write_text(ini.read_text().replace("allow_push = 127.0.0.1", "allow_push = 127.0.0.9"))
    receiver.start()
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1, out
    row = status["secondaries"][0]
    assert row["state"] == "refused" and "its allow_push does not name the address it sees this " \
        "master at (127.0.0.1)" in row["detail"], row
    rc, report, out = f.publish()
    assert rc == 1 and report["secondaries"][0]["state"] == "refused", out
    assert report["secondaries"][0]["bytes_sent"] == 0, out
