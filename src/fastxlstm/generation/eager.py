"""Text generation for fastxlstm models: prefill once, then decode one token at a time with the carried state.

    tokens = model.generate(input_ids, max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0)
    for tok in model.generate_stream(input_ids, max_new_tokens=32):   # tok: (B,) ids of one step
        ...

The prompt goes through the sequence (chunkwise) form in one call, which returns the recurrent state; each new
token is then one step of the model on that state. The state has a fixed size (per mLSTM block C, n, m and the
conv window; per sLSTM block c, n, m, h), so memory does not grow with the number of generated tokens: each step
replaces the state, nothing is appended.

Batches of prompts of different lengths are LEFT padded. The model sees the padding tokens, but the state is
reset at each row's first real token (``resets``), so a padded row generates what the prompt alone would (up to
float rounding from a different chunk alignment). Rows that emitted ``eos_token_id`` keep emitting
``pad_token_id``; generation stops early when every row has finished.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Union

import torch

from ._modes import inference
from .sampling import _check_int, _check_sampling, check_repetition_penalty, sample_next_token

__all__ = ["generate", "generate_stream", "prepare_prompt"]


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------

def _check_token(name, v, vocab_size):
    if v is None:
        return None
    _check_int(name, v)
    if not 0 <= v < vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}), got {v}")
    return v


def _eos_ids(eos_token_id, vocab_size) -> Optional[List[int]]:
    if eos_token_id is None:
        return None
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not ids:
        raise ValueError("eos_token_id must be an int, a non-empty list of ints, or None")
    return [_check_token("eos_token_id", int(i) if isinstance(i, torch.Tensor) else i, vocab_size) for i in ids]


def prepare_prompt(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   pad_token_id: Optional[int] = None) -> Optional[torch.Tensor]:
    """The (B, S) ``resets`` for a left-padded batch, or None when no row is padded.

    The padding is given by ``attention_mask`` (1 for real tokens, 0 for padding, which must all be on the left),
    or, without a mask, by the leading run of ``pad_token_id`` in each row. The reset sits at each row's first real
    token, so the state that token sees is fresh, exactly as for the prompt alone.
    """
    B, S = input_ids.shape
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must be a tensor of shape (B, S) = ({B}, {S}), got "
                             f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1")
        elif attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        real = attention_mask.to(device=input_ids.device).bool()
        if bool((real[:, :-1] & ~real[:, 1:]).any()):
            raise ValueError("attention_mask must be left padding (0...0 1...1 in each row); right or inner "
                             "padding is not supported: pad prompts on the left")
    elif pad_token_id is not None:
        # left padding = the leading run of pad tokens
        real = (input_ids != pad_token_id).long().cummax(dim=1).values.bool()
    else:
        return None
    if not bool(real[:, -1].all()):
        bad = (~real[:, -1]).nonzero().flatten().tolist()
        raise ValueError(f"rows {bad} of the prompt are all padding")
    if bool(real.all()):
        return None
    first = (~real).sum(dim=1)  # index of the first real token
    resets = torch.zeros(B, S, dtype=torch.bool, device=input_ids.device)
    resets[torch.arange(B, device=input_ids.device), first] = True
    resets[:, 0] = False  # an unpadded row starts from a fresh state anyway
    return resets


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------

def _call(model, ids, state=None, resets=None, checked=True):
    """One forward in inference mode (see ``_modes.inference``). ``checked=False`` skips the input checks: a token
    chosen from the model's own logits is valid by construction (the prompt was checked once at the entry point)."""
    with inference(model):
        if not checked:
            return model._forward(ids, state, resets, True)
        return model(ids, state=state, resets=resets)


def _prefill(model, ids, resets):
    """The prompt in inference mode, in chunks (flat memory); logits of the last position only."""
    from .graph import prefill
    with inference(model):
        return prefill(model, ids, resets)


def _use_graph(model, use_cuda_graph) -> bool:
    if use_cuda_graph is not None and not isinstance(use_cuda_graph, bool):
        raise ValueError(f"use_cuda_graph must be None (auto), True or False, got {use_cuda_graph!r}")
    from .graph import graph_decoding_available
    available = graph_decoding_available(model)
    if use_cuda_graph and not available:
        raise ValueError("use_cuda_graph=True needs a model on a CUDA device (and not float64); "
                         "use use_cuda_graph=None to fall back to the eager loop")
    return available if use_cuda_graph is None else use_cuda_graph


