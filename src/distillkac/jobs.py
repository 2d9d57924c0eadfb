"""The steps of a pipeline as jobs: a named call that runs once the jobs it needs have finished.

``run_jobs`` runs them here, one after another in list order (``distillkac reproduce``: every step
takes all the GPUs), or side by side in spawned worker processes (``distillkac demo`` on a CPU: two
single-thread processes beat one process with two threads on 2 cores).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from distillkac.runtime import torch_threads


@dataclass(frozen=True)
class Job:
    """``function(*arguments)``, run once every job named in ``after`` has finished. With workers the
    function and its arguments must pickle (a module-level function)."""

    name: str
    function: Callable[..., Any]
    arguments: tuple = ()
    after: tuple[str, ...] = ()


def run_jobs(jobs: Sequence[Job], workers: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Every job's result by name. The list order is the priority: with ``workers > 1`` the earliest listed
    ready job starts first, at most ``workers`` at a time, each worker with ``threads`` torch threads; with
    one worker the jobs run here in list order (which must respect the dependencies) and the first failure
    stops the rest. ``threads=None`` leaves torch's thread count alone."""
    if workers <= 1:
        with torch_threads(threads):
            return _run_in_order(jobs)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=None if threads is None else torch.set_num_threads, initargs=(threads,))
    try:
        return _run_in_pool(pool, jobs, workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_in_order(jobs: Sequence[Job]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for job in jobs:
        missing = [name for name in job.after if name not in results]
        if missing:
            raise ValueError(f"job {job.name} is listed before its dependencies {missing}")
        results[job.name] = job.function(*job.arguments)
    return results


def _run_in_pool(pool: ProcessPoolExecutor, jobs: Sequence[Job], workers: int) -> dict[str, Any]:
    pending, running, results = list(jobs), {}, {}
    while pending or running:
        for job in [j for j in pending if all(name in results for name in j.after)]:
            if len(running) >= workers:
                break
            running[pool.submit(job.function, *job.arguments)] = job
            pending.remove(job)
        if not running:
            raise ValueError(f"jobs {[j.name for j in pending]} wait on jobs that never run")
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            results[running.pop(future).name] = future.result()
    return results
