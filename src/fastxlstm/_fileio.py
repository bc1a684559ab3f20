"""Durable, atomic writes for every checkpoint writer (model directories in models/io.py, training checkpoints in
train/checkpoint.py), one JSON reader, and the one :class:`CheckpointError`.

Files. :func:`atomic_file` yields a temporary name beside the destination; once the writer is done the file is
fsynced, given the mode a new file gets (0666 less the umask: safetensors itself writes 0600), renamed over the
destination with ``os.replace`` and the directory is fsynced. :func:`write_json` and :func:`write_safetensors` use
it, so no reader ever sees a half-written file under its final name.

Directories. A checkpoint is several files (config.json and weights) that must change together, and its layout is
fixed by transformers (``config.json``, ``model.safetensors``...), so there is no room for a commit file that
transformers would honour (swapping files one by one with an index written last would show transformers a mix of
old and new files). A symlink swapped with ``os.replace`` would be atomic too, but it turns the user's directory
into a link to a hidden one and cannot replace an existing real directory without an exchange anyway. The whole
new directory is therefore assembled under a temporary sibling name (:func:`make_temp_dir`, everything fsynced) and
:func:`publish_dir` puts it in place:

* target absent: one ``rename``. The target appears complete or not at all.
* target present, Linux (``renameat2(RENAME_EXCHANGE)``) or macOS (``renamex_np(RENAME_SWAP)``): the two
  directories trade names in one atomic step, then the old copy (now under the temporary name) is deleted. At
  every instant the target holds a complete checkpoint, old or new, even if the process is killed.
* elsewhere (the file system or OS cannot exchange): ``target -> .NAME.old-S``, then ``.NAME.tmp-S -> target``,
  then the old copy is deleted. If the second rename fails the first is undone. A kill between the two renames
  leaves the target absent with both complete copies beside it under the same suffix S; :func:`recover_dir` (run
  by the next save) renames the new one into place, and :func:`readable_dir` (used by loaders) finds it
  meanwhile, so a load of the target still succeeds.

Leftovers of killed saves (``.NAME.tmp-S``, ``.NAME.old-S``, ``.NAME.trash-S``, where S = ``<pid>-<random>``) are
removed by the next save (:func:`clean_leftovers`), except those of a process that is still running (a concurrent
writer on this machine). Deleting a directory goes through :func:`remove_dir`, which renames it to a ``trash``
name first, so a kill while deleting never leaves a half-deleted checkpoint under its real name. One writer per
target at a time is assumed; two concurrent writers get an error, never a mixed directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import re
import secrets
import shutil
import sys
import threading
import warnings
from typing import Iterator, List, Optional

__all__ = ["CheckpointError", "atomic_file", "write_text", "write_json", "write_safetensors", "read_json", "fsync_file",
           "fsync_dir", "fsync_tree", "make_temp_dir", "publish_dir", "remove_dir", "recover_dir", "readable_dir",
           "clean_leftovers", "interrupted_copies", "new_file_mode"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written: missing, incomplete, corrupt, or not fitting the model (the message
    names the file and what is wrong)."""


# ----------------------------------------------------------------------------------------------------------
# fsync, modes
# ----------------------------------------------------------------------------------------------------------

def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every regular file and directory under ``path`` (symlinks are not followed)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                fsync_file(p)
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (renames) to disk; a no-op where directories cannot be opened (Windows)."""
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


_umask_lock = threading.Lock()


def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", "r", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the process umask (0644 typically)."""
    return 0o666 & ~_umask()


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------

def _suffix() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """``with atomic_file(path) as tmp:`` write the file at ``tmp``; on a normal exit it is fsynced, given the
    default mode and renamed to ``path`` (atomically replacing an old one); on an exception it is removed."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{_suffix()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


def write_text(path: str, text: str) -> None:
    """Write UTF-8 text atomically and durably."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def write_json(path: str, obj, indent: int = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) atomically and durably."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=indent, sort_keys=sort_keys)
            fh.write("\n")


def write_safetensors(path: str, tensors, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file`` atomically and durably, with the default file mode (not 0600)."""
    import safetensors.torch
    with atomic_file(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)


def read_json(path: str, what: str):
    """The parsed JSON at ``path``; CheckpointError naming the file (and ``what`` it is) if it is missing or not
    valid JSON."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a JSON file ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({what}: {exc})") from None


# ----------------------------------------------------------------------------------------------------------
# directories
# ----------------------------------------------------------------------------------------------------------

_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|trash)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")


