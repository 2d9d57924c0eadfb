"""``distillkac reproduce``: the paper-scale plan for one dataset as a resumable sequence of commands.

FID reference statistics (``distillkac ref``), teacher training (``distillkac train``), the four
distillation stages (``distillkac distill --stage k``) and FID-50k of the guided teacher and of every
student (``distillkac eval --metric fid``). Each step knows when it is finished (the reference file, the
teacher's artefact at its last step, the stage's artefact, the row in ``eval/results.jsonl``) and is then
skipped, so rerunning the command resumes the plan.

The estimate of GPU-hours divides the images each step processes by a throughput per phase:
``train`` (training images per second, forward + backward), ``sample`` (network forwards per second,
one image each: teacher roll-outs inside distillation, sampling for FID) and ``inception`` (images per
second through the Inception network). Defaults come from ``benchmarks/results/*cuda*.json`` when present
(measured on the CIFAR-10 network, scaled to other networks by forward FLOPs), else from the assumed
single-H100 values below, and the output says which.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkac.checkpoint import Artifact, read_artifact_meta
from distillkac.distill import plan_stages
from distillkac.errors import DistillKacError
from distillkac.jobs import Job, run_jobs
from distillkac.metrics.fid import WEIGHTS_ENV
from distillkac.nets import REFERENCE_CONFIGS
from distillkac.nfe_table import read_results
from distillkac.presets import get_distill_preset, get_preset
from distillkac.stages import stage_finished

PHASES = ("train", "sample", "inception")
FID_NUM = 50_000
EVAL_DIR = "eval"

FORWARD_GFLOP = {"cifar10": 12.45, "celeba64": 46.75, "lsun-bedroom256": 497.04}
"""Forward FLOPs per image of each preset's UNet (torch.utils.flop_counter.FlopCounterMode at batch 1,
measured on the reference configs in nets.REFERENCE_CONFIGS); used to scale CIFAR-10 throughputs."""

ASSUMED_CIFAR10_IPS = {"train": 3000.0, "sample": 9000.0, "inception": 3000.0}
"""Assumed single-H100 throughputs for the CIFAR-10 network (bf16): ~37 GFLOP per training image at
~110 TFLOP/s achieved, forwards at three times that rate, Inception at 3000 images/s. Assumptions, not
measurements: pass --images-per-second or run the benchmarks with --device cuda."""


@dataclass(frozen=True)
class Target:
    """A dataset the paper reports: its teacher preset, how `distillkac ref` reads it, its size."""

    preset: str
    ref_dataset: str
    ref_resolution: int | None
    nominal_images: int
    source: str


TARGETS = {
    "cifar10": Target("cifar10", "cifar10", None, 50_000, "CIFAR-10 train split"),
    "celeba64": Target("celeba64", "folder", 64, 162_770, "CelebA train split (aligned, 64x64)"),
    "lsun-bedroom256": Target("lsun-bedroom256", "folder", 256, 3_033_042, "LSUN Bedroom train set"),
}


@dataclass
class Throughput:
    """Images per second per phase and where each value comes from."""

    values: dict[str, float]
    sources: dict[str, str]


def _benchmark_value(file: Path, phase: str) -> float | None:
    """The best measured CIFAR-10-network throughput for ``phase`` in a benchmark results file."""
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    network = record.get("settings", {}).get("network", {})
    if network.get("model_channels") != REFERENCE_CONFIGS["cifar10"].model_channels or \
            network.get("resolution") != REFERENCE_CONFIGS["cifar10"].resolution:
        return None
    rows = record.get("results", {}).get("rows", [])
    name = record.get("benchmark", "")
    if phase == "train" and name.startswith("train_throughput"):
        values = [row.get("images_per_s") for row in rows]
    elif phase == "sample" and name.startswith("sample_throughput"):
        values = [row.get("images_per_s", 0) * row.get("nfe", 0) for row in rows]
    else:
        return None
    values = [float(v) for v in values if isinstance(v, int | float) and v > 0]
    return max(values) if values else None


def default_results_dir() -> Path:
    """``benchmarks/results`` of the source tree this package was loaded from."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def resolve_throughput(dataset: str, overrides: dict[str, float], results_dir: Path) -> Throughput:
    """Per phase: the --images-per-second value, else a cuda benchmark (scaled by FLOPs), else assumed."""
    scale = FORWARD_GFLOP["cifar10"] / FORWARD_GFLOP[dataset]
    files = sorted(results_dir.glob("*cuda*.json")) if results_dir.is_dir() else []
    values, sources = {}, {}
    for phase in PHASES:
        if phase in overrides:
            values[phase], sources[phase] = overrides[phase], "given with --images-per-second"
            continue
        measured = [(v, f) for f in files if (v := _benchmark_value(f, phase))]
        phase_scale = 1.0 if phase == "inception" else scale
        if measured:
            value, file = max(measured)
            values[phase] = value * phase_scale
            scaled = "" if dataset == "cifar10" else f", scaled by forward FLOPs x{phase_scale:.3g}"
            sources[phase] = f"measured ({file.name}, CIFAR-10 network{scaled})"
        else:
            values[phase] = ASSUMED_CIFAR10_IPS[phase] * phase_scale
            scaled = "" if dataset == "cifar10" or phase == "inception" else f" x{phase_scale:.3g} by FLOPs"
            sources[phase] = f"ASSUMED (single H100, CIFAR-10 network{scaled}; no measured value)"
    return Throughput(values, sources)


