"""libvirt's state and reason numbers as the words users see in files.

Written out rather than derived from constant names: libvirt reuses prefixes for flags
(VIR_DOMAIN_SHUTDOWN_* are both reasons and flags), so a derived table would lie.  The
words the tree itself reasons with (domain states) live in nodes/words.py.
"""

from libvirtfs.nodes.words import DOMAIN_STATES, POOL_STATES

DOMAIN_REASONS: dict[str, list[str]] = {
    "nostate": ["unknown"],
    "running": ["unknown", "booted", "migrated", "restored", "from-snapshot", "unpaused",
                "migration-canceled", "save-canceled", "wakeup", "crashed", "post-copy",
                "post-copy-failed"],
    "blocked": ["unknown"],
    "paused": ["unknown", "user", "migration", "save", "dump", "ioerror", "watchdog",
               "from-snapshot", "shutting-down", "snapshot", "crashed", "starting-up",
               "post-copy", "post-copy-failed", "api-error"],
    "shutdown": ["unknown", "user"],
    "shutoff": ["unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                "from-snapshot", "daemon"],
    "crashed": ["unknown", "panicked"],
    "pmsuspended": ["unknown"],
}

VOLUME_TYPES = ["file", "block", "dir", "network", "netdir", "ploop"]


def _word(table: list[str], number: int) -> str:
    return table[number] if 0 <= number < len(table) else f"unknown-{number}"


def domain_state_word(state: int) -> str:
    return _word(DOMAIN_STATES, state)


def domain_reason_word(state: int, reason: int) -> str:
    return _word(DOMAIN_REASONS.get(domain_state_word(state), []), reason)


def pool_state_word(state: int) -> str:
    return _word(POOL_STATES, state)


def volume_type_word(kind: int) -> str:
    return _word(VOLUME_TYPES, kind)


def version_string(number: int) -> str:
    """libvirt packs versions as major * 1,000,000 + minor * 1,000 + release."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"

