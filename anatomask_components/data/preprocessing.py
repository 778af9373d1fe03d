"""Preprocessing shared by pretraining, fine-tuning and inference.

Every pipeline starts with the same :func:`deterministic_transforms` (load, channel-first, label remap and
checks, RAS orientation, resampling, normalisation), so pretraining and fine-tuning cannot drift apart.
The deterministic part comes first and the random part after it, so a dataset can cache the former
(:class:`anatomask_components.data.datasets.CachedScanDataset`, or MONAI's ``PersistentDataset``).

All builders return a flat ``monai.transforms.Compose`` over dicts such as ``{"image": path}`` or
``{"image": [ct, suv], "label": path, "modality": ["CT", "PET"]}``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.transforms import (
    BorderPadd,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)

from anatomask_components.data.augmentation import (
    RandSimulateEnhancementd,
    RandThinSlabd,
    augmented_crop_size,
    border_padding,
    intensity_augmentation,
    resolve_augmentation,
    spatial_augmentation,
)
from anatomask_components.data.labels import RemapLabelsd
from anatomask_components.data.normalization import NormalizeByModalityd
from anatomask_components.data.partial_labels import EncodeUnlabelledd
from anatomask_components.data.readers import RAS_LABELS, AnatoMaskReader
from anatomask_components.data.validation import ValidateScand


class PathSafeSpacingd(Spacingd):
    """``Spacingd`` that tolerates string items named ``<key>_*`` (MONAI Label's ``image_path``).

    monai 1.6 ``Spacingd`` calls ``.update()`` on every item whose name starts with ``"<key>_"``, meant for
    the old ``image_meta_dict``; MONAI Label adds the string ``image_path``, which then crashes with
    ``AttributeError: 'str' object has no attribute 'update'``. Such non-dict items
    are set aside during resampling and put back unchanged. Inversion is ``Spacingd``'s own.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{key}_" for key in self.keys)
        set_aside = {
            name: d.pop(name)
            for name in list(d)
            if isinstance(name, str) and name.startswith(prefixes) and not isinstance(d[name], dict)
        }
        d = super().__call__(d, lazy=lazy)
        d.update(set_aside)
        return d


def loading_transforms(
    image_key: str = "image",
    label_key: str | None = None,
    num_classes: int | None = None,
    label_mapping: str | os.PathLike | Mapping[Any, Any] | None = None,
    image_channel_dim: int | None = None,
    check_finite: bool = True,
    label_optional: bool = False,
    accepted_modalities: Sequence[str] | None = None,
    channel_modalities: Sequence[str] | None = None,
    modality_key: str = "modality",
    spacing: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
) -> list:
    """Load, make channel-first, remap and check labels, check what the images mean, reorient to RAS.

    Images that cannot be used are an ``InvalidScanError`` naming the file: a modality outside
    ``accepted_modalities``, a constant channel; implausible ones get a warning naming the file: integer or
    boolean CT whose values cannot be HU, a voxel axis over 5x coarser than another, fewer voxels after
    resampling than ``roi_size`` (see :class:`~anatomask_components.data.validation.ValidateScand`).

    Args:
        image_key: item key of the image path (or list of channel paths).
        label_key: item key of the label path, or None (images only).
        num_classes: if given, label values (after remapping) must lie in ``0 .. num_classes - 1``.
        label_mapping: remap labels first (name, JSON path or dict; unmapped ids become background), see
            :mod:`anatomask_components.data.labels`.
        image_channel_dim: ``-1`` for MSD-style 4D files holding channels in their last axis.
        check_finite: reject images with NaN/Inf voxels.
        label_optional: accept items without ``label_key`` (checking or fingerprinting a datalist that
            mixes labelled and unlabelled scans); otherwise a missing label is a KeyError.
        accepted_modalities: the modalities the model is built for, e.g. ``("CT",)``; None accepts any.
        channel_modalities, modality_key: where the modality of each channel is read (see
            :func:`deterministic_transforms`).
        spacing, roi_size: the target voxel size and training window, for the warnings only.

    Returns:
        the list of transforms; images come out (C, H, W, D) float32 in RAS, labels (1, H, W, D).
    """
    keys = [image_key] + ([label_key] if label_key else [])
    reader = AnatoMaskReader(channel_dim=image_channel_dim)
    transforms: list = [
        LoadImaged(keys, reader=reader, allow_missing_keys=label_optional),
        EnsureChannelFirstd(keys, allow_missing_keys=label_optional),
    ]
    if label_key and label_mapping is not None:
        transforms.append(RemapLabelsd(label_key, label_mapping, allow_missing_keys=label_optional))
    transforms += [
        ValidateScand(
            image_key,
            label_key=label_key,
            num_classes=num_classes,
            check_finite=check_finite,
            accepted_modalities=accepted_modalities,
            modality_key=modality_key,
            channel_modalities=channel_modalities,
            check_constant=True,
            warn_implausible=True,
            spacing=spacing,
            roi_size=roi_size,
        ),
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS, allow_missing_keys=label_optional),
    ]
    return transforms


