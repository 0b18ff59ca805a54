"""Issue 6: the publish endpoint and the push agent, end to end on real servers and processes."""
from __future__ import annotations

import json
import time

import pytest

from agentproc import FAST_AGENT, AgentProcess, audit_lines, http, wait_for
from conftest import esmirror, set_files


@pytest.fixture
def agents(tmp_path):
    started: list[AgentProcess] = []

    def start(install, env=None):
        agent = AgentProcess(install, tmp_path / f"agent-{len(started)}.log", env).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def master_fleet(fleet, make_receiver, count=2, start=True):
    f = fleet(count, master_ini=FAST_AGENT, start=start)
    master = make_receiver(f.master)
    return f, master


def progress(master, request_id):
    answer = http().get(f"{master.url}/publish/{request_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def finished(master, request_id):
    record = progress(master, request_id)
    return record if record["state"] in ("done", "failed", "superseded") else None


def test_publish_through_endpoint_runs_in_agent_and_lands_on_both(fleet, make_receiver, agents):
    f, master = master_fleet(fleet, make_receiver)
    web = http()
    # two requests before any agent runs: they wait on disk, the newer supersedes the older
    first = web.post(f"{master.url}/publish", json={}, timeout=10)
    assert first.status_code == 202, first.text
    assert "no esmirror agent is running" in first.json()["warning"]
    second = web.post(f"{master.url}/publish", json={"max_parallel": 1}, timeout=10)
    assert second.status_code == 202, second.text
    first_id, second_id = first.json()["id"], second.json()["id"]
    master.stop()  # the web side restarts: the requests are on disk already
    master.start()
    assert progress(master, second_id)["state"] == "queued"
    assert all(set_files(s.data_dir) == {} for s in f.secondaries)  # the web app never pushes

    agent = agents(f.master)
    record = wait_for("the agent finishes the publish", lambda: finished(master, second_id), 90)
    assert record["state"] == "done" and record["ok"] is True, record
    assert [(s["name"], s["state"]) for s in record["secondaries"]] == [
        (f"127.0.0.1:{r.port}", "in-sync") for r in f.receivers]
    assert all(s["files_sent"] == 8 and s["bytes_sent"] > 3 * 1024 * 1024 for s in record["secondaries"])
    assert record["caller"] == "127.0.0.1" and record["generation"] == 1
    older = progress(master, first_id)
    assert older["state"] == "superseded" and older["superseded_by"] == second_id
    for s in f.secondaries:
        assert set_files(s.data_dir) == set_files(f.master.data_dir)

    # the audit log: the request, the publish and each push on the master; a commit on each secondary
    events = [(e["event"], e["outcome"]) for e in audit_lines(f.master)]
    assert events.count(("publish-request", "queued")) == 2
    assert ("publish", "ok") in events and events.count(("push", "in-sync")) == 2
    publish_line = next(e for e in audit_lines(f.master) if e["event"] == "publish")
    assert publish_line["caller"] == "127.0.0.1" and publish_line["generation"] == 1
    assert publish_line["files"] == 8 and publish_line["master"]
    for s in f.secondaries:
        commits = [e for e in audit_lines(s) if e["event"] == "commit"]
        assert len(commits) == 1, commits
        assert commits[0]["caller"] == "127.0.0.1" and commits[0]["outcome"] == "ok"
        assert commits[0]["generation"] == 1 and commits[0]["master"] == publish_line["master"]
        assert commits[0]["files"] == {"added": 8, "changed": 0, "removed": 0}
    assert agent.proc.poll() is None, agent.output()
    assert http().get(f"{master.url}/status", timeout=10).json()["agent"]["running"] is True

    # a master whose own catalogs.xml is broken: the request fails, saying why; nothing is sent
    before = [set_files(s.data_dir) for s in f.secondaries]
    (f.master.data_dir / "catalogs.xml").write_text("<CatalogConfig><Catalog name='x'>")
    bad_id = web.post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
    record = wait_for("the agent refuses the broken set", lambda: finished(master, bad_id), 60)
    assert record["state"] == "failed" and "catalogs.xml" in record["error"], record
    assert [set_files(s.data_dir) for s in f.secondaries] == before

    agent.stop()  # SIGTERM: a clean stop, and status says no agent runs
    assert agent.proc.returncode == 0, agent.output()
    assert http().get(f"{master.url}/status", timeout=10).json()["agent"]["running"] is False


def test_endpoint_refuses_what_it_cannot_do(fleet, make_receiver):
    from conftest import session_from

    f, master = master_fleet(fleet, make_receiver, count=1)
    web = http()
    url = f"{master.url}/publish"
    for body, words in ((b"{not json", "not JSON"), (b'{"canary": 5}', "canary"),
                        # (named as the request names it: a web caller has no --secondary flag)
                        (b'{"secondaries": ["elsewhere.example"]}', "secondary elsewhere.example is not in "
                                                                   "the Mirrors list"),
                        (b'{"canary": "elsewhere.example"}', "canary elsewhere.example is not one of"),
                        (b'{"max_parallel": 0}', "max_parallel"), (b'{"colour": 1}', "unknown field"),
                        (b"[" * 30_000, "not JSON")):
        answer = web.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
        assert answer.status_code == 400, (body, answer.text)
        assert words in answer.json()["error"] and "--" not in answer.json()["error"], answer.text
    stranger = session_from("127.0.0.2").post(url, json={}, timeout=10)
    assert stranger.status_code == 403 and "allow_admin" in stranger.json()["error"]
    # a page of another site, open in a browser on an admin's machine (CSRF): what browsers
    # send without asking first is refused, whatever the caller's address
    for headers, data, status in (
            ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, b'{"full": true}', 403),
            ({"Sec-Fetch-Site": "cross-site", "Content-Type": "application/x-www-form-urlencoded"}, b"", 403),
            ({"Content-Type": "text/plain"}, b'{"full": true, "force": true}', 400)):
        answer = web.post(url, data=data, headers=headers, timeout=10)
        assert answer.status_code == status, (headers, answer.text)
    archive = f"{f.receivers[0].url}/archive"
    for method, route in (("POST", f"{archive}/any-id/restore"), ("DELETE", f"{archive}?all=1")):
        answer = web.request(method, route, headers={"Origin": "http://evil.example"}, timeout=10)
        assert answer.status_code == 403 and "another site" in answer.json()["error"], answer.text
    same_site = web.post(url, json={}, headers={"Origin": master.url.rsplit("/", 2)[0]}, timeout=10)
    assert same_site.status_code == 202, same_site.text  # its own page (same origin) may
    assert web.get(f"{master.url}/publish/20260101T000000000000-deadbeef", timeout=10).status_code == 404
    assert web.get(f"{master.url}/publish/..%2Fledger", timeout=10).status_code == 404
    # a secondary has no Mirrors: nothing to publish to, 409 saying so
    on_secondary = web.post(f"{f.receivers[0].url}/publish", json={}, timeout=10)
    assert on_secondary.status_code == 409
    assert "not a master" in on_secondary.json()["error"]
    assert len(list((f.master.data_dir / ".esmirror" / "queue").glob("*.json"))) == 1  # same_site's


