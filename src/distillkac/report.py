"""The demo's comparison and its report: the models compared and the protocol every row follows
(guidance, seed blocks, precision, the velocity-diagnostics grid), the claims and targets checked against
the run's numbers (rows compared by paired differences over the seed blocks, each verdict holding or
failing only when its 95% interval excludes the bound), and ``report.json`` / ``report.md`` with their
plots. The pipeline that produces the numbers is ``demo``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from distillkac.checkpoint import Artifact
from distillkac.diagnostics import analytic_velocity_profile, plot_closeness, plot_velocity_profiles
from distillkac.distill import plan_stages
from distillkac.files import atomic_write_bytes, atomic_write_json
from distillkac.metrics.digits import digits_reference_images
from distillkac.nfe_table import paired_rows, plot_metric_vs_nfe, row_interval
from distillkac.paths import build_path
from distillkac.runtime import environment_record
from distillkac.solvers import time_grid
from distillkac.stats import FAILS, HOLDS, combine, verdict

REPORT_FORMAT = "distillkac-demo-report"
REPORT_VERSION = 2
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
CLOSENESS_PLOT, NFE_PLOT, VELOCITY_PLOT, TARGETS_PLOT = (
    "closeness.png", "metric_vs_nfe.png", "velocity.png", "velocity_targets.png")
GUIDANCE = 0.25
"""The CFG weight of the guided teacher, baked into the students, and used for the baselines. 0.25: the
smallest fd_digits of the guided teacher among w in {0.25, 0.5, 0.75, 1} over 8 paired seed blocks, with class
accuracy above 0.99 (w = 0 loses accuracy); docs/ablations.md, decision 5."""
SEED = 0
"""Image i of seed block b of every row uses seed SEED + b·num + i and label i mod 10 (as ``distillkac eval``)."""
EVAL_PRECISION = "fp32"
"""The evaluation samples in fp32 (on any device), so the metrics do not depend on autocast."""
PROFILE_GRID = "quadratic"
"""Time grid of the velocity diagnostics: T(1 - k/N)², so the last steps come close to the data."""
TEACHER_DIR, FLOW_DIR, VP_DIR, DISTILL_DIR = "kac-teacher", "flow-baseline", "vp-baseline", "distill"


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


def student_dirs(outdir: Path, plan: Sequence[int]) -> list[Path]:
    """The run directory of every distillation stage of ``plan``."""
    return [outdir / DISTILL_DIR / stage.name for stage in plan_stages(plan)]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- the rows

ROW_ORDER = ("teacher-ab2", "teacher-euler", "student", "flow-euler", "vp-ddim")
ROW_TITLES = {"teacher-ab2": "Kac teacher, guided AB-2", "teacher-euler": "Kac teacher, guided Euler",
              "student": "DistillKac student (Euler)", "flow-euler": "flow matching, guided Euler",
              "vp-ddim": "VP diffusion, guided DDIM"}


def row_family(row: dict[str, Any]) -> str:
    if row["kind"] == Artifact.STUDENT:
        return "student"
    return {TEACHER_DIR: "teacher", FLOW_DIR: "flow", VP_DIR: "vp"}[row["model"]] + f"-{row['solver']}"


def _table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model, sampler | steps | NFE | class accuracy | fd_digits (mean ± 95% interval) | fd_pixels "
             "| samples |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        values = row["values"]
        fd = row_interval(row, FD).half_width
        lines.append(f"| {ROW_TITLES[row_family(row)]} | {row['steps']} | {row['nfe']} | "
                     f"{values['class_accuracy']:.3f} | {_fd(row):.3f} ± {fd:.3f} | {values['fd_pixels']:.3f} | "
                     f"[grid]({row['grid']}) |")
    return "\n".join(lines) + "\n"


def sorted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-r["steps"], ROW_ORDER.index(row_family(r))))


def _lookup(rows: Sequence[dict[str, Any]], family: str, steps: int) -> dict[str, Any] | None:
    return next((r for r in rows if row_family(r) == family and r["steps"] == steps), None)


# -------------------------------------------------------------------------------------- the claims

FD, ACC = "fd_digits", "class_accuracy"


def findings(rows: Sequence[dict[str, Any]], plan: Sequence[int], profiles: dict[str, dict[str, Any]],
             targets: dict[str, dict[str, Any]], kac_bound: float) -> list[dict[str, Any]]:
    """The claims the demo checks, each as numbers and a verdict computed from this run: the comparisons
    of rows by paired differences over the seed blocks (``distillkac.stats``), the velocity claims from
    the measured profiles."""
    return [_degradation(rows, plan), *_converged_teacher(rows, plan), *_equal_nfe(rows, plan),
            *_velocity(profiles, targets, kac_bound)]


def _claim(claim: str, result: str, text: str, **details: Any) -> dict[str, Any]:
    return {"claim": claim, "verdict": result, "holds": result == HOLDS, "text": text, **details}


def _acc(row: dict[str, Any]) -> float:
    return float(row["values"][ACC])


def _fd(row: dict[str, Any]) -> float:
    return float(row["values"][FD])


def _title(row: dict[str, Any]) -> str:
    return f"{ROW_TITLES[row_family(row)]}, {row['steps']} step(s) / {row['nfe']} NFE"


def _degradation(rows: Sequence[dict[str, Any]], plan: Sequence[int]) -> dict[str, Any]:
    """Graceful: the last student keeps the teacher's class accuracy within 0.10 (paired difference above
    -0.10) and its fd_digits below 1.5 times that of the first (most-step) student (``last - 1.5 · first``
    below 0)."""
    teacher = _lookup(rows, "teacher-ab2", plan[0])
    students = [_lookup(rows, "student", s) for s in plan[1:]]
    accuracy = [_acc(s) for s in students]
    fds = [_fd(s) for s in students]
    drop = paired_rows(students[-1], teacher, ACC)
    growth = paired_rows(students[-1], students[0], FD, factor=1.5)
    result = combine([verdict(drop, "above", -0.10), verdict(growth, "below")])
    sequence = ", ".join(f"{s}: {a:.3f}" for s, a in zip(plan[1:], accuracy))
    fd_sequence = ", ".join(f"{s}: {f:.3f}" for s, f in zip(plan[1:], fds))
    text = (f"students by steps, class accuracy {sequence} (guided AB-2 teacher at {plan[0]} steps / "
            f"{teacher['nfe']} NFE: {_acc(teacher):.3f}); fd_digits {fd_sequence} (teacher: {_fd(teacher):.3f}). "
            f"Paired over the seed blocks: the {plan[-1]}-step student's accuracy minus the teacher's "
            f"{drop.describe(3, signed=True)} (graceful: above -0.10), its fd_digits minus 1.5 x the {plan[1]}-step "
            f"student's {growth.describe(3, signed=True)} (graceful: below 0).")
    return _claim("the students degrade gracefully from the teacher's steps to 1 step", result, text,
                  student_accuracy=dict(zip(map(str, plan[1:]), accuracy)),
                  student_fd_digits=dict(zip(map(str, plan[1:]), fds)), teacher_accuracy=_acc(teacher),
                  teacher_fd_digits=_fd(teacher), accuracy_difference=drop.to_dict(),
                  fd_growth_difference=growth.to_dict())


def _converged_teacher(rows: Sequence[dict[str, Any]], plan: Sequence[int]) -> list[dict[str, Any]]:
    """The first student is trained to reproduce the teacher's ``plan[0]``-step solve; at its NFE it meets
    the same teacher at ``plan[1] / 2`` AB-2 steps. When that short solve scores better than the long one
    (fd_digits of the long minus the short above 0), no student that imitates the long solve can win there.
    Empty when the plan has no such short solve (an odd second step count)."""
    if plan[1] % 2:
        return []
    long, short = _lookup(rows, "teacher-ab2", plan[0]), _lookup(rows, "teacher-ab2", plan[1] // 2)
    difference = paired_rows(long, short, FD)
    text = (f"fd_digits {_title(long)} {_fd(long):.3f} vs {_title(short)} {_fd(short):.3f}; paired difference "
            f"long minus short {difference.describe(3, signed=True)} (holds when the interval lies below 0).")
    return [_claim(f"the guided teacher's {plan[0]}-step solve, which the {plan[1]}-step student learns, scores "
                   f"better than its own {short['steps']}-step solve at the student's NFE",
                   verdict(difference, "below"), text, difference=difference.to_dict())]


def _equal_nfe(rows: Sequence[dict[str, Any]], plan: Sequence[int]) -> list[dict[str, Any]]:
    """Each student against every other sampler with its NFE (the guided samplers at half its steps): it
    wins when every paired fd_digits difference (student minus the other) lies below 0. A student with
    fewer NFE than any guided sampler (1 step) is compared with those at the smallest NFE there is."""
    out = []
    others = [r for r in rows if row_family(r) != "student"]
    for steps in plan[1:]:
        student = _lookup(rows, "student", steps)
        nfe = min((r["nfe"] for r in others if r["nfe"] >= student["nfe"]), default=None)
        rivals = [(rival, paired_rows(student, rival, FD)) for rival in others if rival["nfe"] == nfe]
        comparisons = [{"sampler": ROW_TITLES[row_family(rival)], "steps": rival["steps"], "nfe": rival["nfe"],
                        "fd_digits": _fd(rival), "difference": difference.to_dict(),
                        "verdict": verdict(difference, "below")} for rival, difference in rivals]
        result = combine(c["verdict"] for c in comparisons)
        spread = row_interval(student, FD).half_width
        text = (f"{steps}-step student ({student['nfe']} NFE) fd_digits {_fd(student):.3f} ± {spread:.3f}, class "
                f"accuracy {_acc(student):.3f}; paired fd_digits difference student minus each sampler at {nfe} NFE: "
                + "; ".join(f"{_title(rival)} (fd {_fd(rival):.3f}, acc {_acc(rival):.3f}): "
                            f"{difference.describe(3, signed=True)} ({c['verdict']})"
                            for (rival, difference), c in zip(rivals, comparisons)) + ".")
        if nfe != student["nfe"]:
            text += (f" No guided sampler runs at {student['nfe']} NFE; these use {nfe}, more network evaluations "
                     f"than the student.")
        out.append(_claim(f"the {steps}-step student beats every other sampler at equal NFE ({student['nfe']})",
                          result, text, steps=steps, nfe=student["nfe"], compared_at_nfe=nfe,
                          comparisons=comparisons))
    return out


def quality_targets(rows: Sequence[dict[str, Any]], plan: Sequence[int], claims: Sequence[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """The quality targets of the distillation, each a paired fd_digits difference over the seed blocks
    (``a - factor · b`` below 0): every student ahead at equal NFE (from ``claims``), the last student
    within 5% of the teacher, the first student no worse than it, the last student ahead of flow matching
    at the teacher's steps, and the Kac teacher ahead of flow matching at equal steps and training budget."""
    teacher, flow = _lookup(rows, "teacher-ab2", plan[0]), _lookup(rows, "flow-euler", plan[0])
    first, last = _lookup(rows, "student", plan[1]), _lookup(rows, "student", plan[-1])
    equal = [c for c in claims if "compared_at_nfe" in c]
    out = [_claim("every student better than every other sampler at equal NFE", combine(c["verdict"] for c in equal),
                  "; ".join(f"{c['steps']}-step student: {c['verdict']}" for c in equal) + ".")]
    pairs = [(f"the {plan[-1]}-step student within 5% of the guided teacher at {plan[0]} steps", last, teacher, 1.05),
             (f"the {plan[1]}-step student no worse than the guided teacher at {plan[0]} steps", first, teacher, 1.0),
             (f"the {plan[-1]}-step student ({last['nfe']} NFE) better than flow matching with {plan[0]} guided steps "
              f"({flow['nfe']} NFE)", last, flow, 1.0),
             (f"the Kac teacher better than flow matching at {plan[0]} guided steps (same network and training "
              f"budget)", teacher, flow, 1.0)]
    for claim, a, b, factor in pairs:
        difference = paired_rows(a, b, FD, factor=factor)
        scaled = f"{factor:g} x " if factor != 1 else ""
        text = (f"fd_digits {_title(a)} {_fd(a):.3f} vs {_title(b)} {_fd(b):.3f} (ratio x{_fd(a) / _fd(b):.3f}); "
                f"paired difference first minus {scaled}second {difference.describe(3, signed=True)} (holds when the "
                f"interval lies below 0).")
        out.append(_claim(claim, verdict(difference, "below"), text, difference=difference.to_dict(), factor=factor))
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
        "verdict": HOLDS if target_bounded and target_grows else FAILS, "holds": target_bounded and target_grows,
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
        "verdict": HOLDS if bounded and grows else FAILS, "holds": bounded and grows, "guided_bound": guided_bound,
        "trajectories": summary,
        "text": (f"{PROFILE_GRID} grid down to t = {kac['t_end']:.3g}, RMS |u| per coordinate at t = T -> last step: "
                 f"Kac teacher {kac['rms_start']:.3f} -> {kac['rms_end']:.3f} (max |u| {kac['max_abs']:.3f}; guided "
                 f"bound {guided_bound:g}: {'within' if bounded else 'exceeded'}); VP diffusion "
                 f"{vp['rms_start']:.3f} -> {vp['rms_end']:.3f} (max |u| {vp['max_abs']:.3f}; "
                 f"{'grows' if grows else 'does not grow'}: its learned RMS at the last step is "
                 f"x{vp['rms_end'] / vp_target['rms'][-1]:.2f} its conditional target's); flow matching "
                 f"{flow['rms_start']:.3f} -> {flow['rms_end']:.3f}.")}
    return [targets_claim, trajectories_claim]


