"""Readable folder and file names for people: safe, bounded, unique and stable.

The readable trees (``/patients``, ``/dates``) name things by what a person
recognises (patient, date, description, series and instance numbers) instead of
by UID. Those values are free text from the server, so every name goes through
:func:`safe_name`: whatever the server sends, the result is one valid path
component. Names are computed from the listing alone, so every mount of the same
server content shows the same names; see docs/browsing.md for the scheme.

This module also reads ``/query`` folder names (:func:`parse_query`): a folder
name there is a QIDO-RS query, checked here before anything is sent.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl

from pydicom.datadict import keyword_for_tag, tag_for_keyword

from dicomfs import dicomjson
from dicomfs.dicomjson import Dataset

MAX_BYTES = 255  # NAME_MAX of Linux file systems, in bytes of UTF-8
PART_BYTES = 100  # one part (a name, an ID, a description) of a composed name
ELLIPSIS = "…"
NO_NAME = "(no name)"
NO_ID = "no ID"
NO_DATE = "(no date)"
NO_DESCRIPTION = "(no description)"
UNKNOWN_DATE = "unknown"  # the /dates folder of studies without a valid date
MIN_NUMBER_WIDTH = 4  # zero padding of series and instance numbers: "0007"
DIGEST_CHARS = 6  # length of the suffix that tells colliding names apart

# Explicit direction controls make a name display as something else ("spoofing").
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_BLANK_CATEGORIES = frozenset({"Cc", "Zs", "Zl", "Zp"})  # controls and every kind of space
_PN_COMPONENTS = 5  # family ^ given ^ middle ^ prefix ^ suffix


# -- safe pieces --------------------------------------------------------------------------


def clean(text: object, placeholder: str = "_") -> str:
    """``text`` made fit for a file name, without length limit.

    NFC-normalised; ``/`` becomes ``-``; controls (NUL included), line breaks and
    any run of spaces become one space; direction overrides and unpaired
    surrogates go; a leading ``.`` becomes ``_`` (no hidden files, never ``.`` or
    ``..``). Empty results give ``placeholder``.
    """
    raw = "" if text is None else str(text)
    raw = "".join("\ufffd" if unicodedata.category(c) == "Cs" else c for c in raw)
    out: list[str] = []
    for char in unicodedata.normalize("NFC", raw):
        if char in _BIDI_CONTROLS:
            continue
        if char == "/":
            out.append("-")
        elif unicodedata.category(char) in _BLANK_CATEGORIES:
            out.append(" ")
        else:
            out.append(char)
    result = " ".join("".join(out).split())
    if result.startswith("."):
        result = "_" + result[1:]
    return result or placeholder


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _cut(text: str, budget: int) -> str:
    """The longest start of ``text`` of at most ``budget`` UTF-8 bytes that splits no
    character, nor a letter from the accents that follow it."""
    end = len(text.encode("utf-8")[:max(budget, 0)].decode("utf-8", "ignore"))
    while 0 < end < len(text) and unicodedata.category(text[end]).startswith("M"):
        end -= 1
    return text[:end]


def fit(head: str, tail: str = "", limit: int = MAX_BYTES) -> str:
    """``head + tail`` in at most ``limit`` bytes, shortening ``head`` (marked with ``…``).

    ``tail`` (an ID, a suffix, an extension) is kept whole unless it alone takes
    more than half the room; then it is shortened too.
    """
    if _utf8_len(head) + _utf8_len(tail) <= limit:
        return head + tail
    if _utf8_len(tail) > limit // 2:
        tail = fit(tail, "", limit // 2)
    room = limit - _utf8_len(tail) - _utf8_len(ELLIPSIS)
    return _cut(head, room).rstrip() + ELLIPSIS + tail


def safe_name(text: object, placeholder: str = "_") -> str:
    """Any value as one valid path component: non-empty, no ``/`` or NUL, not ``.`` or
    ``..``, at most 255 bytes of UTF-8."""
    return fit(clean(text, placeholder))


def part(text: object, placeholder: str) -> str:
    """One piece of a composed name, cleaned and kept to PART_BYTES."""
    return fit(clean(text, placeholder), "", PART_BYTES)


# -- DICOM values as text ----------------------------------------------------------------


def person_name(value: object) -> str:
    """A person name as people write it: ``Doe^Jane^^Dr`` -> ``Doe, Dr Jane``.

    Takes the DICOM JSON form (``{"Alphabetic": ...}``) or the string form
    (``Alphabetic=Ideographic=Phonetic``). The alphabetic group is used; the
    ideographic one, then the phonetic one, only when it is empty. Components
    are family, given, middle, prefix, suffix: "family, prefix given middle, suffix".
    """
    if isinstance(value, Mapping):
        groups = [value.get(key) for key in ("Alphabetic", "Ideographic", "Phonetic")]
    elif isinstance(value, str):
        groups = value.split("=")
    else:
        groups = []
    for group in groups:
        if isinstance(group, str) and group.replace("^", "").strip():
            parts = [p.strip() for p in group.split("^", _PN_COMPONENTS - 1)]
            family, given, middle, prefix, suffix = parts + [""] * (_PN_COMPONENTS - len(parts))
            first = " ".join(p for p in (prefix, given, middle) if p)
            name = ", ".join(p for p in (family, first) if p)
            return f"{name}, {suffix.replace('^', ' ')}" if suffix else name
    return ""


def iso_date(value: object) -> str | None:
    """``YYYY-MM-DD`` of a DA value (also the old ``YYYY.MM.DD``), None unless a real date."""
    match = re.fullmatch(r"\s*(\d{4})\.?(\d{2})\.?(\d{2})\s*", str(value or ""))
    if not match:
        return None
    try:
        return datetime.date(*(int(g) for g in match.groups())).isoformat()
    except ValueError:
        return None


def number(value: int | None, width: int = MIN_NUMBER_WIDTH) -> str | None:
    """A zero-padded number that sorts as a number among numbers of the same width."""
    return None if value is None else f"{value:0{width}d}"


def number_width(values: Iterable[int | None]) -> int:
    """The padding for a folder's numbers: 4 digits, more when one of them needs more."""
    return max([MIN_NUMBER_WIDTH, *(len(str(abs(v))) for v in values if v is not None)])


