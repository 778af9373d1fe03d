"""Checks that turn bad scans into one clear error naming the file and the problem.

Every check raises :class:`InvalidScanError`. Pretraining may instead skip bad scans with a warning: see
:class:`anatomask_components.data.datasets.CachedScanDataset` (``on_invalid="warn"``) and
:func:`anatomask_components.data.checks.check_datalist`.

This module is the bottom of the data layer: it imports nothing from the package, so that readers,
datalists, preprocessing, checks and datasets can all build on it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

# Grids closer than this (mm, in every affine entry) are the same grid. NIfTI stores affines in
# float32, which alone costs up to ~1e-4 mm at 1 m from the origin.
GRID_TOLERANCE_MM = 1e-2
# A voxel axis more than this many times coarser than the finest one (5 mm slices of a 0.8 mm in-plane
# scan) is mostly interpolated by resampling to an isotropic grid.
ANISOTROPY_RATIO = 5.0
# Integer images whose values all lie in this range cannot be CT in Hounsfield units (air is about
# -1000 HU, soft tissue 0-100 HU, bone up to 2000 HU): masks, 8-bit screenshots, rescaled exports.
NOT_HU_RANGE = (0, 255)
# Other spellings of the modalities this package knows: DICOM's Modality tag says "PT" for PET.
_MODALITY_ALIASES = {"PT": "PET", "MRI": "MR"}
_RAS_AXES = ("x (left-right)", "y (posterior-anterior)", "z (inferior-superior)")


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


def transform_error_cause(error: BaseException) -> BaseException:
    """The error to report for ``error``: the :class:`InvalidScanError` behind it if any, else the error
    inside MONAI's ``RuntimeError("applying transform ...")`` wrappers."""
    invalid = find_invalid_scan_error(error)
    if invalid is not None:
        return invalid
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith("applying transform")
        and error.__cause__ is not None
    ):
        error = error.__cause__
    return error


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


def canonical_modality(name: str) -> str:
    """A modality name as this package spells it: upper case, ``PT`` (DICOM) as ``PET``, ``MRI`` as ``MR``."""
    upper = str(name).strip().upper()
    return _MODALITY_ALIASES.get(upper, upper)


def channel_modalities_of(
    data: Mapping[Hashable, Any],
    image: Any,
    modality_key: str = "modality",
    channel_modalities: Sequence[str] | None = None,
) -> list[tuple[str, str] | None]:
    """The modality of each channel of a loaded image and where it was read, or None where nobody says.

    The item's ``modality_key`` field comes first (a string for all channels or one entry per channel),
    then the DICOM Modality tag the reader recorded (``dicom_modality``), then ``channel_modalities``.

    Args:
        data: the item.
        image: its (C, H, W, D) MetaTensor.
        modality_key: the item field.
        channel_modalities: the pipeline's modality per channel, if any.

    Returns:
        one ``(modality, source)`` per channel, e.g. ``("MR", "the datalist field 'modality'")``, or None.

    Raises:
        InvalidScanError: the item lists another number of modalities than the image has channels.
    """
    num_channels = int(image.shape[0])
    meta = getattr(image, "meta", None) or {}
    candidates = (
        (data.get(modality_key), f"the datalist field {modality_key!r}"),
        (meta.get("dicom_modality"), "the DICOM Modality tag"),
        (channel_modalities, "the bundle's channel_modalities"),
    )
    for given, source in candidates:
        if given is None or (not isinstance(given, str) and not any(given)):
            continue
        names = [given] * num_channels if isinstance(given, str) else list(given)
        if len(names) != num_channels:
            raise InvalidScanError(
                source_name(image), f"{len(names)} modalities {names} in {source} for {num_channels} channels"
            )
        return [(canonical_modality(name), source) if name else None for name in names]
    return [None] * num_channels


