"""Issue 5 on real Apache httpd: the rendered deploy files, a dedicated user = LT_IS_USER.

One httpd per variant (mod_wsgi daemon mode; mod_proxy → gunicorn), each started with
its own -f config and -D FOREGROUND on a free loopback port and stopped by signalling its
pid. The receiver runs as a user created for this module; everything it runs (interpreter,
venv, code) lives under a world-readable temp dir, since a checkout under /root (0700) is
unreadable to any other account.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from agent.demo import Install, free_port, make_install, write_sample_set
from conftest import REPO, VERSION, esmirror, session_from, set_files, spawn_listening, stop_session

APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
MODULES = Path("/usr/lib/apache2/modules")
SYSTEM_PYTHON = "/usr/bin/python3"
PREFIX = "/lizardtech/mirror"


def _why_not() -> str | None:
    if not os.path.exists(APACHE):
        return "apache2 is not installed (bash .ci/system-packages installs it)"
    if not (MODULES / "mod_wsgi.so").exists():
        return "mod_wsgi is not installed (libapache2-mod-wsgi-py3; bash .ci/system-packages)"
    if os.geteuid() != 0:
        return "needs root: creates a user and runs httpd's daemons as it"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON}: Debian's mod_wsgi embeds it"
    system = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                            capture_output=True, text=True).stdout.strip()
    if system != str(sys.version_info[:2]):
        return f"{SYSTEM_PYTHON} is {system}, tests run on {sys.version_info[:2]}: venv not copyable"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def build_venv(target: Path) -> Path:
    """A venv from Debian's python3 holding the project and its runtime deps (copied, ~0.3 s).

    mod_wsgi embeds /usr/bin/python3, so python-home must be a venv of that interpreter;
    copying this venv's site-packages avoids the network and a pip run.
    """
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(target)], check=True, timeout=60)
    src = Path(sysconfig.get_paths()["purelib"])
    dst = target / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    dev_only = ("pip", "_pytest", "pytest", "setuptools", "pkg_resources", "_distutils_hack", "pygments",
                "trustme", "iniconfig", "pluggy", "__editable__", "esmirror-", "distutils-precedence")

    def ignore(folder: str, names: list[str]) -> list[str]:
        skip = [n for n in names if n == "__pycache__"]
        if Path(folder) == src:
            skip += [n for n in names if n.startswith(dev_only)]
        return skip

    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
    for package in ("app", "agent"):
        shutil.copytree(REPO / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    script = target / "bin" / "esmirror"  # what pip's console_scripts would write
    script.write_text(f"#!{target}/bin/python\nimport sys\nfrom agent.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return target


@pytest.fixture(scope="module")
def world() -> Iterator[dict]:
    """A dedicated user, and a world-readable dir with a venv it can run."""
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="esmirror-apache-", dir="/tmp"))
    base.chmod(0o755)
    user = f"esm5-{uuid.uuid4().hex[:10]}"
    _run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", user)
    try:
        venv = build_venv(base / "venv")
        _run("chmod", "-R", "a+rX", str(base))
        account = pwd.getpwnam(user)
        yield {"base": base, "user": user, "uid": account.pw_uid, "gid": account.pw_gid, "venv": venv,
               "setup_seconds": time.monotonic() - started}
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def secondary_for(world: dict, name: str, ini: dict[str, str]) -> Install:
    """An install the test user owns the working dir of, with env.sh naming that user."""
    install = make_install(world["base"] / name, {"allow_push": "127.0.0.1", "express_version": VERSION,
                                                   **ini})
    (install.etc_dir / "env.sh").write_text(
        f'#!/bin/sh\nLT_IS_ROOT={install.root}/ImageServer\n# LT_IS_USER=nobody\n'
        f'export LT_IS_USER="{world["user"]}"\n')
    _run("chmod", "-R", "a+rX", str(install.root))
    _run("chown", "-R", f"{world['user']}:", str(install.data_dir))
    return install


def master_for(tmp_path: Path, port: int) -> Install:
    master = make_install(tmp_path / "master", {"express_version": VERSION}, [("127.0.0.1", port, "none")])
    write_sample_set(master.data_dir, tmp_path / "images", big_mb=3)
    return master


class Httpd:
    """apache2 -f CONF -D FOREGROUND; stop() signals that pid (never apache2 -k stop)."""

    def __init__(self, root: Path, port: int, body: str, modules: list[str], user: str) -> None:
        self.root, self.port = root, port
        (root / "run").mkdir(parents=True, exist_ok=True)
        loads = "\n".join(f"LoadModule {m}_module {MODULES}/mod_{m}.so" for m in modules)
        self.conf = root / "httpd.conf"
        self.conf.write_text(f"""ServerRoot "{root}"
