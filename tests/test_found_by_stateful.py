"""Bugs the state machine of test_stateful.py found, each as the shell session it shrank to.

Each test failed on the code of its day; the fix is the commit after the test.  A test
marked xfail waits for the helper whose area the fix belongs to (its reason says which);
the state machine keeps clear of that bug meanwhile, with a comment naming the test.
"""

from __future__ import annotations

import os

from conftest import Mounted, sh


def test_a_control_word_written_before_the_xml_never_hides_control(demo: Mounted) -> None:
    """It used to become a scratch file, which then stood in for the served `control`:
    later words were swallowed silently."""
    domains = demo.host() / "domains"
    sh(f"cd {domains} && mkdir web && (echo start > web/control || true)")
    sh(f"cd {domains} && echo \"<domain type='test'><name>web</name><memory>65536</memory>"
       f"<os><type>hvm</type></os></domain>\" > web/xml")
    assert (domains / "web" / "control").read_text() == "start\nstart-paused\nwait\n"
    sh(f"echo start > {domains / 'web' / 'control'}")
    assert (domains / "web" / "state").read_text() == "running\n"


def test_rm_rf_removes_a_pending_folder_whose_document_was_refused(demo: Mounted) -> None:
    """A refused document left an empty `xml` that could not be unlinked, so `rm -rf`
    kept a folder that exists only in this mount."""
    domains = demo.host() / "domains"
    sh(f"cd {domains} && mkdir web && (echo '<domain' > web/xml || true) && rm -rf web")
    assert os.listdir(domains) == ["test"]
