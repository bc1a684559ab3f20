"""Training on several GPUs of one host under torchrun: tokens/s per GPU with DDP and FSDP2 (``fully_shard``) and
the scaling efficiency against one GPU, measured in the same run.

    torchrun --standalone --nproc-per-node 2 benchmarks/training_distributed.py              # 7b-400m, 8k context
    torchrun --standalone --nproc-per-node 2 benchmarks/training_distributed.py --model 350m --context 2048
    torchrun --standalone --nproc-per-node 2 benchmarks/training_distributed.py --device cpu --tiny  # gloo smoke

Each GPU processes 16,384 tokens per step (B = 16384 / S), bf16 autocast, AdamW (fused under DDP and alone; the
default implementation under FSDP2, whose parameters are DTensors), random tokens, the fast path of
benchmarks/training.py (``compile_blocks`` + chunked loss; ``--no-compile`` for the eager blocks). Modes, in order:
"solo" (every rank trains its own unwrapped copy at the same time, no communication: the 1-GPU baseline under
the same conditions), "ddp", "fsdp". Efficiency = per-GPU tokens/s of a mode / solo tokens/s. Each mode runs in
try/except ("oom" / "error: ..." recorded); rank 0 writes the JSON (GPU, versions, date).
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
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if os.path.isdir(os.path.join(_ROOT, "src", "fastxlstm")):
    sys.path.insert(0, os.path.join(_ROOT, "src"))
sys.path.insert(1, _HERE)

import training as single  # noqa: E402  (this folder's training.py: model builders, batches, versions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="7b-400m", choices=single.OURS)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per GPU per step (default 16384)")
    p.add_argument("--modes", default="solo,ddp,fsdp")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.context is None:
        args.context = 64 if args.tiny else 8192
    if args.tokens is None:
        args.tokens = 256 if args.tiny else single.TOKENS

    import torch
    from fastxlstm.train.distributed import init_distributed, shutdown

    info = init_distributed(args.device)
    device = info.device
    V = 256 if args.tiny else single.VOCAB
    S = args.context
    B = max(1, args.tokens // S)
    res = {"benchmark": "training_distributed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "world_size": info.world_size, "versions": single.versions() if info.is_main else None,
           "setup": {"model": args.model, "context": S, "batch_per_gpu": B, "tokens_per_gpu_per_step": B * S,
                     "compile_blocks": args.compile, "precision": "bf16 autocast"},
           "results": []}
    if args.out is None:
        tag = "cpu" if device.type == "cpu" else "h200"
        args.out = os.path.join(_HERE, "results", f"{tag}x{info.world_size}_training_distributed.json")

    def log(msg):
        if info.is_main:
            print(msg, flush=True)

    for mode in [m for m in args.modes.split(",") if m]:
        for use_compile in ([True, False] if args.compile else [False]):
            rec = run_mode(mode, use_compile, args, info, device, V, S, B)
            if rec.get("status") == "ok" or not use_compile or rec.get("status") == "oom":
                break
            log(f"{mode}: failed with compile_blocks ({rec.get('status')}); again with eager blocks")
        res["results"].append(rec)
        log(f"{mode:<5} " + (f"{rec['tokens_per_s_per_gpu'] / 1e3:.1f}k tok/s per GPU, "
                             f"{rec.get('peak_mem_gb', float('nan')):.1f} GB" if rec.get("status") == "ok"
                             else rec.get("status", "?")))
    solo = next((r for r in res["results"] if r["mode"] == "solo" and r.get("status") == "ok"), None)
    for r in res["results"]:
        if solo and r.get("status") == "ok" and r["mode"] != "solo":
            r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / solo["tokens_per_s_per_gpu"]
            log(f"{r['mode']}: scaling efficiency {100 * r['scaling_efficiency']:.1f} %")
    if info.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    shutdown(info)


def run_mode(mode, use_compile, args, info, device, V, S, B):
    """One mode ("solo", "ddp", "fsdp"): build, wrap, warm up, time. Returns the record (same on every rank)."""
    import torch
    import torch.distributed as dist
    from fastxlstm.train.distributed import all_reduce_sum, barrier, wrap_model
    model = opt = wrapped = None
    rec = {"mode": mode, "compile_blocks": use_compile}
    try:
        if mode in ("ddp", "fsdp") and not info.distributed:
            raise RuntimeError("needs torchrun with several processes")
        torch.manual_seed(0)
        model = single.build_ours(args.model, device, args.tiny)
        model.train()
        if use_compile:
            model.compile_blocks(dynamic=False)
        wrapped = model if mode == "solo" else wrap_model(model, info, fsdp=(mode == "fsdp"))
        kw = {"fused": True} if device.type == "cuda" and mode != "fsdp" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **kw)
        ids, labels = single.make_batch(B, S, V, device, seed=1000 + info.rank)

        def step():
            with single.autocast_ctx(device):
                loss = wrapped(ids, labels=labels, return_state=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            step()
        single.sync(device)
        rec["warmup_s"] = time.perf_counter() - t0
        if info.distributed:
            barrier(info)
        t1 = time.perf_counter()
        losses = [float(step()) for _ in range(args.steps)]
        single.sync(device)
        dt = (time.perf_counter() - t1) / args.steps
        # the slowest rank sets the pace: report the max step time over ranks
        t = torch.tensor([dt], dtype=torch.float64, device=device)
        if info.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dt = float(t[0])
        rec.update(status="ok", step_s=dt, tokens_per_s_per_gpu=B * S / dt,
                   tokens_per_s_total=B * S * (info.world_size if mode != "solo" else 1) / dt,
                   loss_last=losses[-1])
        if device.type == "cuda":
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception as e:  # noqa: BLE001
        rec.update(single.error_record(e))
        if info.is_main:
            traceback.print_exc()
    finally:
        model = opt = wrapped = None  # noqa: F841 (free before the next mode)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # every rank agrees whether the mode ran (a failure on one rank must not hang the others' next barrier)
    ok = torch.tensor([1.0 if rec.get("status") == "ok" else 0.0], device=device)
    all_reduce_sum(ok, info)
    rec["ranks_ok"] = int(ok.item())
    if rec["ranks_ok"] < info.world_size and rec.get("status") == "ok":
        rec["status"] = "error: failed on another rank"
    return rec


if __name__ == "__main__":
    main()
