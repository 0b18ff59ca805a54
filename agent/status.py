"""Look at every secondary now (browse), note what it holds in the ledger, and report the fleet."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from app.core.errors import ConfigError, MirrorError, RemoteError
from app.core.express import Secondary, select_secondaries
from app.core.ledger import Ledger, fleet_status
from app.core.settings import Settings

from .client import SecondaryClient, unforeseen
from .push import Refused, check_peer, twin_refusal

log = logging.getLogger("esmirror.agent")


def check_one(settings: Settings, secondary: Secondary, mine: dict[str, Any],
              fine: dict[Secondary, dict[str, Any]] | None = None) -> Callable[[Ledger], None]:
    """One browse: what the secondary holds, whether it drifted, whether it refuses us.
    Returns how to record it (the caller decides whether it still may). A secondary found
    fine goes in ``fine``, with its answer (for the twins' check)."""
    client = None
    asked = time.time()  # (a push that ends while this browse is under way knows better)
    try:
        client = SecondaryClient(secondary, settings)
        info = client.browse()
    except RemoteError as exc:
        message = exc.message
        # it answered, but not to us (403, TLS, not an esmirror receiver): refused
        refused = exc.details.get("kind") != "unreachable"
        return lambda ledger: ledger.record_unreachable(secondary, message, refused=refused)
    except MirrorError as exc:  # a strict secondary without ca-bundle.crt, say
        message = exc.message
        return lambda ledger: ledger.record_unreachable(secondary, message, refused=True)
    except Exception as exc:  # a bug meeting an answer nobody foresaw: this secondary, not all
        message = unforeseen(secondary, "check", exc)
        return lambda ledger: ledger.record_unreachable(secondary, message, refused=True)
    finally:
        if client is not None:
            client.close()
    try:
        check_peer(secondary, info, mine)
        why = None
        if fine is not None:
            fine[secondary] = info
    except Refused as exc:
        why = exc.message
    return lambda ledger: ledger.record_contact(secondary, info, why, asked=asked)


def _record_twins(ledger: Ledger, secondaries: list[Secondary], fine: dict[Secondary, dict[str, Any]]) -> None:
    """One receiver that answered under two Mirrors names: the later-listed one is refused, as
    a publish refuses the name it reaches second (a look must not take that as fixed). By
    Mirrors order, so that each look names the same one."""
    first: dict[str, Secondary] = {}
    for secondary in secondaries:
        info = fine.get(secondary, {})
        receiver = info.get("self")
        if not isinstance(receiver, str):
            continue
        twin = first.setdefault(receiver, secondary)
        if twin != secondary:
            # (after this look's own record of it, which it amends)
            ledger.record_contact(secondary, info, twin_refusal(secondary.name, twin.name, receiver))


def check_fleet(settings: Settings, secondaries: list[Secondary] | None = None,
                patience: float | None = None) -> list[Secondary]:
    """Browse every secondary and record what each answered. Returns those still
    unanswered after ``patience`` seconds (None: wait for every browse's own limits);
    what they answer later is not recorded, so the caller's report of them stands.

    Daemon threads, not a pool: a secondary that never answers must not keep the agent
    (whose periodic look this is) or ``status`` from exiting. 16 at a time for the agent;
    with a patience, each its own (one at the back of a queue would go unasked)."""
    from .fleet import master_identity

    secondaries = secondaries if secondaries is not None else select_secondaries(settings)
    mine = master_identity(settings)
    fine: dict[Secondary, dict[str, Any]] = {}
    todo: queue.SimpleQueue[Secondary] = queue.SimpleQueue()
    for secondary in secondaries:
        todo.put(secondary)
    unanswered = set(secondaries)
    failed: list[Exception] = []
    gate, late = threading.Lock(), threading.Event()

    def work() -> None:
        while True:
            try:
                secondary = todo.get_nowait()
            except queue.Empty:
                return
            record = check_one(settings, secondary, mine, fine)
            with gate:  # (recorded whole before the deadline, or not at all)
                if late.is_set():
                    return
                try:
                    record(Ledger(settings))
                except OSError as exc:  # its answer cannot be recorded (a full disk): say so, go on
                    log.warning("cannot record what %s answered: %s: %s", secondary.name,
                                exc.filename or "the ledger", exc.strerror or exc)
                except Exception as exc:  # a damaged ledger, say: the caller says it, once
                    failed.append(exc)
                    return
                unanswered.discard(secondary)

    at_once = 16 if patience is None else 256
    workers = [threading.Thread(target=work, name="look", daemon=True)
               for _ in range(max(1, min(at_once, len(secondaries))))]
    for worker in workers:
        worker.start()
    deadline = None if patience is None else time.monotonic() + patience
    for worker in workers:
        worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    with gate:
        late.set()
        if failed:
            raise failed[0]
        try:
            _record_twins(Ledger(settings), secondaries, {s: a for s, a in fine.items() if s not in unanswered})
        except OSError as exc:  # (as for each answer above)
            log.warning("cannot record the twins this look found: %s: %s", exc.filename or "the ledger",
                        exc.strerror or exc)
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
