"""The NFE table (method.md §3, §6): a metric for every model × steps × solver × guidance, with its NFE.

One row per evaluated setting goes to ``OUT/results.jsonl`` (appended, so a rerun with the same ``out``
skips the rows already there); ``render_table`` and ``plot_metric_vs_nfe`` turn rows into
``table.md`` and ``metric_vs_nfe.png``.

* **NFE** per sample counts network evaluations: solver evaluations (``steps`` × 1 for Euler, AB-2 and
  DDIM, × 2 for Heun and midpoint), doubled when guidance is on (the conditional and the null label go
  through the network in one batched forward). A distilled student has its guidance baked in: it is
  evaluated only at its own step count, with Euler and its own guidance, at 1 NFE per step.
* **Seeds**: image ``i`` uses seed ``S + i`` and label ``i mod num_classes`` (sampling draws each
  image's prior from its own generator), so an image does not depend on the batch, nor on how the
  seeds are split between processes.
* **Several processes** (``torchrun``): image ``i`` goes to rank ``i mod world_size``
  (``shard_indices``). For FID every rank streams its images into feature moments (count, mean,
  centred scatter) and rank 0 merges them exactly (``Moments.merge``); for the small-data metrics the
  samples are gathered and put back in seed order. Only rank 0 writes results (each rank writes its own
  side file, below).
* **FID** never holds the images as floats: each generated batch is converted to uint8, goes through
  the Inception network and is folded into float64 moments before the next batch is drawn.
* **Resume inside a row**: with ``out``, every ``save_every`` batches each rank writes what it has so
  far (FID: its feature moments; digits/toy2d: its samples and labels) and how many images of its shard
  are done to ``OUT/.partial-<sha256 of the row key>-rank<r>of<w>.npz`` (atomically). A rerun continues
  from the next image; as image ``i`` depends only on its seed, the row is the one an uninterrupted run
  gives (bit for bit with the same ``batch_size``: the same batches go through the same operations).
  The side files are deleted once the row is in ``results.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from distillkac.checkpoint import RunLock, atomic_write_bytes, check_output_dir, load_artifact, read_artifact_meta
from distillkac.errors import DistillKacError
from distillkac.sampling import SampleResult, artifact_dir, sample_artifact
from distillkac.solvers import EVALUATIONS_PER_STEP, SOLVERS

METRICS = ("fid", "digits", "toy2d")
PRIMARY_VALUE = {"fid": "fid", "digits": "fd_digits", "toy2d": "sliced_wasserstein"}
"""The number each metric is tabulated and plotted by (lower is better for all three)."""
RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.md"
PLOT_FILE = "metric_vs_nfe.png"
DIGITS_SHAPE = [1, 8, 8]
TOY2D_SHAPE = [2]
DEFAULT_SAVE_EVERY = 20
"""Batches between two side-file saves of a row being computed."""


# ------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Setting:
    """One way of sampling a model: solver steps, solver, guidance weight."""

    steps: int
    solver: str
    guidance: float
    baked: bool = False
    """True for a student: its guidance is in its weights (one forward per evaluation)."""

    @property
    def evaluations(self) -> int:
        """Velocity evaluations per sample."""
        return self.steps * EVALUATIONS_PER_STEP[self.solver]

    @property
    def nfe(self) -> int:
        """Network evaluations per sample: evaluations, twice over when guided by batched CFG."""
        return self.evaluations * (2 if self.guidance != 0 and not self.baked else 1)

    def same_sampling(self, other: Setting) -> bool:
        return (self.steps, self.solver, self.guidance) == (other.steps, other.solver, other.guidance)

    def describe(self) -> str:
        return f"{self.steps} steps/{self.solver}/w={self.guidance:g}"


def nfe_per_sample(steps: int, solver: str, guidance: float) -> int:
    """NFE of one sample of a teacher or baseline (method.md §3)."""
    return Setting(steps, solver, float(guidance)).nfe


def plan_settings(meta: dict[str, Any], steps: Sequence[int], solvers: Sequence[str],
                  guidances: Sequence[float]) -> tuple[list[Setting], list[tuple[Setting, str]]]:
    """The settings to evaluate for a model and the requested ones it skips, each with the reason.

    A student gets exactly its own setting. A teacher or baseline gets every steps × solver × guidance
    combination except DDIM on a non-VP path and guidance on an unconditional model.
    """
    requested = [Setting(s, solver, float(w)) for s in steps for solver in solvers for w in guidances]
    if meta.get("kind") == "student":
        own = Setting(int(meta["steps"]), "euler", float(meta.get("guidance", 0.0)), baked=True)
        reason = (f"distilled student: evaluated only at its own {own.steps} steps with Euler and its "
                  f"baked-in guidance w={own.guidance:g}")
        return [own], [(setting, reason) for setting in requested if not setting.same_sampling(own)]
    keep, skipped = [], []
    path_kind = meta.get("path", {}).get("kind", "kac")
    for setting in requested:
        if setting.solver == "ddim" and path_kind != "vp":
            skipped.append((setting, f"DDIM needs the VP diffusion path; this is a {path_kind} model"))
        elif setting.guidance != 0 and int(meta["num_classes"]) == 0:
            skipped.append((setting, "unconditional model: guidance w != 0 does not apply"))
        else:
            keep.append(setting)
    return keep, skipped


# ------------------------------------------------------------------------------ processes and shards

def shard_indices(num: int, rank: int, world_size: int) -> range:
    """The image indices process ``rank`` of ``world_size`` generates: ``i ≡ rank (mod world_size)``.

    The shards of ranks ``0 … world_size-1`` are disjoint and together hold ``0 … num-1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistillKacError(f"rank {rank} / world size {world_size}: need 0 <= rank < world_size")
    if num < 0:
        raise DistillKacError(f"--num: must be >= 0, got {num}")
    return range(rank, num, world_size)


