"""Where a training step's memory goes: static (weights, Adam state), activations kept for the backward, and the
transient peak above them, for a fastxlstm preset (fast path) or the benchmark's Llama; the probe behind the memory
paragraph of benchmarks/NOTES.md (issue 10). Not a benchmark: benchmarks/training.py is that.

    PYTHONPATH=src python benchmarks/probes/train_memory.py 350m 8 2048 [loss_chunk ...]   # needs a CUDA GPU
    PYTHONPATH=src python benchmarks/probes/train_memory.py llama 8 2048

Prints one JSON line per variant (GB): static = allocated before the step (weights, Adam state; gradients None),
activations = allocated after the forward minus static, peak_fwd / peak_bwd = the highest allocation during the
forward / backward minus static (the backward's includes the gradients it creates).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import build_llama, build_ours, make_batch, VOCAB  # noqa: E402

if len(sys.argv) < 4 or not torch.cuda.is_available():
    raise SystemExit("usage (needs a CUDA GPU): train_memory.py PRESET|llama BATCH SEQLEN [LOSS_CHUNK ...]")
name, B, S = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chunks = [int(c) for c in sys.argv[4:]] or [None]
dev = torch.device("cuda")
torch.manual_seed(0)
m = build_llama(dev, False) if name == "llama" else build_ours(name, dev, False)
m.train()
if name != "llama":
    m.compile_blocks()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
ids, labels = make_batch(B, S, VOCAB, dev, seed=0)
GB = 1e9
blocks = len(m.model.layers) if name == "llama" else len(m.block_modules())


def loss_of():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if name == "llama":
            return m(input_ids=ids, labels=ids).loss
        return m(ids, labels=labels, return_state=False).loss


for chunk in chunks:
    if chunk is not None:
        m.loss_chunk_size = chunk
    for _ in range(2):  # compile, Adam state
        loss_of().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = loss_of()
    torch.cuda.synchronize()
    act = torch.cuda.memory_allocated() - static
    peak_fwd = torch.cuda.max_memory_allocated() - static
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    peak_bwd = torch.cuda.max_memory_allocated() - static
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(json.dumps({"model": name, "B": B, "S": S, "loss_chunk": chunk, "static_gb": round(static / GB, 2),
                      "activations_gb": round(act / GB, 2), "peak_fwd_gb": round(peak_fwd / GB, 2),
                      "peak_bwd_gb": round(peak_bwd / GB, 2),
                      "peak_total_gb": round((static + max(peak_fwd, peak_bwd)) / GB, 2),
                      "activations_per_token_per_block_kb": round(act / (B * S) / blocks / 1e3, 1)}),
          flush=True)
