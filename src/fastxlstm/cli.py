"""Command line: ``fastxlstm train | generate | chat | eval | convert | serve | repro | presets`` (also
``python -m fastxlstm``).

    fastxlstm train                                   # small xLSTM on the Python standard library, ~5 min on CPU
    fastxlstm train --out runs/latest --resume        # continue a run with its own settings
    fastxlstm generate --model runs/latest --prompt "def " --stop "\\n\\n"
    fastxlstm chat runs/latest                        # turns on one carried recurrent state
    fastxlstm eval --model runs/latest                # held-out split of the default corpus
    fastxlstm convert hf-dir out-dir --to fastxlstm
    fastxlstm serve --model runs/latest               # OpenAI-compatible HTTP API on 127.0.0.1:8000
    fastxlstm repro parity --quick                    # a claim of the paper, rerun (parity | mqar | lm)
    torchrun --nproc-per-node 2 -m fastxlstm train --preset 125m --device cuda

Usage errors (bad flags, missing data, unknown preset, corrupt checkpoint) print one line and exit with code 2;
a run stopped at --stop-at exits 3, one stopped by a signal 128 + its number (130 for Ctrl-C) after saving a
checkpoint. Set FASTXLSTM_DEBUG=1 to see the traceback instead. The inference commands never import the training
package, and every command picks its CPU threads and OpenMP wait policy before torch loads (runtime.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, List, Optional

__all__ = ["main", "build_parser"]

_PROG = "fastxlstm"


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(message)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=110)


# ----------------------------------------------------------------------------------------------------------
# parsers
# ----------------------------------------------------------------------------------------------------------

def _parse_kv(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, val = text.split("=", 1)
    import yaml
    try:
        value = yaml.safe_load(val)
    except Exception:
        value = val
    return key.strip().replace("-", "_"), value


_METAVARS = {"preset": "NAME", "init_from": "DIR", "data": "PATH", "tokenizer": "PATH", "out": "DIR",
             "device": "DEVICE", "data_dtype": "DTYPE", "sample_prompt": "TEXT"}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    import typing
    from .train.config import config_field_specs
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="YAML or TOML file of training options (keys as below, with _ or -); flags override it")
    p.add_argument("--model-config", metavar="KEY=VALUE", action="append", type=_parse_kv, default=argparse.SUPPRESS,
                   help="override one field of the model config, e.g. --model-config embedding_dim=256 "
                        "(repeatable; values parsed as YAML: 3, 0.5, [1, 3], true)")
    p.add_argument("--stdlib", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    groups = {
        "model and data": ("preset", "init_from", "data", "data_dtype", "eod_token", "tokenizer", "train_tokenizer"),
        "optimisation": ("steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup_steps", "min_lr_ratio",
                         "weight_decay", "beta1", "beta2", "grad_clip", "precision", "compile", "fast_path",
                         "cuda_graph", "activation_checkpointing", "seed"),
        "evaluation, checkpoints and output": ("eval_every", "eval_windows", "log_every", "save_every",
                                               "keep_checkpoints", "out", "resume", "stop_at", "tensorboard",
                                               "sample_tokens", "sample_prompt", "progress"),
        "hardware": ("device", "fsdp", "threads"),
    }
    specs = {name: (typ, default, help_) for name, typ, default, help_ in config_field_specs()}
    for title, names in groups.items():
        g = p.add_argument_group(title)
        for name in names:
            typ, default, help_ = specs[name]
            flag = "--" + name.replace("_", "-")
            base = typ
            if typing.get_origin(typ) is typing.Union:
                base = [a for a in typing.get_args(typ) if a is not type(None)][0]
            shown = "none" if default is None else default
            if base is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_} (default: {'on' if default else 'off'})")
                continue
            meta = {int: "N", float: "X"}.get(base, _METAVARS.get(name, "TEXT"))
            text = help_ if "(default" in help_ else f"{help_} (default: {shown})"
            kwargs: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "type": base, "metavar": meta}
            if name == "precision":
                kwargs["choices"] = ["fp32", "bf16"]
                kwargs.pop("metavar")
            g.add_argument(flag, **kwargs)
    # the config fields missing from the groups above would silently lose their flag: fail loudly instead
    covered = {n for names in groups.values() for n in names} | {"model"}
    assert covered == set(specs), f"CLI misses TrainConfig fields: {set(specs) - covered}"


def _add_sampling_args(g: argparse.ArgumentParser, default_stop: Optional[str] = None) -> None:
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the generated text contains TEXT (not printed; repeatable; \\n for a newline)"
                        + (f"; default {default_stop!r}" if default_stop else ""))
    g.add_argument("--eos", type=int, action="append", default=None, metavar="ID",
                   help="token id that ends the text (repeatable; default: the model config's eos_token_id)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="> 1 makes tokens already in the text less likely (1: off, the default; 1.1-1.3 typical)")
    if not any(a.dest == "threads" for a in g._actions):
        g.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads (default: the free cores; see docs/TRAINING.md)")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser. ``command``: the subcommand about to be parsed; for another one than train the train
    options (which import the training package) are left out, so inference commands never import training."""
    parser = _Parser(prog=_PROG, formatter_class=_Formatter,
                     description="xLSTM (mLSTM + sLSTM) in PyTorch: train, sample and evaluate language models.",
                     epilog="Run 'fastxlstm COMMAND --help' for the options of each command.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"fastxlstm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train an xLSTM language model (default: small model, stdlib corpus, ~5 min CPU)",
                       formatter_class=_Formatter,
                       description="Train an xLSTM language model.\n\n"
                                   "With no arguments: the 'small' preset (mLSTM and sLSTM blocks) on the running\n"
                                   "interpreter's standard library as byte tokens, about 5 minutes on 2 CPU cores,\n"
                                   "written to runs/<timestamp>/ with runs/latest pointing to it. Continue a run with\n"
                                   "--out DIR --resume. Precedence: defaults < --config FILE < flags.\n\n"
                                   "Several processes: torchrun --nproc-per-node N -m fastxlstm train ... (DDP, or\n"
                                   "FSDP2 with --fsdp); only rank 0 logs and writes.")
    if command in (None, "train"):
        _add_train_args(p)

    g = sub.add_parser("generate", help="sample text from a trained model, streaming it to the terminal",
                       formatter_class=_Formatter,
                       description="Sample a continuation of a prompt and stream it as it is generated.\n\n"
                                   "--model is a run directory (runs/latest), its model/ folder, a checkpoint folder,\n"
                                   "or a transformers xLSTM directory with its tokenizer.json. The prompt comes from\n"
                                   "--prompt or, when absent, from standard input.")
    g.add_argument("--model", required=True, metavar="DIR", help="run, model or checkpoint directory")
    g.add_argument("--prompt", metavar="TEXT", default=None, help="prompt text (default: read standard input)")
    g.add_argument("--max-new-tokens", type=int, default=300, metavar="N", help="tokens to generate (default: 300)")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 is greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: smallest set of "
                                                                          "tokens with probability >= P")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast the weights (default: as stored)")
    g.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer.json to use instead of the one in the model directory")
    _add_sampling_args(g)
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, decode with the eager loop instead of the captured CUDA graph")
    g.add_argument("--compile-decode", nargs="?", const="blocks", default=None, choices=["blocks", "full", "off"],
                   help="on CUDA, how the captured decode step is torch.compile'd: blocks (default: one compiled "
                        "graph per block type, fuses the element-wise work between the matmuls; compiles once per "
                        "batch size, cached on disk by torch), full (the whole step), off")
    g.add_argument("--decode-state", choices=["fp32", "bf16"], default=None,
                   help="on CUDA, the dtype of the decoder's mLSTM matrix memories: fp32 (default, exact) or bf16 "
                        "(an approximation that halves the state traffic: ~1.2-1.4x more tokens/s at batch 64-256 on "
                        "an H200; logits drift by up to ~10%% over 256 steps, see the README)")
    g.add_argument("--prompts-file", metavar="FILE", default=None,
                   help="one prompt per line (\\n inside a line for a newline), generated as one batch; prints one "
                        "JSON object per prompt: {\"prompt\": ..., \"completion\": ...}")

    c = sub.add_parser("chat", help="talk to a model: the recurrent state is kept between turns",
                       formatter_class=_Formatter,
                       description="An interactive loop: each line you type is one turn. Only the new turn is fed to\n"
                                   "the model, on the recurrent state left by the previous turns, so every turn costs\n"
                                   "the same however long the conversation is. Empty line or Ctrl-D ends it; /reset\n"
                                   "starts over. Works with piped standard input too.")
    c.add_argument("model", metavar="MODEL", help="model or run directory")
    c.add_argument("--template", default="User: {text}\nAssistant:", metavar="TEXT",
                   help="how a turn is fed; {text} is your line (default: 'User: {text}\\nAssistant:')")
    c.add_argument("--system", default=None, metavar="TEXT", help="text fed once before the first turn")
    c.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="reply length limit (default: 200)")
    c.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy (default: 0.8)")
    c.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    c.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling")
    c.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    c.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")
    c.add_argument("--tokenizer", metavar="PATH", default=None, help="tokenizer.json instead of the model's")
    _add_sampling_args(c, default_stop="\nUser:")

    v = sub.add_parser("convert", help="convert a model between the fastxlstm and transformers formats",
                       formatter_class=_Formatter,
                       description="Convert a model directory (or a run directory: its final model) to another\n"
                                   "format: --to fastxlstm (config.json + model.safetensors read by\n"
                                   "fastxlstm.from_pretrained) or --to transformers (an xLSTMForCausalLM directory;\n"
                                   "only the 7B-architecture models have a transformers counterpart). The tokenizer\n"
                                   "files are copied along.")
    v.add_argument("src", metavar="SRC", help="model, run or transformers xLSTM directory")
    v.add_argument("dst", metavar="DST", help="output directory (must not exist, or be empty)")
    v.add_argument("--to", required=True, choices=["fastxlstm", "transformers"], help="target format")
    v.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on a corpus",
                       formatter_class=_Formatter,
                       description="Evaluate a model on text: every document is read in order with the recurrent\n"
                                   "state carried across --seq-len chunks and reset at document boundaries.\n"
                                   "Prints loss (nats/token), perplexity and bits per byte.")
    e.add_argument("--model", required=True, metavar="DIR", help="run, model or checkpoint directory")
    e.add_argument("--data", metavar="PATH", default=None,
                   help="text file, directory of text files, .jsonl, or .bin/.npy tokens: its held-out split, as "
                        "training splits it (--all: everything) (default: the standard-library corpus)")
    e.add_argument("--data-dtype", default="uint16", metavar="DTYPE",
                   help="dtype of a raw .bin token file (default: uint16)")
    e.add_argument("--eod-token", type=int, default=None, metavar="N", help="document separator id in .bin/.npy data")
    e.add_argument("--max-tokens", type=int, default=200_000, metavar="N",
                   help="evaluate at most N tokens, 0 for all (default: 200000)")
    e.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per forward call (default: 512)")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="parallel rows (default: 8)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")
    e.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer.json to use instead of the one in the model directory")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.add_argument("--all", action="store_true",
                   help="score every document of --data (default: only the held-out split, the same one "
                        "training holds out)")
    e.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: the free cores; see docs/TRAINING.md)")

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       formatter_class=_Formatter,
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models and /health (needs the\n"
                                   "'serve' extra: pip install 'fastxlstm[serve]'). --model as for 'generate'.")
    v.add_argument("--model", required=True, metavar="DIR", help="run, model or checkpoint directory")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    v.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model id clients send (default: the directory's name)")
    v.add_argument("--max-batch", type=int, default=64, metavar="N", help="state slots = sequences decoded "
                                                                          "together (default: 64)")
    v.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting for a slot before answering 429 (default: 256)")
    v.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                   help="most new tokens per request; also the chat default (default: 2048)")
    v.add_argument("--max-prompt-tokens", type=int, default=8192, metavar="N",
                   help="longer prompts get a 400 (default: 8192)")
    v.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="prompt tokens prefilled between two decode steps (default: 512)")
    v.add_argument("--prefix-cache-mb", type=float, default=1024.0, metavar="MB",
                   help="memory for cached prefix states, 0 to disable (default: 1024)")
    v.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request timeout (default: 600)")
    v.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $FASTXLSTM_API_KEY, else none)")
    v.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    v.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast the weights (default: as stored)")
    v.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer.json to use instead of the one in the model directory")
    v.add_argument("--decode", default="auto", choices=["auto", "eager", "graph"],
                   help="decode steps as a CUDA graph or eagerly (default: auto = graph on CUDA when available)")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    r = sub.add_parser("repro", help="rerun one of the paper's claims: parity, mqar or lm (docs/REPRODUCTIONS.md)",
                       formatter_class=_Formatter,
                       description="Rerun an experiment of the xLSTM paper and write its run directory (config,\n"
                                   "metrics.jsonl, results.json, a plot and a markdown table). --quick: a few\n"
                                   "minutes on a CPU; without it, the full setting for one GPU.")
    rsub = r.add_subparsers(dest="task", metavar="TASK", parser_class=_Parser)
    if command in (None, "repro"):
        import importlib
        from .experiments import TASKS
        for task in TASKS:
            mod = importlib.import_module(f".experiments.{task}", __package__)
            tp = rsub.add_parser(task, help=mod.HELP, formatter_class=_Formatter, description=mod.__doc__)
            mod.add_args(tp)

    sub.add_parser("presets", help="list the model presets", formatter_class=_Formatter,
                   description="List the model presets accepted by 'fastxlstm train --preset'.")
    return parser


