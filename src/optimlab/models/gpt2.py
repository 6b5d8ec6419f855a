"""GPT-2 (Radford et al. 2019), written out: a decoder-only transformer.

    x = wte[input_ids] + wpe[positions]                        (learned positions)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))   (pre-LayerNorm)
    h = ln_f(x)

attn is multi-head causal self-attention (a token sees itself and the tokens before it, never a
padding token); mlp is Linear(n_embd, 4 n_embd) -> GELU (tanh approximation, as GPT-2) ->
Linear(4 n_embd, n_embd).  Module names follow Hugging Face's GPT2Model, so a checkpoint's keys
map one to one; its ``Conv1D`` layers store weights as (in, out), the transpose of
``nn.Linear``'s (out, in), and :meth:`GPT2Model.from_pretrained` transposes them.

One departure from transformers' GPT2Model: with an attention mask, positions count real tokens
(0, 1, 2, ... from the first non-padding token), so left padding gives the same result as right
padding.  With right padding (what :class:`optimlab.models.Collator` produces) this is the same
as transformers' ``arange`` positions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ._checkpoint import load_into, load_weights, read_config, resolve_model_dir

__all__ = ["GPT2Config", "GPT2Model"]


@dataclass
class GPT2Config:
    """Hyper-parameters; the defaults are GPT-2 small (124M).  Names as in Hugging Face's
    GPT2Config, so ``GPT2Config.from_hf(config.json)`` reads a checkpoint's config."""

    vocab_size: int = 50257            # byte-level BPE vocabulary (50,000 merges + 256 bytes + <|endoftext|>)
    n_positions: int = 1024            # longest sequence: one learned position embedding each
    n_embd: int = 768                  # width of the residual stream
    n_layer: int = 12                  # transformer blocks
    n_head: int = 12                   # attention heads per block; n_embd % n_head == 0
    n_inner: int | None = None         # MLP hidden width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # "gelu_new": GELU, tanh approximation (GPT-2's)
    embd_pdrop: float = 0.1            # dropout on token + position embeddings
    attn_pdrop: float = 0.1            # dropout on the attention probabilities
    resid_pdrop: float = 0.1           # dropout on each residual branch (attn and mlp outputs)
    layer_norm_epsilon: float = 1e-5
    scale_attn_by_inverse_layer_idx: bool = False  # also divide scores by (layer index + 1)
    eos_token_id: int = 50256          # <|endoftext|>; used for padding when pad_token_id is None
    pad_token_id: int | None = None    # GPT-2 has no padding token of its own

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPT2Config":
        """From a Hugging Face ``config.json`` dict (unknown keys are ignored; options this
        implementation does not have are refused)."""
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"not a GPT-2 config: model_type {cfg.get('model_type')!r}")
        if cfg.get("scale_attn_weights", True) is not True:
            raise ValueError("scale_attn_weights=False is not supported")
        if cfg.get("add_cross_attention", False):
            raise ValueError("add_cross_attention=True is not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def padding_id(self) -> int:
        return self.pad_token_id if self.pad_token_id is not None else self.eos_token_id


_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; "
                         f"choose from {', '.join(_ACTIVATIONS)}") from None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)   # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)       # heads back to the stream
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        head_dim = config.n_embd // config.n_head
        self.scale = 1.0 / math.sqrt(head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T * scale + bias) v; bias is 0 where allowed, a huge negative elsewhere
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, is_causal=attn_bias is None,
            dropout_p=self.attn_pdrop if self.training else 0.0, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.act = activation(config.activation_function)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm: each sub-layer reads a normalized copy and adds to the residual stream."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_bias)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2Model(nn.Module):
    """The GPT-2 trunk (no language-model head): ``forward`` returns the final hidden states."""

    model_type = "gpt2"

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)      # token embeddings
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)     # position embeddings
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (what FSDP shards one by one)."""
        return self.h

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    @property
    def pad_token_id(self) -> int:
        return self.config.padding_id

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2's initialization: N(0, 0.02) weights, zero biases, unit LayerNorms, and the
        residual projections (c_proj) scaled by 1/sqrt(2 n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` (B, T) int; ``attention_mask`` (B, T), 1 for real tokens, 0 for
        padding.  Returns (B, T, n_embd); rows at padding positions are meaningless."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds n_positions {self.config.n_positions}")
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            attn_bias = None                       # plain causal attention
        else:
            keep = attention_mask.to(torch.bool)
            positions = (keep.long().cumsum(1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            allowed = causal[None, None] & keep[:, None, None, :]        # (B, 1, T, T)
            dtype = self.wte.weight.dtype
            attn_bias = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
            attn_bias.masked_fill_(~allowed, torch.finfo(dtype).min)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.h:
            x = block(x, attn_bias)
        return self.ln_f(x)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, **overrides) -> "GPT2Model":
        """Load a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors or
        pytorch_model.bin, from GPT2Model or GPT2LMHeadModel).  ``overrides`` replace config
        fields (e.g. ``resid_pdrop=0.0``)."""
        d = resolve_model_dir(model_dir)
        config = GPT2Config.from_hf({**read_config(d), **overrides})
        model = cls(config)
        load_into(model, convert_hf_state_dict(load_weights(d)), str(d))
        return model


# Conv1D layers in Hugging Face's GPT-2: weight stored (in_features, out_features).
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors -> this module's: drop the ``transformer.`` prefix (LM-head
    checkpoints), the LM head (tied to wte) and the stored causal-mask buffers; transpose the
    Conv1D weights.  (The square c_proj weights make the transpose impossible to infer from
    shapes, so it goes by name.)"""
    out = {}
    for key, t in state.items():
        if key.startswith("transformer."):
            key = key[len("transformer."):]
        if key.startswith("lm_head.") or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if key.endswith(_CONV1D):
            t = t.t()
        out[key] = t.contiguous()
    return out