DefaultRuntimeDir "{root}/run"
PidFile "{root}/run/httpd.pid"
Mutex file:{root}/run default
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
LoadModule mpm_event_module {MODULES}/mod_mpm_event.so
LoadModule authz_core_module {MODULES}/mod_authz_core.so
LoadModule authz_host_module {MODULES}/mod_authz_host.so
{loads}
User {user}
Group {user}
ErrorLog "{root}/error.log"
LogLevel warn
{body}
""")
        _run("chmod", "-R", "a+rX", str(root))
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        path = self.root / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start(self, wait: float = 30.0) -> "Httpd":
        try:
            self.proc = spawn_listening([APACHE, "-f", str(self.conf), "-D", "FOREGROUND"], self.port,
                                        self.root / "httpd.out", wait,
                                        env={"PATH": os.environ.get("PATH", ""), "LANG": "C"})
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log()}") from None
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # httpd stops its children (mod_wsgi daemons too)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)


def render(install: Install, out: Path, *extra: str) -> Path:
    rc, _, text = esmirror("deploy", "apache", "--install-dir", str(install.root), "--out", str(out),
                           "--httpd-conf", "", *extra)  # this test's httpd, not the machine's
    assert rc == 0, text
    _run("chmod", "-R", "a+rX", str(out))
    return out


def publish_owned_by(master: Install, secondary: Install, user: str, log) -> dict:
    """Publish through httpd; the set arrives whole and every file written belongs to ``user``."""
    rc, report, text = esmirror("publish", "--install-dir", str(master.root), "--json")
    assert rc == 0, f"{text}\n{log()}"
    assert report["secondaries"][0]["state"] == "in-sync"
    assert set_files(secondary.data_dir) == set_files(master.data_dir)
    # set, state and archive: all written by the receiver as LT_IS_USER
    assert {pwd.getpwuid(p.stat().st_uid).pw_name for p in secondary.data_dir.rglob("*")} == {user}
    return report


def test_publish_through_mod_wsgi_daemon_as_lt_is_user(world, tmp_path):
    port = free_port()
    secondary = secondary_for(world, "wsgi-secondary", {})
    out = render(secondary, world["base"] / "wsgi-rendered", "--venv", str(world["venv"]))
    snippet = (out / "esmirror-wsgi.conf").read_text()
    assert f"user={world['user']}" in snippet and "LimitRequestBody 4294967296" in snippet
    httpd = Httpd(world["base"] / "httpd-wsgi", port, f"""WSGISocketPrefix {world['base']}/httpd-wsgi/run/wsgi
Include {out}/esmirror-wsgi.conf""", ["wsgi"], world["user"])
    master = master_for(tmp_path, port)
    # httpd runs under Debian's LANG=C: the daemon's lang/locale let it write names beyond ASCII
    (master.data_dir / "indexes" / "café-ü.idx").write_bytes(os.urandom(100))
    try:
        httpd.start()
        publish_owned_by(master, secondary, world["user"], httpd.log)
        # the daemon's umask=0027: what it writes is owner and group only, whatever httpd's umask
        modes = {oct((secondary.data_dir / rel).stat().st_mode & 0o777) for rel in set_files(secondary.data_dir)}
        assert modes == {"0o640"}, modes

        url = f"http://127.0.0.1:{port}{PREFIX}"
        # WSGIChunkedRequest On: a chunked body reaches the app (its JSON 411), not httpd's own 411
        chunked = session_from("127.0.0.1").put(f"{url}/blobs/{'0' * 64}", data=iter([b"x"]), timeout=30)
        assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
        # Require ip: a stranger is turned away by httpd itself, before the app
        stranger = session_from("127.0.0.2").get(f"{url}/manifest", timeout=30)
        assert stranger.status_code == 403 and "<html" in stranger.text.lower()
        # a second, unchanged publish sends nothing
        rc, report, text = esmirror("publish", "--install-dir", str(master.root), "--json")
        assert rc == 0 and report["secondaries"][0]["bytes_sent"] == 0, text
    finally:
        httpd.stop()
    assert "Segmentation" not in httpd.log() and "undefined symbol" not in httpd.log()


def test_delta_through_mod_wsgi_when_the_master_is_only_in_allow_push(world, tmp_path):
    """chunks/ and delta/ are push routes: httpd must let allow_push reach them, not only allow_admin.

    The master (127.0.0.1) is left out of allow_admin, as a master on another host is.
    """
    port = free_port()
    secondary = secondary_for(world, "delta-secondary", {"allow_admin": "127.0.0.9"})
    out = render(secondary, world["base"] / "delta-rendered", "--venv", str(world["venv"]))
    httpd = Httpd(world["base"] / "httpd-delta", port, f"""WSGISocketPrefix {world['base']}/httpd-delta/run/wsgi
