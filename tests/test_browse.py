"""Browsing a mount with ls, cat, stat, find, grep and tar, compared with what virsh says."""

from __future__ import annotations

import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import Mounted, eventually, run, sh
from test_bench import counters

DEMO = "test:///default"


def virsh(*args: str) -> str:
    # virsh prints blank lines after an XML document; the files hold the document itself.
    return run("virsh", "-c", DEMO, *args).stdout.rstrip("\n") + "\n"


def test_ls_R_shows_the_whole_tree(demo: Mounted) -> None:
    listing = sh(f"cd {demo.path} && find . | sort").stdout.split()
    assert listing == sorted([
        ".", "./hosts", "./hosts/test",
        "./hosts/test/uri", "./hosts/test/status", "./hosts/test/info",
        "./hosts/test/capabilities.xml",
        "./hosts/test/domains", "./hosts/test/domains/test",
        *[f"./hosts/test/domains/test/{f}"
          for f in ("state", "info", "xml", "live.xml", "job", "autostart", "control",
                    "snapshots", "disks", "disks/vda")],
        *[f"./hosts/test/domains/test/disks/vda/{f}"
          for f in ("xml", "live.xml", "info", "chain", "stats", "job", "control")],
        "./hosts/test/pools", "./hosts/test/pools/default-pool",
        *[f"./hosts/test/pools/default-pool/{f}"
          for f in ("state", "info", "xml", "autostart", "control", "volumes")],
        "./hosts/test/networks", "./hosts/test/networks/default",
        *[f"./hosts/test/networks/default/{f}"
          for f in ("state", "info", "xml", "autostart", "control")],
    ])
    assert run("ls", "-R", demo.path).returncode == 0


def test_cat_equals_virsh(demo: Mounted) -> None:
    host = demo.host()
    dom = host / "domains" / "test"
    assert (host / "uri").read_text() == DEMO + "\n"
    assert (host / "capabilities.xml").read_text() == virsh("capabilities")
    assert (dom / "state").read_text() == virsh("domstate", "test").strip() + "\n"
    assert (dom / "xml").read_text() == virsh("dumpxml", "--inactive", "test")
    assert (dom / "live.xml").read_text() == virsh("dumpxml", "test")
    assert (dom / "autostart").read_text() == "0\n"
    pool = host / "pools" / "default-pool"
    assert (pool / "xml").read_text() == virsh("pool-dumpxml", "default-pool")
    assert (pool / "state").read_text() == "running\n"
    net = host / "networks" / "default"
    assert (net / "xml").read_text() == virsh("net-dumpxml", "default")
    assert (net / "state").read_text() == "active\n"


def test_info_files_are_key_value_lines(demo: Mounted) -> None:
    info = dict(line.split(": ", 1)
                for line in (demo.host() / "domains/test/info").read_text().splitlines())
    dominfo = {k.strip(): v.strip() for k, v in
               (line.split(":", 1) for line in virsh("dominfo", "test").splitlines() if line)}
    assert info["uuid"] == dominfo["UUID"]
    assert info["id"] == dominfo["Id"]
    assert info["state"] == "running"
    assert info["vcpus"] == dominfo["CPU(s)"]
    assert info["max-memory"] + " KiB" == dominfo["Max memory"]
    assert info["memory"] + " KiB" == dominfo["Used memory"]
    assert info["persistent"] == dominfo["Persistent"]
    assert set(info) >= {"reason", "cpu-time", "autostart", "managed-save"}

    host_info = dict(line.split(": ", 1)
                     for line in (demo.host() / "info").read_text().splitlines())
    nodeinfo = {k.strip(): v.strip() for k, v in
                (line.split(":", 1) for line in virsh("nodeinfo").splitlines() if line)}
    assert host_info["cpus"] == nodeinfo["CPU(s)"]
    assert host_info["memory"] + " KiB" == nodeinfo["Memory size"]
    assert host_info["hostname"] == virsh("hostname").strip()


def test_st_size_is_what_cat_reads(demo: Mounted) -> None:
    files = sh(f"find {demo.path} -type f").stdout.split()
    assert len(files) == 28  # with status, domains/test/job and disks/vda/*
    for name in files:
        assert os.stat(name).st_size == len(Path(name).read_bytes()), name


def test_tar_holds_what_cat_shows(mount_factory, tmp_path: Path) -> None:
    # A long cache keeps cpu-time still between tar's read and cat's.
    mounted = mount_factory(DEMO, options="cache_timeout=60")
    archive = tmp_path / "tree.tar"
    run("tar", "-cf", archive, "-C", mounted.path, "hosts")
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name, member in members.items():
            if member.isfile():
                data = tar.extractfile(member).read()
                assert data == (mounted.path / name).read_bytes(), name
                # `job` is empty until a job runs (hosts.md, Jobs); all else says something.
                assert data or name.endswith("/job"), name
    assert "hosts/test/domains/test/xml" in members


