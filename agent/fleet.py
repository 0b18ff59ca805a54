"""Publish on the master: validate, reload, scan, then push to every secondary in parallel."""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Any, Callable

import filelock

from app.core.apply import run_reload
from app.core.catalogs import CATALOGS_XML, validate_catalogs_file
from app.core.errors import ConfigError, InvalidSet, MirrorError
from app.core.express import Secondary, express_version, platform_tag, read_mirrors
from app.core.manifest import HashCache, scan
from app.core.settings import Settings
from app.core.state import read_json, stable_id, write_json

from .push import LocalSet, PushResult, push


class PublishFailed(MirrorError):
    """The master's own set or reload stops the publish before anything is sent (exit 1)."""


@dataclass
class PublishReport:
    generation: int
    digest: str
    files: int
    bytes: int
    secondaries: list[PushResult]
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.secondaries)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "generation": self.generation, "digest": self.digest,
                "files": self.files, "bytes": self.bytes, "warnings": self.warnings,
                "secondaries": [r.to_json() for r in self.secondaries]}


def master_identity(settings: Settings) -> dict[str, Any]:
    return {"express_version": express_version(settings), "platform": platform_tag(),
            "self": stable_id(settings.state_dir / "self-id")}


def select_secondaries(settings: Settings, wanted: list[str] | tuple[str, ...] = ()) -> list[Secondary]:
    """The Mirrors list, or the members named ``HOST`` or ``HOST:PORT`` (``[v6]:PORT``)."""
    mirrors = read_mirrors(settings.iserv_cfg)
    if not mirrors:
        raise ConfigError(f"{settings.iserv_cfg} has no <Mirrors> element: this server is not a "
                          "master. Add <Mirrors><Secondary host=\"…\"/></Mirrors> after <ImageManager>")
    if not wanted:
        return mirrors
    chosen: list[Secondary] = []
    for want in wanted:
        match = [m for m in mirrors
                 if want in (m.host, m.name, f"[{m.host}]", f"[{m.host}]:{m.port}")]
        if not match:
            listed = ", ".join(m.name for m in mirrors)
            raise ConfigError(f"--secondary {want} is not in the Mirrors list of "
                              f"{settings.iserv_cfg} ({listed})")
        chosen += [m for m in match if m not in chosen]
    return chosen


def publish(settings: Settings, secondaries: list[Secondary], full: bool = False,
            dry_run: bool = False, force: bool = False,
            progress: Callable[[Secondary, int], None] | None = None) -> PublishReport:
    """One publish, now. Raises before sending anything when the master's own set is unfit."""
    for secondary in secondaries:
        if secondary.ssl == "strict" and not settings.ca_bundle.is_file():
            raise ConfigError(f"{secondary.name} is ssl=\"strict\" but {settings.ca_bundle} is "
                              "missing; nothing was sent")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(settings.state_dir / "publish.lock")
    with lock:
        catalogs = settings.data_dir / CATALOGS_XML
        if not catalogs.is_file():
            raise PublishFailed(f"{catalogs} does not exist; nothing was sent")
        report = validate_catalogs_file(catalogs)
        if report.problems and not force:
            raise InvalidSet(f"{catalogs} is invalid; nothing was sent", report.problems)
        if settings.require_paths and report.unreadable_paths() and not force:
            raise InvalidSet(f"{catalogs} names catalog Paths this master cannot read "
                             "(require_paths = true); nothing was sent", report.unreadable_paths())
        if not dry_run:
            ok, output = run_reload(settings)
            if not ok:
                raise PublishFailed(f"reload_command failed on this master; nothing was sent. "
                                    f"{output.strip()}")
        scanned = scan(settings.data_dir, HashCache(settings.state_dir / "hashcache.json"),
                       settings.include, settings.exclude)
        if scanned.unsafe:
            raise InvalidSet("the master's set has files that cannot be mirrored safely; rename "
                             "or exclude them", scanned.unsafe)
        counter_path = settings.state_dir / "master.json"
        counter = read_json(counter_path, {}) or {}
        generation = int(counter.get("generation", 0)) + (0 if dry_run else 1)
        if not dry_run:
            write_json(counter_path, {"generation": generation})
        mine = master_identity(settings)
        local = LocalSet(scanned.manifest, settings.data_dir, generation, mine["self"])

        def one(secondary: Secondary) -> PushResult:
            step = (lambda n: progress(secondary, n)) if progress else None
            return push(secondary, settings, local, mine, full, dry_run, step)

        with cf.ThreadPoolExecutor(max(1, len(secondaries))) as pool:
            results = list(pool.map(one, secondaries))
    return PublishReport(generation, local.manifest.digest, len(local.manifest.files),
                         local.manifest.total_bytes, results,
                         scanned.warnings + report.unreadable_paths())
