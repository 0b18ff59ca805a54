"""The one way esmirror parses XML: lxml with DTDs, entities, network and huge trees off."""
from __future__ import annotations

import codecs
import re
from pathlib import Path

from lxml import etree

from .bom import bom_encoding


def safe_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, remove_comments=False)


class DoctypeRefused(ValueError):
    def __init__(self, lineno: int = 1) -> None:
        super().__init__("a DOCTYPE/DTD is not allowed: entities are never expanded")
        self.lineno = lineno


def parse_xml(data: bytes, source: str) -> etree._Element:
    """Parse ``data``; a DTD (the door to XXE and billion-laughs) is refused outright.

    Raises ``etree.XMLSyntaxError`` or ``ValueError`` with a line number in the text.
    """
    first_element = re.search(rb"<[A-Za-z_]", data)
    doctype = data.find(b"<!DOCTYPE", 0, first_element.start() if first_element else len(data))
    if doctype >= 0:  # refused before libxml2 sees it: no entity is ever declared, let alone expanded
        raise DoctypeRefused(data.count(b"\n", 0, doctype) + 1)
    tree = etree.fromstring(data, safe_parser(), base_url=source).getroottree()
    if tree.docinfo.internalDTD is not None or tree.docinfo.doctype:
        raise DoctypeRefused()
    return tree.getroot()


def parse_file(path: Path) -> etree._Element:
    return parse_xml(path.read_bytes(), str(path))


_DECLARED = re.compile(rb"""\s*<\?xml[^>]*?\bencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def xml_text(data: bytes) -> str:
    """An XML file's bytes as text, the encoding found as an XML parser finds it: a byte-order
    mark (UTF-8, UTF-16 LE or BE), else ``<?xml`` in UTF-16, else the declaration's
    ``encoding``, else UTF-8. Undecodable bytes become U+FFFD: this is for looking into a
    file that does not parse, never for reading one that does (that is :func:`parse_xml`)."""
    codec, skip = bom_encoding(data) or ("utf-8", 0)
    if data.startswith(b"<\0?\0"):
        codec = "utf-16-le"
    elif data.startswith(b"\0<\0?"):
        codec = "utf-16-be"
    elif not skip and (declared := _DECLARED.match(data)):
        try:
            name = codecs.lookup(declared.group(1).decode("ascii")).name
        except LookupError:  # an encoding Python does not know: UTF-8 finds the ASCII tags
            name = "utf-8"
        # a declaration read as ASCII that says UTF-16/32 is wrong about its own bytes
        codec = "utf-8" if name.startswith(("utf-16", "utf-32")) else name
    try:
        return data[skip:].decode(codec, errors="replace")
    except LookupError:  # 'rot13' and the like: no text encoding
        return data[skip:].decode("utf-8", errors="replace")
