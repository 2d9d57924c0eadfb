"""Running, resuming and guarding the stages of a distillation (the method itself is in distill.py).

Each stage is an ordinary resumable run of :func:`distillkac.train.train` in ``OUT/stage-<M>step``, whose
artefact is a standalone student. A rerun skips finished stages (after checking that they were distilled
with the same settings from the same teacher) and resumes an interrupted one; after training, the stage's
path closeness to its teacher is measured (``closeness.json``, ``closeness.png``) and ``OUT/distill.json``
summarises the plan. SIGTERM or SIGUSR1 stops a distillation after the current optimiser step (with a
checkpoint) or, between stages, after the finished stage (:mod:`distillkac.preemption`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillkac import preemption
from distillkac.checkpoint import Artifact, load_artifact, read_artifact_meta
from distillkac.config import RESUMABLE_TRAIN_FIELDS, DistillConfig, RunConfig
from distillkac.data import DataConfig, load_dataset
from distillkac.diagnostics import path_closeness, plot_closeness
from distillkac.distill import (
    EndpointObjective,
    PoolSettings,
    Stage,
    Teacher,
    load_teacher,
    plan_stages,
    pool_size,
    teacher_record,
    validate_plan,
)
from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_json, check_output_dir
from distillkac.guidance import check_guidance
from distillkac.nets import build_network, network_config_from_dict
from distillkac.paths import PathConfig, build_path
from distillkac.preemption import Preempted
from distillkac.previews import teacher_preview
from distillkac.resume import check_unchanged
from distillkac.runlog import RunLog
from distillkac.runtime import autocast, is_main_process, resolve_device
from distillkac.sampling import cycle_labels
from distillkac.train import train

CLOSENESS_FILE = "closeness.json"
CLOSENESS_PLOT = "closeness.png"
SUMMARY_FILE = "distill.json"


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
    if (path / Artifact.DIR / Artifact.META).is_file():
        artifact, run_dir = path / Artifact.DIR, path
    elif (path / Artifact.META).is_file() and (path / Artifact.WEIGHTS).is_file():
        artifact, run_dir = path, path.parent
    else:
        raise DistillKacError(f"--teacher: {path} is neither a run directory (with artifact/) nor a model "
                              f"artefact (config.json + model.safetensors)")
    meta = read_artifact_meta(artifact)
    config_file = run_dir / Artifact.RUN_CONFIG
    stored = _read_json(config_file, "--teacher") if config_file != artifact / Artifact.META else None
    return TeacherSource(artifact, meta, stored if isinstance(stored, dict) and "data" in stored else None)


def _read_json(path: Path, option: str) -> Any:
    """The JSON in ``path`` (None when there is no such file); invalid JSON is refused naming ``option``."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DistillKacError(f"{option}: {path} is not valid JSON ({err})") from err


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


def stage_run_config(meta: dict[str, Any], data: DataConfig, stage: Stage, config: DistillConfig,
                     teacher: dict[str, Any] | None) -> RunConfig:
    """The RunConfig of one stage: the teacher's network (with the student dropout, if set) and path, the
    distillation's optimiser, and its loop at the stage's length without label dropout, previewing the
    student's own Euler steps."""
    train = dataclasses.replace(config.train, steps=config.stage_steps(stage), label_dropout=0.0,
                                preview_steps=stage.student_steps, preview_solver="euler", preview_guidance=0.0)
    distill = {"stage": stage.index, "teacher_steps": stage.teacher_steps, "student_steps": stage.student_steps,
               "guidance": float(config.guidance), "start_states": config.start_states, "target": config.target,
               "loss": config.loss, "teacher": teacher}
    if config.start_states != "data":
        distill.update(pool_refresh=config.pool_refresh, pool_reuse=config.pool_reuse)
    if config.teacher_precision is not None:
        distill["teacher_precision"] = config.teacher_precision
    net = network_config_from_dict(meta["net"])
    if config.student_dropout is not None:
        net = dataclasses.replace(net, dropout=float(config.student_dropout))
    return RunConfig(data=data, net=net, path=PathConfig.from_config(meta["path"]),
                     optim=config.optim, train=train, distill=distill).validate()


