"""On a filesystem that shares extents (XFS with reflink, btrfs), a secondary rebuilds a
changed large file over a clone of its older version: only the changed bytes are written,
and the archived old version and the new one share the rest on disk.

Asserted by what an admin sees: the secondary's files, its archive, and the space the
filesystem reports used. Needs root, xfsprogs and a loop device; skips without them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import set_files, unmount_all

MiB = 1024 * 1024
BIG = 48 * MiB


@pytest.fixture
def xfs(tmp_path: Path):
    """mount(path): a fresh 512 MiB XFS (reflink on) over ``path``, unmounted at teardown
    (after the servers stop)."""
    mounted: list[Path] = []

    def mount(path: Path) -> None:
        if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
            pytest.skip("needs root and mkfs.xfs (Debian's xfsprogs) to make an XFS to test on")
        image = tmp_path / f"xfs-{len(mounted)}.img"
        with open(image, "wb") as fh:
            fh.truncate(512 * MiB)
        made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-o", "loop", str(image), str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot loop-mount a filesystem image here: {done.stderr.strip()}")
        mounted.append(path)

    yield mount
    unmount_all(mounted)


@pytest.fixture
def big_on_xfs(xfs, fleet):
    """A master with a 48 MiB file published to one secondary whose var/ is an XFS."""
    f = fleet(1, start=False)
    secondary, receiver = f.secondaries[0], f.receivers[0]
    xfs(secondary.data_dir.parent)
    secondary.data_dir.mkdir()
    receiver.start()
    big = f.master.data_dir / "indexes" / "big.idx"
    big.write_bytes(os.urandom(BIG))
    rc, _, out = f.publish()
    assert rc == 0, out
    return f, secondary, big


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def test_a_changed_large_file_costs_the_secondary_only_the_space_of_its_changed_bytes(big_on_xfs):
    f, secondary, big = big_on_xfs
    old = sha256(big)

    before = used(secondary.data_dir)
    with open(big, "r+b") as fh:
        fh.seek(20 * MiB + 100)
        fh.write(os.urandom(MiB))
    rc, report, out = f.publish()
    assert rc == 0, out
    assert report["secondaries"][0]["bytes_sent"] < 2 * MiB, report  # (a delta)
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    archived = [p for p in (secondary.data_dir / "archive").rglob("big.idx")]
    assert [sha256(p) for p in archived] == [old]
    # written whole, the new version would take another 48 MiB beside the archived one
    grew = used(secondary.data_dir) - before
    assert grew < 8 * MiB, f"the filesystem's used space grew by {grew / MiB:.1f} MiB"


def test_a_file_renamed_on_the_master_is_a_clone_on_the_secondary_not_a_second_copy(big_on_xfs):
    f, secondary, big = big_on_xfs

    before = used(secondary.data_dir)
    shutil.copyfile(big, f.master.data_dir / "overviews" / "copy.idx")
    big.rename(big.with_name("renamed.idx"))
    rc, _, out = f.publish()
    assert rc == 0, out
    assert set_files(secondary.data_dir) == set_files(f.master.data_dir)
    grew = used(secondary.data_dir) - before
    assert grew < 8 * MiB, f"the filesystem's used space grew by {grew / MiB:.1f} MiB"
