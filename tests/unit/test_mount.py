"""``dicomfs mount`` failing before any mount: an unreachable server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.mounts import is_mounted


def test_unreachable_server_fails_clearly(tmp_path: Path) -> None:
    point = tmp_path / "mnt"
    point.mkdir()
    result = subprocess.run([sys.executable, "-m", "dicomfs", "mount",
                             "http://127.0.0.1:9/dicom-web", str(point),
                             "--cache-dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cannot reach http://127.0.0.1:9/dicom-web" in result.stderr
    assert not is_mounted(point)
