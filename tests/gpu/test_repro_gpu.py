"""`fastxlstm repro TASK` on a CUDA GPU with a few steps: the CUDA path of every experiment (bf16 autocast, Triton
cells via backend="auto", compiled blocks and the chunked loss for lm, the transformers Llama) runs end to end and
records what it did. Run this before the full runs: pytest -q -p no:xdist tests/gpu/test_repro_gpu.py (~1-2 min,
most of it lm's compilation)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fastxlstm.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("transformers")


def _results(out):
    return json.load(open(os.path.join(out, "results.json")))


def test_parity_cuda(tmp_path):
    out = str(tmp_path / "p")
    assert main(["repro", "parity", "--device", "cuda", "--steps", "30", "--seeds", "0", "--out", out,
                 "--no-progress"]) == 0
    res = _results(out)
    assert set(res["models"]) == {"xlstm-0-1", "xlstm-1-1", "xlstm-1-0", "llama"}
    assert res["hardware"][0]["gpu"]
    for r in res["models"].values():
        assert r["precision"] == "bf16"
        assert all(math.isfinite(run["final_loss"]) for run in r["runs"])


def test_mqar_cuda(tmp_path):
    out = str(tmp_path / "m")
    assert main(["repro", "mqar", "--device", "cuda", "--steps", "30", "--settings", "256x16", "--widths", "64",
                 "--out", out, "--no-progress"]) == 0
    res = _results(out)
    assert set(res["models"]) == {"xlstm-1-0", "xlstm-1-1", "llama"}


def test_lm_cuda_compiled(tmp_path):
    out = str(tmp_path / "l")
    assert main(["repro", "lm", "--device", "cuda", "--steps", "30", "--width", "128", "--blocks", "4",
                 "--out", out, "--no-progress"]) == 0
    res = _results(out)
    for name, r in res["models"].items():
        run = r["runs"][0]
        assert run["compiled"], (name, run.get("compile_error"))
        assert run["curve"][-1]["bpb"] < run["curve"][0]["bpb"], name
