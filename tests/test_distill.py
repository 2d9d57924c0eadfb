"""Endpoint distillation: the plan, the loss against closed-form teachers, the stage runner on toy2d
(loss, path closeness, mode coverage, resume, errors) and the ``distill`` command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import make_toy_config
from torch import nn

from distillkac.checkpoint import load_artifact, load_training_state, save_artifact
from distillkac.cli import main
from distillkac.config import DistillConfig, OptimConfig, TrainConfig
from distillkac.data import DataConfig, load_dataset, toy_mixture
from distillkac.diagnostics import path_closeness
from distillkac.distill import (
    EndpointObjective,
    PoolSettings,
    Stage,
    Teacher,
    load_teacher,
    parse_plan,
    plan_stages,
    validate_plan,
)
from distillkac.errors import DistillKacError
from distillkac.kac import KacProcess
from distillkac.metrics.toy2d import toy2d_metrics
from distillkac.nets import MLPConfig, build_network
from distillkac.paths import KacPath, build_path
from distillkac.presets import DISTILL_PRESETS, get_distill_preset, get_preset, preset_key
from distillkac.sampling import cycle_labels, sample_artifact
from distillkac.solvers import solve, time_grid
from distillkac.stages import Distillation, run_distillation
from distillkac.train import derive_seed

KAC = KacPath(KacProcess(9.0, 3.0))
TOY_PLAN = "20,4,2,1"

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------ the plan

def test_plan_parses_and_validates():
    assert validate_plan(parse_plan("100,20,4,2,1"), 100) == (100, 20, 4, 2, 1)
    assert validate_plan((6, 3), None) == (6, 3)


@pytest.mark.parametrize("plan, teacher_steps, message", [
    ((100, 20, 30), None, "not strictly decreasing at 20 -> 30"),
    ((100, 20, 20), None, "not strictly decreasing at 20 -> 20"),
    ((100, 30, 2), None, "30 does not divide 100 (100 -> 30)"),
    ((100, 20, 3), None, "3 does not divide 20 (20 -> 3)"),
    ((50, 10), 100, "the first step count 50 must equal the teacher's steps 100"),
    ((100,), None, "at least one student"),
    ((4, 0), None, "positive integers"),
])
def test_bad_plans_are_refused_naming_the_pair(plan, teacher_steps, message):
    with pytest.raises(DistillKacError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_plan(plan, teacher_steps)


def test_plan_text_must_be_integers():
    with pytest.raises(DistillKacError, match="--plan"):
        parse_plan("100,twenty")


def test_steps_per_stage_takes_one_count_or_one_per_stage():
    settings = DistillConfig(plan=(20, 4, 1), steps_per_stage=(5, 7)).validate()
    assert [settings.stage_steps(stage) for stage in plan_stages(settings.plan)] == [5, 7]
    assert DistillConfig(plan=(20, 4, 1), steps_per_stage=9).stage_steps(Stage(2, 4, 1)) == 9
    with pytest.raises(DistillKacError, match=r"one per stage \(2 for the plan 20,4,1\), got 3"):
        DistillConfig(plan=(20, 4, 1), steps_per_stage=(5, 7, 9)).validate()
    with pytest.raises(DistillKacError, match="--steps-per-stage: must be positive"):
        DistillConfig(plan=(20, 4, 1), steps_per_stage=0).validate()


def test_distill_config_changes_reach_its_optimiser_and_loop():
    preset = get_distill_preset("toy2d")
    changed = preset.with_changes({"guidance": 0.5, "optim.lr": 0.01, "train.batch": 64})
    assert (changed.guidance, changed.optim.lr, changed.train.batch) == (0.5, 0.01, 64)
    assert (preset.guidance, preset.optim.lr, preset.train.batch) == (0.0, 1e-3, 256)
    preset.train.batch = 1
    assert DISTILL_PRESETS["toy2d"].train.batch == 256


def test_presets_have_valid_plans():
    for name, settings in DISTILL_PRESETS.items():
        validate_plan(settings.plan)
        settings.validate()
        assert name in {"digits", "toy2d", "cifar10", "celeba64", "lsun-bedroom256"}


# ------------------------------------------------------------------------ analytic (linear) teachers

LAMBDA = 0.7
NUM_CLASSES = 2


def _b(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * t) + t * t


class LinearVelocity(nn.Module):
    """u(x, t, y) = λ·x + b(t)·(1 + y): a linear ODE whose Euler / AB-2 steps have a closed form."""

    num_classes = NUM_CLASSES

    def forward(self, x, t, y):
        return LAMBDA * x + (_b(t) * (1 + y.to(x.dtype)))[:, None]


def _guided_coefficient(y: torch.Tensor, w: float) -> torch.Tensor:
    """u_w = λ·x + b(t)·c_y with c_y = (1+w)(1+y) - w(1+null)."""
    return (1 + w) * (1 + y.double()) - w * (1 + NUM_CLASSES)


def _closed_form(x: torch.Tensor, t_start: torch.Tensor, h: float, steps: int, solver: str,
                 c: torch.Tensor) -> torch.Tensor:
    """N steps of size h from t_start for dx/dt = λx + β(t), β = c·b(t), in closed form (matrix powers).

    Euler: x_N = a^N x_0 - h Σ_j a^{N-1-j} β_j, a = 1 - hλ. AB-2 (Euler start): s_{j+1} = A s_j + e_j on
    s_j = (x_j, x_{j-1}), A = [[1 - 3hλ/2, hλ/2], [1, 0]], e_j = (-h(3β_j - β_{j-1})/2, 0), so
    s_N = A^{N-1} s_1 + Σ_{j=1}^{N-1} A^{N-1-j} e_j.
    """
    beta = [c * _b(t_start - j * h) for j in range(steps)]
    a = 1 - h * LAMBDA
    if solver == "euler":
        total = sum(a ** (steps - 1 - j) * beta[j] for j in range(steps))
        return a**steps * x - h * total[:, None]
    x1 = a * x - h * beta[0][:, None]
    A = torch.tensor([[1 - 1.5 * h * LAMBDA, 0.5 * h * LAMBDA], [1.0, 0.0]], dtype=torch.float64)
    power = torch.linalg.matrix_power(A, steps - 1)
    forced = sum(torch.linalg.matrix_power(A, steps - 1 - j)[0, 0] * (-h * (1.5 * beta[j] - 0.5 * beta[j - 1]))
                 for j in range(1, steps))
    return power[0, 0] * x1 + power[0, 1] * x + (forced[:, None] if steps > 1 else 0)


def _linear_teacher(solver: str, steps: int, w: float) -> Teacher:
    meta = {"kind": "student" if solver == "euler" else "teacher", "num_classes": NUM_CLASSES}
    return Teacher(LinearVelocity(), meta, "0" * 64, steps, solver, w, 0.0 if solver == "euler" else w,
                   Path("analytic"))


@pytest.mark.parametrize("solver, plan, w", [("ab2", (20, 4), 0.5), ("ab2", (6, 1), 0.0),
                                             ("euler", (4, 2), 0.0), ("ab2", (3, 1), 1.5)])
def test_endpoint_target_is_the_teachers_closed_form_solution(solver, plan, w):
    teacher = _linear_teacher(solver, plan[0], w)
    stage = Stage(1, plan[0], plan[1])
    objective = EndpointObjective(teacher, KAC, stage)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.rand((64, 3), generator=generator, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (64,), generator=generator)
    pair = objective.endpoint_pair(x0, y, torch.Generator().manual_seed(5))
    M, N = stage.student_steps, stage.segment
    assert set(pair.k.tolist()) == set(range(M))
    expected_start = (1 - pair.k.double() / M)
    assert torch.allclose(pair.t_start, expected_start, rtol=0, atol=1e-15)
    assert torch.allclose(pair.t_start - pair.t_end, torch.full((64,), 1.0 / M, dtype=torch.float64), atol=1e-15)
    c = _guided_coefficient(y, teacher.forward_guidance)
    expected = _closed_form(pair.x_start, expected_start, 1.0 / (M * N), N, solver, c)
    assert (pair.target - expected).abs().max() < 1e-12


def test_a_student_making_the_exact_step_has_zero_loss():
    teacher = _linear_teacher("ab2", 20, 0.5)
    stage = Stage(1, 20, 4)
    objective = EndpointObjective(teacher, KAC, stage)

    class ExactStudent(nn.Module):
        def forward(self, x, t, y):
            end = _closed_form(x, t, 1.0 / 20, 5, "ab2", _guided_coefficient(y, 0.5))
            return (x - end) / 0.25

    x0 = torch.rand((32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    y = torch.arange(32) % NUM_CLASSES
    loss = objective.per_sample_loss(ExactStudent(), x0, y, torch.Generator().manual_seed(2))
    assert loss.shape == (32,)
    assert float(loss.max()) < 1e-24
    # The teacher's own velocity (a single Euler step over the interval) is not the exact step.
    wrong = objective.per_sample_loss(LinearVelocity(), x0, y, torch.Generator().manual_seed(2))
    assert float(wrong.mean()) > 1e-6


def test_data_start_states_are_the_forward_noised_path():
    objective = EndpointObjective(_linear_teacher("ab2", 10, 0.0), KAC, Stage(1, 10, 5))
    x0 = torch.rand((16, 2), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.zeros(16, dtype=torch.long)
    generator = torch.Generator().manual_seed(9)
    pair = objective.endpoint_pair(x0, y, generator)
    # Replay the same draws: k first, then the path's noise.
    replay = torch.Generator().manual_seed(9)
    torch.rand((16,), generator=replay, dtype=torch.float64)
    expected = KAC.sample(x0, pair.t_start, generator=replay).x_t
    assert torch.equal(pair.x_start, expected)


def test_rollout_start_states_follow_the_teachers_own_solver():
    """Pooled start states are the teacher's uninterrupted AB-2 roll-outs at the student's grid times."""
    teacher = _linear_teacher("ab2", 12, 0.5)
    pool = PoolSettings(size=8, refresh=5, seed=11)
    objective = EndpointObjective(teacher, KAC, Stage(1, 12, 4), start_states="rollout", pool=pool)
    objective.prepare_step(0)
    x0 = torch.zeros((24, 3), dtype=torch.float64)
    y = torch.zeros(24, dtype=torch.long)
    pair = objective.endpoint_pair(x0, y, torch.Generator().manual_seed(8))
    replay = torch.Generator().manual_seed(derive_seed(11, "pool", 1, 0))
    prior = KAC.prior((8, 3), generator=replay, dtype=torch.float64)
    labels = torch.clamp((torch.rand((8,), generator=replay, dtype=torch.float64) * NUM_CLASSES).long(), max=1)
    states = []
    solve(lambda x, t: teacher.velocity(x, t, labels), prior, time_grid(12), method="ab2",
          on_step=lambda k, t, x, u: states.append(x))
    draws = torch.Generator().manual_seed(8)
    torch.rand((24,), generator=draws, dtype=torch.float64)
    rows = (torch.rand((24,), generator=draws, dtype=torch.float64) * 8).long()
    for row in range(24):
        expected = states[3 * int(pair.k[row])][rows[row]]
        assert torch.allclose(pair.x_start[row], expected, rtol=0, atol=1e-12), row
        assert pair.y[row] == labels[rows[row]]


def test_path_closeness_of_an_exact_student_is_zero_at_student_times():
    """A student whose Euler step is the teacher's exact N-step (Euler) map agrees at every student grid time
    and differs in between (its segment is linear, the teacher's path is not)."""
    teacher = LinearVelocity()

    class ExactStudent(nn.Module):
        num_classes = NUM_CLASSES
        config = MLPConfig(dim=3, hidden=4, depth=1, num_classes=NUM_CLASSES)

        def forward(self, x, t, y):
            return (x - _closed_form(x.double(), t.double(), 0.05, 5, "euler", 1.0 + y.double()).float()) / 0.25

    result = path_closeness(teacher, ExactStudent(), path=KAC, teacher_steps=20, student_steps=4,
                            seeds=range(12), labels=torch.arange(12) % NUM_CLASSES, teacher_solver="euler",
                            batch_size=5)
    assert len(result["times"]) == 21 and result["times"][0] == 1.0 and result["times"][-1] == 0.0
    at_student_times = [result["rms"][5 * k] for k in range(5)]
    assert max(at_student_times) < 1e-5
    assert result["final"] == result["rms"][-1] and result["max"] == max(result["rms"]) > 1e-3


# ------------------------------------------------------------------------------------ toy2d, end to end

def _toy_args(teacher: Path, outdir: Path, *extra: str, steps: int = 150) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--outdir", str(outdir), "--plan", TOY_PLAN, "--guidance", "0",
            "--steps-per-stage", str(steps), "--batch", "128", "--micro-batch", "128", "--lr", "1e-3",
            "--ema-halflife", "2000", "--device", "cpu", "--closeness-samples", "400", "--log-every", "25",
            "--ckpt-every", str(steps), "--sample-every", str(steps), "--no-progress", *extra]


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory, single_thread) -> Path:
    from distillkac.train import train_teacher

    config = make_toy_config(steps=800, batch=128, micro_batch=128, hidden=64, depth=2, log_every=100,
                             ckpt_every=800, sample_every=800)
    config.optim.lr = 2e-3
    config.data.toy_size = 4096
    run = tmp_path_factory.mktemp("toy") / "teacher"
    train_teacher(config, run, progress=False)
    return run


