"""The experiments' generators and model builders: parity labels, MQAR targets and masks, the Llama baseline's
parameter matching, the xLSTM[a:b] block mixes."""
from __future__ import annotations

import argparse

import pytest
import torch

from fastxlstm.experiments import _common as C
from fastxlstm.experiments import lm, mqar, parity


def test_parity_labels_are_prefix_parities_and_padding_is_masked():
    gen = torch.Generator().manual_seed(3)
    bits, labels, n = parity.parity_batch(gen, 64, (3, 40))
    assert bits.shape == labels.shape and bits.shape[0] == 64
    assert int(n.min()) >= 3 and int(n.max()) <= 40 and bits.shape[1] == int(n.max())
    assert len(set(n.tolist())) > 10                       # lengths really vary
    for b in range(64):
        L = int(n[b])
        seq = bits[b, :L].tolist()
        assert set(seq) <= {0, 1}
        want = [sum(seq[:t + 1]) % 2 for t in range(L)]
        assert labels[b, :L].tolist() == want
        assert (labels[b, L:] == -100).all() and (bits[b, L:] == 0).all()
    # the label at the last position is the parity of the whole sequence, and both classes occur
    last = labels[torch.arange(64), n - 1]
    assert torch.equal(last, bits.sum(1) % 2)
    assert 10 < int(last.sum()) < 54


def test_parity_eval_set_is_fixed_per_seed():
    a = parity.parity_batch(torch.Generator().manual_seed(1_000_003), 8, (64, 127))
    b = parity.parity_batch(torch.Generator().manual_seed(1_000_003), 8, (64, 127))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("seq_len,pairs,vocab", [(64, 8, 64), (256, 16, 8192), (33, 8, 40)])
def test_mqar_targets_are_the_stored_values_at_the_query_positions(seq_len, pairs, vocab):
    gen = torch.Generator().manual_seed(0)
    x, y = mqar.mqar_batch(gen, 16, seq_len, pairs, vocab)
    assert x.shape == y.shape == (16, seq_len)
    half = vocab // 2
    for b in range(16):
        keys, vals = x[b, 0:2 * pairs:2].tolist(), x[b, 1:2 * pairs:2].tolist()
        assert len(set(keys)) == pairs and all(1 <= k < half for k in keys)
        assert len(set(vals)) == pairs and all(half <= v < vocab for v in vals)
        store = dict(zip(keys, vals))
        q = (y[b] != -100).nonzero().flatten().tolist()
        assert len(q) == pairs                                    # every key is queried once
        assert all(p >= 2 * pairs and p % 2 == 0 for p in q)
        assert sorted(x[b, q].tolist()) == sorted(keys)
        for p in q:
            assert int(y[b, p]) == store[int(x[b, p])]           # target = the value stored with the key
            assert int(x[b, p + 1]) == int(y[b, p])              # the value follows the query in the input
        rest = [t for t in range(2 * pairs, seq_len) if t not in q and t - 1 not in q]
        assert (x[b, rest] == 0).all()                            # filler elsewhere
    # labels only at query positions: -100 everywhere in the key-value prefix
    assert (y[:, :2 * pairs] == -100).all()


def test_mqar_rejects_impossible_settings():
    with pytest.raises(ValueError, match="too short"):
        mqar.check_task(40, 16, 8192)
    with pytest.raises(ValueError, match="distinct keys"):
        mqar.check_task(256, 16, 16)
    with pytest.raises(ValueError, match="even number"):
        mqar.check_task(64, 4, 63)


@pytest.mark.parametrize("hidden,layers,heads,target", [(64, 2, 4, 64_008), (128, 2, 4, 600_000),
                                                        (512, 8, 8, 26_010_240)])
def test_llama_matched_parameter_count(hidden, layers, heads, target):
    pytest.importorskip("transformers")
    cfg, n = C.llama_config_matched(target, hidden, layers, heads, vocab=256, max_positions=512, tie=True,
                                    multiple_of=8)
    assert cfg.hidden_size == hidden and cfg.num_hidden_layers == layers
    assert abs(n / target - 1) < 0.02
    with torch.device("meta"):
        model = C.build_llama(cfg)
    assert C.count_params(model) == n                      # the closed form is LlamaForCausalLM's real count


def test_experiment_models_are_matched():
    pytest.importorskip("transformers")
    specs = parity.model_specs(parity.FULL, list(parity.MODELS))
    ref = specs[parity.LLAMA_MATCH].params
    for name, sp in specs.items():
        assert abs(sp.params / ref - 1) < 0.15, name          # same width and depth: close by construction
    assert abs(specs["llama"].params / ref - 1) < 0.01
    cfgs = lm.model_configs(lm.FULL, 256, list(lm.MODELS))
    for name, v in cfgs.items():
        assert abs(v["rel_to_reference"]) < 0.02, (name, v["params"])
    assert cfgs["llama"]["config"].num_hidden_layers == cfgs["xlstm-7b"]["config"].num_hidden_layers
    for w in (64, 256):
        ca, na = mqar.model_config("llama", mqar.FULL, w, 256)
        _, nb = mqar.model_config("xlstm-1-1", mqar.FULL, w, 256)
        assert ca.hidden_size == w and abs(na / nb - 1) < 0.02


