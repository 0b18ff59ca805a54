"""Publish on the master: validate, reload, scan, then push to the secondaries.

Rollout controls (canary first, bounded parallelism, stop on the first
failure) and the master's records of every publish (ledger, audit log,
history) live here, so ``esmirror publish`` and the agent behave the same.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import filelock

from app.core.apply import reload_failure, run_reload
from app.core.audit import audit, now_iso
from app.core.catalogs import CATALOGS_XML, validate_catalogs_file
from app.core.delta import CHUNK_SIZE, DELTA_MIN, ChunkIndex
from app.core.errors import InvalidSet, MirrorError
from app.core.express import Secondary, express_version, platform_tag
from app.core.ledger import Ledger, lags, master_record, master_record_path
from app.core.manifest import HASH_CACHE_FILE, ChunkFeed, HashCache, scan
from app.core.publishes import PublishQueue, publish_lock, publishing
from app.core.settings import DEFAULT_MAX_PARALLEL, Settings
from app.core.signing import Signer
from app.core.state import pid_alive, self_id, write_json

from .client import Interrupt, tls_context
from .push import LocalSet, Opening, PushResult, ScanNews, push

__all__ = ["PublishFailed", "PublishReport", "Observer", "master_identity", "publish", "catch_up",
           "publish_lock", "publish_waiting"]

# (not caught up by the agent: a person who stops a rollout, a canary's say, wants it stopped)
INTERRUPTED = ("the publish was stopped on this master (Ctrl-C, SIGTERM) before this secondary "
               "confirmed it; publish again to bring it here")
WAITING_PULSE = 2.0  # how often a publish waiting for the lock renews its marker (seconds)
BROWSES_AWAITED = 5.0  # seconds a publish waits for its first browses before numbering itself


class PublishFailed(MirrorError):
    """The master's own set or reload stops the publish before anything is sent (exit 1)."""


@dataclass
class PublishReport:
    generation: int
    digest: str
    files: int
    bytes: int
    secondaries: list[PushResult]
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False  # then ``generation`` is the one a publish would take

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.secondaries)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "dry_run": self.dry_run, "generation": self.generation, "digest": self.digest,
                "files": self.files, "bytes": self.bytes, "warnings": self.warnings,
                "secondaries": [r.to_json() for r in self.secondaries]}


class Observer:
    """What a publish tells whoever watches it (progress bars, the agent's request record)."""

    def begin(self) -> None:
        """The publish lock is held: the publish really starts now."""

    def waiting(self, why: str) -> None:
        """The publish cannot start yet (``why``), and waits."""

    def start(self, secondary: Secondary) -> None: ...

    def progress(self, secondary: Secondary, sent: int, files_sent: int = 0) -> None:
        """``sent`` more bytes arrived; ``files_sent`` files so far on this secondary."""

    def done(self, secondary: Secondary, result: PushResult) -> None: ...


class _AlsoProgress(Observer):
    """An observer plus the plain ``progress(secondary, bytes)`` callback publish() always took."""

    def __init__(self, inner: Observer, progress: Callable[[Secondary, int], None]) -> None:
        self.inner, self.callback = inner, progress

    def begin(self) -> None:
        self.inner.begin()

    def waiting(self, why: str) -> None:
        self.inner.waiting(why)

    def start(self, secondary: Secondary) -> None:
        self.inner.start(secondary)

    def progress(self, secondary: Secondary, sent: int, files_sent: int = 0) -> None:
        self.callback(secondary, sent)
        self.inner.progress(secondary, sent, files_sent)

    def done(self, secondary: Secondary, result: PushResult) -> None:
        self.inner.done(secondary, result)


def master_identity(settings: Settings) -> dict[str, Any]:
    return {"express_version": express_version(settings), "platform": platform_tag(),
            "self": self_id(settings.state_dir)}


@contextlib.contextmanager
def holding_publish_lock(settings: Settings, timeout: float, observer: Observer) -> Iterator[None]:
    """The publish lock; a publish that has to wait for it says so instead of waiting in
    silence, and one that waits without limit (a person's) asks the agent's catch-up to
    step aside (``publish_waiting``)."""
    lock = publish_lock(settings, timeout)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if timeout == 0:
            raise
        observer.waiting("another publish holds this master's publish lock (another 'esmirror "
                         "publish', or the agent's; a catch-up of the agent's steps aside within "
                         "seconds); waiting for it to end")
        if timeout > 0:
            lock.acquire()
        else:
            _wait_asking(settings, lock)
    try:
        yield
    finally:
        lock.release()


