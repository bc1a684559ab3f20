"""Packed projections: several ``nn.Linear`` of the SAME input stored as row blocks of one weight (and one bias),
so that a decode step computes them with one matmul instead of one per projection.

Why: at batch 1 every projection of a decode step is a matrix-vector product bound by the weight read, and each
is a kernel launch (cuBLAS often adds a split-K reduction kernel). The 7B's mLSTM layer projects the same input six
times (q, k, v, output gate, input gate, forget gate) and its FFN twice (gate, up): packed, a block does 2-3
matmuls of the same total size instead of 8, and the tiny E -> NH gate products (and the ``torch.cat`` of the two
gate weights each step) disappear.

How, with no second copy of the weights (a 7B is 13.7 GB): :class:`PackedLinears` allocates ONE tensor
W (sum of the out_features, in_features), copies each weight into its rows and then points each parameter's
``.data`` at its row block (a view of W). The separate storages are freed as they are replaced, so memory is
unchanged (plus, transiently, one group's size). Parameter objects, names, ``state_dict`` keys and values stay the
same: checkpoints, ``load_state_dict`` (an in-place copy into the views, hence into W) and optimizers see the
usual parameters.

What can break the packing, and what happens then:

- ``.to(device / dtype)``, ``.half()``, ``.cuda()`` ... give every parameter a new, separate tensor. The owning
  module's ``_apply`` (see :class:`PackableMixin`) notices and packs again on the new device / dtype.
- anything else that replaces a parameter (``load_state_dict(..., assign=True)``, ``param.data = t``) is detected
  at the next forward (:meth:`PackableMixin.packed_group`): the layer drops its packed weight and runs the separate
  projections (the same function), i.e. it is simply unpacked.
- autograd: the packed weight is not a parameter, so while gradients are recorded for the parameters the layer
  runs the separate projections (the same function; gradients reach each parameter as without packing).
  Packing speeds up inference only.

Under ``torch.compile`` only the parameters' identity is checked (Dynamo guards on it); the storage checks run in
eager mode. The packed weight is deliberately NOT a registered buffer: ``.to()`` would convert it as a second copy.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedLinears", "PackableMixin", "packed_linear"]

# the matmul of a packed group; generation._gemv.skinny_linears swaps it (as it does nn.Linear's forward) while
# the CUDA-graph decoder captures a batch-1 step with the Triton GEMV (FASTXLSTM_GEMV, generation/_gemv.py)
_LINEAR = F.linear


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a packed weight (or a row block of it)."""
    return _LINEAR(x, weight, bias)


