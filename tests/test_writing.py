"""Steering libvirt by writing files, with the tools users write with (issue 3)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import xattr
from conftest import Mounted, expect_errno, info, run, sh, user_error, write_file

WEB = """<domain type='test'>
  <name>web</name>
  <memory unit='KiB'>131072</memory>
  <os><type>hvm</type></os>
  <devices>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>
"""










@pytest.fixture
def web(demo: Mounted, tmp_path: Path) -> Path:
    """A defined domain `web`, made the way a user would: mkdir, then cp."""
    source = tmp_path / "web.xml"
    source.write_text(WEB)
    folder = demo.host() / "domains" / "web"
    run("mkdir", folder)
    run("cp", source, folder / "xml")
    return folder


def test_mkdir_and_cp_define_a_domain(web: Path) -> None:
    assert (web / "state").read_text() == "shutoff\n"
    assert (web / "xml").read_text() == WEB  # read-your-writes: the bytes as written
    assert info(web / "info")["memory"] == "131072"
    assert sorted(os.listdir(web)) == ["autostart", "control", "disks", "info", "job",
                                      "live.xml", "snapshots", "state", "xml"]
    assert os.stat(web / "xml").st_size == len(WEB)


def test_pending_folder_until_xml_is_written(demo: Mounted) -> None:
    domains = demo.host() / "domains"
    os.mkdir(domains / "draft")
    assert os.listdir(domains / "draft") == []  # empty, so that cp -r can create xml
    assert "draft" in os.listdir(domains)
    os.rmdir(domains / "draft")
    assert "draft" not in os.listdir(domains)
    expect_errno(errno.EEXIST, os.mkdir, domains / "test")


def test_every_way_of_writing(web: Path, tmp_path: Path) -> None:
    xml = web / "xml"

    def doc(memory: int) -> str:
        return WEB.replace("131072", str(memory))

    sh(f"cat > {xml} <<'EOF'\n{doc(140000)}EOF")
    assert info(web / "info")["max-memory"] == "140000"
    sh(f"printf '%s' \"$(cat <<'EOF'\n{doc(150000)}EOF\n)\" | tee {xml} >/dev/null")
    assert info(web / "info")["max-memory"] == "150000"
    (tmp_path / "d.xml").write_text(doc(160000))
    sh(f"dd if={tmp_path / 'd.xml'} of={xml} status=none")
    assert info(web / "info")["max-memory"] == "160000"
    write_file(xml, doc(170000))
    assert info(web / "info")["max-memory"] == "170000"
    with open(xml, "r+") as f:  # truncate through the open handle, then write
        f.truncate(0)
        f.write(doc(180000))
    assert info(web / "info")["max-memory"] == "180000"
    assert xml.read_text() == doc(180000)


def test_append_makes_a_document_that_is_refused(web: Path) -> None:
    result = sh(f"echo '<extra/>' >> {web / 'xml'}", check=False)
    assert result.returncode == 0  # the shell does not report close() errors...
    assert "malformed XML" in user_error(web / "xml")  # ...but the file does
    assert (web / "xml").read_text() == WEB
    expect_errno(errno.EINVAL, write_file, web / "xml", WEB + "<extra/>\n")


def test_truncate_alone_is_an_empty_document(web: Path) -> None:
    result = run("truncate", "-s", "0", web / "xml", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert user_error(web / "xml") == "empty document"
    assert (web / "xml").read_text() == WEB


def test_sed_i_replaces_atomically(web: Path) -> None:
    run("sed", "-i", "s/131072/262144/", web / "xml")
    assert info(web / "info")["max-memory"] == "262144"
    assert (web / "xml").read_text() == WEB.replace("131072", "262144")
    assert not [n for n in os.listdir(web) if n.startswith("sed")]
    run("sed", "-i", "s/262144/300000/", web / "xml")  # and again, at once
    assert "300000" in (web / "xml").read_text()


def test_sed_i_with_a_bad_result_loses_nothing(web: Path) -> None:
    result = run("sed", "-i", "s/<name>web</<name>other</", web / "xml", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert "folder of 'web'" in user_error(web / "xml")
    assert (web / "xml").read_text() == WEB


def test_vim_edits_in_place(web: Path) -> None:
    result = run("vim", "-u", "NONE", "-es", "-c", "%s/131072/196608/", "-c", "wq",
                 web / "xml", check=False, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert info(web / "info")["max-memory"] == "196608"
    assert sorted(os.listdir(web)) == ["autostart", "control", "disks", "info", "job",
                                      "live.xml", "snapshots", "state", "xml"]


def test_metadata_changes_are_accepted_harmlessly(web: Path) -> None:
    xml = web / "xml"
    run("chmod", "600", xml)
    run("chown", "root:root", xml)
    run("touch", "-d", "2020-01-01", xml)
    assert run("setfacl", "-m", "u:root:rw", xml, check=False).returncode in (0, 1)
    assert xml.read_text() == WEB
    expect_errno(errno.EPERM, os.unlink, xml)
    expect_errno(errno.EPERM, os.rename, xml, web / "moved")


def test_scratch_files_live_beside_served_ones(web: Path) -> None:
    (web / "notes.txt").write_text("hello")
    assert "notes.txt" in os.listdir(web)
    assert (web / "notes.txt").read_text() == "hello"
    os.rename(web / "notes.txt", web / "notes2.txt")
    assert (web / "notes2.txt").read_text() == "hello"
    os.unlink(web / "notes2.txt")
    assert "notes2.txt" not in os.listdir(web)


def test_identity_is_kept_when_a_short_document_leaves_it_out(web: Path) -> None:
    uuid = info(web / "info")["uuid"]
    mac = sh(f"grep -o \"mac address='[^']*'\" {web / 'live.xml'}").stdout
    assert mac
    short = WEB.replace("131072", "65536")
    write_file(web / "xml", short)
    assert info(web / "info")["uuid"] == uuid
    assert sh(f"grep -o \"mac address='[^']*'\" {web / 'live.xml'}").stdout == mac
    assert (web / "xml").read_text() == short


POOL = """<pool type='dir'>
  <name>scratch</name>
  <target><path>{path}</path></target>
