"""The far ends of libvirt's remote transports, started by the tests on loopback: an `sshd`
with its own configuration, host key and client key, a certificate authority with
certificates made by `certtool`, and an extra `libvirtd` listening for TLS and for SASL on
TCP, each in a temporary folder and stopped by the fixture that started it.

The extra libvirtd runs as the second daemon of contrib/qemu-testbed.sh does (a private
mount namespace with its own /run/libvirt, /etc/libvirt, ...), but in the foreground, as
a child of the test, on ports of its own: the second daemon (16510) is left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run

LOOPBACK = "127.0.0.1"
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself: it must be started by absolute path


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None and not os.path.exists(p)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (contrib/qemu-testbed.sh install)")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect((LOOPBACK, port))
            return
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s:\n"
                               + log.read_text(errors="replace")[-3000:])
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = run("pgrep", "-P", str(parent), check=False).stdout.split()
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


class Sshd:
    """`sshd` on 127.0.0.1:PORT that lets root in with a key made here, and nothing else."""

    def __init__(self, folder: Path) -> None:
        need(SSHD, "ssh", "ssh-keygen")
        folder.mkdir(parents=True)
        self.folder = folder
        self.port = free_port()
        self.host_key = folder / "ssh_host_ed25519_key"
        self.client_key = folder / "id_ed25519"  # the keyfile= of the URI
        for key in (self.host_key, self.client_key):
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "libvirtfs-test",
                "-f", key)
        authorized = folder / "authorized_keys"
        authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        config = folder / "sshd_config"
        config.write_text(f"""\
ListenAddress {LOOPBACK}
Port {self.port}
HostKey {self.host_key}
PidFile {folder / "sshd.pid"}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel VERBOSE
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation folder
        run(SSHD, "-t", "-f", config)
        self.log = folder / "sshd.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, self.log)

    def uri(self, path: str = "/system") -> str:
        return (f"qemu+ssh://root@{LOOPBACK}:{self.port}{path}"
                f"?keyfile={self.client_key}&no_verify=1&no_tty=1")

    def sessions(self) -> list[int]:
        """The sshd processes serving connections now (one tree per connection)."""
        return descendants(self.process.pid)

    def drop_connections(self) -> list[int]:
        """Kill every process serving a connection, as a crashed or restarted sshd, or a
        firewall that resets the connection, would end it; the pids killed."""
        pids = self.sessions()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def stop(self) -> None:
        self.drop_connections()
        stop(self.process)
        # no_verify=1 made ssh remember this test's host key in root's known_hosts: forget it
        known = Path.home() / ".ssh" / "known_hosts"
        if known.exists():
            run("ssh-keygen", "-R", f"[{LOOPBACK}]:{self.port}", "-f", known, check=False)
            Path(f"{known}.old").unlink(missing_ok=True)


class Pki:
    """A certificate authority and certificates signed by it (certtool, gnutls-bin)."""

    def __init__(self, folder: Path, name: str = "libvirtfs test CA") -> None:
        need("certtool")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.key = self._private_key("cakey.pem")
        self.cert = folder / "cacert.pem"
        template = self._template("ca.info", f"cn = {name}", "ca", "cert_signing_key")
        run("certtool", "--generate-self-signed", "--load-privkey", self.key,
            "--template", template, "--outfile", self.cert)

    def _private_key(self, name: str) -> Path:
        path = self.folder / name
        run("certtool", "--generate-privkey", "--outfile", path)
        path.chmod(0o600)
        return path

    def _template(self, name: str, *lines: str) -> Path:
        path = self.folder / name
        path.write_text("\n".join([*lines, "expiration_days = 2", ""]))
        return path

    def issue(self, stem: str, *lines: str) -> tuple[Path, Path]:
        """A key and a certificate signed by this CA: STEMkey.pem, STEMcert.pem."""
        key = self._private_key(f"{stem}key.pem")
        cert = self.folder / f"{stem}cert.pem"
        template = self._template(f"{stem}.info", "organization = libvirtfs tests", *lines,
                                  "encryption_key", "signing_key")
        run("certtool", "--generate-certificate", "--load-privkey", key,
            "--load-ca-certificate", self.cert, "--load-ca-privkey", self.key,
            "--template", template, "--outfile", cert)
        return key, cert

    def client_folder(self, folder: Path, *, ca: Path | None = None,
                      with_certificate: bool = True) -> Path:
        """A folder for `pkipath=`: cacert.pem (the CA the client trusts: `ca`, or this
        one), and clientcert.pem/clientkey.pem signed by this CA."""
        folder.mkdir(parents=True)
        shutil.copy(ca or self.cert, folder / "cacert.pem")
        if with_certificate:
            key, cert = self.issue(f"client-{folder.name}-", "cn = libvirtfs-client",
                                   "tls_www_client")
            shutil.copy(key, folder / "clientkey.pem")
            shutil.copy(cert, folder / "clientcert.pem")
        return folder


