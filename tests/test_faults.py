"""Issue 3: kill -9 the receiver at many points of a push; after a restart the set is whole.

Each round, the master flips between two sets A and B that differ in every way
a push can (changed, added, removed files, catalogs.xml, a folder that becomes
a file, a file sent in parts, one sent whole, small ones batched). Three
secondaries each get a different ``ESMIRROR_CRASH_AT`` kill point, so one
publish exercises three points; then every receiver is restarted clean, each
working directory must be byte for byte the old set or the new one with no
debris, and the next publish must bring all three in sync.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import threading
from pathlib import Path

import pytest
import requests

from agent.demo import SAMPLE_CATALOGS
from app.core.store import BlobWriter
from conftest import esmirror, set_files, unmount_all

MIB = 1024 * 1024

# (point, what it interrupts); each "name:N" kills at the N-th pass of crash_point(name)
POINTS = [
    # upload: blob bodies being written, verified, renamed; parts; batches
    "upload-write:1", "upload-write:2", "upload-write:4", "upload-verified:1", "upload-stored:1",
    "upload-part:1", "upload-part:2", "upload-batch-blob:1", "upload-batch-blob:3",
    "upload-batch-flushed:1", "upload-batch-stored:1", "upload-batch-stored:3",
    "upload-delta-rebuilt:1",
    # staging
    "stage:1", "stage:3", "stage:5", "staged:1",
    # journal written, then the switch file by file
    "journal:1", "switch-remove:1", "switch-remove:2", "switch-archive:1", "switch-archive:2",
    "switch-archive:4", "switch-put:1", "switch-put:2", "switch-put:4", "switch-put:6", "switched:1",
    # archiving and the commit point
    "archiving:1", "archived:1", "recorded:1", "committed:1",
    # a second kill inside the rollback that recovery runs at the next start
    "switch-put:3+rollback-op:1", "switch-remove:2+rollback-op:3",
]


def _sets(images: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    rnd = lambda n: os.urandom(n)  # noqa: E731
    catalogs = SAMPLE_CATALOGS.format(images=images).encode()
    a = {"catalogs.xml": catalogs, "indexes/orthos-2024.idx": rnd(3 * MIB),
         "indexes/mid.idx": rnd(MIB + MIB // 2), "overviews/basemap.ovr": rnd(64 * 1024),
         "indexes/large.idx": rnd(5 * MIB),
         **{f"indexes/tile-{i}.idx": rnd(4096 + 1000 * i) for i in range(5)}}
    b = dict(a)
    b["catalogs.xml"] = catalogs.replace(b"</CatalogConfig>", b'  <Catalog name="extra">\n'
                                         + f"    <Path>{images}/dem</Path>\n".encode()
                                         + b"  </Catalog>\n</CatalogConfig>")
    b["indexes/orthos-2024.idx"] = rnd(3 * MIB)
    b["indexes/mid.idx"] = rnd(MIB + MIB // 2)
    b["indexes/tile-1.idx"] = rnd(5000)
    middle = 2 * MIB  # a large file changed inside travels as a delta against the old one
    b["indexes/large.idx"] = a["indexes/large.idx"][:middle] + rnd(MIB) + a["indexes/large.idx"][middle + MIB:]
    del b["indexes/tile-2.idx"], b["overviews/basemap.ovr"]
    b["overviews"] = b"a file where a folder was"
    b.update({f"new/n-{i}.idx": rnd(2000 + i) for i in range(3)})
    return a, b


def _write_set(data: Path, files: dict[str, bytes]) -> None:
    for child in data.iterdir():
        if child.name not in (".esmirror", "archive"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for rel, body in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(body)


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}


def debris(data: Path, after_publish: bool = False) -> list[str]:
    """What a crash may not leave behind: journal, staging, temp files, half-made archive entries."""
    state = data / ".esmirror"
    found = []
    if (state / "journal.json").exists():
        found.append("journal.json")
    if (state / "staging").exists() and any((state / "staging").iterdir()):
        found.append("staging/ not empty")
    found += [p.name for p in state.iterdir() if p.name.endswith(".tmp")]
    if (state / "tmp").exists():
        # a part upload cut short may stay until the blob is sent again (from byte 0)
        found += [f"tmp/{p.name}" for p in (state / "tmp").iterdir()
                  if after_publish or not p.name.endswith(".partial")]
    if (data / "archive").exists():
        found += [f"archive/{p.name} without archive.json" for p in (data / "archive").iterdir()
                  if not (p / "archive.json").is_file()]
    return found


def _start_all(receivers, envs) -> None:
    errors: list[BaseException] = []

    def go(receiver, env) -> None:
        receiver.env = env
        try:
            receiver.start(wait=60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(r, e)) for r, e in zip(receivers, envs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    if errors:
        raise errors[0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_kill_9_at_every_point_leaves_old_or_new_set_and_next_publish_works(fleet, tmp_path, server):
    """waitress: the receiver's process dies, and recovery runs when it is started again.
    gunicorn: the worker dies, the arbiter starts another, and the next request, in any
    worker, recovers (its bodies are read off the socket, and a changed large file
    arrives as a streamed delta, so its upload paths differ). A second kill inside that
    recovery needs a second crash point in the same server's life: waitress's case only."""
    assert len({p.split("+")[0] for p in POINTS}) >= 30
    f = fleet(3, server=server, secondary_ini={"max_upload_bytes": "2M"})  # the 3 MiB file travels in parts
    set_a, set_b = _sets(tmp_path / "images")
    _write_set(f.master.data_dir, set_a)
    rc, _, out = f.publish()
    assert rc == 0, out
    current, digests = set_a, _digests(set_a)
    points = [p for p in POINTS if server == "waitress" or "+" not in p]
    survivors: list[str] = []
    while points:
        batch, points = points[:3], points[3:]
        new = set_b if current is set_a else set_a
        old_digests, new_digests = digests, _digests(new)
        _write_set(f.master.data_dir, new)
        f.stop()
        markers = [tmp_path / f"killed-{len(points)}-{i}" for i in range(len(batch))]
        _start_all(f.receivers, [{"ESMIRROR_CRASH_AT": p.split("+")[0]} if server == "waitress" else
                                 {"ESMIRROR_CRASH_AT": p, "ESMIRROR_CRASH_ONCE": str(m)}
                                 for p, m in zip(batch, markers)] + [{}] * (3 - len(batch)))
        f.publish()  # killed part way on the secondaries that have a point
        for receiver, secondary, point, marker in zip(f.receivers, f.secondaries, batch, markers):
            if server == "gunicorn":
                if not marker.exists():
                    survivors.append(point)
                assert receiver.proc.poll() is None, point  # the arbiter lives on
                assert receiver_browse(receiver)["drift"] is False, point  # the next request recovered
                assert set_files(secondary.data_dir) in (old_digests, new_digests), point
                assert [d for d in debris(secondary.data_dir) if not d.startswith("tmp/")] == [], point
            elif receiver.proc.poll() is None:
                survivors.append(point)  # the point was never reached: the list is wrong
            receiver.stop()
            if "+" in point:  # crash again inside the rollback run by recovery at start
                receiver.env = {"ESMIRROR_CRASH_AT": point.split("+")[1]}
                with pytest.raises(RuntimeError, match="exited"):
                    receiver.start(wait=60)
        for receiver in f.receivers[len(batch):]:
            receiver.stop()
        _start_all(f.receivers, [{}] * 3)
        for secondary, point in zip(f.secondaries, batch + [""] * 3):
            got = set_files(secondary.data_dir)
            odd = {k: (got.get(k), old_digests.get(k), new_digests.get(k))
                   for k in set(got) | set(old_digests) if got.get(k) != old_digests.get(k)}
            assert got in (old_digests, new_digests), (point, "differs from the old set in", odd)
            assert debris(secondary.data_dir) == [], point
        for receiver, point in zip(f.receivers, batch):
            browse = receiver_browse(receiver)
            assert browse["drift"] is False, (point, "state.json does not describe the set")
        rc, report, out = f.publish()
        assert rc == 0, (batch, out)
        replaced = {p: h for p, h in old_digests.items() if new_digests.get(p) != h}
        for secondary in f.secondaries:
            assert set_files(secondary.data_dir) == new_digests
            assert debris(secondary.data_dir, after_publish=True) == []
            # nothing lost: the newest archive entry holds every file the switch replaced
            newest = sorted((secondary.data_dir / "archive").iterdir())[-1] / "files"
            assert {p.relative_to(newest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in newest.rglob("*") if p.is_file()} == replaced
        current, digests = new, new_digests
    assert survivors == [], f"these kill points were never reached: {survivors}"


def test_a_blob_left_linked_to_a_live_file_is_never_trusted_again(fleet):
    """Killed after its commit point, before it dropped its blobs' names: each blob it linked
    into place still shares its file with the live one. An edit in place (an editor keeping
    hard links, a script opening r+) changes both. The restarted receiver drops such names,
    so the next publish puts the master's content back instead of 'finding' it uploaded."""
    f = fleet(1)
    assert f.publish()[0] == 0
    receiver, secondary = f.receivers[0], f.secondaries[0]
    receiver.stop()
    receiver.env = {"ESMIRROR_CRASH_AT": "committed"}
    receiver.start(wait=60)
    content = os.urandom(300_000)
    (f.master.data_dir / "indexes" / "n1.idx").write_bytes(content)
    f.publish()  # killed just after its commit point
    assert receiver.proc.wait(timeout=30) is not None
    receiver.env = {}
    receiver.start(wait=60)
    blobs = secondary.data_dir / ".esmirror" / "blobs"
    assert [b.name for b in blobs.iterdir() if b.stat().st_nlink > 1] == [] if blobs.is_dir() else True
    live = secondary.data_dir / "indexes" / "n1.idx"
    assert live.read_bytes() == content  # the set is the new one
    with open(live, "r+b") as fh:  # in place: same inode
        fh.write(b"HAND-EDIT")
    rc, report, out = f.publish()
    assert rc == 0, out
    assert live.read_bytes() == content, "the hand edit survived a publish that said in-sync"
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def killed_at(f, receiver, point: str) -> None:
    """Publish to a receiver that kills itself at ``point``, then start it again, clean."""
    receiver.stop()
    receiver.env = {"ESMIRROR_CRASH_AT": point}
    receiver.start()
    rc, _, out = f.publish()
    assert rc == 1 and receiver.proc.poll() is not None, out  # killed there
    receiver.stop()
    receiver.env = {}
    receiver.start()


