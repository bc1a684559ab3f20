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
print(json.dumps({"rc": rc, "train": sorted(m for m in sys.modules if m.startswith("fastxlstm.train"))}))
"""


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_inference_commands_do_not_import_training(tmp_path, command):
    model = make_model_dir(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    args = {"generate": ["generate", "--model", model, "--prompt", "def ", "--max-new-tokens", "3"],
            "eval": ["eval", "--model", model, "--data", str(text), "--seq-len", "16"]}[command]
    env = dict(os.environ, PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0 and res["train"] == [], res
