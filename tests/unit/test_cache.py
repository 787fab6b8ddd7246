"""The persistent cache's names: the default cache folder (XDG) and cache keys, which
refuse anything but UIDs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomfs.options import default_cache_dir
from dicomfs.store import Key


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                       ) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dicomfs"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dicomfs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dicomfs"


@pytest.mark.parametrize("key", [
    Key("../x"),
    Key(".."),
    Key("1.2/3"),
    Key("/1.2"),
    Key(""),
    Key("1." + "2" * 63),  # 65 characters
    Key("1..2"),
    Key(".1.2"),
    Key("1.2."),
    Key("1.2\n"),
    Key("1.2 "),
    Key("1.a"),
    Key("1.2", "../../etc"),
    Key("1.2", ""),
    Key("1.2", "1.3", "../1.4", "dcm"),
    Key("1.2", "1.3", "1.4/..", "png"),
    Key("1.2", "1.3", "", "jpg"),
    Key("1.2", "1.3", "1." + "4" * 63, "dcm"),
    Key("1.2", "1.3", None, "dcm"),  # an instance kind without an instance
    Key("1.2", "1.3", "1.4", "sh"),  # an unknown kind
    Key("1.2", "1.3", "1.4", "../dcm"),
], ids=repr)
def test_cache_keys_refuse_anything_but_uids(key: Key) -> None:
    with pytest.raises(ValueError):
        key.relpath()


def test_cache_keys_of_valid_uids() -> None:
    longest = "1." + "2" * 62
    assert len(longest) == 64
    assert Key(longest).relpath() == f"{longest}/metadata.json"
    assert Key("1.2", "1.3").relpath() == "1.2/1.3/metadata.json"
    assert Key("1.2", "1.3", longest, "dcm").relpath() == f"1.2/1.3/{longest}.dcm"
    assert Key("1.2", "1.3", "1.4", "png").relpath() == "1.2/1.3/1.4.png"
