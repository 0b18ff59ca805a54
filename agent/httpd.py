"""Apache httpd's configuration as esmirror reads it, and what an account may reach.

``esmirror check`` (agent/doctor.py) and ``esmirror deploy`` (agent/deploy.py) both read
httpd's files: the main config with its Includes and Defines, envvars, the User, the
modules loaded, esmirror's WSGI daemons and Location sections; and both ask whether an
account can reach a path.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

try:
    import pwd
except ImportError:  # Windows: no Unix accounts
    pwd = None  # type: ignore[assignment]

from app.core.express import shell_value
from app.core.state import user_name

# where distributions keep the main config, tried in order when --httpd-conf is not given
DEFAULT_HTTPD_CONFS = ("/etc/apache2/apache2.conf", "/etc/httpd/conf/httpd.conf",
                       "/usr/local/apache2/conf/httpd.conf")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_INCLUDE_DEPTH = 128  # httpd's own limit on nested Includes
# sections httpd decides at start-up: what they hold belongs to the section around them
_TRANSPARENT = frozenset({"ifmodule", "ifdefine", "iffile", "ifversion", "ifdirective", "ifsection"})
# compiled into httpd on Debian and most builds (`apache2 -l`), when no httpd here can say
_COMPILED_IN = ("core.c", "mod_so.c", "mod_watchdog.c", "http_core.c", "mod_log_config.c",
                "mod_logio.c", "mod_version.c", "mod_unixd.c")


def module_key(name: str) -> str:
    """One spelling of a module for <IfModule>: wsgi_module, mod_wsgi.c and mod_wsgi.so are 'wsgi'."""
    name = name.strip().lower()
    if name.endswith("_module"):
        key = name[:-len("_module")]
    else:
        key = re.sub(r"\.(c|so)$", "", name.replace("\\", "/").rsplit("/", 1)[-1]).removeprefix("mod_")
    return {"http_core": "http"}.get(key, key)


@functools.lru_cache(maxsize=1)
def _compiled_in() -> frozenset[str]:
    for binary in ("apache2", "httpd"):
        path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}",) if os.path.exists(p)), None)
        if not path:
            continue
        try:
            listed = subprocess.run([path, "-l"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found = {module_key(word) for word in listed.split() if word.endswith(".c")}
        if found:
            return frozenset(found)
    return frozenset(module_key(m) for m in _COMPILED_IN)


def compiled_in_modules() -> set[str]:
    """The modules httpd has without LoadModule, as this machine's httpd lists them."""
    return set(_compiled_in())


def is_esmirror_wsgi(script: Path) -> bool:
    """An esmirror .wsgi file (deploy's imports app.wsgi); one this check cannot read may be."""
    try:
        return "app.wsgi" in script.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True


# --- Apache's configuration ---------------------------------------------------

@dataclass(frozen=True)
class Where:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Directive:
    name: str       # as written, e.g. "User"
    args: list[str]  # variables already expanded
    raw: str        # the arguments as written (before ${VAR} expansion)
    where: Where
    via: list[str] = field(default_factory=list)  # "${APACHE_RUN_USER} = www-data (envvars:16)"


@dataclass
class WsgiDaemon:
    name: str
    options: dict[str, str]
    where: Where


@dataclass
class LoadedModule:
    path: Path   # resolved against ServerRoot, as httpd does
    where: Where


@dataclass
class LocationSection:
    """A <Location>, <LocationMatch> or <Location ~> and the access lines httpd reads inside it."""

    path: str        # the URL-path, or the regex of <LocationMatch>/<Location ~>
    regex: bool
    where: Where
    requires: list[Directive] = field(default_factory=list)
    plain: bool = True  # False: a Require sits in <RequireAll>, <Limit>…, which this check does not model

    def matches(self, url: str) -> bool:
        """Whether httpd applies this section to ``url`` (wildcard Locations are not modelled)."""
        if self.regex:
            try:
                return re.search(self.path, url) is not None
            except re.error:
                return False  # httpd itself refuses to start on it
        if glob.has_magic(self.path):
            return False
        return url == self.path or url.startswith(self.path if self.path.endswith("/") else self.path + "/")