def receiver_browse(receiver) -> dict:
    import requests

    return requests.get(f"{receiver.url}/browse", timeout=30).json()


# --- a full disk -------------------------------------------------------------------------

@pytest.fixture
def tmpfs():
    """mount(path, size): a small tmpfs over ``path``, unmounted at teardown (after the servers stop)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str, inodes: int | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(path)

    yield mount
    unmount_all(mounted)


def _on_tmpfs(tmpfs, install, size: str, inodes: int | None = None) -> None:
    var = install.data_dir.parent
    tmpfs(var, size, inodes)
    install.data_dir.mkdir()


def _published_on_tmpfs(tmpfs, fleet, size: str):
    """One secondary whose var/ is a tmpfs of ``size``, the set published to it."""
    f = fleet(1, start=False)
    secondary, receiver = f.secondaries[0], f.receivers[0]
    _on_tmpfs(tmpfs, secondary, size)
    receiver.start()
    assert f.publish()[0] == 0
    return f, secondary, receiver


@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_a_file_that_fits_once_but_not_twice_is_refused_before_sending_under_waitress(tmpfs, fleet, server):
    """waitress writes an upload to disk before the receiver stores it: a 30 MiB file on a
    disk with ~46 MB free was sent whole, then refused (507) for the second copy, while the
    master's own check said it fit. gunicorn stores it straight off the socket."""
    f = fleet(1, server=server, start=False)
    secondary = f.secondaries[0]
    _on_tmpfs(tmpfs, secondary, "48m")
    f.receivers[0].start()
    assert f.publish()[0] == 0
    with open(f.master.data_dir / "indexes" / "big.idx", "wb") as fh:
        fh.write(os.urandom(30 * MIB))
    rc, report, out = f.publish()
    result = report["secondaries"][0]
    if server == "gunicorn":
        assert rc == 0, out
        return
    assert rc == 1 and result["bytes_sent"] == 0, result
    assert "for the copies its server (waitress) writes of the uploads in flight" in result["error"]


