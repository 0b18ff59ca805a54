"""Look at every secondary now (browse), note what it holds in the ledger, and report the fleet."""
from __future__ import annotations

import concurrent.futures as cf
from typing import Any

from app.core.errors import MirrorError, RemoteError
from app.core.express import Secondary, select_secondaries
from app.core.ledger import Ledger, fleet_status
from app.core.settings import Settings

from .client import SecondaryClient, unforeseen
from .push import Refused, check_peer


def check_one(settings: Settings, secondary: Secondary, mine: dict[str, Any]) -> None:
    """One browse: what the secondary holds, whether it drifted, whether it refuses us."""
    ledger = Ledger(settings)
    client = None
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
    ledger.record_contact(secondary, info, refused)


def check_fleet(settings: Settings, secondaries: list[Secondary] | None = None) -> None:
    """Browse every secondary in parallel and record what each answered."""
    from .fleet import master_identity

    secondaries = secondaries if secondaries is not None else select_secondaries(settings)
    mine = master_identity(settings)
    with cf.ThreadPoolExecutor(max(1, min(16, len(secondaries)))) as pool:
        list(pool.map(lambda s: check_one(settings, s, mine), secondaries))


def live_status(settings: Settings) -> dict[str, Any]:
    """``esmirror status``: look now, then report from the ledger (the same view as the page)."""
    check_fleet(settings)
    return fleet_status(settings)
