"""One error hierarchy for both sides.

Every error carries what a person needs to act (file, line, host, address) in
its message; ``status`` is the HTTP status the receiver answers with and
``exit_code`` the CLI's. The mapping lives here once so views and commands
never decide it themselves.
"""
from __future__ import annotations

import json
from typing import Any


class MirrorError(Exception):
    """Base of every error esmirror reports to a person."""

    status = 500
    exit_code = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, **self.details}


class ConfigError(MirrorError):
    """A settings file, iserv-cfg.xml or command line is wrong (exit 2)."""

    status = 500
    exit_code = 2


class WorkingDirError(ConfigError):
    """var/data itself is wrong (a dangling link, a file): not esmirror.ini's to fix."""


class BadRequest(MirrorError):
    status = 400


class Unauthorized(MirrorError):
    status = 401


class Forbidden(MirrorError):
    status = 403


class NotFound(MirrorError):
    status = 404


class Conflict(MirrorError):
    """Base mismatch, foreign master, stale generation, missing blobs."""

    status = 409


class LengthRequired(MirrorError):
    status = 411


class TooLarge(MirrorError):
    status = 413


class InvalidSet(MirrorError):
    """The set would break Express Server: unsafe path, bad catalogs.xml."""

    status = 422

    def __init__(self, message: str, reasons: list[str] | None = None, **details: Any) -> None:
        super().__init__(message, reasons=list(reasons or []), **details)
        self.reasons = list(reasons or [])


class ReloadFailed(MirrorError):
    status = 502


class NoRoom(MirrorError):
    status = 507


class Unavailable(MirrorError):
    """This server cannot answer until an admin fixes something it names (503)."""

    status = 503


class Damaged(MirrorError, ValueError):
    """One of esmirror's own records cannot be read back (a ValueError too, for callers
    that skip what they cannot parse)."""


class RemoteError(MirrorError):
    """A secondary could not be reached or answered with an error (agent side)."""

    def __init__(self, message: str, status: int | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.http_status = status


class ChangedWhileSent(OSError):
    """A file of the master's set held other bytes than the scan found when they were sent
    (an OSError: it is raised inside socket writes and body generators)."""

    @classmethod
    def file(cls, path: Any, start: int, length: int, got: int) -> "ChangedWhileSent":
        return cls(f"{path} changed while being sent (bytes {start}-{start + length - 1} were "
                   f"asked for, {got} were there); publish again once it is written")


def one_line(text: Any, limit: int = 300) -> str:
    """Words from elsewhere (a secondary's answer, an exception) as one line of at most
    ``limit`` characters: they end up in one-line reports, messages and the ledger."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def untrusted_json(data: bytes | str, what: str) -> Any:
    """``data`` (a request body or part of one) as JSON; anything else, absurdly deep
    nesting included (RecursionError), is the client's error: BadRequest(``what``)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadRequest(what) from None
