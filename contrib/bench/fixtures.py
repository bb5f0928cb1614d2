"""The benchmark's hosts: test-driver node files it writes, and 200 domains it defines on
the shared QEMU test bed (and undefines again)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

QEMU_URI = "qemu:///system"
QEMU_SOCKET = "/run/libvirt/libvirt-sock"
QEMU_PREFIX = "bench-"
QEMU_NAME = re.compile(r"^bench-\d{3}$")  # only these are ever undefined

CPU = ("<cpu><mhz>2000</mhz><model>i686</model><active>4</active><nodes>1</nodes>"
       "<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>")


def test_names(count: int) -> list[str]:
    return [f"vm-{i:05d}" for i in range(count)]


def write_test_host(folder: Path, count: int) -> Path:
    """A test:/// node file with `count` running domains vm-00000, vm-00001, ..."""
    path = folder / f"host-{count}.xml"
    parts = ["<node>", CPU, "<memory>8388608</memory>"]
    parts += [f"<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>"
              f"<os><type>hvm</type></os></domain>" for name in test_names(count)]
    parts.append("</node>")
    path.write_text("\n".join(parts))
    return path


def qemu_names(count: int) -> list[str]:
    return [f"{QEMU_PREFIX}{i:03d}" for i in range(count)]


def start_testbed(repo: Path) -> str | None:
    """`contrib/qemu-testbed.sh start` (idempotent; never stopped here: it is shared)."""
    try:
        result = subprocess.run(["bash", str(repo / "contrib/qemu-testbed.sh"), "start"],
                                capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return QEMU_URI if result.returncode == 0 else None


def _domain_xml(name: str) -> str:
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices/></domain>")


def define_qemu(count: int) -> list[str]:
    """Define bench-000 ... (not started); leftovers of an interrupted run go first."""
    import libvirt
    undefine_qemu()
    conn = libvirt.open(QEMU_URI)
    try:
        names = qemu_names(count)
        for name in names:
            conn.defineXML(_domain_xml(name))
        return names
    finally:
        conn.close()


def undefine_qemu() -> int:
    """Undefine every domain named bench-NNN, and only those."""
    import libvirt
    conn = libvirt.open(QEMU_URI)
    removed = 0
    try:
        for dom in conn.listAllDomains(0):
            if not QEMU_NAME.match(dom.name()):
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                  | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                removed += 1
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()
    return removed
