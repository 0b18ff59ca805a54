"""Full push behind Apache httpd, side by side: ``python -m bench.apache`` (as root).

The deploy templates as rendered (mod_wsgi daemon mode; mod_proxy in front of gunicorn),
the receiver standalone under gunicorn, and plain rsync, each taking the standard set
into an empty destination, alternating in the same minutes. Needs what the test suite's
Apache harness needs (root, Debian's apache2 and libapache2-mod-wsgi-py3, which
``make test`` installs) and borrows it (tests/test_apache.py): a user created as
LT_IS_USER, a venv it can read, httpd started with its own config on loopback ports.

Nothing is deleted while it runs: a destination is set aside, since on an ext4 without a
journal every file created within minutes of many deletions costs more (see the README).
For the same reason it waits ``--settle`` seconds after building the set. A destination
that does not end up holding the master's set exits 1; timings never do.
"""
from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from agent.demo import Receiver, free_ports, make_install
from app.core.manifest import HASH_CACHE_FILE, HashCache, scan

from .harness import EXCLUDES, REPO, STANDARD, VERSION, RsyncDaemon, compile_sources, make_set, set_digest

SETUPS = ("mod_wsgi", "mod_proxy", "gunicorn", "rsync")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.apache", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=4, help="runs per set-up (default 4)")
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait after building "
                        "the set (default 300: ext4's recently-deleted window)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to work")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    import test_apache as harness  # the test suite's Apache harness (needs pytest: make setup)

    why = harness._why_not()
    if why:
        print(f"bench.apache: {why}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="esmirror-bench-apache-", dir=args.dir))
    base.chmod(0o755)
    user = f"esmb-{uuid.uuid4().hex[:8]}"
    harness._run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                 "/nonexistent", "--shell", "/usr/sbin/nologin", user)
    running: list = []
    try:
        return _run(args, base, user, harness, running)
    finally:
        for server in reversed(running):
            server.stop()
        subprocess.run(["userdel", user], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _run(args: argparse.Namespace, base: Path, user: str, harness, running: list) -> int:  # noqa: ANN001
    log = sys.stderr
    venv = harness.build_venv(base / "venv")
    harness._run("chmod", "-R", "a+rX", str(base))
    account = pwd.getpwnam(user)
    world = {"base": base, "user": user, "uid": account.pw_uid, "gid": account.pw_gid, "venv": venv}
    make_set(base / "set", base / "images", STANDARD)
    ports = dict(zip(("mod_wsgi", "mod_proxy", "backend", "gunicorn"), free_ports(4)))

    wsgi = harness.secondary_for(world, "mod_wsgi", {})
    rendered = harness.render(wsgi, base / "rendered-wsgi", "--venv", str(venv))
    wsgi_httpd = harness.Httpd(base / "httpd-wsgi", ports["mod_wsgi"],
                               f"WSGISocketPrefix {base}/httpd-wsgi/run/wsgi\n"
                               f"Include {rendered}/esmirror-wsgi.conf", ["wsgi"], user)
    proxied = harness.secondary_for(world, "mod_proxy", {"trusted_proxies": "127.0.0.1"})
    rendered = harness.render(proxied, base / "rendered-proxy", "--venv", str(venv),
                              "--backend", f"127.0.0.1:{ports['backend']}")
    proxy_httpd = harness.Httpd(base / "httpd-proxy", ports["mod_proxy"],
                                f"<VirtualHost 127.0.0.1:{ports['mod_proxy']}>\n"
                                f"Include {rendered}/esmirror-proxy.conf\n</VirtualHost>",
                                ["proxy", "proxy_http"], user)
    backend = Receiver(proxied, ports["backend"], server="gunicorn", log=base / "backend.log")
    alone_install = make_install(base / "gunicorn", {"allow_push": "127.0.0.1", "express_version": VERSION})
    alone = Receiver(alone_install, ports["gunicorn"], server="gunicorn", log=base / "gunicorn.log")
    (base / "rsyncd").mkdir()
    rsyncd = RsyncDaemon(base / "rsyncd", {"plain": base / "rsync-dest"})
    running += [wsgi_httpd, proxy_httpd, backend, alone, rsyncd]

    master = make_install(base / "master", {"express_version": VERSION},
                          [("127.0.0.1", ports[n], "none") for n in ("mod_wsgi", "mod_proxy", "gunicorn")])
    master.data_dir.rmdir()
    os.replace(base / "set", master.data_dir)
    compile_sources()
    for server in running:
        server.start()
    print(f"waiting {args.settle:.0f} s (set built, nothing deleted since)", file=log, flush=True)
    time.sleep(args.settle)
    # the master's hash cache as a master at rest has it (its files are settled by now)
    want = scan(master.data_dir, HashCache(master.data_dir / ".esmirror" / HASH_CACHE_FILE)).manifest.digest

    trash = base / "set-aside"
    trash.mkdir()
    apache_url = {n: f"http://127.0.0.1:{ports[n]}{harness.PREFIX}" for n in ("mod_wsgi", "mod_proxy")}

    def emptied(path: Path, tag: str, owner: str | None = None) -> None:
        os.replace(path, trash / tag)
        path.mkdir()
        if owner:
            harness._run("chown", f"{owner}:", str(path))

    def publish_to(name: str, url: str, data: Path) -> float:
        time.sleep(2.5)  # at rest: writes older than the racy window, the secondary browsed once
        urllib.request.urlopen(f"{url}/browse", timeout=600).read()
        os.sync()
        argv = [sys.executable, "-m", "agent", "publish", "--install-dir", str(master.root), "--json",
                "--secondary", f"127.0.0.1:{ports[name]}"]
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - start
        if done.returncode != 0 or set_digest(data) != want:
            raise RuntimeError(f"{name}: the publish failed or left another set "
                               f"(exit {done.returncode}):\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
        return seconds

    def run_wsgi(rep: int) -> float:
        wsgi_httpd.stop()
        emptied(wsgi.data_dir, f"wsgi-{rep}", user)
        wsgi_httpd.start()
        return publish_to("mod_wsgi", apache_url["mod_wsgi"], wsgi.data_dir)

    def run_proxy(rep: int) -> float:
        backend.stop()
        emptied(proxied.data_dir, f"proxy-{rep}", user)
        backend.start()
        return publish_to("mod_proxy", apache_url["mod_proxy"], proxied.data_dir)

    def run_alone(rep: int) -> float:
        alone.stop()
        emptied(alone_install.data_dir, f"gunicorn-{rep}")
        alone.start()
        return publish_to("gunicorn", alone.url, alone_install.data_dir)

    def run_rsync(rep: int) -> float:
        emptied(base / "rsync-dest", f"rsync-{rep}")
        time.sleep(2.5)
        os.sync()
        start = time.perf_counter()
        subprocess.run(["rsync", "-a", *EXCLUDES, f"{master.data_dir}/", rsyncd.url("plain")], check=True)
        seconds = time.perf_counter() - start
        if set_digest(base / "rsync-dest") != want:
            raise RuntimeError("rsync: the module does not hold the master's set")
        return seconds

    runs: dict[str, Callable[[int], float]] = {"mod_wsgi": run_wsgi, "mod_proxy": run_proxy,
                                               "gunicorn": run_alone, "rsync": run_rsync}
    times: dict[str, list[float]] = {name: [] for name in SETUPS}
    try:
        for rep in range(args.reps):
            for name in SETUPS:
                times[name].append(runs[name](rep))
            print(f"  run {rep + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in SETUPS),
                  file=log, flush=True)
    except RuntimeError as exc:
        print(f"bench.apache: BROKEN: {exc}", file=sys.stderr)
        return 1
    rsync, alone = min(times["rsync"]), statistics.median(times["gunicorn"])
    print(f"\nfull push of the standard set ({STANDARD.label}) to an empty destination, "
          f"{args.reps} runs each, alternating\n")
    print("| set-up | median | fastest | runs | median vs gunicorn | fastest vs rsync's fastest |\n"
          "|---|---:|---:|---|---:|---:|")
    for name in SETUPS:
        median, fastest = statistics.median(times[name]), min(times[name])
        print(f"| {name} | {median:.2f} s | {fastest:.2f} s | {' / '.join(f'{t:.2f}' for t in times[name])} | "
              f"{median / alone:.2f}× | {fastest / rsync:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
