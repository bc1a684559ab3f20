"""Host-side cost of one eager decode step at B=1 (xLSTM-7B heads): wall time per call without and with
synchronisation, and a cProfile of 2,000 calls (where the Python time goes). python benchmarks/profile_step_host.py"""
import cProfile
import pstats
import time

import torch

from fastxlstm.ops.mlstm_forms.triton import mlstm_step_triton

q = torch.randn(1, 8, 256, device="cuda", dtype=torch.bfloat16)
k = torch.randn_like(q)
v = torch.randn(1, 8, 512, device="cuda", dtype=torch.bfloat16)
i = torch.randn(1, 8, device="cuda", dtype=torch.bfloat16)
f = i + 3
st = (torch.randn(1, 8, 256, 512, device="cuda"), torch.randn(1, 8, 256, device="cuda"), torch.randn(1, 8, device="cuda"))
for _ in range(100):
    mlstm_step_triton(q, k, v, i, f, st)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(2000):
    mlstm_step_triton(q, k, v, i, f, st)
host = (time.perf_counter() - t) / 2000
torch.cuda.synchronize()
total = (time.perf_counter() - t) / 2000
print(f"host time per call {host * 1e6:.1f} us; with the GPU drained at the end {total * 1e6:.1f} us per call")
pr = cProfile.Profile()
pr.enable()
for _ in range(2000):
    mlstm_step_triton(q, k, v, i, f, st)
pr.disable()
torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
