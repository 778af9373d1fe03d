"""Dataset fingerprint: foreground statistics that drive nnU-Net's CT normalisation."""

from __future__ import annotations

import json

import fire
import numpy as np
import pytest

from anatomask_components.cli import COMMANDS
from anatomask_components.data.fingerprint import compute_fingerprint
from anatomask_components.data.normalization import load_fingerprint
from anatomask_components.data.preprocessing import deterministic_transforms
from anatomask_components.data.writers import write_volume

AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def two_cases(tmp_path):
    """Foreground 100 HU in one case and 300 HU in the other; the background must not count."""
    items = []
    for case, (value, background) in enumerate([(100.0, -1000.0), (300.0, 5000.0)]):
        label = np.zeros((10, 10, 10), np.uint8)
        label[2:6, 3:7, 1:9] = 1
        image = np.where(label > 0, value, background).astype(np.float32)
        items.append(
            {
                "image": str(write_volume(tmp_path / f"ct{case}.nii.gz", image, AFFINE)),
                "label": str(write_volume(tmp_path / f"seg{case}.nii.gz", label, AFFINE)),
            }
        )
    return items


def test_foreground_statistics_are_exact_on_known_intensities(tmp_path):
    items = two_cases(tmp_path)
    fingerprint = compute_fingerprint({"training": items}, samples_per_case=1000, progress=False)
    ct = fingerprint["intensity"]["CT"]
    assert (ct["mean"], ct["std"], ct["min"], ct["max"]) == (200.0, 100.0, 100.0, 300.0)
    assert (ct["percentile_00_5"], ct["percentile_99_5"], ct["num_samples"]) == (100.0, 300.0, 2000)
    assert fingerprint["spacing_median"] == [1.5, 1.5, 1.5] and fingerprint["num_cases"] == 2


def test_unlabelled_ct_uses_the_body_above_minus_500_hu(tmp_path):
    image = np.full((10, 10, 10), -1000.0, np.float32)
    image[3:7, 3:7, 3:7] = 40.0
    path = write_volume(tmp_path / "ct.nii.gz", image, AFFINE)
    fingerprint = compute_fingerprint(
        {"training": [{"image": str(path)}]}, samples_per_case=50, progress=False
    )
    assert fingerprint["intensity"]["CT"]["min"] == fingerprint["intensity"]["CT"]["max"] == 40.0


def test_fingerprint_command_output_drives_the_ct_scheme(tmp_path):
    items = two_cases(tmp_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "test": []}))
    output = tmp_path / "fingerprint.json"
    fire.Fire(
        COMMANDS,
        command=["fingerprint", str(datalist), "--output", str(output), "--samples_per_case", "100"],
        name="anatomask",
    )
    assert load_fingerprint(output)["CT"] == {
        "mean": 200.0,
        "std": 100.0,
        "percentile_00_5": 100.0,
        "percentile_99_5": 300.0,
    }
    values = np.array([-1000.0, 100.0, 150.0, 200.0, 300.0, 5000.0], np.float32)
    path = write_volume(tmp_path / "ramp.nii.gz", np.tile(values, (4, 4, 1)), AFFINE)
    out = deterministic_transforms(spacing=None, normalization="ct", fingerprint=str(output))(
        {"image": str(path)}
    )
    # clipped to the 0.5 / 99.5 percentiles (100, 300), then (x - 200) / 100
    np.testing.assert_allclose(out["image"][0, 0, 0].numpy(), [-1.0, -1.0, -0.5, 0.0, 1.0, 1.0], atol=1e-6)


def test_nnunet_fingerprint_is_understood():
    nnunet = {
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3000.0,
                "mean": 80.0,
                "median": 70.0,
                "min": -1000.0,
                "percentile_00_5": -950.0,
                "percentile_99_5": 1500.0,
                "std": 200.0,
            }
        }
    }
    assert load_fingerprint(nnunet) == {
        "CT": {"mean": 80.0, "std": 200.0, "percentile_00_5": -950.0, "percentile_99_5": 1500.0}
    }


def test_bad_scan_in_the_fingerprint_can_be_skipped(tmp_path):
    items = two_cases(tmp_path) + [{"image": str(tmp_path / "missing.nii.gz")}]
    with pytest.warns(UserWarning, match="missing.nii.gz: file does not exist"):
        fingerprint = compute_fingerprint({"training": items}, on_error="warn", progress=False)
    assert fingerprint["num_cases"] == 2 and len(fingerprint["skipped"]) == 1
