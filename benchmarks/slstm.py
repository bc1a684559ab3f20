"""sLSTM side by side on one GPU: ours (fastxlstm Triton kernels: the cell alone and the full sLSTM layer), the
eager PyTorch recurrent form (at a short S: it is ~100x slower), and the official xlstm CUDA sLSTM layer
(sLSTMLayer, backend "cuda", bf16: an nvcc build at first use, run in a subprocess so that a failed build is
recorded, not fatal).

    python benchmarks/slstm.py --out benchmarks/results/h200_slstm.json        # on the GPU (all shapes)
    python benchmarks/slstm.py --quick --out /tmp/slstm_quick.json             # S=512, two shapes, no sweep
    python benchmarks/slstm.py --sweep --out ...                                # also time other kernel tilings
    python benchmarks/slstm.py --plot benchmarks/results/h200_slstm.json       # png + markdown table only

Shapes: the paper's sLSTM at E = 1024 (B=16, S=2048, NH=4, DH=256), the same width with DH = 128 and 64
(NH = 8, 16), and B = 1, 64 at DH = 256. bf16 inputs, float32 state. "fw" = forward without autograd, "fwbw" =
forward + backward of a random output gradient (gradients to x, R, b; the layer: all parameters and x). Times:
median of CUDA-event timings after warm-up. Before timing, our kernels are checked in the same run against the
float64 step-by-step reference (S = 128, B = 16, NH = 4, DH = 256 and DH = 64; outputs and every gradient).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

E = 1024
SHAPES = {  # name -> (B, NH, DH)
    "B16 NH4 DH256": (16, 4, 256),
    "B16 NH8 DH128": (16, 8, 128),
    "B16 NH16 DH64": (16, 16, 64),
    "B1 NH4 DH256": (1, 4, 256),
    "B64 NH4 DH256": (64, 4, 256),
}
QUICK_SHAPES = ("B16 NH4 DH256", "B16 NH16 DH64")
EAGER_S = 64  # the eager recurrent form is timed at this S only


def bench(fn, warmup=2, reps=5):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def versions():
    import torch
    out = {"torch": torch.__version__}
    for mod in ("triton", "xlstm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # pragma: no cover
            out[mod] = f"not importable: {type(e).__name__}"
    return out


# ------------------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------------------

def _cell_inputs(B, S, NH, DH, dtype, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, S, 4, NH, DH, device="cuda", generator=g).to(dtype)
    R = torch.randn(4, NH, DH, DH, device="cuda", generator=g) / DH ** 0.5
    b = torch.randn(4, NH, DH, device="cuda", generator=g) * 0.5
    b[1] += 3.0
    return x, R, b


def time_cell(B, S, NH, DH, backend, dtype, cfg=None):
    import torch
    from fastxlstm.ops import slstm
    from fastxlstm.ops.slstm_forms.triton import slstm_triton
    x, R, b = _cell_inputs(B, S, NH, DH, dtype)

    def run(x, R, b):
        if cfg is not None:
            return slstm_triton(x, R, b, None, None, cfg)
        return slstm(x, R, b, backend=backend)

    def fw():
        with torch.no_grad():
            run(x, R, b)

    xg, Rg, bg = x.clone().requires_grad_(), R.clone().requires_grad_(), b.clone().requires_grad_()
    gh = torch.randn(B, S, NH, DH, device="cuda", dtype=dtype)

    def fwbw():
        h, _ = run(xg, Rg, bg)
        torch.autograd.backward(h, gh)
        xg.grad = Rg.grad = bg.grad = None

    return {"fw": bench(fw), "fwbw": bench(fwbw)}


def time_layer(B, S, NH, DH, backend, dtype):
    import torch
    from fastxlstm.layers.slstm import SLSTMLayer
    torch.manual_seed(0)
    layer = SLSTMLayer(NH * DH, NH, conv_kernel_size=4).cuda().to(dtype)
    with torch.no_grad():
        layer.recurrent_kernel.normal_(0, DH ** -0.5)
    x = torch.randn(B, S, NH * DH, device="cuda", dtype=dtype)

    def fw():
        with torch.no_grad():
            layer(x, backend=backend)

    xg = x.clone().requires_grad_()
    gy = torch.randn_like(x)

    def fwbw():
        y, _ = layer(xg, backend=backend)
        torch.autograd.backward(y, gy)
        layer.zero_grad(set_to_none=True)
        xg.grad = None

    return {"fw": bench(fw), "fwbw": bench(fwbw)}


def correctness():
    """Our kernels against the float64 reference (outputs, final state, every gradient), on this GPU."""
    import torch
    from fastxlstm.ops import slstm
    out = {}
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for (B, S, NH, DH) in ((16, 128, 4, 256), (16, 128, 8, 128), (16, 128, 16, 64)):
            for dtype in (torch.bfloat16, torch.float32):
                x, R, b = _cell_inputs(B, S, NH, DH, dtype, seed=1)
                g = torch.Generator(device="cuda").manual_seed(2)
                st = (torch.randn(B, NH, DH, device="cuda", generator=g),
                      torch.rand(B, NH, DH, device="cuda", generator=g) + 0.5,
                      torch.rand(B, NH, DH, device="cuda", generator=g) - 0.5,
                      torch.randn(B, NH, DH, device="cuda", generator=g) * 0.5)
                resets = torch.rand(B, S, device="cuda", generator=g) < 0.02
                gh = torch.randn(B, S, NH, DH, device="cuda", generator=g, dtype=torch.float64)
                gc = torch.randn(B, NH, DH, device="cuda", generator=g, dtype=torch.float64)
                res = {}
                key = f"B{B} S{S} NH{NH} DH{DH} {str(dtype).replace('torch.', '')}"
                try:
                    for name, backend, xd, wd in (("ours", "triton", dtype, torch.float32),
                                                  ("ref", "reference", torch.float64, torch.float64)):
                        L = [x.to(xd).requires_grad_(), R.to(wd).requires_grad_(), b.to(wd).requires_grad_()] + \
                            [s.to(wd).requires_grad_() for s in st]
                        h, (c, n, m, hl) = slstm(L[0], L[1], L[2], state=(L[3], L[4], L[5].detach(), L[6]),
                                                 backend=backend, resets=resets)
                        ct = c.double() * torch.exp(m.double())
                        loss = (h.double() * gh).sum() + (ct * gc).sum() + hl.double().sum()
                        grads = torch.autograd.grad(loss, [L[i] for i in (0, 1, 2, 3, 4, 6)])
                        res[name] = dict(zip(("h", "c_true", "h_last", "d_x", "d_R", "d_b", "d_c0", "d_n0", "d_h0"),
                                             [h, ct, hl] + list(grads)))
                except Exception as e:  # recorded, not fatal: the timings still run
                    out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    continue
                errs = {}
                for k, ref in res["ref"].items():
                    a, r = res["ours"][k].detach().double(), ref.detach().double()
                    errs[k] = float((a - r).norm() / r.norm())
                out[key] = errs
    finally:
        torch.set_float32_matmul_precision(old)
    return out


# ------------------------------------------------------------------------------------------------------------
# official (subprocess)
# ------------------------------------------------------------------------------------------------------------

def official_worker(shapes, S):
    """In a subprocess: the official sLSTMLayer (backend cuda, bf16) per shape; prints one JSON line per shape."""
    import torch
    try:
        from xlstm.blocks.slstm.layer import sLSTMLayer, sLSTMLayerConfig
    except Exception as e:
        for name in shapes:
            print("OFFICIAL " + json.dumps({"shape": name, "error": f"import failed: {e!r}"}), flush=True)
        return
    for name in shapes:
        B, NH, DH = SHAPES[name]
        try:
            cfg = sLSTMLayerConfig(embedding_dim=NH * DH, num_heads=NH, conv1d_kernel_size=4, backend="cuda",
                                   batch_size=B, dtype="bfloat16")
            layer = sLSTMLayer(cfg).cuda()
            layer.reset_parameters()
            layer = layer.to(torch.bfloat16)
            x = torch.randn(B, S, NH * DH, device="cuda", dtype=torch.bfloat16)
            layer.eval()

            def fw():
                with torch.no_grad():
                    layer(x)

            t0 = datetime.datetime.now()
            fw()  # the first call builds the extension (nvcc)
            torch.cuda.synchronize()
            build_s = (datetime.datetime.now() - t0).total_seconds()
            t_fw = bench(fw)
            layer.train()
            xg = x.clone().requires_grad_()
            gy = torch.randn_like(x)

            def fwbw():
                y = layer(xg)
                torch.autograd.backward(y, gy)
                layer.zero_grad(set_to_none=True)
                xg.grad = None

            t_fwbw = bench(fwbw)
            print("OFFICIAL " + json.dumps({"shape": name, "fw": t_fw, "fwbw": t_fwbw,
                                            "first_call_s": build_s}), flush=True)
        except Exception as e:
            tb = traceback.format_exc()[-1500:]
            print("OFFICIAL " + json.dumps({"shape": name, "error": f"{type(e).__name__}: {e}"[:500], "tb": tb}),
                  flush=True)


def run_official(shapes, S, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--official-worker", "--S", str(S), "--shapes", *shapes]
    res = {name: {"error": "failed: no result (crash or timeout)"} for name in shapes}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timeout after {timeout} s", None
    for line in out.splitlines():
        if line.startswith("OFFICIAL "):
            d = json.loads(line[len("OFFICIAL "):])
            res[d.pop("shape")] = d
    for name, d in res.items():
        if "error" in d and rc not in (0, None):
            d["stderr_tail"] = err[-1500:]
    return res


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------

def _fmt(v):
    if isinstance(v, (int, float)):
        return f"{v:.2f}"
    return "failed" if v is None else str(v)


def table(data) -> str:
    rows = ["| shape (S=%d) | ours cell fw | ours cell fwbw | one program per head fw / fwbw | ours layer fw | "
            "ours layer fwbw | official layer fw | official layer fwbw | eager cell fw (S=%d) | eager cell fwbw (S=%d) |"
            % (data["S"], EAGER_S, EAGER_S),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["results"].items():
        off = r.get("official", {})
        offfw = off.get("fw", "failed" if "error" in off else "-")
        offbw = off.get("fwbw", "failed" if "error" in off else "-")
        one = r.get("cell_one_program_per_head")
        one = f"{_fmt(one['fw'])} / {_fmt(one['fwbw'])}" if one else "(same)"
        rows.append(f"| {name} | {_fmt(r['cell']['fw'])} | {_fmt(r['cell']['fwbw'])} | {one} | {_fmt(r['layer']['fw'])} | "
                    f"{_fmt(r['layer']['fwbw'])} | {_fmt(offfw)} | {_fmt(offbw)} | "
                    f"{_fmt(r.get('eager', {}).get('fw', '-'))} | {_fmt(r.get('eager', {}).get('fwbw', '-'))} |")
    return "\n".join(rows)


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(data["results"])
    series = [("ours cell", lambda r: r["cell"]),
              ("ours cell, one program per head", lambda r: r.get("cell_one_program_per_head", r["cell"])),
              ("ours layer", lambda r: r["layer"]), ("official layer (CUDA)", lambda r: r.get("official", {}))]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, mode in zip(axes, ("fw", "fwbw")):
        w = 0.8 / len(series)
        for k, (label, get) in enumerate(series):
            vals = [get(data["results"][n]).get(mode) for n in names]
            xs = [i + (k - (len(series) - 1) / 2) * w for i in range(len(names))]
            ax.bar(xs, [v if isinstance(v, (int, float)) else 0 for v in vals], w, label=label)
            for xx, v in zip(xs, vals):
                if not isinstance(v, (int, float)):
                    ax.text(xx, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"sLSTM {mode}, S={data['S']}, bf16 ({data['gpu']})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "h200_slstm.json"))
    ap.add_argument("--quick", action="store_true", help="S=512, two shapes, no sweep")
    ap.add_argument("--S", type=int, default=None)
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time other tilings of the kernels (first shape)")
    ap.add_argument("--official-timeout", type=int, default=400, help="seconds for all official shapes (nvcc builds included)")
    ap.add_argument("--plot", default=None, help="only redraw the png and table of an existing JSON")
    ap.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.plot:
        with open(args.plot) as fh:
            data = json.load(fh)
        plot(data, os.path.splitext(args.plot)[0] + ".png")
        print(table(data))
        return
    S = args.S or (512 if args.quick else 2048)
    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else list(SHAPES))
    if args.official_worker:
        official_worker(shapes, S)
        return

    import torch
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dtype = torch.bfloat16
    data = {"gpu": torch.cuda.get_device_name(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "S": S, "dtype": "bfloat16", "E": E, "units": "ms (median)", "results": {}}
    print(f"{data['gpu']} {data['versions']}", flush=True)
    data["correctness_vs_float64"] = correctness()
    for k, v in data["correctness_vs_float64"].items():
        print("check", k, " ".join(f"{a}={b:.1e}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()),
              flush=True)
    for name in shapes:
        B, NH, DH = SHAPES[name]
        r = {"B": B, "NH": NH, "DH": DH}
        r["cell"] = time_cell(B, S, NH, DH, "triton", dtype)
        if DH >= 128:  # the design before the split kernels, in the same run
            from fastxlstm.ops.slstm_forms.triton._kernels import TILED_LARGE_HEAD
            r["cell_one_program_per_head"] = time_cell(B, S, NH, DH, "triton", dtype, cfg=TILED_LARGE_HEAD)
        r["layer"] = time_layer(B, S, NH, DH, "triton", dtype)
        r["eager"] = dict(time_cell(B, EAGER_S, NH, DH, "recurrent", dtype), S=EAGER_S)
        print(name, json.dumps(r), flush=True)
        data["results"][name] = r
    if args.sweep:
        from fastxlstm.ops.slstm_forms.triton._kernels import SLSTMTritonConfig, default_config
        name = shapes[0]
        B, NH, DH = SHAPES[name]
        sweep = {"shape": name, "default": repr(default_config(DH, dtype)), "runs": []}
        cands = [SLSTMTritonConfig(block_b=bb, split=p, num_warps=nw)
                 for p in (2, 4, 8, 16) for bb in (16, 32) for nw in (4, 8) if 16 <= DH // p]
        cands += [SLSTMTritonConfig(block_j=bj, block_k=bk, num_warps=8)
                  for bj in (64, 128) for bk in (32, 64) if bj <= DH and bk <= DH]
        if DH <= 64:
            cands += [SLSTMTritonConfig(block_j=DH, block_k=DH, num_warps=nw, hoist=True) for nw in (4, 8)]
        for cfg in cands:
            try:
                t = time_cell(B, S, NH, DH, "triton", dtype, cfg=cfg)
            except Exception as e:
                t = {"error": f"{type(e).__name__}: {e}"[:300]}
            sweep["runs"].append({"cfg": repr(cfg), **t})
            print("sweep", repr(cfg), t, flush=True)
        data["sweep"] = sweep
    if not args.no_official:
        off = run_official(shapes, S, args.official_timeout)
        for name, d in off.items():
            data["results"][name]["official"] = d
            print("official", name, json.dumps(d)[:300], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1)
    plot(data, os.path.splitext(args.out)[0] + ".png")
    print(table(data))


if __name__ == "__main__":
    main()
