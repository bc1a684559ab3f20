"""The training loop behind ``fastxlstm train``: :func:`train`.

What a run directory holds (``--out``, default runs/<timestamp>, with runs/latest pointing to the newest):

    train_config.json       the resolved TrainConfig
    tokenizer.json | tokenizer_config.json   the tokenizer (trained BPE, or {"type": "bytes"})
    model/                  the final model: config.json, model.safetensors and the tokenizer
                            (fastxlstm.from_pretrained(<run>); fastxlstm generate --model <run>)
    checkpoints/step_N/     resumable checkpoints (see checkpoint.py)
    metrics.jsonl           one JSON object per line: {"split": "train" | "eval", "step", "loss", "bpb", ...}
    loss.png                training and held-out bits per byte against steps
    sample.txt              a sample from the final model
    tensorboard/            with --tensorboard

Exactness: the data order is a function of (seed, position) only, the learning rate a function of the step only,
and checkpoints hold the optimizer state and RNGs bit for bit, so N steps + resume + N steps reproduces 2N steps.

Where the other pieces live: the LR schedule and parameter groups in optim.py, run directory / metrics / plot /
export in rundir.py, evaluation in fastxlstm.evaluation, text sampling in fastxlstm.generation.text.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

from ..data.corpus import load_corpus, load_text_documents
from ..data.loader import WindowSampler, eval_windows
from ..data.tokenizers import load_tokenizer, resolve_tokenizer, train_bpe
from ..evaluation import LN2, evaluate_windows, lm_loss
from ..generation.text import sample_text
from ..loading import config_from_dict, resolve_run_dir
from . import checkpoint as ckpt
from . import rundir
from .config import TrainConfig, given_fields, merge_resume_config
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_str, init_distributed, shutdown, wrap_model
from .graphs import GraphCaptureError, GraphedStep
from .optim import build_optimizer, lr_at, optimizer_groups, set_lr

__all__ = ["train", "NonFiniteLoss", "lr_at", "optimizer_groups", "build_model_config", "lm_loss",
           "resolve_run_dir", "DEFAULT_RUNS_ROOT"]

DEFAULT_RUNS_ROOT = rundir.DEFAULT_RUNS_ROOT


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/Inf; the run stopped and the last good checkpoint was kept."""


# ----------------------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------------------

def build_model_config(preset: str, overrides: Dict[str, Any], vocab_size: int):
    """The model config of a run: a preset, its field overrides, and the tokenizer's
    vocabulary size (unless ``vocab_size`` is overridden explicitly, which must then cover the tokenizer)."""
    from ..models.presets import get_preset, list_presets
    if preset not in list_presets():
        raise ValueError(f"--preset {preset!r} does not exist; choose from: {', '.join(list_presets())}")
    base = get_preset(preset)
    fields = dict(overrides)
    if "vocab_size" in fields:
        if int(fields["vocab_size"]) < vocab_size:
            raise ValueError(f"model vocab_size {fields['vocab_size']} is smaller than the tokenizer's "
                             f"{vocab_size}")
    else:
        fields["vocab_size"] = vocab_size
    # the 7B config keeps token ids for pad/bos/eos that a byte vocabulary may not have
    for tok_field in ("pad_token_id", "bos_token_id", "eos_token_id"):
        val = getattr(base, tok_field, None)
        if val is not None and tok_field not in overrides and val >= fields["vocab_size"]:
            fields[tok_field] = None
    known = set(base.to_dict())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model config field(s) {', '.join(unknown)} for {type(base).__name__}; "
                         f"known: {', '.join(sorted(known - {'model_type'}))}")
    try:
        return replace(base, **fields)
    except TypeError as e:
        raise ValueError(f"bad model config override: {e}") from None


class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (preemption; torchrun forwards its signals as SIGTERM) set a flag that the
    loop checks after each step, so a checkpoint is written; a second signal aborts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested = False
        self.signal_name: Optional[str] = None
        self._old = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\nfastxlstm: {self.signal_name} received: saving a checkpoint after this step "
              f"(send it again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _log(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


def _set_threads(cfg: TrainConfig, info: DistInfo) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif info.distributed and info.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                     info.world_size))))
    # advice for a person at a terminal only: logs and the one-line errors scripts parse stay unchanged
    if info.device.type == "cpu" and info.is_main and hasattr(os, "getloadavg") and sys.stderr.isatty():
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load >= cores and "OMP_WAIT_POLICY" not in os.environ:
            # torch's OpenMP threads spin while they wait; with the cores already busy that can cost 3-10x
            _log(info, f"note: the CPU is busy (load {load:.1f} on {cores} cores); training may run several times "
                       f"slower than usual. OMP_WAIT_POLICY=PASSIVE or --threads 1 suffer less from it.")


