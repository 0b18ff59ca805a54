"""The configuration set as data: safe paths, scanning with a hash cache, digest, diff.

A manifest maps each relative ``/``-separated path to its SHA-256 and size.
Both sides compute it the same way, so the set digest (SPEC §2) agrees.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import queue
import re
import stat
import sys
import threading
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Generic, Iterable, Iterator, NamedTuple, TypeVar

from .errors import BadRequest, InvalidSet
from .state import WINDOWS, replace

if TYPE_CHECKING:  # (delta imports this module)
    from .delta import ChunkIndex

RESERVED_TOP = ("archive", ".esmirror")  # never part of the set, on any side
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul",
                     *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10)),
                     "com¹", "com²", "com³", "lpt¹", "lpt²", "lpt³", "conin$", "conout$"}
MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 1024
MAX_FILE_SIZE = 2**63 - 1  # what any filesystem's offsets can hold
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A file modified this close to a scan may change again within the filesystem's
# timestamp granularity without its mtime moving: never trust the cache for it.
RACY_SECONDS = 2.0
UNTRUSTED_KEY = [-1, -1, -1, -1]
HASH_CACHE_FILE = "hashcache.json"  # in a state dir: the master's and each secondary's
T = TypeVar("T")


_BAD_CHAR_RE = re.compile(r'[\x00-\x1f\x7f-\x9f<>:"|?*\\]')  # (C0 and C1 controls, DEL)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")  # (c:name too: on Windows, a name in drive C's current folder)


# Folders and unusual paths checked lately, per process: a set repeats its folders on every
# path, and a receiver checks its paths on every browse and commit; bounded, so memory stays flat.
PATHS_CACHED = 16384
# A file name of these characters alone needs only the checks path_problem makes of it
# itself: most names are like this, so a scan checks each folder once, not every path.
_PLAIN_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def name_encoding_note() -> str | None:
    """Why this process cannot write every file name, or None. Python encodes names as its
    locale says; one embedded in httpd (mod_wsgi) under a C or POSIX locale, which Debian's
    apache2 envvars set, gets ASCII: the python command switches to UTF-8 there, it does not."""
    encoding = sys.getfilesystemencoding()
    if codecs.lookup(encoding).name == "utf-8":
        return None
    return (f"this receiver's Python encodes file names as {encoding}, not UTF-8 (a C or POSIX "
            "locale): give it a UTF-8 locale (lang=C.UTF-8 locale=C.UTF-8 on WSGIDaemonProcess, "
            "as esmirror deploy apache renders; else LANG=C.UTF-8) and restart it")


def unwritable_names(paths: Iterable[str]) -> list[str]:
    """The paths this process cannot give the filesystem (see name_encoding_note)."""
    if name_encoding_note() is None:
        return []
    unwritable = []
    for path in paths:
        try:
            os.fsencode(path)
        except UnicodeEncodeError:
            unwritable.append(path)
    return unwritable


def path_problem(path: Any) -> str | None:
    """Why ``path`` may not be in a set (SPEC §2), or ``None`` when it is safe."""
    if not isinstance(path, str):
        return "a path must be a string"
    # The fast way, for a plain name in a folder already found safe: it accepts only what
    # _path_problem accepts (tests/test_fuzz.py holds them to that), so paths of tens of
    # thousands of files need not churn an LRU cache smaller than the set.
    folder, sep, name = path.rpartition("/")
    if (_PLAIN_NAME_RE.fullmatch(name) and name[-1] != "."
            and len(name) <= MAX_SEGMENT_BYTES
            and name.split(".")[0].casefold() not in _WINDOWS_RESERVED
            and (_path_problem(folder) is None if sep else name.casefold() not in RESERVED_TOP)
            and (len(path) if path.isascii() else len(path.encode("utf-8", "replace"))) <= MAX_PATH_BYTES):
        return None
    return _path_problem(path)


def shown_path(path: str) -> str:
    """A name as messages show it: one whose bytes are not UTF-8 with those bytes escaped
    (``\\xff``), the same on the master, in a secondary's answer and on any terminal, so the
    file to rename can be found (``ls -b`` shows them in octal)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