def parse_images_per_second(items: Sequence[str]) -> dict[str, float]:
    """``["train=1800", "sample=20000"]`` -> ``{"train": 1800.0, "sample": 20000.0}``."""
    values = {}
    for item in items:
        phase, _, text = item.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if phase not in PHASES or not value > 0 or value == float("inf"):
            raise DistillKacError(f"--images-per-second: expected PHASE=VALUE with PHASE one of "
                                  f"{', '.join(PHASES)} and VALUE > 0, got {item!r}")
        values[phase] = value
    return values


@dataclass
class Step:
    """One command of the plan: its arguments after ``distillkac``, the images it processes per phase,
    whether it runs under torchrun with several GPUs, and how to tell it is finished."""

    name: str
    argv: list[str]
    images: dict[str, float]
    detail: str
    finished: Callable[[], bool]
    distributed: bool = True
    preset: str = ""

    def seconds(self, throughput: Throughput) -> float:
        return sum(count / throughput.values[phase] for phase, count in self.images.items())

    def command(self, gpus: int) -> list[str]:
        if self.distributed and gpus > 1:
            return ["torchrun", f"--nproc_per_node={gpus}", "-m", "distillkac", *self.argv]
        return ["distillkac", *self.argv]


@dataclass
class Plan:
    dataset: str
    steps: list[Step]
    guidance: float
    notes: list[str] = field(default_factory=list)


def build_plan(dataset: str, data: str, outdir: str | os.PathLike, inception_weights: str | None,
               num: int = FID_NUM) -> Plan:
    """Every step of the paper-scale plan for ``dataset`` (nothing is created)."""
    if dataset not in TARGETS:
        raise DistillKacError(f"dataset: unknown dataset {dataset!r}; choose one of {', '.join(TARGETS)}")
    target = TARGETS[dataset]
    teacher_config, settings = get_preset(target.preset), get_distill_preset(target.preset)
    out = Path(outdir)
    teacher_dir, distill_dir, eval_dir = out / "teacher", out / "distill", out / EVAL_DIR
    reference = out / "ref" / f"{dataset}-train.npz"
    weights = ["--inception-weights", inception_weights] if inception_weights else []
    guidance, batch = settings.guidance, settings.train.batch
    ref_argv = ["ref", "--dataset", target.ref_dataset, "--data", data, "--split", "train", "--out", str(reference)]
    if target.ref_resolution is not None:
        ref_argv += ["--resolution", str(target.ref_resolution)]
    train = teacher_config.train
    steps = [Step("ref", ref_argv + weights, {"inception": target.nominal_images},
                  f"Inception statistics of the {target.source} (~{target.nominal_images:,} images)",
                  reference.is_file, distributed=False, preset=f"{target.ref_dataset} loader"),
             Step("train", ["train", "--preset", target.preset, "--data", data, "--outdir", str(teacher_dir)],
                  {"train": train.steps * train.batch}, f"{train.steps:,} steps x batch {train.batch}",
                  lambda: Artifact.trained_steps(teacher_dir) >= train.steps, preset=f"presets.{target.preset}")]
    teacher_nfe = settings.plan[0] * (2 if guidance else 1)
    steps.append(_eval_step("eval teacher", teacher_dir, settings.plan[0], "ab2", guidance, teacher_nfe, reference,
                            eval_dir, weights, num))
    for stage in plan_stages(settings.plan):
        stage_dir = distill_dir / stage.name
        stage_steps = settings.stage_steps(stage)
        calls = 2 if guidance and stage.index == 1 else 1
        teacher_forwards = stage_steps * batch * stage.segment * calls
        closeness = settings.closeness_samples * (stage.teacher_steps * calls + stage.student_steps)
        steps.append(Step(
            f"distill stage {stage.index}",
            ["distill", "--teacher", str(teacher_dir), "--outdir", str(distill_dir), "--preset", target.preset,
             "--stage", str(stage.index)],
            {"train": stage_steps * batch, "sample": teacher_forwards + closeness},
            f"{stage.teacher_steps} -> {stage.student_steps} steps: {stage_steps:,} steps x batch {batch}, "
            f"teacher {stage.segment} step(s) x {calls} forward(s) per example",
            functools.partial(stage_finished, stage_dir, stage_steps), preset=f"DISTILL_PRESETS[{target.preset!r}]"))
        steps.append(_eval_step(f"eval stage {stage.index}", stage_dir / Artifact.DIR, stage.student_steps, "euler",
                                guidance, stage.student_steps, reference, eval_dir, weights, num))
    notes = [f"guidance w = {guidance:g} (the distillation preset's; baked into the students)",
             f"{target.source}: the image count is nominal; `ref` and `train` use what --data holds"]
    return Plan(dataset, steps, guidance, notes)


