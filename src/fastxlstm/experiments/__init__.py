"""The paper's claims as experiments, each runnable with one command (docs/REPRODUCTIONS.md):

    fastxlstm repro parity [--quick]     # state tracking: sLSTM solves parity, mLSTM-only and Llama do not
    fastxlstm repro mqar [--quick]       # multi-query associative recall (Zoology setting)
    fastxlstm repro lm [--quick]         # language modelling at equal parameters and tokens against a Llama

(also ``python -m fastxlstm.experiments.parity`` etc.). Each writes a run directory: config.json, metrics.jsonl,
results.json, a plot and results.md (a markdown table). This package imports nothing heavy at import time; the
Llama baseline needs transformers (``pip install "fastxlstm[hf]"``).
"""
from __future__ import annotations

TASKS = ("parity", "mqar", "lm")

__all__ = ["TASKS"]
