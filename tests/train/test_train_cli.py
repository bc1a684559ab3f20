"""End to end through the CLI entry function, in-process: train -> files -> generate -> eval; and CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastxlstm.cli import main
from train_helpers import fast_args, read_metrics, write_corpus


def test_train_generate_eval_end_to_end(tmp_path, capsys):
    data = write_corpus(tmp_path / "corpus")
    run = tmp_path / "runs" / "r1"
    rc = main(fast_args(data, str(run), steps=30, eval_every=15, save_every=10, sample_tokens=20,
                        batch_size=4, log_every=5))
    assert rc == 0
    for name in ("train_config.json", "metrics.jsonl", "loss.png", "sample.txt", "tokenizer_config.json",
                 "model/config.json", "model/model.safetensors", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs/latest points at the newest run
    latest = tmp_path / "runs" / "latest"
    assert latest.exists() and os.path.realpath(latest) == os.path.realpath(run)
    ck = sorted(os.listdir(run / "checkpoints"))
    assert ck == ["step_00000020", "step_00000030"]  # keep_checkpoints=2 pruned step 10
    recs = read_metrics(run)
    ev = [r for r in recs if r["split"] == "eval"]
    tr = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in ev] == [0, 15, 30]
    assert [r["step"] for r in tr] == [5, 10, 15, 20, 25, 30]
    # it learns: the synthetic corpus is very regular
    assert ev[-1]["bpb"] < ev[0]["bpb"] - 1.0, ev
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["bpb_end"] == pytest.approx(ev[-1]["bpb"])
    assert (run / "sample.txt").read_text(encoding="utf-8").startswith("def ")

    import fastxlstm
    model = fastxlstm.from_pretrained(str(run / "model"))
    assert model.vocab_size == 256

    capsys.readouterr()
    assert main(["generate", "--model", str(latest), "--prompt", "def alpha", "--max-new-tokens", "12",
                 "--seed", "3"]) == 0
    out1 = capsys.readouterr().out
    assert out1.startswith("def alpha") and len(out1.encode()) >= len("def alpha")
    # same seed, same text; the checkpoint folder gives the same model as the exported one
    assert main(["generate", "--model", str(run / "checkpoints" / "step_00000030"), "--prompt", "def alpha",
                 "--max-new-tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == out1
    # greedy decoding from stdin
    import io
    old = sys.stdin
    sys.stdin = io.StringIO("def ")
    try:
        assert main(["generate", "--model", str(run), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    finally:
        sys.stdin = old
    assert capsys.readouterr().out.startswith("def ")

    assert main(["eval", "--model", str(run), "--data", data, "--seq-len", "16", "--batch-size", "3",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bpb"] < 6 and r["perplexity"] == pytest.approx(2.718281828 ** r["loss"], rel=1e-6)
    assert r["tokens"] > 1000
    # without --data: the held-out split of the standard-library corpus
    assert main(["eval", "--model", str(run), "--max-tokens", "3000", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] <= 3000 and "standard-library" in r["data"]


def test_latest_pointer_file(tmp_path):
    """Where symlinks are not allowed, runs/latest is a text file naming the run; --model/--out follow it."""
    from fastxlstm.train.trainer import resolve_run_dir
    (tmp_path / "runs" / "r7").mkdir(parents=True)
    (tmp_path / "runs" / "latest").write_text("r7\n")
    assert resolve_run_dir(str(tmp_path / "runs" / "latest")) == str(tmp_path / "runs" / "r7")
    assert resolve_run_dir(str(tmp_path / "runs" / "r7")) == str(tmp_path / "runs" / "r7")


def test_eval_carries_state_like_one_long_call(tmp_path):
    """evaluate_stream with small chunks == one call over everything (state carried, resets honoured)."""
    from fastxlstm.data.corpus import TokenStream
    from fastxlstm.models.presets import build_model
    from fastxlstm.evaluation import evaluate_stream
    import numpy as np
    torch.manual_seed(0)
    model = build_model("tiny").double()
    docs = [np.random.default_rng(i).integers(0, 256, n) for i, n in enumerate((37, 5, 60))]
    stream = TokenStream.from_token_lists(docs, 256)
    tb = np.ones(256)
    a = evaluate_stream(model, stream, tb, seq_len=7, batch_size=1)
    b = evaluate_stream(model, stream, tb, seq_len=1000, batch_size=1)
    assert a["tokens"] == b["tokens"] == 102 - 1 - 2  # the 2 later document starts are not scored
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)


BAD = [
    (["train", "--bogus"], "unrecognized arguments"),
    (["train", "--steps", "x"], "invalid int value"),
    (["train", "--preset", "nope"], "does not exist"),
    (["train", "--data", "/nonexistent/path"], "no such file"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--precision", "fp8"], "invalid choice"),
    (["train", "--steps", "5", "--stop-at", "9"], "--stop-at"),
    (["train", "--model-config", "nonsense"], "KEY=VALUE"),
    (["frobnicate"], "invalid choice"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "no such directory"),
    (["generate", "--prompt", "x"], "required"),
    (["eval", "--model", "/nonexistent"], "no such directory"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_cli_errors_are_one_line_exit_2(argv, needle, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


def test_cli_errors_from_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cases without --out would otherwise start runs/ in the repository
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "blank.txt").write_text("   \n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 3\nno_such_field: 1\n")
    bad_toml = tmp_path / "c.toml"
    bad_toml.write_text("steps = [\n")
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    cases = [
        (["train", "--data", str(empty), "--preset", "tiny"], "no non-empty text files"),
        (["train", "--data", str(tmp_path / "blank.txt"), "--preset", "tiny"], "empty"),
        (["train", "--config", str(cfg)], "no_such_field"),
        (["train", "--config", str(bad_toml)], "cannot parse"),
        (["train", "--config", str(tmp_path / "missing.yaml")], "no such file"),
        (["train", "--preset", "tiny", "--data", write_corpus(tmp_path / "c"), "--seq-len", "100000",
          "--out", str(tmp_path / "o"), "--no-progress"], "--seq-len"),
        (["train", "--preset", "tiny", "--model-config", "embedding_dim=-3"], "embedding_dim"),
        (["train", "--preset", "tiny", "--model-config", "no_field=3", "--data", str(tmp_path / "c"),
          "--out", str(tmp_path / "o2")], "no_field"),
        (["generate", "--model", str(notrun), "--prompt", "x"], "not a model or run directory"),
        (["train", "--resume", "--out", str(notrun)], "no checkpoint"),
    ]
    for argv, needle in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("data:", "model:"))]
        assert rc == 2, (argv, err)
        assert len(lines) == 1 and needle in lines[0], (argv, err)
        assert "Traceback" not in err
    # none of the failed runs left a directory behind
    assert not (tmp_path / "runs").exists() or os.listdir(tmp_path / "runs") == []


def test_config_file_and_flag_precedence(tmp_path):
    from fastxlstm.cli import _train_config, build_parser
    y = tmp_path / "c.yaml"
    y.write_text("steps: 7\nbatch-size: 3\nlr: 0.002\nmodel:\n  embedding_dim: 32\n  slstm_at: [1]\n")
    t = tmp_path / "c.toml"
    t.write_text("steps = 9\nseq_len = 48\n[model]\nnum_blocks = 3\n")
    p = build_parser()
    cfg = _train_config(p.parse_args(["train", "--config", str(y), "--steps", "11",
                                      "--model-config", "num_heads=2"]))
    assert (cfg.steps, cfg.batch_size, cfg.lr) == (11, 3, 0.002)
    assert cfg.model == {"embedding_dim": 32, "slstm_at": [1], "num_heads": 2}
    cfg = _train_config(p.parse_args(["train", "--config", str(t), "--no-progress", "--compile"]))
    assert (cfg.steps, cfg.seq_len, cfg.model, cfg.progress, cfg.compile) == (9, 48, {"num_blocks": 3}, False, True)
    cfg = _train_config(p.parse_args(["train"]))
    assert cfg.preset == "small" and cfg.data is None and cfg.tokenizer == "bytes"


def test_python_dash_m_help_and_errors():
    """The real process: `python -m fastxlstm` help for every command, exit code 2 and no traceback on errors."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for cmd in (["--help"], ["train", "--help"], ["generate", "--help"], ["eval", "--help"]):
        r = subprocess.run([sys.executable, "-m", "fastxlstm", *cmd], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "fastxlstm", "train", "--preset", "huge"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_default_out_is_a_timestamped_run_with_latest(tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    args = [a for a in fast_args(data, "unused", steps=1)]
    i = args.index("--out")
    del args[i:i + 2]
    assert main(args) == 0
    assert main(args) == 0  # a second run in the same second gets its own directory
    runs = sorted(p for p in os.listdir(tmp_path / "runs") if p != "latest")
    assert len(runs) == 2
    newest = os.path.realpath(tmp_path / "runs" / "latest")
    assert os.path.basename(newest) in runs and os.path.isfile(os.path.join(newest, "model", "config.json"))
    capsys.readouterr()
    assert main(["generate", "--model", "runs/latest", "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def ")