# ----------------------------------------------------------------------------------------------------------
# setup: run directory, data, model, optimizer
# ----------------------------------------------------------------------------------------------------------

class _Run:
    """Everything a run holds between steps (built by :func:`_setup`)."""
    cfg: TrainConfig            # the run's configuration (on resume: the saved one plus safe changes)
    out: str
    ckpt_root: str
    tokenizer: Any
    corpus: Any
    token_bytes: torch.Tensor
    model_cfg: Any
    core: torch.nn.Module       # the module whose state dict is checkpointed
    fwd: torch.nn.Module        # what is called (DDP wrapper or the model)
    optimizer: torch.optim.Optimizer
    n_params: int
    sampler: WindowSampler
    ev_starts: np.ndarray
    eval_len: int
    metrics: Optional[rundir.MetricsLog]
    start_step: int = 0
    position: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    bpb_start: Optional[float] = None
    last_good: Optional[str] = None
    t_loop: float = 0.0
    fast: bool = False          # the training fast path (compiled blocks + chunked loss): see TrainConfig.fast_path
    graph: Optional[GraphedStep] = None   # the micro-step as a CUDA graph: see TrainConfig.cuda_graph


def _open_run_dir(cfg: TrainConfig, info: DistInfo, run: _Run) -> Tuple[Optional[str], bool]:
    """Pick and create the run directory; returns (the checkpoint to resume from or None, created here)."""
    run.out = broadcast_str(rundir.choose_run_dir(cfg.out, cfg.resume), info)
    run.ckpt_root = os.path.join(run.out, "checkpoints")
    resume_from = None
    if cfg.resume:
        resume_from = ckpt.latest_checkpoint(run.ckpt_root)
        if resume_from is None:
            raise ValueError(f"--resume: no checkpoint under {run.ckpt_root}")
    elif ckpt.list_checkpoints(run.ckpt_root):
        raise ValueError(f"--out {run.out} already holds a run with checkpoints; pass --resume to continue it or "
                         f"choose another --out")
    created = not os.path.exists(run.out)
    if info.is_main:
        os.makedirs(run.out, exist_ok=True)
    barrier(info)
    return resume_from, created


def _saved_config(out: str, trainer_state: Dict[str, Any]) -> Dict[str, Any]:
    """The run's settings: as saved in the checkpoint, else train_config.json."""
    saved = trainer_state.get("train_config")
    if isinstance(saved, dict):
        return saved
    path = os.path.join(out, "train_config.json")
    if os.path.isfile(path):
        import json
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    raise ValueError(f"--resume: {out} has no train_config.json and its checkpoint holds no settings")


def _load_tokenizer(cfg: TrainConfig, info: DistInfo, out: str):
    if cfg.resume and (os.path.isfile(os.path.join(out, "tokenizer.json"))
                       or os.path.isfile(os.path.join(out, "tokenizer_config.json"))):
        return load_tokenizer(out)
    if cfg.train_tokenizer is not None:
        if (cfg.data or "").endswith((".bin", ".npy")):
            raise ValueError("--train-tokenizer needs text data, not a pre-tokenised .bin/.npy")
        if info.is_main:
            _log(info, f"training a byte-level BPE tokenizer (vocab {cfg.train_tokenizer}) on the training split")
            train_bpe(load_text_documents(cfg.data)[0], cfg.train_tokenizer).save(out)
        barrier(info)
        return load_tokenizer(out)
    return resolve_tokenizer(cfg.tokenizer)


