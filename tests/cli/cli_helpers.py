"""Shared bits of the CLI tests: a tiny saved model (no training needed) and running the real command."""
from __future__ import annotations

import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def make_model_dir(path, preset: str = "tiny", seed: int = 0) -> str:
    """A byte-level tiny model saved with save_pretrained + its tokenizer_config.json, in a second."""
    import torch
    from fastxlstm.data.tokenizers import ByteTokenizer
    from fastxlstm.models.presets import build_model
    torch.manual_seed(seed)
    model = build_model(preset, vocab_size=256)
    model.save_pretrained(str(path))
    ByteTokenizer().save(str(path))
    return str(path)


def run_cli(args, input=None, cwd=None, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m fastxlstm ARGS`` in a child process, this worktree's sources first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastxlstm", *args], input=input, capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)
