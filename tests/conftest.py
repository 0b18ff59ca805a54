"""Fixtures: Express-shaped install dirs and real receivers on loopback."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests
from requests.adapters import HTTPAdapter

from agent.demo import Install, Receiver, free_port, free_ports, make_install, write_sample_set

REPO = Path(__file__).resolve().parent.parent
VERSION = "10.1.0"


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start ``esmirror serve`` for an install; every receiver is stopped at teardown."""
    started: list[Receiver] = []

    def start(install: Install, server: str = "waitress", port: int | None = None,
              **kwargs: object) -> Receiver:
        log = tmp_path / f"receiver-{len(started)}.log"
        receiver = Receiver(install, port or free_port(), server=server, log=log, **kwargs)  # type: ignore[arg-type]
        started.append(receiver)
        return receiver.start()

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder every account can reach (pytest's tmp_path is root's only), removed after."""
    base = Path(tempfile.mkdtemp(prefix="esmirror-open-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def as_nobody() -> list[str]:
    """The command prefix that runs a process as nobody, whom permissions bind (root's do not);
    a skip where that cannot be done."""
    import pwd

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv, to run the CLI as another account")
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    if subprocess.run([*prefix, sys.executable, "-c", "import agent.cli"], cwd=REPO,
                      capture_output=True).returncode != 0:
        pytest.skip(f"{REPO} is not readable by nobody")
    return prefix


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[..., "Fleet"]]:
    """A master and N secondaries with receivers running; ``server`` picks waitress or gunicorn."""
    built: list[Fleet] = []

    def build(count: int = 2, server: str = "waitress", secondary_ini: dict | None = None,
              master_ini: dict | None = None, start: bool = True) -> Fleet:
        ports = free_ports(count)
        secondaries = []
        for i in range(count):
            ini = {"allow_push": "127.0.0.1", "express_version": VERSION, **(secondary_ini or {})}
            secondaries.append(make_install(tmp_path / f"secondary{i + 1}", ini))
        master = make_install(tmp_path / "master", {"express_version": VERSION, **(master_ini or {})},
                              [("127.0.0.1", p, "none") for p in ports])
        write_sample_set(master.data_dir, tmp_path / "images", big_mb=3)
        receivers = [Receiver(s, p, server=server, log=tmp_path / f"secondary{i + 1}.log")
                     for i, (s, p) in enumerate(zip(secondaries, ports))]
        fleet = Fleet(master, secondaries, receivers)
        built.append(fleet)
        if start:
            for r in receivers:
                r.start()
        return fleet

    yield build
    for fleet in built:
        fleet.stop()


class Fleet:
    def __init__(self, master: Install, secondaries: list[Install], receivers: list[Receiver]) -> None:
        self.master, self.secondaries, self.receivers = master, secondaries, receivers

    def stop(self) -> None:
        for r in self.receivers:
            r.stop()

    def publish(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict | None, str]:
        return esmirror("publish", "--install-dir", str(self.master.root), "--json", *args, env=env)


def esmirror(*args: str, env: dict[str, str] | None = None,
             timeout: float = 120) -> tuple[int, dict | None, str]:
    """Run the real CLI; (exit code, parsed JSON stdout or None, stderr)."""
    done = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    try:
        data = json.loads(done.stdout) if done.stdout.strip().startswith(("{", "[")) else None
    except ValueError:
        data = None
    return done.returncode, data, done.stdout + done.stderr


def tree(root: Path) -> dict[str, str]:
    """relative path → sha256 of every file under ``root`` (state dirs included: nothing hides)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def set_files(data_dir: Path) -> dict[str, str]:
    """The configuration set part of a working dir: without archive/ and .esmirror/."""
    return {p: h for p, h in tree(data_dir).items()
            if not p.startswith(("archive/", ".esmirror/"))}


def held_files(data_dir: Path) -> list[dict[str, object]]:
    """The set a working dir holds, as a commit lists it ({path, sha256, size} by path)."""
    from app.core.manifest import scan
    return scan(data_dir).manifest.to_list()


class SourceAddressAdapter(HTTPAdapter):
    """Send from a chosen loopback address, to act as another host."""

    def __init__(self, source: str, **kwargs: object) -> None:
        self.source = source
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]


def session_from(source: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", SourceAddressAdapter(source))
    return session


def spawn_listening(argv: list[str], port: int, log: Path, wait: float = 30.0, host: str = "127.0.0.1",
                    **popen: object) -> subprocess.Popen:
    """Start a server in its own session; return once it accepts on host:port (or raise with its log)."""
    import socket
    import time

    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                **popen)  # type: ignore[call-overload]
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.05)
    stop_session(proc)
    raise RuntimeError(f"{argv[0]} did not listen on {host}:{port} within {wait:g} s")


def unmount_all(mounted: list[Path]) -> None:
    """Unmount what a test mounted, newest first (lazily if something still holds it)."""
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def stop_session(proc: subprocess.Popen, signum: int = 15) -> None:
    """Signal the process's session (SIGTERM by default), then SIGKILL if it lingers."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signum)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass


def tree_state(data_dir: Path) -> dict[str, str]:
    """``tree`` minus what may change without the set or archive changing: the hash cache,
    the signed-push nonce store and the audit log (refusals are recorded there)."""
    return {p: h for p, h in tree(data_dir).items()
            if p != ".esmirror/hashcache.json"
            and not p.startswith((".esmirror/nonces/", ".esmirror/audit.log"))}
