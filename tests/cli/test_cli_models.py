"""Models in and out: eval on the held-out split, convert both ways, fine-tune with --init-from, from_pretrained
on run directories, JSON-lines data, and the small things (presets, YAML errors, dir(fastxlstm))."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
from train_helpers import fast_args, write_corpus  # noqa: E402

import fastxlstm  # noqa: E402
from cli_helpers import make_model_dir, run_cli  # noqa: E402
from fastxlstm.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m") / "model")


def _eval(capsys, *args):
    assert main(["eval", *args, "--json", "--seq-len", "16"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_uses_the_training_split(corpus, model_dir, capsys):
    from fastxlstm.data.corpus import load_corpus
    from fastxlstm.data.tokenizers import ByteTokenizer
    held_out = load_corpus(corpus, ByteTokenizer()).eval
    r = _eval(capsys, "--model", model_dir, "--data", corpus, "--max-tokens", "0")
    assert r["data"].startswith("held-out split of") and r["tokens"] == len(held_out) - held_out.n_docs
    everything = _eval(capsys, "--model", model_dir, "--data", corpus, "--all", "--max-tokens", "0")
    assert "all of it" in everything["data"] and everything["tokens"] > 5 * r["tokens"]


def test_convert_both_ways(tmp_path, model_dir, capsys):
    from transformers import xLSTMForCausalLM
    from fastxlstm.models.xlstm_large import XLSTMLargeConfig
    torch.manual_seed(0)
    cfg = XLSTMLargeConfig(vocab_size=256, hidden_size=128, num_hidden_layers=1, num_heads=2, chunk_size=16,
                           pad_token_id=None, bos_token_id=None, eos_token_id=None)
    ours = fastxlstm.build_model(cfg)
    ours.save_pretrained(tmp_path / "large")
    from fastxlstm.data.tokenizers import ByteTokenizer
    ByteTokenizer().save(str(tmp_path / "large"))
    assert main(["convert", str(tmp_path / "large"), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    hf = xLSTMForCausalLM.from_pretrained(tmp_path / "hf", autocast_kernel_dtype="float32").eval()
    ref = ours.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert os.path.isfile(tmp_path / "hf" / "tokenizer_config.json")
    # fine-tune the transformers directory directly (its tokenizer comes along)
    data = tmp_path / "d.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 100)
    run = tmp_path / "ft"
    assert main(["train", "--init-from", str(tmp_path / "hf"), "--data", str(data), "--out", str(run), "--steps",
                 "1", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2", "--sample-tokens", "0",
                 "--no-progress"]) == 0
    assert type(fastxlstm.from_pretrained(run)).__name__ == "XLSTMLarge"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "fastxlstm"]) == 0
    back = fastxlstm.from_pretrained(tmp_path / "back")
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    # the paper model has no transformers counterpart: one clear line
    capsys.readouterr()
    assert main(["convert", model_dir, str(tmp_path / "no"), "--to", "transformers"]) == 2
    assert "transformers has only the 7B architecture" in capsys.readouterr().err
    assert main(["convert", model_dir, str(tmp_path / "hf"), "--to", "fastxlstm"]) == 2  # not empty


def test_init_from_fine_tunes_with_the_models_tokenizer(corpus, tmp_path, model_dir, capsys):
    from fastxlstm.data.tokenizers import train_bpe
    src = tmp_path / "src"
    torch.manual_seed(1)
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 40], 300)
    model = fastxlstm.build_model("tiny", vocab_size=300)
    model.save_pretrained(src)
    tok.save(str(src))
    run = str(tmp_path / "ft")
    args = [a for a in fast_args(corpus, run, steps=2) if a not in ("--preset", "tiny")]
    assert main([*args, "--init-from", str(src)]) == 0
    err = capsys.readouterr().err
    assert f"from {src}" in err
    assert os.path.isfile(os.path.join(run, "tokenizer.json"))  # the model's BPE, not bytes
    tuned = fastxlstm.from_pretrained(run)  # a run directory: its final model
    assert tuned.vocab_size == 300
    start = model.state_dict()
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, start[k])]
    assert changed and len(changed) < len(start) + 1
    # a step-0 evaluation equals the source model's loss on the held-out split: the weights were loaded
    with open(os.path.join(run, "metrics.jsonl")) as f:
        first_eval = next(json.loads(line) for line in f if '"eval"' in line)
    from fastxlstm.data.corpus import load_corpus
    from fastxlstm.data.loader import eval_windows
    from fastxlstm.evaluation import evaluate_windows
    from fastxlstm.loading import load_tokenizer_for
    ev = load_corpus(corpus, load_tokenizer_for(src)).eval
    starts = eval_windows(ev, 32, 4)
    r = evaluate_windows(model, ev, starts, 32, torch.from_numpy(load_tokenizer_for(src).token_bytes()).double(), 2,
                         torch.device("cpu"))
    assert r["loss"] == pytest.approx(first_eval["loss"], rel=1e-6)
    # --init-from brings the architecture: --preset is refused
    assert main([*args[:-2], "--out", str(tmp_path / "ft2"), "--init-from", str(src), "--preset", "tiny"]) == 2
    assert "--init-from takes the architecture" in capsys.readouterr().err


def test_from_pretrained_on_run_directories(corpus, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "r1"
    assert main(fast_args(corpus, str(run), steps=3, stop_at=1)) == 3  # only a checkpoint so far
    assert os.path.realpath(runs / "latest") == str(run)  # a parent named runs/ gets the latest pointer
    from_ckpt = fastxlstm.from_pretrained(runs / "latest")  # follows latest, takes the newest checkpoint
    assert main(fast_args(corpus, str(run), steps=3, resume=True)) == 0
    final = fastxlstm.from_pretrained(run)
    same_dir = fastxlstm.from_pretrained(run / "model")
    assert all(torch.equal(v, same_dir.state_dict()[k]) for k, v in final.state_dict().items())
    assert not all(torch.equal(v, final.state_dict()[k]) for k, v in from_ckpt.state_dict().items())
    assert type(fastxlstm.load_tokenizer(run)).__name__ == "ByteTokenizer"
    with pytest.raises(ValueError, match="config.json"):  # the model loader's CheckpointError, as before
        fastxlstm.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        fastxlstm.from_pretrained(tmp_path / "missing")


def test_jsonl_data(tmp_path, capsys):
    docs = [{"text": f"def f_{i}(x):\n    return x * {i}\n" * 30, "id": i} for i in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    from fastxlstm.data.corpus import load_text_documents
    tr, ev, desc = load_text_documents(str(path))
    assert len(tr) + len(ev) == 12 and ev and sorted(tr + ev) == sorted(d["text"] for d in docs)
    assert main(fast_args(str(path), str(tmp_path / "run"), steps=2)) == 0
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    capsys.readouterr()
    assert main(fast_args(str(tmp_path / "bad.jsonl"), str(tmp_path / "run2"), steps=2)) == 2
    assert 'line 2 has no string field "text"' in capsys.readouterr().err


def test_presets_yaml_and_dir(tmp_path, capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "slstm_positions" not in out and "sLSTM at [4, 12, 20, 28, 36, 44, 52, 60]" in out
    bad = tmp_path / "c.yaml"
    bad.write_text("steps: 10\npreset: [tiny\nlr: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "line 3, column 3" in capsys.readouterr().err
    names = dir(fastxlstm)
    assert {"from_pretrained", "load_tokenizer", "XLSTMLM", "build_model", "ops"} <= set(names)
    assert "annotations" not in names
    r = run_cli(["presets"])
    assert r.returncode == 0 and "tiny" in r.stdout
