"""Named model configurations: the paper's xLSTM[a:b] sizes, the 7B, and small ones for tests and CPU demos.

    from fastxlstm.models.presets import get_preset, list_presets, build_model
    model = build_model("125m")                # or build_model(get_preset("small")), or any config object

Parameter counts (written next to each preset, checked in tests/models/test_presets.py by building each model
on the "meta" device) count tied weights once. The paper's models are named by their size with ONE vocab matrix
(GPT-3 convention), so the paper presets tie the embedding and the head: with untied weights each grows by
vocab_size * E (39M for 125M).

Block counts follow the paper's rule "twice the layers of the GPT-3 model of the same size" (an mLSTM block has no
separate MLP): 125M E=768 x 24, 350M E=1024 x 48, 760M E=1536 x 48, 1.3B E=2048 x 48, 2.7B E=2560 x 64. (The spec
lists 350M with 24 blocks; that gives 205M parameters, so we use 48.) sLSTM positions of the [7:1] variants are
the paper's where known ([3, 20] for 125M, [3, 5, 7, 40, 42, 44] for 1.3B, reused for the other 48-block models)
and ``slstm_positions`` otherwise.

The xLSTM-7B paper's scaling models (160M, 400M, 1.4B, besides the 7B) are the 7B architecture at smaller
sizes: ``7b-160m``, ``7b-400m``, ``7b-1.4b`` (E, depth and heads in their descriptions).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, Tuple, Union

from .xlstm_lm import XLSTMLMConfig, slstm_positions

__all__ = ["get_preset", "list_presets", "build_model", "PRESETS"]

_PAPER_VOCAB = 50304  # GPT-NeoX tokenizer, padded to a multiple of 64
_S48 = (3, 5, 7, 40, 42, 44)


def _paper(E: int, L: int, slstm_at=()) -> XLSTMLMConfig:
    return XLSTMLMConfig(vocab_size=_PAPER_VOCAB, embedding_dim=E, num_blocks=L, slstm_at=tuple(slstm_at),
                         num_heads=4, slstm_num_heads=4, tie_weights=True)


def _large(**kw):
    from .xlstm_large import XLSTMLargeConfig  # lazy: keeps this module light
    return XLSTMLargeConfig(**kw)


# name: (description, parameter count, config factory)
PRESETS: Dict[str, Tuple[str, int, Callable[[], Any]]] = {
    "tiny": ("tests: xLSTM[1:1], E=64, 2 blocks (mLSTM, sLSTM), byte vocab 256", 96_520,
             lambda: XLSTMLMConfig(vocab_size=256, embedding_dim=64, num_blocks=2, slstm_at=(1,), chunk_size=16)),
    "small": ("CPU demo: xLSTM[2:1], E=160, 6 blocks (sLSTM at 1, 4), byte vocab 256, tied", 1_063_232,
              lambda: XLSTMLMConfig(vocab_size=256, embedding_dim=160, num_blocks=6, slstm_at=(1, 4),
                                    chunk_size=64, tie_weights=True)),
    "125m": ("paper xLSTM[1:0] 125M: E=768, 24 mLSTM blocks, tied", 125_172_672, lambda: _paper(768, 24)),
    "125m-7-1": ("paper xLSTM[7:1] 125M: E=768, 24 blocks, sLSTM at [3, 20], tied", 125_057_456,
                 lambda: _paper(768, 24, (3, 20))),
    "350m": ("paper xLSTM[1:0] 350M: E=1024, 48 mLSTM blocks, tied", 357_778_816, lambda: _paper(1024, 48)),
    "350m-7-1": ("paper xLSTM[7:1] 350M: E=1024, 48 blocks, sLSTM at [3, 5, 7, 40, 42, 44], tied", 356_924_752,
                 lambda: _paper(1024, 48, _S48)),
    "760m": ("paper xLSTM[1:0] 760M: E=1536, 48 mLSTM blocks, tied", 763_160_448, lambda: _paper(1536, 48)),
    "760m-7-1": ("paper xLSTM[7:1] 760M: E=1536, 48 blocks, sLSTM at [3, 5, 7, 40, 42, 44], tied", 762_469_200,
                 lambda: _paper(1536, 48, _S48)),
    "1.3b": ("paper xLSTM[1:0] 1.3B: E=2048, 48 mLSTM blocks, tied", 1_319_537_024, lambda: _paper(2048, 48)),
    "1.3b-7-1": ("paper xLSTM[7:1] 1.3B: E=2048, 48 blocks, sLSTM at [3, 5, 7, 40, 42, 44], tied", 1_317_042_512,
                 lambda: _paper(2048, 48, _S48)),
    "2.7b": ("paper xLSTM[1:0] 2.7B: E=2560, 64 mLSTM blocks, tied", 2_659_617_792, lambda: _paper(2560, 64)),
    "2.7b-7-1": (f"paper xLSTM[7:1] 2.7B: E=2560, 64 blocks, sLSTM at {list(slstm_positions(64, (7, 1)))}, tied",
                 2_652_838_848,
                 lambda: _paper(2560, 64, slstm_positions(64, (7, 1)))),
    "7b": ("xLSTM-7B: E=4096, 8 heads, 32 post-up-projection mLSTM blocks, vocab 50304, untied",
           6_865_424_896, lambda: _large()),
    # the 7B architecture at the xLSTM-7B paper's scaling sizes (its Table 2); untied head, vocab 50304, 4 heads.
    # 400M: E=1024, 24 blocks, 4 heads (406.9M). 160M halves the depth and takes E=768 (162.3M); 1.4B doubles
    # the width of the 400M at the same depth (1.42B) and keeps 4 heads, so its head dims (256 / 512) are the 7B's
    "7b-160m": ("7B architecture at the paper's 160M size: E=768, 12 blocks, 4 heads, vocab 50304, untied",
                162_303_840, lambda: _large(hidden_size=768, num_hidden_layers=12, num_heads=4)),
    "7b-400m": ("7B architecture at the paper's 400M size: E=1024, 24 blocks, 4 heads, vocab 50304, untied",
                406_856_896, lambda: _large(hidden_size=1024, num_hidden_layers=24, num_heads=4)),
    "7b-1.4b": ("7B architecture at the paper's 1.4B size: E=2048, 24 blocks, 4 heads, vocab 50304, untied",
                1_420_839_104, lambda: _large(hidden_size=2048, num_hidden_layers=24, num_heads=4)),
    "7b-tiny": ("the 7B architecture at test size: E=64, 4 heads, 2 blocks, vocab 256", 140_752,
                lambda: _large(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=4, chunk_size=16,
                               pad_token_id=None, bos_token_id=None, eos_token_id=None)),
}


def get_preset(name: str):
    """A fresh config for preset ``name`` (an XLSTMLMConfig or XLSTMLargeConfig); see :func:`list_presets`."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name][2]()


def list_presets() -> Dict[str, Tuple[str, int]]:
    """name -> (description, parameter count with tied weights counted once)."""
    return {name: (desc, count) for name, (desc, count, _) in PRESETS.items()}


def build_model(config_or_name: Union[str, Any], **overrides):
    """Build the model for a preset name or a config object (the class comes from
    :data:`fastxlstm.models.registry.MODEL_REGISTRY`).

    ``overrides`` replace config fields (e.g. ``build_model("small", vocab_size=512)``); the result is validated.
    Parameters are allocated on the current default device (use ``with torch.device("meta"):`` to only count).
    """
    config = get_preset(config_or_name) if isinstance(config_or_name, str) else config_or_name
    if overrides:
        try:
            config = replace(config, **overrides)
        except TypeError as e:
            raise ValueError(f"bad override for {type(config).__name__}: {e}") from None
    from .registry import MODEL_REGISTRY, build_from_config
    if not isinstance(config, tuple(c for c, _ in MODEL_REGISTRY.values())):
        raise ValueError(f"build_model needs a preset name or a model config "
                         f"({', '.join(c.__name__ for c, _ in MODEL_REGISTRY.values())}), got "
                         f"{type(config).__name__}")
    return build_from_config(config)
