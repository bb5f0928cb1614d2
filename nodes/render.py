"""Text formats shared by the tree's files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def key_values(info: Mapping[str, Any]) -> bytes:
    """`key: value` lines; booleans as yes/no, so `grep '^persistent: yes'` reads naturally."""
    lines = []
    for key, value in info.items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append(f"{key}: {value}\n")
    return "".join(lines).encode()


def word(text: str) -> bytes:
    """One word and a newline, as `cat state` should print."""
    return f"{text}\n".encode()


def flag(value: bool) -> bytes:
    return b"1\n" if value else b"0\n"
