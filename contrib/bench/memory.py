"""How much memory a libvirtfs mount takes per domain, and whether lookups make it grow.

    .venv/bin/python contrib/bench/memory.py [--domains 10000] [--lookups 100000]

Builds a test:/// host of N domains, mounts it with `libvirtfs -f` in a subprocess, and
prints the mounted process's VmRSS (/proc/PID/status) after mounting, after `ls -l
domains/` and `cat` of every domain's state, info and xml, and after LOOKUPS `stat`s of
existing and missing names.  Standalone: the benchmark (contrib/bench.sh) may call it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOKER = r"""
import os, sys
base, count, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for i in range(count):
    name = names[i % len(names)] if i % 2 else f"nosuch{i}"
    try:
        os.stat(os.path.join(base, name, "state") if i % 2 else os.path.join(base, name))
    except FileNotFoundError:
        pass
"""


def host_xml(path: Path, domains: int) -> None:
    parts = ["<node>",
             "<cpu><mhz>2000</mhz><model>i686</model><active>4</active><nodes>1</nodes>"
             "<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>",
             "<memory>8388608</memory>"]
    parts += [f"<domain type='test'><name>vm-{i:05d}</name><memory>65536</memory>"
              f"<vcpu>1</vcpu><os><type>hvm</type></os></domain>" for i in range(domains)]
    parts.append("</node>")
    path.write_text("\n".join(parts))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def shell(script: str, cwd: Path) -> float:
    started = time.monotonic()
    subprocess.run(["bash", "-c", script], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--options", default="", help="libvirtfs -o OPTIONS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="libvirtfs-memory-") as tmp:
        work = Path(tmp)
        xml, mnt = work / "node.xml", work / "mnt"
        host_xml(xml, args.domains)
        mnt.mkdir()
        command = [sys.executable, "-m", "libvirtfs.mount.cli", "-f",
                   f"big=test://{xml}", str(mnt)]
        if args.options:
            command += ["-o", args.options]
        with open(work / "log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not os.path.ismount(mnt):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((work / "log").read_text(errors="replace"))
                time.sleep(0.05)
            domains = mnt / "hosts" / "big" / "domains"
            rows = [("mounted", rss_kib(process.pid), 0.0)]
            seconds = shell("ls -l domains/ >/dev/null", domains.parent)
            rows.append(("ls -l domains/", rss_kib(process.pid), seconds))
            for name in ("state", "info", "xml"):
                seconds = shell(f"printf '%s\\0' */{name} | xargs -0 cat >/dev/null", domains)
                rows.append((f"cat */{name}", rss_kib(process.pid), seconds))
            names = [f"vm-{i:05d}" for i in range(0, args.domains, max(1, args.domains // 100))]
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", LOOKER, str(domains), str(args.lookups),
                            *names], check=True)
            rows.append((f"{args.lookups} lookups", rss_kib(process.pid),
                         time.monotonic() - started))
            base = rows[0][1]
            print(f"{args.domains} domains, pid {process.pid}")
            print(f"{'after':<22}{'RSS MB':>9}{'growth MB':>11}{'KB/domain':>11}{'seconds':>9}")
            for what, rss, seconds in rows:
                grown = rss - base
                print(f"{what:<22}{rss / 1024:>9.1f}{grown / 1024:>11.1f}"
                      f"{grown / max(1, args.domains):>11.2f}{seconds:>9.2f}")
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
                process.wait()


if __name__ == "__main__":
    main()
