"""fastxlstm.train.graphs.GraphedStep off CUDA (the plain step it replays on a GPU: same gradient semantics),
its argument checks, the trainer's --cuda-graph switch, and the value checks that a capture must skip.
The capture itself is tested on the GPU: tests/gpu/test_training_graph_gpu.py."""
from __future__ import annotations

import pytest
import torch

from fastxlstm.cli import main
from fastxlstm.models.presets import build_model
from fastxlstm.ops._checks import values_readable
from fastxlstm.train.config import TrainConfig
from fastxlstm.train.graphs import GraphedStep
from helpers import rel_err
from train_helpers import fast_args, read_metrics, write_corpus


def _model():
    torch.manual_seed(0)
    m = build_model("tiny", vocab_size=64, embedding_dim=32, num_blocks=2, slstm_at=(1,)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _loss(m):
    return lambda ids, resets, labels: m(ids, resets=resets, labels=labels, return_state=False,
                                         loss_reduction="sum").loss


def _batch(seed, B=2, S=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, S), generator=g)
    labels = torch.randint(0, 64, (B, S), generator=g)
    labels[0, :3] = -100
    resets = torch.rand(B, S, generator=g) < 0.2
    return ids, resets, labels


def _reference_grads(m, batches_scales):
    m.zero_grad(set_to_none=True)
    for (ids, resets, labels), scale in batches_scales:
        (_loss(m)(ids, resets, labels) * scale).backward()
    out = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return out


def test_replace_mode_gives_the_last_calls_gradient():
    m = _model()
    ref = _reference_grads(m, [(_batch(2), 0.5)])
    step = GraphedStep(m, _loss(m))
    step(*_batch(1), scale=3.0)                     # its gradient must not survive the next call
    loss = step(*_batch(2), scale=0.5)
    assert loss.shape == () and not loss.requires_grad
    assert abs(float(loss) - float(_loss(m)(*_batch(2)).detach())) < 1e-9
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    assert max(rel_err(got[n], ref[n]) for n in ref) < 1e-12


def test_accumulate_mode_adds_to_the_gradients_and_none_counts_as_zero():
    m = _model()
    b1, b2 = _batch(3), _batch(4)
    ref = _reference_grads(m, [(b1, 0.25), (b2, 2.0)])
    step = GraphedStep(m, _loss(m), accumulate=True)
    m.zero_grad(set_to_none=True)
    step(*b1, scale=0.25)
    step(*b2, scale=2.0)
    assert max(rel_err(p.grad, ref[n]) for n, p in m.named_parameters() if n in ref) < 1e-12
    m.zero_grad(set_to_none=True)                   # set to None between optimizer steps: starts from zero again
    step(*b1, scale=0.25)
    step(*b2, scale=2.0)
    assert max(rel_err(p.grad, ref[n]) for n, p in m.named_parameters() if n in ref) < 1e-12


def test_arguments_are_checked():
    m = _model()
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(m, _loss(m), warmup=0)
    with pytest.raises(TypeError, match="callable"):
        GraphedStep(m, "loss")
    step = GraphedStep(m, _loss(m))
    with pytest.raises(TypeError, match="input 1 must be a tensor or None"):
        step(_batch(0)[0], [1, 2], _batch(0)[2])
    bad = GraphedStep(m, lambda ids: m(ids, return_state=False).logits)
    with pytest.raises(ValueError, match="one-element tensor"):
        bad(_batch(0)[0])
    seen = []
    checked = GraphedStep(m, _loss(m), check=lambda *xs: seen.append(len(xs)))
    checked(*_batch(0))
    assert seen == [3]


def test_values_readable_outside_and_not_inside_compile():
    x = torch.ones(3)
    assert values_readable(x)
    f = torch.compile(lambda t: t + (1.0 if values_readable(t) else 2.0), backend="eager", fullgraph=True)
    assert torch.equal(f(x), torch.full((3,), 3.0))


def test_trainer_cuda_graph_switch(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph must be true, false or none"):
        TrainConfig(cuda_graph="yes")
    corpus = write_corpus(tmp_path / "corpus")
    # asked for explicitly where it cannot run: a clear one-line error (exit code 2), no run directory left behind
    out = tmp_path / "run"
    assert main(fast_args(corpus, str(out), steps=2, device="cpu", cuda_graph=True)) == 2
    assert not out.exists()
    # off explicitly: trains as before
    assert main(fast_args(corpus, str(tmp_path / "run2"), steps=2, device="cpu", no_cuda_graph=True)) == 0
    assert len([r for r in read_metrics(tmp_path / "run2") if r["split"] == "train"]) == 2
