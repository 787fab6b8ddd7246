"""The demo: ``python -m tests.support.demo [start [MOUNTPOINT] | stop]``.

``start`` (the default) builds the sample archive into ``demo/data``, serves it with a private
Orthanc (storage ``demo/orthanc``, kept between runs so the upload is instant the second time),
mounts it with ``python -m dicomfs mount`` (cache ``demo/cache``), prints what to try and waits;
Ctrl-C or SIGTERM unmounts and stops Orthanc. ``stop`` does the same from another terminal,
using the state file ``demo/state.json``.

``demo/`` and the default mount point ``mnt/`` live at the root of the source checkout when run
from inside it, else in the current directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tests.support.mounts import Mount, MountError, force_unmount, is_mounted, mount_dicomfs
from tests.support.orthanc import LocalOrthanc, OrthancError
from tests.support.sample import SampleArchive, build_archive

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo"  # how users start and stop it
STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Layout:
    """Where the demo keeps its things."""

    base: Path

    @property
    def demo(self) -> Path:
        return self.base / "demo"

    @property
    def data(self) -> Path:
        return self.demo / "data"

    @property
    def storage(self) -> Path:
        return self.demo / "orthanc"

    @property
    def cache(self) -> Path:
        return self.demo / "cache"

    @property
    def state(self) -> Path:
        return self.demo / "state.json"

    @property
    def default_mountpoint(self) -> Path:
        return self.base / "mnt"

    @classmethod
    def find(cls) -> Layout:
        """The checkout holding this package when the current directory is inside it."""
        checkout = Path(__file__).resolve().parents[2]
        cwd = Path.cwd().resolve()
        if (checkout / "pyproject.toml").is_file() and cwd.is_relative_to(checkout):
            return cls(checkout)
        return cls(cwd)


def _say(message: str = "") -> None:
    print(message, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _alive(pid: int | None, needle: str = "") -> bool:
    """True when ``pid`` runs and its command line contains ``needle`` (guards pid reuse)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return needle in cmdline


# --------------------------------------------------------------------------- start


