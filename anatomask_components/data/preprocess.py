"""``anatomask preprocess``: fill the preprocessing cache ahead of training, in parallel.

The datasets are built from the bundle's own ``configs/train.json`` (its ``CachedScanDataset`` definitions,
with their transforms, fingerprint, cache folder and stored dtype), read with MONAI's ``ConfigParser``: no
parameter is copied, so a training run of the same bundle on the same scans finds every volume cached and
starts at once. Pass the run's extra config files and ``bundle_root`` too: the bundle's CT fingerprint is
computed here (once, as the run would) and stored under ``bundle_root``, where the run looks for it.

Items run in a process pool (``--workers``), one line of progress at a time, then a summary: scans per
second, bytes written, and every bad scan with its error. A bad scan under the pretraining policy
(``on_invalid_scan: warn``) is marked in the cache, so the run skips it without reading it again.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from anatomask_components.data.cache import CacheFullError, format_bytes
from anatomask_components.data.datasets import CachedScanDataset
from anatomask_components.data.validation import find_invalid_scan_error

# The repository's bundles (as anatomask export-bundle finds them).
REPOSITORY_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
# Where the bundles define the datasets that cache their preprocessing.
DATASET_IDS = ("train#cached_dataset", "train#dataset", "validate#dataset")
STAGES = ("pretrain", "finetune", "both")

_datasets: list[CachedScanDataset] = []


def bundle_folder(bundle: str | os.PathLike) -> Path:
    """A bundle folder from its path or from the name of one of the repository's bundles."""
    path = Path(bundle)
    if (path / "configs" / "train.json").is_file():
        return path
    named = REPOSITORY_BUNDLES / str(bundle)
    if (named / "configs" / "train.json").is_file():
        return named
    raise FileNotFoundError(f"{bundle}: not a bundle folder with configs/train.json, nor a bundle name")


def bundle_datasets(
    bundle: str | os.PathLike,
    source: str | os.PathLike,
    stage: str = "both",
    bundle_root: str | os.PathLike | None = None,
    config_files: Sequence[str | os.PathLike] = (),
    cache_dir: str | os.PathLike | None = None,
) -> list[tuple[str, CachedScanDataset]]:
    """The cached datasets a bundle's training run builds over ``source``.

    Args:
        bundle: bundle folder, or a repository bundle name (``anatomask_pretrain``, ...).
        source: datalist JSON or dataset folder (as the bundle's ``datalist`` / ``dataset_dir``).
        stage: ``"pretrain"`` (the pretraining bundle's dataset), ``"finetune"`` (a fine-tuning bundle's
            training and validation datasets) or ``"both"`` (whichever the bundle has).
        bundle_root: the run's bundle root (default: the bundle folder).
        config_files: further config files merged on top of ``train.json``, as for the run.
        cache_dir: cache folder (default: the bundle's ``cache_dir``).

    Returns:
        ``(label, dataset)`` pairs, label ``"<bundle> <config id>"``; none when the bundle's settings are
        not of ``stage``.
    """
    from monai.bundle import ConfigParser

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    folder = bundle_folder(bundle)
    source = Path(source).resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such datalist or dataset folder")
    parser = ConfigParser()
    parser.read_config([str(folder / "configs" / "train.json"), *[str(f) for f in config_files]])
    updates: dict[str, Any] = {"bundle_root": str(bundle_root if bundle_root is not None else folder)}
    updates.update(
        {"datalist": str(source)} if source.is_file() else {"datalist": "", "dataset_dir": str(source)}
    )
    if cache_dir is not None:
        updates["cache_dir"] = str(cache_dir)
    for key, value in updates.items():
        parser[key] = value
    preprocessing = str(parser["train#preprocessing"]["_target_"])
    if stage != "both" and stage != ("pretrain" if "pretrain_transforms" in preprocessing else "finetune"):
        return []
    if "imports" in parser:
        parser.get_parsed_content("imports")
    found = []
    for config_id in DATASET_IDS:
        if config_id in parser and str(parser[config_id].get("_target_", "")).endswith("CachedScanDataset"):
            try:
                found.append((f"{folder.name} {config_id}", parser.get_parsed_content(config_id)))
            except Exception as error:
                # MONAI wraps what went wrong (a datalist without labels, a missing file) in layers of
                # "Failed to evaluate / instantiate"; the innermost error is the one to show.
                cause = error
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                raise cause from error
    return found


def _start_worker(datasets: list[CachedScanDataset]) -> None:
    import torch

    global _datasets
    _datasets = datasets
    torch.set_num_threads(1)  # the pool provides the parallelism, as DataLoader workers do


def _fill(task: tuple[int, int]) -> tuple[int, int, str, int, str | None]:
    """Cache one item: ``(dataset, item, "computed" | "cached" | "bad", bytes written, error)``."""
    dataset_index, item_index = task
    dataset = _datasets[dataset_index]
    try:
        status = dataset.precompute(item_index)
    except CacheFullError:
        raise
    except Exception as error:
        invalid = find_invalid_scan_error(error)
        cause = invalid if invalid is not None else error
        return dataset_index, item_index, "bad", 0, f"{type(cause).__name__}: {cause}".replace("\n", " ")
    path = dataset.cache_path(item_index)
    written = path.stat().st_size if status == "computed" and path is not None else 0
    return dataset_index, item_index, status, written, None


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
    )


