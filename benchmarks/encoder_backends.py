"""The sparse encoder's two backends, forward + backward, at several mask ratios, interleaved.

``--forward-only`` times the forward pass alone in ``torch.inference_mode()``: what the EMA teacher
runs.

``dense`` (masked dense convolution) computes every voxel and zeroes the masked ones; ``spconv``
(submanifold sparse convolution) computes the visible voxels only, so it gains with the mask ratio and
pays for its index bookkeeping. One configuration per (backend, mask ratio), each in its own process,
stepped round by round; the same random masks on both backends. Prints a table with the faster backend
per ratio and writes JSON. Example (CPU, about 15 minutes for STU-Net-B):

    python benchmarks/encoder_backends.py --size B --ratios 0.6 0.75 0.9 \
        --out benchmarks/results/encoder_backends_B_cpu.json
"""

from __future__ import annotations

import argparse

import torch
from common import add_run_arguments, run_configurations, write_report
from pretrain_step import stunet_backbone

from anatomask_components.masking import random_patch_mask
from anatomask_components.networks import AnatoMaskPretrainModel
from anatomask_components.patches import mask_to_visible_grid, patch_grid


def build_encoder_step(
    size: str,
    roi: list[int],
    batch: int,
    backend: str,
    mask_ratio: float,
    channels_last: bool,
    forward_only: bool = False,
    seed: int = 0,
):
    """Forward + backward of the sparse encoder alone, or its forward in inference mode
    (runs in the benchmark's child process)."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AnatoMaskPretrainModel(stunet_backbone(size), backend=backend).to(device)
    encoder = model.sparse_encoder
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    encoder.to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *roi, generator=generator).to(device).contiguous(memory_format=memory_format)
    grid = patch_grid(roi, model.patch_size)
    masks = [
        mask_to_visible_grid(
            random_patch_mask(batch, model.num_patches(roi), mask_ratio, generator), grid
        ).to(device)
        for _ in range(4)
    ]
    state = {"i": 0}

    def step() -> None:
        visible = masks[state["i"] % len(masks)]
        state["i"] += 1
        if forward_only:
            with torch.inference_mode():
                encoder(x, visible)
            return
        encoder.zero_grad(set_to_none=True)
        features = encoder(x, visible)
        sum(f.float().square().mean() for f in features).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="B", help="STU-Net preset S, B, L, H, or 'tiny'")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.75, 0.9])
    parser.add_argument("--backends", nargs="+", default=["dense", "spconv"], choices=["dense", "spconv"])
    parser.add_argument(
        "--forward-only", action="store_true", help="time the forward in inference mode (the teacher's pass)"
    )
    add_run_arguments(parser, "benchmarks/results/encoder_backends.json")
    args = parser.parse_args()

    configurations = [
        (
            f"{backend} @ {ratio:g}",
            build_encoder_step,
            {
                "size": args.size,
                "roi": args.roi,
                "batch": args.batch,
                "backend": backend,
                "mask_ratio": ratio,
                "channels_last": not args.contiguous,
                "forward_only": args.forward_only,
            },
        )
        for ratio in args.ratios
        for backend in args.backends
    ]
    work = "forward in inference mode" if args.forward_only else "forward + backward"
    print(f"STU-Net-{args.size} encoder, crop {args.roi}, batch {args.batch}: {work}")
    results = run_configurations(configurations, args.warmup, args.repeats)

    faster = {}
    print(f"\n{'mask ratio':<12}" + "".join(f"{b + ' s':>12}" for b in args.backends) + f"{'faster':>10}")
    for ratio in args.ratios:
        medians = {b: results[f"{b} @ {ratio:g}"]["median_s"] for b in args.backends}
        faster[f"{ratio:g}"] = min(medians, key=medians.get)
        print(
            f"{ratio:<12g}"
            + "".join(f"{medians[b]:>12.2f}" for b in args.backends)
            + f"{faster[f'{ratio:g}']:>10}"
        )
    write_report(
        args.out,
        {
            "benchmark": "encoder_backends",
            "size": args.size,
            "roi": args.roi,
            "batch": args.batch,
            "channels_last": not args.contiguous,
            "forward_only": args.forward_only,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "results": results,
            "faster_backend": faster,
        },
    )


if __name__ == "__main__":
    main()
