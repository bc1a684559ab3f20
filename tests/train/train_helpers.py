"""Shared bits of the training tests: a tiny synthetic corpus and fast CLI arguments."""
from __future__ import annotations

import json
import os
import random


def write_corpus(root, n_files: int = 6, seed: int = 0) -> str:
    """A directory of small, learnable Python-like text files (several documents, a held-out one by hash)."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "value", "item", "count", "total"]
    for i in range(n_files):
        lines = []
        for j in range(60):
            a, b = rng.choice(words), rng.choice(words)
            lines.append(f"def {a}_{j}({b}):\n    return {b} + {j % 7}\n")
        with open(os.path.join(root, f"mod_{i:02d}.py"), "w", encoding="utf-8") as f:
            f.write("".join(lines) + "# é ✓ done\n")
    return str(root)


def fast_args(data: str, out: str, steps: int = 4, **extra) -> list:
    """CLI arguments for a few-second tiny-preset run."""
    args = ["train", "--preset", "tiny", "--data", data, "--out", out, "--steps", str(steps),
            "--batch-size", "2", "--seq-len", "32", "--eval-windows", "4", "--eval-every", "0",
            "--log-every", "1", "--sample-tokens", "0", "--no-progress", "--warmup-steps", "2", "--lr", "0.01"]
    for k, v in extra.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        else:
            args += [flag, str(v)]
    return args


def read_metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
