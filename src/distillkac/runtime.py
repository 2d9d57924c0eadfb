"""What a process runs on: the device, the torchrun process group and rank, mixed precision, torch's thread
count, and the record of the machine and versions that runs and benchmarks store next to their results."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distillkac import __version__
from distillkac.errors import DistillKacError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(request: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; any other name as torch reads it.

    A CUDA device becomes the current CUDA device (without an index: ``local_rank``, default 0). CUDA
    requested where there is none, or a device index that does not exist, is a DistillKacError.
    """
    if str(request) == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(request)
    except (RuntimeError, TypeError) as err:
        raise DistillKacError(f"--device: unknown device {str(request)!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DistillKacError(f"--device {request}: CUDA is not available on this machine")
    if device.index is None:
        device = torch.device("cuda", local_rank or 0)
    if device.index >= torch.cuda.device_count():
        raise DistillKacError(f"--device {request}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    torch.cuda.set_device(device)
    return device


def world_size() -> int:
    """The number of processes of this run (torchrun's ``WORLD_SIZE``; 1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (torchrun's ``RANK``; 0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, the process that writes a run's files."""
    return rank() == 0


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among ``world_size`` processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts


def init_distributed(device_request: str | torch.device = "auto") -> tuple[ProcessGroup, torch.device]:
    """The process group and this process's device: joins torchrun's group when ``WORLD_SIZE > 1`` (nccl
    on CUDA, gloo on the CPU; one GPU per local rank); a single process joins nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank if size > 1 else None)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ProcessGroup(int(os.environ.get("RANK", "0")), size, local_rank), device


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device`` (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise DistillKacError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The mixed-precision context of ``precision``: ``bf16`` autocast; ``fp32`` autocast switched off, also
    inside an enclosing bf16 region (torch's own TF32 settings apply); ``auto`` bf16 on CUDA and fp32 on the
    CPU."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (None: as many as now), then restore the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def processor_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what the platform reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment_record(device: torch.device | None = None, world_size: int | None = None) -> dict[str, Any]:
    """Versions, machine, load and command line; with ``device`` its name (and the CUDA and cuDNN
    versions), with ``world_size`` the number of processes."""
    record: dict[str, Any] = {
        "distillkac": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "hostname": socket.gethostname(),
        "processor": processor_name(), "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": list(sys.argv),
    }
    if device is not None:
        record.update(device=str(device), device_name=record["processor"])
        if device.type == "cuda":
            record.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                          cudnn=torch.backends.cudnn.version())
    if world_size is not None:
        record["world_size"] = world_size
    return record
