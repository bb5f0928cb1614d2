"""The layers keep to themselves: libvirt only in drivers/, pyfuse3 only in vfs/ and mount/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ALLOWED = {"libvirt": {"drivers"}, "libvirtaio": {"drivers"}, "pyfuse3": {"vfs", "mount"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", ["drivers", "nodes", "vfs", "mount"])
def test_imports_stay_in_their_layer(folder: str) -> None:
    for path in (REPO / folder).rglob("*.py"):
        for module, allowed in ALLOWED.items():
            if module in imported_modules(path):
                assert folder in allowed, f"{path.relative_to(REPO)} imports {module}"


def test_package_installs_under_one_name() -> None:
    import libvirtfs.drivers
    import libvirtfs.mount
    import libvirtfs.nodes
    import libvirtfs.vfs

    for module, folder in [(libvirtfs.drivers, "drivers"), (libvirtfs.nodes, "nodes"),
                           (libvirtfs.vfs, "vfs"), (libvirtfs.mount, "mount")]:
        assert Path(module.__file__).parent == REPO / folder


def test_the_tree_loads_neither_libvirt_nor_lxml() -> None:
    # nodes/ speaks the tree's words only (nodes/words.py, nodes/backend.py): importing
    # every node module in a fresh interpreter must not pull in libvirt or lxml.
    modules = sorted(f"libvirtfs.nodes.{path.stem}" for path in (REPO / "nodes").glob("*.py"))
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('libvirt', 'lxml')\n"
              "             or m.startswith('libvirtfs.drivers')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_drivers_translate_every_word_of_the_tree() -> None:
    from libvirtfs.drivers import snapshots, states
    from libvirtfs.drivers.control import ACTIONS, UNDEFINE_FLAGS
    from libvirtfs.nodes import words

    assert {kind: list(actions) for kind, actions in ACTIONS.items()} == words.CONTROL_WORDS
    assert list(UNDEFINE_FLAGS) == words.UNDEFINE_FLAGS
    assert states.DOMAIN_STATES == words.DOMAIN_STATES
    assert set(words.DOMAIN_WORDS_BY_STATE) == set(words.DOMAIN_STATES)
    for valid in words.DOMAIN_WORDS_BY_STATE.values():
        assert set(valid) <= set(words.CONTROL_WORDS["domain"])
    assert list(snapshots.CREATE_FLAGS) == words.SNAPSHOT_CREATE_FLAGS
    assert words.SNAPSHOT_REDEFINE_FLAGS.issubset(words.SNAPSHOT_CREATE_FLAGS)
    assert list(snapshots.DELETE_FLAGS) == words.SNAPSHOT_DELETE_FLAGS
    assert list(snapshots.REVERT_WORDS) == words.SNAPSHOT_REVERT_WORDS
    # reset-nvram needs libvirt 8.5; an older one refuses it with EOPNOTSUPP.
    assert set(snapshots.REVERT_MODIFIERS) <= set(words.SNAPSHOT_REVERT_MODIFIERS)


def test_the_host_gives_what_the_tree_asks_of_it() -> None:
    # nodes/backend.py says what nodes call; drivers.host.Host must answer all of it alike.
    import inspect

    from libvirtfs.drivers.host import Host
    from libvirtfs.nodes import backend

    def parameters(function: object) -> list[str]:
        return [p for p in inspect.signature(function).parameters if p != "self"]

    asked = {name: value for name, value in vars(backend.Host).items()
             if not name.startswith("_") and callable(value)}
    assert asked
    for name, value in asked.items():
        given = getattr(Host, name, None)
        assert given is not None, f"drivers.host.Host lacks {name}"
        assert parameters(given) == parameters(value), name
        assert inspect.iscoroutinefunction(given) == inspect.iscoroutinefunction(value), name
    assert isinstance(Host.max_document_bytes, int)
