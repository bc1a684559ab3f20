"""Tile/warp sweep of our mLSTM Triton kernels (fw and fwbw at S=4k, 65k tokens).

    python benchmarks/sweep_mlstm.py [variant ...]      # all variants when none is named
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlstm_kernels import SHAPES, bench_ours  # noqa: E402

from fastxlstm.ops.mlstm_forms.triton._chunkwise import MLSTMTritonConfig, default_config  # noqa: E402

VARIANTS = {
    "default": {},
    "w4": {"num_warps": 4},
    "w8": {"num_warps": 8},
    "st3": {"num_stages": 3},
    "st1": {"num_stages": 1},
    "Ks128": {"block_k_state": 128},
    "KVs128_ws8": {"block_k_state": 128, "block_v_state": 128, "num_warps_state": 8},
    "Vs32": {"block_v_state": 32},
    "sst1": {"num_stages_state": 1},
    "sst3": {"num_stages_state": 3},
    "L128": {"chunk": 128},
    "BT32": {"block_t": 32},
    "V64": {"block_v": 64},
    "K64": {"block_k": 64},
}
out = {}
for name in ("A", "B"):
    d = SHAPES[name]
    base = default_config(d["DQK"], d["DV"])
    for vn, kw in VARIANTS.items():
        if len(sys.argv) > 1 and vn not in sys.argv[1:]:
            continue
        if name == "A" and vn in ("V64", "K64"):
            continue
        cfg = MLSTMTritonConfig(**{**base.__dict__, **kw})
        try:
            r = bench_ours(name, 4096, cfg)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        out[f"{name}_{vn}"] = r
        print(name, vn, r, flush=True)
        torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "sweep.json"), "w"), indent=1)
