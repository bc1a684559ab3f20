"""Command line: ``fastxlstm train | generate | eval | presets`` (also ``python -m fastxlstm``).

    fastxlstm train                                   # small xLSTM on the Python standard library, ~5 min on CPU
    fastxlstm generate --model runs/latest --prompt "def "
    fastxlstm eval --model runs/latest                # held-out split of the default corpus
    torchrun --nproc-per-node 2 -m fastxlstm train --preset 125m --device cuda

Usage errors (bad flags, missing data, unknown preset, corrupt checkpoint) print one line and exit with code 2.
Set FASTXLSTM_DEBUG=1 to see the traceback instead.
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


_METAVARS = {"preset": "NAME", "init_from": "DIR", "data": "PATH", "tokenizer": "PATH", "out": "DIR", "device": "DEVICE",
             "data_dtype": "DTYPE", "sample_prompt": "TEXT"}


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
                         "weight_decay", "beta1", "beta2", "grad_clip", "precision", "compile", "seed"),
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

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on a corpus",
                       formatter_class=_Formatter,
                       description="Evaluate a model on text: every document is read in order with the recurrent\n"
                                   "state carried across --seq-len chunks and reset at document boundaries.\n"
                                   "Prints loss (nats/token), perplexity and bits per byte.")
    e.add_argument("--model", required=True, metavar="DIR", help="run, model or checkpoint directory")
    e.add_argument("--data", metavar="PATH", default=None,
                   help="text file, directory of text files or .bin/.npy tokens (default: the held-out split of "
                        "the standard-library corpus)")
    e.add_argument("--data-dtype", default="uint16", metavar="DTYPE", help="dtype of a raw .bin token file (default: uint16)")
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


def _load_model(path: str, device, dtype_name: Optional[str], tokenizer_path: Optional[str]):
    """(model, tokenizer) for --model / --tokenizer (see fastxlstm.loading)."""
    import torch
    from .loading import find_model_dir, load_model_and_tokenizer, resolve_run_dir
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[dtype_name]
    try:
        find_model_dir(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"--model {e}") from None
    if tokenizer_path is not None and not os.path.exists(tokenizer_path):
        raise UsageError(f"--tokenizer {tokenizer_path}: no such file")
    try:
        return load_model_and_tokenizer(path, device=device, dtype=dtype, tokenizer=tokenizer_path)
    except FileNotFoundError as e:
        if "tokenizer" in str(e):
            raise UsageError(f"--model {e}; pass --tokenizer PATH") from None
        raise


def cmd_generate(ns: argparse.Namespace) -> int:
    if ns.max_new_tokens < 0:
        raise UsageError("--max-new-tokens must be >= 0")
    if ns.temperature < 0 or not math.isfinite(ns.temperature):
        raise UsageError("--temperature must be >= 0")
    if ns.top_k is not None and ns.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    if ns.top_p is not None and not 0 < ns.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    prompt = ns.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt: pass --prompt TEXT or pipe text into standard input")
        prompt = sys.stdin.read()
    if prompt == "":
        raise UsageError("the prompt is empty")
    from .runtime import pick_device
    device = pick_device(ns.device, 0)
    model, tok = _load_model(ns.model, device, ns.dtype, ns.tokenizer)
    from .generation.text import sample_text

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    sample_text(model, tok, prompt, ns.max_new_tokens, seed=ns.seed, temperature=ns.temperature,
                top_k=ns.top_k, top_p=ns.top_p, stream=emit)
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
    elif ns.data.endswith((".bin", ".npy")):
        c = load_memmap(ns.data, ns.data_dtype, ns.eod_token, vocab_size=model.vocab_size)
        from .data.corpus import TokenStream
        import numpy as np
        toks = np.concatenate([np.asarray(c.train.tokens), np.asarray(c.eval.tokens)])
        starts = np.concatenate([c.train.doc_start, c.eval.doc_start[:1] * False, c.eval.doc_start[1:]])
        stream = TokenStream(toks, starts, int(starts.sum()))
        what = ns.data
    else:
        tr, ev, _ = load_text_documents(ns.data)
        texts = tr + ev if os.path.isdir(ns.data) else ["".join(tr + ev)]
        stream = _encode_docs(tok, texts)
        what = ns.data
    r = evaluate_stream(model, stream, tok.token_bytes(), ns.seq_len, ns.batch_size,
                        ns.max_tokens if ns.max_tokens > 0 else None)
    if ns.json:
        print(json.dumps({"data": what, **r}))
    else:
        print(f"{what}: loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.3f} | "
              f"bits per byte {r['bpb']:.4f}  ({r['tokens']:,} tokens, {r['bytes']:,} bytes)")
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
        if ns.command in ("train", "generate", "eval", "chat", "convert"):
            from .runtime import configure_cpu  # before torch is imported: the OpenMP wait policy
            configure_cpu(getattr(ns, "threads", None))
        return {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval,
                "presets": cmd_presets}[ns.command](ns)
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
        if a in ("train", "generate", "eval", "presets"):
            return a
    return ""


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
