"""Reconstruction difficulty of a scan (anatomask_components.difficulty) on a real CT, with a tiny network."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from anatomask_components.data import examples
from anatomask_components.data.fingerprint import write_fingerprint
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.difficulty import DifficultyScorer, window_starts

REPO = Path(__file__).resolve().parents[1]
# The bundle's small-model preset at 6 mm: case A (122 x 101 x 112 at 3 mm) becomes 62 x 51 x 57 voxels, eight
# 32^3 windows of 64 patches (mask unit 8^3).
TINY_BUNDLE = {
    "stunet_size": "tiny",
    "roi_size": [32, 32, 32],
    "spacing": [6.0, 6.0, 6.0],
}
# CT statistics of the demo's pretraining scans (cases A, B and C), as a training run writes them
CT_FINGERPRINT = {
    "intensity": {"CT": {"mean": -169.8, "std": 386.0, "percentile_00_5": -947.0, "percentile_99_5": 696.0}},
    "source": "test",
}


def tiny_bundle(folder: Path, seed: int = 0) -> Path:
    """A pretraining bundle folder with the tiny network: configs, models/model.pt (initialised with ``seed``)
    and models/fingerprint.json."""
    configs = folder / "configs"
    configs.mkdir(parents=True)
    config = json.loads((REPO / "bundles/anatomask_pretrain/configs/inference.json").read_text())
    config.update(TINY_BUNDLE)
    (configs / "inference.json").write_text(json.dumps(config, indent=4))
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    torch.manual_seed(seed)
    model = folder / "models" / "model.pt"
    model.parent.mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), model)
    write_fingerprint(model, CT_FINGERPRINT)
    return folder


@pytest.fixture(scope="module")
def example_images(tmp_path_factory) -> Path:
    """The real example scans (images/A_ct.nii.gz, B, C_ct_dicom, MR); skipped offline without the archive."""
    if not (examples.default_cache_dir() / examples.ARCHIVE_NAME).exists() and not examples.index_reachable():
        pytest.skip("package index unreachable and no cached TotalSegmentator archive")
    dest = tmp_path_factory.mktemp("examples")
    examples.fetch_examples(str(dest))
    return dest / "images"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "anatomask_pretrain")


def scorer(bundle: Path, **options) -> DifficultyScorer:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no training checkpoint with a teacher")
        return DifficultyScorer(bundle, **{"num_masks": 2, "device": "cpu", **options})


def test_window_starts_tile_and_end_at_the_border():
    assert window_starts(32, 32) == [0]
    assert window_starts(16, 32) == [0]
    assert window_starts(64, 32) == [0, 32]
    assert window_starts(72, 32) == [0, 32, 40]


def test_score_is_deterministic_for_a_seed_and_independent_of_the_batch(bundle, example_images):
    scan = example_images / "A_ct.nii.gz"
    first = scorer(bundle, seed=3, batch_size=1).score_file(scan)
    again = scorer(bundle, seed=3, batch_size=5).score_file(scan)
    other_seed = scorer(bundle, seed=4, batch_size=1).score_file(scan)

    # 62 x 51 x 57 voxels at 6 mm -> 8 x 7 x 8 patches of 8^3; two masks at ratio 0.6 mask every patch
    assert first.preview.shape == (62, 51) and first.preview_index == 57 // 2
    assert first.patch_errors.shape == (8, 7, 8)
    assert np.isfinite(first.patch_errors).all()
    np.testing.assert_allclose(again.patch_errors, first.patch_errors, rtol=1e-5)
    assert again.score == pytest.approx(first.score, rel=1e-6)
    assert not np.allclose(other_seed.patch_errors, first.patch_errors)
    # the score is the mean over the body patches, the quantile their 0.9 quantile
    body = first.patch_errors[first.body_patches]
    assert 0 < body.size < first.patch_errors.size
    assert first.score == pytest.approx(float(body.mean()))
    assert first.quantile == pytest.approx(float(np.quantile(body, 0.9)))
    assert first.flags == []
    assert first.stats["hu_p1"] < -900 and 0.3 < first.stats["body_fraction"] < 0.8


def test_noise_corrupted_copy_scores_higher_than_the_original(bundle, example_images, tmp_path):
    scan = example_images / "A_ct.nii.gz"
    image = nib.load(scan)
    noise = np.random.default_rng(0).normal(0.0, 100.0, image.shape)
    noisy = tmp_path / "A_noisy.nii.gz"
    nib.save(nib.Nifti1Image((image.get_fdata() + noise).astype(np.float32), image.affine), noisy)

    score = scorer(bundle, seed=0, batch_size=4)
    original, corrupted = score.score_file(scan), score.score_file(noisy)
    assert corrupted.score > original.score
    assert corrupted.quantile > original.quantile
    # the same masks on the same grid: the noise makes most body patches harder, not a lucky few
    body = original.body_patches & corrupted.body_patches
    harder = corrupted.patch_errors[body] > original.patch_errors[body]
    assert harder.mean() > 0.75, harder.mean()


def test_teacher_weights_come_from_the_newest_training_checkpoint(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    student = torch.load(copy / "models" / "model.pt", weights_only=True)
    teacher = {k: v + 0.5 if v.is_floating_point() else v for k, v in student.items()}
    checkpoints = copy / "runs" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(
        {"student": student, "teacher": {"teacher": teacher, "last_momentum": 0.99}},
        checkpoints / "checkpoint_4.pt",
    )
    torch.save({"student": student}, checkpoints / "checkpoint_9.pt")  # newer, but without a teacher

    chosen = scorer(copy)
    assert "checkpoint_4.pt" in chosen.weights_source
    assert chosen.model_digest == hashlib.sha256((checkpoints / "checkpoint_4.pt").read_bytes()).hexdigest()
    name = next(k for k, v in teacher.items() if v.is_floating_point())
    assert torch.equal(chosen.network.state_dict()[name], teacher[name])

    with pytest.warns(UserWarning, match="no training checkpoint with a teacher"):
        fallback = DifficultyScorer(bundle, device="cpu")
    assert fallback.weights_source.startswith("student models/model.pt")
    assert fallback.model_digest == hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert scorer(bundle, weights="student").model_digest == fallback.model_digest


def test_bad_inputs_name_the_file(bundle, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(InvalidScanError, match="broken.nii.gz: cannot be read"):
        scorer(bundle).score_file(broken)
    with pytest.raises(ValueError, match="teacher or student or an existing weights file"):
        scorer(bundle, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="not a pretraining bundle"):
        DifficultyScorer(tmp_path)
    wrong = tiny_bundle(tmp_path / "wrong")
    torch.save({"conv.weight": torch.zeros(1)}, wrong / "models" / "model.pt")
    with pytest.raises(ValueError, match="model.pt: the weights do not fit network_def"):
        scorer(wrong, weights="student")
