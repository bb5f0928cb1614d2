"""Live migration between the two daemons of the test bed (contrib/qemu-testbed.sh
start-second), by `migrate` control word and by `mv` across host folders.

Both daemons run on this machine: the second one's host name does not resolve, so every
migration towards it gives `migrate-uri=tcp://127.0.0.1` (and `listen-address=127.0.0.1`
keeps the receiving QEMU on loopback).  docs/hosts.md, "Migration".

A guest without an OS has all-zero memory: 2 GiB of it pass in about 5 s at bandwidth=1,
which a test acting while the migration runs raced (an abort or a kill after it had
ended).  The guests of such tests get random bytes loaded into their memory (QEMU's
generic `loader` device), each MiB of which takes a second at bandwidth=1: 8 MiB for a
migration that must end (about 15 s), 64 MiB for one the test aborts (over a minute).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import xattr
from conftest import eventually, info, run, sh, user_error, write_file

pytestmark = pytest.mark.qemu

SECOND_URI = "qemu+tcp://127.0.0.1:16510/system"
LOOPBACK = "migrate-uri=tcp://127.0.0.1 listen-address=127.0.0.1"

GUEST = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <!-- no OS: SeaBIOS runs forever; memory {mib} MiB of zeros migrates in seconds, and
       slowly at bandwidth=1 -->
  <memory unit='MiB'>{mib}</memory>
  <os><type arch='x86_64'>hvm</type></os>{fill}
</domain>
"""
FILL = """
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file={path},addr=0x1000000,force-raw=on'/>
  </qemu:commandline>"""
# MiB of random bytes in the memory of a guest whose migration must end / is aborted.
ENDS = 8
ABORTED = 64


def guest_xml(name: str, mib: int, fill: Path | None = None) -> str:
    """A guest of `mib` MiB; `fill`'s bytes are loaded into its memory at 16 MiB."""
    return GUEST.format(name=name, mib=mib, fill=FILL.format(path=fill) if fill else "")


@pytest.fixture(scope="module")
def random_memory():
    """`random_memory(MIB)`: a file of MIB random MiB for guest_xml, in /var/tmp, which
    the second daemon sees too (its QEMU opens the same file when the guest arrives)."""
    made: dict[int, Path] = {}

    def file(mib: int) -> Path:
        if mib not in made:
            path = Path(f"/var/tmp/libvirtfs-migrate-fill-{os.getpid()}-{mib}.bin")
            run("dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}",
                "status=none")
            made[mib] = path
        return made[mib]

    yield file
    for path in made.values():
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def second_uri(qemu_uri: str) -> str:
    started = run("bash", "contrib/qemu-testbed.sh", "start-second",
                  cwd=Path(__file__).resolve().parent.parent, check=False, timeout=120)
    if started.returncode:
        pytest.skip(f"no second libvirtd: {started.stderr.strip()[-300:]}")
    return SECOND_URI


@pytest.fixture
def name(qemu_uri: str, second_uri: str):
    """A domain name (prefix migrate-); whatever is left of it is removed from both."""
    domain = f"migrate-{uuid.uuid4().hex[:8]}"
    yield domain
    for uri in (qemu_uri, second_uri):
        for each in (domain, f"{domain}-b"):
            run("virsh", "-c", uri, "destroy", each, check=False)
            run("virsh", "-c", uri, "undefine", "--managed-save", each, check=False)


@pytest.fixture
def both(mount_factory, qemu_uri: str, second_uri: str):
    mounted = mount_factory(f"a={qemu_uri}", f"b={second_uri}")
    return mounted


def virsh_state(uri: str, domain: str) -> str:
    result = run("virsh", "-c", uri, "domstate", domain, check=False)
    return result.stdout.strip() if result.returncode == 0 else "absent"


def running_guest(mounted, host: str, domain: str, mib: int = 64,
                  fill: Path | None = None) -> Path:
    folder = mounted.host(host) / "domains" / domain
    folder.mkdir()
    write_file(folder / "xml", guest_xml(domain, mib, fill))
    sh(f"echo start > {folder}/control")
    return folder


