"""Partially labelled training scans: which classes a scan annotates, and how its label map says so.

A datalist item may carry ``"labelled": ["aorta", ...]`` (class names of the model's ``labels``, or
integer class ids): the foreground classes annotated in that scan. An item without the field is fully
labelled, and so is one that lists every foreground class. Everything else in such a scan (its 0 voxels,
and voxels of classes it does not list) may be background or any class it does not annotate.

The label map says so for the loss (:class:`anatomask_components.losses.PartialLabelDiceCELoss`, the
marginal loss of Shi et al. 2021): :class:`EncodeUnlabelledd`, the last transform of the fine-tuning
pipeline, sets every such voxel of a partially labelled crop to ``UNLABELLED_BASE + set_index``, where
``set_index`` is the position of the scan's labelled-class set in the dataset's table of such sets
(:func:`partial_label_sets`). Class ids therefore stay below :data:`UNLABELLED_BASE` (128 classes with
background) and a dataset holds at most :data:`MAX_LABEL_SETS` distinct sets (codes 128 .. 254).
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = [
    "LABELLED_KEY",
    "MAX_LABEL_SETS",
    "UNLABELLED_BASE",
    "EncodeUnlabelledd",
    "check_labelled_items",
    "labelled_classes",
    "partial_label_sets",
]

UNLABELLED_BASE = 128
MAX_LABEL_SETS = 127
LABELLED_KEY = "labelled"

Labels = Mapping[Any, str] | Sequence[str]


def _class_names(labels: Labels) -> dict[int, str]:
    """``{id: name}`` from a bundle's ``labels`` (``{"0": "background", ...}``) or a list of names."""
    if isinstance(labels, Mapping):
        return {int(k): str(v) for k, v in labels.items()}
    return dict(enumerate(str(name) for name in labels))


