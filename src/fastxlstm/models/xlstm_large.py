"""The xLSTM-7B ("Large") architecture: mLSTM-only, post up-projection blocks like a Transformer.

    x = x + mLSTMLayer(RMSNorm(x));   x = x + SwiGLU(RMSNorm(x));   logits = cap * tanh(lm_head(RMSNorm(x)) / cap)

(docs/MATH.md section 3). Parameter names equal transformers' ``xLSTMForCausalLM`` checkpoint keys, so its
state dict loads as is (see :mod:`fastxlstm.interop.transformers`). The cell is :func:`fastxlstm.ops.mlstm`
(chunkwise/auto) for sequences and :func:`fastxlstm.ops.mlstm_step` for single-token decoding; the recurrent state
flows in and out as an :class:`~fastxlstm.models.state.XLSTMState` of ``MLSTMBlockState`` (conv=None).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from torch import nn

from ..layers._fast import compute_dtype_for, float_gate_linear, mlstm_cell_call
from ..layers._packing import PackableMixin
from ..layers.ffn import GatedFFN
from ..layers.norm import MultiHeadLayerNorm, RMSNorm
from ..ops.dispatch import MLSTM_BACKENDS, _mlstm_step_unchecked
from ..ops.gate_mul import gate_mul
from ._config import ConfigDictMixin, is_int, is_num
from .base import XLSTMModelBase, check_logits_to_keep
from .output import CausalLMOutput
from ..layers.state import MLSTMBlockState, XLSTMState

__all__ = ["XLSTMLargeConfig", "XLSTMLarge", "soft_cap", "round_up_to_multiple"]


def round_up_to_multiple(x: float, multiple_of: int) -> int:
    """Round x up to a multiple of ``multiple_of`` (float arithmetic, as the checkpoints' code does it)."""
    return int(((x + multiple_of - 1) // multiple_of) * multiple_of)


def soft_cap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``cap * tanh(x / cap)``: a smooth clamp to (-cap, cap); identity when cap is None."""
    if cap is None:
        return x
    return cap * torch.tanh(x / cap)


@dataclass
class XLSTMLargeConfig(ConfigDictMixin):
    """Config of the xLSTM-7B architecture. Field names follow transformers' ``xLSTMConfig``.

    The released 7B is the default: E=4096, 8 heads, 32 blocks, vocab 50304, untied (6,865,424,896 parameters).
    Derived sizes: qk_dim = int(hidden_size * qk_dim_factor), v_dim = int(hidden_size * v_dim_factor) (both split
    over num_heads), ffn_dim = round_up(hidden_size * ffn_proj_factor, ffn_round_up_to_multiple_of).
    """

    model_type: ClassVar[str] = "xlstm"

    vocab_size: int = 50304
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    gate_soft_cap: Optional[float] = 15.0
    output_logit_soft_cap: Optional[float] = 30.0
    norm_eps: float = 1e-6
    eps: float = 1e-6
    use_bias: bool = False
    norm_reduction_force_float32: bool = True
    add_out_norm: bool = True
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    chunk_size: int = 64
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "ffn_round_up_to_multiple_of",
                     "chunk_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"XLSTMLargeConfig.{name} must be a positive int, got {v!r}")
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor"):
            v = getattr(self, name)
            if not is_num(v) or v <= 0:
                raise ValueError(f"XLSTMLargeConfig.{name} must be a positive number, got {v!r}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            v = getattr(self, name)
            if v is not None and (not is_num(v) or v <= 0):
                raise ValueError(f"XLSTMLargeConfig.{name} must be a positive number or None, got {v!r}")
        for name in ("norm_eps", "eps"):
            v = getattr(self, name)
            if not is_num(v) or v < 0:
                raise ValueError(f"XLSTMLargeConfig.{name} must be a non-negative number, got {v!r}")
        for name in ("use_bias", "norm_reduction_force_float32", "add_out_norm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"XLSTMLargeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v < self.vocab_size):
                raise ValueError(f"XLSTMLargeConfig.{name} must be None or an id in [0, {self.vocab_size}), "
                                 f"got {v!r}")
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim < self.num_heads or dim % self.num_heads:
                raise ValueError(f"{name} = int(hidden_size * {name}_factor) = {dim} must be a positive multiple of "
                                 f"num_heads = {self.num_heads}")

    # derived sizes ------------------------------------------------------------------------------------------
    @property
    def qk_dim(self) -> int:
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round_up_to_multiple(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    # to_dict / from_dict come from ConfigDictMixin: this class's own fields only; transformers-format dicts go
    # through fastxlstm.interop.transformers


class _RMSNorm(RMSNorm):
    """RMSNorm with the optional bias of the checkpoints' ``use_bias=True`` variant (added after the weight)."""

    def __init__(self, dim: int, eps: float, force_float32: bool, bias: bool):
        super().__init__(dim, eps=eps, force_float32=force_float32)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class MLSTMLargeLayer(PackableMixin, nn.Module):
    """The 7B's mLSTM layer at model width. Input (B, S, E) -> output (B, S, E) and the new cell state.

    :meth:`pack_projections` stores q, k, v, ogate_preact, igate_preact, fgate_preact (six projections of the same
    input) as row blocks of one weight (see :mod:`fastxlstm.layers._packing`): the forward then computes them with
    one matmul (float32 / float64 models) or two (low precision: q|k|v|o in the compute dtype, the two gates in
    float32 as always). Same function, same parameters, no extra memory.
    """

    def __init__(self, config: XLSTMLargeConfig):
        super().__init__()
        c = config
        self.num_heads = c.num_heads
        self.qk_head_dim = c.qk_head_dim
        self.v_head_dim = c.v_head_dim
        self.gate_soft_cap = c.gate_soft_cap
        self.eps = c.eps
        self.chunk_size = c.chunk_size
        E = c.hidden_size
        self.q = nn.Linear(E, c.qk_dim, bias=c.use_bias)
        self.k = nn.Linear(E, c.qk_dim, bias=c.use_bias)
        self.v = nn.Linear(E, c.v_dim, bias=c.use_bias)
        self.ogate_preact = nn.Linear(E, c.v_dim, bias=c.use_bias)
        # the gates always carry a bias: their init (input -10, forget linspace(3, 6)) lives there
        self.igate_preact = nn.Linear(E, c.num_heads, bias=True)
        self.fgate_preact = nn.Linear(E, c.num_heads, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(c.num_heads, c.v_head_dim, eps=c.norm_eps,
                                                 force_float32=c.norm_reduction_force_float32, bias=c.use_bias)
        self.out_proj = nn.Linear(c.v_dim, E, bias=c.use_bias)

    def pack_projections(self) -> bool:
        """Pack the six input projections (see the class docstring). True when packed."""
        return self.pack_group("proj", (self.q, self.k, self.v, self.ogate_preact, self.igate_preact,
                                        self.fgate_preact))

    def _projections(self, x: torch.Tensor):
        """q, k, v, ogate pre-activation (compute dtype) and the gates' (B, S, 2 NH) pre-activations (float32, or
        float64 for float64 inputs) of x (B, S, E), from the packed weight when there is one."""
        g = self.packed_group("proj")
        if g is None:
            # both gates' pre-activations in one float32 call (NH outputs each; no float32 copy of x kept): exp(i)
            # amplifies any bf16 rounding of them
            gates = float_gate_linear((x,), torch.cat([self.igate_preact.weight, self.fgate_preact.weight], dim=0),
                                      torch.cat([self.igate_preact.bias, self.fgate_preact.bias], dim=0))
            return self.q(x), self.k(x), self.v(x), self.ogate_preact(x), gates
        n_qkvo = sum(g.sizes[:4])
        if x.dtype in (torch.float32, torch.float64) and g.weight.dtype == x.dtype:
            # the gates come out in float32 / float64 anyway: all six in one matmul
            y = g.linear(x)
            q, k, v, o = y[..., :n_qkvo].split(g.sizes[:4], dim=-1)
            return q, k, v, o, y[..., n_qkvo:]
        q, k, v, o = g.linear(x, 0, 4).split(g.sizes[:4], dim=-1)
        w, b = g.rows(4, 6)
        return q, k, v, o, float_gate_linear((x,), w, b)

    def forward(self, x: torch.Tensor, state: Optional[MLSTMBlockState], resets: Optional[torch.Tensor],
                backend: str, return_state: bool):
        B, S, _ = x.shape
        NH = self.num_heads
        # one cast to the compute dtype shared by the six projections (autocast would make, and keep for the
        # backward, a copy of x per projection)
        x = x.to(compute_dtype_for(x, self.q.weight))
        q, k, v, o_pre, gates = self._projections(x)  # (B, S, NH * D) each, gates (B, S, 2 NH)
        gates = soft_cap(gates, self.gate_soft_cap)  # in float32
        cell_state = None if state is None else (state.C, state.n, state.m)
        if S == 1 and cell_state is not None:
            # decoding: the step form reads and writes the state once; a reset row starts from a fresh state
            if resets is not None:
                keep = ~resets[:, 0].view(B, 1)
                C, n, m = cell_state
                cell_state = (torch.where(keep[..., None, None], C, torch.zeros_like(C)),
                              torch.where(keep[..., None], n, torch.zeros_like(n)),
                              torch.where(keep, m, torch.zeros_like(m)))
            # backend: "triton" and "auto" as given, any PyTorch form ("reference", "chunkwise", ...) the
            # PyTorch step
            step_backend = backend if backend in ("auto", "triton") else "torch"

            def heads(t):
                return t.unflatten(-1, (NH, -1))[:, 0]  # (B, 1, NH * D) -> (B, NH, D), a view
            h, (C, n, m) = _mlstm_step_unchecked(heads(q), heads(k), heads(v), gates[:, 0, :NH], gates[:, 0, NH:],
                                                 cell_state, self.eps, step_backend)
            h = h.unsqueeze(1)  # (B, 1, NH, DV)
        else:
            h, (C, n, m) = mlstm_cell_call(self, q, k, v, gates, NH, state=cell_state, backend=backend,
                                           chunk_size=self.chunk_size, eps=self.eps, resets=resets)
        h = self.multihead_norm(h)  # (B, S, NH, DV) -> (B, S, v_dim)
        y = self.out_proj(gate_mul(o_pre, h, "sigmoid"))
        return y, (MLSTMBlockState(C=C, n=n, m=m) if return_state else None)


class MLSTMLargeBlock(nn.Module):
    """x + mLSTM(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). (B, S, E) -> (B, S, E)."""

    def __init__(self, config: XLSTMLargeConfig):
        super().__init__()
        c = config
        self.norm_mlstm = _RMSNorm(c.hidden_size, c.norm_eps, c.norm_reduction_force_float32, c.use_bias)
        self.mlstm_layer = MLSTMLargeLayer(c)
        self.norm_ffn = _RMSNorm(c.hidden_size, c.norm_eps, c.norm_reduction_force_float32, c.use_bias)
        self.ffn = GatedFFN(c.hidden_size, c.ffn_dim, activation="silu", bias=c.use_bias)

    def forward(self, x, state, resets, backend, return_state):
        y, new_state = self.mlstm_layer(self.norm_mlstm(x), state, resets, backend, return_state)
        x = x + y
        x = x + self.ffn(self.norm_ffn(x))
        return x, new_state


class XLSTMLargeBackbone(nn.Module):
    def __init__(self, config: XLSTMLargeConfig):
        super().__init__()
        c = config
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(MLSTMLargeBlock(c) for _ in range(c.num_hidden_layers))
        self.out_norm = (_RMSNorm(c.hidden_size, c.norm_eps, c.norm_reduction_force_float32, c.use_bias)
                         if c.add_out_norm else nn.Identity())


class XLSTMLarge(XLSTMModelBase):
    """The xLSTM-7B language model.

    forward(input_ids (B, S) int, state=None, resets=None (B, S) bool, return_state=True) -> CausalLMOutput with
    float32 logits (B, S, vocab_size) and the state after the last token. A single token with a state takes the
    step form; anything else the sequence form (``backend``: "auto" by default, see :func:`fastxlstm.ops.mlstm`).
    The decode step honours ``backend`` too: "triton" the fused kernel, "auto" the fastest available, any PyTorch
    form ("reference", "parallel", "chunkwise", "recurrent") the PyTorch step.
    """

    config_class = XLSTMLargeConfig

    def __init__(self, config: XLSTMLargeConfig, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, XLSTMLargeConfig):
            raise ValueError(f"XLSTMLarge needs an XLSTMLargeConfig, got {type(config).__name__}")
        self.config = config
        self.backend = backend
        self.backbone = XLSTMLargeBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.reset_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The checkpoints' init: "small init" N(0, sqrt(2/(5E))) for the embedding, q, k, v, output gate and head;
        gate weights 0 with input bias -10 and forget bias linspace(3, 6) over heads; "wang init"
        N(0, 2/(L sqrt(fan_in))) for out_proj (fan_in taken as E, as transformers does) and proj_down (its fan-in
        F); norms 1 and other biases 0."""
        c = self.config
        E, L = c.hidden_size, c.num_hidden_layers
        small = math.sqrt(2.0 / (5.0 * E))
        nn.init.normal_(self.backbone.embeddings.weight, std=small)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=small)
        for blk in self.backbone.blocks:
            layer = blk.mlstm_layer
            for lin in (layer.q, layer.k, layer.v, layer.ogate_preact, blk.ffn.proj_up_gate, blk.ffn.proj_up):
                nn.init.normal_(lin.weight, std=small)
            nn.init.normal_(layer.out_proj.weight, std=2.0 / L / math.sqrt(E))
            nn.init.normal_(blk.ffn.proj_down.weight, std=2.0 / L / math.sqrt(blk.ffn.proj_down.weight.shape[1]))
            nn.init.zeros_(layer.igate_preact.weight)
            nn.init.zeros_(layer.fgate_preact.weight)
            layer.igate_preact.bias.fill_(-10.0)
            layer.fgate_preact.bias.copy_(torch.linspace(3.0, 6.0, c.num_heads))
            for mod in blk.modules():
                if isinstance(mod, nn.Linear) and mod.bias is not None and mod not in (layer.igate_preact,
                                                                                       layer.fgate_preact):
                    nn.init.zeros_(mod.bias)
        for mod in self.modules():
            if isinstance(mod, (RMSNorm, MultiHeadLayerNorm)):
                nn.init.ones_(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    def init_state(self, batch_size: int, device=None, dtype=None) -> XLSTMState:
        """A fresh state: per block C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH), zeros, float32 by default
        (float64 for a float64 model); conv is None (the 7B has no conv)."""
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        c = self.config
        device = self.device if device is None else torch.device(device)
        if dtype is None:
            dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        NH, DQK, DV = c.num_heads, c.qk_head_dim, c.v_head_dim
        blocks = tuple(MLSTMBlockState(C=torch.zeros(batch_size, NH, DQK, DV, device=device, dtype=dtype),
                                       n=torch.zeros(batch_size, NH, DQK, device=device, dtype=dtype),
                                       m=torch.zeros(batch_size, NH, device=device, dtype=dtype))
                       for _ in range(c.num_hidden_layers))
        return XLSTMState(blocks)

    def forward(self, input_ids, state: Optional[XLSTMState] = None, resets: Optional[torch.Tensor] = None,
                return_state: bool = True, backend: Optional[str] = None, logits_to_keep: int = 0,
                labels: Optional[torch.Tensor] = None, loss_reduction: str = "mean") -> CausalLMOutput:
        """input_ids (B, S) int; state (or None); resets (B, S) bool; ``backend`` overrides the model's. Returns
        float32 logits (B, S, V), or only the last ``logits_to_keep`` positions when it is > 0, and the state
        after the last token.

        labels (B, S) int, already shifted (labels[:, t] follows input_ids[:, t]; -100: no loss): the output then
        has ``loss`` (soft-capped logits' cross entropy, reduced by ``loss_reduction``: "mean", "sum", "none")
        from :func:`fastxlstm.models.loss.chunked_cross_entropy`, and ``logits`` is None (never formed)."""
        ids, resets, state = self.check_forward_inputs(input_ids, state, resets)
        return self._forward(ids, state, resets, return_state, backend, check_logits_to_keep(logits_to_keep),
                             labels, loss_reduction)

    def _forward(self, ids: torch.Tensor, state: Optional[XLSTMState], resets: Optional[torch.Tensor],
                 return_state: bool = True, backend: Optional[str] = None, logits_to_keep: int = 0,
                 labels: Optional[torch.Tensor] = None, loss_reduction: str = "mean") -> CausalLMOutput:
        """forward() without the input checks (inputs already validated at the public edge)."""
        x, new_state = self._backbone(ids, state, resets, return_state, backend)
        return self._outputs(x, new_state, logits_to_keep, labels, loss_reduction)

    def _backbone(self, ids: torch.Tensor, state: Optional[XLSTMState], resets: Optional[torch.Tensor],
                  return_state: bool = True, backend: Optional[str] = None):
        """Embedding and blocks: (the last block's output (B, S, E), before the output norm; the new state or
        None). ``backend`` overrides the model's."""
        backend = backend or self.backend or "auto"
        if backend not in MLSTM_BACKENDS:
            raise ValueError(f"backend must be one of {MLSTM_BACKENDS}, got {backend!r}")
        x = self.backbone.embeddings(ids)
        new_blocks = []
        for idx, blk in enumerate(self.backbone.blocks):
            x, st = self._run_block(blk, x, None if state is None else state.blocks[idx], resets, backend,
                                    return_state)
            new_blocks.append(st)
        return x, (XLSTMState(tuple(new_blocks)) if return_state else None)

    @property
    def _logit_soft_cap(self):
        return self.config.output_logit_soft_cap

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.out_norm(x).to(self.lm_head.weight.dtype)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits (..., V) of backbone outputs x (..., E): output norm, LM head, output soft cap."""
        return soft_cap(self.lm_head(self._normed(x)).float(), self._logit_soft_cap)
