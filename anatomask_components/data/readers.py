"""One MONAI image reader for NIfTI, NRRD, MetaImage and DICOM series, with RAS affines.

NIfTI is read with nibabel (its affine is already voxel-to-RAS). NRRD, MHA/MHD and DICOM series are read
with SimpleITK, whose geometry (origin, spacing, direction) is in LPS; the affine is built in LPS and
converted to RAS by negating its first two rows, so every format yields the affine nibabel would report
for the same volume saved as NIfTI. Arrays come back in (i, j, k) voxel order (x fastest in the file),
the order the affine indexes, like MONAI's own readers.

Reading also checks what the libraries let through silently: DICOM slices that GDCM skipped (empty or
truncated files) or that leave a gap in the series, affines that are singular or not finite, and NIfTI
headers whose sform disagrees with the qform or pixdim (a warning; the sform is used). Resource failures
(out of memory, too many open files, I/O errors) propagate: they say nothing about the file (a MemoryError
is re-raised as one that names the scan).

Headers are checked before any voxel is allocated, so that a header that lies (4000^3 float32 declared in a
4 KB file) costs neither 256 GB nor a bare MemoryError: the volume must stay under a voxel limit
(:func:`max_voxels_limit`, default :data:`DEFAULT_MAX_VOXELS`, environment variable
``ANATOMASK_MAX_VOXELS``), and the file must hold the bytes its header declares: the file size for raw data
(NIfTI ``.nii``, raw MetaImage and NRRD), a streamed count of the decompressed bytes that stops at the
declared size for ``.nii.gz``, and deflate's best compression ratio for compressed MetaImage and NRRD.
"""

from __future__ import annotations

import errno
import math
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from anatomask_components.data.validation import GRID_TOLERANCE_MM, InvalidScanError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm",)
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES

# Negating the first two world axes turns LPS into RAS and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Axis labels for Orientationd: given explicitly because monai 1.6 warns that its default will change.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

# Files a DICOM export may hold next to the slices that are certainly not slices themselves.
_NOT_DICOM_SUFFIXES = (
    *NIFTI_SUFFIXES,
    *ITK_SUFFIXES,
    ".raw", ".zraw", ".img",
    ".txt", ".json", ".xml", ".md", ".csv", ".tsv", ".htm", ".html", ".pdf", ".log", ".ini", ".cfg",
    ".yaml", ".yml", ".db", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".zip", ".tar",
)  # fmt: skip
# Slice gaps may differ from the median gap by this fraction (rounding of the stored positions stays far
# below it; one missing slice doubles a gap).
SLICE_GAP_TOLERANCE = 0.1
# Errors that say nothing about the file being read: it may read fine on the next try, so they must never
# become an InvalidScanError (the on-disk cache would mark the scan invalid for good).
RESOURCE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EMFILE", "ENFILE", "EIO", "ENOMEM", "ENOSPC", "EDQUOT", "EAGAIN", "EWOULDBLOCK", "EINTR", "EBUSY",
        "ETIMEDOUT", "ESTALE", "ENOLCK", "ENOBUFS", "EREMOTEIO", "ENETDOWN", "ENETUNREACH", "ENETRESET",
        "ECONNABORTED", "ECONNRESET", "EHOSTDOWN", "EHOSTUNREACH",
    )
    if hasattr(errno, name)
)  # fmt: skip
# ITK reports system errors as RuntimeError text only. Just the unmistakable ones: ITK quotes errno even
# where it may be stale, and a broken file mistaken for a resource error would be retried forever.
_RESOURCE_MESSAGES = (
    *(os.strerror(code) for code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.ENOSPC)),
    "std::bad_alloc",
)

# Volumes above this many voxels are refused before they are allocated: 2^31 voxels are 8 GiB as float32
# (before the copies preprocessing makes), more than any CT a 3D network is trained on (a 1024 x 1024 x
# 2000 photon-counting scan is just under). Headers that declare more are nearly always wrong.
DEFAULT_MAX_VOXELS = 2**31
# The limit is read from the environment because the reader is built in many places that a bundle config
# cannot reach one by one (loading transforms, reference labels, fingerprint, check-data, MONAI Label), and
# DataLoader workers inherit it.
MAX_VOXELS_ENV = "ANATOMASK_MAX_VOXELS"
# Deflate (gzip, zlib) never compresses by more than about 1032:1, so a compressed payload of N bytes holds
# at most this many times N bytes of voxels.
DEFLATE_MAX_RATIO = 1032
# The decompressed bytes of a .nii.gz are counted in pieces of this size (bounded memory).
_GZIP_CHUNK_BYTES = 1 << 24