def deterministic_transforms(
    image_key: str = "image",
    label_key: str | None = None,
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    normalization: str | Mapping[str, str] = "zscore",
    fingerprint: str | os.PathLike | Mapping[str, Any] | None = None,
    channel_modalities: Sequence[str] | None = None,
    modality_key: str = "modality",
    num_classes: int | None = None,
    label_mapping: str | os.PathLike | Mapping[Any, Any] | None = None,
    image_channel_dim: int | None = None,
    suv_max: float = 20.0,
    check_finite: bool = True,
    accepted_modalities: Sequence[str] | None = None,
    roi_size: Sequence[int] | None = None,
) -> Compose:
    """The one deterministic preprocessing path: load, check, RAS, resample, normalise.

    Args:
        image_key: item key of the image path (or list of channel paths, stacked as channels).
        label_key: item key of the label map, or None (pretraining, inference).
        spacing: target voxel size in mm (default 1.5 isotropic); None keeps the native grid.
            Images are resampled trilinearly, labels with nearest neighbour.
        normalization: ``"ct"`` (nnU-Net's CT scheme with the dataset fingerprint ``fingerprint``: what
            the bundles use), ``"zscore"`` (per image; the default of these functions, which need no
            fingerprint), ``"suv"`` or ``"none"`` for CT channels; or ``{"CT": .., "MR": .., "PET": ..}``.
            MR and PET default to ``"zscore"``. See :mod:`anatomask_components.data.normalization`.
        fingerprint: JSON path or dict from ``anatomask fingerprint`` (needed by ``"ct"``).
        channel_modalities: modality of each channel when items carry no ``modality`` field, e.g.
            ``("CT", "PET")``; default all CT.
        modality_key: item field with the per-case modality (AMOS: CT and MR cases in one model).
        num_classes: if given, label values must lie in ``0 .. num_classes - 1`` (after remapping).
        label_mapping: label remapping applied on load (see :mod:`anatomask_components.data.labels`).
        image_channel_dim: ``-1`` for MSD-style 4D multi-channel files.
        suv_max: SUV clip for the ``"suv"`` scheme.
        check_finite: reject images with NaN/Inf voxels.
        accepted_modalities: reject images of other modalities (item field or DICOM Modality tag), e.g.
            ``("CT",)`` for a CT-only model; None accepts any. See :func:`loading_transforms` for the other
            checks of meaning.
        roi_size: the training window, only to warn about scans smaller than it after resampling.

    Returns:
        a Compose mapping an item to ``{image_key: (C, H', W', D') float32 MetaTensor, label_key: (1, H',
        W', D')}`` in RAS at ``spacing``; other item fields pass through (``image_path`` included).
    """
    keys = [image_key] + ([label_key] if label_key else [])
    transforms = loading_transforms(
        image_key,
        label_key,
        num_classes,
        label_mapping,
        image_channel_dim,
        check_finite,
        accepted_modalities=accepted_modalities,
        channel_modalities=channel_modalities,
        modality_key=modality_key,
        spacing=spacing,
        roi_size=roi_size,
    )
    if spacing is not None:
        transforms.append(
            PathSafeSpacingd(
                keys,
                pixdim=tuple(float(s) for s in spacing),
                mode=("bilinear", "nearest")[: len(keys)],
            )
        )
    transforms.append(
        NormalizeByModalityd(
            image_key,
            normalization=normalization,
            fingerprint=fingerprint,
            channel_modalities=channel_modalities,
            modality_key=modality_key,
            suv_max=suv_max,
        )
    )
    return Compose(transforms)


