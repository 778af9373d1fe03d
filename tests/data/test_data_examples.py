"""Real example CT/MR from the TotalSegmentator 2.18.0 source archive.

The tests marked ``network`` need the package index once (later runs reuse the cached archive); the others
check download verification and extraction offline, on a small archive with the same layout.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import tarfile
import urllib.error
import urllib.parse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomask_components.data import examples
from anatomask_components.data.preprocessing import finetune_val_transforms
from anatomask_components.data.readers import read_volume
from anatomask_components.data.validation import canonical_grid

_TOP = f"{examples.PACKAGE}-{examples.VERSION}"
_REFERENCE = f"{_TOP}/tests/reference_files"


def _nifti_bytes(values: np.ndarray, offset_voxels: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = 3.0 * np.asarray(offset_voxels)
    image = nib.Nifti1Image(values, affine)
    return gzip.compress(image.to_bytes(), mtime=0)


# case B's aorta mask: a (3, 2, 4) crop of B's (6, 5, 4) grid starting at voxel (2, 1, 0)
_B_MASK = np.zeros((3, 2, 4), dtype=np.uint8)
_B_MASK[1, :, 1:3] = 1


def _fake_dicom(index: int) -> bytes:
    return b"\0" * 128 + b"DICM" + f"fake slice {index}".encode()


def _add(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def write_fake_archive(path: Path, extra: dict[str, bytes] | None = None, seed: int = 0) -> Path:
    """A small .tar.gz laid out like the TotalSegmentator source archive (tiny scans, fake DICOM)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 100.0, (6, 5, 4)).astype(np.float32)
    label = rng.integers(0, 30, (6, 5, 4)).astype(np.uint8)
    members = {
        f"{_TOP}/LICENSE": b"Apache License 2.0 (test copy)\n",
        f"{_TOP}/setup.py": b"raise SystemExit('must never be extracted nor run')\n",
        f"{_REFERENCE}/example_ct.nii.gz": _nifti_bytes(image),
        f"{_REFERENCE}/aorta_report/example_ct.nii.gz": _nifti_bytes(image + 1.0),
        f"{_REFERENCE}/example_mr_sm.nii.gz": _nifti_bytes(image + 2.0),
        f"{_REFERENCE}/example_seg_fast_force_split.nii.gz": _nifti_bytes(label),
        f"{_REFERENCE}/example_seg_dicom.nii.gz": _nifti_bytes(label),
        f"{_REFERENCE}/example_seg_mr.nii.gz": _nifti_bytes(label),
        f"{_REFERENCE}/aorta_report/test_result/models/aorta.nii.gz": _nifti_bytes(_B_MASK, (2, 1, 0)),
        f"{_REFERENCE}/example_ct_dicom/IM0001": _fake_dicom(1),
        f"{_REFERENCE}/example_ct_dicom/IM0002": _fake_dicom(2),
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            _add(tar, name, content)
    return path


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """Pin the sha256 of a fake archive and serve it from a stub download: returns (archive, served).

    ``served["path"]`` is the file the stub copies, ``served["index_sha256"]`` the hash it reports."""
    archive = write_fake_archive(tmp_path / "good.tar.gz")
    monkeypatch.setattr(examples, "ARCHIVE_SHA256", examples.sha256_of(archive))
    served = {"path": archive, "index_sha256": None, "calls": 0}

    def stub_download(target):
        served["calls"] += 1
        shutil.copyfile(served["path"], target)
        return served["index_sha256"]

    monkeypatch.setattr(examples, "download_archive", stub_download)
    return archive, served


def test_a_verified_archive_is_cached_and_only_the_examples_are_extracted(tmp_path, fake_index):
    _, served = fake_index
    cache, dest = tmp_path / "cache", tmp_path / "examples"
    manifest = examples.fetch_examples(str(dest), cache_dir=str(cache))
    assert sorted(p.name for p in cache.iterdir()) == [examples.ARCHIVE_NAME]  # no partial file left
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert written == sorted(
        [
            "LICENSE_TotalSegmentator.txt",
            "examples.json",
            "images/A_ct.nii.gz",
            "images/B_ct.nii.gz",
            "images/C_ct_dicom/IM0001",
            "images/C_ct_dicom/IM0002",
            "images/MR_mr.nii.gz",
            "labels/A_totalseg.nii.gz",
            "labels/C_totalseg.nii.gz",
            "labels/MR_totalseg_mr.nii.gz",
            "labels/A_flare22.nii.gz",
            "labels/A_amos22.nii.gz",
            "labels/C_flare22.nii.gz",
            "labels/C_amos22.nii.gz",
            "labels/MR_amos22.nii.gz",
            "labels/B_aorta_mask.nii.gz",
            "labels/B_flare22.nii.gz",
            "datalists/pretrain.json",
            "datalists/flare22.json",
            "datalists/flare22_partial.json",
            "datalists/amos22.json",
        ]
    )
    assert (dest / "images/C_ct_dicom/IM0002").read_bytes() == _fake_dicom(2)
    assert nib.load(dest / "images/A_ct.nii.gz").shape == (6, 5, 4)
    assert manifest["archive_sha256"] == examples.ARCHIVE_SHA256
    # B's aorta mask, moved from its crop into B's grid as FLARE22's aorta (5); B trains with only it labelled
    b_label = nib.load(dest / "labels/B_flare22.nii.gz")
    expected = np.zeros((6, 5, 4), dtype=np.uint8)
    expected[3, 1:3, 1:3] = 5
    np.testing.assert_array_equal(np.asanyarray(b_label.dataobj), expected)
    np.testing.assert_allclose(b_label.affine, nib.load(dest / "images/B_ct.nii.gz").affine)
    partial = json.loads((dest / "datalists/flare22_partial.json").read_text())
    assert [Path(i["label"]).name for i in partial["training"]] == ["A_flare22.nii.gz", "B_flare22.nii.gz"]
    assert [i.get("labelled") for i in partial["training"]] == [None, ["aorta"]]
    assert [Path(i["label"]).name for i in partial["validation"]] == ["A_flare22.nii.gz"]
    # the second fetch reuses the cached archive
    examples.fetch_examples(str(tmp_path / "again"), cache_dir=str(cache))
    assert served["calls"] == 1


def test_a_tampered_archive_is_deleted_without_being_extracted(tmp_path, fake_index):
    _, served = fake_index
    served["path"] = write_fake_archive(tmp_path / "tampered.tar.gz", seed=1)
    cache, dest = tmp_path / "cache", tmp_path / "examples"
    with pytest.raises(RuntimeError, match=r"sha256 [0-9a-f]{64} does not match the pinned"):
        examples.fetch_examples(str(dest), cache_dir=str(cache))
    assert list(cache.iterdir()) == [] and not dest.exists()


def test_an_archive_the_index_lists_with_another_hash_is_refused(tmp_path, fake_index):
    _, served = fake_index
    served["index_sha256"] = "0" * 64
    with pytest.raises(RuntimeError, match="does not match the package index's"):
        examples.fetch_archive(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_cached_archive_with_a_wrong_checksum_is_downloaded_again(tmp_path, fake_index):
    archive, served = fake_index
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / examples.ARCHIVE_NAME).write_bytes(b"truncated")
    assert examples.sha256_of(examples.fetch_archive(cache)) == examples.sha256_of(archive)
    assert served["calls"] == 1


@pytest.mark.parametrize(
    "member",
    [f"{_REFERENCE}/example_ct_dicom/../../../../../escaped.txt", "../escaped.txt", "/tmp/escaped.txt"],
    ids=["dotdot-in-dicom-folder", "dotdot", "absolute"],
)
def test_a_member_outside_the_archive_folder_is_refused(tmp_path, monkeypatch, member):
    archive = write_fake_archive(tmp_path / "evil.tar.gz", extra={member: b"escaped"})
    monkeypatch.setattr(examples, "ARCHIVE_SHA256", examples.sha256_of(archive))
    dest = tmp_path / "deep" / "examples"
    with pytest.raises(RuntimeError, match="refusing member"):
        examples._extract(archive, dest)
    assert not dest.exists()  # refused before anything was written
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "deep" / "escaped.txt").exists()


