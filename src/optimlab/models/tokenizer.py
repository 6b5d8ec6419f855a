"""Tokenizers (the ``tokenizers`` library, from a checkpoint's files) and batching.

A checkpoint's tokenizer.json may fix padding and truncation (MiniLM's pads every sequence to
128 tokens and cuts at 128): :func:`load_tokenizer` turns padding off and sets truncation to
``max_length``; :class:`Collator` pads each batch to its own longest sequence.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ._checkpoint import require, resolve_model_dir

__all__ = ["load_tokenizer", "collate", "Collator"]


def load_tokenizer(model_dir: str | os.PathLike | None = None, max_length: int = 128):
    """A ``tokenizers.Tokenizer`` for a checkpoint directory (``None``: the default model).

    Read from tokenizer.json; else built from vocab.json + merges.txt (GPT-2's byte-level BPE)
    or vocab.txt (BERT's WordPiece, lower-cased unless tokenizer_config.json says otherwise).
    No padding; sequences are cut at ``max_length`` tokens, special tokens included.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    tk = require("tokenizers", "loading a tokenizer")
    d = resolve_model_dir(model_dir)
    if (d / "tokenizer.json").is_file():
        tok = tk.Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tok = tk.Tokenizer(tk.models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
    elif (d / "vocab.txt").is_file():
        lower = True
        if (d / "tokenizer_config.json").is_file():
            with open(d / "tokenizer_config.json", encoding="utf-8") as f:
                lower = bool(json.load(f).get("do_lower_case", True))
        bert = tk.implementations.BertWordPieceTokenizer(str(d / "vocab.txt"), lowercase=lower)
        tok = bert._tokenizer
    else:
        raise FileNotFoundError(f"{str(d)!r} has no tokenizer.json, vocab.json + merges.txt, "
                                f"or vocab.txt")
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def collate(records: Sequence, tokenizer, pad_token_id: int) -> dict:
    """Records (``optimlab.data.Record`` or any (id, text, label) tuples) -> a batch:

    ``input_ids`` (B, T) int64, padded on the right with ``pad_token_id`` to the batch's
    longest sequence; ``attention_mask`` (B, T) int64, 1 for real tokens; ``labels`` (B,)
    int64 when every record has a label (absent when none has; mixed is an error);
    ``ids``: the records' ids, a list.
    """
    if not records:
        raise ValueError("collate: empty batch")
    ids, texts, labels = zip(*((r[0], r[1], r[2]) for r in records))
    encodings = tokenizer.encode_batch(list(texts))
    T = max(len(e.ids) for e in encodings)
    input_ids = torch.full((len(records), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(records), T), dtype=torch.long)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        input_ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "ids": list(ids)}
    n_labeled = sum(label is not None for label in labels)
    if n_labeled == len(labels):
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    elif n_labeled:
        raise ValueError("collate: a batch mixes labeled and unlabeled records")
    return batch


class Collator:
    """``collate`` as a picklable callable for ``DataLoader(collate_fn=...)``."""

    def __init__(self, tokenizer, pad_token_id: int):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id

    def __call__(self, records: Sequence) -> dict:
        return collate(records, self.tokenizer, self.pad_token_id)
