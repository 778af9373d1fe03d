"""The same pretraining step with two checkouts of the package, interleaved in one run (before / after).

Each configuration's child process puts its checkout first on ``sys.path`` before it imports the
package, so one run times, say, a ``git worktree`` of an older commit against the working tree, round
after round, and the ratio is taken between configurations of the same run. The step is
``pretrain_step.py``'s (options an older package lacks are left out). Example (CPU, about 5 minutes for
STU-Net-B in bf16):

    git worktree add /tmp/before <commit>
    python benchmarks/versions_step.py --before /tmp/before --after . --precision bf16 \
        --out benchmarks/results/versions_step_B_cpu_bf16.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import METHODS, add_run_arguments, print_results, run_configurations, step_options, write_report


def build_versioned_step(checkout: str, **step_options):
    """``pretrain_step.build_step`` with the package imported from ``checkout`` (in the child process)."""
    checkout = str(Path(checkout).resolve())
    sys.path.insert(0, checkout)
    import anatomask_components

    if not Path(anatomask_components.__file__).resolve().is_relative_to(checkout):
        raise RuntimeError(
            f"anatomask_components came from {anatomask_components.__file__}, not {checkout}: "
            "was it imported before?"
        )
    from pretrain_step import build_step

    return build_step(**step_options)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="checkout of the older package (repository root)")
    parser.add_argument("--after", default=".", help="checkout of the newer package (default: here)")
    parser.add_argument("--size", default="B", help="STU-Net preset S, B, L, H, or 'tiny'")
    parser.add_argument("--method", default="anatomask", choices=list(METHODS))
    parser.add_argument("--backend", default="dense", choices=["dense", "spconv", "auto"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    add_run_arguments(parser, "benchmarks/results/versions_step.json")
    args = parser.parse_args()

    checkouts = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    for name, path in checkouts.items():
        if not (Path(path) / "anatomask_components" / "__init__.py").is_file():
            raise SystemExit(f"--{name} {path}: no anatomask_components package there")
    step = step_options(args, args.backend, args.method)
    configurations = [
        (name, build_versioned_step, {"checkout": path, **step}) for name, path in checkouts.items()
    ]
    print(f"STU-Net-{args.size} {args.method} step ({args.backend}, {args.precision}): before / after")
    results = run_configurations(configurations, args.warmup, args.repeats)
    print_results(results)
    ratios = {
        "time_after_over_before": results["after"]["median_s"] / results["before"]["median_s"],
        "memory_after_over_before": results["after"]["peak_memory_bytes"]
        / results["before"]["peak_memory_bytes"],
    }
    print(
        f"after / before: time {ratios['time_after_over_before']:.3f}, "
        f"peak memory {ratios['memory_after_over_before']:.3f}"
    )
    write_report(
        args.out,
        {
            "benchmark": "versions_step",
            "checkouts": checkouts,
            **step,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "results": results,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