@dataclass
class HttpdConfig:
    """What esmirror needs from httpd's configuration."""

    main: Path
    files: list[str] = field(default_factory=list)
    user: Directive | None = None
    daemons: list[WsgiDaemon] = field(default_factory=list)
    script_aliases: list[Directive] = field(default_factory=list)
    locations: list[LocationSection] = field(default_factory=list)  # in the order httpd reads them
    # ProxyPass as [URL-path, URL]; inside a <Location> the path is the Location's
    proxy_passes: list[Directive] = field(default_factory=list)
    wsgi_module: LoadedModule | None = None  # the LoadModule wsgi_module httpd acts on
    problems: list[tuple[str, str, Where | None]] = field(default_factory=list)  # (level, what, where)
    unreadable: list[str] = field(default_factory=list)  # files it includes that could not be read

    def esmirror_aliases(self) -> list[Directive]:
        """The WSGIScriptAlias lines that mount esmirror (its .wsgi imports app.wsgi)."""
        return [a for a in self.script_aliases if is_esmirror_wsgi(Path(a.args[1]))]

    def esmirror_daemons(self) -> list[WsgiDaemon]:
        """The daemon process groups esmirror runs in: the process-group= of its mounts, else
        the one named esmirror (deploy's name). Other applications' daemons are theirs."""
        groups = {arg.split("=", 1)[1] for alias in self.esmirror_aliases() for arg in alias.args[2:]
                  if arg.startswith("process-group=")} or {"esmirror"}
        return [d for d in self.daemons if d.name in groups]


def read_envvars(path: Path) -> dict[str, tuple[str, Where]]:
    """``VAR=value`` / ``export VAR=value`` lines of Debian's envvars (a sh file apache2ctl
    sources), read as sh would: quotes, a trailing ``; export VAR`` or comment, and
    ``${VAR:-default}``."""
    found: dict[str, tuple[str, Where]] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return found
    for number, line in enumerate(lines, 1):
        match = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if not match:
            continue
        name, value = match.groups()
        text = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                      lambda m: found.get(m.group(1), ("", None))[0],  # type: ignore[arg-type]
                      shell_value(value, name))
        found[name] = (text, Where(str(path), number))
    return found


