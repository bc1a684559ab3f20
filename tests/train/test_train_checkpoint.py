"""Checkpoints: exact resume (N + resume + N == 2N), Ctrl-C saves, NaN stops and keeps the last good checkpoint,
corrupt checkpoints give a clear error, writes are atomic and contain no pickle."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastxlstm
import fastxlstm.train.trainer as trainer_mod
from fastxlstm.cli import main
from fastxlstm.train import checkpoint as ckpt
from train_helpers import fast_args, read_metrics, write_corpus

STEPS = 6


def _curve(run):
    """Every logged number that must not depend on interruptions (timings excluded)."""
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")} for r in read_metrics(run)]


def _final_weights(run):
    return load_file(os.path.join(run, "model", "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref") / "run")
    assert main(fast_args(corpus, run, steps=STEPS, eval_every=2, grad_accum=2, threads=1)) == 0
    return run


def test_resume_gives_the_same_curve(corpus, reference_run, tmp_path):
    run = str(tmp_path / "run")
    assert main(fast_args(corpus, run, steps=STEPS, eval_every=2, grad_accum=2, threads=1, stop_at=STEPS // 2)) == 3
    assert [s for s, _ in ckpt.list_checkpoints(os.path.join(run, "checkpoints"))] == [STEPS // 2]
    assert not os.path.exists(os.path.join(run, "model"))
    assert main(fast_args(corpus, run, steps=STEPS, eval_every=2, grad_accum=2, threads=1, resume=True)) == 0
    assert _curve(run) == _curve(reference_run)  # bit-identical losses, grad norms, lrs, held-out bpb
    a, b = _final_weights(run), _final_weights(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Run in a child process: the signal goes to the process that trains, never to pytest (or an xdist worker) itself.
_INTERRUPTED_CHILD = r"""
import json, os, signal, sys
import fastxlstm
import fastxlstm.train.trainer as trainer_mod
from fastxlstm.cli import _train_config, build_parser
args, sig = json.loads(sys.argv[1]), getattr(signal, sys.argv[2])
cfg = _train_config(build_parser().parse_args(args))
old = signal.getsignal(sig)

def interrupt(step, rec):
    if step == 2:
        os.kill(os.getpid(), sig)

summary = trainer_mod.train(cfg, step_callback=interrupt)
print(json.dumps({"stopped": summary["stopped"], "steps": summary["steps"],
                  "handler_restored": signal.getsignal(sig) is old}))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(corpus, reference_run, tmp_path, sig):
    run = str(tmp_path / "run")
    src = os.path.dirname(os.path.dirname(os.path.abspath(fastxlstm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_CHILD,
                           json.dumps(fast_args(corpus, run, steps=STEPS, eval_every=2, grad_accum=2, threads=1)), sig,
                           str(torch.get_num_threads())],
                          env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["stopped"] == "interrupted" and summary["steps"] == 2
    assert summary["handler_restored"]  # the handler is put back
    assert [s for s, _ in ckpt.list_checkpoints(os.path.join(run, "checkpoints"))] == [2]
    assert main(fast_args(corpus, run, steps=STEPS, eval_every=2, grad_accum=2, threads=1, resume=True)) == 0
    assert _curve(run) == _curve(reference_run)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    real = trainer_mod.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets, mask):
        out = real(logits, targets, mask)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= 3:  # the third training step
                return out * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "lm_loss", poisoned)
    run = str(tmp_path / "run")
    rc = main(fast_args(corpus, run, steps=5, save_every=2))
    err = capsys.readouterr().err
    assert rc == 1
    assert "became nan at step 3" in err and "step_00000002" in err and "Traceback" not in err
    assert [s for s, _ in ckpt.list_checkpoints(os.path.join(run, "checkpoints"))] == [2]
    ckpt.verify_checkpoint(os.path.join(run, "checkpoints", "step_00000002"))
    assert not os.path.exists(os.path.join(run, "model"))


