"""Signed pushes (SPEC §3 ``shared_secret_file``): an HMAC on every push request, replay-proof.

The master signs, the secondary verifies, both with the same secret file. The
signature is HMAC-SHA256 over (scheme, method, route path under the prefix,
Content-Range, body digest, timestamp, nonce, target). The target is the
secondary's own id (``self`` in its browse answer), so a request signed for one
secondary is refused by every other, though all share the secret; only the first
``GET browse``, sent before the master knows the id, goes without one. The body digest never needs the
body in memory or read twice:

- ``POST commit`` (and any other body): SHA-256 of the body bytes;
- ``PUT blobs/<sha256>``: the blob's own SHA-256, i.e. its name (also for one
  part of a large blob); the store already verifies the bytes against that name
  while streaming them, so a signed name covers every byte;
- ``POST blobs``: SHA-256 of the batch's frame headers (``<sha256> <size>\\n`` each,
  in order); every frame's bytes are verified against its header's hash, and the
  whole batch is refused before any blob is kept if the headers differ;
- requests without a body (``GET``): SHA-256 of nothing.

The receiver refuses a timestamp more than ``WINDOW`` seconds from its clock and
a nonce it has seen; nonces are files in ``.esmirror/nonces/`` (created
exclusively, so every gunicorn worker and process sees them) kept for three
windows, longer than any timestamp they could be replayed with.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .errors import ConfigError, Unauthorized
from .settings import Settings

SCHEME = "esmirror-hmac-sha256-v2"
WINDOW = 300  # seconds of clock difference tolerated between master and secondary
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
H_SIGNATURE = "X-Esmirror-Signature"
H_TIMESTAMP = "X-Esmirror-Timestamp"
H_NONCE = "X-Esmirror-Nonce"
H_CONTENT = "X-Esmirror-Content-SHA256"
H_TARGET = "X-Esmirror-Target"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_PRUNE_EVERY = 60.0


def read_secret(settings: Settings) -> bytes | None:
    """The shared secret, or None when signing is off. A bad file is a configuration error:
    signing must never be silently off because the file could not be read."""
    path = settings.secret_path()
    if path is None:
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or /dev/zero would hang the read
            raise ConfigError(f"shared_secret_file {path} is not a regular file; point it at the "
                              f"secret file in {settings.ini_path}")
        with open(path, "rb") as fh:
            secret = fh.read(MAX_SECRET_BYTES + 1).strip()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"shared_secret_file {path}: cannot read it "
                          f"({getattr(exc, 'strerror', None) or exc}); fix the path in "
                          f"{settings.ini_path} or the file's permissions") from None
    if len(secret) > MAX_SECRET_BYTES:
        raise ConfigError(f"shared_secret_file {path} holds more than {MAX_SECRET_BYTES} bytes; a "
                          "secret is a short random string (e.g. 'openssl rand -hex 32')")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"shared_secret_file {path} holds {len(secret)} bytes; use at least "
                          f"{MIN_SECRET_BYTES} random bytes (e.g. 'openssl rand -hex 32'), the same "
                          "file on the master and every secondary")
    return secret


def canonical(method: str, path: str, content_range: str, content_sha256: str,
              timestamp: str, nonce: str, target: str) -> bytes:
    """The exact bytes both sides sign: one field a line."""
    return "\n".join([SCHEME, method.upper(), path, content_range, content_sha256,
                      timestamp, nonce, target]).encode("utf-8")


def batch_digest(frames: Iterable[tuple[str, int]]) -> str:
    """The signed body digest of a ``POST blobs`` batch: SHA-256 of its frame headers."""
    hasher = hashlib.sha256()
    for sha, size in frames:
        hasher.update(f"{sha} {size}\n".encode("ascii"))
    return hasher.hexdigest()


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class Signer:
    """Master side: the headers that sign one request."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> "Signer | None":
        secret = read_secret(settings)
        return cls(secret) if secret else None

    def headers(self, method: str, path: str, content_sha256: str = EMPTY_SHA256,
                content_range: str = "", target: str = "") -> dict[str, str]:
        """``target``: the secondary's own id ('' only for the first browse)."""
        timestamp = str(int(self.clock()))
        nonce = secrets.token_hex(16)
        mac = _mac(self.secret, canonical(method, path, content_range, content_sha256,
                                          timestamp, nonce, target))
        return {H_TIMESTAMP: timestamp, H_NONCE: nonce, H_CONTENT: content_sha256,
                H_TARGET: target, H_SIGNATURE: mac}


