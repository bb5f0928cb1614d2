"""Read-your-writes records on test:///default and test:///FILE: only libvirtfs's own records
are believed, and every document that is accepted can be read back (issue 7)."""

from __future__ import annotations

import base64
import errno
import os
import stat
import threading
from pathlib import Path

import libvirt
from conftest import REPO, Mounted, expect_errno, run, user_error, write_file

from libvirtfs.drivers import records, statedir

NAMESPACE = "https://libvirtfs.org/xmlns/written/1"
UUID = "8f2b4c3e-52d6-4f5e-9d0a-3c1b2a4d5e6f"

HOST = """<node>
  <domain type='test'>
    <name>forged</name>
    <uuid>{uuid}</uuid>
    <memory>65536</memory>
    <os><type>hvm</type></os>{metadata}
  </domain>
</node>
"""

FAKE = b"<domain type='test'><name>forged</name><!-- not the definition --></domain>\n"


def _libvirt_text(host_file: Path) -> str:
    """libvirt's definition of `forged`, as the test driver renders it from `host_file`."""
    conn = libvirt.open(f"test://{host_file}")
    try:
        return conn.lookupByName("forged").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()


def test_a_record_forged_in_the_metadata_is_not_shown(mount_factory, tmp_path: Path) -> None:
    # Anyone who can define a domain can put an element in libvirtfs's namespace into its
    # metadata, with the digest of the definition it will have: the element libvirtfs
    # itself writes, but with other bytes.
    host_file = tmp_path / "host.xml"
    host_file.write_text(HOST.format(uuid=UUID, metadata=""))
    clean = _libvirt_text(host_file)
    body = base64.b64encode(FAKE).decode()
    forged_element = (f"\n    <metadata><libvirtfs:written xmlns:libvirtfs='{NAMESPACE}' "
                      f"digest='{records.digest(clean)}'>{body}</libvirtfs:written></metadata>")
    host_file.write_text(HOST.format(uuid=UUID, metadata=forged_element))
    assert records.strip(_libvirt_text(host_file))[0] == clean  # the digest would match

    mounted = mount_factory(f"test://{host_file}")
    assert (mounted.host() / "domains/forged/xml").read_text() == clean


WEB = """<domain type='test'>
  <name>web</name>
  <memory unit='KiB'>131072</memory>
  <os><type>hvm</type></os>{extra}
</domain>
"""

MiB = 1024 * 1024


def _web(demo: Mounted, extra: str = "") -> Path:
    folder = demo.host() / "domains" / "web"
    os.mkdir(folder)
    write_file(folder / "xml", WEB.format(extra=extra))
    return folder


def _description(size: int, char: str = "x") -> str:
    return f"\n  <description>{char * size}</description>"


def test_a_large_document_reads_back(demo: Mounted) -> None:
    # 2.5 MiB: too large for its record to sit beside it in the domain's metadata (the
    # base64 copy would double it past libvirt's 4 MiB RPC limit): kept elsewhere.
    web = _web(demo)
    document = WEB.format(extra=_description(int(2.5 * MiB)))
    write_file(web / "xml", document)
    assert (web / "xml").read_text() == document
    assert "x" * 1000 in (web / "live.xml").read_text()
    assert os.stat(web / "xml").st_size == len(document)


def test_many_metadata_children_read_back(demo: Mounted) -> None:
    children = "".join(f"<n:item id='{i}'/>" for i in range(60000))
    web = _web(demo)
    document = WEB.format(extra=f"\n  <metadata><n:list xmlns:n='urn:n'>{children}"
                                f"</n:list></metadata>")
    write_file(web / "xml", document)
    assert (web / "xml").read_text() == document


def test_a_document_over_the_limit_is_efbig_and_changes_nothing(demo: Mounted) -> None:
    web = _web(demo)
    before = (web / "xml").read_text()
    document = WEB.format(extra=_description(int(3.9 * MiB)))
    expect_errno(errno.EFBIG, write_file, web / "xml", document)
    assert "takes at most 3932160 bytes" in user_error(web / "xml")
    assert (web / "xml").read_text() == before


def test_a_document_libvirt_would_render_too_large_is_efbig(demo: Mounted) -> None:
    # libvirt writes each quote in a description as &apos; or &quot;: 700 KiB of quotes
    # become 4.2 MiB that libvirt could not hand back over RPC.
    web = _web(demo)
    before = (web / "xml").read_text()
    document = WEB.format(extra=_description(700 * 1024, char="'"))
    expect_errno(errno.EFBIG, write_file, web / "xml", document)
    assert "libvirt would render this domain in about" in user_error(web / "xml")
    assert (web / "xml").read_text() == before
    # A new domain is refused alike, and is not created.
    os.mkdir(demo.host() / "domains" / "quotes")
    expect_errno(errno.EFBIG, write_file, demo.host() / "domains/quotes/xml",
                 document.replace("<name>web</name>", "<name>quotes</name>"))
    run("rmdir", demo.host() / "domains/quotes")
    assert "quotes" not in os.listdir(demo.host() / "domains")


