"""libvirt's event and detail numbers as the words of hosts/<host>/events (docs/hosts.md).

Written out, like drivers/states.py: the words are the constant names' tails in lower
case with hyphens (VIR_DOMAIN_EVENT_STOPPED_DESTROYED: `stopped destroyed`).  A number this
table does not know shows as `event-N` or `detail-N`.
"""

from __future__ import annotations

# Domain lifecycle: event -> its details, in libvirt's numbering (libvirt 9).
DOMAIN_LIFECYCLE: list[tuple[str, list[str]]] = [
    ("defined", ["added", "updated", "renamed", "from-snapshot"]),
    ("undefined", ["removed", "renamed"]),
    ("started", ["booted", "migrated", "restored", "from-snapshot", "wakeup", "recreated"]),
    ("suspended", ["paused", "migrated", "ioerror", "watchdog", "restored", "from-snapshot",
                   "api-error", "postcopy", "postcopy-failed"]),
    ("resumed", ["unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed"]),
    ("stopped", ["shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                 "from-snapshot"]),
    ("shutdown", ["finished", "guest", "host"]),
    ("pmsuspended", ["memory", "disk"]),
    ("crashed", ["panicked", "crashloaded"]),
]

# Pools and networks give no detail (always 0).
POOL_LIFECYCLE = ["defined", "undefined", "started", "stopped", "created", "deleted"]
NETWORK_LIFECYCLE = ["defined", "undefined", "started", "stopped"]

BLOCK_JOB_STATUS = ["completed", "failed", "cancelled", "ready"]
BLOCK_JOB_TYPES = ["unknown", "pull", "copy", "commit", "active-commit", "backup"]

JOB_OPERATIONS = ["unknown", "start", "save", "restore", "migration-in", "migration-out",
                  "snapshot", "snapshot-revert", "dump", "backup", "snapshot-delete"]

METADATA_TYPES = ["description", "title", "element"]

# Why libvirt closed a connection (VIR_CONNECT_CLOSE_REASON_*).
CLOSE_REASONS = ["error", "eof", "keepalive", "client"]


def _word(table: list[str], number: int, unknown: str) -> str:
    return table[number] if 0 <= number < len(table) else f"{unknown}-{number}"


def domain_lifecycle(event: int, detail: int) -> tuple[str, str]:
    if not 0 <= event < len(DOMAIN_LIFECYCLE):
        return f"event-{event}", f"detail-{detail}"
    word, details = DOMAIN_LIFECYCLE[event]
    return word, _word(details, detail, "detail")


def pool_lifecycle(event: int) -> str:
    return _word(POOL_LIFECYCLE, event, "event")


def network_lifecycle(event: int) -> str:
    return _word(NETWORK_LIFECYCLE, event, "event")


def block_job(status: int, kind: int) -> tuple[str, str]:
    return (f"block-job-{_word(BLOCK_JOB_STATUS, status, 'status')}",
            _word(BLOCK_JOB_TYPES, kind, "type"))


def job_operation(number: int) -> str:
    return _word(JOB_OPERATIONS, number, "operation")


def metadata_type(number: int) -> str:
    return _word(METADATA_TYPES, number, "type")


def close_reason(number: int) -> str:
    return _word(CLOSE_REASONS, number, "reason")
