"""The state folder: what libvirtfs keeps on the machine that mounts.

STATE is $LIBVIRTFS_STATE_DIR if set, else /var/lib/libvirtfs for root and
$XDG_STATE_HOME/libvirtfs for other users.  It holds the key that authenticates
read-your-writes records (`records.key`), the records libvirt has no room for (`written/`:
pools, networks, volumes, and domain records too large for the domain's metadata) and,
without syslog, the background log.  All of it may name paths, addresses and hosts, or let
someone forge a record, so it is private to the mounting user.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from libvirtfs.drivers.records import Written

log = logging.getLogger(__name__)

ENVIRONMENT = "LIBVIRTFS_STATE_DIR"
KEY_FILE = "records.key"
KEY_BYTES = 32

# A record this much older than a listing's start is still kept by `prune`: file times come
# from a coarser clock than time.time(), and an object may be defined just as a listing
# starts elsewhere.
PRUNE_GRACE = 2.0


def default_state_dir() -> Path:
    if os.environ.get(ENVIRONMENT):
        return Path(os.environ[ENVIRONMENT])
    if os.geteuid() == 0:
        return Path("/var/lib/libvirtfs")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "libvirtfs"


def private_folder(path: Path) -> Path:
    """`path`, made if needed, readable by the mounting user only: remembered definitions
    and the log may name paths, addresses and hosts."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _fsync_folder(path: Path) -> None:
    """Make a rename or link in `path` durable: a crash must not lose a record that a
    successful write promised, nor leave a key that records were sealed with half-made."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hashed(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RecordStore(Protocol):
    """Records kept outside libvirt, by host, kind and key (a key `POOL/NAME` is the volume
    NAME in the scope of pool POOL; other keys have no scope)."""

    def get(self, host: str, kind: str, key: str) -> Written | None: ...
    def put(self, host: str, kind: str, key: str, written: Written) -> None: ...
    def forget(self, host: str, kind: str, key: str) -> None: ...
    def prune(self, host: str, kind: str, scope: str, present: Iterable[str],
              since: float) -> None: ...
    def forget_scope(self, host: str, kind: str, scope: str) -> None: ...


class StateDir:
    """The state folder: the records' key and the record files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._key: bytes | None = None
        self._key_lock = threading.Lock()
        self._key_warned = False

    # -- the key -----------------------------------------------------------------------

    def key(self, *, create: bool) -> bytes | None:
        """The key records are sealed with; made on first use when `create` (a write),
        else None while there is none.  An unreadable or damaged key file makes every
        record unbelievable (libvirt's text is shown), never a failing call."""
        with self._key_lock:
            if self._key is None:
                self._key = self._load_key(create)
            return self._key

    def _load_key(self, create: bool) -> bytes | None:
        path = self.root / KEY_FILE
        try:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                if not create:
                    return None
                data = self._make_key(path)
        except OSError as e:
            self._warn_key(f"cannot use the record key {path}: {e}")
            return None
        if len(data) != KEY_BYTES:
            self._warn_key(f"{path} is not a libvirtfs record key ({len(data)} bytes, not "
                           f"{KEY_BYTES}); remove it to make a new one")
            return None
        return data

    def _make_key(self, path: Path) -> bytes:
        private_folder(self.root)
        fd, temporary = tempfile.mkstemp(dir=self.root, prefix=".records-key-")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            # link(2) never replaces: of two mounts starting at once, the first key wins
            # and both use it.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
            _fsync_folder(self.root)
        finally:
            os.unlink(temporary)
        return path.read_bytes()

    def _warn_key(self, message: str) -> None:
        if not self._key_warned:
            self._key_warned = True
            log.warning("%s; xml shows libvirt's text instead of the bytes written", message)

    # -- the record files --------------------------------------------------------------

    def _folder(self, host: str, kind: str, scope: str) -> Path:
        folder = self.root / "written" / _hashed(host)[:32] / kind
        return folder / _hashed(scope) if scope else folder

    def _path(self, host: str, kind: str, key: str) -> Path:
        scope, _, leaf = key.rpartition("/")
        return self._folder(host, kind, scope) / _hashed(leaf)

    def get(self, host: str, kind: str, key: str) -> Written | None:
        try:
            record = json.loads(self._path(host, kind, key).read_text())
            return Written(record["digest"], base64.b64decode(record["data"]),
                           record.get("mac", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, host: str, kind: str, key: str, written: Written) -> None:
        """Replace the record atomically: a reader sees the old one or the new one, and
        writers never share a temporary file."""
        path = self._path(host, kind, key)
        folder = private_folder(self.root)
        for part in path.parent.relative_to(self.root).parts:
            folder = private_folder(folder / part)
        record = json.dumps({"digest": written.digest, "mac": written.mac,
                             "data": base64.b64encode(written.data).decode()}).encode()
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_folder(path.parent)

    def forget(self, host: str, kind: str, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._path(host, kind, key).unlink()

    def prune(self, host: str, kind: str, scope: str, present: Iterable[str],
              since: float) -> None:
        """Drop the records of objects a listing started at `since` (time.time()) did not
        show: removed outside libvirtfs.  One listdir; a record written after the listing
        started is kept, as its object may be newer than the listing.  Without `scope`,
        the scopes of objects that are gone go too (the volumes of a removed pool)."""
        folder = self._folder(host, kind, scope)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return  # the usual case: nothing kept for this kind
        keep = {_hashed(leaf) for leaf in present}
        for entry in entries:
            if entry.name in keep or entry.name.startswith("."):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime >= since - PRUNE_GRACE:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)  # the volumes of a removed pool
                else:
                    os.unlink(entry.path)

    def forget_scope(self, host: str, kind: str, scope: str) -> None:
        """Drop every record in `scope`: the volumes of a removed pool."""
        shutil.rmtree(self._folder(host, kind, scope), ignore_errors=True)


class MemoryRecords:
    """Records kept in this process, for hosts whose objects live in this process too (the
    test driver: another mount of test:///default is another host with the same UUIDs)."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str, str], tuple[Written, float]] = {}
        self._lock = threading.Lock()

    def get(self, host: str, kind: str, key: str) -> Written | None:
        found = self._records.get((host, kind, key))
        return found[0] if found else None

    def put(self, host: str, kind: str, key: str, written: Written) -> None:
        with self._lock:
            self._records[(host, kind, key)] = (written, time.time())

    def forget(self, host: str, kind: str, key: str) -> None:
        with self._lock:
            self._records.pop((host, kind, key), None)

    def prune(self, host: str, kind: str, scope: str, present: Iterable[str],
              since: float) -> None:
        keep = set(present)
        with self._lock:
            for record_key, (_, stamp) in list(self._records.items()):
                if record_key[:2] != (host, kind) or stamp >= since - PRUNE_GRACE:
                    continue
                key = record_key[2]
                if scope:
                    owner, _, leaf = key.rpartition("/")
                    gone = owner == scope and leaf not in keep
                else:  # objects, or the scopes of objects (the pools of volumes)
                    gone = key.partition("/")[0] not in keep
                if gone:
                    del self._records[record_key]

    def forget_scope(self, host: str, kind: str, scope: str) -> None:
        with self._lock:
            for record_key in list(self._records):
                if record_key[:2] == (host, kind) and record_key[2].startswith(f"{scope}/"):
                    del self._records[record_key]


# The records of every test driver host in this process (see MemoryRecords).
IN_PROCESS = MemoryRecords()
