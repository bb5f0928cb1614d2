"""Counting what libvirt is asked, for the benchmark and for tests that assert a cost.

Off unless the environment variable LIBVIRTFS_COUNT_CALLS is set (to anything but empty
or 0): then every call that reaches libvirt through `Connection` is counted by method
name, on the real driver, through a thin wrapper around the connection and the objects
it hands out.  What the client library answers by itself (an object's name, UUID or id)
is not a call to the daemon and is not counted.  `hops` counts the worker-thread hops
(`Connection.call`), each of which may make several calls.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

ENVIRONMENT = "LIBVIRTFS_COUNT_CALLS"

# Answered by libvirt-python or the client library from the object itself.
LOCAL = frozenset({"name", "UUIDString", "UUID", "ID", "isAlive", "connect",
                   "getConnect"})

_lock = threading.Lock()
_counts: Counter[str] = Counter()


def enabled() -> bool:
    return os.environ.get(ENVIRONMENT, "") not in ("", "0")


def count(name: str) -> None:
    with _lock:
        _counts[name] += 1


def snapshot() -> dict[str, int]:
    """Calls by method name since the process started, plus `hops` and `total` (every
    call to libvirt, hops not included)."""
    with _lock:
        counts = dict(_counts)
    counts["total"] = sum(n for name, n in counts.items() if name != "hops")
    return counts


def _wrap(value: Any) -> Any:
    """Wrap libvirt objects (also in lists and tuples, as listAll* and getAllDomainStats
    return them) so that their calls are counted too."""
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_wrap(item) for item in value)
    if hasattr(value, "_o") and not isinstance(value, Counted):
        return Counted(value)
    return value


def unwrap(value: Any) -> Any:
    """The libvirt object behind a counting wrapper (or `value` itself).  Wrappers are made
    anew for every call: what is kept per connection must be kept by the real one."""
    return value._target if isinstance(value, Counted) else value


class Counted:
    """A libvirt object (connection, domain, pool, ...) whose method calls are counted.
    libvirt-python passes objects to the C binding by their `_o`, which this forwards,
    so a wrapped object can be handed back to libvirt (a destination connection)."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name.startswith("_") or name in LOCAL or not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            count(name)
            return _wrap(attr(*args, **kwargs))
        return counted
