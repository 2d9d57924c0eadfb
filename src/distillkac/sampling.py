"""Sampling: per-image seeds, batched, any solver and guidance weight; PNG grids, one PNG per image, NPZ files.

The prior of image ``i`` is drawn from its own generator seeded with ``seeds[i]`` (EDM practice), so an
image depends on its seed and label only, never on the batch it is generated in. NFE counts network
evaluations per sample (method.md §3): solver evaluations, doubled when guidance is on (the
conditional and the null label go through the network together).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from distillkac.checkpoint import Artifact, load_artifact
from distillkac.data import to_uint8
from distillkac.errors import DistillKacError
from distillkac.files import atomic_replace_dir, atomic_write_bytes
from distillkac.guidance import check_guidance, guided_velocity
from distillkac.paths import build_path
from distillkac.plotting import agg_pyplot, save_figure_png
from distillkac.rng import seeded_generators
from distillkac.runtime import autocast, resolve_device, resolve_precision
from distillkac.solvers import SOLVERS, solve, time_grid

SAMPLES_FILE = "samples.npz"
"""What ``sample --out DIR`` writes: the samples (key "samples"), labels, seeds and a JSON "meta"."""
IMAGES_DIR = "images"
"""The sub-directory of ``sample --out`` with one PNG per image."""


@dataclass
class SampleResult:
    """Generated samples (float, images in [-1, 1] or 2-D points) with what made them."""

    samples: torch.Tensor
    labels: torch.Tensor
    seeds: list[int]
    nfe_per_sample: int
    steps: int
    solver: str = "ab2"
    guidance: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    """What the network ran in: fp32 or bf16 (autocast)."""


def generate(model: nn.Module, path, *, seeds: Sequence[int], labels: torch.Tensor | Sequence[int] | None,
             steps: int, solver: str = "ab2", guidance: float = 0.0, grid: str = "uniform",
             batch_size: int = 256, device: str | torch.device = "cpu", precision: str = "auto",
             on_step: Callable | None = None, progress: bool = False) -> SampleResult:
    """Integrate the model's (guided) velocity from the prior at ``T`` to 0, one seed per sample.

    ``labels``: one class per seed (``None``: the null label, e.g. for unconditional models).
    ``precision``: auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16 (on the CPU too).
    ``on_step(k, t_k, x_k, u_k)`` is passed to the solver for every batch.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise DistillKacError("--num: need at least one seed")
    if solver not in SOLVERS:
        raise DistillKacError(f"--solver: unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DistillKacError(f"--batch: must be a positive integer, got {batch_size!r}")
    num_classes = int(model.num_classes)
    weight = check_guidance(guidance, num_classes)
    labels = _check_labels(labels, len(seeds), num_classes)
    device = resolve_device(device)
    precision = resolve_precision(device, precision)
    times = time_grid(steps, path.T, grid)
    shape = tuple(model.config.data_shape)
    model = model.to(device).eval()
    chunks, evaluations = [], 0
    starts = range(0, len(seeds), batch_size)
    if progress:
        starts = tqdm(starts, desc="sampling", unit="batch", dynamic_ncols=True)
    with torch.no_grad(), autocast(device, precision):
        for start in starts:
            batch_seeds = seeds[start:start + batch_size]
            y = labels[start:start + batch_size].to(device)
            x = path.prior((len(batch_seeds), *shape), generator=seeded_generators(batch_seeds, device),
                           device=device, dtype=torch.float32)
            result = solve(lambda state, t, y=y: guided_velocity(model, state, t, y, weight).float(), x, times,
                           method=solver, path=path, on_step=on_step)
            evaluations = result.evaluations
            chunks.append(result.x.float().cpu())
    nfe = evaluations * (2 if weight != 0 else 1)
    return SampleResult(samples=torch.cat(chunks), labels=labels, seeds=seeds, nfe_per_sample=nfe,
                        steps=int(steps), solver=solver, guidance=weight, precision=precision)


def _check_labels(labels, count: int, num_classes: int) -> torch.Tensor:
    if labels is None:
        return torch.full((count,), num_classes, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if labels.numel() != count:
        raise DistillKacError(f"labels: need one label per seed ({count}), got {labels.numel()}")
    if num_classes == 0:
        if bool((labels != 0).any()):
            raise DistillKacError("--class: this model is unconditional; it takes no class labels")
        return labels
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DistillKacError(f"--class: label {bad} is out of range; "
                              f"this model has classes 0..{num_classes - 1}")
    return labels


def cycle_labels(count: int, num_classes: int, classes: Sequence[int] | None = None) -> torch.Tensor | None:
    """Labels for ``count`` samples cycling through ``classes`` (default all); None if unconditional."""
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in range(count)], dtype=torch.long)
    if num_classes == 0:
        return None
    return torch.arange(count, dtype=torch.long) % num_classes


