"""Preview samples drawn during training: the fixed-seed sampler of a run and its PNG files.

A preview costs ``preview_num * preview_steps`` velocity evaluations (twice that when guided), each of
a network forward over the preview batch; the training loop draws one every ``sample_every`` steps and at
the end, always after that step's checkpoint, so a run stopped during a preview loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distillkac.config import RunConfig, TrainConfig
from distillkac.sampling import cycle_labels, generate, save_grid_png, save_scatter_png

PREVIEW_DIR = "samples"
CPU_PREVIEW = (16, 20)
"""(images, solver steps): the most the command line lets a preview of an image model draw on a CPU,
unless the user sets them."""

Preview = Callable[..., torch.Tensor]
"""``preview(ema_model, step, on_step=None)`` -> images in [-1, 1] (or 2-D points) for
``samples/step-XXXXXXX.png``; ``on_step()``, if given, is called at every solver step."""


def previews_enabled(train: TrainConfig) -> bool:
    """Whether a run draws previews (0 previews, steps or interval turns them off)."""
    return min(train.sample_every, train.preview_num, train.preview_steps) > 0


def teacher_preview(config: RunConfig, path, num_classes: int) -> Preview | None:
    """The run's preview sampler (None when previews are off): ``train.preview_num`` images (toy2d: points)
    from seeds 0, 1, ... with labels cycling through the classes, ``train.preview_steps`` of
    ``train.preview_solver`` in the run's precision, guided by ``train.preview_guidance`` when the model is
    class-conditional."""
    train = config.train
    if not previews_enabled(train):
        return None
    count = train.preview_num
    guidance = train.preview_guidance if num_classes else 0.0
    labels = cycle_labels(count, num_classes)

    def preview(model: nn.Module, step: int, on_step: Callable[[], None] | None = None) -> torch.Tensor:
        device = next(model.parameters()).device
        hook = None if on_step is None else lambda *_: on_step()
        return generate(model, path, seeds=range(count), labels=labels, steps=train.preview_steps,
                        solver=train.preview_solver, guidance=guidance, device=device,
                        precision=train.precision, batch_size=count, on_step=hook).samples

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
