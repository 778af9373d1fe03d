"""Whole inference of a fine-tuning bundle on a real CT, against the network's own time, per setting.

Runs the bundle's ``configs/inference.json`` with ``python -m monai.bundle run`` (what a user runs) on
one scan, once per setting and round, the settings interleaved (A, B, A, B, ...). Each run's
``inference_report.json`` gives the case's seconds per stage (preprocess, sliding-window inferer,
network alone, postprocess = inversion to the input grid + argmax, write); the process wall time adds
start-up and model loading. The label maps of every setting are compared with those of the first
(the default) by DSC per label. Example (CPU; STU-Net-B at 0.5 and 0.25 overlap):

    python benchmarks/inference.py --image demo_output/data/images/A_ct.nii.gz \
        --model my_finetuned/models/model.pt \
        --settings '{"sw_overlap": 0.5}' '{"sw_overlap": 0.25}' \
        --out benchmarks/results/inference_B_cpu.json

Without ``--model`` the bundle's network starts from its initialisation (timings only; the DSC
agreement of two untrained label maps means little). ``--label`` (a label map on the scan's grid, in
the bundle's label set) adds each setting's DSC against it, to show how well the network segments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from common import write_report

from anatomask_components.bundle_builder import bundle_folder
from anatomask_components.demo.pipeline import run_bundle as demo_run_bundle


def run_bundle(bundle: Path, image: str, model: str, output_dir: Path, overrides: dict) -> dict:
    """One ``monai.bundle run`` of the inference config in a fresh interpreter (the demo's runner: wall
    time with start-up, peak memory, log);
    the case's seconds per stage and its label map from ``inference_report.json``."""
    override = output_dir / "benchmark_override.json"
    # absolute paths: the bundle runs in its own folder
    settings = {
        "dataset_dir": str(Path(image).resolve()),
        "output_dir": str(output_dir.resolve()),
        "model_path": str(Path(model).resolve()),
        **overrides,
    }
    override.write_text(json.dumps(settings, indent=4), encoding="utf-8")
    config_files = [str(bundle / "configs" / "inference.json"), str(override)]
    stage = demo_run_bundle(
        bundle, config_files, f"inference {overrides}", str(output_dir / "bundle_run.log")
    )
    case = json.loads((output_dir / "inference_report.json").read_text(encoding="utf-8"))["written"][0]
    return {
        "wall_s": stage.wall_s,
        "peak_rss_mb": stage.peak_rss_mb,
        "case_s": case["seconds"],
        "stages": case["stage_seconds"],
        "label_map": case["label_map"],
    }


def label_agreement(a: str, b: str) -> dict[str, float]:
    """DSC of every foreground label present in either map, their mean, and the voxel agreement."""
    x = np.asarray(nib.load(a).dataobj)
    y = np.asarray(nib.load(b).dataobj)
    scores = {}
    for label in sorted((set(np.unique(x)) | set(np.unique(y))) - {0}):
        px, py = x == label, y == label
        scores[str(int(label))] = float(2 * np.logical_and(px, py).sum() / (px.sum() + py.sum()))
    scores["mean"] = float(np.mean(list(scores.values()))) if scores else float("nan")
    foreground = (x > 0) | (y > 0)
    scores["foreground_voxels"] = int(foreground.sum())
    scores["voxel_agreement"] = float((x == y).mean())
    scores["foreground_agreement"] = float((x == y)[foreground].mean()) if foreground.any() else float("nan")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle",
        default="anatomask_finetune_flare22",
        help="a bundle folder, or the name of one of the repository's bundles",
    )
    parser.add_argument("--image", required=True, help="one CT scan (file or DICOM folder)")
    parser.add_argument("--model", default=None, help="fine-tuned model.pt (default: an untrained network)")
    parser.add_argument(
        "--network",
        default="{}",
        help="JSON of network overrides, e.g. '{\"stunet_dims\": [16, 32, 64, 128, 128, 128]}'",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=['{"sw_overlap": 0.5}', '{"sw_overlap": 0.25}'],
        help="JSON override per setting; the first is the reference of the DSC agreement",
    )
    parser.add_argument("--label", default=None, help="reference label map of the scan (optional)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the settings")
    parser.add_argument("--workdir", default=None, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()

    bundle = bundle_folder(args.bundle).resolve()
    network = json.loads(args.network)
    settings = [json.loads(s) for s in args.settings]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        model = args.model
        if model is None:
            import torch
            from monai.bundle import ConfigParser

            parser_ = ConfigParser()
            parser_.read_config(str(bundle / "configs" / "inference.json"))
            parser_.update({"bundle_root": str(bundle), **network})
            model = str(workdir / "untrained_model.pt")
            workdir.mkdir(parents=True, exist_ok=True)
            torch.save(parser_.get_parsed_content("network_def").state_dict(), model)
        runs: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
        for r in range(args.repeats):
            for i, setting in enumerate(settings):
                out = workdir / f"setting{i}_round{r}"
                out.mkdir(parents=True, exist_ok=True)
                run = run_bundle(bundle, args.image, model, out, {**network, **setting})
                runs[i].append(run)
                stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stages"].items())
                label = f"[round {r + 1}/{args.repeats}] {json.dumps(setting)}"
                print(f"{label}: case {run['case_s']:.1f} s ({stages})", flush=True)
        results = []
        for i, setting in enumerate(settings):
            case_s = statistics.median(run["case_s"] for run in runs[i])
            network_s = statistics.median(run["stages"]["network"] for run in runs[i])
            row = {
                "setting": setting,
                "case_median_s": case_s,
                "network_median_s": network_s,
                "case_over_network": case_s / network_s,
                "wall_median_s": statistics.median(run["wall_s"] for run in runs[i]),
                "stages": [run["stages"] for run in runs[i]],
                "dsc_vs_first": label_agreement(runs[0][0]["label_map"], runs[i][0]["label_map"]),
            }
            if args.label:
                row["dsc_vs_label"] = label_agreement(args.label, runs[i][0]["label_map"])
            results.append(row)
    base = results[0]["case_median_s"]
    print(
        f"\n{'setting':<40}{'case s':>8}{'network s':>11}{'case/net':>10}{'speed-up':>10}{'DSC vs 1st':>12}"
        + (f"{'DSC vs label':>14}" if args.label else "")
    )
    for row in results:
        row["speed_up_vs_first"] = base / row["case_median_s"]
        print(
            f"{json.dumps(row['setting']):<40}{row['case_median_s']:>8.1f}{row['network_median_s']:>11.1f}"
            f"{row['case_over_network']:>10.3f}{row['speed_up_vs_first']:>10.2f}{row['dsc_vs_first']['mean']:>12.4f}"
            + (f"{row['dsc_vs_label']['mean']:>14.4f}" if args.label else "")
        )
    write_report(
        args.out,
        {
            "benchmark": "inference",
            "bundle": str(Path(args.bundle)),
            "image": args.image,
            "model": args.model or "untrained",
            "label": args.label,
            "network": network,
            "repeats": args.repeats,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
