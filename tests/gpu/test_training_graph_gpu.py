"""The training step captured as a CUDA graph (fastxlstm.train.graphs.GraphedStep) against the same compiled step
run plainly: losses, gradients and the weights after AdamW steps, both architectures (sLSTM blocks included),
resets, gradient accumulation, activation checkpointing, a new shape (re-capture), and the trainer end to end.

Run on the device machine: pytest -q tests/gpu/test_training_graph_gpu.py (skipped without CUDA; ~2 min, most of it
compilation).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fastxlstm.cli import main
from fastxlstm.models.presets import build_model
from fastxlstm.train.graphs import GraphedStep
from helpers import rel_err

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
from train_helpers import fast_args, write_corpus  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIGS = [
    ("tiny", dict(vocab_size=512, embedding_dim=128, num_blocks=3, slstm_at=(1,), chunk_size=64)),
    ("7b-tiny", dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_heads=2)),
]


def _model(name, overrides, ckpt=False):
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = build_model(name, **overrides)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m.train()
    m.compile_blocks()
    m.set_activation_checkpointing(ckpt)
    return m


def _batches(V, n, B=2, S=300, seed=0, resets=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (B, S), generator=g)
        labels = torch.randint(0, V, (B, S), generator=g)
        labels[0, :5] = -100
        r = (torch.rand(B, S, generator=g) < 0.01) if resets else None
        out.append(tuple(None if t is None else t.cuda() for t in (ids, r, labels)))
    return out


def _loss_fn(m):
    return lambda ids, resets, labels: m(ids, resets=resets, labels=labels, return_state=False,
                                         loss_reduction="sum").loss


def _train(m, batches, graphed, accum):
    """AdamW steps over ``batches`` (``accum`` micro-batches per step); returns the losses, the first step's
    gradients and the final weights."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    step = GraphedStep(m, _loss_fn(m), accumulate=accum > 1, autocast_dtype=torch.bfloat16) if graphed else None
    losses, first = [], None
    for i in range(0, len(batches), accum):
        for ids, resets, labels in batches[i:i + accum]:
            if graphed:
                loss = step(ids, resets, labels, scale=1.0 / accum)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = _loss_fn(m)(ids, resets, labels)
                (loss.float() / accum).backward()
            losses.append(float(loss))
        if first is None:
            first = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, first, {n: p.detach().clone() for n, p in m.named_parameters()}, step


@pytest.mark.parametrize("name,overrides", CONFIGS)
@pytest.mark.parametrize("accum,resets,ckpt", [(1, False, False), (2, True, False), (1, True, True)])
def test_graphed_step_equals_the_plain_step(name, overrides, accum, resets, ckpt):
    V = overrides["vocab_size"]
    batches = _batches(V, 3 * accum, resets=resets)
    l0, g0, w0, _ = _train(_model(name, overrides, ckpt), batches, graphed=False, accum=accum)
    l1, g1, w1, step = _train(_model(name, overrides, ckpt), batches, graphed=True, accum=accum)
    assert step.captures == 1
    assert all(torch.isfinite(torch.tensor(l1)))
    # the graph replays the same kernels: equal up to the order of floating-point work (bitwise in practice)
    assert max(abs(a - b) / abs(b) for a, b in zip(l1, l0)) < 1e-5, (l1, l0)
    assert g1.keys() == g0.keys()
    assert max(rel_err(g1[n], g0[n]) for n in g0 if g0[n].norm() > 0) < 1e-4
    assert max(rel_err(w1[n], w0[n]) for n in w0) < 1e-5


def test_new_shape_recaptures_and_stays_exact():
    name, overrides = CONFIGS[1]
    V = overrides["vocab_size"]
    m0, m1 = _model(name, overrides), _model(name, overrides)
    step = GraphedStep(m1, _loss_fn(m1), autocast_dtype=torch.bfloat16)
    for S, seed in ((300, 1), (77, 2), (300, 3)):
        ids, _, labels = _batches(V, 1, S=S, seed=seed)[0]
        loss = step(ids, None, labels)
        got = {n: p.grad.clone() for n, p in m1.named_parameters()}
        m0.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = _loss_fn(m0)(ids, None, labels)
        ref.float().backward()
        assert abs(float(loss) - float(ref)) / abs(float(ref)) < 1e-5
        assert max(rel_err(got[n], p.grad) for n, p in m0.named_parameters() if p.grad.norm() > 0) < 1e-4
    assert step.captures == 3


def test_trainer_with_and_without_the_graph(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    curves = []
    for flag in ("cuda_graph", "no_cuda_graph"):
        out = tmp_path / flag
        args = fast_args(corpus, str(out), steps=4, device="cuda", precision="bf16", grad_accum=2,
                         **{flag: True})
        assert main(args) == 0
        with open(out / "metrics.jsonl") as f:
            curves.append([json.loads(x)["loss"] for x in f if '"train"' in x])
    assert len(curves[0]) == 4
    assert max(abs(a - b) / abs(b) for a, b in zip(*curves)) < 1e-4, curves
