"""Checkpoints: config.json + safetensors weights, written atomically, loaded without unpickling.

Layout (the transformers layout, so that 7B-architecture directories are interchangeable with
``xLSTMForCausalLM.save_pretrained``):

    dir/config.json                         the config; "model_type" picks the class ("xlstm" 7B, "xlstm_lm" paper)
    dir/model.safetensors                   all weights, or, above max_shard_size:
    dir/model-00001-of-0000N.safetensors    shards, and
    dir/model.safetensors.index.json        {"metadata": {"total_size": bytes}, "weight_map": {key: shard file}}

Atomicity (:mod:`fastxlstm._fileio` has the details): everything is written into a temporary sibling directory
``.NAME.tmp-<pid>-<random>`` (every file fsynced, mode 0666 less the umask), which then takes the target's place.
Over an existing checkpoint the two directories trade names in one atomic step (Linux ``renameat2`` with
RENAME_EXCHANGE, macOS ``renamex_np``), so at every instant ``dir`` holds a complete checkpoint, old or new, even if
the process is killed. Where the file system cannot exchange, the old one is renamed aside first; a kill between
the two renames leaves both complete copies beside the target, which :func:`from_pretrained` still reads (with a
warning) and the next save puts back in place. Leftovers of killed saves are removed by the next save to the same
directory. Files in an existing target that are not part of a checkpoint (a tokenizer, a README) are carried over.

7B-architecture models are written in transformers' format; one whose q/k/v head sizes transformers derives
differently (see :func:`fastxlstm.models.xlstm_large_format.transformers_head_dim_mismatch`) is saved with a
:class:`~fastxlstm.models.xlstm_large_format.TransformersCompatibilityWarning`: fastxlstm reads it, transformers
could not run it.

Loading validates everything before a model is returned: bad JSON, unknown model_type, missing/truncated/foreign
shard files, missing/unexpected/wrongly shaped keys all raise :class:`CheckpointError` (a ValueError) naming the
file. The model is built on the meta device and receives the loaded tensors, so nothing half-initialised escapes.
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import replace
from typing import Dict, List, Optional, Tuple, Union

import torch

from .._fileio import (CheckpointError, clean_leftovers, make_temp_dir, publish_dir, read_json, readable_dir,
                       write_json, write_safetensors)
from .registry import MODEL_REGISTRY, classes_for

__all__ = ["save_pretrained", "from_pretrained", "CheckpointError", "parse_size", "CONFIG_NAME", "WEIGHTS_NAME",
           "WEIGHTS_INDEX_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")

# model_type -> (module, model class name), kept for callers of this old table; the classes come from
# models/registry.py
MODEL_TYPES = {mt: (model_cls.__module__, model_cls.__name__) for mt, (_, model_cls) in MODEL_REGISTRY.items()}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "2GB", "500MB", "10KB" (powers of 10) or "1GiB" (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    if not isinstance(size, str):
        raise ValueError(f"max_shard_size must be an int or a string like '2GB', got {size!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse max_shard_size {size!r} (use e.g. '2GB', '500MB', '1GiB' or an int)")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
            "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    out = int(num * mult)
    if out < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return out


# ----------------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------------

def _config_dict(model) -> dict:
    from .. import __version__
    config = model.config
    if config.model_type == "xlstm":
        from .xlstm_large_format import TransformersCompatibilityWarning, config_to_transformers_dict
        from .xlstm_large_format import transformers_head_dim_mismatch
        problem = transformers_head_dim_mismatch(config)
        if problem is not None:
            warnings.warn(f"this model is saved in transformers' format and fastxlstm reads it back, but {problem}",
                          TransformersCompatibilityWarning, stacklevel=4)
        return config_to_transformers_dict(config)
    d = dict(config.to_dict())
    d["model_type"] = config.model_type
    d["fastxlstm_version"] = __version__
    return d


def shares_storage(t: torch.Tensor) -> bool:
    """Whether t covers less than its whole storage (a view of a larger tensor, e.g. a packed layer's row block:
    see fastxlstm.layers._packing); safetensors refuses such tensors, so the writers copy them. False on meta."""
    return t.device.type != "meta" and t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _state_tensors(model) -> Dict[str, torch.Tensor]:
    """Every state-dict key with its own contiguous CPU tensor (tied weights are written as equal copies, as
    transformers does for the 7B; safetensors refuses shared storage)."""
    out = {}
    seen = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"parameter {key} is on the meta device; load weights before saving")
        t = t.to("cpu")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        # a view into a larger storage (a packed layer's row block, see fastxlstm.layers._packing) is written from
        # its own copy: safetensors refuses tensors that share storage (some versions even without overlap)
        if ptr in seen or not t.is_contiguous() or shares_storage(t):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[key] = t
    return out


def _shard(tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _is_checkpoint_file(name: str) -> bool:
    return name in (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or bool(_SHARD_RE.match(name))


def save_pretrained(model, save_directory: Union[str, os.PathLike], max_shard_size: Union[int, str] = "2GB") -> None:
    """Write ``model`` (an XLSTMModelBase) to ``save_directory`` atomically (see the module docstring).

    Weights go to model.safetensors, or to shards of at most ``max_shard_size`` (a single tensor larger than the
    limit gets a shard of its own) with model.safetensors.index.json.
    """
    if not hasattr(model, "config") or not hasattr(model.config, "model_type"):
        raise ValueError(f"save_pretrained needs a fastxlstm model with a config, got {type(model).__name__}")
    max_bytes = parse_size(max_shard_size)
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.islink(target):
        target = os.path.realpath(target)  # write where the link points; the link stays
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"save_directory {target} exists and is not a directory")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(parent, os.path.basename(target))  # of saves to this directory that were killed
    config = _config_dict(model)
    tensors = _state_tensors(model)
    if config.get("model_type") == "xlstm":
        # exactly transformers' key set: its out_norm has no bias (a zero bias is the same function)
        bias = tensors.get("backbone.out_norm.bias")
        if bias is not None:
            if bool((bias == 0).all()):
                del tensors["backbone.out_norm.bias"]
            else:
                warnings.warn("backbone.out_norm.bias is nonzero: fastxlstm loads this checkpoint, but "
                              "transformers' xLSTMForCausalLM (whose out_norm has no bias) would ignore it",
                              stacklevel=3)
    shards = _shard(tensors, max_bytes)

    tmp = make_temp_dir(target)
    try:
        meta = {"format": "pt"}
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, WEIGHTS_NAME), shards[0], metadata=meta)
        else:
            n = len(shards)
            weight_map = {}
            for idx, shard in enumerate(shards, 1):
                name = f"model-{idx:05d}-of-{n:05d}.safetensors"
                write_safetensors(os.path.join(tmp, name), shard, metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(os.path.join(tmp, WEIGHTS_INDEX_NAME),
                       {"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)
        write_json(os.path.join(tmp, CONFIG_NAME), config, sort_keys=True)
        if os.path.isdir(target):
            # keep what is not ours (tokenizer files, notes); drop the old weights and config
            for name in os.listdir(target):
                if not _is_checkpoint_file(name):
                    src = os.path.join(target, name)
                    dst = os.path.join(tmp, name)
                    if os.path.isdir(src):
                        shutil.copytree(src, dst, symlinks=True)
                    else:
                        shutil.copy2(src, dst, follow_symlinks=False)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------

def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing weights file")
    size = os.path.getsize(path)
    try:
        out = {}
        with safe_open(path, framework="pt", device="cpu") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"{path}: not a valid safetensors file ({size} bytes): {exc}") from None
    return out


def _read_weights(directory: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors and, for each key, the file it came from (for error messages)."""
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(index_path):
        index = read_json(index_path, "shard index")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
            raise CheckpointError(f"{index_path}: expected a JSON object with a non-empty 'weight_map'")
        weight_map = index["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index_path}: shard name {name!r} must be a .safetensors file name in "
                                      f"the same directory")
        tensors: Dict[str, torch.Tensor] = {}
        origin: Dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            shard = _load_safetensors(path)
            listed = {k for k, v in weight_map.items() if v == name}
            if set(shard) != listed:
                extra = sorted(set(shard) - listed)[:5]
                absent = sorted(listed - set(shard))[:5]
                raise CheckpointError(f"{path}: keys disagree with {WEIGHTS_INDEX_NAME} (in the file but not the "
                                      f"index: {extra}; in the index but not the file: {absent})")
            for k, t in shard.items():
                tensors[k] = t
                origin[k] = path
        return tensors, origin
    if os.path.exists(single):
        tensors = _load_safetensors(single)
        return tensors, {k: single for k in tensors}
    pickles = [n for n in _PICKLE_NAMES if os.path.exists(os.path.join(directory, n))]
    if pickles:
        raise CheckpointError(f"{directory}: only pickle weights ({pickles}) found; fastxlstm never unpickles. "
                              f"Convert them to safetensors with a trusted tool first")
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def _build_config(cfg: dict, config_path: str):
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    mt = cfg.get("model_type")
    try:
        _, model_cls = classes_for(mt)
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    cls_name = model_cls.__name__
    try:
        if mt == "xlstm":
            from .xlstm_large_format import config_from_transformers_dict
            config = config_from_transformers_dict(cfg)
        else:
            d = {k: v for k, v in cfg.items() if k not in ("fastxlstm_version",)}
            config = model_cls.config_class.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: invalid {cls_name} config: {exc}") from None
    return model_cls, config


