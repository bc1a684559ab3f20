"""`fastxlstm train --fast-path` (the default on CUDA): compiled blocks and the chunked loss give the same
training as the eager path (CPU here, tiny model, a few steps)."""
import json
import os

import pytest

from fastxlstm.train import TrainConfig
from fastxlstm.train.trainer import train


def _metrics(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r and r.get("kind", "train") == "train"]


@pytest.mark.slow
def test_fast_path_matches_eager(tmp_path):
    base = dict(preset="tiny", steps=3, batch_size=2, seq_len=32, eval_every=0, eval_windows=2, log_every=1,
                save_every=0, sample_tokens=0, progress=False, device="cpu", threads=1)
    outs = {}
    for fast in (False, True):
        out = str(tmp_path / f"fast{fast}")
        train(TrainConfig(out=out, fast_path=fast, activation_checkpointing=fast, **base))
        outs[fast] = _metrics(out)
    a, b = outs[False], outs[True]
    assert len(a) == len(b) >= 3
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * abs(ra["loss"]), (ra, rb)


def test_fast_path_flag_validated():
    with pytest.raises(ValueError, match="fast-path"):
        TrainConfig(fast_path="yes")
