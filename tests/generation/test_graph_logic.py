"""The CUDA-graph decoder's logic on the CPU: the captured body is run eagerly (``graph._CAPTURE = False``), so
everything around the graph (static buffers, in-place state copies, eos and fill, stopping, trimming, the final
state, seeded sampling through the shared uniform draw) is checked against the eager loop here; the real capture
and replay are checked on the GPU (tests/gpu/test_generation_graph_gpu.py)."""
import pytest
import torch

import fastxlstm
from fastxlstm.generation import graph


@pytest.fixture
def no_capture(monkeypatch):
    monkeypatch.setattr(graph, "_CAPTURE", False)


def _model(name):
    torch.manual_seed(0)
    m = fastxlstm.build_model(name).eval()
    return m


@pytest.mark.parametrize("name", ["tiny", "7b-tiny"])
def test_greedy_equals_eager(no_capture, name):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    a = model.generate(ids, 17, do_sample=False, use_cuda_graph=False)
    b = model.generate(ids, 17, do_sample=False, use_cuda_graph=True)
    assert torch.equal(a, b)
    s = torch.stack(list(model.generate_stream(ids, 17, do_sample=False, use_cuda_graph=True)), 1)
    assert torch.equal(s, a[:, 9:])


@pytest.mark.parametrize("kw", [dict(temperature=0.9), dict(temperature=1.3, top_k=5),
                                dict(temperature=0.7, top_p=0.8), dict(temperature=1.0, top_k=7, top_p=0.9)])
def test_seeded_sampling_equals_eager(no_capture, kw):
    model = _model("tiny")
    ids = torch.randint(0, model.config.vocab_size, (4, 6))
    a = model.generate(ids, 20, seed=123, use_cuda_graph=False, **kw)
    b = model.generate(ids, 20, seed=123, use_cuda_graph=True, **kw)
    assert torch.equal(a, b)
    c = model.generate(ids, 20, seed=124, use_cuda_graph=True, **kw)
    assert not torch.equal(b, c)  # the seed matters


def test_eos_fill_stop_and_final_state(no_capture):
    model = _model("tiny")
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    free = model.generate(ids, 30, do_sample=False, use_cuda_graph=False)
    # an eos that row 0 emits early; the others may never emit it
    eos = int(free[0, 5 + 3])
    for kwargs in (dict(), dict(return_state=True)):
        a = model.generate(ids, 30, do_sample=False, eos_token_id=eos, pad_token_id=0, use_cuda_graph=False,
                           **kwargs)
        b = model.generate(ids, 30, do_sample=False, eos_token_id=eos, pad_token_id=0, use_cuda_graph=True,
                           **kwargs)
        if kwargs:
            (a, sa), (b, sb) = a, b
            for x, y in zip(graph._state_tensors(sa), graph._state_tensors(sb)):
                if x is not None:
                    torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert torch.equal(a, b)
    # every row emits eos at once -> generation stops after one token on both paths
    first = model.generate(ids, 1, do_sample=False, use_cuda_graph=False)[:, -1]
    for use in (False, True):
        out = model.generate(ids, 10, do_sample=False, eos_token_id=first.tolist(), use_cuda_graph=use)
        assert out.shape[1] <= 5 + 10
    a = model.generate(ids, 10, do_sample=False, eos_token_id=first.tolist(), use_cuda_graph=False)
    b = model.generate(ids, 10, do_sample=False, eos_token_id=first.tolist(), use_cuda_graph=True)
    assert torch.equal(a, b)


def test_left_padding_and_no_leak_between_calls(no_capture):
    model = _model("tiny")
    V = model.config.vocab_size
    p1 = torch.randint(1, V, (1, 7))
    p2 = torch.randint(1, V, (1, 4))
    batch = torch.cat([p1, torch.cat([torch.zeros(1, 3, dtype=torch.long), p2], 1)], 0)
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    a = model.generate(batch, 12, do_sample=False, attention_mask=mask, use_cuda_graph=False)
    b = model.generate(batch, 12, do_sample=False, attention_mask=mask, use_cuda_graph=True)
    assert torch.equal(a, b)
    # the cached decoder is reused: a second call with other prompts gives what a fresh eager call gives
    c = model.generate(batch.flip(0), 12, do_sample=False, attention_mask=mask.flip(0), use_cuda_graph=True)
    d = model.generate(batch.flip(0), 12, do_sample=False, attention_mask=mask.flip(0), use_cuda_graph=False)
    assert torch.equal(c, d)
    assert len(model.__dict__["_fastxlstm_graphs"]) == 1
    graph.clear_graphs(model)
    assert "_fastxlstm_graphs" not in model.__dict__


