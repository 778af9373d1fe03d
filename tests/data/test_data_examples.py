"""Real example CT/MR from the TotalSegmentator 2.18.0 source archive (needs the package index once)."""

from __future__ import annotations

import json
import socket

import nibabel as nib
import numpy as np
import pytest

from anatomask_components.data import examples
from anatomask_components.data.preprocessing import finetune_val_transforms
from anatomask_components.data.readers import read_volume
from anatomask_components.data.validation import canonical_grid

pytestmark = pytest.mark.network


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    cached = examples.default_cache_dir() / examples.ARCHIVE_NAME
    if not cached.exists() and not _index_reachable():
        pytest.skip("package index unreachable and no cached TotalSegmentator archive")
    dest = tmp_path_factory.mktemp("examples")
    manifest = examples.fetch_examples(str(dest))
    return dest, manifest


def test_cases_have_the_documented_geometry(fetched):
    dest, manifest = fetched
    assert manifest["archive_sha256"] == examples.ARCHIVE_SHA256
    a = nib.load(dest / "images/A_ct.nii.gz")
    assert a.shape == (122, 101, 112) and np.allclose(a.header.get_zooms(), 3.0)
    c, c_affine, fmt = read_volume(dest / "images/C_ct_dicom")
    assert fmt == "dicom" and c.shape == (512, 512, 20)
    # LPS storage read from the series: x and y run towards -R and -A
    np.testing.assert_allclose(np.diag(c_affine)[:3], [-0.9765625, -0.9765625, 2.0])
    np.testing.assert_allclose(c_affine[:3, 3], [249.51171875, 437.51171875, -804.5])
    # its label is stored LAS (y reversed) but covers exactly the same grid
    label = nib.load(dest / "labels/C_totalseg.nii.gz")
    assert nib.aff2axcodes(label.affine) == ("L", "A", "S")
    for ours, theirs in zip(canonical_grid(c_affine, c.shape), canonical_grid(label.affine, label.shape)):
        np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_remapped_labels_and_datalists(fetched):
    dest, _ = fetched
    a_flare = np.unique(np.asanyarray(nib.load(dest / "labels/A_flare22.nii.gz").dataobj))
    assert a_flare.tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        11,
        12,
        13,
    ]  # every FLARE22 organ but the esophagus
    mr_amos = np.unique(np.asanyarray(nib.load(dest / "labels/MR_amos22.nii.gz").dataobj)).tolist()
    assert 8 in mr_amos and 9 in mr_amos  # aorta and IVC come from total_mr ids 23 and 24
    amos = json.loads((dest / "datalists/amos22.json").read_text())
    assert [i["modality"] for i in amos["training"]] == ["CT", "MR"]
    assert amos["test"][0]["image"] == str(dest / "images/C_ct_dicom")
    pretrain = json.loads((dest / "datalists/pretrain.json").read_text())
    assert len(pretrain["training"]) == 3


def test_dicom_case_and_its_label_line_up_after_preprocessing(fetched):
    dest, _ = fetched
    flare = json.loads((dest / "datalists/flare22.json").read_text())
    out = finetune_val_transforms(normalization="none", num_classes=14)(flare["test"][0])
    image, label = out["image"][0], out["label"][0]
    assert tuple(image.shape) == (334, 334, 26)
    liver, spleen = float(image[label == 1].mean()), float(image[label == 3].mean())
    assert 60.0 < liver < 150.0 and 50.0 < spleen < 150.0  # contrast-enhanced organs, in HU


def test_second_fetch_works_offline(fetched, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the archive is cached")

    monkeypatch.setattr(examples.subprocess, "run", no_network)
    examples.fetch_examples(str(tmp_path))
    assert (tmp_path / "images/C_ct_dicom").is_dir() and len(
        list((tmp_path / "images/C_ct_dicom").iterdir())
    ) == 20
