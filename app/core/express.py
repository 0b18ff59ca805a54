"""Express Server's own files: the ``Mirrors`` list of ``iserv-cfg.xml``, ``LT_IS_USER`` of ``env.sh``."""
from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from .errors import ConfigError
from .settings import Settings
from .state import replace
from .xmlsafe import parse_file, xml_text

TLS_MODES = ("none", "noverify", "strict")


@dataclass(frozen=True)
class Secondary:
    """One ``<Secondary>`` of the master's ``Mirrors`` element."""

    host: str
    port: int = 80  # the vendor's default, whatever the TLS mode
    ssl: str = "none"

    @property
    def name(self) -> str:
        """``host:port``, an IPv6 address in brackets (``[::1]:8080``): the form every report,
        the ledger and ``--secondary`` use."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        scheme = "http" if self.ssl == "none" else "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def parse_port(text: str) -> int | None:
    """A TCP port, 1-65535, in ASCII digits (``isdigit`` alone also takes '²' and '١٢'); else None."""
    text = text.strip()
    if text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536:
        return int(text)
    return None


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a host name, or None."""
    if "%" in host:
        return ("an address with a zone id (%…), which names an interface of one machine only; "
                "give a global or loopback address, or a host name")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        return ("neither an IP address nor a host name (dot-separated labels of 1-63 letters, "
                "digits and '-'; no scheme, port or brackets)")
    return None


def canonical_host(host: str) -> str:
    """One spelling per host: an IP address in its short form (0:0:0:0:0:0:0:1 is ::1), a
    host name in lower case without a final dot. Two <Secondary> elements or a
    ``--secondary`` then name the same server only when they spell the same."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.rstrip(".").lower()


def parse_host_port(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[v6]`` or ``[v6]:PORT`` as given on the command line:
    (canonical host, port or None). An IPv6 address goes in brackets: in ``::1:8080``
    nobody can tell where the address ends."""
    port: str | None = None
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        bare = text[scheme.end():].split("/", 1)[0]
        raise ConfigError(f"{text!r} is a URL: give HOST[:PORT] without {scheme.group(1)}:// and a path "
                          f"(write {bare or 'the host'})")
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ConfigError(f"{text!r} is not HOST[:PORT] ([v6]:PORT for IPv6)")
        port = rest[1:] if rest else None
        if ":" not in host:
            raise ConfigError(f"{text!r}: brackets are for IPv6 addresses only; write {host}"
                              f"{':' + port if port else ''}")
    elif text.count(":") > 1:
        raise ConfigError(f"{text!r}: write an IPv6 address in brackets, [address]:PORT (or "
                          "[address] alone), so the port cannot be read as part of it")
    else:
        host, _, port = text.partition(":") if ":" in text else (text, "", None)
    number = parse_port(port) if port is not None else None
    problem = host_problem(host) if host else "empty"
    if problem or (port is not None and number is None):
        raise ConfigError(f"{text!r} is not HOST[:PORT]" + (f": the host is {problem}" if problem else
                                                            ": the port is not 1-65535"))
    return canonical_host(host), number


def parse_secondary_spec(text: str, ssl: str = "none") -> Secondary:
    """``HOST[:PORT]`` (``[v6]:PORT`` for IPv6) as given on the command line; port 80 when
    none is given."""
    host, port = parse_host_port(text)
    if ssl not in TLS_MODES:
        raise ConfigError(f"--ssl {ssl!r}: use one of {', '.join(TLS_MODES)}")
    return Secondary(host, port or 80, ssl)


def _local_name(element: etree._Element) -> str:
    """An element's name without its namespace: Express Server reads <Mirrors> the same
    with or without an xmlns on the root, and so must esmirror."""
    return etree.QName(element).localname


def _shown_name(element: etree._Element) -> str:
    """An element's name as the file spells it, for messages (never ``{uri}name``)."""
    return f"{element.prefix}:{_local_name(element)}" if element.prefix else _local_name(element)


