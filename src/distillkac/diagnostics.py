"""Velocity diagnostics: how large the velocity gets along the path (the stiffness claim, method.md §1–3).

A Kac path moves every coordinate at finite speed: the conditional target
``u* = f'(t)·x0 + g'(t)·v(τ, g(t))`` has ``|v| ≤ c``, so each coordinate obeys
``|u*| ≤ |f'(t)|·|x0| + g'(t)·c`` (``1 + c`` for data in ``[-1, 1]`` with the default linear schedule,
``T = 1``). The VP diffusion target ``α'·x0 + σ'·ε`` has no such bound: the cosine schedule's ``σ'``
grows like ``t^{-1/2}`` near the data. These functions record the per-coordinate RMS and maximum of
``|u|`` at each time, either along a model's sampling trajectories (``velocity_profile``) or for the
conditional targets on real data (``analytic_velocity_profile``, no network), and plot them.

Path closeness (Theorem 8 of the paper, measured): a teacher and its distilled student start from the same
``x_T`` and the RMS distance per pixel between their states is recorded at every teacher grid time (the
student's Euler segment is linear in between, so it is interpolated there).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from distillkac.errors import DistillKacError
from distillkac.plotting import agg_pyplot, save_figure_png
from distillkac.rng import GeneratorLike, seeded_generators
from distillkac.sampling import generate
from distillkac.solvers import solve, time_grid

Profile = dict[str, list[float]]
TeacherFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A (guided) velocity ``fn(x, t [B], y [B]) -> u``."""


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


@torch.no_grad()
def path_closeness(teacher_fn: TeacherFn, student_model: nn.Module, *, path, teacher_steps: int,
                   student_steps: int, seeds: Sequence[int], labels: torch.Tensor | None = None,
                   teacher_solver: str = "ab2", device: str | torch.device = "cpu", batch_size: int = 256,
                   autocast=None) -> dict[str, Any]:
    """RMS distance per pixel between teacher and student paths from the same priors (one per seed).

    The teacher runs ``teacher_steps`` steps of ``teacher_solver`` (guidance inside ``teacher_fn``), the
    student ``student_steps`` Euler steps (``student_steps`` must divide ``teacher_steps``). At teacher
    time ``t`` inside student interval ``[t_{k+1}, t_k]`` the student state is ``x_k - (t_k - t)·u_k``.
    Returns ``times`` (T .. 0, every teacher grid time), ``rms`` (one per time, over all samples and
    coordinates), ``max``, ``final`` (t = 0), ``student_times`` and ``num_samples``.
    """
    if teacher_steps % student_steps:
        raise DistillKacError(f"path closeness: {student_steps} student steps do not divide "
                              f"{teacher_steps} teacher steps")
    device = torch.device(device)
    seeds = [int(s) for s in seeds]
    teacher_grid, student_grid = time_grid(teacher_steps, path.T), time_grid(student_steps, path.T)
    num_classes = int(student_model.num_classes)
    labels = torch.full((len(seeds),), num_classes, dtype=torch.long) if labels is None else labels
    shape = tuple(student_model.config.data_shape)
    squares = torch.zeros(teacher_steps + 1, dtype=torch.float64)
    student_model = student_model.to(device).eval()
    with autocast if autocast is not None else contextlib.nullcontext():
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long).to(device)
            x = path.prior((len(chunk), *shape), generator=seeded_generators(chunk, device), device=device,
                           dtype=torch.float32)
            squares += _squared_distances(teacher_fn, student_model, x, y, teacher_grid, student_grid,
                                          teacher_solver)
    rms = (squares / (len(seeds) * math.prod(shape))).sqrt().tolist()
    return {"times": teacher_grid.tolist(), "rms": rms, "max": max(rms), "final": rms[-1],
            "student_times": student_grid.tolist(), "teacher_steps": teacher_steps,
            "student_steps": student_steps, "num_samples": len(seeds)}


def _squared_distances(teacher_fn: TeacherFn, student_model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       teacher_grid: torch.Tensor, student_grid: torch.Tensor, teacher_solver: str
                       ) -> torch.Tensor:
    """Sum over the batch and coordinates of the squared teacher-student distance at each teacher time."""
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # the student's Euler states and velocities
    solve(lambda s, t: student_model(s, t, y).float(), x, student_grid, method="euler",
          on_step=lambda k, t, state, u: steps.append((state, u)))
    segment = (len(teacher_grid) - 1) // (len(student_grid) - 1)
    squares = torch.zeros(len(teacher_grid), dtype=torch.float64)

    def compare(i: int, t: float, state: torch.Tensor, u: torch.Tensor) -> None:
        """Against the student's piecewise-linear path at teacher time ``i`` (the last end is the Euler endpoint)."""
        k = min(i // segment, len(steps) - 1)
        student = steps[k][0] - float(student_grid[k] - teacher_grid[i]) * steps[k][1]
        squares[i] = (state.double() - student.double()).square().sum().cpu()

    final = solve(lambda s, t: teacher_fn(s, t, y).float(), x, teacher_grid, method=teacher_solver,
                  on_step=compare).x
    compare(len(teacher_grid) - 1, 0.0, final, final)
    return squares


def plot_closeness(curves: dict[str, dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> None:
    """One PNG (matplotlib, Agg) with the RMS-distance curve of every entry of ``curves`` (label -> result
    of :func:`path_closeness`), the student grid times marked."""
    plt = agg_pyplot()
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for label, curve in curves.items():
        line, = axes.plot(curve["times"], curve["rms"], label=f"{label} (max {curve['max']:.3g})")
        marks = [curve["rms"][round((1 - s / curve["times"][0]) * curve["teacher_steps"])]
                 for s in curve["student_times"]]
        axes.plot(curve["student_times"], marks, "o", color=line.get_color(), markersize=3)
    axes.set_xlabel("t (sampling runs from T to 0)")
    axes.set_ylabel("RMS distance per pixel, teacher vs student")
    axes.invert_xaxis()
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title, fontsize=9)
    save_figure_png(figure, path, tight=True)
