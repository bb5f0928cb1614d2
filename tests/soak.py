"""The soak test's workload, its measurements and its verdicts (issue 10).

Sixteen clients use one mounted host for a bounded time while a sampler watches the
filesystem's process (RSS, open descriptors, threads) and libvirtd (the mount's clients).
tests/test_soak.py runs it for a minute or so in CI; `bash contrib/soak.sh --minutes 60`
runs the same code for an hour.  docs/testbed.md says what it asserts.

Each client is a process of its own (`python tests/soak.py SPEC`), so nothing of the
clients' (descriptors, memory) is counted as the filesystem's, even when the filesystem runs
in the test's process.  A client owns one domain in one role, so that the refusals it meets
are its own to explain (`user.error` is per file: a second writer's success would clear the
message the first came to read):

- controller: `echo start|destroy|suspend|resume > control` at random, `wait`, `cat control`
- snapshotter: `mkdir`/`rmdir` of snapshots (at most three), `setfattr`/`getfattr` of
  `snapshots/`, `cat` of a snapshot's `info`
- writer: the domain's `<description>` rewritten by `sed -i`, by `tee`, and by Python's
  open/write/close, each read back at once (read-your-writes)
- reader: `ls -l`, `cat` of every file, `getfattr -d`, the snapshots of any soak domain

A client reports every failure it did not expect (docs/testbed.md lists the expected ones).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("controller", "snapshotter", "writer", "reader")
# destroy less often than the others, so that the domains run (and have their memory
# snapshotted) most of the time.
WORDS = {"start": 3, "destroy": 1.5, "suspend": 2.5, "resume": 3}
STATES = {"nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed",
          "pmsuspended"}
# After a word succeeds, the state its own controller must read back.  An internal
# snapshot of a running domain pauses it while the memory is saved (libvirt's
# VIR_DOMAIN_PAUSED_SNAPSHOT), so a running domain may read `paused` for that moment.
AFTER = {"start": {"running", "paused"}, "resume": {"running", "paused"},
         "destroy": {"shutoff"}, "suspend": {"paused"}}
# The failures a client expects, by errno and by what `user.error` says (docs/errors.md).
# Each comes from the domain's state changing under the client, never from the mount.
# - A control word that does not fit the state: EBUSY, from the mount's own check
#   (docs/writing.md, "Control files"), or from libvirt's when the state changed between
#   that check and the call (an internal snapshot pauses a running domain while it saves
#   the memory, then resumes it).
STATE_REFUSALS = {errno.EBUSY: re.compile(
    r"^\S+ is not possible while the domain is \w+; valid now: "
    r"|^Requested operation is not valid: ")}
# - A snapshot taken or deleted while the domain's controller destroys it (or starts,
#   suspends, resumes it): libvirt's answer, EBUSY as above, or QEMU's monitor gone under
#   the call (libvirt's VIR_ERR_SYSTEM_ERROR carries the socket's ECONNRESET or EPIPE; its
#   internal or operation-failed errors are EIO).
MONITOR_GONE = re.compile(r"^Unable to (read from|write to) monitor: "
                          r"|End of file from qemu monitor"
                          r"|^operation failed: domain is not running")
SNAPSHOT_RACES = {**STATE_REFUSALS, errno.ECONNRESET: MONITOR_GONE,
                  errno.EPIPE: MONITOR_GONE, errno.EIO: MONITOR_GONE}
MAX_SNAPSHOTS = 3
TOOL_TIMEOUT = 90  # a tool still running after this is a hang (the mount's timeout is 30 s)

_ERRNO_BY_MESSAGE = sorted(((os.strerror(n), n) for n in errno.errorcode),
                           key=lambda item: -len(item[0]))


def description(text: str) -> str | None:
    found = re.search(r"<description>([^<]*)</description>", text)
    return found.group(1) if found else None


# -- a client ------------------------------------------------------------------------------

class Client:
    """One of the sixteen: a role, a domain, a deadline; counts what it did and saw."""

    def __init__(self, spec: dict) -> None:
        self.id: int = spec["id"]
        self.role: str = spec["role"]
        self.host = Path(spec["host"])
        self.domain: str = spec["domain"]
        self.domains: list[str] = spec["domains"]
        self.scratch = Path(spec["scratch"])
        self.deadline = time.monotonic() + spec["seconds"]
        self.rng = random.Random(spec["seed"])
        self.done: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.snapshots: list[str] = []
        self.serial = 0
        self.last_stderr = ""

    @property
    def folder(self) -> Path:
        return self.host / "domains" / self.domain

    # Running tools, classifying their failures.

    def tool(self, *command: str | os.PathLike, stdin=None) -> tuple[int, str]:
        """Run a tool as a user would; (errno or 0, its stdout)."""
        try:
            result = subprocess.run([str(c) for c in command], capture_output=True,
                                    text=True, timeout=TOOL_TIMEOUT, stdin=stdin)
        except subprocess.TimeoutExpired:
            self.fail(f"{command} did not return within {TOOL_TIMEOUT} s")
            return -1, ""
        if result.returncode == 0:
            return 0, result.stdout
        for message, number in _ERRNO_BY_MESSAGE:
            if message in result.stderr:
                self.last_stderr = result.stderr.strip()
                return number, result.stdout
        self.fail(f"{command} failed naming no errno: {result.stderr.strip()}")
        return -1, ""

    def shell(self, script: str, *args: str | os.PathLike) -> int:
        return self.tool("bash", "-c", script, "-", *args)[0]

    def fail(self, what: str) -> None:
        self.unexpected.append(f"client {self.id} ({self.role} of {self.domain}): {what}")

    def outcome(self, op: str, got: int, where: Path | None = None,
                explained: dict[int, re.Pattern] | None = None, detail: str = "") -> bool:
        """Count op's outcome.  A failure is expected when `explained` holds its errno and
        `user.error` of `where` (docs/errors.md: the file, or for mkdir and rmdir the parent
        folder) says one of the messages that go with it."""
        if got == 0:
            self.done[op] += 1
            return True
        if got == -1:
            return False
        if where is not None and explained and got in explained:
            why = read_user_error(where)
            if explained[got].search(why):
                self.refused[f"{op} {errno.errorcode[got]}: {why[:70]}"] += 1
                return False
            self.fail(f"{op} got {errno.errorcode[got]}, and user.error of {where} "
                      f"says {why!r} {detail}")
            return False
        self.fail(f"{op} got {errno.errorcode.get(got, got)} {detail}: {self.last_stderr}")
        return False

    def run(self) -> dict:
        step = getattr(self, self.role)
        while time.monotonic() < self.deadline:
            try:
                step()
            except OSError as e:  # a check's own read or listing failed
                self.fail(f"{e!r} in {traceback.format_exc(limit=-2)}")
            time.sleep(self.rng.uniform(0, 0.05))
        return {"id": self.id, "role": self.role, "domain": self.domain,
                "done": dict(self.done), "refused": dict(self.refused),
                "unexpected": self.unexpected}

    # The roles.

    def controller(self) -> None:
        control = self.folder / "control"
        word = self.rng.choices(list(WORDS), weights=list(WORDS.values()))[0]
        got = self.shell('echo "$1" > "$2"', word, control)
        if self.outcome(word, got, control, STATE_REFUSALS):
            state = (self.folder / "state").read_text().strip()
            if state not in AFTER[word]:
                self.fail(f"{word} succeeded, then state read {state!r}")
            if word == "destroy":
                self.outcome("wait", self.shell('echo "wait shutoff 5" > "$1"', control))
        if self.rng.random() < 0.3:
            got, text = self.tool("cat", control, self.folder / "job")
            if self.outcome("cat control", got) and "wait" not in text.split():
                self.fail(f"cat control lists no wait: {text!r}")

    def snapshotter(self) -> None:
        snapshots = self.folder / "snapshots"
        choice = self.rng.random()
        if choice < 0.35 and len(self.snapshots) < MAX_SNAPSHOTS:
            self.serial += 1
            name = f"c{self.id}-{self.serial}"
            if self.outcome("mkdir snapshot", self.tool("mkdir", snapshots / name)[0],
                            snapshots, SNAPSHOT_RACES):
                self.snapshots.append(name)
                listed = os.listdir(snapshots)
                if name not in listed:
                    self.fail(f"mkdir {name} succeeded, ls shows {sorted(listed)}")
                got, state = self.tool("cat", snapshots / name / "state")
                if self.outcome("cat snapshot state", got) and state.strip() not in (
                        STATES | {"disk-snapshot"}):
                    self.fail(f"snapshot {name} has state {state!r}")
        elif choice < 0.65 and self.snapshots:
            name = self.snapshots.pop(0)
            if self.outcome("rmdir snapshot", self.tool("rmdir", snapshots / name)[0],
                            snapshots, SNAPSHOT_RACES):
                if name in os.listdir(snapshots):
                    self.fail(f"rmdir {name} succeeded, ls still shows it")
            else:
                self.snapshots.insert(0, name)
        elif choice < 0.8:
            text = f"soak {self.id} {self.serial}"
            got, _ = self.tool("setfattr", "-n", "user.description", "-v", text, snapshots)
            if self.outcome("setfattr", got):
                got, seen = self.tool("getfattr", "-n", "user.description", "--only-values",
                                      snapshots)
                if self.outcome("getfattr", got) and seen != text:
                    self.fail(f"user.description reads {seen!r} after setting {text!r}")
        elif self.snapshots:
            name = self.rng.choice(self.snapshots)
            got, text = self.tool("cat", snapshots / name / "info")
            if self.outcome("cat snapshot info", got) and f"name: {name}\n" not in text:
                self.fail(f"{name}/info: {text!r}")
        else:
            self.outcome("getfattr -d", self.tool("getfattr", "-d", snapshots)[0])

    def writer(self) -> None:
        xml = self.folder / "xml"
        self.serial += 1
        wanted = f"soak {self.id} {self.serial}"
        how = self.rng.choice(("sed -i", "tee", "python"))
        if how == "sed -i":
            got = self.tool("sed", "-i", f"s|<description>[^<]*</description>|"
                                         f"<description>{wanted}</description>|", xml)[0]
        else:
            document = re.sub(r"<description>[^<]*</description>",
                              f"<description>{wanted}</description>", xml.read_text())
            if how == "tee":
                source = self.scratch / f"client-{self.id}.xml"
                source.write_text(document)
                with open(source) as stdin:
                    got = self.tool("tee", xml, stdin=stdin)[0]
            else:
                try:
                    with open(xml, "w") as f:
                        f.write(document)
                    got = 0
                except OSError as e:
                    got = e.errno or -1
                    self.last_stderr = str(e)
        if self.outcome(how, got, detail=f"writing {xml}"):
            seen = description(xml.read_text())
            if seen != wanted:
                self.fail(f"{how} wrote {wanted!r}, xml then read {seen!r}")

    def reader(self) -> None:
        folder = self.host / "domains" / self.rng.choice(self.domains)
        choice = self.rng.random()
        if choice < 0.2:
            got = self.tool("ls", "-l", self.host / "domains", folder)[0]
            if got == errno.ENOENT and went_meanwhile(self.last_stderr):
                self.refused["ls -l ENOENT: a scratch file of sed -i went meanwhile"] += 1
            else:
                self.outcome("ls -l", got)
        elif choice < 0.5:
            got, text = self.tool("cat", folder / "state", folder / "info", folder / "control")
            if self.outcome("cat", got) and f"name: {folder.name}\n" not in text:
                self.fail(f"cat {folder}/info shows another name: {text!r}")
        elif choice < 0.7:
            for name in ("xml", "live.xml"):
                try:
                    text = (folder / name).read_text()
                except OSError as e:
                    self.last_stderr = str(e)
                    self.outcome(f"read {name}", e.errno or -1)
                    continue
                self.outcome(f"read {name}", 0)
                if f"<name>{folder.name}</name>" not in text:
                    self.fail(f"{folder}/{name} names another domain")
        elif choice < 0.8:
            self.outcome("getfattr -d", self.tool("getfattr", "-d", folder / "xml",
                                                  folder / "snapshots")[0])
        else:
            # Snapshots come and go under their own client: ENOENT for a name listed a
            # moment ago is the reader being late, nothing else.
            got, text = self.tool("ls", "-l", folder / "snapshots")
            if got == errno.ENOENT and "snapshots/" in self.last_stderr:
                self.refused["ls -l snapshots ENOENT: a snapshot went meanwhile"] += 1
            else:
                self.outcome("ls -l snapshots", got)
            for line in text.splitlines()[1:]:
                name = line.split()[-1] if "->" not in line else line.split()[-3]
                try:
                    (folder / "snapshots" / name / "state").read_text()
                    self.done["read snapshot state"] += 1
                except FileNotFoundError:
                    self.refused["read snapshot state ENOENT: the snapshot went"] += 1
                except OSError as e:
                    self.last_stderr = str(e)
                    self.outcome("read snapshot state", e.errno or -1)


def went_meanwhile(stderr: str) -> bool:
    """Whether every name `ls -l` could not stat after listing it is a scratch file of
    `sed -i` (made beside `xml`, renamed onto it a moment later: docs/writing.md)."""
    names = re.findall(r"cannot access '([^']*)'", stderr)
    return bool(names) and all(Path(name).name.startswith("sed") for name in names)


def read_user_error(path: Path) -> str:
    try:
        return os.getxattr(path, "user.error").decode()
    except OSError:
        return ""


# -- measurements --------------------------------------------------------------------------

@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    threads: int
    clients: int | None  # libvirtd's connections from the filesystem's process


def sample(pid: int, count_clients: Callable[[int], int] | None) -> Sample:
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines())
    return Sample(t=time.monotonic(), rss_kib=int(status["VmRSS"].split()[0]),
                  fds=len(os.listdir(f"/proc/{pid}/fd")), threads=int(status["Threads"]),
                  clients=count_clients(pid) if count_clients else None)


# -- the tree against libvirt -------------------------------------------------------------

STATE_WORDS = ["nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed",
               "pmsuspended"]


def libvirt_view(conn, prefix: str) -> dict[str, dict]:
    """What libvirt-python says of the domains named PREFIX*: state, snapshots with their
    states, the current snapshot, and the definition's description."""
    import libvirt
    from lxml import etree
    view = {}
    for dom in conn.listAllDomains(0):
        if not dom.name().startswith(prefix):
            continue
        snapshots = {snap.getName(): etree.fromstring(snap.getXMLDesc(0).encode())
                     .findtext("state") for snap in dom.listAllSnapshots(0)}
        view[dom.name()] = {
            "state": STATE_WORDS[dom.state(0)[0]], "snapshots": snapshots,
            "current": dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None,
            "description": description(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))}
    return view


