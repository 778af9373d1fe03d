"""Inputs that read fine but are wrong in meaning: an error or a warning that names the file.

Modality the model was not built for, integer "CT" that cannot be in HU, extreme anisotropy and scans
smaller than the window, constant volumes, repeated datalist items, dangling links, broken datalist JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from anatomask_components.data.checks import check_datalist, load_datalist
from anatomask_components.data.datalists import datalist_section, folder_datalist, load_datalist_section
from anatomask_components.data.datasets import CachedScanDataset
from anatomask_components.data.phantoms import make_affine, make_phantom
from anatomask_components.data.preprocessing import (
    deterministic_transforms,
    finetune_val_transforms,
    pretrain_transforms,
)
from anatomask_components.data.validation import canonical_modality
from anatomask_components.data.writers import write_dicom_series, write_volume

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def ct_volume(shape=(20, 18, 12), seed: int = 0) -> np.ndarray:
    image, _, _ = make_phantom(shape, num_classes=3, seed=seed)
    return image  # float32 HU, air about -1000


def recorded(call, folder: Path) -> list[str]:
    """The warnings ``call`` gives about files under ``folder`` (MONAI warns about its codecs as well)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if str(w.message).startswith(str(folder))]


# Modality


def test_mr_item_is_refused_by_a_ct_only_pipeline_naming_file_and_source(tmp_path, expect_invalid):
    path = write_volume(tmp_path / "mr.nii.gz", ct_volume(), make_affine((1.5, 1.5, 1.5)))
    flare22 = finetune_val_transforms(spacing=None, label_key=None, accepted_modalities=["CT"])
    error = expect_invalid(flare22, {"image": str(path), "modality": "MR"})
    assert error.path == str(path)
    assert error.problem == (
        "modality MR (from the datalist field 'modality') is not one this model was built for (accepted: CT)"
    )
    # AMOS22 accepts both; without an accepted list nothing is refused
    amos22 = finetune_val_transforms(spacing=None, label_key=None, accepted_modalities=["CT", "MR"])
    assert amos22({"image": str(path), "modality": "MR"})["image"].shape == (1, 20, 18, 12)
    assert (
        deterministic_transforms(spacing=None)({"image": str(path), "modality": "MR"})["image"].shape[0] == 1
    )


def test_dicom_modality_tag_is_checked_and_each_channel_of_an_item(tmp_path, expect_invalid):
    folder = tmp_path / "mr_series"
    write_dicom_series(
        folder, np.round(ct_volume()).astype(np.int16), make_affine((1.0, 1.0, 2.0)), modality="MR"
    )
    error = expect_invalid(
        deterministic_transforms(spacing=None, accepted_modalities=["CT"]), {"image": str(folder)}
    )
    assert error.path == str(folder)
    assert error.problem == (
        "modality MR (from the DICOM Modality tag) is not one this model was built for (accepted: CT)"
    )
    ct = tmp_path / "ct.nii.gz"
    write_volume(ct, ct_volume(), make_affine((1.5, 1.5, 1.5)))
    autopet = deterministic_transforms(spacing=None, accepted_modalities=["CT", "PET"], normalization="none")
    item = {"image": [str(ct), str(ct)], "modality": ["CT", "PET"]}
    assert autopet(item)["image"].shape[0] == 2
    assert canonical_modality("pt") == "PET"  # DICOM's name for PET
    error = expect_invalid(autopet, {"image": [str(ct), str(ct)], "modality": ["CT", "MR"]})
    assert error.problem.startswith("modality MR of channel 1 (from the datalist field 'modality')")


def test_pretraining_skips_a_scan_of_another_modality_with_a_warning(tmp_path):
    affine = make_affine((1.5, 1.5, 1.5))
    ct = write_volume(tmp_path / "ct.nii.gz", ct_volume(), affine)
    mr = write_volume(tmp_path / "mr.nii.gz", ct_volume(seed=1), affine)
    items = [{"image": str(ct), "modality": "CT"}, {"image": str(mr), "modality": "MR"}]
    transform = pretrain_transforms(roi_size=(16, 16, 12), accepted_modalities=["CT"])
    dataset = CachedScanDataset(items, transform, None, on_invalid="warn")
    with pytest.warns(UserWarning, match=f"skipping invalid scan: {mr}: modality MR"):
        assert dataset[1]["image"].meta["filename_or_obj"] == str(ct)


