"""Velocity-space classifier-free guidance (method.md §3).

``u_w = (1 + w)·u(x, t, y) - w·u(x, t, ∅)``; ``w = 0`` is the conditional model (one forward), and
``s = 1 + w`` is the guidance scale in the other common convention. The null label ``∅`` is the
integer ``num_classes``.
"""

from __future__ import annotations

import torch

from distillkac.errors import DistillKacError


def null_labels(batch: int, num_classes: int, device=None) -> torch.Tensor:
    """A batch of null labels (``num_classes``; 0 for an unconditional model)."""
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def check_guidance(weight: float, num_classes: int) -> float:
    weight = float(weight)
    if not weight == weight or abs(weight) == float("inf"):
        raise DistillKacError(f"guidance must be a finite number, got {weight}")
    if weight != 0 and num_classes == 0:
        raise DistillKacError("guidance needs a class-conditional model; this model is unconditional (use 0)")
    return weight


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """Guided velocity from one batched forward of doubled size (conditional rows, then null rows)."""
    if weight == 0:
        return model(x, t, y)
    null = null_labels(x.shape[0], model.num_classes, device=y.device)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    conditional, unconditional = both.chunk(2)
    return (1 + weight) * conditional - weight * unconditional
