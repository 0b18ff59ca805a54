"""``esmirror check``: find what would break this install before a push does (SPEC §4).

Reads Apache's configuration the way httpd does (``Include``/``IncludeOptional``
with globs relative to ``ServerRoot``, ``${VAR}`` from Debian's ``envvars`` and
``Define``), finds the effective ``User`` and every ``WSGIDaemonProcess user=``,
and compares them with ``LT_IS_USER`` from ``env.sh``. Then checks what that
user can reach: the working dir, the catalog Paths, the venv Apache runs.
Every finding says what to change, in which file, to what.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
import ssl
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    import pwd
except ImportError:  # Windows: no Unix accounts; IIS's app pool account is documented instead
    pwd = None  # type: ignore[assignment]

from lxml import etree

from app.core.catalogs import validate_catalogs_file
from app.core.errors import ConfigError, WorkingDirError, one_line
from app.core.express import EnvUser, read_lt_is_user, read_mirrors, write_lt_is_user
from app.core.settings import PUSH_ROUTES, Network, Settings, load_settings, parse_networks, shown_network
from app.core.server import upload_limit
from app.core.signing import read_secret
from app.core.xmlsafe import parse_file

from .deploy import APACHE_FILES, apache_word, require_line
from .httpd import (DEFAULT_HTTPD_CONFS, HttpdConfig, LocationSection, Where, account_name, apache_user,
                    blocked_at, code_outside, find_httpd_conf, read_httpd_config)

_MAX_DIRS = 20000  # a bounded walk of var/data for permissions
DEFAULT_RECEIVER_UNIT = "/etc/systemd/system/esmirror-receiver.service"  # deploy/apache/README.md
# a DT_NEEDED name in the module's string table: NUL on both sides, e.g. "libpython3.11.so.1.0"
_LIBPYTHON_RE = re.compile(rb"\0libpython(\d+)\.(\d+)[a-z]*\.so[0-9.]*\0")
_MAX_MODULE_BYTES = 64 << 20  # mod_wsgi.so is well under 1 MiB; do not slurp a wrong file whole
# where distributions put their modules and their interpreter (deploy/apache/README.md)
_DISTRIBUTION_LIBS = (Path("/usr/lib"), Path("/usr/lib64"))
_DISTRIBUTION_BINS = (Path("/usr/bin"), Path("/bin"))

# --- the check -------------------------------------------------------------------

@dataclass
class Finding:
    level: str  # "error" (exit non-zero), "warning", "ok"
    topic: str
    message: str
    file: str | None = None
    line: int | None = None
    fix: str | None = None


@dataclass
class CheckReport:
    install_dir: str
    findings: list[Finding] = field(default_factory=list)
    lt_is_user: str | None = None
    apache_user: str | None = None
    fixed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def add(self, level: str, topic: str, message: str, where: Where | None = None,
            fix: str | None = None, file: str | None = None) -> None:
        finding = Finding(level, topic, message, where.file if where else file,
                          where.line if where else None, fix)
        if finding not in self.findings:  # one place reached by several paths is one finding
            self.findings.append(finding)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "install_dir": self.install_dir, "lt_is_user": self.lt_is_user,
                "apache_user": self.apache_user, "fixed": self.fixed,
                "findings": [asdict(f) for f in self.findings]}


def run_check(install_dir: str | None, httpd_conf: str | None = None, env_sh: str | None = None,
              fix: bool = False, unit: str | None = None, web_config: str | None = None) -> CheckReport:
    """Every check of SPEC §4; with ``fix``, set LT_IS_USER in env.sh to Apache's user first.
    ``web_config``: the IIS application's (default: the one ``deploy iis`` rendered, if any)."""
    if web_config and not Path(web_config).is_file():
        raise ConfigError(f"--web-config {web_config}: no such file")
    try:
        settings = load_settings(install_dir)
    except ConfigError as exc:
        chosen = install_dir or os.environ.get("ESMIRROR_INSTALL_DIR")
        if not chosen or not (Path(chosen) / "ImageServer").is_dir():
            raise  # no install to check: a usage error (exit 2)
        settings = Settings(install_dir=Path(chosen).resolve())
        report = CheckReport(str(settings.install_dir))
        if isinstance(exc, WorkingDirError):  # (its message says what to do; esmirror.ini is fine)
            report.add("error", "working-dir", exc.message, file=str(settings.data_dir))
        else:
            report.add("error", "settings", exc.message, file=str(settings.ini_path),
                       fix="correct esmirror.ini as the message says")
    else:
        report = CheckReport(str(settings.install_dir))
        report.add("ok", "settings", f"{settings.ini_path} read" if settings.ini_path.exists()
                   else f"no {settings.ini_path}: the defaults apply")
        if not settings.express_version:
            report.add("warning", "express-version", "express_version is not set, so this server says "
                       "'unknown' and the browse check cannot tell Express Server versions apart",
                       file=str(settings.ini_path),
                       fix=f"set express_version (e.g. express_version = 9.5) in {settings.ini_path} "
                           "on the master and every secondary")
    if pwd is None:
        report.add("warning", "user", "no Unix accounts here: User/LT_IS_USER and permissions are not "
                   "checked; the IIS app pool's account needs Modify on var\\data (deploy/iis/README.md)")
        _check_mirrors(report, settings)
        _check_secret(report, settings, None)
        _check_catalogs(report, settings, None)
        _check_web_config(report, settings, web_config)
        return report
    env_path = Path(env_sh) if env_sh else settings.env_sh
    if env_sh and not env_path.is_file():  # (a typo must not read, or --fix create, another file)
        raise ConfigError(f"--env-sh {env_sh}: no such file")
    conf_path = Path(httpd_conf) if httpd_conf else find_httpd_conf()
    if httpd_conf and not conf_path.is_file():  # type: ignore[union-attr]
        raise ConfigError(f"--httpd-conf {httpd_conf}: no such file")
    httpd = read_httpd_config(conf_path) if conf_path else None
    if fix and httpd is not None:
        _fix_env_sh(report, httpd, env_path)
    unit_path = Path(unit) if unit else Path(DEFAULT_RECEIVER_UNIT)
    if unit and not unit_path.is_file():
        raise ConfigError(f"--unit {unit}: no such file")
    env_user = read_lt_is_user(env_path)
    report.lt_is_user = env_user.user
    _check_users(report, httpd, env_user)
    if unit_path.is_file():
        _check_receiver_unit(report, unit_path, env_user, settings)
    account = _account(report, env_user)
    _check_mirrors(report, settings)
    _check_secret(report, settings, account)
    _check_catalogs(report, settings, account)
    if account is not None:
        _check_working_dir(report, settings, account)
    if httpd is not None:
        _check_wsgi_code(report, httpd, account)
        _check_venv_python(report, httpd)
        _check_mount(report, httpd, settings)
        _check_push_routes(report, httpd, settings)
        _check_require_ip(report, httpd, settings)
    _check_web_config(report, settings, web_config)
    return report


