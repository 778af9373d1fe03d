"""Bad input: one clear InvalidScanError naming the file and the problem, or a warning and a skip."""

from __future__ import annotations

import gzip
import warnings
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomask_components.data.checks import check_datalist
from anatomask_components.data.datalists import folder_datalist
from anatomask_components.data.datasets import CachedScanDataset
from anatomask_components.data.normalization import normalize_channel
from anatomask_components.data.phantoms import make_affine
from anatomask_components.data.preprocessing import deterministic_transforms, pretrain_transforms
from anatomask_components.data.readers import read_volume
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.data.writers import write_dicom_series, write_volume

AFFINE = make_affine((1.5, 1.5, 1.5))


def image_pipeline():
    return deterministic_transforms(spacing=None)


def labelled_pipeline(num_classes=None):
    return deterministic_transforms(label_key="label", spacing=None, num_classes=num_classes)


def test_missing_file(tmp_path, expect_invalid):
    missing = tmp_path / "nope.nii.gz"
    error = expect_invalid(image_pipeline(), {"image": str(missing)})
    assert error.path == str(missing) and error.problem == "file does not exist"


def test_corrupt_file(tmp_path, expect_invalid):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    error = expect_invalid(image_pipeline(), {"image": str(path)})
    assert error.path == str(path) and error.problem.startswith("cannot be read")


