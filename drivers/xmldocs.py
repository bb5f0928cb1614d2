"""Reading documents users write, safely, and the checks every definition gets.

The parser never expands entities, never loads a DTD, never touches the network and refuses
documents over `MAX_DOCUMENT_BYTES`, so a hostile document costs nothing and reveals nothing.
"""

from __future__ import annotations

import errno

from lxml import etree

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


def invalid(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


def parse(data: bytes, root: str) -> etree._Element:
    """The document's root element, or OSError(EINVAL/EFBIG) saying what is wrong."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise OSError(errno.EFBIG, f"document is {len(data)} bytes; the limit is "
                                   f"{MAX_DOCUMENT_BYTES}")
    if not data.strip():
        raise invalid("empty document")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             dtd_validation=False, huge_tree=False, remove_comments=False)
    try:
        element = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as e:
        line, column = e.position
        raise invalid(f"malformed XML at line {line}, column {column}: {e.msg}") from None
    if element.getroottree().docinfo.internalDTD is not None or _has_entities(element):
        raise invalid("documents with a DTD or entity declarations are refused")
    if element.tag != root:
        raise invalid(f"the document is a <{element.tag}>, not a <{root}>")
    return element


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


def canonical(text: str | bytes) -> bytes:
    """A form in which two documents that libvirt reads alike compare equal (whitespace
    between elements and attribute quoting do not matter)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             remove_blank_text=True, remove_comments=True)
    data = text.encode() if isinstance(text, str) else text
    return etree.tostring(etree.fromstring(data, parser), method="c14n")