class ScanMemoryError(MemoryError):
    """Out of memory while reading a scan: a resource error (:func:`is_resource_error`), naming the scan."""


def max_voxels_limit(max_voxels: int | None = None) -> int:
    """The voxel limit in force: ``max_voxels`` if given, else ``$ANATOMASK_MAX_VOXELS``, else
    :data:`DEFAULT_MAX_VOXELS`.

    Raises:
        ValueError: the environment variable is not a positive integer.
    """
    if max_voxels is not None:
        limit = int(max_voxels)
    else:
        text = os.environ.get(MAX_VOXELS_ENV, "").strip()
        try:
            limit = int(float(text)) if text else DEFAULT_MAX_VOXELS  # accepts 2e9 as well as 2000000000
        except ValueError:
            raise ValueError(f"{MAX_VOXELS_ENV}={text!r} is not a number of voxels") from None
    if limit <= 0:
        raise ValueError(f"the voxel limit must be positive, got {limit}")
    return limit


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(str(int(n)) for n in shape)


def check_declared_size(
    path: str,
    shape: Sequence[int],
    itemsize: int,
    dtype_name: str,
    max_voxels: int,
    available: int | None = None,
    compressed: bool = False,
) -> None:
    """Raise unless a header's declared volume is under the voxel limit and fits in what the file holds.

    Args:
        path: named in the error.
        shape: the declared shape (all axes, channels included).
        itemsize: bytes per voxel (per component times components).
        dtype_name: the declared voxel type, for the message.
        max_voxels: the voxel limit.
        available: bytes of voxel data the file holds (None: unknown, only the limit is checked). For
            ``compressed``, the compressed payload, which holds at most :data:`DEFLATE_MAX_RATIO` times more.
        compressed: whether ``available`` counts deflate-compressed bytes.

    Raises:
        InvalidScanError: above the limit, or more bytes declared than the file can hold.
    """
    voxels = math.prod(int(n) for n in shape)
    declared = voxels * int(itemsize)
    described = f"header declares {_shape_text(shape)} {dtype_name} ({voxels:,} voxels, {declared:,} bytes)"
    if voxels > max_voxels:
        raise InvalidScanError(
            path,
            f"{described}, above the limit of {max_voxels:,} voxels: a wrong header? (raise the limit with "
            f"{MAX_VOXELS_ENV} if the volume is real)",
        )
    if available is None:
        return
    if compressed and declared > DEFLATE_MAX_RATIO * available:
        raise InvalidScanError(
            path,
            f"{described}, but its {available:,} compressed bytes can hold at most "
            f"{DEFLATE_MAX_RATIO * available:,}: truncated file or wrong header",
        )
    if not compressed and declared > available:
        raise InvalidScanError(
            path,
            f"{described}, but the file holds only {available:,} bytes of voxel data: truncated file or "
            "wrong header",
        )


def _gzip_length(path: str, stop_at: int) -> int:
    """Decompressed bytes of a gzip file (all its members), counted in bounded pieces, no further than
    ``stop_at``; a truncated stream counts what it holds.

    Raises:
        zlib.error: the compressed data is corrupt.
    """
    total = 0
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as f:
        pending, member_start = f.read(1 << 20), True
        while pending and total < stop_at:
            if member_start and pending[:1] == b"\0":
                break  # zero padding after the last member, which gzip readers ignore
            total += len(inflater.decompress(pending, min(_GZIP_CHUNK_BYTES, stop_at - total)))
            pending, member_start = inflater.unconsumed_tail, False
            if inflater.eof:  # the next gzip member, if any (nibabel reads them all as one stream)
                pending, member_start = inflater.unused_data, True
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if not pending:
                pending = f.read(1 << 20)
    return total


def image_suffix(path: str | os.PathLike) -> str | None:
    """The supported image suffix of ``path`` (``".nii.gz"``, ``".nrrd"``, ...), or None."""
    name = str(path).lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), None)


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """Whether a file carries the DICOM part-10 marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether a file is named ``*.dcm`` or carries the DICOM preamble (DICOM files often have no suffix)."""
    return str(path).lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path)


def _is_other_image_name(name: str) -> bool:
    suffix = image_suffix(name)
    return suffix is not None and suffix not in DICOM_SUFFIXES