class ExtraLibvirtd:
    """A libvirtd of the test's own: TLS on one port (certificates of `pki`), plain TCP
    with SASL (DIGEST-MD5, a sasldb made with saslpasswd2) on another; QEMU driver."""

    def __init__(self, folder: Path, pki: Pki, sasl_users: dict[str, str]) -> None:
        need("libvirtd", "unshare", "saslpasswd2")
        self.folder = folder
        self.tls_port, self.tcp_port = free_port(), free_port()
        key, cert = pki.issue("server", f"cn = {LOOPBACK}", f"ip_address = {LOOPBACK}",
                              "dns_name = localhost", "tls_www_server")
        for sub in ("run", "lib", "log", "cache", "sasl"):
            (folder / sub).mkdir(parents=True)
        etc = folder / "etc"
        shutil.copytree("/etc/libvirt", etc, symlinks=True,
                        ignore=shutil.ignore_patterns("qemu", "lxc", "storage", "nwfilter",
                                                      "secrets", "*.xml"))
        (etc / "qemu").mkdir()
        with open(etc / "qemu.conf", "a") as f:
            f.write('\nstdio_handler = "file"\n')  # no virtlogd in there
        (etc / "libvirtd.conf").write_text(f"""\
listen_tls = 1
listen_tcp = 1
listen_addr = "{LOOPBACK}"
tls_port = "{self.tls_port}"
tcp_port = "{self.tcp_port}"
auth_tls = "none"
auth_tcp = "sasl"
key_file = "{key}"
cert_file = "{cert}"
ca_file = "{pki.cert}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
""")
        sasl = folder / "sasl"
        # DIGEST-MD5 gives SASL's own encryption layer, which libvirt wants over plain TCP
        # (SCRAM has none: libvirt takes it only inside TLS or on the UNIX socket).
        (sasl / "libvirt.conf").write_text(f"mech_list: digest-md5\n"
                                           f"sasldb_path: {sasl / 'passwd.db'}\n")
        for user, password in sasl_users.items():
            run("saslpasswd2", "-p", "-c", "-f", sasl / "passwd.db", "-a", "libvirt", user,
                input=password)
        self.log = folder / "libvirtd.out"
        script = r"""
            # The namespace starts with a copy of our mounts; FUSE ones held here would
            # outlive their fusermount3 -u out there.
            awk '$3 ~ /^fuse/ {print $2}' /proc/mounts | while read -r m; do
                umount -l "$m" || true; done
            mount --bind "$1/run"   /run/libvirt
            mount --bind "$1/lib"   /var/lib/libvirt
            mount --bind "$1/etc"   /etc/libvirt
            mount --bind "$1/log"   /var/log/libvirt
            mount --bind "$1/cache" /var/cache/libvirt
            exec libvirtd -l -f /etc/libvirt/libvirtd.conf
        """
        environment = dict(os.environ, SASL_CONF_PATH=str(sasl))  # not /etc/sasl2
        with open(self.log, "wb") as log:
            # No --fork: unshare execs the shell, which execs libvirtd, so this process
            # is libvirtd itself and stop() stops it.
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec",
                 script, "extra-libvirtd", str(folder)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=environment)
        wait_for_port(self.tls_port, self.process, self.log)
        wait_for_port(self.tcp_port, self.process, self.log)

    def tls_uri(self, pkipath: Path) -> str:
        return f"qemu+tls://{LOOPBACK}:{self.tls_port}/system?pkipath={pkipath}"

    @property
    def sasl_uri(self) -> str:
        return f"qemu+tcp://{LOOPBACK}:{self.tcp_port}/system"

    def daemon_log(self) -> str:
        path = self.folder / "log" / "libvirtd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop(self.process)
