"""Make a pushed set live on this server: stage, validate, archive, switch, recover.

The mechanism (docs/safe-apply.md says it for people):

1. Every file to write is staged under ``.esmirror/staging/<tx>/`` on the same
   filesystem (a blob is hard-linked there, or copied when it is used twice or
   comes from a file already here) and flushed once.
2. ``catalogs.xml`` of the new set is validated; nothing live has changed yet.
3. A journal listing every operation is written durably. From here until the
   journal is removed, a crash means "roll back".
4. Switch, file by file (``catalogs.xml`` after the files it names, removals
   last): the old file is hard-linked into the archive, then the staged file is
   renamed over it (atomic on POSIX and NTFS); a removed file is renamed into
   the archive.
5. ``reload_command`` runs; a failure rolls back exactly as a crash would.
6. The archive manifest and the new state are written, then the journal is
   removed: that is the commit point.

Recovery (at start and before every commit) undoes whatever a journal lists, so
after a kill -9 at any instant the working directory is exactly the old set or,
once the journal is gone, exactly the new one. No symlinks are involved.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, NamedTuple

import filelock

from .audit import audit, iso_time, now_iso
from .catalogs import CATALOGS_XML, validate_catalogs
from .delta import CHUNK_SIZE, DELTA_MIN, ChunkIndex
from .errors import (BadRequest, Conflict, Damaged, InvalidSet, MirrorError, NoRoom, NotFound, ReloadFailed,
                     Unavailable)
from .faults import crash_point
from .express import lists_mirrors
from .manifest import (HASH_CACHE_FILE, Diff, HashCache, Manifest, ScanResult, collision_key, diff,
                       is_link, name_encoding_note, scan, settled, shown_path, unwritable_names, walk_files)
from .settings import Settings
from .state import fs_now, long_paths_enabled, pid_alive, read_json, replace, write_json
from .state import self_id as own_self_id
from .room import check_room, what_is_full
from .store import CHUNK, BlobStore, clone_file, durable_flush

LOCK_TIMEOUT = 600.0
_ARCHIVE_ID_RE = re.compile(r"^[0-9A-Za-z._-]{1,80}$")
PREVIOUS_JSON = "previous.json"  # in an archive entry: the manifest of the set it replaced


def room_needed(current: Manifest, new: Manifest, uploading: dict[str, int],
                uploaded: Collection[str] = ()) -> int:
    """Bytes a secondary needs free to go from ``current`` to ``new``.

    Every file put is new bytes on disk (a link of an uploaded blob, or a copy),
    and nothing replaced is freed: it moves to the archive. Content uploaded but
    not put anywhere (``--full``) also sits in the blob store until the commit.
    ``uploading`` maps sha256 → size of the blobs to be sent; ``uploaded``: blobs
    already in its store (a push cut short), whose first link costs nothing more.
    """
    change = diff(current, new)
    puts = change.added + change.changed
    used = {new.files[p].sha256 for p in puts}
    in_store = {sha: new.files[p].size for p in puts if (sha := new.files[p].sha256) in uploaded}
    return (sum(new.files[p].size for p in puts) - sum(in_store.values())
            + sum(size for sha, size in uploading.items() if sha not in used))


MAX_GENERATION = 2**63 - 1
# a commit's body, the set's file list as JSON (~130 bytes a file): about two million files
MAX_COMMIT_BYTES = 256 * 1024 * 1024
# blobs of a push cut short wait this long for the push that uses them, then go
STALE_UPLOADS = 24 * 3600


def commit_limit(max_upload_bytes: int) -> tuple[int, str]:
    """The largest commit body a server takes, and what sets it (for the message)."""
    if max_upload_bytes < MAX_COMMIT_BYTES:
        return max_upload_bytes, "max_upload_bytes"
    return MAX_COMMIT_BYTES, "esmirror's cap on a commit's file list, about two million files"


@dataclass(frozen=True)
class CommitRequest:
    """``POST commit``: make this exact set live. ``manifest`` None (``"unchanged": true``
    instead of ``files``): the set is the one held here, ``base``; the commit records
    the generation without the master sending, and this server parsing, the whole list."""

    generation: int
    master: str
    base: str
    manifest: Manifest | None

    @classmethod
    def from_json(cls, data: Any) -> "CommitRequest":
        if not isinstance(data, dict):
            raise BadRequest("the commit body must be a JSON object {generation, master, base, files}")
        unknown = set(data) - {"generation", "master", "base", "files", "unchanged"}
        if unknown:
            raise BadRequest(f"unknown field(s) in commit: {', '.join(sorted(unknown))}")
        generation, master, base = data.get("generation"), data.get("master"), data.get("base")
        if not isinstance(generation, int) or isinstance(generation, bool) \
                or not 0 <= generation <= MAX_GENERATION:
            # (capped: it names the archive entry's folder, which an absurd number cannot)
            raise BadRequest(f"'generation' must be a whole number from 0 to {MAX_GENERATION}")
        if not isinstance(master, str) or not 1 <= len(master) <= 128 or not master.isalnum():
            raise BadRequest("'master' must be the pushing master's id (letters and digits)")
        if not isinstance(base, str) or len(base) > 64:
            raise BadRequest("'base' must be the digest of the set the master saw here")
        if "unchanged" in data:
            if data["unchanged"] is not True or "files" in data:
                raise BadRequest("'unchanged' is true, and then there is no 'files': the set is "
                                 "the one this server holds ('base')")
            return cls(generation, master, base, None)
        if "files" not in data:
            raise BadRequest("'files' is missing: a commit lists the whole set "
                             "(or says \"unchanged\": true)")
        return cls(generation, master, base, Manifest.from_list(data["files"]))


class Cleared(NamedTuple):
    removed: list[str]   # archive entries
    uploads: int = 0     # blobs a push cut short left waiting for a commit, dropped
    upload_bytes: int = 0

    def summary(self) -> str:
        text = f"removed {len(self.removed)} archive entr{'y' if len(self.removed) == 1 else 'ies'}"
        if self.uploads:
            text += (f"; dropped {self.uploads} upload(s) a push cut short left waiting for a commit "
                     f"({self.upload_bytes} bytes; the master sends them again if it needs them)")
        return text


@dataclass
class CommitResult:
    generation: int
    digest: str
    archive_id: str | None
    added: int
    changed: int
    removed: int
    warnings: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)  # kept in the archive entry: see left_alone
    pruned: list[str] = field(default_factory=list)     # archive entries archive_keep removed

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


REPORTED_OUTPUT = 4000  # characters of a reload's output kept: its end, where the error usually is


def run_reload(settings: Settings) -> tuple[bool, str]:
    """Run ``reload_command``; (ok, what it printed). No command means ok. A failure's text
    starts with one line saying how it ended (exit code, timeout), then the output's end."""
    argv = settings.reload_argv()
    if not argv:
        return True, ""
    # the output goes to a temp file: interleaved as a terminal shows it, and never all in
    # memory (a reload that prints 300 MB must not take the receiver with it)
    with tempfile.TemporaryFile() as out:
        try:
            # (Windows: the line as written, which the program parses itself; argv names it)
            line = settings.reload_command if os.name == "nt" else argv
            proc = subprocess.Popen(line, cwd=settings.data_dir, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, **_OWN_GROUP)
        except FileNotFoundError:
            return False, f"reload_command {argv[0]!r} ({settings.where('reload_command')}) was not found"
        except OSError as exc:  # a folder, a file that is not executable
            return False, (f"reload_command {argv[0]!r} ({settings.where('reload_command')}) cannot be "
                           f"run: {exc.strerror}")
        try:
            code = proc.wait(timeout=settings.reload_timeout)
            ended = None if code == 0 else f"reload_command exited with {code}"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            ended = (f"reload_command timed out after {settings.reload_timeout:g} s (reload_timeout); "
                     "it was stopped, with what it had started")
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - 4 * REPORTED_OUTPUT))
        printed = out.read().decode("utf-8", "replace")[-REPORTED_OUTPUT:]
    if ended is None:
        return True, printed
    return False, f"{ended}\n{printed}"


