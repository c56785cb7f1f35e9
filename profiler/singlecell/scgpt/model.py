"""scGPT's encoder in plain PyTorch, with the published state-dict names (``scgpt/model/model.py``).

Model (``TransformerModel._encode``): gene embedding + layer norm (``encoder.*``), a continuous value
encoder (``value_encoder.*``), their sum through ``nn.TransformerEncoder`` of post-norm layers
(``transformer_encoder.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

@dataclass(frozen=True)
class ScGPTConfig:
    """Architecture of an scGPT encoder (args.json names in comments)."""

    n_tokens: int  # len(vocab) after the special tokens
    d_model: int = 512  # embsize
    n_heads: int = 8  # nheads
    d_hid: int = 512  # d_hid
    n_layers: int = 12  # nlayers
    dropout: float = 0.2  # dropout
    pad_id: int = 0  # vocab[pad_token]
    pad_value: int = -2  # pad_value
    n_bins: int = 51  # n_bins


class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, pad_id: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    def __init__(self, d_model: int, max_value: int = 512):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x):
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)  # scGPT clips values at 512
        return self.norm(self.linear2(self.activation(self.linear1(x))))


class ScGPT(nn.Module):
    """scGPT encoder: ``forward(genes [B, L], values [B, L], padding [B, L]) -> [B, L, d_model]``."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        c = self.config = config
        self.encoder = GeneEncoder(c.n_tokens, c.d_model, c.pad_id)
        self.value_encoder = ContinuousValueEncoder(c.d_model)
        layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_hid, c.dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)

    def forward(self, genes, values, src_key_padding_mask):
        x = self.encoder(genes) + self.value_encoder(values)
        return self.transformer_encoder(x, src_key_padding_mask=src_key_padding_mask)