def check_stage_teacher(stage_dir: Path, record: dict[str, Any], what: str) -> None:
    """Refuse a teacher that is not the one an existing stage was distilled from (one line, naming the
    difference: Kac constants / path, data shape, class count, weights)."""
    stored = _read_json(stage_dir / Artifact.RUN_CONFIG, "--outdir")
    distill = stored.get("distill") if isinstance(stored, dict) else None
    if not isinstance(distill, dict) or not isinstance(distill.get("teacher"), dict):
        return
    old, new = distill["teacher"], record
    differences = {
        "path": f"path {_describe_path(new['path'])} differs from the teacher of {stage_dir} "
                f"({_describe_path(old.get('path'))})",
        "data_shape": f"data shape {new['data_shape']} differs from the teacher of {stage_dir} "
                      f"({old.get('data_shape')})",
        "num_classes": f"{new['num_classes']} classes differ from the teacher of {stage_dir} "
                       f"({old.get('num_classes')} classes)",
        "sha256": f"weights sha256 {new['sha256'][:12]}… are not those of the teacher {stage_dir} was distilled "
                  f"from ({str(old.get('sha256'))[:12]}…)"}
    for key, message in differences.items():
        if old.get(key) != new[key]:
            raise DistillKacError(f"{what}: {message}; use the same teacher or another --outdir")


def _describe_path(config: Any) -> str:
    if not isinstance(config, dict):
        return repr(config)
    if config.get("kind") == "kac":
        return (f"kac a={config.get('kac_a'):g}, c={config.get('kac_c'):g}, T={config.get('T'):g}, "
                f"{config.get('schedule')}/{config.get('g_schedule')}")
    return ", ".join(f"{key}={value}" for key, value in config.items())


#: Settings a finished stage may be skipped under although they differ (they do not change the student).
SKIPPABLE_FIELDS = ("device", "precision", "compile", "channels_last")


def check_finished_stage(stage_dir: Path, config: RunConfig) -> None:
    """Refuse to skip a finished stage whose stored config differs from ``config`` in anything that
    defines its student (the training loop's length, logging and hardware settings may differ)."""
    stored = json.loads((stage_dir / Artifact.RUN_CONFIG).read_text(encoding="utf-8"))
    stored.pop("environment", None)
    ignored = {f"train.{name}" for name in (*RESUMABLE_TRAIN_FIELDS, *SKIPPABLE_FIELDS)}
    check_unchanged(stored, config, ignored, f"{stage_dir}: this finished stage was distilled with")


def stage_finished(stage_dir: Path, steps: int) -> bool:
    """The stage's artefact exists and was written at (or after) its last optimiser step."""
    return Artifact.trained_steps(stage_dir) >= steps


@dataclass
class StageOutcome:
    stage: Stage
    stage_dir: Path
    skipped: bool
    closeness: dict[str, Any] | None
    wall_seconds: float


def _echo(message: str) -> None:
    print(message, file=sys.stderr)


