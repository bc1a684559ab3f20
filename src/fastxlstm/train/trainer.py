"""The training loop behind ``fastxlstm train``: one readable function, :func:`train`.

What a run directory holds (``--out``, default runs/<timestamp>, with runs/latest pointing to the newest):

    train_config.json       the resolved TrainConfig
    tokenizer.json | tokenizer_config.json   the tokenizer (trained BPE, or {"type": "bytes"})
    model/                  the final model: config.json, model.safetensors and the tokenizer
                            (fastxlstm.from_pretrained(<run>/model); fastxlstm generate --model <run>)
    checkpoints/step_N/     resumable checkpoints (see checkpoint.py)
    metrics.jsonl           one JSON object per line: {"split": "train" | "eval", "step", "loss", "bpb", ...}
    loss.png                training and held-out bits per byte against steps
    sample.txt              a sample from the final model
    tensorboard/            with --tensorboard

Exactness: the data order is a function of (seed, position) only, the learning rate a function of the step only,
and checkpoints hold the optimizer state and RNGs bit for bit, so N steps + resume + N steps reproduces 2N steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.corpus import TokenStream, load_corpus, load_text_documents
from ..data.loader import WindowSampler, eval_windows, make_batch
from ..data.tokenizers import load_tokenizer, resolve_tokenizer, train_bpe
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_str, init_distributed, shutdown, wrap_model

__all__ = ["train", "NonFiniteLoss", "lr_at", "build_model_config", "evaluate", "lm_loss",
           "resolve_run_dir", "DEFAULT_RUNS_ROOT"]

DEFAULT_RUNS_ROOT = "runs"
LN2 = math.log(2.0)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/Inf; the run stopped and the last good checkpoint was kept."""


# ----------------------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``.
    ``step`` counts finished optimizer steps (0 for the first update)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * progress))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (nats) over the positions where ``mask`` is True.

    logits (B, S, V) float32, targets (B, S) int64, mask (B, S) bool. Returns a 0-dim tensor."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1).to(nll.dtype)).sum()


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on weight matrices only. Uses the model's own ``optim_groups`` when it has one (it knows
    its recurrent kernels); otherwise decays >= 2-D parameters except embeddings, convs and recurrent kernels."""
    if hasattr(model, "optim_groups"):
        return model.optim_groups(weight_decay)
    decay, no_decay, seen = [], [], set()
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        lname = name.lower()
        is_matrix = (p.ndim >= 2 and id(p) not in emb_ids and "recurrent" not in lname and "conv" not in lname)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def config_from_dict(d: Dict[str, Any]):
    """Rebuild a model config from ``to_dict()`` output (model_type picks the class: models/registry.py)."""
    from ..models.registry import config_from_dict as _from_dict
    return _from_dict(d)


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime())


def resolve_run_dir(path: str) -> str:
    """Follow a ``latest`` pointer: a symlink (by the OS) or a text file holding the run's name or path."""
    if os.path.isfile(path) and os.path.getsize(path) < 4096 and os.path.basename(path) == "latest":
        with open(path, "r", encoding="utf-8") as f:
            target = f.read().strip()
        if target:
            return target if os.path.isabs(target) else os.path.join(os.path.dirname(path), target)
    return path


