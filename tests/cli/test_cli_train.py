"""fastxlstm train as a user runs it: resume keeps the run's settings, exit codes, no empty run directories,
fine-tuning from a model (--init-from)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
from train_helpers import read_metrics, write_corpus  # noqa: E402

from fastxlstm.cli import main  # noqa: E402
from fastxlstm.train.config import PER_INVOCATION  # noqa: E402

# non-default options everywhere: a resume that fell back to a default would show
RUN_ARGS = ["--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "4",
            "--eval-every", "0", "--log-every", "1", "--sample-tokens", "0", "--warmup-steps", "2", "--lr", "0.01",
            "--save-every", "0", "--seed", "3", "--model-config", "num_blocks=1", "--model-config", "slstm_at=[]",
            "--no-progress"]


def _cfg(run):
    with open(os.path.join(run, "train_config.json"), encoding="utf-8") as f:
        return json.load(f)


def _same_run(a, b, ignore=()):
    return {k: v for k, v in a.items() if k not in PER_INVOCATION and k not in ignore} == \
        {k: v for k, v in b.items() if k not in PER_INVOCATION and k not in ignore}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_resume_restores_every_setting(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--data", corpus, "--out", run, "--stop-at", "2", *RUN_ARGS]) == 3  # --stop-at: 3
    started = _cfg(run)
    assert started["preset"] == "tiny" and started["data"] == corpus
    assert started["model"] == {"num_blocks": 1, "slstm_at": []}
    capsys.readouterr()
    # exactly the hint the tool prints: only --out and --resume
    assert main(["train", "--out", run, "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "standard library" not in err and f"directory {corpus}" in err
    assert _same_run(_cfg(run), started)  # train_config.json was not overwritten with defaults
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4]
    with open(os.path.join(run, "model", "config.json"), encoding="utf-8") as f:
        assert json.load(f)["num_blocks"] == 1

    # a safe change (more steps, another log interval) is taken, and said
    assert main(["train", "--out", run, "--resume", "--steps", "6", "--log-every", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--steps: 6 (the run had 4)" in err and "--log-every: 2 (the run had 1)" in err
    assert _cfg(run)["steps"] == 6 and _cfg(run)["log_every"] == 2
    assert _same_run(_cfg(run), started, ignore=("steps", "log_every"))
    # giving the same value again is no change
    assert main(["train", "--out", run, "--resume", "--steps", "7", "--preset", "tiny", "--data", corpus,
                 "--no-progress"]) == 0
    assert "preset" not in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,needle", [
    ("--data", None, "--data"), ("--preset", "small", "--preset"), ("--seq-len", "16", "--seq-len"),
    ("--model-config", "num_blocks=2", "model config overrides"), ("--tokenizer", None, "--tokenizer")])
def test_resume_refuses_a_change_of_data_model_or_tokenizer(corpus, tmp_path, capsys, flag, value, needle):
    run = str(tmp_path / "run")
    assert main(["train", "--data", corpus, "--out", run, "--stop-at", "1", *RUN_ARGS]) == 3
    before = _cfg(run)
    if value is None:
        other = tmp_path / ("other.txt" if flag == "--data" else "tok.json")
        if flag == "--data":
            other.write_text("x = 1\n" * 200)
        else:
            from fastxlstm.data.tokenizers import train_bpe
            train_bpe(["def f(x): return x\n" * 50], 300).save(str(tmp_path))
            other = tmp_path / "tokenizer.json"
        value = str(other)
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume", flag, value, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume: this run was started with" in err and needle in err and "Traceback" not in err
    assert _cfg(run) == before


def test_failed_run_leaves_no_empty_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "tiny.txt"
    bad.write_text("ab\n")  # too short for --seq-len 32
    rc = main(["train", "--preset", "tiny", "--data", str(bad), "--seq-len", "32", "--steps", "2", "--no-progress",
               "--sample-tokens", "0"])
    assert rc == 2 and "error:" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs") or os.listdir(tmp_path / "runs") == []


def test_ctrl_c_exit_code_130(corpus, tmp_path):
    """A real SIGINT to a real child process: checkpoint, then exit code 130."""
    import signal
    import subprocess
    import time
    from cli_helpers import SRC
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    args = ["train", "--data", corpus, "--out", str(run), *RUN_ARGS[:2], "--steps", "100000", *RUN_ARGS[4:]]
    p = subprocess.Popen([sys.executable, "-m", "fastxlstm", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait for the first training steps
            if os.path.isfile(run / "metrics.jsonl") and (run / "metrics.jsonl").read_text().count('"train"') >= 2:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "Continue with: fastxlstm train --out" in err and os.path.isdir(run / "checkpoints")
