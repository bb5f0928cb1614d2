"""One exception for every driver failure, carrying an errno and libvirt's own message.

`DriverError` is an `OSError`, so the layers above (nodes, vfs) can turn it into a FUSE
error without knowing that libvirt exists.
"""

from __future__ import annotations

import errno

import libvirt


class DriverError(OSError):
    """A libvirt call failed; `errno` says how, `strerror` is libvirt's message."""

    def __init__(self, err: int, message: str, code: int | None = None) -> None:
        super().__init__(err, message)
        self.libvirt_code = code

    def __str__(self) -> str:
        return self.strerror or errno.errorcode.get(self.errno or 0, "error")


def _codes(*names: str) -> list[int]:
    # Older libvirt builds lack some codes; skip what this one does not define.
    return [getattr(libvirt, n) for n in names if hasattr(libvirt, n)]


# libvirt error code -> errno.  The one table; docs/errors.md documents it.
ERRNO_BY_CODE: dict[int, int] = {}
for _err, _names in [
    (errno.ENOENT, ("VIR_ERR_NO_DOMAIN", "VIR_ERR_NO_NETWORK", "VIR_ERR_NO_STORAGE_POOL",
                    "VIR_ERR_NO_STORAGE_VOL", "VIR_ERR_NO_DOMAIN_SNAPSHOT", "VIR_ERR_NO_NWFILTER",
                    "VIR_ERR_NO_INTERFACE", "VIR_ERR_NO_SECRET", "VIR_ERR_NO_NODE_DEVICE",
                    "VIR_ERR_NO_DOMAIN_CHECKPOINT", "VIR_ERR_NO_NETWORK_PORT",
                    "VIR_ERR_NO_DOMAIN_BACKUP", "VIR_ERR_NO_CLIENT", "VIR_ERR_NO_SERVER")),
    (errno.EOPNOTSUPP, ("VIR_ERR_NO_SUPPORT", "VIR_ERR_ARGUMENT_UNSUPPORTED",
                        "VIR_ERR_CONFIG_UNSUPPORTED", "VIR_ERR_OPERATION_UNSUPPORTED",
                        "VIR_ERR_NO_SOURCE",
                        "VIR_ERR_NO_TARGET", "VIR_ERR_NO_NAME", "VIR_ERR_NO_OS",
                        "VIR_ERR_NO_DEVICE", "VIR_ERR_NO_XEN", "VIR_ERR_NO_KERNEL",
                        "VIR_ERR_NO_ROOT", "VIR_ERR_NO_SECURITY_MODEL")),
    (errno.EBUSY, ("VIR_ERR_OPERATION_INVALID", "VIR_ERR_OPERATION_UNSAFE",
                   "VIR_ERR_OPERATION_ABORTED", "VIR_ERR_MIGRATE_UNSAFE",
                   "VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_AGENT_UNSYNCED",
                   "VIR_ERR_RESOURCE_BUSY", "VIR_ERR_BLOCK_COPY_ACTIVE")),
    (errno.EINVAL, ("VIR_ERR_INVALID_ARG", "VIR_ERR_XML_ERROR", "VIR_ERR_XML_DETAIL",
                    "VIR_ERR_XML_INVALID_SCHEMA", "VIR_ERR_INVALID_DOMAIN",
                    "VIR_ERR_INVALID_NETWORK", "VIR_ERR_INVALID_STORAGE_POOL",
                    "VIR_ERR_INVALID_STORAGE_VOL", "VIR_ERR_INVALID_DOMAIN_SNAPSHOT",
                    "VIR_ERR_INVALID_MAC", "VIR_ERR_CONF_SYNTAX",
                    "VIR_ERR_PARSE_FAILED", "VIR_ERR_INVALID_SCHEMA", "VIR_ERR_MULTIPLE_INTERFACES",
                    "VIR_ERR_INVALID_DOMAIN_CHECKPOINT")),
    (errno.EEXIST, ("VIR_ERR_DOM_EXIST", "VIR_ERR_NETWORK_EXIST", "VIR_ERR_STORAGE_VOL_EXIST")),
    (errno.EACCES, ("VIR_ERR_ACCESS_DENIED", "VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED",
                    "VIR_ERR_AUTH_UNAVAILABLE", "VIR_ERR_OPERATION_DENIED")),
    (errno.ETIMEDOUT, ("VIR_ERR_OPERATION_TIMEOUT",)),
    (errno.ENOTCONN, ("VIR_ERR_NO_CONNECT", "VIR_ERR_INVALID_CONN")),
    (errno.EIO, ("VIR_ERR_RPC", "VIR_ERR_SYSTEM_ERROR", "VIR_ERR_INTERNAL_ERROR",
                 "VIR_ERR_WRITE_FAILED", "VIR_ERR_READ_FAILED", "VIR_ERR_OPEN_FAILED",
                 "VIR_ERR_STORAGE_PROBE_FAILED", "VIR_ERR_AGENT_COMMAND_FAILED")),
    (errno.ENOMEM, ("VIR_ERR_NO_MEMORY",)),
]:
    for _code in _codes(*_names):
        ERRNO_BY_CODE.setdefault(_code, _err)

def errno_for_code(code: int | None) -> int:
    return ERRNO_BY_CODE.get(code or 0, errno.EIO)


def _system_errno(error: libvirt.libvirtError) -> int | None:
    details = error.err
    value = details[7] if isinstance(details, tuple | list) and len(details) > 7 else None
    return value if isinstance(value, int) and value in errno.errorcode else None


def from_libvirt(error: libvirt.libvirtError) -> DriverError:
    """Translate a libvirt exception through the table above."""
    code = error.get_error_code()
    message = error.get_error_message() or str(error)
    err = errno_for_code(code)
    if code == libvirt.VIR_ERR_INVALID_ARG and "unsupported flags" in message:
        err = errno.EOPNOTSUPP  # libvirt's virCheckFlags: this hypervisor lacks the feature
    elif code == libvirt.VIR_ERR_SYSTEM_ERROR and (system := _system_errno(error)) is not None:
        err = system  # libvirt carries the system call's own errno (a missing file, say)
    return DriverError(err, message, code)
