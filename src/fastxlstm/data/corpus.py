"""Corpora: the embedded default (the running interpreter's standard library), text files, directories of text
files, and pre-tokenised memmaps; each split deterministically into a training and a held-out part.

A corpus becomes a :class:`TokenStream`: all documents' tokens concatenated (1-D array) plus a same-length bool
array that is True at each document's first token. The training loop turns those flags into the model's
``resets`` so that packed documents never see each other's state.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["TokenStream", "Corpus", "stdlib_documents", "load_corpus", "stable_fraction", "DEFAULT_EVAL_FRACTION"]

DEFAULT_EVAL_FRACTION = 0.05
_TEXT_SUFFIXES_SKIP = {".pyc", ".so", ".o", ".a", ".png", ".jpg", ".jpeg", ".gif", ".zip", ".gz", ".tar", ".pdf",
                       ".bin", ".npy", ".safetensors", ".pt", ".whl", ".exe", ".dll", ".ico", ".wav", ".xz", ".bz2"}


class CorpusError(ValueError):
    """A corpus that cannot be used (missing, empty, too short): reported as a one-line usage error."""


@dataclass
class TokenStream:
    """Packed documents. tokens: (N,) integer ids; doc_start: (N,) bool, True at each document's first token."""
    tokens: np.ndarray
    doc_start: np.ndarray
    n_docs: int

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.doc_start.shape != self.tokens.shape:
            raise ValueError("tokens and doc_start must be 1-D arrays of the same length")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_token_lists(cls, docs: Sequence[Sequence[int]], vocab_size: int) -> "TokenStream":
        docs = [d for d in docs if len(d) > 0]
        dtype = np.uint8 if vocab_size <= 256 else (np.uint16 if vocab_size <= 65536 else np.int32)
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        total = int(lengths.sum())
        tokens = np.empty(total, dtype=dtype)
        starts = np.zeros(total, dtype=bool)
        pos = 0
        for d, n in zip(docs, lengths):
            tokens[pos:pos + n] = np.asarray(d, dtype=dtype) if not isinstance(d, np.ndarray) else d
            starts[pos] = True
            pos += int(n)
        return cls(tokens, starts, len(docs))


