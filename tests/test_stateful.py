"""Random sessions on a real mount, compared with libvirt after every step (issue 7).

A hypothesis state machine drives a mount of `test:///default` with the tools users have:
mkdir and xml writes (valid and hostile documents), rmdir, control words, snapshots taken,
reverted and deleted, renames, recursive deletes, `sed -i` and reads.  Before and after
every step it asks libvirt-python what the host holds, checks that the step did exactly
what the documentation promises (or failed with the documented errno and changed nothing),
and then compares the whole tree with libvirt: nothing lost, nothing invented, no stale
entry, no ghost.  Changes made through the mount must show at once (docs/tree.md,
"Changes made through the mount itself take effect at once"), so no step waits.

`test:///default` lives inside the process that opens it, so the mount runs in this
process: `serve()` from mount/serve.py in a thread of its own, with its own trio loop.  The
test talks to the same host with libvirt-python and touches the mount only from the main
thread and from subprocesses (ls, cat, cp, tee, sed, mv, rm, find), never from the
filesystem's thread.

CI runs a bounded, derandomized search; docs/testbed.md says how to run it longer.  Each
bug it found has a regression test of its own in test_found_by_stateful.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from inprocess import InProcessMount, allow_in_a_thread
from lxml import etree

URI = "test:///default"

# How long and how hard to search (docs/testbed.md): CI's budget by default.
EXAMPLES = int(os.environ.get("LIBVIRTFS_STATEFUL_EXAMPLES", "40"))
STEPS = int(os.environ.get("LIBVIRTFS_STATEFUL_STEPS", "30"))
RANDOM = os.environ.get("LIBVIRTFS_STATEFUL_RANDOM", "") not in ("", "0")

# Recursive deletes (rm -rf, find -delete, shutil.rmtree) over an object folder remove
# nothing (issue 7, "Nothing is destroyed by accident"; nodes/guard.py).  They leave the
# folders they walked refusing the next rmdir by another program once, for GUARD_SECONDS.
GUARD_SECONDS = 30.0

# libvirt name -> folder name (docs/tree.md, "Names that cannot be file names").
DOMAINS = {"test": "test", "web": "web", "per%cent": "per%25cent"}
NAME_OF = {folder: name for name, folder in DOMAINS.items()}
# Snapshot folder names; `current` is the link, and the snapshot named current is %63urrent.
SNAPSHOTS = {"s1": "s1", "s2": "s2", "%63urrent": "current"}
SNAPSHOT_FOLDER = {name: folder for folder, name in SNAPSHOTS.items()}

# docs/tree.md, "Domain state", and docs/writing.md, "Control files".
STATE_WORDS = ["nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed",
               "pmsuspended"]
VALID_WORDS = {
    "shutoff": ["start", "start-paused"],
    "running": ["shutdown", "reboot", "reset", "destroy", "suspend", "managed-save"],
    "blocked": ["shutdown", "reboot", "reset", "destroy", "suspend", "managed-save"],
    "paused": ["resume", "reset", "destroy", "managed-save"],
    "shutdown": ["destroy"], "crashed": ["destroy"], "pmsuspended": ["destroy"],
    "nostate": ["destroy"],
}
# The words the machine writes, and the state each leaves a test-driver domain in.
STATE_AFTER = {"start": "running", "destroy": "shutoff", "suspend": "paused",
               "resume": "running", "shutdown": "shutoff", "managed-save": "shutoff"}
SERVED = {"state", "info", "xml", "live.xml", "job", "autostart", "control", "snapshots",
          "disks"}
SNAPSHOT_SERVED = {"xml", "state", "info", "control"}

SEED = """<domain type='test'>
  <name>test</name>
  <memory unit='KiB'>262144</memory>
  <vcpu>2</vcpu>
  <os><type>hvm</type></os>
