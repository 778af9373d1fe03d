"""Intensity normalisation per channel, chosen by modality (CT, MR, PET).

Schemes:

- ``"ct"``: nnU-Net's CT scheme: clip to the dataset's foreground percentiles 0.5 / 99.5, then z-score with
  the dataset's foreground mean and std (from ``anatomask fingerprint``, or computed by the bundles on their
  first run: :func:`anatomask_components.data.fingerprint.resolve_fingerprint`). This is what the
  reference code runs, since it pretrains and fine-tunes on nnU-Net-preprocessed data, and what every bundle
  uses for CT: one mapping for every scan, so that an organ has the same value in every scan of a scanner and
  contrast phase. Padding is 0 after normalisation, the foreground mean, as in nnU-Net; nnU-Net's
  multiplicative brightness augmentation also scales around that 0.
- ``"zscore"``: per image and channel, ``(x - mean) / std`` over all voxels (nnU-Net's scheme for MR).
  For CT it moves organs between scans: a scan that is mostly air has a low mean and std, so its soft tissue
  maps to what bone maps to in a scan that fills its field of view. A constant channel becomes all zeros.
- ``"suv"``: PET in SUV units is already quantitative, so no per-image statistics: clip to
  ``[0, suv_max]`` (negative reconstruction noise and the bladder/kidney peaks) and divide by ``suv_max``.
- ``"none"``: leave the values as they are.

Default per modality, where a function is given a single scheme name: that scheme for CT, MR ``zscore``, PET
``zscore`` (what nnU-Net, the usual AutoPET baseline, does for every non-CT channel); choose ``"suv"``
explicitly. The functions default to ``"zscore"`` because it needs no fingerprint; the bundles set ``"ct"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from anatomask_components.data.validation import canonical_modality, source_name

MODALITIES = ("CT", "MR", "PET")
SCHEMES = ("zscore", "ct", "suv", "none")
_STATS_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def normalise_modality(name: str) -> str:
    """Upper-case a modality name and check it is CT, MR or PET (``MRI`` is accepted as MR, DICOM's ``PT``
    as PET: :func:`~anatomask_components.data.validation.canonical_modality`)."""
    upper = canonical_modality(name)
    if upper not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {name!r}")
    return upper


def resolve_schemes(normalization: str | Mapping[str, str]) -> dict[str, str]:
    """Normalisation scheme per modality.

    Args:
        normalization: a scheme name (applies to CT; MR and PET keep ``zscore``) or a mapping
            ``{"CT": ..., "MR": ..., "PET": ...}`` (missing modalities keep their default).

    Returns:
        ``{"CT": scheme, "MR": scheme, "PET": scheme}``.
    """
    schemes = {"CT": "zscore", "MR": "zscore", "PET": "zscore"}
    if isinstance(normalization, str):
        schemes["CT"] = normalization
    else:
        schemes.update({normalise_modality(m): s for m, s in normalization.items()})
    for modality, scheme in schemes.items():
        if scheme not in SCHEMES:
            raise ValueError(f"normalisation for {modality} must be one of {SCHEMES}, got {scheme!r}")
    return schemes


def load_fingerprint(fingerprint: str | os.PathLike | Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Foreground intensity statistics per modality, from ``anatomask fingerprint`` or nnU-Net.

    Args:
        fingerprint: a dict or JSON file written by :func:`anatomask_components.data.fingerprint.
            compute_fingerprint` (``{"intensity": {"CT": {"mean", "std", "percentile_00_5",
            "percentile_99_5", ...}}}``), or nnU-Net v2's ``dataset_fingerprint.json``, whose channel 0
            is taken as CT.

    Returns:
        ``{modality: {"mean", "std", "percentile_00_5", "percentile_99_5"}}``.
    """
    raw = (
        fingerprint
        if isinstance(fingerprint, Mapping)
        else json.loads(Path(fingerprint).read_text(encoding="utf-8"))
    )
    if "intensity" in raw:
        per_modality = raw["intensity"]
    elif "foreground_intensity_properties_per_channel" in raw:
        per_modality = {"CT": raw["foreground_intensity_properties_per_channel"]["0"]}
    else:
        raise ValueError(
            "fingerprint has neither 'intensity' (anatomask) nor nnU-Net's per-channel statistics"
        )
    stats = {}
    for modality, values in per_modality.items():
        missing = [k for k in _STATS_KEYS if k not in values]
        if missing:
            raise ValueError(f"fingerprint statistics for {modality} lack {missing}")
        stats[normalise_modality(modality)] = {k: float(values[k]) for k in _STATS_KEYS}
    return stats


