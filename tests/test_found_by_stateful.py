"""Bugs the state machine of test_stateful.py found, each as the shell session it shrank to.

Each test failed on the code of its day; the fix is the commit after the test.  A test
marked xfail waits for the helper whose area the fix belongs to (its reason says which);
the state machine keeps clear of that bug meanwhile, with a comment naming the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Mounted, info, sh


def define(domains: Path, name: str, memory: int = 65536) -> None:
    """mkdir NAME, then write a minimal document into NAME/xml."""
    os.mkdir(domains / name)
    (domains / name / "xml").write_text(
        f"<domain type='test'><name>{name}</name><memory unit='KiB'>{memory}</memory>"
        f"<os><type>hvm</type></os></domain>\n")


def test_a_renamed_domain_is_writable_under_its_new_name_at_once(demo: Mounted) -> None:
    domains = demo.host() / "domains"
    define(domains, "web")
    sh(f"cd {domains} && mv web www && sed -i 's/65536/131072/' www/xml")
    assert info(domains / "www" / "info")["max-memory"] == "131072"


@pytest.mark.xfail(strict=True, reason="found by stateful; area: deletes")
def test_a_control_word_written_before_the_xml_never_hides_control(demo: Mounted) -> None:
    domains = demo.host() / "domains"
    sh(f"cd {domains} && mkdir web && (echo start > web/control || true)")
    define_xml = ("<domain type='test'><name>web</name><memory>65536</memory>"
                  "<os><type>hvm</type></os></domain>")
    (domains / "web" / "xml").write_text(define_xml)
    assert (domains / "web" / "control").read_text() == "start\nstart-paused\nwait\n"
    sh(f"echo start > {domains / 'web' / 'control'}")
    assert (domains / "web" / "state").read_text() == "running\n"
