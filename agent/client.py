"""HTTP to one secondary: a requests Session with the TLS mode of SPEC §1, timeouts, GET-only retries."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import urlencode
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from app.core.errors import ChangedWhileSent, ConfigError, MirrorError, RemoteError, one_line
from app.core.express import Secondary
from app.core.manifest import SHA256_RE, Manifest
from app.core.settings import Settings
from app.core.signing import EMPTY_SHA256, Signer, batch_digest

RETRIES = 3                      # any request that never connected; else GETs only
BACKOFF = 0.3                    # seconds, doubling: 0, 0.6, 1.2 between attempts
RETRY_STATUSES = (502, 503, 504)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 600.0  # a commit of a large set may spend minutes staging and flushing
BROWSE_TIMEOUT = 60.0  # a browse is a quick look: one that takes longer will not come
# Wall-clock limits. The timeouts above bound each wait for a byte, so a secondary that
# answers one byte every few seconds would hold a request (and the publish lock) for ever.
# A browse gets BROWSE_TIMEOUT in all; any other request the secondary's silent work (up to
# READ_TIMEOUT) plus its answer, and its body at no less than MIN_RATE.
ANSWER_DEADLINE = 2 * READ_TIMEOUT
MIN_RATE = 64 * 1024  # bytes a second: slower than this, a body is a stalled peer's
SEND_BLOCK = 1024 * 1024
PROGRESS_BLOCK = 16 * 1024 * 1024  # a large file's progress is told this often (sendfile)


def tls_verify(secondary: Secondary, settings: Settings) -> bool | str:
    """What ``verify`` means for this secondary; a strict one needs the install's CA bundle."""
    if secondary.ssl == "none":
        return True
    if secondary.ssl == "noverify":
        return False
    bundle = settings.ca_bundle
    if not bundle.is_file() or not os.access(bundle, os.R_OK):
        raise ConfigError(f"{secondary.name} is ssl=\"strict\" but {bundle} is missing or unreadable; "
                          "put the PEM certificates of its CA (or its own) there")
    return str(bundle)


