"""Hosts: the config file, `status`, and hosts added and removed while mounted (mkdir, uri,
rmdir, mv), read-only hosts, and keepalive on a remote host that stops answering."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Mounted, eventually, expect_errno, run, sh, user_error, write_file

DEMO = "test:///default"
LIBVIRTFS = [sys.executable, "-m", "libvirtfs.mount.cli"]


def wait_for(predicate, timeout: float = 5.0) -> None:
    """Until predicate() is true (eventually() retries failed assertions)."""
    def check() -> None:
        assert predicate()
    eventually(check, timeout)


def hosts(mounted: Mounted) -> list[str]:
    return sorted(os.listdir(mounted.path / "hosts"))


def echo(text: str, path: Path) -> subprocess.CompletedProcess[str]:
    """`echo TEXT > PATH` in a shell; check its returncode and stderr."""
    return sh(f"echo '{text}' > '{path}'", check=False)


# -- the config file -------------------------------------------------------------------


def test_config_file_and_command_line_hosts_together(mount_factory, tmp_path: Path) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f"""
[[host]]
name = "lab"
uri = "{DEMO}"
timeout = 5
keepalive_interval = 2
keepalive_count = 4

[[host]]
name = "archive"
uri = "{DEMO}"
read_only = true
""")
    mounted = mount_factory(DEMO, extra=("--config", str(config)))
    assert hosts(mounted) == ["archive", "lab", "test"]
    for name in ("archive", "lab", "test"):
        assert (mounted.host(name) / "status").read_text() == "connected\n"
        assert (mounted.host(name) / "uri").read_text() == DEMO + "\n"


def test_a_read_only_host_refuses_every_change_with_erofs(mount_factory,
                                                           tmp_path: Path) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "archive"\nuri = "{DEMO}"\nread_only = true\n')
    mounted = mount_factory(DEMO, extra=("--config", str(config)))
    archive = mounted.host("archive")
    domain = archive / "domains/test"
    assert (domain / "state").read_text() == "running\n"
    refused = echo("suspend", domain / "control")
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    expect_errno(errno.EROFS, os.mkdir, archive / "domains/new")
    expect_errno(errno.EROFS, os.rmdir, domain)
    expect_errno(errno.EROFS, os.rename, domain, archive / "domains/renamed")
    expect_errno(errno.EROFS, write_file, domain / "autostart", "1")
    expect_errno(errno.EROFS, os.mkdir, domain / "snapshots/s1")
    assert run("ls", "-l", domain / "control").stdout.startswith("-r--r--r--")
    assert run("ls", "-ld", domain).stdout.startswith("dr-xr-xr-x")
    assert (domain / "state").read_text() == "running\n"
    # The other host of the mount is writable as ever.
    assert echo("suspend", mounted.host() / "domains/test/control").returncode == 0
    wait_for(lambda: (domain / "state").read_text() == "paused\n")
    assert echo("resume", mounted.host() / "domains/test/control").returncode == 0
    # Disconnecting a read-only host changes nothing in libvirt: allowed.
    os.rmdir(archive)
    assert hosts(mounted) == ["test"]


def test_per_host_timeout_overrides_the_mount_option(mount_factory, tmp_path: Path) -> None:
    # A host that accepts connections and never answers: the config's 2 s bound the
    # connect of `slow`, not -o timeout=60.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "slow"\nuri = "qemu+tcp://127.0.0.1:{port}/system"\n'
                      f'timeout = 2\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        began = time.monotonic()
        result = run(*LIBVIRTFS, "-f", "--config", config, DEMO, mnt, "-o", "timeout=60",
                     check=False, timeout=30)
        assert time.monotonic() - began < 15
        assert result.returncode == 1
        assert "cannot connect to qemu+tcp://127.0.0.1" in result.stderr
        assert "did not answer within 2 s" in result.stderr
        assert not os.path.ismount(mnt)
    finally:
        listener.close()


@pytest.mark.parametrize(("text", "message"), [
    ('[[host]]\nname = "a"\nuri = "test:///default"\ncolour = "red"\n',
     "hosts.toml: host 1 ('a'): unknown key 'colour'"),
    ('[[host]]\nuri = "test:///default"\ntimeout = "10"\n',
     "hosts.toml: host 1: 'timeout' must be a number of seconds, got '10'"),
    ('[[host]]\nuri = "test:///default"\nread_only = "yes"\n',
     "hosts.toml: host 1: 'read_only' must be true or false, got 'yes'"),
    ('[[host]]\nuri = "test:///default"\nkeepalive_count = 0\n',
     "hosts.toml: host 1: 'keepalive_count' must be a whole number from 1 to 3600, got 0"),
    ('[[host]]\nname = "a"\nuri = "test:///default"\n'
     '[[host]]\nname = "a"\nuri = "test:///default"\n',
     "host name 'a' is given twice: by "),
    ('[[host]]\nname = "a"\n', "hosts.toml: host 1 ('a'): 'uri' is missing"),
    ('[[host]]\nname = "a/b"\nuri = "test:///default"\n', "cannot be a folder name"),
    ('[host]\nuri = "test:///default"\n', "'host' must be tables written [[host]]"),
    ('hosts = 1\n', "unknown key 'hosts'"),
    ('[[host]\n', "is not valid TOML"),
    ('[mount]\noptions = "ro,frobnicate"\n',
     "hosts.toml: [mount]: unknown mount option 'frobnicate'"),
    ('[mount]\nmountpoint = "/mnt/virt"\n', "hosts.toml: [mount]: unknown key 'mountpoint'"),
    ('[mount]\noptions = ["ro"]\n', "hosts.toml: [mount]: 'options' must be a string"),
])
def test_a_bad_config_file_is_a_one_line_error(tmp_path: Path, text: str,
                                               message: str) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(text)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run(*LIBVIRTFS, "--config", config, mnt, check=False)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("libvirtfs: "), result.stderr
    assert message in lines[0]
    assert not os.path.ismount(mnt)


def test_a_name_in_the_file_and_on_the_command_line_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "lab"\nuri = "{DEMO}"\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run(*LIBVIRTFS, "--config", config, f"lab={DEMO}", mnt, check=False)
    assert result.returncode == 2
    assert result.stderr == (f"libvirtfs: host name 'lab' is given twice: by the command "
                             f"line and by {config}: host 1 ('lab')\n")
    missing = run(*LIBVIRTFS, "--config", tmp_path / "nope.toml", mnt, check=False)
    assert missing.returncode == 2
    assert "cannot read config file" in missing.stderr and "No such file" in missing.stderr


def test_the_files_mount_options_come_before_the_command_lines(mount_factory,
                                                              tmp_path: Path) -> None:
    config = tmp_path / "virt.toml"
    config.write_text(f'[mount]\noptions = "ro,timeout=5"\n\n[[host]]\nuri = "{DEMO}"\n')
    read_only = mount_factory(extra=("--config", str(config)), name="ro")
    assert "ro" in sh(f"findmnt -n -o OPTIONS {read_only.path}").stdout.split(",")
    expect_errno(errno.EROFS, os.mkdir, read_only.host() / "domains/new")
    writable = mount_factory(extra=("--config", str(config)), options="rw", name="rw")
    assert "rw" in sh(f"findmnt -n -o OPTIONS {writable.path}").stdout.split(",")


def test_a_derived_name_steps_around_the_names_given(mount_factory, tmp_path: Path) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "test"\nuri = "{DEMO}"\n')
    mounted = mount_factory(DEMO, extra=("--config", str(config)))
    assert hosts(mounted) == ["test", "test-2"]


# -- SIGHUP: reading the config file again ------------------------------------------------


def hup(mounted: Mounted) -> None:
    """`kill -HUP PID`, then wait until the mount says it reloaded (or why not)."""
    def done() -> int:
        return sum("reloaded " in line or "nothing changed" in line
                   for line in mounted.log().splitlines())
    before = done()
    sh(f"kill -HUP {mounted.process.pid}")
    wait_for(lambda: done() > before, timeout=30)


@pytest.fixture
def other_host(tmp_path: Path) -> str:
    """A test:/// host of its own, with one domain `other`."""
    path = tmp_path / "other.xml"
    path.write_text("<node><domain type='test'><name>other</name><memory>65536</memory>"
                    "<vcpu>1</vcpu><os><type>hvm</type></os></domain></node>")
    return f"test://{path}"