def pretrain_transforms(
    roi_size: Sequence[int] = (112, 112, 128),
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    normalization: str | Mapping[str, str] = "zscore",
    fingerprint: str | os.PathLike | Mapping[str, Any] | None = None,
    rotate_prob: float = 0.0,
    scale_prob: float = 0.0,
    flip_prob: float = 0.5,
    image_key: str = "image",
    channel_modalities: Sequence[str] | None = None,
    modality_key: str = "modality",
    image_channel_dim: int | None = None,
    suv_max: float = 20.0,
    accepted_modalities: Sequence[str] | None = None,
) -> Compose:
    """Pretraining pipeline: the shared deterministic part, padding to the ROI, one random crop, augmentation.

    Args:
        roi_size: crop size (default 112 x 112 x 128, the AnatoMask pretraining crop).
        spacing, normalization, fingerprint, channel_modalities, modality_key, image_channel_dim, suv_max,
            accepted_modalities: see :func:`deterministic_transforms`.
        rotate_prob: probability of a random rotation (+-30 deg about each axis); reference 0.2.
        scale_prob: probability of a random scaling (0.7-1.4); reference 0.2.
        flip_prob: probability of a flip, per axis.
        image_key: item key of the image.

    Returns:
        a Compose mapping ``{"image": path}`` to ``{"image": (C, *roi_size) float32 MetaTensor}`` (C = 1
        for CT). Volumes smaller than the ROI are zero-padded (after normalisation) before cropping.
    """
    deterministic = deterministic_transforms(
        image_key,
        None,
        spacing,
        normalization,
        fingerprint,
        channel_modalities,
        modality_key,
        image_channel_dim=image_channel_dim,
        suv_max=suv_max,
        accepted_modalities=accepted_modalities,
        roi_size=roi_size,
    )
    settings = resolve_augmentation(
        {"rotate_prob": rotate_prob, "scale_prob": scale_prob, "flip_prob": flip_prob}
    )
    return Compose(
        [
            *deterministic.transforms,
            SpatialPadd(image_key, spatial_size=tuple(roi_size)),
            RandSpatialCropd(image_key, roi_size=augmented_crop_size(roi_size, settings), random_size=False),
            *spatial_augmentation([image_key], roi_size, settings, ["bilinear"]),
        ]
    )


def finetune_train_transforms(
    roi_size: Sequence[int] = (112, 112, 128),
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    normalization: str | Mapping[str, str] = "zscore",
    fingerprint: str | os.PathLike | Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    label_mapping: str | os.PathLike | Mapping[Any, Any] | None = None,
    num_samples: int = 2,
    foreground_probability: float = 0.33,
    augmentation: Mapping[str, Any] | str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    channel_modalities: Sequence[str] | None = None,
    modality_key: str = "modality",
    image_channel_dim: int | None = None,
    suv_max: float = 20.0,
    accepted_modalities: Sequence[str] | None = None,
    labels: Mapping[Any, str] | Sequence[str] | None = None,
    label_sets: Sequence[Sequence[int]] = (),
) -> Compose:
    """Fine-tuning training pipeline: shared deterministic part, label-aware crops that may reach past the
    border, nnU-Net's augmentation (the deterministic part is exactly the pretraining one plus the label),
    then the marking of partially labelled items' unlabelled voxels.

    Args:
        roi_size: patch size.
        spacing, normalization, fingerprint, num_classes, label_mapping, channel_modalities, modality_key,
            image_channel_dim, suv_max, accepted_modalities: see :func:`deterministic_transforms`.
        num_samples: patches per volume per call (the dataset returns a list of ``num_samples`` dicts).
        foreground_probability: share of patches centred on a foreground voxel (nnU-Net oversamples 33 %).
        augmentation: overrides of nnU-Net's augmentation settings, or ``"none"``; see
            :mod:`anatomask_components.data.augmentation` for the keys and their reference values.
        image_key, label_key: item keys.
        labels: the model's classes (``{"0": "background", "1": "liver", ...}``), to read the ``labelled``
            field of partially labelled items; None refuses items with that field.
        label_sets: the training set's table of labelled-class sets
            (:func:`~anatomask_components.data.partial_labels.partial_label_sets`).

    Returns:
        a Compose mapping an item to a list of ``num_samples`` dicts ``{"image": (C, *roi_size) float32,
        "label": (1, *roi_size)}``. Everything outside the scan (border crops, rotation corners, removed
        slab slices) is 0 in the image and background in the label, as the sliding window pads. In the
        crops of a partially labelled item, every voxel outside its labelled classes holds the code
        ``UNLABELLED_BASE + set_index``
        (:class:`~anatomask_components.data.partial_labels.EncodeUnlabelledd`); fully labelled items come
        out as they would without it.
    """
    keys = [image_key, label_key]
    settings = resolve_augmentation(augmentation)
    deterministic = deterministic_transforms(
        image_key,
        label_key,
        spacing,
        normalization,
        fingerprint,
        channel_modalities,
        modality_key,
        num_classes,
        label_mapping,
        image_channel_dim,
        suv_max,
        accepted_modalities=accepted_modalities,
        roi_size=roi_size,
    )
    border = border_padding(roi_size, settings)
    transforms = [
        *deterministic.transforms,
        SpatialPadd(keys, spatial_size=tuple(roi_size)),
        *([BorderPadd(keys, spatial_border=border)] if any(border) else []),
        RandCropByPosNegLabeld(
            keys,
            label_key=label_key,
            spatial_size=augmented_crop_size(roi_size, settings),
            pos=foreground_probability,
            neg=1.0 - foreground_probability,
            num_samples=num_samples,
            allow_smaller=True,
        ),
        *spatial_augmentation(keys, roi_size, settings, ["bilinear", "nearest"]),
    ]
    if settings["enhance_prob"] > 0:
        transforms.append(
            RandSimulateEnhancementd(
                image_key, label_key, prob=settings["enhance_prob"], offset_range=settings["enhance_range"]
            )
        )
    transforms += intensity_augmentation(image_key, settings)
    if settings["thin_slab_prob"] > 0:
        transforms.append(
            RandThinSlabd(keys, prob=settings["thin_slab_prob"], min_slices=settings["thin_slab_min_slices"])
        )
    # last: the positive crops and the per-class enhancement must see class ids, not unlabelled codes
    transforms.append(EncodeUnlabelledd(label_key, label_sets, labels))
    return Compose(transforms)


