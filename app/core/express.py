"""Express Server's own files: the ``Mirrors`` list of ``iserv-cfg.xml``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from .errors import ConfigError
from .settings import Settings
from .xmlsafe import parse_file

TLS_MODES = ("none", "noverify", "strict")


@dataclass(frozen=True)
class Secondary:
    """One ``<Secondary>`` of the master's ``Mirrors`` element."""

    host: str
    port: int = 80  # the vendor's default, whatever the TLS mode
    ssl: str = "none"

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        scheme = "http" if self.ssl == "none" else "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_secondary_spec(text: str, ssl: str = "none") -> Secondary:
    """``HOST[:PORT]`` (``[v6]:PORT`` for IPv6) as given on the command line."""
    host, port = text, "80"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{text!r} is not HOST[:PORT]")
    if ssl not in TLS_MODES:
        raise ConfigError(f"--ssl {ssl!r}: use one of {', '.join(TLS_MODES)}")
    return Secondary(host, int(port), ssl)


def read_mirrors(iserv_cfg: Path) -> list[Secondary]:
    """The secondaries listed by a master; ``[]`` when it has no ``Mirrors``."""
    try:
        root = parse_file(iserv_cfg)
    except FileNotFoundError:
        raise ConfigError(f"{iserv_cfg}: not found; a master lists its secondaries there") from None
    except (etree.XMLSyntaxError, ValueError, OSError) as exc:
        raise ConfigError(f"{iserv_cfg}: not readable XML: {exc}") from None
    mirrors = root.findall(".//Mirrors")
    if len(mirrors) > 1:
        raise ConfigError(f"{iserv_cfg}:{mirrors[1].sourceline}: a second <Mirrors> element; keep one")
    if not mirrors:
        return []
    secondaries: list[Secondary] = []
    for element in mirrors[0]:
        if not isinstance(element.tag, str):
            continue  # comments
        where = f"{iserv_cfg}:{element.sourceline}"
        if element.tag != "Secondary":
            raise ConfigError(f"{where}: <{element.tag}> inside <Mirrors>; only <Secondary> belongs there")
        host = (element.get("host") or "").strip()
        if not host:
            raise ConfigError(f'{where}: <Secondary> needs host="…"')
        port_text = (element.get("port") or "80").strip()
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{where}: port={port_text!r} is not a port number (1-65535)")
        ssl, strictness = element.get("ssl"), element.get("sslstrictness")
        if ssl is not None and strictness is not None and ssl.strip() != strictness.strip():
            raise ConfigError(
                f'{where}: ssl="{ssl}" and sslstrictness="{strictness}" disagree; keep one of them')
        mode = (ssl if ssl is not None else strictness if strictness is not None else "none").strip()
        if mode not in TLS_MODES:
            raise ConfigError(f"{where}: TLS mode {mode!r}: use one of {', '.join(TLS_MODES)}")
        secondary = Secondary(host, int(port_text), mode)
        if secondary in secondaries:
            raise ConfigError(f"{where}: {secondary.name} is listed twice")
        secondaries.append(secondary)
    return secondaries


def select_secondaries(settings: Settings, wanted: list[str] | tuple[str, ...] = ()) -> list[Secondary]:
    """The Mirrors list, or the members named ``HOST`` or ``HOST:PORT`` (``[v6]:PORT``)."""
    mirrors = read_mirrors(settings.iserv_cfg)
    if not mirrors:
        raise ConfigError(f"{settings.iserv_cfg} has no <Mirrors> element: this server is not a "
                          "master. Add <Mirrors><Secondary host=\"…\"/></Mirrors> after <ImageManager>")
    if not wanted:
        return mirrors
    chosen: list[Secondary] = []
    for want in wanted:
        match = [m for m in mirrors
                 if want in (m.host, m.name, f"[{m.host}]", f"[{m.host}]:{m.port}")]
        if not match:
            listed = ", ".join(m.name for m in mirrors)
            raise ConfigError(f"--secondary {want} is not in the Mirrors list of "
                              f"{settings.iserv_cfg} ({listed})")
        chosen += [m for m in match if m not in chosen]
    return chosen


def resolve_canary(settings: Settings, targets: list[Secondary], canary: str | None) -> Secondary | None:
    """The ``--canary`` secondary: exactly one of those being published to."""
    if not canary:
        return None
    chosen = select_secondaries(settings, [canary])
    if len(chosen) != 1 or chosen[0] not in targets:
        raise ConfigError(f"--canary {canary} must name exactly one of the secondaries being "
                          f"published to ({', '.join(t.name for t in targets)})")
    return chosen[0]


def express_version(settings: Settings) -> str:
    """Express Server's version as this install states it: esmirror.ini, else ``unknown``."""
    return settings.express_version or "unknown"


def platform_tag() -> str:
    import sysconfig

    return sysconfig.get_platform()
