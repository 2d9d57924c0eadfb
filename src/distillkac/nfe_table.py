"""The NFE table's files: ``results.jsonl`` (one JSON row per model × steps × solver × guidance, appended
as each row is done) and what is drawn from it, ``table.md`` and ``metric_vs_nfe.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillkac.checkpoint import Artifact
from distillkac.errors import DistillKacError
from distillkac.files import atomic_write_bytes
from distillkac.plotting import agg_pyplot, save_figure_png

RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.md"
PLOT_FILE = "metric_vs_nfe.png"


def row_key(row: dict[str, Any]) -> tuple:
    """What makes two rows the same evaluation: model, steps, solver, guidance, metric, num, seed, reference."""
    reference = row.get("reference") or {}
    return (row["model_sha256"], int(row["steps"]), row["solver"], float(row["guidance"]), row["metric"],
            int(row["num"]), int(row["seed"]), reference.get("stats_sha256"))


def read_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``out/results.jsonl`` (none if it does not exist; a torn last line is ignored)."""
    file = Path(out) / RESULTS_FILE
    if not file.is_file():
        return []
    text = file.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # the last line without a newline: an interrupted append
                continue
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



def _format_value(row: dict[str, Any]) -> str:
    value = row["value"]
    return f"{value:.2f}" if row["metric"] == "fid" else f"{value:.4g}"


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


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the results (models in order of appearance, most steps first), then the
    skipped settings and what the student rows mean."""
    results = [row for row in rows if "skipped" not in row]
    order = {name: i for i, name in reversed(list(enumerate(row["model"] for row in rows)))}
    results.sort(key=lambda r: (order[r["model"]], r["metric"], -r["steps"], r["solver"], r["guidance"],
                                r["num"]))
    lines = ["| model | kind | steps | NFE | solver | guidance | metric | value | details | samples "
             "| seconds |",
             "|---|---|---:|---:|---|---:|---|---:|---|---:|---:|"]
    for row in results:
        model = f"{row['model']} †" if row.get("kind") == Artifact.STUDENT else row["model"]
        lines.append(f"| {model} | {row.get('kind')} | {row['steps']} | {row['nfe']} | {row['solver']} | "
                     f"{row['guidance']:g} | {row['label']} | {_format_value(row)} | {_details(row)} | "
                     f"{row['num']} | {row['seconds']:.1f} |")
    notes = []
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
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n\n".join(notes) + "\n"
    return text


def _series_name(row: dict[str, Any]) -> str:
    if row.get("kind") == Artifact.STUDENT:
        teacher = (row.get("teacher_sha256") or "")[:8]
        return f"students of {teacher or '?'} (w={row['guidance']:g})"
    return f"{row['model']} {row['solver']} w={row['guidance']:g}"


def plot_metric_vs_nfe(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """The tabulated value against NFE per sample (log x), one line per model × solver × guidance
    (students of one teacher and guidance joined into one line), one panel per metric label."""
    plt = agg_pyplot()
    results = [row for row in rows if "skipped" not in row]
    if not results:
        raise DistillKacError("rows: no results to plot")
    labels = list(dict.fromkeys(row["label"] for row in results))
    figure, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), dpi=100, squeeze=False)
    for label, axis in zip(labels, axes[0]):
        series: dict[str, list[tuple[int, float]]] = {}
        for row in results:
            if row["label"] == label:
                series.setdefault(_series_name(row), []).append((row["nfe"], row["value"]))
        for name, points in series.items():
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        axis.set_xscale("log")
        nfes = sorted({row["nfe"] for row in results if row["label"] == label})
        axis.set_xticks(nfes, [str(n) for n in nfes])
        axis.xaxis.set_minor_locator(plt.NullLocator())
        axis.set_xlabel("NFE per sample")
        axis.set_ylabel(f"{label} (lower is better)")
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
