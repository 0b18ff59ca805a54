"""``esmirror serve``: the receiver under waitress (default) or gunicorn, at the prefix."""
from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any, Callable

from . import make_wsgi
from .core.errors import ConfigError, MirrorError
from .core.express import host_problem, parse_port
from .core.settings import Settings, shown_network
from .gunicorn_body import IDLE_TIMEOUT


# waitress receives every body in its one event-loop thread, recv_bytes at a time
# (default 8 KiB: ~100,000 trips through Python for the bench's 856 MB set). A full
# push of that set under waitress, 3 runs each, alternating: 8 KiB 3.81 s, 256 KiB
# 2.70 s, 1 MiB 2.53 s (medians). The bytes still go to waitress's temp file first.
WAITRESS_RECV_BYTES = 1024 * 1024
# waitress reads a request's whole body (to a temp file) before the app, and so the IP
# check, sees it: a caller that no allow list names may send no more than this
STRANGER_BODY_BYTES = 64 * 1024


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    number = parse_port(port)
    if not sep or not host or number is None or host_problem(host):
        raise ConfigError(f"--bind {bind!r} is not HOST:PORT (use [::1]:8080 for IPv6)")
    return host, number


def _waitress_listen(host: str, port: int) -> dict[str, Any]:
    """waitress's address options. Its IPv6 sockets take IPv6 only, so [::] (every address,
    as gunicorn takes it: IPv4 too) is listened on as [::] and 0.0.0.0 both."""
    try:
        every = ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        every = False
    return {"listen": f"[::]:{port} 0.0.0.0:{port}"} if every else {"host": host, "port": port}


def _can_listen(bind: str, host: str, port: int) -> None:
    """Bind once, before either server tries: gunicorn would retry for 5 s and print its own
    errors, waitress calls a name it cannot resolve a ValueError."""
    import socket

    try:
        # the first address only, as gunicorn binds a name (waitress binds them all, and says
        # itself when a later one fails)
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            if os.name != "nt":  # (as both servers do; on Windows it would share a port in use)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:  # (socket.gaierror too: a name that does not resolve)
        raise MirrorError(f"cannot listen on {bind}: {exc.strerror or exc}; is another server using "
                          "that port, and is the address one of this host's?") from None