class PackedLinears:
    """The row-packed weight (and bias) of ``linears``: nn.Linear of one in_features, dtype and device.

    ``weight`` (sum N_j, K); ``bias`` the rows from the first member with a bias to the end (``bias_start`` is that
    row; None when no member has one), members after it without a bias get zero rows there. So the 7B's group (no
    bias on q, k, v, o; the two gates, last, with one) packs exactly the gate biases: no extra memory.
    ``sizes`` = [N_j]; ``has_bias`` = [member j has a bias]. Build with :meth:`build` (None when the members cannot
    be packed).
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        self.linears: List[nn.Linear] = list(linears)
        self.sizes = [lin.out_features for lin in self.linears]
        self.has_bias = [lin.bias is not None for lin in self.linears]
        first = self.has_bias.index(True) if any(self.has_bias) else len(self.sizes)
        self.bias_start = sum(self.sizes[:first])
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None
        self._params: list = []
        self._expect: list = []

    @classmethod
    def build(cls, linears: Sequence[nn.Linear]) -> Optional["PackedLinears"]:
        g = cls(linears)
        return g if g.pack() else None

    def _packable(self) -> bool:
        ws = [lin.weight for lin in self.linears]
        ts = ws + [lin.bias for lin in self.linears if lin.bias is not None]
        w0 = ws[0]
        return (len(self.linears) >= 2 and all(type(lin) is nn.Linear for lin in self.linears)
                and all(t.dtype == w0.dtype and t.device == w0.device for t in ts)
                and all(w.ndim == 2 and w.shape[1] == w0.shape[1] for w in ws)
                and w0.device.type != "meta" and w0.is_floating_point())

    @torch.no_grad()
    def pack(self) -> bool:
        """(Re)build the packed tensors from the parameters as they are now and point the parameters at them.
        False (and nothing changed) when the members differ in dtype, device or input width."""
        if not self._packable():
            return False
        lins = self.linears
        w0 = lins[0].weight
        N, K = sum(self.sizes), w0.shape[1]
        W = torch.empty(N, K, dtype=w0.dtype, device=w0.device)
        bs = self.bias_start
        Bv = torch.zeros(N - bs, dtype=w0.dtype, device=w0.device) if any(self.has_bias) else None
        a = 0
        for lin, n in zip(lins, self.sizes):
            # one parameter at a time: its old storage is freed as soon as it is replaced
            W[a:a + n].copy_(lin.weight)
            lin.weight.data = W[a:a + n]
            if lin.bias is not None:
                Bv[a - bs:a - bs + n].copy_(lin.bias)
                lin.bias.data = Bv[a - bs:a - bs + n]
            a += n
        self.weight, self.bias = W, Bv
        self._params = [(lin.weight, lin.bias) for lin in lins]
        self._expect = [(p, p.data_ptr(), p.shape) for pair in self._params for p in pair if p is not None]
        return True

    def intact(self) -> bool:
        """Whether every member's parameters still are the row blocks of ``weight`` / ``bias``: the same parameter
        objects, at the addresses, shapes and dtype they got when packed (a replaced ``.data`` has another address).
        Runs at every forward of a packed layer: kept to a few cheap comparisons (~1 us per member)."""
        if self.weight is None:
            return False
        for lin, (w, b) in zip(self.linears, self._params):
            params = lin._parameters
            if params["weight"] is not w or params.get("bias") is not b:
                return False
        if torch.compiler.is_compiling():
            return True
        dt = self.weight.dtype
        for p, ptr, shape in self._expect:
            if p.data_ptr() != ptr or p.dtype != dt or p.shape != shape:
                return False
        return True

    def requires_grad(self) -> bool:
        return any(p is not None and p.requires_grad for pair in self._params for p in pair)

    @torch.no_grad()
    def unpack(self) -> None:
        """Give every member its own storage again (one copy at a time) and drop the packed tensors."""
        if self.intact():
            for lin in self.linears:
                lin.weight.data = lin.weight.data.clone()
                if lin.bias is not None:
                    lin.bias.data = lin.bias.data.clone()
        self.weight = self.bias = None
        self._params = []
        self._expect = []

    def _span(self, start: int, stop: int):
        """The rows [a, b) of members start:stop in ``weight``."""
        a = sum(self.sizes[:start])
        return a, a + sum(self.sizes[start:stop])

    def linear(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """x (..., K) -> (..., rows of members ``start:stop``): their outputs side by side, biases included."""
        a, b = self._span(start, len(self.sizes) if stop is None else stop)
        bs = self.bias_start
        if self.bias is None or b <= bs:
            return packed_linear(x, self.weight[a:b], None)
        if a >= bs:
            return packed_linear(x, self.weight[a:b], self.bias[a - bs:b - bs])
        # members without a bias first: the bias is added to the rows that have one
        y = packed_linear(x, self.weight[a:b], None)
        y[..., bs - a:] += self.bias[:b - bs]
        return y

    def rows(self, start: int, stop: int):
        """(weight rows, bias rows or None) of members ``start:stop`` (views); every member of the range past
        ``bias_start`` or none of them with a bias."""
        a, b = self._span(start, stop)
        bs = self.bias_start
        if self.bias is None or b <= bs:
            return self.weight[a:b], None
        if a < bs:
            raise ValueError(f"rows {a}:{b} start before the packed bias (row {bs}): use linear()")
        return self.weight[a:b], self.bias[a - bs:b - bs]


_ATTR = "_fastxlstm_packed"


class PackableMixin:
    """For an nn.Module whose forward may use :class:`PackedLinears` groups (``{name: group}`` in the instance's
    ``__dict__``): ``.to()`` / ``.half()`` ... re-pack them; :meth:`packed_group` hands a group to the forward only
    when it is intact and no gradient is being recorded for its parameters."""

    def pack_group(self, name: str, linears: Sequence[nn.Linear]) -> bool:
        groups = self.__dict__.setdefault(_ATTR, {})
        old = groups.pop(name, None)
        if old is not None and old.intact():
            groups[name] = old
            return True
        g = PackedLinears.build(linears)
        if g is not None:
            groups[name] = g
        return g is not None

    def unpack_groups(self) -> None:
        for g in self.__dict__.pop(_ATTR, {}).values():
            g.unpack()

    def packed_groups(self) -> dict:
        return {k: g for k, g in self.__dict__.get(_ATTR, {}).items() if g.intact()}

    def packed_group(self, name: str) -> Optional[PackedLinears]:
        groups = self.__dict__.get(_ATTR)
        if not groups:
            return None
        g = groups.get(name)
        if g is None:
            return None
        if torch.is_grad_enabled() and g.requires_grad():
            return None
        if not g.intact():
            if not torch.compiler.is_compiling():
                del groups[name]  # a parameter was replaced: unpacked from now on (and W is freed)
            return None
        return g

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        groups = self.__dict__.get(_ATTR)
        if groups:
            for name in list(groups):
                g = groups[name]
                if g.intact():
                    continue
                # the conversion gave each parameter a new tensor: pack them again where they are now
                g.weight = g.bias = None  # frees the old packed storage before the new one is allocated
                if not g.pack():
                    del groups[name]
        return out
