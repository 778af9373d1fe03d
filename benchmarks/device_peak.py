"""What this device's matrix products reach in fp32 and bf16: the yardstick for a step's FLOP rate.

Times square matrix products (the best case of dense arithmetic) and prints GFLOP/s per precision, with
the CPU's vector and matrix extensions. Example:

    python benchmarks/device_peak.py --out benchmarks/results/device_peak_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_extensions() -> list[str]:
    """The CPU's AVX / AMX flags (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/device_peak.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.size
    results = {}
    for name, dtype in DTYPES.items():
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rate = 2 * n**3 / seconds / 1e9
        results[name] = {"median_s": seconds, "gflops_per_s": rate}
        print(f"{name}: {n} x {n} matrix product {seconds * 1e3:.1f} ms = {rate:.0f} GFLOP/s")
    extensions = cpu_extensions() if device.type == "cpu" else []
    if extensions:
        print("CPU extensions:", " ".join(extensions))
    write_report(
        args.out, {"benchmark": "device_peak", "size": n, "results": results, "cpu_extensions": extensions}
    )


if __name__ == "__main__":
    main()