def test_graph_cache_is_bounded_and_keyed(no_capture):
    model = _model("tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    for B in (1, 2, 3, 4, 5, 6):
        model.generate(ids.expand(B, 3), 2, do_sample=False, use_cuda_graph=True)
    assert len(model.__dict__["_fastxlstm_graphs"]) == graph._MAX_GRAPHS


def test_use_cuda_graph_errors():
    model = _model("tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, 3))
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        model.generate(ids, 2, use_cuda_graph=True)
    with pytest.raises(ValueError, match="use_cuda_graph must be"):
        model.generate(ids, 2, use_cuda_graph="yes")


def test_chunked_prefill_matches_one_pass():
    model = _model("7b-tiny")
    ids = torch.randint(0, model.config.vocab_size, (2, 50))
    full = model(ids)
    logits, state = graph.prefill(model, ids, None, chunk_len=16)
    ref = full.logits[:, -1]
    assert (logits - ref).norm() / ref.norm() < 1e-5
    for x, y in zip(graph._state_tensors(full.state), graph._state_tensors(state)):
        if x is not None:
            assert (x - y).norm() <= 1e-5 * x.norm() + 1e-12


@pytest.mark.parametrize("name", ["7b-tiny", "tiny"])
@pytest.mark.parametrize("chunk_len", [16, 64])
def test_prefill_into_buffers(no_capture, name, chunk_len):
    """The prompt's state written straight into the decoder's buffers (block by block, chunk by chunk: 50 tokens
    in chunks of 16 carry the buffers between chunks) equals the plain prefill's; the state returned is the
    buffers themselves; stale values in the buffers (a previous call's state) do not leak in; 16-bit C buffers
    hold the exact state rounded once."""
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 50))
    ref_logits, ref = graph.prefill(model, ids, None, chunk_len=chunk_len)
    for dtype in ("fp32", "bf16"):
        dec = graph.get_decoder(model, 2, None, None, False, None, None, state_dtype=dtype)
        for t in graph._state_tensors(dec.state):
            if t is not None:
                t.normal_()  # garbage from an earlier call
        logits, st = graph.prefill(model, ids, None, chunk_len=chunk_len, into=dec.state)
        assert all(x is y for x, y in zip(graph._state_tensors(st), graph._state_tensors(dec.state)))
        assert (logits - ref_logits).norm() <= 1e-6 * ref_logits.norm()
        for x, y in zip(graph._state_tensors(ref), graph._state_tensors(st)):
            if x is None:
                continue
            assert (x.to(y.dtype).float() - y.float()).norm() <= 1e-6 * x.norm() + 1e-12
    # buffers of another layout are refused, not silently misassigned
    short = graph.XLSTMState(dec.state.blocks[:-1])
    with pytest.raises(RuntimeError, match="blocks"):
        graph.prefill(model, ids, None, chunk_len=chunk_len, into=short)
    # generation through it equals the eager loop (left padding included)
    pad = torch.ones_like(ids)
    pad[1, :7] = 0
    a = model.generate(ids, 9, do_sample=False, attention_mask=pad, use_cuda_graph=False)
    b = model.generate(ids, 9, do_sample=False, attention_mask=pad, use_cuda_graph=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,mode,B", [("7b-tiny", "blocks", 2), ("tiny", "blocks", 2), ("tiny", "blocks", 1),
                                         ("7b-tiny", "full", 2)])
def test_compiled_decode_step_equals_eager(no_capture, name, mode, B):
    """The torch.compile'd step (per block, the CUDA default, or the whole forward) chooses the same tokens as
    the eager loop (float32 on the CPU), and the blocks run through the compiled call while it steps ("tiny" has an
    sLSTM block; B=1 once made Inductor fail when the sLSTM state was written inside the compiled call)."""
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (B, 5))
    a = model.generate(ids, 12, do_sample=False, use_cuda_graph=False)
    dec = graph.get_decoder(model, B, False, None, False, None, None, compile=mode)
    assert dec.key.compile == mode
    assert (dec._runner is not None) == (mode == "blocks")
    logits, st = graph.prefill(model, ids, None)
    dec.load(st, logits.argmax(-1))
    toks = [logits.argmax(-1)] + [dec.step().clone() for _ in range(11)]
    assert torch.equal(torch.stack(toks, 1), a[:, 5:])
    assert "_block_runner" not in model.__dict__  # the compiled runner is set only while a step runs


