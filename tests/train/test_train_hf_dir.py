"""`fastxlstm generate` and `eval` on a transformers xLSTMForCausalLM directory with its tokenizer.json."""
from __future__ import annotations

import json

import pytest
import torch

from oracles import require_oracle  # noqa: E402

transformers = require_oracle("transformers")

from fastxlstm.cli import main  # noqa: E402
from fastxlstm.data import train_bpe  # noqa: E402
from train_helpers import write_corpus  # noqa: E402


def test_generate_and_eval_on_a_transformers_directory(tmp_path, capsys):
    from transformers import xLSTMForCausalLM
    from fastxlstm.interop.transformers import to_transformers_config
    from fastxlstm.models.io import from_pretrained
    from fastxlstm.models.xlstm_large import XLSTMLargeConfig

    corpus = write_corpus(tmp_path / "c", n_files=3)
    texts = [open(f"{corpus}/mod_0{i}.py", encoding="utf-8").read() for i in range(3)]
    tok = train_bpe(texts, 300)
    cfg = XLSTMLargeConfig(vocab_size=300, hidden_size=128, num_hidden_layers=1, num_heads=2, chunk_size=16,
                           pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    hf = xLSTMForCausalLM(to_transformers_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the default init zeroes the gates: make the model say something
    d = tmp_path / "hf"
    hf.save_pretrained(str(d))
    tok.save(str(d))

    prompt = "def alpha"
    capsys.readouterr()
    assert main(["generate", "--model", str(d), "--prompt", prompt, "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    ours = from_pretrained(str(d))
    ids = torch.tensor([tok.encode(prompt)])
    expect = tok.decode(ours.generate(ids, 10, temperature=0)[0].tolist())
    assert out == expect + "\n"
    assert main(["eval", "--model", str(d), "--data", corpus, "--seq-len", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] > 100 and r["bytes"] > r["tokens"] and r["bpb"] > 0
