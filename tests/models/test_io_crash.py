"""save_pretrained killed for real at every step (a forked child calls os._exit), and a final rename that fails:
the target always loads as the complete old or the complete new checkpoint, and the next save cleans up."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

import fastxlstm._fileio as fileio
from crash_helpers import every_crash_point, exchange_fixture, leftovers, same_state
from fastxlstm.models.io import from_pretrained, save_pretrained
from fastxlstm.models.xlstm_large import XLSTMLarge, XLSTMLargeConfig
from fastxlstm.models.xlstm_lm import XLSTMLM, XLSTMLMConfig

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # 'reading the complete copy' of a killed save


def _model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "large":  # transformers-compatible sizes (hidden_size * factors multiples of 64)
        m = XLSTMLarge(XLSTMLargeConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_heads=2,
                                        qk_dim_factor=1.0, chunk_size=8, ffn_proj_factor=1.5,
                                        ffn_round_up_to_multiple_of=16, pad_token_id=None, bos_token_id=None,
                                        eos_token_id=None))
    else:
        m = XLSTMLM(XLSTMLMConfig(vocab_size=40, embedding_dim=32, num_blocks=2, slstm_at=(1,), chunk_size=8))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _which(directory, old, new) -> str:
    """'old' or 'new': the loaded model must be exactly one of them."""
    loaded = from_pretrained(directory)
    sd = loaded.state_dict()
    for name, ref in (("old", old), ("new", new)):
        if same_state(sd, ref.state_dict()):
            return name
    raise AssertionError(f"{directory} loads as neither the old nor the new model")


exchange = exchange_fixture()


def _three_shards(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) // 3 + 1


@pytest.mark.parametrize("kind", ["large", "paper"])
def test_killed_overwrite_always_leaves_a_complete_checkpoint(tmp_path, tmp_path_factory, exchange, kind):
    old, new, newer = _model(kind, 1), _model(kind, 2), _model(kind, 3)
    shard = _three_shards(old) if kind == "large" else "2GB"  # sharded + index, or one file
    target = tmp_path / "ck"
    pristine = tmp_path_factory.mktemp("pristine") / "ck"
    save_pretrained(old, pristine, max_shard_size=shard)
    (pristine / "tokenizer.json").write_text('{"kept": true}')

    def fresh_old():
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        shutil.copytree(pristine, target)

    fresh_old()
    assert len(os.listdir(target)) >= (6 if kind == "large" else 3)
    seen = []
    for n in every_crash_point(lambda: save_pretrained(new, target, max_shard_size=shard)):
        which = _which(target, old, new)  # never absent, never half-written, never a mix
        seen.append(which)
        # the next save repairs and cleans up whatever the killed one left
        save_pretrained(newer, target, max_shard_size=shard)
        assert os.listdir(tmp_path) == ["ck"], (n, os.listdir(tmp_path))
        assert _which(target, newer, new) == "old"  # 'old' here means newer
        assert (target / "tokenizer.json").read_text() == '{"kept": true}'
        fresh_old()
    assert len(seen) >= 8, seen  # every file write, rename and delete was a crash point
    assert seen[0] == "old" and seen[-1] == "new" and seen == sorted(seen, key=["old", "new"].index), seen
    assert os.listdir(tmp_path) == ["ck"] and _which(target, old, new) == "new"  # the uncrashed save


def test_killed_first_save_leaves_nothing_or_the_new_checkpoint(tmp_path, exchange):
    new = _model("paper", 2)
    target = tmp_path / "ck"
    for n in every_crash_point(lambda: save_pretrained(new, target)):
        if target.exists():
            assert _which(target, new, new) == "old"
        else:
            with pytest.raises(ValueError, match="not a directory"):
                from_pretrained(target)
        save_pretrained(new, target)
        assert os.listdir(tmp_path) == ["ck"]
        shutil.rmtree(target)
    assert os.listdir(tmp_path) == ["ck"]


def _fail_final_rename(monkeypatch, target):
    """Every rename onto ``target`` fails (os.rename, os.replace and the atomic exchange)."""
    target = os.path.abspath(target)

    def guard(real):
        def fn(src, dst, *a, **k):
            if os.path.abspath(dst) == target:
                raise OSError(errno.EIO, "simulated failure of the final rename", dst)
            return real(src, dst, *a, **k)
        return fn

    monkeypatch.setattr(os, "rename", guard(os.rename))
    monkeypatch.setattr(os, "replace", guard(os.replace))
    real_exchange = fileio._rename_exchange

    def exchange(a, b):
        if os.path.abspath(b) == target or os.path.abspath(a) == target:
            raise OSError(errno.EIO, "simulated failure of the final exchange", b)
        return real_exchange(a, b)

    monkeypatch.setattr(fileio, "_rename_exchange", exchange)


def test_failed_final_rename_keeps_the_old_checkpoint(tmp_path, monkeypatch, exchange):
    old, new = _model("large", 1), _model("large", 2)
    target = tmp_path / "ck"
    save_pretrained(old, target, max_shard_size=_three_shards(old))
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    _fail_final_rename(monkeypatch, target)
    with pytest.raises(OSError, match="simulated failure of the final"):
        save_pretrained(new, target)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ck"]  # no temporary or old copy left behind
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert _which(target, old, new) == "old"


def test_interrupted_fallback_is_read_and_repaired(tmp_path):
    """The state the two-rename fallback leaves when killed between its renames (target renamed aside, the
    complete new copy still under its temporary name): from_pretrained reads the new copy, with a warning, and
    the next save puts things in place and removes the rest."""
    old, new = _model("paper", 1), _model("paper", 2)
    target = tmp_path / "ck"
    save_pretrained(old, target)
    save_pretrained(new, tmp_path / "staging")
    tmp = fileio.make_temp_dir(str(target))
    os.rmdir(tmp)
    os.rename(tmp_path / "staging", tmp)
    os.rename(target, tmp.replace(".ck.tmp-", ".ck.old-"))  # what a kill right after the first rename leaves
    assert not target.exists() and len(leftovers(tmp_path)) == 2
    with pytest.warns(UserWarning, match="interrupted"):
        assert _which(target, old, new) == "new"
    assert len(leftovers(tmp_path)) == 2  # reading changes nothing on disk
    save_pretrained(old, target)
    assert os.listdir(tmp_path) == ["ck"] and _which(target, old, new) == "old"


def test_checkpoint_files_get_the_default_mode(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    m = _model("large", 1)
    m.save_pretrained(tmp_path / "ck", max_shard_size=_three_shards(m))
    for f in os.listdir(tmp_path / "ck"):
        assert os.stat(tmp_path / "ck" / f).st_mode & 0o777 == 0o666 & ~mask, f
    assert os.stat(tmp_path / "ck").st_mode & 0o777 == 0o777 & ~mask


def test_one_checkpoint_error_class(tmp_path):
    import fastxlstm.models.io as io_mod
    import fastxlstm.train.checkpoint as train_ckpt
    assert io_mod.CheckpointError is train_ckpt.CheckpointError is fileio.CheckpointError
    assert issubclass(fileio.CheckpointError, ValueError)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    with pytest.raises(train_ckpt.CheckpointError, match=r"config.json: not valid JSON \(model config"):
        from_pretrained(tmp_path / "bad")