def _check_receiver_unit(report: CheckReport, unit: Path, env_user: EnvUser, settings: Settings) -> None:
    """The gunicorn receiver (mod_proxy variant) writes var/data: it must run as LT_IS_USER too."""
    user, line, section, served, served_line = None, 0, "", None, 0
    try:
        lines = unit.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        report.add("error", "unit", f"cannot read {unit}: {exc.strerror or exc}", file=str(unit))
        return
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if text.startswith("["):
            section = text
        elif section == "[Service]" and text.startswith("User="):
            user, line = text[len("User="):].strip() or None, number  # (the last one counts)
        elif section == "[Service]" and text.startswith("Environment="):
            try:
                words = shlex.split(text[len("Environment="):])  # (as deploy renders it, quoted)
            except ValueError:
                words = []
            for word in words:
                if word.startswith("ESMIRROR_INSTALL_DIR="):
                    served, served_line = word.split("=", 1)[1].replace("%%", "%"), number
    if served_line:
        _check_serves_this_install(report, settings, served, f"{unit}", Where(str(unit), served_line))
    where = Where(str(unit), line) if line else None
    if user is None:
        report.add("error", "unit", f"{unit} sets no User=: the receiver runs as root and leaves root's "
                   "files in var/data, which ltcsd cannot change", file=str(unit),
                   fix=f"add User={env_user.user} under [Service] in {unit} (esmirror deploy apache "
                       "renders it); then systemctl daemon-reload and restart it")
    elif account_name(user) != env_user.user:
        report.add("error", "unit", f"{unit} runs the receiver as {user} but LT_IS_USER is "
                   f"{env_user.user} ({env_user.where}): the receiver writes var/data as ltcsd's account",
                   where, fix=f"set User={env_user.user} at {where}; then systemctl daemon-reload and "
                              "restart it")
    else:
        report.add("ok", "unit", f"{unit} runs the receiver as {user} = LT_IS_USER", where)


def _check_mount(report: CheckReport, httpd: HttpdConfig, settings: Settings) -> None:
    """esmirror's WSGIScriptAlias (or ProxyPass) must mount it at the prefix every master pushes to."""
    proxied = [d for d in httpd.proxy_passes if d.args[1] != "!" and settings.prefix in
               (d.args[0].rstrip("/"), urlsplit(d.args[1]).path.rstrip("/"))]
    if not httpd.esmirror_aliases() and not proxied:
        _report_unmounted(report, httpd, settings)
    for directive in httpd.esmirror_aliases():
        alias, script = directive.args[0], Path(directive.args[1])
        if not os.access(script, os.R_OK):
            continue  # (maybe not esmirror's) unreadable scripts are reported by the wsgi check
        _check_serves_this_install(report, settings, _wsgi_install_dir(script),
                                   f"the receiver httpd mounts at {alias} (its {script})", directive.where)
        if alias.rstrip("/") != settings.prefix:
            report.add("error", "prefix", f"WSGIScriptAlias mounts esmirror at {alias} but prefix is "
                       f"{settings.prefix} ({settings.ini_path}): masters push to the prefix",
                       directive.where,
                       fix=f"change the WSGIScriptAlias at {directive.where} to {settings.prefix}, or set "
                           f"prefix = {alias.rstrip('/')} in {settings.ini_path} on every server")
        elif alias != settings.prefix:
            # the alias takes the slash of /prefix/manifest: the app is left "manifest", no route
            report.add("error", "prefix", f"WSGIScriptAlias mounts esmirror at {alias}, with a trailing "
                       "slash: httpd answers 404 for every route, pushes included", directive.where,
                       fix=f"drop the trailing slash at {directive.where}: WSGIScriptAlias {settings.prefix} "
                           f"{apache_word(str(script))} …; then reload httpd")
    for directive in proxied:
        path, url = directive.args
        target = urlsplit(url).path
        if path.endswith("/") != target.endswith("/"):
            # httpd swaps the one for the other as written: /prefix/manifest becomes /prefixmanifest
            sample = path.rstrip("/") + "/manifest"
            origin = url[:len(url) - len(target)] if target else url
            report.add("error", "prefix", f"ProxyPass forwards {path} to {url}: one ends with a slash and "
                       f"the other does not, so {sample} reaches the receiver as "
                       f"{target + sample[len(path):]} and every route answers 404", directive.where,
                       fix=f"at {directive.where} end both with a slash or neither, as esmirror deploy "
                           f"apache renders it (<Location {path.rstrip('/')}> ProxyPass "
                           f"{origin}{target.rstrip('/')}); then reload httpd")


