"""The master's ledger: what each secondary should hold, what it was last seen holding.

``.esmirror/ledger.json``, one entry per secondary (``host:port``), updated
under a file lock by whoever talks to the secondary (``esmirror publish``, the
agent, ``esmirror status``). The status of the fleet (SPEC §4: in-sync, behind,
drift, unreachable, refused) is computed here from the ledger and the
master's last publish, so the CLI, ``GET status`` and the HTML page agree.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import filelock

from .audit import iso_time, now_iso
from .express import Secondary, lists_mirrors, read_mirrors
from .errors import ConfigError
from .publishes import PublishQueue, publishing_to
from .settings import Settings
from .state import damaged_record, pid_alive, read_json, self_id, user_name, write_json

AGENT_SILENT_AFTER = 30.0  # seconds without a heartbeat before status says no agent runs
HEARTBEAT_SKEW = 5.0  # seconds a heartbeat may seem to come from the future (clocks of one host)


def master_record_path(settings: Settings) -> Path:
    return settings.state_dir / "master.json"


def master_record(settings: Settings) -> dict[str, Any]:
    """The master's last publish: ``{generation, digest, published_at}`` (empty before the
    first), and ``generation_floor`` when a secondary refused an older generation."""
    record = read_json(master_record_path(settings), {}, shape=dict) or {}
    for key in ("generation", "generation_floor"):
        if key in record and (type(record[key]) is not int or record[key] < 0):
            raise damaged_record(master_record_path(settings), f"{key} is {record[key]!r}, not a "
                                 "generation number")
    return record


def retry_delay(settings: Settings, failures: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter, never above ``retry_max``.

    Half the delay is fixed and half random ("equal jitter"): secondaries that
    failed together do not all come back at the same instant, and a retry still
    comes no later than the bound.
    """
    delay = min(settings.retry_max, settings.retry_initial * 2 ** max(0, failures - 1))
    return delay / 2 + (rng or random).uniform(0, delay / 2)


def _blank(secondary: Secondary) -> dict[str, Any]:
    return {"host": secondary.host, "port": secondary.port, "wanted_generation": None,
            "wanted_digest": None, "confirmed_generation": None, "confirmed_digest": None,
            "observed": None, "last_contact": None, "unreachable_since": None, "error": None,
            "refused": None, "last_push": None, "failures": 0, "next_retry": None, "stale": None}


