"""Preview samples drawn during training: the fixed-seed sampler of a run and its PNG files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distillkac.presets import RunConfig
from distillkac.sampling import cycle_labels, generate, save_grid_png, save_scatter_png

PREVIEW_DIR = "samples"

Preview = Callable[[nn.Module, int], torch.Tensor]
"""``preview(ema_model, step)`` -> images in [-1, 1] (or 2-D points) for ``samples/step-XXXXXXX.png``."""


def teacher_preview(config: RunConfig, path, num_classes: int) -> Preview:
    """The run's preview sampler: ``train.preview_steps`` of ``train.preview_solver`` in the run's precision,
    guided by ``train.preview_guidance`` when the model is class-conditional, from fixed seeds and labels:
    2000 points for toy2d, else 10 images for each of the first 10 classes (64 if unconditional)."""
    train = config.train
    count = 2000 if config.net.kind == "mlp" else (10 * min(num_classes, 10) if num_classes else 64)
    guidance = train.preview_guidance if num_classes else 0.0
    labels = cycle_labels(count, num_classes)

    def preview(model: nn.Module, step: int) -> torch.Tensor:
        device = next(model.parameters()).device
        return generate(model, path, seeds=range(count), labels=labels, steps=train.preview_steps,
                        solver=train.preview_solver, guidance=guidance, device=device,
                        precision=train.precision, batch_size=count).samples

    return preview


def save_preview(samples: torch.Tensor, run_dir: Path, step: int) -> Path:
    """Write ``RUN/samples/step-XXXXXXX.png``: a grid of images, or a scatter plot of 2-D points."""
    samples = samples.detach().float().cpu()
    path = run_dir / PREVIEW_DIR / f"step-{step:07d}.png"
    if samples.dim() == 2:
        save_scatter_png(samples, path, title=f"step {step}")
    else:
        save_grid_png(samples, path)
    return path
