"""BERT (Devlin et al. 2019), written out: a bidirectional transformer encoder.

    x = LayerNorm(word[input_ids] + position[0..T-1] + token_type[token_type_ids])
    for each layer:                                              (post-LayerNorm)
        x = LayerNorm(x + Dropout(attn_out(MultiHeadSelfAttention(x))))
        x = LayerNorm(x + Dropout(ffn_out(GELU(ffn_in(x)))))
    pooler(x) = tanh(Linear(x[:, 0]))                            ([CLS] -> sentence vector)

Attention sees every real token in both directions and no padding token.  The default model of
optimlab's sentiment classifier is MiniLM-L6-H384 (sentence-transformers/all-MiniLM-L6-v2: 6
layers, width 384, 12 heads, exact GELU), which :meth:`BertModel.from_pretrained` loads from a
Hugging Face checkpoint directory; :data:`HF_NAMES` maps its tensor names to this module's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ._checkpoint import load_into, load_weights, read_config, resolve_model_dir
from .gpt2 import activation

__all__ = ["BertConfig", "BertModel"]


@dataclass
class BertConfig:
    """Hyper-parameters; the defaults are BERT-base.  Names as in Hugging Face's BertConfig."""

    vocab_size: int = 30522                 # WordPiece vocabulary (uncased English)
    hidden_size: int = 768                  # width of every token's vector
    num_hidden_layers: int = 12
    num_attention_heads: int = 12           # hidden_size % num_attention_heads == 0
    intermediate_size: int = 3072           # feed-forward hidden width
    hidden_act: str = "gelu"                # exact (erf) GELU, as BERT
    hidden_dropout_prob: float = 0.1        # dropout on embeddings and residual branches
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512      # longest sequence (learned positions)
    type_vocab_size: int = 2                # segment A / B embeddings
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0                   # [PAD]

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        if cfg.get("model_type", "bert") != "bert":
            raise ValueError(f"not a BERT config: model_type {cfg.get('model_type')!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {cfg['position_embedding_type']!r} is not "
                             f"supported (only 'absolute')")
        if cfg.get("is_decoder", False) or cfg.get("add_cross_attention", False):
            raise ValueError("decoder BERT configs are not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention, its output projection, and the residual + LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        h = config.hidden_size
        self.n_head = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out = nn.Linear(h, h)
        self.attn_pdrop = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        # softmax(q k^T / sqrt(head_dim) + bias) v; bias hides padding keys
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.norm(x + self.dropout(self.out(y)))


class Layer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, attn_bias)
        return self.norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


class BertModel(nn.Module):
    """The BERT encoder: ``forward`` returns the last hidden states, ``pool`` BERT's pooler
    output (tanh(Linear([CLS])), used by BertForSequenceClassification and CS224N)."""

    model_type = "bert"

    def __init__(self, config: BertConfig, add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooler else None
        self.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (what FSDP shards one by one)."""
        return self.layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """BERT's initialization: N(0, 0.02) weights and embeddings, zero biases, unit
        LayerNorms, a zero [PAD] embedding."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif ".norm." in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=generator)
        with torch.no_grad():
            self.embeddings.word.weight[self.config.pad_token_id].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` (B, T) int; ``attention_mask`` (B, T), 1 for real tokens, 0 for
        padding; ``token_type_ids`` default all 0 (one segment).  Returns (B, T, hidden_size)."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attn_bias = None
        if attention_mask is not None:
            dtype = self.embeddings.word.weight.dtype
            hide = ~attention_mask.to(torch.bool)[:, None, None, :]        # (B, 1, 1, T) keys
            attn_bias = torch.zeros(hide.shape, dtype=dtype, device=input_ids.device)
            attn_bias.masked_fill_(hide, torch.finfo(dtype).min)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, attn_bias)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh(W h_[CLS] + b), (B, hidden_size)."""
        if self.pooler is None:
            raise ValueError("this BERT has no pooler weights (use 'cls' or 'mean' pooling)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike | None = None, **overrides) -> "BertModel":
        """Load a Hugging Face BERT checkpoint directory (config.json + model.safetensors or
        pytorch_model.bin; BertModel or BertFor* with its ``bert.`` prefix, task heads
        ignored).  ``None`` is the default model, MiniLM-L6-H384.  ``overrides`` replace config
        fields (e.g. ``hidden_dropout_prob=0.0``)."""
        d = resolve_model_dir(model_dir)
        config = BertConfig.from_hf({**read_config(d), **overrides})
        state = convert_hf_state_dict(load_weights(d))
        model = cls(config, add_pooler="pooler.weight" in state)
        load_into(model, state, str(d))
        return model


#: Hugging Face BertModel tensor names -> this module's (regex, replacement), applied in order.
HF_NAMES = [
    (r"^embeddings\.word_embeddings\.", "embeddings.word."),
    (r"^embeddings\.position_embeddings\.", "embeddings.position."),
    (r"^embeddings\.token_type_embeddings\.", "embeddings.token_type."),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.norm."),
    (r"^pooler\.dense\.", "pooler."),
]
_HF_NAMES = [(re.compile(p), r) for p, r in HF_NAMES]


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BERT tensors -> this module's.  Drops the ``bert.`` prefix of BertFor*
    checkpoints, their task heads (``cls.``, ``classifier.``) and the ``position_ids`` buffer;
    old checkpoints' LayerNorm ``gamma``/``beta`` are read as ``weight``/``bias``."""
    out = {}
    for key, t in state.items():
        if key.startswith("bert."):
            key = key[len("bert."):]
        if key.startswith(("cls.", "classifier.")) or key.endswith("position_ids"):
            continue
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        for pattern, repl in _HF_NAMES:
            new, n = pattern.subn(repl, key)
            if n:
                key = new
                break
        out[key] = t
    return out