# ----------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------

def _train_config(ns: argparse.Namespace):
    from .train.config import TrainConfig, load_config_file
    values: Dict[str, Any] = {}
    if hasattr(ns, "config"):
        values.update(load_config_file(ns.config))
    model_over = dict(values.pop("model", None) or {})
    if "model_config" in values:
        raise UsageError("use the key 'model' (a mapping) for model config fields in --config files")
    for key, val in getattr(ns, "model_config", []) or []:
        model_over[key] = val
    skip = {"command", "config", "model_config", "stdlib"}
    for key, val in vars(ns).items():
        if key not in skip:
            values[key] = val
    values["model"] = model_over
    return TrainConfig.from_dict(values)


def _given_fields(ns: argparse.Namespace) -> set:
    """The TrainConfig fields set on this command line or in its --config file (argparse leaves the others out)."""
    from .train.config import load_config_file
    given = {k for k in vars(ns) if k not in ("command", "config", "model_config", "stdlib")}
    if hasattr(ns, "config"):
        file_values = load_config_file(ns.config)
        given |= set(file_values) - {"model"}
        if file_values.get("model"):
            given.add("model")
    if getattr(ns, "model_config", None):
        given.add("model")
    return given


def _check_train_inputs(cfg) -> None:
    """Cheap checks before anything slow, so typos fail in a second with one line."""
    from .models.presets import list_presets
    if cfg.preset not in list_presets():
        raise UsageError(f"--preset {cfg.preset!r} does not exist; choose from: {', '.join(list_presets())}")
    if cfg.data is not None and not os.path.exists(cfg.data):
        raise UsageError(f"--data {cfg.data}: no such file or directory")
    if cfg.tokenizer not in ("bytes", "byte") and not os.path.exists(cfg.tokenizer):
        raise UsageError(f"--tokenizer {cfg.tokenizer}: no such file (use 'bytes' or a tokenizer.json)")
    if cfg.stop_at is not None and cfg.stop_at >= cfg.steps and not cfg.resume:
        raise UsageError(f"--stop-at {cfg.stop_at} must be below --steps {cfg.steps}")
    if cfg.init_from is not None and not os.path.exists(cfg.init_from):
        raise UsageError(f"--init-from {cfg.init_from}: no such directory")


