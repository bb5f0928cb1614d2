"""Credentials for hosts that ask for a user name and password (SASL, libvirt's auth
callbacks), read from a file the host's config table names: never from the command line,
where `ps` would show them to every user.

    # /etc/libvirtfs/lab.cred, mode 0600
    username = "admin"
    password = "s3cret"

The file must be a regular file that neither its group nor others can read or write
(mode 0600 or 0400), as ssh insists for its keys: a password others can read is no secret.
It is read again at every (re)connect, so a changed password needs no remount; the
password is never logged, and no message quotes the file's contents.
"""

from __future__ import annotations

import errno
import os
import stat
import tomllib
from dataclasses import dataclass, field

import libvirt

from libvirtfs.drivers.errors import DriverError

# A credentials file is two lines; anything larger is not one.
MAX_CREDENTIALS_BYTES = 64 * 1024

_KEYS = {"username", "password"}

# The prompts libvirt's remote driver asks a callback to answer (SASL's callbacks mapped).
ANSWERED = [libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_USERNAME, libvirt.VIR_CRED_PASSPHRASE,
            libvirt.VIR_CRED_NOECHOPROMPT, libvirt.VIR_CRED_REALM]


@dataclass(frozen=True)
class Credentials:
    """A user name and password; `repr` hides the password (it ends up in tracebacks)."""

    username: str
    password: str = field(repr=False)


class CredentialsError(DriverError):
    """The credentials file cannot be used; one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


def read_credentials(path: str) -> Credentials:
    """The file's user name and password, after checking that only its owner can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CredentialsError(f"credentials file {path} is a symbolic link; name the "
                                   f"file itself") from None
        raise CredentialsError(f"cannot read credentials file {path}: "
                               f"{e.strerror or e}") from None
    try:
        info = os.fstat(fd)  # the file opened, not whatever the name points at later
        if not stat.S_ISREG(info.st_mode):
            raise CredentialsError(f"credentials file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise CredentialsError(f"credentials file {path} has mode {mode:04o}: its group "
                                   f"or others may read it; chmod 600 {path}")
        if info.st_uid not in (os.geteuid(), 0):
            raise CredentialsError(f"credentials file {path} belongs to uid {info.st_uid}, "
                                   f"neither this user nor root")
        data = os.read(fd, MAX_CREDENTIALS_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CREDENTIALS_BYTES:
        raise CredentialsError(f"credentials file {path} is larger than "
                               f"{MAX_CREDENTIALS_BYTES // 1024} KiB")
    try:
        table = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        # tomllib's message quotes the line, which may be the password.
        raise CredentialsError(f"credentials file {path} is not TOML of the form "
                               f"username = \"...\" and password = \"...\"") from None
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise CredentialsError(f"credentials file {path}: unknown key {unknown[0]!r}; the "
                               f"keys are password, username")
    for key in sorted(_KEYS):
        if not isinstance(table.get(key), str):
            raise CredentialsError(f"credentials file {path}: {key!r} must be a string")
    return Credentials(table["username"], table["password"])


def auth_callback(credentials: Credentials):
    """libvirt's callback for `openAuth`: it answers the user name and password prompts,
    and takes libvirt's default for a realm; any other prompt fails the open."""

    def answer(prompts: list[list], opaque: object) -> int:
        for prompt in prompts:
            kind = prompt[0]
            if kind in (libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_USERNAME):
                prompt[4] = credentials.username
            elif kind in (libvirt.VIR_CRED_PASSPHRASE, libvirt.VIR_CRED_NOECHOPROMPT):
                prompt[4] = credentials.password
            elif kind == libvirt.VIR_CRED_REALM:
                prompt[4] = prompt[3] or ""
            else:
                return -1
        return 0

    return answer