def normalize_channel(
    channel: torch.Tensor, scheme: str, stats: Mapping[str, float] | None = None, suv_max: float = 20.0
) -> torch.Tensor:
    """Normalise one channel.

    Args:
        channel: (H, W, D) float tensor.
        scheme: ``"zscore"``, ``"ct"``, ``"suv"`` or ``"none"`` (see the module docstring).
        stats: dataset statistics for ``"ct"``.
        suv_max: the SUV clip (and scale) for ``"suv"``.

    Returns:
        the normalised channel, float32, same shape.
    """
    channel = channel.float()
    if scheme == "none":
        return channel
    if scheme == "suv":
        return channel.clamp(0.0, suv_max) / suv_max
    if scheme == "ct":
        if stats is None:
            raise ValueError("the 'ct' normalisation needs CT statistics from a fingerprint")
        clipped = channel.clamp(stats["percentile_00_5"], stats["percentile_99_5"])
        return (clipped - stats["mean"]) / max(stats["std"], 1e-8)
    # Two passes with float64 accumulation: float32 sums over ~10^8 voxels lose digits, and a float64 copy
    # of a whole CT would cost 8 bytes per voxel.
    mean = float(channel.mean(dtype=torch.float64))
    centred = channel - mean
    std = float(centred.square().mean(dtype=torch.float64).sqrt())
    return centred / max(std, 1e-8)


class NormalizeByModalityd(MapTransform):
    """Normalise every channel of an image by the scheme of its modality.

    The modality of each channel comes from, in order: the item's ``modality_key`` field (a string for all
    channels, or a list with one entry per channel, as the datalists write them); ``channel_modalities``;
    ``default_modality``.

    Args:
        keys: image keys, each (C, H, W, D).
        normalization: scheme for CT, or ``{modality: scheme}`` (see :func:`resolve_schemes`).
        fingerprint: dataset statistics (path or dict) for the ``"ct"`` scheme.
        channel_modalities: one modality per channel, e.g. ``("CT", "PET")`` for AutoPET.
        default_modality: modality of channels nobody names.
        modality_key: item field holding the per-case modality.
        suv_max: SUV clip for the ``"suv"`` scheme.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        normalization: str | Mapping[str, str] = "zscore",
        fingerprint: str | os.PathLike | Mapping[str, Any] | None = None,
        channel_modalities: Sequence[str] | None = None,
        default_modality: str = "CT",
        modality_key: str = "modality",
        suv_max: float = 20.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.schemes = resolve_schemes(normalization)
        self.stats = load_fingerprint(fingerprint) if fingerprint is not None else {}
        self.channel_modalities = (
            tuple(normalise_modality(m) for m in channel_modalities) if channel_modalities else None
        )
        self.default_modality = normalise_modality(default_modality)
        self.modality_key = modality_key
        self.suv_max = float(suv_max)

    def modalities_for(self, data: Mapping[Hashable, Any], num_channels: int, path: str) -> list[str]:
        """The modality of each of the ``num_channels`` channels of an item."""
        given = data.get(self.modality_key)
        if given is None:
            given = self.channel_modalities
        if given is None:
            return [self.default_modality] * num_channels
        if isinstance(given, str):
            return [normalise_modality(given)] * num_channels
        if len(given) != num_channels:
            raise ValueError(f"{path}: {len(given)} modalities {list(given)} for {num_channels} channels")
        return [normalise_modality(m) for m in given]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            modalities = self.modalities_for(d, image.shape[0], source_name(image))
            for modality in modalities:
                if self.schemes[modality] == "ct" and modality not in self.stats:
                    raise ValueError(
                        f"{source_name(image)}: normalization 'ct' for {modality} needs {modality} "
                        "statistics: train the bundle first (it writes them beside models/model.pt and into "
                        "configs/inference.json), or run "
                        "`anatomask fingerprint` and pass its JSON as fingerprint="
                    )
            normalised = torch.stack(
                [
                    normalize_channel(values[c], self.schemes[m], self.stats.get(m), self.suv_max)
                    for c, m in enumerate(modalities)
                ]
            )
            # convert_to_dst_type keeps the MetaTensor's affine and transform history
            d[key] = convert_to_dst_type(normalised, image, dtype=torch.float32)[0]
        return d
