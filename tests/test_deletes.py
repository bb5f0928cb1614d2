"""Nothing is destroyed by accident (issue 7): tree-walking tools never remove an object.

`rmdir FOLDER` is the one way to remove an object.  Tools that delete recursively
(`find -delete`, `rm -rf`, `shutil.rmtree`, `rsync --delete`, `mv` across filesystems,
Node's `fs.rmSync`) first fail to unlink the served files, and then their `rmdir` of the
object folder is refused with ENOTEMPTY; programs whose `rmdir` is always part of a
recursive delete are refused outright (docs/writing.md, "rmdir").
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import xattr
from conftest import Mounted, expect_errno, info, run, sh, user_error, write_file

WEB = """<domain type='test'>
  <name>web</name>
  <memory unit='KiB'>131072</memory>
  <os><type>hvm</type></os>
</domain>
"""
POOL = """<pool type='dir'>
  <name>scratch</name>
  <target><path>{path}</path></target>
</pool>
"""
VOLUME = """<volume>
  <name>{name}</name>
  <capacity unit='MiB'>1</capacity>
  <target><format type='raw'/></target>
</volume>
"""


@pytest.fixture
def domains(demo: Mounted) -> Path:
    return demo.host() / "domains"


@pytest.fixture
def web(domains: Path) -> Path:
    """A defined, shut-off domain: nothing but the guard stops its removal."""
    os.mkdir(domains / "web")
    write_file(domains / "web" / "xml", WEB)
    return domains / "web"


@pytest.fixture
def volumes(demo: Mounted, tmp_path: Path) -> Path:
    """An active pool `scratch` with two volumes."""
    pool = demo.host() / "pools" / "scratch"
    (tmp_path / "pool").mkdir()
    os.mkdir(pool)
    write_file(pool / "xml", POOL.format(path=tmp_path / "pool"))
    sh(f"echo start > {pool / 'control'}")
    for name in ("a.img", "b.img"):
        os.mkdir(pool / "volumes" / name)
        write_file(pool / "volumes" / name / "xml", VOLUME.format(name=name))
    return pool / "volumes"


@pytest.fixture
def snaps(demo: Mounted) -> Path:
    """Two snapshots of the demo's domain."""
    snapshots = demo.host() / "domains" / "test" / "snapshots"
    sh(f"cd {snapshots} && mkdir s1 && mkdir s2")
    return snapshots


def still_there(web: Path) -> None:
    assert (web / "state").read_text() == "shutoff\n"
    assert (web / "xml").read_text() == WEB


def test_find_delete_removes_no_domain(web: Path, domains: Path) -> None:
    result = run("find", web, "-delete", check=False)
    assert result.returncode != 0
    still_there(web)
    result = run("find", domains, "-mindepth", "1", "-delete", check=False)
    assert result.returncode != 0
    still_there(web)
    assert sorted(os.listdir(domains)) == ["test", "web"]


def test_rm_rf_removes_no_domain_and_says_why(web: Path, domains: Path) -> None:
    result = run("rm", "-rf", web, check=False)
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr
    still_there(web)
    assert "rmdir /hosts/test/domains/web removes the domain" in user_error(web)
    # On purpose, right after: the first rmdir is taken for the end of the recursive
    # delete and refused, saying so; the second removes the domain.
    refused = run("rmdir", web, check=False)
    assert refused.returncode and "Directory not empty" in refused.stderr
    assert "run rmdir again" in user_error(domains)
    run("rmdir", web)
    assert os.listdir(domains) == ["test"]


def test_rmtree_ignoring_errors_removes_no_domain(web: Path, domains: Path) -> None:
    shutil.rmtree(web, ignore_errors=True)
    still_there(web)
    expect_errno(errno.ENOTEMPTY, os.rmdir, web)  # this program just tried to empty it
    assert "rmdir" in user_error(domains)


def test_plain_rmdir_removes_one_domain(web: Path, domains: Path) -> None:
    os.rmdir(web)  # python's os.rmdir, as any program's rmdir(2)
    assert os.listdir(domains) == ["test"]


