"""Synthetic phantoms: body with distinct organ ellipsoids, on any grid, written in dataset layouts."""

from __future__ import annotations

import fire
import nibabel as nib
import numpy as np

from anatomask_components.cli import COMMANDS
from anatomask_components.data.phantoms import (
    make_affine,
    make_pet_ct_phantom,
    make_phantom,
    write_phantom_dataset,
)


def test_phantom_has_every_class_with_distinct_intensities_inside_the_body():
    image, label, affine = make_phantom((48, 40, 32), spacing=(0.8, 0.8, 2.5), num_classes=7, seed=3)
    assert image.shape == label.shape == (48, 40, 32)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == set(range(7))
    np.testing.assert_array_equal(affine, np.diag([0.8, 0.8, 2.5, 1.0]))
    means = [float(image[label == c].mean()) for c in range(1, 7)]
    assert min(abs(a - b) for i, a in enumerate(means) for b in means[i + 1 :]) > 5.0  # HU, noise is 12 HU
    assert image[0, 0, 0] < -900.0  # air outside the body, body ~40 HU
    assert abs(float(np.median(image[(label == 0) & (image > -500)])) - 40.0) < 10.0


def test_phantom_is_reproducible_from_its_seed():
    a = make_phantom((24, 24, 24), seed=5)
    b = make_phantom((24, 24, 24), seed=5)
    c = make_phantom((24, 24, 24), seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_make_affine_flips_rotates_and_places_the_grid():
    affine = make_affine((1.0, 2.0, 3.0), flip=(True, False, True), rotation_deg=(0, 0, 90), origin=(5, 6, 7))
    expected = np.array([[0.0, -2.0, 0.0, 5.0], [-1.0, 0.0, 0.0, 6.0], [0.0, 0.0, -3.0, 7.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, expected, atol=1e-12)


def test_mr_and_pet_phantoms_are_non_negative_and_pet_lesions_are_hot():
    mr, _, _ = make_phantom((24, 24, 24), modality="MR", seed=1)
    assert mr.min() >= 0.0
    ct, suv, lesions, _ = make_pet_ct_phantom((32, 32, 32), num_lesions=2, seed=2)
    assert ct.shape == suv.shape == lesions.shape and set(np.unique(lesions)) == {0, 1}
    assert suv[lesions == 1].mean() > 4.0 > suv[lesions == 0].mean()


def test_written_dataset_files_carry_the_requested_grid(tmp_path):
    affine = make_affine((1.0, 1.5, 2.0), flip=(True, True, False))
    datalist = write_phantom_dataset(
        tmp_path,
        n_cases=3,
        shape=(16, 16, 12),
        num_classes=3,
        affine=affine,
        layout="nnunet",
        file_ending=".nrrd",
    )
    items = datalist["training"] + datalist["validation"] + datalist["test"]
    assert len(items) == 3 and all(item["image"].endswith("_0000.nrrd") for item in items)
    written = write_phantom_dataset(
        tmp_path / "nifti", n_cases=1, shape=(16, 16, 12), affine=affine, fractions=(1, 0, 0)
    )
    image = nib.load(written["training"][0]["image"])
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    assert image.shape == (16, 16, 12)


def test_phantoms_command_writes_a_datalist(tmp_path):
    fire.Fire(
        COMMANDS,
        command=["phantoms", str(tmp_path), "--n_cases", "2", "--shape", "16,16,16"],
        name="anatomask",
    )
    assert (tmp_path / "datalist.json").exists() and len(list((tmp_path / "images").glob("*.nii.gz"))) == 2
