"""WSGI middleware: large request bodies read straight off gunicorn's socket.

gunicorn's ``wsgi.input`` passes every byte through two levels of ``BytesIO``
buffers in Python. On this project's 2-core VM, reading a 1 GiB body as fast as
it came cost 0.9–1.4 s of CPU through it and 0.1 s straight off the socket. In
a whole full push, where hashing, file creation and the commit share the CPU,
the receiver's CPU went from 1.71–1.89 s to 1.61–1.78 s (857 MB set). For a
Content-Length body of at least ``MIN_LENGTH``, this hands the app a reader of
the socket instead. When the app returns, whatever it left unread goes back to
gunicorn, so gunicorn's own draining and keep-alive work as before.

It relies on gunicorn's request objects (``Body``, ``LengthReader`` and the
unreader's ``take_buffered``), which are not a public API. Any request that does
not look exactly like that is left to gunicorn's own reader: chunked bodies,
other servers, and gunicorn versions built differently.
``tests/test_gunicorn_body.py`` fails if the installed gunicorn stops matching.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

MIN_LENGTH = 256 * 1024
# A caller silent this long mid-request is gone (a master whose network dropped leaves its
# connection half open): its worker thread is freed. waitress's channel_timeout is the same.
IDLE_TIMEOUT = 600
_RECV_MAX = 1024 * 1024
_LINE_STEP = 64 * 1024  # readline receives this much at most at a time


class SocketBody:
    """The rest of a request body, read from the connection's socket.

    ``read`` and ``readline`` behave as gunicorn's own body does: ``read(n)`` gives
    exactly ``n`` bytes unless the body ends first. A connection that fails
    mid-body (reset, timeout) reads as a body that ended early, which the
    routes already refuse with a 400.
    """

    def __init__(self, sock: Any, ahead: bytes, length: int) -> None:
        self._sock = sock
        self._buf, self._pos = ahead, 0   # body bytes received but not yet handed out
        self.left = length                # body bytes not yet handed to the app (incl. those)
        self.failed = False

    def unread(self) -> bytes:
        """What was received and not handed out (for gunicorn to take back)."""
        return self._buf[self._pos:]

    def _take(self, size: int) -> bytes:
        piece = self._buf[self._pos:self._pos + size]
        self._pos += len(piece)
        return piece

    def _refill(self, size: int) -> bool:
        """Receive up to ``size`` more body bytes into the (empty) buffer."""
        if self.failed:
            return False
        try:
            piece = self._sock.recv(min(size, _RECV_MAX))
        except OSError:
            piece = b""
        if not piece:
            self.failed = True   # where the next request starts is unknown: close
        self._buf, self._pos = piece, 0
        return bool(piece)

    def read(self, size: int | None = -1) -> bytes:
        want = self.left if size is None or size < 0 else min(size, self.left)
        pieces = [self._take(want)]
        got = len(pieces[0])
        while got < want and self._refill(want - got):
            pieces.append(self._take(want - got))
            got += len(pieces[-1])
        self.left -= got
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Body bytes straight into ``buffer`` (``recv_into``: no copy in Python, the blob
        writer hands its own buffers); 0 once the body has ended."""
        want = min(len(buffer), self.left)
        if not want:
            return 0
        if self._pos < len(self._buf):  # what was received ahead goes first
            piece = self._take(want)
            buffer[:len(piece)] = piece
            got = len(piece)
        elif self.failed:
            return 0
        else:
            try:
                got = self._sock.recv_into(buffer, want)
            except OSError:
                got = 0
            if not got:
                self.failed = True  # where the next request starts is unknown: close
                return 0
        self.left -= got
        return got

    def readline(self, size: int | None = -1) -> bytes:
        limit = self.left if size is None or size < 0 else min(size, self.left)
        pieces: list[bytes] = []
        got = 0
        while got < limit:
            if self._pos == len(self._buf) and not self._refill(min(_LINE_STEP, limit - got)):
                break
            end = self._buf.find(b"\n", self._pos, self._pos + limit - got)
            pieces.append(self._take(end + 1 - self._pos if end >= 0 else limit - got))
            got += len(pieces[-1])
            if end >= 0:
                break
        self.left -= got
        return b"".join(pieces)

    def __iter__(self) -> "SocketBody":
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def take_over(environ: dict[str, Any]) -> Callable[[], None] | None:
    """Put a ``SocketBody`` in ``environ['wsgi.input']`` if this is a large gunicorn
    Content-Length body nobody has read yet; return what gives gunicorn back the
    unread rest (None: left as it was)."""
    sock = environ.get("gunicorn.socket")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    if sock is None or length < MIN_LENGTH or environ.get("HTTP_TRANSFER_ENCODING"):
        return None
    try:
        from gunicorn.http.body import Body, LengthReader
    except ImportError:
        return None
    body = environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    unreader = getattr(reader, "unreader", None)
    if not (type(body) is Body and type(reader) is LengthReader and reader.length == length
            and body.buf.tell() == 0 and getattr(unreader, "sock", None) is sock
            and hasattr(unreader, "take_buffered") and hasattr(unreader, "unread")):
        return None
    ahead = unreader.take_buffered()
    if len(ahead) >= length:  # the whole body is already here: nothing to gain
        unreader.unread(ahead)
        return None
    direct = SocketBody(sock, ahead, length)
    environ["wsgi.input"] = direct

    def give_back() -> None:
        unreader.unread(direct.unread())
        reader.length = direct.left
        if direct.failed:
            body.failed = True
    return give_back


class GunicornBody:
    """Wraps the app: ``take_over`` before it runs, the give-back after. Under gunicorn the
    connection's reads and writes time out after IDLE_TIMEOUT: gunicorn's own reader waits
    for a body's next byte for ever (gthread sets the socket back to blocking for each
    request, so this lasts one request)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        if sock is not None and hasattr(sock, "settimeout"):
            sock.settimeout(IDLE_TIMEOUT)
        give_back = take_over(environ)
        try:
            return self.app(environ, start_response)
        finally:
            if give_back is not None:
                give_back()