def _pick_stream(model, use_graph: bool, sync_every, *args, penalty=(1.0, None)):
    """The token stream of the path chosen by the caller (``_use_graph`` / ``_graph_with_penalty``)."""
    if use_graph:
        from .graph import graph_stream
        return graph_stream(model, *args, sync_every=sync_every)
    from .packing import pack_projections, packing_default
    if packing_default():
        # the 7B architecture's eager decode step is faster packed (CPU: 7b-tiny 1.2-1.8x, 7b-160m +5-13% over
        # runs; see benchmarks/NOTES.md); the paper models gain nothing measurable there and are left as they are
        from ..models.xlstm_large import XLSTMLarge
        if isinstance(model, XLSTMLarge):
            pack_projections(model)
    return _stream(model, *args, penalty=penalty)


def _graph_with_penalty(use: bool, use_cuda_graph, penalty) -> bool:
    """The CUDA-graph decoder has no repetition penalty: the eager loop runs it (an explicit True is refused)."""
    if penalty[0] == 1.0:
        return use
    if use_cuda_graph:
        raise ValueError("repetition_penalty != 1 runs in the eager loop only; pass use_cuda_graph=None or False")
    return False


def _seen_mask(ids, vocab_size, resets):
    """(B, V) bool: the tokens of each row's prompt (left padding before the row's reset excluded)."""
    B, S = ids.shape
    real = torch.ones(B, S, dtype=torch.bool, device=ids.device)
    if resets is not None:
        first = torch.where(resets.any(dim=1), resets.float().argmax(dim=1), torch.zeros_like(ids[:, 0]))
        real = torch.arange(S, device=ids.device)[None, :] >= first[:, None]
    seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, torch.where(real, ids, ids[:, -1:]), True)


def _setup(model, input_ids, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id, pad_token_id,
           attention_mask, seed, generator, repetition_penalty=1.0):
    ids = model.check_input_ids(input_ids)
    if ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one prompt token per row")
    _check_int("max_new_tokens", max_new_tokens, 0)
    V = model.vocab_size
    sample = _check_sampling(temperature, top_k, top_p, do_sample, V)
    eos = _eos_ids(eos_token_id, V)
    explicit_pad = _check_token("pad_token_id", pad_token_id, V)
    fill = explicit_pad
    if fill is None:
        fill = getattr(model.config, "pad_token_id", None)
    if fill is None and eos is not None:
        fill = eos[0]
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        _check_int("seed", seed)
        generator = torch.Generator(device=ids.device)
        generator.manual_seed(seed)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    resets = prepare_prompt(ids, attention_mask, explicit_pad)
    penalty = check_repetition_penalty(repetition_penalty)
    seen = _seen_mask(ids, V, resets) if penalty != 1.0 else None
    return ids, sample, eos, fill, generator, resets, (penalty, seen)


def _stream(model, ids, max_new_tokens, temperature, top_k, top_p, sample, eos, fill, generator, resets,
            final: Optional[list], penalty=(1.0, None)) -> Iterator[torch.Tensor]:
    repetition_penalty, seen = penalty
    if max_new_tokens == 0:
        if final is not None:
            final.append(_prefill(model, ids, resets)[1])
        return
    logits, state = _prefill(model, ids, resets)
    B = ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    eos_t = None if eos is None else torch.tensor(eos, device=ids.device)
    for step in range(max_new_tokens):
        tok = sample_next_token(logits, temperature, top_k, top_p, do_sample=sample, generator=generator,
                                repetition_penalty=repetition_penalty, seen=seen)
        if seen is not None:
            seen[torch.arange(B, device=ids.device), tok] = True
        if eos_t is not None:
            tok = torch.where(finished, torch.full_like(tok, fill), tok)
            finished = finished | torch.isin(tok, eos_t)
        done = step == max_new_tokens - 1 or (eos_t is not None and bool(finished.all()))
        if not done:
            # one step of the model on the carried state: the old state is dropped, so memory stays flat
            out = _call(model, tok[:, None], state=state, checked=False)
            logits, state = out.logits[:, 0], out.state
            del out
        elif final is not None:
            final.append(state)
        yield tok
        if done:
            return


