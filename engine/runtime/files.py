"""File helpers shared by the model store and the reward files: hashing, atomic writes, a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from engine.runtime.errors import DiskFullError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device, or in the user's quota


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write to a sibling temp file and rename: a crash or a full disk never leaves a half file at path.

    A full disk raises DiskFullError; what was at ``path`` before stays as it was.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as error:
        if is_disk_full(error):
            raise DiskFullError(
                f"The disk is full: no room in {path.parent} to write {path.name} (nothing there was "
                "changed); free some space or choose another folder, then try again."
            ) from error
        raise
    finally:
        partial.unlink(missing_ok=True)