class Distillation:
    """All stages of one distillation into ``outdir`` (see :func:`run_distillation`)."""

    def __init__(self, teacher: str | os.PathLike, outdir: str | os.PathLike, settings: DistillConfig,
                 data: str | None = None) -> None:
        self.source = resolve_teacher(teacher)
        self.outdir = check_output_dir(outdir, "--outdir")
        self.settings = settings.validate()
        meta = self.source.meta
        own = Artifact(meta).baked_sampling()
        self.plan = validate_plan(settings.plan, own.steps if own is not None else None)
        if own is not None and own.guidance != settings.guidance:
            raise DistillKacError(f"--guidance: {self.source.artifact} is a student with guidance "
                                  f"w={own.guidance:g} baked in; its students keep it "
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
        return self.stage_dir(self.stages[stage.index - 2]) / Artifact.DIR

    def configs(self, stage: int | None = None) -> list[dict[str, Any]]:
        """The resolved config of each selected stage (the ``--dry-run`` output); creates nothing."""
        rows = []
        for item in self.select(stage):
            record = stage_run_config(self.source.meta, self.data, item, self.settings, None).to_dict()
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
        return load_teacher(artifact, stage.teacher_steps, self.settings.guidance, device=device,
                            precision=self.settings.teacher_precision)

    def run(self, stage: int | None = None, *, progress: bool = True, dataset=None) -> list[StageOutcome]:
        selected = self.select(stage)
        first = teacher_record(self.source.meta, self.plan[0], self.settings.guidance)
        check_stage_teacher(self.stage_dir(self.stages[0]), first, "--teacher")
        device = resolve_device(self.settings.train.device)
        dataset = dataset if dataset is not None else load_dataset(self.data, "train", progress)
        self._check_dataset(dataset)
        outcomes = []
        with preemption.preemptible():
            for item in selected:
                teacher = self.load_stage_teacher(item, device)
                what = "--teacher" if item.index == 1 else f"stage {item.index}'s teacher {teacher.artifact}"
                check_stage_teacher(self.stage_dir(item), teacher.record(), what)
                outcomes.append(self.run_stage(item, teacher, dataset, device, progress))
                if item is not selected[-1] and preemption.requested():
                    self.write_summary()
                    raise Preempted(f"stopped by {preemption.requested()} after stage {item.index} of "
                                    f"{len(self.stages)} ({self.stage_dir(item)}); rerun the same command to "
                                    f"continue")
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
            student = build_network(config.net, generator=torch.Generator().manual_seed(0))
            student.load_state_dict(teacher.model.state_dict())
            history = teacher.meta.get("stages", []) if Artifact(teacher.meta).is_student else []
            objective = self.objective(stage, teacher, path, history)
            preview = teacher_preview(config, path, int(teacher.meta["num_classes"]))
            train(config, stage_dir, student, objective, dataset, preview=preview, progress=progress)
        closeness = None
        if is_main_process():
            closeness = self.stage_closeness(stage, teacher, config, device, force=not skipped)
        return StageOutcome(stage, stage_dir, skipped, closeness, time.perf_counter() - start)

    def objective(self, stage: Stage, teacher: Teacher, path, history) -> EndpointObjective:
        settings = self.settings
        pool = PoolSettings(size=pool_size(settings.train.batch, settings.pool_refresh, stage.student_steps,
                                           settings.pool_reuse),
                            refresh=settings.pool_refresh, seed=settings.train.seed, chunk=settings.train.micro_batch)
        return EndpointObjective(teacher, path, stage, settings.start_states, history, target=settings.target,
                                 loss=settings.loss, pool=pool)

    def stage_closeness(self, stage: Stage, teacher: Teacher, config: RunConfig, device: torch.device,
                        force: bool) -> dict[str, Any]:
        """Path closeness of the stage's artefact against its teacher: closeness.json, closeness.png and
        a stats.jsonl row (computed once per finished training; reused when the stage is skipped)."""
        stage_dir = self.stage_dir(stage)
        stored = stage_dir / CLOSENESS_FILE
        if stored.is_file() and not force:
            return json.loads(stored.read_text(encoding="utf-8"))
        student, meta = load_artifact(stage_dir / Artifact.DIR, device=device)
        teacher.model.to(device)
        count = self.settings.closeness_samples
        labels = cycle_labels(count, int(meta["num_classes"]))
        result = path_closeness(teacher.velocity, student, path=build_path(meta["path"]),
                                teacher_steps=teacher.steps, student_steps=stage.student_steps,
                                seeds=range(count), labels=labels, teacher_solver=teacher.solver,
                                device=device, autocast=autocast(device, config.train.precision))
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
        if not is_main_process():
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
            "start_states": self.settings.start_states, "target": self.settings.target,
            "loss": self.settings.loss, "stages": stages})


def run_distillation(teacher: str | os.PathLike, outdir: str | os.PathLike, settings: DistillConfig, *,
                     stage: int | None = None, data: str | None = None, progress: bool = True,
                     dataset=None) -> list[StageOutcome]:
    """Run every stage of ``settings.plan`` (or just ``stage``, 1-based) into ``outdir/stage-<M>step``.

    Finished stages are skipped, an interrupted one resumes; each stage starts from its teacher's weights.
    """
    return Distillation(teacher, outdir, settings, data).run(stage, progress=progress, dataset=dataset)
