"""A reader of GNU gettext .mo catalogues (the standard library's format description; no polib)."""

from __future__ import annotations

import struct
from pathlib import Path


def read_mo(path: str | Path) -> dict[str, str]:
    """Parse a GNU gettext .mo file (the standard library's format description; no polib).

    Arguments:
        path: the .mo file.
    Returns:
        msgid -> msgstr for the singular, translated, non-header entries; an entry with a
        context (``ctx\\x04msgid``) is keyed by its msgid alone, plural forms by the singular
        msgid with the first translation.
    """
    data = Path(path).read_bytes()
    if len(data) < 28:
        raise ValueError(f"{path}: too short for a .mo file ({len(data)} bytes)")
    magic = struct.unpack_from("<I", data)[0]
    if magic == 0x950412DE:
        end = "<"
    elif magic == 0xDE120495:
        end = ">"
    else:
        raise ValueError(f"{path}: bad .mo magic {magic:#x} (expected 0x950412de)")
    _rev, n, orig_off, trans_off = struct.unpack_from(end + "4I", data, 4)
    catalog = {}
    for i in range(n):
        olen, opos = struct.unpack_from(end + "2I", data, orig_off + 8 * i)
        tlen, tpos = struct.unpack_from(end + "2I", data, trans_off + 8 * i)
        msgid = data[opos : opos + olen].decode("utf-8")
        msgstr = data[tpos : tpos + tlen].decode("utf-8")
        if not msgid or not msgstr:  # the header (empty msgid) or untranslated
            continue
        has_context = "\x04" in msgid
        msgid = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]  # drop context, keep singular
        msgstr = msgstr.split("\x00", 1)[0]
        if has_context:  # an entry without context wins over the same msgid with one
            catalog.setdefault(msgid, msgstr)
        else:
            catalog[msgid] = msgstr
    return catalog
