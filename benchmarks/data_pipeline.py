"""Data pipeline throughput: first-epoch cost per scan and cached pretraining crops per second.

First epoch: per scan, the seconds to load + reorient + resample + normalise + write the cache (plus one
crop). Later epochs: 112 x 112 x 128 pretraining crops per second from the cache through a DataLoader.
Uses the real example CT if a datalist is given (``anatomask fetch-examples --dest DIR`` writes
``DIR/datalists/pretrain.json``), otherwise synthetic phantoms. Prints and writes JSON. Example:
    python benchmarks/data_pipeline.py --datalist examples/datalists/pretrain.json \
        --out benchmarks/results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.data import DataLoader

from anatomask_components.data.datasets import CachedScanDataset
from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.data.preprocessing import pretrain_transforms


def _items(datalist: str | None, workdir: Path) -> tuple[list[dict], str]:
    if datalist is not None:
        data = json.loads(Path(datalist).read_text())
        return [dict(item) for item in data["training"]], f"datalist {datalist}"
    # Phantoms about the size of a CT at 1 x 1 x 2.5 mm, resampled to 1.5 mm like real scans.
    data = write_phantom_dataset(
        workdir / "phantoms", n_cases=4, shape=(320, 320, 96), spacing=(1.0, 1.0, 2.5), fractions=(1, 0, 0)
    )
    return data["training"], "4 synthetic phantoms 320 x 320 x 96 at 1 x 1 x 2.5 mm"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datalist", default=None, help="datalist JSON (its training items); default phantoms"
    )
    parser.add_argument("--roi", type=int, nargs=3, default=[112, 112, 128])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crops", type=int, default=200, help="cached crops to time")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: a fresh temporary one)")
    parser.add_argument(
        "--mmap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="memory-map cached volumes (default) or read them whole",
    )
    parser.add_argument(
        "--step-json",
        default=None,
        help="a step benchmark's JSON: compare the crop rate with the fastest AnatoMask step's crop rate",
    )
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker; the workers provide the parallelism

    with tempfile.TemporaryDirectory() as workdir:
        items, source = _items(args.datalist, Path(workdir))
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(workdir) / "cache"
        transform = pretrain_transforms(roi_size=tuple(args.roi))
        dataset = CachedScanDataset(items, transform, cache_dir, mmap=args.mmap)

        first_epoch = []
        for index, item in enumerate(items):
            start = time.perf_counter()
            dataset[index]
            first_epoch.append(time.perf_counter() - start)
            print(f"[first epoch] {Path(str(item['image'])).name}: {first_epoch[-1]:.2f} s", flush=True)
        cache_mb = sum(f.stat().st_size for f in cache_dir.glob("*.pt")) / 2**20 / len(items)

        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=args.crops)
        loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers)
        iterator = iter(loader)
        next(iterator)  # worker start-up is not throughput
        start = time.perf_counter()
        crops = 0
        for batch in iterator:
            crops += batch["image"].shape[0]
        elapsed = time.perf_counter() - start

    figures = {
        "source": source,
        "roi": args.roi,
        "workers": args.workers,
        "batch": args.batch,
        "mmap": args.mmap,
        "first_epoch_seconds_per_scan": [round(t, 3) for t in first_epoch],
        "first_epoch_seconds_per_scan_median": round(statistics.median(first_epoch), 3),
        "cached_crops_per_second": round(crops / elapsed, 2),
        "cache_megabytes_per_scan": round(cache_mb, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    if args.step_json:
        step = json.loads(Path(args.step_json).read_text(encoding="utf-8"))
        step_s = min(r["median_s"] for name, r in step["results"].items() if "anatomask" in name)
        # crops a training step consumes per second, against crops the pipeline delivers per second
        step_crops_per_second = int(step["batch"]) / step_s
        figures["step_json"] = args.step_json
        figures["step_crops_per_second"] = round(step_crops_per_second, 4)
        figures["pipeline_over_step_rate"] = round(
            figures["cached_crops_per_second"] / step_crops_per_second, 1
        )
    print(json.dumps(figures, indent=4))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=4) + "\n")


if __name__ == "__main__":
    main()
