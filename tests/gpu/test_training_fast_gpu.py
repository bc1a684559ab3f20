"""The training fast path on a CUDA GPU (Triton cells, Inductor-compiled blocks, chunked loss, checkpointing)
against the eager path, bf16 autocast, small models of both architectures (sLSTM blocks included).

Run on the device machine: pytest -q tests/gpu/test_training_fast_gpu.py (skipped without CUDA; ~1-2 min, most of
it compilation).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastxlstm.models.presets import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,overrides", [
    ("tiny", dict(vocab_size=512, embedding_dim=128, num_blocks=3, slstm_at=(1,), chunk_size=64)),
    ("7b-tiny", dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_heads=2)),
])
def test_fast_path_matches_eager_bf16(name, overrides):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(name, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 300), device="cuda")
    labels = torch.randint(0, V, (2, 300), device="cuda")

    def run(fast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fast:
                loss = model(ids, labels=labels, return_state=False).loss
            else:
                logits = model(ids, return_state=False).logits
                loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l0, g0 = run(False)
    model.compile_blocks()
    l1, g1 = run(True)
    model.set_activation_checkpointing(True)
    l2, g2 = run(True)
    for loss, grads in ((l1, g1), (l2, g2)):
        assert torch.isfinite(loss) and _rel(loss, l0) < 1e-3
        errs = sorted(_rel(grads[n], g) for n, g in g0.items() if g.norm() > 0)
        assert errs[len(errs) // 2] < 3e-2 and errs[-1] < 1.5e-1, errs[-5:]  # bf16 everywhere
    # checkpointing recomputes the same compiled blocks: equal to the fast path without it
    assert _rel(l2, l1) < 1e-6
