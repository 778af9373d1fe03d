"""``anatomask rank-scans``: a folder of real scans with one broken file -> CSV, HTML and maps."""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_difficulty import example_images, tiny_bundle  # noqa: F401 (example_images is a fixture)

from anatomask_components import cli
from anatomask_components.data.readers import read_volume
from anatomask_components.ranking import list_scans, rank_scans

pytest.importorskip("matplotlib")  # ranking.html draws its thumbnails with it (the demo extra)


@pytest.fixture(scope="module")
def ranked(example_images, tmp_path_factory):  # noqa: F811
    """rank-scans over case A (NIfTI), case C (DICOM series folder), the MR and a broken file."""
    folder = tmp_path_factory.mktemp("scans")
    shutil.copy(example_images / "A_ct.nii.gz", folder / "A_ct.nii.gz")
    shutil.copy(example_images / "MR_mr.nii.gz", folder / "MR_mr.nii.gz")
    shutil.copytree(example_images / "C_ct_dicom", folder / "C_ct_dicom")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    bundle = tiny_bundle(tmp_path_factory.mktemp("bundle") / "anatomask_pretrain")
    out = tmp_path_factory.mktemp("ranking")
    with pytest.warns(UserWarning, match="no training checkpoint with a teacher"):
        result = rank_scans(bundle, folder, out, num_masks=2, batch_size=4, device="cpu", progress=False)
    return folder, out, result


def test_csv_ranks_the_scans_and_lists_the_broken_file(ranked):
    folder, out, result = ranked
    with open(out / "ranking.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scored = [row for row in rows if not row["error"]]
    assert [row["rank"] for row in scored] == ["1", "2", "3"]
    assert {Path(row["scan"]).name for row in scored} == {"A_ct.nii.gz", "C_ct_dicom", "MR_mr.nii.gz"}
    scores = [float(row["score"]) for row in scored]
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx([r.score for r in result["ranked"]], abs=1e-6)
    by_name = {Path(row["scan"]).name: row for row in scored}
    assert "not CT-like intensities" in by_name["MR_mr.nii.gz"]["flags"]
    assert "few slices" in by_name["C_ct_dicom"]["flags"]  # 20 slices of 2 mm
    assert by_name["A_ct.nii.gz"]["flags"] == ""
    assert float(by_name["A_ct.nii.gz"]["hu_p1"]) < -900

    (bad,) = [row for row in rows if row["error"]]
    assert bad["scan"] == str(folder / "broken.nii.gz") and bad["score"] == "" and bad["rank"] == ""
    assert bad["error"].startswith(f"{folder / 'broken.nii.gz'}: cannot be read")
    assert result["errors"] == [(bad["scan"], bad["error"])]


def test_html_shows_every_scan_and_the_error(ranked):
    folder, out, _ = ranked
    page = (out / "ranking.html").read_text()
    for name in ("A_ct.nii.gz", "C_ct_dicom", "MR_mr.nii.gz"):
        assert html.escape(str(folder / name)) in page
    assert html.escape(f"{folder / 'broken.nii.gz'}: cannot be read") in page
    # a histogram, and a thumbnail and an overlay per scored scan, all inline
    assert page.count("src='data:image/png;base64,") == 1 + 2 * 3
    assert page.rindex("difficulty overlay") < page.index("<h2>Scans that could not be scored (1)</h2>")


def test_maps_are_in_each_scans_original_geometry(ranked):
    folder, out, result = ranked
    with open(out / "ranking.csv", newline="") as f:
        maps = {Path(row["scan"]).name: out / row["map"] for row in csv.DictReader(f) if not row["error"]}
    for name in ("A_ct.nii.gz", "C_ct_dicom"):
        array, affine, _ = read_volume(folder / name)
        written = nib.load(maps[name])
        assert written.shape == array.shape
        np.testing.assert_allclose(written.affine, affine, atol=1e-4)
        values = np.asarray(written.dataobj)
        (scored,) = [r for r in result["ranked"] if Path(r.path).name == name]
        # nearest-patch resampling: each voxel holds the error of a scored patch, and nearly every patch shows
        patches = np.unique(scored.patch_errors.astype(np.float32))
        shown = np.unique(values)
        assert np.isfinite(values).all() and np.isin(shown, patches).all()
        assert len(shown) >= 0.9 * len(patches)


def test_datalists_and_missing_folders(tmp_path, capsys):
    datalist = tmp_path / "list.json"
    items = {"training": [{"image": "a.nii.gz"}], "test": [{"image": "/abs/b.nii.gz"}, "a.nii.gz"]}
    datalist.write_text(json.dumps(items))
    assert list_scans(datalist) == [str(tmp_path / "a.nii.gz"), "/abs/b.nii.gz"]

    command = cli.reporting_errors("rank-scans", cli.COMMANDS["rank-scans"])
    with pytest.raises(SystemExit) as exited:
        command(bundle=str(tmp_path), dataset_dir=str(tmp_path / "nowhere"), out=str(tmp_path / "out"))
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"anatomask rank-scans: error: {tmp_path / 'nowhere'}: folder does not exist"
    )
