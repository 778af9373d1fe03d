"""Evaluation of fine-tuned segmentation models: metrics, reports, and the case lists they run on.

Case lists: :func:`datalist_section` and :func:`inference_items` turn a datalist, a dataset folder, a
folder of scans or one scan into items with a unique ``case`` name (used for output files and metric
rows); :func:`reference_label_transforms` loads a reference label map in its own geometry, where the
predictions are scored.

Metrics (per case, per foreground class):

- **DSC** ``2 |P & R| / (|P| + |R|)``.
- **NSD** (normalised surface Dice, Nikolov et al. 2021): the fraction of the two surfaces lying within
  ``tolerance_mm`` of the other surface, with DeepMind's sub-voxel surface elements (MONAI's
  ``compute_surface_dice(use_subvoxels=True)``) and distances in mm from the voxel spacing of the image.
  Default tolerance 1 mm for every class (the FLARE22 challenge setting); configurable per class.
- optionally (``lesion_volumes``, AutoPET): **false-positive volume** (mL of predicted connected
  components that touch no reference voxel) and **false-negative volume** (mL of reference components
  that no predicted voxel touches), 18-connectivity, as the autoPET challenge defines them.

Empty masks: when a class is absent from both the reference and the prediction (a study without lesions
predicted empty), DSC and NSD are undefined and stored as NaN (empty in the CSV, ``null`` in the JSON);
means and SDs skip them and report how many values they used (``n``), as nnU-Net does. Pass
``empty_score=1.0`` to count a correct empty prediction as perfect instead. When the class is absent from
only one of them, DSC and NSD are 0.

Summaries give, per class, the mean and SD (population SD, ``ddof=0``) over cases, and the per-case
mean over classes ("per patient") with its mean and SD over cases.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from scipy import ndimage

from anatomask_components.data.datalists import build_datalist, find_scans, load_datalist_section
from anatomask_components.data.labels import RemapLabelsd
from anatomask_components.data.readers import AnatoMaskReader, image_suffix, is_dicom_series_dir
from anatomask_components.data.validation import InvalidScanError, ValidateScand

__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "METRIC_COLUMNS",
    "case_ids",
    "case_metrics",
    "datalist_section",
    "format_report",
    "inference_items",
    "atomic_write_text",
    "read_metrics_csv",
    "reference_label_transforms",
    "report",
    "resolve_tolerances",
    "summarize",
    "voxel_spacing",
    "with_case_ids",
    "write_metrics",
]

DEFAULT_TOLERANCE_MM = 1.0
METRIC_COLUMNS = ("dsc", "nsd")
LESION_COLUMNS = ("false_positive_ml", "false_negative_ml")
CSV_COLUMNS = (
    "case",
    "label",
    "name",
    *METRIC_COLUMNS,
    "tolerance_mm",
    "reference_voxels",
    "predicted_voxels",
    *LESION_COLUMNS,
)
# 18-connectivity, as in the autoPET evaluation.
_LESION_CONNECTIVITY = ndimage.generate_binary_structure(3, 2)
# The AutoPET study layout: one folder per study with these channel files.
AUTOPET_CHANNEL_FILES = ("CTres.nii.gz", "SUV.nii.gz")


def case_ids(
    items: Sequence[Mapping[str, Any]], image_key: str = "image", root: str | os.PathLike | None = None
) -> list[str]:
    """Unique, readable case names for datalist items.

    A case is named after its image file (or, for a list of channel files, their common folder),
    relative to ``root`` (default: the folder that holds all cases), without the image suffix and with
    ``/`` replaced by ``_``: ``images/case_001.nii.gz`` -> ``case_001``,
    ``PETCT_0a1/03-2001/{CTres,SUV}.nii.gz`` -> ``PETCT_0a1_03-2001``. Repeated names get ``_2``, ...

    Args:
        items: datalist items.
        image_key: the item key of the image path (or list of channel paths).
        root: the folder names are relative to; it must hold every case.

    Returns:
        one name per item.
    """
    anchors = []
    for item in items:
        value = item[image_key]
        paths = (
            [os.path.abspath(v) for v in value]
            if isinstance(value, (list, tuple))
            else [os.path.abspath(value)]
        )
        anchors.append(Path(paths[0] if len(paths) == 1 else os.path.commonpath(paths)))
    if not anchors:
        return []
    root = (
        Path(os.path.abspath(root))
        if root is not None
        else Path(os.path.commonpath([a.parent for a in anchors]))
    )
    names: list[str] = []
    for anchor in anchors:
        relative = anchor.relative_to(root)
        name = str(relative) if relative.parts else anchor.name
        suffix = image_suffix(name)
        name = (name[: -len(suffix)] if suffix else name).replace(os.sep, "_")
        unique, repeat = name, 1
        while unique in names:
            repeat += 1
            unique = f"{name}_{repeat}"
        names.append(unique)
    return names


def with_case_ids(
    items: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    case_key: str = "case",
    root: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Copies of ``items`` with a ``case`` name (:func:`case_ids`) where they have none."""
    names = case_ids(items, image_key, root)
    return [{case_key: name, **item} for item, name in zip(items, names)]