# Integer and boolean "CT"


@pytest.mark.parametrize(
    "dtype, values, expected",
    [
        (np.uint8, (0, 255), "uint8 voxels in 0..255"),
        (np.int8, (-5, 100), "int8 voxels in -5..100"),
        (np.uint8, (0, 1), "uint8 voxels in 0..1"),
        (np.int16, (0, 200), "int16 voxels in 0..200"),
    ],
)
def test_integer_ct_whose_values_cannot_be_hounsfield_units_warns(tmp_path, dtype, values, expected):
    volume = np.zeros((12, 12, 8), dtype)
    volume[:6] = values[0]
    volume[6:] = values[1]
    path = write_volume(tmp_path / "scan.nii.gz", volume, make_affine((1.5, 1.5, 1.5)))
    messages = recorded(lambda: deterministic_transforms(spacing=None)({"image": str(path)}), tmp_path)
    assert messages == [
        f"{path}: {expected} cannot be CT in Hounsfield units (air is about -1000 HU): a mask, an 8-bit "
        "export, or not CT? It is normalised as CT all the same"
    ]
    # the same file declared MR is not CT, so nothing to say
    assert (
        recorded(
            lambda: deterministic_transforms(spacing=None)({"image": str(path), "modality": "MR"}), tmp_path
        )
        == []
    )


def test_real_integer_ct_in_hu_gives_no_warning(tmp_path):
    volume = np.round(ct_volume()).astype(np.int16)
    assert volume.min() < -500
    path = write_volume(tmp_path / "ct.nii.gz", volume, make_affine((1.5, 1.5, 1.5)))
    assert recorded(lambda: deterministic_transforms(spacing=None)({"image": str(path)}), tmp_path) == []


# Anisotropy and scans smaller than the window


def test_five_slices_at_10_mm_warn_about_interpolation_and_the_window(tmp_path):
    path = write_volume(tmp_path / "thick.nii.gz", ct_volume((40, 40, 5)), make_affine((0.8, 0.8, 10.0)))
    transform = pretrain_transforms(roi_size=(32, 32, 32), spacing=(1.5, 1.5, 1.5))
    messages = recorded(lambda: transform({"image": str(path)}), tmp_path)
    assert messages == [
        f"{path}: voxel size 0.8 x 0.8 x 10 mm: the z (inferior-superior) axis is 12.5 times coarser than "
        "the finest; resampling to 1.5 mm interpolates it 6.7x",
        f"{path}: resampled to 1.5 x 1.5 x 1.5 mm, the scan has 21 voxels along x (left-right) where the "
        "window needs 32; 21 voxels along y (posterior-anterior) where the window needs 32; the rest of "
        "every window is zero padding",
    ]
    # z: 5 x 10 mm = 50 mm = 33 slices at 1.5 mm, enough for the window; 4x anisotropy says nothing
    moderate = write_volume(
        tmp_path / "moderate.nii.gz", ct_volume((24, 24, 12)), make_affine((1.0, 1.0, 4.0))
    )
    assert (
        recorded(lambda: pretrain_transforms(roi_size=(16, 16, 32))({"image": str(moderate)}), tmp_path) == []
    )


# Constant volumes


def test_constant_volume_is_skipped_in_pretraining_and_an_error_in_fine_tuning(tmp_path, phantom):
    constant = write_volume(tmp_path / "blank.nii.gz", np.full((20, 20, 12), -1024, np.int16), phantom.affine)
    items = [{"image": str(constant)}, {"image": str(phantom.image_path)}]
    transform = pretrain_transforms(roi_size=(16, 16, 12))
    with pytest.warns(
        UserWarning, match=f"skipping invalid scan: {constant}: constant volume: every voxel is -1024"
    ):
        sample = CachedScanDataset(items, transform, None, on_invalid="warn")[0]
    assert sample["image"].meta["filename_or_obj"] == str(phantom.image_path)
    with pytest.raises(ValueError, match=f"{constant}: constant volume: every voxel is -1024"):
        CachedScanDataset(items, transform, None, on_invalid="raise")[0]


# Duplicates


