"""Synthetic body phantoms with organ-like ellipsoids, for offline tests and demos.

A phantom is an elliptic "body" cylinder along the third voxel axis, with ``num_classes - 1``
non-overlapping ellipsoidal organs of distinct mean intensities and textures, plus noise. Organs are placed
in normalised voxel coordinates, so every organ lies inside the volume whatever the shape, spacing or
orientation; the affine only says where the voxels are in the world.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from anatomask_components.data.writers import write_volume

# Mean intensity of the air, the body and the organs, per modality (HU for CT, arbitrary units for MR,
# SUV for PET); organs beyond the table get seeded random values in the given range.
_INTENSITIES = {
    "CT": {
        "air": -1000.0,
        "body": 40.0,
        "organs": (60.0, 160.0, 45.0, 500.0, -90.0, 110.0, 250.0, 25.0),
        "range": (-100.0, 700.0),
        "noise": 12.0,
        "texture": 15.0,
    },
    "MR": {
        "air": 0.0,
        "body": 300.0,
        "organs": (550.0, 180.0, 700.0, 90.0, 420.0, 850.0, 250.0, 620.0),
        "range": (50.0, 900.0),
        "noise": 15.0,
        "texture": 30.0,
    },
    "PET": {
        "air": 0.0,
        "body": 0.8,
        "organs": (2.2, 3.5, 1.6, 0.4, 6.0, 1.2, 2.8, 1.0),
        "range": (0.3, 6.0),
        "noise": 0.1,
        "texture": 0.15,
    },
}


def make_affine(
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    flip: Sequence[bool] = (False, False, False),
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """A voxel-to-RAS affine from spacing, axis flips and an oblique rotation.

    Args:
        spacing: voxel size (mm) along the three voxel axes.
        flip: whether each voxel axis runs backwards (e.g. ``(True, True, False)`` gives LPS storage).
        rotation_deg: rotation about the world x, y, z axes (degrees, applied in that order).
        origin: world position (mm) of voxel (0, 0, 0).

    Returns:
        the (4, 4) affine.
    """
    signs = np.where(np.asarray(flip, dtype=bool), -1.0, 1.0)
    rotation = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(np.asarray(spacing, dtype=np.float64) * signs)
    affine[:3, 3] = origin
    return affine


def _normalised_coordinates(shape: Sequence[int]) -> list[np.ndarray]:
    return np.meshgrid(*[np.linspace(-1.0, 1.0, int(n)) for n in shape], indexing="ij", sparse=True)


def _organ_layout(num_organs: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centres and semi-axes (normalised units) of non-overlapping organs inside the body cylinder."""
    cells_per_axis = max(1, int(np.ceil(num_organs ** (1.0 / 3.0))))
    # The body spans |x| < 0.85, |y| < 0.7; organs stay inside an inscribed box with a margin.
    low, high = np.array([-0.5, -0.42, -0.8]), np.array([0.5, 0.42, 0.8])
    cell = (high - low) / cells_per_axis
    cells = list(itertools.product(range(cells_per_axis), repeat=3))
    chosen = rng.choice(len(cells), size=num_organs, replace=False)
    layout = []
    for index in chosen:
        centre = low + (np.asarray(cells[index]) + 0.5) * cell
        semi_axes = 0.5 * cell * rng.uniform(0.55, 0.85, size=3)
        layout.append((centre, semi_axes))
    return layout


