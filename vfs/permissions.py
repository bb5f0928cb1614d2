"""Who may do what on a mount: the one place that turns nodes into modes and owners.

`default_permissions` is always on, so the kernel checks every open, mkdir, rmdir, rename,
chmod and xattr write against what is served here.  The nodes only say what they are
(`writable`, `private`: may hold secrets); this module decides the bits
(docs/security.md#the-permission-policy):

| node                                            | mode         | with admin_group |
| ----------------------------------------------- | ------------ | ---------------- |
| read-only file (state, info, status, ...)       | 0444         | 0444             |
| writable file (control, autostart, uri)         | 0644         | 0664             |
| read-only document (live.xml)                   | 0440         | 0440             |
| writable document (xml, scratch files)          | 0640         | 0660             |
| read-only folder (root, hosts/<host>/)          | 0555         | 0555             |
| folder that can change (domains/, an object's)  | 0755         | 0775             |
| owner_only: hosts/, a pending host and its uri  | 0755, 0644   | 0755, 0644       |

Everything is owned by the mount's owner (a scratch file by the user who made it) and its
group is the admin group, or the owner's group without one.  Write bits are cleared on a
read-only mount or host.  What the kernel does not check is checked here: reading
`user.error` (a file readable by all can carry a refused document's text in it) and
changing attributes.
"""

from __future__ import annotations

import errno

from libvirtfs.nodes.base import Context, Directory, Node, Symlink, fs_error
from libvirtfs.nodes.writable import ScratchFile

# Attributes only the owner and the admin group may read.
PRIVATE_XATTRS = frozenset({"user.error"})


def served_group(ctx: Context) -> int:
    return ctx.admin_gid if ctx.admin_gid is not None else ctx.gid


# Who may read each kind of node: documents only the owner and the served group.
_READ = {"folder": 0o555, "document": 0o440, "file": 0o444}


def _kind(node: Node) -> str:
    if isinstance(node, Directory):
        return "folder"
    return "document" if node.private else "file"


def mode(node: Node) -> int:
    """Permission bits of `node`."""
    if isinstance(node, Symlink):
        return 0o777
    bits = _READ[_kind(node)]
    if node.writable and not node.ctx.read_only:
        shared = node.ctx.admin_gid is not None and not node.owner_only
        bits |= 0o200 | (0o020 if shared else 0)
    return bits


def owner(node: Node) -> tuple[int, int]:
    """(uid, gid) of `node`."""
    uid = node.ctx.uid
    if isinstance(node, ScratchFile) and node.creator is not None:
        uid = node.creator
    return uid, served_group(node.ctx)


def file_mode(node: Node) -> int:
    return node.file_type | mode(node)


def _groups(pid: int) -> set[int]:
    """Supplementary groups of the calling thread (FUSE tells only its uid and gid)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def is_insider(ctx: Context, caller: object) -> bool:
    """Whether the caller of a request (pyfuse3's RequestContext) is root, the owner or in
    the served group: those the policy lets read documents and change things."""
    uid = getattr(caller, "uid", None)
    if uid is None or uid in (0, ctx.uid):
        return True  # no caller: an in-process call (tests/test_memory.py)
    group = served_group(ctx)
    return getattr(caller, "gid", None) == group or group in _groups(getattr(caller, "pid", 0))


def check_xattr_read(node: Node, name: str, caller: object) -> None:
    """EACCES for a private attribute read by a user outside the policy."""
    if name in PRIVATE_XATTRS and not is_insider(node.ctx, caller):
        raise fs_error(errno.EACCES, f"{name} of {node.path} is for its owner and "
                                     f"admin group only")


def visible_xattrs(node: Node, names: list[str], caller: object) -> list[str]:
    """What listxattr shows the caller: private names only to insiders, so that `getfattr
    -d` and `cp -a` by others do not stumble over an attribute they may not read."""
    if is_insider(node.ctx, caller):
        return names
    return [name for name in names if name not in PRIVATE_XATTRS]


def check_xattr_change(node: Node, caller: object) -> None:
    """The kernel lets only who may write a node change its `user.` attributes; the same,
    said again here, so that no node's mode can let an outsider set flags."""
    if not is_insider(node.ctx, caller):
        raise fs_error(errno.EACCES, f"{node.path}: attributes are changed by its owner "
                                     f"and admin group only")


def check_metadata_change(node: Node, caller: object) -> None:
    """chmod and chown are accepted and change nothing, for the owner and root only (the
    kernel says the same under default_permissions): rights are never widened."""
    uid = getattr(caller, "uid", None)
    if uid is not None and uid not in (0, owner(node)[0]):
        raise fs_error(errno.EPERM, f"{node.path}: only its owner may change its mode or "
                                    f"owner, and even then nothing changes")

