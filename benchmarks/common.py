"""Shared helpers for the benchmarks: environment record, synchronised timing, memory, tables, results files.

Every benchmark prints a table and writes ``benchmarks/results/<name>.json`` holding the machine, the
device, the versions, the git commit, the command line, the date and the load average next to its
numbers. Timings synchronise CUDA around each call and are medians over repeats after warm-up, and
every comparison is a ratio of timings taken in the same process.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_json
from distillkac.nets import REFERENCE_CONFIGS, UNetConfig
from distillkac.runtime import environment_record, processor_name, resolve_device

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
BF16_DENSE_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H200", 989.0),
                          ("H100", 989.0))
"""Dense bf16 tensor-core peaks (NVIDIA data sheets), matched in this order against the device name: the
H100 SXM and the H200 SXM have the same compute (989 TFLOP/s); the PCIe and NVL boards are slower."""

SMOKE_UNET = UNetConfig(image_channels=3, resolution=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), dropout=0.0, num_classes=10, num_heads=2, groups=8)
"""A CIFAR-shaped (3 channels, 10 classes) UNet small enough for the smoke tests (8x8 images)."""


def network_config(smoke: bool) -> UNetConfig:
    """The CIFAR-10 reference UNet, or the tiny smoke-test one."""
    return SMOKE_UNET if smoke else REFERENCE_CONFIGS["cifar10"]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny network and sizes: checks that the script runs (numbers mean nothing)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: per benchmark)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed calls; the median is reported (default: per benchmark)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of the results JSON "
                                                                       "(default: benchmarks/results)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generator (default: %(default)s)")


def device_from_args(args: argparse.Namespace) -> torch.device:
    """``--device`` resolved as distillkac resolves it; a bad or absent device exits with its one-line message."""
    try:
        return resolve_device(args.device)
    except DistillKacError as err:
        raise SystemExit(str(err)) from err


def bf16_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """The device's dense bf16 peak (TFLOP/s) for MFU, with where it came from; None if unknown."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name()
    if device.type == "cuda":
        for marker, peak in BF16_DENSE_PEAK_TFLOPS:
            if marker in name:
                return peak, f"{marker} data sheet (device: {name})"
    return None, f"unknown for {name}: pass --peak-tflops"



def repeats(args: argparse.Namespace, device: torch.device, cpu: tuple[int, int] = (1, 2),
            gpu: tuple[int, int] = (5, 20)) -> tuple[int, int]:
    """(warm-up, timed) call counts: the flags, else the ``cpu`` or ``gpu`` defaults."""
    default = gpu if device.type == "cuda" else cpu
    warmup = args.warmup if args.warmup is not None else default[0]
    repeat = args.repeat if args.repeat is not None else default[1]
    if args.smoke:
        warmup, repeat = min(warmup, 1), min(repeat, 2)
    return warmup, max(repeat, 1)


# --------------------------------------------------------------------------------------- environment

def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}"


def environment(device: torch.device) -> dict[str, Any]:
    """distillkac's environment record (machine, device, versions, load average) with the date (UTC), the
    git commit and the command line as typed."""
    return {**environment_record(device),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "git_commit": _git_commit()}


# -------------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of the timed repeats."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": min(self.seconds), "max_s": max(self.seconds),
                "repeats": len(self.seconds)}


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then time ``repeat`` calls, synchronising CUDA around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


# -------------------------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_delta(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory above the starting level while ``fn`` runs.

    CUDA: ``max_memory_allocated`` minus the allocated bytes before (exact, the caching allocator's
    view). CPU: the peak resident set size (VmHWM, reset first) minus the RSS before: an OS-level
    measure that includes allocator slack and can under-count memory the allocator had kept free.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {"method": "cuda max_memory_allocated",
                "peak_delta_bytes": torch.cuda.max_memory_allocated(device) - before}
    if not _reset_peak_rss():
        return {"method": "unavailable (cannot reset /proc/self peak RSS)", "peak_delta_bytes": None}
    before = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    if before is None or peak is None:
        return {"method": "unavailable (no /proc/self/status)", "peak_delta_bytes": None}
    return {"method": "process peak RSS (VmHWM) minus RSS before", "peak_delta_bytes": (peak - before) * 1024}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()


def peak_bytes(device: torch.device) -> int | None:
    """Peak since :func:`reset_peak`: CUDA allocated bytes, or the process peak RSS on the CPU."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status_kib("VmHWM")
    return None if peak is None else peak * 1024


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors an object stores as attributes (0 for the Kac path: it keeps no tables)."""
    total = 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            total += tensor_bytes(value)
    return total


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


# ------------------------------------------------------------------------------------------- output

def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` is ``(key, header)``; floats get 4 significant digits."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, out_dir: Path, device: torch.device, settings: dict[str, Any],
                  results: Any, table: str) -> Path:
    """Write ``<out_dir>/<name>.json`` (environment, settings, results, the printed table) atomically."""
    payload = {"benchmark": name, "environment": environment(device), "settings": settings,
               "results": results, "table": table}
    path = out_dir / f"{name}.json"
    atomic_write_json(path, payload)
    return path

