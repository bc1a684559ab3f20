"""Language modelling at equal parameters and equal tokens: ``fastxlstm repro lm [--quick]``.

Four models of (within ~1%) the same parameter count train on the same token windows in the same order with the
same optimizer and schedule, and are scored on the same held-out windows (validation loss in nats per token and
bits per byte, curves against tokens in one plot):

- xLSTM[1:0]: the paper's model, only mLSTM blocks (``XLSTMLM``);
- xLSTM[7:1]: the same stack with one sLSTM block per eight;
- xLSTM-7B architecture (``XLSTMLarge``) at the same width, its depth chosen to match the parameter count;
- Llama: transformers' ``LlamaForCausalLM`` (SDPA attention) at the same width and the 7B architecture's depth,
  its FFN width chosen to match the parameter count.

Full mode (one H200, at most ~5 minutes per model, ~20 for the four): width 512; xLSTM[1:0] and [7:1] with 16 blocks (26.0M
parameters), the 7B architecture with 8 blocks, the Llama with 8 layers (FFN 1408); 1,500 steps of 32 x 512 tokens
(24.6M tokens, about 0.8 epoch of the default corpus), AdamW (lr 2e-3, betas 0.9 / 0.95, weight decay 0.1 on
matrices), 100 warmup steps then cosine to 10%, gradient clipping at 1; bf16 autocast, every block compiled
(``compile_blocks``; the Llama's decoder layers likewise) and our chunked loss on CUDA. Each model run is capped at
5 minutes from its start (model build, first evaluation and compilation included; ``--time-budget-minutes``
overrides the total), so a process with two models stays under ~10 minutes. (At 3.75 minutes the xLSTM models
stopped at 86-96% of the schedule on an H200 shared with another process.)
The paper, for scale: at 350M parameters and 15B tokens of SlimPajama, perplexity 13.43 (xLSTM[1:0]) against
14.25 (Llama).

Data: the trainer's default corpus (this Python's standard library as bytes, its fixed held-out split), or
``--data PATH`` with ``--tokenizer`` as ``fastxlstm train`` reads them. Every model sees the windows as plain
token sequences (no ``resets`` at document boundaries: the Llama has none either). The pieces come from the
trainer: the window sampler (fastxlstm.data.loader), the learning-rate schedule (fastxlstm.train.optim), the
evaluation (fastxlstm.evaluation); the loop is this module's, because the trainer builds only fastxlstm models.

Two GPUs: run two processes with different ``--models`` and ``--device cuda:0`` / ``cuda:1`` into the same
``--out``; each rebuilds the combined table from every finished model when it ends (``--report-only`` too).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from . import _common as C

TASK = "lm"
HELP = "language modelling at equal parameters and tokens: xLSTM[1:0], [7:1], 7B arch., Llama"
MODELS = ("xlstm-1-0", "xlstm-7-1", "xlstm-7b", "llama")
LABELS = {"xlstm-1-0": "xLSTM[1:0]", "xlstm-7-1": "xLSTM[7:1]", "xlstm-7b": "xLSTM-7B arch.", "llama": "Llama"}
REFERENCE = "xlstm-1-0"   # the other models' parameter counts are matched to this one's


@dataclass
class Settings:
    width: int = 512
    blocks: int = 16           # xLSTM[1:0] and [7:1]
    heads: int = 4             # mLSTM / sLSTM heads (the paper's 4), and the 7B architecture's
    llama_heads: int = 8
    steps: int = 1500
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_windows: int = 128
    log_every: int = 25
    time_budget_minutes: Optional[float] = None   # None: minutes_per_run x the runs of this invocation
    minutes_per_run: float = 5.0
    compile: Optional[bool] = None   # None: on CUDA


FULL = Settings()
QUICK = Settings(width=64, blocks=4, heads=4, llama_heads=4, steps=80, batch_size=8, seq_len=128, lr=3e-3,
                 warmup=10, eval_every=40, eval_windows=16, log_every=10, minutes_per_run=5.0)


def add_args(p: argparse.ArgumentParser) -> None:
    C.add_common_args(p, TASK, MODELS, "0")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="training text as for 'fastxlstm train --data' (default: the standard-library corpus)")
    p.add_argument("--tokenizer", metavar="PATH", default="bytes",
                   help="'bytes' (default) or a tokenizer.json (or a directory holding one)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per window (default: 512)")
    p.add_argument("--width", type=int, default=None, metavar="N", help="model width (default: 512; --quick 64)")
    p.add_argument("--blocks", type=int, default=None, metavar="N",
                   help="blocks of xLSTM[1:0] and [7:1] (default: 16; --quick 4); the others are matched")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile block by block (default: on for CUDA, off elsewhere)")


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------

def model_configs(s: Settings, vocab: int, names: List[str]) -> Dict[str, Dict[str, Any]]:
    """name -> {"config", "params"}: xLSTM[1:0] / [7:1] at (width, blocks); the 7B architecture at the depth
    whose count is closest to xLSTM[1:0]'s; the Llama at that depth with its FFN width matched."""
    ref_cfg = C.xlstm_lm_config((1, 0), s.width, s.blocks, vocab, num_heads=s.heads, tie_weights=True)
    ref = C.meta_params(ref_cfg)
    out = {"xlstm-1-0": {"config": ref_cfg, "params": ref}}
    if "xlstm-7-1" in names:
        cfg = C.xlstm_lm_config((7, 1), s.width, s.blocks, vocab, num_heads=s.heads, slstm_num_heads=s.heads,
                                tie_weights=True)
        out["xlstm-7-1"] = {"config": cfg, "params": C.meta_params(cfg)}
    depth = max(1, s.blocks // 2)
    if "xlstm-7b" in names or "llama" in names:
        cands = [(abs(C.meta_params(C.large_config(s.width, d, vocab, num_heads=s.heads, tie=True)) - ref), d)
                 for d in range(1, s.blocks + 1)]
        depth = min(cands)[1]
        cfg = C.large_config(s.width, depth, vocab, num_heads=s.heads, tie=True)
        out["xlstm-7b"] = {"config": cfg, "params": C.meta_params(cfg)}
    if "llama" in names:
        cfg, n = C.llama_config_matched(ref, s.width, depth, s.llama_heads, vocab, max_positions=s.seq_len,
                                        tie=True, multiple_of=64 if s.width >= 256 else 8)
        out["llama"] = {"config": cfg, "params": n}
    for v in out.values():
        v["rel_to_reference"] = v["params"] / ref - 1.0
    return {n: out[n] for n in names}


class _EvalModel:
    """What fastxlstm.evaluation.evaluate_windows calls: ``model(ids, resets=..., return_state=False).logits``
    (resets are not passed on: no model gets them, see the module docstring)."""

    def __init__(self, wrap: C.ModelWrap):
        self.wrap = wrap

    @property
    def training(self) -> bool:
        return self.wrap.model.training

    def eval(self):
        self.wrap.model.eval()

    def train(self, mode: bool = True):
        self.wrap.model.train(mode)

    def __call__(self, ids, resets=None, return_state=False):
        return SimpleNamespace(logits=self.wrap.logits(ids))


# ----------------------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------------------

def settings_from(ns: argparse.Namespace) -> Settings:
    s = C.with_options(QUICK if ns.quick else FULL, ns, ("steps", "batch_size", "lr", "width", "blocks", "seq_len", "time_budget_minutes", "compile"))
    if s.width % s.heads or s.width % s.llama_heads:
        raise C.ExperimentError(f"--width {s.width} must be a multiple of {s.heads} and {s.llama_heads} (heads)")
    s.eval_every = min(s.eval_every, s.steps)
    return s


def _load_data(ns: argparse.Namespace):
    import os
    from ..data.corpus import load_corpus
    from ..data.tokenizers import resolve_tokenizer
    if ns.data is not None and not os.path.exists(ns.data):
        raise C.ExperimentError(f"--data {ns.data}: no such file or directory")
    tok = resolve_tokenizer(ns.tokenizer)
    corpus = load_corpus(ns.data, tok)
    return tok, corpus


def run(ns: argparse.Namespace) -> Dict[str, Any]:
    C.check_positive(ns, ("steps", "batch_size", "lr", "width", "blocks", "seq_len", "time_budget_minutes"))
    names = C.parse_models(ns.models, MODELS)
    out = C.resolve_out(ns.out, TASK, ns.report_only)
    rd = C.RunDir(out)
    if ns.report_only:
        return report(rd, print_table=True)
    s = settings_from(ns)
    seeds = C.parse_seeds(ns.seeds, (0,))
    if s.time_budget_minutes is None:
        s.time_budget_minutes = s.minutes_per_run * len(names) * len(seeds)
    device = C.pick_device(ns.device)
    precision = C.pick_precision(ns.precision, device)
    compile_ = s.compile if s.compile is not None else device.type == "cuda"
    tok, corpus = _load_data(ns)
    print(f"lm: data {corpus.description}", flush=True)
    specs = model_configs(s, tok.vocab_size, names)
    hw = C.hardware_info(device)
    C.write_json_atomic(f"{out}/config.{'-'.join(names)}.json",
                        {"task": TASK, "mode": "quick" if ns.quick else "full", "settings": asdict(s),
                         "models": names, "seeds": seeds, "precision": precision, "compile": compile_,
                         "data": corpus.description, "tokenizer": ns.tokenizer, "hardware": hw,
                         "params": {n: v["params"] for n, v in specs.items()}})
    C.write_json_atomic(f"{out}/config.json", {"task": TASK, "settings": asdict(s), "data": corpus.description,
                                               "tokenizer": ns.tokenizer, "precision": precision})
    deadline = C.Deadline(s.time_budget_minutes, len(names) * len(seeds))
    t_all = time.time()
    for name in names:
        metrics = rd.start_model(name)
        runs = []
        for seed in seeds:
            r = _train_one(name, specs[name], s, seed, tok, corpus, device, precision, compile_,
                           deadline.next_run(), metrics, ns.progress)
            runs.append(r)
            e = r["final"]
            print(f"lm {LABELS[name]} seed {seed}: validation loss {e['loss']:.4f}, {e['bpb']:.4f} bits per byte "
                  f"({r['tokens']:,} tokens, {r['train_seconds']:.0f} s, {r['tok_per_s']:,.0f} tokens/s"
                  f"{', cut by the time budget' if r['cut'] else ''})", flush=True)
        metrics.close()
        rd.finish_model(name, {"model": name, "label": LABELS[name], "params": specs[name]["params"],
                               "rel_to_reference": specs[name]["rel_to_reference"],
                               "config": specs[name]["config"].to_dict(), "runs": runs, "settings": asdict(s),
                               "precision": precision, "compile": compile_, "data": corpus.description,
                               "tokenizer": ns.tokenizer, "hardware": hw})
    results = report(rd, print_table=False)
    print(f"lm: {time.time() - t_all:.0f} s; results in {out}/results.md", flush=True)
    return results


def _train_one(name, spec, s: Settings, seed: int, tok, corpus, device, precision: str, compile_: bool,
               deadline: Optional[float], metrics, progress: bool) -> Dict[str, Any]:
    import numpy as np
    import torch
    from ..data.loader import WindowSampler, eval_windows
    from ..evaluation import evaluate_windows
    torch.manual_seed(seed)
    with torch.device(device):
        model = C.build_model(spec["config"])
    wrap = C.ModelWrap(model, "llama" if name == "llama" else "xlstm")
    if compile_:
        wrap.compile()
    wrap.fast_loss = device.type == "cuda"
    opt = C.make_optimizer(wrap, s.lr, s.weight_decay, device)
    lr_of = C.schedule(s.lr, s.steps, s.warmup)
    sampler = WindowSampler(corpus.train, s.seq_len, s.batch_size, 1, 1, 0, seed)
    ev_len = min(s.seq_len, len(corpus.eval) - 1)
    ev_starts = eval_windows(corpus.eval, ev_len, s.eval_windows)
    token_bytes = torch.from_numpy(np.asarray(tok.token_bytes(), dtype=np.float64))
    ev_model = _EvalModel(wrap)

    def evaluate(step, tokens):
        r = evaluate_windows(ev_model, corpus.eval, ev_starts, ev_len, token_bytes, s.batch_size, device,
                             autocast=lambda: C.autocast_for(precision, device))
        rec = {"split": "eval", "seed": seed, "step": step, "tokens": tokens, "loss": r["loss"], "bpb": r["bpb"],
               "perplexity": r["perplexity"]}
        metrics.write(rec)
        return rec

    compile_failed = None

    def fall_back(e: Exception) -> str:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"lm {name}: torch.compile failed ({msg}); running eager blocks instead", file=sys.stderr, flush=True)
        wrap.uncompile()
        opt.zero_grad(set_to_none=True)
        return msg

    try:
        first = evaluate(0, 0)
    except Exception as e:  # noqa: BLE001 - a compile failure at the first (compiled) call; anything else re-raises
        if not compile_:
            raise
        compile_failed = fall_back(e)
        first = evaluate(0, 0)
    curve = [first]
    wrap.train(True)
    bar = C.progress_bar(progress, s.steps, f"{LABELS[name]} seed {seed}")
    t0 = time.time()
    step = position = tokens = 0
    cut = False
    try:
        while step < s.steps:
            if deadline is not None and time.time() > deadline:
                cut = True
                break
            for g in opt.param_groups:
                g["lr"] = lr_of(step)
            micros, n_valid = sampler.step_batches(position)
            mb = micros[0].to(device)
            labels = mb.targets.masked_fill(~mb.mask, -100)
            try:
                with C.autocast_for(precision, device):
                    loss = wrap.loss_sum(mb.input_ids, labels) / max(n_valid, 1)
                loss.backward()
            except Exception as e:  # noqa: BLE001 - only a failure of torch.compile at the first step is caught
                if not (compile_ and step == 0 and not compile_failed):
                    raise
                compile_failed = fall_back(e)
                with C.autocast_for(precision, device):
                    loss = wrap.loss_sum(mb.input_ids, labels) / max(n_valid, 1)
                loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            position += sampler.global_batch
            tokens += sampler.global_batch * s.seq_len
            if step % s.log_every == 0 or step == s.steps:
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise RuntimeError(f"lm {name}: the loss became {lv} at step {step}; try a lower --lr")
                el = time.time() - t0
                metrics.write({"split": "train", "seed": seed, "step": step, "tokens": tokens, "loss": lv,
                               "grad_norm": float(gn), "lr": lr_of(step - 1), "elapsed_s": el,
                               "tok_per_s": tokens / max(el, 1e-9)})
                if bar is not None:
                    bar.set_postfix(loss=f"{lv:.3f}", tok_s=f"{tokens / max(el, 1e-9):,.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if step % s.eval_every == 0 and step < s.steps:
                curve.append(evaluate(step, tokens))
    finally:
        if bar is not None:
            bar.close()
    train_s = time.time() - t0
    final = evaluate(step, tokens)
    curve.append(final)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seed": seed, "steps": step, "tokens": tokens, "cut": cut, "train_seconds": round(train_s, 2),
            "compiled": compile_ and not compile_failed, "compile_error": compile_failed,
            "tok_per_s": tokens / max(train_s, 1e-9), "final": final, "curve": curve}