# {*}: in any namespace, or none (<ImageServer xmlns="http://www.lizardtech.com/iserv">)
_MIRRORS = ".//{*}Mirrors"
# the same in the text of a file that does not parse: <Mirrors or <x:Mirrors, not <MirrorsOld
_MIRRORS_TAG = re.compile(r"<(?:[\w.-]+:)?Mirrors(?![\w.:-])")


def read_mirrors(iserv_cfg: Path) -> list[Secondary]:
    """The secondaries listed by a master; ``[]`` when it has no ``Mirrors``."""
    try:
        root = parse_file(iserv_cfg)
    except FileNotFoundError:
        raise ConfigError(f"{iserv_cfg}: not found; a master lists its secondaries there") from None
    except (etree.XMLSyntaxError, ValueError, OSError) as exc:
        raise ConfigError(f"{iserv_cfg}: not readable XML: {exc}") from None
    mirrors = root.findall(_MIRRORS)
    if len(mirrors) > 1:
        raise ConfigError(f"{iserv_cfg}:{mirrors[1].sourceline}: a second <Mirrors> element; keep one")
    if not mirrors:
        return []
    secondaries: list[Secondary] = []
    for element in mirrors[0]:
        if not isinstance(element.tag, str):
            continue  # comments
        where = f"{iserv_cfg}:{element.sourceline}"
        if _local_name(element) != "Secondary":
            raise ConfigError(f"{where}: <{_shown_name(element)}> inside <Mirrors>; only <Secondary> "
                              "belongs there")
        for name in element.attrib:
            _known_attribute(name, element.get(name, ""), where)
        host = (element.get("host") or "").strip()
        if not host:
            raise ConfigError(f'{where}: <Secondary> needs host="…"')
        problem = host_problem(host)
        if problem:
            raise ConfigError(f"{where}: host={host!r} is {problem}")
        host = canonical_host(host)
        port_text = (element.get("port") or "80").strip()
        port = parse_port(port_text)
        if port is None:
            raise ConfigError(f"{where}: port={port_text[:20]!r} is not a port number (1-65535)")
        ssl, strictness = element.get("ssl"), element.get("sslstrictness")
        if ssl is not None and strictness is not None and ssl.strip() != strictness.strip():
            raise ConfigError(
                f'{where}: ssl="{ssl}" and sslstrictness="{strictness}" disagree; keep one of them')
        mode = (ssl if ssl is not None else strictness if strictness is not None else "none").strip()
        if mode not in TLS_MODES:
            raise ConfigError(f"{where}: TLS mode {mode!r}: use one of {', '.join(TLS_MODES)}")
        secondary = Secondary(host, port, mode)
        if any(other.name == secondary.name for other in secondaries):  # (whatever its ssl)
            raise ConfigError(f"{where}: {secondary.name} is listed twice")
        secondaries.append(secondary)
    return secondaries


_SECONDARY_ATTRIBUTES = ("host", "port", "ssl", "sslstrictness")


def _known_attribute(name: str, value: str, where: str) -> None:
    """A misspelt attribute must not be dropped quietly: Port="8443" would send to port 80,
    sslstrictnes="strict" over plain HTTP. Attributes unlike any of ours are left alone (the
    vendor's own, which esmirror does not use)."""
    import difflib

    if name in _SECONDARY_ATTRIBUTES:
        return
    near = difflib.get_close_matches(name.lower(), _SECONDARY_ATTRIBUTES, n=1, cutoff=0.75)
    if name.lower() in _SECONDARY_ATTRIBUTES or near:
        meant = name.lower() if name.lower() in _SECONDARY_ATTRIBUTES else near[0]
        raise ConfigError(f'{where}: <Secondary> attribute {name}="{value[:40]}" is not one esmirror '
                          f"reads; did you mean {meant}? (names are case-sensitive: "
                          f"{', '.join(_SECONDARY_ATTRIBUTES)})")


