"""`distillkac demo` end to end on a tiny budget, its directory rules, and `distillkac reproduce`."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest

from distillkac.cli import main
from distillkac.demo import BUDGETS, MARKER_FILE, OWN_ENTRIES, eval_steps, prepare_outdir
from distillkac.errors import DistillKacError
from distillkac.nets import REFERENCE_CONFIGS
from distillkac.paths import PathConfig
from distillkac.presets import get_preset
from distillkac.report import REPORT_JSON, REPORT_MD, _converged_teacher, target_profiles
from distillkac.reproduce import FORWARD_GFLOP, Plan, Step, build_plan, plan_summary, resolve_throughput, run_plan
from distillkac.stats import HOLDS, VERDICTS

TINY = BUDGETS["tiny"]


def _run_tiny(outdir: Path) -> float:
    start = time.perf_counter()
    assert main(["demo", "--outdir", str(outdir), "--budget", "tiny", "--jobs", "1"]) == 0
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo run twice in one directory: (outdir, first report, first seconds, rerun seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTILLKAC_CACHE", str(tmp_path_factory.mktemp("cache")))
        outdir = tmp_path_factory.mktemp("demo") / "out"
        first_seconds = _run_tiny(outdir)
        first = json.loads((outdir / REPORT_JSON).read_text())
        rerun_seconds = _run_tiny(outdir)
    return outdir, first, first_seconds, rerun_seconds


def _expected_rows() -> set[tuple[str, str, int]]:
    """(model, solver, steps) of every row: teacher x2 solvers, baselines at every step count, students."""
    rows = set()
    for steps in TINY.plan:
        rows |= {("kac-teacher", "ab2", steps), ("kac-teacher", "euler", steps), ("flow-baseline", "euler", steps),
                 ("vp-baseline", "ddim", steps)}
    rows |= {(f"stage-{steps}step", "euler", steps) for steps in TINY.plan[1:]}
    return rows


def test_report_has_every_row_with_sane_finite_metrics(demo):
    _, report, _, _ = demo
    rows = report["rows"]
    assert {(r["model"], r["solver"], r["steps"]) for r in rows} == _expected_rows()
    assert len(rows) == len(_expected_rows())
    for row in rows:
        values = row["values"]
        assert 0.0 <= values["class_accuracy"] <= 1.0
        for key, bound in (("fd_digits", 1e5), ("fd_pixels", 1e4)):
            assert math.isfinite(values[key]) and 0.0 <= values[key] < bound, (key, row)
        assert values["num_samples"] == TINY.eval_samples
        expected_nfe = row["steps"] if row["kind"] == "student" else 2 * row["steps"]  # guided: 2 per step
        assert row["nfe"] == expected_nfe


def test_report_files_exist_and_findings_are_computed(demo):
    outdir, report, _, _ = demo
    text = (outdir / REPORT_MD).read_text()
    pictures = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert set(report["files"]) <= set(pictures)
    assert len(set(pictures)) == 4 + len(report["rows"])  # 4 plots + one grid per row
    for picture in pictures:
        assert (outdir / picture).is_file() and (outdir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    claims = report["findings"]
    # degradation, the converged teacher, one per student step count, velocity x2
    assert len(claims) == 1 + 1 + (len(TINY.plan) - 1) + 2
    converged = claims[1]["difference"]
    long, short = (next(r for r in report["rows"] if r["model"] == "kac-teacher" and r["solver"] == "ab2"
                        and r["steps"] == steps) for steps in (TINY.plan[0], TINY.plan[1] // 2))
    assert converged["mean"] == pytest.approx(long["values"]["fd_digits"] - short["values"]["fd_digits"], abs=1e-9)
    for claim in claims:
        assert isinstance(claim["holds"], bool) and re.search(r"\d\.\d{3}", claim["text"])
        assert claim["text"] in text
    student = next(r for r in report["rows"] if r["model"] == "stage-1step")
    assert f"{student['values']['fd_digits']:.3f}" in claims[-3]["text"]
    assert set(report["timings"]) >= {"train_teacher", "train_flow", "train_vp", "distill"}
    cost = report["distillation_cost"]
    assert [(s["teacher_steps"], s["student_steps"], s["optimiser_steps"]) for s in cost] == \
        list(zip(TINY.plan, TINY.plan[1:], TINY.distill_steps))
    assert all(s["seconds"] > 0 and f"| {s['seconds']:.1f} |" in text for s in cost)
    assert report["environment"]["torch"] and report["date_utc"]
    assert report["configs"]["teacher"]["train"]["steps"] == TINY.train_steps


def test_rerun_reuses_every_part_with_the_same_numbers(demo):
    outdir, first, first_seconds, rerun_seconds = demo
    second = json.loads((outdir / REPORT_JSON).read_text())
    assert all(timing["reused"] for timing in second["timings"].values())
    assert [r["values"] for r in second["rows"]] == [r["values"] for r in first["rows"]]
    assert rerun_seconds < first_seconds / 3, (rerun_seconds, first_seconds)


def test_rows_have_seed_blocks_and_claims_have_paired_verdicts(demo):
    _, report, _, _ = demo
    for row in report["rows"]:
        assert (row["blocks"], row["num"], row["precision"]) == (TINY.eval_blocks, TINY.eval_samples, "fp32")
        assert [block["seed"] for block in row["per_block"]] == [b * TINY.eval_samples for b in range(TINY.eval_blocks)]
    for claim in [*report["findings"], *report["targets"]]:
        assert claim["verdict"] in VERDICTS and claim["holds"] == (claim["verdict"] == HOLDS)
    equal = [claim for claim in report["findings"] if "compared_at_nfe" in claim]
    assert [(c["steps"], c["nfe"], c["compared_at_nfe"]) for c in equal] == [(2, 2, 2), (1, 1, 2)]
    assert [c["steps"] for c in equal[0]["comparisons"]] == [1] * 4  # 1 guided step of each sampler: 2 NFE
    student = next(r for r in report["rows"] if r["model"] == "stage-1step")
    teacher = next(r for r in report["rows"] if (r["model"], r["solver"], r["steps"]) == ("kac-teacher", "ab2", 4))
    within = report["targets"][1]
    blocks = [s["values"]["fd_digits"] - 1.05 * t["values"]["fd_digits"]
              for s, t in zip(student["per_block"], teacher["per_block"])]
    assert within["factor"] == 1.05 and within["difference"]["mean"] == pytest.approx(sum(blocks) / len(blocks))
    assert len(report["targets"]) == 5


def test_more_blocks_reevaluate_and_reuse_the_trained_models(demo, tmp_path, monkeypatch):
    outdir, first, _, _ = demo
    copy = tmp_path / "out"
    shutil.copytree(outdir, copy)
    monkeypatch.setenv("DISTILLKAC_CACHE", str(tmp_path / "cache"))
    blocks = TINY.eval_blocks + 1
    assert main(["demo", "--outdir", str(copy), "--budget", "tiny", "--jobs", "1", "--blocks", str(blocks)]) == 0
    report = json.loads((copy / REPORT_JSON).read_text())
    assert report["budget"]["eval_blocks"] == blocks and all(row["blocks"] == blocks for row in report["rows"])
    assert {name for name, timing in report["timings"].items() if timing["reused"]} == \
        {"train_teacher", "train_flow", "train_vp", "distill", "velocity_teacher", "velocity_flow", "velocity_vp"}
    old_blocks = {(r["model"], r["solver"], r["steps"]): r["per_block"] for r in first["rows"]}
    for row in report["rows"]:  # the first blocks are the same seeds and labels, so the same values
        assert row["per_block"][:TINY.eval_blocks] == old_blocks[(row["model"], row["solver"], row["steps"])]


def test_blocks_below_two_are_refused(tmp_path, capsys):
    assert main(["demo", "--outdir", str(tmp_path / "out"), "--budget", "tiny", "--blocks", "1"]) == 2
    assert "--blocks: intervals need at least 2 seed blocks, got 1" in capsys.readouterr().err


def test_eval_steps_add_half_of_each_student_step_count():
    assert eval_steps((100, 20, 4, 2, 1)) == [100, 20, 10, 4, 2, 1]
    assert eval_steps(TINY.plan) == [4, 2, 1]
    assert eval_steps((10, 5, 2, 1)) == [10, 5, 2, 1]  # no half of 5: the 5-step student meets no equal NFE


def test_no_converged_teacher_claim_without_a_solve_at_the_first_students_nfe():
    """(10, 5, 2, 1): the teacher's 2-step solve (4 NFE) is in the table but is not at the 5-step student's NFE."""
    rows = [{"kind": "teacher", "model": "kac-teacher", "solver": "ab2", "steps": s} for s in (10, 5, 2, 1)]
    assert _converged_teacher(rows, (10, 5, 2, 1)) == []


def test_fresh_refuses_a_directory_that_is_not_a_demo(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("keep me")
    assert main(["demo", "--outdir", str(target), "--budget", "tiny", "--fresh"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "not a distillkac demo directory" in message
    assert (target / "thesis.tex").read_text() == "keep me" and len(list(target.iterdir())) == 1


def test_fresh_deletes_only_the_demos_own_entries(tmp_path):
    prepare_outdir(tmp_path / "demo", TINY, fresh=False)
    outdir = tmp_path / "demo"
    (outdir / "kac-teacher").mkdir()
    (outdir / "kac-teacher" / "stats.jsonl").write_text("{}")
    (outdir / REPORT_MD).write_text("old")
    (outdir / "notes.txt").write_text("mine")
    with pytest.raises(DistillKacError, match="'tiny' demo, not 'quick'"):
        prepare_outdir(outdir, BUDGETS["quick"], fresh=False)
    prepare_outdir(outdir, BUDGETS["quick"], fresh=True)
    assert sorted(p.name for p in outdir.iterdir()) == [MARKER_FILE, "notes.txt"]
    assert json.loads((outdir / MARKER_FILE).read_text())["budget"]["name"] == "quick"
    assert MARKER_FILE in OWN_ENTRIES and "notes.txt" not in OWN_ENTRIES


@pytest.mark.slow
def test_quick_demo_within_its_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKAC_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    assert main(["demo", "--outdir", str(tmp_path / "quick"), "--quick"]) == 0
    assert time.perf_counter() - start < 240
    report = json.loads((tmp_path / "quick" / REPORT_JSON).read_text())
    assert len(report["rows"]) == 4 * 6 + 4  # teacher x2 solvers and baselines at 100, 20, 10, 4, 2, 1 steps


# ------------------------------------------------------------------------------------------ reproduce

@pytest.mark.parametrize("dataset", ["cifar10", "celeba64", "lsun-bedroom256"])
def test_reproduce_dry_run_prints_the_whole_plan_and_writes_nothing(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISTILLKAC_INCEPTION_WEIGHTS", raising=False)
    before = sorted(tmp_path.rglob("*"))
    argv = ["reproduce", dataset, "--data", str(tmp_path / "data"), "--outdir", str(tmp_path / "out"),
            "--inception-weights", str(tmp_path / "w.pth"), "--dry-run", "--benchmarks", str(tmp_path / "none")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    commands = [line.strip()[2:] for line in out.splitlines() if line.strip().startswith("$ ")]
    names = [command.split()[1] for command in commands]
    assert names == ["ref", "train", "eval"] + ["distill", "eval"] * 4
    assert [c.split("--stage ")[1] for c in commands if " distill " in f" {c} "] == ["1", "2", "3", "4"]
    assert all("--metric fid --num 50000" in c for c in commands if c.split()[1] == "eval")
    assert f"--preset {dataset}" in commands[1]
    estimates = [float(x.replace(",", "")) for x in re.findall(r"estimate ([\d,.]+) GPU-hours", out)]
    assert len(estimates) == 11 and all(e >= 0 for e in estimates)
    total = float(re.search(r"total: ([\d,.]+) GPU-hours", out).group(1).replace(",", ""))
    assert total == pytest.approx(sum(estimates), abs=0.1)
    assert out.count("ASSUMED") == 3
    assert sorted(tmp_path.rglob("*")) == before


def test_reproduce_estimates_follow_the_given_throughput(tmp_path):
    plan = build_plan("cifar10", "data", tmp_path / "out", "w.pth")
    throughput = resolve_throughput("cifar10", {"train": 1000.0, "sample": 2000.0, "inception": 500.0},
                                    tmp_path / "none")
    summary = plan_summary(plan, throughput, gpus=4)
    train = get_preset("cifar10").train
    step = next(s for s in summary["steps"] if s["name"] == "train")
    assert step["gpu_hours"] == pytest.approx(train.steps * train.batch / 1000.0 / 3600)
    assert step["command"][:4] == ["torchrun", "--nproc_per_node=4", "-m", "distillkac"]
    teacher_eval = next(s for s in summary["steps"] if s["name"] == "eval teacher")
    assert teacher_eval["gpu_hours"] == pytest.approx((50_000 * 200 / 2000.0 + 50_000 / 500.0) / 3600)
    assert summary["steps"][0]["command"][0] == "distillkac"  # ref: one process


def test_reproduce_uses_measured_cuda_benchmarks_scaled_by_flops(tmp_path):
    bench = tmp_path / "results"
    bench.mkdir()
    network = REFERENCE_CONFIGS["cifar10"].to_dict()
    record = {"benchmark": "train_throughput_cuda", "settings": {"network": network},
              "results": {"rows": [{"images_per_s": 1500.0}, {"images_per_s": 2500.0}]}}
    (bench / "train_throughput_cuda.json").write_text(json.dumps(record))
    cifar = resolve_throughput("cifar10", {}, bench)
    assert cifar.values["train"] == 2500.0 and cifar.sources["train"].startswith("measured")
    assert cifar.sources["sample"].startswith("ASSUMED")
    celeba = resolve_throughput("celeba64", {}, bench)
    assert celeba.values["train"] == pytest.approx(2500.0 * FORWARD_GFLOP["cifar10"] / FORWARD_GFLOP["celeba64"])


def test_reproduce_needs_data_and_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISTILLKAC_INCEPTION_WEIGHTS", raising=False)
    assert main(["reproduce", "cifar10", "--outdir", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data" in err
    assert main(["reproduce", "cifar10", "--data", "d", "--outdir", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--inception-weights" in err
    assert main(["reproduce", "cifar10", "--data", str(tmp_path / "missing"), "--outdir", str(tmp_path / "o"),
                 "--inception-weights", "w.pth"]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_run_plan_skips_finished_steps_and_stops_at_a_failure(tmp_path):
    finished = Step("done", ["train", "--help"], {}, "", lambda: True)
    failing = Step("broken", ["train", "--preset", "toy2d", "--outdir", str(tmp_path / "r"), "--steps", "-1"], {},
                   "", lambda: False)
    never = Step("after", ["train", "--help"], {}, "", lambda: pytest.fail("must not be reached"))
    lines: list[str] = []
    assert run_plan(Plan("cifar10", [finished], 0.0), gpus=1, echo=lines.append) == [
        {"step": "done", "skipped": True}]
    with pytest.raises(DistillKacError, match=r"step 2 \(broken\) failed with exit code 2"):
        run_plan(Plan("cifar10", [finished, failing, never], 0.0), gpus=1, echo=lines.append)
    assert "skipped" in lines[0] and "$ distillkac train --preset toy2d" in lines[-1]


@pytest.mark.parametrize("kac_c", [1.0, 3.0])
def test_target_profiles_use_the_teachers_kac_constants(kac_c):
    """The Kac conditional target is bounded by 1 + c of the teacher's own path (method.md §1-2)."""
    path = dataclasses.asdict(PathConfig(kind="kac", kac_a=kac_c ** 2, kac_c=kac_c))
    kac = target_profiles(4, path)["kac"]
    assert kac["max_abs_all"] <= 1 + kac_c + 1e-9
    assert kac["max_abs_all"] > 0.9 * kac_c  # the atoms move at full speed c at some coordinate
