"""The receiver's blob store: content addressed by SHA-256, written stream → temp → verify → rename.

Nothing is held in memory: bodies are copied in chunks while being hashed, and a
blob only gets its final name once its bytes match that name and are durable.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import re
import shutil
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import BadRequest, Conflict, NoRoom
from .faults import crash_point
from .manifest import SHA256_RE, BackgroundHash
from .state import WINDOWS
from .room import check_room, what_is_full

CHUNK = 1024 * 1024
_BATCH_HEADER_RE = re.compile(rb"^([0-9a-f]{64}) (\d{1,20})\n$")
MAX_BATCH_HEADER = 128


FSYNC_AT_MOST = 32  # files; more than this and one flush of their filesystem is cheaper than an fsync each


def durable_flush(paths: list[Path]) -> None:
    """Make freshly written files durable with as few flushes as the platform allows.

    Many files: one flush of the filesystem that holds them instead of thousands of
    fsyncs. On Linux that is ``syncfs``, never ``sync()``: a push must not wait for
    whatever other programs left dirty on other disks (a backup, a tile cache, a network
    mount). Where there is no ``syncfs``, ``sync()``. A few files (an incremental
    publish): an fsync each and one per folder.
    """
    if not paths:
        return
    if len(paths) > FSYNC_AT_MOST:
        if _SYNCFS is not None:
            _flush_filesystems({path.parent for path in paths})
            return
        if hasattr(os, "sync"):
            os.sync()
            return
    for path in paths:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if os.name == "posix":  # the names too: a folder's entries are flushed with the folder
        for folder in {path.parent for path in paths}:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _flush_filesystems(folders: set[Path]) -> None:
    """``syncfs`` once for each filesystem that holds one of ``folders``."""
    one_per_filesystem: dict[int, Path] = {}
    for folder in folders:
        one_per_filesystem.setdefault(os.stat(folder).st_dev, folder)
    for folder in one_per_filesystem.values():
        fd = os.open(folder, os.O_RDONLY)
        try:
            if _SYNCFS(fd) != 0:  # type: ignore[misc]
                code = ctypes.get_errno()
                raise OSError(code, f"flushing the filesystem to disk failed: {os.strerror(code)}",
                              str(folder))
        finally:
            os.close(fd)


def _libc(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """A Linux libc function, or None (other systems, an old libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    return fn


_SYNCFS = _libc("syncfs", [ctypes.c_int])
_SYNC_FILE_RANGE = _libc("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 8 * CHUNK
KICK_MIN = CHUNK  # smaller blobs start no disk write of their own (BlobWriter.done)


class Writeback:
    """Start writing a file's bytes to disk while more arrive (Linux ``sync_file_range``).

    The durable flush that follows (fsync, or the commit's one sync) then waits for the
    tail only: disk writes overlap receiving and hashing instead of following them. It
    makes nothing durable by itself; elsewhere it does nothing.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.start = out.tell()  # appending a part starts past the bytes already there
        self.pending = 0

    def wrote(self, count: int) -> None:
        self.pending += count
        if self.pending >= WRITEBACK_EVERY:
            self.kick()

    def kick(self) -> None:
        if _SYNC_FILE_RANGE is None or not self.pending:
            return
        self.out.flush()
        _SYNC_FILE_RANGE(self.out.fileno(), self.start, self.pending, _SYNC_FILE_RANGE_WRITE)
        self.start += self.pending
        self.pending = 0


DIRECT_MIN = 4 * 1024 * 1024  # smaller blobs go through the page cache (see BlobWriter)
_DIRECT_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class _Lease:
    """A buffer out with the writer thread (and the hash thread): free again once all are done."""

    def __init__(self, buffer: mmap.mmap, free: "queue.Queue[mmap.mmap]", holders: int) -> None:
        self.buffer, self._free = buffer, free
        self._holders = holders
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._free.put(self.buffer)


class BlobWriter:
    """A new blob's bytes on their way to disk: ``receive`` or ``write``, then ``done`` (all
    handed to the OS) or ``finish`` (done, and durable). With a ``hasher``, every byte
    written is hashed too, in order; ``done`` before reading its digest.

    A blob of at least ``DIRECT_MIN`` is written past the page cache (Linux
    ``O_DIRECT``): it is made durable at once anyway, and every new page-cache page has
    to be allocated first. On this project's VM, writing 150 MiB into fresh page-cache
    pages took 0.44 s, through O_DIRECT 0.19 s; a delta rebuild inside the benchmark
    went from ~230 to ~130 ms. Blocks go through page-aligned 1 MiB buffers to a thread
    of their own, so the disk write of one overlaps receiving the next (an O_DIRECT
    write returns only once the device has the bytes); the tail is padded to a whole
    block, then cut back. ``receive`` reads a source that has ``readinto`` (a request
    body, a base file) straight into those buffers, and a full buffer goes to the
    hasher's thread and the writer's at once, coming back when both are done: no
    copy in Python. Smaller blobs, appended parts, other systems and filesystems that
    refuse ``O_DIRECT`` go through the page cache, with ``Writeback`` starting the disk
    writes early.
    """

    BUFFERS = 4  # one filling, the others with the hash thread and the writer thread

    def __init__(self, path: Path, size: int, append: bool = False,
                 hasher: "hashlib._Hash | BackgroundHash | None" = None) -> None:
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0) | (os.O_APPEND if append else os.O_TRUNC)
        self.direct = False
        self.size = 0
        self.hasher = hasher
        if _O_DIRECT and size >= DIRECT_MIN and not append:
            try:
                self.fd = os.open(path, flags | _O_DIRECT, 0o666)
                self.direct = True
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if self.direct:
            self._odirect = True  # a device that refuses our alignment turns it off
            self._free: queue.Queue[mmap.mmap] = queue.Queue()
            for _ in range(self.BUFFERS):
                self._free.put(mmap.mmap(-1, CHUNK))
            self._full: queue.Queue[tuple[mmap.mmap, int, Callable[[], None]] | None] = queue.Queue()
            self._error: Exception | None = None
            self._buffer = self._free.get()
            self._filled = 0
            self._thread: threading.Thread | None = threading.Thread(
                target=self._run, name="esmirror-write", daemon=True)
            self._thread.start()
        else:
            self.fd = os.open(path, flags, 0o666)
            self._file = os.fdopen(self.fd, "ab" if append else "wb", closefd=False)
            self._writeback = Writeback(self._file)

    def write(self, data: bytes | memoryview) -> None:
        """Bytes that must not change afterwards (they may be hashed on another thread)."""
        self.size += len(data)
        if not self.direct:
            if self.hasher is not None:
                self.hasher.update(data)
            self._file.write(data)
            self._writeback.wrote(len(data))
            return
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK - self._filled)
            self._buffer[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK:
                self._hand_over(CHUNK)

    def receive(self, source: "BinaryIO | BodyReader", count: int,
                seen: Callable[[memoryview | bytes], object] | None = None) -> int:
        """Up to ``count`` bytes of ``source`` into the blob; how many there were (fewer only
        when the source ended). ``seen`` is shown each piece as it passes."""
        readinto = getattr(source, "readinto", None) if self.direct else None
        if readinto is None:
            return _receive_by_reading(self, source, count, seen)
        left = count
        while left:
            space = memoryview(self._buffer)[self._filled:self._filled + min(CHUNK - self._filled, left)]
            got = readinto(space) or 0
            if got <= 0:
                break
            self._filled += got
            self.size += got
            if seen is not None:
                seen(space[:got])
            left -= got
            if self._filled == CHUNK:
                self._hand_over(CHUNK)
            crash_point("upload-write")
        return count - left

    def _hand_over(self, length: int, real: int | None = None) -> None:
        """The current buffer (``length`` bytes to write, of which ``real`` are the blob's)
        to the writer thread, and to the hasher; the next buffer once one is free."""
        if self._error is not None:
            raise self._error
        block, hasher = memoryview(self._buffer)[:length if real is None else real], self.hasher
        lease = _Lease(self._buffer, self._free, holders=2 if isinstance(hasher, BackgroundHash) else 1)
        if isinstance(hasher, BackgroundHash):
            hasher.update(block, lease.release)
        elif hasher is not None:
            hasher.update(block)
        self._full.put((self._buffer, length, lease.release))
        self._buffer, self._filled = self._free.get(), 0

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, length, release = item
            try:
                if self._error is None:
                    self._write(buffer, length)
            except Exception as exc:  # raised in the request's thread; buffers keep coming back
                self._error = exc
            finally:
                release()

    def _write(self, buffer: mmap.mmap, length: int) -> None:
        view = memoryview(buffer)[:length]
        while view:
            # a write cut short (the disk filled up meanwhile) goes on: the next one says why
            # (ENOSPC: the upload's 507)
            written = self._write_some(view)
            if written <= 0:
                raise OSError(errno.EIO, f"a write to a new blob wrote nothing ({len(view)} bytes left)")
            view = view[written:]

    def _write_some(self, view: memoryview) -> int:
        try:
            return os.write(self.fd, view)
        except OSError as exc:
            if not (self._odirect and exc.errno == errno.EINVAL):
                raise
            # the device wants a larger alignment than ours (or a short write left the rest
            # unaligned): the page cache after all
            import fcntl
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
            self._odirect = False
            return os.write(self.fd, view)

    def _stop(self) -> None:
        if self._thread is not None:
            self._full.put(None)
            self._thread.join()
            self._thread = None

    def done(self) -> None:
        """Every byte written handed to the OS (not yet durable), and to the hasher."""
        if not self.direct:
            # a small blob is left to the one flush that follows (a batch's sync()): starting
            # each one's disk write on its own made 2,000 files of 32 KB plus that sync cost
            # 0.12-0.16 s of CPU instead of 0.06-0.08 s, and finish no sooner
            if self.size >= KICK_MIN:
                self._writeback.kick()
            return
        cut = False
        if self._filled:  # O_DIRECT writes whole blocks: the tail is padded, then cut back
            padded = -(-self._filled // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self._buffer[self._filled:padded] = bytes(padded - self._filled)
            cut = padded != self._filled
            self._hand_over(padded, self._filled)
        self._stop()
        if self._error is not None:
            raise self._error
        if cut:
            os.ftruncate(self.fd, self.size)  # (a blob written this way starts at byte 0)

    def finish(self) -> None:
        """Every byte written, on disk."""
        self.done()
        os.fsync(self.fd)

    def in_place(self, base: int, offset: int) -> bool:
        """A new file is written whole (PatchWriter writes over a clone)."""
        return False

    def close(self) -> None:
        if self.direct:
            self._stop()
        else:
            self._file.close()
        os.close(self.fd)

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _receive_by_reading(out: "BlobWriter | PatchWriter", source: "BinaryIO | BodyReader", count: int,
                        seen: Callable[[memoryview | bytes], object] | None) -> int:
    """``receive`` through ``out.write``, a piece at a time (what is not read straight into
    BlobWriter's own buffers)."""
    left = count
    while left:
        piece = source.read(min(CHUNK, left))
        if not piece:
            break
        out.write(piece)
        if seen is not None:
            seen(piece)
        left -= len(piece)
        crash_point("upload-write")
    return count - left


_FICLONE = 0x40049409  # <linux/fs.h>: the target file shares the source's extents


def clone_file(source_fd: int, target_fd: int) -> bool:
    """Make the target file a copy of the source by sharing its extents, where the filesystem
    can (XFS made with reflink, the default since 2019; btrfs): nothing is written, and
    the copy takes no space until one of them changes. False where it cannot (ext4,
    tmpfs, NTFS, another filesystem, other systems); the caller then copies."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl
    try:
        fcntl.ioctl(target_fd, _FICLONE, source_fd)
    except OSError:
        return False
    return True


class PatchWriter:
    """A delta's rebuild on top of a clone of its first base (``clone_file``): bytes a copy
    frame leaves where they were are already in place, so only changed ones are written.

    1 MiB changed in a 150 MiB index then writes and flushes 1 MiB, not 150, and the new
    file shares the rest with the old one the archive keeps. Every byte is hashed as
    the new file holds it: kept ones are read back from the clone, not from the base,
    which could change after the clone was made. Same interface as BlobWriter.
    """

    def __init__(self, fd: int, hasher: "hashlib._Hash | BackgroundHash") -> None:
        self.fd, self.hasher, self.size = fd, hasher, 0
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    @classmethod
    def over_clone(cls, path: Path, base: BinaryIO,
                   hasher: "hashlib._Hash | BackgroundHash") -> "PatchWriter | None":
        """A writer on ``path``, made a clone of ``base``; None where the filesystem cannot clone."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
        if clone_file(base.fileno(), fd):
            return cls(fd, hasher)
        os.close(fd)
        return None

    def in_place(self, base: int, offset: int) -> bool:
        """Whether copying from ``offset`` of base ``base`` to here would copy bytes onto themselves."""
        return base == 0 and offset == self.size

    def keep(self, count: int) -> int:
        """The next ``count`` bytes stay as the clone has them; how many there were."""
        end = self.size + count
        while self.size < end:
            block = os.pread(self.fd, min(CHUNK, end - self.size), self.size)
            if not block:
                break
            self.hasher.update(block)
            self.size += len(block)
        return count - (end - self.size)

    def write(self, data: bytes | memoryview) -> None:
        """Bytes that must not change afterwards (they may be hashed on another thread)."""
        self.hasher.update(data)
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, self.size)
            if written <= 0:
                raise OSError(errno.EIO, f"a write to a new blob wrote nothing ({len(view)} bytes left)")
            view = view[written:]
            self.size += written

    def receive(self, source: "BinaryIO | BodyReader", count: int,
                seen: Callable[[memoryview | bytes], object] | None = None) -> int:
        """As BlobWriter.receive."""
        return _receive_by_reading(self, source, count, seen)

    def done(self) -> None:
        os.ftruncate(self.fd, self.size)  # the base may have been longer

    def finish(self) -> None:
        self.done()
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "PatchWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BodyReader:
    """A request body read in large blocks, handed out in pieces without copying.

    A batch body is thousands of small frames; asking the WSGI server for each
    header line and each few-KB blob makes some servers copy their whole read-ahead
    buffer on every call (gunicorn's Body does, up to 1 MiB per call). Here the
    server sees only ``CHUNK``-sized reads and the pieces are views of them.
    """

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self.stream = stream
        self.left = length      # body bytes not yet read from the stream
        self.buf = memoryview(b"")

    def _fill(self) -> None:
        if not self.buf and self.left:
            data = self.stream.read(min(CHUNK, self.left))
            self.left -= len(data)
            if not data:
                self.left = 0   # the body ended early; callers see a short read
            self.buf = memoryview(data)

    def read(self, size: int) -> memoryview:
        """Up to ``size`` bytes (fewer only at a block's end); empty at the body's end."""
        self._fill()
        piece, self.buf = self.buf[:size], self.buf[size:]
        return piece

    def readline(self, limit: int) -> bytes:
        """Up to and including the next newline, at most ``limit`` bytes."""
        line = b""
        while len(line) < limit:
            self._fill()
            if not self.buf:
                break
            head = self.buf[:limit - len(line)].tobytes()
            end = head.find(b"\n")
            take = len(head) if end < 0 else end + 1
            line += head[:take]
            self.buf = self.buf[take:]
            if end >= 0:
                break
        return line


class BlobStore:
    """``.esmirror/blobs/<sha256>`` with a ``tmp/`` beside it on the same filesystem."""

    def __init__(self, state_dir: Path) -> None:
        self.blobs = state_dir / "blobs"
        self.tmp = state_dir / "tmp"

    def path(self, sha: str) -> Path:
        return self.blobs / sha

    def has(self, sha: str) -> bool:
        return self.size(sha) is not None

    def size(self, sha: str) -> int | None:
        """The stored blob's size in bytes; None when it is not here."""
        try:
            st = os.stat(self.path(sha))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def _tmp_file(self, label: str, folder_made: bool = False) -> Path:
        if not folder_made:
            self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{label}.{os.getpid()}.{uuid.uuid4().hex}"

    def _publish(self, tmp: Path, sha: str, folder_made: bool = False) -> None:
        if not folder_made:
            self.blobs.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, self.path(sha))

    def put(self, sha: str, stream: BinaryIO, length: int) -> int:
        """Store one blob from a request body of ``length`` bytes."""
        check_sha(sha)
        tmp = self._tmp_file(sha[:16])
        try:
            # a few uploads run at once: each keeps at most 2 blocks waiting for its hash thread
            with BackgroundHash(depth=2) as hasher, BlobWriter(tmp, length, hasher=hasher) as out:
                _received_all(out.receive(stream, length), length)
                out.done()
                _verify(hasher, sha, length)
                out.finish()
            crash_point("upload-verified")
            self._publish(tmp, sha)
            crash_point("upload-stored")
        except OSError as exc:
            raise self._no_room(exc, length) from None
        finally:
            tmp.unlink(missing_ok=True)
        return length

    def put_delta(self, sha: str | None, stream: BinaryIO, length: int | None,
                  find_base: Callable[[str, str], Path | None]) -> tuple[str, int]:
        """Rebuild a large blob from a delta body (app/core/delta.py) and this server's own copies.

        ``find_base(sha256, path)`` locates a base here. Kept only if every byte written
        hashes to ``sha``, like any blob. A streamed delta (``length`` None) names no
        ``sha`` up front: its body ends with it. Returns the blob's sha256 and size.
        """
        from . import delta

        if sha is not None:
            check_sha(sha)
        size, wanted, consumed = delta.read_header(stream.readline)
        index = delta.ChunkIndex(self.blobs.parent)
        bases: list[BinaryIO] = []
        tmp = self._tmp_file(sha[:16] if sha else "delta")
        check_room(self.tmp, size, f"rebuilding {(sha or 'a file')[:12]}… from a delta")  # the body is far smaller
        try:
            for base_sha, rel in wanted:
                found = find_base(base_sha, rel)
                if found is None:
                    raise Conflict(f"delta base {rel} ({base_sha[:12]}…) is not on this server; "
                                   "send the whole file", missing_base=base_sha)
                bases.append(open(found, "rb"))
            with BackgroundHash() as hasher, _rebuild_target(tmp, size, hasher, bases) as out:
                chunks = delta.rebuild(stream, length, size, bases, out, consumed,
                                       [index.cached(b) for b, _ in wanted])
                if sha is None:
                    sha = delta.read_end(stream)
                out.done()
                _verify(hasher, sha, size)
                if chunks is not None:  # the next delta of this file needs no re-read here
                    index.save(sha, chunks)
                out.finish()
            crash_point("upload-delta-rebuilt")
            self._publish(tmp, sha)
        except OSError as exc:
            raise self._no_room(exc, size) from None
        finally:
            for fh in bases:
                fh.close()
            tmp.unlink(missing_ok=True)
        return sha, size

    def _no_room(self, exc: OSError, length: int) -> OSError | NoRoom:
        """A full disk while storing is a 507 with the numbers; other I/O errors stay as they are."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return exc
        what, free = what_is_full(self.tmp)
        return NoRoom(f"{what} while storing {length} bytes of uploads in {self.tmp}; nothing was "
                      "kept. Free some space (esmirror archive clear) and publish again",
                      needed=length, free=free)

    def put_part(self, sha: str, stream: BinaryIO, start: int, length: int, total: int) -> bool:
        """One part of a blob too large for one request (IIS caps a body at 4 GiB − 1).

        Parts arrive in order; the whole file is verified when the last one lands.
        Returns True once the blob is complete.
        """
        check_sha(sha)
        self.tmp.mkdir(parents=True, exist_ok=True)
        partial = self.tmp / f"{sha}.partial"
        if start == 0:
            partial.unlink(missing_ok=True)  # a new upload of this blob (the last one died)
        have = partial.stat().st_size if partial.exists() else 0
        if start != have:
            raise Conflict(f"part starts at byte {start} but {have} bytes of {sha[:12]}… are here; "
                           f"resend from byte {have}", resume_from=have)
        if start + length > total:
            raise BadRequest(f"part ends at byte {start + length}, past the blob size {total}")
        try:
            # no hash per part: a hash cannot carry over to the next request; the whole
            # file is hashed from disk when the last part lands
            with BlobWriter(partial, length, append=True) as out:
                _received_all(out.receive(stream, length), length)
                out.done()
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise self._no_room(exc, length) from None
        crash_point("upload-part")
        if start + length < total:
            return False
        with open(partial, "rb") as fh:
            hasher = hashlib.file_digest(fh, "sha256")
        try:
            _verify(hasher, sha, total)
        except BadRequest:
            partial.unlink(missing_ok=True)
            raise
        durable_flush([partial])
        self._publish(partial, sha)
        return True

    def put_batch(self, stream: BinaryIO, length: int,
                  check: Callable[[list[tuple[str, int]]], None] | None = None) -> list[str]:
        """Many small blobs in one body: frames of ``<sha256> <size>\\n<bytes>``.

        All or nothing: blobs get their names only after every frame checked out,
        and after ``check`` (given the frames' (sha256, size), e.g. to match a
        signed digest) raised nothing.
        """
        done: list[tuple[Path, str]] = []
        frames: list[tuple[str, int]] = []
        remaining = length
        body = BodyReader(stream, length)
        published = 0
        try:
            # both folders once per batch: asked per blob (mkdir, EEXIST, stat; twice), and
            # the finally's unlink of every name already renamed, cost 2,000 blobs ~40 ms
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.blobs.mkdir(parents=True, exist_ok=True)
            while remaining:
                header = body.readline(min(MAX_BATCH_HEADER, remaining))
                remaining -= len(header)
                match = _BATCH_HEADER_RE.match(header)
                if not match:
                    raise BadRequest(
                        f"blob {len(done) + 1} of the batch: bad frame header; expected "
                        "'<sha256 hex> <size>\\n' before each blob's bytes")
                sha, size = match.group(1).decode(), int(match.group(2))
                if size > remaining:
                    raise BadRequest(f"blob {sha[:12]}… claims {size} bytes but the body has {remaining} left")
                tmp = self._tmp_file(sha[:16], folder_made=True)
                done.append((tmp, sha))
                hasher = hashlib.sha256()
                with BlobWriter(tmp, size, hasher=hasher) as out:
                    _received_all(out.receive(body, size), size)
                    out.done()
                    _verify(hasher, sha, size)
                frames.append((sha, size))
                remaining -= size
                crash_point("upload-batch-blob")
            if check is not None:
                check(frames)
            durable_flush([tmp for tmp, _ in done])
            crash_point("upload-batch-flushed")
            for tmp, sha in done:
                self._publish(tmp, sha, folder_made=True)
                published += 1
                crash_point("upload-batch-stored")
        except OSError as exc:
            raise self._no_room(exc, length) from None
        finally:
            for tmp, _ in done[published:]:
                tmp.unlink(missing_ok=True)
        return [sha for _, sha in done]

    def clear(self, older_than: float, shared: bool = False) -> tuple[int, int]:
        """Drop blobs stored before ``older_than`` (after a successful apply they are live files;
        ``math.inf``: every blob, which the master uploads again if it still needs one). Returns
        (blobs dropped, bytes that freed). Call with the commit lock held (a commit links them).

        ``shared`` (recovery): also every blob name that shares its file with another name:
        a commit killed after its switch, before it dropped the names of the blobs it linked
        into place. Such a blob changes with the live file (an edit in place), so it is no
        longer the content its name says; the master uploads it again if it is needed."""
        count = freed = 0
        for entry, st in self._stored():
            if st.st_mtime < older_than or (shared and st.st_nlink > 1):
                try:
                    Path(entry.path).unlink(missing_ok=True)
                except PermissionError:
                    if not WINDOWS:
                        raise
                    continue  # its live file is open (Express Server's): a recovery drops the
                              # name later, as a shared one
                count += 1
                freed += st.st_size if st.st_nlink == 1 else 0  # (one linked live too frees nothing)
        return count, freed

    def partials(self) -> dict[str, int]:
        """sha256 → bytes here of a large file whose upload in parts was cut short: the
        master resumes it from there instead of sending it all again."""
        found: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.tmp))
        except OSError:
            return found
        for entry in entries:
            sha, dot, kind = entry.name.partition(".")
            if dot and kind == "partial" and SHA256_RE.match(sha):
                try:
                    found[sha] = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
        return found

    def uploaded(self) -> list[str]:
        """The blobs here, verified on upload and waiting for a commit (a push cut short
        leaves them): a master need not send them again. A name linked elsewhere too is a
        live file's (see clear), not a blob."""
        return sorted(entry.name for entry, st in self._stored()
                      if SHA256_RE.match(entry.name) and stat.S_ISREG(st.st_mode) and st.st_nlink == 1)

    def _stored(self) -> Iterator[tuple[os.DirEntry[str], os.stat_result]]:
        """Each entry of blobs/ with its stat (one removed meanwhile is skipped)."""
        if not self.blobs.is_dir():
            return
        for entry in os.scandir(self.blobs):
            try:  # (on Windows a listing's stat has st_nlink 0: the file's own is needed)
                yield entry, (os.stat(entry.path, follow_symlinks=False) if WINDOWS
                              else entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue

    def clear_stale_tmp(self, older_than: float = 6 * 3600, now: float | None = None) -> tuple[int, int]:
        """Temp files of uploads that died (a kill -9 mid-body) go after ``older_than``
        seconds untouched; a file's parts wait that long for the master to resume them.
        ``now``: by the files' clock (state.fs_now). Returns (files dropped, bytes)."""
        count = freed = 0
        if not self.tmp.is_dir():
            return count, freed
        limit = (time.time() if now is None else now) - older_than
        for entry in os.scandir(self.tmp):
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime < limit:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                        freed += st.st_size
                    count += 1
            except FileNotFoundError:
                pass
        return count, freed


def _rebuild_target(path: Path, size: int, hasher: BackgroundHash,
                    bases: list[BinaryIO]) -> "BlobWriter | PatchWriter":
    """Where a delta is rebuilt: over a clone of its first base (usually the file's older
    version) where the filesystem can make one, else into a new file."""
    return (bases and PatchWriter.over_clone(path, bases[0], hasher)) or BlobWriter(path, size, hasher=hasher)


def check_sha(sha: str) -> None:
    if not SHA256_RE.match(sha):
        raise BadRequest(f"{sha[:80]!r} is not a SHA-256 (64 lowercase hex digits)")


def _received_all(got: int, length: int) -> None:
    if got < length:
        raise BadRequest(f"the body ended {length - got} bytes early (expected {length} bytes)")


def _verify(hasher: "hashlib._Hash | BackgroundHash", sha: str, size: int) -> None:
    got = hasher.hexdigest()
    if got != sha:
        raise BadRequest(f"blob {sha[:12]}…: the {size} bytes received hash to {got[:12]}…; "
                         "the data was damaged in transit or the file changed while being sent",
                         mismatch=sha)