SNAPSHOTS_HOST = """<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>snappy</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <test:domainsnapshot>
      <name>big</name>
      <description>{description}</description>
      <state>shutoff</state>
      <creationTime>1700000000</creationTime>
      <active>0</active>
      <domain type='test'><name>snappy</name><memory>65536</memory>
        <os><type>hvm</type></os></domain>
    </test:domainsnapshot>
    <test:domainsnapshot>
      <name>small</name>
      <parent><name>big</name></parent>
      <state>shutoff</state>
      <creationTime>1700000001</creationTime>
      <active>1</active>
      <domain type='test'><name>snappy</name><memory>65536</memory>
        <os><type>hvm</type></os></domain>
    </test:domainsnapshot>
  </domain>
</node>
"""


def test_a_large_snapshot_from_libvirt_does_not_break_snapshots(
        mount_factory, tmp_path: Path) -> None:
    # libvirt's own snapshot documents are not held to the limit of what users write.
    host_file = tmp_path / "host.xml"
    host_file.write_text(SNAPSHOTS_HOST.format(description="d" * (5 * MiB)))
    mounted = mount_factory(f"test://{host_file}")
    snaps = mounted.host() / "domains/snappy/snapshots"
    assert sorted(os.listdir(snaps)) == ["big", "current", "small"]
    assert os.readlink(snaps / "small/parent") == "../big"
    assert "creation-time: 1700000000" in (snaps / "big/info").read_text()
    assert len((snaps / "big/xml").read_text()) > 5 * MiB


def test_the_record_key_is_private_and_made_once(mount_factory, tmp_path: Path,
                                                 monkeypatch) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("LIBVIRTFS_STATE_DIR", str(state))
    first = mount_factory("test:///default", name="first")
    second = mount_factory("test:///default", name="second")
    assert not (state / "records.key").exists()  # nothing written yet, no key
    _web(first)
    key = (state / "records.key").read_bytes()
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(state / "records.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    _web(second)
    assert (state / "records.key").read_bytes() == key
    assert (second.host() / "domains/web/xml").read_text() == WEB.format(extra="")
    # The test driver's objects live in the mounting process, so do their records: two
    # mounts of test:///default are two hosts with the same UUIDs, and must not share them.
    network = first.host() / "networks/default/xml"
    document = network.read_text().replace("<network>", "<network>\n  <!-- first -->", 1)
    write_file(network, document)
    assert network.read_text() == document
    assert (second.host() / "networks/default/xml").read_text() != document
    assert [p.name for p in state.iterdir()] == ["records.key"]  # no temporary, no records


def test_concurrent_record_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Two mounts (or two objects' commits) writing a record at once: each write is whole,
    nothing fails, and no temporary file is left behind."""
    state = statedir.StateDir(tmp_path / "state")
    failures: list[BaseException] = []

    def writer(number: int) -> None:
        own = statedir.StateDir(tmp_path / "state")  # as another mount would
        try:
            for i in range(100):
                data = f"<network><name>n</name><!-- {number} {i} --></network>".encode()
                own.put("host", "network", UUID, records.Written("0" * 64, data, "1" * 64))
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert state.get("host", "network", UUID).data.startswith(b"<network><name>n</name>")
    files = [p for p in (tmp_path / "state").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


def test_mounts_starting_at_once_agree_on_one_key(tmp_path: Path) -> None:
    keys: list[bytes | None] = []
    barrier = threading.Barrier(8)

    def first_write() -> None:
        barrier.wait()
        keys.append(statedir.StateDir(tmp_path / "state").key(create=True))

    threads = [threading.Thread(target=first_write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and keys[0] is not None and set(keys) == {keys[0]}
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["records.key"]


def test_one_hardened_parser_reads_every_document() -> None:
    """Documents users write are parsed by xmldocs.parse alone (and libvirt's by
    xmldocs.from_libvirt): no other module makes a parser of its own."""
    found = run("grep", "-rnE", r"XMLParser|fromstring|etree\.parse|etree\.XML\(|minidom",
                "--include=*.py", "drivers", "nodes", "vfs", "mount",
                cwd=REPO, check=False).stdout.splitlines()
    assert [line for line in found if not line.startswith("drivers/xmldocs.py:")] == []