def test_offline_first_fetch_is_a_clear_error(tmp_path, monkeypatch):
    def offline(target):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(examples, "download_archive", offline)
    with pytest.raises(RuntimeError, match="could not download .* reachable for the first fetch"):
        examples.fetch_archive(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_archive_is_found_in_a_pep503_index_and_downloaded_as_a_file(tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    archive = write_fake_archive(tmp_path / "files" / examples.ARCHIVE_NAME)
    digest = examples.sha256_of(archive)
    page = tmp_path / "simple" / examples.PACKAGE / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        "<!DOCTYPE html><html><body>\n"
        f'<a href="../../files/other-1.0.tar.gz#sha256={"1" * 64}">other-1.0.tar.gz</a><br/>\n'
        f'<a href="../../files/{examples.ARCHIVE_NAME}#sha256={digest}">{examples.ARCHIVE_NAME}</a><br/>\n'
        "</body></html>\n"
    )
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
    monkeypatch.setattr(examples, "ARCHIVE_SHA256", digest)
    cached = examples.fetch_archive(tmp_path / "cache")
    assert cached.read_bytes() == archive.read_bytes()


def test_the_archive_is_found_in_a_pep691_json_page():
    digest = hashlib.sha256(b"x").hexdigest()
    page = json.dumps(
        {
            "meta": {"api-version": "1.1"},
            "files": [
                {"filename": "totalsegmentator-2.17.0.tar.gz", "url": "../../f/old.tar.gz", "hashes": {}},
                {
                    "filename": examples.ARCHIVE_NAME,
                    "url": f"../../f/{examples.ARCHIVE_NAME}#sha256={digest}",
                    "hashes": {"sha256": digest},
                },
            ],
        }
    ).encode()
    url, sha = examples.find_archive_url(
        page, "application/vnd.pypi.simple.v1+json", "https://index.example/simple/totalsegmentator/"
    )
    assert (url, sha) == (f"https://index.example/f/{examples.ARCHIVE_NAME}", digest)
    with pytest.raises(RuntimeError, match="does not list"):
        examples.find_archive_url(b"<html></html>", "text/html", "https://index.example/simple/x/")


def test_the_index_is_the_one_pip_uses(monkeypatch):
    from pip._internal.models.index import PyPI

    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert examples.index_url() == "https://mirror.example/simple"
    monkeypatch.delenv("PIP_INDEX_URL")

    class Result:
        def __init__(self, returncode, stdout):
            self.returncode, self.stdout = returncode, stdout

    monkeypatch.setattr(examples.subprocess, "run", lambda *a, **k: Result(0, "https://config.example/s\n"))
    assert examples.index_url() == "https://config.example/s"
    monkeypatch.setattr(examples.subprocess, "run", lambda *a, **k: Result(1, ""))  # key not set
    assert examples.index_url() == PyPI.simple_url


def test_credentials_in_the_index_url_become_a_header():
    url, header = examples._split_credentials("https://user:t%40ken@index.example:8443/simple/p/")
    assert url == "https://index.example:8443/simple/p/"
    assert header == "Basic " + base64.b64encode(b"user:t@ken").decode()
    assert examples._split_credentials("https://index.example/simple/") == (
        "https://index.example/simple/",
        None,
    )


@pytest.mark.network
def test_cases_have_the_documented_geometry(fetched):
    dest, manifest = fetched
    assert manifest["archive_sha256"] == examples.ARCHIVE_SHA256
    # B's aorta (a 120 x 126 x 164 crop in the archive) in B's own grid: 72,810 voxels of contrast-filled
    # lumen, median 354 HU (arterial phase)
    b, b_label = nib.load(dest / "images/B_ct.nii.gz"), nib.load(dest / "labels/B_flare22.nii.gz")
    assert b_label.shape == b.shape == (233, 167, 191) and np.allclose(b_label.affine, b.affine)
    aorta = np.asanyarray(b_label.dataobj) == 5
    assert aorta.sum() == 72810 and set(np.unique(np.asanyarray(b_label.dataobj))) == {0, 5}
    assert 300.0 < float(np.median(np.asanyarray(b.dataobj)[aorta])) < 400.0
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


@pytest.mark.network
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


@pytest.mark.network
def test_dicom_case_and_its_label_line_up_after_preprocessing(fetched):
    dest, _ = fetched
    flare = json.loads((dest / "datalists/flare22.json").read_text())
    out = finetune_val_transforms(normalization="none", num_classes=14)(flare["test"][0])
    image, label = out["image"][0], out["label"][0]
    assert tuple(image.shape) == (334, 334, 26)
    liver, spleen = float(image[label == 1].mean()), float(image[label == 3].mean())
    assert 60.0 < liver < 150.0 and 50.0 < spleen < 150.0  # contrast-enhanced organs, in HU


@pytest.mark.network
def test_second_fetch_works_offline(fetched, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be downloaded when the archive is cached")

    monkeypatch.setattr(examples, "download_archive", no_network)
    monkeypatch.setattr(examples, "_open", no_network)
    monkeypatch.setattr(examples.subprocess, "run", no_network)
    examples.fetch_examples(str(tmp_path))
    assert (tmp_path / "images/C_ct_dicom").is_dir() and len(
        list((tmp_path / "images/C_ct_dicom").iterdir())
    ) == 20


@pytest.mark.network
def test_the_package_index_lists_the_pinned_archive():
    if not examples.index_reachable():
        pytest.skip("package index unreachable")
    page_url = examples.index_url().rstrip("/") + f"/{examples.PACKAGE}/"
    page_url, authorization = examples._split_credentials(page_url)
    with examples._open(page_url, examples._INDEX_ACCEPT, authorization) as response:
        body, content_type = response.read(), response.headers.get("Content-Type", "")
    url, sha = examples.find_archive_url(body, content_type, page_url)
    assert url.endswith("/" + examples.ARCHIVE_NAME) and sha in (None, examples.ARCHIVE_SHA256)


def test_a_mask_off_its_scans_voxel_grid_is_refused(tmp_path):
    scan, mask = tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), scan)
    shifted = np.diag([3.0, 3.0, 3.0, 1.0])
    shifted[0, 3] = 1.5  # half a voxel
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), shifted), mask)
    with pytest.raises(RuntimeError, match="not a whole-voxel crop"):
        examples._write_mask_in_scan_grid(mask, scan, tmp_path / "out.nii.gz", 5)
    shifted[0, 3] = 15.0  # 5 voxels: the 2-voxel crop ends past the scan's 6
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), shifted), mask)
    with pytest.raises(RuntimeError, match="outside"):
        examples._write_mask_in_scan_grid(mask, scan, tmp_path / "out.nii.gz", 5)
