"""The benchmark of issue 9: libvirtfs side by side with a null pyfuse3 filesystem of the
same shape, libvirt-python and virsh, in one run, contenders alternated.

Run it through contrib/bench.sh (docs/performance.md says what each part measures):

    contrib/bench.sh                 everything (about 20-30 minutes); writes docs/performance.md
    contrib/bench.sh --quick         3 repetitions, 1,000 domains and the QEMU host, no 10,000
    contrib/bench.sh --only 1000     one part: 1000, 10000, qemu, remote (repeatable)
    contrib/bench.sh --no-qemu       the test-driver parts only
    contrib/bench.sh --smoke         20 domains, one repetition (the test suite runs this)

Partial runs print their table; only the full run writes docs/performance.md, unless
--output PATH says where.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients
import fixtures
import report
from mounts import REPO, Mount, mount_libvirtfs, mount_null
from proxy import DelayProxy

WORKLOADS = [("ls -l domains/", "ls -l"),
             ("cat */state", "cat */state"),
             ("grep -l running */state", "grep -l running */state >/dev/null; true"),
             ("cat */info", "cat */info"),
             ("cat */xml", "cat */xml")]
READERS = 8
LATENCY = 0.010  # seconds each way, remote fixture
QEMU_DOMAINS = 200
SNAPSHOTS = 20


class Results:
    """Every sample of the run, keyed by (fixture, contender, workload, phase)."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
        self.counts: dict[tuple[str, str, str, str], list[dict[str, int]]] = defaultdict(list)
        self.failures: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self.memory: dict[tuple[str, str], dict[str, int | float]] = {}
        self.reps: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.notes: list[str] = []
        self.lookups = 0  # missing-name lookups asked for before the last RSS

    def add(self, key: tuple[str, str, str, str], seconds: float, ok: bool = True,
            counts: dict[str, int] | None = None) -> None:
        self.times[key].append(seconds)
        if not ok:
            self.failures[key] += 1
        if counts is not None:
            self.counts[key].append(counts)

    def median(self, key: tuple[str, str, str, str]) -> float | None:
        values = self.times.get(key)
        return statistics.median(values) if values else None

    def count(self, key: tuple[str, str, str, str], name: str) -> int | None:
        samples = self.counts.get(key)
        if not samples:
            return None
        return int(statistics.median(sample.get(name, 0) for sample in samples))


def shell(command: str, cwd: Path, timeout: float = 900) -> tuple[float, bool]:
    """Seconds a line of bash takes in `cwd`, output discarded; and whether it succeeded."""
    started = time.perf_counter()
    result = subprocess.run(["bash", "-c", command], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=timeout)
    return time.perf_counter() - started, result.returncode == 0


def counter_overhead(mount: Mount) -> dict[str, int]:
    """What one reading of the counters adds to them (its own getxattr requests)."""
    first = mount.counters()
    second = mount.counters()
    return {name: n - first.get(name, 0) for name, n in second.items()}