class NonceStore:
    """Nonces already used, one empty file each, shared by every process of this server."""

    def __init__(self, folder: Path, keep: float) -> None:
        self.folder = folder
        self.keep = keep

    def claim(self, nonce: str, now: float) -> bool:
        """True the first time ``nonce`` is seen, False ever after (within ``keep``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prune_now_and_then(now)
        try:
            fd = os.open(self.folder / nonce, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def _prune_now_and_then(self, now: float) -> None:
        marker = self.folder / ".pruned"  # holds when the last prune ran, by this clock
        try:
            last = float(marker.read_text(encoding="ascii") or 0)
        except (OSError, ValueError):
            last = 0.0
        if 0 <= now - last < _PRUNE_EVERY:
            return
        marker.write_text(repr(now), encoding="ascii")
        # the nonces by the clock that dates them, the marker's just now (a share's server
        # may be off this one's): by this machine's, 15 minutes ahead dropped every nonce,
        # and replays got in
        limit = marker.stat().st_mtime - self.keep
        for entry in os.scandir(self.folder):
            try:
                if entry.name != ".pruned" and entry.stat().st_mtime < limit:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


class Verifier:
    """Secondary side: checks the signature headers of one request before its body is read."""

    def __init__(self, secret: bytes, nonce_dir: Path, own_id: str, window: float = WINDOW,
                 clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.own_id = own_id
        self.window = window
        self.clock = clock
        self.nonces = NonceStore(nonce_dir, keep=3 * window)

    @classmethod
    def from_settings(cls, settings: Settings, own_id: str) -> "Verifier | None":
        secret = read_secret(settings)
        return cls(secret, settings.state_dir / "nonces", own_id) if secret else None

    def verify(self, method: str, path: str, headers: Mapping[str, str],
               content_range: str = "") -> str:
        """Check signature, time and nonce; return the signed body digest for the caller to match.

        Raises :class:`Unauthorized` (401) with what is wrong and what to do.
        """
        signature = headers.get(H_SIGNATURE)
        timestamp = headers.get(H_TIMESTAMP)
        nonce = headers.get(H_NONCE)
        content = headers.get(H_CONTENT)
        target = headers.get(H_TARGET)
        if not signature:
            raise Unauthorized("this server accepts only signed pushes (shared_secret_file is set "
                               "here) and the request carries no signature; set shared_secret_file "
                               "on the master to the same secret file")
        if not (timestamp and timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise Unauthorized(f"{H_TIMESTAMP} must be the signing time in whole seconds since 1970")
        if not (nonce and _NONCE.match(nonce)):
            raise Unauthorized(f"{H_NONCE} must be 32 lowercase hex digits")
        if not (content and _HEX64.match(content)):
            raise Unauthorized(f"{H_CONTENT} must be a SHA-256 (64 lowercase hex digits)")
        if target is None:
            raise Unauthorized(f"the signature names no target ({H_TARGET}): the master runs an "
                               "older esmirror; install the same esmirror version on both")
        first_browse = method in ("GET", "HEAD") and path.partition("?")[0] == "/browse"
        if target != self.own_id and not (target == "" and first_browse):
            raise Unauthorized(f"this request was signed for another server ({target or 'none'}), "
                               f"not this one ({self.own_id}): a request replayed from elsewhere, "
                               "or a master that skipped browse; nothing was changed")
        expected = _mac(self.secret, canonical(method, path, content_range, content,
                                               timestamp, nonce, target))
        given = signature.strip().lower()
        if not given.isascii() or not hmac.compare_digest(expected, given):
            raise Unauthorized("bad signature: the master's shared_secret_file is not the same as "
                               "this server's, or the request was altered on the way")
        now = self.clock()
        skew = int(timestamp) - now
        if abs(skew) > self.window:
            raise Unauthorized(f"the request was signed {abs(skew):.0f} s "
                               f"{'ahead of' if skew > 0 else 'behind'} this server's clock "
                               f"(at most {self.window:.0f} s allowed): a replay, or a clock to "
                               "set right (NTP) on the master or this server")
        if not self.nonces.claim(nonce, now):
            raise Unauthorized("replayed request: this signed request was already received once")
        return content

    @staticmethod
    def check_body(signed: str, actual: str, what: str = "the body") -> None:
        if not hmac.compare_digest(signed, actual):
            raise Unauthorized(f"{what} does not match the digest the master signed; "
                               "it was altered on the way, nothing was changed")
