"""Publish requests on disk: the durable queue between the web app and the agent.

Each request is one JSON file ``.esmirror/queue/<id>.json`` written atomically
(``state.write_json``). The web app only creates files (state ``queued``);
the agent moves them through ``running`` to ``done`` / ``failed`` /
``superseded``, and records per-secondary progress in the same file. Either
side may restart at any moment: a request is on disk before the 202 is sent,
and a request found ``running`` when an agent starts is run again. Finished
records stay as the publish history (the newest ``HISTORY_KEEP``); publishes
made with ``esmirror publish`` are recorded here too, already finished.
"""
from __future__ import annotations

import calendar
import contextlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import filelock

from .audit import now_iso
from .errors import BadRequest, ConfigError, Conflict, NotFound
from .express import Secondary, read_mirrors, resolve_canary, select_secondaries
from .settings import Settings
from .state import fs_now, pid_alive, read_json, write_json

HISTORY_KEEP = 50
HISTORY_MIN_AGE = 3600.0  # seconds a finished record is kept whatever the count
PENDING = ("queued", "running")


def publish_lock(settings: Settings, timeout: float = -1) -> filelock.BaseFileLock:
    """One publish at a time on this master: ``esmirror publish`` and the agent share it."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(settings.state_dir / "publish.lock", timeout=timeout)


PUBLISHING = "publishing.json"


@contextlib.contextmanager
def publishing(settings: Settings, targets: list[str]) -> Iterator[None]:
    """While a publish (or a catch-up) holding the publish lock pushes: to whom, for status.
    A marker, not a look at the lock: a look would take it for an instant, and a publish
    starting then would wait, and say so."""
    marker = settings.state_dir / PUBLISHING
    with contextlib.suppress(OSError):  # (status only: a full disk must not stop a publish)
        write_json(marker, {"pid": os.getpid(), "secondaries": targets, "started": now_iso()},
                   durable=False)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            marker.unlink()


def publishing_to(settings: Settings) -> list[str]:
    """The secondaries a publish under way pushes to ([] when none runs; one killed left its
    marker, which its dead pid shows)."""
    try:
        record = read_json(settings.state_dir / PUBLISHING, {})
    except (OSError, ValueError):
        return []
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) \
            or not pid_alive(record["pid"]):
        return []
    return [str(name) for name in record.get("secondaries") or [] if isinstance(name, str)]


_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{12}-[0-9a-f]{8}$")


def queue_dir(settings: Settings) -> Path:
    return settings.state_dir / "queue"


def new_id(now: float | None = None, after: str | None = None) -> str:
    """Sorts by creation time to the microsecond (which request is newer decides superseding);
    ``after``: the newest id so far, which this one must sort after even if the clock was
    set back since."""
    now = time.time() if now is None else now
    if after and _ID_RE.match(after):
        newest = calendar.timegm(time.strptime(after[:15], "%Y%m%dT%H%M%S")) + int(after[15:21]) / 1e6
        now = max(now, newest + 2e-6)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}"
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


def parse_options(data: Any) -> dict[str, Any]:
    """The rollout options of a publish request, checked: bad input is a 400, never a 500."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest("the publish body must be a JSON object (or empty)")
    known = {"secondaries", "full", "force", "canary", "max_parallel", "stop_on_failure"}
    unknown = set(data) - known
    if unknown:
        raise BadRequest(f"unknown field(s) in publish: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    secondaries = data.get("secondaries") or []
    if not isinstance(secondaries, list) or not all(isinstance(s, str) and s for s in secondaries):
        raise BadRequest("'secondaries' must be a list of HOST or HOST:PORT strings")
    for flag in ("full", "force", "stop_on_failure"):
        if not isinstance(data.get(flag, False), bool):
            raise BadRequest(f"'{flag}' must be true or false")
    canary = data.get("canary")
    if canary is not None and (not isinstance(canary, str) or not canary):
        raise BadRequest("'canary' must be HOST or HOST:PORT of one secondary")
    max_parallel = data.get("max_parallel")
    if max_parallel is not None and (not isinstance(max_parallel, int) or isinstance(max_parallel, bool)
                                     or not 1 <= max_parallel <= 1000):
        raise BadRequest("'max_parallel' must be a whole number from 1 to 1000")
    return {"secondaries": secondaries, "full": bool(data.get("full", False)),
            "force": bool(data.get("force", False)), "canary": canary,
            "max_parallel": max_parallel, "stop_on_failure": bool(data.get("stop_on_failure", False))}


def request_targets(settings: Settings, options: dict[str, Any]) -> tuple[list[Secondary], Secondary | None]:
    """The secondaries a queued publish request names, and its canary: 409 on a server that
    is not a master (or whose Mirrors does not read), 400 on a name Mirrors does not hold.
    Checked when the request comes in, and again when the agent runs it (Mirrors may have
    changed in between)."""
    try:
        mirrors = read_mirrors(settings.iserv_cfg)
    except ConfigError as exc:
        raise Conflict(f"this server cannot publish: {exc.message}") from None
    if not mirrors:
        raise Conflict(f"this server has no <Mirrors> in {settings.iserv_cfg}: it is not a master, "
                       "so there is nothing to publish to. Publish on the master")
    try:
        targets = select_secondaries(settings, options.get("secondaries") or [], option="secondary")
        return targets, resolve_canary(targets, options.get("canary"), option="canary")
    except ConfigError as exc:
        raise BadRequest(exc.message) from None


class PublishQueue:
    def __init__(self, settings: Settings) -> None:
        self.dir = queue_dir(settings)
        # records seen finished: they never change again, so the agent's look at the
        # queue every tick does not read them again (an hour's history can be thousands)
        self._finished: set[str] = set()

    def path(self, request_id: str) -> Path:
        if not _ID_RE.match(request_id):
            raise NotFound(f"no publish {request_id!r} on this master (ids look like "
                           "20260101T120000123456-1a2b3c4d)")
        return self.dir / f"{request_id}.json"

    def submit(self, options: dict[str, Any], caller: str | None, targets: list[str],
               state: str = "queued") -> dict[str, Any]:
        files = self._files()
        newest = files[-1].stem if files else None
        record = {"id": new_id(after=newest), "created": now_iso(), "caller": caller, "options": options,
                  "state": state, "ok": None, "generation": None, "digest": None, "error": None,
                  "started": None, "finished": None, "superseded_by": None, "runs": 0,
                  "secondaries": [{"name": t, "state": "pending", "bytes_sent": 0, "files_sent": 0,
                                   "error": None} for t in targets]}
        self.save(record)
        return record

    def save(self, record: dict[str, Any], durable: bool = True) -> None:
        write_json(self.path(record["id"]), record, durable=durable)

    def get(self, request_id: str) -> dict[str, Any]:
        record = read_json(self.path(request_id))
        if record is None:
            raise NotFound(f"no publish {request_id} on this master")
        return record

    def _files(self) -> list[Path]:
        """The record files, oldest first (ids sort by creation time)."""
        return sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        """A record; None for a half-written or foreign file (skipped)."""
        try:
            record = read_json(path)
        except (ValueError, OSError):
            return None
        return record if isinstance(record, dict) and "id" in record else None

    def all(self) -> list[dict[str, Any]]:
        """Every record, oldest first."""
        return [r for r in map(self._read, self._files()) if r is not None]

    def pending(self) -> list[dict[str, Any]]:
        """The requests queued or running, oldest first; finished ones are read once."""
        files = self._files()
        self._finished &= {path.name for path in files}  # (pruned ones are forgotten)
        records = []
        for path in files:
            if path.name in self._finished:
                continue
            record = self._read(path)
            if record is None:
                continue
            if record.get("state") in PENDING:
                records.append(record)
            else:
                self._finished.add(path.name)
        return records

    def history(self, count: int = 10) -> list[dict[str, Any]]:
        """The newest ``count`` records, newest first (only those are read)."""
        records: list[dict[str, Any]] = []
        for path in reversed(self._files()):
            if len(records) >= count:
                break
            record = self._read(path)
            if record is not None:
                records.append(record)
        return records

    def prune(self, keep: int = HISTORY_KEEP, younger_kept: float = HISTORY_MIN_AGE) -> None:
        """Keep the newest ``keep`` finished records, and every one written in the last
        ``younger_kept`` seconds: whoever got its 202 can still look it up. Aged by their
        files' times, not their ids: ids made while the clock was ahead (set back since)
        would keep every record after them for as long."""
        finished = [r for r in self.all() if r.get("state") not in PENDING]
        cutoff = fs_now(self.dir) - younger_kept
        for record in finished[:-keep] if keep else finished:
            path = self.path(record["id"])
            try:
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
            except OSError:
                pass