def check_modality(
    data: Mapping[Hashable, Any],
    image: Any,
    accepted: Sequence[str],
    modality_key: str = "modality",
    channel_modalities: Sequence[str] | None = None,
) -> None:
    """Raise if a channel's known modality is not one the model was built for (unknown ones pass).

    Raises:
        InvalidScanError: naming the modality, where it was read and the accepted ones.
    """
    allowed = {canonical_modality(m) for m in accepted}
    for channel, found in enumerate(channel_modalities_of(data, image, modality_key, channel_modalities)):
        if found is not None and found[0] not in allowed:
            which = f" of channel {channel}" if image.shape[0] > 1 else ""
            raise InvalidScanError(
                source_name(image),
                f"modality {found[0]}{which} (from {found[1]}) is not one this model was built for "
                f"(accepted: {', '.join(sorted(allowed))})",
            )


def check_not_constant(image: torch.Tensor | np.ndarray, path: str) -> None:
    """Raise if any channel of a (C, H, W, D) volume holds one value everywhere (nothing to learn from).

    Raises:
        InvalidScanError: naming the channel and its value.
    """
    tensor = torch.as_tensor(image)
    flat = tensor.reshape(tensor.shape[0], -1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    for channel in torch.nonzero(low == high).flatten().tolist():
        which = f"channel {channel} is" if tensor.shape[0] > 1 else "every voxel is"
        raise InvalidScanError(path, f"constant volume: {which} {float(low[channel]):g}")


def warn_if_not_hounsfield(image: torch.Tensor | np.ndarray, stored_dtype: str, path: str) -> None:
    """Warn when an integer or boolean "CT" volume holds values that cannot be Hounsfield units.

    Args:
        image: one channel as loaded (values unchanged by the cast to float32).
        stored_dtype: the voxel type in the file (``"uint8"``, ``"bool"``, ``"int16"``, ...).
        path: named in the warning.
    """
    dtype = np.dtype(stored_dtype)
    if dtype.kind not in "biu":
        return
    tensor = torch.as_tensor(image)
    low, high = float(tensor.min()), float(tensor.max())
    if dtype.kind == "b" or dtype.itemsize == 1 or NOT_HU_RANGE[0] <= low <= high <= NOT_HU_RANGE[1]:
        warnings.warn(
            f"{path}: {dtype} voxels in {low:g}..{high:g} cannot be CT in Hounsfield units (air is about "
            "-1000 HU): a mask, an 8-bit export, or not CT? It is normalised as CT all the same",
            stacklevel=2,
        )


def warn_if_anisotropic(
    affine: np.ndarray,
    shape: Sequence[int],
    path: str,
    spacing: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
) -> None:
    """Warn when one voxel axis is over :data:`ANISOTROPY_RATIO` times coarser than the finest, or when the
    volume, resampled to ``spacing``, has fewer voxels along an axis than a ``roi_size`` window.

    Args:
        affine, shape: the volume's grid ((4, 4) voxel-to-RAS affine, spatial shape).
        path: named in the warnings.
        spacing: the target voxel size in mm (RAS order), or None for the native grid.
        roi_size: the training window (RAS order), or None.
    """
    grid_affine, grid_shape = canonical_grid(affine, shape)
    native = np.linalg.norm(grid_affine[:3, :3], axis=0)
    target = np.asarray(spacing, dtype=np.float64) if spacing is not None else native
    coarse, fine = int(np.argmax(native)), float(native.min())
    sizes = " x ".join(f"{s:.3g}" for s in native)
    if native[coarse] > ANISOTROPY_RATIO * fine:
        warnings.warn(
            f"{path}: voxel size {sizes} mm: the {_RAS_AXES[coarse]} axis is {native[coarse] / fine:.1f} "
            f"times coarser than the finest; resampling to {target[coarse]:.3g} mm interpolates it "
            f"{native[coarse] / target[coarse]:.1f}x",
            stacklevel=2,
        )
    if roi_size is None:
        return
    extent = np.round(np.asarray(grid_shape) * native / target).astype(int)
    short = [axis for axis in range(3) if extent[axis] < int(roi_size[axis])]
    if short:
        shown = "; ".join(
            f"{extent[a]} voxels along {_RAS_AXES[a]} where the window needs {int(roi_size[a])}"
            for a in short
        )
        warnings.warn(
            f"{path}: resampled to {' x '.join(f'{t:.3g}' for t in target)} mm, the scan has {shown}; the "
            "rest of every window is zero padding",
            stacklevel=2,
        )


class ValidateScand(MapTransform):
    """Check loaded, channel-first volumes: finite voxels, label grid and label values; optionally what the
    images mean: modality, constant volumes, integer "CT" that cannot be in HU, anisotropy.

    Runs right after loading (before reorientation), so errors name the files as the user gave them.
    Missing, unreadable, 2D and 4D files are rejected earlier by the reader. Errors are
    :class:`InvalidScanError` (a pretraining dataset skips the scan, fine-tuning stops); the checks of
    meaning that cannot be sure (HU range, anisotropy) warn. Inside a cached dataset they run once per scan.

    Args:
        keys: image keys (each a (C, H, W, D) MetaTensor).
        label_key: key of the label map (1, H, W, D), or None. Its grid must match the first image's.
        num_classes: if given, label values must be integers in ``0 .. num_classes - 1``.
        check_finite: reject NaN/Inf voxels in images.
        allow_missing_keys: don't raise if an image key is missing (a missing label is never checked).
        accepted_modalities: reject images whose modality (item field, DICOM tag or
            ``channel_modalities``) is not listed, e.g. ``("CT",)``; None accepts any.
        modality_key: the item field holding the modality.
        channel_modalities: the pipeline's modality per channel when items name none (default CT).
        check_constant: reject images with a channel that holds one value everywhere.
        warn_implausible: warn about integer/boolean CT whose values cannot be HU, and about anisotropy.
        spacing: the target voxel size (RAS order) the pipeline resamples to, for the anisotropy warnings.
        roi_size: the training window (RAS order): warn when the resampled scan is smaller along an axis.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str | None = None,
        num_classes: int | None = None,
        check_finite: bool = True,
        allow_missing_keys: bool = False,
        accepted_modalities: Sequence[str] | None = None,
        modality_key: str = "modality",
        channel_modalities: Sequence[str] | None = None,
        check_constant: bool = False,
        warn_implausible: bool = False,
        spacing: Sequence[float] | None = None,
        roi_size: Sequence[int] | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.num_classes = num_classes
        self.check_finite = check_finite
        self.accepted_modalities = tuple(accepted_modalities) if accepted_modalities is not None else None
        self.modality_key = modality_key
        self.channel_modalities = tuple(channel_modalities) if channel_modalities else None
        self.check_constant = check_constant
        self.warn_implausible = warn_implausible
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        self.roi_size = tuple(int(r) for r in roi_size) if roi_size is not None else None

    def _check_meaning(self, data: Mapping[Hashable, Any], image: Any) -> None:
        path = source_name(image)
        if self.accepted_modalities is not None:
            check_modality(data, image, self.accepted_modalities, self.modality_key, self.channel_modalities)
        if self.check_constant:
            check_not_constant(image, path)
        if not self.warn_implausible:
            return
        found = channel_modalities_of(data, image, self.modality_key, self.channel_modalities)
        stored = list((getattr(image, "meta", None) or {}).get("stored_dtype") or [])
        for channel, modality in enumerate(found):
            dtype = stored[channel] if len(stored) == image.shape[0] else (stored[0] if stored else None)
            if dtype is not None and (modality is None or modality[0] == "CT"):
                warn_if_not_hounsfield(image[channel], dtype, path)
        warn_if_anisotropic(np.asarray(image.affine), image.shape[1:], path, self.spacing, self.roi_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = None
        for key in self.key_iterator(d):
            image = d[key]
            if self.check_finite:
                check_finite(image, source_name(image))
            self._check_meaning(d, image)
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