def test_sighup_adds_removes_and_reconnects_the_config_files_hosts(
        mount_factory, tmp_path: Path, other_host: str) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "lab"\nuri = "{DEMO}"\n\n'
                      f'[[host]]\nname = "archive"\nuri = "{DEMO}"\n\n'
                      f'[[host]]\nname = "gone"\nuri = "{DEMO}"\n')
    mounted = mount_factory(DEMO, extra=("--config", str(config)))
    assert hosts(mounted) == ["archive", "gone", "lab", "test"]
    os.rmdir(mounted.host("gone"))  # an rmdir lasts until the file is read again

    config.write_text(f'[[host]]\nname = "lab"\nuri = "{other_host}"\n\n'
                      f'[[host]]\nname = "second"\nuri = "{DEMO}"\n\n'
                      f'[[host]]\nname = "gone"\nuri = "{DEMO}"\n\n'
                      f'[[host]]\nuri = "{DEMO}"\n')
    hup(mounted)
    # archive went (libvirt untouched), second is new, lab points elsewhere now, gone is
    # back, and the unnamed table steps around the command line's test.
    assert hosts(mounted) == ["gone", "lab", "second", "test", "test-2"]
    assert os.listdir(mounted.host("lab") / "domains") == ["other"]
    assert (mounted.host("lab") / "uri").read_text() == other_host + "\n"
    for name in ("gone", "lab", "second", "test", "test-2"):
        assert (mounted.host(name) / "status").read_text() == "connected\n"
    assert mounted.process.poll() is None and os.path.ismount(mounted.path)
    assert run("virsh", "-c", DEMO, "domstate", "test").stdout.strip() == "running"


