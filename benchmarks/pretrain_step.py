"""Time one pretraining step (forward + backward) per sparse backend and per masking mode.

Prints medians and writes JSON. Example:
    python benchmarks/pretrain_step.py --size B --repeats 3 --out benchmarks/results/pretrain_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from anatomask_components.losses import masked_patch_mse, patch_scores
from anatomask_components.masking import random_patch_mask, reconstruction_guided_mask
from anatomask_components.networks import AnatoMaskPretrainModel
from anatomask_components.teacher import EMATeacher

TINY = {"depths": [1, 1, 1, 1, 1], "dims": [8, 16, 32, 64, 64]}


def _step(model, teacher, x, mode: str, mask_ratio: float, hard_ratio: float, generator) -> None:
    length = model.num_patches(x.shape[2:])
    mask = random_patch_mask(x.shape[0], length, mask_ratio, generator=generator)
    if mode == "anatomask":
        with torch.no_grad():
            scores = patch_scores(teacher.teacher(x, mask), x, model.patch_size).masked_fill(~mask, 0.0)
        mask = reconstruction_guided_mask(
            scores, mask_ratio, hard_ratio, candidates=mask, generator=generator
        )
    model.zero_grad(set_to_none=True)
    masked_patch_mse(model(x, mask), x, mask, model.patch_size).backward()
    teacher.update(0.999)


def _median_seconds(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="B", help="STU-Net preset, or 'tiny' (widths 8-64)")
    parser.add_argument("--roi", type=int, nargs=3, default=[112, 112, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["dense", "spconv"])
    parser.add_argument("--modes", nargs="+", default=["random", "anatomask"])
    parser.add_argument("--out", default="benchmarks/results/pretrain_step.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net_kwargs = TINY if args.size == "tiny" else {"size": args.size}
    x = torch.randn(args.batch, 1, *args.roi, device=device)
    results = []
    for backend in args.backends:
        for mode in args.modes:
            torch.manual_seed(0)
            model = AnatoMaskPretrainModel(backend=backend, **net_kwargs).to(device)
            teacher = EMATeacher(model)
            generator = torch.Generator(device=device).manual_seed(0)
            times = _median_seconds(
                lambda model=model, teacher=teacher, mode=mode, generator=generator: _step(
                    model, teacher, x, mode, 0.6, 0.5, generator
                ),
                args.repeats,
                args.warmup,
            )
            row = {"backend": backend, "mode": mode, "median_s": statistics.median(times), "times_s": times}
            results.append(row)
            print(
                f"{args.size:>5} {backend:>7} {mode:>10}: median {row['median_s']:.2f} s/step",
                flush=True,
            )
    by_key = {(r["backend"], r["mode"]): r["median_s"] for r in results}
    ratios = {
        b: by_key[(b, "anatomask")] / by_key[(b, "random")]
        for b in args.backends
        if (b, "anatomask") in by_key and (b, "random") in by_key
    }
    for b, r in ratios.items():
        print(f"AnatoMask / SparK step time ({b}): {r:.2f}")
    report = {
        "size": args.size,
        "roi": args.roi,
        "batch": args.batch,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
        "anatomask_over_spark": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
