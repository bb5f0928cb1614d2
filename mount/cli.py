"""`libvirtfs [OPTIONS] [--config PATH] [NAME=]URI... MOUNTPOINT [-o OPTS]`

Goes to the background only once the mount is ready, so a script can use it on the next
line: the command starts a copy of itself in the foreground, in a new session, and waits
for it to say "ready" (or why not) through a pipe.  Until then the copy's standard error
goes to a file the command reads, so that what libfuse or Python print on a failure
reaches the user too.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import tempfile
from typing import IO

import trio

from libvirtfs.drivers.statedir import default_state_dir, private_folder
from libvirtfs.mount import systemd
from libvirtfs.mount.config import ConfigError, check_unique, load_config, parse_host
from libvirtfs.mount.options import MountOptions, OptionError
from libvirtfs.mount.serve import StartupError, serve

log = logging.getLogger("libvirtfs")

READY = b"ready\n"
SYSLOG = "/dev/log"

# Where `kill -USR1` writes the stacks of every thread; kept open for the process's life.
_dump_file: IO[str] | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libvirtfs",
        usage="%(prog)s [-f] [--debug] [--log-file PATH] [--config PATH] [-o OPTS] "
              "[NAME=]URI... MOUNTPOINT [-o OPTS]",
        description="Mount libvirt hosts as a directory tree: hosts/NAME/domains, pools, "
                    "networks.",
        epilog="Example: libvirtfs test:///default /mnt/virt; unmount with "
               "fusermount3 -u /mnt/virt.")
    parser.add_argument("targets", nargs="+", metavar="[NAME=]URI... MOUNTPOINT",
                        help="libvirt URIs to mount (none: libvirt's default URI), then "
                             "the mount point")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                        help="comma-separated mount options: ro, allow_other, "
                             "default_permissions, timeout=SECONDS (libvirt calls, default "
                             "30), cache_timeout=SECONDS (default 1), and the usual fstab ones")
    parser.add_argument("--config", metavar="PATH",
                        help="a TOML file of hosts to mount, one [[host]] table each (name, "
                             "uri, timeout, keepalive_interval, keepalive_count, read_only, "
                             "credentials), and a [mount] table (options: as -o); read again "
                             "on SIGHUP: "
                             "see docs/hosts.md")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground")
    parser.add_argument("--debug", action="store_true",
                        help="log every filesystem operation (implies nothing else)")
    parser.add_argument("--log-file", metavar="PATH",
                        help="write the log here (default: standard error in the "
                             "foreground; in the background syslog, or libvirtfs.log in the "
                             "state folder without one: see docs/mount.md)")
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return parser


def setup_logging(args: argparse.Namespace, background: bool) -> None:
    level = logging.DEBUG if args.debug else logging.INFO
    if args.log_file:
        handler: logging.Handler = logging.FileHandler(args.log_file)
    elif background and os.path.exists(SYSLOG):
        handler = logging.handlers.SysLogHandler(SYSLOG)
    elif background:
        path = private_folder(default_state_dir()) / "libvirtfs.log"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if isinstance(handler, logging.handlers.SysLogHandler):
        # syslog stamps the time itself and takes "TAG[PID]:" as who is speaking.
        handler.setFormatter(logging.Formatter(
            "libvirtfs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    elif not background and not args.log_file and systemd.stderr_is_journal():
        handler.setFormatter(systemd.JournalFormatter())  # -f in a service unit
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s libvirtfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not args.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    enable_thread_dumps(handler)


def enable_thread_dumps(handler: logging.Handler) -> None:
    """`kill -USR1 PID` writes every thread's stack into the log (as s3ql does): where a
    stuck mount waits, without stopping it.  With syslog, into the state folder's log."""
    global _dump_file
    if isinstance(handler, logging.StreamHandler) and hasattr(handler.stream, "fileno"):
        _dump_file = handler.stream
    else:
        path = private_folder(default_state_dir()) / "libvirtfs.log"
        _dump_file = open(path, "a")  # noqa: SIM115 - open for the life of the process
        os.chmod(path, 0o600)
    faulthandler.register(signal.SIGUSR1, file=_dump_file, all_threads=True, chain=False)


def _background(argv: list[str]) -> int:
    """Run a foreground copy in a new session; return once it is ready or has failed."""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "libvirtfs.mount.cli", *argv, "-f",
               "--ready-fd", str(write_end)]
    with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out, \
            tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdin=devnull_in, stdout=devnull_out,
                                 stderr=errors, pass_fds=(write_end,),
                                 start_new_session=True)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read()
        if message == READY:
            return 0
        code = child.wait()
        errors.seek(0)
        printed = errors.read().decode(errors="replace").splitlines()
    text = message.decode(errors="replace").strip()
    if not text:
        text = f"the filesystem process exited with status {code} before the mount was ready"
    print(f"libvirtfs: {text}", file=sys.stderr)
    for line in printed[-20:]:  # libfuse's reason ("fuse: mount failed: ..."), a traceback
        if line.strip() and line.strip() not in text:
            print(line, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    options = MountOptions()
    try:
        for text in args.options:
            options.add(text)
    except OptionError as e:
        parser.error(str(e))
    *uris, mountpoint = args.targets
    specs = [parse_host(text) for text in uris]
    config = None
    try:
        if args.config:
            args.config = os.path.abspath(args.config)  # read again on SIGHUP, from /
            config = load_config(args.config)
            specs += config.hosts
            options = MountOptions()  # the file's [mount] options first, -o's win
            for text in [config.options, *args.options]:
                options.add(text)
        check_unique(specs)
    except ConfigError as e:
        print(f"libvirtfs: {e}", file=sys.stderr)
        return 2
    specs = specs or [parse_host("")]
    if not args.foreground:
        return _background(argv)

    ready_pipe = os.fdopen(args.ready_fd, "wb") if args.ready_fd is not None else None
    mountpoint = os.path.realpath(mountpoint)  # as /proc/self/mountinfo names it
    if args.log_file:
        args.log_file = os.path.abspath(args.log_file)
    if ready_pipe is not None:
        os.chdir("/")  # a daemon keeps no folder busy (the one it was started from)
    setup_logging(args, background=ready_pipe is not None)

    def ready() -> None:
        if ready_pipe is not None:
            ready_pipe.write(READY)
            ready_pipe.close()
            # The command has stopped reading what we print: from now on, the log only.
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), sys.stdout.fileno())
                os.dup2(devnull.fileno(), sys.stderr.fileno())

    try:
        trio.run(serve, specs, mountpoint, options, ready,
                 (args.config, config) if config is not None else None)
    except StartupError as e:
        if ready_pipe is not None and not ready_pipe.closed:
            log.error("%s", e)
            ready_pipe.write(f"{e}\n".encode())
            ready_pipe.close()
        else:
            if args.log_file:
                log.error("%s", e)
            print(f"libvirtfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
