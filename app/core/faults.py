"""Deterministic crash points for the fault-injection tests.

``ESMIRROR_CRASH_AT=name:N`` kills this process with SIGKILL the N-th time the
code passes the point ``name``. Unset (always, outside tests) it costs one dict
lookup. With ``ESMIRROR_CRASH_ONCE=FILE`` the kill happens once per server, not
once per process: the file is created just before it, and its presence disarms
the point (gunicorn restarts a killed worker with the same environment); the passes
are then counted in ``FILE.count``, across the server's worker processes.
"""
from __future__ import annotations

import os
import signal
import threading

_counts: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    spec = os.environ.get("ESMIRROR_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    once = os.environ.get("ESMIRROR_CRASH_ONCE")
    with _lock:
        if once:  # counted across the server's processes (gunicorn: part 1 in one worker, 2 in another)
            fd = os.open(once + ".count", os.O_CREAT | os.O_APPEND | os.O_WRONLY)
            try:
                os.write(fd, b".")
                count = os.lseek(fd, 0, os.SEEK_CUR)  # (where our own byte went: this pass's number)
            finally:
                os.close(fd)
        else:
            _counts[name] = _counts.get(name, 0) + 1
            count = _counts[name]
        hit = count == int(nth or 1)
    if hit:
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