# a reload runs in a process group of its own, so a timeout stops what it started too
_OWN_GROUP: dict[str, Any] = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                              else {"start_new_session": True})


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def reload_failure(output: str, limit: int = 140) -> str:
    """A failed reload in one line: how it ended, then the end of what it printed (where the
    error usually is), short enough to survive one-line reports of 300 characters."""
    ended, _, printed = output.strip().partition("\n")
    tail = " ".join(printed.split())
    if len(tail) > limit:
        tail = "…" + tail[-(limit - 1):]
    return f"{ended}: {tail}" if tail else ended


class _Folders:
    """The folders one commit has made or found: each is made once, not once per file
    (a full push puts 2,000 files into a few dozen folders)."""

    def __init__(self) -> None:
        self.known: set[Path] = set()

    def make(self, folder: Path) -> None:
        if folder not in self.known:
            folder.mkdir(parents=True, exist_ok=True)
            self.known.add(folder)

    def forget(self) -> None:
        self.known.clear()


def left_alone(scanned: ScanResult, set_aside: Collection[str] = ()) -> list[str]:
    """The files in a secondary's working dir that no set can hold (unsafe names): a push
    neither removes nor archives them, so an admin should hear of them. Those a commit
    has just set aside (``set_aside``: a new file of the set took the name) went to the
    archive instead, which its answer says."""
    return [f"{problem}; this file is left where it is, outside the set" for problem in scanned.unsafe
            if not any(problem.startswith(f"{rel}: ") for rel in set_aside)]


WINDOWS_MAX_PATH = 259  # characters of a full path, on a Windows without long paths
ARCHIVE_ID_CHARS = 44  # _new_archive_id's: 33, and the generation's digits beyond one


def too_long_here(data_dir: Path, archive_dir: Path, puts: Iterable[str], archived: Iterable[str],
                  limit: int = WINDOWS_MAX_PATH) -> tuple[str, int] | None:
    """The first path of the set that would be longer than ``limit`` characters here, live
    (``puts``) or in the archive entry a commit makes (``archived``), with that length."""
    entry = len(str(archive_dir)) + 1 + ARCHIVE_ID_CHARS + len("/files/")
    for base, paths in ((len(str(data_dir)) + 1, puts), (entry, archived)):
        for path in paths:
            if base + len(path) > limit:
                return path, base + len(path)
    return None


def _lstat(path: Path) -> os.stat_result | None:
    """What stands at ``path`` itself (a symlink is not followed); None for nothing."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_dir(path: Path) -> bool:
    """A real folder is there: a symlink or junction to one is not (walking it would reach outside)."""
    st = _lstat(path)
    return st is not None and stat.S_ISDIR(st.st_mode) and not is_link(st)


def _link_or_copy(src: Path, dst: Path) -> bool:
    """A hard link, or a copy where the filesystem has none; True for a link."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def _copy_verified(src: Path, dst: Path, sha: str) -> None:
    """Copy a file while hashing it; it must still be the content we planned on. A clone
    where the filesystem can make one (no bytes written, no space taken), hashed as it is."""
    hasher = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "w+b") as fout:
        if clone_file(fin.fileno(), fout.fileno()):
            while chunk := fout.read(CHUNK):
                hasher.update(chunk)
        else:
            while chunk := fin.read(CHUNK):
                hasher.update(chunk)
                fout.write(chunk)
    if hasher.hexdigest() != sha:
        dst.unlink(missing_ok=True)
        raise Conflict(f"{src.name} changed on this server during the commit; push again")


_TMP_PID_RE = re.compile(r"\.(\d{1,10})\.")
IDLE_TMP = 15 * 60  # seconds: longer than gunicorn's and waitress's 600 s body timeouts


def sweep_dead_tmp(state_dir: Path, now: float | None = None) -> None:
    """Temp files (``*.<pid>.…tmp`` in ``.esmirror/`` and ``.esmirror/tmp/``) of processes that died.

    A kill -9 mid-write leaves them; a live process's (another gunicorn or
    mod_wsgi worker still uploading) are left alone, unless untouched for IDLE_TMP
    seconds: the pid may belong to another process by now (pids wrap), and no
    upload waits that long between writes (both servers time out a body sooner).
    """
    idle = (time.time() if now is None else now) - IDLE_TMP  # (now: fs_now's)
    for folder in (state_dir, state_dir / "tmp"):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            match = _TMP_PID_RE.search(entry.name)
            is_tmp = folder.name == "tmp" or entry.name.endswith(".tmp")
            if not (match and is_tmp and entry.is_file(follow_symlinks=False)):
                continue
            try:
                if not pid_alive(int(match.group(1))) or entry.stat(follow_symlinks=False).st_mtime < idle:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _remove_empty_tree(folder: Path) -> None:
    """rmdir a folder and its empty subfolders; OSError (not empty) if any file is left."""
    if not _is_dir(folder):  # (never through a symlink or junction: not even the top)
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
    found, stack = [], [folder]  # (a stack, not recursion: any depth)
    while stack:
        current = stack.pop()
        found.append(current)
        with os.scandir(current) as entries:
            stack += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and _is_dir(Path(e.path))]
    for current in reversed(found):  # deepest first
        os.rmdir(current)


