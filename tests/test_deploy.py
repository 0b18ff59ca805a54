"""`esmirror deploy apache|iis`: rendered for one install, never with two different accounts."""
from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent.demo import make_install
from conftest import esmirror


def install_with(tmp_path, env_sh: str | None, **ini: str):
    install = make_install(tmp_path / "install", {"allow_push": "192.0.2.10 2001:db8::/32",
                                                  "prefix": "/es/mirror", **ini})
    if env_sh is not None:
        (install.etc_dir / "env.sh").write_text(env_sh)
    return install


def deploy(install, *args: str):
    """Rendered for the test install: this machine's own httpd (if any) is not its httpd."""
    theirs = ("--httpd-conf", "") if args[0] == "apache" and "--httpd-conf" not in args else ()
    return esmirror("deploy", *args, *theirs, "--install-dir", str(install.root))


def test_apache_files_carry_user_from_env_sh_prefix_lists_venv(tmp_path):
    install = install_with(tmp_path, '#!/bin/sh\n# LT_IS_USER=nobody\nexport LT_IS_USER="daemon"\n',
                           max_upload_bytes="6G")
    out = tmp_path / "out"
    rc, _, text = deploy(install, "apache", "--out", str(out), "--venv", "/opt/esmirror/venv",
                         "--backend", "127.0.0.1:9191")
    assert rc == 0, text
    assert "account: daemon" in text
    wsgi = (out / "esmirror-wsgi.conf").read_text()
    assert "WSGIDaemonProcess esmirror user=daemon group=daemon" in wsgi
    assert f"home={install.root}/ImageServer" in wsgi
    assert "python-home=/opt/esmirror/venv" in wsgi
    assert (f"WSGIScriptAlias /es/mirror {out}/esmirror.wsgi process-group=esmirror "
            "application-group=%{GLOBAL}") in wsgi
    assert "LimitRequestBody 6442450944" in wsgi
    assert "WSGIChunkedRequest On" in wsgi
    assert "Require ip 127.0.0.1 ::1\n" in wsgi  # allow_admin (default) on the prefix
    assert "Require ip 192.0.2.10 2001:db8::/32\n" in wsgi  # allow_push on push routes
    assert "Require ip 192.0.2.10 2001:db8::/32 127.0.0.1 ::1\n" in wsgi  # browse: both
    # every push route, chunks/ and delta/ included, is opened to allow_push by httpd too
    assert '<LocationMatch "^/es/mirror/(manifest|blobs|chunks|delta|commit)(/|$)">' in wsgi
    entry = out / "esmirror.wsgi"
    py_compile.compile(str(entry), doraise=True)
    assert repr(str(install.root)) in entry.read_text()
    proxy = (out / "esmirror-proxy.conf").read_text()
    assert "ProxyPass http://127.0.0.1:9191/es/mirror" in proxy
    assert '<LocationMatch "^/es/mirror/(manifest|blobs|chunks|delta|commit)(/|$)">' in proxy
    unit = (out / "esmirror-receiver.service").read_text()
    assert "User=daemon\n" in unit
    assert ("ExecStart=/opt/esmirror/venv/bin/esmirror serve --install-dir "
            f"{install.root} --server gunicorn --bind 127.0.0.1:9191") in unit
    # the master's agent, for this install, as LT_IS_USER, from the same venv
    agent = (out / "esmirror-agent.service").read_text()
    assert "User=daemon\n" in agent and f'Environment="ESMIRROR_INSTALL_DIR={install.root}"' in agent
    assert f"ExecStart=/opt/esmirror/venv/bin/esmirror agent --install-dir {install.root}\n" in agent
    # trusted_proxies is not set: the proxy variant would see every caller as httpd
    assert "trusted_proxies = 127.0.0.1 ::1" in text