@functools.lru_cache(maxsize=PATHS_CACHED)
def _path_problem(path: str) -> str | None:
    if not path:
        return "empty path"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        # (or valid, and this process cannot tell: its file-name encoding is not UTF-8)
        return "not valid UTF-8: rename it" if name_encoding_note() is None else \
            "not readable as UTF-8 by this process (see the warning on its locale)"
    if len(encoded) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    if path.startswith("/") or _DRIVE_RE.match(path):
        return "absolute paths and drive letters are not allowed"
    bad = _BAD_CHAR_RE.search(path)
    if bad:
        char = bad.group()
        if ord(char) < 32 or 127 <= ord(char) <= 159:
            return "control characters (NUL included) are not allowed"
        return ("a backslash is not allowed: separate folders with /" if char == "\\"
                else f"the character {char!r} is not allowed (Windows refuses it)")
    segments = path.split("/")
    if segments[0].casefold() in RESERVED_TOP:
        return f"{segments[0]}/ is esmirror's own and never part of the set"
    for segment in segments:
        problem = _segment_problem(segment)
        if problem:
            return problem
    return None


@functools.lru_cache(maxsize=4096)
def _segment_problem(segment: str) -> str | None:
    """One name's checks; cached, as a set repeats its folder names on every path."""
    if segment in ("", ".", ".."):
        return "empty, '.' and '..' segments are not allowed"
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        return f"a name longer than {MAX_SEGMENT_BYTES} bytes"
    if segment[-1] in ". ":
        return f"{segment!r} ends in a dot or a space (Windows drops them)"
    if segment.split(".")[0].strip().casefold() in _WINDOWS_RESERVED:
        return f"{segment!r} is a reserved name on Windows"
    return None


def collision_key(path: str) -> str:
    # (no cache: normalizing an ASCII path is cheaper than an LRU cache's lookup)
    return unicodedata.normalize("NFC", path).casefold()


