"""MONAI datalists (``training`` / ``validation`` / ``test``) from the dataset layouts people bring.

Layouts: a plain folder of scans (pretraining), an nnU-Net v2 raw dataset, an MSD ``dataset.json`` and the
AutoPET study-folder layout. Items are ``{"image": path or [channel paths], "label": path, "modality": ...}``;
``modality`` is ``"CT"``, ``"MR"`` or ``"PET"`` (a list for multi-channel images). Splits are reproducible
from a seed; optional k-fold cross-validation.

Case lists: :func:`datalist_section` and :func:`inference_items` turn a datalist, a dataset folder, a
folder of scans or one scan into items with a unique ``case`` name (:func:`case_ids`, used for output files
and metric rows).
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomask_components.data.partial_labels import LABELLED_KEY, check_labelled_items
from anatomask_components.data.readers import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    dicom_files,
    image_suffix,
    is_dicom_series_dir,
)
from anatomask_components.data.validation import InvalidScanError

SECTIONS = ("training", "validation", "test")
LAYOUTS = ("auto", "folder", "nnunet", "msd", "autopet")
# Companion data files of detached headers (.mhd/.nhdr): part of a scan, not scans themselves.
_COMPANION_SUFFIXES = (".raw", ".zraw", ".raw.gz", ".img", ".img.gz")


def modality_of_channel(name: str) -> str:
    """Map an nnU-Net/MSD channel name to ``"CT"``, ``"PET"`` or ``"MR"``.

    ``CT`` and ``PET``/``SUV`` are recognised; every other name (``T1``, ``FLAIR``, ``ADC``, ...) counts as
    MR, which selects per-image z-score, what nnU-Net does for all non-CT channels.
    """
    upper = name.upper()
    if "PET" in upper or "SUV" in upper:
        return "PET"
    if upper == "CT" or upper.startswith("CT") or upper.endswith("CT"):
        return "CT"
    return "MR"


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` into parts proportional to ``fractions`` (largest remainder), giving every part with a
    positive fraction at least one element when ``n`` allows it.

    Args:
        n: number of elements (or groups).
        fractions: non-negative weights, normalised to sum 1.

    Returns:
        one count per fraction, summing to ``n``.
    """
    weights = np.asarray(fractions, dtype=np.float64)
    if weights.ndim != 1 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {list(fractions)}")
    exact = weights / weights.sum() * n
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[index] += 1
    positive = weights > 0
    if n >= positive.sum():
        for index in np.flatnonzero(positive & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[index] += 1
    return counts.tolist()


def split_items(
    items: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Shuffle items with a seed and split them into training / validation / test.

    Args:
        items: datalist items.
        fractions: training, validation, test fractions (default 70/10/20).
        seed: shuffling seed; the same items and seed always give the same split, whatever their order.
        folds: if given, k-fold cross-validation: the test part is set aside as usual, the rest is cut
            into ``folds`` folds; ``validation`` is fold ``fold``, ``training`` the others, and every
            item carries its ``"fold"`` so one file describes all folds. The validation fraction is then
            unused.
        fold: the validation fold, ``0 .. folds - 1``.
        groups: one group id per item (e.g. the patient); items of a group always land in the same part,
            so studies of one patient never straddle training and test.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``.
    """
    if len(fractions) != 3:
        raise ValueError(f"fractions must have 3 values (training, validation, test), got {list(fractions)}")
    group_ids = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(items))]
    if len(group_ids) != len(items):
        raise ValueError(f"got {len(group_ids)} groups for {len(items)} items")
    # Sort by content first so that the split does not depend on the order the files were found in.
    sort_keys = [json.dumps(item, sort_keys=True) for item in items]
    order = sorted(range(len(items)), key=sort_keys.__getitem__)
    group_key: dict[str, str] = {}
    for i in order:
        group_key.setdefault(group_ids[i], sort_keys[i])
    unique_groups = sorted(group_key, key=group_key.__getitem__)
    shuffled = [unique_groups[i] for i in np.random.default_rng(seed).permutation(len(unique_groups))]

    if folds is None:
        counts = split_counts(len(shuffled), fractions)
        bounds = np.cumsum([0, *counts])
        part_of = {g: SECTIONS[p] for p in range(3) for g in shuffled[bounds[p] : bounds[p + 1]]}
        fold_of: dict[str, int] = {}
    else:
        if folds < 2 or not 0 <= fold < folds:
            raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
        n_test = split_counts(len(shuffled), (fractions[0] + fractions[1], 0.0, fractions[2]))[2]
        pool, test = shuffled[: len(shuffled) - n_test], shuffled[len(shuffled) - n_test :]
        fold_of = {g: i % folds for i, g in enumerate(pool)}
        part_of = {g: "validation" if fold_of[g] == fold else "training" for g in pool}
        part_of.update({g: "test" for g in test})

    datalist: dict[str, list[dict[str, Any]]] = {section: [] for section in SECTIONS}
    for i in order:
        item = dict(items[i])
        if group_ids[i] in fold_of:
            item["fold"] = fold_of[group_ids[i]]
        datalist[part_of[group_ids[i]]].append(item)
    return datalist


def find_scans(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Find scans under a folder, recursively: image files and DICOM series folders (one scan each).

    A folder is one DICOM series only when it holds no other image files (NIfTI, NRRD, MetaImage). When it
    does, its image files and each of its DICOM files are listed as scans of their own, with one warning
    naming the folder: a stray ``.dcm`` must not hide the NIfTI files next to it.

    Symbolic links whose target does not exist are skipped with one warning that names them.

    Args:
        root: the folder.

    Returns:
        sorted scan paths, and sorted paths of the non-image files that were skipped (hidden files, dangling
        links and the data files of ``.mhd``/``.nhdr`` headers are neither).

    Raises:
        InvalidScanError: the folder does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidScanError(root, "folder does not exist")
    scans, skipped, dangling = [], [], []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        if is_dicom_series_dir(folder):
            scans.append(str(Path(folder)))
            continue
        names = sorted(name for name in files if not name.startswith("."))
        images = {name for name in names if image_suffix(name) not in (None, *DICOM_SUFFIXES)}
        # Without other images the folder would have been a series; only a mixed folder has DICOM files here.
        dicom = {path.name for path in dicom_files(folder)} if images else set()
        if dicom:
            warnings.warn(
                f"{folder}: holds {len(dicom)} DICOM file(s) next to {len(images)} other image file(s), so "
                "it is not read as one DICOM series; each DICOM file is listed as a scan of its own",
                stacklevel=2,
            )
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() and not path.exists():
                dangling.append(str(path))
            elif name in images or name in dicom:
                scans.append(str(path))
            elif not name.lower().endswith(_COMPANION_SUFFIXES):
                skipped.append(str(path))
    if dangling:
        shown = ", ".join(f"{link} -> {os.readlink(link)}" for link in dangling[:10])
        more = f" and {len(dangling) - 10} more" if len(dangling) > 10 else ""
        warnings.warn(
            f"{root}: skipped {len(dangling)} dangling symbolic link(s), whose target does not exist: "
            f"{shown}{more}",
            stacklevel=2,
        )
    return sorted(scans), sorted(skipped)


def folder_datalist(
    root: str | os.PathLike,
    modality: str | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, Any]:
    """Datalist of every scan under a folder (recursive), images only, for pretraining.

    Non-image files are skipped with one warning that names them.

    Args:
        root: the folder.
        modality: if given (``"CT"``, ``"MR"``, ``"PET"``), stored in every item.
        fractions, seed, folds, fold: see :func:`split_items`.

    Returns:
        the datalist.

    Raises:
        InvalidScanError: the folder is missing or holds no scans.
    """
    scans, skipped = find_scans(root)
    if skipped:
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        warnings.warn(f"{root}: skipped {len(skipped)} non-image file(s): {shown}", stacklevel=2)
    if not scans:
        raise InvalidScanError(
            root, f"no scans found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders)"
        )
    items = [{"image": scan, **({"modality": modality.upper()} if modality else {})} for scan in scans]
    return split_items(items, fractions, seed, folds, fold)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file (a datalist, a ``dataset.json``), with errors of one line that name the file.

    Args:
        path: the file.

    Returns:
        the parsed content.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: ``"<path>: invalid JSON at line L column C: <what>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        # from None: the decoder's own traceback adds nothing to the position
        raise ValueError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {error.start}: {error.reason})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise InvalidScanError(path, "file does not exist") from None


def drop_duplicate_items(
    items: Sequence[Mapping[str, Any]], name: str = "datalist", image_key: str = "image"
) -> list[dict[str, Any]]:
    """Keep the first of the items that list the same image (same files, after resolving paths), with one
    warning naming the repeated files and how often they appear.

    Args:
        items: datalist items (a bare path counts as ``{image_key: path}``).
        name: the datalist (and section) in the warning.
        image_key: the image key.

    Returns:
        the items without repeats, in their order.
    """

    def identity(item: Mapping[str, Any] | str) -> str:
        value = item.get(image_key) if isinstance(item, Mapping) else item
        files = value if isinstance(value, (list, tuple)) else [value]
        return json.dumps([os.path.realpath(str(f)) if f is not None else None for f in files])

    kept: dict[str, dict[str, Any]] = {}
    repeats: dict[str, int] = {}
    for item in items:
        key = identity(item)
        if key in kept:
            repeats[key] = repeats.get(key, 1) + 1
        else:
            kept[key] = dict(item) if isinstance(item, Mapping) else {image_key: item}
    if repeats:
        shown = ", ".join(f"{', '.join(json.loads(key))} ({times} times)" for key, times in repeats.items())
        dropped = sum(repeats.values()) - len(repeats)
        warnings.warn(
            f"{name}: {dropped} duplicate item(s) dropped, each scan is used once: {shown}", stacklevel=2
        )
    return list(kept.values())


def load_datalist_section(datalist: str | os.PathLike, section: str) -> list[dict[str, Any]]:
    """The items of one section of a MONAI datalist file, as ``monai.data.load_decathlon_datalist`` reads
    them (relative paths resolved from the file's folder), checked first and without repeats.

    Args:
        datalist: the JSON file.
        section: ``"training"``, ``"validation"``, ``"test"``, ...; a section the file lacks is empty.

    Returns:
        the items.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON (one line with the file and the position), or not a JSON object.
    """
    from monai.data import load_decathlon_datalist

    content = read_json(datalist)
    if not isinstance(content, dict):
        raise ValueError(
            f"{datalist}: a datalist is a JSON object of sections ('training', ...), "
            f"not a {type(content).__name__}"
        )
    if not content.get(section):
        return []
    items = load_decathlon_datalist(datalist, data_list_key=section)
    # MONAI makes a path of any string naming a file beside the datalist: class names stay names
    for item, raw in zip(items, content[section]):
        if LABELLED_KEY in raw:
            item[LABELLED_KEY] = raw[LABELLED_KEY]
    return drop_duplicate_items(items, f"{datalist} ({section})")


def nnunet_datalist(
    root: str | os.PathLike,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, Any]:
    """Datalist of an nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr/{case}_{XXXX}``, ``labelsTr/``).

    Only the labelled training cases are listed (``imagesTs`` has no labels); they are split as usual.
    Multi-channel cases list their channel files in ``channel_names`` order.

    Args:
        root: the dataset folder (``DatasetXXX_Name``).
        fractions, seed, folds, fold: see :func:`split_items`.

    Returns:
        the datalist, with ``labels`` (id to name) and ``channel_modalities`` at the top level.

    Raises:
        InvalidScanError: ``dataset.json`` missing or invalid, or a channel file missing.
    """
    root = Path(root)
    description = _read_json(root / "dataset.json")
    if "channel_names" not in description:
        raise InvalidScanError(root / "dataset.json", "no 'channel_names': not an nnU-Net v2 dataset.json")
    ending = description.get("file_ending", ".nii.gz")
    channels = sorted(description["channel_names"].items(), key=lambda kv: int(kv[0]))
    modalities = [modality_of_channel(name) for _, name in channels]
    label_files = sorted((root / "labelsTr").glob(f"*{ending}"))
    if not label_files:
        raise InvalidScanError(root / "labelsTr", f"no label files ending in {ending}")
    items = []
    for label_file in label_files:
        case = label_file.name[: -len(ending)]
        images = [root / "imagesTr" / f"{case}_{int(c):04d}{ending}" for c, _ in channels]
        missing = [str(p) for p in images if not p.exists()]
        if missing:
            raise InvalidScanError(missing[0], f"channel file of case {case!r} does not exist")
        items.append(
            {
                "image": str(images[0]) if len(images) == 1 else [str(p) for p in images],
                "label": str(label_file),
                "modality": modalities[0] if len(modalities) == 1 else modalities,
            }
        )
    datalist: dict[str, Any] = split_items(items, fractions, seed, folds, fold)
    datalist["labels"] = {str(v): k for k, v in description.get("labels", {}).items() if isinstance(v, int)}
    datalist["channel_modalities"] = modalities
    return datalist


def msd_datalist(
    dataset_json: str | os.PathLike,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, Any]:
    """Datalist of a Medical Segmentation Decathlon ``dataset.json`` (its ``training`` list).

    MSD multi-modal tasks store channels in the 4th axis of one file: the datalist then records
    ``image_channel_dim: -1``, to pass to the preprocessing (``image_channel_dim=-1``).

    Args:
        dataset_json: the ``dataset.json`` file or its folder.
        fractions, seed, folds, fold: see :func:`split_items`.

    Returns:
        the datalist, with ``labels`` and ``channel_modalities`` at the top level.

    Raises:
        InvalidScanError: ``dataset.json`` missing or invalid, or a listed file missing.
    """
    path = Path(dataset_json)
    path = path / "dataset.json" if path.is_dir() else path
    description = _read_json(path)
    if not isinstance(description.get("training"), list):
        raise InvalidScanError(path, "no 'training' list: not an MSD dataset.json")
    channels = sorted(description.get("modality", {"0": "CT"}).items(), key=lambda kv: int(kv[0]))
    modalities = [modality_of_channel(name) for _, name in channels]
    items = []
    for entry in description["training"]:
        item = {key: str((path.parent / entry[key]).resolve()) for key in ("image", "label") if key in entry}
        for key, file in item.items():
            if not Path(file).exists():
                raise InvalidScanError(file, f"{key} listed in {path} does not exist")
        item["modality"] = modalities[0] if len(modalities) == 1 else modalities
        items.append(item)
    datalist: dict[str, Any] = split_items(items, fractions, seed, folds, fold)
    datalist["labels"] = {str(k): v for k, v in description.get("labels", {}).items()}
    datalist["channel_modalities"] = modalities
    if len(modalities) > 1:
        datalist["image_channel_dim"] = -1
    return datalist


def autopet_datalist(
    root: str | os.PathLike,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, Any]:
    """Datalist of the AutoPET layout: ``<patient>/<study>/{CTres,SUV,SEG}.nii.gz``.

    Each study is one item with two channels, ``[CTres, SUV]`` (modality ``["CT", "PET"]``), and the
    lesion mask ``SEG``. Studies of one patient (the first folder under ``root``) stay in one split.

    Args:
        root: the folder holding the patient folders.
        fractions, seed, folds, fold: see :func:`split_items`.

    Returns:
        the datalist, with ``labels`` and ``channel_modalities`` at the top level.

    Raises:
        InvalidScanError: no study found, or a study without ``SUV.nii.gz`` or ``SEG.nii.gz``.
    """
    root = Path(root)
    studies = sorted(p.parent for p in root.rglob("CTres.nii.gz"))
    if not studies:
        raise InvalidScanError(root, "no AutoPET study folders (with CTres.nii.gz) found")
    items, groups = [], []
    for study in studies:
        for name in ("SUV.nii.gz", "SEG.nii.gz"):
            if not (study / name).exists():
                raise InvalidScanError(study / name, "AutoPET study file does not exist")
        items.append(
            {
                "image": [str(study / "CTres.nii.gz"), str(study / "SUV.nii.gz")],
                "label": str(study / "SEG.nii.gz"),
                "modality": ["CT", "PET"],
            }
        )
        groups.append(study.relative_to(root).parts[0])
    datalist: dict[str, Any] = split_items(items, fractions, seed, folds, fold, groups=groups)
    datalist["labels"] = {"0": "background", "1": "lesion"}
    datalist["channel_modalities"] = ["CT", "PET"]
    return datalist


def detect_layout(root: str | os.PathLike) -> str:
    """Guess the layout of a dataset folder: ``nnunet``, ``msd``, ``autopet`` or ``folder``."""
    root = Path(root)
    dataset_json = root / "dataset.json" if root.is_dir() else root
    if dataset_json.name == "dataset.json" and dataset_json.is_file():
        description = _read_json(dataset_json)
        if "channel_names" in description:
            return "nnunet"
        if isinstance(description.get("training"), list):
            return "msd"
    if root.is_dir() and next(root.rglob("CTres.nii.gz"), None) is not None:
        return "autopet"
    return "folder"


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike, relative: bool = False) -> Path:
    """Write a datalist as JSON (4-space indent).

    Args:
        datalist: the datalist.
        path: output file (folders created).
        relative: store paths relative to the file's folder (load with
            ``monai.data.load_decathlon_datalist(path, base_dir=<that folder>)``); default absolute.

    Returns:
        the written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()

    def convert(value: Any, key: str) -> Any:
        if key not in ("image", "label"):
            return value
        if isinstance(value, list):
            return [convert(v, key) for v in value]
        absolute = Path(value).resolve()
        return os.path.relpath(absolute, base) if relative else str(absolute)

    out = {
        key: [{k: convert(v, k) for k, v in item.items()} for item in value] if key in SECTIONS else value
        for key, value in datalist.items()
    }
    path.write_text(json.dumps(out, indent=4) + "\n")
    return path


def build_datalist(
    root: str,
    output: str | None = None,
    layout: str = "auto",
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
    modality: str | None = None,
    relative: bool = False,
) -> dict[str, Any]:
    """Build a datalist from a dataset folder and optionally write it (the ``anatomask datalist`` command).

    Args:
        root: the dataset folder (for ``msd`` also the ``dataset.json`` file).
        output: JSON file to write; if None, the datalist is only returned.
        layout: ``auto`` (detected), ``folder``, ``nnunet``, ``msd`` or ``autopet``.
        fractions: training, validation, test fractions.
        seed: split seed.
        folds, fold: k-fold cross-validation (see :func:`split_items`).
        modality: for ``folder``: the modality stored in every item (``CT``, ``MR``, ``PET``).
        relative: write paths relative to the output file.

    Returns:
        the datalist.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    chosen = detect_layout(root) if layout == "auto" else layout
    split = {
        "fractions": tuple(float(f) for f in fractions),
        "seed": int(seed),
        "folds": folds,
        "fold": int(fold),
    }
    if chosen == "folder":
        datalist = folder_datalist(root, modality=modality, **split)
    else:
        builder = {"nnunet": nnunet_datalist, "msd": msd_datalist, "autopet": autopet_datalist}[chosen]
        datalist = builder(root, **split)
    counts = ", ".join(f"{len(datalist[s])} {s}" for s in SECTIONS)
    if output is not None:
        write_datalist(datalist, output, relative=relative)
        print(f"[datalist] {chosen} layout: {counts} -> {output}", flush=True)
    else:
        print(f"[datalist] {chosen} layout: {counts}", flush=True)
    return datalist


def image_label(item: Mapping[str, Any], key: str = "image") -> str:
    """A short name for an item's image (its first channel file), for progress lines and messages."""
    value = item[key]
    first = value[0] if isinstance(value, (list, tuple)) else value
    return Path(str(first)).name


def case_ids(
    items: Sequence[Mapping[str, Any]], image_key: str = "image", root: str | os.PathLike | None = None
) -> list[str]:
    """Unique, readable case names for datalist items.

    A case is named after its image file (or, for a list of channel files, their common folder),
    relative to ``root`` (default: the folder that holds all cases), without the image suffix and with
    ``/`` replaced by ``_``: ``images/case_001.nii.gz`` -> ``case_001``,
    ``PETCT_0a1/03-2001/{CTres,SUV}.nii.gz`` -> ``PETCT_0a1_03-2001``. Repeated names get ``_2``, ...

    Args:
        items: datalist items.
        image_key: the item key of the image path (or list of channel paths).
        root: the folder names are relative to; it must hold every case.

    Returns:
        one name per item.
    """
    anchors = []
    for item in items:
        value = item[image_key]
        paths = (
            [os.path.abspath(v) for v in value]
            if isinstance(value, (list, tuple))
            else [os.path.abspath(value)]
        )
        anchors.append(Path(paths[0] if len(paths) == 1 else os.path.commonpath(paths)))
    if not anchors:
        return []
    root = (
        Path(os.path.abspath(root))
        if root is not None
        else Path(os.path.commonpath([a.parent for a in anchors]))
    )
    names: list[str] = []
    for anchor in anchors:
        relative = anchor.relative_to(root)
        name = str(relative) if relative.parts else anchor.name
        suffix = image_suffix(name)
        name = (name[: -len(suffix)] if suffix else name).replace(os.sep, "_")
        unique, repeat = name, 1
        while unique in names:
            repeat += 1
            unique = f"{name}_{repeat}"
        names.append(unique)
    return names


def with_case_ids(
    items: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    case_key: str = "case",
    root: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Copies of ``items`` with a ``case`` name (:func:`case_ids`) where they have none."""
    names = case_ids(items, image_key, root)
    return [{case_key: name, **item} for item, name in zip(items, names)]


def datalist_section(
    source: str | os.PathLike,
    section: str,
    require_labels: bool = False,
    label_key: str = "label",
    labels: Mapping[Any, str] | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The items of one section of a datalist, named (see :func:`case_ids`).

    Args:
        source: a MONAI datalist JSON (relative paths are resolved from its folder), or a dataset folder in
            any layout :func:`anatomask_components.data.datalists.build_datalist` recognises (nnU-Net,
            MSD, AutoPET; split 70/10/20 with seed 0).
        section: ``"training"``, ``"validation"`` or ``"test"``; a section the datalist lacks is empty.
        require_labels: raise if an item has no ``label_key``.
        label_key: the label item key.
        labels: the model's classes (``{"0": "background", "1": "liver", ...}``): if given, the
            ``labelled`` fields of partially labelled items are checked against them, and such items are
            refused outside ``training`` (see :mod:`~anatomask_components.data.partial_labels`).

    Returns:
        the items, each with a ``case`` name.

    Raises:
        ValueError: an item without a label when ``require_labels``; a ``labelled`` field naming no class
            of ``labels``, or a partially labelled item outside ``training``.
    """
    source = Path(source)
    if source.is_file():
        # one-line errors for broken JSON, repeated items dropped with a warning
        items = load_datalist_section(source, section)
    else:
        items = build_datalist(str(source)).get(section, [])
    if require_labels:
        unlabelled = [item for item in items if label_key not in item]
        if unlabelled:
            raise ValueError(
                f"{source}: {len(unlabelled)} {section} item(s) without '{label_key}', e.g. {unlabelled[0]}"
            )
    if labels is not None:
        check_labelled_items(items, labels, section, str(source))
    return with_case_ids(items)


def inference_items(
    source: str | os.PathLike,
    channel_files: Sequence[str] | None = None,
    section: str = "test",
    modality: str | None = None,
) -> list[dict[str, Any]]:
    """The scans to segment, named (see :func:`case_ids`).

    Args:
        source: one scan (a file or a DICOM series folder), a folder searched recursively for scans
            (NIfTI, NRRD, MHA/MHD, DICOM series), or a datalist JSON (its ``section``).
        channel_files: for multi-channel models: the file names of the channels inside each case folder
            (AutoPET: ``("CTres.nii.gz", "SUV.nii.gz")``); every folder under ``source`` that holds all
            of them is a case.
        section: the datalist section to read when ``source`` is a JSON file.
        modality: stored as ``modality`` in items that have none (e.g. ``"MR"`` for a folder of MR scans).

    Returns:
        items ``{"case": name, "image": path or [channel paths], ...}``.

    Raises:
        InvalidScanError: the source does not exist or holds no scans.
    """
    source = Path(source)
    if not source.exists():
        raise InvalidScanError(source, "does not exist")
    if source.is_file() and source.suffix.lower() == ".json":
        items = datalist_section(source, section)
    elif channel_files:
        folders = sorted({p.parent for p in source.rglob(channel_files[0])})
        items = [
            {"image": [str(folder / name) for name in channel_files]}
            for folder in folders
            if all((folder / name).is_file() for name in channel_files)
        ]
    elif source.is_file() or is_dicom_series_dir(source):
        items = [{"image": str(source)}]
    else:
        items = [{"image": scan} for scan in find_scans(source)[0]]
    if not items:
        wanted = f"case folders with {', '.join(channel_files)}" if channel_files else "scans"
        raise InvalidScanError(source, f"no {wanted} found")
    if modality is not None:
        items = [{"modality": modality, **item} for item in items]
    folder = source if source.is_dir() and not is_dicom_series_dir(source) else None
    return with_case_ids(items, root=folder)
