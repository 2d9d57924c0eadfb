"""What a run records as it goes: ``log.txt``, ``stats.jsonl`` and the loss and throughput between two rows."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillkac.files import atomic_write_bytes

LOG_FILE = "log.txt"
STATS_FILE = "stats.jsonl"


class RunLog:
    """``log.txt`` + ``stats.jsonl`` of a run (main process only) and messages above the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, echo: Callable[[str], None]) -> None:
        self.run_dir, self.enabled, self.echo = run_dir, enabled, echo

    def info(self, message: str) -> None:
        if not self.enabled:
            return
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
