"""The language model under torch.compile(fullgraph=True): one graph (no data-dependent breaks from the token-id
check or the convolution's reset test), the same outputs, final state and gradients as eager mode, with packed
documents (resets) and a carried state. What `fastxlstm train --compile` runs. About a minute on 2 CPU cores."""
from __future__ import annotations

import torch

from fastxlstm.models.presets import build_model


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _flat(state):
    ts = []
    state.map(lambda t: ts.append(t.reshape(-1).float()) or t)
    return torch.cat(ts)


def test_lm_fullgraph_compile_matches_eager():
    torch.manual_seed(0)
    model = build_model("tiny")  # one mLSTM and one sLSTM block
    with torch.no_grad():
        for p in model.parameters():  # every parameter random (zeros would hide a missing term)
            p.add_(0.05 * torch.randn_like(p))
    B, S = 2, 37
    ids = torch.randint(0, 256, (B, S))
    resets = torch.rand(B, S) < 0.1
    resets[0, 5] = True
    state = model(torch.randint(0, 256, (B, 9))).state.detach()  # a carried state (mLSTM, sLSTM, conv windows)

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(ids, state=state, resets=resets)
        loss = out.logits.float().logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out, grads

    eager_out, eager_grads = run(model)
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    comp_out, comp_grads = run(compiled)
    assert _rel(comp_out.logits, eager_out.logits) < 1e-5
    assert _rel(_flat(comp_out.state), _flat(eager_out.state)) < 1e-5
    worst = max(_rel(comp_grads[n], g) for n, g in eager_grads.items() if g.norm() > 0)
    assert worst < 1e-4, worst
