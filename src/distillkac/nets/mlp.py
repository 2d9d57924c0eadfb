"""Residual MLP predicting the velocity ``u(x, t, y)`` for low-dimensional data (the 2-D toys).

``h = Linear(x)``, then ``depth`` residual blocks ``h += W2·dropout(SiLU(W1·SiLU(adaLN(h, emb))))`` with
``adaLN(h, emb) = LayerNorm(h)·(1 + scale) + shift`` and ``(scale, shift)`` a linear function of the
time + label embedding (the same conditioning as the UNet, null label included), then
LayerNorm -> SiLU -> a zero-initialised linear output layer (a fresh network predicts exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillkac.errors import DistillKacError
from distillkac.fields import require
from distillkac.nets.unet import (
    TIME_SCALE,
    ConditionEmbedding,
    ConfiguredNetwork,
    JsonConfig,
    check_conditioning,
    initialise_parameters,
)


@dataclass
class MLPConfig(JsonConfig):
    """Architecture of the residual MLP; ``to_dict``/``from_dict`` round-trip through JSON."""

    kind: str = "mlp"
    dim: int = 2
    hidden: int = 256
    depth: int = 4
    num_classes: int = 0
    time_scale: float = TIME_SCALE
    dropout: float = 0.0

    def validate(self) -> None:
        """Raise DistillKacError (one line, naming the field) for a config that cannot build an MLP."""
        require(self.kind == "mlp", "MLPConfig.kind", "must be 'mlp'", self.kind)
        self._require_positive_ints("dim", "hidden", "depth")
        self._validate_conditioning()

    @property
    def data_shape(self) -> tuple[int]:
        return (self.dim,)


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.emb_proj = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.dropout(F.silu(self.fc1(F.silu(z)))))


class MLP(ConfiguredNetwork):
    """``model(x [B, dim], t [B], y [B]) -> velocity [B, dim]`` (same dtype as ``x``).

    Labels as for the UNet: ``0..num_classes-1`` or the null label ``num_classes``.  ``generator``
    draws the initial weights (a fresh OS-seeded one if None); ``device="meta"`` allocates nothing.
    """

    config: MLPConfig

    def _build(self) -> None:
        cfg = self.config
        self.embedding = ConditionEmbedding(cfg.hidden, cfg.hidden, cfg.num_classes, cfg.time_scale)
        self.input_proj = nn.Linear(cfg.dim, cfg.hidden)
        self.blocks = nn.ModuleList(MLPBlock(cfg.hidden, cfg.dropout) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(cfg.hidden)
        self.output = nn.Linear(cfg.hidden, cfg.dim)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-draw all weights from ``generator``; the output layer starts at exactly zero."""
        initialise_parameters(self, generator, zero_modules=[self.output])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.config.dim:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DistillKacError(f"x: expected shape [B, {self.config.dim}], got {shape}")
        check_conditioning(t, y, x.shape[0], self.null_label)
        emb = self.embedding(t, y)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.out_norm(h))).to(x.dtype)
