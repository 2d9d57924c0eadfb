"""The NFE table (method.md §3, §6): a metric for every model × steps × solver × guidance, with its NFE.

One row per evaluated setting goes to ``OUT/results.jsonl`` (appended, so a rerun with the same ``out``
skips the rows already there); ``nfe_table`` turns rows into ``table.md`` and ``metric_vs_nfe.png``.

* **NFE** per sample counts network evaluations: solver evaluations (``steps`` × 1 for Euler, AB-2 and
  DDIM, × 2 for Heun and midpoint), doubled when guidance is on (the conditional and the null label go
  through the network in one batched forward). A distilled student has its guidance baked in: it is
  evaluated only at its own step count, with Euler and its own guidance, at 1 NFE per step.
* **Seeds and blocks**: a row is evaluated on ``blocks`` disjoint seed blocks of ``num`` images; image
  ``i`` of block ``b`` uses seed ``S + b·num + i`` and label ``i mod num_classes`` (sampling draws each
  image's prior from its own generator), so an image does not depend on the batch, nor on how the
  seeds are split between processes, and every row sees the same seeds and labels. The row keeps each
  block's values (``per_block``), their means (``values``, ``value``) and the t-interval of the tabulated
  value over the blocks (``interval``, ``distillkac.stats``); rows are compared by paired differences.
* **Precision**: the network runs in ``precision`` (default fp32, also on CUDA, where torch's TF32
  settings apply; bf16 is autocast), recorded in the row.
* **Several processes** (``torchrun``): image ``i`` goes to rank ``i mod world_size``
  (``shard_indices``). For FID every rank streams its images into feature moments (count, mean,
  centred scatter) and rank 0 merges them exactly (``metrics.stats.Moments``); for the small-data
  metrics the samples are gathered and put back in seed order. Only rank 0 writes results (each rank writes its own
  side file, below).
* **FID** never holds the images as floats: each generated batch is converted to uint8, goes through
  the Inception network and is folded into float64 moments before the next batch is drawn.
* **Resume inside a row**: with ``out``, every ``save_every`` batches each rank writes what it has so
  far of the block being computed (FID: its feature moments; digits/toy2d: its samples and labels) and
  how many images of its shard are done to ``OUT/.partial-<sha256 of the row key and block>-rank<r>of<w>.npz``
  (atomically); each finished block's values go to ``OUT/.partial-<sha256 of the row key>-blocks.json``.
  A rerun skips the finished blocks and continues the current one from the next image; as image ``i``
  depends only on its seed, the row is the one an uninterrupted run gives (bit for bit with the same
  ``batch_size``: the same batches go through the same operations). The side files are deleted once the
  row is in ``results.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from distillkac import preemption
from distillkac.checkpoint import Artifact, Sampling, load_artifact, read_artifact_meta
from distillkac.errors import DistillKacError
from distillkac.fields import is_int, is_number, require
from distillkac.files import RunLock, atomic_write_json, check_output_dir, sha256_bytes
from distillkac.metrics.context import METRICS, PRIMARY_VALUE, MetricContext
from distillkac.nfe_table import append_result, read_results, row_key
from distillkac.npz import SideFile, note
from distillkac.preemption import Preempted
from distillkac.runtime import ProcessGroup, init_distributed, resolve_device, resolve_precision
from distillkac.sampling import SampleResult, sample_artifact
from distillkac.solvers import EVALUATIONS_PER_STEP, SOLVERS
from distillkac.stats import mean_interval

DEFAULT_SAVE_EVERY = 20
"""Batches between two side-file saves of a row being computed."""
DEFAULT_PRECISION = "fp32"
"""Evaluation runs the network in fp32 unless asked otherwise (metrics should not depend on autocast)."""
SIDE_FILE_PREFIX = ".partial-"


# ------------------------------------------------------------------------------------------- settings

class Setting(Sampling):
    """A way of sampling a model with its NFE accounting (a student's guidance is baked in: one forward)."""

    @property
    def evaluations(self) -> int:
        """Velocity evaluations per sample."""
        return self.steps * EVALUATIONS_PER_STEP[self.solver]

    @property
    def nfe(self) -> int:
        """Network evaluations per sample: evaluations, twice over when the network runs guided (batched CFG)."""
        return self.evaluations * (2 if self.forward_guidance != 0 else 1)

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
    baked = Artifact(meta).baked_sampling()
    if baked is not None:
        own = Setting(**asdict(baked))
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


def block_seed(seed: int, num: int, block: int) -> int:
    """The seed of image 0 of seed block ``block`` (blocks of ``num`` images follow each other)."""
    return seed + block * num


def row_side_file(out: str | os.PathLike, record: dict[str, Any], group: ProcessGroup, block: int = 0) -> SideFile:
    """This process's side file of block ``block`` of the row ``record`` (identified by the row key and block,
    num, seed, rank and world size)."""
    key, num = _key_text(record, block), int(record["num"])
    identity = {"key": key, "num": num, "seed": block_seed(int(record["seed"]), num, block), "rank": group.rank,
                "world_size": group.world_size}
    return SideFile(Path(out) / f"{_side_file_stem(key)}-rank{group.rank}of{group.world_size}.npz", identity)


def _key_text(record: dict[str, Any], *block: int) -> str:
    """The row key of ``record`` (with ``block``: of that seed block) as JSON text."""
    return json.dumps([*row_key(record), *block])


def _blocks_file(out: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Where rank 0 keeps the values of the row's finished blocks until the row is in results.jsonl."""
    return Path(out) / f"{_side_file_stem(_key_text(record))}-blocks.json"


def _finished_blocks(out: str | os.PathLike, record: dict[str, Any]) -> tuple[str | None, dict[int, dict[str, Any]]]:
    """(metric label, block -> its entry) of the blocks of ``record`` finished by an earlier run."""
    file = _blocks_file(out, record)
    if not file.is_file():
        return None, {}
    try:
        stored = json.loads(file.read_text(encoding="utf-8"))
        if stored["key"] == _key_text(record):
            return stored["label"], {int(entry["block"]): entry for entry in stored["blocks"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    note(f"{file} belongs to other settings or is unreadable; ignoring it")
    return None, {}


def _remove_side_files(out: str | os.PathLike, record: dict[str, Any], group: ProcessGroup) -> None:
    """Delete this rank's side files of the row ``record`` (rank 0: those of every rank and world size, and
    the finished blocks' file)."""
    for block in range(int(record["blocks"])):
        row_side_file(out, record, group, block).remove()
        if group.is_main:
            for path in Path(out).glob(f"{_side_file_stem(_key_text(record, block))}-rank*.npz"):
                path.unlink(missing_ok=True)
    if group.is_main:
        _blocks_file(out, record).unlink(missing_ok=True)


def _side_file_stem(key: str) -> str:
    return SIDE_FILE_PREFIX + sha256_bytes(key.encode("utf-8"))


# -------------------------------------------------------------------------------------- sampling

def sample_batches(model: nn.Module, meta: dict[str, Any], setting: Setting, *, indices: range, seed: int,
                   batch_size: int, device: torch.device, desc: str, progress: bool, done: int = 0,
                   precision: str = DEFAULT_PRECISION) -> Iterator[SampleResult]:
    """Generate images ``indices[done:]`` (seed ``seed + i``, label ``i mod num_classes``) batch by batch."""
    num_classes = int(meta["num_classes"])
    with tqdm(total=len(indices), initial=done, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(done, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            labels = None if num_classes == 0 else torch.tensor([i % num_classes for i in chunk])
            result = sample_artifact((model, meta), seeds=[seed + i for i in chunk], labels=labels,
                                     steps=setting.steps, solver=setting.solver, guidance=setting.guidance,
                                     batch_size=len(chunk), device=device, precision=precision)
            if result.nfe_per_sample != setting.nfe:
                raise RuntimeError(f"NFE accounting: expected {setting.nfe} per sample for "
                                   f"{setting.describe()}, the sampler reports {result.nfe_per_sample}")
            bar.update(len(chunk))
            yield result


def evaluate_shard(model: nn.Module, meta: dict[str, Any], setting: Setting, context: MetricContext, *,
                   num: int, seed: int, rank: int, world_size: int, batch_size: int, device: torch.device,
                   desc: str = "sampling", partial: SideFile | None = None,
                   save_every: int = DEFAULT_SAVE_EVERY, precision: str = DEFAULT_PRECISION) -> dict[str, Any]:
    """What process ``rank`` of ``world_size`` contributes to one row: ``{"moments": Moments}`` (FID) or
    ``{"samples", "labels"}`` (in shard order); ``None`` values for an empty shard.

    With ``partial``, the images its side file holds are not generated again, and the part so far is
    saved there every ``save_every`` batches. A stop signal (SIGTERM, SIGUSR1) ends it after the current
    batch: the part so far is saved and :class:`~distillkac.preemption.Preempted` raised.
    """
    indices = shard_indices(num, rank, world_size)
    part = context.new_part()
    done = 0
    if partial is not None:
        done, _ = partial.restore(part.keys, lambda arrays, saved: 0 < saved <= len(indices)
                                  and part.restore(arrays, saved))
        if done:
            note(f"resuming from {partial.path}: {done} of this process's {len(indices)} images are done")
    batches = sample_batches(model, meta, setting, indices=indices, seed=seed, batch_size=batch_size,
                             device=device, desc=desc, progress=context.progress, done=done, precision=precision)
    for number, result in enumerate(batches, start=1):
        part.add(result.samples, result.labels)
        done += result.samples.shape[0]
        stop = preemption.requested()
        if partial is not None and (number % save_every == 0 or stop):
            partial.save(done, part.arrays())
        if stop:
            kept = f"saved to {partial.path}" if partial is not None else "not saved (no output directory)"
            raise Preempted(f"stopped by {stop} after {done} of this process's {len(indices)} images of {desc}; "
                            f"the row so far is {kept}; rerun the same command to resume")
    return part.result()


# ------------------------------------------------------------------------------------- evaluation

def _check_arguments(checkpoints, steps, solvers, guidances, metric, num, batch_size, seed, save_every, blocks) -> None:
    if not checkpoints:
        raise DistillKacError("--checkpoint: give at least one model artefact")
    if metric not in METRICS:
        raise DistillKacError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not steps or not all(is_int(s) and s >= 1 for s in steps):
        raise DistillKacError(f"--steps: need positive integers, got {list(steps)}")
    unknown = [s for s in solvers if s not in SOLVERS]
    if not solvers or unknown:
        raise DistillKacError(f"--solver: unknown solver {unknown[0] if unknown else None!r}; choose from "
                              f"{', '.join(SOLVERS)}")
    if not guidances or not all(is_number(w) for w in guidances):
        raise DistillKacError(f"--guidance: need finite numbers, got {list(guidances)}")
    minimum = 2 if metric != "toy2d" else 1
    for flag, value, least, need in (("--num", num, minimum, f"the {metric} metric needs at least {minimum} samples"),
                                     ("--batch", batch_size, 1, "must be a positive integer"),
                                     ("--seed", seed, 0, "must be an integer >= 0"),
                                     ("--save-every", save_every, 1, "must be a positive number of batches"),
                                     ("--blocks", blocks, 1, "must be a positive number of seed blocks")):
        require(is_int(value) and value >= least, flag, need, value)


def _model_names(directories: Sequence[Path], metas: Sequence[dict[str, Any]]) -> list[str]:
    """Each model's folder name (the run's name for RUN/artifact), made unique with its hash if needed."""
    names = [d.parent.name if d.name == Artifact.DIR else d.name for d in directories]
    return [f"{name}@{meta['weights_sha256'][:8]}" if names.count(name) > 1 else name
            for name, meta in zip(names, metas)]


def evaluate(checkpoints: Sequence[str | os.PathLike], steps: Sequence[int], solvers: Sequence[str],
             guidances: Sequence[float], metric: str, num: int, *, ref: str | os.PathLike | None = None,
             inception_weights: str | None = None, batch_size: int = 256, seed: int = 0,
             device: str | torch.device = "auto", out: str | os.PathLike | None = None, progress: bool = True,
             group: ProcessGroup | None = None, save_every: int = DEFAULT_SAVE_EVERY, blocks: int = 1,
             precision: str = DEFAULT_PRECISION) -> list[dict[str, Any]]:
    """Evaluate every model at every planned setting on ``blocks`` seed blocks of ``num`` images; return one
    row per setting, plus an entry with a ``"skipped"`` reason (never written to the file) per requested
    setting a model cannot use.

    Rows already in ``out/results.jsonl`` (the same ``row_key``) are not recomputed: they come back from the
    file, marked ``"resumed": True``; new rows are appended as each is done (rank 0), and a row being computed
    continues from its side files (see the module). Every input problem is found before any sample is drawn.
    """
    _check_arguments(checkpoints, steps, solvers, guidances, metric, num, batch_size, seed, save_every, blocks)
    if out is not None:
        check_output_dir(out, "--out")
    steps, solvers = list(dict.fromkeys(steps)), list(dict.fromkeys(solvers))
    guidances = list(dict.fromkeys(float(w) for w in guidances))
    if group is None:
        group, device = init_distributed(device)
    elif isinstance(device, str):
        device = resolve_device(device)
    precision = resolve_precision(device, precision)
    context = MetricContext(metric, ref=ref, inception_weights=inception_weights, batch_size=batch_size,
                            device=device, progress=progress and group.is_main)
    directories = [Artifact.locate(c) for c in checkpoints]
    metas = [read_artifact_meta(d) for d in directories]
    for checkpoint, meta in zip(checkpoints, metas):
        context.check_model(str(checkpoint), meta)
    names = _model_names(directories, metas)
    done = {row_key(row): row for row in (read_results(out) if out is not None else [])}
    rows: list[dict[str, Any]] = []
    protocol = {"metric": metric, "num": int(num), "seed": int(seed), "blocks": blocks, "precision": precision}
    lock = RunLock(out) if out is not None and group.is_main else contextlib.nullcontext()
    with lock, preemption.preemptible():
        for checkpoint, directory, meta, name in zip(checkpoints, directories, metas, names):
            settings, skipped = plan_settings(meta, steps, solvers, guidances)
            rows.extend(_skip_entry(name, meta, setting, metric, reason) for setting, reason in skipped)
            model = None
            for setting in settings:
                record = _row_base(name, checkpoint, meta, setting, protocol, context)
                if row_key(record) in done:
                    rows.append({**done[row_key(record)], "resumed": True})
                    if out is not None:  # left by a run stopped between the append and the clean-up
                        _remove_side_files(out, record, group)
                    continue
                if model is None:
                    model, meta = load_artifact(directory, device=device)
                row = _evaluate_row(model, meta, setting, context, record, group, device, batch_size, out,
                                    save_every)
                if out is not None:
                    if group.is_main:
                        append_result(out, row)
                    group.barrier()  # the row is in results.jsonl before any rank drops its side files
                    _remove_side_files(out, record, group)
                rows.append(row)
    return rows


def _row_base(name: str, checkpoint, meta: dict[str, Any], setting: Setting, protocol: dict[str, Any],
              context: MetricContext) -> dict[str, Any]:
    row = {"model": name, "checkpoint": str(checkpoint), "kind": meta.get("kind"),
           "model_sha256": meta["weights_sha256"], "path": meta.get("path", {}).get("kind"),
           "steps": setting.steps, "nfe": setting.nfe, "evaluations": setting.evaluations,
           "solver": setting.solver, "guidance": setting.guidance, **protocol, "reference": context.reference_record}
    if Artifact(meta).is_student:
        row["teacher_sha256"] = meta.get("teacher_sha256")
        row["note"] = "student: own steps, Euler, baked-in guidance"
    return row


def _skip_entry(name: str, meta: dict[str, Any], setting: Setting, metric: str, reason: str) -> dict[str, Any]:
    return {"model": name, "kind": meta.get("kind"), "model_sha256": meta["weights_sha256"],
            "steps": setting.steps, "solver": setting.solver, "guidance": setting.guidance, "metric": metric,
            "skipped": reason}


def _evaluate_row(model: nn.Module, meta: dict[str, Any], setting: Setting, context: MetricContext,
                  record: dict[str, Any], group: ProcessGroup, device: torch.device, batch_size: int,
                  out: str | os.PathLike | None, save_every: int) -> dict[str, Any]:
    """Every seed block of the row (those an earlier run finished are taken from its blocks file), then
    the row: the blocks' entries, their mean values and the t-interval of the tabulated value."""
    num, blocks, started = record["num"], record["blocks"], time.perf_counter()
    label, finished = _finished_blocks(out, record) if out is not None else (None, {})
    if finished:
        note(f"{record['model']} {setting.describe()}: {len(finished)} of {blocks} seed blocks are done")
    shards = [shard_indices(num, rank, group.world_size) for rank in range(group.world_size)]
    for block in (b for b in range(blocks) if b not in finished):
        seed = block_seed(record["seed"], num, block)
        partial = row_side_file(out, record, group, block) if out is not None else None
        desc = f"{record['model']} {setting.describe()}" + (f" block {block + 1}/{blocks}" if blocks > 1 else "")
        part = evaluate_shard(model, meta, setting, context, num=num, seed=seed, rank=group.rank,
                              world_size=group.world_size, batch_size=batch_size, device=device, desc=desc,
                              partial=partial, save_every=save_every, precision=record["precision"])
        values = context.finish(group.gather(part), shards, int(meta["num_classes"]))
        label = values.pop("label")
        finished[block] = {"block": block, "seed": seed, "value": float(values[PRIMARY_VALUE[record["metric"]]]),
                           "values": values}
        if out is not None:
            if group.is_main:
                atomic_write_json(_blocks_file(out, record), {"key": _key_text(record), "label": label,
                                                              "blocks": list(finished.values())})
            group.barrier()  # the block is recorded before any rank drops its side file
            partial.remove()
    per_block = [finished[b] for b in range(blocks)]
    values = mean_values([entry["values"] for entry in per_block])
    interval = mean_interval([entry["value"] for entry in per_block])
    return {**record, "label": label, "value": float(values[PRIMARY_VALUE[record["metric"]]]), "values": values,
            "interval": interval.to_dict(), "per_block": per_block,
            "seconds": round(time.perf_counter() - started, 3), "world_size": group.world_size, "device": str(device)}


def mean_values(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The blocks' values with every number that differs between blocks replaced by its mean over them."""
    out = {}
    for key, first in blocks[0].items():
        column = [values.get(key) for values in blocks]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in column)
        out[key] = float(sum(column) / len(column)) if numeric and len(set(column)) > 1 else first
    return out