def test_a_chunked_publish_request_is_refused_not_read_as_empty(fleet, make_receiver):
    """gunicorn hands a chunked body on uncounted: read as empty, it queued a publish to every
    secondary instead of the one the body names."""
    f = fleet(2, master_ini=FAST_AGENT, start=False)
    master = make_receiver(f.master, server="gunicorn")
    body = json.dumps({"secondaries": [f"127.0.0.1:{f.receivers[0].port}"]}).encode()
    answer = http().post(f"{master.url}/publish", data=iter([body]), timeout=10)
    assert answer.status_code == 411, answer.text
    assert "Content-Length" in answer.json()["error"]
    queue = f.master.data_dir / ".esmirror" / "queue"
    assert not queue.exists() or not list(queue.glob("*.json"))


def test_secondary_down_during_publish_is_caught_up_after_restart(fleet, make_receiver, agents):
    f, master = master_fleet(fleet, make_receiver, start=False)
    f.receivers[0].start()
    down = f.receivers[1]
    down.env = {"ESMIRROR_CRASH_AT": "stage:1"}  # the receiver dies in the middle of the commit
    down.start()
    agent = agents(f.master)
    request_id = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
    record = wait_for("the publish ends", lambda: finished(master, request_id), 90)
    states = {s["name"]: s["state"] for s in record["secondaries"]}
    name = f"127.0.0.1:{down.port}"
    assert states == {f"127.0.0.1:{f.receivers[0].port}": "in-sync", name: "unreachable"}, record
    assert down.proc.poll() is not None  # it really died mid-publish

    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1, out
    row = next(s for s in status["secondaries"] if s["name"] == name)
    assert row["state"] == "unreachable" and row["unreachable_since"], row
    assert "connection refused" in row["detail"]

    def tries():
        rows = http().get(f"{master.url}/status", timeout=10).json()["secondaries"]
        return next(r for r in rows if r["name"] == name)["failed_tries"] >= 4
    wait_for("the agent tries again, and again", tries, 60)

    down.env = None
    down.start()  # same port, no fault
    started = time.monotonic()
    bound = float(FAST_AGENT["retry_max"])

    def in_sync():
        rows = http().get(f"{master.url}/status", timeout=10).json()["secondaries"]
        return all(r["state"] == "in-sync" for r in rows) and rows
    wait_for("the agent brings the restarted secondary in sync", in_sync, bound + 60)
    elapsed = time.monotonic() - started
    # the retry comes within the backoff bound (plus one push and a poll of slack on a busy machine)
    assert elapsed < bound + 30, elapsed
    assert set_files(f.secondaries[1].data_dir) == set_files(f.master.data_dir)
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 0, out
    assert [s["state"] for s in status["secondaries"]] == ["in-sync", "in-sync"]
    # no new publish: still generation 1, one request; the catch-up is in the audit log
    assert status["generation"] == 1 and len(status["publishes"]) == 1
    catchups = [e for e in audit_lines(f.master) if e["event"] == "push" and e.get("why") == "catch-up"]
    assert catchups and catchups[-1]["outcome"] == "in-sync" and catchups[-1]["caller"] == "agent"
    # each try that failed as the one before did is counted, not logged: a secondary down for
    # weeks, retried every few minutes, would push everything else out of the audit log (the
    # first catch-up failed otherwise than the publish, killed mid-commit: that is logged)
    assert [e["outcome"] for e in catchups] == ["unreachable", "in-sync"], catchups
    assert "connection refused" in catchups[0]["error"], catchups
    assert catchups[-1]["failed_tries"] >= 4, catchups
    # its log: one line per try and what came of it; not urllib3's three retry warnings per try
    log = agent.output()
    assert "Retrying (Retry(" not in log and f"catching up {name}" in log, log[-3000:]
    assert f"catch-up {name}: unreachable: cannot connect to {name}" in log, log[-3000:]
    assert f"publish {request_id}: generation 1, not in sync: {name} unreachable" in log, log[-3000:]