@dataclass
class ProcessGroup:
    """This process's rank among ``world_size`` evaluation processes (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def process_group_from_environment(device: str) -> tuple[ProcessGroup, torch.device]:
    """The torchrun process group (``WORLD_SIZE > 1``: joined here, one GPU per local rank) and the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from distillkac.train import init_distributed

        group, resolved = init_distributed(device)
        return ProcessGroup(group.rank, group.world_size), resolved
    from distillkac.metrics import resolve_device

    return ProcessGroup(), resolve_device(device)


# ------------------------------------------------------------------------------------ feature moments

@dataclass
class Moments:
    """Count, mean ``[D]`` and centred scatter ``Σ (f - m)(f - m)ᵀ`` ``[D, D]`` of feature rows (float64).

    Parts merge exactly (Chan et al.): ``N = Σ n_i``, ``m = Σ n_i m_i / N``,
    ``S = Σ S_i + Σ n_i (m_i - m)(m_i - m)ᵀ``, so the statistics do not depend on how the rows were
    split into batches or processes (up to float64 rounding).
    """

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def from_features(cls, features: torch.Tensor) -> Moments:
        rows = features.detach().to(torch.float64)
        if rows.dim() != 2:
            raise ValueError(f"features must be [N, D], got {list(rows.shape)}")
        if rows.shape[0] == 0:
            dim = rows.shape[1]
            return cls(0, rows.new_zeros(dim), rows.new_zeros((dim, dim)))
        mean = rows.mean(dim=0)
        centred = rows - mean
        return cls(rows.shape[0], mean, centred.T @ centred)

    @staticmethod
    def merge(parts: Sequence[Moments]) -> Moments:
        filled = [part for part in parts if part.count > 0]
        if not filled:
            if not parts:
                raise ValueError("Moments.merge needs at least one part")
            return parts[0]
        device = filled[0].mean.device
        counts = [part.count for part in filled]
        total = sum(counts)
        means = [part.mean.to(device) for part in filled]
        mean = sum(n * m for n, m in zip(counts, means)) / total
        scatter = sum(part.scatter.to(device) + n * torch.outer(m - mean, m - mean)
                      for part, n, m in zip(filled, counts, means))
        return Moments(total, mean, scatter)

    def to(self, device: torch.device | str) -> Moments:
        return Moments(self.count, self.mean.to(device), self.scatter.to(device))

    def stats(self):
        """``metrics.GaussianStats`` (covariance with divisor N - 1)."""
        from distillkac.metrics import GaussianStats

        if self.count < 2:
            raise DistillKacError(f"--num: FID needs at least 2 images, got {self.count}")
        sigma = self.scatter / (self.count - 1)
        sigma = (sigma + sigma.T) / 2
        return GaussianStats(self.mean.cpu().numpy(), sigma.cpu().numpy(), self.count)


