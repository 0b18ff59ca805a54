"""``esmirror agent``: the long-running push agent on the master.

It takes publish requests that ``POST publish`` left in the queue on disk,
runs them (one at a time, under the same publish lock as ``esmirror publish``),
and brings back secondaries that missed a push: each is retried with
exponential backoff and jitter (``retry_initial`` .. ``retry_max``) until it
confirms the generation the master wants there. Every ``check_interval`` it
browses every secondary so the status page shows drift, archive size and
unreadable Paths without anyone asking.

Catch-ups and the periodic look run beside the loop, so a slow secondary holds up
neither: a catch-up holds the publish lock, and steps aside (``Interrupt``) as soon as
a publish is asked for, here or by ``esmirror publish``; what it uploaded stays on the
secondary for the publish's push to reuse.

Restarts are safe: a request is on disk before its 202, a request found
``running`` at start is run again (pushing the whole set is idempotent), and a
secondary's debt is in the ledger, not in memory.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import filelock

from app.core.audit import now_iso
from app.core.errors import MirrorError
from app.core.express import Secondary, select_secondaries
from app.core.faults import crash_point
from app.core.ledger import Ledger
from app.core.publishes import PublishQueue, request_targets
from app.core.settings import Settings, content_digest, load_settings
from app.core.state import write_json

from .signals import on_stop_signals
from .client import Interrupt
from .fleet import Observer, catch_up, publish, publish_waiting
from .push import PushResult
from .status import check_fleet

log = logging.getLogger("esmirror.agent")
TICK = 0.5               # how often the queue is looked at (seconds)
PROGRESS_EVERY = 0.5     # at most this often is a running request's progress written
HEARTBEAT_EVERY = 2.0    # agent.json's pulse; status says "no agent" after 30 s of silence
WRITE_TROUBLE_PAUSE = 30.0  # seconds between tries while this master's state cannot be written


class AgentRunning(MirrorError):
    """Another agent already looks after this master."""


class _CatchUpLog(Observer):
    def start(self, secondary: Secondary) -> None:
        log.info("catching up %s", secondary.name)


class RecordObserver(Observer):
    """Keeps a request's file up to date while its publish runs (what GET publish/<id> shows)."""

    def __init__(self, queue: PublishQueue, record: dict[str, Any]) -> None:
        self.queue, self.record = queue, record
        self.rows = {row["name"]: row for row in record["secondaries"]}
        self.lock = threading.Lock()
        self.last_write = 0.0

    def _row(self, secondary: Secondary) -> dict[str, Any]:
        if secondary.name not in self.rows:
            self.rows[secondary.name] = {"name": secondary.name, "state": "pending", "bytes_sent": 0,
                                         "files_sent": 0, "error": None}
            self.record["secondaries"].append(self.rows[secondary.name])
        return self.rows[secondary.name]

    def begin(self) -> None:
        """The publish lock is ours: only now is the request running (until then it waits, queued)."""
        log.info("publish %s asked by %s: running", self.record["id"], self.record.get("caller"))
        with self.lock:
            self.record.update(state="running", started=self.record.get("started") or now_iso(),
                               runs=int(self.record.get("runs") or 0) + 1, agent_pid=os.getpid())
            for row in self.record["secondaries"]:
                row.update(state="pending", bytes_sent=0, files_sent=0, error=None)
            self.queue.save(self.record)

    def start(self, secondary: Secondary) -> None:
        with self.lock:
            self._row(secondary).update(state="pushing", bytes_sent=0, files_sent=0, error=None)
            self.queue.save(self.record, durable=False)

    def progress(self, secondary: Secondary, sent: int, files_sent: int = 0) -> None:
        with self.lock:
            row = self._row(secondary)
            row["bytes_sent"] += sent
            row["files_sent"] = max(row["files_sent"], files_sent)
            if self.last_write == 0.0 or time.monotonic() - self.last_write >= PROGRESS_EVERY:
                self.last_write = time.monotonic()
                self.queue.save(self.record, durable=False)
        crash_point("agent-progress")  # tests kill the agent here: mid-publish, progress on disk

    def done(self, secondary: Secondary, result: PushResult) -> None:
        with self.lock:
            self._row(secondary).update(state=result.state, bytes_sent=result.bytes_sent,
                                        files_sent=result.files_sent, error=result.error,
                                        generation=result.generation, archive_id=result.archive_id)
            self.queue.save(self.record)


