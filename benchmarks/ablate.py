"""Ablations of the digits demo: one factor at a time from the demo's defaults, each cell a paired difference.

    python benchmarks/ablate.py --outdir ablate-out [--quick] [--factors kac,start,...] [--jobs 2]

Every cell trains (or distils) what it changes from the demo's defaults (``distillkac.demo``: the digits
preset at the demo's budget, the digits distillation preset) and evaluates it on K disjoint seed blocks of
``num`` images (block b: seeds ``b·num .. (b+1)·num - 1``, labels cycling 0..9; the same for every cell), with
the digits Fréchet distance (``fd_digits``, lower is better). A cell is reported as its paired difference
against the default cell of its kind (teacher cells: the guided teacher at the plan's first step count;
distillation cells: each student) with a 95% t-interval over the blocks (``distillkac.stats``), and is called
better or worse only when the interval excludes zero.

Each training, distillation and cell evaluation is a job (``distillkac.jobs``) in its own spawned process with
one torch thread; all of them resume or are skipped on a rerun (cell results in ``OUTDIR/cells/*.json``). The
script writes ``docs/ablations.md``'s generated part (``--doc``) and ``benchmarks/results/ablations.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillkac.checkpoint import Artifact, load_artifact
from distillkac.demo import BUDGETS, DemoBudget, distill_settings, train_config
from distillkac.distill import plan_stages
from distillkac.files import atomic_write_json
from distillkac.jobs import Job, run_jobs
from distillkac.metrics.digits import DigitsClassifier, digits_metrics, digits_reference_images
from distillkac.report import FLOW, GUIDANCE, TEACHER
from distillkac.sampling import cycle_labels, sample_artifact
from distillkac.stages import run_distillation
from distillkac.stats import FAILS, HOLDS, mean_interval, paired_difference, verdict
from distillkac.train import train_teacher

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "benchmarks" / "results" / "ablations.json"
DOC_FILE = REPO_ROOT / "docs" / "ablations.md"
GENERATED_BEGIN, GENERATED_END = "<!-- ablate.py: generated below -->", "<!-- ablate.py: generated above -->"
METRIC = "fd_digits"


@dataclass(frozen=True)
class Size:
    """A demo budget to ablate at and the evaluation's seed blocks."""

    budget: DemoBudget
    blocks: int
    num: int


SIZES = {
    "full": Size(BUDGETS["full"], blocks=3, num=300),
    "quick": Size(dataclasses.replace(BUDGETS["full"], name="ablate-quick", plan=(20, 4, 2, 1), train_steps=150,
                                      train_batch=64, distill_steps=(40, 40, 40), distill_batch=32,
                                      closeness_samples=16, calibrate=False),
                  blocks=3, num=100),
    "smoke": Size(BUDGETS["tiny"], blocks=2, num=10),
}


@dataclass(frozen=True)
class Cell:
    """One variant: ``teacher`` changes to the teacher's RunConfig (dotted names), ``distill`` changes to the
    DistillConfig (``DistillConfig.with_changes`` names; a distillation cell when not None), ``guidance`` the
    evaluation's CFG weight of a teacher cell, ``path_kind`` a baseline path (flow matching, Euler)."""

    factor: str
    name: str
    teacher: tuple[tuple[str, Any], ...] = ()
    distill: tuple[tuple[str, Any], ...] | None = None
    guidance: float = GUIDANCE

    @property
    def slug(self) -> str:
        kind = "distill" if self.distill is not None else "teacher"
        return f"{kind}-{_key(self.teacher, self.distill, self.guidance)}"

    @property
    def is_default(self) -> bool:
        return self.factor == "default"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def teacher_key(changes: tuple[tuple[str, Any], ...]) -> str:
    return "default" if not changes else _key(changes)


# -------------------------------------------------------------------------------------------- factors

KAC_A = (0.5, 1.0, 2.25, 4.0, 9.0)
KAC_C = (0.5, 1.0, 1.5, 3.0)


