"""Stop signals: how a command, the agent and the demo take SIGTERM, SIGHUP and Ctrl-C."""
from __future__ import annotations

from typing import Any


def on_stop_signals(handler: Any, names: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGHUP")) -> dict[int, Any]:
    """``handler`` for the stop signals this platform has (Windows: no SIGHUP), but one found
    ignored stays ignored: nohup's SIGHUP, which a logout must not turn into a stop. Returns
    the handlers it replaced, by signal number."""
    import signal

    replaced = {}
    for name in names:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            replaced[signum] = signal.signal(signum, handler)
    return replaced


def stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP (a stopped job, a closed terminal or ssh session) end a command as
    Ctrl-C does: what it started is stopped and what it did is recorded, not cut off mid-way."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    on_stop_signals(interrupt, ("SIGTERM", "SIGHUP"))
