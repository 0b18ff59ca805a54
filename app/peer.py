"""Push routes (SPEC §5): browse, manifest, blobs, commit. Thin: parse, call the core, answer."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from .core.apply import WorkingDir, commit_limit
from .core.delta import CHUNK_SIZE, ChunkIndex
from .core.errors import BadRequest, LengthRequired, NotFound, TooLarge, Unauthorized, untrusted_json
from .core.manifest import path_problem
from .core.room import check_room
from .core.server import identity, settings_changed
from .core.settings import Settings
from .core.signing import Verifier, batch_digest
from .core.store import check_sha

bp = Blueprint("peer", __name__)
_RANGE_RE = re.compile(r"^bytes (\d{1,20})-(\d{1,20})/(\d{1,20})$")


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


def _workdir() -> WorkingDir:
    return current_app.extensions["esmirror.workdir"]


def _body_length(limit: int, setting: str = "max_upload_bytes") -> int:
    """The declared body length, refused before a byte is read when too large."""
    length = request.content_length
    if length is None:
        raise LengthRequired("send a Content-Length header; chunked bodies are not accepted")
    if length > limit:
        raise TooLarge(f"body of {length} bytes is over this server's limit of {limit} bytes "
                       f"({setting})", limit=limit)
    return length


def _room_for(length: int) -> None:
    workdir = _workdir()
    workdir.state_dir.mkdir(parents=True, exist_ok=True)
    check_room(workdir.state_dir, length, "this upload")


def commit_json(body: bytes) -> Any:
    """The commit body as JSON (its shape is CommitRequest.from_json's business); else 400."""
    return untrusted_json(body, "the commit body is not JSON; send {generation, master, base, files}")


@bp.before_request
def _verify_signature() -> None:
    """With shared_secret_file set, every push route needs a good signature (401 otherwise).

    Only headers are checked here; each view matches the body to the signed digest.
    """
    verifier: Verifier | None = current_app.extensions.get("esmirror.verifier")
    if verifier is None:
        return
    query = request.query_string.decode("latin-1")
    signed = verifier.verify(request.method, request.path + (f"?{query}" if query else ""),
                             request.headers, request.headers.get("Content-Range", ""))
    g.esmirror_signed_content = signed
    # a blob or a delta is verified against its name while it streams: the name is its digest
    if request.endpoint in ("peer.put_blob", "peer.post_delta") \
            and signed != (request.view_args or {}).get("sha"):
        raise Unauthorized(f"the signed digest of {request.method} {request.path} must be the "
                           "sha256 in its name")


def _signed_content() -> str | None:
    return g.get("esmirror_signed_content")


def _read_stamp() -> Any:
    return current_app.extensions.get("esmirror.files_stamp")


# waitress (the embedded server, and the one IIS runs) writes a request's whole body to
# a temp file before the app reads it, and the app then stores it: on one disk an upload
# needs twice its size (5 GiB: 7.9 GiB at the peak against 5.0 under gunicorn). Told
# this, the master sends a large file in parts of this size, so the extra is one part.
SPOOLED_PART_BYTES = 256 * 1024**2


@bp.get("/browse")
def browse():  # type: ignore[no-untyped-def]
    info = identity(_settings(), _workdir(), _read_stamp(), recorded=request.args.get("digest") == "recorded")
    # whether allow_push names the caller, as this server sees it (a master's look warns)
    info["caller"] = request.environ.get("esmirror.client")
    info["caller_may_push"] = bool(request.environ.get("esmirror.may_push"))
    if "waitress.client_disconnected" in request.environ:  # (waitress names its server "esmirror")
        info["part_bytes"] = min(SPOOLED_PART_BYTES, info["max_upload_bytes"])
    return jsonify(info)


@bp.get("/manifest")
def manifest():  # type: ignore[no-untyped-def]
    workdir = _workdir()
    current = workdir.scan().manifest
    return jsonify({"generation": workdir.state().get("generation"), "digest": current.digest,
                    "files": current.to_list(),
                    # blobs of a push cut short: the next push need not send them again,
                    "uploaded": workdir.store.uploaded(),
                    # and how much of each large file sent in parts arrived: it resumes there
                    "partial": workdir.store.partials()})


@bp.put("/blobs/<sha>")
def put_blob(sha: str):  # type: ignore[no-untyped-def]
    length = _body_length(_settings().max_upload_bytes)
    content_range = request.headers.get("Content-Range")
    store = _workdir().store
    if content_range is None:
        _room_for(length)
        store.put(sha, request.stream, length)
        return jsonify({"sha256": sha, "size": length, "complete": True}), 201
    match = _RANGE_RE.match(content_range)
    if not match:
        raise BadRequest("Content-Range must be 'bytes START-END/TOTAL'")
    start, end, total = map(int, match.groups())
    if end - start + 1 != length:
        raise BadRequest(f"Content-Range covers {end - start + 1} bytes but the body has {length}")
    _room_for(total - start)
    complete = store.put_part(sha, request.stream, start, length, total)
    return jsonify({"sha256": sha, "received": end + 1, "complete": complete}), 201 if complete else 202


@bp.post("/blobs")
def post_blobs():  # type: ignore[no-untyped-def]
    length = _body_length(_settings().max_upload_bytes)
    _room_for(length)
    signed = _signed_content()
    check = None if signed is None else (
        lambda frames: Verifier.check_body(signed, batch_digest(frames), "the batch's frame list"))
    stored = _workdir().store.put_batch(request.stream, length, check)
    return jsonify({"stored": stored}), 201


def _find_content(sha: str, rel: str) -> Path | None:
    """A file here that should hold ``sha``: the named one in the working dir, or a blob.

    Never trusted for content: chunk lists are checked against ``sha`` when computed and
    a delta rebuilt from it must hash to its own name.
    """
    workdir = _workdir()
    if rel and path_problem(rel) is None:
        candidate = workdir.data_dir / rel
        root = workdir.data_dir.resolve()
        if candidate.is_file() and not candidate.is_symlink() and \
                candidate.resolve().is_relative_to(root):
            return candidate
    return workdir.store.path(sha) if workdir.store.has(sha) else None


@bp.get("/chunks/<sha>")
def chunks(sha: str):  # type: ignore[no-untyped-def]
    check_sha(sha)
    rel = request.args.get("path", "")
    found = _find_content(sha, rel)
    listing = ChunkIndex(_workdir().state_dir).get(sha, found) if found else None
    if listing is None:
        raise NotFound(f"no file with content {sha[:12]}… at {rel or 'any path'} on this server")
    return jsonify({"sha256": sha, "chunk_size": CHUNK_SIZE, "chunks": listing})


@bp.post("/delta/<sha>")
def post_delta(sha: str):  # type: ignore[no-untyped-def]
    length = _body_length(_settings().max_upload_bytes)
    _room_for(length)
    _, size = _workdir().store.put_delta(sha, request.stream, length, _find_content)
    return jsonify({"sha256": sha, "size": size, "complete": True}), 201


class _ChunkedInput:
    """A chunked body as the server passes it on, held to ``max_upload_bytes`` like any
    other body (waitress counts a chunked body itself, gunicorn does not): the master
    then sends the file the ordinary way, in parts. A body cut off or badly chunked (the
    master stopped mid-stream) is the server's own exception (gunicorn's NoMoreData, an
    OSError, or its chunk parser's InvalidChunkSize and kin, which are not); here it
    becomes a 400, not a 500 with a traceback in the log."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream, self._limit, self._read = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        return self._guarded(self._stream.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._guarded(self._stream.readline, size)

    def _guarded(self, method: Any, size: int) -> bytes:
        try:
            data: bytes = method(size)
        except Exception as exc:  # whatever the server raises reading a body: the body is bad
            raise BadRequest(f"the streamed body broke off ({exc.__class__.__name__}); nothing "
                             "was kept") from None
        self._read += len(data)
        if self._read > self._limit:
            raise TooLarge(f"streamed body over this server's limit of {self._limit} bytes "
                           "(max_upload_bytes); nothing was kept", limit=self._limit)
        return data


@bp.post("/delta")
def post_delta_stream():  # type: ignore[no-untyped-def]
    """A delta streamed while the master still reads the file (app/core/delta.py)."""
    if _signed_content() is not None:
        raise Unauthorized("a streamed delta carries no signable digest; a signing master sends "
                           "POST delta/<sha256>")
    length = request.content_length  # a server that de-chunks first (waitress) counts it
    if length is None and not request.environ.get("wsgi.input_terminated"):
        raise LengthRequired("this web server does not pass chunked request bodies on; the master "
                             "sends the delta with a length instead")
    if length is not None:
        _body_length(_settings().max_upload_bytes)
    chunked = _ChunkedInput(request.stream, _settings().max_upload_bytes)
    sha, size = _workdir().store.put_delta(None, chunked, None, _find_content)  # type: ignore[arg-type]
    return jsonify({"sha256": sha, "size": size, "complete": True}), 201


@bp.post("/commit")
def commit():  # type: ignore[no-untyped-def]
    limit, setting = commit_limit(_settings().max_upload_bytes)
    length = _body_length(limit, setting)
    body = request.get_data(cache=False) if length else b""
    if _signed_content() is not None:
        Verifier.check_body(_signed_content(), hashlib.sha256(body).hexdigest(), "the commit body")
    result = _workdir().commit_from(commit_json(body), request.environ.get("esmirror.client"))
    result.warnings += settings_changed(_settings(), _read_stamp())
    return jsonify(result.to_json())