def factor_cells(factor: str, base_teacher: tuple[tuple[str, Any], ...], budget: DemoBudget) -> list[Cell]:
    """The cells of one factor, each changing only that factor from the defaults."""
    t, steps = base_teacher, budget.distill_steps

    def teacher(name: str, **changes: Any) -> Cell:
        return Cell(factor, name, teacher=_merge(t, changes))

    def distill(name: str, **changes: Any) -> Cell:
        return Cell(factor, name, teacher=t, distill=tuple(sorted(changes.items())))

    table = {
        "kac": lambda: [teacher(f"a={a:g}, c={c:g}", **{"path.kac_a": a, "path.kac_c": c})
                        for a in KAC_A for c in KAC_C],
        "g_schedule": lambda: [teacher("g = quadratic", **{"path.g_schedule": "quadratic"})],
        "f_schedule": lambda: [teacher("f = cosine", **{"path.schedule": "cosine"})],
        "guidance": lambda: [Cell(factor, f"w = {w:g}", teacher=t, guidance=w)
                             for w in (0.0, 0.25, 0.5, 1.0, 2.0, 3.0) if w != GUIDANCE],
        "ema": lambda: [teacher(f"EMA half-life {h:,} images", **{"train.ema_halflife_images": h})
                        for h in (5_000, 80_000)],
        "init": lambda: [teacher("zero-init residual branches (ADM/EDM)", **{"net.zero_init": "residual"})],
        "flow": lambda: [Cell(factor, "flow matching (Euler), same network and budget",
                              teacher=_merge(tuple(p for p in t if not p[0].startswith("path.kac_")),
                                             {"path.kind": "flow"}))],
        "target": lambda: [distill("stage-1 target euler", target="euler"),
                           distill("ab2-restart (the paper's)", target="ab2-restart"),
                           distill("ab2-carried (roll-out start states)", target="ab2-carried",
                                   start_states="rollout")],
        "start": lambda: [distill("start states data (AB-2 restarted: the paper's)", start_states="data",
                                  target="ab2-restart"),
                          *[distill(f"start states {s}", start_states=s) for s in ("rollout", "mix")]],
        "dropout": lambda: [distill("student dropout 0.1", student_dropout=0.1)],
        "loss": lambda: [distill("velocity loss (endpoint / Δ²)", loss="velocity")],
        "steps": lambda: [distill("2x optimiser steps per stage", steps_per_stage=tuple(2 * s for s in steps)),
                          distill("stage 1 at 5x steps", steps_per_stage=(5 * steps[0], *steps[1:]))],
        "lr": lambda: [distill(f"lr {lr:g}", **{"optim.lr": lr}) for lr in (2.5e-4, 1e-3)],
    }
    return table[factor]()


FACTORS = ("kac", "flow", "g_schedule", "f_schedule", "guidance", "ema", "init", "target", "start", "dropout",
           "loss", "steps", "lr")
DISTILL_FACTORS = ("target", "start", "dropout", "loss", "steps", "lr")


def _merge(base: tuple[tuple[str, Any], ...], changes: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({**dict(base), **changes}.items()))


def parse_assignments(text: str | None) -> tuple[tuple[str, Any], ...]:
    """``"path.kac_a=1,path.kac_c=1"`` -> sorted ``((name, value), ...)`` (numbers parsed)."""
    if not text:
        return ()
    pairs = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            pairs[name.strip()] = json.loads(value)
        except ValueError:
            pairs[name.strip()] = value
    return tuple(sorted(pairs.items()))


def _settings(budget: DemoBudget, changes: tuple) -> Any:
    return distill_settings(budget).with_changes(dict(changes))


def plan_cells(factors: list[str], budget: DemoBudget, base_teacher: tuple, base_distill: tuple,
               kac_grid: list[tuple[float, float]] | None) -> list[Cell]:
    """The default cells (teacher; distillation when a distillation factor is asked for), then every factor's."""
    cells = [Cell("default", "default teacher", teacher=base_teacher)]
    if any(f in DISTILL_FACTORS for f in factors):
        cells.append(Cell("default", "default distillation", teacher=base_teacher, distill=base_distill))
    base_path = teacher_config(budget, base_teacher).path
    for factor in factors:
        for cell in factor_cells(factor, base_teacher, budget):
            if factor == "kac":
                pair = (dict(cell.teacher)["path.kac_a"], dict(cell.teacher)["path.kac_c"])
                if pair == (base_path.kac_a, base_path.kac_c) or (kac_grid is not None and pair not in kac_grid):
                    continue
            if cell.distill is not None:
                cell = dataclasses.replace(cell, distill=_merge(base_distill, dict(cell.distill)))
                if _settings(budget, cell.distill) == _settings(budget, base_distill):
                    continue
            if cell.slug not in {c.slug for c in cells}:
                cells.append(cell)
    return cells


# ----------------------------------------------------------------------------------------------- jobs

def _set(config: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _set(getattr(config, head), rest, value)})


def teacher_config(budget: DemoBudget, changes: tuple[tuple[str, Any], ...]):
    model = FLOW if dict(changes).get("path.kind") == "flow" else TEACHER
    config = train_config(budget, model)
    for name, value in changes:
        config = _set(config, name, value)
    return config.validate()