def test_another_programs_rmdir_is_refused_once_right_after_a_recursive_delete(
        web: Path, domains: Path) -> None:
    sh(f"python3 -c 'import shutil; shutil.rmtree(\"{web}\", ignore_errors=True)'")
    still_there(web)
    refused = run("rmdir", web, check=False)
    assert refused.returncode and "Directory not empty" in refused.stderr
    assert "again" in user_error(domains)
    run("rmdir", web)  # on purpose, a second time
    assert os.listdir(domains) == ["test"]


@pytest.mark.parametrize("command", [
    "rm -d {web}",
    "rm -r {web}",
    "node -e 'require(\"fs\").rmSync(process.argv[1], {{recursive: true, force: true}})' {web}",
    "mv {web} {tmp}/moved",
    "rsync -a --delete {tmp}/empty/ {domains}/",
    "tar -C {domains} --unlink-first -xf {tmp}/web.tar",
])
def test_tools_that_delete_recursively_never_remove_a_domain(
        web: Path, domains: Path, tmp_path: Path, command: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "saved" / "web").mkdir(parents=True)
    (tmp_path / "saved" / "web" / "xml").write_text(WEB)
    run("tar", "-C", tmp_path / "saved", "-cf", tmp_path / "web.tar", "web")
    result = sh(command.format(web=web, domains=domains, tmp=tmp_path), check=False)
    assert result.returncode != 127, result.stderr  # the tool is installed (setup.sh)
    still_there(web)
    assert "web" in os.listdir(domains)


def test_find_delete_on_volumes_removes_no_volume(volumes: Path) -> None:
    result = run("find", volumes, "-mindepth", "1", "-delete", check=False)
    assert result.returncode != 0
    assert sorted(os.listdir(volumes)) == ["a.img", "b.img"]
    assert info(volumes / "a.img" / "info")["capacity"] == str(1024 * 1024)
    assert run("rmdir", volumes / "a.img", check=False).returncode  # taken for find's
    run("rmdir", volumes / "a.img")  # on purpose
    assert os.listdir(volumes) == ["b.img"]


def test_rmtree_on_snapshots_removes_no_snapshot(snaps: Path) -> None:
    shutil.rmtree(snaps, ignore_errors=True)
    assert sorted(os.listdir(snaps)) == ["current", "s1", "s2"]
    run("find", snaps, "-delete", check=False)
    run("rm", "-rf", snaps / "s2", check=False)
    assert sorted(os.listdir(snaps)) == ["current", "s1", "s2"]
    assert run("rmdir", snaps / "s2", check=False).returncode  # taken for rm's
    run("rmdir", snaps / "s2")  # on purpose
    assert sorted(os.listdir(snaps)) == ["current", "s1"]


def test_rsync_delete_over_a_domain_folder_removes_no_snapshot(snaps: Path,
                                                              tmp_path: Path) -> None:
    domain = snaps.parent
    (tmp_path / "empty").mkdir()
    run("rsync", "-a", "--delete", f"{tmp_path / 'empty'}/", f"{domain}/", check=False)
    assert sorted(os.listdir(snaps)) == ["current", "s1", "s2"]
    assert (domain / "state").read_text() == "running\n"


def test_pending_folders_go_with_any_tool(domains: Path) -> None:
    """A pending folder exists only in this mount: removing it loses nothing."""
    os.mkdir(domains / "draft")
    run("rm", "-rf", domains / "draft")
    assert os.listdir(domains) == ["test"]


def test_names_longer_than_255_bytes_are_refused_at_mkdir(domains: Path) -> None:
    expect_errno(errno.ENAMETOOLONG, os.mkdir, domains / ("x" * 256))
    assert "255" in user_error(domains)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, domains / ("é" * 128))  # 256 bytes
    os.mkdir(domains / ("x" * 255))
    os.rmdir(domains / ("x" * 255))


def test_a_renamed_domain_is_writable_under_its_new_name_at_once(web: Path,
                                                                 domains: Path) -> None:
    sh(f"cat {web / 'xml'} > /dev/null && mv {web} {domains / 'www'} && "
       f"sed -i 's/131072/65536/' {domains / 'www' / 'xml'}")
    www = domains / "www"
    assert info(www / "info")["max-memory"] == "65536"
    assert "<name>www</name>" in (www / "xml").read_text()


