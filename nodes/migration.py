"""Migration options in the tree's words: `migrate DEST [OPTIONS]` written to a domain's
`control`, and `user.migrate` on a domain's folder (the options `mv` to another host uses).

Checked here, before libvirt is asked anything, so that a typo is EINVAL naming the word
and listing the words there are, and never half a migration; drivers/migration.py turns
them into libvirt's flags and typed parameters.  docs/hosts.md, "Migration".
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field

from libvirtfs.nodes.base import fs_error
from libvirtfs.nodes.words import DEFAULT_MIGRATE_OPTIONS, MIGRATE_FLAGS, MIGRATE_PARAMS

# Pairs libvirt refuses together: say so before asking it.
_EXCLUSIVE = [("live", "offline"), ("copy-storage-all", "copy-storage-inc")]
# How long a parameter's value may be (a URI, a host name, a path).
MAX_VALUE_CHARS = 1024


def option_words() -> str:
    """Every option, as the refusal of an unknown one lists them."""
    return ", ".join([*MIGRATE_FLAGS, *(f"{name}={value}" for name, value in
                                        MIGRATE_PARAMS.items())])


@dataclass(frozen=True)
class MigrateOptions:
    """Flag words (MIGRATE_FLAGS) in the order given, and NAME=VALUE parameters."""

    flags: tuple[str, ...] = ()
    params: dict[str, str] = field(default_factory=dict)

    def words(self) -> list[str]:
        """As written back (user.migrate shows this)."""
        return [*self.flags, *(f"{name}={value}" for name, value in self.params.items())]

    def with_flag(self, word: str, instead_of: str | None = None) -> MigrateOptions:
        flags = [flag for flag in self.flags if flag != instead_of]
        if word not in flags:
            flags.append(word)
        return MigrateOptions(tuple(flags), dict(self.params))

    def with_param(self, name: str, value: str) -> MigrateOptions:
        return MigrateOptions(self.flags, {**self.params, name: value})


def parse_options(words: list[str]) -> MigrateOptions:
    """OPTIONS of `migrate DEST OPTIONS`, or of user.migrate; OSError(EINVAL) naming the
    first word that is wrong."""
    flags: list[str] = []
    params: dict[str, str] = {}
    for raw in words:
        word = raw.strip()
        if not word:
            continue
        name, sep, value = word.partition("=")
        name = name.lower()
        if not sep and name in MIGRATE_FLAGS:
            if name not in flags:
                flags.append(name)
            continue
        if not sep or name not in MIGRATE_PARAMS:
            raise fs_error(errno.EINVAL, f"unknown migrate option {word[:80]!r}; the options "
                                         f"are: {option_words()}")
        params[name] = _check_value(name, value)
    for one, other in _EXCLUSIVE:
        if one in flags and other in flags:
            raise fs_error(errno.EINVAL, f"migrate options {one} and {other} exclude each "
                                         f"other: choose one")
    return MigrateOptions(tuple(flags), params)


def _check_value(name: str, value: str) -> str:
    if not value:
        raise fs_error(errno.EINVAL, f"migrate option {name}= needs a value "
                                     f"({name}={MIGRATE_PARAMS[name]})")
    if len(value) > MAX_VALUE_CHARS or any(ord(ch) < 0x20 for ch in value):
        raise fs_error(errno.EINVAL, f"migrate option {name}= takes at most "
                                     f"{MAX_VALUE_CHARS} printable characters")
    if name == "bandwidth" and not re.fullmatch(r"[0-9]{1,9}", value):
        raise fs_error(errno.EINVAL, f"bandwidth={value[:40]!r}: a whole number of MiB/s")
    if name == "dest-xml" and not os.path.isabs(value):
        raise fs_error(errno.EINVAL, f"dest-xml={value[:80]!r}: give an absolute path (the "
                                     f"filesystem reads it, not the writer's shell)")
    return value


def parse_attribute(value: bytes) -> MigrateOptions:
    """user.migrate: options separated by spaces or commas; empty means the default."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise fs_error(errno.EINVAL, "user.migrate takes migrate options as text") from None
    options = parse_options(re.split(r"[\s,]+", text))
    return options if options.words() else DEFAULT


DEFAULT = MigrateOptions(tuple(DEFAULT_MIGRATE_OPTIONS))
