"""``ImageServer/etc/esmirror.ini`` → one frozen :class:`Settings`.

Built once per process (file, then command-line overrides) and passed down;
nothing reads settings at import time.
"""
from __future__ import annotations

import configparser
import dataclasses
import hashlib
import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bom import bom_encoding
from .errors import ConfigError, WorkingDirError

DEFAULT_PREFIX = "/lizardtech/mirror"
DEFAULT_MAX_PARALLEL = 8  # pushes at once when not told: a big fleet must not swamp the master's link
# the routes allow_push opens (browse is both push and admin); httpd's rendered
# Require lines and the receiver's own filter both come from this one list
PUSH_ROUTES = ("manifest", "blobs", "chunks", "delta", "commit")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``4G`` → 4294967296 (powers of 1024)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _at_least(value: int, least: int, why: str) -> int:
    if value < least:
        raise ValueError(f"{value} is below {why}")
    return value


def split_list(text: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", text.strip()) if item]


def parse_networks(text: str) -> tuple[Network, ...]:
    """Addresses or CIDRs, IPv4 or IPv6; zone ids are refused (they are not portable)."""
    nets = []
    for item in split_list(text):
        if "%" in item:
            raise ValueError(f"{item!r}: zone ids (%eth0) are not accepted; give the address alone")
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IPv4/IPv6 address or CIDR") from None
        if "/" in item and net.network_address != ipaddress.ip_address(item.split("/")[0]):
            # 10.0.0.1/0 would admit everyone: say what it means instead of widening it
            raise ValueError(f"{item!r} has bits set after the prefix: write {net} for the whole "
                             f"network, or {item.split('/')[0]} for the one address")
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped and net.prefixlen >= 96:
            # callers are compared as IPv4 (::ffff:a.b.c.d arrives as a.b.c.d): map the entry too
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
        nets.append(net)
    return tuple(nets)


# IIS's HttpPlatformHandler forwards a body as the ASP.NET Core Module forked from it did
# before its fix (dotnet/aspnetcore#11068): its length read into 32 bits, so a body over
# 2 GiB stalls and ends 502. (IIS itself takes up to 4 GiB - 1.)
PLATFORM_HANDLER_MAX_BODY = 2**31 - 1

@dataclass(frozen=True)
class Settings:
    """Every knob of esmirror.ini, with the defaults of SPEC §3."""

    install_dir: Path
    allow_push: tuple[Network, ...] = ()
    allow_admin: tuple[Network, ...] = field(
        default_factory=lambda: parse_networks("127.0.0.1 ::1"))
    trusted_proxies: tuple[Network, ...] = ()
    prefix: str = DEFAULT_PREFIX
    express_version: str = ""
    reload_command: str = ""
    reload_timeout: float = 120.0
    shared_secret_file: str = ""
    archive_keep: int = 20
    require_paths: bool = False
    max_upload_bytes: int = 4 * 1024**3
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = ()
    retry_initial: float = 5.0     # agent: first wait before retrying a secondary (seconds)
    retry_max: float = 300.0       # agent: longest wait between retries (seconds)
    check_interval: float = 60.0   # agent: how often it looks at every secondary for status
    source: str = ""  # the ini file these came from, for messages

    # --- install layout (SPEC §1) ---------------------------------------
    @property
    def image_server(self) -> Path:
        return self.install_dir / "ImageServer"

    @property
    def etc_dir(self) -> Path:
        return self.image_server / "etc"

    @property
    def data_dir(self) -> Path:
        """The working directory: the configuration set lives here."""
        return self.image_server / "var" / "data"

    @property
    def state_dir(self) -> Path:
        return self.data_dir / ".esmirror"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def iserv_cfg(self) -> Path:
        return self.etc_dir / "iserv-cfg.xml"

    @property
    def ca_bundle(self) -> Path:
        return self.etc_dir / "ca-bundle.crt"

    @property
    def env_sh(self) -> Path:
        return self.etc_dir / "env.sh"

    @property
    def ini_path(self) -> Path:
        return self.etc_dir / "esmirror.ini"

    def where(self, key: str) -> str:
        """``esmirror.ini:LINE`` of ``key``, for messages (the file alone if it cannot tell)."""
        try:
            line = _line_of(_decode_ini(self.ini_path, self.ini_path.read_bytes()), key)
        except (OSError, ConfigError):
            line = 0
        return f"{self.ini_path}:{line}" if line else str(self.ini_path)

    def secret_path(self) -> Path | None:
        """The shared secret's file; a relative name is taken inside ``ImageServer/etc/``."""
        if not self.shared_secret_file:
            return None
        try:
            path = Path(self.shared_secret_file).expanduser()
        except RuntimeError as exc:  # ~someone who does not exist
            raise ConfigError(f"shared_secret_file {self.shared_secret_file!r}: {exc}; fix it in "
                              f"{self.ini_path}") from None
        return path if path.is_absolute() else self.etc_dir / path

    def files_stamp(self) -> tuple[Any, ...]:
        """What esmirror.ini and the shared secret hold (digests): a long-running receiver
        compares it with the one of its start (its settings are read once). By content, so
        a touch is no change."""
        try:
            secret = self.secret_path()
        except ConfigError:  # (signing says so)
            secret = None
        return content_digest(self.ini_path), content_digest(secret) if secret else None

    def reload_argv(self) -> list[str]:
        return command_argv(self.reload_command)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _parse_prefix(text: str) -> str:
    prefix = "/" + text.strip().strip("/")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", prefix) or {".", ".."} & set(prefix.split("/")):
        raise ValueError(f"{text!r} is not a URL path like /lizardtech/mirror")
    return prefix


def _parse_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text.strip()[:40]!r} is not a whole number") from None
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text.strip()[:40]!r} is not a number of seconds") from None
    if not 0 < value < 10**9:  # (refuses inf and nan too; 10^9 s is 31 years)
        raise ValueError("must be a number of seconds more than 0 and under 10^9")
    return value


