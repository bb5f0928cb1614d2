"""Disks as folders (issue 11) on the demo host: domains/VM/disks/TARGET/ and its files.

Block jobs need QEMU (tests/test_qemu_disks.py); libvirt's test driver has none, which is
itself a case: its refusal reaches the writer with libvirt's reason.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import Mounted, expect_errno, guest_xml, info, sh, user_error, write_file

SERVED = ["chain", "control", "info", "job", "live.xml", "stats", "xml"]
WEB = guest_xml("web", "/guest/web.img", hypervisor="test", mib=128, target="vdb")


@pytest.fixture
def vda(demo: Mounted) -> Path:
    return demo.host() / "domains" / "test" / "disks" / "vda"


def test_a_running_domains_disk_is_a_folder_of_its_facts(vda: Path) -> None:
    assert os.listdir(vda.parent) == ["vda"]
    assert sorted(os.listdir(vda)) == SERVED
    xml = (vda / "xml").read_text()
    assert xml.startswith("<disk type='file' device='disk'>\n  <source file='/guest/diskimage1'/>")
    assert xml.endswith("</disk>\n")
    assert (vda / "live.xml").read_text() == xml
    facts = info(vda / "info")
    assert (facts["device"], facts["bus"], facts["source"]) == ("disk", "virtio",
                                                                "/guest/diskimage1")
    capacity, allocation, physical = (int(facts[k]) for k in ("capacity", "allocation",
                                                             "physical"))
    assert capacity > 0 and allocation > 0 and physical > 0
    assert (facts["read-only"], facts["shareable"]) == ("no", "no")
    assert "errors" in facts
    assert (vda / "chain").read_text() == "vda - /guest/diskimage1\n"
    assert int(info(vda / "stats")["rd-operations"]) >= 0
    assert (vda / "job").read_text() == ""
    assert (vda / "control").read_text().split() == ["commit", "commit-active", "pull",
                                                     "copy", "resize", "wait"]
    # grep works over all of it, as over any folder.
    assert sh(f"grep -l '^bus: virtio' {vda.parent}/*/info").stdout == f"{vda}/info\n"


def test_an_inactive_domains_disks_show_the_definition(demo: Mounted) -> None:
    domains = demo.host() / "domains"
    os.mkdir(domains / "web")
    write_file(domains / "web" / "xml", WEB)
    disk = domains / "web" / "disks" / "vdb"
    assert os.listdir(domains / "web" / "disks") == ["vdb"]
    assert "live.xml" not in os.listdir(disk)  # only while running
    assert "<target dev='vdb' bus='virtio'/>" in (disk / "xml").read_text()
    assert (disk / "stats").read_text() == ""
    assert (disk / "job").read_text() == ""
    assert (disk / "control").read_text() == "wait\n"  # no block job while shut off


def test_block_jobs_the_hypervisor_lacks_are_refused_with_its_reason(vda: Path) -> None:
    expect_errno(errno.EOPNOTSUPP, write_file, vda / "control", "commit\n")
    assert "virDomainBlockCommit" in user_error(vda / "control")
    assert (vda / "chain").read_text() == "vda - /guest/diskimage1\n"


@pytest.mark.parametrize("words", ["bogus", "copy", "resize", "commit a b c", "pivot now",
                                   "pull bandwidth=fast", "copy /tmp/x delete"])
def test_malformed_words_are_refused_before_libvirt_hears_of_them(vda: Path,
                                                                   words: str) -> None:
    expect_errno(errno.EINVAL, write_file, vda / "control", words + "\n")
    assert user_error(vda / "control")


def test_unknown_target_is_enoent(demo: Mounted) -> None:
    disks = demo.host() / "domains" / "test" / "disks"
    expect_errno(errno.ENOENT, os.stat, disks / "vdz")
    expect_errno(errno.ENOENT, os.listdir, disks / "vdz")


def test_a_malformed_disk_element_changes_nothing(vda: Path) -> None:
    before = (vda / "xml").read_text()
    expect_errno(errno.EINVAL, write_file, vda / "xml", "<disk><target dev='vda'")
    assert "malformed XML" in user_error(vda / "xml")
    expect_errno(errno.EINVAL, write_file, vda / "xml",
                 before.replace("dev='vda'", "dev='vdc'"))
    assert "must be 'vda'" in user_error(vda / "xml")
    assert (vda / "xml").read_text() == before


@pytest.mark.parametrize("remove", ["rm -rf {disks}", "find {disks} -delete",
                                    "rm -rf {disks}/vda", "rmdir {disks}"])
def test_recursive_deletes_remove_no_disk(demo: Mounted, remove: str) -> None:
    disks = demo.host() / "domains" / "test" / "disks"
    before = (disks.parent / "live.xml").read_text()
    sh(remove.format(disks=disks), check=False)
    assert os.listdir(disks) == ["vda"]
    assert sorted(os.listdir(disks / "vda")) == SERVED
    assert (disks.parent / "live.xml").read_text() == before
