"""On-disk cache of the deterministic preprocessing: reuse, and invalidation by parameters and by files."""

from __future__ import annotations

import errno
import os
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Transform

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


def _assert_same_meta_tensor(actual, expected):
    assert isinstance(actual, MetaTensor)
    torch.testing.assert_close(actual.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(actual.affine, expected.affine, rtol=0, atol=0)
    assert actual.meta.keys() == expected.meta.keys()
    for key, value in expected.meta.items():
        if isinstance(value, (np.ndarray, torch.Tensor)):
            np.testing.assert_array_equal(np.asarray(actual.meta[key]), np.asarray(value), err_msg=key)
        elif isinstance(value, float) and np.isnan(value):
            assert np.isnan(actual.meta[key]), key
        else:
            assert actual.meta[key] == value, key
    assert [op["class"] for op in actual.applied_operations] == [
        op["class"] for op in expected.applied_operations
    ]


def test_cache_files_round_trip_through_a_weights_only_load(tmp_path, phantom, monkeypatch):
    loads = []
    original = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    transform = finetune_val_transforms(num_classes=4)
    fresh = CachedScanDataset([phantom.item()], transform, tmp_path / "cache")[0]
    assert not loads
    cached = CachedScanDataset([phantom.item()], transform, tmp_path / "cache")[0]
    assert len(loads) == 1 and loads[0]["weights_only"] is True
    for key in ("image", "label"):
        _assert_same_meta_tensor(cached[key], fresh[key])


def test_the_allow_list_is_scoped_to_the_load_and_safe_across_threads(tmp_path, phantom):
    from concurrent.futures import ThreadPoolExecutor

    from monai.utils import TraceKeys

    before = torch.serialization.get_safe_globals()
    transform = inference_transforms()
    items = [{"image": str(phantom.image_path)}]
    CachedScanDataset(items, transform, tmp_path / "cache")[0]
    dataset = CachedScanDataset(items, transform, tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an allow-list pulled away mid-load would warn and recompute
        with ThreadPoolExecutor(4) as pool:
            shapes = list(pool.map(lambda _: tuple(dataset[0]["image"].shape), range(32)))
    assert set(shapes) == {(1, 28, 24, 16)}
    after = torch.serialization.get_safe_globals()
    assert MetaTensor in after and TraceKeys not in after  # MONAI's own registration kept, ours gone
    assert len(after) == len(before)


class _RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return (os.system, (f"touch {self.witness}",))


def test_a_cache_file_that_would_run_code_is_not_unpickled_but_recomputed(tmp_path, phantom, read_count):
    item = [{"image": str(phantom.image_path)}]
    transform = inference_transforms()
    expected = CachedScanDataset(item, transform, tmp_path / "cache")[0]["image"]
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    witness = tmp_path / "code_ran"
    torch.save({"image": _RunsCode(witness)}, cache_file)  # a zip file, as torch.save writes the real ones
    with pytest.warns(UserWarning, match=r"unreadable cache file .*system"):
        again = CachedScanDataset(item, transform, tmp_path / "cache")[0]["image"]
    assert not witness.exists()
    torch.testing.assert_close(again.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
    assert len(read_count) == 2
    # the recomputed file replaced the planted one
    _assert_same_meta_tensor(CachedScanDataset(item, transform, tmp_path / "cache")[0]["image"], expected)
    assert len(read_count) == 2


class _FailsOnce(Transform):
    """A deterministic transform that raises ``error`` on its first call only."""

    def __init__(self, error):
        self.error = error
        self.calls = 0

    def __call__(self, data):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return data


def _transient_errors():
    return [MemoryError("out of memory"), OSError(errno.EMFILE, "Too many open files")]


def _chain(error):
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


@pytest.mark.parametrize("error", _transient_errors(), ids=["MemoryError", "EMFILE"])
def test_a_transient_error_in_a_transform_propagates_and_marks_nothing(tmp_path, phantom, error):
    failing = _FailsOnce(error)
    transform = Compose([*inference_transforms().transforms, failing])
    dataset = CachedScanDataset([{"image": str(phantom.image_path)}], transform, tmp_path / "cache", "warn")
    with pytest.raises(Exception) as raised:
        dataset[0]
    assert error in _chain(raised.value)
    assert not list((tmp_path / "cache").glob("*.invalid"))
    assert tuple(dataset[0]["image"].shape[1:]) == (28, 24, 16)
    assert failing.calls == 2


@pytest.mark.parametrize("error", _transient_errors(), ids=["MemoryError", "EMFILE"])
def test_a_transient_read_error_reported_as_invalid_scan_marks_nothing(tmp_path, phantom, monkeypatch, error):
    # The reader turns every failure into InvalidScanError("cannot be read, ...") raised from the original.
    original = readers._read_nifti
    calls = []

    def fails_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise error
        return original(path)

    monkeypatch.setattr(readers, "_read_nifti", fails_once)
    dataset = CachedScanDataset(
        [{"image": str(phantom.image_path)}], inference_transforms(), tmp_path / "c", "warn"
    )
    with pytest.raises(Exception) as raised:
        dataset[0]
    assert error in _chain(raised.value)
    assert not list((tmp_path / "c").glob("*.invalid")) and not dataset._invalid
    assert tuple(dataset[0]["image"].shape[1:]) == (28, 24, 16)
    assert len(calls) == 2


def test_a_parse_error_still_marks_the_item_invalid(tmp_path, phantom):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(phantom.image_path.read_bytes()[:200])
    items = [{"image": str(broken)}, {"image": str(phantom.image_path)}]
    dataset = CachedScanDataset(items, inference_transforms(), tmp_path / "cache", on_invalid="warn")
    with pytest.warns(UserWarning, match="skipping invalid scan"):
        out = dataset[0]
    assert out["image"].meta["filename_or_obj"] == str(phantom.image_path)
    assert len(list((tmp_path / "cache").glob("*.invalid"))) == 1