</domain>
"""


def domain_document(name: str, memory: int) -> bytes:
    return (f"<domain type='test'>\n  <name>{name}</name>\n"
            f"  <memory unit='KiB'>{memory}</memory>\n"
            f"  <os><type>hvm</type></os>\n</domain>\n").encode()


def hostile_document(kind: str, name: str) -> bytes:
    """A document that must be refused whole; `kind` says how it is wrong."""
    if kind == "malformed":
        return f"<domain type='test'>\n  <name>{name}</name>\n  <memory>65536".encode()
    if kind == "wrong-root":
        return f"<network>\n  <name>{name}</name>\n</network>\n".encode()
    if kind == "other-name":
        return domain_document("someone-else", 65536)
    if kind == "entities":
        laughs = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
        return (f'<?xml version="1.0"?>\n<!DOCTYPE domain [<!ENTITY l0 "lol">{laughs}]>\n'
                f"<domain type='test'><name>{name}</name><description>&l9;</description>"
                f"<memory>65536</memory><os><type>hvm</type></os></domain>\n").encode()
    if kind == "huge":
        filler = "x" * (5 * 1024 * 1024)
        return (f"<domain type='test'><name>{name}</name><description>{filler}"
                f"</description><memory>65536</memory><os><type>hvm</type></os>"
                f"</domain>\n").encode()
    raise ValueError(kind)


HOSTILE_ERRNO = {"malformed": errno.EINVAL, "wrong-root": errno.EINVAL,
                 "other-name": errno.EINVAL, "entities": errno.EINVAL, "huge": errno.EFBIG}


# -- libvirt's view of the host ------------------------------------------------------------

@dataclass(frozen=True)
class SnapshotTruth:
    state: str
    parent: str | None


@dataclass(frozen=True)
class DomainTruth:
    uuid: str
    name: str
    state: str
    persistent: bool
    memory: int  # of the persistent definition, KiB
    autostart: bool
    managed_save: bool
    snapshots: tuple[tuple[str, SnapshotTruth], ...]
    current: str | None

    def snapshot(self, name: str) -> SnapshotTruth | None:
        return dict(self.snapshots).get(name)


def libvirt_truth(conn: libvirt.virConnect) -> dict[str, DomainTruth]:
    """Folder name -> what libvirt says of that domain."""
    truth: dict[str, DomainTruth] = {}
    for dom in conn.listAllDomains(0):
        snapshots = []
        for snap in dom.listAllSnapshots(0):
            document = etree.fromstring(snap.getXMLDesc(0).encode())
            parent = document.findtext("parent/name")
            snapshots.append((snap.getName(), SnapshotTruth(document.findtext("state"), parent)))
        current = (dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None)
        definition = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
        name = dom.name()
        folder = DOMAINS.get(name, name)
        truth[folder] = DomainTruth(
            uuid=dom.UUIDString(), name=name, state=STATE_WORDS[dom.state(0)[0]],
            persistent=bool(dom.isPersistent()),
            memory=int(definition.findtext("memory")), autostart=bool(dom.autostart()),
            managed_save=bool(dom.hasManagedSaveImage(0)),
            snapshots=tuple(sorted(snapshots)), current=current)
    return truth


def reset_host(conn: libvirt.virConnect) -> None:
    """Back to one running domain `test`: an example must not inherit the last one's host."""
    for dom in conn.listAllDomains(0):
        for snap in dom.listAllSnapshots(0):
            with contextlib.suppress(libvirt.libvirtError):  # gone with its parent
                snap.delete(0)
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    conn.defineXML(SEED).create()


# -- running tools -------------------------------------------------------------------------

_ERRNO_BY_MESSAGE = sorted(((os.strerror(n), n) for n in errno.errorcode),
                           key=lambda item: -len(item[0]))


def tool_errno(result: subprocess.CompletedProcess[str]) -> int:
    """0 for success, else the errno that the tool's message names."""
    if result.returncode == 0:
        return 0
    for message, number in _ERRNO_BY_MESSAGE:
        if message in result.stderr:
            return number
    raise AssertionError(f"{result.args} failed without naming an errno: {result.stderr}")