def datalist_section(
    source: str | os.PathLike,
    section: str,
    require_labels: bool = False,
    label_key: str = "label",
) -> list[dict[str, Any]]:
    """The items of one section of a datalist, named (see :func:`case_ids`).

    Args:
        source: a MONAI datalist JSON (relative paths are resolved from its folder), or a dataset folder in
            any layout :func:`anatomask_components.data.datalists.build_datalist` recognises (nnU-Net,
            MSD, AutoPET; split 70/10/20 with seed 0).
        section: ``"training"``, ``"validation"`` or ``"test"``; a section the datalist lacks is empty.
        require_labels: raise if an item has no ``label_key``.
        label_key: the label item key.

    Returns:
        the items, each with a ``case`` name.

    Raises:
        ValueError: an item without a label when ``require_labels``.
    """
    source = Path(source)
    if source.is_file():
        # one-line errors for broken JSON, repeated items dropped with a warning
        items = load_datalist_section(source, section)
    else:
        items = build_datalist(str(source)).get(section, [])
    if require_labels:
        unlabelled = [item for item in items if label_key not in item]
        if unlabelled:
            raise ValueError(
                f"{source}: {len(unlabelled)} {section} item(s) without '{label_key}', e.g. {unlabelled[0]}"
            )
    return with_case_ids(items)


def inference_items(
    source: str | os.PathLike,
    channel_files: Sequence[str] | None = None,
    section: str = "test",
    modality: str | None = None,
) -> list[dict[str, Any]]:
    """The scans to segment, named (see :func:`case_ids`).

    Args:
        source: one scan (a file or a DICOM series folder), a folder searched recursively for scans
            (NIfTI, NRRD, MHA/MHD, DICOM series), or a datalist JSON (its ``section``).
        channel_files: for multi-channel models: the file names of the channels inside each case folder
            (AutoPET: ``("CTres.nii.gz", "SUV.nii.gz")``); every folder under ``source`` that holds all
            of them is a case.
        section: the datalist section to read when ``source`` is a JSON file.
        modality: stored as ``modality`` in items that have none (e.g. ``"MR"`` for a folder of MR scans).

    Returns:
        items ``{"case": name, "image": path or [channel paths], ...}``.

    Raises:
        InvalidScanError: the source does not exist or holds no scans.
    """
    source = Path(source)
    if not source.exists():
        raise InvalidScanError(source, "does not exist")
    if source.is_file() and source.suffix.lower() == ".json":
        items = datalist_section(source, section)
    elif channel_files:
        folders = sorted({p.parent for p in source.rglob(channel_files[0])})
        items = [
            {"image": [str(folder / name) for name in channel_files]}
            for folder in folders
            if all((folder / name).is_file() for name in channel_files)
        ]
    elif source.is_file() or is_dicom_series_dir(source):
        items = [{"image": str(source)}]
    else:
        items = [{"image": scan} for scan in find_scans(source)[0]]
    if not items:
        wanted = f"case folders with {', '.join(channel_files)}" if channel_files else "scans"
        raise InvalidScanError(source, f"no {wanted} found")
    if modality is not None:
        items = [{"modality": modality, **item} for item in items]
    folder = source if source.is_dir() and not is_dicom_series_dir(source) else None
    return with_case_ids(items, root=folder)


