"""Endpoint distillation (method.md §4): the stage plan, the endpoint loss, the stage runner and path closeness.

A student with M uniform steps ``t_k = T(1 - k/M)`` makes one Euler step per interval; its frozen teacher
covers the same interval ``[t_{k+1}, t_k]`` with ``N = teacher steps / M`` of its own steps (stage 1: the
guided Kac flow with AB-2, restarted with an Euler step at ``t_k``; later stages: the previous student's
Euler steps). The loss is the endpoint MSE

    ‖ (x_{t_k} - Δ·s_φ(x_{t_k}, t_k, y)) - Teacher_N(x_{t_k}; t_k → t_{k+1}, y) ‖²,   Δ = T/M,

with ``k`` uniform in ``0..M-1`` and ``x_{t_k}`` forward-noised data (or a teacher roll-out from the prior).
Each stage is an ordinary resumable run of :func:`distillkac.train.train` in ``OUT/stage-<M>step``, whose
artefact is a standalone student (kind "student": steps, grid, Euler, baked-in guidance, teacher hash).

Path closeness (Theorem 8 of the paper, measured): teacher and student start from the same ``x_T`` and
the RMS distance per pixel between their states is recorded at every teacher grid time (the student's
Euler segment is linear in between, so it is interpolated there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from distillkac.checkpoint import atomic_write_json, check_output_dir, load_artifact, read_artifact_meta
from distillkac.data import DataConfig
from distillkac.errors import DistillKacError
from distillkac.guidance import check_guidance, guided_velocity
from distillkac.rng import rand, seeded_generators
from distillkac.solvers import solve, time_grid

START_STATES = ("data", "rollout")
ARTIFACT_DIR = "artifact"
CLOSENESS_FILE = "closeness.json"
CLOSENESS_PLOT = "closeness.png"
SUMMARY_FILE = "distill.json"
TEACHER_KINDS = ("teacher", "baseline", "student")

TeacherFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A (guided) velocity ``fn(x, t [B], y [B]) -> u``."""


# ------------------------------------------------------------------------------------------ settings

