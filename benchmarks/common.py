"""Shared machinery of the benchmarks: interleaved timing of configurations, each in its own process.

Every configuration lives in a child process of its own (``spawn``), built once and then stepped on
command: the parent runs round after round (A, B, A, B, ...), so a slow phase of a noisy machine hits
every configuration alike, and only one of them computes at any time. Each child also reports its own
peak memory: the peak resident set size on CPU (``ru_maxrss``: model, optimiser and activations, as a
user sees it), ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "METHODS",
    "Worker",
    "add_run_arguments",
    "device_description",
    "interleave",
    "print_results",
    "run_configurations",
    "step_options",
    "summarise",
    "write_report",
]


# the step benchmarks' methods and the masking each runs (no import of the package here: see versions_step.py)
METHODS = {"spark": "random", "anatomask": "anatomask"}


def device_description() -> str:
    """The device the benchmarks run on, in words (GPU name, or CPU model and core count)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def _serve(conn, builder: Callable[..., Callable[[], Any]], kwargs: dict) -> None:
    try:
        step = builder(**kwargs)
        conn.send(("ready", None))
        while True:
            command = conn.recv()
            if command == "step":
                start = time.perf_counter()
                step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                conn.send(("time", time.perf_counter() - start))
            elif command == "memory":
                conn.send(("memory", _peak_memory_bytes()))
            else:
                break
    except Exception as err:  # the parent reports it with the configuration's name
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


class Worker:
    """One configuration in a child process.

    Args:
        name: label of the configuration in tables and JSON.
        builder: module-level function (picklable) returning a zero-argument ``step`` callable.
        kwargs: keyword arguments of ``builder``.
    """

    def __init__(self, name: str, builder: Callable[..., Callable[[], Any]], **kwargs: Any) -> None:
        self.name = name
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, builder, kwargs), daemon=True)
        self._process.start()
        self._expect("ready")

    def _expect(self, kind: str):
        got, value = self._conn.recv()
        if got == "error":
            self.close()
            raise RuntimeError(f"benchmark configuration {self.name!r} failed: {value}")
        if got != kind:
            raise RuntimeError(f"{self.name}: expected {kind!r} from the worker, got {got!r}")
        return value

    def step(self) -> float:
        """Run one step; its wall-clock seconds."""
        self._conn.send("step")
        return self._expect("time")

    def peak_memory(self) -> int:
        """Peak memory of the child so far, in bytes."""
        self._conn.send("memory")
        return self._expect("memory")

    def close(self) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=30)


def interleave(workers: list[Worker], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm-up rounds, then ``repeats`` timed rounds; each round steps every worker once, in turn.

    Returns:
        worker name -> the seconds of its timed steps.
    """
    times: dict[str, list[float]] = {w.name: [] for w in workers}
    for r in range(warmup + repeats):
        label = f"warm-up {r + 1}/{warmup}" if r < warmup else f"round {r - warmup + 1}/{repeats}"
        for w in workers:
            seconds = w.step()
            if r >= warmup:
                times[w.name].append(seconds)
            print(f"  [{label}] {w.name:<28} {seconds:8.2f} s", flush=True)
    return times


def run_configurations(
    configurations: list[tuple[str, Callable[..., Callable[[], Any]], dict[str, Any]]],
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Start one worker per ``(name, builder, kwargs)``, interleave their steps, stop them all.

    Returns:
        name -> :func:`summarise` of its timed steps plus ``peak_memory_bytes``, in the given order.
    """
    workers: list[Worker] = []
    try:
        for name, builder, kwargs in configurations:
            workers.append(Worker(name, builder, **kwargs))
        times = interleave(workers, warmup, repeats)
        return {w.name: {**summarise(times[w.name]), "peak_memory_bytes": w.peak_memory()} for w in workers}
    finally:
        for w in workers:
            w.close()


def print_results(results: dict[str, dict[str, Any]]) -> None:
    """A table of median seconds and peak memory per configuration."""
    width = max(len("configuration"), *(len(name) for name in results)) + 2
    print(f"\n{'configuration':<{width}}{'median s':>10}{'peak GB':>10}")
    for name, r in results.items():
        print(f"{name:<{width}}{r['median_s']:>10.2f}{r['peak_memory_bytes'] / 1e9:>10.2f}")


def add_run_arguments(parser: argparse.ArgumentParser, out: str, repeats: int = 3) -> None:
    """The options every step benchmark shares: crop, batch, rounds, memory format, JSON path."""
    parser.add_argument("--roi", type=int, nargs=3, default=[112, 112, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--contiguous", action="store_true", help="contiguous memory format instead of channels-last"
    )
    parser.add_argument("--out", default=out, help="JSON file for the figures")


def step_options(args: argparse.Namespace, backend: str, method: str, **fixed: Any) -> dict[str, Any]:
    """``pretrain_step.build_step``'s keyword arguments from a benchmark's parsed options: crop, batch and
    memory format (``add_run_arguments``), ``--size``, and whichever of ``--precision``,
    ``--teacher-precision``, ``--compile`` and ``--mask-ratio`` the benchmark defines; ``fixed`` wins."""
    options = {
        "size": getattr(args, "size", None),
        "roi": args.roi,
        "batch": args.batch,
        "backend": backend,
        "method": method,
        "channels_last": not args.contiguous,
    }
    for name in ("precision", "teacher_precision", "compile", "mask_ratio"):
        if hasattr(args, name):
            options[name] = getattr(args, name)
    return {**options, **fixed}


def summarise(times: list[float]) -> dict[str, Any]:
    """Median, minimum and the individual times of one configuration."""
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON, with the machine and software it ran on."""
    import anatomask_components

    report = {
        "device": device_description(),
        "torch": torch.__version__,
        "package": str(Path(anatomask_components.__file__).parent),
        "python": sys.version.split()[0],
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **report,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
