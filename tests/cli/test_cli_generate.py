"""Generation controls: stop sequences, eos, repetition penalty, prompts files, chat on a carried state."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import make_model_dir, run_cli
from fastxlstm.cli import main
from fastxlstm.generation.sampling import apply_repetition_penalty, sample_next_token
from fastxlstm.generation.text import ChatSession, StopMatcher, generate_texts, sample_text
from fastxlstm.loading import load_model_and_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def model_tok(model_dir):
    return load_model_and_tokenizer(model_dir)


def _gen(capsys, *args):
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_stop_matcher_across_pieces():
    m = StopMatcher(["STOP", "\nUser:"])
    out = "".join(m.push(p) for p in ["ab", "cS", "T", "Ox", "yz"])  # "ST" "O" held back, then released
    assert out == "abcSTOxyz" and not m.stopped
    m = StopMatcher(["STOP"])
    out = "".join(m.push(p) for p in ["ab", "cS", "TO", "Pq", "rest"])
    assert out == "abc" and m.stopped and m.flush() == ""
    m = StopMatcher(["\nUser:"])
    assert m.push("hi\nUs") == "hi" and m.flush() == "\nUs"


def test_stop_and_eos_in_the_cli(model_dir, model_tok, capsys):
    model, tok = model_tok
    args = ["--model", model_dir, "--prompt", "def f", "--max-new-tokens", "40", "--temperature", "0"]
    full = _gen(capsys, *args)[:-1]
    assert full.startswith("def f") and len(full) > 10
    cont = full[len("def f"):]
    stop = cont[6:8]
    cut = cont.find(stop)
    assert _gen(capsys, *args, "--stop", "zzz-never", "--stop", stop)[:-1] == "def f" + cont[:cut]
    # eos: the token ids of the greedy continuation; the 8th as eos ends the text just before its first use
    ids = model.generate(torch.tensor([tok.encode("def f")]), 40, temperature=0)[0, 5:].tolist()
    eos = ids[7]
    first = ids.index(eos)
    expect = sample_text(model, tok, "def f", 40, temperature=0, eos_token_id=eos)
    assert expect == "def f" + tok.decode(ids[:first])
    assert _gen(capsys, *args, "--eos", str(eos))[:-1] == expect
    assert _gen(capsys, *args, "--eos", str(eos), "--ignore-eos")[:-1] == full


def test_repetition_penalty_matches_transformers(model_tok):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    ids = torch.randint(0, 50, (3, 9))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.7), ref, rtol=0, atol=0)
    assert torch.equal(sample_next_token(logits, 0.0, repetition_penalty=1.7, seen=seen), ref.argmax(-1))
    with pytest.raises(ValueError, match="repetition_penalty must be"):
        sample_next_token(logits, 1.0, repetition_penalty=0.0, seen=seen)
    with pytest.raises(ValueError, match="needs seen"):
        sample_next_token(logits, 1.0, repetition_penalty=1.2)

    # greedy generation with the penalty == a plain loop with transformers' processor on the whole sequence
    model, tok = model_tok
    x = torch.tensor([tok.encode("def foo(x):\n    return x")])
    proc = RepetitionPenaltyLogitsProcessor(1.3)
    seq = x.clone()
    for _ in range(12):
        logits = model(seq).logits[:, -1]
        seq = torch.cat([seq, proc(seq, logits).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(x, 12, temperature=0, repetition_penalty=1.3), seq)
    # the default (1.0) is no change
    plain = model.generate(x, 12, temperature=0)
    assert torch.equal(model.generate(x, 12, temperature=0, repetition_penalty=1.0), plain)


def test_prompts_file_batches_with_left_padding(model_dir, model_tok, tmp_path, capsys):
    model, tok = model_tok
    prompts = ["def ", "class Stack:", "import os\\nimport sys"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n\n")
    out = _gen(capsys, "--model", model_dir, "--prompts-file", str(f), "--max-new-tokens", "12", "--temperature", "0")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == [p.replace("\\n", "\n") for p in prompts]
    for r in rows:  # each row of the padded batch continues its own prompt as if alone
        alone = sample_text(model, tok, r["prompt"], 12, temperature=0)
        assert r["prompt"] + r["completion"] == alone
    assert generate_texts(model, tok, ["ab"], 5, temperature=0)[0] == sample_text(model, tok, "ab", 5,
                                                                                   temperature=0)[2:]


def test_chat_keeps_the_state_and_costs_the_same_per_turn(model_tok):
    model, tok = model_tok
    fed = []
    real_forward = model.forward

    def recording_forward(input_ids, state=None, **kw):
        fed.append(input_ids[0].tolist())
        return real_forward(input_ids, state=state, **kw)

    model.forward = recording_forward
    try:
        chat = ChatSession(model, tok, temperature=0, max_new_tokens=8, stop=())
        chat.turn("hello there")
        costs = []
        for _ in range(3):
            chat.turn("and again")
            costs.append(chat.tokens_fed)
        prompt = tok.encode("User: and again\nAssistant:")
        assert costs[0] == costs[1] == costs[2] == len(prompt) + 8  # the prompt, then 8 sampled tokens fed
        # one call for the turn's prompt, one per sampled token; nothing of the history is fed again
        assert fed[-9] == prompt and all(len(call) == 1 for call in fed[-8:])
        # the last reply is what greedy decoding of the whole conversation, read in one go, gives
        history = [t for call in fed[:-9] for t in call]
        reply = [call[0] for call in fed[-8:]]
        del model.forward
        full = model.generate(torch.tensor([history + prompt]), 8, temperature=0)[0, -8:].tolist()
        assert full == reply
    finally:
        model.__dict__.pop("forward", None)


def test_chat_command_with_piped_stdin(model_dir):
    r = run_cli(["chat", model_dir, "--max-new-tokens", "6", "--temperature", "0"], input="hello\n\nsecond turn\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 2 and r.stderr == ""


def test_generate_into_a_closed_pipe_is_quiet(model_dir):
    r = run_cli(["generate", "--model", model_dir, "--prompt", "x", "--max-new-tokens", "3"])
    assert r.returncode == 0
    import subprocess
    import sys
    from cli_helpers import SRC
    import os
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    p = subprocess.run(f"{sys.executable} -m fastxlstm generate --model {model_dir} --prompt x "
                       f"--max-new-tokens 2000 | head -c 5", shell=True, capture_output=True, text=True, env=env)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_invalid_utf8_prompt_names_the_flag(model_dir):
    import os
    import subprocess
    import sys
    from cli_helpers import SRC
    env = dict(os.environ, PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-m", "fastxlstm", "generate", "--model", model_dir, "--prompt",
                        os.fsdecode(b"ab\xffc")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--prompt is not valid UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_decode_options_set_the_engine_switches(model_dir, capsys, monkeypatch):
    """--compile-decode and --decode-state reach the CUDA-graph decoder through its environment switches (on this
    CPU machine the eager loop runs, so the text is the default's); bad values are refused by the parser."""
    import os
    from fastxlstm.generation import graph
    for var in ("FASTXLSTM_COMPILE_DECODE", "FASTXLSTM_DECODE_STATE"):
        # set, then removed, through monkeypatch: what the CLI writes into os.environ is undone after the test
        # (a delenv of an absent variable alone records nothing to restore)
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    args = ["--model", model_dir, "--prompt", "def f", "--max-new-tokens", "8", "--temperature", "0"]
    ref = _gen(capsys, *args)
    assert _gen(capsys, *args, "--compile-decode", "off", "--decode-state", "bf16") == ref
    assert os.environ["FASTXLSTM_COMPILE_DECODE"] == "off" and graph.compile_mode() == "off"
    assert graph.decode_state_dtype() == torch.bfloat16
    _gen(capsys, *args, "--compile-decode")  # no value: the default mode
    assert graph.compile_mode() == "blocks"
    assert main(["generate", *args, "--decode-state", "int8"]) != 0
    assert "invalid choice" in capsys.readouterr().err
