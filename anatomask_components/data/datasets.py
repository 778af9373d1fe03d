"""Datasets that cache the deterministic preprocessing on disk and can skip bad scans.

The cache key of an item combines (1) every input file's path, size and modification time (for a DICOM
folder: those of its files), with the item's other fields as they are, and (2) a digest of the
deterministic transforms' parameters (every attribute of every transform before the first random one, plus
this package's version). Changing a parameter (spacing, normalisation, fingerprint values, label mapping,
ROI padding, ...), replacing a file or changing a field (the ``labelled`` classes of a partially labelled
scan, which the random part reads from the cached item) gives a new key, so stale items are never used;
(3) the stored dtype (``cache_dtype``) and the file format.
Old entries are left behind until ``anatomask cache`` prunes them (:mod:`anatomask_components.data.cache`,
which also places the one cache per machine and records which dataset uses which entries).

Stored compactly: a float tensor whose values are all integers of a small range (label maps) is stored as
uint8 or int16, losslessly; any other float tensor (the normalised image) as float16 by default, 2 bytes a
voxel (``cache_dtype="float32"`` keeps it exact). Transforms after the cache see the original dtype again:
the random crop runs on the compact memory-mapped volume, so it reads only the voxels it keeps, and only
the crop is converted back.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import pickle
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import (
    Compose,
    Cropd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandomizableTrait,
    RandSpatialCropSamplesd,
    RandWeightedCropd,
    Transform,
)
from monai.utils import convert_to_tensor

import anatomask_components
from anatomask_components.data.cache import cache_full_error, dataset_name, hold, record_dataset
from anatomask_components.data.readers import is_resource_error
from anatomask_components.data.validation import InvalidScanError, find_invalid_scan_error
from anatomask_components.files import atomic_write

# Bump when the cached content changes without any transform parameter changing.
# 2: {"data": item with compact tensors, "dtypes": {key: original dtype}}.
CACHE_FORMAT_VERSION = 2
CACHE_DTYPES = ("float16", "float32")
FLOAT16_MAX = 65504.0


def cache_safe_globals() -> list[Any]:
    """The only Python globals a cache file may name: MONAI's MetaTensor and its metadata keys, and the
    NumPy pieces of the arrays in its metadata (``original_affine``, ``spatial_shape``, the transform
    history). Data only: none of them runs code when unpickled.

    Found by loading real cache files (NIfTI, NRRD, MHA and DICOM inputs; every preprocessing pipeline) with
    ``weights_only=True`` until torch stopped refusing. MONAI also registers its own types globally; they
    are listed here so that the load does not depend on that.
    """
    from monai.data import MetaObj, MetaTensor
    from monai.utils import MetaKeys, SpaceKeys, TraceKeys

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x, e.g. next to MONAI Label (numpy<2), whose _core shim may be partial
        from numpy.core.multiarray import _reconstruct
    allowed: list[Any] = [MetaTensor, MetaObj, MetaKeys, SpaceKeys, TraceKeys]
    allowed += [_reconstruct, np.ndarray, np.dtype]
    # NumPy >= 1.25 pickles dtypes through their classes; older versions need only np.dtype.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [dtypes.Float64DType, dtypes.Int64DType]
    return allowed


_allow_lock = threading.Lock()
_allow_users = 0
_allow_context: Any = None


@contextlib.contextmanager
def _cache_globals_allowed() -> Iterator[None]:
    """Allow :func:`cache_safe_globals` for weights-only loads while any thread is inside this block.

    torch's ``safe_globals`` edits one process-wide set and removes its globals on exit, so two threads
    each using it would pull the allow-list from under each other: the first to enter adds the globals,
    the last to leave removes them. Globals registered before (MONAI registers MetaTensor) are left alone.
    """
    global _allow_users, _allow_context
    with _allow_lock:
        if _allow_users == 0:
            registered = torch.serialization.get_safe_globals()
            missing = [g for g in cache_safe_globals() if g not in registered]
            _allow_context = torch.serialization.safe_globals(missing)
            _allow_context.__enter__()
        _allow_users += 1
    try:
        yield
    finally:
        with _allow_lock:
            _allow_users -= 1
            if _allow_users == 0:
                _allow_context.__exit__(None, None, None)
                _allow_context = None


def _short_reason(error: BaseException) -> str:
    """The informative line of a load error (torch's weights-only refusal spans a dozen lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    keywords = ("unsupported global", "but got")
    line = next((x for x in lines if any(k in x.lower() for k in keywords)), lines[0] if lines else "")
    return f"{type(error).__name__}: {line}"


def _describe(obj: Any, seen: set[int]) -> Any:
    """A JSON-able, address-free description of an object's configuration, for hashing."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__qualname__}.{obj.name}"
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        array = np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj)
        return {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        }
    if isinstance(obj, (torch.dtype, np.dtype)):
        return str(obj)
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_describe(v, seen) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(json.dumps(_describe(v, seen), sort_keys=True) for v in obj)
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    if id(obj) in seen:
        return f"<cycle {type(obj).__qualname__}>"
    if hasattr(obj, "__dict__"):
        seen.add(id(obj))
        # Thread-locals hold run-time flags (MONAI's tracing state), not configuration.
        state = {k: v for k, v in vars(obj).items() if not isinstance(v, threading.local)}
        return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "state": _describe(state, seen)}
    text = repr(obj)
    return type(obj).__qualname__ if " at 0x" in text else text


def transform_digest(transforms: Sequence[Callable]) -> str:
    """sha256 of the configuration of ``transforms`` (and of the package and cache format versions).

    Args:
        transforms: the deterministic transforms whose output is cached.

    Returns:
        a hex digest that changes whenever any of their parameters does.
    """
    description = {
        "anatomask_components": anatomask_components.__version__,
        "cache_format": CACHE_FORMAT_VERSION,
        "transforms": [_describe(t, set()) for t in transforms],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _file_identity(value: Any) -> Any:
    """Replace existing paths by (path, size, mtime) so that a rewritten file changes the key."""
    if isinstance(value, (list, tuple)):
        return [_file_identity(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        path = Path(value).resolve()
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return {"path": str(path), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    return _describe(value, set())


def item_digest(item: Mapping[str, Any]) -> str:
    """sha256 of a datalist item with its files' identities (path, size, modification time)."""
    description = {str(k): _file_identity(v) for k, v in sorted(item.items(), key=lambda kv: str(kv[0]))}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def split_at_first_random(transform: Callable | Sequence[Callable]) -> tuple[Compose, int | None]:
    """Wrap ``transform`` in a Compose and find where its random part starts (as PersistentDataset does).

    Returns:
        the Compose and the index of its first random (or non-MONAI) transform, None if there is none.
    """
    compose = transform if isinstance(transform, Compose) else Compose(transform)
    first_random = compose.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    )
    return compose, first_random


