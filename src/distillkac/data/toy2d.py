"""Labelled 2-D toys: a 4x4 grid of Gaussians (an exact mixture density) and a checkerboard."""

from __future__ import annotations

import torch

from distillkac.data.dataset import DataConfig, InMemoryDataset
from distillkac.errors import DistillKacError

#: Toy "grid": a 4x4 grid of equally weighted isotropic Gaussians, one class per mode, means at
#: {-0.75, -0.25, 0.25, 0.75}^2 (class k = row k // 4, column k % 4), standard deviation 0.05.
GRID_SIDE = 4
GRID_SPACING = 0.5
GRID_STD = 0.05
#: Toy "checkerboard": [-1, 1]^2 cut into 4x4 squares of side 0.5; the 8 squares with (row + column)
#: even are filled, each is one class, and points are uniform inside their square.
CHECKER_SIDE = 4


def toy_mixture(cfg: DataConfig) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The exact "grid" mixture: means float64 [16, 2], the common std, and weights float64 [16].

    The density is sum_k w_k N(x; m_k, std^2 I); class k is mode k.
    """
    if cfg.toy != "grid":
        raise DistillKacError(f"data.toy: only the grid toy is a Gaussian mixture, got {cfg.toy!r}")
    coords = (torch.arange(GRID_SIDE, dtype=torch.float64) - (GRID_SIDE - 1) / 2) * GRID_SPACING
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    means = torch.stack([cols.flatten(), rows.flatten()], dim=1)
    weights = torch.full((GRID_SIDE * GRID_SIDE,), 1.0 / (GRID_SIDE * GRID_SIDE), dtype=torch.float64)
    return means, GRID_STD, weights


def checkerboard_squares() -> tuple[torch.Tensor, float]:
    """Lower-left corners float64 [8, 2] of the filled squares (class k = square k), and their side.

    The density is uniform, 1 / (8 * side^2), on the filled squares.
    """
    side = 2.0 / CHECKER_SIDE
    corners = [(-1.0 + col * side, -1.0 + row * side)
               for row in range(CHECKER_SIDE) for col in range(CHECKER_SIDE) if (row + col) % 2 == 0]
    return torch.tensor(corners, dtype=torch.float64), side


def load(cfg: DataConfig, split: str) -> InMemoryDataset:
    if cfg.resolution is not None or cfg.channels is not None:
        raise DistillKacError("data.resolution/channels: toy2d is 2-D points; leave resolution and channels "
                              "unset")
    if cfg.hflip:
        raise DistillKacError("data.hflip: flips are for images; toy2d needs hflip=false")
    if cfg.toy_size < 1:
        raise DistillKacError(f"data.toy_size: must be a positive integer, got {cfg.toy_size}")
    seed = 2 * cfg.seed + (1 if split == "test" else 0)  # the two splits never share a generator seed
    generator = torch.Generator().manual_seed(seed)
    if cfg.toy == "grid":  # a class's points: its mean plus std times a normal draw
        anchors, scale, weights = toy_mixture(cfg)
        draw, kind, detail = torch.randn, "mode", f"4x4 grid of Gaussians, std {scale}, spacing {GRID_SPACING}"
    else:  # a class's points: its square's corner plus side times a uniform draw
        anchors, scale = checkerboard_squares()
        weights = torch.full((anchors.shape[0],), 1.0 / anchors.shape[0], dtype=torch.float64)
        draw, kind = torch.rand, "square"
        detail = f"{CHECKER_SIDE}x{CHECKER_SIDE} checkerboard on [-1, 1]^2, {anchors.shape[0]} filled squares"
    labels = torch.multinomial(weights, cfg.toy_size, replacement=True, generator=generator)
    points = anchors[labels] + scale * draw((cfg.toy_size, 2), generator=generator, dtype=torch.float64)
    info = {"name": "toy2d", "split": split, "source": f"generated: {cfg.toy}, seed {seed}",
            "source_format": "generated", "toy": cfg.toy,
            "preprocessing": f"{detail}; float32 points used as they are"}
    num_classes = weights.numel()
    return InMemoryDataset(points.to(torch.float32), labels, num_classes=num_classes,
                           class_names=[f"{kind} {k}" for k in range(num_classes)], hflip=False, info=info)
