"""Long operations as jobs on a real QEMU (issue 8): they outlast `-o timeout`, show their
progress in `job`, can be aborted, stall, and refuse a second job.

A guest without an OS has all-zero memory, which QEMU saves in a blink.  These guests get
768 MiB of random bytes loaded into their memory at start (QEMU's generic `loader`
device), so a save writes that much; at full speed that takes under two seconds here,
which a test acting while the job runs raced (an abort came after the save had ended, one
run in three).  So each guest's QEMU is capped to a few percent of one CPU while the test
acts (tests/cpucap.py), and its save lasts tens of seconds.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import eventually, run, sh, user_error
from cpucap import cpu_capped

pytestmark = pytest.mark.qemu

# The short -o timeout the long operations must outlast.  (1 s is too short for this shared
# machine's setup calls: a listing alone took 2.4 s under other tests' load.)
SHORT = 2.0
# QEMU's share of one CPU, in percent, while a test acts on its job: a save of the guests'
# memory then takes about 20 s (ACTING) or 7 s (WATCHING) here instead of under 2 s.
ACTING = 2
WATCHING = 5

FILLED_GUEST = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file={fill},addr=0x1000000,force-raw=on'/>
  </qemu:commandline>
</domain>
"""


@pytest.fixture(scope="module")
def fill() -> Path:
    """768 MiB of random bytes: what the guests' memory holds (where QEMU may read it)."""
    path = Path(f"/var/lib/libvirt/images/jobs-fill-{os.getpid()}.bin")
    run("dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=768", "status=none")
    yield path
    path.unlink()


@pytest.fixture
def guest(qemu_uri: str, fill: Path, tmp_path: Path):
    """A running guest with the filled memory, started by virsh before the test mounts: the
    start loads 768 MiB, which on a loaded machine takes longer than these mounts' short
    -o timeout (`echo start > control` then failed with ETIMEDOUT; starting is not what
    these tests are about)."""
    name = f"jobs-{uuid.uuid4().hex[:8]}"
    document = tmp_path / f"{name}.xml"
    document.write_text(FILLED_GUEST.format(name=name, fill=fill))
    try:
        run("virsh", "-c", qemu_uri, "define", document)
        run("virsh", "-c", qemu_uri, "start", name)
        yield name
    finally:
        run("virsh", "-c", qemu_uri, "destroy", name, check=False)
        run("virsh", "-c", qemu_uri, "undefine", "--managed-save", "--snapshots-metadata",
            name, check=False)


def running_guest(host: Path, name: str) -> Path:
    folder = host / "domains" / name
    assert (folder / "state").read_text() == "running\n"
    return folder


def job(folder: Path | int) -> dict[str, str]:
    """`cat job`; `folder` may be an open folder's descriptor (a shell cd'ed into it)."""
    if isinstance(folder, int):
        fd = os.open("job", os.O_RDONLY, dir_fd=folder)
        with open(fd) as f:
            text = f.read()
    else:
        text = (folder / "job").read_text()
    return dict(line.split(": ", 1) for line in text.splitlines())


class Writer(threading.Thread):
    """One `echo WORD > control` in the background; `error` is its OSError, if any."""

    def __init__(self, path: Path, text: str) -> None:
        super().__init__(daemon=True)
        self.path, self.text = path, text
        self.error: OSError | None = None
        self.took = 0.0

    def run(self) -> None:
        # One write(2), as echo does: a buffered file would write the word again when
        # it is closed after a failed write.
        began = time.monotonic()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.write(fd, self.text.encode())
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)
        self.took = time.monotonic() - began

    def result(self, timeout: float = 60.0) -> OSError | None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.text.strip()} did not return"
        return self.error


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())


def wait_for_progress(folder: Path) -> dict[str, str]:
    def moving() -> dict[str, str]:
        now = job(folder)
        assert now.get("status") == "running", now
        assert int(now.get("data-processed", "0")) > 0, now
        return now
    return eventually(moving, timeout=10)