def inside_files(seen: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(path, why) for each path of a set that no case-insensitive filesystem can hold beside
    the others: inside another of its paths, as if that file were a folder, or in a folder
    that another path spells with another case ('Dir/x', 'dir/y': one folder on Windows).
    ``seen``: collision key → path."""
    as_file: dict[str, str | None] = {}  # folder → the path that names it as a file, if any
    clash: dict[str, tuple[str, str] | None] = {}  # folder → (its part, the other spelling)
    spelled: dict[str, str] = {}          # a folder's collision key → its first spelling
    for path in seen.values():
        folder = path.rpartition("/")[0]
        if not folder:
            continue
        if folder not in as_file:  # (a set has few folders: each is looked up once)
            parts = folder.split("/")
            as_file[folder] = clash[folder] = None
            for depth in range(1, len(parts) + 1):
                mine = "/".join(parts[:depth])
                key = collision_key(mine)
                if as_file[folder] is None:
                    as_file[folder] = seen.get(key)
                other = spelled.setdefault(key, mine)
                if other != mine and clash[folder] is None:
                    clash[folder] = (mine, other)
        outer, clashing = as_file[folder], clash[folder]
        if outer is not None:
            yield path, f"inside {outer!r}, which the set also has as a file"
        elif clashing is not None:
            yield path, (f"in folder {clashing[0]!r}, which is {clashing[1]!r} on Windows (the "
                         "names differ only by case or Unicode form)")


class FileEntry(NamedTuple):
    """One file of a set. A tuple: a set of 100,000 files makes as many, on both sides."""

    sha256: str
    size: int


_ENTRY_KEYS = {"path", "sha256", "size"}


@dataclass
class Manifest:
    """path → :class:`FileEntry`; knows its digest and how it differs from another.

    Built whole and never changed afterwards: its digest is worked out once.
    """

    files: dict[str, FileEntry] = field(default_factory=dict)

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.files, key=lambda p: p.encode("utf-8")):
            entry = self.files[path]
            h.update(f"{path}\0{entry.sha256}\0{entry.size}\n".encode("utf-8"))
        return h.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def hashes(self) -> set[str]:
        return {e.sha256 for e in self.files.values()}

    def to_list(self) -> list[dict[str, Any]]:
        return [{"path": p, "sha256": e.sha256, "size": e.size}
                for p, e in sorted(self.files.items(), key=lambda kv: kv[0].encode("utf-8"))]

    @classmethod
    def from_list(cls, items: Any) -> "Manifest":
        """Build from untrusted JSON; every path and hash is checked (SPEC §2)."""
        if not isinstance(items, list):
            raise BadRequest("'files' must be a list of {path, sha256, size}")
        files: dict[str, FileEntry] = {}
        seen: dict[str, str] = {}
        reasons: list[str] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict) or item.keys() != _ENTRY_KEYS:
                raise BadRequest(f"files[{index}] must be an object with exactly path, sha256, size")
            path, sha, size = item["path"], item["sha256"], item["size"]
            if not isinstance(sha, str) or not SHA256_RE.match(sha):
                raise BadRequest(f"files[{index}]: sha256 must be 64 lowercase hex digits")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
                raise BadRequest(f"files[{index}]: size must be a whole number of bytes, "
                                 f"0 to {MAX_FILE_SIZE}")
            problem = path_problem(path)
            if problem:
                reasons.append(f"{path!r}: {problem}")
                continue
            key = collision_key(path)
            if key in seen:
                reasons.append(f"{path!r} and {seen[key]!r} are the same file on Windows/macOS "
                               f"(they differ only by case or Unicode form{spelled(path, seen[key])})")
                continue
            seen[key] = path
            files[path] = FileEntry(sha, size)
        reasons += [f"{path!r}: {why}" for path, why in inside_files(seen)]
        if reasons:
            raise InvalidSet("the set has unsafe paths; nothing was changed", reasons)
        return cls(files)


@dataclass
class Diff:
    added: list[str]
    changed: list[str]
    removed: list[str]

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)


def diff(old: Manifest, new: Manifest) -> Diff:
    """What turns ``old`` into ``new``."""
    added = sorted(p for p in new.files if p not in old.files)
    changed = sorted(p for p in new.files if p in old.files and new.files[p] != old.files[p])
    removed = sorted(p for p in old.files if p not in new.files)
    return Diff(added, changed, removed)


# --- globs (include/exclude) -------------------------------------------------

def compile_glob(pattern: str) -> "re.Pattern[str] | GlobNFA":
    """``**`` spans folders, ``*`` and ``?`` stay within one name. ``.match(path)`` says
    whether ``path`` matches the whole pattern."""
    if "**" not in pattern and pattern.count("*") > 1:
        # Several stars compiled one by one backtrack exponentially (*a*a*a*ab against a long
        # name spun for minutes). Each star but the last takes the earliest match of the text
        # after it, in an atomic group (Python 3.11), as fnmatch does: with one kind of star
        # the earliest match is never worse, so the result is the same, in linear steps.
        first, *middle, last = pattern.split("*")
        return re.compile("^" + _glob_text(first) + "".join(
            f"(?>[^/]*?{_glob_text(part)})" for part in middle) + "[^/]*" + _glob_text(last) + "$")
    if "**" in pattern and pattern.count("*") > 2:
        # ** with other stars: a backtracking regex takes time growing as the name's length to
        # the power of the stars (**a**a**a**a**a**b: 1.4 s on an 80-character name)
        return GlobNFA(pattern)
    return glob_regex(pattern)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regular expression, star by star."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$")


class GlobNFA:
    """A glob matched by following every way through it at once: steps in proportion to
    the name's length times the pattern's, whatever the stars (glob_regex's meaning).
    Each (states, character) step is remembered: a scan meets the same ones again and
    again, and then a name costs a dictionary lookup per character."""

    MAX_REMEMBERED = 100_000  # steps kept, so a set of very varied names cannot grow it without end

    def __init__(self, pattern: str) -> None:
        self.tokens: list[str] = []  # "**/", "**", "*", "?" or one literal character
        i = 0
        while i < len(pattern):
            token = next((t for t in ("**/", "**", "*") if pattern.startswith(t, i)), pattern[i])
            self.tokens.append(token)
            i += len(token)
        self.start = self._close({0})
        self.steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    def _close(self, states: set[int]) -> frozenset[int]:
        """With each state, those after it that a star reaches matching nothing."""
        stack, out = list(states), set()
        while stack:
            i = stack.pop()
            if i not in out:
                out.add(i)
                if 0 <= i < len(self.tokens) and self.tokens[i] in ("**/", "**", "*"):
                    stack.append(i + 1)
        return frozenset(out)

    def _step(self, states: frozenset[int], char: str) -> frozenset[int]:
        after = set()
        for i in states:
            if i < 0:  # inside a "**/" (token -i-1) that has taken characters: a "/" may end it
                after.add(i)
                if char == "/":
                    after.add(-i)
                continue
            token = self.tokens[i] if i < len(self.tokens) else None
            if token == "**":
                after.add(i)
            elif token == "**/":  # nothing (the closure), or any characters, then a "/"
                after.add(-i - 1)
                if char == "/":
                    after.add(i + 1)
            elif token == "*":
                if char != "/":
                    after.add(i)
            elif token == "?":
                if char != "/":
                    after.add(i + 1)
            elif token == char:
                after.add(i + 1)
        return self._close(after)

    def match(self, text: str) -> bool:
        states, steps = self.start, self.steps
        for char in text:
            key = (states, char)
            found = steps.get(key)
            if found is None:
                if len(steps) >= self.MAX_REMEMBERED:
                    steps.clear()
                found = steps[key] = self._step(states, char)
            if not found:
                return False
            states = found
        return len(self.tokens) in states


def _glob_text(part: str) -> str:
    """A glob's text between stars: ``?`` is one character of a name, the rest literal."""
    return "".join("[^/]" if char == "?" else re.escape(char) for char in part)


def matches_any(path: str, patterns: "Iterable[re.Pattern[str] | GlobNFA]") -> bool:
    return any(p.match(path) for p in patterns)


# --- hashing and scanning ------------------------------------------------------

READ_TRIES = 3  # reads of a file that keeps changing under the scan, before it is called unsafe


class ChangedWhileRead(Exception):
    """The file's size or times moved while it was read: the bytes read may be a mix of
    two versions that never existed whole, so their hash must not name the file."""


def _unchanged(fh: BinaryIO, expect: os.stat_result | None) -> None:
    if expect is not None and _stat_key(os.fstat(fh.fileno()))[:3] != _stat_key(expect)[:3]:
        raise ChangedWhileRead(fh.name)


def hash_file(path: str | Path, expect: os.stat_result | None = None) -> str:
    """SHA-256 of the file; with ``expect`` (its stat before), ChangedWhileRead if it moved."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        _unchanged(fh, expect)
        return digest


# the chunk hashes and CRC-32s of a file's last content (ChunkIndex.previous)
PreviousChunks = tuple[list[str], list[int]]


def _chunk_digests(block: bytes, chunk_size: int, first: int, crcs: list[int] | None,
                   previous: PreviousChunks | None) -> list[str]:
    """SHA-256 of each chunk of ``block`` (chunks ``first``, ``first`` + 1, …), with its CRC-32
    appended to ``crcs`` when given. A full chunk whose CRC-32 is the one ``previous`` has
    at its place (never the last one there) takes the SHA-256 listed there unhashed."""
    view = memoryview(block)
    digests = []
    for n, at in enumerate(range(0, len(view), chunk_size), first):
        piece = view[at:at + chunk_size]
        if crcs is None:
            digests.append(hashlib.sha256(piece).hexdigest())
            continue
        crc = zlib.crc32(piece)
        crcs.append(crc)
        if previous is not None and n < len(previous[1]) - 1 and len(piece) == chunk_size \
                and previous[1][n] == crc:
            digests.append(previous[0][n])
        else:
            digests.append(hashlib.sha256(piece).hexdigest())
    return digests


class BackgroundHash:
    """SHA-256 fed on a second thread, so one stream's reads and writes overlap its hashing
    (hashlib releases the GIL on large blocks).

    The master hashing a changed large file (its chunk hashes meanwhile on this
    thread) and the receiver rebuilding a delta (~40 % of the rebuild was hashing)
    use it. A block handed to ``update`` must not change until hashed: bytes, or a
    view of a buffer that ``done`` (called once it is hashed) gives back. At most
    ``depth`` blocks wait, so memory stays flat. Use as a context manager: the
    thread always ends.
    """

    def __init__(self, depth: int = 8) -> None:
        self._hash = hashlib.sha256()
        self._blocks: queue.Queue[tuple[bytes | memoryview, Callable[[], object] | None] | None] = \
            queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="esmirror-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._blocks.get()) is not None:
            block, done = item
            try:
                self._hash.update(block)
            finally:
                if done is not None:
                    done()

    def update(self, block: bytes | memoryview, done: Callable[[], object] | None = None) -> None:
        self._blocks.put((block, done))

    def hexdigest(self) -> str:
        self._finish()
        return self._hash.hexdigest()

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._blocks.put(None)
            self._thread.join()

    def __enter__(self) -> "BackgroundHash":
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()


class Growing(Generic[T]):
    """A list one thread appends to and others follow as it grows, until it is closed.
    Followers never slow the writer: it only appends and notifies."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self.closed = False
        self._cond = threading.Condition()

    def add(self, items: Iterable[T]) -> None:
        with self._cond:
            self.items += items
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def follow(self, timeout: float | None = None) -> Iterator[T]:
        """Every item in order, waiting for more until closed; TimeoutError when nothing
        comes for ``timeout`` seconds."""
        n = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: n < len(self.items) or self.closed, timeout):
                    raise TimeoutError(f"nothing new for {timeout} s")
                ready, closed = self.items[n:], self.closed
            yield from ready
            n += len(ready)
            if closed and n == len(self.items):
                return


class ChunkFeed:
    """The chunk hashes of one large file while a scan works them out, for another thread
    to act on as they come (the master's early delta, agent/push.py) instead of after
    the whole scan.
    """

    def __init__(self, rel: str, path: str, size: int, chunk_size: int, previous_sha: str) -> None:
        self.rel, self.path, self.size, self.chunk_size = rel, path, size, chunk_size
        self.previous_sha = previous_sha  # the content the scan saw last time, likely on the secondaries
        self.chunks: Growing[str] = Growing()
        self.sha: str | None = None       # the whole file's, once read to the end

    def end(self, sha: str | None) -> None:
        """The file was read (``sha``), or reading it failed (None)."""
        self.sha = sha
        self.chunks.close()


def hash_chunks(path: str | Path, chunk_size: int, feed: ChunkFeed | None = None,
                previous: PreviousChunks | None = None, with_crc: bool = False,
                expect: os.stat_result | None = None) -> tuple[str, list[str], list[int]]:
    """(SHA-256 of the file, SHA-256 of each ``chunk_size`` chunk, CRC-32 of each chunk) in
    one read; the CRC-32s only ``with_crc`` or given ``previous``.

    The whole-file hash runs on a second thread while this one hashes the chunks, so
    on two cores both cost about what one does. ``feed`` hears of each block's chunks.

    ``previous`` (the master's lists for the file's last content): a chunk whose CRC-32
    is unchanged keeps its SHA-256 without hashing it again. CRC-32 ran 2.3× faster than
    SHA-256 on one dev VM and 1.4× on another (2.07 vs 1.44 GB/s), so a 150 MB index with
    1 MiB changed costs the CRC pass and four chunk hashes instead of a second SHA-256 pass. A CRC-32 that matches by chance
    (2^-32 per changed chunk) names a wrong chunk: the secondary's whole-file check
    refuses the rebuilt file, and the master sends that file whole and drops the list
    (agent/push.py).

    With ``expect`` (the stat the file had before), ChangedWhileRead when it moved while
    read; ``feed`` then ends without a hash, so nothing read is used as the file.
    """
    chunks: list[str] = []
    crcs: list[int] | None = [] if with_crc or previous is not None else None
    sha = None
    try:
        with open(path, "rb") as fh, BackgroundHash() as whole:
            while block := fh.read(chunk_size * 4):
                whole.update(block)
                digests = _chunk_digests(block, chunk_size, len(chunks), crcs, previous)
                chunks += digests
                if feed is not None:
                    feed.chunks.add(digests)
            _unchanged(fh, expect)
            sha = whole.hexdigest()
            return sha, chunks, crcs or []
    finally:
        if feed is not None:
            feed.end(sha)


def settled(st: os.stat_result) -> bool:
    """Written long enough ago that a change from now on moves its mtime: its hash can be
    trusted while its stat stays the same (a file written within the clock's resolution of
    being read could change again and keep the same stat).

    Any write also sets the ctime, to the kernel's clock, and nothing can set it back: a
    ctime long past proves the same. It settles a file whose mtime was set ahead (touch -d,
    a copy from a server whose clock is ahead), which the mtime alone would leave read again
    at every scan until that date. (Windows' st_ctime is the creation time: mtime only.)"""
    now = time.time()
    return now - st.st_mtime > RACY_SECONDS or (not WINDOWS and now - st.st_ctime > RACY_SECONDS)


def _stat_key(st: os.stat_result) -> list[int]:
    # (Windows: a scan's stat, from the folder listing, has st_ino 0; a file's own has the
    # real one. Both key it by 0, or every file a push wrote would be read again)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, 0 if WINDOWS else st.st_ino]


class HashCache:
    """SHA-256 of files keyed by (size, mtime_ns, ctime_ns, inode): an unchanged file is not re-read.

    With ``chunked = (min_size, chunk_size)``, a file of at least ``min_size`` that has
    to be read anyway gets its chunk hashes in the same pass (kept in ``chunk_lists``,
    in memory): the sub-file delta of a changed large file then needs no second read.
    ``on_read`` is called before each file it has to read (someone waiting for news),
    with a :class:`ChunkFeed` when that file is a large one whose earlier content the
    cache knew. With ``chunk_index`` (the master's), those chunk lists are kept on disk
    by content with their CRC-32s, so the next change of the file hashes only the
    chunks that changed (hash_chunks).

    ``fill_gaps`` (a secondary's, with ``chunk_index``): a large file read anyway gets
    its chunk list only when the index has none for the file's previous content, that
    is when it arrived whole. A file rebuilt from a delta came with its list
    (BlobStore.put_delta). So the first delta after a whole upload does not wait for
    ``GET chunks`` to read the file a second time.
    """

    def __init__(self, path: Path | None, chunked: tuple[int, int] | None = None,
                 on_read: Callable[[ChunkFeed | None], object] | None = None,
                 chunk_index: "ChunkIndex | None" = None, fill_gaps: bool = False) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        self.chunked = chunked
        self.on_read = on_read
        self.chunk_index = chunk_index
        self.fill_gaps = fill_gaps
        self.chunk_lists: dict[str, tuple[str, int, list[str]]] = {}  # rel → (sha, chunk size, chunks)
        if path is not None:
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self.entries = loaded
            except (OSError, ValueError):
                pass  # a lost or torn cache only costs a re-read

    def sha256(self, rel: str, full: str | Path, st: os.stat_result) -> str:
        cached = self.entries.get(rel)
        if cached and cached[:4] == _stat_key(st):
            return cached[4]
        chunked = self.chunked if self.chunked and st.st_size >= self.chunked[0] else None
        known = str(cached[4]) if cached and len(cached) == 5 else None  # the content it had
        feed = ChunkFeed(rel, str(full), st.st_size, chunked[1], known) if chunked and known else None
        if self.on_read is not None:
            self.on_read(feed)
        index = self.chunk_index
        if chunked and self.fill_gaps and index is not None:
            if known is not None and index.cached(known) is not None:
                sha = hash_file(full, st)  # (rebuilt from a delta, which left the new list)
            else:
                sha, chunks, _ = hash_chunks(full, chunked[1], expect=st)
                index.save(sha, chunks)
        elif chunked:
            previous = index.previous(known) if index and known else None
            sha, chunks, crcs = hash_chunks(full, chunked[1], feed, previous,
                                            with_crc=index is not None, expect=st)
            self.chunk_lists[rel] = (sha, chunked[1], chunks)
            if index is not None:
                index.save(sha, chunks, crcs)
        else:
            sha = hash_file(full, st)
        self.remember(rel, st, sha)
        return sha

    def remember(self, rel: str, st: os.stat_result, sha: str) -> None:
        """``rel``, as ``st`` shows it, holds content ``sha`` (read just now, or verified when
        written): the next scan need not read it while its stat stays the same."""
        # a racy file's hash is kept under a key no stat matches: read again next time, but
        # its content is known as the file's latest (the base of its next delta)
        self.entries[rel] = (_stat_key(st) if settled(st) else UNTRUSTED_KEY) + [sha]
        self.dirty = True

    def distrust(self, rel: str) -> None:
        """Read ``rel`` again at the next scan, whatever its stat: it was found to hold other
        bytes than its entry says (a write through a memory map can leave the stat as it was).
        Its content stays known as the file's latest, the base of its next delta."""
        entry = self.entries.get(rel)
        if entry and len(entry) == 5:
            self.entries[rel] = UNTRUSTED_KEY + [entry[4]]
            self.dirty = True

    def save(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        stale = [k for k in self.entries if k not in keep]
        for k in stale:
            del self.entries[k]
        if self.path is None or not (self.dirty or stale):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            replace(tmp, self.path)
        except OSError:
            try:  # a cache: a full or read-only disk costs a re-read next time, nothing more
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return
        self.dirty = False


@dataclass
class ScanResult:
    manifest: Manifest
    warnings: list[str]   # skipped symlinks and the like
    unsafe: list[str]     # "path: why" for files that break SPEC §2
    # chunk hashes of large files read by this scan (HashCache ``chunked``)
    chunk_lists: dict[str, tuple[str, int, list[str]]] = field(default_factory=dict)
    cache: HashCache | None = None  # the scan's, for a commit to add what it wrote
    skipped: list[str] = field(default_factory=list)  # symlinks and other entries not mirrored


# IO_REPARSE_TAG_MOUNT_POINT (the stat module names it on Windows only)
_JUNCTION_TAG = 0xA0000003


def is_link(st: os.stat_result) -> bool:
    """A symlink, or a Windows junction: an lstat of one reports a folder (Python 3.11),
    but walking it or writing through it reaches outside the working dir."""
    return stat.S_ISLNK(st.st_mode) or getattr(st, "st_reparse_tag", 0) == _JUNCTION_TAG


def not_a_file(full: str) -> str:
    """What stands at ``full`` instead of a regular file, in words."""
    try:
        st = os.lstat(full)
    except OSError:
        return "gone, or unreadable"
    if is_link(st):
        return "a symlink" if stat.S_ISLNK(st.st_mode) else "a junction"
    mode = st.st_mode
    for test, words in ((stat.S_ISFIFO, "a named pipe (FIFO)"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return words
    return "not a regular file"


def spelled(one: str, other: str) -> str:
    """Two names that print alike (one composed, one decomposed: é and e + ◌́) shown as
    code points, so a person can tell which is which; else nothing."""
    if one.casefold() == other.casefold():  # (a difference of case shows)
        return ""
    return f": {ascii(one)} and {ascii(other)}"


def walk_files(data_dir: Path, prefix: str = "") -> Iterator[tuple[str, str, os.stat_result | None]]:
    """Every entry under the working dir except archive/ and .esmirror/ (no symlinks followed).

    Yields (relative path, full path, stat) for regular files; stat is None for
    symlinks and other non-regular entries, which are not part of a set. Full paths
    are plain strings: a scan of thousands of files should not build a Path for each.
    ``prefix``: ``data_dir`` is that folder of the working dir (its paths start so).
    """
    stack = [(str(data_dir), prefix)]
    while stack:
        folder, rel_folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            rel = f"{rel_folder}{entry.name}"
            # esmirror's own folders, as this filesystem spells them (any case on Windows);
            # 'Archive/' on Linux is another folder, and path_problem refuses it by name
            if not rel_folder and os.path.normcase(entry.name) in RESERVED_TOP:
                continue
            if entry.is_symlink() or (WINDOWS and entry.is_dir(follow_symlinks=False)
                                      and is_link(entry.stat(follow_symlinks=False))):
                yield rel, entry.path, None
            elif entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, rel + "/"))
            elif entry.is_file(follow_symlinks=False):
                yield rel, entry.path, entry.stat(follow_symlinks=False)
            else:
                yield rel, entry.path, None


def scan(data_dir: Path, cache: HashCache | None = None,
         include: Iterable[str] = ("**",), exclude: Iterable[str] = ()) -> ScanResult:
    """The configuration set now in ``data_dir``."""
    cache = cache or HashCache(None)
    include, exclude = list(include), list(exclude)
    # the default include ("**") matches everything: no pattern to test per file
    inc = [] if "**" in include else [compile_glob(g) for g in include]
    exc = [compile_glob(g) for g in exclude]
    files: dict[str, FileEntry] = {}
    warnings: list[str] = []
    unsafe: list[str] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for rel, full, st in walk_files(data_dir):
        if (inc and not matches_any(rel, inc)) or (exc and matches_any(rel, exc)):
            continue
        if st is None or not stat.S_ISREG(st.st_mode):
            warnings.append(f"{shown_path(rel)}: skipped, {not_a_file(full)} (only regular files are mirrored)")
            skipped.append(rel)
            continue
        problem = path_problem(rel)
        key = collision_key(rel)
        if problem is None and key in seen:
            other = seen[key]
            if rel.encode("utf-8") < other.encode("utf-8"):  # (both passed path_problem: UTF-8)
                # the first by name stays in the set, whatever order the folder lists them in:
                # which file the set holds must not change from one scan to the next
                unsafe.append(f"{other}: same name as {rel!r} on Windows (differs only by case or "
                              f"Unicode form{spelled(other, rel)})")
                files.pop(other, None)
            else:
                problem = (f"same name as {other!r} on Windows (differs only by case or Unicode "
                           f"form{spelled(rel, other)})")
        if problem:
            unsafe.append(f"{shown_path(rel)}: {problem}")
            continue
        seen[key] = rel
        try:
            for _ in range(READ_TRIES):
                try:
                    files[rel] = FileEntry(cache.sha256(rel, full, st), st.st_size)
                    break
                except ChangedWhileRead:  # written to while read: read it again as it is now
                    st = os.stat(full)
            else:
                unsafe.append(f"{shown_path(rel)}: kept changing while it was read ({READ_TRIES} times); publish "
                              "again once whatever writes it is done")
        except FileNotFoundError:
            continue  # removed while scanning
    for rel, why in inside_files(seen):  # (only where names differ by case: A.idx, a.idx/x; D/x, d/y)
        unsafe.append(f"{shown_path(rel)}: {why}")
        files.pop(rel, None)
    cache.save(files)
    if cache.chunk_index is not None:
        cache.chunk_index.prune({entry.sha256 for entry in files.values()})
    return ScanResult(Manifest(files), sorted(warnings), sorted(unsafe), cache.chunk_lists, cache,
                      sorted(skipped))
