"""mLSTM kernels side by side on one GPU: ours (fastxlstm Triton), the official mlstm_kernels (chunkwise
triton_limit_chunk and triton_xl_chunk), fla chunk_simple_gla and torch SDPA flash (causal softmax attention).

    python benchmarks/mlstm_kernels.py --out benchmarks/results/h200_mlstm.json     # on the GPU
    python benchmarks/mlstm_kernels.py --plot benchmarks/results/h200_mlstm.json    # png + markdown table
    python benchmarks/mlstm_kernels.py --layouts    # strided vs contiguous inputs, recomputed vs stored states

Shapes (those of the published mLSTM kernel benchmarks): 65,536 tokens per call (B = 65536 / S), bf16 inputs; shape A: NH=16, DQK=DV=128;
shape B: NH=8, DQK=256, DV=512; S = 1k, 4k, 16k; "fw" = forward, "fwbw" = forward + backward of a random output
gradient. Decode step: 8 heads 256 x 512, fp32 state, B = 1, 64, 256. Times: median of triton.testing.do_bench.
Competitors run in subprocesses (one per kernel; restarted after a crash), so a compiler abort is recorded, not
fatal. Our kernels are checked against float64 references in the same call before they are timed.

Model FLOPs (for TFLOP/s): per token per head 4 DQK DV + 64 (DQK + DV) forward (the chunkwise count
at chunk 64, the same for every kernel), 3x that for fwbw. Byte floor: q, k, v read and h written once (bf16);
fwbw adds dh, q, k, v read and dq, dk, dv written. Floor time = max(bytes / copy bandwidth, FLOPs / bf16 matmul
rate), both measured in the same call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

# this file shares its name with the official package it benchmarks: keep its folder off the import path so that
# `import mlstm_kernels` finds the package
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

TOKENS = 65536
SHAPES = {
    "A": dict(NH=16, DQK=128, DV=128),
    "B": dict(NH=8, DQK=256, DV=512),
}
SEQ = (1024, 4096, 16384)
DECODE_B = (1, 64, 256)
DECODE = dict(NH=8, DQK=256, DV=512)


def shape_list():
    return [(name, S) for name in SHAPES for S in SEQ]


def model_flops(name, S, mode):
    d = SHAPES[name]
    per = 4 * d["DQK"] * d["DV"] + 64 * (d["DQK"] + d["DV"])
    f = TOKENS * d["NH"] * per
    return f * (3 if mode == "fwbw" else 1)


def floor_bytes(name, S, mode):
    d = SHAPES[name]
    fw = 2 * (2 * d["DQK"] + 2 * d["DV"])
    bw = 2 * (2 * d["DQK"] + 2 * d["DV"]) + 2 * (2 * d["DQK"] + d["DV"])
    return TOKENS * d["NH"] * (fw + (bw if mode == "fwbw" else 0))


# ------------------------------------------------------------------------------------------------------------
# inputs and timing
# ------------------------------------------------------------------------------------------------------------

def make_inputs(name, S, dtype, requires_grad, seed=0, batch=None):
    import torch
    d = SHAPES[name]
    B = batch if batch is not None else TOKENS // S
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, d["NH"], S, d["DQK"], device="cuda", generator=g).to(dtype)
    k = torch.randn(B, d["NH"], S, d["DQK"], device="cuda", generator=g).to(dtype)
    v = torch.randn(B, d["NH"], S, d["DV"], device="cuda", generator=g).to(dtype)
    i = torch.randn(B, d["NH"], S, device="cuda", generator=g).to(dtype)
    f = (3.0 + torch.randn(B, d["NH"], S, device="cuda", generator=g)).to(dtype)
    dh = torch.randn(B, d["NH"], S, d["DV"], device="cuda", generator=g).to(dtype)
    xs = [q, k, v, i, f]
    if requires_grad:
        for x in xs:
            x.requires_grad_(True)
    return xs, dh


def bench(fn, warmup=20, rep=60):
    import triton
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def fw_and_fwbw(call, xs, dh):
    """call(q, k, v, i, f) -> h. Returns (fw_fn, fwbw_fn)."""
    import torch

    def fw():
        with torch.no_grad():
            call(*xs)

    def fwbw():
        h = call(*xs)
        torch.autograd.grad(h, xs, dh)

    return fw, fwbw


# ------------------------------------------------------------------------------------------------------------
# competitors (subprocess workers)
# ------------------------------------------------------------------------------------------------------------

def competitor_call(kernel):
    import torch
    if kernel.startswith("mlstm_kernels:"):
        from mlstm_kernels.torch import get_mlstm_kernel
        fn = get_mlstm_kernel(kernel.split(":", 1)[1])
        chunk = 64 if "limit" in kernel else 128

        def call(q, k, v, i, f):
            return fn(q=q, k=k, v=v, i=i, f=f, chunk_size=chunk)
        return call
    if kernel == "fla:chunk_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        def call(q, k, v, i, f):
            # fla wants (B, T, H, D) and a log decay; no input gate, no normaliser (less work than the mLSTM)
            g = torch.nn.functional.logsigmoid(f.float()).transpose(1, 2)
            o, _ = chunk_simple_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g=g)
            return o.transpose(1, 2)
        return call
    raise ValueError(kernel)


def worker_main(kernel, jobs):
    """Prints one RESULT json line per finished (shape, mode); the parent restarts us after a crash."""
    import torch
    for job in jobs:
        name, S, mode = job.split(":")
        S = int(S)
        rec = {"kernel": kernel, "shape": name, "S": S, "mode": mode}
        try:
            if kernel == "mlstm_kernels:step":
                rec.update(decode_competitor(S))
            else:
                call = competitor_call(kernel)
                xs, dh = make_inputs(name, S, torch.bfloat16, mode == "fwbw")
                fw, fwbw = fw_and_fwbw(call, xs, dh)
                fn = fw if mode == "fw" else fwbw
                fn()
                torch.cuda.synchronize()
                rec["ms"] = bench(fn)
                del xs, dh
        except Exception as e:  # a Python-level refusal (not a crash): recorded with its message
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        torch.cuda.empty_cache()
        print("RESULT " + json.dumps(rec), flush=True)


def decode_competitor(B):
    import torch
    from mlstm_kernels.torch import get_mlstm_step_kernel
    step = get_mlstm_step_kernel("triton")
    d = DECODE
    q = torch.randn(B, d["NH"], d["DQK"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(B, d["NH"], d["DV"], device="cuda", dtype=torch.bfloat16)
    i = torch.randn(B, d["NH"], 1, device="cuda", dtype=torch.bfloat16)
    f = i + 3
    C = torch.randn(B, d["NH"], d["DQK"], d["DV"], device="cuda")
    n = torch.randn(B, d["NH"], d["DQK"], device="cuda")
    m = torch.randn(B, d["NH"], 1, device="cuda")

    def fn():
        step(q=q, k=k, v=v, i=i, f=f, c=C, n=n, m=m)
    fn()
    torch.cuda.synchronize()
    return {"ms": bench(fn, warmup=50, rep=200)}


def run_competitor(kernel, jobs, timeout=420, max_crashes=2):
    """Runs the jobs in subprocesses; a dead worker marks the job it was on as a crash and we go on without it.
    After max_crashes crashes the remaining jobs are recorded as skipped."""
    results, todo, crashes = [], list(jobs), 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while todo:
        if crashes >= max_crashes:
            for job in todo:
                name, S, mode = job.split(":")
                results.append({"kernel": kernel, "shape": name, "S": int(S), "mode": mode,
                                "error": f"skipped: the worker crashed {crashes} times on earlier shapes"})
            break
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kernel, *todo],
                                  capture_output=True, text=True, timeout=timeout, env=env)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = f"timeout after {timeout} s", -9
        done = [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
        results.extend(done)
        todo = todo[len(done):]
        print(f"  {kernel}: {len(done)} results in {time.time() - t0:.0f} s, rc={rc}", flush=True)
        if rc != 0 and todo:
            crashes += 1
            name, S, mode = todo[0].split(":")
            tail = [ln for ln in err.strip().splitlines() if ln.strip()][-3:]
            results.append({"kernel": kernel, "shape": name, "S": int(S), "mode": mode,
                            "error": f"crash (exit {rc}): " + " | ".join(tail)[:600]})
            todo = todo[1:]
        elif rc != 0:
            break
    return results


# ------------------------------------------------------------------------------------------------------------
# ours: correctness, timing
# ------------------------------------------------------------------------------------------------------------

def check_ours(name, S, dtypes=("bf16", "fp32")):
    """bf16 and fp32 (IEEE) runs of our kernel on a 1-sequence slice of the benchmark shape, against the lead's
    chunkwise PyTorch form in float64 (itself tested against the step reference), outputs and all gradients."""
    import torch
    from fastxlstm.ops.mlstm_forms.chunkwise import mlstm_chunkwise
    from fastxlstm.ops.mlstm_forms.triton import mlstm_triton
    errs = {}
    for dtype in [{"bf16": torch.bfloat16, "fp32": torch.float32}[d] for d in dtypes]:
        xs, dh = make_inputs(name, S, dtype, True, seed=1, batch=1)
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        h, (C, n, m) = mlstm_triton(*leaves)
        gC, gn = torch.randn_like(C), torch.randn_like(n)
        loss_in = [(h, dh), (C, gC), (n, gn)]
        g = torch.autograd.grad([a for a, _ in loss_in], leaves, [b for _, b in loss_in])
        ref_leaves = [x.detach().double().requires_grad_(True) for x in xs]
        hr, (Cr, nr, mr) = mlstm_chunkwise(*ref_leaves, chunk_size=64)
        gr = torch.autograd.grad([hr, Cr, nr], ref_leaves, [dh.double(), gC.double(), gn.double()])
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        for nm, a, b in [("h", h, hr), ("C", C, Cr), ("n", n, nr), ("m", m, mr)] + \
                [("d_" + k, a_, b_) for k, a_, b_ in zip("qkvif", g, gr)]:
            a64, b64 = a.detach().double(), b.detach().double()
            errs[f"{tag}_{nm}"] = float((a64 - b64).norm() / b64.norm())
            if not torch.isfinite(a).all():
                errs[f"{tag}_{nm}"] = float("nan")
        del xs, leaves, ref_leaves
    return errs


def bench_ours(name, S, config=None):
    import torch
    from fastxlstm.ops.mlstm_forms.triton._chunkwise import mlstm_chunkwise_triton

    def call(q, k, v, i, f):
        return mlstm_chunkwise_triton(q, k, v, i, f, config=config)[0]
    out = {}
    for mode in ("fw", "fwbw"):
        xs, dh = make_inputs(name, S, torch.bfloat16, mode == "fwbw")
        fw, fwbw = fw_and_fwbw(call, xs, dh)
        fn = fw if mode == "fw" else fwbw
        fn()
        torch.cuda.synchronize()
        out[mode] = bench(fn)
        del xs, dh
        torch.cuda.empty_cache()
    return out


def bench_sdpa(name, S):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    d = SHAPES[name]
    D = min(d["DQK"], 256)
    B = TOKENS // S
    out = {}
    for mode in ("fw", "fwbw"):
        q, k, v = (torch.randn(B, d["NH"], S, D, device="cuda", dtype=torch.bfloat16, requires_grad=mode == "fwbw")
                   for _ in range(3))
        dh = torch.randn_like(q)

        def call(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if mode == "fw":
            def fn():
                with torch.no_grad():
                    call(q, k, v)
        else:
            def fn():
                torch.autograd.grad(call(q, k, v), [q, k, v], dh)
        try:
            fn()
            torch.cuda.synchronize()
            out[mode] = bench(fn)
        except Exception as e:
            out[mode + "_error"] = f"{type(e).__name__}: {e}"[:300]
        del q, k, v, dh
    out["note"] = f"head dim {D} for q, k and v" + (" (less work than the mLSTM's DV=512)" if D != d["DV"] else "")
    return out


def bench_decode_ours(B):
    import torch
    from fastxlstm.ops.mlstm_forms.reference import mlstm_step_reference
    from fastxlstm.ops.mlstm_forms.triton import mlstm_step_triton
    d = DECODE
    q = torch.randn(B, d["NH"], d["DQK"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(B, d["NH"], d["DV"], device="cuda", dtype=torch.bfloat16)
    i = torch.randn(B, d["NH"], device="cuda", dtype=torch.bfloat16)
    f = i + 3
    C = torch.randn(B, d["NH"], d["DQK"], d["DV"], device="cuda")
    n = torch.randn(B, d["NH"], d["DQK"], device="cuda")
    m = torch.randn(B, d["NH"], device="cuda")
    h, (C1, n1, m1) = mlstm_step_triton(q, k, v, i, f, (C, n, m))
    hr, (Cr, nr, mr) = mlstm_step_reference(q.double(), k.double(), v.double(), i.double(), f.double(),
                                            (C.double(), n.double(), m.double()))
    err = {"h": float((h.double() - hr).norm() / hr.norm()), "C": float((C1.double() - Cr).norm() / Cr.norm())}

    def fn():
        mlstm_step_triton(q, k, v, i, f, (C, n, m))
    ms = bench(fn, warmup=50, rep=200)
    # CUDA graph replay: what a decode loop that captures its step sees (no Python launch overhead)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms_graph = bench(graph.replay, warmup=50, rep=200)
    return {"ms": ms, "ms_cuda_graph": ms_graph, "err": err}


def decode_bytes(B):
    d = DECODE
    state = 4 * (d["DQK"] * d["DV"] + d["DQK"] + 1)
    return B * d["NH"] * (2 * state + 2 * (2 * d["DQK"] + 2 * d["DV"]))


def ceilings():
    import torch
    x = torch.empty(2 * 1024 ** 3 // 4, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / (ms * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = bench(lambda: a @ b)
    tf = 2 * 8192 ** 3 / (ms * 1e-3)
    return {"copy_bytes_per_s": bw, "bf16_matmul_flops": tf}


def versions():
    import importlib.metadata as md
    import torch
    import triton
    out = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    for p in ("mlstm_kernels", "flash-linear-attention", "fla-core"):
        try:
            out[p] = md.version(p)
        except Exception:
            out[p] = None
    return out


def main_bench(args):
    """Stages in order of importance; the json is rewritten after each, so a run cut short keeps what it has."""
    import torch
    t_start = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(), "versions": versions(), "tokens_per_call": TOKENS,
           "shapes": SHAPES, "decode": DECODE, "notes": {
               "mlstm_kernels": "default kwargs (autocast_kernel_dtype fp32 for the kernels' internal "
                                "accumulation), chunk 64 (limit_chunk) / 128 (xl_chunk)",
               "fla": "chunk_simple_gla: scalar decay only, no input gate, no normaliser",
               "sdpa": "flash backend, causal; shape B with head dim 256 for v too"},
           "ours": {}, "sdpa": {}, "check": {}, "decode_ours": {}, "competitors": []}

    def save(stage):
        res["wall_s"] = time.time() - t_start
        json.dump(res, open(args.out, "w"), indent=1)
        print(f"[{res['wall_s']:.0f} s] {stage} done", flush=True)

    res["ceilings"] = ceilings()
    save("ceilings")
    for name, S in shape_list():
        res["ours"][f"{name}{S}"] = bench_ours(name, S)
        print("ours", name, S, res["ours"][f"{name}{S}"], flush=True)
    save("ours")
    for name, S in shape_list():
        res["sdpa"][f"{name}{S}"] = bench_sdpa(name, S)
        torch.cuda.empty_cache()
    save("sdpa")
    for B in DECODE_B:
        r = bench_decode_ours(B)
        r["tb_per_s"] = decode_bytes(B) / (r["ms"] * 1e-3) / 1e12
        r["tb_per_s_cuda_graph"] = decode_bytes(B) / (r["ms_cuda_graph"] * 1e-3) / 1e12
        res["decode_ours"][str(B)] = r
        print("decode ours", B, r, flush=True)
    save("decode")
    if not args.no_competitors:
        jobs = [f"{name}:{S}:{mode}" for name, S in shape_list() for mode in ("fw", "fwbw")]
        # fla: every forward first (its backward is refused on Triton < 3.7.1 on Hopper, and the first attempt can
        # spend minutes compiling before it says so)
        jobs_fw_first = [j for j in jobs if j.endswith(":fw")] + [j for j in jobs if j.endswith(":fwbw")]
        for kernel, jb in (("mlstm_kernels:chunkwise--triton_limit_chunk", jobs),
                           ("mlstm_kernels:step", [f"decode:{B}:step" for B in DECODE_B]),
                           ("fla:chunk_simple_gla", jobs_fw_first),
                           ("mlstm_kernels:chunkwise--triton_xl_chunk", jobs)):
            res["competitors"] += run_competitor(kernel, jb, timeout=args.competitor_timeout)
            save(kernel)
    # correctness of our kernels in the same call (last: the fp32 IEEE kernels take minutes to compile)
    for name, S in shape_list():
        if S not in args.check_seq:
            continue
        try:
            res["check"][f"{name}{S}"] = check_ours(name, S, args.check_dtypes)
        except Exception:
            res["check"][f"{name}{S}"] = {"error": traceback.format_exc()[-800:]}
            print(res["check"][f"{name}{S}"]["error"], flush=True)
        print("check", name, S, {k: f"{v:.1e}" for k, v in res["check"][f"{name}{S}"].items()
                                  if isinstance(v, float)}, flush=True)
        torch.cuda.empty_cache()
    save("check")
    print_table(res)


# ------------------------------------------------------------------------------------------------------------
# report: table and plot
# ------------------------------------------------------------------------------------------------------------

def rows(res):
    """(kernel, shape, S, mode) -> ms or error string."""
    out = {}
    for key, r in res["ours"].items():
        for mode in ("fw", "fwbw"):
            out[("ours (fastxlstm triton)", key[0], int(key[1:]), mode)] = r[mode]
    for key, r in res["sdpa"].items():
        for mode in ("fw", "fwbw"):
            out[("torch SDPA flash (causal)", key[0], int(key[1:]), mode)] = r.get(mode, r.get(mode + "_error"))
    for r in res.get("competitors", []):
        if r["shape"] == "decode":
            continue
        nm = r["kernel"].replace("mlstm_kernels:chunkwise--", "mlstm_kernels ")
        out[(nm, r["shape"], r["S"], r["mode"])] = r.get("ms", r.get("error"))
    return out


def print_table(res, file=None):
    ce = res["ceilings"]
    lines = [f"GPU {res['gpu']}; torch {res['versions']['torch']}, triton {res['versions']['triton']}, "
             f"mlstm_kernels {res['versions'].get('mlstm_kernels')}, fla {res['versions'].get('fla-core')}; "
             f"{res['date']}. Copy {ce['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{ce['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s (measured).", "",
             "Times in ms (median), 65,536 tokens per call, bf16. For ours in brackets: model TFLOP/s, and the compulsory "
             "bytes (q, k, v read and h written; fwbw adds dh read and dq, dk, dv written) per second, to set against "
             "the copy bandwidth above; the floor row is the time at that bandwidth or at the matmul rate.", ""]
    cols = [(n, S, mode) for n in SHAPES for S in SEQ for mode in ("fw", "fwbw")]
    lines.append("| kernel | " + " | ".join(f"{n} S={S // 1024}k {mode}" for n, S, mode in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    R = rows(res)
    kernels = []
    for k in R:
        if k[0] not in kernels:
            kernels.append(k[0])
    for kn in kernels:
        cells = []
        for n, S, mode in cols:
            v = R.get((kn, n, S, mode))
            if isinstance(v, float):
                cell = f"{v:.3f}"
                if kn.startswith("ours"):
                    cell += (f" ({model_flops(n, S, mode) / (v * 1e-3) / 1e12:.0f} TF, "
                             f"{floor_bytes(n, S, mode) / (v * 1e-3) / 1e12:.2f} TB/s)")
            elif v is None:
                cell = "-"
            else:
                cell = ("refused" if ("refused" in v or "incorrect results" in v) else "crash" if "crash" in v
                        else "skipped" if v.startswith("skipped") else "error")
            cells.append(cell)
        lines.append(f"| {kn} | " + " | ".join(cells) + " |")
    for an, vals in res.get("published_anchors", {}).items():
        if not isinstance(vals, dict) or "step" in an:
            continue
        cells = []
        for n, S, mode in cols:
            v = vals.get(f"{n}{S}")
            v = None if v is None else v[0 if mode == "fw" else 1]
            cells.append("-" if v is None else f"{v:.2f}")
        lines.append(f"| {an} | " + " | ".join(cells) + " |")
    fl = []
    for n, S, mode in cols:
        t_b = floor_bytes(n, S, mode) / ce["copy_bytes_per_s"]
        t_f = model_flops(n, S, mode) / ce["bf16_matmul_flops"]
        fl.append(f"{max(t_b, t_f) * 1e3:.3f}")
    lines.append("| floor (max of bytes, FLOPs) | " + " | ".join(fl) + " |")
    lines += ["", "Decode step (8 heads 256x512, fp32 state, bf16 q/k/v): ms, effective TB/s of state read+write.", "",
              "| B | ours ms | ours TB/s | ours ms (CUDA graph) | ours TB/s (graph) | mlstm_kernels triton step ms |",
              "|---|---|---|---|---|---|"]
    comp = {r["S"]: r for r in res.get("competitors", []) if r["shape"] == "decode"}
    for B, r in res["decode_ours"].items():
        c = comp.get(int(B), {})
        cv = f"{c['ms']:.4f}" if "ms" in c else (c.get("error", "-")[:40] or "-")
        anc = res.get("published_anchors", {}).get("mlstm_kernels triton step (anchor, ms)", {})
        if cv == "-" and B in anc:
            cv = f"{anc[B]} (anchor)"
        lines.append(f"| {B} | {r['ms']:.4f} | {r['tb_per_s']:.2f} | {r['ms_cuda_graph']:.4f} | "
                     f"{r['tb_per_s_cuda_graph']:.2f} | {cv} |")
    fu = res.get("decode_ours_followup")
    if fu:
        lines += ["", "Ours after a host-side fix of the step wrapper (plain integer tiling helpers; " + fu["note"] + "): "
                  + "; ".join(
            f"B={B} {fu[B]['ms']:.4f} ms ({decode_bytes(int(B)) / (fu[B]['ms'] * 1e-3) / 1e12:.2f} TB/s)"
            for B in ("1", "64", "256") if B in fu) + f". Host time of one B=1 call: {fu['1']['host_us_per_call']} us "
            f"(before: {fu['host_us_per_call_before_fix']} us)."]
    if res.get("competitors_not_run"):
        lines += ["", "Not run side by side: " + res["competitors_not_run"]]
    errs = [r for r in res.get("competitors", []) if "error" in r]
    if errs:
        lines += ["", "Competitor failures (first message):", ""]
        seen = set()
        for r in errs:
            key = (r["kernel"], r["error"][:80])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {r['kernel']} {r['shape']} S={r['S']} {r['mode']}: {r['error'][:300]}")
    text = "\n".join(lines)
    print(text)
    if file:
        with open(file, "w") as fh:
            fh.write(text + "\n")
    return text


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    R = rows(res)
    for an, vals in res.get("published_anchors", {}).items():  # hatched: not measured side by side
        if isinstance(vals, dict) and "step" not in an and "SDPA" not in an:
            for key, (fw, fwbw) in vals.items():
                for mode, v in (("fw", fw), ("fwbw", fwbw)):
                    if v is not None:
                        R[(an, key[0], int(key[1:]), mode)] = float(v)
    kernels = []
    for k in R:
        if k[0] not in kernels:
            kernels.append(k[0])
    fig, axes = plt.subplots(1, 5, figsize=(24, 5))
    panels = [(n, mode) for n in SHAPES for mode in ("fw", "fwbw")]
    colors = {kn: f"C{j}" for j, kn in enumerate(kernels)}
    for ax, (n, mode) in zip(axes, panels):
        width = 0.8 / max(1, len(kernels))
        for j, kn in enumerate(kernels):
            xs, ys = [], []
            for s_i, S in enumerate(SEQ):
                v = R.get((kn, n, S, mode))
                if isinstance(v, float):
                    xs.append(s_i + j * width)
                    ys.append(v)
                elif isinstance(v, str):  # a failed competitor: say so where its bar would be
                    word = "refused" if ("refused" in v or "incorrect results" in v) else "crash"
                    ax.text(s_i + j * width, 0.02, word, rotation=90, fontsize=6, ha="center", va="bottom",
                            transform=ax.get_xaxis_transform(), color=colors[kn])
            ax.bar(xs, ys, width=width, label=kn, color=colors[kn], hatch="//" if "anchor" in kn else None)
        for s_i, S in enumerate(SEQ):
            t_fl = max(floor_bytes(n, S, mode) / res["ceilings"]["copy_bytes_per_s"],
                       model_flops(n, S, mode) / res["ceilings"]["bf16_matmul_flops"]) * 1e3
            ax.hlines(t_fl, s_i - width / 2, s_i + 0.8 - width / 2, colors="k", linestyles="dashed",
                      label="floor" if s_i == 0 else None)
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(SEQ))])
        ax.set_xticklabels([f"S={S // 1024}k" for S in SEQ])
        ax.set_yscale("log")
        ax.set_title(f"shape {n} {mode} (ms, 65k tokens)")
    axes[0].legend(fontsize=6)
    ax = axes[4]
    Bs = list(res["decode_ours"])
    fu = res.get("decode_ours_followup") or {}
    w = 0.27 if fu else 0.4
    ax.bar([x - w for x in range(len(Bs))] if fu else [x - 0.2 for x in range(len(Bs))],
           [res["decode_ours"][b]["ms"] for b in Bs], w, label="ours")
    if fu:
        ax.bar(list(range(len(Bs))), [fu.get(b, {}).get("ms", 0) for b in Bs], w,
               label="ours, host fix (follow-up call)")
    comp = {str(r["S"]): r.get("ms") for r in res.get("competitors", []) if r["shape"] == "decode"}
    label = "mlstm_kernels step"
    if not any(comp.values()):
        comp = res.get("published_anchors", {}).get("mlstm_kernels triton step (anchor, ms)", {})
        label += " (anchor)"
    ax.bar([x + (w if fu else 0.2) for x in range(len(Bs))], [comp.get(b) or 0 for b in Bs], w, label=label,
           hatch="//" if "anchor" in label else None)
    ax.set_xticks(range(len(Bs)))
    ax.set_xticklabels([f"B={b}" for b in Bs])
    ax.set_yscale("log")
    ax.set_title("decode step (ms)")
    ax.legend(fontsize=7)
    fig.suptitle(f"mLSTM kernels on {res['gpu']} ({res['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------------
# layouts and recomputed chunk states (--layouts): the 350M model's cell, as its layers call it
# ------------------------------------------------------------------------------------------------------------

LAYOUT_SHAPE = dict(B=8, NH=4, S=2048, DQK=512, DV=512)  # the 350M model's cell at 16,384 tokens
LAYOUTS = {
    "contiguous": "(B, NH, S, D) contiguous inputs, h as returned (the kernels alone)",
    "strided": "the layers' call: (B, S, NH * D) projections seen as (B, NH, S, D), h back to (B, S, NH * DV)",
    "strided+copies": "the same with the copies the cell made before strided inputs were read in place: q, k, v "
                      "made contiguous, h transposed back by a copy (and the matching copies in the backward)",
}


def to_layout(t, layout):
    """A (B, NH, S, D) tensor as the variant's leaves hold it: as is, or as the layers' (B, S, NH * D)."""
    if layout == "contiguous":
        return t.contiguous()
    B, NH, S, D = t.shape
    return t.transpose(1, 2).reshape(B, S, NH * D).contiguous()


def layout_call(layout, recompute, S, NH, DQK, DV):
    """(make_leaves(B, seed), call(leaves) -> output) for one variant; leaves are what the timed function gets."""
    import torch
    from fastxlstm.ops.mlstm_forms.triton._chunkwise import default_config, mlstm_chunkwise_triton
    cfg = default_config(DQK, DV, recompute_states=recompute)

    def make(B, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        # the same values in every variant: drawn as (B, NH, S, D), then laid out as the variant takes them
        q, k, v = (to_layout(torch.randn(B, NH, S, d, device="cuda", generator=g).to(torch.bfloat16), layout)
                   for d in (DQK, DQK, DV))
        i = torch.randn(B, NH, S, device="cuda", generator=g)
        f = 3.0 + torch.randn(B, NH, S, device="cuda", generator=g)
        return [q, k, v, i, f]

    def call(q, k, v, i, f):
        if layout == "contiguous":
            return mlstm_chunkwise_triton(q, k, v, i, f, config=cfg)[0]
        B = q.shape[0]
        q, k, v = (t.view(B, S, NH, -1).transpose(1, 2) for t in (q, k, v))
        if layout == "strided+copies":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = mlstm_chunkwise_triton(q, k, v, i, f, config=cfg)[0]
        return h.transpose(1, 2).reshape(B, S, NH * DV)  # a view when h is in v's layout, else a copy
    return make, call


def bench_layout(layout, recompute, d):
    """fw / fwbw ms, the peak memory of each above what was allocated before (the inputs), and what a forward
    keeps for its backward."""
    import torch
    make, call = layout_call(layout, recompute, d["S"], d["NH"], d["DQK"], d["DV"])
    out = {}
    for mode in ("fw", "fwbw"):
        xs = make(d["B"])
        if mode == "fwbw":
            for x in xs:
                x.requires_grad_(True)
        g = torch.Generator(device="cuda").manual_seed(9)
        dh = to_layout(torch.randn(d["B"], d["NH"], d["S"], d["DV"], device="cuda", generator=g).to(torch.bfloat16),
                       layout)
        fw, fwbw = fw_and_fwbw(call, xs, dh)
        fn = fw if mode == "fw" else fwbw
        fn()
        torch.cuda.synchronize()
        out[mode + "_ms"] = bench(fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        out[mode + "_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        if mode == "fwbw":
            hold = [call(*xs)]  # the output and its graph, alive
            torch.cuda.synchronize()
            out["kept_by_forward_mb"] = (torch.cuda.memory_allocated() - base) / 2 ** 20
            hold.clear()
        del xs, dh
        torch.cuda.empty_cache()
    return out


def check_layouts(d):
    """Every variant's outputs and gradients against the first one, bit for bit (the same kernels on the same
    values; the copies change no value), and the strided recompute variant against the float64 chunkwise form on
    one sequence of 512 tokens (relative errors)."""
    import torch
    from fastxlstm.ops.mlstm_forms.chunkwise import mlstm_chunkwise
    res = {"bitwise_vs_contiguous_stored": {}}
    first = None
    B = 2
    for layout in LAYOUTS:
        for rec in (False, True):
            make, call = layout_call(layout, rec, d["S"], d["NH"], d["DQK"], d["DV"])
            xs = [x.requires_grad_(True) for x in make(B, seed=3)]
            h = call(*xs)
            g = torch.Generator(device="cuda").manual_seed(4)
            dh = to_layout(torch.randn(B, d["NH"], d["S"], d["DV"], device="cuda", generator=g).to(h.dtype), layout)
            grads = torch.autograd.grad(h, xs, dh)
            B_, S, NH = B, d["S"], d["NH"]
            norm = lambda t: t if layout == "contiguous" else t.view(B_, S, NH, -1).transpose(1, 2)  # noqa: E731
            vals = [norm(h.detach())] + [norm(gr) if j < 3 else gr for j, gr in enumerate(grads)]
            if first is None:
                first = vals
            key = f"{layout}/{'recompute' if rec else 'stored'}"
            res["bitwise_vs_contiguous_stored"][key] = all(torch.equal(a, b) for a, b in zip(vals, first))
            del xs, h, grads, vals
    make, call = layout_call("strided", True, 512, d["NH"], d["DQK"], d["DV"])
    xs = [x.requires_grad_(True) for x in make(1, seed=5)]
    h = call(*xs)
    dh = torch.randn_like(h)
    grads = torch.autograd.grad(h, xs, dh)
    ref = [x.detach().double().requires_grad_(True) for x in xs]
    heads = lambda t: t.view(1, 512, d["NH"], -1).transpose(1, 2)  # noqa: E731
    hr = mlstm_chunkwise(heads(ref[0]), heads(ref[1]), heads(ref[2]), ref[3], ref[4], chunk_size=64)[0]
    hr = hr.transpose(1, 2).reshape(h.shape)
    gr = torch.autograd.grad(hr, ref, dh.double())
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    names = ["h", "d_q", "d_k", "d_v", "d_i", "d_f"]
    res["strided_recompute_vs_float64"] = {nm: rel(a, b) for nm, a, b in zip(names, [h] + list(grads), [hr] + list(gr))}
    return res


def main_layouts(args):
    import torch
    d = dict(LAYOUT_SHAPE)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(), "versions": versions(), "shape": d, "dtype": "bf16",
           "layouts": LAYOUTS, "runs": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.layouts_out)), exist_ok=True)
    res["check"] = check_layouts(d)
    print("check", json.dumps(res["check"]), flush=True)
    torch.cuda.empty_cache()
    for layout in LAYOUTS:
        for rec in (False, True):
            key = f"{layout}/{'recompute' if rec else 'stored'}"
            res["runs"][key] = bench_layout(layout, rec, d)
            print(key, {k: round(v, 3) for k, v in res["runs"][key].items()}, flush=True)
            json.dump(res, open(args.layouts_out, "w"), indent=1)
    lines = [f"{res['gpu']}, torch {res['versions']['torch']}, triton {res['versions']['triton']}, {res['date']}; "
             f"B={d['B']} NH={d['NH']} S={d['S']} DQK={d['DQK']} DV={d['DV']} bf16 (peak and kept: MiB above the "
             "inputs)", "", "| variant | fw ms | fwbw ms | fw peak MiB | fwbw peak MiB | kept by forward MiB |",
             "|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        lines.append(f"| {key} | {r['fw_ms']:.3f} | {r['fwbw_ms']:.3f} | {r['fw_peak_mb']:.0f} | "
                     f"{r['fwbw_peak_mb']:.0f} | {r['kept_by_forward_mb']:.0f} |")
    print("\n".join(lines))
    plot_layouts(res, os.path.splitext(args.layouts_out)[0] + ".png")


def plot_layouts(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(res["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    x = range(len(keys))
    for j, (mode, col) in enumerate((("fw_ms", "C0"), ("fwbw_ms", "C1"))):
        axes[0].bar([i + 0.4 * j for i in x], [res["runs"][k][mode] for k in keys], 0.4, label=mode[:-3], color=col)
    for j, (mode, col) in enumerate((("fwbw_peak_mb", "C2"), ("kept_by_forward_mb", "C3"))):
        axes[1].bar([i + 0.4 * j for i in x], [res["runs"][k][mode] for k in keys], 0.4, label=mode[:-3], color=col)
    for ax, title in zip(axes, ("time (ms)", "memory above the inputs (MiB)")):
        ax.set_xticks([i + 0.2 for i in x])
        ax.set_xticklabels(keys, rotation=20, fontsize=7, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=7)
    d = res["shape"]
    fig.suptitle(f"mLSTM cell layouts and recomputed states on {res['gpu']} (B={d['B']} NH={d['NH']} S={d['S']} "
                 f"{d['DQK']}x{d['DV']} bf16, {res['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/h200_mlstm.json")
    ap.add_argument("--plot", help="make the png and the README table from a results json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check-seq", type=int, nargs="*", default=list(SEQ))
    ap.add_argument("--check-dtypes", nargs="*", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--competitor-timeout", type=int, default=300)
    ap.add_argument("--no-competitors", action="store_true")
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--layouts", action="store_true",
                    help="only time strided vs contiguous inputs and recomputed vs stored chunk states at the 350M "
                         "model's cell size (B=8, NH=4, S=2048, DQK=DV=512, bf16): fw / fwbw ms and peak memory")
    ap.add_argument("--layouts-out", default="benchmarks/results/h200_mlstm_layouts.json")
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker[0], args.worker[1:])
    elif args.layouts:
        main_layouts(args)
    elif args.plot:
        res = json.load(open(args.plot))
        base = os.path.dirname(os.path.abspath(args.plot))
        plot(res, os.path.join(base, "h200_mlstm.png"))
        print_table(res, os.path.join(base, "README_table.md"))
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
