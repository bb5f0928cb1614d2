"""The soak test (issue 10): sixteen clients read, write, control and snapshot through one
mount for a bounded time; the filesystem must not grow, must refuse only what the
situation explains, and must end with the tree libvirt has.

The workload and the verdicts are in tests/soak.py; docs/testbed.md says what is asserted.
In CI each run is short (LIBVIRTFS_SOAK_SECONDS unset); `bash contrib/soak.sh --minutes 60`
runs the same tests for an hour.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from conftest import Mounted, eventually, guest_xml, libvirtd_clients_of, run, sh, write_file
from inprocess import InProcessMount, allow_in_a_thread
from soak import Soak, growths, libvirt_view, mount_view, run_soak

LONG = float(os.environ.get("LIBVIRTFS_SOAK_SECONDS", "0"))
DOMAINS = 4  # four clients each: a controller, a snapshotter, a writer, a reader

TEST_GUEST = """<domain type='test'>
  <name>{name}</name>
  <description>soak</description>
  <memory unit='MiB'>64</memory>
  <os><type>hvm</type></os>
</domain>
"""


def define_and_start(host: Path, names: list[str], document) -> None:
    """mkdir, cp of the document, echo start: the way a user brings up a guest."""
    for name in names:
        folder = host / "domains" / name
        folder.mkdir()
        write_file(folder / "xml", document(name))
        sh(f"echo start > {folder / 'control'}")
        assert (folder / "state").read_text() == "running\n"


def check(soak: Soak, host: Path, conn: libvirt.virConnect, prefix: str,
          tmp_path: Path) -> None:
    soak.save(tmp_path / "samples.csv")
    print(soak.summary(), f"\n  samples: {tmp_path / 'samples.csv'}")
    unexpected = soak.unexpected()
    assert not unexpected, f"{len(unexpected)} unexpected errors:\n" + "\n".join(
        unexpected[:40])
    # Every role did its work, or the soak proved nothing.
    for role, ops in {"controller": ("start", "destroy", "suspend", "resume"),
                      "snapshotter": ("mkdir snapshot", "rmdir snapshot", "setfattr"),
                      "writer": ("sed -i", "tee", "python"),
                      "reader": ("cat", "read xml", "ls -l")}.items():
        done = soak.done(role)
        assert all(done[op] for op in ops), f"the {role}s did too little: {dict(done)}"
    assert len(soak.samples) >= 9, f"only {len(soak.samples)} samples"
    assert not growths(soak.samples), "\n".join(growths(soak.samples))
    if soak.samples[0].clients is not None:
        # One connection to libvirtd for the one host, at every sample: none leaked, none
        # lost and replaced.
        assert {s.clients for s in soak.samples} == {1}, [s.clients for s in soak.samples]

    def same_tree() -> None:
        truth = libvirt_view(conn, prefix)
        assert len(truth) == DOMAINS, truth
        assert mount_view(host, prefix) == truth

    eventually(same_tree, timeout=10)


@pytest.fixture
def prefix() -> str:
    return f"soak-{uuid.uuid4().hex[:6]}-"


@pytest.fixture
def qemu_domains(qemu_uri: str, prefix: str, tmp_path: Path) -> Iterator[list[str]]:
    """The soak's guests' names; the test defines them, this removes them whatever
    happens."""
    names = [f"{prefix}{n}" for n in range(DOMAINS)]
    for name in names:
        run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / f"{name}.qcow2", "16M")
    yield names
    for name in names:
        run("virsh", "-c", qemu_uri, "destroy", name, check=False)
        run("virsh", "-c", qemu_uri, "undefine", "--snapshots-metadata", "--managed-save",
            name, check=False)


@pytest.mark.qemu
def test_soak_on_qemu(mount_factory, qemu_uri: str, qemu_domains: list[str], prefix: str,
                      tmp_path: Path) -> None:
    mounted: Mounted = mount_factory(f"lab={qemu_uri}")
    host = mounted.host("lab")
    define_and_start(host, qemu_domains, lambda name: guest_xml(
        name, tmp_path / f"{name}.qcow2", description="soak"))
    count = None
    if qemu_uri == "qemu:///system" and shutil.which("virt-admin"):
        count = libvirtd_clients_of
    else:
        print(f"libvirtd's clients are not counted: virt-admin reaches the local daemon, "
              f"not {qemu_uri}")
    soak = run_soak(host, qemu_domains, LONG or 75, mounted.process.pid, tmp_path,
                    count_clients=count, progress=bool(LONG))
    conn = libvirt.open(qemu_uri)
    try:
        check(soak, host, conn, prefix, tmp_path)
    finally:
        conn.close()


def test_soak_on_the_test_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 prefix: str) -> None:
    """test:///default lives in the process that opens it: the mount runs in this process
    (tests/inprocess.py) so that libvirt-python sees the same host; the clients are
    processes of their own, and the samples are of this process."""
    allow_in_a_thread(monkeypatch)
    monkeypatch.chdir(tmp_path)
    mount = InProcessMount(tmp_path / "mnt", "test:///default")
    # It keeps the errors it must fail on, not every refusal's warning: those would grow
    # this process (the one sampled) by a kilobyte each.
    mount.log.setLevel(logging.ERROR)
    conn = libvirt.open("test:///default")
    names = [f"{prefix}{n}" for n in range(DOMAINS)]
    try:
        mount.start()
        host = mount.path / "hosts" / "test"
        define_and_start(host, names, lambda name: TEST_GUEST.format(name=name))
        soak = run_soak(host, names, LONG or 25, os.getpid(), tmp_path, progress=bool(LONG))
        check(soak, host, conn, prefix, tmp_path)
    finally:
        mount.stop()
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        conn.close()
