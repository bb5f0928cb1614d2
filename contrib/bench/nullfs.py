"""A null pyfuse3 filesystem of libvirtfs's shape, for the benchmark to measure against.

hosts/NAME/{uri,status,info,capabilities.xml,domains/,pools/,networks/} and
domains/VM/{state,info,xml,live.xml,job,autostart,control,snapshots/} with constant
contents, served the way libvirtfs serves them (vfs/operations.py, mount/serve.py): the
same FUSE mount options (default_permissions, no writeback cache), entry and attribute
timeouts of cache_timeout (0 for control and autostart, whose inodes libvirtfs makes per
program), the page cache emptied at every open and `direct_io` only for the files with
no cached attributes or that can be written (libvirtfs's rule: vfs/page_cache.py),
`.` and `..` in readdir, negative entries for missing names in domains/, a FLUSH answered
on every close, ENOATTR for
`user.` extended attributes and ENOTSUP for every other namespace (what libvirtfs aims
to answer), the same limit of 1000 requests at once.  Inode numbers are arithmetic: it
keeps no object per file, so its cost is pyfuse3's and the kernel's alone.

Run:  python nullfs.py --domains 1000 [--names vm-%05d] [--host big] [--cache-timeout 1] MNT
It serves in the foreground until `fusermount3 -u MNT`.  `getfattr -n user.counters MNT`
gives its FUSE request counts in libvirtfs's format (vfs/counters.py).
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

REQUESTS: dict[str, int] = {}


def counted(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    name = fn.__name__
    REQUESTS.setdefault(name, 0)

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        REQUESTS[name] += 1
        return await fn(*args, **kwargs)
    return wrapper


XML = (b"<domain type='test'>\n  <name>vm</name>\n  <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f"
       b"</uuid>\n  <memory unit='KiB'>65536</memory>\n  <currentMemory unit='KiB'>65536"
       b"</currentMemory>\n  <vcpu placement='static'>1</vcpu>\n  <os>\n    <type arch='i686'>"
       b"hvm</type>\n    <boot dev='hd'/>\n  </os>\n  <clock offset='utc'/>\n  <on_poweroff>"
       b"destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy"
       b"</on_crash>\n  <devices>\n  </devices>\n</domain>\n")
INFO = (b"uuid: 6695eb01-f6a4-8304-79aa-97f2502e193f\nid: 2\nstate: running\nreason: booted\n"
        b"vcpus: 1\nmemory: 65536\nmax_memory: 65536\ncpu_time: 1234567890\npersistent: yes\n"
        b"autostart: no\nmanaged_save: no\nsnapshots: 0\n")
DOMAIN_FILES: list[tuple[str, bytes, int, float | None]] = [
    # name, contents, permissions, timeout (None: cache_timeout)
    ("state", b"running\n", 0o444, None),
    ("info", INFO, 0o444, None),
    ("xml", XML, 0o644, None),
    ("live.xml", XML, 0o444, None),
    ("job", b"none\n", 0o444, None),
    ("autostart", b"0\n", 0o644, 0.0),
    ("control", b"destroy\nsuspend\nreboot\nreset\nshutdown\nsave\n", 0o644, 0.0),
]
SNAPSHOTS = len(DOMAIN_FILES) + 1  # offset of snapshots/ in a domain's block
BLOCK = 16  # inodes per domain
FIRST_DOMAIN = 100

ROOT, HOSTS, HOST = 1, 2, 3
HOST_FILES = {4: ("uri", b"test:///null\n"), 5: ("status", b"connected\n"),
              6: ("info", b"hostname: null\nuri: test:///null\ndomains: 0\n"),
              7: ("capabilities.xml", b"<capabilities/>\n")}
DOMAINS, POOLS, NETWORKS = 8, 9, 10


class NullFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, names: list[str], host: str, cache_timeout: float) -> None:
        super().__init__()
        self.names = names
        self.index = {name: i for i, name in enumerate(names)}
        self.host = host
        self.timeout = cache_timeout
        self.mtime_ns = int(time.time() * 1e9)
        self.uid, self.gid = os.getuid(), os.getgid()
        # snapshots: inode -> (domain index, name); per domain: name -> inode
        self.snapshot_dirs: dict[int, tuple[int, str]] = {}
        self.snapshots: dict[int, dict[str, int]] = {}
        self.next_inode = FIRST_DOMAIN + BLOCK * len(names)

    # -- the shape -----------------------------------------------------------------------

    def kind(self, inode: int) -> tuple[str, Any]:
        """('dir', children) or ('file', (contents, permissions, timeout))."""
        if inode == ROOT:
            return "dir", {"hosts": HOSTS}
        if inode == HOSTS:
            return "dir", {self.host: HOST}
        if inode == HOST:
            children = {name: i for i, (name, _) in HOST_FILES.items()}
            children.update(domains=DOMAINS, pools=POOLS, networks=NETWORKS)
            return "dir", children
        if inode in HOST_FILES:
            return "file", (HOST_FILES[inode][1], 0o444, None)
        if inode in (POOLS, NETWORKS):
            return "dir", {}
        if inode == DOMAINS:
            return "dir", None  # the domains, computed
        if inode in self.snapshot_dirs:
            return "dir", {}
        block, offset = divmod(inode - FIRST_DOMAIN, BLOCK)
        if inode < FIRST_DOMAIN or block >= len(self.names):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if offset == 0:
            children = {name: inode + 1 + k for k, (name, *_) in enumerate(DOMAIN_FILES)}
            children["snapshots"] = inode + SNAPSHOTS
            return "dir", children
        if offset == SNAPSHOTS:
            return "dir", self.snapshots.get(block, {})
        if offset <= len(DOMAIN_FILES):
            return "file", DOMAIN_FILES[offset - 1][1:]
        raise pyfuse3.FUSEError(errno.ENOENT)

    def children(self, inode: int) -> dict[str, int]:
        kind, children = self.kind(inode)
        if kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if children is None:
            return {name: FIRST_DOMAIN + BLOCK * i for i, name in enumerate(self.names)}
        return children

    def attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        kind, what = self.kind(inode)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        timeout = self.timeout
        if kind == "dir":
            a.st_mode = stat.S_IFDIR | 0o755
            size = 0
        else:
            contents, permissions, own_timeout = what
            a.st_mode = stat.S_IFREG | permissions
            size = len(contents)
            if own_timeout is not None:
                timeout = own_timeout
        a.entry_timeout = a.attr_timeout = timeout
        a.st_nlink = 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        return a

    # -- requests ------------------------------------------------------------------------

    @counted
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if name == b".":
            return self.attrs(parent_inode)
        if name == b"..":
            return self.attrs(ROOT)  # good enough: nothing in the benchmark walks up
        text = os.fsdecode(name)
        if parent_inode == DOMAINS:
            i = self.index.get(text)
            if i is None:
                missing = pyfuse3.EntryAttributes()
                missing.st_ino = 0
                missing.entry_timeout = self.timeout
                return missing
            return self.attrs(FIRST_DOMAIN + BLOCK * i)
        inode = self.children(parent_inode).get(text)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(inode)

    @counted
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self.attrs(inode)

    @counted
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        return self.attrs(inode)

    @counted
    async def statfs(self, ctx: Any = None) -> Any:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st

    @counted
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        self.children(inode)
        return inode

    @counted
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for offset, dot in ((1, b"."), (2, b"..")):
            if start_id < offset and not pyfuse3.readdir_reply(
                    token, dot, self.attrs(fh), offset):
                return
        for k, (name, inode) in enumerate(self.children(fh).items()):
            offset = k + 3
            if offset <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs(inode), offset):
                return

    @counted
    async def releasedir(self, fh: int) -> None:
        return None

    @counted
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        block, offset = divmod(parent_inode - FIRST_DOMAIN, BLOCK)
        if parent_inode < FIRST_DOMAIN or offset != SNAPSHOTS or block >= len(self.names):
            raise pyfuse3.FUSEError(errno.EPERM)
        mine = self.snapshots.setdefault(block, {})
        text = os.fsdecode(name)
        if text in mine:
            raise pyfuse3.FUSEError(errno.EEXIST)
        inode = mine[text] = self.next_inode
        self.next_inode += 1
        self.snapshot_dirs[inode] = (block, text)
        return self.attrs(inode)

    @counted
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        block = (parent_inode - FIRST_DOMAIN) // BLOCK
        inode = self.snapshots.get(block, {}).pop(os.fsdecode(name), None)
        if inode is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        del self.snapshot_dirs[inode]

    @counted
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        kind, what = self.kind(inode)
        if kind != "file":
            raise pyfuse3.FUSEError(errno.EISDIR)
        _, permissions, own_timeout = what
        # libvirtfs's rule: the page cache only for files with cached attributes that
        # nobody can write (vfs/page_cache.py)
        cached = ((self.timeout if own_timeout is None else own_timeout) > 0
                  and not permissions & 0o222)
        return pyfuse3.FileInfo(fh=inode, direct_io=not cached, keep_cache=False)

    @counted
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.kind(fh)[1][0][off:off + size]

    @counted
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return len(buf)

    @counted
    async def flush(self, fh: int) -> None:
        return None

    @counted
    async def release(self, fh: int) -> None:
        return None

    @counted
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if inode == ROOT and name == b"user.counters":
            lines = [f"fuse.{n} {c}" for n, c in sorted(REQUESTS.items())]
            lines.append(f"fuse.total {sum(REQUESTS.values())}")
            return ("\n".join(lines) + "\n").encode()
        if name.startswith(b"user."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    @counted
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, required=True)
    parser.add_argument("--names", default="vm-%05d", help="printf pattern of domain names")
    parser.add_argument("--host", default="big")
    parser.add_argument("--cache-timeout", type=float, default=1.0)
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    names = [args.names % i for i in range(args.domains)]
    fs = NullFS(names, args.host, args.cache_timeout)
    pyfuse3.init(fs, args.mountpoint,
                 {"fsname=nullfs", "subtype=nullfs", "default_permissions"})
    try:
        trio.run(functools.partial(pyfuse3.main, max_tasks=1000))
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
