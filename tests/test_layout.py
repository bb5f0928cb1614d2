"""The layers keep to themselves: libvirt only in drivers/, pyfuse3 only in vfs/ and mount/."""

from __future__ import annotations

import ast
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
