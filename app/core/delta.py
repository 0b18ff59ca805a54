"""Sub-file delta for large files: send only the chunks a secondary does not already hold.

A file of at least ``DELTA_MIN`` bytes whose older version (or a similar file) is on
the secondary travels as a *delta*: the secondary lists the SHA-256 of each fixed
``CHUNK_SIZE`` chunk of its copy (``GET chunks/<sha256>``), the master hashes the
chunks of the new file, and sends ``POST delta/<sha256>``: copy instructions for the
chunks the secondary has and the bytes of the others. The secondary rebuilds the
file into its blob store from its own old copy and keeps it only if the whole file
hashes to ``<sha256>``, exactly as an uploaded blob; so a stale or damaged base can
cost a resend, never a wrong file.

Fixed-size chunks fit how spatial indexes and overviews change (rewritten in
place); an insertion that shifts the rest of a file makes the rest a literal.

Body of ``POST delta/<sha256>`` (``Content-Type: application/x-esmirror-delta``):

* one line of JSON: ``{"size": N, "bases": [{"sha256": S, "path": P}, …]}``;
* frames until ``size`` bytes are described, in file order:
  ``C <base index> <offset> <length>\\n`` copies bytes of a base;
  ``L <length>\\n`` is followed by that many literal bytes.

``POST delta`` (no name) is the same body *streamed* while the master is still
reading the file (chunked transfer encoding, so no Content-Length): the master
sends frames as its scan hashes each chunk, so the secondary rebuilds while the
master reads instead of after. The file's SHA-256 is known only at the end, so
the body ends with ``E <sha256>\\n`` and the rebuilt file is kept under that name
only if it hashes to it. A server that cannot pass chunked bodies answers 411 and
the master sends the delta the ordinary way.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Collection, Iterator

from .errors import BadRequest, ChangedWhileSent, untrusted_json
from .manifest import MAX_FILE_SIZE, SHA256_RE, ChunkFeed, hash_chunks, path_problem

if TYPE_CHECKING:  # (store imports this module)
    from .store import BlobWriter, PatchWriter

CHUNK_SIZE = 256 * 1024
DELTA_MIN = 4 * 1024 * 1024       # smaller files are cheaper to send whole
MAX_HEADER = 64 * 1024
MAX_BASES = 4
CACHE_ENTRIES = 256               # chunk lists kept on a secondary, newest first
STALE_LISTS = 86400.0             # seconds a list of content no longer in the set is kept
READ_BLOCK = 1024 * 1024
_FRAME_RE = re.compile(rb"^(?:C (\d{1,4}) (\d{1,20}) (\d{1,20})|L (\d{1,20}))\n$")
_END_RE = re.compile(rb"^E ([0-9a-f]{64})\n$")
FOLLOW_TIMEOUT = 60.0             # a streamed delta gives up when the master's scan stalls this long


class ChunkIndex:
    """Chunk lists cached by content (``.esmirror/chunks/<sha256>``): the secondary's, for
    ``GET chunks``, and the master's, which also keep each chunk's CRC-32 so the next
    change of a file hashes only the chunks that changed (manifest.hash_chunks).

    Keyed by the file's SHA-256, so an entry is true forever for that content; a file
    changed behind our back only makes a delta fail its whole-file check.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "chunks"

    def _load(self, sha: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / sha).read_text(encoding="ascii"))
            if data.get("chunk_size") == CHUNK_SIZE and isinstance(data.get("chunks"), list):
                return data
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def cached(self, sha: str) -> list[str] | None:
        data = self._load(sha)
        return [str(c) for c in data["chunks"]] if data else None

    def previous(self, sha: str) -> tuple[list[str], list[int]] | None:
        """Chunk hashes and CRC-32s of content ``sha``, when both were kept (the master's)."""
        data = self._load(sha)
        if data is None:
            return None
        chunks, crcs = data["chunks"], data.get("crc32")
        if not isinstance(crcs, list) or len(crcs) != len(chunks):
            return None
        return [str(c) for c in chunks], [c if isinstance(c, int) else -1 for c in crcs]

    def get(self, sha: str, path: Path) -> list[str] | None:
        """Chunk hashes of ``path``, which must hold content ``sha``; None if it does not."""
        cached = self.cached(sha)
        if cached is not None:
            return cached
        try:
            whole, chunks, _ = hash_chunks(path, CHUNK_SIZE)
        except OSError:
            return None
        if whole != sha:
            return None
        self.save(sha, chunks)
        return chunks

    def save(self, sha: str, chunks: list[str], crcs: list[int] | None = None) -> None:
        data: dict[str, Any] = {"chunk_size": CHUNK_SIZE, "chunks": chunks}
        if crcs:
            data["crc32"] = crcs
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f"{sha}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(json.dumps(data), encoding="ascii")
            os.replace(tmp, self.dir / sha)
            entries = sorted(os.scandir(self.dir), key=lambda e: e.stat().st_mtime, reverse=True)
            for old in entries[CACHE_ENTRIES:]:
                os.unlink(old.path)
        except OSError:
            pass  # a cache: costs a re-read next time

    def prune(self, live: Collection[str], idle: float = STALE_LISTS) -> None:
        """Drop the lists of content no longer in the set once ``idle`` seconds old (one saved
        just now may be an upload's, about to be committed), and dead writers' temp files.
        Each list of a 4 GiB file is about 1 MB: by count alone, deleted files' lists could
        hold hundreds of MB."""
        cutoff = time.time() - idle
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.name not in live and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                continue

    def forget(self, sha: str) -> None:
        """Drop a list found wrong (a delta built from it failed the whole-file check)."""
        (self.dir / sha).unlink(missing_ok=True)


