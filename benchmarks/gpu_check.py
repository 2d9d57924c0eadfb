"""The GPU check in one command: every benchmark at scale, then the whole pipeline, within a time budget.

Parts, in this order, each a child process with a time limit (a part that fails or runs out of time is
recorded and the next one starts); each part writes its results file as soon as it finishes, and
``summary.json`` + ``summary.md`` (measured figures beside the targets) are rewritten after every part,
so a run cut off at any point still leaves what it measured:

1. ``kac_sampler.py``: the Kac draw + target against a UNet forward+backward at batch 128;
2. ``train_throughput.py``: the five variants incl. the Kac-flow authors' configuration, MFU against
   the detected device's bf16 peak, peak memory, the Kac draw's share of the step;
3. ``sample_throughput.py``: images/s at 1, 4, 20 steps, the prior with batched per-image noise against
   the per-image loop, and 50,000 one-step images in bf16 and fp32;
4. ``pipeline_check.py``: reference statistics, a CIFAR-10 teacher for 3 minutes with FID-5k at two
   points, one distillation stage 100 -> 20 for 1 minute, its student sampled once (FID-5k); the
   teacher uses part 2's fastest variant without compile.
Designed to fit 8 minutes on one H100/H200 (``--budget-seconds``; the pipeline's 4 minutes of training
and its overheads, about 5.7 minutes in all, are reserved before the other parts get their time).
Files: ``--out`` gets the four results files, the summary and ``gpu_check.log`` (the parts' output);
runs and samples go to ``--work``.
``--smoke``: every part with tiny sizes on the CPU (about 2 minutes; ``tests/test_benchmarks.py``).
Run: ``python benchmarks/gpu_check.py --out DIR`` (from the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import pipeline_check  # noqa: E402

from distillkac.files import atomic_write_bytes, atomic_write_json  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Part:
    """A benchmark script run as one part of the check, with its options and time limits."""

    name: str
    script: str
    results_name: str
    gpu_options: tuple[str, ...]
    smoke_options: tuple[str, ...]
    cap_seconds: float  # its time limit
    reserve_seconds: float  # time kept for it while the parts before it run (GPU)

    def results_file(self, out: Path, device: str, smoke: bool) -> Path:
        return out / f"{self.results_name}_{device}{'_smoke' if smoke else ''}.json"


QUICK = ("--warmup", "0", "--repeat", "1")
PARTS = (
    Part("kac", "kac_sampler.py", "kac_sampler", (), (*QUICK, "--batch", "4", "--model-batch", "2"), 60, 20),
    Part("train", "train_throughput.py", "train_throughput", ("--warmup", "2", "--repeat", "6"),
         (*QUICK, "--batch", "2", "--variants", "fp32"), 150, 60),
    Part("sample", "sample_throughput.py", "sample_throughput",
         ("--steps", "1,4,20", "--batches", "2048", "--warmup", "1", "--repeat", "2"),
         (*QUICK, "--steps", "1", "--batches", "2", "--prior-images", "4", "--num-images", "4", "--full-batch", "2"),
         100, 40),
    Part("pipeline", "pipeline_check.py", pipeline_check.NAME, (), (), 420, 340),
)
TARGETS = {"kac_share_percent": 2.0, "mfu_percent": 35.0, "speedup": 3.0, "seconds_50k": 10.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="results directory (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None, help="the pipeline's runs and samples (default: a temp dir)")
    parser.add_argument("--device", default="cuda", help="the GPU (default: %(default)s; --smoke: the CPU)")
    parser.add_argument("--smoke", action="store_true", help="every part with tiny sizes on the CPU")
    parser.add_argument("--budget-seconds", type=float, default=480.0,
                        help="wall-clock budget of the GPU check (default: %(default)s)")
    parser.add_argument("--parts", default=",".join(part.name for part in PARTS),
                        help="comma-separated subset, run in the fixed order (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=pipeline_check.shared_file(pipeline_check.SHARED_DATA[0]),
                        help="the JPEG CIFAR-10 zip (default: %(default)s)")
    parser.add_argument("--inception", type=Path, default=pipeline_check.shared_file(pipeline_check.SHARED_DATA[1]),
                        help="Inception weights (default: %(default)s)")
    args = parser.parse_args(argv)
    names = args.parts.split(",")
    unknown = sorted(set(names) - {part.name for part in PARTS})
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(part.name for part in PARTS)}")
    args.selected = [part for part in PARTS if part.name in names]
    return args


def child_environment() -> dict[str, str]:
    """This checkout's ``src`` first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def teacher_variant(train_file: Path) -> list[str]:
    """Precision and channels-last of part 2's fastest variant without compile (its compile time would not
    pay off in a 3-minute run); nothing (the pipeline's defaults) if part 2 left no results."""
    if not train_file.is_file():
        return []
    rows = [row for row in json.loads(train_file.read_text())["results"]["rows"] if not row["compile"]]
    best = max(rows, key=lambda row: row["images_per_s"])
    return ["--precision", best["precision"], "--channels-last", best["channels_last"]]


