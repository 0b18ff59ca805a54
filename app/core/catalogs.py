"""``catalogs.xml`` validation: what Express Server relies on, nothing more (SPEC §1)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from .manifest import name_encoding_note
from .xmlsafe import parse_xml

# letters and digits of any script (SPEC: "letters, digits"; an ASCII-only rule would refuse
# names Express Server takes); fullmatch, so a trailing newline (name="a&#10;") is no letter
CATALOG_NAME_RE = re.compile(r"\.?[\w-]+")
CATALOGS_XML = "catalogs.xml"


@dataclass
class CatalogReport:
    problems: list[str] = field(default_factory=list)      # the set must be refused
    catalog_paths: dict[str, str] = field(default_factory=dict)  # catalog name → Path
    base: Path | None = None  # the folder of catalogs.xml: where a relative Path is read from

    def unreadable_paths(self) -> list[str]:
        """Catalog Paths this server cannot read (images are shared, never mirrored). A
        relative one is read from the folder of catalogs.xml (var/data), whatever folder
        the command or the server runs in, so every process gives the same answer."""
        unreadable = []
        for name, path in sorted(self.catalog_paths.items()):
            where = Path(path) if self.base is None else self.base / path  # (absolute: as is)
            read_as = "" if str(where) == path else f" (read as {where})"
            try:
                readable = os.access(where, os.R_OK)
            except UnicodeEncodeError:  # (see manifest.name_encoding_note)
                unreadable.append(f"catalog {name!r}: Path {path}{read_as} cannot be checked: "
                                  f"{name_encoding_note()}")
                continue
            if not readable:
                unreadable.append(f"catalog {name!r}: Path {path}{read_as} is not readable on this server")
        return unreadable


def validate_catalogs(data: bytes, source: str = CATALOGS_XML, base: Path | None = None) -> CatalogReport:
    """``base``: the folder of catalogs.xml, for relative Paths (see unreadable_paths)."""
    report = CatalogReport(base=base)
    try:
        root = parse_xml(data, source)
    except etree.XMLSyntaxError as exc:
        line = exc.lineno or 1
        report.problems.append(f"{source}:{line}: not well-formed XML: {exc.msg}")
        return report
    except ValueError as exc:
        report.problems.append(f"{source}:{getattr(exc, 'lineno', 1)}: {exc}")
        return report
    if root.tag != "CatalogConfig":
        report.problems.append(f"{source}:{root.sourceline}: the root element is <{root.tag}>; "
                               "Express Server needs <CatalogConfig>")
        return report
    names: dict[str, int] = {}
    for kind in ("Catalog", "MultiCatalog"):
        for element in root.iter(kind):
            where = f"{source}:{element.sourceline}"
            name = element.get("name")
            if name is None:
                report.problems.append(f'{where}: <{kind}> has no name="…"')
                continue
            if not CATALOG_NAME_RE.fullmatch(name):
                report.problems.append(
                    f"{where}: <{kind}> name {name!r} may hold only letters, digits, '-' and '_' "
                    "(and one leading '.' to hide it); no spaces or commas")
            if name in names:
                report.problems.append(f"{where}: name {name!r} is already used on line {names[name]}")
            names[name] = element.sourceline
            if kind == "Catalog":
                paths = element.findall("Path")
                # its text without comments or processing instructions (XPath string value)
                text = str(paths[0].xpath("string()")).strip() if paths else ""
                if not text:
                    report.problems.append(f"{where}: <Catalog name={name!r}> has no <Path> to its images")
                else:
                    report.catalog_paths[name] = text
    catalogs = {e.get("name") for e in root.iter("Catalog")}
    for multi in root.iter("MultiCatalog"):
        for sub in multi.iter("SubCatalog"):
            ref = sub.get("name")
            if ref not in catalogs:
                report.problems.append(
                    f"{source}:{sub.sourceline}: <SubCatalog name={ref!r}> in MultiCatalog "
                    f"{multi.get('name')!r} names no Catalog of this file")
    return report


def validate_catalogs_file(path: Path) -> CatalogReport:
    return validate_catalogs(path.read_bytes(), str(path), path.parent)
