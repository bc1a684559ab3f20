"""Training checkpoints killed for real at every step of a save (a forked child calls os._exit), and a final
rename that fails: every listed checkpoint is complete and loads, the latest is the previous or the new one, and
the next save cleans up."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

import fastxlstm._fileio as fileio
from crash_helpers import every_crash_point, exchange_fixture, same_state
from fastxlstm.models.presets import build_model
from fastxlstm.train import checkpoint as ckpt

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


@pytest.fixture(scope="module")
def states():
    """Two different (model, optimizer) states of the tiny preset, as the trainer gathers them."""
    torch.manual_seed(0)
    model = build_model("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for step in (1, 2):
        loss = model(torch.randint(0, 256, (2, 9))).logits.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        msd, osd = ckpt.gather_state(model, opt)
        out.append(({k: v.clone() for k, v in msd.items()}, osd, {"config": model.config.to_dict()}))
    return out


def _save(root, step, state, keep=2):
    msd, osd, mcfg = state
    return ckpt.save_checkpoint(str(root), step, msd, osd, mcfg, {"position": step}, keep=keep)


def _loads_as(path, states) -> int:
    """The index of the state the checkpoint at ``path`` holds (it must load and verify)."""
    msd = ckpt.load_checkpoint(path)[0]
    for i, (ref, _, _) in enumerate(states):
        if same_state(msd, ref):
            return i
    raise AssertionError(f"{path} holds neither state")


exchange = exchange_fixture()


@pytest.mark.parametrize("new_step", [2, 1], ids=["next-step-and-prune", "same-step-overwrite"])
def test_killed_save_never_lists_an_incomplete_checkpoint(tmp_path, states, exchange, new_step):
    root = tmp_path / "ck"
    pristine = tmp_path / "pristine"
    _save(pristine, 1, states[0])

    def fresh():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root)

    fresh()
    seen = []
    for n in every_crash_point(lambda: _save(root, new_step, states[1], keep=1)):
        listed = ckpt.list_checkpoints(str(root))
        assert listed, n  # the previous checkpoint is never lost
        for step, path in listed:  # every listed one is complete
            _loads_as(path, states)
        latest = ckpt.latest_checkpoint(str(root))
        assert latest == listed[-1][1]
        seen.append((listed[-1][0], _loads_as(latest, states)))
        assert seen[-1] in ((1, 0), (new_step, 1)), (n, seen[-1])
        # the next save works and removes what the killed one left
        _save(root, 3, states[0], keep=1)
        assert os.listdir(root) == ["step_00000003"], (n, os.listdir(root))
        fresh()
    assert len(seen) >= 8, seen
    assert seen[0] == (1, 0) and seen[-1] == (new_step, 1)
    assert [s for s, _ in ckpt.list_checkpoints(str(root))] == [new_step]


def test_failed_final_rename_keeps_the_previous_checkpoints(tmp_path, states, monkeypatch, exchange):
    root = tmp_path / "ck"
    _save(root, 1, states[0])
    before = {f: (root / "step_00000001" / f).read_bytes() for f in os.listdir(root / "step_00000001")}
    for step in (2, 1):  # a new step, and an overwrite of step 1
        target = os.path.abspath(root / f"step_{step:08d}")

        def guard(real):
            def fn(src, dst, *a, **k):
                if os.path.abspath(dst) == target:
                    raise OSError(errno.EIO, "simulated failure of the final rename", dst)
                return real(src, dst, *a, **k)
            return fn

        with monkeypatch.context() as m:
            m.setattr(os, "rename", guard(os.rename))
            m.setattr(os, "replace", guard(os.replace))
            real_exchange = fileio._rename_exchange

            def failing_exchange(a, b):
                if target in (os.path.abspath(a), os.path.abspath(b)):
                    raise OSError(errno.EIO, "simulated failure of the final exchange", b)
                return real_exchange(a, b)

            m.setattr(fileio, "_rename_exchange", failing_exchange)
            with pytest.raises(OSError, match="simulated failure of the final"):
                _save(root, step, states[1], keep=1)
        assert os.listdir(root) == ["step_00000001"], os.listdir(root)
        assert {f: (root / "step_00000001" / f).read_bytes() for f in os.listdir(root / "step_00000001")} == before
        assert _loads_as(ckpt.latest_checkpoint(str(root)), states) == 0


def test_checkpoint_files_get_the_default_mode(tmp_path, states):
    mask = os.umask(0o022)
    os.umask(mask)
    path = _save(tmp_path, 1, states[0])
    for f in os.listdir(path):
        assert os.stat(os.path.join(path, f)).st_mode & 0o777 == 0o666 & ~mask, f
