"""``esmirror serve``: the receiver under waitress (default) or gunicorn, at the prefix."""
from __future__ import annotations

from typing import Any

from app import make_wsgi
from app.core.errors import ConfigError, MirrorError
from app.core.express import host_problem, parse_port
from app.core.settings import Settings


# waitress receives every body in its one event-loop thread, recv_bytes at a time
# (default 8 KiB: ~100,000 trips through Python for the bench's 856 MB set). A full
# push of that set under waitress, 3 runs each, alternating: 8 KiB 3.81 s, 256 KiB
# 2.70 s, 1 MiB 2.53 s (medians). The bytes still go to waitress's temp file first.
WAITRESS_RECV_BYTES = 1024 * 1024


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    number = parse_port(port)
    if not sep or not host or number is None or host_problem(host):
        raise ConfigError(f"--bind {bind!r} is not HOST:PORT (use [::1]:8080 for IPv6)")
    return host, number


def check_certificate(certfile: str, keyfile: str) -> None:
    """Load the pair now: gunicorn would start with a bad one and then fail every handshake."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--certfile {certfile} with --keyfile {keyfile} cannot serve TLS "
                          f"({getattr(exc, 'strerror', None) or exc}); give a PEM certificate "
                          "and the PEM private key that belongs to it") from None


def run_server(settings: Settings, bind: str, server: str, certfile: str | None = None,
               keyfile: str | None = None, workers: int = 2) -> None:
    host, port = parse_bind(bind)
    if (certfile or keyfile) and server != "gunicorn":
        raise ConfigError("TLS needs --server gunicorn (or TLS in the web server in front)")
    if bool(certfile) != bool(keyfile):
        raise ConfigError("give both --certfile and --keyfile")
    if certfile and keyfile:
        check_certificate(certfile, keyfile)
    application = make_wsgi(settings)
    if server == "waitress":
        import waitress

        # waitress refuses a body of exactly its limit; one byte more leaves the
        # limit to the app, which answers 413 with a JSON message naming it

        try:
            waitress.serve(application, host=host, port=port, threads=8, ident="esmirror",
                           recv_bytes=WAITRESS_RECV_BYTES,
                           max_request_body_size=settings.max_upload_bytes + 1, channel_timeout=600,
                           # waitress would drop X-Forwarded-For from untrusted peers itself; the
                           # app's own trusted_proxies logic decides who the caller is.
                           trusted_proxy=None, clear_untrusted_proxy_headers=False)
        except OSError as exc:  # binding: the port is taken, or the address is not this host's
            raise MirrorError(f"cannot listen on {bind}: {exc.strerror or exc}; is another server "
                              "using that port, and is the address one of this host's?") from None
        return
    from gunicorn.app.base import BaseApplication

    options: dict[str, Any] = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers, "worker_class": "gthread", "threads": 4, "timeout": 600,
        "graceful_timeout": 10, "certfile": certfile, "keyfile": keyfile,
        # gunicorn never rewrites REMOTE_ADDR from X-Forwarded-For; trusting no peer for its
        # scheme headers leaves the caller's address to the app's trusted_proxies.
        "forwarded_allow_ips": "", "loglevel": "warning",
    }

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                if value is not None:
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return application

    Gunicorn().run()
