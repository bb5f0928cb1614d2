"""What a mount was asked, readable from outside: `getfattr -n user.counters MOUNTPOINT`.

The benchmark (contrib/bench.sh) counts FUSE requests and libvirt calls per workload by
reading this before and after.  FUSE requests are always counted (one dict increment per
request); libvirt calls only with LIBVIRTFS_COUNT_CALLS=1 (drivers/counting.py).
"""

from __future__ import annotations

from libvirtfs.drivers import counting

# Requests answered, by handler name (lookup, getattr, readdir, open, read, flush, ...).
REQUESTS: dict[str, int] = {}  # filled by vfs/operations.py for every handler
# Of those, the ones not answered at once: they awaited something (a rendering, a listing,
# libvirt), under a cancel scope.  Each costs several times an answer at hand.
WAITED: dict[str, int] = {}


def text() -> bytes:
    """`name count` lines: `fuse.NAME` per request kind and `fuse.total`, `waited.NAME`
    and `waited.total` for those not answered at once, then `libvirt.NAME` per libvirt
    method, `libvirt.hops` and `libvirt.total` when counted."""
    lines = [f"fuse.{name} {n}" for name, n in sorted(REQUESTS.items())]
    lines.append(f"fuse.total {sum(REQUESTS.values())}")
    lines += [f"waited.{name} {n}" for name, n in sorted(WAITED.items()) if n]
    lines.append(f"waited.total {sum(WAITED.values())}")
    if counting.enabled():
        lines += [f"libvirt.{name} {n}" for name, n in sorted(counting.snapshot().items())]
    return ("\n".join(lines) + "\n").encode()
