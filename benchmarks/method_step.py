"""Seconds per pretraining iteration of each method: SparK, AnatoMask, HPM (STU-Net) and SelfMedHPM (ViT).

One iteration is what the bundle runs: :class:`~anatomask_components.engines.AnatoMaskIteration` (teacher
pass, guided mask, student forward and backward, AdamW step) followed by the EMA update of the teacher, at a
constant hard ratio ``r_t`` so that every iteration pays for the teacher. The methods run interleaved in one
process (A, B, C, A, B, C, ...), so that a change of load on the machine hits all of them alike; medians are
reported. Example:

    python benchmarks/method_step.py --repeats 5 --out benchmarks/results/method_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from anatomask_components.engines import AnatoMaskIteration
from anatomask_components.masking import HardRatioSchedule
from anatomask_components.networks import STUNET_PRESETS, AnatoMaskPretrainModel, MAEPretrainModel, STUNet
from anatomask_components.strategies import LossPredictorMasking, RandomMasking, TeacherReconstructionMasking
from anatomask_components.teacher import EMATeacher

# the small STU-Net of the benchmarks (widths 8-64, mask unit 16^3)
# the tiny preset's blocks and widths, with the default strides (four halvings: total stride 16)
TINY_STUNET = {"depths": list(STUNET_PRESETS["tiny"][0]), "dims": list(STUNET_PRESETS["tiny"][1])}


def _methods(stunet_roi: list[int], vit_roi: list[int]) -> dict[str, dict]:
    """name -> network factory, masking strategy (from the teacher and the hard-ratio schedule) and crop."""
    return {
        "SparK (random), STU-Net": {
            "network": lambda: AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET)),
            "masking": lambda teacher, schedule: RandomMasking(0.6),
            "roi": stunet_roi,
        },
        "AnatoMask, STU-Net": {
            "network": lambda: AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET)),
            "masking": lambda teacher, schedule: TeacherReconstructionMasking(teacher, schedule, 0.6),
            "roi": stunet_roi,
        },
        "HPM (head), STU-Net": {
            "network": lambda: AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), loss_predictor="head"),
            "masking": lambda teacher, schedule: LossPredictorMasking(teacher, schedule, 0.6),
            "roi": stunet_roi,
        },
        "HPM (decoder), STU-Net": {
            "network": lambda: AnatoMaskPretrainModel(STUNet(1, 1, **TINY_STUNET), loss_predictor="decoder"),
            "masking": lambda teacher, schedule: LossPredictorMasking(teacher, schedule, 0.6),
            "roi": stunet_roi,
        },
        "SelfMedHPM, ViT-B MAE": {
            "network": lambda: MAEPretrainModel(img_size=vit_roi, loss_predictor="decoder"),
            "masking": lambda teacher, schedule: LossPredictorMasking(teacher, schedule, 0.75),
            "roi": vit_roi,
        },
    }


def _setup(spec: dict, batch: int, hard_ratio: float, device: torch.device) -> dict:
    torch.manual_seed(0)
    network = spec["network"]().to(device)
    teacher = EMATeacher(network)
    schedule = HardRatioSchedule(total_epochs=1, start=hard_ratio, end=hard_ratio)
    iteration = AnatoMaskIteration(spec["masking"](teacher, schedule), teacher=teacher)
    state = SimpleNamespace(device=device, iteration=0, epoch=1, epoch_length=1)
    engine = SimpleNamespace(
        network=network, optimizer=torch.optim.AdamW(network.parameters(), lr=1e-4), state=state
    )
    image = torch.randn(batch, 1, *spec["roi"], device=device)
    return {"iteration": iteration, "teacher": teacher, "engine": engine, "batch": {"image": image}}


def _step(run: dict) -> float:
    run["engine"].state.iteration += 1
    start = time.perf_counter()
    run["iteration"](run["engine"], run["batch"])
    run["teacher"].update(0.999)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stunet-roi", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--vit-roi", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hard-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the method names")
    parser.add_argument("--out", default="benchmarks/results/method_step.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = _methods(args.stunet_roi, args.vit_roi)
    names = args.methods or list(methods)
    runs = {name: _setup(methods[name], args.batch, args.hard_ratio, device) for name in names}
    for _ in range(args.warmup):
        for run in runs.values():
            _step(run)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(_step(run))
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)

    baseline = statistics.median(times["AnatoMask, STU-Net"]) if "AnatoMask, STU-Net" in times else None
    rows = []
    for name in names:
        spec, run = methods[name], runs[name]
        masking = run["iteration"].masking
        median = statistics.median(times[name])
        rows.append(
            {
                "method": name,
                "masking": type(masking).__name__,
                "mask_ratio": masking.mask_ratio,
                "roi": spec["roi"],
                "parameters_m": sum(p.numel() for p in run["engine"].network.parameters()) / 1e6,
                "median_s": median,
                "over_anatomask": median / baseline if baseline else None,
                "times_s": times[name],
            }
        )
    threads = torch.get_num_threads()
    print(f"\nbatch {args.batch}, r_t = {args.hard_ratio}, {threads} threads, {args.repeats} runs")
    print(f"{'method':<26}{'crop':>14}{'params':>10}{'median s/it':>13}{'/ AnatoMask':>13}")
    for row in rows:
        ratio = f"{row['over_anatomask']:.2f}" if row["over_anatomask"] else "-"
        crop = "x".join(map(str, row["roi"]))
        print(f"{row['method']:<26}{crop:>14}{row['parameters_m']:>9.2f}M{row['median_s']:>13.2f}{ratio:>13}")
    report = {
        "batch": args.batch,
        "hard_ratio": args.hard_ratio,
        "repeats": args.repeats,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
