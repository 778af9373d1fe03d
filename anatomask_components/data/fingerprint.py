"""Dataset intensity fingerprint for nnU-Net's CT normalisation (``anatomask fingerprint``).

Like nnU-Net, it samples foreground voxels of every training case (10,000 per case and channel, with
replacement, seeded) from the raw images and records, per modality, the mean, std, min, max, median and
the 0.5 / 99.5 percentiles. Foreground is ``label > 0`` when the item has a label; unlabelled scans
(pretraining) use the body instead: voxels above -500 HU for CT, above 0 for MR and PET.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomask_components.data.checks import skippable_scan_error
from anatomask_components.data.datalists import image_label
from anatomask_components.data.normalization import normalise_modality

# Air is about -1000 HU and fat about -100 HU: -500 HU separates the body from the air around it.
CT_BODY_THRESHOLD_HU = -500.0


def _foreground(channel: np.ndarray, modality: str, label: np.ndarray | None) -> np.ndarray:
    if label is not None:
        return label > 0
    return channel > (CT_BODY_THRESHOLD_HU if modality == "CT" else 0.0)


def _summary(samples: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(np.mean(samples)),
        "std": float(np.std(samples)),
        "min": float(np.min(samples)),
        "max": float(np.max(samples)),
        "median": float(np.median(samples)),
        "percentile_00_5": float(np.percentile(samples, 0.5)),
        "percentile_99_5": float(np.percentile(samples, 99.5)),
        "num_samples": int(samples.size),
    }


def compute_fingerprint(
    datalist: str | os.PathLike | Mapping[str, Any],
    output: str | os.PathLike | None = None,
    sections: Sequence[str] = ("training", "validation"),
    image_key: str = "image",
    label_key: str = "label",
    samples_per_case: int = 10000,
    seed: int = 1234,
    image_channel_dim: int | None = None,
    on_error: str = "raise",
    progress: bool = True,
) -> dict[str, Any]:
    """Compute (and optionally write) the intensity fingerprint of a datalist.

    Args:
        datalist: a MONAI datalist dict or JSON file (see :mod:`anatomask_components.data.datalists`).
        output: JSON file to write; None to only return the fingerprint.
        sections: datalist sections to use; the test section is left out by default so that its
            intensities do not leak into training.
        image_key, label_key: item keys.
        samples_per_case: foreground voxels sampled per case and channel (nnU-Net: 10,000).
        seed: sampling seed.
        image_channel_dim: ``-1`` for MSD-style 4D multi-modal files.
        on_error: ``"raise"`` on the first bad scan, or ``"warn"`` and skip it (listed in ``"skipped"``).
        progress: print one line per case.

    Returns:
        ``{"intensity": {modality: {mean, std, min, max, median, percentile_00_5, percentile_99_5,
        num_samples}}, "spacing_median": [3], "shape_median": [3], "num_cases": int, "skipped": [...]}``.

    Raises:
        InvalidScanError: a bad scan, when ``on_error="raise"``.
        MissingItemKeyError: an item without ``image_key`` (a KeyError naming the section and item).
        ValueError: no items, or no foreground voxels in any case.
    """
    from monai.transforms import Compose

    from anatomask_components.data.checks import datalist_items, load_datalist
    from anatomask_components.data.preprocessing import loading_transforms

    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    datalist, name = load_datalist(datalist)
    default_modalities = datalist.get("channel_modalities")
    items = [item for _, _, item in datalist_items(datalist, sections, image_key, name)]
    if not items:
        raise ValueError(f"{name} has no items in {list(sections)}")

    # The loading steps of the shared preprocessing: checks, then RAS for image and label alike, which
    # aligns their voxels even when the files store the axes differently (TotalSegmentator's DICOM-derived
    # labels are LAS while the series reads as LPS).
    load = Compose(
        loading_transforms(image_key, label_key, image_channel_dim=image_channel_dim, label_optional=True)
    )
    rng = np.random.default_rng(seed)
    samples: dict[str, list[np.ndarray]] = {}
    spacings, shapes, skipped = [], [], []
    for index, item in enumerate(items):
        try:
            loaded = load(item)
        except Exception as error:
            invalid = skippable_scan_error(error, on_error)
            warnings.warn(f"fingerprint: skipping invalid item: {invalid}", stacklevel=2)
            skipped.append(str(invalid))
            continue
        channels = loaded[image_key].numpy()
        label = loaded[label_key].numpy()[0] if label_key in loaded else None
        given = item.get("modality", default_modalities) or "CT"
        modalities = [given] * len(channels) if isinstance(given, str) else list(given)
        for channel, modality in zip(channels, modalities):
            modality = normalise_modality(modality)
            foreground = channel[_foreground(channel, modality, label)]
            if foreground.size:
                samples.setdefault(modality, []).append(
                    rng.choice(foreground, samples_per_case, replace=True)
                )
        spacings.append(np.asarray(loaded[image_key].pixdim, dtype=np.float64))
        shapes.append(channels.shape[1:])
        if progress:
            print(
                f"[fingerprint] {index + 1}/{len(items)} {image_label(item, image_key)} "
                f"shape {tuple(channels.shape[1:])} {'/'.join(modalities)}",
                flush=True,
            )

    if not samples:
        raise ValueError("no foreground voxels found in any case; cannot compute a fingerprint")
    fingerprint = {
        "intensity": {m: _summary(np.concatenate(s).astype(np.float64)) for m, s in samples.items()},
        "spacing_median": np.median(spacings, axis=0).tolist(),
        "shape_median": np.median(shapes, axis=0).tolist(),
        "num_cases": len(shapes),
        "samples_per_case": samples_per_case,
        "seed": seed,
        "skipped": skipped,
    }
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(fingerprint, indent=4) + "\n")
        if progress:
            print(f"[fingerprint] {len(shapes)} cases -> {output}", flush=True)
    return fingerprint
