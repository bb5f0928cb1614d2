"""The libvirtfs command: mounting, naming hosts, options, errors, and unmounting."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Mounted, run, sh, start_mount, stop_signal

LIBVIRTFS = [sys.executable, "-m", "libvirtfs.mount.cli"]


def libvirtfs(*args: str | Path, timeout: float = 60):
    return run(*LIBVIRTFS, *args, check=False, timeout=timeout)


def test_mount_goes_to_background_when_ready(tmp_path: Path) -> None:
    mnt = tmp_path / "virt"
    mnt.mkdir()
    result = libvirtfs("test:///default", mnt)
    try:
        assert result.returncode == 0, result.stderr
        # Usable on the very next line of a script.
        assert (mnt / "hosts/test/domains/test/state").read_text() == "running\n"
    finally:
        assert run("fusermount3", "-u", mnt, check=False).returncode == 0
    deadline = time.monotonic() + 10
    while sh(f"pgrep -f 'libvirtfs.mount.cli.*{mnt}'", check=False).returncode == 0:
        assert time.monotonic() < deadline, "the background process did not exit"
        time.sleep(0.1)


def test_hosts_are_named_and_made_unique(mount_factory) -> None:
    mounted = mount_factory("test:///default", "test:///default", "demo=test:///default")
    assert sorted(os.listdir(mounted.path / "hosts")) == ["demo", "test", "test-2"]
    assert (mounted.host("demo") / "uri").read_text() == "test:///default\n"


def test_no_uri_means_libvirts_default(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, LIBVIRT_DEFAULT_URI="test:///default")
    result = run("env", *[f"{k}={v}" for k, v in env.items()], *LIBVIRTFS, mnt)
    try:
        assert result.returncode == 0
        assert os.listdir(mnt / "hosts") == ["test"]
    finally:
        run("fusermount3", "-u", mnt)


def test_bad_uri_is_a_one_line_error_and_nothing_is_mounted(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (["nosuchdriver:///x", mnt], ["-f", "nosuchdriver:///x", mnt]):
        result = libvirtfs(*args)
        assert result.returncode != 0
        assert "cannot connect to nosuchdriver:///x" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not os.path.ismount(mnt)


def test_missing_or_busy_mount_point(mount_factory, tmp_path: Path) -> None:
    result = libvirtfs("test:///default", tmp_path / "nowhere")
    assert result.returncode != 0
    assert result.stderr == f"libvirtfs: mount point {tmp_path / 'nowhere'} does not exist\n"

    (tmp_path / "file").write_text("")
    result = libvirtfs("test:///default", tmp_path / "file")
    assert result.returncode != 0 and "is not a folder" in result.stderr

    mounted = mount_factory("test:///default")
    result = libvirtfs("test:///default", mounted.path)
    assert result.returncode != 0 and "is busy" in result.stderr
    assert (mounted.host() / "uri").read_text() == "test:///default\n"


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    result = libvirtfs("test:///default", tmp_path, "-o", "ro,frobnicate")
    assert result.returncode != 0
    assert "unknown mount option 'frobnicate'" in result.stderr
    result = libvirtfs("test:///default", tmp_path, "-o", "timeout=soon")
    assert result.returncode != 0 and "timeout" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(tmp_path: Path, signum: int) -> None:
    mounted = start_mount(tmp_path / "mnt", "test:///default", log=tmp_path / "log")
    assert stop_signal(mounted, signum) == 0
    assert not os.path.ismount(mounted.path)
    assert "Traceback" not in mounted.log()


def test_fusermount_u_ends_the_process(tmp_path: Path) -> None:
    mounted = start_mount(tmp_path / "mnt", "test:///default", log=tmp_path / "log")
    os.listdir(mounted.host() / "domains")
    assert mounted.unmount() == 0


def test_read_only_mount_from_fstab_style_command(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # What /etc/fstab's "test:///default MNT fuse.libvirtfs ro,allow_other 0 0" runs:
    # mount -> mount.fuse3 -> libvirtfs, found on mount's own PATH (contrib/setup.sh).
    result = sh(f"mount -t fuse.libvirtfs test:///default {mnt} "
                f"-o ro,allow_other,noauto,_netdev", check=False)
    assert result.returncode == 0, result.stderr
    try:
        assert (mnt / "hosts/test/domains/test/state").read_text() == "running\n"
        options = sh(f"findmnt -n -o OPTIONS {mnt}").stdout
        assert "ro" in options.split(",") and "allow_other" in options
        mode = os.stat(mnt / "hosts/test/domains/test/xml").st_mode
        assert mode & 0o222 == 0
    finally:
        run("umount", mnt)


def test_options_after_the_mount_point(mount_factory) -> None:
    mounted: Mounted = mount_factory("test:///default", options="ro,timeout=5")
    assert "ro" in sh(f"findmnt -n -o OPTIONS {mounted.path}").stdout.split(",")


@pytest.fixture
def silent_server():
    """A TCP port on loopback that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    clients: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                clients.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for client in clients:
        client.close()
    server.close()


def test_unresponsive_host_times_out_instead_of_hanging(tmp_path: Path, silent_server) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    started = time.monotonic()
    result = libvirtfs(f"qemu+tcp://127.0.0.1:{silent_server}/system", mnt, "-o", "timeout=2",
                       timeout=30)
    assert result.returncode != 0
    assert "did not answer" in result.stderr
    assert time.monotonic() - started < 15
    assert not os.path.ismount(mnt)
