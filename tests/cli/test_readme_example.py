"""The README's text-in, text-out Python example runs as written (on a tiny saved run)."""
from __future__ import annotations

import os
import re

from cli_helpers import make_model_dir

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")


def _example() -> str:
    text = open(README, encoding="utf-8").read()
    m = re.search(r"Text in, text out from Python.*?```python\n(.*?)```", text, re.S)
    assert m, "the README lost its text-in, text-out example"
    return m.group(1)


def test_readme_text_example_runs(tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "runs" / "r1")
    make_model_dir(tmp_path / "runs" / "r1" / "model")
    os.symlink("r1", tmp_path / "runs" / "latest")
    monkeypatch.chdir(tmp_path)
    code = _example()
    assert "tokenizer.encode" in code and "generate" in code and "decode" in code
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("def fib(n):") and len(out.encode("utf-8")) > len("def fib(n):") + 30