# ---------------------------------------------------------------------------------------- metrics

class MetricContext:
    """What a metric needs besides the samples (reference statistics, Inception network, classifier,
    mixture), checked up front and built on first use."""

    def __init__(self, metric: str, *, ref: str | os.PathLike | None, inception_weights: str | None,
                 batch_size: int, device: torch.device, progress: bool) -> None:
        self.metric = metric
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.reference = None
        self._extractor = None
        self._digits = None
        if metric == "fid":
            from distillkac.metrics import (
                check_reference_compatible,
                inception_weights_id,
                load_reference,
                resolve_inception_weights,
            )

            if ref is None:
                raise DistillKacError("--ref: the fid metric needs reference statistics (an .npz from "
                                      "`distillkac ref`)")
            self.reference = load_reference(ref)
            self.weights_path = resolve_inception_weights(inception_weights)
            self.weights_id = inception_weights_id(self.weights_path)
            check_reference_compatible(self.reference, self.weights_id)

    def check_model(self, checkpoint: str, meta: dict[str, Any]) -> None:
        """Refuse a model whose data the metric does not apply to (before anything is generated)."""
        shape = [int(s) for s in meta["data_shape"]]
        classes = int(meta["num_classes"])
        if self.metric == "fid":
            from distillkac.metrics import check_reference_compatible

            if len(shape) != 3 or shape[0] not in (1, 3):
                raise DistillKacError(f"--metric fid: {checkpoint} makes data of shape {shape}, not images "
                                      f"[1 or 3, H, W]")
            check_reference_compatible(self.reference, self.weights_id, tuple(shape))
        elif self.metric == "digits" and (shape != DIGITS_SHAPE or classes not in (0, 10)):
            raise DistillKacError(f"--metric digits: {checkpoint} is not a digits model (data {shape}, "
                                  f"{classes} classes; need {DIGITS_SHAPE} and 10 or 0 classes)")
        elif self.metric == "toy2d" and (shape != TOY2D_SHAPE or classes not in (0, 16)):
            raise DistillKacError(f"--metric toy2d: {checkpoint} is not a model of the 4x4 grid mixture "
                                  f"(data {shape}, {classes} classes; need {TOY2D_SHAPE} and 16 or 0 "
                                  f"classes)")

    @property
    def reference_record(self) -> dict[str, Any] | None:
        if self.reference is None:
            return None
        meta = self.reference.meta
        dataset = meta.get("dataset", {})
        return {"path": self.reference.path, "stats_sha256": meta.get("stats_sha256"),
                "count": int(self.reference.stats.count), "split": meta.get("split"),
                "dataset": dataset.get("name") if isinstance(dataset, dict) else None}

    @property
    def extractor(self):
        if self._extractor is None:
            from distillkac.metrics import InceptionFeatures

            self._extractor = InceptionFeatures(self.weights_path, self.device, self.batch_size)
        return self._extractor

    def new_part(self) -> RowPart:
        """An empty part of a row for this process (what ``finish`` merges)."""
        if self.metric == "fid":
            return MomentsPart(self)
        return SamplesPart()

    def finish(self, parts: Sequence[dict[str, Any]], shards: Sequence[range], num_classes: int
               ) -> dict[str, Any]:
        """The metric's values from every process's part (``shards[r]``: the indices rank r made)."""
        if self.metric == "fid":
            from distillkac.metrics import fid_label, frechet_distance

            moments = Moments.merge([p["moments"] for p in parts if p["moments"] is not None])
            stats = moments.stats()
            reference = self.reference.stats
            return {"fid": frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma),
                    "num_images": stats.count, "label": fid_label(stats.count),
                    "reference_count": int(reference.count), "weights_sha256": self.weights_id}
        samples, labels = assemble_in_seed_order(parts, shards)
        if self.metric == "digits":
            from distillkac.metrics import digits_metrics

            classifier, reference = self._digits_tools()
            values = digits_metrics(samples, labels, classifier, reference)
            values["classifier_test_accuracy"] = float(classifier.test_accuracy)
        else:
            from distillkac.data import DataConfig, toy_mixture
            from distillkac.metrics import toy2d_metrics

            mixture = toy_mixture(DataConfig(name="toy2d", toy="grid"))
            values = toy2d_metrics(samples, labels if num_classes else None, mixture)
        return {**values, "label": PRIMARY_VALUE[self.metric]}

    def _digits_tools(self):
        if self._digits is None:
            from distillkac.data import DataConfig, load_dataset
            from distillkac.metrics import DigitsClassifier

            test = load_dataset(DataConfig(name="digits"), "test")
            reference, _ = test.get_batch(torch.arange(len(test)))
            self._digits = (DigitsClassifier.load_or_train(), reference)
        return self._digits