def _eval_step(name: str, checkpoint: Path, steps: int, solver: str, guidance: float, nfe: int, reference: Path,
               eval_dir: Path, weights: list[str], num: int) -> Step:
    argv = ["eval", "--checkpoint", str(checkpoint), "--steps", str(steps), "--solver", solver, "--guidance",
            f"{guidance:g}", "--metric", "fid", "--num", str(num), "--ref", str(reference), "--out", str(eval_dir),
            *weights]
    return Step(name, argv, {"sample": num * nfe, "inception": num},
                f"FID-{num // 1000}k: {steps} {solver} step(s), {nfe} NFE per image",
                lambda: _evaluated(eval_dir, checkpoint, steps, solver, num), preset="eval protocol (method.md §6)")


def _evaluated(eval_dir: Path, checkpoint: Path, steps: int, solver: str, num: int) -> bool:
    directory = Artifact.locate(checkpoint)
    if not (directory / Artifact.META).is_file():
        return False
    sha = read_artifact_meta(directory)["weights_sha256"]
    return any(row.get("model_sha256") == sha and row.get("metric") == "fid" and int(row.get("num", 0)) == num
               and int(row.get("steps", 0)) == steps and row.get("solver") == solver
               for row in read_results(eval_dir))


def describe_plan(plan: Plan, throughput: Throughput, gpus: int) -> str:
    """The dry-run text: every command with its preset, images and GPU-hour estimate, and the total."""
    lines = [f"distillkac reproduce {plan.dataset}: {len(plan.steps)} steps, on {gpus} GPU(s)",
             "throughput (images/s): " + "; ".join(f"{phase} {throughput.values[phase]:,.0f} "
                                                   f"[{throughput.sources[phase]}]" for phase in PHASES),
             *[f"note: {note}" for note in plan.notes], ""]
    total = 0.0
    for number, step in enumerate(plan.steps, start=1):
        seconds = step.seconds(throughput)
        total += seconds
        images = ", ".join(f"{count:,.0f} {phase}" for phase, count in step.images.items())
        lines.append(f"[{number}/{len(plan.steps)}] {step.name} ({step.preset}): {step.detail}; images: {images}; "
                     f"estimate {seconds / 3600:,.2f} GPU-hours")
        lines.append("    $ " + shlex.join(step.command(gpus)))
    lines += ["", f"total: {total / 3600:,.1f} GPU-hours (about {total / 3600 / gpus:,.1f} hours of wall time on "
                  f"{gpus} GPU(s), assuming linear scaling; ref runs on one)"]
    return "\n".join(lines) + "\n"


def run_plan(plan: Plan, gpus: int, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every unfinished step (python -m distillkac, or torchrun with several GPUs) as a job, here and in
    order: each step takes all the GPUs and needs the ones before it; the first failure stops the plan."""
    total = len(plan.steps)
    jobs = [Job(step.name, _run_step, (step, number, total, gpus, echo))
            for number, step in enumerate(plan.steps, start=1)]
    return list(run_jobs(jobs).values())


def _run_step(step: Step, number: int, total: int, gpus: int, echo: Callable[[str], None]) -> dict[str, Any]:
    command = step.command(gpus)
    if step.finished():
        echo(f"[{number}/{total}] {step.name}: finished earlier; skipped")
        return {"step": step.name, "skipped": True}
    echo(f"[{number}/{total}] {step.name}: $ {shlex.join(command)}")
    if command[0] == "distillkac":
        command = [sys.executable, "-m", "distillkac", *command[1:]]
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise DistillKacError(f"reproduce: step {number} ({step.name}) failed with exit code {code}; "
                              f"fix the cause and rerun the same command to resume")
    return {"step": step.name, "skipped": False}


def check_inputs(data: str, inception_weights: str | None, for_real: bool) -> str | None:
    """The Inception weights (option, else $DISTILLKAC_INCEPTION_WEIGHTS); paths must exist to run."""
    weights = inception_weights or os.environ.get(WEIGHTS_ENV)
    if not weights:
        raise DistillKacError(f"--inception-weights: required (the FID network's weights file), or set "
                              f"{WEIGHTS_ENV}")
    if for_real:
        if not Path(data).exists():
            raise DistillKacError(f"--data: {data} does not exist")
        if not Path(weights).is_file():
            raise DistillKacError(f"--inception-weights: {weights} is not a file")
    return weights


def plan_summary(plan: Plan, throughput: Throughput, gpus: int) -> dict[str, Any]:
    """The plan as JSON-ready data (used by tests and scripts)."""
    return {"dataset": plan.dataset, "gpus": gpus, "throughput": dataclasses.asdict(throughput),
            "steps": [{"name": s.name, "command": s.command(gpus), "images": s.images,
                       "gpu_hours": s.seconds(throughput) / 3600} for s in plan.steps]}
