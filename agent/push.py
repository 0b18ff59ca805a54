"""Push the master's set to one secondary: browse check, diff, upload what it lacks, commit."""
from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from app.core import PROTOCOL
from app.core.apply import commit_limit, room_needed
from app.core.audit import now_iso
from app.core import delta
from app.core.errors import ChangedWhileSent, MirrorError, NoRoom, RemoteError, TooLarge, one_line
from app.core.express import Secondary
from app.core.manifest import ChunkFeed, Growing, HashCache, Manifest, diff
from app.core.settings import Settings

from .client import Body, Interrupt, Interrupted, SecondaryClient, unforeseen

SMALL_FILE = 1024 * 1024          # files up to this size travel in batches
BATCH_BYTES = 32 * 1024 * 1024    # one POST blobs body
BATCH_FILES = 2000
FRAME_HEADER = 64 + 1 + 20 + 1    # "<sha256> <size>\n" at most
MAX_PART = 4 * 1024**3 - 1        # no body larger, whatever browse allows (IIS takes no more)
INODE_RESERVE = 64                # inodes a commit needs beside its files: folders, records, temp files
UPLOAD_THREADS = 4
COMMIT_TRIES = 3


@dataclass
class LocalSet:
    """The master's set: the manifest and where each file is on disk."""

    manifest: Manifest
    root: Path
    generation: int
    master: str
    # rel → (sha256, chunk size, chunk hashes) of large files the scan read (no re-read to plan a delta)
    chunk_lists: dict[str, tuple[str, int, list[str]]] = field(default_factory=dict)
    chunk_index: delta.ChunkIndex | None = None  # where the scan keeps them for the next change
    # entries of the master's working dir the set skips (symlinks...): a secondary's files
    # under them would be removed there, which a push refuses without --force (hidden_there)
    skipped: tuple[str, ...] = ()
    hash_cache: HashCache | None = None  # the scan's: a file found to hold other bytes is read next time
    _saving: threading.Lock = field(default_factory=threading.Lock, repr=False)
    reached: "Reached" = field(default_factory=lambda: Reached(), repr=False)

    def path(self, rel: str) -> Path:
        return self.root / rel

    @functools.cached_property
    def list_json(self) -> bytes:
        """The set's file list as every commit sends it (JSON): encoded once per publish, not
        once per secondary and again to check its size (tens of MB for 100,000 files)."""
        return json.dumps(self.manifest.to_list()).encode("utf-8")

    def chunks(self, rel: str, sha: str, chunk_size: int) -> list[str] | None:
        known = self.chunk_lists.get(rel)
        return known[2] if known and known[0] == sha and known[1] == chunk_size else None

    def distrust(self, sha: str) -> list[str]:
        """A secondary received other bytes than ``sha`` for the files that the scan found
        holding it: they changed since, possibly without their stat moving (a write through
        a memory map). The next scan reads them again. Returns those files."""
        files = sorted(rel for rel, entry in self.manifest.files.items() if entry.sha256 == sha)
        if files and self.hash_cache is not None:
            with self._saving:  # (pushes to several secondaries run on threads)
                for rel in files:
                    self.hash_cache.distrust(rel)
                self.hash_cache.save(self.manifest.files)
        return files

    def distrust_chunks(self, rel: str, sha: str) -> None:
        """A delta planned from this file's chunk list failed the secondary's whole-file
        check: the list may hold a hash kept on a CRC-32 that matched by chance. Drop it,
        here and on disk, so the next plan (and the next scan) reads the file again."""
        self.chunk_lists.pop(rel, None)
        if self.chunk_index is not None:
            self.chunk_index.forget(sha)