@pytest.fixture(scope="module")
def toy_distill(toy_teacher) -> Path:
    outdir = toy_teacher.parent / "distill"
    assert main(_toy_args(toy_teacher, outdir)) == 0
    return outdir


def _endpoint_loss(teacher_dir: Path, student: nn.Module, stage: Stage) -> float:
    """Endpoint loss of ``student`` on a fixed batch (same k, start states and targets for every student)."""
    teacher = load_teacher(teacher_dir, stage.teacher_steps, 0.0)
    path = build_path(teacher.meta["path"])
    data = load_dataset(DataConfig(name="toy2d", toy="grid", toy_size=512), "train")
    x0, y = data.get_batch(torch.arange(512))
    objective = EndpointObjective(teacher, path, stage)
    with torch.no_grad():
        return float(objective.per_sample_loss(student, x0, y, torch.Generator().manual_seed(123)).mean())


def test_each_stage_lowers_the_endpoint_loss_and_stays_close_to_its_teacher(toy_teacher, toy_distill):
    previous = toy_teacher / "artifact"
    for index, (t_steps, s_steps) in enumerate([(20, 4), (4, 2), (2, 1)], start=1):
        stage = Stage(index, t_steps, s_steps)
        stage_dir = toy_distill / stage.name
        student, meta = load_artifact(stage_dir / "artifact")
        start, _ = load_artifact(previous)
        before, after = _endpoint_loss(previous, start, stage), _endpoint_loss(previous, student, stage)
        assert after < 0.1 * before, (stage, before, after)
        closeness = json.loads((stage_dir / "closeness.json").read_text())
        assert closeness["max"] < 0.25, stage
        assert closeness["final"] <= closeness["max"]
        rows = [json.loads(line) for line in (stage_dir / "stats.jsonl").read_text().splitlines()]
        assert rows[-1]["closeness_max"] == closeness["max"] and (stage_dir / "closeness.png").is_file()
        assert meta["kind"] == "student" and meta["steps"] == s_steps and meta["solver"] == "euler"
        assert meta["guidance"] == 0.0 and meta["teacher_steps"] == t_steps
        assert meta["grid_times"] == time_grid(s_steps).tolist()
        teacher_meta = json.loads((previous / "config.json").read_text())
        assert meta["teacher_sha256"] == teacher_meta["weights_sha256"]
        assert [s["steps"] for s in meta["stages"]] == [4, 2, 1][:index]
        assert meta["path"] == teacher_meta["path"] and meta["net"] == teacher_meta["net"]
        previous = stage_dir / "artifact"


