"""Read-your-writes records: the exact bytes a user wrote as an object's definition.

After a successful write, `xml` shows the written bytes for as long as libvirt's definition
is the one that write produced.  The record is a digest of libvirt's rendering right after
the write plus the written bytes; when the digest no longer matches (something else changed
the definition), libvirt's own text is shown again.

Domains keep the record inside libvirt, as a metadata element in the project's namespace,
so it travels with the domain (another mount, another machine).  Pools, volumes and
networks have no metadata API in libvirt 9, so theirs lives in the state folder on the
machine that mounts (statedir.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from dataclasses import dataclass

NAMESPACE = "https://libvirtfs.org/xmlns/written/1"
PREFIX = "libvirtfs"

# libvirt formats our element on lines of its own inside <metadata>.
_ELEMENT = re.compile(
    r"\n?[ \t]*<(?P<p>[\w.-]+):written xmlns:(?P=p)=\"" + re.escape(NAMESPACE)
    + r"\"(?P<attrs>[^>]*)>(?P<body>[^<]*)</(?P=p):written>")
_EMPTY_METADATA = re.compile(r"\n?[ \t]*<metadata>\s*</metadata>|\n?[ \t]*<metadata/>")
_DIGEST = re.compile(r"digest=['\"]([0-9a-f]{64})['\"]")


@dataclass(frozen=True)
class Written:
    digest: str
    data: bytes


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def strip(text: str) -> tuple[str, Written | None]:
    """libvirt's XML without our element, and what the element remembered, if any."""
    if NAMESPACE not in text:
        return text, None
    match = _ELEMENT.search(text)
    if match is None:
        return text, None
    found = _DIGEST.search(match.group("attrs"))
    written = None
    if found:
        with contextlib.suppress(ValueError):
            written = Written(found.group(1), base64.b64decode(match.group("body").strip()))
    text = text[:match.start()] + text[match.end():]
    text = _EMPTY_METADATA.sub("", text, count=1)
    return text, written


def element(written: Written) -> str:
    """Our metadata element's content, as setMetadata takes it."""
    body = base64.b64encode(written.data).decode()
    return f'<written digest="{written.digest}">{body}</written>'


def shown(libvirt_text: str, written: Written | None, normalize=lambda text: text) -> bytes:
    """What `xml` shows: the written bytes while libvirt still holds what they defined."""
    if written is not None and digest(normalize(libvirt_text)) == written.digest:
        return written.data
    return libvirt_text.encode()