def test_xlstm_block_mixes():
    assert C.xlstm_lm_config((0, 1), 64, 2, 2).block_types == ["s", "s"]
    assert C.xlstm_lm_config((1, 1), 64, 4, 2).block_types == ["m", "s", "m", "s"]
    assert C.xlstm_lm_config((1, 0), 64, 3, 2).block_types == ["m", "m", "m"]
    assert C.xlstm_lm_config((7, 1), 64, 16, 2).block_types.count("s") == 2
    assert C.xlstm_lm_config((7, 1), 64, 4, 2).block_types.count("s") == 1   # at least one sLSTM block


def test_deadline_shares_time_left():
    d = C.Deadline(None, 3)
    assert d.next_run() is None
    import time
    d = C.Deadline(1.0, 4)
    t = d.next_run() - time.time()
    assert 10 < t <= 15.5


def test_parity_curriculum():
    s = parity.FULL
    assert s.train_lengths == (3, 40)                       # the paper's training lengths
    at = [parity.train_lengths_at(s, t)[1] for t in range(s.steps)]
    assert at[0] == 20 and at[int(0.25 * s.steps) - 1] == 20
    assert all(b >= a for a, b in zip(at, at[1:]))          # grows monotonically ...
    assert at[int(0.4 * s.steps)] == 40 and at[-1] == 40     # ... to 40 and stays there
    assert parity.train_lengths_at(parity.QUICK, 0) == (3, 20) == parity.train_lengths_at(parity.QUICK, 249)


@pytest.mark.parametrize("kind", ["xlstm", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_sparse_loss_equals_the_full_logits_loss(kind, tie):
    """MQAR's loss applies the LM head at the labelled positions only (ModelWrap.logits_at): the same loss,
    gradients and argmax as the full (B, S, V) logits, for our model and the Llama, tied head or not."""
    if kind == "llama":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = C.xlstm_lm_config((1, 1), 32, 2, 64, tie_weights=tie)
    if kind == "llama":
        cfg, _ = C.llama_config_matched(C.meta_params(cfg), 32, 2, 4, 64, max_positions=64, tie=tie)
    model = C.build_model(cfg).double()
    wrap = C.ModelWrap(model, kind)
    x, y = mqar.mqar_batch(torch.Generator().manual_seed(1), 3, 64, 8, 64)
    params = [p for p in model.parameters()]
    full = wrap.loss_sum(x, y)
    g_full = torch.autograd.grad(full, params, allow_unused=True)
    wrap.sparse_loss = True
    sparse = wrap.loss_sum(x, y)
    g_sparse = torch.autograd.grad(sparse, params, allow_unused=True)
    # (both models return float32 logits, so the full path rounds to float32: ~1e-7 relative)
    assert abs(float(sparse.detach()) / float(full.detach()) - 1) < 1e-6
    n = 0
    for a, b in zip(g_sparse, g_full):
        if b is None:
            continue
        n += 1
        assert float((a - b).norm()) <= 1e-5 * float(b.norm())
    assert n >= 10
    m = y != -100
    with torch.no_grad():
        assert torch.equal(wrap.logits_at(x, m).argmax(-1), wrap.logits(x)[m].argmax(-1))
    assert type(model.lm_head).__name__ == "Linear"                  # the head is back after logits_at


def test_mqar_full_recipe_and_curriculum():
    s = mqar.FULL
    assert s.vocab == 8192 and (256, 16) in s.tasks and s.tie_weights
    # stages: S/4 x N/4 until 20% of the steps, S/2 x N/2 until 40%, then the task itself
    assert [mqar.task_at(s, k, 256, 16) for k in (0, 299, 300, 599, 600, 1499)] == \
        [(64, 4), (64, 4), (128, 8), (128, 8), (256, 16), (256, 16)]
    assert mqar.task_at(s, 0, 512, 64) == (128, 16)
    with pytest.raises(ValueError, match="curriculum stage 2x1"):
        mqar.settings_from(argparse.Namespace(quick=False, settings="8x2", widths=None, steps=None,
                                              batch_size=None, lr=None, vocab=None, time_budget_minutes=None))
    q = mqar.QUICK
    assert q.curriculum == () and not q.tie_weights and mqar.task_at(q, 0, 64, 8) == (64, 8)
    # the tied head reaches the models: fewer parameters than untied by one V x width matrix, for all three
    untied = mqar.Settings(tie_weights=False)
    for name in mqar.MODELS:
        _, n_tied = mqar.model_config(name, s, 64, 256)
        _, n_untied = mqar.model_config(name, untied, 64, 256)
        assert abs((n_untied - n_tied) - 8192 * 64) < 0.01 * n_untied, name