def _setup(cfg: TrainConfig, info: DistInfo, given, run: _Run) -> _Run:
    device = info.device
    _set_threads(cfg, info)
    resume_from, run.created = _open_run_dir(cfg, info, run)

    # resume: read the checkpoint first (it fixes the settings, the model config and the tokenizer)
    loaded = None
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from)
        cfg, notes = merge_resume_config(_saved_config(run.out, loaded[3]), cfg,
                                         given_fields(cfg) if given is None else set(given))
        for note in notes:
            _log(info, f"resume: {note}")
        if int(loaded[3]["step"]) >= cfg.steps:
            raise ValueError(f"--resume: the checkpoint {resume_from} is at step {loaded[3]['step']}, which is not "
                             f"below --steps {cfg.steps}; pass a larger --steps to train further")
        _log(info, f"resuming from {resume_from} (step {loaded[3]['step']} of {cfg.steps})")
    run.cfg = cfg
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ValueError("--precision bf16 autocast is for CUDA devices; use fp32 on the CPU")
    if cfg.init_from is not None and loaded is None:
        for name in ("preset", "model"):
            if name in (given_fields(cfg) if given is None else set(given)):
                raise ValueError(f"--init-from takes the architecture of {cfg.init_from}; "
                                 f"--{name.replace('model', 'model-config')} does not apply")

    # seeds, tokenizer, data
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    random.seed(cfg.seed)
    init_model = None
    if cfg.init_from is not None and loaded is None:
        from ..loading import from_pretrained, load_tokenizer_for
        init_model = from_pretrained(cfg.init_from, device=device).float().train()
        run.tokenizer = load_tokenizer_for(cfg.init_from, init_model.vocab_size)
    else:
        run.tokenizer = _load_tokenizer(cfg, info, run.out)
    run.corpus = load_corpus(cfg.data, run.tokenizer, dtype=cfg.data_dtype, eod_token=cfg.eod_token)
    _log(info, f"data: {run.corpus.description}")
    run.token_bytes = torch.from_numpy(run.tokenizer.token_bytes()).to(torch.float64)

    # model and optimizer
    from ..models.presets import build_model
    if loaded is not None:
        run.model_cfg = config_from_dict(loaded[4]["config"])
    elif init_model is not None:
        run.model_cfg = init_model.config
    else:
        run.model_cfg = build_model_config(cfg.preset, cfg.model, run.tokenizer.vocab_size)
    if run.model_cfg.vocab_size < run.tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size {run.model_cfg.vocab_size} < the tokenizer's "
                         f"{run.tokenizer.vocab_size}")
    if init_model is not None:
        model = init_model
    else:
        with torch.device(device):
            model = build_model(run.model_cfg)
    run.n_params = model.num_parameters() if hasattr(model, "num_parameters") else \
        sum(p.numel() for p in model.parameters())
    origin = "from the checkpoint" if loaded is not None else \
        f"from {cfg.init_from}" if init_model is not None else f"{cfg.preset} preset"
    _log(info, f"model: {type(model).__name__} {run.n_params:,} parameters ({origin}); "
               f"device {device}, world size {info.world_size}{', FSDP2' if cfg.fsdp else ''}")
    run.fwd = wrap_model(model, info, cfg.fsdp)       # FSDP2: in place; single process: the model itself
    run.core = model
    run.fast = cfg.fast_path if cfg.fast_path is not None else device.type == "cuda"
    if cfg.activation_checkpointing:
        run.core.set_activation_checkpointing(True)
    if run.fast:
        # compiled blocks (in place: parameter names, hence checkpoint keys, unchanged) and the chunked loss
        run.core.compile_blocks()
    elif cfg.compile:
        run.core.compile()                            # in place: parameter names (checkpoint keys) unchanged
    run.optimizer = build_optimizer(run.core, cfg, device)
    run.graph = _graphed_step(run, cfg, info)

    if loaded is not None:
        model_sd, optim_sd, rng, tstate, _ = loaded
        ckpt.apply_state(run.core, run.optimizer, model_sd, optim_sd)
        ckpt.restore_rng(*rng)
        run.start_step = int(tstate["step"])
        run.position = int(tstate["position"])
        run.tokens_seen = int(tstate.get("tokens", 0))
        run.elapsed_before = float(tstate.get("elapsed_s", 0.0))
        run.bpb_start = tstate.get("bpb_start")
        new_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        if tstate.get("global_batch") not in (None, new_batch):
            _log(info, f"note: the global batch changed from {tstate['global_batch']} to {new_batch} sequences; "
                       f"the data order continues from the saved position")
        del loaded, model_sd, optim_sd

    run.sampler = WindowSampler(run.corpus.train, cfg.seq_len, cfg.batch_size, cfg.grad_accum, info.world_size,
                                info.rank, cfg.seed)
    run.eval_len = min(cfg.seq_len, len(run.corpus.eval) - 1)
    run.ev_starts = eval_windows(run.corpus.eval, run.eval_len, cfg.eval_windows)
    run.metrics = rundir.MetricsLog(os.path.join(run.out, "metrics.jsonl"), run.start_step if cfg.resume else None,
                                    os.path.join(run.out, "tensorboard") if cfg.tensorboard else None) \
        if info.is_main else None
    if info.is_main:
        cfg.save(os.path.join(run.out, "train_config.json"))  # on resume: the saved settings + the safe changes
        run.tokenizer.save(run.out)
        # runs/latest moves only once a run has got this far (data and model are fine)
        if cfg.out is None or os.path.basename(os.path.dirname(os.path.abspath(run.out))) == DEFAULT_RUNS_ROOT:
            rundir.update_latest(run.out)
    run.last_good = ckpt.latest_checkpoint(run.ckpt_root)
    return run


