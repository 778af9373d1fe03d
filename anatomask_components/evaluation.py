"""Evaluation of fine-tuned segmentation models: metrics and reports.

The case lists they run on (``datalist_section``, ``inference_items``) are in
:mod:`anatomask_components.data.datalists`; :func:`reference_label_transforms` loads a reference label map
in its own geometry, where the predictions are scored.

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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from scipy import ndimage

from anatomask_components.data.labels import RemapLabelsd
from anatomask_components.data.readers import AnatoMaskReader
from anatomask_components.data.validation import ValidateScand
from anatomask_components.files import atomic_write_text

__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "METRIC_COLUMNS",
    "case_metrics",
    "format_report",
    "read_metrics_csv",
    "reference_label_transforms",
    "report",
    "resolve_tolerances",
    "summarize",
    "voxel_spacing",
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
