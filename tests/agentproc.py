"""Helpers for the issue-6 tests: a real ``esmirror agent`` subprocess, the master's receiver."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import requests

from agent.demo import Install
from conftest import REPO, stop_session

# retries come fast and are bounded: the tests' backoff bound
FAST_AGENT = {"retry_initial": "0.2", "retry_max": "1", "check_interval": "1"}


class AgentProcess:
    """``esmirror agent`` in a child process (its own session, so stop() ends all of it)."""

    def __init__(self, install: Install, log: Path, env: dict[str, str] | None = None) -> None:
        self.install, self.log, self.env = install, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "AgentProcess":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "agent", "--install-dir", str(self.install.root)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            env={**os.environ, **(self.env or {})})
        out.close()
        return self

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Poll until ``probe()`` is truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {json.dumps(last, default=str)[:2000]})")


def audit_lines(install: Install) -> list[dict[str, Any]]:
    path = install.data_dir / ".esmirror" / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