def command_argv(command: str, windows: bool = os.name == "nt") -> list[str]:
    """A command line as the argv it runs; ValueError for an open quote ("No closing quotation").

    On Windows, backslashes are path separators, not escapes (shlex's non-POSIX mode), and
    that mode keeps the quotes around a word: "C:\\Program Files\\x.cmd" would be run as a
    program whose name starts with a quote. They are taken off, as cmd.exe does.
    """
    if not windows:
        return shlex.split(command)
    return [word[1:-1] if len(word) >= 2 and word[0] == word[-1] == '"' else word
            for word in shlex.split(command, posix=False)]


def _parse_command(text: str) -> str:
    """A command line, checked now: a quote left open fails at load, not at reload (a NUL
    byte never gets here: _decode_ini refuses the file)."""
    command = text.strip()
    command_argv(command)
    return command


def _parse_globs(text: str) -> tuple[str, ...]:
    """include/exclude: globs relative to var/data. Forms that could only ever match nothing
    (or, for include, leave the secondaries' files out) are refused, with the right form."""
    globs = tuple(split_list(text))
    for glob in globs:
        if "\\" in glob:
            raise ValueError(f"{glob!r}: separate folders with / (backslash is never in a set path)")
        if glob.startswith(("/", "./")) or re.match(r"[A-Za-z]:", glob):
            relative = glob[2:] if glob.startswith("./") else glob.lstrip("/")
            raise ValueError(f"{glob!r}: patterns are relative to var/data, without a leading / or ./ "
                             f"(write {relative or '**'!r})")
        if glob.endswith("/"):
            raise ValueError(f"{glob!r}: a pattern matches files; for every file in that folder "
                             f"write {glob + '**'!r}")
        if "***" in glob:
            raise ValueError(f"{glob!r}: use * (within one name) or ** (across folders)")
    return globs


_PARSERS: dict[str, Any] = {
    "allow_push": parse_networks,
    "allow_admin": parse_networks,
    "trusted_proxies": parse_networks,
    "prefix": _parse_prefix,
    "express_version": str.strip,
    "reload_command": _parse_command,
    "reload_timeout": _parse_float,
    "shared_secret_file": str.strip,
    "archive_keep": _parse_int,
    "require_paths": _parse_bool,
    "max_upload_bytes": lambda t: _at_least(parse_size(t), 1024 * 1024, "1M: the master sends a large "
                                            "file in parts no smaller than that"),
    "include": lambda t: _parse_globs(t) or ("**",),
    "exclude": _parse_globs,
    "retry_initial": _parse_float,
    "retry_max": _parse_float,
    "check_interval": _parse_float,
}