# exit codes of a training run that stopped early with a resumable checkpoint
EXIT_STOP_AT = 3          # --stop-at N reached (single process; 0 under torchrun)
EXIT_SIGNAL_BASE = 128    # + the signal number: 130 after Ctrl-C (SIGINT), 143 after SIGTERM


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = _train_config(ns)
    _check_train_inputs(cfg)
    from .train.trainer import train
    summary = train(cfg, given=_given_fields(ns))
    if summary.get("stopped"):
        if summary.get("signal"):
            import signal
            return EXIT_SIGNAL_BASE + int(getattr(signal, summary["signal"]))
        # under torchrun a non-zero worker exit is a failure to the elastic agent (which may restart it): 0
        return EXIT_STOP_AT if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else 0
    return 0


def _find_model_dir(path: str):
    """(directory holding config.json + weights, or None; checkpoint directory, or None) for --model."""
    from .loading import find_model_dir
    try:
        return find_model_dir(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"--model {e}") from None


def _load_model(path: str, device, dtype_name: Optional[str], tokenizer_path: Optional[str]):
    """(model, tokenizer) for --model / --tokenizer (see fastxlstm.loading)."""
    import torch
    from .loading import load_model_and_tokenizer
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[dtype_name]
    _find_model_dir(path)
    if tokenizer_path is not None and not os.path.exists(tokenizer_path):
        raise UsageError(f"--tokenizer {tokenizer_path}: no such file")
    try:
        return load_model_and_tokenizer(path, device=device, dtype=dtype, tokenizer=tokenizer_path)
    except FileNotFoundError as e:
        if "tokenizer" in str(e):
            raise UsageError(f"--model {e}; pass --tokenizer PATH") from None
        raise