def test_agent_killed_mid_publish_loses_no_request(fleet, make_receiver, agents):
    f, master = master_fleet(fleet, make_receiver)
    doomed = agents(f.master, env={"ESMIRROR_CRASH_AT": "agent-progress:1"})
    request_id = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
    assert doomed.wait_exit(90) != 0, doomed.output()  # killed while bytes were on the way
    record = progress(master, request_id)
    assert record["state"] == "running"
    # what GET publish/<id> showed mid-publish: per-secondary bytes so far (the first report
    # comes while the set's large file is on its way, before any file is complete)
    moving = [s for s in record["secondaries"] if s["bytes_sent"] > 0]
    assert moving and moving[0]["state"] == "pushing", record

    agents(f.master)  # restart
    record = wait_for("the restarted agent completes the publish",
                      lambda: finished(master, request_id), 90)
    assert record["state"] == "done" and record["ok"] is True, record
    assert record["runs"] == 2
    assert [s["state"] for s in record["secondaries"]] == ["in-sync", "in-sync"]
    for s in f.secondaries:
        assert set_files(s.data_dir) == set_files(f.master.data_dir)


def test_second_agent_for_the_same_master_refuses(fleet, agents):
    f = fleet(1, master_ini=FAST_AGENT, start=False)
    first = agents(f.master)
    wait_for("the first agent's heartbeat",
             lambda: (f.master.data_dir / ".esmirror" / "agent.json").exists(), 30)
    rc, _, out = esmirror("agent", "--install-dir", str(f.master.root), timeout=60)
    assert rc == 1 and "another esmirror agent already runs" in out
    assert first.proc.poll() is None
    rc, _, out = esmirror("agent", "--install-dir", str(f.secondaries[0].root), timeout=60)
    assert rc == 2 and "not a master" in out
    # run on a secondary by mistake: the advice is where to run it, then how to make a master
    assert "Run this on the master (on a secondary, 'esmirror browse HOST:PORT'" in out, out


