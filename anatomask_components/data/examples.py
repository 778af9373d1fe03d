"""Real example CT/MR from the TotalSegmentator 2.18.0 source archive (``anatomask fetch-examples``).

The archive (Apache-2.0) ships test scans with TotalSegmentator's own predicted labels. It is downloaded
once as a plain file from the package index pip uses (found through the index's simple API), checked
against a pinned sha256 and kept in a cache folder; later calls work offline. Nothing from the download is
run (pip would build the source archive, running its build backend, before any check): the archive is only
hashed, then read with ``tarfile``, and only the example files are written, inside the destination.
Cases (see docs/data.md):

- A: abdomen/pelvis CT, NIfTI, 3 mm, 61 TotalSegmentator classes;
- B: chest and upper-abdomen CT angiography, NIfTI, 1.5 mm; of its labels (binary masks in a cropped grid)
  only the aorta is used, as a partially labelled training case (``datalists/flare22_partial.json``);
- C: contrast abdomen CT, a 20-slice DICOM series, 0.98 x 0.98 x 2 mm, 31 classes;
- MR: abdominal MR, NIfTI, 3 mm, labels of TotalSegmentator's ``total_mr`` task (its own class ids).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
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
from anatomask_components.files import atomic_path

PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
ARCHIVE_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_REFERENCE = f"{PACKAGE}-{VERSION}/tests/reference_files"
# PEP 691 JSON first, PEP 503 HTML as the fallback.
_INDEX_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
_INDEX_TIMEOUT_S = 60.0

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
# Binary masks of one structure, in a grid cropped from their scan's: case -> (member, file, FLARE22 class).
PARTIAL_LABELS = {
    "B": ("aorta_report/test_result/models/aorta.nii.gz", "labels/B_aorta_mask.nii.gz", "aorta")
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


def index_url() -> str:
    """The package index pip would use: ``$PIP_INDEX_URL``, pip's configured ``global.index-url``, or pip's
    default index."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True,
        text=True,
        check=False,
    )
    if configured.returncode == 0 and configured.stdout.strip():  # exits non-zero when unset
        return configured.stdout.strip()
    try:
        from pip._internal.models.index import PyPI
    except ImportError as error:
        raise RuntimeError("pip is not installed and PIP_INDEX_URL is not set: no package index") from error
    return PyPI.simple_url


class _Anchors(HTMLParser):
    """The links of a PEP 503 project page: (href, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href, self._text = dict(attrs).get("href") or "", []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def index_reachable(timeout: float = 5.0) -> bool:
    """Whether the package index (:func:`index_url`) answers a TCP connection (a local ``file://`` index
    always counts); lets callers tell "offline" from other download failures."""
    import socket

    parsed = urllib.parse.urlparse(index_url())
    if parsed.scheme == "file":
        return True
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def find_archive_url(page: bytes, content_type: str, page_url: str) -> tuple[str, str | None]:
    """The download URL of :data:`ARCHIVE_NAME` in a project page of a simple index, and its sha256 there.

    Args:
        page: the project page (PEP 691 JSON or PEP 503 HTML).
        content_type: its Content-Type (JSON when it names ``application/vnd.pypi.simple.v1+json``).
        page_url: its URL, against which relative links are resolved.

    Returns:
        the absolute URL and the sha256 the index lists for the file (None if it lists none).

    Raises:
        RuntimeError: the page does not list the archive.
    """
    if "application/vnd.pypi.simple.v1+json" in content_type:
        for entry in json.loads(page).get("files", []):
            if entry.get("filename") == ARCHIVE_NAME:
                url = urllib.parse.urljoin(page_url, entry["url"])
                return urllib.parse.urldefrag(url)[0], (entry.get("hashes") or {}).get("sha256")
    else:
        parser = _Anchors()
        parser.feed(page.decode("utf-8", errors="replace"))
        for href, text in parser.links:
            url, fragment = urllib.parse.urldefrag(urllib.parse.urljoin(page_url, href))
            if ARCHIVE_NAME in (text, PurePosixPath(urllib.parse.urlparse(url).path).name):
                digest = fragment.partition("=")[2] if fragment.startswith("sha256=") else None
                return url, digest
    raise RuntimeError(f"the package index page {page_url} does not list {ARCHIVE_NAME}")


def _split_credentials(url: str) -> tuple[str, str | None]:
    """``https://user:token@host/...`` -> (``https://host/...``, Basic auth header); urllib does not
    send credentials written in the URL, as pip does for a private index."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.username is None:
        return url, None
    user = urllib.parse.unquote(parsed.username)
    password = urllib.parse.unquote(parsed.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.rpartition("@")[2])), f"Basic {token}"


