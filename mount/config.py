"""Which hosts to mount: `[NAME=]URI` on the command line, `[[host]]` tables in a TOML file.

    [[host]]
    name = "second"                        # the folder under hosts/ (default: from the host)
    uri = "qemu+tcp://10.0.0.2/system"     # required
    timeout = 10                           # seconds per libvirt call (default: -o timeout)
    keepalive_interval = 5                 # seconds between keepalive messages (0: none)
    keepalive_count = 3                    # unanswered ones before the host is lost
    read_only = true                       # EROFS for every change under it (default: -o ro)
    credentials = "/etc/libvirtfs/lab.cred"  # user name and password for SASL (mode 0600)

    [mount]
    options = "allow_other,timeout=10"     # as -o, before the command line's -o (which win)

A mistake in the file is one line naming the file, the table and the key: an unknown key
or a wrong type is an error, not a silently ignored setting.  `[mount]` is what a service
unit per mount needs (contrib/systemd/libvirtfs@.service): the whole mount in one file.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libvirtfs.drivers.connection import DEFAULT_KEEPALIVE
from libvirtfs.mount.options import MAX_SECONDS, MountOptions, OptionError

# A keepalive interval or count beyond this is a typo (libvirt takes an int).
MAX_KEEPALIVE = 3600
# A folder name's bytes at most (NAME_MAX; statfs says so): longer ones defeat most tools.
MAX_NAME_BYTES = 255
# A config file is a few lines; `--config /dev/zero` must not eat the memory.
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(ValueError):
    """A config file libvirtfs cannot use; one line for the user."""


@dataclass
class HostSpec:
    """One host to mount.  None means: as the mount's options say."""

    name: str | None
    uri: str | None
    timeout: float | None = None
    read_only: bool | None = None
    keepalive: tuple[int, int] = field(default=DEFAULT_KEEPALIVE)
    origin: str = "the command line"  # where it was given, for messages
    # A file of user name and password for libvirt's auth callbacks (config file only:
    # a password on the command line is shown by `ps` to every user).
    credentials: str | None = None


def parse_host(text: str) -> HostSpec:
    """`NAME=URI` or `URI`: a URI has its `:` before any `=` (qemu:///system?x=y), a NAME
    has none."""
    name, sep, uri = text.partition("=")
    if sep and ":" not in name:
        return HostSpec(name, uri or None)
    return HostSpec(None, text or None)


def short_name(hostname: str, driver: str) -> str:
    """The folder of a host given no name: its hostname up to the first dot."""
    if driver.lower() == "test":
        return "test"
    return hostname.split(".")[0] or "host"


def check_name(name: str, where: str) -> str:
    """A host name is a folder name under hosts/."""
    if (not name or "/" in name or "\0" in name or name in (".", "..")
            or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES):
        raise ConfigError(f"{where}: host name {name!r} cannot be a folder name")
    return name


_KEYS = {"name", "uri", "timeout", "keepalive_interval", "keepalive_count", "read_only",
         "credentials"}
_MOUNT_KEYS = {"options"}


@dataclass
class Config:
    """A config file: its hosts in order, and its `[mount]` options (as `-o` takes them)."""

    hosts: list[HostSpec]
    options: str = ""


def load_config(path: str | Path) -> Config:
    """The `[mount]` table and the `[[host]]` tables of a TOML file."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than "
                              f"{MAX_CONFIG_BYTES // 1024} KiB")
        document = tomllib.loads(text.decode())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8; tomllib lets this one through
        raise ConfigError(f"config file {path} is not valid TOML: it is not UTF-8 "
                          f"(byte {e.start + 1} is {e.object[e.start]:#04x})") from None
    unknown = sorted(set(document) - {"host", "mount"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (the file holds a [mount] "
                          f"table and [[host]] tables only)")
    tables = document.get("host", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: 'host' must be tables written [[host]], one per host")
    specs = [_host(table, f"{path}: host {n}", Path(path).parent)
             for n, table in enumerate(tables, 1)]
    check_unique(specs)
    return Config(specs, _mount_options(document.get("mount", {}), f"{path}: [mount]"))


def _mount_options(table: Any, where: str) -> str:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, written [mount] on a line of its own")
    unknown = sorted(set(table) - _MOUNT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; the keys are "
                          f"{', '.join(sorted(_MOUNT_KEYS))}")
    if "options" not in table:
        return ""
    text = _typed(table, "options", str, 'a string of -o options ("ro,allow_other")', where)
    try:
        MountOptions().add(text)
    except OptionError as e:
        raise ConfigError(f"{where}: {e}") from None
    return text


def _host(table: dict[str, Any], where: str, folder: Path) -> HostSpec:
    name = table.get("name")
    if name is not None:
        where = f"{where} ({name!r})" if isinstance(name, str) else where
        check_name(_typed(table, "name", str, "a string", where), where)
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; the keys are "
                          f"{', '.join(sorted(_KEYS))}")
    if "uri" not in table:
        raise ConfigError(f"{where}: 'uri' is missing")
    uri = _typed(table, "uri", str, "a string", where)
    timeout = None
    if "timeout" in table:
        value = table["timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: 'timeout' must be a number of seconds, "
                              f"got {value!r}")
        if not (0 < value <= MAX_SECONDS) or math.isnan(value):
            raise ConfigError(f"{where}: 'timeout' must be more than 0 and at most "
                              f"{MAX_SECONDS:g} seconds, got {value!r}")
        timeout = float(value)
    interval = _count(table, "keepalive_interval", DEFAULT_KEEPALIVE[0], 0, where)
    count = _count(table, "keepalive_count", DEFAULT_KEEPALIVE[1], 1, where)
    read_only = (_typed(table, "read_only", bool, "true or false", where)
                 if "read_only" in table else None)
    credentials = None
    if "credentials" in table:
        given = _typed(table, "credentials", str, "the path of a file", where)
        if not given or "\0" in given:
            raise ConfigError(f"{where}: 'credentials' must be the path of a file, "
                              f"got {given!r}")
        # Relative to the config file, as the mount runs from / once in the background.
        credentials = os.path.abspath(folder / given)
    return HostSpec(name, uri or None, timeout, read_only, (interval, count), where,
                    credentials)


def _typed(table: dict[str, Any], key: str, kind: type, words: str, where: str) -> Any:
    value = table[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key!r} must be {words}, got {value!r}")
    return value


def _count(table: dict[str, Any], key: str, default: int, low: int, where: str) -> int:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_KEEPALIVE:
        raise ConfigError(f"{where}: {key!r} must be a whole number from {low} to "
                          f"{MAX_KEEPALIVE}, got {value!r}")
    return value


def check_unique(specs: list[HostSpec]) -> None:
    """Two hosts given the same name (in the file, or there and on the command line)."""
    seen: dict[str, HostSpec] = {}
    for spec in specs:
        if spec.name is None:
            continue
        if spec.name in seen:
            raise ConfigError(f"host name {spec.name!r} is given twice: by "
                              f"{seen[spec.name].origin} and by {spec.origin}")
        seen[spec.name] = spec
