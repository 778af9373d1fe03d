"""Where one pretraining step's time goes: its phases and the operators that cost the most.

Profiles one step of ``pretrain_step.py`` (after a warm-up step) with ``torch.profiler``: the phases
the iteration names (teacher pass with its guided mask, student forward with the loss, backward,
clipping + optimiser, EMA update) and the top operators by their own time; then counts the step's
floating-point operations with ``torch.utils.flop_counter`` (convolutions and matrix products, dense:
masked positions count) and times one more step without the profiler, for the achieved FLOP/s. Prints
all and writes JSON.
Example (CPU, about 3 minutes for STU-Net-B):

    python benchmarks/profile_step.py --size B --method anatomask \
        --out benchmarks/results/profile_step_B_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch
from common import METHODS, step_options, write_report
from pretrain_step import build_step
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

PHASES = (
    "anatomask.teacher",
    "anatomask.student_forward",
    "anatomask.backward",
    "anatomask.optimizer",
    "anatomask.ema",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="B")
    parser.add_argument("--roi", type=int, nargs=3, default=[112, 112, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", default="dense", choices=["dense", "spconv"])
    parser.add_argument("--method", default="anatomask", choices=list(METHODS))
    parser.add_argument("--contiguous", action="store_true")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--top", type=int, default=15, help="operators to list")
    parser.add_argument("--out", default="benchmarks/results/profile_step.json")
    args = parser.parse_args()

    options = step_options(args, args.backend, args.method)
    step = build_step(**options)
    step()  # warm-up: allocator, oneDNN primitives
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    total = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    start = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    plain = time.perf_counter() - start
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    phases = {name: by_name[name].cpu_time_total / 1e6 for name in PHASES if name in by_name}
    operators = sorted(
        (e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True
    )[: args.top]
    top = [{"operator": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in operators]

    print(
        f"one {args.method} step of STU-Net-{args.size} ({args.backend}, {args.precision}), "
        f"{total:.2f} s under the profiler"
    )
    for name, seconds in phases.items():
        print(f"  {name:<28}{seconds:>8.2f} s  {100 * seconds / total:5.1f} %")
    rate = flops / plain / 1e9
    print(f"{flops / 1e12:.2f} TFLOP per step; {plain:.2f} s without the profiler: {rate:.0f} GFLOP/s")
    print("top operators by own time:")
    for row in top:
        share = 100 * row["self_s"] / total
        print(f"  {row['operator']:<36}{row['self_s']:>8.2f} s  {share:5.1f} %  ({row['calls']} calls)")
    write_report(
        args.out,
        {
            "benchmark": "profile_step",
            **options,
            "profiled_step_s": total,
            "step_s": plain,
            "flops": flops,
            "gflops_per_s": flops / plain / 1e9,
            "phases_s": phases,
            "top_operators": top,
        },
    )


if __name__ == "__main__":
    main()
