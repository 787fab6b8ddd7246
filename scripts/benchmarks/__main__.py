"""``python -m scripts.benchmarks``: the command line of ``scripts/bench`` (``--help``)."""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scripts import benchmarks
from scripts.benchmarks import scale
from scripts.benchmarks.common import REPO, say
from scripts.benchmarks.loopback import Bench
from scripts.benchmarks.network import NetworkBench
from scripts.benchmarks.plot import plot, plot_network
from scripts.benchmarks.report import machine_facts
from scripts.benchmarks.table import table_lines, text_table, write_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench",
                                     description=benchmarks.__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--skip-1g", action="store_true",
                        help="skip the ~1 GB study (cold read and peak RSS rows)")
    section = parser.add_mutually_exclusive_group()
    section.add_argument("--only", choices=["network", "latency", "scale"],
                         help="run only the network section (emulated links: readers and "
                         "latency rows; nearly full disk, CPU per GB), or only its latency "
                         "rows (first bytes by path, ls -R, a big instance); or the scale "
                         "section, never part of the default run (walks on a generated "
                         "archive of --scale-studies studies, kept under /tmp/scale)")
    section.add_argument("--skip-network", action="store_true",
                         help="skip the network section")
    parser.add_argument("--slow-link-runs", type=int, default=1,
                        help="runs at the slowest emulated link (default 1: each run takes "
                        "minutes); the other links use --runs")
    parser.add_argument("--scale-studies", type=scale.study_counts, default=None,
                        help="with --only scale: archive sizes, comma-separated (default "
                        "20000; 200000 takes ~2 GB and ~10 min to build once)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md",
                        help="Markdown report (default docs/performance.md); the plot is "
                        "written next to it with the suffix .png")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.slow_link_runs < 1:
        parser.error("--runs and --slow-link-runs must be at least 1")
    if args.scale_studies is not None and args.only != "scale":
        parser.error("--scale-studies goes with --only scale")
    return args


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)])
    if args.only == "scale":
        options = scale.make_parser().parse_args([])
        options.studies = args.scale_studies or options.studies
        return scale.run(options, args.output.absolute(), command)
    for tool in ("curl", "rclone", "fusermount3", "pgrep"):
        if not shutil.which(tool):
            say(f"{tool} is missing; run scripts/bench, which installs what is needed")
            return 2
    started = time.monotonic()
    bench = Bench(args)
    atexit.register(bench.cleanup)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    network = None if args.skip_network else NetworkBench(bench)
    loopback_seconds = 0.0
    try:
        bench.prepare()
        bench.facts = machine_facts(bench.orthanc)
        if args.only is None:
            bench.run_all()
            loopback_seconds = time.monotonic() - started
        if network is not None:
            network.run()
    finally:
        bench.cleanup()
    seconds = time.monotonic() - started
    bench.facts.update(_date=date, _load_start=load_start,
                       _load_end=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    output = args.output.absolute()
    if args.only is None:
        lines = table_lines(bench.measures)
        if args.skip_1g:
            skipped = {bench.measures[k].label
                       for k in ("wire_1g", "cold_1g", "rss_idle", "rss_1g")}
            lines = [line for line in lines if line.measurement not in skipped]
        print(text_table(lines))
        png = output.with_suffix(".png")
        write_report(bench, output, png, lines, loopback_seconds, command)
        plot(bench.measures, png)
        say(f"wrote {output} and {png}")
    if network is not None and args.only != "latency":
        print(network.text_table())
        png = output.with_name(f"{output.stem}-network.png")
        network.write_report(output, png, seconds - loopback_seconds, command)
        plot_network(network, png)
        say(f"wrote the network section into {output}, and {png}")
    if network is not None and network.latency.links:
        print(f"\n{network.latency.text_table()}")
        network.latency.write_report(output, command)
        say(f"wrote the latency rows into {output}")
    print(f"\nwhole benchmark: {seconds / 60:.1f} min")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        sys.exit(130)
