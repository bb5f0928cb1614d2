"""domains/<name>/: one folder per domain, addressed by UUID so renames keep identity."""

from __future__ import annotations

import errno
from typing import Any

from libvirtfs.nodes.base import Entry, QueryFile, fs_error
from libvirtfs.nodes.objects import CollectionDirectory, ObjectDirectory
from libvirtfs.nodes.snapshots import SnapshotsDirectory
from libvirtfs.nodes.words import (
    DOMAIN_STATES,
    DOMAIN_WORDS_BY_STATE,
    UNDEFINE_FLAGS,
    parse_words,
)

UNDEFINE = "user.undefine-flags"


def undefine_words(value: bytes) -> list[str]:
    """user.undefine-flags: a comma-separated list of UNDEFINE_FLAGS, not both nvram and
    keep-nvram; OSError(EINVAL) saying what is wrong."""
    words = parse_words(value, UNDEFINE_FLAGS, "undefine flag")
    if {"nvram", "keep-nvram"} <= set(words):
        raise fs_error(errno.EINVAL, "nvram removes the NVRAM file and keep-nvram keeps it: "
                                     "choose one")
    return words


class DomainsDirectory(CollectionDirectory):
    """domains/; `user.undefine-flags` says what rmdir may discard with a domain, for as
    long as the mount runs."""

    kind = "domain"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.undefine: list[str] = []

    async def listing(self) -> list[tuple[str, str]]:
        return await self.host.list_domains()

    def make(self, key: str | None) -> ObjectDirectory:
        return DomainDirectory(self.ctx, self.host, key)

    def removal_words(self) -> list[str]:
        return list(self.undefine)

    async def xattrs(self) -> dict[str, bytes]:
        mine = {UNDEFINE: ",".join(self.undefine).encode()} if self.undefine else {}
        return {**mine, **await super().xattrs()}

    async def set_xattr(self, name: str, value: bytes) -> None:
        if name != UNDEFINE:
            await super().set_xattr(name, value)
            return
        self.undefine = undefine_words(value)  # an empty value is the default

    async def remove_xattr(self, name: str) -> None:
        if name == UNDEFINE and self.undefine:
            self.undefine = []
            return
        await super().remove_xattr(name)


class DomainDirectory(ObjectDirectory):
    kind = "domain"
    states = DOMAIN_STATES
    served_names = ObjectDirectory.served_names | {"live.xml", "snapshots"}

    async def state(self) -> str:
        return (await self.host.domain_state(self.key))[0]  # type: ignore[arg-type]

    async def info(self) -> dict[str, Any]:
        return await self.host.domain_info(self.key)  # type: ignore[arg-type]

    def extra_served(self) -> list[Entry]:
        async def live_xml() -> str:
            return await self.host.domain_live_xml(self.key)  # type: ignore[arg-type]

        return [
            Entry("live.xml", "live.xml", lambda: QueryFile(self.ctx, live_xml)),
            # Keyed by the domain: a domain defined anew under this name has new snapshots.
            Entry(("snapshots", self.key), "snapshots",
                  lambda: SnapshotsDirectory(self.ctx, self.host, self.key)),
        ]

    async def words(self) -> list[str]:
        return DOMAIN_WORDS_BY_STATE.get(await self.state(), [])

    async def check_word(self, word: str) -> None:
        # Checked here so that every hypervisor refuses alike (the test driver calls a
        # wrong state an internal error).
        state = await self.state()
        valid = DOMAIN_WORDS_BY_STATE.get(state, [])
        if word not in valid:
            raise fs_error(errno.EBUSY, f"{word} is not possible while the domain is "
                                        f"{state}; valid now: {', '.join([*valid, 'wait'])}")
