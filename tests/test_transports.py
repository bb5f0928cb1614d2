"""Remote hosts reached the way administrators reach them: `qemu+ssh://` through an sshd
with key authentication, `qemu+tls://` with certificates, and SASL with a user name and
password from a credentials file named in `--config` (docs/mount.md#remote-hosts).

Every far end runs on 127.0.0.1, started and stopped by these tests (tests/remote_daemons.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import eventually, holding_open, run, sh, write_file
from remote_daemons import ExtraLibvirtd, Pki, Sshd

GUEST = """<domain type='qemu'>
  <name>{name}</name>
  <!-- a 64 MiB guest with no OS: SeaBIOS runs forever -->
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""

SASL_USER, SASL_PASSWORD = "lab", "correct horse battery staple"


def libvirtfs(*args: str | os.PathLike, timeout: float = 60) -> subprocess.CompletedProcess:
    """The command as a user types it: it goes to the background once mounted."""
    return run(sys.executable, "-m", "libvirtfs.mount.cli", *args, check=False,
               timeout=timeout)


def virsh_state(uri: str, name: str) -> str:
    done = run("virsh", "-c", uri, "domstate", name, check=False)
    return done.stdout.strip() if done.returncode == 0 else "absent"


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_credentials(path: Path, username: str, password: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(f'username = "{username}"\npassword = "{password}"\n')
    os.chmod(path, mode)
    return path


# -- credentials files: checked before any password is used (no daemon needed) ------------


def test_a_credentials_file_others_can_read_is_a_mount_error(tmp_path: Path) -> None:
    cred = write_credentials(tmp_path / "lab.cred", "lab", "secret", mode=0o644)
    config = write_config(tmp_path / "hosts.toml",
                          f'[[host]]\nname = "lab"\nuri = "test:///default"\n'
                          f'credentials = "{cred}"\n')
    (tmp_path / "mnt").mkdir()
    done = libvirtfs("--config", config, tmp_path / "mnt")
    assert done.returncode == 1, done
    assert done.stderr == (f"libvirtfs: cannot connect to test:///default (hosts/lab): "
                           f"credentials file {cred} has mode 0644: its group or others may "
                           f"read it; chmod 600 {cred}\n")
    assert "secret" not in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")

    # what the message says to do is enough; a relative path is the config file's folder's
    os.chmod(cred, 0o600)
    write_config(config, '[[host]]\nname = "lab"\nuri = "test:///default"\n'
                         'credentials = "lab.cred"\n')
    done = libvirtfs("--config", config, tmp_path / "mnt")
    assert done.returncode == 0, done
    try:
        assert (tmp_path / "mnt/hosts/lab/status").read_text() == "connected\n"
    finally:
        run("fusermount3", "-u", tmp_path / "mnt")


@pytest.mark.parametrize(("setup", "reason"), [
    ("ln -s lab.real lab.cred", "is a symbolic link; name the file itself"),
    ("mkdir -m 700 lab.cred", "is not a regular file"),
    ("true", "cannot read credentials file {cred}: No such file or directory"),
    ("printf 'username = \"lab\"\\npasword = \"x\"\\n' > lab.cred; chmod 600 lab.cred",
     "unknown key 'pasword'; the keys are password, username"),
    ("printf 'username = \"lab\"\\n' > lab.cred; chmod 600 lab.cred",
     "'password' must be a string"),
    ("printf 'password = s3cret\\n' > lab.cred; chmod 600 lab.cred",
     'is not TOML of the form username = "..." and password = "..."'),
])
def test_credentials_files_that_cannot_be_used(tmp_path: Path, setup: str, reason: str) -> None:
    write_credentials(tmp_path / "lab.real", "lab", "secret")
    sh(setup, cwd=tmp_path)
    cred = tmp_path / "lab.cred"
    config = write_config(tmp_path / "hosts.toml",
                          f'[[host]]\nuri = "test:///default"\ncredentials = "{cred}"\n')
    (tmp_path / "mnt").mkdir()
    done = libvirtfs("--config", config, tmp_path / "mnt")
    assert done.returncode == 1, done
    assert done.stderr.startswith("libvirtfs: cannot connect to test:///default: "), done
    assert reason.format(cred=cred) in done.stderr
    assert "s3cret" not in done.stderr and "secret" not in done.stderr


def test_credentials_come_from_the_config_file_only(tmp_path: Path) -> None:
    config = write_config(tmp_path / "hosts.toml",
                          '[[host]]\nuri = "test:///default"\ncredentials = 7\n')
    done = libvirtfs("--config", config, tmp_path)
    assert done.returncode == 2
    assert "'credentials' must be the path of a file, got 7" in done.stderr
    done = libvirtfs("--credentials", tmp_path / "x", "test:///default", tmp_path)
    assert done.returncode == 2
    assert "unrecognized arguments: --credentials" in done.stderr


# -- qemu+ssh:// -----------------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path: Path):
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.fixture
def guest(qemu_uri: str):
    name = f"transports10-{uuid.uuid4().hex[:8]}"
    yield name
    run("virsh", "-c", qemu_uri, "destroy", name, check=False)
    run("virsh", "-c", qemu_uri, "undefine", name, check=False)


@pytest.mark.qemu
def test_qemu_ssh_beside_a_local_host_and_a_dropped_connection(
        mount_factory, qemu_uri: str, sshd: Sshd, guest: str) -> None:
    if qemu_uri != "qemu:///system":
        pytest.skip("the ssh test reaches the test bed's daemon as qemu+ssh://.../system")
    mounted = mount_factory(f"far={sshd.uri()}", "test:///default")
    hosts = mounted.path / "hosts"
    assert sorted(os.listdir(hosts)) == ["far", "test"]
    assert [(hosts / h / "status").read_text() for h in ("far", "test")] == ["connected\n"] * 2
    assert "hypervisor: QEMU" in (hosts / "far/info").read_text()
    assert len(sshd.sessions()) > 0  # it really goes through our sshd

    # write and control through ssh; libvirt on the far side sees it
    folder = hosts / "far/domains" / guest
    folder.mkdir()
    write_file(folder / "xml", GUEST.format(name=guest))
    assert virsh_state(qemu_uri, guest) == "shut off"
    sh(f"echo start > {folder / 'control'}")
    assert (folder / "state").read_text() == "running\n"
    assert virsh_state(qemu_uri, guest) == "running"
    sh(f"echo destroy > {folder / 'control'}")
    assert (folder / "state").read_text() == "shutoff\n"

    # the connection drops (sshd's session killed): the host says so, then comes back
    events = subprocess.Popen(["cat", hosts / "far/events"], stdout=subprocess.PIPE,
                              text=True)
    try:
        holding_open(events)  # the reader is registered before the drop
        killed = sshd.drop_connections()
        assert killed
        status = hosts / "far/status"
        eventually(lambda: status.read_text() in (
            "disconnected: the daemon closed the connection\n", "connecting\n"), timeout=10)
        eventually(lambda: status.read_text() == "connected\n", timeout=20)
        # (the test bed is shared: other domains' events come in between)
        assert host_events(events, until="connected") == [
            ["host", "far", "disconnected", "eof"], ["host", "far", "connected", "-"]]
    finally:
        events.terminate()
        events.wait(timeout=5)
    assert set(sshd.sessions()) - set(killed)  # over a new ssh session
    sh(f"echo start > {folder / 'control'}")
    assert (folder / "state").read_text() == "running\n"
    assert virsh_state(qemu_uri, guest) == "running"
    sh(f"echo destroy > {folder / 'control'}")
    run("rmdir", folder)
    assert virsh_state(qemu_uri, guest) == "absent"
    assert (hosts / "test/domains/test/state").read_text() == "running\n"  # untouched


def host_events(reader: subprocess.Popen, until: str) -> list[list[str]]:
    """The `host` lines a reader of an events file has got, up to the first `until` one."""
    assert reader.stdout is not None
    found: list[list[str]] = []
    while not found or found[-1][2] != until:
        fields = reader.stdout.readline().split()[1:]
        assert fields, "the events file ended"
        if fields[0] == "host":
            found.append(fields)
    return found


# -- qemu+tls:// and SASL: an extra libvirtd of the tests' own ---------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def extra(qemu_uri: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    daemon = ExtraLibvirtd(tmp_path_factory.mktemp("extra-libvirtd"), pki,
                           {SASL_USER: SASL_PASSWORD})
    yield daemon
    daemon.stop()


