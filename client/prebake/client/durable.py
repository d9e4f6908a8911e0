"""Making renames durable: what the client's atomic placements share."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that entries renamed into it survive a crash.

    A no-op where directories cannot be opened or fsynced (some platforms and file
    systems); the rename is still atomic there, only not yet durable.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse directory fsync
        pass
    finally:
        os.close(fd)