def test_drift_shows_in_status_and_next_publish_repairs_it_keeping_the_edit(fleet):
    f = fleet(2)
    assert f.publish()[0] == 0
    edited = f.secondaries[0].data_dir / "indexes" / "tile-2.idx"
    hand_made = b"edited by hand on the secondary"
    edited.write_bytes(hand_made)

    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 1, out
    assert [s["state"] for s in status["secondaries"]] == ["drift", "in-sync"]
    assert "by hand" in status["secondaries"][0]["detail"]
    rc, _, out = esmirror("status", "--install-dir", str(f.master.root))
    assert rc == 1 and "drift" in out and "1 of 2 secondaries not in sync" in out
    # and who published last, how it ended: the same history the status page shows
    assert "last publishes (newest first):" in out and "command line (" in out, out
    assert "done: all 2 in sync  generation 1" in out, out

    rc, report, out = f.publish()
    assert rc == 0, out
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)
    archived = [p for p in (f.secondaries[0].data_dir / "archive").rglob("tile-2.idx")]
    assert [p.read_bytes() for p in archived] == [hand_made]
    rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
    assert rc == 0, out
    assert [s["state"] for s in status["secondaries"]] == ["in-sync", "in-sync"]
    assert status["secondaries"][0]["archive_bytes"] == len(hand_made)


def test_rollout_canary_and_stop_on_failure(fleet):
    f = fleet(3)
    down = f.receivers[0]
    down.stop()
    canary = f"127.0.0.1:{down.port}"
    rc, report, out = f.publish("--canary", canary)
    assert rc == 1, out
    assert [s["state"] for s in report["secondaries"]] == ["unreachable", "skipped", "skipped"]
    assert [s["reason"] for s in report["secondaries"]] == ["unreachable", "skipped", "skipped"]
    assert f"canary {canary} failed" in report["secondaries"][1]["error"]
    assert all(set_files(s.data_dir) == {} for s in f.secondaries)

    rc, report, out = f.publish("--max-parallel", "1", "--stop-on-failure")
    assert rc == 1, out
    assert [s["state"] for s in report["secondaries"]] == ["unreachable", "skipped", "skipped"]
    assert "stop-on-failure" in report["secondaries"][2]["error"]

    rc, report, out = f.publish("--canary", f"127.0.0.1:{f.receivers[1].port}", "--max-parallel", "1")
    assert rc == 1, out
    assert [s["state"] for s in report["secondaries"]] == ["unreachable", "in-sync", "in-sync"]
    assert "B/s" not in out  # no progress bars when not on a terminal
    rc, _, out = f.publish("--canary", "elsewhere.example")
    assert rc == 2 and "--canary elsewhere.example is not one of the secondaries being published to" in out
    rc, _, out = f.publish("--canary", "127.0.0.1")  # every member is on 127.0.0.1
    assert rc == 2 and "--canary 127.0.0.1 names 3 secondaries" in out and "HOST:PORT" in out