@dataclass
class PushResult:
    host: str
    port: int
    state: str = "failed"   # in-sync | failed | unreachable | refused | dry-run | skipped | interrupted
    error: str | None = None
    reason: str | None = None  # why it failed, for a machine: one of REASONS
    bytes_sent: int = 0
    files_sent: int = 0
    files_ahead: int = 0    # of files_sent: large files streamed while the master was scanning
    generation: int | None = None
    digest: str | None = None
    archive_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    ended: str | None = None  # when this push ended (a publish's last may end minutes later)
    # refused by the browse check (versions, owner, role): a later look sees whether that was
    # fixed. A refusal of the push routes themselves (allow_push, the secret) only a push can
    refused_by_look: bool = False

    @property
    def ok(self) -> bool:
        return self.state in ("in-sync", "dry-run")

    @property
    def name(self) -> str:
        return Secondary(self.host, self.port).name

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ScanNews:
    """What the master's scan has found so far, for the openings waiting on it."""

    def __init__(self) -> None:
        self._decided = threading.Event()
        self.reading = False
        self._large: Growing[ChunkFeed] = Growing()

    def reading_files(self, feed: ChunkFeed | None = None) -> None:
        """A file changed since the last scan (it must be read): the set has likely changed.
        ``feed``: it is a large file whose chunk hashes come as the scan reads it."""
        self.reading = True
        self._decided.set()
        if feed is not None:
            self._large.add([feed])

    def done(self) -> None:
        self._decided.set()
        self._large.close()

    def large_files(self) -> Iterator[ChunkFeed]:
        """Each changed large file as the scan starts reading it, until the scan is done."""
        return self._large.follow()

    def wait_changed(self) -> bool:
        """Wait for the first read or the end of the scan; True if files were being read."""
        self._decided.wait()
        return self.reading


class Opening:
    """A push's first requests sent early, while the master still reloads and scans, so
    the waits overlap (fleet.publish): ``browse``, then, once the scan is reading
    changed files (the set differs, so a diff will be needed), ``manifest``. push()
    takes it over; one never taken must be closed.

    With ``mine`` (this master's identity), a changed large file also goes ahead as a
    streamed delta against its previous content while the scan reads it, so the
    secondary rebuilds it while the master hashes instead of after (app/core/delta.py);
    push() counts what arrived and sends only the rest. The scan's reload and checks
    of catalogs.xml have passed by then; if the publish still stops (an unsafe path),
    such a blob waits unused in the secondary's blob store until its next commit.
    """

    def __init__(self, secondary: Secondary, settings: Settings, news: ScanNews,
                 mine: dict[str, Any] | None = None) -> None:
        self.client = SecondaryClient(secondary, settings)
        self.news = news
        self.closed = False
        self.browsed: cf.Future[dict[str, Any]] = cf.Future()
        self._manifest: cf.Future[tuple[dict[str, Any], Manifest] | None] = cf.Future()
        self._ahead: dict[str, int] = {}  # sha256 → bytes sent, of large files sent during the scan
        self._ahead_thread: threading.Thread | None = None
        self._failed: RemoteError | None = None  # the manifest fetch ahead found it unreachable
        # daemon threads: a publish that stops early (invalid set, failed reload) must not
        # wait at exit for a slow secondary's answer it no longer needs
        threading.Thread(target=self._run, name=f"open {secondary.name}", daemon=True).start()
        if mine is not None and self.client.signer is None:  # (a stream has no digest to sign)
            self._ahead_thread = threading.Thread(target=self._send_ahead, name=f"ahead {secondary.name}",
                                                  args=(secondary, settings, mine), daemon=True)
            self._ahead_thread.start()

    def _send_ahead(self, secondary: Secondary, settings: Settings, mine: dict[str, Any]) -> None:
        client = None
        try:
            for feed in self.news.large_files():
                if self.closed:
                    return
                try:
                    check_peer(secondary, self.browsed.result(), mine)
                except Exception:  # unreachable or refused: push() reports it
                    return
                client = client or SecondaryClient(secondary, settings)
                try:
                    sent = _stream_delta(client, feed, lambda: self.closed)
                except Exception:  # a head start only: push() sends whatever did not arrive
                    continue
                if sent is not None:
                    self._ahead[sent[0]] = sent[1]
        finally:
            if client is not None:
                client.close()

    def sent_ahead(self) -> dict[str, int]:
        """sha256 → bytes of the large files the secondary received during the scan."""
        if self._ahead_thread is not None:
            self._ahead_thread.join()
        return dict(self._ahead)

    def _run(self) -> None:
        manifest = None
        try:
            try:
                self.browsed.set_result(self.client.browse(recorded=True))
            except BaseException as exc:  # handed to push(), which reports it
                self.browsed.set_exception(exc)
                return
            if self.news.wait_changed() and not self.closed:
                try:
                    manifest = self.client.manifest()
                except RemoteError as exc:
                    if exc.details.get("kind") == "unreachable":  # it went silent: asking
                        self._failed = exc  # again would wait as long a second time
                except Exception:  # a fetch ahead of need: push() asks again and reports
                    pass
        finally:
            self._manifest.set_result(manifest)

    def manifest(self) -> tuple[dict[str, Any], Manifest] | None:
        """The secondary's manifest (as sent, and parsed) if it was fetched ahead; waits
        until the opening is done with the connection. Raises what stopped the fetch when
        the secondary went silent or unreachable."""
        manifest = self._manifest.result()
        if self._failed is not None:
            raise self._failed
        return manifest

    def close(self) -> None:
        self.closed = True
        self.client.close()


