"""``esmirror deploy apache|iis``: render deploy/ templates for one install.

The account comes from ``LT_IS_USER`` in env.sh (Express Server's ``ltcsd`` runs as
it, so httpd and the receiver must too); a ``--user`` that disagrees, or an httpd
``User`` that disagrees, stops the rendering: a configuration that splits the two
accounts is never written.
"""
from __future__ import annotations

import ipaddress
import ntpath
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from app.core.errors import ConfigError
from app.core.express import parse_port, read_lt_is_user
from app.core.settings import PUSH_ROUTES, Network, Settings, shown_network
from app.core.server import upload_limit


def _templates() -> Path:
    """deploy/ of the checkout this code runs from, else the copy an install put under
    <prefix>/share/esmirror (setup.cfg's data_files)."""
    beside = Path(__file__).resolve().parent.parent / "deploy"
    return beside if beside.is_dir() else Path(sys.prefix) / "share" / "esmirror" / "deploy"


TEMPLATES = _templates()
APACHE_FILES = ("esmirror-wsgi.conf", "esmirror.wsgi", "esmirror-proxy.conf", "esmirror-receiver.service",
                "esmirror-agent.service")
IIS_FILES = ("web.config",)
LOOPBACK = "127.0.0.1 ::1"


@dataclass
class Rendered:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    user: str = ""
    notes: list[str] = field(default_factory=list)


def deploy_user(settings: Settings, user: str | None, httpd_conf: Path | None = None) -> str:
    """LT_IS_USER of env.sh, after checking that ``--user`` and httpd's User agree with it."""
    from .httpd import apache_user, read_httpd_config

    env = read_lt_is_user(settings.env_sh)
    if not env.user:
        raise ConfigError(f"LT_IS_USER is empty at {env.where}; set it to the account ltcsd runs as")
    if env.user == "root" or (user or "") == "root":
        raise ConfigError(f"the account would be root ({'--user' if user == 'root' else env.where}): "
                          "httpd and mod_wsgi refuse to run as root, and the receiver must not; set "
                          f"LT_IS_USER in {env.path} to the account Express Server and httpd share")
    if user and user != env.user:
        raise ConfigError(
            f"--user {user} disagrees with LT_IS_USER {env.user} ({env.where}): httpd, the receiver "
            f"and ltcsd must run as one account; set LT_IS_USER={user} in {env.path} "
            f"(or run `esmirror check --fix`), or render with --user {env.user}")
    if httpd_conf is not None:
        httpd = read_httpd_config(httpd_conf)
        apache = apache_user(httpd)
        if apache is not None and apache != env.user:
            raise ConfigError(
                f"httpd's User is {apache} ({httpd.user.where}) but LT_IS_USER is "  # type: ignore[union-attr]
                f"{env.user} ({env.where}): make them the same account before deploying "
                "(`esmirror check` says how), or give --httpd-conf '' to render for another machine")
    return env.user


def httpd_conf_path(given: str | None) -> Path | None:
    """--httpd-conf: that file; not given: this machine's httpd config, if any; '': none."""
    from .httpd import find_httpd_conf

    if given is None:
        return find_httpd_conf()
    if given and not Path(given).is_file():
        raise ConfigError(f"--httpd-conf {given}: no such file")
    return Path(given) if given else None


def _group_of(user: str) -> str:
    try:
        import grp
        import pwd

        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except (ImportError, KeyError):
        return user  # not an account here (rendering for another machine): its own group


def _writable(networks: tuple[Network, ...]) -> list[Network]:
    """The list as web servers take it: httpd refuses a /0 mask ('::/0', '0.0.0.0/0'), so a
    whole family is written as its two halves (::/1 and 8000::/1), which admit the same."""
    out: list[Network] = []
    for net in networks:
        out += list(net.subnets(prefixlen_diff=1)) if net.prefixlen == 0 else [net]
    return list(dict.fromkeys(out))