def test_sighup_applies_a_hosts_changed_options(mount_factory, tmp_path: Path) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "lab"\nuri = "{DEMO}"\nread_only = true\n')
    mounted = mount_factory(extra=("--config", str(config)))
    xml = mounted.host("lab") / "domains/test/xml"
    assert os.stat(xml).st_mode & 0o222 == 0
    config.write_text(f'[[host]]\nname = "lab"\nuri = "{DEMO}"\ntimeout = 5\n')
    hup(mounted)
    wait_for(lambda: os.stat(xml).st_mode & 0o200)
    assert "hosts/lab connected again" in mounted.log()


def test_a_bad_config_file_on_sighup_changes_nothing(mount_factory, tmp_path: Path) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "lab"\nuri = "{DEMO}"\n')
    mounted = mount_factory(DEMO, extra=("--config", str(config)))
    for text, why in [
            ("[[host]\n", "is not valid TOML"),
            (f'[[host]]\nname = "lab"\nuri = "{DEMO}"\ncolour = "red"\n', "unknown key 'colour'"),
            # The command line's host is not the file's to replace; nor is lab removed.
            (f'[[host]]\nname = "test"\nuri = "{DEMO}"\n',
             "hosts/test is a host of the command line or of mkdir")]:
        config.write_text(text)
        hup(mounted)
        assert why in mounted.log().splitlines()[-1]
        assert mounted.log().splitlines()[-1].endswith("nothing changed")
        assert hosts(mounted) == ["lab", "test"]
    # A host that cannot be connected is logged, and keeps its folder as it was.
    config.write_text('[[host]]\nname = "lab"\nuri = "nosuchdriver:///x"\n')
    hup(mounted)
    assert "cannot connect to nosuchdriver:///x" in mounted.log()
    assert hosts(mounted) == ["lab", "test"]
    assert (mounted.host("lab") / "uri").read_text() == DEMO + "\n"
    assert (mounted.host("lab") / "domains/test/state").read_text() == "running\n"


def test_sighup_without_a_config_file_only_says_so(mount_factory) -> None:
    mounted = mount_factory(DEMO)
    sh(f"kill -HUP {mounted.process.pid}")
    wait_for(lambda: "nothing to reload (mounted without --config)" in mounted.log())
    assert (mounted.host() / "domains/test/state").read_text() == "running\n"


# -- adding and removing hosts while mounted ---------------------------------------------


