"""Fault injection around the real driver, for reliability tests.

Off unless the environment variable LIBVIRTFS_FAULTS names a rules file.  The file is read
again whenever it changes, so a test can make a host slow, failing or disconnected while it
is mounted.  One rule a line, for the host whose URI (as given on the command line) is the
first word:

    test:///tmp/host.xml delay 5      every call sleeps 5 s first (a hung libvirtd)
    test:///tmp/host.xml error 5      every call fails with errno 5
    test:///tmp/host.xml stall 2      every call's answer arrives 2 s late: libvirt has
                                      answered, and what happens meanwhile is newer

A last word limits a rule to the calls made by one method of drivers/host.py:
`test:///tmp/host.xml stall 2 list_domains`; or, as `on=NAME`, to the calls on the object
named NAME (a domain, pool or network): `test:///tmp/host.xml delay 5 on=vm` is a QEMU
monitor stuck on one domain, while the rest of the host answers.
    test:///tmp/host.xml drop         the connection is closed under the next call, as when
                                      libvirtd goes away (the close callback runs)

The faults happen in the worker thread, around real libvirt calls: nothing is mocked.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from libvirtfs.drivers.errors import DriverError

ENVIRONMENT = "LIBVIRTFS_FAULTS"


@dataclass(frozen=True)
class Fault:
    kind: str  # delay, error, drop, stall
    value: float = 0.0
    call: str = ""  # only calls made by this method (its name in the caller's qualname)
    target: str | None = None  # only calls on the object of this name


class FaultRules:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._rules: dict[str, Fault] = {}
        self._dropped: set[tuple[str, tuple[float, int]]] = set()

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._rules, self._stamp = {}, None
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        rules: dict[str, Fault] = {}
        with open(self.path) as f:
            for line in f:
                words = line.split()
                try:
                    value = float(words[2]) if len(words) > 2 else 0.0
                except ValueError:
                    continue  # a rule being written, or a typo: no fault
                if len(words) > 3 and words[3].startswith("on="):
                    rules[words[0]] = Fault(words[1], value, target=words[3][3:])
                elif len(words) >= 2:
                    rules[words[0]] = Fault(words[1], value, *words[3:4])
        self._rules, self._stamp = rules, stamp

    def fault_for(self, uri: str | None, call: str = "") -> Fault | None:
        with self._lock:
            self._reload()
            fault = self._rules.get(uri or "")
            if fault is not None and fault.call and fault.call not in call.split("."):
                return None
            if fault is not None and fault.kind == "drop":
                # A drop happens once per writing of the rules file.
                token = (uri or "", self._stamp or (0.0, 0))
                if token in self._dropped:
                    return None
                self._dropped.add(token)
            return fault

    @staticmethod
    def apply_delay_or_error(fault: Fault) -> None:
        if fault.kind == "delay":
            time.sleep(fault.value)
        elif fault.kind == "error":
            err = int(fault.value) or errno.EIO
            raise DriverError(err, f"injected fault: {os.strerror(err)}")

    @staticmethod
    def apply_stall(fault: Fault | None) -> None:
        """After the real call: hold its answer back."""
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.value)


# Lookups whose result is the object a targeted fault slows down.
_LOOKUPS = {"lookupByUUIDString", "lookupByName", "lookupByUUID", "lookupByID",
            "storagePoolLookupByUUIDString", "storagePoolLookupByName",
            "networkLookupByUUIDString", "networkLookupByName"}
_LISTINGS = {"listAllDomains", "listAllStoragePools", "listAllNetworks"}
# Asking an object its identity is answered by the client library, never by the daemon.
_IDENTITY = {"name", "UUIDString", "UUID"}


class SlowObjects:
    """The connection as calls see it while one object is stuck: every method of the object
    named `fault.target` sleeps `fault.value` s first; everything else is untouched."""

    def __init__(self, conn: Any, fault: Fault) -> None:
        self._conn = conn
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name in _LOOKUPS:
            return lambda *args: self._wrap(attr(*args))
        if name in _LISTINGS:
            return lambda *args: [self._wrap(obj) for obj in attr(*args)]
        return attr

    def _wrap(self, obj: Any) -> Any:
        return _SlowObject(obj, self._fault.value) if obj.name() == self._fault.target else obj


class _SlowObject:
    def __init__(self, obj: Any, seconds: float) -> None:
        self._obj = obj
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if name in _IDENTITY or not callable(attr):
            return attr

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(self._seconds)
            return attr(*args, **kwargs)
        return slow


def from_environment() -> FaultRules | None:
    path = os.environ.get(ENVIRONMENT)
    return FaultRules(path) if path else None