def test_migrate_by_control_word_there_and_back(both, qemu_uri, second_uri, name) -> None:
    folder = running_guest(both, "a", name)
    sh(f"echo 'migrate b live persist undefine-source {LOOPBACK}' > {folder}/control")
    assert virsh_state(second_uri, name) == "running"
    assert virsh_state(qemu_uri, name) == "absent"
    there = both.host("b") / "domains" / name
    assert (there / "state").read_text() == "running\n"
    eventually(lambda: name not in os.listdir(both.host("a") / "domains"))
    # Back, by URI this time (the mounted host's own URI means that host); the first
    # daemon's host name resolves here, so no migrate-uri is needed.
    sh(f"echo 'migrate {qemu_uri} live persist undefine-source' > {there}/control")
    assert virsh_state(qemu_uri, name) == "running"
    assert virsh_state(second_uri, name) == "absent"
    assert (folder / "state").read_text() == "running\n"
    eventually(lambda: name not in os.listdir(both.host("b") / "domains"))


def test_mv_migrates_both_ways_and_the_folder_moves(both, qemu_uri, second_uri, name) -> None:
    folder = running_guest(both, "a", name)
    domains_a, domains_b = both.host("a") / "domains", both.host("b") / "domains"
    # Without a migration address the destination's host name is used: it does not
    # resolve here, and the refusal says what to do.
    result = sh(f"mv {folder} {domains_b}/", check=False)
    assert result.returncode != 0
    assert "migrate-uri=" in user_error(domains_a), result.stderr
    assert virsh_state(qemu_uri, name) == "running"
    assert (folder / "state").read_text() == "running\n"

    sh(f"setfattr -n user.migrate -v 'live persist undefine-source bandwidth=1 {LOOPBACK}' "
       f"{folder}")
    inode = folder.stat().st_ino
    # Slowed down (2 GiB of zeros at 1 MiB/s take some seconds): `job` shows it moving.
    # (Not longer: with 8 MiB of random bytes, 15 s, a read of `job` a second into the mv
    # sometimes waited for the whole migration, about one run in four; not understood.)
    sh(f"echo destroy > {folder}/control")
    write_file(folder / "xml", guest_xml(name, 2048))
    sh(f"echo start > {folder}/control")
    # What was looked up in the folder before (here by ls) answers while mv runs; a name
    # looked up for the first time waits for mv (the kernel locks the folder for it).
    run("ls", folder)
    mover = subprocess.Popen(["mv", str(folder), f"{domains_b}/"], stderr=subprocess.PIPE)

    seen: list[dict[str, str]] = []

    def moving() -> None:
        try:
            job = info(folder / "job")
        except FileNotFoundError:
            raise AssertionError(f"moved before job showed it moving: {seen[-3:]}") from None
        seen.append(job)
        assert job.get("status") == "running", job
        assert job.get("operation") == "outgoing-migration", job
        assert int(job.get("memory-processed", "0")) > 0, job
        assert job["job"].startswith("mv to /hosts/b/domains live persist"), job

    eventually(moving, timeout=20)
    assert (folder / "state").read_text() == "running\n"
    assert mover.wait(timeout=120) == 0, mover.stderr.read() if mover.stderr else ""
    # mv returned: the VM runs on b, and the folder is there (the same inode) and only there.
    assert virsh_state(second_uri, name) == "running"
    assert virsh_state(qemu_uri, name) == "absent"
    assert name in os.listdir(domains_b)
    assert name not in os.listdir(domains_a)
    moved = domains_b / name
    assert moved.stat().st_ino == inode
    assert (moved / "state").read_text() == "running\n"
    assert name in (moved / "info").read_text()
    assert info(moved / "job")["status"] == "completed"
    # user.migrate went with the folder; back to a (whose host name resolves) by mv again.
    sh(f"setfattr -n user.migrate -v 'live persist undefine-source' {moved}")
    sh(f"mv {moved} {domains_a}/")
    assert virsh_state(qemu_uri, name) == "running"
    assert virsh_state(second_uri, name) == "absent"
    assert name in os.listdir(domains_a) and name not in os.listdir(domains_b)
    assert (domains_a / name / "state").read_text() == "running\n"