def _visible_files(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if not child.name.startswith(".") and child.is_file())


def dicom_files(path: str | os.PathLike) -> list[Path]:
    """The DICOM files directly in a folder (``.dcm`` or a DICOM preamble, any name; hidden files skipped)."""
    return [child for child in _visible_files(Path(path)) if is_dicom_file(child)]


def is_dicom_series_dir(path: str | os.PathLike) -> bool:
    """Whether a folder is read as one DICOM series: it directly contains DICOM files (``.dcm`` or a DICOM
    preamble, any name) and no other image files (NIfTI, NRRD, MetaImage); hidden files are ignored."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    files = _visible_files(folder)
    # A stray .dcm among NIfTI files must not turn the folder into a "series" and hide those files.
    if any(_is_other_image_name(child.name) for child in files):
        return False
    return any(is_dicom_file(child) for child in files)


def is_resource_error(error: BaseException) -> bool:
    """Whether a read failed for lack of resources rather than because of the file.

    True for MemoryError, an OSError whose errno is in :data:`RESOURCE_ERRNOS` (too many open files, I/O
    error, disk full, try again, time-out, stale network mount, ...), or an ITK RuntimeError quoting too
    many open files, out of memory, I/O error or disk full, anywhere in the ``__cause__``/``__context__``
    chain. An OSError without errno (``gzip.BadGzipFile``)
    is a broken file, not a resource error.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, MemoryError):
            return True
        if isinstance(current, OSError) and current.errno in RESOURCE_ERRNOS:
            return True
        if isinstance(current, RuntimeError) and any(text in str(current) for text in _RESOURCE_MESSAGES):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def check_affine(affine: np.ndarray, path: str) -> None:
    """Raise unless a voxel-to-world affine is finite and invertible (a voxel grid with a size in mm).

    MONAI's ``Orientationd`` fails later on a singular affine with a RuntimeError that names no file, and
    accepts NaN affines, giving a volume of zeros after resampling.

    Raises:
        InvalidScanError: NaN/Inf entries, an all-zero matrix, a zero voxel size or linearly dependent axes.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shown = np.array2string(affine, precision=4, suppress_small=True)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InvalidScanError(path, f"affine holds NaN or infinite values (or is not 4x4):\n{shown}")
    linear = affine[:3, :3]
    if not linear.any():
        raise InvalidScanError(path, f"affine is all zero (no voxel size or orientation):\n{shown}")
    spacing = np.linalg.norm(linear, axis=0)
    if (spacing <= 1e-6).any():
        sizes = " x ".join(f"{s:g}" for s in spacing)
        raise InvalidScanError(path, f"zero voxel size ({sizes} mm) in the affine:\n{shown}")
    # The determinant of the axis directions: 0 when two voxel axes point the same way, whatever the spacing.
    if abs(np.linalg.det(linear / spacing)) < 1e-6:
        raise InvalidScanError(path, f"singular affine (voxel axes are linearly dependent):\n{shown}")


def _read_nifti(path: str, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(path)  # the header only: voxels are read by np.asanyarray below
    _check_nifti_size(image, path, max_voxels)
    _warn_on_nifti_geometry_conflict(image, path)
    # image.affine already follows the standard's precedence: sform (code > 0), else qform, else pixdim.
    # MONAI's correct_nifti_header_if_necessary is deliberately not used: when pixdim disagrees with the
    # sform it swaps in the qform even when that is unset, reading a 2 mm sform as 1 mm.
    return np.asanyarray(image.dataobj), np.array(image.affine, dtype=np.float64)


def _check_nifti_size(image: Any, path: str, max_voxels: int) -> None:
    """Raise unless the voxels a NIfTI header declares are under the limit and present in the file."""
    shape = image.header.get_data_shape()
    dtype = image.header.get_data_dtype()
    # Where nibabel will read from: the loaded image's header has its vox_offset reset to 0.
    offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
    declared = math.prod(int(n) for n in shape) * dtype.itemsize
    check_declared_size(path, shape, dtype.itemsize, str(dtype), max_voxels)
    size = os.path.getsize(path)
    if not path.lower().endswith(".gz"):
        check_declared_size(path, shape, dtype.itemsize, str(dtype), max_voxels, size - offset)
        return
    # The cheap bound first (a 4 KB file cannot hold 256 GB), then a count that costs at most the declared
    # size in decompression and a bounded piece of memory.
    check_declared_size(path, shape, dtype.itemsize, str(dtype), max_voxels, size, compressed=True)
    held = _gzip_length(path, offset + declared) - offset
    check_declared_size(path, shape, dtype.itemsize, str(dtype), max_voxels, max(held, 0))


def _warn_on_nifti_geometry_conflict(image: Any, path: str) -> None:
    """Warn, once per file, when a NIfTI sform (code > 0), which is used, disagrees with the pixdim voxel
    size or with the qform (code > 0)."""
    header = image.header
    if not hasattr(header, "get_sform"):
        return
    sform, sform_code = header.get_sform(coded=True)
    if sform is None or not sform_code or not np.isfinite(sform).all():
        return
    sform_spacing = np.linalg.norm(sform[:3, :3], axis=0)
    if (sform_spacing <= 1e-6).any():
        return  # check_affine rejects it; a warning first would only repeat that
    conflicts = []
    zooms = np.abs(np.asarray(header.get_zooms(), dtype=np.float64))
    if zooms.size >= 3 and not np.allclose(sform_spacing, zooms[:3], rtol=1e-3, atol=1e-6):
        conflicts.append(f"pixdim says {' x '.join(f'{z:.4g}' for z in zooms[:3])} mm")
    qform, qform_code = header.get_qform(coded=True)
    if qform is not None and qform_code and np.isfinite(qform).all():
        # The qform's voxel size is the pixdim; this compares its rotation and origin as well.
        scale = float(sform_spacing.max())
        same_axes = np.allclose(qform[:3, :3], sform[:3, :3], rtol=0, atol=1e-3 * scale)
        same_origin = np.allclose(qform[:3, 3], sform[:3, 3], rtol=0, atol=GRID_TOLERANCE_MM)
        if not (same_axes and same_origin):
            shown = np.array2string(qform, precision=4, suppress_small=True)
            conflicts.append(f"the qform (code {int(qform_code)}) describes another grid:\n{shown}")
    if conflicts:
        warnings.warn(
            f"{path}: NIfTI sform (code {int(sform_code)}, voxel size "
            f"{' x '.join(f'{s:.4g}' for s in sform_spacing)} mm) disagrees with its header: "
            f"{'; '.join(conflicts)}. Using the sform, as the NIfTI standard says. sform:\n"
            f"{np.array2string(sform, precision=4, suppress_small=True)}",
            stacklevel=4,
        )


def _itk_geometry_to_ras_affine(image: Any) -> np.ndarray:
    """Voxel-to-RAS affine of a SimpleITK image (first three axes)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction @ np.diag(spacing)
    affine_lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    return LPS_TO_RAS @ affine_lps


