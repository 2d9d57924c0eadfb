"""Shared fixtures: tiny configs that train in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from distillkac.cli import main
from distillkac.config import OptimConfig, RunConfig, TrainConfig
from distillkac.data import DataConfig
from distillkac.nets import MLPConfig, UNetConfig
from distillkac.paths import PathConfig


def make_toy_config(steps: int = 6, batch: int = 32, micro_batch: int = 8, hidden: int = 32, depth: int = 2,
                    dropout: float = 0.0, **train_overrides) -> RunConfig:
    """A toy2d Kac run with a tiny MLP (16 classes: one per mode of the 4x4 grid)."""
    train = dict(steps=steps, batch=batch, micro_batch=micro_batch, ema_halflife_images=500.0,
                 ema_rampup=None, log_every=1, ckpt_every=steps, sample_every=steps, preview_steps=5,
                 preview_guidance=0.0, device="cpu")
    train.update(train_overrides)
    return RunConfig(data=DataConfig(name="toy2d", toy="grid", toy_size=512),
                     net=MLPConfig(dim=2, hidden=hidden, depth=depth, num_classes=16, dropout=dropout),
                     path=PathConfig(), optim=OptimConfig(lr=1e-3, warmup_images=64, grad_clip=1.0),
                     train=TrainConfig(**train))


def tiny_unet_config(num_classes: int = 3) -> UNetConfig:
    return UNetConfig(image_channels=1, resolution=8, model_channels=16, channel_mult=(1, 2),
                      num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_classes=num_classes, groups=8)


@pytest.fixture
def toy_config() -> RunConfig:
    return make_toy_config()


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models on one CPU thread: faster for them, and immune to the slowdown that
    two OpenMP threads suffer when the machine's cores are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``distillkac ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
