"""Velocity diagnostics: how large the velocity gets along the path (the stiffness claim, method.md §1–3).

A Kac path moves every coordinate at finite speed: the conditional target
``u* = f'(t)·x0 + g'(t)·v(τ, g(t))`` has ``|v| ≤ c``, so each coordinate obeys
``|u*| ≤ |f'(t)|·|x0| + g'(t)·c`` (``1 + c`` for data in ``[-1, 1]`` with the default linear schedule,
``T = 1``). The VP diffusion target ``α'·x0 + σ'·ε`` has no such bound: the cosine schedule's ``σ'``
grows like ``t^{-1/2}`` near the data. These functions record the per-coordinate RMS and maximum of
``|u|`` at each time, either along a model's sampling trajectories (``velocity_profile``) or for the
conditional targets on real data (``analytic_velocity_profile``, no network), and plot them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from distillkac.errors import DistillKacError
from distillkac.rng import GeneratorLike
from distillkac.sampling import generate

Profile = dict[str, list[float]]


class _StepStatistics:
    """Per-step sums of ``u²``, coordinate counts and ``max |u|``, accumulated over batches."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.squares: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.maxima: dict[int, float] = {}

    def __call__(self, k: int, t: float, x: torch.Tensor, u: torch.Tensor) -> None:
        values = u.detach().to(torch.float64)
        self.times[k] = float(t)
        self.squares[k] = self.squares.get(k, 0.0) + float(values.square().sum())
        self.counts[k] = self.counts.get(k, 0) + values.numel()
        self.maxima[k] = max(self.maxima.get(k, 0.0), float(values.abs().max()))

    def profile(self) -> Profile:
        steps = sorted(self.times)
        return {"times": [self.times[k] for k in steps],
                "rms": [math.sqrt(self.squares[k] / self.counts[k]) for k in steps],
                "max_abs": [self.maxima[k] for k in steps]}


def velocity_profile(model: nn.Module, path, *, steps: int, solver: str = "euler", guidance: float = 0.0,
                     seeds: Sequence[int], labels: torch.Tensor | Sequence[int] | None = None,
                     device: str | torch.device = "cpu", grid: str = "uniform",
                     batch_size: int = 256) -> Profile:
    """Per-coordinate RMS and maximum of ``|u|`` along sampling trajectories, one entry per solver step.

    The statistics are taken over every coordinate of every sample at the grid times ``t_0 = T, …,
    t_{N-1}`` (the solver's ``on_step`` hook; the extra evaluations of Heun and midpoint between grid
    points are not recorded), with ``u`` the (guided) velocity the solver integrates. Returns
    ``{"times", "rms", "max_abs"}`` as lists of ``steps`` floats.
    """
    statistics = _StepStatistics()
    generate(model, path, seeds=seeds, labels=labels, steps=steps, solver=solver, guidance=guidance,
             grid=grid, batch_size=batch_size, device=device, on_step=statistics)
    return statistics.profile()


@torch.no_grad()
def analytic_velocity_profile(path, x0_batch: torch.Tensor, times: Sequence[float],
                              generator: GeneratorLike) -> Profile:
    """Per-coordinate RMS and maximum of the conditional target velocity ``u*(x_t, t | x0)`` of ``path``.

    For each time a fresh point ``x_t`` is drawn for every row of ``x0_batch`` (in the order of
    ``times``, all draws from ``generator``); no network is involved.
    """
    if x0_batch.dim() < 2 or x0_batch.shape[0] < 1:
        raise DistillKacError(f"x0_batch: need a batch [B, ...] of data, got shape {list(x0_batch.shape)}")
    times = [float(t) for t in times]
    if not times or any(not 0 <= t <= path.T for t in times):
        raise DistillKacError(f"times: need at least one time in [0, T = {path.T:g}], got {times}")
    profile: Profile = {"times": times, "rms": [], "max_abs": []}
    for t in times:
        t_batch = torch.full((x0_batch.shape[0],), t, dtype=x0_batch.dtype, device=x0_batch.device)
        target = path.sample(x0_batch, t_batch, generator=generator).target.to(torch.float64)
        profile["rms"].append(float(target.square().mean().sqrt()))
        profile["max_abs"].append(float(target.abs().max()))
    return profile


def plot_velocity_profiles(profiles: dict[str, Profile], path: str | os.PathLike,
                           kac_c: float | None = None) -> None:
    """RMS (left) and maximum (right) of ``|u|`` per coordinate against ``t``, log y, one line per profile.

    With ``kac_c`` the Kac speed ``c`` is drawn as a dashed line: the bound on ``|v|`` per coordinate
    (the full Kac velocity adds ``|f'(t)|·|x0|`` to it).
    """
    from distillkac.plotting import agg_pyplot, save_figure_png

    plt = agg_pyplot()
    if not profiles:
        raise DistillKacError("profiles: nothing to plot (need at least one named profile)")
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharex=True)
    for (key, title), axis in zip((("rms", "RMS of u per coordinate"), ("max_abs", "max |u| per coordinate")),
                                  axes):
        for name, profile in profiles.items():
            axis.plot(profile["times"], profile[key], marker=".", markersize=3, label=name)
        if kac_c is not None:
            axis.axhline(kac_c, color="black", linestyle="--", linewidth=1, label=f"Kac speed c = {kac_c:g}")
        axis.set_yscale("log")
        axis.set_xlabel("t (sampling runs from T down to 0)")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    save_figure_png(figure, path)
