"""The shared base of fastxlstm's language models (the paper's xLSTM[a:b] and the xLSTM-7B "Large").

A subclass provides:

- ``config_class``: the config dataclass type. Its instances have ``to_dict() -> dict`` (JSON-serialisable),
  a classmethod ``from_dict(d) -> config`` and a class attribute ``model_type: str`` (written to config.json;
  "xlstm_lm" for the paper model, "xlstm" for the 7B, which is also transformers' model_type).
- ``__init__(self, config)`` that calls ``super().__init__()`` and sets ``self.config = config``.
- ``forward(input_ids, state=None, resets=None, return_state=True) -> CausalLMOutput``:
  input_ids (B, S) int64 in [0, vocab_size); state an ``XLSTMState`` (None is fresh); resets (B, S) bool, True at t
  clears the state before token t (packed documents, left padding); returns float32 logits (B, S, V) and the state
  after the last token (None when return_state=False). States are never modified in place.
- ``init_state(batch_size, device=None, dtype=None) -> XLSTMState``: a fresh (zero) state. It must accept
  ``device="meta"``: ``check_state`` compares a given state's shapes with a meta-device fresh state (no memory).
- optionally ``get_input_embeddings()`` when the embedding is not the first ``nn.Embedding`` found, and a
  ``lm_head`` attribute (the output projection) for ``num_parameters(exclude_embeddings=True)``.

It gets:

- ``generate(input_ids, max_new_tokens, ...)`` and ``generate_stream(...)`` (see :mod:`fastxlstm.generation`):
  prefill once with the chunkwise form, then decode one token at a time with the carried state.
- ``save_pretrained(dir, max_shard_size="2GB")`` and the classmethod ``from_pretrained(dir, device=None,
  dtype=None)`` (see :mod:`fastxlstm.models.io`): config.json + safetensors, written atomically.
- ``num_parameters(exclude_embeddings=False)``, ``device`` and ``dtype`` properties, and the input checks
  ``check_forward_inputs`` (token ids, resets, state: what forward() implementations call first).

Generation needs nothing more than forward/init_state: prefill is ``forward(prompt, resets=...)`` and each step
``forward(token[:, None], state=state)``. Left padding reaches the model only through ``resets``, so every
per-token memory a subclass keeps (cell states, conv windows) must honour them.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, List, Optional, Union

import torch
from torch import nn

from ..layers.state import MLSTMBlockState, XLSTMState
from ..ops._checks import values_readable

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_logits_to_keep(n) -> int:
    """``logits_to_keep``: 0 (all positions) or a positive int (only the last n positions get logits)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {n!r}")
    return n


