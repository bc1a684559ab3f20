"""What the three experiments share: command-line options, the run directory (per-model results under
``<out>/models/<name>/``, combined config.json / metrics.jsonl / results.json / results.md / plot), the models
(xLSTM[a:b], the 7B architecture and the Llama baseline from transformers with matched width, depth and parameter
count), the device / precision / time-budget handling and a small training loop for the synthetic tasks.

Run directory of an experiment (``--out``, default runs/repro-<task>-<time>)::

    config.json               the resolved settings of the (last) invocation, with hardware and versions
    models/<name>/result.json one model's runs (per seed) and its parameter count; written when its runs end
    models/<name>/metrics.jsonl   its training / evaluation records
    metrics.jsonl             all models' records (rebuilt by every report)
    results.json              the combined results (rebuilt from models/*/result.json by every report)
    results.md                the markdown table of docs/REPRODUCTIONS.md
    <task>.png                the plot

Several processes may write into the same ``--out`` with different ``--models`` (one per GPU): each writes only
its models' folders and then rebuilds the combined files from every finished model present; a model still
running in another process (no result.json yet) is simply not in the table yet. ``--report-only`` rebuilds them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["ExperimentError", "add_common_args", "parse_models", "parse_seeds", "resolve_out", "RunDir",
           "hardware_info", "pick_precision", "autocast_for", "Deadline", "count_params", "xlstm_lm_config",
           "large_config", "llama_config_matched", "build_llama", "build_model", "ModelWrap", "train_token_task",
           "md_table", "mean_std", "fmt_pm", "write_json_atomic", "read_json", "progress_bar"]


class ExperimentError(ValueError):
    """Bad options or inputs of an experiment: reported as a one-line usage error (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser, task: str, model_names: Sequence[str],
                    default_seeds: str) -> None:
    """The options every experiment has (the task adds its own)."""
    p.add_argument("--quick", action="store_true",
                   help="small settings that run in a few minutes on a 2-core CPU (the CI smoke test)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"run directory (default: runs/repro-{task}-<time>); several processes with different "
                        f"--models may share one")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (cuda if available), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--models", default=None, metavar="LIST",
                   help=f"comma-separated subset of: {', '.join(model_names)} (default: all)")
    p.add_argument("--seeds", default=None, metavar="LIST",
                   help=f"comma-separated integer seeds (default: {default_seeds}; --quick: 0)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="optimizer steps per run (default: by mode)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="sequences per step (default: by mode)")
    p.add_argument("--lr", type=float, default=None, metavar="X", help="peak learning rate (default: by mode)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere (default: auto)")
    p.add_argument("--time-budget-minutes", type=float, default=None, metavar="X",
                   help="wall-clock cap of this invocation's training: each run gets an equal share of what is "
                        "left and stops early (recorded as cut) when it is spent (default: by mode)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: the free cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild results.json, results.md, metrics.jsonl and the plot of --out from "
                        "the model folders there, and print the markdown table")