def test_managed_save_outlasts_the_timeout_and_job_shows_it_moving(
        mount_factory, qemu_uri: str, guest: str) -> None:
    mounted = mount_factory(f"lab={qemu_uri}", options=f"timeout={SHORT}")
    host = mounted.host("lab")
    folder = running_guest(host, guest)
    assert (folder / "job").read_text() == ""
    seen: list[dict[str, str]] = []
    slowest = {"job": 0.0, "uri": 0.0, "info": 0.0, "networks": 0.0}

    def timed(name: str, read):
        began = time.monotonic()
        result = read()
        slowest[name] = max(slowest[name], time.monotonic() - began)
        return result

    with cpu_capped(qemu_pid(guest), WATCHING):  # the save lasts past SHORT, polled often
        writer = Writer(folder / "control", "managed-save\n")
        writer.start()
        # As `cd domains/VM; watch cat job` does: a path from the top would look the domain
        # up in domains/, whose listing waits for libvirt's lock on the domain at the end of
        # the save (see below).
        here = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        while writer.is_alive():
            now = timed("job", lambda: job(here))
            # The rest of the host keeps answering meanwhile.  (Not what touches this
            # domain: at the end of a save libvirt holds the domain's lock for seconds
            # while the image is flushed, and listAllDomains waits for it too.)
            assert timed("uri", (host / "uri").read_text)
            assert "hostname" in timed("info", (host / "info").read_text)
            assert timed("networks", lambda: os.listdir(host / "networks")) is not None
            if now.get("status") == "running":
                seen.append(now)
            time.sleep(0.1)
        os.close(here)
    assert writer.result() is None
    assert writer.took > SHORT, f"the save took {writer.took:.1f} s: not past the timeout"
    assert max(slowest.values()) < SHORT, f"slowest reads while the job ran: {slowest}"
    processed = [int(s["data-processed"]) for s in seen if "data-processed" in s]
    assert len(set(processed)) >= 2, seen  # `job` showed it moving
    assert processed == sorted(processed)
    sample = next(s for s in seen if "data-processed" in s)
    assert sample["job"] == "managed-save"
    assert sample["operation"] == "save"
    assert {"type", "elapsed-ms", "data-total", "memory-processed", "percent"} <= set(sample)
    assert (folder / "state").read_text() == "shutoff\n"
    done = job(folder)
    assert done["status"] == "completed" and done["job"] == "managed-save"
    assert "abort" not in (folder / "control").read_text().split()


def test_abort_of_a_running_managed_save(mount_factory, qemu_uri: str, guest: str) -> None:
    mounted = mount_factory(f"lab={qemu_uri}", options="timeout=5")
    folder = running_guest(mounted.host("lab"), guest)
    with cpu_capped(qemu_pid(guest), ACTING):  # the save is still running when abort comes
        writer = Writer(folder / "control", "managed-save\n")
        writer.start()
        progress = wait_for_progress(folder)
        words = (folder / "control").read_text().split()
        assert "abort" in words and "migrate" not in words, words  # a second job is EBUSY
        sh(f"echo abort > {folder}/control")
        error = writer.result()
    assert error is not None and error.errno == errno.ECANCELED, (error, progress)
    assert (folder / "state").read_text() == "running\n"
    done = job(folder)
    assert done["status"] == "cancelled", done
    assert done["error"]
    assert "abort" not in (folder / "control").read_text().split()
    assert "managed-save: no" in (folder / "info").read_text()


