"""Reversible escaping of libvirt object names into file names.

libvirt names may hold bytes a file name cannot (`/`, NUL) or be `.` or `..`.  Such bytes
are written as `%XX` (two upper-case hex digits), and `%` itself as `%25`, so every name
maps to exactly one file name and back.  A few folders also reserve names of their own
(`snapshots/current`); an object with such a name gets its first character escaped.
"""

from __future__ import annotations

import errno
import os
import re

NAME_MAX = 255  # what statfs reports (f_namemax)
_UNSAFE = re.compile(r"[%/\x00]")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def _percent(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode())


def to_filename(name: str, reserved: frozenset[str] = frozenset()) -> str:
    """The file name under which the object `name` is shown."""
    escaped = _UNSAFE.sub(lambda m: _percent(m.group()), name)
    if escaped in (".", "..") or escaped in reserved or not escaped:
        escaped = _percent(escaped[:1]) + escaped[1:] if escaped else "%00"
        if escaped == "%2E.":
            escaped = "%2E%2E"
    return escaped


def from_filename(filename: str) -> str:
    """The object name a user means by `filename` (inverse of `to_filename`)."""
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), filename.encode())
    return raw.decode("utf-8", errors="surrogateescape")


def name_for_new_object(filename: str, reserved: frozenset[str] = frozenset()) -> str:
    """The libvirt name a `mkdir FILENAME` asks for.  Only the form listings show is taken
    (`x%41` would make `xA`, shown as `xA`: a surprise), and libvirt names are UTF-8."""
    if len(os.fsencode(filename)) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, f"a file name has at most {NAME_MAX} bytes, as "
                                          f"statfs says; {filename[:20]!r}... has "
                                          f"{len(os.fsencode(filename))}")
    try:
        name = from_filename(filename)
        name.encode()
    except UnicodeEncodeError:
        raise OSError(errno.EINVAL, f"{filename!r}: libvirt names are UTF-8 text") from None
    canonical = to_filename(name, reserved)
    if canonical != filename:
        why = (f"{filename!r} is a name libvirtfs keeps for itself" if filename in reserved
               else f"{filename!r} is not how libvirtfs writes the name {name!r}")
        raise OSError(errno.EINVAL, f"{why}; use {canonical!r} (docs/tree.md)")
    return name
