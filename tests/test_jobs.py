"""Long operations as jobs (issue 8), on the test driver: the `job` file and `abort`.

The test driver has no job stats and finishes every job at once; tests/test_qemu_jobs.py
watches real ones run, stall and get aborted.
"""

from __future__ import annotations

import errno
import os
import threading

from conftest import Mounted, eventually, expect_errno, info, sh, user_error, write_file


def test_job_is_empty_until_a_job_runs(demo: Mounted) -> None:
    dom = demo.host() / "domains" / "test"
    assert (dom / "job").read_text() == ""
    assert "abort" not in (dom / "control").read_text().split()


def test_managed_save_is_a_job_and_job_tells_how_it_ended(demo: Mounted) -> None:
    dom = demo.host() / "domains" / "test"
    sh(f"echo managed-save > {dom}/control")
    assert (dom / "state").read_text() == "shutoff\n"
    job = info(dom / "job")
    assert job["status"] == "completed"
    assert job["job"] == "managed-save"
    assert int(job["elapsed-ms"]) >= 0
    sh(f"echo start > {dom}/control")  # the job's record stays until the next job
    assert info(dom / "job")["status"] == "completed"


def test_abort_without_a_job_is_libvirts_answer(demo: Mounted) -> None:
    """With no job of this mount running, `abort` is libvirt's abortJob, for a job another
    program started; the test driver has none to abort."""
    dom = demo.host() / "domains" / "test"
    expect_errno(errno.EOPNOTSUPP, write_file, dom / "control", "abort\n")
    assert "virDomainAbortJob" in user_error(dom / "control")
    assert (dom / "state").read_text() == "running\n"


def test_job_stall_is_a_mount_option(mount_factory) -> None:
    mounted = mount_factory("test:///default", options="job_stall=5")
    assert (mounted.host() / "domains" / "test" / "job").read_text() == ""


def test_rmdir_of_a_host_while_a_job_runs_there_is_ebusy(mount_factory, tmp_path,
                                                        monkeypatch) -> None:
    """rmdir would close the connection the job's abort needs: a writer killed then, or a
    stall, could no longer abort it, and libvirt would carry it out unseen."""
    rules = tmp_path / "faults"
    monkeypatch.setenv("LIBVIRTFS_FAULTS", str(rules))
    mounted = mount_factory("test:///default")
    host = mounted.host()
    rules.write_text("test:///default delay 3 control\n")  # the managed save takes 3 s
    writer = threading.Thread(target=write_file, args=(host / "domains/test/control",
                                                       "managed-save\n"))
    writer.start()
    try:
        def running() -> None:
            assert info(host / "domains/test/job").get("status") == "running"
        eventually(running)
        expect_errno(errno.EBUSY, os.rmdir, host)
        assert "managed-save" in user_error(mounted.path / "hosts")
    finally:
        writer.join()
        rules.write_text("")
    assert info(host / "domains/test/job")["status"] == "completed"
    os.rmdir(host)
    assert os.listdir(mounted.path / "hosts") == []
