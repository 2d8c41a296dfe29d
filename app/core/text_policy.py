"""The text policy every client-supplied string obeys (ids, names, labels, free text), used by
the API's input middleware (``app.api.input_policy``) and by the schema types of
``app.schemas.common``: no control characters (NUL, tab, line breaks, DEL, C1), no Unicode line
separators, no bidirectional controls, no lone surrogates, and a bounded length."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Every character the policy refuses in a text (one regex: this runs on every request).
FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
# Bidirectional controls, named as such in messages.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# The same, less tab and line breaks: for a form field that looks like a JSON document but does
# not parse (the route refuses it anyway; a pretty-printed document may hold them).
FORBIDDEN_MULTILINE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
    "\u2066-\u2069\ud800-\udfff]"
)


@dataclass(frozen=True)
class Limits:
    """Length bounds, in characters (file names: of the name as sent)."""

    path_segment: int = 256
    query_value: int = 2000
    body_string: int = 10_000
    form_text: int = 65_536
    file_name: int = 255


LIMITS = Limits()


def problem(text: str, max_length: int, *, multiline: bool = False) -> str | None:
    """Why ``text`` breaks the policy (a message a user can act on), or None."""
    bad = (FORBIDDEN_MULTILINE if multiline else FORBIDDEN).search(text)
    if bad is not None:
        char = bad.group()
        kind = (
            "a bidirectional control character"
            if char in _BIDI
            else "a lone surrogate"
            if "\ud800" <= char <= "\udfff"
            else "a line break"
            if char in "\n\r\u2028\u2029"
            else "a control character"
        )
        name = unicodedata.name(char, "") if char < "\ud800" or char > "\udfff" else ""
        return (
            f"contains {kind} (U+{ord(char):04X}{' ' + name if name else ''}) at position "
            f"{bad.start()}; remove it (names, ids, labels and other texts are single-line "
            "printable text)"
        )
    if len(text) > max_length:
        return f"is {len(text)} characters long; the limit is {max_length}"
    return None


def check(text: str, max_length: int) -> str:
    """``text`` when it obeys the policy; ``ValueError`` with the reason otherwise (the pydantic
    validator of the schema types)."""
    why = problem(text, max_length)
    if why:
        raise ValueError(f"the text {why}")
    return text
