"""Bad input that libraries let through silently: damaged DICOM series, degenerate affines, conflicting
NIfTI headers, a stray DICOM file among NIfTI files, and resource errors that must not look like bad files."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from anatomask_components.data import readers
from anatomask_components.data.datalists import find_scans, folder_datalist
from anatomask_components.data.phantoms import make_affine, make_phantom
from anatomask_components.data.preprocessing import deterministic_transforms
from anatomask_components.data.readers import is_dicom_series_dir, is_resource_error, read_volume
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.data.writers import write_dicom_series, write_volume

SHAPE = (16, 16, 12)
# Right-handed (LPS storage), as DICOM slices always are: 1 x 1 mm pixels, 2 mm apart.
SERIES_AFFINE = make_affine((1.0, 1.0, 2.0), flip=(True, True, False), origin=(10.0, -5.0, 30.0))


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    image, _, _ = make_phantom(SHAPE, num_classes=3, seed=2)
    return np.round(image).astype(np.int16)


def image_pipeline():
    return deterministic_transforms(spacing=None)


def write_series(folder: Path, volume: np.ndarray) -> list[Path]:
    return write_dicom_series(folder, volume, SERIES_AFFINE)


def write_nifti_header(
    path: Path,
    sform: np.ndarray,
    pixdim=(1.0, 1.0, 1.0),
    qform: np.ndarray | None = None,
    shape=(8, 8, 6),
) -> Path:
    """A NIfTI whose sform (code 1), qform and pixdim are set independently (nibabel keeps them in step)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["pixdim"][1:4] = pixdim
    header["srow_x"], header["srow_y"], header["srow_z"] = np.asarray(sform, dtype=np.float32)[:3]
    header["sform_code"] = 1
    if qform is not None:
        header.set_qform(qform, code=1)  # also sets pixdim from the qform's zooms
        header["pixdim"][1:4] = pixdim
    else:
        header["qform_code"] = 0
    voxels = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # not constant: that is invalid
    nib.save(nib.Nifti1Image(voxels, None, header), path)
    return path


