"""Kill a save for real, at every step: a forked child runs the save and calls ``os._exit`` just before its n-th
file-system change (or half-way through its n-th file write), for n = 1, 2, ... until a save completes.

Nothing in the code under test is hooked: the child wraps the os / shutil / safetensors / json functions any
implementation has to go through, so a save that writes in place, or deletes before it renames, is caught too.
POSIX only (os.fork). Kept free of pytest so that it can be reused by scripts.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Callable, Iterator, Tuple

CRASHED = 77  # the child's exit status when it was killed on purpose
_COUNTED = (("os", "rename"), ("os", "replace"), ("os", "unlink"), ("os", "remove"), ("os", "rmdir"),
            ("os", "mkdir"), ("os", "chmod"), ("os", "symlink"), ("shutil", "rmtree"), ("shutil", "copy2"),
            ("shutil", "copyfile"), ("shutil", "copytree"))


def _install_crash(n: int) -> None:
    """In the child: exit with CRASHED at the n-th counted operation."""
    import safetensors.torch

    count = {"k": 0, "depth": 0}

    def tick() -> bool:
        if count["depth"]:
            return False  # inside a counted operation (shutil.rmtree unlinks file by file): one step
        count["k"] += 1
        return count["k"] == n

    def wrap_op(fn):
        def wrapped(*args, **kwargs):
            if tick():
                os._exit(CRASHED)
            count["depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                count["depth"] -= 1
        return wrapped

    for mod_name, attr in _COUNTED:
        mod = sys.modules[mod_name]
        setattr(mod, attr, wrap_op(getattr(mod, attr)))

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if tick():  # half of the file, then dead
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as fh:
                fh.write(data[: len(data) // 2])
            os._exit(CRASHED)
        return real_save_file(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_file

    real_dump = json.dump

    def dump(obj, fp, *args, **kwargs):
        if tick():
            text = json.dumps(obj, *args, **kwargs)
            fp.write(text[: len(text) // 2])
            fp.flush()
            os._exit(CRASHED)
        return real_dump(obj, fp, *args, **kwargs)

    json.dump = dump

    import fastxlstm._fileio as fileio
    real_exchange = fileio._rename_exchange
    fileio._rename_exchange = wrap_op(real_exchange)


def run_crashed(save: Callable[[], None], n: int, timeout: float = 120.0) -> bool:
    """Run ``save`` in a forked child killed at its n-th file-system change. True if the child was killed, False
    if the save completed first. AssertionError if the save failed otherwise or hung."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        rc = 1
        try:
            _install_crash(n)
            save()
            rc = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(rc)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"the save (crash point {n}) hung for {timeout} s")
        time.sleep(0.005)
    rc = os.waitstatus_to_exitcode(status)
    assert rc in (0, CRASHED), f"the save failed in the child (crash point {n}, exit status {rc}): see stderr"
    return rc == CRASHED


def count_steps(save: Callable[[], None]) -> int:
    """How many counted steps ``save`` takes (run in a child, which is never killed)."""
    n = 1
    while run_crashed(save, n):
        n += 1
    return n - 1


def every_crash_point(save: Callable[[], None], limit: int = 400) -> Iterator[int]:
    """Yield n after the child was killed at its n-th step, for every n until a save completes."""
    for n in range(1, limit + 1):
        if not run_crashed(save, n):
            return
        yield n
    raise AssertionError(f"the save did not complete within {limit} file-system steps")


def leftovers(parent) -> Tuple[str, ...]:
    """Hidden entries (temporary / old / trash copies) in a directory."""
    return tuple(sorted(e for e in os.listdir(parent) if e.startswith(".")))


__all__ = ["CRASHED", "run_crashed", "every_crash_point", "leftovers"]


def same_state(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _exchange_fixture(request, monkeypatch):
    """Run with the atomic exchange (Linux renameat2) and with the fallback for file systems without it."""
    import fastxlstm._fileio as fileio
    if not request.param:
        monkeypatch.setattr(fileio, "_rename_exchange", lambda a, b: False)
    return request.param


def exchange_fixture():
    """The ``exchange`` fixture of the crash tests (``exchange = exchange_fixture()`` in a test module)."""
    import pytest
    return pytest.fixture(params=[True, False], ids=["exchange", "two-renames"], name="exchange")(_exchange_fixture)
