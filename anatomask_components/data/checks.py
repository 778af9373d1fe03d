"""Whole-datalist checks: read the datalist, then load every scan once and report the unusable ones
(``anatomask check-data``).

This module drives the loading pipeline, so it sits above :mod:`~anatomask_components.data.datalists` and
:mod:`~anatomask_components.data.preprocessing`; the per-scan checks themselves live at the bottom of the
data layer, in :mod:`~anatomask_components.data.validation`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from monai.transforms import Compose

from anatomask_components.data.datalists import SECTIONS, drop_duplicate_items, image_label, read_json
from anatomask_components.data.preprocessing import loading_transforms
from anatomask_components.data.readers import is_resource_error
from anatomask_components.data.validation import InvalidScanError, find_invalid_scan_error


class MissingItemKeyError(KeyError):
    """A datalist item without a required key (e.g. ``image``)."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; this one is a sentence.
        return str(self.args[0]) if self.args else ""


def load_datalist(
    datalist: str | os.PathLike | Mapping[str, Any],
    sections: Iterable[str] = SECTIONS,
    image_key: str = "image",
) -> tuple[dict[str, Any], str]:
    """A datalist and the name to give it in messages, each scan listed once per section.

    Args:
        datalist: a MONAI datalist dict or the path of its JSON file.
        sections: the sections whose repeated items are dropped (one warning per section naming them).
        image_key: the item key that identifies a scan.

    Returns:
        the datalist dict and its name (the path, or ``"datalist"`` for a dict).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON (``"<path>: invalid JSON at line L column C: ..."``), or not a JSON object.
    """
    if isinstance(datalist, Mapping):
        content, name = dict(datalist), "datalist"
    else:
        content, name = read_json(datalist), str(datalist)
    if not isinstance(content, dict):
        raise ValueError(
            f"{name}: a datalist is a JSON object of sections ('training', ...), "
            f"not a {type(content).__name__}"
        )
    for section in sections:
        if isinstance(content.get(section), list):
            content[section] = drop_duplicate_items(content[section], f"{name} ({section})", image_key)
    return content, name


def datalist_items(
    datalist: Mapping[str, Any], sections: Iterable[str], image_key: str = "image", name: str = "datalist"
) -> list[tuple[str, int, dict[str, Any]]]:
    """Every item of ``sections``, checked for the image key before any scan is read.

    Args:
        datalist: the datalist dict.
        sections: sections to list (missing sections are empty).
        image_key: the key every item must have; a bare path is taken as ``{image_key: path}``.
        name: the datalist's name in messages.

    Returns:
        ``(section, position in the section counted from 1, item)`` tuples.

    Raises:
        MissingItemKeyError: ``"<name>: section training item 3 has no 'image' key"``.
        ValueError: a section is not a list.
    """
    listed = []
    for section in sections:
        items = datalist.get(section) or []
        if not isinstance(items, list):
            raise ValueError(f"{name}: section {section} is a {type(items).__name__}, not a list of items")
        for position, item in enumerate(items, start=1):
            item = dict(item) if isinstance(item, Mapping) else {image_key: item}
            if image_key not in item:
                raise MissingItemKeyError(
                    f"{name}: section {section} item {position} has no {image_key!r} key "
                    f"(it has {sorted(map(str, item)) or 'no keys'})"
                )
            listed.append((section, position, item))
    return listed


def skippable_scan_error(error: Exception, on_error: str) -> InvalidScanError:
    """The :class:`InvalidScanError` behind a failed load when ``on_error="warn"`` lets the scan be skipped.

    MONAI wraps the reader's error; anything that is not an invalid scan is a bug and is re-raised, and so is
    running out of memory or file handles, which says nothing about the scan (stop rather than drop it).

    Args:
        error: what loading the scan raised.
        on_error: ``"raise"`` or ``"warn"``.

    Returns:
        the invalid-scan error, for ``"warn"``.

    Raises:
        the error itself, or its :class:`InvalidScanError` for ``"raise"``.
    """
    invalid = find_invalid_scan_error(error)
    if invalid is None or is_resource_error(error):
        raise error
    if on_error == "raise":
        raise invalid from error
    return invalid


def check_datalist(
    datalist: str | os.PathLike | Mapping[str, Any],
    sections: Iterable[str] = ("training", "validation", "test"),
    image_key: str = "image",
    label_key: str = "label",
    num_classes: int | None = None,
    image_channel_dim: int | None = None,
    on_error: str = "raise",
    progress: bool = True,
    name: str | None = None,
) -> tuple[dict[str, Any], list[InvalidScanError]]:
    """Load every scan of a datalist once and check it (readability, dimensions, finite voxels, label grid,
    label values).

    Args:
        datalist: a MONAI datalist dict or the path of its JSON file.
        sections: datalist sections to check; other sections are copied unchanged.
        image_key, label_key: item keys.
        num_classes: if given, label values must lie in ``0 .. num_classes - 1``.
        image_channel_dim: passed to the reader (``-1`` accepts 4D files whose last axis holds channels).
        on_error: ``"raise"`` (stop at the first bad item) or ``"warn"`` (warn, drop the item, go on).
        progress: print one line per item.
        name: the datalist's name in messages (default: its path, or ``"datalist"`` for a dict).

    Returns:
        the datalist without the bad items, and the errors found.

    Raises:
        InvalidScanError: the first bad item, when ``on_error="raise"``.
        MissingItemKeyError: an item has no ``image_key`` (whatever ``on_error``: the datalist itself is
            malformed), before any scan is read.
    """
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    sections = list(sections)
    datalist, default_name = load_datalist(datalist, sections, image_key)
    listed = datalist_items(datalist, sections, image_key, name or default_name)
    load = Compose(
        loading_transforms(
            image_key, label_key, num_classes, image_channel_dim=image_channel_dim, label_optional=True
        )
    )
    cleaned = dict(datalist)
    cleaned.update({section: [] for section in sections})
    errors: list[InvalidScanError] = []
    for section, position, item in listed:
        try:
            load(dict(item))
        except Exception as error:
            invalid = skippable_scan_error(error, on_error)
            warnings.warn(f"skipping invalid item: {invalid}", stacklevel=2)
            errors.append(invalid)
            status = f"INVALID {invalid.problem or invalid}"
        else:
            cleaned[section].append(item)
            status = "ok"
        if progress:
            total = len(datalist.get(section) or [])
            label = image_label(item, image_key)
            print(f"[check] {section} {position}/{total} {label}: {status}", flush=True)
    return cleaned, errors
