"""The audit log: one JSON line per publish, push, commit and archive action, on every server.

``var/data/.esmirror/audit.log``, rotated by size (``audit.log.1`` … ``.N``,
the stdlib's RotatingFileHandler naming). Several processes write it (gunicorn
workers, the agent, the CLI), so each line is written under a file lock with a
handler opened for that line only: a rotation by one process is seen by all.
"""
from __future__ import annotations

import datetime as dt
import time
import json
import logging
import logging.handlers
from pathlib import Path
from typing import Any

import filelock

from .settings import Settings

MAX_BYTES = 1024 * 1024
BACKUPS = 5
AUDIT_LOG = "audit.log"
_log = logging.getLogger("esmirror")


def audit_path(settings: Settings) -> Path:
    return settings.state_dir / AUDIT_LOG


def now_iso() -> str:
    return iso_time(time.time())


def iso_time(epoch: float) -> str:
    """A time as esmirror's records and status show it: UTC, seconds, ``Z``."""
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def command_line_caller() -> str:
    """Who asked, for the audit log and the publish history: this user on this host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"command line ({user}@{socket.gethostname()})"


def audit(settings: Settings, event: str, *, caller: str | None, master: str | None,
          generation: int | None, files: Any, outcome: str, max_bytes: int = MAX_BYTES,
          backups: int = BACKUPS, **extra: Any) -> None:
    """Append one line; never raises (an unwritable log must not fail a push), but says so."""
    line = json.dumps({"time": now_iso(), "event": event, "caller": caller, "master": master,
                       "generation": generation, "files": files, "outcome": outcome, **extra},
                      sort_keys=False, default=str)
    path = audit_path(settings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(path) + ".lock", timeout=30):
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
            handler.setFormatter(logging.Formatter("%(message)s"))
            try:
                handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
            finally:
                handler.close()
    except (OSError, filelock.Timeout) as exc:
        _log.warning("cannot write the audit log %s: %s", path, exc)


def read_audit(settings: Settings) -> list[dict[str, Any]]:
    """The current file's lines, oldest first (rotated files are not read)."""
    try:
        text = audit_path(settings).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