class Ledger:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.state_dir / "ledger.json"

    def read(self) -> dict[str, dict[str, Any]]:
        return read_json(self.path, {}) or {}

    def writable_problem(self) -> str | None:
        """Why this account cannot record answers here, if it cannot (a look that cannot
        record would report the ledger's older answers as if they were now's)."""
        if not hasattr(os, "geteuid"):  # (Windows: ACLs, which os.access does not read)
            return None
        folder = self.path.parent
        where = folder if folder.exists() else folder.parent
        for path in (where, self.path, Path(str(self.path) + ".lock")):
            if path.exists() and not os.access(path, os.W_OK):
                me, owner = user_name(os.geteuid()), user_name(path.stat().st_uid)
                how = f"sudo -u {owner} esmirror status" + ("" if owner == "root" else
                                                             f", or as root, which runs it as {owner}")
                return (f"{path} is not writable by {me}, and status records there what the "
                        f"secondaries answer; run it as {owner} ({how})")
        return None

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, dict[str, Any]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(self.path) + ".lock", timeout=60):
            data = self.read()
            yield data
            write_json(self.path, data)

    def entry(self, data: dict[str, dict[str, Any]], secondary: Secondary) -> dict[str, Any]:
        return data.setdefault(secondary.name, _blank(secondary))

    # --- what talking to a secondary taught us -----------------------------
    def record_contact(self, secondary: Secondary, info: dict[str, Any],
                       refused: str | None = None, asked: float | None = None) -> None:
        """A browse answered: what it holds now, and whether it refuses this master.
        ``asked``: when the browse was sent; a push recorded since knows better what it holds."""
        with self.edit() as data:
            entry = self.entry(data, secondary)
            recorded = (entry.get("observed") or {}).get("epoch", 0)
            # (one recorded "in the future" came before the clock was set back: not newer)
            if asked is not None and asked < recorded <= time.time():
                entry["last_contact"] = now_iso()
                return
            _observe(entry, info)
            entry["refused"] = refused

    def record_unreachable(self, secondary: Secondary, error: str, refused: bool = False) -> None:
        """No answer (or a TLS failure, which is a refusal: the channel is wrong, not down)."""
        with self.edit() as data:
            entry = self.entry(data, secondary)
            if refused:
                entry["refused"], entry["unreachable_since"] = error, None
            else:
                entry["unreachable_since"] = entry["unreachable_since"] or now_iso()
            entry["error"] = error

    def record_push(self, secondary: Secondary, result: dict[str, Any], generation: int,
                    digest: str, rng: random.Random | None = None) -> tuple[tuple[Any, Any], int]:
        """A push ended: the secondary should now hold (generation, digest); did it?
        Returns how the push before it ended ((state, error), or Nones) and the failed
        pushes since the secondary was last in sync (this one included)."""
        with self.edit() as data:
            entry = self.entry(data, secondary)
            last = entry.get("last_push") or {}
            before = (last.get("state"), last.get("error"))
            entry["wanted_generation"], entry["wanted_digest"] = generation, digest
            entry["stale"] = None
            state = result.get("state")
            entry["last_push"] = {k: result.get(k) for k in
                                  ("state", "reason", "error", "bytes_sent", "files_sent", "generation",
                                   "refused_by_look")}
            entry["last_push"]["at"] = result.get("ended") or now_iso()
            if state == "in-sync":  # (a check can alarm on one too long ago)
                entry["last_in_sync_push"] = entry["last_push"]["at"]
            entry["last_push"]["wanted_generation"] = generation
            tls = result.get("reason") == "tls"  # (the channel is wrong, not down: a refusal)
            if state == "in-sync":
                failed = int(entry.get("failures") or 0)
                entry["confirmed_generation"], entry["confirmed_digest"] = generation, digest
                entry["failures"], entry["next_retry"] = 0, None
                entry["refused"] = entry["error"] = None
                _observe(entry, {"generation": result.get("generation"), "drift": False,
                                 "digest": result.get("digest") or digest})
                return before, failed
            entry["failures"] = int(entry.get("failures") or 0) + 1
            entry["next_retry"] = time.time() + retry_delay(self.settings, entry["failures"], rng)
            entry["error"] = result.get("error")
            if state == "unreachable" and not tls:
                entry["unreachable_since"] = entry["unreachable_since"] or now_iso()
            else:
                entry["unreachable_since"] = None
                entry["last_contact"] = now_iso()
                if tls:
                    entry["refused"] = result.get("error")
            return before, entry["failures"]

    def record_stale(self, secondary: Secondary, why: str) -> None:
        """Catch-up is impossible until the next publish (the master's set moved on)."""
        with self.edit() as data:
            entry = self.entry(data, secondary)
            entry["stale"], entry["next_retry"] = why, None

    def due(self, mirrors: list[Secondary], now: float | None = None) -> list[Secondary]:
        """Secondaries that lag what was pushed to them and whose retry time has come."""
        now = time.time() if now is None else now
        data = self.read()
        mine = self_id(self.settings.state_dir)
        out = []
        for secondary in mirrors:
            entry = data.get(secondary.name)
            # a retry more than retry_max ahead was set before the clock was put back: due
            retry = (entry.get("next_retry") or 0) if entry else 0
            if entry and lags(entry, mine) and (retry <= now or retry > now + self.settings.retry_max + 1):
                out.append(secondary)
        return out


def lags(entry: dict[str, Any], master: str | None = None) -> bool:
    """The secondary does not hold what was last pushed to it, and a catch-up may bring it:
    it never confirmed it, or a later look found it holding another set of ours without
    drift (restored from a backup, rebuilt); not one edited by hand nor one an admin
    restored from its archive (a person's fix, which only a publish undoes), nor one of
    another master's (``master``: this one's id)."""
    if entry.get("wanted_generation") is None or entry.get("stale"):
        return False
    if (entry.get("confirmed_generation") != entry.get("wanted_generation")
            or entry.get("confirmed_digest") != entry.get("wanted_digest")):
        return True
    seen = entry.get("observed") or {}
    return (bool(seen.get("digest")) and seen.get("digest") != entry.get("wanted_digest")
            and not seen.get("drift") and not seen.get("restored_from")
            and master is not None and seen.get("master") == master
            # one newer than what the ledger knows was sent: a publish still running got there
            and (seen.get("generation") or 0) <= (entry.get("wanted_generation") or 0))


