"""Mask generation per batch: our vectorised generator against a per-sample Python loop.

Times one iteration's masks (random mask ``m0``, then the guided mask from the teacher's scores at hard
ratio 0.5) for several batch sizes on the 7 x 7 x 8 = 392-patch grid of a 112 x 112 x 128 crop. The loop
is written the way the reference code builds its masks (per sample: sort the scores, take the hardest,
delete them from the index list, shuffle the rest with NumPy). With ``--step-json`` (a JSON of
``pretrain_step.py`` or ``reference_step.py``) it also prints the share of a pretraining step. Example:

    python benchmarks/mask_generation.py --step-json benchmarks/results/reference_step_B_cpu.json \
        --out benchmarks/results/mask_generation_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit

import numpy as np
import torch
from common import write_report

from anatomask_components.masking import num_hard, num_masked, random_patch_mask, reconstruction_guided_mask


def vectorised_masks(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``m0`` and the guided mask with the package's generators."""
    batch, length = scores.shape
    m0 = random_patch_mask(batch, length, 0.6, generator=generator)
    return reconstruction_guided_mask(
        scores.masked_fill(~m0, 0.0), 0.6, 0.5, candidates=m0, generator=generator
    )


def per_sample_random_masks(batch: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """``m0`` sample by sample: a permutation per sample, its first ``n_masked`` masked."""
    n_masked = num_masked(length, 0.6)
    out = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        out[b, torch.from_numpy(rng.permutation(length)[:n_masked])] = True
    return out


def per_sample_guided_masks(
    scores: torch.Tensor, candidates: torch.Tensor, rng: np.random.Generator
) -> torch.Tensor:
    """The guided mask sample by sample: sort, take the hardest candidates, shuffle the rest with NumPy."""
    batch, length = scores.shape
    n_masked = num_masked(length, 0.6)
    k = num_hard(n_masked, 0.5)
    out = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        s = scores[b].numpy().copy()
        s[~candidates[b].numpy()] = -np.inf
        hard = np.argsort(s)[-k:]
        rest = np.delete(np.arange(length), hard)
        rng.shuffle(rest)
        out[b, torch.from_numpy(np.concatenate([hard, rest[: n_masked - k]]))] = True
    return out


def per_sample_masks(scores: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``m0`` and the guided mask, both built sample by sample in Python and NumPy."""
    return per_sample_guided_masks(scores, per_sample_random_masks(*scores.shape, rng), rng)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--patches", type=int, default=392, help="patches per crop (392: 112 x 112 x 128)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--step-json", default=None, help="a step benchmark's JSON, for the share of a step")
    parser.add_argument("--out", default="benchmarks/results/mask_generation.json")
    args = parser.parse_args()

    step_s = step_batch = None
    if args.step_json:
        report = json.loads(open(args.step_json, encoding="utf-8").read())
        # the fastest AnatoMask step measured there (the largest share), compared at its own batch size
        step_s = min(r["median_s"] for name, r in report["results"].items() if "anatomask" in name)
        step_batch = int(report["batch"])
        args.batches = sorted(set(args.batches) | {step_batch})
    results = {}
    print(
        f"{'batch':>6}{'vectorised ms':>16}{'per-sample ms':>16}{'speed-up':>10}"
        + ("  % of step" if step_s else "")
    )
    for batch in args.batches:
        scores = torch.rand(batch, args.patches, generator=torch.Generator().manual_seed(batch))
        generator = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)
        fast = timeit.repeat(
            lambda s=scores, g=generator: vectorised_masks(s, g), number=1, repeat=args.repeats
        )
        slow = timeit.repeat(lambda s=scores, r=rng: per_sample_masks(s, r), number=1, repeat=args.repeats)
        row = {
            "vectorised_ms": 1e3 * statistics.median(fast),
            "per_sample_ms": 1e3 * statistics.median(slow),
        }
        row["speed_up"] = row["per_sample_ms"] / row["vectorised_ms"]
        line = f"{batch:>6}{row['vectorised_ms']:>16.3f}{row['per_sample_ms']:>16.3f}{row['speed_up']:>10.1f}"
        if batch == step_batch:
            row["percent_of_step"] = 100 * row["vectorised_ms"] / 1e3 / step_s
            line += f"  {row['percent_of_step']:.4f}"
        results[str(batch)] = row
        print(line)
    write_report(
        args.out,
        {
            "benchmark": "mask_generation",
            "patches": args.patches,
            "repeats": args.repeats,
            "step_json": args.step_json,
            "step_s": step_s,
            "step_batch": step_batch,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
