"""The inference commands do not import training code (fastxlstm.train)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import SRC, make_model_dir

_PROBE = r"""
import json, sys
from fastxlstm.cli import main
rc = main(sys.argv[1:])
import os, torch
print(json.dumps({"rc": rc, "train": sorted(m for m in sys.modules if m.startswith("fastxlstm.train")),
                  "threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY")}))
"""


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_inference_commands_do_not_import_training(tmp_path, command):
    model = make_model_dir(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    args = {"generate": ["generate", "--model", model, "--prompt", "def ", "--max-new-tokens", "3", "--threads", "1"],
            "eval": ["eval", "--model", model, "--data", str(text), "--seq-len", "16", "--all", "--threads",
                     "1"]}[command]
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("OMP_WAIT_POLICY", None)
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0 and res["train"] == [], res
    # --threads, and the OpenMP wait policy set before torch started its threads
    assert res["threads"] == 1 and res["wait"] == "PASSIVE", res


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    from fastxlstm import runtime
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    # the busy cores measured now (/proc/stat) come first
    for busy, want in ((0.05, 4), (1.02, 3), (2.7, 1), (7.9, 1)):
        monkeypatch.setattr(runtime, "_busy_cores_now", lambda busy=busy: busy)
        assert runtime.auto_threads() == want
    # where /proc/stat cannot be read: the 1-minute load average
    monkeypatch.setattr(runtime, "_busy_cores_now", lambda: None)
    for load, want in ((0.0, 4), (1.2, 3), (2.6, 1), (40.0, 1)):
        monkeypatch.setattr(runtime.os, "getloadavg", lambda load=load: (load, load, load))
        assert runtime.auto_threads() == want


def test_busy_cores_now_reads_the_machine():
    from fastxlstm import runtime
    busy = runtime._busy_cores_now(0.05)
    assert busy is None or 0.0 <= busy <= (runtime.os.cpu_count() or 1) + 1e-6