# ------------------------------------------------------------------------------------ report files

def target_profiles(plan_steps: int, kac_path: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Conditional target velocities u*(x_t, t | x0) of the three paths on the held-out digits at the times
    of the velocity diagnostics (no network); the Kac path is the teacher's (``kac_path``, its config
    dict); deterministic (generator seed 0)."""
    images = digits_reference_images().double()
    times = time_grid(plan_steps, 1.0, PROFILE_GRID)[:-1].tolist()
    out = {}
    for kind in ("kac", "vp", "flow"):
        path = build_path(kac_path if kind == "kac" else {"kind": kind})
        profile = analytic_velocity_profile(path, images, times,
                                            torch.Generator().manual_seed(0))
        out[kind] = {**profile, "max_abs_all": max(profile["max_abs"])}
    return out


def build_report(outdir: Path, budget: dict[str, Any], parts: dict[str, dict[str, Any]], classifier,
                 calibration: dict[str, Any] | None, execution: dict[str, Any], start: float) -> dict[str, Any]:
    """Plots, report.json and report.md from the parts' records (``parts``: job name -> record) and the
    budget's (``dataclasses.asdict`` of the demo's budget)."""
    evals = [item for name, item in parts.items() if name.startswith("eval_")]
    profiles = {name.removeprefix("velocity_"): item for name, item in parts.items() if name.startswith("velocity_")}
    rows = sorted_rows([row for item in evals for row in item["rows"]])
    plot_metric_vs_nfe(rows, outdir / NFE_PLOT)
    kac_path = parts["train_teacher"]["config"]["path"]
    kac_c = float(kac_path["kac_c"])
    plot_velocity_profiles({f"{m.label} ({m.solver}, w={GUIDANCE:g})": profiles[m.key]["profile"] for m in TRAINED},
                           outdir / VELOCITY_PLOT, kac_c=kac_c)
    targets = target_profiles(budget["plan"][0], kac_path)
    plot_velocity_profiles({f"{kind} conditional target": targets[kind] for kind in ("kac", "flow", "vp")},
                           outdir / TARGETS_PLOT, kac_c=kac_c)
    closeness = {}
    for directory in student_dirs(outdir, budget["plan"]):
        closeness[directory.name] = json.loads((directory / "closeness.json").read_text(encoding="utf-8"))
    plot_closeness({f"{c['student_steps']}-step student vs its {c['teacher_steps']}-step teacher": c
                    for c in closeness.values()}, outdir / CLOSENESS_PLOT,
                   title="path closeness of every distillation stage")
    kac_bound = 1.0 + kac_c
    claims = findings(rows, budget["plan"], profiles, targets, kac_bound)
    goals = quality_targets(rows, budget["plan"], claims)
    timings = {name: {"seconds": item["seconds"], "reused": item["reused"], "finished_utc": item["finished_utc"]}
               for name, item in parts.items()}
    stage_cost = [{**stage, "teacher_steps": budget["plan"][stage["stage"] - 1],
                   "optimiser_steps": budget["distill_steps"][stage["stage"] - 1]}
                  for stage in parts["distill"]["stages"]]
    report = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "date_utc": utc_now(),
        "budget": budget,
        "guidance": GUIDANCE, "seed": SEED, "eval_precision": EVAL_PRECISION, "execution": execution,
        "thread_calibration": calibration,
        "environment": environment_record(), "timings": timings, "distillation_cost": stage_cost,
        "wall_seconds_this_run": round(time.perf_counter() - start, 2),
        "configs": {"teacher": parts["train_teacher"]["config"], "flow": parts["train_flow"]["config"],
                    "vp": parts["train_vp"]["config"], "distill": parts["distill"]["settings"]},
        "weights_sha256": {m.key: parts[f"train_{m.key}"]["weights_sha256"] for m in TRAINED},
        "digits_classifier": {"test_accuracy": float(classifier.test_accuracy)},
        "rows": rows, "findings": claims, "targets": goals, "closeness": {k: {"max": c["max"], "final": c["final"],
                                                            "teacher_steps": c["teacher_steps"],
                                                            "student_steps": c["student_steps"],
                                                            "num_samples": c["num_samples"]}
                                                        for k, c in closeness.items()},
        "velocity": {"trajectories": {k: v["profile"] for k, v in profiles.items()}, "targets": targets},
        "files": [NFE_PLOT, VELOCITY_PLOT, TARGETS_PLOT, CLOSENESS_PLOT, *[row["grid"] for row in rows]],
    }
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
        f"Every row is evaluated on {budget['eval_blocks']} disjoint seed blocks of {budget['eval_samples']} samples "
        f"(block b, image i: seed {report['seed']} + {budget['eval_samples']}·b + i, class i mod 10; the same seeds "
        f"and labels for every row), in {report['eval_precision']}; the table gives the mean over the blocks and "
        f"the half-width of its 95% t-interval. Guidance w = {report['guidance']:g} for the teacher and the "
        f"baselines (NFE = 2 x steps), baked into the students (NFE = steps); the teacher and the baselines also "
        f"run at half of each student's steps, so every student meets every guided sampler at its own NFE. "
        f"Metrics against the {reference_count} held-out digits: class accuracy of a small CNN (held-out accuracy "
        f"{report['digits_classifier']['test_accuracy']:.3f}), Fréchet distances in its 64-d features (fd_digits) "
        f"and in pixel space (fd_pixels). These are not FIDs. Lower fd is better.", "",
        _table(report["rows"]),
        "## Findings (computed)", "",
        "Rows are compared by paired differences over the seed blocks (95% t-interval); a comparison holds or "
        "fails only when its interval excludes the bound, else it is not resolved at this sample size.", "",
        *[f"- **{item['verdict']}** — {item['claim']}: {item['text']}" for item in report["findings"]], "",
        "## Targets", "",
        *[f"- **{item['verdict']}** — {item['claim']}: {item['text']}" for item in report["targets"]], "",
        "## Plots", "",
        f"Metric vs NFE (fd_digits, bars: 95% intervals over the seed blocks): ![metric vs NFE]({NFE_PLOT})", "",
        f"Velocity along the sampling trajectories ({budget['plan'][0]} steps on the {PROFILE_GRID} grid, each "
        f"model's own solver, "
        f"w = {report['guidance']:g}, {budget['profile_samples']} samples): ![velocity]({VELOCITY_PLOT})", "",
        f"Conditional target velocities on real digits (no network): ![targets]({TARGETS_PLOT})", "",
        f"Path closeness, teacher vs student from the same x_T, every stage ({budget['closeness_samples']} "
        f"samples): ![closeness]({CLOSENESS_PLOT})", "",
        "| stage | max RMS distance | final RMS distance |", "|---|---:|---:|",
        *[f"| {c['teacher_steps']} -> {c['student_steps']} | {c['max']:.4f} | {c['final']:.4f} |"
          for c in report["closeness"].values()], "",
        "## Samples (the first images of each row: the seeds and labels of the first block)", "",
        *[f"{ROW_TITLES[row_family(row)]}, {row['steps']} step(s): ![{row['grid']}]({row['grid']})  "
          for row in report["rows"]], "",
        "## Configuration and wall time per part", "",
        f"Teacher and baselines: digits preset network ({teacher['net']['model_channels']} channels, "
        f"multipliers {teacher['net']['channel_mult']}), {teacher['train']['steps']} steps of batch "
        f"{teacher['train']['batch']}, lr {teacher['optim']['lr']:g}, Kac a = {teacher['path']['kac_a']:g}, "
        f"c = {teacher['path']['kac_c']:g}. Distillation {plan}: {list(distill['steps_per_stage'])} steps per "
        f"stage, batch {distill['train']['batch']}, lr {distill['optim']['lr']:g}, start states "
        f"{distill['start_states']}.", "",
        "| part | what | seconds | when |", "|---|---|---:|---|",
        *[_part_line(name, timing, _part_description(name)) for name, timing in report["timings"].items()], "",
        *_stage_cost_lines(report["distillation_cost"], report["timings"]["train_teacher"]["seconds"],
                           distill["train"]["batch"]),
    ]
    calibration = report["thread_calibration"]
    if calibration:
        per_step = calibration["seconds_per_step"]
        lines += ["Thread choice (measured at the start of this run): one training step of the teacher network "
                  "(batch 128) took " + ", ".join(f"{v:.3f} s with {k} thread(s)" for k, v in per_step.items())
                  + f" (load average {calibration['load_average']}); the demo runs {execution['jobs']} processes "
                  f"with {execution['threads_per_process']} thread(s) each.", ""]
    return "\n".join(lines)


def _stage_cost_lines(stages: Sequence[dict[str, Any]], teacher_seconds: float, batch: int) -> list[str]:
    """The distillation's wall time per stage (training, the trajectory pool's teacher roll-outs and the
    path-closeness check), each also as a share of the teacher's training time."""
    total = sum(stage["seconds"] for stage in stages)
    return ["Distillation cost per stage (wall seconds of the stage: student training with its teacher's "
            f"targets and roll-outs, then the path-closeness check; batch {batch}); all stages together "
            f"{total:.0f} s = {total / teacher_seconds:.2f} x the teacher's training time:", "",
            "| stage | teacher -> student steps | optimiser steps | seconds | x teacher training |",
            "|---:|---|---:|---:|---:|",
            *[f"| {s['stage']} | {s['teacher_steps']} -> {s['student_steps']} | {s['optimiser_steps']} | "
              f"{s['seconds']:.1f} | {s['seconds'] / teacher_seconds:.2f} |" for s in stages], ""]


def _part_description(name: str) -> str:
    return {"train_teacher": "train the Kac teacher", "train_flow": "train the flow-matching baseline",
            "train_vp": "train the VP-diffusion baseline", "distill": "distil every stage (+ path closeness)"
            }.get(name, name.replace("_", " "))