def test_a_second_job_on_the_domain_is_ebusy(mount_factory, qemu_uri: str, guest: str) -> None:
    mounted = mount_factory(f"lab={qemu_uri}", options="timeout=5")
    folder = running_guest(mounted.host("lab"), guest)
    pid = qemu_pid(guest)
    with cpu_capped(pid, ACTING):  # the save is still running when QEMU is stopped
        first = Writer(folder / "control", "managed-save\n")
        first.start()
        wait_for_progress(folder)
        os.kill(pid, signal.SIGSTOP)  # the first job lasts until QEMU runs again
        try:
            # Another shell: the kernel serialises one program's writes to one file.
            second = sh(f"echo managed-save > {folder}/control", check=False)
            assert "Device or resource busy" in second.stderr, second.stderr
            assert "a job runs on this domain already" in user_error(folder / "control")
            assert job(folder)["status"] == "running"
        finally:
            os.kill(pid, signal.SIGCONT)
    assert first.result() is None  # the first one is untouched
    assert (folder / "state").read_text() == "shutoff\n"
    assert job(folder)["status"] == "completed"


def test_a_job_without_progress_is_aborted_after_job_stall(
        mount_factory, qemu_uri: str, guest: str) -> None:
    """A stopped QEMU process answers nothing: the save cannot even begin, libvirt gives
    no job stats, and after job_stall seconds the job is aborted; the writer gets
    ETIMEDOUT and the VM runs on."""
    mounted = mount_factory(f"lab={qemu_uri}", options="timeout=5,job_stall=2")
    folder = running_guest(mounted.host("lab"), guest)
    pid = qemu_pid(guest)
    os.kill(pid, signal.SIGSTOP)
    try:
        writer = Writer(folder / "control", "managed-save\n")
        writer.start()
        def stalled() -> None:
            assert job(folder).get("aborting") == "no progress (job_stall)"
        eventually(stalled, timeout=15)
    finally:
        os.kill(pid, signal.SIGCONT)  # the abort reaches QEMU once it runs again
    error = writer.result()
    assert error is not None and error.errno == errno.ETIMEDOUT, error
    assert "job_stall" in user_error(folder / "control")
    done = job(folder)
    assert done["status"] == "cancelled" and "job_stall" in done["error"], done
    assert (folder / "state").read_text() == "running\n"


def test_a_memory_snapshot_is_a_job(
        mount_factory, qemu_uri: str, guest: str) -> None:
    """An external memory snapshot writes the guest's 768 MiB: past a short -o timeout, watched
    in `job`.  (Deleting it would be a job too, but libvirt 9.0 here fails to delete an
    external memory snapshot: "An error occurred, but the cause is unknown".)"""
    mounted = mount_factory(f"lab={qemu_uri}", options=f"timeout={SHORT}")
    folder = mounted.host("lab") / "domains" / guest
    memory = Path(f"/var/lib/libvirt/images/{guest}.mem")
    try:
        run("setfattr", "-n", "user.template", "-v",
            f"<domainsnapshot><memory snapshot='external' file='{memory}'/></domainsnapshot>",
            folder / "snapshots")
        maker = threading.Thread(target=lambda: run("mkdir", folder / "snapshots" / "warm"),
                                 daemon=True)
        seen: list[dict[str, str]] = []
        with cpu_capped(qemu_pid(guest), WATCHING):  # it lasts past SHORT, polled often
            began = time.monotonic()
            maker.start()
            here = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            while maker.is_alive():
                now = job(here)
                if now.get("status") == "running":
                    seen.append(now)
                time.sleep(0.1)
            os.close(here)
            took = time.monotonic() - began
        assert took > SHORT, f"the snapshot took {took:.1f} s: not past the timeout"
        assert "warm" in os.listdir(folder / "snapshots")
        assert any(int(s.get("data-processed", "0")) > 0 for s in seen), seen
        assert {s["job"] for s in seen} == {"snapshot warm"}
        assert {s.get("operation") for s in seen} <= {"snapshot", None}
        done = job(folder)
        assert done["status"] == "completed" and done["job"] == "snapshot warm", done
        assert memory.stat().st_size > 700 * 2**20
        assert (folder / "state").read_text() == "running\n"
    finally:
        run("virsh", "-c", qemu_uri, "snapshot-delete", guest, "warm", "--metadata",
            check=False)
        memory.unlink(missing_ok=True)
