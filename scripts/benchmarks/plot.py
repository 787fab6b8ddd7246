"""The plots next to the report: the loopback rows next to their references and peak memory;
the readers at each emulated link."""

from __future__ import annotations

from pathlib import Path

from scripts.benchmarks.common import Measure
from scripts.benchmarks.network import READERS, NetworkBench
from scripts.benchmarks.table import ROWS


def plot(measures: dict[str, Measure], path: Path) -> None:
    """Horizontal bars: each compared row next to its reference (log seconds), and RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [r for r in ROWS if r.ref and measures[r.key].unit == "s"
             and (measures[r.key].values or measures[r.key].error)]
    rss = [m for m in (measures["rss_idle"], measures["rss_1g"]) if m.values]
    fig, axes = plt.subplots(
        2 if rss else 1, 1, figsize=(11, 0.62 * len(pairs) + (3.2 if rss else 1.6)),
        gridspec_kw={"height_ratios": [len(pairs), 1.6] if rss else [1]}, squeeze=False)
    ax = axes[0][0]
    labels: list[str] = []
    y = 0.0
    ticks: list[float] = []
    values = [v for row in pairs for k in (row.key, row.ref or "") for v in measures[k].values]
    for row in pairs:
        ref = measures[row.ref or ""]
        for key, colour in ((row.key, "tab:blue" if "dicomfs" in measures[row.key].label
                             else "tab:orange"), (row.ref or "", "tab:gray")):
            m = measures[key]
            if m.values:
                med = m.median or 0.0
                ax.barh(y, med, height=0.8, color=colour,
                        xerr=[[med - min(m.values)], [max(m.values) - med]], capsize=2)
                note, text_colour = f" {med:.3f} s", "black"
                if key == row.key and ref.median:
                    note += f" = {med / ref.median:.2f}x"
                    if row.target is not None:
                        met = row.target.verdict(med / ref.median if row.target.on_ratio
                                                 else med) == "met"
                        text_colour = "tab:green" if met else "tab:red"
                        note += " (met)" if met else f" (target {row.target.text.split(' (')[0]})"
                ax.text(max(m.values) * 1.08, y, note, va="center", fontsize=7,
                        color=text_colour, weight="bold" if key == row.key else "normal")
            elif key == row.key:
                ax.text(0.01, y, f" failed: {m.error}"[:80], va="center", fontsize=7,
                        transform=ax.get_yaxis_transform(), color="tab:red")
            ticks.append(y)
            labels.append(m.label if key == row.key else f"vs {m.label}")
            y += 1
        y += 0.6
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    if values:
        ax.set_xlim(min(values) / 2, max(values) * 40)
    ax.set_xlabel("seconds, median (bars: min-max), log scale")
    ax.set_title("dicomfs (blue), other clients (orange) and their references (grey)")
    ax.grid(axis="x", which="both", alpha=0.3)

    if rss:
        ax_rss = axes[1][0]
        positions = list(range(len(rss)))
        ax_rss.barh(positions, [m.median or 0.0 for m in rss], color="tab:blue", height=0.6)
        for i, m in enumerate(rss):
            ax_rss.text(m.median or 0.0, i, f" {m.median or 0.0:.0f} MB", va="center",
                        fontsize=8)
        ax_rss.axvline(200, color="tab:red", linestyle="--", label="target < 200 MB")
        ax_rss.set_yticks(positions, [m.label for m in rss], fontsize=7)
        ax_rss.invert_yaxis()
        ax_rss.set_xlabel("MB")
        ax_rss.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_network(network: NetworkBench, path: Path) -> None:
    """The network section's plot: one panel per link, each reader's median seconds (bars:
    min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(network.links), figsize=(13, 3.6), squeeze=False)
    for ax, result in zip(axes[0], network.links, strict=True):
        ref = result.measures["curl"].median
        for y, (key, m) in enumerate(result.measures.items()):
            colour = ("tab:blue" if key == "dicomfs" else
                      "tab:gray" if key == "curl" else "tab:orange")
            if not m.values:
                ax.text(0.01, y, " failed" if m.error else " -", va="center", fontsize=7,
                        color="tab:red", transform=ax.get_yaxis_transform())
                continue
            med = m.median or 0.0
            ax.barh(y, med, color=colour, height=0.7,
                    xerr=[[med - min(m.values)], [max(m.values) - med]], capsize=2)
            note = f" {med:.1f} s" + (f" = {med / ref:.2f}x" if ref else "")
            ax.text(max(m.values), y, note, va="center", fontsize=7)
        ax.set_yticks(range(len(READERS)), list(READERS.values()), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{result.link.name} per connection", fontsize=9)
        ax.set_xlabel("seconds (median; bars min-max)", fontsize=8)
        ax.margins(x=0.35)
        ax.grid(axis="x", alpha=0.3)
        if ax is not axes[0][0]:
            ax.set_yticklabels([])
    fig.suptitle("CT series (400 files, 210 MB): ratio to the single curl stream",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