</pool>
"""
NETWORK = """<network>
  <name>lab</name>
  <!-- hand-written -->
  <bridge name='virbr9'/>
  <ip address='192.0.2.1' netmask='255.255.255.0'/>
</network>
"""


def test_written_bytes_are_remembered_in_libvirt(mount_factory, tmp_path: Path) -> None:
    # Both host folders are separate connections to the one test:///default host of the
    # filesystem process: what one wrote, the other reads back, byte for byte.
    mounted = mount_factory("test:///default", "again=test:///default")
    one, two = mounted.host("test"), mounted.host("again")
    commented = WEB.replace("<os>", "<!-- my comment -->\n  <os>")
    os.mkdir(one / "domains/web")
    write_file(one / "domains/web/xml", commented)
    assert (two / "domains/web/xml").read_text() == commented
    assert "libvirtfs" not in (two / "domains/web/live.xml").read_text()

    os.mkdir(one / "networks/lab")
    write_file(one / "networks/lab/xml", NETWORK)
    assert (two / "networks/lab/xml").read_text() == NETWORK

    pool = POOL.format(path=tmp_path / "pool")
    os.mkdir(one / "pools/scratch")
    write_file(one / "pools/scratch/xml", pool)
    assert (two / "pools/scratch/xml").read_text() == pool


def test_control_words(web: Path) -> None:
    control, state = web / "control", web / "state"
    assert control.read_text() == "start\nstart-paused\nwait\n"
    sh(f"echo start > {control}")
    assert state.read_text() == "running\n"
    assert control.read_text() == ("shutdown\nreboot\nreset\ndestroy\nsuspend\nmanaged-save\n"
                                   "wait\n")  # no migrate: the test driver migrates nothing
    for word, expected in [("suspend", "paused"), ("resume", "running"),
                           ("reboot", "running"), ("reset", "running"),
                           ("destroy", "shutoff"), ("start", "running"),
                           ("managed-save", "shutoff")]:
        sh(f"echo {word} > {control}")
        assert state.read_text() == f"{expected}\n", word
    # The test hypervisor cannot start paused: libvirt's own words, EOPNOTSUPP.
    error = expect_errno(errno.EOPNOTSUPP, write_file, control, "start-paused\n")
    assert "unsupported flags" in user_error(control), error
    assert info(web / "info")["managed-save"] == "yes"
    sh(f"echo start > {control}")
    sh(f"echo 'wait running 5' > {control}")
    sh(f"echo shutdown > {control}")
    sh(f"echo 'wait shutoff 5' > {control}")
    assert state.read_text() == "shutoff\n"


def test_bad_control_words_are_refused(web: Path) -> None:
    control = web / "control"
    result = sh(f"echo frobnicate > {control}", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert "unknown control word 'frobnicate'" in user_error(control)
    expect_errno(errno.EBUSY, write_file, control, "resume\n")
    assert user_error(control) == ("resume is not possible while the domain is shutoff; "
                                   "valid now: start, start-paused, wait")
    expect_errno(errno.ETIMEDOUT, write_file, control, "wait running 0.3\n")
    write_file(control, "wait shutoff 0\n")  # already there: no waiting needed
    expect_errno(errno.EPERM, os.rename, _scratch(web), control)
    expect_errno(errno.EINVAL, write_file, control, "wait sideways\n")
    expect_errno(errno.EINVAL, write_file, control, "start\nstop\n")
    assert (web / "state").read_text() == "shutoff\n"


def _scratch(folder: Path) -> Path:
    (folder / "words.txt").write_text("start\n")
    return folder / "words.txt"


def test_autostart_takes_0_or_1(web: Path) -> None:
    sh(f"echo 1 > {web / 'autostart'}")
    assert (web / "autostart").read_text() == "1\n"
    assert info(web / "info")["autostart"] == "yes"
    result = sh(f"echo maybe > {web / 'autostart'}", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert user_error(web / "autostart") == "autostart takes 0 or 1, not 'maybe'"
    assert (web / "autostart").read_text() == "1\n"
    sh(f"echo 0 > {web / 'autostart'}")
    assert (web / "autostart").read_text() == "0\n"


def test_rmdir_and_mv(web: Path) -> None:
    domains = web.parent
    sh(f"echo start > {web / 'control'}")
    expect_errno(errno.EBUSY, os.rmdir, web)
    assert "destroy" in user_error(domains)
    expect_errno(errno.EBUSY, os.rename, web, domains / "web2")
    sh(f"echo destroy > {web / 'control'}")
    run("mv", web, domains / "web2")
    assert "web2" in os.listdir(domains) and "web" not in os.listdir(domains)
    assert "<name>web2</name>" in (domains / "web2" / "xml").read_text()
    expect_errno(errno.EEXIST, os.rename, domains / "web2", domains / "test")
    assert "never replaces" in user_error(domains)
    run("rmdir", domains / "web2")
    assert "web2" not in os.listdir(domains)


def test_name_must_match_the_folder(demo: Mounted) -> None:
    domains = demo.host() / "domains"
    os.mkdir(domains / "db")
    expect_errno(errno.EINVAL, write_file, domains / "db" / "xml", WEB)
    assert "folder of 'db'" in user_error(domains / "db" / "xml")
    write_file(domains / "db" / "xml", WEB.replace("<name>web</name>", ""))
    assert "<name>db</name>" in (domains / "db" / "live.xml").read_text()


BAD_DOCUMENTS = {
    "malformed": ("<domain type='test'><name>web</name>", errno.EINVAL, "malformed XML"),
    "wrong kind": ("<network><name>web</name></network>", errno.EINVAL, "not a <domain>"),
    "local file entity": ("<?xml version='1.0'?>\n<!DOCTYPE d [<!ENTITY x SYSTEM "
                          "'file:///etc/passwd'>]>\n<domain type='test'><name>&x;</name>"
                          "</domain>", errno.EINVAL, "entity"),
    "billion laughs": ("<?xml version='1.0'?>\n<!DOCTYPE lolz [<!ENTITY lol 'lol'>"
                       + "".join(f"<!ENTITY lol{i} '{'&lol{};'.format(i - 1 or '') * 10}'>"
                                 for i in range(1, 10))
                       + "]>\n<domain type='test'><name>&lol9;</name></domain>",
                       errno.EINVAL, "entity"),
}


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_bad_documents_are_refused_and_lose_nothing(web: Path, case: str) -> None:
    document, err, message = BAD_DOCUMENTS[case]
    expect_errno(err, write_file, web / "xml", document)
    assert message in user_error(web / "xml")
    assert (web / "xml").read_text() == WEB
    assert "root:" not in user_error(web / "xml")


def test_huge_document_is_efbig(web: Path) -> None:
    huge = WEB.replace("</domain>", "<!--" + "x" * (20 * 1024 * 1024) + "--></domain>")
    expect_errno(errno.EFBIG, write_file, web / "xml", huge)
    assert (web / "xml").read_text() == WEB


def test_killed_writer_leaves_the_definition_intact(web: Path) -> None:
    script = (f"import os, time\nf = os.open({str(web / 'xml')!r}, os.O_WRONLY | os.O_TRUNC)\n"
              f"os.write(f, {WEB[:60].encode()!r})\nprint('half', flush=True)\n"
              f"time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "half\n"
    writer.kill()
    writer.wait()
    assert (web / "xml").read_text() == WEB
    assert "malformed XML" in user_error(web / "xml")


def test_two_writers_each_commit_whole_and_the_last_close_wins(web: Path) -> None:
    with open(web / "xml", "w") as second:
        with open(web / "xml", "w") as first:
            first.write(WEB.replace("131072", "111111"))
            second.write(WEB.replace("131072", "222222"))
            first.flush()
            second.flush()
        assert info(web / "info")["max-memory"] == "111111"
    assert info(web / "info")["max-memory"] == "222222"

    errors: list[BaseException] = []

    def writer(memory: int) -> None:
        try:
            for _ in range(10):
                write_file(web / "xml", WEB.replace("131072", str(memory)))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(m,)) for m in (100000, 200000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert info(web / "info")["max-memory"] in ("100000", "200000")
    assert (web / "xml").read_text() in (WEB.replace("131072", m) for m in ("100000", "200000"))


def test_read_only_mount_refuses_every_change(mount_factory) -> None:
    mounted = mount_factory("test:///default", options="ro")
    dom = mounted.host() / "domains" / "test"
    for fn, args in [(write_file, (dom / "xml", WEB)), (write_file, (dom / "control", "stop")),
                     (os.mkdir, (dom.parent / "new",)), (os.rmdir, (dom,)),
                     (os.rename, (dom, dom.parent / "other")),
                     (write_file, (dom / "scratch", "x")),
                     (xattr.setxattr, (str(dom / "xml"), "user.x", b"1"))]:
        expect_errno(errno.EROFS, fn, *args)
    assert (dom / "state").read_text() == "running\n"


VOLUME = """<volume>
  <name>disk1.img</name>
  <capacity unit='MiB'>16</capacity>
  <target><format type='raw'/></target>
