"""Issue 3 end to end: bad sets refused, reload rolled back, archive restore/clear, ownership, ordering."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

from app.core.apply import WorkingDir
from app.core.audit import read_audit
from app.core.settings import load_settings
from conftest import REPO, esmirror, session_from, set_files


def snapshot(install) -> tuple[dict[str, str], list[str], object]:
    """What a person would call "this secondary's state": its set, its archive, its generation."""
    archive = install.data_dir / "archive"
    entries = sorted(p.name for p in archive.iterdir()) if archive.is_dir() else []
    state = json.loads((install.data_dir / ".esmirror" / "state.json").read_text()) \
        if (install.data_dir / ".esmirror" / "state.json").exists() else {}
    return set_files(install.data_dir), entries, (state.get("generation"), state.get("digest"))


def archive_entries(install) -> list[dict]:
    rc, data, out = esmirror("archive", "list", "--json", "--install-dir", str(install.root))
    assert rc == 0, out
    # times as status, the audit log and the agent's log give them: UTC, seconds, Z
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["created"]) for e in data["archive"]), data
    return data["archive"]


BAD_CATALOGS = {
    "malformed": (b'<CatalogConfig>\n<Catalog name="a"><Path>/x</Path>\n', "not well-formed"),
    "wrong-root": (b'<Catalogs>\n<Catalog name="a"><Path>/x</Path></Catalog>\n</Catalogs>\n',
                   "root element is <Catalogs>"),
    "missing-path": (b'<CatalogConfig>\n<Catalog name="a"><Path>/x</Path></Catalog>\n'
                     b'<Catalog name="nopath"/>\n</CatalogConfig>\n', ":3: <Catalog name='nopath'> has no <Path>"),
    "xxe": (b'<?xml version="1.0"?>\n<!DOCTYPE c [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
            b'<CatalogConfig><Catalog name="a"><Path>&x;</Path></Catalog></CatalogConfig>\n', "DOCTYPE"),
    "billion-laughs": (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
                       + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                                  for i in range(1, 10))
                       + b']>\n<CatalogConfig><Catalog name="a"><Path>&lol9;</Path></Catalog></CatalogConfig>\n',
                       "DOCTYPE"),
}


def test_invalid_catalogs_refused_by_master_and_by_secondary_with_422(fleet):
    f = fleet(1)
    assert f.publish()[0] == 0
    secondary = f.secondaries[0]
    good = (f.master.data_dir / "catalogs.xml").read_bytes()
    before = snapshot(secondary)
    for name, (body, why) in BAD_CATALOGS.items():
        (f.master.data_dir / "catalogs.xml").write_bytes(body)
        (f.master.data_dir / "indexes" / "tile-0.idx").write_bytes(name.encode())  # a change to carry
        # the master checks its own catalogs.xml first: exit 1 with the reason, nothing sent
        rc, report, out = f.publish()
        assert rc == 1, (name, out)
        assert "is invalid; nothing was sent" in out and why in out, (name, out)
        # --json: still one document on stdout, saying the same
        assert report["ok"] is False and "nothing was sent" in report["error"], (name, report)
        assert any(why in reason for reason in report["reasons"]), (name, report)
        assert snapshot(secondary) == before, name
        # forced past the master's check, the secondary refuses it with 422 and the reasons
        rc, report, out = f.publish("--force")
        assert rc == 1, (name, out)
        error = report["secondaries"][0]["error"]
        assert "answered 422" in error and why in error, (name, error)
        assert report["secondaries"][0]["state"] != "in-sync"
        assert report["secondaries"][0]["reason"] == "invalid-set", name
        assert snapshot(secondary) == before, name
    (f.master.data_dir / "catalogs.xml").write_bytes(good)
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def _reload_script(tmp_path: Path) -> tuple[str, Path]:
    """A reload_command that records the catalogs.xml it saw and fails or hangs on demand,
    talkative either way (the decisive line comes last), and hanging in a child of its own."""
    flag = tmp_path / "reload-mode"
    flag.write_text("ok")
    seen = tmp_path / "seen-catalogs.xml"
    script = tmp_path / "reload.sh"
    script.write_text(f"""#!/bin/sh
cp catalogs.xml {seen}
case "$(cat {flag})" in
  fail) for i in $(seq 40); do echo "loading catalog $i of 41"; done
        echo "ltcsd: catalog orthos-2024 could not be loaded" >&2; exit 3;;
  hang) head -c 10000 /dev/zero | tr '\\0' y; sleep 37.25 & wait;;