# -- names of studies, series, instances ------------------------------------------------


def patient_folder(ds: Dataset) -> str:
    """``Doe, Jane (DFS-0001)``: the patient's name and ID, from a study's attributes."""
    name = part(person_name(dicomjson.value(ds, dicomjson.PATIENT_NAME)), NO_NAME)
    return fit(name, f" ({part(dicomjson.text(ds, dicomjson.PATIENT_ID), NO_ID)})")


def study_folder(ds: Dataset) -> str:
    """``2024-01-15 CT CHEST``: date first, so that a patient's studies sort by time."""
    date = iso_date(dicomjson.text(ds, dicomjson.STUDY_DATE)) or NO_DATE
    return fit(f"{date} {part(dicomjson.text(ds, dicomjson.STUDY_DESCRIPTION), NO_DESCRIPTION)}")


def dated_study_folder(ds: Dataset) -> str:
    """``Doe, Jane (DFS-0001) CT CHEST``: a study in a /dates day folder names its patient."""
    description = part(dicomjson.text(ds, dicomjson.STUDY_DESCRIPTION), NO_DESCRIPTION)
    return fit(f"{patient_folder(ds)} {description}")


def series_folder(ds: Dataset, width: int = MIN_NUMBER_WIDTH) -> str:
    """``0002 CT Axial 5mm``: series number, modality, description; missing parts left out."""
    pieces = [number(dicomjson.integer(ds, dicomjson.SERIES_NUMBER), width),
              dicomjson.text(ds, dicomjson.MODALITY),
              dicomjson.text(ds, dicomjson.SERIES_DESCRIPTION)]
    return fit(" ".join(p for p in (clean(x, "") for x in pieces) if p) or NO_DESCRIPTION)


def instance_stem(ds: Dataset, width: int = MIN_NUMBER_WIDTH) -> str:
    """``0042``: the instance number, or the SOP Instance UID when there is none."""
    found = number(dicomjson.integer(ds, dicomjson.INSTANCE_NUMBER), width)
    return safe_name(found or dicomjson.uid(ds, dicomjson.SOP_UID))


# -- uniqueness ------------------------------------------------------------------------


