"""Training speed on one GPU: tokens/s and peak memory of a full step (forward, backward, fused AdamW) for our
models, eager and with the fast path, side by side with a same-size Llama (transformers) and the official xlstm.

    python benchmarks/training.py                          # all models, 2k / 8k / 16k / 32k, ~6 min on an H200
    python benchmarks/training.py --quick                  # 8k only, fewer steps (~3 min)
    python benchmarks/training.py --device cpu --tiny      # a smoke test of the whole script on the CPU
    python benchmarks/training.py --plot benchmarks/results/h200_training.json   # redo the plot and the table

Setup (the one the competitors' numbers were measured with): 16,384 tokens per step (B = 16384 / S; at 32k one
sequence, 32,768 tokens), bf16 autocast with float32 parameters, fused AdamW, vocabulary 50,304, random tokens.
Timed: ``--steps`` full steps after ``--warmup`` (compilation happens in the warmup), torch.cuda.synchronize around
them; peak memory is torch.cuda.max_memory_allocated over the warmup and timed steps (parameters, gradients and Adam
state included).

Paths: "eager" is the plain step (float32 logits, F.cross_entropy), as fastxlstm's trainer ran it before this
benchmark; "fast" is ``model.compile_blocks()`` plus the chunked loss ``model(ids, labels=...).loss``; "fast+graph"
the same forward + backward captured once as a CUDA graph and replayed (``fastxlstm.train.graphs.GraphedStep``, what
``fastxlstm train --device cuda`` runs; the optimizer step stays outside); "fast+ckpt" adds activation checkpointing
(after the fast runs, same contexts; it reuses the compiled blocks; "fast+ckpt+graph" with --graph, the default).
Before timing the fast path, the same run checks it: loss and gradients of one batch against the eager path
(relative errors in the JSON).

Competitors: transformers LlamaForCausalLM (SDPA, E=1024, 24 layers, 16 heads, FFN 2816, tied: ~360M) and the
official xlstm xLSTMLMModel 350M [1:0], the latter in a subprocess (its kernels may crash or run out of memory;
that is recorded, not fatal). Every configuration runs in try/except: "oom", "timeout" or "error: ..." is written
in its place. ``--budget-s`` bounds the whole run: the stages run in order of importance and the JSON is rewritten
after each one, so a run cut short keeps what it measured. Also writes a torch.profiler summary of one step of
``350m`` (eager and fast: top kernels by GPU time, shares of copies / elementwise / matmul / our kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if os.path.isdir(os.path.join(_ROOT, "src", "fastxlstm")):
    sys.path.insert(0, os.path.join(_ROOT, "src"))  # this checkout's fastxlstm, also when not installed

VOCAB = 50304
TOKENS = 16384
CONTEXTS = (2048, 8192, 16384, 32768)
OURS = ("7b-400m", "350m", "350m-7-1")


class BudgetExceeded(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------

def build_ours(name, device, tiny):
    import torch
    from fastxlstm.models.presets import build_model
    if tiny:
        name, kw = {"350m": ("tiny", dict(num_blocks=2, slstm_at=())),
                    "350m-7-1": ("tiny", dict(num_blocks=3, slstm_at=(1,))),
                    "7b-400m": ("7b-tiny", dict(num_hidden_layers=2))}[name]
    else:
        kw = {}
    with torch.device(device):
        return build_model(name, **kw)


def build_llama(device, tiny):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    if tiny:
        cfg = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=176, max_position_embeddings=4096)
    else:
        cfg = dict(vocab_size=VOCAB, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=16, intermediate_size=2816, max_position_embeddings=32768)
    config = LlamaConfig(tie_word_embeddings=True, attn_implementation="sdpa", **cfg)
    with torch.device(device):
        return LlamaForCausalLM(config)


def build_official(context, device, tiny):
    import torch
    from xlstm import mLSTMBlockConfig, mLSTMLayerConfig, xLSTMLMModel, xLSTMLMModelConfig
    E, L, V = (64, 2, 256) if tiny else (1024, 48, VOCAB)
    cfg = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4,
                                                            num_heads=4)),
        context_length=context, num_blocks=L, embedding_dim=E, slstm_at=[], vocab_size=V, tie_weights=True)
    with torch.device(device):
        model = xLSTMLMModel(cfg)
    model.reset_parameters()
    return model


def n_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------------------------------------
# one step
# ------------------------------------------------------------------------------------------------------------

def loss_fn(kind, model, ids, labels, fast):
    """The training loss of one batch. ids, labels (B, S); labels[:, t] is the token after ids[:, t]."""
    import torch.nn.functional as F
    if kind == "ours":
        if fast:
            return model(ids, labels=labels, return_state=False).loss
        logits = model(ids, return_state=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    if kind == "llama":  # transformers' own loss path (it shifts the labels itself)
        return model(input_ids=ids, labels=ids).loss
    logits = model(ids)  # official xLSTMLMModel returns the logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def make_batch(B, S, V, device, seed):
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    tok = torch.randint(0, V, (B, S + 1), generator=g)
    return tok[:, :-1].contiguous().to(device), tok[:, 1:].contiguous().to(device)


def autocast_ctx(device):
    import torch
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, device):
    import torch
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **kw)


def graphed_step(model, device):
    """The model's forward + backward as a CUDA graph (fastxlstm.train.graphs), made once per model; a new (B, S)
    re-captures it."""
    g = getattr(model, "_bench_graph", None)
    if g is None:
        import torch
        from fastxlstm.train.graphs import GraphedStep
        g = model._bench_graph = GraphedStep(
            model, lambda ids, labels: loss_fn("ours", model, ids, labels, fast=True),
            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return g


def drop_graph(model, device):
    """Forget the model's captured step and free its memory pool (before the model changes, or to measure the
    next configuration without it)."""
    model._bench_graph = None
    free(device)


def train_step(kind, model, opt, ids, labels, fast, device):
    if fast == "graph":
        loss = graphed_step(model, device)(ids, labels)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    with autocast_ctx(device):
        loss = loss_fn(kind, model, ids, labels, fast)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@contextlib.contextmanager
def alarm(seconds):
    """Raise BudgetExceeded in the main thread after ``seconds`` (a step that runs past the budget is abandoned
    at its next Python-level operation)."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise BudgetExceeded(f"ran past its time ({seconds:.0f} s)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def measure(kind, model, opt, S, tokens, V, device, fast, warmup, steps, time_left):
    """Warmup steps, then timed steps (fewer when one step is slow). Returns a result dict."""
    import torch
    B = max(1, tokens // S)
    ids, labels = make_batch(B, S, V, device, seed=S)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first = None
    losses = []
    last_warm = None
    for w in range(max(1, warmup)):
        tw = time.perf_counter()
        losses.append(float(train_step(kind, model, opt, ids, labels, fast, device)))
        sync(device)
        last_warm = time.perf_counter() - tw
        if w == 0:
            first = last_warm  # includes compilation on the fast path
        elif last_warm > 5.0:
            break  # a slow step (the sLSTM's step loop): enough warming up
    n = steps
    if last_warm > 0 and time_left() is not None:
        n = max(1, min(steps, int(0.8 * time_left() / last_warm)))
    sync(device)
    t1 = time.perf_counter()
    for _ in range(n):
        losses.append(float(train_step(kind, model, opt, ids, labels, fast, device)))
    sync(device)
    dt = (time.perf_counter() - t1) / n
    rec = {"B": B, "S": S, "tokens_per_step": B * S, "steps": n, "step_s": dt, "tokens_per_s": B * S / dt,
           "first_step_s": first, "loss_first": losses[0], "loss_last": losses[-1]}
    if device.type == "cuda":
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        rec["reserved_gb"] = torch.cuda.memory_reserved(device) / 1e9  # a CUDA graph's pool counts here
    if not all(math.isfinite(x) for x in losses):
        rec["warning"] = "non-finite loss"
    return rec


def error_record(e):
    import torch
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return {"status": "oom"}
    if isinstance(e, BudgetExceeded) or "ran past its time" in str(e):  # also when raised inside a compiler
        return {"status": "timeout", "detail": str(e)[-200:]}
    return {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}


def free(device):
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    d = float(b.norm())
    return float((a - b).norm()) / d if d > 0 else float((a - b).norm())


def check_fast_vs_eager(model, S, tokens, V, device, fp32_tokens=4096):
    """One batch, after ``compile_blocks``: the eager path's loss and gradients (blocks run uncompiled for it,
    float32 logits + F.cross_entropy), then the fast path's (compiled blocks, chunked loss) on the same weights.
    Returns the relative errors (worst and median over the parameters).

    Both are bf16 estimates of one gradient, and some gradients (the gate biases: sums over every token of terms
    of both signs) cancel strongly, so the two can differ by far more than either differs from the exact value.
    The judge is a float32 reference (autocast off, eager, the first ``fp32_tokens`` tokens of the batch): the
    fast path should be as close to it as the eager path is (``*_vs_fp32``)."""
    import torch
    B = max(1, tokens // S)
    ids, labels = make_batch(B, S, V, device, seed=12345)
    was_compiled = [getattr(b, "_compiled_call_impl", None) for b in model.block_modules()]

    def eager_blocks(on):
        for b, c in zip(model.block_modules(), was_compiled):
            b._compiled_call_impl = None if on else c

    def grads(ids_, labels_, fast, autocast=True):
        model.zero_grad(set_to_none=True)
        with autocast_ctx(device) if autocast else contextlib.nullcontext():
            loss = loss_fn("ours", model, ids_, labels_, fast=fast)
        loss.backward()
        g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), g

    eager_blocks(True)
    ref, g_ref = grads(ids, labels, fast=False)
    eager_blocks(False)
    got, g_got = grads(ids, labels, fast=True)
    errs = {n: rel(g, g_ref[n]) for n, g in g_got.items() if n in g_ref and g_ref[n].norm() > 0}
    worst = max(errs, key=errs.get)
    out = {"B": B, "S": S, "loss_eager": float(ref), "loss_fast": float(got),
           "loss_rel_err": rel(got, ref),
           "grad_rel_err_max": errs[worst], "grad_rel_err_max_param": worst,
           "grad_rel_err_median": sorted(errs.values())[len(errs) // 2]}
    del g_ref, g_got
    # against float32 on a slice of the batch (eager float32 needs ~2x the eager bf16 memory)
    try:
        n = max(1, min(B, fp32_tokens // S))
        sub = (ids[:n], labels[:n])
        eager_blocks(True)
        _, g32 = grads(*sub, fast=False, autocast=False)
        _, g_e = grads(*sub, fast=False)
        eager_blocks(False)
        _, g_f = grads(*sub, fast=True)
        e_err = {k: rel(g_e[k], g32[k]) for k in g32 if g32[k].norm() > 0}
        f_err = {k: rel(g_f[k], g32[k]) for k in e_err if k in g_f}
        w = max(f_err, key=lambda k: f_err[k] / max(e_err[k], 1e-30))
        out.update({"fp32_tokens": n * S,
                    "eager_vs_fp32_max": max(e_err.values()),
                    "eager_vs_fp32_median": sorted(e_err.values())[len(e_err) // 2],
                    "fast_vs_fp32_max": max(f_err.values()),
                    "fast_vs_fp32_median": sorted(f_err.values())[len(f_err) // 2],
                    "worst_ratio_param": w, "worst_ratio_fast": f_err[w], "worst_ratio_eager": e_err[w]})
        del g32, g_e, g_f
    except Exception as e:  # noqa: BLE001 - the float32 reference is a bonus (memory)
        out["fp32_check"] = error_record(e)
    finally:
        eager_blocks(False)
        model.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------------------------

_OUR_KERNELS = ("_scalars_kernel", "_fwd_state_kernel", "_fwd_out_kernel", "_bwd_prep_kernel", "_bwd_state_kernel",
                "_bwd_dq_kernel", "_bwd_dk_kernel", "_bwd_dv_kernel", "_step_kernel", "slstm")
# first match wins: Inductor's fused kernels (triton_poi_/triton_red_/triton_per_...) before the keyword classes
_CATS = (
    ("our mLSTM/sLSTM kernels", _OUR_KERNELS),
    ("fused by torch.compile", ("triton_poi", "triton_red", "triton_per", "triton_tem", "triton_")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "aten::mm", "aten::bmm",
                "aten::addmm", "aten::matmul", "aten::linear", "einsum", "conv")),
    ("copies/casts", ("copy", "aten::to", "aten::cat", "catarraybatched", "contiguous", "memcpy", "clone",
                      "aten::stack", "memset", "fill")),
    ("elementwise/reductions", ("elementwise", "reduce", "vectorized", "unrolled", "mul", "add", "sub", "div",
                                "silu", "sigmoid", "exp", "log", "tanh", "norm", "sum", "mean", "max", "where",
                                "neg", "pow", "rsqrt", "softmax", "gelu", "scatter", "gather", "index")),
)


def _category(name):
    low = name.lower()
    for cat, keys in _CATS:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_step(kind, model, opt, S, tokens, V, device, fast, path):
    """One profiled step: the kernels by GPU time (top 30) and the shares per category, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    B = max(1, tokens // S)
    ids, labels = make_batch(B, S, V, device, seed=7)
    train_step(kind, model, opt, ids, labels, fast, device)  # warm (compiled graphs, allocator)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_step(kind, model, opt, ids, labels, fast, device)
        sync(device)
    # CUDA: the device-side kernel events (each kernel once, by name); CPU: the operators' self times
    kern = {}
    for e in prof.events():
        is_dev = str(getattr(e, "device_type", "")).endswith("CUDA")
        if device.type == "cuda":
            if not is_dev:
                continue
            t = e.time_range.elapsed_us()
        else:
            t = getattr(e, "self_cpu_time_total", 0.0)
        kern.setdefault(e.name, [0.0, 0])
        kern[e.name][0] += float(t or 0.0)
        kern[e.name][1] += 1
    total = sum(v[0] for v in kern.values()) or 1.0
    shares = {}
    for name, (t, _) in kern.items():
        c = _category(name)
        shares[c] = shares.get(c, 0.0) + t / total
    launches = sum(v[1] for v in kern.values())
    lines = [f"one training step, {'fast' if fast else 'eager'} path, B={B} S={S}, device {device}: "
             f"{total / 1e3:.1f} ms of {'GPU kernel' if device.type == 'cuda' else 'CPU op'} time, "
             f"{launches} {'kernels' if device.type == 'cuda' else 'ops'}",
             "", "shares by category (kernel names matched by keyword):"]
    for c, s in sorted(shares.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {c:<28} {100 * s:5.1f} %")
    lines += ["", f"top 30 by time ({'kernels' if device.type == 'cuda' else 'ops'}):",
              f"  {'ms':>9} {'%':>6} {'calls':>6}  {'category':<26} name"]
    for name, (t, cnt) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"  {t / 1e3:9.3f} {100 * t / total:6.1f} {cnt:6d}  {_category(name):<26} {name[:110]}")
    try:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
        lines += ["", "torch.profiler key_averages (operators, by self time):", table]
    except Exception as e:  # noqa: BLE001 - the table is a bonus
        lines.append(f"(key_averages table unavailable: {e})")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return {"total_ms": total / 1e3, "launches": launches, "shares": shares,
            "file": os.path.relpath(path, _ROOT)}


# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------

def versions():
    import importlib.metadata as md
    import platform
    import torch
    out = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    for p in ("triton", "transformers", "xlstm", "mlstm_kernels", "fastxlstm"):
        try:
            out[p] = md.version(p)
        except Exception:
            out[p] = None
    try:
        out["fastxlstm_commit"] = subprocess.run(["git", "-C", _ROOT, "rev-parse", "--short", "HEAD"],
                                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    return out


def official_subprocess(args, S, timeout):
    """The official model in a child process (a crash or OOM there is a result, not our failure)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_official", str(S), "--device", args.device,
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--tokens", str(args.tokens)]
    if args.tiny:
        cmd.append("--tiny")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, timeout))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "detail": f"subprocess over {timeout:.0f} s"}
    for ln in p.stdout.splitlines():
        if ln.startswith("RESULT "):
            return json.loads(ln[7:])
    tail = (p.stderr or p.stdout)[-400:]
    status = "oom" if "out of memory" in tail.lower() else f"error: exit {p.returncode}: {tail}"
    return {"status": status}


def official_child(args):
    import torch
    device = torch.device(args.device)
    S = args._official
    try:
        model = build_official(S, device, args.tiny)
        opt = make_optimizer(model, device)
        V = 256 if args.tiny else VOCAB
        rec = measure("official", model, opt, S, args.tokens, V, device, False, args.warmup, args.steps, lambda: None)
        rec["status"] = "ok"
        rec["params"] = n_params(model)
    except Exception as e:  # noqa: BLE001
        rec = error_record(e)
        rec.setdefault("detail", traceback.format_exc()[-400:])
    print("RESULT " + json.dumps(rec), flush=True)


def main_bench(args):
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny for a smoke test)")
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s

    def time_left():
        return deadline - time.perf_counter()

    V = 256 if args.tiny else VOCAB
    tokens = args.tokens
    contexts = [int(c) for c in args.contexts.split(",")]
    models = [m for m in args.models.split(",") if m]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    prof_path = os.path.splitext(args.out)[0] + "_profile.txt"
    res = {"benchmark": "training", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "versions": versions(), "setup": {"tokens_per_step": tokens, "vocab": V, "contexts": contexts,
                                             "warmup": args.warmup, "steps": args.steps, "precision": "bf16 autocast",
                                             "optimizer": "AdamW fused" if device.type == "cuda" else "AdamW",
                                             "compile_dynamic": args.dynamic, "tiny": args.tiny,
                                             "budget_s": args.budget_s},
           "results": [], "checks": [], "profiles": {}}

    if args.append and os.path.exists(args.out):
        # earlier calls' rows (e.g. other models, when one call cannot hold the whole run) kept, marked with their date
        with open(args.out) as f:
            old = json.load(f)
        for key in ("results", "checks"):
            for r in old.get(key, []):
                r.setdefault("date", old.get("date"))
                r.setdefault("fastxlstm_commit", old.get("versions", {}).get("fastxlstm_commit"))
                res[key].append(r)
        res["params"] = dict(old.get("params", {}))
        res["profiles"] = dict(old.get("profiles", {}))
        res["earlier_runs"] = old.get("earlier_runs", []) + [{"date": old.get("date"),
                                                              "versions": old.get("versions"),
                                                              "elapsed_s": old.get("elapsed_s")}]

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.out)

    def record(model_name, path, S, rec):
        rec = dict(rec)
        rec.setdefault("status", "ok")
        rec.update(model=model_name, path=path, context=S)
        res["results"].append(rec)
        msg = (f"{rec['tokens_per_s'] / 1e3:8.1f}k tok/s  {rec.get('peak_mem_gb', float('nan')):6.1f} GB"
               if rec["status"] == "ok" else rec["status"])
        print(f"[{time.perf_counter() - t_start:6.0f}s] {model_name:<10} {path:<10} S={S:<6} {msg}", flush=True)
        save()

    def run_config(kind, name, path, model, opt, S, fast, min_s=5.0):
        if time_left() < min_s:
            record(name, path, S, {"status": "skipped: budget"})
            return None
        try:
            with alarm(time_left()):
                rec = measure(kind, model, opt, S, tokens, V, device, fast, args.warmup, args.steps, time_left)
        except Exception as e:  # noqa: BLE001
            rec = error_record(e)
            if not rec["status"].startswith(("oom", "timeout")):
                traceback.print_exc()
            opt.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
        free(device)
        record(name, path, S, rec)
        return rec

    def phase_ours(name, ctxs, do_eager=True, do_fast=True, check=True, ckpt_from=0, profile=False):
        if not ctxs:
            return
        if time_left() < 15:
            for S in ctxs:
                record(name, "eager", S, {"status": "skipped: budget"})
            return
        model = opt = None
        try:
            torch.manual_seed(0)
            model = build_ours(name, device, args.tiny)
            model.train()
            opt = make_optimizer(model, device)
            res.setdefault("params", {})[name] = n_params(model)
            if do_eager:
                for S in ctxs:
                    run_config("ours", name, "eager", model, opt, S, fast=False)
                if profile and time_left() > 30:
                    try:
                        res["profiles"][f"{name} eager"] = profile_step("ours", model, opt, ctxs[0], tokens, V,
                                                                       device, False, prof_path)
                    except Exception as e:  # noqa: BLE001
                        res["profiles"][f"{name} eager"] = error_record(e)
                    free(device)
                    save()
            if not do_fast or time_left() < 40:
                return
            model.compile_blocks(dynamic=args.dynamic)
            if check:
                try:
                    with alarm(time_left()):
                        c = check_fast_vs_eager(model, ctxs[0], min(tokens, args.check_tokens), V, device)
                    c["model"] = name
                    res["checks"].append(c)
                    print(f"[{time.perf_counter() - t_start:6.0f}s] check {name}: loss rel err "
                          f"{c['loss_rel_err']:.2e}, grads max rel err {c['grad_rel_err_max']:.2e} "
                          f"({c['grad_rel_err_max_param']}), median {c['grad_rel_err_median']:.2e}", flush=True)
                    if "fast_vs_fp32_max" in c:
                        print(f"    vs float32 ({c['fp32_tokens']} tokens): fast max {c['fast_vs_fp32_max']:.2e} "
                              f"median {c['fast_vs_fp32_median']:.2e}; eager max {c['eager_vs_fp32_max']:.2e} "
                              f"median {c['eager_vs_fp32_median']:.2e}", flush=True)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    res["checks"].append({"model": name, **error_record(e)})
                free(device)
                save()
            for S in ctxs:
                run_config("ours", name, "fast", model, opt, S, fast=True, min_s=20)
            if args.graph:
                for S in ctxs:
                    run_config("ours", name, "fast+graph", model, opt, S, fast="graph", min_s=20)
                drop_graph(model, device)
            if profile and time_left() > 30:
                try:
                    res["profiles"][f"{name} fast"] = profile_step("ours", model, opt, ctxs[0], tokens, V, device,
                                                                  True, prof_path)
                except Exception as e:  # noqa: BLE001
                    res["profiles"][f"{name} fast"] = error_record(e)
                free(device)
                save()
            long = [S for S in ctxs if S >= ckpt_from]
            if long:
                drop_graph(model, device)  # the model changes: a graph captured before would replay the old one
                model.set_activation_checkpointing(True)
                for S in long:
                    run_config("ours", name, "fast+ckpt+graph" if args.graph else "fast+ckpt", model, opt, S,
                               fast="graph" if args.graph else True, min_s=20)
                model.set_activation_checkpointing(False)
                drop_graph(model, device)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            record(name, "build", 0, error_record(e))
        finally:
            del model, opt
            free(device)

    def phase_llama(ctxs):
        if time_left() < 10:
            return
        model = opt = None
        try:
            torch.manual_seed(0)
            model = build_llama(device, args.tiny)
            model.train()
            opt = make_optimizer(model, device)
            res.setdefault("params", {})["llama"] = n_params(model)
            for S in ctxs:
                run_config("llama", "llama", "sdpa", model, opt, S, fast=False)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            record("llama", "build", 0, error_record(e))
        finally:
            del model, opt
            free(device)

    if os.path.exists(prof_path) and args.profile:
        os.remove(prof_path)
    main_ctx = [S for S in contexts if S <= 16384 or args.tiny]
    long_ctx = [S for S in contexts if S not in main_ctx]
    # stages in order of importance (the 32k runs and the official model come last)
    if "llama" in models:
        phase_llama(main_ctx)
    prof_models = {m for m in args.profile_models.split(",") if m} if args.profile else set()
    if "7b-400m" in models:
        phase_ours("7b-400m", main_ctx, do_eager=args.eager, profile="7b-400m" in prof_models)
    if "350m" in models:
        phase_ours("350m", main_ctx, do_eager=args.eager, profile="350m" in prof_models)
    if "350m-7-1" in models:
        # the sLSTM step loop is slow: its fast path at the first context only unless there is time
        phase_ours("350m-7-1", main_ctx[:1], do_eager=args.eager, ckpt_from=10 ** 9)
    if "official" in models:
        for S in main_ctx[:1]:
            if time_left() < 20:
                record("official", "official", S, {"status": "skipped: budget"})
                continue
            rec = official_subprocess(args, S, min(120.0, time_left() - 5))
            record("official", "official", S, rec)
    if long_ctx:
        if "llama" in models:
            phase_llama(long_ctx)
        for name in ("7b-400m", "350m"):
            if name in models:
                phase_ours(name, long_ctx, do_eager=args.eager, check=False, ckpt_from=0)
    if "350m-7-1" in models and len(main_ctx) > 1:
        phase_ours("350m-7-1", main_ctx[1:], do_eager=args.eager, check=False, ckpt_from=10 ** 9)
    save()
    print(f"wrote {args.out} ({time.perf_counter() - t_start:.0f} s)")
    try:
        plot(args.out)
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e}")


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------

