"""The byte-order marks Windows editors put at the start of text files (Notepad's "UTF-8"
and "Unicode"): which codec a file's first bytes name."""
from __future__ import annotations

import codecs

# UTF-32 is not taken: its LE mark starts like UTF-16 LE's, and no editor of ours writes it
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


def bom_encoding(data: bytes) -> tuple[str, int] | None:
    """(codec, length of the mark) when ``data`` starts with a UTF-8 or UTF-16 (LE or BE)
    byte-order mark; None without one."""
    for mark, codec in _BOMS:
        if data.startswith(mark):
            return codec, len(mark)
    return None