def tls_context(secondary: Secondary, settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of one secondary, built here so nothing in the environment shapes it.

    ``strict`` trusts ca-bundle.crt and nothing else: no system store, no
    REQUESTS_CA_BUNDLE, SSL_CERT_FILE or SSL_CERT_DIR (no default paths are
    loaded), and no SSLKEYLOGFILE (ssl.create_default_context would honour it).
    """
    if secondary.ssl == "none":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if secondary.ssl == "noverify":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    bundle = tls_verify(secondary, settings)
    try:
        context.load_verify_locations(cafile=bundle)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{secondary.name} is ssl=\"strict\" but {bundle} holds no usable PEM "
                          f"certificate ({exc}); put the certificates of its CA there") from None
    if not context.get_ca_certs():
        raise ConfigError(f"{secondary.name} is ssl=\"strict\" but {bundle} holds no CA certificate")
    return context


class _Adapter(HTTPAdapter):
    """An adapter whose connections use our own SSL context and send ``FileSpan`` blocks."""

    def __init__(self, context: ssl.SSLContext | None, **kwargs: Any) -> None:
        self.context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self.context is not None:
            kwargs["ssl_context"] = self.context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def make_session(secondary: Secondary, settings: Settings) -> requests.Session:
    session = requests.Session()
    # The environment (REQUESTS_CA_BUNDLE, proxies, .netrc) must not change what
    # "strict" trusts or where pushes go.
    session.trust_env = False
    session.verify = tls_verify(secondary, settings)
    context = tls_context(secondary, settings)
    if session.verify is False:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    # urllib3 retries only failing to connect: nothing was sent, so even a signed request
    # (one-time nonce) may go again as it is. Anything that may have reached the secondary
    # is retried by SecondaryClient._request, GETs only, each attempt signed anew.
    retry = Retry(total=RETRIES, connect=RETRIES, read=0, status=0, other=0,
                  backoff_factor=BACKOFF, raise_on_status=False)
    adapter = _Adapter(context, max_retries=retry, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "esmirror"
    return session


def _tls_failure(exc: Exception, answered: bool = False) -> str | None:
    """What TLS said, when ``exc`` is a TLS failure (a certificate, a handshake). Once the
    secondary ``answered`` over this channel, only its certificate's is: a TLS connection
    cut short is the server going away."""
    unverified = _wrapped(exc, ssl.SSLCertVerificationError)
    if unverified is not None:
        return getattr(unverified, "verify_message", None) or str(unverified)
    return str(exc) if isinstance(exc, requests.exceptions.SSLError) and not answered else None


def describe_connection_error(secondary: Secondary, exc: Exception, answered: bool = False) -> str:
    """Plain words for TLS and network failures; ``answered``: it answered earlier requests
    of this push (so the channel is right, and a cut connection is a stop, not TLS)."""
    text = str(exc)
    reason = _tls_failure(exc, answered)
    if reason is not None:
        low = reason.lower()
        if "expired" in low:
            why = "its certificate has expired"
        elif "self-signed" in low or "self signed" in low:
            why = "its certificate is self-signed and not in ca-bundle.crt"
        elif "hostname" in low or "ip address mismatch" in low or "doesn't match" in low:
            why = f"its certificate is not valid for the name {secondary.host}"
        elif "unable to get local issuer" in low:
            why = "its certificate's CA is not in ca-bundle.crt"
        elif "wrong version number" in low or "record layer" in low:
            why = "it does not speak HTTPS on that port; if it serves plain HTTP, set its ssl to none"
        else:
            why = reason
        return f"TLS to {secondary.name} failed: {why}"
    if _timed_out(exc):
        if secondary.ssl != "none":
            return (f"{secondary.name} did not answer in time over TLS; if that port speaks "
                    "plain HTTP, set its ssl to none (is ssl set right?)")
        return (f"{secondary.name} went silent (no byte answered or taken for the time allowed: "
                f"{BROWSE_TIMEOUT:.0f} s for a browse, {READ_TIMEOUT:.0f} s otherwise); check that "
                "it is up and the network to it, then publish again")
    if "refused" in text.lower():
        return (f"cannot connect to {secondary.name}: connection refused, nothing listens on port "
                f"{secondary.port} there; check that port in its <Secondary> (80 when left out, even "
                "for HTTPS) and that its web server or receiver is running")
    if _wrapped(exc, http.client.RemoteDisconnected, ConnectionResetError, ssl.SSLEOFError) is not None:
        if answered:
            return (f"{secondary.name} closed the connection without answering: its receiver or web "
                    "server was stopped or restarted while it worked (a graceful reload of httpd by "
                    "logrotate, say) or crashed; its log says which. Publish again")
        hint = ("if that port speaks HTTPS, set its ssl to noverify or strict" if secondary.ssl == "none"
                else "if that port speaks plain HTTP, set its ssl to none")
        return (f"{secondary.name} closed the connection without answering; {hint} (is ssl set "
                "right?), else its receiver's log says why")
    if "Name or service not known" in text or "getaddrinfo" in text:
        return f"cannot resolve the host name {secondary.host}"
    not_http = _wrapped(exc, http.client.BadStatusLine)
    if not_http is not None:
        first = str(not_http.args[0] if not_http.args else "")[:40].strip()
        return (f"{secondary.name} answered with something that is not HTTP ({first!r}); another "
                "service listens on that port: check the port in its <Secondary>")
    return f"cannot reach {secondary.name}: {text[:300]}"


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """The exception and everything it wraps (requests nests urllib3 nests ssl)."""
    seen: list[BaseException] = []
    stack: list[Any] = [exc]
    while stack and len(seen) < 20:
        current = stack.pop()
        if not isinstance(current, BaseException) or any(current is s for s in seen):
            continue
        seen.append(current)
        yield current
        stack += [current.__cause__, current.__context__, getattr(current, "reason", None),
                  *current.args]


def _wrapped(exc: BaseException, *types: type[BaseException]) -> BaseException | None:
    """The first exception of one of ``types`` in ``exc``'s chain, or None."""
    return next((e for e in _chain(exc) if isinstance(e, types)), None)


def _timed_out(exc: BaseException) -> bool:
    """A read or a send timed out: the wait is minutes, or it was a TLS handshake with a port
    that speaks plain HTTP (waitress never answers one); asking again helps neither."""
    return isinstance(exc, requests.exceptions.Timeout) or \
        _wrapped(exc, urllib3.exceptions.ReadTimeoutError, TimeoutError) is not None


def _never_connected(exc: BaseException) -> bool:
    """True when no connection was made (urllib3 already retried that): retrying more only
    makes an unreachable secondary slower to report."""
    return _wrapped(exc, urllib3.exceptions.NewConnectionError,
                    urllib3.exceptions.ConnectTimeoutError) is not None


class Body:
    """A streamed request body of known length, sent in ``SEND_BLOCK`` pieces.

    Iterable with ``__len__`` and no ``read``: requests then sends Content-Length and
    urllib3 passes each block straight to the socket (with ``read`` it would pull
    16 KiB at a time, a measured bottleneck on multi-GB pushes). A block may be a
    ``FileSpan``, which our connections send with sendfile(2).
    """

    def __init__(self, length: int, blocks: Iterable[bytes | FileSpan]) -> None:
        self.len = length
        self._blocks = blocks

    def __len__(self) -> int:
        return self.len

    def __iter__(self) -> Iterator[bytes | FileSpan]:
        sent = 0
        for block in self._blocks:
            sent += len(block)
            yield block
        if sent != self.len:  # the secondary would wait for the rest
            raise ChangedWhileSent(f"a request body was {sent} bytes, not the {self.len} announced "
                                   "(a file changed while being sent); publish again")


class FileSpan:
    """A byte range of a file, as one block of a ``Body``.

    Over plain HTTP our connections hand it to sendfile(2): the bytes go from the
    page cache to the socket without being copied through Python (a third of the
    agent's CPU in a fan-out of the bench's set). Over TLS (the kernel does not
    encrypt here) it is read and sent in ``SEND_BLOCK`` pieces.
    """

    def __init__(self, path: Path, start: int, length: int,
                 moved: Callable[[int], None] | None = None) -> None:
        self.path, self.start, self.length = path, start, length
        self.moved = moved  # told of each PROGRESS_BLOCK or SEND_BLOCK as it goes (progress bars)

    def __len__(self) -> int:
        return self.length

    def send_to(self, sock: Any) -> None:
        sent = 0
        with open(self.path, "rb") as fh:
            if _SENDFILE and type(sock) is socket.socket:
                while sent < self.length:
                    count = sock.sendfile(fh, self.start + sent, min(PROGRESS_BLOCK, self.length - sent))
                    if not count:
                        break  # the file ended early: it changed (below)
                    sent += count
                    if self.moved:
                        self.moved(count)
            else:
                for block in file_blocks(fh, self.path, self.start, self.length):
                    sock.sendall(block)
                    sent += len(block)
                    if self.moved:
                        self.moved(len(block))
        if sent != self.length:
            raise ChangedWhileSent.file(self.path, self.start, self.length, sent)


_SENDFILE = hasattr(os, "sendfile") and os.name == "posix"


class _Deadline:
    """A wall-clock limit on the request this thread makes: when it passes, the connection
    the request uses is shut down, which ends any wait on it (the request then fails, and
    ``expired`` says why). An ``Interrupt`` fired meanwhile cuts it the same way."""

    def __init__(self, seconds: float, interrupt: "Interrupt | None" = None) -> None:
        self.seconds = seconds
        self.expired = False
        self.cut = False
        self.connection: Any = None
        self.interrupt = interrupt
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        _ACTIVE.deadline = self
        self._timer.start()
        if self.interrupt is not None:
            self.interrupt.watch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self.interrupt is not None:
            self.interrupt.unwatch(self)
        _ACTIVE.deadline = None

    def watch(self, connection: Any) -> None:
        self.connection = connection
        if self.expired or self.cut:  # (it passed while connecting)
            self._shut()

    def _expire(self) -> None:
        self.expired = True
        self._shut()

    def stop(self) -> None:
        """Cut the request now (its interrupt fired)."""
        self.cut = True
        self._shut()

    def _shut(self) -> None:
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Interrupted(MirrorError):
    """A push was asked to stop before its end (``Interrupt.fire``)."""


class Interrupt:
    """Stops pushes from another thread: the agent's catch-up, when a publish wants the
    publish lock. Requests in flight are cut, as a deadline cuts them, and no more are
    sent. A secondary applies a set whole or not at all, and keeps what was uploaded
    for the next push, so the work done is not lost."""

    def __init__(self) -> None:
        self.why: str | None = None
        self._lock = threading.Lock()
        self._watched: set[_Deadline] = set()

    def fire(self, why: str) -> None:
        with self._lock:
            self.why = self.why or why
            watched = list(self._watched)
        for deadline in watched:
            deadline.stop()

    def watch(self, deadline: _Deadline) -> None:
        with self._lock:
            self._watched.add(deadline)
            fired = self.why is not None
        if fired:
            deadline.stop()

    def unwatch(self, deadline: _Deadline) -> None:
        with self._lock:
            self._watched.discard(deadline)

    def check(self, secondary: Secondary) -> None:
        """Raise ``Interrupted`` once fired."""
        if self.why is not None:
            raise Interrupted(f"push to {secondary.name} stopped: {self.why}")


_ACTIVE = threading.local()  # .deadline: the _Deadline of the request this thread is making


class _SendsFileSpans:
    """Mixed into urllib3's connections: a ``FileSpan`` block goes by ``send_to``; each
    request is watched by its thread's ``_Deadline``."""

    sock: Any

    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline = getattr(_ACTIVE, "deadline", None)
        if deadline is not None:
            deadline.watch(self)
        super().request(*args, **kwargs)  # type: ignore[misc]

    def send(self, data: Any) -> None:
        if isinstance(data, FileSpan):  # the headers went first: the socket is open
            data.send_to(self.sock)
        else:
            super().send(data)  # type: ignore[misc]


class _HTTPConnection(_SendsFileSpans, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_SendsFileSpans, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def file_blocks(fh: BinaryIO, path: Path, start: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of an open file from ``start``, in ``SEND_BLOCK`` pieces."""
    fh.seek(start)
    left = length
    while left > 0:
        block = fh.read(min(SEND_BLOCK, left))
        if not block:
            raise ChangedWhileSent.file(path, start, length, length - left)
        left -= len(block)
        yield block


def file_range(path: Path, start: int, length: int,
               moved: Callable[[int], None] | None = None) -> Body:
    """A byte range of a file as a body; ``moved`` hears of the bytes as they go."""
    return Body(length, [FileSpan(path, start, length, moved)])


def batch_body(items: list[tuple[str, Path, int]]) -> Body:
    """Many small files as one ``POST blobs`` body: frames ``<sha256> <size>\\n<bytes>``.

    Read file by file and joined into blocks of about ``SEND_BLOCK``, so memory holds
    one block, never the batch, and the socket sees few large writes.
    """
    headers = [f"{sha} {size}\n".encode() for sha, _, size in items]

    def blocks() -> Iterator[bytes]:
        pending: list[bytes] = []
        have = 0
        for head, (_, path, size) in zip(headers, items):
            pending.append(head)
            have += len(head)
            with open(path, "rb") as fh:
                for data in file_blocks(fh, path, 0, size):
                    pending.append(data)
                    have += len(data)
                    if have >= SEND_BLOCK:
                        yield b"".join(pending)
                        pending, have = [], 0
        if pending:
            yield b"".join(pending)

    return Body(sum(len(h) + size for h, (_, _, size) in zip(headers, items)), blocks())


class SecondaryClient:
    """The receiver API of one secondary, as the push agent uses it."""

    def __init__(self, secondary: Secondary, settings: Settings,
                 interrupt: Interrupt | None = None, as_master: bool = True) -> None:
        """``as_master``: a master's look or push (False: ``esmirror browse`` from anywhere)."""
        self.secondary = secondary
        self.as_master = as_master
        self.interrupt = interrupt
        self.prefix = settings.prefix
        self.base = secondary.base_url + settings.prefix
        self.signer = Signer.from_settings(settings)  # None unless shared_secret_file is set
        self.session = make_session(secondary, settings)
        self.target = ""  # the secondary's own id, from its browse answer: signatures name it

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, route: str, content_sha256: str = EMPTY_SHA256,
                 body_bytes: int | None = None, **kwargs: Any) -> Any:
        """One call; ``content_sha256`` is the body digest signed with shared_secret_file;
        ``body_bytes``, the size of a body that cannot tell it (a stream), for the deadline."""
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT, READ_TIMEOUT))
        if body_bytes is None:
            body_bytes = len(kwargs["data"]) if hasattr(kwargs.get("data"), "__len__") else 0
        limit = kwargs["timeout"][1] if route.startswith("browse") else ANSWER_DEADLINE + body_bytes / MIN_RATE
        # a receiver never redirects: following one could carry the set to another host
        kwargs["allow_redirects"] = False
        # GETs are retried here (make_session), each attempt with a fresh signature
        attempts = 1 + (RETRIES if method == "GET" else 0)
        for attempt in range(attempts):
            if attempt > 1:
                time.sleep(BACKOFF * 2 ** (attempt - 1))
            if self.interrupt is not None:
                self.interrupt.check(self.secondary)
            if self.signer is not None:
                headers = kwargs.setdefault("headers", {})
                headers.update(self.signer.headers(method, f"/{route}", content_sha256,
                                                   headers.get("Content-Range", ""), self.target))
            too_slow = RemoteError(
                f"{self.secondary.name} took more than {limit:.0f} s over {method} "
                f"{route.partition('?')[0]}: it answers (or takes the body) too slowly to be "
                "working; check that server and the network to it, then publish again",
                kind="unreachable")
            try:
                # a commit under way is let finish (within its deadline): cut, it could
                # apply there with nobody recording it
                with _Deadline(limit, None if route == "commit" else self.interrupt) as deadline:
                    response = self.session.request(method, f"{self.base}/{route}", **kwargs)
            except (requests.exceptions.RequestException, OSError) as exc:
                if deadline.cut and self.interrupt is not None:
                    self.interrupt.check(self.secondary)
                changed = _wrapped(exc, ChangedWhileSent)  # (urllib3 wraps what the body raised)
                if changed is not None:  # this master's file, not the secondary or the network
                    raise changed from None
                if deadline.expired:
                    raise too_slow from None
                if not isinstance(exc, requests.exceptions.RequestException):
                    raise
                if attempt + 1 < attempts and not _never_connected(exc) and not _timed_out(exc):
                    continue  # e.g. the answer was lost: ask again
                message = describe_connection_error(self.secondary, exc, answered=bool(self.target))
                if route == "commit" and not _never_connected(exc):
                    message += ("; the commit's answer was lost, so the set may be live there: "
                                "'esmirror status' shows what it holds")
                raise RemoteError(message, kind="tls" if _tls_failure(exc, bool(self.target)) is not None
                                  else "unreachable") from None
            if deadline.cut and self.interrupt is not None:  # (likewise)
                self.interrupt.check(self.secondary)
            if deadline.expired:  # (cut off mid-head, an answer can parse as a broken one)
                raise too_slow
            if response.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                continue
            break
        route = route.partition("?")[0]  # (messages name the route, not its query)
        if response.status_code >= 400:
            try:
                body = _error_body(response.json())
            except (ValueError, RecursionError):
                # (its page's words are cut short, never the advice after them)
                body = {"error": _not_from_esmirror(response, self.prefix), "reasons": []}
            address = body.get("address")
            if self.as_master and response.status_code == 403 and isinstance(address, str) \
                    and body["error"].startswith(f"address {address} may not use this route;"):
                # its words are for someone on that server ('on this server', and browse's 'or
                # allow_admin'): a master needs allow_push there
                body["error"] = (f"it does not let this master's address {address} push; add it to "
                                 f"allow_push in ImageServer/etc/esmirror.ini on {self.secondary.host}, "
                                 "render its web server files again and restart its receiver (unless "
                                 "another master replaced this one: then retire this one)")
            raise RemoteError(f"{self.secondary.name} answered {response.status_code} to {method} "
                              f"{route}: {body['error']}", status=response.status_code,
                              body=body)
        if response.is_redirect:
            raise RemoteError(f"{self.secondary.name} answered {method} {route} with a redirect to "
                              f"{response.headers.get('Location')!r}; esmirror does not follow "
                              "redirects: check the host, port, ssl mode and prefix", kind="bad-answer")
        try:
            return response.json()
        except (ValueError, RecursionError):
            raise RemoteError(f"{self.secondary.name} answered {method} {route} with something "
                              f"that is not JSON; is {self.base} an esmirror receiver?",
                              kind="bad-answer") from None

    def _answer(self, what: str, answer: Any) -> dict[str, Any]:
        """A JSON answer checked against what a receiver of this version sends: a wrong
        shape fails this secondary, in words, instead of a traceback later."""
        if not isinstance(answer, dict):
            raise self._unexpected(what, f"a JSON {type(answer).__name__}, not an object")
        for key, (fits, meant) in ANSWERS[what].items():
            if key in answer and not fits(answer[key]):
                raise self._unexpected(what, f"{key} = {one_line(repr(answer[key]), 60)}, not {meant}")
        return answer

    def _unexpected(self, what: str, detail: str) -> RemoteError:
        return RemoteError(f"{self.secondary.name} answered {what} with {detail}; is {self.base} an "
                           "esmirror receiver of this version?", kind="bad-answer")

    def browse(self, recorded: bool = False) -> dict[str, Any]:
        """``GET browse``; ``recorded``: a publish's look, which takes the digest the
        secondary's last commit recorded instead of a scan of its every file (its commit
        checks the set, and answers 409 if it drifted since)."""
        info = self._answer("browse", self._request("GET", "browse?digest=recorded" if recorded else "browse",
                                                    timeout=(CONNECT_TIMEOUT, BROWSE_TIMEOUT)))
        self.target = info.get("self") or ""
        return info

    def manifest(self) -> tuple[dict[str, Any], Manifest]:
        """The set the secondary holds: its answer as sent (the file list, for picking delta
        bases) and parsed, checked as any set from outside is."""
        answer = self._answer("manifest", self._request("GET", "manifest"))
        for key in ("digest", "files"):
            if key not in answer:
                raise self._unexpected("manifest", f"no {key}")
        try:
            parsed = Manifest.from_list(answer["files"])
        except MirrorError as exc:  # its words, not the master's: the set *there* is wrong
            reasons = getattr(exc, "reasons", [])[:5]
            raise self._unexpected("manifest", "; ".join([f"a set this master cannot use ({exc.message})",
                                                          *map(one_line, reasons)])) from None
        return answer, parsed

    def put_blob(self, sha: str, path: Path, size: int, part_size: int,
                 moved: Callable[[int], None] | None = None, start: int = 0) -> None:
        """One file, streamed; above ``part_size`` in parts with Content-Range. ``moved``
        hears of the bytes as they go. ``start``: the bytes of it the secondary holds from
        an upload cut short (its manifest's ``partial``): the parts resume there."""
        if not 0 < start < size and size <= part_size:
            self._request("PUT", f"blobs/{sha}", sha, data=file_range(path, 0, size, moved),
                          headers={"Content-Type": "application/octet-stream"})
            return
        start = start if 0 < start < size else 0
        resumed = start > 0
        turns = 3  # (the secondary says where to resume)
        while start < size:
            length = min(part_size, size - start)
            try:
                self._request("PUT", f"blobs/{sha}", sha, data=file_range(path, start, length, moved), headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {start}-{start + length - 1}/{size}"})
            except RemoteError as exc:
                body = exc.details.get("body") or {}
                resume = body.get("resume_from")
                if turns and exc.http_status == 409 and _whole(resume) and resume < size:
                    turns, start = turns - 1, resume  # it holds more, or less, than we thought
                    continue
                if resumed and exc.http_status == 400 and start + length == size:
                    # the whole did not hash to its name: the start kept there was of another
                    # version (or damaged), and is gone now; send the file whole, once
                    resumed, start = False, 0
                    continue
                raise
            start += length

    def post_blobs(self, items: list[tuple[str, Path, int]]) -> None:
        self._request("POST", "blobs", batch_digest((sha, size) for sha, _, size in items),
                      data=batch_body(items),
                      headers={"Content-Type": "application/x-esmirror-blobs"})

    def chunks(self, sha: str, path: str) -> dict[str, Any]:
        """The chunk list of a file the secondary holds (app/core/delta.py)."""
        # the query is part of the route so that a signature covers it as sent
        return self._answer("chunks", self._request("GET", f"chunks/{sha}?{urlencode({'path': path})}"))

    def post_delta(self, sha: str, body: Body) -> dict[str, Any]:
        # signed digest: the rebuilt file's own sha256, which the receiver verifies
        return self._request("POST", f"delta/{sha}", sha, data=body,
                             headers={"Content-Type": "application/x-esmirror-delta"})

    def post_delta_stream(self, blocks: Iterator[bytes], size: int) -> dict[str, Any]:
        """A delta made while the file (``size`` bytes) is read (delta.stream_blocks): sent
        chunked, as it comes; the answer names the sha256 the secondary stored it under."""
        return self._request("POST", "delta", data=blocks, body_bytes=size,
                             headers={"Content-Type": "application/x-esmirror-delta"})

    def commit(self, body: dict[str, Any], files: bytes | None = None) -> dict[str, Any]:
        """``POST commit``; ``files``, the set's file list already encoded as JSON, goes in as
        the body's ``files`` (LocalSet.list_json)."""
        data = json.dumps(body).encode("utf-8")
        if files is not None:  # spliced in as bytes: encoded once per publish, not per secondary
            if "files" in body:
                raise ValueError("commit: 'files' comes either in the body or as files=, not both")
            data = data[:-1] + (b", " if body else b"") + b'"files": ' + files + b"}"
        answer = self._answer("commit", self._request("POST", "commit", hashlib.sha256(data).hexdigest(),
                                                      data=data, headers={"Content-Type": "application/json"}))
        if "digest" not in answer:
            raise self._unexpected("commit", "no digest")
        return answer


MIN_PART = 1024 * 1024  # a secondary that takes less per request would need a request per KiB


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _whole_or_none(value: Any) -> bool:
    return value is None or _whole(value)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _sha(value: Any) -> bool:
    return isinstance(value, str) and bool(SHA256_RE.match(value))


def _text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _server_id(value: Any) -> bool:
    """A server's own id goes into a header when signing: printable ASCII, no spaces."""
    return isinstance(value, str) and 0 < len(value) <= 128 and value.isascii() and value.isprintable() \
        and " " not in value


# answer → field → (check, what it must be); fields a receiver may leave out are not required
ANSWERS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "browse": {
        "protocol": (_whole, "a protocol number"),
        "express_version": (_text_or_none, "text"), "platform": (_text_or_none, "text"),
        "generation": (_whole_or_none, "a generation"),
        "digest": (_text_or_none, "a digest"), "master": (_text_or_none, "a master id"),
        "self": (_server_id, "a server id"),
        "role": (lambda v: v in ("master", "secondary"), "master or secondary"),
        "warnings": (_texts, "a list of texts"), "archive_bytes": (_whole, "a byte count"),
        "max_upload_bytes": (lambda v: _whole(v) and v >= MIN_PART, f"a byte count of {MIN_PART} or more"),
        "part_bytes": (lambda v: _whole(v) and v >= MIN_PART, f"a byte count of {MIN_PART} or more"),
        "free_bytes": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a byte count"),
        "reserve_bytes": (_whole, "a byte count"),
        "free_inodes": (_whole_or_none, "a count of inodes or null"),
    },
    "manifest": {"digest": (_sha, "a SHA-256"), "files": (lambda v: isinstance(v, list), "a list"),
                 "partial": (lambda v: isinstance(v, dict) and all(_sha(k) and _whole(n) for k, n in v.items()),
                             "a map of SHA-256 to byte counts"),
                 "uploaded": (lambda v: isinstance(v, list) and all(map(_sha, v)), "a list of SHA-256s")},
    "chunks": {"chunk_size": (_whole, "a byte count"),
               "chunks": (lambda v: isinstance(v, list) and all(map(_sha, v)), "a list of SHA-256s")},
    "commit": {"generation": (_whole_or_none, "a generation"),
               "digest": (_sha, "a SHA-256"), "archive_id": (_text_or_none, "an archive id"),
               "warnings": (_texts, "a list of texts")},
}