def write_non_image_dicom(path: Path) -> Path:
    """A DICOM object without pixels (an RT structure set), which GDCM leaves out of every series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "RTSTRUCT"
    dataset.SeriesInstanceUID = generate_uid()
    dataset.save_as(path, enforce_file_format=True)
    return path


# 1. DICOM series with a damaged, missing or duplicated slice


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_dicom_series_with_an_unreadable_slice_names_the_slice(tmp_path, volume, expect_invalid, damage):
    folder = tmp_path / "series"
    files = write_series(folder, volume)
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(InvalidScanError) as raised:
        read_volume(folder)
    assert raised.value.path == str(folder)
    assert "not part of any readable DICOM series" in raised.value.problem
    assert "slice_0005.dcm" in raised.value.problem
    assert ("slice_0005.dcm (0 bytes)" in raised.value.problem) == (damage == "empty")
    # the same error through the MONAI pipeline
    error = expect_invalid(image_pipeline(), {"image": str(folder)})
    assert error.path == str(folder) and "slice_0005.dcm" in error.problem


def test_dicom_series_with_an_empty_file_without_suffix_names_it(tmp_path, volume):
    folder = tmp_path / "series"
    write_series(folder, volume)
    (folder / "IM000099").write_bytes(b"")
    with pytest.raises(InvalidScanError, match=r"IM000099 \(0 bytes\)"):
        read_volume(folder)


def test_dicom_series_with_a_missing_slice_names_the_gap(tmp_path, volume, expect_invalid):
    folder = tmp_path / "series"
    files = write_series(folder, volume)
    files[5].unlink()
    with pytest.raises(InvalidScanError) as raised:
        read_volume(folder)
    problem = raised.value.problem
    assert raised.value.path == str(folder)
    assert (
        "not evenly spaced" in problem and "gap of 4.00 mm" in problem and "median gap is 2.00 mm" in problem
    )
    # the slices on either side of the hole, with their positions along the slice normal (z = 30 + 2 k)
    assert "slice_0004.dcm at 38.00 mm" in problem and "slice_0006.dcm at 42.00 mm" in problem
    error = expect_invalid(image_pipeline(), {"image": str(folder)})
    assert error.path == str(folder) and "gap of 4.00 mm" in error.problem


def test_dicom_series_with_a_duplicated_slice_is_rejected(tmp_path, volume):
    folder = tmp_path / "series"
    files = write_series(folder, volume)
    duplicate = pydicom.dcmread(files[3])
    duplicate.SOPInstanceUID = generate_uid()
    duplicate.save_as(folder / "slice_0003_again.dcm")
    with pytest.raises(InvalidScanError, match="share one position") as raised:
        read_volume(folder)
    assert raised.value.path == str(folder) and "slice_0003_again.dcm" in raised.value.problem


def test_dicom_series_still_reads_next_to_files_that_are_no_slices(tmp_path, volume):
    folder = tmp_path / "series"
    write_series(folder, volume)
    (folder / "notes.txt").write_text("acquired 2024")
    (folder / "README").write_text("exported by PACS\n")
    (folder / "DICOMDIR").write_bytes(b"\0" * 200)
    (folder / ".hidden").write_bytes(b"")
    write_non_image_dicom(folder / "RS.structures.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning either
        array, affine, fmt = read_volume(folder)
    assert fmt == "dicom" and array.shape == SHAPE
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(affine, SERIES_AFFINE, atol=1e-4)


# 2. Affines that describe no voxel grid


DEGENERATE_AFFINES = {
    "zero spacing": (np.diag([0.0, 1.0, 1.0, 1.0]), "zero voxel size (0 x 1 x 1 mm)"),
    "singular": (
        np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
        "singular affine",
    ),
    "all zero": (np.zeros((4, 4)), "affine is all zero"),
    "NaN": (np.diag([np.nan, 1.0, 1.0, 1.0]), "affine holds NaN or infinite values"),
    "inf": (
        np.array([[1.0, 0, 0, np.inf], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
        "affine holds NaN or infinite values",
    ),
}


@pytest.mark.parametrize("case", list(DEGENERATE_AFFINES))
def test_nifti_with_a_degenerate_affine_is_an_invalid_scan(tmp_path, expect_invalid, case):
    sform, problem = DEGENERATE_AFFINES[case]
    path = write_nifti_header(tmp_path / "scan.nii.gz", sform)
    with pytest.raises(InvalidScanError) as raised:
        read_volume(path)
    assert raised.value.path == str(path) and raised.value.problem.startswith(problem)
    # before Orientationd, which would fail with a RuntimeError naming no file (or accept NaN)
    error = expect_invalid(image_pipeline(), {"image": str(path)})
    assert error.path == str(path) and error.problem.startswith(problem)


@pytest.mark.parametrize(
    ("field", "value"), [("ElementSpacing", "0 1 1"), ("TransformMatrix", "1 0 0 1 0 0 0 0 1")]
)
def test_metaimage_with_a_degenerate_affine_is_an_invalid_scan(tmp_path, field, value):
    path = write_volume(tmp_path / "scan.mha", np.zeros((8, 8, 6), np.int16), np.eye(4))
    lines = path.read_bytes().split(b"\n")
    lines = [f"{field} = {value}".encode() if line.startswith(field.encode()) else line for line in lines]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(InvalidScanError) as raised:
        read_volume(path)
    assert raised.value.path == str(path)


# 3. NIfTI sform against qform and pixdim


def test_nifti_sform_is_used_over_a_disagreeing_pixdim_with_a_warning(tmp_path):
    path = write_nifti_header(tmp_path / "scan.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0]), pixdim=(1.0, 1.0, 1.0))
    with pytest.warns(UserWarning, match="pixdim says 1 x 1 x 1 mm") as caught:
        _, affine, _ = read_volume(path)
    assert len(caught) == 1
    assert str(caught[0].message).startswith(f"{path}: NIfTI sform (code 1, voxel size 2 x 2 x 2 mm)")
    np.testing.assert_allclose(affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    # and the pipeline sees 2 mm voxels
    with pytest.warns(UserWarning, match="pixdim"):
        loaded = image_pipeline()({"image": str(path)})["image"]
    np.testing.assert_allclose(loaded.pixdim.numpy(), [2.0, 2.0, 2.0])


def test_nifti_sform_is_used_over_a_disagreeing_qform_with_a_warning(tmp_path):
    # the qform's voxel size is the pixdim; here it is shifted by 20 mm and rotated by 90 degrees
    sform = make_affine((2.0, 2.0, 3.0), origin=(5.0, 6.0, 7.0))
    qform = make_affine((2.0, 2.0, 3.0), rotation_deg=(0, 0, 90), origin=(25.0, 6.0, 7.0))
    path = write_nifti_header(tmp_path / "scan.nii.gz", sform, pixdim=(2.0, 2.0, 3.0), qform=qform)
    with pytest.warns(UserWarning, match="qform") as caught:
        _, affine, _ = read_volume(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{path}: NIfTI sform") and "describes another grid" in message
    assert "pixdim" not in message
    np.testing.assert_allclose(affine, sform, atol=1e-5)


def test_consistent_nifti_header_gives_no_warning(tmp_path):
    affine = make_affine(
        (0.8, 1.2, 2.5), flip=(True, False, True), rotation_deg=(5, -10, 20), origin=(1, 2, 3)
    )
    path = write_volume(tmp_path / "scan.nii.gz", np.zeros((8, 8, 6), np.float32), affine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, read_affine, _ = read_volume(path)
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)


# 4. A stray DICOM file among NIfTI files


def test_stray_dicom_file_among_nifti_files_does_not_hide_them(tmp_path, volume):
    folder = tmp_path / "scans"
    for name in ("a.nii.gz", "b.nii.gz"):
        write_volume(folder / name, np.zeros((8, 8, 6), np.float32), np.eye(4))
    stray = write_series(tmp_path / "elsewhere", volume)[0]
    shutil.copy(stray, folder / "stray.dcm")
    shutil.copy(stray, folder / "IM0001")  # DICOM by its preamble, no suffix
    assert not is_dicom_series_dir(folder)
    with pytest.warns(UserWarning, match="not read as one DICOM series") as caught:
        scans, skipped = find_scans(tmp_path)
    assert [str(w.message).split(":")[0] for w in caught] == [str(folder)]
    assert scans == sorted(
        [
            str(folder / "IM0001"),
            str(folder / "a.nii.gz"),
            str(folder / "b.nii.gz"),
            str(folder / "stray.dcm"),
        ]
        + [str(tmp_path / "elsewhere")]
    )
    assert skipped == []
    # each stray file is a scan of its own, read as DICOM (one slice: rejected as 2D, not as an unknown type)
    for path in (folder / "stray.dcm", folder / "IM0001"):
        with pytest.raises(InvalidScanError, match="2D image"):
            read_volume(path)


def test_stray_dicom_file_in_inference_items_and_datalists(tmp_path, volume):
    from anatomask_components.data.datalists import inference_items

    folder = tmp_path / "scans"
    write_volume(folder / "a.nii.gz", np.zeros((8, 8, 6), np.float32), np.eye(4))
    shutil.copy(write_series(tmp_path / "series", volume)[0], folder / "stray.dcm")
    with pytest.warns(UserWarning, match="not read as one DICOM series"):
        items = inference_items(folder)
    assert sorted(item["image"] for item in items) == [str(folder / "a.nii.gz"), str(folder / "stray.dcm")]
    with pytest.warns(UserWarning, match="not read as one DICOM series"):
        datalist = folder_datalist(folder, fractions=(1, 0, 0))
    assert len(datalist["training"]) == 2
    # a pure series folder is still one scan, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [item["image"] for item in inference_items(tmp_path / "series")] == [str(tmp_path / "series")]


# 5. Resource errors propagate; broken files stay invalid scans

RESOURCE_ERRORS = [
    MemoryError("cannot allocate 2 GB"),
    *(OSError(code, "resource") for code in (errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOSPC)),
    OSError(errno.EAGAIN, "try again"),
    OSError(errno.ETIMEDOUT, "network mount timed out"),
]


@pytest.mark.parametrize(
    "error", RESOURCE_ERRORS, ids=lambda e: f"{type(e).__name__}-{getattr(e, 'errno', '')}"
)
def test_resource_errors_propagate_unchanged(tmp_path, monkeypatch, error):
    path = write_volume(tmp_path / "scan.nii.gz", np.zeros((8, 8, 6), np.float32), np.eye(4))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(readers, "_read_nifti", fail)
    with pytest.raises(type(error)) as raised:
        read_volume(path)
    if isinstance(error, MemoryError):
        # re-raised naming the scan, still a resource error (never skipped as a bad scan)
        assert isinstance(raised.value, readers.ScanMemoryError) and raised.value.__cause__ is error
        assert str(raised.value) == f"{path}: out of memory while reading the scan (cannot allocate 2 GB)"
        assert is_resource_error(raised.value)
    else:
        assert raised.value is error


def test_resource_error_from_nibabel_and_itk_propagates(tmp_path, monkeypatch):
    nifti = write_volume(tmp_path / "scan.nii.gz", np.zeros((8, 8, 6), np.float32), np.eye(4))
    too_many = OSError(errno.EMFILE, "Too many open files", str(nifti))
    monkeypatch.setattr(nib, "load", lambda *args, **kwargs: (_ for _ in ()).throw(too_many))
    with pytest.raises(OSError) as raised:
        read_volume(nifti)
    assert raised.value is too_many

    # ITK reports system errors as RuntimeError text only
    import SimpleITK as sitk

    mha = write_volume(tmp_path / "scan.mha", np.zeros((8, 8, 6), np.int16), np.eye(4))
    itk_error = RuntimeError(f"Cannot open file {mha} for reading. Reason: {os.strerror(errno.EMFILE)}")
    monkeypatch.setattr(
        sitk.ImageFileReader, "Execute", lambda *args, **kwargs: (_ for _ in ()).throw(itk_error)
    )
    with pytest.raises(RuntimeError) as raised_itk:
        read_volume(mha)
    assert raised_itk.value is itk_error


@pytest.mark.parametrize("damage", ["truncated gzip", "not gzip"])
def test_broken_gzip_is_still_an_invalid_scan(tmp_path, damage):
    path = write_volume(
        tmp_path / "scan.nii.gz",
        np.random.default_rng(0).normal(size=(24, 24, 16)).astype(np.float32),
        np.eye(4),
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated gzip" else b"plain bytes, no gzip" * 40)
    # a truncated stream is caught by counting its voxel bytes against the header, before reading
    problem = "but the file holds only" if damage == "truncated gzip" else "cannot be read"
    with pytest.raises(InvalidScanError, match=problem) as raised:
        read_volume(path)
    assert raised.value.path == str(path)


def test_is_resource_error_tells_resources_from_broken_files():
    assert is_resource_error(MemoryError())
    assert is_resource_error(OSError(errno.EMFILE, "Too many open files"))
    wrapped = RuntimeError("applying transform")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert is_resource_error(wrapped)
    assert not is_resource_error(gzip.BadGzipFile("Not a gzipped file"))  # an OSError with errno None
    assert not is_resource_error(OSError(errno.ENOENT, "No such file"))
    assert not is_resource_error(EOFError("Compressed file ended before the end-of-stream marker"))
    assert not is_resource_error(RuntimeError("ITK ERROR: Zero-valued spacing is not supported"))
