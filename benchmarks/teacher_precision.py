"""What a reduced-precision teacher changes: its choice of hard patches and its time, against fp32.

For each crop of real CT and each random mask ``m0``, the teacher scores the masked patches in fp32 and in
each lower precision (autocast, as ``teacher_precision`` does in training); the hard patches are the top
``k = floor(n_masked * 0.5)`` of the candidates (hard ratio 0.5, the final state). Reported: the overlap
``|hard_fp32 & hard_low| / k`` (1 = the same patches; only the chosen set enters training, not the
order of the scores) and the seconds of each pass, timed alternately. Example (the demo's pretrained
network and its real CT; CPU):

    python benchmarks/teacher_precision.py \
        --checkpoint demo_output/pretrain_anatomask/models/model.pt --dims 16 32 64 128 128 128 \
        --images demo_output/data/images/A_ct.nii.gz demo_output/data/images/B_ct.nii.gz \
        --spacing 3 3 3 --roi 64 64 64 --out benchmarks/results/teacher_precision_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_report

from anatomask_components.data.preprocessing import inference_transforms
from anatomask_components.masking import hardest_patches, num_hard, num_masked, random_patch_mask
from anatomask_components.networks import AnatoMaskPretrainModel, STUNet
from anatomask_components.strategies import masked_patch_errors
from anatomask_components.weights import extract_state_dict, load_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def crops(
    images: list[str], spacing: list[float], roi: list[int], per_image: int, seed: int
) -> list[torch.Tensor]:
    """``per_image`` random ``roi`` crops of each preprocessed image (padded where smaller)."""
    transform = inference_transforms(spacing=spacing)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for path in images:
        volume = transform({"image": path})["image"].as_tensor().float()
        pad = [max(r - s, 0) for r, s in zip(roi, volume.shape[1:])]
        if any(pad):
            volume = torch.nn.functional.pad(volume, [p for axis in reversed(pad) for p in (0, axis)])
        for _ in range(per_image):
            start = [
                int(torch.randint(0, s - r + 1, (1,), generator=generator))
                for s, r in zip(volume.shape[1:], roi)
            ]
            out.append(
                volume[
                    :,
                    start[0] : start[0] + roi[0],
                    start[1] : start[1] + roi[1],
                    start[2] : start[2] + roi[2],
                ]
            )
    return out


def hard_patches(
    network, x: torch.Tensor, m0: torch.Tensor, k: int, precision: str
) -> tuple[torch.Tensor, float]:
    """The teacher's ``k`` hardest candidates (as a bool mask) and the seconds of its pass."""
    device = x.device
    start = time.perf_counter()
    with torch.inference_mode():
        scores = masked_patch_errors(network, x, m0, network.patch_size, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        hard = hardest_patches(scores, k, candidates=m0)
    return hard, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="pretraining model.pt (default: a fresh network)")
    parser.add_argument("--size", default="B", help="STU-Net preset, unless --dims is given")
    parser.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=None,
        help="stunet_dims of the pretraining bundle (blocks: 1 per stage)",
    )
    parser.add_argument("--images", nargs="+", required=True, help="CT volumes (NIfTI, NRRD, DICOM folder)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5])
    parser.add_argument("--roi", type=int, nargs=3, default=[112, 112, 128])
    parser.add_argument("--crops", type=int, default=4, help="crops per image")
    parser.add_argument("--masks", type=int, default=4, help="random masks m0 per crop")
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/teacher_precision.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    kwargs = {"depths": [1] * len(args.dims), "dims": args.dims} if args.dims else {"size": args.size}
    network = AnatoMaskPretrainModel(STUNet(1, 1, **kwargs))
    if args.checkpoint:
        state_dict, _ = extract_state_dict(load_checkpoint(args.checkpoint), source=args.checkpoint)
        network.load_state_dict(state_dict)
    network = network.to(device).eval().to(memory_format=torch.channels_last_3d)
    inputs = crops(args.images, args.spacing, args.roi, args.crops, args.seed)
    length = network.num_patches(args.roi)
    k = num_hard(num_masked(length, args.mask_ratio), 0.5)
    generator = torch.Generator().manual_seed(args.seed)
    overlaps = {p: [] for p in args.precisions}
    seconds = {p: [] for p in ["fp32", *args.precisions]}
    for i, crop in enumerate(inputs):
        x = crop[None].to(device).contiguous(memory_format=torch.channels_last_3d)
        for _ in range(args.masks):
            m0 = random_patch_mask(1, length, args.mask_ratio, generator=generator).to(device)
            reference, t = hard_patches(network, x, m0, k, "fp32")
            seconds["fp32"].append(t)
            for p in args.precisions:
                hard, t = hard_patches(network, x, m0, k, p)
                seconds[p].append(t)
                overlaps[p].append(float((hard & reference).sum()) / k)
        print(
            f"crop {i + 1}/{len(inputs)}: "
            + ", ".join(f"{p} overlap {overlaps[p][-1]:.3f}" for p in args.precisions)
        )

    results = {"fp32": {"median_s": statistics.median(seconds["fp32"])}}
    for p in args.precisions:
        results[p] = {
            "median_s": statistics.median(seconds[p]),
            "speed_up": statistics.median(seconds["fp32"]) / statistics.median(seconds[p]),
            "overlap_mean": statistics.fmean(overlaps[p]),
            "overlap_min": min(overlaps[p]),
            "identical_fraction": sum(o == 1.0 for o in overlaps[p]) / len(overlaps[p]),
            "overlaps": overlaps[p],
        }
        r = results[p]
        print(
            f"{p}: top-{k} overlap with fp32 mean {r['overlap_mean']:.4f} (min {r['overlap_min']:.3f}, "
            f"identical {100 * r['identical_fraction']:.0f} %), teacher pass {r['median_s']:.3f} s vs fp32 "
            f"{results['fp32']['median_s']:.3f} s (x{r['speed_up']:.2f})"
        )
    write_report(
        args.out,
        {
            "benchmark": "teacher_precision",
            "checkpoint": args.checkpoint,
            "network": kwargs,
            "images": args.images,
            "spacing": args.spacing,
            "roi": args.roi,
            "k": k,
            "patches": length,
            "samples": len(inputs) * args.masks,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