def mount_view(host: Path, prefix: str) -> dict[str, dict]:
    """The same, as the mount shows it (ls, cat, readlink)."""
    view = {}
    for name in os.listdir(host / "domains"):
        if not name.startswith(prefix):
            continue
        folder = host / "domains" / name
        listed = set(os.listdir(folder / "snapshots"))
        view[name] = {
            "state": (folder / "state").read_text().strip(),
            "snapshots": {snap: (folder / "snapshots" / snap / "state").read_text().strip()
                          for snap in listed - {"current"}},
            "current": os.readlink(folder / "snapshots" / "current")
            if "current" in listed else None,
            "description": description((folder / "xml").read_text())}
    return view


# -- verdicts ------------------------------------------------------------------------------

# Growth beyond noise: the median of the last third of the samples against the median of
# the second third (the first third is warm-up: caches fill, the kernel's dentries, Python's
# arenas), plus a margin: about three times what the medians moved in runs without a leak
# on the 2-core test machine (RSS moves in steps of about 1 MiB as Python takes arenas).  A
# leak of a kilobyte per operation may stay under them in CI's minute, not in the hour of
# `contrib/soak.sh --minutes 60` (docs/testbed.md has the numbers).
RSS_MARGIN_KIB = 3 * 1024
RSS_MARGIN_SHARE = 0.05
FD_MARGIN = 2
THREAD_MARGIN = 4