def check_certificate(certfile: str, keyfile: str) -> None:
    """Load the pair now: gunicorn would start with a bad one and then fail every handshake."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--certfile {certfile} with --keyfile {keyfile} cannot serve TLS "
                          f"({getattr(exc, 'strerror', None) or exc}); give a PEM certificate "
                          "and the PEM private key that belongs to it") from None


def _spool_beside_the_set(settings: Settings) -> None:
    """waitress writes each request body to a temp file (tempfile's folder, /tmp) before the
    app reads it. Put it in .esmirror/tmp, on var/data's disk: the room a push needs is
    counted there (free_bytes), and /tmp may be a small tmpfs (Debian 13's default) where a
    part of SPOOLED_PART_BYTES failed every push, reported as a connection closed."""
    import tempfile

    spool = settings.state_dir / "tmp"
    try:
        spool.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # (a read-only var/data takes no pushes anyway: browse says so)
    if os.access(spool, os.W_OK | os.X_OK):  # (one root left: /tmp as before; check says why)
        tempfile.tempdir = str(spool)


def _guarded(settings: Settings) -> Callable[..., Any]:
    """waitress's create_server, whose connections from callers in none of allow_push,
    allow_admin and trusted_proxies get a body limit of STRANGER_BODY_BYTES: such a caller
    is refused (413) once its headers are in, instead of after waitress has written its
    whole body, up to max_upload_bytes per connection, to disk. A small body still reaches
    the app, which answers the usual 403 naming the address."""
    import copy

    from waitress.server import create_server

    from .ipfilter import allowed, parse_address

    admitted = settings.allow_push + settings.allow_admin + settings.trusted_proxies

    def create(application: Any, **kw: Any) -> Any:
        listeners: dict[Any, Any] = {}  # waitress's socket map: one server per address listened on
        server = create_server(application, map=listeners, **kw)
        for listener in [v for v in listeners.values() if hasattr(v, "channel_class")]:
            strangers = copy.copy(listener.adj)
            strangers.max_request_body_size = STRANGER_BODY_BYTES

            class Channel(listener.channel_class):  # type: ignore[misc,name-defined]
                def __init__(self, srv: Any, sock: Any, addr: Any, adj: Any, map: Any = None,
                             strangers: Any = strangers) -> None:
                    peer = parse_address(str(addr[0])) if isinstance(addr, tuple) and addr else None
                    if peer is None or not allowed(peer, admitted):
                        adj = strangers
                    super().__init__(srv, sock, addr, adj, map)

            listener.channel_class = Channel
        return server
    return create


# waitress, stopped, waits 5 s for the requests under way, then leaves its threads to die
# with the process: a commit whose reload_command restarts Express Server takes longer.
# The exit waits this long for the commit lock, which a commit holds to its end.
STOP_GRACE = 60.0


def _wait_for_a_commit_under_way(settings: Settings, say: Callable[[str], None]) -> None:
    import filelock

    from .core.apply import WorkingDir

    workdir = WorkingDir(settings)
    try:
        # (no lock file, no commit ever ran: nothing to wait for, and nothing to create; a
        # stop after var/data was removed made .esmirror/ again)
        if workdir.lock_path.exists():
            with workdir.lock(timeout=STOP_GRACE):
                pass
    except filelock.Timeout:
        raise MirrorError(f"stopped while a commit was still under way after {STOP_GRACE:g} s; the "
                          "next start rolls it back and the master's next push applies it again") from None
    except OSError:
        pass  # (a read-only var/data: no commit can run)
    say("esmirror receiver: stopped")


def run_server(settings: Settings, bind: str, server: str, certfile: str | None = None,
               keyfile: str | None = None, workers: int = 2) -> None:
    host, port = parse_bind(bind)
    if (certfile or keyfile) and server != "gunicorn":
        raise ConfigError("TLS needs --server gunicorn (or TLS in the web server in front)")
    if bool(certfile) != bool(keyfile):
        raise ConfigError("give both --certfile and --keyfile")
    if certfile and keyfile:
        check_certificate(certfile, keyfile)
    _can_listen(bind, host, port)
    application = make_wsgi(settings)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    started = (f"esmirror receiver: {settings.data_dir} at {'https' if certfile else 'http'}://{address}"
               f"{settings.prefix} ({server}; pushes from "
               f"{', '.join(map(shown_network, settings.allow_push)) or 'nobody'})")

    def say(line: str) -> None:
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError, AttributeError):  # a full log disk, a closed stderr: serve anyway
            pass

    def listening(arbiter: Any = None) -> None:  # (gunicorn calls it with its arbiter)
        # one line once bound, so a log (journald's, a file) shows what runs where (the
        # requests are in the audit log)
        say(started)

    if server == "waitress":
        import waitress

        _spool_beside_the_set(settings)

        # waitress refuses a body of exactly its limit; one byte more leaves the
        # limit to the app, which answers 413 with a JSON message naming it

        try:
            guarded = _guarded(settings)

            def create(app: Any, **kw: Any) -> Any:
                made = guarded(app, **kw)  # (bound: a port taken fails here, before the line)
                listening()
                return made

            waitress.serve(application, _server=create, **_waitress_listen(host, port), threads=8,
                           ident="esmirror",
                           recv_bytes=WAITRESS_RECV_BYTES,
                           max_request_body_size=settings.max_upload_bytes + 1, channel_timeout=IDLE_TIMEOUT,
                           # waitress would drop X-Forwarded-For from untrusted peers itself; the
                           # app's own trusted_proxies logic decides who the caller is.
                           trusted_proxy=None, clear_untrusted_proxy_headers=False)
        except OSError as exc:  # binding: the port is taken, or the address is not this host's
            raise MirrorError(f"cannot listen on {bind}: {exc.strerror or exc}; is another server "
                              "using that port, and is the address one of this host's?") from None
        _wait_for_a_commit_under_way(settings, say)
        return
    from gunicorn.app.base import BaseApplication

    options: dict[str, Any] = {
        "bind": address,
        "workers": workers, "worker_class": "gthread", "threads": 4, "timeout": IDLE_TIMEOUT,
        "graceful_timeout": 10, "certfile": certfile, "keyfile": keyfile,
        # gunicorn never rewrites REMOTE_ADDR from X-Forwarded-For; trusting no peer for its
        # scheme headers leaves the caller's address to the app's trusted_proxies.
        "forwarded_allow_ips": "", "loglevel": "warning",
        # gunicorn 27's control socket lives in $HOME, which a service account (www-data:
        # /var/www) cannot write: an alarming error at every start, for a feature unused here
        "control_socket_disable": True,
        "when_ready": listening,
    }

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                if value is not None and key in self.cfg.settings:  # (older gunicorns lack some)
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return application

    Gunicorn().run()