esac
exit 0
""")
    return f"sh {script}", flag


def test_failing_reload_on_secondary_puts_previous_set_back(fleet, tmp_path):
    command, flag = _reload_script(tmp_path)
    f = fleet(1, secondary_ini={"reload_command": command, "reload_timeout": "1"})
    assert f.publish()[0] == 0
    secondary = f.secondaries[0]
    # folders of Express Server's or an admin's own, empty: no commit of a set touches them
    # (and one the new set puts a file into: a rollback takes the file back, not the folder)
    own = [secondary.data_dir / "localcache", secondary.data_dir / "indexes" / "emptysub",
           secondary.data_dir / "newdir"]
    for folder in own:
        folder.mkdir()
    before = snapshot(secondary)
    data = f.master.data_dir
    new_catalogs = (data / "catalogs.xml").read_text().replace('name="elevation"', 'name="dem"')
    (data / "catalogs.xml").write_text(new_catalogs)
    (data / "indexes" / "tile-1.idx").write_bytes(b"changed")
    (data / "overviews" / "basemap.ovr").unlink()
    (data / "indexes" / "new.idx").write_bytes(b"added")
    (data / "newdir").mkdir()
    (data / "newdir" / "f.idx").write_bytes(b"into a folder the secondary already had")
    (data / "brand" / "new").mkdir(parents=True)
    (data / "brand" / "new" / "f.idx").write_bytes(b"into folders the switch makes")

    for mode, why in (("fail", "exited with 3"), ("hang", "timed out after 1 s")):
        flag.write_text(mode)
        rc, report, out = f.publish()
        assert rc == 1, out
        error = report["secondaries"][0]["error"]
        assert "answered 502" in error and "the previous set is back" in error and why in error, error
        assert report["secondaries"][0]["reason"] == "reload-failed"
        if mode == "fail":
            assert "ltcsd: catalog orthos-2024 could not be loaded" in error
        assert snapshot(secondary) == before, mode  # byte for byte, no archive entry, same generation
        assert all(folder.is_dir() for folder in own), mode
        assert not (secondary.data_dir / "brand").exists(), mode  # made by the switch, taken back
        # the reload really ran against the new set before it was rolled back
        assert (tmp_path / "seen-catalogs.xml").read_text() != new_catalogs  # last run: the old set again
    # a reload that timed out was stopped with what it had started
    assert subprocess.run(["pgrep", "-f", "sleep 37.25"], capture_output=True).stdout == b""
    flag.write_text("ok")
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(data)
    assert (tmp_path / "seen-catalogs.xml").read_text() == new_catalogs
    assert all(folder.is_dir() for folder in own)


def test_new_files_take_their_place_even_over_a_symlink_the_scan_skips(fleet, tmp_path):
    """Files new to a secondary are linked into place straight from its blob store at the
    switch. A symlink standing where one goes (never mirrored, so not in the scan) gives
    way to the file, as a staged file's rename would make it; what it pointed to stays."""
    f = fleet(1)
    assert f.publish()[0] == 0
    secondary = f.secondaries[0]
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not part of any set")
    os.symlink(outside, secondary.data_dir / "indexes" / "b-new.idx")
    for name in ("a-new.idx", "b-new.idx", "c-new.idx"):
        (f.master.data_dir / "indexes" / name).write_bytes(f"new file {name}".encode())
    rc, report, out = f.publish()
    assert rc == 0, out
    placed = secondary.data_dir / "indexes" / "b-new.idx"
    assert not placed.is_symlink() and placed.read_bytes() == b"new file b-new.idx"
    assert outside.read_bytes() == b"not part of any set"
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    leftovers = [p.name for p in (secondary.data_dir / ".esmirror").rglob("*")
                 if p.is_file() and p.parent.name in ("blobs", "staging", "tmp")]
    assert leftovers == []


def test_a_symlink_to_a_folder_where_a_file_goes_is_set_aside_and_its_target_untouched(fleet, tmp_path):
    """The switch took a symlink to a folder, standing where a new file goes, for a folder
    of the old set: it walked into the target outside the working dir, removed the empty
    folders there, then failed (500) on the first non-empty one, publish after publish."""
    command, flag = _reload_script(tmp_path)
    f = fleet(1, secondary_ini={"reload_command": command})
    assert f.publish()[0] == 0
    secondary = f.secondaries[0]
    outside = tmp_path / "outside"
    for folder in ("emptyA", "emptyB/deeper", "keep"):
        (outside / folder).mkdir(parents=True)
    (outside / "keep" / "data.txt").write_text("kept")
    before = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    link = secondary.data_dir / "indexes" / "new.idx"
    os.symlink(outside, link)
    (f.master.data_dir / "indexes" / "new.idx").write_bytes(b"a file where the link was")

    flag.write_text("fail")  # a push rolled back puts the link back as it was
    rc, report, out = f.publish()
    assert rc == 1 and "the previous set is back" in report["secondaries"][0]["error"], out
    assert link.is_symlink() and os.readlink(link) == str(outside)
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before

    flag.write_text("ok")
    rc, report, out = f.publish()
    assert rc == 0, out
    assert not link.is_symlink() and link.read_bytes() == b"a file where the link was"
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before
    # the link itself is kept in the archive entry, as a file found there would be
    entry = archive_entries(secondary)[-1]
    meta = json.loads((secondary.data_dir / "archive" / entry["id"] / "archive.json").read_text())
    assert meta["set_aside"] == ["indexes/new.idx"], meta
    kept = secondary.data_dir / "archive" / entry["id"] / "files" / "indexes" / "new.idx"
    assert kept.is_symlink() and os.readlink(kept) == str(outside)
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    # the listing shows what the entry keeps beside the set's files, and a restore says it
    # does not put those back (they were invisible in both)
    assert entry["set_aside"] == ["indexes/new.idx"], entry
    rc, _, out = esmirror("archive", "list", "--install-dir", str(secondary.root))
    assert rc == 0 and "(+1 found outside the set)" in out, out
    rc, restored, out = esmirror("archive", "restore", entry["id"], "--json", "--install-dir",
                                 str(secondary.root))
    assert rc == 0, out
    assert any("found outside the set when entry" in w and "indexes/new.idx" in w
               for w in restored["warnings"]), restored


def test_failing_reload_on_master_stops_the_publish(fleet, tmp_path):
    command, flag = _reload_script(tmp_path)
    flag.write_text("fail")
    f = fleet(1, master_ini={"reload_command": command})
    rc, _, out = f.publish()
    assert rc == 1
    assert "reload_command failed on this master; nothing was sent" in out
    assert "could not be loaded" in out
    assert set_files(f.secondaries[0].data_dir) == {}
    assert not (f.secondaries[0].data_dir / ".esmirror" / "blobs").exists()