def teacher_dir(root: str, changes: tuple) -> Path:
    return Path(root) / "teachers" / teacher_key(changes)


def distill_dir(root: str, cell: Cell) -> Path:
    return Path(root) / "distill" / _key(cell.teacher, cell.distill)


def stage_dirs(root: str, cell: Cell, plan: tuple[int, ...]) -> list[tuple[int, Path]]:
    """(student steps, run directory) of each stage of the cell's distillation."""
    return [(stage.student_steps, distill_dir(root, cell) / stage.name) for stage in plan_stages(plan)]


def cell_file(root: str, cell: Cell) -> Path:
    """The cell's evaluation result (the cache a rerun reads)."""
    return Path(root) / "cells" / f"{cell.slug}.json"


def train_job(root: str, size: str, changes: tuple) -> float:
    start = time.perf_counter()
    train_teacher(teacher_config(SIZES[size].budget, changes), teacher_dir(root, changes), progress=False)
    return time.perf_counter() - start


def distill_job(root: str, size: str, cell: Cell) -> None:
    settings = _settings(SIZES[size].budget, cell.distill).validate()
    run_distillation(teacher_dir(root, cell.teacher), distill_dir(root, cell), settings, data="digits",
                     progress=False)


def stage_seconds(root: str, size: Size, cell: Cell) -> list[float | None]:
    """Training wall seconds of each stage (its stats.jsonl; the invocation that finished it)."""
    seconds = []
    for _, stage_dir in stage_dirs(root, cell, size.budget.plan):
        stats = stage_dir / "stats.jsonl"
        rows = [json.loads(line) for line in stats.read_text().splitlines()] if stats.is_file() else []
        walls = [row["wall_s"] for row in rows if "wall_s" in row]
        seconds.append(walls[-1] if walls else None)
    return seconds


def cell_rows(root: str, size: Size, cell: Cell) -> list[tuple[str, Path, dict[str, Any]]]:
    """(row name, artefact, sampling settings) of what the cell measures."""
    plan = size.budget.plan
    if cell.distill is None:
        solver = "euler" if dict(cell.teacher).get("path.kind") == "flow" else "ab2"
        return [("teacher", teacher_dir(root, cell.teacher) / Artifact.DIR,
                 {"steps": plan[0], "solver": solver, "guidance": cell.guidance})]
    return [(f"student-{m}", stage_dir / Artifact.DIR, {}) for m, stage_dir in stage_dirs(root, cell, plan)]


def eval_job(root: str, size_name: str, cell: Cell) -> dict[str, Any]:
    """Evaluate the cell's rows on every seed block (resumable: the result file is the cache)."""
    out = cell_file(root, cell)
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    size = SIZES[size_name]
    classifier, reference = DigitsClassifier.load_or_train(), digits_reference_images()
    labels = cycle_labels(size.num, 10)
    rows = {}
    for name, artifact, sampling in cell_rows(root, size, cell):
        model = load_artifact(artifact, device="cpu")  # once for all the blocks
        blocks = []
        for block in range(size.blocks):
            seeds = range(block * size.num, (block + 1) * size.num)
            samples = sample_artifact(model, seeds=seeds, labels=labels, device="cpu", **sampling).samples
            blocks.append(digits_metrics(samples, labels, classifier, reference))
        rows[name] = {METRIC: [b[METRIC] for b in blocks], "class_accuracy": [b["class_accuracy"] for b in blocks],
                      "sampling": sampling}
    result = {"cell": dataclasses.asdict(cell), "slug": cell.slug, "rows": rows}
    atomic_write_json(out, result)
    return result


def ablation_jobs(root: str, size: str, cells: list[Cell]) -> list[Job]:
    """In cell order, each cell's training (or distillation) and then its evaluation, so that a run stopped
    early has finished whole cells; a training or distillation that several cells share runs once."""
    jobs: dict[str, Job] = {}
    for cell in cells:
        key = teacher_key(cell.teacher)
        jobs.setdefault(f"train:{key}", Job(f"train:{key}", train_job, (root, size, cell.teacher)))
        after = f"train:{key}"
        if cell.distill is not None:
            name = f"distill:{distill_dir(root, cell).name}"
            jobs.setdefault(name, Job(name, distill_job, (root, size, cell), (after,)))
            after = name
        jobs[f"eval:{cell.slug}"] = Job(f"eval:{cell.slug}", eval_job, (root, size, cell), (after,))
    return list(jobs.values())


# ---------------------------------------------------------------------------------------------- report