def test_a_burst_of_requests_is_superseded_in_one_pass(fleet, make_receiver, agents):
    """Sixty requests queued at once: the agent marked one superseded per tick (half a
    second), re-reading every record each time, so the last ran half a minute later."""
    f, master = master_fleet(fleet, make_receiver, count=1)
    ids = [http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"] for _ in range(60)]
    agents(f.master)
    started = time.monotonic()
    record = wait_for("the newest request ends", lambda: finished(master, ids[-1]), 60)
    took = time.monotonic() - started
    assert record["state"] == "done" and record["ok"], record
    states = [progress(master, i)["state"] for i in ids]
    assert states == ["superseded"] * 59 + ["done"], states
    assert took < 15, took
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)


def test_a_newer_request_supersedes_only_one_that_does_no_more_than_it():
    from agent.daemon import _covers

    def request(names=("a", "b"), **options):
        return {"options": options, "secondaries": [{"name": n} for n in names]}

    covered = [(request(), request()), (request(full=True), request()), (request(force=True), request()),
               (request(), request(names=("a",))), (request(canary="a"), request(canary="a")),
               (request(stop_on_failure=True), request(stop_on_failure=True)),
               (request(max_parallel=1), request())]
    not_covered = [(request(), request(force=True)),     # the newer would not get past the check
                   (request(), request(full=True)),
                   (request(canary="a"), request()),     # a failed canary leaves b unpushed
                   (request(stop_on_failure=True), request()),
                   (request(names=("a",)), request())]
    assert all(_covers(newer, older) for newer, older in covered)
    assert not any(_covers(newer, older) for newer, older in not_covered)


def test_finished_requests_are_kept_an_hour_whatever_their_number(tmp_path):
    """A burst of requests (most superseded) must not prune records whose 202 was just sent."""
    from agent.demo import make_install
    from app.core.publishes import PublishQueue
    from app.core.settings import load_settings

    queue = PublishQueue(load_settings(make_install(tmp_path / "m").root))
    ids = []
    for _ in range(60):
        record = queue.submit({}, "127.0.0.1", ["a"])
        record.update(state="superseded")
        queue.save(record)
        ids.append(record["id"])
    queue.prune(keep=50)
    assert [r["id"] for r in queue.all()] == ids  # all young: none goes
    queue.prune(keep=50, younger_kept=0)
    assert [r["id"] for r in queue.all()] == ids[10:]