@dataclass
class Corpus:
    """The two splits of a corpus and where they came from."""
    train: TokenStream
    eval: TokenStream
    description: str


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (same on every machine, Python version and run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def _split_names(names: Sequence[str], eval_fraction: float) -> Tuple[List[int], List[int]]:
    """Indices of train / eval documents by a stable hash of their names; both parts non-empty when len >= 2."""
    fr = [stable_fraction(n) for n in names]
    ev = [i for i, f in enumerate(fr) if f < eval_fraction]
    tr = [i for i, f in enumerate(fr) if f >= eval_fraction]
    if len(names) >= 2 and not ev:
        j = min(tr, key=lambda i: fr[i])  # the file that came closest to the held-out side
        tr.remove(j)
        ev = [j]
    if len(names) >= 2 and not tr:
        j = max(ev, key=lambda i: fr[i])
        ev.remove(j)
        tr = [j]
    return tr, ev


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_documents() -> List[Tuple[str, str]]:
    """[(relative path, absolute path)] of the running interpreter's standard-library .py files, sorted.

    site-packages is left out (it depends on what is installed, not on the interpreter)."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for fn in filenames:
            if fn.endswith(".py"):
                full = os.path.join(dirpath, fn)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    out.sort()
    return out


def _read_text_file(path: str) -> Optional[str]:
    """The file's text, or None for binary / non-UTF-8 files (which a directory corpus skips)."""
    with open(path, "rb") as f:
        data = f.read()
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(path: str, name: str) -> List[Tuple[str, str]]:
    """[(name#line, text)] of a JSON-lines file: one document per line, its "text" field (blank lines skipped)."""
    import json
    with open(path, "rb") as f:
        raw = f.read()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CorpusError(f"--data {path}: not UTF-8 (byte offset {e.start})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"--data {path}: line {i} is not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CorpusError(f"--data {path}: line {i} has no string field \"text\" (JSON lines need "
                              f"{{\"text\": \"...\"}} on every line)")
        out.append((f"{name}#{i}", rec["text"]))
    return out


def _text_files(root: str) -> List[Tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for fn in filenames:
            if fn.startswith(".") or os.path.splitext(fn)[1].lower() in _TEXT_SUFFIXES_SKIP:
                continue
            full = os.path.join(dirpath, fn)
            out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    out.sort()
    return out


def _encode_docs(tokenizer, texts: List[str]) -> TokenStream:
    from .tokenizers import ByteTokenizer
    if isinstance(tokenizer, ByteTokenizer):
        docs = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    else:
        docs = tokenizer.encode_batch(texts)
    return TokenStream.from_token_lists(docs, tokenizer.vocab_size)


def load_text_documents(path: Optional[str]) -> Tuple[List[str], List[str], str]:
    """The text documents of a corpus as (train texts, eval texts, description).

    path None: the standard library (one document per .py file). A file: one document, split at a line
    boundary (the last ``DEFAULT_EVAL_FRACTION`` held out). A directory: every text file is a document. A
    JSON-lines file (.jsonl), alone or in a directory: every line's "text" field is a document. Documents are
    held out by a stable hash of their names (file path, plus #line for JSON lines)."""
    eval_fraction = DEFAULT_EVAL_FRACTION
    if path is None:
        files = stdlib_documents()
        desc = f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library ({stdlib_root()})"
    elif os.path.isdir(path):
        files = _text_files(path)
        desc = f"directory {path}"
    elif os.path.isfile(path) and path.lower().endswith(".jsonl"):
        files = [(os.path.basename(path), path)]
        desc = f"JSON lines {path}"
    elif os.path.isfile(path):
        text = _read_text_file(path)
        if text is None:
            raise CorpusError(f"--data {path}: not a UTF-8 text file (pre-tokenised data must end in .bin or .npy)")
        if not text.strip():
            raise CorpusError(f"--data {path}: the file is empty")
        return _split_one(text, f"file {path}")
    else:
        raise CorpusError(f"--data {path}: no such file or directory")
    texts, names = [], []
    for name, full in files:
        if full.lower().endswith(".jsonl"):
            for doc_name, t in _jsonl_documents(full, name):
                if t:
                    texts.append(t)
                    names.append(doc_name)
            continue
        t = _read_text_file(full)
        if t:
            texts.append(t)
            names.append(name)
    if not texts or not any(t.strip() for t in texts):
        raise CorpusError(f"--data {path if path is not None else 'default corpus'}: no non-empty text files found")
    if len(texts) == 1 and not any("#" in n for n in names):
        return load_text_documents(os.path.join(path, names[0]) if path is not None else files[0][1])
    if len(texts) == 1:  # one JSON-lines document: split it like a text file
        return _split_one(texts[0], f"{desc} (1 document)")
    tr, ev = _split_names(names, eval_fraction)
    return [texts[i] for i in tr], [texts[i] for i in ev], f"{desc}: {len(tr)} train / {len(ev)} held-out documents"


def _split_one(text: str, desc: str) -> Tuple[List[str], List[str], str]:
    """One document: the last ``DEFAULT_EVAL_FRACTION`` (from a line boundary) held out."""
    cut = int(len(text) * (1 - DEFAULT_EVAL_FRACTION))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    train, ev = text[:cut], text[cut:]
    if not ev:
        train, ev = text, text[-max(1, len(text) // 10):]
    return [train], [ev], desc


def load_memmap(path: str, dtype: str = "uint16", eod_token: Optional[int] = None,
                vocab_size: Optional[int] = None) -> Corpus:
    """A pre-tokenised corpus: a .npy array or a raw .bin of ``dtype`` (nanoGPT's uint16 layout), memory-mapped.

    Documents are delimited by ``eod_token`` when given (the token after each EOD starts a new document);
    the last ``DEFAULT_EVAL_FRACTION`` of tokens is held out."""
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CorpusError(f"--data {path}: not a plain .npy array ({e})") from None
    else:
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            raise CorpusError(f"--data-dtype {dtype!r} is not a numpy dtype") from None
        if np_dtype.kind not in "ui":
            raise CorpusError(f"--data-dtype must be an integer dtype, got {dtype}")
        arr = np.memmap(path, dtype=np_dtype, mode="r")
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind not in "ui":
        raise CorpusError(f"--data {path}: token array must hold integers, got {arr.dtype}")
    n = int(arr.shape[0])
    if n < 4:
        raise CorpusError(f"--data {path}: only {n} tokens")
    if vocab_size is not None:
        hi = int(arr.max())
        if hi >= vocab_size or int(arr.min()) < 0:
            raise CorpusError(f"--data {path}: token ids reach {hi}, outside the vocabulary of size {vocab_size} "
                              f"(pass the matching --tokenizer)")
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    if eod_token is not None:
        idx = np.flatnonzero(np.asarray(arr[:-1]) == eod_token) + 1
        starts[idx] = True
    cut = max(1, min(n - 2, int(n * (1 - DEFAULT_EVAL_FRACTION))))
    ev_starts = starts[cut:].copy()
    ev_starts[0] = True
    train = TokenStream(arr[:cut], starts[:cut], int(starts[:cut].sum()))
    ev = TokenStream(arr[cut:], ev_starts, int(ev_starts.sum()))
    return Corpus(train, ev, f"pre-tokenised {path} ({n:,} tokens, {arr.dtype})")


def load_corpus(path: Optional[str], tokenizer, dtype: str = "uint16", eod_token: Optional[int] = None) -> Corpus:
    """Load and tokenise ``path`` (None: the standard library) into train and held-out token streams."""
    if path is not None and path.endswith((".bin", ".npy")):
        if not os.path.isfile(path):
            raise CorpusError(f"--data {path}: no such file")
        return load_memmap(path, dtype=dtype, eod_token=eod_token, vocab_size=tokenizer.vocab_size)
    train_texts, eval_texts, desc = load_text_documents(path)
    train = _encode_docs(tokenizer, train_texts)
    ev = _encode_docs(tokenizer, eval_texts)
    if len(train) < 2 or len(ev) < 2:
        raise CorpusError(f"--data {path}: too little text ({len(train)} train / {len(ev)} held-out tokens)")
    return Corpus(train, ev, f"{desc} ({len(train):,} train / {len(ev):,} held-out tokens)")
