"""Read-your-writes records: the exact bytes a user wrote as an object's definition.

After a successful write, `xml` shows the written bytes for as long as libvirt's definition
is the one that write produced.  The record is a digest of libvirt's rendering right after
the write plus the written bytes; when the digest no longer matches (something else changed
the definition), libvirt's own text is shown again.

Domains keep the record inside libvirt, as a metadata element in the project's namespace,
so it travels with the domain (another mount, another machine).  Pools, volumes and
networks have no metadata API in libvirt 9, so theirs lives in the state folder on the
machine that mounts (statedir.py).

Anyone who may change a domain's metadata (virsh metadata, virsh define) can write an element
in our namespace, so a record is believed only with a valid HMAC under the key in the state
folder (docs/security.md says what that does and does not protect).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMESPACE = "https://libvirtfs.org/xmlns/written/1"
PREFIX = "libvirtfs"

# libvirt formats our element on lines of its own inside <metadata>.
_ELEMENT = re.compile(
    r"\n?[ \t]*<(?P<p>[\w.-]+):written xmlns:(?P=p)=\"" + re.escape(NAMESPACE)
    + r"\"(?P<attrs>[^>]*)>(?P<body>[^<]*)</(?P=p):written>")
_EMPTY_METADATA = re.compile(r"\n?[ \t]*<metadata>\s*</metadata>|\n?[ \t]*<metadata/>")
_DIGEST = re.compile(r"digest=['\"]([0-9a-f]{64})['\"]")
_MAC = re.compile(r"mac=['\"]([0-9a-f]{64})['\"]")


@dataclass(frozen=True)
class Written:
    """What one successful write left to remember."""

    digest: str        # SHA-256 of libvirt's rendering right after the write
    data: bytes        # the bytes written
    mac: str = ""      # HMAC-SHA256 of both and the object (`seal`); "" when unsealed


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _mac(key: bytes, subject: str, digest: str, data: bytes) -> str:
    message = b"\0".join([b"libvirtfs-written-1", subject.encode(), digest.encode(), data])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def subject(kind: str, key: str) -> str:
    """The object a record belongs to, as its MAC names it: a record copied onto another
    object does not verify."""
    return f"{kind}:{key}"


def seal(key: bytes, subject: str, written: Written) -> Written:
    return Written(written.digest, written.data, _mac(key, subject, written.digest, written.data))


def verified(key: bytes | None, subject: str, written: Written | None) -> Written | None:
    """`written` if libvirtfs made it (its MAC checks under `key`), else None: a record that
    anyone else wrote is ignored, and libvirt's own text is shown."""
    if written is None or key is None or not written.mac:
        return None
    expected = _mac(key, subject, written.digest, written.data)
    return written if hmac.compare_digest(expected, written.mac) else None


def strip(text: str) -> tuple[str, Written | None]:
    """libvirt's XML without our element, and what the element says it remembered, if
    anything (unverified: see `verified`)."""
    if NAMESPACE not in text:
        return text, None
    match = _ELEMENT.search(text)
    if match is None:
        return text, None
    attributes = match.group("attrs")
    found = _DIGEST.search(attributes)
    mac = _MAC.search(attributes)
    written = None
    if found:
        with contextlib.suppress(ValueError):
            written = Written(found.group(1), base64.b64decode(match.group("body").strip()),
                              mac.group(1) if mac else "")
    text = text[:match.start()] + text[match.end():]
    text = _EMPTY_METADATA.sub("", text, count=1)
    return text, written


def element(written: Written) -> str:
    """Our metadata element's content, as setMetadata takes it."""
    body = base64.b64encode(written.data).decode()
    return f'<written digest="{written.digest}" mac="{written.mac}">{body}</written>'


def shown(libvirt_text: str, written: Written | None,
          normalize: Callable[[str], str] = lambda text: text) -> bytes:
    """What `xml` shows: the written bytes while libvirt still holds what they defined.
    `written` must have been verified."""
    if written is not None and digest(normalize(libvirt_text)) == written.digest:
        return written.data
    return libvirt_text.encode()
