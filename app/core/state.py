"""Small durable JSON files in ``.esmirror/``: written to a temp name, flushed, renamed."""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import Damaged, one_line


def fs_now(folder: Path) -> float:
    """Now by the clock that dates new files in ``folder``. The server of a network share
    may be hours off this machine's clock: the age of a file there (an upload left
    waiting) is judged against this, not against time.time(). This machine's clock where
    the folder cannot be written."""
    probe = folder / f".clock.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # (a dead writer's: swept)
    try:
        with open(probe, "x"):
            pass
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


WINDOWS = os.name == "nt"
# how long a rename waits for another program's brief open of either file (Windows refuses
# it meanwhile: an antivirus scanner, the search indexer, a thread reading a record)
BUSY_WAIT = 1.0


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """os.replace; on Windows tried again for up to BUSY_WAIT while either file is in use."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not WINDOWS or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has that pid."""
    if WINDOWS:
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _windows_pid_alive(pid: int) -> bool:
    # (os.kill(pid, 0) there sends a Ctrl+C to the process, or ends it)
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = wintypes.HANDLE  # (not int: a handle is 64 bits wide)
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # access denied: it exists (87: no such process)
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def long_paths_enabled() -> bool:
    """Whether this process may use paths over 259 characters: everywhere but on a Windows
    without LongPathsEnabled (python.exe itself declares that it can)."""
    if not WINDOWS:
        return True
    import ctypes

    try:
        check = ctypes.WinDLL("ntdll").RtlAreLongPathsEnabled  # type: ignore[attr-defined]
    except (OSError, AttributeError):  # (before Windows 10 1607: never)
        return False
    check.restype = ctypes.c_ubyte  # (a BOOLEAN)
    return bool(check())


def user_name(uid: int) -> str:
    """The account name of ``uid``, or the number where it has none (or on Windows)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def keep_owner_rights() -> None:
    """Take the owner's bits out of the process umask, keeping what it denies group and others.

    A umask that denies the owner (0277, 0777: a unit's UMask= typo) made esmirror's own
    folders and records under .esmirror/ unwritable, or unreadable, for good: every later
    command and receiver failed on them, whatever its umask. Call once, at start-up."""
    if os.name != "posix":
        return
    try:  # read without setting (Linux 4.7+): umask(0) for a moment could let another
        # thread create a file anyone may write
        with open("/proc/self/status", encoding="ascii") as fh:
            current = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        current = os.umask(0o077)
        os.umask(current)
    if current & 0o700:
        os.umask(current & 0o077)


def run_as_data_owner(data_dir: Path, state_dir: Path, switch: bool = True) -> str | None:
    """Run as root on a var/data another account (LT_IS_USER) owns: become that account, as
    ``sudo -u`` would, first handing it what root left in ``state_dir``. Files root left
    there would stop the agent and the receiver, which run as that account, with
    'Permission denied' (cron running status as root, a publish with sudo). With
    ``switch=False`` (serve: it may need root to bind a port) only the warning is returned."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    try:
        st = os.stat(data_dir)
    except OSError:
        return None
    if st.st_uid == 0:
        return None
    import pwd

    try:
        account = pwd.getpwuid(st.st_uid)
        name, gid = account.pw_name, account.pw_gid
    except KeyError:
        account, name, gid = None, str(st.st_uid), st.st_gid
    if not switch:
        return (f"running as root, but {data_dir} belongs to {name}: files this leaves in .esmirror/ "
                f"stop the agent and the receiver (running as {name}) with 'Permission denied'; "
                f"run it as {name} (sudo -u {name} esmirror …)")
    # what root left in .esmirror/ before (runs of an older esmirror) becomes the owner's
    # first: else the account could not use it, and the advice would loop back here
    for path in [state_dir, *state_dir.rglob("*")] if state_dir.is_dir() else []:
        with contextlib.suppress(OSError):
            if path.lstat().st_uid == 0:
                os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if account is not None:
        os.initgroups(name, gid)
    else:
        os.setgroups([])
    os.setgid(gid)
    os.setuid(st.st_uid)
    return None


def write_json(path: Path, data: Any, durable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            # one line: json.dumps without indent is the C encoder, ~4× faster on a
            # 2,000-file manifest (state.json), which every commit writes
            fh.write(json.dumps(data, sort_keys=True))
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk must not leave temp files behind
        if isinstance(exc, OSError) and exc.filename is None:  # (a failed write names no file)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    if durable:
        fsync_dir(path.parent)


def read_json(path: Path, default: Any = None, shape: type | None = None) -> Any:
    """One of esmirror's records; ``default`` when there is none, Damaged when it is not JSON
    (or, with ``shape``, JSON of another shape: a list where an object belongs)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        why = f"{exc.__class__.__name__}: {one_line(exc, 120)}"  # (then raised below)
    else:
        if shape is None or isinstance(data, shape):
            return data
        why = f"a JSON {type(data).__name__} where a {shape.__name__} belongs"
    raise damaged_record(path, why)


def damaged_record(path: Path, why: str) -> Damaged:
    return Damaged(f"{path} is damaged ({why}); it is esmirror's own record: move it aside and run "
                   "the command again", path=str(path))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened: Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


SELF_ID_FILE = "self-id"  # in .esmirror/


def self_id(state_dir: Path) -> str:
    """This server's own id: random, created on first use and kept. A master names itself
    by it in each push; a secondary tells it in browse (two Mirrors names that reach one
    receiver, a clone that kept its master's .esmirror/, are told apart by it)."""
    path = state_dir / SELF_ID_FILE
    try:
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = uuid.uuid4().hex
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)  # first writer wins, even across gunicorn workers
    except FileExistsError:
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        replace(tmp, path)
    tmp.unlink(missing_ok=True)
    return value