def assemble_in_seed_order(parts: Sequence[dict[str, Any]], shards: Sequence[range]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples and labels of all processes, put back at their image indices (seed order)."""
    pairs = [(shard, part) for shard, part in zip(shards, parts) if part["samples"] is not None]
    num = sum(len(shard) for shard, _ in pairs)
    first = pairs[0][1]
    samples = first["samples"].new_empty((num, *first["samples"].shape[1:]))
    labels = first["labels"].new_empty(num)
    for shard, part in pairs:
        index = torch.as_tensor(list(shard), dtype=torch.long)
        samples[index] = part["samples"]
        labels[index] = part["labels"]
    return samples, labels


# ---------------------------------------------------------------------------- row parts and side files

class MomentsPart:
    """FID: the feature moments of this process's images so far, folded in batch by batch on the
    metric's device (so a resumed row goes through the same float64 operations as an uninterrupted one)."""

    keys = ("count", "mean", "scatter")

    def __init__(self, context: MetricContext) -> None:
        self.context = context
        self.moments: Moments | None = None

    def add(self, result: SampleResult) -> None:
        from distillkac.metrics import to_uint8

        features = self.context.extractor(to_uint8(result.samples))
        batch = Moments.from_features(features).to(self.context.device)
        self.moments = batch if self.moments is None else Moments.merge([self.moments, batch])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.asarray(self.moments.count, dtype=np.int64), "mean": self.moments.mean.cpu().numpy(),
                "scatter": self.moments.scatter.cpu().numpy()}

    def restore(self, arrays: dict[str, np.ndarray], done: int) -> bool:
        """Take the moments of ``done`` images from a side file; False (nothing taken) if they do not fit."""
        mean, scatter = arrays["mean"], arrays["scatter"]
        if (int(arrays["count"]) != done or mean.dtype != np.float64 or scatter.dtype != np.float64
                or mean.ndim != 1 or scatter.shape != (mean.shape[0], mean.shape[0])):
            return False
        self.moments = Moments(done, torch.from_numpy(mean), torch.from_numpy(scatter)).to(self.context.device)
        return True

    def result(self) -> dict[str, Any]:
        return {"moments": None if self.moments is None else self.moments.to("cpu")}


