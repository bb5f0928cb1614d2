"""SIGHUP: read `--config` again and let hosts/ follow it, without unmounting.

The config file says which of the mount's hosts it brings: after a reload, each `[[host]]`
table is one folder under hosts/ (connected again if an rmdir took it away, or if it could
not be connected at the last load), a table that went takes its folder away as
`rmdir hosts/NAME` would (libvirt is never asked to change anything), and a table whose URI,
timeout, keepalive, read_only or credentials changed is connected anew under the same name.
Hosts of the command line and those made by `mkdir` are the user's: a reload never touches them.

A file that cannot be read, or that names a folder held by such a host, changes nothing;
a host that cannot be connected is logged and left as it was, and the others are applied.
The `[mount]` options are the mount's own (FUSE's among them): read at mount time only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from libvirtfs.drivers.host import Host
from libvirtfs.mount.config import (
    Config,
    ConfigError,
    HostSpec,
    check_name,
    load_config,
    short_name,
)
from libvirtfs.nodes.hosts import HostDirectory

if TYPE_CHECKING:
    from libvirtfs.mount.serve import Mount

log = logging.getLogger(__name__)


def _settings(spec: HostSpec) -> tuple[object, ...]:
    """What a host's connection is made of: a change of any of it connects it anew."""
    return spec.uri, spec.timeout, spec.read_only, spec.keepalive, spec.credentials


def keyed(specs: list[HostSpec]) -> dict[Hashable, HostSpec]:
    """Which table of the new file is which of the old: a named host by its name, an
    unnamed one by its URI (and how many unnamed tables of that URI came before it)."""
    seen: Counter[str | None] = Counter()
    keys: dict[Hashable, HostSpec] = {}
    for spec in specs:
        if spec.name is not None:
            keys[("name", spec.name)] = spec
        else:
            keys[("uri", spec.uri, seen[spec.uri])] = spec
            seen[spec.uri] += 1
    return keys


@dataclass
class _Loaded:
    spec: HostSpec
    directory: HostDirectory | None  # None: not connected at the last load


class ConfigReloader:
    """The config file's hosts as last loaded, and what SIGHUP does with the file."""

    def __init__(self, path: str, config: Config, mount: Mount) -> None:
        self.path = path
        self.options = config.options
        self.mount = mount
        self._loaded: dict[Hashable, _Loaded] = {}
        self._lock = trio.Lock()

    def started(self, specs: list[HostSpec], directories: list[HostDirectory]) -> None:
        """The config's hosts as the mount brought them up (in the file's order)."""
        for (key, spec), directory in zip(keyed(specs).items(), directories, strict=True):
            self._loaded[key] = _Loaded(spec, directory)

    def _present(self, loaded: _Loaded | None) -> HostDirectory | None:
        """Its folder, if it is still under hosts/ (an rmdir may have taken it)."""
        if loaded is None or loaded.directory is None or loaded.directory.removed:
            return None
        shown = self.mount.hosts_directory.host_directories()
        return loaded.directory if shown.get(loaded.directory.name) is loaded.directory else None

    async def reload(self) -> None:
        async with self._lock:  # a second SIGHUP waits for the first reload
            log.info("received SIGHUP, reloading %s", self.path)
            try:
                config = load_config(self.path)
                plan = self._plan(config)
            except ConfigError as e:
                log.error("reloading %s: %s; nothing changed", self.path, e)
                return
            if config.options != self.options:
                log.warning("reloading %s: [mount] options are read at mount time only; "
                            "unmount and mount again to use %r", self.path, config.options)
            removed, connect = plan
            for key in removed:
                directory = self._present(self._loaded[key])
                if directory is None or await self._remove(directory):
                    del self._loaded[key]
            for key, spec in connect:
                await self._connect(key, spec)
            log.info("reloaded %s: hosts/ has %s", self.path,
                     ", ".join(self.mount.hosts_directory.host_directories()) or "no host")

    def _plan(self, config: Config) -> tuple[list[Hashable], list[tuple[Hashable, HostSpec]]]:
        """The keys whose folder goes, and the tables to connect; ConfigError if a table
        names a folder that is not the config's (a host of the command line, or mkdir's)."""
        new = keyed(config.hosts)
        removed = [key for key in self._loaded if key not in new]
        connect = [(key, spec) for key, spec in new.items()
                   if self._present(self._loaded.get(key)) is None
                   or _settings(self._loaded[key].spec) != _settings(spec)]
        ours = {d for d in (self._present(item) for item in self._loaded.values()) if d}
        for _, spec in connect:
            if spec.name is None:
                continue
            held = self.mount.hosts_directory.host_directories().get(spec.name)
            if held is not None and held not in ours:
                raise ConfigError(f"{spec.origin}: hosts/{spec.name} is a host of the command "
                                  f"line or of mkdir, which a reload does not replace")
        return removed, connect

    async def _remove(self, directory: HostDirectory) -> bool:
        try:
            await self.mount.hosts_directory.disconnect(directory)
        except OSError as e:
            log.error("reloading %s: %s stays: %s", self.path, directory.path,
                      e.strerror or e)
            return False
        log.info("reloading %s: %s removed", self.path, directory.path)
        return True

    async def _connect(self, key: Hashable, spec: HostSpec) -> None:
        """Connect first: a host that cannot be connected keeps its folder as it was."""
        old = self._present(self._loaded.get(key))
        try:
            host, read_only = await self.mount.connect_spec(spec)
        except OSError as e:
            log.error("reloading %s: cannot connect to %s (%s): %s", self.path,
                      spec.uri or "the default URI", spec.origin, e.strerror or e)
            if old is None:
                self._loaded[key] = _Loaded(spec, None)  # tried again at the next reload
            return
        try:
            if old is not None and not await self._remove(old):
                await host.connection.close()
                return
            name = spec.name or (old.name if old is not None else await self._name(host))
            check_name(name, spec.origin)
            directory = await self.mount.hosts_directory.add(name, host, read_only)
        except (OSError, ConfigError) as e:
            with trio.CancelScope(shield=True):
                await host.connection.close()
            log.error("reloading %s: %s: %s", self.path, spec.origin,
                      getattr(e, "strerror", None) or e)
            self._loaded[key] = _Loaded(spec, None)
            return
        except BaseException:
            with trio.CancelScope(shield=True):
                await host.connection.close()
            raise
        self._loaded[key] = _Loaded(spec, directory)
        log.info("reloading %s: %s %s (%s)", self.path, directory.path,
                 "connected again" if old is not None else "added", host.connection.where)

    async def _name(self, host: Host) -> str:
        name = short_name(await host.hostname(), await host.driver_type())
        taken = self.mount.hosts_directory.host_directories()
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}-{n}", n + 1
        return unique