Include {out}/esmirror-wsgi.conf""", ["wsgi"], world["user"])
    master = master_for(tmp_path, port)
    big = master.data_dir / "indexes" / "orthos-2024.idx"
    big.write_bytes(os.urandom(6 * 1024 * 1024))  # above the delta threshold (4 MiB)
    try:
        httpd.start()
        publish_owned_by(master, secondary, world["user"], httpd.log)
        with open(big, "r+b") as fh:  # one chunk rewritten in place, same size
            fh.seek(3 * 1024 * 1024)
            fh.write(os.urandom(256 * 1024))
        report = publish_owned_by(master, secondary, world["user"], httpd.log)
        # the rebuilt file went as a delta: about the changed chunk, not the whole 6 MiB
        assert report["secondaries"][0]["bytes_sent"] < 1024 * 1024, report

        # a streamed delta (chunked, as the master sends one during its scan) reaches the app
        # through mod_wsgi (WSGIChunkedRequest On) and rebuilds: here, a copy of the file itself
        content = big.read_bytes()
        sha = hashlib.sha256(content).hexdigest()
        body = [f'{{"size": {len(content)}, "bases": [{{"sha256": "{sha}", "path": '
                f'"indexes/orthos-2024.idx"}}]}}\n'.encode(), f"C 0 0 {len(content)}\n".encode(),
                f"E {sha}\n".encode()]
        streamed = session_from("127.0.0.1").post(f"http://127.0.0.1:{port}{PREFIX}/delta",
                                                  data=iter(body), timeout=30)
        assert streamed.status_code == 201, streamed.text
        assert streamed.json()["sha256"] == sha
    finally:
        httpd.stop()


def _exec_start(unit: str) -> list[str]:
    line = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
    return shlex.split(line.split("=", 1)[1])


def test_publish_through_mod_proxy_to_gunicorn_as_lt_is_user(world, tmp_path):
    port, open_port, backend_port = free_port(), free_port(), free_port()
    # 1M cap: the 3 MB index crosses httpd in parts (LimitRequestBody = max_upload_bytes)
    secondary = secondary_for(world, "proxy-secondary", {"trusted_proxies": "127.0.0.1",
                                                         "max_upload_bytes": "1M"})
    backend = f"127.0.0.1:{backend_port}"
    out = render(secondary, world["base"] / "proxy-rendered", "--venv", str(world["venv"]),
                 "--backend", backend)
    unit = (out / "esmirror-receiver.service").read_text()
    assert f"User={world['user']}" in unit
    snippet = (out / "esmirror-proxy.conf").read_text()
    assert "LimitRequestBody 1048576" in snippet
    # a second vhost with httpd's own Require lifted shows the app's trusted_proxies at work
    open_copy = world["base"] / "proxy-open.conf"
    open_copy.write_text("\n".join("    Require all granted" if l.strip().startswith("Require ") else l
                                   for l in snippet.splitlines()))
    httpd = Httpd(world["base"] / "httpd-proxy", port, f"""Listen 127.0.0.1:{open_port}
<VirtualHost 127.0.0.1:{port}>
Include {out}/esmirror-proxy.conf
</VirtualHost>
<VirtualHost 127.0.0.1:{open_port}>
Include {open_copy}
</VirtualHost>""", ["proxy", "proxy_http"], world["user"])
    master = master_for(tmp_path, port)
    # exactly the unit's ExecStart, as the unit's User (what systemd would do)
    # (HOME as a service account's often is: not its to write)
    env = {"PATH": "/usr/bin:/bin", "ESMIRROR_INSTALL_DIR": str(secondary.root), "LANG": "C.UTF-8",
           "HOME": "/"}
    gunicorn = spawn_listening(_exec_start(unit), backend_port, tmp_path / "gunicorn.log", user=world["uid"],
                               group=world["gid"], extra_groups=[], env=env,
                               cwd=str(secondary.root / "ImageServer"))
    try:
        httpd.start()
        report = publish_owned_by(master, secondary, world["user"], httpd.log)

        stranger = session_from("127.0.0.2")
        # httpd's Require ip refuses first...
        denied = stranger.get(f"http://127.0.0.1:{port}{PREFIX}/manifest", timeout=30)
        assert denied.status_code == 403 and "<html" in denied.text.lower()
        # ...and without it the app still sees the caller, not the proxy (X-Forwarded-For)
        through = stranger.get(f"http://127.0.0.1:{open_port}{PREFIX}/manifest", timeout=30)
        assert through.status_code == 403, through.text
        assert "127.0.0.2" in through.json()["error"]
        # the master's own address, through the same open vhost, is admitted
        allowed = session_from("127.0.0.1").get(f"http://127.0.0.1:{open_port}{PREFIX}/manifest", timeout=30)
        assert allowed.status_code == 200 and allowed.json()["digest"] == report["digest"]
        # the status page names the server as its visitor addressed it, not gunicorn's
        # loopback port (every proxied server of a fleet would show the same name)
        page = session_from("127.0.0.1").get(f"http://127.0.0.1:{open_port}{PREFIX}/", timeout=30)
        assert page.status_code == 200 and f"esmirror status: 127.0.0.1:{open_port}" in page.text, page.text
    finally:
        httpd.stop()
        stop_session(gunicorn)
    assert "[ERROR]" not in (tmp_path / "gunicorn.log").read_text()
