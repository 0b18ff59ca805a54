"""Admin routes (SPEC §5): archive management, publish requests and this server's status."""
from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, current_app, jsonify, render_template, request

from .core.apply import WorkingDir
from .core.audit import audit, now_iso
from .core.errors import BadRequest, Forbidden, LengthRequired, untrusted_json
from .core.ledger import agent_pulse
from .core.publishes import PublishQueue, parse_options, request_targets
from .core.settings import Settings
from .core.server import server_status

bp = Blueprint("admin", __name__)
STATUS_REFRESH_SECONDS = 10


def _workdir() -> WorkingDir:
    return current_app.extensions["esmirror.workdir"]


@bp.before_request
def _not_from_another_site() -> None:
    """The admin routes that change things are for the CLI and scripts. A page on another
    site, open in a browser on an admin's machine, could send them too (CSRF): browsers
    say where such a request comes from (Sec-Fetch-Site, Origin), and those are refused.
    A publish body must also be declared JSON, which a cross-site form or text post cannot
    do without the browser asking first."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    from urllib.parse import urlsplit

    site = request.headers.get("Sec-Fetch-Site", "")
    origin = request.headers.get("Origin", "")
    if site in ("cross-site", "same-site") or (origin and urlsplit(origin).netloc != request.host):
        raise Forbidden(f"{request.method} {request.path} sent by a web page of another site "
                        f"({origin or site}) is refused; send it from a script or the esmirror CLI")
    if request.endpoint == "admin.publish_request" and request.content_length \
            and request.mimetype != "application/json":
        raise BadRequest("send the publish request as JSON (Content-Type: application/json)")


@bp.get("/archive")
def archive_list():  # type: ignore[no-untyped-def]
    return jsonify({"archive": _workdir().archives()})


@bp.delete("/archive")
def archive_clear():  # type: ignore[no-untyped-def]
    args = request.args
    try:
        keep = int(args["keep"]) if "keep" in args else None
        older = float(args["older_than"]) if "older_than" in args else None
    except ValueError:
        raise BadRequest("keep and older_than must be numbers") from None
    if (keep is not None and keep < 0) or (older is not None and not 0 <= older < math.inf):
        raise BadRequest("keep and older_than must be 0 or more (older_than in days)")
    everything = args.get("all") in ("1", "true", "yes")
    if keep is None and older is None and not everything:
        raise BadRequest("say what to clear: ?keep=N, ?older_than=DAYS or ?all=1")
    if everything and (keep is not None or older is not None):
        raise BadRequest("all=1 removes every entry: give it alone, or keep/older_than without it")
    cleared = _workdir().clear_archive(keep, older, everything, request.environ.get("esmirror.client"))
    return jsonify({"removed": cleared.removed, "uploads_dropped": cleared.uploads,
                    "upload_bytes": cleared.upload_bytes})


@bp.post("/archive/<archive_id>/restore")
def archive_restore(archive_id: str):  # type: ignore[no-untyped-def]
    """The same as ``esmirror archive restore ID`` on this server."""
    return jsonify(_workdir().restore(archive_id, request.environ.get("esmirror.client")).to_json())


# --- publish, status (issue 6) ----------------------------------------------------
# The web app never pushes: POST publish leaves a request in the queue on disk
# and the agent (`esmirror agent`) runs it. Both read the same files.

def _settings() -> Settings:
    return current_app.config["SETTINGS"]


@bp.post("/publish")
def publish_request():  # type: ignore[no-untyped-def]
    settings = _settings()
    if request.content_length is None and "Transfer-Encoding" in request.headers:
        # a server that passes chunked bodies on uncounted (gunicorn) would show an empty
        # body here: a publish to every secondary instead of the ones the body names
        raise LengthRequired("send the publish request with a Content-Length header; chunked "
                             "bodies are not accepted")
    body = request.get_data(cache=False, as_text=False) if request.content_length else b""
    if len(body) > 64 * 1024:
        raise BadRequest("a publish request is a small JSON object; this body is too large")
    data = untrusted_json(body, "the publish body is not JSON; send {} or {\"secondaries\": [...], "
                          "\"canary\": ..., \"max_parallel\": N, \"stop_on_failure\": true}") \
        if body.strip() else {}
    options = parse_options(data)
    targets, _ = request_targets(settings, options)
    caller = request.environ.get("esmirror.client")
    record = PublishQueue(settings).submit(options, caller, [t.name for t in targets])
    audit(settings, "publish-request", caller=caller, master=_workdir().self_id, generation=None,
          files=None, outcome="queued", id=record["id"])
    pulse = agent_pulse(settings)
    answer = {"id": record["id"], "state": record["state"],
              "url": f"{request.script_root}/publish/{record['id']}", "agent": pulse}
    if not pulse["running"]:
        answer["warning"] = ("no esmirror agent is running on this master: the request waits in the "
                             "queue until one starts (esmirror agent, or its service)")
    return jsonify(answer), 202


@bp.get("/publish/<request_id>")
def publish_progress(request_id: str):  # type: ignore[no-untyped-def]
    return jsonify(PublishQueue(_settings()).get(request_id))


def _status() -> dict[str, Any]:
    return server_status(_settings(), _workdir(), current_app.extensions.get("esmirror.files_stamp"))


@bp.get("/status")
def status_json():  # type: ignore[no-untyped-def]
    return jsonify(_status())


@bp.get("/")
def status_page():  # type: ignore[no-untyped-def]
    status = _status()
    html = render_template("status.html", status=status, refresh=STATUS_REFRESH_SECONDS,
                           server=request.host, now=now_iso())
    return html, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}
