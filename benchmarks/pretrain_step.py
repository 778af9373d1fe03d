"""Seconds and peak memory of one pretraining step: SparK (random mask) against AnatoMask, interleaved.

A step is exactly what the pretraining bundle runs per iteration (:class:`AnatoMaskIteration` with its
defaults): random mask, for AnatoMask the teacher pass and the guided mask (r_t = 0.5, the final and
most expensive state), student forward and backward, gradient clipping, fused AdamW, and for AnatoMask
the EMA update. Each configuration runs in its own process (peak memory of its own); the steps are
interleaved round by round. Prints a table and writes JSON with ``teacher_overhead_ratio`` (AnatoMask /
SparK median) per backend. Example (CPU, about 25 minutes for STU-Net-B):

    python benchmarks/pretrain_step.py --size B --backends dense spconv --repeats 2 \
        --out benchmarks/results/pretrain_step_B_cpu.json
"""

from __future__ import annotations

import argparse
import inspect
from types import SimpleNamespace

import torch
from common import METHODS, add_run_arguments, print_results, run_configurations, step_options, write_report

from anatomask_components.engines import AnatoMaskIteration
from anatomask_components.masking import HardRatioSchedule
from anatomask_components.networks import STUNET_PRESETS, AnatoMaskPretrainModel, STUNet
from anatomask_components.optim import parameter_groups
from anatomask_components.strategies import RandomMasking, TeacherReconstructionMasking
from anatomask_components.teacher import EMATeacher

# the tiny preset's blocks and widths, with the default strides (four halvings: total stride 16)
TINY = {"depths": list(STUNET_PRESETS["tiny"][0]), "dims": list(STUNET_PRESETS["tiny"][1])}


def stunet_backbone(size: str) -> STUNet:
    """The pretraining backbone of :class:`AnatoMaskPretrainModel` for a preset name or ``tiny``."""
    return STUNet(1, 1, **(TINY if size == "tiny" else {"size": size}))


def build_step(
    size: str,
    roi: list[int],
    batch: int,
    backend: str,
    method: str,
    channels_last: bool = True,
    precision: str = "fp32",
    teacher_precision: str | None = None,
    compile: bool = False,
    mask_ratio: float = 0.6,
    seed: int = 0,
):
    """Build one configuration; returns its ``step()`` (runs in the benchmark's child process)."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = AnatoMaskPretrainModel(stunet_backbone(size), backend=backend).to(device)
    teacher = EMATeacher(network) if method == "anatomask" else None
    options = {
        "precision": precision,
        "channels_last": channels_last,
        "compile": compile,
        "seed": seed,
    }
    if teacher is None:
        masking = RandomMasking(mask_ratio)
    else:
        schedule = HardRatioSchedule(total_epochs=1, start=0.5, end=0.5)
        masking = TeacherReconstructionMasking(
            teacher, schedule, mask_ratio, precision=teacher_precision or precision
        )
    # options an older version of the package lacks are left out, so that it can be timed too (before/after)
    accepted = inspect.signature(AnatoMaskIteration).parameters
    iteration = AnatoMaskIteration(
        masking, teacher=teacher, **{k: v for k, v in options.items() if k in accepted}
    )
    optimizer = torch.optim.AdamW(
        parameter_groups(network, 1e-5, decay_all=True), lr=1e-4, betas=(0.9, 0.999), fused=True
    )
    state = SimpleNamespace(device=device, iteration=0, epoch=1, epoch_length=1000, max_epochs=1000)
    engine = SimpleNamespace(network=network, optimizer=optimizer, state=state)
    batchdata = {"image": torch.randn(batch, 1, *roi, generator=torch.Generator().manual_seed(seed))}

    def step() -> None:
        state.iteration += 1
        iteration(engine, batchdata)
        if teacher is not None:
            teacher(engine)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="B", help="STU-Net preset S, B, L, H, or 'tiny' (widths 8-64)")
    parser.add_argument(
        "--backends", nargs="+", default=["dense", "spconv"], choices=["dense", "spconv", "auto"]
    )
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--methods", nargs="+", default=["spark", "anatomask"], choices=list(METHODS))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--teacher-precision", default=None, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    add_run_arguments(parser, "benchmarks/results/pretrain_step.json")
    args = parser.parse_args()

    configurations = [
        (f"{method}/{backend}", build_step, step_options(args, backend, method))
        for backend in args.backends
        for method in args.methods
    ]
    print(f"STU-Net-{args.size}, crop {args.roi}, batch {args.batch}: {len(configurations)} configurations")
    results = run_configurations(configurations, args.warmup, args.repeats)

    ratios = {
        b: results[f"anatomask/{b}"]["median_s"] / results[f"spark/{b}"]["median_s"]
        for b in args.backends
        if f"anatomask/{b}" in results and f"spark/{b}" in results
    }
    print_results(results)
    for b, r in ratios.items():
        print(f"teacher_overhead_ratio (AnatoMask / SparK, {b}): {r:.3f}")
    write_report(
        args.out,
        {
            "benchmark": "pretrain_step",
            "size": args.size,
            "roi": args.roi,
            "batch": args.batch,
            "mask_ratio": args.mask_ratio,
            "precision": args.precision,
            "teacher_precision": args.teacher_precision or args.precision,
            "channels_last": not args.contiguous,
            "compile": args.compile,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "results": results,
            "teacher_overhead_ratio": ratios,
        },
    )


if __name__ == "__main__":
    main()
