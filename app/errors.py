"""The one place that turns errors into HTTP answers: JSON, never a traceback."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .core.errors import MirrorError

log = logging.getLogger("esmirror")


def register(app: Flask) -> None:
    @app.errorhandler(MirrorError)
    def mirror_error(exc: MirrorError):  # type: ignore[no-untyped-def]
        return jsonify(exc.to_json()), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        return jsonify({"error": f"{exc.name}: {exc.description}"}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unexpected error")
        return jsonify({"error": "internal error on this server; its log has the details"}), 500