def _graphed_step(run: _Run, cfg: TrainConfig, info: DistInfo) -> Optional[GraphedStep]:
    """The micro-step (forward + backward) as a CUDA graph, when ``cfg.cuda_graph`` asks for it (None: where it
    applies, i.e. the fast path on one CUDA device without torchrun)."""
    why_not = ("it needs a CUDA device" if info.device.type != "cuda" else
               "it needs the fast path (compiled blocks and the chunked loss)" if not run.fast else
               "it runs one process (under torchrun the DDP/FSDP hooks are not captured)" if info.distributed
               else None)
    if cfg.cuda_graph is False or (cfg.cuda_graph is None and why_not is not None):
        return None
    if why_not is not None:
        raise ValueError(f"--cuda-graph: {why_not}")
    core = run.core
    # the token data's range was checked when it was loaded; inside the graph nothing is read back
    return GraphedStep(core, lambda ids, resets, labels: _summed_nll(core, ids, resets, labels),
                       accumulate=cfg.grad_accum > 1,
                       autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)


def _summed_nll(model, ids, resets, labels) -> torch.Tensor:
    """The fast path's loss: the summed cross entropy, chunk by chunk (no float32 logits); labels -100 = no loss."""
    return model(ids, resets=resets, return_state=False, labels=labels, loss_reduction="sum").loss


