"""Whole-model generation on one GPU: fastxlstm (CUDA-graph and eager decoding) side by side with the official
xlstm package (xLSTMLarge with its Triton kernels), transformers' xLSTMForCausalLM and a same-size Llama in
transformers (the attention baseline), in one process, random weights, bf16.

    python benchmarks/generation.py --out benchmarks/results/h200_generation.json       # on a GPU
    python benchmarks/generation.py --quick --preset 7b-tiny --out /tmp/gen.json         # smoke run
    python benchmarks/generation.py --plot benchmarks/results/h200_generation.json      # png + markdown table
    # packed vs unpacked projections (7B), the paper 1.3B at B=1 and Llama with static cache + torch.compile,
    # without the slower sweeps (~5-6 min on an H200):
    python benchmarks/generation.py --out benchmarks/results/h200_generation_pack.json --pack-compare \
        --extra-presets 1.3b --skip-context --skip-prefill --skip-memory --skip-profile --skip-official \
        --skip-transformers --skip-llama-eager

Measured:
- tokens/s against batch size (prompt 32 tokens, greedy, ``--new`` new tokens): B*new / wall time of generate();
- time per generated token against context length (prompt 1k ... 16k, B=1): flat for a recurrent model, growing
  for attention;
- prefill time of a 16k-token prompt at B=1 (time to first token);
- peak GPU memory while generating 64 and 1024 tokens (flat in the number of tokens);
- correctness in the same run: greedy tokens of the graph path against the eager path of the UNPACKED model (the
  first divergence, if any), whether the graph's first token equals the eager argmax, and the relative difference
  of one step's logits (graph in logits mode against the unpacked eager forward);
- ``--pack-compare``: the graph path with the model's same-input projections packed (the default,
  ``fastxlstm.generation.pack_projections``) and unpacked (FASTXLSTM_PACK=0) at the same batch sizes;
- ``--compile-compare``: the graph path with the uncompiled step (FASTXLSTM_COMPILE_DECODE=off) beside the
  default (each block's step compiled, fastxlstm.generation.graph.compile_mode);
- ``--state-compare``: the graph path with the mLSTM C states in bf16 (FASTXLSTM_DECODE_STATE=bf16, half the state
  traffic) and its accuracy against the float32 state (logits over 256 greedy steps at B=8);
- ``--extra-presets``: other presets (e.g. the paper's ``1.3b``) with the graph path at ``--extra-batches``, each
  with its own floor and graph-vs-eager check;
- Llama rows: transformers' eager generate with its dynamic cache, and ``cache_implementation="static"``, with which
  transformers compiles the decoding forward (torch.compile, "reduce-overhead": CUDA graphs) by itself; that row
  runs last and a failure is recorded as its error string.
The floor per decode step is the weight read plus the state read and write at the measured copy bandwidth.
Competitors run in try/except blocks: a failure is recorded with its message, not fatal.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def _sync():
    import torch
    torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def versions():
    import importlib.metadata as md
    import torch
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for p in ("triton", "transformers", "xlstm", "mlstm_kernels", "fastxlstm"):
        try:
            out[p] = md.version(p)
        except Exception:
            out[p] = None
    return out


def copy_bandwidth():
    import torch
    x = torch.empty(1024 ** 3 // 4, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)
    t, _ = _timed(lambda: [y.copy_(x) for _ in range(10)])
    del x, y
    return 2 * 1024 ** 3 * 10 / t


def _free():
    import torch
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# the systems
# ---------------------------------------------------------------------------------------------------------------

def build_ours(preset, dtype):
    import torch
    import fastxlstm
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = fastxlstm.build_model(preset)
    return model.to(dtype).eval()


def ours_generate(model, use_graph):
    def run(ids, new):
        return model.generate(ids, new, do_sample=False, use_cuda_graph=use_graph)
    return run


def build_official(model):
    """The official xLSTMLarge with our weights (so all xLSTMs compute the same function)."""
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig
    c = model.config
    cfg = xLSTMLargeConfig(embedding_dim=c.hidden_size, num_heads=c.num_heads, num_blocks=c.num_hidden_layers,
                           vocab_size=c.vocab_size, use_bias=c.use_bias, norm_eps=c.norm_eps,
                           norm_reduction_force_float32=c.norm_reduction_force_float32, add_out_norm=c.add_out_norm,
                           qk_dim_factor=c.qk_dim_factor, v_dim_factor=c.v_dim_factor,
                           chunkwise_kernel="chunkwise--triton_limit_chunk", sequence_kernel="native_sequence__triton",
                           step_kernel="triton", mode="inference", chunk_size=64, return_last_states=True,
                           autocast_kernel_dtype="bfloat16", eps=c.eps, inference_state_dtype="float32",
                           ffn_proj_factor=c.ffn_proj_factor, ffn_round_up_to_multiple_of=c.ffn_round_up_to_multiple_of,
                           gate_soft_cap=c.gate_soft_cap, output_logit_soft_cap=c.output_logit_soft_cap)
    with torch.device("meta"):
        off = xLSTMLarge(cfg)
    sd = {k.replace("backbone.embeddings.", "embedding."): v for k, v in model.state_dict().items()}
    off.load_state_dict(sd, assign=True, strict=True)
    return off.eval()


def official_generate(off):
    import torch

    def run(ids, new):
        with torch.no_grad():
            tokens, _ = off.generate(prefill_tokens=ids, max_length=new, sampling_type="greedy")
        return tokens
    return run


def build_transformers_xlstm(model):
    import torch
    from fastxlstm.interop.transformers import to_transformers_model
    hf = to_transformers_model(model)
    return hf.to(device="cuda", dtype=model.dtype).eval()


def static_compile_kwargs():
    """generate() kwargs for transformers' static cache with its automatic torch.compile of the decoding forward
    (transformers 4.48+ compiles when the cache is static and the device is CUDA; an explicit CompileConfig where
    the installed version has one)."""
    kw = {"cache_implementation": "static"}
    try:
        from transformers import CompileConfig
        kw["compile_config"] = CompileConfig(fullgraph=False, mode="reduce-overhead")
    except Exception:  # noqa: BLE001 - older transformers: its defaults
        pass
    return kw


def hf_generate(hf, **extra):
    import torch

    def run(ids, new):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               attention_mask=torch.ones_like(ids), pad_token_id=0, **extra)
    return run


def build_llama(hidden, layers, heads, kv_heads, ffn, vocab, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                      attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)
    return m.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------

def throughput(run, vocab, batches, new, prompt=32, deadline=None, warm_new=4):
    """{B: tokens/s} (or an error string per B). ``warm_new``: tokens of the untimed warm-up run (a static cache
    is sized by the prompt plus the new tokens, so its compiled forward is warmed up with the timed length)."""
    import torch
    res = {}
    for B in batches:
        if deadline and time.time() > deadline:
            res[str(B)] = "skipped: time budget"
            continue
        try:
            ids = torch.randint(3, vocab, (B, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(B))
            run(ids, warm_new)  # warm up: compiles, graph capture for this B
            t, out = _timed(lambda: run(ids, new))
            n_new = out.shape[1] - prompt
            res[str(B)] = {"tokens_per_s": B * n_new / t, "s": t, "new_tokens": n_new}
            print(f"    B={B}: {B * n_new / t:,.1f} tok/s ({t:.2f} s, {n_new} new)", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            res[str(B)] = f"error: {type(e).__name__}: {str(e)[:300]}"
            print(f"    B={B}: {res[str(B)]}", flush=True)
            if "out of memory" in str(e).lower():
                _free()
    return res


def per_token_vs_context(run, vocab, contexts, new=32, deadline=None):
    """{L: ms per generated token after a prompt of L tokens} at B=1, from the difference of two runs
    (new and 2*new tokens), so the prefill cancels."""
    import torch
    res = {}
    for L in contexts:
        if deadline and time.time() > deadline:
            res[str(L)] = "skipped: time budget"
            continue
        try:
            ids = torch.randint(3, vocab, (1, L), device="cuda", generator=torch.Generator("cuda").manual_seed(L))
            run(ids, 2)
            t1, _ = _timed(lambda: run(ids, new))
            t2, _ = _timed(lambda: run(ids, 2 * new))
            res[str(L)] = {"ms_per_token": (t2 - t1) / new * 1e3, "s_short": t1, "s_long": t2}
            print(f"    L={L}: {(t2 - t1) / new * 1e3:.2f} ms/token", flush=True)
        except Exception as e:  # noqa: BLE001
            res[str(L)] = f"error: {type(e).__name__}: {str(e)[:300]}"
            print(f"    L={L}: {res[str(L)]}", flush=True)
            _free()
    return res


def ours_prefill(model, L, reps=3):
    import torch
    from fastxlstm.generation.graph import prefill
    ids = torch.randint(3, model.config.vocab_size, (1, L), device="cuda")
    with torch.no_grad():
        prefill(model, ids, None)
        times = [_timed(lambda: prefill(model, ids, None))[0] for _ in range(reps)]
    return min(times)


def memory_flat(model, news=(64, 1024)):
    import torch
    ids = torch.randint(3, model.config.vocab_size, (1, 32), device="cuda")
    out = {}
    for n in news:
        model.generate(ids, 2, do_sample=False)
        _sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.generate(ids, n, do_sample=False)
        _sync()
        out[str(n)] = {"peak_bytes_above_model": torch.cuda.max_memory_allocated() - base}
    return out


def check_graph_vs_eager(model, new=64):
    """Greedy tokens of the graph path (packed by default) against the eager path of the unpacked model; one
    step's logits (graph in logits mode against the unpacked eager forward)."""
    import torch
    from fastxlstm.generation import unpack_projections
    from fastxlstm.generation.graph import get_decoder, prefill
    from fastxlstm.generation.packing import is_packed
    unpack_projections(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    before = os.environ.get("FASTXLSTM_PACK")
    os.environ["FASTXLSTM_PACK"] = "0"  # the eager loop would pack the 7B architecture
    try:
        a = model.generate(ids, new, do_sample=False, use_cuda_graph=False)
    finally:
        if before is None:
            del os.environ["FASTXLSTM_PACK"]
        else:
            os.environ["FASTXLSTM_PACK"] = before
    with torch.no_grad():  # the eager (unpacked) reference of one step
        logits, st = prefill(model, ids, None)
        tok = logits.argmax(-1)
        ref = model._forward(tok[:, None], st, None, True).logits[:, -1]
    b = model.generate(ids, new, do_sample=False, use_cuda_graph=True)
    packed = is_packed(model)
    diff = (a != b)[:, 32:]
    first = None
    if bool(diff.any()):
        first = int(diff.any(dim=0).nonzero()[0, 0])
    with torch.no_grad():
        dec = get_decoder(model, 2, False, None, False, None, None)
        dec.load(st, tok)
        dec.step()
        chose = dec.tok.clone()
        ldec = get_decoder(model, 2, None, None, False, None, None)
        ldec.load(st, tok)
        got = ldec.step_logits(tok)
        rel = float((got.double() - ref.double()).norm() / ref.double().norm())
    return {"tokens_equal": bool(not diff.any()), "first_divergence_step": first, "new_tokens": new,
            "first_step_token_equal": bool(torch.equal(chose, ref.argmax(-1))), "graph_packed": packed,
            "step_logits_rel_err_vs_unpacked_eager": rel}


def _compile_mode():
    from fastxlstm.generation.graph import compile_mode
    return compile_mode()


def _gemv_mode():
    from fastxlstm.generation._gemv import gemv_mode
    return gemv_mode()


def state_accuracy(model, B=8, steps=256):
    """The bf16-state option against the float32 state: logits mode, the float32 decoder's greedy tokens fed to
    both, worst and last-step relative error of the logits, and the share of steps whose argmax agrees."""
    import torch
    from fastxlstm.generation.graph import get_decoder, prefill
    ids = torch.randint(3, model.config.vocab_size, (B, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    with torch.no_grad():
        logits, st = prefill(model, ids, None)
        a = get_decoder(model, B, None, None, False, None, None, state_dtype=torch.float32)
        b = get_decoder(model, B, None, None, False, None, None, state_dtype=torch.bfloat16)
        tok = logits.argmax(-1)
        a.load(st, tok)
        b.load(st, tok)
        worst, agree, last = 0.0, 0, 0.0
        for _ in range(steps):
            la = a.step_logits(tok).clone()
            lb = b.step_logits(tok)
            last = float((la - lb).norm() / la.norm())
            worst = max(worst, last)
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            tok = la.argmax(-1)
    return {"batch": B, "steps": steps, "worst_logits_rel_err": worst, "last_logits_rel_err": last,
            "argmax_agreement": agree / (B * steps)}


def profile_step(model, B=1, steps=5):
    """torch.profiler over a few graph and eager decode steps: kernel count and GPU time per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(3, model.config.vocab_size, (B, 32), device="cuda")
    out = {}
    for use in (False, True):
        model.generate(ids, steps + 1, do_sample=False, use_cuda_graph=use)
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(ids, steps + 1, do_sample=False, use_cuda_graph=use)
            _sync()
        ev = prof.key_averages()
        cuda_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ev)
        launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        top = sorted(ev, key=lambda e: -getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))[:15]
        out["graph" if use else "eager"] = {
            "gpu_ms_per_step": cuda_us / 1e3 / steps,
            "host_kernel_launches_per_step": launches / steps,
            "top_ops": [(e.key[:80], getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3 / steps,
                         e.count / steps) for e in top],
        }
    return out


def gemv_shapes(shapes=((2048, 4096), (4096, 4096), (10944, 4096), (4096, 10944), (50304, 4096), (8, 4096))):
    """Batch-1 decode matrix-vector products of the 7B: cuBLAS (F.linear) against our Triton GEMV, GB/s of the
    weight read, with the relative error of each against float64."""
    import torch
    from fastxlstm.generation._gemv import gemv
    out = {}
    for N, K in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ w.double().t())
        row = {}
        for name, fn in (("cublas", lambda: torch.nn.functional.linear(x, w)), ("triton_gemv", lambda: gemv(x, w))):
            y = fn()
            err = float((y.double() - ref).norm() / ref.norm())
            fn()
            _sync()
            t, _ = _timed(lambda: [fn() for _ in range(200)])
            row[name] = {"us": t / 200 * 1e6, "GB_per_s": N * K * 2 / (t / 200) / 1e9, "rel_err": err}
        out[f"{N}x{K}"] = row
        print(f"    {N}x{K}: " + ", ".join(f"{k} {v['us']:.1f} us {v['GB_per_s']:.0f} GB/s err {v['rel_err']:.1e}"
                                           for k, v in row.items()), flush=True)
    return out


def extra_preset(preset, args, deadline):
    """Another preset (e.g. the paper's 1.3b) on the graph path at ``--extra-batches``: its floor, a graph-vs-eager
    check and tokens/s. Errors are recorded, not fatal."""
    import torch
    out = {}
    print(f"extra preset {preset}", flush=True)
    model = None
    try:
        model = build_ours(preset, torch.bfloat16)
        batches = [int(b) for b in args.extra_batches.split(",")]
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        sbytes = model.init_state(1).nbytes()
        bw = copy_bandwidth()
        out["meta"] = {"model": type(model).__name__, "param_bytes": nbytes, "state_bytes_per_sequence": sbytes}
        out["floor"] = {str(B): {"ms_per_step": (nbytes + 2 * B * sbytes) / bw * 1e3,
                                 "tokens_per_s": B / ((nbytes + 2 * B * sbytes) / bw)} for B in batches}
        try:
            out["check"] = check_graph_vs_eager(model, new=32)
        except Exception as e:  # noqa: BLE001
            out["check"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        print(f"    check: {out['check']}", flush=True)
        out["graph"] = throughput(ours_generate(model, True), model.config.vocab_size, batches, args.new,
                                  deadline=deadline)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    del model
    _free()
    return out


# ---------------------------------------------------------------------------------------------------------------

def main_bench(args):
    import torch
    import fastxlstm
    dtype = torch.bfloat16
    deadline = time.time() + args.budget_s
    res = {"meta": {"gpu": torch.cuda.get_device_name(), "versions": versions(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "preset": args.preset, "dtype": "bf16", "prompt": 32, "new_tokens": args.new,
                    "compile_decode": _compile_mode(), "triton_gemv": _gemv_mode(),
                    "decode_state": os.environ.get("FASTXLSTM_DECODE_STATE", "fp32")},
           "systems": {}}
    res["meta"]["copy_bytes_per_s"] = copy_bandwidth()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)

    print(f"building ours ({args.preset})", flush=True)
    model = build_ours(args.preset, dtype)
    V = model.config.vocab_size
    nparam_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = model.init_state(1).nbytes()
    res["meta"].update(param_bytes=nparam_bytes, state_bytes_per_sequence=state_bytes)
    bw = res["meta"]["copy_bytes_per_s"]
    res["floor"] = {str(B): {"ms_per_step": (nparam_bytes + 2 * B * state_bytes) / bw * 1e3,
                             "tokens_per_s": B / ((nparam_bytes + 2 * B * state_bytes) / bw)} for B in batches}

    if args.gemv_shapes:
        print("GEMV shapes (batch-1 decode)", flush=True)
        try:
            res["gemv_shapes"] = gemv_shapes()
        except Exception as e:  # noqa: BLE001
            res["gemv_shapes"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    print("check: graph vs eager", flush=True)
    try:
        res["check"] = check_graph_vs_eager(model)
    except Exception as e:  # noqa: BLE001
        res["check"] = f"error: {type(e).__name__}: {e}"
        traceback.print_exc()
    print(res["check"], flush=True)
    save()

    s = res["systems"]
    from fastxlstm.generation import pack_projections, unpack_projections
    from fastxlstm.generation.graph import clear_graphs
    from fastxlstm.generation.packing import is_packed, packing_default
    graph_name = "fastxlstm graph"
    if args.pack_compare:
        graph_name = "fastxlstm graph (packed)" if packing_default() else "fastxlstm graph (FASTXLSTM_PACK=0)"
    print(f"ours (CUDA graph; packing {'on' if packing_default() else 'off (FASTXLSTM_PACK=0)'})", flush=True)
    s[graph_name] = {"throughput": throughput(ours_generate(model, True), V, batches, args.new, deadline=deadline)}
    res["meta"]["graph_packed"] = is_packed(model)
    save()
    if not args.skip_context:
        s[graph_name]["per_token_vs_context"] = per_token_vs_context(ours_generate(model, True), V, contexts,
                                                                     deadline=deadline)
    if not args.skip_prefill:
        try:
            s[graph_name]["prefill_16k_s"] = ours_prefill(model, 16384)
            print(f"    prefill 16k: {s[graph_name]['prefill_16k_s']:.3f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            s[graph_name]["prefill_16k_s"] = f"error: {e}"
    if not args.skip_memory:
        try:
            s[graph_name]["memory"] = memory_flat(model)
        except Exception as e:  # noqa: BLE001
            s[graph_name]["memory"] = f"error: {e}"
    save()
    if args.pack_compare and packing_default():
        # the same graph path on the unpacked model (what FASTXLSTM_PACK=0 gives)
        print("ours (CUDA graph, unpacked: FASTXLSTM_PACK=0)", flush=True)
        clear_graphs(model)
        unpack_projections(model)
        os.environ["FASTXLSTM_PACK"] = "0"
        try:
            s["fastxlstm graph (unpacked, FASTXLSTM_PACK=0)"] = {
                "throughput": throughput(ours_generate(model, True), V, batches, args.new, deadline=deadline)}
        finally:
            del os.environ["FASTXLSTM_PACK"]
            clear_graphs(model)
            pack_projections(model)
        save()
    for flag, env, val, label in ((args.compile_compare, "FASTXLSTM_COMPILE_DECODE", "off",
                                   "fastxlstm graph (uncompiled step)"),
                                  (args.state_compare, "FASTXLSTM_DECODE_STATE", "bf16",
                                   "fastxlstm graph (bf16 state)")):
        if not flag:
            continue
        print(f"ours ({label}: {env}={val})", flush=True)
        clear_graphs(model)
        old_env = os.environ.get(env)
        os.environ[env] = val
        try:
            s[label] = {"throughput": throughput(ours_generate(model, True), V, batches, args.new, deadline=deadline)}
            if env == "FASTXLSTM_DECODE_STATE":
                s[label]["accuracy_vs_fp32_state"] = state_accuracy(model)
                print(f"    accuracy: {s[label]['accuracy_vs_fp32_state']}", flush=True)
        except Exception as e:  # noqa: BLE001
            s[label] = f"error: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        finally:
            if old_env is None:
                del os.environ[env]
            else:
                os.environ[env] = old_env
            clear_graphs(model)
        save()
    if not args.skip_eager:
        print("ours (eager)", flush=True)
        s["fastxlstm eager"] = {"throughput": throughput(ours_generate(model, False), V, batches[:2],
                                                         min(args.new, 64), deadline=deadline)}
    if not args.skip_profile:
        try:
            res["profile"] = profile_step(model)
            print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "top_ops"}
                              for k, v in res["profile"].items()}), flush=True)
        except Exception as e:  # noqa: BLE001
            res["profile"] = f"error: {e}"
    save()
    clear_graphs(model)

    is_large = type(model).__name__ == "XLSTMLarge"
    if is_large and not args.skip_official:
        print("official xlstm", flush=True)
        try:
            off = build_official(model)
            s["official xlstm"] = {"throughput": throughput(official_generate(off), V, batches[:3], min(args.new, 128),
                                                            deadline=deadline)}
            s["official xlstm"]["per_token_vs_context"] = per_token_vs_context(official_generate(off), V, contexts[:2],
                                                                               deadline=deadline)
            del off
        except Exception as e:  # noqa: BLE001
            s["official xlstm"] = f"error: {type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        _free()
        save()
    if is_large and not args.skip_transformers:
        print("transformers xLSTMForCausalLM", flush=True)
        try:
            hf = build_transformers_xlstm(model)
            s["transformers xLSTM"] = {"throughput": throughput(hf_generate(hf), V, batches[:2], min(args.new, 64),
                                                                deadline=deadline)}
            del hf
        except Exception as e:  # noqa: BLE001
            s["transformers xLSTM"] = f"error: {type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        _free()
        save()
    c = model.config
    del model
    _free()
    for preset in [p for p in args.extra_presets.split(",") if p]:
        res.setdefault("extra_presets", {})[preset] = extra_preset(preset, args, deadline)
        save()
    if not args.skip_llama:
        E = getattr(c, "hidden_size", None) or c.embedding_dim
        L = getattr(c, "num_hidden_layers", None) or c.num_blocks
        heads = max(1, E // 128)
        print(f"Llama (E={E}, {L} layers, {heads} heads, GQA 8 kv heads, FFN {int(3.5 * E) // 64 * 64})", flush=True)
        try:
            llama = build_llama(E, L, heads, min(8, heads), int(3.5 * E) // 64 * 64, V, dtype)
            res["meta"]["llama_params"] = sum(p.numel() for p in llama.parameters())
            if not args.skip_llama_eager:
                s["llama (transformers, eager, dynamic cache)"] = {
                    "throughput": throughput(hf_generate(llama), V, batches[:3], min(args.new, 64), deadline=deadline)}
                if not args.skip_context:
                    s["llama (transformers, eager, dynamic cache)"]["per_token_vs_context"] = per_token_vs_context(
                        hf_generate(llama), V, contexts, deadline=deadline)
                save()
            name = "llama (transformers, static cache + torch.compile)"
            print(name, flush=True)
            try:
                kw = static_compile_kwargs()
                res["meta"]["llama_static_kwargs"] = {k: repr(v) for k, v in kw.items()}
                llama_batches = [int(b) for b in args.llama_batches.split(",")]
                s[name] = {"throughput": throughput(hf_generate(llama, **kw), V, llama_batches, min(args.new, 128),
                                                    deadline=deadline, warm_new=min(args.new, 128))}
            except Exception as e:  # noqa: BLE001
                s[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            del llama
        except Exception as e:  # noqa: BLE001
            s["llama"] = f"error: {type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        _free()
    save()
    print(f"wrote {args.out}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# table and plot
# ---------------------------------------------------------------------------------------------------------------

def _tps(v):
    return v["tokens_per_s"] if isinstance(v, dict) else None


def table(res) -> str:
    batches = sorted({int(b) for sysr in res["systems"].values() if isinstance(sysr, dict)
                      for b in sysr.get("throughput", {})})
    lines = ["| system | " + " | ".join(f"B={b} tok/s" for b in batches) + " | prefill 16k (s) |",
             "|---|" + "---|" * (len(batches) + 1)]
    for name, sysr in res["systems"].items():
        if not isinstance(sysr, dict):
            lines.append(f"| {name} | " + " | ".join("-" for _ in batches) + f" | {sysr[:60]} |")
            continue
        cells = []
        for b in batches:
            v = sysr.get("throughput", {}).get(str(b))
            cells.append(f"{_tps(v):,.0f}" if _tps(v) else ("-" if v is None else str(v)[:40]))
        pf = sysr.get("prefill_16k_s")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pf:.3f} |" if isinstance(pf, float)
                     else f"| {name} | " + " | ".join(cells) + " | - |")
    fl = res.get("floor", {})
    lines.append("| floor (weights + state read/write at copy bandwidth) | "
                 + " | ".join(f"{fl[str(b)]['tokens_per_s']:,.0f}" if str(b) in fl else "-" for b in batches) + " | - |")
    for preset, ex in res.get("extra_presets", {}).items():
        if "error" in ex:
            lines.append(f"\n{preset}: error {ex['error'][:200]}")
            continue
        cells = []
        for b, v in ex.get("graph", {}).items():
            f = ex.get("floor", {}).get(b, {}).get("tokens_per_s")
            cells.append(f"B={b}: {_tps(v):,.0f} tok/s" if _tps(v) else f"B={b}: {str(v)[:60]}")
            if f:
                cells[-1] += f" (floor {f:,.0f})"
        lines.append(f"\n{preset} (graph path): " + "; ".join(cells) + f"; check: {ex.get('check')}")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {name: f"C{i}" for i, name in enumerate(res["systems"])}
    for name, sysr in res["systems"].items():
        if not isinstance(sysr, dict):
            continue
        th = {int(b): _tps(v) for b, v in sysr.get("throughput", {}).items() if _tps(v)}
        if th:
            bs = sorted(th)
            a1.plot(bs, [th[b] for b in bs], "o-", label=name, color=colors[name])
        ctx = {int(L): v["ms_per_token"] for L, v in sysr.get("per_token_vs_context", {}).items() if isinstance(v, dict)}
        if ctx:
            ls = sorted(ctx)
            a2.plot(ls, [ctx[L] for L in ls], "o-", label=name, color=colors[name])
    fl = res.get("floor", {})
    if fl:
        bs = sorted(int(b) for b in fl)
        a1.plot(bs, [fl[str(b)]["tokens_per_s"] for b in bs], "k--", label="floor (bytes / copy bandwidth)")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("batch size")
    a1.set_ylabel("generated tokens / s")
    a1.set_title("throughput (prompt 32, greedy)")
    a1.legend(fontsize=7)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("context length (prompt tokens)")
    a2.set_ylabel("ms per generated token (B=1)")
    a2.set_title("time per token vs context")
    a2.legend(fontsize=7)
    m = res["meta"]
    fig.suptitle(f"{m['preset']} generation, {m['gpu']}, torch {m['versions']['torch']}, {m['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/h200_generation.json")
    ap.add_argument("--plot", metavar="JSON", help="only draw the plot and print the table of a results file")
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--new", type=int, default=256, help="new tokens per throughput run")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new measurements after this")
    ap.add_argument("--quick", action="store_true", help="B=1,4; contexts 256,1024; 32 new tokens")
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--gemv-shapes", action="store_true", help="also time cuBLAS vs our batch-1 Triton GEMV")
    ap.add_argument("--compile-compare", action="store_true",
                    help="also the graph path with the uncompiled step (FASTXLSTM_COMPILE_DECODE=off)")
    ap.add_argument("--state-compare", action="store_true",
                    help="also the graph path with bf16 C states (FASTXLSTM_DECODE_STATE=bf16) and its accuracy")
    ap.add_argument("--pack-compare", action="store_true",
                    help="also run the graph path with the projections unpacked (FASTXLSTM_PACK=0) at the same "
                         "batch sizes (the default row packs them: fastxlstm.generation.pack_projections)")
    ap.add_argument("--extra-presets", default="", metavar="LIST",
                    help="comma-separated other presets (e.g. 1.3b) measured on the graph path at --extra-batches, "
                         "after the main preset's rows")
    ap.add_argument("--extra-batches", default="1", metavar="LIST", help="batch sizes for --extra-presets (1)")
    ap.add_argument("--llama-batches", default="1", metavar="LIST",
                    help="batch sizes of the Llama static cache + torch.compile row (1; each compiles again)")
    ap.add_argument("--skip-llama-eager", action="store_true",
                    help="only the Llama static cache + torch.compile row, not the eager dynamic-cache one")
    ap.add_argument("--skip-context", action="store_true", help="no time-per-token vs context sweeps")
    ap.add_argument("--skip-prefill", action="store_true", help="no 16k-token prefill timing")
    ap.add_argument("--skip-memory", action="store_true", help="no peak-memory measurement")
    ap.add_argument("--skip-eager", action="store_true", help="no eager-loop throughput row of ours")
    ap.add_argument("--skip-profile", action="store_true", help="no torch.profiler kernel count of a decode step")
    args = ap.parse_args()
    if args.plot:
        with open(args.plot) as fh:
            res = json.load(fh)
        plot(res, os.path.splitext(args.plot)[0] + ".png")
        print(table(res))
        return
    if args.quick:
        args.batches, args.contexts, args.new = "1,4", "256,1024", 32
    import torch
    if not torch.cuda.is_available():
        sys.exit("benchmarks/generation.py needs a CUDA GPU")
    main_bench(args)
    with open(args.out) as fh:
        res = json.load(fh)
    plot(res, os.path.splitext(args.out)[0] + ".png")
    print(table(res))


if __name__ == "__main__":
    main()
