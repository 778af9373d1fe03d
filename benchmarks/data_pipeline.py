"""Data pipeline throughput: first-epoch cost per scan, cached pretraining crops per second, and the cost per
crop of each fine-tuning augmentation.

First epoch: per scan, the seconds to load + reorient + resample + normalise + write the cache (plus one
crop). Later epochs: 112 x 112 x 128 pretraining crops per second from the cache through a DataLoader.
With ``--augmentation-datalist`` (labelled items, e.g. ``examples/datalists/flare22.json``): the fine-tuning
pipeline's random part (crop, nnU-Net's augmentation) on preprocessed volumes held in memory, one thread,
each augmentation alone at probability 1, none, and the bundle defaults, timed in interleaved rounds;
reported as milliseconds per crop (median) and the extra cost of each augmentation over none.
With ``--compare-cache-dtypes``: cached crops per second from a float32 and a float16 cache of the same scans,
timed in interleaved rounds (float32, float16, float32, ...; medians and their ratio), with the bytes per
voxel of each. With ``--precision-datalist`` (labelled items): the float16 cache's error on the normalised
images (nnU-Net CT normalisation with the pretraining items' fingerprint; max and mean, also in HU) through
the pretraining and fine-tuning preprocessing, and the label voxels that differ (none: labels are stored as
integers). With ``--compare-blosc2`` (needs ``pip install blosc2``, not a dependency of the package): the
lossless alternative, each pretraining item's normalised float32 image compressed by blosc2 (zstd, byte
shuffle), its bytes per voxel and the milliseconds to decompress one ROI crop, against a float16 crop.
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
from monai.transforms import Compose
from monai.utils import convert_to_tensor

from anatomask_components.data.augmentation import NNUNET_AUGMENTATION, resolve_augmentation
from anatomask_components.data.datasets import CachedScanDataset, pack_item, unpack_item
from anatomask_components.data.fingerprint import compute_fingerprint
from anatomask_components.data.phantoms import write_phantom_dataset
from anatomask_components.data.preprocessing import (
    finetune_train_transforms,
    finetune_val_transforms,
    inference_transforms,
    pretrain_transforms,
)


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


def crops_per_second(dataset, crops: int, batch: int, workers: int) -> float:
    """Random crops per second through a DataLoader (worker start-up and the first batch not counted)."""
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=crops)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    count = 0
    for batch_data in iterator:
        count += batch_data["image"].shape[0]
    return count / (time.perf_counter() - start)


def compare_cache_dtypes(items, transform, workdir: Path, args) -> dict:
    """Cached crops per second from float32 and float16 caches, interleaved rounds; bytes per voxel."""
    datasets, bytes_per_voxel = {}, {}
    for dtype in ("float32", "float16"):
        dataset = CachedScanDataset(items, transform, workdir / f"cache_{dtype}", cache_dtype=dtype)
        for index in range(len(items)):
            dataset[index]
        stored = sum(dataset.cache_path(i).stat().st_size for i in range(len(items)))
        # image voxels (memory-mapped, nothing read); the file also holds the metadata
        voxels = sum(dataset._deterministic(i)["data"]["image"].numel() for i in range(len(items)))
        datasets[dtype], bytes_per_voxel[dtype] = dataset, stored / voxels
    rates: dict[str, list[float]] = {dtype: [] for dtype in datasets}
    for round_index in range(args.rounds):
        for dtype, dataset in datasets.items():
            rates[dtype].append(crops_per_second(dataset, args.crops, args.batch, args.workers))
            print(
                f"[cache dtype] round {round_index + 1}/{args.rounds} {dtype}: {rates[dtype][-1]:.1f} crops/s"
            )
    medians = {dtype: statistics.median(values) for dtype, values in rates.items()}
    return {
        "rounds": args.rounds,
        "crops_per_round": args.crops,
        "crops_per_second": {dtype: [round(v, 2) for v in values] for dtype, values in rates.items()},
        "crops_per_second_median": {dtype: round(v, 2) for dtype, v in medians.items()},
        "float16_over_float32": round(medians["float16"] / medians["float32"], 3),
        "bytes_per_voxel": {dtype: round(v, 3) for dtype, v in bytes_per_voxel.items()},
    }


def float16_precision(pretrain_items: list[dict], labelled_items: list[dict]) -> dict:
    """The float16 cache's error on normalised images (nnU-Net CT scheme, the pretraining items' fingerprint)
    through the pretraining and fine-tuning preprocessing; label voxels changed by the cache."""
    fingerprint = compute_fingerprint({"training": pretrain_items}, sections=("training",), progress=False)
    std = fingerprint["intensity"]["CT"]["std"]
    pipelines = {
        "pretrain": (pretrain_transforms(normalization="ct", fingerprint=fingerprint), pretrain_items),
        "finetune": (
            finetune_val_transforms(normalization="ct", fingerprint=fingerprint, num_classes=14),
            labelled_items,
        ),
    }
    results = {}
    for name, (transform, items) in pipelines.items():
        deterministic = Compose(transform.transforms[: _first_random(transform)])
        for item in items:
            exact = convert_to_tensor(deterministic(dict(item)), track_meta=True)
            stored = pack_item(exact, "float16")
            restored = unpack_item(stored["data"], stored["dtypes"])
            image = exact["image"].as_tensor()
            error = (restored["image"].as_tensor() - image).abs()
            case = Path(str(item["image"])).name
            results[f"{name} {case}"] = {
                "shape": list(image.shape[1:]),
                "stored_dtype": str(stored["data"]["image"].dtype),
                "value_range": [round(float(image.min()), 3), round(float(image.max()), 3)],
                "max_abs_error": float(error.max()),
                "mean_abs_error": float(error.mean()),
                "max_abs_error_hu": round(float(error.max()) * std, 4),
                "mean_abs_error_hu": round(float(error.mean()) * std, 5),
                **(
                    {"label_voxels_changed": int((restored["label"] != exact["label"]).sum())}
                    if "label" in exact
                    else {}
                ),
            }
            print(f"[precision] {name} {case}: {results[f'{name} {case}']}", flush=True)
    return {"fingerprint_ct_std_hu": round(std, 2), "cases": results}


def blosc2_alternative(items: list[dict], roi: list[int], repeats: int = 5) -> dict:
    """Bytes per voxel and ms per ROI crop of blosc2 (zstd level 5, byte shuffle) against float16."""
    import blosc2  # measured as the alternative to float16; not a dependency

    fingerprint = compute_fingerprint({"training": items}, sections=("training",), progress=False)
    transform = inference_transforms(normalization="ct", fingerprint=fingerprint)
    cparams = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=5, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    results = {"blosc2": blosc2.__version__, "cases": {}}
    for item in items:
        image = transform(dict(item))["image"].as_tensor()[0].numpy()
        start = [max(0, (n - r) // 2) for n, r in zip(image.shape, roi)]
        window = tuple(slice(s, s + r) for s, r in zip(start, roi))
        compressed = blosc2.asarray(image, cparams=cparams, dparams=blosc2.DParams(nthreads=1))
        half = image.astype("float16")
        timings = {}
        for name, stored in (("blosc2", compressed), ("float16", half)):
            begin = time.perf_counter()
            for _ in range(repeats):
                stored[window].astype("float32")  # blosc2 decompresses the window into a NumPy array
            timings[name] = (time.perf_counter() - begin) / repeats * 1000.0
        case = Path(str(item["image"])).name
        results["cases"][case] = {
            "shape": list(image.shape),
            "blosc2_bytes_per_voxel": round(compressed.schunk.cbytes / image.size, 3),
            "blosc2_ms_per_crop": round(timings["blosc2"], 2),
            "float16_ms_per_crop": round(timings["float16"], 2),
        }
        print(f"[blosc2] {case}: {results['cases'][case]}", flush=True)
    return results


def _first_random(transform) -> int:
    from anatomask_components.data.datasets import split_at_first_random

    return split_at_first_random(transform)[1]


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
    parser.add_argument(
        "--cache-dtype", default="float16", choices=("float16", "float32"), help="stored image dtype"
    )
    parser.add_argument(
        "--compare-cache-dtypes",
        action="store_true",
        help="also time crops from float32 and float16 caches in interleaved rounds (--rounds, --crops)",
    )
    parser.add_argument(
        "--compare-blosc2", action="store_true", help="also measure blosc2 (needs pip install blosc2)"
    )
    parser.add_argument(
        "--precision-datalist",
        default=None,
        help="labelled datalist: the float16 cache's error through pretraining and fine-tuning preprocessing",
    )
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker; the workers provide the parallelism

    with tempfile.TemporaryDirectory() as workdir:
        items, source = _items(args.datalist, Path(workdir))
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(workdir) / "cache"
        transform = pretrain_transforms(roi_size=tuple(args.roi))
        dataset = CachedScanDataset(items, transform, cache_dir, mmap=args.mmap, cache_dtype=args.cache_dtype)

        first_epoch = []
        for index, item in enumerate(items):
            start = time.perf_counter()
            dataset[index]
            first_epoch.append(time.perf_counter() - start)
            print(f"[first epoch] {Path(str(item['image'])).name}: {first_epoch[-1]:.2f} s", flush=True)
        cache_mb = sum(dataset.cache_path(i).stat().st_size for i in range(len(items))) / 2**20 / len(items)
        crop_rate = crops_per_second(dataset, args.crops, args.batch, args.workers)
        comparison = (
            compare_cache_dtypes(items, transform, Path(workdir), args) if args.compare_cache_dtypes else None
        )

    figures = {
        "source": source,
        "roi": args.roi,
        "workers": args.workers,
        "batch": args.batch,
        "mmap": args.mmap,
        "cache_dtype": args.cache_dtype,
        "first_epoch_seconds_per_scan": [round(t, 3) for t in first_epoch],
        "first_epoch_seconds_per_scan_median": round(statistics.median(first_epoch), 3),
        "cached_crops_per_second": round(crop_rate, 2),
        "cache_megabytes_per_scan": round(cache_mb, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    if comparison is not None:
        figures["cache_dtypes"] = comparison
    if args.precision_datalist:
        labelled = json.loads(Path(args.precision_datalist).read_text())
        labelled_items = [
            dict(i) for name in ("training", "validation", "test") for i in labelled.get(name) or []
        ]
        unique = list({json.dumps(i, sort_keys=True): i for i in labelled_items}.values())
        figures["float16_precision"] = float16_precision(items, unique)
    if args.compare_blosc2:
        figures["blosc2_alternative"] = blosc2_alternative(items, args.roi)
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
