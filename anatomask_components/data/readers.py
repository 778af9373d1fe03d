"""One MONAI image reader for NIfTI, NRRD, MetaImage and DICOM series, with RAS affines.

NIfTI is read with nibabel (its affine is already voxel-to-RAS). NRRD, MHA/MHD and DICOM series are read
with SimpleITK, whose geometry (origin, spacing, direction) is in LPS; the affine is built in LPS and
converted to RAS by negating its first two rows, so every format yields the affine nibabel would report
for the same volume saved as NIfTI. Arrays come back in (i, j, k) voxel order (x fastest in the file),
the order the affine indexes, like MONAI's own readers.
"""

from __future__ import annotations

import os
import warnings
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


def is_dicom_series_dir(path: str | os.PathLike) -> bool:
    """Whether a folder directly contains DICOM files (``.dcm`` or a DICOM preamble, any name)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    return any(
        child.is_file() and (child.name.lower().endswith(".dcm") or has_dicom_preamble(child))
        for child in folder.iterdir()
    )


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    from monai.data.utils import correct_nifti_header_if_necessary

    image = correct_nifti_header_if_necessary(nib.load(path))
    return np.asanyarray(image.dataobj), np.array(image.affine, dtype=np.float64)


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


def _read_dicom_series(path: str, series_uid: str | None) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(path)
    if not series:
        raise InvalidScanError(path, "folder holds no DICOM series")
    if series_uid is not None:
        if series_uid not in series:
            raise InvalidScanError(
                path, f"DICOM series {series_uid!r} not found (found: {', '.join(series)})"
            )
        chosen = series_uid
    else:
        files_per_series = {uid: reader.GetGDCMSeriesFileNames(path, uid) for uid in series}
        chosen = max(series, key=lambda uid: len(files_per_series[uid]))
        if len(series) > 1:
            warnings.warn(
                f"{path}: {len(series)} DICOM series in one folder; reading the largest ({chosen!r}, "
                f"{len(files_per_series[chosen])} files). Pass series_uid to choose another.",
                stacklevel=3,
            )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(path, chosen))
    image = reader.Execute()
    return _itk_to_numpy(image), _itk_geometry_to_ras_affine(image)


def _read_itk_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    return _itk_to_numpy(image), _itk_geometry_to_ras_affine(image)


def read_volume(
    path: str | os.PathLike, channel_dim: int | None = None, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Read one scan file (or DICOM series folder) into a voxel array and its RAS affine.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, a ``.dcm`` file or a folder
            holding a DICOM series.
        channel_dim: None: the file must hold one 3D volume (trailing singleton axes are dropped).
            ``-1``: a 4D file whose last axis holds channels (MSD multi-modal images) is accepted.
        series_uid: the DICOM series to read when a folder holds several (default: the largest).

    Returns:
        the array (H, W, D) or, with ``channel_dim=-1``, (H, W, D, C); the (4, 4) voxel-to-RAS affine;
        the format name (``"nifti"``, ``"itk"`` or ``"dicom"``).

    Raises:
        InvalidScanError: missing path, unsupported type, unreadable/truncated file, 2D image, 4D image
            where 3D is expected.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InvalidScanError(path, "file does not exist")
    suffix = image_suffix(path)
    try:
        if os.path.isdir(path):
            array, affine = _read_dicom_series(path, series_uid)
            fmt = "dicom"
        elif suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
            fmt = "nifti"
        elif suffix in ITK_SUFFIXES + DICOM_SUFFIXES:
            array, affine = _read_itk_file(path)
            fmt = "itk" if suffix in ITK_SUFFIXES else "dicom"
        else:
            raise InvalidScanError(
                path,
                f"unsupported file type (supported: {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)",
            )
    except InvalidScanError:
        raise
    except Exception as error:  # nibabel, zlib, gzip and ITK each raise their own types for broken files
        raise InvalidScanError(
            path, f"cannot be read, corrupt or truncated? ({type(error).__name__}: {error})"
        ) from error
    return _check_dimensions(array, path, channel_dim), affine, fmt


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
    """

    def __init__(self, channel_dim: int | None = None, series_uid: str | None = None):
        super().__init__()
        if channel_dim not in (None, -1):
            raise ValueError(f"channel_dim must be None or -1, got {channel_dim!r}")
        self.channel_dim = channel_dim
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """Whether every name is a supported image file or a folder (read as a DICOM series)."""
        return all(image_suffix(name) is not None or os.path.isdir(name) for name in ensure_tuple(filename))

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
            ``spatial_shape``, ``space``, ``original_channel_dim``, ``format``).

        Raises:
            InvalidScanError: any file is missing or unusable, or the channel files' grids differ.
        """
        paths = list(ensure_tuple(img))
        arrays, reference_affine, fmt = [], None, None
        for path in paths:
            array, affine, fmt = read_volume(path, self.channel_dim, self.series_uid)
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
        }
        return data, meta