def parse_models(text: Optional[str], known: Sequence[str]) -> List[str]:
    """The models of ``--models`` (all when None), in the experiment's order; ExperimentError for unknown names."""
    if text is None:
        return list(known)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ExperimentError("--models is empty")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ExperimentError(f"--models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [n for n in known if n in names]


def parse_seeds(text: Optional[str], default: Sequence[int]) -> List[int]:
    if text is None:
        return list(default)
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ExperimentError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ExperimentError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def check_positive(ns: argparse.Namespace, names: Iterable[str]) -> None:
    for name in names:
        v = getattr(ns, name, None)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ExperimentError(f"--{name.replace('_', '-')} must be > 0, got {v}")


def with_options(settings, ns: argparse.Namespace, names: Iterable[str]):
    """A copy of the dataclass ``settings`` with the command-line options ``names`` that were given (not None)."""
    return replace(settings, **{n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None})


def resolve_out(out: Optional[str], task: str, report_only: bool = False) -> str:
    if out is None:
        if report_only:
            raise ExperimentError("--report-only needs --out DIR (the run directory to report on)")
        base = out = os.path.join("runs", f"repro-{task}-{time.strftime('%Y%m%d-%H%M%S', time.localtime())}")
        k = 1
        while os.path.exists(out):
            k += 1
            out = f"{base}-{k}"
    if report_only and not os.path.isdir(os.path.join(out, "models")):
        raise ExperimentError(f"--report-only: {out} holds no models/ folder (no experiment was run there)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExperimentError(f"--out {out} exists and is not a directory")
    return out


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------

def write_json_atomic(path: str, obj: Any) -> None:
    """obj as JSON (numbers from tensors / numpy, tuples and sets as lists), written atomically (the project's
    temporary-file-then-rename writer)."""
    _write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str) -> Optional[Any]:
    """The JSON in ``path``, or None when it is missing or cut short (another process writing it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_text_atomic(path: str, text: str) -> None:
    from .._fileio import write_text
    write_text(path, text)


class RunDir:
    """The run directory of one experiment (see the module docstring for its layout)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.join(path, "models"), exist_ok=True)

    def model_dir(self, name: str) -> str:
        d = os.path.join(self.path, "models", name)
        os.makedirs(d, exist_ok=True)
        return d

    def start_model(self, name: str) -> "MetricsFile":
        """A fresh metrics file for ``name`` (its old result.json, from an earlier run into this --out, is
        removed so that the report never mixes a new curve with an old result)."""
        d = self.model_dir(name)
        for fn in ("result.json",):
            if os.path.exists(os.path.join(d, fn)):
                os.remove(os.path.join(d, fn))
        return MetricsFile(os.path.join(d, "metrics.jsonl"), name)

    def finish_model(self, name: str, result: Dict[str, Any]) -> None:
        write_json_atomic(os.path.join(self.model_dir(name), "result.json"), result)

    def model_results(self, order: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        """name -> result.json of every finished model present (in ``order`` first, then any others).
        ExperimentError when there is none (nothing to report)."""
        root = os.path.join(self.path, "models")
        present = sorted(os.listdir(root)) if os.path.isdir(root) else []
        names = [n for n in order if n in present] + [n for n in present if n not in order]
        out = {}
        for n in names:
            r = read_json(os.path.join(root, n, "result.json"))
            if isinstance(r, dict):
                out[n] = r
        if not out:
            raise ExperimentError(f"{self.path} holds no finished model (models/*/result.json)")
        return out

    def combined_metrics(self, names: Iterable[str]) -> List[Dict[str, Any]]:
        """All records of the given models' metrics.jsonl (lines cut short by a writer are skipped)."""
        recs = []
        for n in names:
            path = os.path.join(self.path, "models", n, "metrics.jsonl")
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
        return recs

    def write_report(self, results: Dict[str, Any], markdown: str, names: Iterable[str]) -> None:
        names = list(names)
        write_json_atomic(os.path.join(self.path, "results.json"), results)
        _write_text_atomic(os.path.join(self.path, "results.md"), markdown)
        lines = "".join(json.dumps(r) + "\n" for r in self.combined_metrics(names))
        _write_text_atomic(os.path.join(self.path, "metrics.jsonl"), lines)


class MetricsFile:
    """One model's metrics.jsonl: one JSON object per line, flushed at once (another process may read it)."""

    def __init__(self, path: str, model: str):
        self.path = path
        self.model = model
        self.f = open(path, "w", encoding="utf-8")

    def write(self, rec: Dict[str, Any]) -> None:
        self.f.write(json.dumps({"model": self.model, **rec}, default=_json_default) + "\n")
        self.f.flush()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def hardware_info(device) -> Dict[str, Any]:
    """Where it ran: device name, CPU, threads, versions and the date (for the tables)."""
    import torch
    info: Dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
                            "threads": torch.get_num_threads(),
                            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime())}
    if getattr(device, "type", None) == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    from .. import __version__
    info["fastxlstm"] = __version__
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------------------------
# device, precision, time budget, progress
# ----------------------------------------------------------------------------------------------------------

def pick_device(spec: Optional[str]):
    from ..runtime import pick_device as _pick
    return _pick(spec, 0)


def pick_precision(spec: str, device) -> str:
    if spec == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if spec == "bf16" and device.type != "cuda":
        raise ExperimentError("--precision bf16 (autocast) is for CUDA devices; use fp32 on the CPU")
    return spec