def test_mv_to_a_new_name_and_of_a_shut_off_domain(both, qemu_uri, second_uri, name) -> None:
    folder = running_guest(both, "a", name)
    sh(f"setfattr -n user.migrate -v 'live,persist,undefine-source,{LOOPBACK.replace(' ', ',')}'"
       f" {folder}")
    assert xattr.getxattr(str(folder), "user.migrate").decode() == \
        f"live persist undefine-source {LOOPBACK}"
    domains_b = both.host("b") / "domains"
    sh(f"mv {folder} {domains_b}/{name}-b")  # dest-name
    assert virsh_state(second_uri, f"{name}-b") == "running"
    assert virsh_state(qemu_uri, name) == "absent"
    moved = domains_b / f"{name}-b"
    assert (moved / "state").read_text() == "running\n"
    # Shut off, it moves all the same: its definition goes (offline in place of live).
    sh(f"echo destroy > {moved}/control")
    sh(f"mv {moved} {both.host('a')}/domains/{name}")
    assert virsh_state(qemu_uri, name) == "shut off"
    assert virsh_state(second_uri, f"{name}-b") == "absent"
    assert (both.host("a") / "domains" / name / "state").read_text() == "shutoff\n"


def test_mv_within_one_host_still_renames(both, qemu_uri, name) -> None:
    domains = both.host("a") / "domains"
    (domains / name).mkdir()
    write_file(domains / name / "xml", guest_xml(name, 64))
    sh(f"mv {domains / name} {domains}/{name}-b")
    assert virsh_state(qemu_uri, f"{name}-b") == "shut off"
    sh(f"mv {domains}/{name}-b {domains / name}")


