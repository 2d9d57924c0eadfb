"""The whole CIFAR-10 pipeline at paper scale, in fixed wall-clock budgets: teacher, FID, distillation.

1. reference statistics of the 50,000 training images (``distillkac ref`` with the Inception weights given);
2. a ``--preset cifar10`` teacher (38M UNet, batch 128 in one micro-batch, the precision and
   channels-last given, no compile: its compile time would not pay off in minutes) trained for
   ``--teacher-seconds`` of training-loop time in two halves, each followed by an FID of
   ``--fid-samples`` guided AB-2 samples of ``--fid-steps`` steps against the train statistics;
3. one distillation stage 100 -> 20 (``distillkac distill --plan 100,20``) for ``--distill-seconds``,
   its student sampled once (FID as above).
A budget is met with step counts: a short calibration run measures images/s, then each segment runs the
steps its remaining seconds allow at the rate measured so far (``stats.jsonl``); the training-loop time
each segment really took is reported, and so are the overheads (data decoding, previews, checkpoints).
Results go to ``<out>/pipeline_<device>.json``, rewritten after every step, so a cut-off run leaves what
it finished; runs, samples and statistics go to ``--work``. ``--smoke``: a synthetic 40-image CIFAR-style
zip, a tiny UNet and seconds-long budgets on the CPU (FID only if the Inception weights are there).
Run: ``python benchmarks/pipeline_check.py --device cuda [--data ZIP --inception PTH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from distillkac.cli import main as cli_main  # noqa: E402
from distillkac.data import DataConfig, load_dataset  # noqa: E402
from distillkac.presets import get_preset  # noqa: E402
from distillkac.train import train_teacher  # noqa: E402

NAME = "pipeline"
SHARED_DATA = ("cifar10/cifar10_jpegq75.zip", "inception/pt_inception-2015-12-05-pool3-nanfc.pth")
SMOKE_NET = dataclasses.replace(common.SMOKE_UNET, resolution=32, attn_resolutions=(16,))
"""The smoke tests' tiny CIFAR-shaped UNet at the 32x32 resolution of CIFAR-10."""
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def shared_file(relative: str) -> Path:
    """``../shared/data/<relative>`` beside the checkout, else ``shared/data/<relative>`` inside it."""
    candidates = [root / "shared" / "data" / relative for root in (common.REPO_ROOT.parent, common.REPO_ROOT)]
    return next((path for path in candidates if path.exists()), candidates[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, tiny network, seconds-long budgets")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="directory of the results JSON")
    parser.add_argument("--work", type=Path, default=None, help="runs, samples, statistics (default: a temp dir)")
    parser.add_argument("--data", type=Path, default=shared_file(SHARED_DATA[0]),
                        help="the JPEG CIFAR-10 zip (default: %(default)s)")
    parser.add_argument("--inception", type=Path, default=shared_file(SHARED_DATA[1]),
                        help="Inception weights for FID (default: %(default)s)")
    parser.add_argument("--teacher-seconds", type=float, default=None, help="teacher training time (default: 180)")
    parser.add_argument("--distill-seconds", type=float, default=None, help="distillation time (default: 60)")
    parser.add_argument("--fid-samples", type=int, default=None, help="samples per FID (default: 5000)")
    parser.add_argument("--fid-steps", type=int, default=20, help="teacher AB-2 steps for FID (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG weight w (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="teacher precision (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--channels-last", choices=("on", "off"), default=None,
                        help="teacher memory format (default: on on a GPU, off on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the runs and samples (default: %(default)s)")
    return parser.parse_args(argv)


def tiny_cifar_zip(path: Path, per_class: int = 3, seed: int = 0) -> Path:
    """A CIFAR-style zip (``train/<class>/NNNN.jpg``, ``test/<class>/...``) of random 32x32 JPEGs."""
    generator = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for split, count in (("train", per_class), ("test", 1)):
            for name in CLASSES:
                for index in range(count):
                    pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
                    archive.writestr(f"{split}/{name}/{index:04d}.jpg", buffer.getvalue())
    return path


def cli(*argv: str) -> str:
    """``distillkac ARGV`` in this process (no interpreter start-up); its stdout; an error if it failed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            code = cli_main([str(part) for part in argv])
        except SystemExit as exit_:
            code = exit_.code
    if code not in (0, None):
        raise RuntimeError(f"distillkac {' '.join(map(str, argv))} exited with {code}")
    return stdout.getvalue()


def stats_rows(stats_file: Path, after_step: int) -> list[dict]:
    rows = [json.loads(line) for line in stats_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row["step"] > after_step and "images_per_s" in row]  # not closeness rows


def segment_record(stats_file: Path, start_step: int, call_seconds: float) -> dict:
    """A segment's steps, training-loop seconds and images/s (median of its log windows after the first)."""
    rows = stats_rows(stats_file, start_step)
    rates = [row["images_per_s"] for row in rows[1:]] or [row["images_per_s"] for row in rows]
    return {"from_step": start_step, "to_step": rows[-1]["step"], "train_seconds": rows[-1]["wall_s"],
            "images_per_s": statistics.median(rates), "call_seconds": call_seconds}


def steps_for(seconds: float, rate: float, batch: int) -> int:
    return max(1, round(seconds * rate / batch))


class Pipeline:
    def __init__(self, args: argparse.Namespace, device: torch.device, work: Path) -> None:
        self.args, self.device, self.work = args, device, work
        gpu = device.type == "cuda"
        self.batch = 128 if gpu else 8
        self.calibration = (50, 20) if gpu else (3, 2)  # teacher, distillation steps
        self.log_every = 10 if gpu else 1
        self.precision = args.precision or ("bf16" if gpu else "fp32")
        self.channels_last = args.channels_last or ("on" if gpu else "off")
        self.teacher_seconds = args.teacher_seconds or (180.0 if not args.smoke else 4.0)
        self.distill_seconds = args.distill_seconds or (60.0 if not args.smoke else 3.0)
        self.fid_samples = args.fid_samples or (5000 if not args.smoke else 10)
        self.fid_steps = args.fid_steps if not args.smoke else 2
        self.results: dict = {"skipped": None, "reference": None, "teacher": None, "distill": None}
        self.settings = {"batch": self.batch, "precision": self.precision, "channels_last": self.channels_last,
                         "teacher_seconds": self.teacher_seconds, "distill_seconds": self.distill_seconds,
                         "fid_samples": self.fid_samples, "fid_teacher_steps": self.fid_steps,
                         "guidance": args.guidance, "calibration_steps": self.calibration, "smoke": args.smoke,
                         "data": str(args.data), "inception": str(args.inception), "work": str(work)}

    def write(self) -> Path:
        name = f"{NAME}_{self.device.type}" + ("_smoke" if self.args.smoke else "")
        return common.write_results(name, self.args.out, self.device, self.settings, self.results,
                                    summary_text(self.results))

    def run(self) -> dict:
        data, inception = self.inputs()
        if data is None:
            self.write()
            return self.results
        started = time.perf_counter()
        if inception is not None:
            self.results["reference"] = {"file": str(self.work / "ref.npz")}
            cli("ref", "--dataset", "cifar10", "--data", data, "--split", "train", "--out", self.work / "ref.npz",
                "--inception-weights", inception, "--device", self.device, "--batch", 500, "--no-progress")
            self.results["reference"]["seconds"] = time.perf_counter() - started
            self.write()
        self.train_teacher(data, inception)
        self.distill(inception)
        return self.results

    def inputs(self) -> tuple[Path | None, Path | None]:
        args = self.args
        data = tiny_cifar_zip(self.work / "tiny_cifar10.zip") if args.smoke else args.data
        inception = args.inception if args.inception.is_file() else None
        if not data.is_file():
            self.results["skipped"] = f"no CIFAR-10 zip at {data}"
            return None, None
        if inception is None:
            if not args.smoke:
                self.results["skipped"] = f"no Inception weights at {args.inception}"
                return None, None
            self.settings["fid"] = f"skipped: no Inception weights at {args.inception}"
        return data, inception

    def teacher_config(self, data: Path, steps: int):
        preset = get_preset("cifar10")
        train = dataclasses.replace(preset.train, steps=steps, batch=self.batch, micro_batch=self.batch,
                                    precision=self.precision, channels_last=self.channels_last, compile=False,
                                    device=str(self.device), seed=self.args.seed, log_every=self.log_every,
                                    ckpt_every=steps, sample_every=steps,
                                    preview_steps=2 if self.args.smoke else preset.train.preview_steps)
        net = SMOKE_NET if self.args.smoke else preset.net
        return dataclasses.replace(preset, data=DataConfig(name="cifar10", path=str(data), hflip=True),
                                   net=net, train=train)

    def train_teacher(self, data: Path, inception: Path | None) -> None:
        run_dir = self.work / "teacher"
        started = time.perf_counter()
        dataset = load_dataset(DataConfig(name="cifar10", path=str(data), hflip=True), "train")
        teacher = self.results["teacher"] = {"run_dir": str(run_dir), "data_seconds": time.perf_counter() - started,
                                             "segments": [], "points": []}
        step, spent, rate = 0, 0.0, None
        for target_seconds in (None, self.teacher_seconds / 2, self.teacher_seconds):
            target = self.calibration[0] if rate is None else step + steps_for(target_seconds - spent, rate, self.batch)
            started = time.perf_counter()
            train_teacher(self.teacher_config(data, target), run_dir, progress=False, dataset=dataset)
            segment = segment_record(run_dir / "stats.jsonl", step, time.perf_counter() - started)
            teacher["segments"].append(segment)
            step, spent, rate = segment["to_step"], spent + segment["train_seconds"], segment["images_per_s"]
            teacher["train_seconds"] = spent
            if target_seconds is not None:
                point = {"step": step, "train_seconds": spent}
                teacher["points"].append(point)
                point.update(self.fid(run_dir, f"teacher-{step}", ["--steps", self.fid_steps, "--solver", "ab2",
                                                                  "--guidance", self.args.guidance], inception))
            self.write()

    def distill(self, inception: Path | None) -> None:
        outdir = self.work / "distill"
        stage_dir = outdir / "stage-20step"
        record = self.results["distill"] = {"outdir": str(outdir), "segments": []}
        step, spent, rate = 0, 0.0, None
        for _ in range(2):
            target = self.calibration[1] if rate is None else step + steps_for(self.distill_seconds - spent, rate,
                                                                                   self.batch)
            started = time.perf_counter()
            cli("distill", "--teacher", self.work / "teacher", "--outdir", outdir, "--plan", "100,20",
                "--steps-per-stage", target, "--batch", self.batch, "--micro-batch", self.batch,
                "--guidance", self.args.guidance, "--device", self.device, "--precision", self.precision,
                "--closeness-samples", 256 if not self.args.smoke else 2, "--log-every", self.log_every,
                "--ckpt-every", target, "--sample-every", target, "--seed", self.args.seed, "--no-progress")
            segment = segment_record(stage_dir / "stats.jsonl", step, time.perf_counter() - started)
            record["segments"].append(segment)
            step, spent, rate = segment["to_step"], spent + segment["train_seconds"], segment["images_per_s"]
            record.update(step=step, train_seconds=spent)
            self.write()
        record.update(self.fid(stage_dir, "student-20step", [], inception))
        self.write()

    def fid(self, checkpoint: Path, label: str, sample_options: list, inception: Path | None) -> dict:
        """Sample ``--fid-samples`` images (seeds 0...) and their FID against the train statistics."""
        samples = self.work / "samples" / label
        started = time.perf_counter()
        cli("sample", "--checkpoint", checkpoint, "--out", samples, "--num", self.fid_samples, "--seed", 0,
            "--batch", 1250 if self.device.type == "cuda" else 10, "--device", self.device, *sample_options)
        record = {"samples": str(samples / "samples.npz"), "sample_seconds": time.perf_counter() - started}
        if inception is not None:
            started = time.perf_counter()
            # `distillkac fid` reads the key "images"; `distillkac sample` writes "samples".
            with np.load(samples / "samples.npz") as arrays:
                np.savez(samples / "images.npz", images=arrays["samples"])
            output = cli("fid", "--images", samples / "images.npz", "--ref", self.work / "ref.npz",
                         "--inception-weights", inception, "--device", self.device, "--batch", 500, "--no-progress")
            result = json.loads(output.strip().splitlines()[-1])
            record.update(fid=result["fid"], fid_label=result["label"], fid_seconds=time.perf_counter() - started)
        return record


def summary_text(results: dict) -> str:
    """A Markdown table of the FID points (or why the pipeline was skipped)."""
    if results["skipped"]:
        return f"pipeline skipped: {results['skipped']}"
    rows = [{"model": "teacher (AB-2, guided)", **point} for point in (results.get("teacher") or {}).get("points", [])]
    distill = results.get("distill") or {}
    if "sample_seconds" in distill:
        rows.append({"model": "student 100 -> 20 (Euler, guidance baked in)", **distill})
    return common.format_table(rows, [("model", "model"), ("step", "steps"), ("train_seconds", "training s"),
                                      ("fid_label", "FID"), ("fid", "value"), ("sample_seconds", "sampling s")])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = common.device_from_args(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="distillkac-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(args, device, work)
    results = pipeline.run()
    written = pipeline.write()
    print(summary_text(results))
    print(f"wrote {written}")
    return results


if __name__ == "__main__":
    main()
