"""Shared helpers for the data-layer tests: small phantom files on flipped, anisotropic grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from anatomask_components.data.phantoms import make_affine, make_phantom
from anatomask_components.data.validation import InvalidScanError, find_invalid_scan_error
from anatomask_components.data.writers import write_volume


@dataclass
class PhantomFiles:
    image_path: Path
    label_path: Path
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray

    def item(self, **extra) -> dict:
        return {"image": str(self.image_path), "label": str(self.label_path), **extra}


def write_phantom(
    folder: Path,
    name: str = "case",
    shape=(28, 24, 16),
    spacing=(1.5, 1.5, 1.5),
    flip=(True, False, True),
    num_classes: int = 4,
    seed: int = 0,
    modality: str = "CT",
) -> PhantomFiles:
    """Write a phantom image and label as NIfTI (stored axes flipped, so RAS reorientation matters)."""
    affine = make_affine(spacing, flip=flip, origin=(12.0, -30.0, 7.5))
    image, label, affine = make_phantom(
        shape, num_classes=num_classes, seed=seed, affine=affine, modality=modality
    )
    image_path = write_volume(folder / f"{name}_image.nii.gz", image, affine)
    label_path = write_volume(folder / f"{name}_label.nii.gz", label, affine)
    return PhantomFiles(image_path, label_path, image, label, affine)


@pytest.fixture
def phantom(tmp_path: Path) -> PhantomFiles:
    """A 28 x 24 x 16 CT phantom at 1.5 mm with flipped x and z storage."""
    return write_phantom(tmp_path)


@pytest.fixture
def make_phantom_files():
    """Factory: ``make_phantom_files(folder, name=..., shape=..., spacing=..., flip=..., ...)``."""
    return write_phantom


def _invalid_scan_error(transform, item) -> InvalidScanError:
    with pytest.raises(Exception) as raised:
        transform(item)
    error = find_invalid_scan_error(raised.value)
    assert error is not None, f"expected an InvalidScanError, got {raised.value!r}"
    return error


@pytest.fixture
def expect_invalid():
    """``expect_invalid(transform, item)``: run a transform that must fail; return the InvalidScanError
    behind MONAI's ``RuntimeError("applying transform ...")`` wrapper."""
    return _invalid_scan_error


@pytest.fixture(scope="session")
def fetched(tmp_path_factory):
    """The real example cases (fetched once per session; skipped offline without a cached archive)."""
    from anatomask_components.data import examples

    cached = examples.default_cache_dir() / examples.ARCHIVE_NAME
    if not cached.exists() and not examples.index_reachable():
        pytest.skip("package index unreachable and no cached TotalSegmentator archive")
    dest = tmp_path_factory.mktemp("examples")
    manifest = examples.fetch_examples(str(dest))
    return dest, manifest