def table(res):
    rows = {}
    ctxs = sorted({r["context"] for r in res["results"] if r.get("context")})
    for r in res["results"]:
        if r["path"] == "build":
            continue
        key = (r["model"], r["path"])
        cell = (f"{r['tokens_per_s'] / 1e3:.1f}k / {r.get('peak_mem_gb', float('nan')):.0f} GB"
                if r["status"] == "ok" else r["status"].split(":")[0])
        rows.setdefault(key, {})[r["context"]] = cell
    out = ["| model | path | " + " | ".join(f"{S // 1024}k" if S >= 1024 else str(S) for S in ctxs) + " |",
           "|---|---|" + "---|" * len(ctxs)]
    for (m, p), cells in rows.items():
        out.append(f"| {m} | {p} | " + " | ".join(cells.get(S, "-") for S in ctxs) + " |")
    out.append("")
    out.append("tokens/s (k) / peak memory (GB); " + res.get("device", "") + ", " + res.get("date", "")[:10])
    for c in res.get("checks", []):
        if "loss_rel_err" in c:
            out.append(f"check {c['model']}: fast vs eager loss rel err {c['loss_rel_err']:.2e}, "
                       f"grads max {c['grad_rel_err_max']:.2e}, median {c['grad_rel_err_median']:.2e}")
            if "fast_vs_fp32_max" in c:
                out.append(f"  vs float32: fast max {c['fast_vs_fp32_max']:.2e} / median "
                           f"{c['fast_vs_fp32_median']:.2e}, eager max {c['eager_vs_fp32_max']:.2e} / median "
                           f"{c['eager_vs_fp32_median']:.2e}")
    return "\n".join(out)