def reference_label_transforms(
    label_key: str = "label",
    num_classes: int | None = None,
    label_mapping: str | os.PathLike | Mapping[Any, Any] | None = None,
) -> Compose:
    """Load a reference label map in its own geometry (no reorientation, no resampling).

    Args:
        label_key: item key of the label path.
        num_classes: if given, label values (after remapping) must lie in ``0 .. num_classes - 1``.
        label_mapping: remap label ids first (see :mod:`anatomask_components.data.labels`).

    Returns:
        a Compose turning ``{label_key: path}`` into ``{label_key: (1, H, W, D) MetaTensor}``.
    """
    transforms: list = [
        LoadImaged(label_key, reader=AnatoMaskReader()),
        EnsureChannelFirstd(label_key),
    ]
    if label_mapping is not None:
        transforms.append(RemapLabelsd(label_key, label_mapping))
    transforms.append(ValidateScand(label_key, label_key=label_key, num_classes=num_classes))
    return Compose(transforms)


def voxel_spacing(affine: np.ndarray | torch.Tensor) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the lengths of the affine's first three columns.

    Args:
        affine: (4, 4) voxel-to-world affine (flipped and oblique axes allowed).

    Returns:
        the three spacings.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(matrix, axis=0))


def resolve_tolerances(
    labels: Mapping[int, str], tolerance_mm: float | Mapping[str, float] = DEFAULT_TOLERANCE_MM
) -> dict[int, float]:
    """NSD tolerance (mm) of every foreground class.

    Args:
        labels: ``{label id: name}`` of the foreground classes.
        tolerance_mm: one value for all classes, or ``{class name or id (as text): mm}``; classes not named
            keep :data:`DEFAULT_TOLERANCE_MM`.

    Returns:
        ``{label id: mm}``.

    Raises:
        ValueError: a name or id that is not a class, or a negative tolerance.
    """
    if isinstance(tolerance_mm, Mapping):
        by_name = {name: label for label, name in labels.items()} | {str(label): label for label in labels}
        unknown = [k for k in tolerance_mm if str(k) not in by_name]
        if unknown:
            raise ValueError(f"NSD tolerances for unknown classes {unknown}; classes are {sorted(by_name)}")
        tolerances = {label: DEFAULT_TOLERANCE_MM for label in labels}
        tolerances.update({by_name[str(k)]: float(v) for k, v in tolerance_mm.items()})
    else:
        tolerances = {label: float(tolerance_mm) for label in labels}
    if any(not math.isfinite(v) or v < 0 for v in tolerances.values()):
        raise ValueError(f"NSD tolerances must be finite and >= 0 mm, got {tolerances}")
    return tolerances


