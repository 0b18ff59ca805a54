"""`esmirror check` on real-world-shaped httpd configs and env.sh forms (SPEC §4, issue 5)."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from agent.demo import make_install
from conftest import esmirror

ROOT = os.geteuid() == 0


def account() -> str:
    """A real account that can own the working dir: Debian's www-data as root, else ourselves."""
    if ROOT:
        try:
            return pwd.getpwnam("www-data").pw_name
        except KeyError:
            pass
    return pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Like pytest's, but world-traversable: pytest's own root is 0700, which check rightly reports."""
    base = Path(tempfile.mkdtemp(prefix="esmirror-check-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def line_of(path: Path, needle: str) -> int:
    return next(n for n, l in enumerate(path.read_text().splitlines(), 1) if needle in l)


def install(tmp_path: Path, env_sh: str) -> Path:
    inst = make_install(tmp_path / "install", {"allow_push": "192.0.2.10"})
    (inst.etc_dir / "env.sh").write_text(env_sh)
    if ROOT:
        subprocess.run(["chown", "-R", account(), str(inst.data_dir)], check=True)
    return inst.root


def debian_layout(tmp_path: Path, user: str, daemon_user: str | None = None) -> Path:
    """/etc/apache2 as Debian ships it: envvars, apache2.conf with globbed IncludeOptional."""
    etc = tmp_path / "apache2"
    for sub in ("mods-enabled", "conf-enabled", "sites-enabled"):
        (etc / sub).mkdir(parents=True)
    (etc / "envvars").write_text(f"""# envvars - default environment variables for apache2ctl
unset HOME
if [ "${{APACHE_CONFDIR##/etc/apache2-}}" != "${{APACHE_CONFDIR}}" ] ; then
	SUFFIX="-${{APACHE_CONFDIR##/etc/apache2-}}"
else
	SUFFIX=
fi
export APACHE_RUN_USER={user}
export APACHE_RUN_GROUP={user}
export APACHE_PID_FILE=/var/run/apache2$SUFFIX/apache2.pid
export APACHE_RUN_DIR=/var/run/apache2$SUFFIX
export APACHE_LOCK_DIR=/var/lock/apache2$SUFFIX
export APACHE_LOG_DIR=/var/log/apache2$SUFFIX
""")
    (etc / "apache2.conf").write_text("""# This is the main Apache server configuration file.
