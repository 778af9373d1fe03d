"""Dataset intensity fingerprint for nnU-Net's CT normalisation (``anatomask fingerprint``).

Like nnU-Net, it samples foreground voxels of every training case (10,000 per case and channel, with
replacement, seeded) from the raw images and records, per modality, the mean, std, min, max, median and
the 0.5 / 99.5 percentiles. Foreground is ``label > 0`` when the item has a label; unlabelled scans
(pretraining) use the body instead: voxels above -950 HU for CT (tissue including the lungs, whose
parenchyma lies above the -950 HU emphysema threshold; the air around the patient is about -1000 HU), above
0 for MR and PET.

The bundles do not need a fingerprint to be given: :func:`resolve_fingerprint` computes it from the training
data on the first run, or takes the pretrained encoder's (so that fine-tuning maps CT intensities exactly
as pretraining did), and stores it as ``models/fingerprint.json`` beside the weights and in the bundle's
``configs/inference.json``.

:func:`window_fingerprint` writes a fixed CT window in the same form (``anatomask fingerprint --window``): one
mapping for pretraining and fine-tuning when the scans at hand are too few to describe CT (the demo's).
"""

from __future__ import annotations

import hashlib
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

# Air is about -1000 HU and lung parenchyma -900 to -700 HU: -950 HU (the emphysema threshold of lung CT)
# keeps the lungs in the body, whose anatomy pretraining should see rather than clip away.
CT_BODY_THRESHOLD_HU = -950.0
FINGERPRINT_FILE = "fingerprint.json"


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


def window_fingerprint(low: float, high: float) -> dict[str, Any]:
    """A fixed CT window as a fingerprint: with it, nnU-Net's CT scheme clips to ``[low, high]`` HU and maps
    the window to [-2, 2] (mean: the window's centre; std: a quarter of its width).

    One mapping for pretraining and fine-tuning alike, whatever the scans: the choice for few scans, where a
    computed fingerprint describes those scans rather than CT (``docs/finetune.md``, "The demo's recipe").

    Args:
        low, high: the window in HU (the abdominal soft-tissue window is -160 .. 240).

    Returns:
        ``{"intensity": {"CT": {mean, std, percentile_00_5, percentile_99_5}}, "source": ...}``, what
        ``fingerprint=`` of every bundle accepts.

    Raises:
        ValueError: ``high`` not above ``low``.
    """
    low, high = float(low), float(high)
    if not high > low:
        raise ValueError(f"a CT window needs high > low, got [{low}, {high}] HU")
    return {
        "intensity": {
            "CT": {
                "mean": (low + high) / 2.0,
                "std": (high - low) / 4.0,
                "percentile_00_5": low,
                "percentile_99_5": high,
            }
        },
        "source": f"fixed CT window [{low:g}, {high:g}] HU",
    }