def test_timestamps_are_real(demo: Mounted) -> None:
    for name in ("hosts", "hosts/test/domains/test/state", "hosts/test/domains"):
        assert os.stat(demo.path / name).st_mtime > 1_600_000_000


def test_grep_r_finds_running_domains(demo: Mounted) -> None:
    out = sh(f"cd {demo.host()} && grep -r '^running$' domains").stdout
    assert out == "domains/test/state:running\n"
    out = sh(f"grep -rl 'default-pool' {demo.host()}/pools").stdout.split()
    assert f"{demo.host()}/pools/default-pool/xml" in out


def test_inode_numbers_are_stable(demo: Mounted) -> None:
    state = demo.host() / "domains/test/state"
    first = os.stat(state).st_ino
    run("ls", "-lR", demo.path)
    assert os.stat(state).st_ino == first
    assert os.stat(demo.path).st_ino == 1


def test_several_readers_at_once(demo: Mounted) -> None:
    dom = demo.host() / "domains/test"
    expected = {name: (dom / name).read_bytes() for name in ("xml", "state", "live.xml")}

    def reader(i: int) -> None:
        for _ in range(20):
            name = ("xml", "state", "live.xml")[i % 3]
            assert (dom / name).read_bytes() == expected[name]
            assert run("ls", "-R", demo.host() / "pools").returncode == 0

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(reader, range(8)))


def test_thousand_domains_list_completely_and_once(big: Mounted) -> None:
    domains = big.host("big") / "domains"
    names = os.listdir(domains)
    assert len(names) == len(set(names)) == 1004
    found = sh(f"find {domains} -mindepth 1 -maxdepth 1 -type d").stdout.splitlines()
    assert len(found) == 1004
    assert run("ls", domains).stdout.count("vm-") == 1000
    assert (domains / "vm-0999" / "state").read_text() == "running\n"


def test_odd_names_are_escaped_reversibly(big: Mounted) -> None:
    domains = big.host("big") / "domains"
    names = set(os.listdir(domains))
    assert {"%2E", "%2E%2E", "per%25cent", "tab\tname"} <= names
    info = (domains / "%2E%2E" / "info").read_text()
    assert "name: ..\n" in info
    assert "name: per%cent\n" in (domains / "per%25cent" / "info").read_text()


def test_missing_names_are_probed_without_a_listing_each(mount_factory, big_host_xml: Path,
                                                        monkeypatch) -> None:
    # Shells and editors probe names that do not exist (stat, PATH searches, swap files).
    monkeypatch.setenv("LIBVIRTFS_COUNT_CALLS", "1")
    mounted = mount_factory(f"big=test://{big_host_xml}", options="cache_timeout=30")
    domains = mounted.host("big") / "domains"
    probe = f"cd {domains} && stat " + " ".join(f"nosuch{i}" for i in range(1000))
    assert len(os.listdir(domains)) == 1004
    before = counters(mounted)
    result = sh(probe, check=False)
    assert result.returncode == 1 and result.stderr.count("No such file") == 1000
    after = counters(mounted)
    # One lookup per missing name; the `cd` may walk hosts/big/domains again (up to 3).
    assert 1000 <= after["fuse.lookup"] - before["fuse.lookup"] <= 1003
    assert after["libvirt.total"] == before["libvirt.total"]  # answered from the listing

    sh(probe, check=False)  # again: the kernel remembers them, nobody asks us
    assert counters(mounted)["fuse.lookup"] == after["fuse.lookup"]

    run("mkdir", domains / "nosuch7")  # a remembered miss made here is there at once
    assert (domains / "nosuch7").is_dir()
    assert "nosuch7" in os.listdir(domains)


def test_many_lookups_do_not_grow_memory(big: Mounted) -> None:
    domains = big.host("big") / "domains"
    names = [f"vm-{i:04d}" for i in range(1000)]

    def lookups() -> None:
        for _ in range(20):
            for name in names:
                os.stat(domains / name / "snapshots")
            sh("echo 2 > /proc/sys/vm/drop_caches")  # the kernel forgets; so must we

    def rss_kib() -> int:
        status = Path(f"/proc/{big.process.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])

    lookups()
    before = rss_kib()
    lookups()  # 20,000 more lookups of the same objects
    assert rss_kib() - before < 8 * 1024


def test_state_mtime_moves_when_the_state_changes(demo: Mounted) -> None:
    dom = demo.host() / "domains/test"
    before = os.stat(dom / "state").st_mtime
    time.sleep(1.1)
    assert os.stat(dom / "state").st_mtime == before  # nothing changed, nothing moves
    (dom / "control").write_text("suspend\n")
    assert (dom / "state").read_text() == "paused\n"

    def moved() -> None:
        assert os.stat(dom / "state").st_mtime > before

    eventually(moved, timeout=3)