def master_role(iserv_cfg: Path) -> tuple[bool, str | None]:
    """(this server is a master, why, when only a broken file makes it one). A master's
    iserv-cfg.xml lists at least one secondary. One whose XML is broken is a master when a
    <Mirrors> stands in it outside comments: it refuses pushes rather than take a set over
    a promoted master's (publish reports the error), and the note tells the master it
    refuses why."""
    try:
        return parse_file(iserv_cfg).find(_MIRRORS + "/{*}Secondary") is not None, None
    except OSError:
        return False, None
    except (etree.XMLSyntaxError, ValueError) as exc:
        try:
            text = xml_text(iserv_cfg.read_bytes())  # (UTF-16 from Notepad, too)
        except OSError:
            return False, None
        if _MIRRORS_TAG.search(re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)) is None:
            return False, None
        return True, (f"{iserv_cfg} does not parse ({exc}); it mentions <Mirrors>, so this server "
                      "counts as a master and takes no pushes until that file is fixed")


def lists_mirrors(iserv_cfg: Path) -> bool:
    """This server is a master (see master_role)."""
    return master_role(iserv_cfg)[0]


def select_secondaries(settings: Settings, wanted: list[str] | tuple[str, ...] = (),
                       option: str = "--secondary") -> list[Secondary]:
    """The Mirrors list, or the members named ``HOST`` or ``HOST:PORT`` (``[v6]:PORT``).
    ``option``: how the caller named them, for the message (a web request has no flags)."""
    mirrors = read_mirrors(settings.iserv_cfg)
    if not mirrors:
        raise ConfigError(f"{settings.iserv_cfg} lists no <Secondary> in a <Mirrors> element: this "
                          "server is not a master. Run this on the master (on a secondary, 'esmirror "
                          "browse HOST:PORT' shows what it holds); to make this server a master, list its "
                          "secondaries: <Mirrors><Secondary host=\"…\"/></Mirrors> after <ImageManager>")
    if not wanted:
        return mirrors
    chosen: list[Secondary] = []
    for want in wanted:
        match = _named(mirrors, want, option)
        if not match:
            listed = ", ".join(m.name for m in mirrors)
            raise ConfigError(f"{option} {want} is not in the Mirrors list of "
                              f"{settings.iserv_cfg} ({listed})")
        chosen += [m for m in match if m not in chosen]
    return chosen


def _named(secondaries: list[Secondary], want: str, option: str) -> list[Secondary]:
    """The members ``want`` names: ``HOST`` (every port), ``HOST:PORT``, ``[v6]`` or ``[v6]:PORT``."""
    try:
        host, port = parse_host_port(want.strip())
    except ConfigError as exc:
        raise ConfigError(f"{option} {exc.message}") from None
    return [m for m in secondaries if m.host == host and port in (None, m.port)]


def resolve_canary(targets: list[Secondary], canary: str | None, option: str = "--canary") -> Secondary | None:
    """The ``--canary`` secondary: exactly one of those being published to."""
    if not canary:
        return None
    chosen = _named(targets, canary, option)
    if not chosen:
        raise ConfigError(f"{option} {canary} is not one of the secondaries being published to "
                          f"({', '.join(t.name for t in targets)})")
    if len(chosen) > 1:
        raise ConfigError(f"{option} {canary} names {len(chosen)} secondaries "
                          f"({', '.join(t.name for t in chosen)}); give one as HOST:PORT")
    return chosen[0]


def express_version(settings: Settings) -> str:
    """Express Server's version as this install states it: esmirror.ini, else ``unknown``."""
    return settings.express_version or "unknown"


def platform_tag() -> str:
    import sysconfig

    return sysconfig.get_platform()


# --- env.sh: the account Express Server's ltcsd runs as (SPEC §1) -----------

DEFAULT_LT_IS_USER = "nobody"  # what Express Server uses when env.sh does not say
_ENV_ASSIGN_RE = re.compile(r"^\s*(?:export\s+)?LT_IS_USER=(?P<value>.*)$")


@dataclass(frozen=True)
class EnvUser:
    """``LT_IS_USER`` as ``env.sh`` sets it: the value and where (line 0: the default)."""

    user: str
    path: Path
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line else f"{self.path} (not set there: default)"