def test_push_that_cannot_fit_is_refused_before_sending_and_changes_nothing(tmpfs, fleet):
    f = fleet(1, start=False)
    secondary = f.secondaries[0]
    _on_tmpfs(tmpfs, secondary, "24m")
    f.receivers[0].start()
    rc, _, out = f.publish()
    assert rc == 0, out
    before = set_files(secondary.data_dir)
    with open(f.master.data_dir / "indexes" / "huge.idx", "wb") as fh:
        fh.write(os.urandom(30 * MIB))
    rc, report, out = f.publish()
    assert rc == 1, out
    result = report["secondaries"][0]
    assert result["state"] != "in-sync"
    assert "has no room for this set" in result["error"] and "nothing was sent" in result["error"]
    assert re.search(r"needs \d+ bytes(, of which \d+ for the copies its server \(waitress\) writes of "
                     r"the uploads in flight before storing them)? but only \d+ are free there \(\d+ kept in reserve\)",
                     result["error"]), result["error"]
    # the archive is empty (one publish, nothing replaced): 'archive clear' would free nothing
    assert re.search(r"Its archive is empty: free \d+ bytes on 127\.0\.0\.1's disk another way, "
                     r"or grow it", result["error"]), result["error"]
    assert "archive clear" not in result["error"]
    assert result["bytes_sent"] == 0 and result["files_sent"] == 0
    assert set_files(secondary.data_dir) == before
    assert debris(secondary.data_dir, after_publish=True) == []
    (f.master.data_dir / "indexes" / "huge.idx").unlink()
    (f.master.data_dir / "indexes" / "small.idx").write_bytes(b"fits")
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def test_a_set_that_would_eat_into_the_reserve_is_refused_on_both_sides(tmpfs, fleet):
    """esmirror never fills a disk to the last bytes: a set that fits the free space but not
    beside the reserve (16 MiB, or 2 % of a small disk) is refused by the master before it
    sends a byte; the check the secondary's views make before storing (check_room) refuses
    the same."""
    from app.core.errors import NoRoom
    from app.core.room import check_room

    f = fleet(1, start=False)
    secondary = f.secondaries[0]
    _on_tmpfs(tmpfs, secondary, "24m")
    f.receivers[0].start()
    assert f.publish()[0] == 0
    before = set_files(secondary.data_dir)
    info = requests.get(f"{f.receivers[0].url}/browse", timeout=30).json()
    free, reserve = info["free_bytes"], info["reserve_bytes"]
    assert 0 < reserve < free
    with open(f.master.data_dir / "indexes" / "almost.idx", "wb") as fh:
        fh.write(os.urandom(free - reserve // 2))  # fits the free space, not beside the reserve
    rc, report, out = f.publish()
    assert rc == 1, out
    result = report["secondaries"][0]
    assert f"({reserve} kept in reserve); nothing was sent" in result["error"], result["error"]
    assert result["bytes_sent"] == 0 and set_files(secondary.data_dir) == before
    state_dir = secondary.data_dir / ".esmirror"
    with pytest.raises(NoRoom, match="in reserve"):
        check_room(state_dir, shutil.disk_usage(state_dir).free - reserve // 2, "this upload")
    check_room(state_dir, shutil.disk_usage(state_dir).free - reserve - MIB, "this upload")


def test_a_set_with_more_new_files_than_free_inodes_is_refused_before_sending(tmpfs, fleet):
    """The room check counted bytes only: a disk out of inodes took the uploads, then the
    commit failed with 'disk full' while df showed plenty free, and the blobs stayed."""
    f = fleet(1, start=False)
    secondary = f.secondaries[0]
    _on_tmpfs(tmpfs, secondary, "64m", inodes=300)
    f.receivers[0].start()
    assert f.publish()[0] == 0
    before = set_files(secondary.data_dir)
    many = f.master.data_dir / "many"
    many.mkdir()
    for n in range(400):
        (many / f"{n}.idx").write_bytes(b"%d" % n)
    rc, report, out = f.publish()
    assert rc == 1, out
    result = report["secondaries"][0]
    assert "it brings 400 new files but the filesystem there has only" in result["error"], result
    assert "inodes free" in result["error"] and "nothing was sent" in result["error"]
    assert result["bytes_sent"] == 0 and result["files_sent"] == 0
    assert set_files(secondary.data_dir) == before
    assert not list((secondary.data_dir / ".esmirror" / "blobs").glob("*"))


def test_blobs_a_cut_short_push_left_are_not_sent_again_nor_counted_twice(tmpfs, fleet):
    """A push cut short after its uploads (master killed, a commit refused) leaves verified
    blobs in the secondary's store. The next push neither sends them again nor counts them as
    bytes still to find room for: that refused every publish to a nearly full disk."""
    f = fleet(1, start=False)
    secondary, receiver = f.secondaries[0], f.receivers[0]
    _on_tmpfs(tmpfs, secondary, "20m")
    receiver.start()
    assert f.publish()[0] == 0
    body = os.urandom(7 * MIB)
    (f.master.data_dir / "indexes" / "new.idx").write_bytes(body)
    sha = hashlib.sha256(body).hexdigest()
    # the upload of a push that then died before its commit
    answer = requests.put(f"{receiver.url}/blobs/{sha}", data=body, timeout=60)
    assert answer.status_code in (200, 201), answer.text
    # now the disk holds too little for the file a second time, but enough to link the blob
    free = shutil.disk_usage(secondary.data_dir).free
    filler = secondary.data_dir.parent / "filler"
    filler.write_bytes(b"\0" * max(0, free - 5 * MIB))
    rc, report, out = f.publish()
    assert rc == 0, out
    assert report["secondaries"][0]["files_sent"] == 0 and report["secondaries"][0]["bytes_sent"] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    assert not list((secondary.data_dir / ".esmirror" / "blobs").glob("*"))


def test_archive_clear_works_on_a_full_disk_and_drops_uploads_left_waiting(tmpfs, fleet):
    """Every "no room" message says to run 'esmirror archive clear'. On a disk with no inode
    (or block) left it failed making its trash folder, and it left the uploads of a push cut
    short, which hold space for a day, where they were."""
    f = fleet(1, start=False)
    secondary, receiver = f.secondaries[0], f.receivers[0]
    _on_tmpfs(tmpfs, secondary, "32m", inodes=400)
    receiver.start()
    assert f.publish()[0] == 0
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed: the old one is archived")
    assert f.publish()[0] == 0
    archive = secondary.data_dir / "archive"
    assert len([e for e in archive.iterdir() if (e / "archive.json").exists()]) == 1
    body = os.urandom(MIB)  # the upload of a push that then died before its commit
    sha = hashlib.sha256(body).hexdigest()
    assert requests.put(f"{receiver.url}/blobs/{sha}", data=body, timeout=60).status_code in (200, 201)
    receiver.stop()  # (its own files are open; the disk is now filled to the last inode)
    filler = secondary.data_dir.parent / "filler"
    filler.mkdir()
    with pytest.raises(OSError):
        for n in range(1000):
            (filler / str(n)).touch()
    rc, _, out = esmirror("archive", "clear", "--all", "--install-dir", str(secondary.root))
    assert rc == 0, out
    assert "removed 1 archive entry; dropped 1 upload(s)" in out and f"({MIB} bytes;" in out
    assert not any((e / "archive.json").exists() for e in archive.iterdir())
    assert not list((secondary.data_dir / ".esmirror" / "blobs").iterdir())
    shutil.rmtree(filler)
    receiver.start()
    (f.master.data_dir / "indexes" / "after.idx").write_bytes(b"room again")
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def test_out_of_inodes_is_told_apart_and_a_failed_record_names_its_file(tmpfs, tmp_path):
    """ENOSPC with bytes free is a filesystem out of inodes (df shows no problem, df -i
    does); and a record whose write failed named no file ('esmirror: No space left')."""
    from app.core.state import write_json
    from app.core.room import what_is_full

    disk = tmp_path / "disk"
    tmpfs(disk, "8m", inodes=50)
    with pytest.raises(OSError):
        for n in range(100):
            (disk / str(n)).touch()
    words, free = what_is_full(disk)
    assert "has no free inodes left" in words and "df -i" in words and free > MIB
    for n in range(10):
        (disk / str(n)).unlink()
    try:
        with open(disk / "filler", "wb") as fh:  # every block taken
            while True:
                fh.write(b"\0" * MIB)
    except OSError:
        pass
    with pytest.raises(OSError) as failed:
        write_json(disk / "ledger.json", {"big": "x" * MIB})
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(disk / "ledger.json")
    assert "the disk is full at" in what_is_full(disk)[0]
    assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]


def test_a_read_only_working_dir_is_said_and_the_receiver_still_starts(tmpfs, fleet):
    """Linux remounts a filesystem read-only after I/O errors. The receiver then reported ok,
    answered pushes 'check that LT_IS_USER owns var/data', and did not start again at all."""
    f, secondary, receiver = _published_on_tmpfs(tmpfs, fleet, "32m")
    before = set_files(secondary.data_dir)
    var = secondary.data_dir.parent
    subprocess.run(["mount", "-o", "remount,ro", str(var)], check=True)
    try:
        status = requests.get(f"{receiver.url}/status", timeout=30).json()
        assert status["ok"] is False and "read-only filesystem" in status["detail"], status
        (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"changed")
        rc, report, out = f.publish()
        assert rc == 1, out
        error = report["secondaries"][0]["error"]
        assert "read-only filesystem" in error and "remount it read-write" in error, error
        assert "LT_IS_USER" not in error
        receiver.stop()
        receiver.start()  # (it failed here: commit.lock cannot be made)
        info = requests.get(f"{receiver.url}/browse", timeout=30).json()
        assert any("read-only filesystem" in w for w in info["warnings"]), info
        assert set_files(secondary.data_dir) == before
    finally:
        receiver.stop()
        subprocess.run(["mount", "-o", "remount,rw", str(var)], check=True)
    receiver.start()
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def test_disk_filling_up_during_an_upload_answers_507_and_keeps_nothing(tmpfs, fleet, tmp_path):
    """Another writer fills the disk after the room check passed: 507, no temp file, set intact."""
    f = fleet(1, server="gunicorn", start=False)  # gunicorn hands the body over as it arrives
    secondary, receiver = f.secondaries[0], f.receivers[0]
    _on_tmpfs(tmpfs, secondary, "16m")
    receiver.start()
    rc, _, out = f.publish()
    assert rc == 0, out
    before = set_files(secondary.data_dir)
    body = os.urandom(8 * MIB)
    sha = hashlib.sha256(body).hexdigest()
    tmp_dir = secondary.data_dir / ".esmirror" / "tmp"
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        sock.sendall(f"PUT /lizardtech/mirror/blobs/{sha} HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body[:MIB])
        deadline = time.monotonic() + 30
        while not (tmp_dir.is_dir() and any(tmp_dir.iterdir())):
            assert time.monotonic() < deadline, "the upload never started writing"
            time.sleep(0.02)
        filler = secondary.data_dir.parent / "filler"  # on the same disk, outside the set
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * MIB)
                    fh.flush()
            except OSError:
                pass
        try:
            sock.sendall(body[MIB:])
        except OSError:
            pass  # the receiver may answer and close before reading the rest
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 507"), answer[:300]
    assert b"disk is full" in payload and b"nothing was kept" in payload
    assert list(tmp_dir.iterdir()) == []
    assert not (secondary.data_dir / ".esmirror" / "blobs" / sha).exists()
    assert set_files(secondary.data_dir) == before
    filler.unlink()
    (f.master.data_dir / "indexes" / "after.idx").write_bytes(b"room again")
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


def test_a_direct_write_cut_short_by_a_full_disk_ends_as_no_room_not_as_an_io_error(tmpfs, tmp_path):
    """A write the disk can only take part of returns short; the next one says ENOSPC (the
    upload's 507). Treating the short write itself as an error made it a 500."""
    disk = tmp_path / "disk"
    tmpfs(disk, "4m")
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * (2 * MIB + MIB // 2))  # 1.5 MiB left: the second 1 MiB write is cut short
    with pytest.raises(OSError) as raised:
        with BlobWriter(disk / "blob", 8 * MIB) as out:
            for _ in range(8):
                out.write(os.urandom(MIB))
            out.finish()
    assert raised.value.errno == errno.ENOSPC, raised.value


@pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="O_DIRECT is Linux's")
def test_a_device_that_refuses_direct_writes_mid_blob_gets_them_through_the_page_cache(tmp_path, monkeypatch):
    """Some devices and filesystems take O_DIRECT at open and refuse its writes (EINVAL: an
    alignment larger than ours). No such device can be made on this machine, so the refusal
    is injected: the first direct write fails as the kernel would fail it. The blob must
    still be whole and right, written through the page cache from then on."""
    import app.core.store as store

    real_write, refused = os.write, []

    def write(fd: int, data) -> int:
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    try:  # a filesystem that refuses O_DIRECT at open (an older tmpfs) takes the other path
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} refuses O_DIRECT at open")
    monkeypatch.setattr(store.os, "write", write)
    content = os.urandom(6 * MIB + 123)  # not a whole number of blocks: the tail is padded, then cut
    hasher = hashlib.sha256()
    with BlobWriter(tmp_path / "blob", len(content), hasher=hasher) as out:
        assert out.direct  # this machine's filesystem takes O_DIRECT at open
        out.write(content[:MIB // 2])
        out.write(content[MIB // 2:])
        out.finish()
    assert refused == [MIB]  # one direct write refused, every later one went through the page cache
    assert (tmp_path / "blob").read_bytes() == content
    assert hasher.hexdigest() == hashlib.sha256(content).hexdigest()


def test_a_master_whose_disk_is_full_says_so_and_its_agent_waits_it_out(tmpfs, fleet, make_receiver, tmp_path):
    """POST publish on a full disk is 507 naming the file, not a bare 500; the agent neither
    dies at start (a restart loop under systemd) nor retries every tick: it waits, says why
    once in a while, and runs the request once there is room."""
    from agent.demo import write_sample_set
    from agentproc import FAST_AGENT, AgentProcess, http, wait_for

    f = fleet(1, master_ini=FAST_AGENT)
    _on_tmpfs(tmpfs, f.master, "4m")
    write_sample_set(f.master.data_dir, tmp_path / "images", big_mb=1)
    master = make_receiver(f.master)
    filler = f.master.data_dir.parent / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    answer = http().post(f"{master.url}/publish", json={}, timeout=10)
    assert answer.status_code == 507 and "disk is full" in answer.json()["error"], answer.text
    agent = AgentProcess(f.master, tmp_path / "agent.log").start()
    try:
        time.sleep(3)
        assert agent.proc.poll() is None, agent.output()  # alive, though it cannot write its pulse
        filler.unlink()
        answer = http().post(f"{master.url}/publish", json={}, timeout=10)
        assert answer.status_code == 202, answer.text
        request_id = answer.json()["id"]
        record = wait_for("the agent runs it", lambda: http().get(f"{master.url}/publish/{request_id}",
                                                                    timeout=10).json()["state"] == "done", 60)
        assert record
        assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)
        assert "Traceback" not in agent.output(), agent.output()
    finally:
        agent.stop()


def test_a_file_list_too_big_for_the_secondary_is_refused_before_any_upload(tmpfs, fleet, tmp_path):
    """The commit carries the set's file list in one body, held to the secondary's
    max_upload_bytes: over it, every blob went up and then the commit got 413, publish after
    publish. The master now compares first and sends nothing."""
    from agent.demo import write_sample_set

    f = fleet(1, secondary_ini={"max_upload_bytes": "1M"})
    _on_tmpfs(tmpfs, f.master, "64m")  # (4,000 files: on a tmpfs, not the disk)
    write_sample_set(f.master.data_dir, tmp_path / "images", big_mb=1)
    folder = f.master.data_dir / ("a-long-folder-name-" * 8)
    folder.mkdir()
    for i in range(4000):
        (folder / f"{i:05d}-{'x' * 150}.idx").write_bytes(b"%d" % i)
    rc, report, out = f.publish()
    assert rc == 1, out
    result = report["secondaries"][0]
    assert "cannot take this set's commit" in result["error"] and "nothing was sent" in result["error"], result
    assert "max_upload_bytes" in result["error"] and result["bytes_sent"] == 0
    assert set_files(f.secondaries[0].data_dir) == {}


@pytest.mark.parametrize("point", ["switch-set-aside:1", "switch-put:1", "recorded:1"])
def test_a_kill_after_a_local_file_was_set_aside_puts_it_back(fleet, point):
    """An admin's a.idx beside the set's A.idx (one name on Windows) is set aside into the
    archive when the set renames A.idx to a.idx. Killed at that moment, or after the
    new a.idx took its place: recovery puts the admin's file back where it was."""
    f = fleet(1)
    master, secondary, receiver = f.master.data_dir, f.secondaries[0], f.receivers[0]
    (master / "A.idx").write_bytes(b"the set's file")
    assert f.publish()[0] == 0
    before = set_files(secondary.data_dir)
    (secondary.data_dir / "a.idx").write_bytes(b"LOCAL precious")
    (master / "A.idx").rename(master / "a.idx")
    killed_at(f, receiver, point)
    receiver_browse(receiver)  # recovery has run
    assert (secondary.data_dir / "a.idx").read_bytes() == b"LOCAL precious"
    log = [json.loads(line) for line in (secondary.data_dir / ".esmirror" / "audit.log").read_text().splitlines()]
    assert [(e["event"], e["generation"], e["outcome"]) for e in log if e["event"] == "rollback"] == \
        [("rollback", 2, "rolled back")], log  # (the log of what changed the set says so)
    assert {p: h for p, h in set_files(secondary.data_dir).items() if p != "a.idx"} == before
    assert debris(secondary.data_dir) == []
    assert f.publish()[0] == 0
    assert (secondary.data_dir / "a.idx").read_bytes() == (master / "a.idx").read_bytes()


def test_a_commit_cut_short_before_its_disk_went_read_only_is_rolled_back_once_writable(tmpfs, fleet):
    """A receiver killed mid-switch leaves a journal; the filesystem then goes read-only (the
    kernel does that after I/O errors). The rollback cannot run until it is writable again:
    until then the server says so, and afterwards the next push finds the old set intact."""
    f, secondary, receiver = _published_on_tmpfs(tmpfs, fleet, "32m")
    before = set_files(secondary.data_dir)
    receiver.stop()
    receiver.env = {"ESMIRROR_CRASH_AT": "switch-put:2"}  # killed half way through the switch
    receiver.start()
    (f.master.data_dir / "indexes" / "tile-1.idx").write_bytes(b"generation 2")
    (f.master.data_dir / "indexes" / "tile-2.idx").write_bytes(b"generation 2 too")
    assert f.publish()[0] == 1
    assert (secondary.data_dir / ".esmirror" / "journal.json").exists()
    receiver.stop()
    receiver.env = None
    var = secondary.data_dir.parent
    subprocess.run(["mount", "-o", "remount,ro", str(var)], check=True)
    try:
        receiver.start()
        # half a set may be live there: nothing is answered from it until the rollback
        answer = requests.get(f"{receiver.url}/status", timeout=30)
        assert answer.status_code == 503, answer.text
        assert "a commit on this server was cut short and must be rolled back" in answer.json()["error"]
        assert "read-only filesystem; remount it read-write" in answer.json()["error"]
        rc, report, out = f.publish()
        assert rc == 1 and "must be rolled back before it answers" in report["secondaries"][0]["error"], out
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(var)], check=True)
    rc, report, out = f.publish()  # the same receiver, no restart: it rolls back, then applies
    assert rc == 0, out
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir) != before
    assert not (secondary.data_dir / ".esmirror" / "journal.json").exists()


def _folder_becomes_file(f) -> dict[str, str]:
    """d/x0..x2 published, then d made a file on the master; the secondary's set before."""
    master = f.master.data_dir
    for i in range(3):
        (master / "d" / f"x{i}").parent.mkdir(exist_ok=True)
        (master / "d" / f"x{i}").write_bytes(b"in the folder %d" % i)
    assert f.publish()[0] == 0
    before = set_files(f.secondaries[0].data_dir)
    shutil.rmtree(master / "d")
    (master / "d").write_bytes(b"now a file")
    return before


def _file_becomes_folder(f) -> dict[str, str]:
    """d published as a file, then made a folder d/x0..x2 on the master; the set before."""
    master = f.master.data_dir
    (master / "d").write_bytes(b"a file")
    assert f.publish()[0] == 0
    before = set_files(f.secondaries[0].data_dir)
    (master / "d").unlink()
    for i in range(3):
        (master / "d" / f"x{i}").parent.mkdir(exist_ok=True)
        (master / "d" / f"x{i}").write_bytes(b"in the folder %d" % i)
    return before


def _back_and_then_in_sync(f, receiver, before: dict[str, str]) -> None:
    secondary = f.secondaries[0]
    assert requests.get(f"{receiver.url}/browse", timeout=30).status_code == 200
    assert set_files(secondary.data_dir) == before
    assert debris(secondary.data_dir) == []
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)


