"""AnatoMaskReader: every format gives the voxels and the RAS affine nibabel would report."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImaged

from anatomask_components.data.phantoms import make_affine, make_phantom
from anatomask_components.data.readers import AnatoMaskReader, is_dicom_series_dir, read_volume
from anatomask_components.data.validation import canonical_grid
from anatomask_components.data.writers import to_sitk, write_dicom_series, write_volume

# Oblique, anisotropic and with one flipped axis: catches any LPS/RAS or axis-order slip.
OBLIQUE = make_affine(
    (0.8, 1.2, 2.5), flip=(True, False, False), rotation_deg=(10, -20, 30), origin=(10, -20, 30)
)
# DICOM slices always form a right-handed grid (normal = row x column): flip two axes, as LPS storage does.
OBLIQUE_RIGHT_HANDED = make_affine(
    (0.8, 1.2, 2.5), flip=(True, True, False), rotation_deg=(10, -20, 30), origin=(10, -20, 30)
)
SHAPE = (20, 18, 12)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    image, _, _ = make_phantom(SHAPE, num_classes=3, seed=1)
    return np.round(image).astype(np.int16)


def load(path, **reader_args):
    return LoadImaged("image", reader=AnatoMaskReader(**reader_args), ensure_channel_first=True)(
        {"image": str(path)}
    )["image"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_file_formats_round_trip_voxels_affine_and_spacing(tmp_path, volume, suffix):
    path = write_volume(tmp_path / f"scan{suffix}", volume, OBLIQUE)
    loaded = load(path)
    assert tuple(loaded.shape) == (1, *SHAPE)
    np.testing.assert_array_equal(loaded[0].numpy(), volume)
    # NIfTI stores the affine in float32
    np.testing.assert_allclose(loaded.affine.numpy(), OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(loaded.pixdim.numpy(), [0.8, 1.2, 2.5], atol=1e-6)
    assert loaded.meta["space"] == "RAS"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_match_nibabel_on_the_same_volume_saved_as_nifti(tmp_path, volume, suffix):
    image = to_sitk(volume, OBLIQUE)
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))  # ITK converts LPS to the NIfTI RAS affine itself
    nibabel_affine = nib.load(tmp_path / "scan.nii.gz").affine
    array, affine, fmt = read_volume(tmp_path / f"scan{suffix}")
    assert fmt == "itk"
    np.testing.assert_allclose(affine, nibabel_affine, atol=1e-5)
    np.testing.assert_array_equal(array, np.asanyarray(nib.load(tmp_path / "scan.nii.gz").dataobj))


def test_dicom_series_folder_reads_as_one_volume_with_its_geometry(tmp_path, volume):
    files = write_dicom_series(tmp_path / "series", volume, OBLIQUE_RIGHT_HANDED)
    assert len(files) == SHAPE[2] and is_dicom_series_dir(tmp_path / "series")
    loaded = load(tmp_path / "series")
    assert tuple(loaded.shape) == (1, *SHAPE)
    np.testing.assert_array_equal(loaded[0].numpy(), volume)
    # DICOM stores positions as decimal strings (6 decimals here)
    np.testing.assert_allclose(loaded.affine.numpy(), OBLIQUE_RIGHT_HANDED, atol=1e-4)
    assert loaded.meta["format"] == "dicom"

    # and it agrees with nibabel on the NIfTI that ITK writes from the same series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "series.nii.gz"))
    np.testing.assert_allclose(loaded.affine.numpy(), nib.load(tmp_path / "series.nii.gz").affine, atol=1e-4)


def test_left_handed_dicom_grid_comes_back_slice_reversed_but_at_the_same_world_positions(tmp_path, volume):
    # A left-handed voxel grid cannot be stored as DICOM slices: the slice normal is row x column, so readers
    # sort the slices the other way round. The voxels stay where they were in the world.
    left_handed = make_affine((1.0, 1.0, 2.0), flip=(False, False, True), origin=(0.0, 0.0, 40.0))
    write_dicom_series(tmp_path / "series", volume, left_handed)
    array, affine, _ = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(array, volume[:, :, ::-1])
    expected = left_handed.copy()
    expected[:3, 2] *= -1
    expected[:3, 3] = left_handed[:3, :3] @ [0, 0, SHAPE[2] - 1] + left_handed[:3, 3]
    np.testing.assert_allclose(affine, expected, atol=1e-4)
    for ours, theirs in zip(canonical_grid(affine, array.shape), canonical_grid(left_handed, volume.shape)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_list_of_channel_files_is_stacked_channel_first(tmp_path, volume):
    first = write_volume(tmp_path / "ct.nii.gz", volume, OBLIQUE)
    second = write_volume(tmp_path / "pet.nrrd", volume * 2, OBLIQUE)
    loaded = LoadImaged("image", reader=AnatoMaskReader(), ensure_channel_first=True)(
        {"image": [str(first), str(second)]}
    )["image"]
    assert tuple(loaded.shape) == (2, *SHAPE)
    np.testing.assert_array_equal(loaded[0].numpy(), volume)
    np.testing.assert_array_equal(loaded[1].numpy(), volume * 2)
    np.testing.assert_allclose(loaded.affine.numpy(), OBLIQUE, atol=1e-5)


def test_verify_suffix_accepts_supported_files_and_folders(tmp_path):
    reader = AnatoMaskReader()
    assert reader.verify_suffix(["a.nii.gz", "b.NRRD", "c.mha", "d.mhd", "e.nii", str(tmp_path)])
    assert not reader.verify_suffix("notes.txt")