class Refused(MirrorError):
    """The secondary may not take this master's set (version, platform, owner)."""


def twin_refusal(name: str, twin: str, receiver: str) -> str:
    return (f"{name} is the receiver {twin} is (the same id, {receiver}): one server listed under "
            f"two names in Mirrors (list each server once, by one name), or a server whose var/data "
            f"was copied from the other's, .esmirror/ included (delete var/data/.esmirror/self-id "
            "on the copy, a new id is made, and restart its receiver)")


class Reached:
    """The Mirrors name that reached each receiver (by its id) first in one publish: one
    server listed under two names (an alias, its address) is a twin. (A look at the fleet
    decides by Mirrors order instead: status._record_twins.)"""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}
        self._lock = threading.Lock()

    def check(self, secondary: Secondary, info: dict[str, Any]) -> None:
        """Refused when another name reached this receiver first: pushed to twice, the two
        pushes would wait on each other's commit lock."""
        receiver = info.get("self")
        if not isinstance(receiver, str):
            return
        with self._lock:
            twin = self._first.setdefault(receiver, secondary.name)
        if twin != secondary.name:
            raise Refused(twin_refusal(secondary.name, twin, receiver))


def check_peer(secondary: Secondary, info: dict[str, Any], mine: dict[str, Any]) -> None:
    """The browse check: same protocol, Express Server version and platform, not owned by
    another master."""
    if info.get("protocol") is None:
        raise Refused(f"{secondary.name} answered GET browse, but not as an esmirror receiver (its "
                      "answer has no protocol); is esmirror mounted at this port and prefix?")
    if info.get("protocol") != PROTOCOL:
        raise Refused(f"{secondary.name} speaks esmirror protocol {info.get('protocol')!r} but this "
                      f"master speaks {PROTOCOL}; install the same esmirror version on both")
    for key, label in (("express_version", "Express Server version"), ("platform", "platform")):
        if info.get(key) != mine[key]:
            raise Refused(f"{secondary.name} runs {label} {info.get(key)!r} but this master runs "
                          f"{mine[key]!r}; all servers must match")
    if info.get("self") == mine["self"]:
        if info.get("role") == "master":
            raise Refused(f"{secondary.name} is this master itself (a Mirrors entry, or another "
                          "name for it, that leads back here): take it out of Mirrors")
        raise Refused(f"{secondary.name} has this master's own id ({mine['self']}): its var/data was "
                      "copied from this master, .esmirror/ included. Delete var/data/.esmirror/"
                      f"self-id on {secondary.host} (a new id is made), restart its receiver, "
                      "and publish again")
    if info.get("role") == "master":
        warnings = info.get("warnings")
        broken = [w for w in warnings if isinstance(w, str) and "does not parse" in w
                  and "counts as a master" in w] if isinstance(warnings, list) else []
        if broken:
            raise Refused(f"{secondary.name} takes no pushes: {one_line(broken[0], 400)}")
        raise Refused(f"{secondary.name} is a master itself (its iserv-cfg.xml lists Mirrors) and "
                      "takes no pushes: if it was promoted while this master was down, take it out "
                      "of this master's Mirrors; if not, remove the Mirrors there")
    owner = info.get("master")
    if owner and owner != mine["self"]:
        # (before allow_push: on a master that was replaced, that advice would undo the failover)
        raise Refused(f"{secondary.name} is mirrored from another master ({owner}); this master is "
                      f"{mine['self']}. If this master was replaced (a secondary promoted while it "
                      "was down), retire it and change nothing there; if the other master was "
                      f"retired, run 'esmirror release' on {secondary.host}; if neither, take it "
                      "out of this master's Mirrors")
    if info.get("caller_may_push") is False:  # (a receiver before it does not say)
        raise Refused(f"{secondary.name} does not let this master push: its allow_push does not name "
                      f"the address it sees this master at ({info.get('caller')}), though its "
                      "allow_admin does. Add it to allow_push in ImageServer/etc/esmirror.ini there, "
                      "render its web server files again and restart its receiver")


