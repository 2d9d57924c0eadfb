"""``distillkac demo``: the paper's table in miniature, on the bundled 8x8 digits and a CPU.

One command trains the class-conditional Kac-flow teacher, distils it 100 -> 20 -> 4 -> 2 -> 1 steps with
velocity-space CFG (method.md §4), trains the two Gaussian baselines with the same network and budget
(flow matching, sampled with Euler; VP diffusion, sampled with DDIM), evaluates every model at every step
count with the digits metrics (the code of ``distillkac eval``), records the velocity along each model's
trajectories, and writes ``DIR/report.md`` and ``DIR/report.json``. Every number comes from the run.

Each part is a run directory that resumes or is skipped on a rerun (``demo-part.json`` records when it
finished, how long it took and the weights it used). Parts run in up to ``jobs`` spawned worker processes
with ``threads`` torch threads each, every part as soon as the parts it needs are done, the critical path
(teacher -> distillation) first: on 2 cores two single-thread processes beat one process with two threads
(the report records a measurement taken at the start of the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from distillkac.checkpoint import atomic_write_bytes, atomic_write_json, read_artifact_meta
from distillkac.errors import DistillKacError

DEMO_FORMAT = "distillkac-demo"
DEMO_VERSION = 1
MARKER_FILE = "demo.json"
PART_FILE = "demo-part.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
GUIDANCE = 1.0
"""The CFG weight of the guided teacher, baked into the students, and used for the baselines."""
SEED = 0
"""Image i of every row uses seed SEED + i and label i mod 10 (as ``distillkac eval``)."""
PROFILE_GRID = "quadratic"
"""Time grid of the velocity diagnostics: T(1 - k/N)², so the last steps come close to the data."""

TEACHER_DIR, FLOW_DIR, VP_DIR = "kac-teacher", "flow-baseline", "vp-baseline"
DISTILL_DIR, EVAL_DIR, DIAGNOSTICS_DIR, SAMPLES_DIR = "distill", "eval", "diagnostics", "samples"
CLOSENESS_PLOT, NFE_PLOT, VELOCITY_PLOT, TARGETS_PLOT = (
    "closeness.png", "metric_vs_nfe.png", "velocity.png", "velocity_targets.png")
OWN_ENTRIES = (TEACHER_DIR, FLOW_DIR, VP_DIR, DISTILL_DIR, EVAL_DIR, DIAGNOSTICS_DIR, SAMPLES_DIR, CLOSENESS_PLOT,
               NFE_PLOT, VELOCITY_PLOT, TARGETS_PLOT, REPORT_MD, REPORT_JSON, MARKER_FILE)
"""Everything the demo writes in its directory; ``--fresh`` deletes these and nothing else."""


# ------------------------------------------------------------------------------------------ budgets

@dataclass(frozen=True)
class DemoBudget:
    """How much work each part does. ``plan``: the teacher's steps, then the students' (also the step
    counts every teacher and baseline is evaluated at)."""

    name: str
    plan: tuple[int, ...]
    train_steps: int
    train_batch: int
    distill_steps: tuple[int, ...]
    distill_batch: int
    eval_samples: int
    grid_samples: int
    profile_samples: int
    closeness_samples: int
    preview_steps: int
    calibrate: bool


BUDGETS: dict[str, DemoBudget] = {
    # About 10-15 minutes on 2 quiet CPU cores (two single-thread worker processes).
    "full": DemoBudget("full", plan=(100, 20, 4, 2, 1), train_steps=500, train_batch=128,
                       distill_steps=(80, 200, 300, 300), distill_batch=64, eval_samples=300, grid_samples=50,
                       profile_samples=100, closeness_samples=100, preview_steps=100, calibrate=True),
    # About 3 minutes: the whole pipeline, too short to learn digits well.
    "quick": DemoBudget("quick", plan=(100, 20, 4, 2, 1), train_steps=150, train_batch=64,
                        distill_steps=(20, 40, 40, 40), distill_batch=32, eval_samples=100, grid_samples=20,
                        profile_samples=32, closeness_samples=32, preview_steps=20, calibrate=True),
    # For the tests only: seconds; a shorter plan; the numbers mean nothing.
    "tiny": DemoBudget("tiny", plan=(4, 2, 1), train_steps=6, train_batch=32, distill_steps=(3, 3),
                       distill_batch=16, eval_samples=20, grid_samples=10, profile_samples=8,
                       closeness_samples=8, preview_steps=4, calibrate=False),
}


def get_budget(name: str) -> DemoBudget:
    if name not in BUDGETS:
        raise DistillKacError(f"--budget: unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


# -------------------------------------------------------------------------------------- the models

@dataclass(frozen=True)
class Model:
    """A trained model of the demo: its run directory, path kind, the solver it is sampled with."""

    key: str
    directory: str
    path_kind: str
    solver: str
    label: str


TEACHER = Model("teacher", TEACHER_DIR, "kac", "ab2", "Kac teacher")
FLOW = Model("flow", FLOW_DIR, "flow", "euler", "flow matching")
VP = Model("vp", VP_DIR, "vp", "ddim", "VP diffusion")
TRAINED = (TEACHER, FLOW, VP)


def train_config(budget: DemoBudget, model: Model):
    """The digits preset with the demo's budget, on the CPU, on ``model``'s path."""
    from distillkac.presets import PathConfig, get_preset

    config = get_preset("digits")
    steps, batch = budget.train_steps, budget.train_batch
    config.path = PathConfig(kind=model.path_kind)
    config.optim = dataclasses.replace(config.optim, warmup_images=min(config.optim.warmup_images, steps * batch // 5))
    config.train = dataclasses.replace(
        config.train, steps=steps, batch=batch, micro_batch=batch, device="cpu", log_every=max(1, steps // 20),
        ckpt_every=max(1, steps // 4), sample_every=steps, preview_steps=budget.preview_steps,
        preview_solver=model.solver, preview_guidance=GUIDANCE)
    return config.validate()


def distill_settings(budget: DemoBudget):
    """The digits distillation preset with the demo's plan, lengths and batch, on the CPU."""
    from distillkac.distill import get_distill_preset

    longest = max(budget.distill_steps)
    return dataclasses.replace(
        get_distill_preset("digits"), plan=budget.plan, guidance=GUIDANCE, steps_per_stage=budget.distill_steps,
        batch=budget.distill_batch, micro_batch=budget.distill_batch, device="cpu",
        closeness_samples=budget.closeness_samples, log_every=max(1, longest // 10),
        ckpt_every=max(1, longest // 2), sample_every=longest).validate()


def student_dirs(outdir: Path, budget: DemoBudget) -> list[Path]:
    from distillkac.distill import plan_stages

    return [outdir / DISTILL_DIR / stage.name for stage in plan_stages(budget.plan)]


# ------------------------------------------------------------------------------------------- parts

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    record = {"part": name, "seconds": round(time.perf_counter() - start, 2), "finished_utc": _now(),
              "inputs": inputs, "threads": torch.get_num_threads(), "pid": os.getpid(), **details}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / PART_FILE, record)
    _echo(f"{name}: done in {record['seconds']:.0f} s")
    return {**record, "reused": False}


def _weights(directory: Path) -> str:
    from distillkac.sampling import artifact_dir

    return read_artifact_meta(artifact_dir(directory))["weights_sha256"]


def train_part(outdir: str, budget_name: str, model_key: str) -> dict[str, Any]:
    """Train the Kac teacher or a baseline (``model_key``) into its run directory."""
    from distillkac.train import train_teacher

    budget, model = get_budget(budget_name), _model(model_key)
    run_dir = Path(outdir) / model.directory
    config = train_config(budget, model)

    def work() -> dict[str, Any]:
        result = train_teacher(config, run_dir, progress=False)
        return {"step": result.step, "last_loss": result.last_loss}

    record = _run_part(f"train {model.label}", run_dir, {"config": _config_hash(config.to_dict())}, work)
    return {**record, "config": config.to_dict(), "weights_sha256": _weights(run_dir)}


def distill_part(outdir: str, budget_name: str) -> dict[str, Any]:
    """Distil the teacher through the plan into ``distill/stage-<M>step``."""
    from distillkac.distill import run_distillation

    budget = get_budget(budget_name)
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
    import hashlib

    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    students = tuple(str(d.relative_to(outdir) / "artifact") for d in student_dirs(outdir, budget))
    return [EvalTask("teacher-ab2", (TEACHER_DIR,), "ab2"), EvalTask("teacher-euler", (TEACHER_DIR,), "euler"),
            EvalTask("flow-euler", (FLOW_DIR,), "euler"), EvalTask("vp-ddim", (VP_DIR,), "ddim"),
            EvalTask("students", students, "euler")]


def eval_part(outdir: str, budget_name: str, task: EvalTask) -> dict[str, Any]:
    """Evaluate ``task``'s models at every plan step count (students: their own), and draw a PNG grid of
    the first ``grid_samples`` images of every row (same seeds and labels as the evaluation)."""
    from distillkac.evaluate import evaluate

    budget, root = get_budget(budget_name), Path(outdir)
    out = root / EVAL_DIR / task.name
    checkpoints = [str(root / c) for c in task.checkpoints]
    inputs = {c: _weights(root / c) for c in task.checkpoints}

    def work() -> dict[str, Any]:
        rows = evaluate(checkpoints, list(budget.plan), [task.solver], [GUIDANCE], "digits", budget.eval_samples,
                        batch_size=256, seed=SEED, device="cpu", out=out, progress=False)
        rows = [row for row in rows if "skipped" not in row]
        for row in rows:
            row["grid"] = _draw_grid(root, row, budget)
        return {"rows": rows}

    return _run_part(f"evaluate {task.name}", out, inputs, work)


def _grid_name(row: dict[str, Any]) -> str:
    return f"{row['model']}-{row['solver']}-{row['steps']}step.png"


def _draw_grid(root: Path, row: dict[str, Any], budget: DemoBudget) -> str:
    from distillkac.sampling import cycle_labels, sample_artifact, save_grid_png

    count = budget.grid_samples
    is_student = row["kind"] == "student"
    result = sample_artifact(row["checkpoint"], seeds=[SEED + i for i in range(count)],
                             labels=cycle_labels(count, 10), steps=None if is_student else row["steps"],
                             solver=None if is_student else row["solver"],
                             guidance=None if is_student else row["guidance"], device="cpu")
    relative = f"{SAMPLES_DIR}/{_grid_name(row)}"
    save_grid_png(result.samples, root / relative, nrow=10)
    return relative


def profile_part(outdir: str, budget_name: str, model_key: str) -> dict[str, Any]:
    """The velocity along ``model``'s sampling trajectories: RMS and max |u| per coordinate per step, with the
    teacher's step count on the quadratic grid (last evaluation at ``T/steps²``, close to the data), the
    model's own solver and the demo's guidance."""
    from distillkac.checkpoint import load_artifact
    from distillkac.diagnostics import velocity_profile
    from distillkac.paths import build_path
    from distillkac.sampling import artifact_dir, cycle_labels

    budget, model, root = get_budget(budget_name), _model(model_key), Path(outdir)
    directory = root / DIAGNOSTICS_DIR / f"velocity-{model.key}"

    def work() -> dict[str, Any]:
        network, meta = load_artifact(artifact_dir(root / model.directory), device="cpu")
        count = budget.profile_samples
        profile = velocity_profile(network, build_path(meta["path"]), steps=budget.plan[0], solver=model.solver,
                                   guidance=GUIDANCE, seeds=range(SEED, SEED + count),
                                   labels=cycle_labels(count, 10), device="cpu", grid=PROFILE_GRID)
        return {"model": model.key, "profile": profile, "steps": budget.plan[0], "solver": model.solver,
                "samples": count}

    inputs = {model.key: _weights(root / model.directory), "grid": PROFILE_GRID}
    return _run_part(f"velocity {model.label}", directory, inputs, work)


# ------------------------------------------------------------------------------------ the scheduler

def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _executor(jobs: int, threads: int) -> Iterator[ProcessPoolExecutor | None]:
    """Up to ``jobs`` spawned worker processes with ``threads`` torch threads each (None: run here)."""
    if jobs <= 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield None
        finally:
            torch.set_num_threads(previous)
        return
    import multiprocessing

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Task:
    """A part to run once every part named in ``after`` has finished."""

    name: str
    function: Callable[..., dict[str, Any]]
    arguments: tuple
    after: tuple[str, ...] = ()


def schedule(pool: ProcessPoolExecutor | None, tasks: Sequence[Task], jobs: int) -> dict[str, Any]:
    """Run every task after its dependencies, at most ``jobs`` at a time, the earliest listed ready task
    first (the list order is the priority: the critical path, teacher -> distillation, comes first).
    Without a pool the tasks run here in list order (which must respect the dependencies)."""
    if pool is None:
        results: dict[str, Any] = {}
        for task in tasks:
            missing = [name for name in task.after if name not in results]
            if missing:
                raise ValueError(f"task {task.name} is listed before its dependencies {missing}")
            results[task.name] = task.function(*task.arguments)
        return results
    pending, running, results = list(tasks), {}, {}
    while pending or running:
        for task in [t for t in pending if all(name in results for name in t.after)]:
            if len(running) >= jobs:
                break
            running[pool.submit(task.function, *task.arguments)] = task
            pending.remove(task)
        if not running:
            raise ValueError(f"tasks {[t.name for t in pending]} wait on parts that never run")
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            results[running.pop(future).name] = future.result()
    return results


def demo_tasks(root: str, budget: DemoBudget) -> list[Task]:
    """Every part of the demo in priority order, with its dependencies."""
    name = budget.name
    evals = {task.name: task for task in eval_tasks(budget, Path(root))}
    return [Task("train_teacher", train_part, (root, name, TEACHER.key)),
            Task("train_flow", train_part, (root, name, FLOW.key)),
            Task("distill", distill_part, (root, name), ("train_teacher",)),
            Task("train_vp", train_part, (root, name, VP.key)),
            Task("eval_teacher-ab2", eval_part, (root, name, evals["teacher-ab2"]), ("train_teacher",)),
            Task("eval_teacher-euler", eval_part, (root, name, evals["teacher-euler"]), ("train_teacher",)),
            Task("eval_flow-euler", eval_part, (root, name, evals["flow-euler"]), ("train_flow",)),
            Task("eval_vp-ddim", eval_part, (root, name, evals["vp-ddim"]), ("train_vp",)),
            Task("eval_students", eval_part, (root, name, evals["students"]), ("distill",)),
            *[Task(f"velocity_{m.key}", profile_part, (root, name, m.key), (f"train_{m.key}",)) for m in TRAINED]]


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
        atomic_write_json(marker, {"format": DEMO_FORMAT, "version": DEMO_VERSION, "created_utc": _now(),
                                   "budget": dataclasses.asdict(budget)})


# ---------------------------------------------------------------------------------- calibration

def calibrate_threads(repeats: int = 2) -> dict[str, Any]:
    """Seconds per training step of the digits network (batch 128, forward + backward + AdamW) with one
    torch thread and with all cores' threads, measured here (median of ``repeats``, after one warm-up)."""
    from distillkac.data import load_dataset
    from distillkac.nets import build_network
    from distillkac.paths import build_path
    from distillkac.train import TeacherObjective, resolve_config

    config = train_config(BUDGETS["full"], TEACHER)
    dataset = load_dataset(config.data, "train")
    config = resolve_config(config, tuple(dataset.data_shape), dataset.num_classes)
    path = build_path(dataclasses.asdict(config.path))
    previous = torch.get_num_threads()
    cores = os.cpu_count() or 1
    timings = {}
    try:
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            generator = torch.Generator().manual_seed(0)
            model = build_network(config.net, generator=generator)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            objective = TeacherObjective(path, dataset.num_classes)
            seconds = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                x0, y = dataset.get_batch(torch.randint(len(dataset), (128,), generator=generator), generator)
                objective.per_sample_loss(model, x0, y, generator).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds.append(time.perf_counter() - start)
            timings[threads] = sorted(seconds[1:])[len(seconds[1:]) // 2]
    finally:
        torch.set_num_threads(previous)
    return {"seconds_per_step": {str(k): v for k, v in timings.items()}, "cores": cores, "batch": 128,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------------------- the run

@dataclass
class DemoResult:
    outdir: Path
    report: dict[str, Any]
    wall_seconds: float


def run_demo(outdir: str | os.PathLike, budget: DemoBudget | str = "full", *, fresh: bool = False,
             jobs: int | None = None, threads: int = 1) -> DemoResult:
    """Run (or resume) the whole demo into ``outdir``; returns the report (also written to disk)."""
    start = time.perf_counter()
    budget = get_budget(budget) if isinstance(budget, str) else budget
    jobs = min(2, os.cpu_count() or 1) if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise DistillKacError(f"--jobs: must be a positive integer, got {jobs!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DistillKacError(f"--threads: must be a positive integer, got {threads!r}")
    outdir = Path(outdir)
    prepare_outdir(outdir, budget, fresh)
    calibration = calibrate_threads() if budget.calibrate else None
    from distillkac.metrics import DigitsClassifier

    classifier = DigitsClassifier.load_or_train()
    root = str(outdir)
    with _executor(jobs, threads) as pool:
        parts = schedule(pool, demo_tasks(root, budget), jobs)
    report = build_report(outdir, budget, parts, classifier, calibration,
                          {"jobs": jobs, "threads_per_process": threads}, start)
    return DemoResult(outdir, report, time.perf_counter() - start)


# -------------------------------------------------------------------------------------- the report

ROW_ORDER = ("teacher-ab2", "teacher-euler", "student", "flow-euler", "vp-ddim")
ROW_TITLES = {"teacher-ab2": "Kac teacher, guided AB-2", "teacher-euler": "Kac teacher, guided Euler",
              "student": "DistillKac student (Euler)", "flow-euler": "flow matching, guided Euler",
              "vp-ddim": "VP diffusion, guided DDIM"}


def row_family(row: dict[str, Any]) -> str:
    if row["kind"] == "student":
        return "student"
    return {TEACHER_DIR: "teacher", FLOW_DIR: "flow", VP_DIR: "vp"}[row["model"]] + f"-{row['solver']}"


def _table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model, sampler | steps | NFE | class accuracy | fd_digits | fd_pixels | samples |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        values = row["values"]
        lines.append(f"| {ROW_TITLES[row_family(row)]} | {row['steps']} | {row['nfe']} | "
                     f"{values['class_accuracy']:.3f} | {values['fd_digits']:.3f} | {values['fd_pixels']:.3f} | "
                     f"[grid]({row['grid']}) |")
    return "\n".join(lines) + "\n"


def sorted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-r["steps"], ROW_ORDER.index(row_family(r))))


def _lookup(rows: Sequence[dict[str, Any]], family: str, steps: int) -> dict[str, Any] | None:
    return next((r for r in rows if row_family(r) == family and r["steps"] == steps), None)


def findings(rows: Sequence[dict[str, Any]], plan: Sequence[int], profiles: dict[str, dict[str, Any]],
             targets: dict[str, dict[str, Any]], kac_bound: float) -> list[dict[str, Any]]:
    """The claims the demo checks, each as numbers and a verdict computed from this run."""
    return [_degradation(rows, plan), *_same_steps(rows, plan), *_velocity(profiles, targets, kac_bound)]


def _acc(row: dict[str, Any]) -> float:
    return float(row["values"]["class_accuracy"])


def _fd(row: dict[str, Any]) -> float:
    return float(row["values"]["fd_digits"])


def _degradation(rows: Sequence[dict[str, Any]], plan: Sequence[int]) -> dict[str, Any]:
    """Graceful: the last student keeps the teacher's class accuracy within 0.10 and its fd_digits within
    1.5 times that of the first (most-step) student."""
    teacher = _lookup(rows, "teacher-ab2", plan[0])
    students = [_lookup(rows, "student", s) for s in plan[1:]]
    accuracy = [_acc(s) for s in students]
    fds = [_fd(s) for s in students]
    drop = _acc(teacher) - accuracy[-1]
    ratio = fds[-1] / fds[0]
    holds = drop <= 0.10 and ratio <= 1.5
    sequence = ", ".join(f"{s}: {a:.3f}" for s, a in zip(plan[1:], accuracy))
    fd_sequence = ", ".join(f"{s}: {f:.3f}" for s, f in zip(plan[1:], fds))
    text = (f"students by steps, class accuracy {sequence} (guided AB-2 teacher at {plan[0]} steps / "
            f"{teacher['nfe']} NFE: {_acc(teacher):.3f}); fd_digits {fd_sequence} (teacher: {_fd(teacher):.3f}). "
            f"The {plan[-1]}-step student's accuracy differs from the teacher's by {-drop:+.3f} and its fd_digits is "
            f"x{ratio:.2f} the {plan[1]}-step student's (graceful: accuracy within 0.10 and fd within x1.5).")
    return {"claim": "the students degrade gracefully from the teacher's steps to 1 step", "holds": holds,
            "text": text, "student_accuracy": dict(zip(map(str, plan[1:]), accuracy)),
            "student_fd_digits": dict(zip(map(str, plan[1:]), fds)), "teacher_accuracy": _acc(teacher),
            "teacher_fd_digits": _fd(teacher)}


def _same_steps(rows: Sequence[dict[str, Any]], plan: Sequence[int]) -> list[dict[str, Any]]:
    """At each student step count: the student against every other sampler with the same steps. It wins
    when its fd_digits is lower than all of theirs and its class accuracy is not lower than any."""
    out = []
    for steps in plan[1:]:
        student = _lookup(rows, "student", steps)
        others = [r for r in (_lookup(rows, f, steps) for f in ROW_ORDER if f != "student") if r is not None]
        best_acc = max(others, key=_acc)
        best_fd = min(others, key=_fd)
        holds = _acc(student) >= _acc(best_acc) and _fd(student) < _fd(best_fd)
        text = (f"{steps}-step student ({student['nfe']} NFE) fd_digits {_fd(student):.3f} vs best other "
                f"{_fd(best_fd):.3f} ({ROW_TITLES[row_family(best_fd)]}, {best_fd['nfe']} NFE; "
                f"ratio x{_fd(best_fd) / _fd(student):.2f}); class accuracy {_acc(student):.3f} vs best other "
                f"{_acc(best_acc):.3f}. All at {steps} step(s): "
                + "; ".join(f"{ROW_TITLES[row_family(r)]} fd {_fd(r):.3f}, acc {_acc(r):.3f}" for r in others)
                + ".")
        out.append({"claim": f"the {steps}-step student beats the teacher and the baselines at {steps} step(s)",
                    "holds": holds, "text": text, "steps": steps})
    return out


def _velocity(profiles: dict[str, dict[str, Any]], targets: dict[str, dict[str, Any]],
              kac_bound: float) -> list[dict[str, Any]]:
    """Kac bounded, VP growing near the data: for the conditional targets (the regression targets, no
    network) and along the learned models' sampling trajectories.

    The Kac conditional target obeys ``|u*| <= 1 + c`` per coordinate; a guided combination
    ``(1+w)·a - w·b`` of two fields so bounded stays below ``(1 + 2w)(1 + c)``, the bound the teacher's
    trajectories are checked against. "Grows near the data": the VP RMS at the last time (closest to
    t = 0) exceeds its RMS at t = T and the Kac RMS at that time.
    """
    summary = {}
    for key, record in profiles.items():
        profile = record["profile"]
        rms = profile["rms"]
        summary[key] = {"rms_start": rms[0], "rms_end": rms[-1], "rms_min": min(rms),
                        "max_abs": max(profile["max_abs"]), "t_end": profile["times"][-1]}
    kac, vp, flow = summary["teacher"], summary["vp"], summary["flow"]
    kac_target, vp_target = targets["kac"], targets["vp"]
    t_end = kac_target["times"][-1]
    target_bounded = kac_target["max_abs_all"] <= kac_bound + 1e-9
    target_grows = vp_target["rms"][-1] > max(vp_target["rms"][0], kac_target["rms"][-1])
    targets_claim = {
        "claim": "the conditional target velocity is bounded for Kac and grows near the data for VP diffusion",
        "holds": target_bounded and target_grows,
        "text": (f"on the held-out digits, RMS |u*| per coordinate at t = T -> t = {t_end:.3g}: Kac "
                 f"{kac_target['rms'][0]:.3f} -> {kac_target['rms'][-1]:.3f} (max |u*| over all t "
                 f"{kac_target['max_abs_all']:.3f}, bound 1 + c = {kac_bound:g}); VP {vp_target['rms'][0]:.3f} -> "
                 f"{vp_target['rms'][-1]:.3f} (max {vp_target['max_abs_all']:.3f}); flow "
                 f"{targets['flow']['rms'][0]:.3f} -> {targets['flow']['rms'][-1]:.3f}.")}
    guided_bound = (1 + 2 * GUIDANCE) * kac_bound
    bounded = kac["max_abs"] <= guided_bound
    grows = vp["rms_end"] > max(vp["rms_start"], kac["rms_end"])
    trajectories_claim = {
        "claim": "along the learned models' sampling trajectories the Kac velocity stays bounded while the VP "
                 "velocity grows near the data",
        "holds": bounded and grows, "guided_bound": guided_bound, "trajectories": summary,
        "text": (f"{PROFILE_GRID} grid down to t = {kac['t_end']:.3g}, RMS |u| per coordinate at t = T -> last step: "
                 f"Kac teacher {kac['rms_start']:.3f} -> {kac['rms_end']:.3f} (max |u| {kac['max_abs']:.3f}; guided "
                 f"bound {guided_bound:g}: {'within' if bounded else 'exceeded'}); VP diffusion "
                 f"{vp['rms_start']:.3f} -> {vp['rms_end']:.3f} (max |u| {vp['max_abs']:.3f}; "
                 f"{'grows' if grows else 'does not grow'}: its learned RMS at the last step is "
                 f"x{vp['rms_end'] / vp_target['rms'][-1]:.2f} its conditional target's); flow matching "
                 f"{flow['rms_start']:.3f} -> {flow['rms_end']:.3f}.")}
    return [targets_claim, trajectories_claim]


def target_profiles(plan_steps: int) -> dict[str, dict[str, Any]]:
    """Conditional target velocities u*(x_t, t | x0) of the three paths on the held-out digits at the times
    of the velocity diagnostics (no network); deterministic (generator seed 0)."""
    from distillkac.diagnostics import analytic_velocity_profile
    from distillkac.metrics import digits_reference_images
    from distillkac.paths import build_path
    from distillkac.solvers import time_grid

    images = digits_reference_images().double()
    times = time_grid(plan_steps, 1.0, PROFILE_GRID)[:-1].tolist()
    out = {}
    for kind in ("kac", "vp", "flow"):
        profile = analytic_velocity_profile(build_path({"kind": kind}), images, times,
                                            torch.Generator().manual_seed(0))
        out[kind] = {**profile, "max_abs_all": max(profile["max_abs"])}
    return out


def environment() -> dict[str, Any]:
    import numpy

    import distillkac

    processor = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    return {"distillkac": distillkac.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "hostname": socket.gethostname(),
            "processor": processor, "cpu_count": os.cpu_count(), "command": sys.argv,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def build_report(outdir: Path, budget: DemoBudget, parts: dict[str, dict[str, Any]], classifier,
                 calibration: dict[str, Any] | None, execution: dict[str, Any], start: float) -> dict[str, Any]:
    """Plots, report.json and report.md from the parts' records (``parts``: task name -> record)."""
    from distillkac.diagnostics import plot_velocity_profiles
    from distillkac.distill import plot_closeness
    from distillkac.evaluate import plot_metric_vs_nfe

    evals = [item for name, item in parts.items() if name.startswith("eval_")]
    profiles = {name.removeprefix("velocity_"): item for name, item in parts.items() if name.startswith("velocity_")}
    rows = sorted_rows([row for item in evals for row in item["rows"]])
    plot_metric_vs_nfe(rows, outdir / NFE_PLOT)
    kac_c = float(parts["train_teacher"]["config"]["path"]["kac_c"])
    plot_velocity_profiles({f"{m.label} ({m.solver}, w={GUIDANCE:g})": profiles[m.key]["profile"] for m in TRAINED},
                           outdir / VELOCITY_PLOT, kac_c=kac_c)
    targets = target_profiles(budget.plan[0])
    plot_velocity_profiles({f"{kind} conditional target": targets[kind] for kind in ("kac", "flow", "vp")},
                           outdir / TARGETS_PLOT, kac_c=kac_c)
    closeness = {}
    for directory in student_dirs(outdir, budget):
        closeness[directory.name] = _read_json(directory / "closeness.json")
    plot_closeness({f"{c['student_steps']}-step student vs its {c['teacher_steps']}-step teacher": c
                    for c in closeness.values()}, outdir / CLOSENESS_PLOT,
                   title="path closeness of every distillation stage")
    kac_bound = 1.0 + kac_c
    claims = findings(rows, budget.plan, profiles, targets, kac_bound)
    timings = {name: {"seconds": item["seconds"], "reused": item["reused"], "finished_utc": item["finished_utc"]}
               for name, item in parts.items()}
    report = {
        "format": "distillkac-demo-report", "version": DEMO_VERSION, "date_utc": _now(),
        "budget": dataclasses.asdict(budget),
        "guidance": GUIDANCE, "seed": SEED, "execution": execution, "thread_calibration": calibration,
        "environment": environment(), "timings": timings,
        "wall_seconds_this_run": round(time.perf_counter() - start, 2),
        "configs": {"teacher": parts["train_teacher"]["config"], "flow": parts["train_flow"]["config"],
                    "vp": parts["train_vp"]["config"], "distill": parts["distill"]["settings"]},
        "weights_sha256": {m.key: parts[f"train_{m.key}"]["weights_sha256"] for m in TRAINED},
        "digits_classifier": {"test_accuracy": float(classifier.test_accuracy)},
        "rows": rows, "findings": claims, "closeness": {k: {"max": c["max"], "final": c["final"],
                                                            "teacher_steps": c["teacher_steps"],
                                                            "student_steps": c["student_steps"],
                                                            "num_samples": c["num_samples"]}
                                                        for k, c in closeness.items()},
        "velocity": {"trajectories": {k: v["profile"] for k, v in profiles.items()}, "targets": targets},
        "files": [NFE_PLOT, VELOCITY_PLOT, TARGETS_PLOT, CLOSENESS_PLOT, *[row["grid"] for row in rows]],
    }
    report["wall_seconds_this_run"] = round(time.perf_counter() - start, 2)
    atomic_write_json(outdir / REPORT_JSON, report)
    atomic_write_bytes(outdir / REPORT_MD, render_report(report).encode("utf-8"))
    return report


def _part_line(name: str, timing: dict[str, Any], what: str) -> str:
    state = "reused from an earlier run" if timing["reused"] else "this run"
    return f"| {name} | {what} | {timing['seconds']:.0f} | {state} |"


def render_report(report: dict[str, Any]) -> str:
    """report.md from report.json's content."""
    budget, env, execution = report["budget"], report["environment"], report["execution"]
    reference_count = report["rows"][0]["values"]["num_reference"]
    teacher, distill = report["configs"]["teacher"], report["configs"]["distill"]
    plan = " -> ".join(map(str, budget["plan"]))
    lines = [
        "# distillkac demo: DistillKac in miniature on 8x8 digits", "",
        f"Run on {report['date_utc']} on `{env['hostname']}` ({env['processor']}, {env['cpu_count']} cores; "
        f"torch {env['torch']}, Python {env['python']}); budget `{budget['name']}`; "
        f"{execution['jobs']} worker process(es) x {execution['threads_per_process']} torch thread(s). "
        f"Wall time of this invocation: {report['wall_seconds_this_run']:.0f} s. Every number below comes from "
        f"this run's files (report.json holds them all).", "",
        "## The table", "",
        f"{budget['eval_samples']} samples per row (image i: seed {report['seed']} + i, class i mod 10), "
        f"guidance w = {report['guidance']:g} for the teacher and the baselines (NFE = 2 x steps), baked into "
        f"the students (NFE = steps). Metrics against the {reference_count} held-out digits: class accuracy of a "
        f"small CNN (held-out accuracy {report['digits_classifier']['test_accuracy']:.3f}), Fréchet distances in its "
        f"64-d features (fd_digits) and in pixel space (fd_pixels). These are not FIDs. Lower fd is better.", "",
        _table(report["rows"]),
        "## Findings (computed)", "",
        *[f"- **{'holds' if item['holds'] else 'does NOT hold'}** — {item['claim']}: {item['text']}"
          for item in report["findings"]], "",
        "## Plots", "",
        f"Metric vs NFE (fd_digits): ![metric vs NFE]({NFE_PLOT})", "",
        f"Velocity along the sampling trajectories ({budget['plan'][0]} steps on the {PROFILE_GRID} grid, each "
        f"model's own solver, "
        f"w = {report['guidance']:g}, {budget['profile_samples']} samples): ![velocity]({VELOCITY_PLOT})", "",
        f"Conditional target velocities on real digits (no network): ![targets]({TARGETS_PLOT})", "",
        f"Path closeness, teacher vs student from the same x_T, every stage ({budget['closeness_samples']} "
        f"samples): ![closeness]({CLOSENESS_PLOT})", "",
        "| stage | max RMS distance | final RMS distance |", "|---|---:|---:|",
        *[f"| {c['teacher_steps']} -> {c['student_steps']} | {c['max']:.4f} | {c['final']:.4f} |"
          for c in report["closeness"].values()], "",
        "## Samples (the first images of each row: same seeds and labels as the evaluation)", "",
        *[f"{ROW_TITLES[row_family(row)]}, {row['steps']} step(s): ![{row['grid']}]({row['grid']})  "
          for row in report["rows"]], "",
        "## Configuration and wall time per part", "",
        f"Teacher and baselines: digits preset network ({teacher['net']['model_channels']} channels, "
        f"multipliers {teacher['net']['channel_mult']}), {teacher['train']['steps']} steps of batch "
        f"{teacher['train']['batch']}, lr {teacher['optim']['lr']:g}, Kac a = {teacher['path']['kac_a']:g}, "
        f"c = {teacher['path']['kac_c']:g}. Distillation {plan}: {list(distill['steps_per_stage'])} steps per "
        f"stage, batch {distill['batch']}, lr {distill['lr']:g}, start states {distill['start_states']}.", "",
        "| part | what | seconds | when |", "|---|---|---:|---|",
        *[_part_line(name, timing, _part_description(name)) for name, timing in report["timings"].items()], "",
    ]
    calibration = report["thread_calibration"]
    if calibration:
        per_step = calibration["seconds_per_step"]
        lines += ["Thread choice (measured at the start of this run): one training step of the teacher network "
                  "(batch 128) took " + ", ".join(f"{v:.3f} s with {k} thread(s)" for k, v in per_step.items())
                  + f" (load average {calibration['load_average']}); the demo runs {execution['jobs']} processes "
                  f"with {execution['threads_per_process']} thread(s) each.", ""]
    return "\n".join(lines)


def _part_description(name: str) -> str:
    return {"train_teacher": "train the Kac teacher", "train_flow": "train the flow-matching baseline",
            "train_vp": "train the VP-diffusion baseline", "distill": "distil every stage (+ path closeness)"
            }.get(name, name.replace("_", " "))
