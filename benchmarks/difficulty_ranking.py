"""Does the reconstruction difficulty rank the odd scans first? Measured against baselines.

The set: the real example scans (cases A, B and C, C a DICOM series; TotalSegmentator 2.18.0's reference
files, ``anatomask fetch-examples``), five corrupted copies of each (``benchmarks/corruptions.py``: noise,
streak, truncated field of view, no rescale slope/intercept, flipped slice axis) and the example MR among
them. The odd ones are the corrupted copies and the MR; the originals are the normal scans.

Each method gives every scan a score, higher = more suspicious:

- ``teacher``: :class:`~anatomask_components.difficulty.DifficultyScorer` with the bundle's EMA teacher and
  its target (``raw`` in the pretraining bundle); ``teacher_normalized``: the same with the per-patch
  normalised target (the student's loss);
- ``untrained``: the same network freshly initialised (seeded), the bundle's target;
- ``stats_set``: plain HU statistics (mean, std, 1st/50th/99th percentiles of the scan at the bundle's
  spacing): the largest robust z-distance ``|x - median| / (1.4826 MAD)`` of the five, median and MAD over
  the whole set;
- ``stats_pretraining``: the same distance, the median taken over the bundle's pretraining scans instead (here
  the three originals: the network has seen them too; the MAD is still the whole set's).

Reported: AUROC (odd vs normal); recall at k (the share of the odd scans among the k highest scores) for k =
the number of odd scans; how many odd scans score above every normal one; per kind the AUROC of its copies
(or the MR) against the originals; per corruption the share of copies scoring above their own original (the
within-scan sensitivity); the seconds per scan of each network. ``--num_masks`` defaults to 2 here
(``rank-scans``: 4): at mask ratio 0.6 two masks already reconstruct every patch once, and the set is scored
three times.

The pretrained bundle: ``--bundle DIR`` (a trained pretraining bundle), or ``--pretrain`` to make one in
``--work`` with the demo's pretraining stage (``anatomask demo``'s settings: the small six-stage STU-Net,
3 mm, 96 x 96 x 32 crops, 30 epochs = 90 iterations over cases A, B and C with AnatoMask masking, seed 0;
about two minutes on 2 CPU cores). Example:

    python benchmarks/difficulty_ranking.py --pretrain --work /tmp/difficulty_work \
        --out benchmarks/results/difficulty_ranking_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import write_report
from corruptions import CORRUPTIONS, write_corrupted
from monai.bundle import ConfigParser

from anatomask_components.data.examples import fetch_examples
from anatomask_components.difficulty import DifficultyScorer

STAT_FEATURES = ("hu_mean", "hu_std", "hu_p1", "hu_p50", "hu_p99")
ORIGINALS = {"A": "images/A_ct.nii.gz", "B": "images/B_ct.nii.gz", "C": "images/C_ct_dicom"}
MR = "images/MR_mr.nii.gz"


def pretrain_bundle(work: Path, data: Path, seed: int) -> Path:
    """The demo's pretraining stage (AnatoMask masking) on cases A, B, C, in ``work/pretrain_anatomask``."""
    from anatomask_components.demo.pipeline import (
        BUNDLES_DIR,
        PRETRAIN_BUNDLE,
        prepare_bundle,
        pretrain_override,
        run_bundle,
    )
    from anatomask_components.demo.settings import DemoSettings

    settings = DemoSettings.preset(seed=seed)
    datalist = data / "datalists" / "pretrain.json"
    folder = prepare_bundle(
        BUNDLES_DIR / PRETRAIN_BUNDLE,
        work / "pretrain_anatomask",
        pretrain_override(settings, "anatomask", datalist, work / "cache"),
    )
    run_bundle(folder, ["configs/train.json", "configs/demo_override.json"], "pretrain", "train.log")
    return folder