def _logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines with ``\\`` continuations joined, numbered by their first physical line."""
    buffer, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not buffer:
            start = number
        if line.endswith("\\"):  # httpd joins the next line straight on: no space between
            buffer += line[:-1]
            continue
        yield start, buffer + line
        buffer = ""
    if buffer:
        yield start, buffer


def _split_args(text: str) -> list[str]:
    try:
        return shlex.split(text, posix=True)
    except ValueError:
        return text.split()


class _Reader:
    def __init__(self, main: Path) -> None:
        self.config = HttpdConfig(main=main)
        self.server_root = main.parent
        self.vars: dict[str, tuple[str, Where | None]] = {}
        envvars = main.parent / "envvars"  # Debian: apache2ctl sources it before starting httpd
        if envvars.is_file():
            self.vars.update(read_envvars(envvars))
        # <IfDefine>: Define'd names and apache2ctl's -D arguments (envvars' APACHE_ARGUMENTS)
        arguments = self.vars.get("APACHE_ARGUMENTS", ("", None))[0]
        self.defines: set[str] = set(re.findall(r"-D\s*([A-Za-z0-9_]+)", arguments))
        self.modules = compiled_in_modules()  # <IfModule>: these, then each LoadModule read
        self.seen: set[Path] = set()
        # the sections open where the reader is: a LocationSection, or the name of another section
        # (an Include inside a <Location> adds to that Location, as in httpd)
        self.sections: list[LocationSection | str] = []

    def location(self) -> LocationSection | None:
        """The <Location> a directive here belongs to; a start-up conditional in between is transparent."""
        for section in reversed(self.sections):
            if isinstance(section, LocationSection):
                return section
            if section not in _TRANSPARENT:
                return None
        return None

    def problem(self, level: str, message: str, where: Where | None) -> None:
        self.config.problems.append((level, message, where))

    def expand(self, text: str, where: Where, via: list[str] | None = None) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.vars:
                self.problem("warning", f"${{{name}}} is not defined (not in envvars, no Define)", where)
                return match.group(0)
            value, origin = self.vars[name]
            if via is not None:
                via.append(f"${{{name}}} = {value!r} from {origin}" if origin else f"${{{name}}} = {value!r}")
            return value
        return _VAR_RE.sub(one, text)

    def resolve(self, text: str) -> Path:
        path = Path(text)
        return path if path.is_absolute() else self.server_root / path

    def active(self, section: str, argument: str) -> bool:
        """Whether httpd reads what a conditional section holds, as it decides at start-up.
        Sections decided per request (<If>) or not modelled here (<IfVersion>) count as read."""
        negated = argument.startswith("!")
        name = argument[1:].strip() if negated else argument
        if section == "ifdefine":
            found = name in self.defines
        elif section == "ifmodule":
            found = module_key(name) in self.modules
        elif section == "iffile":
            found = self.resolve(name).exists()
        else:
            return True
        return found != negated

    def read(self, path: Path, depth: int = 0) -> None:
        real = path.resolve()
        if real in self.seen:
            return
        if depth > MAX_INCLUDE_DEPTH:
            self.problem("error", f"Includes nest deeper than {MAX_INCLUDE_DEPTH} at {path}: httpd "
                         "refuses to start", None)
            return
        self.seen.add(real)
        self.config.files.append(str(path))
        try:
            lines = list(_logical_lines(path))
        except OSError as exc:
            self.config.unreadable.append(str(path))
            self.problem("error", f"cannot read {path}: {exc.strerror or exc}; what it sets "
                         "(User, WSGIDaemonProcess) is not known to this check", None)
            return
        skipping = 0  # how deep inside a section httpd does not read
        outer = len(self.sections)
        for number, line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = Where(str(path), number)
            if text.startswith("</"):
                if skipping:
                    skipping -= 1
                elif len(self.sections) > outer:
                    self.sections.pop()
                continue
            if text.startswith("<"):
                name, rest = (text.rstrip(">").split(None, 1) + [""])[:2]
                section, argument = name[1:].lower(), self.expand(rest, where).strip().strip('"')
                if skipping or not self.active(section, argument):
                    skipping += 1  # (its closing tag ends it; sections nest within a file)
                elif section in ("location", "locationmatch") and argument:
                    regex = section == "locationmatch" or argument.startswith("~")
                    opened = LocationSection(argument.lstrip("~").strip().strip('"'), regex, where)
                    self.config.locations.append(opened)
                    self.sections.append(opened)
                else:
                    inside = self.location()
                    if inside is not None and section not in _TRANSPARENT:
                        inside.plain = False  # <RequireAll>, <Limit>…: not a plain list of addresses
                    self.sections.append(section)
                continue
            if skipping:
                continue
            name, rest = (text.split(None, 1) + [""])[:2]
            key = name.lower()
            via: list[str] = []
            args = _split_args(self.expand(rest, where, via))
            directive = Directive(name, args, rest.strip(), where, via)
            if key == "serverroot" and args:
                self.server_root = Path(args[0])
            elif key == "define" and args:
                self.defines.add(args[0])
                self.vars[args[0]] = (args[1] if len(args) > 1 else "", where)
            elif key == "undefine" and args:
                self.defines.discard(args[0])
                self.vars.pop(args[0], None)
            elif key == "loadmodule" and args:
                self.modules.add(module_key(args[0]))
                # httpd keeps the first and skips a repeat ("already loaded, skipping")
                if module_key(args[0]) == "wsgi" and len(args) > 1 and self.config.wsgi_module is None:
                    self.config.wsgi_module = LoadedModule(self.resolve(args[1]), where)
            elif key in ("include", "includeoptional") and args:
                self.include(args[0], optional=key == "includeoptional", where=where, depth=depth)
            elif key == "user" and args:
                if len(args) != 1:
                    self.problem("error", f"User takes one argument, not {len(args)} ({rest.strip()}): "
                                 "httpd refuses to start (a comment must be a line of its own)", where)
                self.config.user = directive
            elif key == "wsgidaemonprocess" and args:
                quoted = re.search(r"""(?:^|\s)(["'])([\w-]+)=""", rest)
                if quoted:  # mod_wsgi splits option=value itself: "home=/a b" is refused
                    self.problem("error", f"WSGIDaemonProcess: {quoted.group(1)}{quoted.group(2)}=… is "
                                 f"quoted whole, which mod_wsgi refuses (httpd does not start); quote "
                                 f"the value only: {quoted.group(2)}=\"…\"", where)
                options = dict(a.split("=", 1) for a in args[1:] if "=" in a)
                self.config.daemons.append(WsgiDaemon(args[0], options, where))
            elif key == "wsgiscriptalias" and len(args) >= 2:
                self.config.script_aliases.append(directive)
            elif key == "require" and args:
                inside = self.location()
                if inside is not None:
                    inside.requires.append(directive)
            elif key == "proxypass" and args:
                inside = self.location()
                if inside is None and len(args) >= 2:
                    self.config.proxy_passes.append(Directive(name, args[:2], directive.raw, where))
                elif inside is not None and not inside.regex:  # in a <Location>: its path is the first
                    self.config.proxy_passes.append(Directive(name, [inside.path, args[0]], directive.raw, where))
        del self.sections[outer:]  # (a section left open does not reach into the next file)

    def include(self, pattern: str, optional: bool, where: Where, depth: int) -> None:
        target = self.resolve(pattern)
        if glob.has_magic(str(target)):
            matches = sorted(Path(p) for p in glob.glob(str(target)))  # httpd reads them sorted
        elif target.is_dir():
            matches = sorted(p for p in target.rglob("*") if p.is_file())
        else:
            matches = [target] if target.exists() else []
        if not matches and not optional:  # (IncludeOptional is for what may be missing)
            self.problem("error", f"Include {pattern}: {'nothing matches' if glob.has_magic(str(target)) else 'no'} "
                         f"{target}: httpd refuses to start; make it IncludeOptional or create it", where)
        for match in matches:
            if match.is_file():
                self.read(match, depth + 1)


def read_httpd_config(main: Path) -> HttpdConfig:
    """Follow the includes of httpd's main config file and collect User and WSGIDaemonProcess."""
    reader = _Reader(main)
    reader.read(main)
    return reader.config


def find_httpd_conf() -> Path | None:
    for candidate in DEFAULT_HTTPD_CONFS:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


# --- what a user may do on this machine (mode bits, as the kernel checks them) -----

def _mode_allows(st: os.stat_result, account: pwd.struct_passwd, groups: set[int], bits: int) -> bool:
    if account.pw_uid == 0:
        return True
    if st.st_uid == account.pw_uid:
        mode = (st.st_mode >> 6) & 7
    elif st.st_gid in groups:
        mode = (st.st_mode >> 3) & 7
    else:
        mode = st.st_mode & 7
    return mode & bits == bits


def account_groups(account: pwd.struct_passwd) -> set[int]:
    try:
        return set(os.getgrouplist(account.pw_name, account.pw_gid))
    except OSError:
        return {account.pw_gid}


def blocked_at(path: Path, account: pwd.struct_passwd, bits: int) -> tuple[Path, str] | None:
    """Where ``account`` is stopped from using ``path`` with ``bits`` (4 r, 2 w, 1 x), if anywhere,
    and why in words that name that place: "www-data cannot enter /root (owner root, mode 0700)".

    Every parent must let it through (x); that is what catches a venv under a 0700 /root.
    ACLs are not read: a mode-bit refusal that an ACL lifts is reported all the same.
    """
    groups = account_groups(account)
    path = Path(os.path.abspath(path))
    # the folders of the path as written, then those of where its symlinks lead: a symlinked
    # venv pointing into a 0700 folder is as unreachable as one inside it
    real = Path(os.path.realpath(path))
    folders = list(reversed(path.parents)) + [p for p in reversed(real.parents) if p not in path.parents]
    for parent in folders:
        try:
            st = parent.stat()
        except OSError as exc:
            return parent, f"{parent}: {exc.strerror or exc}"
        if not _mode_allows(st, account, groups, 1):
            return parent, f"{account.pw_name} cannot enter {parent} ({owner_mode(st)})"
    try:
        st = path.stat()
    except OSError as exc:
        return path, f"{path}: {exc.strerror or exc}"
    if not _mode_allows(st, account, groups, bits):
        verbs = ("list", "write in", "enter") if stat.S_ISDIR(st.st_mode) else ("read", "write", "run")
        lacking = [verb for verb, bit in zip(verbs, (4, 2, 1))
                   if bits & bit and not _mode_allows(st, account, groups, bit)]
        said = ", ".join(lacking[:-1]) + " or " + lacking[-1] if len(lacking) > 1 else lacking[0]
        return path, f"{account.pw_name} cannot {said} {path} ({owner_mode(st)})"
    return None


def account_name(user: str) -> str:
    """httpd's ``#uid`` form as the account's name (``#33`` is www-data on Debian)."""
    if user.startswith("#") and user[1:].isdigit() and pwd is not None:
        try:
            return pwd.getpwuid(int(user[1:])).pw_name
        except KeyError:
            pass
    return user


def apache_user(httpd: HttpdConfig) -> str | None:
    """The account httpd's User names (a ``#uid`` resolved), if it has one."""
    return account_name(httpd.user.args[0]) if httpd.user is not None and httpd.user.args else None


def code_outside(home: Path) -> list[Path]:
    """Folders a venv imports from elsewhere: .pth lines and editable installs (a checkout in /root)."""
    found: list[Path] = []
    for site in home.glob("lib/python3*/site-packages"):
        for pth in site.glob("*.pth"):
            try:
                lines = pth.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            found += [Path(l.strip()) for l in lines if l.strip().startswith("/")]
        for finder in site.glob("__editable__*finder.py"):
            try:
                text = finder.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            mapping = re.search(r"^MAPPING[^=]*=\s*(\{.*\})", text, re.MULTILINE)
            if mapping:
                found += [Path(p) for p in re.findall(r"'(/[^']+)'", mapping.group(1))]
    return found


def owner_mode(st: os.stat_result) -> str:
    return f"owner {owner(st)}, mode {stat.S_IMODE(st.st_mode):04o}"


def owner(st: os.stat_result) -> str:
    return user_name(st.st_uid)