def part_options(part: Part, args: argparse.Namespace, device: str, work: Path) -> list[str]:
    options = ["--device", device, "--out", str(args.out), *(part.smoke_options if args.smoke else part.gpu_options)]
    if part.name == "pipeline":
        options += ["--work", str(work), "--data", str(args.data), "--inception", str(args.inception)]
        train_file = PARTS[1].results_file(args.out, device.split(":")[0], False)
        options += ["--smoke"] if args.smoke else teacher_variant(train_file)
    elif args.smoke:
        options.append("--smoke")
    return options


def run_part(part: Part, options: list[str], timeout: float, log: Path) -> dict[str, Any]:
    """Run one part as a child process (its own process group, so that a timeout ends its workers too)."""
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as stream:
        stream.write(f"\n===== {part.name}: {part.script} {' '.join(options)} (limit {timeout:.0f} s)\n")
        stream.flush()
        child = subprocess.Popen([sys.executable, str(BENCHMARKS / part.script), *options], stdout=stream,
                                 stderr=subprocess.STDOUT, env=child_environment(), cwd=common.REPO_ROOT,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = f"timed out after {timeout:.0f} s"
    return {"name": part.name, "status": status, "seconds": time.perf_counter() - started, "limit_s": timeout}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = "cpu" if args.smoke else str(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="distillkac-gpu-check-"))
    log = args.out / "gpu_check.log"
    log.write_text("", encoding="utf-8")
    deadline = time.perf_counter() + args.budget_seconds
    summary: dict[str, Any] = {"orchestrator": common.environment(torch.device("cpu")), "device": device,
                               "smoke": args.smoke, "budget_seconds": args.budget_seconds, "parts": []}
    for index, part in enumerate(args.selected):
        started = time.time()
        if args.smoke:
            timeout = part.cap_seconds
        else:
            later = sum(other.reserve_seconds for other in args.selected[index + 1:])
            timeout = min(part.cap_seconds, deadline - time.perf_counter() - later)
        if timeout < 5:
            record = {"name": part.name, "status": "skipped: no time left in the budget", "seconds": 0.0}
        else:
            record = run_part(part, part_options(part, args, device, work), timeout, log)
        file = part.results_file(args.out, device.split(":")[0], args.smoke)
        record["results_file"] = file.name if file.is_file() and file.stat().st_mtime >= started - 1 else None
        summary["parts"].append(record)
        summary["figures"] = figures(args.out, summary["parts"])
        write_summary(args.out, summary)
        print(f"{part.name}: {record['status']} ({record['seconds']:.1f} s)", flush=True)
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    return summary


def figures(out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the targets are about, from the results files the parts of this run wrote."""
    results = {record["name"]: json.loads((out / record["results_file"]).read_text(encoding="utf-8"))["results"]
               for record in records if record["results_file"]}
    kac, train, sample, pipeline = (results.get(part.name) for part in PARTS)
    found: dict[str, Any] = {}
    if kac:
        found["kac_draw_percent_of_fwd_bwd"] = 100 * kac["ratio_draw_float32_to_unet"]
    if train:
        found["train_variants"] = [{key: row.get(key) for key in ("variant", "images_per_s", "speedup_vs_baseline",
                                                                 "mfu_percent", "peak_mib", "draw_share_percent")}
                                   for row in train["rows"]]
        found["train_best"], found["train_best_over_baseline"] = train["best"], train["best_over_baseline"]
    if sample:
        found["images_50k"] = [{key: run[key] for key in ("precision", "images", "seconds")}
                               for run in sample.get("full_runs", [])]
        found["prior_loop_over_batched"] = sample["prior_draw"]["loop_over_batched"]
    if pipeline:
        found["pipeline"] = pipeline_check.summary_text(pipeline)
    return found


def _format(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def target_rows(found: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    if "kac_draw_percent_of_fwd_bwd" in found:
        rows.append(("Kac draw + target, % of a UNet forward+backward at the same batch",
                     _format(found["kac_draw_percent_of_fwd_bwd"]), f"< {TARGETS['kac_share_percent']:g}"))
    for row in found.get("train_variants", []):
        rows.append((f"training `{row['variant']}`: images/s, x baseline, MFU %, peak MiB, Kac share %",
                     ", ".join(_format(row[key]) for key in ("images_per_s", "speedup_vs_baseline", "mfu_percent",
                                                             "peak_mib", "draw_share_percent")),
                     f"best >= {TARGETS['speedup']:g}x, MFU >= {TARGETS['mfu_percent']:g}, "
                     f"Kac < {TARGETS['kac_share_percent']:g}"))
    for run in found.get("images_50k", []):
        rows.append((f"{run['images']} one-step images, {run['precision']}, seconds", _format(run["seconds"]),
                     f"< {TARGETS['seconds_50k']:g} (50k)"))
    if "prior_loop_over_batched" in found:
        rows.append(("per-image prior: loop over generators / batched streams",
                     _format(found["prior_loop_over_batched"]), "> 1"))
    return rows


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out / "summary.json", summary)
    lines = [f"# GPU check ({summary['device']}{', smoke' if summary['smoke'] else ''})", "",
             "| part | status | seconds | results |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']:.1f} | {p['results_file'] or ''} |"
              for p in summary["parts"]]
    lines += ["", "| measured | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in target_rows(summary["figures"])]
    if "pipeline" in summary["figures"]:
        lines += ["", summary["figures"]["pipeline"]]
    atomic_write_bytes(out / "summary.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