def autocast_for(precision: str, device):
    import torch
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Deadline:
    """The ``--time-budget-minutes`` cap: every run gets an equal share of the time left for the runs left."""

    def __init__(self, minutes: Optional[float], runs: int):
        self.end = None if minutes is None else time.time() + 60.0 * minutes
        self.runs_left = max(1, runs)

    def next_run(self) -> Optional[float]:
        """The wall-clock time (time.time()) at which the next run must stop, or None (no cap)."""
        if self.end is None:
            return None
        share = max(0.0, self.end - time.time()) / self.runs_left
        self.runs_left = max(1, self.runs_left - 1)
        return time.time() + share


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
                leave=False)


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------

def count_params(model) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def xlstm_lm_config(ratio: Tuple[int, int], width: int, num_blocks: int, vocab_size: int, *, num_heads: int = 4,
                    slstm_num_heads: int = 4, chunk_size: int = 64, tie_weights: bool = False, **kw):
    """The paper's xLSTM[a:b] (a mLSTM : b sLSTM blocks): [1:0] only mLSTM, [0:1] only sLSTM, [1:1] alternating
    (mLSTM first), [7:1] one sLSTM block per eight (``slstm_positions``; at least one, in the middle, when the
    stack is shorter than eight blocks)."""
    from ..models.xlstm_lm import XLSTMLMConfig, slstm_positions
    a, b = ratio
    if b == 0:
        at: Tuple[int, ...] = ()
    elif a == 0:
        at = tuple(range(num_blocks))
    elif (a, b) == (1, 1):
        at = tuple(range(1, num_blocks, 2))
    else:
        at = slstm_positions(num_blocks, (a, b)) or (num_blocks // 2,)
    return XLSTMLMConfig(vocab_size=vocab_size, embedding_dim=width, num_blocks=num_blocks, slstm_at=at,
                         num_heads=num_heads, slstm_num_heads=slstm_num_heads, chunk_size=chunk_size,
                         tie_weights=tie_weights, **kw)


def large_config(width: int, num_layers: int, vocab_size: int, *, num_heads: int = 4, chunk_size: int = 64,
                 tie: bool = False):
    """The xLSTM-7B architecture (XLSTMLarge) at a small size."""
    from ..models.xlstm_large import XLSTMLargeConfig
    return XLSTMLargeConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=num_layers,
                            num_heads=num_heads, chunk_size=chunk_size, tie_word_embeddings=tie,
                            pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _require_transformers():
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise ExperimentError(f"the Llama baseline needs transformers ({e}): pip install 'fastxlstm[hf]' "
                              f"(or leave llama out of --models)") from None
    return LlamaConfig, LlamaForCausalLM


def _llama_params(hidden: int, layers: int, heads: int, vocab: int, inter: int, tie: bool) -> int:
    """LlamaForCausalLM's parameter count (no biases, RMSNorm weights; q, k, v, o all hidden x hidden with as
    many kv heads as heads). Checked against a built model in the tests."""
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tie else 2) + layers * per_layer + hidden


def llama_config_matched(target_params: int, hidden: int, layers: int, heads: int, vocab: int,
                         max_positions: int, tie: bool = False, multiple_of: int = 8):
    """A LlamaConfig of width ``hidden`` and depth ``layers`` whose FFN width (intermediate_size, a multiple of
    ``multiple_of``) brings its parameter count closest to ``target_params``. Returns (config, params)."""
    LlamaConfig, _ = _require_transformers()
    base = _llama_params(hidden, layers, heads, vocab, 0, tie)
    per_unit = 3 * hidden * layers
    inter = max(multiple_of, int(round((target_params - base) / per_unit / multiple_of)) * multiple_of)
    if hidden % heads:
        raise ExperimentError(f"Llama width {hidden} is not divisible by its {heads} heads")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, attn_implementation="sdpa", pad_token_id=None, bos_token_id=None,
                      eos_token_id=None)
    return cfg, _llama_params(hidden, layers, heads, vocab, inter, tie)


def build_llama(config):
    """transformers' LlamaForCausalLM (SDPA attention) on the current default device."""
    _, LlamaForCausalLM = _require_transformers()
    return LlamaForCausalLM(config)