</volume>
"""


def test_pools_and_volumes_by_mkdir_write_control_and_rmdir(demo: Mounted,
                                                             tmp_path: Path) -> None:
    pools = demo.host() / "pools"
    (tmp_path / "pool").mkdir()
    document = POOL.format(path=tmp_path / "pool")
    run("mkdir", pools / "scratch")
    write_file(pools / "scratch" / "xml", document)
    pool = pools / "scratch"
    assert (pool / "state").read_text() == "inactive\n"
    assert (pool / "xml").read_text() == document
    assert (pool / "control").read_text() == "start\nbuild\nwait\n"
    sh(f"echo build > {pool / 'control'}")
    sh(f"echo start > {pool / 'control'}")
    assert (pool / "state").read_text() == "running\n"
    assert info(pool / "info")["state"] == "running"

    run("mkdir", pool / "volumes" / "disk1.img")
    write_file(pool / "volumes" / "disk1.img" / "xml", VOLUME)
    volume = pool / "volumes" / "disk1.img"
    assert info(volume / "info")["capacity"] == str(16 * 1024 * 1024)
    assert (volume / "path").read_text().strip().endswith("disk1.img")
    assert (volume / "xml").read_text() == VOLUME  # read-your-writes
    error = expect_errno(errno.EEXIST, write_file, volume / "xml",
                         VOLUME.replace("16", "32"))
    assert "cannot redefine" in user_error(volume / "xml"), error

    expect_errno(errno.EBUSY, os.rmdir, pool)
    run("rmdir", volume)
    assert os.listdir(pool / "volumes") == []
    sh(f"echo stop > {pool / 'control'}")
    sh(f"echo 1 > {pool / 'autostart'}")
    assert (pool / "autostart").read_text() == "1\n"
    run("rmdir", pool)
    assert "scratch" not in os.listdir(pools)


def test_wait_works_for_pools_and_networks_too(demo: Mounted) -> None:
    """Every control file takes `wait STATE [SECONDS]`, with the states its `state` shows."""
    network = demo.host() / "networks" / "default"
    pool = demo.host() / "pools" / "default-pool"
    sh(f"echo 'wait active 0' > {network / 'control'}")
    sh(f"echo 'wait running 0' > {pool / 'control'}")
    result = sh(f"echo 'wait inactive 0.2' > {network / 'control'}", check=False)
    assert "timed out" in result.stderr
    assert "did not reach inactive" in user_error(network / "control")
    result = sh(f"echo 'wait shutoff 1' > {pool / 'control'}", check=False)
    assert "Invalid argument" in result.stderr
    assert "inactive, building, running, degraded, inaccessible" in user_error(
        pool / "control")
    sh(f"echo stop > {network / 'control'}")
    sh(f"echo 'wait inactive 5' > {network / 'control'}")
    assert (network / "state").read_text() == "inactive\n"


def test_networks_by_mkdir_write_control_and_rmdir(demo: Mounted) -> None:
    networks = demo.host() / "networks"
    run("mkdir", networks / "lab")
    write_file(networks / "lab" / "xml", NETWORK)
    lab = networks / "lab"
    assert (lab / "state").read_text() == "inactive\n"
    assert (lab / "control").read_text() == "start\nwait\n"
    sh(f"echo start > {lab / 'control'}")
    assert (lab / "state").read_text() == "active\n"
    expect_errno(errno.EBUSY, os.rmdir, lab)
    assert "echo stop > control" in user_error(networks)
    expect_errno(errno.EINVAL, write_file, lab / "control", "explode\n")
    sh(f"echo stop > {lab / 'control'}")
    run("rmdir", lab)
    assert os.listdir(networks) == ["default"]


def test_names_are_written_the_way_listings_show_them(demo: Mounted) -> None:
    domains = demo.host() / "domains"
    expect_errno(errno.EINVAL, os.mkdir, domains / "x%41")
    assert "use 'xA'" in user_error(domains)
    os.mkdir(domains / "100%25")  # the escaped form of "100%"
    write_file(domains / "100%25" / "xml", WEB.replace("<name>web</name>", ""))
    assert "name: 100%\n" in (domains / "100%25" / "info").read_text()
    assert "user.error" not in xattr.listxattr(str(domains))  # cleared by the success
    assert sorted(os.listdir(domains)) == ["100%25", "test"]
    assert run("ls", "-a", domains).stdout.split() == [".", "..", "100%25", "test"]


def test_passwords_are_never_shown_nor_remembered(web: Path) -> None:
    with_password = WEB.replace("</devices>", "  <graphics type='vnc' port='-1' autoport='yes'"
                                              " passwd='s3cret'/>\n  </devices>")
    write_file(web / "xml", with_password)
    assert "s3cret" not in (web / "xml").read_text()
    assert "s3cret" not in (web / "live.xml").read_text()
    assert "<graphics type='vnc'" in (web / "xml").read_text()


def test_names_that_are_not_utf8_are_refused(demo: Mounted) -> None:
    domains = os.fsencode(demo.host() / "domains")
    expect_errno(errno.EINVAL, os.mkdir, domains + b"/bad\xff")
    assert "UTF-8" in user_error(demo.host() / "domains")
    folder = os.fsencode(demo.host() / "domains/test")
    with open(folder + b"/odd\xfe.txt", "w") as f:  # a scratch file may have any bytes
        f.write("kept")
    assert b"odd\xfe.txt" in os.listdir(folder)
    os.unlink(folder + b"/odd\xfe.txt")