def push(secondary: Secondary, settings: Settings, local: LocalSet, mine: dict[str, Any],
         full: bool = False, dry_run: bool = False,
         progress: Callable[[int], None] | None = None,
         result: PushResult | None = None, opening: Opening | None = None,
         interrupt: Interrupt | None = None) -> PushResult:
    """Bring one secondary to exactly ``local``; never raises, the result says what happened.

    ``result``, when given, is filled as the push goes (a watcher reads files_sent live);
    ``opening``, when given, has browsed the secondary already; ``interrupt``, when
    fired, stops the push (state ``interrupted``).
    """
    result = result or PushResult(secondary.host, secondary.port)
    client = None
    try:
        fetched = None
        if opening is not None:
            client = opening.client
            info = opening.browsed.result()
            fetched = opening.manifest()
        else:
            client = SecondaryClient(secondary, settings, interrupt)
            info = client.browse(recorded=True)
        check_peer(secondary, info, mine)
        local.reached.check(secondary, info)
        want = local.manifest
        if info.get("digest") == want.digest and not full and not dry_run:
            # it holds exactly this set (the digest covers every path, hash and size; the one
            # its last commit recorded: the commit answers 409 if the set drifted since): no
            # need to fetch and diff its manifest; the commit still records the generation
            remote, there = {"digest": want.digest}, want
        else:
            remote, there = fetched if fetched is not None else client.manifest()
        check_nothing_hidden(secondary, there, want, local.skipped)
        # its files' contents, and the blobs a push cut short left there (not with --full)
        uploaded = set() if full else set(remote.get("uploaded") or [])
        have = set() if full else there.hashes() | uploaded
        if opening is not None and not full and not dry_run:
            wanted, live = want.hashes(), there.hashes()
            for sha, size in opening.sent_ahead().items():
                # (not `have`: a manifest listed after the stream landed names its file as uploaded)
                if sha in wanted and sha not in live:
                    have.add(sha)
                    result.files_sent += 1
                    result.files_ahead += 1
                    result.bytes_sent += size
        if dry_run:
            todo = _to_send(want, have)
            result.files_sent = len(todo)
            result.bytes_sent = sum(want.files[p].size for p in todo.values())
            result.state = "dry-run"
            return result
        base = remote["digest"]
        if base != want.digest or full:  # (a commit of the set held there sends no list)
            check_list_fits(secondary, info, local)
        check_room_there(secondary, info, there, want, _to_send(want, have), uploaded)
        answer = _send_and_commit(client, local, info, remote, have, full, result, progress)
        if answer["digest"] != want.digest:
            raise RemoteError(f"{secondary.name} answered the commit with set {answer['digest'][:12]}… "
                              f"but was sent {want.digest[:12]}…; see what it holds with 'esmirror "
                              f"browse {secondary.name}' and publish again", kind="bad-answer")
        result.state = "in-sync"
        result.generation = answer.get("generation")
        result.digest = answer.get("digest")
        result.archive_id = answer.get("archive_id")
        result.warnings = list(answer.get("warnings") or [])
    except Refused as exc:
        result.state, result.error, result.refused_by_look = "refused", exc.message, True
        result.reason = "refused"
    except Interrupted as exc:
        result.state, result.error, result.reason = "interrupted", exc.message, "interrupted"
    except RemoteError as exc:
        _failed_there(result, exc, local)
    except MirrorError as exc:  # found here: this master's settings, or what the secondary's look says
        result.error = exc.message
        result.reason = "no-room" if isinstance(exc, NoRoom) else "too-large" if isinstance(exc, TooLarge) \
            else "master"
    except ChangedWhileSent as exc:  # (failed: the secondary and the network are fine)
        result.error, result.reason = f"sending to {secondary.name} stopped: {exc}", "master"
    except OSError as exc:
        result.error = f"reading {exc.filename or 'a file'} on this master failed: {exc.strerror}"
        result.reason = "master"
    except Exception as exc:  # a bug meeting an answer nobody foresaw: fail this secondary, not all
        result.error, result.reason = unforeseen(secondary, "push", exc), "unforeseen"
    finally:
        if client is not None:
            client.close()
        result.ended = now_iso()
    return result