@dataclass
class DistillSettings:
    """Everything a distillation needs besides the teacher and the output directory.

    ``steps_per_stage``: optimiser steps per stage (one count for all, or one per stage); ``batch`` is
    global (``micro_batch`` per forward); EMA as a half-life in images (train.py);
    ``closeness_samples``: prior draws for the path-closeness curve.
    """

    plan: tuple[int, ...] = (100, 20, 4, 2, 1)
    guidance: float = 0.0
    steps_per_stage: int | tuple[int, ...] = 10_000
    batch: int = 128
    micro_batch: int = 32
    lr: float = 1e-4
    warmup_images: int = 0
    grad_clip: float = 1.0
    ema_halflife_images: float = 100_000.0
    ema_rampup: float | None = 0.05
    seed: int = 0
    start_states: str = "data"
    device: str = "auto"
    precision: str = "auto"
    closeness_samples: int = 256
    log_every: int = 100
    ckpt_every: int = 1000
    sample_every: int = 1000

    def validate(self) -> DistillSettings:
        if self.start_states not in START_STATES:
            raise DistillKacError(f"--start-states: must be one of {', '.join(START_STATES)}, "
                                  f"got {self.start_states!r}")
        if not (isinstance(self.closeness_samples, int) and self.closeness_samples >= 1):
            raise DistillKacError(f"--closeness-samples: must be a positive integer, got {self.closeness_samples!r}")
        if not (isinstance(self.guidance, int | float) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise DistillKacError(f"--guidance: must be a finite number >= 0, got {self.guidance!r}")
        counts = self.steps_per_stage if isinstance(self.steps_per_stage, tuple) else (self.steps_per_stage,)
        if isinstance(self.steps_per_stage, tuple) and len(counts) != len(self.plan) - 1:
            raise DistillKacError(f"--steps-per-stage: give one count, or one per stage ({len(self.plan) - 1} for "
                                  f"the plan {','.join(map(str, self.plan))}), got {len(counts)}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise DistillKacError(f"--steps-per-stage: must be positive integers, got {self.steps_per_stage!r}")
        return self

    def stage_steps(self, stage: Stage) -> int:
        """Optimiser steps of ``stage``."""
        if isinstance(self.steps_per_stage, tuple):
            return self.steps_per_stage[stage.index - 1]
        return self.steps_per_stage


DISTILL_PRESETS: dict[str, DistillSettings] = {
    # Sized for 2 CPU cores: the four stages of 100 -> 1 step together take about 6 minutes.
    "digits": DistillSettings(plan=(100, 20, 4, 2, 1), guidance=1.0, steps_per_stage=(80, 200, 300, 300), batch=64,
                              micro_batch=64, lr=5e-4, warmup_images=0, ema_halflife_images=1000.0,
                              ema_rampup=None, closeness_samples=200, log_every=20, ckpt_every=120,
                              sample_every=240),
    "toy2d": DistillSettings(plan=(50, 10, 2, 1), guidance=0.0, steps_per_stage=300, batch=256,
                             micro_batch=256, lr=1e-3, ema_halflife_images=5000.0, ema_rampup=None,
                             closeness_samples=1000, log_every=50, ckpt_every=150, sample_every=300),
    # Image presets follow the teacher recipes (method.md §5) at a progressive-distillation length.
    "cifar10": DistillSettings(plan=(100, 20, 4, 2, 1), guidance=1.0, steps_per_stage=50_000, batch=128,
                               micro_batch=32, lr=1e-4, warmup_images=64_000, ema_halflife_images=500_000.0,
                               ema_rampup=0.05, closeness_samples=256, log_every=100, ckpt_every=5000,
                               sample_every=5000),
    "celeba64": DistillSettings(plan=(100, 20, 4, 2, 1), guidance=0.0, steps_per_stage=50_000, batch=128,
                                micro_batch=32, lr=1e-4, warmup_images=64_000, ema_halflife_images=500_000.0,
                                ema_rampup=0.05, closeness_samples=256, log_every=100, ckpt_every=5000,
                                sample_every=5000),
    "lsun-bedroom256": DistillSettings(plan=(100, 20, 4, 2, 1), guidance=0.0, steps_per_stage=50_000,
                                       batch=64, micro_batch=8, lr=2e-5, warmup_images=32_000,
                                       ema_halflife_images=250_000.0, ema_rampup=0.05, closeness_samples=64,
                                       log_every=100, ckpt_every=5000, sample_every=10_000),
}
"""Distillation settings per teacher preset (keyed like ``presets.PRESETS``)."""


def preset_key(data: DataConfig) -> str:
    """The DISTILL_PRESETS key of a teacher trained on ``data`` (folders: by resolution)."""
    if data.name in DISTILL_PRESETS:
        return data.name
    by_resolution = {64: "celeba64", 256: "lsun-bedroom256"}
    if data.name == "folder" and data.resolution in by_resolution:
        return by_resolution[data.resolution]
    raise DistillKacError(f"--preset: no distillation preset for the teacher's data {data.name!r} "
                          f"(resolution {data.resolution}); choose one of {', '.join(DISTILL_PRESETS)}")


def get_distill_preset(name: str) -> DistillSettings:
    if name not in DISTILL_PRESETS:
        raise DistillKacError(f"--preset: unknown distillation preset {name!r}; "
                              f"choose one of {', '.join(DISTILL_PRESETS)}")
    return dataclasses.replace(DISTILL_PRESETS[name])


# ------------------------------------------------------------------------------------------ the plan

def parse_plan(text: str) -> tuple[int, ...]:
    """``"100,20,4,2,1"`` -> ``(100, 20, 4, 2, 1)`` (at least two positive integers)."""
    try:
        plan = tuple(int(part) for part in str(text).split(","))
    except ValueError as err:
        raise DistillKacError(f"--plan: expected comma-separated step counts such as 100,20,4,2,1, "
                              f"got {text!r}") from err
    return plan


def validate_plan(plan: Sequence[int], teacher_steps: int | None = None) -> tuple[int, ...]:
    """Strictly decreasing positive step counts, each dividing the previous one; the first equal to
    ``teacher_steps`` (when given). Refused with a one-line message naming the failing pair."""
    plan = tuple(plan)
    if len(plan) < 2:
        raise DistillKacError(f"--plan: need the teacher's steps and at least one student, got {list(plan)}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in plan):
        raise DistillKacError(f"--plan: step counts must be positive integers, got {list(plan)}")
    for previous, steps in zip(plan, plan[1:]):
        if steps >= previous:
            raise DistillKacError(f"--plan: not strictly decreasing at {previous} -> {steps}")
        if previous % steps:
            raise DistillKacError(f"--plan: {steps} does not divide {previous} ({previous} -> {steps})")
    if teacher_steps is not None and plan[0] != teacher_steps:
        raise DistillKacError(f"--plan: the first step count {plan[0]} must equal the teacher's steps "
                              f"{teacher_steps}")
    return plan


@dataclass(frozen=True)
class Stage:
    """Stage ``index`` (1-based): a ``teacher_steps`` teacher distilled into a ``student_steps`` student."""

    index: int
    teacher_steps: int
    student_steps: int

    @property
    def name(self) -> str:
        return f"stage-{self.student_steps}step"

    @property
    def segment(self) -> int:
        """Teacher steps per student step, N."""
        return self.teacher_steps // self.student_steps


def plan_stages(plan: Sequence[int]) -> list[Stage]:
    return [Stage(i + 1, teacher, student) for i, (teacher, student) in enumerate(zip(plan, plan[1:]))]


# -------------------------------------------------------------------------------------- the teacher

@dataclass
class Teacher:
    """A frozen teacher: its network, meta, weights hash, own step count and solver.

    ``forward_guidance`` is the CFG weight applied at each evaluation (stage 1); a student teacher has
    its guidance baked in (``forward_guidance`` 0, ``guidance`` its meta's weight).
    """

    model: nn.Module
    meta: dict[str, Any]
    sha256: str
    steps: int
    solver: str
    guidance: float
    forward_guidance: float
    artifact: Path

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return guided_velocity(self.model, x, t, y, self.forward_guidance)

    def record(self) -> dict[str, Any]:
        """What a stage stores about its teacher (compared when a stage is resumed or skipped)."""
        return teacher_record(self.meta, self.steps, self.guidance)


def teacher_record(meta: dict[str, Any], steps: int, guidance: float) -> dict[str, Any]:
    """A teacher artefact's identity as a stage stores it: weights hash, kind, steps, solver, guidance,
    path (Kac constants and schedules), data shape, class count and network."""
    return {"sha256": meta["weights_sha256"], "kind": meta.get("kind"), "steps": int(steps),
            "solver": "euler" if meta.get("kind") == "student" else "ab2", "guidance": float(guidance),
            "path": meta["path"], "data_shape": list(meta["data_shape"]), "num_classes": int(meta["num_classes"]),
            "net": meta["net"]}


def load_teacher(artifact: str | os.PathLike, steps: int, guidance: float,
                 device: str | torch.device = "cpu") -> Teacher:
    """Load a teacher artefact. A Kac teacher (or baseline) runs guided AB-2 with ``steps`` steps and CFG
    weight ``guidance``; a student runs its own Euler steps (which must equal ``steps``) with its baked-in
    guidance (which must equal ``guidance``)."""
    artifact = Path(artifact)
    model, meta = load_artifact(artifact, device=device)
    model.requires_grad_(False)
    kind = meta.get("kind")
    if kind not in TEACHER_KINDS:
        raise DistillKacError(f"--teacher: {artifact} is a {kind!r} artefact; expected one of {TEACHER_KINDS}")
    if kind == "student":
        baked = float(meta["guidance"])
        if int(meta["steps"]) != steps:
            raise DistillKacError(f"--plan: the first step count {steps} must equal the teacher's steps "
                                  f"{meta['steps']} ({artifact} is a {meta['steps']}-step student)")
        if guidance != baked:
            raise DistillKacError(f"--guidance: {artifact} is a student with guidance w={baked:g} baked in; "
                                  f"its students keep it (got {guidance:g})")
        return Teacher(model, meta, meta["weights_sha256"], steps, "euler", baked, 0.0, artifact)
    weight = check_guidance(guidance, int(meta["num_classes"]))
    return Teacher(model, meta, meta["weights_sha256"], steps, "ab2", weight, weight, artifact)


# ---------------------------------------------------------------------------------- the integrators

def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def integrate_rows(velocity: TeacherFn, x: torch.Tensor, y: torch.Tensor, times: torch.Tensor, solver: str,
                   active_steps: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t, y)`` with per-row time grids ``times`` (float64 ``[n + 1, B]``,
    decreasing along dim 0); ``solver`` "euler" or "ab2" (Euler first step, then the variable-step AB-2
    update of solvers.solve). Row ``b`` takes only its first ``active_steps[b]`` steps (default all) and
    then stays where it is."""
    previous_u = previous_h = None
    for j in range(times.shape[0] - 1):
        u = velocity(x, times[j].to(x.dtype), y)
        h = _per_row(times[j] - times[j + 1], x)
        if solver == "euler" or previous_u is None:
            step = h * u
        else:
            ratio = h / (2 * previous_h)
            step = h * ((1 + ratio) * u - ratio * previous_u)
        if active_steps is None:
            x = x - step
        else:
            moving = (j < active_steps).reshape(-1, *([1] * (x.dim() - 1)))
            x = torch.where(moving, x - step, x)
        previous_u, previous_h = u, h
    return x


def grid_times(first_index: torch.Tensor, count: int, total_steps: int, T: float) -> torch.Tensor:
    """``T(1 - i/total_steps)`` for ``i = first_index + 0..count`` (float64 ``[count + 1, B]``), bitwise the
    times of ``solvers.time_grid(total_steps, T)``."""
    offsets = torch.arange(count + 1, dtype=torch.float64, device=first_index.device)
    index = first_index.to(torch.float64)[None, :] + offsets[:, None]
    return T * (1 - index / total_steps)


# ------------------------------------------------------------------------------------------ the loss

class EndpointPair(NamedTuple):
    """One training example: start state and time, end time, the teacher's endpoint, the labels."""

    x_start: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor
    target: torch.Tensor
    y: torch.Tensor
    k: torch.Tensor


class EndpointObjective:
    """The endpoint-distillation loss of one stage (method.md §4) as a train.py Objective."""

    def __init__(self, teacher: Teacher, path, stage: Stage, start_states: str = "data",
                 history: Sequence[dict[str, Any]] = ()) -> None:
        if start_states not in START_STATES:
            raise DistillKacError(f"--start-states: must be one of {', '.join(START_STATES)}, got {start_states!r}")
        if stage.teacher_steps != teacher.steps:
            raise DistillKacError(f"stage {stage.index}: its teacher takes {teacher.steps} steps, "
                                  f"the plan says {stage.teacher_steps}")
        self.teacher, self.path, self.stage, self.start_states = teacher, path, stage, start_states
        self.num_classes = int(teacher.meta["num_classes"])
        self.history = list(history)
        self._teacher_device: torch.device | None = None

    def _teacher_on(self, device: torch.device) -> None:
        if self._teacher_device != device:
            self.teacher.model.to(device)
            self._teacher_device = device

    @torch.no_grad()
    def endpoint_pair(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> EndpointPair:
        """Draw ``k`` and the start state, and run the teacher's N steps from ``t_k`` to ``t_{k+1}``."""
        self._teacher_on(x0.device)
        batch, M, N, T = x0.shape[0], self.stage.student_steps, self.stage.segment, self.path.T
        y = torch.zeros_like(y) if self.num_classes == 0 else y
        k = torch.clamp((rand((batch,), generator, dtype=torch.float64, device=x0.device) * M).long(), max=M - 1)
        times = grid_times(k * N, N, M * N, T)
        if self.start_states == "data":
            x_start = self.path.sample(x0, times[0].to(x0.dtype), generator=generator).x_t
        else:
            x_start = self._rollout(x0, y, k, generator)
        target = integrate_rows(self.teacher.velocity, x_start, y, times, self.teacher.solver)
        return EndpointPair(x_start, times[0].to(x0.dtype), times[-1].to(x0.dtype), target, y, k)

    def _rollout(self, x0: torch.Tensor, y: torch.Tensor, k: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """The teacher's own solver from a prior draw at T down to ``t_k`` (k·N of its steps)."""
        N, total = self.stage.segment, self.teacher.steps
        x_prior = self.path.prior(tuple(x0.shape), generator=generator, device=x0.device, dtype=x0.dtype)
        longest = int(k.max()) * N
        if longest == 0:
            return x_prior
        times = grid_times(torch.zeros_like(k), longest, total, self.path.T)
        return integrate_rows(self.teacher.velocity, x_prior, y, times, self.teacher.solver, active_steps=k * N)

    def per_sample_loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        pair = self.endpoint_pair(x0, y, generator)
        delta = _per_row(pair.t_start.double() - pair.t_end.double(), pair.x_start)
        prediction = pair.x_start - delta * model(pair.x_start, pair.t_start, pair.y)
        return (prediction.float() - pair.target.float()).square().flatten(1).mean(dim=1)

    def stage_record(self) -> dict[str, Any]:
        return {"steps": self.stage.student_steps, "teacher_steps": self.teacher.steps,
                "teacher_solver": self.teacher.solver, "teacher_kind": self.teacher.meta.get("kind"),
                "teacher_sha256": self.teacher.sha256, "start_states": self.start_states}

    def artifact_meta(self) -> dict[str, Any]:
        M = self.stage.student_steps
        return {"kind": "student", "path": self.path.to_config(), "objective": "endpoint-mse",
                "steps": M, "grid": "uniform", "grid_times": time_grid(M, self.path.T).tolist(),
                "solver": "euler", "guidance": self.teacher.guidance, "teacher_sha256": self.teacher.sha256,
                "teacher_steps": self.teacher.steps, "teacher_solver": self.teacher.solver,
                "start_states": self.start_states, "stages": [*self.history, self.stage_record()]}


# ----------------------------------------------------------------------------------- path closeness

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
    student = _StudentPath(student_grid, teacher_grid)
    solve(lambda s, t: student_model(s, t, y).float(), x, student_grid, method="euler", on_step=student.record)
    squares = torch.zeros(len(teacher_grid), dtype=torch.float64)

    def compare(i: int, t: float, state: torch.Tensor, u: torch.Tensor) -> None:
        squares[i] = (state.double() - student.state_at(i).double()).square().sum().cpu()

    final = solve(lambda s, t: teacher_fn(s, t, y).float(), x, teacher_grid, method=teacher_solver,
                  on_step=compare).x
    squares[-1] = (final.double() - student.state_at(len(teacher_grid) - 1).double()).square().sum().cpu()
    return squares


class _StudentPath:
    """The student's Euler states and velocities, and its piecewise-linear path at teacher grid times."""

    def __init__(self, student_grid: torch.Tensor, teacher_grid: torch.Tensor) -> None:
        self.student_grid, self.teacher_grid = student_grid, teacher_grid
        self.segment = (len(teacher_grid) - 1) // (len(student_grid) - 1)
        self.states: list[torch.Tensor] = []
        self.velocities: list[torch.Tensor] = []

    def record(self, k: int, t: float, state: torch.Tensor, u: torch.Tensor) -> None:
        self.states.append(state)
        self.velocities.append(u)

    def state_at(self, i: int) -> torch.Tensor:
        """The student's state at teacher grid time ``i`` (the interval's end is the Euler endpoint)."""
        k = min(i // self.segment, len(self.states) - 1)
        offset = float(self.student_grid[k] - self.teacher_grid[i])
        return self.states[k] - offset * self.velocities[k]


def plot_closeness(curves: dict[str, dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> None:
    """One PNG (matplotlib, Agg) with the RMS-distance curve of every entry of ``curves`` (label -> result
    of :func:`path_closeness`), the student grid times marked."""
    from distillkac.plotting import agg_pyplot, save_figure_png

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


# --------------------------------------------------------------------------------- teacher sources

@dataclass
class TeacherSource:
    """Where the teacher is: its artefact directory, its meta, and its run's config (None if unknown)."""

    artifact: Path
    meta: dict[str, Any]
    run_config: dict[str, Any] | None


def resolve_teacher(path: str | os.PathLike) -> TeacherSource:
    """``--teacher``: a run directory (uses RUN/artifact) or an artefact directory."""
    path = Path(path)
    if not path.exists():
        raise DistillKacError(f"--teacher: {path} does not exist")
    if not path.is_dir():
        raise DistillKacError(f"--teacher: {path} is not a directory (expected a run or artefact directory)")
    if (path / ARTIFACT_DIR / "config.json").is_file():
        artifact, run_dir = path / ARTIFACT_DIR, path
    elif (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        artifact, run_dir = path, path.parent
    else:
        raise DistillKacError(f"--teacher: {path} is neither a run directory (with artifact/) nor a model "
                              f"artefact (config.json + model.safetensors)")
    meta = read_artifact_meta(artifact)
    run_config = None
    config_file = run_dir / "config.json"
    if config_file.is_file() and config_file != artifact / "config.json":
        try:
            stored = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DistillKacError(f"--teacher: {config_file} is not valid JSON ({err})") from err
        run_config = stored if isinstance(stored, dict) and "data" in stored else None
    return TeacherSource(artifact, meta, run_config)


def resolve_data(source: TeacherSource, data: str | None) -> DataConfig:
    """The dataset for start states: the teacher run's, with ``--data`` as a built-in dataset name
    (digits, toy2d) or a dataset path replacing the run's ``data.path``."""
    if data in ("digits", "toy2d"):
        return DataConfig(name=data)
    if source.run_config is None:
        raise DistillKacError(f"--data: cannot find the teacher run's config.json next to {source.artifact}; "
                              f"pass the teacher's run directory, or --data digits|toy2d")
    config = DataConfig.from_dict(source.run_config["data"])
    return config if data is None else dataclasses.replace(config, path=data)


# ------------------------------------------------------------------------------------- stage configs

def stage_run_config(meta: dict[str, Any], data: DataConfig, stage: Stage, settings: DistillSettings,
                     teacher_record: dict[str, Any] | None):
    """The RunConfig of one stage: the teacher's network and path, the distillation's optimiser and loop."""
    from distillkac.nets import network_config_from_dict
    from distillkac.presets import OptimConfig, PathConfig, RunConfig, TrainConfig

    known = {f.name for f in dataclasses.fields(PathConfig)}
    path = PathConfig(**{key: value for key, value in meta["path"].items() if key in known})
    optim = OptimConfig(lr=settings.lr, warmup_images=settings.warmup_images, grad_clip=settings.grad_clip)
    train = TrainConfig(steps=settings.stage_steps(stage), batch=settings.batch, micro_batch=settings.micro_batch,
                        ema_halflife_images=settings.ema_halflife_images, ema_rampup=settings.ema_rampup,
                        label_dropout=0.0, seed=settings.seed, log_every=settings.log_every,
                        ckpt_every=settings.ckpt_every, sample_every=settings.sample_every,
                        preview_steps=stage.student_steps, preview_solver="euler", preview_guidance=0.0,
                        precision=settings.precision, device=settings.device)
    distill = {"stage": stage.index, "teacher_steps": stage.teacher_steps, "student_steps": stage.student_steps,
               "guidance": float(settings.guidance), "start_states": settings.start_states,
               "teacher": teacher_record}
    return RunConfig(data=data, net=network_config_from_dict(meta["net"]), path=path, optim=optim, train=train,
                     distill=distill).validate()


def _stored_distill(stage_dir: Path) -> dict[str, Any] | None:
    config_file = stage_dir / "config.json"
    if not config_file.is_file():
        return None
    try:
        stored = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DistillKacError(f"--outdir: {config_file} is not valid JSON ({err})") from err
    distill = stored.get("distill") if isinstance(stored, dict) else None
    return distill if isinstance(distill, dict) else None


def check_stage_teacher(stage_dir: Path, record: dict[str, Any], what: str) -> None:
    """Refuse a teacher that is not the one an existing stage was distilled from (one line, naming the
    difference: Kac constants / path, data shape, class count, weights)."""
    stored = _stored_distill(stage_dir)
    if stored is None or not isinstance(stored.get("teacher"), dict):
        return
    old, new = stored["teacher"], record
    advice = "use the same teacher or another --outdir"
    if old.get("path") != new["path"]:
        raise DistillKacError(f"{what}: path {_describe_path(new['path'])} differs from the teacher of "
                              f"{stage_dir} ({_describe_path(old.get('path'))}); {advice}")
    if old.get("data_shape") != new["data_shape"]:
        raise DistillKacError(f"{what}: data shape {new['data_shape']} differs from the teacher of {stage_dir} "
                              f"({old.get('data_shape')}); {advice}")
    if old.get("num_classes") != new["num_classes"]:
        raise DistillKacError(f"{what}: {new['num_classes']} classes differ from the teacher of {stage_dir} "
                              f"({old.get('num_classes')} classes); {advice}")
    if old.get("sha256") != new["sha256"]:
        raise DistillKacError(f"{what}: weights sha256 {new['sha256'][:12]}… are not those of the teacher "
                              f"{stage_dir} was distilled from ({str(old.get('sha256'))[:12]}…); {advice}")


def _describe_path(config: Any) -> str:
    if not isinstance(config, dict):
        return repr(config)
    if config.get("kind") == "kac":
        return (f"kac a={config.get('kac_a'):g}, c={config.get('kac_c'):g}, T={config.get('T'):g}, "
                f"{config.get('schedule')}/{config.get('g_schedule')}")
    return ", ".join(f"{key}={value}" for key, value in config.items())


#: Settings a finished stage may be skipped under although they differ (they do not change the student).
SKIPPABLE_FIELDS = ("device", "precision", "compile", "channels_last")


def check_finished_stage(stage_dir: Path, config) -> None:
    """Refuse to skip a finished stage whose stored config differs from ``config`` in anything that
    defines its student (the training loop's length, logging and hardware settings may differ)."""
    from distillkac.presets import RESUMABLE_TRAIN_FIELDS, first_difference

    stored = json.loads((stage_dir / "config.json").read_text(encoding="utf-8"))
    stored.pop("environment", None)
    ignored = {f"train.{name}" for name in (*RESUMABLE_TRAIN_FIELDS, *SKIPPABLE_FIELDS)}
    difference = first_difference(stored, config.to_dict(), ignored)
    if difference is not None:
        name, old, new = difference
        raise DistillKacError(f"{stage_dir}: this finished stage was distilled with {name} = {old!r}, "
                              f"now {new!r}; use the same settings or another --outdir")


def stage_finished(stage_dir: Path, steps: int) -> bool:
    """The stage's artefact exists and was written at (or after) its last optimiser step."""
    if not (stage_dir / ARTIFACT_DIR / "config.json").is_file():
        return False
    return int(read_artifact_meta(stage_dir / ARTIFACT_DIR).get("train_step", 0)) >= steps


# ------------------------------------------------------------------------------------- the runner

@dataclass
class StageOutcome:
    stage: Stage
    stage_dir: Path
    skipped: bool
    closeness: dict[str, Any] | None
    wall_seconds: float


def _student_preview(config, path, num_classes: int, stage: Stage):
    from distillkac.sampling import cycle_labels, generate

    count = 2000 if config.net.kind == "mlp" else (10 * min(num_classes, 10) if num_classes else 64)
    labels = cycle_labels(count, num_classes)

    def preview(model: nn.Module, step: int) -> torch.Tensor:
        device = next(model.parameters()).device
        return generate(model, path, seeds=range(count), labels=labels, steps=stage.student_steps,
                        solver="euler", guidance=0.0, device=device, batch_size=count).samples

    return preview


def _echo(message: str) -> None:
    print(message, file=sys.stderr)


class Distillation:
    """All stages of one distillation into ``outdir`` (see :func:`run_distillation`)."""

    def __init__(self, teacher: str | os.PathLike, outdir: str | os.PathLike, settings: DistillSettings,
                 data: str | None = None) -> None:
        self.source = resolve_teacher(teacher)
        self.outdir = check_output_dir(outdir, "--outdir")
        self.settings = settings.validate()
        meta = self.source.meta
        teacher_steps = int(meta["steps"]) if meta.get("kind") == "student" else None
        self.plan = validate_plan(settings.plan, teacher_steps)
        if meta.get("kind") == "student" and float(meta["guidance"]) != settings.guidance:
            raise DistillKacError(f"--guidance: {self.source.artifact} is a student with guidance "
                                  f"w={float(meta['guidance']):g} baked in; its students keep it "
                                  f"(got {settings.guidance:g})")
        check_guidance(settings.guidance, int(meta["num_classes"]))
        self.stages = plan_stages(self.plan)
        self.data = resolve_data(self.source, data)

    def select(self, stage: int | None) -> list[Stage]:
        if stage is None:
            return self.stages
        if not 1 <= stage <= len(self.stages):
            raise DistillKacError(f"--stage: must be 1..{len(self.stages)} for the plan "
                                  f"{','.join(map(str, self.plan))}, got {stage}")
        return [self.stages[stage - 1]]

    def stage_dir(self, stage: Stage) -> Path:
        return self.outdir / stage.name

    def teacher_artifact(self, stage: Stage) -> Path:
        if stage.index == 1:
            return self.source.artifact
        return self.stage_dir(self.stages[stage.index - 2]) / ARTIFACT_DIR

    def configs(self, stage: int | None = None) -> list[dict[str, Any]]:
        """The resolved config of each selected stage (the ``--dry-run`` output); creates nothing."""
        rows = []
        for item in self.select(stage):
            config = stage_run_config(self.source.meta, self.data, item, self.settings, None)
            record = config.to_dict()
            record["distill"]["teacher"] = str(self.teacher_artifact(item))
            rows.append({"stage_dir": str(self.stage_dir(item)), **record})
        return rows

    def load_stage_teacher(self, stage: Stage, device: torch.device) -> Teacher:
        artifact = self.teacher_artifact(stage)
        if stage.index > 1:
            previous = self.stages[stage.index - 2]
            if not stage_finished(self.stage_dir(previous), self.settings.stage_steps(previous)):
                raise DistillKacError(f"--stage {stage.index}: its teacher {self.stage_dir(previous)} has not "
                                      f"finished; run stage {previous.index} first")
        return load_teacher(artifact, stage.teacher_steps, self.settings.guidance, device=device)

    def run(self, stage: int | None = None, *, progress: bool = True, dataset=None) -> list[StageOutcome]:
        from distillkac.data import load_dataset
        from distillkac.sampling import resolve_device

        selected = self.select(stage)
        first = teacher_record(self.source.meta, self.plan[0], self.settings.guidance)
        check_stage_teacher(self.stage_dir(self.stages[0]), first, "--teacher")
        device = resolve_device(self.settings.device)
        dataset = dataset if dataset is not None else load_dataset(self.data, "train")
        self._check_dataset(dataset)
        outcomes = []
        for item in selected:
            teacher = self.load_stage_teacher(item, device)
            what = "--teacher" if item.index == 1 else f"stage {item.index}'s teacher {teacher.artifact}"
            check_stage_teacher(self.stage_dir(item), teacher.record(), what)
            outcomes.append(self.run_stage(item, teacher, dataset, device, progress))
        self.write_summary()
        return outcomes

    def _check_dataset(self, dataset) -> None:
        meta = self.source.meta
        if list(dataset.data_shape) != list(meta["data_shape"]):
            raise DistillKacError(f"--data: the dataset's shape {list(dataset.data_shape)} differs from the "
                                  f"teacher's {list(meta['data_shape'])}")
        if int(meta["num_classes"]) not in (0, dataset.num_classes):
            raise DistillKacError(f"--data: the dataset has {dataset.num_classes} classes, the teacher "
                                  f"{meta['num_classes']}")

    def run_stage(self, stage: Stage, teacher: Teacher, dataset, device: torch.device,
                  progress: bool) -> StageOutcome:
        from distillkac.nets import build_network
        from distillkac.paths import build_path
        from distillkac.train import train

        start = time.perf_counter()
        stage_dir = self.stage_dir(stage)
        config = stage_run_config(teacher.meta, self.data, stage, self.settings, teacher.record())
        path = build_path(teacher.meta["path"])
        skipped = stage_finished(stage_dir, self.settings.stage_steps(stage))
        if skipped:
            check_finished_stage(stage_dir, config)
            if progress:
                _echo(f"{stage_dir}: stage {stage.index} ({stage.teacher_steps} -> {stage.student_steps} steps) "
                      f"is finished; skipped")
        else:
            student = build_network(teacher.meta["net"], generator=torch.Generator().manual_seed(0))
            student.load_state_dict(teacher.model.state_dict())
            history = teacher.meta.get("stages", []) if teacher.meta.get("kind") == "student" else []
            objective = EndpointObjective(teacher, path, stage, self.settings.start_states, history)
            preview = _student_preview(config, path, int(teacher.meta["num_classes"]), stage)
            train(config, stage_dir, student, objective, dataset, preview=preview, progress=progress)
        closeness = None
        if int(os.environ.get("RANK", "0")) == 0:
            closeness = self.stage_closeness(stage, teacher, config, device, force=not skipped)
        return StageOutcome(stage, stage_dir, skipped, closeness, time.perf_counter() - start)

    def stage_closeness(self, stage: Stage, teacher: Teacher, config, device: torch.device,
                        force: bool) -> dict[str, Any]:
        """Path closeness of the stage's artefact against its teacher: closeness.json, closeness.png and
        a stats.jsonl row (computed once per finished training; reused when the stage is skipped)."""
        from distillkac.paths import build_path
        from distillkac.sampling import cycle_labels
        from distillkac.train import RunLog, autocast_for

        stage_dir = self.stage_dir(stage)
        stored = stage_dir / CLOSENESS_FILE
        if stored.is_file() and not force:
            return json.loads(stored.read_text(encoding="utf-8"))
        student, meta = load_artifact(stage_dir / ARTIFACT_DIR, device=device)
        teacher.model.to(device)
        count = self.settings.closeness_samples
        labels = cycle_labels(count, int(meta["num_classes"]))
        result = path_closeness(teacher.velocity, student, path=build_path(meta["path"]),
                                teacher_steps=teacher.steps, student_steps=stage.student_steps,
                                seeds=range(count), labels=labels, teacher_solver=teacher.solver,
                                device=device, autocast=autocast_for(config, device))
        result = {**result, "stage": stage.index, "student_sha256": meta["weights_sha256"],
                  "teacher_sha256": teacher.sha256, "train_step": meta.get("train_step")}
        atomic_write_json(stored, result)
        plot_closeness({f"{stage.student_steps}-step student": result}, stage_dir / CLOSENESS_PLOT,
                       title=f"stage {stage.index}: {stage.teacher_steps}-step teacher vs "
                             f"{stage.student_steps}-step student")
        row = {"step": meta.get("train_step"), "closeness_max": result["max"], "closeness_final": result["final"],
               "closeness_samples": count}
        RunLog(stage_dir, enabled=True, echo=_echo).stats(row)
        return result

    def write_summary(self) -> None:
        """``OUT/distill.json``: the plan, the teacher and each existing stage's closeness numbers."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        stages = []
        for item in self.stages:
            closeness_file = self.stage_dir(item) / CLOSENESS_FILE
            entry = {"stage": item.index, "dir": item.name, "teacher_steps": item.teacher_steps,
                     "student_steps": item.student_steps}
            if closeness_file.is_file():
                curve = json.loads(closeness_file.read_text(encoding="utf-8"))
                entry.update(closeness_max=curve["max"], closeness_final=curve["final"])
            stages.append(entry)
        atomic_write_json(self.outdir / SUMMARY_FILE, {
            "plan": list(self.plan), "teacher": str(self.source.artifact),
            "teacher_sha256": self.source.meta["weights_sha256"], "guidance": self.settings.guidance,
            "start_states": self.settings.start_states, "stages": stages})


def run_distillation(teacher: str | os.PathLike, outdir: str | os.PathLike, settings: DistillSettings, *,
                     stage: int | None = None, data: str | None = None, progress: bool = True,
                     dataset=None) -> list[StageOutcome]:
    """Run every stage of ``settings.plan`` (or just ``stage``, 1-based) into ``outdir/stage-<M>step``.

    Finished stages are skipped, an interrupted one resumes; each stage starts from its teacher's weights.
    """
    return Distillation(teacher, outdir, settings, data).run(stage, progress=progress, dataset=dataset)
