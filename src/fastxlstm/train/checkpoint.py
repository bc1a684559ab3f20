"""Training checkpoints: safetensors + JSON only (nothing is pickled or unpickled), written atomically.

Layout of ``<run>/checkpoints/step_<N>/``:

    model.safetensors       the full (unsharded) model state dict, keys = parameter names
    model_config.json       {"model_type": ..., "config": {...}} to rebuild the model
    optimizer.safetensors   "<param name>/<key>" for each optimizer state tensor (AdamW: step, exp_avg, exp_avg_sq)
    rng.safetensors         torch CPU / CUDA generator states and numpy's MT19937 key
    trainer_state.json      step, data position, optimizer hyper-parameters per group, Python RNG state,
                            tied-weight aliases, the training config, and the sha256 + size of every file above

The directory is assembled under a temporary name (every file fsynced) and put in place atomically by
:func:`fastxlstm._fileio.publish_dir` (the helper model checkpoints use), and old checkpoints are pruned by renaming
them away before deleting them, so a kill at any point leaves only complete ``step_<N>`` directories: the previous
set or the new one. Leftovers of a killed save are removed by the next save. The state is gathered
in full (torch.distributed.checkpoint.state_dict with full_state_dict=True), so a checkpoint resumes on any
number of processes, with or without FSDP.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .._fileio import (CheckpointError, clean_leftovers, interrupted_copies, make_temp_dir, publish_dir, read_json,
                       remove_dir, write_json, write_safetensors)
from ..models.io import shares_storage

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "capture_rng", "restore_rng", "verify_checkpoint"]

_STEP_RE = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1

# CheckpointError (imported above) is the one class for model and training checkpoints (fastxlstm._fileio)


# ----------------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------------

def capture_rng() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, json) holding the torch, CUDA, numpy and Python generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": _py_state_to_json(random.getstate())}
    return tensors, meta


def restore_rng(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], device=i)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().view(np.uint32), pos, has_gauss, cached))
    random.setstate(_py_state_from_json(meta["python"]))


def _py_state_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(obj):
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dedupe(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): store each once, record aliases."""
    out, aliases, seen = {}, {}, {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state entry {k} is a {type(t).__name__}, not a tensor")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.device.type != "meta" and t.numel() > 0 else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        t = t.detach()
        out[k] = t.clone(memory_format=torch.contiguous_format) if shares_storage(t) else t.contiguous()
    return out, aliases


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=1)


def _save_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    write_safetensors(path, {k: v.cpu() for k, v in tensors.items()})


# ----------------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------------

def gather_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter name. Collective under FSDP:
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def save_checkpoint(ckpt_root: str, step: int, model_sd: Dict[str, torch.Tensor], optim_sd: Optional[dict],
                    model_config: Dict[str, Any], trainer_state: Dict[str, Any], keep: int = 2) -> str:
    """Write ``<ckpt_root>/step_<step>`` atomically (rank 0 only) and prune to the ``keep`` newest.

    model_sd / optim_sd: full state dicts from :func:`gather_state`. trainer_state: JSON-able extras (step,
    position, config, ...). Returns the checkpoint directory."""
    os.makedirs(ckpt_root, exist_ok=True)
    clean_leftovers(ckpt_root)  # of saves that were killed
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = make_temp_dir(final)
    try:
        tensors, aliases = _dedupe(model_sd)
        _save_tensors(os.path.join(tmp, "model.safetensors"), tensors)
        _write_json(os.path.join(tmp, "model_config.json"), model_config)
        groups = []
        if optim_sd is not None:
            opt_tensors, opt_scalars = {}, {}
            for pname, st in optim_sd["state"].items():
                for key, val in st.items():
                    if isinstance(val, torch.Tensor):
                        opt_tensors[f"{pname}/{key}"] = val.detach().contiguous()
                    else:
                        opt_scalars[f"{pname}/{key}"] = val
            _save_tensors(os.path.join(tmp, "optimizer.safetensors"), opt_tensors)
            for g in optim_sd["param_groups"]:
                groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
        else:
            opt_scalars = {}
        rng_t, rng_meta = capture_rng()
        _save_tensors(os.path.join(tmp, "rng.safetensors"), rng_t)
        files = {}
        for fn in sorted(os.listdir(tmp)):
            p = os.path.join(tmp, fn)
            files[fn] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
        state = dict(trainer_state)
        state.update({"format_version": FORMAT_VERSION, "step": step, "aliases": aliases,
                      "optimizer_param_groups": groups, "optimizer_scalars": opt_scalars,
                      "has_optimizer": optim_sd is not None, "rng": rng_meta, "files": files})
        _write_json(os.path.join(tmp, "trainer_state.json"), state)
        publish_dir(tmp, final)
    except BaseException:
        remove_dir(tmp)
        raise
    for old_step, path in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        remove_dir(path)  # renamed away first: never a half-deleted step_<N>
    return final