def require_line(networks: tuple[Network, ...]) -> str:
    """Apache 2.4 ``Require`` for an allow list; an empty list admits nobody, as the receiver does."""
    unique = list(dict.fromkeys(shown_network(n) for n in _writable(networks)))
    return f"Require ip {' '.join(unique)}" if unique else "Require all denied"


def apache_word(text: str) -> str:
    """A path as one httpd config word: quoted when it holds a space."""
    return f'"{text}"' if re.search(r"\s", text) else text


def _unit_text(text: str) -> str:
    """Text as a systemd unit setting holds it literally (% starts a specifier there)."""
    return text.replace("%", "%%")


def _unit_exec(*argv: str) -> str:
    """A command line as systemd's ExecStart= runs it literally ($ starts a variable there)."""
    return _unit_text(" ".join(shlex.quote(a) for a in argv)).replace("$", "$$")


def _paths_fit(**paths: str) -> None:
    """Paths go into config lines as they are: a line break would add a line of its own."""
    for option, value in paths.items():
        if re.search(r"[\x00-\x1f\x7f]", value):
            raise ConfigError(f"--{option.replace('_', '-')} {value!r} holds a line break or other "
                              "control character and cannot be written into a config file; use a "
                              "path without one")


def _fill(template: str, values: dict[str, str], name: str) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise ConfigError(f"template {name}: no value for {{{{{match.group(1)}}}}}")
        return values[match.group(1)]
    return re.sub(r"\{\{(\w+)\}\}", one, template)


