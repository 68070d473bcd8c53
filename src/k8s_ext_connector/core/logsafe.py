"""Untrusted text in log lines: escaped, so a client cannot forge or garble a line.

A client of the gateway chooses strings that end up in its log (the ``direct-tcpip``
host, the SSH username, its version string). Written raw, a newline in one starts a
second, forged log line, and terminal control sequences rewrite what an operator sees.
``untrusted`` escapes everything that is not a printable character (newlines, tabs,
control and format characters, escape sequences) and the backslash itself, the way
``repr`` does, and bounds the length.
"""

from __future__ import annotations

MAX_LENGTH = 200
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def untrusted(text: object, limit: int = MAX_LENGTH) -> str:
    """``text`` safe to put in one log line: printable, escaped, at most ``limit`` chars."""
    value = text if isinstance(text, str) else str(text)
    cut = len(value) > limit
    escaped = "".join(_escape(c) for c in value[:limit])
    return escaped + ("...(cut)" if cut else "")


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    if char.isprintable():
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
