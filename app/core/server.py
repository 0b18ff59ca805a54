"""What this server tells about itself: ``browse``'s identity and ``GET status``.

Both views (app/peer.py, app/admin.py) answer with what these build; the master's own
fleet view is ``ledger.fleet_status``.
"""
from __future__ import annotations

import os
from typing import Any

from . import PROTOCOL, __version__
from .apply import WorkingDir, left_alone
from .catalogs import CATALOGS_XML, validate_catalogs_file
from .express import express_version, master_role, platform_tag
from .ledger import fleet_status
from .manifest import name_encoding_note
from .settings import PLATFORM_HANDLER_MAX_BODY, Settings
from .room import free_inodes, read_only, read_only_note, room


def upload_limit(settings: Settings, under_iis: bool | None = None) -> int:
    """The largest body this receiver takes: max_upload_bytes, or less behind IIS (where
    HttpPlatformHandler, which started it, set HTTP_PLATFORM_PORT; ``under_iis`` says so
    for another process). The master sends nothing larger than browse's max_upload_bytes."""
    if under_iis or (under_iis is None and os.environ.get("HTTP_PLATFORM_PORT")):
        return min(settings.max_upload_bytes, PLATFORM_HANDLER_MAX_BODY)
    return settings.max_upload_bytes


def settings_changed(settings: Settings, read_stamp: Any) -> list[str]:
    """A warning when esmirror.ini or the secret changed since the receiver read them
    (``read_stamp``: ``settings.files_stamp()`` when it did)."""
    if settings.files_stamp() == read_stamp:
        return []
    changed = (f"{settings.ini_path} (or its shared_secret_file) changed since this receiver started, "
               "and it still runs with what it read then (allow_push, archive_keep, the secret…)")
    from .errors import ConfigError
    from .settings import load_settings
    from .signing import read_secret

    try:  # (a restart with a file that no longer loads would leave it answering only 503)
        read_secret(load_settings(settings.install_dir))
    except ConfigError as exc:
        return [f"{changed}; and it no longer loads: {exc.message}. Fix that before restarting it"]
    return [f"{changed}: restart it to use the change (apachectl graceful, systemctl restart "
            "esmirror-receiver, or recycle the IIS site)"]


def identity(settings: Settings, workdir: WorkingDir, read_stamp: Any,
             recorded: bool = False) -> dict[str, Any]:
    """What ``browse`` tells. ``recorded``: the digest the last commit recorded will do, with
    no scan of every file (a publish's first look: its commit checks the set itself, under
    the lock, and answers 409 when it drifted); ``drift`` and the scan's warnings are then
    unknown (None, left out)."""
    state = workdir.state()
    current = None if recorded and state.get("digest") else workdir.scan()
    warnings = [] if current is None else list(current.warnings) + left_alone(current)
    if read_only(settings.data_dir):
        warnings.append(read_only_note(settings.data_dir))
    warnings += settings_changed(settings, read_stamp)
    if (note := name_encoding_note()) is not None:
        warnings.append(note)
    is_master, broken = master_role(settings.iserv_cfg)  # (one reading: browse answers often)
    if broken is not None:
        warnings.append(broken)
    free, reserve = room(workdir.state_dir)
    catalogs = settings.data_dir / CATALOGS_XML
    if catalogs.is_file():
        warnings += validate_catalogs_file(catalogs).unreadable_paths()
    return {
        "esmirror_version": __version__,
        "protocol": PROTOCOL,
        "express_version": express_version(settings),
        "platform": platform_tag(),
        "generation": state.get("generation"),
        "digest": state["digest"] if current is None else current.manifest.digest,
        "master": state.get("master"),
        "applied_at": state.get("applied_at"),
        "restored_from": state.get("restored_from"),  # the set is an admin's restore of that entry
        "self": workdir.self_id,
        # a master (its iserv-cfg.xml lists Mirrors) takes no pushes: a master pushing here
        # is one whose secondary was promoted while it was down
        "role": "master" if is_master else "secondary",
        "drift": None if current is None
        else bool(state.get("digest")) and state.get("digest") != current.manifest.digest,
        "warnings": warnings,
        "archive_bytes": sum(entry["bytes"] for entry in workdir.archives()),
        "max_upload_bytes": upload_limit(settings),
        "free_bytes": free,        # the agent checks a whole push fits before sending a byte
        "reserve_bytes": reserve,
        "free_inodes": free_inodes(workdir.state_dir),  # each new file takes one
    }


def server_status(settings: Settings, workdir: WorkingDir, read_stamp: Any) -> dict[str, Any]:
    """``GET status``: a master's fleet (from its ledger), or, on a secondary, the top level
    about this server, as a monitoring check reads it (ok, generation, detail)."""
    status = fleet_status(settings)
    if status["role"] != "secondary":
        return status
    me = identity(settings, workdir, read_stamp)
    generation = me["generation"]
    stuck = read_only(settings.data_dir)
    if stuck:
        detail = read_only_note(settings.data_dir)
    elif generation is None:
        detail = "no master has pushed a set to this server yet"
    elif me["drift"]:
        detail = (f"files were changed by hand since generation {generation} was applied; "
                  "the master's next publish repairs them")
    else:
        detail = f"holds generation {generation} from master {me['master'] or '(released)'}"
    status.update(ok=generation is not None and me["drift"] is False and not stuck, detail=detail,
                  generation=generation, digest=me["digest"], master=me["master"],
                  drift=me["drift"], applied_at=me["applied_at"], self=me)
    # a master's fields: on a secondary they would read as "no agent runs" to a check
    for field in ("published_at", "agent", "publishing"):
        del status[field]
    return status
