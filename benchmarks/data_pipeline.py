"""Data pipeline throughput: first-epoch cost per scan, cached pretraining crops per second, and the cost per
crop of each fine-tuning augmentation.

First epoch: per scan, the seconds to load + reorient + resample + normalise + write the cache (plus one
crop). Later epochs: 112 x 112 x 128 pretraining crops per second from the cache through a DataLoader.
With ``--augmentation-datalist`` (labelled items, e.g. ``examples/datalists/flare22.json``): the fine-tuning
pipeline's random part (crop, nnU-Net's augmentation) on preprocessed volumes held in memory, one thread,
each augmentation alone at probability 1, none, and the bundle defaults, timed in interleaved rounds;
reported as milliseconds per crop (median) and the extra cost of each augmentation over none.
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

from anatomask_components.data.augmentation import NNUNET_AUGMENTATION, resolve_augmentation
from anatomask_components.data.datasets import CachedScanDataset
from anatomask_components.data.fingerprint import compute_fingerprint
from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.data.preprocessing import finetune_train_transforms, pretrain_transforms


def augmentation_costs(datalist: str, roi: list[int], rounds: int, crops_per_round: int) -> dict:
    """Milliseconds per fine-tuning crop for each augmentation alone (p = 1), none and the defaults."""
    items = [dict(item) for item in json.loads(Path(datalist).read_text())["training"]]
    fingerprint = compute_fingerprint({"training": items}, sections=("training",), progress=False)
    variants = {"none": resolve_augmentation("none"), "defaults": resolve_augmentation(None)}
    for key in NNUNET_AUGMENTATION:
        if key.endswith("_prob"):
            variants[key] = {**resolve_augmentation("none"), key: 1.0}
    variants["border_fraction"] = {**resolve_augmentation("none"), "border_fraction": 0.25}
    pipelines = {
        name: finetune_train_transforms(
            roi_size=tuple(roi), normalization="ct", fingerprint=fingerprint, num_classes=14, num_samples=1,
            augmentation=settings,
        )
        for name, settings in variants.items()
    }  # fmt: skip
    first = next(iter(pipelines.values()))
    split = next(i for i, t in enumerate(first.transforms) if type(t).__name__ == "SpatialPadd")
    volumes = [_apply(first.transforms[:split], item) for item in items]
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for round_index in range(rounds):
        for name, pipeline in pipelines.items():  # interleaved: every variant once per round
            random_part = pipeline.transforms[split:]
            start = time.perf_counter()
            for i in range(crops_per_round):
                _apply(random_part, dict(volumes[i % len(volumes)]), seed=round_index * 1000 + i)
            times[name].append((time.perf_counter() - start) / crops_per_round * 1000.0)
        print(f"[augmentation] round {round_index + 1}/{rounds}", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "datalist": datalist,
        "roi": roi,
        "rounds": rounds,
        "crops_per_round": crops_per_round,
        "ms_per_crop": {name: round(value, 2) for name, value in medians.items()},
        "extra_ms_over_none": {name: round(value - medians["none"], 2) for name, value in medians.items()},
        "defaults_crops_per_second_one_thread": round(1000.0 / medians["defaults"], 2),
    }


def _apply(transforms, data, seed: int = 0):
    from monai.transforms import Compose

    compose = Compose(list(transforms))
    compose.set_random_state(seed=seed)
    out = compose(data)
    return out[0] if isinstance(out, list) else out


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
    parser.add_argument(
        "--augmentation-datalist",
        default=None,
        help="labelled datalist: also time each fine-tuning augmentation per crop (--roi, --rounds)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the augmentation timing")
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
    if args.augmentation_datalist:
        figures["finetune_augmentation"] = augmentation_costs(
            args.augmentation_datalist, args.roi, args.rounds, 4
        )
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
        if "finetune_augmentation" in figures:
            rate = figures["finetune_augmentation"]["defaults_crops_per_second_one_thread"]
            figures["finetune_augmentation"]["one_thread_over_step_rate"] = round(
                rate / step_crops_per_second, 1
            )
    print(json.dumps(figures, indent=4))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=4) + "\n")


if __name__ == "__main__":
    main()
