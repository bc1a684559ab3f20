"""Tokenizers for training and generation: raw UTF-8 bytes (the default) or a ``tokenizers`` tokenizer.json.

Both kinds share one small interface:

    tok.vocab_size             int
    tok.encode(text) -> list[int]
    tok.encode_batch(texts) -> list[list[int]]
    tok.decode(ids) -> str
    tok.token_bytes() -> np.ndarray (vocab_size,) int64, the number of UTF-8 bytes each token stands for
                                  (used to turn nats per token into bits per byte)
    tok.stream_decoder() -> object with .push(id) -> str and .flush() -> str (incremental, UTF-8 safe)
    tok.save(directory)        writes tokenizer.json, or tokenizer_config.json {"type": "bytes"}

``load_tokenizer(directory)`` reads back whichever of the two a directory holds.
"""
from __future__ import annotations

import codecs
import json
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "train_bpe", "resolve_tokenizer"]


class ByteTokenizer:
    """Token id = byte value of the UTF-8 encoding (vocab 256). Needs no file and no training."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def stream_decoder(self) -> "_ByteStreamDecoder":
        return _ByteStreamDecoder()

    def save(self, directory) -> None:
        _atomic_write_text(os.path.join(directory, "tokenizer_config.json"),
                           json.dumps({"type": "bytes", "vocab_size": 256}, indent=2) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class _ByteStreamDecoder:
    """Holds back the bytes of an unfinished multi-byte UTF-8 character until it is complete."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(bytes([int(token_id)]))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HFTokenizer:
    """A tokenizer.json (Hugging Face ``tokenizers``), e.g. GPT-NeoX's for the xLSTM-7B or a BPE trained here."""

    kind = "tokenizer.json"

    def __init__(self, tokenizer, source: Optional[str] = None):
        self.tok = tokenizer
        self.source = source
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._token_bytes = None

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        from tokenizers import Tokenizer
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises its own exception types for bad JSON
            raise ValueError(f"cannot read tokenizer {path}: {e}") from None
        return cls(tok, source=path)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes per token. Byte-level BPE tokens map exactly to bytes through the GPT-2 byte alphabet;
        for other tokenizers decode each token alone (close enough for bits-per-byte reporting)."""
        if self._token_bytes is not None:
            return self._token_bytes
        out = np.zeros(self.vocab_size, dtype=np.int64)
        spec = json.loads(self.tok.to_str())
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        decoder = (spec.get("decoder") or {}).get("type")
        byte_level = decoder == "ByteLevel"
        inv = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else None
        for i in range(self.vocab_size):
            if i in special:
                continue
            piece = self.tok.id_to_token(i)
            if piece is None:
                continue
            if byte_level and all(c in inv for c in piece):
                out[i] = len(piece)
            else:
                out[i] = len(self.tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        self._token_bytes = out
        return out

    def stream_decoder(self) -> "_TextStreamDecoder":
        return _TextStreamDecoder(self)

    def save(self, directory) -> None:
        _atomic_write_text(os.path.join(directory, "tokenizer.json"), self.tok.to_str(pretty=True))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


class _TextStreamDecoder:
    """Incremental decoding for subword tokenizers: decode everything so far and emit the new suffix, holding
    back while the text ends in U+FFFD (a byte-level token that splits a multi-byte character)."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        self.ids: List[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new = text[self.emitted:]
        self.emitted = len(text)
        return new


def _bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters (used by byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ("<|endoftext|>",)) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style: any text encodes, no unknown token) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens) + 1:
        raise ValueError(f"--train-tokenizer vocab size must be an int >= {256 + len(special_tokens) + 1} "
                         f"(the 256 byte tokens plus merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, source="trained")


def load_tokenizer(directory) -> "ByteTokenizer | HFTokenizer":
    """The tokenizer stored in a model/run directory: tokenizer.json if present, else raw bytes.

    A directory with neither tokenizer.json nor tokenizer_config.json {"type": "bytes"} is assumed to be a
    byte-level model only when its vocabulary is 256 (checked by the caller)."""
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    return ByteTokenizer()


def resolve_tokenizer(spec: str):
    """``--tokenizer``: "bytes", a tokenizer.json path, or a directory holding one."""
    if spec in (None, "", "bytes", "byte"):
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise FileNotFoundError(f"--tokenizer {spec}: no such file or directory (use 'bytes' or a tokenizer.json)")
    return HFTokenizer.from_file(spec)


def _atomic_write_text(path: str, text: str) -> None:
    from .._fileio import write_text
    write_text(path, text)