def start(layout: Layout, mountpoint: Path, *, mount: bool = True) -> int:
    """Run the demo in the foreground until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, _interrupt)
    state = _read_state(layout)
    if state and _alive(state.get("pid"), "tests.support.demo"):
        _say(
            f"The demo already runs (pid {state['pid']}); stop it with: scripts/demo stop"
        )
        return 1
    if state:
        _cleanup_stale(layout, state)

    layout.demo.mkdir(parents=True, exist_ok=True)
    orthanc = LocalOrthanc(layout.storage)
    owns_mount = False
    mounted: Mount | None = None
    try:
        started = time.monotonic()
        _say(f"Building the sample archive in {layout.data} (first time: ~10 s) ...")
        archive = build_archive(layout.data)
        took = time.monotonic() - started
        _say(f"  {len(archive.files)} files, {archive.total_size / 1e6:.0f} MB ({took:.1f} s)")

        started = time.monotonic()
        orthanc.start()
        _say(f"Orthanc started at {orthanc.url} ({time.monotonic() - started:.1f} s)")
        report = orthanc.load_archive(archive)
        kept = report.skipped + report.already_stored
        _say(f"  uploaded {report.uploaded}, already there {kept} ({report.seconds:.1f} s)")

        owns_mount = mount and not is_mounted(mountpoint)
        if mount and not owns_mount:
            _say(f"{mountpoint} is already a mount point; not mounting (unmount it first)")
        # Written before mounting: a stop that lands mid-mount must still unmount.
        _write_state(layout, orthanc, mountpoint, mounted=owns_mount)
        mounted = _mount(orthanc, mountpoint, layout) if owns_mount else None
        _print_instructions(orthanc, archive, mountpoint if mounted else None, layout)
        while orthanc.running:
            time.sleep(0.5)
        _say(f"Orthanc stopped unexpectedly; see {orthanc.log_path}")
        return 1
    except KeyboardInterrupt:
        return 0
    except OrthancError as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say("\nStopping the demo ...")
        if mounted is not None:
            with contextlib.suppress(MountError):
                mounted.unmount()
        if owns_mount and is_mounted(mountpoint):
            _unmount(mountpoint)
        orthanc.stop()
        layout.state.unlink(missing_ok=True)
        _say("Stopped.")


def _mount(orthanc: LocalOrthanc, mountpoint: Path, layout: Layout) -> Mount | None:
    """``dicomfs mount`` in the background; None (and why) when it did not work."""
    log = layout.demo / "mount.log"
    _say(f"Mounting {orthanc.dicomweb_url} at {mountpoint} (cache {layout.cache}, log {log})")
    try:
        mount = mount_dicomfs(orthanc.dicomweb_url, mountpoint, cache_dir=layout.cache,
                              log_path=log, foreground=False, timeout=60)
    except MountError as exc:
        _say("  " + str(exc).replace("\n", "\n    "))
        _say("  The DICOMweb server keeps running; Ctrl-C to stop.")
        return None
    _say(f"  mounted in {mount.seconds:.1f} s")
    return mount


def _unmount(mountpoint: Path) -> None:
    """Force whatever is left so no mount outlives the demo (or an earlier, killed one)."""
    if not force_unmount(mountpoint):
        _say(f"warning: {mountpoint} is still mounted; try: fusermount3 -u -z {mountpoint}")


def _print_instructions(
    orthanc: LocalOrthanc, archive: SampleArchive, mountpoint: Path | None, layout: Layout
) -> None:
    venv_bin = Path(sys.executable).parent
    lines = [
        "",
        "dicomfs demo is running.",
        f"  DICOMweb server : {orthanc.dicomweb_url}",
        f"  Orthanc explorer: {orthanc.url}/app/explorer.html",
        f"  archive         : {len(archive.files)} instances, {len(archive.studies)} studies, "
        f"{len(archive.patients)} patients, {archive.total_size / 1e6:.0f} MB in {archive.root}",
    ]
    if mountpoint is None:
        lines += [
            "",
            "Not mounted. Query the server directly, e.g.:",
            f"  curl -s '{orthanc.dicomweb_url}/studies?limit=5' | python -m json.tool | head -40",
        ]
    else:
        m = shlex.quote(str(mountpoint))
        ct = archive.with_label("ct")[0]
        ct_folder = _find_folder(mountpoint, ct.study_uid, ct.series_uid) or Path(
            "<folder of the 400-slice CT series>"
        )
        lines += [
            f"  mounted at      : {mountpoint}",
            "",
            "Try, in another terminal:",
            f"  ls {m}",
            f"  ls {m}/patients",
            f"  find {m}/dates -maxdepth 4 | head -20",
            f"  ls -l {m}/studies | head",
            f"  dcmdump -q +sd +r +sp '*.dcm' {m}/studies | grep -m5 PatientName",
            f"  {venv_bin}/dcm2niix -z n -o /tmp -f ct {shlex.quote(str(ct_folder))}",
            f'  {sys.executable} -c "import pathlib, pydicom; '
            f"f = next(pathlib.Path('{mountpoint}/studies').rglob('*.dcm')); "
            'print(f); print(pydicom.dcmread(f))"',
        ]
    lines += [
        "",
        "Stop with Ctrl-C here, or from another terminal:",
        f"  cd {shlex.quote(str(layout.base))} && {shlex.quote(str(SCRIPT))} stop",
        f"(state in {layout.state}; Orthanc log {orthanc.log_path})",
    ]
    _say("\n".join(lines))


def _find_folder(root: Path, study_uid: str, series_uid: str, depth: int = 4) -> Path | None:
    """The mounted folder named after a series, found without assuming dicomfs's layout.

    Breadth-first, following only the study's folder where one level names it, so a few
    listings suffice.
    """
    frontier = [root]
    for _ in range(depth):
        deeper: list[Path] = []
        for folder in frontier:
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            if series_uid in names:
                return folder / series_uid
            if study_uid in names:
                deeper.append(folder / study_uid)
            else:
                deeper += [folder / n for n in names if (folder / n).is_dir()]
        frontier = deeper[:50]
    return None


# --------------------------------------------------------------------------- state, stop


def _read_state(layout: Layout) -> dict | None:
    try:
        return json.loads(layout.state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_state(layout: Layout, orthanc: LocalOrthanc, mountpoint: Path, *, mounted: bool) -> None:
    state = {
        "pid": os.getpid(),
        "orthanc_pid": orthanc.pid,
        "url": orthanc.url,
        "dicomweb_url": orthanc.dicomweb_url,
        "mountpoint": str(mountpoint),
        "mounted": mounted,
    }
    layout.state.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")


def _cleanup_stale(layout: Layout, state: dict) -> None:
    """Undo what a demo that died without cleaning up left behind."""
    mountpoint = Path(state.get("mountpoint", ""))
    if state.get("mounted") and is_mounted(mountpoint):
        _say(f"Unmounting {mountpoint}, left by an earlier demo")
        _unmount(mountpoint)
    orthanc_pid, ours = state.get("orthanc_pid"), str(layout.storage)
    if orthanc_pid and _alive(orthanc_pid, ours):
        _say(f"Stopping Orthanc (pid {orthanc_pid}), left by an earlier demo")
        os.kill(orthanc_pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(orthanc_pid, ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(orthanc_pid, ours):
            os.kill(orthanc_pid, signal.SIGKILL)
    layout.state.unlink(missing_ok=True)


def stop(layout: Layout) -> int:
    """Ask a running demo to stop (it cleans up itself), or clean up after a dead one."""
    state = _read_state(layout)
    if state is None:
        _say("No demo is running (no state file).")
        return 0
    pid = state.get("pid")
    if not _alive(pid, "tests.support.demo"):
        _cleanup_stale(layout, state)
        _say("Cleaned up after a demo that was no longer running.")
        return 0
    _say(f"Stopping the demo (pid {pid}) ...")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive(pid, "tests.support.demo"):
        if time.monotonic() > deadline:
            _say(f"The demo (pid {pid}) did not stop within {STOP_TIMEOUT:.0f} s")
            return 1
        time.sleep(0.2)
    _say("Stopped.")
    return 0


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args.insert(0, "start")
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.demo", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start_cmd = commands.add_parser("start", help="serve and mount the sample archive (default)")
    start_cmd.add_argument("mountpoint", nargs="?", type=Path, help="default: mnt/")
    start_cmd.add_argument("--no-mount", action="store_true", help="only serve it over DICOMweb")
    commands.add_parser("stop", help="stop a demo started from another terminal")
    options = parser.parse_args(args)

    layout = Layout.find()
    if options.command == "stop":
        return stop(layout)
    mountpoint = (options.mountpoint or layout.default_mountpoint).absolute()
    return start(layout, mountpoint, mount=not options.no_mount)


if __name__ == "__main__":
    raise SystemExit(main())
