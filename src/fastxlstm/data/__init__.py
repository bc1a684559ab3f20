"""Data for training and evaluation: corpora (the embedded default is the interpreter's standard library),
tokenizers (bytes, tokenizer.json, BPE training) and deterministic packed batches with document resets."""
from .corpus import Corpus, CorpusError, TokenStream, load_corpus, stdlib_documents
from .loader import Batch, WindowSampler, eval_windows, make_batch
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, resolve_tokenizer, train_bpe

__all__ = ["Corpus", "CorpusError", "TokenStream", "load_corpus", "stdlib_documents", "Batch", "WindowSampler",
           "eval_windows", "make_batch", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "resolve_tokenizer",
           "train_bpe"]
