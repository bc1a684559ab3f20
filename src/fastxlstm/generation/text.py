"""Text in, text out: a tokenizer around the token-level generation.

    from fastxlstm.generation.text import sample_text, generate_texts, ChatSession

- :func:`sample_text`: one prompt, streamed piece by piece, with stop sequences, eos and repetition penalty;
- :func:`generate_texts`: several prompts in one left-padded batch;
- :class:`ChatSession`: turns of a conversation on one carried recurrent state: each turn feeds only its own
  tokens, so a turn costs the same however long the conversation already is.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .sampling import apply_repetition_penalty, check_repetition_penalty, sample_next_token

__all__ = ["sample_text", "generate_texts", "ChatSession", "StopMatcher"]


class StopMatcher:
    """Text-level stop sequences over a stream of decoded pieces: :meth:`push` returns the text that is safe to
    show (never a part of a stop sequence, held back while it could still become one); :attr:`stopped` turns
    True once a stop sequence appeared, the text being cut just before it."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        if any(not isinstance(s, str) for s in self.stops):
            raise ValueError("stop sequences must be strings")
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        # hold back the longest tail that is a prefix of some stop sequence
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _encode_prompt(tokenizer, prompt: str) -> List[int]:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0, temperature: float = 0.8,
                top_k: Optional[int] = None, top_p: Optional[float] = None,
                stream: Optional[Callable[[str], None]] = None, stop: Sequence[str] = (),
                eos_token_id=None, repetition_penalty: float = 1.0, use_cuda_graph: Optional[bool] = None) -> str:
    """Prompt + a sampled continuation as text; ``stream`` receives each decoded piece as it is produced
    (multi-byte UTF-8 characters are held back until complete).

    stop: strings that end the continuation (not included in it); eos_token_id: id(s) that end it (not
    decoded); repetition_penalty: see :func:`fastxlstm.generation.sample_next_token`."""
    ids = _encode_prompt(tokenizer, prompt)
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    dec = tokenizer.stream_decoder()
    matcher = StopMatcher(stop)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pieces = [prompt]
    if stream is not None:
        stream(prompt)

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            if stream is not None:
                stream(text)

    for tok in model.generate_stream(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     seed=seed, eos_token_id=sorted(eos) or None,
                                     repetition_penalty=repetition_penalty, use_cuda_graph=use_cuda_graph):
        t = int(tok[0])
        if t in eos:
            break
        emit(matcher.push(dec.push(t)))
        if matcher.stopped:
            break
    if not matcher.stopped:
        emit(matcher.push(dec.flush()))
        emit(matcher.flush())
    return "".join(pieces)


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int = 0,
                   temperature: float = 0.8, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   stop: Sequence[str] = (), eos_token_id=None, repetition_penalty: float = 1.0,
                   use_cuda_graph: Optional[bool] = None) -> List[str]:
    """The continuations (without the prompts) of several prompts, generated as one batch: the prompts are
    left padded, the state reset at each row's first real token, so each row continues its own prompt."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    encoded = [_encode_prompt(tokenizer, p) for p in prompts]
    S = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), S, dtype=torch.long)
    mask = torch.zeros(len(encoded), S, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, S - len(e):] = torch.tensor(e)
        mask[i, S - len(e):] = 1
    eos = sorted(set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or [])))
    out = model.generate(ids.to(model.device), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, attention_mask=mask.to(model.device), eos_token_id=eos or None,
                         repetition_penalty=repetition_penalty, use_cuda_graph=use_cuda_graph)
    texts = []
    for row in out[:, S:].tolist():
        if eos:
            row = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
        matcher = StopMatcher(stop)
        text = matcher.push(tokenizer.decode(row))
        texts.append(text + matcher.flush())
    return texts


class ChatSession:
    """A conversation on one recurrent state. Each :meth:`turn` feeds the user's text (wrapped in
    ``user_template``) on the state left by the previous turn and samples the reply until a stop sequence
    (by default the start of the next user line), an eos or ``max_new_tokens``.

    Nothing of the history is read again: the cost of a turn depends only on its own length (see
    :attr:`tokens_fed`), the state has a fixed size."""

    def __init__(self, model, tokenizer, user_template: str = "User: {text}\nAssistant:",
                 stop: Sequence[str] = ("\nUser:",), max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                 eos_token_id=None, seed: int = 0, system: Optional[str] = None):
        if "{text}" not in user_template:
            raise ValueError("user_template must contain {text}")
        self.model, self.tokenizer = model, tokenizer
        self.user_template, self.stop = user_template, list(stop)
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.penalty = check_repetition_penalty(repetition_penalty)
        self.eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self.generator = torch.Generator(device=model.device)
        self.generator.manual_seed(seed)
        self.state = None
        self.tokens_fed = 0          # tokens fed to the model in the last turn
        self._seen = torch.zeros(1, model.vocab_size, dtype=torch.bool, device=model.device)
        self._unfed: List[int] = []  # the last sampled token, not yet fed
        if system:
            self._feed(self.tokenizer.encode(system))

    @torch.no_grad()
    def _feed(self, ids: List[int]) -> torch.Tensor:
        self.model.eval()
        x = torch.tensor([self._unfed + ids], dtype=torch.long, device=self.model.device)
        self._unfed = []
        self.tokens_fed += x.shape[1]
        out = self.model(x, state=self.state)
        self.state = out.state
        return out.logits[:, -1]

    @torch.no_grad()
    def turn(self, text: str, stream: Optional[Callable[[str], None]] = None) -> str:
        """The reply to ``text`` (streamed to ``stream`` piece by piece)."""
        self.tokens_fed = 0
        prompt_ids = self.tokenizer.encode(self.user_template.format(text=text))
        self._seen[0, torch.tensor(prompt_ids, dtype=torch.long, device=self.model.device)] = True
        logits = self._feed(prompt_ids)
        dec, matcher, reply = self.tokenizer.stream_decoder(), StopMatcher(self.stop), []
        for _ in range(self.max_new_tokens):
            if self.penalty != 1.0:
                logits = apply_repetition_penalty(logits.float(), self._seen, self.penalty)
            tok = int(sample_next_token(logits, self.temperature, self.top_k, self.top_p,
                                        generator=self.generator)[0])
            self._seen[0, tok] = True
            if tok in self.eos:
                self._unfed = [tok]
                break
            piece = matcher.push(dec.push(tok))
            if piece:
                reply.append(piece)
                if stream is not None:
                    stream(piece)
            if matcher.stopped:
                self._unfed = [tok]
                break
            logits = self._feed([tok])
        else:
            tail = matcher.push(dec.flush()) + matcher.flush()
            if tail:
                reply.append(tail)
                if stream is not None:
                    stream(tail)
        return "".join(reply)