def _observe(entry: dict[str, Any], info: dict[str, Any]) -> None:
    entry["observed"] = {"generation": info.get("generation"), "digest": info.get("digest"),
                         "drift": bool(info.get("drift")), "master": info.get("master"),
                         "restored_from": info.get("restored_from"),
                         "archive_bytes": info.get("archive_bytes",
                                                   (entry.get("observed") or {}).get("archive_bytes")),
                         "warnings": list(info.get("warnings") or []),
                         # room there, as its last answer gave it: pushes fail on it first
                         "free_bytes": info.get("free_bytes"), "reserve_bytes": info.get("reserve_bytes"),
                         "free_inodes": info.get("free_inodes"),
                         "express_version": info.get("express_version"), "at": now_iso(),
                         "epoch": time.time()}  # (which of two answers is the newer)
    entry["last_contact"] = now_iso()
    entry["unreachable_since"] = None
    entry["error"] = None


def secondary_state(entry: dict[str, Any] | None, published: dict[str, Any],
                    reached_others: bool = True, publishing: bool = False) -> tuple[str, str]:
    """(state, what a person should know) for one secondary; ``reached_others``: the ledger
    records a push of the published generation to some secondary; ``publishing``: a
    publish (or the agent's catch-up) under way pushes to this one."""
    if not entry or not (entry.get("observed") or entry.get("unreachable_since") or entry.get("refused")
                         or entry.get("last_push")):
        return "unknown", "not contacted yet (run 'esmirror status', or start 'esmirror agent')"
    if entry.get("unreachable_since"):
        return "unreachable", f"since {entry['unreachable_since']}: {entry.get('error') or ''}".strip()
    if entry.get("refused"):
        return "refused", entry["refused"]
    push = entry.get("last_push") or {}
    seen = entry.get("observed") or {}
    # a push refused by what a look checks too (versions, owner, role) stands until a look
    # after it was let in: fixed since, it is only behind, and the next push brings it. One
    # the push routes refused (allow_push, the secret), which a look never tries, stands.
    fixed = push.get("refused_by_look") and (seen.get("at") or "") > (push.get("at") or "")
    if push.get("state") == "refused" and not fixed:
        return "refused", push.get("error") or ""
    if publishing and not (published.get("digest") and seen.get("digest") == published["digest"]):
        return "publishing", (f"holds generation {seen.get('generation')}; a publish under way is "
                              "pushing this master's set to it now")
    if seen.get("drift"):
        return "drift", (f"files were changed by hand after generation {seen.get('generation')} was "
                         "applied; the next publish repairs them and archives the edited files")
    if published.get("digest") and seen.get("digest") == published["digest"]:
        return "in-sync", f"generation {seen.get('generation')}"
    if not published.get("generation"):
        return "behind", "this master has not published yet"
    held = seen.get("generation")
    if isinstance(held, int) and held > published["generation"]:
        # it is ahead: this master's record is older than what it pushed (a backup restored)
        return "behind", (f"holds generation {held}, newer than generation {published['generation']} "
                          "this master last published (was this master restored from an older "
                          "backup?); the next publish replaces that set with this master's, and the "
                          "replaced files go to its archive")
    detail = (f"holds generation {held}, the master published generation "
              f"{published['generation']}")
    if seen.get("restored_from"):
        detail += (f"; an admin restored archive entry {seen['restored_from']} there (the next "
                   "publish overwrites it; the agent does not)")
    elif entry.get("stale"):
        detail += f"; {entry['stale']}"
    elif push.get("state") not in (None, "in-sync") and push.get("error"):
        detail += f"; last push {push['state']}: {push['error']}"
        if entry.get("next_retry"):
            detail += f" (the agent retries at {iso_time(entry['next_retry'])})"
    elif (entry.get("wanted_generation") or 0) < published["generation"] and not reached_others:
        detail += (f"; the publish of generation {published['generation']} has recorded no push: it "
                   "is still running, or it was killed before it ended. Publish again (once none runs)")
    elif (entry.get("wanted_generation") or 0) < published["generation"]:
        detail += (f"; generation {published['generation']} was published to other secondaries "
                   "only (the agent catches up only missed pushes): publish again to bring it here")
    return "behind", detail


