"""Look at every secondary now (browse), note what it holds in the ledger, and report the fleet."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from app.core.errors import ConfigError, MirrorError, RemoteError
from app.core.express import Secondary, select_secondaries
from app.core.ledger import Ledger, fleet_status
from app.core.settings import Settings

from .client import SecondaryClient, unforeseen
from .push import Refused, check_peer

log = logging.getLogger("esmirror.agent")


def check_one(settings: Settings, secondary: Secondary, mine: dict[str, Any]) -> None:
    """One browse: what the secondary holds, whether it drifted, whether it refuses us."""
    ledger = Ledger(settings)
    client = None
    asked = time.time()  # (a push that ends while this browse is under way knows better)
    try:
        client = SecondaryClient(secondary, settings)
        info = client.browse()
    except RemoteError as exc:
        tls = exc.message.startswith("TLS ")
        if exc.details.get("kind") == "unreachable" and not tls:
            ledger.record_unreachable(secondary, exc.message)
        else:  # it answered, but not to us: 403, TLS, not an esmirror receiver
            ledger.record_unreachable(secondary, exc.message, refused=True)
        return
    except MirrorError as exc:  # a strict secondary without ca-bundle.crt, say
        ledger.record_unreachable(secondary, exc.message, refused=True)
        return
    except Exception as exc:  # a bug meeting an answer nobody foresaw: this secondary, not all
        ledger.record_unreachable(secondary, unforeseen(secondary, "check", exc), refused=True)
        return
    finally:
        if client is not None:
            client.close()
    try:
        check_peer(secondary, info, mine)
        refused = None
    except Refused as exc:
        refused = exc.message
    ledger.record_contact(secondary, info, refused, asked=asked)


def check_fleet(settings: Settings, secondaries: list[Secondary] | None = None,
                patience: float | None = None) -> list[Secondary]:
    """Browse every secondary, 16 at a time, and record what each answered. Returns those
    still unanswered after ``patience`` seconds (None: wait for every browse's own limits).

    Daemon threads, not a pool: a secondary that never answers must not keep the agent
    (whose periodic look this is) or ``status`` from exiting; a look that goes on past
    ``patience`` still records its answer if the process lives on."""
    from .fleet import master_identity

    secondaries = secondaries if secondaries is not None else select_secondaries(settings)
    mine = master_identity(settings)
    todo: queue.SimpleQueue[Secondary] = queue.SimpleQueue()
    for secondary in secondaries:
        todo.put(secondary)
    unanswered = set(secondaries)
    failed: list[Exception] = []

    def work() -> None:
        while True:
            try:
                secondary = todo.get_nowait()
            except queue.Empty:
                return
            try:
                check_one(settings, secondary, mine)
            except OSError as exc:  # its answer cannot be recorded (a full disk): say so, go on
                log.warning("cannot record what %s answered: %s: %s", secondary.name,
                            exc.filename or "the ledger", exc.strerror or exc)
            except Exception as exc:  # a damaged ledger, say: the caller says it, once
                failed.append(exc)
                return
            unanswered.discard(secondary)

    workers = [threading.Thread(target=work, name="look", daemon=True)
               for _ in range(max(1, min(16, len(secondaries))))]
    for worker in workers:
        worker.start()
    deadline = None if patience is None else time.monotonic() + patience
    for worker in workers:
        worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if failed:
        raise failed[0]
    return [s for s in secondaries if s in unanswered]


def live_status(settings: Settings, patience: float) -> dict[str, Any]:
    """``esmirror status``: look now, then report from the ledger (the same view as the page).
    A secondary that has not answered within ``patience`` seconds is reported unreachable."""
    ledger = Ledger(settings)
    problem = ledger.writable_problem()
    if problem:  # (a monitoring account: the ledger's older answers would pass for now's)
        raise ConfigError(problem)
    late = check_fleet(settings, patience=patience)
    for secondary in late:
        ledger.record_unreachable(secondary, f"no answer within {patience:g} s (down, a firewall "
                                  "dropping packets, or a hung receiver; 'esmirror status "
                                  "--timeout' waits longer)")
    return fleet_status(settings, looked_now=True)