def measure(mount: Mount, command: str, overhead: dict[str, int],
            proxy: DelayProxy | None = None) -> tuple[float, bool, dict[str, int]]:
    before = mount.counters()
    sent = proxy.counts()[0] if proxy else 0
    seconds, ok = shell(command, mount.domains)
    after = mount.counters()
    counts = {name: n - before.get(name, 0) - overhead.get(name, 0)
              for name, n in after.items()}
    if proxy:
        counts["proxy.requests"] = proxy.counts()[0] - sent
    return seconds, ok, counts


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.ct = args.cache_timeout
        self.results = Results()
        self.open_mounts: list[Mount] = []

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def mounted(self, start: Callable[[], Mount]) -> Mount:
        mount = start()
        self.open_mounts.append(mount)
        return mount

    def unmount(self, mount: Mount) -> None:
        mount.unmount()
        self.open_mounts.remove(mount)

    def unmount_all(self) -> None:
        for mount in list(self.open_mounts):
            self.unmount(mount)

    # -- one mount, one workload: cold, hot, after expiry ------------------------------

    def cycle(self, fixture: str, contender: str, start: Callable[[], Mount], label: str,
              command: str, proxy: DelayProxy | None = None) -> None:
        mount = self.mounted(start)
        try:
            overhead = counter_overhead(mount)
            for phase in ("cold", "hot"):
                seconds, ok, counts = measure(mount, command, overhead, proxy)
                self.results.add((fixture, contender, label, phase), seconds, ok, counts)
            time.sleep(self.ct + 0.3)
            seconds, ok, counts = measure(mount, command, overhead, proxy)
            self.results.add((fixture, contender, label, "expired"), seconds, ok, counts)
        finally:
            self.unmount(mount)

    # -- the test driver: null and libvirtfs --------------------------------------------

    def test_driver(self, fixture: str, count: int, reps: int) -> None:
        path = fixtures.write_test_host(self.work, count)
        uri = f"test://{path}"
        self.results.sizes[fixture] = count
        self.results.reps[fixture] = reps
        starts = {
            "null": lambda: mount_null(self.work, "vm-%05d", count, "big", self.ct),
            "libvirtfs": lambda: mount_libvirtfs(self.work, uri, "big", self.ct),
        }
        self.warm_up(starts["null"])
        began = time.monotonic()
        for rep in range(reps):
            if rep and time.monotonic() - began > self.args.budget * 60:
                self.results.reps[fixture] = rep
                self.results.notes.append(
                    f"{count:,} domains: {rep} run(s), the most that fit in --budget "
                    f"{self.args.budget:g} minutes (one run took "
                    f"{(time.monotonic() - began) / rep / 60:.1f} minutes)")
                break
            order = ["null", "libvirtfs"] if rep % 2 == 0 else ["libvirtfs", "null"]
            for label, command in WORKLOADS:
                for contender in order:
                    self.log(f"{fixture}: {label} on {contender} (run {rep + 1}/{reps})")
                    self.cycle(fixture, contender, starts[contender], label, command)
            for contender in order:
                self.log(f"{fixture}: readers, misses, snapshots on {contender} "
                         f"(run {rep + 1}/{reps})")
                self.misc(fixture, contender, starts[contender], count, rep)
        for contender in ("null", "libvirtfs"):
            self.log(f"{fixture}: memory of {contender}")
            self.memory(fixture, contender, starts[contender], count)

    def warm_up(self, start: Callable[[], Mount]) -> None:
        """Bring the tools and the page cache up to speed before anything is timed."""
        mount = self.mounted(start)
        try:
            for _, command in WORKLOADS:
                shell(command, mount.domains)
        finally:
            self.unmount(mount)

    def misc(self, fixture: str, contender: str, start: Callable[[], Mount], count: int,
             rep: int) -> None:
        mount = self.mounted(start)
        misses = self.args.misses
        try:
            overhead = counter_overhead(mount)
            shell("cat */state", mount.domains)
            if count <= 1000:
                time.sleep(self.ct + 0.3)
                seconds, ok, counts = measure(mount, "cat */state", overhead)
                self.results.add((fixture, contender, "1 reader", "expired"), seconds, ok, counts)
                time.sleep(self.ct + 0.3)
                readers = (f"pids=(); for i in $(seq {READERS}); do cat */state >/dev/null & "
                           f"pids+=($!); done; s=0; for p in \"${{pids[@]}}\"; do wait $p || "
                           f"s=1; done; exit $s")
                seconds, ok, counts = measure(mount, readers, overhead)
                self.results.add((fixture, contender, f"{READERS} readers", "expired"),
                                 seconds, ok, counts)
            # Missing names: new ones (each a lookup), then the same again (cached).
            stat = f"stat nosuch{{0..{misses - 1}}} >/dev/null 2>&1; true"
            for phase in ("cold", "hot"):
                seconds, ok, counts = measure(mount, stat, overhead)
                self.results.add((fixture, contender, "stat nosuchN", phase),
                                 seconds / misses, ok, counts)
            if count <= 1000:
                domain = fixtures.test_names(count)[rep % count]
                mkdir = f"mkdir {domain}/snapshots/s{{01..{SNAPSHOTS}}}"
                seconds, ok, counts = measure(mount, mkdir, overhead)
                self.results.add((fixture, contender, f"mkdir snapshots/ x{SNAPSHOTS}", "cold"),
                                 seconds, ok, counts)
        finally:
            self.unmount(mount)

    def memory(self, fixture: str, contender: str, start: Callable[[], Mount],
               count: int) -> None:
        """RSS right after mounting, peak after ls -l and cat of state, info and xml, and
        after many lookups of existing and missing names."""
        mount = self.mounted(start)
        try:
            found: dict[str, int | float] = {"after mount": mount.memory()["VmRSS"]}
            for command in ("ls -l", "cat */state", "cat */info", "cat */xml"):
                shell(command, mount.domains)
            used = mount.memory()
            found["after ls, cat"] = used["VmRSS"]
            found["peak"] = used["VmHWM"]
            lookups = self.args.lookups
            # Half existing names (VM/state, every domain in turn), half missing ones (new).
            script = ("import os, sys, time\nn, count = int(sys.argv[1]), int(sys.argv[3])\n"
                      "deadline = time.monotonic() + float(sys.argv[2])\n"
                      "for i in range(n):\n    try:\n"
                      "        os.stat(f'vm-{i // 2 % count:05d}/state' if i % 2 else "
                      "f'lookup{i}')\n    except FileNotFoundError:\n        pass\n"
                      "    if i % 1000 == 0 and time.monotonic() > deadline:\n"
                      "        print(i); break\nelse:\n    print(n)\n")
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", script, str(lookups),
                                     str(self.args.lookup_seconds), str(count)],
                                    cwd=mount.domains,
                                    capture_output=True, text=True, timeout=900)
            found["lookups"] = int(result.stdout.strip() or 0)
            found["lookup seconds"] = time.perf_counter() - started
            used = mount.memory()
            found["after lookups"] = used["VmRSS"]
            found["peak after lookups"] = used["VmHWM"]
            self.results.memory[(fixture, contender)] = found
        finally:
            self.unmount(mount)

    # -- the real host: libvirtfs, libvirt-python and virsh -----------------------------

    def qemu(self, names: list[str], reps: int) -> None:
        fixture = "qemu"
        self.results.sizes[fixture] = len(names)
        self.results.reps[fixture] = reps
        for rep in range(reps):
            for label, command in WORKLOADS:
                # The null filesystem of the same 200 names: what any pyfuse3 filesystem
                # costs for the pass, the floor libvirtfs cannot go under.
                contenders = ["libvirtfs", "null", "python loop", "virsh session",
                              "virsh per query"]
                if clients.QUESTIONS[label] != "xml":
                    contenders.append("batched")
                if rep % 2:
                    contenders.reverse()
                for contender in contenders:
                    self.log(f"qemu: {label} by {contender} (run {rep + 1}/{reps})")
                    self.qemu_one(contender, label, command, names)

    def qemu_one(self, contender: str, label: str, command: str, names: list[str]) -> None:
        uri, question = fixtures.QEMU_URI, clients.QUESTIONS[label]
        if contender == "libvirtfs":
            self.cycle("qemu", contender, lambda: mount_libvirtfs(self.work, uri, "qemu",
                                                                  self.ct), label, command)
        elif contender == "null":
            pattern = f"{fixtures.QEMU_PREFIX}%03d"
            self.cycle("qemu", contender, lambda: mount_null(self.work, pattern, len(names),
                                                             "qemu", self.ct), label, command)
        elif contender == "python loop":
            self.client("qemu", contender, label, lambda: clients.python(uri, question, "loop"))
        elif contender == "batched":
            self.client("qemu", contender, label,
                        lambda: clients.python(uri, question, "batched"))
        elif contender == "virsh session":
            self.client("qemu", contender, label,
                        lambda: (clients.virsh_session(uri, question, names), None))
        else:
            self.client("qemu", contender, label,
                        lambda: (clients.virsh_per_query(uri, question, names), None))

    def client(self, fixture: str, contender: str, label: str,
               query: Callable[[], tuple[float, float | None]]) -> None:
        """A hand-written contender: a new process each time, the same in every phase."""
        try:
            seconds, inner = query()
            ok = True
        except RuntimeError as e:
            self.log(f"{contender} {label}: {e}")
            seconds, inner, ok = float("nan"), None, False
        for phase in ("cold", "expired", "hot"):
            self.results.add((fixture, contender, label, phase), seconds, ok)
        if inner is not None:
            self.results.add((fixture, contender + " (call)", label, "cold"), inner)

    def remote(self, names: list[str], reps: int) -> None:
        """libvirtfs on the same daemon over qemu+tcp through a proxy on loopback: without
        delay, and with LATENCY each way."""
        self.results.reps["remote"] = reps
        self.results.sizes["remote"] = len(names)
        proxies = {"loopback": DelayProxy(fixtures.QEMU_SOCKET, 0.0).start(),
                   "10 ms": DelayProxy(fixtures.QEMU_SOCKET, LATENCY).start()}
        try:
            for rep in range(reps):
                order = list(proxies) if rep % 2 == 0 else list(reversed(proxies))
                for label, command in WORKLOADS[:2]:
                    for which in order:
                        proxy = proxies[which]
                        self.log(f"remote: {label} over {which} (run {rep + 1}/{reps})")
                        self.cycle("remote", which, lambda p=proxy: mount_libvirtfs(
                            self.work, p.uri(), "qemu", self.ct), label, command, proxy)
                        question = clients.QUESTIONS[label]
                        self.client("remote", f"python loop, {which}", label,
                                    lambda p=proxy, q=question: clients.python(p.uri(), q,
                                                                               "loop"))
                        self.client("remote", f"virsh session, {which}", label,
                                    lambda p=proxy, q=question: (clients.virsh_session(
                                        p.uri(), q, names), None))
        finally:
            for proxy in proxies.values():
                proxy.stop()


