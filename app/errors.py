"""The one place that turns errors into HTTP answers: JSON, never a traceback."""
from __future__ import annotations

import errno
import logging
from pathlib import Path

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .core.errors import MirrorError
from .core.room import what_is_full

log = logging.getLogger("esmirror")


def register(app: Flask) -> None:
    @app.errorhandler(MirrorError)
    def mirror_error(exc: MirrorError):  # type: ignore[no-untyped-def]
        return jsonify(exc.to_json()), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        return jsonify({"error": f"{exc.name}: {exc.description}"}), exc.code

    @app.errorhandler(OSError)
    def server_file(exc: OSError):  # type: ignore[no-untyped-def]
        # this server's own files (a full disk, a permission): name them, not "internal error"
        if isinstance(exc, ConnectionError):  # the caller went away mid-request
            return jsonify({"error": f"the connection broke: {exc.strerror or exc}"}), 400
        if isinstance(exc, TimeoutError):  # (gunicorn_body.IDLE_TIMEOUT) the caller went silent
            return jsonify({"error": "the request's sender went silent before its end; it was "
                                     "dropped: send it again"}), 408
        what = exc.filename or "its working files"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            full = what_is_full(Path(exc.filename).parent)[0] if exc.filename else "this server's disk is full"
            return jsonify({"error": f"{full}: cannot write {what}; free some space (esmirror "
                                     "archive clear) and try again"}), 507
        if exc.errno == errno.EROFS:
            log.error("read-only filesystem: cannot write %s", what)
            return jsonify({"error": f"this server's {what} is on a read-only filesystem; remount it "
                                     "read-write and try again"}), 503
        log.error("cannot read or write %s: %s", what, exc.strerror or exc)
        return jsonify({"error": f"this server cannot read or write {what}: {exc.strerror or exc}; "
                                 "check that the account the receiver runs as (LT_IS_USER) owns "
                                 "var/data"}), 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unexpected error")
        return jsonify({"error": "internal error on this server; its log has the details"}), 500
