"""The ``anatomask`` command line (python-fire).

Each command lives next to the code it drives; this module only gathers them. Imports are done lazily
inside the commands so that ``anatomask --help`` stays fast.
"""

from __future__ import annotations

import fire


def info() -> None:
    """Print the STU-Net presets and their parameter counts (1 input, 105 output channels)."""
    from anatomask_components.networks.stunet import print_presets

    print_presets()


def datalist(
    root: str,
    output: str | None = None,
    layout: str = "auto",
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
    modality: str | None = None,
    relative: bool = False,
) -> None:
    """Write a MONAI datalist (training/validation/test) from a dataset folder.

    Args:
        root: dataset folder (for msd also the dataset.json file).
        output: JSON file to write (default: print the counts only).
        layout: auto, folder (scans for pretraining, recursive), nnunet, msd or autopet.
        fractions: training,validation,test fractions, e.g. 0.7,0.1,0.2.
        seed: split seed.
        folds: number of cross-validation folds (then validation = fold FOLD).
        fold: validation fold.
        modality: folder layout only: CT, MR or PET stored in every item.
        relative: store paths relative to the output file.
    """
    from anatomask_components.data.datalists import build_datalist

    build_datalist(root, output, layout, fractions, seed, folds, fold, modality, relative)


def fingerprint(
    datalist: str,
    output: str = "fingerprint.json",
    sections: tuple[str, ...] = ("training", "validation"),
    samples_per_case: int = 10000,
    seed: int = 1234,
    image_channel_dim: int | None = None,
    on_error: str = "raise",
) -> None:
    """Foreground intensity statistics (percentiles 0.5/99.5, mean, std) for nnU-Net's CT normalisation.

    Args:
        datalist: datalist JSON.
        output: fingerprint JSON to write.
        sections: datalist sections to sample.
        samples_per_case: foreground voxels sampled per case and channel.
        seed: sampling seed.
        image_channel_dim: -1 for MSD-style 4D multi-channel files.
        on_error: raise, or warn to skip bad scans.
    """
    from anatomask_components.data.fingerprint import compute_fingerprint

    compute_fingerprint(
        datalist,
        output,
        sections,
        samples_per_case=samples_per_case,
        seed=seed,
        image_channel_dim=image_channel_dim,
        on_error=on_error,
    )


def check_data(
    datalist: str,
    num_classes: int | None = None,
    output: str | None = None,
    image_channel_dim: int | None = None,
) -> None:
    """Load every scan of a datalist once and report unusable files; optionally write a cleaned datalist.

    Args:
        datalist: datalist JSON.
        num_classes: if given, label values must lie in 0..num_classes-1.
        output: write the datalist without the bad items here.
        image_channel_dim: -1 for MSD-style 4D multi-channel files.
    """
    import json

    from anatomask_components.data.validation import check_datalist

    cleaned, errors = check_datalist(
        datalist, num_classes=num_classes, image_channel_dim=image_channel_dim, on_error="warn"
    )
    print(f"[check-data] {len(errors)} invalid item(s)")
    for error in errors:
        print(f"  {error}")
    if output is not None:
        with open(output, "w") as f:
            json.dump(cleaned, f, indent=4)
        print(f"[check-data] cleaned datalist -> {output}")


def fetch_examples(dest: str, cache_dir: str | None = None) -> None:
    """Fetch real example CT/MR (TotalSegmentator 2.18.0 source archive, sha256-pinned, cached) and write
    FLARE22/AMOS22 label remappings and datalists.

    Args:
        dest: output folder.
        cache_dir: archive cache (default $ANATOMASK_CACHE or ~/.cache/anatomask).
    """
    from anatomask_components.data.examples import fetch_examples as fetch

    fetch(dest, cache_dir)


def phantoms(
    dest: str,
    n_cases: int = 4,
    layout: str = "datalist",
    shape: tuple[int, int, int] = (64, 64, 64),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    num_classes: int = 5,
    modality: str = "CT",
    seed: int = 0,
) -> None:
    """Write a synthetic phantom dataset (body with organ ellipsoids) for offline trials.

    Args:
        dest: output folder.
        n_cases: number of cases.
        layout: datalist, folder, nnunet, msd or autopet.
        shape: voxels per case.
        spacing: voxel size in mm.
        num_classes: classes including background.
        modality: CT, MR or PET.
        seed: base seed.
    """
    from anatomask_components.data.phantoms import write_phantom_dataset

    write_phantom_dataset(dest, n_cases, shape, spacing, num_classes, seed, layout, modality)
    print(f"[phantoms] {n_cases} {modality} cases ({layout} layout) -> {dest}")


def report(path: str) -> None:
    """Print the DSC/NSD table of a fine-tuning evaluation (its summary.json or metrics.csv).

    Args:
        path: ``eval/summary.json`` or ``eval/metrics.csv`` written by a fine-tuning bundle's evaluate.json.
    """
    from anatomask_components.evaluation import report as print_report

    print_report(path)


def demo(
    output: str = "demo_output",
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
    report_only: bool = False,
) -> None:
    """The end-to-end demo on real CT: pretrain (SparK and AnatoMask), fine-tune FLARE22 three ways, evaluate
    and infer on an unseen DICOM series, and write ``<output>/report.html`` and ``report.md``.

    Args:
        output: output folder (its run folders are recreated).
        quick: fewer steps, same stages and report (a few minutes on 2 CPU cores).
        seed: seed of every run.
        cache_dir: where the example archive is kept (default $ANATOMASK_CACHE or ~/.cache/anatomask).
        report_only: rebuild the report from an earlier run's results.json.
    """
    from anatomask_components.demo import run_demo

    run_demo(output, quick=quick, seed=seed, cache_dir=cache_dir, report_only=report_only)


COMMANDS = {
    "info": info,
    "datalist": datalist,
    "fingerprint": fingerprint,
    "check-data": check_data,
    "fetch-examples": fetch_examples,
    "phantoms": phantoms,
    "report": report,
    "demo": demo,
}


def main() -> None:
    """Entry point of the ``anatomask`` console script."""
    fire.Fire(COMMANDS, name="anatomask")


if __name__ == "__main__":
    main()
