"""The NFE table's files: ``results.jsonl`` (one JSON row per model × steps × solver × guidance, appended
as each row is done) and what is drawn from it, ``table.md`` (each row's mean over its seed blocks with a
95% interval, and the paired differences of rows at equal NFE) and ``metric_vs_nfe.png`` (with error
bars); and the pairing of two rows' seed blocks that every comparison uses."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillkac.checkpoint import Artifact
from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_bytes
from distillkac.plotting import agg_pyplot, save_figure_png
from distillkac.stats import FAILS, HOLDS, NOT_RESOLVED, Interval, mean_interval, paired_difference, verdict

RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.md"
PLOT_FILE = "metric_vs_nfe.png"


def row_key(row: dict[str, Any]) -> tuple:
    """What makes two rows the same evaluation: model, steps, solver, guidance, metric, num, seed, reference,
    seed blocks and precision (rows written before blocks existed have one block and no precision)."""
    return (row["model_sha256"], int(row["steps"]), row["solver"], float(row["guidance"]), row["metric"],
            int(row["num"]), int(row["seed"]), _reference_sha(row), int(row.get("blocks", 1)), row.get("precision"))


def _reference_sha(row: dict[str, Any]) -> str | None:
    return (row.get("reference") or {}).get("stats_sha256")


def read_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``out/results.jsonl`` (none if it does not exist; a torn last line is ignored)."""
    file = Path(out) / RESULTS_FILE
    if not file.is_file():
        return []
    lines = file.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):  # (a torn last line, without a newline, is an interrupted append)
                raise DistillKacError(f"--out: {file} line {number} is not JSON ({err.msg}); fix or remove "
                                      f"that line") from err
    return rows


def append_result(out: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON line to ``out/results.jsonl`` and fsync; a torn last line (an append cut short)
    is cut off first."""
    file = Path(out) / RESULTS_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    file.touch()
    with open(file, "r+b") as handle:
        content = handle.read()
        if content and not content.endswith(b"\n"):
            handle.truncate(content.rfind(b"\n") + 1)
        handle.seek(0, os.SEEK_END)
        handle.write((json.dumps(row) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------ blocks and pairing

def block_values(row: dict[str, Any], key: str | None = None) -> list[float]:
    """The row's value of ``key`` (default: the tabulated value) on each seed block (a row written before
    blocks existed counts as one block)."""
    blocks = row.get("per_block") or [{"value": row["value"], "values": row.get("values", {})}]
    return [float(block["value"] if key is None else block["values"][key]) for block in blocks]


def row_interval(row: dict[str, Any], key: str | None = None) -> Interval:
    """Mean and 95% t-interval of the row's ``key`` (default: the tabulated value) over its seed blocks."""
    return mean_interval(block_values(row, key))


def seed_blocks(row: dict[str, Any]) -> tuple:
    """What two rows share when evaluated on the same seed blocks (same seeds, labels, metric, reference)."""
    return row.get("metric"), row.get("num"), row.get("seed"), int(row.get("blocks", 1)), _reference_sha(row)


def paired_rows(a: dict[str, Any], b: dict[str, Any], key: str | None = None, factor: float = 1.0) -> Interval:
    """The paired difference ``a - factor · b`` of two rows' ``key`` (default: the tabulated value), block by
    block (``distillkac.stats.paired_difference``)."""
    if seed_blocks(a) != seed_blocks(b):
        raise DistillKacError(f"rows {a['model']} and {b['model']}: not evaluated on the same seed blocks "
                              f"(metric, num, seed, blocks and reference must agree); they cannot be paired")
    return paired_difference(block_values(a, key), block_values(b, key), factor)


# ------------------------------------------------------------------------------------------- table

def _format_value(row: dict[str, Any], value: float | None = None) -> str:
    value = row["value"] if value is None else value
    return f"{value:.2f}" if row["metric"] == "fid" else f"{value:.4g}"


def _format_interval(row: dict[str, Any]) -> str:
    half = row_interval(row).half_width
    return f"± {_format_value(row, half)}" if math.isfinite(half) else "–"


def _samples(row: dict[str, Any]) -> str:
    blocks = int(row.get("blocks", 1))
    return f"{blocks} × {row['num']}" if blocks > 1 else str(row["num"])


def _details(row: dict[str, Any]) -> str:
    values = row.get("values", {})
    if row["metric"] == "digits":
        keys = (("class_accuracy", "class acc"), ("fd_pixels", "FD pixels"))
    elif row["metric"] == "toy2d":
        keys = (("log_likelihood", "log-lik"), ("reference_log_likelihood", "data log-lik"),
                ("mode_coverage", "coverage"), ("class_accuracy", "class acc"))
    else:
        keys = (("reference_count", "reference images"),)
    return ", ".join(f"{text} {values[key]:.4g}" for key, text in keys if values.get(key) is not None)