def test_mkdir_then_uri_connects_a_host(mount_factory) -> None:
    mounted = mount_factory(DEMO, options="cache_timeout=60")
    second = mounted.path / "hosts/second"
    os.mkdir(second)
    assert os.listdir(second) == ["uri"]
    assert run("ls", "-l", second / "uri").stdout.startswith("-rw-r--r--")
    assert (second / "uri").read_text() == ""
    result = echo(DEMO, second / "uri")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(second)) == ["capabilities.xml", "domains", "info", "networks",
                                          "pools", "status", "uri"]
    assert (second / "status").read_text() == "connected\n"
    assert (second / "uri").read_text() == DEMO + "\n"
    assert run("ls", "-l", second / "uri").stdout.startswith("-r--r--r--")
    assert (second / "domains/test/state").read_text() == "running\n"
    # Events are registered on the new host: with a 60 s cache, its tree still follows a
    # change made elsewhere (through the other host folder, the same test driver).
    assert echo("suspend", mounted.host() / "domains/test/control").returncode == 0
    wait_for(lambda: (second / "domains/test/state").read_text() == "paused\n")
    assert echo("resume", mounted.host() / "domains/test/control").returncode == 0
    wait_for(lambda: (second / "domains/test/state").read_text() == "running\n")
    # Connected: the uri is not written again.
    expect_errno(errno.EACCES, write_file, second / "uri", "test:///default\n")


def test_a_bad_uri_is_an_error_on_the_write_and_the_folder_stays_pending(
        mount_factory) -> None:
    mounted = mount_factory(DEMO)
    new = mounted.path / "hosts/new"
    os.mkdir(new)
    result = echo("nosuchdriver:///x", new / "uri")
    assert result.returncode == 1
    assert "Invalid argument" in result.stderr
    assert user_error(new / "uri") == "no connection driver available for nosuchdriver:///x"
    assert os.listdir(new) == ["uri"]
    assert (new / "uri").read_text() == ""
    result = echo("qemu+tcp://127.0.0.1:1/system", new / "uri")
    assert "Transport endpoint is not connected" in result.stderr
    assert "Connection refused" in user_error(new / "uri")
    expect_errno(errno.EINVAL, write_file, new / "uri", "two words\n")
    assert os.listdir(new) == ["uri"]
    # A good URI afterwards connects it after all, and clears the error.
    assert echo(DEMO, new / "uri").returncode == 0
    assert (new / "status").read_text() == "connected\n"
    assert "user.error" not in run("getfattr", "-d", new / "uri").stdout
    # A pending folder goes with a plain rmdir; nothing was connected.
    os.mkdir(mounted.path / "hosts/other")
    os.rmdir(mounted.path / "hosts/other")
    assert hosts(mounted) == ["new", "test"]


def test_connecting_is_bounded_by_the_timeout(mount_factory) -> None:
    listener = socket.socket()  # accepts, never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        mounted = mount_factory(DEMO, options="timeout=2")
        new = mounted.path / "hosts/new"
        os.mkdir(new)
        began = time.monotonic()
        result = echo(f"qemu+tcp://127.0.0.1:{port}/system", new / "uri")
        assert time.monotonic() - began < 10
        assert "Connection timed out" in result.stderr
        assert "did not answer within 2 s" in user_error(new / "uri")
        assert os.listdir(new) == ["uri"]
        # The rest of the mount answers meanwhile and after.
        assert (mounted.host() / "status").read_text() == "connected\n"
    finally:
        listener.close()


def test_mkdir_of_an_existing_host_and_on_a_read_only_mount(mount_factory) -> None:
    mounted = mount_factory(DEMO)
    expect_errno(errno.EEXIST, os.mkdir, mounted.path / "hosts/test")
    read_only = mount_factory(DEMO, options="ro", name="ro")
    expect_errno(errno.EROFS, os.mkdir, read_only.path / "hosts/new")
    expect_errno(errno.EROFS, os.rmdir, read_only.host())


def test_rmdir_disconnects_a_host_and_leaves_libvirt_alone(mount_factory) -> None:
    mounted = mount_factory(DEMO, f"second={DEMO}")
    second = mounted.host("second")
    status = second / "status"
    with open(status) as held:  # an open file of a host that goes reads as it was
        os.rmdir(second)
        assert held.read() == "connected\n"
    assert hosts(mounted) == ["test"]
    expect_errno(errno.ENOENT, os.stat, second)
    # Its domain is still there, seen through the other host folder.
    assert (mounted.host() / "domains/test/state").read_text() == "running\n"
    assert "host second detached (test:///default)" in mounted.log()
    # And the name can be connected again.
    os.mkdir(second)
    assert echo(DEMO, second / "uri").returncode == 0
    assert (second / "domains/test/state").read_text() == "running\n"