def test_a_secondary_that_never_answers_holds_up_nothing(fleet, make_receiver, agents):
    """The periodic look at every secondary runs beside the agent's loop: one that accepts
    connections and never answers does not keep requests queued, nor the agent from stopping.
    And a request's rows are the secondaries Mirrors lists when it runs."""
    import socket

    f, master = master_fleet(fleet, make_receiver, count=1)
    healthy = f"127.0.0.1:{f.receivers[0].port}"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # accepts (the kernel does), never reads, never answers
        hung = f"127.0.0.1:{silent.getsockname()[1]}"
        cfg = f.master.etc_dir / "iserv-cfg.xml"
        one = cfg.read_text()
        both = one.replace("</Mirrors>", f'<Secondary host="127.0.0.1" port="{hung.split(":")[1]}"/></Mirrors>')
        cfg.write_text(both)
        request_id = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
        assert [r["name"] for r in progress(master, request_id)["secondaries"]] == [healthy, hung]
        cfg.write_text(one)  # taken out of Mirrors before the agent ran the request
        agent = agents(f.master)
        record = wait_for("the agent runs the request", lambda: finished(master, request_id), 60)
        assert record["ok"] is True and [(r["name"], r["state"]) for r in record["secondaries"]] == [
            (healthy, "in-sync")], record
        cfg.write_text(both)  # back: the next looks (every second here) hang on it
        time.sleep(3)
        (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed while one hangs")
        request_id = http().post(f"{master.url}/publish", json={"secondaries": [healthy]},
                                 timeout=10).json()["id"]
        record = wait_for("a request runs while a look hangs", lambda: finished(master, request_id), 30)
        assert record["state"] == "done" and record["ok"] is True, record
        started = time.monotonic()
        agent.stop()  # SIGTERM
        assert agent.proc.returncode == 0 and time.monotonic() - started < 15, agent.output()


def test_a_catch_up_failing_for_a_new_reason_is_logged(tmp_path):
    """Repeats were told apart by the state word alone: a secondary failing first for want
    of room, then because another master owns it, then for bad TLS, logged only the first."""
    from agent.demo import make_install
    from agent.fleet import _record
    from agent.push import PushResult
    from app.core.audit import read_audit
    from app.core.settings import load_settings

    settings = load_settings(make_install(tmp_path / "m", {}, [("127.0.0.1", 8081, "none")]).root)
    tries = [("publish", "failed", "answered 507: no room", "no-room"),
             ("catch-up", "failed", "answered 507: no room", "no-room"),
             ("catch-up", "refused", "answered 409: owned by another master", "refused"),
             ("catch-up", "refused", "answered 409: owned by another master", "refused"),
             ("catch-up", "unreachable", "connection refused", "unreachable"),
             ("catch-up", "unreachable", "TLS: certificate is not valid for the name", "tls"),
             ("catch-up", "in-sync", None, None)]
    for why, state, error, reason in tries:
        _record(settings, [PushResult("127.0.0.1", 8081, state=state, error=error, reason=reason)], 1,
                "d" * 64, "agent", "m", why)
    logged = [(e["why"], e["outcome"], e["error"], e.get("reason")) for e in read_audit(settings)
              if e["event"] == "push"]  # (the reason, a word for a machine, on each failure's line)
    assert logged == [tries[0], tries[2], tries[4], tries[5], tries[6]], logged
    assert [e.get("failed_tries") for e in read_audit(settings) if e.get("why") == "catch-up"] == [3, 5, 6, 6]


def test_the_agent_reads_esmirror_ini_again_when_it_changes(fleet, make_receiver, agents):
    """An exclude added to esmirror.ini reached 'esmirror publish' at once, but the running
    agent kept the settings of its start: its publishes put the excluded file back, and
    its catch-ups, scanning another set than the one published, gave secondaries up."""
    f, master = master_fleet(fleet, make_receiver, count=1)
    agent = agents(f.master)
    first = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
    assert wait_for("the first publish ends", lambda: finished(master, first), 60)["ok"]
    excluded = f.secondaries[0].data_dir / "overviews" / "basemap.ovr"
    assert excluded.exists()
    ini = f.master.etc_dir / "esmirror.ini"
    ini.write_text(ini.read_text() + "exclude = overviews/basemap.ovr\n")
    second = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
    record = wait_for("the second publish ends", lambda: finished(master, second), 60)
    assert record["ok"], record
    assert not excluded.exists()  # a file the set leaves out goes to the secondary's archive
    assert "esmirror.ini changed: settings read again" in agent.output()
    # gone for a moment (an editor's rename-then-write): not the defaults, which have no exclude
    ini.rename(ini.with_name("esmirror.ini.bak"))
    wait_for("the agent notices", lambda: "esmirror.ini is gone; going on with the settings read "
             "before" in agent.output(), 30)
    third = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
    assert wait_for("the third publish ends", lambda: finished(master, third), 60)["ok"]
    assert not excluded.exists()
    ini.with_name("esmirror.ini.bak").rename(ini)


def test_a_secondary_restored_from_a_backup_is_caught_up(fleet, make_receiver, agents, tmp_path):
    """A secondary whose var/data came back from last week's backup (its own record and
    all) showed 'behind' until the next publish: the ledger trusted the push it had
    confirmed, and a look that found an older set of ours did not reopen the debt."""
    import shutil

    f, master = master_fleet(fleet, make_receiver, count=1)
    assert f.publish()[0] == 0
    secondary, receiver = f.secondaries[0], f.receivers[0]
    backup = tmp_path / "backup"
    shutil.copytree(secondary.data_dir, backup)
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"generation 2")
    assert f.publish()[0] == 0
    receiver.stop()
    shutil.rmtree(secondary.data_dir)
    shutil.copytree(backup, secondary.data_dir)
    receiver.start()
    agents(f.master)

    wait_for("the agent brings the restored secondary back to generation 2",
             lambda: set_files(secondary.data_dir) == set_files(f.master.data_dir), 60)
    # (the files land at the commit; the ledger the status reads, when the push returns)
    wait_for("status says so", lambda: http().get(f"{master.url}/status", timeout=10)
             .json()["secondaries"][0]["state"] == "in-sync", 30)
    # an admin's own restore from the secondary's archive is a person's fix: the agent
    # leaves it to the next publish (it undid it within a second)
    newest = esmirror("archive", "list", "--json", "--install-dir", str(secondary.root))[1]["archive"][-1]
    rc, _, out = esmirror("archive", "restore", newest["id"], "--install-dir", str(secondary.root))
    assert rc == 0, out
    kept = set_files(secondary.data_dir)
    assert kept != set_files(f.master.data_dir)

    def told():
        row = http().get(f"{master.url}/status", timeout=10).json()["secondaries"][0]
        return "an admin restored archive entry" in row["detail"] and row
    wait_for("status says an admin restored it", told, 30)
    time.sleep(3)  # several looks and passes of the agent
    assert set_files(secondary.data_dir) == kept


