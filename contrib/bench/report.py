"""The benchmark's tables and the issue's bars, as Markdown (printed, and written into
docs/performance.md between two markers)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from run import Results

BEGIN = "<!-- contrib/bench.sh writes from here -->"
END = "<!-- contrib/bench.sh writes up to here -->"
PHASES = ("cold", "expired", "hot")
TIMED = ("ls -l domains/", "cat */state", "grep -l running */state", "cat */info", "cat */xml")
KINDS = ("lookup", "getattr", "readdir", "open", "read", "flush", "release", "getxattr",
         "opendir", "releasedir", "mkdir")
CLIENTS = ("python loop", "batched", "virsh session", "virsh per query")
RTT = 0.020  # the remote fixture's round trip: 10 ms each way


def ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    value = seconds * 1000
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    if value >= 1:
        return f"{value:.2f} ms"
    return f"{value * 1000:.0f} µs"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def mb(kb: float | None) -> str:
    return "—" if kb is None else f"{kb / 1024:.0f} MB"


def _calls(r: Results, key: tuple[str, str, str, str]) -> str:
    total, hops = r.count(key, "libvirt.total"), r.count(key, "libvirt.hops")
    return "—" if total is None else f"{total} ({hops})"


def _requests(r: Results, key: tuple[str, str, str, str]) -> str:
    n = r.count(key, "fuse.total")
    return "—" if n is None else str(n)


def _failed(r: Results, key: tuple[str, str, str, str]) -> str:
    n = r.failures.get(key, 0)
    return f" ({n} failed)" if n else ""


def test_driver_table(r: Results, fixture: str) -> list[str]:
    n = r.sizes[fixture]
    out = [f"### Test driver, {n:,} domains (medians of {r.reps[fixture]})", "",
           "| workload | phase | null | libvirtfs | libvirtfs / null | FUSE requests "
           "null / libvirtfs | libvirt calls (hops) |", "|---|---|---|---|---|---|---|"]
    for label in TIMED:
        for phase in PHASES:
            null, lfs = (fixture, "null", label, phase), (fixture, "libvirtfs", label, phase)
            out.append(f"| `{label}` | {phase} | {ms(r.median(null))}{_failed(r, null)} | "
                       f"{ms(r.median(lfs))}{_failed(r, lfs)} | "
                       f"{times(ratio(r.median(lfs), r.median(null)))} | "
                       f"{_requests(r, null)} / {_requests(r, lfs)} | {_calls(r, lfs)} |")
    one = {c: r.median((fixture, c, "1 reader", "expired")) for c in ("null", "libvirtfs")}
    many = {c: r.median((fixture, c, "8 readers", "expired")) for c in ("null", "libvirtfs")}
    if one["null"] is not None:
        keys = [(fixture, c, "8 readers", "expired") for c in ("null", "libvirtfs")]
        out.append(f"| 8 readers of `cat */state` / 1 reader | expired | "
                   f"{times(ratio(many['null'], one['null']))}{_failed(r, keys[0])} | "
                   f"{times(ratio(many['libvirtfs'], one['libvirtfs']))}{_failed(r, keys[1])} "
                   f"| (1 reader: {ms(one['null'])} / {ms(one['libvirtfs'])}) | | |")
    for phase, what in (("cold", "new names"), ("hot", "same names again")):
        null, lfs = ((fixture, c, "stat nosuchN", phase) for c in ("null", "libvirtfs"))
        out.append(f"| `stat nosuchN`, per miss | {what} | {ms(r.median(null))} | "
                   f"{ms(r.median(lfs))} | {times(ratio(r.median(lfs), r.median(null)))} | "
                   f"{_requests(r, null)} / {_requests(r, lfs)} | {_calls(r, lfs)} |")
    label = "mkdir snapshots/ x20"
    null, lfs = (fixture, "null", label, "cold"), (fixture, "libvirtfs", label, "cold")
    if r.median(null) is not None:
        out.append(f"| `mkdir snapshots/s{{01..20}}` | | {ms(r.median(null))}"
                   f"{_failed(r, null)} | {ms(r.median(lfs))}{_failed(r, lfs)} | "
                   f"{times(ratio(r.median(lfs), r.median(null)))} | {_requests(r, null)} / "
                   f"{_requests(r, lfs)} | {_calls(r, lfs)} |")
    mem = {c: r.memory.get((fixture, c), {}) for c in ("null", "libvirtfs")}
    if mem["libvirtfs"]:
        for key, what in (("after mount", "RSS right after mounting"),
                          ("after ls, cat", "RSS after `ls -l`, `cat` of state, info, xml"),
                          ("peak", "peak RSS (VmHWM) after those"),
                          ("after lookups", "RSS after {lookups:,} lookups (half missing names)")):
            text = what.format(lookups=int(mem["libvirtfs"].get("lookups", 0)))
            out.append(f"| {text} | | {mb(mem['null'].get(key))} | "
                       f"{mb(mem['libvirtfs'].get(key))} | | | |")
        grown = mem["libvirtfs"]["after ls, cat"] - mem["libvirtfs"]["after mount"]
        out.append(f"| libvirtfs growth from just after mounting | | | {mb(grown)} | | | |")
        for c in ("null", "libvirtfs"):
            got = mem[c]
            if got and got.get("lookups", 0) < r.lookups:
                out.append(f"| ({c}: only {got['lookups']:,} lookups in "
                           f"{got['lookup seconds']:.0f} s) | | | | | | |")
    return [*out, ""]


def breakdown(r: Results, fixture: str) -> list[str]:
    """FUSE requests by kind and libvirt calls by method: where the time goes."""
    out = [f"### Where the time goes, {r.sizes[fixture]:,} domains: requests per pass",
           "", "FUSE requests by kind, null / libvirtfs (medians), and how many of "
           "libvirtfs's were not answered at once (they awaited a rendering, a listing or "
           "libvirt); libvirt calls of libvirtfs by method.", "",
           "| workload | phase | FUSE requests by kind (null / libvirtfs) | libvirt calls |",
           "|---|---|---|---|"]
    for label in (*TIMED, "stat nosuchN"):
        for phase in PHASES:
            null, lfs = (fixture, "null", label, phase), (fixture, "libvirtfs", label, phase)
            if not r.counts.get(lfs):
                continue
            kinds = []
            for kind in KINDS:
                a, b = r.count(null, f"fuse.{kind}") or 0, r.count(lfs, f"fuse.{kind}") or 0
                if a or b:
                    kinds.append(f"{kind} {a}/{b}")
            names = sorted({name for sample in r.counts[lfs] for name in sample
                            if name.startswith("libvirt.") and name not in
                            ("libvirt.total", "libvirt.hops")})
            calls = [f"{name[8:]} {r.count(lfs, name)}" for name in names
                     if r.count(lfs, name)]
            waited = r.count(lfs, "waited.total")
            if waited is not None:
                kinds.append(f"(libvirtfs waited in {waited})")
            out.append(f"| `{label}` | {phase} | {', '.join(kinds)} | "
                       f"{', '.join(calls) or 'none'} |")
    return [*out, ""]


def qemu_table(r: Results) -> list[str]:
    f = "qemu"
    out = [f"### Real libvirtd (QEMU, qemu:///system), {r.sizes[f]} defined domains "
           f"(medians of {r.reps[f]})", "",
           "The hand-written contenders run as a new process each time (Python start-up, "
           "`import libvirt` and the connection included: what a script costs); "
           "\"call\" is the batched call alone, timed inside that process. A `virsh` "
           "process per query is a sample of 8 processes, scaled to all queries. \"null\" "
           "is the null pyfuse3 filesystem with the same 200 names: what the pass costs any "
           "pyfuse3 filesystem on this machine, with no libvirt at all.", "",
           "| workload | phase | libvirtfs | null | python loop | getAllDomainStats (process "
           "/ call) | virsh session | virsh per query | libvirtfs / loop | libvirtfs / session "
           "| libvirt calls (hops) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in TIMED:
        for phase in PHASES:
            m = {c: r.median((f, c, label, phase)) for c in ("libvirtfs", "null", *CLIENTS)}
            call = r.median((f, "batched (call)", label, "cold"))
            batched = "—" if m["batched"] is None else f"{ms(m['batched'])} / {ms(call)}"
            lfs = (f, "libvirtfs", label, phase)
            out.append(f"| `{label}` | {phase} | {ms(m['libvirtfs'])}{_failed(r, lfs)} | "
                       f"{ms(m['null'])} | "
                       f"{ms(m['python loop'])} | {batched} | {ms(m['virsh session'])} | "
                       f"{ms(m['virsh per query'])} | "
                       f"{times(ratio(m['libvirtfs'], m['python loop']))} | "
                       f"{times(ratio(m['libvirtfs'], m['virsh session']))} | "
                       f"{_calls(r, lfs)} |")
    return [*out, ""]


def remote_table(r: Results) -> list[str]:
    f = "remote"
    out = [f"### Remote: the same daemon over qemu+tcp, {r.sizes[f]} domains (medians of "
           f"{r.reps[f]})", "",
           "Both through the benchmark's TCP proxy on loopback (contrib/bench/proxy.py): "
           "\"loopback\" without delay, \"10 ms\" delaying every chunk 10 ms each way "
           "(a round trip of 20 ms). Round trips: the RPC calls libvirtfs sent through the proxy "
           "during the pass (each one a round trip; counted from libvirt's message framing). "
           "Bound: 1.25 x (loopback + 10 round trips). \"hot\" is a pass right after the "
           "first: when a pass takes longer than cache_timeout, it is not hot.", "",
           "| workload | phase | libvirtfs, loopback | libvirtfs, 10 ms | bound | round trips "
           "(loopback / 10 ms) | python loop, 10 ms | virsh session, 10 ms |",
           "|---|---|---|---|---|---|---|---|"]
    for label in TIMED[:2]:
        for phase in PHASES:
            lo, hi = (f, "loopback", label, phase), (f, "10 ms", label, phase)
            bound = None if r.median(lo) is None else 1.25 * (r.median(lo) + 10 * RTT)
            out.append(f"| `{label}` | {phase} | {ms(r.median(lo))}{_failed(r, lo)} | "
                       f"{ms(r.median(hi))}{_failed(r, hi)} | {ms(bound)} | "
                       f"{r.count(lo, 'proxy.requests')} / {r.count(hi, 'proxy.requests')} | "
                       f"{ms(r.median((f, 'python loop, 10 ms', label, phase)))} | "
                       f"{ms(r.median((f, 'virsh session, 10 ms', label, phase)))} |")
    return [*out, ""]


def bars(r: Results) -> list[str]:
    rows: list[tuple[str, str, bool | str | None]] = []

    def verdict(ok: bool | str | None) -> str:
        if isinstance(ok, str):
            return ok
        return {True: "holds", False: "**does not hold**", None: "not measured"}[ok]

    for fixture, limit in (("1000", 1.25), ("10000", 1.5), ("20", 1.25)):
        if fixture not in r.sizes:
            continue
        for label in ("ls -l domains/", "cat */state"):
            for phase in PHASES:
                x = ratio(r.median((fixture, "libvirtfs", label, phase)),
                          r.median((fixture, "null", label, phase)))
                rows.append((f"`{label}`, {r.sizes[fixture]:,} domains, {phase}: "
                             f"at most {limit}x null", times(x),
                             None if x is None else x <= limit))
        x = ratio(r.median((fixture, "libvirtfs", "stat nosuchN", "cold")),
                  r.median((fixture, "null", "stat nosuchN", "cold")))
        rows.append((f"`stat nosuchN` (new names), {r.sizes[fixture]:,} domains: at most "
                     f"1.25x null", times(x), None if x is None else x <= 1.25))
    if "qemu" in r.sizes:
        for label in ("cat */state", "cat */info"):
            for phase in PHASES:
                lfs = r.median(("qemu", "libvirtfs", label, phase))
                rivals = {c: r.median(("qemu", c, label, phase))
                          for c in ("virsh session", "python loop")}
                ok = None if lfs is None or None in rivals.values() else all(
                    lfs < v for v in rivals.values())
                null = r.median(("qemu", "null", label, phase))
                floor = "" if null is None else f" (null filesystem: {ms(null)})"
                rows.append((f"QEMU, 200 domains, `{label}` {phase}: faster than the virsh "
                             f"session and the python loop",
                             f"{ms(lfs)} vs {ms(rivals['virsh session'])} / "
                             f"{ms(rivals['python loop'])}{floor}", ok))
    if "remote" in r.sizes:
        for label in ("ls -l domains/", "cat */state"):
            for phase in PHASES:
                lo, hi = (("remote", w, label, phase) for w in ("loopback", "10 ms"))
                trips = r.count(hi, "proxy.requests")
                rows.append((f"remote, `{label}` {phase}: round trips do not grow with 200 "
                             f"(at most 10)", str(trips),
                             None if trips is None else trips <= 10))
                bound = None if r.median(lo) is None else 1.25 * (r.median(lo) + 10 * RTT)
                got = r.median(hi)
                rows.append((f"remote, `{label}` {phase}: within 1.25x (loopback + 10 round "
                             f"trips)", f"{ms(got)} vs {ms(bound)}",
                             None if got is None or bound is None else got <= bound))
    if "1000" in r.sizes and "10000" in r.sizes:
        for label in ("ls -l domains/", "cat */state", "cat */info"):
            keys = [(f, "libvirtfs", label, "expired") for f in ("1000", "10000")]
            a, b = (r.count(k, "libvirt.total") for k in keys)
            ok: bool | str | None = None if a is None or b is None else max(a, b) <= 20
            got = f"{a} / {b}"
            per_domain = [r.count(k, "libvirt.info") or 0 for k in keys]
            if label == "cat */info" and ok is False and min(per_domain) >= 1000:
                # The test driver has no batched call for it: its getAllDomainStats gives
                # the state alone, so a refresh asks virDomainGetInfo of each domain (in
                # one hop).  The QEMU row below measures the bar where a batch exists.
                got += (f" (of them virDomainGetInfo {per_domain[0]} / {per_domain[1]}: "
                        f"the test driver's getAllDomainStats gives the state alone)")
                ok = "no batched call on the test driver"
            rows.append((f"`{label}` after expiry: libvirt calls per pass O(1), not O(N) "
                         f"(at most 20 at 1,000 and at 10,000)", got, ok))
    if "qemu" in r.sizes:
        for label in ("ls -l domains/", "cat */state", "cat */info"):
            n = r.count(("qemu", "libvirtfs", label, "expired"), "libvirt.total")
            rows.append((f"QEMU, 200 domains, `{label}` after expiry: libvirt calls per pass "
                         f"O(1) (at most 20)", str(n), None if n is None else n <= 20))
    for fixture in ("1000", "20"):
        one = r.median((fixture, "libvirtfs", "1 reader", "expired"))
        many = r.median((fixture, "libvirtfs", "8 readers", "expired"))
        if one is not None and many is not None:
            failed = r.failures.get((fixture, "libvirtfs", "8 readers", "expired"), 0)
            x = ratio(many, one)
            rows.append((f"8 concurrent readers within 8x one reader, no error "
                         f"({r.sizes[fixture]:,} domains)",
                         f"{times(x)}, {failed} failed", x is not None and x <= 8
                         and not failed))
    for fixture, limit in (("10000", 40 * 1024),):
        got = r.memory.get((fixture, "libvirtfs"))
        if got:
            grown = got["after ls, cat"] - got["after mount"]
            rows.append(("10,000 domains: grows at most 40 MB from just after mounting",
                         mb(grown), grown <= limit))
            flat = got["after lookups"] - got["after ls, cat"]
            rows.append((f"10,000 domains: flat after {int(got['lookups']):,} lookups "
                         f"(at most 5 MB more)", mb(flat), flat <= 5 * 1024))
    rows.append(("contents true after external changes within a second, nothing stale "
                 "after an event or a reconnect", "the test suite (tests/test_truth.py, "
                 "tests/test_events.py, ...)", None))
    out = ["### The bars of issue 9", "", "| bar | measured | verdict |", "|---|---|---|"]
    out += [f"| {bar} | {got} | {verdict(ok)} |" for bar, got, ok in rows]
    return [*out, ""]


def render(r: Results, info: dict[str, str], command: str) -> str:
    reps = ", ".join(f"{k}: {v}" for k, v in r.reps.items())
    out = ["## Results", "",
           f"- date: {info['date']}; took {info['minutes']} minutes",
           f"- machine: {info['nproc']} cores, kernel {info['kernel']}, libvirt "
           f"{info['libvirt']}, Python {info['python']}; load average {info['load']} at the "
           f"start, {info['load after']} at the end",
           f"- command: `{command}`",
           f"- runs per part: {reps}; -o cache_timeout=1 for every mount", ""]
    out += [f"- note: {note}" for note in r.notes]
    for fixture in ("20", "1000", "10000"):
        if fixture in r.sizes:
            out += test_driver_table(r, fixture)
    for fixture in ("1000", "20"):
        if fixture in r.sizes:
            out += breakdown(r, fixture)
            break
    if "10000" in r.sizes:
        out += breakdown(r, "10000")
    if "qemu" in r.sizes:
        out += qemu_table(r)
    if "remote" in r.sizes:
        out += remote_table(r)
    out += bars(r)
    return "\n".join(out)


def write(path: Path, text: str) -> None:
    """Replace what an earlier run wrote between the markers; keep the rest of the page."""
    block = f"{BEGIN}\n\n{text}\n{END}\n"
    if path.exists():
        page = path.read_text()
        if BEGIN in page and END in page:
            head, _, rest = page.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail.lstrip("\n"))
            return
        path.write_text(page.rstrip("\n") + "\n\n" + block)
        return
    path.write_text(block)
