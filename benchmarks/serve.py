"""`fastxlstm serve` under load: N concurrent streaming clients against the raw batched decode of the same model.

Question: how much of the model's batched decode throughput does the HTTP server deliver to N concurrent
streaming clients, and with what latency (time to first token, inter-token latency)?

    python benchmarks/serve.py --preset 7b --device cuda --dtype bf16            # 64 clients (the issue's target)
    python benchmarks/serve.py --quick                                           # tiny preset on CPU, a smoke test

Everything runs in this one process, with random weights (``build_model(preset)``, ``torch.manual_seed``):

1. raw decode: ``model.generate`` on a (N, prompt_len) batch, greedy, ``--max-tokens`` new tokens, timed twice
   (with max_new_tokens T and 1) so that the decode-only rate is N (T - 1) / (t_T - t_1) tokens/s;
2. engine: the server's scheduler (:class:`fastxlstm.serve.Engine`) driven directly, no HTTP: N requests at once
   (decode backend: ``--decode``, by default the CUDA graph when the tree has it and the model is on CUDA);
3. server: the FastAPI app under uvicorn on 127.0.0.1 (a thread of this process) and N streaming clients
   (the official ``openai`` client, ``AsyncOpenAI``, in a child process, so that they do not share the server's
   GIL; ``--clients-in-process`` runs them in this process), each sending ``--rounds`` requests one after the
   other. Aggregate tokens/s = all completion tokens / wall time from the first request
   to the last answer; TTFT = request start -> first token chunk; ITL = gaps between a stream's token chunks,
   divided by the tokens in the chunk (a stream that falls behind receives several tokens in one chunk).

Prompts are random token ids sent as id lists; the tokenizer is a word-level one with one word per id (so each
streamed chunk is one token). No eos: every request produces exactly --max-tokens tokens. Correctness in the same
run: the greedy tokens of one request through the server are compared with ``model.generate`` on that prompt
alone (the agreement is reported; bf16 batched and single-row calls may round differently).

Writes benchmarks/results/serve_<preset>_<device>_<eager or graph>.json (GPU name, versions, date, all numbers) and a .png.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing

import torch  # noqa: E402


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def word_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from fastxlstm.data.tokenizers import HFTokenizer
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer(tok, source="benchmark word-level")


def raw_decode(model, prompts, T, device):
    ids = torch.tensor(prompts, device=device)
    model.generate(ids, min(T, 4), temperature=0)  # warm-up (kernels, allocator)
    times = {}
    for n in (1, T):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, n, temperature=0)
        sync(device)
        times[n] = time.perf_counter() - t0
    N = len(prompts)
    dec = N * (T - 1) / (times[T] - times[1]) if T > 1 and times[T] > times[1] else None
    return {"batch": N, "new_tokens": T, "seconds_T": times[T], "seconds_1": times[1],
            "total_tokens_per_s": N * T / times[T], "decode_tokens_per_s": dec}, out[:, len(prompts[0]):].tolist()


def engine_direct(backend, prompts, T, max_batch, prefill_chunk):
    from fastxlstm.serve import Engine, SamplingParams

    async def main():
        eng = Engine(backend, max_batch=max_batch, max_queue=len(prompts),
                     prefill_chunk=prefill_chunk, prefill_budget=max(prefill_chunk, 8 * len(prompts[0])),
                     prefix_cache_bytes=0).start()
        try:
            async def one(p):
                n = 0
                async for kind, _ in eng.submit(p, SamplingParams(T, 0.0)):
                    n += kind == "token"
                return n
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(p) for p in prompts))
            return sum(counts) / (time.perf_counter() - t0), eng.stats()
        finally:
            eng.stop()
    tps, st = asyncio.run(main())
    return {"tokens_per_s": tps, "decode_steps": st["decode_steps"], "prefill_calls": st["prefill_calls"]}


def load_clients(url, name, prompts, T, rounds):
    """N = len(prompts) streaming clients, each sending ``rounds`` requests one after the other."""
    import openai
    ttft, itl, totals, errors, chunks = [], [], [], [], []

    async def client(ac, i):
        for r in range(rounds):
            p = prompts[(i + r * 7) % len(prompts)]
            t0 = time.perf_counter()
            last, n = None, 0
            try:
                s = await ac.completions.create(model=name, prompt=p, max_tokens=T, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"return_token_ids": True})
                async for ch in s:
                    k = len((ch.choices[0].model_extra or {}).get("token_ids") or []) if ch.choices else 0
                    if k:
                        now = time.perf_counter()
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            # a stream that fell behind gets several tokens in one chunk: spread the gap
                            itl.extend([(now - last) / k] * k)
                            chunks.append(k)
                        last = now
                    if ch.usage is not None:
                        n = ch.usage.completion_tokens
            except Exception as e:
                errors.append(repr(e))
            totals.append(n)

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as ac:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(ac, i) for i in range(len(prompts))))
            return time.perf_counter() - t0

    wall = asyncio.run(run())
    return {"wall": wall, "ttft": ttft, "itl": itl, "totals": totals, "errors": errors, "chunks": chunks}


def _client_child(conn, *args):
    conn.send(load_clients(*args))
    conn.close()


def server_run(app, prompts, T, rounds, name, clients_in_process=False):
    import openai
    from fastxlstm.serve.server import ServerThread

    with ServerThread(app) as srv:
        # warm-up request, and the correctness sample
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=600) as c:
            r = c.completions.create(model=name, prompt=prompts[0], max_tokens=T, temperature=0,
                                     extra_body={"return_token_ids": True})
        first = r.choices[0].model_extra.get("token_ids")
        before = app.state.engine.stats()
        args = (srv.url, name, prompts, T, rounds)
        if clients_in_process:
            res = load_clients(*args)
        else:  # the clients in their own process: they do not share the server's GIL (as remote clients would)
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_client_child, args=(child, *args), daemon=True)
            proc.start()
            res = parent.recv()
            proc.join(60)
        health = app.state.engine.stats()
    ttft, itl, totals, errors, chunks = res["ttft"], res["itl"], res["totals"], res["errors"], res["chunks"]
    wall = res["wall"]
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {
        "clients": len(prompts), "rounds": rounds, "clients_in_process": clients_in_process, "wall_s": wall,
        "completion_tokens": sum(totals), "tokens_per_s": sum(totals) / wall,
        "errors": len(errors), "error_samples": errors[:3],
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p90": ms(pct(ttft, 90)), "p99": ms(pct(ttft, 99))},
        "itl_ms": {"p50": ms(pct(itl, 50)), "p90": ms(pct(itl, 90)), "p99": ms(pct(itl, 99))},
        "tokens_per_chunk_mean": (sum(chunks) / len(chunks)) if chunks else None,
        "decode_steps": health["decode_steps"] - before["decode_steps"],
        "gathered_steps": health["gathered_steps"] - before["gathered_steps"],
        "prefill_calls": health["prefill_calls"] - before["prefill_calls"],
    }, first, (ttft, itl)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients = batch (default: 64)")
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens per request (default: 256)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after the other (default: 2)")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--decode", default="auto", choices=["auto", "eager", "graph"],
                    help="the server's decode backend (default: auto = CUDA graph when available)")
    ap.add_argument("--clients-in-process", action="store_true",
                    help="run the clients in the server's process (default: a child process)")
    ap.add_argument("--quick", action="store_true", help="tiny preset on CPU: 4 clients, 16 tokens (smoke test)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.device = "tiny", args.device or "cpu"
        args.clients, args.max_tokens, args.prompt_len, args.rounds = 4, 16, 24, 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             None: torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]

    import fastxlstm
    from fastxlstm.serve.app import create_app
    from fastxlstm.serve.backend import EagerBackend, GraphBackend, graph_backend_available
    from fastxlstm.serve.scheduler import Engine

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = fastxlstm.build_model(args.preset)
    model = model.to(dtype).eval()
    print(f"{args.preset}: {model.num_parameters():,} parameters on {device} {dtype} "
          f"({time.perf_counter() - t0:.1f} s to build)", flush=True)
    state_bytes = model.init_state(1, device="meta").nbytes()
    V, N, T = model.vocab_size, args.clients, args.max_tokens
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, V, (N, args.prompt_len), generator=g).tolist()

    raw, raw_tokens = raw_decode(model, prompts, T, device)
    print(f"raw decode (model.generate, B={N}): {raw['decode_tokens_per_s'] or float('nan'):,.0f} tokens/s decode, "
          f"{raw['total_tokens_per_s']:,.0f} tokens/s with prefill", flush=True)
    use_graph = args.decode == "graph" or (args.decode == "auto" and graph_backend_available(model))

    def backend():
        return GraphBackend(model, N) if use_graph else EagerBackend(model)
    eng = engine_direct(backend(), prompts, T, N, args.prefill_chunk)
    eng["backend"] = "graph" if use_graph else "eager"
    print(f"engine (no HTTP, {eng['backend']} decode): {eng['tokens_per_s']:,.0f} tokens/s", flush=True)

    engine = Engine(backend(), max_batch=N, max_queue=4 * N, prefill_chunk=args.prefill_chunk,
                    prefill_budget=max(args.prefill_chunk, 8 * args.prompt_len), prefix_cache_bytes=0)
    app = create_app(engine, word_tokenizer(V), args.preset, eos_token_ids=[], max_tokens=T,
                     max_prompt_tokens=args.prompt_len)
    srv, first, (ttft, itl) = server_run(app, prompts, T, args.rounds, args.preset, args.clients_in_process)
    agree, prefix_equal = None, None
    if first is not None:
        alone = model.generate(torch.tensor([prompts[0]], device=device), T, temperature=0)[0, args.prompt_len:]
        alone = alone.tolist()
        agree = sum(a == b for a, b in zip(first, alone)) / T
        prefix_equal = next((i for i, (a, b) in enumerate(zip(first, alone)) if a != b), T)
    ratio = srv["tokens_per_s"] / raw["decode_tokens_per_s"] if raw["decode_tokens_per_s"] else None
    print(f"server ({N} streaming clients x {args.rounds}): {srv['tokens_per_s']:,.0f} tokens/s "
          f"= {100 * ratio:.0f}% of raw decode; TTFT p50 {srv['ttft_ms']['p50']:.1f} ms p99 "
          f"{srv['ttft_ms']['p99']:.1f} ms; ITL p50 {srv['itl_ms']['p50']:.2f} ms p99 {srv['itl_ms']['p99']:.2f} ms; "
          f"errors {srv['errors']}; greedy agreement with generate alone {agree} "
          f"(first {prefix_equal} tokens equal)", flush=True)

    result = {
        "benchmark": "serve", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                     or platform.machine()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "fastxlstm": fastxlstm.__version__,
                     "triton": _version("triton"), "fastapi": _version("fastapi"), "uvicorn": _version("uvicorn"),
                     "openai": _version("openai")},
        "args": vars(args), "dtype": str(dtype), "parameters": model.num_parameters(),
        "state_bytes_per_sequence": state_bytes,
        "decode_backend": eng["backend"], "raw_decode": raw, "engine_direct": eng, "server": srv, "server_over_raw_decode": ratio,
        "greedy_agreement_server_vs_generate_alone": agree, "greedy_equal_prefix_tokens": prefix_equal,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serve_{args.preset}_{device.type}_{eng['backend']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, ttft, itl, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return result


def _version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def plot(r, ttft, itl, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = ["raw decode\n(generate)", "engine\n(no HTTP)", "server\n(HTTP streams)"]
    vals = [r["raw_decode"]["decode_tokens_per_s"] or 0, r["engine_direct"]["tokens_per_s"],
            r["server"]["tokens_per_s"]]
    bars = ax[0].bar(names, vals, color=["#888", "#5a9", "#36c"])
    for b, v in zip(bars, vals):
        ax[0].text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom")
    ax[0].set_ylabel("tokens/s (aggregate)")
    n = r["args"]["clients"]
    ax[0].set_title(f"{r['args']['preset']} on {r['device']}, B = {n} clients")
    data = [[x * 1e3 for x in ttft] or [0], [x * 1e3 for x in itl] or [0]]
    ax[1].boxplot(data, whis=(1, 99), showfliers=False)
    ax[1].set_xticks([1, 2], ["time to first token", "inter-token latency"])
    ax[1].set_yscale("log")
    ax[1].set_ylabel("ms (box: quartiles, whiskers: p1-p99)")
    ax[1].set_title(f"TTFT p50/p99 {r['server']['ttft_ms']['p50']:.0f}/{r['server']['ttft_ms']['p99']:.0f} ms, "
                    f"ITL p50/p99 {r['server']['itl_ms']['p50']:.1f}/{r['server']['itl_ms']['p99']:.1f} ms",
                    fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
