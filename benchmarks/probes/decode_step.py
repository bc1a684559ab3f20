"""Where a CUDA-graph decode step's time goes: the captured step replayed and profiled (kernels per step, the
top kernels), the fused mLSTM step kernel's tilings, the batch-1 GEMV configurations against cuBLAS, and a
16k-token prefill. A diagnostic probe (the numbers behind benchmarks/NOTES.md "Generation, third pass"), not a
side-by-side benchmark: benchmarks/generation.py is that.

    OUT=/tmp/probe python benchmarks/probes/decode_step.py stepk,stepk13,gemv,b1,b64,paper,prefill

Parts: stepk (step kernel tilings, 7B heads, B=1/64/256, fp32 and bf16 C), stepk13 (the paper 1.3B's 1024 x 1024
heads), gemv (batch-1 products, cuBLAS vs the Triton GEMV configurations; CUDA-graph timing with the weights
L2-resident where they fit in 50 MB, so in-graph numbers are lower), b1 (7B, B=1, per FASTXLSTM_GEMV mode), b64
(7B B=64 fp32/bf16 states, B=256 bf16), paper (1.3b B=1, with the best stepk13 tiling too), prefill (7B, 16k tokens,
chunk 8192 / 16384, profile), into (7B, B=64 and 256, prompt 256: peak memory and time of the prompt's state
written straight into the decoder's buffers, ``prefill(into=)``, against prefill then ``load``). Writes
$OUT/decode_step.json; BUDGET (s, default 500) stops starting new parts.
"""
import json, os, sys, time, traceback, gc
import torch
import fastxlstm
from fastxlstm.generation import graph as G

OUT = os.environ.get("OUT", "/tmp")
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", "500"))
res = {}
parts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["stepk", "stepk13", "gemv", "b1", "b64", "paper", "prefill",
                                                          "into"]