def _line_of(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*[=:]", line, re.IGNORECASE):
            return number
    return 0


def content_digest(path: Path) -> str | None:
    """SHA-256 of a (small) file's content; None when it cannot be read (gone, say)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def load_settings(install_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read ``esmirror.ini`` of an install; ``overrides`` (command line) win over the file.

    The install dir comes from the argument, else ``ESMIRROR_INSTALL_DIR``.
    """
    chosen = install_dir or os.environ.get("ESMIRROR_INSTALL_DIR")
    if not chosen:
        raise ConfigError(
            "no install dir: pass --install-dir or set ESMIRROR_INSTALL_DIR "
            "to the folder that holds ImageServer/")
    try:
        root = Path(chosen).expanduser().resolve()
    except (RuntimeError, OSError, ValueError) as exc:  # a symlink loop, a NUL byte, ~nobody
        raise ConfigError(f"install dir {chosen!r}: {exc}") from None
    if not (root / "ImageServer").is_dir():
        raise ConfigError(f"{root} has no ImageServer/ folder: is it an Express Server install dir?")
    data = str(root / "ImageServer" / "var" / "data")
    # (os.path's tests never raise: var/ unreadable to this account is check's to report)
    if os.path.islink(data) and not os.path.exists(data):
        raise WorkingDirError(f"{data} is a symbolic link to {os.readlink(data)}, which does not "
                              "exist: mount or create the working dir it leads to, or fix the link")
    if os.path.exists(data) and not os.path.isdir(data):
        raise WorkingDirError(f"{data} is a file, not a folder: Express Server's working dir is a "
                              "folder (catalogs.xml, indexes, overviews); move that file aside")
    values: dict[str, Any] = {}
    ini = root / "ImageServer" / "etc" / "esmirror.ini"
    if ini.exists():
        values.update(_read_ini(ini))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(install_dir=root, source=str(ini), **values)


def _decode_ini(ini: Path, data: bytes) -> str:
    """esmirror.ini's bytes as text: UTF-8, or UTF-8/UTF-16 (LE, BE) after a byte-order mark,
    as Windows editors save it. Bytes of another encoding, and NUL characters (binary junk
    from a bad copy, or a file zeroed by a crash), are refused by line: otherwise they show
    up as a confusing value, or a byte offset nobody can find in an editor."""
    codec, skip = bom_encoding(data) or ("utf-8", 0)
    body = data[skip:]
    name = "UTF-8" if codec == "utf-8" else "UTF-16"
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as exc:
        line = _line_at(body[:exc.start].decode(codec, errors="replace"))
        bad = body[exc.start:exc.end]
        shown = " ".join(f"0x{b:02x}" for b in bad)
        raise ConfigError(f"{ini}:{line}: not {name} ({'byte' if len(bad) == 1 else 'bytes'} "
                          f"{shown}); save the file as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        odd, even = body[1::2], body[0::2]
        if codec == "utf-8" and odd and (odd.count(0) == len(odd)) != (even.count(0) == len(even)):
            raise ConfigError(f"{ini}: holds NUL characters between all its letters: it is UTF-16 "
                              "saved without a byte-order mark; save the file as UTF-8")
        raise ConfigError(f"{ini}:{_line_at(text[:nul])}: holds a NUL character (binary "
                          "junk, e.g. from a bad copy or a crash); remove it, or write the file again")
    # every editor's line ends: configparser splits at "\n" only, so a file of old Mac "\r"
    # ends was one line, its [esmirror] header, and every setting was silently lost
    return _one_line_end(text)


def _one_line_end(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _line_at(before: str) -> int:
    """The line number of the character after ``before``, whatever the line ends."""
    return _one_line_end(before).count("\n") + 1


def _read_ini(ini: Path) -> dict[str, Any]:
    try:
        data = ini.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{ini}: cannot read: {exc.strerror or exc}") from None
    text = _decode_ini(ini, data)
    # ";" or "#" after a space starts a comment, as in most ini files ops write
    parser = configparser.ConfigParser(interpolation=None, strict=True, inline_comment_prefixes=(";", "#"))
    try:
        parser.read_string(text, source=str(ini))
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(f"{ini}:{exc.lineno}: the first line must be the section header [esmirror]") from None
    except configparser.ParsingError as exc:  # lines that are no "key = value"
        lineno = exc.errors[0][0]
        line = text.splitlines()[lineno - 1].strip() if lineno <= len(text.splitlines()) else ""
        raise ConfigError(f"{ini}:{lineno}: {line!r} is not 'key = value'") from None
    except configparser.Error as exc:
        lineno = getattr(exc, "lineno", None)
        where = f"{ini}:{lineno}" if lineno else str(ini)
        raise ConfigError(f"{where}: {exc.message.splitlines()[0]}") from None
    extra = [s for s in parser.sections() if s != "esmirror"]
    if extra:
        raise ConfigError(f"{ini}: unknown section [{extra[0]}]; esmirror reads only [esmirror]")
    values: dict[str, Any] = {}
    if parser.defaults():  # keys under [DEFAULT] would be silently ignored
        raise ConfigError(f"{ini}: settings under [DEFAULT]; put them under [esmirror]")
    if not parser.has_section("esmirror"):
        return values
    for key, raw in parser.items("esmirror"):
        line = _line_of(text, key)
        if key not in _PARSERS:
            known = ", ".join(sorted(_PARSERS))
            raise ConfigError(f"{ini}:{line}: unknown key {key!r}; known keys: {known}")
        try:
            values[key] = _PARSERS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"{ini}:{line}: bad value for {key}: {exc}") from None
    return values


def shown_network(net: Network) -> str:
    """A network as esmirror.ini and httpd write it: a single address without /32 or /128."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