def _wait_asking(settings: Settings, lock: filelock.BaseFileLock) -> None:
    """Wait for the lock, keeping a marker fresh meanwhile: the agent, seeing it, stops a
    catch-up that holds the lock (a slow secondary's could hold it for many minutes)."""
    marker = settings.state_dir / f"publish-waiting.{os.getpid()}"
    try:
        while True:
            with contextlib.suppress(OSError):  # (a full disk: the wait may only be longer)
                marker.touch()
            try:
                lock.acquire(timeout=WAITING_PULSE)
                return
            except filelock.Timeout:
                continue
    finally:
        with contextlib.suppress(OSError):
            marker.unlink(missing_ok=True)


def publish_waiting(settings: Settings) -> bool:
    """Whether a publish waits for the publish lock: its marker was renewed lately. Markers
    left by a publish that was killed while it waited are removed (at once where its pid
    can be checked: one dated ahead by a clock set back would stop every catch-up)."""
    now = time.time()
    waiting = False
    for marker in settings.state_dir.glob("publish-waiting.*"):
        try:
            pid = marker.name.rpartition(".")[2]
            if pid.isdigit() and not pid_alive(int(pid)):
                marker.unlink()
                continue
            age = now - marker.stat().st_mtime
            if age < 3 * WAITING_PULSE:
                waiting = True
            elif age > 60 * WAITING_PULSE:
                marker.unlink()
        except OSError:
            continue
    return waiting


def master_hash_cache(settings: Settings,
                      on_read: Callable[[ChunkFeed | None], object] | None = None) -> HashCache:
    """The master's hash cache; large files it must read get their delta chunk hashes too
    (kept by content, so the next change of a file hashes only its changed chunks)."""
    return HashCache(settings.state_dir / HASH_CACHE_FILE, chunked=(DELTA_MIN, CHUNK_SIZE),
                     on_read=on_read, chunk_index=ChunkIndex(settings.state_dir))


def _skipped(secondary: Secondary, why: str) -> PushResult:
    return PushResult(secondary.host, secondary.port, state="skipped", error=why, reason="skipped")


def fan_out(secondaries: list[Secondary], one: Callable[[Secondary], PushResult],
            canary: Secondary | None = None, max_parallel: int | None = None,
            stop_on_failure: bool = False, observer: Observer | None = None,
            results: dict[Secondary, PushResult] | None = None) -> list[PushResult]:
    """Push to each secondary, canary first, at most ``max_parallel`` at once; results in order.

    A push never raises (its result says what happened), so one secondary's
    failure never stops the others unless ``stop_on_failure`` asks for it.
    ``results`` is filled as each push ends: what an interrupted fan-out had done.
    """
    observer = observer or Observer()
    results = {} if results is None else results
    stop = threading.Event()
    why_stop: list[str] = []

    def run(secondary: Secondary) -> PushResult:
        if stop.is_set():
            result = _skipped(secondary, why_stop[0])
        else:
            observer.start(secondary)
            result = one(secondary)
            if not result.ok and stop_on_failure and not stop.is_set():
                why_stop.append(f"not pushed: {secondary.name} failed first and stop-on-failure is set")
                stop.set()
        results[secondary] = result
        observer.done(secondary, result)
        return result

    rest = list(secondaries)
    if canary is not None and canary in rest:
        rest.remove(canary)
        results[canary] = first = run(canary)
        if not first.ok:
            for secondary in rest:
                results[secondary] = _skipped(secondary, f"not pushed: the canary {canary.name} failed")
                observer.done(secondary, results[secondary])
            rest = []
    if rest:
        workers = max(1, min(len(rest), max_parallel or DEFAULT_MAX_PARALLEL))
        pool = cf.ThreadPoolExecutor(workers)
        finished = False
        try:
            for secondary, result in zip(rest, pool.map(run, rest)):
                results[secondary] = result
            finished = True
        finally:
            # an interrupt (Ctrl-C) does not wait for the pushes in flight: a secondary
            # applies a set whole or not at all, so stopping them leaves none half-applied
            pool.shutdown(wait=finished, cancel_futures=True)
    return [results[s] for s in secondaries]