def _send_and_commit(client: SecondaryClient, local: LocalSet, info: dict[str, Any],
                     remote: dict[str, Any], have: set[str], full: bool, result: PushResult,
                     progress: Callable[[int], None] | None) -> dict[str, Any]:
    """Upload what the secondary lacks of ``have``, then commit; the commit's answer. A 409
    that names blobs lost on the way (a restarted secondary) or a set that moved since the
    look sends again what is then missing, up to COMMIT_TRIES commits."""
    want, base = local.manifest, remote["digest"]
    part_size = min(MAX_PART, int(info.get("max_upload_bytes") or MAX_PART))
    for attempt in range(COMMIT_TRIES):
        todo = _to_send(want, have)
        _upload(client, local, todo, part_size, result, progress,
                [] if full else remote.get("files", []), file_part_size(info),
                {} if full else remote.get("partial") or {})
        have |= set(todo)
        try:
            return _commit(client, local, base, full)
        except RemoteError as exc:
            body = exc.details.get("body") or {}
            if exc.http_status != 409 or attempt == COMMIT_TRIES - 1:
                raise
            if "missing" in body:  # blobs lost on the way (a restarted secondary, say)
                have -= set(body["missing"])
            elif "digest" in body:  # its set moved since we looked: diff again
                remote, there = client.manifest()
                base = remote["digest"]
                have = there.hashes() if not full else have
            else:
                raise
    raise AssertionError("unreachable: the last try returns or raises")


# a failed push's ``reason``, for monitoring; the error says the same to a person
REASONS = ("unreachable", "tls", "refused", "conflict", "bad-request", "too-large", "invalid-set",
           "reload-failed", "unavailable", "no-room", "server-error", "bad-answer", "interrupted",
           "skipped", "master", "unforeseen")
# the receiver's statuses (app/core/errors.py); 401, 403 and a 409 naming another master: refused
_BY_STATUS = {400: "bad-request", 409: "conflict", 411: "bad-request", 413: "too-large",
              422: "invalid-set", 503: "unavailable", 507: "no-room"}


def _reason(exc: RemoteError) -> str:
    body = exc.details.get("body") or {}
    status = exc.http_status
    if exc.details.get("kind"):  # unreachable, tls, bad-answer: no esmirror answer to go by
        return str(exc.details["kind"])
    if status in (401, 403) or (status == 409 and "master" in body):
        return "refused"
    if status == 502 and "output" in body:  # (a proxy's 502 has no reload output)
        return "reload-failed"
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return "bad-request" if status is not None and status < 500 else "server-error"


def _failed_there(result: PushResult, exc: RemoteError, local: LocalSet) -> None:
    """A secondary's refusal or failure in ``result``: the state it puts the secondary in,
    and the error with what the answer adds (the file a refused blob came from, the
    receiver's reasons, a generation counter behind that server's)."""
    result.reason = _reason(exc)
    if result.reason in ("unreachable", "tls"):  # (status counts a TLS failure as a refusal)
        result.state = "unreachable"
    elif result.reason == "refused":
        result.state = "refused"
    result.error = exc.message
    body = exc.details.get("body") or {}
    changed = local.distrust(body["mismatch"]) if exc.http_status == 400 and \
        isinstance(body.get("mismatch"), str) else []
    if changed:
        result.error += (f"; on this master {changed[0]} no longer holds what the scan read: it "
                         "changed while being sent, or was written without its modification "
                         "time moving (through a memory map). The next publish reads it again")
    if body.get("reasons"):
        result.error += "\n  " + "\n  ".join(body["reasons"])
    held = body.get("generation")
    if exc.http_status == 409 and isinstance(held, int) and not isinstance(held, bool) \
            and held >= local.generation:  # (fleet._record moves this master's counter on)
        result.generation = held
        result.error += (f"; this master's generation counter is behind that server's ({held}): "
                         "was its var/data restored from a backup? The next publish continues "
                         f"from {held + 1}")


