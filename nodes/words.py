"""The words users read and write in the tree: states, control words, flags.

The tree speaks only these; drivers/ translates libvirt's numbers and flags to and from
them (drivers/states.py, drivers/control.py, drivers/snapshots.py), so that nodes/ never
needs libvirt.  docs/writing.md and docs/snapshots.md list them: keep them in step.
"""

from __future__ import annotations

import errno

# `state` of a domain, in the order of libvirt's virDomainState.
DOMAIN_STATES = ["nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed",
                 "pmsuspended"]

# `state` of a pool (virStoragePoolState) and of a network.
POOL_STATES = ["inactive", "building", "running", "degraded", "inaccessible"]
NETWORK_STATES = ["active", "inactive"]

# Which domain words make sense in which state, for reading `control`.
DOMAIN_WORDS_BY_STATE: dict[str, list[str]] = {
    "shutoff": ["start", "start-paused"],
    "running": ["shutdown", "reboot", "reset", "destroy", "suspend", "managed-save"],
    "blocked": ["shutdown", "reboot", "reset", "destroy", "suspend", "managed-save"],
    "paused": ["resume", "reset", "destroy", "managed-save"],
    "shutdown": ["destroy"],
    "crashed": ["destroy"],
    "pmsuspended": ["destroy"],
    "nostate": ["destroy"],
}

# Domain words that run as jobs (drivers/jobs.py): while one runs the domain's lock is
# not held, so `abort` and reads go on; `abort` is listed only while a job runs.
DOMAIN_JOB_WORDS = frozenset({"managed-save"})
JOB_ABORT_WORD = "abort"

# kind -> the words its `control` file takes; every `control` also takes `wait STATE
# [SECONDS]` (objects.py), and always lists it, so that a saved `control` copied back is
# never one valid word.
CONTROL_WORDS: dict[str, list[str]] = {
    "domain": ["start", "start-paused", "shutdown", "reboot", "reset", "destroy", "suspend",
               "resume", "managed-save", "abort"],
    "pool": ["start", "stop", "refresh", "build"],
    "network": ["start", "stop"],
}

# `migrate DEST [OPTIONS]` on a domain's `control`, and `user.migrate` on its folder (what
# `mv` to another host's domains/ uses): flag words (libvirt's VIR_MIGRATE_*), and
# NAME=VALUE words for its typed parameters (VIR_MIGRATE_PARAM_*).  docs/hosts.md.
MIGRATE_WORD = "migrate"
MIGRATE_FLAGS = ["live", "offline", "p2p", "tunnelled", "persist", "undefine-source",
                 "copy-storage-all", "copy-storage-inc", "compressed", "auto-converge",
                 "postcopy", "unsafe"]
MIGRATE_PARAMS = {"bandwidth": "MIB_PER_S", "migrate-uri": "URI", "listen-address": "ADDR",
                  "dest-name": "NAME", "dest-xml": "PATH"}
DEFAULT_MIGRATE_OPTIONS = ["live", "persist", "undefine-source"]
# Which states a domain may be migrated from (an inactive one only with `offline`).
MIGRATABLE_STATES = ["running", "blocked", "paused", "shutoff"]

# domains/: `user.undefine-flags`, what rmdir may discard with a domain
# (VIR_DOMAIN_UNDEFINE_*).
UNDEFINE_FLAGS = ["managed-save", "snapshots-metadata", "checkpoints-metadata", "nvram",
                  "keep-nvram"]

# snapshots/: `user.flags` (libvirt's VIR_DOMAIN_SNAPSHOT_CREATE_*, in libvirt's order).
SNAPSHOT_CREATE_FLAGS = ["redefine", "current", "no-metadata", "halt", "disk-only",
                         "reuse-ext", "quiesce", "atomic", "live", "validate"]

# With `redefine`, mkdir does not take a snapshot: it makes a folder whose `xml` takes a
# saved document.  Only these flags mean something for a redefinition.
SNAPSHOT_REDEFINE_FLAGS = frozenset({"redefine", "current", "validate"})

# snapshots/: `user.delete-flags` (VIR_DOMAIN_SNAPSHOT_DELETE_*).
SNAPSHOT_DELETE_FLAGS = ["children", "metadata-only", "children-only"]

# snapshots/NAME/control: the words, and the modifiers that may follow them
# (`revert-running force`).
SNAPSHOT_REVERT_WORDS = ["revert", "revert-running", "revert-paused", "revert-force"]
SNAPSHOT_REVERT_MODIFIERS = ["running", "paused", "force", "reset-nvram"]

# domains/<name>/disks/<target>/control (docs/disks.md): block jobs and resize.  Each word
# takes these arguments (in brackets: optional) and modifiers; every job word also takes
# `bandwidth=MIB_PER_S` and `wait`.  drivers/disks.py turns them into libvirt's calls.
DISK_WORDS: dict[str, tuple[str, list[str]]] = {
    "commit": ("[BASE] [TOP]", ["shallow", "delete", "relative"]),
    "commit-active": ("[BASE]", ["shallow", "delete", "relative"]),
    "pull": ("[BASE]", ["relative"]),
    "copy": ("DEST", ["shallow", "reuse-ext"]),
    "pivot": ("", []),
    "abort": ("", []),
    "resize": ("SIZE", []),
    "wait": ("", []),
}
DISK_JOB_WORDS = frozenset({"commit", "commit-active", "pull", "copy"})
# What each word's arguments are: the least and the most.
DISK_ARGUMENTS = {"commit": (0, 2), "commit-active": (0, 1), "pull": (0, 1), "copy": (1, 1),
                  "pivot": (0, 0), "abort": (0, 0), "resize": (1, 1), "wait": (0, 0)}
# Block jobs that wait for `pivot` (or `abort`) once ready; the others end on their own.
DISK_MIRROR_JOBS = frozenset({"copy", "active-commit"})


def parse_words(value: bytes, words: list[str], what: str) -> list[str]:
    """A comma-separated list of `words`, without repeats, in the given order;
    OSError(EINVAL) naming an unknown word."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, f"{what} is a comma-separated list of words") from None
    found: list[str] = []
    for raw in text.replace("\n", ",").split(","):
        word = raw.strip().lower()
        if not word:
            continue
        if word not in words:
            raise OSError(errno.EINVAL, f"unknown {what} {word!r}; the {what}s are: "
                                        f"{', '.join(words)}")
        if word not in found:
            found.append(word)
    return found