def test_the_agent_logs_in_utc_like_status_and_its_verbose_log_is_its_own(fleet, tmp_path):
    """Under any TZ, the log's times are UTC with a Z (status, audit and archive use UTC);
    -v shows the agent's steps, not filelock's every try at a lock."""
    import re
    import subprocess
    import sys
    from datetime import datetime, timezone

    from conftest import REPO, stop_session

    f = fleet(1, master_ini=FAST_AGENT)
    log = tmp_path / "agent-v.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "agent", "-v", "--install-dir", str(f.master.root)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**__import__("os").environ, "TZ": "Pacific/Kiritimati"})
    try:
        wait_for("the agent starts", lambda: "agent started" in log.read_text(), 60)
        time.sleep(3)  # a few periodic looks, each taking the agent's locks
    finally:
        stop_session(proc)
    lines = log.read_text().splitlines()
    assert lines and not any("Attempting to acquire lock" in line or "Lock " in line for line in lines), lines[:20]
    now = datetime.now(timezone.utc)
    for line in lines:
        match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d{3}Z esmirror agent: ", line)
        assert match, line
        at = datetime.fromisoformat(match.group(1)).replace(tzinfo=timezone.utc)
        assert abs((now - at).total_seconds()) < 600, line  # (Kiritimati is UTC+14)


