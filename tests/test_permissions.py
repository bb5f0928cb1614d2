"""A shared mount, as an administrator sets it up and as its users meet it.

Real unprivileged users and a group are made for the session (`lvfs-owner`, `lvfs-admin` in
the group `lvfs-admins`, and `lvfs-other`), and every command runs in a shell of one of
them (`setpriv --reuid --regid --init-groups`), so the kernel checks each access against
the modes and owners the mount serves (docs/security.md#the-permission-policy).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mounted, check_clean_exit, run, sh, start_mount, user_error

ADMINS = "lvfs-admins"
# user -> supplementary groups
PEOPLE = {"lvfs-owner": (), "lvfs-admin": (ADMINS,), "lvfs-other": ()}


def _exists(database: str, name: str) -> bool:
    return run("getent", database, name, check=False).returncode == 0


@pytest.fixture(scope="session")
def people() -> Iterator[dict[str, pwd.struct_passwd]]:
    """The users and group, made if missing (and removed at the end if made here)."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("needs root, useradd and setpriv to make users")
    made_groups = []
    made_users = []
    if not _exists("group", ADMINS):
        run("groupadd", ADMINS)
        made_groups.append(ADMINS)
    for user, groups in PEOPLE.items():
        if not _exists("passwd", user):
            run("useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                user)
            made_users.append(user)
        for group in groups:
            run("usermod", "--append", "--groups", group, user)
    yield {user: pwd.getpwnam(user) for user in PEOPLE}
    for user in made_users:
        run("userdel", user, check=False)
    for group in made_groups:
        run("groupdel", group, check=False)


def as_user(user: str, script: str) -> subprocess.CompletedProcess[str]:
    """A line of shell typed by `user`, with the user's own groups."""
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                           "env", "HOME=/", "LC_ALL=C", "bash", "-c", script],
                          capture_output=True, text=True, cwd="/", timeout=60)


def refused(user: str, script: str, reason: str = "Permission denied") -> str:
    result = as_user(user, script)
    assert result.returncode != 0, f"{user} could: {script}\n{result.stdout}"
    assert reason in result.stderr, result.stderr
    return result.stderr


