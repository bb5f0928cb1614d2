"""The hand-written contenders on a real host: a libvirt-python script (a loop over the
domains, or the batched calls) run as a new process, a `virsh` session fed every command
on stdin, and a `virsh` process per query (a sample, scaled to all domains).

Each answers the question a workload asks through the mount: `ls` lists the names, `state`
asks each domain's state, `info` what libvirtfs's info file shows (state, info, persistent,
autostart, managed save), `xml` the inactive definition.
"""

from __future__ import annotations

import subprocess
import sys
import time

# The script run by `python -c`: argv = uri, question, mode (loop | batched).
SCRIPT = r'''
import sys, time, libvirt
uri, question, mode = sys.argv[1:4]
libvirt.registerErrorHandler(lambda *a: None, None)
conn = libvirt.open(uri)
started = time.perf_counter()
out = []
if mode == "loop":
    doms = conn.listAllDomains(0)
    for d in doms:
        if question == "ls":
            out.append(d.name())
        elif question == "state":
            out.append(d.state(0)[0])
        elif question == "info":
            s = d.state(0); i = d.info()
            try:
                ms = d.hasManagedSaveImage(0)
            except libvirt.libvirtError:
                ms = 0
            out.append((s, i, d.isPersistent(), d.autostart(), ms))
        elif question == "xml":
            out.append(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
else:
    if question == "ls":
        out = [d.name() for d in conn.listAllDomains(0)]
    elif question == "state":
        out = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
    elif question == "info":
        out = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE
                                     | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                                     | libvirt.VIR_DOMAIN_STATS_BALLOON
                                     | libvirt.VIR_DOMAIN_STATS_VCPU)
        for flag in (libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT,
                     libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART,
                     libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE):
            out.append(conn.listAllDomains(flag))
    else:
        raise SystemExit("no batched call for " + question)
print(time.perf_counter() - started)
'''

QUESTIONS = {"ls -l domains/": "ls", "cat */state": "state",
             "grep -l running */state": "state", "cat */info": "info", "cat */xml": "xml"}
VIRSH = {"ls": "list --all --name", "state": "domstate {}", "info": "dominfo {}",
         "xml": "dumpxml --inactive {}"}


def python(uri: str, question: str, mode: str) -> tuple[float, float]:
    """(seconds for the whole new process, seconds for the queries alone)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", SCRIPT, uri, question, mode],
                            capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"python {question} {mode}: {result.stderr[-500:]}")
    return elapsed, float(result.stdout.split()[-1])


def virsh_commands(question: str, names: list[str]) -> list[str]:
    if question == "ls":
        return [VIRSH["ls"]]
    return [VIRSH[question].format(name) for name in names]


def virsh_session(uri: str, question: str, names: list[str]) -> float:
    """One `virsh` process answering every query, fed on stdin."""
    script = "\n".join(virsh_commands(question, names)) + "\n"
    started = time.perf_counter()
    result = subprocess.run(["virsh", "-q", "-c", uri], input=script, capture_output=True,
                            text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if result.returncode or "error" in result.stderr:
        raise RuntimeError(f"virsh session {question}: {result.stderr[-500:]}")
    return elapsed


def virsh_per_query(uri: str, question: str, names: list[str], sample: int = 8) -> float:
    """A `virsh` process per query: `sample` of them timed, scaled to all queries."""
    commands = virsh_commands(question, names)
    chosen = commands[:: max(1, len(commands) // sample)][:sample]
    started = time.perf_counter()
    for command in chosen:
        result = subprocess.run(["virsh", "-q", "-c", uri, *command.split()],
                                capture_output=True, text=True, timeout=120)
        if result.returncode:
            raise RuntimeError(f"virsh {command}: {result.stderr[-500:]}")
    return (time.perf_counter() - started) * len(commands) / len(chosen)