def report(rd: C.RunDir, print_table: bool = False) -> Dict[str, Any]:
    """Rebuild results.json, results.md, metrics.jsonl and lm.png from the finished models in ``rd``."""
    res = rd.model_results(MODELS)
    summary = {}
    rows = []
    for name, r in res.items():
        fin = [run["final"] for run in r["runs"]]
        summary[name] = {"loss": C.mean_std([f["loss"] for f in fin]), "bpb": C.mean_std([f["bpb"] for f in fin]),
                         "perplexity": C.mean_std([f["perplexity"] for f in fin])}
        run0 = r["runs"][0]
        cut = any(run["cut"] for run in r["runs"])
        rows.append([r["label"] + (" (cut)" if cut else ""), f"{r['params']:,}",
                     f"{100 * r['rel_to_reference']:+.1f}%", f"{run0['tokens']:,}",
                     C.fmt_pm([f["loss"] for f in fin], 4), C.fmt_pm([f["perplexity"] for f in fin], 3),
                     C.fmt_pm([f["bpb"] for f in fin], 4), f"{run0['tok_per_s']:,.0f}",
                     f"{run0['train_seconds']:.0f}"])
    hardware = []
    for r in res.values():
        if r.get("hardware") and r["hardware"] not in hardware:
            hardware.append(r["hardware"])
    first = next(iter(res.values()))
    results = {"task": TASK, "models": res, "summary": summary, "hardware": hardware, "data": first.get("data"),
               "tokenizer": first.get("tokenizer")}
    seeds = sorted({run["seed"] for r in res.values() for run in r["runs"]})
    header = ["model", "parameters", "vs xLSTM[1:0]", "tokens", "val. loss (nats/token)", "val. perplexity",
              "val. bits per byte", "train tokens/s", "train s"]
    md = (f"LM: validation loss, perplexity (per token) and bits per byte on the held-out split of "
          f"{first.get('data')} (tokenizer {first.get('tokenizer')}), after equal tokens; seeds "
          f"{', '.join(map(str, seeds))}.\n\n" + C.md_table(header, rows) + "\n" + C.footer(results))
    rd.write_report(results, md, res)
    _plot(rd.path, res)
    if print_table:
        print(md, end="")
    return results


def _plot(out: str, res: Dict[str, Any]) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, r in res.items():
        for run in r["runs"][:1]:
            xs = [c["tokens"] / 1e6 for c in run["curve"]]
            axes[0].plot(xs, [c["bpb"] for c in run["curve"]], "o-", ms=3, label=r["label"])
            axes[1].plot(xs, [c["loss"] for c in run["curve"]], "o-", ms=3, label=r["label"])
    for ax, what in zip(axes, ("validation bits per byte", "validation loss (nats/token)")):
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        # the first evaluation (untrained) dwarfs the rest: show from the second point on when there is one
        vals = [c["bpb" if ax is axes[0] else "loss"] for r in res.values() for c in r["runs"][0]["curve"][1:]]
        if vals:
            lo, hi = min(vals), max(vals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    fig.suptitle("language modelling at equal parameters and tokens")
    C.savefig(fig, f"{out}/lm.png")


def main(argv: Optional[List[str]] = None) -> int:
    import sys
    return C.run_main(sys.modules[__name__], argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