def build_model(config):
    """A fastxlstm model for an XLSTMLMConfig / XLSTMLargeConfig, or transformers' Llama for a LlamaConfig."""
    if type(config).__name__ == "LlamaConfig":
        return build_llama(config)
    from ..models.presets import build_model as _build
    return _build(config)


def meta_params(config) -> int:
    """Parameter count of the model a config builds, without allocating it."""
    import torch
    with torch.device("meta"):
        return count_params(build_model(config))


class ModelWrap:
    """One calling convention for our models and the Llama: ``logits(ids)`` (B, S, V) float32 and
    ``loss_sum(ids, labels)`` (summed cross entropy over labels != -100), with the training fast path where it
    exists (our models' chunked loss that never forms the float32 logits; ``compile_blocks``).

    Our models are called without ``resets``: every model, the Llama included, sees exactly the same tokens."""

    def __init__(self, model, kind: str):
        self.model = model
        self.kind = kind  # "xlstm" (ours) or "llama"
        self.fast_loss = False
        # loss_sum through logits_at: the head only at the labelled positions (for tasks with few of them)
        self.sparse_loss = False

    @property
    def is_llama(self) -> bool:
        return self.kind == "llama"

    def logits(self, ids):
        if self.is_llama:
            return self.model(input_ids=ids, use_cache=False).logits.float()
        return self.model(ids, return_state=False).logits

    def logits_at(self, ids, mask):
        """float32 logits (M, V) of the M positions where ``mask`` (B, S) bool is True: the LM head is applied to
        those rows only (a task that scores a few positions per sequence, MQAR, never forms (B, S, V) logits)."""
        import torch.nn.functional as F
        if not self.is_llama:
            return self.model._logits_at(ids, mask)
        head = self.model.lm_head
        h = self.model.model(input_ids=ids, use_cache=False).last_hidden_state
        return F.linear(h[mask].to(head.weight.dtype), head.weight).float()

    def loss_sum(self, ids, labels):
        import torch.nn.functional as F
        if self.sparse_loss:
            m = labels != -100
            return F.cross_entropy(self.logits_at(ids, m), labels[m], reduction="sum")
        if self.fast_loss and not self.is_llama:
            return self.model(ids, return_state=False, labels=labels, loss_reduction="sum").loss.float()
        lg = self.logits(ids)
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")

    def optim_groups(self, weight_decay: float):
        """Our models' own groups; for the Llama the same rule: decay on weight matrices, not on the embedding
        or the norms."""
        if not self.is_llama:
            return self.model.optim_groups(weight_decay)
        emb = {id(self.model.get_input_embeddings().weight)}
        decay, no_decay, seen = [], [], set()
        for p in self.model.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 and id(p) not in emb else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def compile(self) -> None:
        """torch.compile block by block (our ``compile_blocks``; each Llama decoder layer likewise)."""
        if self.is_llama:
            for layer in self.model.model.layers:
                layer.compile()
        else:
            self.model.compile_blocks()

    def uncompile(self) -> None:
        """Back to eager blocks (after a compile failure; ``nn.Module.compile`` only sets ``_compiled_call_impl``)."""
        for mod in self.model.modules():
            if getattr(mod, "_compiled_call_impl", None) is not None:
                mod._compiled_call_impl = None

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self


def make_optimizer(wrap: ModelWrap, lr: float, weight_decay: float, device, betas=(0.9, 0.95)):
    """AdamW (fused on CUDA) over the parameter groups: the trainer's optimizer, for every model alike."""
    import torch
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(wrap.optim_groups(weight_decay), lr=lr, betas=betas, eps=1e-8, **kw)


