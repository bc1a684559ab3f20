"""Chunk length and state tiling of the Triton mLSTM at the training shapes of our models (issue 10).

    python benchmarks/sweep_mlstm_chunk.py [--out benchmarks/results/h200_mlstm_chunk.json]

The two state kernels walk the chunks of a sequence one after another, one program per (batch x head, state
tile). At 16k tokens per step a long context means a small batch, so few programs and a long sequential chain:
this times forward + backward of the cell (bf16, inputs in the layers' (B, S, NH, D) layout) for chunk lengths
64 / 128 / 256 and state tilings (tile widths, warps, stages) at the heads of `7b-400m` (4 heads, DQK 128, DV 256)
and `350m` (4 heads of 512), at (B, S) = (8, 2k), (2, 8k), (1, 16k) (`--contexts`); marks the fastest and what ``auto_tiling`` (the default) picks; checks
every variant's h and gradients against chunk 64's in the same run; writes JSON and a plot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "src"))

HEADS = {"7b-400m": (4, 128, 256), "350m": (4, 512, 512)}


def variants(name):
    out = [("L64", dict(chunk=64)), ("L128", dict(chunk=128)), ("L256", dict(chunk=256))]
    if name == "350m":  # the state kernels' tiles (DQK x DV tile per program, warps, pipeline stages)
        for L, ks, vs, w, st in ((128, 64, 64, 4, 2), (128, 128, 32, 4, 2), (128, 64, 128, 4, 2),
                                 (128, 128, 128, 8, 2), (128, 128, 64, 8, 2), (128, 128, 64, 4, 3),
                                 (128, 64, 64, 4, 3), (64, 128, 128, 8, 2), (256, 128, 128, 8, 2),
                                 (256, 64, 64, 4, 2)):
            out.append((f"L{L} Ks{ks} Vs{vs} w{w} s{st}",
                        dict(chunk=L, block_k_state=ks, block_v_state=vs, num_warps_state=w, num_stages_state=st)))
    if name == "7b-400m":
        out += [("L64 Vs32", dict(chunk=64, block_v_state=32)), ("L128 Vs32", dict(chunk=128, block_v_state=32)),
                ("L256 Vs32", dict(chunk=256, block_v_state=32))]
    return out


def inputs(B, S, NH, DQK, DV, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale + shift)

    q = r(B, S, NH, DQK).bfloat16().transpose(1, 2).requires_grad_()
    k = r(B, S, NH, DQK).bfloat16().transpose(1, 2).requires_grad_()
    v = r(B, S, NH, DV).bfloat16().transpose(1, 2).requires_grad_()
    i = r(B, NH, S, scale=1.0).requires_grad_()
    f = r(B, NH, S, scale=1.0, shift=3.0).requires_grad_()
    dh = r(B, S, NH, DV).bfloat16().transpose(1, 2)
    return (q, k, v, i, f), dh


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results", "h200_mlstm_chunk.json"))
    p.add_argument("--models", default="7b-400m,350m")
    p.add_argument("--contexts", default="8x2048,2x8192,1x16384", help="B x S pairs (16k tokens each by default)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    import fastxlstm
    from fastxlstm.ops.mlstm_forms.triton._chunkwise import (MLSTMTritonConfig, auto_tiling, default_config,
                                                             mlstm_chunkwise_triton, with_state_tile)
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"benchmark": "mlstm_chunk", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "device": torch.cuda.get_device_name(0), "n_sm": n_sm,
           "versions": {"torch": torch.__version__, "triton": triton.__version__,
                        "fastxlstm": fastxlstm.__version__}, "rows": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(args.out + ".tmp", args.out)

    for name in [m for m in args.models.split(",") if m]:
        NH, DQK, DV = HEADS[name]
        for B, S in [tuple(int(v) for v in c.split("x")) for c in args.contexts.split(",") if c]:
            xs, dh = inputs(B, S, NH, DQK, DV)
            ref = None
            auto_L, auto_bvs = auto_tiling(B * NH, S, DQK, DV, n_sm)
            for vname, kw in variants(name):
                base = default_config(DQK, DV, chunk=kw["chunk"])
                cfg = MLSTMTritonConfig(**{**base.__dict__, **kw})

                def fwbw():
                    for t in xs:
                        t.grad = None
                    h = mlstm_chunkwise_triton(*xs, config=cfg)[0]
                    h.backward(dh)
                    return h

                def fw():
                    with torch.no_grad():
                        return mlstm_chunkwise_triton(*xs, config=cfg)[0]
                row = {"model": name, "B": B, "S": S, "variant": vname, "chunk": kw["chunk"],
                       "block_v_state": cfg.block_v_state, "block_k_state": cfg.block_k_state,
                       "num_warps_state": cfg.num_warps_state, "num_stages_state": cfg.num_stages_state,
                       "auto_chunk": auto_L,
                       "auto": cfg == with_state_tile(default_config(DQK, DV, chunk=auto_L), auto_bvs)}
                try:
                    h = fwbw()
                    grads = [t.grad.float().clone() for t in xs]
                    if ref is None:
                        ref = (h.detach().float(), grads)
                    else:
                        row["h_rel_vs_L64"] = float((h.detach().float() - ref[0]).norm() / ref[0].norm())
                        row["grad_rel_vs_L64_max"] = max(float((a - b).norm() / b.norm())
                                                         for a, b in zip(grads, ref[1]))
                    row["fw_ms"] = do_bench(fw, warmup=5, rep=30)
                    row["fwbw_ms"] = do_bench(fwbw, warmup=5, rep=30)
                except Exception as e:  # noqa: BLE001 - record and go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True)
                res["rows"].append(row)
                save()
            del xs, dh
            torch.cuda.empty_cache()
    save()
    print(table(res))
    plot(res, os.path.splitext(args.out)[0] + ".png")


def table(res):
    lines = ["| model | B x S | variant | fw ms | fwbw ms | vs L64 (h / grads) |", "|---|---|---|---|---|---|"]
    best = {}
    for r in res["rows"]:
        if "fwbw_ms" in r:
            key = (r["model"], r["B"], r["S"])
            if key not in best or r["fwbw_ms"] < best[key][1]:
                best[key] = (r["variant"], r["fwbw_ms"])
    for r in res["rows"]:
        key = (r["model"], r["B"], r["S"])
        mark = (" **best**" if best.get(key, (None,))[0] == r["variant"] else "") + \
               (" (auto)" if r.get("auto") else "")
        err = (f"{r['h_rel_vs_L64']:.1e} / {r['grad_rel_vs_L64_max']:.1e}" if "h_rel_vs_L64" in r else "-")
        if "fwbw_ms" in r:
            lines.append(f"| {r['model']} | {r['B']} x {r['S']} | {r['variant']}{mark} | {r['fw_ms']:.2f} | "
                         f"{r['fwbw_ms']:.2f} | {err} |")
        else:
            lines.append(f"| {r['model']} | {r['B']} x {r['S']} | {r['variant']} | {r.get('error', '?')} | | |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        series = {}
        for r in res["rows"]:
            if r["model"] == m and "fwbw_ms" in r:
                series.setdefault(r["variant"], []).append((r["S"], r["fwbw_ms"]))
        for vname, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if "Vs32" in vname else "-", marker="o",
                    label=vname)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (16k tokens per call: B = 16k / S)")
        ax.set_ylabel("cell forward + backward, ms")
        ax.set_title(f"{m} heads ({HEADS[m][0]} x {HEADS[m][1]}/{HEADS[m][2]}), bf16")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mLSTM Triton cell: chunk length and state tiles, {res['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