def machine() -> dict[str, str]:
    try:
        import libvirt
        major, rest = divmod(libvirt.getVersion(), 1000000)
        version = f"{major}.{rest // 1000}.{rest % 1000}"
    except Exception as e:
        version = f"unknown ({e})"
    return {"nproc": str(os.cpu_count()), "kernel": platform.release(), "libvirt": version,
            "python": platform.python_version(),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="contrib/bench.sh",
                                     description="libvirtfs's benchmark (docs/performance.md)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (default 7)")
    parser.add_argument("--reps-10000", type=int, default=3,
                        help="repetitions at 10,000 domains (default 3)")
    parser.add_argument("--budget", type=float, default=12,
                        help="minutes after which no new run of a test-driver part starts "
                             "(default 12; at least one run)")
    parser.add_argument("--reps-remote", type=int, default=3,
                        help="repetitions over the remote connections (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="3 repetitions, 1,000 domains and the QEMU parts, no 10,000")
    parser.add_argument("--only", action="append", choices=["1000", "10000", "qemu", "remote"],
                        help="run only this part (repeatable)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU host parts")
    parser.add_argument("--smoke", action="store_true",
                        help="20 domains, one repetition, no QEMU: checks that it all runs")
    parser.add_argument("--cache-timeout", type=float, default=1.0)
    parser.add_argument("--misses", type=int, default=1000, help="missing names per pass")
    parser.add_argument("--lookups", type=int, default=100000,
                        help="missing-name lookups before the last RSS")
    parser.add_argument("--lookup-seconds", type=float, default=120,
                        help="stop the lookups after this long (the count is reported)")
    parser.add_argument("--output", type=Path,
                        help="write the results here (default: docs/performance.md on a "
                             "full run, nowhere otherwise)")
    args = parser.parse_args(argv)
    full = not (args.quick or args.only or args.smoke or args.no_qemu)
    if args.output is None and full:
        args.output = REPO / "docs" / "performance.md"
    if args.quick:
        args.reps = min(args.reps, 3)
        args.only = args.only or ["1000", "qemu", "remote"]
    if args.smoke:
        args.reps, args.reps_10000 = 1, 1
        args.misses, args.lookups = 100, 1000
    args.parts = ["20"] if args.smoke else args.only or ["1000", "10000", "qemu", "remote"]
    if args.no_qemu:
        args.parts = [p for p in args.parts if p not in ("qemu", "remote")]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    command = "contrib/bench.sh" + "".join(" " + shlex.quote(a) for a in argv)
    started = time.monotonic()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="libvirtfs-bench-"))
    bench = Bench(args, work)
    bench.log(f"work folder: {work}")
    results = bench.results
    results.lookups = args.lookups
    defined: list[str] = []
    try:
        for part in ("20", "1000", "10000"):
            if part in args.parts:
                reps = args.reps if part != "10000" else min(args.reps, args.reps_10000)
                bench.test_driver(part, int(part), reps)
        if "qemu" in args.parts or "remote" in args.parts:
            if fixtures.start_testbed(REPO) is None:
                results.notes.append("The QEMU test bed did not start: no QEMU parts.")
            else:
                bench.log(f"qemu: defining {QEMU_DOMAINS} domains bench-NNN")
                defined = fixtures.define_qemu(QEMU_DOMAINS)
                if "qemu" in args.parts:
                    bench.qemu(defined, args.reps)
                if "remote" in args.parts:
                    bench.remote(defined, min(args.reps, args.reps_remote))
    except KeyboardInterrupt:
        results.notes.append("interrupted (Ctrl-C): the tables hold what was measured until "
                             "then")
        args.output = None  # a partial run never replaces the page's results
    finally:
        bench.unmount_all()
        if defined:
            bench.log(f"qemu: undefined {fixtures.undefine_qemu()} domains bench-NNN")
        for leftover in sorted(work.iterdir()):
            if leftover.is_file():
                leftover.unlink()
        work.rmdir()  # fails loudly if a mount point is left (never rm -r under a mount)
    info["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["minutes"] = f"{(time.monotonic() - started) / 60:.1f}"
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = report.render(results, info, command)
    print(text)
    if args.output:
        report.write(args.output, text)
        bench.log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
