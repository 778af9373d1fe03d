"""Write volumes with a voxel-to-RAS affine as NIfTI, NRRD, MHA/MHD or a DICOM series.

Used by the phantoms, the example fetcher and the tests; the inverse of
:mod:`anatomask_components.data.readers`. Also the predictions' side: :func:`write_label_map` (atomic NIfTI
label maps) and :func:`align_to_reference` (a prediction and its reference label on one voxel grid).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anatomask_components.data.readers import ITK_SUFFIXES, LPS_TO_RAS, NIFTI_SUFFIXES, image_suffix
from anatomask_components.data.validation import GRID_TOLERANCE_MM, source_name
from anatomask_components.files import atomic_path

if TYPE_CHECKING:
    from monai.data import MetaTensor

# CT Image Storage
_CT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.2"
_MR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.4"


def write_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3D volume (or one 4D volume for NIfTI) with its voxel-to-RAS affine.

    Args:
        path: output file; the suffix picks the format (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``,
            ``.mha``, ``.mhd``).
        array: (H, W, D) voxels in (i, j, k) order; NIfTI also takes (H, W, D, T).
        affine: (4, 4) voxel-to-RAS affine.

    Returns:
        the written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        array = np.asarray(array)
        if array.dtype == np.int64:  # nibabel refuses int64 data without an explicit header
            array = array.astype(np.int32)
        image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, path)
    elif suffix in ITK_SUFFIXES:
        import SimpleITK as sitk

        sitk.WriteImage(to_sitk(array, affine), str(path), useCompression=suffix != ".nhdr")
    else:
        raise ValueError(f"{path}: unsupported output format (use one of {NIFTI_SUFFIXES + ITK_SUFFIXES})")
    return path


def write_volume_atomic(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """:func:`write_volume` through a temporary file in the same folder, so no half-written file is left."""
    path = Path(path)
    with atomic_path(path, suffix=image_suffix(path)) as temporary:
        write_volume(temporary, array, affine)
    return path


def write_label_map(path: str | os.PathLike, label_map: MetaTensor) -> Path:
    """Write a (1, H, W, D) label map with its affine as NIfTI (uint8; uint16 beyond 255), atomically.

    Args:
        path: the ``.nii.gz`` file.
        label_map: integer-valued label map; its ``affine`` is the voxel-to-RAS affine to store.

    Returns:
        the written path.
    """
    labels = np.asarray(label_map.detach().cpu())[0].round()
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return write_volume_atomic(
        Path(path), labels.astype(dtype), np.asarray(label_map.affine, dtype=np.float64)
    )


def ras_affine_to_itk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Split a voxel-to-RAS affine into ITK's LPS origin, spacing and direction.

    Args:
        affine: (4, 4) voxel-to-RAS affine without shear.

    Returns:
        origin (3,), spacing (3,), direction (9,) row-major, all in LPS.

    Raises:
        ValueError: the affine has shear, which ITK images cannot represent.
    """
    affine_lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    direction = affine_lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise ValueError("the affine has shear; ITK formats (NRRD, MHA, DICOM) cannot store it")
    return tuple(affine_lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def to_sitk(array: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK image from a (H, W, D) array in (i, j, k) order and its voxel-to-RAS affine."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(array), (2, 1, 0))))
    origin, spacing, direction = ras_affine_to_itk_geometry(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def write_dicom_series(
    folder: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    modality: str = "CT",
    series_description: str = "anatomask phantom",
) -> list[Path]:
    """Write a volume as a DICOM series, one file per slice along the third voxel axis.

    Values are rounded to int16 (CT in HU; rescale slope 1, intercept 0). Slice positions and the
    orientation come from the affine, so any orthonormal orientation (flipped, oblique) is stored.

    Args:
        folder: output folder (created).
        array: (H, W, D) voxels in (i, j, k) order.
        affine: (4, 4) voxel-to-RAS affine without shear.
        modality: DICOM modality, ``"CT"`` or ``"MR"``.
        series_description: DICOM series description.

    Returns:
        the slice files, in slice order.
    """
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = to_sitk(np.round(np.asarray(array)).astype(np.int16), affine)
    direction = volume.GetDirection()
    row_and_column_cosines = (
        direction[0],
        direction[3],
        direction[6],
        direction[1],
        direction[4],
        direction[7],
    )
    study_uid, series_uid = generate_uid(), generate_uid()
    shared_tags = {
        "0008|0016": _CT_SOP_CLASS_UID if modality == "CT" else _MR_SOP_CLASS_UID,
        "0008|0060": modality,
        "0008|103e": series_description,
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{value:.10f}" for value in row_and_column_cosines),
        "0018|0050": f"{volume.GetSpacing()[2]:.6f}",
        "0028|1052": "0",
        "0028|1053": "1",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the UIDs set above instead of fresh ones per slice
    files = []
    for k in range(volume.GetDepth()):
        slice_image = volume[:, :, k]
        for tag, value in shared_tags.items():
            slice_image.SetMetaData(tag, value)
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{value:.6f}" for value in position))
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0008|0018", generate_uid())
        path = folder / f"slice_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_image)
        files.append(path)
    return files


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a (H, W, D) array to the axis order closest to RAS (exact: permutes and flips only)."""
    import nibabel as nib

    orientation = nib.orientations.io_orientation(affine)
    reoriented = nib.orientations.apply_orientation(array, orientation)
    return reoriented, affine @ nib.orientations.inv_ornt_aff(orientation, array.shape)


def align_to_reference(
    prediction: MetaTensor, reference: MetaTensor, case: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bring a prediction and a reference label map onto one voxel grid, exactly.

    The prediction is in its input image's geometry; the reference label file may store the same voxels
    with axes permuted or flipped (e.g. a NIfTI label of a DICOM series). If the two grids differ, both
    are reoriented to RAS, which makes equal grids identical.

    Args:
        prediction: (1, H, W, D) label map with its affine.
        reference: (1, H', W', D') label map with its affine.
        case: named in errors.

    Returns:
        prediction (H, W, D), reference (H, W, D), and their common affine.

    Raises:
        ValueError: the two describe different grids (other spacing, extent or position).
    """
    pred = np.asarray(prediction.detach().cpu())[0]
    ref = np.asarray(reference.detach().cpu())[0]
    pred_affine = np.asarray(prediction.affine, dtype=np.float64)
    ref_affine = np.asarray(reference.affine, dtype=np.float64)
    if pred.shape != ref.shape or not np.allclose(pred_affine, ref_affine, atol=GRID_TOLERANCE_MM):
        pred, pred_affine = _canonical(pred, pred_affine)
        ref, ref_affine = _canonical(ref, ref_affine)
        if pred.shape != ref.shape or not np.allclose(pred_affine, ref_affine, atol=GRID_TOLERANCE_MM):
            raise ValueError(
                f"{case}: the prediction (shape {pred.shape}) and the reference label "
                f"{source_name(reference)} (shape {ref.shape}) are on different voxel grids; the label must "
                "share the image's grid"
            )
    return pred, ref, ref_affine