def file_part_size(info: dict[str, Any]) -> int:
    """The largest part a whole file is sent in: what the secondary takes in one body, or
    less when its server writes each body to disk before storing it (``part_bytes``: on
    one disk, the upload then needs its size twice over; a part's twice is little)."""
    return min(MAX_PART, int(info.get("max_upload_bytes") or MAX_PART),
               int(info.get("part_bytes") or MAX_PART))


def _commit(client: SecondaryClient, local: LocalSet, base: str, full: bool) -> dict[str, Any]:
    """``POST commit``. A secondary that already holds the set (a no-op publish) is told
    so, not sent the whole list again (~250 KB of JSON for 2,000 files, parsed and checked
    there); a receiver too old to know ``unchanged`` (400) gets the list."""
    body: dict[str, Any] = {"generation": local.generation, "master": local.master, "base": base}
    if base == local.manifest.digest and not full:
        try:
            return client.commit({**body, "unchanged": True})
        except RemoteError as exc:
            if exc.http_status != 400:
                raise
    return client.commit(body, files=local.list_json)


def check_nothing_hidden(secondary: Secondary, there: Manifest, want: Manifest,
                         skipped: tuple[str, ...]) -> None:
    """Refuse before sending a byte to remove a secondary's files that stand, on this
    master, behind an entry the set skips: a folder moved elsewhere and symlinked back
    would otherwise empty that folder on every secondary ('all in sync')."""
    if not skipped:
        return
    hidden: dict[str, int] = {}
    for path in there.files:
        if path in want.files:
            continue
        for entry in skipped:
            if path == entry or path.startswith(entry + "/"):
                hidden[entry] = hidden.get(entry, 0) + 1
                break
    if hidden:
        which = ", ".join(f"{entry} ({count} file{'s' if count > 1 else ''})"
                          for entry, count in sorted(hidden.items())[:5])
        raise MirrorError(f"{secondary.name} holds files that this master's set leaves out because "
                          f"they are behind a symlink (or another entry that is not a regular file) "
                          f"here: {which}. Publishing would remove them there; nothing was sent. Make "
                          "each a real folder or file on this master, or publish with --force to "
                          "remove them from the secondaries (they go to each one's archive)")


def check_list_fits(secondary: Secondary, info: dict[str, Any], local: LocalSet) -> None:
    """Refuse before sending a byte when the commit's file list is over what the secondary
    takes in one body (its 413 after every upload, publish after publish)."""
    taken = info.get("max_upload_bytes")
    if not isinstance(taken, int):
        return
    limit, setting = commit_limit(taken)
    size = len(local.list_json)
    if size + 4096 > limit:  # (4 KiB: the commit's other fields)
        raise TooLarge(f"{secondary.name} cannot take this set's commit: its file list "
                          f"({len(local.manifest.files)} files) is {size} bytes of JSON, over "
                          f"its limit of {limit} bytes ({setting}); nothing was sent. Raise "
                          f"max_upload_bytes in esmirror.ini on {secondary.host}, or publish fewer files")