def test_undefine_flags_are_checked_at_setfattr(domains: Path) -> None:
    run("setfattr", "-n", "user.undefine-flags", "-v", "managed-save, nvram", domains)
    assert run("getfattr", "-n", "user.undefine-flags", "--only-values", domains
               ).stdout == "managed-save,nvram"
    expect_errno(errno.EINVAL, xattr.setxattr, str(domains), "user.undefine-flags",
                 b"everything")
    assert "managed-save, snapshots-metadata, checkpoints-metadata, nvram, keep-nvram" in \
        user_error(domains)
    expect_errno(errno.EINVAL, xattr.setxattr, str(domains), "user.undefine-flags",
                 b"nvram,keep-nvram")
    assert "choose one" in user_error(domains)
    run("setfattr", "-x", "user.undefine-flags", domains)
    assert "user.undefine-flags" not in xattr.listxattr(str(domains))


def test_halt_is_used_by_one_snapshot_only(demo: Mounted) -> None:
    domain = demo.host() / "domains" / "test"
    snaps = domain / "snapshots"
    run("setfattr", "-n", "user.flags", "-v", "halt", snaps)
    run("mkdir", snaps / "halted")
    assert (domain / "state").read_text() == "shutoff\n"
    assert "user.flags" not in xattr.listxattr(str(snaps))  # used up
    sh(f"echo start > {domain / 'control'}")
    run("mkdir", snaps / "later")  # by anyone, later: no halt
    assert (domain / "state").read_text() == "running\n"
    # A refused mkdir uses nothing up.
    run("setfattr", "-n", "user.flags", "-v", "halt,disk-only", snaps)
    assert run("mkdir", snaps / "refused", check=False).returncode
    assert run("getfattr", "-n", "user.flags", "--only-values", snaps
               ).stdout == "halt,disk-only"
    # redefine (restoring saved snapshots, one mkdir each) stays until changed.
    run("setfattr", "-n", "user.flags", "-v", "redefine", snaps)
    run("mkdir", snaps / "pending")
    assert run("getfattr", "-n", "user.flags", "--only-values", snaps).stdout == "redefine"


def test_rmdir_of_a_pending_name_never_removes_what_someone_else_defined(
        mount_factory) -> None:
    # Two host folders, two connections to the one test:///default of the mount process.
    mounted = mount_factory("test:///default", "other=test:///default")
    mine, theirs = mounted.host("test") / "domains", mounted.host("other") / "domains"
    os.mkdir(mine / "web")  # pending, in my folder only
    os.mkdir(theirs / "web")
    write_file(theirs / "web" / "xml", WEB)  # someone else defines web meanwhile
    os.rmdir(mine / "web")  # forgets my pending folder...
    assert (theirs / "web" / "state").read_text() == "shutoff\n"  # ...and nothing else
    assert (mine / "web" / "xml").read_text() == WEB


def test_rmdir_of_a_pending_folder_being_defined_is_ebusy(mount_factory, tmp_path: Path,
                                                          monkeypatch) -> None:
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    mounted = mount_factory("test:///default")
    domains = mounted.host() / "domains"
    os.mkdir(domains / "web")
    rules.write_text("test:///default delay 0.5\n")  # every libvirt call is slow now
    writer = threading.Thread(target=write_file, args=(domains / "web" / "xml", WEB))
    writer.start()
    time.sleep(0.2)
    try:
        expect_errno(errno.EBUSY, os.rmdir, domains / "web")
        assert "being defined" in user_error(domains)
    finally:
        writer.join()
        rules.write_text("")
    assert (domains / "web" / "state").read_text() == "shutoff\n"


def test_mv_of_a_pending_folder_being_defined_is_ebusy(mount_factory, tmp_path: Path,
                                                       monkeypatch) -> None:
    """The define names the domain by the folder's name: a rename meanwhile would leave a
    folder called www serving the domain web."""
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    mounted = mount_factory("test:///default")
    domains = mounted.host() / "domains"
    os.mkdir(domains / "web")
    rules.write_text("test:///default delay 2 define\n")  # the define alone is slow
    writer = threading.Thread(target=write_file, args=(domains / "web" / "xml", WEB))
    writer.start()
    time.sleep(0.5)
    try:
        expect_errno(errno.EBUSY, os.rename, domains / "web", domains / "www")
        assert "being defined" in user_error(domains)
    finally:
        writer.join()
        rules.write_text("")
    assert sorted(os.listdir(domains)) == ["test", "web"]
    assert (domains / "web" / "state").read_text() == "shutoff\n"