def test_distillation_beats_the_undistilled_student_on_path_closeness(toy_teacher, toy_distill):
    teacher = load_teacher(toy_teacher / "artifact", 20, 0.0)
    path = build_path(teacher.meta["path"])
    labels = cycle_labels(400, 16)
    undistilled, _ = load_artifact(toy_teacher / "artifact")

    naive = path_closeness(teacher.velocity, undistilled, path=path, teacher_steps=20, student_steps=4,
                           seeds=range(400), labels=labels)
    distilled = json.loads((toy_distill / "stage-4step" / "closeness.json").read_text())
    assert distilled["max"] < 0.6 * naive["max"]


def test_one_step_student_keeps_the_modes(toy_distill):
    labels = cycle_labels(1600, 16)
    result = sample_artifact(toy_distill / "stage-1step", seeds=range(1600), labels=labels)
    assert result.steps == 1 and result.nfe_per_sample == 1
    mixture = toy_mixture(DataConfig(name="toy2d"))
    metrics = toy2d_metrics(result.samples, labels, mixture)
    assert metrics["mode_coverage"] == 1.0
    means, std, _ = mixture
    distance = (result.samples.double() - means[labels]).norm(dim=1)
    assert float((distance <= 3 * std).double().mean()) > 0.5


def test_rerun_skips_finished_stages_and_dry_run_prints_configs(toy_teacher, toy_distill, capsys):
    before = {p: p.stat().st_mtime_ns for p in toy_distill.glob("stage-*/artifact/model.safetensors")}
    assert main(_toy_args(toy_teacher, toy_distill)) == 0
    assert "skipped" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in toy_distill.glob("stage-*/artifact/model.safetensors")}
    assert main(_toy_args(toy_teacher, toy_distill / "dry", "--dry-run", "--steps-per-stage", "10,20,30")) == 0
    configs = json.loads(capsys.readouterr().out)
    assert [c["distill"]["student_steps"] for c in configs] == [4, 2, 1]
    assert [c["train"]["steps"] for c in configs] == [10, 20, 30]
    assert configs[0]["distill"]["guidance"] == 0.0
    assert configs[1]["distill"]["teacher"].endswith("stage-4step/artifact")
    assert not (toy_distill / "dry").exists()
    summary = json.loads((toy_distill / "distill.json").read_text())
    assert [s["dir"] for s in summary["stages"]] == ["stage-4step", "stage-2step", "stage-1step"]


