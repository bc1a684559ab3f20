"""`fastxlstm serve`: the real server (uvicorn on 127.0.0.1, a free port) driven by the official openai client.

The tiny model is run in float64, where a row of a batched call equals the same row alone bit for bit, so
"the same tokens" is checked exactly (token ids come back through the ``return_token_ids`` extension).
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
try:  # the openai client's HTTP library (httpx2 in recent releases)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from fastxlstm.data.tokenizers import ByteTokenizer  # noqa: E402

MODEL = "tiny-test"
IDS = {"return_token_ids": True}


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # the model thread runs tiny ops next to the HTTP threads: on a small shared CPU, intra-op threads that wait
    # on each other make each call 10-100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import fastxlstm
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_model")
    fastxlstm.build_model("tiny").double().save_pretrained(d)
    ByteTokenizer().save(d)
    return str(d)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from fastxlstm.cli import _load_model  # the CLI's own loading path (model + tokenizer from the directory)
    model, tok = _load_model(model_dir, torch.device("cpu"), None, None)
    assert isinstance(tok, ByteTokenizer) and model.dtype == torch.float64
    return model.eval(), tok


@pytest.fixture(scope="module")
def server(loaded, model_dir):
    from fastxlstm.serve.server import ServerThread, build_app
    model, tok = loaded
    app = build_app(model, tok, MODEL, model_dirs=[model_dir], max_batch=8, max_queue=400, prefill_chunk=16,
                    prefill_budget=256, prefix_cache_mb=1, request_timeout=60, max_tokens=64, max_prompt_tokens=200)
    srv = ServerThread(app).start()
    yield srv
    engine = app.state.engine
    srv.stop()
    # clean shutdown: HTTP thread and model thread both gone
    assert not srv.thread.is_alive()
    assert engine._thread is None


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


def health(srv):
    return httpx.get(srv.url + "/health", timeout=10).json()


def ref_tokens(model, ids, n, **kw):
    """model.generate for one prompt alone: the new token ids."""
    out = model.generate(torch.tensor([ids]), n, temperature=kw.pop("temperature", 0), **kw)
    return out[0, len(ids):].tolist()


def prompt_text(i):
    # printable ASCII prompts of varied lengths (some longer than the 16-token prefill chunk)
    return "".join(chr(33 + (7 * i + 3 * j) % 90) for j in range(3 + (i * 5) % 37))


# ----------------------------------------------------------------------------------------------------------
# basic API
# ----------------------------------------------------------------------------------------------------------

def test_models_and_completion_match_generate(server, client, loaded):
    model, tok = loaded
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = health(server)
    assert h["status"] == "ok" and h["max_batch"] == 8 and h["slots_in_use"] == 0
    prompt = "def fib(n):"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=IDS)
    ref = ref_tokens(model, tok.encode(prompt), 12)
    c = r.choices[0]
    assert c.token_ids == ref
    assert c.text == tok.decode(ref) and c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 12, 23)
    # a prompt given as token ids, and seeded sampling with top-k / top-p: equal to generate's with that seed
    ids = tok.encode("import os\n")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0.9, top_p=0.95, seed=7,
                                  extra_body={"top_k": 50, **IDS})
    assert r.choices[0].token_ids == ref_tokens(model, ids, 10, temperature=0.9, top_p=0.95, top_k=50, seed=7)


def test_stop_sequences(client, loaded):
    model, tok = loaded
    prompt = "x = [1, 2"
    ref = ref_tokens(model, tok.encode(prompt), 20)
    text = tok.decode(ref)
    stop = text[5:7]  # a stop string that occurs inside the greedy reply
    cut = text.find(stop)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:cut]
    s = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=stop,
                                  stream=True)
    chunks = list(s)
    assert "".join(ch.choices[0].text for ch in chunks) == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_equals_non_stream(server, client, loaded):
    model, tok = loaded
    msgs = [{"role": "user", "content": "Say hi."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, extra_body=IDS)
    c = r.choices[0]
    assert c.message.role == "assistant"
    # default template (the test model directory has no chat template)
    assert c.prompt_token_ids == tok.encode("<|user|>\nSay hi.\n<|assistant|>\n")
    ref = ref_tokens(model, c.prompt_token_ids, 10)
    assert c.token_ids[:len(c.token_ids)] == ref[:len(c.token_ids)]
    s = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=IDS)
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    ids = [t for ch in chunks if ch.choices for t in (ch.choices[0].model_extra.get("token_ids") or [])]
    assert text == c.message.content and ids == c.token_ids
    assert chunks[-1].usage.completion_tokens == len(c.token_ids) == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


# ----------------------------------------------------------------------------------------------------------
# continuous batching and the prefix cache
# ----------------------------------------------------------------------------------------------------------

def test_32_concurrent_greedy_equal_alone_and_generate(server, loaded):
    model, tok = loaded
    prompts = [prompt_text(i) for i in range(32)]
    lens = [4 + (i * 3) % 9 for i in range(32)]  # different lengths: requests leave the batch at different steps

    async def run(concurrency):
        sem = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as ac:
            async def one(p, n):
                async with sem:
                    r = await ac.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                                    extra_body=IDS)
                    return r.choices[0].token_ids
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lens)))

    st0 = health(server)
    together = asyncio.run(run(32))   # 8 slots, 24 queued: requests join as others leave
    st1 = health(server)
    alone = asyncio.run(run(1))
    st2 = health(server)
    # both decode paths ran: the whole pool (>= 1/3 of the slots decoding) and gathered rows (one request alone)
    assert st1["decode_steps"] - st0["decode_steps"] > st1["gathered_steps"] - st0["gathered_steps"]
    assert st2["gathered_steps"] - st1["gathered_steps"] == st2["decode_steps"] - st1["decode_steps"] > 0
    refs = [ref_tokens(model, tok.encode(p), n) for p, n in zip(prompts, lens)]
    assert together == alone == refs
    h = health(server)
    assert h["slots_in_use"] == 0 and h["inflight"] == 0


def test_prefix_cache_hit_equals_cold(server, client, loaded):
    model, tok = loaded
    system = "You are a careful assistant. " * 3  # 87 tokens: several prefill chunks before the boundary

    def ask(user):
        r = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, extra_body=IDS,
                                           messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": user}])
        return r.choices[0]

    before = health(server)["prefix_cache"]
    cold = ask("What is 2+2?")
    other = ask("Name a colour.")
    hit = ask("What is 2+2?")
    after = health(server)["prefix_cache"]
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2
    assert after["entries"] >= 1 and 0 < after["bytes"] <= after["capacity_bytes"]
    assert hit.token_ids == cold.token_ids and hit.prompt_token_ids == cold.prompt_token_ids
    assert other.token_ids != cold.token_ids
    # and both equal the model alone on the full prompt
    assert cold.token_ids == ref_tokens(model, cold.prompt_token_ids, 12)
    assert other.token_ids == ref_tokens(model, other.prompt_token_ids, 12)


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------

def test_errors_are_4xx_and_server_keeps_serving(server, client):
    url = server.url + "/v1/completions"
    r = httpx.post(url, content=b'{"model": "tiny-test", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "hi"})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    cases = [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=65), "above this server's limit of 64"),
        (dict(n=2), "only n=1"),
        (dict(stop=["a"] * 17), "stop"),
        (dict(extra_body={"top_k": -5}), "top_k"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(prompt=[300, 1]), r"token ids must lie in \[0, 256\)"),
        (dict(prompt="x" * 201), "201 tokens, above this server's limit of 200"),
        (dict(prompt=""), "empty"),
    ]
    for kw, msg in cases:
        kw = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}
        with pytest.raises(openai.BadRequestError, match=msg) as ei:
            client.completions.create(**kw)
        assert ei.value.status_code == 400 and ei.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|limit of 200"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 300}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    # still serving
    r = client.completions.create(model=MODEL, prompt="ok", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    assert health(server)["errors"] == 0


# ----------------------------------------------------------------------------------------------------------
# a small server: queue full -> 429, client disconnect frees the slot, API key, timeout
# ----------------------------------------------------------------------------------------------------------

def wait_for(pred, what, limit=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_disconnect_frees_slot_queue_full_429_api_key(loaded):
    from fastxlstm.serve.server import ServerThread, build_app
    model, tok = loaded
    app = build_app(model, tok, MODEL, max_batch=1, max_queue=1, max_tokens=100_000, api_key="sekret")
    with ServerThread(app) as srv:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0, timeout=30)
        long = dict(model=MODEL, prompt="a", max_tokens=100_000, temperature=0, stream=True)
        s1 = c.completions.create(**long)
        next(iter(s1)), next(iter(s1))      # streaming: holds the only slot
        s2 = c.completions.create(**long)    # waits in the queue (its headers come at once)
        wait_for(lambda: health(srv)["waiting"] == 1, "the second request to queue")
        with pytest.raises(openai.RateLimitError, match="busy") as ei:
            c.completions.create(model=MODEL, prompt="b", max_tokens=2)
        assert ei.value.status_code == 429
        s1.close()                           # client gone: its slot goes to the queued request
        wait_for(lambda: health(srv)["decoding"] == 1 and health(srv)["waiting"] == 0, "s2 to get the slot")
        next(iter(s2))
        s2.close()
        h = wait_for(lambda: (lambda h: h if h["slots_in_use"] == 0 and h["inflight"] == 0 else None)(health(srv)),
                     "the slot to be freed")
        assert h["aborted"] == 2 and h["rejected"] == 1 and h["status"] == "ok"
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "c", "max_tokens": 100_000},
                       headers={"Authorization": "Bearer sekret"}, timeout=0.5)
        h = wait_for(lambda: (lambda h: h if h["inflight"] == 0 else None)(health(srv)), "the slot to be freed")
        assert h["aborted"] == 3 and h["slots_in_use"] == 0
        r = c.completions.create(model=MODEL, prompt="b", max_tokens=2)
        assert r.usage.completion_tokens == 2


def test_request_timeout_gives_504(loaded):
    from fastxlstm.serve.server import ServerThread, build_app
    model, tok = loaded
    app = build_app(model, tok, MODEL, max_batch=2, max_tokens=100_000, request_timeout=0.3)
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError, match="timeout of 0.3 s") as ei:
            c.completions.create(model=MODEL, prompt="a", max_tokens=100_000)
        assert ei.value.status_code == 504
        with pytest.raises(openai.APIError, match="timeout"):
            list(c.completions.create(model=MODEL, prompt="a", max_tokens=100_000, stream=True))
        h = wait_for(lambda: (lambda h: h if h["inflight"] == 0 else None)(health(srv)), "the slots to be freed")
        assert h["timeouts"] == 2 and h["slots_in_use"] == 0


# ----------------------------------------------------------------------------------------------------------
# load test (bounded) and the CLI
# ----------------------------------------------------------------------------------------------------------

def test_load_240_requests_16_concurrent(server):
    n_req, conc = 240, 16
    lat, errors = [], []

    async def main():
        sem = asyncio.Semaphore(conc)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as ac:
            async def one(i):
                async with sem:
                    t0 = time.perf_counter()
                    try:
                        if i % 3 == 0:
                            s = await ac.chat.completions.create(
                                model=MODEL, messages=[{"role": "user", "content": prompt_text(i)}],
                                max_tokens=4, temperature=0.7, seed=i, stream=True)
                            got = [ch async for ch in s]
                            assert got[-1].choices[0].finish_reason in ("length", "stop")
                        else:
                            r = await ac.completions.create(model=MODEL, prompt=prompt_text(i), max_tokens=4,
                                                            temperature=0)
                            assert r.usage.completion_tokens == 4
                    except Exception as e:  # collected, reported below
                        errors.append(repr(e))
                    lat.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n_req)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    assert not errors, errors[:3]
    lat.sort()
    pct = {p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3 for p in (50, 90, 99)}
    print(f"\nload: {n_req} requests at {conc} concurrent in {wall:.2f} s ({n_req / wall:.1f} req/s); latency ms "
          f"p50 {pct[50]:.1f} p90 {pct[90]:.1f} p99 {pct[99]:.1f} max {lat[-1] * 1e3:.1f}")
    h = health(server)
    assert h["inflight"] == 0 and h["errors"] == 0 and h["slots_in_use"] == 0


def test_cli_serve(model_dir, monkeypatch, capsys):
    """``fastxlstm serve`` end to end in this process (uvicorn in a thread instead of the foreground)."""
    import fastxlstm.serve.server as server_mod
    from fastxlstm.cli import main
    seen = {}

    def run_here(app, host, port, log_level):
        assert (host, log_level) == ("127.0.0.1", "warning")
        with server_mod.ServerThread(app, host, port) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=30)
            seen["models"] = [m.id for m in c.models.list().data]
            r = c.chat.completions.create(model=seen["models"][0], messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3)
            seen["tokens"] = r.usage.completion_tokens
            seen["health"] = health(srv)

    monkeypatch.setattr(server_mod, "run_server", run_here)
    monkeypatch.setenv("FASTXLSTM_API_KEY", "k")
    assert main(["serve", "--model", model_dir, "--port", "0", "--device", "cpu", "--max-batch", "3",
                 "--log-level", "warning"]) == 0
    assert seen["models"] == [os.path.basename(model_dir)] and seen["tokens"] == 3
    assert seen["health"]["max_batch"] == 3 and seen["health"]["inflight"] == 0
    assert "XLSTMLM" in capsys.readouterr().err
    assert main(["serve", "--model", model_dir, "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