def test_disagreeing_user_is_refused_and_nothing_written(tmp_path):
    install = install_with(tmp_path, "LT_IS_USER=daemon\n")
    out = tmp_path / "out"
    rc, _, text = deploy(install, "apache", "--user", "www-data", "--out", str(out))
    assert rc == 2
    assert "www-data" in text and "daemon" in text and f"{install.etc_dir / 'env.sh'}:1" in text
    assert not out.exists()
    rc, _, text = deploy(install, "iis", "--user", "www-data", "--out", str(out))
    assert rc == 2 and not out.exists()


def test_httpd_user_disagreeing_with_env_sh_is_refused(tmp_path, monkeypatch):
    install = install_with(tmp_path, "LT_IS_USER=daemon\n")
    conf = tmp_path / "httpd.conf"
    conf.write_text("ServerRoot /nonexistent\nUser apache\nGroup apache\n")
    rc, _, text = deploy(install, "apache", "--httpd-conf", str(conf), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert f"{conf}:2" in text and "apache" in text and "daemon" in text
    rc, _, text = deploy(install, "apache", "--httpd-conf", str(tmp_path / "nope.conf"))
    assert rc == 2 and "no such file" in text
    # not told which: the httpd config in its usual place on this machine
    from agent import httpd
    from agent.deploy import render_apache
    from app.core.errors import ConfigError
    from app.core.settings import load_settings

    monkeypatch.setattr(httpd, "DEFAULT_HTTPD_CONFS", (str(tmp_path / "nope.conf"), str(conf)))
    with pytest.raises(ConfigError, match=f"httpd's User is apache \\({conf}:2\\)"):
        render_apache(load_settings(install.root), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    render_apache(load_settings(install.root), tmp_path / "o", httpd_conf="")  # for another machine
    assert (tmp_path / "o" / "esmirror-wsgi.conf").is_file()


def test_no_env_sh_means_nobody_and_empty_allow_push_denies_all(tmp_path):
    install = make_install(tmp_path / "install", {})
    out = tmp_path / "out"
    rc, _, text = deploy(install, "apache", "--out", str(out))
    assert rc == 0, text
    wsgi = (out / "esmirror-wsgi.conf").read_text()
    assert "user=nobody" in wsgi
    assert "    Require all denied\n</LocationMatch>" in wsgi  # allow_push empty: nobody pushes


def test_backend_must_be_loopback(tmp_path):
    install = install_with(tmp_path, None)
    rc, _, text = deploy(install, "apache", "--backend", "192.0.2.1:8081", "--out", str(tmp_path / "o"))
    assert rc == 2 and "loopback" in text


@pytest.mark.parametrize("kind", ["apache", "iis"])
def test_a_venv_with_a_line_break_is_refused_and_nothing_written(tmp_path, kind):
    install = install_with(tmp_path, None)
    out = tmp_path / "o"
    rc, _, text = deploy(install, kind, "--venv", "/opt/venv\nUser root", "--out", str(out))
    assert rc == 2 and "line break" in text and "Traceback" not in text, text
    assert not out.exists()


def test_default_out_is_under_the_install_etc(tmp_path):
    install = install_with(tmp_path, None)
    rc, _, text = deploy(install, "iis")
    assert rc == 0, text
    assert (install.etc_dir / "iis" / "esmirror" / "web.config").is_file()


def test_iis_without_env_sh_takes_the_app_pool_account(tmp_path):
    install = install_with(tmp_path, None)
    rc, _, text = deploy(install, "iis", "--user", r"IIS AppPool\esmirror", "--out", str(tmp_path / "o"))
    assert rc == 0, text
    assert r"account: IIS AppPool\esmirror" in text



@pytest.mark.skipif(os.geteuid() != 0, reason="as root the 0700 dir is someone else's")
def test_a_venv_the_account_cannot_read_is_named():
    base = Path(tempfile.mkdtemp(prefix="esmirror-deploy-", dir="/tmp"))
    try:
        base.chmod(0o755)  # pytest's own tmp root is 0700: it would be the blocker
        install = install_with(base, "LT_IS_USER=nobody\n")
        venv = base / "private" / "venv"
        venv.mkdir(parents=True)
        (base / "private").chmod(0o700)
        rc, _, text = deploy(install, "apache", "--venv", str(venv), "--out", str(base / "o"))
        assert rc == 0, text
        assert f"nobody cannot read {venv}: nobody cannot enter {base / 'private'} (owner root, mode 0700)" \
            in text, text
        (base / "private").chmod(0o755)
        rc, _, text = deploy(install, "apache", "--venv", str(venv), "--out", str(base / "o"))
        assert rc == 0 and "cannot read" not in text, text
    finally:
        shutil.rmtree(base, ignore_errors=True)


APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
MOD_WSGI = Path("/usr/lib/apache2/modules/mod_wsgi.so")


@pytest.mark.skipif(not (os.path.exists(APACHE) and MOD_WSGI.exists()),
                    reason="needs apache2 and mod_wsgi (bash .ci/system-packages installs them)")
def test_paths_with_spaces_render_a_config_httpd_accepts(tmp_path):
    """mod_wsgi reads option=value itself: "home=/a b" (the whole option quoted) stops httpd.
    And httpd refuses a /0 mask: an allow list of every address goes out as two halves."""
    install = make_install(tmp_path / "in stall", {"allow_push": "192.0.2.10 ::/0 0.0.0.0/0"})
    (install.etc_dir / "env.sh").write_text("LT_IS_USER=daemon\n")
    out = tmp_path / "out dir"
    rc, _, text = deploy(install, "apache", "--out", str(out), "--venv", "/opt/my venv")
    assert rc == 0, text
    wsgi = (out / "esmirror-wsgi.conf").read_text()
    assert f'home="{install.root}/ImageServer" python-home="/opt/my venv"' in wsgi
    assert "Require ip 192.0.2.10 ::/1 8000::/1 0.0.0.0/1 128.0.0.0/1\n" in wsgi
    modules = MOD_WSGI.parent
    conf = tmp_path / "httpd.conf"
    conf.write_text(f'ServerRoot "{tmp_path}"\nPidFile "{tmp_path}/httpd.pid"\nErrorLog "{tmp_path}/error.log"\n'
                    "Listen 127.0.0.1:65000\n"
                    + "".join(f"LoadModule {m}_module {modules}/mod_{m}.so\n" for m in
                              ("mpm_event", "authz_core", "authz_host", "wsgi"))
                    + f'Include "{out}/esmirror-wsgi.conf"\n')
    done = subprocess.run([APACHE, "-t", "-f", str(conf)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_unit_escapes_systemd_specifiers_and_root_or_a_relative_venv_is_refused(tmp_path):
    install = make_install(tmp_path / "50%off$HOME", {})
    (install.etc_dir / "env.sh").write_text("LT_IS_USER=daemon\n")
    out = tmp_path / "o"
    rc, _, text = deploy(install, "apache", "--out", str(out))
    assert rc == 0, text
    unit = (out / "esmirror-receiver.service").read_text()
    assert f'Environment="ESMIRROR_INSTALL_DIR={tmp_path}/50%%off$HOME"' in unit
    assert f"WorkingDirectory={tmp_path}/50%%off$HOME/ImageServer" in unit
    assert f"--install-dir '{tmp_path}/50%%off$$HOME'" in unit
    agent = (out / "esmirror-agent.service").read_text()
    assert f"esmirror agent --install-dir '{tmp_path}/50%%off$$HOME'\n" in agent
    (install.etc_dir / "env.sh").write_text("LT_IS_USER=root\n")
    rc, _, text = deploy(install, "apache", "--out", str(tmp_path / "o2"))
    assert rc == 2 and "refuse to run as root" in text and not (tmp_path / "o2").exists()
    rc, _, text = deploy(install_with(tmp_path / "w", None), "iis", "--venv", ".venv", "--out",
                         str(tmp_path / "o3"))
    assert rc == 2 and "full path" in text and not (tmp_path / "o3").exists()