def _record(settings: Settings, results: list[PushResult], generation: int, digest: str,
            caller: str | None, master: str, why: str) -> None:
    """Ledger and audit log for every secondary actually pushed to. A catch-up that ends
    as the try before it did (same state, same error) is not logged again (a secondary
    down for weeks, retried every few minutes, would push everything else out of the
    log): the ledger counts the tries, and the line of the next change says how many."""
    ledger = Ledger(settings)
    for result in results:
        if result.state in ("skipped", "dry-run", "interrupted"):
            continue
        before, tries = ledger.record_push(Secondary(result.host, result.port), result.to_json(),
                                           generation, digest)
        if not result.ok and (result.generation or 0) >= generation:  # (push: a 409 for an older one)
            counter = master_record(settings)
            # (the next publish numbers itself after it; what was published stays as it was)
            if int(counter.get("generation_floor", 0)) < result.generation:
                write_json(master_record_path(settings),
                           {**counter, "generation_floor": result.generation})
            # a catch-up of this generation would be refused the same way, again and again
            ledger.record_stale(Secondary(result.host, result.port),
                                f"it holds generation {result.generation}, newer than the one this master "
                                "published; the next publish brings it here")
        if why == "catch-up" and not result.ok and before == (result.state, result.error):
            continue  # (the same failure, in the same words: a new cause is logged)
        audit(settings, "push", caller=caller, master=master, generation=generation,
              files=result.files_sent, outcome=result.state, secondary=result.name,
              bytes=result.bytes_sent, why=why, error=result.error,
              **({"reason": result.reason} if result.reason else {}),
              **({"failed_tries": tries} if why == "catch-up" else {}))


def publish(settings: Settings, secondaries: list[Secondary], full: bool = False,
            dry_run: bool = False, force: bool = False,
            progress: Callable[[Secondary, int], None] | None = None, *,
            canary: Secondary | None = None, max_parallel: int | None = None,
            stop_on_failure: bool = False, observer: Observer | None = None,
            caller: str | None = "command line", history: bool = True,
            lock_timeout: float = -1) -> PublishReport:
    """One publish, now. Raises before sending anything when the master's own set is unfit."""
    # configuration errors of the channel (ca-bundle.crt, shared_secret_file) stop the
    # publish before anything is sent to any secondary
    for secondary in secondaries:
        tls_context(secondary, settings)
    Signer.from_settings(settings)
    observer = observer or Observer()
    if progress:
        observer = _AlsoProgress(observer, progress)
    mine = master_identity(settings)
    spent: list[int] = []  # the generation number, once taken
    try:
        # (the marker: status shows the targets as 'publishing'; a dry run pushes nothing)
        marker = contextlib.nullcontext() if dry_run else publishing(settings, [s.name for s in secondaries])
        with holding_publish_lock(settings, lock_timeout, observer), marker:
            observer.begin()
            report = _publish_locked(settings, secondaries, full, dry_run, force, canary,
                                     max_parallel, stop_on_failure, observer, caller, mine, spent)
    except MirrorError as exc:
        if not dry_run:
            audit(settings, "publish", caller=caller, master=mine["self"], generation=None,
                  files=None, outcome="failed", error=exc.message)
        raise
    except KeyboardInterrupt:
        if not dry_run and spent:  # some secondaries may hold that generation: the log says why
            audit(settings, "publish", caller=caller, master=mine["self"], generation=spent[0],
                  files=None, outcome="interrupted", error="stopped on this master (Ctrl-C) while "
                  "it pushed; 'esmirror status' shows what each secondary holds")
        raise
    if not dry_run:
        failed = [r for r in report.secondaries if not r.ok]
        audit(settings, "publish", caller=caller, master=mine["self"], generation=report.generation,
              files=report.files, outcome="ok" if report.ok else f"{len(failed)} of "
              f"{len(report.secondaries)} not in sync")
        if history:
            queue = PublishQueue(settings)
            record = queue.submit({"secondaries": [s.name for s in secondaries], "full": full,
                                   "force": force, "canary": canary.name if canary else None,
                                   "max_parallel": max_parallel, "stop_on_failure": stop_on_failure},
                                  caller, [s.name for s in secondaries], state="done")
            record.update(ok=report.ok, generation=report.generation, digest=report.digest,
                          started=record["created"], finished=now_iso(),
                          secondaries=[_progress_row(r) for r in report.secondaries])
            queue.save(record)
            queue.prune()
    return report