def finished_cells(root: str, cells: list[Cell]) -> dict[str, Any]:
    """The evaluation results that exist (``--report-only``)."""
    files = {cell.slug: cell_file(root, cell) for cell in cells}
    return {f"eval:{slug}": json.loads(path.read_text(encoding="utf-8")) for slug, path in files.items()
            if path.is_file()}


def summarise(root: str, size: Size, cells: list[Cell], results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each evaluated cell's rows: mean ± interval, and the paired difference against its default cell."""
    defaults = {c.distill is None: results.get(f"eval:{c.slug}") for c in cells if c.is_default}
    summary = []
    for cell in cells:
        if f"eval:{cell.slug}" not in results:
            continue
        result, reference = results[f"eval:{cell.slug}"], defaults.get(cell.distill is None)
        rows = []
        for name, row in result["rows"].items():
            entry = {"row": name, "blocks": row[METRIC], "value": mean_interval(row[METRIC]).to_dict(),
                     "class_accuracy": sum(row["class_accuracy"]) / len(row["class_accuracy"])}
            if reference is not None and not cell.is_default and name in reference["rows"]:
                difference = paired_difference(row[METRIC], reference["rows"][name][METRIC])
                entry["difference"] = difference.to_dict()
                entry["verdict"] = {HOLDS: "better", FAILS: "worse"}.get(verdict(difference, "below"),
                                                                          "not resolved")
            rows.append(entry)
        summary.append({"factor": cell.factor, "name": cell.name, "slug": cell.slug, "teacher": dict(cell.teacher),
                        "distill": dict(cell.distill) if cell.distill is not None else None,
                        "guidance": cell.guidance, "rows": rows,
                        "distill_seconds": stage_seconds(root, size, cell) if cell.distill is not None else None})
    return summary


def _fmt(interval: dict[str, Any], signed: bool = False) -> str:
    mean = f"{interval['mean']:+.2f}" if signed else f"{interval['mean']:.2f}"
    return mean if interval["half_width"] is None else f"{mean} ± {interval['half_width']:.2f}"


def _base(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in changes.items()) or "none"


def markdown(summary: list[dict[str, Any]], record: dict[str, Any], section: str) -> str:
    lines = [f"## {section}", "",
             f"Generated by `{record['command']}` on {record['date']} ({record['size']} size: "
             f"{record['blocks']} seed blocks x {record['num']} images, metric `{METRIC}`, lower is better; "
             f"wall {record['wall_seconds']:.0f} s, load average {record['load_average'][0]:.1f}). Defaults: the "
             f"digits demo's (Kac a = {record['default_path']['kac_a']:g}, c = {record['default_path']['kac_c']:g}), "
             f"with teacher changes: {_base(record['base_teacher'])}; distillation changes: "
             f"{_base(record['base_distill'])}.", "",
             "| factor | variant | row | fd_digits (mean ± 95%) | paired Δ vs default (± 95%) | verdict |",
             "|---|---|---|---:|---:|---|"]
    for cell in summary:
        for row in cell["rows"]:
            difference = _fmt(row["difference"], signed=True) if "difference" in row else "–"
            lines.append(f"| {cell['factor']} | {cell['name']} | {row['row']} | {_fmt(row['value'])} | "
                         f"{difference} | {row.get('verdict', '–')} |")
    lines += targets(summary)
    costs = [c for c in summary if c["distill_seconds"]]
    if costs:
        lines += ["", "Distillation cost (training wall seconds per stage, one thread, shared CPU):", "",
                  "| variant | " + " | ".join(f"stage {i + 1}" for i in range(len(costs[0]["distill_seconds"])))
                  + " |", "|---|" + "---:|" * len(costs[0]["distill_seconds"])]
        seen = set()
        for cell in costs:
            key = json.dumps(cell["distill"], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"| {cell['name']} | " + " | ".join(
                "–" if s is None else f"{s:.0f}" for s in cell["distill_seconds"]) + " |")
    return "\n".join(lines) + "\n"


def targets(summary: list[dict[str, Any]]) -> list[str]:
    """The issue's targets among this run's default cells (same seed blocks): student vs teacher, Kac vs flow."""
    rows = {}
    for cell in summary:
        if cell["factor"] in ("default", "flow"):
            for row in cell["rows"]:
                rows["flow" if cell["factor"] == "flow" else row["row"]] = row["blocks"]
    students = sorted((r for r in rows if r.startswith("student-")), key=lambda r: -int(r.split("-")[1]))
    claims = []
    if "teacher" in rows and "flow" in rows:
        claims.append(("Kac teacher better than flow matching (100 guided steps each)", rows["teacher"],
                       rows["flow"], 1.0))
    if "teacher" in rows:
        claims += [(f"{s.split('-')[1]}-step student within 5% of the teacher (Δ = student - 1.05 x teacher)",
                    rows[s], rows["teacher"], 1.05) for s in students[-1:]]
        claims += [(f"{s.split('-')[1]}-step student no worse than the teacher", rows[s], rows["teacher"], None)
                   for s in students[:1]]
    if "flow" in rows:
        claims += [(f"{s.split('-')[1]}-step student better than flow matching at 100 guided steps", rows[s],
                    rows["flow"], 1.0) for s in students[-1:]]
    if not claims:
        return []
    lines = ["", "Targets among these cells (paired over the same seed blocks; holds when the 95% interval of Δ "
             "lies below 0):", "", "| claim | Δ (± 95%) | verdict |", "|---|---:|---|"]
    for claim, a, b, factor in claims:
        difference = paired_difference(a, b, factor=factor or 1.0)
        if factor is None:
            outcome = FAILS if difference.low > 0 else HOLDS + (" (better)" if difference.high < 0 else
                                                                " (no significant difference)")
        else:
            outcome = verdict(difference, "below")
        lines.append(f"| {claim} | {_fmt(difference.to_dict(), signed=True)} | {outcome} |")
    return lines


def write_doc(doc: Path, section: str, text: str) -> None:
    """Replace (or append) the generated section called ``section`` in ``doc``."""
    begin, end = f"{GENERATED_BEGIN} {section}", f"{GENERATED_END} {section}"
    current = doc.read_text(encoding="utf-8") if doc.is_file() else "# Ablations\n"
    block = f"{begin}\n{text}{end}\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(current, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", type=Path, required=True, help="work directory (runs, cells); reruns resume")
    parser.add_argument("--quick", action="store_true", help="short trainings and 3 blocks of 100 images")
    parser.add_argument("--smoke", action="store_true", help="seconds: checks that the script runs (numbers mean "
                        "nothing)")
    parser.add_argument("--factors", default=",".join(FACTORS), help="comma-separated subset of: "
                        + ", ".join(FACTORS) + " (default: all)")
    parser.add_argument("--kac-grid", default=None,
                        help="only these (a:c) pairs of the Kac grid, e.g. 1:1,2.25:1 (default: the full grid)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: report the cells evaluated so far")
    parser.add_argument("--cells", default=None, help="only the variants whose name contains one of these "
                        "comma-separated strings (the default cells always run)")
    parser.add_argument("--teacher", default=None, help="base teacher changes, e.g. path.kac_a=1,path.kac_c=1")
    parser.add_argument("--distill", default=None, help="base distillation changes, e.g. start_states=rollout")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--section", default=None, help="name of the generated section of docs/ablations.md "
                        "(default: the size)")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="results JSON (merged by section)")
    parser.add_argument("--doc", type=Path, default=DOC_FILE, help="Markdown file to update")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    size_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[size_name]
    factors = [f.strip() for f in args.factors.split(",") if f.strip()]
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown:
        print(f"ablate.py: unknown factor(s) {unknown}; choose from {', '.join(FACTORS)}", file=sys.stderr)
        return 2
    grid = None if args.kac_grid is None else [tuple(float(v) for v in p.split(":")) for p in args.kac_grid.split(",")]
    base_teacher, base_distill = parse_assignments(args.teacher), parse_assignments(args.distill)
    cells = plan_cells(factors, size.budget, base_teacher, base_distill, grid)
    if args.cells:
        wanted = [w.strip() for w in args.cells.split(",")]
        cells = [c for c in cells if c.is_default or any(w in c.name for w in wanted)]
    start = time.perf_counter()
    if args.report_only:
        results = finished_cells(str(args.outdir), cells)
    else:
        results = run_jobs(ablation_jobs(str(args.outdir), size_name, cells), workers=args.jobs, threads=1)
    section = args.section or size_name
    record = {"command": "python benchmarks/ablate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "size": size_name,
              "blocks": size.blocks, "num": size.num, "budget": dataclasses.asdict(size.budget),
              "wall_seconds": time.perf_counter() - start, "torch": torch.__version__,
              "load_average": list(os.getloadavg()), "base_teacher": dict(base_teacher),
              "base_distill": dict(base_distill),
              "default_path": dataclasses.asdict(teacher_config(size.budget, base_teacher).path)}
    summary = summarise(str(args.outdir), size, cells, results)
    stored = json.loads(args.results.read_text(encoding="utf-8")) if args.results.is_file() else {}
    stored[section] = {**record, "cells": summary}
    atomic_write_json(args.results, stored)
    text = markdown(summary, record, section)
    write_doc(args.doc, section, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
