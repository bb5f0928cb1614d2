"""What the tree asks of a host, in the tree's own words.

`drivers.host.Host` is the one implementation (libvirt in worker threads); nodes/ knows
only this Protocol, so that importing the tree never loads libvirt or lxml.  Objects are
addressed by `kind` (domain, pool, volume, network, snapshot) and key (a UUID; a volume's
is "POOL-UUID/NAME"); states, control words and flags are the words of nodes/words.py.
Failures are OSErrors with an errno and a message for the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Info = dict[str, Any]


@dataclass(frozen=True)
class SnapshotSummary:
    """What a listing of snapshots/ needs of one snapshot."""

    name: str
    parent: str | None
    created: int       # creationTime, seconds since the epoch


@dataclass(frozen=True)
class SnapshotListing:
    snapshots: list[SnapshotSummary]
    current: str | None


class Change(Protocol):
    """Something changed on a host: `kind` is domain, snapshot, pool, volume or network
    (or host: anything may have changed); `uuid` names the object (the domain for a
    snapshot) when known."""

    @property
    def kind(self) -> str: ...

    @property
    def uuid(self) -> str | None: ...


class Host(Protocol):
    # The largest `xml` document a writer may give (EFBIG beyond).
    max_document_bytes: int

    def status(self) -> str: ...  # connected, connecting, disconnected: REASON; never waits
    async def uri(self) -> str: ...
    async def info(self) -> Info: ...
    async def capabilities(self) -> str: ...
    async def migrates(self) -> bool: ...  # whether domains can be migrated from it at all

    # Listings: (key, name) of every object of a kind.  `listing_version(kind)` moves
    # whenever the listing may have changed while libvirt's events keep it true; None when
    # they do not (then a listing is kept `cache_timeout`).
    def listing_version(self, kind: str) -> int | None: ...
    def stale(self, kind: str) -> None: ...  # the next listing of `kind` asks libvirt
    async def list_domains(self) -> list[tuple[str, str]]: ...
    async def list_pools(self) -> list[tuple[str, str]]: ...
    async def list_networks(self) -> list[tuple[str, str]]: ...
    async def list_volumes(self, pool_uuid: str) -> list[str]: ...

    # (state, reason); `fresh`: asked of libvirt now, not of what is kept.
    async def domain_state(self, uuid: str, *, fresh: bool = False) -> tuple[str, str]: ...
    async def domain_info(self, uuid: str) -> Info: ...
    async def domain_live_xml(self, uuid: str) -> str: ...
    async def pool_state(self, uuid: str) -> str: ...
    async def pool_info(self, uuid: str) -> Info: ...
    async def volume_path(self, pool_uuid: str, name: str) -> str: ...
    async def volume_info(self, pool_uuid: str, name: str) -> Info: ...
    async def network_state(self, uuid: str) -> str: ...
    async def network_info(self, uuid: str) -> Info: ...

    # Any kind: the definition (`xml`), control words, autostart, rmdir and mv.
    async def definition(self, kind: str, key: str) -> bytes: ...
    async def define(self, kind: str, key: str | None, name: str | None, data: bytes, *,
                     parent: str | None = None) -> str: ...
    async def control(self, kind: str, key: str, word: str) -> None: ...
    async def autostart(self, kind: str, key: str) -> bool: ...
    async def set_autostart(self, kind: str, key: str, value: bool) -> None: ...
    async def remove(self, kind: str, key: str, words: Sequence[str] = ()) -> None:
        """rmdir; `words` are a domain's UNDEFINE_FLAGS."""
    async def rename(self, kind: str, key: str, new_name: str) -> None: ...

    async def migrate(self, uuid: str, destination: Host | str, words: list[str],
                      params: dict[str, str], *, what: str = "migrate") -> None:
        """Move the domain to another host of this mount, or to a libvirt URI; `words` are
        MIGRATE_FLAGS, `params` MIGRATE_PARAMS.  Returns when libvirt has finished; a job
        (`job` names it `what`), aborted by `abort` (ECANCELED)."""

    # Jobs (long operations) on the domain `uuid`: `job_running` is this mount's own
    # knowledge; `domain_job` is the `job` file's lines ({} if no job ever ran).
    def job_running(self, uuid: str) -> bool: ...
    def busy_with(self) -> list[str]: ...  # jobs of this mount on or into the host, running
    async def domain_job(self, uuid: str) -> Info: ...

    # Snapshots of the domain `uuid`, by name; flags are words of nodes/words.py.
    async def snapshot_listing(self, uuid: str) -> SnapshotListing: ...
    async def snapshot_xml(self, uuid: str, name: str) -> str: ...
    async def snapshot_info(self, uuid: str, name: str) -> Info: ...
    async def create_snapshot(self, uuid: str, name: str, flags: list[str],
                              description: str | None, template: bytes | None) -> None: ...
    async def redefine_snapshot(self, uuid: str, name: str, data: bytes,
                                flags: list[str]) -> None: ...
    async def delete_snapshot(self, uuid: str, name: str, flags: list[str]) -> None: ...
    async def revert_snapshot(self, uuid: str, name: str, word: str,
                              modifiers: list[str]) -> None: ...

    def check_snapshot_template(self, data: bytes) -> None:
        """OSError(EINVAL) unless `data` is a `<domainsnapshot>` document."""

    def snapshot_document(self, name: str, description: str | None,
                          template: bytes | None) -> bytes:
        """The document for a new snapshot: the template (or nothing) with this name and
        description."""
        ...
