"""Headers are checked before any voxel is allocated: a header that declares more than the file holds, or
more voxels than the limit, is an InvalidScanError naming the file, which pretraining skips like any bad
scan; running out of memory while reading names the scan and stays a resource error."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomask_components.data import readers
from anatomask_components.data.checks import check_datalist
from anatomask_components.data.datasets import CachedScanDataset
from anatomask_components.data.phantoms import make_affine
from anatomask_components.data.preprocessing import pretrain_transforms
from anatomask_components.data.readers import AnatoMaskReader, read_volume
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.data.writers import write_dicom_series, write_volume

FOUR_KB = np.arange(1024, dtype=np.float32).tobytes()


def lying_nifti(path: Path, shape: tuple[int, ...], payload: bytes = FOUR_KB) -> Path:
    """A NIfTI whose header declares ``shape`` float32 but whose data is only ``payload``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + payload  # 348-byte header, 4 bytes of extension flag
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def test_4000_cubed_header_in_4_kb_is_refused_at_once_without_allocating(tmp_path):
    for name in ("huge.nii", "huge.nii.gz"):
        path = lying_nifti(tmp_path / name, (4000, 4000, 4000))
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(InvalidScanError) as raised:
            read_volume(path)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert raised.value.path == str(path)
        assert raised.value.problem == (
            "header declares 4000 x 4000 x 4000 float32 (64,000,000,000 voxels, 256,000,000,000 bytes), "
            "above the limit of 2,147,483,648 voxels: a wrong header? (raise the limit with "
            "ANATOMASK_MAX_VOXELS if the volume is real)"
        )
        assert seconds < 1.0 and peak < 16 * 2**20  # not 256 GB, not a MemoryError


def test_1000_cubed_header_under_the_limit_is_compared_with_what_the_file_holds(tmp_path):
    declared = "header declares 1000 x 1000 x 1000 float32 (1,000,000,000 voxels, 4,000,000,000 bytes)"
    raw = lying_nifti(tmp_path / "big.nii", (1000, 1000, 1000))
    with pytest.raises(InvalidScanError) as raised:
        read_volume(raw)
    assert raised.value.problem == (
        f"{declared}, but the file holds only 4,096 bytes of voxel data: truncated file or wrong header"
    )
    # gzip: deflate never compresses by more than 1032:1, so a small file is refused from its size alone
    packed = lying_nifti(tmp_path / "big.nii.gz", (1000, 1000, 1000))
    size = packed.stat().st_size
    start = time.perf_counter()
    with pytest.raises(InvalidScanError) as raised:
        read_volume(packed)
    assert time.perf_counter() - start < 1.0
    assert raised.value.problem == (
        f"{declared}, but its {size:,} compressed bytes can hold at most {1032 * size:,}: truncated file "
        "or wrong header"
    )


def test_gzip_nifti_is_counted_by_a_streamed_read_that_stops_at_the_declared_size(tmp_path, monkeypatch):
    # random bytes do not compress, so the ratio bound passes and the decompressed bytes must be counted
    payload = np.random.default_rng(0).random(50_000).astype(np.float32).tobytes()  # 200,000 bytes
    path = lying_nifti(tmp_path / "short.nii.gz", (64, 64, 64), payload)
    with pytest.raises(InvalidScanError) as raised:
        read_volume(path)
    assert raised.value.problem == (
        "header declares 64 x 64 x 64 float32 (262,144 voxels, 1,048,576 bytes), but the file holds only "
        "200,000 bytes of voxel data: truncated file or wrong header"
    )
    # a file holding more than declared is counted only up to the declared size, in bounded pieces
    counted = []
    real = readers._gzip_length
    monkeypatch.setattr(readers, "_GZIP_CHUNK_BYTES", 4096)
    monkeypatch.setattr(readers, "_gzip_length", lambda p, stop: counted.append(real(p, stop)) or counted[-1])
    long = lying_nifti(tmp_path / "long.nii.gz", (10, 10, 10), payload)
    array, _, _ = read_volume(long)
    assert array.shape == (10, 10, 10) and counted == [352 + 4000]