@pytest.fixture(scope="module")
def one_checkpoint(corpus, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ck") / "run")
    assert main(fast_args(corpus, run, steps=3, stop_at=1)) == 3
    return run


def _corrupt_truncate(d):
    p = os.path.join(d, "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _corrupt_flip(d):
    p = os.path.join(d, "optimizer.safetensors")
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) - 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _corrupt_json(d):
    with open(os.path.join(d, "trainer_state.json"), "w") as f:
        f.write("{not json")


def _corrupt_missing(d):
    os.remove(os.path.join(d, "rng.safetensors"))


@pytest.mark.parametrize("corrupt,needle", [(_corrupt_truncate, "corrupt"), (_corrupt_flip, "sha256"),
                                            (_corrupt_json, "not valid JSON"), (_corrupt_missing, "missing")],
                         ids=["truncated", "bitflip", "bad-json", "missing-file"])
def test_corrupt_checkpoint_gives_clear_error(one_checkpoint, corpus, tmp_path, capsys, corrupt, needle):
    run = str(tmp_path / "run")
    shutil.copytree(one_checkpoint, run, symlinks=True)
    d = os.path.join(run, "checkpoints", "step_00000001")
    corrupt(d)
    with pytest.raises(ckpt.CheckpointError, match=needle):
        ckpt.load_checkpoint(d)
    capsys.readouterr()
    rc = main(fast_args(corpus, run, steps=3, resume=True))
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert main(["generate", "--model", d, "--prompt", "x", "--max-new-tokens", "2"]) == 2


def test_checkpoint_files_are_safetensors_and_json_only(one_checkpoint):
    d = os.path.join(one_checkpoint, "checkpoints", "step_00000001")
    assert sorted(os.listdir(d)) == ["model.safetensors", "model_config.json", "optimizer.safetensors",
                                     "rng.safetensors", "trainer_state.json"]
    for fn in os.listdir(d):
        with open(os.path.join(d, fn), "rb") as f:
            assert not f.read(2).startswith(b"\x80"), f"{fn} looks like a pickle"
    model_sd, optim_sd, rng, state, mcfg = ckpt.load_checkpoint(d)
    assert state["step"] == 1 and state["position"] == 2  # one step of a global batch of 2 windows
    assert set(optim_sd["state"]) == set(n for n in model_sd)  # AdamW state for every parameter, by name
    assert all(set(v) == {"step", "exp_avg", "exp_avg_sq"} for v in optim_sd["state"].values())


def test_failed_save_leaves_previous_checkpoint(one_checkpoint, tmp_path, monkeypatch):
    root = str(tmp_path / "ck")
    shutil.copytree(os.path.join(one_checkpoint, "checkpoints"), root)
    model_sd, optim_sd, _, state, mcfg = ckpt.load_checkpoint(os.path.join(root, "step_00000001"))
    real = ckpt._save_tensors
    n = {"k": 0}

    def failing(path, tensors):
        n["k"] += 1
        if n["k"] == 2:
            raise OSError("disk full")
        return real(path, tensors)

    monkeypatch.setattr(ckpt, "_save_tensors", failing)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 2, model_sd, optim_sd, mcfg, {"position": 4})
    assert sorted(os.listdir(root)) == ["step_00000001"]  # no half-written step_2, no temp dir left
    ckpt.verify_checkpoint(os.path.join(root, "step_00000001"))


def test_tied_weights_round_trip(tmp_path):
    """Tied embeddings share storage; checkpoints store them once and restore both names."""
    from fastxlstm.models.presets import build_model
    m = build_model("tiny", tie_weights=True)
    sd = m.state_dict()
    path = ckpt.save_checkpoint(str(tmp_path), 1, sd, None, {"config": m.config.to_dict()}, {"position": 0})
    loaded, _, _, state, _ = ckpt.load_checkpoint(path)
    assert state["aliases"] == {"lm_head.weight": "token_embedding.weight"}
    assert torch.equal(loaded["lm_head.weight"], sd["token_embedding.weight"])


def test_lr_schedule():
    from fastxlstm.train.config import TrainConfig
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [trainer_mod.lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert trainer_mod.lr_at(110, cfg) == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + __import__("math").cos(__import__("math").pi * 0.5)))


def test_weight_decay_groups():
    from fastxlstm.models.presets import build_model
    m = build_model("tiny")
    groups = trainer_mod.optimizer_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and plain and not decayed & plain
    assert all(not any(s in n for s in ("norm", "bias", "skip", "recurrent_kernel", "token_embedding"))
               for n in decayed), decayed
    assert any("recurrent_kernel" in n for n in plain) and any("learnable_skip" in n for n in plain)
