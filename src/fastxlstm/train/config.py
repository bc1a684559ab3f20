"""The training configuration: one typed dataclass, loadable from YAML or TOML, every field overridable from the
command line (``--field-name value``; ``--model-config key=value`` for the model's own fields)."""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["TrainConfig", "load_config_file", "HELP", "merge_resume_config", "RESUME_FIXED", "PER_INVOCATION"]

HELP = {
    "preset": "model preset (fastxlstm presets lists them: tiny, small, 125m ... 2.7b, 7b)",
    "model": "overrides of the model config's fields (from a config file, or --model-config key=value)",
    "data": "training text: a text file, a JSON-lines file (a \"text\" field per line), a directory of them, or "
            "pre-tokenised .bin/.npy "
            "(default: the running interpreter's standard library, no download)",
    "data_dtype": "dtype of a raw .bin token file",
    "eod_token": "token id that ends a document in .bin/.npy data (the state is reset after it)",
    "tokenizer": "'bytes' (default) or a local tokenizer.json (or a directory holding one)",
    "init_from": "start from this model's weights and tokenizer (a fastxlstm model or run directory, or a "
                 "transformers xLSTM directory): fine-tuning; --preset and --model-config do not apply",
    "train_tokenizer": "train a byte-level BPE of this vocabulary size on the training split first",
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch per process",
    "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate (linear warmup, then cosine decay to min_lr_ratio * lr)",
    "warmup_steps": "linear warmup steps",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "weight_decay": "AdamW weight decay, applied to weight matrices only (not norms, biases, skip vectors, "
                    "recurrent kernels or embeddings)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "precision": "fp32, or bf16 (autocast; for CUDA)",
    "compile": "torch.compile the whole model (without the fast path; the fast path compiles the blocks itself)",
    "fast_path": "the training fast path: every block compiled with torch.compile and a chunked cross entropy "
                 "that never forms the float32 logits (default: on for CUDA, off elsewhere, where the eager "
                 "path is the reference)",
    "cuda_graph": "replay the forward + backward of each micro-batch as one CUDA graph (fast path, one GPU, no "
                  "torchrun): no host time spent launching its thousands of kernels (default: on there; a step "
                  "that cannot be captured falls back to the plain one with a note)",
    "activation_checkpointing": "recompute each block's activations in the backward (less memory, ~1/3 more "
                                "compute)",
    "eval_every": "evaluate held-out bits per byte every this many steps (0: only at start and end)",
    "eval_windows": "held-out windows per evaluation",
    "log_every": "write training metrics every this many steps",
    "save_every": "write a checkpoint every this many steps (0: only at the end and on Ctrl-C)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "out": "run directory (default runs/<timestamp>; runs/latest points to the newest run)",
    "seed": "random seed (model init, data order, sampling)",
    "resume": "continue from the latest checkpoint in --out (default --out: runs/latest) with the run's own "
              "settings; flags given again may change --steps, intervals and optimiser settings, not the data "
              "or the model",
    "device": "cpu, cuda, cuda:N (default: cuda if available)",
    "fsdp": "shard the model with FSDP2 (fully_shard) under torchrun instead of DDP",
    "tensorboard": "also write TensorBoard logs to <out>/tensorboard",
    "sample_tokens": "tokens of the sample printed and saved after training (0: none)",
    "sample_prompt": "prompt of that sample",
    "stop_at": "stop (with a checkpoint, exit code 3) after this step; resume later with --resume",
    "threads": "CPU threads (0: the free cores, from the affinity mask and the load average)",
    "progress": "show a progress bar",
}


