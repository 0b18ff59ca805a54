"""The receiver: a Flask WSGI app mounted under the web server in front of Express Server.

Importing this package is cheap (no Flask) so the CLI starts fast; Flask is
imported when an app is made.
"""
from __future__ import annotations

import errno
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .core.errors import ConfigError, MirrorError, one_line
from .core.settings import Settings, load_settings

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("esmirror")


def create_app(settings: Settings | None = None, test_config: dict[str, Any] | None = None,
               lock_timeout: float | None = None) -> "Flask":
    """The receiver as a Flask app; routes are relative to the mount point. ``lock_timeout``:
    how long to wait for a commit under way before recovering (default: a commit's own)."""
    from flask import Flask

    from . import admin, errors, peer
    from .core.apply import WorkingDir
    from .core.room import read_only_note
    from .core.signing import Verifier
    from .core.state import SELF_ID_FILE
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
        with workdir.lock() if lock_timeout is None else workdir.lock(lock_timeout):
            note = workdir.recover()
            own_id = workdir.self_id  # created now, so that reading routes never write
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        # a filesystem remounted read-only (after an I/O error, say): serve what can be read,
        # browse and status say why pushes fail, and each write answers so
        note = read_only_note(exc.filename or settings.data_dir)
        try:
            own_id = (settings.state_dir / SELF_ID_FILE).read_text(encoding="utf-8").strip()
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
    that cannot start still answers (see _NotStarted), so the master shows the cause (an
    esmirror.ini typo after a graceful restart, the venv, the owner of var/data) instead
    of the web server's bare 500. ``esmirror serve`` stops instead.
    """
    if settings is not None:  # (esmirror serve: the CLI's start-up did what follows)
        return _mounted(settings)
    from .core.state import keep_owner_rights

    keep_owner_rights()
    try:
        return _mounted(load_settings())
    except Exception as exc:  # (anything: the alternative is the web server's bare 500)
        return _NotStarted(exc)


def _mounted(settings: Settings, lock_timeout: float | None = None) -> Callable[..., Any]:
    from .ipfilter import PrefixMount

    return PrefixMount(create_app(settings, lock_timeout=lock_timeout), settings.prefix)


class _NotStarted:
    """The WSGI app of a receiver that could not start: 503 to every request, saying why.

    What failed may pass (a lock a sibling held, a full disk, a file caught half-written),
    so a request at most every ``RETRY`` seconds tries to start it again, and the first
    that succeeds serves from then on: no restart needed once the cause is fixed. The
    settings did not load, so no allow list says who may read the details (a quoted line
    of esmirror.ini, paths): a caller on this machine, not through a proxy, gets them, as
    does the web server's error log; anyone else gets the kind of failure only.
    """

    RETRY = 5.0

    def __init__(self, exc: Exception) -> None:
        self._app: Callable[..., Any] | None = None
        self._trying = threading.Lock()
        self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        kind, why = _why_not_started(exc)
        self.tried = time.monotonic()
        if why != getattr(self, "why", None):  # (each try logs only a new cause)
            log.error("the esmirror receiver cannot start: %s", why,
                      exc_info=not isinstance(exc, (MirrorError, OSError, ImportError)))
        self.kind, self.why = kind, why

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if (self._app is None and time.monotonic() - self.tried >= self.RETRY
                and self._trying.acquire(blocking=False)):
            try:
                if self._app is None:  # (another thread may have started it meanwhile)
                    # a commit under way in another process holds the lock: this request
                    # must not wait for it (minutes); the next try will do
                    self._app = _mounted(load_settings(), lock_timeout=1.0)
                    log.warning("the esmirror receiver started")
            except Exception as exc:
                self._failed(exc)
            finally:
                self._trying.release()
        if self._app is not None:
            return self._app(environ, start_response)
        from .ipfilter import json_answer

        local = (environ.get("REMOTE_ADDR") in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
                 and not any(k in environ for k in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED")))
        return json_answer(start_response, "503 Service Unavailable", {
            "error": f"this esmirror receiver cannot start ({'' if local else 'its web server log says why; '}"
                     f"it tries again every {self.RETRY:g} s): {self.why if local else self.kind}"})


def _why_not_started(exc: Exception) -> tuple[str, str]:
    """(the kind of failure, for anyone; the details, for this machine and the log)."""
    if isinstance(exc, ConfigError):
        return ("its settings do not load; esmirror check on that server names the line",
                exc.message)
    if isinstance(exc, MirrorError):
        return ("its working directory cannot be opened as it is; esmirror check and its log say why",
                exc.message)
    if isinstance(exc, ImportError):
        return ("its Python cannot import esmirror's packages (its venv, or the web server's Python)",
                f"its Python ({sys.prefix}) cannot import {exc.name or exc}: the venv lacks esmirror's "
                "packages, or the web server runs another Python than the venv's (mod_wsgi's "
                "python-home, its build)")
    lock_file = getattr(exc, "lock_file", None)  # (filelock.Timeout)
    if lock_file is not None:
        return ("another process holds its commit lock (a commit under way)",
                f"{lock_file} is held by another process (a commit under way, or one that hangs)")
    if isinstance(exc, OSError):
        return ("it cannot use a file of its install (its owner, permissions or a full disk)",
                f"{f'{exc.filename}: ' if exc.filename else ''}{exc.strerror or exc}; check that the "
                "account it runs as (LT_IS_USER) owns var/data and can read ImageServer/etc, and "
                "that its disk has room")
    return ("an unexpected error; its web server's log has it",
            f"unexpected {exc.__class__.__name__}: {one_line(exc)}; this is an esmirror bug, please "
            "report it")