def _write(out_dir: Path, kind: str, names: tuple[str, ...], values: dict[str, str],
           rendered: Rendered) -> None:
    texts = {}
    for name in names:  # every file rendered before one is written: all or nothing
        source = TEMPLATES / kind / name
        if not source.is_file():
            raise ConfigError(f"{source}: template missing; this esmirror install is incomplete: "
                              "install it again (pip install) from its checkout or package")
        texts[name] = _fill(source.read_text(encoding="utf-8"), values, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        target = out_dir / name
        target.write_text(text, encoding="utf-8")
        rendered.files.append(target)


def render_apache(settings: Settings, out_dir: Path, user: str | None = None, venv: str | None = None,
                  backend: str = "127.0.0.1:8081", httpd_conf: str | None = None) -> Rendered:
    """mod_wsgi snippet + .wsgi file, the mod_proxy → gunicorn snippet + systemd unit, and the
    agent's systemd unit (for a master)."""
    out_dir = out_dir.resolve()
    venv_dir = str(Path(venv or sys.prefix).absolute())
    _paths_fit(venv=venv_dir, out=str(out_dir), install_dir=str(settings.install_dir))
    host, _, port = backend.rpartition(":")
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if parse_port(port) is None or not loopback or (":" in host and not host.startswith("[")):
        raise ConfigError(f"--backend {backend}: gunicorn must listen on a loopback IP:PORT "
                          "([::1]:PORT for IPv6) so only httpd reaches it")
    account = deploy_user(settings, user, httpd_conf_path(httpd_conf))
    install = str(settings.install_dir)
    values = {
        "install_dir": install, "install_dir_py": repr(install), "env_sh": str(settings.env_sh),
        "user": account, "group": _group_of(account), "home": str(settings.image_server),
        "venv": venv_dir, "prefix": settings.prefix, "prefix_re": re.escape(settings.prefix),
        "push_routes": "|".join(PUSH_ROUTES),
        # mod_wsgi reads option=value itself: the value is quoted, never the whole option
        "home_opt": "home=" + apache_word(str(settings.image_server)),
        "python_home_opt": "python-home=" + apache_word(venv_dir),
        # the systemd unit: % starts a specifier there, and $ a variable in ExecStart
        "unit_install_dir": _unit_text(install), "unit_home": _unit_text(str(settings.image_server)),
        "wsgi_file": apache_word(str(out_dir / "esmirror.wsgi")), "max_upload_bytes": str(settings.max_upload_bytes),
        "require_admin": require_line(settings.allow_admin),
        "require_push": require_line(settings.allow_push),
        "require_browse": require_line(settings.allow_push + settings.allow_admin),
        "backend": backend, "proxy_ips": LOOPBACK,
        "exec_start": _unit_exec(f"{venv_dir}/bin/esmirror", "serve", "--install-dir", install,
                                 "--server", "gunicorn", "--bind", backend),
        "agent_exec_start": _unit_exec(f"{venv_dir}/bin/esmirror", "agent", "--install-dir", install),
    }
    rendered = Rendered(out_dir, user=account)
    _write(out_dir, "apache", APACHE_FILES, values, rendered)
    rendered.notes += _unreadable_for(account, Path(venv_dir))
    if not any(ipaddress.ip_address(host.strip("[]")) in n for n in settings.trusted_proxies):
        rendered.notes.append(
            f"for the mod_proxy variant set trusted_proxies = {LOOPBACK} in {settings.ini_path}: "
            "otherwise every caller looks like httpd's own address")
    return rendered


def _unreadable_for(account: str, venv: Path) -> list[str]:
    """The 0700 trap, said at render time: the venv or code the daemon needs but cannot read."""
    from .httpd import blocked_at, code_outside, pwd

    try:
        who = pwd.getpwnam(account)
    except (AttributeError, KeyError):  # Windows, or rendering for another machine
        return []
    for target in [venv, *code_outside(venv)]:
        blocked = blocked_at(target, who, 4 | 1)
        if blocked:
            return [f"{account} cannot read {target}: {blocked[1]}; httpd's daemon and "
                    f"the gunicorn unit run as {account}: give --venv a venv it can read (esmirror check "
                    "says the same after installing)"]
    return []


def _ip_security(networks: tuple[Network, ...]) -> str:
    lines = []
    for net in _writable(networks):
        # IIS takes a dotted mask for IPv4 and a prefix length for IPv6
        mask = str(net.netmask) if net.version == 4 else str(net.prefixlen)
        lines.append(f'        <add ipAddress="{net.network_address}" subnetMask="{mask}" allowed="true"/>')
    return "\n".join(lines)


def render_iis(settings: Settings, out_dir: Path, user: str | None = None, venv: str | None = None,
               request_timeout: str = "01:00:00") -> Rendered:
    """web.config for HttpPlatformHandler running waitress (``esmirror serve``) on loopback."""
    # Windows has no env.sh: there --user only names the app pool account for the notes
    account = deploy_user(settings, user) if settings.env_sh.exists() else (user or "")
    out_dir = out_dir.resolve()
    venv_dir = venv or sys.prefix
    if not (ntpath.isabs(venv_dir) or Path(venv_dir).is_absolute()):
        # HttpPlatformHandler would look for it under the site's folder
        raise ConfigError(f"--venv {venv_dir}: give the venv's full path as the Windows server sees it "
                          r"(C:\esmirror\venv)")
    _paths_fit(venv=venv_dir, out=str(out_dir), install_dir=str(settings.install_dir))
    install = str(settings.install_dir)
    arguments = subprocess.list2cmdline([
        "-m", "agent", "serve", "--install-dir", install, "--server", "waitress",
        "--bind", "127.0.0.1:%HTTP_PLATFORM_PORT%"])
    values = {
        "install_dir": escape(install, {'"': "&quot;"}),
        "process_path": escape(ntpath.join(venv_dir, "Scripts", "python.exe"), {'"': "&quot;"}),
        "arguments": escape(arguments, {'"': "&quot;"}),
        "request_timeout": request_timeout,
        "max_allowed_content_length": str(upload_limit(settings, under_iis=True)),
        "ip_security": _ip_security(settings.allow_push + settings.allow_admin),
    }
    rendered = Rendered(out_dir, user=account)
    _write(out_dir, "iis", IIS_FILES, values, rendered)
    if not any(ipaddress.ip_address("127.0.0.1") in n for n in settings.trusted_proxies):
        rendered.notes.append(
            f"set trusted_proxies = {LOOPBACK} in {settings.ini_path}: IIS forwards from loopback and "
            "names the caller in X-Forwarded-For")
    return rendered