def test_compile_mode_values(monkeypatch):
    assert graph.compile_mode(True) == "blocks" and graph.compile_mode(False) == "off"
    assert graph.compile_mode("FULL") == "full" and graph.compile_mode("0") == "off"
    monkeypatch.setenv("FASTXLSTM_COMPILE_DECODE", "1")
    assert graph.compile_mode() == "blocks"
    monkeypatch.delenv("FASTXLSTM_COMPILE_DECODE")
    assert graph.compile_mode() == "blocks"
    assert graph._mode_for(_model("tiny"), None) == "off"  # CPU default: not compiled
    with pytest.raises(ValueError, match="compile mode"):
        graph.compile_mode("fast")
    for var, fn in (("FASTXLSTM_COMPILE_DECODE", graph.compile_mode), ("FASTXLSTM_DECODE_STATE",
                                                                     graph.decode_state_dtype)):
        monkeypatch.setenv(var, "bogus")  # the environment's spelling is checked as strictly, and named
        with pytest.raises(ValueError, match=var):
            fn()
        monkeypatch.delenv(var)


def test_logits_mode_matches_forward(no_capture):
    """Logits mode (used by the server): the static state advances exactly as model(token, state)."""
    model = _model("tiny")
    ids = torch.randint(0, model.config.vocab_size, (3, 6))
    logits, st = graph.prefill(model, ids, None)
    dec = graph.get_decoder(model, 3, None, None, False, None, None)
    dec.load(st, torch.zeros(3, dtype=torch.long))
    ref_state = st
    for t in range(4):
        tok = torch.randint(0, model.config.vocab_size, (3,))
        ref = model(tok[:, None], state=ref_state)
        ref_state = ref.state
        got = dec.step_logits(tok)
        assert (got - ref.logits[:, -1]).norm() <= 1e-5 * ref.logits.norm()
    with pytest.raises(ValueError, match="logits mode"):
        graph.get_decoder(model, 3, False, None, False, None, None).step_logits(tok)


@pytest.mark.parametrize("name", ["7b-tiny", "tiny"])
def test_bf16_state_option(no_capture, name):
    """The reduced-precision state option: C buffers in bfloat16, logits close to the float32 state's (but not
    equal: the option is really used), states read back as float32, bad values refused."""
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    logits, st = graph.prefill(model, ids, None)
    ref = graph.get_decoder(model, 2, None, None, False, None, None)
    low = graph.get_decoder(model, 2, None, None, False, None, None, state_dtype="bf16")
    assert low is not ref and low.key.state_dtype == torch.bfloat16
    Cs = [b.C for b in low.state.blocks if isinstance(b, graph.MLSTMBlockState)]
    assert Cs and all(C.dtype == torch.bfloat16 for C in Cs)
    tok = logits.argmax(-1)
    ref.load(st, tok)
    low.load(st, tok)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(10):
        tok = torch.randint(0, model.config.vocab_size, (2,), generator=g)
        a = ref.step_logits(tok).clone()
        b = low.step_logits(tok)
        worst = max(worst, float((a - b).norm() / a.norm()))
    assert 0 < worst < 2e-2, worst
    back = low.read_state()
    assert all(b.C.dtype == torch.float32 for b in back.blocks if isinstance(b, graph.MLSTMBlockState))
    with pytest.raises(ValueError, match="state dtype"):
        graph.decode_state_dtype("int8")
    with pytest.raises(ValueError, match="state dtype"):
        graph.decode_state_dtype(torch.float64)


def test_state_buffers_keep_the_model_state_dtype(no_capture):
    """Without the 16-bit option the decoder's buffers and the states it gives back have the model's state dtypes
    (float64 for a float64 model, float32 C for a bf16 one)."""
    for name, dtype, cdt in (("tiny", torch.float64, torch.float64), ("7b-tiny", torch.bfloat16, torch.float32)):
        model = _model(name).to(dtype)
        dec = graph.get_decoder(model, 2, None, None, False, None, None)
        ref = model.init_state(2)
        for got in (dec.state, dec.read_state()):
            assert [t.dtype for t in graph._state_tensors(got) if t is not None] == \
                [t.dtype for t in graph._state_tensors(ref) if t is not None]
        assert ref.blocks[0].C.dtype == cdt