def highest_generation_seen(settings: Settings, master: str, openings: Iterable[Opening] = ()) -> int:
    """The highest generation of this master that its secondaries hold or were sent, as far
    as this master knows: its ledger, and the browses of this publish already answered. A
    master whose var/data was restored from a backup has an older counter than its
    secondaries, which refuse an older generation (409); it continues from theirs."""
    seen = [0]
    for entry in Ledger(settings).read().values():
        observed = entry.get("observed") or {}
        seen += [g for g in (entry.get("wanted_generation"), entry.get("confirmed_generation"))
                 if isinstance(g, int)]
        if observed.get("master") == master and isinstance(observed.get("generation"), int):
            seen.append(observed["generation"])
    openings = list(openings)
    if openings:  # (their answers usually came while this master scanned; a slow one is not waited for)
        cf.wait([o.browsed for o in openings], timeout=BROWSES_AWAITED)
    for opening in openings:
        if opening.browsed.done() and opening.browsed.exception() is None:
            info = opening.browsed.result()
            if info.get("master") == master and isinstance(info.get("generation"), int):
                seen.append(info["generation"])
    return max(seen)


def _progress_row(result: PushResult) -> dict[str, Any]:
    return {"name": result.name, "state": result.state,
            "bytes_sent": result.bytes_sent, "files_sent": result.files_sent, "error": result.error,
            "generation": result.generation, "archive_id": result.archive_id}


def _publish_locked(settings: Settings, secondaries: list[Secondary], full: bool, dry_run: bool,
                    force: bool, canary: Secondary | None, max_parallel: int | None,
                    stop_on_failure: bool, observer: Observer, caller: str | None,
                    mine: dict[str, Any], spent: list[int]) -> PublishReport:
    catalogs = settings.data_dir / CATALOGS_XML
    if not catalogs.is_file():
        what = "is not a file" if catalogs.exists() else "does not exist"
        raise PublishFailed(f"{catalogs} {what}; Express Server reads its catalogs from that "
                            "file, so nothing was sent")
    report = validate_catalogs_file(catalogs)
    if report.problems and not force:
        raise InvalidSet(f"{catalogs} is invalid; nothing was sent", report.problems)
    if settings.require_paths and report.unreadable_paths() and not force:
        raise InvalidSet(f"{catalogs} names catalog Paths this master cannot read "
                         "(require_paths = true); nothing was sent", report.unreadable_paths())
    # the first pushes browse their secondaries now, while this master reloads and scans
    # (reads only: nothing is sent before the set is known good); later ones in turn
    first = [canary] if canary in secondaries else secondaries[:max_parallel or DEFAULT_MAX_PARALLEL]
    news = ScanNews()
    # and, on a real incremental publish, start sending changed large files as they are read
    ahead = None if dry_run or full else mine
    openings = {secondary: Opening(secondary, settings, news, ahead) for secondary in first}
    try:
        if not dry_run:
            ok, output = run_reload(settings)
            if not ok:
                raise PublishFailed(f"reload_command failed on this master; nothing was sent. "
                                    f"{reload_failure(output)}")
        cache = master_hash_cache(settings, news.reading_files)
        if full:  # trust nothing: every file is read (its stat may not have moved: a memory map)
            for rel in list(cache.entries):
                cache.distrust(rel)
        scanned = scan(settings.data_dir, cache, settings.include, settings.exclude)
        news.done()  # openings that saw no file read: the set is likely the same, no manifest
        if scanned.unsafe:
            raise InvalidSet("the master's set has files that cannot be mirrored safely; rename "
                             "or exclude them", scanned.unsafe)
        if CATALOGS_XML not in scanned.manifest.files:  # (checked above, then left out of the set)
            raise PublishFailed(f"{catalogs} is not part of the set: it is a symbolic link, or "
                                "include/exclude in esmirror.ini leave it out, and a secondary refuses "
                                "a set without it. Nothing was sent: make it a regular file, or fix "
                                "include/exclude")
        counter = master_record(settings)
        last = max(int(counter.get("generation", 0)), int(counter.get("generation_floor", 0)),
                   highest_generation_seen(settings, mine["self"], openings.values()))
        generation = last + 1  # (a dry run shows the number it would take, and takes none)
        if not dry_run:
            write_json(master_record_path(settings), {"generation": generation, "published_at": now_iso(),
                                                      "digest": scanned.manifest.digest})
            spent.append(generation)
        local = LocalSet(scanned.manifest, settings.data_dir, generation, mine["self"],
                         scanned.chunk_lists, cache.chunk_index,
                         skipped=() if force else tuple(scanned.skipped), hash_cache=cache)

        def one(secondary: Secondary) -> PushResult:
            live = PushResult(secondary.host, secondary.port)
            return push(secondary, settings, local, mine, full, dry_run,
                        lambda n: observer.progress(secondary, n, live.files_sent), live,
                        openings.pop(secondary, None))

        ended: dict[Secondary, PushResult] = {}
        try:
            results = fan_out(secondaries, one, canary, max_parallel, stop_on_failure, observer, ended)
        except KeyboardInterrupt:  # (Ctrl-C, SIGTERM): the ledger says which did not get it
            if not dry_run:
                cut = [ended.get(s) or PushResult(s.host, s.port, state="failed", error=INTERRUPTED,
                                                  reason="interrupted")
                       for s in secondaries]
                _record(settings, cut, generation, local.manifest.digest, caller, mine["self"], "publish")
                ledger = Ledger(settings)
                for secondary in secondaries:
                    if secondary not in ended:
                        ledger.record_stale(secondary, INTERRUPTED)
            raise
    finally:
        news.done()  # (a failed reload never scanned: let the openings go)
        for opening in openings.values():  # not taken: the publish stopped, or the canary failed
            opening.close()
    if not dry_run:
        _record(settings, results, generation, local.manifest.digest, caller, mine["self"], "publish")
    return PublishReport(generation, local.manifest.digest, len(local.manifest.files),
                         local.manifest.total_bytes, results,
                         scanned.warnings + report.unreadable_paths(), dry_run)