def _open(url: str, accept: str | None = None, authorization: str | None = None) -> Any:
    headers = {"Accept": accept} if accept else {}
    if authorization:
        headers["Authorization"] = authorization
    # pip's own certificate bundle when it is configured through the environment (PIP_CERT).
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    return urllib.request.urlopen(
        urllib.request.Request(url, headers=headers), timeout=_INDEX_TIMEOUT_S, context=context
    )


def download_archive(target: Path) -> str | None:
    """Download :data:`ARCHIVE_NAME` from the package index into ``target`` (a plain file copy).

    Returns:
        the sha256 the index lists for the file, or None.

    Raises:
        OSError: the index cannot be reached (``urllib.error.URLError`` is an OSError).
        RuntimeError: the index does not list the archive.
    """
    page_url, authorization = _split_credentials(index_url().rstrip("/") + f"/{PACKAGE}/")
    parsed = urllib.parse.urlparse(page_url)
    if parsed.scheme == "file" and os.path.isdir(urllib.request.url2pathname(parsed.path)):
        page_url += "index.html"  # a local PEP 503 tree, as pip reads it
    with _open(page_url, _INDEX_ACCEPT, authorization) as response:
        url, index_sha256 = find_archive_url(
            response.read(), response.headers.get("Content-Type", ""), page_url
        )
    if index_sha256 is not None and index_sha256 != ARCHIVE_SHA256:
        raise RuntimeError(
            f"the package index lists sha256 {index_sha256} for {ARCHIVE_NAME}, "
            f"not the pinned {ARCHIVE_SHA256}"
        )
    print(f"[fetch-examples] from {url}", flush=True)
    # The index's credentials go to the index's own host only, never to a files host it links to.
    same_host = urllib.parse.urlparse(url).netloc == parsed.netloc
    with (
        _open(url, authorization=authorization if same_host else None) as response,
        open(target, "wb") as out,
    ):
        shutil.copyfileobj(response, out, 1 << 20)
    return index_sha256


def verify_archive(path: Path, index_sha256: str | None = None) -> None:
    """Check a downloaded archive against the pinned sha256 (and the index's, when it gave one).

    Raises:
        RuntimeError: a checksum does not match.
    """
    actual = sha256_of(path)
    for expected, source in ((ARCHIVE_SHA256, "the pinned"), (index_sha256, "the package index's")):
        if expected is not None and actual != expected:
            raise RuntimeError(f"{ARCHIVE_NAME}: sha256 {actual} does not match {source} {expected}")


