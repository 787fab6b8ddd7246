"""The command line without a server: the fstab form (``mount -t fuse.dicomfs URL DIR -o ...``)."""

from __future__ import annotations

from dicomfs.options import fuse_helper_argv

URL = "http://pacs/dicom-web"


def test_fstab_form_leaves_secrets_and_process_control_to_fuse() -> None:
    """Settings of ``dicomfs mount`` come from -o, read off its parser (page_concurrency
    was added after the fstab form); secrets (an fstab line is readable by every user),
    --foreground and the hidden pipes do not, and FUSE refuses them as unknown."""
    kept = "bearer_token=T,header=H,foreground,help,ready_fd=3,secrets_fd=4"
    argv = fuse_helper_argv([URL, "/mnt/pacs", "-o", f"ro,page_concurrency=4,{kept},uid=7"])
    assert argv == ["mount", URL, "/mnt/pacs", "--page-concurrency", "4", "--uid", "7",
                    "-o", kept]