class XLSTMModelBase(nn.Module):
    """Base class: generation, checkpoint I/O and input validation shared by both models."""

    config_class: ClassVar[type] = None  # set by subclasses
    config: Any

    # ------------------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the floating parameters (the compute dtype of the matmuls)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once).

        exclude_embeddings: leave out the token embedding (and the LM head when it is a separate matrix of the
        same shape), the usual convention when quoting "non-embedding" model sizes.
        """
        seen = set()
        total = 0
        emb = self.get_input_embeddings() if exclude_embeddings else None
        head = self.get_output_embeddings() if exclude_embeddings else None
        skip = set()
        if emb is not None:
            skip.add(id(emb.weight))
        if head is not None:
            skip.add(id(head.weight))
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def get_input_embeddings(self) -> Optional[nn.Embedding]:
        """The token embedding module (subclasses override when it is not found by type)."""
        for mod in self.modules():
            if isinstance(mod, nn.Embedding):
                return mod
        return None

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return getattr(self, "lm_head", None)

    def optim_groups(self, weight_decay: float) -> List[Dict[str, Any]]:
        """AdamW parameter groups: decay on >= 2-D weights except embeddings, convs and recurrent kernels (the
        default; a model that knows better overrides it)."""
        decay, no_decay, seen = [], [], set()
        emb_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            lname = name.lower()
            is_matrix = (p.ndim >= 2 and id(p) not in emb_ids and "recurrent" not in lname and "conv" not in lname)
            (decay if is_matrix else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------------------------------------------
    # training speed: compiled blocks, activation checkpointing, the chunked loss
    # ------------------------------------------------------------------------------------------------------

    #: recompute each block's activations in the backward instead of keeping them (torch.utils.checkpoint,
    #: use_reentrant=False); only while gradients are being recorded. Set directly or with
    #: :meth:`set_activation_checkpointing`.
    gradient_checkpointing: bool = False
    #: rows per chunk of the chunked cross entropy that ``forward(..., labels=...)`` computes
    loss_chunk_size: int = 2048

    def block_modules(self) -> nn.ModuleList:
        """The residual blocks, in order."""
        blocks = getattr(self, "blocks", None)
        if blocks is None:
            blocks = self.backbone.blocks
        return blocks

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block's forward in the backward (saves ~all activation memory, ~1/3 more compute).
        Exact: loss and gradients equal those without it. Stateless training is the intended use; a given
        state works too."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be a bool, got {enabled!r}")
        self.gradient_checkpointing = enabled

    def compile_blocks(self, dynamic: Optional[bool] = False, mode: Optional[str] = None,
                       cells_in_graph: bool = False) -> None:
        """torch.compile each block's forward in place (parameter names, hence checkpoints, are unchanged).

        Inductor fuses what surrounds the cells (norms, gates, soft caps, the conv, SiLU gating, residual adds)
        into a few kernels. The blocks of a model share one compiled graph per block type and input shape
        (``dynamic=False`` specialises on the shape: a new (B, S) compiles again). The recurrent cells run
        outside the graphs unless ``cells_in_graph`` (the mLSTM's Triton kernels and the sLSTM's step loop gain
        nothing from Inductor; the sLSTM is always kept out: its loop over S would be unrolled).

        Call once, after moving the model to its device; ``forward`` then runs the compiled blocks. The model
        loop, the embedding and the loss stay eager.
        """
        import torch._dynamo
        cfg = torch._dynamo.config
        # one compiled graph serves every block of a type, but each new input shape adds an entry per code
        # object: allow a few shapes (the benchmark runs 4 contexts) before Dynamo falls back to eager
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name) and getattr(cfg, name) < 32:
                setattr(cfg, name, 32)
        from ..layers.mlstm import MLSTMLayer
        from ..layers.slstm import SLSTMLayer
        from .xlstm_large import MLSTMLargeLayer
        for blk in self.block_modules():
            for mod in blk.modules():
                if isinstance(mod, SLSTMLayer):
                    mod._cell_outside_graph = True
                elif isinstance(mod, (MLSTMLayer, MLSTMLargeLayer)):
                    mod._cell_outside_graph = not cells_in_graph
            blk.compile(dynamic=dynamic, mode=mode)

    #: when set (by the CUDA-graph decoder, while it captures), every block runs as ``_block_runner(blk, *args)``:
    #: a torch.compile'd call shared by the blocks of one type (see fastxlstm.generation.graph)
    _block_runner = None

    def _run_block(self, blk: nn.Module, *args):
        """``blk(*args)``, under activation checkpointing when it is on and gradients are recorded."""
        if self._block_runner is not None:
            return self._block_runner(blk, *args)
        if self.gradient_checkpointing and torch.is_grad_enabled() and self.training:
            from torch.utils.checkpoint import checkpoint
            # no block draws random numbers (no dropout), so the RNG state need not be saved and restored; that
            # also keeps the recomputation capturable in a CUDA graph (fastxlstm.train.graphs)
            return checkpoint(blk, *args, use_reentrant=False, preserve_rng_state=False)
        return blk(*args)

    def _logits_at(self, input_ids, mask: torch.Tensor) -> torch.Tensor:
        """float32 logits (M, V) of the M positions where ``mask`` (B, S) bool is True, the LM head applied to those
        rows only (what ``forward`` gives there, without the (B, S, V) logits; for tasks that score a few positions
        per sequence). Fresh state, no resets. Each model provides ``_backbone`` and ``_head``."""
        ids, _, _ = self.check_forward_inputs(input_ids, None, None)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(ids.shape)}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        x, _ = self._backbone(ids, None, None, False)
        return self._head(x[mask])

    def _outputs(self, x: torch.Tensor, new_state, logits_to_keep: int, labels, loss_reduction: str):
        """The forward's result from the backbone's output x (B, S, E): with labels the loss (chunked cross entropy
        of the normed x, no (B, S, V) logits), else the float32 logits of the last ``logits_to_keep`` positions
        (0: all). Each model provides ``_backbone``, ``_normed`` (output norm, in the LM head's input dtype),
        ``_head`` and ``_logit_soft_cap``."""
        from .output import CausalLMOutput
        if labels is not None:
            loss = self._lm_loss(self._normed(x), labels, loss_reduction, soft_cap=self._logit_soft_cap)
            return CausalLMOutput(logits=None, state=new_state, loss=loss)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutput(logits=self._head(x), state=new_state)

    #: the soft cap of the output logits (None: none)
    _logit_soft_cap = None

    def _lm_loss(self, hidden: torch.Tensor, labels, reduction: str, soft_cap=None) -> torch.Tensor:
        from .loss import chunked_cross_entropy
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"labels must be a tensor of shape (B, S) = {tuple(hidden.shape[:-1])}, got "
                             f"{tuple(getattr(labels, 'shape', ())) or type(labels).__name__}")
        if labels.device != hidden.device:
            raise ValueError(f"labels is on {labels.device} but the model is on {hidden.device}")
        return chunked_cross_entropy(hidden, self.lm_head.weight, labels, chunk=int(self.loss_chunk_size),
                                     soft_cap=soft_cap, reduction=reduction)

    # ------------------------------------------------------------------------------------------------------
    # input validation (shared by subclasses' forward)
    # ------------------------------------------------------------------------------------------------------

    def check_input_ids(self, input_ids) -> torch.Tensor:
        """Validate token ids: a (B, S) integer tensor on the model's device with ids in [0, vocab_size).

        Returns the ids as int64. Out-of-range ids would otherwise index garbage (CPU) or crash the device.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor of shape (B, S), got {type(input_ids).__name__}")
        if input_ids.dtype not in _INT_DTYPES:
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has batch size 0")
        device = self.device
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        if input_ids.numel() > 0 and values_readable(input_ids):
            # one device-to-host transfer for both bounds (this runs on every decoding step). Skipped inside
            # torch.compile, where it would split the graph, and while a CUDA graph is captured: a bad id there is
            # not silent but fatal (Inductor's "index out of bounds" abort on the CPU, a device-side assert on
            # CUDA); the trainer checks the range of its token data when it loads it
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got min {lo} max {hi}")
        return input_ids.long()

    def check_resets(self, resets, batch_size: int, seq_len: int) -> Optional[torch.Tensor]:
        if resets is None:
            return None
        if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool:
            raise ValueError(f"resets must be a bool tensor of shape (B, S), got "
                             f"{getattr(resets, 'dtype', type(resets).__name__)}")
        if tuple(resets.shape) != (batch_size, seq_len):
            raise ValueError(f"resets has shape {tuple(resets.shape)}, expected (B, S) = ({batch_size}, {seq_len})")
        if resets.device != self.device:
            raise ValueError(f"resets is on {resets.device} but the model is on {self.device}")
        return resets

    def check_forward_inputs(self, input_ids, state, resets):
        """What every forward() checks first: token ids (B, S) with S > 0, resets (B, S) bool or None, a state of
        this model's layout for B rows or None. Returns (ids as int64, resets, state)."""
        ids = self.check_input_ids(input_ids)
        B, S = ids.shape
        if S == 0:
            raise ValueError("input_ids has sequence length 0")
        return ids, self.check_resets(resets, B, S), self.check_state(state, B)

    def check_state(self, state, batch_size: int) -> Optional[XLSTMState]:
        """Check that ``state`` is an XLSTMState of this model's layout for ``batch_size`` rows.

        The per-tensor shapes are compared with a fresh ``init_state`` (cheap: only meta-shaped comparisons).
        """
        if state is None:
            return None
        if not isinstance(state, XLSTMState):
            raise ValueError(f"state must be an XLSTMState (or None), got {type(state).__name__}")
        ref = self._state_shapes(batch_size)
        if len(state) != len(ref):
            raise ValueError(f"state has {len(state)} blocks, the model has {len(ref)}")
        device = self.device
        for idx, (blk, shapes) in enumerate(zip(state.blocks, ref)):
            kind, expected = shapes
            if type(blk).__name__ != kind:
                raise ValueError(f"state.blocks[{idx}] is a {type(blk).__name__}, expected {kind}")
            for name, shp in expected.items():
                t = getattr(blk, name)
                if shp is None:
                    if t is not None:
                        raise ValueError(f"state.blocks[{idx}].{name} must be None for this model")
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"state.blocks[{idx}].{name} must be a tensor of shape {shp}")
                if tuple(t.shape) != shp:
                    raise ValueError(f"state.blocks[{idx}].{name} has shape {tuple(t.shape)}, expected {shp}")
                if t.device != device:
                    raise ValueError(f"state.blocks[{idx}].{name} is on {t.device} but the model is on {device}")
                if not t.is_floating_point():
                    raise ValueError(f"state.blocks[{idx}].{name} has dtype {t.dtype}; expected a floating dtype")
        return state

    def _state_shapes(self, batch_size: int):
        """[(class name, {field: shape or None})] per block, derived from a fresh state on the meta device."""
        cache = getattr(self, "_state_shape_cache", None)
        if cache is None or cache[0] != batch_size:
            st = self.init_state(batch_size, device="meta")
            shapes = []
            for blk in st.blocks:
                names = ("C", "n", "m", "conv") if isinstance(blk, MLSTMBlockState) else ("c", "n", "m", "h", "conv")
                shapes.append((type(blk).__name__,
                               {n: (None if getattr(blk, n) is None else tuple(getattr(blk, n).shape))
                                for n in names}))
            cache = (batch_size, shapes)
            object.__setattr__(self, "_state_shape_cache", cache)
        return cache[1]

    # ------------------------------------------------------------------------------------------------------
    # what subclasses implement
    # ------------------------------------------------------------------------------------------------------

    def forward(self, input_ids, state=None, resets=None, return_state=True):  # pragma: no cover - abstract
        raise NotImplementedError

    def init_state(self, batch_size: int, device=None, dtype=None) -> XLSTMState:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Generate tokens; returns (B, S + max_new_tokens) ids (prompt included). See fastxlstm.generation."""
        from ..generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def generate_stream(self, input_ids, max_new_tokens: int, **kwargs):
        """Iterator form of :meth:`generate`: yields one (B,) tensor of new token ids per step."""
        from ..generation import generate_stream
        return generate_stream(self, input_ids, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: Union[str, os.PathLike],
                        max_shard_size: Union[int, str] = "2GB") -> None:
        """Write config.json + model.safetensors (sharded above max_shard_size), atomically."""
        from .io import save_pretrained
        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], device=None, dtype=None):
        """Load a directory written by ``save_pretrained`` (or by transformers for the 7B).

        Called on a subclass, the checkpoint must be of that class's model_type.
        """
        from .io import from_pretrained
        model = from_pretrained(directory, device=device, dtype=dtype)
        if cls is not XLSTMModelBase and not isinstance(model, cls):
            raise ValueError(f"{os.fspath(directory)} holds a {type(model).__name__} checkpoint, "
                             f"not a {cls.__name__}")
        return model