def test_control_lists_migrate_while_the_domain_can_be_migrated(
        mount_factory, qemu_uri, name, tmp_path) -> None:
    """`migrate` is listed like `wait`, a word that takes arguments: running, paused, or
    shut off (offline), on a hypervisor that migrates (test driver and LXC: not listed,
    tests/test_writing.py and test_lxc.py; while a job runs: not listed, test_qemu_jobs.py)."""
    mounted = mount_factory(f"a={qemu_uri}")
    folder = running_guest(mounted, "a", name)
    control = folder / "control"
    listing = control.read_text()
    assert listing == ("shutdown\nreboot\nreset\ndestroy\nsuspend\nmanaged-save\nmigrate\n"
                       "wait\n")
    # Alone, it is refused with its usage; nothing moves.
    result = sh(f"echo migrate > {control}", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert user_error(control).startswith("usage: migrate DEST [OPTIONS]: ")
    # A saved `control` written back is refused, never carried out.
    saved = tmp_path / "control"
    saved.write_text(listing)
    result = sh(f"cat {saved} > {control}", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert virsh_state(qemu_uri, name) == "running"
    sh(f"echo suspend > {control}")
    assert control.read_text() == "resume\nreset\ndestroy\nmanaged-save\nmigrate\nwait\n"
    sh(f"echo destroy > {control}")
    assert control.read_text() == "start\nstart-paused\nmigrate\nwait\n"
    assert virsh_state(qemu_uri, name) == "shut off"


def test_refused_migrations_leave_the_vm_running_at_the_source(
        both, qemu_uri, second_uri, name) -> None:
    folder = running_guest(both, "a", name)
    control = folder / "control"

    def refused(line: str, err: int) -> str:
        with pytest.raises(OSError) as caught:
            write_file(control, line + "\n")
        assert caught.value.errno == err, (line, caught.value)
        assert virsh_state(qemu_uri, name) == "running", line
        return user_error(control)

    message = refused("migrate b live sideways", errno.EINVAL)
    assert "'sideways'" in message and "bandwidth=MIB_PER_S" in message, message
    assert "migrate b" not in refused("migrate nowhere live", errno.EINVAL)
    assert "nowhere" in user_error(control)
    refused("migrate b live offline", errno.EINVAL)
    refused("migrate b bandwidth=fast", errno.EINVAL)
    refused("migrate b dest-xml=relative.xml", errno.EINVAL)
    refused("migrate", errno.EINVAL)
    refused("migrate a live", errno.EINVAL)  # where it is already
    # Unreachable: nothing listens on that port.
    message = refused("migrate qemu+tcp://127.0.0.1:1/system live", errno.ENOTCONN)
    assert "127.0.0.1:1" in message, message
    # The name is taken at the destination.
    taken = both.host("b") / "domains" / name
    taken.mkdir()
    write_file(taken / "xml", guest_xml(name, 64))
    with pytest.raises(OSError) as caught:
        write_file(control, f"migrate b live persist {LOOPBACK}\n")
    assert caught.value.errno == errno.EEXIST, caught.value
    assert "already exists" in user_error(control)
    assert virsh_state(qemu_uri, name) == "running"
    assert virsh_state(second_uri, name) == "shut off"
    result = sh(f"mv {folder} {both.host('b')}/domains/", check=False)
    assert result.returncode != 0
    assert virsh_state(qemu_uri, name) == "running"
    assert (folder / "state").read_text() == "running\n"
    # user.migrate is checked when set.
    result = sh(f"setfattr -n user.migrate -v 'live sideways' {folder}", check=False)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert "sideways" in user_error(folder)


def test_copying_programs_never_migrate(both, qemu_uri, name, tmp_path) -> None:
    """A rename by a program that copies files (rsync, tar, cp) is no migration anybody
    asked for: mv is the one way."""
    folder = running_guest(both, "a", name)
    sh(f"setfattr -n user.migrate -v 'live persist undefine-source {LOOPBACK}' {folder}")
    rsync = tmp_path / "rsync"  # a rename(2) made by a program called rsync
    shutil.copy("/bin/mv", rsync)
    result = run(rsync, folder, both.host("b") / "domains", check=False)
    assert result.returncode != 0
    assert virsh_state(qemu_uri, name) == "running"
    assert "mv does" in user_error(both.host("a") / "domains")


def test_progress_shows_while_the_vm_moves_slowly(both, qemu_uri, second_uri, name,
                                                   random_memory) -> None:
    folder = running_guest(both, "a", name, mib=2048, fill=random_memory(ENDS))
    writer = threading.Thread(target=sh, args=(
        f"echo 'migrate b live persist undefine-source bandwidth=1 {LOOPBACK}' "
        f"> {folder}/control",), kwargs={"timeout": 300})
    began = time.monotonic()
    writer.start()
    seen = []
    watched = []  # what `cat job` showed (drivers/jobs.py)
    here = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    while writer.is_alive():
        job = run("virsh", "-c", qemu_uri, "domjobinfo", name, check=False).stdout
        seen.append(job)
        with contextlib.suppress(OSError), open(os.open("job", os.O_RDONLY,
                                                        dir_fd=here)) as f:
            watched.append(f.read())
        time.sleep(0.5)
    os.close(here)
    writer.join()
    assert virsh_state(second_uri, name) == "running"
    assert time.monotonic() - began > 3
    assert any("Unbounded" in job for job in seen), seen[:3]
    moving = [text for text in watched if "operation: outgoing-migration" in text]
    assert moving, watched[:3]
    assert all("status: running\njob: migrate " in text for text in moving), moving[:3]
    processed = [int(line.split(": ")[1]) for text in moving
                 for line in text.splitlines() if line.startswith("data-processed: ")]
    assert len(set(processed)) >= 2 and processed == sorted(processed), processed


def test_a_killed_mv_aborts_the_migration(both, qemu_uri, second_uri, name,
                                          random_memory) -> None:
    folder = running_guest(both, "a", name, mib=2048, fill=random_memory(ABORTED))
    sh(f"setfattr -n user.migrate -v 'live persist undefine-source bandwidth=1 {LOOPBACK}' "
       f"{folder}")
    mover = subprocess.Popen(["mv", str(folder), str(both.host("b") / "domains")])
    eventually(lambda: assert_migrating(qemu_uri, name), timeout=20)
    mover.kill()
    mover.wait(timeout=10)
    eventually(lambda: assert_not_migrating(qemu_uri, name), timeout=30)
    assert virsh_state(qemu_uri, name) == "running"
    assert virsh_state(second_uri, name) == "absent"
    assert (folder / "state").read_text() == "running\n"


def assert_migrating(uri: str, domain: str) -> None:
    assert "Unbounded" in run("virsh", "-c", uri, "domjobinfo", domain, check=False).stdout


def assert_not_migrating(uri: str, domain: str) -> None:
    assert "Unbounded" not in run("virsh", "-c", uri, "domjobinfo", domain,
                                  check=False).stdout


def test_p2p_hands_the_migration_to_the_source_daemon(both, qemu_uri, second_uri, name) -> None:
    folder = running_guest(both, "a", name)
    # tunnelled: the data goes through the daemons' connection, so no migrate-uri.
    sh(f"echo 'migrate b p2p tunnelled live persist undefine-source' > {folder}/control")
    assert virsh_state(second_uri, name) == "running"
    assert virsh_state(qemu_uri, name) == "absent"
    # From the second daemon, a's URI (qemu:///system) means the second daemon itself.
    there = both.host("b") / "domains" / name
    with pytest.raises(OSError) as caught:
        write_file(there / "control", "migrate a p2p live persist undefine-source\n")
    assert "same host" in user_error(there / "control"), caught.value
    assert virsh_state(second_uri, name) == "running"


def test_a_uri_no_mounted_host_has_is_opened_for_the_call(
        mount_factory, qemu_uri, second_uri, name) -> None:
    mounted = mount_factory(f"a={qemu_uri}")
    folder = running_guest(mounted, "a", name)
    sh(f"echo 'migrate {second_uri} live persist undefine-source {LOOPBACK}' "
       f"> {folder}/control")
    assert virsh_state(second_uri, name) == "running"
    assert virsh_state(qemu_uri, name) == "absent"
    eventually(lambda: name not in os.listdir(mounted.host("a") / "domains"))


def test_abort_of_a_migration_leaves_the_vm_at_the_source(both, qemu_uri, second_uri,
                                                          name, random_memory) -> None:
    folder = running_guest(both, "a", name, mib=2048, fill=random_memory(ABORTED))
    writer = subprocess.Popen(
        ["bash", "-c", f"echo 'migrate b live persist undefine-source bandwidth=1 "
                       f"{LOOPBACK}' > {folder}/control"],
        stderr=subprocess.PIPE, text=True)

    def migrating() -> None:
        text = (folder / "job").read_text()
        assert "status: running" in text and "operation: outgoing-migration" in text, text
        assert "abort" in (folder / "control").read_text().split()
    eventually(migrating, timeout=20)
    sh(f"echo abort > {folder}/control")
    _, stderr = writer.communicate(timeout=30)
    assert writer.returncode != 0 and "Operation canceled" in stderr, stderr
    assert virsh_state(qemu_uri, name) == "running"
    assert virsh_state(second_uri, name) == "absent"
    assert (folder / "state").read_text() == "running\n"
    job = (folder / "job").read_text()
    assert "status: cancelled" in job and "job: migrate " in job, job


def test_job_shows_a_migration_moving_and_abort_leaves_the_vm_at_the_source(
        both, qemu_uri, second_uri, name, random_memory) -> None:
    folder = running_guest(both, "a", name, mib=2048, fill=random_memory(ABORTED))
    errors: list[OSError] = []

    def migrate() -> None:
        # Python's buffered close() writes a refused buffer again: that must not start a
        # second migration after the abort.
        try:
            write_file(folder / "control",
                       f"migrate b live persist undefine-source bandwidth=1 {LOOPBACK}\n")
        except OSError as e:
            errors.append(e)

    writer = threading.Thread(target=migrate)
    writer.start()
    try:
        def moved_some() -> dict[str, str]:
            job = info(folder / "job")
            assert job.get("status") == "running", job
            assert job.get("operation") == "outgoing-migration", job
            assert int(job.get("memory-processed", "0")) > 0, job
            return job

        first = eventually(moved_some, timeout=30)
        assert first["job"].startswith("migrate b"), first
        eventually(lambda: int(moved_some()["memory-processed"])
                   > int(first["memory-processed"]), timeout=10)
        # Other files of both hosts answer meanwhile.
        assert (folder / "state").read_text() == "running\n"
        assert "hostname" in (both.host("b") / "info").read_text()
        sh(f"echo abort > {folder}/control")
    finally:
        writer.join(timeout=120)
    assert len(errors) == 1 and errors[0].errno == errno.ECANCELED, errors
    assert virsh_state(qemu_uri, name) == "running"
    assert virsh_state(second_uri, name) == "absent"
    assert (folder / "state").read_text() == "running\n"
    assert info(folder / "job")["status"] == "cancelled"