@dataclass
class TrainConfig:
    preset: str = "small"
    model: Dict[str, Any] = field(default_factory=dict)
    data: Optional[str] = None
    data_dtype: str = "uint16"
    eod_token: Optional[int] = None
    tokenizer: str = "bytes"
    init_from: Optional[str] = None
    train_tokenizer: Optional[int] = None
    steps: int = 360
    batch_size: int = 32
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"
    compile: bool = False
    fast_path: Optional[bool] = None
    cuda_graph: Optional[bool] = None
    activation_checkpointing: bool = False
    eval_every: int = 60
    eval_windows: int = 128
    log_every: int = 10
    save_every: int = 120
    keep_checkpoints: int = 2
    out: Optional[str] = None
    seed: int = 0
    resume: bool = False
    device: Optional[str] = None
    fsdp: bool = False
    tensorboard: bool = False
    sample_tokens: int = 400
    sample_prompt: str = "def "
    stop_at: Optional[int] = None
    threads: int = 0
    progress: bool = True

    def __post_init__(self):
        def pos_int(name, allow_zero=False):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ValueError(f"{_flag(name)} must be an integer >= {0 if allow_zero else 1}, got {v!r}")
        for n in ("steps", "batch_size", "seq_len", "grad_accum", "eval_windows", "log_every", "keep_checkpoints"):
            pos_int(n)
        for n in ("warmup_steps", "eval_every", "save_every", "sample_tokens", "threads"):
            pos_int(n, allow_zero=True)
        for n in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "beta1", "beta2"):
            v = getattr(self, n)
            if isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
                setattr(self, n, v)
            if not isinstance(v, float) or v != v or v < 0:
                raise ValueError(f"{_flag(n)} must be a non-negative number, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError("--beta1 and --beta2 must be < 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model overrides must be a mapping, got {type(self.model).__name__}")
        if self.train_tokenizer is not None:
            pos_int("train_tokenizer")
            if self.tokenizer not in ("bytes", "byte"):
                raise ValueError("--train-tokenizer and --tokenizer FILE exclude each other")
            if self.init_from is not None:
                raise ValueError("--train-tokenizer and --init-from exclude each other (the model brings its "
                                 "tokenizer)")
        if self.init_from is not None and self.tokenizer not in ("bytes", "byte"):
            raise ValueError("--init-from uses the model's own tokenizer; leave out --tokenizer")
        if self.stop_at is not None:
            pos_int("stop_at")
        if self.eod_token is not None:
            pos_int("eod_token", allow_zero=True)
        for n in ("fast_path", "cuda_graph"):
            if getattr(self, n) is not None and not isinstance(getattr(self, n), bool):
                raise ValueError(f"{_flag(n)} must be true, false or none (auto), got {getattr(self, n)!r}")
        for n in ("compile", "activation_checkpointing", "resume", "fsdp", "tensorboard", "progress"):
            if not isinstance(getattr(self, n), bool):
                raise ValueError(f"{_flag(n)} must be true or false, got {getattr(self, n)!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**d)

    def save(self, path: str) -> None:
        from .._fileio import write_json
        write_json(path, self.to_dict(), indent=2)


# what a resumed run keeps from its directory whatever the flags say (changing any of them would make it another
# run: other data order, other model, other token ids)
RESUME_FIXED = ("preset", "model", "data", "data_dtype", "eod_token", "tokenizer", "train_tokenizer", "init_from",
                "seq_len", "seed")
# how to run this invocation, not what the run is: never restored from the directory
PER_INVOCATION = ("out", "resume", "stop_at", "device", "threads", "progress", "cuda_graph")


def given_fields(cfg: "TrainConfig") -> set:
    """The fields of ``cfg`` that differ from the defaults (what a Python caller evidently chose)."""
    default = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(cfg, f.name) != getattr(default, f.name)}


def merge_resume_config(saved: Dict[str, Any], cfg: "TrainConfig", given) -> "Tuple[TrainConfig, List[str]]":
    """The configuration of a resumed run: the run's saved settings, with the fields in ``given`` (those the user
    set again) taken from ``cfg`` where that is safe. Returns (config, notes for the user).

    Changing a field of RESUME_FIXED raises ValueError; PER_INVOCATION fields always come from ``cfg``; the others
    (steps, intervals, optimiser settings, batch) may change, each with a note."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    notes = []
    for name in sorted(known):
        new = getattr(cfg, name)
        if name in PER_INVOCATION:
            values[name] = new
            continue
        if name not in given or name not in values or values[name] == new:
            continue
        if name in RESUME_FIXED:
            what = "model config overrides" if name == "model" else _flag(name)
            raise ValueError(f"--resume: this run was started with {what} {values[name]!r}, not {new!r}; a resumed "
                             f"run keeps its data, model, preset, tokenizer, --seq-len and --seed. Start a new run "
                             f"(--init-from {os.path.join('RUN', 'model')} to continue from its weights) instead")
        notes.append(f"{_flag(name)}: {new!r} (the run had {values[name]!r})")
        values[name] = new
    return TrainConfig.from_dict(values), notes


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_config_file(path: str) -> Dict[str, Any]:
    """A YAML (.yaml/.yml), TOML (.toml) or JSON (.json) mapping of TrainConfig fields (keys may use - or _)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                import tomli as tomllib
            data = tomllib.loads(raw.decode("utf-8"))
        elif ext in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(raw.decode("utf-8"))
        elif ext == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            raise ValueError(f"--config {path}: use a .yaml, .yml, .toml or .json file")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot parse: {str(e).splitlines()[0]}") from None
    except Exception as e:  # yaml.YAMLError and friends
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            context = getattr(e, "context", None)
            raise ValueError(f"--config {path}: line {mark.line + 1}, column {mark.column + 1}: {problem}"
                             + (f" ({context})" if context else "")) from None
        raise ValueError(f"--config {path}: cannot parse: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: the top level must be a mapping of field: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def config_field_specs():
    """[(name, type, default, help)] of TrainConfig fields, for building the argparse options."""
    import typing
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, hints[f.name], default, HELP.get(f.name, "")))
    return out