def folders_of(paths: Iterable[str]) -> set[str]:
    """Every folder on the way to each of ``paths`` (relative, '/'-separated)."""
    return {"/".join(parts[:depth]) for parts in (p.split("/") for p in paths)
            for depth in range(1, len(parts))}


def prune_emptied(root: Path, paths: Iterable[str] = (), folders: Iterable[str] = ()) -> None:
    """The folders of ``paths`` (files a commit removed), and ``folders`` (those a commit
    rolled back had made), that are left empty are removed, deepest first, parents
    included (SPEC §2). Folders the commit did not touch stay, empty or not: Express
    Server or an admin may keep one there."""
    for folder in sorted(folders_of(paths) | set(folders), key=lambda f: f.count("/"), reverse=True):
        try:
            os.rmdir(root / folder)
        except OSError:
            pass  # not empty (or gone)


def _created(name: str, meta: dict[str, Any]) -> str:
    """When an archive entry was made: its record's word, else its name's timestamp."""
    try:
        when = dt.datetime.fromisoformat(meta["created"])
    except (KeyError, TypeError, ValueError):
        try:
            when = dt.datetime.strptime(name[:23], "%Y%m%dT%H%M%S.%fZ")
        except ValueError:
            when = dt.datetime.now(dt.timezone.utc)  # unknown: never "older than"
    return iso_time((when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp())


def _switch_order(puts_ops: list[dict[str, Any]], change: Diff, puts: list[str]) -> list[dict[str, Any]]:
    """The journal's operations in switch order: removals that free a name for a new file
    first, then the files, catalogs.xml last of them, then the other removals.

    A removed file where a new file needs a folder ("a" → "a/x"), or inside a folder that
    becomes a file ("a/x" → "a"), or the same name by another case ("A" → "a": one file on
    Windows) is archived first, so the put finds the name free. Compared by collision key,
    as a case-insensitive filesystem compares names."""
    put_keys = {collision_key(p) for p in puts}
    prefixes = {"/".join(k.split("/")[:i]) for k in put_keys for i in range(1, k.count("/") + 1)}
    blocking = []
    for p in change.removed:
        key = collision_key(p)
        if key in put_keys or key in prefixes or any(
                "/".join(key.split("/")[:i]) in put_keys for i in range(1, key.count("/") + 1)):
            blocking.append(p)
    ops = sorted(puts_ops, key=lambda op: op["path"] == CATALOGS_XML)
    rm = lambda p: {"kind": "remove", "path": p, "staged": "", "existed": True}  # noqa: E731
    return [rm(p) for p in blocking] + ops + [rm(p) for p in change.removed if p not in blocking]


class WorkingDir:
    """This server's working directory (``var/data``) and esmirror's state beside it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        self.state_dir = settings.state_dir
        self.archive_dir = settings.archive_dir
        self.store = BlobStore(self.state_dir)
        self.journal_path = self.state_dir / "journal.json"
        self.state_path = self.state_dir / "state.json"
        self.staging_dir = self.state_dir / "staging"

    # --- plain facts -------------------------------------------------------
    @property
    def self_id(self) -> str:
        return own_self_id(self.state_dir)

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "commit.lock"

    def lock(self, timeout: float = LOCK_TIMEOUT) -> filelock.BaseFileLock:
        """One commit at a time, across gunicorn workers and on Windows (filelock)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(self.lock_path, timeout=timeout)

    def state(self) -> dict[str, Any]:
        return read_json(self.state_path, {}) or {}

    def scan(self) -> ScanResult:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return scan(self.data_dir, HashCache(self.state_dir / HASH_CACHE_FILE, (DELTA_MIN, CHUNK_SIZE),
                                             chunk_index=ChunkIndex(self.state_dir), fill_gaps=True))

    # --- recovery ------------------------------------------------------------
    def recover(self) -> str | None:
        """Undo an interrupted commit; drop staging leftovers. Call with the lock held."""
        journal = read_json(self.journal_path)
        message = None
        if journal:
            self._rollback(journal)
            message = (f"rolled back an interrupted commit of generation {journal['generation']} "
                       f"(phase {journal['phase']}); the previous set is in place")
            if journal["phase"] == "switched":
                run_reload(self.settings)  # Express Server may have loaded part of it
            # (the log of what changed this set: a rollback did, as much as a commit)
            audit(self.settings, "rollback", caller="esmirror (recovery)",
                  master=(journal.get("state_before") or {}).get("master"),
                  generation=journal.get("generation"), files=None, outcome="rolled back",
                  phase=journal.get("phase"))
        for leftover in (self.staging_dir, self.state_dir / "trash"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        # (after staging: a staged link is not a live file). Ages by the files' own clock: a
        # share's server a day behind this one's had every upload just made dropped as stale
        now = fs_now(self.state_dir)
        self.store.clear(older_than=now - STALE_UPLOADS, shared=True)
        self.store.clear_stale_tmp(now=now)
        sweep_dead_tmp(self.state_dir, now)
        return message

    def recover_if_interrupted(self) -> str | None:
        """Recover now if a commit died (its journal, or the staging folder of one killed
        before its journal) and no live commit holds the lock."""
        if not self.journal_path.exists() and not self._staging_left():
            return None
        try:
            with self.lock(timeout=0):
                return self.recover()
        except filelock.Timeout:
            return None  # a commit is running in another worker: its journal and staging are live
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            # half a set may be live: nothing is answered from it until the rollback has run
            raise Unavailable(f"a commit on this server was cut short and must be rolled back "
                              f"before it answers, but {self.data_dir} is on a read-only filesystem; "
                              "remount it read-write: the next request puts the previous set back") from None

    def _staging_left(self) -> bool:
        try:
            with os.scandir(self.staging_dir) as entries:
                return any(True for _ in entries)
        except OSError:
            return False

    def _staged(self, journal: dict[str, Any], op: dict[str, Any]) -> Path:
        return self.staging_dir / journal["tx"] / op["staged"] if op["staged"] else Path()

    def _archived(self, journal: dict[str, Any], op: dict[str, Any]) -> Path:
        return self.archive_dir / journal["archive_id"] / "files" / op["path"]

    def _paths(self, journal: dict[str, Any], op: dict[str, Any]) -> tuple[Path, Path, Path]:
        return self.data_dir / op["path"], self._staged(journal, op), self._archived(journal, op)

    def _forward(self, journal: dict[str, Any], op: dict[str, Any], folders: _Folders) -> None:
        work = self.data_dir / op["path"]
        if op["kind"] == "remove":
            if work.exists():
                arch = self._archived(journal, op)
                folders.make(arch.parent)
                replace(work, arch)
                crash_point("switch-remove")
            return
        if op["existed"]:
            arch = self._archived(journal, op)
            folders.make(arch.parent)
            _link_or_copy(work, arch)
            crash_point("switch-archive")
        elif os.path.lexists(work) and not _is_dir(work):
            # what the scan leaves out (a file whose name is unsafe, or clashes by case with one
            # of the set's; a symlink, whose target is never touched) stands where a new file
            # goes: kept in the archive, never overwritten nor written through
            arch = self._archived(journal, op)
            folders.make(arch.parent)
            replace(work, arch)
            journal.setdefault("set_aside", []).append(op["path"])
            crash_point("switch-set-aside")
        if _is_dir(work):  # a folder of the old set gives way to a file: its files went first
            _remove_empty_tree(work)  # anything still in it (not part of the set) stops the switch
            folders.forget()          # (and folders known under it are gone)
        folders.make(work.parent)
        if op.get("blob"):  # a new file, linked straight from the blob store
            blob = self.store.path(op["blob"])
            try:
                os.link(blob, work)
            except FileExistsError:  # a stray file the scan does not list: replaced, as below
                os.unlink(work)
                os.link(blob, work)
        else:
            replace(self._staged(journal, op), work)
        crash_point("switch-put")

    def _rollback(self, journal: dict[str, Any]) -> None:
        """Idempotent: safe to run again after a crash in the middle of it."""
        for op in reversed(journal["ops"]):
            work, staged, arch = self._paths(journal, op)
            if op["kind"] == "remove":
                if arch.exists():
                    if _is_dir(work):  # the folder new files went into: emptied by the undo above
                        _remove_empty_tree(work)
                    work.parent.mkdir(parents=True, exist_ok=True)
                    replace(arch, work)
            elif op.get("blob"):  # a new file linked from the blob store: undone if it was
                blob = self.store.path(op["blob"])
                if work.is_file() and blob.is_file() and os.path.samefile(work, blob):
                    work.unlink()
            elif staged.exists():  # never switched: drop a half-made archive link
                if op["existed"]:  # (only then is there one; the path may even be a file's child)
                    # best effort: it names a file still live. One that no name of can be
                    # removed (held open without delete sharing on Windows; chattr +i) stopped
                    # every rollback here, leaving half a set switched; its entry's folder goes
                    # to the trash below
                    with contextlib.suppress(OSError):
                        arch.unlink(missing_ok=True)
            elif op["existed"]:
                if arch.exists():
                    if _is_dir(work):
                        shutil.rmtree(work)
                    work.parent.mkdir(parents=True, exist_ok=True)
                    replace(arch, work)
            elif not _is_dir(work):  # (a folder there: the undo of its files' removal, run
                try:                          # before a crash; the new file is gone already)
                    work.unlink(missing_ok=True)
                except NotADirectoryError:  # (its folder is a file again, by the same undo)
                    pass
            # a file set aside where this new one went (never a folder: see _forward). A folder
            # there is the archive of the files a folder of this name held: they go back
            # one by one with their removals
            if op["kind"] == "put" and not op["existed"] and os.path.lexists(arch) and not _is_dir(arch):
                work.parent.mkdir(parents=True, exist_ok=True)
                replace(arch, work)
            crash_point("rollback-op")
        entry = self.archive_dir / journal["archive_id"]
        shutil.rmtree(entry, ignore_errors=True)
        if os.path.lexists(entry):  # (what cannot be removed yet: out of the archive, to the
            with contextlib.suppress(OSError):  # trash that each recovery empties)
                (self.state_dir / "trash").mkdir(exist_ok=True)
                os.rename(entry, self.state_dir / "trash" / f"{entry.name}.{uuid.uuid4().hex[:8]}")
        if "new_folders" in journal:
            prune_emptied(self.data_dir, folders=journal["new_folders"])
        else:  # (a journal written before they were listed)
            prune_emptied(self.data_dir, [op["path"] for op in journal["ops"]])
        if "state_before" in journal and self.state() != journal["state_before"]:
            write_json(self.state_path, journal["state_before"])  # state.json may name the new set
        self.journal_path.unlink(missing_ok=True)

    # --- commit ----------------------------------------------------------------
    @staticmethod
    def _check_owner(state: dict[str, Any], master: str) -> None:
        owner = state.get("master")
        if owner and owner != master:
            raise Conflict(
                f"this server is mirrored from master {owner}, not {master}; on this server run "
                "'esmirror release' to let another master push", master=owner)

    def commit(self, request: CommitRequest) -> CommitResult:
        with self.lock():
            self.recover()
            return self._commit_locked(request)

    def commit_from(self, data: Any, caller: str | None) -> CommitResult:
        """A master's ``POST commit`` body (parsed JSON) applied, and in the audit log either
        way: what it changed, or why it was refused."""
        try:
            request = CommitRequest.from_json(data)
            result = self.commit(request)
        except MirrorError as exc:
            asked = data if isinstance(data, dict) else {}
            audit(self.settings, "commit", caller=caller, master=asked.get("master"),
                  generation=asked.get("generation"), files=None, outcome=f"refused {exc.status}",
                  error=exc.message)
            raise
        audit(self.settings, "commit", caller=caller, master=request.master,
              generation=result.generation, outcome="ok", archive_id=result.archive_id,
              files={"added": result.added, "changed": result.changed, "removed": result.removed},
              **({"archive_pruned": result.pruned} if result.pruned else {}))
        return result

    def _commit_locked(self, request: CommitRequest) -> CommitResult:
        state = self.state()
        if lists_mirrors(self.settings.iserv_cfg):  # (a secondary promoted, its old master back)
            raise Conflict(f"this server is a master: {self.settings.iserv_cfg} lists <Mirrors>, so "
                           "it takes no pushes. If it was promoted, take it out of the pushing "
                           "master's Mirrors (and that master out of allow_push here)",
                           master=self.self_id)
        self._check_owner(state, request.master)
        if request.manifest is not None and (names := unwritable_names(request.manifest.files)):
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise Unavailable(f"cannot write {names[0]!r}{more}, nothing was changed: {name_encoding_note()}")
        if state.get("master") == request.master and request.generation < (state.get("generation") or 0):
            raise Conflict(f"generation {request.generation} is older than generation "
                           f"{state['generation']} already applied here", generation=state["generation"])
        scanned = self.scan()
        if request.base != scanned.manifest.digest:
            raise Conflict("this server's set changed since the master looked (base digest differs); "
                           "fetch the manifest again", digest=scanned.manifest.digest)
        new = scanned.manifest if request.manifest is None else request.manifest
        result = self._apply(scanned, new, request.generation, request.master, state)
        result.warnings += left_alone(scanned, result.set_aside)
        return result

    def _check_own_folders(self) -> None:
        """Refuse (409, nothing changed) when archive/ or .esmirror/ is a symlink or on another
        filesystem: the switch moves files between them and the set by rename, which fails
        part way across filesystems, and then the rollback would fail the same way."""
        device = os.stat(self.data_dir).st_dev
        for folder in (self.archive_dir, self.state_dir):
            try:
                st = os.lstat(folder)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) and not is_link(st) and st.st_dev == device:
                continue
            what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a junction" if is_link(st)
                    else "not a folder"
                    if not stat.S_ISDIR(st.st_mode) else "on another filesystem (a mount point)")
            raise Conflict(f"{folder} is {what}; esmirror moves files between it and the set by "
                           f"rename, which works only within one filesystem. Nothing was changed: make "
                           f"it a plain folder on the filesystem of {self.data_dir}, then publish again",
                           in_the_way=folder.name)

    def _check_in_the_way(self, current: Manifest, puts: list[str]) -> None:
        """Refuse (409, nothing changed) what would stop the switch or make it unsafe.

        A folder on the way to a new file that is a symlink (or another special file) here:
        writing through it would change what lies outside the working dir, and the archive
        would not keep what it replaced. The scan skips such entries, so no set shows them.
        (A symlink standing where a file goes gives way to the file; what it points at is
        untouched.) And a folder that becomes a file but holds files the scan leaves out
        (unsafe names, symlinks): the switch cannot remove it.
        """
        checked: dict[str, bool] = {}  # folder → in the way
        for path in puts:
            if path in current.files:
                continue
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folder = "/".join(parts[:depth])
                if folder not in checked:
                    st = _lstat(self.data_dir / folder)  # (None under a file the switch replaces)
                    # a regular file there is in the set, and the switch replaces it by the folder
                    checked[folder] = st is not None and (is_link(st) or not (stat.S_ISDIR(st.st_mode)
                                                                                or stat.S_ISREG(st.st_mode)))
                if checked[folder]:
                    raise Conflict(
                        f"{self.data_dir / folder} is a symbolic link or other special file on this "
                        f"server, in the way of {path}; esmirror never writes through one (what it "
                        "points at is outside the set and would not be archived). Nothing was "
                        "changed: replace it with a folder or remove it, then publish again",
                        in_the_way=folder)
            folder = self.data_dir / path
            if not _is_dir(folder):
                continue
            others = sorted(rel for rel, _full, _st in walk_files(folder, prefix=path + "/")
                            if rel not in current.files)
            if others:
                raise Conflict(
                    f"{folder} becomes a file in the new set, but it holds {len(others)} file(s) "
                    f"that are not part of any set (unsafe names, symlinks): {', '.join(others[:5])}"
                    f"{' …' if len(others) > 5 else ''}. Nothing was changed: move them out of "
                    f"{self.data_dir}, then publish again", in_the_way=path)

    def _apply(self, scanned: ScanResult, new: Manifest, generation: int | None, master: str | None,
               state: dict[str, Any], about: dict[str, Any] | None = None) -> CommitResult:
        """Make ``new`` live over ``current``: validate, stage, journal, switch, reload, archive.

        The one safe path for a push and for ``archive restore``. ``about`` adds
        facts to the archive entry (what a restore restored).
        """
        started = time.time()
        current = scanned.manifest
        change, puts, here, stored = self._check_set(current, new)

        def source(path: str) -> Path:
            sha = new.files[path].sha256
            return self.store.path(sha) if sha in stored else self.data_dir / here[sha]

        catalogs = source(CATALOGS_XML) if CATALOGS_XML in puts else self.data_dir / CATALOGS_XML
        warnings = self._check_catalogs(catalogs)

        if change.empty:
            result = CommitResult(generation or 0, new.digest, None, 0, 0, 0, warnings)
            self._record(generation, master, new, None)
            self.store.clear(older_than=started)  # (what a --full push sent again is live already)
            return result

        self._check_own_folders()
        tx = uuid.uuid4().hex[:12]
        stage = self.staging_dir / tx
        ops = _switch_order(self._stage(stage, current, new, puts, stored, source), change, puts)

        archive_id = self._new_archive_id(generation)
        # the folders the switch will make: a rollback removes these, and no folder that was
        # here before, empty or not
        new_folders = sorted(f for f in folders_of(puts) if not _is_dir(self.data_dir / f))
        switching: str | None = None  # the file being switched, to name in a refusal
        rolled_back = True
        journal = {"tx": tx, "archive_id": archive_id, "generation": generation,
                   "phase": "switching", "ops": ops, "state_before": state, "new_folders": new_folders}
        try:
            write_json(self.journal_path, journal)
            crash_point("journal")
            folders = _Folders()
            for op in ops:
                switching = op["path"]
                self._forward(journal, op, folders)
            switching = None
            journal["phase"] = "switched"
            write_json(self.journal_path, journal)
            crash_point("switched")
            ok, output = run_reload(self.settings)
            if not ok:
                raise ReloadFailed(f"reload_command failed on this server; the previous set is back. "
                                   f"{reload_failure(output)}", output=output)
            archived = change.changed + change.removed
            set_aside = sorted(journal.get("set_aside", []))
            if not archived and not set_aside:
                archive_id = None
            else:
                crash_point("archiving")
                self._write_archive_entry(archive_id, current, new, archived, set_aside, {
                    "replaced_generation": state.get("generation"), "generation": generation,
                    "master": master, **(about or {})})
            crash_point("archived")
            self._record(generation, master, new, archive_id, (about or {}).get("restored_from"))
            crash_point("recorded")
        except BaseException as exc:
            rolled_back = False  # (if not, the journal names staged files: its rollback needs them)
            self._rollback(journal)
            rolled_back = True
            if journal["phase"] == "switched":
                run_reload(self.settings)
            # (Windows: the file is open elsewhere; here EPERM, chattr +i. EACCES here is a
            # folder's permissions, which _os_failure names)
            if isinstance(exc, PermissionError) and switching is not None and \
                    (os.name == "nt" or exc.errno == errno.EPERM):
                raise self._not_replaceable(switching, exc) from None
            if isinstance(exc, OSError):
                raise self._os_failure("switching", exc) from None
            raise
        finally:
            if rolled_back:
                shutil.rmtree(stage, ignore_errors=True)
        # before the commit point: killed after it, nothing would remove them; killed before,
        # the rollback makes the folders of the files it puts back
        prune_emptied(self.data_dir, change.removed)
        self.journal_path.unlink()  # the commit point
        crash_point("committed")
        self.store.clear(older_than=started)
        pruned = self.prune_archive(self.settings.archive_keep)
        self._remember_hashes(scanned.cache, new, puts)  # last: dropping the blobs' names changed the files' ctime
        set_aside = sorted(journal.get("set_aside", []))
        if set_aside:
            warnings.append(f"{len(set_aside)} file(s) found here outside the set stood where the "
                            f"set puts one, and were kept in archive entry {archive_id}: "
                            f"{', '.join(set_aside[:5])}{' …' if len(set_aside) > 5 else ''}")
        return CommitResult(generation or 0, new.digest, archive_id, len(change.added),
                            len(change.changed), len(change.removed), warnings, set_aside, pruned)

    def _check_set(self, current: Manifest, new: Manifest) -> tuple[Diff, list[str], dict[str, str], set[str]]:
        """Refuse a set that cannot be applied as it stands, before anything is touched; else
        (the change, the paths it puts, where each content already lives here by sha256, the
        contents in the blob store)."""
        if CATALOGS_XML not in new.files:
            raise InvalidSet("the set has no catalogs.xml; refusing to apply an empty configuration",
                             [f"{CATALOGS_XML}: missing from the set"])
        change = diff(current, new)
        here = {e.sha256: p for p, e in current.files.items()}
        puts = change.added + change.changed
        needed = {new.files[p].sha256 for p in puts}
        sizes = {s: self.store.size(s) for s in needed}  # one look each (commits hold the lock)
        stored = {s for s, size in sizes.items() if size is not None}
        missing = sorted(s for s in needed if s not in here and s not in stored)
        if missing:
            raise Conflict(f"{len(missing)} blob(s) of the set were never uploaded", missing=missing)
        # a content has one size: a set that says otherwise would be recorded as what it is not
        wrong = []
        for path in puts:
            entry = new.files[path]
            size = sizes[entry.sha256] if entry.sha256 in stored else current.files[here[entry.sha256]].size
            if size != entry.size:
                wrong.append(f"{path}: the set says {entry.size} bytes; its content "
                             f"({entry.sha256[:12]}…) is {size} bytes")
        if wrong:
            raise InvalidSet("the set's sizes do not match its contents; nothing was changed", wrong)
        if not long_paths_enabled() and \
                (long := too_long_here(self.data_dir, self.archive_dir, puts, change.changed + change.removed)):
            # refused before anything is touched: half way through the switch, Windows says only
            # that it cannot find the path
            raise Unavailable(
                f"{shown_path(long[0])} would be {long[1]} characters long here, with its archive "
                f"folder, and Windows takes at most {WINDOWS_MAX_PATH} without long paths; nothing was "
                "changed. Set LongPathsEnabled = 1 under HKLM\\SYSTEM\\CurrentControlSet\\Control\\"
                "FileSystem and restart the receiver (recycle its app pool), or shorten the path")
        self._check_in_the_way(current, puts)
        return change, puts, here, stored

    def _check_catalogs(self, catalogs: Path) -> list[str]:
        """The catalogs.xml the set would have, validated; its warnings (Paths this server
        cannot read), refused instead under require_paths."""
        report = validate_catalogs(catalogs.read_bytes(), base=self.data_dir)
        if report.problems:
            raise InvalidSet("catalogs.xml is invalid; nothing was changed", report.problems)
        warnings = list(report.unreadable_paths())
        if warnings and self.settings.require_paths:
            raise InvalidSet("catalog Paths this server cannot read (require_paths = true); "
                             "nothing was changed. Mount the image repositories here, or set "
                             "require_paths = false to apply with a warning", warnings)
        return warnings

    def _stage(self, stage: Path, current: Manifest, new: Manifest, puts: list[str], stored: set[str],
               source: Callable[[str], Path]) -> list[dict[str, Any]]:
        """Stage the files the set puts, flushed; the journal's put operations, in ``puts`` order.

        Each blob is linked once; what is used twice or already lives here is copied. A file
        new here whose blob was uploaded is not staged: the switch links it straight from the
        blob store (one link instead of a link and a rename; the blob is durable since its
        upload), once a first link showed this filesystem has them."""
        stage.mkdir(parents=True)
        linked: set[str] = set()
        copies = [p for p in puts if new.files[p].sha256 not in stored]
        try:
            check_room(self.state_dir, sum(new.files[p].size for p in copies), "staging the set")
        except NoRoom:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        ops: list[dict[str, Any]] = []
        written: list[Path] = []
        links_work: bool | None = None  # known after the first link
        try:
            for index, path in enumerate(puts):
                sha = new.files[path].sha256
                staged = stage / str(index)
                if sha in stored and sha not in linked:
                    linked.add(sha)
                    if links_work and path not in current.files:
                        ops.append({"kind": "put", "path": path, "staged": "", "blob": sha, "existed": False})
                        continue
                    links_work = _link_or_copy(self.store.path(sha), staged)
                else:
                    _copy_verified(source(path), staged, sha)
                written.append(staged)
                ops.append({"kind": "put", "path": path, "staged": str(index),
                            "existed": path in current.files})
                crash_point("stage")
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise self._os_failure("staging", exc) from None
        durable_flush(written)
        crash_point("staged")
        return ops

    def _write_archive_entry(self, archive_id: str, current: Manifest, new: Manifest, archived: list[str],
                             set_aside: list[str], facts: dict[str, Any]) -> None:
        """The archive entry's records: the replaced set's manifest apart from the entry's own
        record, which is written last (listing the archive, every browse and every prune,
        then reads only small files)."""
        write_json(self.archive_dir / archive_id / PREVIOUS_JSON, current.to_list())
        write_json(self.archive_dir / archive_id / "archive.json", {
            "id": archive_id,
            "created": now_iso(),
            "replaced_generation": facts.pop("replaced_generation"),
            "generation": facts.pop("generation"),
            "master": facts.pop("master"),
            "files": sorted(archived),
            # files found here outside the set where the new set put one: kept, not restored
            **({"set_aside": set_aside} if set_aside else {}),
            # its size, so listing the archive (every browse) need not stat every file
            "bytes": sum(current.files[p].size for p in archived)
            + sum(os.lstat(self.archive_dir / archive_id / "files" / p).st_size for p in set_aside),
            "previous_digest": current.digest,
            "digest": new.digest,
            **facts,  # (about: what a restore restored)
        })

    def _remember_hashes(self, cache: HashCache | None, new: Manifest, puts: list[str]) -> None:
        """Tell the hash cache what the files just put hold (every byte was verified on the
        way in). Else the next browse or commit re-reads them all: after a full push, the
        whole set. Files written in the last seconds are read again anyway, as in any scan."""
        stats = {}
        for path in puts:
            try:
                stats[path] = os.stat(self.data_dir / path)
            except OSError:
                continue  # gone already: the next scan says so
        if not any(settled(st) for st in stats.values()):
            return  # (an incremental push, typically: nothing to gain)
        cache = cache or HashCache(self.state_dir / HASH_CACHE_FILE)
        for path, st in stats.items():
            cache.remember(path, st, new.files[path].sha256)
        cache.save(new.files)

    def _os_failure(self, during: str, exc: OSError) -> MirrorError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what, free = what_is_full(self.state_dir)
            return NoRoom(f"{what} while {during}; nothing was changed. Free some space (esmirror "
                          "archive clear) and publish again", free=free)
        # (a rename names its source first: a staged file; the folder that refused is the target's)
        where = exc.filename2 or exc.filename or self.data_dir
        if exc.errno == errno.EROFS:
            return MirrorError(f"{during} failed: {where} is on a read-only filesystem; nothing was "
                               "changed. Remount it read-write, then publish again")
        return MirrorError(f"{during} failed on {where}: {exc.strerror}; nothing was changed")

    def _not_replaceable(self, path: str, exc: PermissionError) -> MirrorError:
        return MirrorError(
            f"switching failed: {shown_path(path)} here cannot be replaced or moved to the archive "
            f"({exc.strerror}); the previous set is back. It is marked read-only or immutable "
            "(chattr +i), or on Windows another program holds it open: Express Server, an "
            "antivirus scanner, a backup. Publish again once it is free")

    def _record(self, generation: int | None, master: str | None, new: Manifest,
                archive_id: str | None, restored_from: str | None = None) -> None:
        write_json(self.state_path, {
            "generation": generation, "master": master, "digest": new.digest,
            "applied_at": now_iso(),  # (UTC with Z, as status, the audit log and the agent's log)
            "archive_id": archive_id,
            # an admin's restore: the master's agent must not undo it (only a publish does)
            **({"restored_from": restored_from} if restored_from else {}),
        })

    def _new_archive_id(self, generation: int | None) -> str:
        # Microseconds so that ids sort in apply order, which retention and restore rely on;
        # after a clock step back, just after the newest entry: pruning keeps the newest by
        # id, and would otherwise delete the entry this apply just made
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        newest = max((child.name for child in self.archive_dir.iterdir()), default="") \
            if self.archive_dir.is_dir() else ""
        try:
            after = dt.datetime.strptime(newest[:22], "%Y%m%dT%H%M%S.%f") + dt.timedelta(microseconds=1)
            now = max(now, after)
        except ValueError:
            pass  # no entry, or none of ours
        stamp = now.strftime("%Y%m%dT%H%M%S.%f")
        return f"{stamp}Z-g{generation if generation is not None else 0}-{uuid.uuid4().hex[:6]}"

    # --- archive ------------------------------------------------------------------
    def archives(self) -> list[dict[str, Any]]:
        """Archive entries, oldest first, each with its size on disk."""
        entries = []
        if self.archive_dir.is_dir():
            for child in sorted(self.archive_dir.iterdir()):
                if not child.is_dir() or not (child / "archive.json").exists():
                    continue
                try:
                    meta = read_json(child / "archive.json")
                except Damaged:
                    meta = None
                size = meta.get("bytes") if isinstance(meta, dict) else None
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    # (an entry from before "bytes" was recorded, or a damaged one: count it)
                    size = sum(f.stat().st_size for f in (child / "files").rglob("*") if f.is_file())
                if not isinstance(meta, dict):  # listed, so that it can be cleared
                    meta = {"damaged": "archive.json cannot be read"}
                # the folder's own name, never what the record says: clear removes this folder
                entries.append({k: meta.get(k) for k in
                                ("generation", "replaced_generation", "master", "files",
                                 "set_aside", "restored_from", "damaged")}
                               | {"id": child.name, "created": _created(child.name, meta), "bytes": size})
        return entries

    def prune_archive(self, keep: int) -> list[str]:
        """archive_keep's pruning, by a commit under the lock (whose audit line names them)."""
        return self._remove_entries(keep, None, False)

    def clear_archive(self, keep: int | None, older_than_days: float | None, everything: bool,
                      caller: str) -> "Cleared":
        """An admin's clear (CLI or ``DELETE archive``), under the lock, audited: archive
        entries beyond the newest ``keep`` and/or older than the given age, or all. It also
        drops the uploads a push cut short left waiting for a commit, and the idle parts of
        one cut short mid-file: every "no room" message sends the admin here, and those hold
        space too (the master sends them again if it needs them). Works on a full disk: it
        only frees space."""
        with self.lock():
            removed = self._remove_entries(keep, older_than_days, everything)
            blobs = self.store.clear(older_than=math.inf)
            # and the parts of a large file whose push died (kept for it to resume) once idle
            # for longer than any upload waits between writes
            parts = self.store.clear_stale_tmp(older_than=IDLE_TMP)
            uploads = (blobs[0] + parts[0], blobs[1] + parts[1])
            audit(self.settings, "archive-clear", caller=caller, master=None, generation=None,
                  files=len(removed), outcome="ok", removed=removed,
                  asked={"keep": keep, "older_than_days": older_than_days, "all": everything},
                  uploads_dropped=uploads[0])
        return Cleared(removed, *uploads)

    def _remove_entries(self, keep: int | None, older_than_days: float | None,
                        everything: bool) -> list[str]:
        entries = self.archives()
        now = dt.datetime.now(dt.timezone.utc)
        removed = []
        for index, entry in enumerate(reversed(entries)):  # newest first
            beyond = everything or keep is None or index >= keep
            if older_than_days is not None and not everything:
                created = dt.datetime.fromisoformat(entry["created"])
                beyond = beyond and (now - created).total_seconds() > older_than_days * 86400
            if beyond and (keep is not None or older_than_days is not None or everything):
                # out of the archive in one rename, then deleted: a kill part way through
                # leaves no entry that looks whole but lost files (recover() empties the trash)
                folder = self.archive_dir / entry["id"]
                trash = self.state_dir / "trash"
                try:
                    trash.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # a full disk has no block for a new folder: the record goes first (an
                    # unlink needs none), so what is left is no entry, then the rest
                    (folder / "archive.json").unlink(missing_ok=True)
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(entry["id"])
                    continue
                gone = trash / f"{entry['id']}.{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(folder, gone)
                except FileNotFoundError:
                    continue  # cleared by another process just now
                crash_point("archive-trashed")
                shutil.rmtree(gone, ignore_errors=True)
                removed.append(entry["id"])
        return sorted(removed)

    def _entry(self, archive_id: str) -> dict[str, Any]:
        """An archive entry's record, with ``previous``: the set its apply replaced."""
        meta = None
        if _ARCHIVE_ID_RE.match(archive_id) and archive_id not in (".", ".."):
            try:
                meta = read_json(self.archive_dir / archive_id / "archive.json")
                previous = self._previous(archive_id, meta) if isinstance(meta, dict) else None
            except Damaged as exc:
                # (moving the record aside, as Damaged says for esmirror's other records, would
                # only make the entry 'not found' while archive list still shows it)
                raise Damaged(f"archive entry {archive_id} cannot be restored: its record "
                              f"{exc.details.get('path')} is damaged; its files are still in its "
                              "folder, and 'esmirror archive clear' can remove it", **exc.details) from None
        if meta is None or previous is None:
            raise NotFound(f"there is no archive entry {archive_id!r} on this server; "
                           "'esmirror archive list' shows the entries")
        return meta | {"previous": previous}

    def _previous(self, archive_id: str, meta: dict[str, Any]) -> list[Any] | None:
        # entries made before previous.json existed hold the list in archive.json
        previous = meta.get("previous")
        if previous is None:
            previous = read_json(self.archive_dir / archive_id / PREVIOUS_JSON)
        return previous if isinstance(previous, list) else None

    def _archived_content(self) -> dict[str, Path]:
        """sha256 → a file in the archive holding that content (from each entry's manifest)."""
        found: dict[str, Path] = {}
        for entry in self.archives():
            if entry.get("damaged"):  # no source of content, and never stops another's restore
                continue
            try:
                meta = read_json(self.archive_dir / entry["id"] / "archive.json") or {}
                previous = {f.get("path"): f.get("sha256") for f in self._previous(entry["id"], meta) or []
                            if isinstance(f, dict)}
            except Damaged:  # (its previous.json)
                continue
            for rel in meta.get("files") or []:
                sha = previous.get(rel)
                path = self.archive_dir / entry["id"] / "files" / rel
                if sha and sha not in found and path.is_file():
                    found[sha] = path
        return found

    def restore(self, archive_id: str, caller: str | None = None) -> CommitResult:
        """Make the set exactly what it was just before the apply that created ``archive_id``.

        Content comes from the blob store, the live files and any archive entry
        (each copy verified against its hash); the switch is the same safe
        commit a push gets, and what it replaces is archived as a new entry.
        Audited, as a commit is: it changes the live set.
        """
        try:
            result = self._restore(archive_id)
        except MirrorError as exc:
            audit(self.settings, "restore", caller=caller, master=None, generation=None, files=None,
                  outcome=f"refused {exc.status}", restored_from=archive_id, error=exc.message)
            raise
        audit(self.settings, "restore", caller=caller, master=self.state().get("master"),
              generation=result.generation, outcome="ok", restored_from=archive_id,
              archive_id=result.archive_id,
              files={"added": result.added, "changed": result.changed, "removed": result.removed})
        return result

    def _restore(self, archive_id: str) -> CommitResult:
        with self.lock():
            self.recover()
            meta = self._entry(archive_id)
            target = Manifest.from_list(meta["previous"])
            state = self.state()
            scanned = self.scan()
            here = scanned.manifest.hashes()
            archived = self._archived_content()
            lost: list[str] = []
            for path, entry in sorted(target.files.items()):
                sha = entry.sha256
                if sha in here or self.store.has(sha):
                    continue
                source = archived.get(sha)
                try:
                    if source is None:
                        raise FileNotFoundError
                    with open(source, "rb") as fh:
                        self.store.put(sha, fh, entry.size)
                except (OSError, BadRequest) as exc:
                    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise self._os_failure("restoring", exc) from None
                    lost.append(f"{path} (sha256 {sha[:12]}…, {entry.size} bytes)")
            if lost:
                raise Conflict(f"cannot restore {archive_id}: the content of {len(lost)} file(s) is no "
                               "longer on this server (not live, not in any archive entry); nothing "
                               "was changed: " + "; ".join(lost), lost=lost)
            # the generation restored, when the entry is the owning master's; else the current
            # one: an older master's number would refuse the owner's next publish as older
            generation = meta.get("replaced_generation") if meta.get("master") == state.get("master") \
                else state.get("generation")
            result = self._apply(scanned, target, generation, state.get("master"),
                                 state, {"restored_from": archive_id})
            kept = meta.get("set_aside") or []
            if kept:  # not part of any set: a restore does not put them back, and says where they are
                result.warnings.append(
                    f"{len(kept)} file(s) found outside the set when entry {archive_id} was made are "
                    f"not put back (a set never holds them): {', '.join(kept[:5])}"
                    f"{' …' if len(kept) > 5 else ''}; they stay in {self.archive_dir / archive_id / 'files'}")
            return result

    def release(self, caller: str | None = None) -> str | None:
        """Forget the owning master (an admin's decision on this secondary, audited)."""
        with self.lock():
            state = self.state()
            owner = state.get("master")
            if owner:
                state["master"] = None
                write_json(self.state_path, state)
        audit(self.settings, "release", caller=caller, master=owner, generation=state.get("generation"),
              files=None, outcome="released" if owner else "no master owned it")
        return owner