def _trim_finished(new: List[torch.Tensor], eos: List[int]) -> List[torch.Tensor]:
    """Cut the steps after the first one at which every row had emitted an eos (the eager loop stops there)."""
    toks = torch.stack(new, dim=1)
    hit = torch.isin(toks, torch.tensor(eos, device=toks.device)).cummax(dim=1).values.all(dim=0)
    if bool(hit.any()):
        end = int(hit.nonzero()[0, 0]) + 1
        return new[:end]
    return new


def generate_stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: Optional[bool] = None,
                    eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                    attention_mask: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    use_cuda_graph: Optional[bool] = None, repetition_penalty: float = 1.0) -> Iterator[torch.Tensor]:
    """Yield the new tokens, one (B,) int64 tensor per step (at most ``max_new_tokens``; fewer when every row
    has emitted an eos). Arguments as for :func:`generate`; they are validated before the first step."""
    args = _setup(model, input_ids, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id,
                  pad_token_id, attention_mask, seed, generator, repetition_penalty)
    ids, sample, eos, fill, generator, resets, penalty = args
    use = _graph_with_penalty(_use_graph(model, use_cuda_graph), use_cuda_graph, penalty)
    return _pick_stream(model, use, 1, ids, max_new_tokens, temperature, top_k, top_p, sample, eos, fill,
                        generator, resets, None, penalty=penalty)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: Optional[bool] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             attention_mask: Optional[torch.Tensor] = None, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             stream: Optional[Callable[[torch.Tensor], None]] = None, return_state: bool = False,
             use_cuda_graph: Optional[bool] = None, repetition_penalty: float = 1.0):
    """Generate continuations of a batch of prompts.

    Args:
        input_ids: (B, S) prompt ids, left padded when rows differ in length.
        max_new_tokens: how many tokens to add (>= 0).
        temperature: softmax temperature; 0 means greedy.
        top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of probability top_p.
        do_sample: False forces greedy decoding; None samples iff temperature > 0.
        eos_token_id: an id or list of ids that ends a row (None: never stop early); finished rows then emit
            ``pad_token_id`` (default: the config's pad id, else the eos id).
        pad_token_id: also marks left padding (the leading run of it in each row) when no attention_mask is given.
        attention_mask: (B, S) 1 for real tokens, 0 for (left) padding.
        seed / generator: the random source for sampling (a seed builds a fresh generator on the input's device);
            neither: torch's global RNG. Greedy decoding is deterministic regardless.
        stream: called with each step's (B,) token tensor as soon as it is chosen.
        return_state: also return the state after the last fed token (the final token is not fed).
        use_cuda_graph: decode with a captured CUDA graph (:mod:`fastxlstm.generation.graph`): None (default) uses
            it whenever the model is on a CUDA device, False forces the eager loop, True requires the graph. Both
            paths choose the same tokens (greedy: identical; sampling: the same uniform draws per step).
        repetition_penalty: > 1 makes tokens already in the row (prompt or generated) less likely: their
            logits are divided by it where positive, multiplied where negative (1: off; the eager loop runs it).

    Returns:
        (B, S + n) int64: the prompts followed by n <= max_new_tokens new tokens (n < max_new_tokens only when all
        rows finished); with return_state, a tuple (tokens, state).
    """
    if stream is not None and not callable(stream):
        raise ValueError(f"stream must be a callable taking a (B,) tensor, got {type(stream).__name__}")
    ids, sample, eos, fill, generator, resets, penalty = _setup(model, input_ids, max_new_tokens, temperature,
                                                                top_k, top_p, do_sample, eos_token_id, pad_token_id,
                                                                attention_mask, seed, generator, repetition_penalty)
    use = _graph_with_penalty(_use_graph(model, use_cuda_graph), use_cuda_graph, penalty)
    # without a per-token consumer, the graph path checks for "all rows finished" every 8 steps only, so the host
    # runs ahead of the GPU; the steps past the end are trimmed below
    sync_every = 8 if (use and stream is None and not return_state) else 1
    final: list = []
    new = []
    for tok in _pick_stream(model, use, sync_every, ids, max_new_tokens, temperature, top_k, top_p, sample, eos,
                            fill, generator, resets, final, penalty=penalty):
        new.append(tok)
        if stream is not None:
            stream(tok)
    if new and eos is not None and sync_every > 1:
        new = _trim_finished(new, eos)
    tokens = torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids.clone()
    if return_state:
        return tokens, (final[0] if final else None)
    return tokens