#ServerRoot "/etc/apache2"
DefaultRuntimeDir ${APACHE_RUN_DIR}
PidFile ${APACHE_PID_FILE}
Timeout 300
KeepAlive On
# These need to be set in /etc/apache2/envvars
User ${APACHE_RUN_USER}
Group ${APACHE_RUN_GROUP}
HostnameLookups Off
ErrorLog ${APACHE_LOG_DIR}/error.log
LogLevel warn
IncludeOptional mods-enabled/*.load
IncludeOptional mods-enabled/*.conf
Include ports.conf
<Directory />
	Options FollowSymLinks
	AllowOverride None
	Require all denied
</Directory>
AccessFileName .htaccess
IncludeOptional conf-enabled/*.conf
IncludeOptional sites-enabled/*.conf
""")
    (etc / "ports.conf").write_text("Listen 80\n<IfModule ssl_module>\n\tListen 443\n</IfModule>\n")
    (etc / "mods-enabled" / "wsgi.load").write_text(
        "LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so\n")
    (etc / "conf-enabled" / "charset.conf").write_text("#AddDefaultCharset UTF-8\n")
    if daemon_user:
        (etc / "conf-enabled" / "esmirror.conf").write_text(
            "# esmirror receiver\n"
            f"WSGIDaemonProcess esmirror user={daemon_user} group={daemon_user} \\\n"
            "    home=/opt/express/ImageServer python-home=/usr processes=1 threads=8\n"
            "WSGIScriptAlias /lizardtech/mirror /usr/lib/python3/dist-packages/README.txt "
            "process-group=esmirror application-group=%{GLOBAL}\n")
    return etc / "apache2.conf"


def rhel_layout(tmp_path: Path, user: str) -> Path:
    """/etc/httpd as RHEL ships it: one httpd.conf, ServerRoot explicit, conf.d included."""
    root = tmp_path / "httpd"
    (root / "conf").mkdir(parents=True)
    (root / "conf.d").mkdir()
    (root / "conf.modules.d").mkdir()
    (root / "conf.modules.d" / "00-base.conf").write_text("LoadModule alias_module modules/mod_alias.so\n")
    conf = root / "conf" / "httpd.conf"
    conf.write_text(f"""#
# This is the main Apache HTTP server configuration file.
ServerRoot "{root}"
Listen 80
Include conf.modules.d/*.conf

#
# If you wish httpd to run as a different user or group, you must run
# httpd as root initially and it will switch.
#
User {user}
Group {user}
ServerAdmin root@localhost
<Directory />
    AllowOverride none
    Require all denied
</Directory>
DocumentRoot "/var/www/html"
<IfModule mime_magic_module>
    MIMEMagicFile conf/magic
</IfModule>
EnableSendfile on
IncludeOptional conf.d/*.conf
""")
    return conf


def check(root: Path, conf: Path, *extra: str):
    return esmirror("check", "--install-dir", str(root), "--httpd-conf", str(conf), *extra)


def test_debian_mismatch_names_both_values_and_lines_then_fix_aligns(tmp_path):
    user = account()
    root = install(tmp_path, '#!/bin/sh\nLT_IS_ROOT=/opt/express/ImageServer\n'
                             '# LT_IS_USER=' + user + '\nexport LT_IS_USER="nobody"  # ltcsd runs as this\n'
                             '#export LT_IS_USER=' + user + '\n')
    conf = debian_layout(tmp_path, user)
    env_sh = root / "ImageServer" / "etc" / "env.sh"
    rc, _, text = check(root, conf)
    assert rc == 1, text
    mismatch = next(l for l in text.splitlines() if "LT_IS_USER is nobody" in l)
    assert f"Apache's User is {user} ({conf}:{line_of(conf, 'User ${APACHE_RUN_USER}')}" in mismatch
    assert f"{tmp_path / 'apache2' / 'envvars'}:{line_of(conf.parent / 'envvars', 'APACHE_RUN_USER=')}" in mismatch
    assert f"({env_sh}:4)" in mismatch  # the exported, quoted line; the commented one is ignored
    assert f"fix: set LT_IS_USER={user} in {env_sh}" in text

    httpd_before = {p: p.read_bytes() for p in conf.parent.rglob("*") if p.is_file()}
    env_before = env_sh.read_text()
    rc, _, text = check(root, conf, "--fix")
    assert rc == 0, text
    assert {p: p.read_bytes() for p in conf.parent.rglob("*") if p.is_file()} == httpd_before
    assert env_sh.read_text() == env_before.replace('LT_IS_USER="nobody"', f'LT_IS_USER="{user}"')
    backups = list(env_sh.parent.glob("env.sh.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == env_before
    assert str(backups[0]) in text
    rc, _, text = check(root, conf)
    assert rc == 0, text
    assert "all is well" in text


def test_debian_wsgi_daemon_user_in_included_glob_is_compared(tmp_path):
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user, daemon_user="nobody")
    rc, report, text = check(root, conf, "--json")
    assert rc == 1, text
    assert report["ok"] is False and report["apache_user"] == user and report["lt_is_user"] == user
    [bad] = [f for f in report["findings"] if f["level"] == "error" and f["topic"] == "user"]
    esm = tmp_path / "apache2" / "conf-enabled" / "esmirror.conf"
    assert bad["file"] == str(esm) and bad["line"] == 2
    assert "WSGIDaemonProcess esmirror user= is nobody" in bad["message"] and user in bad["message"]
    # --fix cannot help here: httpd disagrees with itself, and httpd.conf is never edited
    rc, report, text = check(root, conf, "--json", "--fix")
    assert rc == 1 and report["fixed"] == []
    assert (root / "ImageServer" / "etc" / "env.sh").read_text() == f"LT_IS_USER={user}\n"


@pytest.mark.parametrize("form", ["LT_IS_USER='{u}'", "LT_IS_USER={u}; export LT_IS_USER",
                                  'export LT_IS_USER="{u}"'])
def test_rhel_single_httpd_conf_with_env_sh_forms(tmp_path, form):
    user = account()
    conf = rhel_layout(tmp_path, user)
    root = install(tmp_path, "#export LT_IS_USER=nobody\n" + form.format(u="nobody") + "\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 1, text
    [bad] = [f for f in report["findings"] if f["level"] == "error" and f["topic"] == "user"]
    assert (bad["file"], bad["line"]) == (str(conf), line_of(conf, f"User {user}"))
    assert f"is {user}" in bad["message"] and "LT_IS_USER is nobody" in bad["message"]
    assert "env.sh:2" in bad["message"]
    (root / "ImageServer" / "etc" / "env.sh").write_text(form.format(u=user) + "\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 0, text
    assert report["ok"] is True and report["lt_is_user"] == user


@pytest.mark.skipif(not ROOT or account() == "root", reason="needs root and an account other than root")
def test_venv_under_a_0700_dir_is_caught(tmp_path):
    user = account()
    private = tmp_path / "root-home"
    (private / "venv").mkdir(parents=True)
    (private / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    private.chmod(0o700)
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    (conf.parent / "conf-enabled" / "esmirror.conf").write_text(
        f"WSGIDaemonProcess esmirror user={user} python-home={private}/venv home=/\n")
    rc, _, text = check(root, conf)
    assert rc == 1, text
    assert f"cannot read {private}/venv" in text and str(private) in text and "0700" in text
    private.chmod(0o755)
    rc, _, text = check(root, conf)
    assert rc == 0, text
    # the venv readable, but its editable install points into a 0700 checkout
    site = private / "venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (tmp_path / "checkout" / "app").mkdir(parents=True)
    (site / "__editable___esmirror_0_1_0_finder.py").write_text(
        f"MAPPING: dict[str, str] = {{'app': '{tmp_path}/checkout/app'}}\n")
    (tmp_path / "checkout").chmod(0o700)
    rc, _, text = check(root, conf)
    assert rc == 1 and f"cannot read {tmp_path}/checkout/app" in text, text


def test_working_dir_catalogs_mirrors_and_ca_bundle_findings(tmp_path):
    user = account()
    conf = rhel_layout(tmp_path, user)
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    etc = root / "ImageServer" / "etc"
    (etc / "iserv-cfg.xml").write_text('<ImageServer><ImageManager/><Mirrors>'
                                       '<Secondary host="es2.example.org" port="443" ssl="strict"/>'
                                       '</Mirrors></ImageServer>')
    (root / "ImageServer" / "var" / "data" / "catalogs.xml").write_text(
        '<CatalogConfig><Catalog name="bad name"><Path>/nonexistent/images</Path></Catalog></CatalogConfig>')
    rc, report, text = check(root, conf, "--json")
    assert rc == 1
    errors = {f["topic"]: f for f in report["findings"] if f["level"] == "error"}
    [unknown] = [f for f in report["findings"] if f["topic"] == "express-version"]
    assert unknown["level"] == "warning" and "express_version = " in unknown["fix"]
    assert "ca-bundle.crt" in errors["ca-bundle"]["message"] and "es2.example.org:443" in errors["ca-bundle"]["message"]
    assert "bad name" in errors["catalogs"]["message"]
    assert any("/nonexistent/images" in f["message"] for f in report["findings"] if f["topic"] == "catalogs")
    (etc / "esmirror.ini").write_text("[esmirror]\nallow_pusj = 1.2.3.4\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 1
    settings = [f for f in report["findings"] if f["topic"] == "settings"][0]
    assert settings["level"] == "error" and "esmirror.ini:2" in settings["message"] and "allow_pusj" in settings["message"]


def test_no_install_is_a_usage_error(tmp_path):
    rc, _, text = esmirror("check", "--install-dir", str(tmp_path / "nothing"))
    assert rc == 2 and "ImageServer" in text


def rendered_layout(tmp_path: Path) -> tuple[str, Path, Path, Path]:
    """A Debian httpd layout, an install whose LT_IS_USER is its account, and the Apache
    files esmirror deploy apache renders for it (in tmp_path/rendered)."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    out = tmp_path / "rendered"
    rc, _, text = esmirror("deploy", "apache", "--install-dir", str(root), "--out", str(out),
                           "--httpd-conf", str(conf))
    assert rc == 0, text
    return user, root, conf, out


def wsgi_layout(tmp_path: Path) -> tuple[str, Path, Path, Path]:
    """A Debian httpd layout, an install whose LT_IS_USER is its account, and a .wsgi entry."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    entry = tmp_path / "esmirror.wsgi"
    entry.write_text("from app.wsgi import application\n")
    return user, root, conf, entry


def test_wsgi_mount_at_another_path_than_the_prefix_is_reported(tmp_path):
    user, root, conf, entry = wsgi_layout(tmp_path)
    (conf.parent / "conf-enabled" / "esmirror.conf").write_text(
        f"WSGIDaemonProcess esmirror user={user} home=/\nWSGIScriptAlias /mirror {entry}\n")
    rc, report, _ = check(root, conf, "--json")
    assert rc == 1
    [bad] = [f for f in report["findings"] if f["level"] == "error"]
    assert bad["topic"] == "prefix" and bad["line"] == 2 and "/lizardtech/mirror" in bad["message"]
    (conf.parent / "conf-enabled" / "esmirror.conf").write_text(
        f"WSGIDaemonProcess esmirror user={user} home=/\nWSGIScriptAlias /lizardtech/mirror {entry}\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 0, text


def test_a_push_route_block_that_leaves_routes_to_allow_admin_is_reported(tmp_path):
    """An older or hand-written <LocationMatch> for manifest|blobs|commit only: httpd then
    refuses chunks/ and delta/ to a master outside allow_admin."""
    user, root, conf, entry = wsgi_layout(tmp_path)
    snippet = conf.parent / "conf-enabled" / "esmirror.conf"
    mount = f"WSGIDaemonProcess esmirror user={user} home=/\nWSGIScriptAlias /lizardtech/mirror {entry}\n"
    snippet.write_text(mount + '<LocationMatch "^/lizardtech/mirror/(manifest|blobs|commit)(/|$)">\n'
                       "    Require ip 192.0.2.10\n</LocationMatch>\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 1, text
    [bad] = [f for f in report["findings"] if f["level"] == "error"]
    assert bad["topic"] == "push-routes" and bad["line"] == 3, bad
    assert "not chunks, delta" in bad["message"] and "esmirror deploy apache" in bad["fix"]
    # what esmirror deploy apache renders passes its own doctor: mount and push routes
    out = tmp_path / "rendered"
    rc, _, text = esmirror("deploy", "apache", "--install-dir", str(root), "--out", str(out),
                           "--httpd-conf", str(conf))
    assert rc == 0, text
    snippet.write_text(f"Include {out}/esmirror-wsgi.conf\n")
    rc, report, text = check(root, conf, "--json")
    assert report["findings"] and not [f for f in report["findings"]
                                       if f["topic"] in ("push-routes", "prefix")], text


def test_shared_secret_missing_unreadable_or_open_to_others(tmp_path):
    user = account()
    conf = rhel_layout(tmp_path, user)
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    etc = root / "ImageServer" / "etc"
    (etc / "esmirror.ini").write_text("[esmirror]\nallow_push = 192.0.2.10\nshared_secret_file = push.key\n")

    def secret_findings() -> tuple[int, list[dict]]:
        rc, report, _ = check(root, conf, "--json")
        return rc, [f for f in report["findings"] if f["topic"] == "secret"]

    rc, found = secret_findings()  # named but not there: publish and the receiver would refuse
    assert rc == 1 and found[0]["level"] == "error"
    assert str(etc / "push.key") in found[0]["message"] and "cannot read it" in found[0]["message"]
    key = etc / "push.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o644)
    rc, found = secret_findings()
    assert [f["level"] for f in found] == ["warning"] and "chmod 600" in found[0]["fix"]
    if ROOT and user != "root":  # owned by root, 0600: the receiver's account cannot read it
        key.chmod(0o600)
        rc, found = secret_findings()
        assert rc == 1 and found[0]["level"] == "error" and user in found[0]["message"]
        shutil.chown(key, user)
    key.chmod(0o600)
    rc, found = secret_findings()
    assert rc == 0 and [f["level"] for f in found] == ["ok"]


def errors_of(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["level"] == "error"]


def test_sections_httpd_skips_are_skipped_and_fix_leaves_a_right_env_sh_alone(tmp_path):
    """<IfDefine>/<IfModule> that httpd does not read must not decide the User: the last User
    read inside an inactive block made check report a mismatch, and --fix break env.sh."""
    user = account()
    root = install(tmp_path, f"export LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    env_sh = root / "ImageServer" / "etc" / "env.sh"
    (conf.parent / "conf-enabled" / "z-inactive.conf").write_text(
        "Define ESMIRROR_ON\n"
        "<IfDefine NEVER_DEFINED>\n    User nobody\n    <Directory />\n        User nobody\n"
        "    </Directory>\n</IfDefine>\n"
        "<IfModule mod_not_loaded.c>\nUser nobody\n</IfModule>\n"
        "<IfModule !wsgi_module>\nUser nobody\n</IfModule>\n"
        "<IfDefine !ESMIRROR_ON>\nUser nobody\n</IfDefine>\n"
        "<IfDefine ESMIRROR_ON>\n<IfModule wsgi_module>\n"  # active: Define'd, LoadModule'd
        f"WSGIDaemonProcess esmirror user={user} home=/\n</IfModule>\n</IfDefine>\n")
    rc, report, text = check(root, conf, "--json", "--fix")
    assert rc == 0, text
    assert report["apache_user"] == user and report["fixed"] == []
    assert env_sh.read_text() == f"export LT_IS_USER={user}\n"
    assert any("WSGIDaemonProcess esmirror user=" in f["message"] for f in report["findings"]
               if f["level"] == "ok"), "the active daemon inside the sections was not read"
    # the same daemon as nobody is found inside its active sections
    text_of = (conf.parent / "conf-enabled" / "z-inactive.conf").read_text()
    (conf.parent / "conf-enabled" / "z-inactive.conf").write_text(
        text_of.replace(f"esmirror user={user}", "esmirror user=nobody"))
    rc, report, _ = check(root, conf, "--json")
    daemon = conf.parent / "conf-enabled" / "z-inactive.conf"
    assert rc == 1 and [f["line"] for f in errors_of(report)] == [line_of(daemon, "user=nobody home")]


def test_envvars_forms_uid_users_and_continuations_are_read_as_httpd_does(tmp_path):
    user = account()
    uid = pwd.getpwnam(user).pw_uid
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, "placeholder")
    envvars = conf.parent / "envvars"
    for form in (f"APACHE_RUN_USER='{user}'; export APACHE_RUN_USER",
                 f"export APACHE_RUN_USER=${{APACHE_RUN_USER:-{user}}}"):
        envvars.write_text(envvars.read_text().replace(
            next(l for l in envvars.read_text().splitlines() if "APACHE_RUN_USER" in l), form))
        rc, report, text = check(root, conf, "--json")
        assert rc == 0 and report["apache_user"] == user, (form, text)
    # User #uid names the account by number; a directive may go on over a line break
    conf.write_text(conf.read_text().replace("User ${APACHE_RUN_USER}", f"User #{uid}"))
    (conf.parent / "conf-enabled" / "esmirror.conf").write_text(
        f"WSGIDaemonProcess esmirror user={user[:2]}\\\n{user[2:]} home=/\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 0 and report["apache_user"] == user, text
    assert not any("user=" in f["message"] and f["level"] == "error" for f in report["findings"])


def test_root_apache_missing_includes_and_a_comment_after_user_are_errors(tmp_path):
    root = install(tmp_path, "LT_IS_USER=root\n")
    conf = rhel_layout(tmp_path, "root")
    rc, report, text = check(root, conf, "--json", "--fix")
    assert rc == 1 and report["fixed"] == [], text
    messages = " | ".join(f["message"] for f in errors_of(report))
    assert "Apache's User is root" in messages and "LT_IS_USER is root" in messages
    assert "httpd refuses to run as root" in messages
    user = account()
    conf.write_text(conf.read_text().replace("User root", f'User "{user}"  # the web account')
                    + "Include conf.extra/missing.conf\nInclude conf.vhosts/*.conf\n")
    (root / "ImageServer" / "etc" / "env.sh").write_text(f"LT_IS_USER={user}\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 1, text
    found = {f["line"]: f["message"] for f in errors_of(report) if f["topic"] == "apache"}
    assert "User takes one argument" in found[line_of(conf, "the web account")]
    assert "no " in found[line_of(conf, "missing.conf")] and "refuses to start" in found[
        line_of(conf, "missing.conf")]
    assert "nothing matches" in found[line_of(conf, "conf.vhosts")]
    rc, _, text = check(root, conf)
    assert f"({conf}:{line_of(conf, 'conf.vhosts')})" in text  # the text form names file:line too


def test_other_applications_daemons_are_not_esmirrors(tmp_path):
    """Another WSGI app on the same httpd runs as whom it likes, from files esmirror's account
    need not read: only esmirror's own daemon (its mount's process-group) is compared."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    shop = tmp_path / "shop.wsgi"
    shop.write_text("application = None\n")
    shop.chmod(0o600)
    entry = tmp_path / "esmirror.wsgi"
    entry.write_text("from app.wsgi import application\n")
    (conf.parent / "sites-enabled" / "apps.conf").write_text(
        "WSGIDaemonProcess django user=nobody home=/\n"
        "WSGIScriptAlias /shop " + str(shop) + " process-group=django\n"
        f"WSGIDaemonProcess mirror user={user} home=/\n"
        f"WSGIScriptAlias /lizardtech/mirror {entry} process-group=mirror\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 0, text
    assert any("WSGIDaemonProcess mirror user=" in f["message"] for f in report["findings"])
    assert "django" not in text and "shop.wsgi" not in text


def test_env_sh_mistyped_or_symlinked(tmp_path):
    user = account()
    root = install(tmp_path, "LT_IS_USER=nobody\n")
    conf = debian_layout(tmp_path, user)
    typo = tmp_path / "env.sh.typo"
    rc, _, text = check(root, conf, "--env-sh", str(typo), "--fix")
    assert rc == 2 and f"--env-sh {typo}: no such file" in text and not typo.exists()
    # --fix through a symlink changes the file it leads to, and the link stays a link
    real = root / "ImageServer" / "etc" / "env.sh"
    link = tmp_path / "env-link.sh"
    link.symlink_to(real)
    rc, report, text = check(root, conf, "--env-sh", str(link), "--fix", "--json")
    assert rc == 0 and report["fixed"], text
    assert link.is_symlink() and real.read_text() == f"LT_IS_USER={user}\n"


@pytest.mark.skipif(not ROOT or account() == "root", reason="needs root and an account other than root")
def test_a_venv_reached_through_a_symlink_into_a_0700_dir_is_caught(tmp_path):
    user = account()
    private = tmp_path / "private"
    (private / "venv").mkdir(parents=True)
    (private / "venv").chmod(0o755)
    private.chmod(0o700)
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "venv").symlink_to(private / "venv")
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    (conf.parent / "conf-enabled" / "esmirror.conf").write_text(
        f"WSGIDaemonProcess esmirror user={user} python-home={tmp_path}/pub/venv home=/\n")
    rc, _, text = check(root, conf)
    assert rc == 1 and f"cannot read {tmp_path}/pub/venv: {user} cannot enter {private} (owner root, " \
        "mode 0700)" in text, text


def test_the_gunicorn_units_user_is_compared_with_lt_is_user(tmp_path):
    """The mod_proxy variant's receiver runs under systemd: its User= writes var/data."""
    user, root, conf, out = rendered_layout(tmp_path)
    unit = out / "esmirror-receiver.service"
    rc, report, text = check(root, conf, "--unit", str(unit), "--json")
    assert rc == 0 and any(f["topic"] == "unit" and f["level"] == "ok" for f in report["findings"]), text
    unit.write_text(unit.read_text().replace(f"User={user}\n", "User=nobody\n"))
    rc, report, text = check(root, conf, "--unit", str(unit), "--json")
    [bad] = errors_of(report)
    assert rc == 1 and bad["topic"] == "unit" and bad["line"] == line_of(unit, "User=nobody"), text
    assert f"set User={user}" in bad["fix"]
    unit.write_text(unit.read_text().replace("User=nobody\n", ""))
    rc, report, text = check(root, conf, "--unit", str(unit), "--json")
    assert rc == 1 and "sets no User=: the receiver runs as root" in errors_of(report)[0]["message"]
    rc, _, text = check(root, conf, "--unit", str(tmp_path / "nope.service"))
    assert rc == 2 and "no such file" in text


def test_a_daemon_option_quoted_whole_is_an_error(tmp_path):
    """mod_wsgi reads option=value itself: "home=/a b" stops httpd, home="/a b" works."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    esm = conf.parent / "conf-enabled" / "esmirror.conf"
    esm.write_text(f'WSGIDaemonProcess esmirror user={user} "home=/a b" python-home=/usr\n')
    rc, report, text = check(root, conf, "--json")
    [bad] = [f for f in errors_of(report) if f["topic"] == "apache"]
    assert rc == 1 and bad["line"] == 1 and 'quote the value only: home="…"' in bad["message"], text
    esm.write_text(f'WSGIDaemonProcess esmirror user={user} home="/" python-home=/usr\n')
    rc, report, text = check(root, conf, "--json")
    assert rc == 0, text


def write_ini(root: Path, **settings: str) -> None:
    (root / "ImageServer" / "etc" / "esmirror.ini").write_text(
        "[esmirror]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


@pytest.mark.parametrize("variant", ["esmirror-wsgi.conf", "esmirror-proxy.conf"])
def test_allow_lists_changed_after_rendering_are_reported_until_rendered_again(tmp_path, variant):
    """httpd keeps the Require ip lines it was rendered with: an allow_push changed later makes
    httpd refuse the master (403) while check used to say all is well."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    out = tmp_path / "rendered"
    render = ("deploy", "apache", "--install-dir", str(root), "--out", str(out), "--httpd-conf", str(conf))
    rc, _, text = esmirror(*render)
    assert rc == 0, text
    (conf.parent / "conf-enabled" / "esmirror.conf").write_text(f"Include {out}/{variant}\n")
    snippet = out / variant
    rc, report, text = check(root, conf, "--json")
    assert not [f for f in errors_of(report) if f["topic"] == "require-ip"], text

    # the same addresses in another order and spelling are the same list
    write_ini(root, allow_push="192.0.2.10/32", allow_admin="::1 127.0.0.1")
    rc, report, text = check(root, conf, "--json")
    assert not [f for f in errors_of(report) if f["topic"] == "require-ip"], text

    # a new master's address in allow_push, the Apache files not rendered again
    write_ini(root, allow_push="2001:db8::/64 192.0.2.20")
    rc, _, text = check(root, conf)
    assert rc == 1 and "all is well" not in text, text
    rc, report, text = check(root, conf, "--json")
    push_line = next(n for n, l in enumerate(snippet.read_text().splitlines(), 1)
                     if l.strip() == "Require ip 192.0.2.10")  # (browse's line lists allow_admin too)
    [push] = [f for f in errors_of(report) if f["topic"] == "require-ip" and f["line"] == push_line]
    assert push["file"] == str(snippet), push
    assert "httpd allows 192.0.2.10 on manifest, blobs, chunks, delta, commit" in push["message"]
    assert "allow_push in " in push["message"] and "is 2001:db8::/64 192.0.2.20" in push["message"]
    assert "httpd refuses 192.0.2.20 2001:db8::/64 (403)" in push["message"]
    assert "esmirror deploy apache" in push["fix"] and "esmirror check" in push["fix"] \
        and "reload" in push["fix"] and "Require ip 2001:db8::/64 192.0.2.20' there" in push["fix"]
    assert "copy" not in push["fix"], push  # httpd reads the rendered file: rendering is enough

    # httpd reads a copy of the rendered file (cp into conf-available): rendering alone
    # changes nothing there, so the fix says to copy it again, and where to
    live = conf.parent / "conf-enabled" / "esmirror.conf"
    live.write_text(snippet.read_text())
    rc, report, text = check(root, conf, "--json")
    [push] = [f for f in errors_of(report) if f["topic"] == "require-ip" and f["line"] == push_line]
    assert rc == 1 and push["file"] == str(live), push
    assert "then copy the rendered esmirror-wsgi.conf (or esmirror-proxy.conf" in push["fix"] \
        and f"over {live}, which is a copy of it" in push["fix"], push
    live.write_text(f"Include {out}/{variant}\n")

    # allow_admin is rendered on the prefix the same way
    write_ini(root, allow_push="192.0.2.10", allow_admin="198.51.100.0/24")
    rc, report, text = check(root, conf, "--json")
    [admin] = [f for f in errors_of(report) if f["topic"] == "require-ip" and "status" in f["message"]]
    assert rc == 1 and admin["line"] == line_of(snippet, "Require ip 127.0.0.1 ::1"), text
    assert "httpd allows 127.0.0.1 ::1 on status, publish, archive" in admin["message"]
    assert "httpd refuses 198.51.100.0/24" in admin["message"] and "lets in 127.0.0.1 ::1" in admin["message"]

    rc, _, text = esmirror(*render)
    assert rc == 0, text
    rc, report, text = check(root, conf, "--json")
    assert not [f for f in errors_of(report) if f["topic"] == "require-ip"], text
    assert any(f["topic"] == "require-ip" and f["level"] == "ok" for f in report["findings"]), text


def test_a_mount_with_a_trailing_slash_is_an_error(tmp_path):
    """WSGIScriptAlias /prefix/ makes httpd answer 404 for every route; ProxyPass breaks the
    same way when only one of its two sides ends with a slash."""
    user, root, conf, entry = wsgi_layout(tmp_path)
    snippet = conf.parent / "conf-enabled" / "esmirror.conf"
    snippet.write_text(f"WSGIDaemonProcess esmirror user={user} home=/\n"
                       f"WSGIScriptAlias /lizardtech/mirror/ {entry}\n")
    rc, report, text = check(root, conf, "--json")
    [bad] = errors_of(report)
    assert rc == 1 and bad["topic"] == "prefix" and bad["line"] == 2, text
    assert "trailing slash" in bad["message"] and "404" in bad["message"]
    assert "drop the trailing slash" in bad["fix"] and f"WSGIScriptAlias /lizardtech/mirror {entry}" in bad["fix"]

    snippet.write_text("<Location /lizardtech/mirror/>\n"
                       "    ProxyPass http://127.0.0.1:8081/lizardtech/mirror timeout=600\n</Location>\n")
    rc, report, text = check(root, conf, "--json")
    [bad] = errors_of(report)
    assert rc == 1 and bad["topic"] == "prefix" and bad["line"] == 2, text
    assert "/lizardtech/mirror/manifest reaches the receiver as /lizardtech/mirrormanifest" in bad["message"]
    assert "end both with a slash or neither" in bad["fix"]
    snippet.write_text("ProxyPass /lizardtech/mirror/ http://127.0.0.1:8081/lizardtech/mirror/\n")
    rc, report, text = check(root, conf, "--json")
    assert rc == 0, text


@pytest.mark.skipif(not ROOT or account() == "root", reason="needs root and an account other than root")
def test_a_folder_that_stops_the_account_is_reported_once_in_plain_words(tmp_path):
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    data = root / "ImageServer" / "var" / "data"
    locked = data / "locked"
    (locked / "deeper").mkdir(parents=True)
    for name in ("a.idx", "b.idx", "deeper/c.idx"):
        (locked / name).write_text("x")
    subprocess.run(["chown", "-R", "root:root", str(locked)], check=True)
    locked.chmod(0o700)
    images = tmp_path / "private" / "images"
    (images / "orthos").mkdir(parents=True)
    (images / "dem").mkdir()
    (tmp_path / "private").chmod(0o700)
    (data / "catalogs.xml").write_text(
        f'<CatalogConfig><Catalog name="orthos"><Path>{images}/orthos</Path></Catalog>'
        f'<Catalog name="dem"><Path>{images}/dem</Path></Catalog></CatalogConfig>')
    rc, report, text = check(root, conf, "--json")
    assert rc == 1, text
    permissions = [f for f in errors_of(report) if f["topic"] == "permissions"]
    assert len(permissions) == 1, text
    assert f"{user} cannot list, write in or enter {locked} (owner root, mode 0700)" \
        in permissions[0]["message"], text
    catalogs = [f for f in errors_of(report) if f["topic"] == "catalogs"]
    assert len(catalogs) == 1 and "'dem', 'orthos'" in catalogs[0]["message"], text
    assert f"{user} cannot enter {tmp_path / 'private'} (owner root, mode 0700)" in catalogs[0]["message"]
    rc, _, text = check(root, conf)
    assert "lets" not in text and "not pass" not in text and len(text.splitlines()) == len(set(text.splitlines()))


DEBIAN_MOD_WSGI = Path("/usr/lib/apache2/modules/mod_wsgi.so")


def wsgi_venv(tmp_path: Path, conf: Path, user: str, home: str, version: str) -> Path:
    """A python-home whose pyvenv.cfg says which Python made it (no real venv is needed)."""
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    (venv / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n"
                                     f"version = {version}\n")
    (conf.parent / "conf-enabled" / "esmirror.conf").write_text(
        f"WSGIDaemonProcess esmirror user={user} python-home={venv} home=/\n")
    return venv


def other_build(tmp_path: Path) -> Path:
    """The bin folder of a Python built apart from the distribution's (as pyenv does)."""
    bin_dir = tmp_path / "pyenv" / "versions" / "3.11.7" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    return bin_dir


def test_a_venv_of_another_minor_than_the_module_links_is_an_error(tmp_path):
    """A mod_wsgi of one's own build linking libpython3.9, and a venv of 3.11: nothing imports."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    module = tmp_path / "modules" / "mod_wsgi.so"
    module.parent.mkdir()
    module.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"\0libc.so.6\0libpython3.9.so.1.0\0"
                       b"wsgi_module\0" + bytes(range(256)))
    load = conf.parent / "mods-enabled" / "wsgi.load"
    load.write_text(f"# mod_wsgi-express module-config\nLoadModule wsgi_module {module}\n")
    venv = wsgi_venv(tmp_path, conf, user, "/usr/bin", "3.11.2")
    rc, _, text = check(root, conf)
    assert rc == 1, text
    error = next(l for l in text.splitlines() if "ERROR" in l and "python-home" in l)
    assert f"python-home {venv} is a venv of Python 3.11 (home = /usr/bin in {venv}/pyvenv.cfg)" in error
    assert f"{module} (LoadModule at {load}:2), embeds Python 3.9 (it links libpython3.9)" in error
    assert f"({conf.parent / 'conf-enabled' / 'esmirror.conf'}:1)" in error
    fix = text.splitlines()[text.splitlines().index(error) + 1]
    assert f"fix: remake the venv from python3.9 (the one {module} was built with): python3.9 -m venv " \
           f"--clear {venv}, then reinstall esmirror into it" in fix
    assert f"{venv}/bin/mod_wsgi-express module-config prints in place of {load}:2" in fix

    wsgi_venv(tmp_path, conf, user, str(other_build(tmp_path)), "3.9.1")  # not the distribution's: fine
    rc, _, text = check(root, conf)
    assert rc == 0, text
    assert f"OK       wsgi: WSGIDaemonProcess esmirror's python-home {venv} is a venv of Python 3.9, " \
           f"the one {module} embeds" in text

    # a static build links no libpython, a missing module cannot be read: nothing is claimed
    wsgi_venv(tmp_path, conf, user, "/usr/bin", "3.11.2")
    for content in (b"\x7fELF\0libc.so.6\0", None):
        if content is None:
            module.unlink()
        else:
            module.write_bytes(content)
        rc, _, text = check(root, conf)
        assert rc == 0 and "libpython" not in text and "is a venv of" not in text, text


@pytest.mark.skipif(not DEBIAN_MOD_WSGI.is_file() or b"\0libpython3.11.so" not in DEBIAN_MOD_WSGI.read_bytes(),
                    reason="needs Debian 12's libapache2-mod-wsgi-py3 (links libpython3.11)")
def test_debians_mod_wsgi_needs_a_venv_of_debians_python(tmp_path):
    """The probe's case: a venv of pyenv's 3.11.7 under Debian's module fails with undefined symbols."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)  # LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so
    load = f"{conf.parent / 'mods-enabled' / 'wsgi.load'}:1"
    venv = wsgi_venv(tmp_path, conf, user, "/usr/bin", "3.9.1")
    rc, _, text = check(root, conf)
    assert rc == 1, text
    assert f"python-home {venv} is a venv of Python 3.9 (home = /usr/bin in {venv}/pyvenv.cfg), but the " \
           f"mod_wsgi httpd loads, {DEBIAN_MOD_WSGI} (LoadModule at {load}), embeds Python 3.11 " \
           "(it links libpython3.11)" in text
    assert f"fix: remake the venv from /usr/bin/python3.11: /usr/bin/python3.11 -m venv --clear {venv}" in text

    pyenv = other_build(tmp_path)
    wsgi_venv(tmp_path, conf, user, str(pyenv), "3.11.7")
    rc, _, text = check(root, conf)
    assert rc == 1, text
    error = next(l for l in text.splitlines() if "ERROR" in l and "python-home" in l)
    assert f"python-home {venv} is a venv of the Python 3.11 in {pyenv} (pyvenv.cfg home), not of the " \
           f"distribution's /usr/bin/python3.11 that {DEBIAN_MOD_WSGI} (LoadModule at {load}) embeds" in error
    assert "undefined symbols" in error
    assert f"fix: remake the venv from /usr/bin/python3.11: /usr/bin/python3.11 -m venv --clear {venv}, " \
           "then reinstall esmirror into it" in text

    wsgi_venv(tmp_path, conf, user, "/usr/bin", "3.11.2")
    rc, _, text = check(root, conf)
    assert rc == 0, text
    assert f"OK       wsgi: WSGIDaemonProcess esmirror's python-home {venv} is a venv of Python 3.11, " \
           f"the one {DEBIAN_MOD_WSGI} embeds" in text


def test_an_httpd_that_mounts_no_receiver_is_reported(tmp_path):
    """The snippet rendered but never linked into httpd (a2enconf forgotten) used to pass
    the doctor, 'all is well', while every master got httpd's 404."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    # nothing rendered yet: the receiver may run on its own (esmirror serve), so a warning
    rc, report, text = check(root, conf, "--json")
    [mount] = [f for f in report["findings"] if f["topic"] == "mount"]
    assert rc == 0 and mount["level"] == "warning", text
    assert "mounts no esmirror receiver" in mount["message"] and "esmirror serve" in mount["fix"]
    rc, _, text = check(root, conf)
    assert rc == 0 and "all is well, but for " in text and "WARNING  mount: httpd" in text, text

    # rendered for httpd (the default folder), still not linked: an error
    rc, _, text = esmirror("deploy", "apache", "--install-dir", str(root), "--httpd-conf", str(conf))
    assert rc == 0, text
    rendered = root / "ImageServer" / "etc" / "apache" / "esmirror"
    rc, report, text = check(root, conf, "--json")
    [mount] = [f for f in report["findings"] if f["topic"] == "mount"]
    assert rc == 1 and mount["level"] == "error", text
    assert str(rendered) in mount["fix"] and "a2enconf esmirror" in mount["fix"], mount

    # linked as the install steps say: mounted
    for variant in ("esmirror-wsgi.conf", "esmirror-proxy.conf"):
        live = conf.parent / "conf-enabled" / "esmirror.conf"
        live.unlink(missing_ok=True)
        live.symlink_to(rendered / variant)
        rc, report, text = check(root, conf, "--json")
        assert not [f for f in report["findings"] if f["topic"] == "mount"], (variant, text)


def test_a_receiver_rendered_for_another_install_is_reported(tmp_path):
    """A .wsgi or unit rendered for another install (moved, cloned, or a second one on this
    host) writes that install's var/data: check on this one used to pass."""
    user = account()
    root = install(tmp_path, f"LT_IS_USER={user}\n")
    conf = debian_layout(tmp_path, user)
    other = make_install(tmp_path / "other", {"allow_push": "192.0.2.10"})
    (other.etc_dir / "env.sh").write_text(f"LT_IS_USER={user}\n")
    out = tmp_path / "rendered-for-other"
    rc, _, text = esmirror("deploy", "apache", "--install-dir", str(other.root), "--out", str(out),
                           "--httpd-conf", str(conf))
    assert rc == 0, text
    live = conf.parent / "conf-enabled" / "esmirror.conf"
    live.write_text(f"Include {out}/esmirror-wsgi.conf\n")
    rc, report, text = check(root, conf, "--json")
    [bad] = [f for f in errors_of(report) if f["topic"] == "install"]
    assert rc == 1 and f"serves {other.root}, not this install ({root})" in bad["message"], text
    assert str(out / "esmirror.wsgi") in bad["message"] and f"--install-dir {root}" in bad["fix"]
    # the gunicorn unit the same way (Environment=ESMIRROR_INSTALL_DIR=…)
    live.write_text(f"Include {out}/esmirror-proxy.conf\n")
    unit = out / "esmirror-receiver.service"
    rc, report, text = check(root, conf, "--unit", str(unit), "--json")
    [bad] = [f for f in errors_of(report) if f["topic"] == "install"]
    assert rc == 1 and bad["file"] == str(unit) and bad["line"] == line_of(unit, "ESMIRROR_INSTALL_DIR"), text
    # rendered for this install: nothing to say
    rc, _, text = esmirror("deploy", "apache", "--install-dir", str(root), "--out", str(out),
                           "--httpd-conf", str(conf))
    assert rc == 0, text
    for extra in ((), ("--unit", str(unit))):
        rc, report, text = check(root, conf, *extra, "--json")
        assert not [f for f in errors_of(report) if f["topic"] == "install"], text
        live.write_text(f"Include {out}/esmirror-wsgi.conf\n")


@pytest.mark.parametrize("env_sh,words,absent", [
    ("LT_IS_USER=\n", "LT_IS_USER is empty at", "but LT_IS_USER is  ("),
    ("LT_IS_USER=$(whoami)\n", "is computed when env.sh runs, and esmirror reads the account name as written",
     "is no account on this machine"),
    ("LT_IS_USER=${APACHE_USER:-www-data}\n", "is computed when env.sh runs", "is no account on this machine"),
])
def test_an_empty_or_computed_lt_is_user_is_said_once_as_what_it_is(tmp_path, env_sh, words, absent):
    """An empty value also gave 'but LT_IS_USER is  (…)' with 'change User to ;'; a value sh
    computes was called no account on this machine."""
    user = account()
    root = install(tmp_path, env_sh)
    conf = debian_layout(tmp_path, user)
    rc, report, text = check(root, conf, "--json")
    assert rc == 1 and words in text and absent not in text, text
    assert "to ;" not in text, text


def test_a_stale_require_ip_in_the_admins_own_vhost_is_to_be_edited_not_overwritten(tmp_path):
    """Any file that was not deploy's rendering was called 'a copy of it', with the advice to
    copy the snippet over it: over the admin's own vhost, that would wipe Express Server's site."""
    user, root, conf, out = rendered_layout(tmp_path)
    vhost = conf.parent / "sites-enabled" / "000-default.conf"
    vhost.write_text(f"Include {out}/esmirror-wsgi.conf\n<Location /lizardtech/mirror>\n"
                     "    Require ip 198.51.100.7\n</Location>\n")
    rc, report, text = check(root, conf, "--json")
    # (the vhost's <Location>, read last, decides every route: one finding per list)
    found = [f for f in errors_of(report) if f["topic"] == "require-ip" and f["file"] == str(vhost)]
    [admin] = [f for f in found if "status" in f["message"]]
    assert rc == 1 and admin["fix"].startswith(f"write 'Require ip 127.0.0.1 ::1' at {vhost}:3 (a file of "
                                               "httpd's own, not esmirror's rendering)"), admin
    assert found and not [f for f in found if "copy" in f["fix"]], found
    # a copy that kept deploy's own name, alone in its folder, is still a copy
    alone = tmp_path / "conf.d"
    alone.mkdir()
    (alone / "esmirror-wsgi.conf").write_text((out / "esmirror-wsgi.conf").read_text())
    vhost.write_text(f"Include {alone}/esmirror-wsgi.conf\n")
    write_ini(root, allow_push="192.0.2.20")
    rc, report, text = check(root, conf, "--json")
    [push] = [f for f in errors_of(report) if f["topic"] == "require-ip" and "manifest" in f["message"]]
    assert f"over {alone / 'esmirror-wsgi.conf'}, which is a copy of it" in push["fix"], push
