"""What a run records and says as it goes: ``log.txt``, ``stats.jsonl``, the loss and throughput between two
rows, the summary of what a run trains and the estimate of how long it takes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillkac.config import RunConfig
from distillkac.files import atomic_write_bytes
from distillkac.nets import config_parameter_count
from distillkac.presets import describe_net
from distillkac.previews import previews_enabled

LOG_FILE = "log.txt"
STATS_FILE = "stats.jsonl"


class RunLog:
    """``log.txt`` + ``stats.jsonl`` of a run (main process only) and messages above the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, echo: Callable[[str], None]) -> None:
        self.run_dir, self.enabled, self.echo = run_dir, enabled, echo

    def info(self, message: str, echo: bool = True) -> None:
        """Append ``message`` to log.txt and (with ``echo``) show it."""
        if not self.enabled:
            return
        if echo:
            self.echo(message)
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as file:
            file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def stats(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.run_dir / STATS_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(row) + "\n")

    def truncate_stats(self, step: int) -> None:
        """Drop stats rows after ``step`` (written after the last checkpoint of an interrupted run) and
        a row torn by a kill in the middle of its append."""
        path = self.run_dir / STATS_FILE
        if not self.enabled or not path.is_file():
            return
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if _row_step(line) <= step]
        atomic_write_bytes(path, "".join(f"{line}\n" for line in rows).encode("utf-8"))


def _row_step(line: str) -> float:
    """The step of a stats.jsonl row; infinity (always dropped) for a blank or torn line."""
    try:
        row = json.loads(line)
    except ValueError:
        return math.inf
    return row.get("step", 0) if isinstance(row, dict) and isinstance(row.get("step", 0), int) else math.inf


def class_list(names, shown: int = 5) -> str:
    """The first ``shown`` class names, comma-separated, with "..." when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def run_summary(config: RunConfig, dataset) -> list[str]:
    """A few lines on what a teacher run trains: data, network, length and previews."""
    train, optim = config.train, config.optim
    classes = (f"{dataset.num_classes} classes ({class_list(dataset.class_names)}), "
               f"label dropout {train.label_dropout:g} for guidance"
               if dataset.num_classes else "unconditional")
    source = f" from {config.data.path}" if config.data.path else ""
    kind = "images" if getattr(dataset, "is_image", False) else "points"
    shape = "x".join(str(side) for side in dataset.data_shape)
    previews = (f"{train.preview_num} x {train.preview_steps} {train.preview_solver} steps every "
                f"{train.sample_every:,} steps and at the end" if previews_enabled(train) else "off")
    return [f"data: {len(dataset):,} {kind} of {shape}{source}; {classes}",
            f"network: {describe_net(config.net)}; {config_parameter_count(config.net) / 1e6:.2f}M parameters",
            f"run: {train.steps:,} steps of {train.batch} {kind} (micro-batch {train.micro_batch}), lr {optim.lr:g} "
            f"after a warm-up of {optim.warmup_images:,} {kind}, a checkpoint every {train.ckpt_every:,} steps",
            f"previews: {previews}"]


def describe_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.2 h`` or ``4.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def speed_line(step_seconds: list[float], batch: int, remaining: int, device: str) -> str:
    """The images/s estimate from the durations of a run's first optimiser steps (the very first, which pays
    for warming up, left out) and the time the ``remaining`` steps will take at that pace."""
    timed = step_seconds[1:] or step_seconds
    per_step = sum(timed) / len(timed)
    return (f"speed: {batch / per_step:,.1f} images/s ({per_step:.2f} s per step) on {device}: about "
            f"{describe_duration(remaining * per_step)} for the {remaining:,} remaining step(s), previews not counted")


@dataclass
class StatsWindow:
    """Loss and throughput since the last stats row."""

    first_step: int
    start: float
    loss_sum: float = 0.0
    loss_count: int = 0

    def add(self, loss: float | None) -> None:
        if loss is not None:
            self.loss_sum += loss
            self.loss_count += 1

    def mean_loss(self) -> float | None:
        return self.loss_sum / self.loss_count if self.loss_count else None

    def images_per_second(self, step: int, batch: int, now: float) -> float:
        return (step - self.first_step) * batch / max(now - self.start, 1e-9)

    def reset(self, step: int, now: float) -> None:
        self.first_step, self.start, self.loss_sum, self.loss_count = step, now, 0.0, 0