def digest(key: str, size: int = DIGEST_CHARS) -> str:
    """A short, stable tag of an identity (a UID): the same on every mount."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:size]


def unique(wanted: Mapping[str, tuple[str, str]], reserved: Iterable[str] = ()
           ) -> dict[str, str]:
    """Unique names for entries ``key -> (stem, extension)``, e.g. ``uid -> ("0001", ".dcm")``.

    An entry whose name no other entry wants keeps it; every entry of a
    collision gets `` [<6 hex of sha256(key)>]`` before the extension. The suffix
    depends on the entry's own key only, so a name never depends on the order of
    a listing and only changes when a new entry starts to collide with it.
    ``reserved`` names (``metadata.json``) are never given out.
    """
    plain = {key: fit(stem, ext) for key, (stem, ext) in wanted.items()}
    taken = set(reserved)
    counts = Counter([*plain.values(), *taken])
    names = {key: name for key, name in plain.items() if counts[name] == 1}
    taken.update(names.values())
    for key in sorted(set(plain) - set(names)):
        stem, ext = wanted[key]
        tag = digest(key, 64)
        # Longer digests, then (never seen in practice) numbered ones: one is always free.
        candidates = itertools.chain(
            (fit(stem, f" [{tag[:size]}]{ext}") for size in range(DIGEST_CHARS, 65)),
            (fit(stem, f" [{tag} {n}]{ext}") for n in itertools.count(2)))
        name = next(c for c in candidates if c not in taken)
        taken.add(name)
        names[key] = name
    return names


# -- /query folder names -----------------------------------------------------------------

MAX_QUERY_BYTES = MAX_BYTES
MAX_QUERY_KEYS = 16
CONTROL_KEYS = {"fuzzymatching"}  # QIDO parameters a user may set; the server checks values
_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")


class InvalidQuery(ValueError):
    """A /query folder name or a mount scope that is not a QIDO-RS query we send."""


def query_key(key: str) -> str:
    """A matching key as a DICOM keyword (``00100020`` -> ``PatientID``), or InvalidQuery.

    Tags unknown to the dictionary stay 8-hex; anything else is refused, so a
    typo never reaches a server that would silently ignore it (Orthanc does).
    """
    if key.lower() in CONTROL_KEYS:
        return key.lower()
    if _HEX_TAG.fullmatch(key):
        return keyword_for_tag(int(key, 16)) or key.upper()
    if tag_for_keyword(key) is not None:
        return key
    raise InvalidQuery(f"{key!r} is neither a DICOM keyword nor an 8-hex-digit tag")


def check_query(items: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Matching keys normalised, in a canonical order; InvalidQuery for what we never send."""
    found: dict[str, str] = {}
    for key, value in items:
        normal = query_key(key)
        if normal in found:
            raise InvalidQuery(f"{key!r} appears twice")
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise InvalidQuery(f"the value of {key!r} holds control characters")
        if _utf8_len(value) > MAX_QUERY_BYTES:
            raise InvalidQuery(f"the value of {key!r} is longer than {MAX_QUERY_BYTES} bytes")
        found[normal] = value
    if not found:
        raise InvalidQuery("no matching key")
    if len(found) > MAX_QUERY_KEYS:
        raise InvalidQuery(f"more than {MAX_QUERY_KEYS} keys")
    return tuple(sorted(found.items()))


def parse_query(text: str) -> tuple[tuple[str, str], ...]:
    """A query string (``PatientID=123&StudyDate=20240101-20241231``) as checked items.

    Standard query-string syntax: ``&`` between pairs, ``%XX`` escapes (UTF-8), ``+``
    for a space. Raises InvalidQuery (a ValueError) with the reason.
    """
    if _utf8_len(text) > MAX_QUERY_BYTES:
        raise InvalidQuery(f"longer than {MAX_QUERY_BYTES} bytes")
    try:
        items = parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                          errors="strict", max_num_fields=MAX_QUERY_KEYS)
    except UnicodeDecodeError:
        raise InvalidQuery("a %-escape is not UTF-8") from None
    except ValueError:  # the message would quote the text, which may name a patient
        raise InvalidQuery("not KEY=VALUE pairs joined by &") from None
    return check_query(items)