def schedule(lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.1):
    """The trainer's schedule (fastxlstm.train.optim.lr_at): linear warmup, then cosine to min_lr_ratio * lr."""
    from ..train.optim import lr_at
    cfg = SimpleNamespace(lr=lr, steps=steps, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    return lambda step: lr_at(step, cfg)


@dataclass
class TrainOutcome:
    steps: int
    cut: bool
    seconds: float
    last_loss: float


def train_token_task(wrap: ModelWrap, make_batch: Callable[[int], Tuple[Any, Any]], steps: int, lr: float,
                     device, precision: str, deadline: Optional[float], metrics: "MetricsFile",
                     extra: Dict[str, Any], warmup: int, weight_decay: float = 0.1, grad_clip: float = 1.0,
                     log_every: int = 25, progress: bool = True, desc: str = "",
                     on_log: Optional[Callable[[int], Dict[str, Any]]] = None) -> TrainOutcome:
    """The synthetic tasks' loop: ``make_batch(step) -> (ids (B, S), labels (B, S), -100 = no loss)`` on
    ``device``, mean cross entropy over the labelled positions, AdamW + the trainer's LR schedule, gradient
    clipping, bf16 autocast when asked. Stops after ``steps`` or at ``deadline`` (then ``cut``). ``on_log(step)``
    may add fields (e.g. a training accuracy) to the records written every ``log_every`` steps."""
    import torch
    opt = make_optimizer(wrap, lr, weight_decay, device)
    lr_of = schedule(lr, steps, warmup)
    wrap.train(True)
    bar = progress_bar(progress, steps, desc)
    t0 = time.time()
    cut, step, loss_v = False, 0, float("nan")
    try:
        while step < steps:
            if deadline is not None and time.time() > deadline:
                cut = True
                break
            for g in opt.param_groups:
                g["lr"] = lr_of(step)
            ids, labels = make_batch(step)
            with autocast_for(precision, device):
                n = (labels != -100).sum().clamp_min(1)
                loss = wrap.loss_sum(ids, labels) / n
            loss.backward()
            torch.nn.utils.clip_grad_norm_(wrap.model.parameters(), grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % log_every == 0 or step == steps:
                loss_v = float(loss.detach())
                if not math.isfinite(loss_v):
                    raise RuntimeError(f"{desc}: the loss became {loss_v} at step {step}; try a lower --lr")
                rec = {"split": "train", "step": step, "loss": loss_v, "lr": lr_of(step - 1),
                       "elapsed_s": time.time() - t0, **extra}
                if on_log is not None:
                    rec.update(on_log(step))
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if step and not math.isfinite(loss_v):
        loss_v = float(loss.detach())
    return TrainOutcome(steps=step, cut=cut, seconds=time.time() - t0, last_loss=loss_v)


# ----------------------------------------------------------------------------------------------------------
# tables and numbers
# ----------------------------------------------------------------------------------------------------------

def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def fmt_pm(xs: Sequence[float], digits: int = 2) -> str:
    """"mean +- std" (std over seeds; just the value for one seed)."""
    if not xs:
        return "-"
    m, s = mean_std(xs)
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def unique(items: Sequence[Any]) -> List[Any]:
    """The non-empty items in first-seen order, without repeats (items may be unhashable, e.g. dicts)."""
    out: List[Any] = []
    for h in items:
        if h and h not in out:
            out.append(h)
    return out


def runs_line(res: Dict[str, Any]) -> str:
    """'Steps per run: ...; training time of all runs ... s.' over every run of every model in ``res``."""
    steps = sorted({run["steps"] for r in res.values() for run in r["runs"]})
    secs = sum(run["train_seconds"] for r in res.values() for run in r["runs"])
    return f"Steps per run: {', '.join(map(str, steps))}; training time of all runs {secs:.0f} s.\n"


def footer(results: Dict[str, Any]) -> str:
    """Hardware, seeds and time of the runs in a report (one line each per invocation seen)."""
    lines = []
    for h in results.get("hardware", []):
        where = h.get("gpu") or f"{h.get('cpu', '?')} ({h.get('threads', '?')} threads)"
        lines.append(f"- {where}; torch {h.get('torch')}, transformers {h.get('transformers', '-')}, "
                     f"{h.get('date', '')}")
    return "\n".join(lines) + ("\n" if lines else "")


def savefig(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    tmp = path + f".tmp{os.getpid()}.png"
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------------------
# the entry point every task shares
# ----------------------------------------------------------------------------------------------------------

def run_main(task_module, argv: Optional[List[str]] = None) -> int:
    """``python -m fastxlstm.experiments.<task>``: the same options and errors as ``fastxlstm repro <task>``."""
    from ..cli import main as cli_main
    args = sys.argv[1:] if argv is None else list(argv)
    return cli_main(["repro", task_module.TASK, *args])