def cmd_generate(ns: argparse.Namespace) -> int:
    _check_sampling_args(ns)
    prompts = None
    if ns.prompts_file is not None:
        if ns.prompt is not None:
            raise UsageError("--prompt and --prompts-file exclude each other")
        prompts = [p.replace("\\n", "\n") for p in _read_text_arg(ns.prompts_file, "--prompts-file").splitlines()
                   if p.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file {ns.prompts_file}: no prompts (one per line)")
    else:
        prompt = ns.prompt
        if prompt is None:
            if sys.stdin is None or sys.stdin.isatty():
                raise UsageError("no prompt: pass --prompt TEXT or pipe text into standard input")
            prompt = _read_text_arg(None, "the prompt on standard input")
        else:
            _check_utf8(prompt, "--prompt")
        if prompt == "":
            raise UsageError("the prompt is empty")
    from .runtime import pick_device
    device = pick_device(ns.device, 0)
    if ns.compile_decode is not None:
        os.environ["FASTXLSTM_COMPILE_DECODE"] = ns.compile_decode
    if ns.decode_state is not None:
        os.environ["FASTXLSTM_DECODE_STATE"] = ns.decode_state
    model, tok = _load_model(ns.model, device, ns.dtype, ns.tokenizer)
    kw = dict(seed=ns.seed, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, stop=_stops(ns),
              eos_token_id=_eos_ids(ns, model), repetition_penalty=ns.repetition_penalty,
              use_cuda_graph=False if ns.no_cuda_graph else None)
    if prompts is not None:
        import json
        from .generation.text import generate_texts
        for p, text in zip(prompts, generate_texts(model, tok, prompts, ns.max_new_tokens, **kw)):
            sys.stdout.write(json.dumps({"prompt": p, "completion": text}, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return 0
    from .generation.text import sample_text

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    sample_text(model, tok, prompt, ns.max_new_tokens, stream=emit, **kw)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _check_sampling_args(ns: argparse.Namespace) -> None:
    if ns.max_new_tokens < 0:
        raise UsageError("--max-new-tokens must be >= 0")
    if ns.temperature < 0 or not math.isfinite(ns.temperature):
        raise UsageError("--temperature must be >= 0")
    if ns.top_k is not None and ns.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    if ns.top_p is not None and not 0 < ns.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if not (ns.repetition_penalty > 0 and math.isfinite(ns.repetition_penalty)):
        raise UsageError("--repetition-penalty must be a number > 0 (1: off)")
    for s in ns.stop or []:
        if s == "":
            raise UsageError("--stop must not be empty")
        _check_utf8(s, "--stop")


def _stops(ns: argparse.Namespace) -> List[str]:
    return [s.replace("\\n", "\n") for s in (ns.stop or [])]


def _eos_ids(ns: argparse.Namespace, model) -> Optional[List[int]]:
    if ns.ignore_eos:
        return None
    ids = ns.eos if ns.eos else [getattr(model.config, "eos_token_id", None)]
    ids = [i for i in ids if i is not None]
    for i in ids:
        if not 0 <= i < model.vocab_size:
            raise UsageError(f"--eos {i} is outside the model's vocabulary [0, {model.vocab_size})")
    return ids or None


def _check_utf8(text: str, what: str) -> None:
    """Command-line text with bytes that are not UTF-8 arrives with surrogate escapes: name the argument."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.start + 1].encode("utf-8", "surrogateescape")
        raise UsageError(f"{what} is not valid UTF-8 (byte {bad!r} at character {e.start}); pass UTF-8 text") \
            from None


def _read_text_arg(path: Optional[str], what: str) -> str:
    """The UTF-8 text of a file (or of standard input when path is None), errors naming the argument."""
    try:
        if path is None:
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        else:
            with open(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path}: is a directory") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = "" if path is None else f" {path}"
        raise UsageError(f"{what}{where} is not valid UTF-8 (byte {data[e.start:e.start + 1]!r} at offset "
                         f"{e.start})") from None


def cmd_chat(ns: argparse.Namespace) -> int:
    _check_sampling_args(ns)
    for text, what in ((ns.template, "--template"), (ns.system or "", "--system")):
        _check_utf8(text, what)
    if "{text}" not in ns.template:
        raise UsageError("--template must contain {text}")
    from .runtime import pick_device
    device = pick_device(ns.device, 0)
    model, tok = _load_model(ns.model, device, ns.dtype, ns.tokenizer)
    from .generation.text import ChatSession
    stops = _stops(ns) if ns.stop else ["\nUser:"]

    def new_session():
        return ChatSession(model, tok, user_template=ns.template.replace("\\n", "\n"), stop=stops,
                           max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k,
                           top_p=ns.top_p, repetition_penalty=ns.repetition_penalty,
                           eos_token_id=_eos_ids(ns, model), seed=ns.seed,
                           system=ns.system.replace("\\n", "\n") if ns.system else None)

    session = new_session()
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print(f"chat with {ns.model} (empty line or Ctrl-D ends, /reset starts over)", file=sys.stderr)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline().encode()
        if not raw:
            break
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            print(f"{_PROG} chat: that line is not valid UTF-8; skipped", file=sys.stderr)
            continue
        if line == "" and interactive:
            break
        if line.strip() == "/reset":
            session = new_session()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        session.turn(line, stream=emit)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    import json
    if ns.seq_len < 1 or ns.batch_size < 1 or ns.max_tokens < 0:
        raise UsageError("--seq-len and --batch-size must be >= 1, --max-tokens >= 0")
    if ns.data is not None and not os.path.exists(ns.data):
        raise UsageError(f"--data {ns.data}: no such file or directory")
    from .runtime import pick_device
    device = pick_device(ns.device, 0)
    model, tok = _load_model(ns.model, device, ns.dtype, ns.tokenizer)
    from .data.corpus import load_corpus, load_memmap, load_text_documents, _encode_docs
    from .evaluation import evaluate_stream
    if ns.data is None:
        stream = load_corpus(None, tok).eval
        what = "held-out split of the standard-library corpus"
    elif not ns.all:
        # the split training uses: a text file's last lines, a folder's held-out documents, a token file's tail
        stream = load_corpus(ns.data, tok, dtype=ns.data_dtype, eod_token=ns.eod_token).eval
        what = f"held-out split of {ns.data}"
    elif ns.data.endswith((".bin", ".npy")):
        c = load_memmap(ns.data, ns.data_dtype, ns.eod_token, vocab_size=model.vocab_size)
        from .data.corpus import TokenStream
        import numpy as np
        toks = np.concatenate([np.asarray(c.train.tokens), np.asarray(c.eval.tokens)])
        starts = np.concatenate([c.train.doc_start, c.eval.doc_start[:1] * False, c.eval.doc_start[1:]])
        stream = TokenStream(toks, starts, int(starts.sum()))
        what = f"{ns.data} (all of it)"
    else:
        tr, ev, _ = load_text_documents(ns.data)
        texts = tr + ev if os.path.isdir(ns.data) else ["".join(tr + ev)]
        stream = _encode_docs(tok, texts)
        what = f"{ns.data} (all of it)"
    r = evaluate_stream(model, stream, tok.token_bytes(), ns.seq_len, ns.batch_size,
                        ns.max_tokens if ns.max_tokens > 0 else None)
    if ns.json:
        print(json.dumps({"data": what, **r}))
    else:
        print(f"{what}: loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.3f} | "
              f"bits per byte {r['bpb']:.4f}  ({r['tokens']:,} tokens, {r['bytes']:,} bytes)")
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    import shutil
    import torch
    from .loading import find_model_dir, from_pretrained
    try:
        find_model_dir(ns.src)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"SRC {e}") from None
    if os.path.exists(ns.dst) and (not os.path.isdir(ns.dst) or os.listdir(ns.dst)):
        raise UsageError(f"DST {ns.dst} exists and is not an empty directory")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[ns.dtype]
    model = from_pretrained(ns.src, dtype=dtype)
    if ns.to == "transformers" and getattr(model.config, "model_type", None) != "xlstm":
        raise UsageError(f"SRC {ns.src} holds a {type(model).__name__} (the paper's xLSTM, model_type "
                         f"{model.config.model_type!r}); transformers has only the 7B architecture (XLSTMLarge), "
                         f"so it cannot be converted to the transformers format")
    # an XLSTMLarge directory is written in transformers' own layout (config.json for xLSTMConfig, its parameter
    # names); save_pretrained checks what transformers could not load
    model.save_pretrained(ns.dst)
    model_dir, ckpt_dir = find_model_dir(ns.src)
    base = model_dir if model_dir is not None else ckpt_dir
    parent = os.path.dirname(os.path.abspath(base)) if model_dir is not None else \
        os.path.dirname(os.path.dirname(os.path.abspath(base)))
    copied = []
    for d in (base, parent):
        for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(d, fn)) and not os.path.exists(os.path.join(ns.dst, fn)):
                shutil.copyfile(os.path.join(d, fn), os.path.join(ns.dst, fn))
                copied.append(fn)
        if copied:
            break
    print(f"{ns.src} -> {ns.dst} ({ns.to} format{', with ' + ', '.join(copied) if copied else ''})",
          file=sys.stderr)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    for name in ("max_batch", "max_tokens", "max_prompt_tokens", "prefill_chunk"):
        if getattr(ns, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if ns.max_queue < 0 or ns.prefix_cache_mb < 0 or not ns.timeout > 0 or not 0 <= ns.port < 65536:
        raise UsageError("--max-queue and --prefix-cache-mb must be >= 0, --timeout > 0, --port in [0, 65535]")
    try:
        from .serve.server import build_app, run_server
    except ImportError as e:
        raise UsageError(f"the server needs the 'serve' extra ({e}): pip install 'fastxlstm[serve]'") from None
    from .runtime import pick_device
    device = pick_device(ns.device, 0)
    model, tok = _load_model(ns.model, device, ns.dtype, ns.tokenizer)
    model_dir, ckpt_dir = _find_model_dir(ns.model)
    base = model_dir or ckpt_dir
    dirs = [base, os.path.dirname(os.path.abspath(base))]
    name = ns.served_model_name or os.path.basename(os.path.abspath(ns.model.rstrip("/\\")))
    api_key = ns.api_key or os.environ.get("FASTXLSTM_API_KEY") or None
    app = build_app(model, tok, name, model_dirs=dirs, max_batch=ns.max_batch, max_queue=ns.max_queue,
                    prefill_chunk=ns.prefill_chunk, prefix_cache_mb=ns.prefix_cache_mb, request_timeout=ns.timeout,
                    max_tokens=ns.max_tokens, max_prompt_tokens=ns.max_prompt_tokens, api_key=api_key,
                    decode=ns.decode)
    print(f"{_PROG} serve: model {name!r} ({type(model).__name__}, {model.num_parameters():,} parameters, "
          f"{device}, {type(app.state.engine.backend).__name__}) on http://{ns.host}:{ns.port}/v1",
          file=sys.stderr, flush=True)
    run_server(app, ns.host, ns.port, ns.log_level)
    return 0


def cmd_repro(ns: argparse.Namespace) -> int:
    if getattr(ns, "task", None) is None:
        from .experiments import TASKS
        raise UsageError(f"name a task: {', '.join(TASKS)} (e.g. fastxlstm repro parity --quick)")
    import importlib
    importlib.import_module(f".experiments.{ns.task}", __package__).run(ns)
    return 0


def cmd_presets(ns: argparse.Namespace) -> int:
    from .models.presets import list_presets
    from .train.config import TrainConfig
    default = TrainConfig().preset
    print(f"{'preset':10s} {'parameters':>14s}  description")
    for name, (desc, count) in list_presets().items():
        mark = "  (fastxlstm train's default)" if name == default else ""
        print(f"{name:10s} {count:>14,}  {desc}{mark}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastxlstm`` script; returns the exit code (2 for usage errors)."""
    parser = build_parser(argv_command(argv) or None)
    debug = os.environ.get("FASTXLSTM_DEBUG", "") not in ("", "0")
    try:
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return 2
        if ns.command in ("train", "generate", "eval", "chat", "convert", "serve", "repro"):
            from .runtime import configure_cpu  # before torch is imported: the OpenMP wait policy
            configure_cpu(getattr(ns, "threads", None))
        return {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "chat": cmd_chat,
                "convert": cmd_convert, "serve": cmd_serve, "repro": cmd_repro,
                "presets": cmd_presets}[ns.command](ns)
    except BrokenPipeError:
        # `fastxlstm generate ... | head`: the reader has gone; stop quietly like other Unix tools
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except UsageError as e:
        if debug:
            raise
        prog = f"{_PROG} {argv_command(argv)}".strip()
        print(f"{prog}: error: {e} (see {prog} --help)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # CorpusError, CheckpointError included
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{_PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        trainer = sys.modules.get("fastxlstm.train.trainer")  # never imported by the inference commands
        if trainer is not None and isinstance(e, trainer.NonFiniteLoss) and not debug:
            print(f"{_PROG}: error: {e}", file=sys.stderr)
            return 1
        raise


def argv_command(argv: Optional[List[str]]) -> str:
    args = sys.argv[1:] if argv is None else argv
    for a in args:
        if a in ("train", "generate", "eval", "chat", "convert", "serve", "repro", "presets"):
            return a
    return ""


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
