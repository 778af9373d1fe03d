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
    finetune_train_transforms,
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
    dataset = cached_dataset([phantom.item()], transform, tmp_path / "cache", cache_dtype="float32")
    first = dataset[0]
    assert len(read_count) == 2  # image and label
    second = dataset[0]
    assert len(read_count) == 2
    fresh = finetune_val_transforms(num_classes=4)(phantom.item())
    for key in ("image", "label"):
        assert second[key].dtype == fresh[key].dtype == torch.float32
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
    before = CachedScanDataset(item, transform, tmp_path / "cache", cache_dtype="float32")[0]["image"]
    write_volume(phantom.image_path, phantom.image + 100.0, phantom.affine)
    stat = os.stat(phantom.image_path)
    os.utime(phantom.image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = CachedScanDataset(item, transform, tmp_path / "cache", cache_dtype="float32")[0]["image"]
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

    def fails_once(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise error
        return original(path, *args, **kwargs)

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


# --- compact storage -------------------------------------------------------------------------------------


def _stored(path):
    from anatomask_components.data.datasets import _cache_globals_allowed

    with _cache_globals_allowed():
        return torch.load(path, weights_only=True)


def test_images_are_stored_in_float16_and_labels_losslessly_in_uint8(tmp_path, make_phantom_files):
    files = make_phantom_files(tmp_path, shape=(48, 48, 48), spacing=(1.5, 1.5, 1.5))
    transform = finetune_val_transforms(num_classes=4)
    sizes, items = {}, {}
    for dtype in ("float16", "float32"):
        dataset = CachedScanDataset([files.item()], transform, tmp_path / dtype, cache_dtype=dtype)
        items[dtype] = dataset[0]
        (path,) = (tmp_path / dtype).glob("*.pt")
        stored = _stored(path)
        sizes[dtype] = path.stat().st_size
        converted = {"label": "float32", **({"image": "float32"} if dtype == "float16" else {})}
        assert stored["dtypes"] == converted
        assert stored["data"]["label"].dtype == torch.uint8
        assert stored["data"]["image"].dtype == (torch.float16 if dtype == "float16" else torch.float32)
    voxels = 48**3
    # image 2 bytes + label 1 byte a voxel (float32: 4 + 1), plus a few KB of metadata
    assert 3.0 * voxels < sizes["float16"] < 3.0 * voxels + 20_000
    assert 5.0 * voxels < sizes["float32"] < 5.0 * voxels + 20_000
    exact, compact = items["float32"], items["float16"]
    assert compact["image"].dtype == compact["label"].dtype == torch.float32
    torch.testing.assert_close(compact["label"].as_tensor(), exact["label"].as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(compact["image"].affine, exact["image"].affine, rtol=0, atol=0)
    error = (compact["image"].as_tensor() - exact["image"].as_tensor()).abs()
    # float16 rounds to the nearest of 11 significant bits: at most half a unit in the last place
    assert torch.all(error <= exact["image"].as_tensor().abs() * 2.0**-11 + 2.0**-25)
    assert 0 < float(error.max()) < 2e-3  # z-scored phantom: |x| < 4
    assert compact["image"].meta.keys() == exact["image"].meta.keys()


def test_the_first_epoch_returns_what_later_epochs_read(tmp_path, phantom):
    transform = finetune_val_transforms(num_classes=4)
    first = CachedScanDataset([phantom.item()], transform, tmp_path / "c")[0]
    again = CachedScanDataset([phantom.item()], transform, tmp_path / "c")[0]
    for key in ("image", "label"):
        torch.testing.assert_close(first[key].as_tensor(), again[key].as_tensor(), rtol=0, atol=0)


def test_random_crops_are_taken_from_the_compact_volume_then_converted(tmp_path, phantom):
    items = [{"image": str(phantom.image_path)}]
    crops = {}
    for dtype in ("float16", "float32"):
        dataset = CachedScanDataset(
            items, pretrain_transforms(roi_size=(16, 16, 8)), tmp_path / dtype, cache_dtype=dtype
        )
        dataset[0]
        dataset.transform.set_random_state(seed=7)
        crops[dtype] = [dataset[0]["image"] for _ in range(4)]
    for compact, exact in zip(crops["float16"], crops["float32"]):
        assert compact.dtype == torch.float32 and tuple(compact.shape) == (1, 16, 16, 8)
        # cropping and flipping commute with rounding: the same crop of the float16-rounded volume
        torch.testing.assert_close(compact.as_tensor(), exact.as_tensor().half().float(), rtol=0, atol=0)
        torch.testing.assert_close(compact.affine, exact.affine, rtol=0, atol=0)


def test_fine_tuning_crops_keep_labels_exact(tmp_path, phantom):
    transform = finetune_train_transforms(
        roi_size=(16, 16, 8), num_classes=4, num_samples=3, augmentation="none"
    )
    dataset = CachedScanDataset([phantom.item()], transform, tmp_path / "c")
    dataset[0]
    patches = dataset[0]
    assert len(patches) == 3
    for patch in patches:
        assert patch["image"].dtype == patch["label"].dtype == torch.float32
        assert set(torch.unique(patch["label"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}


@pytest.mark.parametrize(
    ("values", "cache_dtype", "expected"),
    [
        ([0.0, 3.0, 13.0], "float16", torch.uint8),
        ([-1024.0, 0.0, 3071.0], "float16", torch.int16),
        ([-1024.0, 0.0, 40000.0], "float16", torch.float16),
        ([-0.5, 1.25, 3.0], "float16", torch.float16),
        ([-0.5, 70000.5], "float16", torch.float32),  # beyond float16's range
        ([-0.5, 1.25], "float32", torch.float32),
        ([0.0, 13.0], "float32", torch.uint8),  # lossless either way
    ],
)
def test_compact_dtype_rules(values, cache_dtype, expected):
    from anatomask_components.data.datasets import compact_dtype

    assert compact_dtype(torch.tensor(values), cache_dtype) == expected


def test_the_stored_dtype_is_part_of_the_key(tmp_path, phantom):
    items = [{"image": str(phantom.image_path)}]
    keys = {
        CachedScanDataset(items, inference_transforms(), tmp_path, cache_dtype=d).cache_key(0)
        for d in ("float16", "float32")
    }
    assert len(keys) == 2
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        CachedScanDataset(items, inference_transforms(), tmp_path, cache_dtype="bfloat16")


def test_a_full_disk_names_the_cache_folder_and_how_to_move_it(tmp_path, phantom, monkeypatch):
    from anatomask_components.data.cache import CacheFullError

    original = torch.save

    def save_to_a_full_disk(obj, f):
        with open("/dev/full", "wb") as full:  # the kernel answers every write with ENOSPC
            original(obj, full)

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(torch, "save", save_to_a_full_disk)
    folder = tmp_path / "cache"
    dataset = CachedScanDataset([{"image": str(phantom.image_path)}], inference_transforms(), folder)
    with pytest.raises(CacheFullError) as raised:
        dataset[0]
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC and str(folder) in message
    assert "free" in message and "ANATOMASK_PREPROCESSED_CACHE" in message and "cache_dir" in message
    assert (
        not list(folder.glob("*.pt"))
        and not list(folder.glob("*.tmp"))
        and not list(folder.glob("*.invalid"))
    )


# --- one cache per machine: records, leases, pruning -----------------------------------------------------


def test_the_default_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from anatomask_components.data.cache import default_cache_dir

    for name in ("ANATOMASK_PREPROCESSED_CACHE", "ANATOMASK_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "anatomask" / "preprocessed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "anatomask" / "preprocessed"
    monkeypatch.setenv("ANATOMASK_CACHE", str(tmp_path / "am"))
    assert default_cache_dir() == tmp_path / "am" / "preprocessed"
    monkeypatch.setenv("ANATOMASK_PREPROCESSED_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"


def _two_datasets(folder, make_phantom_files, root):
    first = [make_phantom_files(root, name=f"a{i}", shape=(20, 20, 12), seed=i) for i in range(2)]
    second = [make_phantom_files(root / "b", name=f"b{i}", shape=(20, 20, 12), seed=9 + i) for i in range(3)]
    (root / "b").mkdir(exist_ok=True)
    a = CachedScanDataset([{"image": str(f.image_path)} for f in first], inference_transforms(), folder)
    b = CachedScanDataset([{"image": str(f.image_path)} for f in second], inference_transforms(), folder)
    for dataset in (a, b):
        for index in range(len(dataset)):
            dataset[index]
    return a, b


def test_the_listing_shows_size_and_use_per_dataset(tmp_path, make_phantom_files):
    import gc

    from anatomask_components.data.cache import cache_summary

    (tmp_path / "b").mkdir()
    a, b = _two_datasets(tmp_path / "cache", make_phantom_files, tmp_path)
    summary = cache_summary(tmp_path / "cache")
    assert summary["entries"] == 5 and summary["unlisted"]["entries"] == 0
    by_name = {d["name"]: d for d in summary["datasets"]}
    assert set(by_name) == {str(tmp_path), str(tmp_path / "b")}
    files = {p.stem: p.stat().st_size for p in (tmp_path / "cache").glob("*.pt")}
    for dataset, name in ((a, str(tmp_path)), (b, str(tmp_path / "b"))):
        listed = by_name[name]
        keys = [dataset.cache_key(i) for i in range(len(dataset))]
        assert listed["items"] == listed["cached"] == len(dataset) and listed["invalid"] == 0
        assert listed["bytes"] == sum(files[k] for k in keys)
        assert listed["cache_dtype"] == "float16" and listed["in_use"] == [os.getpid()]
    assert summary["bytes"] == sum(files.values())
    del a, b, dataset
    gc.collect()
    assert all(d["in_use"] == [] for d in cache_summary(tmp_path / "cache")["datasets"])
    assert not list((tmp_path / "cache" / "leases").iterdir())


def _age(folder, keys, timestamp):
    for key in keys:
        os.utime(folder / f"{key}.pt", (timestamp, timestamp))


def test_pruning_by_date_spares_datasets_in_use(tmp_path, make_phantom_files):
    import gc

    from anatomask_components.data.cache import parse_date, prune

    (tmp_path / "b").mkdir()
    folder = tmp_path / "cache"
    a, b = _two_datasets(folder, make_phantom_files, tmp_path)
    keys_a = [a.cache_key(i) for i in range(2)]
    keys_b = [b.cache_key(i) for i in range(3)]
    old = parse_date("2020-01-01")
    _age(folder, keys_a + keys_b, old)
    del a
    gc.collect()
    dry = prune(folder, before="2021-01-01", dry_run=True)
    assert dry["removed_entries"] == 2 and len(list(folder.glob("*.pt"))) == 5
    report = prune(folder, before="2021-01-01")
    assert report["removed_entries"] == 2 and report["held_entries"] == 3 and report["kept_entries"] == 3
    assert sorted(p.stem for p in folder.glob("*.pt")) == sorted(keys_b)  # b is in use: kept, however old
    assert len(list((folder / "datasets").glob("*.json"))) == 1  # a's record went with its entries
    assert b[0]["image"].shape[0] == 1


def test_pruning_to_a_size_removes_the_least_recently_used_first(tmp_path, make_phantom_files):
    import gc

    from anatomask_components.data.cache import parse_date, prune

    (tmp_path / "b").mkdir()
    folder = tmp_path / "cache"
    a, b = _two_datasets(folder, make_phantom_files, tmp_path)
    keys = [a.cache_key(i) for i in range(2)] + [b.cache_key(i) for i in range(3)]
    for rank, key in enumerate(keys):
        _age(folder, [key], parse_date(f"2024-01-0{rank + 1}"))
    del a, b
    gc.collect()
    sizes = {k: (folder / f"{k}.pt").stat().st_size for k in keys}
    limit = sum(sizes[k] for k in keys[2:])  # room for the three most recent
    report = prune(folder, max_size=limit)
    assert report["removed_entries"] == 2 and report["kept_bytes"] == limit
    assert sorted(p.stem for p in folder.glob("*.pt")) == sorted(keys[2:])


def test_a_lease_of_a_dead_process_protects_nothing(tmp_path, make_phantom_files):
    import gc
    import json
    import socket
    import subprocess
    import sys

    from anatomask_components.data.cache import prune

    folder = tmp_path / "cache"
    files = make_phantom_files(tmp_path, shape=(20, 20, 12))
    dataset = CachedScanDataset([{"image": str(files.image_path)}], inference_transforms(), folder)
    dataset[0]
    identifier = dataset.dataset_id
    del dataset
    gc.collect()
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    lease = folder / "leases" / f"{identifier}.{socket.gethostname()}.{dead_pid}.0.json"
    lease.write_text(json.dumps({"dataset": identifier, "host": socket.gethostname(), "pid": dead_pid}))
    report = prune(folder, max_size=0)
    assert report["removed_entries"] == 1 and report["held_entries"] == 0
    assert not lease.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50GB", 50 * 2**30), ("500 MB", 500 * 2**20), ("1.5T", int(1.5 * 2**40)), ("1024", 1024)],
)
def test_sizes_are_read_as_people_write_them(text, expected):
    from anatomask_components.data.cache import parse_size

    assert parse_size(text) == expected


def test_bad_prune_options_name_the_problem(tmp_path):
    from anatomask_components.data.cache import parse_date, parse_size, prune

    with pytest.raises(ValueError, match="cannot read the size 'lots'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="cannot read the date 'yesterday'"):
        parse_date("yesterday")
    with pytest.raises(FileNotFoundError, match="no preprocessing cache there"):
        prune(tmp_path / "missing", max_size="1GB")