@pytest.mark.parametrize("point", ["switch-remove:1", "switch-remove:2", "switch-put:1"])
def test_a_folder_of_several_files_that_becomes_a_file_is_rolled_back_whole(fleet, point):
    """Killed after some, not all, of a folder's files went to the archive (or after the
    new file took the folder's name): the rollback took the archive's folder for a file
    set aside, failed on it (Directory not empty) at every start, and the secondary stayed
    down with half a set. Now the old set comes back and the next publish goes through."""
    f = fleet(1)
    before = _folder_becomes_file(f)
    killed_at(f, f.receivers[0], point)
    _back_and_then_in_sync(f, f.receivers[0], before)


@pytest.mark.parametrize("change, switch, rollback", [(_folder_becomes_file, "switch-put:1", "rollback-op:2"),
                                                      (_file_becomes_folder, "switch-put:3", "rollback-op:4")],
                         ids=["folder-to-file", "file-to-folder"])
def test_that_rollback_killed_half_way_runs_again_to_the_end(fleet, change, switch, rollback):
    """Killed again in the rollback, after the old folder's first file (or the old file)
    came back: the next run found a folder where it meant to remove the new file (Is a
    directory), or a file where the new file's folder was (Not a directory), at every start."""
    f = fleet(1)
    receiver = f.receivers[0]
    before = change(f)
    receiver.stop()
    receiver.env = {"ESMIRROR_CRASH_AT": switch}
    receiver.start()
    assert f.publish()[0] == 1 and receiver.proc.poll() is not None
    receiver.env = {"ESMIRROR_CRASH_AT": rollback}
    with pytest.raises(RuntimeError):  # (killed in the recovery it runs at start)
        receiver.start()
    receiver.env = {}
    receiver.start()
    _back_and_then_in_sync(f, receiver, before)