def _covers(newer: dict[str, Any], older: dict[str, Any]) -> bool:
    """A newer request makes an older pending one pointless when it does at least what the
    older would: the same targets or more, as thorough (full), as forceful (force), and
    no stricter rollout (a canary or stop-on-failure the older one did not ask for could
    leave secondaries unpushed that the older request would have pushed)."""
    def targets(r: dict[str, Any]) -> set[str]:
        return {row["name"] for row in r.get("secondaries") or []}
    new, old = newer["options"], older["options"]
    return (targets(newer) >= targets(older)
            and all(new.get(flag) or not old.get(flag) for flag in ("full", "force"))
            and new.get("canary") in (None, old.get("canary"))
            and (old.get("stop_on_failure") or not new.get("stop_on_failure")))


class Agent:
    def __init__(self, settings: Settings, tick: float = TICK) -> None:
        self.settings = settings
        self.tick = tick
        self.queue = PublishQueue(settings)
        self.ledger = Ledger(settings)
        self.started = now_iso()
        self.next_check = 0.0
        self.checking: threading.Thread | None = None
        self.catching: threading.Thread | None = None
        self.interrupt = Interrupt()  # the running catch-up's
        self.next_catch_up = 0.0  # (after a catch-up that failed: not at once again)
        self.settings_read = content_digest(settings.ini_path)
        self.unusable: Any = ()  # the stamp of a file that was gone or did not read (said once)

    # --- the loop ----------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        select_secondaries(self.settings)  # not a master: say so now, not on the first request
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        single = filelock.FileLock(self.settings.state_dir / "agent.lock", timeout=0)
        try:
            single.acquire()
        except filelock.Timeout:
            raise AgentRunning(f"another esmirror agent already runs for {self.settings.install_dir} "
                               f"(lock {self.settings.state_dir / 'agent.lock'})") from None
        beating = threading.Event()
        pulse = threading.Thread(target=self._beat, args=(beating,), name="heartbeat", daemon=True)
        try:
            self.heartbeat()
            pulse.start()  # its own thread: a long push must not make status say "no agent"
            self.resume()
            log.info("agent started for %s", self.settings.install_dir)
            while not stop.is_set():
                pause = self.tick
                try:
                    self.step()
                except MirrorError as exc:  # a broken iserv-cfg.xml, say: keep going, say why
                    log.error("%s", exc.message)
                except OSError as exc:  # a full disk or a permission: one line, and not every tick
                    log.error("cannot read or write %s: %s; trying again in %.0f s",
                              exc.filename or "this master's state", exc.strerror or exc,
                              WRITE_TROUBLE_PAUSE)
                    pause = WRITE_TROUBLE_PAUSE
                except Exception:  # never die on one bad pass: the service would only restart into it
                    log.exception("unexpected error in the agent; going on")
                stop.wait(pause)
        finally:
            if self.catching is not None and self.catching.is_alive():
                self.interrupt.fire("the agent is stopping")
                self.catching.join(timeout=10)
            beating.set()
            if pulse.is_alive():
                pulse.join(timeout=5)
            self.heartbeat(stopped=True)
            single.release()
            log.info("agent stopped")

    def reread_settings(self) -> None:
        """esmirror.ini changed: read it again, as the next 'esmirror publish' would, so the
        agent's publishes and catch-ups never push another set than the command line's
        (include, exclude, shared_secret_file, retries). A file that no longer reads keeps
        the settings in use, and says so."""
        stamp = content_digest(self.settings.ini_path)  # (the secret is read again at every push)
        if stamp == self.settings_read or stamp == self.unusable:
            return
        if stamp is None:  # an editor's rename-then-write, or a slip: defaults would change the set
            log.warning("%s is gone; going on with the settings read before", self.settings.ini_path)
            self.unusable = stamp
            return
        try:
            fresh = load_settings(self.settings.install_dir)
        except MirrorError as exc:  # (half written, say: the next change is read again)
            log.error("%s changed but cannot be used (%s); going on with the settings read before",
                      self.settings.ini_path, exc.message)
            self.unusable = stamp
            return
        self.settings_read, self.unusable = stamp, ()
        self.settings = fresh
        self.ledger = Ledger(fresh)
        log.info("%s changed: settings read again", fresh.ini_path)

    def step(self) -> None:
        """One pass: the oldest pending request, else catch-up, and the periodic look."""
        self.reread_settings()
        pending = self.queue.pending()
        catching = self.catching is not None and self.catching.is_alive()
        if pending:
            if catching:  # the request runs once the catch-up has let the publish lock go
                self._step_aside("a publish was asked for")
                return
            for index, record in enumerate(pending):  # (those superseded all in this pass)
                if not self.supersede(record, pending[index + 1:]):
                    self.handle(record)
                    break
            return
        mirrors = select_secondaries(self.settings)
        if catching:
            if publish_waiting(self.settings):
                self._step_aside("'esmirror publish' is waiting for the publish lock")
        elif time.monotonic() >= self.next_catch_up:
            due = self.ledger.due(mirrors)
            if due:  # (said once a push starts: while a publish holds the lock, this is every second)
                self.interrupt = Interrupt()
                self.catching = threading.Thread(target=self._catch_up, args=(due, self.interrupt),
                                                 name="catch-up", daemon=True)
                self.catching.start()
        if time.monotonic() >= self.next_check and not (self.checking and self.checking.is_alive()):
            # on its own thread: a secondary that answers slowly or never must not hold up
            # requests, catch-up or a stop (a daemon thread: a stop does not wait for it)
            self.next_check = time.monotonic() + self.settings.check_interval
            self.checking = threading.Thread(target=self._check, args=(mirrors,), name="check",
                                             daemon=True)
            self.checking.start()

    def _step_aside(self, why: str) -> None:
        if not self.interrupt.why:
            log.info("catch-up stops: %s", why)
        self.interrupt.fire(why)

    def _catch_up(self, due: list[Secondary], interrupt: Interrupt) -> None:
        try:
            for result in catch_up(self.settings, due, interrupt=interrupt, observer=_CatchUpLog()):
                log.info("catch-up %s: %s%s", result.name, result.state, f": {result.error}" if result.error else "")
            return
        except MirrorError as exc:  # a damaged ledger, say: its message says what to do
            log.error("catch-up failed: %s; trying again in %.0f s", exc.message, WRITE_TROUBLE_PAUSE)
        except OSError as exc:  # a full disk or a permission
            log.error("catch-up failed: cannot read or write %s: %s; trying again in %.0f s",
                      exc.filename or "this master's state", exc.strerror or exc, WRITE_TROUBLE_PAUSE)
        except Exception:
            log.exception("catch-up failed; trying again in %.0f s", WRITE_TROUBLE_PAUSE)
        self.next_catch_up = time.monotonic() + WRITE_TROUBLE_PAUSE

    def _check(self, mirrors: list[Secondary]) -> None:
        try:
            check_fleet(self.settings, mirrors)
        except MirrorError as exc:  # a damaged ledger, say: its message says what to do
            log.error("the periodic look at the secondaries failed: %s", exc.message)
        except Exception:  # the next look tries again; say why this one failed
            log.exception("the periodic look at the secondaries failed")

    def resume(self) -> None:
        """Requests a previous agent left running are run again."""
        for record in self.queue.pending():
            if record["state"] == "running":
                log.warning("publish %s was interrupted (agent stopped); running it again", record["id"])
                record["state"] = "queued"
                self.queue.save(record)

    def _beat(self, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_EVERY):
            self.heartbeat()

    def heartbeat(self, stopped: bool = False) -> None:
        """agent.json's pulse. A full disk must not stop the agent (at start, a restart loop
        under systemd): it says so and goes on; status says no agent once the pulse is old."""
        try:
            write_json(self.settings.state_dir / "agent.json",
                       {"pid": os.getpid(), "started": self.started, "heartbeat": time.time(),
                        "stopped": stopped}, durable=False)
        except OSError as exc:
            log.warning("cannot write the heartbeat: %s", exc)

    # --- one request ------------------------------------------------------------
    def supersede(self, record: dict[str, Any], newer: list[dict[str, Any]]) -> bool:
        """Mark ``record`` superseded if a newer request covers it; True if it was."""
        covering = [r for r in newer if _covers(r, record)]
        if not covering:
            return False
        record.update(state="superseded", superseded_by=covering[-1]["id"], finished=now_iso())
        self.queue.save(record)
        log.info("publish %s superseded by %s", record["id"], covering[-1]["id"])
        return True

    def handle(self, record: dict[str, Any]) -> None:
        options = record["options"]
        try:
            targets, canary = request_targets(self.settings, options)
        except MirrorError as exc:
            record.update(state="failed", ok=False, error=exc.message, finished=now_iso())
            self.queue.save(record)
            return
        # Mirrors may have changed since the request was queued: its rows are those pushed to now
        names = {t.name for t in targets}
        record["secondaries"] = [row for row in record["secondaries"] if row["name"] in names]
        log.debug("publish %s asked by %s: starting", record["id"], record.get("caller"))
        try:
            report = publish(self.settings, targets, full=bool(options.get("full")),
                             force=bool(options.get("force")), canary=canary,
                             max_parallel=options.get("max_parallel"),
                             stop_on_failure=bool(options.get("stop_on_failure")),
                             observer=RecordObserver(self.queue, record), caller=record.get("caller"),
                             history=False, lock_timeout=self.tick)
        except filelock.Timeout:  # `esmirror publish` is pushing: this request waits its turn, queued
            return
        except (MirrorError, OSError, ValueError) as exc:
            message = exc.message if isinstance(exc, MirrorError) else f"unexpected error on this master: {exc}"
            record.update(state="failed", ok=False, error=message, finished=now_iso())
            self.queue.save(record)
            log.error("publish %s failed: %s", record["id"], message)
            return
        record.update(state="done", ok=report.ok, generation=report.generation, digest=report.digest,
                      finished=now_iso(), warnings=report.warnings)
        self.queue.save(record)
        self.queue.prune()
        log.info("publish %s: generation %s, %s", record["id"], report.generation,
                 "all in sync" if report.ok else "not in sync: " + ", ".join(
                     f"{r.name} {r.state}" for r in report.secondaries if not r.ok))


def run_agent(settings: Settings, verbose: bool = False) -> None:
    """Run until SIGTERM/SIGINT/SIGHUP (systemd stop, Ctrl-C, a Windows service stop, a
    closed terminal); a second one stops it at once."""
    import signal

    from app.core.signing import read_secret

    read_secret(settings)  # a bad shared_secret_file stops the agent now, not at every push

    # UTC with its Z, as status, the audit log and the archive show times: one clock to line
    # them up by, whatever the machine's zone
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03dZ esmirror agent: %(message)s",
                                           datefmt="%Y-%m-%dT%H:%M:%S"))
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("filelock").setLevel(logging.INFO)  # its every try at a lock is noise in -v
    # urllib3 warns of each retry of a connection (3 lines per push to a server that is down,
    # two thirds of a fleet's log); the push's own line says what failed, once
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():  # (a person who asks twice does not want to wait for a 20-minute push)
            log.warning("%s again: stopping now; a publish request cut short runs again at the "
                        "next start, and a secondary applies a set whole or not at all", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s: stopping after the current push (send it again to stop now)", name)
        stop.set()

    on_stop_signals(on_signal)
    Agent(settings).run(stop)