def write_itk(path: Path, volume: np.ndarray, compress: bool = False) -> Path:
    """An ITK file of a (i, j, k) volume, raw unless ``compress`` (write_volume always compresses)."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.transpose(volume)), str(path), compress)
    return path


def lying_itk_header(path: Path, declared: str) -> Path:
    """Replace the declared size of an ITK header (``DimSize`` / ``sizes``) written by write_volume."""
    text = path.read_bytes()
    field = b"DimSize = 12 10 8" if path.suffix in (".mha", ".mhd") else b"sizes: 12 10 8"
    assert field in text
    path.write_bytes(text.replace(field, field.replace(b"12 10 8", declared.encode())))
    return path


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd"])
def test_raw_itk_headers_are_compared_with_the_file_size(tmp_path, suffix):
    volume = np.arange(12 * 10 * 8, dtype=np.int16).reshape(12, 10, 8)
    path = write_itk(tmp_path / f"scan{suffix}", volume)
    lying_itk_header(path, "120 100 80")
    with pytest.raises(InvalidScanError) as raised:
        read_volume(path)
    assert raised.value.path == str(path)
    assert raised.value.problem == (
        "header declares 120 x 100 x 80 16-bit signed integer (960,000 voxels, 1,920,000 bytes), but the "
        "file holds only 1,920 bytes of voxel data: truncated file or wrong header"
    )


def test_detached_data_file_that_is_missing_is_named(tmp_path):
    path = write_itk(tmp_path / "scan.mhd", np.ones((12, 10, 8), np.int16))
    data_files = [p for p in tmp_path.iterdir() if p.name != "scan.mhd"]
    for data in data_files:
        data.unlink()
    with pytest.raises(InvalidScanError, match="the data file named in the header does not exist") as raised:
        read_volume(path)
    assert raised.value.path == str(path) and data_files[0].name in raised.value.problem


def test_compressed_itk_header_is_bounded_by_deflate_and_the_voxel_limit(tmp_path):
    path = write_itk(tmp_path / "scan.mha", np.zeros((12, 10, 8), np.int16), compress=True)
    lying_itk_header(path, "1200 1000 800")
    with pytest.raises(InvalidScanError, match="compressed bytes can hold at most") as raised:
        read_volume(path)
    assert raised.value.problem.startswith("header declares 1200 x 1000 x 800 16-bit signed integer")


def test_voxel_limit_from_the_environment_or_the_reader(tmp_path, monkeypatch):
    path = write_volume(
        tmp_path / "scan.nii.gz", np.arange(1000, dtype=np.float32).reshape(10, 10, 10), np.eye(4)
    )
    assert read_volume(path)[0].shape == (10, 10, 10)
    monkeypatch.setenv("ANATOMASK_MAX_VOXELS", "999")
    with pytest.raises(
        InvalidScanError, match=r"\(1,000 voxels, 4,000 bytes\), above the limit of 999 voxels"
    ):
        read_volume(path)
    assert AnatoMaskReader().max_voxels == 999  # read once, so it is part of the cache key
    assert read_volume(path, max_voxels=1000)[0].shape == (10, 10, 10)
    monkeypatch.setenv("ANATOMASK_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="ANATOMASK_MAX_VOXELS='lots' is not a number of voxels"):
        read_volume(path)


def test_dicom_series_above_the_voxel_limit_names_the_folder(tmp_path):
    folder = tmp_path / "series"
    write_dicom_series(
        folder, np.arange(12 * 10 * 6, dtype=np.int16).reshape(12, 10, 6), make_affine((1, 1, 2))
    )
    with pytest.raises(InvalidScanError) as raised:
        read_volume(folder, max_voxels=500)
    assert raised.value.path == str(folder)
    assert raised.value.problem.startswith("header declares 12 x 10 x 6 16-bit signed integer (720 voxels")


def test_a_lying_header_is_skipped_in_pretraining_and_reported_by_check_data(tmp_path, phantom):
    liar = lying_nifti(tmp_path / "liar.nii.gz", (4000, 4000, 4000))
    items = [{"image": str(phantom.image_path)}, {"image": str(liar)}]
    dataset = CachedScanDataset(
        items, pretrain_transforms(roi_size=(16, 16, 16)), tmp_path / "cache", on_invalid="warn"
    )
    with pytest.warns(
        UserWarning, match=f"skipping invalid scan: {liar}: header declares 4000 x 4000 x 4000"
    ):
        replacement = dataset[1]
    assert replacement["image"].meta["filename_or_obj"] == str(phantom.image_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleaned, errors = check_datalist({"training": items}, on_error="warn", progress=False)
    assert [error.path for error in errors] == [str(liar)] and cleaned["training"] == items[:1]


def test_running_out_of_memory_names_the_scan_and_is_not_skipped(tmp_path, phantom, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(readers, "_read_nifti", no_memory)
    dataset = CachedScanDataset(
        [{"image": str(phantom.image_path)}],
        pretrain_transforms(roi_size=(16, 16, 16)),
        None,
        on_invalid="warn",
    )
    with pytest.raises(Exception) as raised:  # MONAI wraps it in "applying transform ..."
        dataset[0]
    memory_error = raised.value
    while not isinstance(memory_error, readers.ScanMemoryError):
        memory_error = memory_error.__cause__ or memory_error.__context__
    assert str(memory_error) == f"{phantom.image_path}: out of memory while reading the scan (MemoryError)"
    assert readers.is_resource_error(raised.value)  # so the dataset re-raised it instead of skipping