def fetch_archive(cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified TotalSegmentator source archive, downloaded from the package index on first use.

    The download goes to a temporary file in the cache folder, is checked against :data:`ARCHIVE_SHA256`
    and only then renamed into place; a file that fails the check is deleted.

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
    print(f"[fetch-examples] downloading {ARCHIVE_NAME} (38 MB) from the package index ...", flush=True)
    with atomic_path(archive, suffix=".part") as partial:
        try:
            index_sha256 = download_archive(partial)
        except OSError as error:  # urllib's URLError and socket timeouts included
            raise RuntimeError(
                f"could not download {ARCHIVE_NAME} from the package index ({error}); the index must be "
                f"reachable for the first fetch; later fetches reuse {archive} offline"
            ) from error
        verify_archive(partial, index_sha256)
    print(f"[fetch-examples] verified sha256 and cached {archive}", flush=True)
    return archive


def _safe_member_path(name: str) -> PurePosixPath:
    """An archive member's path, refused when absolute or climbing out with ``..``."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise RuntimeError(
            f"{ARCHIVE_NAME}: refusing member {name!r}: its path leads outside the archive folder"
        )
    return path


def _extract(archive: Path, dest: Path) -> None:
    """Extract the example images, labels and the licence into ``dest`` under their new names.

    Only regular files are read, and every file is written by this function inside ``dest`` (nothing is
    created by ``tarfile`` itself: no links, devices or permissions from the archive).

    Raises:
        RuntimeError: the archive holds a member with an absolute path or ``..`` (checked before anything
            is written).
    """
    members = [*IMAGES.values(), *LABELS.values(), *((m, t) for m, t, _ in PARTIAL_LABELS.values())]
    wanted = {f"{_REFERENCE}/{member}": target for member, target in members}
    wanted[f"{PACKAGE}-{VERSION}/LICENSE"] = "LICENSE_TotalSegmentator.txt"
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            _safe_member_path(member.name)
        for member in members:
            if not member.isfile():
                continue
            path = _safe_member_path(member.name)
            parent, name = str(path.parent), path.name
            if str(path) in wanted:
                target = dest / wanted[str(path)]
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


def _write_mask_in_scan_grid(mask_path: Path, scan_path: Path, target: Path, class_id: int) -> Path:
    """Place a binary mask stored in a crop of its scan's grid into the scan's full grid, as ``class_id``.

    Raises:
        RuntimeError: the two grids differ by more than a whole-voxel shift (other spacing, orientation or
            a fractional offset), or the crop reaches outside the scan.
    """
    import nibabel as nib

    mask, scan = nib.load(mask_path), nib.load(scan_path)
    # voxel (i, j, k) of the mask is voxel (i, j, k) + offset of the scan
    to_scan = np.linalg.inv(scan.affine) @ mask.affine
    offset = to_scan[:3, 3]
    if not np.allclose(to_scan[:3, :3], np.eye(3), atol=1e-4) or not np.allclose(
        offset, offset.round(), atol=1e-3
    ):
        raise RuntimeError(f"{mask_path}: its grid is not a whole-voxel crop of {scan_path}'s grid")
    start = offset.round().astype(int)
    stop = start + np.array(mask.shape[:3])
    if (start < 0).any() or (stop > np.array(scan.shape[:3])).any():
        raise RuntimeError(
            f"{mask_path}: its crop [{start.tolist()}, {stop.tolist()}) is outside {scan_path}"
        )
    values = np.zeros(scan.shape[:3], dtype=np.uint8)
    values[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = (
        np.asanyarray(mask.dataobj) > 0
    ) * class_id
    labels = nib.Nifti1Image(values, scan.affine, scan.header)
    labels.set_data_dtype(np.uint8)
    nib.save(labels, target)
    return target


def _item(dest: Path, case: str, label_set: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"image": str(dest / IMAGES[case][1]), "modality": MODALITY[case]}
    if label_set is not None:
        item["label"] = str(dest / f"labels/{case}_{label_set}.nii.gz")
    if case in PARTIAL_LABELS:
        item["labelled"] = [PARTIAL_LABELS[case][2]]
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
    flare22_ids = {name: i for i, name in enumerate(FLARE22_CLASSES, start=1)}
    for case, (_, mask_file, organ) in PARTIAL_LABELS.items():
        _write_mask_in_scan_grid(
            dest_path / mask_file,
            dest_path / IMAGES[case][1],
            dest_path / f"labels/{case}_flare22.nii.gz",
            flare22_ids[organ],
        )

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
        # A fully labelled, B (aorta only) partially: the organs B does not label stay out of its loss
        "flare22_partial": {
            "training": [_item(dest_path, "A", "flare22"), _item(dest_path, "B", "flare22")],
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