@pytest.mark.qemu
def test_qemu_tls_with_the_tests_certificates(mount_factory, extra: ExtraLibvirtd, pki: Pki,
                                              tmp_path: Path) -> None:
    client = pki.client_folder(tmp_path / "pki")
    mounted = mount_factory(f"tls={extra.tls_uri(client)}", "test:///default")
    host = mounted.host("tls")
    assert (host / "status").read_text() == "connected\n"
    assert "hypervisor: QEMU" in (host / "info").read_text()
    name = f"transports10-tls-{uuid.uuid4().hex[:6]}"
    (host / "domains" / name).mkdir()
    write_file(host / "domains" / name / "xml", GUEST.format(name=name))
    assert (host / "domains" / name / "state").read_text() == "shutoff\n"
    run("rmdir", host / "domains" / name)
    assert os.listdir(host / "domains") == []


@pytest.mark.qemu
def test_a_client_without_a_valid_certificate_is_refused(extra: ExtraLibvirtd, pki: Pki,
                                                         tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    # a certificate from another CA: libvirt refuses to present it
    other = Pki(tmp_path / "other-ca", name="some other CA")
    forged = other.client_folder(tmp_path / "forged", ca=pki.cert)
    done = libvirtfs(f"tls={extra.tls_uri(forged)}", tmp_path / "mnt")
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"libvirtfs: cannot connect to {extra.tls_uri(forged)} "
                                  f"(hosts/tls): "), done.stderr
    assert (f"Our own certificate {forged}/clientcert.pem failed validation against "
            f"{forged}/cacert.pem: The certificate hasn't got a known issuer") in done.stderr

    # none at all: the daemon refuses the handshake
    bare = pki.client_folder(tmp_path / "bare", with_certificate=False)
    done = libvirtfs(f"tls={extra.tls_uri(bare)}", tmp_path / "mnt")
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"libvirtfs: cannot connect to {extra.tls_uri(bare)} "
                                  f"(hosts/tls): Unable to read TLS confirmation"), done.stderr
    assert "the daemon refused the TLS handshake" in done.stderr
    assert "Failed to verify peer's certificate" in extra.daemon_log()
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.qemu
def test_sasl_password_from_the_credentials_file(mount_factory, extra: ExtraLibvirtd,
                                                 tmp_path: Path) -> None:
    cred = write_credentials(tmp_path / "lab.cred", SASL_USER, SASL_PASSWORD)
    config = write_config(tmp_path / "hosts.toml",
                          f'[[host]]\nname = "lab"\nuri = "{extra.sasl_uri}"\n'
                          f'credentials = "{cred}"\n')
    mounted = mount_factory("test:///default", extra=("--config", str(config)))
    assert (mounted.host("lab") / "status").read_text() == "connected\n"
    assert "hypervisor: QEMU" in (mounted.host("lab") / "info").read_text()
    assert SASL_PASSWORD not in mounted.log()
    assert SASL_PASSWORD not in " ".join(mounted.process.args)

    # without credentials, or with a wrong password, the daemon says no
    (tmp_path / "mnt2").mkdir()
    done = libvirtfs(f"lab={extra.sasl_uri}", tmp_path / "mnt2")
    assert done.returncode == 1
    assert f"cannot connect to {extra.sasl_uri} (hosts/lab): authentication failed" \
        in done.stderr
    assert "asks for a user name and password: name a credentials file" in done.stderr
    write_credentials(cred, SASL_USER, "wrong")
    done = libvirtfs("--config", config, tmp_path / "mnt2")
    assert done.returncode == 1
    assert done.stderr == (f"libvirtfs: cannot connect to {extra.sasl_uri} (hosts/lab): "
                           f"authentication failed: authentication failed\n")
