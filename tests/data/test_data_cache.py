"""On-disk cache of the deterministic preprocessing: reuse, and invalidation by parameters and by files."""

from __future__ import annotations

import os

import pytest
import torch

import anatomask_components.data.readers as readers
from anatomask_components.data.datasets import CachedScanDataset, cached_dataset
from anatomask_components.data.preprocessing import (
    finetune_val_transforms,
    inference_transforms,
    pretrain_transforms,
)
from anatomask_components.data.writers import write_volume


@pytest.fixture
def read_count(monkeypatch):
    """Count the files the reader opens."""
    calls = []
    original = readers.read_volume

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(readers, "read_volume", counting)
    return calls


def test_cached_items_equal_fresh_ones_and_are_not_read_again(tmp_path, phantom, read_count):
    transform = finetune_val_transforms(num_classes=4)
    dataset = cached_dataset([phantom.item()], transform, tmp_path / "cache")
    first = dataset[0]
    assert len(read_count) == 2  # image and label
    second = dataset[0]
    assert len(read_count) == 2
    fresh = finetune_val_transforms(num_classes=4)(phantom.item())
    for key in ("image", "label"):
        torch.testing.assert_close(second[key].as_tensor(), fresh[key].as_tensor(), rtol=0, atol=0)
        torch.testing.assert_close(second[key].affine, fresh[key].affine, rtol=0, atol=0)
        torch.testing.assert_close(first[key].as_tensor(), fresh[key].as_tensor(), rtol=0, atol=0)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_a_new_dataset_object_reuses_the_cache_and_random_crops_still_vary(tmp_path, phantom, read_count):
    CachedScanDataset(
        [{"image": str(phantom.image_path)}], pretrain_transforms(roi_size=(16, 16, 8)), tmp_path / "cache"
    )[0]
    assert len(read_count) == 1
    dataset = CachedScanDataset(
        [{"image": str(phantom.image_path)}], pretrain_transforms(roi_size=(16, 16, 8)), tmp_path / "cache"
    )
    crops = [dataset[0]["image"] for _ in range(6)]
    assert len(read_count) == 1
    assert all(tuple(c.shape) == (1, 16, 16, 8) for c in crops)
    assert any(not torch.equal(crops[0].as_tensor(), c.as_tensor()) for c in crops[1:])


@pytest.mark.parametrize(
    "changed",
    [{"spacing": (2.0, 2.0, 2.0)}, {"normalization": "none"}, {"roi_size": (16, 16, 16)}],
    ids=["spacing", "normalization", "roi-padding"],
)
def test_changing_a_preprocessing_parameter_invalidates_the_cache(tmp_path, phantom, read_count, changed):
    settings = {"roi_size": (16, 16, 8)}
    item = [{"image": str(phantom.image_path)}]
    CachedScanDataset(item, pretrain_transforms(**settings), tmp_path / "cache")[0]
    CachedScanDataset(item, pretrain_transforms(**settings), tmp_path / "cache")[0]
    assert len(read_count) == 1
    CachedScanDataset(item, pretrain_transforms(**{**settings, **changed}), tmp_path / "cache")[0]
    assert len(read_count) == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_rewriting_the_file_invalidates_the_cache(tmp_path, phantom, read_count):
    item = [{"image": str(phantom.image_path)}]
    transform = inference_transforms(normalization="none")
    before = CachedScanDataset(item, transform, tmp_path / "cache")[0]["image"]
    write_volume(phantom.image_path, phantom.image + 100.0, phantom.affine)
    stat = os.stat(phantom.image_path)
    os.utime(phantom.image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = CachedScanDataset(item, transform, tmp_path / "cache")[0]["image"]
    assert len(read_count) == 2
    torch.testing.assert_close(after.as_tensor(), before.as_tensor() + 100.0)


def test_an_unreadable_cache_file_is_recomputed(tmp_path, phantom, read_count):
    item = [{"image": str(phantom.image_path)}]
    transform = inference_transforms()
    expected = CachedScanDataset(item, transform, tmp_path / "cache")[0]["image"]
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = CachedScanDataset(item, transform, tmp_path / "cache")[0]["image"]
    torch.testing.assert_close(again.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
    assert len(read_count) == 2 and cache_file.stat().st_size > 1000