@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_a_receiver_whose_log_cannot_be_written_still_serves(tmp_path, server):
    """Its start-up line, written to a full log disk (or a closed stderr), failed the start:
    under systemd's Restart=, a crash loop blamed on the port (waitress) or on the disk."""
    from agent.demo import Receiver, free_port, make_install
    from conftest import VERSION

    install = make_install(tmp_path / "s", {"allow_push": "127.0.0.1", "express_version": VERSION})
    receiver = Receiver(install, free_port(), server=server, log=Path("/dev/full")).start()
    try:
        answered = None
        for _ in range(50):  # (bounded: 10 s) the port is bound before the line is written
            try:
                answered = requests.get(f"{receiver.url}/browse", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert answered is not None and answered.status_code == 200, answered
        time.sleep(0.5)
        assert receiver.proc.poll() is None
    finally:
        receiver.stop()


def test_waitress_spools_bodies_on_the_working_dirs_disk_not_in_tmp(tmpfs, fleet, tmp_path):
    """waitress wrote each body to /tmp first: a small /tmp (a tmpfs, Debian 13's default)
    failed every push of a large file, though var/data had room, and the master was told
    the connection closed (the TLS hint)."""
    f = fleet(1, start=False)  # (its set has a 3 MiB index)
    small = tmp_path / "small-tmp"
    tmpfs(small, "1m")
    f.receivers[0].env = {"TMPDIR": str(small)}
    f.receivers[0].start()
    rc, report, out = f.publish()
    assert rc == 0, out
    assert set_files(f.secondaries[0].data_dir) == set_files(f.master.data_dir)


def test_a_rollback_that_cannot_drop_a_half_made_archive_link_still_puts_the_set_back(fleet):
    """Killed after a live file was linked into the archive, before the new one replaced it;
    then that file cannot be removed by any name (chattr +i here; on Windows, Express Server
    holding it open without delete sharing). The rollback stopped at the archive link, so
    recovery failed at every start and the set stayed half switched. The link is only the
    archive's copy of a file still live: the rollback leaves it and finishes."""
    f = fleet(1)
    receiver, secondary = f.receivers[0], f.secondaries[0]
    assert f.publish()[0] == 0
    before = set_files(secondary.data_dir)
    live = secondary.data_dir / "catalogs.xml"
    catalogs = (f.master.data_dir / "catalogs.xml").read_bytes()
    (f.master.data_dir / "catalogs.xml").write_bytes(catalogs.replace(b"</CatalogConfig>",
                                                                      b"<!-- 2 --></CatalogConfig>"))
    receiver.stop()
    receiver.env = {"ESMIRROR_CRASH_AT": "switch-archive:1"}
    receiver.start()
    rc, _, out = f.publish()
    assert rc == 1 and receiver.proc.poll() is not None, out
    receiver.stop()
    if subprocess.run(["chattr", "+i", str(live)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root on a filesystem with the immutable flag")
    try:
        receiver.env = {}
        receiver.start()  # (recovery runs at start)
        assert requests.get(f"{receiver.url}/browse", timeout=30).status_code == 200
        assert set_files(secondary.data_dir) == before
        assert not (secondary.data_dir / ".esmirror" / "journal.json").exists()
        # while the file stays undeletable, a publish is refused by name and changes nothing
        rc, report, out = f.publish()
        assert rc == 1, out
        error = report["secondaries"][0]["error"]
        assert "catalogs.xml" in error and "cannot be replaced" in error, error
        assert set_files(secondary.data_dir) == before
        assert debris(secondary.data_dir) == []
    finally:
        subprocess.run(["chattr", "-R", "-i", str(secondary.data_dir)], check=True)
    assert f.publish()[0] == 0
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir) != before
