"""Fine-tuning augmentation: nnU-Net v2's default spatial and intensity transforms, plus what inference meets.

The reference (AnatoMask's ``STUNetTrainer``) is an nnU-Net v2 trainer, so its fine-tuning augmentation is
``nnUNetTrainer.get_training_transforms``. Every transform is a key of :data:`NNUNET_AUGMENTATION`, whose
values are nnU-Net's probabilities and ranges, and a bundle overrides any of them with
``--augmentation#<key> <value>``. In nnU-Net's order:

=====================  ==============================================  ================================
key                    nnU-Net v2 (``get_training_transforms``)         here
=====================  ==============================================  ================================
rotate_*               SpatialTransform, +-30 deg per axis, p 0.2       ``RandRotated``
scale_*                SpatialTransform, zoom 0.7-1.4, p 0.2            ``RandZoomd``
noise_*                GaussianNoise, variance U(0, 0.1), p 0.1         ``RandGaussianNoised`` (std)
blur_*                 GaussianBlur, sigma 0.5-1, p 0.2                 ``RandGaussianSmoothd``
brightness_*           BrightnessMultiplicative x0.75-1.25, p 0.15      ``RandScaleIntensityd``
contrast_*             ContrastAugmentation x0.75-1.25, p 0.15          ``RandScaleIntensityFixedMeand``
lowres_*               SimulateLowResolution zoom 0.5-1, p 0.25         ``RandSimulateLowResolutiond``
gamma_inverted_prob    Gamma 0.7-1.5 on the inverted image, p 0.1       ``RandAdjustContrastd(invert_image)``
gamma_*                Gamma 0.7-1.5, retain stats, p 0.3               ``RandAdjustContrastd``
flip_prob              Mirror, p 0.5 per axis                           ``RandFlipd``
=====================  ==============================================  ================================

Differences, all small: MONAI draws the noise std (not the variance) uniformly, the gamma uniformly over the
whole range (nnU-Net picks below or above 1 with equal chance first), upsamples the low-resolution copy
trilinearly (nnU-Net: cubic), and applies blur to every channel (nnU-Net: each channel with p 0.5).

Two more keys make training see what inference sees (``../../docs/finetune.md``, "Scans of any size"):

- ``border_fraction``: crops reach past the scan's border by up to this fraction of the ROI per side,
  padded with 0, the foreground mean after normalisation (nnU-Net's data loader pads its patches the same
  way, by about a quarter of the patch at its default rotation range). The sliding window pads with the same 0
  (``SlidingWindowInferer``'s ``cval``), so a scan smaller than a window looks at inference as the border
  of a crop looked in training.
- ``thin_slab_*``: with this probability, only a random slab of ``thin_slab_min_slices`` .. ROI-1
  consecutive slices along the last (superior-inferior) axis is kept and the rest set to the padding 0
  (label: background), which is what a 14-slice scan in a 64-deep window is. Not in nnU-Net, whose
  datasets rarely hold such scans; set ``thin_slab_prob`` to 0 for nnU-Net's recipe exactly.

And one off by default: ``enhance_*`` simulates another contrast phase by adding, per labelled class, a
random offset (normalised units) to that class's voxels, so that the network does not learn an organ by its
intensity in one phase (a non-contrast training scan against a portal-venous test scan).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
)

__all__ = [
    "NNUNET_AUGMENTATION",
    "RandSimulateEnhancementd",
    "RandThinSlabd",
    "augmented_crop_size",
    "border_padding",
    "intensity_augmentation",
    "resolve_augmentation",
    "spatial_augmentation",
]

NNUNET_AUGMENTATION: dict[str, Any] = {
    "rotate_prob": 0.2,
    "rotate_range_deg": 30.0,
    "scale_prob": 0.2,
    "scale_range": [0.7, 1.4],
    "flip_prob": 0.5,
    "noise_prob": 0.1,
    "noise_variance_max": 0.1,
    "blur_prob": 0.2,
    "blur_sigma": [0.5, 1.0],
    "brightness_prob": 0.15,
    "brightness_range": [0.75, 1.25],
    "contrast_prob": 0.15,
    "contrast_range": [0.75, 1.25],
    "lowres_prob": 0.25,
    "lowres_zoom": [0.5, 1.0],
    "gamma_inverted_prob": 0.1,
    "gamma_prob": 0.3,
    "gamma_range": [0.7, 1.5],
    "border_fraction": 0.25,
    "thin_slab_prob": 0.3,
    "thin_slab_min_slices": 4,
    "enhance_prob": 0.0,
    "enhance_range": [0.0, 0.3],
}
# With rotation or scaling on, the crop is taken this much larger, augmented, then centre-cropped to the
# ROI, so that the augmented patch is filled with image rather than padding (0.7 zoom-out needs >= 1.43).
AUGMENTATION_MARGIN = 1.5


def resolve_augmentation(augmentation: Mapping[str, Any] | str | None = None) -> dict[str, Any]:
    """nnU-Net's defaults updated with ``augmentation``.

    Args:
        augmentation: overrides of :data:`NNUNET_AUGMENTATION` keys; None or ``{}`` for the defaults;
            ``"none"`` turns every random transform off (probabilities 0, no border crops).

    Returns:
        the complete settings.

    Raises:
        KeyError: an unknown key (a misspelt key would otherwise be ignored silently).
    """
    settings = dict(NNUNET_AUGMENTATION)
    if augmentation == "none":
        return {k: (0.0 if k.endswith("_prob") or k == "border_fraction" else v) for k, v in settings.items()}
    if isinstance(augmentation, str):
        raise ValueError(f"augmentation must be a mapping, None or 'none', got {augmentation!r}")
    unknown = sorted(set(augmentation or {}) - set(settings))
    if unknown:
        raise KeyError(f"unknown augmentation keys {unknown}; known: {sorted(settings)}")
    settings.update(augmentation or {})
    return settings


def augmented_crop_size(roi_size: Sequence[int], settings: Mapping[str, Any]) -> tuple[int, ...]:
    """The crop taken before rotation and scaling (the ROI when both are off)."""
    margin = AUGMENTATION_MARGIN if settings["rotate_prob"] > 0 or settings["scale_prob"] > 0 else 1.0
    return tuple(int(math.ceil(s * margin)) for s in roi_size)


def border_padding(roi_size: Sequence[int], settings: Mapping[str, Any]) -> tuple[int, ...]:
    """Voxels of padding added on each side of the volume so that crops can reach past its border."""
    return tuple(int(round(s * float(settings["border_fraction"]))) for s in roi_size)


def spatial_augmentation(
    keys: Sequence[str], roi_size: Sequence[int], settings: Mapping[str, Any], modes: Sequence[str]
) -> list:
    """Rotation, scaling, centre crop to the ROI, and flips per axis.

    Args:
        keys: image (and label) keys.
        roi_size: the patch size after the centre crop.
        settings: from :func:`resolve_augmentation`.
        modes: interpolation per key: ``"bilinear"`` for images, ``"nearest"`` for labels.
    """
    transforms: list = []
    if settings["rotate_prob"] > 0 or settings["scale_prob"] > 0:
        angle = math.radians(float(settings["rotate_range_deg"]))
        low, high = settings["scale_range"]
        transforms += [
            RandRotated(
                keys,
                range_x=angle,
                range_y=angle,
                range_z=angle,
                prob=settings["rotate_prob"],
                keep_size=True,
                mode=list(modes),
                padding_mode="zeros",
            ),
            RandZoomd(
                keys,
                min_zoom=low,
                max_zoom=high,
                prob=settings["scale_prob"],
                keep_size=True,
                mode=["nearest" if m == "nearest" else "trilinear" for m in modes],  # interpolate() names
                padding_mode="constant",
            ),
            CenterSpatialCropd(keys, roi_size=tuple(roi_size)),
        ]
    if settings["flip_prob"] > 0:
        transforms += [RandFlipd(keys, prob=settings["flip_prob"], spatial_axis=axis) for axis in range(3)]
    return transforms


def intensity_augmentation(image_key: str, settings: Mapping[str, Any]) -> list:
    """nnU-Net's intensity transforms on the image, in nnU-Net's order (transforms with p 0 are left out)."""
    candidates = [
        (
            "noise_prob",
            lambda p: RandGaussianNoised(image_key, prob=p, std=math.sqrt(settings["noise_variance_max"])),
        ),
        (
            "blur_prob",
            lambda p: RandGaussianSmoothd(
                image_key,
                sigma_x=tuple(settings["blur_sigma"]),
                sigma_y=tuple(settings["blur_sigma"]),
                sigma_z=tuple(settings["blur_sigma"]),
                prob=p,
            ),
        ),
        (
            "brightness_prob",
            lambda p: RandScaleIntensityd(
                image_key, factors=[f - 1.0 for f in settings["brightness_range"]], prob=p
            ),
        ),
        (
            "contrast_prob",
            lambda p: RandScaleIntensityFixedMeand(
                image_key,
                factors=[f - 1.0 for f in settings["contrast_range"]],
                fixed_mean=True,
                preserve_range=True,
                prob=p,
            ),
        ),
        (
            "lowres_prob",
            lambda p: RandSimulateLowResolutiond(
                image_key, prob=p, zoom_range=tuple(settings["lowres_zoom"]), upsample_mode="trilinear"
            ),
        ),
        (
            "gamma_inverted_prob",
            lambda p: RandAdjustContrastd(
                image_key, gamma=tuple(settings["gamma_range"]), invert_image=True, retain_stats=True, prob=p
            ),
        ),
        (
            "gamma_prob",
            lambda p: RandAdjustContrastd(
                image_key, gamma=tuple(settings["gamma_range"]), retain_stats=True, prob=p
            ),
        ),
    ]
    return [build(settings[key]) for key, build in candidates if settings[key] > 0]


class RandThinSlabd(RandomizableTransform, MapTransform):
    """Keep a random slab of consecutive slices along one axis and set the rest to the padding value.

    Args:
        keys: image and label keys, each (C, H, W, D).
        prob: probability of cutting a slab.
        min_slices: the thinnest slab kept.
        axis: spatial axis of the slices (2: the superior-inferior axis in RAS).
        padding_value: what the removed slices become, per key (images: the padding of the sliding window,
            0; labels: background, 0).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.2,
        min_slices: int = 4,
        axis: int = 2,
        padding_value: float | Sequence[float] = 0.0,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.min_slices = int(min_slices)
        self.axis = int(axis)
        values = padding_value if isinstance(padding_value, Sequence) else [padding_value] * len(self.keys)
        self.padding_values = [float(v) for v in values]
        self.slab: tuple[int, int] | None = None

    def randomize(self, depth: int) -> None:  # type: ignore[override]
        super().randomize(None)
        self.slab = None
        if not self._do_transform or depth <= self.min_slices:
            return
        thickness = int(self.R.randint(self.min_slices, depth))
        start = int(self.R.randint(0, depth - thickness + 1))
        self.slab = (start, start + thickness)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(int(d[first].shape[1 + self.axis]))
        if self.slab is None:
            return d
        start, stop = self.slab
        for key, value in zip(self.key_iterator(d), self.padding_values):
            volume = d[key].clone()
            moved = volume.movedim(1 + self.axis, -1)
            moved[..., :start] = value
            moved[..., stop:] = value
            d[key] = volume
        return d


class RandSimulateEnhancementd(RandomizableTransform, MapTransform):
    """Add a random offset to the image inside each labelled class, as another contrast phase would.

    Args:
        keys: image keys.
        label_key: the label map (1, H, W, D) whose classes get their own offsets.
        prob: probability per crop.
        offset_range: (low, high) offset in normalised units, drawn per class.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        prob: float = 0.0,
        offset_range: Sequence[float] = (0.0, 0.3),
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.offset_range = (float(offset_range[0]), float(offset_range[1]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = torch.as_tensor(d[self.label_key])[0]
        classes = [int(c) for c in torch.unique(label).tolist() if c > 0]
        offsets = self.R.uniform(*self.offset_range, size=len(classes)) if classes else np.zeros(0)
        for key in self.key_iterator(d):
            image = d[key].clone()
            shift = torch.zeros(label.shape, dtype=image.dtype)
            for value, offset in zip(classes, offsets):
                shift[label == value] = float(offset)
            image += shift.to(image.device)
            d[key] = image
        return d