# ----------------------------------------------------------------------------------------------------------
# find / load
# ----------------------------------------------------------------------------------------------------------

def list_checkpoints(ckpt_root: str) -> List[Tuple[int, str]]:
    """[(step, path)] of the finished checkpoints under ckpt_root, oldest first (temporary dirs ignored). A
    checkpoint whose save was killed between the two renames of the fallback path (file systems without an atomic
    exchange) is listed at its complete copy beside the missing ``step_<N>``; the next save puts it back."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for fn in os.listdir(ckpt_root):
        m = _STEP_RE.match(fn)
        if m and os.path.isdir(os.path.join(ckpt_root, fn)):
            out.append((int(m.group(1)), os.path.join(ckpt_root, fn)))
    for fn, copy in interrupted_copies(ckpt_root).items():
        m = _STEP_RE.match(fn)
        if m:
            out.append((int(m.group(1)), copy))
    return sorted(out)


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    cks = list_checkpoints(ckpt_root)
    return cks[-1][1] if cks else None


def verify_checkpoint(path: str) -> Dict[str, Any]:
    """Read trainer_state.json and check every file's size and sha256; returns the trainer state."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    state = read_json(os.path.join(path, "trainer_state.json"), "trainer_state.json")
    if not isinstance(state, dict) or "files" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is corrupt: trainer_state.json lacks 'files'/'step'")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('format_version')}, "
                              f"this fastxlstm reads {FORMAT_VERSION}")
    for fn, info in state["files"].items():
        p = os.path.join(path, fn)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {path} is incomplete: {fn} is missing")
        size = os.path.getsize(p)
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {fn} has {size} bytes, expected {info['bytes']} "
                                  f"(truncated or overwritten); delete this checkpoint to resume from an older one")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {fn} fails its sha256 check; delete this "
                                  f"checkpoint to resume from an older one")
    return state


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"checkpoint file {path} is corrupt: {e}") from None


def load_checkpoint(path: str, load_optimizer: bool = True):
    """Read a checkpoint directory (verified first).

    Returns (model_sd, optim_sd or None, rng (tensors, meta), trainer_state, model_config)."""
    state = verify_checkpoint(path)
    model_config = read_json(os.path.join(path, "model_config.json"), "model_config.json")
    model_sd = _load_tensors(os.path.join(path, "model.safetensors"))
    for alias, target in state.get("aliases", {}).items():
        if target not in model_sd:
            raise CheckpointError(f"checkpoint {path} is corrupt: alias {alias} -> missing {target}")
        model_sd[alias] = model_sd[target]
    optim_sd = None
    if load_optimizer and state.get("has_optimizer"):
        flat = _load_tensors(os.path.join(path, "optimizer.safetensors"))
        per_param: Dict[str, Dict[str, Any]] = {}
        for key, val in flat.items():
            pname, _, field = key.rpartition("/")
            per_param.setdefault(pname, {})[field] = val
        for key, val in state.get("optimizer_scalars", {}).items():
            pname, _, field = key.rpartition("/")
            per_param.setdefault(pname, {})[field] = val
        groups = []
        for g in state["optimizer_param_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        optim_sd = {"state": per_param, "param_groups": groups}
    rng_t = _load_tensors(os.path.join(path, "rng.safetensors"))
    return model_sd, optim_sd, (rng_t, state["rng"]), state, model_config


def apply_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], model_sd, optim_sd) -> None:
    """Load full state dicts into a (possibly DDP- or FSDP-wrapped) model and its optimizer; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict
    opts = StateDictOptions(full_state_dict=True, strict=True)
    try:
        if optimizer is None or optim_sd is None:
            set_model_state_dict(model, model_sd, options=opts)
        else:
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
    except (RuntimeError, KeyError, ValueError) as e:
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint does not fit this model/optimizer: {msg[0] if msg else e}") from None
