"""Scale: cache bytes per scan, preprocessing scans per second, time to the first iteration and peak memory of
a pretraining run, for growing numbers of scans.

Writes ``max(N)`` phantom CT scans (``--shape``, default 48^3 at 1.5 mm) once; for each N, a datalist of the
first N is preprocessed with ``anatomask preprocess``'s code (the pretraining bundle with its small-network
override, ``--workers`` processes, a fresh cache folder per N), then the bundle's training run starts in a
fresh process on the preprocessed set and stops after its first iteration. Reported per N: bytes per scan in
the cache, preprocessing scans per second (filling only; the fingerprint pass before it is reported apart),
seconds from starting the training process to its first completed iteration, and that process's peak
resident memory (``ru_maxrss``; the small override loads data in the main process). Prints a table and
writes JSON. Example:
    python benchmarks/scale.py --sizes 50 200 500 --out benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "anatomask_pretrain"
CONFIGS = BUNDLE / "configs"
SMALL = CONFIGS / "small_override.json"


def first_iteration(bundle_root: str, datalist: str, cache_dir: str) -> dict:
    """Run the pretraining bundle (small override) until its first iteration; in a fresh process."""
    import resource

    started = time.time()
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    import anatomask_components.engines  # noqa: F401  (the bundle's imports, timed with the libraries')

    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(SMALL)],
        workflow_type="train",
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=bundle_root,
        datalist=datalist,
        cache_dir=cache_dir,
        max_epochs=1,
    )
    result: dict = {"started_at": started, "imported_at": time.time()}
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own progress lines
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")

        def stop(engine) -> None:
            result["first_iteration_at"] = time.time()
            result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result["cache_entries_after"] = sum(1 for p in Path(cache_dir).glob("*.pt"))
            engine.terminate()

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), stop)
        workflow.run()
    result["dataset_items"] = len(workflow.parser.get_parsed_content("train#dataset"))
    return result


def measure(n: int, scans: list[dict], workdir: Path, workers: int) -> dict:
    """Preprocess the first ``n`` scans, then time a training run's start on them."""
    from anatomask_components.data.preprocess import bundle_datasets, fill_cache

    folder = workdir / f"n{n}"
    folder.mkdir()
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": scans[:n], "validation": [], "test": []}))
    cache, root = folder / "cache", folder / "root"
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the fingerprint's line per scan
        datasets = bundle_datasets(BUNDLE, datalist, "pretrain", root, [SMALL], cache)
    fingerprint_seconds = time.perf_counter() - start
    report = fill_cache(datasets, workers)
    del datasets  # releases the lease, as the command's end does
    launched = time.time()
    child = subprocess.run(
        [sys.executable, __file__, "--first-iteration", str(root), str(datalist), str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"training run on {n} scans failed:\n{child.stderr[-3000:]}")
    run = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "scans": n,
        "computed": report["computed"],
        "bad": len(report["bad"]),
        "bytes_per_scan": report["bytes_written"] / max(report["computed"], 1),
        "preprocess_scans_per_second": report["scans_per_second"],
        "fingerprint_seconds": fingerprint_seconds,
        "seconds_to_first_iteration": run["first_iteration_at"] - launched,
        "of_which_python_and_imports": run["imported_at"] - launched,
        "peak_rss_bytes": run["peak_rss_bytes"],
        "run_computed_nothing": run["cache_entries_after"] == report["computed"],
        "run_dataset_items": run["dataset_items"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48])
    parser.add_argument("--workers", type=int, default=2, help="preprocessing worker processes")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    parser.add_argument(
        "--first-iteration", nargs=3, metavar=("ROOT", "DATALIST", "CACHE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.first_iteration:
        print(json.dumps(first_iteration(*args.first_iteration)))
        return

    from anatomask_components.data.cache import format_bytes
    from anatomask_components.data.phantoms import write_phantom_dataset

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        data = write_phantom_dataset(
            Path(workdir) / "scans", n_cases=max(args.sizes), shape=args.shape, layout="folder", seed=0
        )
        scans = sorted(
            (item for name in ("training", "validation", "test") for item in data.get(name) or []),
            key=lambda item: item["image"],
        )
        seconds = time.perf_counter() - start
        print(f"[scale] {len(scans)} phantoms {tuple(args.shape)} written in {seconds:.0f} s", flush=True)
        for n in sorted(args.sizes):
            rows.append(measure(n, scans, Path(workdir), args.workers))
            row = rows[-1]
            print(
                f"[scale] N={n}: {format_bytes(row['bytes_per_scan'])} per scan, "
                f"{row['preprocess_scans_per_second']:.1f} scans/s, first iteration after "
                f"{row['seconds_to_first_iteration']:.1f} s, "
                f"peak memory {format_bytes(row['peak_rss_bytes'])}",
                flush=True,
            )
    peaks = [row["peak_rss_bytes"] for row in rows]
    figures = {
        "shape": args.shape,
        "workers": args.workers,
        "rows": rows,
        "peak_rss_max_over_min": max(peaks) / min(peaks),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    print(
        "\n| scans | bytes per scan | preprocessing scans/s | fingerprint s | first iteration s "
        "(Python + imports) | peak memory |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['scans']} | {row['bytes_per_scan'] / 1024:.1f} KB | "
            f"{row['preprocess_scans_per_second']:.1f} | {row['fingerprint_seconds']:.1f} | "
            f"{row['seconds_to_first_iteration']:.1f} ({row['of_which_python_and_imports']:.1f}) | "
            f"{row['peak_rss_bytes'] / 2**20:.0f} MB |"
        )
    print(f"peak memory, largest / smallest N: {figures['peak_rss_max_over_min']:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=4) + "\n")


if __name__ == "__main__":
    main()