def test_archive_restore_brings_back_each_generation_and_clear_keeps_newest(fleet):
    f = fleet(1)
    secondary, data = f.secondaries[0], f.master.data_dir
    seen = []
    for step in range(4):
        if step:
            (data / "indexes" / "tile-1.idx").write_bytes(b"version %d" % step)
            (data / "indexes" / f"only-in-{step}.idx").write_bytes(os.urandom(100))
            if step > 1:
                (data / "indexes" / f"only-in-{step - 1}.idx").unlink()
        assert f.publish()[0] == 0
        seen.append(set_files(data))
        assert set_files(secondary.data_dir) == seen[-1]
    entries = archive_entries(secondary)
    assert [e["generation"] for e in entries] == [2, 3, 4]
    assert [e["replaced_generation"] for e in entries] == [1, 2, 3]
    root = str(secondary.root)

    # back to the set of generation 2 (just before the entry generation 3 created)
    rc, result, out = esmirror("archive", "restore", entries[1]["id"], "--json", "--install-dir", root)
    assert rc == 0, out
    assert set_files(secondary.data_dir) == seen[1]
    assert result["archive_id"]  # what the restore replaced is archived too
    # and it holds generation 2 again, as browse and the master's status then say
    assert result["generation"] == 2
    assert WorkingDir(load_settings(secondary.root)).state()["generation"] == 2
    # then to generation 1: its tile-1.idx lives only in the oldest entry now
    rc, _, out = esmirror("archive", "restore", entries[0]["id"], "--install-dir", root)
    assert rc == 0, out
    assert "restored the set as it was before" in out
    assert set_files(secondary.data_dir) == seen[0]
    # and forward again to generation 4, from the entry the first restore made
    after = archive_entries(secondary)
    assert len(after) == 5 and after[3]["id"] == result["archive_id"]
    assert after[3]["restored_from"] == entries[1]["id"]
    rc, _, out = esmirror("archive", "restore", after[3]["id"], "--install-dir", root)
    assert rc == 0, out
    assert set_files(secondary.data_dir) == seen[3]

    # content no longer on this server (every archived copy of generation 1's tile-1.idx deleted
    # by hand): refused, naming it, nothing changed
    gone = seen[0]["indexes/tile-1.idx"]
    copies = [p for p in (secondary.data_dir / "archive").rglob("tile-1.idx")
              if hashlib.sha256(p.read_bytes()).hexdigest() == gone]
    assert copies
    for p in copies:
        p.unlink()
    before = snapshot(secondary)
    rc, _, out = esmirror("archive", "restore", entries[0]["id"], "--install-dir", root)
    assert rc == 1 and "no longer on this server" in out and "indexes/tile-1.idx" in out, out
    assert snapshot(secondary) == before
    rc, _, out = esmirror("archive", "restore", "20990101T000000Z-g9-nope", "--install-dir", root)
    assert rc == 1 and "no archive entry" in out

    ids = [e["id"] for e in archive_entries(secondary)]
    rc, _, out = esmirror("archive", "clear", "--keep", "2", "--install-dir", root)
    assert rc == 0, out
    assert [e["id"] for e in archive_entries(secondary)] == ids[-2:]
    # the master publishes over a restored secondary as over any other
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(data)
    # each admin action is in that server's audit log, with who did it and how it ended
    actions = [line for line in read_audit(load_settings(secondary.root)) if line["event"] != "commit"]
    assert [(a["event"], a["outcome"]) for a in actions] == [
        ("restore", "ok"), ("restore", "ok"), ("restore", "ok"), ("restore", "refused 409"),
        ("restore", "refused 404"), ("archive-clear", "ok")]
    assert all(a["caller"].startswith("command line (") for a in actions)
    assert actions[0]["restored_from"] == entries[1]["id"] and set(actions[0]["files"]) == {"added", "changed", "removed"}
    assert actions[-1]["removed"] == sorted(ids[:-2])
    rc, _, out = esmirror("release", "--install-dir", root)
    assert rc == 0 and "released from master" in out
    last = read_audit(load_settings(secondary.root))[-1]
    assert (last["event"], last["outcome"]) == ("release", "released") and last["master"] in out


def test_an_archive_entry_whose_previous_json_is_damaged_says_so_and_what_removes_it(fleet):
    """It said to move previous.json aside, as for esmirror's other records; done, the
    restore said there is no such entry while 'archive list' still showed it."""
    f = fleet(1)
    secondary, data = f.secondaries[0], f.master.data_dir
    assert f.publish()[0] == 0
    (data / "indexes" / "tile-1.idx").write_bytes(b"changed")
    assert f.publish()[0] == 0
    [entry] = archive_entries(secondary)
    previous = secondary.data_dir / "archive" / entry["id"] / "previous.json"
    previous.write_text("{not json")
    before = set_files(secondary.data_dir)
    rc, _, out = esmirror("archive", "restore", entry["id"], "--install-dir", str(secondary.root))
    assert rc == 1 and "Traceback" not in out, out
    assert (f"archive entry {entry['id']} cannot be restored: its record {previous} is damaged; its "
            "files are still in its folder, and 'esmirror archive clear' can remove it") in out, out
    assert "move it aside" not in out and set_files(secondary.data_dir) == before


def test_an_archive_entry_from_before_previous_json_still_restores(fleet):
    """Entries made by earlier versions hold the replaced manifest inside archive.json."""
    f = fleet(1)
    secondary, data = f.secondaries[0], f.master.data_dir
    assert f.publish()[0] == 0
    first = set_files(data)
    (data / "indexes" / "tile-1.idx").write_bytes(b"changed")
    assert f.publish()[0] == 0
    [entry] = archive_entries(secondary)
    folder = secondary.data_dir / "archive" / entry["id"]
    record = json.loads((folder / "archive.json").read_text())
    assert "previous" not in record  # listing the archive reads only this small record
    record["previous"] = json.loads((folder / "previous.json").read_text())
    (folder / "archive.json").write_text(json.dumps(record))
    (folder / "previous.json").unlink()
    rc, _, out = esmirror("archive", "restore", entry["id"], "--install-dir", str(secondary.root))
    assert rc == 0, out
    assert set_files(secondary.data_dir) == first