def compact_dtype(tensor: torch.Tensor, cache_dtype: str = "float16") -> torch.dtype:
    """The dtype a float tensor is stored in: uint8 / int16 when all its values are integers in their range
    (lossless: label maps), else ``cache_dtype`` when its finite values fit (float16: up to 65504), else
    its own dtype. Non-float tensors keep theirs."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor.dtype
    plain = tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor
    finite = bool(torch.isfinite(plain).all())
    if finite and torch.equal(plain, torch.round(plain)):
        low, high = float(plain.min()), float(plain.max())
        if low >= 0 and high <= 255:
            return torch.uint8
        if low >= -(2**15) and high < 2**15:
            return torch.int16
    if cache_dtype == "float16" and plain.dtype in (torch.float32, torch.float64):
        largest = float(torch.nan_to_num(plain, nan=0.0, posinf=0.0, neginf=0.0).abs().max())
        if largest <= FLOAT16_MAX:
            return torch.float16
    return tensor.dtype


def pack_item(item: Mapping[str, Any], cache_dtype: str = "float16") -> dict[str, Any]:
    """What a cache file holds for ``item``: ``{"data": item with compact tensors, "dtypes": {key: original
    dtype}}`` (see :func:`compact_dtype`; only the item's top-level tensors are converted)."""
    data, dtypes = dict(item), {}
    for key, value in item.items():
        if isinstance(value, torch.Tensor):
            dtype = compact_dtype(value, cache_dtype)
            if dtype != value.dtype:
                data[key] = value.to(dtype)
                dtypes[str(key)] = str(value.dtype).removeprefix("torch.")
    return {"data": data, "dtypes": dtypes}


def unpack_item(data: Any, dtypes: Mapping[str, str]) -> Any:
    """``data`` (an item, or a list of items from a multi-sample crop) with its tensors back in their
    original dtypes."""
    if isinstance(data, list):
        return [unpack_item(d, dtypes) for d in data]
    restored = dict(data)
    for key, dtype in dtypes.items():
        if isinstance(restored.get(key), torch.Tensor):
            restored[key] = restored[key].to(getattr(torch, dtype))
    return restored


def _is_crop(transform: Any) -> bool:
    """A transform that only selects voxels (it works in any dtype): the compact volume can be cropped
    before its dtype is restored."""
    crops = (
        Cropd,
        RandCropByLabelClassesd,
        RandCropByPosNegLabeld,
        RandSpatialCropSamplesd,
        RandWeightedCropd,
    )
    return isinstance(transform, crops)


class CachedScanDataset(Dataset):
    """Dataset that stores the deterministic preprocessing of every item on disk, reused across epochs.

    The transforms up to the first random one run once per item and file version; their output is saved
    under ``cache_dir`` (``<key>.pt``, compact: see :func:`pack_item`) and memory-mapped on later epochs, so
    a random crop reads only the part of the volume it needs; the crop is then converted back to the
    original dtype (float32) before the other random transforms, which run on every access. The first
    epoch returns the same compact-then-restored values as the later ones. Writes are atomic (temporary
    file + rename), so several DataLoader workers or processes can share one folder; a full disk raises
    :class:`~anatomask_components.data.cache.CacheFullError` naming the folder.

    With a cache folder, the dataset records itself there
    (:func:`~anatomask_components.data.cache.record_dataset`), holds a lease on its entries while it exists
    (pruning never removes them) and marks each entry used on its first read in every process.

    Bad scans (:class:`InvalidScanError` anywhere in the deterministic part):

    - ``on_invalid="raise"`` (default, fine-tuning): the error is raised as is, naming the file.
    - ``on_invalid="warn"`` (pretraining on large unchecked folders): one warning, the item is marked
      invalid in the cache (``<key>.invalid``, so later epochs and workers don't read it again) and the
      next valid item is returned in its place.

    Resource errors (MemoryError; OSError such as too many open files, I/O error, disk full: see
    :func:`~anatomask_components.data.readers.is_resource_error`) always propagate and mark nothing, even
    when they lie behind an :class:`InvalidScanError`: the next access tries the item again.

    Cache files are read with ``torch.load(weights_only=True)`` allowing only the types of
    :func:`cache_safe_globals`; a file that needs anything else (tampered with, or truncated) is recomputed
    with a warning, never unpickled.

    Args:
        data: datalist items.
        transform: a Compose (or sequence of transforms), e.g. from
            :mod:`anatomask_components.data.preprocessing`.
        cache_dir: cache folder (created), e.g. :func:`~anatomask_components.data.cache.default_cache_dir`;
            None disables caching (and compact storage) but keeps the bad-scan policy.
        on_invalid: ``"raise"`` or ``"warn"``.
        mmap: memory-map cached volumes instead of reading them whole.
        cache_dtype: ``"float16"`` (2 bytes a voxel) or ``"float32"`` (exact) for the stored images.
        name: the dataset's name in ``anatomask cache`` (default: the folder holding its files).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | Sequence[Callable],
        cache_dir: str | os.PathLike | None,
        on_invalid: str = "raise",
        mmap: bool = True,
        cache_dtype: str = "float16",
        name: str | None = None,
    ):
        if on_invalid not in ("raise", "warn"):
            raise ValueError(f"on_invalid must be 'raise' or 'warn', got {on_invalid!r}")
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        compose, self.first_random = split_at_first_random(transform)
        super().__init__(data, compose)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.on_invalid = on_invalid
        self.mmap = mmap
        self.cache_dtype = cache_dtype
        self.transform_hash = transform_digest(compose.transforms[: self.first_random])
        # Crops only select voxels: they run on the compact volume, and only the crop is converted back.
        self._crop_first = self.first_random is not None and _is_crop(compose.transforms[self.first_random])
        self._invalid: set[int] = set()
        self._used: set[int] = set()
        self.dataset_id: str | None = None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            keys = [self.cache_key(i) for i in range(len(self.data))]
            try:
                self.dataset_id = record_dataset(
                    self.cache_dir, keys, name or dataset_name(self.data), self.transform_hash, cache_dtype
                )
                hold(self.cache_dir, self.dataset_id, owner=self)
            except OSError as error:  # a read-only cache still serves its entries
                warnings.warn(
                    f"cannot record this dataset in the cache {self.cache_dir} ({error}): `anatomask cache` "
                    "will neither list it nor know it is in use",
                    stacklevel=2,
                )

    def cache_key(self, index: int) -> str:
        """The content key of item ``index``: its files, the cached transforms and the stored dtype."""
        digest = item_digest(self.data[index]) + self.transform_hash + self.cache_dtype
        return hashlib.sha256(digest.encode()).hexdigest()

    def cache_path(self, index: int) -> Path | None:
        """The cache file of item ``index`` (None without a cache folder)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.cache_key(index)}.pt"

    def _load(self, path: Path) -> dict[str, Any] | None:
        """A cache file's content, or None (with a warning, the file removed) when it cannot be used."""
        try:
            # Anyone who can write to the cache folder could plant a pickle that runs code: only the
            # data types our own files hold are allowed, for this load only.
            with _cache_globals_allowed():
                stored = torch.load(path, weights_only=True, mmap=self.mmap)
            if not (isinstance(stored, dict) and isinstance(stored.get("dtypes"), dict) and "data" in stored):
                raise RuntimeError(f"not a cache file of format {CACHE_FORMAT_VERSION}")
            return stored
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # a full disk, or a refusal
            warnings.warn(
                f"unreadable cache file {path} ({_short_reason(error)}); recomputing it", stacklevel=3
            )
            path.unlink(missing_ok=True)
            return None

    def _deterministic(self, index: int) -> dict[str, Any]:
        """The deterministic part of item ``index`` as stored: ``{"data": compact item, "dtypes": {...}}``."""
        item = dict(self.data[index])
        path = self.cache_path(index)
        if path is None:
            return {"data": self.transform(item, end=self.first_random, threading=True), "dtypes": {}}
        marker = path.with_suffix(".invalid")
        if marker.exists():
            raise InvalidScanError(marker.read_text(encoding="utf-8"))
        if path.exists() and (stored := self._load(path)) is not None:
            if index not in self._used:
                self._used.add(index)
                with contextlib.suppress(OSError):  # a read-only cache still works, unrecorded
                    os.utime(path)
            return stored
        try:
            result = self.transform(item, end=self.first_random, threading=True)
        except Exception as error:
            invalid = find_invalid_scan_error(error)
            # The marker is permanent, so only a file that cannot be parsed earns it, never a lack of
            # memory or file handles (even one that some transform reported as an InvalidScanError).
            if invalid is not None and self.on_invalid == "warn" and not is_resource_error(error):
                self._write(marker, lambda f: f.write(str(invalid).encode()))
            raise
        stored = pack_item(convert_to_tensor(result, track_meta=True), self.cache_dtype)
        self._write(path, lambda f: torch.save(stored, f))
        self._used.add(index)
        return stored

    def _write(self, path: Path, write: Callable[[Any], None]) -> None:
        try:
            atomic_write(path, write)
        except OSError as error:
            full = cache_full_error(path.parent, error)
            if full is not None:
                raise full from error
            raise

    def precompute(self, index: int) -> str:
        """Fill the cache entry of item ``index`` (``anatomask preprocess``).

        Returns:
            ``"cached"`` if it was there already, else ``"computed"``. Errors propagate as in ``__getitem__``
            (a bad scan under ``on_invalid="warn"`` is marked first).
        """
        path = self.cache_path(index)
        existed = path is not None and path.exists()
        self._deterministic(index)
        return "cached" if existed else "computed"

    def _random_part(self, stored: Mapping[str, Any]) -> Any:
        data, dtypes = stored["data"], stored["dtypes"]
        if self.first_random is None:
            return unpack_item(data, dtypes)
        if not self._crop_first:
            return self.transform(unpack_item(data, dtypes), start=self.first_random)
        cropped = self.transform(data, start=self.first_random, end=self.first_random + 1)
        if self.first_random + 1 == len(self.transform.transforms):
            return unpack_item(cropped, dtypes)
        return self.transform(unpack_item(cropped, dtypes), start=self.first_random + 1)

    def _transform(self, index: int) -> Any:
        for offset in range(len(self.data)):
            candidate = (index + offset) % len(self.data)
            if candidate in self._invalid:
                continue
            try:
                stored = self._deterministic(candidate)
            except Exception as error:
                invalid = find_invalid_scan_error(error)
                if invalid is None or is_resource_error(error):
                    raise
                if self.on_invalid == "raise":
                    raise invalid from error
                self._invalid.add(candidate)
                warnings.warn(f"skipping invalid scan: {invalid}", stacklevel=2)
                continue
            return self._random_part(stored)
        raise RuntimeError(f"all {len(self.data)} items of the dataset are invalid scans")


def cached_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Callable | Sequence[Callable],
    cache_dir: str | os.PathLike | None,
    on_invalid: str = "raise",
    cache_dtype: str = "float16",
) -> CachedScanDataset:
    """A :class:`CachedScanDataset` (convenience for bundle configs and scripts).

    Args:
        data: datalist items.
        transform: preprocessing, e.g. ``pretrain_transforms(...)``.
        cache_dir: cache folder; None disables caching.
        on_invalid: ``"raise"`` or ``"warn"`` (skip bad scans with a warning).
        cache_dtype: ``"float16"`` or ``"float32"`` for the stored images.

    Returns:
        the dataset.
    """
    return CachedScanDataset(data, transform, cache_dir, on_invalid=on_invalid, cache_dtype=cache_dtype)