def test_sighup_stops_the_agent_cleanly_and_a_second_signal_stops_it_at_once(fleet, make_receiver,
                                                                              agents, tmp_path):
    """SIGHUP (a closed terminal, a logrotate postrotate) killed the agent outright; a
    second SIGTERM or Ctrl-C changed nothing, so a stop waited for the push under way,
    however long; and status said the killed agent ran for 30 s more."""
    import signal
    import sys

    gate, reloading = tmp_path / "gate", tmp_path / "reloading"
    script = tmp_path / "reload.py"
    script.write_text("import pathlib, sys, time\n"
                      f"pathlib.Path({str(reloading)!r}).touch()\n"
                      "for _ in range(600):  # (bounded: 2 minutes)\n"
                      f"    if not pathlib.Path({str(gate)!r}).exists():\n"
                      "        sys.exit(0)\n"
                      "    time.sleep(0.2)\n")
    gate.touch()
    f = fleet(1, master_ini={**FAST_AGENT, "reload_command": f"{sys.executable} {script}"})
    master = make_receiver(f.master)
    try:
        busy = agents(f.master)
        request_id = http().post(f"{master.url}/publish", json={}, timeout=10).json()["id"]
        wait_for("the publish runs reload_command", reloading.exists, 60)
        busy.proc.send_signal(signal.SIGHUP)
        wait_for("the agent says it stops after the publish",
                 lambda: "SIGHUP: stopping after the current push" in busy.output(), 10)
        assert busy.proc.poll() is None, busy.output()  # (the publish under way goes on)
        busy.proc.send_signal(signal.SIGTERM)
        assert busy.wait_exit(15) == 128 + signal.SIGTERM, busy.output()
        assert "SIGTERM again: stopping now" in busy.output()
        rc, status, out = esmirror("status", "--install-dir", str(f.master.root), "--json")
        assert status["agent"]["running"] is False, status["agent"]  # (its heartbeat is fresh)
    finally:
        gate.unlink()
    again = agents(f.master)
    record = wait_for("the restarted agent runs the request cut short",
                      lambda: finished(master, request_id), 90)
    assert record["state"] == "done" and record["ok"] is True and record["runs"] == 2, record
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)
    again.proc.send_signal(signal.SIGHUP)  # idle: a clean stop
    assert again.wait_exit(15) == 0, again.output()
    assert "agent stopped" in again.output()


def test_a_waiting_marker_of_a_dead_publish_stops_no_catch_up(tmp_path):
    """A publish killed while it waited for the lock left its marker; dated ahead (a clock
    set back), it made the agent stop every catch-up, twice a second, until that time."""
    import os
    import subprocess

    from agent.demo import make_install
    from agent.fleet import publish_waiting
    from app.core.settings import load_settings

    settings = load_settings(make_install(tmp_path / "m").root)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker = settings.state_dir / f"publish-waiting.{dead.pid}"
    marker.touch()
    ahead = time.time() + 3600
    os.utime(marker, (ahead, ahead))
    assert publish_waiting(settings) is False
    assert not marker.exists()
    alive = settings.state_dir / f"publish-waiting.{os.getpid()}"
    alive.touch()
    assert publish_waiting(settings) is True


def test_history_made_while_the_clock_was_ahead_is_pruned_by_age_all_the_same(tmp_path):
    """Records were aged by their ids; a publish made while the clock ran a year ahead
    gave every later id that year too, and no record was pruned until then."""
    import os

    from agent.demo import make_install
    from app.core.publishes import PublishQueue, new_id
    from app.core.settings import load_settings

    queue = PublishQueue(load_settings(make_install(tmp_path / "m").root))
    first = queue.submit({}, "127.0.0.1", ["a"], state="done")
    queue.path(first["id"]).unlink()
    first["id"] = new_id(time.time() + 365 * 86400)  # made while the clock ran a year ahead
    queue.save(first)
    for _ in range(59):  # (each numbered after the newest, as submit does)
        queue.submit({}, "127.0.0.1", ["a"], state="done")
    assert len(queue.all()) == 60 and all(r["id"] >= first["id"] for r in queue.all())
    earlier = time.time() - 7200
    for record in queue.all():
        os.utime(queue.path(record["id"]), (earlier, earlier))
    queue.prune(keep=50)
    assert len(queue.all()) == 50
