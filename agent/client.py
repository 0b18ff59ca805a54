"""HTTP to one secondary: a requests Session with the TLS mode of SPEC §1, timeouts, GET-only retries."""
from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from app.core.errors import ConfigError, RemoteError
from app.core.express import Secondary
from app.core.settings import Settings

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 600.0  # a commit of a large set may spend minutes staging and flushing
SEND_BLOCK = 1024 * 1024


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


def make_session(secondary: Secondary, settings: Settings, retries: int = 3) -> requests.Session:
    session = requests.Session()
    # The environment (REQUESTS_CA_BUNDLE, proxies, .netrc) must not change what
    # "strict" trusts or where pushes go.
    session.trust_env = False
    session.verify = tls_verify(secondary, settings)
    if session.verify is False:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                  backoff_factor=0.3, allowed_methods=frozenset({"GET"}),
                  status_forcelist=(502, 503, 504), raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "esmirror"
    return session


def describe_connection_error(secondary: Secondary, exc: Exception) -> str:
    """Plain words for TLS and network failures."""
    text = str(exc)
    reason = None
    for candidate in _chain(exc):
        if isinstance(candidate, ssl.SSLCertVerificationError):
            reason = candidate.verify_message or str(candidate)
            break
    if reason or isinstance(exc, requests.exceptions.SSLError):
        reason = reason or text
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
            why = "it does not speak HTTPS on that port (is ssl set right?)"
        else:
            why = reason
        return f"TLS to {secondary.name} failed: {why}"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"{secondary.name} did not answer in time"
    if "refused" in text.lower():
        return f"cannot connect to {secondary.name}: connection refused (is esmirror running there?)"
    if "Name or service not known" in text or "getaddrinfo" in text:
        return f"cannot resolve the host name {secondary.host}"
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


class FileRange:
    """A byte range of a file, readable as a request body with a known length."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        self.fh = open(path, "rb")
        self.fh.seek(start)
        self.remaining = self.len = length

    def __len__(self) -> int:
        return self.len

    def read(self, size: int = -1) -> bytes:
        size = self.remaining if size < 0 else min(size, self.remaining)
        data = self.fh.read(size) if size else b""
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()


class BatchBody:
    """Many small files as one ``POST blobs`` body: frames ``<sha256> <size>\\n<bytes>``.

    Read lazily, file by file, so memory holds one block, never the batch.
    """

    def __init__(self, items: list[tuple[str, Path, int]]) -> None:
        self.items = items
        self.len = sum(len(self._header(sha, size)) + size for sha, _, size in items)
        self._queue = list(items)
        self._current: BinaryIO | None = None
        self._pending = b""

    @staticmethod
    def _header(sha: str, size: int) -> bytes:
        return f"{sha} {size}\n".encode()

    def __len__(self) -> int:
        return self.len

    def read(self, size: int = -1) -> bytes:
        want = size if size > 0 else SEND_BLOCK
        out = [self._pending]
        have = len(self._pending)
        self._pending = b""
        while have < want:
            if self._current is None:
                if not self._queue:
                    break
                sha, path, fsize = self._queue.pop(0)
                self._current = open(path, "rb")
                out.append(self._header(sha, fsize))
                have += len(out[-1])
                continue
            chunk = self._current.read(want - have)
            if not chunk:
                self._current.close()
                self._current = None
                continue
            out.append(chunk)
            have += len(chunk)
        data = b"".join(out)
        if len(data) > want:
            data, self._pending = data[:want], data[want:]
        return data

    def close(self) -> None:
        if self._current:
            self._current.close()


class SecondaryClient:
    """The receiver API of one secondary, as the push agent uses it."""

    def __init__(self, secondary: Secondary, settings: Settings) -> None:
        self.secondary = secondary
        self.base = secondary.base_url + settings.prefix
        self.session = make_session(secondary, settings)

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, route: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT, READ_TIMEOUT))
        try:
            response = self.session.request(method, f"{self.base}/{route}", **kwargs)
        except requests.exceptions.RequestException as exc:
            raise RemoteError(describe_connection_error(self.secondary, exc), kind="unreachable") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": response.text[:300].strip() or response.reason}
            if not isinstance(body, dict):
                body = {"error": str(body)[:300]}
            raise RemoteError(f"{self.secondary.name} answered {response.status_code} to {method} "
                              f"{route}: {body.get('error', '')}", status=response.status_code,
                              body=body)
        try:
            return response.json()
        except ValueError:
            raise RemoteError(f"{self.secondary.name} answered {method} {route} with something "
                              f"that is not JSON; is {self.base} an esmirror receiver?") from None

    def browse(self) -> dict[str, Any]:
        return self._request("GET", "browse")

    def manifest(self) -> dict[str, Any]:
        return self._request("GET", "manifest")

    def put_blob(self, sha: str, path: Path, size: int, part_size: int) -> None:
        """One file, streamed; above ``part_size`` in parts with Content-Range."""
        if size <= part_size:
            with open(path, "rb") as fh:
                self._request("PUT", f"blobs/{sha}", data=fh,
                              headers={"Content-Type": "application/octet-stream"})
            return
        start = 0
        while start < size:
            length = min(part_size, size - start)
            body = FileRange(path, start, length)
            try:
                self._request("PUT", f"blobs/{sha}", data=body, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {start}-{start + length - 1}/{size}"})
            finally:
                body.close()
            start += length

    def post_blobs(self, items: list[tuple[str, Path, int]]) -> None:
        body = BatchBody(items)
        try:
            self._request("POST", "blobs", data=body,
                          headers={"Content-Type": "application/x-esmirror-blobs"})
        finally:
            body.close()

    def commit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "commit", json=body)
