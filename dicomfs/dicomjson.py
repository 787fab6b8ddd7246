"""Reading the DICOM JSON model (PS3.18 F.2) that QIDO-RS and WADO-RS metadata answer with.

Servers send arrays of objects keyed by 8-hex-digit tags. Everything here is
tolerant: a missing or oddly typed value reads as None instead of raising,
because one malformed attribute must not hide a whole study.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from dicomfs.errors import ProtocolError
from dicomfs.uids import is_uid

log = logging.getLogger(__name__)

Dataset = dict[str, Any]

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
STUDY_DATE = "00080020"
STUDY_TIME = "00080030"
SERIES_DATE = "00080021"
SERIES_TIME = "00080031"
CREATION_DATE = "00080012"
CREATION_TIME = "00080013"
MODALITY = "00080060"
PATIENT_NAME = "00100010"
PATIENT_ID = "00100020"
STUDY_DESCRIPTION = "00081030"
SERIES_DESCRIPTION = "0008103E"
SERIES_NUMBER = "00200011"
INSTANCE_NUMBER = "00200013"
ROWS = "00280010"
COLUMNS = "00280011"
BITS_ALLOCATED = "00280100"
SAMPLES_PER_PIXEL = "00280002"
NUMBER_OF_FRAMES = "00280008"
STUDY_INSTANCES = "00201208"
SERIES_INSTANCES = "00201209"


def value(ds: Dataset, tag: str) -> Any:
    """First value of ``tag``, or None when absent or malformed."""
    element = ds.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    return values[0]


def text(ds: Dataset, tag: str) -> str | None:
    """The value as a string; person names give their alphabetic form."""
    first = value(ds, tag)
    if isinstance(first, dict):
        first = first.get("Alphabetic")
    if first is None or isinstance(first, (dict, list)):
        return None
    return str(first)


def integer(ds: Dataset, tag: str) -> int | None:
    """The value as an int (IS values may arrive as strings), or None."""
    first = value(ds, tag)
    try:
        return int(first) if first is not None and not isinstance(first, bool) else None
    except (TypeError, ValueError, OverflowError):  # 1e400 is valid JSON: infinity
        return None


def uid(ds: Dataset, tag: str) -> str | None:
    """The UID in ``tag`` if it is syntactically valid, else None."""
    found = text(ds, tag)
    return found if is_uid(found) else None


def pick(datasets: Iterable[Dataset], tag: str, wanted: str) -> Dataset | None:
    """The first dataset whose UID ``tag`` is ``wanted``."""
    return next((ds for ds in datasets if uid(ds, tag) == wanted), None)


def sorted_by_uid(datasets: Iterable[Dataset], tag: str) -> list[Dataset]:
    return sorted(datasets, key=lambda ds: uid(ds, tag) or "")


def timestamp(ds: Dataset, date_tag: str, time_tag: str) -> float | None:
    """Seconds since the epoch for a DA (and optional TM) pair, read as local time."""
    date = text(ds, date_tag)
    if not date or not re.fullmatch(r"\d{8}", date.strip()):
        return None
    clock = re.match(r"(\d{2})(\d{2})?(\d{2})?", (text(ds, time_tag) or "").strip())
    hour, minute, second = (int(g) if g else 0 for g in clock.groups()) if clock else (0, 0, 0)
    try:
        return datetime.datetime(int(date[:4]), int(date[4:6]), int(date[6:8]),
                                 min(hour, 23), min(minute, 59), min(second, 59)).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def load_array(raw: bytes, *, what: str) -> list[Dataset]:
    """Parse a DICOM JSON answer: a list of objects. Non-object entries are skipped.

    An empty body is an empty result (servers answer 204 or an empty 200).
    """
    if not raw.strip():
        return []
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what}: answer is not valid JSON ({exc})") from None
    if not isinstance(parsed, list):
        raise ProtocolError(f"{what}: expected a JSON array, got {type(parsed).__name__}")
    datasets = [item for item in parsed if isinstance(item, dict)]
    if len(datasets) != len(parsed):
        log.warning("%s: skipped %d entries that are not JSON objects", what,
                    len(parsed) - len(datasets))
    return datasets


def in_instance_order(datasets: Iterable[Dataset]) -> list[Dataset]:
    """Instances in the order a series folder lists them: by number, then by UID.

    One order for the listing and for read-ahead, which fetches in listing order.
    """
    return sorted(datasets, key=lambda ds: (integer(ds, INSTANCE_NUMBER) or 0,
                                            uid(ds, SOP_UID) or ""))