def _display_name(row: dict[str, Any]) -> str:
    return f"{row['model']} †" if row.get("kind") == Artifact.STUDENT else row["model"]


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the results (models in order of appearance, most steps first; the value is the
    mean over the seed blocks with its 95% t-interval), the paired differences of rows at equal NFE,
    then the skipped settings and what the student rows mean."""
    results = [row for row in rows if "skipped" not in row]
    order = {name: i for i, name in reversed(list(enumerate(row["model"] for row in rows)))}
    results.sort(key=lambda r: (order[r["model"]], r["metric"], -r["steps"], r["solver"], r["guidance"],
                                r["num"]))
    lines = ["| model | kind | steps | NFE | solver | guidance | metric | value | 95% interval | details | samples "
             "| precision | seconds |",
             "|---|---|---:|---:|---|---:|---|---:|---:|---|---:|---|---:|"]
    for row in results:
        lines.append(f"| {_display_name(row)} | {row.get('kind')} | {row['steps']} | {row['nfe']} | "
                     f"{row['solver']} | {row['guidance']:g} | {row['label']} | {_format_value(row)} | "
                     f"{_format_interval(row)} | {_details(row)} | {_samples(row)} | {row.get('precision', '–')} | "
                     f"{row['seconds']:.1f} |")
    notes = []
    if any(int(row.get("blocks", 1)) > 1 for row in results):
        notes.append("value: the mean over the seed blocks (block b: seeds S + b·num + i, labels i mod classes, "
                     "the same for every row); 95% interval: Student's t over the blocks.")
    if any(row.get("kind") == Artifact.STUDENT for row in results):
        notes.append("† distilled student: guidance baked in, evaluated only at its own step count with "
                     "Euler (NFE = steps); other requested steps/solvers/guidances are skipped for it.")
    skipped: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if "skipped" in row:
            combo = f"{row['steps']}/{row['solver']}/w={row['guidance']:g}"
            skipped.setdefault((row["model"], row["skipped"]), []).append(combo)
    for (model, reason), combos in skipped.items():
        notes.append(f"Skipped for {model} ({reason}): {', '.join(combos)}.")
    parts = ["\n".join(lines) + "\n", render_comparisons(results), "\n\n".join(notes) + "\n" if notes else ""]
    return "\n".join(part for part in parts if part)


def _setting(row: dict[str, Any]) -> str:
    return f"{_display_name(row)} {row['steps']}/{row['solver']}/w={row['guidance']:g}"


def render_comparisons(results: Sequence[dict[str, Any]]) -> str:
    """Every pair of rows with the same NFE evaluated on the same seed blocks (two or more), as the paired
    difference of the tabulated value (worse mean minus better mean) with its 95% interval and whether
    the better row is resolved as lower."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in results:
        if int(row.get("blocks", 1)) > 1:
            groups.setdefault((row["label"], row["nfe"], *seed_blocks(row)), []).append(row)
    lines = []
    for (label, nfe, *_), group in groups.items():
        for better, worse in itertools.combinations(sorted(group, key=lambda r: r["value"]), 2):
            difference = paired_rows(worse, better)
            outcome = {HOLDS: "lower", FAILS: "higher"}.get(verdict(difference, "above"), NOT_RESOLVED)
            lines.append(f"| {nfe} | {label} | {_setting(better)} | {_setting(worse)} | "
                         f"{difference.describe(4, signed=True)} | {outcome} |")
    if not lines:
        return ""
    return "\n".join(["Paired differences at equal NFE (same seed blocks; worse minus better, 95% interval over "
                      "the blocks; whether the better row is lower):", "",
                      "| NFE | metric | better | worse | difference | better is |", "|---:|---|---|---|---:|---|",
                      *lines]) + "\n"


# -------------------------------------------------------------------------------------------- plot

def _series_names(results: Sequence[dict[str, Any]]) -> dict[int, str]:
    """Each row's line: one per model × solver × guidance; the students form one line, "DistillKac
    students" (one per baked-in guidance weight when they differ)."""
    weights = {row["guidance"] for row in results if row.get("kind") == Artifact.STUDENT}
    return {id(row): f"{row['model']} {row['solver']} w={row['guidance']:g}" if row.get("kind") != Artifact.STUDENT
            else "DistillKac students" + (f" (w={row['guidance']:g})" if len(weights) > 1 else "") for row in results}


def plot_metric_vs_nfe(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """The tabulated value (mean over the seed blocks, with its 95% interval as an error bar) against NFE
    per sample (log x; log y when every value is positive), one line per model × solver × guidance (the
    students joined into one line), one panel per metric label."""
    plt = agg_pyplot()
    results = [row for row in rows if "skipped" not in row]
    if not results:
        raise DistillKacError("rows: no results to plot")
    names = _series_names(results)
    labels = list(dict.fromkeys(row["label"] for row in results))
    figure, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), dpi=100, squeeze=False)
    for label, axis in zip(labels, axes[0]):
        series: dict[str, list[tuple[int, float, float]]] = {}
        for row in results:
            if row["label"] == label:
                half = row_interval(row).half_width
                point = (row["nfe"], row["value"], half if math.isfinite(half) else 0.0)
                series.setdefault(names[id(row)], []).append(point)
        for name, points in series.items():
            nfes, values, halves = zip(*sorted(points))
            axis.errorbar(nfes, values, yerr=halves, marker="o", capsize=3, label=name)
        axis.set_xscale("log")
        if all(value > 0 for points in series.values() for _, value, _ in points):
            axis.set_yscale("log")  # the few-step rows of the teachers are ten times worse than the rest
            axis.yaxis.set_major_formatter(plt.ScalarFormatter())
            axis.yaxis.set_minor_formatter(plt.ScalarFormatter())
        nfes = sorted({row["nfe"] for row in results if row["label"] == label})
        axis.set_xticks(nfes, [str(n) for n in nfes])
        axis.xaxis.set_minor_locator(plt.NullLocator())
        axis.set_xlabel("NFE per sample")
        axis.set_ylabel(f"{label} (lower is better; bars: 95% interval)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure_png(figure, path)


def write_reports(out: str | os.PathLike, skipped: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """``table.md`` and ``metric_vs_nfe.png`` in ``out`` from every row of its results.jsonl (plus this
    run's ``skipped`` entries); returns the rows used."""
    rows = read_results(out) + [entry for entry in skipped if "skipped" in entry]
    atomic_write_bytes(Path(out) / TABLE_FILE, render_table(rows).encode("utf-8"))
    if any("skipped" not in row for row in rows):
        plot_metric_vs_nfe(rows, Path(out) / PLOT_FILE)
    return rows
