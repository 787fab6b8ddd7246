"""The loopback section's rows (what is compared with what, against which target), the
table they make and its block of the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scripts.benchmarks.common import Measure, Target
from scripts.benchmarks.data import PARALLEL_SERIES
from scripts.benchmarks.report import busy_note, machine_table, plain_table, write_block

if TYPE_CHECKING:
    from scripts.benchmarks.loopback import Bench

@dataclass(frozen=True)
class Row:
    """A line of the table: a measure, the measure it is compared with, and a target."""

    key: str
    ref: str | None = None
    target: Target | None = None


COLD_TARGET = Target("<= 1.5x (hard limit 3x)", 1.5, hard=3.0)
ROWS: tuple[Row, ...] = (
    Row("wire"),
    Row("local"),
    Row("cold", "wire", COLD_TARGET),
    Row("wire_file"),
    Row("cold", "wire_file"),
    Row("cold", "rclone", Target("<= 0.1x (>= 10x faster)", 0.1)),
    Row("cpu_wire_server"),
    Row("cpu_cold_server", "cpu_wire_server"),
    Row("cpu_cold_fs"),
    Row("cpu_cold_reader"),
    Row("mount"),
    Row("rclone", "wire"),
    Row("dwc", "wire"),
    Row("warm_disk", "local", Target("<= 3x", 3.0)),
    Row("warm_page", "local", Target("<= 1.2x", 1.2)),
    Row("ls_local"),
    Row("ls_cold", "ls_local", Target("< 0.5 s", 0.5, on_ratio=False, strict=True)),
    Row("ls_warm", "ls_local"),
    Row("wire_one"),
    Row("ttfb", "wire_one"),
    Row("par_wire"),
    Row("par_cold", "par_wire"),
    Row("wire_1g"),
    Row("cold_1g", "wire_1g", COLD_TARGET),
    Row("rss_idle"),
    Row("rss_1g", None, Target("< 200 MB", 200.0, on_ratio=False, strict=True)),
)


def make_measures() -> dict[str, Measure]:
    """Every measure the rows name: the label the table shows and a short name for the
    reference column."""
    n = PARALLEL_SERIES
    labels = {
        "wire": ("wire: curl WADO-RS series retrieve (CT, 400 files)", "wire (curl series)"),
        "local": ("local disk: cat the 400 CT files (page cache warm)", "local disk cat"),
        "wire_file": ("wire into a new file on the cache's disk: curl -o", "curl -o file"),
        "cold": ("dicomfs cold series read: cat 400 files", ""),
        "mount": ("dicomfs mount time (fresh cache, until ready)", ""),
        "cpu_wire_server": ("CPU: Orthanc, for one wire series retrieve", "Orthanc CPU (wire)"),
        "cpu_cold_server": ("CPU: Orthanc, during a dicomfs cold series read", ""),
        "cpu_cold_fs": ("CPU: the dicomfs process, during that cold read", ""),
        "cpu_cold_reader": ("CPU: cat (and its shell), during that cold read", ""),
        "rclone": ("rclone mount of Orthanc WebDAV, cold: cat 400 files", "rclone cold cat"),
        "dwc": ("dicomweb-client iter_series, whole process", ""),
        "warm_disk": ("dicomfs warm from disk cache (fresh mount): cat", ""),
        "warm_page": ("dicomfs warm from page cache (2nd cat, same mount)", ""),
        "ls_local": ("local disk: ls -l of the CT folder", "local disk ls -l"),
        "ls_cold": ("dicomfs ls -l of the CT series, cold", ""),
        "ls_warm": ("dicomfs ls -l of the CT series, warm (2nd ls)", ""),
        "wire_one": ("wire: curl WADO-RS one instance (whole)", "wire (curl instance)"),
        "ttfb": ("dicomfs time to first byte, one instance, cold", ""),
        "par_wire": (f"wire: {n} concurrent curl series retrieves", f"wire ({n} curl series)"),
        "par_cold": (f"dicomfs {n} concurrent cat of {n} series, cold", ""),
        "wire_1g": ("wire: curl WADO-RS study retrieve (~1 GB, 2000 files)",
                    "wire (curl study)"),
        "cold_1g": ("dicomfs cold read of the ~1 GB study: cat 2000 files", ""),
        "rss_idle": ("dicomfs peak RSS (VmHWM) after mount, before reading", ""),
        "rss_1g": ("dicomfs peak RSS (VmHWM) after reading the ~1 GB study", ""),
    }
    return {key: Measure(label, short, "MB" if key.startswith("rss") else "s")
            for key, (label, short) in labels.items()}



def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    return f"{value:.1f}"


@dataclass(frozen=True)
class TableLine:
    measurement: str
    median: str
    spread: str
    runs: str
    reference: str
    ratio: str
    target: str
    result: str


def table_lines(measures: dict[str, Measure]) -> list[TableLine]:
    """The table, one line per row, as strings."""
    lines = []
    for row in ROWS:
        m = measures[row.key]
        ref = measures[row.ref] if row.ref else None
        median = m.median
        unit = "s" if m.unit == "s" else " MB"
        shown = "-" if median is None else fmt_value(median, m.unit) + unit
        spread = ("-" if not m.values else
                  f"{fmt_value(min(m.values), m.unit)}-{fmt_value(max(m.values), m.unit)}")
        ratio = None
        if ref is not None and median is not None and ref.median:
            ratio = median / ref.median
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        if row.ref == "rclone" and ratio:
            ratio_text += f" ({1 / ratio:.0f}x faster)"
        result = ""
        if row.target is not None:
            value = ratio if row.target.on_ratio else median
            result = "no data" if value is None else row.target.verdict(value)
        problems = []
        if m.wrong:
            problems.append(f"WRONG BYTES in {len(m.wrong)}/{len(m.values)} runs")
        if m.error:
            problems.append("FAILED" + (" (a run)" if m.values else ""))
        result = "; ".join([p for p in [result, *problems] if p])
        lines.append(TableLine(
            m.label, shown, spread, str(len(m.values)),
            ref.short if ref else "-",
            ratio_text, row.target.text if row.target else "", result))
    return lines


def text_table(lines: list[TableLine]) -> str:
    headers = ("measurement", "median", "min-max", "n", "reference", "ratio", "target",
               "result")
    return plain_table(headers, [astuple(line) for line in lines])


def astuple(line: TableLine) -> tuple[str, ...]:
    return tuple(getattr(line, f) for f in line.__dataclass_fields__)


def markdown_table(lines: list[TableLine]) -> str:
    out = ["| measurement | median | min-max | runs | reference | ratio | target | result |",
           "|---|---:|---:|---:|---|---:|---|---|"]
    for line in lines:
        cells = [c.replace("|", "\\|") for c in astuple(line)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_report(bench: Bench, output: Path, png: Path, lines: list[TableLine],
                 seconds: float, command: str) -> None:
    """The loopback section's block: only what this run measured."""
    facts = bench.facts
    data = "\n".join(f"- {note}" for note in bench.data_notes)
    problems = [f"- failed: {f.splitlines()[0]}" for f in bench.failures
                if not f.startswith("network")]
    problems += [f"- wrong result: {m.label}, {w}" for m in bench.measures.values()
                 for w in m.wrong]
    failures = "\n".join(problems) or "- none"
    text = f"""## Loopback: dicomfs against the wire, local disk and other clients

Generated by `scripts/bench` on {facts['_date']}; the whole run took {seconds / 60:.1f} min
({bench.runs} runs per figure). Ratios are the median of the row over the median of its
reference; "n" is the number of runs (the mount time counts every fresh-cache mount).

Reproduce: `{command}`
{busy_note(facts)}
{markdown_table(lines)}

![dicomfs and references, median seconds (log scale)]({png.name})

### Failures and wrong results

{failures}

### Machine

{machine_table(facts)}

### Data

{data}
"""
    write_block(output, "loopback", text)