def dump():
    with open(os.path.join(OUT, "decode_step.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)


def left():
    return BUDGET - (time.time() - T0)


def replay_ms(dec, n=60):
    dec.step()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        dec.graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def prof_replays(dec, n=5, top=25):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            dec.graph.replay()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    key = lambda e: getattr(e, "self_device_time_total", 0)
    tot = sum(key(e) for e in ev)
    cnt = sum(e.count for e in ev if key(e) > 0)
    rows = sorted(ev, key=lambda e: -key(e))[:top]
    return {"gpu_ms_per_step": tot / 1e3 / n, "kernels_per_step": cnt / n,
            "top": [(e.key[:90], round(key(e) / 1e3 / n, 4), e.count / n) for e in rows]}


def build(preset, **kw):
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = fastxlstm.build_model(preset, **kw)
    return m.to(torch.bfloat16).eval()


def decoder(model, B, mode, state_dtype=None):
    t = time.time()
    dec = G.get_decoder(model, B, False, None, False, None, None, compile=mode, state_dtype=state_dtype)
    torch.cuda.synchronize()
    st = model.init_state(B)
    dec.load(st, torch.randint(3, 1000, (B,), device="cuda"))
    return dec, time.time() - t


def run_modes(tag, model, B, modes, profile=True, state_dtypes=(None,)):
    out = {}
    for mode in modes:
        for sd in state_dtypes:
            if left() < 30:
                out[f"{mode}/{sd}"] = "skipped"
                continue
            try:
                dec, ct = decoder(model, B, mode, sd)
                ms = replay_ms(dec)
                r = {"build_s": round(ct, 1), "ms_per_step": round(ms, 4), "tok_per_s": round(B * 1e3 / ms, 1)}
                if profile:
                    r["profile"] = prof_replays(dec)
                out[f"{mode}/{sd}"] = r
                print(tag, mode, sd, {k: v for k, v in r.items() if k != "profile"}, flush=True)
                if profile:
                    for row in r["profile"]["top"][:12]:
                        print("   ", row, flush=True)
                    print("    kernels/step", r["profile"]["kernels_per_step"], "gpu ms", r["profile"]["gpu_ms_per_step"])
            except Exception as e:
                out[f"{mode}/{sd}"] = f"error {type(e).__name__}: {str(e)[:500]}"
                traceback.print_exc()
            G.clear_graphs(model)
            gc.collect()
            torch.cuda.empty_cache()
    res[tag] = out
    dump()


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
import fastxlstm.ops.mlstm_forms.triton._step as STEP

if "stepk" in parts:
    from triton.testing import do_bench_cudagraph
    from fastxlstm.ops.mlstm_forms.triton._step import step_forward
    out = {}
    NH, DQK, DV = 8, 256, 512
    for B in (1, 64, 256):
        for cdt in (torch.float32, torch.bfloat16):
            q = torch.randn(B, NH, DQK, device="cuda", dtype=torch.bfloat16)
            k = torch.randn_like(q); v = torch.randn(B, NH, DV, device="cuda", dtype=torch.bfloat16)
            i = torch.randn(B, NH, device="cuda"); f = torch.randn(B, NH, device="cuda") + 3
            C = torch.randn(B, NH, DQK, DV, device="cuda").to(cdt); n = torch.randn(B, NH, DQK, device="cuda")
            m = torch.zeros(B, NH, device="cuda")
            row = {}
            for BK in (32, 64, 128):
                for BV in (16, 32, 64, 128):
                    for w in (4, 8):
                        if B == 1 and BV > 32: continue
                        if B > 1 and BV < 32: continue
                        try:
                            fn = lambda: step_forward(q, k, v, i, f, C, n, m, 1e-6, C_out=C)
                            with STEP.forced_tiles((BK, BV, w)):
                                ms = do_bench_cudagraph(fn, rep=30)
                            row[f"BK{BK}_BV{BV}_w{w}"] = round(ms * 1e3, 2)
                        except Exception as e:
                            row[f"BK{BK}_BV{BV}_w{w}"] = str(e)[:100]
            fn = lambda: step_forward(q, k, v, i, f, C, n, m, 1e-6, C_out=C)
            row["default"] = round(do_bench_cudagraph(fn, rep=30) * 1e3, 2)
            nb = C.numel() * C.element_size() * 2
            best = min((v, k) for k, v in row.items() if isinstance(v, float))
            print(f"step B={B} {cdt}: default {row['default']} us ({nb / row['default'] / 1e3:.0f} GB/s), best {best} ({nb / best[0] / 1e3:.0f} GB/s)", flush=True)
            out[f"B{B}_{cdt}"] = row
            del q, k, v, C
    res["stepk"] = out
    dump()

if "stepk13" in parts:
    from triton.testing import do_bench_cudagraph
    out = {}
    for (B, NH, D) in ((1, 4, 1024), (8, 4, 1024)):
        q = torch.randn(B, NH, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q); v = torch.randn_like(q)
        i = torch.randn(B, NH, device="cuda"); f = torch.randn(B, NH, device="cuda") + 3
        C = torch.randn(B, NH, D, D, device="cuda"); n = torch.randn(B, NH, D, device="cuda")
        m = torch.zeros(B, NH, device="cuda")
        row = {}
        for BK in (64, 128, 256):
            for BV in (8, 16, 32, 64):
                for w in (4, 8):
                    try:
                        fn = lambda: STEP.step_forward(q, k, v, i, f, C, n, m, 1e-6, C_out=C)
                        with STEP.forced_tiles((BK, BV, w)):
                            row[(BK, BV, w)] = round(do_bench_cudagraph(fn, rep=30) * 1e3, 2)
                    except Exception as e:
                        pass
        fn = lambda: STEP.step_forward(q, k, v, i, f, C, n, m, 1e-6, C_out=C)
        dflt = round(do_bench_cudagraph(fn, rep=30) * 1e3, 2)
        nb = C.numel() * 8
        best = min((t, c) for c, t in row.items())
        print(f"step13 B={B}: default {dflt} us ({nb/dflt/1e3:.0f} GB/s) best {best} ({nb/best[0]/1e3:.0f} GB/s)", flush=True)
        print("   top", sorted((t, c) for c, t in row.items())[:8], flush=True)
        out[f"B{B}"] = {"default": dflt, "best": best, "all": {str(c): t for c, t in row.items()}}
        if B == 1:
            res["best13"] = best[1]
    res["stepk13"] = out
    dump()

if "gemv" in parts:
    from triton.testing import do_bench_cudagraph
    from fastxlstm.generation._gemv import gemv
    shapes = [(12288, 4096), (4096, 4096), (21888, 4096), (4096, 10944), (50304, 4096), (8192, 2048),
              (2048, 4096), (50304, 2048)]
    cfgs = [(8, 1024, 8, 3), (8, 1024, 8, 1), (4, 2048, 8, 1), (16, 512, 8, 1), (16, 512, 4, 1), (32, 256, 4, 1),
            (4, 1024, 4, 1), (8, 512, 4, 1), (2, 2048, 4, 1), (16, 1024, 8, 1), (8, 2048, 8, 1)]
    out = {}
    for N, K in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.double().t()
        row = {}
        fns = {"cublas": lambda: torch.nn.functional.linear(x, w)}
        for c in cfgs:
            fns["g%d_%d_w%d_s%d" % c] = (lambda c: lambda: gemv(x, w, None, *c))(c)
        for name, fn in fns.items():
            try:
                y = fn()
                err = float((y.double() - ref).norm() / ref.norm())
                ms = do_bench_cudagraph(fn, rep=40)
                row[name] = (round(ms * 1e3, 2), round(N * K * 2 / ms / 1e6, 0), err)
            except Exception as e:
                row[name] = str(e)[:200]
        best = min((v for v in row.values() if isinstance(v, tuple)), key=lambda v: v[0])
        print(f"{N}x{K}: cublas {row['cublas']}, best {[k for k, v in row.items() if v == best]} {best}", flush=True)
        out[f"{N}x{K}"] = row
        del w
    res["gemv"] = out
    dump()
    # copy bandwidth for reference
    a = torch.empty(2 ** 28, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench_cudagraph(lambda: b.copy_(a), rep=40)
    res["copy_GBps"] = 2 * a.numel() * 4 / ms / 1e6
    print("copy GB/s", res["copy_GBps"], flush=True)
    del a, b
    dump()

if any(p in parts for p in ("b1", "b64")):
    model = build("7b")
    if "b1" in parts:
        for gm in ("auto", "0", "1"):
            os.environ["FASTXLSTM_GEMV"] = gm
            run_modes(f"7b_B1_gemv{gm}", model, 1, ["blocks"])
        os.environ.pop("FASTXLSTM_GEMV")
    if "b64" in parts:
        run_modes("7b_B64", model, 64, ["blocks"], state_dtypes=(None, "bf16"))
        run_modes("7b_B256", model, 256, ["blocks"], state_dtypes=("bf16",), profile=False)
    del model
    G._BLOCK_CALL = None
    gc.collect()
    torch.cuda.empty_cache()

if "paper" in parts and left() > 40:
    model = build("1.3b")
    run_modes("1.3b_B1", model, 1, ["blocks"])
    if "best13" in res:
        with STEP.forced_tiles(res["best13"]):
            run_modes("1.3b_B1_besttile", model, 1, ["blocks"])
    del model
    G._BLOCK_CALL = None
    gc.collect(); torch.cuda.empty_cache()

if "prefill" in parts:
    model = build("7b")
    from fastxlstm.generation.graph import prefill
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(3, 50000, (1, 16384), device="cuda")
    pre = {}
    with torch.no_grad():
        for cl in (8192, 16384):
            prefill(model, ids, None, chunk_len=cl)
            torch.cuda.synchronize()
            t = time.time()
            for _ in range(3):
                prefill(model, ids, None, chunk_len=cl)
            torch.cuda.synchronize()
            pre[str(cl)] = (time.time() - t) / 3
            print("prefill chunk", cl, pre[str(cl)], flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            prefill(model, ids, None, chunk_len=8192)
            torch.cuda.synchronize()
        ev = prof.key_averages()
        key = lambda e: getattr(e, "self_device_time_total", 0)
        pre["total_gpu_ms"] = sum(key(e) for e in ev) / 1e3
        pre["top"] = [(e.key[:90], round(key(e) / 1e3, 3), e.count) for e in sorted(ev, key=lambda e: -key(e))[:25]]
        print("total gpu ms", pre["total_gpu_ms"])
        for r in pre["top"]:
            print("   ", r)
    res["prefill16k"] = pre
    dump()
if "into" in parts and left() > 60:
    model = build("7b")
    into = {}
    for B in (64, 256):
        dec, _ = decoder(model, B, "blocks")
        ids = torch.randint(3, 50000, (B, 256), device="cuda")
        row = {}
        for how in ("copy", "into", "copy", "into"):  # twice each, the second timed
            gc.collect()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
            with torch.no_grad():
                if how == "copy":
                    _, st = G.prefill(model, ids, None)
                    dec.load(st, ids[:, -1])
                    del st
                else:
                    G.prefill(model, ids, None, into=dec.state)
                    dec.load(None, ids[:, -1])
            torch.cuda.synchronize()
            row[how] = {"s": time.time() - t, "peak_extra_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}
        state_gb = sum(t.numel() * t.element_size() for t in G._state_tensors(dec.state) if t is not None) / 1e9
        row["state_gb"] = state_gb
        print("into B", B, row, flush=True)
        into[str(B)] = row
        del dec
        G.clear_graphs(model)
    res["prefill_into"] = into
dump()
print("done", time.time() - T0)