# --- the master's side ----------------------------------------------------------

@dataclass(frozen=True)
class Base:
    sha256: str
    path: str
    chunks: tuple[str, ...]
    chunk_size: int


@dataclass(frozen=True)
class Copy:
    base: int
    offset: int
    length: int


@dataclass(frozen=True)
class Literal:
    offset: int   # in the new file
    length: int


def pick_bases(rel: str, size: int, remote_files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Which of the secondary's files to rebuild ``rel`` from: its old version, else the
    closest in size (a renamed or copied index shares most chunks with its original)."""
    large = [f for f in remote_files if f.get("size", 0) >= DELTA_MIN]
    same = [f for f in large if f["path"] == rel]
    if same:
        return same[:1]
    large.sort(key=lambda f: (abs(f["size"] - size), f["path"]))
    return large[:2]


def plan(path: Path, size: int, bases: list[Base], chunks: list[str] | None = None) -> list[Copy | Literal]:
    """Frames that rebuild ``path`` from ``bases``.

    ``chunks``: the file's chunk hashes when the scan worked them out already (in
    the bases' chunk size); otherwise the file is read for them. A chunk is copied
    from the same offset of the first base when it matches there (the common case:
    a file changed in place), else from wherever it occurs.
    """
    where = _locations(bases)
    chunk_size = bases[0].chunk_size if bases else CHUNK_SIZE
    if chunks is None:
        _, chunks, _ = hash_chunks(path, chunk_size)
    if len(chunks) != -(-size // chunk_size):
        raise ChangedWhileSent(f"{path} changed size while being read; publish again once it is written")
    ops: list[Copy | Literal] = []
    for n, digest in enumerate(chunks):
        merged = _merge(ops, _chunk_op(n, digest, size, chunk_size, bases, where))
        if merged is not None:
            ops.append(merged)
    return ops


def _locations(bases: list[Base]) -> dict[str, tuple[int, int]]:
    """Where each chunk hash first occurs among ``bases``: (base index, offset)."""
    where: dict[str, tuple[int, int]] = {}
    for index, base in enumerate(bases):
        for n, digest in enumerate(base.chunks):
            where.setdefault(digest, (index, n * base.chunk_size))
    return where


def _chunk_op(n: int, digest: str, size: int, chunk_size: int, bases: list[Base],
              where: dict[str, tuple[int, int]]) -> Copy | Literal:
    """Chunk ``n`` of the new file: copied from the same offset of the first base when it
    matches there (the common case: a file changed in place), else from wherever it
    occurs, else sent."""
    offset = n * chunk_size
    length = min(chunk_size, size - offset)
    if bases and n < len(bases[0].chunks) and bases[0].chunks[n] == digest:
        return Copy(0, offset, length)
    if digest in where:
        return Copy(where[digest][0], where[digest][1], length)
    return Literal(offset, length)


def _merge(ops: list[Copy | Literal], op: Copy | Literal) -> Copy | Literal | None:
    """Extend the previous frame when ``op`` continues it; returns what to append."""
    if ops:
        last = ops[-1]
        if isinstance(last, Copy) and isinstance(op, Copy) and last.base == op.base \
                and last.offset + last.length == op.offset:
            ops[-1] = Copy(last.base, last.offset, last.length + op.length)
            return None
        if isinstance(last, Literal) and isinstance(op, Literal):
            ops[-1] = Literal(last.offset, last.length + op.length)
            return None
    return op


def header(size: int, bases: list[Base]) -> bytes:
    return json.dumps({"size": size, "bases": [{"sha256": b.sha256, "path": b.path}
                                                for b in bases]}).encode() + b"\n"


def frame_header(op: Copy | Literal) -> bytes:
    if isinstance(op, Copy):
        return f"C {op.base} {op.offset} {op.length}\n".encode()
    return f"L {op.length}\n".encode()


def body_length(size: int, bases: list[Base], ops: list[Copy | Literal]) -> int:
    return len(header(size, bases)) + sum(len(frame_header(o)) + (o.length if isinstance(o, Literal)
                                                                  else 0) for o in ops)


def literal_bytes(ops: list[Copy | Literal]) -> int:
    return sum(o.length for o in ops if isinstance(o, Literal))


def body_blocks(path: Path, size: int, bases: list[Base], ops: list[Copy | Literal],
                block: int = READ_BLOCK) -> Iterator[bytes]:
    """The request body, streamed: frame headers and the literal bytes read from ``path``."""
    yield header(size, bases)
    with open(path, "rb") as fh:
        for op in ops:
            yield frame_header(op)
            if isinstance(op, Literal):
                fh.seek(op.offset)
                left = op.length
                while left:
                    data = fh.read(min(block, left))
                    if not data:
                        raise ChangedWhileSent(f"{path} shrank while being sent; publish again "
                                               "once it is written")
                    yield data
                    left -= len(data)


def first_difference(feed: ChunkFeed, base: Base) -> Iterator[str] | None:
    """Follow the scan of ``feed`` until a chunk differs from ``base`` (a stream is worth
    starting); then every chunk hash, from the first. None when the file turns out to
    hold exactly the base's content: nothing to send."""
    seen: list[str] = []
    digests = feed.chunks.follow(FOLLOW_TIMEOUT)
    for digest in digests:
        seen.append(digest)
        if len(seen) > len(base.chunks) or base.chunks[len(seen) - 1] != digest:
            return itertools.chain(seen, digests)
    if len(seen) == len(base.chunks):
        return None  # every chunk the same, the last one too, so the same length
    return iter(seen)  # the base's first chunks only: the file was cut short


def stream_blocks(feed: ChunkFeed, base: Base, digests: Iterator[str],
                  stop: Callable[[], bool]) -> Iterator[bytes]:
    """The body of ``POST delta``, made while the scan reads the file (``feed``, whose chunk
    hashes come in ``digests``): a copy of each chunk ``base`` holds, the bytes of the
    others, and at the end the file's sha256.

    Literal bytes are read again from the file (from the page cache: the scan just
    read them); if the file changes meanwhile, the secondary's check of the whole
    file refuses the result. ``stop()`` true aborts the body (the publish stopped).
    """
    yield header(feed.size, [base])
    where = _locations([base])
    pending: list[Copy | Literal] = []   # a copy, held while the next chunks continue it
    with open(feed.path, "rb") as fh:
        for n, digest in enumerate(digests):
            if stop():
                raise OSError(f"the publish stopped while sending {feed.rel}")
            if n * base.chunk_size >= feed.size:
                raise OSError(f"{feed.rel} grew while being read")
            op = _chunk_op(n, digest, feed.size, base.chunk_size, [base], where)
            if isinstance(op, Copy):
                merged = _merge(pending, op)
                if merged is not None:
                    yield from map(frame_header, pending)
                    pending = [merged]
                continue
            yield from map(frame_header, pending)
            pending = []
            data = os.pread(fh.fileno(), op.length, op.offset)
            if len(data) != op.length:
                raise OSError(f"{feed.rel} shrank while being read")
            yield frame_header(op) + data
    yield from map(frame_header, pending)
    if feed.sha is None:
        raise OSError(f"reading {feed.rel} failed")
    yield f"E {feed.sha}\n".encode()


# --- the secondary's side ----------------------------------------------------------

def read_header(readline: Callable[[int], bytes]) -> tuple[int, list[tuple[str, str]], int]:
    """(size, [(base sha256, base path)], bytes read) from the body's first line; bad input is a 400."""
    line = readline(MAX_HEADER)
    shape = ("a delta body starts with one line of JSON {size, bases: [{sha256, path}]} "
             f"of at most {MAX_HEADER} bytes")
    data = untrusted_json(line, shape)
    try:
        size, bases = data["size"], data["bases"]
        assert isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_FILE_SIZE
        assert isinstance(bases, list) and len(bases) <= MAX_BASES
        out = []
        for base in bases:
            sha, rel = base["sha256"], base["path"]
            assert isinstance(sha, str) and SHA256_RE.match(sha) and isinstance(rel, str)
            out.append((sha, rel))
    except (ValueError, KeyError, TypeError, AssertionError):
        raise BadRequest(shape) from None
    for _, rel in out:
        problem = path_problem(rel)
        if problem:
            raise BadRequest(f"delta base {rel!r}: {problem}")
    return size, out, len(line)


class _OutputChunks:
    """The new file's chunk list, worked out while rebuilding, without hashing copied bytes:
    a copied whole chunk has the hash the base's list gives it; only literal bytes are
    hashed. Frames that do not line up with chunk boundaries make it give up (None)."""

    def __init__(self, size: int, base_chunks: list[list[str] | None], base_sizes: list[int]) -> None:
        self.size, self.base_chunks, self.base_sizes = size, base_chunks, base_sizes
        self.chunks: list[str] | None = []
        self.partial = hashlib.sha256()
        self.partial_len = 0

    def copy(self, at: int, index: int, offset: int, count: int) -> None:
        listing = self.base_chunks[index]
        ends_file = at + count == self.size and offset + count == self.base_sizes[index]
        if self.chunks is None or listing is None or at % CHUNK_SIZE or offset % CHUNK_SIZE \
                or (count % CHUNK_SIZE and not ends_file):
            self.chunks = None
            return
        first = offset // CHUNK_SIZE
        wanted = listing[first:first + -(-count // CHUNK_SIZE)]
        if len(wanted) != -(-count // CHUNK_SIZE):
            self.chunks = None
            return
        self.chunks += wanted

    def start_literal(self, at: int) -> None:
        if at % CHUNK_SIZE:
            self.chunks = None

    def literal(self, data: bytes) -> None:
        if self.chunks is None:
            return
        view = memoryview(data)
        while view:
            take = min(CHUNK_SIZE - self.partial_len, len(view))
            self.partial.update(view[:take])
            self.partial_len += take
            view = view[take:]
            if self.partial_len == CHUNK_SIZE:
                self.chunks.append(self.partial.hexdigest())
                self.partial, self.partial_len = hashlib.sha256(), 0

    def end_literal(self, at: int) -> None:
        if self.chunks is not None and self.partial_len and at != self.size:
            self.chunks = None  # a literal that stops inside a chunk, before the end

    def result(self) -> list[str] | None:
        if self.chunks is not None and self.partial_len:
            self.chunks.append(self.partial.hexdigest())
            self.partial_len = 0
        return self.chunks


def rebuild(stream: BinaryIO, length: int | None, size: int, bases: list[BinaryIO],
            out: "BlobWriter | PatchWriter",
            consumed: int, base_chunks: list[list[str] | None] | None = None) -> list[str] | None:
    """Write the new file to ``out`` (which hashes every byte written) from the frames of ``stream``.

    ``consumed`` bytes of the body (the header) were read already; ``length`` is None
    for a streamed body, which its frames bound (each describes at least one byte of
    the file; see read_end). Every frame is bounds-checked; the caller verifies the
    whole-file hash. Returns the new file's chunk list when it could be worked out
    for free (see _OutputChunks).
    """
    sizes = [os.fstat(b.fileno()).st_size for b in bases]
    listing = _OutputChunks(size, base_chunks or [None] * len(bases), sizes)
    remaining: float = length - consumed if length is not None else math.inf
    written = 0
    while written < size:
        line = stream.readline(int(min(64, remaining)))
        remaining -= len(line)
        match = _FRAME_RE.match(line)
        if not match:
            raise BadRequest(f"delta frame at byte {written} of the file: expected "
                             "'C <base> <offset> <length>\\n' or 'L <length>\\n'")
        if match.group(4) is not None:
            count = int(match.group(4))
            if not count:
                raise BadRequest(f"delta frame at byte {written} of the file describes no bytes")
            if count > remaining or written + count > size:
                raise BadRequest(f"delta literal of {count} bytes runs past the body or the file")
            listing.start_literal(written)
            _pump(stream, out, count, listing.literal)
            listing.end_literal(written + count)
            remaining -= count
        else:
            index, offset, count = int(match.group(1)), int(match.group(2)), int(match.group(3))
            if not count:
                raise BadRequest(f"delta frame at byte {written} of the file describes no bytes")
            if index >= len(bases) or written + count > size or offset + count > sizes[index]:
                raise BadRequest(f"delta copy from base {index} runs past the file or that base, "
                                 "or names no base")
            if out.in_place(index, offset):  # (over a clone of that base: already there)
                if out.keep(count) < count:
                    raise BadRequest("a delta frame ends early (a base that is shorter here)")
            else:
                src = bases[index]
                src.seek(offset)
                _pump(src, out, count)
            listing.copy(written, index, offset, count)
        written += count
    if length is not None and remaining:
        raise BadRequest(f"{remaining} bytes follow the last delta frame")
    return listing.result()


def read_end(stream: BinaryIO) -> str:
    """The sha256 a streamed delta ends with (``E <sha256>\\n``), after which the body must end."""
    match = _END_RE.match(stream.readline(80))
    if not match:
        raise BadRequest("a streamed delta ends, after its last frame, with 'E <sha256>\\n'")
    if stream.read(1):
        raise BadRequest("bytes follow the end of a streamed delta")
    return match.group(1).decode()


def _pump(source: BinaryIO, out: "BlobWriter | PatchWriter", count: int,
          seen: Callable[[memoryview | bytes], object] | None = None) -> None:
    if out.receive(source, count, seen) < count:
        raise BadRequest("a delta frame ends early (the body, or a base that is shorter here)")