_WSGI_INSTALL_RE = re.compile(r"""os\.environ\.setdefault\(\s*["']ESMIRROR_INSTALL_DIR["']\s*,\s*(.+?)\s*\)\s*$""",
                              re.MULTILINE)


def _wsgi_install_dir(script: Path) -> str | None:
    """The install a .wsgi rendered by deploy serves (None: not a rendered one)."""
    import ast

    try:
        found = _WSGI_INSTALL_RE.search(script.read_text(encoding="utf-8", errors="replace"))
        value = ast.literal_eval(found.group(1)) if found else None
    except (OSError, ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


def _check_serves_this_install(report: CheckReport, settings: Settings, served: str | None,
                               what: str, where: Where | None) -> None:
    """A receiver rendered for another install (a moved or cloned one) writes that one's
    var/data: this install's checks would pass while its set is never applied."""
    if served is None or Path(served).resolve() == settings.install_dir.resolve():
        return
    report.add("error", "install", f"{what} serves {served}, not this install ({settings.install_dir}): "
               "pushes to it change that install's var/data", where,
               fix=f"render the Apache files for this install (esmirror deploy apache --install-dir "
                   f"{settings.install_dir}) and use them there; run esmirror check; then reload httpd")


def _report_unmounted(report: CheckReport, httpd: HttpdConfig, settings: Settings) -> None:
    """httpd mounts no receiver (the snippet rendered but never linked, a2enconf forgotten):
    masters get httpd's 404 while every other check passes. An error once the Apache files
    are rendered here; before that, a receiver may run on its own (esmirror serve)."""
    rendered = settings.etc_dir / "apache" / "esmirror"
    intended = any((rendered / name).is_file() for name in ("esmirror-wsgi.conf", "esmirror-proxy.conf"))
    report.add("error" if intended else "warning", "mount",
               f"httpd's configuration ({httpd.main}) mounts no esmirror receiver: no WSGIScriptAlias "
               f"of esmirror's .wsgi, no ProxyPass of {settings.prefix}; a master pushing to this "
               "server through httpd gets 404",
               fix=f"link the rendered esmirror-wsgi.conf (or esmirror-proxy.conf) in {rendered} into "
                   "httpd's configuration and enable it (Debian: ln -s it as "
                   "/etc/apache2/conf-available/esmirror.conf, then a2enconf esmirror); run esmirror "
                   "check; then reload httpd" + ("" if intended else
                   "; a receiver run by esmirror serve on its own port needs no httpd mount"))


_RENDERED_MARK = "Rendered by `esmirror deploy apache`"


def _httpd_file_kind(where: Where) -> str:
    """Who writes the httpd file at ``where``: ``rendered`` (httpd reads deploy's own file,
    linked or included: a new rendering is what it reads), ``copy`` (a copy of one, which
    must be copied again) or ``own`` (the admin's, e.g. their vhost: never to overwrite)."""
    path = Path(where.file).resolve()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "own"
    if _RENDERED_MARK not in text:
        return "own"
    # a rendering writes its files together; a copy stands alone, whatever its name
    together = all((path.parent / name).is_file() for name in ("esmirror-wsgi.conf", "esmirror.wsgi",
                                                               "esmirror-proxy.conf"))
    return "rendered" if path.name in APACHE_FILES and together else "copy"


def _copy_again(where: Where) -> str:
    return (f"; then copy the rendered esmirror-wsgi.conf (or esmirror-proxy.conf, the one you "
            f"installed) over {where.file}, which is a copy of it")


def _check_push_routes(report: CheckReport, httpd: HttpdConfig, settings: Settings) -> None:
    """A <LocationMatch> that opens push routes to allow_push must open all of them: one left
    to the prefix's allow_admin is refused by httpd (403) to a master on another host."""
    for section in httpd.locations:
        if not section.regex:
            continue
        opened = [r for r in PUSH_ROUTES if section.matches(f"{settings.prefix}/{r}/x")]
        if opened and len(opened) < len(PUSH_ROUTES):
            left = [r for r in PUSH_ROUTES if r not in opened]
            report.add("error", "push-routes", f"<LocationMatch> opens {', '.join(opened)} to the "
                       f"masters but not {', '.join(left)}: httpd refuses a master outside "
                       "allow_admin there (403), so publishes that change a large file fail",
                       section.where,
                       fix=(f"make the <LocationMatch> at {section.where} cover {'|'.join(PUSH_ROUTES)} "
                            "(or use the snippet esmirror deploy apache renders in place of this "
                            "hand-written one)"
                            if _httpd_file_kind(section.where) == "own" else
                            f"render the Apache files again (esmirror deploy apache)"
                            f"{_copy_again(section.where) if _httpd_file_kind(section.where) == 'copy' else ''}"
                            f", or make the <LocationMatch> at {section.where} cover {'|'.join(PUSH_ROUTES)}"))


def _check_require_ip(report: CheckReport, httpd: HttpdConfig, settings: Settings) -> None:
    """httpd's ``Require ip`` on esmirror's routes must admit what esmirror.ini's lists admit:
    an allow_push changed without rendering the Apache files again leaves httpd refusing the
    master (403) while the receiver would let it in."""
    kinds = [("allow_push", settings.allow_push, [(r, f"{settings.prefix}/{r}/x") for r in PUSH_ROUTES]),
             ("allow_push + allow_admin", settings.allow_push + settings.allow_admin,
              [("browse", f"{settings.prefix}/browse")]),
             ("allow_admin", settings.allow_admin, [("status, publish, archive", f"{settings.prefix}/status")])]
    for setting, networks, urls in kinds:
        # httpd applies <Location>/<LocationMatch> in the order it reads them; the last one with
        # a Require decides (AuthMerging Off, httpd's default)
        decided: dict[int, list[str]] = {}
        for route, url in urls:
            index = next((i for i in reversed(range(len(httpd.locations)))
                          if httpd.locations[i].requires and httpd.locations[i].matches(url)), None)
            if index is not None:
                decided.setdefault(index, []).append(route)
        for index, routes in sorted(decided.items()):
            section = httpd.locations[index]
            allowed = _required_networks(section)
            if allowed is None:
                continue  # not a plain list of addresses: not what deploy renders, not compared
            words = " ".join(w for d in section.requires for w in d.args[1:] if d.args[0].lower() == "ip")
            where = section.requires[0].where
            wanted, have = _address_set(networks), _address_set(allowed)
            if wanted == have:
                report.add("ok", "require-ip", f"httpd's Require ip on {', '.join(routes)} = {setting}", where)
                continue
            refused, extra = _not_covered(wanted, have), _not_covered(have, wanted)
            effects = []
            if refused:
                effects.append(f"httpd refuses {' '.join(refused)} (403) before esmirror sees the request")
            if extra:
                effects.append(f"httpd lets in {' '.join(extra)}, which {setting} does not list")
            report.add("error", "require-ip", f"httpd allows {words or 'nobody (Require all denied)'} on "
                       f"{', '.join(routes)} ({where}) but {setting} in {settings.ini_path} is "
                       f"{' '.join(map(shown_network, networks)) or 'empty (nobody)'}: {'; '.join(effects)}",
                       where,
                       fix=_require_ip_fix(where, settings, require_line(networks)))


def _require_ip_fix(where: Where, settings: Settings, line: str) -> str:
    then = "; run esmirror check; then reload httpd (apachectl configtest && apachectl graceful)"
    kind = _httpd_file_kind(where)
    if kind == "own":  # (their vhost: rendering esmirror's files changes nothing there)
        return f"write '{line}' at {where} (a file of httpd's own, not esmirror's rendering){then}"
    render = (f"render the Apache files again (esmirror deploy apache --install-dir "
              f"{settings.install_dir}), which writes '{line}'")
    return render + (" there" if kind == "rendered" else _copy_again(where)) + then


def _check_web_config(report: CheckReport, settings: Settings, given: str | None) -> None:
    """IIS filters on web.config's ipSecurity before the receiver sees a request: one rendered
    before allow_push or allow_admin changed has IIS refuse a new master (its own 403.6) or
    admit an old one. Its body limit below the receiver's has IIS refuse large uploads."""
    path = Path(given) if given else settings.etc_dir / "iis" / "esmirror" / "web.config"
    if not path.is_file():
        return
    render = (f"render it again (esmirror deploy iis --install-dir {settings.install_dir}), copy it "
              "over the IIS application's web.config, recycle its app pool, then run esmirror check "
              "--web-config <that web.config>")
    try:
        root = parse_file(path)
    except (OSError, ValueError, etree.XMLSyntaxError) as exc:  # (ValueError: a DOCTYPE, refused)
        report.add("error", "web-config", f"{path} cannot be read as XML: {one_line(exc, 200)}",
                   file=str(path), fix=render)
        return
    # (in any namespace, and inside <location path="."> too)
    ip = next(root.iter("{*}ipSecurity"), None)
    limits = next(root.iter("{*}requestLimits"), None)
    networks = settings.allow_push + settings.allow_admin
    allowed = _ip_security_networks(ip) if ip is not None else None
    if ip is None:
        report.add("warning", "web-config", f"{path} has no ipSecurity section: IIS admits every "
                   "address, and only the receiver's own allow_push/allow_admin check stands",
                   file=str(path), fix=render)
    elif ip.get("allowUnlisted", "true").lower() != "false":
        report.add("error", "web-config", f"{path}: ipSecurity admits addresses it does not list "
                   "(allowUnlisted is not false)", file=str(path), fix=render)
    elif allowed is None:
        report.add("warning", "web-config", f"{path}: ipSecurity holds entries deploy does not write "
                   "(denials, domain names, removals), so it is not compared with allow_push and "
                   "allow_admin; compare it by hand", file=str(path), fix=render)
    elif _address_set(allowed) == _address_set(networks):
        report.add("ok", "web-config", f"IIS's ipSecurity in {path} = allow_push + allow_admin", file=str(path))
    else:
        wanted, have = _address_set(networks), _address_set(allowed)
        refused, extra = _not_covered(wanted, have), _not_covered(have, wanted)
        effects = [f"IIS refuses {' '.join(refused)} (403.6) before esmirror sees the request"] if refused else []
        if extra:
            effects.append(f"IIS lets in {' '.join(extra)}, which allow_push and allow_admin do not list")
        listed = " ".join(map(shown_network, allowed)) or "nobody"
        report.add("error", "web-config", f"{path} lets IIS admit {listed}, but allow_push + "
                   f"allow_admin in {settings.ini_path} are {' '.join(map(shown_network, networks)) or 'empty'}: "
                   f"{'; '.join(effects)}", file=str(path), fix=render)
    wanted_body = upload_limit(settings, under_iis=True)
    try:
        body = int(limits.get("maxAllowedContentLength", "30000000")) if limits is not None else 30000000
    except ValueError:
        return  # IIS itself refuses to load it, and says so
    if body < wanted_body:
        report.add("error", "web-config", f"{path}: maxAllowedContentLength is {body} bytes, but the "
                   f"receiver tells masters it takes {wanted_body} (max_upload_bytes): IIS refuses every "
                   "body in between (404.13)", file=str(path), fix=render)


def _ip_security_networks(section: Any) -> list[Network] | None:
    """What ipSecurity's ``allowed="true"`` entries admit (after its last ``clear``); None where
    it holds anything else (IIS's ``allowed`` is false unless set)."""
    found: list[Network] = []
    for entry in section:
        if not isinstance(entry.tag, str):
            continue  # a comment
        name = etree.QName(entry).localname
        if name == "clear":
            found = []
            continue
        if name != "add" or entry.get("allowed", "").lower() != "true" or entry.get("domainName"):
            return None
        address, mask = entry.get("ipAddress", ""), entry.get("subnetMask")
        try:  # IIS writes IPv4 masks dotted (255.255.255.0), IPv6 ones as a prefix length
            found.append(ipaddress.ip_network(f"{address}/{mask}" if mask else address, strict=False))
        except ValueError:
            return None
    return found


def _required_networks(section: LocationSection) -> list[Network] | None:
    """The addresses a section's ``Require ip`` lines admit (any of them, as httpd's implicit
    RequireAny), or None when it requires something else."""
    if not section.plain:
        return None
    found: list[Network] = []
    for directive in section.requires:
        kind = [a.lower() for a in directive.args[:2]]
        if kind == ["all", "denied"]:
            continue
        if kind[0] != "ip":
            return None
        for word in directive.args[1:]:
            parts = word.split(".")
            if "/" not in word and ":" not in word and len(parts) < 4 and all(p.isdigit() for p in parts if p):
                # httpd's partial address: 10.1 is 10.1.0.0/16
                given = [p for p in parts if p]
                word = ".".join(given + ["0"] * (4 - len(given))) + f"/{8 * len(given)}"
            try:
                found += parse_networks(word)
            except ValueError:
                return None  # httpd refuses to start on it, or this check does not know the form
    return found


def _address_set(networks: tuple[Network, ...] | list[Network]) -> frozenset[Network]:
    """The addresses admitted, one way of writing them: ::/1 and 8000::/1 are ::/0."""
    out: set[Network] = set()
    for version in (4, 6):
        out.update(ipaddress.collapse_addresses(n for n in networks if n.version == version))
    return frozenset(out)


def _not_covered(networks: frozenset[Network], by: frozenset[Network]) -> list[str]:
    """The networks of ``networks`` that ``by`` does not admit whole, as written in esmirror.ini."""
    left = [n for n in networks if not any(n.version == b.version and n.subnet_of(b)  # type: ignore[arg-type]
                                           for b in by)]
    return [shown_network(n) for n in sorted(left, key=lambda n: (n.version, n))]


def _apache_users(httpd: HttpdConfig) -> list[tuple[str, str, Where]]:
    """(what, account, where) for Apache's User and each of esmirror's WSGIDaemonProcess."""
    users = []
    user = apache_user(httpd)
    if user is not None:
        users.append(("Apache's User", user, httpd.user.where))  # type: ignore[union-attr]
    for daemon in httpd.esmirror_daemons():
        if "user" in daemon.options:
            users.append((f"WSGIDaemonProcess {daemon.name} user=", account_name(daemon.options["user"]),
                          daemon.where))
    return users


def _fix_env_sh(report: CheckReport, httpd: HttpdConfig, env_path: Path) -> None:
    wanted = {user for _, user, _ in _apache_users(httpd)}
    current = read_lt_is_user(env_path)
    if len(wanted) != 1 or current.user in wanted or any(map(_is_root, wanted)) or \
            not all(_known_account(u) for u in wanted):
        return  # nothing to do, or httpd itself disagrees or names no account: edit httpd's files
    user = wanted.pop()
    backup = write_lt_is_user(env_path, user)
    kept = f" (the old file is kept as {backup})" if backup else ""
    report.fixed.append(f"{env_path}: LT_IS_USER set to {user} (was {current.user}){kept}")


def _known_account(user: str) -> bool:
    try:
        return pwd is not None and bool(pwd.getpwnam(user))
    except KeyError:
        return False


def _check_users(report: CheckReport, httpd: HttpdConfig | None, env_user: EnvUser) -> None:
    lt = env_user.user
    if not lt:
        report.add("error", "user", f"LT_IS_USER is empty at {env_user.where}",
                   file=str(env_user.path), fix=f"set LT_IS_USER=<the account httpd runs as> in {env_user.path}")
    if httpd is None:
        report.add("warning", "user", "no Apache configuration found (tried "
                   + ", ".join(DEFAULT_HTTPD_CONFS) + "): User was not compared with LT_IS_USER",
                   fix="pass --httpd-conf with httpd's main config file")
        return
    for level, problem, where in httpd.problems:
        report.add(level, "apache", problem, where)
    report.apache_user = apache_user(httpd)
    if httpd.user is None and httpd.unreadable:
        report.add("error", "user", f"no User directive in the files of {httpd.main} this check could "
                   f"read; {len(httpd.unreadable)} could not be read: {', '.join(httpd.unreadable[:3])}",
                   file=str(httpd.main), fix="run esmirror check as root, or with --httpd-conf a copy "
                   "this account can read")
    elif httpd.user is None:
        report.add("error", "user", f"no User directive in {httpd.main} or the files it includes "
                   f"({len(httpd.files)} read)", file=str(httpd.main),
                   fix=f"add 'User {lt}' to {httpd.main} so httpd runs as LT_IS_USER")
    users = _apache_users(httpd)
    for what, user, where in users:
        if _is_root(user):
            report.add("error", "user", f"{what} is {user} ({where}): httpd refuses to run as root, "
                       "and the receiver must not", where,
                       fix=f"create an account for Express Server and httpd (e.g. www-data), set it at "
                           f"{where} and as LT_IS_USER in {env_user.path}; then restart httpd and ltcsd")
    if lt and _is_root(lt):
        report.add("error", "user", f"LT_IS_USER is {lt} ({env_user.where}): httpd refuses to run as "
                   "root, so it can never be the same account as ltcsd", file=str(env_user.path),
                   fix=f"set LT_IS_USER in {env_user.path} to the account httpd runs as")
    fixable = len({user for _, user, _ in users}) == 1 and not _is_root(users[0][1]) \
        and _known_account(users[0][1])  # what --fix would write
    for what, user, where in users:
        source = f"{where}"
        if what == "Apache's User" and httpd.user is not None and httpd.user.via:
            source += ", " + "; ".join(httpd.user.via)
        if user == lt:
            report.add("ok", "user", f"{what} {user} ({source}) = LT_IS_USER ({env_user.where})", where)
            continue
        if not lt:
            continue  # (said above: LT_IS_USER is empty; 'change User to ""' would be no advice)
        report.add(
            "error", "user",
            f"{what} is {user} ({source}) but LT_IS_USER is {lt} ({env_user.where}): "
            "httpd and ltcsd must run as the same account",
            where,
            fix=(f"set LT_IS_USER={user} in {env_user.path} (esmirror check --fix does that) or "
                 if fixable else "")
                + f"change {what.rstrip('=')} at {where} to {lt}; then restart httpd and ltcsd")


def _is_root(user: str) -> bool:
    if user in ("root", "#0"):
        return True
    try:
        return pwd is not None and pwd.getpwnam(user).pw_uid == 0
    except KeyError:
        return False


def _account(report: CheckReport, env_user: EnvUser) -> pwd.struct_passwd | None:
    if not env_user.user:
        return None
    try:
        return pwd.getpwnam(env_user.user)
    except KeyError:
        if any(c in env_user.user for c in "$`"):  # ($(whoami), ${X:-y}: sh computes it, we cannot)
            report.add("error", "user", f"LT_IS_USER {env_user.user} ({env_user.where}) is computed "
                       "when env.sh runs, and esmirror reads the account name as written",
                       file=str(env_user.path),
                       fix=f"write the account's name itself: LT_IS_USER=<account> in {env_user.path}")
            return None
        report.add("error", "user", f"LT_IS_USER {env_user.user} ({env_user.where}) is no account on "
                   "this machine", file=str(env_user.path),
                   fix=f"create the account or set LT_IS_USER in {env_user.path} to an existing one")
        return None


def _check_mirrors(report: CheckReport, settings: Settings) -> None:
    if not settings.iserv_cfg.exists():
        report.add("warning", "mirrors", f"no {settings.iserv_cfg}", file=str(settings.iserv_cfg))
        return
    try:
        secondaries = read_mirrors(settings.iserv_cfg)
    except ConfigError as exc:
        report.add("error", "mirrors", exc.message, file=str(settings.iserv_cfg),
                   fix="correct the <Mirrors> element as the message says")
        return
    report.add("ok", "mirrors", f"{len(secondaries)} secondar{'y' if len(secondaries) == 1 else 'ies'} "
               f"in {settings.iserv_cfg}" if secondaries else f"no <Mirrors> in {settings.iserv_cfg}: "
               "this server is a secondary")
    strict = [s.name for s in secondaries if s.ssl == "strict"]
    if not strict:
        return
    bundle = settings.ca_bundle
    try:
        ssl.create_default_context(cafile=str(bundle))
    except (OSError, ssl.SSLError) as exc:
        report.add("error", "ca-bundle", f"{bundle}: {getattr(exc, 'strerror', None) or exc}; strict "
                   f"secondaries ({', '.join(strict)}) are verified against it", file=str(bundle),
                   fix=f"put the PEM certificates (concatenated) that sign those servers in {bundle}")
    else:
        report.add("ok", "ca-bundle", f"{bundle} loads")


def _check_secret(report: CheckReport, settings: Settings, account: pwd.struct_passwd | None) -> None:
    """The signing secret must load as publish and the receiver load it, be readable by the
    account the receiver runs as, and be readable by nobody else."""
    try:
        path = settings.secret_path()
        if path is None:
            return
        read_secret(settings)
    except ConfigError as exc:
        report.add("error", "secret", exc.message, file=str(settings.ini_path),
                   fix="correct shared_secret_file in esmirror.ini or the file it names; publish and "
                       "the receiver refuse to run without it")
        return
    if account is not None:
        blocked = blocked_at(path, account, 4)
        if blocked:
            report.add("error", "secret", f"{account.pw_name} (LT_IS_USER) cannot read the shared "
                       f"secret {path}: {blocked[1]}", file=str(path),
                       fix=f"chown {account.pw_name} {path}; chmod 600 {path}")
            return
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        report.add("warning", "secret", f"{path} can be read by other accounts "
                   f"(mode {mode:o}); anyone who reads it can push",
                   file=str(path), fix=f"chmod 600 {path}")
    else:
        report.add("ok", "secret", f"{path} loads; pushes are signed")


def _check_catalogs(report: CheckReport, settings: Settings, account: pwd.struct_passwd | None) -> None:
    path = settings.data_dir / "catalogs.xml"
    if not path.exists():
        report.add("warning", "catalogs", f"no {path}", file=str(path))
        return
    result = validate_catalogs_file(path)
    for problem in result.problems:
        report.add("error", "catalogs", problem, file=str(path), fix="correct catalogs.xml at that line")
    if account is None:
        return
    stopped: dict[str, list[tuple[str, str]]] = {}  # why → catalogs: one folder may stop several
    for name, target in sorted(result.catalog_paths.items()):
        where = path.parent / target  # (a relative Path is read from var/data; absolute: as is)
        blocked = blocked_at(where, account, 4 | 1 if where.is_dir() else 4)
        if blocked:
            stopped.setdefault(blocked[1], []).append((name, target))
    for why, catalogs in stopped.items():
        names = ", ".join(repr(name) for name, _ in catalogs)
        targets = ", ".join(target for _, target in catalogs)
        report.add("error", "catalogs", f"catalog{'s' if len(catalogs) > 1 else ''} {names}: Path "
                   f"{targets} {'is' if len(catalogs) == 1 else 'are'} not readable by {account.pw_name}: "
                   f"{why}", file=str(path),
                   fix=f"mount the shared image repository at {targets} readable by {account.pw_name}")
    if not result.problems:
        report.add("ok", "catalogs", f"{path}: {len(result.catalog_paths)} catalog(s)")


def _check_working_dir(report: CheckReport, settings: Settings, account: pwd.struct_passwd) -> None:
    data = settings.data_dir
    blocked = blocked_at(data, account, 7)
    problems = dict([blocked]) if blocked else {}  # one finding per place that stops it
    if not blocked:
        for count, (root, dirs, files) in enumerate(os.walk(data)):
            if count > _MAX_DIRS:
                break
            for d in list(dirs):
                hit = blocked_at(Path(root) / d, account, 7)
                if hit:
                    problems.setdefault(*hit)
                    dirs.remove(d)  # what is inside would be stopped at the same folder
            for f in files:
                hit = blocked_at(Path(root) / f, account, 4)
                if hit:
                    problems.setdefault(*hit)
            if len(problems) >= 5:
                break
    for where, why in list(problems.items())[:5]:
        inside = where == data or data in where.parents
        report.add("error", "permissions", f"{account.pw_name} (LT_IS_USER) cannot read/write/delete in "
                   f"the working dir {data}: {why}", file=str(where),
                   fix=f"chown -R {account.pw_name} {data} (the receiver runs as this account)" if inside
                   else f"let {account.pw_name} pass {where} (chmod o+x {where}) or move the install")
    if not problems:
        report.add("ok", "permissions", f"{account.pw_name} can read, write and delete in {data}")


def _check_wsgi_code(report: CheckReport, httpd: HttpdConfig, account: pwd.struct_passwd | None) -> None:
    """The daemon's venv, interpreter and .wsgi file must be readable by the user it runs as."""
    for daemon in httpd.esmirror_daemons():
        name = account_name(daemon.options["user"]) if "user" in daemon.options else apache_user(httpd)
        try:
            who = pwd.getpwnam(name) if name else account
        except KeyError:
            continue  # reported with the user comparison
        if who is None:
            continue
        targets: list[Path] = []
        home = daemon.options.get("python-home")
        if home:
            targets.append(Path(home))
            if (Path(home) / "pyvenv.cfg").exists():  # a venv: its base interpreter too
                targets += [Path(home) / "pyvenv.cfg", *_venv_interpreter(Path(home))]
            targets += code_outside(Path(home))
        if "home" in daemon.options:
            targets.append(Path(daemon.options["home"]))
        for directive in httpd.esmirror_aliases():
            targets.append(Path(directive.args[1]))
        for target in targets:
            blocked = blocked_at(target, who, 4 | (1 if target.is_dir() else 0))
            if blocked:
                # a folder on the way needs x; the file itself needs r
                mode = "o+r" if blocked[0] == Path(os.path.abspath(target)) and not target.is_dir() \
                    else "o+x"
                report.add("error", "wsgi", f"WSGIDaemonProcess {daemon.name} runs as {who.pw_name}, who "
                           f"cannot read {target}: {blocked[1]}", daemon.where,
                           fix=f"move {target} where {who.pw_name} can read it (not under a 0700 home "
                               f"such as /root), or chmod {mode} {blocked[0]}")
                break
        else:
            if home:
                report.add("ok", "wsgi", f"{who.pw_name} can read python-home {home}", daemon.where)


def read_pyvenv_cfg(home: Path) -> dict[str, str]:
    """A venv's pyvenv.cfg as ``site`` reads it (``key = value``, keys lower-cased); {} if none."""
    try:
        text = (home / "pyvenv.cfg").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            found[key.strip().lower()] = value.strip()
    return found


def _venv_interpreter(home: Path) -> list[Path]:
    """The interpreter a venv points at (pyvenv.cfg ``home``), which the daemon user must read too."""
    base = read_pyvenv_cfg(home).get("home")
    return [Path(base)] if base else []


def venv_version(cfg: dict[str, str]) -> tuple[int, int] | None:
    """The Python major.minor a venv was made from (its :func:`read_pyvenv_cfg`): ``version``
    (venv) or ``version_info`` (virtualenv)."""
    for key in ("version", "version_info"):
        match = re.match(r"(\d+)\.(\d+)", cfg.get(key, ""))
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def linked_libpython(module: Path) -> tuple[int, int] | None:
    """The Python major.minor a mod_wsgi module embeds, from the libpython3.N it links;
    None when it cannot be read or links none (a static build), so nothing is claimed."""
    try:
        with module.open("rb") as handle:
            data = handle.read(_MAX_MODULE_BYTES)
    except OSError:
        return None
    match = _LIBPYTHON_RE.search(data)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether ``path``, as written or where its symlinks lead, is in one of ``roots``."""
    return any(p == root or root in p.parents
               for p in (Path(os.path.abspath(path)), Path(os.path.realpath(path))) for root in roots)


def _check_venv_python(report: CheckReport, httpd: HttpdConfig) -> None:
    """python-home must be a venv of the Python mod_wsgi embeds: another minor version cannot
    import its packages, another build of the same one fails with undefined symbols."""
    module = httpd.wsgi_module
    embeds = linked_libpython(module.path) if module else None
    if module is None or embeds is None:
        return  # no module, unreadable or static: nothing known to compare with
    wanted = "%d.%d" % embeds
    loaded = f"{module.path} (LoadModule at {module.where})"
    distribution = _under(module.path, _DISTRIBUTION_LIBS)
    for daemon in httpd.esmirror_daemons():
        home = daemon.options.get("python-home")
        cfg = read_pyvenv_cfg(Path(home)) if home else {}
        version = venv_version(cfg)
        if not home or version is None:
            continue  # not a venv (python-home=/usr) or one that does not say
        base = cfg.get("home")
        made = "%d.%d" % version
        where = f"WSGIDaemonProcess {daemon.name}'s python-home {home}"
        # a module of one's own build embeds that build's python, wherever it lives
        python = f"/usr/bin/python{wanted}" if distribution else f"python{wanted}"
        built = "" if distribution else f" (the one {module.path} was built with)"
        remake = (f"remake the venv from {python}{built}: {python} -m venv --clear {home}, then "
                  f"reinstall esmirror into it ({home}/bin/pip install /path/to/esmirror)")
        if version != embeds:
            report.add("error", "wsgi", f"{where} is a venv of Python {made} (home = {base or '?'} in "
                       f"{home}/pyvenv.cfg), but the mod_wsgi httpd loads, {loaded}, embeds Python "
                       f"{wanted} (it links libpython{wanted}): under httpd the receiver cannot import "
                       "its packages", daemon.where,
                       fix=f"{remake}; or pip install mod_wsgi into the venv and put the LoadModule line "
                           f"that {home}/bin/mod_wsgi-express module-config prints in place of {module.where}")
        elif distribution and base and Path(os.path.normpath(base)) not in _DISTRIBUTION_BINS:
            report.add("error", "wsgi", f"{where} is a venv of the Python {made} in {base} (pyvenv.cfg "
                       f"home), not of the distribution's /usr/bin/python{wanted} that {loaded} embeds: "
                       f"a {wanted} from another build fails with undefined symbols or cannot see the "
                       "venv's packages", daemon.where, fix=remake)
        else:
            report.add("ok", "wsgi", f"{where} is a venv of Python {made}, the one {module.path} embeds",
                       daemon.where)


def print_check(report: CheckReport, verbose: bool = True) -> None:
    import click

    click.echo(f"esmirror check of {report.install_dir}")
    for line in report.fixed:
        click.echo(f"  fixed    {line}")
    for f in report.findings:
        if f.level == "ok" and not verbose:
            continue
        where = f"{f.file}:{f.line}" if f.file and f.line else ""
        shown = f" ({where})" if where and where not in f.message else ""
        click.echo(f"  {f.level.upper():8} {f.topic}: {f.message}{shown}")
        if f.fix and f.level != "ok":
            click.echo(f"           fix: {f.fix}")
    errors = sum(f.level == "error" for f in report.findings)
    warnings = sum(f.level == "warning" for f in report.findings)
    click.echo(f"{errors} problem(s) to fix" if not report.ok
               else f"all is well, but for {warnings} warning(s)" if warnings else "all is well")