def test_archive_clear_keep_and_older_than_semantics(tmp_path):
    from agent.demo import make_install

    install = make_install(tmp_path / "s")
    workdir = WorkingDir(load_settings(install.root))
    now = dt.datetime.now(dt.timezone.utc)
    ages = [40, 30, 20, 10, 5, 1]  # days, oldest first

    def make_entries() -> list[str]:
        ids = []
        for i, age in enumerate(ages):
            entry = workdir.archive_dir / f"2026010{i}T000000.000000Z-g{i}-x"
            (entry / "files").mkdir(parents=True, exist_ok=True)
            (entry / "files" / "a").write_text("x")
            created = (now - dt.timedelta(days=age)).isoformat(timespec="seconds")
            (entry / "archive.json").write_text(json.dumps(
                {"id": entry.name, "created": created, "files": ["a"], "previous": []}))
            ids.append(entry.name)
        return ids

    def clear(*args: str) -> list[str]:
        ids = make_entries()
        rc, _, out = esmirror("archive", "clear", *args, "--install-dir", str(install.root))
        assert rc == 0, out
        return [ids.index(e["id"]) for e in workdir.archives()]

    assert clear("--keep", "2") == [4, 5]
    assert clear("--older-than", "15") == [3, 4, 5]
    # both: an entry goes when it is beyond the newest 4 AND older than 25 days
    assert clear("--keep", "4", "--older-than", "25") == [2, 3, 4, 5]
    assert clear("--keep", "1", "--older-than", "25") == [2, 3, 4, 5]
    assert clear("--all") == []
    rc, _, out = esmirror("archive", "clear", "--install-dir", str(install.root))
    assert rc == 2 and "say what to clear" in out
    # --all beside --keep used to win silently, removing what --keep was given to keep
    make_entries()
    before = [e["id"] for e in workdir.archives()]
    assert len(before) == len(ages)
    for extra in (("--keep", "3"), ("--older-than", "1")):
        rc, _, out = esmirror("archive", "clear", "--all", *extra, "--install-dir", str(install.root))
        assert rc == 2 and "--all removes every entry: give it alone" in out, out
    for days in ("nan", "inf"):
        rc, _, out = esmirror("archive", "clear", "--older-than", days, "--install-dir", str(install.root))
        assert rc == 2 and "not inf or nan" in out, out
    assert [e["id"] for e in workdir.archives()] == before
    # killed while deleting an entry: it is gone whole from the archive, never half there
    ids = make_entries()
    rc, _, out = esmirror("archive", "clear", "--keep", "4", "--install-dir", str(install.root),
                          env={"ESMIRROR_CRASH_AT": "archive-trashed"})
    assert rc == -9, out
    assert [e["id"] for e in workdir.archives()] == [ids[0]] + ids[2:]  # (newest first: ids[1] went)
    trash = workdir.state_dir / "trash"
    assert [p.name.rsplit(".", 1)[0] for p in trash.iterdir()] == [ids[1]]
    with workdir.lock():
        workdir.recover()  # (as the next commit or the receiver's start does)
    assert not trash.exists()