def _micro_step(run: _Run, cfg: TrainConfig, info: DistInfo, mb, scale: float, sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch (already on the device); the gradient of ``scale * nll`` is added
    to the parameters' gradients. Returns the summed negative log-likelihood (float32, detached)."""
    fwd, device = run.fwd, info.device
    if run.fast:
        labels = mb.targets.masked_fill(~mb.mask, -100)
        if run.graph is not None:
            try:
                return run.graph(mb.input_ids, mb.resets, labels, scale=scale).float()
            except GraphCaptureError as e:
                if cfg.cuda_graph:
                    raise
                _log(info, f"note: {e}\nnote: training goes on without the CUDA graph (--no-cuda-graph skips the "
                           f"attempt)")
                run.graph = None
    with contextlib.nullcontext() if sync else fwd.no_sync():
        with _autocast(cfg, device):
            if run.fast:
                nll = _summed_nll(fwd, mb.input_ids, mb.resets, labels).float()
            else:
                nll = lm_loss(fwd(mb.input_ids, resets=mb.resets, return_state=False).logits, mb.targets, mb.mask)
        (nll * scale).backward()
    return nll.detach()


# ----------------------------------------------------------------------------------------------------------
# evaluation and checkpoints during the run
# ----------------------------------------------------------------------------------------------------------

def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _evaluate(run: _Run, cfg: TrainConfig, info: DistInfo, step: int) -> Dict[str, float]:
    r = evaluate_windows(run.fwd, run.corpus.eval, run.ev_starts, run.eval_len, run.token_bytes, cfg.batch_size,
                         info.device, info.rank, info.world_size, lambda: _autocast(cfg, info.device),
                         loss_fn=lm_loss)
    if run.metrics is not None:
        run.metrics.write({"split": "eval", "step": step, "loss": r["loss"], "bpb": r["bpb"], "tokens": r["tokens"]})
    return r


def _save(run: _Run, cfg: TrainConfig, info: DistInfo, step: int) -> Optional[str]:
    model_sd, optim_sd = ckpt.gather_state(run.core, run.optimizer)
    path = None
    if info.is_main:
        state = {"position": run.position, "tokens": run.tokens_seen,
                 "elapsed_s": run.elapsed_before + time.time() - run.t_loop,
                 "global_batch": run.sampler.global_batch, "world_size": info.world_size,
                 "train_config": cfg.to_dict(), "bpb_start": run.bpb_start}
        path = ckpt.save_checkpoint(run.ckpt_root, step, model_sd, optim_sd, {"config": run.model_cfg.to_dict()},
                                    state, keep=cfg.keep_checkpoints)
    del model_sd, optim_sd
    barrier(info)
    run.last_good = os.path.join(run.ckpt_root, f"step_{step:08d}")
    return path


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, step_callback: Optional[Callable[[int, Dict[str, Any]], None]] = None,
          given: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Run (or resume) training as described by ``cfg``; returns a summary dict (run_dir, bpb at start/end,
    steps, tokens, seconds, sample; "stopped" and "signal" when it stopped early). Raises NonFiniteLoss,
    CorpusError/ValueError (bad input), CheckpointError (bad checkpoint). ``step_callback(step, record)`` is
    called after every step (tests).

    With ``cfg.resume`` the run's saved settings are restored; ``given`` names the fields of ``cfg`` the caller
    set on purpose (default: those that differ from TrainConfig's defaults), which may change what is safe to
    change (see :func:`fastxlstm.train.config.merge_resume_config`)."""
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, step_callback, given)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, info: DistInfo, step_callback, given) -> Dict[str, Any]:
    device = info.device
    run = _Run()
    run.created = False
    try:
        _setup(cfg, info, given, run)
    except BaseException:
        # a run that failed before its first step leaves no empty directory behind
        if info.is_main and run.created and getattr(run, "out", None):
            rundir.remove_if_empty(run.out)
        raise
    cfg = run.cfg
    fwd, core, optimizer, sampler, token_bytes = run.fwd, run.core, run.optimizer, run.sampler, run.token_bytes

    run.t_loop = time.time()
    if run.start_step == 0:
        r0 = _evaluate(run, cfg, info, 0)
        run.bpb_start = r0["bpb"]
        _log(info, f"step 0: held-out {r0['bpb']:.3f} bits per byte (loss {r0['loss']:.3f} nats/token)")

    fwd.train()
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, smoothing=0.1)
    step = run.start_step
    stopped_reason, signal_name = None, None
    win_tokens, win_time, run_tokens = 0, time.time(), 0
    try:
        with _Interrupt() as intr:
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                set_lr(optimizer, lr)
                micros, n_valid = sampler.step_batches(run.position)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                byte_sum = torch.zeros((), dtype=torch.float64, device=device)
                # every rank divides by the whole global batch's target count; DDP averages over ranks, so the
                # gradient equals one process's gradient of the global mean loss
                scale = info.world_size / max(n_valid, 1)
                for mi, mb in enumerate(micros):
                    byte_sum += float((token_bytes[mb.targets] * mb.mask).sum())  # on the CPU copy: no sync
                    sync = (mi == len(micros) - 1) or not hasattr(fwd, "no_sync")
                    loss_sum += _micro_step(run, cfg, info, mb.to(device), scale, sync).double()
                grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(),
                                                           cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                flags = torch.stack([loss_sum, byte_sum,
                                     torch.tensor(float(intr.requested), dtype=torch.float64, device=device)])
                all_reduce_sum(flags, info)
                g_loss = float(flags[0]) / max(n_valid, 1)
                g_bpb = float(flags[0]) / LN2 / max(float(flags[1]), 1.0)
                gn = float(grad_norm)
                _check_finite(g_loss, gn, step, run.last_good)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                run.position += sampler.global_batch
                step_tokens = sampler.global_batch * cfg.seq_len
                run.tokens_seen += step_tokens
                win_tokens += step_tokens
                run_tokens += step_tokens
                rec = {"split": "train", "step": step, "loss": g_loss, "bpb": g_bpb, "lr": lr, "grad_norm": gn,
                       "tokens": run.tokens_seen}
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.time()
                    rec["tok_per_s"] = win_tokens / max(now - win_time, 1e-9)
                    rec["elapsed_s"] = run.elapsed_before + now - run.t_loop
                    win_tokens, win_time = 0, now
                    if run.metrics is not None:
                        run.metrics.write(rec)
                if bar is not None:
                    el = time.time() - run.t_loop
                    bar.set_postfix(loss=f"{g_loss:.3f}", bpb=f"{g_bpb:.3f}",
                                    tok_s=f"{run_tokens / max(el, 1e-9):,.0f}", refresh=False)
                    bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    r = _evaluate(run, cfg, info, step)
                    msg = f"step {step}: held-out {r['bpb']:.3f} bits per byte"
                    if bar is not None:
                        bar.write(msg, file=sys.stderr)
                    else:
                        _log(info, msg)
                if step_callback is not None:
                    step_callback(step, rec)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    _save(run, cfg, info, step)
                # ranks agree through the all-reduced flag; alone, the local flag also counts (set by the callback)
                if float(flags[2]) > 0 or (not info.distributed and intr.requested):
                    stopped_reason = "interrupted"
                    signal_name = intr.signal_name or "SIGTERM"  # another rank's signal: torchrun's SIGTERM
                    break
                if cfg.stop_at is not None and step >= cfg.stop_at and step < cfg.steps:
                    stopped_reason = f"--stop-at {cfg.stop_at}"
                    break
    finally:
        if bar is not None:
            bar.close()
    elapsed = run.elapsed_before + time.time() - run.t_loop
    if stopped_reason is not None:
        summary = _stop_early(run, cfg, info, step, stopped_reason, elapsed)
        summary["signal"] = signal_name
        return summary
    return _finish(run, cfg, info, step, elapsed)


def _check_finite(g_loss: float, gn: float, step: int, last_good: Optional[str]) -> None:
    if math.isfinite(g_loss) and math.isfinite(gn):
        return
    what = "loss" if not math.isfinite(g_loss) else "gradient norm"
    val = g_loss if what == "loss" else gn
    keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint had been written yet"
    raise NonFiniteLoss(f"the {what} became {val} at step {step + 1}; stopped without saving ({keep}). "
                        f"Try a lower --lr or --grad-clip.")


def _stop_early(run: _Run, cfg: TrainConfig, info: DistInfo, step: int, reason: str, elapsed: float):
    """Ctrl-C / SIGTERM / --stop-at: checkpoint and leave."""
    path = _save(run, cfg, info, step)
    if run.metrics is not None:
        run.metrics.close()
        rundir.plot_metrics(os.path.join(run.out, "metrics.jsonl"), os.path.join(run.out, "loss.png"))
    _log(info, f"stopped at step {step} ({reason}); checkpoint {path}. Continue with: "
               f"fastxlstm train --out {run.out} --resume")
    return {"run_dir": run.out, "steps": step, "stopped": reason, "checkpoint": path, "tokens": run.tokens_seen,
            "seconds": elapsed, "bpb_start": run.bpb_start}


def _finish(run: _Run, cfg: TrainConfig, info: DistInfo, step: int, elapsed: float) -> Dict[str, Any]:
    """The end: final evaluation, checkpoint, export, plot, sample."""
    r_end = _evaluate(run, cfg, info, step)
    path = _save(run, cfg, info, step)
    out = run.out
    summary = {"run_dir": out, "steps": step, "tokens": run.tokens_seen, "seconds": elapsed, "checkpoint": path,
               "bpb_start": run.bpb_start, "bpb_end": r_end["bpb"], "loss_end": r_end["loss"],
               "parameters": run.n_params}
    if info.is_main:
        model_dir = os.path.join(out, "model")
        rundir.export_final(model_dir, run.model_cfg, ckpt.load_checkpoint(path, load_optimizer=False)[0])
        run.tokenizer.save(model_dir)
        run.metrics.close()
        rundir.plot_metrics(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
        start_txt = f"{run.bpb_start:.3f}" if run.bpb_start is not None else "?"
        print(f"held-out bits per byte: {start_txt} at the start -> {r_end['bpb']:.3f} after {step} steps "
              f"({run.tokens_seen:,} tokens, {elapsed:.0f} s)", file=sys.stderr, flush=True)
        if cfg.sample_tokens > 0:
            from ..models.io import from_pretrained
            final = from_pretrained(model_dir, device=info.device)
            sample = sample_text(final, run.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed,
                                 temperature=0.8, top_k=None, top_p=0.95)
            with open(os.path.join(out, "sample.txt"), "w", encoding="utf-8") as f:
                f.write(sample)
            summary["sample"] = sample
            print(f"--- sample (prompt {cfg.sample_prompt!r}, temperature 0.8, top-p 0.95) ---", file=sys.stderr)
            print(sample, flush=True)
            print("---", file=sys.stderr)
        print(f"run directory: {out}  (try: fastxlstm generate --model {out} --prompt \"def \")",
              file=sys.stderr, flush=True)
        rundir.write_summary(out, summary)
    barrier(info)
    return summary
