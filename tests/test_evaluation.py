"""Segmentation metrics (DSC, NSD, lesion volumes), summaries, reports, case names and grid alignment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from anatomask_components.cli import COMMANDS
from anatomask_components.data.datalists import case_ids, inference_items
from anatomask_components.data.writers import align_to_reference
from anatomask_components.evaluation import (
    case_metrics,
    format_report,
    read_metrics_csv,
    resolve_tolerances,
    summarize,
    voxel_spacing,
    write_metrics,
)


def _cube(shape=(40, 40, 40), start=(10, 10, 10), size=10, label=1) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.int64)
    volume[tuple(slice(s, s + size) for s in start)] = label
    return volume


def test_dsc_and_nsd_of_a_shifted_cube():
    reference = _cube()
    prediction = _cube(start=(11, 10, 10))  # shifted by one voxel along the first axis
    labels = {1: "organ"}
    for tolerance, expected_nsd in [(1.0, 1.0), (2.0, 1.0)]:
        (row,) = case_metrics(prediction, reference, (1.0, 1.0, 1.0), labels, tolerance)
        assert row["dsc"] == pytest.approx(0.9)  # 2 * 900 / 2000
        assert row["nsd"] == pytest.approx(expected_nsd)
        assert (row["reference_voxels"], row["predicted_voxels"]) == (1000, 1000)
    (strict,) = case_metrics(prediction, reference, (1.0, 1.0, 1.0), labels, 0.5)
    assert 0.5 < strict["nsd"] < 0.9
    (identical,) = case_metrics(reference, reference, (1.0, 1.0, 1.0), labels, 0.0)
    assert identical["dsc"] == 1.0 and identical["nsd"] == pytest.approx(1.0)


def test_nsd_distances_are_in_mm():
    reference = _cube()
    prediction = _cube(start=(11, 10, 10))
    # the shift is 3 mm with 3 mm voxels along the first axis
    (within,) = case_metrics(prediction, reference, (3.0, 1.0, 1.0), {1: "organ"}, 3.0)
    (short,) = case_metrics(prediction, reference, (3.0, 1.0, 1.0), {1: "organ"}, 2.9)
    assert within["nsd"] == pytest.approx(1.0)
    assert short["nsd"] < 0.95
    # the same shift along an axis with 1 mm voxels is within 1 mm
    (fine,) = case_metrics(_cube(start=(10, 11, 10)), reference, (3.0, 1.0, 1.0), {1: "organ"}, 1.0)
    assert fine["nsd"] == pytest.approx(1.0)


def test_empty_masks_convention():
    empty = np.zeros((20, 20, 20), dtype=np.int64)
    blob = _cube((20, 20, 20), (5, 5, 5), 4)
    labels = {1: "lesion"}
    (both_empty,) = case_metrics(empty, empty, (1.0, 1.0, 1.0), labels)
    assert math.isnan(both_empty["dsc"]) and math.isnan(both_empty["nsd"])
    (false_positive,) = case_metrics(blob, empty, (1.0, 1.0, 1.0), labels)
    (missed,) = case_metrics(empty, blob, (1.0, 1.0, 1.0), labels)
    assert (false_positive["dsc"], false_positive["nsd"]) == (0.0, 0.0)
    assert (missed["dsc"], missed["nsd"]) == (0.0, 0.0)
    (scored,) = case_metrics(empty, empty, (1.0, 1.0, 1.0), labels, empty_score=1.0)
    assert (scored["dsc"], scored["nsd"]) == (1.0, 1.0)


def test_lesion_volumes_follow_the_autopet_definition():
    # reference: lesions of 64 and 27 voxels; prediction: overlaps the first, misses the second, and adds
    # a false 8-voxel blob
    reference = _cube((30, 30, 30), (2, 2, 2), 4) + _cube((30, 30, 30), (20, 20, 20), 3)
    prediction = _cube((30, 30, 30), (3, 3, 3), 4) + _cube((30, 30, 30), (12, 2, 20), 2)
    (row,) = case_metrics(prediction, reference, (2.0, 2.0, 2.0), {1: "lesion"}, lesion_volumes=True)
    voxel_ml = 8.0 / 1000.0
    assert row["false_positive_ml"] == pytest.approx(8 * voxel_ml)
    assert row["false_negative_ml"] == pytest.approx(27 * voxel_ml)


def test_tolerances_per_class():
    labels = {1: "liver", 2: "pancreas"}
    assert resolve_tolerances(labels, 2.0) == {1: 2.0, 2: 2.0}
    assert resolve_tolerances(labels, {"pancreas": 3.0}) == {1: 1.0, 2: 3.0}
    assert resolve_tolerances(labels, {"1": 0.5}) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="unknown classes"):
        resolve_tolerances(labels, {"kidney": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        resolve_tolerances(labels, -1.0)


def test_voxel_spacing_of_oblique_flipped_affine():
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 1.2, 3.0])
    assert voxel_spacing(affine) == pytest.approx((0.8, 1.2, 3.0))


def _rows():
    return [
        {"case": "a", "label": 1, "name": "liver", "dsc": 0.9, "nsd": 0.8, "tolerance_mm": 1.0},
        {"case": "a", "label": 2, "name": "lesion", "dsc": math.nan, "nsd": math.nan, "tolerance_mm": 1.0},
        {"case": "b", "label": 1, "name": "liver", "dsc": 0.7, "nsd": 0.6, "tolerance_mm": 1.0},
        {"case": "b", "label": 2, "name": "lesion", "dsc": 0.5, "nsd": 0.4, "tolerance_mm": 1.0},
    ]


def test_summary_means_skip_undefined_values():
    summary = summarize(_rows())
    assert summary["num_cases"] == 2 and summary["metrics"] == ["dsc", "nsd"]
    liver = summary["classes"]["liver"]
    assert liver["dsc"] == pytest.approx({"mean": 0.8, "sd": 0.1, "n": 2})
    assert summary["classes"]["lesion"]["nsd"] == {"mean": 0.4, "sd": 0.0, "n": 1}
    # per case: a -> 0.9 (lesion undefined), b -> 0.6
    assert summary["per_case_mean"]["dsc"] == pytest.approx({"mean": 0.75, "sd": 0.15, "n": 2})


def test_write_read_and_report(tmp_path, capsys):
    rows = [{**row, "reference_voxels": 10, "predicted_voxels": 12} for row in _rows()]
    summary = write_metrics(rows, tmp_path / "metrics.csv", tmp_path / "summary.json")
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "case,label,name,dsc,nsd,tolerance_mm,reference_voxels,predicted_voxels"
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    back = read_metrics_csv(tmp_path / "metrics.csv")
    assert math.isnan(back[1]["dsc"]) and back[0]["dsc"] == 0.9 and back[0]["label"] == 1
    assert summarize(back) == summary

    COMMANDS["report"](str(tmp_path / "summary.json"))
    from_json = capsys.readouterr().out
    COMMANDS["report"](str(tmp_path / "metrics.csv"))
    from_csv = capsys.readouterr().out
    assert from_json == from_csv == format_report(summary) + "\n"
    lines = from_json.splitlines()
    assert lines[0] == "2 cases"
    assert lines[2].split() == ["liver", "80.00", "±", "10.00", "70.00", "±", "10.00", "2"]
    assert lines[-1].split()[:2] == ["per-case", "mean"]
    with pytest.raises(ValueError, match="not a summary"):
        (tmp_path / "other.json").write_text("{}")
        COMMANDS["report"](str(tmp_path / "other.json"))


def test_case_ids_are_unique_and_readable(tmp_path):
    items = [
        {"image": "/d/images/case_001.nii.gz"},
        {"image": "/d/images/case_002.nrrd"},
        {"image": "/d/other/case_001.nii.gz"},
        {"image": ["/d/PETCT_1/study/CTres.nii.gz", "/d/PETCT_1/study/SUV.nii.gz"]},
    ]
    assert case_ids(items) == ["images_case_001", "images_case_002", "other_case_001", "PETCT_1_study"]
    assert case_ids([items[0]]) == ["case_001"]
    assert case_ids([items[0], items[0]]) == ["case_001", "case_001_2"]
    assert case_ids([items[3]], root="/d") == ["PETCT_1_study"]
    assert case_ids([items[3]], root="/d/PETCT_1/study") == ["study"]


def test_inference_items_from_folders(tmp_path):
    for study in ("p1/s1", "p2/s1"):
        for name in ("CTres.nii.gz", "SUV.nii.gz"):
            (tmp_path / "pet" / study).mkdir(parents=True, exist_ok=True)
            (tmp_path / "pet" / study / name).write_bytes(b"")
    (tmp_path / "pet" / "p3").mkdir()
    (tmp_path / "pet" / "p3" / "CTres.nii.gz").write_bytes(b"")  # no SUV: not a case
    items = inference_items(tmp_path / "pet", channel_files=("CTres.nii.gz", "SUV.nii.gz"))
    assert [item["case"] for item in items] == ["p1_s1", "p2_s1"]
    assert items[0]["image"] == [
        str(tmp_path / "pet/p1/s1/CTres.nii.gz"),
        str(tmp_path / "pet/p1/s1/SUV.nii.gz"),
    ]
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "a.nii.gz").write_bytes(b"")
    (tmp_path / "ct" / "notes.txt").write_text("")
    assert inference_items(tmp_path / "ct", modality="MR") == [
        {"case": "a", "modality": "MR", "image": str(tmp_path / "ct" / "a.nii.gz")}
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no scans found"):
        inference_items(tmp_path / "empty")


def test_alignment_undoes_axis_flips_and_permutations():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(6, 7, 8))
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = (10.0, -5.0, 2.0)
    prediction = MetaTensor(torch.from_numpy(labels)[None], affine=torch.from_numpy(affine))
    # the same voxels stored with the first axis flipped and the last two swapped
    stored = np.flip(labels, axis=0).transpose(0, 2, 1)
    stored_affine = affine.copy()
    stored_affine[:3, 0] *= -1
    stored_affine[:3, 3] += affine[:3, 0] * 5
    stored_affine[:3, [1, 2]] = stored_affine[:3, [2, 1]]
    reference = MetaTensor(torch.from_numpy(stored.copy())[None], affine=torch.from_numpy(stored_affine))
    pred, ref, common = align_to_reference(prediction, reference, "case")
    assert np.array_equal(pred, ref)
    assert voxel_spacing(common) == pytest.approx((1.5, 2.0, 3.0))
    moved = affine.copy()
    moved[0, 3] += 5.0
    shifted = MetaTensor(torch.from_numpy(labels)[None], affine=torch.from_numpy(moved))
    with pytest.raises(ValueError, match="different voxel grids"):
        align_to_reference(prediction, shifted, "case")
