"""Configuration management on a mount: ansible-playbook converges and is idempotent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO, Mounted, eventually, run, write_file

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: the domain's folder
      file:
        path: "{{ domains }}/{{ name }}"
        state: directory
    - name: its definition
      template:
        src: domain.xml.j2
        dest: "{{ domains }}/{{ name }}/xml"
"""

TEMPLATE = """\
<domain type='{{ domain_type }}'>
  <name>{{ name }}</name>
  <!-- managed by Ansible -->
  <memory unit='MiB'>{{ memory }}</memory>
  <os><type>hvm</type></os>
</domain>
"""


def ansible_playbook(tmp_path: Path, play: Path, extra_vars: str, *options: str
                     ) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    """Run `ansible-playbook PLAY -e EXTRA_VARS`: its process and its recap's counts."""
    env = dict(os.environ, ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               ANSIBLE_HOME=str(tmp_path / "ansible-home"))
    result = run("env", *[f"{k}={v}" for k, v in env.items()], ANSIBLE_PLAYBOOK,
                 "-i", "localhost,", play, "-e", extra_vars, *options,
                 check=False, cwd=tmp_path, timeout=180)
    recap = re.search(r"localhost\s*:\s*(.*)", result.stdout.split("PLAY RECAP")[-1])
    assert recap, result.stdout + result.stderr
    return result, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}


def playbook(tmp_path: Path, domains: Path, name: str, domain_type: str,
             memory: int = 64) -> dict[str, int]:
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    (tmp_path / "domain.xml.j2").write_text(TEMPLATE)
    result, recap = ansible_playbook(
        tmp_path, tmp_path / "play.yml",
        f"domains={domains} name={name} domain_type={domain_type} memory={memory}")
    assert result.returncode == 0, result.stdout + result.stderr
    return recap


def test_playbook_is_idempotent(demo: Mounted, tmp_path: Path) -> None:
    domains = demo.host() / "domains"
    first = playbook(tmp_path, domains, "managed", "test")
    assert first["changed"] == 2 and first["failed"] == 0
    assert (domains / "managed" / "state").read_text() == "shutoff\n"
    assert "<!-- managed by Ansible -->" in (domains / "managed" / "xml").read_text()
    second = playbook(tmp_path, domains, "managed", "test")
    assert second["changed"] == 0 and second["failed"] == 0
    changed = playbook(tmp_path, domains, "managed", "test", memory=96)
    assert changed["changed"] == 1
    assert "memory: 98304" in (domains / "managed" / "info").read_text()
    assert not [n for n in os.listdir(domains / "managed") if n.startswith(".ansible")]


@pytest.mark.qemu
def test_playbook_converges_after_a_change_from_outside(mount_factory, tmp_path: Path,
                                                        qemu_uri: str) -> None:
    mounted = mount_factory(f"lab={qemu_uri}")
    domains = mounted.host("lab") / "domains"
    name = f"ansible-{uuid.uuid4().hex[:8]}"
    try:
        assert playbook(tmp_path, domains, name, "qemu")["changed"] == 2
        assert playbook(tmp_path, domains, name, "qemu")["changed"] == 0
        # Something else changes the definition: xml shows libvirt's version again...
        run("virsh", "-c", qemu_uri, "desc", name, "--config", "--new-desc", "by hand")
        xml = domains / name / "xml"

        def shows_libvirts_version() -> None:
            assert "by hand" in xml.read_text()

        eventually(shows_libvirts_version)
        # ...and the playbook puts its own back, then is quiet again.
        assert playbook(tmp_path, domains, name, "qemu")["changed"] == 1
        assert "by hand" not in (domains / name / "xml").read_text()
        assert playbook(tmp_path, domains, name, "qemu")["changed"] == 0
    finally:
        run("virsh", "-c", qemu_uri, "undefine", name, check=False)


ABSENT = """\
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - file:
        path: "{{ folder }}"
        state: absent
"""
WEB = ("<domain type='test'><name>{name}</name><memory>65536</memory>"
       "<os><type>hvm</type></os></domain>\n")


def test_file_state_absent_removes_nothing_and_says_why(demo: Mounted, tmp_path: Path) -> None:
    domains = demo.host() / "domains"
    (domains / "web").mkdir()
    write_file(domains / "web" / "xml", WEB.format(name="web"))
    (tmp_path / "absent.yml").write_text(ABSENT)
    result, recap = ansible_playbook(tmp_path, tmp_path / "absent.yml",
                                     f"folder={domains / 'web'}")
    assert recap["failed"] == 1, result.stdout
    assert "Operation not permitted" in result.stdout
    assert (domains / "web" / "state").read_text() == "shutoff\n"
    # Check mode still promises a change: the module only asks os.path.lexists (a limit of
    # Ansible's file module that a filesystem cannot change; docs/writing.md says so).
    result, recap = ansible_playbook(tmp_path, tmp_path / "absent.yml",
                                     f"folder={domains / 'web'}", "--check")
    assert recap["failed"] == 0 and recap["changed"] == 1
    assert (domains / "web" / "state").read_text() == "shutoff\n"


def test_the_example_playbook_removes_domains_on_purpose(demo: Mounted,
                                                        tmp_path: Path) -> None:
    domains = demo.host() / "domains"
    for name in ("old1", "old2"):
        (domains / name).mkdir()
        write_file(domains / name / "xml", WEB.format(name=name))
    run("bash", "-c", f"echo start > {domains / 'old2' / 'control'}")
    example = REPO / "contrib" / "examples" / "remove-domains.yml"
    extra = json.dumps({"domains": str(domains), "retired": ["old1", "old2", "never"]})
    result, recap = ansible_playbook(tmp_path, example, extra, "--check")
    assert recap["failed"] == 0, result.stdout
    assert sorted(os.listdir(domains)) == ["old1", "old2", "test"]  # check mode: nothing
    result, recap = ansible_playbook(tmp_path, example, extra)
    assert recap["failed"] == 0 and recap["changed"] == 2, result.stdout
    assert os.listdir(domains) == ["test"]
    assert (domains / "test" / "state").read_text() == "running\n"
    result, recap = ansible_playbook(tmp_path, example, extra)  # and again: nothing to do
    assert recap["failed"] == 0 and recap["changed"] == 0, result.stdout