def test_corrupt_nrrd_file(tmp_path):
    path = tmp_path / "corrupt.nrrd"
    path.write_text("NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(InvalidScanError, match="corrupt.nrrd: cannot be read"):
        read_volume(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path, expect_invalid, suffix):
    path = write_volume(
        tmp_path / f"scan{suffix}", np.random.default_rng(0).normal(size=(32, 32, 32)), AFFINE
    )
    data = path.read_bytes()
    offset = int(nib.load(path).dataobj.offset)
    path.write_bytes(data[: len(data) // 2])
    error = expect_invalid(image_pipeline(), {"image": str(path)})
    # caught from the header, before the 256 KiB are allocated, with what the file holds instead
    declared = "header declares 32 x 32 x 32 float64 (32,768 voxels, 262,144 bytes), but the file holds only "
    assert error.path == str(path) and error.problem.startswith(declared)
    held = int(error.problem[len(declared) :].split(" bytes")[0].replace(",", ""))
    if suffix == ".nii":
        assert held == len(data) // 2 - offset
    else:
        assert (
            0 < held < 262_144
            and held == len(zlib.decompressobj(31).decompress(data[: len(data) // 2])) - offset
        )


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 1)])
def test_2d_image(tmp_path, expect_invalid, shape):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    error = expect_invalid(image_pipeline(), {"image": str(path)})
    assert error.path == str(path) and error.problem.startswith(f"2D image (shape {shape})")


def test_4d_image_where_3d_is_expected(tmp_path, expect_invalid):
    path = write_volume(tmp_path / "dynamic.nii.gz", np.zeros((8, 8, 8, 3), np.float32), AFFINE)
    error = expect_invalid(image_pipeline(), {"image": str(path)})
    assert error.path == str(path) and error.problem.startswith("4D image (shape (8, 8, 8, 3)) where a 3D")


def test_4d_image_is_accepted_as_channels_when_asked_and_singleton_4th_axis_is_dropped(tmp_path):
    volumes = np.arange(8 * 8 * 8 * 3, dtype=np.float32).reshape(8, 8, 8, 3)
    path = write_volume(tmp_path / "msd.nii.gz", volumes, AFFINE)
    loaded = deterministic_transforms(spacing=None, image_channel_dim=-1, normalization="none")(
        {"image": str(path), "modality": ["MR", "MR", "MR"]}
    )["image"]
    assert tuple(loaded.shape) == (3, 8, 8, 8)
    expected = [(v - v.mean()) / v.std() for v in np.moveaxis(volumes, -1, 0)]  # MR channels: z-score
    np.testing.assert_allclose(loaded.numpy(), np.stack(expected), atol=1e-5)
    single = write_volume(tmp_path / "single.nii.gz", volumes[..., :1], AFFINE)
    assert read_volume(single)[0].shape == (8, 8, 8)


def test_label_grid_with_other_shape(tmp_path, expect_invalid, phantom):
    label_path = write_volume(tmp_path / "small_label.nii.gz", phantom.label[:-2], phantom.affine)
    item = {"image": str(phantom.image_path), "label": str(label_path)}
    error = expect_invalid(labelled_pipeline(), item)
    assert error.path == str(label_path)
    assert error.problem.startswith(
        f"label grid does not match image {phantom.image_path}: shape (26, 24, 16)"
    )


def test_label_grid_with_other_affine(tmp_path, expect_invalid, phantom):
    shifted = phantom.affine.copy()
    shifted[0, 3] += 5.0
    label_path = write_volume(tmp_path / "shifted_label.nii.gz", phantom.label, shifted)
    error = expect_invalid(labelled_pipeline(), {"image": str(phantom.image_path), "label": str(label_path)})
    assert error.path == str(label_path) and "label grid does not match image" in error.problem
    assert "affine" in error.problem


def test_label_stored_with_other_axis_order_but_same_grid_is_accepted_and_aligned(tmp_path, phantom):
    # the same voxels stored with the y axis reversed (what TotalSegmentator does with DICOM input)
    flipped_affine = phantom.affine.copy()
    flipped_affine[:3, 3] = (
        phantom.affine[:3, :3] @ [0, phantom.label.shape[1] - 1, 0] + phantom.affine[:3, 3]
    )
    flipped_affine[:3, 1] *= -1
    label_path = write_volume(tmp_path / "las_label.nii.gz", phantom.label[:, ::-1, :], flipped_affine)
    reference = labelled_pipeline()(phantom.item())
    out = labelled_pipeline()({"image": str(phantom.image_path), "label": str(label_path)})
    torch.testing.assert_close(out["label"].as_tensor(), reference["label"].as_tensor())
    np.testing.assert_allclose(out["label"].affine.numpy(), reference["image"].affine.numpy(), atol=1e-5)


def test_label_values_outside_the_label_set(tmp_path, expect_invalid, phantom):
    label = phantom.label.copy()
    label[0, 0, 0] = 7
    label_path = write_volume(tmp_path / "bad_label.nii.gz", label, phantom.affine)
    error = expect_invalid(
        labelled_pipeline(num_classes=4), {"image": str(phantom.image_path), "label": str(label_path)}
    )
    assert error.path == str(label_path) and error.problem == "label values outside the label set 0..3: 7"


def test_non_integer_label_values(tmp_path, expect_invalid, phantom):
    label = phantom.label.astype(np.float32)
    label[1, 1, 1] = 0.5
    label_path = write_volume(tmp_path / "soft_label.nii.gz", label, phantom.affine)
    error = expect_invalid(
        labelled_pipeline(num_classes=4), {"image": str(phantom.image_path), "label": str(label_path)}
    )
    assert error.problem == "label values outside the label set 0..3: 0.5"


def test_nan_and_inf_voxels(tmp_path, expect_invalid, phantom):
    image = phantom.image.copy()
    image[0, 0, :2] = np.nan
    image[1, 1, 1] = np.inf
    path = write_volume(tmp_path / "nan.nii.gz", image, phantom.affine)
    error = expect_invalid(image_pipeline(), {"image": str(path)})
    assert error.path == str(path) and error.problem == "2 NaN and 1 infinite voxels"


def test_constant_volume_is_an_invalid_scan_and_would_normalise_to_zeros_not_nan(tmp_path, expect_invalid):
    path = write_volume(tmp_path / "constant.nii.gz", np.full((20, 20, 20), 42.0, np.float32), AFFINE)
    error = expect_invalid(pretrain_transforms(roi_size=(16, 16, 16)), {"image": str(path)})
    assert error.path == str(path) and error.problem == "constant volume: every voxel is 42"
    # were it let through, the z-score would give zeros, not NaN
    assert torch.equal(normalize_channel(torch.full((4, 4, 4), 42.0), "zscore"), torch.zeros(4, 4, 4))


def test_volume_smaller_than_the_crop_is_padded(tmp_path):
    volume = np.random.default_rng(3).normal(100.0, 20.0, size=(20, 18, 12)).astype(np.float32)
    path = write_volume(tmp_path / "small.nii.gz", volume, AFFINE)
    out = pretrain_transforms(roi_size=(32, 32, 32), flip_prob=0.0)({"image": str(path)})["image"]
    normalised = (volume - volume.mean(dtype=np.float64)) / volume.std(dtype=np.float64)
    expected = np.pad(normalised, ((6, 6), (7, 7), (10, 10)))  # centred, zeros outside
    assert tuple(out.shape) == (1, 32, 32, 32)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidScanError, match="empty: no scans found"):
        folder_datalist(tmp_path / "empty")
    with pytest.raises(InvalidScanError, match="empty: folder holds no DICOM series"):
        read_volume(tmp_path / "empty")


def test_non_image_files_in_a_folder_are_skipped_with_a_warning(tmp_path):
    write_volume(tmp_path / "a.nii.gz", np.zeros((8, 8, 8), np.float32), AFFINE)
    write_dicom_series(tmp_path / "b_dicom", np.zeros((8, 8, 4)), AFFINE)
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "table.csv").write_text("id\n1\n")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="skipped 2 non-image file") as caught:
        datalist = folder_datalist(tmp_path, fractions=(1, 0, 0))
    message = str(caught[0].message)
    assert "notes.txt" in message and "table.csv" in message and ".DS_Store" not in message
    assert [item["image"] for item in datalist["training"]] == [
        str(tmp_path / "a.nii.gz"),
        str(tmp_path / "b_dicom"),
    ]