def sample_artifact(artifact: str | os.PathLike | tuple[nn.Module, dict], *, seeds: Sequence[int],
                    labels=None, steps: int | None = None, solver: str | None = None,
                    guidance: float | None = None, grid: str | None = None, batch_size: int = 256,
                    device: str | torch.device = "cpu", precision: str = "auto", on_step: Callable | None = None,
                    progress: bool = False) -> SampleResult:
    """Sample a saved model (a directory, a run directory, or ``(model, meta)`` from load_artifact) with the
    settings :meth:`Artifact.sampling` resolves (a student samples only as it was distilled)."""
    if isinstance(artifact, tuple):
        model, meta = artifact
    else:
        model, meta = load_artifact(Artifact.locate(artifact), device=resolve_device(device))
    plan = Artifact(meta).sampling(steps, solver, guidance, grid)
    result = generate(model, build_path(meta["path"]), seeds=seeds, labels=labels, steps=plan.steps,
                      solver=plan.solver, guidance=plan.forward_guidance, grid=plan.grid, batch_size=batch_size,
                      device=device, precision=precision, on_step=on_step, progress=progress)
    result.guidance = float(plan.guidance)
    result.meta = meta
    return result


def save_grid_png(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                  scale: int | None = None) -> None:
    """Images ``[N, C, H, W]`` (float in [-1, 1] or uint8) as one PNG grid, ``nrow`` images per row,
    1-pixel gaps; small images are enlarged ``scale`` times (default: to at least 32 pixels)."""
    images = to_uint8(images.detach().cpu())
    count, channels, height, width = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(count))))
    scale = scale or max(1, 32 // max(height, width))
    rows = (count + nrow - 1) // nrow
    canvas = torch.zeros((channels, rows * (height + 1) + 1, nrow * (width + 1) + 1), dtype=torch.uint8)
    for i in range(count):
        top, left = 1 + (i // nrow) * (height + 1), 1 + (i % nrow) * (width + 1)
        canvas[:, top:top + height, left:left + width] = images[i]
    picture = _picture(canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _picture(image: torch.Tensor) -> Image.Image:
    """A uint8 image ``[C, H, W]`` (C = 1 or 3) as a PIL image (mode L or RGB)."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if image.shape[0] == 1 else array)


def save_image_files(images: torch.Tensor, directory: str | os.PathLike) -> None:
    """One PNG per image of ``[N, C, H, W]`` (float in [-1, 1] or uint8): ``000000.png``, ``000001.png``, ...

    ``directory`` is replaced as a whole (:func:`atomic_replace_dir`), so no file of an earlier, longer set
    is left behind; the files inside are written plainly (fsyncing 50k small files one by one would take
    minutes), the directory rename is what makes the set appear complete.
    """
    images = to_uint8(images.detach().cpu())
    digits = max(6, len(str(images.shape[0] - 1)))

    def fill(staging: Path) -> None:
        for index in range(images.shape[0]):
            _picture(images[index]).save(staging / f"{index:0{digits}d}.png")

    atomic_replace_dir(directory, fill)


def save_scatter_png(points: torch.Tensor, path: str | os.PathLike, labels: torch.Tensor | None = None,
                     title: str | None = None, limit: float = 1.5) -> None:
    """2-D points as a scatter plot (matplotlib, Agg backend), coloured by label."""
    plt = agg_pyplot()
    points = points.detach().float().cpu().numpy()
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    colours = {} if labels is None else {"c": labels.cpu().numpy(), "cmap": "tab20"}
    axes.scatter(points[:, 0], points[:, 1], s=2, alpha=0.6, linewidths=0, **colours)
    axes.set_xlim(-limit, limit)
    axes.set_ylim(-limit, limit)
    axes.set_aspect("equal")
    if title:
        axes.set_title(title, fontsize=9)
    save_figure_png(figure, path, tight=True)


def save_samples_npz(path: str | os.PathLike, samples: torch.Tensor, labels: torch.Tensor | None,
                     seeds: Sequence[int], meta: dict[str, Any]) -> None:
    """``samples`` (uint8 images ``[N, C, H, W]`` or float points ``[N, 2]``), labels, seeds and a JSON
    ``meta`` string, in one compressed npz written atomically."""
    arrays = {"samples": samples.detach().cpu().numpy(), "seeds": np.asarray(list(seeds), dtype=np.int64),
              "meta": np.asarray(json.dumps(meta, sort_keys=True))}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().numpy().astype(np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def save_result(result: SampleResult, out_dir: str | os.PathLike, nrow: int | None = None) -> dict[str, Path]:
    """Write ``grid.png``, ``samples.npz`` and one PNG per image in ``images/`` (images), or ``scatter.png``
    + ``samples.npz`` (2-D points). Returns the paths under "picture", "npz" and (images) "images"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"steps": result.steps, "nfe_per_sample": result.nfe_per_sample, "solver": result.solver,
            "guidance": result.guidance, "precision": result.precision, "model_kind": result.meta.get("kind"),
            "weights_sha256": result.meta.get("weights_sha256")}
    labels = result.labels if result.meta.get("num_classes", 1) else None
    if result.samples.dim() == 2:
        picture = out_dir / "scatter.png"
        save_scatter_png(result.samples, picture, labels,
                         title=f"{result.steps} steps, {result.solver}, w={result.guidance:g}")
        save_samples_npz(out_dir / SAMPLES_FILE, result.samples.float(), labels, result.seeds, meta)
    else:
        picture = out_dir / "grid.png"
        save_grid_png(result.samples, picture, nrow=nrow)
        save_samples_npz(out_dir / SAMPLES_FILE, to_uint8(result.samples), labels, result.seeds, meta)
        save_image_files(result.samples, out_dir / IMAGES_DIR)
        return {"picture": picture, "npz": out_dir / SAMPLES_FILE, "images": out_dir / IMAGES_DIR}
    return {"picture": picture, "npz": out_dir / SAMPLES_FILE}