def check_room_there(secondary: Secondary, info: dict[str, Any], there: Manifest,
                     want: Manifest, todo: dict[str, str], uploaded: set[str]) -> None:
    """Refuse before sending a byte when the push cannot fit on the secondary's disk (its 507)."""
    free, reserve = info.get("free_bytes"), info.get("reserve_bytes") or 0
    if not isinstance(free, int) or not isinstance(reserve, int):
        return  # a receiver that does not say: it still answers 507 itself
    sizes = {sha: want.files[path].size for sha, path in todo.items()}
    need = room_needed(there, want, sizes, uploaded)
    spooled = ""
    part = info.get("part_bytes")
    if isinstance(part, int) and sizes:
        # waitress writes each body to disk before the receiver stores it: the uploads in
        # flight at once (a part, at most, each; small files go in batches) at the peak
        bodies = [min(part, size) for size in sizes.values() if size > SMALL_FILE]
        small = sum(size for size in sizes.values() if size <= SMALL_FILE)
        if small:
            bodies += [min(small, BATCH_BYTES, part)] * min(UPLOAD_THREADS, -(-small // BATCH_BYTES))
        extra = sum(sorted(bodies, reverse=True)[:UPLOAD_THREADS])
        need += extra
        spooled = (f", of which {extra} for the copies its server (waitress) writes of the uploads "
                   "in flight before storing them")
    if need + reserve > free:
        raise NoRoom(f"{secondary.name} has no room for this set: applying it needs {need} bytes"
                     f"{spooled} but only {free} are free there ({reserve} kept in reserve); nothing "
                     f"was sent. {_make_room(secondary, info, need + reserve - free)}",
                     needed=need, free=free)
    inodes = info.get("free_inodes")
    if isinstance(inodes, int):
        # each file added or changed becomes a new file there (an upload, or a copy)
        change = diff(there, want)
        files = len(change.added) + len(change.changed)
        if files + INODE_RESERVE > inodes:
            raise NoRoom(f"{secondary.name} has no room for this set: it brings {files} new files but "
                         f"the filesystem there has only {inodes} inodes free (one per file; df -i "
                         f"shows them; {INODE_RESERVE} kept in reserve); nothing was sent. Free some on "
                         f"{secondary.host} (esmirror archive clear, if its archive holds files) and "
                         "publish again", needed=files, free=inodes)


def _make_room(secondary: Secondary, info: dict[str, Any], short: int) -> str:
    """What frees the space: the archive, when it holds enough (browse says how much);
    otherwise the disk itself (an empty archive sent the admin to a command that freed 0)."""
    archived = info.get("archive_bytes")
    if isinstance(archived, int) and archived < short:
        if not archived:
            return (f"Its archive is empty: free {short} bytes on {secondary.host}'s disk another way, "
                    "or grow it, and publish again")
        return (f"'esmirror archive clear' there frees {archived} bytes (its archive); free "
                f"{short - archived} more on {secondary.host}'s disk another way, or grow it, and "
                "publish again")
    return f"Free some space on {secondary.host} (esmirror archive clear) and publish again"


def _to_send(want: Manifest, have: set[str]) -> dict[str, str]:
    """sha256 → one local path holding it, for content the secondary lacks."""
    todo: dict[str, str] = {}
    for path, entry in want.files.items():
        if entry.sha256 not in have and entry.sha256 not in todo:
            todo[entry.sha256] = path
    return todo


def _send_delta(client: SecondaryClient, local: LocalSet, sha: str, size: int, rel: str,
                remote_files: list[dict[str, Any]], part_size: int) -> int | None:
    """Send one large file as a delta (app/core/delta.py); the bytes sent, or None to send
    it whole (no usable base there, too little in common, or the secondary could not
    rebuild it)."""
    bases: list[delta.Base] = []
    for candidate in delta.pick_bases(rel, size, remote_files):
        try:
            answer = client.chunks(candidate["sha256"], candidate["path"])
        except RemoteError as exc:
            if exc.http_status in (404, 405):  # gone there, or a receiver without deltas
                continue
            raise
        listing, chunk_size = answer.get("chunks"), answer.get("chunk_size")
        if not isinstance(listing, list) or chunk_size != delta.CHUNK_SIZE:
            continue  # (chunked another way: the master would hash the file that way too)
        bases.append(delta.Base(candidate["sha256"], candidate["path"], tuple(map(str, listing)),
                                chunk_size))
    if not bases:
        return None
    path = local.path(rel)
    ops = delta.plan(path, size, bases, local.chunks(rel, sha, bases[0].chunk_size))
    length = delta.body_length(size, bases, ops)
    if delta.literal_bytes(ops) > size * 0.9 or length > part_size:
        return None
    try:
        client.post_delta(sha, Body(length, delta.body_blocks(path, size, bases, ops)))
    except RemoteError as exc:
        if exc.http_status in (400, 404, 405, 409):  # e.g. its copy changed: send the whole file
            if exc.http_status == 400:  # the rebuilt file did not hash to its name
                local.distrust_chunks(rel, sha)
            return None
        raise
    return length


def _stream_delta(client: SecondaryClient, feed: ChunkFeed,
                  stop: Callable[[], bool]) -> tuple[str, int] | None:
    """Send a changed large file as a delta against its previous content while the scan
    reads it; (sha256, bytes sent) once the secondary holds it, None when it has no
    such base or cannot take a stream (an older receiver, a web server that refuses
    chunked bodies): push() then sends it the ordinary way."""
    try:
        answer = client.chunks(feed.previous_sha, feed.rel)
    except RemoteError:
        return None
    listing, chunk_size = answer.get("chunks"), answer.get("chunk_size")
    if not isinstance(listing, list) or chunk_size != feed.chunk_size:
        return None
    base = delta.Base(feed.previous_sha, feed.rel, tuple(map(str, listing)), chunk_size)
    digests = delta.first_difference(feed, base)
    if digests is None:  # rewritten with the same bytes: nothing to send
        return None
    sent = 0

    def counted() -> Iterator[bytes]:
        nonlocal sent
        for block in delta.stream_blocks(feed, base, digests, stop):
            sent += len(block)
            yield block

    try:
        answer = client.post_delta_stream(counted(), feed.size)
    except RemoteError:
        return None
    if feed.sha is None or answer.get("sha256") != feed.sha:
        return None
    return feed.sha, sent


def _upload(client: SecondaryClient, local: LocalSet, todo: dict[str, str], part_size: int,
            result: PushResult, progress: Callable[[int], None] | None,
            remote_files: list[dict[str, Any]] | None = None, file_part: int | None = None,
            partial: dict[str, int] | None = None) -> None:
    """Small files in batches, large ones streamed one by one (as a delta against the
    secondary's older copy when it has one); a few requests at a time."""
    batch_limit = min(BATCH_BYTES, part_size)  # no body may exceed what the secondary accepts
    smalls, larges = [], []
    for sha, path in sorted(todo.items(), key=lambda kv: kv[1]):
        size = local.manifest.files[path].size
        small = size <= SMALL_FILE and size + FRAME_HEADER <= batch_limit
        if small:
            smalls.append((sha, local.path(path), size))
        else:
            larges.append((sha, local.path(path), size, path))
    batches: list[list[tuple[str, Path, int]]] = []
    current: list[tuple[str, Path, int]] = []
    current_bytes = 0
    for item in smalls:
        cost = item[2] + FRAME_HEADER
        if current and (current_bytes + cost > batch_limit or len(current) >= BATCH_FILES):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += cost
    if current:
        batches.append(current)

    counting = threading.Lock()

    def moved(count: int) -> None:
        """Bytes on their way (upload threads call it): the bars move within a large file."""
        with counting:
            result.bytes_sent += count
            if progress:
                progress(count)

    def naming_files(exc: RemoteError) -> RemoteError:
        """A secondary's 400 over a blob names its hash: say which file of this master it is
        (the usual cause is a file written to while it was sent)."""
        if exc.http_status != 400:
            return exc
        named = sorted(rel for sha, rel in todo.items() if sha[:12] in exc.message)
        if not named:
            return exc
        return RemoteError(f"{exc.message} (on this master: {', '.join(named[:5])}"
                           f"{' …' if len(named) > 5 else ''}; if it was being written, publish "
                           "again once it is written)", status=exc.http_status, **exc.details)

    def send_batch(batch: list[tuple[str, Path, int]]) -> tuple[int, int]:
        try:
            client.post_blobs(batch)
        except RemoteError as exc:
            raise naming_files(exc) from None
        return len(batch), sum(i[2] for i in batch)

    def send_large(item: tuple[str, Path, int, str]) -> tuple[int, int]:
        sha, path, size, rel = item
        if remote_files and size >= delta.DELTA_MIN:
            sent = _send_delta(client, local, sha, size, rel, remote_files, part_size)
            if sent is not None:
                return 1, sent
        try:
            client.put_blob(sha, path, size, file_part or part_size, moved, (partial or {}).get(sha, 0))
        except RemoteError as exc:
            raise naming_files(exc) from None
        return 1, 0  # (its bytes were counted as they went)

    # Batches first: each is one thread creating its files one by one on the secondary
    # (CPU and metadata), while large files are bandwidth and disk writes that overlap
    # them and fill the slots that free up. Large files first had the batches queue behind
    # them and end the push alone: fan-out to 3, 8 rounds alternating, faster in all 8.
    jobs = [(send_batch, b) for b in batches] + [(send_large, item) for item in larges]
    with cf.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        futures = [pool.submit(fn, arg) for fn, arg in jobs]
        try:
            for future in cf.as_completed(futures):
                files, size = future.result()
                result.files_sent += files
                moved(size)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