def test_rm_rf_does_not_disconnect_a_host(mount_factory) -> None:
    mounted = mount_factory(DEMO, f"second={DEMO}")
    second = mounted.host("second")
    result = run("rm", "-rf", second, check=False)
    assert result.returncode != 0
    assert (second / "status").read_text() == "connected\n"
    assert (second / "domains/test/state").read_text() == "running\n"
    result = run("find", second, "-delete", check=False)
    assert result.returncode != 0
    expect_errno(errno.ENOTEMPTY, os.rmdir, second)  # rm -d, Python's rmtree, ... too
    assert "tried to delete the files in it" in user_error(mounted.path / "hosts")
    assert (second / "status").read_text() == "connected\n"
    # Asked again, on purpose: done.
    os.rmdir(second)
    assert hosts(mounted) == ["test"]


def test_mv_renames_a_host_folder(mount_factory) -> None:
    mounted = mount_factory(DEMO, f"second={DEMO}")
    run("mv", mounted.host("second"), mounted.path / "hosts/lab")
    assert hosts(mounted) == ["lab", "test"]
    assert (mounted.host("lab") / "domains/test/state").read_text() == "running\n"
    assert (mounted.host("lab") / "status").read_text() == "connected\n"
    # Never onto another host, never out of hosts/.
    result = run("mv", "-T", mounted.host("lab"), mounted.host("test"), check=False)
    assert "File exists" in result.stderr
    expect_errno(errno.EPERM, os.rename, mounted.host("lab"),
                 mounted.host() / "domains/lab")
    assert hosts(mounted) == ["lab", "test"]


def test_status_answers_at_once_for_every_host(mount_factory) -> None:
    mounted = mount_factory(DEMO, f"second={DEMO}")
    for name in ("test", "second"):
        status = mounted.host(name) / "status"
        assert status.read_text() == "connected\n"
        assert os.stat(status).st_size == len("connected\n")


# -- keepalive on a remote host ---------------------------------------------------------

SECOND_PIDFILE = Path("/run/libvirtfs-testbed/libvirtd-second.pid")