class SamplesPart:
    """digits / toy2d: this process's samples and labels so far (on the CPU, in shard order)."""

    keys = ("samples", "labels")

    def __init__(self) -> None:
        self.samples: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, result: SampleResult) -> None:
        self.samples.append(result.samples.cpu())
        self.labels.append(result.labels.cpu())

    def arrays(self) -> dict[str, np.ndarray]:
        self.samples, self.labels = [torch.cat(self.samples)], [torch.cat(self.labels)]
        return {"samples": self.samples[0].numpy(), "labels": self.labels[0].numpy()}

    def restore(self, arrays: dict[str, np.ndarray], done: int) -> bool:
        """Take ``done`` samples and labels from a side file; False (nothing taken) if they do not fit."""
        samples, labels = arrays["samples"], arrays["labels"]
        if (samples.ndim < 2 or samples.shape[0] != done or samples.dtype.kind != "f" or labels.shape != (done,)
                or labels.dtype != np.int64):
            return False
        self.samples, self.labels = [torch.from_numpy(samples)], [torch.from_numpy(labels)]
        return True

    def result(self) -> dict[str, Any]:
        if not self.samples:
            return {"samples": None, "labels": None}
        return {"samples": torch.cat(self.samples), "labels": torch.cat(self.labels)}


RowPart = MomentsPart | SamplesPart
PARTIAL_PREFIX = ".partial-"


def _note(message: str) -> None:
    tqdm.write(f"distillkac: {message}", file=sys.stderr)


@dataclass(frozen=True)
class PartialRow:
    """The side file of one process's part of a row being computed: its part so far and how many images
    of its shard are done, with the row key, num, seed, rank and world size it belongs to."""

    path: Path
    key: str
    num: int
    seed: int
    rank: int
    world_size: int

    @classmethod
    def of(cls, out: str | os.PathLike, record: dict[str, Any], group: ProcessGroup) -> PartialRow:
        key = json.dumps(list(_row_key(record)))
        name = f"{_partial_stem(key)}-rank{group.rank}of{group.world_size}.npz"
        return cls(Path(out) / name, key, int(record["num"]), int(record["seed"]), group.rank, group.world_size)

    def _identity(self) -> tuple:
        return self.key, self.num, self.seed, self.rank, self.world_size

    def save(self, part: RowPart, done: int) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(self.key), num=np.asarray(self.num, dtype=np.int64),
                 seed=np.asarray(self.seed, dtype=np.int64), rank=np.asarray(self.rank, dtype=np.int64),
                 world_size=np.asarray(self.world_size, dtype=np.int64), done=np.asarray(done, dtype=np.int64),
                 **part.arrays())
        atomic_write_bytes(self.path, buffer.getvalue())

    def restore(self, part: RowPart, shard_size: int) -> int:
        """The images of this shard already done, put into ``part`` from the side file: 0 when there is
        none, or (with a note on stderr) when it belongs to other settings or cannot be read."""
        if not self.path.is_file():
            return 0
        from distillkac.metrics import read_npz

        try:
            arrays = read_npz(self.path, ("key", "num", "seed", "rank", "world_size", "done", *part.keys),
                              f"side file {self.path}")
            identity = (str(arrays["key"]), int(arrays["num"]), int(arrays["seed"]), int(arrays["rank"]),
                        int(arrays["world_size"]))
            done = int(arrays["done"])
            if identity == self._identity() and 0 < done <= shard_size and part.restore(arrays, done):
                _note(f"resuming from {self.path}: {done} of this process's {shard_size} images are done")
                return done
        except (DistillKacError, TypeError, ValueError):
            pass
        _note(f"{self.path} belongs to other settings or is unreadable; ignoring it (the row starts over)")
        return 0

    def remove(self, every_rank: bool) -> None:
        """Delete this side file (``every_rank``: also those of the row's other ranks and world sizes)."""
        self.path.unlink(missing_ok=True)
        if every_rank:
            for path in self.path.parent.glob(f"{_partial_stem(self.key)}-rank*.npz"):
                path.unlink(missing_ok=True)


