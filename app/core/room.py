"""Room on a secondary's disk: free bytes against esmirror's reserve, inodes, and a
filesystem remounted read-only. The commit, the blob store, browse and the error
answers all ask here.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import NoRoom

ROOM_MARGIN = 16 * 1024 * 1024  # never fill a disk to the last byte


def room(path: Path) -> tuple[int, int]:
    """(free bytes, reserve) on the filesystem of ``path``.

    The reserve is what esmirror never uses: 16 MiB, or 2 % of a small filesystem.
    """
    usage = shutil.disk_usage(path)
    return usage.free, min(ROOM_MARGIN, usage.total // 50)


def check_room(path: Path, need: int, what: str) -> None:
    """507 with the numbers when ``need`` more bytes will not fit beside the reserve."""
    free, reserve = room(path)
    if need + reserve > free:
        raise NoRoom(f"{what} needs {need} bytes but only {free} are free on {path} "
                     f"(esmirror keeps {reserve} in reserve); nothing was changed. Free some space "
                     "(esmirror archive clear) and publish again", needed=need, free=free,
                     reserve=reserve)


def what_is_full(path: Path) -> tuple[str, int]:
    """Words for ENOSPC on the filesystem of ``path``, and its free bytes: a filesystem out
    of inodes (one per file) says "no space" too, while df shows plenty free."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return f"the disk is full at {path}", 0
    if free_inodes(path) == 0:
        return (f"the filesystem at {path} has no free inodes left (one per file; {free} bytes "
                "are still free, so df shows no problem: df -i does)", free)
    return f"the disk is full at {path} ({free} bytes free now)", free


def free_inodes(path: Path) -> int | None:
    """Inodes (one per file) still free on the filesystem of ``path``; None where it has no
    fixed number (btrfs, Windows)."""
    try:
        st = os.statvfs(path)
    except (AttributeError, OSError):
        return None
    return st.f_favail if st.f_files > 0 else None


def read_only(path: Path) -> bool:
    """The filesystem of ``path`` is mounted read-only (Linux remounts one so after I/O errors)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # (Windows has no statvfs)
        return False


def read_only_note(path: Path | str) -> str:
    """What browse, status and the receiver's start say of a read-only working dir."""
    return f"{path} is on a read-only filesystem: pushes fail until it is remounted read-write"
