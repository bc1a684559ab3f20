"""Durable, atomic file writes shared by model checkpoints (models/io.py) and training checkpoints
(train/checkpoint.py): a directory is assembled under a temporary name and swapped into place, so a crash at any
point leaves either the old checkpoint or the new one, never a mix."""
from __future__ import annotations

import json
import os
import shutil
import tempfile


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj, indent: int = 2, sort_keys: bool = False) -> None:
    """Write JSON and fsync it (the directory swap that follows must not publish an empty file)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=sort_keys)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def swap_dir_into_place(tmp: str, target: str) -> None:
    """Move the finished directory ``tmp`` to ``target`` (same parent directory). An existing ``target`` is
    renamed aside first and deleted only once the new one is in place."""
    parent = os.path.dirname(os.path.abspath(target))
    fsync_dir(tmp)
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rmdir(old)  # only a unique name is wanted
        os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
        fsync_dir(parent)
