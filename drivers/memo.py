"""Read-your-writes: remembering the exact bytes a user wrote as an object's definition.

After a successful write, `xml` shows the written bytes for as long as libvirt's definition
is the one that write produced.  The memory is a digest of libvirt's rendering right after
the write plus the written bytes; when the digest no longer matches (something else changed
the definition), libvirt's own text is shown again.

Domains keep the memory inside libvirt, as a metadata element in the project's namespace,
so it travels with the domain (another mount, another machine).  Pools, volumes and
networks have no metadata API in libvirt 9, so theirs lives in a state folder on the
machine that mounts (`state_dir`, default /var/lib/libvirtfs).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

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


class LocalStore:
    """Written definitions kept in files, for objects libvirt keeps no metadata for."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, host_uuid: str, kind: str, key: str) -> Path:
        name = hashlib.sha256(f"{host_uuid}\0{kind}\0{key}".encode()).hexdigest()
        return self.root / "written" / name

    def get(self, host_uuid: str, kind: str, key: str) -> Written | None:
        try:
            record = json.loads(self._path(host_uuid, kind, key).read_text())
            return Written(record["digest"], base64.b64decode(record["data"]))
        except (OSError, ValueError, KeyError):
            return None

    def put(self, host_uuid: str, kind: str, key: str, written: Written) -> None:
        path = self._path(host_uuid, kind, key)
        private_folder(self.root)
        private_folder(path.parent)
        temporary = path.with_suffix(".tmp")
        record = json.dumps({"digest": written.digest,
                             "data": base64.b64encode(written.data).decode()})
        # Definitions may name paths and addresses: readable by the mounting user only.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(record)
        os.replace(temporary, path)

    def forget(self, host_uuid: str, kind: str, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(host_uuid, kind, key).unlink()


def private_folder(path: Path) -> Path:
    """`path`, made if needed, readable by the mounting user only: remembered definitions
    and the log may name paths, addresses and hosts."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/libvirtfs")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "libvirtfs"