def _itk_to_numpy(image: Any) -> np.ndarray:
    """SimpleITK image to an array in voxel order (i, j, k[, t][, components])."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # (k, j, i) for 3D, with components last if any
    spatial = image.GetDimension()
    order = list(reversed(range(spatial))) + list(range(spatial, array.ndim))
    return np.transpose(array, order)


def _read_dicom_series(path: str, series_uid: str | None, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(path)
    files_per_series: dict[str, Sequence[str]] = {}
    if series_uid is None and len(series) > 1:
        files_per_series = {uid: reader.GetGDCMSeriesFileNames(path, uid) for uid in series}
    chosen = None
    if series_uid is not None and series_uid in series:
        chosen = series_uid
    elif series_uid is None and series:
        chosen = max(series, key=lambda uid: len(files_per_series[uid])) if files_per_series else series[0]
    if chosen is not None and chosen not in files_per_series:
        files_per_series[chosen] = reader.GetGDCMSeriesFileNames(path, chosen)
    _check_no_dropped_files(path, files_per_series, series, reader)
    if not series:
        raise InvalidScanError(path, "folder holds no DICOM series")
    if chosen is None:
        raise InvalidScanError(path, f"DICOM series {series_uid!r} not found (found: {', '.join(series)})")
    files = files_per_series[chosen]
    if len(series) > 1 and series_uid is None:
        warnings.warn(
            f"{path}: {len(series)} DICOM series in one folder; reading the largest ({chosen!r}, "
            f"{len(files)} files). Pass series_uid to choose another.",
            stacklevel=3,
        )
    _check_slice_positions(path, files)
    # The series' size is that of one slice times the slices (GDCM allocates it all before reading).
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    shape, itemsize, dtype_name = _itk_declared_voxels(first)
    series_shape = (*shape[:2], shape[2] * len(files), *shape[3:])
    check_declared_size(path, series_shape, itemsize, dtype_name, max_voxels)
    reader.SetFileNames(files)
    image = reader.Execute()
    return _itk_to_numpy(image), _itk_geometry_to_ras_affine(image)


def _check_no_dropped_files(
    folder: str, files_per_series: dict[str, Sequence[str]], series: Sequence[str], reader: Any
) -> None:
    """Raise if the folder holds DICOM slices that GDCM left out of every series.

    GDCM skips files it cannot parse (empty, truncated) without a word, and the series is then read with
    a slice missing. Files that are clearly no slices are not counted: hidden files, ``DICOMDIR``, text,
    pictures, other image formats, and DICOM objects without pixels (RT structure sets, reports, ...).
    """
    in_series = {os.path.basename(name) for names in files_per_series.values() for name in names}
    leftovers = [
        entry.path
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name)
        if entry.name not in in_series
        and not entry.name.startswith(".")
        and entry.name.upper() != "DICOMDIR"
        and not entry.name.lower().endswith(_NOT_DICOM_SUFFIXES)
        and entry.is_file()
    ]
    if leftovers:
        # The common single-series case lists only the chosen series; the others are fetched only now.
        for uid in series:
            if uid not in files_per_series:
                files_per_series[uid] = reader.GetGDCMSeriesFileNames(folder, uid)
                in_series.update(os.path.basename(name) for name in files_per_series[uid])
    broken = []
    for file in leftovers:
        if os.path.basename(file) in in_series:
            continue
        problem = _dropped_file_problem(file)
        if problem is not None:
            broken.append(f"{os.path.basename(file)} ({problem})")
    if broken:
        shown = ", ".join(broken[:10]) + (f" and {len(broken) - 10} more" if len(broken) > 10 else "")
        raise InvalidScanError(
            folder,
            f"{len(broken)} file(s) are not part of any readable DICOM series (empty, truncated or corrupt "
            f"slices; the series would be read without them): {shown}",
        )


def _dropped_file_problem(path: str) -> str | None:
    """Why a file that GDCM left out of every series is a broken slice, or None if it is no slice at all."""
    import pydicom
    from pydicom.uid import UID

    size = os.path.getsize(path)
    if size == 0:
        return "0 bytes"
    claims_dicom = is_dicom_file(path)
    if not claims_dicom:
        with open(path, "rb") as f:
            head = f.read(512)
        # DICOM headers always hold control bytes (tags, lengths); text files (README, checksums) don't.
        if all(byte >= 32 or byte in b"\t\n\r\f" for byte in head):
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity of a forced read
            dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        meta = getattr(dataset, "file_meta", None)
        sop_class = str((meta or {}).get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID") or "")
        has_pixels = "Rows" in dataset or (bool(sop_class) and "Image Storage" in UID(sop_class).name)
    except Exception as error:
        if is_resource_error(error):
            raise
        return f"{size} bytes, header unreadable" if claims_dicom else None
    if has_pixels:
        return f"{size} bytes, truncated or unreadable image"
    if sop_class or "Modality" in dataset:
        return None  # an object without pixels (RT structure set, structured report, ...)
    return f"{size} bytes, no DICOM header found" if claims_dicom else None


def _check_slice_positions(folder: str, files: Sequence[str]) -> None:
    """Raise if the slices of a series are not evenly spaced along their normal, or two share a position.

    ITK reads a series with one slice missing at the average spacing, silently stretching the volume.
    Only headers are read (pydicom stops before the pixels). Series without ``ImagePositionPatient`` /
    ``ImageOrientationPatient`` (or with a single file, such as enhanced multi-frame objects) are not checked.
    """
    import pydicom

    if len(files) < 2:
        return
    positions, normal = [], None
    for file in files:
        try:
            dataset = pydicom.dcmread(
                file,
                stop_before_pixels=True,
                force=True,
                specific_tags=["ImagePositionPatient", "ImageOrientationPatient"],
            )
            position = [float(v) for v in dataset.get("ImagePositionPatient") or []]
            orientation = [float(v) for v in dataset.get("ImageOrientationPatient") or []]
        except Exception as error:
            if is_resource_error(error):
                raise
            raise InvalidScanError(
                folder,
                f"{os.path.basename(file)}: DICOM header cannot be read ({type(error).__name__}: {error})",
            ) from error
        if len(position) != 3 or len(orientation) != 6:
            return
        if normal is None:
            normal = np.cross(orientation[:3], orientation[3:])
            if not np.isfinite(normal).all() or np.linalg.norm(normal) < 1e-6:
                return
            normal = normal / np.linalg.norm(normal)
        positions.append(float(np.dot(position, normal)))
    order = np.argsort(positions, kind="stable")
    depth = np.asarray(positions)[order]
    names = [os.path.basename(files[i]) for i in order]
    gaps = np.diff(depth)

    def between(i: int) -> str:
        return f"{names[i]} at {depth[i]:.2f} mm and {names[i + 1]} at {depth[i + 1]:.2f} mm"

    duplicates = np.flatnonzero(gaps <= 1e-3)
    if duplicates.size:
        raise InvalidScanError(
            folder,
            f"{duplicates.size} pair(s) of DICOM slices share one position along the slice normal, e.g. "
            f"{between(int(duplicates[0]))}: duplicate slices, or several acquisitions in one series",
        )
    if gaps.size < 2:
        return
    median = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - median) > SLICE_GAP_TOLERANCE * median)
    if uneven.size:
        first = int(uneven[0])
        more = f" (and {uneven.size - 1} more uneven gap(s))" if uneven.size > 1 else ""
        raise InvalidScanError(
            folder,
            f"DICOM slices are not evenly spaced: a gap of {gaps[first]:.2f} mm between {between(first)} "
            f"along the slice normal, where the median gap is {median:.2f} mm{more}; a missing slice?",
        )


def dicom_modality(path: str | os.PathLike) -> str:
    """The Modality tag (0008,0060) of a DICOM file or of the first DICOM file of a series folder
    (``"CT"``, ``"MR"``, ``"PT"``, ...; ``""`` when absent)."""
    import pydicom

    files = dicom_files(path) if os.path.isdir(path) else [Path(path)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity of a forced read
            dataset = pydicom.dcmread(
                files[0], stop_before_pixels=True, force=True, specific_tags=["Modality"]
            )
    except Exception as error:  # GDCM read the pixels, so an odd header only means "modality unknown"
        if is_resource_error(error):
            raise
        return ""
    return str(dataset.get("Modality", "") or "").strip().upper()


def _read_itk_file(path: str, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    shape, itemsize, dtype_name = _itk_declared_voxels(reader)
    layout = _itk_data_layout(path)
    if layout is None:
        check_declared_size(path, shape, itemsize, dtype_name, max_voxels)
    else:
        data_file, offset, compressed = layout
        if not os.path.isfile(data_file):
            raise InvalidScanError(path, f"the data file named in the header does not exist: {data_file}")
        available = os.path.getsize(data_file) - offset
        check_declared_size(path, shape, itemsize, dtype_name, max_voxels, available, compressed)
    image = reader.Execute()
    return _itk_to_numpy(image), _itk_geometry_to_ras_affine(image)


def _itk_declared_voxels(reader: Any) -> tuple[tuple[int, ...], int, str]:
    """Shape (components last), bytes per voxel and voxel type that an ITK header declares."""
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())  # "16-bit signed integer", "vector of ..."
    bits = re.search(r"(\d+)-bit", name)
    component_bytes = int(bits.group(1)) // 8 if bits else 8
    if "complex" in name:
        component_bytes *= 2
    components = int(reader.GetNumberOfComponents())
    shape = tuple(int(n) for n in reader.GetSize()) + ((components,) if components > 1 else ())
    return shape, component_bytes, name


def _itk_data_layout(path: str) -> tuple[str, int, bool] | None:
    """Where the voxels of a MetaImage or NRRD file lie: ``(data file, byte offset, deflate-compressed)``,
    or None when that cannot be told from the header without reading the data (DICOM, lists of data
    files, data at the end of the file, ASCII or bzip2 encodings)."""
    lower = path.lower()
    if not lower.endswith(ITK_SUFFIXES):
        return None
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    folder = os.path.dirname(path)
    if lower.endswith((".mha", ".mhd")):
        fields: dict[str, str] = {}
        end = 0
        for line in head.split(b"\n"):
            end += len(line) + 1
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
        else:
            return None
        name = fields["elementdatafile"]
        compressed = fields.get("compresseddata", "false").lower() == "true"
        skip = int(fields.get("headersize", "0") or 0)
        if name.upper() == "LOCAL":
            return path, end, compressed
        if skip < 0 or name.upper().startswith("LIST") or "%" in name or " " in name:
            return None
        return os.path.join(folder, name), skip, compressed
    header, separator, _ = head.partition(b"\n\n")
    if not separator or not header.startswith(b"NRRD"):
        return None
    fields = {}
    for line in header.decode("latin-1").splitlines()[1:]:
        key, colon, value = line.partition(":")
        if colon and not line.startswith("#"):
            fields[key.strip().lower().replace(" ", "")] = value.strip().lstrip("=").strip()
    encoding = fields.get("encoding", "raw").lower()
    if encoding not in ("raw", "gzip", "gz") or int(fields.get("lineskip", "0") or 0):
        return None
    skip = int(fields.get("byteskip", "0") or 0)
    name = fields.get("datafile")
    if name is None:
        return path, len(header) + 2 + max(skip, 0), encoding != "raw"
    if skip < 0 or name.upper().startswith("LIST") or "%" in name or " " in name:
        return None
    return os.path.join(folder, name), skip, encoding != "raw"


def read_volume(
    path: str | os.PathLike,
    channel_dim: int | None = None,
    series_uid: str | None = None,
    max_voxels: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Read one scan file (or DICOM series folder) into a voxel array and its RAS affine.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, a DICOM file (``.dcm`` or any
            name with the DICOM preamble) or a folder holding a DICOM series.
        channel_dim: None: the file must hold one 3D volume (trailing singleton axes are dropped).
            ``-1``: a 4D file whose last axis holds channels (MSD multi-modal images) is accepted.
        series_uid: the DICOM series to read when a folder holds several (default: the largest).
        max_voxels: refuse volumes whose header declares more voxels (default: :func:`max_voxels_limit`).

    Returns:
        the array (H, W, D) or, with ``channel_dim=-1``, (H, W, D, C); the (4, 4) voxel-to-RAS affine;
        the format name (``"nifti"``, ``"itk"`` or ``"dicom"``).

    Raises:
        InvalidScanError: missing path, unsupported type, unreadable/truncated file, a header declaring
            more voxels than the limit or than the file holds, DICOM series with
            empty/truncated/missing/duplicate slices, 2D image, 4D image where 3D is expected, affine
            that is not finite or not invertible.
        ScanMemoryError: out of memory while reading (a MemoryError naming the file).
        OSError: too many open files, I/O errors and the like (:func:`is_resource_error`), unchanged: they
            are no fault of the file.
    """
    path = os.fspath(path)
    limit = max_voxels_limit(max_voxels)
    if not os.path.exists(path):
        raise InvalidScanError(path, "file does not exist")
    suffix = image_suffix(path)
    try:
        if os.path.isdir(path):
            array, affine = _read_dicom_series(path, series_uid, limit)
            fmt = "dicom"
        elif suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path, limit)
            fmt = "nifti"
        elif suffix in ITK_SUFFIXES + DICOM_SUFFIXES or (suffix is None and has_dicom_preamble(path)):
            array, affine = _read_itk_file(path, limit)
            fmt = "itk" if suffix in ITK_SUFFIXES else "dicom"
        else:
            raise InvalidScanError(
                path,
                f"unsupported file type (supported: {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)",
            )
    except InvalidScanError:
        raise
    except MemoryError as error:
        # A header that lies is refused above; this is a real shortage, so it stays a resource error.
        detail = str(error) or "MemoryError"
        raise ScanMemoryError(f"{path}: out of memory while reading the scan ({detail})") from error
    except Exception as error:  # nibabel, zlib, gzip and ITK each raise their own types for broken files
        if is_resource_error(error):
            if "std::bad_alloc" in str(error):
                message = f"{path}: out of memory while reading the scan (ITK: {error})"
                raise ScanMemoryError(message) from error
            raise
        raise InvalidScanError(
            path, f"cannot be read, corrupt or truncated? ({type(error).__name__}: {error})"
        ) from error
    array = _check_dimensions(array, path, channel_dim)
    check_affine(affine, path)
    return array, affine, fmt


