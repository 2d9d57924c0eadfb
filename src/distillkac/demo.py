"""``distillkac demo``: the paper's table in miniature, on the bundled 8x8 digits and a CPU.

One command trains the class-conditional Kac-flow teacher, distils it 100 -> 20 -> 4 -> 2 -> 1 steps with
velocity-space CFG (method.md §4), trains the two Gaussian baselines with the same network and budget
(flow matching, sampled with Euler; VP diffusion, sampled with DDIM), evaluates every model at every step
count, and at half of each student's, with the digits metrics on disjoint seed blocks (the code of
``distillkac eval``; every row on the same seeds and labels, so rows compare by paired differences),
records the velocity along each model's trajectories, and writes ``DIR/report.md`` and ``DIR/report.json``
(``distillkac.report``). Every number comes from the run.

Each part is a run directory that resumes or is skipped on a rerun (``demo-part.json`` records when it
finished, how long it took and the weights it used). Parts are jobs (``distillkac.jobs``) run in up to
``jobs`` spawned worker processes with ``threads`` torch threads each, every part as soon as the parts it
needs are done, the critical path (teacher -> distillation) first: on 2 cores two single-thread processes
beat one process with two threads (the report records a measurement taken at the start of the run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillkac.checkpoint import Artifact, load_artifact, read_artifact_meta
from distillkac.data import load_dataset
from distillkac.diagnostics import velocity_profile
from distillkac.errors import DistillKacError
from distillkac.evaluate import evaluate
from distillkac.fields import is_int, require
from distillkac.files import atomic_write_json, sha256_bytes
from distillkac.jobs import Job, run_jobs
from distillkac.metrics.digits import DigitsClassifier
from distillkac.nets import build_network
from distillkac.paths import build_path
from distillkac.presets import get_distill_preset, get_preset
from distillkac.report import (
    CLOSENESS_PLOT,
    DISTILL_DIR,
    EVAL_PRECISION,
    FLOW,
    FLOW_DIR,
    GUIDANCE,
    NFE_PLOT,
    PROFILE_GRID,
    REPORT_JSON,
    REPORT_MD,
    SEED,
    TARGETS_PLOT,
    TEACHER,
    TEACHER_DIR,
    TRAINED,
    VELOCITY_PLOT,
    VP,
    VP_DIR,
    Model,
    build_report,
    student_dirs,
    utc_now,
)
from distillkac.runtime import torch_threads
from distillkac.sampling import cycle_labels, sample_artifact, save_grid_png
from distillkac.stages import run_distillation
from distillkac.train import TeacherObjective, resolve_config, time_train_steps, train_teacher

DEMO_FORMAT = "distillkac-demo"
DEMO_VERSION = 1
MARKER_FILE = "demo.json"
PART_FILE = "demo-part.json"
EVAL_DIR, DIAGNOSTICS_DIR, SAMPLES_DIR = "eval", "diagnostics", "samples"
OWN_ENTRIES = (TEACHER_DIR, FLOW_DIR, VP_DIR, DISTILL_DIR, EVAL_DIR, DIAGNOSTICS_DIR, SAMPLES_DIR, CLOSENESS_PLOT,
               NFE_PLOT, VELOCITY_PLOT, TARGETS_PLOT, REPORT_MD, REPORT_JSON, MARKER_FILE)
"""Everything the demo writes in its directory; ``--fresh`` deletes these and nothing else."""


# ------------------------------------------------------------------------------------------ budgets

@dataclass(frozen=True)
class DemoBudget:
    """How much work each part does. ``plan``: the teacher's steps, then the students' (every teacher and
    baseline is evaluated at these step counts and at half of each even student step count, so that each
    student meets every guided sampler at its own NFE). Every row is evaluated on ``eval_blocks`` seed
    blocks of ``eval_samples`` images."""

    name: str
    plan: tuple[int, ...]
    train_steps: int
    train_batch: int
    distill_steps: tuple[int, ...]
    distill_batch: int
    eval_samples: int
    eval_blocks: int
    grid_samples: int
    profile_samples: int
    closeness_samples: int
    preview_steps: int
    calibrate: bool


BUDGETS: dict[str, DemoBudget] = {
    # About 5.5 minutes on 2 quiet CPU cores (319 s measured; two single-thread worker processes). 800
    # training steps, the digits preset's own length (with 500 the teacher's 10-step solve beat its 100-step
    # one); 8 seed blocks, because 4 left gaps of 1-2 fd_digits between students and teacher unresolved.
    "full": DemoBudget("full", plan=(100, 20, 4, 2, 1), train_steps=800, train_batch=128,
                       distill_steps=(80, 200, 300, 300), distill_batch=64, eval_samples=100, eval_blocks=8,
                       grid_samples=50, profile_samples=100, closeness_samples=100, preview_steps=100, calibrate=True),
    # About 1 minute on 2 quiet cores (53 s measured): the whole pipeline, too short to learn digits well.
    "quick": DemoBudget("quick", plan=(100, 20, 4, 2, 1), train_steps=150, train_batch=64,
                        distill_steps=(20, 40, 40, 40), distill_batch=32, eval_samples=40, eval_blocks=3,
                        grid_samples=20, profile_samples=32, closeness_samples=32, preview_steps=20, calibrate=True),
    # For the tests only: seconds; a shorter plan; the numbers mean nothing.
    "tiny": DemoBudget("tiny", plan=(4, 2, 1), train_steps=6, train_batch=32, distill_steps=(3, 3),
                       distill_batch=16, eval_samples=20, eval_blocks=2, grid_samples=10, profile_samples=8,
                       closeness_samples=8, preview_steps=4, calibrate=False),
}


def get_budget(name: str) -> DemoBudget:
    if name not in BUDGETS:
        raise DistillKacError(f"--budget: unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


# --------------------------------------------------------------------------------------- configs

def train_config(budget: DemoBudget, model: Model):
    """The digits preset with the demo's budget, on the CPU, on ``model``'s path (the preset's Kac constants
    and schedules for the Kac teacher)."""
    config = get_preset("digits")
    steps, batch = budget.train_steps, budget.train_batch
    config.path = dataclasses.replace(config.path, kind=model.path_kind)
    config.optim = dataclasses.replace(config.optim, warmup_images=min(config.optim.warmup_images, steps * batch // 5))
    config.train = dataclasses.replace(
        config.train, steps=steps, batch=batch, micro_batch=batch, device="cpu", log_every=max(1, steps // 20),
        ckpt_every=max(1, steps // 4), sample_every=steps, preview_steps=budget.preview_steps,
        preview_solver=model.solver, preview_guidance=GUIDANCE)
    return config.validate()


def distill_settings(budget: DemoBudget):
    """The digits distillation preset with the demo's plan, lengths and batch, on the CPU."""
    config, longest = get_distill_preset("digits"), max(budget.distill_steps)
    train = dataclasses.replace(config.train, batch=budget.distill_batch, micro_batch=budget.distill_batch,
                                device="cpu", log_every=max(1, longest // 10), ckpt_every=max(1, longest // 2),
                                sample_every=longest)
    return dataclasses.replace(config, plan=budget.plan, guidance=GUIDANCE, steps_per_stage=budget.distill_steps,
                               closeness_samples=budget.closeness_samples, train=train).validate()


# ------------------------------------------------------------------------------------------- parts

def _echo(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _finished_part(directory: Path, inputs: dict[str, str]) -> dict[str, Any] | None:
    """The part record of ``directory`` if it finished with the same inputs (weights hashes)."""
    record_file = directory / PART_FILE
    if not record_file.is_file():
        return None
    record = _read_json(record_file)
    return record if record.get("inputs") == inputs else None


def _run_part(name: str, directory: Path, inputs: dict[str, str], work: Callable[[], dict[str, Any]]
              ) -> dict[str, Any]:
    """Run ``work`` unless ``directory`` holds a finished record with the same inputs; record it."""
    done = _finished_part(directory, inputs)
    if done is not None:
        _echo(f"{name}: finished earlier in {done['seconds']:.0f} s; reused")
        return {**done, "reused": True}
    _echo(f"{name}: started")
    start = time.perf_counter()
    details = work()
    record = {"part": name, "seconds": round(time.perf_counter() - start, 2), "finished_utc": utc_now(),
              "inputs": inputs, "threads": torch.get_num_threads(), "pid": os.getpid(), **details}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / PART_FILE, record)
    _echo(f"{name}: done in {record['seconds']:.0f} s")
    return {**record, "reused": False}


def _weights(directory: Path) -> str:
    return read_artifact_meta(Artifact.locate(directory))["weights_sha256"]


def train_part(outdir: str, budget: DemoBudget, model_key: str) -> dict[str, Any]:
    """Train the Kac teacher or a baseline (``model_key``) into its run directory."""
    model = _model(model_key)
    run_dir = Path(outdir) / model.directory
    config = train_config(budget, model)

    def work() -> dict[str, Any]:
        result = train_teacher(config, run_dir, progress=False)
        return {"step": result.step, "last_loss": result.last_loss}

    record = _run_part(f"train {model.label}", run_dir, {"config": _config_hash(config.to_dict())}, work)
    return {**record, "config": config.to_dict(), "weights_sha256": _weights(run_dir)}


def distill_part(outdir: str, budget: DemoBudget) -> dict[str, Any]:
    """Distil the teacher through the plan into ``distill/stage-<M>step``."""
    out = Path(outdir) / DISTILL_DIR
    settings = distill_settings(budget)
    teacher = Path(outdir) / TEACHER_DIR

    def work() -> dict[str, Any]:
        outcomes = run_distillation(teacher, out, settings, data="digits", progress=False)
        return {"stages": [{"stage": o.stage.index, "student_steps": o.stage.student_steps,
                            "seconds": round(o.wall_seconds, 2)} for o in outcomes]}

    inputs = {"teacher": _weights(teacher), "settings": _config_hash(dataclasses.asdict(settings))}
    record = _run_part("distillation", out, inputs, work)
    return {**record, "settings": dataclasses.asdict(settings)}


def _config_hash(values: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(values, sort_keys=True, default=str).encode())[:16]


def _model(key: str) -> Model:
    return {model.key: model for model in TRAINED}[key]


@dataclass(frozen=True)
class EvalTask:
    """One evaluate() call: models (directories relative to the demo), solver, its out directory."""

    name: str
    checkpoints: tuple[str, ...]
    solver: str


def eval_tasks(budget: DemoBudget, outdir: Path) -> list[EvalTask]:
    """Longest first: the teacher with AB-2 and Euler, the baselines, then the students."""
    students = tuple(str(d.relative_to(outdir) / Artifact.DIR) for d in student_dirs(outdir, budget.plan))
    return [EvalTask("teacher-ab2", (TEACHER_DIR,), "ab2"), EvalTask("teacher-euler", (TEACHER_DIR,), "euler"),
            EvalTask("flow-euler", (FLOW_DIR,), "euler"), EvalTask("vp-ddim", (VP_DIR,), "ddim"),
            EvalTask("students", students, "euler")]


def eval_steps(plan: tuple[int, ...]) -> list[int]:
    """The step counts every teacher and baseline is evaluated at, most first: the plan's, and half of each
    even student step count (a guided sampler at S/2 steps spends the S NFE of the S-step student)."""
    return sorted(set(plan) | {steps // 2 for steps in plan[1:] if steps % 2 == 0}, reverse=True)


def eval_part(outdir: str, budget: DemoBudget, task: EvalTask) -> dict[str, Any]:
    """Evaluate ``task``'s models at every step count of ``eval_steps`` (students: their own) on the budget's
    seed blocks in fp32, and draw a PNG grid of the first ``grid_samples`` images of every row (the seeds
    and labels of the first block)."""
    root = Path(outdir)
    out = root / EVAL_DIR / task.name
    checkpoints = [str(root / c) for c in task.checkpoints]
    steps = eval_steps(budget.plan)
    protocol = {"steps": steps, "num": budget.eval_samples, "blocks": budget.eval_blocks, "seed": SEED,
                "precision": EVAL_PRECISION, "guidance": GUIDANCE}
    inputs = {**{c: _weights(root / c) for c in task.checkpoints}, "protocol": json.dumps(protocol)}

    def work() -> dict[str, Any]:
        rows = evaluate(checkpoints, steps, [task.solver], [GUIDANCE], "digits", budget.eval_samples,
                        batch_size=256, seed=SEED, device="cpu", out=out, progress=False, blocks=budget.eval_blocks,
                        precision=EVAL_PRECISION)
        rows = [row for row in rows if "skipped" not in row]
        for row in rows:
            row["grid"] = _draw_grid(root, row, budget)
        return {"rows": rows}

    return _run_part(f"evaluate {task.name}", out, inputs, work)


def _grid_name(row: dict[str, Any]) -> str:
    return f"{row['model']}-{row['solver']}-{row['steps']}step.png"


def _draw_grid(root: Path, row: dict[str, Any], budget: DemoBudget) -> str:
    count = budget.grid_samples
    result = sample_artifact(row["checkpoint"], seeds=[SEED + i for i in range(count)],
                             labels=cycle_labels(count, 10), steps=row["steps"], solver=row["solver"],
                             guidance=row["guidance"], device="cpu")
    relative = f"{SAMPLES_DIR}/{_grid_name(row)}"
    save_grid_png(result.samples, root / relative, nrow=10)
    return relative


def profile_part(outdir: str, budget: DemoBudget, model_key: str) -> dict[str, Any]:
    """The velocity along ``model``'s sampling trajectories: RMS and max |u| per coordinate per step, with the
    teacher's step count on the quadratic grid (last evaluation at ``T/steps²``, close to the data), the
    model's own solver and the demo's guidance."""
    model, root = _model(model_key), Path(outdir)
    directory = root / DIAGNOSTICS_DIR / f"velocity-{model.key}"

    def work() -> dict[str, Any]:
        network, meta = load_artifact(Artifact.locate(root / model.directory), device="cpu")
        count = budget.profile_samples
        profile = velocity_profile(network, build_path(meta["path"]), steps=budget.plan[0], solver=model.solver,
                                   guidance=GUIDANCE, seeds=range(SEED, SEED + count),
                                   labels=cycle_labels(count, 10), device="cpu", grid=PROFILE_GRID)
        return {"model": model.key, "profile": profile, "steps": budget.plan[0], "solver": model.solver,
                "samples": count}

    inputs = {model.key: _weights(root / model.directory), "grid": PROFILE_GRID, "guidance": str(GUIDANCE)}
    return _run_part(f"velocity {model.label}", directory, inputs, work)


# ------------------------------------------------------------------------------------------ jobs

def demo_jobs(root: str, budget: DemoBudget) -> list[Job]:
    """Every part of the demo in priority order, with its dependencies."""
    evals = {task.name: task for task in eval_tasks(budget, Path(root))}
    return [Job("train_teacher", train_part, (root, budget, TEACHER.key)),
            Job("train_flow", train_part, (root, budget, FLOW.key)),
            Job("distill", distill_part, (root, budget), ("train_teacher",)),
            Job("train_vp", train_part, (root, budget, VP.key)),
            Job("eval_teacher-ab2", eval_part, (root, budget, evals["teacher-ab2"]), ("train_teacher",)),
            Job("eval_teacher-euler", eval_part, (root, budget, evals["teacher-euler"]), ("train_teacher",)),
            Job("eval_flow-euler", eval_part, (root, budget, evals["flow-euler"]), ("train_flow",)),
            Job("eval_vp-ddim", eval_part, (root, budget, evals["vp-ddim"]), ("train_vp",)),
            Job("eval_students", eval_part, (root, budget, evals["students"]), ("distill",)),
            *[Job(f"velocity_{m.key}", profile_part, (root, budget, m.key), (f"train_{m.key}",)) for m in TRAINED]]


# ---------------------------------------------------------------------------------- the directory

def prepare_outdir(outdir: Path, budget: DemoBudget, fresh: bool) -> None:
    """Refuse a directory that is not the demo's; with ``fresh`` delete the demo's own entries only."""
    if outdir.exists() and not outdir.is_dir():
        raise DistillKacError(f"--outdir: {outdir} exists and is not a directory")
    marker = outdir / MARKER_FILE
    if outdir.is_dir() and any(outdir.iterdir()):
        if not marker.is_file():
            raise DistillKacError(f"--outdir: {outdir} exists and is not a distillkac demo directory "
                                  f"(no {MARKER_FILE}); choose a new or empty directory")
        stored = _read_json(marker)
        if stored.get("format") != DEMO_FORMAT:
            raise DistillKacError(f"--outdir: {marker} is not a distillkac demo marker; choose another directory")
        if fresh:
            for name in OWN_ENTRIES:
                entry = outdir / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.exists() or entry.is_symlink():
                    entry.unlink()
        elif stored.get("budget", {}).get("name") != budget.name:
            raise DistillKacError(f"--outdir: {outdir} holds a {stored.get('budget', {}).get('name')!r} demo, "
                                  f"not {budget.name!r}; add --fresh to start over or choose another directory")
    outdir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_json(marker, {"format": DEMO_FORMAT, "version": DEMO_VERSION, "created_utc": utc_now(),
                                   "budget": dataclasses.asdict(budget)})


# ---------------------------------------------------------------------------------- calibration

def calibrate_threads(repeats: int = 2) -> dict[str, Any]:
    """Seconds per training step of the digits teacher (the loop's own step at the full budget's batch:
    forward + backward + AdamW + EMA) with one torch thread and with all cores' threads, measured here
    (median of ``repeats``, after one warm-up)."""
    config = train_config(BUDGETS["full"], TEACHER)
    dataset = load_dataset(config.data, "train")
    config = resolve_config(config, tuple(dataset.data_shape), dataset.num_classes)
    path = build_path(dataclasses.asdict(config.path))
    cores, timings = os.cpu_count() or 1, {}
    for threads in sorted({1, cores}):
        with torch_threads(threads):
            model = build_network(config.net, generator=torch.Generator().manual_seed(0))
            objective = TeacherObjective(path, dataset.num_classes, config.train.label_dropout)
            seconds = sorted(time_train_steps(config, model, objective, dataset, repeats + 1)[1:])
        timings[threads] = seconds[len(seconds) // 2]
    return {"seconds_per_step": {str(k): v for k, v in timings.items()}, "cores": cores,
            "batch": config.train.batch, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------------------- the run

@dataclass
class DemoResult:
    outdir: Path
    report: dict[str, Any]
    wall_seconds: float


def run_demo(outdir: str | os.PathLike, budget: DemoBudget | str = "full", *, fresh: bool = False,
             jobs: int | None = None, threads: int = 1, blocks: int | None = None) -> DemoResult:
    """Run (or resume) the whole demo into ``outdir``; returns the report (also written to disk).
    ``blocks`` replaces the budget's seed-block count (only the evaluations rerun)."""
    start = time.perf_counter()
    budget = get_budget(budget) if isinstance(budget, str) else budget
    if blocks is not None:
        require(is_int(blocks) and blocks >= 2, "--blocks", "intervals need at least 2 seed blocks", blocks)
        budget = dataclasses.replace(budget, eval_blocks=blocks)
    jobs = min(2, os.cpu_count() or 1) if jobs is None else jobs
    for flag, value in (("--jobs", jobs), ("--threads", threads)):
        require(is_int(value) and value >= 1, flag, "must be a positive integer", value)
    outdir = Path(outdir)
    prepare_outdir(outdir, budget, fresh)
    calibration = calibrate_threads() if budget.calibrate else None
    classifier = DigitsClassifier.load_or_train()
    parts = run_jobs(demo_jobs(str(outdir), budget), workers=jobs, threads=threads)
    report = build_report(outdir, dataclasses.asdict(budget), parts, classifier, calibration,
                          {"jobs": jobs, "threads_per_process": threads}, start)
    return DemoResult(outdir, report, time.perf_counter() - start)