def _partial_stem(key: str) -> str:
    return PARTIAL_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


# -------------------------------------------------------------------------------------- sampling

def sample_batches(model: nn.Module, meta: dict[str, Any], setting: Setting, *, indices: range, seed: int,
                   batch_size: int, device: torch.device, desc: str, progress: bool, done: int = 0
                   ) -> Iterator[SampleResult]:
    """Generate images ``indices[done:]`` (seed ``seed + i``, label ``i mod num_classes``) batch by batch."""
    num_classes = int(meta["num_classes"])
    is_student = meta.get("kind") == "student"
    with tqdm(total=len(indices), initial=done, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(done, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            labels = None if num_classes == 0 else torch.tensor([i % num_classes for i in chunk])
            result = sample_artifact((model, meta), seeds=[seed + i for i in chunk], labels=labels,
                                     steps=None if is_student else setting.steps,
                                     solver=None if is_student else setting.solver,
                                     guidance=None if is_student else setting.guidance,
                                     batch_size=len(chunk), device=device)
            if result.nfe_per_sample != setting.nfe:
                raise RuntimeError(f"NFE accounting: expected {setting.nfe} per sample for "
                                   f"{setting.describe()}, the sampler reports {result.nfe_per_sample}")
            bar.update(len(chunk))
            yield result


def evaluate_shard(model: nn.Module, meta: dict[str, Any], setting: Setting, context: MetricContext, *,
                   num: int, seed: int, rank: int, world_size: int, batch_size: int, device: torch.device,
                   desc: str = "sampling", partial: PartialRow | None = None,
                   save_every: int = DEFAULT_SAVE_EVERY) -> dict[str, Any]:
    """What process ``rank`` of ``world_size`` contributes to one row: ``{"moments": Moments}`` (FID) or
    ``{"samples", "labels"}`` (in shard order); ``None`` values for an empty shard.

    With ``partial``, the images its side file holds are not generated again, and the part so far is
    saved there every ``save_every`` batches.
    """
    indices = shard_indices(num, rank, world_size)
    part = context.new_part()
    done = partial.restore(part, len(indices)) if partial is not None else 0
    batches = sample_batches(model, meta, setting, indices=indices, seed=seed, batch_size=batch_size,
                             device=device, desc=desc, progress=context.progress, done=done)
    for number, result in enumerate(batches, start=1):
        part.add(result)
        done += result.samples.shape[0]
        if partial is not None and number % save_every == 0:
            partial.save(part, done)
    return part.result()


# -------------------------------------------------------------------------------------- results

def _row_key(row: dict[str, Any]) -> tuple:
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


# ------------------------------------------------------------------------------------- evaluation

def _check_arguments(checkpoints, steps, solvers, guidances, metric, num, batch_size, seed, save_every
                     ) -> None:
    if not checkpoints:
        raise DistillKacError("--checkpoint: give at least one model artefact")
    if metric not in METRICS:
        raise DistillKacError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise DistillKacError(f"--steps: need positive integers, got {list(steps)}")
    unknown = [s for s in solvers if s not in SOLVERS]
    if not solvers or unknown:
        raise DistillKacError(f"--solver: unknown solver {unknown[0] if unknown else None!r}; choose from "
                              f"{', '.join(SOLVERS)}")
    if not guidances or any(isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w)
                            for w in guidances):
        raise DistillKacError(f"--guidance: need finite numbers, got {list(guidances)}")
    minimum = 2 if metric != "toy2d" else 1
    if isinstance(num, bool) or not isinstance(num, int) or num < minimum:
        raise DistillKacError(f"--num: the {metric} metric needs at least {minimum} samples, got {num}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DistillKacError(f"--batch: must be a positive integer, got {batch_size}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DistillKacError(f"--seed: must be an integer >= 0, got {seed}")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise DistillKacError(f"--save-every: must be a positive number of batches, got {save_every}")


def _model_names(directories: Sequence[Path], metas: Sequence[dict[str, Any]]) -> list[str]:
    """Each model's folder name (the run's name for RUN/artifact), made unique with its hash if needed."""
    names = [d.parent.name if d.name == "artifact" else d.name for d in directories]
    return [f"{name}@{meta['weights_sha256'][:8]}" if names.count(name) > 1 else name
            for name, meta in zip(names, metas)]


def evaluate(checkpoints: Sequence[str | os.PathLike], steps: Sequence[int], solvers: Sequence[str],
             guidances: Sequence[float], metric: str, num: int, *, ref: str | os.PathLike | None = None,
             inception_weights: str | None = None, batch_size: int = 256, seed: int = 0,
             device: str | torch.device = "auto", out: str | os.PathLike | None = None, progress: bool = True,
             group: ProcessGroup | None = None, save_every: int = DEFAULT_SAVE_EVERY) -> list[dict[str, Any]]:
    """Evaluate every model at every planned setting; return one row per setting plus skip entries.

    Rows already in ``out/results.jsonl`` (same model sha256, steps, solver, guidance, metric, num,
    seed and reference statistics) are not recomputed: they come back from the file, marked
    ``"resumed": True``; new rows are appended
    there as soon as each is done (rank 0). A row being computed is saved every ``save_every`` batches
    to a side file in ``out`` (one per rank), from which a rerun continues it. Requested settings a
    model cannot use come back as entries with a ``"skipped"`` reason (never written to the file).
    Every input problem is found before any sample is drawn.
    """
    _check_arguments(checkpoints, steps, solvers, guidances, metric, num, batch_size, seed, save_every)
    if out is not None:
        check_output_dir(out, "--out")
    steps, solvers = list(dict.fromkeys(steps)), list(dict.fromkeys(solvers))
    guidances = list(dict.fromkeys(float(w) for w in guidances))
    if group is None:
        group, device = process_group_from_environment(str(device))
    elif isinstance(device, str):
        from distillkac.metrics import resolve_device

        device = resolve_device(device)
    context = MetricContext(metric, ref=ref, inception_weights=inception_weights, batch_size=batch_size,
                            device=device, progress=progress and group.is_main)
    directories = [artifact_dir(c) for c in checkpoints]
    metas = [read_artifact_meta(d) for d in directories]
    for checkpoint, meta in zip(checkpoints, metas):
        context.check_model(str(checkpoint), meta)
    names = _model_names(directories, metas)
    done = {_row_key(row): row for row in (read_results(out) if out is not None else [])}
    rows: list[dict[str, Any]] = []
    lock = RunLock(out) if out is not None and group.is_main else contextlib.nullcontext()
    with lock:
        for checkpoint, directory, meta, name in zip(checkpoints, directories, metas, names):
            settings, skipped = plan_settings(meta, steps, solvers, guidances)
            rows.extend(_skip_entry(name, meta, setting, metric, reason) for setting, reason in skipped)
            model = None
            for setting in settings:
                record = _row_base(name, checkpoint, meta, setting, metric, num, seed, context)
                if _row_key(record) in done:
                    rows.append({**done[_row_key(record)], "resumed": True})
                    if out is not None:  # left by a run stopped between the append and the clean-up
                        PartialRow.of(out, record, group).remove(every_rank=group.is_main)
                    continue
                if model is None:
                    model, meta = load_artifact(directory, device=device)
                partial = PartialRow.of(out, record, group) if out is not None else None
                row = _evaluate_row(model, meta, setting, context, record, group, device, batch_size,
                                    partial, save_every)
                if partial is not None:
                    if group.is_main:
                        append_result(out, row)
                    group.barrier()  # the row is in results.jsonl before any rank drops its side file
                    partial.remove(every_rank=group.is_main)
                rows.append(row)
    return rows


def _row_base(name: str, checkpoint, meta: dict[str, Any], setting: Setting, metric: str, num: int,
              seed: int, context: MetricContext) -> dict[str, Any]:
    row = {"model": name, "checkpoint": str(checkpoint), "kind": meta.get("kind"),
           "model_sha256": meta["weights_sha256"], "path": meta.get("path", {}).get("kind"),
           "steps": setting.steps, "nfe": setting.nfe, "evaluations": setting.evaluations,
           "solver": setting.solver, "guidance": setting.guidance, "metric": metric, "num": int(num),
           "seed": int(seed), "reference": context.reference_record}
    if meta.get("kind") == "student":
        row["teacher_sha256"] = meta.get("teacher_sha256")
        row["note"] = "student: own steps, Euler, baked-in guidance"
    return row


def _skip_entry(name: str, meta: dict[str, Any], setting: Setting, metric: str,
                reason: str) -> dict[str, Any]:
    return {"model": name, "kind": meta.get("kind"), "model_sha256": meta["weights_sha256"],
            "steps": setting.steps, "solver": setting.solver, "guidance": setting.guidance, "metric": metric,
            "skipped": reason}


def _evaluate_row(model: nn.Module, meta: dict[str, Any], setting: Setting, context: MetricContext,
                  record: dict[str, Any], group: ProcessGroup, device: torch.device, batch_size: int,
                  partial: PartialRow | None, save_every: int) -> dict[str, Any]:
    num, started = record["num"], time.perf_counter()
    part = evaluate_shard(model, meta, setting, context, num=num, seed=record["seed"], rank=group.rank,
                          world_size=group.world_size, batch_size=batch_size, device=device,
                          desc=f"{record['model']} {setting.describe()}", partial=partial, save_every=save_every)
    parts = group.gather(part)
    shards = [shard_indices(num, rank, group.world_size) for rank in range(group.world_size)]
    values = context.finish(parts, shards, int(meta["num_classes"]))
    label = values.pop("label")
    return {**record, "label": label, "value": float(values[PRIMARY_VALUE[record["metric"]]]),
            "values": values, "seconds": round(time.perf_counter() - started, 3),
            "world_size": group.world_size, "device": str(device)}


# ------------------------------------------------------------------------------------------ reports

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
        model = f"{row['model']} †" if row.get("kind") == "student" else row["model"]
        lines.append(f"| {model} | {row.get('kind')} | {row['steps']} | {row['nfe']} | {row['solver']} | "
                     f"{row['guidance']:g} | {row['label']} | {_format_value(row)} | {_details(row)} | "
                     f"{row['num']} | {row['seconds']:.1f} |")
    notes = []
    if any(row.get("kind") == "student" for row in results):
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
    if row.get("kind") == "student":
        teacher = (row.get("teacher_sha256") or "")[:8]
        return f"students of {teacher or '?'} (w={row['guidance']:g})"
    return f"{row['model']} {row['solver']} w={row['guidance']:g}"


def plot_metric_vs_nfe(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """The tabulated value against NFE per sample (log x), one line per model × solver × guidance
    (students of one teacher and guidance joined into one line), one panel per metric label."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillkac.checkpoint import atomic_write_bytes

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
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xlabel("NFE per sample")
        axis.set_ylabel(f"{label} (lower is better)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def write_reports(out: str | os.PathLike, skipped: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """``table.md`` and ``metric_vs_nfe.png`` in ``out`` from every row of its results.jsonl (plus this
    run's ``skipped`` entries); returns the rows used."""
    from distillkac.checkpoint import atomic_write_bytes

    rows = read_results(out) + [entry for entry in skipped if "skipped" in entry]
    atomic_write_bytes(Path(out) / TABLE_FILE, render_table(rows).encode("utf-8"))
    if any("skipped" not in row for row in rows):
        plot_metric_vs_nfe(rows, Path(out) / PLOT_FILE)
    return rows