def test_a_scan_listed_three_times_is_warned_once_and_counted_once(tmp_path, phantom, monkeypatch):
    item = {"image": str(phantom.image_path), "label": str(phantom.label_path)}
    other = tmp_path / "other.nii.gz"
    write_volume(other, ct_volume(), make_affine((1.5, 1.5, 1.5)))
    relative = os.path.relpath(phantom.image_path, tmp_path)  # the same file, spelled another way
    path = tmp_path / "datalist.json"
    same = {"image": relative, "label": item["label"]}
    content = {"training": [item, {"image": str(other)}, item, same]}
    path.write_text(json.dumps(content))
    expected = f"{path} (training): 2 duplicate item(s) dropped, each scan is used once"
    expected = f"{expected}: {phantom.image_path} (3 times)"
    # the bundles' loader (relative paths resolved from the file's folder)
    with pytest.warns(UserWarning) as caught:
        items = datalist_section(path, "training", require_labels=False)
    assert [str(w.message) for w in caught] == [expected]
    assert [i["image"] for i in items] == [str(phantom.image_path), str(other)]
    # check-data and the fingerprint
    monkeypatch.chdir(tmp_path)  # check-data reads paths as given, relative to the working directory
    with pytest.warns(UserWarning) as caught:
        datalist, _ = load_datalist(path)
    assert [str(w.message) for w in caught] == [expected] and len(datalist["training"]) == 2
    cleaned, errors = check_datalist(datalist, progress=False)
    assert errors == [] and len(cleaned["training"]) == 2


# Dangling symbolic links


def test_dangling_symlinks_are_skipped_with_a_warning_naming_them(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_volume(folder / "a.nii.gz", ct_volume(), make_affine((1.5, 1.5, 1.5)))
    link = folder / "b.nii.gz"
    link.symlink_to(tmp_path / "moved_away.nii.gz")
    with pytest.warns(UserWarning) as caught:
        datalist = folder_datalist(folder, fractions=(1.0, 0.0, 0.0))
    assert [str(w.message) for w in caught] == [
        f"{folder}: skipped 1 dangling symbolic link(s), whose target does not exist: "
        f"{link} -> {tmp_path / 'moved_away.nii.gz'}"
    ]
    assert [item["image"] for item in datalist["training"]] == [str(folder / "a.nii.gz")]


# Broken datalist JSON


def test_broken_datalist_json_is_one_line_with_file_and_position(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text('{\n    "training": [\n        {"image": "a.nii.gz",}\n    ]\n}\n')
    expected = f"{path}: invalid JSON at line 3 column 30: Expecting property name enclosed in double quotes"
    for load in (
        lambda: load_datalist_section(path, "training"),
        lambda: datalist_section(path, "training"),
        lambda: load_datalist(path),
    ):
        with pytest.raises(ValueError) as raised:
            load()
        assert str(raised.value) == expected


def test_a_bundle_given_a_broken_datalist_ends_in_an_error_naming_the_file(tmp_path):
    from monai.bundle import ConfigParser

    path = tmp_path / "datalist.json"
    path.write_text('{"training": [}')
    for bundle, key in (("anatomask_finetune_flare22", "train#files"), ("anatomask_pretrain", "train#files")):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        parser["datalist"] = str(path)
        with pytest.raises(Exception) as raised:
            parser.get_parsed_content(key)
        cause = raised.value
        while not isinstance(cause, ValueError) and cause is not None:
            cause = cause.__cause__ or cause.__context__
        assert str(cause) == f"{path}: invalid JSON at line 1 column 15: Expecting value"


# Warnings raised in DataLoader workers reach the console


def test_warnings_in_dataloader_workers_reach_stderr(tmp_path):
    # pytest records warnings, and forked workers would inherit that: run as a bundle would, in a process
    volume = np.zeros((20, 20, 12), np.uint8)
    volume[5:15] = 1
    mask_as_ct = write_volume(tmp_path / "mask.nii.gz", volume, make_affine((1.5, 1.5, 1.5)))
    script = (
        "import torch\n"
        "from anatomask_components.data.datasets import CachedScanDataset\n"
        "from anatomask_components.data.preprocessing import pretrain_transforms\n"
        f"items = [{{'image': {str(mask_as_ct)!r}}}]\n"
        "dataset = CachedScanDataset(items, pretrain_transforms(roi_size=(16, 16, 12)), None)\n"
        "batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1)))\n"
        "print(tuple(batch['image'].shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 1, 16, 16, 12)"
    assert f"{mask_as_ct}: uint8 voxels in 0..1 cannot be CT in Hounsfield units" in done.stderr