def test_another_master_gets_409_naming_both_until_release(fleet):
    f = fleet(1)
    assert f.publish()[0] == 0
    url, secondary = f.receivers[0].url, f.secondaries[0]
    owner = (f.master.data_dir / ".esmirror" / "self-id").read_text().strip()
    manifest = requests.get(f"{url}/manifest", timeout=10).json()
    body = {"generation": 99, "master": "b" * 32, "base": manifest["digest"], "files": manifest["files"]}
    answer = requests.post(f"{url}/commit", json=body, timeout=30)
    assert answer.status_code == 409
    assert owner in answer.json()["error"] and "b" * 32 in answer.json()["error"]
    assert "esmirror release" in answer.json()["error"]
    rc, _, out = esmirror("release", "--install-dir", str(secondary.root))
    assert rc == 0 and owner in out
    answer = requests.post(f"{url}/commit", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert requests.get(f"{url}/browse", timeout=10).json()["master"] == "b" * 32


def test_unreadable_catalog_paths_warn_unless_require_paths(fleet, tmp_path):
    f = fleet(2, start=False)
    ini = f.secondaries[1].etc_dir / "esmirror.ini"
    ini.write_text(ini.read_text() + "require_paths = true\n")
    for r in f.receivers:
        r.start()
    catalogs = f.master.data_dir / "catalogs.xml"
    catalogs.write_text(catalogs.read_text().replace(f"{tmp_path}/images/dem", "/nonexistent/dem"))
    rc, report, out = f.publish()
    assert rc == 1, out
    warned, strict = report["secondaries"]
    assert warned["state"] == "in-sync"
    assert any("'elevation'" in w and "/nonexistent/dem" in w for w in warned["warnings"])
    assert "answered 422" in strict["error"] and "/nonexistent/dem" in strict["error"]
    assert "require_paths" in strict["error"]
    assert set_files(f.secondaries[1].data_dir) == {}
    browse = requests.get(f"{f.receivers[0].url}/browse", timeout=10).json()
    assert any("/nonexistent/dem" in w for w in browse["warnings"])


def test_a_relative_catalog_path_is_read_from_var_data_on_every_server(fleet, tmp_path):
    """A relative Path was checked against the working folder of whichever process looked:
    the admin's shell for publish, httpd's or the service's for a receiver. The same
    catalogs.xml was then readable on one side and not on the other."""
    f = fleet(1, master_ini={"require_paths": "true"})
    catalogs = f.master.data_dir / "catalogs.xml"
    relative = os.path.relpath(tmp_path / "images" / "dem", f.master.data_dir)
    assert relative.startswith("..")
    catalogs.write_text(catalogs.read_text().replace(f"{tmp_path}/images/dem", relative))
    rc, report, out = f.publish()  # (this test runs in the repository, not in var/data)
    assert rc == 0, out
    assert not any("not readable" in w for w in report["secondaries"][0]["warnings"]), report
    catalogs.write_text(catalogs.read_text().replace(relative, "../nowhere/dem"))
    rc, report, out = f.publish()
    assert rc == 1 and "require_paths = true" in out, out
    assert f"Path ../nowhere/dem (read as {f.master.data_dir}/../nowhere/dem) is not readable" in out


def test_two_publishes_at_the_same_moment_never_interleave(fleet):
    f = fleet(2)
    assert f.publish()[0] == 0
    data = f.master.data_dir
    (data / "indexes" / "tile-2.idx").write_bytes(os.urandom(50_000))
    (data / "overviews" / "basemap.ovr").write_bytes(os.urandom(70_000))
    (data / "indexes" / "tile-3.idx").unlink()
    argv = [sys.executable, "-m", "agent", "publish", "--install-dir", str(f.master.root), "--json"]
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    reports = [json.loads(out) for out, _ in outs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(r["generation"] for r in reports) == [2, 3]
    # the master lock serialised them: the change crossed the wire once per secondary
    sent = [sum(s["bytes_sent"] for s in r["secondaries"]) for r in reports]
    assert sorted(sent)[0] == 0 and sorted(sent)[1] >= 2 * 120_000
    for secondary in f.secondaries:
        assert set_files(secondary.data_dir) == set_files(data)
        entries = archive_entries(secondary)
        assert len(entries) == 1  # one apply replaced files: one whole entry, nothing mixed
        assert sorted(entries[0]["files"]) == ["indexes/tile-2.idx", "indexes/tile-3.idx",
                                               "overviews/basemap.ovr"]


def test_archive_over_http_list_clear_restore_admin_only(fleet):
    f = fleet(1)
    secondary, data, url = f.secondaries[0], f.master.data_dir, f.receivers[0].url
    seen = []
    for step in range(3):
        (data / "indexes" / "tile-4.idx").write_bytes(b"step %d" % step)
        assert f.publish()[0] == 0
        seen.append(set_files(data))
    web = session_from("127.0.0.1")
    listed = web.get(f"{url}/archive", timeout=10).json()["archive"]
    assert [e["generation"] for e in listed] == [2, 3]
    for e in listed:  # each entry's size, recorded when it was made (no walk of it per browse)
        folder = secondary.data_dir / "archive" / e["id"]
        walked = sum(p.stat().st_size for p in (folder / "files").rglob("*") if p.is_file())
        assert e["bytes"] == walked == json.loads((folder / "archive.json").read_text())["bytes"] > 0
    answer = web.post(f"{url}/archive/{listed[0]['id']}/restore", timeout=60)
    assert answer.status_code == 200, answer.text
    assert set_files(secondary.data_dir) == seen[0]
    assert web.post(f"{url}/archive/nope/restore", timeout=10).status_code == 404
    assert web.delete(f"{url}/archive", timeout=10).status_code == 400
    for bad in ("keep=many", "keep=-1", "older_than=-1", "older_than=nan", "older_than=1e-400x"):
        answer = web.delete(f"{url}/archive?{bad}", timeout=10)
        assert answer.status_code == 400 and answer.json()["error"], (bad, answer.text)
    stranger = session_from("127.0.0.2")
    for method, route in (("GET", "archive"), ("DELETE", "archive?all=1"),
                          ("POST", f"archive/{listed[1]['id']}/restore")):
        answer = stranger.request(method, f"{url}/{route}", timeout=10)
        assert answer.status_code == 403 and "127.0.0.2" in answer.json()["error"], route
    assert len(web.get(f"{url}/archive", timeout=10).json()["archive"]) == 3
    answer = web.delete(f"{url}/archive?keep=1", timeout=10)
    assert answer.status_code == 200 and len(answer.json()["removed"]) == 2
    assert [e["restored_from"] for e in web.get(f"{url}/archive", timeout=10).json()["archive"]] \
        == [listed[0]["id"]]
    actions = [(a["event"], a["outcome"], a["caller"]) for a in read_audit(load_settings(secondary.root))
               if a["event"] != "commit"]
    assert actions == [("restore", "ok", "127.0.0.1"), ("restore", "refused 404", "127.0.0.1"),
                       ("archive-clear", "ok", "127.0.0.1")]


def test_master_with_require_paths_refuses_to_publish_unreadable_paths(fleet, tmp_path):
    f = fleet(1, master_ini={"require_paths": "true"})
    catalogs = f.master.data_dir / "catalogs.xml"
    catalogs.write_text(catalogs.read_text().replace(f"{tmp_path}/images/dem", "/nonexistent/dem"))
    rc, _, out = f.publish()
    assert rc == 1 and "require_paths" in out and "/nonexistent/dem" in out, out
    assert set_files(f.secondaries[0].data_dir) == {}
    rc, _, out = esmirror("publish", "--install-dir", str(f.master.root), "--force")
    assert rc == 0, out  # --force skips the master's own check, as for an invalid catalogs.xml


def test_archive_keep_prunes_after_each_apply(fleet):
    f = fleet(1, secondary_ini={"archive_keep": "2"})
    data = f.master.data_dir
    for step in range(4):
        (data / "indexes" / "tile-0.idx").write_bytes(b"keep %d" % step)
        assert f.publish()[0] == 0
    assert [e["generation"] for e in archive_entries(f.secondaries[0])] == [3, 4]
    # the secondary's audit log says which entries went, and when (with the commit that did it)
    commits = [e for e in read_audit(load_settings(f.secondaries[0].root)) if e["event"] == "commit"]
    pruned = [(e["generation"], e.get("archive_pruned")) for e in commits]
    # (generation 1 found nothing to archive: entries came with 2, 3 and 4, and 4 was one too many)
    assert [(g, len(ids)) for g, ids in pruned if ids] == [(4, 1)] and "-g2-" in pruned[-1][1][0], pruned


def test_stale_base_and_older_generation_get_409_and_change_nothing(fleet):
    f = fleet(1)
    assert f.publish()[0] == 0
    (f.master.data_dir / "indexes" / "tile-0.idx").write_bytes(b"generation 2")
    assert f.publish()[0] == 0
    url, secondary = f.receivers[0].url, f.secondaries[0]
    owner = (f.master.data_dir / ".esmirror" / "self-id").read_text().strip()
    manifest = requests.get(f"{url}/manifest", timeout=10).json()
    files = [x for x in manifest["files"] if x["path"] != "indexes/tile-1.idx"]  # a removal
    before = snapshot(secondary)
    stale = requests.post(f"{url}/commit", timeout=30, json={
        "generation": 3, "master": owner, "base": "0" * 64, "files": files})
    assert stale.status_code == 409 and stale.json()["digest"] == manifest["digest"]
    older = requests.post(f"{url}/commit", timeout=30, json={
        "generation": 1, "master": owner, "base": manifest["digest"], "files": files})
    assert older.status_code == 409 and "older than generation 2" in older.json()["error"]
    assert snapshot(secondary) == before
    ok = requests.post(f"{url}/commit", timeout=30, json={
        "generation": 3, "master": owner, "base": manifest["digest"], "files": files})
    assert ok.status_code == 200, ok.text
    assert "indexes/tile-1.idx" not in set_files(secondary.data_dir)


def test_a_folder_symlink_on_the_secondary_is_never_written_through(fleet, tmp_path):
    """A secondary whose working dir holds a symlinked folder where the set puts files:
    refused (409) naming the link, nothing there or outside changed, until an admin
    replaces the link; then the publish goes through."""
    f = fleet(1)
    assert f.publish()[0] == 0
    secondary = f.secondaries[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(b"not part of any set")
    os.symlink(outside, secondary.data_dir / "plugins")
    (f.master.data_dir / "plugins").mkdir()
    (f.master.data_dir / "plugins" / "victim.txt").write_bytes(b"from the master")
    before = set_files(secondary.data_dir)
    rc, report, out = f.publish()
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert "409" in error and f"{secondary.data_dir / 'plugins'} is a symbolic link" in error, error
    assert (outside / "victim.txt").read_bytes() == b"not part of any set"
    assert set_files(secondary.data_dir) == before
    (secondary.data_dir / "plugins").unlink()
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    assert (outside / "victim.txt").read_bytes() == b"not part of any set"


def test_a_file_becomes_a_folder_two_levels_deep_and_back(fleet):
    """x, a file, becomes x/sub/deeper (a folder under a folder where the file was), and a
    restore turns it back: both used to fail with a 500 ('Not a directory')."""
    f = fleet(1)
    master, secondary = f.master.data_dir, f.secondaries[0]
    (master / "x").write_bytes(b"x as a file")
    assert f.publish()[0] == 0
    (master / "x").unlink()
    (master / "x" / "sub").mkdir(parents=True)
    (master / "x" / "sub" / "deeper").write_bytes(b"deep in a folder")
    rc, report, out = f.publish()
    assert rc == 0, out
    assert set_files(secondary.data_dir) == set_files(master)
    rc, _, out = esmirror("archive", "restore", archive_entries(secondary)[-1]["id"],
                          "--install-dir", str(secondary.root))
    assert rc == 0, out
    assert (secondary.data_dir / "x").read_bytes() == b"x as a file"
    rc, report, out = f.publish()
    assert rc == 0, out
    assert set_files(secondary.data_dir) == set_files(master)


def test_a_local_file_differing_by_case_is_set_aside_never_overwritten(fleet):
    """A secondary holds A.idx (the set's) and an admin's own a.idx: one name on Windows, so
    its scan keeps the first by name (A.idx) and leaves a.idx out, and says so. When the set
    then renames A.idx to a.idx, the admin's file is kept in the archive entry, not lost."""
    f = fleet(1)
    master, secondary = f.master.data_dir, f.secondaries[0]
    (master / "A.idx").write_bytes(b"the set's file")
    assert f.publish()[0] == 0
    (secondary.data_dir / "a.idx").write_bytes(b"LOCAL precious")
    info = requests.get(f"{f.receivers[0].url}/browse", timeout=30).json()
    assert any(w.startswith("a.idx: same name as 'A.idx'") and "left where it is" in w
               for w in info["warnings"]), info["warnings"]
    (master / "A.idx").rename(master / "a.idx")
    (master / "a.idx").write_bytes(b"the set's file, renamed")
    rc, report, out = f.publish()
    assert rc == 0, out
    # the commit's answer says where the admin's file went, not that it was left in place
    warnings = report["secondaries"][0]["warnings"]
    assert not any("left where it is" in w for w in warnings), warnings
    assert any("stood where the set puts one, and were kept in archive entry" in w and "a.idx" in w
               for w in warnings), warnings
    assert set_files(secondary.data_dir) == set_files(master)
    assert (secondary.data_dir / "a.idx").read_bytes() == b"the set's file, renamed"
    entry = archive_entries(secondary)[-1]
    kept = secondary.data_dir / "archive" / entry["id"] / "files"
    assert (kept / "a.idx").read_bytes() == b"LOCAL precious"
    assert (kept / "A.idx").read_bytes() == b"the set's file"
    meta = json.loads((secondary.data_dir / "archive" / entry["id"] / "archive.json").read_text())
    assert meta["set_aside"] == ["a.idx"] and meta["files"] == ["A.idx"], meta
    assert f.publish()[0] == 0  # and in sync from then on


def test_a_folder_that_becomes_a_file_but_holds_files_outside_the_set_gets_409(fleet):
    """x/ holds the set's x/in.idx and a file no set can hold (x/q?.idx). The set turns x
    into a file: the switch could not remove the folder, so the commit is refused (409,
    naming the file), nothing changes, and browse warned of the file all along."""
    f = fleet(1)
    master, secondary = f.master.data_dir, f.secondaries[0]
    (master / "x").mkdir()
    (master / "x" / "in.idx").write_bytes(b"in a folder")
    assert f.publish()[0] == 0
    (secondary.data_dir / "x" / "q?.idx").write_bytes(b"an admin's file")
    info = requests.get(f"{f.receivers[0].url}/browse", timeout=30).json()
    assert any(w.startswith("x/q?.idx: the character '?' is not allowed") for w in info["warnings"]), info
    shutil.rmtree(master / "x")
    (master / "x").write_bytes(b"now a file")
    before = set_files(secondary.data_dir)
    rc, report, out = f.publish()
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert "answered 409" in error and "x/q?.idx" in error and "move them out" in error, error
    assert set_files(secondary.data_dir) == before
    (secondary.data_dir / "x" / "q?.idx").unlink()
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(master)


def test_folders_differing_only_by_case_are_refused_by_name(fleet):
    """Dir/x.idx and dir/y.idx: two folders here, one on Windows. And Archive/ at the top:
    esmirror's own folder on Windows. The master refuses to publish and names each."""
    f = fleet(1)
    master = f.master.data_dir
    for rel in ("Dir/x.idx", "dir/y.idx", "Archive/z.idx"):
        (master / rel).parent.mkdir(exist_ok=True)
        (master / rel).write_bytes(rel.encode())
    rc, report, out = f.publish()
    assert rc == 1, out
    assert "dir/y.idx: in folder 'dir', which is 'Dir' on Windows" in out, out
    assert "Archive/z.idx: Archive/ is esmirror's own" in out, out
    assert not (f.secondaries[0].data_dir / "Dir").exists()


def test_an_archive_folder_that_is_a_symlink_is_refused_before_anything_changes(fleet, tmp_path):
    """archive/ moved to another volume and linked back: files go into it by rename, which
    fails part way across filesystems (and the rollback with it). Refused (409) first."""
    f = fleet(1)
    assert f.publish()[0] == 0
    (f.master.data_dir / "indexes" / "tile-0.idx").write_bytes(b"changed: an archive entry")
    assert f.publish()[0] == 0
    secondary = f.secondaries[0]
    (secondary.data_dir / "archive").rename(tmp_path / "elsewhere")
    (secondary.data_dir / "archive").symlink_to(tmp_path / "elsewhere")
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed")
    (f.master.data_dir / "indexes" / "tile-2.idx").unlink()
    before = set_files(secondary.data_dir)
    rc, report, out = f.publish()
    assert rc == 1, out
    error = report["secondaries"][0]["error"]
    assert "answered 409" in error and "archive is a symbolic link" in error, error
    assert set_files(secondary.data_dir) == before
    assert not (secondary.data_dir / ".esmirror" / "journal.json").exists()
    (secondary.data_dir / "archive").unlink()
    (tmp_path / "elsewhere").rename(secondary.data_dir / "archive")
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def test_entries_made_after_a_clock_step_back_are_the_newest_and_survive_pruning(fleet):
    f = fleet(1, secondary_ini={"archive_keep": "2"})
    secondary = f.secondaries[0]
    for round in range(3):
        (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"v%d" % round)
        assert f.publish()[0] == 0
    archive = secondary.data_dir / "archive"
    assert len(list(archive.iterdir())) == 2
    for entry in archive.iterdir():  # made while the clock was a year ahead
        entry.rename(archive / entry.name.replace("2026", "2027", 1).replace("2025", "2026", 1))
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"v3")
    rc, report, out = f.publish()
    assert rc == 0, out
    new_id = report["secondaries"][0]["archive_id"]
    assert new_id in [e["id"] for e in archive_entries(secondary)], (new_id, archive_entries(secondary))
    assert (archive / new_id / "files" / "indexes" / "tile-1.idx").read_bytes() == b"v2"


def test_a_damaged_entry_neither_blocks_another_restore_nor_the_text_listing(fleet):
    f = fleet(1)
    secondary = f.secondaries[0]
    for round in range(3):
        (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"v%d" % round)
        assert f.publish()[0] == 0
    oldest, *_, newest = archive_entries(secondary)
    (secondary.data_dir / "archive" / oldest["id"] / "archive.json").write_text("{broken")
    rc, _, out = esmirror("archive", "list", "--install-dir", str(secondary.root))
    assert rc == 0 and "damaged" in out and newest["id"] in out, out
    rc, _, out = esmirror("archive", "restore", newest["id"], "--install-dir", str(secondary.root))
    assert rc == 0, out
    assert (secondary.data_dir / "indexes" / "tile-1.idx").read_bytes() == b"v1"


def test_an_archive_id_that_walks_out_of_the_archive_names_no_entry(fleet):
    """`archive restore ..` must not take var/data itself for an archive entry: archive.json
    and previous.json are names a master may push there."""
    f = fleet(1)
    (f.master.data_dir / "archive.json").write_text('{"id": "..", "master": null}')
    (f.master.data_dir / "previous.json").write_text("[]")
    assert f.publish()[0] == 0
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed")
    assert f.publish()[0] == 0  # (an archive/ folder for ".." to climb out of)
    secondary = f.secondaries[0]
    assert (secondary.data_dir / "archive.json").is_file() and len(archive_entries(secondary)) == 1
    before = snapshot(secondary)
    for bad in ("..", "."):
        rc, _, out = esmirror("archive", "restore", bad, "--install-dir", str(secondary.root))
        assert rc == 1 and f"there is no archive entry {bad!r}" in out, out
    assert snapshot(secondary) == before


def test_a_restore_after_a_release_does_not_lock_the_new_master_out(fleet):
    """A secondary handed to a new master (release), then restored to a set of the old
    master's: the restore keeps the new owner's generation, so its next publish goes in."""
    f = fleet(1)
    secondary = f.secondaries[0]
    for round in range(4):
        (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"v%d" % round)
        assert f.publish()[0] == 0
    old_entry = archive_entries(secondary)[-1]  # replaced generation 3 of the old master
    rc, _, out = esmirror("release", "--install-dir", str(secondary.root))
    assert rc == 0, out
    shutil.rmtree(f.master.data_dir / ".esmirror")  # a new master: new id, generations from 1
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"new master's")
    assert f.publish()[0] == 0
    rc, _, out = esmirror("archive", "restore", old_entry["id"], "--install-dir", str(secondary.root))
    assert rc == 0, out
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"new master's, again")
    rc, report, out = f.publish()
    assert rc == 0, out
    assert (secondary.data_dir / "indexes" / "tile-1.idx").read_bytes() == b"new master's, again"


