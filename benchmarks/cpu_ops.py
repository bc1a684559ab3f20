"""CPU time and peak memory of the three PyTorch mLSTM forms (parallel, chunkwise, recurrent) against S.

Question: how do the forms scale with the sequence length on a CPU? The parallel form builds S x S matrices
(quadratic time and memory), the chunkwise form is linear in S with a parallel form inside each chunk, the
recurrent form is linear too but runs S small steps in Python.

    python benchmarks/cpu_ops.py            # ~3-5 minutes on 2 cores; writes benchmarks/results/cpu_ops.{json,png}
    python benchmarks/cpu_ops.py --quick    # S up to 1024, for a smoke test

What is measured, per (form, mode, S), each in a fresh child process (so that one measurement's memory cannot
leak into the next and the peak is that of this call alone):
- time: wall clock of one call (forward under no_grad, or forward + backward of <h, g>): the minimum over up to
  5 repetitions (fewer when calls are long: repetitions stop after ~3 s), after a warm-up call at S = 128 and,
  when the call is short, one at full size. The minimum, not the mean, because the machine may be shared (the
  load average is recorded): other processes only ever add time. The median is stored too, and so is the
  process CPU time (time.process_time, minimum over the same calls), which the plot shows: with one thread (the
  default here) it is the compute time proper, which other processes on a shared machine do not inflate.
- memory: the increase of the process's peak resident set size (VmHWM) over the RSS just before the timed calls,
  with the inputs already allocated. PyTorch has no CPU allocator statistics and tracemalloc does not see its
  allocations, so we measure what the OS sees: the peak is reset through /proc/self/clear_refs when the kernel
  allows it (recorded as "vmhwm-reset"); otherwise the lifetime peak (ru_maxrss) is used ("ru_maxrss"), which can
  only overestimate by the import-time peak. glibc returns large blocks to the OS on free, so the peak is the
  real working set of the call, allocator slack included.

Skips: the parallel form where its peak memory, extrapolated quadratically from the previous length, would exceed
4 GiB; any form where its time, extrapolated (linearly, quadratically for the parallel form) from the previous
length, would exceed 30 s for one call; and whatever is left when the sweep has run 8 minutes (lengths go in
increasing order, so this cuts the longest ones).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FORMS = ("parallel", "chunkwise", "recurrent")
B, NH, DQK, DV = 1, 4, 64, 64
CHUNK = 64
MEM_LIMIT = 4 * 2 ** 30
TIME_LIMIT = 30.0
SWEEP_BUDGET = 8 * 60.0  # the whole sweep must stay under 10 minutes on a 2-core machine


# ----------------------------------------------------------------------------------------------------------
# child: one measurement
# ----------------------------------------------------------------------------------------------------------

def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(form: str, mode: str, S: int, threads: int) -> dict:
    import torch

    from fastxlstm.ops import mlstm

    torch.set_num_threads(threads)
    grad = mode == "fwd+bwd"

    def inputs(s):
        g = torch.Generator().manual_seed(s)
        q = torch.randn(B, NH, s, DQK, generator=g)
        k = torch.randn(B, NH, s, DQK, generator=g)
        v = torch.randn(B, NH, s, DV, generator=g)
        i = 2.0 * torch.randn(B, NH, s, generator=g)
        f = 2.0 * torch.randn(B, NH, s, generator=g) + 3.0
        gh = torch.randn(B, NH, s, DV, generator=g)
        return [t.requires_grad_(grad) for t in (q, k, v, i, f)], gh

    def call(args, gh):
        if grad:
            for t in args:
                t.grad = None
            h = mlstm(*args, backend=form, chunk_size=CHUNK, return_state=False)
            (h * gh).sum().backward()
        else:
            with torch.no_grad():
                mlstm(*args, backend=form, chunk_size=CHUNK, return_state=False)

    call(*inputs(128))  # code paths, thread pool, lazy imports
    args, gh = inputs(S)
    reset = _reset_peak()
    before = _rss_kb("VmRSS")
    def timed():
        w0, c0 = time.perf_counter(), time.process_time()
        call(args, gh)
        return time.perf_counter() - w0, time.process_time() - c0

    times = [timed()]
    if times[0][0] < 1.0:  # the first call was the full-size warm-up; time up to 5 more
        times = []
        while len(times) < 5 and sum(w for w, _ in times) < 3.0:
            times.append(timed())
    peak = _rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall = sorted(w for w, _ in times)
    cpu = sorted(c for _, c in times)
    return {"form": form, "mode": mode, "S": S, "time_s": wall[0], "time_median_s": wall[len(wall) // 2],
            "cpu_s": cpu[0], "reps": len(times),
            "peak_mem_mb": max(0, peak - before) / 1024.0, "mem_method": "vmhwm-reset" if reset else "ru_maxrss",
            "status": "ok"}


# ----------------------------------------------------------------------------------------------------------
# parent: the sweep
# ----------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_child(form, mode, S, threads, timeout):
    cmd = [sys.executable, __file__, "--child", json.dumps({"form": form, "mode": mode, "S": S,
                                                            "threads": threads})]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"form": form, "mode": mode, "S": S, "status": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        err = (out.stderr or "").strip().splitlines()
        return {"form": form, "mode": mode, "S": S, "status": "error: " + (err[-1] if err else str(out.returncode))}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(quick: bool):
    fwd_lengths = [256, 512, 1024] if quick else [256, 512, 1024, 2048, 4096, 8192, 16384]
    bwd_lengths = [256, 512] if quick else [256, 512, 1024, 2048]
    jobs = [(form, "fwd+bwd", S) for S in bwd_lengths for form in FORMS]
    jobs += [(form, "fwd", S) for S in fwd_lengths for form in FORMS]
    return jobs


def skip_reason(form, mode, S, done):
    """Extrapolate from the longest finished length of the same form and mode."""
    prev = [r for r in done if r["form"] == form and r["mode"] == mode and r.get("status") == "ok"]
    if not prev:
        if any(r["form"] == form and r["mode"] == mode for r in done):
            return "skipped: a shorter length already failed or was skipped"
        return None
    p = max(prev, key=lambda r: r["S"])
    ratio = S / p["S"]
    if form == "parallel" and p["peak_mem_mb"] * 2 ** 20 * ratio ** 2 > MEM_LIMIT:
        return f"skipped: predicted peak {p['peak_mem_mb'] * ratio ** 2 / 1024:.1f} GiB > 4 GiB"
    predicted = p["time_s"] * (ratio ** 2 if form == "parallel" else ratio)
    if predicted > TIME_LIMIT:
        return f"skipped: predicted {predicted:.0f} s per call > {TIME_LIMIT:.0f} s"
    return None


def table(results):
    lines = [f"{'form':<10} {'mode':<8} {'S':>6} {'wall (s)':>10} {'cpu (s)':>10} {'cpu ms/tok':>10} "
             f"{'peak MB':>9}  note"]
    for r in sorted(results, key=lambda r: (r["mode"], FORMS.index(r["form"]), r["S"])):
        if r["status"] == "ok":
            lines.append(f"{r['form']:<10} {r['mode']:<8} {r['S']:>6} {r['time_s']:>10.4f} {r['cpu_s']:>10.4f} "
                         f"{1e3 * r['cpu_s'] / r['S']:>10.4f} {r['peak_mem_mb']:>9.1f}  reps={r['reps']}")
        else:
            lines.append(f"{r['form']:<10} {r['mode']:<8} {r['S']:>6} {'-':>10} {'-':>10} {'-':>10} {'-':>9}  "
                         f"{r['status']}")
    return "\n".join(lines)


def plot(results, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"parallel": "tab:red", "chunkwise": "tab:blue", "recurrent": "tab:green"}
    for form in FORMS:
        for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
            rs = sorted((r for r in results if r["form"] == form and r["mode"] == mode and r["status"] == "ok"),
                        key=lambda r: r["S"])
            if not rs:
                continue
            S = [r["S"] for r in rs]
            ax_t.loglog(S, [r["cpu_s"] for r in rs], style, color=colors[form], label=f"{form} {mode}", base=2)
            if mode == "fwd":
                ax_m.loglog(S, [max(r["peak_mem_mb"], 0.1) for r in rs], style, color=colors[form], label=form,
                            base=2)
    for ax, ylabel in ((ax_t, "CPU time per call (s)"), (ax_m, "peak RSS increase, forward (MB)")):
        xs = [256, 16384]
        lo = ax.get_ylim()[0]
        ax.loglog(xs, [lo * 4, lo * 4 * 64], ":", color="gray", label="∝ S", base=2)
        ax.loglog(xs, [lo * 4, lo * 4 * 64 ** 2], "-.", color="gray", label="∝ S²", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mLSTM forms on CPU: B={B}, NH={NH}, DQK=DV={DQK}, float32, chunk {CHUNK}; "
                 f"{meta['cpu_model']}, threads={meta['torch_threads']}, torch {meta['torch_version']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="short sweep (S <= 1024) for a smoke test")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared machine, OpenMP threads that get "
                         "descheduled stall each other and make wall times meaningless)")
    ap.add_argument("--out", default=str(RESULTS / "cpu_ops"), help="output path without extension")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["form"], spec["mode"], spec["S"], spec["threads"])))
        return

    import torch
    from tqdm import tqdm

    threads = args.threads
    meta = {
        "what": "mLSTM forward (no_grad) and forward+backward time and peak memory vs S, PyTorch forms on CPU",
        "shape": {"B": B, "NH": NH, "DQK": DQK, "DV": DV, "dtype": "float32", "chunk_size": CHUNK},
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": threads,
        "torch_version": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "time": "time_s: minimum wall clock of one call over up to 5 repetitions after warm-up (time_median_s: "
                "median); cpu_s: minimum process CPU time of one call (what the plot shows: on a shared machine "
                "it is the stable measure, as other processes add wall time but not CPU time)",
        "memory": "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the call, inputs allocated; "
                  "fresh process per measurement",
        "limits": {"parallel_peak_bytes": MEM_LIMIT, "time_per_call_s": TIME_LIMIT, "sweep_s": SWEEP_BUDGET},
    }
    results = []
    t_start = time.time()
    jobs = plan(args.quick)
    bar = tqdm(jobs, desc="cpu_ops", unit="run")
    for form, mode, S in bar:
        bar.set_postfix_str(f"{form} {mode} S={S}")
        reason = skip_reason(form, mode, S, results)
        if reason is None and time.time() - t_start > SWEEP_BUDGET:
            reason = f"skipped: sweep time budget ({SWEEP_BUDGET:.0f} s) spent"
        if reason:
            results.append({"form": form, "mode": mode, "S": S, "status": reason})
            continue
        results.append(run_child(form, mode, S, threads, timeout=4 * TIME_LIMIT))
    meta["loadavg_end"] = os.getloadavg()
    meta["sweep_seconds"] = round(time.time() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    plot(results, meta, out.with_suffix(".png"))
    print(table(results))
    print(f"\n{meta['cpu_model']}, threads={threads}, torch {meta['torch_version']}, {meta['sweep_seconds']} s; "
          f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