def make_temp_dir(target: str) -> str:
    """A new empty directory ``.NAME.tmp-<pid>-<random>`` beside ``target`` (mode 0777 less the umask)."""
    parent, name = os.path.split(os.path.abspath(target))
    while True:
        tmp = os.path.join(parent, f".{name}.tmp-{_suffix()}")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EXDEV, getattr(errno, "ENOTSUP", errno.EINVAL),
                         getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically swap the names of ``a`` and ``b`` (both must exist). False where the OS or the file system
    cannot (then nothing happened); OSError for a real failure."""
    libc = _libc()
    if libc is None:  # pragma: no cover
        return False
    if sys.platform.startswith("linux"):
        fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
        if fn is None:  # pragma: no cover
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin":  # pragma: no cover - not exercised by the Linux CI
        fn = getattr(libc, "renamex_np", None)
        if fn is None:
            return False
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
    else:  # pragma: no cover
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def publish_dir(tmp: str, target: str) -> None:
    """Put the finished directory ``tmp`` (from :func:`make_temp_dir` for this ``target``) in place of ``target``
    atomically, as the module docstring describes (everything in ``tmp`` is fsynced first)."""
    tmp, target = os.path.abspath(tmp), os.path.abspath(target)
    parent = os.path.dirname(target)
    fsync_tree(tmp)
    if not os.path.lexists(target):
        os.rename(tmp, target)
        fsync_dir(parent)
        return
    if _rename_exchange(tmp, target):
        fsync_dir(parent)
        _rmtree(tmp)  # the old checkpoint, now under the temporary name
        return
    m = _LEFTOVER_RE.match(os.path.basename(tmp))
    suffix = f"{m.group('pid')}-{m.group('rand')}" if m else _suffix()
    aside = os.path.join(parent, f".{os.path.basename(target)}.old-{suffix}")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)  # undo: the old checkpoint goes back
        raise
    fsync_dir(parent)
    _rmtree(aside)


def _rmtree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_dir(path: str) -> None:
    """Delete a checkpoint directory so that no half-deleted copy is ever visible under its name: it is renamed
    to ``.NAME.trash-S`` first (a kill afterwards leaves a leftover that the next save removes)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f".{name}.trash-{_suffix()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    fsync_dir(parent)
    _rmtree(trash)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier, failed attempt (a live save of ours holds no leftover while we look)
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave it alone
    return True


def _leftovers(parent: str, name: Optional[str] = None) -> List[re.Match]:
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    out = []
    for entry in entries:
        m = _LEFTOVER_RE.match(entry)
        if m and (name is None or m.group("name") == name):
            out.append(m)
    return out


def _interrupted_copy(target: str) -> Optional[str]:
    """For an absent ``target``: the complete copy a save killed between its two renames left beside it (the new
    one, ``.NAME.tmp-S`` next to ``.NAME.old-S``; else the old one), or None."""
    parent, name = os.path.split(os.path.abspath(target))
    found = _leftovers(parent, name)
    olds = [m for m in found if m.group("kind") == "old"]
    olds.sort(key=lambda m: os.path.getmtime(os.path.join(parent, m.group(0))), reverse=True)
    for m in olds:
        new = os.path.join(parent, f".{name}.tmp-{m.group('pid')}-{m.group('rand')}")
        if os.path.isdir(new):
            return new  # renamed aside only after the new copy was complete and fsynced
        return os.path.join(parent, m.group(0))
    return None


def interrupted_copies(parent: str) -> dict:
    """{name: path} of the complete copies that saves killed between their two renames left in ``parent`` for
    entries ``name`` that are absent (see :func:`readable_dir`)."""
    out = {}
    for name in sorted({m.group("name") for m in _leftovers(parent) if m.group("kind") == "old"}):
        target = os.path.join(parent, name)
        if not os.path.lexists(target):
            copy = _interrupted_copy(target)
            if copy is not None:
                out[name] = copy
    return out


def readable_dir(target: str) -> str:
    """``target``, or, where a save was killed between its two renames (see the module docstring), the complete
    copy it left beside it (with a warning). Used by loaders; changes nothing on disk."""
    target = os.fspath(target)
    if os.path.lexists(target):
        return target
    copy = _interrupted_copy(os.path.realpath(target))
    if copy is None:
        return target
    warnings.warn(f"{target} is missing: a save was interrupted; reading the complete copy {copy} (the next save "
                  f"to {target} puts it back in place)", stacklevel=3)
    return copy


def recover_dir(target: str) -> None:
    """Where a save to ``target`` was killed between its two renames, rename the complete copy back into place."""
    target = os.path.abspath(target)
    if os.path.lexists(target):
        return
    copy = _interrupted_copy(target)
    if copy is None:
        return
    m = _LEFTOVER_RE.match(os.path.basename(copy))
    if m is not None and _pid_alive(int(m.group("pid"))):
        return  # that save is still running
    os.rename(copy, target)
    fsync_dir(os.path.dirname(target))


def clean_leftovers(parent: str, name: Optional[str] = None) -> None:
    """Recover interrupted saves and delete the leftovers of killed ones (of dead processes only) in ``parent``;
    only those of the entry ``name`` if given."""
    parent = os.path.abspath(parent)
    for target in sorted({m.group("name") for m in _leftovers(parent, name)}):
        recover_dir(os.path.join(parent, target))
    for m in _leftovers(parent, name):
        if not _pid_alive(int(m.group("pid"))):
            _rmtree(os.path.join(parent, m.group(0)))