def _files_digest(files: Sequence[Mapping[str, Any]], image_key: str = "image") -> str:
    names = sorted(json.dumps(item.get(image_key), sort_keys=True, default=str) for item in files)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def write_fingerprint(model_path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> Path:
    """Store a fingerprint as ``fingerprint.json`` beside a model's weights (atomically); returns its path."""
    path = Path(model_path).parent / FINGERPRINT_FILE
    _write_json_atomic(path, dict(fingerprint))
    return path


def _write_json_atomic(path: Path, content: Any) -> None:
    from anatomask_components.files import atomic_write_text  # it creates the folder

    atomic_write_text(path, json.dumps(content, indent=4) + "\n")


def _record_in_inference_config(bundle_root: Path, fingerprint: Mapping[str, Any]) -> None:
    """Write the fingerprint into ``configs/inference.json`` (key order and indent kept), where it exists."""
    config_path = bundle_root / "configs" / "inference.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "fingerprint" not in config or config["fingerprint"] == dict(fingerprint):
        return
    config["fingerprint"] = dict(fingerprint)
    _write_json_atomic(config_path, config)


def needs_fingerprint(normalization: str | Mapping[str, str]) -> bool:
    """True when some modality is normalised with the dataset-level ``"ct"`` scheme."""
    from anatomask_components.data.normalization import resolve_schemes

    return "ct" in resolve_schemes(normalization).values()


def resolve_fingerprint(
    fingerprint: str | os.PathLike | Mapping[str, Any] | None,
    normalization: str | Mapping[str, str],
    files: Sequence[Mapping[str, Any]],
    model_path: str | os.PathLike | None = None,
    bundle_root: str | os.PathLike | None = None,
    pretrained_weights: str | os.PathLike | None = None,
    channel_modalities: Sequence[str] | None = None,
    image_channel_dim: int | None = None,
    on_error: str = "raise",
) -> dict[str, Any] | None:
    """The fingerprint a training run normalises with, found or computed once, then stored with the model.

    In order: the ``fingerprint`` given (a path or dict); the pretrained encoder's, stored as
    ``fingerprint.json`` beside ``pretrained_weights`` by the pretraining bundle (the encoder's first layers
    learned that intensity mapping); the run's own ``models/fingerprint.json`` from an earlier start on the
    same files (resume); else computed from ``files`` with progress lines. The result is written as
    ``fingerprint.json`` beside ``model_path`` (with its source; :func:`model_fingerprint` finds it there)
    and into the ``fingerprint`` key of ``<bundle_root>/configs/inference.json``, so that inference, MONAI
    Label and exported archives use it.

    Args:
        fingerprint: given statistics, or None.
        normalization: the bundle's ``normalization``; without a ``"ct"`` scheme nothing is computed and
            ``fingerprint`` is returned as it is.
        files: the training items (``{"image": ..., "label": ...}``).
        model_path: the weights file of the run (``models/model.pt``); None to store nothing there.
        bundle_root: the bundle folder whose ``configs/inference.json`` gets the fingerprint; None: none.
        pretrained_weights: the encoder or checkpoint that fine-tuning starts from ("" or None: none).
        channel_modalities, image_channel_dim: see :func:`compute_fingerprint`.
        on_error: ``"raise"`` or ``"warn"`` (skip bad scans, as pretraining does).

    Returns:
        the fingerprint dict (``{"intensity": {modality: stats}, ...}``), or None without a ``"ct"`` scheme
        and without a given fingerprint.
    """
    if not needs_fingerprint(normalization):
        return _as_dict(fingerprint)
    digest = _files_digest(files)
    encoder_fingerprint = Path(pretrained_weights).parent / FINGERPRINT_FILE if pretrained_weights else None
    if fingerprint is not None:
        result = _as_dict(fingerprint)
        result.setdefault("source", "given" if isinstance(fingerprint, Mapping) else str(fingerprint))
    elif encoder_fingerprint is not None and encoder_fingerprint.is_file():
        result = {**_read(encoder_fingerprint), "source": f"pretrained encoder ({encoder_fingerprint})"}
        print(f"[fingerprint] CT intensities mapped as in pretraining: {encoder_fingerprint}", flush=True)
    elif (
        model_path
        and (earlier := model_fingerprint(None, model_path)) is not None
        and earlier.get("files_digest") == digest
    ):
        result = earlier
        print(f"[fingerprint] reusing the one beside {model_path} (same training files)", flush=True)
    else:
        print(
            f"[fingerprint] no fingerprint given: computing nnU-Net's CT statistics from {len(files)} "
            "training scans (once; stored in models/fingerprint.json and configs/inference.json)",
            flush=True,
        )
        datalist = {
            "training": list(files),
            **({"channel_modalities": list(channel_modalities)} if channel_modalities else {}),
        }
        result = compute_fingerprint(
            datalist, sections=("training",), image_channel_dim=image_channel_dim, on_error=on_error
        )
        result["source"] = "training data"
    from anatomask_components.data.normalization import load_fingerprint

    load_fingerprint(result)  # the same checks as at use: every modality has its statistics
    result["files_digest"] = digest
    if model_path:
        write_fingerprint(model_path, result)
    if bundle_root is not None:
        _record_in_inference_config(Path(bundle_root), result)
    return result


def _as_dict(fingerprint: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A given fingerprint (dict or JSON path) as a new dict; None stays None."""
    if fingerprint is None:
        return None
    return dict(fingerprint) if isinstance(fingerprint, Mapping) else _read(fingerprint)


def _read(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the fingerprint {path}: {error}") from error


def model_fingerprint(
    fingerprint: str | os.PathLike | Mapping[str, Any] | None, model_path: str | os.PathLike
) -> dict[str, Any] | None:
    """The fingerprint a trained model was trained with: the one given (``configs/inference.json`` holds it
    after training), else ``fingerprint.json`` beside ``model_path``, else None (a ``"ct"`` normalisation
    then refuses CT scans, naming them)."""
    if fingerprint is not None:
        return _as_dict(fingerprint)
    stored = Path(model_path).parent / FINGERPRINT_FILE
    return _read(stored) if stored.is_file() else None
