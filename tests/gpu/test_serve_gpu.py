"""The serve scheduler on a CUDA GPU: continuous batching with the model's GPU kernels gives the tokens of
model.generate alone, and the HTTP server streams them.

Run on the device machine: pytest -q tests/gpu/test_serve_gpu.py (skipped without CUDA or without fastapi).
Greedy tokens are compared in float32 (TF32 off). A batched row and the same row alone may round differently on
the GPU, so a mismatch is allowed only after the two logits' top-2 gap fell below 1e-3 (a near tie), checked by
re-running generate on the common prefix.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("fastapi")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def near_tie(model, ids, prefix):
    """True when the greedy choice after ids + prefix is a near tie (top-2 logits within 1e-3)."""
    x = torch.tensor([ids + prefix], device="cuda")
    with torch.no_grad():
        top = model(x).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1]) < 1e-3


@pytest.mark.parametrize("decode", ["eager", "graph"])
@pytest.mark.parametrize("preset", ["tiny", "7b-tiny"])
def test_engine_cuda_equals_generate(preset, decode):
    import fastxlstm
    from fastxlstm.serve import EagerBackend, Engine, SamplingParams
    from fastxlstm.serve.backend import GraphBackend, graph_backend_available

    torch.manual_seed(0)
    model = fastxlstm.build_model(preset).cuda().eval()
    if decode == "graph" and not graph_backend_available(model):
        pytest.skip("no CUDA-graph decoder in this tree")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (5 + 13 * i,), generator=g).tolist() for i in range(24)]
    n_new = [8 + i % 9 for i in range(24)]
    refs = [model.generate(torch.tensor([p], device="cuda"), n, temperature=0)[0, len(p):].tolist()
            for p, n in zip(prompts, n_new)]

    async def main():
        be = GraphBackend(model, 8) if decode == "graph" else EagerBackend(model)
        eng = Engine(be, max_batch=8, max_queue=32, prefill_chunk=64).start()
        try:
            async def one(p, n):
                return [v async for k, v in eng.submit(p, SamplingParams(n, 0.0)) if k == "token"]
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, n_new))), eng.stats()
        finally:
            eng.stop()

    outs, st = asyncio.run(main())
    assert st["errors"] == 0 and st["finished"] == 24 and st["gathered_steps"] < st["decode_steps"]
    for p, got, ref in zip(prompts, outs, refs):
        assert len(got) == len(ref)
        k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        if k is not None:
            assert near_tie(model, p, ref[:k]), f"tokens differ at {k} without a near tie: {got} vs {ref}"


def test_http_server_cuda_streams():
    import openai
    import fastxlstm
    from fastxlstm.data.tokenizers import ByteTokenizer
    from fastxlstm.serve.server import ServerThread, build_app

    torch.manual_seed(0)
    model = fastxlstm.build_model("tiny").cuda().eval()
    app = build_app(model, ByteTokenizer(), "tiny", max_batch=16, max_tokens=64)
    with ServerThread(app) as srv:
        async def main():
            async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as ac:
                async def one(i):
                    s = await ac.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=32,
                        temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
                    chunks = [c async for c in s]
                    return chunks[-1].usage.completion_tokens
                return await asyncio.gather(*(one(i) for i in range(32)))
        counts = asyncio.run(main())
    assert all(1 <= c <= 32 for c in counts)
