"""The Nicheformer encoder in plain PyTorch, with the public checkpoints' module names.

Module names and state-dict keys match the Lightning checkpoints of
theislab/nicheformer: ``embeddings``, ``positional_embedding``, ``encoder``
(``nn.TransformerEncoder`` of post-norm layers) and the ``encoder_layer``
prototype it was built from, which the encoder deep-copies and never calls.
Reading and writing those checkpoints: :mod:`.checkpoint`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..vocab import EXTRA_EMBEDDINGS, PAD

#: Lightning hyper-parameter name -> NicheformerConfig field.
HPARAM_NAMES = {
    "n_tokens": "n_tokens",
    "dim_model": "d_model",
    "nheads": "n_heads",
    "dim_feedforward": "d_ff",
    "nlayers": "n_layers",
    "context_length": "context_length",
    "dropout": "dropout",
}


@dataclass(frozen=True)
class NicheformerConfig:
    """Architecture of a Nicheformer encoder (defaults: the published 12-layer model)."""

    n_tokens: int = 20_340
    d_model: int = 512
    n_heads: int = 16
    d_ff: int = 1024
    n_layers: int = 12
    context_length: int = 1500
    dropout: float = 0.0

    @classmethod
    def small(cls, n_tokens: int, **changes) -> NicheformerConfig:
        """A tiny configuration for demos and tests: 3 layers, 4 heads, d_model 32, context 128."""
        return cls(**{"n_tokens": n_tokens, "d_model": 32, "n_heads": 4, "d_ff": 64, "n_layers": 3,
                      "context_length": 128, **changes})  # fmt: skip

    def hyper_parameters(self) -> dict:
        """The Lightning ``hyper_parameters`` of a checkpoint with this architecture."""
        fields = asdict(self)
        hp = {name: fields[field] for name, field in HPARAM_NAMES.items()}
        return {**hp, "batch_first": True, "learnable_pe": True, "specie": True, "assay": True, "modality": True}


class Nicheformer(nn.Module):
    """Nicheformer encoder: ``forward(tokens [B, L]) -> hidden states [B, L, d_model]``.

    Padding (id 1) is masked as keys; position ``i`` gets positional embedding ``i``.
    """

    def __init__(self, config: NicheformerConfig):
        super().__init__()
        self.config = config
        c = config
        if c.d_model % c.n_heads:
            raise ValueError(f"d_model {c.d_model} is not divisible by n_heads {c.n_heads}")
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=c.d_model,
            nhead=c.n_heads,
            dim_feedforward=c.d_ff,
            dropout=c.dropout,
            batch_first=True,
            layer_norm_eps=1e-12,
        )
        self.encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=c.n_layers, enable_nested_tensor=False)
        self.embeddings = nn.Embedding(c.n_tokens + EXTRA_EMBEDDINGS, c.d_model, padding_idx=PAD)
        self.positional_embedding = nn.Embedding(c.context_length, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        for m in self.modules():  # as the public model initializes its linear layers
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [cells, length], got {tuple(tokens.shape)}")
        L = tokens.shape[1]
        if L > self.config.context_length:
            raise ValueError(f"{L} tokens per cell exceed the context length {self.config.context_length}")
        positions = torch.arange(L, device=tokens.device)
        x = self.dropout(self.embeddings(tokens) + self.positional_embedding(positions))
        return self.encoder(x, src_key_padding_mask=tokens == PAD)


def small_nicheformer(n_tokens: int, seed: int = 0, **changes) -> Nicheformer:
    """The small configuration with weights drawn from a fixed seed (demos, tests, dry runs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Nicheformer(NicheformerConfig.small(n_tokens, **changes)).eval()