@pytest.fixture
def second_uri(qemu_uri: str) -> str:
    """The second libvirtd of the test bed (contrib/qemu-testbed.sh start-second)."""
    result = run("bash", Path(__file__).parent.parent / "contrib/qemu-testbed.sh",
                 "start-second", check=False, timeout=120)
    if result.returncode != 0:
        pytest.skip(f"no second libvirtd: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.qemu
def test_a_host_that_stops_answering_is_noticed_by_keepalive(mount_factory, tmp_path: Path,
                                                             second_uri: str) -> None:
    config = tmp_path / "hosts.toml"
    config.write_text(f'[[host]]\nname = "second"\nuri = "{second_uri}"\n'
                      f'keepalive_interval = 1\nkeepalive_count = 2\n')
    mounted = mount_factory(DEMO, extra=("--config", str(config)))
    status = mounted.host("second") / "status"
    assert status.read_text() == "connected\n"
    pid = int(SECOND_PIDFILE.read_text())
    seen: list[str] = []

    def read_status() -> str:
        began = time.monotonic()
        text = status.read_text()
        assert time.monotonic() - began < 1.0, "status must answer at once"
        seen.append(text)
        return text

    os.kill(pid, signal.SIGSTOP)  # vanishes without closing TCP
    try:
        stopped = time.monotonic()
        wait_for(lambda: read_status().startswith("disconnected: "), timeout=10)
        noticed = time.monotonic() - stopped
        assert read_status().startswith("disconnected: no answer to keepalive messages"), seen
        assert noticed < 8, noticed
        # The other host answers meanwhile.
        assert (mounted.host() / "status").read_text() == "connected\n"
        # A read of the host opens a new connection, which waits on the stopped daemon.
        reader = subprocess.Popen(["cat", mounted.host("second") / "info"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: read_status() == "connecting\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: read_status() == "connected\n", timeout=30)
    assert reader.wait(timeout=30) == 0
    assert os.listdir(mounted.host("second") / "domains") is not None


def test_status_of_a_host_being_connected_in_another_thread(mount_factory) -> None:
    """A second write to a pending `uri` while the first one connects: EBUSY."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        mounted = mount_factory(DEMO, options="timeout=3")
        new = mounted.path / "hosts/new"
        os.mkdir(new)
        first = threading.Thread(target=echo, args=(f"qemu+tcp://127.0.0.1:{port}/system",
                                                    new / "uri"))
        first.start()
        time.sleep(0.5)
        result = echo(DEMO, new / "uri")
        assert "Device or resource busy" in result.stderr
        expect_errno(errno.EBUSY, os.rmdir, new)
        first.join()
        assert os.listdir(new) == ["uri"]
    finally:
        listener.close()


def test_a_hung_host_answers_status_at_once(mount_factory, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host_xml = tmp_path / "sick.xml"
    host_xml.write_text("<node><domain type='test'><name>vm</name><memory>65536</memory>"
                        "<vcpu>1</vcpu><os><type>hvm</type></os></domain></node>")
    rules = tmp_path / "faults"  # drivers/faults.py: every call of `sick` waits 5 s
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    uri = f"test://{host_xml}"
    mounted = mount_factory(f"sick={uri}", DEMO, options="timeout=1,cache_timeout=0")
    status = mounted.host("sick") / "status"
    assert status.read_text() == "connected\n"
    rules.write_text(f"{uri} delay 5\n")
    try:
        expect_errno(errno.ETIMEDOUT, (mounted.host("sick") / "info").read_text)

        def answered_at_once() -> str:
            began = time.monotonic()
            text = status.read_text()
            assert time.monotonic() - began < 0.5
            return text

        wait_for(lambda: answered_at_once().startswith(
            "disconnected: not answering (a liveness probe has waited"))
        assert (mounted.host() / "status").read_text() == "connected\n"
    finally:
        rules.unlink()
    wait_for(lambda: answered_at_once() == "connected\n", timeout=15)
    assert "vm" in os.listdir(mounted.host("sick") / "domains")


def test_a_host_added_while_mounted_is_reconnected_in_the_background(
        mount_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host_xml = tmp_path / "late.xml"
    host_xml.write_text("<node><domain type='test'><name>vm</name><memory>65536</memory>"
                        "<vcpu>1</vcpu><os><type>hvm</type></os></domain></node>")
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    uri = f"test://{host_xml}"
    # A long cache: the stat below asks libvirt once (its lookup), and nothing else does.
    mounted = mount_factory(DEMO, options="cache_timeout=60")
    late = mounted.path / "hosts/late"
    os.mkdir(late)
    assert echo(uri, late / "uri").returncode == 0
    rules.write_text(f"{uri} drop\n")  # the connection is closed under the next call
    os.stat(late / "info")  # that call (a stat renders `info` for its size)
    assert (late / "status").read_text() == "disconnected: the daemon closed the connection\n"
    # Nobody reads the host; the mount reconnects it by itself, as a startup host.
    wait_for(lambda: (late / "status").read_text() == "connected\n", timeout=15)
    assert "vm" in os.listdir(late / "domains")


def test_migrating_to_a_hung_host_of_the_mount_fails_at_once(mount_factory, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """The destination's connection is asked through the ordinary, bounded path before
    the job: inside the job nothing bounds a call to a destination that never answers
    (libvirt's job on the source shows no counters to stall on)."""
    host_xml = tmp_path / "sick.xml"
    host_xml.write_text("<node/>")
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    uri = f"test://{host_xml}"
    mounted = mount_factory(DEMO, f"sick={uri}", options="timeout=1,cache_timeout=0")
    rules.write_text(f"{uri} delay 5\n")
    try:
        expect_errno(errno.ETIMEDOUT, (mounted.host("sick") / "info").read_text)
        wait_for(lambda: (mounted.host("sick") / "status").read_text().startswith(
            "disconnected: not answering"))
        control = mounted.host() / "domains/test/control"
        expect_errno(errno.ETIMEDOUT, write_file, control, "migrate sick live\n")
        assert "not answering" in user_error(control)
    finally:
        rules.unlink()
    assert (mounted.host() / "domains/test/state").read_text() == "running\n"
