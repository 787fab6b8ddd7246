"""Token commands: one that hangs is stopped after a time limit and reported."""

from __future__ import annotations

import sys

import pytest

import dicomfs.auth
from dicomfs.auth import CredentialError

PYTHON = sys.executable


def test_token_command_has_a_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token command that hangs is stopped after TOKEN_COMMAND_TIMEOUT (60 s, lowered
    here) and reported, instead of hanging every request behind it."""
    monkeypatch.setattr(dicomfs.auth, "TOKEN_COMMAND_TIMEOUT", 0.5)
    with pytest.raises(CredentialError, match=r"timed out after 0\.5 seconds"):
        dicomfs.auth.run_token_command(f"{PYTHON} -c 'import time; time.sleep(60)'")