@pytest.mark.parametrize("stage", ["stage-4step", "stage-2step", "stage-1step"])
def test_sample_command_works_on_every_stage(toy_distill, tmp_path, stage):
    out = tmp_path / stage
    assert main(["sample", "--checkpoint", str(toy_distill / stage), "--out", str(out), "--num", "32",
                 "--device", "cpu"]) == 0
    assert (out / "scatter.png").is_file() and (out / "samples.npz").is_file()


def test_resuming_mid_stage_reproduces_the_uninterrupted_stage(toy_teacher, tmp_path):
    settings = DistillConfig(plan=(4, 2), guidance=0.5, steps_per_stage=6, closeness_samples=8,
                             optim=OptimConfig(lr=1e-3, warmup_images=0),
                             train=TrainConfig(batch=32, micro_batch=16, ema_halflife_images=500.0, ema_rampup=None,
                                               device="cpu", log_every=1, ckpt_every=3, sample_every=100))
    run_distillation(toy_teacher, tmp_path / "whole", settings, progress=False)
    halfway = dataclasses.replace(settings, steps_per_stage=3)
    run_distillation(toy_teacher, tmp_path / "parts", halfway, progress=False)
    run_distillation(toy_teacher, tmp_path / "parts", settings, progress=False)
    whole = load_training_state(tmp_path / "whole" / "stage-2step" / "training-state.pt")
    parts = load_training_state(tmp_path / "parts" / "stage-2step" / "training-state.pt")
    assert whole["step"] == parts["step"] == 6
    for key in ("model", "ema"):
        assert whole[key].keys() == parts[key].keys()
        for name in whole[key]:
            assert torch.equal(whole[key][name], parts[key][name]), (key, name)
    for index, state in whole["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, parts["optimizer"]["state"][index][name]), (index, name)


# ------------------------------------------------------------------------------------------- errors

def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("distillkac: error:")
    return err


def test_cli_refuses_bad_plans_and_missing_teachers(toy_teacher, tmp_path, capsys):
    err = _one_line_error(capsys, _toy_args(toy_teacher, tmp_path / "o", "--plan", "20,8"))
    assert "8 does not divide 20 (20 -> 8)" in err
    err = _one_line_error(capsys, _toy_args(toy_teacher, tmp_path / "o", "--plan", "20,4,8"))
    assert "not strictly decreasing at 4 -> 8" in err
    err = _one_line_error(capsys, _toy_args(tmp_path / "nowhere", tmp_path / "o"))
    assert "--teacher" in err and "does not exist" in err
    err = _one_line_error(capsys, _toy_args(toy_teacher, tmp_path / "o", "--stage", "2"))
    assert "run stage 1 first" in err
    err = _one_line_error(capsys, _toy_args(toy_teacher, tmp_path / "o", "--stage", "7"))
    assert "--stage: must be 1..3" in err
    assert not (tmp_path / "o").exists()


def test_an_unusable_outdir_fails_early_naming_the_option(toy_teacher, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    err = _one_line_error(capsys, _toy_args(toy_teacher, blocker))
    assert f"--outdir: {blocker} exists and is not a directory" in err
    err = _one_line_error(capsys, _toy_args(toy_teacher, blocker / "out"))
    assert f"--outdir: cannot create {blocker / 'out'}: {blocker} is a file, not a directory" in err
    with pytest.raises(DistillKacError, match="^--outdir: "):
        Distillation(toy_teacher, blocker, DistillConfig(plan=(20, 4)))
    assert blocker.read_text() == "keep"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_a_read_only_outdir_parent_fails_early(toy_teacher, tmp_path, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        err = _one_line_error(capsys, _toy_args(toy_teacher, read_only / "out"))
    finally:
        read_only.chmod(0o755)
    assert f"--outdir: cannot write to {read_only} (permission denied)" in err
    assert not (read_only / "out").exists()


def test_a_finished_stage_is_not_skipped_under_other_settings(toy_teacher, toy_distill, capsys):
    err = _one_line_error(capsys, _toy_args(toy_teacher, toy_distill, "--guidance", "0.5"))
    assert "stage-4step: this finished stage was distilled with distill.guidance = 0.0, now 0.5" in err


def test_a_student_teacher_fixes_the_first_step_count(toy_distill, tmp_path, capsys):
    student = toy_distill / "stage-4step"
    err = _one_line_error(capsys, ["distill", "--teacher", str(student), "--outdir", str(tmp_path / "o"),
                                   "--plan", "20,4,1", "--dry-run"])
    assert "the first step count 20 must equal the teacher's steps 4" in err
    assert main(["distill", "--teacher", str(student), "--outdir", str(tmp_path / "o"), "--plan", "4,1",
                 "--dry-run"]) == 0
    configs = json.loads(capsys.readouterr().out)
    assert configs[0]["distill"]["guidance"] == 0.0 and configs[0]["distill"]["teacher_steps"] == 4


def _fake_teacher(tmp_path: Path, name: str, path_config: dict, dim: int = 2, classes: int = 16) -> Path:
    """A teacher run directory (artefact + run config) with the toy data and the given path / shape / classes."""
    run = tmp_path / name
    net = build_network(MLPConfig(dim=dim, hidden=16, depth=1, num_classes=classes),
                        generator=torch.Generator().manual_seed(0))
    save_artifact(run / "artifact", net, {"kind": "teacher", "path": path_config})
    config = make_toy_config().to_dict()
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.mark.parametrize("path_config, dim, classes, message", [
    ({"kind": "kac", "kac_a": 25.0, "kac_c": 2.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}, 2, 16,
     "path kac a=25, c=2"),
    ({"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}, 3, 16,
     "data shape [3] differs"),
    ({"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}, 2, 8,
     "8 classes differ"),
    ({"kind": "kac", "kac_a": 9.0, "kac_c": 3.0, "T": 1.0, "schedule": "linear", "g_schedule": "t"}, 2, 16,
     "weights sha256"),
])
def test_a_mismatched_teacher_is_refused(toy_teacher, toy_distill, tmp_path, capsys, path_config, dim, classes,
                                         message):
    other = _fake_teacher(tmp_path, "other", path_config, dim, classes)
    err = _one_line_error(capsys, _toy_args(other, toy_distill))
    assert message in err and "stage-4step" in err


def test_distill_presets_cover_the_training_presets():
    for name in ("digits", "toy2d", "cifar10", "celeba64", "lsun-bedroom256"):
        assert preset_key(get_preset(name).data) == name
    assert math.isfinite(DISTILL_PRESETS["digits"].guidance)