def finetune_val_transforms(
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    normalization: str | Mapping[str, str] = "zscore",
    fingerprint: str | os.PathLike | Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    label_mapping: str | os.PathLike | Mapping[Any, Any] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    channel_modalities: Sequence[str] | None = None,
    modality_key: str = "modality",
    image_channel_dim: int | None = None,
    suv_max: float = 20.0,
    accepted_modalities: Sequence[str] | None = None,
) -> Compose:
    """Validation pipeline: the shared deterministic part on image and label, whole volumes (no crop).

    Args:
        see :func:`deterministic_transforms`.

    Returns:
        a Compose mapping an item to ``{"image": (C, H, W, D), "label": (1, H, W, D)}`` in RAS at ``spacing``;
        sliding-window inference pads volumes smaller than its ROI itself.
    """
    return deterministic_transforms(
        image_key,
        label_key,
        spacing,
        normalization,
        fingerprint,
        channel_modalities,
        modality_key,
        num_classes,
        label_mapping,
        image_channel_dim,
        suv_max,
        accepted_modalities=accepted_modalities,
    )


def inference_transforms(
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    normalization: str | Mapping[str, str] = "zscore",
    fingerprint: str | os.PathLike | Mapping[str, Any] | None = None,
    image_key: str = "image",
    channel_modalities: Sequence[str] | None = None,
    modality_key: str = "modality",
    image_channel_dim: int | None = None,
    suv_max: float = 20.0,
    accepted_modalities: Sequence[str] | None = None,
) -> Compose:
    """Inference pipeline: the shared deterministic part on the image only, invertible.

    The image keeps its transform history, so a bundle can write predictions back in the input geometry
    (same shape, affine and orientation as the input file) with
    ``Invertd(keys="pred", transform=<this Compose>, orig_keys="image", nearest_interp=True)`` followed by
    ``SaveImaged``. MONAI Label's string ``image_path`` passes through untouched.

    Args:
        see :func:`deterministic_transforms`.

    Returns:
        a Compose mapping ``{"image": path}`` to ``{"image": (C, H, W, D) float32 MetaTensor}``.
    """
    return deterministic_transforms(
        image_key,
        None,
        spacing,
        normalization,
        fingerprint,
        channel_modalities,
        modality_key,
        image_channel_dim=image_channel_dim,
        suv_max=suv_max,
        accepted_modalities=accepted_modalities,
    )