def fleet_status(settings: Settings, history: int = 10, looked_now: bool = False) -> dict[str, Any]:
    """Every secondary's state from the ledger, the last publishes, and the agent's pulse.
    ``looked_now``: the caller has just looked at every secondary (``esmirror status``);
    else (the status page) the ledger is as fresh as the agent's last look."""
    error = None
    try:
        mirrors = read_mirrors(settings.iserv_cfg)
    except ConfigError as exc:
        mirrors = []
        if lists_mirrors(settings.iserv_cfg) or "<Mirrors" in exc.message:
            error = exc.message  # a master's Mirrors with a typo: its page says what is wrong
    published = master_record(settings)
    ledger = Ledger(settings).read()
    queue = PublishQueue(settings)
    reached = any((e.get("wanted_generation") or 0) >= (published.get("generation") or 0)
                  for e in ledger.values() if isinstance(e, dict))
    pushing_to = set(publishing_to(settings)) if mirrors else set()
    rows = []
    for secondary in mirrors:
        entry = ledger.get(secondary.name)
        state, detail = secondary_state(entry, published, reached, secondary.name in pushing_to)
        seen = (entry or {}).get("observed") or {}
        retry = (entry or {}).get("next_retry")  # (an epoch in the ledger)
        rows.append({"name": secondary.name, "host": secondary.host, "port": secondary.port,
                     "ssl": secondary.ssl, "state": state, "detail": detail,
                     "generation": seen.get("generation"),
                     "wanted_generation": (entry or {}).get("wanted_generation"),
                     "confirmed_generation": (entry or {}).get("confirmed_generation"),
                     "last_contact": (entry or {}).get("last_contact"),
                     "unreachable_since": (entry or {}).get("unreachable_since"),
                     "refused": (entry or {}).get("refused"),
                     "archive_bytes": seen.get("archive_bytes"),
                     "free_bytes": seen.get("free_bytes"), "reserve_bytes": seen.get("reserve_bytes"),
                     "free_inodes": seen.get("free_inodes"),
                     "unreadable_paths": [w for w in seen.get("warnings") or []
                                          if w.startswith("catalog ") and "not readable" in w],
                     "warnings": seen.get("warnings") or [],
                     "failed_tries": (entry or {}).get("failures") or 0,
                     "next_retry": iso_time(retry) if isinstance(retry, (int, float))
                     and not isinstance(retry, bool) else None,
                     "last_push": (entry or {}).get("last_push"),
                     "last_in_sync_push": (entry or {}).get("last_in_sync_push")})
    publishes = [{k: r.get(k) for k in ("id", "created", "caller", "state", "ok", "generation",
                                        "error", "finished")}
                 | {"secondaries": [{k: s.get(k) for k in ("name", "state", "error")}
                                    for s in r.get("secondaries") or []]}
                 for r in queue.history(history)]
    agent = agent_pulse(settings)
    # a request the agent would run, with no agent: the fleet never gets what was asked
    problems = [f"publish request {r['id']} is {r['state']} but no esmirror agent runs: it waits "
                "until one starts (systemctl start esmirror-agent)"
                for r in (queue.pending() if mirrors and not agent["running"] else [])]
    if mirrors and not agent["running"] and not looked_now:
        problems.append("no esmirror agent runs, so these states are as the last look left them, not "
                        "now's; 'esmirror status' on this master looks now")
    return {"role": "master" if mirrors or error else "secondary", "error": error,
            "ok": bool(rows) and all(r["state"] == "in-sync" for r in rows) and not problems,
            "generation": published.get("generation"), "digest": published.get("digest"),
            "published_at": published.get("published_at"), "publishing": bool(pushing_to),
            "problems": problems, "agent": agent, "secondaries": rows, "publishes": publishes}


def agent_pulse(settings: Settings) -> dict[str, Any]:
    """Whether an agent is looking after this master: its heartbeat file, and how fresh."""
    beat = read_json(settings.state_dir / "agent.json", {}) or {}
    age = time.time() - float(beat.get("heartbeat") or 0)
    # (a beat "from the future" was written before the clock was put back: it says nothing)
    running = bool(beat) and not beat.get("stopped") and -HEARTBEAT_SKEW < age < AGENT_SILENT_AFTER
    if running and isinstance(beat.get("pid"), int):  # killed (kill -9, a crash): at once, not in 30 s
        running = pid_alive(beat["pid"])
    return {"running": running, "pid": beat.get("pid"), "started": beat.get("started"),
            "seconds_since_heartbeat": round(age, 1) if beat else None}