def _aliases(model) -> Dict[str, str]:
    """{alias key: canonical key} for state-dict entries that are the same tensor (tied weights)."""
    first: Dict[int, str] = {}
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        ident = id(t)
        if ident in first:
            out[key] = first[ident]
        else:
            first[ident] = key
    return out


def _set_tensor(model, key: str, value: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad if old is not None
                                                   else True)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:  # pragma: no cover - state_dict keys are parameters or buffers
        raise CheckpointError(f"cannot place key {key}")


def _build_model(model_cls, config):
    """The model on the meta device (no init cost) when all its tensors are in the state dict; else on CPU."""
    with torch.device("meta"):
        model = model_cls(config)
    persistent = set(model.state_dict().keys())
    if any(name not in persistent for name, _ in model.named_buffers()):
        model = model_cls(config)  # non-persistent buffers must be computed by __init__
    return model


def from_pretrained(directory: Union[str, os.PathLike], device=None, dtype: Optional[torch.dtype] = None):
    """Load a model from a directory written by :func:`save_pretrained` or by transformers'
    ``xLSTMForCausalLM.save_pretrained`` (single file or sharded).

    device: where the model goes (default CPU); dtype: cast floating weights (default: as stored).
    Raises CheckpointError (a ValueError) naming the offending file for any malformed checkpoint.
    """
    directory = readable_dir(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    config_path = os.path.join(directory, CONFIG_NAME)
    model_cls, config = _build_config(read_json(config_path, "model config"), config_path)
    tensors, origin = _read_weights(directory)
    if config.model_type == "xlstm":
        from .xlstm_large_format import fill_transformers_gaps
        before = set(tensors)
        fill_transformers_gaps(config, tensors)
        origin.update({k: f"{directory} (filled in: transformers has no such tensor)" for k in set(tensors) - before})

    model = _build_model(model_cls, config)
    aliases = _aliases(model)
    if aliases and getattr(config, "tie_word_embeddings", False) and config.model_type == "xlstm":
        # transformers never ties xLSTM weights, so its tied-config checkpoints hold two different matrices: the
        # function it computes is the untied one
        for alias, canon in aliases.items():
            if alias in tensors and canon in tensors and not torch.equal(tensors[alias], tensors[canon]):
                warnings.warn(f"{origin[alias]}: {alias} differs from {canon} although tie_word_embeddings=True "
                              f"(transformers does not tie xLSTM weights); loading them untied", stacklevel=2)
                config = replace(config, tie_word_embeddings=False)
                model = _build_model(model_cls, config)
                aliases = _aliases(model)
                break
    expected = model.state_dict()
    canonical = {k: v for k, v in expected.items() if k not in aliases}
    missing = sorted(k for k in canonical if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    where = ", ".join(sorted(set(origin.values())))
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match a {model_cls.__name__} of {config_path} "
                              f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: "
                              f"{unexpected[:5]})")
    for key, ref in expected.items():
        if key not in tensors:
            continue
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{origin[key]}: {key} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{origin[key]}: {key} has dtype {t.dtype}, expected a "
                                  f"{'floating' if ref.is_floating_point() else 'non-floating'} tensor")
    for alias, canon in aliases.items():
        if alias in tensors and not torch.equal(tensors[alias].to(tensors[canon].dtype), tensors[canon]):
            raise CheckpointError(f"{origin[alias]}: {alias} must equal {canon} (they are tied in this model)")
    for key in canonical:
        t = tensors[key]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        _set_tensor(model, key, t)
    # re-tie: point every alias at its canonical tensor
    for alias, canon in aliases.items():
        mod_name, _, attr = alias.rpartition(".")
        cmod_name, _, cattr = canon.rpartition(".")
        cmod = model.get_submodule(cmod_name) if cmod_name else model
        mod = model.get_submodule(mod_name) if mod_name else model
        if cattr in cmod._parameters:
            mod._parameters[attr] = cmod._parameters[cattr]
        else:
            mod._buffers[attr] = cmod._buffers[cattr]
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:  # pragma: no cover - guarded by the key checks above
        raise CheckpointError(f"{directory}: tensors left uninitialised: {leftover[:5]}")
    if device is not None:
        model = model.to(device)
    return model.eval()
