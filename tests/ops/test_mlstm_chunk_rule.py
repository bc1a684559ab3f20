"""The Triton mLSTM path's chunk length: the tuned rule (auto_tiling), explicit values, the environment override."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oracles import require_oracle  # noqa: E402

require_oracle("triton")
from fastxlstm.ops._intmath import cdiv, next_pow2  # noqa: E402
from fastxlstm.ops.mlstm_forms.triton._chunkwise import CHUNK_ENV, auto_tiling, tiling_for  # noqa: E402


@pytest.mark.parametrize("BH,S,DQK,DV,expected", [
    (32, 2048, 128, 256, (64, None)),    # 7b-400m at 2k context, B=8: 128 state programs on 132 SMs
    (8, 8192, 128, 256, (128, 32)),      # B=2 at 8k: 32 programs -> longer chunks, narrower state tiles
    (4, 16384, 128, 256, (128, 32)),     # B=1 at 16k
    (32, 2048, 512, 512, (128, None)),   # 350m heads (512 / 512): 128 at any context
    (4, 16384, 512, 512, (128, None)),
    (1, 40, 128, 256, (64, 32)),         # never longer than the sequence (rounded up to a power of two) ...
    (1, 10, 128, 256, (64, 32)),         # ... nor below 64
])
def test_auto_tiling(BH, S, DQK, DV, expected):
    assert auto_tiling(BH, S, DQK, DV, n_sm=132) == expected


def test_with_state_tile_only_narrows():
    from fastxlstm.ops.mlstm_forms.triton._chunkwise import default_config, with_state_tile
    cfg = default_config(128, 256)  # state tiles 64 wide
    assert with_state_tile(cfg, 32).block_v_state == 32 and with_state_tile(cfg, None) is cfg
    small = default_config(16, 16)  # 16 wide already: a 32-wide tile would only be masked work
    assert with_state_tile(small, 32) is small


def test_state_tiles_by_head_size():
    """The state kernels' tiles (measured, see default_config): 128 x 64 (DQK x DV), large heads 64 x 128; never
    wider than the head."""
    from fastxlstm.ops.mlstm_forms.triton._chunkwise import default_config
    tiles = lambda DQK, DV: (lambda c: (c.block_k_state, c.block_v_state))(default_config(DQK, DV))  # noqa: E731
    assert tiles(128, 256) == (128, 64) and tiles(256, 128) == (128, 64)
    assert tiles(512, 512) == (64, 128) and tiles(256, 256) == (64, 128) and tiles(1024, 1024) == (64, 128)
    assert tiles(2048, 32) == (64, 32) and tiles(16, 16) == (16, 16)


def test_int_helpers():
    assert [next_pow2(x) for x in (1, 2, 3, 64, 65, 100)] == [1, 2, 4, 64, 128, 128]
    assert [cdiv(a, b) for a, b in ((5, 2), (4, 2), (1, 64), (0, 3))] == [3, 2, 1, 0]


def test_tiling_for_cpu_explicit_and_env(monkeypatch):
    q = torch.randn(1, 2, 300, 32)
    monkeypatch.delenv(CHUNK_ENV, raising=False)
    assert tiling_for(None, q, 32) == (64, None) and tiling_for(64, q, 32) == (64, None)  # no GPU: the default
    assert tiling_for(128, q, 32) == (128, None)  # explicit values as given
    monkeypatch.setenv(CHUNK_ENV, "32")
    assert tiling_for(None, q, 32) == (32, None) and tiling_for(128, q, 32) == (32, None)  # the override wins
    monkeypatch.setenv(CHUNK_ENV, "auto")
    assert tiling_for(128, q, 32) == (64, None)  # auto: the rule (on the CPU: 64)
    for bad in ("48", "fast", "0"):
        monkeypatch.setenv(CHUNK_ENV, bad)
        with pytest.raises(ValueError, match=CHUNK_ENV):
            tiling_for(None, q, 32)