class _Progress:
    """One progress line: redrawn in place on a terminal, else printed at every tenth of the work."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.width, self.start = total, width, time.perf_counter()
        self.interactive = sys.stdout.isatty()
        self.printed_tenth = -1

    def update(self, done: int, computed: int, written: int, bad: int) -> None:
        elapsed = time.perf_counter() - self.start
        rate = computed / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) * elapsed / done if done else 0.0
        filled = round(self.width * done / max(self.total, 1))
        line = (
            f"[preprocess] [{'#' * filled}{'-' * (self.width - filled)}] {done}/{self.total} scans, "
            f"{rate:.1f} scans/s, {format_bytes(written)} written, {bad} bad, {_duration(elapsed)} "
            f"(left ~{_duration(eta)})"
        )
        if self.interactive:
            print(f"\r{line}", end="\n" if done == self.total else "", flush=True)
        elif (tenth := 10 * done // max(self.total, 1)) > self.printed_tenth:
            self.printed_tenth = tenth
            print(line, flush=True)


def fill_cache(datasets: Sequence[tuple[str, CachedScanDataset]], workers: int = 4) -> dict[str, Any]:
    """Compute every item of ``datasets`` that is not cached yet.

    Args:
        datasets: ``(label, dataset)`` pairs, e.g. from :func:`bundle_datasets`.
        workers: worker processes (0: in this process).

    Returns:
        ``{"scans", "computed", "cached", "bad": [{"dataset", "item", "error"}], "bytes_written", "seconds",
        "scans_per_second" (computed scans per second of wall time), "workers", "cache_dirs"}``.

    Raises:
        CacheFullError: the cache's disk is full (the message names the folder).
    """
    labels = [label for label, _ in datasets]
    objects = [dataset for _, dataset in datasets]
    tasks = [(d, i) for d, dataset in enumerate(objects) for i in range(len(dataset))]
    counts = {"computed": 0, "cached": 0}
    bad: list[dict[str, Any]] = []
    written = 0
    progress = _Progress(len(tasks))
    start = time.perf_counter()

    def record(result: tuple[int, int, str, int, str | None]) -> None:
        nonlocal written
        dataset_index, item_index, status, size, error = result
        if status == "bad":
            item = objects[dataset_index].data[item_index]
            bad.append({"dataset": labels[dataset_index], "item": dict(item), "error": error})
        else:
            counts[status] += 1
        written += size
        done = counts["computed"] + counts["cached"] + len(bad)
        progress.update(done, counts["computed"], written, len(bad))

    if workers <= 0:
        _start_worker(objects)
        for task in tasks:
            record(_fill(task))
    else:
        # fork: the workers inherit the datasets (transforms, fingerprint) without pickling them
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(
            workers, mp_context=mp.get_context(method), initializer=_start_worker, initargs=(objects,)
        ) as pool:
            pending = {pool.submit(_fill, task) for task in tasks}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        record(future.result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    seconds = time.perf_counter() - start
    return {
        "scans": len(tasks),
        **counts,
        "bad": bad,
        "bytes_written": written,
        "seconds": seconds,
        "scans_per_second": counts["computed"] / seconds if seconds > 0 else 0.0,
        "workers": workers,
        "cache_dirs": sorted({str(d.cache_dir) for d in objects if d.cache_dir is not None}),
    }


def print_report(report: dict[str, Any]) -> None:
    """The summary of :func:`fill_cache`: counts, rate, bytes and the bad scans with their errors."""
    computed = report["computed"]
    per_scan = f" ({format_bytes(report['bytes_written'] / computed)} per scan)" if computed else ""
    print(
        f"[preprocess] {report['scans']} scans: {computed} computed, {report['cached']} already cached, "
        f"{len(report['bad'])} bad, in {_duration(report['seconds'])} ({report['scans_per_second']:.2f} "
        f"scans/s with {report['workers']} workers); {format_bytes(report['bytes_written'])} written"
        f"{per_scan} to {', '.join(report['cache_dirs'])}",
        flush=True,
    )
    for entry in report["bad"]:
        print(f"  bad scan ({entry['dataset']}): {entry['error']}", flush=True)


def preprocess(
    source: str | os.PathLike,
    bundle: str | os.PathLike | Sequence[str | os.PathLike] = "anatomask_pretrain",
    workers: int = 4,
    stage: str = "both",
    bundle_root: str | os.PathLike | None = None,
    config_files: Sequence[str | os.PathLike] = (),
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fill the cache for the training run(s) of one or more bundles over ``source`` and print a summary.

    Args:
        source: datalist JSON or dataset folder.
        bundle: bundle name(s) or folder(s); each contributes the datasets of ``stage``.
        workers: worker processes (0: in this process).
        stage: ``"pretrain"``, ``"finetune"`` or ``"both"``.
        bundle_root, config_files, cache_dir: as the run's (see :func:`bundle_datasets`).

    Returns:
        the report of :func:`fill_cache`.
    """
    bundles = [bundle] if isinstance(bundle, (str, os.PathLike)) else list(bundle)
    datasets = []
    for name in bundles:
        datasets += bundle_datasets(name, source, stage, bundle_root, config_files, cache_dir)
    if not datasets:
        raise ValueError(f"{', '.join(map(str, bundles))}: no cached datasets of the {stage} stage")
    sizes = ", ".join(f"{label} ({len(d)} items)" for label, d in datasets)
    print(f"[preprocess] {sizes} -> {', '.join(sorted({str(d.cache_dir) for _, d in datasets}))}", flush=True)
    report = fill_cache(datasets, workers)
    print_report(report)
    return report