def _as_label_array(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (H, W, D) or (1, H, W, D) label map, got shape {array.shape}")
    return np.rint(array).astype(np.int64)


def _surface_dice(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    """NSD of two non-empty binary masks (cropped to their joint bounding box, plus a margin)."""
    joint = np.argwhere(pred | ref)
    low = np.maximum(joint.min(axis=0) - 2, 0)
    high = joint.max(axis=0) + 3
    box = tuple(slice(a, b) for a, b in zip(low, high))
    p, r = torch.from_numpy(pred[box]), torch.from_numpy(ref[box])
    one_hot_pred = torch.stack([~p, p])[None]
    one_hot_ref = torch.stack([~r, r])[None]
    with warnings.catch_warnings():
        # monai 1.6 calls its own deprecated get_mask_edges argument internally
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_surface_dice(
            one_hot_pred, one_hot_ref, [tolerance], spacing=list(spacing), use_subvoxels=True
        )
    return float(value[0, 0])


def _unmatched_volume(mask: np.ndarray, other: np.ndarray) -> int:
    """Voxels of the connected components of ``mask`` that do not touch ``other``."""
    components, count = ndimage.label(mask, structure=_LESION_CONNECTIVITY)
    if count == 0:
        return 0
    touched = np.unique(components[other & (components > 0)])
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    return int(sizes[1:].sum() - sizes[touched].sum())


def case_metrics(
    prediction: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    labels: Mapping[int, str],
    tolerance_mm: float | Mapping[str, float] = DEFAULT_TOLERANCE_MM,
    lesion_volumes: bool = False,
    empty_score: float = math.nan,
    case: str = "",
) -> list[dict[str, Any]]:
    """DSC and NSD of one case, one row per foreground class.

    Args:
        prediction: predicted label map, (H, W, D) or (1, H, W, D), integer ids.
        reference: reference label map on the same grid.
        spacing: voxel size (mm) along the three array axes (see :func:`voxel_spacing`).
        labels: ``{label id: name}`` of the foreground classes to score (background 0 is never scored).
        tolerance_mm: NSD tolerance, one value or per class (see :func:`resolve_tolerances`).
        lesion_volumes: also compute the false-positive and false-negative volumes (mL).
        empty_score: DSC and NSD when a class is absent from both maps (default NaN: not counted).
        case: the case name stored in every row.

    Returns:
        rows with the keys of :data:`CSV_COLUMNS` (lesion volumes only when asked).

    Raises:
        ValueError: the maps differ in shape.
    """
    pred, ref = _as_label_array(prediction), _as_label_array(reference)
    if pred.shape != ref.shape:
        raise ValueError(
            f"{case or 'case'}: prediction shape {pred.shape} differs from reference {ref.shape}"
        )
    tolerances = resolve_tolerances(labels, tolerance_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for label, name in labels.items():
        if int(label) == 0:
            continue
        p, r = pred == int(label), ref == int(label)
        n_pred, n_ref = int(p.sum()), int(r.sum())
        if n_pred == 0 and n_ref == 0:
            dsc = nsd = float(empty_score)
        elif n_pred == 0 or n_ref == 0:
            dsc = nsd = 0.0
        else:
            dsc = 2.0 * int((p & r).sum()) / (n_pred + n_ref)
            nsd = _surface_dice(p, r, spacing, tolerances[label])
        row: dict[str, Any] = {
            "case": case,
            "label": int(label),
            "name": name,
            "dsc": dsc,
            "nsd": nsd,
            "tolerance_mm": tolerances[label],
            "reference_voxels": n_ref,
            "predicted_voxels": n_pred,
        }
        if lesion_volumes:
            row["false_positive_ml"] = _unmatched_volume(p, r) * voxel_ml
            row["false_negative_ml"] = _unmatched_volume(r, p) * voxel_ml
        rows.append(row)
    return rows


def _statistics(values: Sequence[float]) -> dict[str, float | int | None]:
    finite = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if finite.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(finite.mean()), "sd": float(finite.std()), "n": int(finite.size)}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and SD over cases per class, and of the per-case mean over classes.

    Args:
        rows: rows of :func:`case_metrics` (any number of cases).

    Returns:
        ``{"num_cases", "metrics", "classes": {name: {"label", "tolerance_mm", <metric>: {"mean", "sd",
        "n"}}}, "per_case_mean": {<metric>: {"mean", "sd", "n"}}}``; undefined values are None.
    """
    metrics = [m for m in (*METRIC_COLUMNS, *LESION_COLUMNS) if any(m in row for row in rows)]
    cases = list(dict.fromkeys(row["case"] for row in rows))
    classes: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = classes.setdefault(
            row["name"],
            {"label": int(row["label"]), "tolerance_mm": float(row["tolerance_mm"]), "values": []},
        )
        entry["values"].append(row)
    summary_classes = {
        name: {
            "label": entry["label"],
            "tolerance_mm": entry["tolerance_mm"],
            **{m: _statistics([float(r[m]) for r in entry["values"]]) for m in metrics},
        }
        for name, entry in classes.items()
    }
    per_case: dict[str, dict[str, float | int | None]] = {}
    for metric in metrics:
        means = []
        for case in cases:
            case_stats = _statistics([float(r[metric]) for r in rows if r["case"] == case])
            means.append(math.nan if case_stats["mean"] is None else case_stats["mean"])
        per_case[metric] = _statistics(means)
    return {
        "num_cases": len(cases),
        "metrics": metrics,
        "classes": summary_classes,
        "per_case_mean": per_case,
    }


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _csv_value(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def write_metrics(
    rows: Sequence[Mapping[str, Any]],
    csv_path: str | os.PathLike,
    summary_path: str | os.PathLike,
) -> dict[str, Any]:
    """Write the per-case rows as CSV and their :func:`summarize` as JSON (both atomically).

    Args:
        rows: rows of :func:`case_metrics`.
        csv_path: CSV file, one row per case and class (NaN written as an empty field).
        summary_path: JSON summary file.

    Returns:
        the summary.
    """
    columns = [c for c in CSV_COLUMNS if c not in LESION_COLUMNS or any(c in row for row in rows)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c, "")) for c in columns})
    atomic_write_text(Path(csv_path), text.getvalue())
    summary = summarize(rows)
    atomic_write_text(Path(summary_path), json.dumps(summary, indent=4) + "\n")
    return summary


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_metrics` back into rows (empty fields become NaN)."""
    numeric = {*METRIC_COLUMNS, *LESION_COLUMNS, "tolerance_mm"}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            row["label"] = int(row["label"])
            for column in numeric & set(row):
                row[column] = float(row[column]) if row[column] != "" else math.nan
            rows.append(row)
    return rows


def _cell(stats: Mapping[str, Any], scale: float) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean'] * scale:.2f} ± {stats['sd'] * scale:.2f}"


def format_report(summary: Mapping[str, Any]) -> str:
    """The summary as a text table: one line per class, then the per-case mean (DSC and NSD in %).

    Args:
        summary: from :func:`summarize` (or the JSON written by :func:`write_metrics`).

    Returns:
        the table.
    """
    metrics = list(summary["metrics"])
    scales = {m: 100.0 if m in METRIC_COLUMNS else 1.0 for m in metrics}
    headers = [f"{m.upper()} %" if m in METRIC_COLUMNS else f"{m} (mean ± SD)" for m in metrics]
    name_width = max([len("per-case mean"), *(len(n) for n in summary["classes"])]) + 2
    widths = [max(len(h), 18) + 2 for h in headers]
    lines = [
        f"{summary['num_cases']} cases",
        "class".ljust(name_width) + "".join(h.rjust(w) for h, w in zip(headers, widths)) + "   n",
    ]
    for name, entry in summary["classes"].items():
        cells = "".join(_cell(entry[m], scales[m]).rjust(w) for m, w in zip(metrics, widths))
        lines.append(f"{name.ljust(name_width)}{cells}   {entry[metrics[0]]['n']}")
    per_case = summary["per_case_mean"]
    cells = "".join(_cell(per_case[m], scales[m]).rjust(w) for m, w in zip(metrics, widths))
    lines.append(f"{'per-case mean'.ljust(name_width)}{cells}   {per_case[metrics[0]]['n']}")
    return "\n".join(lines)


def report(path: str) -> None:
    """Print the metrics of an evaluation as a table (the ``anatomask report`` command).

    Args:
        path: the ``summary.json`` or the per-case ``metrics.csv`` written by a fine-tuning bundle's
            evaluation.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no such metrics file: {source}")
    if source.suffix.lower() == ".csv":
        summary = summarize(read_metrics_csv(source))
    else:
        summary = json.loads(source.read_text(encoding="utf-8"))
        if "classes" not in summary or "per_case_mean" not in summary:
            raise ValueError(f"{source}: not a summary written by an anatomask evaluation")
    print(format_report(summary))
