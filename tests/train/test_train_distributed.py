"""torchrun with 2 CPU processes (gloo): one DDP step and one FSDP2 step equal the single-process step on the
same global batch, and a 2-process checkpoint resumes in 1 process onto the single-process curve."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastxlstm.cli import main
from train_helpers import fast_args, read_metrics, write_corpus


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1")
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastxlstm", *args, "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _assert_close(a, b, atol, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# Weights after an AdamW step: the update lr * g / (|g| + eps) amplifies float reduction-order differences of
# near-zero gradients (|g| ~ eps = 1e-8) up to a fraction of lr (0.01 here), so weights are compared to 3% of lr.
# The gradients themselves are compared tightly through AdamW's first moment (exp_avg = 0.1 g after one step).
W_ATOL = 3e-4


def test_ddp_and_fsdp_match_single_process(tmp_path):
    data = write_corpus(tmp_path / "corpus")
    # global batch 4 windows: 1 process x 4, or 2 processes x 2
    single = str(tmp_path / "single")
    assert main(fast_args(data, single, steps=2, batch_size=4, save_every=1, keep_checkpoints=5)) == 0
    ddp = str(tmp_path / "ddp")
    _torchrun(fast_args(data, ddp, steps=2, batch_size=2, stop_at=1), tmp_path)
    fsdp = str(tmp_path / "fsdp")
    _torchrun(fast_args(data, fsdp, steps=2, batch_size=2, stop_at=1) + ["--fsdp"], tmp_path)

    step1 = _weights(os.path.join(single, "checkpoints", "step_00000001"))
    for run in (ddp, fsdp):
        w = _weights(os.path.join(run, "checkpoints", "step_00000001"))
        _assert_close(w, step1, atol=W_ATOL)
        opt = load_file(os.path.join(run, "checkpoints", "step_00000001", "optimizer.safetensors"))
        ref = load_file(os.path.join(single, "checkpoints", "step_00000001", "optimizer.safetensors"))
        grads = {k: v for k, v in opt.items() if k.endswith("/exp_avg")}
        assert len(grads) == len(w)
        _assert_close(grads, {k: ref[k] for k in grads}, atol=1e-9, rtol=1e-4)
        m_single = [r for r in read_metrics(single) if r["split"] == "train" and r["step"] == 1][0]
        m_run = [r for r in read_metrics(run) if r["split"] == "train" and r["step"] == 1][0]
        assert m_run["loss"] == pytest.approx(m_single["loss"], rel=1e-6)
        assert m_run["grad_norm"] == pytest.approx(m_single["grad_norm"], rel=1e-5)

    # the 2-process checkpoint resumes in one process and continues the single-process curve: step 2's loss is
    # computed from the resumed weights on the next global batch (the data position counts windows, not steps
    # per process); its gradient norm also reflects the restored optimizer-free part of the state
    assert main(fast_args(data, ddp, steps=2, batch_size=4, resume=True)) == 0
    s2 = [r for r in read_metrics(single) if r["split"] == "train" and r["step"] == 2][0]
    d2 = [r for r in read_metrics(ddp) if r["split"] == "train" and r["step"] == 2][0]
    assert d2["loss"] == pytest.approx(s2["loss"], rel=1e-5)
    assert d2["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-3)
    opt_r = load_file(os.path.join(ddp, "checkpoints", "step_00000002", "optimizer.safetensors"))
    opt_s = load_file(os.path.join(single, "checkpoints", "step_00000002", "optimizer.safetensors"))
    steps = [k for k in opt_r if k.endswith("/step")]
    assert steps and all(float(opt_r[k]) == 2.0 == float(opt_s[k]) for k in steps)  # AdamW state carried over
    _assert_close(_weights(os.path.join(ddp, "model")), _weights(os.path.join(single, "model")), atol=1e-2)
