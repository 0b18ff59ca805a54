"""``esmirror demo`` and the pieces tests reuse: make Express-shaped installs, run receivers."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import click

from app.core.manifest import scan
from app.core.settings import DEFAULT_PREFIX, load_settings

from .signals import on_stop_signals

SAMPLE_CATALOGS = """<?xml version="1.0" encoding="UTF-8"?>
<CatalogConfig>
  <Globals><Property name="MaxImageSize" value="4096"/></Globals>
  <Catalog name="orthos-2024" enabled="true">
    <Path>{images}/orthos</Path>
    <SpatialIndex>indexes/orthos-2024.idx</SpatialIndex>
  </Catalog>
  <Catalog name="elevation">
    <Path>{images}/dem</Path>
  </Catalog>
  <Catalog name=".staging">
    <Path>{images}/staging</Path>
  </Catalog>
  <MultiCatalog name="basemap">
    <SubCatalog name="orthos-2024"/>
    <SubCatalog name="elevation"/>
  </MultiCatalog>
</CatalogConfig>
"""


@dataclass
class Install:
    """One Express-Server-shaped install dir on disk."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "ImageServer" / "var" / "data"

    @property
    def etc_dir(self) -> Path:
        return self.root / "ImageServer" / "etc"


def make_install(root: Path, ini: dict[str, str] | None = None,
                 mirrors: Iterable[tuple[str, int, str]] = ()) -> Install:
    """An install dir with esmirror.ini and, for a master, a Mirrors list in iserv-cfg.xml."""
    install = Install(root)
    install.etc_dir.mkdir(parents=True, exist_ok=True)
    install.data_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[esmirror]"] + [f"{k} = {v}" for k, v in (ini or {}).items()]
    (install.etc_dir / "esmirror.ini").write_text("\n".join(lines) + "\n", encoding="utf-8")
    secondaries = "".join(f'    <Secondary host="{h}" port="{p}" ssl="{s}"/>\n' for h, p, s in mirrors)
    mirrors_xml = f"  <Mirrors>\n{secondaries}  </Mirrors>\n" if secondaries else ""
    (install.etc_dir / "iserv-cfg.xml").write_text(
        '<?xml version="1.0"?>\n<ImageServer>\n  <ImageManager/>\n' + mirrors_xml + "</ImageServer>\n",
        encoding="utf-8")
    return install


def write_sample_set(data_dir: Path, images: Path, big_mb: int = 8) -> None:
    """catalogs.xml, a few index and overview files, one of several MB."""
    for sub in ("orthos", "dem", "staging"):
        (images / sub).mkdir(parents=True, exist_ok=True)
    (data_dir / "catalogs.xml").write_text(SAMPLE_CATALOGS.format(images=images), encoding="utf-8")
    (data_dir / "indexes").mkdir(exist_ok=True)
    (data_dir / "overviews").mkdir(exist_ok=True)
    for i in range(5):
        (data_dir / "indexes" / f"tile-{i}.idx").write_bytes(os.urandom(4096 + 1000 * i))
    (data_dir / "overviews" / "basemap.ovr").write_bytes(os.urandom(64 * 1024))
    with open(data_dir / "indexes" / "orthos-2024.idx", "wb") as fh:
        for _ in range(big_mb):
            fh.write(os.urandom(1024 * 1024))


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different free ports: all are held open while they are picked (one picked
    and closed at a time, the kernel may hand the same port out twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait while a child is spawned: one that came while Popen
    waited for the exec left the child running, unknown to stop(), for ever (in a session
    of its own). Raised as KeyboardInterrupt once the child is known."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # (signals are the main thread's)
        yield
        return
    held: list[int] = []
    before = on_stop_signals(lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    if held:
        raise KeyboardInterrupt


class Receiver:
    """``esmirror serve`` in a child process; stop() ends it and everything it started."""

    def __init__(self, install: Install, port: int, server: str = "waitress", host: str = "127.0.0.1",
                 extra: Iterable[str] = (), env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.install, self.port, self.server, self.host = install, port, server, host
        self.extra, self.env, self.log = list(extra), env, log
        self.proc: subprocess.Popen[bytes] | None = None
        scheme = "https" if "--certfile" in self.extra else "http"
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{shown}:{port}{DEFAULT_PREFIX}"

    def start(self, wait: float = 20.0) -> "Receiver":
        self.stop()  # a second start must not orphan the first process
        bind = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        argv = [sys.executable, "-m", "agent", "serve", "--install-dir", str(self.install.root),
                "--bind", bind, "--server", self.server, *self.extra]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            with _stops_held():
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                             env={**os.environ, **(self.env or {})},
                                             start_new_session=True)
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]  # the child has its own copy
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver on port {self.port} exited with {self.proc.returncode}"
                                   + (f"; see {self.log}" if self.log else ""))
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"receiver on port {self.port} did not start within {wait:g} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self._end(force=False)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._end(force=True)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self._end(force=True)
            self.proc.wait(timeout=15)

    def _end(self, force: bool) -> None:
        assert self.proc is not None
        if os.name == "nt":  # (no process groups, nor SIGKILL: the one process, ended)
            self.proc.kill()
        else:  # the group: gunicorn's workers with their arbiter
            os.killpg(self.proc.pid, signal.SIGKILL if force else signal.SIGTERM)


def same_tree(a: Path, b: Path) -> bool:
    return scan(a).manifest.digest == scan(b).manifest.digest


def run_demo(keep: bool = False) -> int:
    from app.core.express import select_secondaries

    from .fleet import publish
    from .report import print_publish

    base = Path(tempfile.mkdtemp(prefix="esmirror-demo-"))
    receivers: list[Receiver] = []
    try:  # (from here: a stop at any point removes the folder)
        ports = free_ports(2)
        secondaries = [make_install(base / f"secondary{i + 1}",
                                    {"allow_push": "127.0.0.1", "express_version": "10.1.0"})
                       for i in range(2)]
        master = make_install(base / "master", {"express_version": "10.1.0"},
                              [("127.0.0.1", port, "none") for port in ports])
        write_sample_set(master.data_dir, base / "images")
        click.echo(f"demo in {base}")
        click.echo(f"master    {master.root}")
        receivers += [Receiver(s, p, log=base / f"secondary{i + 1}.log")
                      for i, (s, p) in enumerate(zip(secondaries, ports))]
        for r, s in zip(receivers, secondaries):
            r.start()
            click.echo(f"secondary {s.root} receiving at {r.url}")
        settings = load_settings(master.root)
        report = publish(settings, select_secondaries(settings))
        click.echo("")
        print_publish(report)
        click.echo("")
        all_same = True
        for s in secondaries:
            same = same_tree(master.data_dir, s.data_dir)
            all_same &= same
            files = len(scan(s.data_dir).manifest.files)
            click.echo(f"{s.root.name}: {files} files, "
                       f"{'identical to the master' if same else 'DIFFERENT from the master'}")
        ok = report.ok and all_same
        click.echo("demo: both secondaries in sync" if ok else "demo: FAILED", err=not ok)
        return 0 if ok else 1
    finally:
        with _stops_held():  # (a second stop must not cut the clean-up short)
            for r in receivers:
                r.stop()
            if keep:
                click.echo(f"kept {base}")
            else:
                import shutil
                shutil.rmtree(base, ignore_errors=True)
