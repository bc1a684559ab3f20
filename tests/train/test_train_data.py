"""Corpora (stdlib, text file, directory, .bin, .npy), the deterministic split, packed windows with resets,
and the tokenizers (bytes, tokenizer.json, BPE training, incremental UTF-8-safe decoding)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fastxlstm.cli import main
from fastxlstm.data import (ByteTokenizer, CorpusError, HFTokenizer, TokenStream, WindowSampler, eval_windows,
                            load_corpus, make_batch, stdlib_documents, train_bpe)
from fastxlstm.data.corpus import _split_names, stable_fraction
from train_helpers import fast_args, write_corpus


# ---------------------------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------------------------

def test_stable_split_is_fixed_and_stdlib_is_sorted():
    # the hash is sha256-based: the same on every machine and Python version
    assert stable_fraction("os.py") == int.from_bytes(__import__("hashlib").sha256(b"os.py").digest()[:8],
                                                      "big") / 2 ** 64
    docs = stdlib_documents()
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(names) > 100 and "os.py" in names
    assert not any("site-packages" in n for n in names)
    tr, ev = _split_names(names, 0.05)
    assert tr and ev and not set(tr) & set(ev) and len(tr) + len(ev) == len(names)
    assert 0.02 < len(ev) / len(names) < 0.09
    assert _split_names(names, 0.05) == (tr, ev)


def test_text_file_corpus(tmp_path):
    text = "".join(f"line {i} ✓\n" for i in range(200))
    p = tmp_path / "a.txt"
    p.write_text(text, encoding="utf-8")
    c = load_corpus(str(p), ByteTokenizer())
    joined = bytes(np.concatenate([c.train.tokens, c.eval.tokens]).tolist()).decode("utf-8")
    assert joined == text
    assert c.train.n_docs == 1 and c.eval.n_docs == 1
    assert bytes(c.eval.tokens.tolist()).decode().startswith("line ")  # split at a line boundary
    assert 0 < len(c.eval) < len(c.train)


def test_directory_corpus(tmp_path):
    d = write_corpus(tmp_path / "c", n_files=8)
    (tmp_path / "c" / "blob.bin").write_bytes(b"\x00\x01binary")   # skipped: binary suffix
    (tmp_path / "c" / "weird.dat").write_bytes(b"\x00\x00\x00")     # skipped: NUL bytes
    c = load_corpus(d, ByteTokenizer())
    assert c.train.n_docs + c.eval.n_docs == 8 and c.eval.n_docs >= 1
    assert int(c.train.doc_start.sum()) == c.train.n_docs and c.train.doc_start[0]
    again = load_corpus(d, ByteTokenizer())
    assert np.array_equal(again.eval.tokens, c.eval.tokens)


def test_empty_and_missing_corpora(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(CorpusError, match="no non-empty text files"):
        load_corpus(str(tmp_path / "e"), ByteTokenizer())
    (tmp_path / "z.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(tmp_path / "z.txt"), ByteTokenizer())
    with pytest.raises(CorpusError, match="no such"):
        load_corpus(str(tmp_path / "nope.bin"), ByteTokenizer())


def test_bin_and_npy_memmaps(tmp_path):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 255, 3000).astype(np.uint16)
    toks[[100, 1500, 2000]] = 255  # EOD
    toks.tofile(tmp_path / "t.bin")
    c = load_corpus(str(tmp_path / "t.bin"), ByteTokenizer(), dtype="uint16", eod_token=255)
    assert np.array_equal(np.concatenate([c.train.tokens, c.eval.tokens]), toks)
    starts = np.flatnonzero(np.concatenate([c.train.doc_start, c.eval.doc_start]))
    cut = len(c.train)
    assert set(starts) == {0, 101, 1501, 2001, cut}  # the held-out part starts fresh
    np.save(tmp_path / "t.npy", toks.astype(np.int32))
    c2 = load_corpus(str(tmp_path / "t.npy"), ByteTokenizer())
    assert np.array_equal(np.asarray(c2.train.tokens), toks[:cut]) and c2.train.n_docs == 1
    big = np.full(10, 999, dtype=np.uint16)
    big.tofile(tmp_path / "big.bin")
    with pytest.raises(CorpusError, match="outside the vocabulary"):
        load_corpus(str(tmp_path / "big.bin"), ByteTokenizer())


@pytest.mark.parametrize("fmt", ["txt", "dir", "bin", "npy"])
def test_training_runs_on_each_format(tmp_path, fmt):
    d = write_corpus(tmp_path / "c", n_files=4)
    if fmt == "txt":
        data = os.path.join(d, "mod_00.py")
    elif fmt == "dir":
        data = d
    else:
        raw = b"".join(open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)))
        arr = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
        data = str(tmp_path / f"t.{fmt}")
        arr.tofile(data) if fmt == "bin" else np.save(data, arr)
    run = str(tmp_path / "run")
    extra = {"tensorboard": True} if fmt == "txt" else {}
    assert main(fast_args(data, run, steps=2, **extra)) == 0
    assert os.path.isfile(os.path.join(run, "model", "model.safetensors"))
    if extra:
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tensorboard")))


# ---------------------------------------------------------------------------------------------------------
# packed windows
# ---------------------------------------------------------------------------------------------------------

def test_windows_resets_and_masks():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    s = TokenStream.from_token_lists(docs, 256)
    b = make_batch(s, np.array([0, 2]), 4)
    assert b.input_ids.tolist() == [[1, 2, 3, 4], [3, 4, 5, 6]]
    assert b.targets.tolist() == [[2, 3, 4, 5], [4, 5, 6, 7]]
    assert b.resets.tolist() == [[True, False, False, True], [False, True, False, True]]
    # a target that opens a new document cannot be predicted: masked
    assert b.mask.tolist() == [[True, True, False, True], [False, True, False, True]]


def test_global_batch_is_independent_of_world_size():
    s = TokenStream.from_token_lists([list(np.arange(1000) % 250)], 256)
    one = WindowSampler(s, 16, micro_batch=4, grad_accum=2, world_size=1, rank=0, seed=3)
    got_one = [set(mb.input_ids[:, 0].tolist()) for mb in one.step_batches(8)[0]]
    ranks = [WindowSampler(s, 16, micro_batch=2, grad_accum=2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    assert one.global_batch == ranks[0].global_batch == 8
    w1 = one.window_ids(8, 8)
    w2 = np.concatenate([r.window_ids(8, 8) for r in ranks[:1]])
    assert np.array_equal(w1, w2)
    n1 = one.step_batches(8)[1]
    parts = [r.step_batches(8) for r in ranks]
    assert all(p[1] == n1 for p in parts)  # every rank knows the global count of scored targets
    rows_one = torch.cat([mb.input_ids for mb in one.step_batches(8)[0]])
    rows_two = torch.cat([mb.input_ids for p in parts for mb in p[0]])
    assert sorted(map(tuple, rows_one.tolist())) == sorted(map(tuple, rows_two.tolist()))
    # the order wraps into a new permutation after an epoch, deterministically
    n = one.n_windows
    ids = one.window_ids(n - 3, 6)
    assert len(set(ids[:3])) == 3 and np.array_equal(ids, one.window_ids(n - 3, 6))
    assert sorted(np.concatenate([one.window_ids(0, n)])) == list(range(n))


def test_eval_windows_cover_the_stream():
    s = TokenStream.from_token_lists([list(range(200))], 256)
    st = eval_windows(s, 10, 5)
    assert st[0] == 0 and st[-1] == 200 - 11 and len(st) == 5
    with pytest.raises(CorpusError):
        eval_windows(s, 500, 5)


# ---------------------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------------------

TEXT = "def f(x):\n    return 'héllo ✓ 𝄞' + x  # ünïcode\n"


def test_byte_stream_decoder_holds_partial_characters():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert tok.decode(ids) == TEXT and tok.token_bytes().sum() == 256


def test_bpe_training_and_tokenizer_json(tmp_path):
    texts = [TEXT * 20, "class A:\n    pass\n" * 30]
    tok = train_bpe(texts, 300)
    assert tok.vocab_size == 300
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())
    tb = tok.token_bytes()
    assert int(tb[ids].sum()) == len(TEXT.encode("utf-8"))  # exact bytes per token (byte-level BPE)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == TEXT and all("\ufffd" not in p for p in pieces)
    tok.save(str(tmp_path))
    again = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.encode(TEXT) == ids
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        HFTokenizer.from_file(str(tmp_path / "bad.json"))


def test_train_tokenizer_then_reuse_it(tmp_path, capsys):
    d = write_corpus(tmp_path / "c")
    run = str(tmp_path / "bpe")
    assert main(fast_args(d, run, steps=2, train_tokenizer=320, sample_tokens=8)) == 0
    assert os.path.isfile(os.path.join(run, "tokenizer.json"))
    assert os.path.isfile(os.path.join(run, "model", "tokenizer.json"))
    cfg = json.load(open(os.path.join(run, "model", "config.json")))
    assert cfg["vocab_size"] == 320
    capsys.readouterr()
    assert main(["generate", "--model", run, "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["eval", "--model", run, "--data", d, "--seq-len", "16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bytes"] > r["tokens"]  # several bytes per BPE token
    # --tokenizer FILE: a new run with that tokenizer.json
    run2 = str(tmp_path / "reuse")
    assert main(fast_args(d, run2, steps=1, tokenizer=os.path.join(run, "tokenizer.json"))) == 0
    assert json.load(open(os.path.join(run2, "model", "config.json")))["vocab_size"] == 320