def _check_dimensions(array: np.ndarray, path: str, channel_dim: int | None) -> np.ndarray:
    """Drop trailing singleton axes and reject anything that is not one 3D volume (or 3D + channels)."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim < 3 or min(array.shape[:3]) == 1:
        raise InvalidScanError(path, f"2D image (shape {tuple(array.shape)}); a 3D volume is required")
    if array.ndim == 3:
        return array
    if array.ndim == 4 and channel_dim == -1:
        return array
    raise InvalidScanError(
        path,
        f"{array.ndim}D image (shape {tuple(array.shape)}) where a 3D volume is expected; give channels as "
        "separate files (a list of paths), or read MSD-style 4D files with channel_dim=-1",
    )


class AnatoMaskReader(ImageReader):
    """MONAI reader for NIfTI, NRRD, MHA/MHD and DICOM series folders, returning voxel-to-RAS affines.

    Use it with ``LoadImaged(keys, reader=AnatoMaskReader())``. A list of paths is stacked as channels
    (all files must share the grid). The loaded MetaTensor keeps ``affine`` = ``original_affine`` (the
    file's own orientation), so ``Orientationd``/``Spacingd`` can later be inverted (``Invertd``) to write
    predictions back in the input geometry.

    Errors are raised from :meth:`get_data`, not :meth:`read`: ``LoadImage`` swallows exceptions from
    ``read`` and retries with other readers, which would replace the clear :class:`InvalidScanError`
    with a generic "cannot find a suitable reader".

    Args:
        channel_dim: None (default): every file is one 3D volume. ``-1``: accept 4D files whose last axis
            holds channels (MSD multi-modal images).
        series_uid: DICOM series to read from folders with several (default: the one with most files).
        max_voxels: refuse files whose header declares more voxels; None: ``$ANATOMASK_MAX_VOXELS`` or
            :data:`DEFAULT_MAX_VOXELS`, read here (so that a changed limit also changes the cache key).
    """

    def __init__(
        self, channel_dim: int | None = None, series_uid: str | None = None, max_voxels: int | None = None
    ):
        super().__init__()
        if channel_dim not in (None, -1):
            raise ValueError(f"channel_dim must be None or -1, got {channel_dim!r}")
        self.channel_dim = channel_dim
        self.series_uid = series_uid
        self.max_voxels = max_voxels_limit(max_voxels)

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """Whether every name is a supported image file, a DICOM file or a folder (read as a DICOM series)."""
        return all(
            image_suffix(name) is not None or os.path.isdir(name) or has_dicom_preamble(name)
            for name in ensure_tuple(filename)
        )

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> list[str] | str:
        """Return the path(s) unchanged; the files are read in :meth:`get_data` (see the class note)."""
        names = [os.fspath(name) for name in ensure_tuple(data)]
        return names if len(names) > 1 else names[0]

    def get_data(self, img: Sequence[str] | str) -> tuple[np.ndarray, dict]:
        """Read the file(s) and return the array and its metadata.

        Args:
            img: a path, or a list of paths to stack as channels.

        Returns:
            the array, (H, W, D) for one 3D file, (C, H, W, D) for a list of files, (H, W, D, C) for a 4D
            file read with ``channel_dim=-1``; and the metadata dict (``affine``, ``original_affine``,
            ``spatial_shape``, ``space``, ``original_channel_dim``, ``format``; ``stored_dtype``: the voxel
            type of each file as read, e.g. ``["int16"]``, before ``LoadImage`` casts to float32; and, for
            DICOM, ``dicom_modality``: the Modality tag of each file, e.g. ``["CT"]``, ``""`` for files that
            are not DICOM).

        Raises:
            InvalidScanError: any file is missing or unusable, or the channel files' grids differ.
        """
        paths = list(ensure_tuple(img))
        arrays, reference_affine, fmt, modalities = [], None, None, []
        for path in paths:
            array, affine, fmt = read_volume(path, self.channel_dim, self.series_uid, self.max_voxels)
            modalities.append(dicom_modality(path) if fmt == "dicom" else "")
            if len(paths) > 1 and array.ndim != 3:
                raise InvalidScanError(path, "a channel file must hold one 3D volume")
            if reference_affine is not None:
                same_shape = array.shape[:3] == arrays[0].shape[:3]
                if not same_shape or not np.allclose(affine, reference_affine, atol=GRID_TOLERANCE_MM):
                    raise InvalidScanError(
                        f"{paths[0]} + {path}", "channel files do not share one voxel grid (shape or affine)"
                    )
            reference_affine = reference_affine if reference_affine is not None else affine
            arrays.append(array)
        if len(arrays) > 1:
            data = np.stack(arrays, axis=0)
            channel = 0
        else:
            data = arrays[0]
            channel = -1 if data.ndim == 4 else float("nan")
        meta = {
            MetaKeys.AFFINE: reference_affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: reference_affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape[:3]),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: channel,
            "format": fmt,
            "stored_dtype": [str(array.dtype) for array in arrays],
        }
        if any(modalities):
            meta["dicom_modality"] = modalities
        return data, meta
