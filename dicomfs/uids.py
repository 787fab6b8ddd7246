"""DICOM UID syntax checks.

UIDs come from the server and become file names and cache paths, so they are
untrusted input: only strings of digits and dots with no empty component, at
most 64 characters (PS3.5 9.1), are let through. Leading zeros in a component,
which the standard forbids but real archives contain, are tolerated: they are
harmless as names and refusing them would hide real studies.
"""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def check_uid(value: str) -> str:
    """Return ``value`` unchanged, or raise ValueError when it is not a valid UID."""
    if not is_uid(value):
        raise ValueError(f"not a DICOM UID: {value[:80]!r}")
    return value
