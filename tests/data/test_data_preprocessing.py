"""Shared preprocessing: one deterministic path for pretraining, fine-tuning and (invertible) inference."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd, SaveImaged

from anatomask_components.data.preprocessing import (
    deterministic_transforms,
    finetune_train_transforms,
    finetune_val_transforms,
    inference_transforms,
    pretrain_transforms,
)
from anatomask_components.data.writers import write_volume

ROI = (24, 24, 16)


def crop_offset(crop, volume) -> tuple[int, ...]:
    """Voxel offset of a crop inside a volume, read from the two affines (MONAI crops shift the affine)."""
    full = volume.affine.numpy()
    offset = np.linalg.solve(full[:3, :3], crop.affine.numpy()[:3, 3] - full[:3, 3])
    assert np.allclose(offset, np.round(offset), atol=1e-4)
    return tuple(int(round(o)) for o in offset)


def window(volume, offset, size):
    return volume[(slice(None), *[slice(o, o + s) for o, s in zip(offset, size)])]


def test_same_crop_from_pretraining_and_finetuning_pipelines(tmp_path, make_phantom_files):
    files = make_phantom_files(
        tmp_path, shape=(30, 26, 14), spacing=(1.2, 1.9, 3.1), flip=(True, False, True)
    )
    reference = finetune_val_transforms(num_classes=4)(files.item())

    pretrain = pretrain_transforms(roi_size=ROI, flip_prob=0.0)
    pretrain.set_random_state(seed=7)
    crop = pretrain({"image": str(files.image_path)})["image"]
    offset = crop_offset(crop, reference["image"])
    torch.testing.assert_close(
        crop.as_tensor(), window(reference["image"], offset, ROI).as_tensor(), rtol=0, atol=0
    )

    finetune = finetune_train_transforms(
        roi_size=ROI,
        num_classes=4,
        num_samples=3,
        augmentation="none",
    )
    finetune.set_random_state(seed=3)
    for sample in finetune(files.item()):
        offset = crop_offset(sample["image"], reference["image"])
        torch.testing.assert_close(
            sample["image"].as_tensor(), window(reference["image"], offset, ROI).as_tensor(), rtol=0, atol=0
        )
        torch.testing.assert_close(
            sample["label"].as_tensor(), window(reference["label"], offset, ROI).as_tensor(), rtol=0, atol=0
        )


def test_deterministic_output_is_ras_at_the_target_spacing_and_keeps_the_field_of_view(
    tmp_path, make_phantom_files
):
    files = make_phantom_files(
        tmp_path, shape=(30, 26, 14), spacing=(1.2, 1.9, 3.1), flip=(True, False, True)
    )
    out = deterministic_transforms(label_key="label")(files.item())
    image, label = out["image"], out["label"]
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(image.pixdim.numpy(), [1.5, 1.5, 1.5], atol=1e-6)
    assert image.dtype == torch.float32 and image.shape == label.shape
    # MONAI keeps the span of the voxel centres: round((n - 1) * spacing / 1.5) + 1 per axis
    assert tuple(image.shape[1:]) == (24, 33, 28)
    # the first voxel of the RAS grid sits at the RAS-lowest corner of the original volume
    corners = np.array([[i, j, k, 1] for i in (0, 29) for j in (0, 25) for k in (0, 13)]) @ files.affine.T
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], corners[:, :3].min(axis=0), atol=1e-5)
    assert set(torch.unique(label).tolist()) == {0.0, 1.0, 2.0, 3.0}


def test_inference_output_inverts_to_the_input_geometry_and_tolerates_image_path(
    tmp_path, make_phantom_files
):
    # native 1.5 mm with flipped storage: inversion must give back the exact labels
    files = make_phantom_files(tmp_path, flip=(True, False, True))
    preprocessing = inference_transforms()
    data = preprocessing({"image": str(files.image_path), "image_path": str(files.image_path)})
    assert data["image_path"] == str(files.image_path)  # MONAI Label's string key survives Spacingd
    data["pred"] = finetune_val_transforms()(files.item())["label"]
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(data)["pred"]
    assert tuple(inverted.shape) == (1, *files.label.shape)
    np.testing.assert_allclose(inverted.affine.numpy(), files.affine, atol=1e-5)
    np.testing.assert_array_equal(inverted[0].numpy(), files.label)

    SaveImaged("pred", output_dir=tmp_path / "out", output_postfix="seg", separate_folder=False)(
        {"pred": inverted}
    )
    saved = nib.load(tmp_path / "out" / "case_image_seg.nii.gz")
    np.testing.assert_allclose(saved.affine, files.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), files.label)


def test_inference_inversion_from_an_anisotropic_oblique_grid(tmp_path, make_phantom_files):
    files = make_phantom_files(
        tmp_path, shape=(30, 26, 14), spacing=(1.2, 1.9, 3.1), flip=(True, True, False)
    )
    preprocessing = inference_transforms()
    data = preprocessing({"image": str(files.image_path)})
    data["pred"] = finetune_val_transforms()(files.item())["label"]
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(data)["pred"]
    assert tuple(inverted.shape) == (1, *files.label.shape)
    np.testing.assert_allclose(inverted.affine.numpy(), files.affine, atol=1e-5)
    agreement = (inverted[0].numpy() == files.label).mean()
    assert agreement > 0.97  # two nearest-neighbour resamplings at 1.5 mm of a 1.2 x 1.9 x 3.1 mm grid


def test_zscore_ct_scheme_suv_and_per_case_modality(tmp_path):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    rng = np.random.default_rng(0)
    ct = rng.normal(40.0, 300.0, size=(12, 10, 8)).astype(np.float32)
    suv = rng.gamma(2.0, 2.0, size=(12, 10, 8)).astype(np.float32) - 1.0
    ct_path = write_volume(tmp_path / "ct.nii.gz", ct, affine)
    suv_path = write_volume(tmp_path / "suv.nii.gz", suv, affine)
    stats = {"mean": 50.0, "std": 100.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}
    fingerprint = {"intensity": {"CT": stats}}

    zscore = deterministic_transforms(spacing=None)({"image": str(ct_path)})["image"][0].numpy()
    np.testing.assert_allclose(zscore, (ct - ct.mean(dtype=np.float64)) / ct.std(dtype=np.float64), atol=1e-5)

    ct_scheme = deterministic_transforms(spacing=None, normalization="ct", fingerprint=fingerprint)
    np.testing.assert_allclose(
        ct_scheme({"image": str(ct_path)})["image"][0].numpy(),
        (np.clip(ct, -100.0, 200.0) - 50.0) / 100.0,
        atol=1e-6,
    )
    # an MR case in the same model (AMOS) is z-scored whatever the CT scheme
    as_mr = ct_scheme({"image": str(ct_path), "modality": "MR"})["image"][0].numpy()
    np.testing.assert_allclose(as_mr, zscore, atol=1e-6)

    # AutoPET: two channels, each its own scheme
    petct = deterministic_transforms(
        spacing=None, normalization={"CT": "ct", "PET": "suv"}, fingerprint=fingerprint, suv_max=10.0
    )
    out = petct({"image": [str(ct_path), str(suv_path)], "modality": ["CT", "PET"]})["image"].numpy()
    np.testing.assert_allclose(out[0], (np.clip(ct, -100.0, 200.0) - 50.0) / 100.0, atol=1e-6)
    np.testing.assert_allclose(out[1], np.clip(suv, 0.0, 10.0) / 10.0, atol=1e-6)
    by_argument = deterministic_transforms(
        spacing=None,
        normalization={"CT": "ct", "PET": "suv"},
        fingerprint=fingerprint,
        suv_max=10.0,
        channel_modalities=("CT", "PET"),
    )
    np.testing.assert_array_equal(by_argument({"image": [str(ct_path), str(suv_path)]})["image"].numpy(), out)
    # DICOM's spelling of PET in a datalist, and "MRI", normalise as their modality
    dicom_spelling = petct({"image": [str(ct_path), str(suv_path)], "modality": ["ct", "PT"]})["image"]
    np.testing.assert_array_equal(dicom_spelling.numpy(), out)
    np.testing.assert_allclose(
        ct_scheme({"image": str(ct_path), "modality": "MRI"})["image"][0].numpy(), zscore, atol=1e-6
    )


def test_ct_scheme_without_fingerprint_is_refused_naming_the_scan(tmp_path, make_phantom_files):
    files = make_phantom_files(tmp_path)
    with pytest.raises(RuntimeError) as error:  # Compose wraps the transform's error
        deterministic_transforms(normalization="ct")({"image": str(files.image_path)})
    cause = error.value.__cause__
    assert isinstance(cause, ValueError) and "needs CT statistics" in str(cause)
    assert files.image_path.name in str(cause)


def test_rotation_and_scaling_keep_the_roi_and_the_label_set(tmp_path, make_phantom_files):
    files = make_phantom_files(tmp_path)
    train = finetune_train_transforms(
        roi_size=ROI, num_classes=4, num_samples=2, augmentation={"rotate_prob": 1.0, "scale_prob": 1.0}
    )
    train.set_random_state(seed=0)
    for sample in train(files.item()):
        assert tuple(sample["image"].shape) == (1, *ROI) and tuple(sample["label"].shape) == (1, *ROI)
        assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    pretrain = pretrain_transforms(roi_size=ROI, rotate_prob=1.0, scale_prob=1.0)
    pretrain.set_random_state(seed=0)
    image = pretrain({"image": str(files.image_path)})["image"]
    assert tuple(image.shape) == (1, *ROI) and image.dtype == torch.float32 and torch.isfinite(image).all()