def test_non_image_file_given_as_a_scan(tmp_path, expect_invalid):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    error = expect_invalid(image_pipeline(), {"image": str(path)})
    assert error.path == str(path) and error.problem.startswith("unsupported file type")


def _bad_and_good_items(tmp_path, phantom):
    image = phantom.image.copy()
    image[2, 2, 2] = np.nan
    bad = write_volume(tmp_path / "nan.nii.gz", image, phantom.affine)
    return [{"image": str(phantom.image_path)}, {"image": str(bad)}, {"image": str(phantom.image_path)}], bad


def test_pretraining_dataset_skips_bad_scans_with_one_warning(tmp_path, phantom):
    items, bad = _bad_and_good_items(tmp_path, phantom)
    dataset = CachedScanDataset(
        items, pretrain_transforms(roi_size=(16, 16, 16)), tmp_path / "cache", on_invalid="warn"
    )
    with pytest.warns(UserWarning, match=f"skipping invalid scan: {bad}: 1 NaN and 0 infinite voxels"):
        replacement = dataset[1]
    assert tuple(replacement["image"].shape) == (1, 16, 16, 16)
    assert replacement["image"].meta["filename_or_obj"] == str(phantom.image_path)
    assert len(list((tmp_path / "cache").glob("*.invalid"))) == 1
    # a fresh dataset (another epoch or worker) skips it from the marker without reading the file again
    again = CachedScanDataset(
        items, pretrain_transforms(roi_size=(16, 16, 16)), tmp_path / "cache", on_invalid="warn"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert again[1]["image"].meta["filename_or_obj"] == str(phantom.image_path)
    assert any("skipping invalid scan" in str(w.message) for w in caught)


def test_finetuning_dataset_raises_the_invalid_scan_error_itself(tmp_path, phantom):
    items, bad = _bad_and_good_items(tmp_path, phantom)
    dataset = CachedScanDataset(items, pretrain_transforms(roi_size=(16, 16, 16)), None)
    with pytest.raises(InvalidScanError, match=f"{bad}: 1 NaN"):
        dataset[1]


def test_check_datalist_reports_and_drops_bad_items(tmp_path, phantom):
    items, bad = _bad_and_good_items(tmp_path, phantom)
    with pytest.warns(UserWarning) as caught:
        cleaned, errors = check_datalist({"training": items}, on_error="warn", progress=False)
    assert [e.path for e in errors] == [str(bad)]
    # items 0 and 2 are the same scan: checked and kept once, with one warning
    assert cleaned["training"] == [items[0]]
    messages = [str(w.message) for w in caught]
    duplicates = "datalist (training): 1 duplicate item(s) dropped, each scan is used once"
    assert f"{duplicates}: {phantom.image_path} (2 times)" in messages
    assert sum(m.startswith("skipping invalid item") for m in messages) == 1
    with pytest.raises(InvalidScanError, match="1 NaN"):
        check_datalist({"training": items}, progress=False)