def plot(path):
    with open(path) as f:
        res = json.load(f)
    md = table(res)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {}
    for r in res["results"]:
        if r.get("status") == "ok":
            series.setdefault((r["model"], r["path"]), []).append((r["context"], r["tokens_per_s"] / 1e3,
                                                                  r.get("peak_mem_gb")))
    # colour = model, line style and marker = path
    colours = {"llama": "black", "7b-400m": "tab:blue", "350m": "tab:orange", "350m-7-1": "tab:green",
               "official": "tab:red"}
    styles = {"eager": (":", "x"), "fast": ("--", "s"), "fast+graph": ("-", "o"), "fast+ckpt": ("-.", "v"),
              "fast+ckpt+graph": ("-.", "v")}
    fig, axes = plt.subplots(1, 2, figsize=(15.5, 5))
    for (model, kind), pts in sorted(series.items(), key=lambda kv: (kv[0][0] != "llama", kv[0])):
        pts.sort()
        xs = [p[0] for p in pts]
        ls, mk = styles.get(kind, ("-", "o"))
        label = model if kind in (model, "sdpa") else f"{model} {kind}"
        kw = dict(color=colours.get(model), marker=mk, label=label, lw=2.2 if model == "llama" else 1.5)
        axes[0].plot(xs, [p[1] for p in pts], ls, **kw)
        if pts[0][2] is not None:
            axes[1].plot(xs, [p[2] for p in pts], ls, **kw)
    for ax, title, yl in ((axes[0], "training throughput", "tokens/s (thousands)"),
                          (axes[1], "peak memory", "GB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens per step fixed)")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{res.get('device', '')}: {res['setup']['tokens_per_step']:,} tokens per step (one sequence "
                 f"above that), bf16 autocast, fused AdamW")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models, vocabulary 256 (a CPU smoke test)")
    p.add_argument("--quick", action="store_true", help="8k context only, 1 warmup + 2 timed steps, no 32k")
    p.add_argument("--contexts", default=None, help="comma-separated (default 2048,8192,16384,32768)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default 16384)")
    p.add_argument("--models", default="llama,7b-400m,350m,350m-7-1,official")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--check-tokens", type=int, default=16384, help="tokens of the fast-vs-eager check batch")
    p.add_argument("--budget-s", type=float, default=330.0, help="overall time limit (s)")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="compile_blocks(dynamic=True): one compile per block type for all contexts (default); "
                        "--no-dynamic specialises on every (B, S)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile-models", default="350m,7b-400m",
                   help="comma-separated models whose fast (and eager) step is profiled at the first context")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the eager path (--no-eager: the fast path only; the check still runs)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the fast path replayed as a CUDA graph (fastxlstm.train.graphs; path fast+graph)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out (an earlier call's) and add this run's")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="only redo the plot and table from this JSON")
    p.add_argument("--_official", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contexts is None:
        args.contexts = ("64,128" if args.tiny else ("8192" if args.quick else ",".join(map(str, CONTEXTS))))
    if args.tokens is None:
        args.tokens = 256 if args.tiny else TOKENS
    if args.quick:
        args.warmup, args.steps = min(args.warmup, 2), min(args.steps, 2)
    if args.out is None:
        name = "cpu_training_tiny.json" if args.device == "cpu" else "h200_training.json"
        args.out = os.path.join(_HERE, "results", name)
    return args


def main(argv=None):
    args = parse(argv)
    if args.plot:
        plot(args.plot)
    elif args._official is not None:
        official_child(args)
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
