"""How a short CPU training run copes with a busy CPU: torch's defaults against the fastxlstm CLI's thread and
OpenMP wait-policy choice, each on an idle machine and with busy competitor processes (``yes > /dev/null``).

    python benchmarks/cpu_contention.py                  # tiny preset, 30 steps, 1 competitor
    python benchmarks/cpu_contention.py --steps 60 --busy 2 --repeats 2

Each configuration runs in a fresh process (the OpenMP policy is fixed when torch loads), the same training
(synthetic corpus, tiny preset, no sampling); wall seconds of the whole process are recorded. Writes
benchmarks/results/cpu_contention.json and a bar plot beside it. Numbers depend on the machine and on what else
runs on it: the point is the ratio busy / idle for each setting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

_API = ("from fastxlstm.train import TrainConfig, train; import sys, json; "
        "train(TrainConfig(**json.loads(sys.argv[1])))")


def _corpus(root: str) -> str:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "value", "item", "count", "total"]
    for i in range(8):
        with open(os.path.join(root, f"mod_{i}.py"), "w", encoding="utf-8") as f:
            f.write("".join(f"def {rng.choice(words)}_{j}({rng.choice(words)}):\n    return {j % 7}\n"
                            for j in range(400)))
    return root


def _run(kind: str, opts: dict, busy: int) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    if kind == "torch defaults":
        for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(k, None)
        cmd = [sys.executable, "-c", _API, json.dumps(opts)]
    else:
        cmd = [sys.executable, "-m", "fastxlstm", "train"]
        for k, v in opts.items():
            flag = "--" + k.replace("_", "-")
            cmd += [flag] if v is True else ([f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)])
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--busy", type=int, default=1, help="competitor processes in the busy case")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_contention.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "data"))
        data = _corpus(os.path.join(tmp, "data"))
        for rep in range(args.repeats):
            for kind in ("torch defaults", "fastxlstm CLI"):
                for busy in (0, args.busy):
                    opts = {"preset": "tiny", "data": data, "out": os.path.join(tmp, f"run{len(results)}"),
                            "steps": args.steps, "batch_size": args.batch_size, "seq_len": 128, "eval_windows": 8,
                            "eval_every": 0, "save_every": 0, "sample_tokens": 0, "progress": False}
                    s = _run(kind, opts, busy)
                    results.append({"setting": kind, "busy_processes": busy, "seconds": s, "repeat": rep})
                    print(f"{kind:15s} busy={busy}: {s:7.1f} s", flush=True)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import torch
    doc = {"benchmark": "cpu_contention", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "load_average_after": load, "torch": torch.__version__, "python": platform.python_version(),
           "steps": args.steps, "batch_size": args.batch_size, "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['setting']}\n{'busy' if r['busy_processes'] else 'idle'}" for r in results]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(results)), [r["seconds"] for r in results])
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("wall seconds (whole process)")
    ax.set_title(f"tiny preset, {args.steps} steps, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