def test_an_admins_archive_clear_drops_the_idle_parts_of_a_large_upload_that_died(fleet):
    """A file sent in parts (over max_upload_bytes, or 4 GiB) whose push died left its
    '.partial' for 6 hours, past restarts and past 'archive clear', which every no-room
    message recommends; it can be gigabytes. Parts still arriving are left alone."""
    f = fleet(1)
    secondary, url = f.secondaries[0], f.receivers[0].url
    partials = []
    for n in range(2):
        whole = os.urandom(4096) + bytes([n])
        sha = hashlib.sha256(whole).hexdigest()
        answer = requests.put(f"{url}/blobs/{sha}", data=whole[:2048], timeout=30, headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes 0-2047/{len(whole)}"})
        assert answer.status_code in (200, 202), answer.text
        partials.append(secondary.data_dir / ".esmirror" / "tmp" / f"{sha}.partial")
    assert all(p.stat().st_size == 2048 for p in partials)
    an_hour_ago = time.time() - 3600
    os.utime(partials[0], (an_hour_ago, an_hour_ago))  # its master died an hour ago
    rc, _, out = esmirror("archive", "clear", "--keep", "20", "--install-dir", str(secondary.root))
    assert rc == 0, out
    assert "dropped 1 upload(s)" in out and "(2048 bytes;" in out, out
    assert not partials[0].exists() and partials[1].exists()


def test_folders_a_commit_emptied_are_gone_even_if_it_was_killed_at_its_commit_point(fleet):
    """The folders went after the commit point, and nothing tried again: a receiver killed
    right there left them empty for good."""
    f = fleet(1)
    deep = f.master.data_dir / "deep" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "f.idx").write_bytes(b"deep down")
    assert f.publish()[0] == 0
    secondary, receiver = f.secondaries[0], f.receivers[0]
    assert (secondary.data_dir / "deep" / "a" / "b" / "c" / "f.idx").exists()
    shutil.rmtree(f.master.data_dir / "deep")
    receiver.stop()
    receiver.env = {"ESMIRROR_CRASH_AT": "committed:1"}
    receiver.start()
    f.publish()  # (its answer is lost: the receiver dies at the commit point)
    receiver.stop()
    receiver.env = None
    receiver.start()
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    assert not (secondary.data_dir / "deep").exists()