def catch_up(settings: Settings, secondaries: list[Secondary], max_parallel: int | None = None,
             observer: Observer | None = None, lock_timeout: float = 1.0,
             interrupt: Interrupt | None = None) -> list[PushResult]:
    """Push again, to secondaries that missed it, the set the master last published to them.

    No reload, no new generation: the same set, once more. Only possible while
    the master's set is still that one (same digest); otherwise the secondary
    waits for the next publish, and status says so. Returns [] when another
    publish holds the lock (the caller tries again later). ``interrupt``, fired,
    stops it: those pushes end ``interrupted`` and are not recorded (the secondary
    is still due).
    """
    if not secondaries:
        return []
    mine = master_identity(settings)
    try:
        lock = publish_lock(settings, lock_timeout)
        lock.acquire()
    except filelock.Timeout:
        return []
    try:
        ledger = Ledger(settings)
        entries = ledger.read()
        cache = master_hash_cache(settings)
        scanned = scan(settings.data_dir, cache, settings.include, settings.exclude)
        digest = scanned.manifest.digest
        todo: list[Secondary] = []
        for secondary in secondaries:
            entry = entries.get(secondary.name) or {}
            if not lags(entry, mine["self"]):  # (a publish while this waited for the lock brought it)
                continue
            if entry.get("wanted_digest") == digest and not scanned.unsafe:
                todo.append(secondary)
            else:
                ledger.record_stale(secondary, f"the master's set changed since generation "
                                    f"{entry.get('wanted_generation')} was published; the next "
                                    "publish brings it here")
        if not todo:
            return []
        by_generation: dict[int, list[Secondary]] = {}
        for secondary in todo:
            by_generation.setdefault(int(entries[secondary.name]["wanted_generation"]), []).append(secondary)
        results: list[PushResult] = []
        with publishing(settings, [s.name for s in todo]):  # (status: 'publishing' to them)
            for generation, group in sorted(by_generation.items()):
                if interrupt is not None and interrupt.why:
                    break
                # (never --force: files behind a symlink here stay there until a person says so)
                local = LocalSet(scanned.manifest, settings.data_dir, generation, mine["self"],
                                 scanned.chunk_lists, cache.chunk_index, skipped=tuple(scanned.skipped),
                                 hash_cache=cache)

                def one(secondary: Secondary, local: LocalSet = local) -> PushResult:
                    live = PushResult(secondary.host, secondary.port)
                    return push(secondary, settings, local, mine, False, False,
                                lambda n: (observer.progress(secondary, n, live.files_sent)
                                           if observer else None), live, interrupt=interrupt)

                done = fan_out(group, one, None, max_parallel, False, observer)
                _record(settings, done, generation, digest, "agent", mine["self"], "catch-up")
                results += done
        return results
    finally:
        lock.release()
