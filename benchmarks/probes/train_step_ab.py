"""One compiled training step of a preset, timed on the host and on the GPU: the probe behind the before/after
rows of benchmarks/NOTES.md "Training step, third pass" (not a side-by-side benchmark: benchmarks/training.py is that).

    PYTHONPATH=src TAG=new python benchmarks/probes/train_step_ab.py 350m 8 2048 >> ab.jsonl
    PYTHONPATH=src GRAPH=1 python benchmarks/probes/train_step_ab.py 350m 8 2048   # plain, then as a CUDA graph

With GRAPH=1 the same model (compiled once) is timed twice: the plain step, then forward + backward replayed as a
CUDA graph (fastxlstm.train.graphs.GraphedStep), with the losses of both on the same batch and weights compared.

Builds the preset on CUDA, ``compile_blocks(dynamic=True)``, fused AdamW, bf16 autocast, random tokens; one step to
compile, one to warm up, three timed (median): wall time with a synchronisation, the host's time to enqueue the
step (when it is close to the wall time the step is host-bound), the GPU kernel time of one profiled step and its
top kernels. Prints one JSON line. Run it with PYTHONPATH pointing at two source trees to compare them.
"""
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastxlstm.models.presets import build_model

if len(sys.argv) != 4 or not torch.cuda.is_available():
    raise SystemExit("usage (needs a CUDA GPU): train_step_ab.py PRESET BATCH SEQLEN")
name, B, S = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
with torch.device("cuda"):
    m = build_model(name)
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
m.compile_blocks(dynamic=True)
ids = torch.randint(0, m.config.vocab_size, (B, S), device="cuda")


graphed = None


def step():
    if graphed is not None:
        loss = graphed(ids, ids)
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(ids, labels=ids, return_state=False).loss
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timed(tag):
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    step()
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(3):
        t = time.perf_counter()
        step()
        hosts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e3
    top = sorted(ev, key=lambda e: -getattr(e, "self_device_time_total", 0))[:12]
    wall = sorted(walls)[1]
    return {"tag": tag, "model": name, "B": B, "S": S, "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "first_s": round(first, 1), "wall_ms": round(wall * 1e3, 1),
            "host_ms": round(sorted(hosts)[1] * 1e3, 1), "gpu_ms": round(gpu, 1), "tok_s": round(B * S / wall),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1),
            "reserved_gb": round(torch.cuda.memory_reserved() / 1e9, 1),
            "top": [(e.key[:70], round(e.self_device_time_total / 1e3, 2), e.count) for e in top]}


tag = os.environ.get("TAG", "")
print(json.dumps(timed(tag)), flush=True)
if os.environ.get("GRAPH"):
    from fastxlstm.train.graphs import GraphedStep

    def plain_loss():  # with grad mode on, as in training (no recompilation); no backward
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return float(m(ids, labels=ids, return_state=False).loss.detach())

    before = plain_loss()
    graphed = GraphedStep(m, lambda a, b: m(a, labels=b, return_state=False).loss, autocast_dtype=torch.bfloat16)
    rec = timed(tag + "+graph")
    # the loss of the batch at the current weights through the graph (a replay computes gradients, updates nothing)
    graph_loss = float(graphed(ids, ids))
    opt.zero_grad(set_to_none=True)
    rec["check"] = {"plain_loss_now": plain_loss(), "graph_loss_now": graph_loss, "plain_loss_before": before}
    print(json.dumps(rec), flush=True)