def make_phantom(
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    num_classes: int = 5,
    seed: int = 0,
    affine: np.ndarray | None = None,
    modality: str = "CT",
    noise_std: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A body-shaped volume with ellipsoidal organs, noise and the matching label map.

    Args:
        shape: voxel grid (H, W, D).
        spacing: voxel size (mm); ignored when ``affine`` is given.
        num_classes: label classes including background 0; organs are labels ``1 .. num_classes - 1``,
            every one present.
        seed: all randomness (layout, intensities, texture, noise).
        affine: (4, 4) voxel-to-RAS affine (see :func:`make_affine` for flipped or oblique grids).
        modality: ``"CT"`` (HU), ``"MR"`` (positive arbitrary units, with a bias field) or ``"PET"`` (SUV).
        noise_std: Gaussian noise level (default per modality: 12 HU, 15, 0.1 SUV).

    Returns:
        image (H, W, D) float32, label (H, W, D) uint8, affine (4, 4) float64.
    """
    modality = modality.upper()
    if modality not in _INTENSITIES:
        raise ValueError(f"modality must be one of {sorted(_INTENSITIES)}, got {modality!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    table = _INTENSITIES[modality]
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    x, y, z = _normalised_coordinates(shape)
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)

    image = np.full(shape, table["air"], dtype=np.float32)
    image[body] = table["body"]
    label = np.zeros(shape, dtype=np.uint8)
    num_organs = num_classes - 1
    for organ, (centre, semi_axes) in enumerate(_organ_layout(num_organs, rng), start=1):
        inside = (
            ((x - centre[0]) / semi_axes[0]) ** 2
            + ((y - centre[1]) / semi_axes[1]) ** 2
            + ((z - centre[2]) / semi_axes[2]) ** 2
        ) <= 1.0
        if not inside.any():  # a grid too coarse to sample the ellipsoid: keep its centre voxel
            inside = np.zeros(shape, dtype=bool)
            inside[tuple(int(round((c + 1.0) / 2.0 * (n - 1))) for c, n in zip(centre, shape))] = True
        organs = table["organs"]
        mean = organs[organ - 1] if organ <= len(organs) else rng.uniform(*table["range"])
        label[inside] = organ
        image[inside] = mean

    # Texture: smooth noise whose grain differs per organ, so organs differ in more than their mean.
    for organ in range(num_classes):
        region = label == organ if organ else body & (label == 0)
        if region.any():
            grain = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.0 + organ % 3)
            grain /= grain.std() + 1e-6
            image[region] += table["texture"] * grain[region]
    if modality == "MR":
        image *= (1.0 + 0.2 * x + 0.1 * z).astype(np.float32)  # coil bias field
    image += rng.normal(0.0, table["noise"] if noise_std is None else noise_std, size=shape).astype(
        np.float32
    )
    if modality in ("MR", "PET"):
        np.maximum(image, 0.0, out=image)
    affine = make_affine(spacing) if affine is None else np.asarray(affine, dtype=np.float64)
    return image.astype(np.float32), label, affine


def make_pet_ct_phantom(
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    num_lesions: int = 3,
    seed: int = 0,
    affine: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A co-registered CT and SUV PET phantom with hot spherical lesions (AutoPET style).

    Args:
        shape: voxel grid (H, W, D), shared by CT, PET and the label.
        spacing: voxel size (mm); ignored when ``affine`` is given.
        num_lesions: number of lesions (label 1), each a hot sphere of SUV 5-15.
        seed: all randomness.
        affine: (4, 4) voxel-to-RAS affine.

    Returns:
        ct (H, W, D) float32 HU, suv (H, W, D) float32, lesion label (H, W, D) uint8 (0/1), affine (4, 4).
    """
    ct, organs, affine = make_phantom(shape, spacing, num_classes=6, seed=seed, affine=affine, modality="CT")
    suv, _, _ = make_phantom(shape, spacing, num_classes=6, seed=seed, affine=affine, modality="PET")
    rng = np.random.default_rng(seed + 1)
    x, y, z = _normalised_coordinates(shape)
    body = np.broadcast_to((x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1.0, tuple(shape))
    label = np.zeros(tuple(shape), dtype=np.uint8)
    candidates = np.argwhere(body & (organs == 0))
    for _ in range(num_lesions):
        centre = candidates[rng.integers(len(candidates))] / (np.asarray(shape) - 1) * 2.0 - 1.0
        radius = rng.uniform(0.06, 0.12)
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
        label[inside] = 1
        suv[inside] = rng.uniform(5.0, 15.0) + rng.normal(0.0, 0.3, size=int(inside.sum()))
        ct[inside] = 70.0 + rng.normal(0.0, 10.0, size=int(inside.sum()))
    return ct, np.maximum(suv, 0.0), label, affine


def write_phantom_dataset(
    root: str | os.PathLike,
    n_cases: int = 4,
    shape: Sequence[int] = (48, 48, 48),
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    num_classes: int = 4,
    seed: int = 0,
    layout: str = "datalist",
    modality: str = "CT",
    affine: np.ndarray | None = None,
    file_ending: str = ".nii.gz",
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
) -> dict[str, Any]:
    """Write ``n_cases`` phantoms to disk in a dataset layout and return their MONAI datalist.

    Args:
        root: output folder.
        n_cases: number of cases (case ``i`` uses seed ``seed + i``).
        shape, spacing, num_classes, modality, affine: see :func:`make_phantom`.
        seed: base seed.
        layout: ``"datalist"`` (``images/``, ``labels/`` and ``datalist.json``), ``"folder"`` (images only,
            for pretraining), ``"nnunet"`` (``Dataset001_Phantom/`` with ``dataset.json``, ``imagesTr/``,
            ``labelsTr/``), ``"msd"`` (``dataset.json``, ``imagesTr/``, ``labelsTr/``) or ``"autopet"``
            (``PETCT_xxx/<date>/{CTres,SUV,SEG}.nii.gz``, two channels; ``modality`` and ``num_classes``
            are ignored).
        file_ending: image file suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); AutoPET is NIfTI.
        fractions: train/validation/test fractions of the returned datalist.

    Returns:
        the datalist (as built by :mod:`anatomask_components.data.datalists` for that layout).
    """
    from anatomask_components.data import datalists

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    split = {"fractions": fractions, "seed": seed}
    if layout == "autopet":
        for case in range(n_cases):
            ct, suv, label, case_affine = make_pet_ct_phantom(shape, spacing, seed=seed + case, affine=affine)
            study = root / f"PETCT_{case:04d}" / "01-01-2000-NA-PET-CT"
            write_volume(study / "CTres.nii.gz", ct, case_affine)
            write_volume(study / "SUV.nii.gz", suv, case_affine)
            write_volume(study / "SEG.nii.gz", label, case_affine)
        return datalists.autopet_datalist(root, **split)

    dataset_root = root / "Dataset001_Phantom" if layout == "nnunet" else root
    names = [f"case_{case:03d}" for case in range(n_cases)]
    image_names = {
        "datalist": [f"images/{name}{file_ending}" for name in names],
        "folder": [f"{name}{file_ending}" for name in names],
        "nnunet": [f"imagesTr/{name}_0000{file_ending}" for name in names],
        "msd": [f"imagesTr/{name}{file_ending}" for name in names],
    }
    if layout not in image_names:
        raise ValueError(f"layout must be one of {sorted(image_names) + ['autopet']}, got {layout!r}")
    label_dir = "labels" if layout == "datalist" else "labelsTr"
    items = []
    for case, name in enumerate(names):
        image, label, case_affine = make_phantom(shape, spacing, num_classes, seed + case, affine, modality)
        image_path = write_volume(dataset_root / image_names[layout][case], image, case_affine)
        item = {"image": str(image_path), "modality": modality.upper()}
        if layout != "folder":
            item["label"] = str(
                write_volume(dataset_root / label_dir / f"{name}{file_ending}", label, case_affine)
            )
        items.append(item)

    label_names = {"background": 0, **{f"organ_{c}": c for c in range(1, num_classes)}}
    if layout == "nnunet":
        description = {
            "channel_names": {"0": modality.upper()},
            "labels": label_names,
            "numTraining": n_cases,
            "file_ending": file_ending,
            "name": "Phantom",
        }
        (dataset_root / "dataset.json").write_text(json.dumps(description, indent=4))
        return datalists.nnunet_datalist(dataset_root, **split)
    if layout == "msd":
        description = {
            "name": "Phantom",
            "modality": {"0": modality.upper()},
            "labels": {str(c): n for n, c in label_names.items()},
            "numTraining": n_cases,
            "training": [
                {"image": f"./{image_names['msd'][i]}", "label": f"./labelsTr/{n}{file_ending}"}
                for i, n in enumerate(names)
            ],
            "test": [],
        }
        (dataset_root / "dataset.json").write_text(json.dumps(description, indent=4))
        return datalists.msd_datalist(dataset_root / "dataset.json", **split)
    if layout == "folder":
        return datalists.folder_datalist(dataset_root, modality=modality.upper(), **split)
    datalist = datalists.split_items(items, **split)
    datalist["labels"] = {str(c): n for n, c in label_names.items()}
    datalists.write_datalist(datalist, dataset_root / "datalist.json")
    return datalist


def phantom_fingerprint() -> dict:
    """A CT intensity fingerprint for phantom scans, standing in for the one a training run computes (tests
    that run inference or export with untrained weights need one beside the weights).

    Returns:
        ``{"intensity": {"CT": {"mean", "std", "percentile_00_5", "percentile_99_5"}}, "source": ...}``,
        spanning air to the brightest phantom organ.
    """
    return {
        "intensity": {
            "CT": {"mean": 40.0, "std": 100.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0}
        },
        "source": "phantom",
    }
