"""Extended attributes as tools meet them: ls -l, getfattr, setfattr, setfacl, cp -a, rsync -X.

Attributes live in the `user.` namespace.  Any other name reads as "not supported" (so `ls -l`
stops asking for SELinux labels and ACLs after the first file); ACLs copied onto a file are
accepted with no effect, as chmod is.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Mounted, info, run, sh, user_error

WEB = """<domain type='test'>
  <name>web</name>
  <memory unit='KiB'>131072</memory>
  <os><type>hvm</type></os>
</domain>
"""


@pytest.fixture
def web(demo: Mounted, tmp_path: Path) -> Path:
    """A defined domain `web`, made with mkdir and cp."""
    (tmp_path / "web.xml").write_text(WEB)
    folder = demo.host() / "domains" / "web"
    run("mkdir", folder)
    run("cp", tmp_path / "web.xml", folder / "xml")
    return folder


def xattr_calls(trace: Path) -> list[str]:
    """The getxattr calls an `strace -o trace` saw, without its own bookkeeping lines."""
    return [line for line in trace.read_text().splitlines() if "xattr(" in line]


def edit_elsewhere(path: Path, old: str, new: str) -> None:
    """An edit outside the mount that leaves an ACL and an attribute of its own on the
    file, for the copy back to carry."""
    sh(f"sed -i 's/{old}/{new}/' {path}")
    run("setfacl", "-m", "u:nobody:r", path)
    run("setfattr", "-n", "user.note", "-v", "edited", path)

def test_ls_l_asks_for_labels_and_acls_once_not_per_file(big: Mounted,
                                                         tmp_path: Path) -> None:
    domains = big.host("big") / "domains"
    trace = tmp_path / "trace"
    listing = run("strace", "-f", "-o", trace, "-e", "trace=getxattr,lgetxattr",
                  "ls", "-l", domains)
    assert len(listing.stdout.splitlines()) == 1 + 1004  # "total", then every domain
    assert listing.stderr == ""
    asked = xattr_calls(trace)
    # It was 3 per file (security.selinux and both POSIX ACLs, each "no data").
    assert 0 < len(asked) <= 3, asked
    assert all("EOPNOTSUPP" in line for line in asked), asked


def test_getfattr_shows_the_user_attributes_only(web: Path) -> None:
    xml = web / "xml"
    assert run("getfattr", "-d", "-m", "-", xml).stdout == ""  # every namespace: none
    sh(f"echo '<extra/>' >> {xml}")
    assert "malformed XML" in run("getfattr", "-d", "-m", "-", xml).stdout
    assert "malformed XML" in user_error(xml)
    label = run("getfattr", "-n", "security.selinux", xml, check=False)
    assert label.returncode == 1 and "Operation not supported" in label.stderr
    # xml is the owner's and the group's alone (docs/security.md#the-permission-policy).
    assert run("getfacl", "-c", xml).stdout == "user::rw-\ngroup::r--\nother::---\n\n"


def test_setfattr_takes_user_settings_and_refuses_other_names(web: Path) -> None:
    snaps = web / "snapshots"
    run("setfattr", "-n", "user.flags", "-v", "halt", snaps)
    assert 'user.flags="halt"' in run("getfattr", "-d", snaps).stdout
    run("setfattr", "-x", "user.flags", snaps)
    assert run("getfattr", "-d", snaps).stdout == ""
    domains = web.parent
    run("setfattr", "-n", "user.undefine-flags", "-v", "nvram", domains)
    assert 'user.undefine-flags="nvram"' in run("getfattr", "-d", domains).stdout
    run("setfattr", "-x", "user.undefine-flags", domains)

    for name in ("user.note", "security.selinux", "trusted.note", "system.note"):
        refused = run("setfattr", "-n", name, "-v", "x", web / "xml", check=False)
        assert refused.returncode == 1 and "Operation not supported" in refused.stderr, name
    for name in ("security.selinux", "trusted.note"):
        refused = run("setfattr", "-x", name, snaps, check=False)
        assert refused.returncode == 1 and "Operation not supported" in refused.stderr, name

    sh(f"echo '<extra/>' >> {web / 'xml'}")
    run("setfattr", "-x", "user.error", web / "xml")  # cleared by hand
    assert run("getfattr", "-d", web / "xml").stdout == ""


def test_setfacl_is_accepted_and_changes_nothing(web: Path) -> None:
    xml = web / "xml"
    run("setfacl", "-m", "u:nobody:rw", xml)
    run("setfacl", "-d", "-m", "u:nobody:rwx", web / "snapshots")
    run("setfacl", "-b", xml)
    assert run("getfacl", "-c", xml).stdout == "user::rw-\ngroup::r--\nother::---\n\n"
    assert oct(os.stat(xml).st_mode & 0o777) == "0o640"


def test_cp_a_copies_a_domain_folder_out_and_its_xml_back(web: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    copied = run("cp", "-a", web, saved)
    assert copied.stderr == ""
    assert sorted(os.listdir(saved)) == sorted(os.listdir(web))
    for name in ("xml", "state", "info", "autostart"):
        assert (saved / name).read_bytes() == (web / name).read_bytes(), name

    # Edited elsewhere, with an ACL and an attribute of its own, and copied back.
    edit_elsewhere(saved / "xml", "131072", "2621440")
    back = run("cp", "-a", saved / "xml", web / "xml")
    assert back.stderr == ""
    assert info(web / "info")["max-memory"] == "2621440"
    assert (web / "xml").read_text() == WEB.replace("131072", "2621440")


def test_rsync_aX_copies_out_and_back(web: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    out = run("rsync", "-aX", f"{web}/", saved)
    assert out.stderr == ""
    assert (saved / "xml").read_text() == WEB
    assert (saved / "state").read_text() == "shutoff\n"

    edit_elsewhere(saved / "xml", "131072", "1048576")
    back = run("rsync", "-aAX", saved / "xml", web / "xml")
    assert back.stderr == ""
    assert info(web / "info")["max-memory"] == "1048576"
    assert not [name for name in os.listdir(web) if name.startswith(".xml")]  # its temp file
