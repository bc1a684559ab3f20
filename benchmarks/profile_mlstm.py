"""Per-kernel GPU time of our mLSTM Triton kernels (torch.profiler), for tuning: python benchmarks/profile_mlstm.py"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from mlstm_kernels import fw_and_fwbw, make_inputs  # noqa: E402

from fastxlstm.ops.mlstm_forms.triton._chunkwise import mlstm_chunkwise_triton  # noqa: E402


def call(q, k, v, i, f):
    return mlstm_chunkwise_triton(q, k, v, i, f)[0]


for name, S in [("A", 4096), ("B", 4096)]:
    xs, dh = make_inputs(name, S, torch.bfloat16, True)
    fw, fwbw = fw_and_fwbw(call, xs, dh)
    fwbw()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwbw()
        torch.cuda.synchronize()
    print(f"=== shape {name} S={S} fwbw, per call (5 calls) ===")
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    for e in ev[:16]:
        print(f"{e.device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5:3d}  {e.key[:90]}")
    del xs, dh
    torch.cuda.empty_cache()