def test_a_receiver_says_when_its_esmirror_ini_changed_since_it_started(fleet):
    """A receiver reads esmirror.ini once: an admin who took the master out of allow_push
    saw its pushes go on being applied, with nothing saying a restart was needed."""
    f = fleet(1)
    receiver, secondary = f.receivers[0], f.secondaries[0]

    def stale() -> bool:
        info = requests.get(f"{receiver.url}/browse", timeout=30).json()
        return any("changed since this receiver started" in w for w in info["warnings"])
    assert not stale()
    ini = secondary.etc_dir / "esmirror.ini"
    os.utime(ini)  # touched, not changed: nothing to say
    assert not stale()
    ini.write_text(ini.read_text() + "archive_keep = 3\n")
    assert stale()
    rc, report, out = f.publish()  # the master's report carries it too
    assert rc == 0 and any("restart it to use the change" in w for w in report["secondaries"][0]["warnings"]), out
    receiver.stop()
    receiver.start()
    assert not stale()


def test_a_waitress_receiver_told_to_stop_mid_commit_ends_the_commit_first(fleet, tmp_path):
    """SIGTERM to `esmirror serve` under waitress (systemctl stop, a reboot) lets the commit
    under way end, as gunicorn's graceful stop does, instead of killing it mid-switch: the set
    is applied, its reload ran to the end (longer than the 5 s waitress itself waits for the
    requests under way), and the receiver exits 0."""
    started, done = tmp_path / "reload-started", tmp_path / "reload-done"
    script = tmp_path / "reload.sh"
    script.write_text(f"#!/bin/sh\ntouch {started}\nsleep 6.5\ntouch {done}\n")
    f = fleet(1, secondary_ini={"reload_command": f"sh {script}"})
    receiver, secondary = f.receivers[0], f.secondaries[0]
    publish = subprocess.Popen([sys.executable, "-m", "agent", "publish", "--install-dir",
                                str(f.master.root), "--json"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline and publish.poll() is None:
            time.sleep(0.02)
        assert started.exists(), publish.communicate(timeout=60)[0]
        receiver.proc.send_signal(15)  # the main process only, as systemd's KillMode=mixed does
        assert receiver.proc.wait(timeout=30) == 0, receiver.log.read_text()
        assert done.exists(), "the reload_command was cut short"
        assert "esmirror receiver: stopped" in receiver.log.read_text()
    finally:
        out = publish.communicate(timeout=60)[0]
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    # (its answer may or may not have left before the exit: the next publish knows either way)
    assert publish.returncode in (0, 1), out
    receiver.start()
    assert f.publish()[0] == 0  # nothing to roll back at the start: generation 1 is its own
    assert requests.get(f"{receiver.url}/browse", timeout=10).json()["generation"] == 2


def test_a_commit_waits_while_another_holds_the_commit_lock(fleet):
    """One commit at a time, whoever else holds the lock (another gunicorn worker's commit,
    an admin's restore, a second master): a push waits for it and changes nothing until it
    is free, then applies."""
    import filelock

    f = fleet(1)
    assert f.publish()[0] == 0
    secondary = f.secondaries[0]
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed while the lock is held")
    before = snapshot(secondary)
    held = filelock.FileLock(secondary.data_dir / ".esmirror" / "commit.lock")
    held.acquire()
    try:
        publish = subprocess.Popen([sys.executable, "-m", "agent", "publish", "--install-dir",
                                    str(f.master.root), "--json"], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # the changed file's blob has arrived: the push is at its commit, or about to be
        blob = secondary.data_dir / ".esmirror" / "blobs" / hashlib.sha256(b"changed while the lock is held").hexdigest()
        deadline = time.monotonic() + 60
        while not blob.exists() and time.monotonic() < deadline and publish.poll() is None:
            time.sleep(0.05)
        assert blob.exists(), publish.communicate()[0]
        time.sleep(2)
        assert publish.poll() is None, publish.communicate()[0]  # waiting for the lock
        assert snapshot(secondary) == before
    finally:
        held.release()
    out = publish.communicate(timeout=60)[0]
    assert publish.returncode == 0, out
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def test_a_receiver_stopped_after_its_working_dir_was_removed_does_not_make_it_again(fleet):
    """Under waitress a stop waits for a commit under way by taking the commit lock, which
    made var/data's .esmirror/ folder again for its lock file: a removed install (or a
    test's folder) came back as debris nobody would clean."""
    f = fleet(1, server="waitress")
    assert f.publish()[0] == 0
    var = f.secondaries[0].data_dir.parent
    shutil.rmtree(var)
    f.receivers[0].stop()
    assert not var.exists(), sorted(str(p) for p in var.rglob("*"))
    assert "esmirror receiver: stopped" in f.receivers[0].log.read_text()
