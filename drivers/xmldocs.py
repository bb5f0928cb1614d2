"""Reading documents users write, safely, and the checks every definition gets.

`parse` is the one parser for everything users write: it never expands entities, never
loads a DTD, never touches the network, allows no huge trees and refuses documents over
`MAX_DOCUMENT_BYTES`, so a hostile document costs nothing and reveals nothing.  What libvirt
hands back is read with `from_libvirt`, which has no size limit: libvirt's own rendering
(of a snapshot, say) may be larger than anything a user may write.
"""

from __future__ import annotations

import copy
import errno

from lxml import etree

# libvirt's RPC carries no string longer than this (VIR_NET_MESSAGE_STRING_MAX): a domain
# whose definition, with its read-your-writes record, is longer can be defined but never read
# back, by `virsh dumpxml` or by `cat xml`.
RPC_STRING_MAX = 4 * 1024 * 1024

# What a running domain's live definition, or a snapshot's document around the definition,
# may add to the persistent definition.
LIVE_ROOM = 256 * 1024

# A persistent definition and its record together stay within this; so does a document.
DEFINITION_BUDGET = RPC_STRING_MAX - LIVE_ROOM
MAX_DOCUMENT_BYTES = DEFINITION_BUDGET

# What libvirt adds to a document on its own (default devices, addresses, ...), at most.
DEFAULTS_ROOM = 64 * 1024


def too_big(message: str) -> OSError:
    return OSError(errno.EFBIG, message)


def invalid(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


def _hardened_parser(*, huge_tree: bool) -> etree.XMLParser:
    """The one way XML is read here: entities never expanded, no DTD loaded, no network.
    Users' documents are small (no huge trees); libvirt's own renderings may be larger.
    A new parser per document: parses run in worker threads, and lxml serializes threads
    that share a parser."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=huge_tree)


def parse(data: bytes, root: str) -> etree._Element:
    """The document's root element, or OSError(EINVAL/EFBIG) saying what is wrong."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise too_big(f"document is {len(data)} bytes; the limit is {MAX_DOCUMENT_BYTES}, "
                      f"so that libvirt can always hand the definition back")
    if not data.strip():
        raise invalid("empty document")
    try:
        element = etree.fromstring(data, _hardened_parser(huge_tree=False))
    except etree.XMLSyntaxError as e:
        line, column = e.position
        raise invalid(f"malformed XML at line {line}, column {column}: {e.msg}") from None
    if element.getroottree().docinfo.internalDTD is not None or _has_entities(element):
        raise invalid("documents with a DTD or entity declarations are refused")
    if element.tag != root:
        raise invalid(f"the document is a <{element.tag}>, not a <{root}>")
    return element


def from_libvirt(text: str) -> etree._Element:
    """A document libvirt rendered (a definition, a snapshot, the capabilities): no limit
    on its size, since users did not write it and `xml` must show whatever libvirt has."""
    return etree.fromstring(text.encode(), _hardened_parser(huge_tree=True))


def rendered_size(root: etree._Element) -> int:
    """About how many bytes libvirt's rendering of `root` takes, erring high: libvirt puts
    every element on a line of its own, indented, escapes quotes in text and attribute
    values as &apos; and &quot; (6 bytes for 1), and adds defaults of its own."""
    bare = _strip_blank_text(copy.deepcopy(root))
    quotes = 0
    for node in root.iter():
        for text in (node.text, node.tail, *node.attrib.values()):
            if text:
                quotes += text.count("'") + text.count('"')
    rendering = etree.tostring(bare, pretty_print=True, encoding="utf-8", xml_declaration=False)
    return len(rendering) + 5 * quotes + DEFAULTS_ROOM


def check_size(root: etree._Element, what: str) -> None:
    """EFBIG for a document that libvirt would accept but could never hand back."""
    size = rendered_size(root)
    if size > DEFINITION_BUDGET:
        raise too_big(f"libvirt would render this {what} in about {size} bytes; it hands "
                      f"back at most {RPC_STRING_MAX} bytes, and libvirtfs keeps "
                      f"{RPC_STRING_MAX - DEFINITION_BUDGET} of them for what libvirt adds "
                      f"when the {what} runs")


def _has_entities(element: etree._Element) -> bool:
    return any(isinstance(node, etree._Entity) for node in element.iter())


def check_name(element: etree._Element, expected: str | None, what: str) -> str:
    """The document's <name>; filled in from the folder when missing, refused when it
    differs from the folder's."""
    name_element = element.find("name")
    if name_element is None or not (name_element.text or "").strip():
        if expected is None:
            raise invalid(f"the {what} document has no <name>")
        if name_element is None:
            name_element = etree.Element("name")
            element.insert(0, name_element)
        name_element.text = expected
        return expected
    name = name_element.text.strip()
    if expected is not None and name != expected:
        raise invalid(f"the document names the {what} {name!r}, but it is written to the "
                      f"folder of {expected!r}; rename with mv instead")
    return name


def _strip_blank_text(root: etree._Element) -> etree._Element:
    """`root` without whitespace between elements, which libvirt does not keep."""
    for node in root.iter():
        if node.text is not None and not node.text.strip() and len(node):
            node.text = None
        if node.tail is not None and not node.tail.strip():
            node.tail = None
    return root


def canonical(root: etree._Element) -> bytes:
    """A form in which two documents that libvirt reads alike compare equal (whitespace
    between elements, attribute quoting and comments do not matter)."""
    element = copy.deepcopy(root)
    for comment in element.xpath("//comment()"):
        parent = comment.getparent()
        if parent is None:
            continue
        if comment.tail:  # the text after the comment stays
            previous = comment.getprevious()
            if previous is not None:
                previous.tail = (previous.tail or "") + comment.tail
            else:
                parent.text = (parent.text or "") + comment.tail
        parent.remove(comment)
    return etree.tostring(_strip_blank_text(element), method="c14n")