def _update_latest(run_dir: str) -> None:
    """<parent>/latest -> run_dir: a relative symlink, or a pointer file where symlinks are not allowed."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    link = os.path.join(parent, "latest")
    name = os.path.basename(os.path.abspath(run_dir))
    if name == "latest" or (os.path.exists(link) and os.path.isdir(link) and not os.path.islink(link)):
        return  # never replace a real directory called latest
    tmp = os.path.join(parent, f".latest.tmp{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(name, tmp)
    except OSError:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
    os.replace(tmp, link)


def _jsonl_records(path: str):
    """(line, record) for every line of a JSON-lines file that parses (a line cut short by a crash is skipped)."""
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


class _MetricsLog:
    """metrics.jsonl (rank 0), plus TensorBoard scalars when asked."""

    def __init__(self, path: str, resume_step: Optional[int], tensorboard_dir: Optional[str]):
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            # drop lines written after the checkpoint we resume from, so the curve has no duplicate steps
            keep = [line if line.endswith("\n") else line + "\n"
                    for line, rec in _jsonl_records(path) if rec.get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)
        self.f = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard not installed
                raise ValueError(f"--tensorboard needs the tensorboard package ({e})") from None
            self.tb = SummaryWriter(tensorboard_dir)

    def write(self, rec: Dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"{rec['split']}/{k}", v, rec["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """Training and held-out bits per byte against steps, as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    tr, ev = [], []
    for _, r in _jsonl_records(metrics_path):
        (tr if r.get("split") == "train" else ev if r.get("split") == "eval" else []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot([r["step"] for r in tr], [r["bpb"] for r in tr], label="train", lw=1.2)
    if ev:
        ax.plot([r["step"] for r in ev], [r["bpb"] for r in ev], "o-", label="held-out", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("fastxlstm train")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: TokenStream, starts: np.ndarray, seq_len: int,
             token_bytes: torch.Tensor, batch_size: int, info: DistInfo,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> Dict[str, float]:
    """Held-out loss (nats/token) and bits per byte over the windows at ``starts`` (fresh state per window).

    Windows are split across ranks; every rank runs the same number of forward calls (FSDP needs that), the
    last ones padded with zero-weight repeats."""
    was_training = model.training
    model.eval()
    per_rank = -(-len(starts) // info.world_size)
    n_batches = -(-per_rank // batch_size)
    mine = starts[info.rank::info.world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # nll, tokens, bytes
    tb = token_bytes.to(info.device)
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1.0
        if len(chunk) == 0:
            chunk, weight = starts[:1], 0.0
        batch = make_batch(stream, chunk, seq_len).to(info.device)
        with autocast():
            out = model(batch.input_ids, resets=batch.resets, return_state=False)
        nll = lm_loss(out.logits, batch.targets, batch.mask)
        m = batch.mask
        sums += weight * torch.stack([nll.double(), m.sum().double(), (tb[batch.targets] * m).sum().double()])
    all_reduce_sum(sums, info)
    model.train(was_training)
    nll, ntok, nbytes = (float(x) for x in sums)
    loss = nll / max(ntok, 1.0)
    return {"loss": loss, "bpb": nll / LN2 / max(nbytes, 1.0), "tokens": int(ntok)}


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------

class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (preemption; torchrun forwards its signals as SIGTERM) set a flag that the
    loop checks after each step, so a checkpoint is written; a second signal aborts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested = False
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
        print(f"\nfastxlstm: {signal.Signals(signum).name} received: saving a checkpoint after this step "
              f"(send it again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _log(info: DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


def train(cfg: TrainConfig, step_callback: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run (or resume) training as described by ``cfg``; returns a summary dict (run_dir, bpb at start/end,
    steps, tokens, seconds, sample). Raises NonFiniteLoss, CorpusError/ValueError (bad input),
    CheckpointError (bad checkpoint). ``step_callback(step, record)`` is called after every step (tests)."""
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, step_callback)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, info: DistInfo, step_callback) -> Dict[str, Any]:
    device = info.device
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif info.distributed and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                     info.world_size))))
    # advice for a person at a terminal only: logs and the one-line errors scripts parse stay unchanged
    if device.type == "cpu" and info.is_main and hasattr(os, "getloadavg") and sys.stderr.isatty():
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load >= cores and "OMP_WAIT_POLICY" not in os.environ:
            # torch's OpenMP threads spin while they wait; with the cores already busy that can cost 3-10x
            _log(info, f"note: the CPU is busy (load {load:.1f} on {cores} cores); training may run several times "
                       f"slower than usual. OMP_WAIT_POLICY=PASSIVE or --threads 1 suffer less from it.")
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ValueError("--precision bf16 autocast is for CUDA devices; use fp32 on the CPU")

    # ---- run directory -----------------------------------------------------------------------------------
    out = cfg.out
    if out is None:
        if cfg.resume:
            out = os.path.join(DEFAULT_RUNS_ROOT, "latest")
        else:
            base = out = os.path.join(DEFAULT_RUNS_ROOT, _timestamp())
            k = 1
            while os.path.exists(out):  # two runs started in the same second get their own directories
                k += 1
                out = f"{base}-{k}"
    out = resolve_run_dir(out)
    out = broadcast_str(out, info)
    ckpt_root = os.path.join(out, "checkpoints")
    resume_from = None
    if cfg.resume:
        resume_from = ckpt.latest_checkpoint(ckpt_root)
        if resume_from is None:
            raise ValueError(f"--resume: no checkpoint under {ckpt_root}")
    elif ckpt.list_checkpoints(ckpt_root):
        raise ValueError(f"--out {out} already holds a run with checkpoints; pass --resume to continue it or "
                         f"choose another --out")
    if info.is_main:
        os.makedirs(out, exist_ok=True)
    barrier(info)

    # ---- resume: read the checkpoint first (it fixes the model config and tokenizer) ---------------------
    loaded = None
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from)
        if int(loaded[3]["step"]) >= cfg.steps:
            raise ValueError(f"--resume: the checkpoint {resume_from} is at step {loaded[3]['step']}, which is not "
                             f"below --steps {cfg.steps}; pass a larger --steps to train further")
        _log(info, f"resuming from {resume_from} (step {loaded[3]['step']})")

    # ---- seeds, tokenizer, data --------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    random.seed(cfg.seed)

    if cfg.resume and (os.path.isfile(os.path.join(out, "tokenizer.json"))
                       or os.path.isfile(os.path.join(out, "tokenizer_config.json"))):
        tokenizer = load_tokenizer(out)
    elif cfg.train_tokenizer is not None:
        if (cfg.data or "").endswith((".bin", ".npy")):
            raise ValueError("--train-tokenizer needs text data, not a pre-tokenised .bin/.npy")
        if info.is_main:
            _log(info, f"training a byte-level BPE tokenizer (vocab {cfg.train_tokenizer}) on the training split")
            train_bpe(load_text_documents(cfg.data)[0], cfg.train_tokenizer).save(out)
        barrier(info)
        tokenizer = load_tokenizer(out)
    else:
        tokenizer = resolve_tokenizer(cfg.tokenizer)
    corpus = load_corpus(cfg.data, tokenizer, dtype=cfg.data_dtype, eod_token=cfg.eod_token)
    _log(info, f"data: {corpus.description}")
    token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(torch.float64)

    # ---- model -------------------------------------------------------------------------------------------
    from ..models.presets import build_model
    if loaded is not None:
        model_cfg = config_from_dict(loaded[4]["config"])
    else:
        model_cfg = build_model_config(cfg.preset, cfg.model, tokenizer.vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size {model_cfg.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
    with torch.device(device):
        model = build_model(model_cfg)
    n_params = model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel()
                                                                                  for p in model.parameters())
    origin = "from the checkpoint" if loaded is not None else f"{cfg.preset} preset"
    _log(info, f"model: {type(model).__name__} {n_params:,} parameters ({origin}); "
               f"device {device}, world size {info.world_size}{', FSDP2' if cfg.fsdp else ''}")

    raw = wrap_model(model, info, cfg.fsdp)            # FSDP2: in place; single process: the model itself
    core = model                                       # the module whose state dict is checkpointed
    fwd = raw
    if cfg.compile:
        core.compile()                                 # in place: parameter names (checkpoint keys) unchanged
    groups = optimizer_groups(core, cfg.weight_decay)
    adam_kw = {"fused": True} if device.type == "cuda" and not cfg.fsdp else {}
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **adam_kw)

    start_step, position, tokens_seen, elapsed_before = 0, 0, 0, 0.0
    bpb_start = None
    if loaded is not None:
        model_sd, optim_sd, rng, tstate, _ = loaded
        ckpt.apply_state(core, optimizer, model_sd, optim_sd)
        ckpt.restore_rng(*rng)
        start_step = int(tstate["step"])
        position = int(tstate["position"])
        tokens_seen = int(tstate.get("tokens", 0))
        elapsed_before = float(tstate.get("elapsed_s", 0.0))
        bpb_start = tstate.get("bpb_start")
        if tstate.get("global_batch") not in (None, cfg.batch_size * cfg.grad_accum * info.world_size):
            _log(info, f"note: the global batch changed from {tstate['global_batch']} to "
                       f"{cfg.batch_size * cfg.grad_accum * info.world_size} sequences; the data order continues "
                       f"from the saved position")
        del loaded, model_sd, optim_sd

    if info.is_main:
        cfg.save(os.path.join(out, "train_config.json"))
        tokenizer.save(out)
        # runs/latest moves only once a run has got this far (data and model are fine)
        if cfg.out is None or os.path.basename(os.path.dirname(os.path.abspath(out))) == DEFAULT_RUNS_ROOT:
            _update_latest(out)
    sampler = WindowSampler(corpus.train, cfg.seq_len, cfg.batch_size, cfg.grad_accum, info.world_size,
                            info.rank, cfg.seed)
    eval_len = min(cfg.seq_len, len(corpus.eval) - 1)
    ev_starts = eval_windows(corpus.eval, eval_len, cfg.eval_windows)

    def autocast():
        if cfg.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    metrics = _MetricsLog(os.path.join(out, "metrics.jsonl"), start_step if cfg.resume else None,
                          os.path.join(out, "tensorboard") if cfg.tensorboard else None) if info.is_main else None

    def do_eval(step: int) -> Dict[str, float]:
        r = evaluate(fwd, corpus.eval, ev_starts, eval_len, token_bytes, cfg.batch_size, info, autocast)
        if metrics is not None:
            metrics.write({"split": "eval", "step": step, "loss": r["loss"], "bpb": r["bpb"], "tokens": r["tokens"]})
        return r

    last_good = ckpt.latest_checkpoint(ckpt_root)

    def save(step: int) -> str:
        nonlocal last_good
        model_sd, optim_sd = ckpt.gather_state(core, optimizer)
        path = None
        if info.is_main:
            state = {"position": position, "tokens": tokens_seen, "elapsed_s": elapsed_before + time.time() - t_loop,
                     "global_batch": sampler.global_batch, "world_size": info.world_size,
                     "train_config": cfg.to_dict(), "bpb_start": bpb_start}
            path = ckpt.save_checkpoint(ckpt_root, step, model_sd, optim_sd,
                                        {"config": model_cfg.to_dict()}, state, keep=cfg.keep_checkpoints)
        del model_sd, optim_sd
        barrier(info)
        last_good = os.path.join(ckpt_root, f"step_{step:08d}")
        return path

    # ---- initial evaluation ------------------------------------------------------------------------------
    t_loop = time.time()
    if start_step == 0:
        r0 = do_eval(0)
        bpb_start = r0["bpb"]
        _log(info, f"step 0: held-out {r0['bpb']:.3f} bits per byte (loss {r0['loss']:.3f} nats/token)")

    # ---- train -------------------------------------------------------------------------------------------
    fwd.train()
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, smoothing=0.1)
    step = start_step
    stopped_reason = None
    win_tokens, win_time, run_tokens = 0, time.time(), 0
    last_eval: Optional[Dict[str, float]] = None
    stop_at = cfg.stop_at
    try:
        with _Interrupt() as intr:
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                micros, n_valid = sampler.step_batches(position)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                byte_sum = torch.zeros((), dtype=torch.float64, device=device)
                # every rank divides by the whole global batch's target count; DDP averages over ranks, so the
                # gradient equals one process's gradient of the global mean loss
                scale = info.world_size / max(n_valid, 1)
                for mi, mb in enumerate(micros):
                    byte_sum += float((token_bytes[mb.targets] * mb.mask).sum())  # on the CPU copy: no sync
                    mb = mb.to(device)
                    sync = (mi == len(micros) - 1) or not hasattr(fwd, "no_sync")
                    ctx = contextlib.nullcontext() if sync else fwd.no_sync()
                    with ctx:
                        with autocast():
                            out_ = fwd(mb.input_ids, resets=mb.resets, return_state=False)
                        nll = lm_loss(out_.logits, mb.targets, mb.mask)
                        (nll * scale).backward()
                    loss_sum += nll.detach().double()
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
                if not (math.isfinite(g_loss) and math.isfinite(gn)):
                    what = "loss" if not math.isfinite(g_loss) else "gradient norm"
                    val = g_loss if what == "loss" else gn
                    keep = f"the last good checkpoint is {last_good}" if last_good else \
                        "no checkpoint had been written yet"
                    raise NonFiniteLoss(f"the {what} became {val} at step {step + 1}; stopped without saving "
                                        f"({keep}). Try a lower --lr or --grad-clip.")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                position += sampler.global_batch
                step_tokens = sampler.global_batch * cfg.seq_len
                tokens_seen += step_tokens
                win_tokens += step_tokens
                run_tokens += step_tokens
                rec = {"split": "train", "step": step, "loss": g_loss, "bpb": g_bpb, "lr": lr, "grad_norm": gn,
                       "tokens": tokens_seen}
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.time()
                    rec["tok_per_s"] = win_tokens / max(now - win_time, 1e-9)
                    rec["elapsed_s"] = elapsed_before + now - t_loop
                    win_tokens, win_time = 0, now
                    if metrics is not None:
                        metrics.write(rec)
                if bar is not None:
                    el = time.time() - t_loop
                    bar.set_postfix(loss=f"{g_loss:.3f}", bpb=f"{g_bpb:.3f}",
                                    tok_s=f"{run_tokens / max(el, 1e-9):,.0f}",
                                    refresh=False)
                    bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    last_eval = do_eval(step)
                    msg = f"step {step}: held-out {last_eval['bpb']:.3f} bits per byte"
                    if bar is not None:
                        bar.write(msg, file=sys.stderr)
                    else:
                        _log(info, msg)
                if step_callback is not None:
                    step_callback(step, rec)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save(step)
                # ranks agree through the all-reduced flag; alone, the local flag also counts (set by the callback)
                if float(flags[2]) > 0 or (not info.distributed and intr.requested):
                    stopped_reason = "interrupted"
                    break
                if stop_at is not None and step >= stop_at and step < cfg.steps:
                    stopped_reason = f"--stop-at {stop_at}"
                    break
    finally:
        if bar is not None:
            bar.close()
    elapsed = elapsed_before + time.time() - t_loop

    # ---- stop early (Ctrl-C / --stop-at): checkpoint and leave -------------------------------------------
    if stopped_reason is not None:
        path = save(step)
        if metrics is not None:
            metrics.close()
            plot_metrics(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
        _log(info, f"stopped at step {step} ({stopped_reason}); checkpoint {path}. Continue with: "
                   f"fastxlstm train --out {out} --resume")
        return {"run_dir": out, "steps": step, "stopped": stopped_reason, "checkpoint": path, "tokens": tokens_seen,
                "seconds": elapsed, "bpb_start": bpb_start}

    # ---- end: final evaluation, checkpoint, export, plot, sample -----------------------------------------
    r_end = do_eval(step)
    path = save(step)
    summary = {"run_dir": out, "steps": step, "tokens": tokens_seen, "seconds": elapsed, "checkpoint": path,
               "bpb_start": bpb_start, "bpb_end": r_end["bpb"], "loss_end": r_end["loss"],
               "parameters": n_params}
    if info.is_main:
        model_dir = os.path.join(out, "model")
        _export_final(model_dir, model_cfg, ckpt.load_checkpoint(path, load_optimizer=False)[0])
        tokenizer.save(model_dir)
        metrics.close()
        plot_metrics(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
        start_txt = f"{bpb_start:.3f}" if bpb_start is not None else "?"
        print(f"held-out bits per byte: {start_txt} at the start -> {r_end['bpb']:.3f} after {step} steps "
              f"({tokens_seen:,} tokens, {elapsed:.0f} s)", file=sys.stderr, flush=True)
        if cfg.sample_tokens > 0:
            from ..models.io import from_pretrained
            final = from_pretrained(model_dir, device=device)
            sample = sample_text(final, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed,
                                 temperature=0.8, top_k=None, top_p=0.95)
            with open(os.path.join(out, "sample.txt"), "w", encoding="utf-8") as f:
                f.write(sample)
            summary["sample"] = sample
            print(f"--- sample (prompt {cfg.sample_prompt!r}, temperature 0.8, top-p 0.95) ---", file=sys.stderr)
            print(sample, flush=True)
            print("---", file=sys.stderr)
        print(f"run directory: {out}  (try: fastxlstm generate --model {out} --prompt \"def \")",
              file=sys.stderr, flush=True)
        with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if k != "sample"}, f, indent=2)
    barrier(info)
    return summary


def _export_final(out: str, model_cfg, model_sd: Dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors of the final model at the top of the run directory (the
    from_pretrained layout), built from the gathered full state dict so that FSDP runs export the same way."""
    from ..models.presets import build_model
    with torch.device("meta"):
        m = build_model(model_cfg)
    m.load_state_dict(model_sd, assign=True, strict=True)
    m.save_pretrained(out)


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0, temperature: float = 0.8,
                top_k: Optional[int] = None, top_p: Optional[float] = None,
                stream: Optional[Callable[[str], None]] = None) -> str:
    """Prompt + a sampled continuation as text; ``stream`` receives each decoded piece as it is produced
    (multi-byte UTF-8 characters are held back until complete)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    dec = tokenizer.stream_decoder()
    pieces = [prompt]
    if stream is not None:
        stream(prompt)
    for tok in model.generate_stream(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     seed=seed):
        piece = dec.push(int(tok[0]))
        if piece:
            pieces.append(piece)
            if stream is not None:
                stream(piece)
    tail = dec.flush()
    if tail:
        pieces.append(tail)
        if stream is not None:
            stream(tail)
    return "".join(pieces)
