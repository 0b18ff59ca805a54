"""The receiver: a Flask WSGI app mounted under the web server in front of Express Server.

Importing this package is cheap (no Flask) so the CLI starts fast; Flask is
imported when an app is made.
"""
from __future__ import annotations

import errno
import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable

from .core.errors import MirrorError
from .core.settings import Settings, load_settings

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("esmirror")


def create_app(settings: Settings | None = None, test_config: dict[str, Any] | None = None) -> "Flask":
    """The receiver as a Flask app; routes are relative to the mount point."""
    from flask import Flask

    from . import admin, errors, peer
    from .core.apply import WorkingDir
    from .core.signing import Verifier
    from .core.store import read_only_note
    from .gunicorn_body import GunicornBody
    from .ipfilter import IPFilter

    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=None)
    if test_config:
        app.config.update(test_config)
    workdir = WorkingDir(settings)
    app.extensions["esmirror.workdir"] = workdir
    app.extensions["esmirror.files_stamp"] = settings.files_stamp()  # (browse says when it is stale)
    app.register_blueprint(peer.bp)
    app.register_blueprint(admin.bp)
    errors.register(app)
    try:
        with workdir.lock():
            note = workdir.recover()
            own_id = workdir.self_id  # created now, so that reading routes never write
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        # a filesystem remounted read-only (after an I/O error, say): serve what can be read,
        # browse and status say why pushes fail, and each write answers so
        note = read_only_note(exc.filename or settings.data_dir)
        try:
            own_id = (settings.state_dir / "self-id").read_text(encoding="utf-8").strip()
        except OSError:
            own_id = ""
    # None: unsigned pushes. Signed ones must name this server (a replay from another fails)
    app.extensions["esmirror.verifier"] = Verifier.from_settings(settings, own_id)
    if note:
        log.warning("%s: %s", settings.data_dir, note)

    @app.before_request
    def recover_after_a_killed_worker() -> None:
        # gunicorn restarts a killed worker without building the app again: the next
        # request, in any worker, puts the set back (one stat when nothing happened)
        note = workdir.recover_if_interrupted()
        if note:
            log.warning("%s: %s", settings.data_dir, note)

    app.wsgi_app = IPFilter(GunicornBody(app.wsgi_app), settings)  # type: ignore[method-assign]
    return app


def make_wsgi(settings: Settings | None = None) -> Callable[..., Any]:
    """The app mounted at the settings' prefix: what every server runs.

    Without ``settings`` (the WSGI entry point of httpd, IIS or a gunicorn unit), a receiver
    that cannot start still answers: every request gets a 503 saying why, so the master
    shows the cause (an esmirror.ini typo after a graceful restart, the venv, the owner of
    var/data) instead of the web server's bare 500. ``esmirror serve`` stops instead.
    """
    from .core.state import keep_owner_rights

    keep_owner_rights()
    given = settings
    try:
        from .ipfilter import PrefixMount

        settings = settings or load_settings()
        return PrefixMount(create_app(settings), settings.prefix)
    except (MirrorError, OSError, ImportError) as exc:
        if given is not None:
            raise
        return _cannot_start(exc)


def _cannot_start(exc: Exception) -> Callable[..., Any]:
    if isinstance(exc, MirrorError):
        why = exc.message
    elif isinstance(exc, ImportError):
        why = (f"its Python ({sys.prefix}) cannot import {exc.name or exc}: the venv lacks esmirror's "
               "packages, or the web server runs another Python than the venv's (mod_wsgi's "
               "python-home, its build)")
    else:
        why = (f"{exc.filename}: {exc.strerror or exc}; check that the account it runs as (LT_IS_USER) "
               "owns var/data and can read ImageServer/etc")
    log.error("the esmirror receiver cannot start: %s", why)
    body = json.dumps({"error": f"this esmirror receiver cannot start (fix this, then restart it): {why}"}).encode()

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("503 Service Unavailable", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body)))])
        return [body]
    return application