def _image_of(item: Mapping[str, Any], image_key: str = "image") -> str:
    value = item.get(image_key, "<no image>")
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def labelled_classes(
    item: Mapping[str, Any],
    labels: Labels,
    labelled_key: str = LABELLED_KEY,
    image_key: str = "image",
) -> tuple[int, ...] | None:
    """The foreground classes a datalist item annotates, checked against the model's labels.

    Args:
        item: a datalist item.
        labels: the model's classes, ``{"0": "background", "1": "liver", ...}`` or a list of names by id.
        labelled_key: the item field listing the annotated classes (names or ids).
        image_key: the item's image, named in errors.

    Returns:
        the sorted class ids, or None for a fully labelled item (no field, or every foreground class).

    Raises:
        ValueError: the field is not a non-empty list of foreground class names or ids; the message names
            the item's image and the bad entry.
    """
    if labelled_key not in item:
        return None
    value = item[labelled_key]
    names = _class_names(labels)
    foreground = {i: n for i, n in names.items() if i != 0}
    by_name = {n: i for i, n in foreground.items()}
    where = f"item {_image_of(item, image_key)}"
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"{where}: {labelled_key!r} must be a non-empty list of class names or ids, got {value!r}"
        )
    classes = set()
    for entry in value:
        if isinstance(entry, int) and not isinstance(entry, bool) and entry in foreground:
            classes.add(entry)
        elif isinstance(entry, str) and entry in by_name:
            classes.add(by_name[entry])
        else:
            if entry in (0, names.get(0)):
                why = "the background is never listed: list the foreground classes the scan annotates"
            else:
                close = difflib.get_close_matches(str(entry), list(by_name), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                shown = [repr(n) for n in by_name]
                known = ", ".join(shown[:20]) + (f", ... ({len(shown)} in all)" if len(shown) > 20 else "")
                why = (
                    f"not a class of this model{hint}; the classes are {known}, "
                    f"or their ids {min(foreground)}..{max(foreground)}"
                )
            raise ValueError(f"{where}: {labelled_key!r} lists {entry!r}, {why}")
    return None if classes == set(foreground) else tuple(sorted(classes))


def check_labelled_items(
    items: Sequence[Mapping[str, Any]],
    labels: Labels,
    section: str,
    name: str = "datalist",
    labelled_key: str = LABELLED_KEY,
) -> None:
    """Check the ``labelled`` field of a datalist section's items.

    Only ``training`` items may be partially labelled: validation and test scores compare every class
    against the reference, which a partially labelled scan does not have.

    Args:
        items: the section's items.
        labels: the model's classes (see :func:`labelled_classes`).
        section: the section's name.
        name: the datalist, first in messages.
        labelled_key: the item field.

    Raises:
        ValueError: a bad field (see :func:`labelled_classes`), or a partially labelled item outside
            ``training``.
    """
    for item in items:
        try:
            classes = labelled_classes(item, labels, labelled_key)
        except ValueError as error:
            raise ValueError(f"{name}: {section} {error}") from None
        if classes is not None and section != "training":
            raise ValueError(
                f"{name}: {section} item {_image_of(item)} is partially labelled ({labelled_key!r}: "
                f"{list(item[labelled_key])}); {section} scores need every class labelled: move it to "
                "'training' or label every class"
            )


def partial_label_sets(
    files: Sequence[Mapping[str, Any]], labels: Labels, labelled_key: str = LABELLED_KEY
) -> list[list[int]]:
    """The table of labelled-class sets of the partially labelled items of a training set.

    Args:
        files: the training items.
        labels: the model's classes (see :func:`labelled_classes`).
        labelled_key: the item field.

    Returns:
        the distinct sets, each a sorted list of class ids, in sorted order (so every process and every
        order of the items gives the same table); empty when every item is fully labelled.

    Raises:
        ValueError: a bad field, more than :data:`MAX_LABEL_SETS` sets, or more than
            :data:`UNLABELLED_BASE` classes with partially labelled items.
    """
    sets = {classes for item in files if (classes := labelled_classes(item, labels, labelled_key))}
    if sets and len(_class_names(labels)) > UNLABELLED_BASE:
        raise ValueError(
            f"partially labelled items need at most {UNLABELLED_BASE} classes (ids below the unlabelled "
            f"codes {UNLABELLED_BASE}+), the model has {len(_class_names(labels))}"
        )
    if len(sets) > MAX_LABEL_SETS:
        raise ValueError(
            f"the training items list {len(sets)} distinct sets of labelled classes; at most "
            f"{MAX_LABEL_SETS} fit the label map's codes from {UNLABELLED_BASE}"
        )
    return [list(classes) for classes in sorted(sets)]


class EncodeUnlabelledd(MapTransform):
    """Mark the voxels of a partially labelled item that its labelled classes do not cover.

    For an item whose ``labelled`` field lists a subset of the foreground classes, every label voxel that
    is not one of those classes becomes ``UNLABELLED_BASE + set_index`` (``set_index``: the position of
    the subset in ``label_sets``). Fully labelled items are returned as they are. The field is removed
    from the item, so that items with and without it collate into one batch.

    Runs after the crops and augmentation: the positive crops centre on the labelled classes of the
    raw label map, and interpolation never mixes a code with a class id.

    Args:
        keys: label keys, each ``(1, H, W, D)`` of class ids.
        label_sets: the dataset's table, from :func:`partial_label_sets` on the same items.
        labels: the model's classes (see :func:`labelled_classes`); None refuses any item with the field.
        labelled_key: the item field.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_sets: Sequence[Sequence[int]] = (),
        labels: Labels | None = None,
        labelled_key: str = LABELLED_KEY,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(label_sets) > MAX_LABEL_SETS:
            raise ValueError(f"at most {MAX_LABEL_SETS} label sets, got {len(label_sets)}")
        self.label_sets = [sorted(int(c) for c in classes) for classes in label_sets]
        self.labels = labels
        self.labelled_key = labelled_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.labelled_key not in d:
            return d
        if self.labels is None:
            raise ValueError(
                f"item {_image_of(d)} lists {self.labelled_key!r} classes, but the pipeline got no labels "
                "to read them with"
            )
        classes = labelled_classes(d, self.labels, self.labelled_key)
        d.pop(self.labelled_key)
        if classes is None:
            return d
        if list(classes) not in self.label_sets:
            raise ValueError(
                f"item {_image_of(d)}: its labelled classes {list(classes)} are not in label_sets "
                f"{self.label_sets}; derive label_sets with partial_label_sets from the same training items"
            )
        code = UNLABELLED_BASE + self.label_sets.index(list(classes))
        for key in self.key_iterator(d):
            label = d[key]
            plain = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
            kept = torch.isin(plain, torch.tensor(classes, dtype=plain.dtype, device=plain.device))
            encoded = label.clone()
            encoded[~kept] = code
            d[key] = encoded
        return d