def run(*command: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def attempt(fn, *args) -> int:
    """Call fn(*args) from this thread; its errno, or 0."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno or -1
    return 0


def user_attribute(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode()
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
        return None


def user_error(path: Path) -> str:
    return user_attribute(path, "user.error") or ""


def key_values(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines())


# -- the machine ---------------------------------------------------------------------------

# `web` twice: more steps meet the same folder, and shrinking ends on the plainest name.
ANY_FOLDER = st.sampled_from(["web", "web", "per%25cent", "test"])
# Folders a step made or changed: later steps come back to them more often than chance would.
TOUCHED = Bundle("touched")
FOLDERS = st.one_of(TOUCHED, ANY_FOLDER)
SNAPSHOT_NAMES = st.sampled_from(sorted(SNAPSHOTS))
MEMORY = st.sampled_from([65536, 131072, 262144])


def step(*, target: Bundle | None = None, **arguments: st.SearchStrategy):
    """A rule that also draws `look`: whether the whole tree is compared right after it.
    Without a look the next step follows at once, as in `mv web www && sed -i ... www/xml`,
    and no listing in between warms the caches (which would hide what a user meets)."""
    def decorate(fn):
        def with_look(self, look: bool, **kwargs):
            self.look = look
            return fn(self, **kwargs)
        with_look.__name__, with_look.__doc__ = fn.__name__, fn.__doc__
        if target is not None:
            return rule(target=target, look=st.booleans(), **arguments)(with_look)
        return rule(look=st.booleans(), **arguments)(with_look)
    return decorate


class MountSession(RuleBasedStateMachine):
    """One user's session on a fresh mount of a freshly reset host."""

    workdir: Path
    conn: libvirt.virConnect

    def __init__(self) -> None:
        super().__init__()
        self.mount: InProcessMount | None = None
        # Folders made by mkdir that await their xml: they exist only in this mount.
        self.pending: set[str] = set()
        # Files tools left in object folders (folder -> names), which listings show too.
        self.scratch: dict[str, set[str]] = {}
        # Whether the step just taken is followed by a comparison of the whole tree, and
        # whether the tree may take a while to follow it (a change made elsewhere).
        self.look = True
        self.elsewhere = False
        self.cache_timeout = 1.0
        # Object folders a recursive delete walked: (domain uuid, snapshot or None) ->
        # (when, whether another program's rmdir was refused since; None: not known
        # whether it was walked at all).
        self.guards: dict[tuple[str, str | None], tuple[float, bool | None]] = {}
        # user.undefine-flags on domains/, and user.flags on each domain's snapshots/.
        self.undefine: set[str] = set()
        self.snapshot_flags: dict[str, str] = {}

    @initialize(cache_timeout=st.sampled_from(["1", "0.2", "0"]))
    def mount_fresh_host(self, cache_timeout: str) -> None:
        """The default cache time, a short one, and none (docs/tree.md, "Caching")."""
        reset_host(self.conn)
        self.cache_timeout = float(cache_timeout)
        self.mount = InProcessMount(self.workdir / "mnt", URI,
                                    options=f"cache_timeout={cache_timeout}")
        self.mount.start()

    def teardown(self) -> None:
        if self.mount is not None:
            self.mount.stop()

    # -- helpers -----------------------------------------------------------------------

    @property
    def domains(self) -> Path:
        assert self.mount is not None
        return self.mount.path / "hosts" / "test" / "domains"

    def truth(self) -> dict[str, DomainTruth]:
        return libvirt_truth(self.conn)

    def exists(self, folder: str, truth: dict[str, DomainTruth]) -> bool:
        return folder in truth or folder in self.pending

    def source_file(self, data: bytes) -> Path:
        path = self.workdir / "document.xml"
        path.write_bytes(data)
        return path

    def write(self, writer: str, path: Path, data: bytes) -> int:
        """Write `data` to `path` the way `writer` does; the errno the writer saw."""
        if writer == "python":
            def write_and_close() -> None:
                with open(path, "wb") as f:
                    f.write(data)
            return attempt(write_and_close)
        source = self.source_file(data)
        if writer == "cp":
            return tool_errno(run("cp", source, path))
        if writer == "tee":
            return tool_errno(_tee(source, path))
        return tool_errno(run("bash", "-c", 'cat "$1" > "$2"', "-", source, path))

    def expect(self, got: int, want: int | set[int], what: str, path: Path | None = None
               ) -> None:
        wanted = want if isinstance(want, set) else {want}
        if got not in wanted:
            why = f" (user.error: {user_error(path)!r})" if path is not None else ""
            raise AssertionError(f"{what}: got {errno.errorcode.get(got, got)}, expected "
                                 f"{' or '.join(errno.errorcode.get(w, str(w)) for w in wanted)}"
                                 f"{why}")

    # -- mkdir, xml, sed -i, rmdir -----------------------------------------------------

    @step(target=TOUCHED, folder=FOLDERS)
    def mkdir_domain(self, folder: str) -> str:
        before = self.truth()
        got = tool_errno(run("mkdir", self.domains / folder))
        after = self.truth()
        assert after == before, "mkdir changed libvirt"
        if self.exists(folder, before):
            self.expect(got, errno.EEXIST, f"mkdir {folder} (exists)")
            return folder
        self.expect(got, 0, f"mkdir {folder}", self.domains)
        self.pending.add(folder)
        return folder


    @step(target=TOUCHED, folder=FOLDERS, memory=MEMORY,
          writer=st.sampled_from(["python", "cp", "tee", "redirect"]))
    def write_valid_xml(self, folder: str, memory: int, writer: str) -> str:
        before = self.truth()
        data = domain_document(NAME_OF[folder], memory)
        path = self.domains / folder / "xml"
        got = self.write(writer, path, data)
        after = self.truth()
        if not self.exists(folder, before):
            self.expect(got, errno.ENOENT, f"{writer} > {folder}/xml (no such folder)")
            assert after == before
            return folder
        self.expect(got, 0, f"{writer} > {folder}/xml", path)
        domain = after[folder]
        assert domain.memory == memory and domain.persistent
        if folder in before:
            old = before[folder]
            assert (domain.uuid, domain.state, domain.snapshots) == (
                old.uuid, old.state, old.snapshots), "an update changed identity or state"
        else:
            assert domain.state == "shutoff", domain
            self.pending.discard(folder)
        others = {k: v for k, v in after.items() if k != folder}
        assert others == {k: v for k, v in before.items() if k != folder}
        # Read-your-writes (docs/writing.md): xml shows the bytes as written.
        assert path.read_bytes() == data
        return folder


    @step(folder=FOLDERS, kind=st.sampled_from(sorted(HOSTILE_ERRNO)),
          writer=st.sampled_from(["python", "cp", "tee"]))
    def write_hostile_xml(self, folder: str, kind: str, writer: str) -> None:
        before = self.truth()
        path = self.domains / folder / "xml"
        shown = path.read_bytes() if folder in before else None
        got = self.write(writer, path, hostile_document(kind, NAME_OF[folder]))
        after = self.truth()
        assert after == before, f"a refused {kind} document changed libvirt"
        if not self.exists(folder, before):
            self.expect(got, errno.ENOENT, f"{writer} > {folder}/xml (no such folder)")
            return
        self.expect(got, HOSTILE_ERRNO[kind], f"{kind} document to {folder}/xml", path)
        assert user_error(path), f"no user.error after a refused {kind} document"
        if folder in before:
            assert path.read_bytes() == shown, "a refused document changed xml"

    @step(folder=FOLDERS, memory=MEMORY)
    def sed_xml(self, folder: str, memory: int) -> None:
        before = self.truth()
        path = self.domains / folder / "xml"
        got = tool_errno(run("sed", "-i", "-E",
                             rf"s|<memory unit='KiB'>[0-9]+</memory>|"
                             rf"<memory unit='KiB'>{memory}</memory>|", path))
        after = self.truth()
        if folder in self.pending:
            # An empty (or absent) xml: sed renames an empty document onto it.
            self.expect(got, {errno.EINVAL, errno.ENOENT}, f"sed -i {folder}/xml (pending)",
                        path)
            self.forget_scratch_left_by(folder)
            assert after == before
            return
        if folder not in before:
            self.expect(got, errno.ENOENT, f"sed -i {folder}/xml (no such folder)")
            return
        self.expect(got, 0, f"sed -i {folder}/xml", path)
        assert after[folder].memory == memory
        assert after[folder].uuid == before[folder].uuid

    def forget_scratch_left_by(self, folder: str) -> None:
        """A refused commit by rename leaves the tool's temporary file (docs/writing.md)."""
        with contextlib.suppress(OSError):
            left = set(os.listdir(self.domains / folder)) - SERVED
            self.scratch.setdefault(folder, set()).update(left)

    @step(folder=FOLDERS)
    def rmdir_domain(self, folder: str) -> None:
        before = self.truth()
        got = tool_errno(run("rmdir", self.domains / folder))
        after = self.truth()
        if folder in self.pending:
            self.expect(got, 0, f"rmdir {folder} (pending)", self.domains)
            self.pending.discard(folder)
            self.scratch.pop(folder, None)
            assert after == before
            return
        if folder not in before:
            self.expect(got, errno.ENOENT, f"rmdir {folder} (no such folder)")
            return
        domain = before[folder]
        guarded = self.guard_refuses((domain.uuid, None), got)
        if guarded:
            self.expect(got, errno.ENOTEMPTY, f"rmdir {folder} (a recursive delete walked it)",
                        self.domains)
            assert after == before
        elif domain.state != "shutoff":
            self.expect(got, errno.EBUSY, f"rmdir {folder} ({domain.state})", self.domains)
            assert after == before
        elif domain.snapshots and "snapshots-metadata" not in self.undefine:
            self.expect(got, errno.ENOTEMPTY, f"rmdir {folder} (has snapshots)", self.domains)
            assert after == before
        elif domain.managed_save and "managed-save" not in self.undefine:
            self.expect(got, errno.EBUSY, f"rmdir {folder} (managed save image)", self.domains)
            assert after == before
        else:
            self.expect(got, 0, f"rmdir {folder}", self.domains)
            assert after == {k: v for k, v in before.items() if k != folder}
            self.scratch.pop(folder, None)
            self.forget_domain(domain.uuid)

    def forget_domain(self, uuid: str) -> None:
        self.guards = {key: value for key, value in self.guards.items() if key[0] != uuid}
        self.snapshot_flags.pop(uuid, None)

    def guard_refuses(self, key: tuple[str, str | None], got: int) -> bool:
        """Whether the guard of an object folder refuses this rmdir (docs/writing.md): the
        first one by another program after a recursive delete walked the folder."""
        if key not in self.guards:
            return False
        when, refused = self.guards[key]
        if refused:
            return False
        if refused is None and got != errno.ENOTEMPTY:  # it was not walked after all
            del self.guards[key]
            return False
        if time.monotonic() - when > GUARD_SECONDS - 5 and got != errno.ENOTEMPTY:
            del self.guards[key]  # it was about to run out: either answer is right
            return False
        self.guards[key] = (when, True)
        return True

    # -- control words -----------------------------------------------------------------

    @step(folder=FOLDERS,
          word=st.sampled_from([*STATE_AFTER, "frobnicate", "start now", "wait running 0",
                                "wait shutoff 0", "wait asleep 0"]),
          writer=st.sampled_from(["echo", "python"]))
    def control(self, folder: str, word: str, writer: str) -> None:
        before = self.truth()
        path = self.domains / folder / "control"
        if writer == "echo":
            got = tool_errno(run("bash", "-c", f'echo "{word}" > "$1"', "-", path))
        else:
            def write_word() -> None:
                with open(path, "w") as f:
                    f.write(word + "\n")
            got = attempt(write_word)
        after = self.truth()
        if folder in self.pending:
            # Not a domain yet: `control` is a served name, no scratch file may take it.
            self.expect(got, errno.EPERM, f"{writer} {word} > {folder}/control (pending)",
                        self.domains / folder)
            assert after == before
            return
        if folder not in before:
            self.expect(got, errno.ENOENT, f"{word} > {folder}/control (no such folder)")
            return
        state = before[folder].state
        if word.startswith("wait "):  # `wait STATE 0` tests the state (docs/writing.md)
            wanted = word.split()[1]
            self.expect(got, errno.EINVAL if wanted not in STATE_WORDS else
                        0 if wanted == state else errno.ETIMEDOUT, f"{word} ({state})", path)
            assert after == before
        elif word not in STATE_AFTER:
            self.expect(got, errno.EINVAL, f"{word!r} > {folder}/control", path)
            assert after == before
        elif word not in VALID_WORDS[state]:
            self.expect(got, errno.EBUSY, f"{word} > {folder}/control ({state})", path)
            assert after == before
        else:
            self.expect(got, 0, f"{word} > {folder}/control ({state})", path)
            assert after[folder].state == STATE_AFTER[word]

    @step(folder=FOLDERS, value=st.sampled_from(["1", "0", "maybe"]))
    def set_autostart(self, folder: str, value: str) -> None:
        before = self.truth()
        path = self.domains / folder / "autostart"
        got = tool_errno(run("bash", "-c", f'echo {value} > "$1"', "-", path))
        after = self.truth()
        if folder not in before:
            # A pending folder serves no autostart yet, and takes no file of that name.
            self.expect(got, errno.EPERM if folder in self.pending else errno.ENOENT,
                        f"echo {value} > {folder}/autostart")
        elif value == "maybe":
            self.expect(got, errno.EINVAL, f"echo maybe > {folder}/autostart", path)
        else:
            self.expect(got, 0, f"echo {value} > {folder}/autostart", path)
            assert after == {**before,
                             folder: replace(before[folder], autostart=value == "1")}
            return
        assert after == before

    @step(value=st.sampled_from(["", "snapshots-metadata", "managed-save",
                                 "managed-save,snapshots-metadata", "bogus"]))
    def set_undefine_flags(self, value: str) -> None:
        before = self.truth()
        got = tool_errno(run("setfattr", "-n", "user.undefine-flags", "-v", value,
                             self.domains))
        assert self.truth() == before
        if value == "bogus":
            self.expect(got, errno.EINVAL, "setfattr user.undefine-flags bogus", self.domains)
            return
        self.expect(got, 0, f"setfattr user.undefine-flags {value!r}", self.domains)
        self.undefine = set(filter(None, value.split(",")))

    @step()
    def mkdir_long_name(self) -> None:
        before = self.truth()
        got = tool_errno(run("mkdir", self.domains / ("x" * 256)))
        self.expect(got, errno.ENAMETOOLONG, "mkdir of a 256-byte name", self.domains)
        assert self.truth() == before

    @step(target=TOUCHED, folder=FOLDERS, memory=MEMORY,
          tool=st.sampled_from(["cp -r", "tar x", "rsync -a"]))
    def restore_saved_folder(self, folder: str, memory: int, tool: str) -> str:
        """A folder saved with its served files (docs/writing.md, "Restoring a saved
        folder"): the xml defines, and nothing else is carried out (a saved control says
        `start`)."""
        saved = self.workdir / "saved"
        shutil.rmtree(saved, ignore_errors=True)
        (saved / folder).mkdir(parents=True)
        (saved / folder / "xml").write_bytes(domain_document(NAME_OF[folder], memory))
        (saved / folder / "state").write_text("running\n")
        (saved / folder / "info").write_text(f"name: {NAME_OF[folder]}\n")
        (saved / folder / "control").write_text("start\n")
        before = self.truth()
        if tool == "cp -r":
            run("cp", "-r", saved / folder, self.domains)
        elif tool == "tar x":
            run("tar", "-C", saved, "-cf", self.workdir / "saved.tar", folder)
            run("tar", "-C", self.domains, "-xf", self.workdir / "saved.tar")
        else:
            # --ignore-times: the saved xml may have the size and the second of the one
            # shown (libvirtfs keeps its own mtimes), which rsync would take as unchanged.
            run("rsync", "-a", "--ignore-times", saved / folder, f"{self.domains}/")
        after = self.truth()
        assert folder in after, f"{tool} did not define {folder}"
        restored = after[folder]
        assert restored.persistent
        if folder in before:
            old = before[folder]
            assert (restored.uuid, restored.state) == (old.uuid, old.state), "a word was run"
            # tar removes a file before it writes it, and libvirtfs refuses to remove `xml`
            # (as with install, docs/writing.md); cp and rsync write it.
            assert restored.memory == (old.memory if tool == "tar x" else memory)
        else:
            assert restored.memory == memory
            assert restored.state == "shutoff", "the saved control file was carried out"
            self.pending.discard(folder)
        assert {k: v for k, v in after.items() if k != folder} == {
            k: v for k, v in before.items() if k != folder}
        if tool == "tar x":
            # tar unlinks what it cannot create, which arms the guard (nodes/guard.py):
            # surely over a defined domain, and for a new one if xml was not its first.
            key = (restored.uuid, None)
            now = time.monotonic()
            when, refused = self.guards.get(key, (now, None if folder not in before else False))
            self.guards[key] = (now, refused if now - when < GUARD_SECONDS else False)
        return folder

    # -- snapshots ---------------------------------------------------------------------

    @step(folder=FOLDERS, value=st.sampled_from(["halt", "", "bogus"]))
    def set_snapshot_flags(self, folder: str, value: str) -> None:
        before = self.truth()
        path = self.domains / folder / "snapshots"
        got = tool_errno(run("setfattr", "-n", "user.flags", "-v", value, path))
        assert self.truth() == before
        if folder not in before:
            self.expect(got, errno.ENOENT, f"setfattr user.flags on {path} (no domain)")
        elif value == "bogus":
            self.expect(got, errno.EINVAL, f"setfattr user.flags bogus {path}", path)
        else:
            self.expect(got, 0, f"setfattr user.flags {value!r} {path}", path)
            if value:
                self.snapshot_flags[before[folder].uuid] = value
            else:
                self.snapshot_flags.pop(before[folder].uuid, None)

    @step(folder=FOLDERS, snapshot=SNAPSHOT_NAMES)
    def take_snapshot(self, folder: str, snapshot: str) -> None:
        before = self.truth()
        got = tool_errno(run("mkdir", self.domains / folder / "snapshots" / snapshot))
        after = self.truth()
        if folder not in before:
            self.expect(got, errno.ENOENT, f"mkdir {folder}/snapshots/{snapshot} (no domain)")
            assert after == before
            return
        domain = before[folder]
        name = SNAPSHOTS[snapshot]
        if snapshot == "current":
            # The name of the link: EEXIST while it is there, else refused as reserved.
            self.expect(got, errno.EEXIST if domain.current else errno.EINVAL,
                        f"mkdir {folder}/snapshots/current")
            assert after == before
        elif domain.snapshot(name) is not None:
            self.expect(got, errno.EEXIST, f"mkdir {folder}/snapshots/{snapshot} (exists)")
            assert after == before
        else:
            self.expect(got, 0, f"mkdir {folder}/snapshots/{snapshot}",
                        self.domains / folder / "snapshots")
            made = after[folder]
            assert made.snapshot(name) is not None and made.current == name
            # user.flags is used up by this mkdir (docs/snapshots.md); halt stops the domain.
            halted = self.snapshot_flags.pop(domain.uuid, None) == "halt"
            assert made.state == ("shutoff" if halted else domain.state)

    @step(folder=FOLDERS, snapshot=SNAPSHOT_NAMES)
    def delete_snapshot(self, folder: str, snapshot: str) -> None:
        before = self.truth()
        got = tool_errno(run("rmdir", self.domains / folder / "snapshots" / snapshot))
        after = self.truth()
        domain = before.get(folder)
        name = SNAPSHOTS[snapshot]
        if domain is None:
            self.expect(got, errno.ENOENT, f"rmdir {folder}/snapshots/{snapshot} (no domain)")
        elif snapshot == "current":
            self.expect(got, errno.ENOTDIR if domain.current else errno.ENOENT,
                        f"rmdir {folder}/snapshots/current (the link)")
        elif domain.snapshot(name) is None:
            self.expect(got, errno.ENOENT, f"rmdir {folder}/snapshots/{snapshot} (none)")
        elif self.guard_refuses((domain.uuid, name), got):
            self.expect(got, errno.ENOTEMPTY,
                        f"rmdir {folder}/snapshots/{snapshot} (a recursive delete walked it)",
                        self.domains / folder / "snapshots")
        else:
            self.expect(got, 0, f"rmdir {folder}/snapshots/{snapshot}",
                        self.domains / folder / "snapshots")
            left = after[folder]
            assert left.snapshot(name) is None
            assert {n for n, _ in left.snapshots} == {n for n, _ in domain.snapshots} - {name}
            assert left.state == domain.state
            self.guards.pop((domain.uuid, name), None)
            return
        assert after == before

    @step(folder=FOLDERS, snapshot=SNAPSHOT_NAMES,
          word=st.sampled_from(["revert", "revert-running", "revert-paused", "unrevert"]))
    def revert_snapshot(self, folder: str, snapshot: str, word: str) -> None:
        before = self.truth()
        path = self.domains / folder / "snapshots" / snapshot / "control"
        got = tool_errno(run("bash", "-c", f'echo {word} > "$1"', "-", path))
        after = self.truth()
        domain = before.get(folder)
        name = SNAPSHOTS[snapshot]
        if domain is None or domain.snapshot(name) is None:
            if snapshot == "current" and domain is not None and domain.current:
                name = domain.current  # through the link
            else:
                self.expect(got, errno.ENOENT, f"{word} > {path} (no snapshot)")
                assert after == before
                return
        if word == "unrevert":
            self.expect(got, errno.EINVAL, f"{word} > {path}", path)
            assert after == before
            return
        self.expect(got, 0, f"{word} > {path}", path)
        reverted = after[folder]
        taken = domain.snapshot(name).state
        expected = {"revert": {taken}, "revert-running": {"running"},
                    "revert-paused": {"paused"}}[word]
        if taken == "shutoff":
            expected.add(taken)  # the test driver ignores running/paused for those
        assert reverted.state in expected, (reverted.state, expected)
        assert reverted.current == name

    # -- renames -----------------------------------------------------------------------

    @step(target=TOUCHED, old=FOLDERS, new=ANY_FOLDER)
    def rename(self, old: str, new: str) -> str:
        if old == new:
            return new
        before = self.truth()
        got = tool_errno(run("mv", "-T", self.domains / old, self.domains / new))
        after = self.truth()
        if not self.exists(old, before):
            self.expect(got, errno.ENOENT, f"mv {old} {new} (no such folder)")
        elif self.exists(new, before):
            self.expect(got, errno.EEXIST, f"mv {old} {new} (taken)", self.domains)
        elif old in self.pending:
            self.expect(got, 0, f"mv {old} {new} (pending)", self.domains)
            self.pending.remove(old)
            self.pending.add(new)
            if old in self.scratch:
                self.scratch[new] = self.scratch.pop(old)
        elif before[old].state != "shutoff":
            self.expect(got, errno.EBUSY, f"mv {old} {new} ({before[old].state})",
                        self.domains)
        else:
            self.expect(got, 0, f"mv {old} {new}", self.domains)
            moved = after[new]
            assert moved.uuid == before[old].uuid and moved.name == NAME_OF[new]
            assert old not in after
            if old in self.scratch:
                self.scratch[new] = self.scratch.pop(old)
            return new
        assert after == before
        return new

    # -- recursive deletes -------------------------------------------------------------

    @step(folder=FOLDERS, inner=st.booleans(),
          tool=st.sampled_from(["rm -rf", "find -delete", "rmtree", "rsync --delete"]))
    def delete_recursively(self, folder: str, tool: str, inner: bool) -> None:
        before = self.truth()
        target = self.domains / folder / "snapshots" if inner else self.domains / folder
        if tool == "rm -rf":
            run("rm", "-rf", target)
        elif tool == "find -delete":
            run("find", target, "-delete")
        elif tool == "rsync --delete":  # empties the target, keeps (or makes) the folder
            (self.workdir / "empty").mkdir(exist_ok=True)
            run("rsync", "-a", "--delete", f"{self.workdir / 'empty'}/", f"{target}/")
            if not inner and not self.exists(folder, before):
                self.pending.add(folder)  # rsync made it, with mkdir
        else:
            shutil.rmtree(target, ignore_errors=True)
        after = self.truth()
        assert after == before, f"{tool} {target} removed libvirt objects"
        if folder in self.pending:
            if inner:
                pass
            elif tool == "rsync --delete":  # emptied: nothing left but what is served
                self.scratch.pop(folder, None)
            else:  # a pending folder exists only in this mount: it goes
                assert not os.path.lexists(self.domains / folder), f"{tool} {target}"
                self.pending.discard(folder)
                self.scratch.pop(folder, None)
            return
        if folder not in before:
            return
        # It walked every snapshot's folder, and the domain's unless it only emptied
        # snapshots/ (rm, find and rmtree end with an rmdir of the folder they were given;
        # the `current` link counts as the domain's, nodes/snapshots.py).
        domain = before[folder]
        walked = [(domain.uuid, name) for name, _ in domain.snapshots]
        if not inner or tool != "rsync --delete" or domain.current:
            walked.append((domain.uuid, None))
        now = time.monotonic()
        for key in walked:
            when, refused = self.guards.get(key, (now, False))
            self.guards[key] = (now, refused if now - when < GUARD_SECONDS else False)
        with contextlib.suppress(OSError):
            if folder in self.scratch:
                self.scratch[folder] &= set(os.listdir(self.domains / folder))

    # -- changes made elsewhere (virsh) ---------------------------------------------------

    @step(folder=FOLDERS,
          change=st.sampled_from(["define", "undefine", "redefine", "start", "destroy"]))
    def change_elsewhere(self, folder: str, change: str) -> None:
        """What virsh does to the same host; the mount follows (see tree_matches_libvirt)."""
        before = self.truth()
        domain = before.get(folder)
        name = NAME_OF[folder]
        removable = (domain is not None and domain.state == "shutoff" and not domain.snapshots
                     and not domain.managed_save)
        if change == "define" and not self.exists(folder, before):
            self.conn.defineXML(domain_document(name, 65536).decode())
        elif change in ("undefine", "redefine") and removable:
            self.conn.lookupByUUIDString(domain.uuid).undefine()
            self.forget_domain(domain.uuid)
            if change == "redefine":  # the same name, a new UUID
                self.conn.defineXML(domain_document(name, 131072).decode())
        elif change == "start" and domain is not None and domain.state == "shutoff":
            self.conn.lookupByUUIDString(domain.uuid).createWithFlags(0)
        elif change == "destroy" and domain is not None and domain.state != "shutoff":
            self.conn.lookupByUUIDString(domain.uuid).destroy()
        else:
            return
        self.elsewhere = True

    # -- reading with tools ------------------------------------------------------------

    @rule(folder=FOLDERS)
    def read_with_tools(self, folder: str) -> None:
        self.look = True
        truth = self.truth()
        listing = run("ls", "-1", self.domains).stdout.splitlines()
        assert sorted(listing) == sorted(set(truth) | self.pending)
        if folder not in truth:
            return
        result = run("cat", self.domains / folder / "state")
        assert result.stdout == f"{truth[folder].state}\n", result
        found = run("find", self.domains / folder)
        assert found.returncode == 0, found.stderr

    # -- after every step: the tree is libvirt's -----------------------------------------

    @invariant()
    def tree_matches_libvirt(self) -> None:
        if self.mount is None:
            return
        if self.elsewhere:
            # A change made elsewhere shows once its event arrives, at the latest when
            # the cache time has run out (docs/tree.md, "Events").
            self.elsewhere = False
            deadline = time.monotonic() + self.cache_timeout + 2.0
            while True:
                try:
                    self.compare_tree()
                    return
                except (AssertionError, FileNotFoundError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        if self.look:
            self.compare_tree()

    def compare_tree(self) -> None:
        truth = self.truth()
        listed = set(os.listdir(self.domains))
        assert listed == set(truth) | self.pending, (
            f"domains/ lists {sorted(listed)}; libvirt has {sorted(truth)}, "
            f"pending {sorted(self.pending)}")
        for folder in DOMAINS.values():
            if folder not in listed:
                assert not os.path.lexists(self.domains / folder), f"ghost: {folder}"
        for folder, domain in truth.items():
            self.check_domain(self.domains / folder, domain, self.scratch.get(folder, set()))
        for folder in self.pending:
            self.check_pending(self.domains / folder, self.scratch.get(folder, set()))

    def check_pending(self, path: Path, scratch: set[str]) -> None:
        names = set(os.listdir(path))
        assert names <= {"xml"} | scratch, f"{path} (pending) lists {sorted(names)}"
        if "xml" in names:
            assert (path / "xml").read_bytes() == b""

    def check_domain(self, path: Path, domain: DomainTruth, scratch: set[str]) -> None:
        names = set(os.listdir(path))
        assert names == SERVED | (scratch - SERVED), f"{path} lists {sorted(names)}"
        assert (path / "state").read_text() == f"{domain.state}\n", path
        info = key_values((path / "info").read_text())
        assert (info["name"], info["uuid"], info["state"]) == (
            domain.name, domain.uuid, domain.state), f"{path}/info: {info}"
        assert info["persistent"] == ("yes" if domain.persistent else "no")
        assert (info["id"] == "-") == (domain.state == "shutoff"), info
        assert info["autostart"] == ("yes" if domain.autostart else "no"), info
        assert info["managed-save"] == ("yes" if domain.managed_save else "no"), info
        assert (path / "autostart").read_text() == ("1\n" if domain.autostart else "0\n")
        control = (path / "control").read_text().split()
        assert control == [*VALID_WORDS[domain.state], "wait"], f"{path}/control: {control}"
        document = etree.fromstring((path / "xml").read_bytes())
        assert document.findtext("name") == domain.name, f"{path}/xml names another domain"
        if document.findtext("uuid") is not None:
            assert document.findtext("uuid") == domain.uuid
        self.check_snapshots(path / "snapshots", domain)

    def check_snapshots(self, path: Path, domain: DomainTruth) -> None:
        flags = self.snapshot_flags.get(domain.uuid)
        assert user_attribute(path, "user.flags") == flags, f"{path}: user.flags"
        names = set(os.listdir(path))
        expected = {SNAPSHOT_FOLDER.get(name, name) for name, _ in domain.snapshots}
        if domain.current is not None:
            expected.add("current")
            target = os.readlink(path / "current")
            assert target == SNAPSHOT_FOLDER.get(domain.current, domain.current), target
        assert names == expected, f"{path} lists {sorted(names)}, libvirt {sorted(expected)}"
        for folder in SNAPSHOTS:
            if folder not in names:
                assert not os.path.lexists(path / folder), f"ghost: {path / folder}"
        for name, snapshot in domain.snapshots:
            folder = path / SNAPSHOT_FOLDER.get(name, name)
            inside = set(os.listdir(folder))
            links = {"parent"} if snapshot.parent else set()
            assert inside == SNAPSHOT_SERVED | links, f"{folder} lists {sorted(inside)}"
            assert (folder / "state").read_text() == f"{snapshot.state}\n"
            if snapshot.parent:
                parent = SNAPSHOT_FOLDER.get(snapshot.parent, snapshot.parent)
                assert os.readlink(folder / "parent") == f"../{parent}"


def _tee(source: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return run("bash", "-c", 'tee "$2" < "$1" > /dev/null', "-", source, path)


@pytest.fixture
def libvirt_host() -> libvirt.virConnect:
    """The in-process test host, as libvirt-python sees it."""
    libvirt.registerErrorHandler(lambda ctx, error: None, None)
    conn = libvirt.open(URI)
    yield conn
    conn.close()


def test_random_sessions_match_libvirt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       libvirt_host: libvirt.virConnect) -> None:
    allow_in_a_thread(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no tool may keep the mount busy
    MountSession.workdir = tmp_path
    MountSession.conn = libvirt_host
    run_state_machine_as_test(MountSession, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, derandomize=not RANDOM,
        deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
