"""The ``anatomask`` command line (python-fire).

Each command lives next to the code it drives; this module only gathers them. Imports are done lazily
inside the commands so that ``anatomask --help`` stays fast.

Errors a user can cause and fix (a bad scan, a missing file, a malformed datalist, a wrong option, a failed
download) end the command with one line on stderr, ``anatomask <command>: error: <message>``, and exit
code 1; set ``ANATOMASK_DEBUG=1`` to get the traceback instead. Any other exception is a bug and keeps its
traceback. ``COMMANDS`` holds the plain functions, which raise as usual when called from Python.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import fire


class CommandFailed(Exception):
    """A command ran to the end but found problems (``check-data`` with invalid items): exit code 1."""


# OSError subclasses other than these (out of memory, too many open files, ...) are not the user's to fix.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    CommandFailed,
    ValueError,  # InvalidScanError, bad options, malformed JSON
    KeyError,  # a datalist item without a required key
    RuntimeError,  # failed downloads; MONAI's "applying transform" wrapper (unwrapped first)
    FileNotFoundError,
    FileExistsError,  # an output that must not exist yet
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


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
    datalist: str = "",
    output: str = "fingerprint.json",
    sections: tuple[str, ...] = ("training", "validation"),
    samples_per_case: int = 10000,
    seed: int = 1234,
    image_channel_dim: int | None = None,
    on_error: str = "raise",
    window: tuple[float, float] | None = None,
) -> None:
    """Foreground intensity statistics (percentiles 0.5/99.5, mean, std) for nnU-Net's CT normalisation.

    Args:
        datalist: datalist JSON (not needed with ``window``).
        output: fingerprint JSON to write.
        sections: datalist sections to sample.
        samples_per_case: foreground voxels sampled per case and channel.
        seed: sampling seed.
        image_channel_dim: -1 for MSD-style 4D multi-channel files.
        on_error: raise, or warn to skip bad scans.
        window: ``[low,high]`` HU: write a fixed CT window instead (one mapping for pretraining and
            fine-tuning, e.g. ``--window=[-160,240]``: docs/finetune.md, "The demo's recipe").
    """
    from anatomask_components.data.fingerprint import compute_fingerprint, window_fingerprint

    if window is not None:
        import json

        from anatomask_components.files import atomic_write_text

        low, high = window
        atomic_write_text(output, json.dumps(window_fingerprint(low, high), indent=4) + "\n")
        print(f"[fingerprint] CT window [{low}, {high}] HU -> {output}")
        return
    if not datalist:
        raise ValueError("fingerprint needs a datalist, or --window=[low,high] for a fixed CT window")

    with warnings.catch_warnings():
        # Listed in the summary below instead.
        warnings.filterwarnings("ignore", message="fingerprint: skipping invalid item")
        result = compute_fingerprint(
            datalist,
            output,
            sections,
            samples_per_case=samples_per_case,
            seed=seed,
            image_channel_dim=image_channel_dim,
            on_error=on_error,
        )
    skipped = result["skipped"]
    print(f"[fingerprint] {result['num_cases']} case(s) used, {len(skipped)} invalid case(s) skipped")
    for error in skipped:
        print(f"  skipped {error}")


def check_data(
    datalist: str,
    num_classes: int | None = None,
    output: str | None = None,
    image_channel_dim: int | None = None,
) -> None:
    """Load every scan of a datalist once and report unusable files; optionally write a cleaned datalist.

    Prints how many items were checked and found invalid, per section, and exits with code 1 when any item
    is invalid.

    Args:
        datalist: datalist JSON.
        num_classes: if given, label values must lie in 0..num_classes-1.
        output: write the datalist without the bad items here.
        image_channel_dim: -1 for MSD-style 4D multi-channel files.
    """
    import json

    from anatomask_components.data.checks import check_datalist, load_datalist

    sections = ("training", "validation", "test")
    content, name = load_datalist(datalist)
    with warnings.catch_warnings():
        # Listed in the summary below instead.
        warnings.filterwarnings("ignore", message="skipping invalid item")
        cleaned, errors = check_datalist(
            content,
            sections,
            num_classes=num_classes,
            image_channel_dim=image_channel_dim,
            on_error="warn",
            name=name,
        )
    counts = {section: len(content.get(section) or []) for section in sections}
    per_section = "; ".join(
        f"{section}: {counts[section]} checked, {counts[section] - len(cleaned[section])} invalid"
        for section in sections
    )
    total = sum(counts.values())
    print(f"[check-data] {name}: {total} checked, {len(errors)} invalid ({per_section})")
    for error in errors:
        print(f"  invalid: {error}")
    if output is not None:
        with open(output, "w") as f:
            json.dump(cleaned, f, indent=4)
        print(f"[check-data] cleaned datalist -> {output}")
    if errors:
        raise CommandFailed(f"{len(errors)} of {total} items are invalid (listed above)")


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
    partial_case_b: bool = False,
) -> None:
    """The end-to-end demo on real CT: pretrain (SparK and AnatoMask), fine-tune FLARE22 three ways, evaluate
    and infer on an unseen DICOM series, and write ``<output>/report.html`` and ``report.md``.

    Args:
        output: output folder (its run folders are recreated).
        quick: the quick preset, under 5 minutes on 2 CPU cores: fewer steps, smaller crops, and
            fine-tuning from scratch and from AnatoMask's encoder only (``DemoSettings.preset``).
        seed: seed of every run.
        cache_dir: where the example archive is kept (default $ANATOMASK_CACHE or ~/.cache/anatomask).
        report_only: rebuild the report from an earlier run's results.json.
        partial_case_b: fine-tune on case B's aorta too, a partially labelled second case (off by default:
            see docs/finetune.md, "Partially labelled scans").
    """
    from anatomask_components.demo import run_demo

    run_demo(
        output,
        quick=quick,
        seed=seed,
        cache_dir=cache_dir,
        report_only=report_only,
        partial_case_b=partial_case_b,
    )


def export_bundle(name: str, out: str, weights: str | None = None) -> None:
    """Write a Model Zoo archive (zip) of a bundle that runs without this package installed: the package's
    code travels inside it as ``scripts/anatomask_components`` (the Zoo's ``scripts/`` convention).

    Args:
        name: a bundle folder, or the name of a folder of the repository's bundles/ (anatomask_pretrain,
            anatomask_finetune_flare22, ...).
        out: zip file to write.
        weights: flat state dict of the bundle's network, stored as models/model.pt (default: no weights;
            large_files.yml lists published ones).
    """
    from anatomask_components.export import export_bundle as export

    archive = export(name, out, weights)
    print(f"[export-bundle] {name} -> {archive} ({archive.stat().st_size} bytes)")


def build_bundle(dataset: str, out: str | None = None) -> None:
    """Build a fine-tuning bundle from the package's template and a dataset folder (spec.json,
    metadata.json, README_data.md, data_license.txt); see docs/finetune.md, "Adding a dataset".

    Args:
        dataset: the dataset folder.
        out: the bundle folder to write, whose name is the bundle's (default: the folder holding DATASET).
            Its configs/, docs/, LICENSE and large_files.yml are written; nothing else there is touched.
    """
    from anatomask_components.bundle_builder import build_bundle as build

    folder = build(dataset, out)
    print(f"[build-bundle] {dataset} -> {folder}")


def build_bundles(check: bool = False) -> None:
    """Rebuild every fine-tuning bundle of the repository (bundles/*/dataset/) from the package's template.

    Args:
        check: write nothing; list the files that differ from what the builder writes and exit with code 1
            if any does.
    """
    from anatomask_components.bundle_builder import build_repository_bundles

    differences = build_repository_bundles(check)
    for name, files in differences.items():
        state = "up to date" if not files else ("differs" if check else "rebuilt")
        print(f"[build-bundles] {name}: {state}")
        for file in files:
            print(f"  {file}")
    stale = [name for name, files in differences.items() if files]
    if check and stale:
        raise CommandFailed(
            f"{', '.join(stale)} differ from their dataset folders; run anatomask build-bundles"
        )


def export_monailabel_app(out: str, pretrained: str, finetuned: str | tuple[str, ...] = ()) -> None:
    """Write a MONAI Label 0.8.5 app with active learning on reconstruction difficulty (scoring method
    anatomask_difficulty, strategy anatomask_hardest, and random), serving fine-tuning bundles if given. It
    runs without this package installed: its code travels in the bundles' scripts/ folders.

    Args:
        out: app folder to write (new or empty).
        pretrained: anatomask_pretrain archive made by export-bundle, or pretraining weights (flat state dict
            with fingerprint.json beside it), exported here.
        finetuned: fine-tuning archives made by export-bundle, comma-separated.
    """
    from anatomask_components.monailabel_app import export_monailabel_app as export

    archives = [a for a in finetuned.split(",") if a] if isinstance(finetuned, str) else list(finetuned)
    app = export(out, pretrained, archives)
    bundles = sorted(p.name for p in (app / "model").iterdir())
    print(f"[export-monailabel-app] {app}: bundles {', '.join(bundles)}")


def rank_scans(
    bundle: str,
    dataset_dir: str,
    out: str,
    weights: str = "teacher",
    num_masks: int = 4,
    seed: int = 0,
    batch_size: int = 2,
    device: str | None = None,
    maps: bool = True,
) -> None:
    """Rank scans by how hard a pretrained AnatoMask network finds them to reconstruct, most difficult first:
    writes OUT/ranking.csv, OUT/ranking.html (thumbnails, difficulty overlays, histogram; needs matplotlib)
    and OUT/maps/*.nii.gz. Unreadable scans are listed with their error. See docs/difficulty.md.

    Args:
        bundle: trained pretraining bundle folder (configs/inference.json, models/model.pt).
        dataset_dir: folder of scans (recursive) or a datalist JSON.
        out: output folder.
        weights: teacher (newest training checkpoint's EMA teacher, else models/model.pt), student, or a file.
        num_masks: random masks per window.
        seed: seed of the masks.
        batch_size: windows per forward pass.
        device: cpu, cuda, ... (default: cuda if available).
        maps: write the per-patch difficulty maps as NIfTI.
    """
    from anatomask_components.ranking import rank_scans as rank

    result = rank(bundle, dataset_dir, out, weights, num_masks, seed, batch_size, device, maps)
    print(
        f"[rank-scans] {len(result['ranked'])} scored ({result['seconds_per_scan']:.1f} s per scan), "
        f"{len(result['errors'])} could not be scored -> {result['csv']}, {result['html']}"
    )
    for scan, error in result["errors"]:
        print(f"  not scored: {error}" if scan in error else f"  not scored: {scan}: {error}")


def preprocess(
    source: str,
    bundle: str | tuple[str, ...] = "anatomask_pretrain",
    workers: int = 4,
    stage: str = "both",
    bundle_root: str | None = None,
    config_file: str | tuple[str, ...] = (),
    cache_dir: str | None = None,
    allow_bad: bool = False,
) -> None:
    """Fill the preprocessing cache ahead of training, in parallel, so that the run starts at once.

    Prints a progress line and a summary (scans per second, bytes written, bad scans with their errors);
    exits with code 1 when any scan is bad, unless ``--allow_bad``.

    Args:
        source: datalist JSON or dataset folder, as the bundle's ``datalist`` / ``dataset_dir``.
        bundle: bundle name(s) or folder(s), e.g. anatomask_pretrain,anatomask_finetune_flare22.
        workers: worker processes (0: in this process).
        stage: pretrain, finetune or both: which of the bundles' datasets to fill.
        bundle_root: the run's bundle root (default the bundle folder): the CT fingerprint is stored there.
        config_file: further config files of the run (merged on top of configs/train.json).
        cache_dir: cache folder (default: the bundle's, i.e. the machine's cache).
        allow_bad: exit with code 0 even when bad scans were found.
    """
    from anatomask_components.data.cache import CacheFullError
    from anatomask_components.data.preprocess import preprocess as fill

    files = (config_file,) if isinstance(config_file, str) else tuple(config_file)
    try:
        report = fill(source, bundle, workers, stage, bundle_root, files, cache_dir)
    except CacheFullError as error:
        raise CommandFailed(str(error)) from error
    if report["bad"] and not allow_bad:
        raise CommandFailed(f"{len(report['bad'])} of {report['scans']} scans are bad (listed above)")


def cache(
    cache_dir: str | None = None,
    prune_before: str | None = None,
    max_size: str | None = None,
    dry_run: bool = False,
) -> None:
    """Show the preprocessing cache's size per dataset; prune what no run used since a date or beyond a size.

    Entries of runs in progress are never removed.

    Args:
        cache_dir: cache folder (default $ANATOMASK_PREPROCESSED_CACHE or ~/.cache/anatomask/preprocessed).
        prune_before: remove entries last used before this date (2026-12-01 or 2026-12-01T08:30).
        max_size: then remove the least recently used entries until the cache holds at most this (50GB).
        dry_run: only report what pruning would remove.
    """
    from anatomask_components.data.cache import cache_command

    cache_command(cache_dir, prune_before, max_size, dry_run)


COMMANDS = {
    "info": info,
    "datalist": datalist,
    "fingerprint": fingerprint,
    "check-data": check_data,
    "fetch-examples": fetch_examples,
    "phantoms": phantoms,
    "report": report,
    "demo": demo,
    "export-bundle": export_bundle,
    "build-bundle": build_bundle,
    "build-bundles": build_bundles,
    "preprocess": preprocess,
    "cache": cache,
    "export-monailabel-app": export_monailabel_app,
    "rank-scans": rank_scans,
}


def error_message(error: BaseException) -> str:
    """One line describing an expected error."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    elif isinstance(error, KeyError) and type(error).__str__ is KeyError.__str__:
        message = f"missing key {error}"  # a bare KeyError prints only the quoted key
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def reporting_errors(name: str, command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with expected errors turned into ``anatomask <name>: error: <message>`` and exit code 1."""

    @functools.wraps(command)  # fire reads the signature and docstring through __wrapped__
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as error:
            from anatomask_components.data.validation import transform_error_cause

            cause = transform_error_cause(error)
            debug = os.environ.get("ANATOMASK_DEBUG", "") not in ("", "0")
            if debug or not isinstance(cause, EXPECTED_ERRORS):
                raise
            print(f"anatomask {name}: error: {error_message(cause)}", file=sys.stderr, flush=True)
            sys.exit(1)

    return run


def main() -> None:
    """Entry point of the ``anatomask`` console script."""
    fire.Fire({name: reporting_errors(name, command) for name, command in COMMANDS.items()}, name="anatomask")


if __name__ == "__main__":
    main()