def untrained_weights(bundle: Path, path: Path, seed: int) -> Path:
    """A flat state dict of the bundle's ``network_def`` as initialised with ``seed``."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(seed)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def build_set(data: Path, work: Path, seed: int) -> list[dict]:
    """Originals, their corrupted copies and the MR: ``[{"name", "path", "kind", "odd"}]``."""
    scans = []
    for case, relative in ORIGINALS.items():
        scans.append(
            {"name": case, "path": str(data / relative), "kind": "original", "odd": False, "case": case}
        )
        written = write_corrupted(data / relative, work / "corrupted", case, seed)
        for corruption, path in written.items():
            name = f"{case}_{corruption}"
            scans.append({"name": name, "path": str(path), "kind": corruption, "odd": True, "case": case})
    scans.append({"name": "MR", "path": str(data / MR), "kind": "mr_among_ct", "odd": True, "case": None})
    return scans


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(score of an odd scan > score of a normal one), ties counting half (Mann-Whitney)."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return float(np.mean(pairs)) if pairs else float("nan")


def recall_at(scores: list[float], odd: list[bool], k: int) -> float:
    """Share of the odd scans found among the ``k`` highest scores (ties broken by the set's order)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(sum(odd[i] for i in order) / max(sum(odd), 1))


def odd_before_first_normal(scores: list[float], odd: list[bool]) -> int:
    """How many odd scans score strictly above every normal scan."""
    highest_normal = max(x for x, o in zip(scores, odd) if not o)
    return sum(x > highest_normal for x, o in zip(scores, odd) if o)


def robust_distance(stats: list[dict], reference: list[int]) -> list[float]:
    """Largest robust z-distance of each scan's HU statistics from the median of the ``reference`` scans."""
    distances = np.zeros(len(stats))
    for feature in STAT_FEATURES:
        values = np.array([s[feature] for s in stats])
        median = np.median(values[reference])
        spread = 1.4826 * np.median(np.abs(values - np.median(values))) or 1.0
        distances = np.maximum(distances, np.abs(values - median) / spread)
    return distances.tolist()


def evaluate(scores: list[float], scans: list[dict]) -> dict:
    odd = [s["odd"] for s in scans]
    normal = [x for x, s in zip(scores, scans) if not s["odd"]]
    original = {s["case"]: x for x, s in zip(scores, scans) if s["kind"] == "original"}
    per_kind, above_own = {}, {}
    for kind in CORRUPTIONS:
        copies = [(x, s["case"]) for x, s in zip(scores, scans) if s["kind"] == kind]
        per_kind[kind] = auroc([x for x, _ in copies], normal)
        above_own[kind] = float(np.mean([x > original[case] for x, case in copies]))
    per_kind["mr_among_ct"] = auroc([x for x, s in zip(scores, scans) if s["kind"] == "mr_among_ct"], normal)
    return {
        "auroc": auroc([x for x, s in zip(scores, scans) if s["odd"]], normal),
        f"recall_at_{sum(odd)}": recall_at(scores, odd, sum(odd)),
        "odd_before_first_normal": odd_before_first_normal(scores, odd),
        "auroc_per_kind": per_kind,
        "copies_above_own_original": above_own,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="a trained pretraining bundle folder")
    source.add_argument("--pretrain", action="store_true", help="make one with the demo's pretraining stage")
    parser.add_argument("--work", type=Path, default=Path("difficulty_work"), help="examples, copies, bundle")
    parser.add_argument("--num_masks", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/difficulty_ranking_cpu.json")
    args = parser.parse_args()

    data = args.work / "examples"
    fetch_examples(str(data))
    bundle = pretrain_bundle(args.work, data, args.seed) if args.pretrain else args.bundle
    scans = build_set(data, args.work, args.seed)
    untrained = untrained_weights(bundle, args.work / "untrained.pt", args.seed)

    networks = {
        "teacher": {"weights": "teacher"},
        "teacher_normalized": {"weights": "teacher", "overrides": {"teacher_target": "normalized"}},
        "untrained": {"weights": str(untrained)},
    }
    scores: dict[str, list[float]] = {}
    quantiles: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    scan_seconds: dict[str, list[float]] = {}
    about: dict[str, dict] = {}
    stats: list[dict] = []
    for method, options in networks.items():
        scorer = DifficultyScorer(
            bundle, num_masks=args.num_masks, seed=args.seed, batch_size=args.batch_size, **options
        )
        about[method] = {"weights": scorer.weights_source, "sha256": scorer.model_digest}
        started = time.perf_counter()
        results = []
        for scan in scans:
            results.append(scorer.score_file(scan["path"]))
            print(
                f"{method:>20} {scan['name']:>18} score {results[-1].score:.4f} ({results[-1].seconds:.1f} s)"
            )
        seconds[method] = (time.perf_counter() - started) / len(scans)
        scores[method] = [r.score for r in results]
        quantiles[method] = [r.quantile for r in results]
        scan_seconds[method] = [r.seconds for r in results]
        if not stats:
            stats = [r.stats | {"flags": r.flags} for r in results]
    scores["stats_set"] = robust_distance(stats, list(range(len(scans))))
    scores["stats_pretraining"] = robust_distance(
        stats, [i for i, s in enumerate(scans) if s["kind"] == "original"]
    )

    table = {method: evaluate(values, scans) for method, values in scores.items()}
    table.update({f"{m}_quantile": evaluate(q, scans) for m, q in quantiles.items()})
    n_odd = sum(s["odd"] for s in scans)
    kinds = [*CORRUPTIONS, "mr_among_ct"]
    print(
        f"\n{len(scans)} scans, {n_odd} odd; AUROC, recall at {n_odd}, odd scans above every normal one; "
        "AUROC per kind; share of copies above their own original"
    )
    print(
        f"{'method':>26} {'AUROC':>6} {f'R@{n_odd}':>5} {'above':>5} "
        + " ".join(f"{k[:10]:>10}" for k in kinds)
        + " | "
        + " ".join(f"{k[:5]:>5}" for k in CORRUPTIONS)
    )
    for method, row in table.items():
        per_kind = " ".join(f"{row['auroc_per_kind'][k]:>10.2f}" for k in kinds)
        recall = f"{row[f'recall_at_{n_odd}']:>5.2f} {row['odd_before_first_normal']:>5d}"
        own = " ".join(f"{row['copies_above_own_original'][k]:>5.2f}" for k in CORRUPTIONS)
        print(f"{method:>26} {row['auroc']:>6.3f} {recall} {per_kind} | {own}")
    print("seconds per scan: " + ", ".join(f"{m} {s:.1f}" for m, s in seconds.items()))
    write_report(
        args.out,
        {
            "bundle": str(bundle),
            "networks": about,
            "num_masks": args.num_masks,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "scans": [
                {
                    **scan,
                    **{m: scores[m][i] for m in scores},
                    "seconds": {m: scan_seconds[m][i] for m in scan_seconds},
                    "stats": stats[i],
                }
                for i, scan in enumerate(scans)
            ],
            "table": table,
            "seconds_per_scan": seconds,
        },
    )


if __name__ == "__main__":
    main()