def allowed(user: str, script: str) -> str:
    result = as_user(user, script)
    assert result.returncode == 0, f"{user} could not: {script}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def shared(people, tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """shared(options) -> test:///default mounted by root where every user can reach it.

    pytest's own folders may be 0700, so the mount points live in a folder of /tmp made
    for them (mode 0755); they are unmounted, checked and removed after the test."""
    base = Path(tempfile.mkdtemp(prefix="lvfs-perm-", dir="/tmp"))
    base.chmod(0o755)
    mounts: list[Mounted] = []

    def mount(options: str, name: str = "mnt") -> Mounted:
        mounted = start_mount(base / name, "test:///default", options=options,
                              log=tmp_path / f"{name}.log")
        mounts.append(mounted)
        return mounted

    yield mount
    try:
        for mounted in mounts:
            check_clean_exit(mounted)
    finally:
        for mounted in mounts:
            if not os.path.ismount(mounted.path):
                mounted.path.rmdir()
        if not any(os.path.ismount(m.path) for m in mounts):
            shutil.rmtree(base)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_without_allow_other_only_the_mounting_user_gets_in(shared, people) -> None:
    mounted = shared("")
    test = mounted.host() / "domains/test"
    assert (test / "state").read_text() == "running\n"  # root mounted it
    for user in PEOPLE:
        refused(user, f"ls {mounted.path}")
        refused(user, f"cat {test}/state")
    # uid= names the owner of what is served, not who may reach the mount: FUSE lets in
    # only the user who mounted, unless allow_other says otherwise.
    owner = people["lvfs-owner"]
    other = shared(f"uid={owner.pw_uid},gid={owner.pw_gid}", name="owned")
    refused("lvfs-owner", f"cat {other.host()}/domains/test/state")


@pytest.fixture
def admins_mount(shared) -> Mounted:
    """What the administrator mounts: `-o allow_other,admin_group=lvfs-admins`, with a
    snapshot taken and a refused control word (its reason in user.error) by root."""
    mounted = shared(f"allow_other,admin_group={ADMINS}")
    test = mounted.host() / "domains/test"
    run("mkdir", test / "snapshots/before")
    assert sh(f"echo bogus > {test}/control", check=False).returncode == 1
    assert "unknown control word 'bogus'" in user_error(test / "control")
    return mounted


def test_a_user_outside_the_group_browses_but_reads_no_definition(admins_mount) -> None:
    host = admins_mount.host()
    test = host / "domains/test"
    listing = allowed("lvfs-other", f"ls {host}/domains; ls {test}; cat {test}/state; "
                                    f"cat {host}/status; grep ^state {test}/info")
    assert listing.split() == ["test", "autostart", "control", "disks", "info", "job",
                               "live.xml", "snapshots", "state", "xml", "running", "connected",
                               "state:", "running"]
    allowed("lvfs-other", f"ls {test}/snapshots/before; cat {test}/snapshots/before/state")
    for document in ("xml", "live.xml", "snapshots/before/xml"):
        refused("lvfs-other", f"cat {test}/{document}")
        refused("lvfs-other", f"cp {test}/{document} /tmp/lvfs-stolen.xml")
    assert not Path("/tmp/lvfs-stolen.xml").exists()
    refused("lvfs-other", f"grep -r passwd {host}/domains")


def test_a_user_outside_the_group_changes_nothing(admins_mount) -> None:
    host = admins_mount.host()
    test = host / "domains/test"
    refused("lvfs-other", f"echo suspend > {test}/control")
    refused("lvfs-other", f"echo 1 > {test}/autostart")
    refused("lvfs-other", f"mkdir {test}/snapshots/mine")
    refused("lvfs-other", f"rmdir {test}/snapshots/before")
    refused("lvfs-other", f"mv {test} {host}/domains/renamed")
    refused("lvfs-other", f"mkdir {host}/domains/web")
    refused("lvfs-other", f"touch {test}/notes")
    refused("lvfs-other", f"mkdir {admins_mount.path}/hosts/mine")
    refused("lvfs-other", f"setfattr -n user.flags -v halt {test}/snapshots")
    refused("lvfs-other", f"setfattr -x user.error {test}/control")
    assert (test / "state").read_text() == "running\n"
    assert sorted(os.listdir(test / "snapshots")) == ["before", "current"]
    assert "unknown control word" in user_error(test / "control")


def test_chmod_and_chown_never_let_anybody_in(admins_mount, people) -> None:
    test = admins_mount.host() / "domains/test"
    before = {name: os.stat(test / name) for name in ("xml", "control", "state")}
    for user in ("lvfs-other", "lvfs-admin"):  # neither owns the files
        refused(user, f"chmod o+r {test}/xml", "Operation not permitted")
        refused(user, f"chmod 666 {test}/control", "Operation not permitted")
        refused(user, f"chown {user} {test}/xml", "Operation not permitted")
        refused(user, f"chgrp {user} {test}/state", "Operation not permitted")
    refused("lvfs-other", f"cat {test}/xml")
    # The owner (root here) may: accepted, and nothing changes.
    run("chmod", "666", test / "xml")
    run("chown", "lvfs-other:lvfs-other", test / "xml", test / "state")
    after = {name: os.stat(test / name) for name in ("xml", "control", "state")}
    for name, was in before.items():
        assert (after[name].st_mode, after[name].st_uid, after[name].st_gid) == (
            was.st_mode, was.st_uid, was.st_gid), name
    refused("lvfs-other", f"cat {test}/xml")


def test_user_error_is_for_the_owner_and_the_group(admins_mount) -> None:
    test = admins_mount.host() / "domains/test"
    refused("lvfs-other", f"getfattr -n user.error {test}/control")
    refused("lvfs-other", f"getfattr -n user.error {test}/state")
    refused("lvfs-other", f"getfattr -n user.error {test}/xml")
    # Listing the attributes does not name it to them, so `getfattr -d` and `cp -a` work.
    assert allowed("lvfs-other", f"getfattr -d {test}/control") == ""
    shown = allowed("lvfs-admin", f"getfattr -n user.error --only-values {test}/control")
    assert "unknown control word 'bogus'" in shown
    assert "user.error" in allowed("lvfs-admin", f"getfattr -d {test}/control")


def test_a_member_of_the_admin_group_reads_and_changes(admins_mount, people) -> None:
    host = admins_mount.host()
    test = host / "domains/test"
    assert "<name>test</name>" in allowed("lvfs-admin", f"cat {test}/xml")
    assert "<name>test</name>" in allowed("lvfs-admin", f"cat {test}/live.xml")
    assert "<domainsnapshot>" in allowed("lvfs-admin", f"cat {test}/snapshots/before/xml")
    allowed("lvfs-admin", f"echo suspend > {test}/control")
    assert (test / "state").read_text() == "paused\n"
    allowed("lvfs-admin", f"echo resume > {test}/control")
    allowed("lvfs-admin", f"mkdir {test}/snapshots/by-admin")
    allowed("lvfs-admin", f"setfattr -n user.flags -v halt {test}/snapshots")
    assert 'user.flags="halt"' in allowed("lvfs-admin", f"getfattr -d {test}/snapshots")
    allowed("lvfs-admin", f"rmdir {test}/snapshots/by-admin")
    # sed -i: its temporary file is the member's own, so its chmod and chown are quiet.
    edit = as_user("lvfs-admin", f"sed -i 's/>test</>test</' {test}/xml")
    assert (edit.returncode, edit.stderr) == (0, "")
    allowed("lvfs-admin", f"mkdir {host}/domains/web && rmdir {host}/domains/web")
    # hosts/ is the owner's: a new host would be reached with the owner's credentials.
    refused("lvfs-admin", f"mkdir {admins_mount.path}/hosts/mine")


def test_modes_and_owners_follow_the_policy(admins_mount, people) -> None:
    root = admins_mount.path
    test = admins_mount.host() / "domains/test"
    admins = grp.getgrnam(ADMINS).gr_gid
    expected = {
        root: 0o555, root / "hosts": 0o755, root / "hosts/test": 0o555,
        root / "hosts/test/status": 0o444, root / "hosts/test/uri": 0o444,
        root / "hosts/test/capabilities.xml": 0o444, root / "hosts/test/domains": 0o775,
        test: 0o775, test / "snapshots": 0o775, test / "snapshots/before": 0o775,
        test / "disks": 0o775,
        test / "state": 0o444, test / "info": 0o444, test / "job": 0o444,
        test / "control": 0o664, test / "autostart": 0o664,
        test / "xml": 0o660, test / "live.xml": 0o440, test / "snapshots/before/xml": 0o660,
        test / "snapshots/before/state": 0o444,
    }
    for path, bits in expected.items():
        assert oct(mode(path)) == oct(bits), path
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (0, admins), path
    # A file a member makes (a tool's temporary file) is the member's.
    allowed("lvfs-admin", f"echo note > {test}/notes.txt")
    notes = os.stat(test / "notes.txt")
    assert (notes.st_uid, notes.st_gid) == (people["lvfs-admin"].pw_uid, admins)
    assert oct(stat.S_IMODE(notes.st_mode)) == oct(0o660)
    refused("lvfs-other", f"cat {test}/notes.txt")
    allowed("lvfs-admin", f"rm {test}/notes.txt")


def test_uid_and_gid_choose_the_owner(shared, people) -> None:
    owner = people["lvfs-owner"]
    mounted = shared(f"allow_other,uid={owner.pw_uid},gid={owner.pw_gid}")
    test = mounted.host() / "domains/test"
    listing = run("ls", "-ln", test).stdout
    assert f"-rw-r----- 1 {owner.pw_uid} {owner.pw_gid} " in listing  # xml
    assert f"-rw-r--r-- 1 {owner.pw_uid} {owner.pw_gid} " in listing  # control
    assert f"drwxr-xr-x 1 {owner.pw_uid} {owner.pw_gid} " in listing  # snapshots
    assert "<name>test</name>" in allowed("lvfs-owner", f"cat {test}/xml")
    allowed("lvfs-owner", f"echo suspend > {test}/control")
    assert (test / "state").read_text() == "paused\n"
    allowed("lvfs-owner", f"mkdir {test}/snapshots/mine")
    # The owner's chmod and chgrp (to a group of the owner's) are accepted and change nothing;
    # chown to somebody else is the kernel's EPERM.
    allowed("lvfs-owner", f"chmod 666 {test}/xml && chgrp lvfs-owner {test}/xml")
    assert oct(mode(test / "xml")) == oct(0o640)
    refused("lvfs-owner", f"chown lvfs-other {test}/xml", "Operation not permitted")
    edit = as_user("lvfs-owner", f"sed -i 's/>test</>test</' {test}/xml")
    assert (edit.returncode, edit.stderr) == (0, "")
    # No admin group: nobody else reads definitions or changes anything.
    for user in ("lvfs-admin", "lvfs-other"):
        allowed(user, f"cat {test}/state")
        refused(user, f"cat {test}/xml")
        refused(user, f"echo resume > {test}/control")


def test_a_read_only_shared_mount_has_no_write_bits(shared) -> None:
    mounted = shared(f"ro,allow_other,admin_group={ADMINS}")
    test = mounted.host() / "domains/test"
    for name in ("xml", "live.xml", "control", "state"):
        assert mode(test / name) & 0o222 == 0, name
    assert mode(test / "xml") == 0o440
    assert mode(test / "snapshots") == 0o555
    assert "<name>test</name>" in allowed("lvfs-admin", f"cat {test}/xml")
    refused("lvfs-admin", f"echo suspend > {test}/control", "Read-only file system")


def test_a_password_libvirt_quotes_is_hidden(shared, tmp_path: Path) -> None:
    mounted = shared(f"allow_other,admin_group={ADMINS}")
    xml = mounted.host() / "domains/test/xml"
    # The port and the password swapped: libvirt's refusal quotes the port's value.
    document = tmp_path / "swapped.xml"
    document.write_text(run("cat", xml).stdout.replace(
        "</devices>", "<graphics type='vnc' port='hunter2' passwd='hunter2'/></devices>"))
    copied = run("cp", document, xml, check=False)
    assert copied.returncode == 1
    message = user_error(xml)
    assert "cannot parse vnc port (password hidden)" in message
    assert "hunter2" not in message
    assert "hunter2" not in mounted.log()  # the --debug log says how long a write was


def test_an_unknown_admin_group_is_a_mount_error(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = [sys.executable, "-m", "libvirtfs.mount.cli", "test:///default", str(mnt)]
    result = run(*cli, "-o", "allow_other,admin_group=lvfs-nosuch", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("libvirtfs: admin group 'lvfs-nosuch' does not exist")
    assert not os.path.ismount(mnt)
    result = run(*cli, "-o", "uid=lvfs-owner", check=False)
    assert result.returncode == 2
    assert "option uid needs a number" in result.stderr
    assert not os.path.ismount(mnt)