def unforeseen(secondary: Secondary, doing: str, exc: Exception) -> str:
    """The one line for an exception nothing foresaw, so it fails one secondary, not all."""
    return (f"{secondary.name}: the {doing} stopped on {exc.__class__.__name__}: {one_line(exc)}; "
            "this is an esmirror bug, please report it")


def _error_body(body: Any) -> dict[str, Any]:
    """An error answer's JSON, kept only as far as it has the receiver's shape: ``error`` one
    line, ``reasons`` texts, ``missing`` SHA-256s; other fields as they came."""
    if not isinstance(body, dict):
        return {"error": one_line(body)}
    body = dict(body)
    body["error"] = one_line(body.get("error") or "(no error message)")
    reasons = body.get("reasons")
    body["reasons"] = [one_line(r) for r in reasons[:20]] if isinstance(reasons, list) else []
    if "missing" in body and not (isinstance(body["missing"], list) and all(map(_sha, body["missing"]))):
        del body["missing"]
    return body


def _not_from_esmirror(response: requests.Response, prefix: str) -> str:
    """An error body that is not the receiver's JSON: the web server in front answered
    (httpd's Require, IIS's ipSecurity, a proxy). Its page title, not its HTML, and what
    that answer usually means there."""
    text = response.text
    title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    summary = one_line((title.group(1) if title else text[:200]) or response.reason, 80)
    status = response.status_code
    if status == 404:
        meaning = (f"nothing is mounted at {prefix} there: compare this master's prefix with that "
                   "server's WSGIScriptAlias, ProxyPass or IIS application (esmirror check there)")
    elif status == 500:
        meaning = ("the receiver failed before it could answer: it cannot start (its settings, its "
                   "venv, var/data's owner), or was stopped while it worked (a restart of that web "
                   "server: logrotate reloads httpd daily); that web server's error log says which, "
                   "and esmirror check on that server")
    elif status in (502, 503, 504):
        meaning = ("it could not get an answer from the receiver behind it: is that running "
                   "(systemctl status esmirror-receiver, the IIS app pool)? Its log says why")
    else:
        meaning = "check that server's rules and limits for this route (esmirror deploy renders them)"
    return (f"{summary!r}: the web server (httpd, IIS, a proxy or the WSGI server) answered, not "
            f"the esmirror receiver; {meaning}")
