"""Admin routes (SPEC §5): archive management and this server's status."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from .core.apply import WorkingDir
from .core.errors import BadRequest

bp = Blueprint("admin", __name__)


def _workdir() -> WorkingDir:
    return current_app.extensions["esmirror.workdir"]


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
    everything = args.get("all") in ("1", "true", "yes")
    if keep is None and older is None and not everything:
        raise BadRequest("say what to clear: ?keep=N, ?older_than=DAYS or ?all=1")
    workdir = _workdir()
    with workdir.lock():
        removed = workdir.clear_archive(keep, older, everything)
    return jsonify({"removed": removed})


@bp.post("/archive/<archive_id>/restore")
def archive_restore(archive_id: str):  # type: ignore[no-untyped-def]
    """The same as ``esmirror archive restore ID`` on this server."""
    return jsonify(_workdir().restore(archive_id).to_json())