def test_two_shells_starting_one_domain_at_once(mount_factory, tmp_path: Path,
                                               monkeypatch) -> None:
    """One start wins; the other is refused as any start of a running domain is (EBUSY),
    never libvirt's internal error."""
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    mounted = mount_factory("test:///default")
    web = mounted.host() / "domains" / "web"
    os.mkdir(web)
    write_file(web / "xml", WEB)
    rules.write_text("test:///default delay 0.3\n")  # widen the race
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda _: sh(f"echo start > {web / 'control'}", check=False), range(2)))
    rules.write_text("")
    assert sorted(r.returncode for r in results) == [0, 1], results
    refused = next(r for r in results if r.returncode)
    assert "Device or resource busy" in refused.stderr, refused.stderr
    assert (web / "state").read_text() == "running\n"


def test_rmdir_racing_start_never_leaves_a_transient_domain(web: Path, domains: Path,
                                                            demo: Mounted) -> None:
    """Both cannot succeed: either the domain starts and rmdir is EBUSY, or it is
    undefined and start fails.  A running domain that is no longer defined would be
    a transient one that vanishes at its next shutdown."""
    for _ in range(5):
        results: dict[str, int] = {}

        def start(results: dict[str, int] = results) -> None:
            results["start"] = sh(f"echo start > {web / 'control'}", check=False).returncode

        def remove(results: dict[str, int] = results) -> None:
            results["rmdir"] = run("rmdir", web, check=False).returncode

        threads = [threading.Thread(target=start), threading.Thread(target=remove)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results["start"] or results["rmdir"], "both reported success"
        if results["rmdir"]:  # still defined: stop it for the next round
            assert (web / "state").read_text() == "running\n"
            sh(f"echo destroy > {web / 'control'}")
        else:
            assert "web" not in os.listdir(domains)
            os.mkdir(web)
            write_file(web / "xml", WEB)


WALKER = """
import os, sys, threading
web = sys.argv[1]
def unlink_all():
    for name in os.listdir(web):
        try:
            os.unlink(os.path.join(web, name))
        except OSError:
            pass
worker = threading.Thread(target=unlink_all)
worker.start(); worker.join()
results = []
for _ in range(2):  # another thread of the same program, twice
    def remove():
        try:
            os.rmdir(web)
            results.append(0)
        except OSError as e:
            results.append(e.errno)
    thread = threading.Thread(target=remove)
    thread.start(); thread.join()
print(results)
"""


def test_a_threaded_walker_is_one_program(web: Path) -> None:
    """FUSE names the calling thread; the guard knows the program (its thread group)."""
    result = run(sys.executable, "-c", WALKER, web)
    assert result.stdout.strip() == f"[{errno.ENOTEMPTY}, {errno.ENOTEMPTY}]"
    still_there(web)


def test_rmtree_removes_no_pool(volumes: Path) -> None:
    pool = volumes.parent
    sh(f"echo stop > {pool / 'control'}")  # an inactive pool: rmdir alone would undefine it
    shutil.rmtree(pool, ignore_errors=True)
    assert (pool / "state").read_text() == "inactive\n"
    sh(f"echo start > {pool / 'control'}")
    assert sorted(os.listdir(volumes)) == ["a.img", "b.img"]


def test_snapshots_metadata_lets_rmdir_undefine_a_domain_with_snapshots(
        web: Path, domains: Path) -> None:
    os.mkdir(web / "snapshots" / "s1")
    expect_errno(errno.ENOTEMPTY, os.rmdir, web)
    assert "has snapshots" in user_error(domains)
    run("setfattr", "-n", "user.undefine-flags", "-v", "snapshots-metadata", domains)
    os.rmdir(web)
    assert os.listdir(domains) == ["test"]
