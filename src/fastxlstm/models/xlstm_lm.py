"""The paper's xLSTM[a:b] language model (Beck et al., NeurIPS 2024; docs/MATH.md section 3).

    token ids -> embedding -> blocks (mLSTM, or sLSTM at ``slstm_at``) -> LayerNorm -> lm_head -> float32 logits

Residual pre-LayerNorm blocks, no positional encoding. The recurrent state (one ``MLSTMBlockState`` or
``SLSTMBlockState`` per block, conv windows included) flows out of every forward and back in on the next call, so
the same forward serves training (no state), prefill and token-by-token decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..layers.mlstm import MLSTMBlock, round_up, small_init_
from ..layers.norm import LayerNorm
from ..layers.slstm import SLSTMBlock
from ._config import ConfigDictMixin, is_int, is_num
from .base import XLSTMModelBase, check_logits_to_keep
from .output import CausalLMOutput
from ..layers.state import XLSTMState

__all__ = ["XLSTMLMConfig", "XLSTMLM", "slstm_positions"]

_MLSTM_BACKENDS = ("auto", "reference", "parallel", "chunkwise", "recurrent", "triton")
_SLSTM_BACKENDS = ("auto", "reference", "recurrent", "triton")


def slstm_positions(num_blocks: int, ratio: Tuple[int, int] = (7, 1)) -> Tuple[int, ...]:
    """Block indices of the sLSTM blocks of an xLSTM[a:b] stack (a mLSTM : b sLSTM), spread evenly.

    round(num_blocks * b / (a + b)) sLSTM blocks, the j-th at the middle of the j-th equal slice of the stack.
    ``(1, 0)`` gives no sLSTM block, ``(0, 1)`` only sLSTM blocks. The paper's released positions (e.g. [3, 20]
    for 125M, [3, 5, 7, 40, 42, 44] for 1.3B) are hand-picked; the presets use those where the spec gives them.
    """
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    if (not isinstance(ratio, (tuple, list)) or len(ratio) != 2
            or any(not isinstance(r, int) or r < 0 for r in ratio) or sum(ratio) == 0):
        raise ValueError(f"ratio must be two non-negative ints (a, b), not both 0, got {ratio!r}")
    a, b = ratio
    n = int(round(num_blocks * b / (a + b)))
    if n == 0:
        return ()
    if n >= num_blocks:
        return tuple(range(num_blocks))
    return tuple(sorted({int((j + 0.5) * num_blocks / n) for j in range(n)}))


@dataclass
class XLSTMLMConfig(ConfigDictMixin):
    """Config of the paper's xLSTM[a:b] LM. Validated on construction; ``to_dict``/``from_dict`` for JSON.

    Derived: mLSTM inner width I = round_up(mlstm_proj_factor * E, round_to), head dim I / num_heads; sLSTM head
    dim E / slstm_num_heads; sLSTM-block FFN width round_up(ffn_proj_factor * E, round_to).
    """

    model_type: ClassVar[str] = "xlstm_lm"

    vocab_size: int = 50304
    embedding_dim: int = 768
    num_blocks: int = 24
    slstm_at: Tuple[int, ...] = ()
    num_heads: int = 4                 # mLSTM heads
    slstm_num_heads: int = 4
    mlstm_proj_factor: float = 2.0
    round_to: int = 64
    conv_kernel_size: int = 4          # mLSTM causal conv
    slstm_conv_kernel_size: int = 4    # sLSTM causal conv (0: none)
    qkv_proj_blocksize: int = 4
    ffn_proj_factor: float = 1.3
    bias: bool = False
    tie_weights: bool = False
    ln_eps: float = 1e-5               # block pre-norms and the final norm
    group_norm_eps: float = 1e-5       # per-head GroupNorm after each cell
    cell_eps: float = 1e-6             # mLSTM normaliser eps
    chunk_size: int = 64
    mlstm_backend: str = "auto"
    slstm_backend: str = "auto"
    weight_decay_on_embedding: bool = False

    def __post_init__(self):
        if isinstance(self.slstm_at, list):
            self.slstm_at = tuple(self.slstm_at)
        for name in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "slstm_num_heads", "round_to",
                     "qkv_proj_blocksize", "chunk_size", "conv_kernel_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"XLSTMLMConfig.{name} must be a positive int, got {v!r}")
        if not is_int(self.slstm_conv_kernel_size) or self.slstm_conv_kernel_size < 0:
            raise ValueError(f"XLSTMLMConfig.slstm_conv_kernel_size must be an int >= 0, "
                             f"got {self.slstm_conv_kernel_size!r}")
        for name in ("mlstm_proj_factor", "ffn_proj_factor"):
            v = getattr(self, name)
            if not is_num(v) or v <= 0:
                raise ValueError(f"XLSTMLMConfig.{name} must be a positive number, got {v!r}")
        for name in ("ln_eps", "group_norm_eps", "cell_eps"):
            v = getattr(self, name)
            if not is_num(v) or v < 0:
                raise ValueError(f"XLSTMLMConfig.{name} must be a non-negative number, got {v!r}")
        for name in ("bias", "tie_weights", "weight_decay_on_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"XLSTMLMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.slstm_at, tuple) or any(not is_int(i) for i in self.slstm_at):
            raise ValueError(f"XLSTMLMConfig.slstm_at must be a list of block indices, got {self.slstm_at!r}")
        if any(not 0 <= i < self.num_blocks for i in self.slstm_at):
            raise ValueError(f"XLSTMLMConfig.slstm_at {list(self.slstm_at)} has indices outside "
                             f"[0, num_blocks={self.num_blocks})")
        if len(set(self.slstm_at)) != len(self.slstm_at):
            raise ValueError(f"XLSTMLMConfig.slstm_at {list(self.slstm_at)} has duplicates")
        self.slstm_at = tuple(sorted(self.slstm_at))
        if self.mlstm_backend not in _MLSTM_BACKENDS:
            raise ValueError(f"XLSTMLMConfig.mlstm_backend must be one of {_MLSTM_BACKENDS}, "
                             f"got {self.mlstm_backend!r}")
        if self.slstm_backend not in _SLSTM_BACKENDS:
            raise ValueError(f"XLSTMLMConfig.slstm_backend must be one of {_SLSTM_BACKENDS}, "
                             f"got {self.slstm_backend!r}")
        if self.num_mlstm_blocks:
            I = self.inner_dim
            if I % self.num_heads:
                raise ValueError(f"mLSTM inner dim {I} = round_up({self.mlstm_proj_factor} * {self.embedding_dim}, "
                                 f"{self.round_to}) is not divisible by num_heads={self.num_heads}")
            if I % self.qkv_proj_blocksize:
                raise ValueError(f"mLSTM inner dim {I} is not divisible by qkv_proj_blocksize="
                                 f"{self.qkv_proj_blocksize}")
        if self.slstm_at and self.embedding_dim % self.slstm_num_heads:
            raise ValueError(f"embedding_dim={self.embedding_dim} is not divisible by "
                             f"slstm_num_heads={self.slstm_num_heads}")

    # derived sizes ------------------------------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        return round_up(self.mlstm_proj_factor * self.embedding_dim, self.round_to)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.ffn_proj_factor * self.embedding_dim, self.round_to)

    @property
    def num_mlstm_blocks(self) -> int:
        return self.num_blocks - len(self.slstm_at)

    @property
    def block_types(self) -> List[str]:
        """"m" or "s" for each block."""
        s = set(self.slstm_at)
        return ["s" if i in s else "m" for i in range(self.num_blocks)]

    # to_dict / from_dict come from ConfigDictMixin (slstm_at is written as a list)


class XLSTMLM(XLSTMModelBase):
    """The xLSTM[a:b] LM.

    forward(input_ids (B, S) int, state=None, resets=None (B, S) bool, return_state=True) -> CausalLMOutput with
    float32 logits (B, S, vocab_size) and the XLSTMState after the last token. A one-token call with a state
    takes the mLSTM step form; longer inputs the sequence form (``config.mlstm_backend``, chunkwise on CPU).
    """

    config_class = XLSTMLMConfig

    def __init__(self, config: XLSTMLMConfig):
        super().__init__()
        if not isinstance(config, XLSTMLMConfig):
            raise ValueError(f"XLSTMLM needs an XLSTMLMConfig, got {type(config).__name__}")
        self.config = c = config
        E, L = c.embedding_dim, c.num_blocks
        self.token_embedding = nn.Embedding(c.vocab_size, E)
        blocks = []
        for idx, kind in enumerate(c.block_types):
            if kind == "m":
                blocks.append(MLSTMBlock(E, ln_eps=c.ln_eps, num_heads=c.num_heads, proj_factor=c.mlstm_proj_factor,
                                         round_to=c.round_to, conv_kernel_size=c.conv_kernel_size,
                                         qkv_proj_blocksize=c.qkv_proj_blocksize, bias=c.bias,
                                         norm_eps=c.group_norm_eps, cell_eps=c.cell_eps, num_blocks=L))
            else:
                blocks.append(SLSTMBlock(E, num_heads=c.slstm_num_heads, conv_kernel_size=c.slstm_conv_kernel_size,
                                         norm_eps=c.group_norm_eps, ln_eps=c.ln_eps,
                                         ffn_proj_factor=c.ffn_proj_factor, ffn_round_to=c.round_to,
                                         block_index=idx, num_blocks=L, bias=c.bias))
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = LayerNorm(E, eps=c.ln_eps, bias=False)
        self.lm_head = nn.Linear(E, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.token_embedding.weight
        self.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: small init for the embedding, head and input-side projections, wang init for the
        down-projections, gate biases as the spec, zero recurrent weights, norms 1."""
        E = self.config.embedding_dim
        small_init_(self.token_embedding.weight, E)
        if not self.config.tie_weights:
            small_init_(self.lm_head.weight, E)
        for blk in self.blocks:
            blk.reset_parameters()
        nn.init.ones_(self.out_norm.weight)

    def optim_groups(self, weight_decay: float) -> List[Dict[str, Any]]:
        """AdamW parameter groups: decay on weight matrices and conv filters only (not norms, biases, skip
        vectors, recurrent kernels; the embedding only with ``config.weight_decay_on_embedding``), as the
        official package groups them."""
        decay, no_decay, seen = [], [], set()
        emb = self.token_embedding.weight
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_matrix = p.ndim >= 2 and "recurrent_kernel" not in name and not name.endswith("bias")
            if p is emb:
                is_matrix = self.config.weight_decay_on_embedding
            (decay if is_matrix else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def init_state(self, batch_size: int, device=None, dtype=None) -> XLSTMState:
        """A fresh (zero) state: cell states in float32 (float64 for a float64 model), conv windows in the model
        dtype (or ``dtype``)."""
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        return XLSTMState(tuple(blk.init_state(batch_size, device=device, dtype=dtype) for blk in self.blocks))

    def forward(self, input_ids, state: Optional[XLSTMState] = None, resets: Optional[torch.Tensor] = None,
                return_state: bool = True, logits_to_keep: int = 0, labels: Optional[torch.Tensor] = None,
                loss_reduction: str = "mean") -> CausalLMOutput:
        """input_ids (B, S) int in [0, vocab_size); state from a previous call (or None); resets (B, S) bool,
        True at t clears the state (cells and conv windows) before token t. Returns float32 logits (B, S, V) (only
        the last ``logits_to_keep`` positions when it is > 0: (B, logits_to_keep, V), e.g. 1 for a prefill) and the
        new state (None when ``return_state`` is False). The given state is never modified.

        labels (B, S) int: the target of each position (already shifted: labels[:, t] is the token that should
        follow input_ids[:, t]; -100 where no loss is wanted). With labels the output has ``loss`` (the cross
        entropy, reduced by ``loss_reduction``: "mean" over counted positions, "sum" or "none") computed chunk
        by chunk (:func:`fastxlstm.models.loss.chunked_cross_entropy`), and ``logits`` is None: the (B, S, V)
        float32 logits are never formed."""
        ids, resets, state = self.check_forward_inputs(input_ids, state, resets)
        return self._forward(ids, state, resets, return_state, check_logits_to_keep(logits_to_keep), labels,
                             loss_reduction)

    def _forward(self, ids: torch.Tensor, state: Optional[XLSTMState], resets: Optional[torch.Tensor],
                 return_state: bool = True, logits_to_keep: int = 0, labels: Optional[torch.Tensor] = None,
                 loss_reduction: str = "mean") -> CausalLMOutput:
        """forward() without the input checks (inputs already validated at the public edge)."""
        x, new_state = self._backbone(ids, state, resets, return_state)
        return self._outputs(x, new_state, logits_to_keep, labels, loss_reduction)

    def _backbone(self, ids: torch.Tensor, state: Optional[XLSTMState], resets: Optional[torch.Tensor],
                  return_state: bool = True):
        """Embedding and blocks: (the last block's output (B, S, E), before the output norm; the new state or
        None)."""
        c = self.config
        x = self.token_embedding(ids)
        new_blocks = []
        for idx, blk in enumerate(self.blocks):
            backend = c.mlstm_backend if isinstance(blk, MLSTMBlock) else c.slstm_backend
            x, st = self._run_block(blk, x, None if state is None else state.blocks[idx], resets, backend,
                                    c.chunk_size)
            new_blocks.append(st)
        return x, (XLSTMState(tuple(new_blocks)) if return_state else None)

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits (..., V) of backbone outputs x (..., E): output norm, LM head."""
        return self.lm_head(self._normed(x)).float()
