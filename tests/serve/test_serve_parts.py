"""The server's parts without HTTP: state slots, the prefix-state LRU, stop sequences, chat templates, and the
scheduler driven directly (both model layouts: the paper model and the 7B architecture, which has no conv state)."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("jinja2")

import fastxlstm  # noqa: E402
from fastxlstm.data.tokenizers import ByteTokenizer  # noqa: E402
from fastxlstm.serve.backend import EagerBackend  # noqa: E402
from fastxlstm.serve.chat import ChatTemplate, StopTextStream, load_chat_config  # noqa: E402
from fastxlstm.serve.prefix_cache import PrefixCache  # noqa: E402
from fastxlstm.serve.scheduler import Engine, QueueFull, SamplingParams  # noqa: E402
from fastxlstm.serve.state_pool import StatePool, split_state, stack_states, state_leaves  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["tiny", "7b-tiny"])
def model(request):
    torch.manual_seed(1)
    return fastxlstm.build_model(request.param).double().eval()


def random_state(model, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size, (B, 7), generator=g)
    with torch.no_grad():
        return model(ids).state


def assert_rows_equal(a, b):
    for x, y in zip(state_leaves(a), state_leaves(b)):
        assert x.shape == y.shape and torch.equal(x, y)


def test_state_pool_rows(model):
    rows = split_state(random_state(model, 5))
    assert len(rows) == 5 and all(r.batch_size == 1 for r in rows)
    assert any(blk.conv is None for blk in rows[0].blocks) == isinstance(model, fastxlstm.XLSTMLarge)
    pool = StatePool(4)
    for slot, r in zip([2, 0, 3, 1], rows):
        pool.write(slot, r)
    assert pool.row_nbytes() == rows[0].nbytes() > 0
    assert_rows_equal(pool.gather([0, 2]), stack_states([rows[1], rows[0]]))
    assert_rows_equal(pool.read(3), rows[2])
    # partial scatter copies rows in; a full, ordered scatter adopts the tensors
    pool.scatter([1, 3], stack_states([rows[4], rows[0]]))
    assert_rows_equal(pool.gather([1, 3, 2]), stack_states([rows[4], rows[0], rows[0]]))
    whole = stack_states(rows[:4])
    assert pool.gather([0, 1, 2, 3]) is pool.state
    pool.scatter([0, 1, 2, 3], whole)
    assert pool.state is whole
    with pytest.raises(ValueError, match="single-row"):
        pool.write(0, whole)
    with pytest.raises(ValueError, match="size must be a positive int"):
        StatePool(0)


def test_prefix_cache_lru_by_bytes(model):
    s = split_state(random_state(model, 3))
    nb = s[0].nbytes()
    cache = PrefixCache(2 * nb + nb // 2)  # room for two states
    assert cache.get([1, 2]) is None
    assert cache.put([1, 2], s[0]) and cache.put([3], s[1])
    assert cache.get([1, 2]) is s[0]           # [1, 2] is now the most recent
    assert cache.put([4, 5, 6], s[2])          # evicts [3], the least recently used
    assert cache.get([3]) is None and cache.get([4, 5, 6]) is s[2] and cache.get([1, 2]) is s[0]
    st = cache.stats()
    assert (st["entries"], st["bytes"], st["hits"], st["misses"], st["evictions"]) == (2, 2 * nb, 3, 2, 1)
    assert not PrefixCache(nb - 1).put([1], s[0])  # does not fit at all
    with pytest.raises(ValueError, match="single-row"):
        cache.put([9], stack_states(s))


def test_stop_text_stream_holds_back_partial_stops():
    tok = ByteTokenizer()
    st = StopTextStream(tok, ["END", "\n\n"])
    text = "ab EN é x\nyEND tail"
    pieces = []
    for b in text.encode():
        piece, stopped = st.push(b)
        pieces.append(piece)
        assert not any(p.endswith(("E", "EN", "\n")) for p in pieces if p)  # never shows a possible stop start
        if stopped:
            break
    assert stopped and "".join(pieces) == "ab EN é x\ny" == st.text
    st = StopTextStream(tok, ["zz"])
    out = "".join(st.push(b)[0] for b in "héz".encode()) + st.finish()
    assert out == "héz" and not st.stopped


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": {"content": "<|im_end|>"}, "bos_token": "<s>"}))
    cfg = load_chat_config([str(tmp_path)])
    assert cfg["chat_template"] == CHATML and cfg["eos_token"] == "<|im_end|>" and cfg["bos_token"] == "<s>"
    tpl = ChatTemplate(cfg["chat_template"], cfg["bos_token"], cfg["eos_token"])
    assert not tpl.default and tpl.stop == ()
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids, plen = tpl.encode(tok, msgs)
    full = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok.encode(full) and plen == len("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert tpl.encode(tok, msgs[1:])[1] is None  # no system message: nothing to cache
    # chat_template.jinja wins over tokenizer_config.json (transformers' newer layout)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_chat_config([str(tmp_path)])["chat_template"] == "{{ messages[0]['content'] }}"
    default = ChatTemplate()
    assert default.default and "<|user|>" in default.stop
    assert default.render(msgs) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ValueError, match="rejected the messages: no system"):
        ChatTemplate("{{ raise_exception('no system') }}").render(msgs)


def run_engine(engine, jobs):
    """Submit (prompt, params, prefix_len) jobs at once; the new tokens of each."""
    async def main():
        engine.start()
        try:
            handles = [engine.submit(p, sp, pl) for p, sp, pl in jobs]

            async def collect(h):
                out = []
                async for kind, val in h:
                    if kind == "error":
                        raise AssertionError(val)
                    if kind in ("token", "eos"):
                        out.append(val)
                return out
            return await asyncio.gather(*(collect(h) for h in handles))
        finally:
            engine.stop()
    return asyncio.run(main())


def test_engine_equals_generate(model):
    """Mixed prompt lengths (chunked prefill), mixed lengths of output, greedy and seeded sampling, a shared
    prefix: every request equals model.generate on it alone."""
    g = torch.Generator().manual_seed(3)
    V = model.vocab_size
    prefix = torch.randint(0, V, (21,), generator=g).tolist()
    jobs, refs = [], []
    for i in range(10):
        p = torch.randint(0, V, (1 + 5 * i,), generator=g).tolist()
        n = 3 + i % 4
        kw = dict(temperature=0.8, top_k=20, seed=i) if i % 3 == 1 else dict(temperature=0)
        pl = None
        if i % 3 == 2:
            p, pl = prefix + p, len(prefix)
        sp = SamplingParams(n, kw["temperature"], kw.get("top_k"), None, kw.get("seed"))
        jobs.append((p, sp, pl))
        refs.append(model.generate(torch.tensor([p]), n, **kw)[0, len(p):].tolist())
    engine = Engine(EagerBackend(model), max_batch=3, max_queue=10, prefill_chunk=8, prefill_budget=16,
                    prefix_cache_bytes=1 << 20)
    assert run_engine(engine, jobs) == refs
    st = engine.stats()
    assert st["prefix_cache"]["misses"] >= 1 and st["prefix_cache"]["hits"] >= 1
    assert st["finished"] == 10 and st["inflight"] == 0 and st["free_slots"] == 3


def test_engine_eos_and_queue_full(model):
    ids = [5, 6, 7]
    ref = model.generate(torch.tensor([ids]), 6, temperature=0)[0, 3:].tolist()
    eos = ref[3]
    stop_at = ref.index(eos)  # generation ends at the first eos, which is reported as such
    engine = Engine(EagerBackend(model), max_batch=2, max_queue=1)
    out = run_engine(engine, [(ids, SamplingParams(6, 0.0, eos_token_ids=(eos,)), None)])
    assert out == [ref[:stop_at + 1]]

    async def overfill():
        e = Engine(EagerBackend(model), max_batch=2, max_queue=1)  # not started: nothing leaves the queue
        for _ in range(3):
            e.submit([1], SamplingParams(1, 0.0))
        with pytest.raises(QueueFull, match="busy"):
            e.submit([1], SamplingParams(1, 0.0))
        with pytest.raises(ValueError, match="token ids must lie"):
            e.submit([V := model.vocab_size], SamplingParams(1, 0.0))
        with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
            e.submit([1], SamplingParams(0, 0.0))
        with pytest.raises(ValueError, match="top_p"):
            e.submit([1], SamplingParams(1, 1.0, top_p=1.5))
        assert V > 0
    asyncio.run(overfill())


def test_graph_backend_logic_on_cpu(monkeypatch):
    """GraphBackend around the generation package's graph decoder (its captured body run eagerly on the CPU, as
    in that package's own logic tests): the engine gives model.generate's tokens, the decoder's static state
    becomes the pool, and subsets of rows fall back to eager steps."""
    graph = pytest.importorskip("fastxlstm.generation.graph")
    from fastxlstm.serve.backend import GraphBackend
    monkeypatch.setattr(graph, "_CAPTURE", False)
    torch.manual_seed(2)
    model = fastxlstm.build_model("tiny").double().eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (3 + 4 * i,), generator=g).tolist() for i in range(7)]
    n_new = [5 + i % 4 for i in range(7)]
    refs = [model.generate(torch.tensor([p]), n, temperature=0)[0, len(p):].tolist() for p, n in zip(prompts, n_new)]
    be = GraphBackend(model, max_batch=4)
    engine = Engine(be, max_batch=4, max_queue=10, prefill_chunk=8)
    out = run_engine(engine, [(p, SamplingParams(n, 0.0), None) for p, n in zip(prompts, n_new)])
    assert out == refs
    st = engine.stats()
    assert be._dec is not None and engine.pool.state is be._dec.state
    assert st["gathered_steps"] > 0 and st["decode_steps"] > st["gathered_steps"]
