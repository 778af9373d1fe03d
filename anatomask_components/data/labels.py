"""Label sets and label remapping (e.g. TotalSegmentator ids to the FLARE22 and AMOS22 label sets).

A mapping is ``{source id: target id}``. Every source id NOT in the mapping becomes 0 (background): a
structure that the target label set does not name is background there, which is how FLARE22 and AMOS22
were annotated. Mappings ship as data below and can also be given as a JSON file ``{"5": 1, ...}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from anatomask_components.data.validation import InvalidScanError, source_name

# TotalSegmentator v2 class ids (totalsegmentator/map_to_binary.py, checked against release 2.18.0):
# the "total" task (CT) and the "total_mr" task (MR) number the same organs differently.
TOTALSEG_CT_IDS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "adrenal_gland_right": 8,
    "adrenal_gland_left": 9,
    "esophagus": 15,
    "duodenum": 19,
    "urinary_bladder": 21,
    "prostate": 22,
    "aorta": 52,
    "inferior_vena_cava": 63,
}
TOTALSEG_MR_IDS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "adrenal_gland_right": 8,
    "adrenal_gland_left": 9,
    "esophagus": 12,
    "duodenum": 14,
    "urinary_bladder": 16,
    "prostate": 17,
    "aorta": 23,
    "inferior_vena_cava": 24,
}

# Target label sets of the FLARE22 and AMOS22 (task 2) challenges, labels 1..N in this order, named with
# TotalSegmentator's names. The bundles' own names live in their dataset spec (bundles/*/dataset/spec.json);
# these tables say which TotalSegmentator structure each id is (AMOS22's "postcava" is its inferior vena
# cava) and ship with the package, where no bundles folder is (tests/data/test_data_labels.py checks that
# both agree).
FLARE22_CLASSES = (
    "liver",
    "kidney_right",
    "spleen",
    "pancreas",
    "aorta",
    "inferior_vena_cava",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "kidney_left",
)
AMOS22_CLASSES = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "duodenum",
    "urinary_bladder",
    "prostate",  # AMOS22 names: postcava, bladder, prostate/uterus
)


def label_names(classes: tuple[str, ...]) -> dict[str, str]:
    """``{"0": "background", "1": first class, ...}`` for a target label set."""
    return {"0": "background", **{str(i): name for i, name in enumerate(classes, start=1)}}


def _mapping(source_ids: Mapping[str, int], target_classes: tuple[str, ...]) -> dict[int, int]:
    return {source_ids[name]: target for target, name in enumerate(target_classes, start=1)}


LABEL_MAPPINGS: dict[str, dict[int, int]] = {
    "totalseg_to_flare22": _mapping(TOTALSEG_CT_IDS, FLARE22_CLASSES),
    "totalseg_to_amos22": _mapping(TOTALSEG_CT_IDS, AMOS22_CLASSES),
    "totalseg_mr_to_flare22": _mapping(TOTALSEG_MR_IDS, FLARE22_CLASSES),
    "totalseg_mr_to_amos22": _mapping(TOTALSEG_MR_IDS, AMOS22_CLASSES),
}
LABEL_SETS: dict[str, tuple[str, ...]] = {"flare22": FLARE22_CLASSES, "amos22": AMOS22_CLASSES}


def load_label_mapping(mapping: str | os.PathLike | Mapping[Any, Any]) -> dict[int, int]:
    """Resolve a label mapping given by name, JSON file or dict.

    Args:
        mapping: a name from :data:`LABEL_MAPPINGS` (``"totalseg_to_flare22"``, ``"totalseg_to_amos22"``,
            ``"totalseg_mr_to_flare22"``, ``"totalseg_mr_to_amos22"``), the path of a JSON file
            ``{"source id": target id}``, or a dict (keys may be strings, as JSON makes them).

    Returns:
        ``{source id: target id}`` with int keys and values.
    """
    if isinstance(mapping, Mapping):
        raw = mapping
    elif str(mapping) in LABEL_MAPPINGS:
        raw = LABEL_MAPPINGS[str(mapping)]
    elif Path(mapping).is_file():
        raw = json.loads(Path(mapping).read_text(encoding="utf-8"))
    else:
        raise ValueError(
            f"unknown label mapping {mapping!r}: not one of {sorted(LABEL_MAPPINGS)} nor a JSON file"
        )
    resolved = {int(source): int(target) for source, target in raw.items()}
    if any(source < 0 or target < 0 for source, target in resolved.items()):
        raise ValueError(f"label ids must be non-negative, got {resolved}")
    return resolved


def remap_labels(label: torch.Tensor, mapping: Mapping[int, int], path: str = "<label>") -> torch.Tensor:
    """Apply a label mapping; labels without an entry become 0.

    Args:
        label: integer-valued label map, any shape (e.g. (1, H, W, D)), any numeric dtype.
        mapping: ``{source id: target id}``.
        path: named in errors.

    Returns:
        the remapped label map, same shape and dtype (and metadata for a MetaTensor).

    Raises:
        InvalidScanError: the label map holds negative or non-integer values.
    """
    values = torch.as_tensor(label)
    index = values.round().long()
    if bool((index != values).any()) or bool((index < 0).any()):
        raise InvalidScanError(path, "label map holds negative or non-integer values; cannot remap")
    size = max(int(index.max()) if index.numel() else 0, max(mapping, default=0)) + 1
    lookup = torch.zeros(size, dtype=torch.long)
    for source, target in mapping.items():
        lookup[source] = target
    remapped = lookup[index.reshape(-1)].reshape(index.shape)
    return convert_to_dst_type(remapped, label, dtype=label.dtype)[0]


class RemapLabelsd(MapTransform):
    """Remap label ids through a mapping; ids without an entry become 0 (background).

    Args:
        keys: label keys.
        mapping: a mapping name, JSON path or dict (see :func:`load_label_mapping`).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mapping: str | os.PathLike | Mapping[Any, Any],
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mapping = load_label_mapping(mapping)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = remap_labels(d[key], self.mapping, source_name(d[key], str(key)))
        return d