def shell_value(text: str, name: str) -> str:
    """The value of ``<name>=<text>`` as sh sees it: quotes removed, trailing ``; cmd``/comment
    dropped, and ``${<name>:-default}`` as its default (the variable is not set before)."""
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        first = next(iter(lexer), "")
    except ValueError:  # unbalanced quote: take the raw word
        first = text.strip().split()[0] if text.strip() else ""
    # ${NAME:-value} and ${NAME-value} give the default when unset
    match = re.fullmatch(r"\$\{" + re.escape(name) + r":?-([^}]*)\}", first)
    return match.group(1) if match else first


def read_lt_is_user(env_sh: Path) -> EnvUser:
    """The last active ``LT_IS_USER=`` assignment of env.sh (as sh would end up with it).

    Accepts ``LT_IS_USER=x``, ``export LT_IS_USER=x``, single or double quotes and a
    trailing ``; export LT_IS_USER`` or comment; commented-out lines are ignored.
    A missing env.sh or no assignment gives Express Server's default, ``nobody``.
    """
    try:
        text = env_sh.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return EnvUser(DEFAULT_LT_IS_USER, env_sh, 0)
    except OSError as exc:
        raise ConfigError(f"{env_sh}: cannot read: {exc.strerror or exc}") from None
    found = EnvUser(DEFAULT_LT_IS_USER, env_sh, 0)
    for number, line in enumerate(text.splitlines(), 1):
        match = _ENV_ASSIGN_RE.match(line)
        if match:
            found = EnvUser(shell_value(match.group("value"), "LT_IS_USER"), env_sh, number)
    return found


def write_lt_is_user(env_sh: Path, user: str) -> Path | None:
    """Set ``LT_IS_USER`` in env.sh, keeping its form (export, quotes); returns the backup's path
    (None when there was no env.sh).

    The active assignment is rewritten in place; with none, ``export LT_IS_USER=…`` is
    appended. The old file is kept beside it as ``env.sh.bak-<timestamp>`` first.
    """
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?", user):
        raise ConfigError(f"{user!r} is not a Unix user name")
    current = read_lt_is_user(env_sh)
    try:
        text = env_sh.read_text(encoding="utf-8") if env_sh.exists() else ""
    except OSError as exc:
        raise ConfigError(f"{env_sh}: cannot read: {exc.strerror or exc}") from None
    lines = text.splitlines(keepends=True)
    if current.line:
        old = lines[current.line - 1]
        match = _ENV_ASSIGN_RE.match(old.rstrip("\r\n"))
        assert match is not None
        rest = match.group("value")
        quote = rest[:1] if rest[:1] in "\"'" else ""
        # replace just the first word of the value, keep what follows (; export …, # comment)
        word = re.match(r"(\"[^\"]*\"|'[^']*'|[^\s;#]*)", rest)
        tail = rest[word.end():] if word else ""
        newline = old[len(old.rstrip("\r\n")):]
        lines[current.line - 1] = (old[:match.start("value")] + f"{quote}{user}{quote}" + tail
                                   + newline)
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"export LT_IS_USER={user}\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = env_sh.with_name(f"{env_sh.name}.bak-{stamp}")
    counter = 1
    while backup.exists():
        backup = env_sh.with_name(f"{env_sh.name}.bak-{stamp}-{counter}")
        counter += 1
    if env_sh.exists():
        shutil.copy2(env_sh, backup)
    else:
        backup = None
    # a symlinked env.sh is changed where it leads, keeping its owner and mode
    target = Path(os.path.realpath(env_sh))
    tmp = target.with_name(f".{target.name}.esmirror-tmp")
    try:
        tmp.write_text("".join(lines), encoding="utf-8")
        if target.exists():
            st = os.stat(target)
            shutil.copymode(target, tmp)
            if hasattr(os, "chown") and (st.st_uid, st.st_gid) != (os.stat(tmp).st_uid, os.stat(tmp).st_gid):
                os.chown(tmp, st.st_uid, st.st_gid)
        replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{env_sh}: cannot write: {exc.strerror or exc}; set LT_IS_USER={user} "
                          "there by hand") from None
    return backup
