"""Checks that turn bad scans into one clear error naming the file and the problem.

Every check raises :class:`InvalidScanError`. Pretraining may instead skip bad scans with a warning: see
:class:`anatomask_components.data.datasets.CachedScanDataset` (``on_invalid="warn"``) and
:func:`anatomask_components.data.checks.check_datalist`.

This module is the bottom of the data layer: it imports nothing from the package, so that readers,
datalists, preprocessing, checks and datasets can all build on it.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

# Grids closer than this (mm, in every affine entry) are the same grid. NIfTI stores affines in
# float32, which alone costs up to ~1e-4 mm at 1 m from the origin.
GRID_TOLERANCE_MM = 1e-2


class InvalidScanError(ValueError):
    """A scan (or label map) that cannot be used, with the file and the reason.

    Args:
        path: the offending file or folder (several joined with `` + `` for multi-file problems).
            When ``problem`` is None, ``path`` is taken as the complete message: this keeps the error
            re-raisable from a DataLoader worker, which rebuilds exceptions from their message alone.
        problem: what is wrong, in words.
    """

    def __init__(self, path: str | os.PathLike, problem: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(self.path if problem is None else f"{self.path}: {problem}")


def find_invalid_scan_error(error: BaseException) -> InvalidScanError | None:
    """Return the :class:`InvalidScanError` behind ``error``, if any.

    MONAI wraps every exception raised inside a transform in ``RuntimeError("applying transform ...")``;
    this walks the ``__cause__``/``__context__`` chain to recover the original error.

    Args:
        error: an exception raised by a transform chain or a dataset.

    Returns:
        the first :class:`InvalidScanError` in the chain, or None.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, InvalidScanError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def source_name(tensor: Any, fallback: str = "<in-memory image>") -> str:
    """The file name recorded by the reader in a MetaTensor, for error messages."""
    meta = getattr(tensor, "meta", None) or {}
    return str(meta.get("filename_or_obj", fallback))


def canonical_grid(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The RAS-reoriented grid of a volume, as ``Orientationd(axcodes="RAS")`` would produce it.

    Two files describe the same voxels in space exactly when their canonical grids agree, even if one
    stores the axes flipped or permuted (TotalSegmentator writes its DICOM-derived labels as LAS while
    ITK reads the series as LPS, for example).

    Args:
        affine: (4, 4) voxel-to-RAS affine.
        shape: spatial shape (3 values).

    Returns:
        the canonical (4, 4) affine and spatial shape.
    """
    import nibabel.orientations as nio

    affine = np.asarray(affine, dtype=np.float64)
    ornt = nio.io_orientation(affine)
    canonical_affine = affine @ nio.inv_ornt_aff(ornt, tuple(int(s) for s in shape))
    canonical_shape = tuple(int(shape[int(axis)]) for axis in np.argsort(ornt[:, 0]))
    return canonical_affine, canonical_shape


def check_same_grid(
    affine: np.ndarray,
    shape: Sequence[int],
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
    path: str,
    what: str,
) -> None:
    """Raise if a volume does not lie on the reference grid (after reorientation to RAS).

    Args:
        affine, shape: the volume to check (affine (4, 4), spatial shape).
        ref_affine, ref_shape: the reference grid (usually the image).
        path: named in the error.
        what: the relation, e.g. ``"label grid does not match image /x/ct.nii.gz"``.

    Raises:
        InvalidScanError: the grids differ in shape or affine.
    """
    grid_affine, grid_shape = canonical_grid(affine, shape)
    ref_grid_affine, ref_grid_shape = canonical_grid(ref_affine, ref_shape)
    if grid_shape != ref_grid_shape:
        raise InvalidScanError(path, f"{what}: shape {grid_shape} vs {ref_grid_shape} (RAS order)")
    if not np.allclose(grid_affine, ref_grid_affine, atol=GRID_TOLERANCE_MM):
        raise InvalidScanError(
            path,
            f"{what}: affine\n{np.round(grid_affine, 4)}\nvs\n{np.round(ref_grid_affine, 4)} (RAS order)",
        )


def check_finite(array: torch.Tensor | np.ndarray, path: str) -> None:
    """Raise if a volume holds NaN or infinite voxels.

    Raises:
        InvalidScanError: with the number of NaN and infinite voxels.
    """
    tensor = torch.as_tensor(array)
    if not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise InvalidScanError(path, f"{n_nan} NaN and {n_inf} infinite voxels")


def check_label_values(label: torch.Tensor | np.ndarray, num_classes: int, path: str) -> None:
    """Raise if a label map holds values other than the integers ``0 .. num_classes - 1``.

    Raises:
        InvalidScanError: listing the offending values.
    """
    tensor = torch.as_tensor(label)
    values = torch.unique(tensor)
    bad = values[(values < 0) | (values >= num_classes) | (values != torch.round(values))]
    if bad.numel():
        shown = ", ".join(f"{v:g}" for v in bad[:10].tolist())
        more = f" (and {bad.numel() - 10} more)" if bad.numel() > 10 else ""
        raise InvalidScanError(
            path, f"label values outside the label set 0..{num_classes - 1}: {shown}{more}"
        )


class ValidateScand(MapTransform):
    """Check loaded, channel-first volumes: finite voxels, label grid and label values.

    Runs right after loading (before reorientation), so errors name the files as the user gave them.
    Missing, unreadable, 2D and 4D files are rejected earlier by the reader.

    Args:
        keys: image keys (each a (C, H, W, D) MetaTensor).
        label_key: key of the label map (1, H, W, D), or None. Its grid must match the first image's.
        num_classes: if given, label values must be integers in ``0 .. num_classes - 1``.
        check_finite: reject NaN/Inf voxels in images.
        allow_missing_keys: don't raise if an image key is missing (a missing label is never checked).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str | None = None,
        num_classes: int | None = None,
        check_finite: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.num_classes = num_classes
        self.check_finite = check_finite

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = None
        for key in self.key_iterator(d):
            image = d[key]
            if self.check_finite:
                check_finite(image, source_name(image))
            reference = reference if reference is not None else image
        label = d.get(self.label_key) if self.label_key is not None else None
        if label is not None:
            label_path = source_name(label)
            if label.shape[0] != 1:
                raise InvalidScanError(label_path, f"label map has {label.shape[0]} channels, expected 1")
            check_finite(label, label_path)
            if reference is not None:
                check_same_grid(
                    np.asarray(label.affine),
                    label.shape[1:],
                    np.asarray(reference.affine),
                    reference.shape[1:],
                    label_path,
                    f"label grid does not match image {source_name(reference)}",
                )
            if self.num_classes is not None:
                check_label_values(label, self.num_classes, label_path)
        return d
