"""The run directory of ``fastxlstm train`` and what is written into it besides checkpoints: its name and the
``latest`` pointer, metrics.jsonl (+ TensorBoard), the loss plot and the exported final model.

Reading a run back (``latest``, the final model or newest checkpoint) is in :mod:`fastxlstm.loading`, which
inference commands use without importing training.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, Optional

import torch

from ..loading import resolve_run_dir

__all__ = ["DEFAULT_RUNS_ROOT", "choose_run_dir", "update_latest", "jsonl_records", "MetricsLog", "plot_metrics",
           "export_final", "remove_if_empty", "resolve_run_dir"]

DEFAULT_RUNS_ROOT = "runs"


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime())


def choose_run_dir(out: Optional[str], resume: bool) -> str:
    """``--out`` (a ``latest`` pointer followed), or runs/latest to resume, or a fresh runs/<timestamp>."""
    if out is None:
        if resume:
            out = os.path.join(DEFAULT_RUNS_ROOT, "latest")
        else:
            base = out = os.path.join(DEFAULT_RUNS_ROOT, _timestamp())
            k = 1
            while os.path.exists(out):  # two runs started in the same second get their own directories
                k += 1
                out = f"{base}-{k}"
    return resolve_run_dir(out)


def update_latest(run_dir: str) -> None:
    """<parent>/latest -> run_dir: a relative symlink, or a pointer file where symlinks are not allowed."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    link = os.path.join(parent, "latest")
    name = os.path.basename(os.path.abspath(run_dir))
    if name == "latest" or (os.path.exists(link) and os.path.isdir(link) and not os.path.islink(link)):
        return  # never replace a real directory called latest
    tmp = os.path.join(parent, f".latest.tmp{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(name, tmp)
    except OSError:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
    os.replace(tmp, link)


def remove_if_empty(run_dir: str) -> None:
    """Remove a run directory that holds nothing of value (no checkpoint, no model): what a run that failed
    during its setup leaves. Only the files the trainer writes at the start may be there."""
    if not os.path.isdir(run_dir) or os.path.islink(run_dir):
        return
    startup = {"train_config.json", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl"}
    names = set(os.listdir(run_dir))
    if names - startup:
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def jsonl_records(path: str):
    """(line, record) for every line of a JSON-lines file that parses (a line cut short by a crash is skipped)."""
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


class MetricsLog:
    """metrics.jsonl (rank 0), plus TensorBoard scalars when asked."""

    def __init__(self, path: str, resume_step: Optional[int], tensorboard_dir: Optional[str]):
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            # drop lines written after the checkpoint we resume from, so the curve has no duplicate steps
            keep = [line if line.endswith("\n") else line + "\n"
                    for line, rec in jsonl_records(path) if rec.get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)
        self.f = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard not installed
                self.f.close()
                raise ValueError(f"--tensorboard needs the tensorboard package ({e})") from None
            self.tb = SummaryWriter(tensorboard_dir)

    def write(self, rec: Dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"{rec['split']}/{k}", v, rec["step"])

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """Training and held-out bits per byte against steps, as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    tr, ev = [], []
    for _, r in jsonl_records(metrics_path):
        (tr if r.get("split") == "train" else ev if r.get("split") == "eval" else []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot([r["step"] for r in tr], [r["bpb"] for r in tr], label="train", lw=1.2)
    if ev:
        ax.plot([r["step"] for r in ev], [r["bpb"] for r in ev], "o-", label="held-out", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("fastxlstm train")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def export_final(out: str, model_cfg, model_sd: Dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors of the final model (the from_pretrained layout), built from the gathered
    full state dict so that FSDP runs export the same way."""
    from ..models.presets import build_model
    with torch.device("meta"):
        m = build_model(model_cfg)
    m.load_state_dict(model_sd, assign=True, strict=True)
    m.save_pretrained(out)


def write_summary(out: str, summary: Dict[str, Any]) -> None:
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in summary.items() if k != "sample"}, f, indent=2)
