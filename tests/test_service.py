"""Running libvirtfs as a service: contrib/'s systemd unit and fstab lines, mount(8) and
umount(8), and a filesystem process that dies (ENOTCONN at once, then the documented
recovery).  SIGHUP's reload of `--config` is in test_hosts.py."""

from __future__ import annotations

import argparse
import errno
import faulthandler
import grp
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, eventually, run, sh, start_mount

from libvirtfs.mount import cli

UNIT = REPO / "contrib/systemd/libvirtfs@.service"
FSTAB = REPO / "contrib/systemd/fstab.example"
STATE = "hosts/test/domains/test/state"
LIBVIRTFS = [sys.executable, "-m", "libvirtfs.mount.cli"]


def unit_service_section() -> dict[str, str]:
    """The unit's [Service] settings, `Key=Value` a line, as written."""
    settings, section = {}, ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing: contrib/setup.sh installs the systemd package")
    # A template is verified as one of its instances, as systemctl would load it.
    shutil.copy(UNIT, tmp_path / "libvirtfs@virt.service")
    result = run("systemd-analyze", "verify", "./libvirtfs@virt.service", cwd=tmp_path,
                 check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


class Notifications:
    """The service manager's end of NOTIFY_SOCKET: what the unit's process says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float = 30) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()


def test_the_units_commands_mount_notify_reload_and_restart(tmp_path: Path) -> None:
    """What systemd does with libvirtfs@virt.service, done by hand (no systemd runs here):
    the unit's commands with %i expanded, /etc/libvirtfs and /mnt moved into the test's
    folder, NOTIFY_SOCKET and a journal stream as systemd sets them."""
    service = unit_service_section()
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"

    def command(key: str, pid: int = 0) -> list[str]:
        line = (service[key].replace("%i", "virt").replace("$MAINPID", str(pid))
                .replace("/etc/libvirtfs/", f"{tmp_path}/etc/")
                .replace("/mnt/", f"{tmp_path}/mnt/"))
        # This checkout's libvirtfs, wherever /usr/local/bin/libvirtfs points on this
        # machine (setup.sh run from another checkout moves it).
        return [word for part in shlex.split(line)
                for word in (LIBVIRTFS if part == "/usr/local/bin/libvirtfs" else [part])]

    (tmp_path / "etc").mkdir()
    (tmp_path / "mnt").mkdir()
    config = tmp_path / "etc/virt.toml"
    config.write_text('[mount]\noptions = "allow_other,timeout=10"\n\n'
                      '[[host]]\nname = "lab"\nuri = "test:///default"\n')
    mnt = tmp_path / "mnt/virt"
    notified = Notifications(tmp_path / "notify")
    journal = tmp_path / "journal"

    def start() -> subprocess.Popen:
        run(*command("ExecStartPre"))
        with open(journal, "ab") as stderr:
            stat = os.fstat(stderr.fileno())
            env = dict(os.environ, NOTIFY_SOCKET=str(notified.path),
                       JOURNAL_STREAM=f"{stat.st_dev}:{stat.st_ino}")
            process = subprocess.Popen(command("ExecStart"), stdin=subprocess.DEVNULL,
                                       stdout=stderr, stderr=stderr, env=env)
        assert notified.next() == "READY=1"
        # Ready means mounted: what is ordered After= it can use the mount at once.
        assert (mnt / "hosts/lab/domains/test/state").read_text() == "running\n"
        return process

    process = start()
    try:
        assert "allow_other" in sh(f"findmnt -n -o OPTIONS {mnt}").stdout
        # systemctl reload: the config file is read again, the mount stays.
        config.write_text(config.read_text() + '\n[[host]]\nname = "demo"\n'
                          'uri = "test:///default"\n')
        run(*command("ExecReload", process.pid))
        assert (notified.next(), notified.next()) == ("RELOADING=1", "READY=1")
        assert sorted(os.listdir(mnt / "hosts")) == ["demo", "lab"]

        # A crash: the unit's Restart= runs ExecStartPre and ExecStart again.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        with pytest.raises(OSError) as caught:
            os.listdir(mnt)
        assert caught.value.errno == errno.ENOTCONN
        process = start()
        assert sorted(os.listdir(mnt / "hosts")) == ["demo", "lab"]

        # systemctl stop: KillMode=mixed sends SIGTERM to libvirtfs alone.
        assert service["KillMode"] == "mixed"
        process.send_signal(signal.SIGTERM)
        assert notified.next() == "STOPPING=1"
        assert process.wait(timeout=15) == 0
        assert not os.path.ismount(mnt)
    finally:
        if process.poll() is None:
            process.kill()
        run("fusermount3", "-uz", mnt, check=False)
    # The journal files each line at its level (sd-daemon's <N> prefixes), and stamps
    # the time and pid itself.
    lines = journal.read_text().splitlines()
    assert "<6>libvirtfs.mount.serve: mounted lab at " + str(mnt) in lines, lines
    assert all(line.startswith(("<6>", "<4>", "<3>")) for line in lines), lines
    assert "Traceback" not in journal.read_text()


def fstab_example_options(line: int) -> str:
    """The options of contrib's fstab example line `line` (0: the first), without
    admin_group= where this checkout has no such option yet, and its group one that
    exists here."""
    rows = [row.split() for row in FSTAB.read_text().splitlines()
            if row.strip() and not row.startswith("#")]
    options = rows[line][3].split(",")
    known = "admin_group" in (REPO / "mount/options.py").read_text()
    group = grp.getgrgid(os.getgid()).gr_name
    return ",".join(f"admin_group={group}" if o.startswith("admin_group=") else o
                    for o in options if known or not o.startswith("admin_group="))


def test_mount_t_fuse_libvirtfs_and_umount(tmp_path: Path) -> None:
    mnt = tmp_path / "virt"
    mnt.mkdir()
    options = fstab_example_options(0)
    assert "_netdev" in options and "allow_other" in options
    result = sh(f"mount -t fuse.libvirtfs test:///default {mnt} -o {options}", check=False)
    assert result.returncode == 0, result.stderr
    try:
        assert (mnt / STATE).read_text() == "running\n"
        assert sh(f"findmnt -n -o FSTYPE,SOURCE {mnt}").stdout.split() == [
            "fuse.libvirtfs", "libvirtfs"]
    finally:
        assert run("umount", mnt, check=False).returncode == 0
    assert not os.path.ismount(mnt)
    eventually(lambda: _no_process_serves(mnt), timeout=10)


def _no_process_serves(mnt: Path) -> None:
    assert sh(f"pgrep -f 'libvirtfs.mount.cli.*{mnt}'", check=False).returncode == 1


def test_mount_a_with_a_test_fstab(tmp_path: Path) -> None:
    """The example's lines, pointed at the test driver and the test's folders: `mount -a`
    mounts the first and leaves the `noauto` one."""
    lab, demo = tmp_path / "virt", tmp_path / "demo"
    lab.mkdir()
    demo.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"lab=test:///default {lab} fuse.libvirtfs {fstab_example_options(0)} 0 0\n"
                     f"test:///default {demo} fuse.libvirtfs {fstab_example_options(1)} 0 0\n")
    assert "noauto" in fstab_example_options(1)
    result = sh(f"mount -a -T {fstab}", check=False)
    assert result.returncode == 0, result.stderr
    try:
        assert os.listdir(lab / "hosts") == ["lab"]
        assert not os.path.ismount(demo)
        result = sh(f"mount -T {fstab} {demo}", check=False)  # noauto: by its name only
        assert result.returncode == 0, result.stderr
        assert "ro" in sh(f"findmnt -n -o OPTIONS {demo}").stdout.split(",")
        assert (demo / STATE).read_text() == "running\n"
    finally:
        for mnt in (lab, demo):
            if os.path.ismount(mnt):
                assert run("umount", mnt, check=False).returncode == 0
    assert not os.path.ismount(lab)


def test_a_killed_process_gives_enotconn_at_once_and_fusermount_uz_recovers(
        tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mounted = start_mount(mnt, "test:///default", log=tmp_path / "log")
    # A reader in a loop, as a monitoring script would be; it stops after 3 failures.
    reader = subprocess.Popen(["bash", "-c", f"fails=0; while [ $fails -lt 3 ]; do "
                               f"cat {mnt / STATE} >/dev/null || fails=$((fails + 1)); done"],
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert reader.poll() is None
        mounted.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, errors = reader.communicate(timeout=10)
        assert time.monotonic() - killed < 3, "callers waited on a dead filesystem"
        # A read in flight when the process died ends with ECONNABORTED (and its close
        # with ENOTCONN); every call after it is ENOTCONN.
        reasons = [line.rpartition(": ")[2] for line in errors.splitlines()]
        assert reasons[-2:] == ["Transport endpoint is not connected"] * 2, errors
        assert set(reasons) <= {"Transport endpoint is not connected",
                                "Software caused connection abort"}, errors
        assert mounted.process.wait(timeout=5) == -signal.SIGKILL
        with pytest.raises(OSError) as caught:
            (mnt / STATE).read_text()
        assert caught.value.errno == errno.ENOTCONN
        # Mounting again over the dead mount says what to do.
        result = run(*LIBVIRTFS, "test:///default", mnt, check=False)
        assert result.returncode == 1
        assert result.stderr == (f"libvirtfs: mount point {mnt} is a mount whose filesystem "
                                 f"process is gone (Transport endpoint is not connected): "
                                 f"fusermount3 -uz {mnt}, then mount again\n")
        run("fusermount3", "-uz", mnt)
        again = start_mount(mnt, "test:///default", log=tmp_path / "log2")
        assert (mnt / STATE).read_text() == "running\n"
        assert again.unmount() == 0
    finally:
        if reader.poll() is None:
            reader.kill()
        if mounted.process.poll() is None:
            mounted.process.kill()
        run("fusermount3", "-uz", mnt, check=False)


def test_a_background_mounts_syslog_lines_name_libvirtfs_as_their_tag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """syslog takes what comes before the first colon for the program's name, and stamps
    the time itself: a line must not begin with a timestamp.  (This machine has no
    /dev/log, so the test's own socket stands in for it, in this process.)"""
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(tmp_path / "log"))
    syslog.settimeout(5)
    monkeypatch.setattr(cli, "SYSLOG", str(tmp_path / "log"))
    monkeypatch.setenv("LIBVIRTFS_STATE_DIR", str(tmp_path / "state"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        cli.setup_logging(argparse.Namespace(debug=False, log_file=None), background=True)
        logging.getLogger("libvirtfs.mount.serve").warning("host lab lost")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = handlers, level
        faulthandler.unregister(signal.SIGUSR1)
    # <12>: facility user (1 * 8) + warning (4).
    assert syslog.recv(4096) == (f"<12>libvirtfs[{os.getpid()}]: WARNING "
                                 f"libvirtfs.mount.serve: host lab lost\0").encode()