def thirds(samples: list[Sample], what: str) -> tuple[float, float, float]:
    """The medians of `what` over the first, second and last third of the samples."""
    values = [getattr(s, what) for s in samples]
    third = len(values) // 3
    return (statistics.median(values[:third]), statistics.median(values[third:2 * third]),
            statistics.median(values[2 * third:]))


def growth(samples: list[Sample], what: str, margin: Callable[[float], float]) -> str | None:
    _, base, end = thirds(samples, what)
    if end > base + margin(base):
        return (f"{what} grew: median {base} in the second third of the samples, {end} in "
                f"the last (margin {margin(base):.0f}): {[getattr(s, what) for s in samples]}")
    return None


def growths(samples: list[Sample]) -> list[str]:
    found = [growth(samples, "rss_kib", lambda base: max(RSS_MARGIN_KIB,
                                                         RSS_MARGIN_SHARE * base)),
             growth(samples, "fds", lambda base: FD_MARGIN),
             growth(samples, "threads", lambda base: THREAD_MARGIN)]
    return [f for f in found if f]


@dataclass
class Soak:
    """What one run saw: the samples and each client's report."""
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    clients: list[dict] = field(default_factory=list)
    counters: str = ""

    def save(self, path: Path) -> None:
        """The samples as CSV (seconds since the first, RSS KiB, fds, threads, clients)."""
        start = self.samples[0].t
        path.write_text("seconds,rss_kib,fds,threads,clients\n" + "".join(
            f"{s.t - start:.1f},{s.rss_kib},{s.fds},{s.threads},{s.clients}\n"
            for s in self.samples))

    def unexpected(self) -> list[str]:
        return [line for client in self.clients for line in client["unexpected"]]

    def done(self, role: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for client in self.clients:
            if client["role"] == role:
                total.update(client["done"])
        return total

    def summary(self) -> str:
        done: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for client in self.clients:
            done.update(client["done"])
            refused.update(client["refused"])
        lines = [f"soak: {len(self.clients)} clients, {self.seconds:.0f} s, "
                 f"{sum(done.values())} operations, {len(self.samples)} samples",
                 "  medians of each third: " + ", ".join(
                     f"{what} {'/'.join(f'{m:g}' for m in thirds(self.samples, what))}"
                     for what in ("rss_kib", "fds", "threads")),
                 f"  libvirtd clients {sorted({s.clients for s in self.samples}, key=str)}",
                 "  done: " + ", ".join(f"{op} {n}" for op, n in sorted(done.items()))]
        lines += [f"  refused as expected {n}x: {why}" for why, n in sorted(refused.items())]
        return "\n".join(lines)


def run_soak(host: Path, domains: list[str], seconds: float, pid: int, scratch: Path,
             count_clients: Callable[[int], int] | None = None, clients: int = 16,
             seed: int = 10, progress: bool = False) -> Soak:
    """Run `clients` client processes over `domains` of the mounted `host` for `seconds`,
    sampling process `pid` meanwhile (and printing each sample, with `progress`)."""
    interval = min(max(1.0, seconds / 40), 30.0)
    soak = Soak(seconds)
    processes = []
    for n in range(clients):
        spec = {"id": n, "role": ROLES[n % len(ROLES)],
                "domain": domains[(n // len(ROLES)) % len(domains)], "domains": domains,
                "host": str(host), "seconds": seconds, "seed": seed * 1000 + n,
                "scratch": str(scratch)}
        processes.append(subprocess.Popen([sys.executable, __file__, json.dumps(spec)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            soak.samples.append(sample(pid, count_clients))
            if progress:
                last = soak.samples[-1]
                print(f"soak: {last.t - soak.samples[0].t:.0f} s: RSS {last.rss_kib} KiB, "
                      f"{last.fds} fds, {last.threads} threads, libvirtd clients "
                      f"{last.clients}", flush=True)
            stop.wait(interval)

    thread = threading.Thread(target=sampler, name="soak-sampler", daemon=True)
    thread.start()
    try:
        for process in processes:
            out, err = process.communicate(timeout=seconds + 2 * TOOL_TIMEOUT + 60)
            if process.returncode:
                raise AssertionError(f"a soak client failed:\n{err}")
            soak.clients.append(json.loads(out))
    finally:
        stop.set()
        thread.join()
        for process in processes:
            if process.poll() is None:
                process.kill()
    return soak


if __name__ == "__main__":
    print(json.dumps(Client(json.loads(sys.argv[1])).run()))
